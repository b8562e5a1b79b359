//! `ssehub bench --soak 30m`: mixed load for a long time, to show whether the server gives back
//! the memory and file descriptors of clients that have come and gone.
//!
//! A steady population of reading subscribers, each staying a random lifetime before it leaves
//! and another takes its place (some come back with `Last-Event-ID` and must receive what they
//! missed); a few that never read, replaced once the server has dropped them; publishers at a
//! steady rate; a trickle of bad requests. Every `--sample` the server's RSS and open
//! descriptors are recorded beside the bench's own counts.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::load::{self, Counts, OnAccepted, Plan};
use super::process::{Proc, Server};
use super::report::Latency;
use super::wire::{self, EventBody};
use super::{parse_duration, progress, BenchArgs, Peer};
use ssehub_sse::Event;

/// How long a resuming subscriber stays away: long enough for updates to be published in the
/// meantime, which the server must then replay.
const AWAY: std::ops::Range<Duration> = Duration::from_millis(100)..Duration::from_secs(2);

/// How long a leaving subscriber keeps reading for updates it is owed (accepted by the server
/// before it decided to leave); what is still missing then counts as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Updates published to a never-reading subscriber's topics before it looks whether the server
/// has dropped it: what the kernel can hold for a client that does not read, plus twice
/// ssehub's default `--subscriber-queue` (1,000). On loopback the server's send buffer grows
/// to the maximum of `net.ipv4.tcp_wmem` (4 MiB by default, about half of it data), so with
/// small updates it is the kernel, not the hub's queue, that a slow client fills first.
fn slow_patience(size: usize) -> u64 {
    let send_buffer = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    // An update on the wire: the payload, `id: urn:uuid:…`, `data: `, and chunk framing.
    let per_update = size as u64 + 64;
    send_buffer / per_update + 2 * 1000
}

/// ssehub closes a connection that sends no request within 10 s; one still open after this
/// long is reported.
const SILENT_LIMIT: Duration = Duration::from_secs(30);

/// Pause between the end of the load and the last sample, so that the server has seen every
/// connection close.
const AFTER_SETTLE: Duration = Duration::from_secs(5);

/// Flags of the soak; the population, rate and topics are the ordinary bench flags.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Soak")]
pub struct SoakArgs {
    /// Run mixed load for this long (e.g. 30m) instead of publishing --updates, with clients
    /// connecting and leaving, and record the server's memory and open descriptors over time.
    #[arg(long, value_parser = parse_duration, conflicts_with_all = ["updates", "settle", "timeout"])]
    pub soak: Option<Duration>,
    /// How often the soak records a sample.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub sample: Duration,
    /// How long a reading subscriber stays before it leaves, drawn evenly from MIN..MAX.
    #[arg(long, default_value = "1s..60s", value_parser = parse_lifetime)]
    pub lifetime: Lifetime,
    /// The share of leaving subscribers that come back shortly with Last-Event-ID (and must
    /// receive every update they missed).
    #[arg(long, default_value_t = 0.25)]
    pub resume: f64,
    /// Bad requests per second against ssehub: a wrong token (401), no topic (400), a
    /// connection that sends nothing (closed by the hub); 0 for none.
    #[arg(long, default_value_t = 1.0)]
    pub bad_rate: f64,
}

/// The range a subscriber's lifetime is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub min: Duration,
    pub max: Duration,
}

/// `1s..60s`, or one duration for a fixed lifetime.
pub fn parse_lifetime(s: &str) -> Result<Lifetime, String> {
    let (min, max) = match s.split_once("..") {
        Some((a, b)) => (parse_duration(a)?, parse_duration(b)?),
        None => {
            let d = parse_duration(s)?;
            (d, d)
        }
    };
    if min.is_zero() || min > max {
        return Err(format!(
            "{s:?} is not a lifetime range: write MIN..MAX with 0 < MIN <= MAX, like 1s..60s"
        ));
    }
    Ok(Lifetime { min, max })
}

impl Lifetime {
    fn draw(&self, rng: &mut StdRng) -> Duration {
        if self.min == self.max {
            self.min
        } else {
            rng.random_range(self.min..self.max)
        }
    }
}

/// Sockets a soak holds beyond its population and publishers: the bad requests in flight (a
/// silent connection lives until the hub closes it) and a sampler's request.
pub fn extra_sockets(args: &SoakArgs) -> u64 {
    match args.soak {
        Some(_) => (args.bad_rate.max(0.0) * SILENT_LIMIT.as_secs_f64()).ceil() as u64 + 1,
        None => 0,
    }
}

/// One update the server accepted, as the publisher saw it.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    seq: u64,
    sent_ns: u64,
    acked_ns: u64,
}

/// Running totals of the soak beyond those the ordinary run keeps in [`Counts`].
#[derive(Default)]
struct Churn {
    /// Subscriber connections open now (readers and slow ones).
    open: AtomicU64,
    disconnects: AtomicU64,
    resumed: AtomicU64,
    /// Events a resumed subscriber received that were published before it came back.
    replayed: AtomicU64,
    sessions_checked: AtomicU64,
    lost: AtomicU64,
    resumed_lost: AtomicU64,
    resumed_duplicates: AtomicU64,
    /// Readers whose stream the server ended before they left.
    readers_cut: AtomicU64,
    slow_connects: AtomicU64,
    slow_dropped: AtomicU64,
    slow_kept: AtomicU64,
    bad_as_expected: AtomicU64,
    bad_unexpected: AtomicU64,
}

