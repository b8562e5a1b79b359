//! SIGTERM: every stream ends cleanly and the process exits 0 within a few seconds.

mod common;

use std::time::{Duration, Instant};

use common::{take, TestHub};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_streams_and_exits_zero() {
    let mut hub = TestHub::start_process(&[]);
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(hub.subscribe("topic=a", &[]).await);
    }
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "a"), ("data", "before")]).await;
    for s in &mut streams {
        assert_eq!(take(s, 1, Duration::from_secs(5)).await[0].data, "before");
    }
    let started = Instant::now();
    hub.terminate();
    for s in &mut streams {
        let end = tokio::time::timeout(Duration::from_secs(5), s.next()).await;
        assert!(
            matches!(end, Ok(Ok(None))),
            "the stream ends cleanly: {end:?}"
        );
    }
    let status = hub
        .wait_exit(Duration::from_secs(5))
        .expect("exited within 5 s");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_stalled_client_still_exits() {
    let mut hub = TestHub::start_process(&[]);
    use tokio::io::AsyncWriteExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stalled = sock.connect(hub.addr).await.unwrap();
    stalled
        .write_all(b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut p = hub.publisher().await;
    let big = "y".repeat(60_000);
    for _ in 0..100 {
        p.ok(&[("topic", "a"), ("data", &big)]).await;
    }
    hub.terminate();
    let status = hub.wait_exit(Duration::from_secs(8)).expect("exited");
    assert_eq!(status.code(), Some(0));
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_without_tls_reloads_nothing_and_serves_on() {
    // Sent as soon as the hub says it listens: the handler is there by then.
    let hub = TestHub::start_process(&[]);
    hub.signal("HUP");
    assert!(hub.wait_for_log("nothing to reload", Duration::from_secs(5)));
    let mut s = hub.subscribe("topic=t", &[]).await;
    hub.signal("HUP");
    // The same process, the same stream.
    hub.publisher()
        .await
        .ok(&[("topic", "t"), ("data", "still here")])
        .await;
    assert_eq!(
        take(&mut s, 1, Duration::from_secs(5)).await[0].data,
        "still here"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_for_connections_without_a_whole_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hub = TestHub::start_process(&[]);
    let silent = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Could still be HTTP/2's preface.
    let mut preface = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    preface.write_all(b"PRI").await.unwrap();
    // Accepted in order: once this is answered, the three are being served.
    assert_eq!(common::get(&hub, "/healthz", &[]).await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let started = Instant::now();
    hub.terminate();
    let status = hub
        .wait_exit(Duration::from_millis(2500))
        .expect("exited well before the 4 s drain timeout");
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_millis(2500));
    for mut c in [silent, partial, preface] {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
}
