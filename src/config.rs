//! `serve` settings: parsed by clap (flag, then `SSEHUB_*` variable, then default) and checked
//! here, so that a bad value is a clear message at start rather than a surprise later.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::hub::WriteBudget;

/// Which Mercure dialects the hub's subscribe endpoint speaks (`--protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// 0.x (`topic=`) and 1.0 (`match*=`) side by side, told apart per request.
    Both,
    /// Mercure 1.0 only: `topic=` is refused.
    #[value(name = "1.0")]
    V1,
    /// Mercure 0.x only: `match*=` is refused.
    #[value(name = "0.x")]
    V0,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `ssehub serve` (also accepted with no subcommand).
/// A `Parser` too, so that an embedding application can read the same flags from its own
/// arguments (see the crate's documentation).
#[derive(Debug, Clone, Parser)]
pub struct ServeArgs {
    /// Address to listen on (use port 0 for any free port).
    #[arg(long, env = "SSEHUB_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: String,

    /// How often the demo clock publishes on topic "time"; 0 turns it off.
    #[arg(long, env = "SSEHUB_CLOCK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub clock_interval: Duration,

    /// HS256 secret for publishers' tokens (or a PEM file path with --jwt-algorithm RS*/ES*/EdDSA).
    /// Without it, a random secret is made for this run and a ready-made publish command printed.
    #[arg(long, env = "SSEHUB_PUBLISHER_JWT_KEY", hide_env_values = true)]
    pub publisher_jwt_key: Option<String>,

    /// Key for subscribers' tokens; defaults to the publisher key.
    #[arg(long, env = "SSEHUB_SUBSCRIBER_JWT_KEY", hide_env_values = true)]
    pub subscriber_jwt_key: Option<String>,

    /// Token algorithm: HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384 or EdDSA.
    #[arg(long, env = "SSEHUB_JWT_ALGORITHM", default_value = "HS256")]
    pub jwt_algorithm: String,

    /// Let subscribers without a token receive public updates.
    #[arg(long, env = "SSEHUB_ANONYMOUS", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub anonymous: bool,

    /// Updates kept for Last-Event-ID replay (whole hub, all topics); 0 keeps none.
    #[arg(long, env = "SSEHUB_HISTORY_SIZE", default_value_t = 10_000)]
    pub history_size: usize,

    /// Bytes of updates kept for replay, beside --history-size: whichever bound is reached
    /// first evicts the oldest (e.g. 256MiB, 64MiB).
    #[arg(long, env = "SSEHUB_HISTORY_BYTES", default_value = "256MiB", value_parser = parse_size)]
    pub history_bytes: usize,

    /// Longest life of a stream whose token has no `exp` (anonymous ones included): it then
    /// ends cleanly and the client resumes with Last-Event-ID. 0 for no bound.
    #[arg(long, env = "SSEHUB_MAX_STREAM_LIFETIME", default_value = "24h", value_parser = parse_duration)]
    pub max_stream_lifetime: Duration,

    /// Comment line sent on an idle stream this often; 0 turns heartbeats off.
    #[arg(long, env = "SSEHUB_HEARTBEAT", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat: Duration,

    /// Longest wait for updates that follow a write to the same subscriber, so that they go out
    /// together in one write. There is no wait while the hub delivers fewer updates a second
    /// than its write budget (--write-budget); past that, the wait is what keeps the receiving
    /// subscribers within the budget, up to this bound. The first update after a quiet spell is
    /// never delayed, nor are updates once half of --subscriber-queue are pending; 0 writes
    /// every update at once.
    #[arg(long, env = "SSEHUB_COALESCE", default_value = "200ms", value_parser = parse_duration)]
    pub coalesce: Duration,

    /// Socket writes a second the hub allows itself before it batches (see --coalesce; no
    /// effect with --coalesce 0). `auto` follows the cores' load: no limit, so no update waits,
    /// while they have room; while they are more than 85 % busy (the machine's, or the
    /// process's share of the cores it may use), fewer writes step by step, never fewer than
    /// 20000 a second per core. A number (1000 to 10000000) fixes the writes a second per core
    /// whatever the load, the CPU-saving choice: 20000 spends about a third of the CPU of
    /// writing every update in a 1,000-subscriber fan-out and holds updates ~25 ms. A fixed
    /// budget is the machine's: cluster nodes on one machine that may use more cores than it
    /// has find each other through Redis and share it.
    #[arg(long, env = "SSEHUB_WRITE_BUDGET", default_value = "auto", value_parser = parse_write_budget)]
    pub write_budget: WriteBudget,

