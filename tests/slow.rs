//! A subscriber that stops reading is dropped; nobody else notices, and memory stays bounded.

mod common;

use std::time::Duration;

use common::{take, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects with a tiny receive buffer, asks for the stream, and never reads.
async fn stalled_subscriber(hub: &TestHub, topic: &str) -> tokio::net::TcpStream {
    stalled_request(hub, topic, "\r\n").await
}

/// As [`stalled_subscriber`], with `rest` after the request's `Host` line: further header
/// lines, the blank line and a body, if any.
async fn stalled_request(hub: &TestHub, topic: &str, rest: &str) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(hub.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "GET /.well-known/mercure?topic={topic} HTTP/1.1\r\nHost: {}\r\n{rest}",
                hub.addr
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_subscriber_is_dropped_and_the_others_get_everything() {
    let hub = TestHub::start_process(&["--subscriber-queue", "200", "--history-size", "1000"]);
    let mut stalled = stalled_subscriber(&hub, "load").await;
    let mut others = Vec::new();
    for _ in 0..50 {
        others.push(hub.subscribe("topic=load", &[]).await);
    }
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 51.0,
        Duration::from_secs(10),
    )
    .await;
    let rss_before = hub.rss_kib();

    let payload = "x".repeat(4096);
    let mut p = hub.publisher().await;
    let readers: Vec<_> = others
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let events = take(&mut s, 5000, Duration::from_secs(180)).await;
                (events, s)
            })
        })
        .collect();
    let mut rss_peak = rss_before;
    for i in 0..5000 {
        let data = format!("{i} {payload}");
        p.ok(&[("topic", "load"), ("data", &data)]).await;
        if i % 250 == 0 {
            rss_peak = rss_peak.max(hub.rss_kib());
        }
    }
    let mut streams = Vec::new();
    for r in readers {
        let (events, stream) = r.await.unwrap();
        streams.push(stream);
        for (i, e) in events.iter().enumerate() {
            assert!(e.data.starts_with(&format!("{i} ")), "update {i} in order");
        }
    }
    rss_peak = rss_peak.max(hub.rss_kib());

    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
            .await,
        1.0
    );
    assert!(hub.wait_for_log("Dropped client: too slow", Duration::from_secs(5)));
    // The connection is really closed: reading what the kernel holds ends in EOF or a reset.
    let mut buf = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the stalled subscriber's connection is still open"
    );

    // History holds at most 1,000 updates of 4 KiB; everything else is transient. A hub that
    // buffered for the stalled client would grow by its 20 MB backlog and more.
    let growth_mib = rss_peak.saturating_sub(rss_before) / 1024;
    assert!(growth_mib < 64, "RSS grew by {growth_mib} MiB");
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 50.0);
}

/// A client that stops reading with the kernel's default buffers is noticed after a few
/// thousand small updates, not tens of thousands: the hub bounds each socket's send buffer,
/// which the kernel would otherwise grow to megabytes for it.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_stops_is_noticed_soon_even_with_small_updates() {
    let hub = TestHub::start(&["--subscriber-queue", "50"]);
    let mut idle = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    idle.write_all(b"GET /.well-known/mercure?topic=t HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut p = hub.publisher().await;
    let data = "y".repeat(100);
    let mut sent = 0;
    while hub
        .metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
        .await
        < 1.0
    {
        assert!(
            sent < 8_000,
            "a subscriber that never reads was still connected after {sent} updates of 100 bytes"
        );
        for _ in 0..250 {
            p.ok(&[("topic", "t"), ("data", &data)]).await;
        }
        sent += 250;
    }
    drop(idle);
}

