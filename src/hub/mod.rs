//! The fan-out core. It knows nothing of HTTP: updates come in through [`Hub::publish`],
//! subscribers through [`Hub::subscribe`], and each subscriber leaves with a
//! [`SubscriberStream`] of event-stream bytes. In cluster mode updates come in through
//! `Hub::apply` instead, from the reader of the cluster's stream (see `crate::cluster`), which
//! shares the encode, store and fan-out step with [`Hub::publish`].
//!
//! One lock orders everything: a publish takes its place in the history and is offered to every
//! matching subscriber while holding it, and a subscribe snapshots its replay and registers
//! while holding it. That is what makes replay exact: every update is either in a new
//! subscriber's replay or in its queue, never both and never neither. The lock is held only to
//! push pointers; encoding happens before it and writing to sockets after it: on each
//! subscriber's own task, or, for a few idle subscribers of a hub within its write budget, by
//! the publishing thread itself (see `subscriber`'s direct writes), or, once the hub batches, by
//! the flusher when a held subscriber's window opens (see `flusher`).

mod clock;
mod coalesce;
mod flusher;
mod history;
pub(crate) mod selector;
pub mod store;
mod subscriber;
pub(crate) mod subscriptions;
mod teardown;
mod templates;
mod timers;
mod trim;
pub(crate) mod update;
mod writer;
mod writer_state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub(crate) use coalesce::cores;
pub use coalesce::{WriteBudget, WRITES_PER_CORE};
use history::History;
pub use history::ReplayFrom;
use selector::TopicUrl;
pub use selector::{
    any_matches, MatchType, Matcher, Selector, SelectorCache, UrlPatternSelector, MAX_SELECTOR_LEN,
    MAX_TEMPLATE_EXPRESSIONS,
};
use subscriber::HEARTBEAT_TICKS;
pub use subscriber::{DirectSink, Sent, SubscriberStream, Wire, LAST_WRITES};
use subscriber::{Offer, Subscriber};
use subscriptions::SubscriberInfo;
pub use teardown::{StreamCancel, Teardown};
pub use templates::MAX_MATCHING_WORK;
pub use update::{Draft, Invalid, SharedUpdate, Update, MAX_TOPICS};

use crate::metrics::{DropReason, Metrics, TemplateRefusal};

/// The most subscribers one publish writes to directly, on the publishing thread; the others'
/// own tasks write, spread over the cores. Small fan-outs (one topic among many, S6) are then
/// written without waking any task, and a wide one never holds its publisher for long.
const DIRECT_MAX: usize = 32;

/// The most bytes one subscription's topics may add up to. An idle subscriber holds its
/// topics for as long as it stays (and the hub indexes them): thousands of connections with a
/// dozen 4 KiB topics each would hold hundreds of megabytes. Real subscriptions name a few
/// topics of a few hundred bytes.
pub const MAX_SUBSCRIPTION_BYTES: usize = 16 * 1024;

/// What the hub needs to know, taken from the `serve` flags.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Updates kept for replay (whole hub).
    pub history_size: usize,
    /// Bytes of updates kept for replay (as [`Update::weight`] counts them).
    pub history_bytes: usize,
    /// Updates a subscriber may lag behind before it is dropped.
    pub subscriber_queue: usize,
    /// The longest wait for further updates after a write to a subscriber, so that they go
    /// out together (see `coalesce`); zero writes each update at once.
    pub coalesce: Duration,
    /// Socket writes a second before the hub batches: measured, or fixed per core.
    pub write_budget: WriteBudget,
    /// Subscribers connected at once; more are refused.
    pub max_subscribers: usize,
    /// Publish Mercure subscription events and keep what the subscription API lists.
    pub subscription_events: bool,
    /// The longest a stream lives (then it ends cleanly and its client resumes); a token's
    /// `exp` ends it earlier. `None`: no bound. Enforced by the hub's timers
    /// ([`Hub::run_timers`]).
    pub max_stream_lifetime: Option<Duration>,
    /// Bytes the compiled URI templates may take (`--template-memory`).
    pub template_memory: usize,
    /// Anonymous subscribers may use URI templates (`--anonymous-templates`).
    pub anonymous_templates: bool,
    /// The hub's URL (`--resource-identifier`): relative URL patterns and topics are read
    /// against it; `None`: against [`selector::DEFAULT_BASE`].
    pub resource_identifier: Option<url::Url>,
}

/// How often the hub looks for streams that reached a `lifetime` (`--max-stream-lifetime`): a
/// thousandth of it, between 100 ms and a second. A visit of every subscriber (as a heartbeat
/// tick makes; ≈ 0.1 ms at 20,000 subscribers) instead of a timer per stream, which an idle
/// stream would hold for all its life; fine enough that the tenth by which ends are spread
/// (streams opened together come back over a while, not at once) is a hundred sweeps or more,
/// not a handful of waves.
/// [`clock::now_ns`] `d` from now, saturating (a lifetime may be given in centuries).
fn after_ns(d: Duration) -> u64 {
    clock::now_ns().saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

pub(crate) fn lifetime_sweep(lifetime: Duration) -> Duration {
    (lifetime / 1000).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            history_size: 10_000,
            history_bytes: 256 << 20,
            subscriber_queue: 1000,
            coalesce: Duration::ZERO,
            write_budget: WriteBudget::Auto,
            max_subscribers: 10_000,
            subscription_events: false,
            max_stream_lifetime: None,
            template_memory: 64 << 20,
            anonymous_templates: true,
            resource_identifier: None,
        }
    }
}

/// A handle on the hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

pub(crate) struct HubShared {
    core: Mutex<Core>,
    config: HubConfig,
    pub(crate) metrics: Arc<Metrics>,
    selectors: SelectorCache,
    /// Whether any subscriber holds a URI template (set under `core`): a publish takes the
    /// lock a first time, to collect the templates to test, only then.
    has_templates: AtomicBool,
    /// Whether URL patterns are among them (set with it): a publish then reads its topics as
    /// URLs, before taking the lock.
    has_url_patterns: AtomicBool,
    closing: AtomicBool,
    /// Where subscription events go instead of the local publish path (cluster mode).
    relay: OnceLock<Relay>,
    pub(crate) coalescing: coalesce::Coalescing,
    flusher: flusher::Flusher,
    /// The durable history's writer (see `writer`): with one, every publish takes its place
    /// there, after its update is on disk; without (`--data-dir none`, cluster mode), at once.
    writer: Option<std::sync::mpsc::Sender<writer::Msg>>,
    /// Bytes of the publishes waiting for the writer (see [`writer::MAX_QUEUED_BYTES`]).
    queued_bytes: AtomicUsize,
}

/// Takes a subscription event the hub wants published, in cluster mode.
pub type Relay = Box<dyn Fn(Draft) + Send + Sync>;

type SubscriberSet = HashMap<u64, Arc<Subscriber>>;

struct Core {
    history: History,
    next_seq: u64,
    next_subscriber: u64,
    /// Subscribers with at least one exact selector, by topic.
    exact: HashMap<String, SubscriberSet>,
    /// Subscribers with a `*` selector: offered every update.
    any: SubscriberSet,
    /// Subscribers' template selectors, by template, found through their literal prefix.
    templates: templates::TemplateIndex,
    all: SubscriberSet,
}

/// A subscriber's request, already authenticated.
#[derive(Debug, Default)]
pub struct SubscribeRequest {
    /// Topic selectors; at least one.
    pub topics: Vec<Matcher>,
    /// The token's `mercure.subscribe` selectors; `None` for an anonymous subscriber.
    pub rights: Option<Vec<Matcher>>,
    /// From `Last-Event-ID` or `lastEventID`.
    pub last_event_id: Option<String>,
    /// When the subscriber's token expires.
    pub expires_at: Option<SystemTime>,
    /// How to tear the stream down if it cannot end by itself.
    pub teardown: Option<Teardown>,
    /// The payload of each subscription, for subscription events: by the index of its
    /// matcher in `topics` (missing ones have none).
    pub payloads: Vec<Option<Arc<serde_json::Value>>>,
}

