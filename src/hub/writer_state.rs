//! Who may write to a subscriber's socket now. Up to four writers share one connection: the
//! stream's own task, a publishing thread writing an update directly, a flusher shard writing a
//! held queue, and (for streams without a direct sink) hyper, which only ever runs the task.
//! This is the rule that keeps them from writing at once or out of order, as one enum and the
//! transitions between its states, without the queue, the lock or the socket: the subscriber
//! keeps a [`Writer`] under its lock and asks it what to do at each event.
//!
//! (Not to be confused with `writer`, the durable history's writer thread.)

use super::clock::TICK_NS;

/// Who has a subscriber's socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Writer {
    /// The stream's task: it is writing what it last took, or looks at the queue when next
    /// polled. A new stream starts here (its opening and replay come first).
    #[default]
    Task,
    /// The task waits with nothing in flight: a publishing thread may write an update straight
    /// to the socket.
    Waiting,
    /// A publishing thread or the flusher is writing; the task must not, and is woken when the
    /// write is done ([`Writer::done`]).
    Direct,
    /// A direct write left bytes the socket did not take (the sink keeps them): the task
    /// finishes them before anything else, and nobody writes directly until it has.
    Carry,
    /// The task waits out its coalescing window on its own timer (the stream has no sink, or
    /// the flusher is not running): publishes do not wake it unless its queue is half full.
    TaskHolds,
    /// The task waits and the flusher writes the queue when the window opens, at `at` (the
    /// hub's clock): publishes do not wake the task unless its queue is half full.
    FlusherHolds { at: u64 },
}

/// What to do with a published update.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OnPublish<S> {
    /// Do not queue it: write it to this sink once the hub's lock is released, then call
    /// [`Writer::done`].
    WriteDirect(S),
    /// Queue it, and wake the task if `wake` (the task is asleep only in `Waiting` and the holds,
    /// and a task that is running finds it anyway).
    Queue { wake: bool },
    /// Queue it without waking the task: the flusher writes it at this time.
    Hold(u64),
}

impl<S> OnPublish<S> {
    pub fn map_sink<T>(self, f: impl FnOnce(S) -> T) -> OnPublish<T> {
        match self {
            OnPublish::WriteDirect(s) => OnPublish::WriteDirect(f(s)),
            OnPublish::Queue { wake } => OnPublish::Queue { wake },
            OnPublish::Hold(at) => OnPublish::Hold(at),
        }
    }
}

/// What the flusher does when a subscriber's entry falls due.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OnFlush<S> {
    /// Nothing: the stream is no longer held by the flusher (its task took over, or a direct
    /// write is in flight).
    Done,
    /// Too early (the entry was filed before the hold moved later): enter it again for this time.
    Later(u64),
    /// Write the queue as one chunk to this sink, then call [`Writer::done`].
    Write(S),
    /// The flusher cannot write (no sink, the stream is closing, nothing queued): wake the task.
    Wake,
}

/// What the stream's task does when polled for live updates.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OnPoll {
    /// A direct write has the socket: wait to be woken by its end.
    WaitForDirect,
    /// Have the connection finish what the last direct write left, first.
    FinishDirect,
    /// Look at the queue (and the heartbeat, and whether the stream ended).
    Look,
}

/// How early before its time a held queue may still be written rather than be entered again:
/// the flusher's tick, since it may write a tick's entries when the tick begins (and a hold
/// pushed back by less than that is not worth another wake-up).
pub(crate) const FLUSH_SLACK_NS: u64 = TICK_NS;

impl<S> OnFlush<S> {
    pub fn map_sink<T>(self, f: impl FnOnce(S) -> T) -> OnFlush<T> {
        match self {
            OnFlush::Write(s) => OnFlush::Write(f(s)),
            OnFlush::Done => OnFlush::Done,
            OnFlush::Later(at) => OnFlush::Later(at),
            OnFlush::Wake => OnFlush::Wake,
        }
    }
}

impl Writer {
    /// An update is published to this stream. `direct` is the sink when the publisher may write
    /// it directly (it asked to, the stream has a sink and nothing queued before it); `room`
    /// whether the queue stays under half full with it; `hold` when the flusher would write a
    /// held update (the stream's window is still open and it has a sink), asked only if needed.
    pub fn publish<S>(
        self,
        direct: Option<S>,
        room: bool,
        hold: impl FnOnce() -> Option<u64>,
    ) -> (Writer, OnPublish<S>) {
        use OnPublish::{Hold, Queue, WriteDirect};
        match (self, direct) {
            (Writer::Waiting, Some(sink)) => (Writer::Direct, WriteDirect(sink)),
            (Writer::Waiting, None) => match hold().filter(|_| room) {
                Some(at) => (Writer::FlusherHolds { at }, Hold(at)),
                None => (Writer::Waiting, Queue { wake: true }),
            },
            // The direct writer wakes the task when it is done.
            (Writer::Direct, _) => (Writer::Direct, Queue { wake: false }),
            // A held stream is woken early only so that the wait never makes it "slow".
            (Writer::TaskHolds | Writer::FlusherHolds { .. }, _) => (self, Queue { wake: !room }),
            (Writer::Task | Writer::Carry, _) => (self, Queue { wake: true }),
        }
    }