    /// Updates a subscriber may lag behind before the hub drops its connection.
    #[arg(long, env = "SSEHUB_SUBSCRIBER_QUEUE", default_value_t = 1000)]
    pub subscriber_queue: usize,

    /// Connections open at once, of every protocol, and subscribers at once. Past it, new
    /// subscribers get 503 with Retry-After, while publishes and health checks are still
    /// served on a reserve of 32 more connections; idle connections are closed after 10 s, or
    /// sooner when the hub needs their place. Defaults to a margin under the process's
    /// open-file limit.
    #[arg(long, env = "SSEHUB_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Largest publish body accepted (e.g. 1MiB, 64KiB, 100000); larger ones get 413.
    #[arg(long, env = "SSEHUB_MAX_BODY", default_value = "1MiB", value_parser = parse_size)]
    pub max_body: usize,

    /// Memory the compiled URI templates of subscriptions may take, all together (e.g. 64MiB,
    /// 512KiB; at least 64KiB): a template is compiled once however many subscribers use it
    /// and kept while one does. A subscription whose templates do not fit gets 503 with
    /// Retry-After; a token's own templates are never refused for it.
    #[arg(long, env = "SSEHUB_TEMPLATE_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    pub template_memory: usize,

    /// Let subscribers without a token use URI templates and URL patterns (within
    /// --template-memory); false answers them 403, and only exact topics and * stay open to
    /// them.
    #[arg(long, env = "SSEHUB_ANONYMOUS_TEMPLATES", default_value_t = true, action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub anonymous_templates: bool,

    /// Origins allowed to use the hub from browsers (CORS), comma-separated, e.g.
    /// https://app.example.com; `*` allows any origin but without cookies or credentials.
    #[arg(long, env = "SSEHUB_CORS_ORIGINS")]
    pub cors_origins: Option<String>,

    /// Origins allowed to publish with a cookie token (CSRF protection), comma-separated; `*`
    /// for any. Without it, a publish authenticated by cookie is refused.
    #[arg(long, env = "SSEHUB_PUBLISH_ORIGINS")]
    pub publish_origins: Option<String>,

    /// The issuer Mercure 1.0 tokens must name (`iss`), e.g. https://app.example.com. Without
    /// it, any `iss` signed by the configured keys is trusted (a self-issued setup).
    #[arg(long, env = "SSEHUB_ISSUER")]
    pub issuer: Option<String>,

    /// The identity provider's JSON Web Key Set (http:// or https:// URL): its keys verify
    /// Mercure 1.0 tokens from `--issuer` (required with it). Fetched at start, hourly, and
    /// when a token names an unknown key id (at most once every 5 minutes).
    #[arg(long, env = "SSEHUB_JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,

    /// The hub's canonical URL (absolute, no fragment), e.g.
    /// https://hub.example.com/.well-known/mercure: what Mercure 1.0 tokens must name in `aud`,
    /// and the base relative URL patterns and topics are read against. Without it, the
    /// audience is taken from each request (its scheme, Host header and the hub's path) and
    /// the base is https://mercure.invalid/.well-known/mercure.
    #[arg(long, env = "SSEHUB_RESOURCE_IDENTIFIER")]
    pub resource_identifier: Option<String>,

    /// The cookie browsers carry their Mercure 1.0 token in (the 0.x `mercureAuthorization`
    /// is read when it is absent).
    #[arg(long, env = "SSEHUB_COOKIE_NAME", default_value = crate::auth::DEFAULT_COOKIE_NAME)]
    pub cookie_name: String,

    /// The authorization server that issues the hub's tokens, advertised in the hub's
    /// protected resource metadata (RFC 9728), e.g. https://auth.example.com.
    #[arg(long, env = "SSEHUB_AUTHORIZATION_SERVER")]
    pub authorization_server: Option<String>,

    /// Publish Mercure subscription events and serve the subscription API.
    #[arg(long, env = "SSEHUB_SUBSCRIPTIONS",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub subscriptions: bool,

