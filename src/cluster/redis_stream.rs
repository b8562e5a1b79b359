//! The update stream in Redis: how an update is written as a stream entry and read back, the
//! history loaded at start, and the reader that follows the stream for as long as the node runs.
//!
//! The reader is the only way updates enter a node's hub in cluster mode, and it applies
//! entries one at a time in stream order: that is what gives every node the same order.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::{fields, Cluster, PublishError, COMMAND_TIMEOUT, MIN_STREAM_LEN};
use crate::hub::{Draft, Hub};
use crate::metrics::Metrics;

/// The stream every node appends to and reads.
pub const STREAM: &str = "ssehub:updates";

/// How long one `XREAD` waits for new entries before asking again.
const BLOCK: Duration = Duration::from_secs(5);
/// Entries taken per read.
const BATCH: usize = 1000;
/// Reconnection delays: doubled after each failure, between these bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A node's connections to Redis.
pub(super) struct Link {
    client: redis::Client,
    /// For short commands; reconnects by itself. The reader has its own connection because
    /// `XREAD BLOCK` would hold up every command queued behind it.
    pub(super) commands: ConnectionManager,
    stream_len: usize,
}

impl Link {
    /// Connects to Redis and loads the retained history into `hub`. Returns the link and the
    /// stream id to follow from.
    pub(super) async fn connect(
        url: &str,
        hub: &Hub,
        history_size: usize,
    ) -> anyhow::Result<(Link, String)> {
        let shown = crate::config::redact_url(url);
        // A Redis error says its cause and also gives it as its source: taken as text, so
        // that the cause is said once.
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("--redis {shown:?}: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let mut commands = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach Redis at {shown} ({e}): start it, or check --redis (SSEHUB_REDIS)"
                )
            })?;
        let last = load_history(&mut commands, hub, history_size)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the update stream from Redis: {e}"))?;
        tracing::info!(
            history = hub.history_len(),
            "cluster mode: joined through Redis at {shown}"
        );
        let link = Link {
            client,
            commands,
            stream_len: history_size.max(MIN_STREAM_LEN),
        };
        Ok((link, last))
    }

    /// Appends the update to the stream; `Ok` once Redis stored it.
    pub(super) async fn publish(&self, draft: &Draft, id: &str) -> Result<(), PublishError> {
        let fields = fields::fields(draft, id);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.stream_len)
            .arg("*")
            .arg(&fields);
        let mut conn = self.commands.clone();
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(PublishError::Unavailable(e.to_string())),
            Err(_) => Err(PublishError::Unavailable("no answer in time".into())),
        }
    }
}

/// An entry back as an update and its id; `None` if it was not written by ssehub.
fn parse(entry: &StreamId) -> Option<(Draft, String)> {
    fields::parse(|name| entry.get(name))
}

