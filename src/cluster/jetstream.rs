//! The update log on NATS JetStream: one stream replicated over a quorum of NATS servers, so
//! that losing any one machine (NATS included) loses neither the cluster nor an update answered
//! `200`.
//!
//! A publish waits for JetStream's acknowledgement, which comes once a majority of the stream's
//! replicas hold it; the update's id is its `Nats-Msg-Id`, so a retry within the duplicate
//! window is stored once. Each node reads the stream with an ordered consumer, in stream
//! sequence, and remembers the last sequence it applied to resume from it, with the identities
//! of the last messages applied to notice sequences NATS lost and gave to other messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, consumer, kv, stream};
use futures_util::StreamExt;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use super::applied::Applied;
use super::{fields, Cluster, PublishError, COMMAND_TIMEOUT, MIN_STREAM_LEN};
use crate::hub::{Draft, Hub};

/// The stream every node appends to and reads, and its one subject.
pub const STREAM: &str = "ssehub-updates";
const SUBJECT: &str = "ssehub.updates";
/// A publish retried within this long (through any node) is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The clock's lease (one key, expiring: see `clock.rs`) and its message counter (kept).
const LEASE_BUCKET: &str = "ssehub-clock";
const COUNTER_BUCKET: &str = "ssehub-clock-count";
/// How long the history at start may take to arrive before the node gives up starting.
const REPLAY_WAIT: Duration = Duration::from_secs(30);
/// How long a starting node tries to make or find its stream before it gives up and exits.
const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// How often a node checks that the stream answers (for `/readyz`).
const PROBE: Duration = Duration::from_secs(1);
/// How long one pull of the ordered consumer waits on the server. The consumer's idle heartbeat
/// is half of it, and two heartbeats missed make the consumer anew: a consumer whose server died
/// (or whose stream changed leader) is replaced within about this long. The client's default
/// (30 s, 15 s heartbeats) left every node deaf for 30 s after one NATS server was killed.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// A reader behind the stream (by the probe's count) that got nothing for this long makes its
/// consumer anew. The client's own recovery can wait out retries of requests to a dead server
/// (measured: ~30 s after the server a node was connected to was killed).
const STALL: Duration = Duration::from_secs(3);
/// Delays between attempts to read again after the consumer failed.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A node's link to JetStream.
pub(super) struct Link {
    client: async_nats::Client,
    js: jetstream::Context,
    config: stream::Config,
    /// Whether the stream answered the last probe.
    answers: AtomicBool,
    /// The stream's last sequence at the last probe: the reader compares it with its own to
    /// notice a consumer that stopped delivering without an error.
    newest: AtomicU64,
    /// When the stream the probe last saw was made (unix ns): another value than the reader's
    /// means NATS lost the stream and it was made anew, to be read from its start.
    created: AtomicI64,
    /// Set (not 0) when the stream may have lost messages this node applied, with why (bits
    /// of [`Why`]): the connection to NATS broke (set by the client's event callback, before
    /// it reconnects: the servers may have restarted without their newest messages), the probe
    /// found the stream ending before `applied`, or the probe got an answer again after none.
    /// The reader checks what it applied before it applies anything more, and watches what it
    /// reads next.
    unchecked: Arc<AtomicU8>,
    /// The last sequence the reader applied, for the probe.
    applied: AtomicU64,
    /// The clock's buckets, made or bound when the clock first asks.
    clock: OnceCell<(kv::Store, kv::Store)>,
}

/// Why the reader checks what it applied: bits of `Link::unchecked`.
struct Why;

impl Why {
    const DISCONNECTED: u8 = 1;
    const BEHIND: u8 = 2;
    const ANSWERS_AGAIN: u8 = 4;
    /// Only when no other reason is known: a check that failed is made again.
    const FAILED: u8 = 8;

    /// The reasons of `bits`, for the log.
    fn describe(bits: u8) -> String {
        let reasons: Vec<&str> = [
            (Why::DISCONNECTED, "the connection to NATS broke"),
            (Why::BEHIND, "the stream ended before this node's position"),
            (
                Why::ANSWERS_AGAIN,
                "NATS JetStream answered again after it did not",
            ),
        ]
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, reason)| *reason)
        .collect();
        if reasons.is_empty() {
            "a check that failed, made again".to_owned()
        } else {
            reasons.join("; ")
        }
    }
}

