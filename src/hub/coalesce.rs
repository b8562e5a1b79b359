//! Deliberate coalescing: how long a subscriber's further updates wait after a write to it, so
//! that they share the next one.
//!
//! A write to a socket costs far more than the update it carries (most of it the kernel's,
//! whether it carries 100 bytes or 1,000). The hub budgets its writes a second. While the
//! updates it delivers fit in that budget, each goes out at once. Past it, every subscriber
//! that receives updates gets one write per window (to within the flusher's millisecond), the
//! window being long enough for those subscribers together to stay within the budget (and never
//! longer than `--coalesce`). The first update after a quiet spell is never delayed either way.
//!
//! The budget is measured by default (`--write-budget auto`): a few times a second the retune
//! reads the process's CPU time and the writes made meanwhile, keeps a running cost of a write,
//! and allows [`WRITE_SHARE`] of the machine's cores at that cost. A number (`--write-budget N`)
//! fixes it at N writes a second per core instead, the CPU-saving choice.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
// The hub's clock (see `clock`): the retune measures paused time in tests.
use tokio::time::Instant;

/// Socket writes per second and core of the fixed budget that was the default before the
/// measured one, and the floor of the measured one: the auto budget never batches more than
/// this. (Measured in S1, 1,000 subscribers at 200 updates/s on 2 cores: 25 ms windows, 2.14x
/// the naive baseline's deliveries per CPU-second, p50 14 ms.)
pub const WRITES_PER_CORE: u64 = 20_000;

/// The fraction of each core the hub may spend, at the measured cost of a write, writing every
/// update at once before it batches (`--write-budget auto`). Since the cost is the process's
/// whole CPU time per write, the hub settles where it uses about this share of the machine
/// while it batches. See docs/ARCHITECTURE.md for the measurements that chose it.
pub const WRITE_SHARE: f64 = 0.3;

/// Bounds of `--write-budget N`.
pub const WRITE_BUDGET_RANGE: std::ops::RangeInclusive<u64> = 1_000..=10_000_000;

/// An interval with fewer writes than this says more about the hub's fixed costs (timers,
/// publishes) than about a write: it leaves the measured cost as it was.
const MIN_WRITES: u64 = 500;
/// The cost a single interval may report, in CPU nanoseconds per write: beyond it the interval
/// is clamped (a stall, a burst of publishes with few deliveries).
const COST_RANGE_NS: (f64, f64) = (500.0, 100_000.0);
/// The cost assumed until the first interval with enough writes: a loopback write's order of
/// magnitude.
const FIRST_COST_NS: f64 = 5_000.0;
/// Weight of each new interval in the running cost: at ten retunes a second, a change in the
/// cost shows fully within a second or two, and one odd interval moves it by a quarter.
const COST_WEIGHT: f64 = 0.25;

/// How the hub sets its write budget (`--write-budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBudget {
    /// From the measured cost of a write: [`WRITE_SHARE`] of the cores.
    Auto,
    /// This many writes a second per core, whatever they cost.
    PerCore(u64),
}

impl fmt::Display for WriteBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteBudget::Auto => f.write_str("auto"),
            WriteBudget::PerCore(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for WriteBudget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(WriteBudget::Auto);
        }
        let n: u64 = s.parse().map_err(|_| {
            format!("{s:?} is not a write budget: auto, or writes a second per core")
        })?;
        if !WRITE_BUDGET_RANGE.contains(&n) {
            return Err(format!(
                "{n} is not in {}..={} (writes a second per core), nor auto",
                WRITE_BUDGET_RANGE.start(),
                WRITE_BUDGET_RANGE.end()
            ));
        }
        Ok(WriteBudget::PerCore(n))
    }
}

/// The running totals the retune compares with the previous call's.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Totals {
    /// Updates delivered to subscribers since the start.
    pub deliveries: u64,
    /// Socket writes of updates since the start (direct, flusher and stream tasks).
    pub writes: u64,
    /// The process's CPU time, user and system; `None` if it could not be read.
    pub cpu_ns: Option<u64>,
}

/// The running cost of a write, in CPU nanoseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteCost {
    ns: f64,
    measured: bool,
}

impl WriteCost {
    fn new() -> Self {
        WriteCost {
            ns: FIRST_COST_NS,
            measured: false,
        }
    }

