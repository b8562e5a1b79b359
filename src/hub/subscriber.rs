//! One subscriber: its bounded queue, and the stream that drains it onto the wire.
//!
//! The queue is a small hand-written structure rather than a channel: a channel allocates its
//! slots up front (memory per idle subscriber is what limits a hub), cannot hand its reader
//! everything pending at once, and cannot be closed by the writer with a reason. Here the
//! publisher pushes a pointer to the shared encoded update under this subscriber's own lock,
//! and the stream takes all that is pending in one go and sends it as one chunk, so a
//! subscriber that fell behind catches up with one write instead of one per update.
//!
//! Direct writes: waking a subscriber's task for one small update costs about as much as the
//! write itself once the scheduler, the task's poll and, on an idle hub, another worker
//! thread's wake-up are counted. So while the hub is within its write budget, an update for a
//! subscriber whose stream is waiting with nothing in flight is written by the publishing
//! thread itself, straight to the socket, after the hub's lock is released (see
//! [`DirectSink`]). What the socket did not take stays with the connection, and the stream's
//! task finishes it before anything newer goes out.
//!
//! Past the write budget the same sink serves the coalescing flusher (`flusher`): an update for
//! such a stream inside its window is queued without waking the task, and the flusher writes the
//! whole queue when the window opens.
//!
//! Which of these writers has the socket at any moment is one [`Writer`] state under the
//! subscriber's lock; its transitions, and the races between the writers, are `writer_state`'s.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use parking_lot::{Mutex, MutexGuard};

use super::clock::{instant_of, now_ns, TICK_NS};
use super::coalesce::Coalescing;
use super::selector::{any_matches, Selector};
use super::subscriptions::SubscriberInfo;
use super::teardown::Teardown;
use super::update::SharedUpdate;
use super::writer_state::{OnFlush, OnPoll, OnPublish, Writer};
use super::HubShared;
use crate::metrics::DropReason;
use crate::sse;

/// Queue length at which a stream waiting out its coalescing window is woken anyway.
fn early_flush(limit: usize) -> usize {
    (limit / 2).max(1)
}

/// A subscriber's connection as a publishing thread can write to it: plain HTTP/1.1 over TCP
/// (`server::h1`). Streams served by hyper or over TLS have none and are always written by their
/// own task. The hub hands it event-stream bytes only; how they are framed on the wire is the
/// connection's business.
pub trait DirectSink: Send + Sync {
    /// Writes `events` to the stream, as much as the socket takes at once and without waiting.
    /// What the socket did not take the sink keeps, to be finished by the stream's task before
    /// anything else ([`Wire::FinishDirect`]).
    fn try_send(&self, events: &[u8]) -> Sent;
}

/// How far a direct write got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The socket took everything: the stream is free for the next writer.
    All,
    /// The socket took only part, or failed: the sink keeps the rest, and the stream is busy
    /// until its task has finished it (or found the connection gone).
    Partly,
}

/// What a subscriber's stream gives its writer next.
pub enum Wire {
    /// Event-stream bytes, for the connection to frame and write.
    Data(Bytes),
    /// The last direct write was cut short: the connection finishes what its sink kept before
    /// it asks for anything newer.
    FinishDirect,
}

/// Whether a stream's queue may be written, as far as its coalescing window goes.
enum Window {
    /// Too soon after the last write: the task waits for its timer.
    Shut,
    /// Now; a write of the whole queue starts a new window at this time, if coalescing.
    Open(Option<u64>),
}

/// The most bytes one chunk gathers from several updates (replayed history, or a queue that
/// built up): a subscriber catching up on a backlog gets it a chunk at a time, not as one copy
/// of its whole queue (up to `--subscriber-queue` × `--max-body` bytes of its own, while the
/// updates themselves are shared). An update bigger than this goes alone, uncopied.
const CHUNK_BYTES: usize = 64 * 1024;

