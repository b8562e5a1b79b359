//! The dashboard's HTTP side, without a browser: the page is served, its figures stream needs
//! a token, sends the hub's figures, and ends when the hub shuts down.

mod common;

use std::time::Duration;

use common::{get, take, TestHub};
use http::StatusCode;

#[tokio::test]
async fn the_page_is_built_in() {
    let hub = TestHub::start(&[]);
    let ((status, body), headers) = common::request(&hub, http::Method::GET, "/ui/", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<title>ssehub dashboard</title>"), "{body}");
    // The dashboard holds a token: no other site may frame it.
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    for outside in ["src=\"http", "href=\"http", "url(http"] {
        assert!(!body.contains(outside), "no outside resource: {outside}");
    }
}

#[tokio::test]
async fn figures_need_a_valid_token() {
    let hub = TestHub::start(&[]);
    let (status, body) = get(&hub, "/ui/stats", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.starts_with("missing token"), "{body}");
    assert_eq!(body.lines().count(), 1, "one line: {body}");

    let foreign = ssehub::auth::Key::secret(jsonwebtoken::Algorithm::HS256, b"another key")
        .mint(Some(&["*".to_owned()]), None, None)
        .unwrap();
    let (status, body) = get(&hub, &format!("/ui/stats?authorization={foreign}"), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.starts_with("invalid token"), "{body}");

    // With two keys, the reason is the signing key's: here, expired.
    let two = TestHub::start(&["--subscriber-jwt-key", "the subscribers' own key"]);
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"exp": 1_000_000, "mercure": {"publish": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap();
    let (status, body) = get(&two, &format!("/ui/stats?authorization={expired}"), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("expired"), "{body}");

    // Two seconds past exp is within the leeway for clock skew, and still refused (bounded:
    // without the check a stream would open and end only at once).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let just_expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"exp": now - 2, "mercure": {"publish": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap();
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        get(
            &hub,
            &format!("/ui/stats?authorization={just_expired}"),
            &[],
        ),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test]
async fn figures_stream_the_hubs_metrics_and_end_at_shutdown() {
    let mut hub = TestHub::start(&[]);
    let token = hub.publisher_token();
    let mut publisher = hub.publisher().await;
    for i in 0..3 {
        publisher
            .ok(&[("topic", "t"), ("data", &i.to_string())])
            .await;
    }
    let mut stats = ssehub::client::EventStream::open(
        &hub.target("/ui/stats"),
        &[(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        )]
        .into_iter()
        .collect(),
    )
    .await
    .unwrap();
    let events = take(&mut stats, 2, Duration::from_secs(10)).await;
    let last: serde_json::Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(last["updates_published"], 3);
    assert_eq!(last["history_length"], 3);
    assert_eq!(last["slow_subscribers_dropped"], 0);
    assert!(last["updates_per_second"].is_number(), "{last}");
    assert!(last["deliveries_per_second"].is_number(), "{last}");

    hub.terminate();
    let exit = hub
        .wait_exit(Duration::from_secs(10))
        .expect("the hub exits with a figures stream open");
    assert!(exit.success(), "{exit:?}");
}
