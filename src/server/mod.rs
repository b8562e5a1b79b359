//! The listener: accepts connections within the connection budget (`budget`), serves
//! HTTP/1.1 and HTTP/2 (prior knowledge) on each, enforces the per-connection limits, closes
//! idle connections, and shuts down gracefully.
//!
//! Graceful shutdown needs care with event streams, which never end by themselves: the hub
//! first ends every stream, then the connections are given a few seconds to finish, then the
//! process exits regardless.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

pub mod budget;
pub mod h1;
pub mod tls;

use crate::auth::Key;
use crate::config::ServeConfig;
use crate::http::{router, AppState, Connection};
use crate::hub::{Hub, HubConfig};
use budget::{Budget, CountedBody, Permit, IDLE_TIMEOUT, REQUEST_DEADLINE, RESERVE};
use h1::Http1;

/// The largest request head, in bytes; larger ones get 431.
pub const MAX_HEAD: usize = 64 * 1024;
/// The send buffer asked of the kernel for each connection (Linux doubles it for its own
/// bookkeeping): room for bursts of large updates, small enough that a client that stops
/// reading fills it quickly.
const SEND_BUFFER: usize = 128 * 1024;
/// How long open connections get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
/// How long an idle connection being closed may take to go: HTTP/2's GOAWAY waits for the
/// client to answer a PING, which it may never do.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Failed `accept`s are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Binds the listening socket, with an error that says what to do when the port is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "is another server using this port? Stop it, or choose another address"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "that address is not one of this machine's; listen on one of its own (or 0.0.0.0)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges (CAP_NET_BIND_SERVICE); use a higher port"
            }
            _ => "choose another address",
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}; {hint} with --listen (or SSEHUB_LISTEN)")
    })
}

/// Keys for the run. Without a publisher key, a random secret is made and a token for it
/// returned so that the start-up message can show a working publish command.
pub fn keys(config: &ServeConfig) -> anyhow::Result<(Arc<Key>, Arc<Key>, Option<String>)> {
    let alg = config.jwt_algorithm;
    let load = |flag: &str, k: &str| {
        if crate::auth::is_hmac(alg) && k.len() < 32 {
            tracing::warn!(
                "{flag} is {} bytes: an HMAC secret should be at least 32 random bytes (e.g. \
                 `openssl rand -hex 32`), or tokens can be forged by guessing it",
                k.len()
            );
        }
        Key::load(alg, k).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
    };
    let (publisher, generated) = match &config.publisher_jwt_key {
        Some(k) => (load("--publisher-jwt-key", k)?, None),
        None => {
            let secret: [u8; 32] = rand::random();
            let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
            let key = Key::secret(jsonwebtoken::Algorithm::HS256, secret.as_bytes());
            let token = key
                .mint(Some(&["*".to_owned()]), Some(&["*".to_owned()]), None)
                .map_err(anyhow::Error::msg)?;
            (key, Some(token))
        }
    };
    let subscriber = match &config.subscriber_jwt_key {
        Some(k) => load("--subscriber-jwt-key", k)?,
        None => publisher.clone(),
    };
    Ok((Arc::new(publisher), Arc::new(subscriber), generated))
}

