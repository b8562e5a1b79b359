//! Deliberate coalescing: how long a subscriber's further updates wait after a write to it, so
//! that they share the next one.
//!
//! A write to a socket costs far more than the update it carries (~8-10 µs of CPU on loopback,
//! most of it the kernel's, whether it carries 100 bytes or 1,000). The hub budgets its writes:
//! `--write-budget` per second per core ([`WRITES_PER_CORE`] unless told otherwise). While the
//! updates it delivers fit in that budget, each goes out at once. Past it, every subscriber
//! that receives updates gets one write per window (to within the flusher's millisecond), the
//! window being long enough for those subscribers together to stay within the budget (and never
//! longer than `--coalesce`).
//! The window is retuned a few times a second from what the hub actually delivered; the first
//! update after a quiet spell is never delayed either way.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
// The hub's clock (see `clock`): the retune measures paused time in tests.
use tokio::time::Instant;

/// Socket writes per second and core the hub allows itself before batching, by default: about a
/// fifth of a core, leaving the rest for publishing, TLS and bursts. (Measured in S1, 1,000
/// subscribers at 200 updates/s on 2 cores: 25,000 gave 20 ms windows and 1.94x the naive
/// baseline's deliveries per CPU-second, 20,000 gives 25 ms and 2.14x, p99 28 ms against the
/// baseline's 39 ms.)
pub const WRITES_PER_CORE: u64 = 20_000;

pub(crate) struct Coalescing {
    bound: Duration,
    /// Writes a second on one core.
    per_core: u64,
    window_ns: AtomicU64,
    /// This hub's share of the budget per core, when it shares its cores with other hubs
    /// (cluster nodes on one machine); `per_core` otherwise.
    share: AtomicU64,
    /// Counts the subscribers that received something since the last retune: each remembers
    /// the epoch in which it was last counted.
    epoch: AtomicU64,
    active: AtomicU64,
    last: Mutex<(Instant, u64)>,
}

