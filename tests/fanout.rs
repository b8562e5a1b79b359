//! Fan-out: many subscribers, many updates, each delivered once and in order.

mod common;

use std::time::Duration;

use common::{take, TestHub};

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_subscribers_each_get_a_thousand_updates_in_order_once() {
    let hub = TestHub::start(&[]);
    let mut subs = Vec::new();
    for _ in 0..200 {
        subs.push(hub.subscribe("topic=news", &[]).await);
    }
    // Subscribers to another topic get none of it.
    let mut other = hub.subscribe("topic=sport", &[]).await;
    let mut p = hub.publisher().await;
    let mut ids = Vec::new();
    let publish = async {
        for i in 0..1000 {
            ids.push(
                p.ok(&[("topic", "news"), ("data", &format!("update {i}"))])
                    .await,
            );
        }
        ids
    };
    let readers = subs.into_iter().map(|mut s| {
        tokio::spawn(async move { take(&mut s, 1000, Duration::from_secs(120)).await })
    });
    let (ids, received) = tokio::join!(publish, futures_util::future::join_all(readers));
    for events in received {
        let events = events.unwrap();
        let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
        let expected: Vec<_> = (0..1000).map(|i| format!("update {i}")).collect();
        assert_eq!(data, expected);
        let got_ids: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(got_ids, ids);
    }
    common::assert_quiet(&mut other, Duration::from_millis(200)).await;
    assert_eq!(hub.metric("ssehub_deliveries_total").await, 200_000.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn alternate_topics_and_wildcards_match_once() {
    let hub = TestHub::start(&[]);
    let mut both = hub.subscribe("topic=a&topic=b&topic=*", &[]).await;
    let mut b = hub.subscribe("topic=b", &[]).await;
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "a"), ("topic", "b"), ("data", "one")])
        .await;
    p.ok(&[("topic", "c"), ("data", "two")]).await;
    let got: Vec<_> = take(&mut both, 2, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(
        got,
        ["one", "two"],
        "once each, though three selectors match"
    );
    assert_eq!(take(&mut b, 1, Duration::from_secs(5)).await[0].data, "one");
    common::assert_quiet(&mut b, Duration::from_millis(200)).await;
}