/// Runs the hub on `listener` until `stop` is cancelled, then shuts down gracefully.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(Arc::new(
            tls::Tls::load(cert, key).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let (mut publisher_key, mut subscriber_key, generated_token) = keys(&config)?;
    // `--jwks-url`: one set for both roles (a token's grants say what it may do). Fetched
    // now and hourly by a task that ends with the hub; a failing first fetch is logged and
    // does not stop the start (tokens from the issuer are refused until one succeeds).
    let jwks = match &config.jwks_url {
        Some(url) => {
            let jwks = crate::jwks::Jwks::new(url).map_err(anyhow::Error::msg)?;
            publisher_key = Arc::new(Key::clone(&publisher_key).with_jwks(jwks.clone()));
            subscriber_key = Arc::new(Key::clone(&subscriber_key).with_jwks(jwks.clone()));
            let refresh = jwks.spawn_refresh();
            let stopped = stop.clone();
            tokio::spawn(async move {
                stopped.cancelled().await;
                refresh.abort();
            });
            Some(jwks)
        }
        None => None,
    };
    let hub_config = HubConfig {
        history_size: config.history_size,
        history_bytes: config.history_bytes,
        subscriber_queue: config.subscriber_queue,
        coalesce: config.coalesce,
        write_budget: config.write_budget,
        max_subscribers: config.max_connections,
        subscription_events: config.subscriptions,
        max_stream_lifetime: config.max_stream_lifetime,
        template_memory: config.template_memory,
        anonymous_templates: config.anonymous_templates,
        resource_identifier: config.resource_identifier.clone(),
    };
    let hub = match (&config.data_dir, &config.redis) {
        (Some(dir), None) => {
            let bounds = crate::store::Bounds {
                updates: if hub_config.history_bytes == 0 {
                    0
                } else {
                    hub_config.history_size
                },
                bytes: hub_config.history_bytes,
            };
            let (store, kept) = tokio::task::block_in_place(|| {
                crate::store::open_or_recover(dir, bounds, config.data_dir_recover)
            })?;
            tracing::info!(
                "history kept in {} ({} updates reloaded); a publish is answered once it is on disk",
                dir.join(crate::store::FILE).display(),
                kept.len()
            );
            Hub::durable(hub_config, store, kept)
        }
        (Some(dir), Some(_)) => {
            tracing::info!(
                "cluster mode: the history is kept by the cluster; --data-dir {} is not used",
                dir.display()
            );
            Hub::new(hub_config)
        }
        (None, _) => Hub::new(hub_config),
    };
    let cluster = match &config.redis {
        Some(url) => Some(
            crate::cluster::Cluster::start(url, hub.clone(), config.history_size, stop.clone())
                .await?,
        ),
        None => None,
    };
    let budget = Budget::new(config.max_connections, hub.metrics().clone());
    let state = AppState {
        hub: hub.clone(),
        connections: budget.clone(),
        publisher_key,
        subscriber_key,
        anonymous: config.anonymous,
        max_body: config.max_body,
        shutdown: stop.clone(),
        publish_origins: Arc::new(config.publish_origins.clone()),
        subscriptions: config.subscriptions,
        cluster: cluster.clone(),
        protocol: config.protocol,
        tokens: Arc::new(crate::http::discovery::TokenSettings {
            issuer: config.issuer.clone(),
            resource_identifier: config.resource_identifier.clone(),
            cookie_name: config.cookie_name.clone(),
            authorization_server: config.authorization_server.clone(),
            tls: tls.is_some(),
            metadata: config.publisher_jwt_key.is_some()
                || config.subscriber_jwt_key.is_some()
                || jwks.is_some(),
            jwks,
        }),
    };
    if config.issuer.is_none() && generated_token.is_none() {
        tracing::info!("self-issued setup: any iss signed by the configured keys is trusted");
    }
    let app = router(state, config.cors_origins.as_ref());

    let scheme = if tls.is_some() { "https" } else { "http" };
    let hangup = take_hangup();
    tracing::info!("ssehub listening on {scheme}://{addr}");
    let open_files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    tracing::info!(
        "up to {} connections at once, subscribers included (--max-connections), and {RESERVE} \
         more for publishes and health checks when full (open-file limit {open_files})",
        config.max_connections,
    );
    // The listener, the runtime, logs and cluster connections need a few descriptors too.
    if (config.max_connections as u64).saturating_add(RESERVE as u64 + 16) > open_files {
        tracing::warn!(
            "--max-connections {} and the {RESERVE} reserve connections come within 16 of the \
             open-file limit ({open_files}): the hub will pause accepting when descriptors run \
             out. Lower --max-connections, or raise the limit (ulimit -n, LimitNOFILE=)",
            config.max_connections
        );
    }
    if let Some(token) = generated_token {
        let publish = format!(
            "ssehub publish --hub {scheme}://{addr}/.well-known/mercure --topic time --data hello --token {token}"
        );
        let curl = format!(
            "curl -d topic=time -d data=hello -H 'Authorization: Bearer {token}' {scheme}://{addr}/.well-known/mercure"
        );
        if config.log_json {
            // One JSON line like every other, for log shippers.
            tracing::warn!(
                publish_command = %publish,
                curl_command = %curl,
                "no --publisher-jwt-key given: using a random key for this run"
            );
        } else {
            eprintln!(
                "No --publisher-jwt-key given: using a random key for this run. Publish with:\n  {publish}\n  {curl}"
            );
        }
    }

    let tasks = TaskTracker::new();
    // Always: SIGHUP's default action would end the process, streams cut, for an operator
    // who meant to reload (or a `kill -HUP $(pidof ssehub)` meant for a TLS hub).
    tasks.spawn(reload_on_sighup(tls.clone(), hangup, stop.clone()));
    if let (Some(c), false) = (&cluster, config.coalesce.is_zero()) {
        // Tracked, so that a node leaving says so before the process exits.
        tasks.spawn(crate::cluster::share_machine(c.clone(), stop.clone()));
    }
    tasks.spawn(crate::hub::trim::run(hub.clone(), stop.clone()));
    if let Some(every) = config.clock_interval {
        match &cluster {
            Some(c) => tasks.spawn(crate::cluster::run_clock(c.clone(), every, stop.clone())),
            None => tasks.spawn(crate::clock::run(hub.clone(), every, stop.clone())),
        };
    }
    if !config.coalesce.is_zero() {
        let (hub, stop) = (hub.clone(), stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => hub.retune_coalescing(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    if let Some(every) = config.heartbeat {
        let (hub, stop) = (hub.clone(), stop.clone());
        tasks.spawn(async move {
            let period = every / u32::from(crate::hub::HEARTBEAT_TICKS);
            let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => hub.heartbeat(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(IDLE_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(Duration::from_secs(30));
    // Every connection's task, so that shutdown can wait for them; event streams written by
    // `h1` run on tasks of their own.
    let connections = TaskTracker::new();
    let streams = TaskTracker::new();
    let mut accept_errors = AcceptErrors::default();

    loop {
        // A place first: with none left, nothing more is accepted (the kernel queues new
        // connections) until a connection closes.
        let place = tokio::select! {
            p = budget.place() => p,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    drop(place);
                    tokio::select! {
                        _ = accept_errors.wait_after(e, &budget, hub.metrics()) => continue,
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = stop.cancelled() => break,
        };
        let accepted = Instant::now();
        let permit = place.occupy();
        let _ = stream.set_nodelay(true);
        let kill = CancellationToken::new();
        let conn_ctx = Connection {
            kill: kill.clone(),
            stream_slot: None,
        };
        let router = app.clone();
        let requests = permit.requests();
        let service =
            hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                // Under way until its response has been sent (an event stream's lasts as
                // long as the stream): a connection with none is idle.
                let mut busy = requests.begin();
                req.extensions_mut().insert(conn_ctx.clone());
                let app = router.clone();
                async move {
                    let response = match oversized_head(&req) {
                        Some(refusal) => refusal,
                        None => {
                            let Ok(r) = app.oneshot(req.map(axum::body::Body::new)).await;
                            r
                        }
                    };
                    let stream = response
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
                    if stream && response.status().is_success() {
                        busy.is_stream();
                    }
                    let counted = |body| axum::body::Body::new(CountedBody::new(body, busy));
                    Ok::<_, std::convert::Infallible>(response.map(counted))
                }
            });
        let h1 = Http1 {
            builder: builder.clone().http1_only(),
            app: app.clone(),
            kill: kill.clone(),
            peer,
            streams: streams.clone(),
            max_body: config.max_body,
            stop: stop.clone(),
            metrics: hub.metrics().clone(),
        };
        let Some(tls) = &tls else {
            let builder = builder.clone();
            let stop = stop.clone();
            connections.spawn(async move {
                let mut stream = stream;
                let deadline = accepted + IDLE_TIMEOUT;
                let sniffed = tokio::select! {
                    // Shutdown does not wait for a client that has not sent a request yet.
                    _ = stop.cancelled() => return,
                    _ = permit.evicted(accepted) => {
                        return tracing::debug!(%peer, "closed to make room: no request yet");
                    }
                    p = sniff_protocol(&mut stream, deadline) => p,
                };
                match sniffed {
                    None => tracing::debug!(%peer, "no request within the head deadline"),
                    Some((Protocol::Http2, read)) => {
                        let io = h1::io::Prefixed::new(read.freeze(), stream);
                        let conn = builder
                            .http2_only()
                            .serve_connection(TokioIo::new(io), service)
                            .into_owned();
                        serve_hyper(conn, &permit, accepted, kill, stop, peer).await;
                    }
                    Some((Protocol::Http1, read)) => {
                        // Without a bound, the kernel grows a socket's send buffer to megabytes
                        // for a client that stopped reading, so it would be noticed (and
                        // dropped) only after thousands of updates, holding that memory
                        // meanwhile. HTTP/1.1 connections carry one stream each; HTTP/2 and TLS
                        // ones keep the kernel's own sizing.
                        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
                        h1.serve(stream, read, deadline, service, permit).await
                    }
                }
            });
            continue;
        };
        // The handshake runs on the connection's own task, under the same deadline as a
        // request head, so a client that stalls in it holds nothing else up.
        let acceptor = tls.acceptor();
        let builder = builder.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let handshake =
                tokio::time::timeout_at(accepted + IDLE_TIMEOUT, acceptor.accept(stream));
            let handshake = tokio::select! {
                _ = stop.cancelled() => return,
                _ = permit.evicted(accepted) => {
                    return tracing::debug!(%peer, "closed to make room: TLS handshake unfinished");
                }
                h = handshake => h,
            };
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            // ALPN has chosen the protocol: no need to sniff the first bytes.
            if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                let conn = builder
                    .http2_only()
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                serve_hyper(conn, &permit, Instant::now(), kill, stop, peer).await;
            } else {
                let deadline = Instant::now() + IDLE_TIMEOUT;
                h1.serve(stream, BytesMut::new(), deadline, service, permit)
                    .await;
            }
        });
    }

    tracing::info!("shutting down: ending every stream");
    drop(listener);
    hub.shutdown();
    tasks.close();
    connections.close();
    streams.close();
    let drained = async {
        connections.wait().await;
        streams.wait().await;
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
        tracing::warn!("some connections did not finish in time; closing them");
    }
    tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// hyper bounds its read buffer, but a head that arrives whole in one read can still exceed
/// it; the limit on the head's size is enforced here, before any routing, by the rule
/// `h1`'s paths also apply (they leave a head over it to hyper, to be refused here).
/// An HTTP/1.1 connection is closed after the refusal.
fn oversized_head<B>(req: &http::Request<B>) -> Option<axum::response::Response> {
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()));
    if h1::head::head_size(req.uri(), headers) <= MAX_HEAD {
        return None;
    }
    let status = if h1::head::head_size(req.uri(), std::iter::empty()) > MAX_HEAD / 2 {
        http::StatusCode::URI_TOO_LONG
    } else {
        http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    };
    let mut refusal = crate::http::reject(
        status,
        format!("the request head is larger than {} KiB", MAX_HEAD / 1024),
    );
    // As hyper does with a head too large for its buffer: such a client does not keep its
    // connection (and its place under --max-connections).
    if req.version() < http::Version::HTTP_2 {
        let close = http::HeaderValue::from_static("close");
        refusal
            .headers_mut()
            .insert(http::header::CONNECTION, close);
    }
    Some(refusal)
}

/// The HTTP/2 connection preface, which an h2c client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum Protocol {
    Http1,
    Http2,
}

/// Waits (until `deadline`) for the first bytes of a plain connection and tells HTTP/1.1 from
/// HTTP/2 by them. hyper's own detection waits for them without a deadline, so a client that
/// connects and says nothing would hold its descriptor forever. Returns what was read, to be
/// put back in front of the connection: reading (not peeking) means a client that sends part
/// of the preface and goes quiet wakes its task only when more comes.
async fn sniff_protocol(
    stream: &mut tokio::net::TcpStream,
    deadline: tokio::time::Instant,
) -> Option<(Protocol, BytesMut)> {
    use tokio::io::AsyncReadExt as _;
    // What `h1::head::read_more_head` goes on with for HTTP/1.1.
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        let seen = buf.len().min(H2_PREFACE.len());
        if buf[..seen] != H2_PREFACE[..seen] {
            return Some((Protocol::Http1, buf));
        }
        if seen == H2_PREFACE.len() {
            return Some((Protocol::Http2, buf));
        }
    }
}

