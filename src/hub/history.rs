//! The bounded history that makes `Last-Event-ID` replay possible.
//!
//! Two rings in publish order, each with its own bounds: real updates, and the hub's own
//! subscription events. Subscription events come from subscribers (one per topic each time one
//! connects or leaves), so a client opening subscriptions in a loop could otherwise push every
//! real update out of the replay; kept apart, it can only push out other subscription events.
//! An index from id to position means finding where a reconnecting client left off does not
//! scan. Each ring is bounded in updates and in bytes, whichever is reached first.

use std::collections::{HashMap, VecDeque};

use super::update::{v7_millis, SharedUpdate};

/// The most subscription events kept for replay, whatever `--history-size` says.
pub const EVENTS_CAPACITY: usize = 1024;
/// The most bytes of subscription events kept for replay.
pub const EVENTS_BYTES: usize = 4 << 20;

/// The bounds of one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub updates: usize,
    pub bytes: usize,
}

/// Updates in publish order, within bounds.
struct Ring {
    entries: VecDeque<SharedUpdate>,
    bytes: usize,
    bounds: Bounds,
}

impl Ring {
    fn new(bounds: Bounds) -> Ring {
        Ring {
            entries: VecDeque::with_capacity(bounds.updates.min(4096)),
            bytes: 0,
            bounds,
        }
    }

    /// Adds `update` and returns what fell out. The newest update is always kept (if any
    /// may be), even one larger than the byte bound on its own.
    fn push(&mut self, update: SharedUpdate, evicted: &mut Vec<SharedUpdate>) {
        self.bytes += update.weight();
        self.entries.push_back(update);
        while self.entries.len() > self.bounds.updates
            || (self.bytes > self.bounds.bytes && self.entries.len() > 1)
        {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.weight();
            evicted.push(old);
        }
    }

    fn at(&self, seq: u64) -> Option<&SharedUpdate> {
        let i = self.entries.binary_search_by_key(&seq, |u| u.seq).ok()?;
        self.entries.get(i)
    }

    /// The entries after `seq`.
    fn after(&self, seq: u64) -> std::collections::vec_deque::Iter<'_, SharedUpdate> {
        let i = self.entries.partition_point(|u| u.seq <= seq);
        self.entries.range(i..)
    }
}

pub struct History {
    updates: Ring,
    events: Ring,
    /// id -> seq of the newest retained update with that id (publishers may reuse ids).
    by_id: HashMap<String, u64>,
    /// The newest update when none are kept (`--history-size 0`): the subscription API still
    /// names the last event id.
    newest: Option<SharedUpdate>,
    /// The latest time (Unix ms) in any time-ordered id of a real update evicted so far. Ids
    /// are made before publishes take their place in the order (and a clock stepped back does
    /// not move uuid v7 ids back), so an evicted id can be newer than the oldest update kept:
    /// comparing with that update alone would take it for a foreign id and replay nothing.
    evicted_ms: u64,
    /// Subscription events that fell out of their ring, by id, their data dropped (oldest
    /// first in `evicted_order`): a client whose last event was one of them resumes after it
    /// rather than being taken for a stranger. Bounded by [`EVICTED_EVENTS`].
    evicted_events: HashMap<String, SharedUpdate>,
    evicted_order: VecDeque<String>,
    /// What the remembered evicted events weigh (ids and topics), within
    /// [`EVICTED_EVENTS_BYTES`].
    evicted_bytes: usize,
    evicted_scratch: Vec<SharedUpdate>,
}

/// How many evicted subscription events are remembered (by id and topic, without data), and
/// the most bytes they may take.
const EVICTED_EVENTS: usize = 4 * EVENTS_CAPACITY;
const EVICTED_EVENTS_BYTES: usize = EVENTS_BYTES / 4;

/// Where a replay starts, as decided from the client's `Last-Event-ID`.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplayFrom {
    /// Replay the retained updates after this position; the id was found.
    After(u64),
    /// Replay everything retained, and answer `Last-Event-ID: earliest`.
    Earliest,
    /// Replay nothing (a foreign id), and answer `earliest`.
    Nothing,
}

