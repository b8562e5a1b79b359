//! An update: what a publisher sends, checked, given an id, and encoded once.

use std::sync::Arc;

use bytes::Bytes;

use crate::sse;

/// The most topics one update (or one subscription request) may name.
pub const MAX_TOPICS: usize = 1000;

/// An update as a publisher describes it, before the hub has checked it.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The canonical topic first, then alternates; every one counts for matching.
    pub topics: Vec<String>,
    pub data: String,
    /// The publisher's id, or `None` for a generated `urn:uuid:` v7.
    pub id: Option<String>,
    pub event_type: Option<String>,
    pub retry: Option<u64>,
    pub private: bool,
}

/// Why a draft was refused. Each message is the one-line reason the publisher sees.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Invalid {
    #[error("missing \"topic\" parameter")]
    NoTopic,
    #[error("too many \"topic\" parameters (at most {MAX_TOPICS})")]
    TooManyTopics,
    #[error("a topic is longer than {} bytes", super::selector::MAX_SELECTOR_LEN)]
    TopicTooLong,
    #[error("\"id\" must not contain CR, LF or NUL")]
    BadId,
    #[error("\"id\" must not start with '#' (reserved for the hub)")]
    HashId,
    #[error("\"type\" must not contain CR, LF or NUL")]
    BadType,
    /// Refused with 413, as a body too large is: the publish asks too much of the hub.
    #[error("this publish's topics would be tested against too many URI templates ({topics} topics × {templates} templates); publish fewer or shorter topics")]
    TooMuchMatching { topics: usize, templates: usize },
}

impl Draft {
    /// Checks everything that does not depend on who is publishing.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.topics.is_empty() {
            return Err(Invalid::NoTopic);
        }
        if self.topics.len() > MAX_TOPICS {
            return Err(Invalid::TooManyTopics);
        }
        if self
            .topics
            .iter()
            .any(|t| t.len() > super::selector::MAX_SELECTOR_LEN)
        {
            return Err(Invalid::TopicTooLong);
        }
        if let Some(id) = &self.id {
            if has_line_break_or_nul(id) {
                return Err(Invalid::BadId);
            }
            if id.starts_with('#') {
                return Err(Invalid::HashId);
            }
        }
        if self
            .event_type
            .as_deref()
            .is_some_and(has_line_break_or_nul)
        {
            return Err(Invalid::BadType);
        }
        Ok(())
    }
}

impl Draft {
    /// A Mercure subscription event (see [`Update::is_subscription_event`]).
    pub fn is_subscription_event(&self) -> bool {
        subscription_event(self.private, &self.topics)
    }
}

/// Whether an update is one of the hub's own subscription events: private, on the hub's
/// reserved topics (which no publisher may use).
fn subscription_event(private: bool, topics: &[String]) -> bool {
    private
        && topics
            .first()
            .is_some_and(|t| t.starts_with(super::subscriptions::PREFIX))
}

fn has_line_break_or_nul(s: &str) -> bool {
    s.contains(['\r', '\n', '\0'])
}

/// A generated update id: `urn:uuid:` and a UUID v7, whose first 48 bits are the time in ms.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().urn().to_string()
}

/// If `id` is a `urn:uuid:` v7 id, the Unix time in milliseconds it was made at.
pub fn v7_millis(id: &str) -> Option<u64> {
    let u = uuid::Uuid::parse_str(id.strip_prefix("urn:uuid:")?).ok()?;
    if u.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = u.get_timestamp()?.to_unix();
    Some(secs * 1000 + u64::from(nanos) / 1_000_000)
}

/// A published update, shared (behind `Arc`) by the history and every subscriber queue.
#[derive(Debug)]
pub struct Update {
    /// Position in the hub's one global order.
    pub seq: u64,
    pub id: String,
    pub topics: Vec<String>,
    pub private: bool,
    /// Unix time in milliseconds when the hub accepted it.
    pub time_ms: u64,
    /// The event-stream bytes, encoded once for every subscriber.
    pub encoded: Bytes,
}

pub type SharedUpdate = Arc<Update>;

impl Update {
    /// The bytes the update holds in memory, for the history's byte budget: its encoding,
    /// its id and topics, and the allocations around them.
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = std::mem::size_of::<Update>() + 32;
        let topics: usize = self.topics.iter().map(|t| t.len() + 24).sum();
        OVERHEAD + self.encoded.len() + self.id.len() + topics
    }

    /// A Mercure subscription event (published by the hub itself on its reserved topics,
    /// which no publisher may use): kept apart in the history, so that a churn of subscribers
    /// cannot push real updates out of it.
    pub fn is_subscription_event(&self) -> bool {
        subscription_event(self.private, &self.topics)
    }
}

/// Encodes a checked draft; the hub then gives it its place in the order.
pub(crate) fn encode(draft: &Draft, id: &str) -> Bytes {
    sse::encode_event(id, draft.event_type.as_deref(), draft.retry, &draft.data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_carry_their_time() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = new_id();
        let t = v7_millis(&id).unwrap();
        assert!(t >= before && t < before + 5000, "{t} vs {before}");
        assert_eq!(
            v7_millis("urn:uuid:6ba7b810-9dad-11d1-80b4-00c04fd430c8"),
            None
        );
        assert_eq!(v7_millis("nope"), None);
    }

    #[test]
    fn validation() {
        let ok = Draft {
            topics: vec!["a".into()],
            ..Default::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let mut d = ok.clone();
        d.topics.clear();
        assert_eq!(d.validate(), Err(Invalid::NoTopic));
        let mut d = ok.clone();
        d.id = Some("a\nb".into());
        assert_eq!(d.validate(), Err(Invalid::BadId));
        let mut d = ok.clone();
        d.id = Some("#1".into());
        assert_eq!(d.validate(), Err(Invalid::HashId));
        let mut d = ok;
        d.event_type = Some("x\0".into());
        assert_eq!(d.validate(), Err(Invalid::BadType));
    }
}
