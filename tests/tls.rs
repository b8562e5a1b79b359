//! HTTPS with HTTP/2 and HTTP/1.1 by ALPN, h2c on the plain port, and certificate reload.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::TestHub;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use ssehub::sse::Parser;

struct Cert {
    dir: PathBuf,
    der: CertificateDer<'static>,
}

impl Cert {
    fn cert(&self) -> String {
        self.dir.join("cert.pem").display().to_string()
    }
    fn key(&self) -> String {
        self.dir.join("key.pem").display().to_string()
    }
    /// A hub serving TLS with this certificate (and `extra` flags), trusted by its clients.
    fn hub(&self, extra: &[&str]) -> TestHub {
        self.start(extra, TestHub::start_tls)
    }
    /// [`Cert::hub`] as a process of the built binary (its pid, signals, exit).
    fn process(&self, extra: &[&str]) -> TestHub {
        self.start(extra, TestHub::start_process_tls)
    }
    fn start(
        &self,
        extra: &[&str],
        start: fn(&[&str], CertificateDer<'static>) -> TestHub,
    ) -> TestHub {
        let (cert, key) = (self.cert(), self.key());
        let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
        args.extend_from_slice(extra);
        start(&args, self.der.clone())
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost, written to a fresh directory.
fn make_cert(dir: &std::path::Path) -> Cert {
    std::fs::create_dir_all(dir).unwrap();
    let c =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), c.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), c.signing_key.serialize_pem()).unwrap();
    Cert {
        dir: dir.to_owned(),
        der: c.cert.der().clone(),
    }
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ssehub-test-{name}-{}", std::process::id()))
}

async fn tls_connect(
    hub: &TestHub,
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_with(hub, trust, alpn, rustls::DEFAULT_VERSIONS).await
}

