//! The coalescing flusher: writes held updates to their sockets when a subscriber's window
//! opens, without waking the subscriber's task.
//!
//! While the hub batches (see `coalesce`), every receiving subscriber gets one write per window (to
//! within a millisecond: see [`TICK_NS`]). Left to the subscriber's own task, each such write costs
//! two wake-ups and two polls of the task (one to find the window still closed and arm a timer, one
//! when the timer fires), a timer per subscriber and the readiness checks of its socket: measured
//! in S2's shape, about as much user-space CPU as the hub spends on everything else. So a stream
//! that waits with nothing in flight and has a direct sink (plain HTTP/1.1) is *held* by the
//! publish itself: the update is queued, the task is not woken, and the subscriber is entered here
//! under the time its window opens. Subscribers are shared out over one task per core (not pinned:
//! the runtime's workers run them); each sleeps until the earliest time among its own and then
//! writes each due subscriber's whole queue as one chunk, straight to the socket, exactly as a
//! publishing thread's direct write does (the stream is claimed under its own lock; what the socket
//! does not take is left to the stream's task, ahead of anything newer).
//!
//! No crate offers this: it is a timer wheel of a few lines whose entries are the hub's own
//! subscribers, and it sits on the delivery path.

use std::collections::{btree_map, BTreeMap};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::clock::{instant_of, now_ns, TICK_NS};
use super::subscriber::{Flush, Subscriber};
use crate::metrics::Metrics;

/// Subscribers written before the flusher lets the other tasks of its worker run.
const BATCH: usize = 128;

pub(crate) struct Flusher {
    shards: Box<[Arc<Shard>]>,
    metrics: Arc<Metrics>,
}

struct Shard {
    due: Mutex<Due>,
    notify: Notify,
    /// The shard's task runs (cleared when it ends, whether by a panic or with its runtime, so
    /// that the next publish starts another).
    alive: AtomicBool,
    /// The hub is gone: the task ends.
    closed: AtomicBool,
}

struct Due {
    /// Subscribers by the tick at which their window opens.
    by_tick: BTreeMap<u64, Vec<Arc<Subscriber>>>,
    /// The tick the shard's task sleeps until (`u64::MAX`: until notified).
    armed: u64,
}

impl Shard {
    /// A shard without entries and without a task yet.
    fn new() -> Self {
        Shard {
            due: Mutex::new(Due {
                by_tick: BTreeMap::new(),
                armed: u64::MAX,
            }),
            notify: Notify::new(),
            alive: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }
}

impl Due {
    /// Files `sub` for `at`, as of `now` (both [`now_ns`]); true if it is due sooner than the
    /// shard's task sleeps.
    ///
    /// An entry due in a later millisecond is filed under that millisecond's start, and tokio wakes the task
    /// up to a millisecond after it (its ticks are not ours, and it rounds up): so such a write goes
    /// out within a millisecond either side of its time rather than up to two after it, which
    /// rounding up here as well would give (measured in S3, where the windows are 2-3 ms). An entry
    /// due within the current millisecond is filed under the next one, so that a window shorter
    /// than a tick still holds its updates until then instead of writing each at once.
    fn enter(&mut self, sub: Arc<Subscriber>, at: u64, now: u64) -> bool {
        let tick = if at / TICK_NS > now / TICK_NS {
            at / TICK_NS
        } else {
            now / TICK_NS + 1
        };
        self.by_tick.entry(tick).or_default().push(sub);
        let sooner = tick < self.armed;
        self.armed = self.armed.min(tick);
        sooner
    }
}

impl Flusher {
    /// A flusher of `shards` tasks (one per core: the writes of a wide fan-out spread over
    /// the runtime's workers as the streams' own tasks would).
    pub fn new(shards: usize, metrics: Arc<Metrics>) -> Self {
        Flusher {
            shards: (0..shards.max(1)).map(|_| Arc::new(Shard::new())).collect(),
            metrics,
        }
    }