/// How long the last writes of a stream the hub has ended may take (shutdown, the token's
/// expiry, the lifetime), all of them together; past it the connection is closed.
pub const LAST_WRITES: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) struct Subscriber {
    pub id: u64,
    pub selectors: Vec<Arc<Selector>>,
    /// The token's `mercure.subscribe` selectors; `None` for an anonymous subscriber.
    pub rights: Option<Vec<Arc<Selector>>>,
    /// The last update offered, so that a subscriber found twice by one publish gets it once.
    last_seq: AtomicU64,
    /// When it was last counted as receiving (see `Coalescing::touched`).
    seen: AtomicU64,
    state: Mutex<State>,
    /// Tears the stream down when it can no longer end by itself (a client that stopped
    /// reading never lets the end of the stream through).
    teardown: Option<Teardown>,
    /// Kept only when the hub publishes subscription events.
    pub info: Option<Box<SubscriberInfo>>,
    /// A Mercure 0.x (`topic=`) stream: subscription events reach it in 0.x's shape (see
    /// [`crate::hub::Update::wire`]).
    pub legacy_wire: bool,
    /// When the stream reaches `--max-stream-lifetime` ([`now_ns`]; 0: never). The hub's sweep
    /// ends it then, instead of a timer per stream that an idle stream would keep for hours.
    /// When the token's `exp` comes first it is that, and `by_exp` is set: the stream's own
    /// timer ends it on the dot, but only when its body is polled, which hyper does only while
    /// the client reads; the sweep is the backstop.
    ends_at: u64,
    by_exp: bool,
}

/// The hub-wide heartbeat ticks this many times per `--heartbeat`, and a stream gets a comment
/// line after this many ticks with nothing queued: so an idle stream hears from the hub between
/// ¾ and 1 heartbeat interval after its last update (with one tick per interval and a flag it
/// would be up to two intervals), while the tick still visits each stream only a few times per
/// interval instead of keeping a timer per stream.
pub const HEARTBEAT_TICKS: u8 = 4;

#[derive(Default)]
struct State {
    queue: VecDeque<SharedUpdate>,
    heartbeat: bool,
    /// Heartbeat ticks since something was last queued (see [`HEARTBEAT_TICKS`]).
    quiet: u8,
    waker: Option<Waker>,
    closed: Option<DropReason>,
    /// Who may write to the socket now (see `writer_state`).
    writer: Writer,
    /// When the last coalesced write went out ([`now_ns`]; 0: never): the window runs from it.
    last_sent: u64,
    /// When the flusher's entry for this subscriber falls due (0: it has none). A hold due
    /// sooner enters it again; the flusher takes an entry that finds nothing to do as done.
    entry_at: u64,
    /// Set while the stream's writer allows direct writes.
    sink: Option<Arc<dyn DirectSink>>,
}

/// What became of an update offered to a subscriber.
pub(crate) enum Offer {
    /// Queued; the caller wakes the stream's task with this, once the hub's lock is released.
    Queued(Option<Waker>),
    Skipped,
    /// The subscriber was too far behind and has been closed; its task is to be woken.
    Dropped(Option<Waker>),
    /// The caller writes the update to this sink once the hub's lock is released, then calls
    /// [`Subscriber::direct_done`].
    Direct(Arc<dyn DirectSink>),
    /// Queued and held: the caller enters the subscriber in the flusher, to be written at this
    /// time ([`now_ns`]).
    Held(u64),
}

/// What the flusher does for a subscriber whose entry fell due.
pub(crate) enum Flush {
    /// Nothing (no longer held, or its task has it in hand).
    Done,
    /// Writes this chunk to the sink, then calls [`Subscriber::direct_done`].
    Write(Arc<dyn DirectSink>, Bytes),
    /// The stream's task writes: wake it.
    Wake(Waker),
    /// The window was pushed back: enter it again at this time.
    Later(u64),
}

/// When a coalesced write is due, for the hub's current window: `(now, window)` in nanoseconds,
/// given to [`Subscriber::offer`] while the hub batches and its flusher runs.
pub(crate) type HoldClock = Option<(u64, u64)>;

/// A hold due this much sooner than the subscriber's entry in the flusher gets an entry of its
/// own (the flusher's resolution).
const ENTRY_RESOLUTION_NS: u64 = TICK_NS;

impl Subscriber {
    pub fn new(
        id: u64,
        selectors: Vec<Arc<Selector>>,
        rights: Option<Vec<Arc<Selector>>>,
        teardown: Option<Teardown>,
        info: Option<Box<SubscriberInfo>>,
        legacy_wire: bool,
    ) -> Self {
        Subscriber {
            id,
            legacy_wire,
            selectors,
            rights,
            last_seq: AtomicU64::new(u64::MAX),
            seen: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            teardown,
            info,
            ends_at: 0,
            by_exp: false,
        }
    }

