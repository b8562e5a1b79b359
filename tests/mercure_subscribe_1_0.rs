//! Mercure 1.0's subscribe side beside 0.x: `match`, `match_exact` and `match_urlpattern`,
//! what they refuse, the cursor and its response headers per dialect, and `QUERY`.

mod common;

use std::time::Duration;

use common::{assert_quiet, read_until, request, take_data, TestHub};
use http::StatusCode;
use ssehub::client::ClientError;

const QUIET: Duration = Duration::from_millis(300);

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The status and reason a subscribe to `query` is refused with.
async fn refused(hub: &TestHub, query: &str) -> (StatusCode, String) {
    match hub.try_subscribe(query, &[]).await {
        Err(ClientError::Refused { status, reason }) => (status, reason),
        Ok(_) => panic!("{query:?} was accepted"),
        Err(e) => panic!("{query:?}: {e}"),
    }
}

#[tokio::test]
async fn matchers_deliver_what_they_match_and_nothing_else() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let mut exact = hub
        .subscribe("match=https%3A%2F%2Fexample.com%2Fbooks%2F1", &[])
        .await;
    let mut exact2 = hub.subscribe("match_exact=a%2F%7Bb%7D", &[]).await;
    let mut several = hub.subscribe("match=x&match_exact=y", &[]).await;
    let mut absolute = hub
        .subscribe(
            &format!("match_urlpattern={}", enc("https://example.com/books/:id")),
            &[],
        )
        .await;
    let mut relative = hub
        .subscribe(&format!("match_urlpattern={}", enc("/books/:id")), &[])
        .await;
    let mut all = hub.subscribe("match_urlpattern=*", &[]).await;

    p.ok(&[("topic", "https://example.com/books/1"), ("data", "b1")])
        .await;
    // Braces are characters to an exact matcher, not a template.
    p.ok(&[("topic", "a/x"), ("data", "ax")]).await;
    p.ok(&[("topic", "a/{b}"), ("data", "ab")]).await;
    p.ok(&[("topic", "y"), ("data", "y")]).await;
    p.ok(&[("topic", "x"), ("data", "x")]).await;
    p.ok(&[("topic", "/books/7"), ("data", "rel")]).await;
    p.ok(&[("topic", "https://example.com/books/1/2"), ("data", "deep")])
        .await;

    assert_eq!(take_data(&mut exact, 1).await, ["b1"]);
    assert_eq!(take_data(&mut exact2, 1).await, ["ab"]);
    assert_eq!(take_data(&mut several, 2).await, ["y", "x"]);
    assert_eq!(take_data(&mut absolute, 1).await, ["b1"]);
    assert_eq!(take_data(&mut relative, 1).await, ["rel"]);
    assert_eq!(take_data(&mut all, 7).await.len(), 7);
    for s in [
        &mut exact,
        &mut exact2,
        &mut several,
        &mut absolute,
        &mut relative,
    ] {
        assert_quiet(s, QUIET).await;
    }
}

#[tokio::test]
async fn private_updates_need_a_grant() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let token = hub
        .key
        .mint(None, Some(&["/secret/{x}".to_owned()]), None)
        .unwrap();
    let bearer = format!("Bearer {token}");
    let q = format!("match_urlpattern={}", enc("/secret/:x"));
    let mut granted = hub.subscribe(&q, &[("authorization", &bearer)]).await;
    let mut anonymous = hub.subscribe(&q, &[]).await;
    p.ok(&[
        ("topic", "/secret/1"),
        ("data", "hidden"),
        ("private", "on"),
    ])
    .await;
    p.ok(&[("topic", "/secret/2"), ("data", "public")]).await;
    assert_eq!(take_data(&mut granted, 2).await, ["hidden", "public"]);
    assert_eq!(take_data(&mut anonymous, 1).await, ["public"]);
}