    /// Makes sure every shard's task runs, starting those that do not on the current runtime.
    /// False when one does not and there is no runtime to start it on: the streams' own tasks
    /// then wait out their windows, as they do without a sink.
    pub fn ready(&self) -> bool {
        if self.shards.iter().all(|s| s.alive.load(Acquire)) {
            return true;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        for shard in self.shards.iter() {
            if !shard.alive.swap(true, AcqRel) {
                rt.spawn(run(Alive(shard.clone()), self.metrics.clone()));
            }
        }
        true
    }

    /// Enters held subscribers, each with the time (see [`now_ns`]) at which its window opens.
    pub fn schedule(&self, held: Vec<(Arc<Subscriber>, u64)>) {
        if held.is_empty() {
            return;
        }
        let n = self.shards.len();
        let now = now_ns();
        let mut by_shard: Vec<Vec<(Arc<Subscriber>, u64)>> = (0..n).map(|_| Vec::new()).collect();
        for (sub, at) in held {
            by_shard[sub.id as usize % n].push((sub, at));
        }
        for (shard, held) in self.shards.iter().zip(by_shard) {
            if held.is_empty() {
                continue;
            }
            let mut due = shard.due.lock();
            let mut sooner = false;
            for (sub, at) in held {
                sooner |= due.enter(sub, at, now);
            }
            drop(due);
            if sooner {
                shard.notify.notify_one();
            }
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        for shard in self.shards.iter() {
            shard.closed.store(true, Release);
            shard.notify.notify_one();
        }
    }
}

/// A shard held by its running task; marks the shard as without one when the task ends.
struct Alive(Arc<Shard>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.store(false, Release);
    }
}

/// One shard's task: sleeps until the earliest window opens, then writes every subscriber due.
async fn run(alive: Alive, metrics: Arc<Metrics>) {
    let shard = &*alive.0;
    while !shard.closed.load(Acquire) {
        let now = now_ns();
        let (due_now, next) = {
            let mut due = shard.due.lock();
            let rest = due.by_tick.split_off(&(now / TICK_NS + 1));
            let batch = std::mem::replace(&mut due.by_tick, rest);
            due.armed = due.by_tick.keys().next().copied().unwrap_or(u64::MAX);
            (batch, due.armed)
        };
        let mut batch = Batch {
            shard,
            subs: due_now.into_values().flatten(),
            later: Vec::new(),
        };
        let mut written = 0u64;
        let mut i = 0usize;
        for sub in batch.subs.by_ref() {
            i += 1;
            match sub.flush(now_ns()) {
                Flush::Done => {}
                Flush::Write(sink, chunk) => {
                    sub.direct_done(sink.try_send(&chunk));
                    written += 1;
                }
                Flush::Wake(waker) => waker.wake(),
                Flush::Later(at) => batch.later.push((sub, at)),
            }
            if i.is_multiple_of(BATCH) {
                tokio::task::yield_now().await;
            }
        }
        metrics.coalesced_writes.fetch_add(written, Relaxed);
        let again = !batch.later.is_empty();
        // Entered again under their new time; the next turn sleeps until the earliest entry.
        drop(batch);
        if again {
            continue;
        }
        if next == u64::MAX {
            shard.notify.notified().await;
        } else if next <= now_ns() / TICK_NS {
            // The batch took us past the next tick: no sleep until tokio's next one, but let
            // the worker's other tasks run first (a flusher that keeps overrunning its ticks
            // would otherwise never give them the thread).
            tokio::task::yield_now().await;
        } else {
            let _ =
                tokio::time::timeout_at(instant_of(next * TICK_NS), shard.notify.notified()).await;
        }
    }
}

/// The entries a shard's task has taken out. Whatever it has not dealt with when this is dropped
/// goes back to the shard: those entered again under a later time, and, should the task end
/// midway (a panic, its runtime shutting down at a yield), the rest, due at the next tick for
/// the task that `Flusher::ready` starts next. A subscriber whose entry was lost would stay held
/// until its queue filled.
type Entries = std::iter::Flatten<btree_map::IntoValues<u64, Vec<Arc<Subscriber>>>>;

struct Batch<'a> {
    shard: &'a Shard,
    subs: Entries,
    later: Vec<(Arc<Subscriber>, u64)>,
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        let rest: Vec<_> = self.subs.by_ref().collect();
        if rest.is_empty() && self.later.is_empty() {
            return;
        }
        let now = now_ns();
        let mut due = self.shard.due.lock();
        for sub in rest {
            due.enter(sub, now, now);
        }
        for (sub, at) in self.later.drain(..) {
            due.enter(sub, at, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(id: u64) -> Arc<Subscriber> {
        Arc::new(Subscriber::new(id, Vec::new(), None, None, None, false))
    }

    /// An entry due in a later millisecond is filed under that millisecond's start (tokio's
    /// wake-up, up to a millisecond late, then puts the write on either side of its time rather
    /// than always after it); one due within the current millisecond under the next, so that
    /// a window shorter than a tick still holds its updates until then.
    #[test]
    fn an_entry_is_filed_under_the_start_of_its_millisecond_unless_that_has_begun() {
        let shard = Shard::new();
        let mut due = shard.due.lock();
        let now = 4 * TICK_NS + TICK_NS / 2;
        assert!(due.enter(sub(1), 5 * TICK_NS + TICK_NS * 7 / 10, now));
        assert!(!due.enter(sub(2), 5 * TICK_NS, now));
        assert!(!due.enter(sub(3), 6 * TICK_NS - 1, now));
        assert!(!due.enter(sub(4), 6 * TICK_NS, now));
        // Due within the current millisecond, or already past: the next one.
        assert!(!due.enter(sub(5), now + TICK_NS / 4, now));
        assert!(!due.enter(sub(6), now - 3 * TICK_NS, now));
        assert_eq!(due.armed, 5);
        let ids = |t: u64| -> Vec<u64> { due.by_tick[&t].iter().map(|s| s.id).collect() };
        assert_eq!(ids(5), [1, 2, 3, 5, 6]);
        assert_eq!(ids(6), [4]);
        assert_eq!(due.by_tick.len(), 2);
    }

    /// Entries a task took out but did not deal with go back to the shard when it lets go of
    /// them, however it ends: none is lost.
    #[test]
    fn a_batch_dropped_midway_puts_back_what_it_did_not_deal_with() {
        let shard = Shard::new();
        let mut taken = BTreeMap::new();
        taken.insert(1, vec![sub(1), sub(2)]);
        taken.insert(2, vec![sub(3)]);
        let mut batch = Batch {
            shard: &shard,
            subs: taken.into_values().flatten(),
            later: Vec::new(),
        };
        let first = batch.subs.next().unwrap();
        assert_eq!(first.id, 1);
        batch.later.push((first, now_ns() + 10 * TICK_NS));
        drop(batch);
        let due = shard.due.lock();
        let mut ids: Vec<u64> = due.by_tick.values().flatten().map(|s| s.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(
            due.by_tick.len(),
            2,
            "the rest due now, the later one at its time"
        );
        assert_eq!(due.armed, *due.by_tick.keys().next().unwrap());
    }
}
