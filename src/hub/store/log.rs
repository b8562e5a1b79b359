//! The store's write-ahead log: what makes a group commit cost one small append and one fsync.
//!
//! Written by hand because no crate we found does only this: okaywal is a general log with
//! segment files and a checkpointing protocol of its own to drive (more moving parts and
//! another on-disk format for one appended frame per commit), and redb's own non-durable
//! commits with a periodic durable one lose what a crash catches between the two, which a
//! `200` promises not to. And redb alone costs too much per commit: measured under a steady 2,000 publishes/s (16 publishers, about 6 updates per
//! commit), each redb commit wrote a 320-byte header and 8–9 scattered 4 KiB pages (≈ 37 KB for
//! ≈ 1.5 KB of updates) before its one `fdatasync`, and took 2.4 ms on average, where a bare
//! `fdatasync` of a small append takes about 0.2 ms. Here a commit is one `pwrite` of its
//! records at the end of `DIR/history.log` and one `fdatasync`; redb takes the same updates
//! later, many commits at a time, in a durable transaction (a checkpoint), after which the log
//! starts again from its first byte (it is overwritten in place, so after its first lap it no
//! longer grows and an `fdatasync` has no file size to write).
//!
//! A frame, little-endian: `len u32 | check u64 | nonce u64 | payload (len bytes)` where
//! `check` is the XXH3 of `nonce | payload`, and the payload is `count u32 | (seq u64 |
//! record_len u32 | record)*` (records as in the store). `nonce` names the lap: a random
//! number the checkpoint writes into redb before the log starts again, so frames of an earlier
//! lap (still on disk further in) are never read as new, and no publisher can forge one (its
//! data could hold a well-formed frame, but not the secret nonce). Reading stops at the first
//! frame of another lap (the end of the lap), and at a frame of this lap that is short or fails
//! its check: a torn tail is cut, with a warning, unless a good frame of the lap lies anywhere
//! after that point, which is damage and refuses the start.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::hub::SharedUpdate;

/// The file inside the data directory.
pub const FILE: &str = "history.log";
const HEAD: usize = 4 + 8 + 8;
/// What a new log is given to start with: a lap's worth (the store checkpoints at a megabyte).
pub(super) const PREALLOCATE: u64 = 1 << 20;
/// The longest frame read back: a batch is at most the writer's queued bytes (64 MiB) and its
/// records' headers; a length past this is a torn or foreign tail, not a frame.
const MAX_FRAME: usize = 256 << 20;

/// One frame read back: the seq and record of each update of one commit.
pub type Batch = Vec<(u64, Vec<u8>)>;

pub struct Log {
    file: File,
    /// Where the next frame goes: the end of the frames of this lap.
    end: u64,
    nonce: u64,
    frame: Vec<u8>,
    /// A refused frame may still be readable (its head could not be blanked on disk): the lap
    /// must end, by a checkpoint naming a new one, before anything else is appended.
    stale: bool,
    /// Test-only faults: the next frame's fsync fails (after its write), and so does the
    /// blanking of its head.
    #[cfg(test)]
    pub(super) fail_sync: bool,
    #[cfg(test)]
    pub(super) fail_blank: bool,
}

