//! The HTTP face of the hub: thin handlers that turn requests into hub calls and hub results
//! into responses. Every refusal is a status and a one-line reason.

mod demo;
pub(crate) mod discovery;
pub mod form;
mod mercure;
pub use mercure::Dialect;
mod ops;
mod subscriptions;
mod ui;

use std::sync::Arc;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::auth::Key;
use crate::cluster::Cluster;
use crate::config::Origins;
use crate::hub::{Hub, SubscriberStream, Teardown};

/// The transport's connection budget as the routes see it (`server::budget` counts the
/// connections): whether it is spent, in which case a new event stream is refused.
pub trait ConnectionBudget: Send + Sync {
    fn full(&self) -> bool;
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    /// The hub's connections: over `--max-connections`, new event streams are refused.
    pub connections: Arc<dyn ConnectionBudget>,
    pub publisher_key: Arc<Key>,
    pub subscriber_key: Arc<Key>,
    /// Subscribers without a token may receive public updates.
    pub anonymous: bool,
    /// Largest publish body accepted, in bytes.
    pub max_body: usize,
    /// How long a publisher (or a subscription query in a body) may take to send its body:
    /// 30 s unless a test says otherwise (`--body-timeout`).
    pub body_timeout: std::time::Duration,
    /// Cancelled when the hub starts shutting down.
    pub shutdown: CancellationToken,
    /// Serve the subscription API.
    pub subscriptions: bool,
    /// Origins that may publish with a cookie token.
    pub publish_origins: Arc<Origins>,
    /// In cluster mode, where publishes go (instead of straight into `hub`).
    pub cluster: Option<Cluster>,
    /// The Mercure dialects subscribers may speak (`--protocol`).
    pub protocol: crate::config::Protocol,
    /// Issuer, resource identifier, cookie name: what tokens are checked against.
    pub tokens: Arc<discovery::TokenSettings>,
}

/// Per-connection context the server puts into every request.
#[derive(Clone)]
pub struct Connection {
    /// Cancelling it closes the connection at once (used to drop a subscriber that stopped
    /// reading, whose stream can no longer end by itself).
    pub kill: CancellationToken,
    /// Set on connections whose event stream is written by the server's own HTTP/1.1 writer
    /// (see `crate::server::h1`): a subscribe handler leaves its stream here instead of in the
    /// response body.
    pub stream_slot: Option<StreamSlot>,
}

/// Where a subscribe handler leaves its stream (and the path, for the log) for the connection.
pub type StreamSlot = Arc<parking_lot::Mutex<Option<(SubscriberStream, &'static str)>>>;

pub const MERCURE_PATH: &str = crate::hub::update::RESERVED_PATH;

pub fn router(state: AppState, cors: Option<&Origins>) -> Router {
    let router = Router::new()
        .route("/", get(demo::page))
        .route("/events", get(demo::events).head(demo::events_head))
        .route("/events/", get(demo::events).head(demo::events_head))
        .route(
            MERCURE_PATH,
            get(mercure::subscribe)
                .head(mercure::subscribe_head)
                .post(mercure::publish)
                // Axum's method filters know no `QUERY` (Mercure 1.0's subscribe with a body):
                // every other method comes here, which serves it and refuses the rest.
                .fallback(mercure::subscribe_query),
        )
        .route(
            "/.well-known/mercure/subscriptions",
            get(subscriptions::all),
        )
        .route(
            "/.well-known/mercure/subscriptions/{topic}",
            get(subscriptions::for_topic),
        )
        .route(
            "/.well-known/mercure/subscriptions/{topic}/{subscriber}",
            get(subscriptions::one),
        )
        .route(
            "/.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}",
            get(subscriptions::single),
        )
        .route(discovery::METADATA_PATH, get(discovery::metadata))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/ui", get(ui::redirect))
        .route("/ui/", get(ui::page))
        .route("/ui/stats", get(ui::stats))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            discovery::challenge,
        ))
        .with_state(state);
    // Outside the routes: a layer on them runs before the router adds `Allow` to its 405s.
    let router = Router::new()
        .fallback_service(router)
        .layer(axum::middleware::map_response(explain_405));
    match cors {
        Some(origins) => router.layer(cors_layer(origins)),
        None => router,
    }
}