    /// Takes in an interval in which the process spent `cpu_ns` and made `writes`; `true` if
    /// it counted.
    fn observe(&mut self, cpu_ns: u64, writes: u64) -> bool {
        if writes < MIN_WRITES {
            return false;
        }
        let sample = (cpu_ns as f64 / writes as f64).clamp(COST_RANGE_NS.0, COST_RANGE_NS.1);
        self.ns = if self.measured {
            self.ns + COST_WEIGHT * (sample - self.ns)
        } else {
            sample
        };
        self.measured = true;
        true
    }
}

/// Writes a second per core that [`WRITE_SHARE`] of a core pays for at `cost_ns` a write,
/// within [`WRITES_PER_CORE`] and the top of `--write-budget`.
///
/// The floor is what bounds the feedback: batching more makes fewer writes carry the hub's
/// fixed costs, so each measured write costs more and the budget falls further. The hub
/// settles where its CPU time is the share, if its costs other than writing take less than
/// that; otherwise it would batch ever more, and the floor stops it where the fixed default did.
pub(crate) fn measured_per_core(cost_ns: f64) -> u64 {
    let per_core = WRITE_SHARE * 1e9 / cost_ns.max(1.0);
    (per_core as u64).clamp(WRITES_PER_CORE, *WRITE_BUDGET_RANGE.end())
}

pub(crate) struct Coalescing {
    bound: Duration,
    budget: WriteBudget,
    /// Writes a second on one core: `--write-budget N`, or measured.
    per_core: AtomicU64,
    /// Cores of the machine and cores the cluster nodes on it may use between them (see
    /// `share`); 1 and 1 alone.
    machine: AtomicU64,
    wanted: AtomicU64,
    /// This hub's share of `per_core`, when it shares its cores with other hubs (cluster nodes
    /// on one machine); `per_core` otherwise.
    share: AtomicU64,
    window_ns: AtomicU64,
    /// The running cost of a write, for `/metrics`; 0 until measured.
    cost_ns: AtomicU64,
    /// Counts the subscribers that received something since the last retune: each remembers
    /// the epoch in which it was last counted.
    epoch: AtomicU64,
    active: AtomicU64,
    last: Mutex<Last>,
}

/// What the previous retune saw.
struct Last {
    at: Instant,
    totals: Totals,
    cost: WriteCost,
}

impl Coalescing {
    pub fn new(bound: Duration, budget: WriteBudget) -> Self {
        let per_core = match budget {
            WriteBudget::PerCore(n) => n,
            WriteBudget::Auto => measured_per_core(FIRST_COST_NS),
        };
        Coalescing {
            bound,
            budget,
            per_core: AtomicU64::new(per_core),
            machine: AtomicU64::new(1),
            wanted: AtomicU64::new(1),
            share: AtomicU64::new(per_core),
            window_ns: AtomicU64::new(0),
            cost_ns: AtomicU64::new(0),
            epoch: AtomicU64::new(1),
            active: AtomicU64::new(0),
            last: Mutex::new(Last {
                at: Instant::now(),
                totals: Totals::default(),
                cost: WriteCost::new(),
            }),
        }
    }

    /// Shares the machine's cores: hubs that may use `wanted` cores between them run on a
    /// machine that has `machine` cores. Each keeps its whole budget while they fit, and takes
    /// the machine's share of it when they do not.
    pub fn share(&self, machine: u64, wanted: u64) {
        self.machine.store(machine, Relaxed);
        self.wanted.store(wanted, Relaxed);
        self.reshare();
    }

    fn reshare(&self) {
        let shared = shared_per_core(
            self.per_core.load(Relaxed),
            self.machine.load(Relaxed),
            self.wanted.load(Relaxed),
        );
        self.share.store(shared, Relaxed);
    }

    /// Writes a second per core this hub allows itself: its share of the budget.
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