    /// The flusher's entry for this stream falls due at `now`; `sink` is the stream's when it
    /// has one, is not closing and has something queued.
    pub fn flush<S>(self, now: u64, sink: Option<S>) -> (Writer, OnFlush<S>) {
        match (self, sink) {
            (Writer::FlusherHolds { at }, _) if now + FLUSH_SLACK_NS < at => {
                (self, OnFlush::Later(at))
            }
            (Writer::FlusherHolds { .. }, Some(sink)) => (Writer::Direct, OnFlush::Write(sink)),
            (Writer::FlusherHolds { .. }, None) => (Writer::Waiting, OnFlush::Wake),
            _ => (self, OnFlush::Done),
        }
    }

    /// A direct write (a publisher's or the flusher's) is over; `left_over` when the socket did
    /// not take everything and the sink kept the rest for the task.
    pub fn done(self, left_over: bool) -> Writer {
        debug_assert_eq!(self, Writer::Direct, "only a direct write ends");
        if left_over {
            Writer::Carry
        } else {
            Writer::Waiting
        }
    }

    /// The stream's task is polled for live updates. Whoever held the stream, the task takes it
    /// over (a flusher's entry then finds nothing to do), unless a direct write is in flight.
    pub fn poll(self) -> (Writer, OnPoll) {
        match self {
            Writer::Direct => (Writer::Direct, OnPoll::WaitForDirect),
            Writer::Carry => (Writer::Task, OnPoll::FinishDirect),
            _ => (Writer::Task, OnPoll::Look),
        }
    }

    /// The task found nothing to write and waits.
    pub fn wait(self) -> Writer {
        debug_assert_eq!(self, Writer::Task);
        Writer::Waiting
    }

    /// The task waits out its coalescing window on its own timer.
    pub fn hold(self) -> Writer {
        debug_assert_eq!(self, Writer::Task);
        Writer::TaskHolds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Writer; 6] = [
        Writer::Task,
        Writer::Waiting,
        Writer::Direct,
        Writer::Carry,
        Writer::TaskHolds,
        Writer::FlusherHolds { at: 50 * TICK_NS },
    ];

    fn no_hold() -> Option<u64> {
        None
    }

    /// A publish for a waiting stream is written by the publisher; in any other state it is
    /// queued, since someone else has the socket or the stream is behind.
    #[test]
    fn only_a_waiting_stream_is_written_directly() {
        for w in ALL {
            let (next, then) = w.publish(Some("sink"), true, no_hold);
            if w == Writer::Waiting {
                assert_eq!(
                    (next, then),
                    (Writer::Direct, OnPublish::WriteDirect("sink"))
                );
            } else {
                assert!(matches!(then, OnPublish::Queue { .. }), "{w:?}: {then:?}");
                assert_eq!(next, w, "{w:?}: a queued update changes no writer");
            }
        }
    }

    /// The race the task's own writes have with publishes: while it writes (or is about to
    /// finish a direct write), a publish queues behind it and wakes it, so the task finds the update
    /// when it polls again, after what it is writing.
    #[test]
    fn a_publish_while_the_task_writes_is_queued_for_it() {
        for w in [Writer::Task, Writer::Carry] {
            let (next, then) = w.publish(Some(()), true, || Some(9));
            assert_eq!((next, then), (w, OnPublish::Queue { wake: true }));
        }
        let (w, then) = Writer::Carry.poll();
        assert_eq!(
            (w, then),
            (Writer::Task, OnPoll::FinishDirect),
            "the rest of the direct write first"
        );
        let (w, then) = w.poll();
        assert_eq!((w, then), (Writer::Task, OnPoll::Look), "then the queue");
    }

    /// While a direct write is in flight nobody else writes: a publish queues without waking
    /// the task (the writer wakes it when done), the flusher's entry does nothing, and a task
    /// woken meanwhile (a heartbeat, a close) waits for it.
    #[test]
    fn a_direct_write_excludes_the_task_and_the_flusher() {
        let w = Writer::Direct;
        assert_eq!(
            w.publish(Some(()), true, || Some(1)),
            (w, OnPublish::Queue { wake: false })
        );
        assert_eq!(
            w.publish(None::<()>, false, no_hold).1,
            OnPublish::Queue { wake: false }
        );
        assert_eq!(w.flush(u64::MAX / 2, Some(())), (w, OnFlush::Done));
        assert_eq!(w.poll(), (w, OnPoll::WaitForDirect));
        assert_eq!(w.done(false), Writer::Waiting);
        assert_eq!(
            w.done(true),
            Writer::Carry,
            "the rest is the task's to write"
        );
        assert_eq!(
            Writer::Carry.publish(Some(()), true, no_hold).1,
            OnPublish::Queue { wake: true },
            "no direct write until its rest is out"
        );
    }