/// What every task of the soak shares.
struct Soak {
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    churn: Churn,
    /// Accepted updates per topic, oldest first, kept as long as a subscriber may be owed them.
    accepted: Vec<Mutex<VecDeque<Accepted>>>,
    retention_ns: u64,
    /// Numbers connections, which spreads them over the source addresses.
    next_connection: AtomicUsize,
    connect_gate: tokio::sync::Semaphore,
    lifetime: Lifetime,
    resume: f64,
    slow_patience: u64,
    /// ssehub's path for subscribe and publish, when the target is ssehub (bad requests and
    /// `/metrics` are shaped for it).
    hub_path: Option<String>,
}

/// A reader's view of one topic across one connection, or two when it resumes.
struct Session {
    topic: usize,
    /// Updates sent after this wall-clock time are owed to the subscriber.
    owed_from_ns: u64,
    seen: HashSet<u64>,
    /// The id of the last event received, sent as `Last-Event-ID` when it resumes.
    last_id: String,
    resumed: bool,
}

/// How a reader's connection ended.
enum Left {
    /// It left on purpose and will come back with `Last-Event-ID`.
    ToResume(Session),
    /// It left (or the run ended) and its deliveries were checked.
    Checked,
    /// It could not connect, or the server ended its stream.
    Failed,
}

impl Soak {
    fn error(&self, e: impl std::fmt::Display) {
        self.counts.error(e);
    }

    fn connection_index(&self) -> usize {
        self.next_connection.fetch_add(1, Relaxed)
    }

    fn accept(&self, seq: u64, topic: usize, sent_ns: u64) {
        let acked_ns = load::now_ns();
        let mut log = self.accepted[topic].lock();
        while log
            .front()
            .is_some_and(|a| a.acked_ns + self.retention_ns < acked_ns)
        {
            log.pop_front();
        }
        log.push_back(Accepted {
            seq,
            sent_ns,
            acked_ns,
        });
    }

    /// The updates `session` is owed at `now_ns` and has not received: on its topic, sent after
    /// it was subscribed and accepted by now.
    fn missing(&self, session: &Session, now_ns: u64) -> HashSet<u64> {
        self.accepted[session.topic]
            .lock()
            .iter()
            .filter(|a| a.sent_ns > session.owed_from_ns && a.acked_ns <= now_ns)
            .filter(|a| !session.seen.contains(&a.seq))
            .map(|a| a.seq)
            .collect()
    }

    /// One reader slot: a subscriber that comes, stays a while, leaves (sometimes to come back
    /// with `Last-Event-ID`), and is followed by the next, until `stop`.
    async fn reader(self: Arc<Self>, seed: u64, stop: CancellationToken) {
        let mut rng = StdRng::seed_from_u64(seed);
        let topics = self.plan.sub_requests.len();
        while !stop.is_cancelled() {
            let session = Session {
                topic: rng.random_range(0..topics),
                owed_from_ns: 0,
                seen: HashSet::new(),
                last_id: String::new(),
                resumed: false,
            };
            let resume = rng.random_bool(self.resume);
            let lifetime = self.lifetime.draw(&mut rng);
            match self.session(session, lifetime, resume, &stop).await {
                Left::ToResume(session) => {
                    let away = rng.random_range(AWAY);
                    tokio::select! {
                        _ = tokio::time::sleep(away) => {}
                        _ = stop.cancelled() => return,
                    }
                    let lifetime = self.lifetime.draw(&mut rng);
                    if let Left::Failed = self.session(session, lifetime, false, &stop).await {
                        pause(&stop).await;
                    }
                }
                Left::Checked => {}
                Left::Failed => pause(&stop).await,
            }
        }
    }

    /// Connects (resuming when `session` has a last id), reads and checks every event for
    /// `lifetime`, then leaves: to come back when `resume`, else after waiting for what it is
    /// owed and counting what never came.
    async fn session(
        &self,
        mut session: Session,
        lifetime: Duration,
        resume: bool,
        stop: &CancellationToken,
    ) -> Left {
        let plan = &self.plan;
        let mut request = plan.sub_requests[session.topic].clone();
        if !session.last_id.is_empty() {
            // The prepared request ends with its blank line: the header goes before it.
            request.truncate(request.len() - 2);
            request.extend_from_slice(
                format!("Last-Event-ID: {}\r\n\r\n", session.last_id).as_bytes(),
            );
            session.resumed = true;
        }
        let (mut stream, pending, head) = match self.open(&request, None).await {
            Ok(v) => v,
            Err(e) => {
                self.counts.connect_failed.fetch_add(1, Relaxed);
                self.error(format!("subscribe: {e:#}"));
                return Left::Failed;
            }
        };
        let head_ns = load::now_ns();
        if !session.resumed {
            session.owed_from_ns = head_ns;
        }
        self.counts.connected.fetch_add(1, Relaxed);
        self.churn.open.fetch_add(1, Relaxed);
        if session.resumed {
            self.churn.resumed.fetch_add(1, Relaxed);
        }
        let left = self
            .read(
                &mut stream,
                pending,
                head,
                head_ns,
                &mut session,
                lifetime,
                resume,
                stop,
            )
            .await;
        drop(stream);
        self.churn.open.fetch_sub(1, Relaxed);
        self.churn.disconnects.fetch_add(1, Relaxed);
        match left {
            Reading::Away => Left::ToResume(session),
            Reading::Checked => Left::Checked,
            Reading::Cut(why) => {
                self.churn.readers_cut.fetch_add(1, Relaxed);
                self.error(format!("a reader's stream ended early: {why}"));
                Left::Failed
            }
        }
    }