/// What the reader needs to carry on where the start left off.
pub(super) struct Reader {
    messages: consumer::pull::Ordered,
    last: u64,
    /// When the stream being read was made (unix ns), as `Link::created`.
    created: i64,
    applied: Applied,
    /// A sequence the watch found holding another message than the one applied there.
    moved: Option<u64>,
}

impl Link {
    /// Connects to the NATS servers, makes or binds the stream, and loads the retained history
    /// into `hub`. Returns the link and the reader, positioned after the history.
    pub(super) async fn connect(
        urls: &[String],
        replicas: usize,
        hub: &Hub,
        history_size: usize,
        stop: &CancellationToken,
    ) -> anyhow::Result<(Link, Reader)> {
        let shown = urls
            .iter()
            .map(|u| crate::config::redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let unchecked = Arc::new(AtomicU8::new(0));
        let on_event = unchecked.clone();
        let options = async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                if matches!(event, async_nats::Event::Disconnected) {
                    on_event.fetch_or(Why::DISCONNECTED, Relaxed);
                }
                std::future::ready(())
            })
            .connection_timeout(Duration::from_secs(2))
            // Reconnect for ever, quickly at first: the reader and `/readyz` report the outage.
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                (MIN_BACKOFF * 2u32.saturating_pow(attempts.min(8) as u32)).min(MAX_BACKOFF)
            });
        let client = options.connect(urls).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach NATS at {shown} ({e}): start it, or check --nats (SSEHUB_NATS)"
            )
        })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(COMMAND_TIMEOUT);
        let config = stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![SUBJECT.to_owned()],
            max_messages: history_size.max(MIN_STREAM_LEN) as i64,
            discard: stream::DiscardPolicy::Old,
            num_replicas: replicas,
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        // A JetStream cluster that has just started answers nothing until its servers have
        // elected a leader (a few seconds): a node started with it tries again for a while
        // rather than exit (the first connection above must have succeeded). Bounded by
        // STARTUP_WAIT in all, and by the stop signal.
        let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
        // The first error (named in the final one) and the last one logged.
        let mut first: Option<String> = None;
        let mut warned: Option<String> = None;
        let mut stream = loop {
            let attempt = tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    return Err(anyhow::anyhow!(
                        "stopped while waiting for the stream {STREAM} in NATS JetStream"
                    ))
                }
                r = tokio::time::timeout_at(deadline, js.get_or_create_stream(config.clone())) => r,
            };
            let e = match attempt {
                Ok(Ok(stream)) => break stream,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in time".to_owned(),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(anyhow::anyhow!(
                    "cannot make or find the stream {STREAM} in NATS JetStream at {shown} ({}): \
                     is JetStream enabled (nats-server -js), and are there --nats-replicas \
                     ({replicas}) servers in its cluster?",
                    match first.as_deref() {
                        Some(f) if f != e => format!("{f}; then {e}"),
                        _ => e.clone(),
                    }
                ));
            }
            // Once per kind of error, not once a second.
            if warned.as_deref() != Some(e.as_str()) {
                tracing::warn!(
                    "the stream {STREAM} cannot be made or found yet ({e}); trying again for \
                     up to {}s",
                    left.as_secs().max(1)
                );
                first.get_or_insert_with(|| e.clone());
                warned = Some(e);
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1).min(left)) => {}
            }
        };
        let info = stream
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the stream {STREAM} from NATS: {e}"))?;
        if info.config.num_replicas != replicas {
            tracing::warn!(
                "the stream {STREAM} exists with {} replica(s), not --nats-replicas {replicas}: \
                 it is kept as it is",
                info.config.num_replicas
            );
        }
        let (first, newest) = (info.state.first_sequence, info.state.last_sequence);
        let created = unix_ns(info.created);
        // The newest `history_size` messages, or none.
        let start = if history_size == 0 || newest == 0 {
            newest + 1
        } else {
            newest
                .saturating_sub(history_size as u64 - 1)
                .max(first)
                .max(1)
        };
        let mut reader = Reader {
            messages: open(&stream, start)
                .await
                .map_err(|e| anyhow::anyhow!("cannot read the stream {STREAM} from NATS: {e}"))?,
            last: start - 1,
            created,
            applied: Applied::new(),
            moved: None,
        };
        // Loaded before any subscriber is accepted, so nobody receives them as live updates.
        while reader.last < newest {
            let message = tokio::time::timeout(REPLAY_WAIT, reader.messages.next()).await;
            match message {
                Ok(Some(Ok(m))) => reader.take(hub, &m),
                Ok(Some(Err(e))) => anyhow::bail!("cannot read the stream {STREAM} from NATS: {e}"),
                Ok(None) | Err(_) => anyhow::bail!(
                    "the history in the stream {STREAM} did not arrive from NATS within {}s",
                    REPLAY_WAIT.as_secs()
                ),
            }
        }
        tracing::info!(
            history = hub.history_len(),
            "cluster mode: joined through NATS JetStream at {shown}"
        );
        let link = Link {
            client,
            js,
            config,
            answers: AtomicBool::new(true),
            newest: AtomicU64::new(newest),
            created: AtomicI64::new(reader.created),
            unchecked,
            applied: AtomicU64::new(reader.last),
            clock: OnceCell::new(),
        };
        Ok((link, reader))
    }

    /// Whether this node can publish: connected, and the stream answered the last probe.
    pub(super) fn is_ready(&self) -> bool {
        self.answers.load(Relaxed)
            && self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Appends the update to the stream; `Ok` once JetStream acknowledged it (a quorum of the
    /// stream's replicas hold it). A duplicate of an update stored within the window is
    /// acknowledged as such and not stored again: `Ok` too.
    pub(super) async fn publish(&self, draft: &Draft, id: &str) -> Result<(), PublishError> {
        // Refused at once while disconnected: the client would otherwise hold the message and
        // send it on reconnection, storing an update answered 503 long after.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(PublishError::Unconfirmed("not connected to NATS".into()));
        }
        let payload: HashMap<&str, String> = fields::fields(draft, id).into_iter().collect();
        let payload = serde_json::to_vec(&payload).unwrap_or_default();
        let message = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(id);
        let acked = async {
            // The client measures the message (fields and headers) against the max_payload its
            // server announced, and refuses it before sending: a server given a larger one
            // would close the connection of every update on it.
            let ack = self
                .js
                .send_publish(SUBJECT, message)
                .await
                .map_err(|e| match e.kind() {
                    PublishErrorKind::MaxPayloadExceeded => PublishError::TooLarge(e.to_string()),
                    _ => PublishError::Unconfirmed(e.to_string()),
                })?;
            ack.await
                .map_err(|e| PublishError::Unconfirmed(e.to_string()))
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, acked).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => Err(PublishError::Unconfirmed(
                "no acknowledgement in time".into(),
            )),
        }
    }

    /// The clock's lease and counter buckets, made on first use. The lease expires `lease`
    /// after it was last written.
    pub(super) async fn clock_buckets(
        &self,
        lease: Duration,
    ) -> Result<&(kv::Store, kv::Store), String> {
        self.clock
            .get_or_try_init(|| async {
                let lease = self.bucket(LEASE_BUCKET, lease).await?;
                let counter = self.bucket(COUNTER_BUCKET, Duration::ZERO).await?;
                Ok((lease, counter))
            })
            .await
    }

    /// Makes a key-value bucket holding one value per key, or binds it if another node made it.
    /// Its stream is made here, laid out as the client's own `create_key_value` would: that
    /// one first asks for the account's details, which a 2.9 server answers in a form the
    /// client no longer reads.
    async fn bucket(&self, name: &str, max_age: Duration) -> Result<kv::Store, String> {
        let config = stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            num_replicas: self.config.num_replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        };
        // Made by another node perhaps, with another lease (another --clock-interval): kept.
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| format!("bucket {name}: {e}"))?;
        self.js
            .get_key_value(name)
            .await
            .map_err(|e| format!("bucket {name}: {e}"))
    }
}

