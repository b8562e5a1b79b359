//! Budgets a hostile client found missing: the history's bytes, one subscription's topics,
//! subscription events pushing real updates out of the replay, the subscription API naming
//! private ids, streams that never end, and tokens with `crit`. Each case runs against a real
//! hub over TCP and asserts the bound, and, where updates flow, that a well-behaved subscriber
//! receives every update once and in order.

mod common;

use std::time::Duration;

use common::{get, request, take, take_data, TestHub, SECRET};
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a subscription with a raw request, reads the response head, and closes it: a client
/// that subscribes and leaves at once. Returns the status code.
async fn subscribe_and_leave(hub: &TestHub, query: &str) -> u16 {
    let mut s = TcpStream::connect(hub.addr).await.unwrap();
    let req = format!("GET /.well-known/mercure?{query} HTTP/1.1\r\nHost: hub\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
            .await
            .expect("a response head")
            .unwrap();
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn sign(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_history_is_bounded_in_bytes() {
    // 60 updates of 900 kB against --history-bytes 8MiB: without the byte bound the hub keeps
    // all 54 MB (the count bound, 10,000, is far away).
    let hub = TestHub::start_process(&["--history-bytes", "8MiB"]);
    let mut witness = hub.subscribe("topic=big", &[]).await;
    let rss_before = hub.rss_kib();
    let mut publisher = hub.publisher().await;
    let data = "x".repeat(900_000);
    let mut ids = Vec::new();
    for i in 0..60 {
        let data = format!("{i} {data}");
        ids.push(publisher.ok(&[("topic", "big"), ("data", &data)]).await);
        // The witness keeps up (a reader 60 MB behind is what --subscriber-queue is for).
        let got = take(&mut witness, 1, Duration::from_secs(20)).await;
        assert!(got[0].data.starts_with(&format!("{i} ")), "update {i}");
        assert_eq!(got[0].id, ids[i]);
    }
    let kept = hub.metric("ssehub_history_length").await as usize;
    let bytes = hub.metric("ssehub_history_bytes").await;
    assert_eq!(
        hub.metric("ssehub_history_bytes_limit").await,
        (8 << 20) as f64
    );
    assert!(bytes <= (8 << 20) as f64, "{bytes} bytes kept");
    assert!((7..=9).contains(&kept), "{kept} updates kept of 900 kB");
    // What is kept is the newest, and replays from `earliest` exactly.
    let mut resumed = hub.subscribe("topic=big&lastEventID=earliest", &[]).await;
    let replay = take(&mut resumed, kept, Duration::from_secs(20)).await;
    let replayed: Vec<_> = replay.iter().map(|e| e.id.clone()).collect();
    assert_eq!(replayed, ids[ids.len() - kept..]);
    // An id evicted for bytes is one of the hub's own: everything kept, answered `earliest`.
    let (_, headers) = request(
        &hub,
        Method::HEAD,
        &format!(
            "/.well-known/mercure?topic=big&lastEventID={}",
            enc(&ids[0])
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(headers["last-event-id"], "earliest");
    let grown = hub.rss_kib().saturating_sub(rss_before);
    // 8 MiB kept, plus buffers and allocator slack; without the bound, over 50 MB.
    assert!(grown < 40 * 1024, "RSS grew {grown} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subscriptions_topics_are_bounded_and_leave_no_memory_behind() {
    let hub = TestHub::start_process(&[]);
    let mut witness = hub.subscribe("topic=witness", &[]).await;
    let mut publisher = hub.publisher().await;

    // 15 topics of 4,000 bytes: 60 kB for one idle subscriber. Refused, with the reason.
    let long = |i: usize| format!("https://example.com/{i}/{}", "a".repeat(3970));
    let query: Vec<_> = (0..15)
        .map(|i| format!("topic={}", enc(&long(i))))
        .collect();
    // (Bounded: a stream opened by mistake would never end.)
    let ((status, body), _) = tokio::time::timeout(
        Duration::from_secs(10),
        request(
            &hub,
            Method::GET,
            &format!("/.well-known/mercure?{}", query.join("&")),
            &[],
            "",
        ),
    )
    .await
    .expect("refused at once, not a stream");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("16384 bytes"), "{body}");

    // 2,000 subscribers at the bound (4 topics of 4,000 bytes, each its own), held together,
    // then gone: the hub's memory comes back.
    let rss_before = hub.rss_kib();
    let mut held = Vec::new();
    for n in 0..2000 {
        let query: Vec<_> = (0..4)
            .map(|i| format!("topic={}", enc(&long(n * 4 + i))))
            .collect();
        let mut s = TcpStream::connect(hub.addr).await.unwrap();
        let req = format!(
            "GET /.well-known/mercure?{} HTTP/1.1\r\nHost: hub\r\n\r\n",
            query.join("&")
        );
        s.write_all(req.as_bytes()).await.unwrap();
        held.push(s);
        if n % 500 == 499 {
            publisher
                .ok(&[("topic", "witness"), ("data", &n.to_string())])
                .await;
        }
    }
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v >= 2001.0,
        Duration::from_secs(60),
    )
    .await;
    let rss_held = hub.rss_kib();
    drop(held);
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v <= 1.0,
        Duration::from_secs(60),
    )
    .await;
    // Memory is handed back shortly after subscribers leave.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut rss_after = hub.rss_kib();
    while rss_after.saturating_sub(rss_before) > 12 * 1024 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_after = hub.rss_kib();
    }
    eprintln!("RSS before {rss_before} KiB, 2,000 held {rss_held} KiB, after {rss_after} KiB");
    assert!(
        rss_held.saturating_sub(rss_before) < 2000 * 100,
        "2,000 subscribers of 16 kB took {} KiB",
        rss_held - rss_before
    );
    assert!(
        rss_after.saturating_sub(rss_before) <= 12 * 1024,
        "{} KiB not returned after the subscribers left (held: {} KiB more)",
        rss_after.saturating_sub(rss_before),
        rss_held.saturating_sub(rss_before)
    );
    let got = take_data(&mut witness, 4).await;
    assert_eq!(got, ["499", "999", "1499", "1999"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_churn_cannot_erase_the_replay() {
    // With --subscriptions every subscribe and unsubscribe publishes an event per topic; a
    // client subscribing in a loop must not push real updates out of a history of 1,000.
    let hub = TestHub::start(&["--subscriptions", "--history-size", "1000"]);
    let mut publisher = hub.publisher().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            publisher
                .ok(&[("topic", "news"), ("data", &format!("real {i}"))])
                .await,
        );
    }
    // 100 anonymous subscriptions of 50 topics each, opened and closed: 10,000 events.
    let topics: Vec<_> = (0..50).map(|i| format!("topic=churn{i}")).collect();
    let query = topics.join("&");
    for _ in 0..100 {
        assert_eq!(subscribe_and_leave(&hub, &query).await, 200);
    }
    hub.wait_metric(
        "ssehub_subscribers_connected",
        |v| v == 0.0,
        Duration::from_secs(30),
    )
    .await;
    hub.wait_metric(
        "ssehub_updates_published_total{outcome=\"accepted\"}",
        |v| v >= 20.0 + 10_000.0,
        Duration::from_secs(30),
    )
    .await;
    // A reader that last saw the first update gets the 19 after it, and only those.
    let mut resumed = hub
        .subscribe(&format!("topic=news&lastEventID={}", enc(&ids[0])), &[])
        .await;
    let (_, headers) = request(
        &hub,
        Method::HEAD,
        &format!(
            "/.well-known/mercure?topic=news&lastEventID={}",
            enc(&ids[0])
        ),
        &[],
        "",
    )
    .await;
    assert_eq!(
        headers["last-event-id"],
        ids[0].as_str(),
        "the id is still known"
    );
    let got = take_data(&mut resumed, 19).await;
    let want: Vec<_> = (1..20).map(|i| format!("real {i}")).collect();
    assert_eq!(got, want);
    common::assert_quiet(&mut resumed, Duration::from_millis(300)).await;
    // The subscription events kept are bounded on their own.
    let kept = hub.metric("ssehub_history_length").await;
    assert!(kept <= 20.0 + 1000.0, "{kept}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_api_names_only_ids_the_caller_may_read() {
    let hub = TestHub::start(&["--subscriptions"]);
    let mut publisher = hub.publisher().await;
    let public = publisher
        .ok(&[("topic", "https://example.com/a"), ("data", "public")])
        .await;
    let private = publisher
        .ok(&[
            ("topic", "https://example.com/secret"),
            ("data", "private"),
            ("private", "on"),
        ])
        .await;
    let path = "/.well-known/mercure/subscriptions";
    let read = |rights: serde_json::Value| {
        format!("Bearer {}", sign(json!({"mercure": {"subscribe": rights}})))
    };
    // May read subscriptions only: the private update is not its to name.
    let api_only = read(json!([
        "/.well-known/mercure/subscriptions{/topic}{/subscriber}"
    ]));
    let ((status, body), headers) =
        request(&hub, Method::GET, path, &[("authorization", &api_only)], "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["lastEventID"], public.as_str(), "{body}");
    assert!(!body.contains(&private));
    assert!(!headers["etag"].to_str().unwrap().contains(&private));
    // One that may read the private topic too is told the newest.
    let both = read(json!([
        "/.well-known/mercure/subscriptions{/topic}{/subscriber}",
        "https://example.com/secret"
    ]));
    let ((_, body), headers) =
        request(&hub, Method::GET, path, &[("authorization", &both)], "").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["lastEventID"], private.as_str(), "{body}");
    assert!(headers["etag"].to_str().unwrap().contains(&private));
    // A hub whose only update is private names nothing to the first: `earliest`.
    let hub = TestHub::start(&["--subscriptions"]);
    hub.publisher()
        .await
        .ok(&[("topic", "s"), ("data", "p"), ("private", "on")])
        .await;
    let ((_, body), _) =
        request(&hub, Method::GET, path, &[("authorization", &api_only)], "").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["lastEventID"], "earliest", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_without_exp_ends_at_the_lifetime_and_resumes() {
    let hub = TestHub::start(&["--max-stream-lifetime", "2s"]);
    let mut publisher = hub.publisher().await;
    let mut stream = hub.subscribe("topic=t", &[]).await;
    let first = publisher.ok(&[("topic", "t"), ("data", "one")]).await;
    assert_eq!(take_data(&mut stream, 1).await, ["one"]);
    // The stream ends cleanly (EOF, no error) within a few seconds.
    let end = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("the stream ended at its lifetime");
    assert!(matches!(end, Ok(None)), "{end:?}");
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"lifetime\"}")
            .await,
        1.0
    );
    // The client resumes where it left off.
    publisher.ok(&[("topic", "t"), ("data", "two")]).await;
    let mut resumed = hub
        .subscribe(&format!("topic=t&lastEventID={}", enc(&first)), &[])
        .await;
    assert_eq!(take_data(&mut resumed, 1).await, ["two"]);
    // A token's exp sooner than the lifetime ends it first, as expired.
    let hub = TestHub::start(&["--max-stream-lifetime", "1h"]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = sign(json!({"exp": exp, "mercure": {"subscribe": ["*"]}}));
    let mut stream = hub
        .subscribe("topic=t", &[("authorization", &format!("Bearer {token}"))])
        .await;
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match stream.next().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream ended at exp");
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"expired\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_with_crit_is_refused() {
    use base64::Engine as _;
    let hub = TestHub::start(&[]);
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let with_header = |header: serde_json::Value| {
        let signing_input = format!(
            "{}.{}",
            b64(header),
            b64(json!({"mercure": {"publish": ["*"], "subscribe": ["*"]}}))
        );
        let sig = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &key,
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        format!("{signing_input}.{sig}")
    };
    let form = ("content-type", "application/x-www-form-urlencoded");
    let publish = |token: String| {
        let hub = &hub;
        async move {
            request(
                hub,
                Method::POST,
                "/.well-known/mercure",
                &[("authorization", &format!("Bearer {token}")), form],
                "topic=t&data=x",
            )
            .await
            .0
        }
    };
    // The same token without `crit` is accepted: the refusal is for `crit` alone.
    let (status, body) = publish(with_header(json!({"alg": "HS256", "typ": "JWT"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for crit in [json!(["exp"]), json!(["http://example.com/ext"]), json!([])] {
        let token = with_header(json!({"alg": "HS256", "typ": "JWT", "crit": crit, "exp": 1}));
        let (status, body) = publish(token.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("crit"), "{body}");
        // And for subscribers.
        let (status, body) = get(
            &hub,
            "/.well-known/mercure?topic=t",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("crit"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_keep_alive_connections_cannot_keep_subscribers_out() {
    // Five connections that ask for /healthz now and then, never idle long enough to be
    // closed for it, against --max-connections 4: the hub is "full" of connections that do
    // nothing. A subscriber refused for it asks one of them to close; its retry gets in.
    let hub = TestHub::start(&["--max-connections", "4"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut idlers = Vec::new();
    for _ in 0..5 {
        let (addr, stop) = (hub.addr, stop.clone());
        idlers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                loop {
                    let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
                    if s.write_all(req).await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
        }));
    }
    hub.wait_metric(
        "ssehub_connections_open",
        |v| v >= 5.0,
        Duration::from_secs(10),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut tries = 0;
    let mut stream = loop {
        tries += 1;
        match hub.try_subscribe("topic=in", &[]).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(e.to_string().contains("503"), "{e}");
                assert!(std::time::Instant::now() < deadline, "still refused: {e}");
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
        }
    };
    hub.publisher()
        .await
        .ok(&[("topic", "in"), ("data", "got in")])
        .await;
    assert_eq!(take_data(&mut stream, 1).await, ["got in"]);
    eprintln!("subscribed after {tries} tries");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for i in idlers {
        i.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_templates_cannot_lock_out_a_tokens_templates() {
    // Anonymous subscribers fill --template-memory; a subscriber whose token names a template
    // (for private updates) still gets its stream and its private updates.
    let hub = TestHub::start(&["--template-memory", "1MiB"]);
    let mut held = Vec::new();
    let mut refused = false;
    for i in 0..400 {
        let query: Vec<_> = (0..8)
            .map(|j| {
                format!(
                    "topic={}",
                    enc(&format!("https://ex.com/a{i}/{j}/{{x}}{{?y}}"))
                )
            })
            .collect();
        let mut s = TcpStream::connect(hub.addr).await.unwrap();
        let req = format!(
            "GET /.well-known/mercure?{} HTTP/1.1\r\nHost: hub\r\n\r\n",
            query.join("&")
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut head))
            .await
            .unwrap()
            .unwrap();
        if String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 503") {
            refused = true;
            break;
        }
        held.push(s);
    }
    assert!(refused, "the template budget never filled");
    let token = sign(json!({"mercure": {"subscribe": ["https://ex.com/users/{id}/inbox"]}}));
    let mut stream = hub
        .try_subscribe(
            &format!("topic={}", enc("https://ex.com/users/1/inbox")),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
        .expect("a token's templates are not refused for anonymous ones");
    hub.publisher()
        .await
        .ok(&[
            ("topic", "https://ex.com/users/1/inbox"),
            ("data", "for user 1"),
            ("private", "on"),
        ])
        .await;
    assert_eq!(take_data(&mut stream, 1).await, ["for user 1"]);
    drop(held);
}
