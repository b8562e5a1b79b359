//! The subscription API (`--subscriptions`): who is subscribed to what.
//!
//! Two dialects share the routes. 0.x subscriptions (`topic=`) are listed as JSON-LD under
//! `/subscriptions[/{topic}[/{subscriber}]]`; 1.0 ones as plain JSON under
//! `/subscriptions/{match_type}/{match}[/{subscriber}]`, the cursor in a `Link` header. The
//! shared `/subscriptions` answers in the dialect of the caller's token (a 1.0 access token
//! gets 1.0 JSON), and a two-segment path is a 1.0 collection when its first segment names a
//! 1.0 matcher type (a 0.x topic literally `exact` is shadowed), else a 0.x subscription.
//!
//! The caller's token must allow receiving the request's path itself (raw, without its query:
//! its subscribe selectors must match it), as the reference hub requires; only the
//! subscriptions the caller could receive events about are listed.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::mercure::auth_error;
use super::{form, reject, AppState, MERCURE_PATH};
use crate::auth::{find_token, is_access_token, query_token, AuthError};
use crate::hub::subscriptions::{
    escape, subscription_id, subscription_id_1_0, topic_collection_id, PREFIX,
};
use crate::hub::{MatchType, Selector};

/// The Mercure 1.0 matcher types a path segment may name (`urlpattern` routes to the 1.0
/// API even where no such subscription can exist yet).
const MATCH_TYPES_1_0: [&str; 2] = ["exact", "urlpattern"];

const CONTEXT: &str = "https://mercure.rocks/";

/// Who is asking: their token's subscribe selectors, and whether the token is a 1.0
/// access token (which decides the dialect of the shared route's answer).
struct Caller {
    selectors: Vec<Arc<Selector>>,
    access_token: bool,
}

/// The caller, or the refusal: the API needs a token whose selectors match the request's
/// path (raw, as the client escaped it, without the query).
fn caller(app: &AppState, req: &Request) -> Result<Caller, Response> {
    if !app.subscriptions {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "the subscription API is off: start the hub with --subscriptions",
        ));
    }
    // A query that cannot be read is refused, not skipped: skipping it would drop its
    // `authorization` and fall back to the cookie's token.
    let query_token = match req.uri().query() {
        Some(q) => query_token(
            form::parse(q.as_bytes(), 32).map_err(|e| reject(StatusCode::BAD_REQUEST, e))?,
        )
        .map_err(auth_error)?,
        None => None,
    };
    let token = find_token(
        req.headers(),
        query_token.as_deref(),
        &app.tokens.cookie_name,
    )
    .map_err(auth_error)?;
    let Some((token, _)) = token else {
        return Err(auth_error(AuthError::Missing));
    };
    let rights = super::mercure::subscriber_token_rights(app, req, token)?;
    let selectors: Vec<_> = rights
        .subscribe
        .unwrap_or_default()
        .iter()
        .map(|s| app.hub.selector(s))
        .collect();
    let path = req.uri().path();
    if !allowed(&selectors, path) {
        return Err(forbidden(path));
    }
    Ok(Caller {
        selectors,
        access_token: is_access_token(token),
    })
}

fn allowed(selectors: &[std::sync::Arc<Selector>], id: &str) -> bool {
    selectors.iter().any(|s| s.matches(id))
}

fn forbidden(id: &str) -> Response {
    auth_error(AuthError::Forbidden(format!(
        "the token's \"mercure.subscribe\" does not match {id:?}"
    )))
}

/// The raw (still escaped) path segments after the API prefix: split before decoding, so
/// that an escaped `/` inside a segment does not split it.
fn raw_segments(req: &Request) -> Vec<&str> {
    let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or("");
    rest.split('/').skip(1).collect()
}

/// A 0.x segment, decoded as the reference hub's 0.x ids were encoded (`+` for a space).
fn decode_0x(segment: &str) -> Result<String, Response> {
    form::parse(format!("x={segment}").as_bytes(), 1)
        .map(|mut p| p.pop().map(|(_, v)| v).unwrap_or_default())
        .map_err(|e| reject(StatusCode::BAD_REQUEST, e))
}

