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
    /// For the hub's own subscription events only: the event in the other dialect, for the
    /// listeners of that dialect (`data` and `event_type` are in the subscription's own: a 1.0
    /// subscription's plain JSON under `event: mercure`, a 0.x one's JSON-LD message). Nodes
    /// that do not know it show everyone `data`, as before.
    pub alt_data: Option<String>,
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
    #[error("a topic must not contain control or invisible formatting characters (C0, DEL, C1, Unicode Cf)")]
    BadTopic,
    #[error("topic \"*\" cannot be published: it means every topic to a subscriber")]
    WildcardTopic,
    #[error("topic {0:?} is in the hub's reserved namespace {RESERVED_PATH}")]
    ReservedTopic(String),
    #[error("\"id\" must not contain control or invisible formatting characters (C0, DEL, C1, Unicode Cf)")]
    BadId,
    #[error("\"id\" must not start with '#' (reserved for the hub)")]
    HashId,
    #[error(
        "\"id\" must not be \"earliest\" (a subscriber sends it to ask for the whole history)"
    )]
    EarliestId,
    #[error("\"type\" must not contain control or invisible formatting characters (C0, DEL, C1, Unicode Cf)")]
    BadType,
    #[error("\"type\" \"mercure\" is reserved for the hub's own events")]
    ReservedType,
    #[error("\"retry\" must be a whole number of milliseconds in ASCII digits, not {0:?}")]
    BadRetry(String),
    /// Refused with 413, as a body too large is: the publish asks too much of the hub.
    #[error("this publish's topics would be tested against too many URI templates ({topics} topics × {templates} templates); publish fewer or shorter topics")]
    TooMuchMatching { topics: usize, templates: usize },
}

/// The hub's path: topics under it are the hub's own (its subscription events).
pub const RESERVED_PATH: &str = "/.well-known/mercure";

/// The SSE event type of the hub's own events, which no publisher may use.
pub const HUB_EVENT_TYPE: &str = "mercure";

impl Draft {
    /// Checks a publisher's update: everything that does not depend on who is publishing
    /// (Mercure 1.0 §4, applied whatever the dialect of the publisher's token, so that a 0.x
    /// publisher cannot forge what a 1.0 subscriber trusts to come from the hub).
    pub fn validate(&self) -> Result<(), Invalid> {
        self.validate_encodable()?;
        if self
            .topics
            .iter()
            .any(|t| t.len() > super::selector::MAX_SELECTOR_LEN)
        {
            return Err(Invalid::TopicTooLong);
        }
        if self.topics.iter().any(|t| has_control_or_format(t)) {
            return Err(Invalid::BadTopic);
        }
        if self.topics.iter().any(|t| t == "*") {
            return Err(Invalid::WildcardTopic);
        }
        if let Some(t) = self.topics.iter().find(|t| is_reserved_topic(t)) {
            return Err(Invalid::ReservedTopic(t.clone()));
        }
        if let Some(id) = &self.id {
            if has_control_or_format(id) {
                return Err(Invalid::BadId);
            }
            if id.starts_with('#') {
                return Err(Invalid::HashId);
            }
            if id == "earliest" {
                return Err(Invalid::EarliestId);
            }
        }
        if let Some(t) = &self.event_type {
            if has_control_or_format(t) {
                return Err(Invalid::BadType);
            }
            if t == HUB_EVENT_TYPE {
                return Err(Invalid::ReservedType);
            }
        }
        Ok(())
    }

    /// Checks an update read back from (or sent to) the cluster's shared stream: a
    /// publisher's gets every check of [`Draft::validate`], but one of the hub's own
    /// subscription events (which lives in the reserved namespace and has the reserved type)
    /// only what keeps every stream well-formed.
    pub fn validate_relayed(&self) -> Result<(), Invalid> {
        if self.is_subscription_event() {
            self.validate_encodable()
        } else {
            self.validate()
        }
    }

