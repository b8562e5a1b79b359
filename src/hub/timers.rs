//! The hub's own background work: handing freed memory back, retuning the coalescing window,
//! and the heartbeat. The hub owns these timers so that whoever runs a hub (the server, an
//! embedding application, a test under paused time) starts them with one call.

use std::future::Future;
use std::time::Duration;

use tokio::time::{interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{lifetime_sweep, trim, Hub, HEARTBEAT_TICKS};

/// How often the coalescing window is retuned from what the hub delivered.
const RETUNE_EVERY: Duration = Duration::from_millis(100);

impl Hub {
    /// Runs the hub's timers until `stop`: the allocator trim (see `trim`), the coalescing
    /// retune every 100 ms while `--coalesce` is on, the end of streams that reached
    /// `--max-stream-lifetime`, and, with `heartbeat` (`--heartbeat`), a comment line on every
    /// stream that had nothing to send for that long. Spawn it once per hub.
    pub fn run_timers(
        &self,
        heartbeat: Option<Duration>,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let hub = self.clone();
        async move {
            tokio::join!(
                trim::run(hub.clone(), stop.clone()),
                retune(&hub, &stop),
                lifetimes(&hub, &stop),
                beat(&hub, heartbeat, &stop),
            );
        }
    }
}

async fn retune(hub: &Hub, stop: &CancellationToken) {
    if hub.shared.config.coalesce.is_zero() {
        return;
    }
    let mut tick = interval(RETUNE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // How late the tick ran is the runtime's own lag: a hub whose tasks wait that long
            // for a worker is behind, whatever the CPU figures say.
            at = tick.tick() => hub.retune_coalescing(at.elapsed()),
            _ = stop.cancelled() => return,
        }
    }
}

/// Ends the streams past their lifetime, and those past their token's `exp` whose clients
/// stopped reading (see `Subscriber::ending_at`): every [`lifetime_sweep`], or every second
/// without `--max-stream-lifetime`.
async fn lifetimes(hub: &Hub, stop: &CancellationToken) {
    let every = hub
        .shared
        .config
        .max_stream_lifetime
        .map_or(Duration::from_secs(1), lifetime_sweep);
    let mut tick = interval(every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => hub.end_lifetimes(),
            _ = stop.cancelled() => return,
        }
    }
}