/// [`tls_connect`] offering only the TLS `versions` given.
async fn tls_connect_with(
    hub: &TestHub,
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = client_config(trust, alpn, versions);
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

/// A client configuration trusting `trust`, offering `alpn` and the TLS `versions` given.
fn client_config(
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Opens an HTTP/2 connection on `io` and sends one GET on it.
async fn h2_get<IO>(io: IO, url: String) -> http::Response<hyper::body::Incoming>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    sender.send_request(req).await.unwrap()
}

/// Reads events from an h2 response body until `n` have arrived.
async fn read_events(body: &mut hyper::body::Incoming, n: usize) -> Vec<ssehub::sse::Event> {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    while out.len() < n {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("event in time")
            .expect("stream open")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            parser.feed(&data, &mut out).unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_over_tls_carries_a_hundred_streams_on_one_connection() {
    let cert = make_cert(&temp_dir("h2"));
    let hub = cert.hub(&[]);
    let tls = tls_connect(&hub, &cert.der, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..100 {
        let mut s = sender.clone();
        let req = Request::get(format!("https://{}/.well-known/mercure?topic=a", hub.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), Version::HTTP_2);
        bodies.push(resp.into_body());
    }
    // Publish over the same HTTP/2 connection.
    let mut s = sender.clone();
    let req = Request::post(format!("https://{}/.well-known/mercure", hub.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", format!("Bearer {}", hub.publisher_token()))
        .body(Full::new(Bytes::from("topic=a&data=over+h2")))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    for body in &mut bodies {
        assert_eq!(read_events(body, 1).await[0].data, "over h2");
    }
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 100.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_by_alpn_and_h2c_with_prior_knowledge() {
    let cert = make_cert(&temp_dir("h1"));
    let hub = cert.hub(&[]);
    let tls = tls_connect(&hub, &cert.der, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("/healthz")
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, Version::HTTP_11)
    );

    // h2c on a plain hub.
    let plain = TestHub::start(&[]);
    let tcp = tokio::net::TcpStream::connect(plain.addr).await.unwrap();
    let resp = h2_get(
        tcp,
        format!("http://{}/.well-known/mercure?topic=b", plain.addr),
    )
    .await;
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, Version::HTTP_2)
    );
    let mut body = resp.into_body();
    plain
        .publisher()
        .await
        .ok(&[("topic", "b"), ("data", "h2c")])
        .await;
    assert_eq!(read_events(&mut body, 1).await[0].data, "h2c");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_certificate_without_dropping_streams() {
    let dir = temp_dir("reload");
    let first = make_cert(&dir);
    let mut hub = first.process(&[]);
    let tls = tls_connect(&hub, &first.der, &[b"h2"]).await;
    let resp = h2_get(
        tls,
        format!("https://{}/.well-known/mercure?topic=c", hub.addr),
    )
    .await;
    let mut body = resp.into_body();

    let second = make_cert(&dir);
    assert_ne!(first.der, second.der);
    hub.trust = Some(second.der.clone());
    hub.signal("HUP");
    assert!(hub.wait_for_log("certificate reloaded", Duration::from_secs(5)));
    // A new connection is served the new certificate (trusting only it succeeds)...
    let tls2 = tls_connect(&hub, &second.der, &[b"h2"]).await;
    let served = tls2.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(served, second.der);
    // ...and the stream opened before the reload still delivers.
    hub.publisher()
        .await
        .ok(&[("topic", "c"), ("data", "still here")])
        .await;
    assert_eq!(read_events(&mut body, 1).await[0].data, "still here");

    // A broken file on reload keeps the working certificate.
    std::fs::write(dir.join("cert.pem"), "garbage").unwrap();
    hub.signal("HUP");
    assert!(hub.wait_for_log("keeping the old certificate", Duration::from_secs(5)));
    let _ = tls_connect(&hub, &second.der, &[b"h2"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_http2_streams_updates_over_tls() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var("SSEHUB_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("curl is required (SSEHUB_REQUIRE_ALL=1)");
        }
        eprintln!("SKIP curl_http2_streams_updates_over_tls: curl not found");
        return;
    }
    let cert = make_cert(&temp_dir("curl"));
    let hub = cert.hub(&[]);
    let url = format!("https://{}/.well-known/mercure?topic=d", hub.addr);
    let curl = std::process::Command::new("curl")
        .args([
            "-sSN",
            "--http2",
            "--cacert",
            &cert.cert(),
            "--max-time",
            "5",
            "-w",
            "\nVERSION %{http_version}\n",
            &url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    hub.publisher()
        .await
        .ok(&[("topic", "d"), ("data", "via curl")])
        .await;
    let out = tokio::task::spawn_blocking(move || curl.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("data: via curl"), "{text}");
    assert!(text.contains("VERSION 2"), "{text}");
}

/// An HTTPS subscriber that stops reading is dropped like a plain one: its connection closes
/// and the hub forgets it, although TLS takes whole chunks into its own buffer first.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_https_subscriber_is_dropped_and_forgotten() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("stalled"));
    let hub = cert.hub(&["--subscriber-queue", "20"]);
    let mut tls = tls_connect(&hub, &cert.der, &[b"http/1.1"]).await;
    tls.write_all(b"GET /.well-known/mercure?topic=s HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    // Never read; publish until the hub gives up on it (the kernel buffers megabytes first).
    let mut p = hub.publisher().await;
    let data = "z".repeat(16 * 1024);
    let mut sent = 0;
    while hub.metric("ssehub_subscribers_connected").await > 0.0 {
        assert!(
            sent < 4_000,
            "still connected after {sent} updates of 16 KiB"
        );
        for _ in 0..50 {
            p.ok(&[("topic", "s"), ("data", &data)]).await;
        }
        sent += 50;
    }
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
            .await,
        1.0
    );
    // Its connection is closed: reading what was buffered ends, with an end or an error.
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_http2_stream_is_dropped_alone_not_with_its_connection() {
    let hub = TestHub::start(&["--subscriber-queue", "5"]);
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    // A small window, so that the stream that is never read stalls after 64 KiB.
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .adaptive_window(false)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let get = |topic: &str| {
        let mut sender = sender.clone();
        let req = Request::get(format!(
            "http://{}/.well-known/mercure?topic={topic}",
            hub.addr
        ))
        .body(Full::new(Bytes::new()))
        .unwrap();
        async move { sender.send_request(req).await.unwrap() }
    };
    let slow = get("slow").await;
    let mut fast = get("fast").await.into_body();
    let mut p = hub.publisher().await;
    let big = "x".repeat(20_000);
    for _ in 0..40 {
        p.ok(&[("topic", "slow"), ("data", &big)]).await;
    }
    let dropped = "ssehub_subscribers_dropped_total{reason=\"slow\"}";
    hub.wait_metric(dropped, |v| v >= 1.0, Duration::from_secs(10))
        .await;
    // The other stream on the same connection goes on.
    p.ok(&[("topic", "fast"), ("data", "still here")]).await;
    assert_eq!(read_events(&mut fast, 1).await[0].data, "still here");
    // And the stalled one does not keep its place (a slot under --max-connections) while its
    // client does not read: it is unregistered when dropped.
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 1.0);
    drop(slow);
}

/// `ssehub publish` (and `subscribe`) to a hub whose certificate this machine does not trust:
/// rustls names the problem (`UnknownIssuer`, `CaUsedAsEndEntity`), the client says what to do.
#[test]
fn the_client_says_how_to_have_a_certificate_trusted() {
    let publish = |hub: &TestHub, cert_file: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ssehub"));
        cmd.args(["publish", "--hub", &hub.url("/.well-known/mercure")])
            .args(["--topic", "a", "--data", "x", "--jwt-key", common::SECRET])
            .env_remove("SSL_CERT_FILE");
        if let Some(f) = cert_file {
            cmd.env("SSL_CERT_FILE", f);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let cert = make_cert(&temp_dir("untrusted"));
    let hub = cert.hub(&[]);
    let (code, err) = publish(&hub, None);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "says how to trust it: {err}");
    // Done as it says, the publish goes through.
    let (code, err) = publish(&hub, Some(&cert.cert()));
    assert_eq!(code, Some(0), "{err}");

    // A CA certificate as the server's own (what `openssl req -x509` makes by default).
    let dir = temp_dir("ca-as-server");
    std::fs::create_dir_all(&dir).unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let ca = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, ca.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let (cert_path, key_path) = (
        cert_path.display().to_string(),
        key_path.display().to_string(),
    );
    let hub = TestHub::start_tls(
        &["--tls-cert", &cert_path, "--tls-key", &key_path],
        ca.der().clone(),
    );
    let (code, err) = publish(&hub, Some(&cert_path));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("CaUsedAsEndEntity"), "{err}");
    assert!(err.contains("CA:FALSE"), "says what to make instead: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the hub opens an HTTP/2 connection with, as a raw client reads it.
struct ServerPreface {
    settings: Vec<(u16, u32)>,
    /// The connection's receive window: the 65,535 bytes every connection starts with, plus
    /// what the hub's first WINDOW_UPDATE on stream 0 adds.
    connection_window: u32,
}

/// Reads what the hub opens an HTTP/2 connection with, as a raw client does: the preface and
/// an empty SETTINGS frame out, frames in until the hub's own SETTINGS (not an ack) and its
/// WINDOW_UPDATE for the connection have come.
async fn server_preface<IO>(mut io: IO) -> ServerPreface
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    io.write_all(&hello).await.unwrap();
    let (mut settings, mut connection_window) = (None, None);
    while settings.is_none() || connection_window.is_none() {
        let mut header = [0u8; 9];
        io.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await.unwrap();
        let (kind, ack) = (header[3], header[4] & 1 == 1);
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        if kind == 0x4 && !ack {
            let pairs = payload.chunks_exact(6).map(|p| {
                let id = u16::from_be_bytes([p[0], p[1]]);
                (id, u32::from_be_bytes([p[2], p[3], p[4], p[5]]))
            });
            settings = Some(pairs.collect());
        } else if kind == 0x8 && stream == 0 {
            let added = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            connection_window = Some(65_535 + (added & 0x7fff_ffff));
        }
    }
    ServerPreface {
        settings: settings.unwrap(),
        connection_window: connection_window.unwrap(),
    }
}

/// The hub's HTTP/2 settings reach the client, over TLS (ALPN h2) and over h2c alike, from
/// the task an HTTP/2 connection is served on once accepted: the stream limit, the head
/// limit, and the receive windows that bound what request bodies a client can make one
/// connection hold unread (64 KiB a stream, 256 KiB a connection; hyper's default was 1 MiB
/// for both).
#[tokio::test(flavor = "multi_thread")]
async fn http2_settings_reach_the_client_over_tls_and_h2c() {
    const HEADER_TABLE_SIZE: u16 = 0x1;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    const INITIAL_WINDOW_SIZE: u16 = 0x4;
    const MAX_HEADER_LIST_SIZE: u16 = 0x6;
    let expected = [
        (HEADER_TABLE_SIZE, 0),
        (MAX_CONCURRENT_STREAMS, 256),
        (INITIAL_WINDOW_SIZE, 64 * 1024),
        (MAX_HEADER_LIST_SIZE, 64 * 1024),
    ];
    let cert = make_cert(&temp_dir("settings"));
    let hub = cert.hub(&[]);
    let tls = tls_connect(&hub, &cert.der, &[b"h2"]).await;
    let within = Duration::from_secs(10);
    let over_tls = tokio::time::timeout(within, server_preface(tls))
        .await
        .expect("the hub's SETTINGS over TLS within 10 s");
    let plain = TestHub::start(&[]);
    let tcp = tokio::net::TcpStream::connect(plain.addr).await.unwrap();
    let over_h2c = tokio::time::timeout(within, server_preface(tcp))
        .await
        .expect("the hub's SETTINGS over h2c within 10 s");
    for preface in [over_tls, over_h2c] {
        let settings = &preface.settings;
        for (id, value) in expected {
            assert!(
                settings.contains(&(id, value)),
                "setting {id:#x} = {value} expected in {settings:?}"
            );
        }
        assert_eq!(preface.connection_window, 256 * 1024);
    }
}

/// The hub's HTTP/2 event-stream responses are never entered in the connection's HPACK table:
/// each header is sent as a literal never indexed (or by the index of an entry already there:
/// `:status` 200 is HPACK's static entry), so the client's table (which the hub's encoder
/// mirrors, for as long as the connection lasts) gets nothing from them. Read from the wire, as a raw client, two streams on one connection;
/// a plain response (`/healthz`) may be remembered, for the requests that follow it.
#[tokio::test(flavor = "multi_thread")]
async fn http2_responses_are_kept_out_of_the_header_table() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start(&[]);
    let mut io = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let authority = hub.addr.to_string();
    let paths = [
        (1u32, "/healthz"),
        (3, "/.well-known/mercure?topic=a"),
        (5, "/.well-known/mercure?topic=b"),
    ];
    for (stream, path) in paths {
        out.extend_from_slice(&common::h2_get_frame(stream, path, &authority, &[]));
    }
    io.write_all(&out).await.unwrap();
    let mut answered = Vec::new();
    let read = async {
        while answered.len() < 3 {
            let mut header = [0u8; 9];
            io.read_exact(&mut header).await.unwrap();
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            if header[3] == 0x1 {
                assert_eq!(header[4] & 0x28, 0, "no padding or priority expected");
                answered.push((header[8] as u32, hpack_representations(&payload)));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the responses' HEADERS within 10 s");
    for (stream, kinds) in answered.into_iter().filter(|(s, _)| *s != 1) {
        assert!(kinds.len() >= 3, "stream {stream}: {kinds:?}");
        // Nothing entered in the table: each header never indexed, or named by an entry
        // already there (`:status` 200 is HPACK's static entry 8; a header the plain
        // response left in the table is referred to, not entered again).
        assert_eq!(kinds[0], "indexed", "stream {stream}: {kinds:?}");
        assert!(
            kinds
                .iter()
                .all(|k| *k == "never indexed" || *k == "indexed"),
            "stream {stream}: {kinds:?}"
        );
        assert!(
            kinds.iter().filter(|k| **k == "never indexed").count() >= 2,
            "stream {stream}: {kinds:?}"
        );
    }
}

/// The kinds of the representations in an HPACK header block (RFC 7541 §6), in order.
fn hpack_representations(block: &[u8]) -> Vec<&'static str> {
    // An integer with an n-bit prefix (§5.1), from `at`; returns it and where it ends.
    fn integer(block: &[u8], at: usize, bits: u32) -> (usize, usize) {
        let max = (1usize << bits) - 1;
        let mut value = block[at] as usize & max;
        let mut i = at + 1;
        if value == max {
            let mut shift = 0;
            loop {
                let b = block[i];
                value += ((b & 0x7f) as usize) << shift;
                shift += 7;
                i += 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
        }
        (value, i)
    }
    // A string literal (§5.2) from `at`: where it ends.
    let string = |at: usize| {
        let (len, start) = integer(block, at, 7);
        start + len
    };
    let mut kinds = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let b = block[at];
        let (kind, bits) = match b {
            _ if b & 0x80 != 0 => ("indexed", 7),
            _ if b & 0xc0 == 0x40 => ("incremental indexing", 6),
            _ if b & 0xe0 == 0x20 => ("table size update", 5),
            _ if b & 0xf0 == 0x10 => ("never indexed", 4),
            _ => ("without indexing", 4),
        };
        let (name, next) = integer(block, at, bits);
        at = next;
        if matches!(
            kind,
            "incremental indexing" | "never indexed" | "without indexing"
        ) {
            if name == 0 {
                at = string(at);
            }
            at = string(at);
        }
        kinds.push(kind);
    }
    kinds
}

/// A publish of the largest body `--max-body` allows (the default, 1 MiB) is read whole over
/// HTTP/2, through sixteen of its stream's 64 KiB windows, and reaches a subscriber whole; a
/// byte more is refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_largest_publish_is_read_whole_over_http2() {
    let cert = make_cert(&temp_dir("h2-publish"));
    let hub = cert.hub(&[]);
    let mut subscriber = hub.subscribe("topic=w", &[]).await;
    let tls = tls_connect(&hub, &cert.der, &[b"h2"]).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let auth = format!("Bearer {}", hub.publisher_token());
    let max_body = 1024 * 1024;
    let form = |len: usize| {
        let fields = "topic=w&data=";
        format!("{fields}{}", numbered(len - fields.len()))
    };
    let publish = |body: String| {
        let mut sender = sender.clone();
        let req = Request::post(hub.url("/.well-known/mercure"))
            .header("authorization", &auth)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        async move { sender.send_request(req).await.unwrap().status() }
    };
    let largest = form(max_body);
    assert_eq!(publish(largest.clone()).await, StatusCode::OK);
    assert_eq!(
        publish(form(max_body + 1)).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let got = common::take(&mut subscriber, 1, Duration::from_secs(10)).await;
    assert!(
        got[0].data == largest["topic=w&data=".len()..],
        "the 1 MiB publish whole"
    );
}

/// Data no two records of a large update share: a cut or a reordering shows.
fn numbered(len: usize) -> String {
    let mut s = String::with_capacity(len + 8);
    let mut i = 0u32;
    while s.len() < len {
        s.push_str(&format!("{i:07}."));
        i += 1;
    }
    s.truncate(len);
    s
}

/// A TLS connection keeps no buffer while idle (issue 26): subscribers over HTTP/1.1 and
/// HTTP/2 that have waited with nothing to read still get an update of 100 KB (seven records)
/// whole, and a publish whose body spans many records and reads is read whole.
#[tokio::test(flavor = "multi_thread")]
async fn idle_tls_subscribers_get_large_updates_and_large_publishes_are_read_whole() {
    let cert = make_cert(&temp_dir("large"));
    let hub = cert.hub(&[]);
    let mut h1 = hub.subscribe("topic=big", &[]).await;
    let tls = tls_connect(&hub, &cert.der, &[b"h2"]).await;
    let h2 = h2_get(tls, hub.url("/.well-known/mercure?topic=big")).await;
    assert_eq!(h2.status(), StatusCode::OK);
    let mut h2 = h2.into_body();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    let mut p = hub.publisher().await;
    // Through the hub's own publish path, over the same kind of connection.
    let update = numbered(100_000);
    let publish = numbered(600_000);
    p.ok(&[("topic", "big"), ("data", &update)]).await;
    p.ok(&[("topic", "big"), ("data", &publish)]).await;
    let got = common::take(&mut h1, 2, Duration::from_secs(20)).await;
    assert!(got[0].data == update, "HTTP/1.1: the 100 KB update whole");
    assert!(got[1].data == publish, "HTTP/1.1: the 600 KB publish whole");
    let got = read_events(&mut h2, 2).await;
    assert!(got[0].data == update, "HTTP/2: the 100 KB update whole");
    assert!(got[1].data == publish, "HTTP/2: the 600 KB publish whole");
}

/// TLS 1.2 clients are served as TLS 1.3 ones are, over both protocols.
#[tokio::test(flavor = "multi_thread")]
async fn tls_1_2_clients_get_their_streams() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("tls12"));
    let hub = cert.hub(&[]);
    let tls12 = &[&rustls::version::TLS12];
    let mut h1 = tls_connect_with(&hub, &cert.der, &[b"http/1.1"], tls12).await;
    assert_eq!(
        h1.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    h1.write_all(b"GET /.well-known/mercure?topic=v HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let h2 = tls_connect_with(&hub, &cert.der, &[b"h2"], tls12).await;
    let mut h2 = h2_get(h2, hub.url("/.well-known/mercure?topic=v"))
        .await
        .into_body();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    let update = numbered(40_000);
    hub.publisher()
        .await
        .ok(&[("topic", "v"), ("data", &update)])
        .await;
    assert!(
        read_events(&mut h2, 1).await[0].data == update,
        "HTTP/2 over TLS 1.2"
    );
    // HTTP/1.1: the chunked body, read until the update's end.
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let tail = update.as_bytes()[update.len() - 40..].to_vec();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !wire.windows(tail.len()).any(|w| w == tail) {
            let n = h1.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended early");
            wire.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the update over HTTP/1.1 and TLS 1.2 in time");
}

/// A client that starts a TLS record (or claims one larger than TLS allows) and then sends no
/// more is closed: by the handshake's deadline for a record that could still come whole, at
/// once for one that never could. What it did send is all the server keeps meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_tls_record_that_never_ends_is_closed_by_the_handshake_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("unfinished"));
    let hub = cert.hub(&["--idle-timeout", "2s"]);
    // A handshake record header claiming 16 KiB (the most allowed), then 1 KiB of it; and one
    // claiming 64 KiB.
    for claimed in [0x4000u16, 0xffff] {
        let mut tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&claimed.to_be_bytes());
        record.resize(5 + 1024, 0);
        tcp.write_all(&record).await.unwrap();
        let mut buf = [0u8; 1024];
        let mut first = None;
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        first.get_or_insert(buf[0]);
                    }
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a record claiming {claimed} bytes: closed");
        if claimed == 0xffff {
            // Refused, not waited for: the server says why in an alert record.
            assert_eq!(first, Some(0x15), "an alert for a record TLS cannot have");
        } else {
            assert_eq!(first, None, "nothing to say to a record still arriving");
        }
    }
}

/// [`tls_connect`] with a second handle on the TCP connection under the TLS, to write bytes
/// that are no part of the client's records.
async fn tls_connect_with_raw(
    hub: &TestHub,
    trust: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    std::net::TcpStream,
) {
    let tcp = tokio::net::TcpStream::connect(hub.addr)
        .await
        .unwrap()
        .into_std()
        .unwrap();
    // Shares the socket's non-blocking mode: fine for the few bytes a test writes with it.
    let raw = tcp.try_clone().unwrap();
    let config = client_config(trust, alpn, rustls::DEFAULT_VERSIONS);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            ServerName::try_from("127.0.0.1").unwrap(),
            tokio::net::TcpStream::from_std(tcp).unwrap(),
        )
        .await
        .unwrap();
    (tls, raw)
}

/// After the handshake a client can make the hub keep one unfinished record at most, and not
/// for long: subscribers over HTTP/1.1 and HTTP/2 that send the first 3 bytes of a record and
/// no more are closed once it has been unfinished for the head deadline (`--idle-timeout`); one
/// whose record header announces more than a TLS record may hold is closed at once (the log
/// says so, not the deadline). A subscriber that behaves, on the same hub, keeps its stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_left_unfinished_after_the_handshake_closes_the_connection() {
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("stalled-record"));
    let hub = cert.hub(&["--idle-timeout", "2s"]);
    let mut good = hub.subscribe("topic=r", &[]).await;
    let get = b"GET /.well-known/mercure?topic=r HTTP/1.1\r\nHost: x\r\n\r\n";
    let (mut stalled_h1, mut stalled_h1_raw) =
        tls_connect_with_raw(&hub, &cert.der, &[b"http/1.1"]).await;
    stalled_h1.write_all(get).await.unwrap();
    let (oversized, mut oversized_raw) =
        tls_connect_with_raw(&hub, &cert.der, &[b"http/1.1"]).await;
    let mut oversized = oversized;
    oversized.write_all(get).await.unwrap();
    let (stalled_h2, mut stalled_h2_raw) = tls_connect_with_raw(&hub, &cert.der, &[b"h2"]).await;
    let peers = [&stalled_h1_raw, &oversized_raw, &stalled_h2_raw].map(|t| t.local_addr().unwrap());
    let mut stalled_h2 = h2_get(stalled_h2, hub.url("/.well-known/mercure?topic=r"))
        .await
        .into_body();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 4.0,
        Duration::from_secs(10),
    )
    .await;
    // An application data record's type and version, and no length yet.
    stalled_h1_raw.write_all(&[0x17, 0x03, 0x03]).unwrap();
    stalled_h2_raw.write_all(&[0x17, 0x03, 0x03]).unwrap();
    // A header announcing 2^14 + 512 bytes, which rustls would wait for, and a little of them.
    let mut header = vec![0x17, 0x03, 0x03, 0x42, 0x00];
    header.resize(100, 0);
    oversized_raw.write_all(&header).unwrap();
    let within = Duration::from_secs(15);
    for (name, tls) in [("HTTP/1.1", &mut stalled_h1), ("oversized", &mut oversized)] {
        let mut buf = vec![0u8; 1 << 16];
        let closed = tokio::time::timeout(within, async {
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{name}: closed");
    }
    let closed = tokio::time::timeout(within, async {
        while let Some(Ok(_)) = stalled_h2.frame().await {}
    })
    .await;
    assert!(closed.is_ok(), "HTTP/2: closed");
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v == 1.0,
        Duration::from_secs(10),
    )
    .await;
    let logs = hub.logs();
    let reason = |peer: std::net::SocketAddr, why: &str| {
        let peer = format!("peer={peer}");
        logs.iter().any(|l| l.contains(&peer) && l.contains(why))
    };
    for peer in [peers[0], peers[2]] {
        assert!(
            reason(peer, "a record unfinished for 2s"),
            "{peer}: {logs:#?}"
        );
    }
    assert!(
        reason(peers[1], "a record larger than 16645 bytes"),
        "{}: {logs:#?}",
        peers[1]
    );
    hub.publisher()
        .await
        .ok(&[("topic", "r"), ("data", "still here")])
        .await;
    let got = common::take(&mut good, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].data, "still here");
}

/// The start of a handshake message in one record, then a record of no TLS type: the server
/// refuses with an alert. rustls keeps its place in the bytes of the unfinished message, so the
/// alert must be made with them at hand (made without them, the connection's task panicked).
#[tokio::test(flavor = "multi_thread")]
async fn a_bad_record_after_part_of_a_handshake_message_gets_an_alert_not_a_panic() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("badtype"));
    let hub = cert.process(&[]);
    let mut tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    // A handshake record carrying the first 4 of the 260 bytes a ClientHello header announces.
    tcp.write_all(&[
        0x16, 0x03, 0x01, 0x00, 0x08, 0x01, 0x00, 0x01, 0x00, 0x03, 0x03, 0x00, 0x00,
    ])
    .await
    .unwrap();
    // Read by the server on its own before the next record comes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tcp.write_all(&[0xff, 0x03, 0x03, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut got)).await;
    assert!(closed.is_ok(), "closed");
    assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
    // The hub is still serving, and no task of it panicked.
    let _tls = tls_connect(&hub, &cert.der, &[b"http/1.1"]).await;
    let logs = hub.logs();
    assert!(logs.iter().all(|l| !l.contains("panicked")), "{logs:#?}");
}

