//! The outcome of one run: a table for people, JSON for scripts (`bench/compare.sh` reads it).

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub subscribers: u64,
    pub slow: u64,
    pub topics: u64,
    pub size: u64,
    /// How subscribers spoke: `http/1.1`, `https/1.1` (TLS) or `h2` (TLS, HTTP/2).
    pub protocol: String,
    /// Subscribers (over HTTP/2, streams) whose stream opened.
    pub connected: u64,
    /// The connections carrying them (fewer than `connected` with several HTTP/2 streams each).
    pub connections: u64,
    pub connect_failed: u64,
    pub connect_secs: f64,
    pub updates: u64,
    pub published: u64,
    pub publish_failed: u64,
    pub rate_requested: f64,
    pub rate_achieved: f64,
    /// How far behind its schedule the latest publish went out (latencies count from the
    /// schedule, so this delay is in them).
    pub publish_lag_max_ms: f64,
    /// From sending a publish to reading its answer, over the publishes answered: how fast
    /// the server takes publishes, apart from delivering them. (Each publisher connection
    /// waits for its answer before its next publish, so slow answers make the lag above.)
    pub publish_answer_ms: Latency,
    /// Deliveries owed to the reading subscribers that connected, for the updates that were
    /// accepted.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub foreign_events: u64,
    pub disconnected: u64,
    /// Of the disconnected, the streams that ended in an error (an HTTP/2 stream reset, a
    /// broken connection) rather than cleanly.
    pub reset: u64,
    /// Never-reading subscribers whose connection the server had closed by the end.
    pub slow_dropped: u64,
    /// Stopped by `--timeout` with deliveries missing.
    pub timed_out: bool,
    /// Publish start to last delivery (or timeout).
    pub run_secs: f64,
    pub latency_ms: Latency,
    pub server: Option<ServerFigures>,
    pub bench_cpu_secs: f64,
    pub first_error: Option<String>,
    /// The first publish that failed, with the server's reason (the run is then an error).
    pub first_publish_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    /// The quantiles of a histogram of microseconds, in milliseconds.
    pub fn from_micros(h: &hdrhistogram::Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerFigures {
    pub pids: Vec<u32>,
    pub rss_idle_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_end_kib: u64,
    /// (connected - idle) / subscribers connected.
    pub rss_per_subscriber_kib: f64,
    /// (connected - idle) / connections: the same as per subscriber unless HTTP/2 streams
    /// share connections.
    pub rss_per_connection_kib: f64,
    /// CPU while subscribers connected.
    pub cpu_connect_secs: f64,
    /// CPU from the first publish to the last delivery.
    pub cpu_secs: f64,
    pub deliveries_per_cpu_sec: f64,
}

impl Report {
    /// A plain table, one figure per line.
    pub fn table(&self) -> String {
        let mut rows: Vec<(&str, String)> = vec![
            ("target", format!("{} {}", self.target, self.label)),
            (
                "subscribers",
                format!(
                    "{} connected of {} ({} failed, {} slow, {} topics) in {:.1} s, {} on {} connections",
                    self.connected,
                    self.subscribers + self.slow,
                    self.connect_failed,
                    self.slow,
                    self.topics,
                    self.connect_secs,
                    self.protocol,
                    self.connections
                ),
            ),
            (
                "published",
                format!(
                    "{} of {} ({} failed), {:.0}/s of {:.0}/s asked, {} bytes, at most {:.1} ms behind schedule",
                    self.published,
                    self.updates,
                    self.publish_failed,
                    self.rate_achieved,
                    self.rate_requested,
                    self.size,
                    self.publish_lag_max_ms
                ),
            ),
            (
                "publish answered ms",
                format!(
                    "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                    self.publish_answer_ms.p50,
                    self.publish_answer_ms.p90,
                    self.publish_answer_ms.p99,
                    self.publish_answer_ms.p999,
                    self.publish_answer_ms.max
                ),
            ),
            (
                "delivered",
                format!(
                    "{} of {} expected{}",
                    self.delivered,
                    self.expected,
                    if self.timed_out { " (timed out)" } else { "" }
                ),
            ),
            (
                "lost / duplicates",
                format!("{} / {}", self.lost, self.duplicates),
            ),
            (
                "disconnected",
                format!("{} ({} in an error or reset)", self.disconnected, self.reset),
            ),
            (
                "latency ms",
                format!(
                    "p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                    self.latency_ms.p50,
                    self.latency_ms.p90,
                    self.latency_ms.p99,
                    self.latency_ms.p999,
                    self.latency_ms.max
                ),
            ),
        ];
        if self.slow > 0 {
            rows.push((
                "slow dropped",
                format!("{} of {}", self.slow_dropped, self.slow),
            ));
        }
        if let Some(s) = &self.server {
            rows.push((
                "server RSS KiB",
                format!(
                    "idle {}  connected {}  peak {}  end {}  ({:.2} per subscriber, {:.2} per connection)",
                    s.rss_idle_kib,
                    s.rss_connected_kib,
                    s.rss_peak_kib,
                    s.rss_end_kib,
                    s.rss_per_subscriber_kib,
                    s.rss_per_connection_kib
                ),
            ));
            rows.push((
                "server CPU s",
                format!(
                    "{:.2} publishing ({:.2} connecting)",
                    s.cpu_secs, s.cpu_connect_secs
                ),
            ));
            rows.push((
                "deliveries/CPU-s",
                format!("{:.0}", s.deliveries_per_cpu_sec),
            ));
        }
        rows.push(("bench CPU s", format!("{:.2}", self.bench_cpu_secs)));
        if let Some(e) = &self.first_error {
            rows.push(("first error", e.clone()));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:>width$}  {v}\n"))
            .collect()
    }
}
