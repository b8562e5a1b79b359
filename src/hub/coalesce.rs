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
//! The budget follows the CPU by default (`--write-budget auto`): a few times a second the
//! retune reads how busy the cores are (the machine's, from `/proc/stat`, and the process's own
//! CPU time against the cores it may use). While they have room, the budget is unbounded and
//! every update goes out at once: batching would save CPU nobody needs and cost latency every
//! subscriber sees. Once they are busier than [`BUSY_HIGH`], the hub is behind or about to be
//! (its tasks queue for a core), and the budget steps down below the writes it is making, so
//! that updates share writes and the cores get room back; below [`BUSY_LOW`] it steps up again.
//! It never falls below [`WRITES_PER_CORE`], the fixed budget that was the default before.
//! A number (`--write-budget N`) fixes N writes a second per core instead, the CPU-saving
//! choice. docs/ARCHITECTURE.md has the measurements that chose this.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
// The hub's clock (see `clock`): the retune measures paused time in tests.
use tokio::time::Instant;

/// Socket writes per second and core of the fixed budget that was the default before the
/// measured one, and the floor of the measured one: `auto` never batches more than this.
/// (Measured in S1, 1,000 subscribers at 200 updates/s on 2 cores: 25 ms windows, 2.14x the
/// naive baseline's deliveries per CPU-second, p50 14 ms.)
pub const WRITES_PER_CORE: u64 = 20_000;

/// Bounds of `--write-budget N`; the top is also `auto`'s "unbounded".
pub const WRITE_BUDGET_RANGE: std::ops::RangeInclusive<u64> = 1_000..=10_000_000;

/// Above this share of the cores busy, `auto` batches more: the cores are nearly saturated, so
/// the hub's tasks start to wait for one (latency rises whatever it does) and every write saved
/// gives time back to the rest.
pub const BUSY_HIGH: f64 = 0.85;
/// Below this share busy, `auto` batches less (the band between holds the budget, so that
/// it does not swing at every retune).
pub const BUSY_LOW: f64 = 0.70;
/// How far one retune moves the budget: a fifth down (below the writes actually made), a
/// quarter up. At ten retunes a second the floor is reached from the writes of a busy S1 in
/// about a second, and unbounded again from the floor in about three.
const STEP_DOWN: f64 = 0.8;
const STEP_UP: f64 = 1.25;
/// A retune that ran this late finds the hub behind: its tasks waited that long for a worker,
/// whatever the CPU figures say (a saturated thread on a many-core machine, neighbours
/// queueing for the same cores). It counts as an interval with the cores fully busy.
pub const LAG_BEHIND: Duration = Duration::from_millis(5);
/// Weight of each new interval in the running busy share: one odd interval (a burst of
/// publishes, a compaction elsewhere on the machine) moves it by half.
const BUSY_WEIGHT: f64 = 0.5;

/// How the hub sets its write budget (`--write-budget`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBudget {
    /// Unbounded while the cores have room, stepped down while they are busy.
    Auto,
    /// This many writes a second per core, whatever the cores are doing.
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
    /// The machine's CPU time busy and in all, in the kernel's ticks; `None` where
    /// `/proc/stat` cannot be read.
    pub machine: Option<(u64, u64)>,
    /// The CPUs the process may use, a fraction under a CPU quota (see [`cpu_capacity`]);
    /// 0 for [`cores`].
    pub capacity: f64,
    /// How late the retune came.
    pub lag: Duration,
}

/// What the retune saw in one interval, per core of the hub.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    /// The running busy share of the cores (see [`busy_share`]).
    pub busy: f64,
    /// The process's own share of the CPUs it may use in the interval.
    pub process: f64,
    /// Socket writes made and updates delivered a second, per core.
    pub writes: f64,
    pub deliveries: f64,
    /// Whether updates were being held (a window was open).
    pub batching: bool,
}

