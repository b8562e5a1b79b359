//! The hub's own HTTP/1.1 path for publishes (`src/server/h1/publish.rs`), over raw TCP: keep-alive
//! and pipelined publishes answered in order, bodies arriving in pieces or not at all, and
//! the hand-over to hyper for the requests it does not take.

mod common;

use std::time::Duration;

use common::{read_until, take, take_data, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A publish of `data` to `topic`, with `extra` header lines (each ending in CRLF).
fn publish(hub: &TestHub, topic: &str, data: &str, extra: &str) -> String {
    let body = format!("topic={topic}&data={data}");
    format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        hub.publisher_token(),
        body.len()
    )
}

/// The responses in `raw`, each as (head in lower case, body), read by their content-length.
fn responses(raw: &[u8]) -> Vec<(String, String)> {
    let mut text = String::from_utf8_lossy(raw).into_owned();
    let mut out = Vec::new();
    while let Some((head, rest)) = text.split_once("\r\n\r\n") {
        let head = head.to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap_or_else(|| panic!("no content-length in {head}"))
            .parse()
            .unwrap();
        assert!(rest.len() >= len, "a whole body after {head}");
        out.push((head, rest[..len].to_owned()));
        text = rest[len..].to_owned();
    }
    out
}

/// Reads an answer until `needle` has come, and checks that it begins with `status`.
async fn expect_answer(c: &mut TcpStream, needle: &str, status: &str) {
    let mut raw = Vec::new();
    read_until(c, &mut raw, needle).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with(status), "{text:?}");
}

/// Reads until the hub closes the connection, expecting exactly one answer before that.
async fn last_answer(c: &mut TcpStream) -> Vec<(String, String)> {
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut raw))
        .await
        .expect("the hub answers and closes the connection")
        .unwrap();
    let answers = responses(&raw);
    assert_eq!(answers.len(), 1, "{:?}", String::from_utf8_lossy(&raw));
    answers
}

