//! The one thread that writes a durable hub's history: store first, then fan out.
//!
//! Publishes queue here with their checked, encoded update; the thread takes everything that
//! queued while it was busy, gives each its seq (in queue order), writes them all in one
//! transaction, and only once that is on disk hands them to the hub in seq order (history,
//! fan-out) and answers each publisher. So a subscriber never sees an update a crash could
//! lose, the store's order is the hub's, and one fsync covers a whole batch (group commit).
//! Subscription events take the same road for their place in the order, but are not written:
//! they describe connections that do not outlive the process.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::oneshot;

use super::store::{Store, WriteError};
use super::{templates, HubShared, Placed, Published, SharedUpdate, Update};

/// The most publishes one transaction takes: bounds how long the first of them waits.
const MAX_BATCH: usize = 1024;

/// The most bytes of publishes (encoded update and topics) that may wait for the writer; past
/// it, publishes are refused with 503 until the disk catches up. Commits of up to
/// [`MAX_BATCH`] publishes of a few KiB take this many times over to fill it.
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;

/// What the writer thread is asked. Not boxed: every publish is a `Publish`, and a `Close`
/// comes once per process, so the size difference costs nothing a box would not cost more.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    /// A publish to store, then fan out and answer.
    Publish(Job),
    /// Shutdown: finish what was asked before, close the store (so that the next start opens a
    /// cleanly closed file) and say so; publishes sent after it are refused.
    Close(oneshot::Sender<()>),
}

/// A checked, encoded update waiting for its place.
pub(crate) struct Job {
    pub id: String,
    pub topics: Vec<String>,
    pub private: bool,
    pub time_ms: u64,
    pub encoded: bytes::Bytes,
    pub alt: Option<Box<bytes::Bytes>>,
    pub alt_is_legacy: bool,
    pub matches: templates::Matches,
    /// Written to the store (every update but subscription events).
    pub durable: bool,
    /// What it counts in the hub's queued bytes, given back once it is answered.
    pub weight: usize,
    pub started: Instant,
    pub reply: Option<oneshot::Sender<Result<Published, WriteError>>>,
}

/// Starts the writer thread for `hub`, the first seq being `next_seq`.
pub(crate) fn start(hub: Weak<HubShared>, store: Store, next_seq: u64) -> Sender<Msg> {
    let (tx, rx) = std::sync::mpsc::channel();
    // The fan-out starts the flusher's tasks on the runtime the hub was made on.
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::Builder::new()
        .name("ssehub-store".into())
        .spawn(move || {
            let _entered = runtime.as_ref().map(|r| r.enter());
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(hub, rx, store, next_seq)
            }));
            if ran.is_err() {
                // Every publish from now on would be refused while the hub looked healthy:
                // exit, so that a supervisor restarts it (what was answered 200 is on disk).
                tracing::error!("the history store's writer stopped on a panic; exiting");
                std::process::exit(70);
            }
        })
        .expect("start the store's writer thread");
    tx
}

