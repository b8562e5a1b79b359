//! Cluster mode: several nodes act as one hub through one Redis Stream.
//!
//! A publish on any node is appended to the stream (`XADD`), and answered only once Redis has
//! stored it. Every node follows the stream with one reader task and fans each entry out to its
//! own subscribers, in stream order; that is the only place updates enter a node's hub, so every
//! node holds the same history in the same order and `Last-Event-ID` works on any of them.
//! Redis is the engine: no consensus or gossip of our own.

mod clock;
mod machine;
mod stream;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

pub use clock::run as run_clock;
pub use machine::run as share_machine;

use crate::hub::{update, Draft, Hub, Invalid};

/// The stream every node appends to and reads.
pub const STREAM: &str = "ssehub:updates";

/// The stream keeps at least this many entries, whatever `--history-size`, so that a reader
/// that falls a little behind never finds its next entries trimmed away.
const MIN_STREAM_LEN: usize = 1000;

/// How long a publish waits for Redis before answering 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Subscription events waiting to be appended to the stream; more are dropped (and logged).
const RELAY_QUEUE: usize = 10_000;

/// A handle on this node's link to the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    /// For short commands; reconnects by itself. The reader has its own connection because
    /// `XREAD BLOCK` would hold up every command queued behind it.
    commands: ConnectionManager,
    hub: Hub,
    /// Whether Redis answers, as last seen by the reader; `/readyz` reports it.
    ready: AtomicBool,
    stream_len: usize,
    /// This process's name in the clock lease.
    node: String,
}

/// Why a publish through the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("Redis is unreachable, so the update was not stored ({0}); try again shortly")]
    Unavailable(String),
    /// From a single node's durable history (see `hub::PublishFailed`).
    #[error("{0}")]
    NotStored(String),
}

impl From<crate::hub::PublishFailed> for PublishError {
    fn from(e: crate::hub::PublishFailed) -> Self {
        match e {
            crate::hub::PublishFailed::Invalid(i) => PublishError::Invalid(i),
            e @ crate::hub::PublishFailed::NotStored(_) => PublishError::NotStored(e.to_string()),
        }
    }
}

/// Publishes a checked draft where this node's updates go: to the cluster's stream when there
/// is one (every node, this one included, delivers it from there), else to `hub` itself.
/// Returns the update's id. The one road for HTTP publishes and an embedding application's.
pub async fn publish_via(
    hub: &Hub,
    cluster: Option<&Cluster>,
    draft: Draft,
) -> Result<String, PublishError> {
    match cluster {
        Some(cluster) => {
            hub.check_matching(&draft.topics)?;
            cluster.publish(draft).await
        }
        None => Ok(hub.publish(draft).await?.id),
    }
}

impl Cluster {
    /// Connects to Redis, loads the retained history into `hub`, and starts following the
    /// stream. Returns once the hub holds the history, so subscribers accepted afterwards can
    /// replay it.
    pub async fn start(
        url: &str,
        hub: Hub,
        history_size: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Cluster> {
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
        let last = stream::load_history(&mut commands, &hub, history_size)
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the update stream from Redis: {e}"))?;
        tracing::info!(
            history = hub.history_len(),
            "cluster mode: joined through Redis at {shown}"
        );
        let cluster = Cluster {
            inner: Arc::new(Inner {
                client,
                commands,
                hub: hub.clone(),
                ready: AtomicBool::new(true),
                stream_len: history_size.max(MIN_STREAM_LEN),
                node: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
            }),
        };
        tokio::spawn(stream::follow(cluster.clone(), last, stop.clone()));
        cluster.relay_subscription_events(&hub, stop);
        Ok(cluster)
    }

    /// Whether Redis is reachable (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Relaxed)
    }

    /// Checks `draft` (a publisher's, or one of the hub's own subscription events relayed
    /// here: see [`Draft::validate_relayed`]), gives it its id, and appends it to the stream. `Ok` means Redis stored
    /// it; this node delivers it when its reader reaches it, like every other node.
    pub async fn publish(&self, draft: Draft) -> Result<String, PublishError> {
        draft.validate_relayed()?;
        let id = draft.id.clone().unwrap_or_else(update::new_id);
        let fields = stream::fields(&draft, &id);
        let mut cmd = redis::cmd("XADD");
        cmd.arg(STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.inner.stream_len)
            .arg("*")
            .arg(&fields);
        let mut conn = self.inner.commands.clone();
        match tokio::time::timeout(COMMAND_TIMEOUT, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(id),
            Ok(Err(e)) => Err(PublishError::Unavailable(e.to_string())),
            Err(_) => Err(PublishError::Unavailable("no answer in time".into())),
        }
    }

    fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Relaxed);
    }

    /// Subscription events take the same road as every other update, in the order the hub
    /// raised them.
    fn relay_subscription_events(&self, hub: &Hub, stop: CancellationToken) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Draft>(RELAY_QUEUE);
        hub.relay_subscription_events(Box::new(move |draft| {
            if tx.try_send(draft).is_err() {
                tracing::warn!("too many subscription events waiting for Redis: one dropped");
            }
        }));
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                let draft = tokio::select! {
                    d = rx.recv() => match d { Some(d) => d, None => return },
                    _ = stop.cancelled() => return,
                };
                if let Err(e) = cluster.publish(draft).await {
                    tracing::warn!("a subscription event was not published: {e}");
                }
            }
        });
    }
}
