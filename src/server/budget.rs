//! The connection budget: at most `--max-connections` connections of every protocol, and a
//! small reserve beyond them, so that a hub whose connections are all taken still answers
//! publishes and health checks, refuses new subscribers with 503, and never spins on `accept`
//! for want of descriptors.
//!
//! Each connection holds a [`Permit`] for as long as it is open. The permit counts the
//! connection's requests under way (an event stream is one for as long as it lasts); a
//! connection with none is idle, and idle connections are the ones the hub closes: after
//! [`Timeouts::idle`], or sooner, the longest idle first, when every permit is taken and the
//! hub needs one for a new connection.

use std::sync::atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// Connections taken beyond `--max-connections` (see [`crate::config::RESERVE_CONNECTIONS`]).
pub use crate::config::RESERVE_CONNECTIONS as RESERVE;

/// How long connections may take, from `--idle-timeout` and `--request-timeout` (hidden flags,
/// so that tests can see these limits act within seconds).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a connection may be idle: no request under way (an HTTP/2 connection without
    /// an open stream, whatever PINGs and SETTINGS it sends; an HTTP/1.1 connection between
    /// requests), or a request head (or TLS handshake) not yet whole. Past it the connection
    /// is closed (slow-loris, idle HTTP/2). 10 s unless a test says otherwise.
    pub idle: Duration,
    /// How long a request that is not an event stream may stay under way (its body read, its
    /// answer sent): a client that never finishes one (an HTTP/2 window held at zero, a body
    /// that never ends) would otherwise hold its connection busy, and its place, for good.
    /// Past it the connection is closed. 60 s unless a test says otherwise: well past the
    /// 30 s a publish body has to arrive.
    pub request: Duration,
}

/// How long a connection must have been idle before it may be closed to make room: one that
/// was accepted a moment ago has had no time to send its request.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// The hub's connections, counted. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    shared: Arc<Shared>,
}

struct Shared {
    /// `--max-connections` plus [`RESERVE`] places, one per open connection.
    places: Arc<Semaphore>,
    max: usize,
    /// Idle connections wait on it; woken one at a time, the longest waiting first
    /// (`notify_one` is FIFO), to close and make room.
    make_room: Notify,
    /// Connections waiting for a place (or a descriptor): a connection woken by `make_room`
    /// when there are none (a wake-up kept from earlier) stays.
    wanted: AtomicUsize,
    /// Connections with a request under way (an event stream among them).
    busy: AtomicUsize,
    /// Connections open (a place is taken before `accept`, and so one more than this, while
    /// the listener waits for the next connection).
    open: AtomicUsize,
    /// Woken each time a connection closes.
    closed: Notify,
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

impl crate::http::ConnectionBudget for Budget {
    fn full(&self) -> bool {
        Budget::full(self)
    }
}

impl Budget {
    pub fn new(max_connections: usize, timeouts: Timeouts, metrics: Arc<Metrics>) -> Budget {
        Budget {
            shared: Arc::new(Shared {
                places: Arc::new(Semaphore::new(max_connections.saturating_add(RESERVE))),
                max: max_connections,
                make_room: Notify::new(),
                wanted: AtomicUsize::new(0),
                busy: AtomicUsize::new(0),
                open: AtomicUsize::new(0),
                closed: Notify::new(),
                timeouts,
                metrics,
            }),
        }
    }

    /// A place for the next connection, waiting for one if every place is taken (the idle
    /// connection waiting longest is asked to close meanwhile, once a second).
    pub async fn place(&self) -> Place {
        let s = &self.shared;
        let place = match s.places.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _wanted = Wanted::new(s);
                loop {
                    s.make_room.notify_one();
                    tokio::select! {
                        p = s.places.clone().acquire_owned() => break p.expect("never closed"),
                        _ = tokio::time::sleep(EVICTABLE_AFTER) => {}
                    }
                }
            }
        };
        Place {
            place,
            budget: self.clone(),
        }
    }

    /// How long connections may take.
    pub fn timeouts(&self) -> Timeouts {
        self.shared.timeouts
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.shared.open.load(Relaxed)
    }

    /// Whether more than `--max-connections` connections have a request under way (the
    /// caller's own among them): then the hub takes no new event stream. Idle connections do
    /// not count: they give way (closed when a new connection needs their place), so that
    /// connections kept open doing nothing cannot keep subscribers out.
    pub fn full(&self) -> bool {
        let busy = self.shared.busy.load(Acquire);
        // (A count caught between another thread's decrement and its increment may wrap for
        // a moment: that is not "full".)
        busy > self.shared.max && busy < usize::MAX / 2
    }

    /// After `accept` failed for want of descriptors: asks the idle connection waiting longest
    /// to close, and waits until a connection has closed, or a second has passed.
    pub async fn wait_for_a_close(&self) {
        let s = &self.shared;
        let _wanted = Wanted::new(s);
        let closed = s.closed.notified();
        tokio::pin!(closed);
        closed.as_mut().enable();
        s.make_room.notify_one();
        let _ = tokio::time::timeout(EVICTABLE_AFTER, closed).await;
    }
}