#[tokio::test]
async fn bad_matchers_are_refused_with_400() {
    let hub = TestHub::start(&[]);
    let many = vec!["match=t"; 101].join("&");
    let long = format!("match={}", "a".repeat(4097));
    let cases = [
        "Match=a",
        "MATCH=a",
        "match_URLPATTERN=a",
        "match_uri_template=a",
        "matches=a",
        "matchType=a",
        "match_=a",
        "match=a%00b",
        "match=a%7Fb",
        "match=a%C2%85b",
        "match=a%E2%80%8Bb",
        "match=a%EF%BB%BFb",
        "match=%FF",
        many.as_str(),
        long.as_str(),
        "topic=a&match=b",
        "foo=bar",
    ];
    for q in cases {
        let (status, _) = refused(&hub, q).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{q:.60}");
    }
    let (status, reason) = refused(&hub, "match_urlpattern=https%3A%2F%2Fexample.com%2F(a").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reason, "invalid match_urlpattern pattern");
    let (_, reason) = refused(&hub, "").await;
    assert!(reason.contains("\"match\""), "{reason}");
    // The limits themselves pass.
    let hundred = vec!["match=t"; 100].join("&");
    hub.subscribe(&hundred, &[]).await;
    hub.subscribe(&format!("match={}", "a".repeat(4096)), &[])
        .await;
    // A 0.x request keeps the parameters it always could carry, `match…` ones included.
    hub.subscribe("topic=a&matchId=3", &[]).await;
}

#[tokio::test]
async fn protocol_flag_refuses_the_other_dialect() {
    let one = TestHub::start(&["--protocol", "1.0"]);
    let (status, reason) = refused(&one, "topic=a").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(reason.contains("Mercure 1.0 only: use match="), "{reason}");
    one.subscribe("match=a", &[]).await;
    // Nor does it take a 0.x token (the test hub's publisher token is one).
    let (status, reason) = one
        .publisher()
        .await
        .publish(&[("topic", "a"), ("data", "x")])
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(reason.contains("--protocol 1.0"), "{reason}");

    let zero = TestHub::start(&["--protocol", "0.x"]);
    let (status, _) = refused(&zero, "match=a").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    zero.subscribe("topic=a", &[]).await;
    zero.publisher()
        .await
        .ok(&[("topic", "a"), ("data", "x")])
        .await;
}

#[tokio::test]
async fn cursor_precedence_and_response_headers_by_dialect() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let first = p.ok(&[("topic", "c"), ("data", "1")]).await;
    let second = p.ok(&[("topic", "c"), ("data", "2")]).await;
    let third = p.ok(&[("topic", "c"), ("data", "3")]).await;

    // The header beats every parameter; `last_event_id` beats `lastEventID`, which beats
    // `Last-Event-ID`.
    let mut s = hub
        .subscribe(
            &format!("match=c&last_event_id={first}&lastEventID={first}"),
            &[("last-event-id", &second)],
        )
        .await;
    assert_eq!(take_data(&mut s, 1).await, ["3"]);
    assert_eq!(s.headers["mercure-last-event-id"], second.as_str());
    assert!(
        s.headers.get("last-event-id").is_none(),
        "1.0: no Last-Event-ID"
    );

    let mut s = hub
        .subscribe(
            &format!("match=c&last_event_id={second}&lastEventID={first}&Last-Event-ID={first}"),
            &[],
        )
        .await;
    assert_eq!(take_data(&mut s, 1).await, ["3"]);

    let mut s = hub
        .subscribe(
            &format!("topic=c&lastEventID={first}&Last-Event-ID={third}"),
            &[],
        )
        .await;
    assert_eq!(take_data(&mut s, 2).await, ["2", "3"]);
    assert_eq!(s.headers["mercure-last-event-id"], first.as_str());
    assert_eq!(s.headers["last-event-id"], first.as_str(), "0.x keeps it");

    // An empty cursor still asks for the header: the newest event.
    let s = hub.subscribe("match=c&last_event_id=", &[]).await;
    assert_eq!(s.headers["mercure-last-event-id"], third.as_str());
    // No cursor, no header.
    let s = hub.subscribe("match=c", &[]).await;
    assert!(s.headers.get("mercure-last-event-id").is_none());

    // HEAD answers the same headers.
    let ((status, _), h) = request(
        &hub,
        http::Method::HEAD,
        &format!("/.well-known/mercure?match=c&last_event_id={second}"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["mercure-last-event-id"], second.as_str());
    assert!(h.get("last-event-id").is_none());
}