    /// The stream ends at `at` ([`now_ns`]), when the hub's sweep finds it past it; `by_exp`:
    /// as its token expires there (nothing queued goes out), not at its lifetime.
    pub fn ending_at(mut self, at: u64, by_exp: bool) -> Self {
        self.ends_at = at;
        self.by_exp = by_exp;
        self
    }

    /// Why the stream ends at its `ends_at`.
    pub fn end_reason(&self) -> DropReason {
        if self.by_exp {
            DropReason::Expired
        } else {
            DropReason::Lifetime
        }
    }

    /// Ends the stream as its token's `exp` does: what is queued is not sent. Whether it was
    /// open until now.
    pub fn expire(&self) -> bool {
        self.state.lock().queue.clear();
        self.close(DropReason::Expired)
    }

    /// Has the stream reached its lifetime at `now`?
    pub fn outlived(&self, now: u64) -> bool {
        self.ends_at != 0 && now >= self.ends_at
    }

    /// For a stream the hub has just ended: tears it down [`LAST_WRITES`] from now if it is
    /// still being served then (see [`Teardown::after_last_writes`]): a stream hyper writes
    /// is polled only while its client reads, so one that stopped would keep it past its end.
    pub fn close_later(self: &Arc<Self>) {
        if let Some(t) = &self.teardown {
            t.after_last_writes(Arc::downgrade(self));
        }
    }

    /// May this subscriber see `update` at all (topics and, for private updates, rights)?
    pub fn wants(&self, update: &SharedUpdate) -> bool {
        any_matches(&self.selectors, &update.topics) && self.authorized_for(update)
    }

    pub fn authorized_for(&self, update: &SharedUpdate) -> bool {
        !update.private
            || self
                .rights
                .as_deref()
                .is_some_and(|r| any_matches(r, &update.topics))
    }

