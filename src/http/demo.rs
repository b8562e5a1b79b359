//! The seed's demo: the page at `/` and its stream of the clock topic at `/events/`.

use axum::extract::{Request, State};
use axum::response::Response;

use super::mercure::{subscribe_request, subscriber_rights};
use super::{stream_reply, stream_response, AppState, Connection};
use crate::clock::TOPIC;

const PAGE: &str = include_str!("demo.html");

pub async fn page() -> Response {
    tracing::info!("Finished HTTP request at /");
    super::html_page(PAGE)
}

/// `GET /events/`: the clock topic, anonymously (unless `--anonymous false`), with
/// `Last-Event-ID` replay.
pub async fn events(State(app): State<AppState>, req: Request) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    // With `--anonymous false` the demo stream is no exception: it takes a token (header or
    // cookie) as the Mercure endpoint does, or the topic `time` would be readable by anyone.
    let rights = match subscriber_rights(&app, &req, None) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let last_event_id = match super::mercure::last_event_id(&req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let conn = req.extensions().get::<Connection>();
    let teardown = super::stream_teardown(conn, &req);
    let sub = app.hub.subscribe(subscribe_request(
        &app,
        vec![crate::hub::Matcher::topic(TOPIC)],
        rights,
        last_event_id,
        teardown,
    ));
    match sub {
        Ok(s) => {
            let path = if req.uri().path() == "/events" {
                "/events"
            } else {
                "/events/"
            };
            stream_reply(
                conn,
                s.stream,
                path,
                s.last_event_id.as_deref(),
                super::Dialect::V0,
            )
        }
        Err(e) => super::mercure::subscribe_error(e),
    }
}

pub async fn events_head(State(app): State<AppState>, req: Request) -> Response {
    if let Err(r) = super::room_for_stream(&app) {
        return r;
    }
    match subscriber_rights(&app, &req, None) {
        Ok(_) => stream_response(axum::body::Body::empty(), None, super::Dialect::V0),
        Err(r) => r,
    }
}
