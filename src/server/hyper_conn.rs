//! Connections served by hyper: every HTTP/2 connection, and the HTTP/1.1 requests the server's
//! own paths (`h1`) leave to it. hyper's settings, the service that routes its requests and
//! counts them as under way, and the limits hyper does not enforce itself (idle connections,
//! a request's deadline, closing to make room, the head size) live here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::budget::{CountedBody, Permit, Requests};
use super::h1::head::head_size;
use super::shutdown::Shutdown;
use super::stream_tasks::StreamTasks;
use super::MAX_HEAD;
use crate::http::Connection;

/// How long an idle connection being closed may take to go: HTTP/2's GOAWAY waits for the
/// client to answer a PING, which it may never do.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// hyper's settings for HTTP/1.1: its timers (a head must be whole within `idle_timeout`, as
/// on the server's own paths), and the head limit. HTTP/2 has its own builder ([`http2`]).
pub(super) fn builder(idle_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .max_buf_size(MAX_HEAD);
    builder
}

/// The most of a stream's updates hyper takes from the hub before the client's flow-control
/// window lets them go: beyond it, the stream waits and the hub's own queue
/// (`--subscriber-queue`) decides when its subscriber is too slow. hyper's default, 400 KB,
/// let one stalled stream hold that much on top of the queue.
const MAX_SEND_BUF: usize = 64 * 1024;

/// How much of a request body one HTTP/2 stream may send before the hub has read it
/// (`SETTINGS_INITIAL_WINDOW_SIZE`), and how much all of a connection's streams may together
/// (the connection's window). h2 keeps what arrives until the request's handler reads it and
/// hands the window back as it does (a body nobody will read, a subscription's, is dropped and
/// what comes for it thrown away), so these bound what a client can make one connection hold of
/// bodies not read yet (while a handler waits before reading, or the hub is too busy to run
/// it), up to `--request-timeout`. hyper's defaults are 1 MiB for both
/// (with `adaptive_window` off, as here), made for clients that upload large bodies fast. Here
/// only publishes carry a body, almost all of a few KiB, the largest `--max-body` (1 MiB by
/// default): 64 KiB lets most publishes come in one round trip, a larger one at a window per
/// round trip (640 KB/s a stream from a publisher 100 ms away), and the connection's window is
/// four streams' worth: 256 KiB a connection at most, a quarter of hyper's default.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 4 * STREAM_WINDOW;

/// hyper's settings for HTTP/2, chosen for connections that mostly carry event streams: few
/// requests, each lasting hours, and data flowing from the server. hyper's own builder, as
/// the auto builder does not offer the header table's size.
pub(super) fn http2() -> hyper::server::conn::http2::Builder<StreamTasks> {
    // Each stream's task can be cancelled by the hub: see `stream_tasks`.
    let mut builder = hyper::server::conn::http2::Builder::new(StreamTasks);
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(Duration::from_secs(30))
        // HPACK's table would keep a client's request headers (a browser's cookies among
        // them) for as long as the connection lasts, to shorten the few requests that follow
        // on a connection whose streams last hours: not worth the memory of each connection.
        .header_table_size(0)
        .max_send_buf_size(MAX_SEND_BUF)
        // Either call turns `adaptive_window` off, which would grow the windows with the
        // bandwidth-delay product it measures with PINGs, up to 16 MiB.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    builder
}

/// The service hyper calls for each request of one connection: the router, behind the head
/// size limit, with the connection's context (`conn`) in the request and the request counted
/// under way (`requests`) until its response's body is done.
pub(super) fn service(
    router: axum::Router,
    conn: Connection,
    requests: Requests,
) -> impl hyper::service::Service<
    http::Request<Incoming>,
    Response = axum::response::Response,
    Error = Infallible,
    Future = Answer,
> + Send
       + 'static {
    hyper::service::service_fn(move |mut req: http::Request<Incoming>| -> Answer {
        // Under way until its response has been sent (an event stream's lasts as
        // long as the stream): a connection with none is idle.
        let mut busy = requests.begin();
        req.extensions_mut().insert(conn.clone());
        let app = router.clone();
        let http2 = req.version() == http::Version::HTTP_2;
        Box::pin(async move {
            let mut response = match oversized_head(&req) {
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
            if http2 && stream {
                keep_out_of_hpack_table(response.headers_mut());
            }
            let counted = |body| axum::body::Body::new(CountedBody::new(body, busy));
            Ok::<_, Infallible>(response.map(counted))
        })
    })
}