    /// What any update must satisfy, the hub's own included: a topic, and an id and a type
    /// that cannot break the event-stream framing of every subscriber.
    fn validate_encodable(&self) -> Result<(), Invalid> {
        if self.topics.is_empty() {
            return Err(Invalid::NoTopic);
        }
        if self.topics.len() > MAX_TOPICS {
            return Err(Invalid::TooManyTopics);
        }
        if self.id.as_deref().is_some_and(has_line_break_or_nul) {
            return Err(Invalid::BadId);
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

/// A publisher's `retry`: ASCII digits only (Rust's own parser would take a leading `+`).
pub fn parse_retry(value: &str) -> Result<u64, Invalid> {
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| value.parse::<u64>().ok())
        .flatten()
        .ok_or_else(|| Invalid::BadRetry(value.to_owned()))
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
    // The raw prefix alone is not enough: `/.well-known/mercure/subscriptions/../../x` starts
    // with it but names a topic outside the namespace, which a publisher may use. Every topic
    // the hub makes resolves inside it (one matcher segment can climb one level at most).
    private
        && topics
            .first()
            .is_some_and(|t| t.starts_with(super::subscriptions::PREFIX) && is_reserved_topic(t))
}

fn has_line_break_or_nul(s: &str) -> bool {
    s.contains(['\r', '\n', '\0'])
}

/// Whether `s` holds a character Mercure 1.0 refuses in ids, types, topics and matchers:
/// C0 controls, DEL, C1 controls, or a Unicode format character (general category `Cf`,
/// such as the bidirectional overrides and zero-width characters that make two different
/// strings look the same).
pub fn has_control_or_format(s: &str) -> bool {
    s.chars().any(is_control_or_format)
}

pub fn is_control_or_format(c: char) -> bool {
    // Every `Cf` code point as of Unicode 17 (none was added after 15.0).
    const FORMAT: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = c as u32;
    if c < 0x20 || (0x7F..=0x9F).contains(&c) {
        return true;
    }
    c >= 0xAD
        && FORMAT
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
}

/// Whether a topic addresses the hub's reserved namespace (Mercure 1.0 §4.2). A substring
/// test is both too wide (`/.well-known/mercureX` is a fine topic) and too narrow (a URL
/// reference such as `mercure/x` or `/.well-known/%6Dercure` reaches the same path), so the
/// topic is resolved as browsers and URL Patterns do, against the hub's URL (only its path
/// matters): reserved when the resolved path, with escapes of unreserved characters decoded,
/// is the hub's path or below it. A topic that is not a URL reference at all is not reserved.
pub fn is_reserved_topic(topic: &str) -> bool {
    static BASE: std::sync::LazyLock<url::Url> = std::sync::LazyLock::new(|| {
        url::Url::parse("https://mercure.invalid/.well-known/mercure").expect("a valid URL")
    });
    let Ok(resolved) = BASE.join(topic) else {
        return false;
    };
    let path = decode_unreserved(resolved.path());
    path == RESERVED_PATH
        || path
            .strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Decodes the `%XX` escapes of RFC 3986 unreserved characters (letters, digits, `-._~`),
/// which name the same resource escaped or not; every other escape stays as it is.
fn decode_unreserved(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains('%') {
        return path.into();
    }
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |x: u8| (x as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                    i += 3;
                    continue;
                }
            }
        }
        // `path` is a str and `%` is ASCII: copying up to the next `%` keeps UTF-8 whole.
        let next = path[i + 1..].find('%').map_or(b.len(), |n| i + 1 + n);
        out.push_str(&path[i..next]);
        i = next;
    }
    out.into()
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
    /// A subscription event's bytes in the other dialect (Mercure 1.0 §9.3 row 17: each
    /// listener gets the event in its own). Boxed: most updates have none.
    pub alt: Option<Box<Bytes>>,
    /// `alt` is for 0.x listeners (the subscription is a 1.0 one), else for 1.0 listeners.
    pub alt_is_legacy: bool,
}