    /// Reads `stream` until the lifetime ends (or `stop`); then, unless the subscriber will
    /// resume, keeps reading until every update it is owed has come or [`DRAIN_LIMIT`] passes.
    #[allow(clippy::too_many_arguments)]
    async fn read(
        &self,
        stream: &mut TcpStream,
        mut pending: Vec<u8>,
        head: wire::Head,
        head_ns: u64,
        session: &mut Session,
        lifetime: Duration,
        resume: bool,
        stop: &CancellationToken,
    ) -> Reading {
        let mut body = EventBody::new(head.body);
        let mut events: Vec<Event> = Vec::new();
        let mut latencies: Vec<u64> = Vec::new();
        let mut read_buf = vec![0u8; 8 * 1024];
        let leave_at = Instant::now() + lifetime;
        // Once leaving: what it is still owed, and until when it waits for it.
        let mut owed: Option<(HashSet<u64>, Instant)> = None;
        loop {
            if !pending.is_empty() {
                let ended = match body.feed(&pending, &mut events) {
                    Ok(ended) => ended,
                    Err(e) => return Reading::Cut(e.to_string()),
                };
                pending.clear();
                self.take(&mut events, head_ns, session, &mut latencies, &mut owed);
                if ended {
                    return Reading::Cut("the server ended the response".to_owned());
                }
            }
            if let Some((missing, _)) = &owed {
                if missing.is_empty() {
                    self.churn.sessions_checked.fetch_add(1, Relaxed);
                    return Reading::Checked;
                }
            }
            let read = tokio::select! {
                biased;
                _ = stop.cancelled(), if owed.is_none() => None,
                _ = tokio::time::sleep_until(leave_at), if owed.is_none() => None,
                _ = sleep_until_drained(&owed) => {
                    let missing = owed.as_ref().map_or(0, |(m, _)| m.len() as u64);
                    self.churn.sessions_checked.fetch_add(1, Relaxed);
                    self.churn.lost.fetch_add(missing, Relaxed);
                    if session.resumed {
                        self.churn.resumed_lost.fetch_add(missing, Relaxed);
                    }
                    self.error(format!(
                        "a subscriber to {} missed {missing} updates it was owed",
                        self.plan.topic_names[session.topic]
                    ));
                    return Reading::Checked;
                }
                r = stream.read(&mut read_buf) => Some(r),
            };
            match read {
                None if resume && !session.last_id.is_empty() && !stop.is_cancelled() => {
                    return Reading::Away;
                }
                None => {
                    let missing = self.missing(session, load::now_ns());
                    owed = Some((missing, Instant::now() + DRAIN_LIMIT));
                }
                Some(Ok(0)) => return Reading::Cut("the server closed the connection".into()),
                Some(Err(e)) => return Reading::Cut(e.to_string()),
                Some(Ok(n)) => pending.extend_from_slice(&read_buf[..n]),
            }
        }
    }

    /// Checks and counts the events just parsed.
    fn take(
        &self,
        events: &mut Vec<Event>,
        head_ns: u64,
        session: &mut Session,
        latencies: &mut Vec<u64>,
        owed: &mut Option<(HashSet<u64>, Instant)>,
    ) {
        let now = load::now_ns();
        let mut fresh = 0;
        for ev in events.drain(..) {
            match load::parse_payload(&ev.data) {
                Some((seq, sent)) if seq < self.plan.updates => {
                    if session.seen.insert(seq) {
                        fresh += 1;
                        if sent >= head_ns {
                            latencies.push(now.saturating_sub(sent) / 1000);
                        } else if session.resumed {
                            self.churn.replayed.fetch_add(1, Relaxed);
                        }
                        if let Some((missing, _)) = owed {
                            missing.remove(&seq);
                        }
                    } else {
                        self.counts.duplicates.fetch_add(1, Relaxed);
                        if session.resumed {
                            self.churn.resumed_duplicates.fetch_add(1, Relaxed);
                        }
                    }
                    session.last_id.clear();
                    session.last_id.push_str(&ev.id);
                }
                _ => {
                    self.counts.foreign.fetch_add(1, Relaxed);
                }
            }
        }
        if fresh > 0 {
            self.counts.delivered.fetch_add(fresh, Relaxed);
            let mut h = self.counts.latency_us.lock();
            for l in latencies.drain(..) {
                h.saturating_record(l.max(1));
            }
        }
    }