/// An accepted subscription.
pub struct Subscription {
    pub stream: SubscriberStream,
    /// The value of the `Last-Event-ID` response header, when the client sent an id.
    pub last_event_id: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("missing \"match\" (Mercure 1.0) or \"topic\" (0.x) parameter")]
    NoTopic,
    #[error("too many \"topic\" parameters (at most {MAX_TOPICS})")]
    TooManyTopics,
    #[error("a topic selector is longer than {MAX_SELECTOR_LEN} bytes")]
    SelectorTooLong,
    #[error("the subscription's topics add up to more than {MAX_SUBSCRIPTION_BYTES} bytes")]
    TopicsTooLarge,
    #[error("too many URI template expressions ({{…}}) in one subscription (at most {MAX_TEMPLATE_EXPRESSIONS})")]
    TooManyTemplates,
    #[error("the hub is full (--max-connections); try again later")]
    Full,
    #[error("the hub's template memory (--template-memory {}) is full; try again later", format_size(*.0))]
    TemplateMemoryFull(usize),
    #[error("this hub does not let anonymous subscribers use URI templates or URL patterns (--anonymous-templates false); subscribe to exact topics, or with a token")]
    AnonymousTemplates,
    #[error("the hub is shutting down")]
    ShuttingDown,
}

/// Why a publish was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailed {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The durable history could not write it: refused with 503, nothing of it kept.
    #[error("the update could not be written to the history store ({0}), so it was not published; try again shortly")]
    NotStored(String),
}

/// A publish accepted by [`HubShared::submit`]: published, or waiting for its commit.
pub(crate) enum Submitted {
    Done(Published),
    Queued(tokio::sync::oneshot::Receiver<Result<Published, store::WriteError>>),
    /// Refused, nothing of it kept: the writer is this far behind.
    Behind(String),
}

/// A size as the flags write it (`crate::config::parse_size` reads it back): `64MiB`,
/// `512KiB`, or bytes.
pub(crate) fn format_size(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}"),
    }
}

/// The result of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    pub seq: u64,
    /// Subscribers the update was queued for.
    pub delivered: usize,
}

impl Hub {
    /// A hub whose history lives in memory only.
    pub fn new(config: HubConfig) -> Hub {
        Hub::build(config, None)
    }

    /// A hub whose history is `store`'s: `kept` (what the store returned when it opened) is
    /// its history to begin with, its seqs carry on after them, and a publish is answered once
    /// its update is on disk.
    pub fn durable(config: HubConfig, store: store::Store, kept: Vec<Update>) -> Hub {
        Hub::build(config, Some((store, kept)))
    }

    fn build(config: HubConfig, store: Option<(store::Store, Vec<Update>)>) -> Hub {
        let coalescing = coalesce::Coalescing::new(config.coalesce, config.write_budget);
        let metrics = Arc::new(Metrics::default());
        metrics
            .history_limits
            .0
            .store(config.history_size as u64, Relaxed);
        metrics
            .history_limits
            .1
            .store(config.history_bytes as u64, Relaxed);
        let mut history = History::new(history::Bounds {
            // No bytes at all keeps no update, like no updates.
            updates: if config.history_bytes == 0 {
                0
            } else {
                config.history_size
            },
            bytes: config.history_bytes,
        });
        let mut next_seq = 0;
        let store = store.map(|(store, kept)| {
            next_seq = store.next_seq();
            let newest_ms = kept.last().map(|u| u.time_ms);
            for u in kept {
                history.push(Arc::new(u));
            }
            // What the last run knew and did not store (subscription events, updates trimmed
            // before it ended) is known now only by its time: an id of ours no newer than the
            // newest stored update replays everything kept (the client may get some twice,
            // never miss one); a newer one missed nothing that was stored.
            if let Some(ms) = newest_ms {
                history.forgotten_until(ms);
            }
            metrics.observe_store_size(store.file_bytes());
            store
        });
        metrics.history_len.store(history.len() as u64, Relaxed);
        metrics.history_bytes.store(history.bytes() as u64, Relaxed);
        let selectors = SelectorCache::new(
            config.template_memory,
            config.resource_identifier.clone(),
            metrics.clone(),
        );
        Hub {
            shared: Arc::new_cyclic(|weak| HubShared {
                writer: store.map(|s| writer::start(weak.clone(), s, next_seq)),
                queued_bytes: AtomicUsize::new(0),
                core: Mutex::new(Core {
                    history,
                    next_seq,
                    next_subscriber: 0,
                    exact: HashMap::new(),
                    any: HashMap::new(),
                    templates: templates::TemplateIndex::new(selectors.base().clone()),
                    all: HashMap::new(),
                }),
                selectors,
                config,
                flusher: flusher::Flusher::new(coalesce::cores() as usize, metrics.clone()),
                metrics,
                has_templates: AtomicBool::new(false),
                has_url_patterns: AtomicBool::new(false),
                closing: AtomicBool::new(false),
                relay: OnceLock::new(),
                coalescing,
            }),
        }
    }

