//! Mercure 1.0 access tokens (`typ: at+jwt`) beside 0.x ones: what is accepted, every way a
//! token is refused, the RFC 6750 challenges, where a token is looked for, and the RFC 9728
//! metadata. A real hub over TCP; tokens are signed here with the hub's HS256 secret.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{request, take_data, TestHub, SECRET};
use http::{HeaderMap, Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const HUB: &str = "/.well-known/mercure";
const ISSUER: &str = "https://issuer.example";
const DETAIL: &str = "https://mercure.rocks/authorization-detail";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign_with(alg: Algorithm, typ: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.typ = typ.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn v1(claims: &Value) -> String {
    sign_with(Algorithm::HS256, Some("at+jwt"), claims)
}

/// The conformance suite's token shape: typ at+jwt, iss, aud, exp; no sub, client_id, iat or
/// jti; one publish and one subscribe detail on `*`.
fn claims(hub: &TestHub) -> Value {
    json!({
        "iss": ISSUER,
        "aud": hub.url(HUB),
        "exp": now() + 300,
        "authorization_details": [
            {"type": DETAIL, "actions": ["publish"], "topics": [{"match": "*"}]},
            {"type": DETAIL, "actions": ["subscribe"], "topics": [{"match": "*"}]},
        ],
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn details(hub: &TestHub, details: Value) -> Value {
    with(claims(hub), "authorization_details", details)
}

async fn publish(
    hub: &TestHub,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, String, HeaderMap) {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    h.extend_from_slice(headers);
    let ((status, text), headers) = request(hub, Method::POST, HUB, &h, body).await;
    (status, text, headers)
}

async fn publish_with(hub: &TestHub, token: &str) -> (StatusCode, String, HeaderMap) {
    let auth = format!("Bearer {token}");
    publish(hub, &[("authorization", &auth)], "topic=a&data=x").await
}

fn challenge(headers: &HeaderMap) -> &str {
    headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap())
        .unwrap_or("")
}

fn metadata_url(hub: &TestHub) -> String {
    hub.url("/.well-known/oauth-protected-resource/.well-known/mercure")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_conformance_token_publishes_and_subscribes_privately() {
    let hub = TestHub::start(&[]);
    let token = v1(&claims(&hub));
    let auth = format!("Bearer {token}");
    let mut stream = hub
        .subscribe(
            "topic=https%3A%2F%2Fexample.com%2Fa",
            &[("authorization", &auth)],
        )
        .await;
    let (status, text, _) = publish(
        &hub,
        &[("authorization", &auth)],
        "topic=https%3A%2F%2Fexample.com%2Fa&data=secret&private=on",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(take_data(&mut stream, 1).await, ["secret"]);
    // `aud` as an array holding the hub, `typ` with its media-type prefix in another case.
    let array = with(
        claims(&hub),
        "aud",
        json!(["https://other.example", hub.url(HUB)]),
    );
    let t = sign_with(Algorithm::HS256, Some("Application/AT+JWT"), &array);
    assert_eq!(publish_with(&hub, &t).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_invalid_token_is_a_401_invalid_token() {
    let hub = TestHub::start(&["--issuer", ISSUER]);
    let good = claims(&hub);
    let entry = |actions: Value, topics: Value| json!([{"type": DETAIL, "actions": actions, "topics": topics}]);
    let star = json!([{"match": "*"}]);
    let unsigned = {
        use base64::Engine as _;
        let b = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.",
            b(&json!({"alg": "none", "typ": "at+jwt"})),
            b(&good)
        )
    };
    let many: Vec<Value> = (0..101)
        .map(|_| json!({"type": DETAIL, "actions": ["publish"], "topics": [{"match": "a"}]}))
        .collect();
    let cases: Vec<(&str, String)> = vec![
        ("no typ", sign_with(Algorithm::HS256, None, &good)),
        ("typ JWT", sign_with(Algorithm::HS256, Some("JWT"), &good)),
        ("alg none", unsigned),
        (
            "another alg",
            sign_with(Algorithm::HS384, Some("at+jwt"), &good),
        ),
        (
            "aud wrong",
            v1(&with(
                good.clone(),
                "aud",
                json!("https://other.example/.well-known/mercure"),
            )),
        ),
        ("aud missing", v1(&without(good.clone(), "aud"))),
        (
            "iss wrong",
            v1(&with(good.clone(), "iss", json!("https://evil.example"))),
        ),
        ("iss missing", v1(&without(good.clone(), "iss"))),
        ("exp missing", v1(&without(good.clone(), "exp"))),
        (
            "exp past",
            v1(&with(good.clone(), "exp", json!(now() - 60))),
        ),
        (
            "nbf future",
            v1(&with(good.clone(), "nbf", json!(now() + 60))),
        ),
        (
            "details not an array",
            v1(&details(&hub, json!({"type": DETAIL}))),
        ),
        ("entry not an object", v1(&details(&hub, json!([DETAIL])))),
        (
            "empty actions",
            v1(&details(&hub, entry(json!([]), star.clone()))),
        ),
        (
            "action not a string",
            v1(&details(&hub, entry(json!(["publish", 1]), star.clone()))),
        ),
        (
            "bare-string topic",
            v1(&details(&hub, entry(json!(["publish"]), json!(["*"])))),
        ),
        (
            "match_type URLPattern",
            v1(&details(
                &hub,
                entry(
                    json!(["publish"]),
                    json!([{"match": "*", "match_type": "URLPattern"}]),
                ),
            )),
        ),
        (
            "empty match",
            v1(&details(
                &hub,
                entry(json!(["publish"]), json!([{"match": ""}])),
            )),
        ),
        (
            "no topics",
            v1(&details(&hub, entry(json!(["publish"]), json!([])))),
        ),
        ("101 entries", v1(&details(&hub, Value::Array(many)))),
        (
            "bad urlpattern",
            v1(&details(
                &hub,
                entry(
                    json!(["publish"]),
                    json!([{"match": "https://x/(", "match_type": "urlpattern"}]),
                ),
            )),
        ),
        (
            "pattern too long",
            v1(&details(
                &hub,
                entry(json!(["publish"]), json!([{"match": "a".repeat(4097)}])),
            )),
        ),
    ];
    let want = format!(
        "Bearer error=\"invalid_token\", resource_metadata=\"{}\"",
        metadata_url(&hub)
    );
    for (name, token) in cases {
        let (status, text, headers) = publish_with(&hub, &token).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {text}");
        assert_eq!(challenge(&headers), want, "{name}");
        // Subscribing with it is refused the same way.
        let auth = format!("Bearer {token}");
        let ((status, _), headers) = request(
            &hub,
            Method::HEAD,
            &format!("{HUB}?topic=a"),
            &[("authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name} (subscribe)");
        assert_eq!(challenge(&headers), want, "{name} (subscribe)");
    }
    // The good one passes on this hub.
    assert_eq!(publish_with(&hub, &v1(&good)).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn grants_ignore_what_they_do_not_know() {
    let hub = TestHub::start(&[]);
    // Unknown actions grant nothing, other APIs' details are skipped, whatever their shape.
    let t = v1(&details(
        &hub,
        json!([
            {"type": "https://other.example/detail", "actions": 5},
            {"type": DETAIL, "actions": ["frobnicate", "publish"], "topics": [{"match": "a", "match_type": "exact"}]},
        ]),
    ));
    assert_eq!(publish_with(&hub, &t).await.0, StatusCode::OK);
    // A URL pattern grant, read against the hub's URL.
    let t = v1(&details(
        &hub,
        json!([{"type": DETAIL, "actions": ["publish"], "topics": [{"match": "https://example.com/books/:id", "match_type": "urlpattern"}]}]),
    ));
    let auth = format!("Bearer {t}");
    let (status, text, _) = publish(
        &hub,
        &[("authorization", &auth)],
        "topic=https%3A%2F%2Fexample.com%2Fbooks%2F1&data=x",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, _, headers) = publish_with(&hub, &t).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        challenge(&headers),
        format!(
            "Bearer error=\"insufficient_scope\", resource_metadata=\"{}\"",
            metadata_url(&hub)
        )
    );
    // An at+jwt token's `mercure` claim is not read: no details, no rights.
    let t = v1(&with(
        without(claims(&hub), "authorization_details"),
        "mercure",
        json!({"publish": ["*"]}),
    ));
    assert_eq!(publish_with(&hub, &t).await.0, StatusCode::FORBIDDEN);
    // A 0.x token carrying 1.0 grants is refused: they need 1.0 validation.
    let legacy = sign_with(
        Algorithm::HS256,
        None,
        &json!({"mercure": {"publish": ["*"]}, "authorization_details": claims(&hub)["authorization_details"]}),
    );
    assert_eq!(
        publish_with(&hub, &legacy).await.0,
        StatusCode::UNAUTHORIZED
    );
    // A plain 0.x token still works.
    let legacy = sign_with(
        Algorithm::HS256,
        Some("JWT"),
        &json!({"mercure": {"publish": ["*"]}}),
    );
    assert_eq!(publish_with(&hub, &legacy).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_resource_identifier_is_the_audience() {
    let resource = "https://hub.example/.well-known/mercure";
    let hub = TestHub::start(&["--resource-identifier", resource]);
    let derived = v1(&claims(&hub));
    let (status, _, headers) = publish_with(&hub, &derived).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        challenge(&headers).contains(
            "resource_metadata=\"https://hub.example/.well-known/oauth-protected-resource/.well-known/mercure\""
        ),
        "{}",
        challenge(&headers)
    );
    let configured = v1(&with(claims(&hub), "aud", json!(resource)));
    assert_eq!(publish_with(&hub, &configured).await.0, StatusCode::OK);
    // A 0.x token naming another audience is refused once the hub has one configured.
    let legacy = sign_with(
        Algorithm::HS256,
        None,
        &json!({"aud": "https://other.example", "mercure": {"publish": ["*"]}}),
    );
    assert_eq!(
        publish_with(&hub, &legacy).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn challenges_for_no_token_and_a_token_sent_wrongly() {
    let hub = TestHub::start(&["--anonymous", "false"]);
    let (status, _, headers) = publish(&hub, &[], "topic=a&data=x").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge(&headers),
        format!("Bearer resource_metadata=\"{}\"", metadata_url(&hub))
    );
    let ((status, _), headers) =
        request(&hub, Method::HEAD, &format!("{HUB}?topic=a"), &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        !challenge(&headers).contains("error="),
        "{}",
        challenge(&headers)
    );
    let want = format!(
        "Bearer error=\"invalid_request\", resource_metadata=\"{}\"",
        metadata_url(&hub)
    );
    let token = v1(&claims(&hub));
    let bearer = format!("Bearer {token}");
    for (name, headers) in [
        ("basic", vec![("authorization", "Basic YTpi")]),
        ("empty bearer", vec![("authorization", "Bearer ")]),
        (
            "two headers",
            vec![
                ("authorization", bearer.as_str()),
                ("authorization", bearer.as_str()),
            ],
        ),
    ] {
        let (status, text, h) = publish(&hub, &headers, "topic=a&data=x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {text}");
        assert_eq!(challenge(&h), want, "{name}");
    }
    // A 1.0 token is never read from the URL: neither to publish, nor on a 0.x subscribe.
    for (method, target, body) in [
        (
            Method::POST,
            format!("{HUB}?authorization={token}"),
            "topic=a&data=x",
        ),
        (
            Method::HEAD,
            format!("{HUB}?topic=a&authorization={token}"),
            "",
        ),
    ] {
        let ((status, text), h) = request(
            &hub,
            method,
            &target,
            &[("content-type", "application/x-www-form-urlencoded")],
            body,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{target:.40}: {text}");
        assert_eq!(challenge(&h), want);
    }
    // The scheme's case does not matter.
    let lower = format!("bEaReR {token}");
    assert_eq!(
        publish(&hub, &[("authorization", &lower)], "topic=a&data=x")
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_1_0_cookie_comes_before_the_legacy_one_and_the_header_before_both() {
    let hub = TestHub::start(&["--anonymous", "false"]);
    let good = v1(&claims(&hub));
    let legacy = sign_with(
        Algorithm::HS256,
        None,
        &json!({"mercure": {"subscribe": ["*"]}}),
    );
    let head = |headers: Vec<(&'static str, String)>| {
        let hub = &hub;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(hub, Method::HEAD, &format!("{HUB}?topic=a"), &h, "")
                .await
                .0
                 .0
        }
    };
    let cookie = |v: String| vec![("cookie", v)];
    assert_eq!(
        head(cookie(format!(
            "__Secure-mercure_access_token={good}; mercureAuthorization=garbage"
        )))
        .await,
        StatusCode::OK,
        "the 1.0 cookie wins"
    );
    assert_eq!(
        head(cookie(format!(
            "__Secure-mercure_access_token=garbage; mercureAuthorization={legacy}"
        )))
        .await,
        StatusCode::UNAUTHORIZED,
        "an invalid 1.0 cookie is not made up for by the legacy one"
    );
    assert_eq!(
        head(cookie(format!("mercureAuthorization={legacy}"))).await,
        StatusCode::OK,
        "the legacy cookie alone"
    );
    let mut both = cookie("__Secure-mercure_access_token=garbage".to_owned());
    both.push(("authorization", format!("Bearer {good}")));
    assert_eq!(
        head(both).await,
        StatusCode::OK,
        "the header wins over cookies"
    );
    // --cookie-name renames the 1.0 cookie.
    let renamed = TestHub::start(&["--anonymous", "false", "--cookie-name", "hub_token"]);
    let good = v1(&claims(&renamed));
    let h = [("cookie", format!("hub_token={good}"))];
    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let ((status, _), _) = request(&renamed, Method::HEAD, &format!("{HUB}?topic=a"), &h, "").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_protected_resource_metadata() {
    let hub = TestHub::start(&[
        "--subscriptions",
        "--authorization-server",
        "https://auth.example",
        "--cookie-name",
        "hub_token",
    ]);
    let path = "/.well-known/oauth-protected-resource/.well-known/mercure";
    let ((status, text), headers) = request(&hub, Method::GET, path, &[], "").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(headers["content-type"], "application/json");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        doc,
        json!({
            "resource": hub.url(HUB),
            "bearer_methods_supported": ["header"],
            "authorization_details_types_supported": [DETAIL],
            "mercure_cookie": "hub_token",
            "mercure_subscriptions": true,
            "authorization_servers": ["https://auth.example"],
        })
    );
    let ((status, text), _) = request(&hub, Method::HEAD, path, &[], "").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, ""));
    // Without subscription events or an authorization server, neither is advertised.
    let plain = TestHub::start(&[]);
    let ((_, text), _) = request(&plain, Method::GET, path, &[], "").await;
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc.get("mercure_subscriptions").is_none(), "{doc}");
    assert!(doc.get("authorization_servers").is_none(), "{doc}");
    assert_eq!(doc["mercure_cookie"], "__Secure-mercure_access_token");
}
