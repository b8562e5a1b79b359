//! Nodes that run on one machine share a fixed write budget.
//!
//! (Only `--write-budget N`: the default, `auto`, reads the machine's load itself, which the
//! other nodes' work is part of.) A fixed budget is per core (see `hub::coalesce`): past that
//! many writes a second it batches updates. Several nodes on one machine's cores would each take
//! the whole budget, together writing several times what those cores were budgeted for, in
//! windows too short to batch much (three nodes and Redis on two cores gave half the deliveries
//! per CPU-second of one node in the cluster benchmark). So every node tells Redis, every few
//! seconds, that it runs on its machine and how many cores it may use, and reads what the
//! others said: when the nodes there may use more cores than the machine has, each takes the
//! machine's share of its budget (the machine's cores over the nodes' cores together). Nodes
//! whose cores are their own (CPU limits or pinning, which the core count already reflects) keep
//! their whole budget. A machine is named by its kernel's boot id, which every process and
//! container on one running kernel shares; times are Redis's, so no node's clock matters.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{redis_stream, Cluster};

/// How often a node says it is there and counts the others.
const EVERY: Duration = Duration::from_secs(2);
/// A node not heard of for this long has gone (three missed rounds).
const FORGET_MS: u64 = 6_000;
/// How long the goodbye at shutdown may take.
const LEAVE: Duration = Duration::from_secs(1);

/// Stamps this node (`ARGV[1]`, as `node/cores`) with Redis's time in the machine's set
/// (`KEYS[1]`), forgets nodes not heard of for `ARGV[2]` ms, and returns the members left.
const STAMP: &str = "local t = redis.call('TIME') \
                     local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
                     redis.call('ZADD', KEYS[1], now, ARGV[1]) \
                     redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (now - tonumber(ARGV[2]))) \
                     redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2) \
                     return redis.call('ZRANGE', KEYS[1], 0, -1)";

/// Keeps this node's share of the machine's budget up to date until `stop`.
pub async fn run(cluster: Cluster, stop: CancellationToken) {
    if !cluster.inner.hub.write_budget_is_fixed() {
        // `auto` reads the machine's load, the other nodes' included: nothing to share.
        return;
    }
    let Some(redis) = cluster.redis() else {
        tracing::info!(
            "nodes on one machine share a fixed --write-budget only in Redis mode: this node \
             keeps its whole write budget"
        );
        return;
    };
    let (Some(machine), Some(machine_cores)) = (machine_id(), machine_cores()) else {
        tracing::info!("the kernel's boot id or core count cannot be read here: this node keeps its whole write budget");
        return;
    };
    let key = format!("ssehub:machine:{machine}");
    let me = format!("{}/{}", cluster.inner.node, crate::hub::cores());
    let mut ticker = tokio::time::interval(EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known = (1, 0);
    loop {
        let members = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = ticker.tick() => tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                m = stamp(redis, &key, &me) => m,
            },
        };
        let members = match members {
            Ok(m) => m,
            // The reader reports Redis trouble; the last share stands meanwhile.
            Err(e) => {
                tracing::debug!("nodes on this machine: {e}");
                continue;
            }
        };
        let nodes = members.len().max(1);
        let cores: u64 = members.iter().map(|m| member_cores(m)).sum();
        if (nodes, cores) != known {
            known = (nodes, cores);
            cluster.inner.hub.share_machine(machine_cores, cores);
            tracing::info!(
                "{nodes} ssehub node(s) of this cluster run on this machine ({cores} cores \
                 between them, {machine_cores} on the machine): this one allows itself {} \
                 socket writes a second before it batches",
                cluster.inner.hub.write_budget()
            );
        }
    }
    // Leave at once, so the others take their larger share now rather than in FORGET_MS.
    let mut conn = redis.commands.clone();
    let mut leave = redis::cmd("ZREM");
    leave.arg(&key).arg(&me);
    let _ = tokio::time::timeout(LEAVE, leave.query_async::<i64>(&mut conn)).await;
}

async fn stamp(redis: &redis_stream::Link, key: &str, me: &str) -> redis::RedisResult<Vec<String>> {
    let mut conn = redis.commands.clone();
    redis::cmd("EVAL")
        .arg(STAMP)
        .arg(1)
        .arg(key)
        .arg(me)
        .arg(FORGET_MS)
        .query_async(&mut conn)
        .await
}

/// The cores a member said it may use (1 if it said nothing readable).
fn member_cores(member: &str) -> u64 {
    member
        .rsplit_once('/')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// The running kernel's boot id (Linux), or `None` elsewhere.
fn machine_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// The machine's online cores, whatever this process may use of them (Linux).
fn machine_cores() -> Option<u64> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    count_cpus(online.trim())
}

/// Counts a kernel CPU list such as `0-3,6,8-9`.
fn count_cpus(list: &str) -> Option<u64> {
    let mut n = 0;
    for part in list.split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => {
                part.parse::<u64>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_and_members() {
        assert_eq!(count_cpus("0-1"), Some(2));
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,6,8-9"), Some(7));
        assert_eq!(count_cpus(""), None);
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(member_cores("1234-abcd/4"), 4);
        assert_eq!(member_cores("no-cores-said"), 1);
        assert_eq!(member_cores("x/0"), 1);
    }
}
