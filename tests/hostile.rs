//! Hostile and broken clients. Each case runs against a real hub with a well-behaved
//! subscriber connected throughout, which must receive every update; the hub's memory must
//! come back within a bound.

mod common;

use std::time::Duration;

use common::{take, TestHub};
use http::StatusCode;
use ssehub::client::EventStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A subscriber that must see every update published during the case.
struct Witness {
    stream: EventStream,
    expected: usize,
}

impl Witness {
    async fn new(hub: &TestHub) -> Witness {
        Witness {
            stream: hub.subscribe("topic=witness", &[]).await,
            expected: 0,
        }
    }

    /// Publishes one update to the witness and checks it arrives.
    async fn check(&mut self, hub: &TestHub, label: &str) {
        let data = format!("{label} {}", self.expected);
        hub.publisher()
            .await
            .ok(&[("topic", "witness"), ("data", &data)])
            .await;
        let got = take(&mut self.stream, 1, Duration::from_secs(20)).await;
        assert_eq!(got[0].data, data, "{label}");
        self.expected += 1;
    }
}

/// Reads until EOF or error; true if that happened within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 65536];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends raw bytes and returns the status line's code (0 if the connection closed first).
async fn raw_status(hub: &TestHub, request: &[u8]) -> u16 {
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_loris_silent_and_half_closed_connections() {
    // The head deadline is 10 s by default: the same closing, sooner.
    let hub = TestHub::start_process(&["--idle-timeout", "2s"]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();

    // Headers dribbled one byte at a time, never finished; and a connection that says nothing.
    let mut loris = TcpStream::connect(hub.addr).await.unwrap();
    let mut silent = TcpStream::connect(hub.addr).await.unwrap();
    let dribble = tokio::spawn(async move {
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: ".iter().cycle().take(40) {
            if loris.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        loris
    });
    w.check(&hub, "during slow-loris").await;
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "a connection that never sends a request head is closed"
    );
    let mut loris = dribble.await.unwrap();
    assert!(
        closed_within(&mut loris, Duration::from_secs(5)).await,
        "slow-loris closed"
    );

    // A client that half-closes after its request is taken as gone: its stream is ended and
    // the hub forgets it, so half-open connections do not pile up.
    let mut half = TcpStream::connect(hub.addr).await.unwrap();
    half.write_all(b"GET /.well-known/mercure?topic=witness HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    half.shutdown().await.unwrap();
    assert!(
        closed_within(&mut half, Duration::from_secs(10)).await,
        "half-closed client let go"
    );
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v <= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 1.0);
    w.check(&hub, "after the half-closed client").await;
    assert!(hub.rss_kib() < rss_before + 32 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_connections_that_never_read() {
    let hub = TestHub::start_process(&["--subscriber-queue", "50", "--history-size", "100"]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(hub.addr).await.unwrap();
        s.write_all(b"GET /.well-known/mercure?topic=flood HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    let mut p = hub.publisher().await;
    let payload = "z".repeat(2048);
    for i in 0..600 {
        p.ok(&[("topic", "flood"), ("data", &payload)]).await;
        if i % 100 == 0 {
            w.check(&hub, "while the flood is published").await;
        }
    }
    // Each was accepted, and is either still connected (the kernel holds its backlog) or was
    // dropped for lagging more than 50 updates behind: none is lost track of.
    let dropped = hub
        .metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
        .await;
    let connected = hub.metric("ssehub_subscribers_connected").await;
    assert_eq!(
        connected + dropped,
        1001.0,
        "{connected} connected, {dropped} dropped"
    );
    w.check(&hub, "after the flood").await;
    let growth = hub.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(growth < 96, "RSS grew by {growth} MiB");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_and_endless_bodies() {
    // The body deadline is 30 s by default: the same 408, sooner.
    let hub = TestHub::start_process(&["--body-timeout", "2s"]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();
    let token = hub.publisher_token();

    // 100 MB announced and sent as fast as the hub takes it: refused with 413 without
    // reading it all.
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    let head = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100000000\r\n\r\ntopic=a&data="
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut r, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), r.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));
    drop(r);
    writer.abort();
    w.check(&hub, "after 100 MB").await;

    // A body that never ends: 408 once the body deadline passes, and the hub serves meanwhile.
    let endless = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\ntopic=a"
    );
    let stalled = tokio::spawn({
        let hub_addr = hub.addr;
        async move {
            let mut s = TcpStream::connect(hub_addr).await.unwrap();
            s.write_all(endless.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
                .await
                .expect("answered")
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    });
    w.check(&hub, "while a body never ends").await;
    let answer = stalled.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    w.check(&hub, "after the endless body").await;
    assert!(hub.rss_kib() < rss_before + 32 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_lists_selectors_and_bad_bytes() {
    let hub = TestHub::start(&[]);
    let mut w = Witness::new(&hub).await;
    let token = hub.publisher_token();
    let post = |body: Vec<u8>| {
        let mut req = format!(
            "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend(body);
        req
    };
    let topics = (0..10_000)
        .map(|i| format!("topic=t{i}"))
        .collect::<Vec<_>>()
        .join("&");
    // Over the publish limits: 413 (Mercure 1.0 §4; 0.x answered 400).
    assert_eq!(
        raw_status(&hub, &post(topics.clone().into_bytes())).await,
        413
    );
    let get = format!("GET /.well-known/mercure?{topics} HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(
        raw_status(&hub, get.as_bytes()).await,
        400 | 414 | 431
    ));
    w.check(&hub, "after 10,000 topics").await;

    // A 1 MB selector: too large for a request head, and refused in a body.
    let big = "s".repeat(1 << 20);
    let get = format!("GET /.well-known/mercure?topic={big} HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(matches!(raw_status(&hub, get.as_bytes()).await, 414 | 431));
    // In a body: just under --max-body, far over the topic length limit.
    let body_big = "s".repeat(900_000);
    let status = raw_status(&hub, &post(format!("topic={body_big}").into_bytes())).await;
    assert_eq!(status, 413);
    w.check(&hub, "after a 1 MB selector").await;

    // Templates cost memory and a test on every publish: a subscription holds at most 64
    // expressions. A pathological one at the limit, matched on every publish.
    let query = |repeat: usize| {
        let template = "{a}{+b}{/c*}{?d,e}{&f}{#g}".repeat(repeat);
        format!(
            "topic={}",
            ssehub::client::encode_form(&[("", &template)]).trim_start_matches('=')
        )
    };
    match hub.try_subscribe(&query(11), &[]).await {
        Err(ssehub::client::ClientError::Refused { status, reason }) => {
            assert_eq!(status, 400);
            assert!(reason.contains("URI template"), "{reason}");
        }
        _ => panic!("66 template expressions accepted"),
    }
    let mut patho = hub.subscribe(&query(10), &[]).await;
    for _ in 0..20 {
        hub.publisher()
            .await
            .ok(&[("topic", &"x/".repeat(2000)), ("data", "probe")])
            .await;
    }
    w.check(&hub, "after a pathological template").await;
    let _ = tokio::time::timeout(Duration::from_millis(50), patho.next()).await;

    // Invalid UTF-8 and NUL in every field.
    for field in ["topic", "data", "id", "type", "retry"] {
        let body = format!("topic=a&{field}=%C3%28");
        assert_eq!(
            raw_status(&hub, &post(body.into_bytes())).await,
            400,
            "{field}"
        );
        let mut body = b"topic=a&".to_vec();
        body.extend(field.as_bytes());
        body.extend(b"=\xff\xfe");
        assert_eq!(raw_status(&hub, &post(body)).await, 400, "raw {field}");
    }
    for field in ["id", "type"] {
        let body = format!("topic=a&{field}=a%00b");
        assert_eq!(
            raw_status(&hub, &post(body.into_bytes())).await,
            400,
            "NUL in {field}"
        );
    }
    let bad_query = b"GET /.well-known/mercure?topic=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n";
    assert!(matches!(raw_status(&hub, bad_query).await, 400));
    let bad_header =
        b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xff\xfe\r\n\r\n";
    assert_eq!(raw_status(&hub, bad_header).await, 400);
    w.check(&hub, "after bad bytes").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_two_thousand_connections() {
    let hub = TestHub::start_process(&[]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();
    let tasks: Vec<_> = (0..2000)
        .map(|_| {
            let target = hub.target("/.well-known/mercure?topic=burst");
            tokio::spawn(async move { EventStream::open(&target, &Default::default()).await })
        })
        .collect();
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await.unwrap().expect("every subscriber accepted"));
    }
    w.check(&hub, "during the burst").await;
    hub.publisher()
        .await
        .ok(&[("topic", "burst"), ("data", "all")])
        .await;
    for s in &mut streams {
        assert_eq!(take(s, 1, Duration::from_secs(30)).await[0].data, "all");
    }
    drop(streams);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 1.0);
    w.check(&hub, "after the burst").await;
    let growth = hub.rss_kib().saturating_sub(rss_before) / 1024;
    assert!(growth < 96, "RSS grew by {growth} MiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_rapid_reset() {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let hub = TestHub::start_process(&[]);
    let mut w = Witness::new(&hub).await;
    let rss_before = hub.rss_kib();
    let tcp = TcpStream::connect(hub.addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Open streams and cancel each at once (dropping the request resets the stream).
    for _ in 0..5000 {
        let mut s = sender.clone();
        let req = http::Request::get(format!("http://{}/.well-known/mercure?topic=rr", hub.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let fut = tokio::spawn(async move { s.send_request(req).await });
        tokio::task::yield_now().await;
        fut.abort();
    }
    drop(sender);
    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
    w.check(&hub, "after rapid reset").await;
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v <= 1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        hub.metric("ssehub_subscribers_connected").await,
        1.0,
        "no stream leaked"
    );
    let (status, _) = common::get(&hub, "/healthz", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(hub.rss_kib() < rss_before + 64 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_header_lines_get_no_second_head_deadline() {
    // A head deadline of 4 s (10 s by default), and the rest of the head sent at 2.5 s: a
    // deadline started again from there would end at 6.5 s.
    let deadline = Duration::from_secs(4);
    let hub = TestHub::start(&["--idle-timeout", "4s"]);
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // More header lines than the hub's own path parses, and the head never ends.
    let lines: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
    c.write_all(lines.as_bytes()).await.unwrap();
    assert!(
        closed_within(&mut c, Duration::from_secs(20)).await,
        "closed at all"
    );
    // The head deadline runs from the connection's start, not again from the lines.
    let took = started.elapsed();
    assert!(
        took >= deadline && took < deadline + Duration::from_millis(1500),
        "closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preface_in_pieces_is_still_told_apart() {
    let hub = TestHub::start(&[]);
    // An HTTP/1.1 publish whose first byte could begin HTTP/2's preface, sent apart.
    let token = hub.publisher_token();
    let body = "topic=p&data=split";
    let publish = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    c.write_all(&publish.as_bytes()[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(&publish.as_bytes()[1..]).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(hub.metric("ssehub_plain_publishes_total").await, 1.0);

    // HTTP/2's preface in three pieces, then an empty SETTINGS frame: the hub speaks HTTP/2
    // and acknowledges it (the bytes read to tell the protocol reach hyper's HTTP/2).
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    for piece in [
        &b"PRI"[..],
        b" * HTTP/2.0\r\n\r\nSM",
        b"\r\n\r\n\0\0\0\x04\0\0\0\0\0",
    ] {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 1024];
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {raw:?}");
            raw.extend_from_slice(&buf[..n]);
            // Frames: 3 bytes of length, type, flags, 4 bytes of stream id, payload.
            let mut at = 0;
            while at + 9 <= raw.len() {
                let len = u32::from_be_bytes([0, raw[at], raw[at + 1], raw[at + 2]]) as usize;
                if raw[at + 3] == 4 && raw[at + 4] & 1 == 1 {
                    return;
                }
                assert_ne!(raw[at + 3], 7, "GOAWAY: {raw:?}");
                at += 9 + len;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no SETTINGS acknowledgement: {raw:?}");
}

/// Context switches of all the hub's threads so far (Linux).
fn context_switches(hub: &TestHub) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", hub.pid())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter_map(|l| l.split_once("ctxt_switches:"))
                .filter_map(|(_, n)| n.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_preface_does_not_wake_the_hub() {
    let hub = TestHub::start_process(&[]);
    let idle = async {
        let before = context_switches(&hub);
        tokio::time::sleep(Duration::from_secs(1)).await;
        context_switches(&hub) - before
    };
    let alone = idle.await;
    // 50 clients that send what could begin HTTP/2's preface, then nothing: the hub waits
    // for their next bytes without looking again and again (1,300 wake-ups a second, when
    // it peeked every 5 ms).
    let mut quiet = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        c.write_all(b"PRI").await.unwrap();
        quiet.push(c);
    }
    assert_eq!(common::get(&hub, "/healthz", &[]).await.0, StatusCode::OK);
    let before = context_switches(&hub);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_quiet = context_switches(&hub) - before;
    assert!(
        with_quiet < alone + 100,
        "{with_quiet} context switches in a second with 50 quiet clients, {alone} without"
    );
}