/// A client whose records are cut at 64 bytes (every handshake message spread over several)
/// subscribes, asks for new keys mid-stream (the server answers with its own on its next
/// write) and gets a large update whole.
#[tokio::test(flavor = "multi_thread")]
async fn handshake_messages_in_pieces_and_key_updates_keep_a_stream_going() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("fragments"));
    let hub = cert.process(&[]);
    let mut config = client_config(&cert.der, &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    config.max_fragment_size = Some(64);
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("a handshake in 64-byte records");
    tls.write_all(b"GET /.well-known/mercure?topic=k HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    tls.get_mut()
        .1
        .refresh_traffic_keys()
        .expect("a key update");
    tls.flush().await.unwrap();
    let update = numbered(40_000);
    hub.publisher()
        .await
        .ok(&[("topic", "k"), ("data", &update)])
        .await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = tls.read(&mut buf).await.expect("the stream goes on");
            assert!(n > 0, "the stream ended");
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).contains(&update[update.len() - 100..]) {
                break;
            }
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "the update arrived whole after the key update"
    );
    let logs = hub.logs();
    assert!(logs.iter().all(|l| !l.contains("panicked")), "{logs:#?}");
}

/// The body of an HTTP/1.1 chunked response, `raw` being all of it from the head on.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let mut body = Vec::new();
    while let Some(eol) = raw[at..].windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[at..at + eol]).unwrap();
        let size = usize::from_str_radix(size, 16).unwrap();
        at += eol + 2;
        if size == 0 || at + size > raw.len() {
            break;
        }
        body.extend_from_slice(&raw[at..at + size]);
        at += size + 2;
    }
    body
}

