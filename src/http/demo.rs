//! The seed's demo: the page at `/` and its stream of the clock topic at `/events/`.

use axum::extract::{Request, State};
use axum::response::Response;

use super::mercure::auth_error;
use super::{stream_reply, stream_response, AppState, Connection};
use crate::auth::{find_token, AuthError, Rights};
use crate::clock::TOPIC;
use crate::hub::SubscribeRequest;

const PAGE: &str = include_str!("demo.html");

pub async fn page() -> Response {
    tracing::info!("Finished HTTP request at /");
    super::html_page(PAGE)
}

/// With `--anonymous false`, the demo stream is no exception: it takes a token (header or
/// cookie) as the Mercure endpoint does, or the topic `time` would be readable by anyone.
fn rights(app: &AppState, req: &Request) -> Result<Option<Rights>, Response> {
    if app.anonymous {
        return Ok(None);
    }
    match find_token(req.headers(), None).map_err(auth_error)? {
        Some((token, _)) => super::mercure::verify_subscriber(app, token).map(Some),
        None => Err(auth_error(AuthError::Missing)),
    }
}

/// `GET /events/`: the clock topic, anonymously (unless `--anonymous false`), with
/// `Last-Event-ID` replay.
pub async fn events(State(app): State<AppState>, req: Request) -> Response {
    let rights = match rights(&app, &req) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let last_event_id = match super::mercure::last_event_id(&req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let conn = req.extensions().get::<Connection>();
    let kill = super::stream_kill(conn, &req);
    let (expires_at, payload) = rights
        .as_ref()
        .map_or((None, None), |r| (r.expires_at, r.payload.clone()));
    let sub = app.hub.subscribe(SubscribeRequest {
        topics: vec![TOPIC.to_owned()],
        rights: rights.map(|r| r.subscribe.unwrap_or_default()),
        last_event_id,
        expires_at,
        kill,
        payload,
    });
    match sub {
        Ok(s) => {
            let path = if req.uri().path() == "/events" {
                "/events"
            } else {
                "/events/"
            };
            stream_reply(conn, s.stream, path, s.last_event_id.as_deref())
        }
        Err(e) => super::mercure::subscribe_error(e),
    }
}

pub async fn events_head(State(app): State<AppState>, req: Request) -> Response {
    match rights(&app, &req) {
        Ok(_) => stream_response(axum::body::Body::empty(), None),
        Err(r) => r,
    }
}