pub type SharedUpdate = Arc<Update>;

impl Update {
    /// The bytes the update holds in memory, for the history's byte budget: its encoding,
    /// its id and topics, and the allocations around them.
    pub fn weight(&self) -> usize {
        const OVERHEAD: usize = std::mem::size_of::<Update>() + 32;
        let topics: usize = self.topics.iter().map(|t| t.len() + 24).sum();
        let alt = self.alt.as_ref().map_or(0, |b| b.len() + 48);
        OVERHEAD + self.encoded.len() + alt + self.id.len() + topics
    }

    /// The bytes a listener gets: a subscription event in the listener's dialect (0.x for a
    /// `topic=` stream), every other update its one encoding.
    #[inline]
    pub fn wire(&self, legacy_listener: bool) -> &Bytes {
        match &self.alt {
            Some(b) if legacy_listener == self.alt_is_legacy => b,
            _ => &self.encoded,
        }
    }

    /// A Mercure subscription event (published by the hub itself on its reserved topics,
    /// which no publisher may use): kept apart in the history, so that a churn of subscribers
    /// cannot push real updates out of it.
    pub fn is_subscription_event(&self) -> bool {
        subscription_event(self.private, &self.topics)
    }
}

/// A subscription event's encoding in the other dialect, when it has one, and whether that
/// is 0.x's (see [`Update::wire`]).
pub(crate) fn encode_alt(draft: &Draft, id: &str) -> (Option<Box<Bytes>>, bool) {
    // The primary rendering is 1.0's exactly when it is typed `mercure`.
    let alt_is_legacy = draft.event_type.as_deref() == Some(HUB_EVENT_TYPE);
    // Only the hub's own events have two renderings: an update from a publisher (or written
    // into the cluster's stream by anything else) shows every listener the same bytes.
    let Some(data) = draft
        .alt_data
        .as_deref()
        .filter(|_| draft.is_subscription_event())
    else {
        return (None, alt_is_legacy);
    };
    let event_type = (!alt_is_legacy).then_some(HUB_EVENT_TYPE);
    let alt = sse::encode_event(id, event_type, draft.retry, data);
    (Some(Box::new(alt)), alt_is_legacy)
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
        let with = |f: &dyn Fn(&mut Draft)| {
            let mut d = ok.clone();
            f(&mut d);
            d.validate()
        };
        assert_eq!(with(&|d| d.topics.clear()), Err(Invalid::NoTopic));
        assert_eq!(with(&|d| d.id = Some("a\nb".into())), Err(Invalid::BadId));
        assert_eq!(with(&|d| d.id = Some("#1".into())), Err(Invalid::HashId));
        assert_eq!(
            with(&|d| d.id = Some("earliest".into())),
            Err(Invalid::EarliestId)
        );
        assert_eq!(with(&|d| d.id = Some("Earliest".into())), Ok(()));
        assert_eq!(
            with(&|d| d.event_type = Some("x\0".into())),
            Err(Invalid::BadType)
        );
        assert_eq!(
            with(&|d| d.event_type = Some("mercure".into())),
            Err(Invalid::ReservedType)
        );
        assert_eq!(with(&|d| d.event_type = Some("Mercure".into())), Ok(()));
        for bad in [
            "a\u{7f}",
            "a\u{85}",
            "\u{200b}",
            "a\u{202e}b",
            "\u{feff}",
            "\u{e0041}",
            "\t",
        ] {
            assert_eq!(
                with(&|d| d.id = Some(bad.into())),
                Err(Invalid::BadId),
                "{bad:?}"
            );
            assert_eq!(
                with(&|d| d.event_type = Some(bad.into())),
                Err(Invalid::BadType),
                "{bad:?}"
            );
            assert_eq!(
                with(&|d| d.topics.push(bad.into())),
                Err(Invalid::BadTopic),
                "{bad:?}"
            );
        }
        for fine in ["é", "日本", "a b", "\u{a0}", "\u{1f600}"] {
            assert_eq!(with(&|d| d.id = Some(fine.into())), Ok(()), "{fine:?}");
        }
        assert_eq!(
            with(&|d| d.topics.push("*".into())),
            Err(Invalid::WildcardTopic)
        );
        assert_eq!(
            with(&|d| d.topics.push("mercure/x".into())),
            Err(Invalid::ReservedTopic("mercure/x".into()))
        );
    }

    #[test]
    fn retry_is_ascii_digits() {
        assert_eq!(parse_retry("0"), Ok(0));
        assert_eq!(parse_retry("1500"), Ok(1500));
        for bad in [
            "+5",
            "-1",
            " 5",
            "5 ",
            "1e3",
            "٣",
            "99999999999999999999",
            "",
        ] {
            assert_eq!(
                parse_retry(bad),
                Err(Invalid::BadRetry(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn relayed_hub_events_keep_their_reserved_topic_and_type() {
        let event = Draft {
            topics: vec![format!("{}/exact/a/b", super::super::subscriptions::PREFIX)],
            event_type: Some(HUB_EVENT_TYPE.into()),
            private: true,
            ..Default::default()
        };
        assert!(event.validate().is_err());
        assert_eq!(event.validate_relayed(), Ok(()));
        // Not private: not the hub's, so a publisher's rules.
        let forged = Draft {
            private: false,
            ..event.clone()
        };
        assert!(forged.validate_relayed().is_err());
        let broken = Draft {
            event_type: Some("a\nb".into()),
            ..event
        };
        assert_eq!(broken.validate_relayed(), Err(Invalid::BadType));
    }

    /// The test vectors of the reserved-namespace check (mercure-1.0.md §4.2), one per row.
    #[test]
    fn reserved_namespace_vectors() {
        let reserved = [
            // Resolves to the hub URL itself.
            "",
            // Relative to `/.well-known/`.
            "mercure",
            "./mercure",
            "mercure/foo",
            // The hub URL's path, with a query or a fragment.
            "?x=1",
            "#frag",
            // `%6D` is an unreserved `m`.
            "/.well-known/%6Dercure/subscriptions/x",
            // Dot segments removed.
            "/.well-known/mercure/../mercure/x",
            // The host does not count.
            "https://evil.example/.well-known/mercure/subscriptions/a/b/c",
            // WHATWG backslashes and authorities.
            "\\.well-known\\mercure\\x",
            "https://h\\.well-known\\mercure",
            "//h/.well-known/mercure",
            // Beyond the table: the hub path itself, and below it.
            "/.well-known/mercure",
            "/.well-known/mercure/",
            "/.well-known/mercure/subscriptions/exact/a/b",
        ];
        for t in reserved {
            assert!(is_reserved_topic(t), "{t:?} should be reserved");
        }
        let free = [
            "foo",
            "chat-room-1234",
            ".",
            "urn:uuid:1",
            // Rejected, but by its own rule.
            "*",
            // Not at a segment boundary.
            "/.well-known/mercureX",
            "/.well-known/mercure-foo",
            // The path is case-sensitive; `%2F` is not unreserved.
            "/.WELL-KNOWN/mercure",
            "https://h/.well-known/mercure%2Fx",
            // Unparsable.
            "http://[::1",
        ];
        for t in free {
            assert!(!is_reserved_topic(t), "{t:?} should not be reserved");
        }
    }

    #[test]
    fn decodes_only_unreserved_escapes() {
        assert_eq!(decode_unreserved("/a%6D%2Fb%7e%"), "/am%2Fb~%");
        assert_eq!(decode_unreserved("/é%41%4"), "/éA%4");
        assert_eq!(decode_unreserved("%%41"), "%A");
    }
}