    /// The URL relative URL patterns and topics are read against (`--resource-identifier`).
    pub fn base_url(&self) -> &url::Url {
        self.shared.selectors.base()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Compiled selector, shared with every other user of the same string, for a use that does
    /// not outlast a request (a token's selectors checked once): a subscriber's are held
    /// within `--template-memory` instead (see [`SelectorCache`]).
    pub fn selector(&self, s: &Matcher) -> Arc<Selector> {
        self.shared.selectors.get(s)
    }

    /// Checks, stores and fans out one update; with a durable history, returns once the
    /// update is on disk (and then fanned out).
    pub(crate) async fn publish(&self, draft: Draft) -> Result<Published, PublishFailed> {
        match self.shared.submit(draft)? {
            Submitted::Done(p) => Ok(p),
            Submitted::Queued(rx) => match rx.await {
                Ok(Ok(p)) => Ok(p),
                Ok(Err(e)) => Err(PublishFailed::NotStored(e.0)),
                Err(_) => Err(PublishFailed::NotStored(
                    "the store's writer has stopped".into(),
                )),
            },
            Submitted::Behind(why) => Err(PublishFailed::NotStored(why)),
        }
    }

    /// Shutdown: waits (at most `within`) until the durable history has written what was
    /// queued before, and closes its file; later publishes are refused. Nothing to do without
    /// a durable history.
    pub async fn close_store(&self, within: std::time::Duration) {
        let Some(writer) = &self.shared.writer else {
            return;
        };
        let (done, closed) = tokio::sync::oneshot::channel();
        if writer.send(writer::Msg::Close(done)).is_err() {
            return;
        }
        if tokio::time::timeout(within, closed).await.is_err() {
            tracing::warn!(
                "the history store did not finish its writes within {}s; stopping anyway (what \
                 was answered 200 is on disk)",
                within.as_secs()
            );
        }
    }

    /// Whether publishes wait for the durable history.
    pub fn is_durable(&self) -> bool {
        self.shared.writer.is_some()
    }

    /// The first of `f`'s answers for the retained real updates, newest first (the demo clock
    /// finds its last message number this way).
    pub fn newest_with<T>(&self, f: impl FnMut(&Update) -> Option<T>) -> Option<T> {
        self.shared.core.lock().history.newest_with(f)
    }

    /// [`Hub::publish`] for a hub without a durable history, from code that cannot wait.
    #[cfg(test)]
    fn publish_now(&self, draft: Draft) -> Result<Published, Invalid> {
        match self.shared.submit(draft)? {
            Submitted::Done(p) => Ok(p),
            Submitted::Queued(_) | Submitted::Behind(_) => {
                unreachable!("a test hub has no store")
            }
        }
    }

    /// Refuses, as [`Hub::publish`] would, topics that would ask too much of the URI templates
    /// held here: in cluster mode, checked before the update enters the shared stream, after
    /// which no node can refuse it.
    pub fn check_matching(&self, topics: &[String]) -> Result<(), Invalid> {
        self.shared
            .match_templates(topics, Some(MAX_MATCHING_WORK))
            .map(drop)
    }

    /// Stores and fans out an update that was checked and given its id elsewhere: in cluster
    /// mode, by the node it was published on. `time_ms` is when it was stored.
    pub(crate) fn apply(&self, draft: Draft, id: String, time_ms: u64) -> Published {
        self.shared.apply(draft, id, time_ms)
    }

    /// Sends subscription events to `relay` rather than publishing them locally, so that in
    /// cluster mode they take the same road as every other update. Set once.
    pub(crate) fn relay_subscription_events(&self, relay: Relay) {
        let _ = self.shared.relay.set(relay);
    }

    /// The checks a subscription to `topics` passes before anything is compiled or registered
    /// (`HEAD` asks them too): its topics, templates only with a token if the hub says so, and
    /// room for one more subscriber (asked again, under the lock, when it registers).
    pub fn admit(&self, topics: &[Matcher], anonymous: bool) -> Result<(), SubscribeError> {
        if self.shared.closing.load(Relaxed) {
            return Err(SubscribeError::ShuttingDown);
        }
        if topics.is_empty() {
            return Err(SubscribeError::NoTopic);
        }
        if topics.len() > MAX_TOPICS {
            return Err(SubscribeError::TooManyTopics);
        }
        if topics.iter().any(|t| t.len() > MAX_SELECTOR_LEN) {
            return Err(SubscribeError::SelectorTooLong);
        }
        if topics.iter().map(Matcher::len).sum::<usize>() > MAX_SUBSCRIPTION_BYTES {
            return Err(SubscribeError::TopicsTooLarge);
        }
        if selector::template_expressions(topics) > MAX_TEMPLATE_EXPRESSIONS {
            return Err(SubscribeError::TooManyTemplates);
        }
        if anonymous
            && !self.shared.config.anonymous_templates
            && topics
                .iter()
                .any(|m| selector::is_template(m) || selector::is_url_pattern(m))
        {
            return Err(SubscribeError::AnonymousTemplates);
        }
        if self.shared.metrics.subscribers_connected.load(Relaxed)
            >= self.shared.config.max_subscribers as u64
        {
            return Err(SubscribeError::Full);
        }
        Ok(())
    }

    /// Registers a subscriber and returns its stream, starting with the replay it asked for.
    pub fn subscribe(&self, req: SubscribeRequest) -> Result<Subscription, SubscribeError> {
        let res = self.enter(req);
        let m = &self.shared.metrics;
        match res {
            Err(SubscribeError::Full) => {
                m.subscribers_refused.fetch_add(1, Relaxed);
            }
            Err(SubscribeError::TemplateMemoryFull(_)) => {
                m.template_refused(TemplateRefusal::Memory)
            }
            Err(SubscribeError::AnonymousTemplates) => {
                m.template_refused(TemplateRefusal::Anonymous)
            }
            _ => {}
        }
        res
    }

    fn enter(&self, req: SubscribeRequest) -> Result<Subscription, SubscribeError> {
        self.admit(&req.topics, req.rights.is_none())?;
        // Compiled, and held for as long as the subscriber lives: its templates count against
        // --template-memory until then.
        let hold = |v: &[Matcher]| {
            v.iter()
                .map(|s| self.shared.selectors.hold(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| SubscribeError::TemplateMemoryFull(self.shared.config.template_memory))
        };
        let selectors = hold(&req.topics)?;
        // The token's selectors come from whoever issued it, not from the client: they are
        // shared when compiled already and never refused (a hub whose budget anonymous
        // subscribers filled would otherwise turn away every subscriber whose token names a
        // template); one that does not fit is compiled for this subscriber alone.
        let rights = req.rights.as_deref().map(|v| {
            v.iter()
                .map(|s| self.shared.selectors.get(s))
                .collect::<Vec<_>>()
        });
        let expires_in = req.expires_at.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        });
        // Up to a tenth shorter, at random: streams opened together (after a restart) do not
        // all end, and come back, at the same moment.
        let lifetime = self
            .shared
            .config
            .max_stream_lifetime
            .map(|l| l.mul_f64(1.0 - rand::random::<f64>() / 10.0));
        // The token's `exp` ends the stream on the dot, with a timer of its own, if it comes
        // first; the lifetime's end is found by the hub's sweep, drawn sooner by the sweep's
        // period so that no stream outlives the bound.
        let sweep = self
            .shared
            .config
            .max_stream_lifetime
            .map_or(Duration::ZERO, lifetime_sweep);
        let (expires_in, lives) = match (expires_in, lifetime) {
            (Some(exp), Some(life)) if life + sweep < exp => (None, Some(life)),
            // The sweep could end it a little after `exp`: the timer is kept for `exp`.
            (Some(exp), Some(life)) if life < exp => (Some(exp), Some(life)),
            (Some(exp), _) => (Some(exp), None),
            (None, life) => (None, life),
        };
        let (ends_at, by_exp) = match (lives, self.shared.config.max_stream_lifetime, expires_in) {
            (Some(life), Some(bound), _) => {
                let sooner = life.saturating_sub(lifetime_sweep(bound));
                (after_ns(sooner), false)
            }
            // The exact timer ends the stream; the sweep, up to a period later, ends one whose
            // client stopped reading (see `Subscriber::ending_at`).
            (_, _, Some(exp)) => (after_ns(exp), true),
            _ => (0, false),
        };

        let mut core = self.shared.core.lock();
        if self.shared.closing.load(Relaxed) {
            return Err(SubscribeError::ShuttingDown);
        }
        if core.all.len() >= self.shared.config.max_subscribers {
            return Err(SubscribeError::Full);
        }
        let id = core.next_subscriber;
        core.next_subscriber += 1;
        let info = self.shared.config.subscription_events.then(|| {
            Box::new(SubscriberInfo {
                id: uuid::Uuid::new_v4().urn().to_string(),
                topics: req.topics.clone(),
                payloads: req.payloads.clone(),
            })
        });
        // A request speaks one dialect (`topic=` with `match…` is refused): a 0.x one has
        // `Topic` selectors.
        let legacy_wire = req.topics.iter().any(|m| m.kind == MatchType::Topic);
        let sub = Arc::new(
            Subscriber::new(id, selectors, rights, req.teardown, info, legacy_wire)
                .ending_at(ends_at, by_exp),
        );
        // The token's selectors too: they decide private updates.
        let templated = sub
            .selectors
            .iter()
            .chain(sub.rights.iter().flatten())
            .any(|s| s.is_compiled());
        let (mut replay, header) = match &req.last_event_id {
            None => (Vec::new(), None),
            Some(last) => {
                let from = core.history.locate_for(last, |u| sub.authorized_for(u));
                // Templates are matched one by one: with them, take the candidates under the
                // lock and sort them out after it (a long history times many templates must
                // not hold up every publish).
                let replay: Vec<_> = if templated {
                    core.history.since(&from).cloned().collect()
                } else {
                    core.history
                        .since(&from)
                        .filter(|u| sub.wants(u))
                        .cloned()
                        .collect()
                };
                (replay, Some(from.answer(last)))
            }
        };
        core.register(&sub);
        self.shared.note_templates(&core);
        drop(core);
        if templated {
            replay.retain(|u| sub.wants(u));
        }

        let m = &self.shared.metrics;
        m.subscribers_connected.fetch_add(1, Relaxed);
        m.subscribers_total.fetch_add(1, Relaxed);
        tracing::info!(subscriber = id, replayed = replay.len(), "Added new client");
        self.shared.announce(&sub, true);
        Ok(Subscription {
            stream: SubscriberStream::new(
                self.shared.clone(),
                sub,
                replay,
                expires_in,
                self.shared.config.coalesce,
            ),
            last_event_id: header,
        })
    }

    /// Shares the machine's write budget: the hubs known to run on it (this one included;
    /// cluster mode finds them) may use `wanted` cores between them, the machine has `machine`.
    pub fn share_machine(&self, machine: u64, wanted: u64) {
        self.shared.coalescing.share(machine, wanted);
    }

    /// Whether the write budget is a fixed number (`--write-budget N`), which cluster nodes on
    /// one machine share, rather than `auto`, which follows the machine's load by itself.
    pub fn write_budget_is_fixed(&self) -> bool {
        self.shared.coalescing.is_fixed()
    }

    /// Socket writes a second this hub allows itself before it batches.
    pub fn write_budget(&self) -> u64 {
        self.shared.coalescing.budget()
    }

    /// What the hub's batching stands at, for `/metrics`.
    pub fn batching(&self) -> crate::metrics::Batching {
        let c = &self.shared.coalescing;
        crate::metrics::Batching {
            write_budget: c.budget(),
            window: c.window(),
            cpu_busy: c.busy(),
        }
    }

