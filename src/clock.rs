//! The demo clock: the seed's "Message: N - the time is …" every few seconds, published on
//! topic `time` through the same entry point as any HTTP publisher.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::hub::{Draft, Hub};

/// The topic the clock publishes on, and `/events/` streams.
pub const TOPIC: &str = "time";

/// The text of tick `n`, in local time with date, microseconds and UTC offset.
pub fn message(n: u64) -> String {
    let now = chrono::Local::now();
    format!(
        "Message: {n} - the time is {}",
        now.format("%Y-%m-%d %H:%M:%S%.6f %z")
    )
}

/// Ticks every `interval` until `stop` is cancelled. Message 0 goes out at start, as in the seed.
pub async fn run(hub: Hub, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let draft = Draft {
            topics: vec![TOPIC.to_owned()],
            data: message(n),
            ..Draft::default()
        };
        match hub.publish(draft) {
            Ok(p) => {
                tracing::info!("Sent message {n}");
                tracing::info!("Broadcast message to {} clients", p.delivered);
            }
            Err(e) => tracing::warn!("the clock could not publish: {e}"),
        }
        n += 1;
    }
}
