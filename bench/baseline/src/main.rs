//! The SSE server a typical Rust developer writes in an afternoon: axum's `Sse`, one
//! `tokio::sync::broadcast` channel per topic, lagging receivers silently skip ahead.
//! It is the "naive baseline" of ssehub's benchmarks, deliberately left unoptimised.
//!
//! GET /events?topic=T streams; POST /publish?topic=T with the body as the event's data.
//! Usage: sse-baseline [ADDR] (default 127.0.0.1:3000).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::Router;
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<String>>>>;

#[derive(serde::Deserialize)]
struct TopicQuery {
    topic: Option<String>,
}

fn channel(topics: &Topics, q: TopicQuery) -> broadcast::Sender<String> {
    let name = q.topic.unwrap_or_default();
    let mut map = topics.lock().unwrap();
    map.entry(name)
        .or_insert_with(|| broadcast::channel(1024).0)
        .clone()
}

async fn events(
    State(topics): State<Topics>,
    Query(q): Query<TopicQuery>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = channel(&topics, q).subscribe();
    let stream = BroadcastStream::new(rx)
        .filter_map(|msg| async move { msg.ok().map(|data| Ok(Event::default().data(data))) });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn publish(State(topics): State<Topics>, Query(q): Query<TopicQuery>, body: String) -> String {
    let receivers = channel(&topics, q).send(body).unwrap_or(0);
    format!("{receivers}\n")
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let topics: Topics = Arc::default();
    let app = Router::new()
        .route("/events", get(events))
        .route("/publish", post(publish))
        .with_state(topics);
    let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
    eprintln!("sse-baseline listening on http://{addr}");
    axum::serve(listener, app).await.unwrap();
}
