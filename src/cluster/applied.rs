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
//! (those an old leader's unconfirmed tail can hold) are *watched*: kept aside, and compared
//! again with the stream a few times over the next half minute.
//!
//! A watch can find a change half a minute or more after its check, thousands of messages back
//! at high rates: reading again from there delivers each update once only if every message
//! applied since is remembered. So while a watch runs the ring keeps everything from the oldest
//! watched message on, however many that is, up to [`WATCH_CAP`] (32 MiB), and is trimmed back
//! to [`RING`] (and its memory given back) once the watch is over. Only past that cap can a
//! rewind not go back as far as asked; it then reads again from the oldest message remembered,
//! and the caller logs and counts what it skips.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// How many of the last messages applied are remembered outside a watch (16 bytes each,
/// 64 KiB): the check on reconnecting looks for what the stream lost among them.
pub(super) const RING: usize = 4096;
/// How many at most while a watch runs (16 bytes each, 32 MiB): everything from the oldest
/// watched message on, so that a rewind to what the watch finds knows what it delivered (about
/// two minutes at 15,000 updates/s).
pub(super) const WATCH_CAP: usize = 1 << 21;
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
    /// How many the ring may hold while a watch runs: [`WATCH_CAP`] (smaller in tests).
    cap: usize,
    /// Keyed per process, so that nobody can choose an id whose identity equals another's.
    hasher: RandomState,
    /// After a rewind: identities delivered already from the sequences read again, skipped
    /// until the reader passes `until`, the last sequence it had applied before the rewind.
    /// Looked up in the set (a rewind may read hundreds of thousands again); the list keeps
    /// the order they came in, to drop the oldest past `2 * cap`.
    delivered: HashSet<u64>,
    delivered_order: VecDeque<u64>,
    until: u64,
    /// The watch after a check: the messages watched, oldest first, and when the next
    /// comparisons are due (none: no watch).
    watched: Vec<(u64, u64)>,
    scans: VecDeque<Instant>,
    /// When the watched messages began to be watched: a check that comes later than the
    /// watch's length after it starts a watch of its own, instead of keeping them (and the
    /// ring from them on) for as long as checks keep coming.
    watch_began: Option<Instant>,
}

impl Applied {
    pub(super) fn new() -> Applied {
        Applied::with_cap(WATCH_CAP)
    }

