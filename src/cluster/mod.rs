//! Cluster mode: several nodes act as one hub through one shared log, a Redis Stream or a
//! NATS JetStream stream (the engine).
//!
//! A publish on any node is appended to the log, and answered only once the engine has stored
//! it. Every node follows the log with one reader task and fans each entry out to its own
//! subscribers, in log order; that is the only place updates enter a node's hub, so every node
//! holds the same history in the same order and `Last-Event-ID` works on any of them. The
//! engine does the storing and ordering: no consensus or gossip of our own.

mod applied;
mod clock;
mod fields;
mod jetstream;
mod machine;
mod redis_stream;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use clock::run as run_clock;
pub use machine::run as share_machine;

use crate::hub::{update, Draft, Hub, Invalid};

/// The log keeps at least this many entries, whatever `--history-size`, so that a reader
/// that falls a little behind never finds its next entries trimmed away.
const MIN_STREAM_LEN: usize = 1000;

/// How long a publish waits for the engine before answering 503.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

/// Subscription events waiting to be appended to the stream; more are dropped (and logged).
const RELAY_QUEUE: usize = 10_000;

/// A handle on this node's link to the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    hub: Hub,
    /// Whether the engine answers, as last seen by the reader; `/readyz` reports it.
    ready: AtomicBool,
    /// This process's name in the clock lease.
    node: String,
    engine: Engine,
}

/// The shared log this node is linked to: every engine-specific call goes through here.
enum Engine {
    Redis(redis_stream::Link),
    Nats(Box<jetstream::Link>),
}

/// Why a publish through the cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("Redis is unreachable, so the update was not stored ({0}); try again shortly")]
    Unavailable(String),
    /// JetStream did not acknowledge the update: it may or may not be stored, and a retry
    /// with the same id is stored once either way.
    #[error(
        "NATS JetStream did not confirm that the update is stored ({0}); try again shortly, with \
         the same id (a retry within two minutes is stored once)"
    )]
    Unconfirmed(String),
    /// Larger than the NATS servers let one message be (their `max_payload`): a retry
    /// fails the same way.
    #[error(
        "the update is too large for NATS ({0}): the servers' max_payload (1 MB unless \
         configured) bounds an update with its topics, id and other fields; publish less, or \
         raise max_payload in the nats-server configuration"
    )]
    TooLarge(String),
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
        let (link, last) = redis_stream::Link::connect(url, &hub, history_size).await?;
        let cluster = Cluster::new(hub.clone(), Engine::Redis(link));
        tokio::spawn(redis_stream::follow(cluster.clone(), last, stop.clone()));
        cluster.relay_subscription_events(&hub, stop);
        Ok(cluster)
    }

    /// Connects to the NATS servers at `urls`, makes or binds the JetStream stream (with
    /// `replicas` copies), loads the retained history into `hub`, and starts following the
    /// stream. Returns once the hub holds the history, as [`Cluster::start`] does.
    pub async fn start_nats(
        urls: &[String],
        replicas: usize,
        hub: Hub,
        history_size: usize,
        stop: CancellationToken,
    ) -> anyhow::Result<Cluster> {
        let (link, reader) =
            jetstream::Link::connect(urls, replicas, &hub, history_size, &stop).await?;
        let cluster = Cluster::new(hub.clone(), Engine::Nats(Box::new(link)));
        tokio::spawn(jetstream::follow(cluster.clone(), reader, stop.clone()));
        tokio::spawn(jetstream::probe(cluster.clone(), stop.clone()));
        cluster.relay_subscription_events(&hub, stop);
        Ok(cluster)
    }

    fn new(hub: Hub, engine: Engine) -> Cluster {
        Cluster {
            inner: Arc::new(Inner {
                hub,
                ready: AtomicBool::new(true),
                node: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
                engine,
            }),
        }
    }

    /// Whether the engine is reachable (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        match &self.inner.engine {
            Engine::Redis(_) => self.inner.ready.load(Relaxed),
            Engine::Nats(link) => link.is_ready(),
        }
    }

    /// Checks `draft` (a publisher's, or one of the hub's own subscription events relayed
    /// here: see [`Draft::validate_relayed`]), gives it its id, and appends it to the log. `Ok`
    /// means the engine stored it; this node delivers it when its reader reaches it, like every
    /// other node.
    pub async fn publish(&self, draft: Draft) -> Result<String, PublishError> {
        draft.validate_relayed()?;
        let id = draft.id.clone().unwrap_or_else(update::new_id);
        match &self.inner.engine {
            Engine::Redis(link) => link.publish(&draft, &id).await?,
            Engine::Nats(link) => link.publish(&draft, &id).await?,
        }
        Ok(id)
    }

    /// The engine's name, for messages.
    fn engine_name(&self) -> &'static str {
        match &self.inner.engine {
            Engine::Redis(_) => "Redis",
            Engine::Nats(_) => "NATS JetStream",
        }
    }

    /// The Redis link, in Redis mode.
    fn redis(&self) -> Option<&redis_stream::Link> {
        match &self.inner.engine {
            Engine::Redis(link) => Some(link),
            Engine::Nats(_) => None,
        }
    }

    /// The JetStream link, in NATS mode.
    fn nats(&self) -> Option<&jetstream::Link> {
        match &self.inner.engine {
            Engine::Nats(link) => Some(link),
            Engine::Redis(_) => None,
        }
    }

    fn set_ready(&self, ready: bool) {
        self.inner.ready.store(ready, Relaxed);
    }

    /// Subscription events take the same road as every other update, in the order the hub
    /// raised them.
    fn relay_subscription_events(&self, hub: &Hub, stop: CancellationToken) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Draft>(RELAY_QUEUE);
        let engine = self.engine_name();
        hub.relay_subscription_events(Box::new(move |draft| {
            if tx.try_send(draft).is_err() {
                tracing::warn!("too many subscription events waiting for {engine}: one dropped");
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