    /// PEM certificate chain: serve HTTPS, with HTTP/2 and HTTP/1.1 chosen by ALPN.
    /// Re-read with the key on SIGHUP.
    #[arg(long, env = "SSEHUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "SSEHUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Cluster mode: run as one node of a hub shared through this Redis, e.g.
    /// redis://127.0.0.1:6379/0 (a password goes in the URL: redis://:secret@host:6379).
    #[arg(long, env = "SSEHUB_REDIS", hide_env_values = true)]
    pub redis: Option<String>,

    /// Cluster mode on NATS JetStream (instead of --redis): the NATS servers to connect to,
    /// comma-separated, e.g. nats://10.0.0.1:4222,nats://10.0.0.2:4222 (credentials go in the
    /// URL: nats://user:secret@host:4222).
    #[arg(long, env = "SSEHUB_NATS", hide_env_values = true)]
    pub nats: Option<String>,

    /// How many NATS servers keep a copy of the update stream (1 for a single server; 3
    /// survives the loss of any one of three). Used when the stream is created.
    #[arg(long, env = "SSEHUB_NATS_REPLICAS", default_value_t = 3,
          value_parser = clap::value_parser!(u16).range(1..=5))]
    pub nats_replicas: u16,

    /// Where the history is kept across restarts (created at start): a publish is answered
    /// once its update is on disk there. `none` keeps the history in memory only. Unused in
    /// cluster mode (the cluster keeps the history).
    #[arg(long, env = "SSEHUB_DATA_DIR", default_value = "ssehub-data")]
    pub data_dir: String,

    /// If the history store in --data-dir is damaged, move the directory aside (to
    /// DIR.corrupt-<time>) and start with an empty history, rather than refusing to start.
    #[arg(long, env = "SSEHUB_DATA_DIR_RECOVER",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub data_dir_recover: bool,

    /// Mercure dialects served to subscribers: `both` (0.x `topic=` and 1.0 `match=`, told
    /// apart per request), `1.0` (refuses `topic=`) or `0.x` (refuses `match=`).
    #[arg(long, env = "SSEHUB_PROTOCOL", value_enum, default_value = "both")]
    pub protocol: Protocol,

    /// Log format; RUST_LOG filters (default: info).
    #[arg(long, env = "SSEHUB_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// For tests: how long a connection may be idle (no request under way), or take to send
    /// its request head or finish its TLS handshake, before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, hide = true)]
    pub idle_timeout: Duration,

    /// For tests: how long a request that is not an event stream may stay under way (its
    /// body read, its answer sent) before its connection is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration, hide = true)]
    pub request_timeout: Duration,

    /// For tests: how long a publisher may take to send its body before it is answered 408.
    #[arg(long, default_value = "30s", value_parser = parse_duration, hide = true)]
    pub body_timeout: Duration,
}

/// The longest `--idle-timeout`, `--request-timeout` or `--body-timeout` accepted.
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Checked settings, ready for the server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub clock_interval: Option<Duration>,
    pub publisher_jwt_key: Option<String>,
    pub subscriber_jwt_key: Option<String>,
    pub jwt_algorithm: jsonwebtoken::Algorithm,
    pub anonymous: bool,
    pub history_size: usize,
    pub history_bytes: usize,
    /// Longest life of a stream without a token `exp`; `None`: no bound.
    pub max_stream_lifetime: Option<Duration>,
    pub heartbeat: Option<Duration>,
    pub subscriber_queue: usize,
    pub coalesce: Duration,
    /// Writes a second before batching: measured, or fixed per core.
    pub write_budget: WriteBudget,
    pub max_connections: usize,
    pub max_body: usize,
    pub template_memory: usize,
    pub anonymous_templates: bool,
    pub cors_origins: Option<Origins>,
    pub publish_origins: Origins,
    pub subscriptions: bool,
    /// `--issuer`: the `iss` Mercure 1.0 tokens must have; `None`: any.
    pub issuer: Option<String>,
    /// `--jwks-url`: where the issuer's keys are fetched from.
    pub jwks_url: Option<String>,
    /// `--resource-identifier`: the `aud` Mercure 1.0 tokens must have; `None`: derived
    /// from each request.
    pub resource_identifier: Option<url::Url>,
    /// `--cookie-name`.
    pub cookie_name: String,
    /// `--authorization-server`, for the protected resource metadata (as given: clients
    /// compare issuer identifiers as strings).
    pub authorization_server: Option<String>,
    /// Certificate and key files, when serving HTTPS.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Redis URL for cluster mode.
    pub redis: Option<String>,
    /// NATS server URLs for cluster mode on JetStream (never with `redis`).
    pub nats: Option<Vec<String>>,
    /// `--nats-replicas`.
    pub nats_replicas: usize,
    /// Logs are JSON lines: messages for people go through the log too.
    pub log_json: bool,
    /// The durable history's directory; `None`: memory only.
    pub data_dir: Option<std::path::PathBuf>,
    pub data_dir_recover: bool,
    pub protocol: Protocol,
    /// `--idle-timeout` (hidden, for tests).
    pub idle_timeout: Duration,
    /// `--request-timeout` (hidden, for tests).
    pub request_timeout: Duration,
    /// `--body-timeout` (hidden, for tests).
    pub body_timeout: Duration,
}

