//! The command line: `serve` (the default), `token`, `bench`, and the client commands.

use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Parser, Subcommand};

use crate::config::{parse_duration, LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "ssehub",
    version,
    about = "A Server-Sent Events hub: Mercure publish/subscribe, Last-Event-ID replay, slow-client safety",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// With no subcommand, ssehub serves with these flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Built once per run: the size of the biggest variant (`serve`'s settings) costs nothing, and
// without the `bench` feature no other variant comes close.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (the default).
    Serve(ServeArgs),
    /// Publish one update and print the id the hub assigned.
    Publish(PublishArgs),
    /// Print updates as they arrive; reconnects by itself with Last-Event-ID.
    Subscribe(SubscribeArgs),
    /// Mint a publisher or subscriber token (a Mercure 1.0 access token, or 0.x with --protocol).
    Token(TokenArgs),
    /// Load-test an SSE server (ssehub or a peer) and report loss, latency and cost.
    #[cfg(feature = "bench")]
    Bench(ssehub_bench::BenchArgs),
}

/// Where `ssehub serve` listens by default, as the client commands and the bench reach it.
pub const DEFAULT_HUB: &str = "http://127.0.0.1:8000/.well-known/mercure";

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    /// The hub URL.
    #[arg(long, env = "SSEHUB_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// Topic (repeatable): the first is canonical, the others alternates.
    #[arg(long, required = true)]
    pub topic: Vec<String>,
    /// The data (`--data ''` for none); `-` reads it from standard input.
    #[arg(long)]
    pub data: String,
    /// The update's id (by default the hub makes one).
    #[arg(long)]
    pub id: Option<String>,
    /// The SSE event type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// The SSE retry field, in milliseconds.
    #[arg(long)]
    pub retry: Option<u64>,
    /// Only subscribers authorized for one of the topics receive it.
    #[arg(long)]
    pub private: bool,
    /// A publisher token.
    #[arg(
        long,
        env = "SSEHUB_TOKEN",
        hide_env_values = true,
        conflicts_with = "jwt_key"
    )]
    pub token: Option<String>,
    /// Mint a short-lived token for these topics with this HS256 secret instead.
    #[arg(long, hide_env_values = true)]
    pub jwt_key: Option<String>,
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("matchers").required(true).multiple(true))]
pub struct SubscribeArgs {
    /// The hub URL.
    #[arg(long, env = "SSEHUB_HUB", default_value = DEFAULT_HUB)]
    pub hub: String,
    /// Mercure 0.x topic selector (repeatable): a topic, a URI template, or `*`.
    #[arg(long, group = "matchers", conflicts_with_all = ["match_", "match_urlpattern"])]
    pub topic: Vec<String>,
    /// Mercure 1.0 exact matcher (repeatable): a topic, or `*`.
    #[arg(
        long = "match",
        id = "match_",
        value_name = "TOPIC",
        group = "matchers"
    )]
    pub match_: Vec<String>,
    /// Mercure 1.0 URL pattern matcher (repeatable), e.g. `https://example.com/books/:id`.
    #[arg(long, value_name = "PATTERN", group = "matchers")]
    pub match_urlpattern: Vec<String>,
    /// Resume after this id (`earliest` for all the hub keeps).
    #[arg(long)]
    pub last_event_id: Option<String>,
    /// A subscriber token (needed for private updates).
    #[arg(long, env = "SSEHUB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// One JSON object per line: {"id","type","data","retry"}.
    #[arg(long)]
    pub json: bool,
    /// Exit after this many updates (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The secret (HS*) or private key PEM file (RS*, ES*, EdDSA) to sign with.
    #[arg(long, env = "SSEHUB_JWT_KEY", hide_env_values = true)]
    pub jwt_key: String,
    /// Algorithm to sign with.
    #[arg(long, default_value = "HS256")]
    pub jwt_algorithm: String,
    /// Topics the token may publish to (repeatable): exact topics or `*` (0.x: selectors).
    #[arg(long)]
    pub publish: Vec<String>,
    /// Topics of private updates the token may receive (repeatable): exact topics or `*`
    /// (0.x: selectors).
    #[arg(long)]
    pub subscribe: Vec<String>,
    /// URL patterns the token may publish to (repeatable; Mercure 1.0).
    #[arg(long)]
    pub publish_urlpattern: Vec<String>,
    /// URL patterns of private updates the token may receive (repeatable; Mercure 1.0).
    #[arg(long)]
    pub subscribe_urlpattern: Vec<String>,
    /// JSON the hub echoes in the subscriber's subscription events.
    #[arg(long)]
    pub payload: Option<String>,
    /// The token's `iss` (Mercure 1.0): what the hub's --issuer names, if it names one.
    #[arg(long, default_value = "ssehub")]
    pub issuer: String,
    /// The token's `aud` (repeatable; Mercure 1.0): the hub's --resource-identifier, or the URL
    /// clients reach it by. By default both local spellings of the default hub URL.
    #[arg(long, default_values = ["http://127.0.0.1:8000/.well-known/mercure", "http://localhost:8000/.well-known/mercure"])]
    pub audience: Vec<String>,
    /// `1.0`: an RFC 9068 access token with `authorization_details`; `0.x`: the `mercure`
    /// claim older hubs read.
    #[arg(long, default_value = "1.0", value_parser = ["1.0", "0.x"])]
    pub protocol: String,
    /// Lifetime, e.g. 1h or 30m; 0 for a token that never expires (0.x only: a 1.0 token must).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

impl Cli {
    /// Parses the process's arguments, or exits with clap's message; flags people bring from
    /// other servers (`--port`, `--host`…) are answered with the one ssehub has.
    pub fn parse_args() -> Cli {
        let command = std::env::args().nth(1).unwrap_or_default();
        Cli::try_parse().unwrap_or_else(|e| with_hint(e, &command).exit())
    }

    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Some(Command::Serve(a)) => a.log_format,
            _ => self.serve.log_format,
        }
    }
}

/// Flags other servers have for what `--listen` does.
const LISTEN_LIKE: &[&str] = &["--port", "--host", "--bind", "--addr", "--address", "-p"];

/// Adds a tip to an unknown-argument error for a flag `--listen` (or, for the client
/// commands, `--hub`) stands for. `command` is the first argument.
fn with_hint(mut e: clap::Error, command: &str) -> clap::Error {
    if e.kind() != ErrorKind::UnknownArgument {
        return e;
    }
    let flag = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(a)) => a.split('=').next().unwrap_or_default().to_owned(),
        _ => return e,
    };
    if !LISTEN_LIKE.contains(&flag.as_str()) {
        return e;
    }
    let tip = match command {
        "publish" | "subscribe" | "bench" => format!(
            "ssehub {command} has no {flag}: name the hub with --hub \
             http://HOST:PORT/.well-known/mercure"
        ),
        _ => format!(
            "ssehub has no {flag}: use --listen 127.0.0.1:PORT (or 0.0.0.0:PORT for every \
             interface; also SSEHUB_LISTEN)"
        ),
    };
    e.insert(
        ContextKind::Suggested,
        ContextValue::StyledStrs(vec![tip.into()]),
    );
    e
}
