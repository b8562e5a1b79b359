//! The command line: `serve` (the default), `token`, `bench`, and the client commands.

use std::time::Duration;

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the hub (the default).
    Serve(ServeArgs),
    /// Mint a token with the `mercure` claim.
    Token(TokenArgs),
    /// Load-test an SSE server (ssehub or a peer) and report loss, latency and cost.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The secret (HS*) or private key PEM file (RS*, ES*, EdDSA) to sign with.
    #[arg(long, env = "SSEHUB_JWT_KEY", hide_env_values = true)]
    pub jwt_key: String,
    /// Algorithm to sign with.
    #[arg(long, default_value = "HS256")]
    pub jwt_algorithm: String,
    /// Topic selectors the token may publish to (repeatable).
    #[arg(long)]
    pub publish: Vec<String>,
    /// Topic selectors of private updates the token may receive (repeatable).
    #[arg(long)]
    pub subscribe: Vec<String>,
    /// Lifetime, e.g. 1h or 30m; 0 for a token that never expires.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
}

impl Cli {
    pub fn log_format(&self) -> LogFormat {
        match &self.command {
            Some(Command::Serve(a)) => a.log_format,
            _ => self.serve.log_format,
        }
    }
}
