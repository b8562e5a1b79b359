//! Nodes that run on one machine share its write budget.
//!
//! A hub budgets its socket writes per core (`--write-budget`, see `hub::coalesce`): past that
//! many writes a second it batches updates. Several nodes on one machine would each take the
//! whole budget, together writing several times what the machine's cores were budgeted for,
//! in windows too short to batch much (three nodes and Redis on two cores gave half the
//! deliveries per CPU-second of one node in the cluster benchmark; with the budget split by
//! hand, three quarters). So every node tells Redis, every few seconds, that it runs on its
//! machine, and counts the nodes that said the same lately; its budget is divided by that
//! count. A machine is named by its kernel's boot id, which every process and container on one
//! running kernel shares and no other machine has; the times are the machine's own clock, so
//! they compare.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::Cluster;

/// How often a node says it is there and counts the others.
const EVERY: Duration = Duration::from_secs(2);
/// A node not heard of for this long has gone (three missed rounds).
const FORGET_MS: u64 = 6_000;

/// Keeps this node's share of the machine's budget up to date until `stop`.
pub async fn run(cluster: Cluster, stop: CancellationToken) {
    let Some(machine) = machine_id() else {
        tracing::debug!("no kernel boot id here: the write budget is not shared");
        return;
    };
    let key = format!("ssehub:machine:{machine}");
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = 1;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => break,
        }
        let nodes = match count(&cluster, &key).await {
            Ok(n) => n.max(1),
            // The reader reports Redis trouble; the last count stands meanwhile.
            Err(e) => {
                tracing::debug!("nodes on this machine: {e}");
                continue;
            }
        };
        if nodes != known {
            known = nodes;
            cluster.inner.hub.share_machine(nodes);
            tracing::info!(
                "{nodes} ssehub node(s) of this cluster run on this machine: this one allows \
                 itself {} socket writes a second before it batches",
                cluster.inner.hub.write_budget()
            );
        }
    }
    // Leave at once, so the others take their larger share now rather than in FORGET_MS.
    let mut conn = cluster.inner.commands.clone();
    let _: redis::RedisResult<i64> = redis::cmd("ZREM")
        .arg(&key)
        .arg(&cluster.inner.node)
        .query_async(&mut conn)
        .await;
}

/// Says this node is on the machine and returns how many nodes are.
async fn count(cluster: &Cluster, key: &str) -> redis::RedisResult<u64> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut conn = cluster.inner.commands.clone();
    let (nodes,): (u64,) = redis::pipe()
        .atomic()
        .cmd("ZADD")
        .arg(key)
        .arg(now)
        .arg(&cluster.inner.node)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(key)
        .arg("-inf")
        .arg(format!("({}", now.saturating_sub(FORGET_MS)))
        .ignore()
        .cmd("ZCARD")
        .arg(key)
        .cmd("PEXPIRE")
        .arg(key)
        .arg(FORGET_MS * 2)
        .ignore()
        .query_async(&mut conn)
        .await?;
    Ok(nodes)
}

/// The running kernel's boot id (Linux), or `None` elsewhere.
fn machine_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}
