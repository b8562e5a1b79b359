//! The hub's own HTTP/1.1 writer for event streams (`src/server/h1/`), byte for byte over raw
//! TCP: what it sends, what it leaves to hyper, and how it treats odd clients.

mod common;

use std::time::Duration;

use common::{read_until, TestHub};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

/// Splits a response into its head and its chunked body decoded (the body must be complete
/// chunks).
fn split_chunked(raw: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, _) = text.split_once("\r\n\r\n").expect("a complete head");
    (head.to_owned(), chunks(raw).concat())
}

/// The chunks of a chunked body, each checked to end with CRLF (the body must be complete
/// chunks).
fn chunks(raw: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (_, mut rest) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut out = Vec::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk size {size:?}"));
        if n == 0 || after.len() < n + 2 {
            break;
        }
        out.push(after[..n].to_owned());
        assert_eq!(&after[n..n + 2], "\r\n", "a chunk ends with CRLF");
        rest = &after[n + 2..];
    }
    out
}

async fn publish(hub: &TestHub, topic: &str, data: &str) {
    hub.publisher()
        .await
        .ok(&[("topic", topic), ("data", data)])
        .await;
}

/// Waits until the hub counts `n` subscribers.
async fn subscribers(hub: &TestHub, n: f64) {
    hub.wait_metric("ssehub_subscribers_connected", |v| v == n, WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_head_and_chunks_on_the_wire() {
    let hub = TestHub::start(&["--cors-origins", "https://app.example"]);
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(
        b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    publish(&hub, "a", "one").await;
    publish(&hub, "a", "two\nlines").await;
    read_until(&mut c, &mut raw, "data: lines\n\n").await;

    let (head, body) = split_chunked(&raw);
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    for line in [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "x-accel-buffering: no",
        "access-control-allow-origin: https://app.example",
        "access-control-allow-credentials: true",
        "date: ",
    ] {
        assert!(head.contains(line), "missing {line:?} in {head}");
    }
    assert!(!head.contains("content-length"), "{head}");
    assert!(
        body.starts_with(":\n"),
        "the opening comment first: {body:?}"
    );
    assert!(body.contains("data: one\n\n"), "{body:?}");
    assert!(body.contains("data: two\ndata: lines\n\n"), "{body:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_in_pieces_and_a_refusal_on_the_same_path() {
    let hub = TestHub::start(&["--anonymous", "false"]);
    // Dribbled in five pieces, well within the head deadline.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    let token = hub.key.mint(None, Some(&["a".to_owned()]), None).unwrap();
    let head = format!("GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    for piece in head.as_bytes().chunks(head.len() / 5 + 1) {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    publish(&hub, "a", "hello").await;
    read_until(&mut c, &mut raw, "data: hello\n\n").await;

    // Without a token: the refusal is a whole response, then the connection closes.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut raw))
        .await
        .expect("the connection is closed after the refusal")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 401 unauthorized\r\n"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{text}"
    );
    assert!(body.contains("token"), "the reason is given: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_it_does_not_write_go_to_hyper_unchanged() {
    let hub = TestHub::start(&[]);
    // A publish, then a subscribe on the same keep-alive connection.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    let token = hub.publisher_token();
    let body = "topic=b&data=first";
    c.write_all(
        format!(
            "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, "urn:uuid:").await;
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));
    c.write_all(b"GET /.well-known/mercure?topic=b HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    publish(&hub, "b", "second").await;
    read_until(&mut c, &mut raw, "data: second\n\n").await;

    // HTTP/1.0 has no chunked encoding: hyper answers it, ending the body with the connection.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=c HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(text.starts_with("http/1.0 200 ok\r\n"), "{text}");
    assert!(!text.contains("transfer-encoding"), "{text}");
    subscribers(&hub, 2.0).await;
    publish(&hub, "c", "old-client").await;
    read_until(&mut c, &mut raw, "data: old-client\n\n").await;

    // A head that is not HTTP at all still gets a 400 (with its reason: tests/bad_input.rs).
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=a HTTP/9.9\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut raw)).await;
    assert!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_keeps_sending_is_closed_and_others_are_not_disturbed() {
    let hub = TestHub::start(&[]);
    let mut witness = hub.subscribe("topic=w", &[]).await;
    let mut chatty = TcpStream::connect(hub.addr).await.unwrap();
    chatty
        .write_all(b"GET /.well-known/mercure?topic=w HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut chatty, &mut raw, ":\n").await;
    subscribers(&hub, 2.0).await;
    // A few bytes are tolerated (and thrown away)…
    chatty.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    publish(&hub, "w", "still-here").await;
    read_until(&mut chatty, &mut raw, "data: still-here\n\n").await;
    // …a flood is not.
    let junk = vec![b'x'; 256 * 1024];
    let _ = tokio::time::timeout(WAIT, chatty.write_all(&junk)).await;
    subscribers(&hub, 1.0).await;
    assert!(hub.wait_for_log("kept sending data", WAIT));

    publish(&hub, "w", "after").await;
    let events = common::take(&mut witness, 2, WAIT).await;
    assert_eq!(events[0].data, "still-here");
    assert_eq!(events[1].data, "after");
}

#[tokio::test(flavor = "multi_thread")]
async fn bare_lf_line_endings_are_understood_as_hyper_would() {
    let hub = TestHub::start(&[]);
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut raw))
        .await
        .expect("answered at once, not after the head deadline")
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"));

    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=lf HTTP/1.1\nHost: x\n\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    publish(&hub, "lf", "bare").await;
    read_until(&mut c, &mut raw, "data: bare\n\n").await;
}

/// 100 subscribers per core, 150 updates at 100 a second: how many of one subscriber's chunks
/// carried events, how many events, and how many writes the hub's flusher made. Per core, that is 10,000 deliveries a second: under
/// the default budget (20,000 writes a second per core), over a budget of 1,000, where the
/// window is 100 subscribers / 1,000 writes = 100 ms whatever the number of cores.
async fn chunks_and_events(args: &[&str]) -> (usize, usize, f64) {
    const UPDATES: usize = 150;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
    let subs = 100 * cores;
    let hub = TestHub::start(args);
    let mut conns = Vec::new();
    for _ in 0..subs {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        c.write_all(b"GET /.well-known/mercure?topic=w HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        conns.push(c);
    }
    subscribers(&hub, subs as f64).await;
    let mut publisher = hub.publisher().await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..UPDATES {
        tick.tick().await;
        publisher
            .ok(&[("topic", "w"), ("data", &format!("n{i}"))])
            .await;
    }
    let mut raw = Vec::new();
    let last = format!("data: n{}\n\n\r\n", UPDATES - 1);
    read_until(&mut conns[subs / 2], &mut raw, &last).await;
    let with_events: Vec<String> = chunks(&raw)
        .into_iter()
        .filter(|c| c.contains("data: "))
        .collect();
    let events = with_events
        .iter()
        .map(|c| c.matches("data: ").count())
        .sum();
    let flushed = hub.metric("ssehub_coalesced_writes_total").await;
    (with_events.len(), events, flushed)
}

/// `--write-budget` decides when the hub starts batching: under the default budget every
/// update goes out in a write of its own; over a budget of 1,000 writes a second per core,
/// updates share writes, written by the hub's flusher when each window opens; nothing is lost
/// either way.
#[tokio::test(flavor = "multi_thread")]
async fn the_write_budget_decides_when_updates_share_a_write() {
    let (under, events, flushed) = chunks_and_events(&["--coalesce", "1s"]).await;
    assert_eq!(events, 150);
    assert!(
        under * 10 >= events * 6,
        "under budget, about one write per update: {under} chunks for {events} events"
    );
    assert_eq!(flushed, 0.0, "under budget nothing is held for the flusher");
    let (over, events, flushed) =
        chunks_and_events(&["--coalesce", "1s", "--write-budget", "1000"]).await;
    assert_eq!(events, 150);
    assert!(
        over * 10 <= events * 3 && over * 3 <= under,
        "over budget, updates share writes: {over} chunks for {events} events ({under} under budget)"
    );
    assert!(
        flushed >= 100.0,
        "the held streams were written by the flusher: {flushed} writes"
    );
}

/// While the hub is within its write budget, an update for an idle HTTP/1.1 stream is written
/// by the publishing thread itself: each arrives as one well-formed chunk, and the hub counts
/// every one as a direct write.
#[tokio::test(flavor = "multi_thread")]
async fn updates_for_an_idle_stream_are_written_directly_as_whole_chunks() {
    let hub = TestHub::start(&[]);
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=d HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    // The stream's task goes back to waiting once it has written the opening.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut publisher = hub.publisher().await;
    for i in 0..5 {
        publisher
            .ok(&[("topic", "d"), ("data", &format!("direct {i}"))])
            .await;
        read_until(&mut c, &mut raw, &format!("data: direct {i}\n\n\r\n")).await;
    }
    let chunks = chunks(&raw);
    assert_eq!(
        chunks.len(),
        6,
        "the opening, then one chunk per update: {chunks:?}"
    );
    for (i, chunk) in chunks[1..].iter().enumerate() {
        assert!(chunk.starts_with("id: urn:uuid:"), "{chunk:?}");
        assert!(
            chunk.ends_with(&format!("\ndata: direct {i}\n\n")),
            "{chunk:?}"
        );
    }
    assert_eq!(hub.metric("ssehub_direct_writes_total").await, 5.0);
    assert_eq!(hub.metric("ssehub_deliveries_total").await, 5.0);
}

/// A direct write the socket takes only part of (an update larger than the kernel's buffers,
/// to a client that reads slowly): the stream's task finishes that chunk before anything else,
/// and what was published meanwhile follows it, each a whole chunk, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_write_cut_short_is_finished_before_the_next_update() {
    let hub = TestHub::start(&["--max-body", "16MiB"]);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut c = socket.connect(hub.addr).await.unwrap();
    c.write_all(b"GET /.well-known/mercure?topic=big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    // Small updates until one is written directly: the stream then waits for the next.
    let mut publisher = hub.publisher().await;
    let mut warm = 0;
    while hub.metric("ssehub_direct_writes_total").await == 0.0 {
        assert!(warm < 50, "no update was written directly");
        publisher
            .ok(&[("topic", "big"), ("data", &format!("warm {warm}"))])
            .await;
        read_until(&mut c, &mut raw, &format!("data: warm {warm}\n\n\r\n")).await;
        warm += 1;
    }
    // Twice the most a socket's send buffer grows to (`tcp_wmem`): the socket cannot take it
    // all at once.
    let big = "x".repeat(8 << 20);
    publisher.ok(&[("topic", "big"), ("data", &big)]).await;
    assert_eq!(
        hub.metric("ssehub_direct_writes_total").await,
        2.0,
        "the big update was written directly"
    );
    for i in 0..3 {
        publisher
            .ok(&[("topic", "big"), ("data", &format!("after {i}"))])
            .await;
    }
    let last = b"data: after 2\n\n\r\n";
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    while !raw.ends_with(last) {
        let n = tokio::time::timeout_at(deadline, c.read(&mut buf))
            .await
            .expect("the stream stalled")
            .unwrap();
        assert!(n > 0, "the stream closed");
        raw.extend_from_slice(&buf[..n]);
    }
    // `chunks` checks that every chunk is whole; updates queued meanwhile may share one.
    let body = chunks(&raw).concat();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let mut expected: Vec<String> = (0..warm).map(|i| format!("warm {i}")).collect();
    expected.push(big);
    expected.extend((0..3).map(|i| format!("after {i}")));
    assert!(
        data == expected,
        "whole chunks, in order: {:?}",
        data.iter()
            .map(|d| &d[..d.len().min(20)])
            .collect::<Vec<_>>()
    );
}

/// Publishers racing on one topic, some updates written directly and some by the streams' own
/// tasks: every subscriber still gets every update once, in the one order the hub stored them
/// (which a replay from `earliest` shows).
#[tokio::test(flavor = "multi_thread")]
async fn racing_publishers_leave_every_subscriber_the_same_order() {
    let hub = TestHub::start(&[]);
    race(&hub, Duration::ZERO).await;
    assert!(
        hub.metric("ssehub_direct_writes_total").await > 0.0,
        "some updates were written directly"
    );
}

/// The same race while the hub batches (a budget of 1,000 writes a second per core, kept
/// exceeded by a steady publisher to 10 other subscribers per core): updates held for the race's
/// subscribers are written by the flusher, others by the streams' tasks when a queue fills or a
/// window has passed; the order still holds. The other subscribers speak HTTP/1.0, which hyper
/// serves, so that every write the flusher makes is one of the race's.
#[tokio::test(flavor = "multi_thread")]
async fn racing_publishers_keep_the_order_while_the_hub_batches() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let hub = TestHub::start(&["--write-budget", "1000", "--coalesce", "15ms"]);
    let mut warm_subs = Vec::new();
    for _ in 0..10 * cores {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        c.write_all(b"GET /.well-known/mercure?topic=warm HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        warm_subs.push(c);
    }
    subscribers(&hub, (10 * cores) as f64).await;
    let mut warm = hub.publisher().await;
    // 500 updates a second to 10 subscribers per core: 5,000 deliveries a second per core.
    let warming = tokio::spawn(async move {
        loop {
            warm.ok(&[("topic", "warm"), ("data", "w")]).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    // Two retunes of the window (every 100 ms) with the budget exceeded.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        hub.metric("ssehub_coalesced_writes_total").await,
        0.0,
        "streams served by hyper are never held"
    );
    race(&hub, Duration::from_millis(1)).await;
    warming.abort();
    assert!(
        hub.metric("ssehub_coalesced_writes_total").await > 0.0,
        "updates for the race's subscribers were held and written by the flusher"
    );
}

/// 8 publishers × 40 updates on topic `race`, each publisher waiting `pace` between its
/// publishes, to 3 subscribers; each must receive exactly the stored order.
async fn race(hub: &TestHub, pace: Duration) {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 40;
    let before = hub.metric("ssehub_subscribers_connected").await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        subs.push(hub.subscribe("topic=race", &[]).await);
    }
    subscribers(hub, before + 3.0).await;
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        let mut publisher = hub.publisher().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                publisher
                    .ok(&[("topic", "race"), ("data", &format!("{p}-{i}"))])
                    .await;
                if !pace.is_zero() {
                    tokio::time::sleep(pace).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = PUBLISHERS * EACH;
    let mut replay = hub
        .subscribe("topic=race", &[("Last-Event-ID", "earliest")])
        .await;
    let stored: Vec<String> = common::take(&mut replay, total, WAIT)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    for sub in &mut subs {
        let got: Vec<String> = common::take(sub, total, WAIT)
            .await
            .into_iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(got, stored, "the order the hub stored them in");
    }
}

/// Writes `pieces` one after another, pausing between them so that each arrives on its own.
async fn trickle(c: &mut TcpStream, pieces: &[&[u8]]) {
    for piece in pieces {
        c.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_head_trickled_in_small_pieces_ends_at_its_blank_line() {
    let hub = TestHub::start(&[]);
    // A stream's head three bytes at a time, its blank line cut in two.
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let head = b"GET /.well-known/mercure?topic=t HTTP/1.1\r\nHost: x\r\n\r";
    let mut pieces: Vec<&[u8]> = head.chunks(3).collect();
    pieces.push(b"\n");
    trickle(&mut c, &pieces).await;
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    subscribers(&hub, 1.0).await;
    publish(&hub, "t", "trickled").await;
    read_until(&mut c, &mut raw, "data: trickled\n\n").await;

    // Bare LF, cut between its two LFs and between the LF and CR of `\n\r\n`: answered at
    // once (hyper's path here), not when the head deadline passes.
    for (first, last) in [
        (
            &b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n"[..],
            &b"\n"[..],
        ),
        (
            b"GET /healthz HTTP/1.1\nHost: x\nConnection: close\n",
            b"\r\n",
        ),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r",
            b"\n",
        ),
    ] {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        c.set_nodelay(true).unwrap();
        let pieces: Vec<&[u8]> = first.chunks(2).chain([last]).collect();
        trickle(&mut c, &pieces).await;
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut raw))
            .await
            .expect("answered at once, not after the head deadline")
            .unwrap();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_asked_to_close_says_so_and_closes_when_it_ends() {
    let hub = TestHub::start(&[]);
    let token = hub
        .key
        .mint(None, Some(&["*".to_owned()]), Some(Duration::from_secs(2)))
        .unwrap();
    let mut c = TcpStream::connect(hub.addr).await.unwrap();
    c.write_all(
        format!(
            "GET /.well-known/mercure?topic=c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    read_until(&mut c, &mut raw, ":\n").await;
    let (head, _) = split_chunked(&raw);
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    assert!(head.contains("\r\ntransfer-encoding: chunked"), "{head}");
    // The token expires: the stream ends with its last chunk, and the hub closes the
    // connection (while it runs on).
    tokio::time::timeout(Duration::from_secs(15), c.read_to_end(&mut raw))
        .await
        .expect("the connection is closed when the stream ends")
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.ends_with("0\r\n\r\n"), "{text:?}");
    assert_eq!(common::get(&hub, "/healthz", &[]).await.0, 200);
}

/// Opens `n` raw HTTP/1.1 subscriptions to `topic` and waits until the hub counts them.
async fn raw_subscribers(hub: &TestHub, topic: &str, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        let head = format!("GET /.well-known/mercure?topic={topic} HTTP/1.1\r\nHost: x\r\n\r\n");
        c.write_all(head.as_bytes()).await.unwrap();
        conns.push(c);
    }
    subscribers(hub, n as f64).await;
    conns
}

/// Socket writes of updates the hub made, however made.
async fn writes(hub: &TestHub) -> f64 {
    hub.metric("ssehub_direct_writes_total").await
        + hub.metric("ssehub_coalesced_writes_total").await
        + hub.metric("ssehub_task_writes_total").await
}

/// By default the write budget follows the cores' load (`--write-budget auto`). A hub that
/// delivers less than the floor of 20,000 writes a second per core never waits, however busy the
/// machine is (the tests beside this one may load it); one whose publishers go as fast as they
/// can to 200 subscribers per core, with readers in this process, saturates the cores and
/// batches, in fewer writes than deliveries, and says how busy the cores were.
#[tokio::test(flavor = "multi_thread")]
async fn the_measured_write_budget_batches_only_when_the_cores_are_busy() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(64));
    let hub = TestHub::start(&["--coalesce", "1s"]);
    let mut conns = raw_subscribers(&hub, "calm", 10).await;
    let mut publisher = hub.publisher().await;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..100 {
        tick.tick().await;
        publisher
            .ok(&[("topic", "calm"), ("data", &format!("n{i}"))])
            .await;
    }
    let mut raw = Vec::new();
    read_until(&mut conns[0], &mut raw, "data: n99\n\n\r\n").await;
    assert_eq!(
        hub.metric("ssehub_coalesced_writes_total").await,
        0.0,
        "nothing was held"
    );
    let floor = 20_000.0 * cores as f64;
    let budget = hub.metric("ssehub_write_budget").await;
    assert!(
        (floor..=1e7 * cores as f64).contains(&budget),
        "budget {budget}"
    );
    let busy = hub.metric("ssehub_cpu_busy_ratio").await;
    assert!((0.0..=1.0).contains(&busy), "busy {busy}");
    drop(conns);

    let busy = raw_subscribers(&hub, "busy", 200 * cores).await;
    // Read, so that no subscriber falls behind for want of a reader.
    let readers: Vec<_> = busy
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
            })
        })
        .collect();
    let (delivered, written) = (
        hub.metric("ssehub_deliveries_total").await,
        writes(&hub).await,
    );
    let mut flood = Vec::new();
    for _ in 0..4 {
        let mut p = hub.publisher().await;
        flood.push(tokio::spawn(async move {
            loop {
                p.ok(&[("topic", "busy"), ("data", "x")]).await;
            }
        }));
    }
    hub.wait_metric(
        "ssehub_coalesce_window_seconds",
        |w| w > 0.0,
        Duration::from_secs(20),
    )
    .await;
    // A few windows' worth of batched writes.
    hub.wait_metric(
        "ssehub_coalesced_writes_total",
        |n| n >= 1_000.0,
        Duration::from_secs(20),
    )
    .await;
    let busy = hub.metric("ssehub_cpu_busy_ratio").await;
    for f in &flood {
        f.abort();
    }
    assert!(busy > 0.5, "the cores were busy while it batched: {busy}");
    let delivered = hub.metric("ssehub_deliveries_total").await - delivered;
    let written = writes(&hub).await - written;
    assert!(
        written < delivered * 0.9,
        "past the budget updates share writes: {written} writes for {delivered} deliveries"
    );
    for r in readers {
        r.abort();
    }
}