fn run(hub: Weak<HubShared>, rx: Receiver<Msg>, mut store: Store, mut next_seq: u64) {
    let mut batch = Vec::new();
    let mut close = None;
    while close.is_none() {
        match rx.recv() {
            Ok(Msg::Publish(job)) => batch.push(job),
            Ok(Msg::Close(done)) => close = Some(done),
            Err(_) => return,
        }
        while batch.len() < MAX_BATCH && close.is_none() {
            match rx.try_recv() {
                Ok(Msg::Publish(job)) => batch.push(job),
                Ok(Msg::Close(done)) => close = Some(done),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let Some(hub) = hub.upgrade() else { return };
        let weight: usize = batch.iter().map(|job| job.weight).sum();
        let start = next_seq;
        let updates: Vec<SharedUpdate> = batch
            .iter()
            .map(|job| {
                let u = place(job, next_seq);
                next_seq += 1;
                u
            })
            .collect();
        let durable: Vec<SharedUpdate> = batch
            .iter()
            .zip(&updates)
            .filter(|(job, _)| job.durable)
            .map(|(_, u)| u.clone())
            .collect();
        let result = if durable.is_empty() {
            Ok(())
        } else {
            let began = Instant::now();
            let r = store.commit(&durable);
            hub.metrics
                .observe_commit(durable.len(), began.elapsed(), store.file_bytes());
            r
        };
        // Given back before the publishers are answered: one that publishes again at once
        // finds the room its first publish took.
        hub.queued_bytes
            .fetch_sub(weight, std::sync::atomic::Ordering::Relaxed);
        // Direct writes run on this thread, one after another, while the next batch waits. A
        // lone publish writes to as many idle streams as a publish of a memory-only hub, and
        // its publisher is answered before those writes; a batch of several (the writer is
        // behind) leaves every write to the streams' own tasks, which write on every core.
        // Updates queued behind a claimed stream's write wait for it, so a batch that claimed
        // streams for its first update and queued the rest could fill their queues.
        // Measured at S3's 10,000 publishes a second over 100 subscribers (16 closed-loop
        // publishers): each answer took ~1.2 ms with the commit at 0.23 ms, as ~40,000 direct
        // writes a second ran on this thread before the next commit; see docs/BENCHMARKS.md.
        let direct_max = if batch.len() == 1 {
            super::DIRECT_MAX
        } else {
            0
        };
        // Each publisher is answered once its update has its place (and its queued streams
        // are woken): the direct writes and removals of the batch come after every answer.
        let mut placed = Vec::with_capacity(batch.len());
        match result {
            Ok(()) => {
                for (job, update) in batch.drain(..).zip(updates) {
                    placed.push(finish(&hub, job, update, direct_max));
                }
            }
            Err(e) => {
                tracing::warn!(
                    updates = durable.len(),
                    "the history store could not write; those publishes were refused: {e}"
                );
                // Nothing of the batch is on disk: its updates are refused, and the
                // subscription events in it take the seqs from the first.
                next_seq = start;
                for mut job in batch.drain(..) {
                    if job.durable {
                        if let Some(reply) = job.reply.take() {
                            let _ = reply.send(Err(e.clone()));
                        }
                    } else {
                        let update = place(&job, next_seq);
                        next_seq += 1;
                        placed.push(finish(&hub, job, update, direct_max));
                    }
                }
            }
        }
        for p in placed {
            hub.hand_over(p);
        }
    }
    // Closed: the store is dropped (redb marks the file cleanly closed) before the hub hears
    // of it; publishes still queued behind the request are refused as their senders drop.
    drop(store);
    // Publishes queued behind the close are refused (their replies dropped) and give their
    // room back; later ones find the channel closed.
    let refused: usize = rx
        .try_iter()
        .map(|m| match m {
            Msg::Publish(job) => job.weight,
            Msg::Close(_) => 0,
        })
        .sum();
    drop(rx);
    if let Some(hub) = hub.upgrade() {
        hub.queued_bytes
            .fetch_sub(refused, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::info!("the history store is closed");
    if let Some(done) = close {
        let _ = done.send(());
    }
}

fn place(job: &Job, seq: u64) -> SharedUpdate {
    Arc::new(Update {
        seq,
        id: job.id.clone(),
        topics: job.topics.clone(),
        private: job.private,
        time_ms: job.time_ms,
        encoded: job.encoded.clone(),
        alt: job.alt.clone(),
        alt_is_legacy: job.alt_is_legacy,
    })
}

/// Gives a stored update its place in the hub and answers its publisher; what is left of its
/// fan-out is returned.
fn finish(hub: &HubShared, mut job: Job, update: SharedUpdate, direct_max: usize) -> Placed {
    let (published, placed) = hub.place_stored(update, &job.matches, direct_max);
    if job.durable {
        hub.metrics.observe_publish(job.started.elapsed());
    }
    if let Some(reply) = job.reply.take() {
        let _ = reply.send(Ok(published));
    }
    placed
}
