//! `/metrics` is valid Prometheus text, read by an independent parser, and its figures follow
//! what happened.

mod common;

use std::time::Duration;

use common::{request, take, TestHub};
use http::{Method, StatusCode};
use prometheus_parse::{Scrape, Value};

async fn scrape(hub: &TestHub) -> Scrape {
    let ((status, body), headers) = request(hub, Method::GET, "/metrics", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text")
}

fn value(s: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    let sample = s
        .samples
        .iter()
        .find(|m| m.metric == name && label.is_none_or(|(k, v)| m.labels.get(k) == Some(v)))
        .unwrap_or_else(|| panic!("{name} {label:?} missing"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        other => panic!("{name}: unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_follow_the_hub() {
    let hub = TestHub::start(&["--history-size", "2"]);
    let mut a = hub.subscribe("topic=x", &[]).await;
    let _b = hub.subscribe("topic=x", &[]).await;
    let mut p = hub.publisher().await;
    for i in 0..3 {
        p.ok(&[("topic", "x"), ("data", &i.to_string())]).await;
    }
    assert_eq!(
        p.publish(&[("data", "no topic")]).await.0,
        StatusCode::BAD_REQUEST
    );
    take(&mut a, 3, Duration::from_secs(5)).await;

    let s = scrape(&hub).await;
    assert_eq!(value(&s, "ssehub_subscribers_connected", None), 2.0);
    assert_eq!(value(&s, "ssehub_subscribers_total", None), 2.0);
    assert_eq!(value(&s, "ssehub_deliveries_total", None), 6.0);
    assert_eq!(value(&s, "ssehub_history_length", None), 2.0);
    assert_eq!(
        value(
            &s,
            "ssehub_updates_published_total",
            Some(("outcome", "accepted"))
        ),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "ssehub_updates_published_total",
            Some(("outcome", "rejected"))
        ),
        1.0
    );
    for reason in ["slow", "expired", "shutdown"] {
        assert_eq!(
            value(
                &s,
                "ssehub_subscribers_dropped_total",
                Some(("reason", reason))
            ),
            0.0
        );
    }
    assert_eq!(value(&s, "ssehub_publish_duration_seconds", None), 3.0);
}