    /// Opens a subscriber connection and reads the response head, which must be 200. Returns
    /// the stream, the body bytes that came with the head, and the head.
    async fn open(
        &self,
        request: &[u8],
        recv_buffer: Option<u32>,
    ) -> anyhow::Result<(TcpStream, Vec<u8>, wire::Head)> {
        let _permit = self.connect_gate.acquire().await?;
        let index = self.connection_index();
        let plan = &self.plan;
        let mut stream = load::connect(plan.sub_addr, index, plan.source_ips, recv_buffer).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::with_capacity(1024);
        let head = wire::read_head(&mut stream, &mut buf).await?;
        if head.status != 200 {
            bail!("a subscriber got HTTP status {}", head.status);
        }
        Ok((stream, buf, head))
    }

    /// One slow slot: a subscriber that never reads; once enough has been published for the
    /// server to have given up on it, it looks whether it was dropped, and another takes its
    /// place.
    async fn slow(self: Arc<Self>, slot: usize, stop: CancellationToken) {
        let plan = self.plan.clone();
        let topic = slot % plan.sub_requests.len();
        let request = plan
            .sub_every_topic
            .as_ref()
            .unwrap_or(&plan.sub_requests[topic]);
        let published = || match plan.sub_every_topic {
            Some(_) => self.counts.published.load(Relaxed),
            None => self.counts.per_topic[topic].load(Relaxed),
        };
        // Staggered, so that they do not all come and go together.
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10) * slot as u32) => {}
            _ = stop.cancelled() => return,
        }
        while !stop.is_cancelled() {
            let mut stream = match self.open(request, Some(4096)).await {
                Ok((stream, _, _)) => stream,
                Err(e) => {
                    self.counts.connect_failed.fetch_add(1, Relaxed);
                    self.error(format!("slow subscribe: {e:#}"));
                    pause(&stop).await;
                    continue;
                }
            };
            self.counts.connected.fetch_add(1, Relaxed);
            self.churn.slow_connects.fetch_add(1, Relaxed);
            self.churn.open.fetch_add(1, Relaxed);
            let base = published();
            while !stop.is_cancelled() && published() < base + self.slow_patience {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
            }
            if !stop.is_cancelled() {
                let count = if load::drained_to_eof(&mut stream).await {
                    &self.churn.slow_dropped
                } else {
                    &self.churn.slow_kept
                };
                count.fetch_add(1, Relaxed);
            }
            drop(stream);
            self.churn.open.fetch_sub(1, Relaxed);
            self.churn.disconnects.fetch_add(1, Relaxed);
        }
    }

    /// Sends `bad_rate` bad requests a second, each kind in turn, until `stop`.
    async fn bad_requests(self: Arc<Self>, rate: f64, stop: CancellationToken, tasks: TaskTracker) {
        let Some(path) = self.hub_path.clone() else {
            return;
        };
        if rate <= 0.0 {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let soak = self.clone();
            let (path, stop) = (path.clone(), stop.clone());
            tasks.spawn(async move {
                let outcome = tokio::select! {
                    r = soak.bad_request(n % 3, &path) => r,
                    _ = stop.cancelled() => return,
                };
                match outcome {
                    Ok(()) => soak.churn.bad_as_expected.fetch_add(1, Relaxed),
                    Err(e) => {
                        soak.error(format!("bad request: {e:#}"));
                        soak.churn.bad_unexpected.fetch_add(1, Relaxed)
                    }
                };
            });
        }
    }

    /// One bad request of the given kind; Ok when ssehub answered as it should.
    async fn bad_request(&self, kind: u64, path: &str) -> anyhow::Result<()> {
        let plan = &self.plan;
        let host = &plan.pub_authority;
        let index = self.connection_index();
        let mut stream = load::connect(plan.pub_addr, index, plan.source_ips, None).await?;
        let (request, want) = match kind {
            0 => {
                let body = format!("topic={}&data=bad", plan.topic_names[0]);
                let request = format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\n\
                     Content-Type: application/x-www-form-urlencoded\r\n\
                     Authorization: Bearer not.a.token\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                (request, 401)
            }
            1 => {
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\
                     Connection: close\r\n\r\n"
                );
                (request, 400)
            }
            _ => {
                // Sends nothing: the hub must close the connection by itself.
                let mut buf = [0u8; 1024];
                let closed = tokio::time::timeout(SILENT_LIMIT, async {
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
                if closed.is_err() {
                    bail!(
                        "a connection that sent nothing was still open after {} s",
                        SILENT_LIMIT.as_secs()
                    );
                }
                return Ok(());
            }
        };
        stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        let head = wire::read_head(&mut stream, &mut buf).await?;
        wire::read_body(&mut stream, &mut buf, head.body).await?;
        if head.status != want {
            bail!("expected HTTP status {want}, got {}", head.status);
        }
        Ok(())
    }

    /// ssehub's own figures from `/metrics`, when the target is ssehub and it answers.
    async fn hub_figures(&self) -> Option<HubFigures> {
        self.hub_path.as_ref()?;
        let plan = &self.plan;
        let fetch = async {
            let mut stream = load::connect(plan.pub_addr, 0, 1, None).await?;
            let request = format!(
                "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                plan.pub_authority
            );
            stream.write_all(request.as_bytes()).await?;
            let mut buf = Vec::new();
            let head = wire::read_head(&mut stream, &mut buf).await?;
            let body = wire::read_body(&mut stream, &mut buf, head.body).await?;
            anyhow::ensure!(head.status == 200, "/metrics answered {}", head.status);
            anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
        };
        let text = match tokio::time::timeout(Duration::from_secs(5), fetch).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => {
                self.error(format!("/metrics: {e:#}"));
                return None;
            }
            Err(_) => {
                self.error("/metrics did not answer within 5 s");
                return None;
            }
        };
        Some(HubFigures::parse(&text))
    }

    fn errors(&self) -> u64 {
        let c = &self.counts;
        c.connect_failed.load(Relaxed)
            + c.publish_failed.load(Relaxed)
            + self.churn.readers_cut.load(Relaxed)
            + self.churn.bad_unexpected.load(Relaxed)
    }
}

