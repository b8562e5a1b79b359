//! The connection budget against hostile clients: idle HTTP/2 connections (h2c and TLS) are
//! closed like idle HTTP/1.1 ones, a hub whose connections and descriptors are all taken still
//! answers publishes and health checks and refuses new subscribers with 503, and a publish
//! whose client gave up while it waited to be accepted is not applied later.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{take, TestHub};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ssehub::client::EventStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const ACK: u8 = 1;

/// An HTTP/2 frame: 3 bytes of length, type, flags, 4 bytes of stream id (0 here), payload.
fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

/// Plays an HTTP/2 client that never opens a stream: the preface and an empty SETTINGS frame,
/// then only acknowledgements of the hub's SETTINGS and PINGs, and a PING of its own every
/// second. Returns how long the connection lasted until the hub closed it, or `None` if it
/// was still open after `within`.
async fn idle_http2<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, &[]));
    if io.write_all(&hello).await.is_err() {
        return Some(started.elapsed());
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    let mut read = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut answer = Vec::new();
        tokio::select! {
            _ = &mut deadline => return None,
            _ = tick.tick() => answer = frame(PING, 0, b"attacker"),
            r = io.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                Ok(n) => read.extend_from_slice(&chunk[..n]),
            },
        }
        while read.len() >= 9 {
            let len = u32::from_be_bytes([0, read[0], read[1], read[2]]) as usize;
            if read.len() < 9 + len {
                break;
            }
            let (kind, flags) = (read[3], read[4]);
            match kind {
                SETTINGS if flags & ACK == 0 => answer.extend(frame(SETTINGS, ACK, &[])),
                PING if flags & ACK == 0 => answer.extend(frame(PING, ACK, &read[9..9 + len])),
                _ => {}
            }
            read.drain(..9 + len);
        }
        if !answer.is_empty() && io.write_all(&answer).await.is_err() {
            return Some(started.elapsed());
        }
    }
}

/// An h2c connection to the hub, and the task that ends when the connection does.
/// The idle timeout the tests that wait for it give the hub (`--idle-timeout`, 10 s by
/// default): the same closing, within seconds.
const IDLE: Duration = Duration::from_secs(2);
const IDLE_FLAG: [&str; 2] = ["--idle-timeout", "2s"];

/// Whether a connection that lasted `lasted` was closed for being idle: not before the idle
/// timeout (the hub counts from its accept, a moment after the client's connect), and not
/// long after it (a GOAWAY the client ignores is followed by the close 2 s later).
fn closed_for_idleness(lasted: Duration) -> bool {
    lasted + Duration::from_millis(500) >= IDLE && lasted < IDLE + Duration::from_secs(8)
}