    /// The running cost of a write in CPU nanoseconds; 0 until an interval measured it.
    pub fn write_cost_ns(&self) -> u64 {
        self.cost_ns.load(Relaxed)
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

    /// Sets the window from what happened since the last call (`now` holds the running
    /// totals): the deliveries and the subscribers that received them against the budget,
    /// which the CPU time per write resets first when it is measured.
    pub fn retune(&self, now: Totals) {
        if self.bound.is_zero() {
            return;
        }
        let at = Instant::now();
        let mut last = self.last.lock();
        let secs = at.duration_since(last.at).as_secs_f64();
        if secs < 0.05 {
            // Too short to measure a rate (ticks bunched up after a stall): keep the window.
            return;
        }
        let rate = now.deliveries.saturating_sub(last.totals.deliveries) as f64 / secs;
        let writes = now.writes.saturating_sub(last.totals.writes);
        if let (Some(cpu), Some(before)) = (now.cpu_ns, last.totals.cpu_ns) {
            if last.cost.observe(cpu.saturating_sub(before), writes) {
                self.cost_ns.store(last.cost.ns as u64, Relaxed);
                if self.budget == WriteBudget::Auto {
                    self.per_core
                        .store(measured_per_core(last.cost.ns), Relaxed);
                    self.reshare();
                }
            }
        }
        last.at = at;
        last.totals = now;
        drop(last);
        self.epoch.fetch_add(1, Relaxed);
        let active = self.active.swap(0, Relaxed);
        let window = window_for(self.bound, self.per_core_share(), rate, active, cores());
        self.window_ns.store(window.as_nanos() as u64, Relaxed);
    }
}

/// CPU time the process has used so far (every thread, user and system), or `None` where the
/// clock cannot be read. One call per retune.
pub(crate) fn process_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
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

    /// The running totals of `deliveries` and `writes`, with no CPU time read.
    fn totals(deliveries: u64) -> Totals {
        Totals {
            deliveries,
            writes: 0,
            cpu_ns: None,
        }
    }

    #[test]
    fn counts_each_receiving_subscriber_once_per_retune() {
        let c = Coalescing::new(
            Duration::from_millis(250),
            WriteBudget::PerCore(WRITES_PER_CORE),
        );
        let subs: Vec<AtomicU64> = (0..3).map(|_| AtomicU64::new(0)).collect();
        for _ in 0..5 {
            for s in &subs {
                c.touched(s);
            }
        }
        assert_eq!(c.active.load(Relaxed), 3);
        std::thread::sleep(Duration::from_millis(60));
        c.retune(totals(1_000_000_000));
        assert_eq!(c.active.load(Relaxed), 0);
        assert!(c.window() > Duration::ZERO, "a huge rate batches");
        c.touched(&subs[0]);
        assert_eq!(c.active.load(Relaxed), 1);
        std::thread::sleep(Duration::from_millis(60));
        c.retune(totals(1_000_000_000));
        assert_eq!(
            c.window(),
            Duration::ZERO,
            "nothing delivered since: no wait"
        );
    }

    #[test]
    fn a_write_budget_is_auto_or_a_number_in_range() {
        assert_eq!("auto".parse(), Ok(WriteBudget::Auto));
        assert_eq!(" AUTO ".parse(), Ok(WriteBudget::Auto));
        assert_eq!("20000".parse(), Ok(WriteBudget::PerCore(20_000)));
        let low = "10".parse::<WriteBudget>().unwrap_err();
        assert!(low.contains("not in 1000..=10000000"), "{low}");
        let word = "lots".parse::<WriteBudget>().unwrap_err();
        assert!(word.contains("auto, or writes a second per core"), "{word}");
        assert_eq!(WriteBudget::Auto.to_string(), "auto");
    }

    #[test]
    fn the_cost_of_a_write_is_a_running_average_of_busy_intervals() {
        let mut cost = WriteCost::new();
        assert!(
            !cost.observe(1_000_000_000, MIN_WRITES - 1),
            "too few writes"
        );
        assert_eq!(cost.ns, FIRST_COST_NS);
        // The first measured interval replaces the guess.
        assert!(cost.observe(4_000_000, 1_000));
        assert_eq!(cost.ns, 4_000.0);
        // Then each moves it a quarter of the way.
        assert!(cost.observe(8_000_000, 1_000));
        assert_eq!(cost.ns, 5_000.0);
        // A stall (a second of CPU for 500 writes) counts as the clamp's top.
        assert!(cost.observe(1_000_000_000, 500));
        assert_eq!(cost.ns, 5_000.0 + 0.25 * (COST_RANGE_NS.1 - 5_000.0));
    }

    #[test]
    fn the_measured_budget_is_the_share_at_that_cost_within_bounds() {
        assert_eq!(measured_per_core(4_000.0), (WRITE_SHARE * 250_000.0) as u64);
        // A write so dear that the share pays for few: the fixed default's, no fewer.
        assert_eq!(measured_per_core(1e6), WRITES_PER_CORE);
        assert_eq!(measured_per_core(0.0), *WRITE_BUDGET_RANGE.end());
    }

