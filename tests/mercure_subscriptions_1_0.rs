//! The subscription API beside 0.x (mercure-1.0.md §7, §9.3 rows 14–17): the shared
//! `/subscriptions` route answers in the dialect of the caller's token, two-segment paths
//! whose first segment names a 1.0 matcher type are 1.0 collections, three-segment paths are
//! 1.0 subscriptions; 1.0 answers are plain JSON with the cursor in a `Link` header.
//!
//! The hubs here are given `--resource-identifier RESOURCE`, the audience of the 1.0 tokens.

mod common;

use std::time::Duration;

use common::{request, take, TestHub, SECRET};
use http::{HeaderMap, Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const API: &str = "/.well-known/mercure/subscriptions";

const RESOURCE: &str = "https://hub.test/.well-known/mercure";

/// A 0.x token with the `mercure` claim, or a 1.0 access token for [`RESOURCE`] granting
/// `subscribe` on these exact topics (or `*`) and `publish` on every topic.
fn token(subscribe: &[&str], access_token: bool) -> String {
    let mut header = Header::new(Algorithm::HS256);
    let claims = if access_token {
        header.typ = Some("at+jwt".into());
        let detail = "https://mercure.rocks/authorization-detail";
        let topics: Vec<Value> = subscribe.iter().map(|s| json!({"match": s})).collect();
        json!({
            "iss": "tests",
            "aud": RESOURCE,
            "exp": 4102444800u64,
            "authorization_details": [
                {"type": detail, "actions": ["subscribe"], "topics": topics},
                {"type": detail, "actions": ["publish"], "topics": [{"match": "*"}]},
            ],
        })
    } else {
        json!({"mercure": {"subscribe": subscribe, "publish": ["*"]}})
    };
    let jwt = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {jwt}")
}

async fn get(
    hub: &TestHub,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, HeaderMap) {
    let ((status, body), h) = request(hub, Method::GET, path, headers, "").await;
    (status, body, h)
}

/// The `last-event-id` of a 1.0 answer's `Link` header.
fn cursor(h: &HeaderMap) -> String {
    let link = h["link"].to_str().unwrap();
    assert!(
        link.starts_with("</.well-known/mercure>; rel=\"mercure\"; last-event-id=\""),
        "{link}"
    );
    assert!(
        link.ends_with("\"; type=\"mercure\"; content-type=\"application/json\""),
        "{link}"
    );
    link.split("last-event-id=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_route_answers_in_the_dialect_of_the_token() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let _sub = hub
        .subscribe("topic=https%3A%2F%2Fexample.com%2Fa", &[])
        .await;
    let mut p = hub.publisher().await;
    let published = p.ok(&[("topic", "t"), ("data", "x")]).await;

    // A 0.x token: today's JSON-LD, listing the 0.x subscription.
    let legacy = token(&["*"], false);
    let (status, body, h) = get(&hub, API, &[("authorization", &legacy)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "application/ld+json");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["type"], "Subscriptions");
    assert_eq!(doc["lastEventID"], published.as_str());
    assert_eq!(doc["subscriptions"][0]["topic"], "https://example.com/a");

    // A 1.0 token: plain JSON, 1.0 subscriptions only, the cursor in headers.
    let modern = token(&["*"], true);
    let (status, body, h) = get(&hub, API, &[("authorization", &modern)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "application/json");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc,
        json!({"id": API, "type": "subscriptions", "subscriptions": []})
    );
    assert_eq!(cursor(&h), published);
    let tag = format!("\"{published}\"");
    assert_eq!(h["etag"], tag.as_str());
    let (status, body, h) = get(
        &hub,
        API,
        &[("authorization", &modern), ("if-none-match", &tag)],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED, "{body}");
    assert_eq!(h["etag"], tag.as_str());
    // A new update is a new cursor: the old tag no longer matches.
    let next = p.ok(&[("topic", "t"), ("data", "y")]).await;
    let (status, _, h) = get(
        &hub,
        API,
        &[("authorization", &modern), ("if-none-match", &tag)],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cursor(&h), next);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_0_and_1_0_routes_split_by_their_first_segment() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let modern = token(&["*"], true);
    let auth = [("authorization", modern.as_str())];
    // A 1.0 collection of one matcher: its id is the request's path; `%2F` does not split.
    let path = format!("{API}/exact/https%3A%2F%2Fexample.com%2Fa");
    let (status, body, h) = get(&hub, &path, &auth).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "application/json");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        doc,
        json!({"id": path, "type": "subscriptions", "subscriptions": []})
    );
    assert_eq!(cursor(&h), "earliest");
    let (status, _, _) = get(&hub, &format!("{API}/urlpattern/x"), &auth).await;
    assert_eq!(status, StatusCode::OK);
    // A 1.0 subscription that does not exist.
    let (status, body, _) = get(&hub, &format!("{path}/urn%3Auuid%3Anope"), &auth).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // An unknown matcher type, a bad escape.
    for bad in [
        format!("{API}/nope/a/b"),
        format!("{API}/exact/%zz"),
        format!("{API}/exact/a/%FF"),
    ] {
        let (status, body, _) = get(&hub, &bad, &auth).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // Any other first segment is a 0.x topic: a 0.x subscription, absent here.
    let (status, body, _) = get(&hub, &format!("{API}/x/urn%3Auuid%3Anope"), &auth).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("no active subscription"), "{body}");
}