async fn h2c(
    hub: &TestHub,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(hub.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (sender, conn)
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_http2_connections_are_closed_and_busy_ones_are_not() {
    let hub = TestHub::start(&IDLE_FLAG);
    let idle = tokio::spawn({
        let tcp = TcpStream::connect(hub.addr).await.unwrap();
        idle_http2(tcp, IDLE * 10)
    });

    // A connection that carried a request, then nothing: idle too once it is answered.
    let (mut answered, answered_conn) = h2c(&hub).await;
    let get = |path: &str| {
        let url = format!("http://{}{path}", hub.addr);
        Request::get(url).body(Full::new(Bytes::new())).unwrap()
    };
    let health = answered.send_request(get("/healthz")).await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    drop(health);

    // One with an event stream open stays, however long nothing is published.
    let (mut busy, _busy_conn) = h2c(&hub).await;
    let stream = busy
        .send_request(get("/.well-known/mercure?topic=h2"))
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.into_body();

    let lasted = idle
        .await
        .unwrap()
        .expect("an HTTP/2 connection without a stream, sending PINGs, is closed");
    assert!(closed_for_idleness(lasted), "closed after {lasted:?}");
    let closed = tokio::time::timeout(Duration::from_secs(10), answered_conn).await;
    assert!(
        closed.is_ok(),
        "the answered connection is closed once idle"
    );
    drop(answered);

    // The stream's connection is still open well past the idle timeout.
    tokio::time::sleep((IDLE * 2).saturating_sub(lasted)).await;
    hub.publisher()
        .await
        .ok(&[("topic", "h2"), ("data", "still open")])
        .await;
    let mut parser = ssehub::sse::Parser::new();
    let mut events = Vec::new();
    while events.is_empty() {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the update in time")
            .expect("the stream still open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            parser.feed(&data, &mut events).unwrap();
        }
    }
    assert_eq!(events[0].data, "still open");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_http2_over_tls_is_closed() {
    let dir = std::env::temp_dir().join(format!("ssehub-test-idle-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let hub = TestHub::start_tls(
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            IDLE_FLAG[0],
            IDLE_FLAG[1],
        ],
        cert.cert.der().clone(),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(hub.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let lasted = idle_http2(tls, IDLE * 10)
        .await
        .expect("an idle HTTP/2 connection over TLS is closed");
    assert!(closed_for_idleness(lasted), "closed after {lasted:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Keeps `count` idle HTTP/2 connections to the hub, opening a new one a little after the hub
/// closes one, until `stop`.
fn idle_attackers(hub: &TestHub, count: usize, stop: &Arc<AtomicBool>) {
    for _ in 0..count {
        let (addr, stop) = (hub.addr, stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(tcp) = TcpStream::connect(addr).await {
                    idle_http2(tcp, Duration::from_secs(60)).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// Subscribers that send their request and never read.
async fn never_reading_subscribers(hub: &TestHub, count: usize) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for _ in 0..count {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(hub.addr).await.unwrap();
        s.write_all(b"GET /.well-known/mercure?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        out.push(s);
    }
    out
}

/// At most this long for anything the test asks of a hub under attack.
const PATIENCE: Duration = Duration::from_secs(20);

async fn patiently<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {PATIENCE:?}"))
}

/// Fills a hub whose open-file limit is 256 with 150 subscribers that never read and 150
/// idle HTTP/2 connections that come back when closed (more connections than it has
/// descriptors), and checks what it still does: publishes and health checks answered, a
/// witness receiving every update once and in order, `accept` failures not flooding the log.
/// Returns the witness's stream and the attack, still under way.
async fn under_attack(hub: &TestHub) -> (EventStream, Arc<AtomicBool>, Vec<TcpStream>) {
    let mut witness = hub.subscribe("topic=witness", &[]).await;
    let subscribers = never_reading_subscribers(hub, 150).await;
    let stop = Arc::new(AtomicBool::new(false));
    idle_attackers(hub, 150, &stop);
    // Their connections are taken or queued by now, and some already closed to make room.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut p = patiently("a publisher's connection", hub.publisher()).await;
    let mut published = Vec::new();
    for i in 0..20 {
        let data = format!("during the attack {i}");
        patiently("a publish", p.ok(&[("topic", "witness"), ("data", &data)])).await;
        published.push(data);
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = patiently(path, common::get(hub, path, &[])).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let events = take(&mut witness, published.len(), Duration::from_secs(10)).await;
    let got: Vec<_> = events.into_iter().map(|e| e.data).collect();
    assert_eq!(got, published, "every update, once, in order");
    let open = patiently("metrics", hub.metric("ssehub_connections_open")).await;
    assert!(open <= 256.0, "{open} connections open");
    let failures = hub
        .logs()
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(failures <= 3, "{failures} accept failures logged");
    (witness, stop, subscribers)
}

/// Ends the attack, and checks that a subscriber is accepted again and the witness has had
/// nothing more.
async fn after_attack(hub: &TestHub, mut witness: EventStream, stop: Arc<AtomicBool>) {
    stop.store(true, Ordering::Relaxed);
    // An attacker notices within its next PING; the hub closes idle ones within 10 s anyway.
    let mut accepted = None;
    let deadline = Instant::now() + Duration::from_secs(25);
    while accepted.is_none() && Instant::now() < deadline {
        match tokio::time::timeout(
            Duration::from_secs(5),
            hub.try_subscribe("topic=after", &[]),
        )
        .await
        {
            Ok(Ok(s)) => accepted = Some(s),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let mut after = accepted.expect("a subscriber accepted once the attack is over");
    hub.publisher()
        .await
        .ok(&[("topic", "after"), ("data", "welcome back")])
        .await;
    assert_eq!(
        take(&mut after, 1, Duration::from_secs(10)).await[0].data,
        "welcome back"
    );
    common::assert_quiet(&mut witness, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_out_of_connections_still_publishes_and_refuses_subscribers_with_503() {
    // The default --max-connections under 256 descriptors: 180, and a reserve of 32.
    let hub = TestHub::start_with_open_files(&[], 256);
    let (witness, stop, mut subscribers) = under_attack(&hub).await;
    let open = hub.metric("ssehub_connections_open").await;
    assert!(open <= 212.0, "{open} connections open");

    // Idle connections give way: a subscriber gets in while the busy ones are under the limit.
    let mut welcome = patiently("a subscriber", hub.subscribe("topic=late", &[])).await;
    // Streams up to --max-connections (the idle HTTP/2 attackers make room for them)...
    subscribers.extend(never_reading_subscribers(&hub, 40).await);
    patiently(
        "the streams",
        hub.wait_metric(
            "ssehub_subscribers_connected",
            |v| v >= 180.0,
            Duration::from_secs(20),
        ),
    )
    .await;
    // ... and past it a new subscriber is refused, as one over the subscriber limit is.
    let ((status, reason), headers) = patiently(
        "a subscriber",
        common::request(
            &hub,
            Method::GET,
            "/.well-known/mercure?topic=late",
            &[],
            "",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    assert_eq!(reason.lines().count(), 1, "{reason:?}");
    assert!(reason.contains("--max-connections"), "{reason:?}");
    let ((status, _), headers) = patiently(
        "a HEAD",
        common::request(
            &hub,
            Method::HEAD,
            "/.well-known/mercure?topic=late",
            &[],
            "",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.contains_key("retry-after"));
    // (Refused at the connection limit or the subscriber limit, both --max-connections.)
    let refused = hub.metric("ssehub_connections_refused_total").await
        + hub.metric("ssehub_subscribers_refused_total").await;
    assert!(refused >= 2.0, "{refused}");
    assert!(hub.metric("ssehub_connections_evicted_total").await >= 1.0);
    // The one that got in was never closed to make room.
    hub.publisher()
        .await
        .ok(&[("topic", "late"), ("data", "still here")])
        .await;
    assert_eq!(
        take(&mut welcome, 1, Duration::from_secs(10)).await[0].data,
        "still here"
    );

    drop(subscribers);
    after_attack(&hub, witness, stop).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hub_out_of_descriptors_waits_instead_of_spinning() {
    // A --max-connections over what the descriptors allow: `accept` fails, and the hub waits
    // for (and makes) room rather than trying again and again.
    let hub = TestHub::start_with_open_files(&["--max-connections", "1000"], 256);
    let (witness, stop, subscribers) = under_attack(&hub).await;
    let errors = hub.metric("ssehub_accept_errors_total").await;
    assert!(
        errors >= 1.0,
        "no accept failed: the descriptors never ran out"
    );
    drop(subscribers);
    after_attack(&hub, witness, stop).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_given_up_while_waiting_to_be_accepted_is_not_applied() {
    // 2 + 32 places: a witness and 33 publishes whose bodies never come take them all.
    let hub = TestHub::start(&["--max-connections", "2"]);
    let mut witness = hub.subscribe("topic=v", &[]).await;
    let token = hub.publisher_token();
    let head = |len: usize| {
        format!(
            "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let mut stalled = Vec::new();
    for _ in 0..33 {
        let mut s = TcpStream::connect(hub.addr).await.unwrap();
        s.write_all(format!("{}topic=v", head(1000)).as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Queued by the kernel: the client sends its whole publish, waits, gives up and closes.
    let mut victim = TcpStream::connect(hub.addr).await.unwrap();
    let body = "topic=v&data=given+up";
    victim
        .write_all(format!("{}{body}", head(body.len())).as_bytes())
        .await
        .unwrap();
    let mut answer = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_secs(1), victim.read(&mut answer)).await;
    let queued = waited.is_err();
    drop(victim);
    drop(stalled);

    // A publish from a client still there is the first the witness sees; and once the hub
    // has taken the queued connection and let it go, it is the only one applied.
    hub.publisher()
        .await
        .ok(&[("topic", "v"), ("data", "still here")])
        .await;
    assert_eq!(
        take(&mut witness, 1, Duration::from_secs(10)).await[0].data,
        "still here",
        "the publish given up was applied (it was {}queued)",
        if queued { "" } else { "not " }
    );
    hub.wait_metric(
        "ssehub_connections_open",
        |v| v <= 2.0,
        Duration::from_secs(10),
    )
    .await;
    let accepted = "ssehub_updates_published_total{outcome=\"accepted\"}";
    assert_eq!(hub.metric(accepted).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_never_finished_does_not_hold_its_connection_for_good() {
    // HTTP/2 clients that open no window for the answer to `GET /` (its body can never be
    // sent): their connections are busy, never idle, so neither the idle deadline nor the
    // making of room closes them. Past the request deadline (`--request-timeout`, 60 s by
    // default) they are closed, and the subscribers they kept out get in.
    let request_timeout = Duration::from_secs(2);
    let hub = TestHub::start(&["--max-connections", "2", "--request-timeout", "2s"]);
    let mut stalled = Vec::new();
    // Before any of their requests began: none can be closed for its deadline before
    // `request_timeout` from here.
    let begun = Instant::now();
    for _ in 0..3 {
        let tcp = TcpStream::connect(hub.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(0)
            .initial_connection_window_size(0)
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get("/")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .expect("the answer's head")
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // The body is never read: the hub cannot send it.
        stalled.push((sender, response, conn));
    }
    let refused = hub.try_subscribe("topic=t", &[]).await;
    assert!(
        matches!(&refused, Err(e) if e.to_string().contains("503")),
        "three busy connections over --max-connections 2: {:?}",
        refused.as_ref().map(|_| "a stream")
    );
    for (_, _, conn) in &mut stalled {
        tokio::time::timeout(request_timeout + Duration::from_secs(20), conn)
            .await
            .expect("the hub closed the stalled connection")
            .unwrap();
    }
    let waited = begun.elapsed();
    assert!(
        waited >= request_timeout,
        "closed after {waited:?}, before the request deadline"
    );
    let mut stream = hub.subscribe("topic=t", &[]).await;
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "in")])
        .await;
    assert_eq!(
        take(&mut stream, 1, Duration::from_secs(10)).await[0].data,
        "in"
    );
}