/// A list of origins, or any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    List(Vec<String>),
}

impl Origins {
    /// Parses `a,b,c` or `*`. Each origin must look like scheme://host[:port].
    pub fn parse(flag: &str, s: &str) -> Result<Origins, String> {
        // Browsers send origins in lower case (scheme and host are case-insensitive).
        let lower = s.to_ascii_lowercase();
        let items: Vec<&str> = lower
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .collect();
        if items.is_empty() {
            return Err(format!(
                "{flag}: no origin given; write scheme://host[:port] (comma-separated), or *"
            ));
        }
        if items.contains(&"*") {
            if items.len() > 1 {
                return Err(format!(
                    "{flag}: * allows every origin; give it alone, or list the origins"
                ));
            }
            return Ok(Origins::Any);
        }
        for o in &items {
            let ok = (o.starts_with("http://") || o.starts_with("https://"))
                && !o
                    .trim_end_matches('/')
                    .split_once("://")
                    .is_some_and(|(_, h)| h.contains('/'))
                && http::HeaderValue::from_str(o).is_ok();
            if !ok {
                return Err(format!(
                    "{flag}: {o:?} is not an origin; write it as scheme://host[:port], e.g. https://app.example.com"
                ));
            }
        }
        Ok(Origins::List(
            items
                .iter()
                .map(|o| o.trim_end_matches('/').to_owned())
                .collect(),
        ))
    }

    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(l) => l.iter().any(|o| o == origin),
        }
    }
}