/// A TLS subscriber whose socket takes little at a time (a small receive buffer, read 2 KiB
/// at a time with pauses between) while 120 updates of 40 KB are published gets every byte
/// intact and in order. The 4.8 MB are more than the kernel buffers for the hub's socket: its
/// writes are cut short by a full socket, and go on where they stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_reading_tls_subscriber_gets_every_byte_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("slow-reader"));
    let hub = cert.hub(&[]);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(hub.addr).await.unwrap();
    let config = client_config(&cert.der, &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /.well-known/mercure?topic=p HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    let updates: Vec<String> = (0..120)
        .map(|i| format!("{i:03}:{}:{i:03}", numbered(40_000)))
        .collect();
    let mut p = hub.publisher().await;
    let published = updates.clone();
    tokio::spawn(async move {
        for update in &published {
            p.ok(&[("topic", "p"), ("data", update)]).await;
        }
    });
    let mut wire = Vec::new();
    let mut buf = [0u8; 2048];
    // The last update's end, the event's and its chunk's.
    let last = updates[119].as_bytes();
    let tail = [&last[last.len() - 64..], b"\n\n\r\n"].concat();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        while !wire[wire.len().saturating_sub(64 * 1024)..]
            .windows(tail.len())
            .any(|w| w == tail.as_slice())
        {
            let n = tls.read(&mut buf).await.expect("the stream goes on");
            assert!(n > 0, "the stream ended");
            wire.extend_from_slice(&buf[..n]);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(read.is_ok(), "the last update in time");
    let mut events = Vec::new();
    Parser::new().feed(&dechunk(&wire), &mut events).unwrap();
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data.len(), updates.len(), "every update, once");
    for (i, (got, sent)) in data.iter().zip(&updates).enumerate() {
        assert!(got == sent, "update {i} intact");
    }
}