    /// Resets the coalescing window from what was delivered and written since the previous
    /// call, the CPU time spent meanwhile and how late the call came (`lag`); called a few
    /// times a second while `--coalesce` is on.
    pub fn retune_coalescing(&self, lag: Duration) {
        let m = &self.shared.metrics;
        self.shared.coalescing.retune(coalesce::Totals {
            deliveries: m.deliveries.load(Relaxed),
            writes: m.direct_writes.load(Relaxed)
                + m.coalesced_writes.load(Relaxed)
                + m.task_writes.load(Relaxed),
            cpu_ns: coalesce::process_cpu_ns(),
            machine: coalesce::machine_cpu(),
            capacity: coalesce::cpu_capacity(),
            lag,
        });
    }

    /// Sends a heartbeat on every stream that had nothing to send since the previous call.
    /// One hub-wide tick instead of a timer per subscriber.
    pub fn heartbeat(&self) {
        let subs: Vec<_> = self.shared.core.lock().all.values().cloned().collect();
        for s in subs {
            s.tick();
        }
    }

    /// Ends the streams that reached `--max-stream-lifetime` (after what is queued: the client
    /// resumes with `Last-Event-ID`). Called by the hub's timers every [`lifetime_sweep`].
    pub fn end_lifetimes(&self) {
        let now = clock::now_ns();
        let due: Vec<_> = {
            let core = self.shared.core.lock();
            core.all
                .values()
                // Ended already (its client stalled before its end came through): nothing more
                // to do, and its teardown is on its way.
                .filter(|s| s.outlived(now) && !s.is_closed())
                .cloned()
                .collect()
        };
        for s in due {
            let why = s.end_reason();
            let closed = match why {
                DropReason::Expired => s.expire(),
                _ => s.close(why),
            };
            if closed {
                s.close_later();
                self.shared.metrics.dropped(why);
                if why == DropReason::Expired {
                    tracing::info!(subscriber = s.id, "Dropped client: token expired");
                } else {
                    tracing::info!(
                        subscriber = s.id,
                        "Ended stream: --max-stream-lifetime reached (the client resumes)"
                    );
                }
            }
        }
    }

    /// Ends every stream (after what is queued) and refuses new subscribers.
    pub fn shutdown(&self) {
        self.shared.closing.store(true, Relaxed);
        let subs: Vec<_> = self.shared.core.lock().all.values().cloned().collect();
        for s in subs {
            if s.close(DropReason::Shutdown) {
                self.shared.metrics.dropped(DropReason::Shutdown);
            }
        }
    }

    /// The active subscriptions (topic and subscriber) and the id of the newest update the
    /// caller may read (its token's `mercure.subscribe` selectors are `rights`; `earliest`
    /// when there is none), read together so that the list is exactly the state after that
    /// update. The id of a private update the caller may not read is never named: it would
    /// tell which private ids exist, which a replay hides too.
    /// Each document comes with the type of its matcher: 0.x and 1.0 subscriptions are
    /// documented in their own shapes (see [`subscriptions`]).
    pub fn subscriptions(
        &self,
        rights: &[Arc<Selector>],
    ) -> (Vec<(MatchType, serde_json::Value)>, String) {
        let core = self.shared.core.lock();
        let mut docs = Vec::new();
        let mut subs: Vec<_> = core.all.values().collect();
        subs.sort_by_key(|s| s.id);
        for sub in subs {
            if let Some(info) = &sub.info {
                for (i, topic) in info.topics.iter().enumerate() {
                    docs.push((topic.kind, subscriptions::document(info, i, true)));
                }
            }
        }
        let last = core
            .history
            .newest_id_for(|u| !u.private || selector::any_matches(rights, &u.topics))
            .unwrap_or("earliest")
            .to_owned();
        (docs, last)
    }

    pub fn subscriber_count(&self) -> usize {
        self.shared.core.lock().all.len()
    }

    /// What a subscriber resuming from `last_event_id` would be told in its `Last-Event-ID`
    /// response header (for `HEAD`, which subscribes to nothing).
    /// The `Last-Event-ID` a subscriber resuming from `last_event_id` would be answered, for
    /// a caller with the token selectors `rights` (`None`: anonymous).
    pub fn resume_answer(&self, last_event_id: &str, rights: Option<&[Matcher]>) -> String {
        let rights: Vec<_> = rights
            .into_iter()
            .flatten()
            .map(|r| self.selector(r))
            .collect();
        let core = self.shared.core.lock();
        core.history
            .locate_for(last_event_id, |u| {
                !u.private || selector::any_matches(&rights, &u.topics)
            })
            .answer(last_event_id)
    }

    pub fn history_len(&self) -> usize {
        self.shared.core.lock().history.len()
    }
}

impl HubShared {
    /// Checks one update, then fans it out at once or, with a durable history, queues it
    /// for the writer (which fans it out once it is on disk).
    pub(crate) fn submit(&self, draft: Draft) -> Result<Submitted, Invalid> {
        let started = Instant::now();
        if let Err(e) = draft.validate() {
            self.metrics.updates_rejected.fetch_add(1, Relaxed);
            return Err(e);
        }
        // Not counted as rejected here: a publish can pass `validate` (its HTTP handler checks
        // it first, and counts what it refuses) and still be refused for this.
        let matches = self.match_templates(&draft.topics, Some(MAX_MATCHING_WORK))?;
        let id = draft.id.clone().unwrap_or_else(update::new_id);
        Ok(self.enqueue(draft, id, matches, started))
    }

    /// The hub's own update (a subscription event), published without a publisher's checks.
    fn submit_own(&self, draft: Draft) {
        let matches = self
            .match_templates(&draft.topics, None)
            .unwrap_or_default();
        let _ = self.enqueue(draft, update::new_id(), matches, Instant::now());
    }

