//! The Mercure 0.x checklist (`mercure-0x.md`), item by item, against a real hub.

mod common;

use std::time::Duration;

use common::{assert_quiet, request, take, TestHub, SECRET};
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use ssehub::auth::Key;

fn sign(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn subscriber_token(selectors: &[&str]) -> String {
    sign(json!({"mercure": {"subscribe": selectors}}))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_sse_field_and_multiline_data() {
    let hub = TestHub::start(&[]);
    let mut s = hub.subscribe("topic=t", &[]).await;
    let mut p = hub.publisher().await;
    p.ok(&[
        ("topic", "t"),
        ("data", "a\nb\r\nc"),
        ("id", "my-id"),
        ("type", "book"),
        ("retry", "2500"),
    ])
    .await;
    let e = &take(&mut s, 1, Duration::from_secs(5)).await[0];
    assert_eq!(
        (
            e.id.as_str(),
            e.event_type.as_str(),
            e.data.as_str(),
            e.retry
        ),
        ("my-id", "book", "a\nb\nc", Some(2500))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn uri_templates_match_over_the_wire() {
    let hub = TestHub::start(&[]);
    let mut s = hub
        .subscribe("topic=https%3A%2F%2Fexample.com%2Fbooks%2F%7Bid%7D", &[])
        .await;
    let mut p = hub.publisher().await;
    p.ok(&[
        ("topic", "https://example.com/books/1/reviews"),
        ("data", "no"),
    ])
    .await;
    p.ok(&[("topic", "https://example.com/books/1"), ("data", "yes")])
        .await;
    p.ok(&[
        ("topic", "https://example.com/books/{id}"),
        ("data", "itself"),
    ])
    .await;
    let got: Vec<_> = take(&mut s, 2, Duration::from_secs(5))
        .await
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(got, ["yes", "itself"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn private_updates_reach_only_authorized_subscribers_live_and_replayed() {
    let hub = TestHub::start(&[]);
    let mut anonymous = hub.subscribe("topic=*", &[]).await;
    let allowed_token = subscriber_token(&["https://example.com/users/{id}"]);
    let other_token = subscriber_token(&["https://example.com/other"]);
    let allowed_auth = format!("Bearer {allowed_token}");
    let other_auth = format!("Bearer {other_token}");
    let mut allowed = hub
        .subscribe("topic=*", &[("authorization", &allowed_auth)])
        .await;
    let mut other = hub
        .subscribe("topic=*", &[("authorization", &other_auth)])
        .await;
    let mut p = hub.publisher().await;
    // The alternate topic is the one the token allows.
    let private_id = p
        .ok(&[
            ("topic", "https://example.com/books/1"),
            ("topic", "https://example.com/users/42"),
            ("data", "secret"),
            ("private", "on"),
        ])
        .await;
    p.ok(&[("topic", "https://example.com/books/1"), ("data", "public")])
        .await;

    assert_eq!(
        take(&mut allowed, 2, Duration::from_secs(5)).await[0].data,
        "secret"
    );
    for s in [&mut anonymous, &mut other] {
        let e = take(s, 1, Duration::from_secs(5)).await;
        assert_eq!(e[0].data, "public", "a private update leaked");
    }

    // Replay follows the same rule.
    let mut replay_anon = hub.subscribe("topic=*&lastEventID=earliest", &[]).await;
    assert_eq!(
        take(&mut replay_anon, 1, Duration::from_secs(5)).await[0].data,
        "public"
    );
    assert_quiet(&mut replay_anon, Duration::from_millis(200)).await;
    let q = format!("topic=*&lastEventID=earliest&authorization={allowed_token}");
    let mut replay_ok = hub.subscribe(&q, &[]).await;
    let got = take(&mut replay_ok, 2, Duration::from_secs(5)).await;
    assert_eq!(
        (got[0].id.as_str(), got[0].data.as_str()),
        (private_id.as_str(), "secret")
    );

    // Resuming from the private update's id: the hub does not tell anyone who may not see it
    // that the id exists (GET and HEAD alike), and replays nothing after it for them.
    let path = "/.well-known/mercure?topic=*";
    let anon = [("last-event-id", private_id.as_str())];
    let with = [
        ("last-event-id", private_id.as_str()),
        ("authorization", allowed_auth.as_str()),
    ];
    let ((_, _), h) = request(&hub, Method::HEAD, path, &anon, "").await;
    assert_eq!(h["last-event-id"], "earliest", "HEAD anonymous");
    let ((_, _), h) = request(&hub, Method::HEAD, path, &with, "").await;
    assert_eq!(h["last-event-id"], private_id.as_str(), "HEAD allowed");
    let mut resumed = hub.subscribe("topic=*", &anon).await;
    assert_eq!(resumed.headers["last-event-id"], "earliest");
    assert_quiet(&mut resumed, Duration::from_millis(200)).await;
    let mut resumed_ok = hub.subscribe("topic=*", &with).await;
    assert_eq!(resumed_ok.headers["last-event-id"], private_id.as_str());
    assert_eq!(
        take(&mut resumed_ok, 1, Duration::from_secs(5)).await[0].data,
        "public"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn token_precedence_header_then_query_then_cookie() {
    let hub = TestHub::start(&[]);
    let good = subscriber_token(&["*"]);
    let bad = "not.a.token";
    let refused = |r: Result<ssehub::client::EventStream, ssehub::client::ClientError>| matches!(r, Err(ssehub::client::ClientError::Refused { status, .. }) if status == StatusCode::UNAUTHORIZED);
    let hdr = |t: &str| format!("Bearer {t}");
    let cookie = |t: &str| format!("other=1; mercureAuthorization={t}");
    // Header wins over query and cookie.
    assert!(hub
        .try_subscribe(
            &format!("topic=a&authorization={bad}"),
            &[("authorization", &hdr(&good)), ("cookie", &cookie(bad))]
        )
        .await
        .is_ok());
    assert!(refused(
        hub.try_subscribe(
            &format!("topic=a&authorization={good}"),
            &[("authorization", &hdr(bad))]
        )
        .await
    ));
    // Query wins over cookie.
    assert!(hub
        .try_subscribe(
            &format!("topic=a&authorization={good}"),
            &[("cookie", &cookie(bad))]
        )
        .await
        .is_ok());
    assert!(refused(
        hub.try_subscribe(
            &format!("topic=a&authorization={bad}"),
            &[("cookie", &cookie(&good))]
        )
        .await
    ));
    // Cookie alone.
    assert!(hub
        .try_subscribe("topic=a", &[("cookie", &cookie(&good))])
        .await
        .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn cookie_publishing_needs_an_allowed_origin() {
    let hub = TestHub::start(&["--publish-origins", "https://app.example.com"]);
    let token = hub.publisher_token();
    let cookie = format!("mercureAuthorization={token}");
    let form = ("content-type", "application/x-www-form-urlencoded");
    let post = |headers: Vec<(&'static str, String)>| {
        let hub = &hub;
        let cookie = cookie.clone();
        async move {
            let mut h: Vec<(&str, &str)> = vec![form, ("cookie", &cookie)];
            for (k, v) in &headers {
                h.push((k, v));
            }
            request(
                hub,
                Method::POST,
                "/.well-known/mercure",
                &h,
                "topic=a&data=x",
            )
            .await
            .0
        }
    };
    // A presentation the hub refuses: RFC 6750's 400 invalid_request (mercure-1.0.md §9.3
    // row 20: one error form for both versions; 0.x answered 403).
    let (status, reason) = post(vec![]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("Origin"), "{reason}");
    let (status, reason) = post(vec![("origin", "https://evil.example".into())]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("--publish-origins"), "{reason}");
    assert_eq!(
        post(vec![("origin", "https://app.example.com".into())])
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        post(vec![("referer", "https://app.example.com/page?x=1".into())])
            .await
            .0,
        StatusCode::OK
    );
    // A bearer token needs no origin.
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "a")]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_is_disconnected_when_its_token_expires() {
    let hub = TestHub::start(&[]);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let token = sign(json!({"exp": exp, "mercure": {"subscribe": ["*"]}}));
    let mut s = hub
        .subscribe("topic=a", &[("authorization", &format!("Bearer {token}"))])
        .await;
    let end = tokio::time::timeout(Duration::from_secs(10), s.next()).await;
    assert!(matches!(end, Ok(Ok(None))), "the stream ended: {end:?}");
    assert!(hub.wait_for_log("token expired", Duration::from_secs(5)));
    assert_eq!(
        hub.metric("ssehub_subscribers_dropped_total{reason=\"expired\"}")
            .await,
        1.0
    );
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_past_its_exp_opens_no_stream_even_within_the_leeway() {
    // The 5 s leeway for clock skew lets this token through verification; it must still not
    // open a stream (which would send its replay before closing).
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    p.ok(&[("topic", "a"), ("data", "before"), ("private", "on")])
        .await;
    let token = sign(json!({"exp": unix_now() - 2, "mercure": {"subscribe": ["*"]}}));
    let bearer = format!("Bearer {token}");
    let headers = [
        ("authorization", bearer.as_str()),
        ("last-event-id", "earliest"),
    ];
    let ((status, body), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure?topic=a",
        &headers,
        "",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("expired"), "{body}");
    assert!(!body.contains("before"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_expiring_during_a_long_replay_stops_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start(&["--history-size", "400"]);
    let mut p = hub.publisher().await;
    let big = "x".repeat(40_000);
    for _ in 0..300 {
        p.ok(&[("topic", "a"), ("data", &big)]).await;
    }
    // 12 MB of replay, far more than the sockets hold: the client reads nothing until its
    // token has expired, then everything until the hub closes.
    let token = sign(json!({"exp": unix_now() + 2, "mercure": {"subscribe": ["*"]}}));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(hub.addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\
             Authorization: Bearer {token}\r\nLast-Event-ID: earliest\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut raw))
        .await
        .expect("the hub closes the stream")
        .unwrap();
    let events = String::from_utf8_lossy(&raw).matches("data: x").count();
    assert!(events > 0, "the replay started");
    assert!(
        events < 300,
        "the replay went on past exp: {events} of 300 events"
    );
    assert!(hub.wait_for_log("token expired", Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_on_idle_streams() {
    let hub = TestHub::start(&["--heartbeat", "100ms"]);
    let mut s = hub.subscribe("topic=a", &[]).await;
    assert_quiet(&mut s, Duration::from_millis(550)).await;
    assert!(
        s.comments() >= 3,
        "opening comment plus heartbeats: {}",
        s.comments()
    );
}

/// Reads `s` until its count of comment lines passes `seen`; fails on an event or after `within`.
async fn next_comment(s: &mut ssehub::client::EventStream, seen: u64, within: Duration) {
    // `next` returns only events, so read in short turns and look at the count in between
    // (it is cancel-safe: a frame is parsed as soon as it arrives).
    let deadline = tokio::time::Instant::now() + within;
    while s.comments() <= seen {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no heartbeat within {within:?}"
        );
        if let Ok(e) = tokio::time::timeout(Duration::from_millis(20), s.next()).await {
            panic!("expected only heartbeats, got {e:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_heartbeat_comes_within_an_interval_of_the_last_update() {
    // An update right after a heartbeat restarts the wait: the next heartbeat comes about one
    // interval after the update, not two (one tick per interval plus a flag would make it two).
    let hub = TestHub::start(&["--heartbeat", "1s"]);
    let mut s = hub.subscribe("topic=a", &[]).await;
    let mut p = hub.publisher().await;
    let seen = s.comments();
    next_comment(&mut s, seen, Duration::from_secs(5)).await;
    p.ok(&[("topic", "a"), ("data", "x")]).await;
    take(&mut s, 1, Duration::from_secs(5)).await;
    let after_update = std::time::Instant::now();
    let seen = s.comments();
    next_comment(&mut s, seen, Duration::from_secs(5)).await;
    let gap = after_update.elapsed();
    assert!(
        gap >= Duration::from_millis(500) && gap < Duration::from_millis(1600),
        "heartbeat {gap:?} after the update"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cors_with_an_origin_list_and_with_a_wildcard() {
    let hub = TestHub::start(&["--cors-origins", "https://app.example.com"]);
    let preflight = |origin: &'static str| {
        let hub = &hub;
        async move {
            request(
                hub,
                Method::OPTIONS,
                "/.well-known/mercure?topic=a",
                &[
                    ("origin", origin),
                    ("access-control-request-method", "GET"),
                    (
                        "access-control-request-headers",
                        "last-event-id, authorization, cache-control",
                    ),
                ],
                "",
            )
            .await
        }
    };
    let ((status, _), h) = preflight("https://app.example.com").await;
    assert!(status.is_success());
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["last-event-id", "authorization", "cache-control"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let (_, h) = preflight("https://evil.example").await;
    assert!(!h.contains_key("access-control-allow-origin"));
    // The actual response carries the headers too.
    let ((status, _), h) = request(
        &hub,
        Method::HEAD,
        "/events/",
        &[("origin", "https://app.example.com")],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");

    let any = TestHub::start(&["--cors-origins", "*"]);
    let ((_, _), h) = request(
        &any,
        Method::HEAD,
        "/events/",
        &[("origin", "https://x.example")],
        "",
    )
    .await;
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(!h.contains_key("access-control-allow-credentials"));
}

#[tokio::test(flavor = "multi_thread")]
async fn asymmetric_keys_and_refused_algorithms() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    for (alg, name) in [("RS256", "rsa"), ("ES256", "ec"), ("EdDSA", "ed")] {
        let public = format!("{keys}/{name}-public.pem");
        let private = format!("{keys}/{name}-private.pem");
        let hub = TestHub::start(&["--jwt-algorithm", alg, "--publisher-jwt-key", &public]);
        let algorithm = ssehub::auth::parse_algorithm(alg).unwrap();
        let signer = Key::load_signing(algorithm, &private).unwrap();
        let token = signer.mint(Some(&["*".to_owned()]), None, None).unwrap();
        let mut conn = ssehub::client::Connection::open(&hub.target("/.well-known/mercure"))
            .await
            .unwrap();
        let (status, body) = conn.publish(Some(&token), &[("topic", "a")]).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{alg}: {body}");
        // An HS256 token is refused by a hub that expects another algorithm.
        let hs = Key::secret(Algorithm::HS256, b"whatever")
            .mint(Some(&["*".to_owned()]), None, None)
            .unwrap();
        let (status, body) = conn.publish(Some(&hs), &[("topic", "a")]).await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{alg}: {body}");
    }

    // Algorithm confusion: an HS256 token whose secret is the RSA public key, sent to an RS256 hub.
    let public = format!("{keys}/rsa-public.pem");
    let hub = TestHub::start(&["--jwt-algorithm", "RS256", "--publisher-jwt-key", &public]);
    let pem = std::fs::read(&public).unwrap();
    let forged = Key::secret(Algorithm::HS256, &pem)
        .mint(Some(&["*".to_owned()]), None, None)
        .unwrap();
    let mut conn = ssehub::client::Connection::open(&hub.target("/.well-known/mercure"))
        .await
        .unwrap();
    let (status, body) = conn
        .publish(Some(&forged), &[("topic", "a")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("algorithm"), "{body}");

    // alg: none, against the default HS256 hub.
    let hub = TestHub::start(&[]);
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(br#"{"mercure":{"publish":["*"]}}"#)
    );
    let mut conn = ssehub::client::Connection::open(&hub.target("/.well-known/mercure"))
        .await
        .unwrap();
    let (status, _) = conn.publish(Some(&none), &[("topic", "a")]).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Wrong key.
    let wrong = Key::secret(Algorithm::HS256, b"not the hub's")
        .mint(Some(&["*".to_owned()]), None, None)
        .unwrap();
    let (status, body) = conn.publish(Some(&wrong), &[("topic", "a")]).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("signature"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_api_refuses_a_token_past_its_exp() {
    // Within the 5 s leeway verification passes; the API must still refuse it, as a stream does.
    let hub = TestHub::start(&["--subscriptions"]);
    let rights = json!(["/.well-known/mercure/subscriptions{/topic}{/subscriber}"]);
    let path = "/.well-known/mercure/subscriptions";
    let fresh = format!(
        "Bearer {}",
        sign(json!({"exp": unix_now() + 60, "mercure": {"subscribe": rights}}))
    );
    let ((status, body), _) =
        request(&hub, Method::GET, path, &[("authorization", &fresh)], "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stale = format!(
        "Bearer {}",
        sign(json!({"exp": unix_now() - 2, "mercure": {"subscribe": rights}}))
    );
    let ((status, body), _) =
        request(&hub, Method::GET, path, &[("authorization", &stale)], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_authorization_headers_are_refused() {
    // A proxy that checks the first and a hub that used the second (or the reverse) would
    // disagree on who is asking: the hub takes neither (400 invalid_request, Mercure 1.0 §5.4).
    let hub = TestHub::start(&["--anonymous", "false"]);
    let good = format!("Bearer {}", hub.publisher_token());
    let other = format!("Bearer {}", sign(json!({"mercure": {"publish": []}})));
    let body = "topic=a&data=twice";
    let form = ("content-type", "application/x-www-form-urlencoded");
    let ((status, text), _) = request(
        &hub,
        Method::POST,
        "/.well-known/mercure",
        &[("authorization", &good), ("authorization", &other), form],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("several Authorization headers"), "{text}");
    // (Bounded: a stream opened by mistake would never end.)
    let within = Duration::from_secs(10);
    let ((status, text), _) = tokio::time::timeout(
        within,
        request(
            &hub,
            Method::GET,
            "/.well-known/mercure?topic=a",
            &[("authorization", &other), ("authorization", &good)],
            "",
        ),
    )
    .await
    .expect("a stream was opened");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    // The same for several `authorization` query parameters.
    let both = format!(
        "authorization={}&authorization={}",
        hub.publisher_token(),
        sign(json!({"mercure": {"subscribe": ["*"]}}))
    );
    let ((status, text), _) = request(
        &hub,
        Method::POST,
        &format!("/.well-known/mercure?{both}"),
        &[form],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("several authorization query"), "{text}");
    let ((status, text), _) = tokio::time::timeout(
        within,
        request(
            &hub,
            Method::GET,
            &format!("/.well-known/mercure?topic=a&{both}"),
            &[],
            "",
        ),
    )
    .await
    .expect("a stream was opened");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    // One header still works, and nothing was published by the refused request.
    let ((status, text), _) = request(
        &hub,
        Method::POST,
        "/.well-known/mercure",
        &[("authorization", &good), form],
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(
        hub.metric("ssehub_updates_published_total{outcome=\"accepted\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_events_and_api() {
    let hub = TestHub::start(&["--subscriptions"]);
    let watcher_token = sign(
        json!({"mercure": {"subscribe": ["/.well-known/mercure/subscriptions{/topic}{/subscriber}"]}}),
    );
    let watch_auth = format!("Bearer {watcher_token}");
    let mut watcher = hub
        .subscribe(
            "topic=%2F.well-known%2Fmercure%2Fsubscriptions%7B%2Ftopic%7D%7B%2Fsubscriber%7D",
            &[("authorization", &watch_auth)],
        )
        .await;
    let payload_token =
        sign(json!({"mercure": {"subscribe": ["x"], "payload": {"user": "alice"}}}));
    let s = hub
        .subscribe(
            "topic=https%3A%2F%2Fexample.com%2Fa",
            &[("authorization", &format!("Bearer {payload_token}"))],
        )
        .await;
    // The watcher first hears of its own subscription, then of the new one.
    let evs = take(&mut watcher, 2, Duration::from_secs(5)).await;
    let own: serde_json::Value = serde_json::from_str(&evs[0].data).unwrap();
    assert_eq!(
        own["topic"],
        "/.well-known/mercure/subscriptions{/topic}{/subscriber}"
    );
    let ev = &evs[1];
    let doc: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(doc["@context"], "https://mercure.rocks/");
    assert_eq!(doc["type"], "Subscription");
    assert_eq!(doc["topic"], "https://example.com/a");
    assert_eq!(doc["active"], true);
    assert_eq!(doc["payload"]["user"], "alice");
    let subscriber = doc["subscriber"].as_str().unwrap().to_owned();
    assert!(subscriber.starts_with("urn:uuid:"));
    let id = doc["id"].as_str().unwrap().to_owned();
    assert_eq!(
        id,
        format!(
            "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fa/{}",
            subscriber.replace(':', "%3A")
        )
    );

    // The API.
    let ((status, body), h) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions",
        &[("authorization", &watch_auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "application/ld+json");
    assert_eq!(h["cache-control"], "private, no-store");
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(all["type"], "Subscriptions");
    let last = all["lastEventID"].as_str().unwrap().to_owned();
    // An entity tag is a quoted string (RFC 9110 §8.8.3).
    let tag = format!("\"{last}\"");
    assert_eq!(h["etag"], tag.as_str());
    let topics: Vec<_> = all["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["topic"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        topics.contains(&"https://example.com/a".to_owned()),
        "{topics:?}"
    );
    let ((status, _), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions",
        &[("authorization", &watch_auth), ("if-none-match", &tag)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    // A bare id is not the tag.
    let ((status, _), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions",
        &[("authorization", &watch_auth), ("if-none-match", &last)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let ((status, body), _) = request(
        &hub,
        Method::GET,
        &id,
        &[("authorization", &watch_auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let one: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(one["subscriber"], subscriber.as_str());
    assert!(one["lastEventID"].is_string());
    let ((status, body), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fa",
        &[("authorization", &watch_auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["subscriptions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let ((status, _), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions/x/urn%3Auuid%3Anope",
        &[("authorization", &watch_auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // No token: 401; a token that does not match the URL: 403.
    assert_eq!(
        request(
            &hub,
            Method::GET,
            "/.well-known/mercure/subscriptions",
            &[],
            ""
        )
        .await
        .0
         .0,
        StatusCode::UNAUTHORIZED
    );
    let narrow = format!("Bearer {}", subscriber_token(&["https://example.com/a"]));
    assert_eq!(
        request(
            &hub,
            Method::GET,
            "/.well-known/mercure/subscriptions",
            &[("authorization", &narrow)],
            ""
        )
        .await
        .0
         .0,
        StatusCode::FORBIDDEN
    );
    // A query that cannot be read is refused, not skipped: skipping it would drop its bad
    // `authorization` and answer with the cookie's rights.
    let cookie = format!("mercureAuthorization={watcher_token}");
    for query in ["authorization=x.y.z&x=%zz", "authorization=x.y.z"] {
        let ((status, body), _) = request(
            &hub,
            Method::GET,
            &format!("/.well-known/mercure/subscriptions?{query}"),
            &[("cookie", &cookie)],
            "",
        )
        .await;
        assert!(status.is_client_error(), "{query}: {status} {body}");
    }

    // The subscription ends: an inactive event.
    drop(s);
    let ev = &take(&mut watcher, 1, Duration::from_secs(5)).await[0];
    let doc: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(
        (doc["active"].as_bool(), doc["subscriber"].as_str()),
        (Some(false), Some(subscriber.as_str()))
    );
    // Anonymous subscribers never see these private events.
    let mut anon = hub.subscribe("topic=*", &[]).await;
    let _other = hub.subscribe("topic=b", &[]).await;
    assert_quiet(&mut anon, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_api_is_off_by_default() {
    let hub = TestHub::start(&[]);
    let auth = format!("Bearer {}", subscriber_token(&["*"]));
    let ((status, body), _) = request(
        &hub,
        Method::GET,
        "/.well-known/mercure/subscriptions",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("--subscriptions"));
}