impl Reader {
    /// Applies one message to the local hub, after the last one applied; a jump in sequence
    /// means the stream dropped messages this node had not read (counted and logged).
    fn take(&mut self, hub: &Hub, message: &jetstream::Message) {
        let Ok(info) = message.info() else {
            tracing::warn!("skipped a JetStream message without its stream sequence");
            return;
        };
        let sequence = info.stream_sequence;
        if sequence <= self.last {
            // Delivered again by a consumer made anew: applied already.
            return;
        }
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID));
        let identity = self
            .applied
            .identity(id.map(|v| v.as_str()), &message.payload);
        if sequence > self.last + 1 && self.last > 0 {
            hub.metrics().cluster_gaps.fetch_add(1, Relaxed);
            tracing::error!(
                after = self.last,
                next = sequence,
                "messages of the update stream were removed from NATS JetStream before this node \
                 read them: its subscribers missed those updates (the node was cut off from NATS, \
                 or fell behind, for longer than the stream's length lasts; raise --history-size \
                 to keep more)"
            );
        }
        self.last = sequence;
        if self.applied.record(sequence, identity) {
            let at = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            apply(hub, sequence, &message.payload, at);
        }
    }
}

/// Applies one message's update. Messages get the same checks as a publish (the stream is
/// writable by anything with access to NATS), except that the hub's own subscription events
/// keep their reserved topic and type; what fails them is skipped, on every node alike.
fn apply(hub: &Hub, sequence: u64, payload: &[u8], at: u64) {
    let parsed = serde_json::from_slice::<HashMap<String, String>>(payload)
        .ok()
        .and_then(|f| fields::parse(|name| f.get(name).cloned()));
    match parsed {
        Some((draft, id)) => match draft.validate_relayed() {
            Ok(()) => {
                hub.apply(draft, id, at);
            }
            Err(e) => tracing::warn!(sequence, "skipped a stream message: {e}"),
        },
        None => tracing::warn!(sequence, "skipped a stream message ssehub did not write"),
    }
}