    /// Queues `update` unless already offered or not authorized; the caller has found that the
    /// subscriber's topics match (through the exact-topic index, or by testing its templates
    /// once per update for all who share them). With `direct`, an idle
    /// stream with a sink is claimed for a direct write instead ([`Offer::Direct`]).
    pub fn offer(
        &self,
        update: &SharedUpdate,
        limit: usize,
        coalescing: &Coalescing,
        direct: bool,
        hold: HoldClock,
    ) -> Offer {
        if self.last_seq.swap(update.seq, Ordering::Relaxed) == update.seq {
            return Offer::Skipped;
        }
        if !self.authorized_for(update) {
            return Offer::Skipped;
        }
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return Offer::Skipped;
        }
        if st.queue.len() >= limit {
            st.closed = Some(DropReason::Slow);
            st.queue = VecDeque::new();
            let waker = st.waker.take();
            drop(st);
            if let Some(t) = &self.teardown {
                t.now();
            }
            return Offer::Dropped(waker);
        }
        st.quiet = 0;
        let sink = match &st.sink {
            Some(sink) if direct && st.queue.is_empty() => Some(sink),
            _ => None,
        };
        let room = st.queue.len() + 1 < early_flush(limit);
        let (writer, then) = st.writer.publish(sink, room, || self.hold_until(&st, hold));
        let then = then.map_sink(Arc::clone);
        st.writer = writer;
        let offer = match then {
            OnPublish::WriteDirect(sink) => {
                drop(st);
                coalescing.touched(&self.seen);
                return Offer::Direct(sink);
            }
            OnPublish::Queue { wake } => Offer::Queued(if wake { st.waker.take() } else { None }),
            OnPublish::Hold(at) => {
                // The flusher already has an entry for it unless this hold is due sooner.
                let enter = st.entry_at == 0 || at + ENTRY_RESOLUTION_NS < st.entry_at;
                if enter {
                    st.entry_at = at;
                    Offer::Held(at)
                } else {
                    Offer::Queued(None)
                }
            }
        };
        st.queue.push_back(update.clone());
        drop(st);
        coalescing.touched(&self.seen);
        offer
    }

    /// When the flusher should write an update queued now, if this stream can be held for it
    /// (and its task waits with nothing in flight: see [`Writer::publish`]): it has a sink and
    /// its window is still open.
    fn hold_until(&self, st: &State, hold: HoldClock) -> Option<u64> {
        let (now, window) = hold?;
        if st.last_sent == 0 || st.sink.is_none() {
            return None;
        }
        let at = st.last_sent + window;
        (now < at).then_some(at)
    }

    /// The flusher's part, when this subscriber's entry falls due at `now`: the whole queue as
    /// one chunk for the sink, claimed as a direct write is.
    pub fn flush(&self, now: u64) -> Flush {
        let mut st = self.state.lock();
        st.entry_at = 0;
        let sink = match &st.sink {
            Some(sink) if st.closed.is_none() && !st.queue.is_empty() => Some(sink),
            _ => None,
        };
        let (writer, then) = st.writer.flush(now, sink);
        let then = then.map_sink(Arc::clone);
        st.writer = writer;
        match then {
            OnFlush::Done => Flush::Done,
            OnFlush::Later(at) => {
                st.entry_at = at;
                Flush::Later(at)
            }
            OnFlush::Wake => st.waker.take().map_or(Flush::Done, Flush::Wake),
            OnFlush::Write(sink) => {
                let (n, bytes) = chunk_len(&st.queue, self.legacy_wire);
                let chunk = concat(st.queue.range(..n), bytes, self.legacy_wire);
                st.queue.drain(..n);
                if st.queue.is_empty() {
                    st.last_sent = now;
                }
                // Else the window is not restarted: the stream's task, woken when this write is
                // done, writes the rest at once.
                Flush::Write(sink, chunk)
            }
        }
    }

    /// Ends a direct write claimed by [`Offer::Direct`] (or by the flusher), as far as it got,
    /// and wakes the stream's task if it has something to write now.
    pub fn direct_done(&self, sent: Sent) {
        let mut st = self.state.lock();
        // The task finishes what the sink kept before anything else. (Without a sink the stream
        // has ended, and the rest has nowhere to go.)
        let unfinished = sent == Sent::Partly && st.sink.is_some();
        st.writer = st.writer.done(unfinished);
        let pending = unfinished || !st.queue.is_empty() || st.heartbeat || st.closed.is_some();
        if !pending {
            return;
        }
        if let Some(w) = st.waker.take() {
            drop(st);
            w.wake();
        }
    }

    /// Called by the hub-wide heartbeat tick, [`HEARTBEAT_TICKS`] times per `--heartbeat`: a
    /// stream that had nothing queued for that many ticks gets a comment line.
    pub fn tick(&self) {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return;
        }
        st.quiet += 1;
        if st.quiet < HEARTBEAT_TICKS {
            return;
        }
        st.quiet = 0;
        st.heartbeat = true;
        if let Some(w) = st.waker.take() {
            drop(st);
            w.wake();
        }
    }

    /// Ends the stream after what is queued has been sent.
    pub fn close(&self, reason: DropReason) -> bool {
        let mut st = self.state.lock();
        if st.closed.is_some() {
            return false;
        }
        st.closed = Some(reason);
        if let Some(w) = st.waker.take() {
            drop(st);
            w.wake();
        }
        true
    }

    fn closed(&self) -> Option<DropReason> {
        self.state.lock().closed
    }

    /// Has the stream been ended (by the hub, its token's expiry or its client)?
    pub fn is_closed(&self) -> bool {
        self.closed().is_some()
    }
}

/// The body of one subscriber's response: the opening comment, the replay, then live updates
/// until the hub, the token's expiry or the client ends it.
///
/// Kept small: an HTTP/2 stream's body is held (boxed) for as long as the stream lasts, and an
/// HTTP/1.1 stream's task holds it too.
pub struct SubscriberStream {
    hub: Arc<HubShared>,
    sub: Arc<Subscriber>,
    /// The replay still to send, newest first (taken from the end).
    replay: Vec<SharedUpdate>,
    /// When the token's `exp` ends the stream (nothing more is sent after it). The end of
    /// `--max-stream-lifetime` is the hub's sweep's to find (see [`Subscriber::outlived`]).
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    drain: Drain,
    /// The opening comment is still to send.
    opening: bool,
    done: bool,
}