/// Reads from `c` until `raw` holds `n` whole answers.
async fn answers(c: &mut TcpStream, raw: &mut Vec<u8>, n: usize) -> Vec<(String, String)> {
    while responses(raw).len() < n {
        let mut buf = [0u8; 4096];
        let got = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{n} answers; got {:?}", String::from_utf8_lossy(raw)))
            .unwrap();
        assert!(got > 0, "closed after {:?}", String::from_utf8_lossy(raw));
        raw.extend_from_slice(&buf[..got]);
    }
    responses(raw)
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_publishes_are_answered_in_order_on_one_connection() {
    let hub = TestHub::start(&[]);
    let mut sub = hub.subscribe("topic=p", &[]).await;
    let mut c = TcpStream::connect(hub.addr).await.unwrap();

    // Three whole publishes in one write: the hub's own path answers each, in order.
    let three: String = ["one", "two", "three"]
        .iter()
        .map(|d| publish(&hub, "p", d, ""))
        .collect();
    c.write_all(three.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let answered = answers(&mut c, &mut raw, 3).await;
    assert_eq!(answered.len(), 3, "{:?}", String::from_utf8_lossy(&raw));
    for (head, body) in &answered {
        assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert!(body.starts_with("urn:uuid:"), "{body:?}");
    }
    assert_eq!(hub.metric("ssehub_plain_publishes_total").await, 3.0);
    let events = take(&mut sub, 3, Duration::from_secs(10)).await;
    let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
    assert_eq!(data, ["one", "two", "three"]);
    let ids: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    let bodies: Vec<_> = answered.iter().map(|(_, b)| b.trim().to_owned()).collect();
    assert_eq!(ids, bodies, "each answer is its own update's id");

    // A body that comes after its head (hyper's path takes it over, with what was read), then
    // a publish asking to close: the answer says so, then the hub closes.
    let fourth = publish(&hub, "p", "four", "");
    let (early, late) = fourth.split_at(fourth.len() - 3);
    c.write_all(early.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.write_all(late.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let answered = answers(&mut c, &mut raw, 1).await;
    assert!(
        answered[0].0.starts_with("http/1.1 200 ok\r\n"),
        "{}",
        answered[0].0
    );
    c.write_all(publish(&hub, "p", "five", "Connection: close\r\n").as_bytes())
        .await
        .unwrap();
    let last = last_answer(&mut c).await;
    assert!(
        last[0].0.starts_with("http/1.1 200 ok\r\n"),
        "{}",
        last[0].0
    );
    assert!(last[0].0.contains("connection: close"), "{}", last[0].0);
    assert_eq!(take_data(&mut sub, 2).await, ["four", "five"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_publisher_connection_does_not_hold_up_shutdown() {
    let mut hub = TestHub::start_process(&[]);
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(publish(&hub, "s", "before", "").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    answers(&mut c, &mut raw, 1).await;
    assert_eq!(hub.metric("ssehub_plain_publishes_total").await, 1.0);
    hub.terminate();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed at shutdown, before the drain timeout")
        .unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    let status = hub
        .wait_exit(Duration::from_secs(10))
        .expect("the hub exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_cut_short_is_refused_and_nothing_is_published() {
    let hub = TestHub::start(&[]);
    let mut sub = hub.subscribe("topic=q", &[]).await;
    let whole = publish(&hub, "q", "never-whole", "");
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(&whole.as_bytes()[..whole.len() - 4])
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    let answers = last_answer(&mut c).await;
    assert!(answers[0].0.starts_with("http/1.1 400"), "{}", answers[0].0);
    assert!(
        answers[0].1.contains("could not be read"),
        "{:?}",
        answers[0].1
    );
    // The next publish is the first the subscriber sees.
    hub.publisher()
        .await
        .ok(&[("topic", "q"), ("data", "whole")])
        .await;
    assert_eq!(
        take(&mut sub, 1, Duration::from_secs(10)).await[0].data,
        "whole"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_this_path_does_not_take_go_to_hyper_on_the_same_connection() {
    let hub = TestHub::start(&["--max-body", "1KiB"]);
    let mut sub = hub.subscribe("topic=r", &[]).await;
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    let mut raw = Vec::new();
    c.write_all(publish(&hub, "r", "plain", "").as_bytes())
        .await
        .unwrap();
    read_until(&mut c, &mut raw, "urn:uuid:").await;

    // A chunked body is hyper's: the connection is handed over and the publish still works.
    let body = "topic=r&data=chunked";
    let chunked = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        hub.publisher_token(),
        body.len()
    );
    c.write_all(chunked.as_bytes()).await.unwrap();
    expect_answer(&mut c, "urn:uuid:", "HTTP/1.1 200").await;
    assert_eq!(take_data(&mut sub, 2).await, ["plain", "chunked"]);
    assert_eq!(
        hub.metric("ssehub_plain_publishes_total").await,
        1.0,
        "the chunked one went through hyper"
    );

    // A body over --max-body is announced in its head: hyper's path refuses it with 413.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    let big = "x".repeat(2000);
    c.write_all(publish(&hub, "r", &big, "").as_bytes())
        .await
        .unwrap();
    expect_answer(&mut c, "max-body", "HTTP/1.1 413").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_over_the_size_limit_is_refused_however_its_body_comes() {
    let hub = TestHub::start(&[]);
    // Bare LF and no space after the colons: under 64 KiB as sent, over it as the hub counts a
    // head (the target, and each header's name and value with 4 bytes for ": " and CRLF).
    let body = "topic=big&data=x";
    let fixed = [
        ("Host", "x".to_owned()),
        ("Authorization", format!("Bearer {}", hub.publisher_token())),
        (
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        ),
        ("Content-Length", body.len().to_string()),
    ];
    let pad: Vec<_> = (0..58)
        .map(|i| (format!("X-Pad-{i:02}"), "p".repeat(1115)))
        .collect();
    let lines = fixed
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .chain(pad);
    let mut head = "POST /.well-known/mercure HTTP/1.1\n".to_owned();
    let mut counted = "/.well-known/mercure".len();
    for (k, v) in lines {
        head += &format!("{k}:{v}\n");
        counted += k.len() + v.len() + 4;
    }
    head += "\n";
    assert!(
        head.len() < 65_536 && counted > 65_536,
        "{} {counted}",
        head.len()
    );

    let mut statuses = Vec::new();
    for together in [true, false] {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        if together {
            c.write_all(format!("{head}{body}").as_bytes())
                .await
                .unwrap();
        } else {
            c.write_all(head.as_bytes()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(body.as_bytes()).await.unwrap();
        }
        let mut raw = Vec::new();
        read_until(&mut c, &mut raw, "\r\n\r\n").await;
        let text = String::from_utf8_lossy(&raw);
        statuses.push(text.split(' ').nth(1).unwrap_or("").to_owned());
    }
    assert_eq!(statuses, ["431", "431"]);
    assert_eq!(hub.metric("ssehub_plain_publishes_total").await, 0.0);
}