/// Puts a pipe between an HTTP/2 client and `tls`, and reads `tls` to its end whatever the
/// client does (it may stop reading once it has what it wanted): the task returned says how
/// reading ended, at an end of input or with an error.
fn relay(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (
    tokio::io::DuplexStream,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, relayed) = tokio::io::duplex(1 << 16);
    let (mut tls_in, mut tls_out) = tokio::io::split(tls);
    let (mut from_client, mut to_client) = tokio::io::split(relayed);
    tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut tls_out).await });
    let end = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match tls_in.read(&mut buf).await? {
                0 => return Ok(()),
                n => {
                    let _ = to_client.write_all(&buf[..n]).await;
                }
            }
        }
    });
    (client, end)
}

/// When the hub ends TLS streams (it is shutting down), its clients see a close_notify before
/// the end of TCP, over HTTP/1.1 and HTTP/2: a rustls client reads a clean end, not "peer
/// closed connection without sending TLS close_notify".
#[tokio::test(flavor = "multi_thread")]
async fn tls_streams_ended_by_the_hub_end_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = make_cert(&temp_dir("close-notify"));
    let mut hub = cert.process(&[]);
    let mut h1 = tls_connect(&hub, &cert.der, &[b"http/1.1"]).await;
    h1.write_all(b"GET /.well-known/mercure?topic=c HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (h2, h2_end) = relay(tls_connect(&hub, &cert.der, &[b"h2"]).await);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(hub.url("/.well-known/mercure?topic=c"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut h2_body = sender.send_request(req).await.unwrap().into_body();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 2.0,
        Duration::from_secs(10),
    )
    .await;
    hub.terminate();
    let within = Duration::from_secs(15);
    let mut buf = vec![0u8; 1 << 16];
    let h1_end = tokio::time::timeout(within, async {
        loop {
            match h1.read(&mut buf).await {
                Ok(0) => break Ok(()),
                Ok(_) => {}
                Err(e) => break Err(e),
            }
        }
    })
    .await
    .expect("the HTTP/1.1 stream ended");
    assert!(h1_end.is_ok(), "HTTP/1.1: a clean end, got {h1_end:?}");
    tokio::time::timeout(within, async {
        while let Some(Ok(_)) = h2_body.frame().await {}
    })
    .await
    .expect("the HTTP/2 stream ended");
    let h2_end = tokio::time::timeout(within, h2_end)
        .await
        .expect("the HTTP/2 connection ended")
        .unwrap();
    assert!(h2_end.is_ok(), "HTTP/2: a clean end, got {h2_end:?}");
    assert!(hub.wait_exit(within).is_some_and(|s| s.success()));
}