/// What the stream's task keeps for taking the queue; apart from the rest of the stream so that
/// it can be used while the subscriber's lock is held.
struct Drain {
    /// Reused between drains so that taking the queue does not allocate.
    spare: VecDeque<SharedUpdate>,
    /// Coalescing (`--coalesce` not 0): live updates are sent at most once per the hub's
    /// window, from the subscriber's `last_sent`; `hold` wakes the stream when the window is
    /// over, at `hold_at` (allocated only once a stream is that busy, and only when no flusher
    /// holds it).
    coalesce: bool,
    hold_at: u64,
    hold: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl SubscriberStream {
    /// A stream for `sub`: `replay` first (oldest first), ended by the token's expiry in
    /// `expires_in`, coalescing live updates if `window` is not zero.
    pub(crate) fn new(
        hub: Arc<HubShared>,
        sub: Arc<Subscriber>,
        mut replay: Vec<SharedUpdate>,
        expires_in: Option<Duration>,
        window: Duration,
    ) -> Self {
        replay.reverse();
        SubscriberStream {
            hub,
            sub,
            replay,
            expires: expires_in.map(|d| Box::pin(tokio::time::sleep(d))),
            drain: Drain {
                spare: VecDeque::new(),
                coalesce: !window.is_zero(),
                hold_at: 0,
                hold: None,
            },
            opening: true,
            done: false,
        }
    }

    /// The hub's id for this subscriber (for logs).
    pub fn subscriber_id(&self) -> u64 {
        self.sub.id
    }

    /// Lets publishing threads write updates straight to the connection through `sink`
    /// whenever this stream waits with nothing in flight.
    pub fn attach_sink(&self, sink: Arc<dyn DirectSink>) {
        self.sub.state.lock().sink = Some(sink);
    }

    /// What to send next: the opening and the replay, then live updates; `None` while there is
    /// nothing (the task is woken when there is) and once the stream has ended (`done`).
    fn next_chunk(&mut self, cx: &mut Context<'_>) -> Option<Wire> {
        // First, so that a token expiring during a long replay stops it there.
        self.poll_expiry(cx);
        if std::mem::take(&mut self.opening) {
            let opening = Bytes::from_static(sse::OPENING);
            return Some(Wire::Data(self.with_replay(opening)));
        }
        if !self.replay.is_empty() {
            return Some(Wire::Data(self.with_replay(Bytes::new())));
        }
        let mut st = self.sub.state.lock();
        // Whatever is returned below, the task has the socket until it polls again, unless a
        // direct write has it now; every `None` leaves it waiting with nothing in flight.
        let (writer, then) = st.writer.poll();
        st.writer = writer;
        match then {
            OnPoll::WaitForDirect => {
                register(&mut st.waker, cx);
                return None;
            }
            OnPoll::FinishDirect => return Some(Wire::FinishDirect),
            OnPoll::Look => {}
        }
        if !st.queue.is_empty() {
            let legacy = self.sub.legacy_wire;
            return self.drain.take_queue(st, &self.hub, legacy, cx);
        }
        if std::mem::take(&mut st.heartbeat) {
            return Some(Wire::Data(Bytes::from_static(sse::HEARTBEAT)));
        }
        if st.closed.is_some() {
            self.done = true;
            return None;
        }
        st.writer = st.writer.wait();
        register(&mut st.waker, cx);
        None
    }

    /// Ends the stream when its token expires: nothing more is sent.
    fn poll_expiry(&mut self, cx: &mut Context<'_>) {
        let Some(exp) = self.expires.as_mut() else {
            return;
        };
        if exp.as_mut().poll(cx).is_pending() {
            return;
        }
        self.expires = None;
        self.replay = Vec::new();
        // Nor does what was queued for it go out after `exp`.
        self.sub.state.lock().queue.clear();
        if self.sub.close(DropReason::Expired) {
            // What this poll still hands out (a heartbeat) may take the last of the client's
            // window, and the body not be polled again: torn down if it is still served in
            // 5 s (the sweep no longer looks at an ended stream).
            self.sub.close_later();
            self.hub.metrics.dropped(DropReason::Expired);
            tracing::info!(subscriber = self.sub.id, "Dropped client: token expired");
        }
    }

    /// `first` followed by as much of the replay as fits in a chunk.
    fn with_replay(&mut self, first: Bytes) -> Bytes {
        if self.replay.is_empty() {
            return first;
        }
        let mut buf = BytesMut::from(&first[..]);
        self.fill_replay(&mut buf);
        buf.freeze()
    }

    fn fill_replay(&mut self, buf: &mut BytesMut) {
        while buf.len() < CHUNK_BYTES {
            match self.replay.pop() {
                Some(u) => buf.extend_from_slice(u.wire(self.sub.legacy_wire)),
                None => break,
            }
        }
        if self.replay.is_empty() {
            // Its buffer given back: a stream that resumed from many updates would otherwise
            // keep eight bytes a replayed update for as long as it lasts.
            self.replay = Vec::new();
        }
    }
}

impl Drain {
    /// The queue (or a chunk's worth of it) as one chunk, unless the stream's coalescing window
    /// is still open: then the task waits for its timer.
    fn take_queue(
        &mut self,
        mut st: MutexGuard<'_, State>,
        hub: &HubShared,
        legacy: bool,
        cx: &mut Context<'_>,
    ) -> Option<Wire> {
        let window_from = match self.window_opens(&st, hub, cx) {
            Window::Shut => {
                // Publishes do not wake the stream meanwhile (unless its queue fills up, or it
                // is closed); the timer does, once.
                st.writer = st.writer.hold();
                register(&mut st.waker, cx);
                return None;
            }
            Window::Open(from) => from,
        };
        if self.hold_at != 0 {
            if self.hold_at > now_ns() {
                // Written before its window opened (a queue half full, a close): the armed
                // timer would only wake the task for nothing.
                self.hold = None;
            }
            self.hold_at = 0;
        }
        let (n, bytes) = chunk_len(&st.queue, legacy);
        if n == st.queue.len() {
            std::mem::swap(&mut st.queue, &mut self.spare);
            if let Some(now) = window_from {
                st.last_sent = now;
            }
        } else {
            // A backlog: this chunk does not restart the window, so the rest follows at once.
            self.spare.extend(st.queue.drain(..n));
        }
        drop(st);
        let chunk = concat(self.spare.iter(), bytes, legacy);
        self.spare.clear();
        // Counted with the direct and the flusher's writes: the retune compares the writes made
        // with the budget (see `coalesce`).
        hub.metrics.task_writes.fetch_add(1, Ordering::Relaxed);
        Some(Wire::Data(chunk))
    }