impl ServeArgs {
    pub fn validate(&self) -> Result<ServeConfig, String> {
        let listen: SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "--listen {:?} is not an address: give IP:PORT, e.g. 127.0.0.1:8000 or 0.0.0.0:8000",
                self.listen
            )
        })?;
        if self.subscriber_queue == 0 {
            return Err("--subscriber-queue must be at least 1".into());
        }
        if self.max_body == 0 {
            return Err("--max-body must be at least 1 byte".into());
        }
        if self.template_memory < 64 * 1024 {
            return Err(format!(
                "--template-memory {} is too small to hold any URI template (at least 64KiB; to \
                 refuse anonymous templates, use --anonymous-templates false)",
                self.template_memory
            ));
        }
        for (flag, d) in [
            ("--idle-timeout", self.idle_timeout),
            ("--request-timeout", self.request_timeout),
            ("--body-timeout", self.body_timeout),
        ] {
            if d.is_zero() {
                return Err(format!(
                    "{flag} must be more than 0 (0 would close every connection at once)"
                ));
            }
            // Each is added to the clock's now for a deadline: far enough out, that overflows.
            if d > MAX_CONNECTION_TIMEOUT {
                return Err(format!(
                    "{flag} must be at most {} (a connection's deadline that far away is none)",
                    humantime::format_duration(MAX_CONNECTION_TIMEOUT)
                ));
            }
        }
        if self.max_connections == Some(0) {
            return Err(
                "--max-connections must be at least 1 (0 would refuse every subscriber)".into(),
            );
        }
        // Given but empty is a mistake (a variable set to nothing, say), not a wish for a
        // random key: a hub no publisher could reach would start.
        for (flag, key) in [
            ("--publisher-jwt-key", &self.publisher_jwt_key),
            ("--subscriber-jwt-key", &self.subscriber_jwt_key),
        ] {
            if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                return Err(format!(
                    "{flag} is empty (is its SSEHUB_ variable set to nothing?): give the secret \
                     or key file, or leave the flag out"
                ));
            }
        }
        let jwt_algorithm = crate::auth::parse_algorithm(&self.jwt_algorithm)
            .map_err(|e| format!("--jwt-algorithm: {e}"))?;
        let redis = self
            .redis
            .as_deref()
            .filter(|u| !u.is_empty())
            .map(check_redis_url)
            .transpose()?;
        let nats = self
            .nats
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(check_nats_urls)
            .transpose()?;
        if redis.is_some() && nats.is_some() {
            return Err(
                "--redis and --nats are both given: a cluster runs on one engine, Redis or NATS \
                 JetStream; keep one of them (and its SSEHUB_ variable)"
                    .into(),
            );
        }
        // A node with a random key of its own would print a token only it accepts, and refuse
        // every token the other nodes accept.
        if (redis.is_some() || nats.is_some()) && self.publisher_jwt_key.is_none() {
            let flag = if redis.is_some() { "--redis" } else { "--nats" };
            return Err(format!(
                "{flag}: every node of a cluster needs the same keys: give each node \
                 the same --publisher-jwt-key (SSEHUB_PUBLISHER_JWT_KEY), and the same \
                 --subscriber-jwt-key if you use one; without it this node would make a \
                 random key of its own"
            ));
        }
        let absolute_url = |flag: &str, s: &str| -> Result<url::Url, String> {
            url::Url::parse(s)
                .ok()
                .filter(|u| u.has_host() && u.fragment().is_none())
                .ok_or_else(|| {
                    format!(
                        "{flag} {s:?} is not an absolute URL without fragment, e.g. \
                         https://hub.example.com/.well-known/mercure"
                    )
                })
        };
        let resource_identifier = self
            .resource_identifier
            .as_deref()
            .map(check_resource_identifier)
            .transpose()?;
        let authorization_server = self
            .authorization_server
            .as_deref()
            .map(|s| absolute_url("--authorization-server", s).map(|_| s.to_owned()))
            .transpose()?;
        if self.issuer.as_deref().is_some_and(str::is_empty) {
            return Err(
                "--issuer is empty (is SSEHUB_ISSUER set to nothing?): give the issuer's \
                 identifier, or leave the flag out to trust any issuer signing with the keys"
                    .into(),
            );
        }
        let jwks_url = match self.jwks_url.as_deref() {
            None => None,
            Some(u) => {
                let web = url::Url::parse(u)
                    .is_ok_and(|p| matches!(p.scheme(), "http" | "https") && p.has_host());
                if !web {
                    return Err(format!(
                        "--jwks-url {u:?} is not an http:// or https:// URL, e.g. \
                         https://idp.example.com/.well-known/jwks.json"
                    ));
                }
                // Keys from a provider are trusted for one issuer only: without it, any
                // tenant of a shared provider could sign tokens for this hub.
                if self.issuer.is_none() {
                    return Err(
                        "--jwks-url needs --issuer: the key set's tokens are trusted \
                                only when their \"iss\" names that issuer"
                            .into(),
                    );
                }
                if self.protocol == Protocol::V0 {
                    return Err(
                        "--jwks-url verifies Mercure 1.0 tokens, which --protocol 0.x \
                                refuses: use --protocol both or 1.0"
                            .into(),
                    );
                }
                Some(u.to_owned())
            }
        };
        // A cookie name is an RFC 6265 token: no separators, spaces or controls.
        let cookie_ok = !self.cookie_name.is_empty()
            && self
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b));
        if !cookie_ok {
            return Err(format!(
                "--cookie-name {:?} is not a cookie name (letters, digits and !#$%&'*+-.^_`|~)",
                self.cookie_name
            ));
        }
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        Ok(ServeConfig {
            issuer: self.issuer.clone(),
            jwks_url,
            resource_identifier,
            cookie_name: self.cookie_name.clone(),
            authorization_server,
            listen,
            clock_interval: nonzero(self.clock_interval),
            publisher_jwt_key: self.publisher_jwt_key.clone(),
            subscriber_jwt_key: self.subscriber_jwt_key.clone(),
            jwt_algorithm,
            anonymous: self.anonymous,
            history_size: self.history_size,
            history_bytes: self.history_bytes,
            max_stream_lifetime: (!self.max_stream_lifetime.is_zero())
                .then_some(self.max_stream_lifetime),
            heartbeat: nonzero(self.heartbeat),
            subscriber_queue: self.subscriber_queue,
            coalesce: self.coalesce,
            write_budget: self.write_budget,
            max_connections: self.max_connections.unwrap_or_else(default_max_connections),
            max_body: self.max_body,
            template_memory: self.template_memory,
            anonymous_templates: self.anonymous_templates,
            cors_origins: self
                .cors_origins
                .as_deref()
                .map(|s| Origins::parse("--cors-origins", s))
                .transpose()?,
            subscriptions: self.subscriptions,
            tls: self.tls_cert.clone().zip(self.tls_key.clone()),
            redis,
            nats,
            nats_replicas: self.nats_replicas.into(),
            log_json: self.log_format == LogFormat::Json,
            data_dir: match self.data_dir.trim() {
                "" => {
                    return Err(
                        "--data-dir is empty (is SSEHUB_DATA_DIR set to nothing?): give a \
                         directory, or none to keep the history in memory only"
                            .into(),
                    )
                }
                "none" => None,
                d => Some(d.into()),
            },
            data_dir_recover: self.data_dir_recover,
            protocol: self.protocol,
            idle_timeout: self.idle_timeout,
            request_timeout: self.request_timeout,
            body_timeout: self.body_timeout,
            publish_origins: match self.publish_origins.as_deref() {
                Some(s) => Origins::parse("--publish-origins", s)?,
                None => Origins::List(Vec::new()),
            },
        })
    }
}