impl Coalescing {
    pub fn new(bound: Duration, per_core: u64) -> Self {
        Coalescing {
            bound,
            per_core,
            window_ns: AtomicU64::new(0),
            share: AtomicU64::new(per_core),
            epoch: AtomicU64::new(1),
            active: AtomicU64::new(0),
            last: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Shares the machine's cores: hubs that may use `wanted` cores between them run on a
    /// machine that has `machine` cores. Each keeps its whole budget while they fit, and takes
    /// the machine's share of it when they do not.
    pub fn share(&self, machine: u64, wanted: u64) {
        self.share
            .store(shared_per_core(self.per_core, machine, wanted), Relaxed);
    }

    /// Writes a second per core this hub allows itself: its share of `--write-budget`.
    fn per_core_share(&self) -> u64 {
        self.share.load(Relaxed)
    }

    /// Writes a second this hub allows itself, on all its cores.
    pub fn budget(&self) -> u64 {
        self.per_core_share() * u64::from(cores())
    }

    /// The current wait after a write.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Relaxed))
    }

    #[cfg(test)]
    pub fn set_window(&self, window: Duration) {
        self.window_ns.store(window.as_nanos() as u64, Relaxed);
    }

    /// Called when an update is queued for a subscriber whose counter is `seen`.
    pub fn touched(&self, seen: &AtomicU64) {
        let epoch = self.epoch.load(Relaxed);
        if seen.load(Relaxed) != epoch {
            seen.store(epoch, Relaxed);
            self.active.fetch_add(1, Relaxed);
        }
    }

    /// Sets the window from the deliveries made since the last call (`deliveries` is the
    /// running total) and the subscribers that received them.
    pub fn retune(&self, deliveries: u64) {
        if self.bound.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut last = self.last.lock();
        let secs = now.duration_since(last.0).as_secs_f64();
        if secs < 0.05 {
            // Too short to measure a rate (ticks bunched up after a stall): keep the window.
            return;
        }
        let rate = deliveries.saturating_sub(last.1) as f64 / secs;
        *last = (now, deliveries);
        drop(last);
        self.epoch.fetch_add(1, Relaxed);
        let active = self.active.swap(0, Relaxed);
        let window = window_for(self.bound, self.per_core_share(), rate, active, cores());
        self.window_ns.store(window.as_nanos() as u64, Relaxed);
    }
}

/// `per_core` scaled by the machine's `machine` cores over the `wanted` cores of the hubs on it,
/// when they want more than it has; never 0.
pub(crate) fn shared_per_core(per_core: u64, machine: u64, wanted: u64) -> u64 {
    if wanted <= machine {
        return per_core;
    }
    ((u128::from(per_core) * u128::from(machine.max(1)) / u128::from(wanted)) as u64).max(1)
}

/// The window for `rate` deliveries per second to `active` subscribers on `cores` cores, each
/// allowed `per_core` writes a second.
pub(crate) fn window_for(
    bound: Duration,
    per_core: u64,
    rate: f64,
    active: u64,
    cores: u32,
) -> Duration {
    let budget = per_core.max(1) * u64::from(cores.max(1));
    if rate <= budget as f64 {
        return Duration::ZERO;
    }
    // `active` subscribers written at most once per window each: `active / window` writes a
    // second, which the budget bounds.
    Duration::from_secs_f64(active as f64 / budget as f64).min(bound)
}

pub(crate) fn cores() -> u32 {
    static CORES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| {
        std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hubs_share_a_machine_only_when_they_want_more_cores_than_it_has() {
        // Three nodes that may each use both cores of a 2-core machine: a third each.
        assert_eq!(shared_per_core(30_000, 2, 6), 10_000);
        // Two nodes each limited to 2 of 8 cores, or pinned to one core each of two: their own.
        assert_eq!(shared_per_core(20_000, 8, 4), 20_000);
        assert_eq!(shared_per_core(20_000, 2, 2), 20_000);
        // Three nodes with one core each on a 2-core machine: two thirds.
        assert_eq!(shared_per_core(30_000, 2, 3), 20_000);
        assert_eq!(shared_per_core(1_000, 1, 1_000_000), 1);
        assert_eq!(shared_per_core(u64::MAX, 4, 8), u64::MAX / 2);
    }

    #[test]
    fn no_wait_while_the_budget_holds_then_enough_to_keep_it() {
        const B: u64 = 25_000;
        let bound = Duration::from_millis(250);
        let ms = Duration::from_millis;
        // A quiet hub, or many subscribers receiving little (S6): every update at once.
        assert_eq!(window_for(bound, B, 0.0, 0, 2), Duration::ZERO);
        assert_eq!(window_for(bound, B, 2_000.0, 10_000, 2), Duration::ZERO);
        assert_eq!(window_for(bound, B, 50_000.0, 1_000, 2), Duration::ZERO);
        // Past the budget of 50,000 writes a second on 2 cores.
        assert_eq!(window_for(bound, B, 500_000.0, 100, 2), ms(2));
        assert_eq!(window_for(bound, B, 200_000.0, 1_000, 2), ms(20));
        assert_eq!(window_for(bound, B, 200_000.0, 10_000, 2), ms(200));
        assert_eq!(window_for(bound, B, 400_000.0, 19_000, 2), bound);
        assert_eq!(window_for(bound, B, 200_000.0, 10_000, 8), Duration::ZERO);
        assert_eq!(window_for(bound, B, 400_000.0, 10_000, 8), ms(50));
        assert_eq!(window_for(Duration::ZERO, B, 1e9, 1_000, 2), Duration::ZERO);
        // --write-budget: half the writes, twice the wait.
        assert_eq!(window_for(bound, 12_500, 200_000.0, 10_000, 2), bound);
        assert_eq!(window_for(bound, 12_500, 200_000.0, 1_000, 2), ms(40));
        assert_eq!(
            window_for(bound, 100_000, 200_000.0, 1_000, 2),
            Duration::ZERO
        );
    }

    #[test]
    fn counts_each_receiving_subscriber_once_per_retune() {
        let c = Coalescing::new(Duration::from_millis(250), WRITES_PER_CORE);
        let subs: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        for _ in 0..5 {
            for s in &subs {
                c.touched(s);
            }
        }
        assert_eq!(c.active.load(Relaxed), 3);
        std::thread::sleep(Duration::from_millis(60));
        c.retune(1_000_000_000);
        assert_eq!(c.active.load(Relaxed), 0);
        assert!(c.window() > Duration::ZERO, "a huge rate batches");
        c.touched(&subs[0]);
        assert_eq!(c.active.load(Relaxed), 1);
        std::thread::sleep(Duration::from_millis(60));
        c.retune(1_000_000_000);
        assert_eq!(
            c.window(),
            Duration::ZERO,
            "nothing delivered since: no wait"
        );
    }
}