    /// Fans a checked update out at once or, with a durable history, queues it for the writer.
    fn enqueue(
        &self,
        draft: Draft,
        id: String,
        matches: templates::Matches,
        started: Instant,
    ) -> Submitted {
        let Some(writer) = &self.writer else {
            let published = self.store_and_fan_out(draft, id, now_ms(), matches);
            self.metrics.observe_publish(started.elapsed());
            return Submitted::Done(published);
        };
        let encoded = update::encode(&draft, &id);
        let (alt, alt_is_legacy) = update::encode_alt(&draft, &id);
        let durable = !draft.is_subscription_event();
        // What waits for the disk is bounded: past the budget a publish is refused (503, try
        // again) rather than held, so a disk slower than the publishers cannot grow the queue
        // without end. The hub's own events are never refused (they are small and few).
        // The allocations' own cost counted too: a publish of 1,000 one-byte topics holds far
        // more than 1,000 bytes.
        let weight = 256
            + encoded.len()
            + alt.as_ref().map_or(0, |b| b.len())
            + draft.topics.iter().map(|t| 64 + t.len()).sum::<usize>()
            + matches.weight();
        let queued = self.queued_bytes.fetch_add(weight, Relaxed) + weight;
        if durable && queued > writer::MAX_QUEUED_BYTES {
            self.queued_bytes.fetch_sub(weight, Relaxed);
            return Submitted::Behind(format!(
                "the history store is behind: {} MiB of publishes wait to be written",
                writer::MAX_QUEUED_BYTES >> 20
            ));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = writer::Job {
            encoded,
            alt,
            alt_is_legacy,
            durable,
            weight,
            id,
            topics: draft.topics,
            private: draft.private,
            time_ms: now_ms(),
            matches,
            started,
            reply: Some(reply),
        };
        // The writer stops with the hub or at shutdown (`close_store`): a send that fails
        // drops the reply, which answers as a failed write, and gives its room back.
        if writer.send(writer::Msg::Publish(job)).is_err() {
            self.queued_bytes.fetch_sub(weight, Relaxed);
        }
        Submitted::Queued(rx)
    }

    /// Stores and fans out an update that was checked and given its id elsewhere (read from
    /// the cluster's stream): nothing can be refused any more, however many templates it meets.
    pub(crate) fn apply(&self, draft: Draft, id: String, time_ms: u64) -> Published {
        let matches = self
            .match_templates(&draft.topics, None)
            .unwrap_or_default();
        self.store_and_fan_out(draft, id, time_ms, matches)
    }

    /// Tests the templates `topics` could match, outside the lock: it is taken only to collect
    /// them (and to refuse, past `bound`, topics that would ask too much).
    fn match_templates(
        &self,
        topics: &[String],
        bound: Option<u64>,
    ) -> Result<templates::Matches, Invalid> {
        if !self.has_templates.load(Relaxed) {
            return Ok(templates::Matches::default());
        }
        // Read as URLs before the lock is taken, once for all the URL patterns (their work is
        // counted against `bound` with the rest).
        let urls = if self.has_url_patterns.load(Relaxed) {
            let base = self.selectors.base();
            topics.iter().map(|t| TopicUrl::parse(t, base)).collect()
        } else {
            Vec::new()
        };
        let candidates = self.core.lock().templates.collect(topics, urls, bound);
        let matches = match candidates {
            Ok(c) if c.work > BLOCKING_WORK && on_runtime_worker() => {
                // Milliseconds of work: let the runtime move this worker's other tasks
                // elsewhere meanwhile, or they wait on it (a connection's task that keeps
                // finding requests ready yields to them rarely).
                tokio::task::block_in_place(|| c.test(topics))
            }
            Ok(c) => c.test(topics),
            Err(e) => {
                return Err(Invalid::TooMuchMatching {
                    topics: e.topics,
                    templates: e.templates,
                })
            }
        };
        self.metrics
            .template_tests
            .fetch_add(matches.tests, Relaxed);
        Ok(matches)
    }

    /// Encodes, stores and fans out an update that already has its id and was checked where it
    /// entered the system, with its topics' templates tested (`matches`). Both a local publish
    /// and an update read from the cluster's stream end here, so the fan-out is the same code
    /// in both modes.
    fn store_and_fan_out(
        &self,
        draft: Draft,
        id: String,
        time_ms: u64,
        matches: templates::Matches,
    ) -> Published {
        let encoded = update::encode(&draft, &id);
        let (alt, alt_is_legacy) = update::encode_alt(&draft, &id);
        let core = self.core.lock();
        let seq = core.next_seq;
        let update = Arc::new(Update {
            seq,
            id,
            topics: draft.topics,
            private: draft.private,
            time_ms,
            encoded,
            alt,
            alt_is_legacy,
        });
        self.place(core, update, &matches)
    }

    /// Puts an update the writer has stored, with its seq, in its place (see `writer`),
    /// claiming at most `direct_max` idle streams for direct writes. The streams that queued it
    /// are woken at once; the direct writes (and the removal of subscribers dropped as too
    /// slow) are returned for [`HubShared::hand_over`], so that the writer can answer the
    /// update's publisher first.
    fn place_stored(
        &self,
        update: SharedUpdate,
        matches: &templates::Matches,
        direct_max: usize,
    ) -> (Published, Placed) {
        self.take_place(self.core.lock(), update, matches, direct_max)
    }

    /// Adds `update` to the history and offers it to its subscribers, `core` held until its
    /// place is taken, then wakes and writes to them.
    fn place(
        &self,
        core: parking_lot::MutexGuard<'_, Core>,
        update: SharedUpdate,
        matches: &templates::Matches,
    ) -> Published {
        let (published, placed) = self.take_place(core, update, matches, DIRECT_MAX);
        self.hand_over(placed);
        published
    }

    /// [`HubShared::place`] but for the direct writes and the removals: the update's place in
    /// the history and in each subscriber's order (under the lock), then the streams that
    /// queued it woken and everything counted.
    fn take_place(
        &self,
        mut core: parking_lot::MutexGuard<'_, Core>,
        update: SharedUpdate,
        matches: &templates::Matches,
        direct_max: usize,
    ) -> (Published, Placed) {
        let limit = self.config.subscriber_queue;
        let metrics = &self.metrics;
        let window = self.coalescing.window();
        let hold = (!window.is_zero() && self.flusher.ready())
            .then(|| (clock::now_ns(), window.as_nanos() as u64));
        debug_assert!(update.seq >= core.next_seq, "seqs go up");
        core.next_seq = update.seq + 1;
        let seq = update.seq;
        let id = update.id.clone();
        core.history.push(update.clone());
        let fanned = core.fan_out(
            &update,
            matches,
            limit,
            &self.coalescing,
            hold,
            // Coalescing wants every write it can save: no direct write while it holds updates.
            if window.is_zero() { direct_max } else { 0 },
        );
        metrics
            .history_len
            .store(core.history.len() as u64, Relaxed);
        metrics
            .history_bytes
            .store(core.history.bytes() as u64, Relaxed);
        drop(core);

        // The other streams' tasks start writing (on every core) while this thread writes to
        // the claimed ones. Each claimed stream waits for this write alone, and the update's
        // place in its order was taken under the lock: later updates queue behind the write.
        for waker in fanned.wakes {
            waker.wake();
        }
        self.flusher.schedule(fanned.held);
        let delivered = fanned.queued + fanned.direct.len();
        metrics.updates_published.fetch_add(1, Relaxed);
        metrics
            .template_tests
            .fetch_add(fanned.template_tests, Relaxed);
        metrics.deliveries.fetch_add(delivered as u64, Relaxed);
        metrics
            .direct_writes
            .fetch_add(fanned.direct.len() as u64, Relaxed);
        let placed = Placed {
            update,
            direct: fanned.direct,
            dropped: fanned.dropped,
        };
        (Published { id, seq, delivered }, placed)
    }

    /// The rest of [`HubShared::place`]: writes to the streams claimed for a direct write,
    /// removes those dropped for being too far behind.
    fn hand_over(&self, placed: Placed) {
        let Placed {
            update,
            direct,
            dropped,
        } = placed;
        for (sub, sink) in &direct {
            sub.direct_done(sink.try_send(update.wire(sub.legacy_wire)));
        }
        for sub in &dropped {
            self.metrics.dropped(DropReason::Slow);
            tracing::info!(
                subscriber = sub.id,
                queue = self.config.subscriber_queue,
                "Dropped client: too slow (more than --subscriber-queue updates behind)"
            );
            // Unregistered now, not when its stream ends: an HTTP/2 stream whose client
            // stopped reading is not torn down with its connection, and would otherwise hold
            // its place (and a slot under --max-connections) until the client read again.
            self.remove(sub, Some(DropReason::Slow));
        }
    }

    /// Notes whether templates and URL patterns are held, for publishes to read without the
    /// lock (`core` is it, held).
    fn note_templates(&self, core: &Core) {
        self.has_templates
            .store(!core.templates.is_empty(), Relaxed);
        self.has_url_patterns
            .store(core.templates.has_url_patterns(), Relaxed);
    }

    /// Called when a subscriber's stream is dropped, whatever the reason.
    pub(crate) fn remove(&self, sub: &Arc<Subscriber>, reason: Option<DropReason>) {
        let mut core = self.core.lock();
        let removed = core.unregister(sub);
        self.note_templates(&core);
        drop(core);
        if removed {
            self.metrics.subscribers_connected.fetch_sub(1, Relaxed);
            let why = reason.map_or("client went away", DropReason::as_str);
            tracing::info!(subscriber = sub.id, reason = why, "Removed client");
            self.announce(sub, false);
        }
    }

    /// Publishes a subscription event for each of the subscriber's topics, on the topic of
    /// the subscription's own dialect, rendered for each listener in the listener's (Mercure
    /// 1.0 §9.3 row 17): 1.0 listeners get an `event: mercure` (the type no publisher may use,
    /// so they know it comes from the hub) with plain JSON, 0.x listeners a plain message with
    /// the JSON-LD document, as 0.x listeners expect.
    fn announce(&self, sub: &Subscriber, active: bool) {
        let Some(info) = &sub.info else { return };
        for (i, topic) in info.topics.iter().enumerate() {
            // In the subscription's own dialect first (what a node that knows no other
            // rendering shows everyone, as before), the other one beside it.
            let own_is_legacy = topic.kind == MatchType::Topic;
            let own = subscriptions::document_as(info, i, active, own_is_legacy);
            let other = subscriptions::document_as(info, i, active, !own_is_legacy);
            let draft = Draft {
                topics: vec![subscriptions::topic_of(info, i)],
                data: own.to_string(),
                private: true,
                event_type: (!own_is_legacy).then(|| update::HUB_EVENT_TYPE.to_owned()),
                alt_data: Some(other.to_string()),
                ..Draft::default()
            };
            if let Some(relay) = self.relay.get() {
                relay(draft);
            } else {
                // The hub's own update: no publisher's checks (its topic, an escaped selector,
                // may be longer than a publisher's may be), and no refusal for template work.
                self.submit_own(draft);
            }
        }
    }
}

impl Core {
    fn register(&mut self, sub: &Arc<Subscriber>) {
        for sel in &sub.selectors {
            match &**sel {
                Selector::Exact(topic) => {
                    self.exact
                        .entry(topic.clone())
                        .or_default()
                        .insert(sub.id, sub.clone());
                }
                Selector::Any => {
                    self.any.insert(sub.id, sub.clone());
                }
                Selector::Template(_) | Selector::UrlPattern(_) => self.templates.insert(sel, sub),
                Selector::Never(_) => {}
            }
        }
        self.all.insert(sub.id, sub.clone());
    }