#[tokio::test]
async fn a_1_0_request_ignores_a_token_in_the_url() {
    let hub = TestHub::start(&["--anonymous", "false"]);
    let token = hub.key.mint(None, Some(&["*".to_owned()]), None).unwrap();
    let (status, _) = refused(&hub, &format!("match=a&authorization={token}")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    hub.subscribe(&format!("topic=a&authorization={token}"), &[])
        .await;
}

/// Sends a `QUERY` subscribe on its own connection; returns it with what was read up to the
/// end of the response head (or the whole refusal).
async fn query(hub: &TestHub, target: &str, body: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let head = format!(
        "QUERY {target} HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    read_until(&mut conn, &mut raw, "\r\n\r\n").await;
    (conn, String::from_utf8_lossy(&raw).into_owned())
}

#[tokio::test]
async fn query_takes_the_union_of_url_and_body() {
    let hub = TestHub::start(&[]);
    let mut p = hub.publisher().await;
    let first = p.ok(&[("topic", "q"), ("data", "old")]).await;
    let second = p.ok(&[("topic", "q"), ("data", "older")]).await;
    let (mut conn, head) = query(
        &hub,
        &format!("/.well-known/mercure?match=q&last_event_id={second}"),
        &format!("match=r&last_event_id={first}"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains(&format!("mercure-last-event-id: {second}")));
    p.ok(&[("topic", "r"), ("data", "from-body")]).await;
    p.ok(&[("topic", "q"), ("data", "from-url")]).await;
    let mut raw = head.into_bytes();
    read_until(&mut conn, &mut raw, "data: from-url").await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.contains("data: from-body") && !text.contains("data: older"),
        "{text}"
    );

    let (_, head) = query(&hub, "/.well-known/mercure", "topic=q").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let big = format!("match=q&x={}", "a".repeat(1 << 20));
    let (_, head) = query(&hub, "/.well-known/mercure", &big).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // Other unknown methods are still refused.
    let ((status, _), h) = request(&hub, http::Method::PUT, "/.well-known/mercure", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(h["allow"].to_str().unwrap().contains("QUERY"));
}

#[tokio::test]
async fn url_patterns_count_against_template_memory() {
    let hub = TestHub::start(&["--template-memory", "64KiB"]);
    let q = |i: usize| format!("match_urlpattern={}", enc(&format!("/rooms/{i}/:x")));
    let mut held = Vec::new();
    let mut refusal = None;
    for i in 0..64 {
        match hub.try_subscribe(&q(i), &[]).await {
            Ok(s) => held.push(s),
            Err(ClientError::Refused { status, reason }) => {
                refusal = Some((status, reason));
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (status, reason) = refusal.expect("64 KiB cannot hold 64 URL patterns");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reason}");
    assert!(reason.contains("--template-memory"), "{reason}");

    let strict = TestHub::start(&["--anonymous-templates", "false"]);
    let (status, _) = refused(&strict, &q(1)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    strict.subscribe("match_urlpattern=*", &[]).await;
}

#[tokio::test]
async fn cors_exposes_the_1_0_cursor_and_allows_query() {
    let hub = TestHub::start(&["--cors-origins", "https://app.example"]);
    let ((_, _), h) = request(
        &hub,
        http::Method::OPTIONS,
        "/.well-known/mercure",
        &[
            ("origin", "https://app.example"),
            ("access-control-request-method", "QUERY"),
        ],
        "",
    )
    .await;
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(methods.contains("QUERY"), "{methods}");
    let s = hub
        .subscribe("match=a", &[("origin", "https://app.example")])
        .await;
    let exposed = s.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("mercure-last-event-id"), "{exposed}");
    // The subscription API's cursor is in `Link`.
    assert!(exposed.contains("link"), "{exposed}");
}

/// A publish tests only the URL patterns its topic can match, read as a URL: thousands of
/// patterns of other hosts, or of the same host under other paths, are not tested (counted by
/// `ssehub_template_tests_total`), however the topic is spelled.
#[tokio::test]
async fn a_publish_does_not_test_url_patterns_of_other_hosts_or_paths() {
    let hub = TestHub::start(&["--template-memory", "1GiB"]);
    // 2,000 patterns in 20 subscriptions of 100 (the most one may hold): two thirds of other
    // hosts, a third of this host under other paths.
    let mut others = Vec::new();
    for s in 0..20 {
        let query: Vec<String> = (0..100)
            .map(|i| {
                let n = s * 100 + i;
                let p = if n % 3 == 0 {
                    format!("https://mine.example/other{n}/:id")
                } else {
                    format!("https://host{n}.example/items/:id")
                };
                format!("match_urlpattern={}", enc(&p))
            })
            .collect();
        others.push(hub.subscribe(&query.join("&"), &[]).await);
    }
    let mut mine = hub
        .subscribe(
            &format!("match_urlpattern={}", enc("https://mine.example/items/:id")),
            &[],
        )
        .await;
    let before = hub.metric("ssehub_template_tests_total").await;
    let mut p = hub.publisher().await;
    let topics = [
        "https://mine.example/items/1",
        "HTTPS://MINE.example:443/items/2",
        "https://mine.example/x/../items/3",
    ];
    for t in topics {
        p.ok(&[("topic", t), ("data", t)]).await;
    }
    assert_eq!(take_data(&mut mine, 3).await, topics);
    let tested = hub.metric("ssehub_template_tests_total").await - before;
    assert_eq!(tested, 3.0, "one pattern tested per publish");
    for other in &mut others {
        assert_quiet(other, QUIET).await;
    }
}

/// A `match_urlpattern` value is compiled once: checked through the hub's cache, where the
/// subscription then finds it (and a second subscriber shares it).
#[tokio::test]
async fn a_url_pattern_is_compiled_once_per_subscribe() {
    let hub = TestHub::start(&[]);
    let compiled = || hub.metric("ssehub_templates_compiled_total");
    let before = compiled().await;
    let q = format!("match_urlpattern={}", enc("https://example.com/once/:id"));
    let mut a = hub.subscribe(&q, &[]).await;
    assert_eq!(compiled().await - before, 1.0);
    let _b = hub.subscribe(&q, &[]).await;
    assert_eq!(compiled().await - before, 1.0);
    // An invalid one is still refused, and nothing of it kept.
    let (status, reason) = refused(&hub, &format!("match_urlpattern={}", enc("/(a"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(reason, "invalid match_urlpattern pattern");
    assert_eq!(hub.metric("ssehub_templates").await, 1.0);
    hub.publisher()
        .await
        .ok(&[("topic", "https://example.com/once/1"), ("data", "1")])
        .await;
    assert_eq!(take_data(&mut a, 1).await, ["1"]);
}

/// `\w` and `\d` in a URL pattern's regex groups are ASCII, as in browsers: `(\w{20})` and
/// eight `(\w+)` segments are accepted (Unicode classes made them too large, 400).
#[tokio::test]
async fn url_pattern_classes_are_javascript_s() {
    let hub = TestHub::start(&[]);
    let q = format!("match_urlpattern={}", enc("/t/:id(\\w{20})"));
    let mut twenty = hub.subscribe(&q, &[]).await;
    let eight: String = (0..8).map(|i| format!("/:a{i}(\\w+)")).collect();
    let mut eight = hub
        .subscribe(&format!("match_urlpattern={}", enc(&eight)), &[])
        .await;
    let mut p = hub.publisher().await;
    let ascii = format!("/t/{}", "aZ9_".repeat(5));
    let accented = format!("/t/{}é", "a".repeat(19));
    p.ok(&[("topic", &accented), ("data", "accented")]).await;
    p.ok(&[("topic", "/a/b/c/d/e/f/g/é"), ("data", "accented8")])
        .await;
    p.ok(&[("topic", &ascii), ("data", "ascii")]).await;
    p.ok(&[("topic", "/a/b/c/d/e/f/g/h"), ("data", "ascii8")])
        .await;
    assert_eq!(take_data(&mut twenty, 1).await, ["ascii"]);
    assert_eq!(take_data(&mut eight, 1).await, ["ascii8"]);
}
