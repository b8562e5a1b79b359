//! Mercure 1.0's publish validations (mercure-1.0.md §4), applied to every publish whatever
//! the dialect of the token: each refusal is a 400 with a reason, given before the token's
//! scope is looked at, on both of the hub's HTTP/1.1 paths; legitimate look-alikes publish.

mod common;

use std::time::Duration;

use common::{assert_quiet, read_until, request, take, TestHub};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn post(hub: &TestHub, token: &str, body: &str) -> (StatusCode, String) {
    let auth = format!("Bearer {token}");
    let headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("authorization", auth.as_str()),
    ];
    let ((status, text), _) =
        request(hub, Method::POST, "/.well-known/mercure", &headers, body).await;
    (status, text)
}

/// `%`-escapes a form value (every byte but unreserved ones).
fn esc(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_1_0_rule_is_a_400_with_a_reason() {
    let hub = TestHub::start(&[]);
    let mut watcher = hub.subscribe("topic=*", &[]).await;
    let token = hub.publisher_token();
    // (case, body, a word the reason must contain)
    let mut cases: Vec<(String, String, &str)> = vec![
        (
            "type=mercure".into(),
            "topic=a&type=mercure".into(),
            "mercure",
        ),
        ("id #x".into(), "topic=a&id=%23x".into(), "#"),
        (
            "id earliest".into(),
            "topic=a&id=earliest".into(),
            "earliest",
        ),
        ("retry +5".into(), "topic=a&retry=%2B5".into(), "retry"),
        ("retry 1e3".into(), "topic=a&retry=1e3".into(), "retry"),
        ("retry -1".into(), "topic=a&retry=-1".into(), "retry"),
        (
            "retry overflow".into(),
            "topic=a&retry=99999999999999999999".into(),
            "retry",
        ),
        ("topic *".into(), "topic=*".into(), "\"*\""),
        ("alternate *".into(), "topic=a&topic=*".into(), "\"*\""),
        (
            "data not UTF-8".into(),
            "topic=a&data=%C3%28".into(),
            "UTF-8",
        ),
    ];
    // Controls and invisible format characters, in each field that becomes part of an event.
    for (what, ch) in [
        ("tab", "\t"),
        ("DEL", "\u{7f}"),
        ("C1 NEL", "\u{85}"),
        ("zero-width space", "\u{200b}"),
        ("right-to-left override", "\u{202e}"),
        ("byte order mark", "\u{feff}"),
        ("tag character", "\u{e0041}"),
    ] {
        let v = esc(&format!("a{ch}b"));
        cases.push((format!("{what} in id"), format!("topic=a&id={v}"), "id"));
        cases.push((
            format!("{what} in type"),
            format!("topic=a&type={v}"),
            "type",
        ));
        cases.push((format!("{what} in topic"), format!("topic={v}"), "topic"));
    }
    // The reserved namespace, however it is spelt.
    for topic in [
        "/.well-known/mercure",
        "/.well-known/mercure/subscriptions",
        "/.well-known/mercure/subscriptions/exact/a/b",
        "/.well-known/%6Dercure/subscriptions/x",
        "/.well-known/mercure/../mercure/x",
        "/x/../.well-known/mercure/y",
        "\\.well-known\\mercure\\x",
        "https://h\\.well-known\\mercure",
        "//h/.well-known/mercure",
        "https://evil.example/.well-known/mercure/subscriptions/a/b/c",
        "mercure/foo",
        "?x=1",
        "",
    ] {
        cases.push((
            format!("reserved {topic:?}"),
            format!("topic=a&topic={}", esc(topic)),
            "reserved",
        ));
    }
    for (name, body, reason) in &cases {
        let (status, text) = post(&hub, &token, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {text}");
        assert!(text.contains(reason), "{name}: {text:?} lacks {reason:?}");
        assert_eq!(text.trim().lines().count(), 1, "{name}: one line: {text:?}");
    }
    // Nothing refused was delivered.
    assert_quiet(&mut watcher, Duration::from_millis(200)).await;

    // Look-alikes that are fine topics, ids and types; the answer is the id, as plain text.
    let auth = format!("Bearer {token}");
    for body in [
        "topic=%2F.well-known%2FmercureX&data=1",
        "topic=%2F.well-known%2Fmercure-foo&data=2",
        "topic=%2F.WELL-KNOWN%2Fmercure&data=3",
        "topic=https%3A%2F%2Fh%2F.well-known%2Fmercure%252Fx&data=4",
        "topic=urn%3Auuid%3A1&type=Mercure&id=Earliest&retry=0&data=5",
        "topic=caf%C3%A9&id=%C3%A9t%C3%A9&data=6",
    ] {
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("authorization", auth.as_str()),
        ];
        let ((status, id), h) =
            request(&hub, Method::POST, "/.well-known/mercure", &headers, body).await;
        assert_eq!(status, StatusCode::OK, "{body}: {id}");
        assert_eq!(h["content-type"], "text/plain; charset=utf-8");
        let e = take(&mut watcher, 1, Duration::from_secs(5)).await;
        assert_eq!(e[0].id, id, "{body}");
    }
}

/// The reserved and wildcard refusals come before the scope check: a token that may publish
/// to one topic only gets 400 for them, not 403; a topic merely out of its scope is a 403.
#[tokio::test(flavor = "multi_thread")]
async fn validation_comes_after_the_token_and_before_the_scope() {
    let hub = TestHub::start(&[]);
    let narrow = hub
        .key
        .mint(Some(&["https://example.com/a".to_owned()]), None, None)
        .unwrap();
    for body in [
        "topic=%2F.well-known%2Fmercure%2Fsubscriptions%2Fx",
        "topic=*",
        "topic=https%3A%2F%2Fexample.com%2Fa&type=mercure",
    ] {
        let (status, text) = post(&hub, &narrow, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {text}");
    }
    let (status, text) = post(&hub, &narrow, "topic=https%3A%2F%2Fexample.com%2Fb").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    let (status, _) = post(&hub, &narrow, "topic=https%3A%2F%2Fexample.com%2Fa").await;
    assert_eq!(status, StatusCode::OK);
    // No valid token: 401 first, however bad the rest.
    let (status, _) = post(&hub, "abc.def.ghi", "topic=*&type=mercure").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// The hub's own HTTP/1.1 publish path (a whole body with a `Content-Length`) and hyper's (a
/// chunked body) refuse alike.
#[tokio::test(flavor = "multi_thread")]
async fn both_http1_paths_refuse_alike() {
    let hub = TestHub::start(&[]);
    let token = hub.publisher_token();
    let body = "topic=%2F.well-known%2F%256Dercure%2Fx&data=1";
    let head = format!(
        "POST /.well-known/mercure HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n"
    );
    let whole = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
    let chunked = format!(
        "{head}Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    for request in [whole, chunked] {
        let mut c = TcpStream::connect(hub.addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        read_until(&mut c, &mut raw, "reserved").await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    }
}

/// Over the hub's limits — more than 1,000 topics, a topic over 4,096 bytes, the body over
/// `--max-body` — a publish is a 413 with the reason (mercure-1.0.md §4: limits are 413, not
/// the reference hub's 400), and nothing is published.
#[tokio::test(flavor = "multi_thread")]
async fn limits_are_413() {
    let hub = TestHub::start(&["--max-body", "64KiB"]);
    let mut watcher = hub.subscribe("topic=*", &[]).await;
    let token = hub.publisher_token();
    let many: String = (0..1001).map(|i| format!("topic=t{i}&")).collect();
    let long = format!("topic={}&data=x", "a".repeat(4097));
    let big = format!("topic=a&data={}", "x".repeat(65 * 1024));
    for (case, body, word) in [
        ("1,001 topics", format!("{many}data=x"), "topic"),
        ("a 4,097-byte topic", long, "4096"),
        ("a body over --max-body", big, "--max-body"),
    ] {
        let (status, text) = post(&hub, &token, &body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{case}: {text}");
        assert!(text.contains(word), "{case}: {text}");
    }
    // 1,000 topics and a 4,096-byte one are within the limits.
    let thousand: String = (0..1000).map(|i| format!("topic=t{i}&")).collect();
    let (status, text) = post(&hub, &token, &format!("{thousand}data=ok")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = post(
        &hub,
        &token,
        &format!("topic={}&data=ok2", "a".repeat(4096)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let got = take(&mut watcher, 2, Duration::from_secs(10)).await;
    assert_eq!(
        got.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
        ["ok", "ok2"]
    );
    assert_quiet(&mut watcher, Duration::from_millis(200)).await;
}
