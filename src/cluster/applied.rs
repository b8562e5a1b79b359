//! The last messages a node applied from the NATS stream, by sequence and identity. NATS 2.9
//! can lose messages it acknowledged when all its servers go down together, and then gives
//! their sequences to later messages: a node that only remembered its last sequence would skip
//! those later messages as applied. With this ring the reader can tell which sequences now hold
//! other messages, read them again, and still deliver each update once.
//!
//! Right after its servers come back, a stream can still serve messages no majority held (its
//! old leader's) and drop them a moment later, when another server leads, giving their
//! sequences to later messages (seen with nats-server 2.9 stopped and started together). So
//! after each check on reconnecting, the newest message then and the first ones read after it
//! (those an old leader's unconfirmed tail can hold) are *watched*: kept aside, out of the
//! ring's reach, and compared again with the stream a few times over the next half minute.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// How many of the last messages applied are remembered (16 bytes each, 64 KiB): a rewind
/// can tell what it delivered already only within them (seconds of reading at high rates).
pub(super) const RING: usize = 4096;
/// When, after a check on reconnecting, what was read since is compared with the stream again.
/// Measured on nats-server 2.9: the stream settled within a few seconds of its servers' return.
pub(super) const SCANS: [Duration; 5] = [
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(20),
    Duration::from_secs(30),
];

/// How many messages a watch keeps: the newest at the check and the first read after it. An
/// unconfirmed tail is what was in flight when the servers went away: a few per publisher.
pub(super) const WATCHED: usize = 64;

/// What a node applied last, and what to skip while it reads sequences again.
pub(super) struct Applied {
    /// (sequence, identity) of the last messages applied, oldest first, sequences increasing.
    ring: VecDeque<(u64, u64)>,
    /// Keyed per process, so that nobody can choose an id whose identity equals another's.
    hasher: RandomState,
    /// After a rewind: identities delivered already from the sequences read again, skipped
    /// until the reader passes `until`, the last sequence it had applied before the rewind.
    delivered: Vec<u64>,
    until: u64,
    /// The watch after a check: the messages watched, oldest first, and when the next
    /// comparisons are due (none: no watch).
    watched: Vec<(u64, u64)>,
    scans: VecDeque<Instant>,
}

impl Applied {
    pub(super) fn new() -> Applied {
        Applied {
            ring: VecDeque::with_capacity(RING),
            hasher: RandomState::new(),
            delivered: Vec::new(),
            until: 0,
            watched: Vec::new(),
            scans: VecDeque::new(),
        }
    }

    /// A message's identity: its `Nats-Msg-Id` (the update's id, for what ssehub wrote), or its
    /// payload when it has none.
    pub(super) fn identity(&self, id: Option<&str>, payload: &[u8]) -> u64 {
        match id {
            Some(id) => self.hasher.hash_one(id),
            None => self.hasher.hash_one(payload),
        }
    }

    /// Records the message applied at `sequence` (after every sequence recorded so far).
    /// Returns whether to deliver it: not if it was delivered already, before a rewind.
    pub(super) fn record(&mut self, sequence: u64, identity: u64) -> bool {
        let fresh = if sequence <= self.until {
            !self.delivered.contains(&identity)
        } else {
            if self.until != 0 {
                self.delivered = Vec::new();
                self.until = 0;
            }
            true
        };
        if self.ring.len() == RING {
            self.ring.pop_front();
        }
        self.ring.push_back((sequence, identity));
        if !self.scans.is_empty() && self.watched.len() < WATCHED {
            self.watched.push((sequence, identity));
        }
        fresh
    }

    /// The messages remembered from sequence `first` on, oldest first.
    pub(super) fn since(&self, first: u64) -> Vec<(u64, u64)> {
        self.ring.iter().filter(|e| e.0 >= first).copied().collect()
    }

    /// Forgets the messages from `sequence` on (the stream holds others there now), keeping
    /// their identities so that reading those sequences again up to `last` delivers only the
    /// updates not delivered yet.
    pub(super) fn rewind(&mut self, sequence: u64, last: u64) {
        while let Some(&(s, identity)) = self.ring.back() {
            if s < sequence {
                break;
            }
            self.ring.pop_back();
            if !self.delivered.contains(&identity) {
                self.delivered.push(identity);
            }
        }
        // Read again, they are watched again as they come.
        self.watched.retain(|e| e.0 < sequence);
        // Bounded even if rewinds follow each other before the reader passes `until`.
        if self.delivered.len() > 2 * RING {
            self.delivered.drain(..self.delivered.len() - 2 * RING);
        }
        self.until = self.until.max(last);
    }

    /// Forgets everything: the stream was made anew, its sequences start over.
    pub(super) fn clear(&mut self) {
        self.ring.clear();
        self.delivered = Vec::new();
        self.until = 0;
        self.scans.clear();
        self.watched.clear();
    }

    /// After a check found the stream holding what was applied: its newest message and the
    /// next ones read (up to `WATCHED` in all, with those of a watch already on) are compared
    /// with the stream again at each of `SCANS` after `now`.
    pub(super) fn watch(&mut self, now: Instant) {
        let Some(&newest) = self.ring.back() else {
            return;
        };
        if self.scans.is_empty() {
            self.watched.clear();
        }
        if self.watched.len() < WATCHED && !self.watched.contains(&newest) {
            self.watched.push(newest);
        }
        self.scans = SCANS.iter().map(|d| now + *d).collect();
    }

