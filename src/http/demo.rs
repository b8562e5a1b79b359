//! The seed's demo: the page at `/` and its stream of the clock topic at `/events/`.

use axum::extract::{Request, State};
use axum::response::{Html, IntoResponse, Response};

use super::{stream_reply, stream_response, AppState, Connection};
use crate::clock::TOPIC;
use crate::hub::SubscribeRequest;

const PAGE: &str = include_str!("demo.html");

pub async fn page() -> Response {
    tracing::info!("Finished HTTP request at /");
    Html(PAGE).into_response()
}

/// `GET /events/`: the clock topic, anonymously, with `Last-Event-ID` replay.
pub async fn events(State(app): State<AppState>, req: Request) -> Response {
    let last_event_id = match super::mercure::last_event_id(&req) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let conn = req.extensions().get::<Connection>();
    let kill = conn.map(|c| c.kill.clone());
    let sub = app.hub.subscribe(SubscribeRequest {
        topics: vec![TOPIC.to_owned()],
        rights: None,
        last_event_id,
        expires_at: None,
        kill,
        payload: None,
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

pub async fn events_head() -> Response {
    stream_response(axum::body::Body::empty(), None)
}