impl Log {
    /// Opens (creating it) the log in `dir` and reads the frames of lap `nonce`, in order.
    /// The log is left positioned after them; [`Log::restart`] starts a new lap.
    pub fn open(dir: &Path, nonce: Option<u64>) -> std::io::Result<(Log, Vec<Batch>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))?;
        let mut batches = Vec::new();
        let mut end = 0;
        if let Some(nonce) = nonce {
            let size = file.metadata()?.len();
            let mut reader = BufReader::with_capacity(1 << 16, At { file: &file, at: 0 });
            loop {
                let head_at_end = end;
                let stop = match read_frame(&mut reader, nonce, size - end)? {
                    Frame::Whole(len, batch) => {
                        batches.push(batch);
                        end += len as u64;
                        continue;
                    }
                    Frame::End if end >= size => break,
                    stop => stop,
                };
                // Frames are appended one at a time, each on disk before the next is written,
                // and a refused frame's head is blanked or its lap ended: so no good frame of
                // this lap lies past where its frames stop, unless what stopped the reading
                // (a bad frame, a head of another nonce or of zeros) is damage to frames that
                // were answered. Those are not cut, silently or not: the whole rest of the
                // file (about a lap) is searched for one.
                if let Some(at) = find_frame(&file, nonce, head_at_end + 1, size)? {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "the log's frames stop at byte {end} (after {} good ones), but a \
                             good frame of the same lap is at byte {at}: the log is damaged in \
                             its middle, not torn at its end",
                            batches.len()
                        ),
                    ));
                }
                match stop {
                    Frame::Torn(len) => {
                        // A torn write and damage to the last frame read the same: which one
                        // it was is not known, so the warning does not claim it.
                        let cut = ((HEAD + len) as u64).min(size - end);
                        tracing::warn!(
                            "the history log's last frame is short or fails its check (most \
                             likely a write torn by the stop, not confirmed on disk, so not \
                             answered): cut {cut} bytes at byte {end}, after {} good frames",
                            batches.len()
                        );
                    }
                    _ => {
                        if looks_like_lap(&file, nonce, end)? {
                            tracing::warn!(
                                "the history log's frames end at byte {end} (after {} good \
                                 ones) at a head whose lap differs from this one's in only a \
                                 few bits: if it was damage, the one frame there is lost",
                                batches.len()
                            );
                        }
                    }
                }
                break;
            }
        }
        preallocate(&file);
        let log = Log {
            file,
            end,
            nonce: nonce.unwrap_or(0),
            frame: Vec::new(),
            stale: false,
            #[cfg(test)]
            fail_sync: false,
            #[cfg(test)]
            fail_blank: false,
        };
        Ok((log, batches))
    }

    /// The lap being written.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Bytes of frames in this lap.
    pub fn len(&self) -> u64 {
        self.end
    }

    /// Starts a new lap named `nonce` at the file's first byte (once redb holds everything
    /// the last lap held, under that nonce).
    /// A lap that grew the file past twice its usual size (one large batch, or checkpoints
    /// failing for a while) gives the space back here, so the file stays about a lap long.
    pub fn restart(&mut self, nonce: u64) {
        self.nonce = nonce;
        self.end = 0;
        self.stale = false;
        if self.file_bytes() > 2 * PREALLOCATE {
            // Everything past the first lap's bytes is of a lap redb already holds. Best
            // effort: a file that cannot shrink is only larger.
            let shrunk = self
                .file
                .set_len(PREALLOCATE)
                .and_then(|()| self.file.sync_all());
            if let Err(e) = shrunk {
                tracing::warn!("could not shrink the history log back to its usual size: {e}");
            }
        }
    }

    /// Whether a refused frame may still be read back at the next start (see
    /// [`Log::append`]): then the lap must end before the next append.
    pub fn stale(&self) -> bool {
        self.stale
    }

    /// Appends one frame holding `updates` and waits until it is on disk. On an error the
    /// log's end does not move: the next frame overwrites whatever part of this one landed.
    pub fn append(&mut self, updates: &[SharedUpdate]) -> std::io::Result<()> {
        let frame = &mut self.frame;
        encode_frame(frame, self.nonce, updates);
        let written = self.file.write_all_at(frame, self.end).and_then(|()| {
            #[cfg(test)]
            if std::mem::take(&mut self.fail_sync) {
                return Err(std::io::Error::other("injected: the frame's fsync failed"));
            }
            self.file.sync_data()
        });
        if let Err(e) = written {
            // A frame refused to its publishers may still have landed whole (its fsync failed
            // after the write): its head is blanked on disk, so that a restart before the next
            // frame takes its place does not read it. If that fails too, the caller ends the
            // lap before anything else is appended (see `stale`).
            if self.blank().is_err() {
                self.stale = true;
            }
            return Err(e);
        }
        self.end += frame.len() as u64;
        // A batch of large updates leaves a large buffer: not kept past a megabyte.
        if frame.capacity() > 1 << 20 {
            *frame = Vec::new();
        }
        Ok(())
    }

    /// Zeros the head at the log's end (a refused frame's) and waits until that is on disk.
    fn blank(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_blank) {
            return Err(std::io::Error::other("injected: the blanking failed"));
        }
        self.file.write_all_at(&[0; HEAD], self.end)?;
        self.file.sync_data()
    }

    /// The file's size on disk.
    pub fn file_bytes(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }
}