/// An ordered consumer from `start` (a stream sequence) on.
async fn open(stream: &stream::Stream, start: u64) -> Result<consumer::pull::Ordered, String> {
    let config = consumer::pull::OrderedConfig {
        deliver_policy: consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start.max(1),
        },
        max_expires: PULL_EXPIRES,
        ..Default::default()
    };
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// Follows the stream until `stop`. The ordered consumer makes itself anew after short
/// troubles; when it gives up, this opens another from the last sequence applied, with
/// backoff, so nothing published meanwhile through other nodes is missed.
pub(super) async fn follow(cluster: Cluster, mut reader: Reader, stop: CancellationToken) {
    let Some(link) = cluster.nats() else { return };
    let hub = &cluster.inner.hub;
    let mut backoff = MIN_BACKOFF;
    let mut watch = tokio::time::interval(PROBE);
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = Instant::now();
    loop {
        let next = tokio::select! {
            m = reader.messages.next() => Some(m),
            _ = watch.tick() => None,
            _ = stop.cancelled() => return,
        };
        // Why the reader reads the stream again: a check (logged as what happened) or a
        // consumer lost (a warning).
        let (problem, lost) = match next {
            // While the stream may have lost what this node applied, nothing more is applied
            // before the check (in `reopen`): this message is read again after it.
            Some(Some(Ok(_))) | None if link.unchecked.load(Relaxed) != 0 => (
                format!(
                    "checking that the update stream in NATS JetStream still holds what this \
                     node delivered ({})",
                    Why::describe(link.unchecked.load(Relaxed))
                ),
                false,
            ),
            Some(Some(Ok(message))) => {
                reader.take(hub, &message);
                link.applied.store(reader.last, Relaxed);
                progress = Instant::now();
                backoff = MIN_BACKOFF;
                continue;
            }
            None if link.created.load(Relaxed) != reader.created => (
                "lost the update stream in NATS JetStream: the stream was made anew (NATS lost \
                 its data)"
                    .to_owned(),
                true,
            ),
            None => {
                let compared = moved_since_check(link, &mut reader).await;
                if compared.is_some() {
                    // The comparison's own time is not the consumer's silence.
                    progress = Instant::now();
                }
                if let Some(Some(moved)) = compared {
                    (
                        format!(
                            "the update stream in NATS JetStream now holds another message at \
                             sequence {moved} than the one this node delivered there (its \
                             servers came back and dropped a message no majority held)"
                        ),
                        false,
                    )
                } else if link.newest.load(Relaxed) <= reader.last {
                    progress = Instant::now();
                    continue;
                } else if progress.elapsed() < STALL {
                    continue;
                } else {
                    (
                        format!(
                            "lost the update stream in NATS JetStream: the consumer delivered \
                             nothing for {}s while the stream is at sequence {} and this node at \
                             {}",
                            STALL.as_secs(),
                            link.newest.load(Relaxed),
                            reader.last
                        ),
                        true,
                    )
                }
            }
            Some(Some(Err(e))) => (
                format!("lost the update stream in NATS JetStream: {e}"),
                true,
            ),
            Some(None) => (
                "lost the update stream in NATS JetStream: the consumer ended".to_owned(),
                true,
            ),
        };
        if lost {
            tracing::warn!("{problem}; retrying with backoff");
        } else {
            tracing::info!("{problem}; reading it again after the check");
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match reopen(link, hub, &mut reader).await {
                Ok(messages) => {
                    reader.messages = messages;
                    link.applied.store(reader.last, Relaxed);
                    progress = Instant::now();
                    tracing::info!("reading the update stream in NATS JetStream again");
                    break;
                }
                Err(e) => tracing::debug!("the update stream: {e}"),
            }
        }
    }
}

