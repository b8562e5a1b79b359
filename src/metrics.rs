//! The hub's figures, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics rather than a metrics registry: the fan-out path bumps them once per publish
//! (never once per delivery), and the rendering is a page of `format!`. The publish-latency
//! histogram has fixed buckets, so it never grows.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a subscriber's stream ended, as logged and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// More than `--subscriber-queue` updates behind.
    Slow,
    /// Its token's `exp` passed.
    Expired,
    /// The hub is shutting down.
    Shutdown,
    /// The stream reached `--max-stream-lifetime` (the client resumes with `Last-Event-ID`).
    Lifetime,
}

impl DropReason {
    pub const ALL: [DropReason; 4] = [
        DropReason::Slow,
        DropReason::Expired,
        DropReason::Shutdown,
        DropReason::Lifetime,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Slow => "slow",
            DropReason::Expired => "expired",
            DropReason::Shutdown => "shutdown",
            DropReason::Lifetime => "lifetime",
        }
    }
}

/// Why a subscription with URI templates was refused, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateRefusal {
    /// `--template-memory` was full.
    Memory,
    /// An anonymous subscriber, with `--anonymous-templates false`.
    Anonymous,
}

impl TemplateRefusal {
    pub const ALL: [TemplateRefusal; 2] = [TemplateRefusal::Memory, TemplateRefusal::Anonymous];

    pub fn as_str(self) -> &'static str {
        match self {
            TemplateRefusal::Memory => "memory",
            TemplateRefusal::Anonymous => "anonymous",
        }
    }
}

const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Updates in one commit of the durable history.
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 256.0, 1024.0];

/// A histogram with fixed bucket bounds, updated without a lock.
struct Buckets<const N: usize> {
    counts: [AtomicU64; N],
    count: AtomicU64,
    /// In the unit's billionths (nanoseconds for seconds), to stay an integer.
    sum_nanos: AtomicU64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Buckets<N> {
    fn observe(&self, bounds: &[f64; N], value: f64) {
        for (bound, bucket) in bounds.iter().zip(&self.counts) {
            if value <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add((value * 1e9) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, bounds: &[f64; N], name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        // As for the publish histogram: valid (never decreasing) rather than exact.
        let mut seen = 0;
        for (bound, bucket) in bounds.iter().zip(&self.counts) {
            seen = bucket.load(Relaxed).max(seen);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {seen}");
        }
        let count = self.count.load(Relaxed).max(seen);
        let _ = write!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {}\n{name}_count {count}\n",
            self.sum_nanos.load(Relaxed) as f64 / 1e9
        );
    }
}

/// Where the hub's batching stands (see `hub::coalesce`), shown with the counters.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// Socket writes a second the hub allows itself before it batches.
    pub write_budget: u64,
    /// The current wait after a write to a subscriber for further updates to share the next.
    pub window: Duration,
    /// How busy the cores were at the last retune, 0 to 1.
    pub cpu_busy: f64,
}

#[derive(Default)]
pub struct Metrics {
    /// Commits of the durable history, and the size of its file after the last.
    pub store_commits: AtomicU64,
    pub store_bytes: AtomicU64,
    store_batches: Buckets<{ BATCH_BUCKETS.len() }>,
    store_commit_time: Buckets<{ LATENCY_BUCKETS.len() }>,
    pub subscribers_connected: AtomicU64,
    pub subscribers_total: AtomicU64,
    pub subscribers_refused: AtomicU64,
    /// Connections open now, every protocol.
    pub connections_open: AtomicU64,
    /// Connections closed since the start (for handing memory back, see `hub::trim`).
    pub connections_closed: AtomicU64,
    /// Event streams refused because the hub held more than `--max-connections` connections.
    pub connections_refused: AtomicU64,
    /// Idle connections closed early to make room for new ones.
    pub connections_evicted: AtomicU64,
    /// `accept` failures (out of descriptors, most likely).
    pub accept_errors: AtomicU64,
    pub updates_published: AtomicU64,
    pub updates_rejected: AtomicU64,
    pub deliveries: AtomicU64,
    /// Deliveries written by the publishing thread straight to the socket.
    pub direct_writes: AtomicU64,
    /// Socket writes of held updates made by the coalescing flusher.
    pub coalesced_writes: AtomicU64,
    /// Chunks of queued updates a stream's own task took to write (HTTP/2, TLS, and HTTP/1.1
    /// streams whose updates were not written directly or by the flusher).
    pub task_writes: AtomicU64,
    /// Publish requests answered by the hub's own HTTP/1.1 path rather than hyper.
    pub plain_publishes: AtomicU64,
    /// Times a cluster node found stream entries removed before it had read them.
    pub cluster_gaps: AtomicU64,
    dropped: [AtomicU64; 4],
    pub history_len: AtomicU64,
    pub history_bytes: AtomicU64,
    /// `--history-size` and `--history-bytes`, shown beside what is kept.
    pub history_limits: (AtomicU64, AtomicU64),
    /// Bytes the compiled URI templates kept are charged, and `--template-memory`.
    pub template_memory: AtomicU64,
    pub template_memory_limit: AtomicU64,
    /// Compiled URI templates kept, and compilations since the start.
    pub templates: AtomicU64,
    pub templates_compiled: AtomicU64,
    /// Tests of a topic against one URI template or URL pattern, since the start: what the
    /// template index did not spare a publish.
    pub template_tests: AtomicU64,
    /// Subscriptions refused for their URI templates, by [`TemplateRefusal`].
    templates_refused: [AtomicU64; 2],
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
}

impl Metrics {
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }

