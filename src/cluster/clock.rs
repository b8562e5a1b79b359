//! The demo clock in cluster mode: one clock for the whole cluster, so the demo page shows one
//! sequence whichever node serves it.
//!
//! Every node's clock task tries to hold a lease in the engine (in Redis `SET … NX PX`; on
//! NATS a key in a JetStream key-value bucket whose values expire, written only if unchanged
//! since read); the holder renews it each tick and publishes through the cluster like any publisher. Message
//! numbers come from a counter in the engine, so they carry on when another node takes over
//! after the holder dies (at the latest when its lease expires).

use std::time::Duration;

use async_nats::jetstream::kv;
use tokio_util::sync::CancellationToken;

use super::{redis_stream, Cluster, Engine};
use crate::clock::{message, TOPIC};
use crate::hub::Draft;

const LEASE: &str = "ssehub:clock";
const COUNTER: &str = "ssehub:clock:n";

/// Extends the lease only if this node still holds it.
const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                     return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Gives the lease up only if this node holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

/// Ticks every `interval` until `stop`, publishing only while this node holds the lease.
pub async fn run(cluster: Cluster, interval: Duration, stop: CancellationToken) {
    let lease_ms = (interval * 3).max(Duration::from_secs(3)).as_millis() as u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut holding = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let held = match hold(&cluster, holding, Duration::from_millis(lease_ms)).await {
            Ok(h) => h,
            // The reader reports engine trouble; the lease lapses by itself if it lasts.
            Err(e) => {
                tracing::debug!("clock lease: {e}");
                continue;
            }
        };
        if held != holding {
            if held {
                tracing::info!("this node now runs the cluster's clock");
            } else {
                tracing::info!("another node runs the cluster's clock now");
            }
            holding = held;
        }
        if holding {
            tick(&cluster).await;
        }
    }
    if holding {
        // Hand the clock over at once rather than when the lease expires.
        release(&cluster).await;
    }
}

/// Renews the lease if held, else tries to take it. Returns whether this node holds it.
async fn hold(cluster: &Cluster, holding: bool, lease: Duration) -> Result<bool, String> {
    let node = &cluster.inner.node;
    match &cluster.inner.engine {
        Engine::Redis(redis) => redis_hold(redis, node, holding, lease.as_millis() as u64)
            .await
            .map_err(|e| e.to_string()),
        Engine::Nats(nats) => {
            let (leases, _) = nats.clock_buckets(lease).await?;
            nats_hold(leases, node).await
        }
    }
}

/// Gives the lease up, if this node still holds it.
async fn release(cluster: &Cluster) {
    let node = &cluster.inner.node;
    match &cluster.inner.engine {
        Engine::Redis(redis) => {
            let mut conn = redis.commands.clone();
            let _: redis::RedisResult<i64> = redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(LEASE)
                .arg(node)
                .query_async(&mut conn)
                .await;
        }
        Engine::Nats(nats) => {
            // Made at the first tick; a node that never ticked holds nothing.
            if let Ok((leases, _)) = nats.clock_buckets(Duration::ZERO).await {
                if let Ok(Some(entry)) = leases.entry(LEASE_KEY).await {
                    if entry.value == node.as_bytes() {
                        let _ = leases
                            .delete_expect_revision(LEASE_KEY, Some(entry.revision))
                            .await;
                    }
                }
            }
        }
    }
}

/// The next message number (counting from 0), from the cluster-wide counter.
async fn next_number(cluster: &Cluster) -> Result<u64, String> {
    match &cluster.inner.engine {
        Engine::Redis(redis) => {
            let mut conn = redis.commands.clone();
            let n: u64 = redis::cmd("INCR")
                .arg(COUNTER)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(n.saturating_sub(1))
        }
        Engine::Nats(nats) => {
            let (_, counter) = nats.clock_buckets(Duration::ZERO).await?;
            nats_next(counter).await
        }
    }
}

/// The lease's key in its bucket (the bucket's values expire `lease` after they were written).
const LEASE_KEY: &str = "lease";
/// The counter's key: the next message number.
const COUNTER_KEY: &str = "next";

/// Renews the lease if this node holds it, else takes it if nobody does. Each write names the
/// revision it read, so two nodes never both think they took it.
async fn nats_hold(leases: &kv::Store, node: &str) -> Result<bool, String> {
    let entry = leases.entry(LEASE_KEY).await.map_err(|e| e.to_string())?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            if e.value != node.as_bytes() {
                return Ok(false);
            }
            let renewed = leases
                .update(LEASE_KEY, node.to_owned().into(), e.revision)
                .await;
            Ok(renewed.is_ok())
        }
        // Never taken, expired, or given up.
        _ => Ok(leases
            .create(LEASE_KEY, node.to_owned().into())
            .await
            .is_ok()),
    }
}

/// Takes the next number from the counter (only the lease's holder does, once a tick).
async fn nats_next(counter: &kv::Store) -> Result<u64, String> {
    let entry = counter
        .entry(COUNTER_KEY)
        .await
        .map_err(|e| e.to_string())?;
    let written = match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let n: u64 = std::str::from_utf8(&e.value)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            counter
                .update(COUNTER_KEY, (n + 1).to_string().into(), e.revision)
                .await
                .map(|_| n)
                .map_err(|e| e.to_string())
        }
        _ => counter
            .create(COUNTER_KEY, "1".into())
            .await
            .map(|_| 0)
            .map_err(|e| e.to_string()),
    };
    written
}

async fn redis_hold(
    redis: &redis_stream::Link,
    node: &str,
    holding: bool,
    lease_ms: u64,
) -> redis::RedisResult<bool> {
    let mut conn = redis.commands.clone();
    if holding {
        let renewed: i64 = redis::cmd("EVAL")
            .arg(RENEW)
            .arg(1)
            .arg(LEASE)
            .arg(node)
            .arg(lease_ms)
            .query_async(&mut conn)
            .await?;
        if renewed == 1 {
            return Ok(true);
        }
    }
    let taken: Option<String> = redis::cmd("SET")
        .arg(LEASE)
        .arg(node)
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .query_async(&mut conn)
        .await?;
    Ok(taken.is_some())
}

/// One message, numbered by the cluster-wide counter.
async fn tick(cluster: &Cluster) {
    let n = match next_number(cluster).await {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!("clock counter: {e}");
            return;
        }
    };
    let draft = Draft {
        topics: vec![TOPIC.to_owned()],
        data: message(n),
        ..Draft::default()
    };
    match cluster.publish(draft).await {
        Ok(_) => tracing::info!("Sent message {n}"),
        Err(e) => tracing::warn!("the clock could not publish: {e}"),
    }
}
