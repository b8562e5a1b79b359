//! The hub's clock: one time base for coalescing windows, held writes, the flusher's ticks and
//! the retune, so that they agree with each other and with tokio's timers.
//!
//! It reads `tokio::time::Instant`. In a build without tokio's `test-util` (every build users
//! run) that is `std::time::Instant::now()` and nothing more, so the flusher's many readings cost
//! what they did; in the crate's own tests it follows tokio's paused clock, so that a unit test
//! of a hub timer runs under `#[tokio::test(start_paused = true)]` and `tokio::time::advance`
//! instead of waiting in real time.

use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

/// The flusher's resolution: deadlines are kept per millisecond (tokio's timers have that
/// resolution too), and the subscribers whose windows open within the same millisecond are
/// written together (see `flusher`).
pub(crate) const TICK_NS: u64 = 1_000_000;

/// How far before the first reading the clock's zero lies. A paused test clock starts where
/// its runtime was made, which may be a little before the first reading in the process; with
/// this margin its readings still go forward from the start instead of sticking at the zero.
const MARGIN: Duration = Duration::from_secs(3600);

/// The instant [`now_ns`] counts from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let real = std::time::Instant::now();
        Instant::from_std(real.checked_sub(MARGIN).unwrap_or(real))
    })
}

/// Nanoseconds on the hub's clock; never 0 (which the hub's fields use for "never").
pub(crate) fn now_ns() -> u64 {
    ns_of(Instant::now())
}

/// `at` on the hub's clock.
pub(crate) fn ns_of(at: Instant) -> u64 {
    (at.saturating_duration_since(epoch()).as_nanos() as u64).max(1)
}

/// The instant a time on the hub's clock stands for, for tokio's timers.
pub(crate) fn instant_of(ns: u64) -> Instant {
    epoch() + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under paused time the clock moves only when the test moves it, and by exactly that much.
    #[tokio::test(start_paused = true)]
    async fn the_clock_follows_paused_time() {
        let before = now_ns();
        assert_eq!(now_ns(), before, "paused: no time passes by itself");
        tokio::time::advance(Duration::from_millis(7)).await;
        assert_eq!(now_ns() - before, 7 * TICK_NS);
        assert_eq!(ns_of(instant_of(before)), before);
    }

    /// A reading and the instant it stands for round-trip, so a timer armed for a hub time
    /// fires at that time.
    #[test]
    fn readings_and_instants_round_trip() {
        let now = now_ns();
        assert!(now > 1);
        assert_eq!(ns_of(instant_of(now + 5 * TICK_NS)), now + 5 * TICK_NS);
    }
}
