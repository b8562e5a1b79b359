//! Mercure's active subscriptions: the documents that describe who is subscribed to what,
//! published as private updates when a subscription starts or ends, and listed by the
//! subscription API. A subscription keeps the shape of the dialect it was made in: a 0.x
//! `topic=` one is a JSON-LD `Subscription` on `…/subscriptions/{topic}/{subscriber}`; a 1.0
//! one is plain JSON on `…/subscriptions/{match_type}/{match}/{subscriber}`, sent as an
//! `event: mercure`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::MatchType;

/// The topic prefix of subscription events, and the path of the subscription API.
pub const PREFIX: &str = "/.well-known/mercure/subscriptions";

/// What the hub remembers of a subscriber for the subscription API.
#[derive(Debug)]
pub struct SubscriberInfo {
    /// `urn:uuid:` v4.
    pub id: String,
    pub topics: Vec<super::Matcher>,
    /// The payload of each subscription (by the index of its matcher in `topics`): a 0.x
    /// token's `mercure.payload` for all, a 1.0 token's per matcher (Mercure 1.0 §7.1).
    pub payloads: Vec<Option<Arc<Value>>>,
}

impl SubscriberInfo {
    /// The payload of the subscription to `topics[i]`.
    pub fn payload(&self, i: usize) -> Option<&Value> {
        self.payloads.get(i)?.as_deref()
    }
}

/// Percent-encodes like Go's `url.QueryEscape`, which the reference hub uses in these ids:
/// unreserved characters stay, a space becomes `+`, everything else `%XX`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `/.well-known/mercure/subscriptions/{topic}/{subscriber}`.
pub fn subscription_id(topic: &str, subscriber: &str) -> String {
    format!("{PREFIX}/{}/{}", escape(topic), escape(subscriber))
}

/// `/.well-known/mercure/subscriptions/{topic}`.
pub fn topic_collection_id(topic: &str) -> String {
    format!("{PREFIX}/{}", escape(topic))
}

/// Percent-encodes as RFC 6570's simple expansion does, which Mercure 1.0 uses in these ids:
/// every byte but unreserved characters becomes `%XX` (a space `%20`), once.
pub fn escape_1_0(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `/.well-known/mercure/subscriptions/{match_type}/{match}`.
pub fn matcher_collection_id(match_type: &str, pattern: &str) -> String {
    format!(
        "{PREFIX}/{}/{}",
        escape_1_0(match_type),
        escape_1_0(pattern)
    )
}

/// `/.well-known/mercure/subscriptions/{match_type}/{match}/{subscriber}`.
pub fn subscription_id_1_0(match_type: &str, pattern: &str, subscriber: &str) -> String {
    format!(
        "{}/{}",
        matcher_collection_id(match_type, pattern),
        escape_1_0(subscriber)
    )
}

/// The document of the subscriber's `i`th subscription, in the shape of the dialect it was
/// made in.
pub fn document(info: &SubscriberInfo, i: usize, active: bool) -> Value {
    document_as(info, i, active, info.topics[i].kind == MatchType::Topic)
}

/// The subscriber's `i`th subscription's topic: in the shape of the dialect it was made in.
pub fn topic_of(info: &SubscriberInfo, i: usize) -> String {
    let m = &info.topics[i];
    match m.kind {
        MatchType::Topic => subscription_id(&m.pattern, &info.id),
        kind => subscription_id_1_0(kind.name(), &m.pattern, &info.id),
    }
}

/// The document of the subscriber's `i`th subscription as a listener of one dialect reads
/// it: JSON-LD for a 0.x listener (`legacy`), plain JSON for a 1.0 one. Its `id` is always
/// the subscription's own topic (a 0.x subscription's has two segments, a 1.0 one's three);
/// a 0.x selector's `match_type` is `topic`.
pub fn document_as(info: &SubscriberInfo, i: usize, active: bool, legacy: bool) -> Value {
    let matcher = &info.topics[i];
    let payload = info.payload(i);
    let id = topic_of(info, i);
    if legacy {
        let mut doc = document_0x(id, &matcher.pattern, info, payload, active);
        // A 1.0 subscription's `topic` is a matcher: say which kind, or a 0.x reader would
        // take a URL pattern for a topic.
        if matcher.kind != MatchType::Topic {
            doc["match_type"] = matcher.kind.name().into();
        }
        return doc;
    }
    let name = matcher.kind.name();
    let mut doc = json!({
        "id": id,
        "type": "subscription",
        "match_type": name,
        "match": matcher.pattern,
        "subscriber": info.id,
        "active": active,
    });
    if let Some(p) = payload {
        doc["payload"] = p.clone();
    }
    doc
}

/// The JSON-LD document of one 0.x subscription.
fn document_0x(
    id: String,
    topic: &str,
    info: &SubscriberInfo,
    payload: Option<&Value>,
    active: bool,
) -> Value {
    let mut doc = json!({
        "@context": "https://mercure.rocks/",
        "id": id,
        "type": "Subscription",
        "topic": topic,
        "subscriber": info.id,
        "active": active,
    });
    if let Some(p) = payload {
        doc["payload"] = p.clone();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Matcher;

    #[test]
    fn ids_escape_like_the_reference_hub() {
        assert_eq!(
            subscription_id("https://example.com/a b", "urn:uuid:x"),
            "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fa+b/urn%3Auuid%3Ax"
        );
    }

    #[test]
    fn documents_take_the_shape_of_their_dialect() {
        let info = SubscriberInfo {
            id: "urn:uuid:1".into(),
            topics: vec![
                Matcher::exact("https://example.com/a b%"),
                Matcher::topic("a b"),
            ],
            payloads: vec![Some(Arc::new(json!({"a": 1})))],
        };
        let doc = document(&info, 0, true);
        assert_eq!(
            doc,
            json!({
                "id": "/.well-known/mercure/subscriptions/exact/https%3A%2F%2Fexample.com%2Fa%20b%25/urn%3Auuid%3A1",
                "type": "subscription",
                "match_type": "exact",
                "match": "https://example.com/a b%",
                "subscriber": "urn:uuid:1",
                "active": true,
                "payload": {"a": 1},
            })
        );
        let doc = document(&info, 1, false);
        assert!(
            doc.get("payload").is_none(),
            "each subscription has its own payload"
        );
        assert_eq!(doc["@context"], "https://mercure.rocks/");
        assert_eq!(doc["type"], "Subscription");
        assert_eq!(
            doc["id"],
            "/.well-known/mercure/subscriptions/a+b/urn%3Auuid%3A1"
        );
        assert_eq!(doc["active"], false);
    }
}
