//! The embedded durable history: a restart of a single-node hub forgets nothing.
//!
//! Two files in the data directory. `history.log` (see [`log`]) takes each batch of publishes
//! from the hub's writer thread (`hub::writer`) as one appended frame and one `fdatasync`: when
//! [`Store::commit`] returns, the batch is on disk, and one fsync covers every publish that
//! arrived together. `history.redb` is the history itself, one redb table from the hub's seq to
//! one update, kept within the same bounds as the in-memory history (the newest updates, by
//! count and bytes): every megabyte or so of log, one durable redb transaction (a checkpoint)
//! writes the logged batches, trims what they pushed out, and the log starts again. A start
//! replays what the log holds past the last checkpoint. redb's own file lock keeps a second hub
//! off the same directory.
//!
//! A record holds what replay needs and nothing else: the update's metadata and its
//! event-stream bytes exactly as subscribers received them (so a replay after a restart is
//! byte-for-byte the same, and nothing is encoded twice). Layout, little-endian:
//! `version u8 (1) | time_ms u64 | flags u8 (bit 0: private) | id_len u32 | id |
//! topic_count u32 | (topic_len u32 | topic)* | encoded…`.

mod log;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use redb::{
    Database, DatabaseError, ReadableDatabase, ReadableTable, StorageError, TableDefinition,
};

use crate::hub::{SharedUpdate, Update};

/// seq → record. redb orders `u64` keys numerically, as big-endian bytes would sort.
const UPDATES: TableDefinition<u64, &[u8]> = TableDefinition::new("updates");
/// The store's own state: the nonce of the log's current lap (absent in a store written
/// before the log existed, whose history loads as it is).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LOG_NONCE: &str = "log_nonce";
/// The seq after redb's newest update as of the last checkpoint. A version of ssehub without
/// the log ignores `meta`: if redb's newest update is not this one at a start, such a version
/// wrote redb since (a downgrade and an upgrade after a crash), and the log's frames are stale.
const LOG_NEXT_SEQ: &str = "log_next_seq";
/// Log bytes after which a commit checkpoints into redb. Larger means fewer, longer
/// checkpoints (one durable redb transaction each) and more to replay after a crash.
const CHECKPOINT_BYTES: u64 = 1 << 20;
/// Past this much log (checkpoints failing, e.g. redb's file cannot grow), commits are refused
/// rather than let the log and the batches waiting for redb grow without end.
const MAX_LOG_BYTES: u64 = 64 << 20;
/// The wait after a first failed checkpoint, doubled at each further failure up to the second.
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// The file inside the data directory.
pub const FILE: &str = "history.redb";
const VERSION: u8 = 1;

/// How much the store keeps: the in-memory history's bounds (the newest update is always
/// kept, even when the bounds allow none, so that the clock can carry on its numbering).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub updates: usize,
    pub bytes: usize,
}

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("another ssehub is using {0} (its history file is locked); stop it or choose another --data-dir")]
    Locked(PathBuf),
    #[error("cannot use the data directory {0}: {1}; fix its permissions or choose another --data-dir (or --data-dir none for a history in memory only)")]
    Unusable(PathBuf, String),
    #[error("the history store {0} is damaged or not an ssehub store ({1}); start with --data-dir-recover to move the directory aside and start with an empty history, or restore it from a backup")]
    Damaged(PathBuf, String),
}

/// Why a commit failed: the publishes of its batch are refused, and nothing of them is kept.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct WriteError(pub String);

/// The open store, owned by the hub's writer thread.
pub struct Store {
    path: PathBuf,
    /// `None` after a failed checkpoint: reopened (and its bookkeeping read again) before the
    /// next commit.
    db: Option<Database>,
    log: log::Log,
    /// The batches in the log and not yet in redb, in commit order.
    pending: Vec<Vec<SharedUpdate>>,
    bounds: Bounds,
    /// (seq, weight) of every update in redb, oldest first: what decides the trimming.
    retained: VecDeque<(u64, usize)>,
    bytes: usize,
    /// Both files' sizes, as of the last checkpoint and append (no `stat` per commit).
    redb_bytes: u64,
    log_bytes: u64,
    /// [`CHECKPOINT_BYTES`], smaller in tests so that they checkpoint between commits.
    checkpoint_bytes: u64,
    /// After a failed checkpoint: when the next is tried, and the wait before it.
    retry: Option<(std::time::Instant, std::time::Duration)>,
    /// Test-only fault: the next checkpoint reports an error after redb's commit landed (as
    /// when the commit's last fsync fails after its header reached the disk).
    #[cfg(test)]
    fail_after_checkpoint: bool,
}