/// Marks an event stream's response headers to be sent without being remembered. h2 keeps
/// each header it sends in the connection's HPACK table (up to the 4 KiB the client allows,
/// for as long as the connection lasts) to send it shorter next time: worth it for requests
/// that follow each other (publishes on one connection keep it), not for the response of a
/// stream that lasts hours, whose `date` differs every second anyway (measured: ≈ 0.4 KiB per
/// idle connection with one stream). The date is set here (as hyper would: RFC 9110 §6.6.1),
/// since hyper adds its own only where there is none, and would have it remembered.
/// `:status` is a pseudo-header h2 cannot mark: a 200 is in HPACK's static table anyway.
fn keep_out_of_hpack_table(headers: &mut http::HeaderMap) {
    if !headers.contains_key(http::header::DATE) {
        let now = httpdate::fmt_http_date(std::time::SystemTime::now());
        if let Ok(date) = http::HeaderValue::try_from(now) {
            headers.insert(http::header::DATE, date);
        }
    }
    for value in headers.values_mut() {
        value.set_sensitive(true);
    }
}

/// What the service returns for a request: boxed, because hyper runs each HTTP/2 stream as a
/// task sized for the largest of this future and the response's body, for as long as the
/// stream lasts. Unboxed, the request itself (its head, ~300 bytes) and the routing would stay
/// in every event stream's task after the answer; boxed, they are freed once it is given.
pub(super) type Answer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<axum::response::Response, Infallible>> + Send>,
>;

/// Serves an HTTP/2 connection on a task of its own, holding only the connection. The task
/// that accepted it (and ran the TLS handshake, or would have served HTTP/1.1) is sized for
/// the largest of everything it could have done, and would stay that large for as long as
/// the connection is open. The connection comes boxed, so nothing holds a second copy of it
/// (see [`serve_hyper`]).
pub(super) fn spawn_http2<C>(
    mut conn: std::pin::Pin<Box<C>>,
    permit: Permit,
    idle_since: Instant,
    kill: CancellationToken,
    shutdown: &Shutdown,
    peer: SocketAddr,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let stop = shutdown.clone();
    shutdown.spawn_connection(async move {
        serve_hyper(conn.as_mut(), &permit, idle_since, kill, &stop, peer).await;
    });
}

/// Serves one connection with hyper until it ends, the hub tears it down (`kill`), or it is
/// closed: for being idle (no request under way) for [`Timeouts::idle`](super::budget::Timeouts) since `idle_since` or
/// since its last request ended, to make room for a new connection (see
/// [`Permit::evicted`]), or for shutdown. Closing is hyper's graceful shutdown (HTTP/2: GOAWAY,
/// and the streams open go on to their end); a connection still idle [`CLOSE_GRACE`] after it
/// is dropped.
///
/// The connection comes pinned where its caller made it: an async fn keeps its arguments for
/// as long as it runs, so a connection passed by value and pinned here would be held twice (an
/// HTTP/2 connection over TLS is several KiB, held for as long as it is open).
pub(super) async fn serve_hyper<C>(
    mut conn: std::pin::Pin<&mut C>,
    permit: &Permit,
    mut idle_since: Instant,
    kill: CancellationToken,
    shutdown: &Shutdown,
    peer: SocketAddr,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut closing = false;
    // Since when a request that is not an event stream has been under way.
    let mut plain_since: Option<Instant> = None;
    let timeouts = permit.timeouts();
    loop {
        let idle = permit.is_idle();
        plain_since = match (permit.has_plain_request(), plain_since) {
            (true, None) => Some(Instant::now()),
            (true, since) => since,
            (false, _) => None,
        };
        let deadline = plain_since.map(|t| t + timeouts.request);
        let allowed = if closing { CLOSE_GRACE } else { timeouts.idle };
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
                    "connection closed: a request was not done within {:?}",
                    timeouts.request
                );
            }
            _ = shutdown.stopped(), if !closing => "shutting down",
        };
        tracing::debug!(%peer, "closing the connection: {why}");
        conn.as_mut().graceful_shutdown();
        closing = true;
        idle_since = Instant::now();
    }
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
    if head_size(req.uri(), headers) <= MAX_HEAD {
        return None;
    }
    let status = if head_size(req.uri(), std::iter::empty()) > MAX_HEAD / 2 {
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