/// The next measured budget per core, within [`WRITES_PER_CORE`] and the top of the range.
///
/// Down a fifth while the cores are busy past [`BUSY_HIGH`]: the first step (not batching yet)
/// from the writes made, since from an unbounded budget stepping the budget itself would take
/// dozens of retunes to batch anything; later steps from the budget, since the writes made
/// while batching are well under it (each subscriber's window runs from its own last write) and
/// stepping from them would overshoot. Up a quarter below [`BUSY_LOW`], unless the step would
/// bring the cores back past [`BUSY_HIGH`]: the hub's own CPU is taken to grow with its writes
/// (an overestimate: not all of it is writing), and a step that stops batching altogether
/// brings back one write per delivery. Without that guard the loop swings between batching
/// and not every few retunes. Holds in between.
pub(crate) fn next_per_core(per_core: u64, load: Load) -> u64 {
    let top = *WRITE_BUDGET_RANGE.end();
    let budget = per_core as f64;
    let next = if load.busy >= BUSY_HIGH {
        if load.batching {
            budget * STEP_DOWN
        } else {
            budget.min(load.writes) * STEP_DOWN
        }
    } else if load.busy <= BUSY_LOW {
        let up = budget * STEP_UP;
        let writes_after = if up >= load.deliveries {
            load.deliveries
        } else if load.batching {
            load.writes * STEP_UP
        } else {
            load.writes
        };
        let grows = if load.writes > 0.0 {
            writes_after / load.writes
        } else {
            1.0
        };
        let predicted = load.busy + load.process * (grows - 1.0).max(0.0);
        if predicted < BUSY_HIGH {
            up
        } else {
            budget
        }
    } else {
        budget
    };
    (next as u64).clamp(WRITES_PER_CORE, top)
}

/// The share of the cores busy in an interval of `secs`: the busier of the machine (busy and
/// total ticks since the previous reading) and the process (`cpu_ns` on the `capacity` CPUs it
/// may use, which counts a CPU quota the machine's figures cannot see); 1 if the retune came
/// [`LAG_BEHIND`] late or later. Within 0 and 1.
pub(crate) fn busy_share(
    secs: f64,
    cpu_ns: Option<u64>,
    machine: Option<(u64, u64)>,
    capacity: f64,
    lag: Duration,
) -> f64 {
    if lag >= LAG_BEHIND {
        return 1.0;
    }
    let process = process_share(secs, cpu_ns, capacity);
    let machine = machine.map_or(0.0, |(busy, total)| {
        if total == 0 {
            0.0
        } else {
            busy as f64 / total as f64
        }
    });
    let share = process.max(machine);
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// The process's share of the `capacity` CPUs it may use (0: [`cores`]) in `secs`.
fn process_share(secs: f64, cpu_ns: Option<u64>, capacity: f64) -> f64 {
    let capacity = if capacity > 0.0 {
        capacity
    } else {
        f64::from(cores())
    };
    let share = cpu_ns.map_or(0.0, |ns| ns as f64 / (secs * 1e9 * capacity));
    if share.is_nan() {
        0.0
    } else {
        share.clamp(0.0, 1.0)
    }
}

/// The CPUs this process may use: its cgroup's CPU quota (cgroup v2 `cpu.max`, e.g. 0.5 for a
/// container limited to half a CPU, which `available_parallelism` rounds up to 1) when it has
/// one, else [`cores`]. Read at every retune, so a quota changed at run time counts.
pub(crate) fn cpu_capacity() -> f64 {
    let cores = f64::from(cores());
    cgroup_quota().map_or(cores, |q| q.min(cores))
}

fn cgroup_quota() -> Option<f64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/cpu.max")).ok()?;
    parse_cpu_max(&max)
}

/// `cpu.max`: `QUOTA PERIOD` in microseconds, or `max PERIOD` for no quota.
fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut fields = s.split_ascii_whitespace();
    let quota: f64 = fields.next()?.parse().ok()?;
    let period: f64 = fields.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0 && quota.is_finite() && period.is_finite())
        .then(|| (quota / period).max(0.01))
}

