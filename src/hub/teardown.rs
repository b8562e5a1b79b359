//! How the hub ends a stream that cannot end by itself: its client stopped reading, so neither
//! the end of the response nor anything else the hub writes gets through. The hub only calls
//! [`Teardown::now`] or [`Teardown::after_last_writes`]; what that does to the wire is the
//! server's (`crate::server`): an HTTP/1.1 connection is closed, an HTTP/2 stream is reset
//! alone (the connection carries other streams).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

use super::LAST_WRITES;

/// What tears one subscriber's stream down, by the way it is served.
#[derive(Clone, Debug)]
pub enum Teardown {
    /// An HTTP/1.1 stream written by the server's own writer (`server::h1`): cancelling closes
    /// its connection. The writer ends the stream on time itself once the hub has ended it,
    /// so only a slow subscriber's drop needs this.
    OwnWriter(CancellationToken),
    /// An HTTP/1.1 stream hyper writes (a subscription with a request body, or after another
    /// request on its connection): cancelling closes its connection. hyper polls the body only
    /// while the socket takes more, so a stream the hub has ended needs this too.
    Connection(CancellationToken),
    /// An HTTP/2 stream: cancelling drops its task, and h2 resets the stream (RST_STREAM
    /// CANCEL) without touching the connection's other streams. hyper polls the body only
    /// while the client's flow-control window has room.
    Stream(Arc<StreamCancel>),
}

impl Teardown {
    /// Tears the stream down at once (a subscriber too slow to keep).
    pub fn now(&self) {
        match self {
            Teardown::OwnWriter(t) | Teardown::Connection(t) => t.cancel(),
            Teardown::Stream(s) => s.cancel(),
        }
    }

    /// For a stream the hub has just ended: tears it down [`LAST_WRITES`] from now if it is
    /// still being served then (`stream` still alive), the time the hub's own writer gives its
    /// last writes too. Nothing for the hub's own writer, which has that deadline itself.
    pub fn after_last_writes<T: Send + Sync + 'static>(&self, stream: Weak<T>) {
        if matches!(self, Teardown::OwnWriter(_)) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let this = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(LAST_WRITES).await;
            // Gone once its stream is: nothing to tear down, and an HTTP/1.1 connection may
            // be serving another request by now.
            if stream.upgrade().is_some() {
                this.now();
            }
        });
    }
}

/// Cancels one HTTP/2 stream: the task that serves it (`server::stream_tasks`) checks it at
/// each poll and is woken by [`StreamCancel::cancel`].
#[derive(Debug, Default)]
pub struct StreamCancel {
    cancelled: AtomicBool,
    waker: AtomicWaker,
}

impl StreamCancel {
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Has the stream been cancelled? If not, `cx`'s task is woken when it is.
    pub fn poll_cancelled(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.cancelled.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A cancel between the load and the registration found no waker to wake.
        if self.cancelled.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