impl ReplayFrom {
    /// What a subscriber that resumed from `last_event_id` is told in its `Last-Event-ID`
    /// response header: the id itself when the hub holds it, else `earliest`.
    pub fn answer(&self, last_event_id: &str) -> String {
        match self {
            ReplayFrom::After(_) => last_event_id.to_owned(),
            _ => "earliest".to_owned(),
        }
    }
}

impl History {
    /// A history of real updates within `bounds`; subscription events get their own, smaller
    /// ring.
    pub fn new(bounds: Bounds) -> Self {
        let events = Bounds {
            updates: bounds.updates.min(EVENTS_CAPACITY),
            bytes: bounds.bytes.min(EVENTS_BYTES),
        };
        History {
            updates: Ring::new(bounds),
            events: Ring::new(events),
            by_id: HashMap::with_capacity(bounds.updates.min(4096)),
            newest: None,
            evicted_ms: 0,
            evicted_events: HashMap::new(),
            evicted_order: VecDeque::new(),
            evicted_bytes: 0,
            evicted_scratch: Vec::new(),
        }
    }

    /// Updates retained (real updates and subscription events).
    pub fn len(&self) -> usize {
        self.updates.entries.len() + self.events.entries.len()
    }

    /// Bytes retained, as [`super::Update::weight`] counts them.
    pub fn bytes(&self) -> usize {
        self.updates.bytes + self.events.bytes
    }

    /// The id of the newest retained update that `visible` accepts.
    pub fn newest_id_for(&self, visible: impl Fn(&SharedUpdate) -> bool) -> Option<&str> {
        let mut updates = self.updates.entries.iter().rev().peekable();
        let mut events = self.events.entries.iter().rev().peekable();
        loop {
            let next = match (updates.peek(), events.peek()) {
                (Some(u), Some(e)) if u.seq > e.seq => updates.next(),
                (Some(_), Some(_)) | (None, Some(_)) => events.next(),
                (Some(_), None) => updates.next(),
                (None, None) => break,
            };
            if let Some(u) = next.filter(|u| visible(u)) {
                return Some(&u.id);
            }
        }
        self.newest
            .as_ref()
            .filter(|u| visible(u))
            .map(|u| u.id.as_str())
    }

    /// The first of `f`'s answers for the retained real updates, newest first.
    pub fn newest_with<T>(&self, mut f: impl FnMut(&super::Update) -> Option<T>) -> Option<T> {
        self.updates
            .entries
            .iter()
            .rev()
            .chain(self.newest.iter())
            .find_map(|u| f(u))
    }

    /// Takes every id of the hub's own made up to `ms` (Unix time) and no longer held for
    /// one that was evicted: after a restart, what the previous run held but did not store.
    pub fn forgotten_until(&mut self, ms: u64) {
        self.evicted_ms = self.evicted_ms.max(ms);
    }

    pub fn push(&mut self, update: SharedUpdate) {
        if self.updates.bounds.updates == 0 {
            self.newest = Some(update);
            return;
        }
        let mut evicted = std::mem::take(&mut self.evicted_scratch);
        let event = update.is_subscription_event();
        self.by_id.insert(update.id.clone(), update.seq);
        if event {
            self.events.push(update, &mut evicted);
        } else {
            self.updates.push(update, &mut evicted);
        }
        for old in evicted.drain(..) {
            if self.by_id.get(&old.id) == Some(&old.seq) {
                self.by_id.remove(&old.id);
            }
            if event {
                self.remember_evicted_event(&old);
            } else if let Some(t) = v7_millis(&old.id) {
                self.evicted_ms = self.evicted_ms.max(t);
            }
        }
        self.evicted_scratch = evicted;
    }

    fn remember_evicted_event(&mut self, old: &SharedUpdate) {
        let stub = std::sync::Arc::new(super::Update {
            seq: old.seq,
            id: old.id.clone(),
            topics: old.topics.clone(),
            private: old.private,
            time_ms: old.time_ms,
            encoded: bytes::Bytes::new(),
            alt: None,
            alt_is_legacy: false,
        });
        self.evicted_bytes += stub.weight();
        if let Some(replaced) = self.evicted_events.insert(old.id.clone(), stub) {
            self.evicted_bytes -= replaced.weight();
        } else {
            self.evicted_order.push_back(old.id.clone());
        }
        while self.evicted_order.len() > EVICTED_EVENTS || self.evicted_bytes > EVICTED_EVENTS_BYTES
        {
            let Some(id) = self.evicted_order.pop_front() else {
                break;
            };
            if let Some(gone) = self.evicted_events.remove(&id) {
                self.evicted_bytes -= gone.weight();
                // Forgotten for good: from now on it is known only by its time, like an
                // evicted update.
                if let Some(t) = v7_millis(&gone.id) {
                    self.evicted_ms = self.evicted_ms.max(t);
                }
            }
        }
    }