/// Serves one connection with hyper until it ends, the hub tears it down (`kill`), or it is
/// closed: for being idle (no request under way) for [`IDLE_TIMEOUT`] since `idle_since` or
/// since its last request ended, to make room for a new connection (see
/// [`Permit::evicted`]), or for shutdown. Closing is hyper's graceful shutdown (HTTP/2: GOAWAY,
/// and the streams open go on to their end); a connection still idle [`CLOSE_GRACE`] after it
/// is dropped.
async fn serve_hyper<C>(
    conn: C,
    permit: &Permit,
    mut idle_since: Instant,
    kill: CancellationToken,
    stop: CancellationToken,
    peer: SocketAddr,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let mut closing = false;
    // Since when a request that is not an event stream has been under way.
    let mut plain_since: Option<Instant> = None;
    loop {
        let idle = permit.is_idle();
        plain_since = match (permit.has_plain_request(), plain_since) {
            (true, None) => Some(Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
        let deadline = plain_since.map(|t| t + REQUEST_DEADLINE);
        let allowed = if closing { CLOSE_GRACE } else { IDLE_TIMEOUT };
        let why = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, "connection ended with an error: {e}");
                }
                return;
            }
            _ = kill.cancelled() => return tracing::debug!(%peer, "connection closed by the hub"),
            _ = permit.changed() => {
                idle_since = Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(idle_since + allowed), if idle => {
                if closing {
                    return tracing::debug!(%peer, "idle connection dropped: it did not close");
                }
                "idle"
            }
            // At once, not gracefully: it has nothing under way, and the place is wanted now
            // (a client that would not answer a GOAWAY would keep it for the grace period).
            _ = permit.evicted(idle_since), if idle && !closing => {
                if !permit.is_idle() {
                    // A request began meanwhile: another idle connection makes room.
                    permit.pass_eviction_on();
                    continue;
                }
                return tracing::debug!(%peer, "idle connection closed: its place was needed");
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(idle_since)), if deadline.is_some() => {
                return tracing::debug!(
                    %peer,
                    "connection closed: a request was not done within {REQUEST_DEADLINE:?}"
                );
            }
            _ = stop.cancelled(), if !closing => "shutting down",
        };
        tracing::debug!(%peer, "closing the connection: {why}");
        conn.as_mut().graceful_shutdown();
        closing = true;
        idle_since = Instant::now();
    }
}

