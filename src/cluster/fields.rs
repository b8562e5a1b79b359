//! How an update travels through a cluster's shared log: a few named text fields, the same
//! for every engine (a Redis Stream entry holds them as its fields, a JetStream message as a
//! JSON object), so a Draft is turned into fields and back in this one place.

use crate::hub::Draft;

/// The update's fields. Topics are a JSON array: one field, whatever their number.
pub(super) fn fields(draft: &Draft, id: &str) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", id.to_owned()),
        (
            "topics",
            serde_json::to_string(&draft.topics).unwrap_or_default(),
        ),
        ("data", draft.data.clone()),
    ];
    if let Some(t) = &draft.event_type {
        f.push(("type", t.clone()));
    }
    if let Some(r) = draft.retry {
        f.push(("retry", r.to_string()));
    }
    if draft.private {
        f.push(("private", "1".to_owned()));
    }
    if let Some(d) = &draft.alt_data {
        f.push(("alt", d.clone()));
    }
    f
}

/// The update back from its fields (`get` looks one up by name), with its id; `None` if they
/// were not written by ssehub.
pub(super) fn parse(get: impl Fn(&str) -> Option<String>) -> Option<(Draft, String)> {
    let id = get("id")?;
    let topics: Vec<String> = serde_json::from_str(&get("topics")?).ok()?;
    let draft = Draft {
        topics,
        data: get("data").unwrap_or_default(),
        id: Some(id.clone()),
        event_type: get("type"),
        retry: get("retry").and_then(|r| r.parse().ok()),
        private: get("private").is_some(),
        alt_data: get("alt"),
    };
    Some((draft, id))
}