/// `--resource-identifier`: an absolute URL without a fragment (patterns are compiled against
/// it, and a fragment would be dropped from every relative one).
fn check_resource_identifier(s: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(s.trim()).map_err(|e| {
        format!(
            "--resource-identifier {s:?} is not an absolute URL ({e}): write the hub's URL, \
             e.g. https://hub.example.com/.well-known/mercure"
        )
    })?;
    if url.fragment().is_some() {
        return Err(format!(
            "--resource-identifier {s:?} has a fragment (#…): give the hub's URL without one"
        ));
    }
    if url.cannot_be_a_base() {
        return Err(format!(
            "--resource-identifier {s:?} cannot be a base for relative URLs: give the hub's \
             http(s) URL, e.g. https://hub.example.com/.well-known/mercure"
        ));
    }
    Ok(url)
}

/// `url` fit for messages and logs: a user and password in it become `***`.
pub fn redact_url(url: &str) -> String {
    match url.rsplit_once('@') {
        None => url.to_owned(),
        Some((before, host)) => match before.split_once("://") {
            Some((scheme, _)) if !scheme.contains(['/', '@', ':']) => {
                format!("{scheme}://***@{host}")
            }
            _ => format!("***@{host}"),
        },
    }
}

/// Accepts a comma-separated list of `nats://HOST[:PORT]` (or `tls://`, or a bare `HOST:PORT`),
/// with optional credentials. Errors show the URL without its password.
fn check_nats_urls(list: &str) -> Result<Vec<String>, String> {
    let mut urls = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let shown = redact_url(url);
        if let Err(e) = url.parse::<async_nats::ServerAddr>() {
            return Err(format!(
                "--nats {shown:?} is not a NATS server address ({e}): write \
                 nats://HOST:PORT[,nats://HOST:PORT…], e.g. nats://127.0.0.1:4222"
            ));
        }
        urls.push(url.to_owned());
    }
    if urls.is_empty() {
        return Err("--nats names no server: write nats://HOST:PORT[,nats://HOST:PORT…]".into());
    }
    Ok(urls)
}

/// Accepts `redis://HOST[:PORT][/DB]`, with an optional user and password. Errors show the
/// URL without its password.
fn check_redis_url(url: &str) -> Result<String, String> {
    let shown = redact_url(url);
    if url.starts_with("rediss://") {
        return Err(format!(
            "--redis {shown:?}: TLS to Redis (rediss://) is not supported yet; use redis:// on a \
             private network, or a TLS tunnel (stunnel, spiped) to the Redis host"
        ));
    }
    if !url.starts_with("redis://") {
        return Err(format!(
            "--redis {shown:?} is not a Redis URL: write redis://HOST:PORT[/DB], e.g. redis://127.0.0.1:6379"
        ));
    }
    redis::Client::open(url)
        .map(|_| url.to_owned())
        .map_err(|e| format!("--redis: {e}; write redis://HOST:PORT[/DB]"))
}

