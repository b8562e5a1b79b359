//! The hub embedded in another application: an `App` built from the serve flags, its routes
//! merged into the application's router and served by `axum::serve` (not `ssehub::run`), and
//! publishes from the application's own code. Everything over real TCP.

use std::future::IntoFuture as _;
use std::time::Duration;

use clap::Parser as _;
use http::{HeaderMap, StatusCode};
use ssehub::client::{Connection, EventStream, Target};
use ssehub::config::ServeArgs;
use ssehub::hub::Draft;
use ssehub::server::shutdown::Shutdown;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "a secret of at least thirty-two bytes!";

struct Embedded {
    app: ssehub::App,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        self.stop.cancel();
        self.server.abort();
    }
}

async fn embed(extra: &[&str]) -> Embedded {
    let mut argv = vec![
        "ssehub",
        "--publisher-jwt-key",
        SECRET,
        "--data-dir",
        "none",
        "--clock-interval",
        "0",
    ];
    argv.extend_from_slice(extra);
    let config = ServeArgs::try_parse_from(argv).unwrap().validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let shutdown = Shutdown::new(stop.clone());
    let app = ssehub::App::build(&config, addr, &shutdown).await.unwrap();
    let router = axum::Router::new()
        .route("/hello", axum::routing::get(|| async { "own page" }))
        .merge(app.router());
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    Embedded {
        app,
        addr,
        stop,
        server,
    }
}

fn target(addr: std::net::SocketAddr, path: &str) -> Target {
    Target::parse(&format!("http://{addr}{path}")).unwrap()
}

fn token() -> String {
    ssehub::auth::Key::secret(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes())
        .mint(Some(&["*".to_owned()]), None, None)
        .unwrap()
}

async fn next_data(stream: &mut EventStream) -> String {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .expect("the stream is open")
        .data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_by_axum_it_subscribes_and_publishes_over_tcp() {
    let hub = embed(&[]).await;
    let topic = "https://example.com/books/1";
    let mut stream = EventStream::open(
        &target(hub.addr, &format!("/.well-known/mercure?topic={topic}")),
        &HeaderMap::new(),
    )
    .await
    .unwrap();

    // A POST with a token, through the merged router.
    let mut publisher = Connection::open(&target(hub.addr, "/.well-known/mercure"))
        .await
        .unwrap();
    let (status, id) = publisher
        .publish(Some(&token()), &[("topic", topic), ("data", "by POST")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{id}");
    assert_eq!(next_data(&mut stream).await, "by POST");

    // A publish from the application's code reaches the same subscriber.
    hub.app
        .publish(Draft {
            topics: vec![topic.into()],
            data: "by App::publish".into(),
            ..Draft::default()
        })
        .await
        .unwrap();
    assert_eq!(next_data(&mut stream).await, "by App::publish");

    // Without a token, the merged router refuses as the hub does; the application's own
    // route is there too.
    let (status, body) = publisher
        .publish(None, &[("topic", topic), ("data", "x")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let mut page = Connection::open(&target(hub.addr, "/hello")).await.unwrap();
    let response = page
        .send(
            http::Method::GET,
            "/hello",
            &HeaderMap::new(),
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"own page");
}

/// `App::publish` refuses on content what a POST would: the wildcard, the hub's reserved
/// topics, a forbidden id.
#[tokio::test]
async fn app_publish_refuses_what_a_post_would() {
    let hub = embed(&[]).await;
    let draft = |topic: &str, id: Option<&str>| Draft {
        topics: vec![topic.into()],
        data: "x".into(),
        id: id.map(Into::into),
        ..Draft::default()
    };
    for refused in [
        draft("*", None),
        draft("/.well-known/mercure/subscriptions/a", None),
        draft("https://example.com/a", Some("#1")),
        draft("https://example.com/a", Some("earliest")),
        Draft::default(),
    ] {
        assert!(
            hub.app.publish(refused.clone()).await.is_err(),
            "{refused:?} is refused"
        );
    }
}

/// A POST with `id=` (empty) is given an id by the hub, as one without `id`: an empty id
/// would be sent as `id:`, which resets a browser's last event id, so that it reconnects
/// without `Last-Event-ID` and misses what was published meanwhile. `App::publish` promises
/// the same treatment as a POST.
#[tokio::test]
async fn app_publish_gives_an_empty_id_a_fresh_one_as_a_post_does() {
    let hub = embed(&[]).await;
    let mut publisher = Connection::open(&target(hub.addr, "/.well-known/mercure"))
        .await
        .unwrap();
    let (status, by_post) = publisher
        .publish(
            Some(&token()),
            &[
                ("topic", "https://example.com/a"),
                ("id", ""),
                ("data", "x"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(by_post.starts_with("urn:uuid:"), "{by_post:?}");

    let by_app = hub
        .app
        .publish(Draft {
            topics: vec!["https://example.com/a".into()],
            data: "x".into(),
            id: Some(String::new()),
            event_type: Some(String::new()),
            ..Draft::default()
        })
        .await
        .unwrap();
    assert!(by_app.starts_with("urn:uuid:"), "{by_app:?}");
}

async fn get_text(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
    let mut conn = Connection::open(&target(addr, path)).await.unwrap();
    let response = conn
        .send(
            http::Method::GET,
            path,
            &HeaderMap::new(),
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    let status = response.status();
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A publish `App::publish` refuses is counted as a refused POST is
/// (`ssehub_updates_published_total{outcome="rejected"}`).
#[tokio::test]
async fn app_publish_refusals_are_counted_as_a_posts_are() {
    let hub = embed(&[]).await;
    let refused = Draft {
        topics: vec!["*".into()],
        data: "x".into(),
        ..Draft::default()
    };
    assert!(hub.app.publish(refused).await.is_err());
    let (status, metrics) = get_text(hub.addr, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("ssehub_updates_published_total{outcome=\"rejected\"} 1\n"),
        "{metrics}"
    );
}

/// An embedding application stops the way the docs show: the hub's shutdown ends every
/// stream, so axum's graceful shutdown does not wait for subscribers forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_axum_ends_the_streams() {
    let config = ServeArgs::try_parse_from([
        "ssehub",
        "--publisher-jwt-key",
        SECRET,
        "--data-dir",
        "none",
        "--clock-interval",
        "0",
    ])
    .unwrap()
    .validate()
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let shutdown = Shutdown::new(stop.clone());
    let app = ssehub::App::build(&config, addr, &shutdown).await.unwrap();
    let stopped = stop.clone();
    let server = tokio::spawn(
        axum::serve(listener, app.router())
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .into_future(),
    );
    let mut stream = EventStream::open(
        &target(addr, "/.well-known/mercure?topic=a"),
        &HeaderMap::new(),
    )
    .await
    .unwrap();
    app.publish(Draft {
        topics: vec!["a".into()],
        data: "before".into(),
        ..Draft::default()
    })
    .await
    .unwrap();
    assert_eq!(next_data(&mut stream).await, "before");
    stop.cancel();
    app.hub().shutdown();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("axum's graceful shutdown ends within 10 s")
        .unwrap()
        .unwrap();
}
