//! A server-side TLS connection on rustls's unbuffered API, written by hand because
//! tokio-rustls keeps a rustls `ServerConnection` whose record buffer is grown to 4 KiB before
//! every read and never shrunk: measured, that and its neighbours made an idle subscriber over
//! TLS cost 13.7 KiB against ~3 KiB in plain text.
//!
//! Here bytes read from the socket land in a scratch buffer shared by every connection of a
//! worker thread and are decrypted there; bytes to send are encrypted into the same scratch and
//! written at once. A connection keeps only what it could not pass on yet (the start of a
//! record still arriving, plaintext its reader had no room for, encrypted bytes the socket did
//! not take), each in a `Vec` freed once empty. An idle connection holds its rustls state and
//! nothing else. After the handshake, what a peer can make it keep of an unfinished record is
//! bounded in size (one record) and in time (the head deadline, `--idle-timeout`).

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Bytes asked of the socket per read: room for a few whole records.
const READ_SIZE: usize = 32 * 1024;
/// Plaintext taken per write: four full records, what tokio-rustls buffered by default. What
/// the socket does not take of it is kept by the connection until flushed.
const WRITE_SIZE: usize = 64 * 1024;
/// A record's largest overhead (header, explicit nonce, tag, inner content type), with margin.
const RECORD_OVERHEAD: usize = 64;
/// The most of an unfinished handshake message (spread over records) a peer can make a
/// connection keep during the handshake: rustls refuses handshake messages over 64 KiB itself;
/// this is the backstop should that ever change.
const MAX_INCOMPLETE_HANDSHAKE: usize = 96 * 1024;
/// The most of an unfinished record a peer can make a connection keep after the handshake, when
/// it may stay open for hours: one record, header (5 bytes) included. A TLS 1.3 record carries
/// at most 2^14 + 256 bytes (RFC 8446, 5.2: content, type, padding and tag); a TLS 1.2 one, with
/// the AEAD suites rustls offers, 2^14 + 24. rustls itself waits for up to 2^14 + 2047 (room for
/// TLS 1.2's CBC and compression, which it never negotiates), so a header announcing more than
/// this is refused here as soon as it arrives: 16,645 bytes per connection at most, not 18 KiB,
/// nor the 96 KiB a handshake may keep.
const MAX_RECORD: usize = 5 + (1 << 14) + 256;
/// Bytes of an unfinished record that start its clock again (see [`accept`]): an upload at 1 KB
/// every `--idle-timeout` (100 bytes a second by default) carries on; `--request-timeout`
/// bounds a request however it trickles in.
const RECORD_PROGRESS: usize = 1024;

thread_local! {
    /// The worker thread's scratch for reading and writing: connections of one thread are
    /// polled one at a time and never hold it across a poll.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with the thread's scratch grown to at least `size` bytes.
fn with_scratch<R>(size: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => {
            if scratch.len() < size {
                scratch.resize(size, 0);
            }
            f(&mut scratch[..size])
        }
        // Not expected (nothing here polls another connection), but never a panic.
        Err(_) => f(&mut vec![0; size]),
    })
}

/// A TLS connection over TCP, its handshake done (see [`accept`]).
pub struct TlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// What the connection could not pass on yet, boxed and only while there is some: an idle
    /// connection (boxed whole for its stream's life, with rustls's 1,088 bytes) pays a pointer
    /// for it, not 104 bytes of empty buffers and an unset clock.
    kept: Option<Box<Kept>>,
    /// The peer sent its close_notify or ended TCP: reads answer end of input.
    read_closed: bool,
    close_notify_queued: bool,
    /// How long a record may stay unfinished after the handshake (see [`accept`]).
    record_timeout: Duration,
}