impl Store {
    /// Opens (creating it if need be) the store in `dir`, keeps only the newest updates
    /// within `bounds` and returns them, oldest first.
    pub fn open(dir: &Path, bounds: Bounds) -> Result<(Store, Vec<Update>), OpenError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| OpenError::Unusable(dir.to_owned(), e.to_string()))?;
        let path = dir.join(FILE);
        let bounds = Bounds {
            updates: bounds.updates.max(1),
            bytes: bounds.bytes,
        };
        // redb checks a file that was not closed cleanly (the last run crashed or was killed)
        // before it opens it: said once, since on a large file that takes a moment.
        let said = std::cell::Cell::new(false);
        let db = Database::builder()
            .set_repair_callback(move |_| {
                if !said.replace(true) {
                    tracing::warn!(
                        "the history store was not closed cleanly (the last run crashed or was \
                         killed): checking it before starting"
                    );
                }
            })
            .create(&path)
            .map_err(|e| open_error(dir, &path, e))?;
        let damaged = |e: String| OpenError::Damaged(path.clone(), e);
        let nonce = current_lap(&db).map_err(|e| damaged(e.0))?;
        let (log, batches) = log::Log::open(dir, nonce).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                OpenError::Damaged(dir.join(log::FILE), e.to_string())
            }
            _ => OpenError::Unusable(dir.join(log::FILE), e.to_string()),
        })?;
        check_seqs(&batches).map_err(|e| OpenError::Damaged(dir.join(log::FILE), e))?;
        let mut pending = Vec::with_capacity(batches.len());
        for batch in batches {
            let updates = batch
                .into_iter()
                .map(|(seq, record)| decode(seq, &record).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| OpenError::Damaged(dir.join(log::FILE), e))?;
            pending.push(updates);
        }
        let replayed = !pending.is_empty();
        let mut store = Store {
            path: path.clone(),
            db: Some(db),
            log,
            pending,
            bounds,
            retained: VecDeque::new(),
            bytes: 0,
            redb_bytes: 0,
            log_bytes: 0,
            checkpoint_bytes: CHECKPOINT_BYTES,
            retry: None,
            #[cfg(test)]
            fail_after_checkpoint: false,
        };
        let mut kept = store.load().map_err(|e| damaged(e.0))?;
        // The first logged batch carries on from redb's newest update (or replaces some of
        // the newest, after a commit refused that redb took anyway); a gap is not a log this
        // store wrote.
        let first = store.pending.first().map(|b| b[0].seq);
        if let (Some(first), Some(&(newest, _))) = (first, store.retained.back()) {
            if first > newest.saturating_add(1) {
                return Err(OpenError::Damaged(
                    dir.join(log::FILE),
                    format!(
                        "the log's first update is {first} but the store's newest is {newest}: \
                         the updates between are missing"
                    ),
                ));
            }
        }
        // What the log holds past the last checkpoint goes into redb now, and the log starts a
        // new lap: a start always leaves everything in redb.
        store.checkpoint().map_err(|e| {
            OpenError::Unusable(path.clone(), format!("cannot write the history store: {e}"))
        })?;
        if replayed {
            kept = store.load().map_err(|e| damaged(e.0))?;
        }
        store.log_bytes = store.log.file_bytes();
        Ok((store, kept))
    }

    /// Reads the newest updates within the bounds, deletes the older ones (the bounds may
    /// have shrunk since the last run), and rebuilds the bookkeeping.
    fn load(&mut self) -> Result<Vec<Update>, WriteError> {
        let db = self.db.as_ref().expect("open");
        let txn = db.begin_write().map_err(err)?;
        let mut kept = Vec::new();
        let mut bytes = 0;
        {
            let mut table = txn.open_table(UPDATES).map_err(err)?;
            for entry in table.iter().map_err(err)?.rev() {
                let (k, v) = entry.map_err(err)?;
                let update = decode(k.value(), v.value())
                    .map_err(|e| WriteError(format!("record {}: {e}", k.value())))?;
                let w = update.weight();
                if kept.len() >= self.bounds.updates
                    || (bytes + w > self.bounds.bytes && !kept.is_empty())
                {
                    break;
                }
                bytes += w;
                kept.push(update);
            }
            kept.reverse();
            if let Some(oldest) = kept.first() {
                table.retain_in(..oldest.seq, |_, _| false).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        self.retained = kept.iter().map(|u| (u.seq, u.weight())).collect();
        self.bytes = bytes;
        self.redb_bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        Ok(kept)
    }

    /// The seq after the newest stored update.
    pub fn next_seq(&self) -> u64 {
        match self.pending.last().and_then(|b| b.last()) {
            Some(u) => u.seq.saturating_add(1),
            None => self.retained.back().map_or(0, |(s, _)| s.saturating_add(1)),
        }
    }

    /// The store's files' size on disk.
    pub fn file_bytes(&self) -> u64 {
        self.redb_bytes + self.log_bytes
    }

    /// Writes `updates` (in seq order; from their first seq on they replace what was stored)
    /// and drops what they push out of the bounds: when this returns `Ok`, they are on disk.
    /// On an error nothing of them is kept.
    pub fn commit(&mut self, updates: &[SharedUpdate]) -> Result<(), WriteError> {
        if updates.is_empty() {
            // An empty frame would read back as damage.
            return Ok(());
        }
        if self.db.is_none() {
            let db = Database::create(&self.path)
                .map_err(|e| WriteError(format!("cannot reopen the history store: {e}")))?;
            self.db = Some(db);
            if let Err(e) = self.reopened() {
                self.db = None;
                return Err(e);
            }
            tracing::info!("the history store is writable again");
        }
        if self.log.len() >= MAX_LOG_BYTES || self.log.stale() {
            self.checkpoint()?;
        }
        if let Err(e) = self.log.append(updates) {
            if self.log.stale() {
                // The refused frame may be read back at the next start: a checkpoint now names
                // a new lap, so that it never is (and the next commit tries again if not).
                if let Err(c) = self.checkpoint() {
                    tracing::warn!(
                        "the history store could not end the log's lap after a refused \
                         commit ({c}): it tries again before the next"
                    );
                }
            }
            return Err(WriteError(e.to_string()));
        }
        self.log_bytes = self.log_bytes.max(self.log.len());
        self.pending.push(updates.to_vec());
        let due = self
            .retry
            .is_none_or(|(at, _)| std::time::Instant::now() >= at);
        if self.log.len() >= self.checkpoint_bytes && due {
            // The batch is on disk in the log whatever happens here: a failed checkpoint is
            // tried again from a reopened redb, after a wait that doubles while they keep
            // failing (each try is a durable redb transaction of everything logged, on the
            // thread that also fans out), until the log's bound forces one.
            if let Err(e) = self.checkpoint() {
                let wait = self
                    .retry
                    .map_or(RETRY_FIRST, |(_, w)| (w * 2).min(RETRY_MAX));
                self.retry = Some((std::time::Instant::now() + wait, wait));
                tracing::warn!(
                    "the history store could not checkpoint its log into redb ({e}): trying \
                     again in {} ms",
                    wait.as_millis()
                );
            }
        }
        Ok(())
    }

    /// Reads redb's bookkeeping again after a failed checkpoint. A checkpoint reported as
    /// failed may still have landed (its commit's last fsync failed after the header reached
    /// the disk): then redb holds the logged batches and names a new lap, and the log must
    /// carry on under that lap, or the next start would skip every frame written from now on.
    fn reopened(&mut self) -> Result<(), WriteError> {
        self.load()?;
        let nonce = read_nonce(self.db.as_ref().expect("open"))?;
        if let Some(nonce) = nonce.filter(|&n| n != self.log.nonce()) {
            tracing::info!("the failed checkpoint of the history log had reached redb");
            self.pending.clear();
            self.log.restart(nonce);
        }
        Ok(())
    }

    /// Writes the logged batches into redb in one durable transaction, with the nonce of the
    /// log's next lap, and starts that lap. On an error redb is reopened before the next
    /// commit, and the batches stay in the log (and in memory) for the next checkpoint.
    fn checkpoint(&mut self) -> Result<(), WriteError> {
        let result = self.write_pending();
        if result.is_err() {
            // redb refuses every transaction after an I/O error: start again from the file.
            self.db = None;
        }
        result
    }

    fn write_pending(&mut self) -> Result<(), WriteError> {
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| WriteError("the history store is not open".into()))?;
        // A v4 UUID's fixed version and variant bits sit at different places in its two
        // halves, so their XOR has 64 random bits.
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        let nonce = high ^ low;
        let began = std::time::Instant::now();
        let txn = db.begin_write().map_err(err)?;
        let mut retained = std::mem::take(&mut self.retained); // on an error, commit() reloads it
        let mut bytes = self.bytes;
        {
            let mut table = txn.open_table(UPDATES).map_err(err)?;
            for updates in &self.pending {
                // A commit reported as failed may still have reached the disk: what redb
                // holds from these seqs on was refused, and must not come back.
                if let Some(first) = updates.first() {
                    table.retain_in(first.seq.., |_, _| false).map_err(err)?;
                    while retained.back().is_some_and(|&(seq, _)| seq >= first.seq) {
                        if let Some((_, w)) = retained.pop_back() {
                            bytes -= w;
                        }
                    }
                }
                let mut record = Vec::new();
                for u in updates {
                    record.clear();
                    encode(u, &mut record);
                    table.insert(u.seq, record.as_slice()).map_err(err)?;
                    retained.push_back((u.seq, u.weight()));
                    bytes += u.weight();
                    while retained.len() > self.bounds.updates
                        || (bytes > self.bounds.bytes && retained.len() > 1)
                    {
                        let Some((_, w)) = retained.pop_front() else {
                            break;
                        };
                        bytes -= w;
                    }
                }
            }
            if let Some(&(oldest, _)) = retained.front() {
                table.retain_in(..oldest, |_, _| false).map_err(err)?;
            }
            let mut meta = txn.open_table(META).map_err(err)?;
            meta.insert(LOG_NONCE, nonce).map_err(err)?;
            let next = retained.back().map_or(0, |&(seq, _)| seq.saturating_add(1));
            meta.insert(LOG_NEXT_SEQ, next).map_err(err)?;
        }
        txn.commit().map_err(err)?;
        #[cfg(test)]
        if std::mem::take(&mut self.fail_after_checkpoint) {
            return Err(WriteError(
                "injected: the checkpoint's commit landed but failed".into(),
            ));
        }
        self.retained = retained;
        self.bytes = bytes;
        tracing::debug!(
            commits = self.pending.len(),
            log_bytes = self.log.len(),
            ms = began.elapsed().as_secs_f64() * 1e3,
            "the history store checkpointed its log into redb"
        );
        self.pending.clear();
        self.log.restart(nonce);
        self.retry = None;
        self.redb_bytes = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        self.log_bytes = self.log.file_bytes();
        Ok(())
    }
}