/// A 1.0 segment, percent-decoded as a URL path is (a `+` is a plus); a malformed escape or
/// bytes that are not UTF-8 are refused.
fn decode_1_0(segment: &str) -> Result<String, Response> {
    let bad = || {
        reject(
            StatusCode::BAD_REQUEST,
            "malformed path: bad percent escape",
        )
    };
    let raw = segment.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' {
            let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
            let (Some(h), Some(l)) = (hex(raw.get(i + 1)), hex(raw.get(i + 2))) else {
                return Err(bad());
            };
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        reject(
            StatusCode::BAD_REQUEST,
            "malformed path: a segment is not UTF-8",
        )
    })
}

/// The document's entity tag: the id of the newest update, quoted (RFC 9110 §8.8.3). Publishers
/// choose ids: one with characters a tag may not hold, or a comma (which separates the tags of
/// `If-None-Match`), is tagged `"~"` and a hash of it instead; so is one starting with `~`, so
/// that no id's own tag can equal another's hashed one.
fn entity_tag(last_event_id: &str) -> String {
    let plain = !last_event_id.is_empty()
        && !last_event_id.starts_with('~')
        && last_event_id
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b',');
    if plain {
        format!("\"{last_event_id}\"")
    } else {
        use std::hash::{Hash, Hasher};
        // Not a secret, only a stable name for the id (SipHash with fixed keys).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        last_event_id.hash(&mut h);
        format!("\"~{:016x}\"", h.finish())
    }
}

/// Whether `If-None-Match` names `tag` (weak comparison, as RFC 9110 §13.1.2 asks), or is `*`.
fn none_match(req: &Request, tag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

fn ld_json(doc: Value, last_event_id: &str, req: &Request) -> Response {
    let tag = entity_tag(last_event_id);
    let matches = none_match(req, &tag);
    let etag = HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"earliest\""));
    if matches {
        // A 304 carries the caching fields the 200 would (RFC 9110 §15.4.5).
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("private, no-store"),
                ),
            ],
        )
            .into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/ld+json"),
            ),
            (header::ETAG, etag),
            // Documents carry subscribers' token payloads: for this caller only.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        doc.to_string(),
    )
        .into_response()
}

/// The cursor as a 1.0 entity tag (as the reference hub makes it): the id, quoted, with
/// every byte a tag may not hold, `"`, `%`, and (so that `If-None-Match` lists split
/// cleanly) `,` and non-ASCII bytes percent-encoded.
fn entity_tag_1_0(cursor: &str) -> String {
    let mut tag = String::with_capacity(cursor.len() + 2);
    tag.push('"');
    for &b in cursor.as_bytes() {
        match b {
            b'"' | b'%' | b',' => tag.push_str(&format!("%{b:02X}")),
            0x21..=0x7e => tag.push(b as char),
            _ => tag.push_str(&format!("%{b:02X}")),
        }
    }
    tag.push('"');
    tag
}

/// `Link: </.well-known/mercure>; rel="mercure"; last-event-id="…"; …`: where 1.0 puts the
/// cursor of a document (the id of the last update the hub had dispatched when it was made).
fn cursor_link(cursor: &str) -> HeaderValue {
    let link = |id: &str| {
        let id = id.replace('\\', "\\\\").replace('"', "\\\"");
        format!(
            "<{MERCURE_PATH}>; rel=\"mercure\"; last-event-id=\"{id}\"; type=\"mercure\"; content-type=\"application/json\""
        )
    };
    // An id no header can carry (a control character, from a history older than the 1.0
    // checks) is told as `earliest`: resuming from there misses nothing.
    HeaderValue::from_bytes(link(cursor).as_bytes()).unwrap_or(HeaderValue::from_static(
        "</.well-known/mercure>; rel=\"mercure\"; last-event-id=\"earliest\"; type=\"mercure\"; content-type=\"application/json\"",
    ))
}

