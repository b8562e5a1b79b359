//! The load itself: subscribers that read and check every event, subscribers that never read,
//! and publishers at a steady rate over keep-alive connections.
//!
//! Each payload starts with `SEQ:SEND_NS:` (the update's sequence number and the wall-clock
//! send time in nanoseconds; bench and server share the machine, hence the clock), so each
//! subscriber can tell delivered from lost from duplicated and measure latency itself.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::tls::{Stream, Tls};
use super::wire::{self, BodyKind, EventBody};
use ssehub_sse::Event;

/// Everything the tasks share: prepared requests and the running counts.
pub struct Plan {
    pub sub_addr: SocketAddr,
    /// With several nodes (a cluster), their addresses: subscriber and publisher `i` use node
    /// `i % len` instead of `sub_addr` and `pub_addr`.
    pub nodes: Vec<SocketAddr>,
    /// One prepared GET per topic.
    pub sub_requests: Vec<Vec<u8>>,
    /// A GET for every topic at once (`topic=*`), where the target speaks Mercure.
    pub sub_every_topic: Option<Vec<u8>>,
    /// With `--template-share`, one prepared GET per topic through a URI template.
    pub template_requests: Vec<Vec<u8>>,
    /// Percent of subscribers that use `template_requests`.
    pub template_share: u8,
    pub pub_addr: SocketAddr,
    pub pub_authority: String,
    /// Path per topic.
    pub pub_paths: Vec<String>,
    /// Body template with `{topic}` already filled in per topic; `{data}` is left.
    pub pub_bodies: Vec<String>,
    /// Extra header lines for publishes, each ending in CRLF.
    pub pub_headers: String,
    pub topic_names: Vec<String>,
    pub updates: u64,
    pub rate: f64,
    pub size: usize,
    pub source_ips: u8,
    /// TLS for subscribers and for publishers, when their URLs or `--tls` ask for it.
    pub sub_tls: Option<Arc<Tls>>,
    pub pub_tls: Option<Arc<Tls>>,
    /// Subscribers speak HTTP/2 (over TLS), this many streams on each connection.
    pub http2: bool,
    pub streams_per_connection: usize,
}

impl Plan {
    pub(super) fn node(&self, i: usize, single: SocketAddr) -> SocketAddr {
        match self.nodes.len() {
            0 | 1 => single,
            n => self.nodes[i % n],
        }
    }

    /// The subscribe request of reading subscriber `index`, on `topic`: through a template for
    /// `--template-share` percent of them, spread over the topics (a multiplicative hash of
    /// the index, so that not only whole topics go by template).
    pub fn sub_request(&self, index: usize, topic: usize) -> &[u8] {
        let pick = (index as u64).wrapping_mul(0x9E37_79B9) % 100;
        if pick < u64::from(self.template_share) && !self.template_requests.is_empty() {
            &self.template_requests[topic]
        } else {
            &self.sub_requests[topic]
        }
    }