impl Drop for Store {
    /// A clean stop leaves everything in redb, so the next start has no log to replay.
    fn drop(&mut self) {
        if !self.pending.is_empty() && self.db.is_some() {
            if let Err(e) = self.checkpoint() {
                tracing::warn!(
                    "the history store could not checkpoint its log at close ({e}): the next \
                     start replays it"
                );
            }
        }
    }
}

/// The nonce of the log's current lap, if the store has one.
fn read_nonce(db: &Database) -> Result<Option<u64>, WriteError> {
    let txn = db.begin_read().map_err(err)?;
    match txn.open_table(META) {
        Ok(meta) => Ok(meta.get(LOG_NONCE).map_err(err)?.map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(err(e)),
    }
}

/// The lap whose frames the log holds past redb, if they are to be replayed: not when redb was
/// written since by a version without the log (see [`LOG_NEXT_SEQ`]), whose updates they would
/// overwrite.
fn current_lap(db: &Database) -> Result<Option<u64>, WriteError> {
    let Some(nonce) = read_nonce(db)? else {
        return Ok(None);
    };
    let txn = db.begin_read().map_err(err)?;
    let meta = txn.open_table(META).map_err(err)?;
    let Some(recorded) = meta.get(LOG_NEXT_SEQ).map_err(err)?.map(|v| v.value()) else {
        return Ok(Some(nonce));
    };
    let next = match txn.open_table(UPDATES) {
        Ok(table) => table
            .last()
            .map_err(err)?
            .map_or(0, |(k, _)| k.value().saturating_add(1)),
        Err(redb::TableError::TableDoesNotExist(_)) => 0,
        Err(e) => return Err(err(e)),
    };
    if next != recorded {
        tracing::warn!(
            "the history store was written by a version of ssehub without its log since the \
             last checkpoint (its newest update is {next}, the log's checkpoint left \
             {recorded}): the publishes only the log held (if any) are dropped, as replaying \
             them would overwrite newer ones"
        );
        return Ok(None);
    }
    Ok(Some(nonce))
}

/// Checks the seqs of the log's batches as the writer gives them: one after another within a
/// batch, each batch starting at most one past the last (a later batch may take again the seqs
/// of a commit that was refused), and none at `u64::MAX` (no seq follows it). Anything else
/// passed its check without being written by this store, and is damage.
fn check_seqs(batches: &[log::Batch]) -> Result<(), String> {
    let mut next: Option<u64> = None;
    for (i, batch) in batches.iter().enumerate() {
        for (j, &(seq, _)) in batch.iter().enumerate() {
            let fits = match next {
                None => true,
                Some(n) if j == 0 => seq <= n,
                Some(n) => seq == n,
            };
            if !fits {
                return Err(format!(
                    "the log's frame {i} holds seq {seq} where {} was due: its seqs are not \
                     in the order the store writes them",
                    next.unwrap_or(0)
                ));
            }
            next = Some(seq.checked_add(1).ok_or_else(|| {
                format!("the log's frame {i} holds seq {seq}, which no seq can follow")
            })?);
        }
    }
    Ok(())
}

fn err(e: impl Into<redb::Error>) -> WriteError {
    let e: redb::Error = e.into();
    WriteError(e.to_string())
}

fn open_error(dir: &Path, path: &Path, e: DatabaseError) -> OpenError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            OpenError::Locked(dir.to_owned())
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            OpenError::Unusable(path.to_owned(), io.to_string())
        }
        e => OpenError::Damaged(path.to_owned(), e.to_string()),
    }
}

