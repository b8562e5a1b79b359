//! How the server stops. Event streams never end by themselves, so stopping is an order of
//! steps, and this is the one place that knows it: [`Shutdown`] holds the stop signal, every
//! task that must be waited for, and the drain deadline, and [`Shutdown::drain`] stops them in
//! order.
//!
//! Two other ways a connection ends are not shutdown and are not here: the hub's per-connection
//! `kill` token (`http::Connection::kill`), with which it tears down one connection whose
//! subscriber it dropped as slow, and the connection budget closing idle connections to make
//! room (`budget::Permit::evicted`).

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

use crate::hub::Hub;

/// How long open connections get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(4);
/// How long the durable history gets to finish the writes queued when the drain ends (a commit
/// takes milliseconds; a disk that hangs must not hold the process for ever).
const STORE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The stop signal and everything shutdown waits for. Cheap to clone: every clone shares the
/// same signal and trackers.
#[derive(Clone)]
pub struct Shutdown {
    /// Cancelled by the caller of `crate::run` (SIGTERM or SIGINT for the binary).
    stop: CancellationToken,
    /// Background tasks: reloads, the clocks, the hub's timers, a cluster node's sharing.
    tasks: TaskTracker,
    /// Every connection's task, from its accept to its end or hand-over to a stream's task.
    connections: TaskTracker,
    /// The tasks that write event streams served by `h1` (they outlive their connection's
    /// task, which spawns them and ends).
    streams: TaskTracker,
}

impl Shutdown {
    /// A shutdown that starts when `stop` is cancelled.
    pub fn new(stop: CancellationToken) -> Shutdown {
        Shutdown {
            stop,
            tasks: TaskTracker::new(),
            connections: TaskTracker::new(),
            streams: TaskTracker::new(),
        }
    }

    /// The stop signal itself, for those that take a token (the cluster, the HTTP handlers).
    pub fn token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Whether shutdown has started.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once shutdown has started.
    pub fn stopped(&self) -> WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Runs a background task that ends when [`Shutdown::stopped`] resolves; the process waits
    /// for it after the connections (a cluster node leaving says so before it exits).
    pub fn spawn_task<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// Runs a connection's task, given the drain deadline once shutdown starts.
    pub(super) fn spawn_connection<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(task);
    }

    /// Runs an event stream's task, given the drain deadline once shutdown starts.
    pub(super) fn spawn_stream<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.streams.spawn(task);
    }

    /// Stops the server, once the stop signal has ended the accept loop. The order:
    ///
    /// 1. (already done by the signal) connections still waiting for a first request head or
    ///    a TLS handshake are dropped, hyper's connections begin their graceful close, an
    ///    HTTP/1.1 publish connection closes after the answer under way, background tasks
    ///    end;
    /// 2. the listening socket is closed, so new clients are refused rather than queued;
    /// 3. the hub ends every event stream (each gets its closing chunk) and takes no new one;
    /// 4. connections and streams get `DRAIN_TIMEOUT` to finish, and are then abandoned;
    /// 5. the durable history finishes the writes queued and closes its file;
    /// 6. the background tasks are waited for.
    pub async fn drain(self, listener: TcpListener, hub: &Hub) {
        tracing::info!("shutting down: ending every stream");
        drop(listener);
        hub.shutdown();
        self.tasks.close();
        self.connections.close();
        self.streams.close();
        let drained = async {
            self.connections.wait().await;
            self.streams.wait().await;
        };
        if tokio::time::timeout(DRAIN_TIMEOUT, drained).await.is_err() {
            tracing::warn!("some connections did not finish in time; closing them");
        }
        hub.close_store(STORE_CLOSE_TIMEOUT).await;
        self.tasks.wait().await;
        tracing::info!("stopped");
    }
}
