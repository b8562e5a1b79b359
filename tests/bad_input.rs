//! Every bad input gets a clear status and a one-line reason, and the hub keeps serving.

mod common;

use std::time::Duration;

use common::{get, request, take, TestHub};
use http::{Method, StatusCode};

async fn post(hub: &TestHub, body: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    h.extend_from_slice(headers);
    request(hub, Method::POST, "/.well-known/mercure", &h, body)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_refusals() {
    let hub = TestHub::start(&["--max-body", "16KiB"]);
    let mut watcher = hub.subscribe("topic=*", &[]).await;
    let good = format!("Bearer {}", hub.publisher_token());
    let auth = [("authorization", good.as_str())];
    let only_other = format!(
        "Bearer {}",
        hub.key
            .mint(Some(&["other".to_owned()]), None, None)
            .unwrap()
    );
    let no_claim = format!(
        "Bearer {}",
        hub.key.mint(None, Some(&["*".to_owned()]), None).unwrap()
    );
    let expired = format!("Bearer {}", {
        // exp well past the 5 s leeway.
        let claims = serde_json::json!({"exp": 1_000_000, "mercure": {"publish": ["*"]}});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(common::SECRET.as_bytes()),
        )
        .unwrap()
    });
    let many_topics = (0..1001)
        .map(|i| format!("topic=t{i}"))
        .collect::<Vec<_>>()
        .join("&");
    let big = format!("topic=a&data={}", "x".repeat(17 * 1024));
    // (case, body, headers, status, a word the reason must contain)
    type Case<'a> = (
        &'a str,
        String,
        Vec<(&'a str, &'a str)>,
        StatusCode,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "no topic",
            "data=x".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "topic",
        ),
        (
            "bad escape",
            "topic=a&data=%zz".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "malformed",
        ),
        (
            "invalid UTF-8",
            "topic=a&data=%ff%fe".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            "retry",
            "topic=a&retry=soon".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "retry",
        ),
        (
            "LF in id",
            "topic=a&id=a%0Ab".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "id",
        ),
        (
            "CR in id",
            "topic=a&id=a%0Db".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "id",
        ),
        (
            "NUL in type",
            "topic=a&type=a%00b".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "type",
        ),
        (
            "LF in type",
            "topic=a&type=a%0Ab".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "type",
        ),
        (
            "# id",
            "topic=a&id=%23frag".into(),
            auth.to_vec(),
            StatusCode::BAD_REQUEST,
            "#",
        ),
        (
            "1001 topics",
            many_topics,
            auth.to_vec(),
            // Mercure 1.0 §4: limits are 413 (0.x answered 400).
            StatusCode::PAYLOAD_TOO_LARGE,
            "topic",
        ),
        (
            "too large",
            big,
            auth.to_vec(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "max-body",
        ),
        (
            "no token",
            "topic=a".into(),
            vec![],
            StatusCode::UNAUTHORIZED,
            "missing token",
        ),
        (
            "garbage token",
            "topic=a".into(),
            vec![("authorization", "Bearer abc.def.ghi")],
            StatusCode::UNAUTHORIZED,
            "invalid token",
        ),
        (
            "not bearer",
            "topic=a".into(),
            vec![("authorization", "Basic abc")],
            // Mercure 1.0 §5.4: a token presented wrongly is an invalid_request.
            StatusCode::BAD_REQUEST,
            "Bearer",
        ),
        (
            "expired",
            "topic=a".into(),
            vec![("authorization", expired.as_str())],
            StatusCode::UNAUTHORIZED,
            "expired",
        ),
        (
            "wrong topic",
            "topic=a".into(),
            vec![("authorization", only_other.as_str())],
            StatusCode::FORBIDDEN,
            "may not publish",
        ),
        (
            "one topic of two",
            "topic=other&topic=a".into(),
            vec![("authorization", only_other.as_str())],
            StatusCode::FORBIDDEN,
            "\"a\"",
        ),
        (
            "no publish claim",
            "topic=a".into(),
            vec![("authorization", no_claim.as_str())],
            StatusCode::FORBIDDEN,
            "mercure.publish",
        ),
        (
            "reserved",
            "topic=https%3A%2F%2Fx%2F.well-known%2Fmercure%2Fsubscriptions".into(),
            auth.to_vec(),
            // Mercure 1.0: a topic no token could make valid is a bad request.
            StatusCode::BAD_REQUEST,
            "reserved",
        ),
    ];
    for (name, body, headers, status, reason) in cases {
        let (got, text) = post(&hub, &body, &headers).await;
        assert_eq!(got, status, "{name}: {text}");
        assert!(
            text.contains(reason),
            "{name}: reason {text:?} lacks {reason:?}"
        );
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text:?}");
    }
    let (got, _) = request(
        &hub,
        Method::POST,
        "/.well-known/mercure",
        &[
            ("content-type", "application/json"),
            ("authorization", &good),
        ],
        "{}",
    )
    .await
    .0;
    assert_eq!(got, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Nothing refused reached the subscriber, and the hub still works.
    let (status, id) = post(&hub, "topic=a&data=fine", &auth).await;
    assert_eq!(status, StatusCode::OK);
    let e = take(&mut watcher, 1, Duration::from_secs(5)).await;
    assert_eq!(
        (e[0].data.as_str(), e[0].id.as_str()),
        ("fine", id.as_str())
    );
    assert!(
        hub.metric("ssehub_updates_published_total{outcome=\"rejected\"}")
            .await
            >= 19.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_refusals() {
    let hub = TestHub::start(&[]);
    let many = (0..1001)
        .map(|i| format!("topic=t{i}"))
        .collect::<Vec<_>>()
        .join("&");
    let long = format!("topic={}", "a".repeat(5000));
    let templates = (0..65)
        .map(|i| format!("topic=t{i}%7Bx%7D"))
        .collect::<Vec<_>>()
        .join("&");
    for (query, headers, status) in [
        ("", vec![], StatusCode::BAD_REQUEST),
        ("topic=%zz", vec![], StatusCode::BAD_REQUEST),
        (many.as_str(), vec![], StatusCode::BAD_REQUEST),
        (long.as_str(), vec![], StatusCode::BAD_REQUEST),
        (templates.as_str(), vec![], StatusCode::BAD_REQUEST),
        (
            "topic=a",
            vec![("authorization", "Bearer nope")],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "topic=a&authorization=nope",
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "topic=a",
            vec![("cookie", "mercureAuthorization=nope")],
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        match hub.try_subscribe(query, &headers).await {
            Err(ssehub::client::ClientError::Refused { status: s, reason }) => {
                assert_eq!(s, status, "{query:.40}: {reason}");
                assert!(!reason.is_empty());
            }
            Err(e) => panic!("{query:.40}: {e}"),
            Ok(_) => panic!("{query:.40}: accepted"),
        }
    }
    // HEAD is refused as GET is.
    for query in [templates.as_str(), long.as_str(), many.as_str()] {
        let path = format!("/.well-known/mercure?{query}");
        let ((status, reason), _) = request(&hub, Method::HEAD, &path, &[], "").await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "HEAD {query:.40}: {reason}"
        );
    }
    let closed = TestHub::start(&["--anonymous", "false"]);
    match closed.try_subscribe("topic=a", &[]).await {
        Err(ssehub::client::ClientError::Refused { status, reason }) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(reason.contains("missing token"), "{reason}");
        }
        _ => panic!("anonymous subscriber accepted"),
    }
    assert_eq!(get(&hub, "/healthz", &[]).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_heads_and_too_many_subscribers() {
    let hub = TestHub::start(&["--max-connections", "2"]);
    let huge = "a".repeat(70 * 1024);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    raw.write_all(format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    drop(raw);
    // Connections count against --max-connections until the hub has seen them close (this
    // one, and the short ones the test makes): a subscriber that finds the hub full of them
    // tries again.
    let subscribe = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match hub.try_subscribe("topic=a", &[]).await {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("503"), "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };

    let _a = subscribe().await;
    let _b = subscribe().await;
    let ((status, reason), headers) =
        request(&hub, Method::GET, "/.well-known/mercure?topic=a", &[], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
    assert!(headers.contains_key("retry-after"));
    // HEAD answers as GET would.
    let ((status, _), _) =
        request(&hub, Method::HEAD, "/.well-known/mercure?topic=a", &[], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    drop(_a);
    let _c = subscribe().await;
}

/// A head HTTP cannot read (a raw space in the URL, a header without a colon) is refused with
/// a reason, not an empty `400` (hyper's).
#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_request_head_is_told_why() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start(&[]);
    for (head, reason) in [
        ("GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "encoded as %20"),
        (
            "GET /.well-known/mercure?topic=a b HTTP/1.1\r\nHost: x\r\n\r\n",
            "encoded as %20",
        ),
        (
            "POST /.well-known/mercure?x=a b HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "encoded as %20",
        ),
        (
            "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
            "malformed header line",
        ),
    ] {
        let mut raw = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        raw.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
            .await
            .expect("the hub answers and closes")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{head:?}: {answer}");
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(body.contains(reason), "{head:?}: {answer}");
        assert_eq!(body.lines().count(), 1, "one line: {answer}");
    }
    assert_eq!(get(&hub, "/healthz", &[]).await.0, StatusCode::OK);
}
