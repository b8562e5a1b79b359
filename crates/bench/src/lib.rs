//! `ssehub bench`: a load generator for SSE servers, ssehub and its peers alike.
//!
//! A crate of its own, apart from the hub: it knows about nchan and the naive baseline peer,
//! and it brings a histogram and a progress bar that a hub has no use for. It shares only the
//! event-stream format (`ssehub-sse`) with the hub; the `ssehub` binary's `bench` subcommand
//! calls [`run`], and `cargo build --no-default-features` leaves it out of the binary.
//!
//! Subscribers are raw HTTP/1.1 connections (a hand-written GET, a hand-decoded chunked body,
//! the crate's own incremental SSE parser) because a full HTTP client per subscriber would
//! measure the client. Every payload carries its sequence number and send time, so the run
//! reports loss, duplicates and latency; with `--pid` it also reads the server's CPU and
//! memory from `/proc`, which is what the comparison in `docs/BENCHMARKS.md` rests on.
//! `--soak` runs mixed load for a long time instead (see `soak.rs`). `--tls` puts the same
//! subscribers behind TLS (`tls.rs`), and `--http2` multiplexes them as streams over TLS
//! connections (`h2.rs`), counted by the same code.

mod h2;
mod load;
mod process;
mod report;
mod soak;
mod tls;
mod wire;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use load::{Counts, Plan};
use process::{Proc, Server};
pub use report::Report;
use report::{Latency, ServerFigures};
pub use soak::{Lifetime, SoakArgs};

/// Which kind of server the URLs and bodies are shaped for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Peer {
    /// A Mercure hub: `GET HUB?topic=T`, `POST HUB` with `topic=T&data=D` and a token.
    Ssehub,
    /// nginx + nchan as `bench/compare.sh` configures it: `/sub/T` and `/pub/T`.
    Nchan,
    /// The naive axum server in `bench/baseline`: `/events?topic=T`, `/publish?topic=T`.
    Baseline,
    /// Anything else: give `--sub-url` and `--pub-url` (and `--pub-body` unless the body is
    /// the data itself).
    Custom,
}