    /// A synthetic hub for the controller: `fixed` CPU ns a second whatever it writes, `per_write`
    /// ns a write, `rate` deliveries a second to `active` subscribers. Each subscriber is
    /// written at most once per window: `active / window` writes a second, at most `rate`.
    /// Returns the budget after each of `retunes` retunes, 100 ms apart.
    async fn drive(c: &Coalescing, fixed: f64, per_write: f64, rate: f64, active: u64) -> Vec<u64> {
        let mut now = Totals {
            deliveries: 0,
            writes: 0,
            cpu_ns: Some(0),
        };
        let mut budgets = Vec::new();
        let subs: Vec<AtomicU64> = (0..active).map(|_| AtomicU64::new(0)).collect();
        for _ in 0..60 {
            let window = c.window().as_secs_f64();
            let writes = if window == 0.0 {
                rate
            } else {
                rate.min(active as f64 / window)
            };
            for s in &subs {
                c.touched(s);
            }
            tokio::time::advance(Duration::from_millis(100)).await;
            now.deliveries += (rate / 10.0) as u64;
            now.writes += (writes / 10.0) as u64;
            *now.cpu_ns.as_mut().unwrap() += ((fixed + per_write * writes) / 10.0) as u64;
            c.retune(now);
            budgets.push(c.budget());
        }
        budgets
    }

    /// Fewer writes carry the fixed costs, so the measured cost rises as the hub batches; the
    /// controller still settles, where the hub spends its share of the cores.
    #[tokio::test(start_paused = true)]
    async fn the_measured_budget_settles_where_the_hub_spends_its_share() {
        let cores = f64::from(cores());
        let share = WRITE_SHARE * cores * 1e9;
        // Written one at a time, 100,000 deliveries a second per core would take 1.5 times
        // the share; a fifth of the share goes to the rest.
        let rate = 100_000.0 * cores;
        let (fixed, per_write) = (0.2 * share, 1.3 * share / rate);
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let budgets = drive(&c, fixed, per_write, rate, 1_000 * cores as u64).await;
        // The fixed point: fixed + per_write * budget = share.
        let settled = (share - fixed) / per_write;
        for b in &budgets[40..] {
            let off = (*b as f64 - settled).abs() / settled;
            assert!(off < 0.02, "budget {b} against {settled}: {budgets:?}");
        }
        assert!(c.window() > Duration::ZERO, "over the share: it batches");
        let cost = c.write_cost_ns() as f64;
        assert!((cost - share / settled).abs() < 100.0, "{cost}");
        // Nodes sharing the machine divide the measured budget.
        let whole = c.budget();
        c.share(2, 6);
        assert_eq!(
            c.budget(),
            shared_per_core(whole / cores as u64, 2, 6) * cores as u64
        );
    }

    /// When the hub's other costs alone exceed its share, batching more never brings it
    /// within it: the budget stops at the floor instead of falling for ever.
    #[tokio::test(start_paused = true)]
    async fn the_measured_budget_stops_at_the_floor() {
        let cores = f64::from(cores());
        let share = WRITE_SHARE * cores * 1e9;
        let rate = 100_000.0 * cores;
        let active = 1_000 * cores as u64;
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let budgets = drive(&c, 1.2 * share, 2_000.0, rate, active).await;
        let floor = WRITES_PER_CORE * cores as u64;
        assert!(budgets[30..].iter().all(|b| *b == floor), "{budgets:?}");
        assert_eq!(
            c.window(),
            Duration::from_secs_f64(active as f64 / floor as f64)
        );
    }

    /// A quiet hub (too few writes to measure) keeps its first guess and waits for nothing; a
    /// fixed budget ignores the cost it measures.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_hub_waits_for_nothing_and_a_fixed_budget_stays_fixed() {
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let first = c.budget();
        let budgets = drive(&c, 1e7, 10_000.0, 2_000.0, 1_000).await;
        assert!(budgets.iter().all(|b| *b == first));
        assert_eq!(c.window(), Duration::ZERO);
        assert_eq!(c.write_cost_ns(), 0, "not measured");

        let fixed = Coalescing::new(Duration::from_millis(200), WriteBudget::PerCore(50_000));
        let cores = u64::from(cores());
        let budgets = drive(&fixed, 1e9, 10_000.0, 1e6, 1_000).await;
        assert!(budgets.iter().all(|b| *b == 50_000 * cores));
        assert!(fixed.write_cost_ns() > 0, "measured all the same");
    }
}