/// CORS for browsers on other origins. Credentials (cookies, `withCredentials`) only with an
/// explicit list: a browser refuses them with `*` anyway.
fn cors_layer(origins: &Origins) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let layer = CorsLayer::new()
        .allow_methods([
            http::Method::GET,
            http::Method::HEAD,
            http::Method::POST,
            http::Method::from_bytes(b"QUERY").expect("a valid method"),
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CACHE_CONTROL,
            header::CONTENT_TYPE,
            http::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([
            http::HeaderName::from_static("last-event-id"),
            http::HeaderName::from_static("mercure-last-event-id"),
            http::header::LINK,
        ])
        .max_age(std::time::Duration::from_secs(3600));
    match origins {
        Origins::Any => layer.allow_origin(AllowOrigin::any()),
        Origins::List(list) => layer
            .allow_origin(AllowOrigin::list(
                list.iter().filter_map(|o| HeaderValue::from_str(o).ok()),
            ))
            .allow_credentials(true),
    }
}

/// The router answers a wrong method with an empty 405; say why, keeping its `Allow`.
async fn explain_405(mut r: Response) -> Response {
    if r.status() == StatusCode::METHOD_NOT_ALLOWED && http_body::Body::is_end_stream(r.body()) {
        let allow = r
            .headers()
            .get(header::ALLOW)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        *r.body_mut() = Body::from(format!("method not allowed here; use {allow}\n"));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r.headers_mut().remove(header::CONTENT_LENGTH);
    }
    r
}

async fn not_found() -> Response {
    reject(StatusCode::NOT_FOUND, "not found")
}

/// Room for a new event stream: none while more connections than `--max-connections` have a
/// request under way (this request came on one of the reserve's), and the refusal is the one a
/// subscriber over the subscriber limit gets (503 with `Retry-After`).
fn room_for_stream(app: &AppState) -> Result<(), Response> {
    if !app.connections.full() {
        return Ok(());
    }
    app.hub
        .metrics()
        .connections_refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Err(mercure::subscribe_error(crate::hub::SubscribeError::Full))
}

/// How the hub tears down a subscriber's stream that can no longer end by itself (its client
/// stopped reading; see [`Teardown`]): over HTTP/1.1 by closing its connection, over HTTP/2
/// by resetting the stream alone (the connection carries others). `None` where neither
/// applies (a request that no server connection carries, as in unit tests).
pub fn stream_teardown(
    conn: Option<&Connection>,
    req: &axum::extract::Request,
) -> Option<Teardown> {
    if req.version() == http::Version::HTTP_2 {
        return crate::server::current_stream_cancel().map(Teardown::Stream);
    }
    let c = conn?;
    Some(if c.stream_slot.is_some() {
        Teardown::OwnWriter(c.kill.clone())
    } else {
        Teardown::Connection(c.kill.clone())
    })
}

/// An HTML page of the hub's own (the demo, the dashboard): never framed by another site
/// (clickjacking), never sniffed as another type.
pub fn html_page(html: &'static str) -> Response {
    let mut r = axum::response::Html(html).into_response();
    let h = r.headers_mut();
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// A refusal: the status and a one-line reason as plain text.
pub fn reject(status: StatusCode, reason: impl std::fmt::Display) -> Response {
    let mut r = (status, format!("{reason}\n")).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The headers every event stream carries (Mercure's full set). `last_event_id` answers a
/// request that carried a cursor: in `Mercure-Last-Event-ID` (1.0), and for a 0.x request in
/// `Last-Event-ID` too, as 0.x hubs answered.
fn stream_response(body: Body, last_event_id: Option<&str>, dialect: Dialect) -> Response {
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache, no-store, must-revalidate, max-age=0"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    h.insert("expire", HeaderValue::from_static("0"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    // `from_bytes`, not `from_str`: an id may be any UTF-8 (an IRI), which HTTP carries as
    // opaque bytes; only control characters are refused.
    if let Some(id) = last_event_id.and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
        if dialect == Dialect::V0 {
            h.insert("last-event-id", id.clone());
        }
        h.insert("mercure-last-event-id", id);
    }
    r
}

/// A subscriber's stream that logs the seed's "Finished HTTP request at …" when it ends.
struct Logged {
    inner: SubscriberStream,
    path: &'static str,
}

impl http_body::Body for Logged {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        tracing::info!(
            subscriber = self.inner.subscriber_id(),
            "Finished HTTP request at {}",
            self.path
        );
    }
}

/// The response that carries an accepted subscriber's stream: in its body, or, on a connection
/// with a stream slot, in the slot (the body then stays empty and the connection writes the
/// stream itself).
fn stream_reply(
    conn: Option<&Connection>,
    stream: SubscriberStream,
    path: &'static str,
    last_event_id: Option<&str>,
    dialect: Dialect,
) -> Response {
    if let Some(slot) = conn.and_then(|c| c.stream_slot.as_ref()) {
        *slot.lock() = Some((stream, path));
        return stream_response(Body::empty(), last_event_id, dialect);
    }
    let body = Body::new(Logged {
        inner: stream,
        path,
    });
    stream_response(body, last_event_id, dialect)
}