/// Flags of `ssehub bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// What kind of server is measured; sets the URL and body shapes.
    #[arg(long, value_enum, default_value = "ssehub")]
    pub target: Peer,
    /// The server's base URL (for ssehub, the hub URL). Defaults: ssehub
    /// http://127.0.0.1:8000/.well-known/mercure, nchan http://127.0.0.1:8090, baseline
    /// http://127.0.0.1:3000. Several comma-separated URLs (the nodes of a cluster, same path on
    /// each) spread subscribers and publishers over them in turn.
    #[arg(long)]
    pub hub: Option<String>,
    /// Subscribe URL template; `{hub}` and `{topic}` are filled in.
    #[arg(long)]
    pub sub_url: Option<String>,
    /// Publish URL template; `{hub}` and `{topic}` are filled in.
    #[arg(long)]
    pub pub_url: Option<String>,
    /// Publish body template; `{topic}` and `{data}` are filled in.
    #[arg(long)]
    pub pub_body: Option<String>,
    /// Extra header on publishes, `Name: value` (repeatable).
    #[arg(long)]
    pub pub_header: Vec<String>,
    /// Extra header on subscribe requests, `Name: value` (repeatable), e.g. a token.
    #[arg(long)]
    pub header: Vec<String>,
    /// Publisher token (sent as `Authorization: Bearer`).
    #[arg(long, env = "SSEHUB_BENCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Or the hub's HS256 secret, to mint a publisher token for the run.
    #[arg(long, env = "SSEHUB_PUBLISHER_JWT_KEY", hide_env_values = true)]
    pub jwt_key: Option<String>,
    /// Reading subscribers [default: 100; with --soak, 2000 at any time].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Subscribers connecting at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Spread subscribers' source addresses over 127.0.0.1 to 127.0.0.K [default: 1; with
    /// --soak, 4].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_ips: Option<u8>,
    /// Updates to publish.
    #[arg(long, default_value_t = 1000)]
    pub updates: u64,
    /// Publish rate, updates per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Payload size in bytes (at least the sequence number and send time).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Publisher keep-alive connections.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// Speak TLS to the server, subscribers and publishers alike (an `https://` URL does too).
    #[arg(long)]
    pub tls: bool,
    /// A PEM file of certificates to trust over TLS: the server's CA, or its self-signed
    /// certificate itself [default: the system's authorities].
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Subscribers speak HTTP/2 (needs TLS: ALPN h2, as browsers do), several streams on each
    /// connection; publishers stay on HTTP/1.1.
    #[arg(long)]
    pub http2: bool,
    /// With --http2, the event streams on each connection: --subscribers counts streams, and
    /// the connections are that many over N, rounded up.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub streams_per_connection: u32,
    /// Extra subscribers that never read (with a small receive buffer) [default: 0; with
    /// --soak, 5].
    #[arg(long)]
    pub slow: Option<usize>,
    /// Topics: subscribers are spread over them, each update goes to one at random [default:
    /// 1; with --soak, 10].
    #[arg(long)]
    pub topics: Option<usize>,
    /// Percent of the reading subscribers that subscribe through a URI template matching
    /// only their topic (`bench-N{?sub}`, one template per topic) instead of the topic itself;
    /// they are owed the same updates. ssehub only: the other peers have no templates.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub template_share: u8,
    /// What `--template-share` subscribes through: `uri` (a Mercure 0.x URI template,
    /// `topic=bench-N{?sub}`) or `urlpattern` (a Mercure 1.0 URL pattern,
    /// `match_urlpattern=bench-N{-:sub}?`).
    #[arg(long, default_value = "uri", value_parser = ["uri", "urlpattern"])]
    pub template_kind: String,
    /// Server process ids to watch (comma-separated; summed, e.g. nginx's workers).
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// How long to wait for missing deliveries after the last publish.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Pause between the last subscriber connecting and the first publish (memory settles).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
    /// A name for this run in the report, e.g. the scenario.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub soak: SoakArgs,
}

impl BenchArgs {
    // A soak keeps a population churning for a long time, so a few flags have other defaults
    // there: a bigger population, spread over topics (a modest load per subscriber) and over
    // source addresses (room for the TIME_WAIT sockets that churn leaves), and a few slow
    // clients.
    fn subscribers(&self) -> usize {
        self.subscribers
            .unwrap_or(if self.soak.soak.is_some() { 2000 } else { 100 })
    }

    fn slow(&self) -> usize {
        self.slow
            .unwrap_or(if self.soak.soak.is_some() { 5 } else { 0 })
    }

    fn topics(&self) -> usize {
        self.topics
            .unwrap_or(if self.soak.soak.is_some() { 10 } else { 1 })
    }

    fn source_ips(&self) -> u8 {
        self.source_ips
            .unwrap_or(if self.soak.soak.is_some() { 4 } else { 1 })
    }

    /// Streams on each subscriber connection: only HTTP/2 carries more than one.
    fn per_connection(&self) -> usize {
        if self.http2 {
            self.streams_per_connection as usize
        } else {
            1
        }
    }
}