/// A subscriber that catches up on a backlog is sent it a chunk at a time: the hub does not
/// make it a copy of its whole queue (which could be `--subscriber-queue` × `--max-body`).
#[tokio::test(flavor = "multi_thread")]
async fn a_backlog_is_sent_without_a_copy_of_it() {
    let hub = TestHub::start_process(&[]);
    // Not read until the backlog is there: the socket fills and updates queue up.
    let mut s = hub.subscribe("topic=big", &[]).await;
    let mut p = hub.publisher().await;
    let payload = "x".repeat(100_000);
    for i in 0..900 {
        p.ok(&[("topic", "big"), ("data", &format!("{i} {payload}"))])
            .await;
    }
    let rss_before = hub.rss_kib();
    let pid = hub.pid();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
                let rss: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap();
                peak = peak.max(rss);
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let events = take(&mut s, 900, Duration::from_secs(60)).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    for (i, e) in events.iter().enumerate() {
        assert!(e.data.starts_with(&format!("{i} ")), "update {i} in order");
        assert_eq!(e.data.len(), format!("{i} ").len() + payload.len());
    }
    // The 90 MB of updates are held once (history); a copy for the subscriber would add as
    // much again.
    let growth_mib = peak.saturating_sub(rss_before) / 1024;
    assert!(
        growth_mib < 30,
        "RSS grew by {growth_mib} MiB while the backlog was sent"
    );
}

/// The same for a stream hyper writes rather than the hub's own HTTP/1.1 writer (a subscribe
/// request with a body is one): the hub closes its connection 5 s after the stream's end, at its
/// lifetime or at its token's `exp`.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stream_hyper_writes_is_closed_after_its_last_writes() {
    let with_body = "Content-Length: 1\r\n\r\nA";
    let hub = TestHub::start(&["--max-stream-lifetime", "2s"]);
    let stalled = stalled_request(&hub, "hyper", with_body).await;
    closed_after_its_last_writes(&hub, "hyper", "lifetime").await;
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 0.0);
    drop(stalled);

    let hub = TestHub::start(&["--max-stream-lifetime", "1h"]);
    let subscribe = ["*".to_owned()];
    let token = hub
        .key
        .mint(None, Some(&subscribe), Some(Duration::from_secs(3)))
        .unwrap();
    let rest = format!("Authorization: Bearer {token}\r\n{with_body}");
    let stalled = stalled_request(&hub, "hyper", &rest).await;
    closed_after_its_last_writes(&hub, "hyper", "expired").await;
    assert_eq!(hub.metric("ssehub_subscribers_connected").await, 0.0);
    drop(stalled);
}

/// With a stalled subscriber to `topic` connected: sends it far more than the socket's buffers
/// hold, in far fewer updates than --subscriber-queue (1,000), so that a write is waiting on
/// the full socket when the hub ends the stream (for `reason`); then checks that its connection
/// is closed, and not before its last writes' 5 s.
async fn closed_after_its_last_writes(hub: &TestHub, topic: &str, reason: &str) {
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 1.0,
        Duration::from_secs(10),
    )
    .await;
    let mut p = hub.publisher().await;
    let big = "e".repeat(60_000);
    for _ in 0..60 {
        p.ok(&[("topic", topic), ("data", &big)]).await;
    }
    drop(p);
    hub.wait_metric(
        &format!("ssehub_subscribers_dropped_total{{reason=\"{reason}\"}}"),
        |v| v >= 1.0,
        Duration::from_secs(15),
    )
    .await;
    let ended = std::time::Instant::now();
    // Only the scrape's own connection is left once the stalled one is closed.
    hub.wait_metric(
        "ssehub_connections_open",
        |v| v <= 1.0,
        Duration::from_secs(30),
    )
    .await;
    let took = ended.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "{reason}: closed {took:?} after the stream ended: sooner than its last writes' 5 s"
    );
}

/// A stream the hub ends (here at `--max-stream-lifetime`) while its client has stopped
/// reading gets `LAST_WRITES` (5 s) to finish, then its connection is closed: a client cannot
/// keep a connection, and the socket buffers full of its updates, by never reading once its
/// stream is over (the hub no longer drops such a stream as slow).
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_stream_the_hub_ends_is_closed_after_its_last_writes() {
    let hub = TestHub::start(&["--max-stream-lifetime", "2s"]);
    let stalled = stalled_subscriber(&hub, "ending").await;
    closed_after_its_last_writes(&hub, "ending", "lifetime").await;
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"slow\"}")
            .await,
        0.0
    );
    drop(stalled);
}