/// A consumer after the last sequence applied. A stream made anew (NATS lost its data; told by
/// its creation time) is read from its start, or its first messages would be skipped. The same
/// stream that no longer holds some messages this node applied (its servers lost their newest
/// writes, all down at once, and may have given those sequences to later messages) is read
/// again from the first such sequence, delivering only what was not delivered yet; the lost
/// updates are counted as a gap and logged.
async fn reopen(
    link: &Link,
    hub: &Hub,
    reader: &mut Reader,
) -> Result<consumer::pull::Ordered, String> {
    // Cleared first: a disconnection during the check asks for another.
    let why = link.unchecked.swap(0, Relaxed);
    let checked = async {
        let mut stream = link
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let info = stream.info().await.map_err(|e| e.to_string())?;
        let (created, first, newest) = (
            unix_ns(info.created),
            info.state.first_sequence,
            info.state.last_sequence,
        );
        if created != reader.created {
            tracing::warn!(
                was = reader.last,
                "the update stream in NATS JetStream was made anew (NATS lost its data): reading \
                 it from its start"
            );
            reader.created = created;
            reader.last = 0;
            reader.applied.clear();
            reader.moved = None;
        } else if let Some(changed) = {
            // The earlier of what the watch found and what the check finds now.
            let found = first_changed(&stream, &reader.applied, first).await?;
            match (reader.moved.take(), found) {
                (Some(m), Some(f)) => Some(m.min(f)),
                (m, f) => m.or(f),
            }
        } {
            hub.metrics().cluster_gaps.fetch_add(1, Relaxed);
            tracing::error!(
                was = reader.last,
                from = changed,
                now = newest,
                "the update stream in NATS JetStream lost messages this node had delivered (its \
                 servers went down together before writing them to disk): those updates are \
                 lost for nodes that had not read them; reading the stream again from the first \
                 lost sequence, delivering only updates not delivered yet"
            );
            let from = reader.applied.rewind(changed, reader.last);
            if from > changed {
                hub.metrics().cluster_gaps.fetch_add(1, Relaxed);
                tracing::error!(
                    skipped_from = changed,
                    skipped_to = from - 1,
                    "the update stream in NATS JetStream changed further back than this node \
                     remembers what it delivered: those sequences are not read again, and the \
                     updates the stream holds there now are lost for this node's subscribers \
                     (read again, those it delivered already would be delivered twice)"
                );
            }
            reader.last = from - 1;
        }
        // Held now, but perhaps not for long: compared again while the stream settles.
        reader.applied.watch(Instant::now());
        Ok::<_, String>(stream)
    };
    match checked.await {
        Ok(stream) => open(&stream, reader.last + 1).await,
        Err(e) => {
            // Checked again at the next attempt, for the same reasons (at least one).
            let why = if why == 0 { Why::FAILED } else { why };
            link.unchecked.fetch_or(why, Relaxed);
            Err(e)
        }
    }
}