    /// Whether the queue may be written now, as far as coalescing goes. While the window is
    /// shut the stream's own timer is armed for when it opens (tokio rounds it up to its next
    /// millisecond: streams without a direct sink wait up to that much longer than the
    /// flusher's, which may write a millisecond early).
    fn window_opens(&mut self, st: &State, hub: &HubShared, cx: &mut Context<'_>) -> Window {
        let window = self.window(hub);
        let filling = st.queue.len() >= early_flush(hub.config.subscriber_queue);
        if window.is_zero() || filling || st.closed.is_some() {
            return Window::Open(None);
        }
        let now = now_ns();
        let open_at = st.last_sent + window.as_nanos() as u64;
        if st.last_sent == 0 || now >= open_at {
            return Window::Open(Some(now));
        }
        // Too soon after the last write: let more updates join this one.
        let deadline = instant_of(open_at);
        let hold = match &mut self.hold {
            Some(h) => {
                if self.hold_at != open_at {
                    h.as_mut().reset(deadline);
                }
                h
            }
            None => self
                .hold
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.hold_at = open_at;
        if hold.as_mut().poll(cx).is_pending() {
            Window::Shut
        } else {
            Window::Open(Some(now))
        }
    }

    /// How long updates wait after a write to this subscriber (see `coalesce`).
    fn window(&self, hub: &HubShared) -> Duration {
        if !self.coalesce {
            return Duration::ZERO;
        }
        hub.coalescing.window()
    }
}

impl SubscriberStream {
    /// For a writer waiting on a full socket: has the hub ended this stream, and why (`Slow`:
    /// dropped for falling too far behind)? Runs the token's expiry and the lifetime too, which
    /// would otherwise wait for the next chunk to be asked for: a client that stops reading
    /// must not keep its stream past them. While the stream is open, the task is woken when it
    /// ends.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>) -> Option<DropReason> {
        self.poll_expiry(cx);
        let mut st = self.sub.state.lock();
        if st.closed.is_none() {
            register(&mut st.waker, cx);
        }
        st.closed
    }