fn json_1_0(doc: Value, cursor: &str, req: &Request) -> Response {
    let tag = entity_tag_1_0(cursor);
    let etag = HeaderValue::from_str(&tag).unwrap_or(HeaderValue::from_static("\"earliest\""));
    // Documents carry subscribers' token payloads: for this caller only.
    let private = HeaderValue::from_static("private, no-store");
    if none_match(req, &tag) {
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, etag),
                (header::LINK, cursor_link(cursor)),
                (header::CACHE_CONTROL, private),
            ],
        )
            .into_response();
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::LINK, cursor_link(cursor)),
            (header::CACHE_CONTROL, private),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        doc.to_string(),
    )
        .into_response()
}

/// A 0.x collection: every 0.x subscription, or those to one topic.
fn collection_0x(app: &AppState, req: &Request, caller: &Caller, topic: Option<&str>) -> Response {
    let id = topic.map_or_else(|| PREFIX.to_owned(), topic_collection_id);
    let (docs, last) = app.hub.subscriptions(&caller.selectors);
    let list: Vec<Value> = docs
        .into_iter()
        .filter(|(kind, _)| *kind == MatchType::Topic)
        .map(|(_, d)| d)
        .filter(|d| topic.is_none_or(|t| d["topic"] == t))
        .filter(|d| allowed(&caller.selectors, d["id"].as_str().unwrap_or("")))
        .collect();
    let doc = json!({
        "@context": CONTEXT,
        "id": id,
        "type": "Subscriptions",
        "lastEventID": last,
        "subscriptions": list,
    });
    ld_json(doc, &last, req)
}

/// A 1.0 collection: every 1.0 subscription, or those of one matcher (type and text).
fn collection_1_0(
    app: &AppState,
    req: &Request,
    caller: &Caller,
    matcher: Option<(&str, &str)>,
) -> Response {
    let (docs, last) = app.hub.subscriptions(&caller.selectors);
    let list: Vec<Value> = docs
        .into_iter()
        .filter(|(kind, _)| *kind != MatchType::Topic)
        .map(|(_, d)| d)
        .filter(|d| matcher.is_none_or(|(t, m)| d["match_type"] == t && d["match"] == m))
        .filter(|d| allowed(&caller.selectors, d["id"].as_str().unwrap_or("")))
        .collect();
    let doc = json!({
        "id": req.uri().path(),
        "type": "subscriptions",
        "subscriptions": list,
    });
    json_1_0(doc, &last, req)
}

/// `GET /.well-known/mercure/subscriptions`, in the dialect of the caller's token.
pub async fn all(State(app): State<AppState>, req: Request) -> Response {
    match caller(&app, &req) {
        Ok(c) if c.access_token => collection_1_0(&app, &req, &c, None),
        Ok(c) => collection_0x(&app, &req, &c, None),
        Err(r) => r,
    }
}