/// A publish whose body comes slowly in one large record (what a TLS library makes of one large
/// write) is not cut off by the deadline of unfinished records while its bytes keep coming: the
/// deadline starts again with each KiB. Here a 6 KB record arrives over ~3 s, against a 1 s
/// `--idle-timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upload_in_one_large_record_is_not_cut_off() {
    let cert = make_cert(&temp_dir("slow-upload"));
    let hub = cert.hub(&["--idle-timeout", "1s"]);
    let mut subscriber = hub.subscribe("topic=slow", &[]).await;
    let data = numbered(6000);
    let body = format!("topic=slow&data={data}");
    let request = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        hub.publisher_token(),
        body.len()
    );
    let config = Arc::new(client_config(
        &cert.der,
        &[b"http/1.1"],
        rustls::DEFAULT_VERSIONS,
    ));
    let addr = hub.addr;
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        // The head in one record, sent at once; the body in one record, sent 512 bytes every
        // quarter of a second.
        conn.writer().write_all(request.as_bytes()).unwrap();
        while conn.wants_write() {
            conn.write_tls(&mut tcp).unwrap();
        }
        conn.writer().write_all(body.as_bytes()).unwrap();
        let mut record = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut record).unwrap();
        }
        assert!(
            record.len() > 5 * 1024,
            "one large record: {}",
            record.len()
        );
        for piece in record.chunks(512) {
            tcp.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(250));
        }
        let mut answer = Vec::new();
        let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
        let _ = tls.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "answered: {answer:?}");
    let got = common::take(&mut subscriber, 1, Duration::from_secs(10)).await;
    assert!(got[0].data == data, "the update whole");
}

