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
    let mut hub = TestHub::start_process(&[]);
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

/// The figures as a 1.0 client reads them: an access token (`typ: at+jwt`) for this hub, in
/// the header or the cookie; refusals carry the RFC 6750 challenge that subscribing would.
#[tokio::test]
async fn figures_take_a_mercure_1_0_token_and_refuse_with_challenges() {
    let hub = TestHub::start(&[]);
    let aud = hub.url("/.well-known/mercure");
    let token = hub.access_token(&aud, &[], &[("exact", "https://example.com/a")]);
    let bearer = format!("Bearer {token}");
    let cookie = format!("__Secure-mercure_access_token={token}");
    for (name, value) in [("authorization", &bearer), ("cookie", &cookie)] {
        let mut stats = ssehub::client::EventStream::open(
            &hub.target("/ui/stats"),
            &[(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_str(value).unwrap(),
            )]
            .into_iter()
            .collect(),
        )
        .await
        .unwrap_or_else(|e| panic!("a 1.0 token in the {name} header: {e}"));
        let events = take(&mut stats, 1, Duration::from_secs(10)).await;
        let snapshot: serde_json::Value = serde_json::from_str(&events[0].data).unwrap();
        assert!(snapshot["history_length"].is_number(), "{snapshot}");
    }

    let metadata = hub.url("/.well-known/oauth-protected-resource/.well-known/mercure");
    let (status, body, challenge) = refusal(&hub, "/ui/stats", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        challenge,
        format!("Bearer resource_metadata=\"{metadata}\"")
    );

    let elsewhere = hub.access_token("https://other.example/.well-known/mercure", &[], &[]);
    let (status, body, challenge) = refusal(
        &hub,
        "/ui/stats",
        &[("authorization", &format!("Bearer {elsewhere}"))],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        challenge,
        format!("Bearer error=\"invalid_token\", resource_metadata=\"{metadata}\"")
    );
    assert!(
        body.contains("aud"),
        "the reason names the audience: {body}"
    );

    // A 1.0 token is never read from a URL (it would end up in logs): 400 invalid_request.
    let (status, body, challenge) =
        refusal(&hub, &format!("/ui/stats?authorization={token}"), &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        challenge.starts_with("Bearer error=\"invalid_request\""),
        "{challenge}"
    );

    // A hub serving one protocol takes only its own tokens, here as on the Mercure endpoint.
    let only_1_0 = TestHub::start(&["--protocol", "1.0"]);
    let legacy = format!("Bearer {}", only_1_0.publisher_token());
    let (status, body, challenge) =
        refusal(&only_1_0, "/ui/stats", &[("authorization", &legacy)]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert!(body.contains("1.0 only"), "{body}");
    let v1 = only_1_0.access_token(&only_1_0.url("/.well-known/mercure"), &[], &[]);
    let stats = ssehub::client::EventStream::open(
        &only_1_0.target("/ui/stats"),
        &[(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(&format!("Bearer {v1}")).unwrap(),
        )]
        .into_iter()
        .collect(),
    )
    .await;
    assert!(stats.is_ok(), "a 1.0 token on a 1.0 hub: {:?}", stats.err());

    let only_0_x = TestHub::start(&["--protocol", "0.x"]);
    let v1 = only_0_x.access_token(&only_0_x.url("/.well-known/mercure"), &[], &[]);
    let (status, body, _) = refusal(
        &only_0_x,
        "/ui/stats",
        &[("authorization", &format!("Bearer {v1}"))],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("0.x only"), "{body}");
}

/// A refused request's status, body and `WWW-Authenticate` challenge (empty if none). Fails
/// if the request is not answered in time (a stream opened instead).
async fn refusal(
    hub: &TestHub,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let ((status, body), headers) = tokio::time::timeout(
        Duration::from_secs(10),
        common::request(hub, http::Method::GET, path, headers, ""),
    )
    .await
    .unwrap_or_else(|_| panic!("{path} was not refused: a stream opened"));
    let challenge = headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, body, challenge)
}