/// Opens the store in `dir`; with `recover`, a damaged one is moved aside to
/// `DIR.corrupt-<unix time>` (and said so) and an empty one started in its place.
pub fn open_or_recover(
    dir: &Path,
    bounds: Bounds,
    recover: bool,
) -> anyhow::Result<(Store, Vec<Update>)> {
    match Store::open(dir, bounds) {
        Err(OpenError::Damaged(_, why)) if recover => {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut aside = dir.as_os_str().to_owned();
            aside.push(format!(".corrupt-{secs}"));
            let aside = PathBuf::from(aside);
            std::fs::rename(dir, &aside).map_err(|e| {
                anyhow::anyhow!(
                    "cannot move the damaged data directory {} aside to {}: {e}",
                    dir.display(),
                    aside.display()
                )
            })?;
            tracing::warn!(
                "the history store in {} was damaged ({why}): moved it aside to {} \
                 (--data-dir-recover) and starting with an empty history",
                dir.display(),
                aside.display()
            );
            Ok(Store::open(dir, bounds)?)
        }
        r => Ok(r?),
    }
}

fn encode(u: &Update, out: &mut Vec<u8>) {
    out.reserve(32 + u.id.len() + u.encoded.len());
    out.push(VERSION);
    out.extend_from_slice(&u.time_ms.to_le_bytes());
    out.push(u8::from(u.private));
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    field(out, u.id.as_bytes());
    out.extend_from_slice(&(u.topics.len() as u32).to_le_bytes());
    for t in &u.topics {
        field(out, t.as_bytes());
    }
    out.extend_from_slice(&u.encoded);
}