/// A stream entry id as `(milliseconds, sequence)`, for comparing.
fn position(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Applies one entry to the local hub. Redis's time of the entry stands for when the update
/// was accepted, the same on every node.
///
/// Entries get the same checks as a publish (the stream is writable by anything with access to
/// Redis, and an id or type with a line break would inject fields into every stream), except
/// that the hub's own subscription events keep their reserved topic and type; what fails them
/// is skipped, on every node alike.
fn apply(hub: &Hub, entry: &StreamId) {
    match parse(entry) {
        Some((draft, id)) => match draft.validate_relayed() {
            Ok(()) => {
                hub.apply(draft, id, position(&entry.id).0);
            }
            Err(e) => tracing::warn!(entry = %entry.id, "skipped a stream entry: {e}"),
        },
        None => tracing::warn!(entry = %entry.id, "skipped a stream entry ssehub did not write"),
    }
}

/// Loads the newest `history_size` entries into `hub`, oldest first, before any subscriber is
/// accepted (so nobody receives them as live updates). Returns the stream id to read after.
async fn load_history(
    conn: &mut ConnectionManager,
    hub: &Hub,
    history_size: usize,
) -> redis::RedisResult<String> {
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(history_size.max(1))
        .query_async(conn)
        .await?;
    let last = reply
        .ids
        .first()
        .map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
    if history_size > 0 {
        for entry in reply.ids.iter().rev() {
            apply(hub, entry);
        }
    }
    Ok(last)
}

/// Follows the stream from `last` until `stop`: reads, applies in order, and on any Redis
/// error reconnects with backoff and resumes where it was, so nothing published meanwhile
/// through other nodes is missed. Each transition is logged once.
pub(super) async fn follow(cluster: Cluster, mut last: String, stop: CancellationToken) {
    let Some(link) = cluster.redis() else { return };
    let mut conn = None;
    let mut backoff = MIN_BACKOFF;
    let mut lost = false;
    // Was the last batch full? (Then this node may be far behind: see `read_batch`.)
    let mut full = false;
    loop {
        let check = conn.is_none() || full;
        let read = read_batch(
            &link.client,
            cluster.inner.hub.metrics(),
            &mut conn,
            &mut last,
            check,
        );
        let result = tokio::select! {
            r = read => r,
            _ = stop.cancelled() => return,
        };
        match result {
            Ok(entries) => {
                if lost {
                    tracing::info!("Redis is back");
                    lost = false;
                    cluster.set_ready(true);
                }
                backoff = MIN_BACKOFF;
                full = entries.len() >= BATCH;
                for entry in &entries {
                    apply(&cluster.inner.hub, entry);
                    last.clone_from(&entry.id);
                }
            }
            Err(e) => {
                conn = None;
                if !lost {
                    tracing::warn!("lost Redis: {e}; retrying with backoff");
                    lost = true;
                    cluster.set_ready(false);
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// One blocking read after `last`, connecting first if needed. With `check` (for a fresh
/// connection or after a full batch), it first looks for a gap.
async fn read_batch(
    client: &redis::Client,
    metrics: &Metrics,
    conn: &mut Option<MultiplexedConnection>,
    last: &mut String,
    check: bool,
) -> redis::RedisResult<Vec<StreamId>> {
    let c = match conn {
        Some(c) => c,
        None => {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
            let mut fresh = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            check_restart(&mut fresh, last).await?;
            conn.insert(fresh)
        }
    };
    // Entries after `last` can only have been trimmed away unread if this node was cut off
    // (a fresh connection) or is far behind (its last batch was full: the stream keeps at
    // least BATCH entries, so a trim past `last` leaves a full batch after it). Asking only
    // then keeps the check off the path of a reader that keeps up; asking before the read,
    // not after, keeps a trim that comes after the read from counting.
    if check {
        match trimmed_past(c, last).await {
            Ok(false) => {}
            Ok(true) => {
                metrics.cluster_gaps.fetch_add(1, Relaxed);
                tracing::error!(
                    after = %last,
                    "entries of the update stream were removed from Redis before this node read \
                     them: its subscribers missed those updates (the node was cut off from Redis, \
                     or fell behind, for longer than the stream's length lasts; raise \
                     --history-size to keep more)"
                );
            }
            Err(e) => tracing::debug!("could not check the stream for a gap: {e}"),
        }
    }
    let reply: Option<StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(BATCH)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(last.as_str())
        .query_async(c)
        .await?;
    let entries: Vec<StreamId> = reply
        .into_iter()
        .flat_map(|r| r.keys)
        .flat_map(|k| k.ids)
        .collect();
    Ok(entries)
}

/// Whether entries after `last` were removed from the stream before this node read them.
///
/// The stream is trimmed from its oldest end, so entries after `last` can only have gone if
/// the stream now starts after `last` *and* it ever lost entries: Redis 7 counts the entries
/// ever added, and a stream holding all it was given (one Redis made anew after restarting
/// without its data, say, whose ids are all above `last`) lost nothing. (Its
/// `max-deleted-entry-id` counts `XDEL` only, not trimming.) It can be one entry early:
/// `last` trimmed with its successor still there. A node that has read nothing yet (`0-0`)
/// cannot tell, and says no; so does a missing stream.
async fn trimmed_past(conn: &mut MultiplexedConnection, last: &str) -> redis::RedisResult<bool> {
    if position(last) == (0, 0) {
        return Ok(false);
    }
    let exists: bool = redis::cmd("EXISTS").arg(STREAM).query_async(conn).await?;
    if !exists {
        return Ok(false);
    }
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(STREAM)
        .query_async(conn)
        .await?;
    let number = |key: &str| {
        info.get(key)
            .and_then(|v| redis::from_redis_value_ref::<u64>(v).ok())
    };
    let first = match info.get("first-entry") {
        Some(redis::Value::Array(entry)) => entry
            .first()
            .and_then(|id| redis::from_redis_value_ref::<String>(id).ok()),
        _ => None,
    };
    let lost_some = match (number("entries-added"), number("length")) {
        (Some(added), Some(length)) => added > length,
        // Before Redis 7: only the position tells.
        _ => true,
    };
    Ok(lost_some && first.is_some_and(|f| position(&f) > position(last)))
}

/// A Redis that restarted without its data holds a new stream, whose ids may be below where
/// this node left off: then read the new stream from its start, or its first entries would be
/// skipped.
async fn check_restart(
    conn: &mut MultiplexedConnection,
    last: &mut String,
) -> redis::RedisResult<()> {
    let newest: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(STREAM)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let behind = match newest.ids.first() {
        Some(e) => position(&e.id) < position(last),
        None => position(last) > (0, 0),
    };
    if behind {
        tracing::warn!(
            was = %last,
            "the update stream in Redis starts over (Redis lost its data): reading it from its start"
        );
        *last = "0-0".to_owned();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_as_numbers() {
        assert!(position("9-5") < position("10-0"));
        assert!(position("10-1") > position("10-0"));
        assert_eq!(position("0-0"), (0, 0));
    }

    #[test]
    fn fields_round_trip() {
        let draft = Draft {
            topics: vec!["a".into(), "b/{x}".into()],
            data: "line 1\nline 2".into(),
            id: None,
            event_type: Some("t".into()),
            retry: Some(42),
            private: true,
            alt_data: Some("{\"@context\": 1}".into()),
        };
        let f = fields::fields(&draft, "urn:x");
        let entry = StreamId {
            id: "1-0".into(),
            map: f
                .into_iter()
                .map(|(k, v)| (k.to_owned(), redis::Value::BulkString(v.into_bytes())))
                .collect(),
            ..Default::default()
        };
        let (back, id) = parse(&entry).unwrap();
        assert_eq!(id, "urn:x");
        assert_eq!(back.topics, draft.topics);
        assert_eq!(back.data, draft.data);
        assert_eq!(back.event_type.as_deref(), Some("t"));
        assert_eq!(back.retry, Some(42));
        assert!(back.private);
        assert_eq!(back.alt_data, draft.alt_data);
    }
}
