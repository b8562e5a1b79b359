//! The SSE server a typical Rust developer writes in an afternoon: axum's `Sse`, one
//! `tokio::sync::broadcast` channel per topic, lagging receivers silently skip ahead.
//! It is the "naive baseline" of ssehub's benchmarks, deliberately left unoptimised.
//!
//! GET /events?topic=T streams; POST /publish?topic=T with the body as the event's data.
//! Usage: sse-baseline [ADDR] [CERT.pem KEY.pem] (default 127.0.0.1:3000; with a certificate
//! and its key, HTTPS with HTTP/2 and HTTP/1.1 by ALPN, as naively as the rest).

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
    if let (Some(cert), Some(key)) = (std::env::args().nth(2), std::env::args().nth(3)) {
        eprintln!("sse-baseline listening on https://{addr}");
        serve_tls(listener, app, &cert, &key).await;
    } else {
        eprintln!("sse-baseline listening on http://{addr}");
        axum::serve(listener, app).await.unwrap();
    }
}

/// An accept loop with a TLS handshake in each connection's task, then hyper's automatic
/// HTTP/1.1-or-HTTP/2 server on the stream: what a first TLS setup looks like.
async fn serve_tls(listener: tokio::net::TcpListener, app: Router, cert: &str, key: &str) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let chain = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(
                hyper_util::rt::TokioExecutor::new(),
            )
            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
            .await;
        });
    }
}