pub(crate) struct Coalescing {
    bound: Duration,
    budget: WriteBudget,
    /// Writes a second on one core: `--write-budget N`, or measured.
    per_core: AtomicU64,
    /// This hub's share of `per_core`, when it shares its cores with other hubs (cluster nodes
    /// on one machine, `--write-budget N` only: `auto` sees the machine's load directly);
    /// `per_core` otherwise.
    share: AtomicU64,
    window_ns: AtomicU64,
    /// The running busy share of the cores, in millionths, for `/metrics`.
    busy_ppm: AtomicU64,
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
    /// The running busy share of the cores.
    busy: f64,
}

impl Coalescing {
    pub fn new(bound: Duration, budget: WriteBudget) -> Self {
        let per_core = match budget {
            WriteBudget::PerCore(n) => n,
            WriteBudget::Auto => *WRITE_BUDGET_RANGE.end(),
        };
        Coalescing {
            bound,
            budget,
            per_core: AtomicU64::new(per_core),
            share: AtomicU64::new(per_core),
            window_ns: AtomicU64::new(0),
            busy_ppm: AtomicU64::new(0),
            epoch: AtomicU64::new(1),
            active: AtomicU64::new(0),
            last: Mutex::new(Last {
                at: Instant::now(),
                totals: Totals::default(),
                busy: 0.0,
            }),
        }
    }

    /// Shares the machine's cores: hubs that may use `wanted` cores between them run on a
    /// machine that has `machine` cores. With a fixed budget each keeps its whole budget while
    /// they fit, and takes the machine's share of it when they do not; a measured budget
    /// already answers to the machine's load, the other nodes' included.
    pub fn share(&self, machine: u64, wanted: u64) {
        if let WriteBudget::PerCore(n) = self.budget {
            self.share
                .store(shared_per_core(n, machine, wanted), Relaxed);
        }
    }

    /// `--write-budget N` rather than `auto`.
    pub fn is_fixed(&self) -> bool {
        matches!(self.budget, WriteBudget::PerCore(_))
    }

    /// Writes a second per core this hub allows itself.
    fn per_core_share(&self) -> u64 {
        match self.budget {
            WriteBudget::Auto => self.per_core.load(Relaxed),
            WriteBudget::PerCore(_) => self.share.load(Relaxed),
        }
    }

    /// Writes a second this hub allows itself, on all its cores.
    pub fn budget(&self) -> u64 {
        self.per_core_share().saturating_mul(u64::from(cores()))
    }

    /// The current wait after a write.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Relaxed))
    }

    /// How busy the cores were, as the retune last saw them (0 to 1).
    pub fn busy(&self) -> f64 {
        self.busy_ppm.load(Relaxed) as f64 / 1e6
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
    /// which the cores' load moves first when it is measured.
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
        let cpu = now
            .cpu_ns
            .zip(last.totals.cpu_ns)
            .map(|(n, before)| n.saturating_sub(before));
        let machine = now
            .machine
            .zip(last.totals.machine)
            .map(|((busy, total), (b0, t0))| (busy.saturating_sub(b0), total.saturating_sub(t0)));
        let sample = busy_share(secs, cpu, machine, now.capacity, now.lag);
        last.busy += BUSY_WEIGHT * (sample - last.busy);
        self.busy_ppm.store((last.busy * 1e6) as u64, Relaxed);
        if self.budget == WriteBudget::Auto {
            let writes = now.writes.saturating_sub(last.totals.writes) as f64;
            let writes_per_core = writes / secs / f64::from(cores());
            let per_core_rate = |n: f64| n / secs / f64::from(cores());
            let load = Load {
                busy: last.busy,
                process: process_share(secs, cpu, now.capacity),
                writes: writes_per_core,
                deliveries: per_core_rate(rate * secs),
                batching: !self.window().is_zero(),
            };
            let next = next_per_core(self.per_core.load(Relaxed), load);
            self.per_core.store(next, Relaxed);
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

/// The machine's CPU time so far, busy and in all, in the kernel's ticks, from the first line
/// of `/proc/stat`; `None` where there is none (not Linux, a sandbox). One read per retune.
pub(crate) fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&stat)
}

