//! Mercure's active subscriptions: the JSON-LD documents that describe who is subscribed to
//! what, published as private updates when a subscription starts or ends, and listed by the
//! subscription API.

use serde_json::{json, Value};

/// The topic prefix of subscription events, and the path of the subscription API.
pub const PREFIX: &str = "/.well-known/mercure/subscriptions";

/// What the hub remembers of a subscriber for the subscription API.
#[derive(Debug)]
pub struct SubscriberInfo {
    /// `urn:uuid:` v4.
    pub id: String,
    pub topics: Vec<super::Matcher>,
    /// The token's `mercure.payload`.
    pub payload: Option<Value>,
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

/// The document of one subscription.
pub fn document(topic: &str, info: &SubscriberInfo, active: bool) -> Value {
    let mut doc = json!({
        "@context": "https://mercure.rocks/",
        "id": subscription_id(topic, &info.id),
        "type": "Subscription",
        "topic": topic,
        "subscriber": info.id,
        "active": active,
    });
    if let Some(p) = &info.payload {
        doc["payload"] = p.clone();
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_escape_like_the_reference_hub() {
        assert_eq!(
            subscription_id("https://example.com/a b", "urn:uuid:x"),
            "/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Fa+b/urn%3Auuid%3Ax"
        );
    }
}
