//! The listener: accepts connections within the connection budget (`budget`), backs off when
//! `accept` fails, tells HTTP/1.1 from HTTP/2 by a connection's first bytes (or TLS by ALPN,
//! after a handshake under the same deadline as a request head), and hands each connection to
//! the server's own HTTP/1.1 paths (`h1`) or to hyper (`hyper_conn`).

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budget::{Budget, Permit, RESERVE};
use super::h1::io::Prefixed;
use super::h1::Http1;
use super::hyper_conn::{self, spawn_http2};
use super::shutdown::Shutdown;
use super::tls::Tls;
use super::tls_stream;
use crate::http::Connection;
use crate::metrics::Metrics;

/// The send buffer asked of the kernel for each connection (Linux doubles it for its own
/// bookkeeping): room for bursts of large updates, small enough that a client that stops
/// reading fills it quickly.
const SEND_BUFFER: usize = 128 * 1024;
/// Failed `accept`s are logged at most this often.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// What every connection is served with.
pub(crate) struct Listener {
    budget: Budget,
    router: axum::Router,
    tls: Option<Arc<Tls>>,
    /// The largest publish body (`--max-body`).
    max_body: usize,
    metrics: Arc<Metrics>,
    builder: auto::Builder<TokioExecutor>,
    http2: hyper::server::conn::http2::Builder<super::stream_tasks::StreamTasks>,
}

impl Listener {
    /// Serves `router` (and the hub's own HTTP/1.1 paths) within `budget`, over `tls` if given.
    pub(crate) fn new(
        budget: Budget,
        router: axum::Router,
        tls: Option<Arc<Tls>>,
        max_body: usize,
        metrics: Arc<Metrics>,
    ) -> Listener {
        let builder = hyper_conn::builder(budget.timeouts().idle);
        Listener {
            budget,
            router,
            tls,
            max_body,
            metrics,
            builder,
            http2: hyper_conn::http2(),
        }
    }

    /// Accepts connections on `socket` until shutdown starts, each served on a task of its own.
    pub(crate) async fn accept(&self, socket: &TcpListener, shutdown: &Shutdown) {
        let mut accept_errors = AcceptErrors::default();
        loop {
            // A place first: with none left, nothing more is accepted (the kernel queues new
            // connections) until a connection closes.
            let place = tokio::select! {
                p = self.budget.place() => p,
                _ = shutdown.stopped() => return,
            };
            let (stream, peer) = tokio::select! {
                r = socket.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        drop(place);
                        tokio::select! {
                            _ = accept_errors.wait_after(e, &self.budget, &self.metrics) => continue,
                            _ = shutdown.stopped() => return,
                        }
                    }
                },
                _ = shutdown.stopped() => return,
            };
            let accepted = Instant::now();
            let permit = place.occupy();
            let _ = stream.set_nodelay(true);
            self.serve(stream, peer, accepted, permit, shutdown);
        }
    }

    /// Spawns the task that serves one accepted connection.
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        accepted: Instant,
        permit: Permit,
        shutdown: &Shutdown,
    ) {
        let kill = CancellationToken::new();
        let conn_ctx = Connection {
            kill: kill.clone(),
            stream_slot: None,
        };
        let service = hyper_conn::service(self.router.clone(), conn_ctx, permit.requests());
        let h1 = Http1 {
            builder: self.builder.clone().http1_only(),
            app: self.router.clone(),
            kill: kill.clone(),
            peer,
            shutdown: shutdown.clone(),
            max_body: self.max_body,
            metrics: self.metrics.clone(),
        };
        let h2 = self.http2.clone();
        let stop = shutdown.clone();
        let idle_timeout = permit.timeouts().idle;
        let Some(tls) = &self.tls else {
            shutdown.spawn_connection(async move {
                let mut stream = stream;
                let deadline = accepted + idle_timeout;
                let sniffed = tokio::select! {
                    // Shutdown does not wait for a client that has not sent a request yet.
                    _ = stop.stopped() => return,
                    _ = permit.evicted(accepted) => {
                        return tracing::debug!(%peer, "closed to make room: no request yet");
                    }
                    p = sniff_protocol(&mut stream, deadline) => p,
                };
                match sniffed {
                    None => tracing::debug!(%peer, "no request within the head deadline"),
                    Some((Protocol::Http2, read)) => {
                        let io = Prefixed::new(read.freeze(), stream);
                        let conn = Box::pin(h2.serve_connection(TokioIo::new(io), service));
                        spawn_http2(conn, permit, accepted, kill, &stop, peer);
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
            return;
        };
        // The handshake runs on the connection's own task, under the same deadline as a
        // request head, so a client that stalls in it holds nothing else up.
        let config = tls.config();
        shutdown.spawn_connection(async move {
            let handshake = tokio::time::timeout_at(
                accepted + idle_timeout,
                tls_stream::accept(stream, config, idle_timeout),
            );
            let handshake = tokio::select! {
                _ = stop.stopped() => return,
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
            if stream.alpn_protocol() == Some(b"h2") {
                let now = Instant::now();
                let conn = h2.serve_connection(TokioIo::new(stream), service);
                spawn_http2(Box::pin(conn), permit, now, kill, &stop, peer);
            } else {
                let deadline = Instant::now() + idle_timeout;
                h1.serve(stream, BytesMut::new(), deadline, service, permit)
                    .await;
            }
        });
    }
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
    async fn wait_after(&mut self, e: std::io::Error, budget: &Budget, metrics: &Metrics) {
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