/// Gives a new log its first lap's bytes at once, written as zeros (not `fallocate`d: an
/// extent allocated but never written is still converted at the first `fdatasync` over it),
/// and leaves none of the file in the page cache. Measured on this machine (ext4, Linux 6.18):
/// an `fdatasync` after a 2.5 KB `pwrite` that grows the file took 0.15–0.23 ms at the median,
/// over bytes already written 0.10 ms, as it has no size or extent to journal. The zeros go
/// in page-sized writes and the cache is dropped because the page cache keeps what was
/// written or read in large chunks as large folios, and a small write into one dirties the
/// whole folio: after one 1 MiB write of zeros, each commit's `fdatasync` wrote 1 MiB (the
/// process's `write_bytes`), against 6.6 KB after page-sized ones. Best effort: where the
/// disk or a file-size limit refuses, the log grows frame by frame, and an append that cannot
/// fit fails as any write would.
fn preallocate(file: &File) {
    use std::os::fd::AsRawFd;
    const PAGE: usize = 4096;
    let have = file.metadata().map_or(u64::MAX, |m| m.len());
    if have < PREALLOCATE {
        let zeros = [0u8; PAGE];
        let mut at = have - have % PAGE as u64;
        let mut ok = true;
        while ok && at < PREALLOCATE {
            let from = (have.max(at) - at) as usize;
            ok = file.write_all_at(&zeros[from..], at.max(have)).is_ok();
            at += PAGE as u64;
        }
        if ok {
            let _ = file.sync_all();
        }
    }
    // SAFETY: a plain advice call on a file descriptor this `File` owns; it reads or writes
    // no memory of ours.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Encodes one frame of lap `nonce` holding `updates` into `frame`.
pub(super) fn encode_frame(frame: &mut Vec<u8>, nonce: u64, updates: &[SharedUpdate]) {
    frame.clear();
    frame.resize(HEAD - 8, 0);
    frame.extend_from_slice(&nonce.to_le_bytes());
    frame.extend_from_slice(&(updates.len() as u32).to_le_bytes());
    for u in updates {
        frame.extend_from_slice(&u.seq.to_le_bytes());
        let at = frame.len();
        frame.extend_from_slice(&[0; 4]);
        super::encode(u, frame);
        let n = (frame.len() - at - 4) as u32;
        frame[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
    let payload = frame.len() - HEAD;
    // The check covers the nonce, the head's last 8 bytes, and the payload.
    let check = xxhash_rust::xxh3::xxh3_64(&frame[HEAD - 8..]);
    frame[..4].copy_from_slice(&(payload as u32).to_le_bytes());
    frame[4..12].copy_from_slice(&check.to_le_bytes());
}

/// What the log holds at one place.
enum Frame {
    /// A frame of the lap, its length on disk and its batch.
    Whole(usize, Batch),
    /// The end of the lap: the end of the file, or a head of another lap (zeros, an earlier
    /// lap's frame, a refused frame's blanked head).
    End,
    /// A head of this lap whose frame is cut short or fails its check, with the payload length
    /// its head says.
    Torn(usize),
}

/// Reads one frame of lap `nonce`, at most `room` bytes (what the file still holds, so that a
/// torn head's length allocates nothing past the file). A frame that passes its check but
/// does not parse is damage, not a tail, and an error.
fn read_frame(r: &mut impl Read, nonce: u64, room: u64) -> std::io::Result<Frame> {
    let mut head = [0u8; HEAD];
    if !read_full(r, &mut head)? {
        return Ok(Frame::End);
    }
    let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
    let check = u64::from_le_bytes(head[4..12].try_into().unwrap());
    let frame_nonce = u64::from_le_bytes(head[12..20].try_into().unwrap());
    if frame_nonce != nonce {
        return Ok(Frame::End);
    }
    if len > MAX_FRAME || (HEAD + len) as u64 > room {
        return Ok(Frame::Torn(len));
    }
    let mut body = vec![0u8; 8 + len];
    body[..8].copy_from_slice(&head[12..20]);
    if !read_full(r, &mut body[8..])? || xxhash_rust::xxh3::xxh3_64(&body) != check {
        return Ok(Frame::Torn(len));
    }
    let damaged = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let mut b = &body[8..];
    let mut take = |n: usize| -> std::io::Result<&[u8]> {
        if b.len() < n {
            return Err(damaged("a log frame ends inside a record"));
        }
        let (head, rest) = b.split_at(n);
        b = rest;
        Ok(head)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
    let mut batch = Vec::with_capacity(count.min(len / 12));
    for _ in 0..count {
        let seq = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let n = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        batch.push((seq, take(n)?.to_vec()));
    }
    if !b.is_empty() || batch.is_empty() {
        return Err(damaged("a log frame holds more or less than its records"));
    }
    Ok(Frame::Whole(HEAD + len, batch))
}

/// Where the first good frame of lap `nonce` at or after byte `from` is, if any: each place
/// whose nonce bytes match is read as a frame (a frame that passes its check but does not
/// parse counts: it is of this lap). Reads the file a window at a time, so memory stays
/// bounded whatever its size.
fn find_frame(file: &File, nonce: u64, from: u64, size: u64) -> std::io::Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    let want = nonce.to_le_bytes();
    let mut buf = vec![0u8; WINDOW + HEAD];
    let mut start = from;
    while start + HEAD as u64 <= size {
        let n = ((size - start) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], start)?;
        // Heads starting in this window; the next window starts where the last one here could.
        let heads = n + 1 - HEAD;
        for i in 0..heads.min(WINDOW) {
            if buf[i + 12..i + HEAD] != want {
                continue;
            }
            let at = start + i as u64;
            let mut r = At { file, at };
            match read_frame(&mut r, nonce, size - at) {
                Ok(Frame::Whole(..)) => return Ok(Some(at)),
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(Some(at)),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        start += heads.min(WINDOW) as u64;
    }
    Ok(None)
}

/// Whether the head at `at` names a lap within 8 bits of `nonce`: damage to a frame's nonce
/// bytes, not an earlier lap's head or old bytes (those differ in about 32 bits of 64).
fn looks_like_lap(file: &File, nonce: u64, at: u64) -> std::io::Result<bool> {
    let mut got = [0u8; 8];
    match file.read_exact_at(&mut got, at + 12) {
        Ok(()) => Ok((u64::from_le_bytes(got) ^ nonce).count_ones() <= 8),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the file from a position with `pread`, so that a look further on leaves the main
/// reader where it is.
struct At<'a> {
    file: &'a File,
    at: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// Fills `buf`; `false` if the file ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => return Ok(false),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The search finds a frame wherever it starts, across the edge between two windows too,
    /// and nothing where no frame of the lap is.
    #[test]
    fn the_search_finds_a_frame_across_a_window_edge() {
        let path = std::env::temp_dir().join(format!("ssehub-log-find-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let size = (1 << 20) + 4096;
        file.set_len(size).unwrap();
        assert_eq!(find_frame(&file, 7, 0, size).unwrap(), None);
        let update = std::sync::Arc::new(crate::hub::Update {
            seq: 1,
            id: "urn:x".into(),
            topics: vec!["a".into()],
            private: false,
            time_ms: 0,
            encoded: bytes::Bytes::from_static(b"data: x\n\n"),
            alt: None,
            alt_is_legacy: false,
        });
        let mut frame = Vec::new();
        encode_frame(&mut frame, 7, &[update]);
        for at in [(1 << 20) - 15, (1 << 20) - 5, 1 << 20, 3] {
            file.set_len(0).unwrap();
            file.set_len(size).unwrap();
            file.write_all_at(&frame, at).unwrap();
            assert_eq!(find_frame(&file, 7, 0, size).unwrap(), Some(at), "{at}");
            assert_eq!(find_frame(&file, 8, 0, size).unwrap(), None);
            assert_eq!(find_frame(&file, 7, at + 1, size).unwrap(), None);
            assert!(looks_like_lap(&file, 7 ^ 0b101, at).unwrap());
            assert!(!looks_like_lap(&file, !7, at).unwrap());
        }
        let _ = std::fs::remove_file(&path);
    }
}