    fn unregister(&mut self, sub: &Arc<Subscriber>) -> bool {
        if self.all.remove(&sub.id).is_none() {
            return false;
        }
        for sel in &sub.selectors {
            match &**sel {
                Selector::Exact(topic) => {
                    if let Some(set) = self.exact.get_mut(topic) {
                        set.remove(&sub.id);
                        if set.is_empty() {
                            self.exact.remove(topic);
                        }
                    }
                }
                Selector::Any => {
                    self.any.remove(&sub.id);
                }
                Selector::Template(_) | Selector::UrlPattern(_) => {
                    self.templates.remove(sel, sub.id)
                }
                Selector::Never(_) => {}
            }
        }
        true
    }

    /// Offers `update` to every matching subscriber: queued for most, claimed for a direct
    /// write by the caller for at most `direct_max` (0 while the hub is over its write budget).
    /// `matches` are the templates the update's topics matched, tested before the lock was
    /// taken; `window` is the hub's coalescing window, `hold` the flusher's clock (see
    /// [`subscriber::HoldClock`]).
    fn fan_out(
        &self,
        update: &SharedUpdate,
        matches: &templates::Matches,
        limit: usize,
        coalescing: &coalesce::Coalescing,
        hold: subscriber::HoldClock,
        direct_max: usize,
    ) -> FanOut {
        let mut out = FanOut::default();
        let mut offer = |sub: &Arc<Subscriber>| {
            let direct = out.direct.len() < direct_max;
            match sub.offer(update, limit, coalescing, direct, hold) {
                Offer::Queued(waker) => {
                    out.queued += 1;
                    out.wakes.extend(waker);
                }
                Offer::Held(at) => {
                    out.queued += 1;
                    out.held.push((sub.clone(), at));
                }
                Offer::Direct(sink) => out.direct.push((sub.clone(), sink)),
                Offer::Dropped(waker) => {
                    out.dropped.push(sub.clone());
                    out.wakes.extend(waker);
                }
                Offer::Skipped => {}
            }
        };
        for topic in &update.topics {
            if let Some(set) = self.exact.get(topic) {
                for sub in set.values() {
                    offer(sub);
                }
            }
        }
        for sub in self.any.values() {
            offer(sub);
        }
        // Tested before the lock was taken (but for templates that came in since), each once
        // however many subscribers share it.
        let tests = matches.each(&self.templates, &update.topics, |group| {
            for sub in group.subs.values() {
                offer(sub);
            }
        });
        out.template_tests = tests;
        out
    }
}

/// An update placed and its queued streams woken, with what is left to do after it.
pub(crate) struct Placed {
    update: SharedUpdate,
    /// Streams claimed for a direct write of `update`.
    direct: Vec<(Arc<Subscriber>, Arc<dyn DirectSink>)>,
    /// Subscribers dropped for being too far behind, to unregister.
    dropped: Vec<Arc<Subscriber>>,
}

/// What one fan-out did.
#[derive(Default)]
struct FanOut {
    /// Subscribers that queued the update for their own task.
    queued: usize,
    /// Subscribers whose socket the caller writes the update to.
    direct: Vec<(Arc<Subscriber>, Arc<dyn DirectSink>)>,
    /// Those dropped for being too far behind.
    dropped: Vec<Arc<Subscriber>>,
    /// Stream tasks to wake once the lock is released.
    wakes: Vec<std::task::Waker>,
    /// Held subscribers to enter in the flusher, with the time their windows open.
    held: Vec<(Arc<Subscriber>, u64)>,
    /// Templates and URL patterns tested under the lock (those that came in meanwhile).
    template_tests: u64,
}

/// Template matching past this much work (about a millisecond; see [`MAX_MATCHING_WORK`])
/// leaves the runtime worker it runs on.
const BLOCKING_WORK: u64 = 1 << 20;

/// True on a worker thread of a multi-threaded tokio runtime, where
/// `tokio::task::block_in_place` can hand its tasks over (elsewhere it would panic).
fn on_runtime_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    /// Publishes waiting for the disk are bounded in bytes: past the budget a publish is
    /// refused (the HTTP layer answers 503 with Retry-After), and what is answered gives its
    /// bytes back.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_writers_queue_is_bounded() {
        let dir = std::env::temp_dir().join(format!("ssehub-queue-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bounds = store::Bounds {
            updates: 100,
            bytes: 1 << 20,
        };
        let (store, kept) = store::Store::open(&dir, bounds).unwrap();
        let hub = Hub::durable(HubConfig::default(), store, kept);
        let draft = || Draft {
            topics: vec!["a".into()],
            data: "x".into(),
            ..Draft::default()
        };
        hub.publish(draft()).await.unwrap();
        assert_eq!(hub.shared.queued_bytes.load(Relaxed), 0, "given back");
        // As if the disk were that far behind.
        hub.shared
            .queued_bytes
            .store(writer::MAX_QUEUED_BYTES, Relaxed);
        match hub.publish(draft()).await {
            Err(PublishFailed::NotStored(why)) => assert!(why.contains("behind"), "{why}"),
            other => panic!("not refused: {:?}", other.map(|p| p.id)),
        }
        assert_eq!(
            hub.shared.queued_bytes.load(Relaxed),
            writer::MAX_QUEUED_BYTES,
            "a refused publish takes nothing"
        );
        hub.shared.queued_bytes.store(0, Relaxed);
        hub.publish(draft()).await.unwrap();
        drop(hub);
        let _ = std::fs::remove_dir_all(&dir);
    }
    use std::task::{Context, Poll, Wake, Waker};

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    pub(super) fn publish(hub: &Hub, n: usize) {
        for _ in 0..n {
            let draft = Draft {
                topics: vec!["t".to_owned()],
                data: "x".to_owned(),
                ..Draft::default()
            };
            hub.publish_now(draft).unwrap();
        }
    }

    pub(super) fn subscribe(hub: &Hub) -> SubscriberStream {
        hub.subscribe(SubscribeRequest {
            topics: vec![Matcher::topic("t")],
            ..SubscribeRequest::default()
        })
        .unwrap()
        .stream
    }

    fn events(chunk: &[u8]) -> usize {
        String::from_utf8_lossy(chunk).matches("data: x").count()
    }