/// The first sequence this node applied whose message the stream no longer holds (or holds
/// another message at), if any. What the stream lost is its newest messages, so the messages
/// it still holds come before those it lost: the newest applied is checked first (one request
/// when nothing was lost), then the boundary is found by halving. Sequences before `first`
/// (trimmed since, by the stream's length) cannot be checked and count as held.
async fn first_changed(
    stream: &stream::Stream,
    applied: &Applied,
    first: u64,
) -> Result<Option<u64>, String> {
    let entries = applied.range_since(first);
    if entries.is_empty() {
        return Ok(None);
    }
    if holds(stream, applied, applied.nth(entries.end - 1)).await? {
        return Ok(None);
    }
    // Those before `low` held, those from `high` on changed.
    let (mut low, mut high) = (entries.start, entries.end - 1);
    while low < high {
        let middle = (low + high) / 2;
        if holds(stream, applied, applied.nth(middle)).await? {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(Some(applied.nth(low).0))
}

/// When a comparison of the watch (see `Applied`) is due: `Some` with the first watched
/// sequence whose message the stream no longer holds, if any (kept for `reopen`, the earliest
/// found so far). One request per watched message, `WATCHED` at most; a comparison without an
/// answer in time is made again a second later. A message missing because the stream's length
/// trimmed it since counts as held.
async fn moved_since_check(link: &Link, reader: &mut Reader) -> Option<Option<u64>> {
    let watched = reader.applied.due(Instant::now())?;
    let applied = &reader.applied;
    let check = async {
        let mut stream = link
            .js
            .get_stream(STREAM)
            .await
            .map_err(|e| e.to_string())?;
        let first = stream.cached_info().state.first_sequence;
        for &entry in watched.iter().filter(|e| e.0 >= first) {
            if !holds(&stream, applied, entry).await? {
                let first = stream.info().await.map_err(|e| e.to_string())?;
                if entry.0 >= first.state.first_sequence {
                    return Ok(Some(entry.0));
                }
            }
        }
        Ok::<_, String>(None)
    };
    let moved = match tokio::time::timeout(COMMAND_TIMEOUT, check).await {
        Ok(Ok(moved)) => moved,
        Ok(Err(e)) => {
            tracing::debug!("comparing the update stream again: {e}");
            reader.applied.retry(watched, Instant::now() + PROBE);
            None
        }
        Err(_) => {
            reader.applied.retry(watched, Instant::now() + PROBE);
            None
        }
    };
    match moved {
        Some(m) => reader.moved = Some(reader.moved.map_or(m, |was| was.min(m))),
        // The ring back to its size outside a watch, if this was its last comparison.
        None => reader.applied.trim(),
    }
    Some(moved)
}

/// Whether the stream holds, at `sequence`, the message of this `identity`.
async fn holds(
    stream: &stream::Stream,
    applied: &Applied,
    (sequence, identity): (u64, u64),
) -> Result<bool, String> {
    match stream.get_raw_message(sequence).await {
        Ok(m) => {
            let id = m.headers.get(async_nats::header::NATS_MESSAGE_ID);
            Ok(applied.identity(id.map(|v| v.as_str()), &m.payload) == identity)
        }
        Err(e) if matches!(e.kind(), stream::LastRawMessageErrorKind::NoMessageFound) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// A stream's creation time as a number, to tell one stream from another of the same name.
fn unix_ns(t: async_nats::datetime::DateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Asks the stream for its state every second until `stop`, for `/readyz`: a stream without a
/// leader (a quorum of its servers lost) cannot store a publish even while this node is
/// connected. A stream that is gone (NATS lost its data) is made anew. Logs each transition.
pub(super) async fn probe(cluster: Cluster, stop: CancellationToken) {
    let Some(link) = cluster.nats() else { return };
    let mut ticker = tokio::time::interval(PROBE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Read before the stream's state: what the reader applied then was in the stream then,
        // so a stream ending before it lost messages (a later value could be ahead of the state).
        let applied = link.applied.load(Relaxed);
        let answer = tokio::select! {
            a = tokio::time::timeout(COMMAND_TIMEOUT, link.js.get_stream(STREAM)) => a,
            _ = stop.cancelled() => return,
        };
        let result = match answer {
            Ok(Ok(stream)) => {
                let info = stream.cached_info();
                let (created, newest) = (unix_ns(info.created), info.state.last_sequence);
                link.created.store(created, Relaxed);
                link.newest.store(newest, Relaxed);
                if newest < applied {
                    link.unchecked.fetch_or(Why::BEHIND, Relaxed);
                }
                Ok(())
            }
            Ok(Err(e)) if not_found(&e) => {
                // Not found (NATS lost its data): made anew, so that publishes work again.
                link.js
                    .get_or_create_stream(link.config.clone())
                    .await
                    .map(|_| ())
                    .map_err(|_| e.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer in time".to_owned()),
        };
        let was = link.answers.swap(result.is_ok(), Relaxed);
        match result {
            Ok(()) if !was => {
                // Its servers may have been away without this node's connection breaking
                // (frozen, or unreachable for less than the client's pings): they can come back
                // serving an unconfirmed tail and drop it, as after a restart. So the reader
                // checks and watches, as after a disconnection.
                link.unchecked.fetch_or(Why::ANSWERS_AGAIN, Relaxed);
                tracing::info!("NATS JetStream is back");
            }
            Err(e) if was => tracing::warn!("lost NATS JetStream: {e}; publishes answer 503"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_is_logged_with_what_asked_for_it() {
        assert_eq!(
            Why::describe(Why::ANSWERS_AGAIN),
            "NATS JetStream answered again after it did not"
        );
        assert_eq!(
            Why::describe(Why::DISCONNECTED | Why::BEHIND),
            "the connection to NATS broke; the stream ended before this node's position"
        );
        assert_eq!(
            Why::describe(Why::FAILED),
            "a check that failed, made again"
        );
    }
}
