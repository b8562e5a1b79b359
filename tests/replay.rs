//! Last-Event-ID: a reconnecting subscriber gets exactly what it missed, then live updates.

mod common;

use std::time::Duration;

use common::{take, TestHub};

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_gets_exactly_the_missed_updates_while_publishing_continues() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let mut first = hub.subscribe("topic=t", &[]).await;
    for i in 0..50 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    let seen = take(&mut first, 20, Duration::from_secs(5)).await;
    let last_id = seen.last().unwrap().id.clone();
    drop(first);

    // Publishing keeps going while the subscriber reconnects and replays.
    let publisher = tokio::spawn(async move {
        for i in 50..600 {
            p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut again = hub
        .subscribe("topic=t", &[("Last-Event-ID", &last_id)])
        .await;
    assert_eq!(again.headers["last-event-id"], last_id.as_str());
    let events = take(&mut again, 580, Duration::from_secs(30)).await;
    publisher.await.unwrap();
    let data: Vec<u32> = events.iter().map(|e| e.data.parse().unwrap()).collect();
    let expected: Vec<u32> = (20..600).collect();
    assert_eq!(data, expected, "no gap, no duplicate, in order");
    common::assert_quiet(&mut again, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn query_parameter_works_and_the_header_wins() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let a = p.ok(&[("topic", "t"), ("data", "a")]).await;
    let b = p.ok(&[("topic", "t"), ("data", "b")]).await;
    p.ok(&[("topic", "t"), ("data", "c")]).await;

    let mut s = hub
        .subscribe(&format!("topic=t&lastEventID={a}"), &[])
        .await;
    assert_eq!(s.headers["last-event-id"], a.as_str());
    let got: Vec<_> = take(&mut s, 2, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["b", "c"]);

    let mut s = hub
        .subscribe(
            &format!("topic=t&lastEventID={a}"),
            &[("Last-Event-ID", &b)],
        )
        .await;
    assert_eq!(s.headers["last-event-id"], b.as_str());
    assert_eq!(take(&mut s, 1, Duration::from_secs(5)).await[0].data, "c");
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;

    // Only the matching topics are replayed.
    p.ok(&[("topic", "other"), ("data", "x")]).await;
    let mut s = hub.subscribe("topic=other&lastEventID=earliest", &[]).await;
    assert_eq!(s.headers["last-event-id"], "earliest");
    assert_eq!(take(&mut s, 1, Duration::from_secs(5)).await[0].data, "x");
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;

    // Without an id, no Last-Event-ID header and no replay.
    let mut s = hub.subscribe("topic=t", &[]).await;
    assert!(!s.headers.contains_key("last-event-id"));
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_ids_follow_the_rule() {
    let hub = TestHub::start(&["--history-size", "3"]);
    let mut p = hub.publisher().await;
    let old = p.ok(&[("topic", "t"), ("data", "0")]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 1..5 {
        p.ok(&[("topic", "t"), ("data", &i.to_string())]).await;
    }
    // The hub's own id, evicted from history: replay everything retained.
    let mut s = hub
        .subscribe(&format!("topic=t&lastEventID={old}"), &[])
        .await;
    assert_eq!(s.headers["last-event-id"], "earliest");
    let got: Vec<_> = take(&mut s, 3, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["2", "3", "4"]);

    // A foreign id: nothing replayed, `earliest` answered.
    for foreign in ["not-ours", "urn:uuid:6ba7b810-9dad-11d1-80b4-00c04fd430c8"] {
        let mut s = hub
            .subscribe("topic=t", &[("Last-Event-ID", foreign)])
            .await;
        assert_eq!(s.headers["last-event-id"], "earliest");
        common::assert_quiet(&mut s, Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_stream_replays_too() {
    let hub = TestHub::start(&["--clock-interval", "50ms"]);
    let mut s = ssehub::client::EventStream::open(&hub.target("/events/"), &Default::default())
        .await
        .unwrap();
    let first = take(&mut s, 2, Duration::from_secs(5)).await;
    drop(s);
    // A few ticks while no one listens, for the reconnect to replay.
    let stored = hub.metric("ssehub_history_length").await;
    hub.wait_metric(
        "ssehub_history_length",
        |v| v >= stored + 3.0,
        Duration::from_secs(5),
    )
    .await;
    let mut h = http::HeaderMap::new();
    h.insert("last-event-id", first[1].id.parse().unwrap());
    let mut s = ssehub::client::EventStream::open(&hub.target("/events/"), &h)
        .await
        .unwrap();
    let next = take(&mut s, 5, Duration::from_secs(5)).await;
    let n = |d: &str| -> u64 {
        d.strip_prefix("Message: ")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let got: Vec<u64> = next.iter().map(|e| n(&e.data)).collect();
    let from = n(&first[1].data) + 1;
    let expected: Vec<u64> = (from..from + 5).collect();
    assert_eq!(got, expected, "no tick lost across the reconnect");
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_may_be_any_utf8_and_an_empty_id_is_none() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let first = "https://example.com/café/1";
    p.ok(&[("topic", "t"), ("data", "one"), ("id", first)])
        .await;
    p.ok(&[
        ("topic", "t"),
        ("data", "two"),
        ("id", "https://example.com/café/2"),
    ])
    .await;

    // A browser sends the id it last saw back as UTF-8.
    let mut s = hub.subscribe("topic=t", &[("Last-Event-ID", first)]).await;
    assert_eq!(s.headers["last-event-id"].as_bytes(), first.as_bytes());
    assert_eq!(take(&mut s, 1, Duration::from_secs(5)).await[0].data, "two");
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;

    // An empty header is no id: the query's stands.
    let mut s = hub
        .subscribe("topic=t&lastEventID=earliest", &[("Last-Event-ID", "")])
        .await;
    assert_eq!(s.headers["last-event-id"], "earliest");
    assert_eq!(common::take_data(&mut s, 2).await, ["one", "two"]);

    // An empty query value is no id either: no replay, no header.
    let mut s = hub.subscribe("topic=t&lastEventID=", &[]).await;
    assert!(!s.headers.contains_key("last-event-id"));
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;

    // HEAD answers with the header GET would send.
    for (query, header, expected) in [
        ("topic=t", first, Some(first)),
        (
            "topic=t&lastEventID=nobody-knows-this",
            "",
            Some("earliest"),
        ),
        ("topic=t", "", None),
    ] {
        let headers: Vec<(&str, &str)> = if header.is_empty() {
            vec![]
        } else {
            vec![("Last-Event-ID", header)]
        };
        let path = format!("/.well-known/mercure?{query}");
        let ((status, _), h) = common::request(&hub, http::Method::HEAD, &path, &headers, "").await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(
            h.get("last-event-id").map(|v| v.as_bytes()),
            expected.map(str::as_bytes),
            "HEAD {query} with {header:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_through_uri_templates() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    for (topic, data) in [
        ("https://example.com/books/1", "b1"),
        ("https://example.com/films/1", "f1"),
        ("https://example.com/books/2", "b2"),
        ("https://example.com/books/2/reviews", "r2"),
    ] {
        p.ok(&[("topic", topic), ("data", data)]).await;
    }
    let mut s = hub
        .subscribe(
            "topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D&topic=x&lastEventID=earliest",
            &[],
        )
        .await;
    assert_eq!(common::take_data(&mut s, 2).await, ["b1", "b2"]);
    common::assert_quiet(&mut s, Duration::from_millis(200)).await;
    p.ok(&[("topic", "https://example.com/books/3"), ("data", "b3")])
        .await;
    assert_eq!(take(&mut s, 1, Duration::from_secs(5)).await[0].data, "b3");
}