/// What a reader's reading came to.
enum Reading {
    /// It left to come back with `Last-Event-ID`; nothing checked yet.
    Away,
    /// It left and what it was owed was checked.
    Checked,
    /// The server ended the stream first.
    Cut(String),
}

/// Sleeps until the drain deadline, or forever while there is none.
async fn sleep_until_drained(owed: &Option<(HashSet<u64>, Instant)>) {
    match owed {
        Some((_, deadline)) => tokio::time::sleep_until(*deadline).await,
        None => std::future::pending().await,
    }
}

/// A second's pause after a failure, so that a refusing server is not hammered.
async fn pause(stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = stop.cancelled() => {}
    }
}

/// The figures ssehub reports about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HubFigures {
    subscribers: Option<u64>,
    deliveries: Option<u64>,
    slow_dropped: Option<u64>,
}

impl HubFigures {
    /// Picks the three series out of the Prometheus text format.
    fn parse(text: &str) -> HubFigures {
        let mut f = HubFigures::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value = value.parse::<f64>().ok().map(|v| v as u64);
            match name {
                "ssehub_subscribers_connected" => f.subscribers = value,
                "ssehub_deliveries_total" => f.deliveries = value,
                "ssehub_subscribers_dropped_total{reason=\"slow\"}" => f.slow_dropped = value,
                _ => {}
            }
        }
        f
    }
}

/// The state of the run at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// `idle` before the load, `run` during it, `after` once every client has gone.
    pub phase: &'static str,
    pub elapsed_secs: f64,
    /// Server resident memory (all `--pid`s summed).
    pub rss_kib: u64,
    /// Server open file descriptors (all `--pid`s summed).
    pub fds: u64,
    /// Subscriber connections the bench holds open (readers and slow ones).
    pub subscribers: u64,
    /// What ssehub's `/metrics` says (`ssehub_subscribers_connected`).
    pub hub_subscribers: Option<u64>,
    pub connects: u64,
    pub disconnects: u64,
    pub resumed: u64,
    pub published: u64,
    /// Distinct updates received by the readers.
    pub delivered: u64,
    /// `ssehub_deliveries_total`.
    pub hub_deliveries: Option<u64>,
    /// `ssehub_subscribers_dropped_total{reason="slow"}`.
    pub hub_slow_dropped: Option<u64>,
    pub slow_dropped: u64,
    pub bad_requests: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub errors: u64,
    pub bench_rss_kib: u64,
    pub bench_fds: u64,
}

/// First, lowest, highest and last of a figure over the samples under load, with the idle
/// figure before and the one after the load.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    pub idle: u64,
    pub first: u64,
    pub min: u64,
    pub max: u64,
    pub last: u64,
    pub after: u64,
}

