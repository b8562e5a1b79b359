//! The dashboard at `/ui/`: one built-in page, and the stream of the hub's figures it draws.
//!
//! The figures come from the hub itself over SSE (`/ui/stats`, one JSON snapshot a second), so
//! the page needs nothing but the hub. They are not public: the stream wants a valid token,
//! like the Mercure endpoint it sits beside.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::StatusCode;

use super::mercure::{auth_error, served_dialect};
use super::{form, reject, stream_response, AppState};
use crate::auth::{find_token, query_token, AuthError, Rights};
use crate::metrics::{DropReason, Metrics};

const PAGE: &str = include_str!("ui.html");

/// How often the stats stream sends a snapshot.
const EVERY: Duration = Duration::from_secs(1);

/// `GET /ui/`
pub async fn page() -> Response {
    super::html_page(PAGE)
}

/// `GET /ui` sends the browser to `/ui/`, so that the page's relative URLs stay right.
pub async fn redirect() -> Response {
    let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
    r.headers_mut().insert(
        http::header::LOCATION,
        http::HeaderValue::from_static("/ui/"),
    );
    r
}

/// `GET /ui/stats`: an event stream of [`Snapshot`]s, one a second, for as long as the token
/// is valid and the hub runs. The token is found and checked as a subscriber's is (header,
/// cookie, and the 0.x query parameter; a 1.0 token must name this hub in `aud`; a hub serving
/// one protocol takes only its tokens), and refused with the same RFC 6750 challenges, so that
/// the dashboard can say why.
pub async fn stats(State(app): State<AppState>, req: Request) -> Response {
    let query_token = match req.uri().query() {
        Some(q) => match form::parse(q.as_bytes(), 100) {
            Ok(pairs) => match query_token(pairs) {
                Ok(t) => t,
                Err(e) => return auth_error(e),
            },
            Err(e) => return reject(StatusCode::BAD_REQUEST, e),
        },
        None => None,
    };
    let token = match find_token(
        req.headers(),
        query_token.as_deref(),
        &app.tokens.cookie_name,
    ) {
        Ok(Some((t, _))) => t,
        Ok(None) => return auth_error(AuthError::Missing),
        Err(e) => return auth_error(e),
    };
    // Either key will do: the figures are for whoever runs the hub, publisher or subscriber.
    let resource = app.tokens.resource(&req);
    let expected = app.tokens.expected(&resource);
    let rights = match app.subscriber_key.verify(token, &expected) {
        Ok(r) => Ok(r),
        Err(first) => match app.publisher_key.verify(token, &expected) {
            Ok(r) => Ok(r),
            // Say why the key that did sign it refuses it (expired, say), if one did.
            Err(second) => Err(if first.is_wrong_key() { second } else { first }),
        },
    };
    let rights = match rights
        .and_then(|r| served_dialect(&app, r))
        .and_then(Rights::unexpired)
    {
        Ok(r) => r,
        Err(e) => return auth_error(e),
    };

    let shutdown = app.shutdown.clone();
    let expires_in = rights
        .expires_at
        .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
    // The stream must end by itself, or graceful shutdown would wait for it forever.
    let end = async move {
        match expires_in {
            Some(d) => tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(d) => {}
            },
            None => shutdown.cancelled().await,
        }
    };

    let metrics = app.hub.metrics().clone();
    let mut interval = tokio::time::interval(EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Counters::read(&metrics);
    let snapshots = stream::unfold(
        (interval, start, metrics),
        |(mut interval, prev, metrics)| async move {
            interval.tick().await;
            let now = Counters::read(&metrics);
            let event = Snapshot::between(&prev, &now, &metrics).to_event();
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (interval, now, metrics),
            ))
        },
    );
    // A comment first, so that the browser's `onopen` fires at once.
    let body = stream::once(async { Ok(Bytes::from_static(b":\n\n")) })
        .chain(snapshots)
        .take_until(Box::pin(end));
    stream_response(Body::from_stream(body), None, super::Dialect::V0)
}

/// The counters that rates are computed from, and when they were read.
struct Counters {
    at: Instant,
    updates: u64,
    deliveries: u64,
}

impl Counters {
    fn read(m: &Metrics) -> Counters {
        Counters {
            at: Instant::now(),
            updates: m.updates_published.load(Relaxed),
            deliveries: m.deliveries.load(Relaxed),
        }
    }
}

/// What the dashboard shows, as sent on the stream (one JSON object per event).
#[derive(serde::Serialize)]
struct Snapshot {
    subscribers_connected: u64,
    subscribers_total: u64,
    updates_published: u64,
    deliveries: u64,
    /// `null` until a second has passed since the stream opened.
    updates_per_second: Option<f64>,
    deliveries_per_second: Option<f64>,
    slow_subscribers_dropped: u64,
    history_length: u64,
}

impl Snapshot {
    fn between(prev: &Counters, now: &Counters, m: &Metrics) -> Snapshot {
        let secs = now.at.duration_since(prev.at).as_secs_f64();
        let rate = |a: u64, b: u64| (secs >= 0.5).then(|| b.saturating_sub(a) as f64 / secs);
        Snapshot {
            subscribers_connected: m.subscribers_connected.load(Relaxed),
            subscribers_total: m.subscribers_total.load(Relaxed),
            updates_published: now.updates,
            deliveries: now.deliveries,
            updates_per_second: rate(prev.updates, now.updates),
            deliveries_per_second: rate(prev.deliveries, now.deliveries),
            slow_subscribers_dropped: m.dropped_count(DropReason::Slow),
            history_length: m.history_len.load(Relaxed),
        }
    }

    fn to_event(&self) -> Bytes {
        let json = serde_json::to_string(self).unwrap_or_default();
        Bytes::from(format!("data: {json}\n\n"))
    }
}