    /// Has the hub ended this stream (whatever is still queued is being sent)?
    pub fn ending(&self) -> bool {
        self.sub.closed().is_some()
    }

    /// Was the stream ended because the subscriber fell too far behind?
    pub fn dropped_as_slow(&self) -> bool {
        self.sub.closed() == Some(DropReason::Slow)
    }

    /// What to send next; `Ready(None)` once the stream has ended.
    pub fn poll_wire(&mut self, cx: &mut Context<'_>) -> Poll<Option<Wire>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.next_chunk(cx) {
            Some(wire) => Poll::Ready(Some(wire)),
            None if self.done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// The next event-stream bytes to send, for a writer that attached no sink (hyper's body,
    /// which frames every chunk itself); `Ready(None)` once the stream has ended.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.poll_wire(cx).map(|w| {
            w.map(|w| match w {
                Wire::Data(b) => b,
                // Only a direct write is cut short, and only a writer that attached a sink
                // allows direct writes; that writer calls `poll_wire`.
                Wire::FinishDirect => {
                    debug_assert!(false, "a direct write to a stream without a sink");
                    Bytes::new()
                }
            })
        })
    }
}

impl Body for SubscriberStream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.get_mut()
            .poll_chunk(cx)
            .map(|c| c.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SubscriberStream {
    fn drop(&mut self) {
        // The sink holds the connection open; it goes with the stream, even if a publisher
        // still holds the subscriber for a moment.
        let sink = self.sub.state.lock().sink.take();
        drop(sink);
        self.hub.remove(&self.sub, self.sub.closed());
    }
}

/// How many updates from the front of `queue` make the next chunk, and their bytes: as many as
/// fit in [`CHUNK_BYTES`], and at least one.
fn chunk_len(queue: &VecDeque<SharedUpdate>, legacy: bool) -> (usize, usize) {
    let mut bytes = 0;
    for (i, u) in queue.iter().enumerate() {
        let len = u.wire(legacy).len();
        if i > 0 && bytes + len > CHUNK_BYTES {
            return (i, bytes);
        }
        bytes += len;
    }
    (queue.len(), bytes)
}

/// The updates' `bytes` bytes as one chunk; a lone update's are shared, not copied.
fn concat<'a>(
    mut updates: impl ExactSizeIterator<Item = &'a SharedUpdate>,
    bytes: usize,
    legacy: bool,
) -> Bytes {
    if updates.len() == 1 {
        return updates
            .next()
            .map(|u| u.wire(legacy).clone())
            .unwrap_or_default();
    }
    let mut buf = BytesMut::with_capacity(bytes);
    for u in updates {
        buf.extend_from_slice(u.wire(legacy));
    }
    buf.freeze()
}