/// Connections the hub takes beyond `--max-connections`. While it holds more than
/// `--max-connections`, new event streams are refused (503), and publishes, health checks and
/// metrics are served on these; when these are taken too, the hub accepts nothing more until
/// a connection closes, and closes idle ones to make room.
pub const RESERVE_CONNECTIONS: usize = 32;

/// A margin under the open-file limit: every connection holds one descriptor, the reserve
/// beyond `--max-connections` ([`RESERVE_CONNECTIONS`], 32) one each, and the hub keeps 5 % and 32
/// more for its listener, runtime, logs and cluster connections (1,024 gives 909).
pub fn default_max_connections() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024);
    let soft = usize::try_from(soft).unwrap_or(usize::MAX).min(10_000_000);
    soft.saturating_sub(soft / 20 + 32 + RESERVE_CONNECTIONS)
        .max(1)
}

/// `auto`, or writes a second per core.
pub fn parse_write_budget(s: &str) -> Result<WriteBudget, String> {
    s.parse()
}

/// `5s`, `250ms`, `1m`, or `0` for off.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 5s or 250ms: {e}"))
}

/// `1MiB`, `64KiB`, `512kB`, `100000`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1MiB, 64KiB or 100000"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, kB, MB, GB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_whatever_case_they_were_written_in() {
        let o = Origins::parse(
            "--cors-origins",
            "HTTPS://App.Example.com/, http://b.example",
        )
        .unwrap();
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("http://b.example"));
        assert!(!o.allows("https://other.example"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("100000"), Ok(100_000));
        assert_eq!(parse_size("64 KiB"), Ok(65536));
        assert!(parse_size("lots").is_err());
        for s in ["64MiB", "512KiB", "2GiB", "100000", "0"] {
            assert_eq!(crate::hub::format_size(parse_size(s).unwrap()), s);
        }
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn resource_identifiers() {
        assert!(check_resource_identifier("https://hub.example.com/.well-known/mercure").is_ok());
        assert!(check_resource_identifier("/.well-known/mercure")
            .unwrap_err()
            .contains("absolute"));
        assert!(check_resource_identifier("https://hub.example.com/#x")
            .unwrap_err()
            .contains("fragment"));
        assert!(check_resource_identifier("urn:x:y").is_err());
    }

    #[test]
    fn redis_urls() {
        assert!(check_redis_url("redis://127.0.0.1:6379/0").is_ok());
        assert!(check_redis_url("redis://:pw@localhost").is_ok());
        assert!(check_redis_url("rediss://localhost")
            .unwrap_err()
            .contains("not supported yet"));
        assert!(check_redis_url("http://localhost").is_err());
        for bad in [
            "rediss://:RedisPassw0rd@10.0.0.1:6379",
            "redis//:RedisPassw0rd@10.0.0.1",
        ] {
            let e = check_redis_url(bad).unwrap_err();
            assert!(
                !e.contains("RedisPassw0rd") && e.contains("10.0.0.1"),
                "{e}"
            );
        }
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn connection_timeouts_keep_their_defaults_and_refuse_zero() {
        let parse = |extra: &[&str]| {
            let argv = ["ssehub", "--data-dir", "none"].iter().chain(extra);
            ServeArgs::try_parse_from(argv).unwrap().validate()
        };
        let c = parse(&[]).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.body_timeout, Duration::from_secs(30));
        let c = parse(&["--idle-timeout", "1500ms"]).unwrap();
        assert_eq!(c.idle_timeout, Duration::from_millis(1500));
        for flag in ["--idle-timeout", "--request-timeout", "--body-timeout"] {
            let e = parse(&[flag, "0"]).unwrap_err();
            assert!(e.starts_with(flag), "{e}");
            // Added to the time a connection was accepted, a deadline this far away would
            // overflow the clock and panic the connection's task.
            let e = parse(&[flag, "400000000000years"]).unwrap_err();
            assert!(e.starts_with(flag), "{e}");
            assert!(parse(&[flag, "1day"]).is_ok(), "a day is long but allowed");
        }
    }
}