/// Failed `accept`s, counted and logged at most once every [`ACCEPT_LOG_EVERY`].
#[derive(Default)]
struct AcceptErrors {
    logged: Option<Instant>,
    since_logged: u64,
}

impl AcceptErrors {
    /// Counts a failed `accept`, logs it now and then, and waits before the next: when only
    /// that connection failed (reset before it was taken), not at all; otherwise (out of
    /// descriptors, most likely) until a connection closes, an idle one being asked to, or a
    /// second has passed. The loop never spins on a full descriptor table.
    async fn wait_after(
        &mut self,
        e: std::io::Error,
        budget: &Budget,
        metrics: &crate::metrics::Metrics,
    ) {
        use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, WouldBlock};
        metrics.accept_errors.fetch_add(1, Relaxed);
        if matches!(
            e.kind(),
            ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
        ) {
            return tracing::debug!("accept failed: {e}");
        }
        let now = Instant::now();
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                "accept failed: {e} ({} more since the last message); waiting for a connection \
                 to close. Lower --max-connections (with the {RESERVE} reserve connections it \
                 must fit under the open-file limit), or raise the limit",
                self.since_logged
            );
            self.logged = Some(now);
            self.since_logged = 0;
        } else {
            self.since_logged += 1;
        }
        budget.wait_for_a_close().await;
    }
}

/// Re-reads the certificate and key on each SIGHUP; without TLS, says there is nothing to
/// reload.
async fn reload_on_sighup(
    tls: Option<Arc<tls::Tls>>,
    hup: Option<Hangup>,
    stop: CancellationToken,
) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hup else {
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => match tls.as_deref().map(tls::Tls::reload) {
                    Some(Ok(())) => tracing::info!("SIGHUP: certificate reloaded"),
                    Some(Err(e)) => tracing::error!("SIGHUP: keeping the old certificate: {e}"),
                    None => tracing::info!("SIGHUP: nothing to reload (no --tls-cert); still serving"),
                },
                _ = stop.cancelled() => return,
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (tls, hup, stop);
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

/// Takes SIGHUP over from its default action (ending the process); done before the hub says
/// it is listening, so that a reload sent as soon as it is ready finds the handler.
fn take_hangup() -> Option<Hangup> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP: {e}");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