/// `GET /.well-known/mercure/subscriptions/{topic}` (0.x only)
pub async fn for_topic(State(app): State<AppState>, req: Request) -> Response {
    let c = match caller(&app, &req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match raw_segments(&req)[..] {
        [topic] => match decode_0x(topic) {
            Ok(topic) => collection_0x(&app, &req, &c, Some(&topic)),
            Err(r) => r,
        },
        _ => reject(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `GET /.well-known/mercure/subscriptions/{match_type}/{match}` (a 1.0 collection) or
/// `GET /.well-known/mercure/subscriptions/{topic}/{subscriber}` (a 0.x subscription).
pub async fn one(State(app): State<AppState>, req: Request) -> Response {
    let c = match caller(&app, &req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let [first, second] = raw_segments(&req)[..] else {
        return reject(StatusCode::NOT_FOUND, "not found");
    };
    let match_type = match decode_1_0(first) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if MATCH_TYPES_1_0.contains(&match_type.as_str()) {
        return match decode_1_0(second) {
            Ok(m) => collection_1_0(&app, &req, &c, Some((&match_type, &m))),
            Err(r) => r,
        };
    }
    let (topic, subscriber) = match (decode_0x(first), decode_0x(second)) {
        (Ok(t), Ok(s)) => (t, s),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    let id = subscription_id(&topic, &subscriber);
    if !allowed(&c.selectors, &id) {
        return forbidden(&id);
    }
    let (docs, last) = app.hub.subscriptions(&c.selectors);
    let found = docs
        .into_iter()
        .find(|(kind, d)| *kind == MatchType::Topic && d["id"] == id.as_str());
    match found {
        Some((_, mut doc)) => {
            doc["lastEventID"] = Value::from(last.clone());
            ld_json(doc, &last, &req)
        }
        None => reject(
            StatusCode::NOT_FOUND,
            format!(
                "no active subscription of {} to {}",
                escape(&subscriber),
                escape(&topic)
            ),
        ),
    }
}

/// `GET /.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}` (1.0)
pub async fn single(State(app): State<AppState>, req: Request) -> Response {
    let c = match caller(&app, &req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let decoded: Result<Vec<String>, Response> =
        raw_segments(&req).into_iter().map(decode_1_0).collect();
    let [match_type, pattern, subscriber] = match decoded {
        Ok(s) => match <[String; 3]>::try_from(s) {
            Ok(s) => s,
            Err(_) => return reject(StatusCode::NOT_FOUND, "not found"),
        },
        Err(r) => return r,
    };
    if !MATCH_TYPES_1_0.contains(&match_type.as_str()) {
        return reject(
            StatusCode::BAD_REQUEST,
            format!("unknown matcher type {match_type:?}: expected exact or urlpattern"),
        );
    }
    let id = subscription_id_1_0(&match_type, &pattern, &subscriber);
    if !allowed(&c.selectors, &id) {
        return forbidden(&id);
    }
    let (docs, last) = app.hub.subscriptions(&c.selectors);
    let found = docs
        .into_iter()
        .find(|(kind, d)| *kind != MatchType::Topic && d["id"] == id.as_str());
    match found {
        Some((_, doc)) => json_1_0(doc, &last, &req),
        None => reject(
            StatusCode::NOT_FOUND,
            format!("no active subscription {id}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_tags_are_quoted_and_valid() {
        assert_eq!(entity_tag("urn:uuid:1"), "\"urn:uuid:1\"");
        let odd_ids = [
            "",
            "a b",
            "say \"hi\"",
            "é",
            "a\u{7f}",
            "a,b",
            "~0123456789abcdef",
        ];
        for odd in odd_ids {
            let tag = entity_tag(odd);
            assert!(
                tag.starts_with("\"~") && tag.ends_with('"'),
                "{odd:?} -> {tag}"
            );
            assert!(HeaderValue::from_str(&tag).is_ok());
            assert_ne!(tag, entity_tag("other"));
        }
        // A plain id cannot take the form of a hashed one's tag.
        let hashed = entity_tag("a b");
        assert_ne!(entity_tag(&hashed[1..hashed.len() - 1]), hashed);
    }

    #[test]
    fn if_none_match_compares_weakly_and_takes_star() {
        let req = |v: &str| {
            axum::http::Request::builder()
                .header(header::IF_NONE_MATCH, v)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        assert!(none_match(&req("\"x\""), "\"x\""));
        assert!(none_match(&req("W/\"x\""), "\"x\""));
        assert!(none_match(&req("\"a\", \"x\""), "\"x\""));
        assert!(none_match(&req("*"), "\"x\""));
        assert!(!none_match(&req("x"), "\"x\""));
        assert!(!none_match(&req("\"y\""), "\"x\""));
    }

    #[test]
    fn cursors_in_1_0_headers() {
        assert_eq!(entity_tag_1_0("urn:uuid:1"), "\"urn:uuid:1\"");
        assert_eq!(entity_tag_1_0("a \"b\",%é"), "\"a%20%22b%22%2C%25%C3%A9\"");
        assert_eq!(
            cursor_link("say \"hi\" \\o/"),
            "</.well-known/mercure>; rel=\"mercure\"; last-event-id=\"say \\\"hi\\\" \\\\o/\"; type=\"mercure\"; content-type=\"application/json\""
        );
        assert!(cursor_link("a\u{1}b")
            .to_str()
            .unwrap()
            .contains("\"earliest\""));
    }

    #[test]
    fn segments_decode_strictly_in_1_0() {
        assert_eq!(decode_1_0("a%20b+c%2F").ok(), Some("a b+c/".to_owned()));
        assert!(decode_1_0("a%2").is_err());
        assert!(decode_1_0("%zz").is_err());
        assert!(decode_1_0("%FF").is_err());
    }
}
