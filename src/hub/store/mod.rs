//! The embedded durable history: a restart of a single-node hub forgets nothing.
//!
//! One redb file, `DIR/history.redb`, with one table from the hub's seq to one update, kept
//! within the same bounds as the in-memory history (the newest updates, by count and bytes);
//! trimming happens in the same transaction as the writes that push updates out. The hub's
//! writer thread (`hub::writer`) calls [`Store::commit`] once per batch of publishes, so one
//! fsync covers every publish that arrived together. redb's own file lock keeps a second hub
//! off the same directory.
//!
//! A record holds what replay needs and nothing else: the update's metadata and its
//! event-stream bytes exactly as subscribers received them (so a replay after a restart is
//! byte-for-byte the same, and nothing is encoded twice). Layout, little-endian:
//! `version u8 (1) | time_ms u64 | flags u8 (bit 0: private) | id_len u32 | id |
//! topic_count u32 | (topic_len u32 | topic)* | encoded…`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use redb::{Database, DatabaseError, ReadableTable, StorageError, TableDefinition};

use crate::hub::{SharedUpdate, Update};

/// seq → record. redb orders `u64` keys numerically, as big-endian bytes would sort.
const UPDATES: TableDefinition<u64, &[u8]> = TableDefinition::new("updates");
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
    /// `None` after a failed write: reopened (and its bookkeeping read again) before the next.
    db: Option<Database>,
    bounds: Bounds,
    /// (seq, weight) of every update on disk, oldest first: what decides the trimming.
    retained: VecDeque<(u64, usize)>,
    bytes: usize,
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
        let mut store = Store {
            path: path.clone(),
            db: Some(db),
            bounds,
            retained: VecDeque::new(),
            bytes: 0,
        };
        let kept = store.load().map_err(|e| damaged(e.0))?;
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
        Ok(kept)
    }

    /// The seq after the newest stored update.
    pub fn next_seq(&self) -> u64 {
        self.retained.back().map_or(0, |(s, _)| s + 1)
    }

    /// The store file's size on disk.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    /// Writes `updates` (in seq order, after everything stored) and drops what they push out
    /// of the bounds, in one durable transaction: when this returns `Ok`, they are on disk.
    /// On an error nothing of them is kept, and the next call starts from a reopened file.
    pub fn commit(&mut self, updates: &[SharedUpdate]) -> Result<(), WriteError> {
        if self.db.is_none() {
            let db = Database::create(&self.path)
                .map_err(|e| WriteError(format!("cannot reopen the history store: {e}")))?;
            self.db = Some(db);
            if let Err(e) = self.load() {
                self.db = None;
                return Err(e);
            }
            tracing::info!("the history store is writable again");
        }
        let result = self.write(updates);
        if result.is_err() {
            // redb refuses every transaction after an I/O error: start again from the file.
            self.db = None;
        }
        result
    }

    fn write(&mut self, updates: &[SharedUpdate]) -> Result<(), WriteError> {
        let db = self.db.as_ref().expect("reopened");
        let txn = db.begin_write().map_err(err)?;
        let mut retained = std::mem::take(&mut self.retained); // on an error, commit() reloads it
        let mut bytes = self.bytes;
        {
            let mut table = txn.open_table(UPDATES).map_err(err)?;
            // A commit reported as failed may still have reached the disk (an error on its
            // last fsync): what the reopened file holds from these seqs on was refused, and
            // must not come back with these seqs or at the next start.
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
            if let Some(&(oldest, _)) = retained.front() {
                table.retain_in(..oldest, |_, _| false).map_err(err)?;
            }
        }
        txn.commit().map_err(err)?;
        self.retained = retained;
        self.bytes = bytes;
        Ok(())
    }
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
    use std::sync::Arc;

    use super::*;

    fn update(seq: u64, data: &str) -> SharedUpdate {
        Arc::new(Update {
            seq,
            id: format!("urn:x:{seq}"),
            topics: vec!["a".into(), "b/é".into()],
            private: seq % 2 == 1,
            time_ms: 1_700_000_000_000 + seq,
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

    /// One step of the property test: a commit of `n` updates of `size` bytes each (starting
    /// `back` seqs before the next one, as after a commit reported failed that may have reached
    /// the disk), or a reopen with the bounds of `bounds`.
    #[derive(Debug, Clone)]
    enum Step {
        Commit { n: usize, size: usize, back: u64 },
        Reopen { bounds: (usize, usize) },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (1..6usize, 0..600usize, prop_oneof![6 => Just(0u64), 1 => 1..3u64])
                .prop_map(|(n, size, back)| Step::Commit { n, size, back }),
            1 => (1..8usize, 200..4_000usize).prop_map(|bounds| Step::Reopen { bounds }),
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
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Whatever the commits, their sizes, the rewrites of seqs after a failure and the
        /// bounds at each reopen, the store reloads exactly the newest updates within its
        /// bounds, byte for byte, and carries on numbering after the newest.
        #[test]
        fn the_store_keeps_exactly_the_newest_within_its_bounds(
            steps in proptest::collection::vec(step(), 1..24),
        ) {
            let d = dir("property");
            let mut bounds = Bounds { updates: 4, bytes: 2_000 };
            let (mut store, kept) = Store::open(&d, bounds).unwrap();
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
                        trim(&mut model, bounds);
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
        for e in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(
                "ssehub-store-garbage-{}.corrupt-",
                std::process::id()
            )) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}