    pub fn template_refused(&self, why: TemplateRefusal) {
        self.templates_refused[why as usize].fetch_add(1, Relaxed);
    }

    pub fn templates_refused(&self, why: TemplateRefusal) -> u64 {
        self.templates_refused[why as usize].load(Relaxed)
    }

    /// A commit of the durable history (successful or not): its updates, how long it took,
    /// and the file's size after it.
    pub fn observe_commit(&self, updates: usize, took: Duration, file_bytes: u64) {
        self.store_commits.fetch_add(1, Relaxed);
        self.store_batches.observe(&BATCH_BUCKETS, updates as f64);
        self.store_commit_time
            .observe(&LATENCY_BUCKETS, took.as_secs_f64());
        self.observe_store_size(file_bytes);
    }

    pub fn observe_store_size(&self, file_bytes: u64) {
        self.store_bytes.store(file_bytes, Relaxed);
    }

    pub fn observe_publish(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The Prometheus text exposition format, version 0.0.4. `batching` is where the hub's
    /// coalescing stands now (its budget is measured, and shared when cluster nodes share a
    /// machine).
    pub fn render(&self, batching: Batching) -> String {
        let mut out = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
            );
        };
        one(
            "ssehub_subscribers_connected",
            "gauge",
            "Subscribers connected now.",
            self.subscribers_connected.load(Relaxed),
        );
        one(
            "ssehub_subscribers_total",
            "counter",
            "Subscriptions started since the hub started.",
            self.subscribers_total.load(Relaxed),
        );
        one(
            "ssehub_subscribers_refused_total",
            "counter",
            "Subscribers refused because the hub had --max-connections subscribers.",
            self.subscribers_refused.load(Relaxed),
        );
        one(
            "ssehub_connections_open",
            "gauge",
            "Connections open now, of every protocol (HTTP/1.1, HTTP/2, TLS), idle ones included.",
            self.connections_open.load(Relaxed),
        );
        one(
            "ssehub_connections_refused_total",
            "counter",
            "Event streams refused (503) because the hub held more than --max-connections \
             connections; publishes and health checks were still served, on the reserve.",
            self.connections_refused.load(Relaxed),
        );
        one(
            "ssehub_connections_evicted_total",
            "counter",
            "Idle connections closed before their idle timeout to make room for a new one, \
             when --max-connections and the reserve beyond it were all in use.",
            self.connections_evicted.load(Relaxed),
        );
        one(
            "ssehub_accept_errors_total",
            "counter",
            "Connections the hub failed to accept (out of file descriptors, most likely); \
             it waits for one to close before it tries again.",
            self.accept_errors.load(Relaxed),
        );
        one(
            "ssehub_deliveries_total",
            "counter",
            "Updates queued for or written to a subscriber (one update reaching one subscriber).",
            self.deliveries.load(Relaxed),
        );
        one(
            "ssehub_direct_writes_total",
            "counter",
            "Deliveries written to the socket by the publishing thread itself (an idle HTTP/1.1 \
             stream, the hub within its write budget) rather than by the stream's own task.",
            self.direct_writes.load(Relaxed),
        );
        one(
            "ssehub_coalesced_writes_total",
            "counter",
            "Socket writes made by the hub's flusher when a held subscriber's coalescing window \
             opened (each carries every update queued for it meanwhile, as one chunk).",
            self.coalesced_writes.load(Relaxed),
        );
        one(
            "ssehub_plain_publishes_total",
            "counter",
            "Publish requests read and answered by the hub's own HTTP/1.1 path (a Content-Length \
             body sent with its head); the others (HTTP/2, TLS with h2, chunked bodies, \
             Expect) go through hyper, which costs more per request.",
            self.plain_publishes.load(Relaxed),
        );
        one(
            "ssehub_cluster_gaps_total",
            "counter",
            "Times this cluster node found that entries of the update stream were trimmed or \
             deleted in Redis before it read them: updates it never delivered (its reader was \
             cut off or behind for longer than the stream's length lasts).",
            self.cluster_gaps.load(Relaxed),
        );
        one(
            "ssehub_task_writes_total",
            "counter",
            "Chunks of queued updates written by a stream's own task (HTTP/2, TLS, and HTTP/1.1 \
             streams whose updates were neither written directly nor by the flusher).",
            self.task_writes.load(Relaxed),
        );
        one(
            "ssehub_write_budget",
            "gauge",
            "Socket writes a second this hub allows itself before it batches updates: with \
             --write-budget auto, unbounded (10,000,000 a core) while its cores have room and \
             stepped down while they are busy; with a number, that times its cores, divided \
             among the cluster nodes on this machine.",
            batching.write_budget,
        );
        one(
            "ssehub_history_length",
            "gauge",
            "Updates kept for Last-Event-ID replay.",
            self.history_len.load(Relaxed),
        );
        one(
            "ssehub_history_bytes",
            "gauge",
            "Bytes of updates kept for Last-Event-ID replay (encoded updates, ids and topics).",
            self.history_bytes.load(Relaxed),
        );
        one(
            "ssehub_history_size_limit",
            "gauge",
            "--history-size: the most updates kept for replay.",
            self.history_limits.0.load(Relaxed),
        );
        one(
            "ssehub_history_bytes_limit",
            "gauge",
            "--history-bytes: the most bytes of updates kept for replay.",
            self.history_limits.1.load(Relaxed),
        );
        one(
            "ssehub_template_memory_bytes",
            "gauge",
            "Bytes the compiled URI templates kept by the hub are charged (held by subscribers, \
             or kept for reuse until room is needed).",
            self.template_memory.load(Relaxed),
        );
        one(
            "ssehub_template_memory_limit_bytes",
            "gauge",
            "--template-memory: the most the compiled URI templates may be charged.",
            self.template_memory_limit.load(Relaxed),
        );
        one(
            "ssehub_templates",
            "gauge",
            "Compiled URI templates kept by the hub.",
            self.templates.load(Relaxed),
        );
        one(
            "ssehub_templates_compiled_total",
            "counter",
            "URI templates compiled since the hub started.",
            self.templates_compiled.load(Relaxed),
        );
        one(
            "ssehub_template_tests_total",
            "counter",
            "Tests of a published topic against one URI template or URL pattern, since the hub started (those the template index found as candidates).",
            self.template_tests.load(Relaxed),
        );
        let _ = write!(
            out,
            "# HELP ssehub_coalesce_window_seconds How long a subscriber's further updates wait \
             after a write to it, to share the next one: 0 while the hub is within its write \
             budget.\n# TYPE ssehub_coalesce_window_seconds gauge\n\
             ssehub_coalesce_window_seconds {}\n",
            batching.window.as_secs_f64()
        );
        let _ = write!(
            out,
            "# HELP ssehub_cpu_busy_ratio How busy the cores the hub runs on were at the last \
             retune of its batching (the busier of the machine and the process on the cores it \
             may use; a running average, 0 to 1). With --write-budget auto the hub batches more \
             above 0.85 and less below 0.70.\n# TYPE ssehub_cpu_busy_ratio gauge\n\
             ssehub_cpu_busy_ratio {}\n",
            batching.cpu_busy
        );
        let _ = writeln!(
            out,
            "# HELP ssehub_template_subscriptions_refused_total Subscriptions refused for their URI templates, by reason: memory (--template-memory was full, 503) or anonymous (--anonymous-templates false, 403).\n\
             # TYPE ssehub_template_subscriptions_refused_total counter"
        );
        for r in TemplateRefusal::ALL {
            let _ = writeln!(
                out,
                "ssehub_template_subscriptions_refused_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.templates_refused(r)
            );
        }
        let _ = write!(
            out,
            "# HELP ssehub_updates_published_total Updates by outcome: accepted (publish requests, and with --subscriptions the hub's own subscription events) or rejected (publish requests).\n\
             # TYPE ssehub_updates_published_total counter\n\
             ssehub_updates_published_total{{outcome=\"accepted\"}} {}\n\
             ssehub_updates_published_total{{outcome=\"rejected\"}} {}\n",
            self.updates_published.load(Relaxed),
            self.updates_rejected.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP ssehub_subscribers_dropped_total Subscriber streams ended by the hub, by reason.\n\
             # TYPE ssehub_subscribers_dropped_total counter"
        );
        for r in DropReason::ALL {
            let _ = writeln!(
                out,
                "ssehub_subscribers_dropped_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.dropped_count(r)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ssehub_publish_duration_seconds Time to accept, store and fan out one update.\n\
             # TYPE ssehub_publish_duration_seconds histogram"
        );
        // Read while publishes go on, the counters may each include an observation the next
        // does not yet: keep the exposition valid (buckets never decreasing, none above the
        // count) rather than exact to the last publish.
        let mut seen = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency_buckets) {
            seen = bucket.load(Relaxed).max(seen);
            let _ = writeln!(
                out,
                "ssehub_publish_duration_seconds_bucket{{le=\"{bound}\"}} {seen}"
            );
        }
        let count = self.latency_count.load(Relaxed).max(seen);
        let _ = write!(
            out,
            "ssehub_publish_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             ssehub_publish_duration_seconds_sum {}\n\
             ssehub_publish_duration_seconds_count {count}\n",
            self.latency_sum_ns.load(Relaxed) as f64 / 1e9
        );
        let _ = write!(
            out,
            "# HELP ssehub_store_commits_total Transactions written to the durable history (--data-dir), each one fsync.\n\
             # TYPE ssehub_store_commits_total counter\n\
             ssehub_store_commits_total {}\n\
             # HELP ssehub_store_bytes Size of the durable history's file on disk.\n\
             # TYPE ssehub_store_bytes gauge\n\
             ssehub_store_bytes {}\n",
            self.store_commits.load(Relaxed),
            self.store_bytes.load(Relaxed)
        );
        self.store_batches.render(
            &mut out,
            &BATCH_BUCKETS,
            "ssehub_store_updates_per_commit",
            "Updates written by one commit of the durable history (publishes that arrived together).",
        );
        self.store_commit_time.render(
            &mut out,
            &LATENCY_BUCKETS,
            "ssehub_store_commit_seconds",
            "Time to write and fsync one commit of the durable history.",
        );
        out
    }
}