    /// Decides where a client that last saw `last_event_id` resumes (see [`History::find`]).
    #[cfg(test)]
    pub fn locate(&self, last_event_id: &str) -> ReplayFrom {
        self.find(last_event_id).0
    }

    /// Decides where a client that last saw `last_event_id` resumes, and the update it names.
    ///
    /// An id the hub does not hold any more but that is one of its own time-ordered ids, no
    /// newer than everything retained or than an id already evicted, means the client missed
    /// at least all of it: replay it all. Any other unknown id is foreign: replay nothing
    /// rather than guess. A subscription event that fell out of its ring is still known by
    /// its place: the client resumes after it (real updates complete, older subscription
    /// events gone).
    fn find(&self, last_event_id: &str) -> (ReplayFrom, Option<&SharedUpdate>) {
        if last_event_id == "earliest" {
            return (ReplayFrom::Earliest, None);
        }
        if let Some(&seq) = self.by_id.get(last_event_id) {
            let at = self.updates.at(seq).or_else(|| self.events.at(seq));
            return (ReplayFrom::After(seq), at);
        }
        if let Some(stub) = self.evicted_events.get(last_event_id) {
            return (ReplayFrom::After(stub.seq), Some(stub));
        }
        let oldest = self.updates.entries.front().or(self.events.entries.front());
        match (v7_millis(last_event_id), oldest) {
            (Some(t), Some(oldest)) if t <= oldest.time_ms.max(self.evicted_ms) => {
                (ReplayFrom::Earliest, None)
            }
            _ => (ReplayFrom::Nothing, None),
        }
    }

    /// [`History::find`] for a caller who may see only the updates `visible` accepts: the id
    /// of a private update it may not see is as unknown to it as any foreign id (else the
    /// answer would tell anyone which private ids exist).
    pub fn locate_for(
        &self,
        last_event_id: &str,
        visible: impl Fn(&SharedUpdate) -> bool,
    ) -> ReplayFrom {
        match self.find(last_event_id) {
            (ReplayFrom::After(_), at) if !at.is_some_and(visible) => ReplayFrom::Nothing,
            (from, _) => from,
        }
    }

    /// The retained updates after `from`, oldest first (both rings, in publish order).
    pub fn since(&self, from: &ReplayFrom) -> impl Iterator<Item = &SharedUpdate> {
        let (updates, events) = match from {
            ReplayFrom::Earliest => (
                self.updates.entries.range(..),
                self.events.entries.range(..),
            ),
            ReplayFrom::After(seq) => (self.updates.after(*seq), self.events.after(*seq)),
            ReplayFrom::Nothing => (
                self.updates.entries.range(0..0),
                self.events.entries.range(0..0),
            ),
        };
        InOrder {
            a: updates.peekable(),
            b: events.peekable(),
        }
    }
}

/// Two iterators of updates, each in publish order, merged into one.
struct InOrder<'a> {
    a: std::iter::Peekable<std::collections::vec_deque::Iter<'a, SharedUpdate>>,
    b: std::iter::Peekable<std::collections::vec_deque::Iter<'a, SharedUpdate>>,
}

impl<'a> Iterator for InOrder<'a> {
    type Item = &'a SharedUpdate;

