//! The subscription API (`--subscriptions`): who is subscribed to what, as JSON-LD.
//!
//! The caller's token must allow receiving the request URL itself (its `mercure.subscribe`
//! selectors must match the document's id), as the reference hub requires; only the
//! subscriptions the caller could receive events about are listed.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::mercure::auth_error;
use super::{form, reject, AppState};
use crate::auth::{find_token, query_token, AuthError};
use crate::hub::subscriptions::{escape, subscription_id, topic_collection_id, PREFIX};
use crate::hub::Selector;

const CONTEXT: &str = "https://mercure.rocks/";

/// The caller's `mercure.subscribe` selectors, or the refusal.
fn caller(app: &AppState, req: &Request) -> Result<Vec<std::sync::Arc<Selector>>, Response> {
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
    Ok(rights
        .subscribe
        .unwrap_or_default()
        .iter()
        .map(|s| app.hub.selector(s))
        .collect())
}

fn allowed(selectors: &[std::sync::Arc<Selector>], id: &str) -> bool {
    selectors.iter().any(|s| s.matches(id))
}

fn forbidden(id: &str) -> Response {
    auth_error(AuthError::Forbidden(format!(
        "the token's \"mercure.subscribe\" does not match {id:?}"
    )))
}

/// The decoded path segments after the API prefix.
fn segments(req: &Request) -> Result<Vec<String>, Response> {
    let rest = req.uri().path().strip_prefix(PREFIX).unwrap_or("");
    rest.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            form::parse(format!("x={s}").as_bytes(), 1)
                .map(|mut p| p.pop().map(|(_, v)| v).unwrap_or_default())
                .map_err(|e| reject(StatusCode::BAD_REQUEST, e))
        })
        .collect()
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

fn collection(app: &AppState, req: &Request, topic: Option<&str>) -> Response {
    let selectors = match caller(app, req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let id = topic.map_or_else(|| PREFIX.to_owned(), topic_collection_id);
    if !allowed(&selectors, &id) {
        return forbidden(&id);
    }
    let (docs, last) = app.hub.subscriptions(&selectors);
    let list: Vec<Value> = docs
        .into_iter()
        .filter(|d| topic.is_none_or(|t| d["topic"] == t))
        .filter(|d| allowed(&selectors, d["id"].as_str().unwrap_or("")))
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

/// `GET /.well-known/mercure/subscriptions`
pub async fn all(State(app): State<AppState>, req: Request) -> Response {
    collection(&app, &req, None)
}

/// `GET /.well-known/mercure/subscriptions/{topic}`
pub async fn for_topic(State(app): State<AppState>, req: Request) -> Response {
    match segments(&req) {
        Ok(s) if s.len() == 1 => collection(&app, &req, Some(&s[0])),
        Ok(_) => reject(StatusCode::NOT_FOUND, "not found"),
        Err(r) => r,
    }
}

/// `GET /.well-known/mercure/subscriptions/{topic}/{subscriber}`
pub async fn one(State(app): State<AppState>, req: Request) -> Response {
    let selectors = match caller(&app, &req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let (topic, subscriber) = match segments(&req) {
        Ok(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Ok(_) => return reject(StatusCode::NOT_FOUND, "not found"),
        Err(r) => return r,
    };
    let id = subscription_id(&topic, &subscriber);
    if !allowed(&selectors, &id) {
        return forbidden(&id);
    }
    let (docs, last) = app.hub.subscriptions(&selectors);
    match docs.into_iter().find(|d| d["id"] == id.as_str()) {
        Some(mut doc) => {
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
}