/// The HTTP/2 stream teardown over TLS (ALPN h2), not only h2c: a stream whose
/// client grants no window is reset 5 s after its lifetime, and the connection goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_http2_stream_over_tls_is_reset_alone() {
    let cert = make_cert(&temp_dir("stalled-h2"));
    let hub = cert.hub(&["--max-stream-lifetime", "2s"]);
    let tls = tls_connect(&hub, &cert.der, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut client = common::zero_window_h2(tls).await;
    let req = Request::get(format!("https://{}/.well-known/mercure?topic=t", hub.addr))
        .body(())
        .unwrap();
    let began = std::time::Instant::now();
    let (response, _) = client.send_request(req, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    common::h2_reset(response.into_body()).await;
    let took = began.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(12),
        "{took:?}"
    );
    // The connection still serves.
    let url = format!("https://{}/healthz", hub.addr);
    assert_eq!(common::h2_status(&client, url).await, 200);
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 0.0);
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"lifetime\"}")
            .await,
        1.0
    );
}

/// The hub's own HTTP/1.1 writer over TLS, its client stalled, gets no teardown
/// task after its end any more (Teardown::OwnWriter): its own last-writes deadline closes the
/// connection, 5 s after the end, not sooner.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_https_stream_the_hub_ends_is_closed_after_its_last_writes() {
    use tokio::io::AsyncWriteExt;
    let cert = make_cert(&temp_dir("stalled-end"));
    let hub = cert.hub(&["--max-stream-lifetime", "3s"]);
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(hub.addr).await.unwrap();
    let config = client_config(&cert.der, &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /.well-known/mercure?topic=e HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    let mut p = hub.publisher().await;
    let big = "e".repeat(60_000);
    for _ in 0..80 {
        p.ok(&[("topic", "e"), ("data", &big)]).await;
    }
    drop(p);
    hub.wait_metric(
        "ssehub_subscribers_dropped_total{reason=\"lifetime\"}",
        |v| v >= 1.0,
        Duration::from_secs(15),
    )
    .await;
    let ended = std::time::Instant::now();
    hub.wait_metric(
        "ssehub_connections_open",
        |v| v <= 1.0,
        Duration::from_secs(30),
    )
    .await;
    let took = ended.elapsed();
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
            .await,
        0.0,
        "ended, not dropped as slow"
    );
    assert!(
        took >= Duration::from_secs(3),
        "closed {took:?} after its end"
    );
    assert!(
        took < Duration::from_secs(12),
        "closed {took:?} after its end"
    );
    drop(tls);
}