    fn next(&mut self) -> Option<Self::Item> {
        match (self.a.peek(), self.b.peek()) {
            (Some(a), Some(b)) if a.seq > b.seq => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::update::Update;
    use std::sync::Arc;

    fn upd(seq: u64, id: &str, time_ms: u64) -> SharedUpdate {
        Arc::new(Update {
            seq,
            id: id.into(),
            topics: vec!["t".into()],
            private: false,
            time_ms,
            encoded: bytes::Bytes::new(),
            alt: None,
            alt_is_legacy: false,
        })
    }

    /// A subscription event, as the hub publishes them.
    fn event(seq: u64, id: &str) -> SharedUpdate {
        Arc::new(Update {
            seq,
            id: id.into(),
            topics: vec![format!("{}/t/{seq}", crate::hub::subscriptions::PREFIX)],
            private: true,
            time_ms: 1000 + seq,
            encoded: bytes::Bytes::new(),
            alt: None,
            alt_is_legacy: false,
        })
    }

    /// Bounds of `updates` and no byte bound to speak of.
    fn n(updates: usize) -> Bounds {
        Bounds {
            updates,
            bytes: usize::MAX,
        }
    }

    fn ids<'a>(it: impl Iterator<Item = &'a SharedUpdate>) -> Vec<String> {
        it.map(|u| u.id.clone()).collect()
    }

    #[test]
    fn bounded_in_bytes_whichever_comes_first() {
        let big = |seq: u64| {
            Arc::new(Update {
                seq,
                id: format!("b{seq}"),
                topics: vec!["t".into()],
                private: false,
                time_ms: seq,
                encoded: bytes::Bytes::from(vec![b'x'; 1000]),
                alt: None,
                alt_is_legacy: false,
            })
        };
        let weight = big(0).weight();
        let mut h = History::new(Bounds {
            updates: 100,
            bytes: 3 * weight,
        });
        for i in 0..10 {
            h.push(big(i));
        }
        assert_eq!(h.len(), 3, "the byte bound came first");
        assert_eq!(h.bytes(), 3 * weight);
        assert_eq!(ids(h.since(&ReplayFrom::Earliest)), ["b7", "b8", "b9"]);
        // One update larger than the whole bound is still kept, alone.
        let mut h = History::new(Bounds {
            updates: 100,
            bytes: 10,
        });
        h.push(big(0));
        h.push(big(1));
        assert_eq!(ids(h.since(&ReplayFrom::Earliest)), ["b1"]);
        // The count bound still applies with room in bytes.
        let mut h = History::new(n(2));
        for i in 0..5 {
            h.push(big(i));
        }
        assert_eq!(h.len(), 2);
        assert_eq!(h.bytes(), 2 * weight);
    }

    #[test]
    fn subscription_events_never_push_real_updates_out() {
        let mut h = History::new(n(5));
        h.push(upd(0, "u0", 1));
        h.push(upd(1, "u1", 2));
        for seq in 2..5000 {
            h.push(event(seq, &format!("e{seq}")));
        }
        h.push(upd(5000, "u2", 3));
        // Every real update is still there, with the newest events (their ring holds up to
        // the history's own bound, 5 here), in publish order.
        assert_eq!(
            ids(h.since(&ReplayFrom::Earliest)),
            ["u0", "u1", "e4995", "e4996", "e4997", "e4998", "e4999", "u2"]
        );
        assert_eq!(
            ids(h.since(&h.locate("u1"))),
            ["e4995", "e4996", "e4997", "e4998", "e4999", "u2"]
        );
        assert_eq!(ids(h.since(&h.locate("e4997"))), ["e4998", "e4999", "u2"]);
        // An event that fell out of its ring is still known by its place: a client that saw
        // it gets every real update after it, and no earlier one twice.
        assert_eq!(h.locate("e4000"), ReplayFrom::After(4000));
        assert_eq!(
            ids(h.since(&h.locate("e4000"))),
            ["e4995", "e4996", "e4997", "e4998", "e4999", "u2"]
        );
        // ... but only by a caller who may see it.
        assert_eq!(h.locate_for("e4000", |u| !u.private), ReplayFrom::Nothing);
        // Remembered evicted events are bounded too.
        assert_eq!(h.locate("e2"), ReplayFrom::Nothing);
        assert!(h.evicted_events.len() <= EVICTED_EVENTS);
        assert!(h.evicted_bytes <= EVICTED_EVENTS_BYTES);
        let weights: usize = h.evicted_events.values().map(|u| u.weight()).sum();
        assert_eq!(weights, h.evicted_bytes);
        assert_eq!(h.evicted_order.len(), h.evicted_events.len());
    }

    #[test]
    fn after_a_restart_ids_up_to_the_newest_stored_replay_everything() {
        // Reloaded: one update stored at 1,005 ms. The previous run also held a subscription
        // event at 1,004 ms and one at 1,009 ms, which were not stored.
        let mut h = History::new(n(10));
        h.push(upd(7, &id_at(1_000), 1_000));
        h.push(upd(8, &id_at(1_005), 1_005));
        h.forgotten_until(1_005);
        // The client that saw the first event may have missed the update after it: all of it.
        assert_eq!(h.locate(&id_at(1_004)), ReplayFrom::Earliest);
        // The one that saw the second missed nothing stored.
        assert_eq!(h.locate(&id_at(1_009)), ReplayFrom::Nothing);
    }

    #[test]
    fn the_newest_id_a_caller_may_read() {
        let mut h = History::new(n(10));
        assert_eq!(h.newest_id_for(|_| true), None);
        h.push(upd(0, "public", 1));
        h.push(event(1, "private-event"));
        let mut private = upd(2, "private", 3);
        Arc::get_mut(&mut private).unwrap().private = true;
        h.push(private);
        assert_eq!(h.newest_id_for(|_| true), Some("private"));
        assert_eq!(h.newest_id_for(|u| !u.private), Some("public"));
        assert_eq!(
            h.newest_id_for(|u| u.id != "private"),
            Some("private-event")
        );
        assert_eq!(h.newest_id_for(|_| false), None);
    }

    #[test]
    fn bounded_and_located() {
        let mut h = History::new(n(3));
        for i in 0..5 {
            h.push(upd(i, &format!("id{i}"), 1000 + i));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.locate("id3"), ReplayFrom::After(3));
        let ids: Vec<_> = h.since(&h.locate("id2")).map(|u| u.id.clone()).collect();
        assert_eq!(ids, ["id3", "id4"]);
        assert_eq!(h.locate("id0"), ReplayFrom::Nothing);
        assert_eq!(h.since(&ReplayFrom::Earliest).count(), 3);
        assert_eq!(h.since(&ReplayFrom::Nothing).count(), 0);
        assert_eq!(h.since(&h.locate("id4")).count(), 0);
    }

    #[test]
    fn keeping_nothing_still_names_the_newest() {
        let mut h = History::new(n(0));
        assert_eq!(h.newest_id_for(|_| true), None);
        h.push(upd(1, "a", 1));
        h.push(upd(2, "b", 2));
        assert_eq!((h.len(), h.newest_id_for(|_| true)), (0, Some("b")));
        assert_eq!(h.since(&ReplayFrom::Earliest).count(), 0);
    }

    #[test]
    fn own_old_ids_replay_everything() {
        let mut h = History::new(n(2));
        let old = crate::hub::update::new_id();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        h.push(upd(7, "x", now));
        assert_eq!(h.locate(&old), ReplayFrom::Earliest);
        std::thread::sleep(std::time::Duration::from_millis(3));
        let newer = crate::hub::update::new_id();
        assert_eq!(h.locate(&newer), ReplayFrom::Nothing);
    }

    /// A v7 id made at `ms`.
    fn id_at(ms: u64) -> String {
        let ts =
            uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, (ms % 1000) as u32 * 1_000_000);
        uuid::Uuid::new_v7(ts).urn().to_string()
    }

    #[test]
    fn an_evicted_id_newer_than_the_oldest_kept_still_replays_everything() {
        // Two publishers made their ids at 1,005 and 1,003 ms and took their places in the
        // order the other way round (or the clock stepped back between them).
        let mut h = History::new(n(2));
        let (late, early) = (id_at(1_005), id_at(1_003));
        h.push(upd(1, &late, 1_004));
        h.push(upd(2, &early, 1_003));
        h.push(upd(3, &id_at(1_006), 1_006));
        // `late` is gone; the oldest kept says 1,003 ms, older than `late`'s own time.
        assert_eq!(h.locate(&late), ReplayFrom::Earliest);
        assert_eq!(h.since(&h.locate(&late)).count(), 2);
        // An id newer than anything evicted or kept is still foreign.
        assert_eq!(h.locate(&id_at(1_007)), ReplayFrom::Nothing);
    }
}