impl Spread {
    fn of(samples: &[Sample], figure: impl Fn(&Sample) -> u64) -> Spread {
        let phase = |p: &'static str| samples.iter().filter(move |s| s.phase == p).map(&figure);
        Spread {
            idle: phase("idle").next().unwrap_or(0),
            first: phase("run").next().unwrap_or(0),
            min: phase("run").min().unwrap_or(0),
            max: phase("run").max().unwrap_or(0),
            last: phase("run").last().unwrap_or(0),
            after: phase("after").last().unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakSettings {
    pub duration_secs: f64,
    pub sample_secs: f64,
    pub subscribers: u64,
    pub slow: u64,
    pub topics: u64,
    pub rate: f64,
    pub size: u64,
    pub lifetime_secs: [f64; 2],
    pub resume: f64,
    /// How long a resuming reader stays away.
    pub away_secs: [f64; 2],
    pub bad_rate: f64,
    pub source_ips: u8,
    pub pids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakSummary {
    pub rss_kib: Spread,
    pub fds: Spread,
    /// Subscriber connections opened (readers, resumed readers and slow ones).
    pub connects: u64,
    pub disconnects: u64,
    pub connect_failed: u64,
    /// Readers that came back with `Last-Event-ID`.
    pub resumed: u64,
    /// Updates resumed readers received that were published while they were away.
    pub replayed: u64,
    /// Readers whose deliveries were checked when they left.
    pub sessions_checked: u64,
    /// Updates a reader was owed (accepted on its topic while it was subscribed) and never got.
    pub lost: u64,
    pub duplicates: u64,
    pub resumed_lost: u64,
    pub resumed_duplicates: u64,
    pub foreign_events: u64,
    pub readers_cut: u64,
    pub published: u64,
    pub publish_failed: u64,
    pub delivered: u64,
    pub latency_ms: Latency,
    pub slow_connects: u64,
    /// Updates a slow subscriber waits for before it looks whether it was dropped.
    pub slow_patience: u64,
    /// Slow subscribers the server had disconnected when they looked.
    pub slow_dropped: u64,
    /// Slow subscribers still connected after `slow_patience` updates.
    pub slow_kept: u64,
    pub hub_slow_dropped: Option<u64>,
    pub bad_as_expected: u64,
    pub bad_unexpected: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The first publish that failed, with the server's reason (the run is then an error).
    pub first_publish_error: Option<String>,
    pub server_cpu_secs: f64,
    pub bench_cpu_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub label: String,
    pub target: String,
    pub settings: SoakSettings,
    pub samples: Vec<Sample>,
    pub summary: SoakSummary,
}

/// Runs the soak for `duration` and returns its samples and summary.
pub async fn execute(
    args: &BenchArgs,
    plan: Plan,
    duration: Duration,
) -> anyhow::Result<SoakReport> {
    if args.pid.is_empty() {
        bail!("a soak records the server's memory and descriptors: give its process id with --pid");
    }
    if args.soak.sample.is_zero() {
        bail!("--sample must be longer than 0");
    }
    if !(0.0..=1.0).contains(&args.soak.resume) {
        bail!("--resume is a share of the subscribers that leave: give a number from 0 to 1");
    }
    let server = Server(args.pid.clone());
    server.check()?;
    let lifetime = args.soak.lifetime;
    let topics = plan.topic_names.len();
    let hub_path = (args.target == Peer::Ssehub).then(|| plan.pub_paths[0].clone());
    let soak = Arc::new(Soak {
        plan: Arc::new(plan),
        counts: Arc::new(Counts::new(topics)),
        churn: Churn::default(),
        accepted: (0..topics).map(|_| Mutex::new(VecDeque::new())).collect(),
        retention_ns: (2 * lifetime.max + AWAY.end + DRAIN_LIMIT + Duration::from_secs(30))
            .as_nanos() as u64,
        next_connection: AtomicUsize::new(0),
        connect_gate: tokio::sync::Semaphore::new(args.connect_concurrency.max(1)),
        lifetime,
        resume: args.soak.resume,
        slow_patience: slow_patience(args.size),
        hub_path,
    });
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let cpu_start = server.cpu_secs();
    let own_cpu_start = Proc::SelfProc.cpu_secs().unwrap_or(0.0);

    let start = Instant::now();
    let mut samples = vec![sample(&soak, &server, "idle", start).await];

    let on_accepted: OnAccepted = {
        let soak = soak.clone();
        Arc::new(move |seq, topic, sent_ns| soak.accept(seq, topic, sent_ns))
    };
    let next = Arc::new(AtomicU64::new(0));
    for i in 0..args.publishers.max(1) {
        tasks.spawn(load::publisher(
            i,
            soak.plan.clone(),
            soak.counts.clone(),
            next.clone(),
            start,
            stop.clone(),
            Some(on_accepted.clone()),
        ));
    }
    for slot in 0..args.subscribers() {
        tasks.spawn(
            soak.clone()
                .reader(rand::random::<u64>() ^ slot as u64, stop.clone()),
        );
    }
    for slot in 0..args.slow() {
        tasks.spawn(soak.clone().slow(slot, stop.clone()));
    }
    tasks.spawn(
        soak.clone()
            .bad_requests(args.soak.bad_rate, stop.clone(), tasks.clone()),
    );

    let bar = progress(duration.as_secs().max(1), "soak");
    let end = start + duration;
    let mut next_sample = start + args.soak.sample;
    loop {
        let now = Instant::now();
        if now >= next_sample || now >= end {
            samples.push(sample(&soak, &server, "run", start).await);
            next_sample += args.soak.sample;
            if now >= end {
                break;
            }
        }
        let last = samples.last().expect("the idle sample is there");
        bar.set_position(start.elapsed().as_secs());
        bar.set_message(format!(
            "open {} · RSS {:.1} MiB · fds {} · connects {} · lost {} · errors {}",
            soak.churn.open.load(Relaxed),
            last.rss_kib as f64 / 1024.0,
            last.fds,
            soak.counts.connected.load(Relaxed),
            soak.churn.lost.load(Relaxed),
            soak.errors(),
        ));
        tokio::time::sleep_until(next_sample.min(end).min(now + Duration::from_millis(500))).await;
    }
    bar.finish_and_clear();

    // Everyone leaves; readers still wait for what they are owed.
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_LIMIT + Duration::from_secs(5), tasks.wait())
        .await
        .is_err()
    {
        soak.error("some clients had not finished 15 s after the end of the load");
    }
    let run_secs = start.elapsed().as_secs_f64();
    let server_cpu_secs = server.cpu_secs() - cpu_start;
    let bench_cpu_secs = Proc::SelfProc.cpu_secs().unwrap_or(0.0) - own_cpu_start;
    tokio::time::sleep(AFTER_SETTLE).await;
    let after = sample(&soak, &server, "after", start).await;
    let hub_slow_dropped = after.hub_slow_dropped;
    samples.push(after);

    let c = &soak.counts;
    let churn = &soak.churn;
    let h = c.latency_us.lock();
    let latency_ms = Latency::from_micros(&h);
    drop(h);
    let summary = SoakSummary {
        rss_kib: Spread::of(&samples, |s| s.rss_kib),
        fds: Spread::of(&samples, |s| s.fds),
        connects: c.connected.load(Relaxed),
        disconnects: churn.disconnects.load(Relaxed),
        connect_failed: c.connect_failed.load(Relaxed),
        resumed: churn.resumed.load(Relaxed),
        replayed: churn.replayed.load(Relaxed),
        sessions_checked: churn.sessions_checked.load(Relaxed),
        lost: churn.lost.load(Relaxed),
        duplicates: c.duplicates.load(Relaxed),
        resumed_lost: churn.resumed_lost.load(Relaxed),
        resumed_duplicates: churn.resumed_duplicates.load(Relaxed),
        foreign_events: c.foreign.load(Relaxed),
        readers_cut: churn.readers_cut.load(Relaxed),
        published: c.published.load(Relaxed),
        publish_failed: c.publish_failed.load(Relaxed),
        delivered: c.delivered.load(Relaxed),
        latency_ms,
        slow_connects: churn.slow_connects.load(Relaxed),
        slow_patience: soak.slow_patience,
        slow_dropped: churn.slow_dropped.load(Relaxed),
        slow_kept: churn.slow_kept.load(Relaxed),
        hub_slow_dropped,
        bad_as_expected: churn.bad_as_expected.load(Relaxed),
        bad_unexpected: churn.bad_unexpected.load(Relaxed),
        errors: soak.errors(),
        first_error: c.first_error.lock().clone(),
        first_publish_error: c.first_publish_error.lock().clone(),
        server_cpu_secs,
        bench_cpu_secs,
    };
    Ok(SoakReport {
        label: args.label.clone(),
        target: format!("{:?}", args.target).to_ascii_lowercase(),
        settings: SoakSettings {
            duration_secs: run_secs,
            sample_secs: args.soak.sample.as_secs_f64(),
            subscribers: args.subscribers() as u64,
            slow: args.slow() as u64,
            topics: topics as u64,
            rate: args.rate,
            size: args.size as u64,
            lifetime_secs: [lifetime.min.as_secs_f64(), lifetime.max.as_secs_f64()],
            resume: args.soak.resume,
            away_secs: [AWAY.start.as_secs_f64(), AWAY.end.as_secs_f64()],
            bad_rate: args.soak.bad_rate,
            source_ips: args.source_ips(),
            pids: args.pid.clone(),
        },
        samples,
        summary,
    })
}

/// Takes a sample. The server's figures are read before `/metrics` is asked, so that the
/// sampler's own connection is never among the descriptors counted.
async fn sample(soak: &Soak, server: &Server, phase: &'static str, start: Instant) -> Sample {
    let elapsed_secs = (start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    let (rss_kib, fds) = (server.rss_kib(), server.open_fds());
    let c = &soak.counts;
    let churn = &soak.churn;
    let mut s = Sample {
        phase,
        elapsed_secs,
        rss_kib,
        fds,
        subscribers: churn.open.load(Relaxed),
        connects: c.connected.load(Relaxed),
        disconnects: churn.disconnects.load(Relaxed),
        resumed: churn.resumed.load(Relaxed),
        published: c.published.load(Relaxed),
        delivered: c.delivered.load(Relaxed),
        slow_dropped: churn.slow_dropped.load(Relaxed),
        bad_requests: churn.bad_as_expected.load(Relaxed) + churn.bad_unexpected.load(Relaxed),
        lost: churn.lost.load(Relaxed),
        duplicates: c.duplicates.load(Relaxed),
        errors: soak.errors(),
        bench_rss_kib: Proc::SelfProc.rss_kib().unwrap_or(0),
        bench_fds: Proc::SelfProc.open_fds().unwrap_or(0),
        hub_subscribers: None,
        hub_deliveries: None,
        hub_slow_dropped: None,
    };
    if let Some(hub) = soak.hub_figures().await {
        s.hub_subscribers = hub.subscribers;
        s.hub_deliveries = hub.deliveries;
        s.hub_slow_dropped = hub.slow_dropped;
    }
    s
}

impl SoakReport {
    /// The samples as a table, then the summary, for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let st = &self.settings;
        out.push_str(&format!(
            "soak of {} {}: {:.0} s, {} subscribers (lifetime {:.0}-{:.0} s, {:.0} % resume) + \
             {} slow, {} topics, {:.0} updates/s of {} bytes\n\n",
            self.target,
            self.label,
            st.duration_secs,
            st.subscribers,
            st.lifetime_secs[0],
            st.lifetime_secs[1],
            st.resume * 100.0,
            st.slow,
            st.topics,
            st.rate,
            st.size
        ));
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        out.push_str(&format!(
            "{:>6} {:>8} {:>6} {:>7} {:>7} {:>8} {:>8} {:>9} {:>10} {:>6} {:>5} {:>6}\n",
            "t s",
            "RSS MiB",
            "fds",
            "subs",
            "hub",
            "connects",
            "leaves",
            "published",
            "delivered",
            "slow×",
            "lost",
            "errors"
        ));
        for s in &self.samples {
            let t = match s.phase {
                "run" => format!("{:.0}", s.elapsed_secs),
                phase => phase.to_owned(),
            };
            out.push_str(&format!(
                "{:>6} {:>8.1} {:>6} {:>7} {:>7} {:>8} {:>8} {:>9} {:>10} {:>6} {:>5} {:>6}\n",
                t,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.subscribers,
                opt(s.hub_subscribers),
                s.connects,
                s.disconnects,
                s.published,
                s.delivered,
                s.slow_dropped,
                s.lost,
                s.errors
            ));
        }
        let m = &self.summary;
        let mib = |k: u64| k as f64 / 1024.0;
        let rows = [
            (
                "server RSS MiB",
                format!(
                    "idle {:.1}  first {:.1}  min {:.1}  max {:.1}  last {:.1}  after {:.1}",
                    mib(m.rss_kib.idle),
                    mib(m.rss_kib.first),
                    mib(m.rss_kib.min),
                    mib(m.rss_kib.max),
                    mib(m.rss_kib.last),
                    mib(m.rss_kib.after)
                ),
            ),
            (
                "server fds",
                format!(
                    "idle {}  first {}  min {}  max {}  last {}  after {}",
                    m.fds.idle, m.fds.first, m.fds.min, m.fds.max, m.fds.last, m.fds.after
                ),
            ),
            (
                "connects",
                format!(
                    "{} ({} resumed with Last-Event-ID, {} slow, {} failed), {} left",
                    m.connects, m.resumed, m.slow_connects, m.connect_failed, m.disconnects
                ),
            ),
            (
                "lost / duplicates",
                format!(
                    "{} / {} over {} readers checked; resumed: {} / {} ({} replayed)",
                    m.lost,
                    m.duplicates,
                    m.sessions_checked,
                    m.resumed_lost,
                    m.resumed_duplicates,
                    m.replayed
                ),
            ),
            (
                "published",
                format!("{} ({} failed)", m.published, m.publish_failed),
            ),
            ("delivered", m.delivered.to_string()),
            (
                "latency ms",
                format!(
                    "p50 {:.2}  p99 {:.2}  max {:.2}",
                    m.latency_ms.p50, m.latency_ms.p99, m.latency_ms.max
                ),
            ),
            (
                "slow subscribers",
                format!(
                    "{} dropped by the server, {} still connected when they looked after {} \
                     updates (hub says {} dropped)",
                    m.slow_dropped,
                    m.slow_kept,
                    m.slow_patience,
                    opt(m.hub_slow_dropped)
                ),
            ),
            (
                "bad requests",
                format!(
                    "{} answered as expected, {} not",
                    m.bad_as_expected, m.bad_unexpected
                ),
            ),
            (
                "CPU s",
                format!(
                    "server {:.1}, bench {:.1}",
                    m.server_cpu_secs, m.bench_cpu_secs
                ),
            ),
            ("errors", m.errors.to_string()),
        ];
        out.push('\n');
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in rows {
            out.push_str(&format!("{k:>width$}  {v}\n"));
        }
        if let Some(e) = &m.first_error {
            out.push_str(&format!("{:>width$}  {e}\n", "first error"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes() {
        let l = parse_lifetime("1s..60s").unwrap();
        assert_eq!(
            (l.min, l.max),
            (Duration::from_secs(1), Duration::from_secs(60))
        );
        let l = parse_lifetime("500ms").unwrap();
        assert_eq!((l.min, l.max), (Duration::from_millis(500), l.min));
        assert!(parse_lifetime("10s..1s").is_err());
        assert!(parse_lifetime("0..1s").is_err());
        assert!(parse_lifetime("soon").is_err());
        let mut rng = StdRng::seed_from_u64(1);
        let l = parse_lifetime("1s..2s").unwrap();
        for _ in 0..100 {
            assert!((l.min..l.max).contains(&l.draw(&mut rng)));
        }
    }

    #[test]
    fn hub_figures_from_metrics() {
        let text = "# HELP ssehub_subscribers_connected Subscribers connected now.\n\
                    # TYPE ssehub_subscribers_connected gauge\n\
                    ssehub_subscribers_connected 2005\n\
                    ssehub_subscribers_total 9000\n\
                    ssehub_deliveries_total 123456\n\
                    ssehub_subscribers_dropped_total{reason=\"slow\"} 7\n\
                    ssehub_subscribers_dropped_total{reason=\"expired\"} 0\n";
        assert_eq!(
            HubFigures::parse(text),
            HubFigures {
                subscribers: Some(2005),
                deliveries: Some(123456),
                slow_dropped: Some(7),
            }
        );
    }

    #[test]
    fn spread_over_phases() {
        let at = |phase, rss| Sample {
            phase,
            elapsed_secs: 0.0,
            rss_kib: rss,
            fds: 0,
            subscribers: 0,
            hub_subscribers: None,
            connects: 0,
            disconnects: 0,
            resumed: 0,
            published: 0,
            delivered: 0,
            hub_deliveries: None,
            hub_slow_dropped: None,
            slow_dropped: 0,
            bad_requests: 0,
            lost: 0,
            duplicates: 0,
            errors: 0,
            bench_rss_kib: 0,
            bench_fds: 0,
        };
        let samples = [
            at("idle", 5),
            at("run", 30),
            at("run", 20),
            at("run", 40),
            at("run", 35),
            at("after", 10),
        ];
        let s = Spread::of(&samples, |s| s.rss_kib);
        assert_eq!(
            (s.idle, s.first, s.min, s.max, s.last, s.after),
            (5, 30, 20, 40, 35, 10)
        );
    }
}
