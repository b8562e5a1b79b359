//! Hands memory back to the operating system after subscribers leave, and after bursts of
//! new connections.
//!
//! glibc's allocator keeps what a burst of connections freed inside its arenas (one per
//! thread that allocated), so a hub that once held thousands of subscribers (or idle HTTP/2
//! connections, ≈ 20 KiB each) would keep their memory for good. Connecting takes memory
//! for a moment too (a TLS handshake's certificate, key exchange and transcript, a request's
//! routing), freed between the allocations that stay, so the pages it leaves free are kept
//! as well: after 2,000 TLS subscribers connecting 500 at a time, ≈ 1 KiB per subscriber.
//! Once enough connections have come or gone (or subscribers left) and the comings and goings
//! have paused for a tick, the hub asks glibc to release free pages (`malloc_trim`), off the
//! runtime's threads since it walks every arena (holding each arena's lock: 0.1–2 ms on a heap
//! of tens of megabytes, up to tens after mass departures). Waiting for the pause trims once
//! after a burst rather than at every tick of it, and a steady churn (which anyone can cause
//! by connecting and closing) trims only every [`STEADY`] changes.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Hub;

/// How often the hub looks at how many subscribers and connections came and went.
const EVERY: Duration = Duration::from_secs(1);
/// Changes (a subscriber gone, a connection opened, a connection closed) since the last trim
/// for another to be worth it, once they pause.
const CHANGES: u64 = 100;
/// Changes after which the hub trims even if they have not paused (a churn that never stops).
const STEADY: u64 = 100 * CHANGES;

/// Trims the allocator's free memory when at least [`CHANGES`] changes happened since the
/// previous time and none in the last tick (or [`STEADY`] whatever the last tick), until
/// `stop`.
pub async fn run(hub: Hub, stop: CancellationToken) {
    let changes = || {
        let m = hub.metrics();
        let subscribers = m
            .subscribers_total
            .load(Relaxed)
            .saturating_sub(m.subscribers_connected.load(Relaxed));
        let closed = m.connections_closed.load(Relaxed);
        // Connections opened since the start: those open now and those closed.
        let opened = m.connections_open.load(Relaxed) + closed;
        subscribers + closed + opened
    };
    let mut trimmed_at = changes();
    let mut previous = trimmed_at;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = changes();
        let since = now.saturating_sub(trimmed_at);
        let paused = now == previous;
        previous = now;
        if (since >= CHANGES && paused) || since >= STEADY {
            trimmed_at = now;
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}