    /// The topic update `seq` goes to: all to one, or spread evenly but unpredictably.
    pub fn topic_of(&self, seq: u64) -> usize {
        let n = self.pub_paths.len() as u64;
        if n == 1 {
            0
        } else {
            (splitmix(seq) % n) as usize
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Running totals, read by the progress display and the final report.
pub struct Counts {
    /// Subscribers (HTTP/2 streams included) whose stream opened.
    pub connected: AtomicU64,
    /// Connections that carry them: as many as `connected` over HTTP/1.1, fewer over HTTP/2.
    pub connections: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Distinct updates received by reading subscribers.
    pub delivered: AtomicU64,
    pub duplicates: AtomicU64,
    /// Events whose data did not carry a sequence number this run sent.
    pub foreign: AtomicU64,
    /// Reading subscribers whose stream ended before the run did.
    pub disconnected: AtomicU64,
    /// Of those, the streams that ended in an error rather than cleanly: an HTTP/2 stream the
    /// server reset, a connection broken under a stream.
    pub reset: AtomicU64,
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    /// Successful publishes per topic.
    pub per_topic: Vec<AtomicU64>,
    /// Reading subscribers connected per topic.
    pub readers_per_topic: Vec<AtomicU64>,
    pub latency_us: Mutex<Histogram<u64>>,
    /// How far behind its schedule a publish went out, at most (µs).
    pub publish_lag_max_us: AtomicU64,
    /// From sending a publish to reading its whole answer (µs), merged from every publisher
    /// when it ends.
    pub answer_us: Mutex<Histogram<u64>>,
    pub first_error: Mutex<Option<String>>,
    /// The first refused or failed publish, with the server's reason.
    pub first_publish_error: Mutex<Option<String>>,
}

impl Counts {
    pub fn new(topics: usize) -> Counts {
        Counts {
            connected: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            published: AtomicU64::new(0),
            publish_failed: AtomicU64::new(0),
            per_topic: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            readers_per_topic: (0..topics).map(|_| AtomicU64::new(0)).collect(),
            latency_us: Mutex::new(micros_histogram()),
            publish_lag_max_us: AtomicU64::new(0),
            answer_us: Mutex::new(micros_histogram()),
            first_error: Mutex::new(None),
            first_publish_error: Mutex::new(None),
        }
    }

    pub(super) fn error(&self, e: impl std::fmt::Display) {
        let mut slot = self.first_error.lock();
        if slot.is_none() {
            *slot = Some(e.to_string());
        }
    }

    fn publish_error(&self, e: String) {
        self.first_publish_error
            .lock()
            .get_or_insert_with(|| e.clone());
        self.error(e);
    }
}

/// Microseconds from 1 µs to an hour, to three significant digits.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Wall-clock nanoseconds, the clock payloads carry.
pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Opens a TCP connection from 127.0.0.(1 + index % source_ips).
pub(super) async fn connect(
    addr: SocketAddr,
    index: usize,
    source_ips: u8,
    recv_buffer: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if source_ips > 1 {
        let last = 1 + (index % usize::from(source_ips)) as u8;
        socket.bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0)))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a connection as [`connect`] does, then TLS on it when `tls` is given (ALPN h2 or
/// http/1.1).
pub(super) async fn open(
    addr: SocketAddr,
    index: usize,
    source_ips: u8,
    recv_buffer: Option<u32>,
    tls: Option<&Tls>,
    http2: bool,
) -> std::io::Result<Stream> {
    let tcp = connect(addr, index, source_ips, recv_buffer).await?;
    match tls {
        Some(tls) => tls.connect(tcp, http2).await,
        None => Ok(Stream::Left(tcp)),
    }
}

/// How one subscriber ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct SubscriberEnd {
    pub connected: bool,
    /// One of the `--slow` subscribers, which never read.
    pub slow: bool,
    pub topic: usize,
    /// Distinct updates received.
    pub received: u64,
    /// For a subscriber that never read: the server had closed its connection by the end.
    pub closed_by_server: bool,
}

impl SubscriberEnd {
    /// What this reading subscriber missed of the `owed` updates its topic was published
    /// (answered publishes). Counted per subscriber: an update whose publish went unanswered
    /// (a server killed mid-fan-out) may still arrive, and one subscriber's surplus must not
    /// hide another's loss in the run's totals.
    pub fn lost(&self, owed: u64) -> u64 {
        owed.saturating_sub(self.received)
    }
}

/// One subscriber: connect (bounded by `gate`), check the response head, then either read and
/// check every event until `stop`, or (when `slow`) never read at all.
pub async fn subscriber(
    index: usize,
    topic: usize,
    slow: bool,
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    gate: Arc<tokio::sync::Semaphore>,
    stop: CancellationToken,
) -> SubscriberEnd {
    let mut end = SubscriberEnd {
        topic,
        slow,
        ..SubscriberEnd::default()
    };
    let permit = gate.acquire().await;
    let opened = async {
        let recv_buffer = slow.then_some(4096);
        let addr = plan.node(index, plan.sub_addr);
        let tls = plan.sub_tls.as_deref();
        let mut stream = open(addr, index, plan.source_ips, recv_buffer, tls, false).await?;
        stream.write_all(plan.sub_request(index, topic)).await?;
        let mut buf = Vec::with_capacity(4096);
        let head = wire::read_head(&mut stream, &mut buf).await?;
        if head.status != 200 {
            anyhow::bail!("a subscriber got HTTP status {}", head.status);
        }
        anyhow::Ok((stream, buf, head))
    };
    // A server that never answers must not hang the run: the stop and a bound both end it.
    let opened = tokio::select! {
        r = tokio::time::timeout(ANSWER_TIMEOUT, opened) => {
            r.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}")))
        }
        _ = stop.cancelled() => Err(anyhow::anyhow!("the run ended before the stream opened")),
    };
    drop(permit);
    let (mut stream, buf, head) = match opened {
        Ok(v) => v,
        Err(e) => {
            counts.connect_failed.fetch_add(1, Ordering::Relaxed);
            counts.error(format!("subscribe: {e:#}"));
            return end;
        }
    };
    end.connected = true;
    counts.connected.fetch_add(1, Ordering::Relaxed);
    counts.connections.fetch_add(1, Ordering::Relaxed);
    if !slow {
        counts.readers_per_topic[topic].fetch_add(1, Ordering::Relaxed);
    }

    if slow {
        stop.cancelled().await;
        end.closed_by_server = drained_to_eof(&mut stream).await;
        return end;
    }

    let mut reader = Reader::new(head.body);
    let mut read_buf = vec![0u8; 16 * 1024];
    // Bytes that came with the head are the body's first bytes.
    let mut pending = buf;
    loop {
        if !pending.is_empty() {
            let ended = reader.feed(&pending, plan.updates, &counts);
            pending.clear();
            if ended {
                end.received = reader.received;
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                return end;
            }
        }
        let n = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = stream.read(&mut read_buf) => r,
        };
        match n {
            Ok(0) => {
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Err(_) => {
                counts.disconnected.fetch_add(1, Ordering::Relaxed);
                counts.reset.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(n) => pending.extend_from_slice(&read_buf[..n]),
        }
    }
    end.received = reader.received;
    end
}

/// What a reading subscriber checks of its stream, whatever carried it (an HTTP/1.1 body,
/// chunked or not, or an HTTP/2 stream's data frames): every event's sequence number is
/// delivered, a duplicate or foreign, and a delivery's latency goes to the shared histogram.
/// The one place deliveries are counted, so both protocols are counted alike.
pub(super) struct Reader {
    body: EventBody,
    seen: Bitset,
    events: Vec<Event>,
    latencies: Vec<u64>,
    /// Distinct updates received so far.
    pub received: u64,
}

impl Reader {
    pub fn new(body: BodyKind) -> Reader {
        Reader {
            body: EventBody::new(body),
            seen: Bitset::default(),
            events: Vec::new(),
            latencies: Vec::new(),
            received: 0,
        }
    }

    /// Accounts for the events that `bytes` (the body's next bytes) complete, for a run that
    /// publishes `updates`. True when the body has ended (or cannot be read further).
    pub fn feed(&mut self, bytes: &[u8], updates: u64, counts: &Counts) -> bool {
        let ended = self.body.feed(bytes, &mut self.events).unwrap_or_else(|e| {
            counts.error(format!("subscriber stream: {e}"));
            true
        });
        let now = now_ns();
        let mut fresh = 0;
        for ev in self.events.drain(..) {
            match parse_payload(&ev.data) {
                Some((seq, sent)) if seq < updates => {
                    if self.seen.insert(seq) {
                        fresh += 1;
                        self.latencies.push(now.saturating_sub(sent) / 1000);
                    } else {
                        counts.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {
                    counts.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if fresh > 0 {
            self.received += fresh;
            let mut h = counts.latency_us.lock();
            for l in self.latencies.drain(..) {
                h.saturating_record(l.max(1));
            }
            drop(h);
            counts.delivered.fetch_add(fresh, Ordering::Relaxed);
        }
        ended
    }
}

/// Reads what a never-reading subscriber left in its buffers; true if the server had closed
/// the connection (the hub dropped a slow subscriber, as it should).
pub(super) async fn drained_to_eof(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// `SEQ:SEND_NS:...` → (seq, send_ns).
pub(super) fn parse_payload(data: &str) -> Option<(u64, u64)> {
    let mut parts = data.splitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    Some((seq, sent))
}

/// The payload of update `seq` sent at `sent_ns`, padded with `x` to `size` bytes.
fn payload(seq: u64, sent_ns: u64, size: usize) -> String {
    let mut s = format!("{seq}:{sent_ns}:");
    if s.len() < size {
        s.extend(std::iter::repeat_n('x', size - s.len()));
    }
    s
}

#[derive(Default)]
struct Bitset(Vec<u64>);

impl Bitset {
    /// Sets bit `i`; false if it was already set.
    fn insert(&mut self, i: u64) -> bool {
        let word = (i / 64) as usize;
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let bit = 1u64 << (i % 64);
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }
}

/// Told of each update the server accepted: its sequence number, its topic and when it was
/// sent. The soak keeps these to know what each subscriber is owed.
pub type OnAccepted = Arc<dyn Fn(u64, usize, u64) + Send + Sync>;

/// One publisher connection: takes the next sequence number, waits for its slot in the
/// schedule (`start + seq / rate`), sends it and waits for the answer.
pub async fn publisher(
    index: usize,
    plan: Arc<Plan>,
    counts: Arc<Counts>,
    next: Arc<AtomicU64>,
    start: Instant,
    stop: CancellationToken,
    on_accepted: Option<OnAccepted>,
) {
    let mut conn: Option<(Stream, Vec<u8>)> = None;
    let mut request = Vec::with_capacity(plan.size + 512);
    // Kept here and merged once at the end: no lock shared by the publishers per publish.
    let mut answers = micros_histogram();
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= plan.updates || stop.is_cancelled() {
            break;
        }
        let due = start + Duration::from_secs_f64(seq as f64 / plan.rate);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => break,
        }
        let topic = plan.topic_of(seq);
        request.clear();
        let sent_ns = now_ns();
        // The payload carries the time the update was *due*, not the time it went out: a
        // publisher held up by a slow server (waiting for an answer, or for a core) would
        // otherwise send the updates due meanwhile late with fresh times, and the wait would
        // vanish from the latencies (coordinated omission). The lag itself is reported too.
        let lag = Instant::now().saturating_duration_since(due);
        counts
            .publish_lag_max_us
            .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
        let due_ns = sent_ns.saturating_sub(lag.as_nanos() as u64);
        let body = plan.pub_bodies[topic].replace("{data}", &payload(seq, due_ns, plan.size));
        request.extend_from_slice(
            format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n{}\r\n",
                plan.pub_paths[topic],
                plan.pub_authority,
                body.len(),
                plan.pub_headers
            )
            .as_bytes(),
        );
        request.extend_from_slice(body.as_bytes());
        let sent = Instant::now();
        let addr = plan.node(index, plan.pub_addr);
        let answer = send_one(addr, plan.pub_tls.as_deref(), &mut conn, &request).await;
        if answer.is_ok() {
            answers.saturating_record(sent.elapsed().as_micros() as u64);
        }
        match answer {
            Ok((status, _)) if (200..300).contains(&status) => {
                if let Some(f) = &on_accepted {
                    f(seq, topic, sent_ns);
                }
                counts.per_topic[topic].fetch_add(1, Ordering::Relaxed);
                counts.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok((status, body)) => {
                counts.publish_failed.fetch_add(1, Ordering::Relaxed);
                // The server's reason, as it gave it (a hub's is one line): the first words
                // of it are enough to act on.
                let reason: String = String::from_utf8_lossy(&body)
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(300)
                    .collect();
                counts.publish_error(format!("a publish got HTTP status {status}: {reason}"));
            }
            Err(e) => {
                conn = None;
                counts.publish_failed.fetch_add(1, Ordering::Relaxed);
                counts.publish_error(format!("publish: {e:#}"));
                if e.is::<tokio::time::error::Elapsed>() {
                    // The server stopped answering: end the run with what it has, rather
                    // than wait out every remaining publish.
                    stop.cancel();
                }
            }
        }
    }
    if let Err(e) = counts.answer_us.lock().add(&answers) {
        counts.error(format!("publish answer times: {e}"));
    }
}

/// How long a subscriber's stream may take to open, or a publish to be answered, before the
/// server counts as not answering (and the run goes on rather than hanging).
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one request on the kept-alive connection (opening it if needed) and reads the whole
/// answer; returns its status and body. Bounded by [`ANSWER_TIMEOUT`].
async fn send_one(
    addr: SocketAddr,
    tls: Option<&Tls>,
    conn: &mut Option<(Stream, Vec<u8>)>,
    request: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    match tokio::time::timeout(ANSWER_TIMEOUT, exchange(addr, tls, conn, request)).await {
        Ok(r) => r,
        Err(elapsed) => Err(anyhow::Error::new(elapsed).context(format!(
            "the server gave no answer within {ANSWER_TIMEOUT:?}"
        ))),
    }
}

async fn exchange(
    addr: SocketAddr,
    tls: Option<&Tls>,
    conn: &mut Option<(Stream, Vec<u8>)>,
    request: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    if conn.is_none() {
        *conn = Some((open(addr, 0, 1, None, tls, false).await?, Vec::new()));
    }
    let (stream, buf) = conn.as_mut().expect("just opened");
    stream.write_all(request).await?;
    let head = wire::read_head(stream, buf).await?;
    let body = wire::read_body(stream, buf, head.body).await?;
    if head.close || head.body == wire::BodyKind::UntilClose {
        *conn = None;
    }
    Ok((head.status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = payload(42, 1_700_000_000_000_000_000, 100);
        assert_eq!(p.len(), 100);
        assert_eq!(parse_payload(&p), Some((42, 1_700_000_000_000_000_000)));
    }

    /// The accounting both protocols share: a delivery counted once whatever the pieces the
    /// bytes came in, a repeat as a duplicate, an event the run did not send as foreign.
    #[test]
    fn reader_counts_deliveries_duplicates_and_strangers() {
        let counts = Counts::new(1);
        let mut reader = Reader::new(BodyKind::UntilClose);
        let stream = format!(
            "data: {}\n\ndata: {}\n\ndata: {}\n\ndata: hello\n\ndata: {}\n\n",
            payload(0, now_ns(), 20),
            payload(1, now_ns(), 20),
            payload(0, now_ns(), 20),
            payload(7, now_ns(), 20),
        );
        for piece in stream.as_bytes().chunks(5) {
            assert!(!reader.feed(piece, 5, &counts));
        }
        assert_eq!(reader.received, 2);
        assert_eq!(counts.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(counts.duplicates.load(Ordering::Relaxed), 1);
        // `hello`, and update 7 of a run of five.
        assert_eq!(counts.foreign.load(Ordering::Relaxed), 2);
        assert_eq!(counts.latency_us.lock().len(), 2);
    }

    /// One stream got an update whose publish was never answered, another missed one: the
    /// run lost one, though as many arrived in all as were owed.
    #[test]
    fn a_surplus_does_not_hide_a_loss() {
        let end = |received| SubscriberEnd {
            connected: true,
            received,
            ..SubscriberEnd::default()
        };
        let (owed, ends) = (10, [end(11), end(9)]);
        let lost: u64 = ends.iter().map(|e| e.lost(owed)).sum();
        assert_eq!(lost, 1);
        assert_eq!(ends.iter().map(|e| e.received).sum::<u64>(), 2 * owed);
    }

    #[test]
    fn bitset_counts_duplicates() {
        let mut b = Bitset::default();
        assert!(b.insert(1000));
        assert!(!b.insert(1000));
        assert!(b.insert(3));
    }
}