    fn with_cap(cap: usize) -> Applied {
        Applied {
            ring: VecDeque::with_capacity(RING),
            cap: cap.max(RING),
            hasher: RandomState::new(),
            delivered: HashSet::new(),
            delivered_order: VecDeque::new(),
            until: 0,
            watched: Vec::new(),
            scans: VecDeque::new(),
            watch_began: None,
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
                self.delivered = HashSet::new();
                self.delivered_order = VecDeque::new();
                self.until = 0;
            }
            true
        };
        // Room made first, so that the ring never grows past its cap, even for a moment.
        self.trim_to(RING - 1, self.cap - 1);
        self.ring.push_back((sequence, identity));
        if !self.scans.is_empty() && self.watched.len() < WATCHED {
            self.watched.push((sequence, identity));
        }
        fresh
    }

    /// Drops what no watch needs kept any more: once a watch is over, the ring back to
    /// [`RING`] and its memory. Done at each message recorded; the reader calls it too when a
    /// watch ends without finding anything, for a node with nothing more to read. Not when a
    /// watch's last comparison finds a change: the rewind that follows needs the whole ring.
    pub(super) fn trim(&mut self) {
        self.trim_to(RING, self.cap);
    }

    /// Drops the oldest messages down to `keep`, except, while a watch runs, those from the
    /// oldest watched on, which only `cap` bounds.
    fn trim_to(&mut self, keep: usize, cap: usize) {
        // Watched oldest first: the first is the oldest to keep.
        let watched_from = self.watched.first().map_or(u64::MAX, |e| e.0);
        while self.ring.len() > keep
            && (self.ring.len() > cap || self.ring.front().is_some_and(|e| e.0 < watched_from))
        {
            self.ring.pop_front();
        }
        if self.watched.is_empty() && self.ring.capacity() > 2 * RING {
            // A watch's growth given back.
            self.ring.shrink_to(RING);
        }
    }

    /// The messages remembered from sequence `first` on, oldest first.
    #[cfg(test)]
    fn since(&self, first: u64) -> Vec<(u64, u64)> {
        self.ring.iter().filter(|e| e.0 >= first).copied().collect()
    }

    /// Where the messages remembered from sequence `first` on begin, for [`Applied::nth`], and
    /// where they end: read in place (a watch can keep millions).
    pub(super) fn range_since(&self, first: u64) -> std::ops::Range<usize> {
        self.ring.partition_point(|e| e.0 < first)..self.ring.len()
    }

    /// The `i`-th message remembered, oldest first.
    pub(super) fn nth(&self, i: usize) -> (u64, u64) {
        self.ring[i]
    }

    /// Forgets the messages from `sequence` on (the stream holds others there now), keeping
    /// their identities so that reading those sequences again up to `last` (the last sequence
    /// applied) delivers only the updates not delivered yet. Returns where to read again from:
    /// `sequence`, unless that is before every message remembered; then the oldest remembered
    /// (with none remembered, `last + 1`): what was delivered before it is not known, and
    /// reading it again would deliver it twice. While a watch runs, what it finds is always
    /// remembered, unless the ring reached its cap.
    pub(super) fn rewind(&mut self, sequence: u64, last: u64) -> u64 {
        let from = match self.ring.front() {
            Some(&(oldest, _)) => sequence.max(oldest),
            None => sequence.max(last + 1),
        };
        while let Some(&(s, identity)) = self.ring.back() {
            if s < from {
                break;
            }
            self.ring.pop_back();
            if self.delivered.insert(identity) {
                self.delivered_order.push_back(identity);
            }
        }
        // Those read again are watched again as they come. Those skipped (from `sequence` to
        // `from`) are not compared again: the stream holds other messages there, or might, and
        // they would be found changed at every comparison. Past the cap (`from` after
        // `sequence`) neither are those before `sequence`: the ring no longer holds them, and
        // each one found changed would make another rewind that cannot go back there either
        // (another gap counted, and everything remembered read again).
        if from > sequence {
            self.watched.clear();
        } else {
            self.watched.retain(|e| e.0 < sequence);
        }
        // Bounded even if rewinds follow each other before the reader passes `until`.
        let bound = 2 * self.cap;
        if self.delivered_order.len() > bound {
            let excess = self.delivered_order.len() - bound;
            for identity in self.delivered_order.drain(..excess) {
                self.delivered.remove(&identity);
            }
            self.delivered_order.shrink_to(bound);
            self.delivered.shrink_to(bound);
        }
        self.until = self.until.max(last);
        from
    }

    /// Forgets everything: the stream was made anew, its sequences start over.
    pub(super) fn clear(&mut self) {
        self.ring.clear();
        self.ring.shrink_to(RING);
        self.delivered = HashSet::new();
        self.delivered_order = VecDeque::new();
        self.until = 0;
        self.scans.clear();
        self.watched.clear();
    }

    /// After a check found the stream holding what was applied: its newest message and the
    /// next ones read (up to `WATCHED` in all, with those of a watch already on) are compared
    /// with the stream again at each of `SCANS` after `now`.
    pub(super) fn watch(&mut self, now: Instant) {
        let watch_length = SCANS[SCANS.len() - 1];
        if self.scans.is_empty()
            || self
                .watch_began
                .is_none_or(|began| now.saturating_duration_since(began) >= watch_length)
        {
            // Those watched had their comparisons (the last one is due at this length).
            self.watched.clear();
            self.watch_began = Some(now);
        }
        // With nothing remembered (nothing applied yet, or a rewind past the cap read all of
        // it again), only what is read next is watched.
        if let Some(&newest) = self.ring.back() {
            if self.watched.len() < WATCHED && !self.watched.contains(&newest) {
                self.watched.push(newest);
            }
        }
        self.scans = SCANS.iter().map(|d| now + *d).collect();
    }

    /// If a comparison is due at `now`: the messages to compare, oldest first (none watched
    /// yet: nothing to compare, `None`). The watch ends after its last comparison.
    pub(super) fn due(&mut self, now: Instant) -> Option<Vec<(u64, u64)>> {
        if self.scans.front().is_none_or(|t| now < *t) {
            return None;
        }
        while self.scans.front().is_some_and(|t| now >= *t) {
            self.scans.pop_front();
        }
        if self.watched.is_empty() {
            return None;
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
        assert_eq!(a.rewind(3, 4), 3);
        assert_eq!(a.since(0), [(1, id(&a, "a")), (2, id(&a, "b"))]);
        assert_eq!(a.range_since(2), 1..2);
        assert_eq!(a.nth(1), (2, id(&a, "b")));
        assert!(a.range_since(3).is_empty());
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
        // Rewinding everything again and again, with a watch on (the ring at its cap), keeps
        // the skip list bounded.
        let mut a = Applied::with_cap(2 * RING);
        a.record(1, 1);
        a.watch(Instant::now());
        for round in 0..5 {
            assert_eq!(a.rewind(1, u64::MAX / 2), 1);
            for seq in 1..=2 * RING as u64 {
                a.record(seq, seq * 7 + round * 1_000_000);
            }
        }
        assert_eq!(a.delivered.len(), 2 * a.cap);
        assert_eq!(a.delivered_order.len(), a.delivered.len());
    }

    /// Seen in CI: a watch found a change at sequence 68 after the node had read ~6,400
    /// updates; only the last 4,096 were remembered, and the rewind to 68 delivered the ~2,300
    /// between those and 68 a second time.
    #[test]
    fn a_rewind_to_what_a_watch_found_delivers_nothing_twice() {
        let mut a = Applied::new();
        let t0 = Instant::now();
        for seq in 1..=67 {
            a.record(seq, seq);
        }
        a.watch(t0);
        let n = 6465;
        for seq in 68..=n {
            assert!(a.record(seq, seq));
        }
        assert_eq!(a.since(0)[0], (67, 67), "kept from the oldest watched on");
        let w = a.due(t0 + SCANS[2]).unwrap();
        assert_eq!(w[..2], [(67, 67), (68, 68)]);
        // The stream holds another message at 68 now, and the same ones after it.
        assert_eq!(a.rewind(68, n), 68);
        let t1 = t0 + SCANS[2];
        a.watch(t1);
        assert!(
            a.record(68, 1_000_000),
            "the message that took its sequence"
        );
        for seq in 69..=n {
            assert!(!a.record(seq, seq), "{seq} was delivered already");
        }
        assert!(a.record(n + 1, n + 1));
        // The changed message is not compared again (it would be found changed every time);
        // the one read there now is.
        let w = a.due(t1 + SCANS[0]).unwrap();
        assert!(!w.contains(&(68, 68)));
        assert_eq!(w[..2], [(67, 67), (68, 1_000_000)]);
    }

    /// A node with ring cap `cap` that watched from sequence 1 on and then read up to `n`.
    fn watched_through(cap: usize, n: u64) -> (Applied, Instant) {
        let mut a = Applied::with_cap(cap);
        let t0 = Instant::now();
        a.record(1, 1);
        a.watch(t0);
        for seq in 2..=n {
            a.record(seq, seq);
        }
        (a, t0)
    }

    #[test]
    fn past_its_cap_a_rewind_reads_again_from_the_oldest_remembered() {
        let cap = 2 * RING;
        let n = 3 * cap as u64;
        let (mut a, t0) = watched_through(cap, n);
        let kept = a.since(0);
        assert_eq!(kept.len(), cap);
        assert!(a.ring.capacity() <= cap, "never grown past its cap");
        let front = kept[0].0;
        assert_eq!(front, n - cap as u64 + 1);
        assert!(a.due(t0 + SCANS[0]).unwrap().contains(&(1, 1)));
        // Only what the ring holds is read again, once: what it knew was delivered.
        assert_eq!(a.rewind(1, n), front);
        assert!(a.since(0).is_empty());
        // With nothing remembered, a rewind to before the reader's position (`from - 1`
        // now) reads nothing again: what was delivered there is not known any more.
        assert_eq!(a.rewind(40, front - 1), front);
        for seq in front..=n {
            assert!(!a.record(seq, seq), "{seq} was delivered already");
        }
        assert!(a.record(n + 1, n + 1));
        // Neither the changed message nor those skipped are compared again.
        let w = a.due(t0 + SCANS[1]).unwrap();
        assert_eq!(w.len(), WATCHED);
        assert!(w.iter().all(|e| e.0 >= front));
    }

    /// Review 20RN L2: after a rewind past the cap, the watched messages before the change
    /// (and before the ring's front) were compared again; each one found changed made another
    /// rewind past the cap, with another gap and everything remembered read again.
    #[test]
    fn past_its_cap_a_rewind_stops_watching_what_it_cannot_read_again() {
        let cap = 2 * RING;
        let n = 3 * cap as u64;
        let (mut a, t0) = watched_through(cap, n);
        let front = a.since(0)[0].0;
        assert_eq!(a.due(t0 + SCANS[0]).unwrap()[..2], [(1, 1), (2, 2)]);
        // The stream changed from 40 on: 1 to 39 were held, but the ring no longer has them.
        assert_eq!(a.rewind(40, n), front);
        let t1 = t0 + SCANS[1];
        a.watch(t1);
        for seq in front..=n {
            assert!(!a.record(seq, seq), "{seq} was delivered already");
        }
        let w = a.due(t1 + SCANS[0]).unwrap();
        assert!(w.iter().all(|e| e.0 >= front), "{:?}", &w[..3]);
        assert_eq!(w[0], (front, front), "what is read again is watched");
    }

    /// Review 20RN L2: a change found at a watch's last comparison, past the cap, read again
    /// everything remembered; the check that followed found the ring empty and watched nothing,
    /// so a change among what was read again went unnoticed.
    #[test]
    fn what_is_read_again_after_a_rewind_past_its_cap_is_watched() {
        let cap = 2 * RING;
        let n = 3 * cap as u64;
        let (mut a, t0) = watched_through(cap, n);
        let front = a.since(0)[0].0;
        for d in SCANS {
            assert!(a.due(t0 + d).is_some());
        }
        assert_eq!(a.rewind(1, n), front);
        assert!(a.since(0).is_empty());
        let t1 = t0 + SCANS[4];
        a.watch(t1);
        for seq in front..=n {
            assert!(!a.record(seq, seq), "{seq} was delivered already");
        }
        let w = a.due(t1 + SCANS[0]).expect("watched");
        assert_eq!(w.len(), WATCHED);
        assert_eq!(w[0], (front, front));
    }

    #[test]
    fn a_rewind_with_nothing_remembered_reads_nothing_again() {
        let mut a = Applied::new();
        assert_eq!(a.rewind(3, 10), 11);
        assert!(a.record(11, 11));
        // A rewind within the ring is not moved.
        assert_eq!(a.rewind(11, 11), 11);
        assert!(!a.record(11, 11));
    }

    #[test]
    fn a_watch_over_gives_back_what_it_kept() {
        let n = 4 * RING as u64;
        let (mut a, t0) = watched_through(8 * RING, n);
        assert_eq!(
            a.since(0).len(),
            n as usize,
            "everything from the oldest watched on"
        );
        for d in SCANS {
            assert!(a.due(t0 + d).is_some());
        }
        // Over, but kept until the last comparison's answer: a change it finds needs them.
        assert_eq!(a.since(0).len(), n as usize);
        a.trim();
        assert_eq!(a.since(0)[0].0, n - RING as u64 + 1);
        assert_eq!(a.since(0).len(), RING);
        assert!(a.ring.capacity() <= 2 * RING);
        // The next message read trims too.
        let mut b = Applied::with_cap(8 * RING);
        b.record(1, 1);
        b.watch(t0);
        for seq in 2..=n {
            b.record(seq, seq);
        }
        while b.due(t0 + SCANS[4]).is_some() {}
        b.record(n + 1, n + 1);
        assert_eq!(b.since(0).len(), RING);
        assert!(b.ring.capacity() <= 2 * RING);
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
        assert_eq!(a.rewind(newest + 1, newest + RING as u64), newest + 1);
        assert_eq!(a.due(t1 + SCANS[1]), Some(vec![(newest, newest * 10)]));
    }

    #[test]
    fn an_id_and_a_payload_are_identities() {
        let a = Applied::new();
        assert_eq!(a.identity(Some("x"), b"1"), a.identity(Some("x"), b"2"));
        assert_ne!(a.identity(Some("x"), b""), a.identity(Some("y"), b""));
        assert_ne!(a.identity(None, b"1"), a.identity(None, b"2"));
    }

    #[test]
    fn checks_that_keep_coming_do_not_hold_a_watch_for_good() {
        // A check every 20 s (a probe that keeps failing and answering again) restarts the
        // comparisons; what was watched more than a watch's length ago is let go, and the
        // ring with it.
        let mut a = Applied::with_cap(4 * RING);
        let t0 = Instant::now();
        a.record(1, 1);
        a.watch(t0);
        let mut seq = 1;
        for step in 1..=20u64 {
            let now = t0 + Duration::from_secs(20 * step);
            for _ in 0..2_000 {
                seq += 1;
                a.record(seq, seq);
            }
            let _ = a.due(now);
            a.watch(now);
        }
        assert!(!a.watched.contains(&(1, 1)), "the first watched is let go");
        assert!(a.ring.len() <= RING + 2_000, "ring {}", a.ring.len());
        // A rewind to the oldest watched knows what it delivered.
        let oldest = a.watched[0].0;
        assert_eq!(a.rewind(oldest, seq), oldest);
    }
}