/// What a [`TlsStream`] keeps between polls: each buffer is freed once empty, and the whole
/// once all are (see [`TlsStream::release_kept`]).
#[derive(Default)]
struct Kept {
    /// The start of a record (or of a handshake message spanning records) not yet whole.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader had no room for, from `plaintext_at` on.
    plaintext: Vec<u8>,
    plaintext_at: usize,
    /// Encrypted bytes the socket has not taken yet, from `outgoing_at` on: written before
    /// anything newer.
    outgoing: Vec<u8>,
    outgoing_at: usize,
    /// When the record `incoming` holds the start of must be whole: set after the handshake
    /// while `incoming` is not empty, boxed so that a connection without one pays a pointer.
    record_deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of the unfinished record kept when its clock last started.
    record_mark: usize,
}

impl Kept {
    /// Whether nothing is kept (a buffer read to its end counts as empty).
    fn is_empty(&self) -> bool {
        self.incoming.is_empty()
            && self.plaintext_at >= self.plaintext.len()
            && self.outgoing_at >= self.outgoing.len()
            && self.record_deadline.is_none()
    }
}

/// The connection's [`Kept`], made if it has none: a function of the field, not a method, so
/// that rustls's state (another field) can be borrowed at the same time.
fn kept_or_new(kept: &mut Option<Box<Kept>>) -> &mut Kept {
    kept.get_or_insert_with(Box::default)
}