    /// A stream waiting out a coalescing window is woken early once its queue is half full, so
    /// the wait can never be what gets a subscriber dropped as slow; and a close wakes it.
    #[tokio::test]
    async fn a_held_stream_wakes_before_its_queue_fills_and_on_close() {
        let hub = Hub::new(HubConfig {
            coalesce: Duration::from_secs(10),
            subscriber_queue: 10,
            ..HubConfig::default()
        });
        let mut stream = subscribe(&hub);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut next = |s: &mut SubscriberStream| match s.poll_chunk(&mut cx) {
            Poll::Ready(Some(c)) => Some(events(&c)),
            Poll::Ready(None) => panic!("the stream ended"),
            Poll::Pending => None,
        };
        assert_eq!(next(&mut stream), Some(0), "the opening comment");
        hub.shared.coalescing.set_window(Duration::from_secs(10));

        publish(&hub, 1);
        assert_eq!(
            next(&mut stream),
            Some(1),
            "the first update after a quiet spell"
        );
        publish(&hub, 3);
        assert_eq!(next(&mut stream), None, "held: inside the window");
        let woken = count.0.load(Relaxed);
        publish(&hub, 1);
        assert_eq!(count.0.load(Relaxed), woken, "4 of 10 queued: still held");
        publish(&hub, 1);
        assert_eq!(count.0.load(Relaxed), woken + 1, "5 of 10 queued: woken");
        assert_eq!(next(&mut stream), Some(5), "all five in one chunk");
        publish(&hub, 8);
        assert_eq!(
            next(&mut stream),
            Some(8),
            "woken again at half, never dropped"
        );
        assert_eq!(hub.metrics().dropped_count(DropReason::Slow), 0);

        publish(&hub, 1);
        assert_eq!(next(&mut stream), None, "held again");
        let woken = count.0.load(Relaxed);
        hub.shutdown();
        assert_eq!(
            count.0.load(Relaxed),
            woken + 1,
            "a close wakes a held stream"
        );
        assert_eq!(next(&mut stream), Some(1), "what was queued goes out first");
        assert!(matches!(stream.poll_chunk(&mut cx), Poll::Ready(None)));
    }

    /// The update data a stream has ready, in order (its opening comment read and dropped).
    fn ready(stream: &mut SubscriberStream) -> Vec<String> {
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let mut data = Vec::new();
        while let Poll::Ready(Some(chunk)) = stream.poll_chunk(&mut cx) {
            let text = String::from_utf8_lossy(&chunk).into_owned();
            data.extend(
                text.lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .map(str::to_owned),
            );
        }
        data
    }

    /// Everything a stream has ready, as text.
    fn ready_text(stream: &mut SubscriberStream) -> String {
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&waker);
        let mut text = String::new();
        while let Poll::Ready(Some(chunk)) = stream.poll_chunk(&mut cx) {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    }

    /// A subscription is announced on the topic of its own dialect, and each listener gets the
    /// event in the listener's: a 1.0 one as plain JSON under `event: mercure`, a 0.x one as a
    /// JSON-LD message. The API lists each in the subscription's own shape.
    #[test]
    fn subscription_events_take_the_shape_of_their_listener() {
        let hub = Hub::new(HubConfig {
            subscription_events: true,
            ..HubConfig::default()
        });
        let listen = |m: Matcher| {
            hub.subscribe(SubscribeRequest {
                topics: vec![m],
                rights: Some(vec![Matcher::exact("*")]),
                ..SubscribeRequest::default()
            })
            .unwrap()
            .stream
        };
        let prefix = subscriptions::PREFIX;
        let mut modern = listen(Matcher::url_pattern(format!("{prefix}/*")));
        let mut legacy = listen(Matcher::topic(format!("{prefix}{{/t}}{{/s}}")));
        ready_text(&mut modern);
        ready_text(&mut legacy);
        let one = hub
            .subscribe(SubscribeRequest {
                topics: vec![Matcher::exact("a b")],
                payloads: vec![Some(Arc::new(serde_json::json!({"p": 1})))],
                ..SubscribeRequest::default()
            })
            .unwrap();
        let old = subscribe_to(&hub, "x", None);
        let events = |text: &str| -> Vec<(bool, serde_json::Value)> {
            text.split("\n\n")
                .filter(|e| e.contains("data:"))
                .map(|e| {
                    let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                    (
                        e.starts_with("event: mercure\n") || e.contains("\nevent: mercure\n"),
                        serde_json::from_str(data).unwrap(),
                    )
                })
                .collect()
        };
        let new_text = ready_text(&mut modern);
        let got = events(&new_text);
        assert_eq!(got.len(), 2, "{new_text}");
        let subscriber = got[0].1["subscriber"].as_str().unwrap().to_owned();
        let id = format!(
            "{prefix}/exact/a%20b/{}",
            subscriptions::escape_1_0(&subscriber)
        );
        assert_eq!(
            got[0],
            (
                true,
                serde_json::json!({"id": id, "type": "subscription", "match_type": "exact",
                    "match": "a b", "subscriber": subscriber, "active": true, "payload": {"p": 1}})
            )
        );
        assert!(got[1].0, "{new_text}");
        assert_eq!(got[1].1["match_type"], "topic");
        assert_eq!(got[1].1["match"], "x");
        let old_id = got[1].1["id"].as_str().unwrap().to_owned();
        assert!(
            !old_id.contains("/topic/"),
            "a 0.x subscription keeps its topic: {old_id}"
        );

        // The 0.x listener gets the same two events, as JSON-LD messages on the same topics.
        let old_text = ready_text(&mut legacy);
        let got = events(&old_text);
        assert_eq!(got.len(), 2, "{old_text}");
        for (typed, doc) in &got {
            assert!(!typed, "{old_text}");
            assert_eq!(doc["@context"], "https://mercure.rocks/");
            assert_eq!(doc["type"], "Subscription");
        }
        assert_eq!(got[0].1["id"], id.as_str());
        assert_eq!(got[0].1["topic"], "a b");
        assert_eq!(got[0].1["payload"], serde_json::json!({"p": 1}));
        assert_eq!(got[1].1["id"], old_id.as_str());

        let (docs, _) = hub.subscriptions(&[hub.selector(&Matcher::exact("*"))]);
        let kinds: Vec<_> = docs.iter().map(|(k, d)| (*k, d["type"].clone())).collect();
        assert!(kinds.contains(&(MatchType::Exact, "subscription".into())));
        assert!(kinds.contains(&(MatchType::Topic, "Subscription".into())));

        drop(one);
        drop(old);
        let text = ready_text(&mut modern);
        assert!(text.contains("event: mercure\n"), "{text}");
        assert!(text.contains("\"active\":false"), "{text}");
    }

    fn subscribe_to(hub: &Hub, topic: &str, last_event_id: Option<&str>) -> SubscriberStream {
        hub.subscribe(SubscribeRequest {
            topics: vec![Matcher::topic(topic)],
            last_event_id: last_event_id.map(str::to_owned),
            ..SubscribeRequest::default()
        })
        .unwrap()
        .stream
    }

    /// Templates are tested between two holds of the lock; whoever registers in between gets
    /// the update exactly once: in its queue (it is not in the history yet for its replay),
    /// whether its template was tested already or is new (tested in the fan-out).
    #[tokio::test]
    async fn subscribers_registered_while_templates_are_tested_get_the_update_once() {
        let hub = Hub::new(HubConfig::default());
        let mut early = subscribe_to(&hub, "/a/{x}", None);
        let first = hub
            .publish_now(Draft {
                topics: vec!["/a/0".to_owned()],
                data: "first".to_owned(),
                ..Draft::default()
            })
            .unwrap();
        let draft = |data: &str| Draft {
            topics: vec!["/a/1".to_owned()],
            data: data.to_owned(),
            ..Draft::default()
        };

        // Between the two holds: only a subscriber to a template tested already.
        let matches = hub
            .shared
            .match_templates(&["/a/1".to_owned()], None)
            .unwrap();
        let mut same = subscribe_to(&hub, "/a/{x}", Some(&first.id));
        hub.shared
            .store_and_fan_out(draft("second"), update::new_id(), now_ms(), matches);
        assert_eq!(ready(&mut early), ["first", "second"]);
        assert_eq!(ready(&mut same), ["second"]);

        // And with new templates, one that matches and one that does not.
        let matches = hub
            .shared
            .match_templates(&["/a/1".to_owned()], None)
            .unwrap();
        let mut new = subscribe_to(&hub, "/{+p}", Some(&first.id));
        let mut other = subscribe_to(&hub, "/b/{x}", Some(&first.id));
        let mut again = subscribe_to(&hub, "/a/{x}", Some(&first.id));
        hub.shared
            .store_and_fan_out(draft("third"), update::new_id(), now_ms(), matches);
        assert_eq!(ready(&mut early), ["third"]);
        assert_eq!(ready(&mut same), ["third"]);
        assert_eq!(ready(&mut new), ["second", "third"], "replay, then queue");
        assert_eq!(ready(&mut again), ["second", "third"]);
        assert!(ready(&mut other).is_empty());
    }

