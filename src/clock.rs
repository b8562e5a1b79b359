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

/// The number in the text of a tick (`data: Message: N - …` in an update's event-stream
/// bytes).
pub fn number_in(encoded: &[u8]) -> Option<u64> {
    encoded.split(|&b| b == b'\n').find_map(|line| {
        let rest = line.strip_prefix(b"data: Message: ")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !rest[digits..].starts_with(b" - ") {
            return None;
        }
        std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
    })
}

/// Ticks every `interval` until `stop` is cancelled. Message 0 goes out at start, as in the
/// seed, unless the hub's history (kept across restarts) holds earlier ticks: then the
/// numbering carries on after the newest.
pub async fn run(hub: Hub, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = hub
        .newest_with(|u| {
            (u.topics.first().map(String::as_str) == Some(TOPIC))
                .then(|| number_in(&u.encoded))
                .flatten()
        })
        .map_or(0, |last| last + 1);
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
        match hub.publish(draft).await {
            Ok(p) => {
                tracing::info!("Sent message {n}");
                tracing::info!("Broadcast message to {} clients", p.delivered);
            }
            Err(e) => tracing::warn!("the clock could not publish: {e}"),
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_number_is_read_back_from_a_tick() {
        let tick = crate::sse::encode_event("urn:x", None, None, &message(41));
        assert_eq!(number_in(&tick), Some(41));
        for other in ["Message: x - y", "Message: 4", "hello", "Message: 5-"] {
            let e = crate::sse::encode_event("urn:x", None, None, other);
            assert_eq!(number_in(&e), None, "{other}");
        }
    }
}