/// Counts a connection waiting for room while it lives.
struct Wanted<'a>(&'a Shared);

impl<'a> Wanted<'a> {
    fn new(s: &'a Shared) -> Self {
        s.wanted.fetch_add(1, Relaxed);
        Wanted(s)
    }
}

impl Drop for Wanted<'_> {
    fn drop(&mut self) {
        self.0.wanted.fetch_sub(1, Relaxed);
    }
}

/// A place for a connection not yet accepted.
pub struct Place {
    place: OwnedSemaphorePermit,
    budget: Budget,
}

impl Place {
    /// The connection accepted takes the place.
    pub fn occupy(self) -> Permit {
        let s = &self.budget.shared;
        s.open.fetch_add(1, Relaxed);
        s.metrics.connections_open.fetch_add(1, Relaxed);
        Permit {
            _place: self.place,
            activity: Arc::new(Activity {
                requests: AtomicUsize::new(0),
                plain: AtomicUsize::new(0),
                changed: Notify::new(),
                budget: self.budget.shared.clone(),
            }),
            budget: self.budget,
        }
    }
}

/// A connection's place in the budget, held by the connection's task for as long as it is
/// open; with what tells whether the connection is idle.
pub struct Permit {
    _place: OwnedSemaphorePermit,
    activity: Arc<Activity>,
    budget: Budget,
}

/// A connection's requests under way.
struct Activity {
    requests: AtomicUsize,
    /// Requests under way that are not event streams: each must be done within
    /// [`Timeouts::request`].
    plain: AtomicUsize,
    /// Woken when the connection goes from idle to busy or back.
    changed: Notify,
    /// Where busy connections are counted.
    budget: Arc<Shared>,
}

impl Permit {
    /// What counts the connection's requests, for its service.
    pub fn requests(&self) -> Requests {
        Requests(self.activity.clone())
    }

    /// How long the connection may take.
    pub fn timeouts(&self) -> Timeouts {
        self.budget.shared.timeouts
    }

    /// A request that is not an event stream is under way.
    pub fn has_plain_request(&self) -> bool {
        self.activity.plain.load(Acquire) > 0
    }

    /// No request is under way.
    pub fn is_idle(&self) -> bool {
        self.activity.requests.load(Relaxed) == 0
    }

    /// Resolves when the connection goes from idle to busy or back (perhaps also once for a
    /// change already seen).
    pub async fn changed(&self) {
        self.activity.changed.notified().await;
    }

    /// This connection was asked to make room but is busy after all: asks another.
    pub fn pass_eviction_on(&self) {
        let s = &self.budget.shared;
        s.metrics.connections_evicted.fetch_sub(1, Relaxed);
        s.make_room.notify_one();
    }

    /// Resolves when this connection, idle since `since`, is asked to close to make room.
    pub async fn evicted(&self, since: Instant) {
        let s = &self.budget.shared;
        tokio::time::sleep_until(since + EVICTABLE_AFTER).await;
        loop {
            s.make_room.notified().await;
            if s.wanted.load(Relaxed) > 0 {
                break;
            }
        }
        s.metrics.connections_evicted.fetch_add(1, Relaxed);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let s = &self.budget.shared;
        s.open.fetch_sub(1, Relaxed);
        s.metrics.connections_open.fetch_sub(1, Relaxed);
        s.metrics.connections_closed.fetch_add(1, Relaxed);
        // The place itself is given back right after this, when `_place` is dropped.
        s.closed.notify_waiters();
    }
}