    #[test]
    fn a_publish_that_asks_too_much_of_the_templates_is_refused() {
        let hub = Hub::new(HubConfig::default());
        let _subs: Vec<_> = (0..300)
            .map(|i| subscribe_to(&hub, &format!("/t/{{x}}{i}"), None))
            .collect();
        let draft = |n: usize, len: usize| Draft {
            topics: (0..n)
                .map(|i| format!("/t/{}{i}", "x".repeat(len)))
                .collect(),
            data: "x".to_owned(),
            ..Draft::default()
        };
        assert_eq!(
            hub.publish_now(draft(250, 4000)).unwrap_err(),
            Invalid::TooMuchMatching {
                topics: 250,
                templates: 300
            }
        );
        assert_eq!(hub.history_len(), 0, "nothing stored");
        assert!(hub.publish_now(draft(10, 300)).is_ok());
        // In cluster mode nothing can be refused: matched all the same.
        hub.apply(draft(250, 4000), update::new_id(), now_ms());
        assert_eq!(hub.history_len(), 2);
    }

    /// An in-memory connection for direct writes: takes at most `room` bytes a call and keeps
    /// the rest, as a real sink does (unframed, so the test reads events straight off it).
    #[derive(Default)]
    struct Socket {
        room: AtomicUsize,
        wire: parking_lot::Mutex<Vec<u8>>,
        rest: parking_lot::Mutex<Vec<u8>>,
    }

    impl DirectSink for Socket {
        fn try_send(&self, events: &[u8]) -> Sent {
            let n = events.len().min(self.room.load(Relaxed));
            self.wire.lock().extend_from_slice(&events[..n]);
            if n == events.len() {
                return Sent::All;
            }
            self.rest.lock().extend_from_slice(&events[n..]);
            Sent::Partly
        }
    }

    /// A hub that may batch (bound 10 s), a subscriber to `t` whose stream writes to an
    /// in-memory socket that takes everything, and a count of its task's wake-ups.
    fn hub_with_sink() -> (Hub, SubscriberStream, Arc<Socket>, Arc<Count>) {
        let hub = Hub::new(HubConfig {
            coalesce: Duration::from_secs(10),
            ..HubConfig::default()
        });
        let stream = subscribe(&hub);
        let socket = Arc::new(Socket::default());
        socket.room.store(usize::MAX, Relaxed);
        stream.attach_sink(socket.clone());
        (hub, stream, socket, Arc::new(Count(AtomicUsize::new(0))))
    }

    /// An idle stream with a sink is written by the publisher; a short write leaves the rest
    /// to the stream's task, ahead of what was queued meanwhile; nothing is written directly
    /// while the hub batches, nor to a stream that is busy; the sink goes with the stream.
    #[tokio::test]
    async fn direct_writes_keep_the_order_and_leave_the_rest_to_the_task() {
        let (hub, mut stream, socket, count) = hub_with_sink();
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let direct = |hub: &Hub| hub.metrics().direct_writes.load(Relaxed);

        publish(&hub, 1);
        assert_eq!(direct(&hub), 0, "the opening is not written yet: queued");
        for expected in [0, 1] {
            let Poll::Ready(Some(Wire::Data(c))) = stream.poll_wire(&mut cx) else {
                panic!("the opening, then the update")
            };
            assert_eq!(events(&c), expected);
        }
        assert!(stream.poll_wire(&mut cx).is_pending(), "now idle");

        let woken = count.0.load(Relaxed);
        publish(&hub, 2);
        assert_eq!(direct(&hub), 2, "both written by the publisher");
        assert_eq!(events(&socket.wire.lock()), 2);
        assert_eq!(count.0.load(Relaxed), woken, "the task was not woken");
        assert!(stream.poll_wire(&mut cx).is_pending());

        // The socket takes 3 bytes of the next one; the next two queue behind the rest.
        socket.room.store(3, Relaxed);
        publish(&hub, 1);
        assert_eq!(direct(&hub), 3);
        assert_eq!(count.0.load(Relaxed), woken + 1, "woken for the rest");
        publish(&hub, 2);
        assert_eq!(direct(&hub), 3, "a stream with bytes to finish is not idle");
        let Poll::Ready(Some(Wire::FinishDirect)) = stream.poll_wire(&mut cx) else {
            panic!("the rest of the short write first")
        };
        let mut wire = socket.wire.lock().clone();
        wire.append(&mut socket.rest.lock());
        assert_eq!(events(&wire), 3, "the short write completed: {wire:?}");
        let Poll::Ready(Some(Wire::Data(queued))) = stream.poll_wire(&mut cx) else {
            panic!("then what queued meanwhile")
        };
        assert_eq!(events(&queued), 2);
        assert!(stream.poll_wire(&mut cx).is_pending());

        // Past the write budget the hub batches: the stream's task writes, within its window.
        hub.shared.coalescing.set_window(Duration::from_millis(50));
        socket.room.store(usize::MAX, Relaxed);
        publish(&hub, 1);
        assert_eq!(direct(&hub), 3, "no direct write while batching");
        assert!(matches!(
            stream.poll_wire(&mut cx),
            Poll::Ready(Some(Wire::Data(_)))
        ));

        assert_eq!(Arc::strong_count(&socket), 2);
        drop(stream);
        assert_eq!(
            Arc::strong_count(&socket),
            1,
            "the sink goes with the stream"
        );
        assert_eq!(hub.subscriber_count(), 0);
    }

    /// Past the write budget, an update for a waiting stream inside its window is held: its
    /// task is not woken, and the flusher writes everything queued meanwhile as one chunk when
    /// the window opens. (Paused time: the flusher sleeps on the hub's clock.)
    #[tokio::test(start_paused = true)]
    async fn held_updates_are_written_by_the_flusher_when_the_window_opens() {
        let (hub, mut stream, socket, count) = hub_with_sink();
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let flushed = |hub: &Hub| hub.metrics().coalesced_writes.load(Relaxed);
        assert!(matches!(stream.poll_wire(&mut cx), Poll::Ready(Some(_))));
        // Long enough that a loaded machine does not see the window pass between two lines.
        hub.shared.coalescing.set_window(Duration::from_millis(500));

        publish(&hub, 1);
        let Poll::Ready(Some(Wire::Data(first))) = stream.poll_wire(&mut cx) else {
            panic!("the first update after a quiet spell goes out at once, by the task")
        };
        assert_eq!(events(&first), 1);
        assert!(stream.poll_wire(&mut cx).is_pending());

        let woken = count.0.load(Relaxed);
        publish(&hub, 3);
        assert_eq!(count.0.load(Relaxed), woken, "held: the task is not woken");
        assert_eq!(events(&socket.wire.lock()), 0, "nothing written yet");
        let held_at = tokio::time::Instant::now();
        while events(&socket.wire.lock()) < 3 {
            assert!(
                held_at.elapsed() < Duration::from_secs(10),
                "the flusher wrote nothing"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Within the flusher's millisecond of the window's end (at most 500 ms after the first
        // write, which came just before).
        let waited = held_at.elapsed();
        assert!(waited <= Duration::from_millis(501), "{waited:?}");
        assert!(waited >= Duration::from_millis(498), "{waited:?}");
        assert_eq!(
            events(&socket.wire.lock()),
            3,
            "written when the window opened"
        );
        assert_eq!(flushed(&hub), 1, "as one write");
        assert_eq!(
            count.0.load(Relaxed),
            woken,
            "still without waking the task"
        );
        assert!(
            stream.poll_wire(&mut cx).is_pending(),
            "nothing left to write"
        );
        assert_eq!(hub.metrics().direct_writes.load(Relaxed), 0);

        // A queue half full wakes the task, which writes at once, window or not.
        hub.shared.coalescing.set_window(Duration::from_secs(10));
        publish(&hub, 1);
        assert_eq!(count.0.load(Relaxed), woken, "held again");
        publish(&hub, 499);
        assert_eq!(count.0.load(Relaxed), woken + 1, "half full: woken");
        let Poll::Ready(Some(Wire::Data(all))) = stream.poll_wire(&mut cx) else {
            panic!("the task writes the whole queue")
        };
        assert_eq!(events(&all), 500);
        assert!(stream.poll_wire(&mut cx).is_pending());
        assert_eq!(flushed(&hub), 1);
        assert_eq!(events(&socket.wire.lock()), 3);
    }
}