/// The heartbeat ticks [`HEARTBEAT_TICKS`] times per interval (see there why).
async fn beat(hub: &Hub, every: Option<Duration>, stop: &CancellationToken) {
    let Some(every) = every else { return };
    let period = every / u32::from(HEARTBEAT_TICKS);
    let mut tick = interval(period.max(Duration::from_millis(1)));
    // The first tick is immediate: a stream that just opened is not quiet yet.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => hub.heartbeat(),
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Poll;

    use tokio::time::Instant;

    use super::*;
    use crate::hub::tests::{publish, subscribe};
    use crate::hub::{HubConfig, SubscriberStream, Wire};
    use crate::sse;

    /// The next bytes the stream sends, however long (in paused time) that takes.
    async fn next(stream: &mut SubscriberStream) -> Option<Wire> {
        poll_fn(|cx| stream.poll_wire(cx)).await
    }

    /// An idle stream hears a heartbeat one `--heartbeat` after it last had something to send
    /// (the tick's four steps add up to exactly that when nothing was queued since), and the
    /// timers end with `stop`.
    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_gets_a_heartbeat_after_one_interval() {
        let hub = Hub::new(HubConfig::default());
        let mut stream = subscribe(&hub);
        assert!(
            matches!(next(&mut stream).await, Some(Wire::Data(_))),
            "the opening"
        );
        let stop = CancellationToken::new();
        let timers = tokio::spawn(hub.run_timers(Some(Duration::from_secs(20)), stop.clone()));
        let start = Instant::now();
        let Some(Wire::Data(beat)) = next(&mut stream).await else {
            panic!("no heartbeat")
        };
        assert_eq!(&beat[..], sse::HEARTBEAT);
        assert_eq!(start.elapsed(), Duration::from_secs(20));

        // Something to send restarts the count: the next one is a whole interval later.
        tokio::time::sleep(Duration::from_secs(7)).await;
        publish(&hub, 1);
        assert!(matches!(next(&mut stream).await, Some(Wire::Data(_))));
        let published = Instant::now();
        let Some(Wire::Data(beat)) = next(&mut stream).await else {
            panic!("no heartbeat")
        };
        assert_eq!(&beat[..], sse::HEARTBEAT);
        // Published at 27 s, between two ticks (every 5 s): the fourth tick after it, at 45 s,
        // is ¾ to 1 interval later.
        assert_eq!(published.elapsed(), Duration::from_secs(18));

        stop.cancel();
        timers.await.unwrap();
    }

    /// While the hub delivers more than its write budget, the retune (every 100 ms) opens a
    /// coalescing window; without `--coalesce` it never runs.
    #[tokio::test(start_paused = true)]
    async fn the_retune_opens_a_window_past_the_write_budget() {
        let bound = Duration::from_millis(50);
        for coalesce in [bound, Duration::ZERO] {
            let hub = Hub::new(HubConfig {
                coalesce,
                write_budget: crate::hub::WriteBudget::PerCore(1),
                ..HubConfig::default()
            });
            let _stream = subscribe(&hub);
            let stop = CancellationToken::new();
            let timers = tokio::spawn(hub.run_timers(None, stop.clone()));
            publish(&hub, 200);
            assert_eq!(hub.shared.coalescing.window(), Duration::ZERO);
            // Past the second tick (the first, at once, finds too short a span to measure).
            tokio::time::sleep(RETUNE_EVERY + Duration::from_millis(1)).await;
            assert_eq!(hub.shared.coalescing.window(), coalesce);
            stop.cancel();
            timers.await.unwrap();
        }
    }

    /// A stream reaches `--max-stream-lifetime` (less up to a tenth at random) through the
    /// hub's sweep, every 100 ms here: never later than the bound, and what was queued
    /// goes out before its end.
    #[tokio::test(start_paused = true)]
    async fn a_stream_ends_at_its_lifetime_through_the_sweep() {
        let lifetime = Duration::from_secs(100);
        let hub = Hub::new(HubConfig {
            max_stream_lifetime: Some(lifetime),
            ..HubConfig::default()
        });
        let stop = CancellationToken::new();
        let timers = tokio::spawn(hub.run_timers(None, stop.clone()));
        let start = Instant::now();
        let mut stream = subscribe(&hub);
        assert!(matches!(next(&mut stream).await, Some(Wire::Data(_))));
        // Before 0.9 × 100 s less a sweep's period of 0.1 s, nothing ends it.
        tokio::time::sleep(Duration::from_secs(88)).await;
        assert!(!stream.ending());
        publish(&hub, 1);
        assert!(matches!(next(&mut stream).await, Some(Wire::Data(_))));
        publish(&hub, 1);
        tokio::time::sleep_until(start + lifetime).await;
        assert!(stream.ending(), "ended within the bound");
        assert!(
            matches!(next(&mut stream).await, Some(Wire::Data(_))),
            "what was queued"
        );
        assert!(next(&mut stream).await.is_none());
        assert_eq!(
            hub.shared
                .metrics
                .dropped_count(crate::metrics::DropReason::Lifetime),
            1
        );
        stop.cancel();
        timers.await.unwrap();
    }

    /// A stream that is sent nothing is left alone when there is no heartbeat.
    #[tokio::test(start_paused = true)]
    async fn without_a_heartbeat_an_idle_stream_hears_nothing() {
        let hub = Hub::new(HubConfig::default());
        let mut stream = subscribe(&hub);
        assert!(matches!(next(&mut stream).await, Some(Wire::Data(_))));
        let stop = CancellationToken::new();
        let timers = tokio::spawn(hub.run_timers(None, stop.clone()));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(poll_fn(|cx| Poll::Ready(stream.poll_wire(cx)))
            .await
            .is_pending());
        stop.cancel();
        timers.await.unwrap();
    }
}