/// Runs the benchmark and hands its report to `print` (the binary's way to write to standard
/// output, which knows what a closed pipe means). `default_hub` is the hub URL for
/// `--target ssehub` without `--hub`: where `ssehub serve` listens by default.
pub fn run(
    args: BenchArgs,
    default_hub: &str,
    print: impl FnOnce(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let plan = plan(&args, default_hub)?;
    // Readers and slow subscribers never share a connection (a slow one's window is small).
    let n = args.per_connection();
    let connections = args.subscribers().div_ceil(n) + args.slow().div_ceil(n);
    let sockets = (connections + args.publishers + 64) as u64 + soak::extra_sockets(&args.soak);
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    if sockets > limit {
        bail!(
            "{} connections need more open files than this process may have ({limit}): \
             use fewer --subscribers, or run several bench processes",
            sockets
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some(duration) = args.soak.soak {
        let report = runtime.block_on(soak::execute(&args, plan, duration))?;
        let text = if args.json {
            serde_json::to_string_pretty(&report)? + "\n"
        } else {
            report.table()
        };
        print(&text)?;
        let m = &report.summary;
        return failed_publishes(
            m.publish_failed,
            m.published + m.publish_failed,
            &m.first_publish_error,
        );
    }
    let report = runtime.block_on(execute(&args, plan))?;
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.table()
    };
    print(&text)?;
    failed_publishes(
        report.publish_failed,
        report.published + report.publish_failed,
        &report.first_publish_error,
    )
}

/// A run whose publishes were refused measured nothing worth reading ("lost 0" of nothing
/// delivered): after the report, it is an error that gives the server's reason.
fn failed_publishes(failed: u64, of: u64, first_error: &Option<String>) -> anyhow::Result<()> {
    if failed == 0 {
        return Ok(());
    }
    let why = first_error.as_deref().unwrap_or("no reason recorded");
    bail!("{failed} of {of} publishes failed; the first: {why}")
}

/// `http://host:port/path` → (authority, address, path and query); `https://` alike, with
/// port 443 by default.
fn split_url(url: &str) -> anyhow::Result<(String, SocketAddr, String)> {
    let bad =
        || anyhow::anyhow!("{url:?} is not a usable URL: give one like http://127.0.0.1:8000/path");
    let (rest, port) = match url.strip_prefix("https://") {
        Some(rest) => (rest, 443),
        None => (url.strip_prefix("http://").ok_or_else(bad)?, 80),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:{port}")
    };
    let addr = with_port
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {authority}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(bad)?;
    Ok((authority.to_owned(), addr, path.to_owned()))
}

fn header_lines(headers: &[String]) -> anyhow::Result<String> {
    let mut out = String::new();
    for h in headers {
        if !h.contains(':') || h.contains(['\r', '\n']) {
            bail!("{h:?} is not a header: write it as 'Name: value'");
        }
        out.push_str(h);
        out.push_str("\r\n");
    }
    Ok(out)
}

/// `5s`, `250ms`, `1m`, or `0` for none: the durations `ssehub serve` reads, in the same words.
/// The bench's own copy of a few lines, since it does not depend on the hub.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 5s or 250ms: {e}"))
}

/// Turns the flags into prepared requests.
fn plan(args: &BenchArgs, default_hub: &str) -> anyhow::Result<Plan> {
    if args.topics() == 0 || args.subscribers() + args.slow() == 0 || args.rate <= 0.0 {
        bail!("--topics, --subscribers (or --slow) and --rate must be positive");
    }
    let (hub, sub, publ, body) = match args.target {
        Peer::Ssehub => (
            default_hub,
            "{hub}?topic={topic}",
            "{hub}",
            "topic={topic}&data={data}",
        ),
        Peer::Nchan => (
            "http://127.0.0.1:8090",
            "{hub}/sub/{topic}",
            "{hub}/pub/{topic}",
            "{data}",
        ),
        Peer::Baseline => (
            "http://127.0.0.1:3000",
            "{hub}/events?topic={topic}",
            "{hub}/publish?topic={topic}",
            "{data}",
        ),
        Peer::Custom => ("", "", "", "{data}"),
    };
    let hubs: Vec<&str> = args.hub.as_deref().unwrap_or(hub).split(',').collect();
    let hub = hubs[0];
    let sub = args.sub_url.as_deref().unwrap_or(sub).replace("{hub}", hub);
    let publ = args
        .pub_url
        .as_deref()
        .unwrap_or(publ)
        .replace("{hub}", hub);
    let body = args.pub_body.as_deref().unwrap_or(body);
    if sub.is_empty() || publ.is_empty() {
        bail!("--target custom needs --sub-url and --pub-url");
    }
    let sub_tls = args.tls || sub.starts_with("https://");
    let pub_tls = args.tls || publ.starts_with("https://");
    if args.http2 && !sub_tls {
        bail!(
            "--http2 needs TLS (--tls, or an https:// URL): the bench asks for HTTP/2 by ALPN, \
             as browsers do"
        );
    }
    if args.streams_per_connection > 1 && !args.http2 {
        bail!("--streams-per-connection needs --http2: an HTTP/1.1 connection carries one stream");
    }
    if args.soak.soak.is_some() && (sub_tls || pub_tls || args.http2) {
        bail!("--soak speaks plain HTTP/1.1 only: leave out --tls and --http2 (and https://)");
    }

    let mut pub_headers = args.pub_header.clone();
    if !pub_headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("content-type:"))
    {
        pub_headers.push(
            match args.target {
                Peer::Ssehub => "Content-Type: application/x-www-form-urlencoded",
                _ => "Content-Type: text/plain",
            }
            .to_owned(),
        );
    }
    let token = match (&args.token, &args.jwt_key) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(secret)) => Some(publisher_token(secret)?),
        (None, None) if args.target == Peer::Ssehub => bail!(
            "publishing to ssehub needs a token: give --token (mint one with \
             `ssehub token --jwt-key SECRET --publish '*'`) or --jwt-key SECRET"
        ),
        (None, None) => None,
    };
    if let Some(t) = token {
        pub_headers.push(format!("Authorization: Bearer {t}"));
    }
    let pub_headers = header_lines(&pub_headers)?;
    let sub_headers = header_lines(&args.header)?;

    let topic_names: Vec<String> = (0..args.topics()).map(|i| format!("bench-{i}")).collect();
    let (sub_authority, sub_addr, _) = split_url(&sub.replace("{topic}", "x"))?;
    let sub_request = |topic: &str| -> anyhow::Result<Vec<u8>> {
        let (_, _, path) = split_url(&sub.replace("{topic}", topic))?;
        Ok(format!(
            "GET {path} HTTP/1.1\r\nHost: {sub_authority}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\n{sub_headers}\r\n"
        )
        .into_bytes())
    };
    let sub_requests = topic_names
        .iter()
        .map(|t| sub_request(t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sub_every_topic = match args.target {
        Peer::Ssehub => Some(sub_request("*")?),
        _ => None,
    };
    let template_requests = match (args.template_share, args.target) {
        (0, _) => Vec::new(),
        (_, Peer::Ssehub) if args.template_kind == "urlpattern" => {
            let (_, _, path) = split_url(&sub.replace("{topic}", "x"))?;
            if !path.contains("topic=x") {
                bail!("--template-kind urlpattern needs a subscribe URL with topic={{topic}}");
            }
            topic_names
                .iter()
                .map(|t| {
                    // `{-:sub}?` makes it a pattern (compiled, matched) that still matches
                    // only this topic, as the URI template does.
                    let url = sub
                        .replace("topic={topic}", "match_urlpattern={topic}")
                        .replace("{topic}", &format!("{t}%7B-%3Asub%7D%3F"));
                    let (_, _, path) = split_url(&url)?;
                    Ok(format!(
                        "GET {path} HTTP/1.1\r\nHost: {sub_authority}\r\nAccept: text/event-stream\r\n\
                         Cache-Control: no-cache\r\n{sub_headers}\r\n"
                    )
                    .into_bytes())
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        }
        (_, Peer::Ssehub) => topic_names
            .iter()
            .map(|t| sub_request(&format!("{t}%7B%3Fsub%7D")))
            .collect::<anyhow::Result<Vec<_>>>()?,
        _ => bail!("--template-share needs --target ssehub: the other peers have no URI templates"),
    };
    // A soak publishes until its time is up; the count only bounds the sequence numbers.
    let updates = match args.soak.soak {
        Some(d) => (args.rate * d.as_secs_f64()).ceil() as u64 + 1,
        None => args.updates,
    };
    let (pub_authority, pub_addr, _) = split_url(&publ.replace("{topic}", "x"))?;
    let pub_paths = topic_names
        .iter()
        .map(|t| Ok(split_url(&publ.replace("{topic}", t))?.2))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pub_bodies = topic_names
        .iter()
        .map(|t| body.replace("{topic}", t))
        .collect();
    let nodes = hubs
        .iter()
        .map(|h| Ok(split_url(&sub.replace(hub, h).replace("{topic}", "x"))?.1))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let tls_for = |on: bool, authority: &str| -> anyhow::Result<Option<Arc<tls::Tls>>> {
        Ok(match on {
            true => Some(Arc::new(tls::Tls::new(
                args.ca.as_deref(),
                tls::host_of(authority),
            )?)),
            false => None,
        })
    };
    Ok(Plan {
        sub_addr,
        nodes,
        sub_requests,
        sub_every_topic,
        template_requests,
        template_share: args.template_share,
        pub_addr,
        pub_paths,
        pub_bodies,
        pub_headers,
        topic_names,
        updates,
        rate: args.rate,
        size: args.size,
        source_ips: args.source_ips(),
        sub_tls: tls_for(sub_tls, &sub_authority)?,
        pub_tls: tls_for(pub_tls, &pub_authority)?,
        pub_authority,
        http2: args.http2,
        streams_per_connection: args.per_connection(),
    })
}

/// A token that may publish to every topic for a day, signed with the hub's HS256 secret: the
/// claims `ssehub token --jwt-key SECRET --publish '*' --protocol 0.x --ttl 1d` would give.
fn publisher_token(secret: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + Duration::from_secs(86_400);
    let claims = serde_json::json!({"mercure": {"publish": ["*"]}, "exp": exp.as_secs()});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| anyhow::anyhow!("cannot sign the token: {e}"))
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let target = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) =
        ProgressStyle::with_template(&format!("{what:>12} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"))
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn execute(args: &BenchArgs, plan: Plan) -> anyhow::Result<Report> {
    let server = Server(args.pid.clone());
    server.check()?;
    let plan = Arc::new(plan);
    let topics = plan.topic_names.len();
    let counts = Arc::new(Counts::new(topics));
    let stop = CancellationToken::new();
    let rss_idle = server.rss_kib();
    let cpu_before_connect = server.cpu_secs();

    // Connect everyone, readers first, never more than --connect-concurrency at once.
    let subscribers = args.subscribers();
    let total = subscribers + args.slow();
    let gate = Arc::new(tokio::sync::Semaphore::new(args.connect_concurrency.max(1)));
    let connect_start = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    if plan.http2 {
        // Readers first, then the slow ones, each on connections of their own.
        let n = plan.streams_per_connection;
        for (from, to, slow) in [(0, subscribers, false), (subscribers, total, true)] {
            for first in (from..to).step_by(n) {
                tasks.push(tokio::spawn(h2::connection(
                    first,
                    n.min(to - first),
                    slow,
                    plan.clone(),
                    counts.clone(),
                    gate.clone(),
                    stop.clone(),
                )));
            }
        }
    } else {
        for i in 0..total {
            let subscriber = load::subscriber(
                i,
                i % topics,
                i >= subscribers,
                plan.clone(),
                counts.clone(),
                gate.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move { vec![subscriber.await] }));
        }
    }
    let bar = progress(total as u64, "connecting");
    let connect_deadline = connect_start + Duration::from_secs(60) + args.timeout;
    loop {
        let done = counts.connected.load(Ordering::Relaxed)
            + counts.connect_failed.load(Ordering::Relaxed);
        bar.set_position(done);
        if done >= total as u64 || Instant::now() > connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    let connect_secs = connect_start.elapsed().as_secs_f64();
    tokio::time::sleep(args.settle).await;
    let rss_connected = server.rss_kib();
    let cpu_before_publish = server.cpu_secs();
    let own_cpu_before = Proc::SelfProc.cpu_secs().unwrap_or(0.0);

    // Watch the server's memory for its peak.
    let peak = Arc::new(AtomicU64::new(rss_connected));
    let sampler = {
        let (server, peak, stop) = (server.clone(), peak.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !stop.is_cancelled() {
                tick.tick().await;
                peak.fetch_max(server.rss_kib(), Ordering::Relaxed);
            }
        })
    };

    let start = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut publishers = Vec::new();
    for i in 0..args.publishers.max(1) {
        publishers.push(tokio::spawn(load::publisher(
            i,
            plan.clone(),
            counts.clone(),
            next.clone(),
            start,
            stop.clone(),
            None,
        )));
    }
    let bar = progress(args.updates, "publishing");
    let mut all_published = Box::pin(futures_util::future::join_all(publishers));
    loop {
        tokio::select! {
            _ = &mut all_published => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        bar.set_position(
            counts.published.load(Ordering::Relaxed)
                + counts.publish_failed.load(Ordering::Relaxed),
        );
        bar.set_message(format!(
            "delivered {}",
            counts.delivered.load(Ordering::Relaxed)
        ));
    }
    bar.finish_and_clear();
    let publish_secs = start.elapsed().as_secs_f64();

    // What each topic's updates owe its connected readers: wait for that much, or the timeout.
    let published = counts.published.load(Ordering::Relaxed);
    let deadline = Instant::now() + args.timeout;
    let mut timed_out = false;
    let owed: u64 = counts
        .readers_per_topic
        .iter()
        .zip(&counts.per_topic)
        .map(|(r, p)| r.load(Ordering::Relaxed) * p.load(Ordering::Relaxed))
        .sum();
    while counts.delivered.load(Ordering::Relaxed) < owed {
        if Instant::now() > deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run_secs = start.elapsed().as_secs_f64();
    let cpu_end = server.cpu_secs();
    // A server process that died would drop out of the sums and make the figures look cheap.
    let gone = server.gone();
    if !gone.is_empty() {
        stop.cancel();
        anyhow::bail!(
            "server process {gone:?} exited during the run, so its CPU and memory cannot be \
             counted: no figures for this run"
        );
    }
    let own_cpu = Proc::SelfProc.cpu_secs().unwrap_or(0.0) - own_cpu_before;
    let rss_end = server.rss_kib();
    stop.cancel();
    let _ = sampler.await;

    let mut expected = 0;
    let mut delivered = 0;
    let mut lost = 0;
    let mut slow_dropped = 0;
    for t in tasks {
        for end in t.await.context("a subscriber task failed")? {
            if !end.connected {
                continue;
            }
            if end.slow {
                slow_dropped += u64::from(end.closed_by_server);
            } else {
                let owed = counts.per_topic[end.topic].load(Ordering::Relaxed);
                expected += owed;
                delivered += end.received;
                lost += end.lost(owed);
            }
        }
    }

    let h = counts.latency_us.lock();
    let latency_ms = Latency::from_micros(&h);
    drop(h);
    let connected = counts.connected.load(Ordering::Relaxed);
    let connections = counts.connections.load(Ordering::Relaxed);
    let server_figures = (!args.pid.is_empty()).then(|| {
        let cpu = cpu_end - cpu_before_publish;
        ServerFigures {
            pids: args.pid.clone(),
            rss_idle_kib: rss_idle,
            rss_connected_kib: rss_connected,
            rss_peak_kib: peak.load(Ordering::Relaxed).max(rss_end),
            rss_end_kib: rss_end,
            rss_per_subscriber_kib: rss_connected.saturating_sub(rss_idle) as f64
                / connected.max(1) as f64,
            rss_per_connection_kib: rss_connected.saturating_sub(rss_idle) as f64
                / connections.max(1) as f64,
            cpu_connect_secs: cpu_before_publish - cpu_before_connect,
            cpu_secs: cpu,
            deliveries_per_cpu_sec: if cpu > 0.0 {
                delivered as f64 / cpu
            } else {
                0.0
            },
        }
    });
    let publish_answer_ms = Latency::from_micros(&counts.answer_us.lock());
    let first_error = counts.first_error.lock().clone();
    let first_publish_error = counts.first_publish_error.lock().clone();
    Ok(Report {
        label: args.label.clone(),
        target: format!("{:?}", args.target).to_ascii_lowercase(),
        subscribers: subscribers as u64,
        slow: args.slow() as u64,
        topics: topics as u64,
        size: args.size as u64,
        protocol: match (plan.http2, plan.sub_tls.is_some()) {
            (true, _) => "h2",
            (false, true) => "https/1.1",
            (false, false) => "http/1.1",
        }
        .to_owned(),
        connected,
        connections,
        connect_failed: counts.connect_failed.load(Ordering::Relaxed),
        connect_secs,
        updates: args.updates,
        published,
        publish_failed: counts.publish_failed.load(Ordering::Relaxed),
        rate_requested: args.rate,
        rate_achieved: published as f64 / publish_secs.max(1e-9),
        publish_lag_max_ms: counts.publish_lag_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        publish_answer_ms,
        expected,
        delivered,
        lost,
        duplicates: counts.duplicates.load(Ordering::Relaxed),
        foreign_events: counts.foreign.load(Ordering::Relaxed),
        disconnected: counts.disconnected.load(Ordering::Relaxed),
        reset: counts.reset.load(Ordering::Relaxed),
        slow_dropped,
        timed_out,
        run_secs,
        latency_ms,
        server: server_figures,
        bench_cpu_secs: own_cpu,
        first_error,
        first_publish_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let base = ["bench", "--jwt-key", "a-secret-for-the-test"];
        Cli::parse_from(base.iter().chain(extra)).args
    }

    const HUB: &str = "http://127.0.0.1:8000/.well-known/mercure";

    fn by_template(request: &[u8]) -> bool {
        String::from_utf8_lossy(request).contains("?topic=bench-3%7B%3Fsub%7D ")
    }

    #[test]
    fn template_share_sends_that_share_through_templates_on_every_topic() {
        let p = plan(&args(&["--topics", "4", "--template-share", "30"]), HUB).unwrap();
        let picked: Vec<usize> = (0..4000)
            .filter(|&i| i % 4 == 3 && by_template(p.sub_request(i, 3)))
            .collect();
        // About 30 % of topic 3's 1,000 subscribers, the rest by the topic itself.
        assert!((250..350).contains(&picked.len()), "{}", picked.len());
        assert!(String::from_utf8_lossy(p.sub_request(1, 1)).contains("?topic=bench-1"));
        let none = plan(&args(&["--topics", "4"]), HUB).unwrap();
        assert!((0..4000).all(|i| !by_template(none.sub_request(i, 3))));
    }

    #[test]
    fn template_kind_urlpattern_subscribes_through_url_patterns() {
        let p = plan(
            &args(&[
                "--topics",
                "4",
                "--template-share",
                "100",
                "--template-kind",
                "urlpattern",
            ]),
            HUB,
        )
        .unwrap();
        let req = String::from_utf8_lossy(p.sub_request(3, 3)).into_owned();
        assert!(
            req.contains("?match_urlpattern=bench-3%7B-%3Asub%7D%3F "),
            "{req}"
        );
    }

    #[test]
    fn template_share_is_for_ssehub_only() {
        let Err(e) = plan(&args(&["--target", "nchan", "--template-share", "10"]), HUB) else {
            panic!("nchan has no templates")
        };
        assert!(e.to_string().contains("--target ssehub"), "{e}");
    }
}
