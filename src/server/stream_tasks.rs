//! The executor hyper runs each HTTP/2 stream's task on: tokio's, with each task able to be
//! cancelled by the hub ([`crate::hub::StreamCancel`]).
//!
//! hyper polls an HTTP/2 response's body only while the client's flow-control window has
//! room, so a client that answers PINGs but grants no window keeps a stream, and the
//! subscriber behind it, for as long as it likes: the end the hub gives the stream (its
//! lifetime, its token's `exp`, a subscriber too slow to keep) never gets through. Dropping the
//! stream's task is the one way to end it from outside: h2 then resets the stream
//! (RST_STREAM CANCEL) and the connection's other streams go on. hyper gives no handle on the
//! task, so the handle is made inside it: while the wrapper polls its task it lends it to the
//! thread ([`current_stream_cancel`]), and the subscribe handler, which runs in that poll,
//! takes it for its subscriber.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::hub::StreamCancel;

/// Spawns hyper's HTTP/2 stream tasks on tokio, each able to be cancelled.
#[derive(Clone, Copy, Default)]
pub(super) struct StreamTasks;

impl<F> hyper::rt::Executor<F> for StreamTasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        tokio::spawn(Cancellable { task, cancel: None });
    }
}

pin_project_lite::pin_project! {
    /// A stream's task and, once its handler asked for one, its cancel handle (kept off the
    /// heap until then: most tasks, every request but a subscription, never need one).
    struct Cancellable<F> {
        #[pin]
        task: F,
        cancel: Option<Arc<StreamCancel>>,
    }
}

thread_local! {
    /// While a [`Cancellable`] polls its task: that task's handle (`Some(None)`: none made yet).
    static POLLING: RefCell<Option<Option<Arc<StreamCancel>>>> = const { RefCell::new(None) };
}

/// Puts back what the thread lent before a poll, even if the poll panics (tokio catches a
/// task's panic and the thread goes on running other tasks).
struct Lent(Option<Option<Arc<StreamCancel>>>);

impl Drop for Lent {
    fn drop(&mut self) {
        let before = self.0.take();
        POLLING.with_borrow_mut(|p| *p = before);
    }
}

impl<F: Future<Output = ()>> Future for Cancellable<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Some(c) = this.cancel {
            // Its handler has the handle: from here on (each of an event stream's writes) only
            // the cancel is watched, and nothing is lent.
            if c.poll_cancelled(cx).is_ready() {
                // Dropping the task drops hyper's handle on the stream: h2 resets it.
                return Poll::Ready(());
            }
            return this.task.poll(cx);
        }
        let restore = Lent(POLLING.with_borrow_mut(|p| p.replace(None)));
        let polled = this.task.poll(cx);
        *this.cancel = POLLING.with_borrow_mut(|p| p.take()).flatten();
        drop(restore);
        if polled.is_pending() {
            if let Some(c) = this.cancel {
                // Made during this poll: watch it from now on.
                if c.poll_cancelled(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
        }
        polled
    }
}

/// The cancel handle of the HTTP/2 stream whose task is being polled on this thread, made on
/// first use (by the subscribe handler); `None` outside such a poll, and in the task's polls
/// after the one that made it.
pub fn current_stream_cancel() -> Option<Arc<StreamCancel>> {
    POLLING.with_borrow_mut(|p| {
        p.as_mut()
            .map(|slot| slot.get_or_insert_with(Default::default).clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A task that takes its handle in its first poll, then waits forever, noting whether it
    /// was dropped.
    struct Waits {
        handle: Arc<parking_lot::Mutex<Option<Arc<StreamCancel>>>>,
        dropped: Arc<AtomicBool>,
    }

    impl Future for Waits {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            let mut h = self.handle.lock();
            if h.is_none() {
                *h = current_stream_cancel();
            }
            Poll::Pending
        }
    }

    impl Drop for Waits {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_cancelled_stream_task_is_dropped_and_others_are_not() {
        assert!(
            current_stream_cancel().is_none(),
            "no handle outside a stream's task"
        );
        let tasks: Vec<_> = (0..2)
            .map(|_| Waits {
                handle: Default::default(),
                dropped: Default::default(),
            })
            .map(|w| (w.handle.clone(), w.dropped.clone(), w))
            .collect();
        let mut watched = Vec::new();
        for (handle, dropped, task) in tasks {
            hyper::rt::Executor::execute(&StreamTasks, task);
            watched.push((handle, dropped));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let handles: Vec<_> = watched
            .iter()
            .map(|(h, _)| h.lock().clone().expect("each task got its own handle"))
            .collect();
        assert!(!Arc::ptr_eq(&handles[0], &handles[1]));
        assert!(
            current_stream_cancel().is_none(),
            "the handle is not left on the thread"
        );
        handles[0].cancel();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            watched[0].1.load(Ordering::SeqCst),
            "the cancelled task was dropped"
        );
        assert!(
            !watched[1].1.load(Ordering::SeqCst),
            "the other task runs on"
        );
    }
    /// A task that takes its handle and is cancelled in that same poll (as a
    /// subscriber dropped as slow while its handler runs) is dropped without being woken again.
    struct CancelsItself(Arc<AtomicBool>);

    impl Future for CancelsItself {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            current_stream_cancel().unwrap().cancel();
            Poll::Pending
        }
    }

    impl Drop for CancelsItself {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Panics mid-poll leave no handle lent on the thread.
    struct Panics;

    impl Future for Panics {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            let _ = current_stream_cancel().unwrap();
            panic!("mid-poll");
        }
    }

    #[tokio::test]
    async fn cancelled_in_its_first_poll_and_panics_leave_nothing_behind() {
        let dropped = Arc::new(AtomicBool::new(false));
        hyper::rt::Executor::execute(&StreamTasks, CancelsItself(dropped.clone()));
        hyper::rt::Executor::execute(&StreamTasks, Panics);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "cancelled in its first poll: dropped"
        );
        assert!(
            current_stream_cancel().is_none(),
            "nothing left lent after a panic"
        );
        // The thread goes on lending correctly to the next task.
        let got = Arc::new(parking_lot::Mutex::new(None));
        let w = Waits {
            handle: got.clone(),
            dropped: Default::default(),
        };
        hyper::rt::Executor::execute(&StreamTasks, w);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(got.lock().is_some());
        assert!(current_stream_cancel().is_none());
    }
}