/// Runs the server side of a TLS handshake on `tcp` (the caller bounds it in time). Plaintext
/// that arrives along with the client's last handshake flight is kept for the first read.
/// Afterwards a record that stays unfinished for `record_timeout` without [`RECORD_PROGRESS`]
/// more of its bytes arriving ends the connection: a client that sends part of one and then
/// nothing (or a byte now and then) would otherwise keep up to [`MAX_RECORD`] bytes for as
/// long as its stream lasts.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    record_timeout: Duration,
) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut stream = TlsStream {
        tcp,
        conn,
        kept: None,
        read_closed: false,
        close_notify_queued: false,
        record_timeout,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

fn encode_error(e: EncodeError) -> io::Error {
    io::Error::other(format!("TLS: cannot encode a handshake record: {e}"))
}

impl TlsStream {
    /// The TCP connection under the TLS.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// The protocol ALPN chose, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Frees what the connection keeps once nothing is in it.
    fn release_kept(&mut self) {
        if self.kept.as_ref().is_some_and(|k| k.is_empty()) {
            self.kept = None;
        }
    }

    /// Bytes of an unfinished record (or handshake message) kept.
    fn incoming_len(&self) -> usize {
        self.kept.as_ref().map_or(0, |k| k.incoming.len())
    }

    /// Whether encrypted bytes wait for the socket.
    fn has_outgoing(&self) -> bool {
        self.kept
            .as_ref()
            .is_some_and(|k| k.outgoing_at < k.outgoing.len())
    }

    /// Whether decrypted bytes wait for the reader.
    fn has_plaintext(&self) -> bool {
        self.kept
            .as_ref()
            .is_some_and(|k| k.plaintext_at < k.plaintext.len())
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_flush_outgoing(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                )));
            }
            ready!(self.poll_read_once(cx, &mut ReadBuf::new(&mut [])))?;
        }
    }

    /// Reads from the socket once (waiting until it has something) and processes what came,
    /// behind what was kept of an unfinished record: plaintext goes to `out`, what does not fit
    /// to `self.plaintext`; handshake and alert records answered go to `self.outgoing`.
    fn poll_read_once(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let kept = self.incoming_len();
        with_scratch(kept + READ_SIZE, |scratch| {
            if let Some(k) = &self.kept {
                scratch[..kept].copy_from_slice(&k.incoming);
            }
            let n = loop {
                match self.tcp.try_read(&mut scratch[kept..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(self.tcp.poll_read_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            };
            if n == 0 {
                self.read_closed = true;
                if kept > 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection ended in the middle of a TLS record",
                    )));
                }
                return Poll::Ready(Ok(()));
            }
            let filled = kept + n;
            let mut used = 0;
            if let Err(e) = self.process(&mut scratch[..filled], &mut used, out) {
                // rustls still points into what it had not discarded: the alert is made there.
                self.send_alert(&mut scratch[used..filled]);
                return Poll::Ready(Err(e));
            }
            let rest = &scratch[used..filled];
            if !self.conn.is_handshaking() {
                if rest.len() > MAX_RECORD || announces_too_much(rest) {
                    let why = format!("a record larger than {MAX_RECORD} bytes was started");
                    return Poll::Ready(Err(self.closing(io::ErrorKind::InvalidData, why)));
                }
                self.time_unfinished_record(rest.len(), used > 0);
            }
            if rest.is_empty() {
                if let Some(k) = &mut self.kept {
                    k.incoming = Vec::new();
                }
                self.release_kept();
            } else if rest.len() > MAX_INCOMPLETE_HANDSHAKE {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS: an unfinished record or handshake message is too large",
                )));
            } else {
                let incoming = &mut kept_or_new(&mut self.kept).incoming;
                incoming.clear();
                incoming.extend_from_slice(rest);
            }
            Poll::Ready(Ok(()))
        })
    }

    /// After the handshake, starts (or ends) the clock of the record kept unfinished (`kept`
    /// bytes of it): `new` when the bytes kept are not those of the record kept before (rustls
    /// was done with some of what it had). The clock starts again whenever
    /// [`RECORD_PROGRESS`] more bytes of the record have come: a client uploading a large
    /// body slowly in full-size records is not cut off, one that trickles a byte now and then
    /// is.
    fn time_unfinished_record(&mut self, len: usize, new: bool) {
        if len == 0 {
            if let Some(k) = &mut self.kept {
                k.record_deadline = None;
            }
            return;
        }
        let deadline = Instant::now() + self.record_timeout;
        let k = kept_or_new(&mut self.kept);
        let progressed = len >= k.record_mark + RECORD_PROGRESS;
        match &mut k.record_deadline {
            Some(sleep) if new || progressed => sleep.as_mut().reset(deadline),
            Some(_) => return,
            None => k.record_deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        k.record_mark = len;
    }

    /// `Pending` (the task woken when it passes) until the deadline of a record kept
    /// unfinished, if any; then the error that ends the connection.
    fn poll_record_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(k) = &mut self.kept else {
            return Poll::Pending;
        };
        let Some(deadline) = &mut k.record_deadline else {
            return Poll::Pending;
        };
        ready!(deadline.as_mut().poll(cx));
        k.record_deadline = None;
        self.read_closed = true;
        let why = format!("a record unfinished for {:?}", self.record_timeout);
        Poll::Ready(Err(self.closing(io::ErrorKind::TimedOut, why)))
    }

    /// Logs why the hub closes the connection (a peer misbehaving after its handshake) and
    /// returns the error that closes it.
    fn closing(&self, kind: io::ErrorKind, why: String) -> io::Error {
        match self.tcp.peer_addr() {
            Ok(peer) => tracing::info!(%peer, "closing a TLS connection: {why}"),
            Err(_) => tracing::info!("closing a TLS connection: {why}"),
        }
        io::Error::new(kind, format!("TLS: {why}"))
    }

    /// Feeds `data` to rustls until it needs more; `used` says how many bytes of `data` are
    /// done with (the rest is the start of a record or handshake message still arriving, which
    /// rustls may have rearranged in place and expects back, first, at its next call).
    fn process(
        &mut self,
        data: &mut [u8],
        used: &mut usize,
        out: &mut ReadBuf<'_>,
    ) -> io::Result<()> {
        loop {
            let status = self.conn.process_tls_records(&mut data[*used..]);
            let mut discard = status.discard;
            match status.state.map_err(tls_error)? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        let n = record.payload.len().min(out.remaining());
                        out.put_slice(&record.payload[..n]);
                        if n < record.payload.len() {
                            kept_or_new(&mut self.kept)
                                .plaintext
                                .extend_from_slice(&record.payload[n..]);
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut kept_or_new(&mut self.kept).outgoing, |buf| {
                        encode.encode(buf)
                    })
                    .map_err(encode_error)?;
                }
                // The encoded bytes wait in `outgoing`, which goes out before anything newer.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    *used += discard;
                    return Ok(());
                }
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    self.read_closed = true;
                    *used += discard;
                    return Ok(());
                }
                // No early data is accepted (the configuration's default), so none comes.
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: unexpected state {other:?}"),
                    ))
                }
            }
            *used += discard;
        }
    }

    /// After an error rustls has an alert to say why: sent if the socket takes it now, for the
    /// peer to see (the connection is over either way). `pending` is what rustls had not
    /// discarded when it failed.
    fn send_alert(&mut self, pending: &mut [u8]) {
        // Asked once: asked again, rustls would read `pending` again, fail again and find its
        // fatal alert sent already (an assertion in rustls).
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) =
            self.conn.process_tls_records(pending).state
        {
            let _ = encode_into(&mut kept_or_new(&mut self.kept).outgoing, |buf| {
                encode.encode(buf)
            });
        }
        if let Some(k) = &mut self.kept {
            let _ = self.tcp.try_write(&k.outgoing[k.outgoing_at..]);
            k.outgoing = Vec::new();
            k.outgoing_at = 0;
        }
        self.release_kept();
    }

    /// Writes what is kept in `outgoing`; `Ready` once all of it is out.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(k) = &mut self.kept else {
            return Poll::Ready(Ok(()));
        };
        while k.outgoing_at < k.outgoing.len() {
            match self.tcp.try_write(&k.outgoing[k.outgoing_at..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => k.outgoing_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.tcp.poll_write_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        if k.outgoing.capacity() > 0 {
            k.outgoing = Vec::new();
            k.outgoing_at = 0;
        }
        self.release_kept();
        Poll::Ready(Ok(()))
    }

    /// Brings rustls to the state where it encrypts, encoding into `outgoing` whatever it has
    /// to send first (a key update, session tickets), and runs `f` there.
    fn with_write_traffic<R>(
        &mut self,
        f: impl FnOnce(
            &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
        ) -> R,
    ) -> io::Result<R> {
        let mut f = Some(f);
        loop {
            // rustls is given back what it had not discarded (the start of a handshake message
            // spread over records, a key update or renegotiation in the middle of a stream): it
            // keeps offsets into those bytes, and an empty buffer would not hold them. What it
            // encodes goes to `outgoing`, or to `encoded` when nothing is kept yet (then kept
            // once rustls lets go of `incoming`).
            let mut encoded = Vec::new();
            let (incoming, outgoing): (&mut [u8], &mut Vec<u8>) = match self.kept.as_deref_mut() {
                Some(Kept {
                    incoming, outgoing, ..
                }) => (incoming, outgoing),
                None => (&mut [], &mut encoded),
            };
            let status = self.conn.process_tls_records(incoming);
            let discard = status.discard;
            let mut done = None;
            match status.state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    done = f.take().map(|f| f(&mut traffic));
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(outgoing, |buf| encode.encode(buf)).map_err(encode_error)?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::PeerClosed => self.read_closed = true,
                ConnectionState::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "TLS: the session is closed",
                    ))
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: cannot send in state {other:?}"),
                    ))
                }
            }
            if !encoded.is_empty() {
                kept_or_new(&mut self.kept).outgoing = encoded;
            }
            if let Some(k) = &mut self.kept {
                k.incoming.drain(..discard);
                if k.incoming.is_empty() && k.incoming.capacity() > 0 {
                    k.incoming = Vec::new();
                    k.record_deadline = None;
                }
            }
            self.release_kept();
            if let Some(done) = done {
                return Ok(done);
            }
        }
    }

    /// Encrypts `plain` and writes it: at once to the socket when nothing is kept before it,
    /// the rest into `outgoing`.
    fn send(&mut self, plain: &[u8], sealed: &mut [u8]) -> io::Result<()> {
        let len = match self.with_write_traffic(|w| w.encrypt(plain, sealed))? {
            Ok(len) => len,
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                // Not expected with RECORD_OVERHEAD's margin: encrypt into a buffer that fits.
                let mut bigger = vec![0; required_size];
                let len = self
                    .with_write_traffic(|w| w.encrypt(plain, &mut bigger))?
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
                self.keep_or_write(&bigger[..len])?;
                return Ok(());
            }
            Err(e) => return Err(io::Error::other(format!("TLS: {e}"))),
        };
        self.keep_or_write(&sealed[..len])
    }

    fn keep_or_write(&mut self, mut sealed: &[u8]) -> io::Result<()> {
        if !self.has_outgoing() {
            while !sealed.is_empty() {
                match self.tcp.try_write(sealed) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => sealed = &sealed[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        if !sealed.is_empty() {
            kept_or_new(&mut self.kept)
                .outgoing
                .extend_from_slice(sealed);
        }
        Ok(())
    }
}

/// Whether `kept`, what is kept of an unfinished record after the handshake, starts with a
/// record header (recognised by its type and version) announcing more than [`MAX_RECORD`].
/// What starts otherwise (a handshake message rustls is joining from several records, a key
/// update in pieces) is bounded by its length alone.
fn announces_too_much(kept: &[u8]) -> bool {
    match kept {
        // Types 20 to 23, and 24 (heartbeat), which rustls reads as a record too.
        [20..=24, 3, _, high, low, ..] => {
            5 + usize::from(u16::from_be_bytes([*high, *low])) > MAX_RECORD
        }
        _ => false,
    }
}

/// Encodes a handshake record at the end of `outgoing`, grown to the size it needs.
fn encode_into(
    outgoing: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), EncodeError> {
    let start = outgoing.len();
    let needed = match encode(&mut []) {
        // Nothing to encode (or, impossibly, encoded into no room): nothing more to do.
        Ok(_) => return Ok(()),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            required_size
        }
        Err(e) => return Err(e),
    };
    outgoing.resize(start + needed, 0);
    match encode(&mut outgoing[start..]) {
        Ok(n) => {
            outgoing.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            outgoing.truncate(start);
            Err(e)
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(k) = this
            .kept
            .as_deref_mut()
            .filter(|k| k.plaintext_at < k.plaintext.len())
        {
            let rest = &k.plaintext[k.plaintext_at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            k.plaintext_at += n;
            if k.plaintext_at == k.plaintext.len() {
                k.plaintext = Vec::new();
                k.plaintext_at = 0;
                this.release_kept();
            }
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        loop {
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.poll_read_once(cx, buf) {
                Poll::Ready(read) => read?,
                Poll::Pending => return this.poll_record_deadline(cx),
            }
            // What reading made rustls answer (a renegotiation refused) goes out now if the
            // socket takes it; if not, the next write or flush sends it first. Its own key
            // update, answering the client's, rustls gives only at the next write.
            if this.has_outgoing() {
                if let Poll::Ready(Err(e)) = this.poll_flush_outgoing(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            if buf.filled().len() > before || this.has_plaintext() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// The slices are encrypted together (up to [`WRITE_SIZE`]), so a chunk's size line, its
    /// events and its end make one record, not three.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_flush_outgoing(cx))?;
        let total = bufs.iter().map(|b| b.len()).sum::<usize>().min(WRITE_SIZE);
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        let sealed_size = total + (total / 16384 + 1) * RECORD_OVERHEAD;
        let single = bufs
            .iter()
            .find(|b| !b.is_empty())
            .filter(|b| b.len() >= total);
        let sent = match single {
            Some(only) => with_scratch(sealed_size, |sealed| this.send(&only[..total], sealed)),
            None => with_scratch(total + sealed_size, |scratch| {
                let (plain, sealed) = scratch.split_at_mut(total);
                let mut at = 0;
                for b in bufs {
                    let n = b.len().min(total - at);
                    plain[at..at + n].copy_from_slice(&b[..n]);
                    at += n;
                }
                this.send(plain, sealed)
            }),
        };
        sent?;
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_outgoing(cx)
    }

    /// Sends close_notify, then ends TCP's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_outgoing(cx))?;
        if !this.close_notify_queued {
            this.close_notify_queued = true;
            let mut alert = [0u8; RECORD_OVERHEAD];
            let len = this
                .with_write_traffic(|w| w.queue_close_notify(&mut alert))?
                .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            kept_or_new(&mut this.kept)
                .outgoing
                .extend_from_slice(&alert[..len]);
            ready!(this.poll_flush_outgoing(cx))?;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server configuration with a new self-signed certificate for 127.0.0.1, and a client
    /// configuration trusting it.
    pub(crate) fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let cert = c.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(c.signing_key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// An idle connection keeps its rustls state and the socket, nothing more: what is kept
    /// between polls (plaintext the reader had no room for, here) is freed once passed on.
    #[tokio::test]
    async fn an_idle_connection_keeps_only_its_tls_state() {
        let inline = size_of::<TlsStream>();
        let floor = size_of::<UnbufferedServerConnection>() + size_of::<TcpStream>();
        assert!(
            inline <= floor + 32,
            "{inline} bytes, rustls and the socket {floor}"
        );

        let (server, client) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .unwrap();
            tls.write_all(b"hello").await.unwrap();
            let mut answer = [0u8; 5];
            tls.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"world");
            tls
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = accept(tcp, server, Duration::from_secs(10)).await.unwrap();
        let mut start = [0u8; 2];
        stream.read_exact(&mut start).await.unwrap();
        assert_eq!(&start, b"he");
        assert!(
            stream.kept.is_some(),
            "the rest of the record is kept for the reader"
        );
        let mut rest = [0u8; 3];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"llo");
        assert!(stream.kept.is_none(), "nothing kept once read");
        stream.write_all(b"world").await.unwrap();
        stream.flush().await.unwrap();
        assert!(stream.kept.is_none(), "nothing kept once written");
        let _open = peer.await.unwrap();
    }

    /// A blocking rustls client on its own thread, its handshake done with `addr`.
    fn blocking_client(
        addr: std::net::SocketAddr,
        client: Arc<rustls::ClientConfig>,
    ) -> (rustls::ClientConnection, std::net::TcpStream) {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        (conn, tcp)
    }

    /// The start of a record is kept with its clock (the box made for it), the
    /// reader's wait may be cancelled without losing it, the record made whole is read whole
    /// and the box freed; a record left unfinished then ends the connection at its deadline.
    #[tokio::test]
    async fn an_unfinished_record_is_kept_with_its_clock_and_freed_once_whole() {
        use std::io::Write as _;
        let (server, client) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut conn, mut tcp) = blocking_client(addr, client);
            let mut record = Vec::new();
            conn.writer().write_all(b"hello").unwrap();
            conn.write_tls(&mut record).unwrap();
            tcp.write_all(&record[..10]).unwrap();
            go_rx.recv().unwrap();
            tcp.write_all(&record[10..]).unwrap();
            // The start of another record, never finished.
            let mut second = Vec::new();
            conn.writer().write_all(b"again").unwrap();
            conn.write_tls(&mut second).unwrap();
            tcp.write_all(&second[..3]).unwrap();
            go_rx.recv().unwrap();
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let timeout = Duration::from_secs(2);
        let mut stream = accept(tcp, server, timeout).await.unwrap();
        let mut buf = [0u8; 64];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing to read from part of a record");
        assert_eq!(stream.incoming_len(), 10, "the start of the record is kept");
        assert!(stream.kept.as_ref().unwrap().record_deadline.is_some());
        go_tx.send(()).unwrap();
        let n = stream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hello");
        // The second record's start may have come with the first's end, or after it.
        let started = Instant::now();
        let err = match stream.read(&mut buf).await {
            Ok(n) => panic!("read {n} bytes of an unfinished record"),
            Err(e) => e,
        };
        let took = started.elapsed();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
            "the unfinished record's deadline fired after {took:?}"
        );
        go_tx.send(()).unwrap();
        drop(peer.join().unwrap());
    }

    /// Encrypted bytes the socket does not take are kept (the box made for them)
    /// and go out before anything newer: a client that stops reading, then reads everything,
    /// gets every byte in order and the close_notify; nothing is kept once flushed.
    #[tokio::test]
    async fn writes_the_socket_cannot_take_are_kept_in_order_then_freed() {
        use std::io::Read as _;
        let (server, client) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let (mut conn, mut tcp) = blocking_client(addr, client);
            go_rx.recv().unwrap();
            let mut got = Vec::new();
            let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
            stream.read_to_end(&mut got).unwrap();
            got
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = accept(tcp, server, Duration::from_secs(10)).await.unwrap();
        // Numbered bytes, in writes of odd sizes, so that a cut, a repeat or a swap shows.
        let mut sent: Vec<u8> = Vec::new();
        let mut next = 0u32;
        let mut piece = |len: usize| {
            let mut p = Vec::with_capacity(len);
            while p.len() < len {
                p.extend_from_slice(format!("{next:08} ").as_bytes());
                next += 1;
            }
            p.truncate(len);
            p
        };
        let mut full = false;
        for round in 0..10_000 {
            let chunk = piece(7_001 + round % 13);
            match tokio::time::timeout(Duration::from_millis(200), stream.write(&chunk)).await {
                Ok(n) => sent.extend_from_slice(&chunk[..n.unwrap()]),
                Err(_) => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "the socket never filled");
        assert!(
            stream.has_outgoing(),
            "what the socket did not take is kept"
        );
        go_tx.send(()).unwrap();
        stream.flush().await.unwrap();
        assert!(stream.kept.is_none(), "nothing kept once flushed");
        for round in 0..50 {
            let chunk = piece(3_000 + round);
            stream.write_all(&chunk).await.unwrap();
            sent.extend_from_slice(&chunk);
        }
        stream.shutdown().await.unwrap();
        assert!(stream.kept.is_none(), "nothing kept once shut down");
        let got = peer.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes differ");
    }

    /// A request sent right behind the client's Finished is kept from the handshake
    /// for the first read, read whole, and the box freed.
    #[tokio::test]
    async fn plaintext_behind_the_handshake_is_read_whole() {
        use std::io::Write as _;
        let (server, client) = configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request = b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nhost: x\r\n\r\n".repeat(300);
        let expected = request.clone();
        let peer = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut conn = rustls::ClientConnection::new(client, name).unwrap();
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            // Flight by flight, and the request queued before the client's last flight goes.
            while conn.is_handshaking() {
                if conn.wants_write() {
                    conn.write_tls(&mut tcp).unwrap();
                } else {
                    conn.read_tls(&mut tcp).unwrap();
                    conn.process_new_packets().unwrap();
                }
                if !conn.is_handshaking() {
                    conn.writer().write_all(&request).unwrap();
                }
            }
            conn.writer().write_all(b"").unwrap();
            let mut all = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut all).unwrap();
            }
            tcp.write_all(&all).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            tcp
        });
        let (tcp, _) = listener.accept().await.unwrap();
        // The client's Finished and the request arrive together.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut stream = accept(tcp, server, Duration::from_secs(10)).await.unwrap();
        let mut got = vec![0u8; expected.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 100).min(got.len());
            let read =
                tokio::time::timeout(Duration::from_secs(10), stream.read(&mut got[at..end]));
            let n = read.await.expect("the rest of the request").unwrap();
            assert!(n > 0, "ended after {at} bytes");
            at += n;
        }
        assert!(got == expected, "the request differs");
        assert!(stream.kept.is_none(), "nothing kept once read");
        drop(peer.join().unwrap());
    }

    #[test]
    fn a_record_header_announcing_more_than_a_record_is_found() {
        // No length yet, then TLS 1.3's largest record (2^14 + 256), then a byte more.
        assert!(!announces_too_much(&[0x17, 0x03, 0x03]));
        assert!(!announces_too_much(&[0x17, 0x03, 0x03, 0x41, 0x00]));
        assert!(announces_too_much(&[0x17, 0x03, 0x03, 0x41, 0x01, 0]));
        assert!(announces_too_much(&[0x15, 0x03, 0x01, 0xff, 0xff]));
        // A heartbeat record's header is one too; the start of a handshake message rustls is
        // joining from records (a key update, type 24, 3 bytes of length) is no header: its
        // length alone bounds it.
        assert!(announces_too_much(&[0x18, 0x03, 0x03, 0xff, 0xff]));
        assert!(!announces_too_much(&[0x18, 0x00, 0x00, 0x01, 0x00]));
    }
}