/// Keeps `cx`'s waker to be woken, unless the same one is kept already.
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;
    use crate::hub::WriteBudget;

    /// A sink that takes everything.
    struct Sink;

    impl DirectSink for Sink {
        fn try_send(&self, _: &[u8]) -> Sent {
            Sent::All
        }
    }

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    const LIMIT: usize = 100;

    /// A subscriber with a sink whose task sleeps with `count`'s waker.
    fn subscriber(count: &Arc<Count>) -> Subscriber {
        let sub = Subscriber::new(1, Vec::new(), None, None, None, false);
        let mut st = sub.state.lock();
        st.sink = Some(Arc::new(Sink));
        st.waker = Some(Waker::from(count.clone()));
        drop(st);
        sub
    }

    fn update(seq: u64) -> SharedUpdate {
        Arc::new(super::super::Update {
            seq,
            id: seq.to_string(),
            topics: vec!["t".to_owned()],
            private: false,
            time_ms: 0,
            encoded: Bytes::from(format!("data: {seq}\n\n")),
            alt: None,
            alt_is_legacy: false,
        })
    }

    fn writer(sub: &Subscriber) -> Writer {
        sub.state.lock().writer
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::Relaxed)
    }

    /// A publish arriving while a direct write is in flight queues behind it without waking the
    /// task; the end of the write hands the stream back to the task and wakes it for the update.
    #[test]
    fn a_publish_during_a_direct_write_goes_out_after_it() {
        let count = Arc::new(Count::default());
        let sub = subscriber(&count);
        let coalescing = Coalescing::new(Duration::ZERO, WriteBudget::PerCore(1));
        sub.state.lock().writer = Writer::Waiting;
        assert!(matches!(
            sub.offer(&update(1), LIMIT, &coalescing, true, None),
            Offer::Direct(_)
        ));
        assert!(matches!(
            sub.offer(&update(2), LIMIT, &coalescing, true, None),
            Offer::Queued(None)
        ));
        assert_eq!(writer(&sub), Writer::Direct);
        sub.direct_done(Sent::All);
        assert_eq!(woken(&count), 1, "woken for what queued meanwhile");
        assert_eq!(writer(&sub), Writer::Waiting);
        assert_eq!(sub.state.lock().queue.len(), 1);
    }

    /// A held stream is claimed once: a publisher finding it held queues, the flusher writes
    /// everything queued as one chunk, and what the socket did not take is the task's to write
    /// before any further direct write.
    #[test]
    fn the_flusher_writes_a_held_queue_once_and_leaves_the_rest_to_the_task() {
        let count = Arc::new(Count::default());
        let sub = subscriber(&count);
        let coalescing = Coalescing::new(Duration::from_secs(1), WriteBudget::PerCore(1));
        let window = 10 * TICK_NS;
        let now = now_ns();
        let mut st = sub.state.lock();
        st.writer = Writer::Waiting;
        st.last_sent = now;
        drop(st);
        let hold = Some((now, window));
        let Offer::Held(at) = sub.offer(&update(1), LIMIT, &coalescing, false, hold) else {
            panic!("not held")
        };
        assert_eq!(at, now + window);
        assert!(matches!(
            sub.offer(&update(2), LIMIT, &coalescing, true, hold),
            Offer::Queued(None)
        ));
        assert!(matches!(sub.flush(at - 2 * TICK_NS), Flush::Later(t) if t == at));
        let Flush::Write(_, chunk) = sub.flush(at) else {
            panic!("not written")
        };
        assert_eq!(&chunk[..], b"data: 1\n\ndata: 2\n\n");
        assert!(matches!(sub.flush(at), Flush::Done), "claimed once");
        assert!(matches!(
            sub.offer(&update(3), LIMIT, &coalescing, true, None),
            Offer::Queued(None)
        ));
        sub.direct_done(Sent::Partly);
        assert_eq!(writer(&sub), Writer::Carry);
        assert_eq!(woken(&count), 1);
        assert!(
            matches!(
                sub.offer(&update(4), LIMIT, &coalescing, true, None),
                Offer::Queued(None)
            ),
            "no direct write before the rest of the last (the task's waker was taken already)"
        );
    }

    /// Close during each state: the task is woken (or, while a direct write is in flight, by
    /// its end), nothing more is queued, and the flusher writes nothing.
    #[test]
    fn a_close_in_any_state_hands_the_stream_to_its_task() {
        let states = [
            Writer::Task,
            Writer::Waiting,
            Writer::Direct,
            Writer::Carry,
            Writer::TaskHolds,
            Writer::FlusherHolds { at: now_ns() },
        ];
        let coalescing = Coalescing::new(Duration::ZERO, WriteBudget::PerCore(1));
        for state in states {
            let count = Arc::new(Count::default());
            let sub = subscriber(&count);
            let mut st = sub.state.lock();
            st.writer = state;
            st.queue.push_back(update(1));
            drop(st);
            assert!(sub.close(DropReason::Shutdown));
            assert_eq!(woken(&count), 1, "{state:?}");
            assert!(matches!(
                sub.offer(&update(2), LIMIT, &coalescing, true, None),
                Offer::Skipped
            ));
            assert!(
                !matches!(sub.flush(u64::MAX / 2), Flush::Write(..)),
                "{state:?}"
            );
            if state == Writer::Direct {
                sub.state.lock().waker = Some(Waker::from(count.clone()));
                sub.direct_done(Sent::All);
                assert_eq!(woken(&count), 2, "woken by the end of the direct write");
            }
            let (writer, then) = writer(&sub).poll();
            assert_eq!(writer, Writer::Task, "{state:?}");
            assert_ne!(then, OnPoll::WaitForDirect, "{state:?}");
            assert_eq!(
                sub.state.lock().queue.len(),
                1,
                "what was queued still goes out"
            );
        }
    }
}
