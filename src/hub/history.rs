//! The bounded history that makes `Last-Event-ID` replay possible.
//!
//! A ring of the last N updates in publish order, with an index from id to position so that
//! finding where a reconnecting client left off does not scan.

use std::collections::{HashMap, VecDeque};

use super::update::{v7_millis, SharedUpdate};

pub struct History {
    entries: VecDeque<SharedUpdate>,
    /// id -> seq of the newest retained update with that id (publishers may reuse ids).
    by_id: HashMap<String, u64>,
    capacity: usize,
    /// The newest update when none are kept (`capacity` 0): the subscription API still names
    /// the last event id.
    newest: Option<SharedUpdate>,
    /// The latest time (Unix ms) in any time-ordered id evicted so far. Ids are made before
    /// publishes take their place in the order (and a clock stepped back does not move uuid v7
    /// ids back), so an evicted id can be newer than the oldest update kept: comparing with
    /// that update alone would take it for a foreign id and replay nothing.
    evicted_ms: u64,
}

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
    pub fn new(capacity: usize) -> Self {
        History {
            entries: VecDeque::with_capacity(capacity.min(4096)),
            by_id: HashMap::with_capacity(capacity.min(4096)),
            capacity,
            newest: None,
            evicted_ms: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The id of the newest retained update.
    pub fn newest_id(&self) -> Option<&str> {
        self.entries
            .back()
            .or(self.newest.as_ref())
            .map(|u| u.id.as_str())
    }

    pub fn push(&mut self, update: SharedUpdate) {
        if self.capacity == 0 {
            self.newest = Some(update);
            return;
        }
        if self.entries.len() == self.capacity {
            if let Some(old) = self.entries.pop_front() {
                if self.by_id.get(&old.id) == Some(&old.seq) {
                    self.by_id.remove(&old.id);
                }
                if let Some(t) = v7_millis(&old.id) {
                    self.evicted_ms = self.evicted_ms.max(t);
                }
            }
        }
        self.by_id.insert(update.id.clone(), update.seq);
        self.entries.push_back(update);
    }

    /// Decides where a client that last saw `last_event_id` resumes.
    ///
    /// An id the hub does not hold any more but that is one of its own time-ordered ids, no
    /// newer than everything retained or than an id already evicted, means the client missed
    /// at least all of it: replay it all. Any other unknown id is foreign: replay nothing
    /// rather than guess.
    pub fn locate(&self, last_event_id: &str) -> ReplayFrom {
        if last_event_id == "earliest" {
            return ReplayFrom::Earliest;
        }
        if let Some(&seq) = self.by_id.get(last_event_id) {
            return ReplayFrom::After(seq);
        }
        match (v7_millis(last_event_id), self.entries.front()) {
            (Some(t), Some(oldest)) if t <= oldest.time_ms.max(self.evicted_ms) => {
                ReplayFrom::Earliest
            }
            _ => ReplayFrom::Nothing,
        }
    }

    /// [`History::locate`] for a caller who may see only the updates `visible` accepts: the id
    /// of a private update it may not see is as unknown to it as any foreign id (else the
    /// answer would tell anyone which private ids exist).
    pub fn locate_for(
        &self,
        last_event_id: &str,
        visible: impl Fn(&SharedUpdate) -> bool,
    ) -> ReplayFrom {
        match self.locate(last_event_id) {
            ReplayFrom::After(seq) if !self.at(seq).is_some_and(visible) => ReplayFrom::Nothing,
            from => from,
        }
    }

    /// The retained update with this sequence number.
    fn at(&self, seq: u64) -> Option<&SharedUpdate> {
        let first = self.entries.front()?.seq;
        self.entries
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    /// The retained updates after `from`, oldest first.
    pub fn since(&self, from: &ReplayFrom) -> impl Iterator<Item = &SharedUpdate> {
        let skip = match (from, self.entries.front()) {
            (ReplayFrom::Earliest, _) => 0,
            (ReplayFrom::After(seq), Some(first)) => (seq + 1 - first.seq) as usize,
            (_, _) => self.entries.len(),
        };
        self.entries.iter().skip(skip)
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
        })
    }

    #[test]
    fn bounded_and_located() {
        let mut h = History::new(3);
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
        let mut h = History::new(0);
        assert_eq!(h.newest_id(), None);
        h.push(upd(1, "a", 1));
        h.push(upd(2, "b", 2));
        assert_eq!((h.len(), h.newest_id()), (0, Some("b")));
        assert_eq!(h.since(&ReplayFrom::Earliest).count(), 0);
    }

    #[test]
    fn own_old_ids_replay_everything() {
        let mut h = History::new(2);
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
        let mut h = History::new(2);
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