fn decode(seq: u64, mut b: &[u8]) -> Result<Update, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    fn u32_of(b: &mut &[u8]) -> Result<usize, String> {
        Ok(u32::from_le_bytes(take(b, 4)?.try_into().unwrap()) as usize)
    }
    fn string(b: &mut &[u8]) -> Result<String, String> {
        let n = u32_of(b)?;
        String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "not UTF-8".to_owned())
    }
    let version = take(&mut b, 1)?[0];
    if version != VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let time_ms = u64::from_le_bytes(take(&mut b, 8)?.try_into().unwrap());
    let private = take(&mut b, 1)?[0] & 1 == 1;
    let id = string(&mut b)?;
    let n = u32_of(&mut b)?;
    if n > crate::hub::MAX_TOPICS {
        return Err(format!("{n} topics"));
    }
    let topics = (0..n)
        .map(|_| string(&mut b))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Update {
        seq,
        id,
        topics,
        private,
        time_ms,
        encoded: Bytes::copy_from_slice(b),
        alt: None,
        alt_is_legacy: false,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn update(seq: u64, data: &str) -> SharedUpdate {
        Arc::new(Update {
            seq,
            id: format!("urn:x:{seq}"),
            topics: vec!["a".into(), "b/é".into()],
            private: seq % 2 == 1,
            time_ms: seq.wrapping_add(1_700_000_000_000),
            encoded: Bytes::from(format!("id: urn:x:{seq}\ndata: {data}\n\n")),
            alt: None,
            alt_is_legacy: false,
        })
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ssehub-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_round_trip() {
        let u = update(7, "x");
        let mut b = Vec::new();
        encode(&u, &mut b);
        let back = decode(7, &b).unwrap();
        assert_eq!(
            (
                &back.id,
                &back.topics,
                back.private,
                back.time_ms,
                &back.encoded
            ),
            (&u.id, &u.topics, u.private, u.time_ms, &u.encoded)
        );
        for n in 0..b.len() - u.encoded.len() {
            assert!(decode(7, &b[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn reopening_keeps_the_newest_within_bounds_and_locks_the_directory() {
        let d = dir("bounds");
        let bounds = Bounds {
            updates: 3,
            bytes: 1 << 20,
        };
        let (mut store, kept) = Store::open(&d, bounds).unwrap();
        assert!(kept.is_empty());
        assert_eq!(store.next_seq(), 0);
        store
            .commit(&(0..2).map(|s| update(s, "a")).collect::<Vec<_>>())
            .unwrap();
        store
            .commit(&(2..5).map(|s| update(s, "b")).collect::<Vec<_>>())
            .unwrap();
        assert!(matches!(Store::open(&d, bounds), Err(OpenError::Locked(_))));
        drop(store);
        let (store, kept) = Store::open(&d, bounds).unwrap();
        assert_eq!(kept.iter().map(|u| u.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(store.next_seq(), 5);
        drop(store);
        // Smaller bounds: the older ones go for good.
        let one = Bounds {
            updates: 1,
            bytes: 1 << 20,
        };
        drop(Store::open(&d, one).unwrap());
        let (_, kept) = Store::open(&d, bounds).unwrap();
        assert_eq!(kept.iter().map(|u| u.seq).collect::<Vec<_>>(), [4]);
        let _ = std::fs::remove_dir_all(&d);
    }

    impl Store {
        /// What a kill leaves: redb as of the last checkpoint, the log as written (no
        /// checkpoint at close). Returns where the log's frames end.
        fn crash(mut self) -> u64 {
            self.pending.clear();
            self.log.len()
        }
    }

    /// Writes `bytes` into the log at `at`, as a frame torn by a crash (or any garbage) would.
    /// Inverts the log's byte at `at`.
    fn flip(dir: &Path, at: u64) {
        let mut byte = [0u8];
        std::fs::File::open(dir.join(log::FILE))
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
        scribble(dir, at, &[!byte[0]]);
    }

    fn scribble(dir: &Path, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(log::FILE))
            .unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// One step of the property test: a commit of `n` updates of `size` bytes each (starting
    /// `back` seqs before the next one, as after a commit reported failed that may have reached
    /// the disk), a reopen with the bounds of `bounds`, or a kill that leaves `garbage` after
    /// the log's last frame (a torn write) and a restart.
    #[derive(Debug, Clone)]
    enum Step {
        Commit { n: usize, size: usize, back: u64 },
        Reopen { bounds: (usize, usize) },
        Crash { garbage: Vec<u8> },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1..6usize, 0..600usize, prop_oneof![6 => Just(0u64), 1 => 1..3u64])
                .prop_map(|(n, size, back)| Step::Commit { n, size, back }),
            1 => (1..8usize, 200..4_000usize).prop_map(|bounds| Step::Reopen { bounds }),
            1 => proptest::collection::vec(any::<u8>(), 0..64)
                .prop_map(|garbage| Step::Crash { garbage }),
        ]
    }

    /// What the store must hold: the newest updates within the bounds (always at least one),
    /// in seq order, a later write of a seq replacing the earlier one.
    fn trim(model: &mut Vec<SharedUpdate>, bounds: Bounds) {
        let mut bytes: usize = model.iter().map(|u| u.weight()).sum();
        while model.len() > bounds.updates.max(1) || (bytes > bounds.bytes && model.len() > 1) {
            bytes -= model.remove(0).weight();
        }
    }

    /// What a reload must give back of an update.
    fn fields(u: &Update) -> (u64, String, Bytes, Vec<String>, bool, u64) {
        let (id, encoded, topics) = (u.id.clone(), u.encoded.clone(), u.topics.clone());
        (u.seq, id, encoded, topics, u.private, u.time_ms)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Whatever the commits, their sizes, the rewrites of seqs after a failure, the bounds
        /// at each reopen, the kills (torn log tails) and how often the log is checkpointed
        /// into redb, the store reloads exactly the newest updates within its
        /// bounds, byte for byte, and carries on numbering after the newest.
        #[test]
        fn the_store_keeps_exactly_the_newest_within_its_bounds(
            steps in proptest::collection::vec(step(), 1..24),
            checkpoint_bytes in 1..4_000u64,
        ) {
            let d = dir("property");
            let mut bounds = Bounds { updates: 4, bytes: 2_000 };
            let (mut store, kept) = Store::open(&d, bounds).unwrap();
            store.checkpoint_bytes = checkpoint_bytes;
            proptest::prop_assert!(kept.is_empty());
            let mut model: Vec<SharedUpdate> = Vec::new();
            for step in steps {
                match step {
                    Step::Commit { n, size, back } => {
                        let first = store.next_seq().saturating_sub(back);
                        let batch: Vec<SharedUpdate> = (first..first + n as u64)
                            .map(|seq| update(seq, &"x".repeat(size)))
                            .collect();
                        store.commit(&batch).unwrap();
                        model.retain(|u| u.seq < first);
                        model.extend(batch);
                        trim(&mut model, bounds);
                    }
                    Step::Reopen { bounds: (updates, bytes) } => {
                        drop(store);
                        bounds = Bounds { updates, bytes };
                        let (reopened, kept) = Store::open(&d, bounds).unwrap();
                        store = reopened;
                        store.checkpoint_bytes = checkpoint_bytes;
                        trim(&mut model, bounds);
                        let got: Vec<_> = kept.iter().map(fields).collect();
                        let want: Vec<_> = model.iter().map(|u| fields(u)).collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                    Step::Crash { garbage } => {
                        let end = store.crash();
                        scribble(&d, end, &garbage);
                        let (reopened, kept) = Store::open(&d, bounds).unwrap();
                        store = reopened;
                        store.checkpoint_bytes = checkpoint_bytes;
                        let got: Vec<_> = kept.iter().map(fields).collect();
                        let want: Vec<_> = model.iter().map(|u| fields(u)).collect();
                        proptest::prop_assert_eq!(got, want);
                    }
                }
                let next = model.last().map_or(0, |u| u.seq + 1);
                proptest::prop_assert_eq!(store.next_seq(), next);
            }
            drop(store);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    fn seqs(kept: &[Update]) -> Vec<u64> {
        kept.iter().map(|u| u.seq).collect()
    }

    const WIDE: Bounds = Bounds {
        updates: 100,
        bytes: 1 << 20,
    };

    /// A kill between the log's fsync and the checkpoint loses nothing: the next start finds
    /// the batches in the log alone (redb never had them) and puts them into redb.
    #[test]
    fn a_kill_before_the_checkpoint_loses_no_commit() {
        let d = dir("kill");
        let (mut store, _) = Store::open(&d, WIDE).unwrap();
        store.commit(&[update(0, "a"), update(1, "b")]).unwrap();
        store.commit(&[update(2, "c")]).unwrap();
        store.crash();
        // redb alone holds none of them: only the log does.
        {
            let db = Database::open(d.join(FILE)).unwrap();
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(UPDATES).unwrap();
            assert_eq!(table.iter().unwrap().count(), 0);
        }
        let (mut store, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2]);
        assert_eq!(&kept[2].encoded[..], b"id: urn:x:2\ndata: c\n\n");
        // The start checkpointed them: a second kill, with nothing new, keeps them too.
        store.commit(&[update(3, "d")]).unwrap();
        store.crash();
        let (store, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2, 3]);
        assert_eq!(store.next_seq(), 4);
        drop(store);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A checkpoint whose redb commit landed but was reported failed: the commits answered
    /// after it (written under the lap redb now names) survive a kill.
    #[test]
    fn a_checkpoint_that_landed_but_failed_loses_no_later_commit() {
        let d = dir("landed");
        let (mut store, _) = Store::open(&d, WIDE).unwrap();
        store.checkpoint_bytes = 1;
        store.fail_after_checkpoint = true;
        store.commit(&[update(0, "a")]).unwrap();
        assert!(store.db.is_none(), "the injected failure did not happen");
        store.checkpoint_bytes = u64::MAX;
        store.commit(&[update(1, "b")]).unwrap();
        store.commit(&[update(2, "c")]).unwrap();
        store.crash();
        let (store, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2]);
        assert_eq!(store.next_seq(), 3);
        drop(store);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A refused commit (its frame's fsync failed after the write) does not come back after a
    /// restart, even when its head could not be blanked, and its seqs are given again.
    #[test]
    fn a_refused_commit_never_comes_back() {
        for blank_fails in [false, true] {
            let d = dir(&format!("refused-{blank_fails}"));
            let (mut store, _) = Store::open(&d, WIDE).unwrap();
            store.commit(&[update(0, "a")]).unwrap();
            store.log.fail_sync = true;
            store.log.fail_blank = blank_fails;
            assert!(store.commit(&[update(1, "refused")]).is_err());
            assert_eq!(store.next_seq(), 1);
            store.crash();
            let (mut store, kept) = Store::open(&d, WIDE).unwrap();
            assert_eq!(seqs(&kept), [0], "blank fails: {blank_fails}");
            store.commit(&[update(1, "b")]).unwrap();
            store.crash();
            let (_, kept) = Store::open(&d, WIDE).unwrap();
            assert_eq!(seqs(&kept), [0, 1]);
            assert_eq!(&kept[1].encoded[..], b"id: urn:x:1\ndata: b\n\n");
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// A batch far larger than a lap grows the log for that lap only: the checkpoint after it
    /// shrinks the file back, and what follows is still kept across a kill.
    #[test]
    fn a_large_batch_does_not_grow_the_log_for_good() {
        let d = dir("shrink");
        let bounds = Bounds {
            updates: 100,
            bytes: 16 << 20,
        };
        let (mut store, _) = Store::open(&d, bounds).unwrap();
        store.commit(&[update(0, &"x".repeat(3 << 20))]).unwrap();
        assert!(
            store.pending.is_empty(),
            "no checkpoint after a 3 MiB frame"
        );
        assert!(
            store.log.file_bytes() <= log::PREALLOCATE,
            "{}",
            store.log.file_bytes()
        );
        assert!(store.file_bytes() < store.redb_bytes + (2 << 20));
        store.commit(&[update(1, "b")]).unwrap();
        store.crash();
        let (_, kept) = Store::open(&d, bounds).unwrap();
        assert_eq!(seqs(&kept), [0, 1]);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A failed checkpoint is not tried again at the very next commit (the log holds the
    /// batches meanwhile), and an empty commit writes nothing that would read back as damage.
    #[test]
    fn a_failed_checkpoint_waits_before_the_next_try() {
        let d = dir("retry");
        let (mut store, _) = Store::open(&d, WIDE).unwrap();
        store.checkpoint_bytes = 1;
        store.fail_after_checkpoint = true;
        store.commit(&[update(0, "a")]).unwrap();
        // Whatever the machine's speed, the next commit comes within the wait.
        let (at, wait) = store.retry.expect("no wait after the failed checkpoint");
        store.retry = Some((at + std::time::Duration::from_secs(3600), wait));
        store.commit(&[update(1, "b")]).unwrap();
        assert_eq!(
            store.pending.len(),
            1,
            "the checkpoint was tried again at once"
        );
        store.commit(&[]).unwrap();
        store.crash();
        let (_, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1]);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A frame the crash tore (cut short, or with a byte that never landed) is cut with
    /// everything after it, everything before it is kept, and the log carries on from there.
    #[test]
    fn a_torn_tail_is_cut_and_everything_before_it_kept() {
        for tear in ["short", "flipped", "forged"] {
            let d = dir(&format!("torn-{tear}"));
            let (mut store, _) = Store::open(&d, WIDE).unwrap();
            store.commit(&[update(0, "a")]).unwrap();
            let first_end = store.log.len();
            store.commit(&[update(1, "b"), update(2, "c")]).unwrap();
            let end = store.crash();
            let path = d.join(log::FILE);
            match tear {
                // The second frame never fully landed (the crash came before its fsync).
                "short" => {
                    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    f.set_len(end - 5).unwrap();
                }
                // One byte of it did not land as written.
                "flipped" => {
                    let at = first_end + (end - first_end) / 2;
                    let mut byte = [0u8];
                    std::fs::File::open(&path)
                        .unwrap()
                        .read_exact_at(&mut byte, at)
                        .unwrap();
                    scribble(&d, at, &[byte[0] ^ 0x20]);
                }
                // A well-formed frame of another lap (what an earlier lap left, or what a
                // publisher's data could spell) in its place: not read without the nonce.
                _ => {
                    let mut frame = Vec::new();
                    log::encode_frame(&mut frame, 0x5eed, &[update(1, "forged")]);
                    scribble(&d, first_end, &frame);
                }
            }
            let (mut store, kept) = Store::open(&d, WIDE).unwrap_or_else(|e| panic!("{tear}: {e}"));
            assert_eq!(seqs(&kept), [0], "{tear}");
            assert_eq!(store.next_seq(), kept.last().map_or(0, |u| u.seq + 1));
            let next = store.next_seq();
            store.commit(&[update(next, "d")]).unwrap();
            store.crash();
            let (_, again) = Store::open(&d, WIDE).unwrap();
            assert_eq!(seqs(&again), [seqs(&kept), vec![next]].concat(), "{tear}");
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// A frame damaged in the middle of the log (good frames of the same lap after it, each
    /// answered) refuses the start as damage instead of being cut with what follows it, and
    /// `--data-dir-recover` is the way past it.
    #[test]
    fn damage_in_the_middle_of_the_log_refuses_the_start() {
        let d = dir("middle");
        let (mut store, _) = Store::open(&d, WIDE).unwrap();
        store.commit(&[update(0, "a")]).unwrap();
        let first_end = store.log.len();
        store.commit(&[update(1, "b")]).unwrap();
        let second_end = store.log.len();
        store.commit(&[update(2, "c")]).unwrap();
        store.commit(&[update(3, "d")]).unwrap();
        store.crash();
        let at = first_end + (second_end - first_end) / 2;
        let mut byte = [0u8];
        std::fs::File::open(d.join(log::FILE))
            .unwrap()
            .read_exact_at(&mut byte, at)
            .unwrap();
        scribble(&d, at, &[byte[0] ^ 0x01]);
        match Store::open(&d, WIDE) {
            Err(OpenError::Damaged(path, why)) => {
                assert_eq!(path, d.join(log::FILE));
                assert!(why.contains("damaged in its middle"), "{why}");
            }
            Err(e) => panic!("{e}"),
            Ok((_, kept)) => panic!("opened with {:?}, 1..=3 were answered", seqs(&kept)),
        }
        let (_, kept) = open_or_recover(&d, WIDE, true).unwrap();
        assert!(kept.is_empty());
        let _ = std::fs::remove_dir_all(&d);
        remove_aside("middle");
    }

    /// Commits four one-update frames and kills; returns where each frame starts (and the
    /// end of the last).
    fn four_frames(d: &Path) -> Vec<u64> {
        let (mut store, _) = Store::open(d, WIDE).unwrap();
        let mut at = vec![store.log.len()];
        for (seq, data) in ["a", "b", "c", "d"].iter().enumerate() {
            store.commit(&[update(seq as u64, data)]).unwrap();
            at.push(store.log.len());
        }
        store.crash();
        at
    }

    /// Reopens `d` and expects the start refused as damage to the log's middle.
    fn expect_middle_damage(d: &Path) {
        match Store::open(d, WIDE) {
            Err(OpenError::Damaged(path, why)) => {
                assert_eq!(path, d.join(log::FILE));
                assert!(why.contains("damaged in its middle"), "{why}");
            }
            Err(e) => panic!("{e}"),
            Ok((_, kept)) => panic!("opened with {:?}, 0..=3 were answered", seqs(&kept)),
        }
    }

    /// Damage that ends the reading at a head that is not this lap's (a frame's nonce bytes
    /// rotted, or its head read back as zeros) with answered frames after it refuses the start.
    #[test]
    fn a_damaged_or_zeroed_head_in_the_middle_refuses_the_start() {
        for (name, zeros) in [("nonce", false), ("zeros", true)] {
            let d = dir(name);
            let at = four_frames(&d);
            if zeros {
                scribble(&d, at[1], &[0; 20]);
            } else {
                // Flipped, not overwritten: the nonce is random, and a fixed byte would be
                // the one already there once in 256 runs.
                flip(&d, at[1] + 14);
            }
            expect_middle_damage(&d);
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// Damage covering two neighbouring frames (one bad page), or a frame's length field, is
    /// not taken for a torn tail: good frames of the lap after it refuse the start.
    #[test]
    fn damage_over_two_frames_or_a_length_refuses_the_start() {
        let d = dir("twoframes");
        let at = four_frames(&d);
        // The tail of frame 1 and the head of frame 2.
        scribble(&d, at[2] - 3, &[0xFF; 8]);
        expect_middle_damage(&d);
        let _ = std::fs::remove_dir_all(&d);

        let d = dir("length");
        let at = four_frames(&d);
        scribble(&d, at[1], &[0x77, 0x01]);
        expect_middle_damage(&d);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A frame that passes its check (written here with the lap's nonce, as only someone who
    /// read it from redb could) but holds seqs the store never writes refuses the start:
    /// `u64::MAX` (no seq after it), seqs out of order, a gap after the last frame, or a gap
    /// after redb's newest update.
    #[test]
    fn a_frame_with_seqs_out_of_order_is_damage() {
        let cases: [(&str, &[u64], bool); 5] = [
            ("seqmax", &[u64::MAX], false),
            ("seqdown", &[3, 2], false),
            ("seqskip", &[2, 4], false),
            ("seqgap", &[9], false),
            ("seqredb", &[9], true),
        ];
        for (name, bad, after_checkpoint) in cases {
            let d = dir(name);
            let (mut store, _) = Store::open(&d, WIDE).unwrap();
            store.commit(&[update(0, "a"), update(1, "b")]).unwrap();
            if after_checkpoint {
                store.checkpoint().unwrap();
            }
            let nonce = store.log.nonce();
            let end = store.crash();
            let updates: Vec<_> = bad.iter().map(|&seq| update(seq, "x")).collect();
            let mut frame = Vec::new();
            log::encode_frame(&mut frame, nonce, &updates);
            scribble(&d, end, &frame);
            match Store::open(&d, WIDE) {
                Err(OpenError::Damaged(path, why)) => {
                    assert_eq!(path, d.join(log::FILE), "{name}");
                    assert!(why.contains("seq") || why.contains("update"), "{why}");
                }
                Err(e) => panic!("{name}: {e}"),
                Ok((_, kept)) => panic!("{name}: opened with {:?}", seqs(&kept)),
            }
            let _ = std::fs::remove_dir_all(&d);
        }
    }

    /// Removes what `--data-dir-recover` moved aside in a test.
    fn remove_aside(name: &str) {
        let prefix = format!("ssehub-store-{name}-{}.corrupt-", std::process::id());
        for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// A store written before the log existed (redb alone, no nonce) loads as it is, and the
    /// log starts with it.
    #[test]
    fn a_store_from_before_the_log_loads_and_carries_on() {
        let d = dir("upgrade");
        std::fs::create_dir_all(&d).unwrap();
        {
            let db = Database::create(d.join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(UPDATES).unwrap();
                for seq in 0..3 {
                    let mut record = Vec::new();
                    encode(&update(seq, "old"), &mut record);
                    table.insert(seq, record.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let (mut store, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2]);
        store.commit(&[update(3, "new")]).unwrap();
        store.crash();
        let (_, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2, 3]);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A kill, a downgrade to a version without the log that publishes and stops, and an
    /// upgrade again: the log's stale frames do not overwrite what that version stored.
    #[test]
    fn a_log_older_than_redb_is_not_replayed() {
        let d = dir("downgrade");
        let (mut store, _) = Store::open(&d, WIDE).unwrap();
        store.commit(&[update(0, "a")]).unwrap();
        store.checkpoint().unwrap();
        store.commit(&[update(1, "logged")]).unwrap();
        store.crash();
        // What the older version does: redb alone, its own seqs from 1 on.
        {
            let db = Database::create(d.join(FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(UPDATES).unwrap();
                for seq in 1..4 {
                    let mut record = Vec::new();
                    encode(&update(seq, "old"), &mut record);
                    table.insert(seq, record.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let (store, kept) = Store::open(&d, WIDE).unwrap();
        assert_eq!(seqs(&kept), [0, 1, 2, 3]);
        assert_eq!(&kept[1].encoded[..], b"id: urn:x:1\ndata: old\n\n");
        assert_eq!(store.next_seq(), 4);
        drop(store);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn garbage_is_damage() {
        let d = dir("garbage");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(FILE), vec![0x5a; 10_000]).unwrap();
        let bounds = Bounds {
            updates: 3,
            bytes: 1 << 20,
        };
        assert!(matches!(
            Store::open(&d, bounds),
            Err(OpenError::Damaged(..))
        ));
        let (_, kept) = open_or_recover(&d, bounds, true).unwrap();
        assert!(kept.is_empty());
        let _ = std::fs::remove_dir_all(&d);
        remove_aside("garbage");
    }
}