    /// A direct write racing the flusher: whichever claims the stream first under its lock
    /// writes, and the other does not. A publisher finding the stream held by the flusher
    /// queues; the flusher finding a direct write in flight leaves it.
    #[test]
    fn a_direct_write_and_the_flusher_never_both_write() {
        let held = Writer::FlusherHolds { at: 10 * TICK_NS };
        assert_eq!(
            held.publish(Some(()), true, no_hold),
            (held, OnPublish::Queue { wake: false })
        );
        let (w, then) = held.flush(10 * TICK_NS, Some(()));
        assert_eq!((w, then), (Writer::Direct, OnFlush::Write(())));
        assert_eq!(
            w.publish(Some(()), true, no_hold).1,
            OnPublish::Queue { wake: false },
            "claimed by the flusher: the publisher queues"
        );
        let (w, _) = Writer::Waiting.publish(Some(()), true, no_hold);
        assert_eq!(
            w.flush(10 * TICK_NS, Some(())),
            (Writer::Direct, OnFlush::Done)
        );
    }

    /// Holding: a waiting stream whose window is still open is held for the flusher (unless its
    /// queue is half full); a held stream is not woken until its queue is half full.
    #[test]
    fn a_stream_inside_its_window_is_held_until_it_opens_or_the_queue_fills() {
        let (w, then) = Writer::Waiting.publish(None::<()>, true, || Some(7));
        assert_eq!(
            (w, then),
            (Writer::FlusherHolds { at: 7 }, OnPublish::Hold(7))
        );
        assert_eq!(
            Writer::Waiting.publish(None::<()>, false, || Some(7)),
            (Writer::Waiting, OnPublish::Queue { wake: true }),
            "half full: written at once"
        );
        assert_eq!(
            Writer::Waiting.publish(None::<()>, true, no_hold),
            (Writer::Waiting, OnPublish::Queue { wake: true }),
            "no window: written at once"
        );
        for held in [Writer::TaskHolds, w] {
            let asked = std::cell::Cell::new(false);
            let hold = || {
                asked.set(true);
                Some(99)
            };
            assert_eq!(
                held.publish(None::<()>, true, hold),
                (held, OnPublish::Queue { wake: false })
            );
            assert_eq!(
                held.publish(None::<()>, false, no_hold),
                (held, OnPublish::Queue { wake: true })
            );
            assert!(!asked.get(), "a held stream keeps its time");
        }
        assert_eq!(Writer::Task.hold(), Writer::TaskHolds);
        assert_eq!(Writer::Task.wait(), Writer::Waiting);
    }

    /// The deadline passing while held: the flusher's entry writes once the window is open (to
    /// within a tick), files itself again if it came too early, and wakes the task instead when
    /// it cannot write. If the task took over first (its queue filled, the stream closed), the
    /// entry does nothing.
    #[test]
    fn a_held_stream_is_written_when_its_deadline_passes() {
        let at = 10 * TICK_NS;
        let held = Writer::FlusherHolds { at };
        assert_eq!(
            held.flush(at - 2 * TICK_NS, Some(())),
            (held, OnFlush::Later(at))
        );
        assert_eq!(
            held.flush(at - TICK_NS, Some(())),
            (Writer::Direct, OnFlush::Write(()))
        );
        assert_eq!(
            held.flush(at + 5 * TICK_NS, Some(())),
            (Writer::Direct, OnFlush::Write(()))
        );
        assert_eq!(held.flush(at, None::<()>), (Writer::Waiting, OnFlush::Wake));
        let (w, then) = held.poll();
        assert_eq!(
            (w, then),
            (Writer::Task, OnPoll::Look),
            "the task takes over"
        );
        assert_eq!(w.flush(at, Some(())), (Writer::Task, OnFlush::Done));
        assert_eq!(
            Writer::TaskHolds.flush(at, Some(())).1,
            OnFlush::Done,
            "its own timer"
        );
    }

    /// Close during each state: closing wakes the task, whose next poll looks at the queue (and
    /// so finds the stream ended), except while a direct write is in flight, whose end makes the
    /// stream the task's again and wakes it. A flusher's entry for a closing stream writes nothing.
    #[test]
    fn a_closed_stream_always_comes_back_to_its_task() {
        for w in ALL {
            let w = if w == Writer::Direct {
                let (w, then) = w.poll();
                assert_eq!(then, OnPoll::WaitForDirect);
                w.done(false)
            } else {
                w
            };
            let (w, then) = w.flush(u64::MAX / 2, None::<()>);
            assert_ne!(then, OnFlush::Write(()));
            let (w, then) = w.poll();
            assert_eq!(w, Writer::Task);
            assert_ne!(
                then,
                OnPoll::WaitForDirect,
                "nothing else writes to a closed stream"
            );
        }
    }
}
