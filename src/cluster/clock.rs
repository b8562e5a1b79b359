//! The demo clock in cluster mode: one clock for the whole cluster, so the demo page shows one
//! sequence whichever node serves it.
//!
//! Every node's clock task tries to hold a lease in the engine (in Redis `SET … NX PX`); the
//! holder renews it each tick and publishes through the cluster like any publisher. Message
//! numbers come from a counter in the engine, so they carry on when another node takes over
//! after the holder dies (at the latest when its lease expires).

use std::time::Duration;

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
        let held = match hold(&cluster, holding, lease_ms).await {
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
async fn hold(cluster: &Cluster, holding: bool, lease_ms: u64) -> Result<bool, String> {
    let node = &cluster.inner.node;
    match &cluster.inner.engine {
        Engine::Redis(redis) => redis_hold(redis, node, holding, lease_ms)
            .await
            .map_err(|e| e.to_string()),
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
    }
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