    /// If a comparison is due at `now`: the messages to compare, oldest first. The watch ends
    /// after its last comparison.
    pub(super) fn due(&mut self, now: Instant) -> Option<Vec<(u64, u64)>> {
        if self.scans.front().is_none_or(|t| now < *t) {
            return None;
        }
        while self.scans.front().is_some_and(|t| now >= *t) {
            self.scans.pop_front();
        }
        let watched = self.watched.clone();
        if self.scans.is_empty() {
            self.watched.clear();
        }
        Some(watched)
    }

    /// A comparison that could not be made (no answer) is made again at `at`.
    pub(super) fn retry(&mut self, watched: Vec<(u64, u64)>, at: Instant) {
        if self.scans.is_empty() {
            self.watched = watched;
        }
        self.scans.push_front(at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewind_delivers_only_what_was_not_delivered() {
        let mut a = Applied::new();
        let id = |a: &Applied, s: &str| a.identity(Some(s), b"");
        for (seq, name) in [(1, "a"), (2, "b"), (3, "c"), (4, "d")] {
            assert!(a.record(seq, id(&a, name)));
        }
        // The stream lost "c" and "d"; "e" took sequence 3, then "d" (retried) sequence 4.
        a.rewind(3, 4);
        assert_eq!(a.since(0), [(1, id(&a, "a")), (2, id(&a, "b"))]);
        assert!(a.record(3, id(&a, "e")));
        assert!(!a.record(4, id(&a, "d")), "delivered already");
        // Past the old last sequence, everything is new again.
        assert!(a.record(5, id(&a, "c")));
        assert_eq!(a.since(4), [(4, id(&a, "d")), (5, id(&a, "c"))]);
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let mut a = Applied::new();
        for seq in 1..=(RING as u64 + 10) {
            a.record(seq, seq);
        }
        let kept = a.since(0);
        assert_eq!(kept.len(), RING);
        assert_eq!(kept[0].0, 11);
        // Rewinding everything keeps the skip list bounded.
        for _ in 0..5 {
            a.rewind(0, RING as u64 * 10);
            for seq in 1..=RING as u64 {
                a.record(seq, seq * 7 + a.delivered.len() as u64);
            }
        }
        assert!(a.delivered.len() <= 2 * RING);
    }

    #[test]
    fn what_is_read_after_a_check_is_compared_again_a_few_times() {
        let mut a = Applied::new();
        let t0 = Instant::now();
        a.watch(t0);
        assert_eq!(
            a.due(t0 + SCANS[4]),
            None,
            "nothing applied, nothing to watch"
        );
        for seq in 1..=5 {
            a.record(seq, seq * 10);
        }
        a.watch(t0);
        a.record(6, 60);
        assert_eq!(a.due(t0), None);
        assert_eq!(a.due(t0 + SCANS[0]), Some(vec![(5, 50), (6, 60)]));
        assert_eq!(a.due(t0 + SCANS[0]), None, "once per comparison");
        // Late: the comparisons missed are one.
        assert_eq!(a.due(t0 + SCANS[2]).map(|v| v.len()), Some(2));
        // One without an answer is made again.
        a.retry(vec![(5, 50), (6, 60)], t0 + SCANS[2]);
        assert_eq!(a.due(t0 + SCANS[2]).map(|v| v.len()), Some(2));
        // Another check during the watch keeps what it watched and begins the comparisons
        // again; what is read once `WATCHED` are kept is not kept.
        a.record(7, 70);
        a.watch(t0 + SCANS[2]);
        for seq in 8..(8 + 2 * WATCHED as u64) {
            a.record(seq, seq * 10);
        }
        for d in SCANS {
            let w = a.due(t0 + SCANS[2] + d).unwrap();
            assert_eq!(w.len(), WATCHED);
            assert_eq!(w[..3], [(5, 50), (6, 60), (7, 70)]);
        }
        assert_eq!(
            a.due(t0 + SCANS[2] + SCANS[4] * 2),
            None,
            "the watch is over"
        );
        // The watched survive the ring (the newest applied) moving past them.
        a.watch(t0 + SCANS[4] * 4);
        let newest = 7 + 2 * WATCHED as u64;
        for seq in newest + 1..newest + 1 + RING as u64 {
            a.record(seq, seq * 10);
        }
        let t1 = t0 + SCANS[4] * 4;
        let w = a.due(t1 + SCANS[0]).unwrap();
        assert_eq!(w[0], (newest, newest * 10));
        // A rewind drops the watched it reads again (recorded anew as they come).
        a.rewind(newest + 1, newest + RING as u64);
        assert_eq!(a.due(t1 + SCANS[1]), Some(vec![(newest, newest * 10)]));
    }

    #[test]
    fn an_id_and_a_payload_are_identities() {
        let a = Applied::new();
        assert_eq!(a.identity(Some("x"), b"1"), a.identity(Some("x"), b"2"));
        assert_ne!(a.identity(Some("x"), b""), a.identity(Some("y"), b""));
        assert_ne!(a.identity(None, b"1"), a.identity(None, b"2"));
    }
}