/// Counts one connection's requests under way.
#[derive(Clone)]
pub struct Requests(Arc<Activity>);

impl Requests {
    /// Counts a request as under way until the returned guard is dropped (for a response,
    /// when its body has been sent or given up).
    pub fn begin(&self) -> Busy {
        if self.0.plain.fetch_add(1, AcqRel) == 0 {
            self.0.changed.notify_one();
        }
        if self.0.requests.fetch_add(1, AcqRel) == 0 {
            self.0.budget.busy.fetch_add(1, AcqRel);
            self.0.changed.notify_one();
        }
        Busy {
            activity: self.0.clone(),
            plain: true,
        }
    }
}

/// A request under way on a connection (see [`Requests::begin`]).
pub struct Busy {
    activity: Arc<Activity>,
    /// Not (yet) known to be an event stream: under [`Timeouts::request`].
    plain: bool,
}

impl Busy {
    /// The request turned out to be an event stream: it may last as long as it likes.
    pub fn is_stream(&mut self) {
        if std::mem::take(&mut self.plain) {
            self.activity.unplain();
        }
    }
}

impl Activity {
    fn unplain(&self) {
        if self.plain.fetch_sub(1, AcqRel) == 1 {
            self.changed.notify_one();
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.plain {
            self.activity.unplain();
        }
        if self.activity.requests.fetch_sub(1, AcqRel) == 1 {
            self.activity.budget.busy.fetch_sub(1, AcqRel);
            self.activity.changed.notify_one();
        }
    }
}

/// A response body that keeps its request counted as under way until it is dropped: an
/// event stream's lasts as long as the stream.
pub struct CountedBody {
    inner: axum::body::Body,
    _busy: Busy,
}

impl CountedBody {
    pub fn new(inner: axum::body::Body, busy: Busy) -> CountedBody {
        CountedBody { inner, _busy: busy }
    }
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(10),
        request: Duration::from_secs(60),
    };

    #[tokio::test]
    async fn places_run_out_and_the_longest_idle_makes_room() {
        let metrics = Arc::new(Metrics::default());
        let budget = Budget::new(1, TIMEOUTS, metrics.clone());
        let mut permits = Vec::new();
        for _ in 0..=RESERVE {
            permits.push(budget.place().await.occupy());
        }
        assert_eq!(budget.open(), RESERVE + 1);
        assert_eq!(metrics.connections_open.load(Relaxed), (RESERVE + 1) as u64);
        // Idle connections do not make the hub full; busy ones do.
        assert!(!budget.full());
        let first = permits[0].requests().begin();
        assert!(!budget.full(), "one busy of --max-connections 1");
        let second = permits[2].requests().begin();
        let again = permits[2].requests().begin();
        assert!(budget.full(), "two busy");
        drop((second, again));
        assert!(!budget.full());
        drop(first);

        // Every place taken: the next waits. The first connection is busy, the second idle;
        // only the idle one is asked to close.
        let busy = permits[0].requests().begin();
        assert!(!permits[0].is_idle() && permits[1].is_idle());
        let since = Instant::now();
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.place().await }
        });
        let evicted = permits[1].evicted(since);
        tokio::time::timeout(Duration::from_secs(5), evicted)
            .await
            .expect("asked to make room");
        assert!(!waiting.is_finished());
        permits.remove(1);
        let _next = waiting.await.unwrap();
        assert_eq!(metrics.connections_evicted.load(Relaxed), 1);
        drop(busy);
        assert!(permits[0].is_idle());
    }

    #[tokio::test]
    async fn activity_changes_wake_the_connection() {
        let budget = Budget::new(4, TIMEOUTS, Arc::new(Metrics::default()));
        let permit = budget.place().await.occupy();
        let busy = permit.requests().begin();
        let second = permit.requests().begin();
        tokio::time::timeout(Duration::from_secs(1), permit.changed())
            .await
            .expect("became busy");
        drop(busy);
        assert!(!permit.is_idle());
        drop(second);
        assert!(permit.is_idle());
        tokio::time::timeout(Duration::from_secs(1), permit.changed())
            .await
            .expect("became idle");
        assert!(!budget.full());
    }
}
