//! The `ssehub` binary: parse the command line and hand over to the library.

use std::process::ExitCode;
use std::time::Duration;

use ssehub::cli::{Cli, Command, TokenArgs};
use ssehub::commands::{print_out, StdoutClosed};
use ssehub::config::{LogFormat, ServeArgs};
use std::future::Future;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    init_logging(cli.log_format());
    if !matches!(cli.command, None | Some(Command::Serve(_))) {
        ignore_hangup();
    }
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Token(args)) => token(args),
        Some(Command::Publish(args)) => block_on(ssehub::commands::publish(args)),
        Some(Command::Subscribe(args)) => block_on(ssehub::commands::subscribe(args)),
        #[cfg(feature = "bench")]
        Some(Command::Bench(args)) => ssehub_bench::run(args, ssehub::cli::DEFAULT_HUB, |text| {
            print_out(&mut std::io::stdout().lock(), text)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ssehub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A HUP is for the hub (reload its certificate), and operators send it to every `ssehub`
/// process (`kill -HUP $(pidof ssehub)`): the client commands must not die of it. Ignored
/// before any thread starts, so that no thread sees the default action.
fn ignore_hangup() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler, so nothing runs
    // in signal context; it is done while the process has one thread.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Every subscriber holds a file descriptor: take the whole hard limit, as Go's runtime
    // does for the seed (systemd, for one, starts services with a soft limit of 1,024).
    // Before the settings are checked: the default --max-connections follows the limit.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!("cannot raise the open-file limit: {e}");
    }
    let config = args.validate().map_err(anyhow::Error::msg)?;
    // A write past the file-size limit (RLIMIT_FSIZE) must fail with EFBIG, refusing that
    // publish with 503, rather than kill the hub with SIGXFSZ.
    // SAFETY: setting a signal's disposition to "ignore" before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = ssehub::server::bind(config.listen).await?;
        let stop = CancellationToken::new();
        let on_signal = stop.clone();
        tokio::spawn(async move {
            ssehub::server::termination().await;
            on_signal.cancel();
        });
        ssehub::run(listener, config, stop).await
    })?;
    // Streams left hanging by clients that stopped reading must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// The client commands need little: one thread.
fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let alg = ssehub::auth::parse_algorithm(&args.jwt_algorithm).map_err(anyhow::Error::msg)?;
    let key = ssehub::auth::Key::load_signing(alg, &args.jwt_key).map_err(anyhow::Error::msg)?;
    let patterns = args.publish_urlpattern.len() + args.subscribe_urlpattern.len();
    if args.publish.is_empty() && args.subscribe.is_empty() && patterns == 0 {
        anyhow::bail!(
            "a token without --publish or --subscribe would grant nothing: give the topics \
             it may publish to (--publish TOPIC, e.g. --publish '*') and/or receive private \
             updates of (--subscribe TOPIC, or --subscribe-urlpattern PATTERN)"
        );
    }
    let payload = match &args.payload {
        Some(p) => Some(
            serde_json::from_str::<serde_json::Value>(p)
                .map_err(|e| anyhow::anyhow!("--payload is not JSON: {e}"))?,
        ),
        None => None,
    };
    let ttl = (!args.ttl.is_zero()).then_some(args.ttl);
    let token = if args.protocol == "0.x" {
        if patterns > 0 || payload.is_some() {
            anyhow::bail!(
                "--publish-urlpattern, --subscribe-urlpattern and --payload are Mercure 1.0: \
                 drop --protocol 0.x"
            );
        }
        let publish = (!args.publish.is_empty()).then_some(args.publish.as_slice());
        let subscribe = (!args.subscribe.is_empty()).then_some(args.subscribe.as_slice());
        key.mint(publish, subscribe, ttl)
    } else {
        let Some(ttl) = ttl else {
            anyhow::bail!(
                "a Mercure 1.0 token must expire: give --ttl (e.g. 30d), or --protocol 0.x"
            );
        };
        key.sign("at+jwt", &access_token_claims(&args, payload, ttl))
    }
    .map_err(anyhow::Error::msg)?;
    print_out(&mut std::io::stdout().lock(), &format!("{token}\n"))
}

/// The claims of a Mercure 1.0 access token (RFC 9068): grants in `authorization_details`,
/// one entry per action.
fn access_token_claims(
    args: &TokenArgs,
    payload: Option<serde_json::Value>,
    ttl: Duration,
) -> serde_json::Value {
    use serde_json::json;
    let topics = |exact: &[String], patterns: &[String]| -> Vec<serde_json::Value> {
        exact
            .iter()
            .map(|m| json!({"match": m}))
            .chain(
                patterns
                    .iter()
                    .map(|m| json!({"match": m, "match_type": "urlpattern"})),
            )
            .collect()
    };
    const TYPE: &str = "https://mercure.rocks/authorization-detail";
    let mut details = Vec::new();
    let publish = topics(&args.publish, &args.publish_urlpattern);
    if !publish.is_empty() {
        details.push(json!({"type": TYPE, "actions": ["publish"], "topics": publish}));
    }
    let subscribe = topics(&args.subscribe, &args.subscribe_urlpattern);
    if !subscribe.is_empty() {
        let mut d = json!({"type": TYPE, "actions": ["subscribe"], "topics": subscribe});
        if let Some(p) = payload {
            d["payload"] = p;
        }
        details.push(d);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "iss": args.issuer,
        "aud": args.audience,
        "iat": now.as_secs(),
        "exp": (now + ttl).as_secs(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "authorization_details": details,
    })
}