/// `cpu  user nice system idle iowait irq softirq steal ...`: idle and iowait are the time
/// with nothing to run; the rest (guest time is already in user) is busy.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_ascii_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.take(8).map_while(|f| f.parse().ok()).collect();
    if ticks.len() < 5 {
        return None;
    }
    let total: u64 = ticks.iter().sum();
    let idle = ticks[3] + ticks[4];
    Some((total - idle, total))
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
            machine: None,
            capacity: 0.0,
            lag: Duration::ZERO,
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

    /// A load of `busy` (the process `process` of it) writing `writes` of `deliveries` a
    /// second per core.
    fn load(busy: f64, process: f64, writes: f64, deliveries: f64, batching: bool) -> Load {
        Load {
            busy,
            process,
            writes,
            deliveries,
            batching,
        }
    }

    #[test]
    fn the_budget_steps_down_below_the_writes_made_while_busy_and_up_while_not() {
        let top = *WRITE_BUDGET_RANGE.end();
        // Unbounded and busy, not batching yet: a fifth below the 100,000 writes a second per
        // core it made.
        let busy = load(0.9, 0.5, 100_000.0, 100_000.0, false);
        assert_eq!(next_per_core(top, busy), 80_000);
        // Batching: a fifth below the budget, whatever fewer writes it made.
        assert_eq!(
            next_per_core(80_000, load(0.95, 0.5, 40_000.0, 1e5, true)),
            64_000
        );
        // Never below the old fixed default.
        assert_eq!(
            next_per_core(21_000, load(1.0, 1.0, 2e4, 1e5, true)),
            WRITES_PER_CORE
        );
        assert_eq!(
            next_per_core(top, load(1.0, 0.1, 10.0, 10.0, false)),
            WRITES_PER_CORE
        );
        // Between the bounds it holds.
        assert_eq!(
            next_per_core(64_000, load(0.8, 0.5, 3e4, 1e5, true)),
            64_000
        );
        // Room again: a quarter up, to the top.
        assert_eq!(
            next_per_core(64_000, load(0.5, 0.2, 3e4, 5e4, true)),
            80_000
        );
        assert_eq!(next_per_core(top - 1, load(0.0, 0.0, 0.0, 0.0, false)), top);
        // Unless the step would stop batching and bring the cores back past the band: 60 %
        // busy, half of it the hub's, writing a third of its deliveries.
        assert_eq!(
            next_per_core(64_000, load(0.6, 0.3, 3e4, 7.5e4, true)),
            64_000
        );
        // A smaller step within the batching range costs a quarter more writes: taken.
        assert_eq!(
            next_per_core(40_000, load(0.6, 0.3, 2e4, 9e4, true)),
            50_000
        );
    }

    #[test]
    fn busy_is_the_busier_of_the_machine_and_the_process_on_its_cpus_or_full_when_late() {
        let on_time = Duration::ZERO;
        // Half a second of CPU in a second on 2 cores: a quarter; the machine at 60 %.
        assert_eq!(
            busy_share(1.0, Some(500_000_000), Some((60, 100)), 2.0, on_time),
            0.6
        );
        // A process limited to half a CPU and using it, the machine idle elsewhere.
        assert_eq!(
            busy_share(1.0, Some(500_000_000), Some((10, 100)), 0.5, on_time),
            1.0
        );
        assert_eq!(busy_share(1.0, None, None, 2.0, on_time), 0.0);
        assert_eq!(busy_share(1.0, None, Some((0, 0)), 2.0, on_time), 0.0);
        assert_eq!(busy_share(0.1, Some(u64::MAX), None, 2.0, on_time), 1.0);
        // A retune that came late: the hub is behind.
        assert_eq!(busy_share(1.0, None, None, 2.0, LAG_BEHIND), 1.0);
        assert_eq!(busy_share(0.0, Some(0), None, 0.0, on_time), 0.0);
    }

    #[test]
    fn a_cgroup_quota_is_a_fraction_of_a_cpu() {
        assert_eq!(parse_cpu_max("50000 100000\n"), Some(0.5));
        assert_eq!(parse_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("0 100000"), None);
        assert_eq!(parse_cpu_max("1 100000"), Some(0.01));
        assert_eq!(parse_cpu_max(""), None);
        let capacity = cpu_capacity();
        assert!(
            capacity > 0.0 && capacity <= f64::from(cores()),
            "{capacity}"
        );
    }

    #[test]
    fn proc_stat_gives_busy_and_total_ticks() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        assert_eq!(parse_proc_stat(stat), Some((160, 980)));
        assert_eq!(parse_proc_stat("cpu  1 2 3\n"), None);
        assert_eq!(parse_proc_stat("intr 1 2 3 4 5 6\n"), None);
        assert_eq!(parse_proc_stat(""), None);
        #[cfg(target_os = "linux")]
        assert!(machine_cpu().is_some(), "Linux has /proc/stat");
    }

    /// A synthetic machine for the controller: the process spends `fixed` CPU ns a second
    /// whatever it writes and `per_write` ns a write; `rate` deliveries a second go to `active`
    /// subscribers, each written at most once per window: `fill` × `active / window` writes a
    /// second, at most `rate` (a real hub makes about half the writes the budget allows, each
    /// window running from the subscriber's own last write). Returns (budget, busy share,
    /// window) after each of 60 retunes, 100 ms apart.
    async fn drive_filled(
        c: &Coalescing,
        fixed: f64,
        per_write: f64,
        rate: f64,
        active: u64,
        fill: f64,
    ) -> Vec<(u64, f64, Duration)> {
        let cores = f64::from(cores());
        let mut now = Totals {
            deliveries: 0,
            writes: 0,
            cpu_ns: Some(0),
            machine: None,
            capacity: cores,
            lag: Duration::ZERO,
        };
        let mut seen = Vec::new();
        let subs: Vec<AtomicU64> = (0..active).map(|_| AtomicU64::new(0)).collect();
        for _ in 0..60 {
            let window = c.window().as_secs_f64();
            let writes = if window == 0.0 {
                rate
            } else {
                rate.min(fill * active as f64 / window)
            };
            for s in &subs {
                c.touched(s);
            }
            tokio::time::advance(Duration::from_millis(100)).await;
            now.deliveries += (rate / 10.0) as u64;
            now.writes += (writes / 10.0) as u64;
            // Saturated cores do no more than they have.
            let cpu = (fixed + per_write * writes).min(cores * 1e9);
            *now.cpu_ns.as_mut().unwrap() += (cpu / 10.0) as u64;
            c.retune(now);
            seen.push((c.budget(), c.busy(), c.window()));
        }
        seen
    }

    async fn drive(
        c: &Coalescing,
        fixed: f64,
        per_write: f64,
        rate: f64,
        active: u64,
    ) -> Vec<(u64, f64)> {
        drive_filled(c, fixed, per_write, rate, active, 1.0)
            .await
            .into_iter()
            .map(|(b, busy, _)| (b, busy))
            .collect()
    }

    /// A hub that keeps up batches nothing; one that would saturate its cores writing every
    /// update batches until they are within the band, and stops there.
    #[tokio::test(start_paused = true)]
    async fn the_measured_budget_batches_only_as_much_as_the_cores_need() {
        let cores = f64::from(cores());
        let capacity = cores * 1e9;
        let rate = 100_000.0 * cores;
        let active = 1_000 * cores as u64;
        // Writing every update takes 60 % of the cores: no wait at all.
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let seen = drive(&c, 0.1 * capacity, 0.5 * capacity / rate, rate, active).await;
        assert!(seen.iter().all(|(b, _)| *b == c.budget()), "{seen:?}");
        assert_eq!(c.window(), Duration::ZERO);
        assert!((c.busy() - 0.6).abs() < 0.01, "{}", c.busy());

        // Writing every update would take 130 %: it batches, and settles in the band.
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let seen = drive(&c, 0.1 * capacity, 1.2 * capacity / rate, rate, active).await;
        for (budget, busy) in &seen[30..] {
            assert!(
                (BUSY_LOW - 0.05..=BUSY_HIGH + 0.05).contains(busy),
                "busy {busy} (budget {budget}): {seen:?}"
            );
        }
        assert!(c.window() > Duration::ZERO, "it batches");
        let budgets: Vec<u64> = seen[40..].iter().map(|(b, _)| *b).collect();
        let (lo, hi) = (budgets.iter().min().unwrap(), budgets.iter().max().unwrap());
        assert!(*hi as f64 <= *lo as f64 * 1.6, "it settles: {budgets:?}");
    }

    /// A hub that makes half the writes its budget allows while batching still settles: once
    /// it batches it steps from its budget, not from the fewer writes it made, so it does not
    /// swing between batching hard and not at all.
    #[tokio::test(start_paused = true)]
    async fn the_measured_budget_settles_when_batching_makes_half_the_writes() {
        let cores = f64::from(cores());
        let capacity = cores * 1e9;
        let rate = 100_000.0 * cores;
        let active = 1_000 * cores as u64;
        for load in [0.9, 1.0, 1.2, 1.6] {
            let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
            let seen = drive_filled(
                &c,
                0.1 * capacity,
                load * capacity / rate,
                rate,
                active,
                0.5,
            )
            .await;
            let unbatched = seen[30..].iter().filter(|(_, _, w)| w.is_zero()).count();
            assert_eq!(
                unbatched, 0,
                "load {load}: it stops batching again: {seen:?}"
            );
            let budgets: Vec<u64> = seen[40..].iter().map(|(b, _, _)| *b).collect();
            let (lo, hi) = (budgets.iter().min().unwrap(), budgets.iter().max().unwrap());
            assert!(*hi as f64 <= *lo as f64 * 1.3, "load {load}: {budgets:?}");
        }
    }

    /// When the hub's other costs alone keep the cores busy, batching more never brings them
    /// within the band: the budget stops at the floor instead of falling for ever, and comes
    /// back up once the load goes.
    #[tokio::test(start_paused = true)]
    async fn the_measured_budget_stops_at_the_floor_and_recovers() {
        let cores = f64::from(cores());
        let capacity = cores * 1e9;
        let rate = 100_000.0 * cores;
        let active = 1_000 * cores as u64;
        let c = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let seen = drive(&c, 0.9 * capacity, 2_000.0, rate, active).await;
        let floor = WRITES_PER_CORE * cores as u64;
        assert!(seen[20..].iter().all(|(b, _)| *b == floor), "{seen:?}");
        assert_eq!(
            c.window(),
            Duration::from_secs_f64(active as f64 / floor as f64)
        );
        let seen = drive(&c, 0.05 * capacity, 2_000.0, 1_000.0, 10).await;
        assert_eq!(c.window(), Duration::ZERO);
        assert_eq!(
            seen.last().unwrap().0,
            *WRITE_BUDGET_RANGE.end() * cores as u64,
            "{seen:?}"
        );
    }

    /// A fixed budget stays fixed, however busy the cores are, and cluster nodes on one machine
    /// share it; a measured one ignores the sharing.
    #[tokio::test(start_paused = true)]
    async fn a_fixed_budget_stays_fixed_and_only_it_is_shared() {
        let cores = u64::from(cores());
        let fixed = Coalescing::new(Duration::from_millis(200), WriteBudget::PerCore(50_000));
        let seen = drive(&fixed, 2e9, 10_000.0, 1e6, 1_000).await;
        assert!(seen.iter().all(|(b, _)| *b == 50_000 * cores));
        assert!(fixed.busy() > 0.9, "measured all the same");
        fixed.share(2, 6);
        assert_eq!(fixed.budget(), shared_per_core(50_000, 2, 6) * cores);
        let auto = Coalescing::new(Duration::from_millis(200), WriteBudget::Auto);
        let before = auto.budget();
        auto.share(2, 6);
        assert_eq!(auto.budget(), before);
    }
}