/// The token must cover the request's raw path (without its query): an exact grant of the
/// escaped path does, one of the decoded text does not; no token is a 401.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_is_authorized_on_the_raw_path() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let path = format!("{API}/exact/a%20b");
    let exact = token(&[&path], true);
    let (status, body, _) = get(&hub, &format!("{path}?x=1"), &[("authorization", &exact)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let decoded = token(&[&format!("{API}/exact/a b")], true);
    let (status, _, _) = get(&hub, &path, &[("authorization", &decoded)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = get(&hub, API, &[("authorization", &exact)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = get(&hub, &path, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

/// A 1.0 subscription over HTTP: its events (`event: mercure`, plain JSON) and its
/// documents. Needs the hub to read `match=` (issue 20, subscribe side).
#[tokio::test(flavor = "multi_thread")]
async fn a_1_0_subscription_is_announced_and_listed_in_1_0() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let modern = token(&["*"], true);
    // Two listeners of the same events, one per dialect: each gets them in its own (Mercure
    // 1.0 §9.3 row 17), on the topic of the subscription's.
    let mut watcher = hub
        .subscribe(
            "match_urlpattern=%2F.well-known%2Fmercure%2Fsubscriptions%2Fexact%2F*",
            &[("authorization", &modern)],
        )
        .await;
    let mut old_watcher = hub
        .subscribe(
            "topic=%2F.well-known%2Fmercure%2Fsubscriptions%2Fexact%7B%2Fm%7D%7B%2Fs%7D",
            &[("authorization", &modern)],
        )
        .await;
    let _sub = hub.subscribe("match=a%20b", &[]).await;
    let ev = &take(&mut watcher, 1, Duration::from_secs(5)).await[0];
    assert_eq!(ev.event_type, "mercure");
    let doc: Value = serde_json::from_str(&ev.data).unwrap();
    let subscriber = doc["subscriber"].as_str().unwrap().to_owned();
    let id = format!("{API}/exact/a%20b/{}", subscriber.replace(':', "%3A"));
    assert_eq!(
        doc,
        json!({"id": id, "type": "subscription", "match_type": "exact", "match": "a b",
               "subscriber": subscriber, "active": true})
    );
    let old = &take(&mut old_watcher, 1, Duration::from_secs(5)).await[0];
    assert_eq!(old.event_type, "", "a 0.x listener gets a plain message");
    assert_eq!(old.id, ev.id, "one update, two renderings");
    assert_eq!(
        serde_json::from_str::<Value>(&old.data).unwrap(),
        json!({"@context": "https://mercure.rocks/", "id": id, "type": "Subscription",
               "topic": "a b", "match_type": "exact", "subscriber": subscriber, "active": true})
    );
    let (status, body, h) = get(&hub, &id, &[("authorization", &modern)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), doc);
    let (_, body, _) = get(
        &hub,
        &format!("{API}/exact/a%20b"),
        &[("authorization", &modern)],
    )
    .await;
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["subscriptions"], json!([doc]));
}

/// A 0.x subscription's events keep its two-segment topic; a 1.0 listener gets them as
/// `event: mercure` plain JSON (`match_type` `topic`), a 0.x listener as today's JSON-LD.
#[tokio::test(flavor = "multi_thread")]
async fn a_0_x_subscription_is_announced_to_each_listener_in_its_dialect() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let modern = token(&["*"], true);
    let mut watcher = hub
        .subscribe(
            "match_urlpattern=%2F.well-known%2Fmercure%2Fsubscriptions%2Fc%2F*",
            &[("authorization", &modern)],
        )
        .await;
    let legacy = token(&["*"], false);
    let mut old_watcher = hub
        .subscribe(
            "topic=%2F.well-known%2Fmercure%2Fsubscriptions%2Fc%7B%2Fs%7D",
            &[("authorization", &legacy)],
        )
        .await;
    let _sub = hub.subscribe("topic=c", &[]).await;
    let ev = &take(&mut watcher, 1, Duration::from_secs(5)).await[0];
    assert_eq!(ev.event_type, "mercure");
    let doc: Value = serde_json::from_str(&ev.data).unwrap();
    let subscriber = doc["subscriber"].as_str().unwrap().to_owned();
    let id = format!("{API}/c/{}", subscriber.replace(':', "%3A"));
    assert_eq!(
        doc,
        json!({"id": id, "type": "subscription", "match_type": "topic", "match": "c",
               "subscriber": subscriber, "active": true})
    );
    let old = &take(&mut old_watcher, 1, Duration::from_secs(5)).await[0];
    assert_eq!(old.event_type, "");
    assert_eq!(
        serde_json::from_str::<Value>(&old.data).unwrap(),
        json!({"@context": "https://mercure.rocks/", "id": id, "type": "Subscription",
               "topic": "c", "subscriber": subscriber, "active": true})
    );
}

/// Each subscription of one connection carries the payload of the first `subscribe` entry of
/// the token that matches its own matcher (mercure-1.0.md §7.1), in its events and in the API.
#[tokio::test(flavor = "multi_thread")]
async fn each_matcher_has_its_own_payload() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let listener_token = token(&["*"], true);
    let mut listener = hub
        .subscribe(
            "match_urlpattern=%2F.well-known%2Fmercure%2Fsubscriptions%2F*",
            &[("authorization", &listener_token)],
        )
        .await;
    let detail = "https://mercure.rocks/authorization-detail";
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("at+jwt".into());
    let claims = json!({
        "iss": "tests",
        "aud": RESOURCE,
        "exp": 4102444800u64,
        "authorization_details": [
            {"type": detail, "actions": ["subscribe"],
             "topics": [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}],
             "payload": {"shelf": "books"}},
            {"type": detail, "actions": ["subscribe"], "topics": [{"match": "*"}],
             "payload": {"shelf": "any"}},
        ],
    });
    let jwt = jsonwebtoken::encode(
        &header,
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let auth = format!("Bearer {jwt}");
    let _sub = hub
        .subscribe(
            "match=https%3A%2F%2Fexample.com%2Fbooks%2F1&match=https%3A%2F%2Fexample.com%2Fpens%2F2",
            &[("authorization", &auth)],
        )
        .await;
    // The listener's own subscription is announced first (its token has no payload).
    let events = take(&mut listener, 3, Duration::from_secs(10)).await;
    let mut shelves: Vec<(String, String)> = events[1..]
        .iter()
        .map(|e| {
            assert_eq!(e.event_type, "mercure");
            let doc: Value = serde_json::from_str(&e.data).unwrap();
            (
                doc["match"].as_str().unwrap().to_owned(),
                doc["payload"]["shelf"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    shelves.sort();
    assert_eq!(
        shelves,
        [
            ("https://example.com/books/1".to_owned(), "books".to_owned()),
            ("https://example.com/pens/2".to_owned(), "any".to_owned()),
        ]
    );
    // The API lists them alike.
    let (status, body, _) = get(&hub, API, &[("authorization", &listener_token)]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let listed: Vec<(&str, &str)> = doc["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["match"]
                .as_str()
                .unwrap()
                .starts_with("https://example.com/")
        })
        .map(|s| {
            (
                s["match"].as_str().unwrap(),
                s["payload"]["shelf"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed.len(), 2, "{body}");
    assert!(
        listed.contains(&("https://example.com/books/1", "books")),
        "{body}"
    );
    assert!(
        listed.contains(&("https://example.com/pens/2", "any")),
        "{body}"
    );
}

/// Replay after a reconnect (`Last-Event-ID`) renders the hub's subscription events for the
/// reconnecting stream's dialect too, not only live delivery: a 0.x stream gets the JSON-LD
/// messages, a 1.0 stream `event: mercure` plain JSON, for subscriptions of both dialects.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_renders_subscription_events_for_the_reconnecting_stream() {
    let hub = TestHub::start(&["--subscriptions", "--resource-identifier", RESOURCE]);
    let modern = token(&["*"], true);
    let legacy = token(&["*"], false);
    let _first = hub
        .subscribe("topic=first", &[("authorization", &legacy)])
        .await;
    let _one = hub.subscribe("topic=c", &[]).await;
    let _two = hub
        .subscribe("match=d", &[("authorization", &modern)])
        .await;
    // Wait until both events are in the history: the first stream sees nothing of them (it
    // follows a plain topic), so a third listener confirms them.
    let mut all = hub
        .subscribe(
            "match_urlpattern=%2F.well-known%2Fmercure%2Fsubscriptions%2F*",
            &[("authorization", &modern), ("Last-Event-ID", "earliest")],
        )
        .await;
    let seen = take(&mut all, 3, Duration::from_secs(5)).await;
    let from = seen[0].id.clone();

    let old_query = "topic=%2F.well-known%2Fmercure%2Fsubscriptions%7B%2Ft%7D%7B%2Fs%7D\
                     &topic=%2F.well-known%2Fmercure%2Fsubscriptions%7B%2Fm%7D%7B%2Ft%7D%7B%2Fs%7D";
    let mut old = hub
        .subscribe(
            old_query,
            &[("authorization", &legacy), ("Last-Event-ID", &from)],
        )
        .await;
    let got = take(&mut old, 2, Duration::from_secs(5)).await;
    for ev in &got {
        assert_eq!(ev.event_type, "", "{ev:?}");
        let doc: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(doc["@context"], "https://mercure.rocks/", "{doc}");
        assert_eq!(doc["type"], "Subscription", "{doc}");
    }
    let mut new = hub
        .subscribe(
            "match_urlpattern=%2F.well-known%2Fmercure%2Fsubscriptions%2F*",
            &[("authorization", &modern), ("Last-Event-ID", &from)],
        )
        .await;
    let got = take(&mut new, 2, Duration::from_secs(5)).await;
    for ev in &got {
        assert_eq!(ev.event_type, "mercure", "{ev:?}");
        let doc: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(doc["type"], "subscription", "{doc}");
        assert!(doc.get("@context").is_none(), "{doc}");
    }
}
