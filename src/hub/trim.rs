//! Hands memory back to the operating system after subscribers leave, and after bursts of
//! new connections.
//!
//! glibc's allocator keeps what a burst of connections freed inside its arenas (one per
//! thread that allocated), so a hub that once held thousands of subscribers (or idle HTTP/2
//! connections, ≈ 20 KiB each) would keep their memory for good. Connecting takes memory
//! for a moment too (a TLS handshake's certificate, key exchange and transcript, a request's
//! routing), freed between the allocations that stay, so the pages it leaves free are kept
//! as well: after 2,000 TLS subscribers connecting 500 at a time, ≈ 1 KiB per subscriber.
//! After enough connections have come or gone (or subscribers left), the hub asks glibc to
//! release free pages (`malloc_trim`), off the runtime's threads since it walks every arena.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Hub;

/// How often the hub looks at how many subscribers left.
const EVERY: Duration = Duration::from_secs(2);
/// Subscribers gone and connections come or gone since the last trim for another to be
/// worth it.
const LEFT: u64 = 100;

/// Trims the allocator's free memory whenever at least [`LEFT`] subscribers went or
/// connections came or went since the previous time, until `stop`.
pub async fn run(hub: Hub, stop: CancellationToken) {
    let left = || {
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
    let mut trimmed_at = left();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let now = left();
        if now.saturating_sub(trimmed_at) >= LEFT {
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
