//! The server's own HTTP/1.1 writer for event streams.
//!
//! Most of a hub's connections are subscribers that send one `GET` and then only receive. Served
//! through hyper, each keeps a read buffer (~16 KiB), a write buffer (~8 KiB) and a large
//! connection future for as long as it is open, which made an idle subscriber cost ~20 KiB of
//! server memory; and every update passes through hyper's body polling and chunk encoder.
//!
//! So the first request head of a connection is read here. When it is a `GET` for an event
//! stream, it is routed through the same axum router as everything else (same checks, same
//! headers, CORS included), the handler leaves the subscriber's stream in the connection's
//! [`StreamSlot`], and a small task writes the response head and the chunks straight to the
//! socket: one vectored write per wake-up, nothing buffered but what the hub already shares.
//! A plain publish is answered by [`publish`]'s path. Any other request, or anything
//! unusual about these, goes to hyper with the bytes already read put back in front of the
//! connection, so hyper answers it as it always did.
//!
//! Over plain TCP the socket is shared with the hub ([`DirectTcp`]): while the stream's task
//! waits with nothing in flight, a publishing thread may write an update to it directly, and
//! the task only writes what that left over (see `hub::subscriber`).

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, Method, Request, Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::http::{StreamSlot, MERCURE_PATH};
use crate::hub::{DirectSink, SubscriberStream, Wire};

pub mod publish;

/// Most header lines in a request head this writer takes; hyper gets the rest.
const MAX_HEADERS: usize = 64;
/// Bytes a subscriber may send after its request before it is taken as misbehaving (clients
/// send nothing on an event stream; this bounds the work one that does can cause).
const MAX_STRAY_INPUT: usize = 64 * 1024;
/// How long writing a whole answer may take.
const ANSWER_WRITE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the last writes of a stream the hub has ended may take.
const LAST_WRITES: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request head, until its blank line, `limit` bytes, the end of input or `deadline`,
/// continuing from `buf`, which may already hold its start (the first bytes of a connection,
/// read to tell its protocol, or what a client sent right after its previous request). Returns
/// what was read, or `None` when nothing usable came in time.
///
/// Only the bytes new since the last read are searched for the blank line that ends the head
/// (as hyper does): a client trickling a long head a byte at a time costs work in proportion
/// to the head, not to its square.
pub async fn read_more_head<S: AsyncRead + Unpin>(
    io: &mut S,
    mut buf: BytesMut,
    deadline: Instant,
    limit: usize,
) -> Option<BytesMut> {
    use tokio::io::AsyncReadExt as _;
    let mut scan = HeadScan::default();
    loop {
        if buf.len() >= limit || scan.complete(&buf) {
            return Some(buf);
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(buf.capacity().max(1024).min(limit));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return (!buf.is_empty()).then_some(buf),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// How far a request head being read has been looked at.
#[derive(Default)]
struct HeadScan {
    /// Whether httparse has had its one look at the start of the head.
    parsed: bool,
    /// Bytes already searched for the head's end.
    scanned: usize,
    /// Where the request line starts, once a byte other than the empty lines httparse skips
    /// before it has come.
    start: Option<usize>,
}

impl HeadScan {
    /// Has the head ended (or gone wrong, which hyper then answers)? httparse decides on the
    /// first bytes, so that garbage is answered at once; after that only the new bytes are
    /// searched for a blank line, a bare LF one included (httparse takes both, as for hyper).
    /// More header lines than this writer takes do not end the head: hyper reads the rest
    /// within the same deadline, not a fresh one of its own.
    fn complete(&mut self, buf: &[u8]) -> bool {
        if buf.is_empty() {
            return false;
        }
        let ended = self.blank_line(buf);
        if std::mem::replace(&mut self.parsed, true) {
            return ended;
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        ended
            || !matches!(
                httparse::Request::new(&mut headers).parse(buf),
                Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders)
            )
    }

    /// Is there a blank line (`\n\n` or `\n\r\n`) after the request line's start, among
    /// the bytes since the last call and the two before them?
    fn blank_line(&mut self, buf: &[u8]) -> bool {
        let from = self.scanned;
        self.scanned = buf.len();
        let start = match self.start {
            Some(s) => s,
            None => match buf[from..].iter().position(|b| !matches!(b, b'\r' | b'\n')) {
                Some(i) => *self.start.insert(from + i),
                None => return false,
            },
        };
        let bytes = &buf[from.saturating_sub(2).max(start)..];
        bytes.iter().enumerate().any(|(i, &b)| {
            b == b'\n' && matches!(&bytes[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..])
        })
    }
}

/// Why a request head that has ended is not one HTTP/1.1 can read, in a line for the client
/// (hyper answers such a head `400` with an empty body), or `None` when it parses (or has not
/// ended: hyper reads the rest, or refuses it as too large).
pub fn malformed_head(buf: &[u8]) -> Option<&'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => None,
        Ok(httparse::Status::Complete(_)) => {
            let target = parsed.path.unwrap_or_default();
            target.parse::<http::Uri>().is_err().then_some(
                "the request target is not a valid URL: encode spaces and other special \
                 characters in it (a space as %20)",
            )
        }
        Err(httparse::Error::Token | httparse::Error::Version) => Some(
            "malformed request line: send METHOD TARGET HTTP/1.1, with any space in the \
             target encoded as %20",
        ),
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            Some("malformed header line: send each header as Name: value, on a line of its own")
        }
        Err(_) => Some("malformed request head: send an HTTP/1.1 request"),
    }
}

/// Is this head a plain `GET` of an event stream that the lean writer can serve? Returns the
/// request to route and whether the client asked for the connection to be closed after it, or
/// `None` to leave the connection to hyper.
pub fn stream_request(buf: &[u8], max_head: usize) -> Option<(Request<axum::body::Body>, bool)> {
    let head = plain_head(buf, max_head, Method::GET, |path| {
        matches!(path, MERCURE_PATH | "/events" | "/events/")
    })?;
    // A body is unusual for an event stream; hyper knows what to do with one.
    if head.content_length.is_some_and(|n| n > 0) {
        return None;
    }
    let request = head.request.body(axum::body::Body::empty()).ok()?;
    Some((request, head.close))
}

/// A request head's size as the hub limits it, whichever path reads it: the target's length,
/// plus each header's name and value and 4 bytes (`": "` and CRLF). Counted on the parsed
/// head, so that it does not depend on the line endings or spaces a client chose, nor on
/// whether the head came with its body.
pub fn head_size<'a>(uri: &http::Uri, headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> usize {
    /// Counts what `Display` writes, without keeping it.
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut uri_len = Count(0);
    let _ = std::fmt::Write::write_fmt(&mut uri_len, format_args!("{uri}"));
    uri_len.0 + headers.map(|(k, v)| k.len() + v.len() + 4).sum::<usize>()
}

/// A request head this module's paths may serve, parsed.
pub struct PlainHead {
    /// The request, headers included, without its body.
    pub request: http::request::Builder,
    /// The head's length in bytes, blank line included.
    pub len: usize,
    /// Its `Content-Length`, if it has one.
    pub content_length: Option<usize>,
    /// Whether the client asked for the connection to be closed after the answer.
    pub close: bool,
}

/// Parses an HTTP/1.1 head for `method` on a path `path_ok` accepts, or returns `None` for
/// anything hyper should answer instead: another method, path or version, a partial or
/// malformed head, a chunked body, an upgrade, an expectation, a doubtful `Content-Length`, a
/// head over `max_head` by [`head_size`] (refused by the server's `oversized_head`, as it would
/// be had it come in pieces) or by its length in bytes.
pub fn plain_head(
    buf: &[u8],
    max_head: usize,
    method: Method,
    path_ok: impl Fn(&str) -> bool,
) -> Option<PlainHead> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(buf).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    if len > max_head || parsed.method != Some(method.as_str()) || parsed.version != Some(1) {
        return None;
    }
    let target = parsed.path?;
    if !path_ok(target.split('?').next().unwrap_or("")) {
        return None;
    }
    // httparse takes some bytes in a target that `http::Uri` refuses: hyper answers those.
    let uri: http::Uri = target.parse().ok()?;
    let headers = parsed.headers.iter().map(|h| (h.name, h.value));
    if head_size(&uri, headers) > max_head {
        return None;
    }
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .version(Version::HTTP_11);
    let (mut content_length, mut close) = (None, false);
    for h in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        if name == header::CONTENT_LENGTH {
            // Only plain digits, given once: anything else is hyper's to refuse.
            let digits = h.value.len() <= 18 && h.value.iter().all(u8::is_ascii_digit);
            if content_length.is_some() || h.value.is_empty() || !digits {
                return None;
            }
            content_length = std::str::from_utf8(h.value).ok()?.parse().ok();
        }
        if name == header::CONNECTION {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        request = request.header(name, http::HeaderValue::from_bytes(h.value).ok()?);
    }
    Some(PlainHead {
        request,
        len,
        content_length,
        close,
    })
}

/// A connection an event stream can be written to by this module.
pub trait StreamIo: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// What the stream's task writes to.
    type Pumped: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The connection for the stream's task, and a sink for direct writes if the connection
    /// allows them.
    fn into_pumped(self) -> (Self::Pumped, Option<Arc<dyn DirectSink>>);

    /// Whether the client has closed the connection (or reset it) with nothing left unread
    /// on its TCP socket, as the kernel knows now. Reading cannot tell: after a read that
    /// left the socket empty, tokio answers the next one "nothing yet" without asking the
    /// kernel until the socket signals again, and an end of input that came before that read
    /// signals nothing more.
    fn peer_closed(&self) -> bool;
}

impl StreamIo for tokio::net::TcpStream {
    type Pumped = SharedTcp;

    fn into_pumped(self) -> (SharedTcp, Option<Arc<dyn DirectSink>>) {
        let socket = Arc::new(self);
        (SharedTcp(socket.clone()), Some(Arc::new(DirectTcp(socket))))
    }

    fn peer_closed(&self) -> bool {
        tcp_peer_closed(self)
    }
}

/// TLS keeps its session state on one side: only the stream's task writes.
impl StreamIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    type Pumped = Self;

    fn into_pumped(self) -> (Self, Option<Arc<dyn DirectSink>>) {
        (self, None)
    }

    /// A TLS client's `close_notify` before its TCP end is data to TCP: seen only once
    /// rustls has read it.
    fn peer_closed(&self) -> bool {
        tcp_peer_closed(self.get_ref().0)
    }
}

/// Peeks at a TCP socket without waiting: an end of input with nothing before it, or an
/// error (a reset), is a peer that closed.
fn tcp_peer_closed(tcp: &tokio::net::TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(tcp).peek(&mut byte) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

/// A TCP connection shared by a stream's task and the hub's direct writes. tokio's socket
/// takes reads and writes through `&self`; this gives the task the usual traits over it.
pub struct SharedTcp(Arc<tokio::net::TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let sock = socket2::SockRef::from(&*self.0);
        match sock.shutdown(std::net::Shutdown::Write) {
            // Already closed by the peer: nothing left to shut.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

/// Direct writes to a plain TCP stream: one chunk per update, written without waiting.
pub struct DirectTcp(Arc<tokio::net::TcpStream>);

impl DirectSink for DirectTcp {
    fn try_send(&self, payload: &[u8]) -> Option<Bytes> {
        let mut size = [0u8; 18];
        let size = chunk_size_line(payload.len(), &mut size);
        let parts: [&[u8]; 3] = [size, payload, b"\r\n"];
        let total = size.len() + payload.len() + 2;
        let mut written = 0;
        while written < total {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = remaining(&parts, written, &mut slices);
            match self.0.try_write_vectored(&slices[..n]) {
                Ok(k) if k > 0 => written += k,
                // Full, or failed: the stream's task writes the rest when it can, or finds
                // the connection gone and ends the stream.
                _ => break,
            }
        }
        if written == total {
            return None;
        }
        let mut rest = BytesMut::with_capacity(total - written);
        let mut slices = [IoSlice::new(&[]); 4];
        let n = remaining(&parts, written, &mut slices);
        for s in &slices[..n] {
            rest.extend_from_slice(s);
        }
        Some(rest.freeze())
    }
}

/// Writes the router's answer to a stream request: the stream itself when the handler accepted
/// the subscriber, or the refusal, after which the connection is closed.
///
/// The connection is not used for another request after a stream, which ends by closing it;
/// with `close` (the client's `Connection: close`) the stream's head says so, as hyper's would.
/// The connection's `permit` (its place in the connection budget) goes with the stream.
pub async fn respond<S: StreamIo>(
    mut io: S,
    response: Response<axum::body::Body>,
    close: bool,
    slot: &StreamSlot,
    peer: SocketAddr,
    streams: &tokio_util::task::TaskTracker,
    permit: crate::server::budget::Permit,
) {
    // The response's body counts the request as under way until it is dropped here; the
    // stream counts the connection as busy for as long as it lasts.
    let mut busy = permit.requests().begin();
    busy.is_stream();
    let taken = slot.lock().take();
    let Some((stream, path)) = taken else {
        answer(&mut io, response, true).await;
        return;
    };
    let (parts, _) = response.into_parts();
    let mut head = response_head(parts.status, &parts.headers);
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    }
    head.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    let (io, sink) = io.into_pumped();
    if let Some(sink) = sink {
        stream.attach_sink(sink);
    }
    // The stream gets a task of its own, holding only what it needs: the routing above ran
    // on a much larger future that can now be freed.
    streams.spawn(async move {
        pump(io, head, stream, path, peer).await;
        drop(busy);
        drop(permit);
    });
}

/// Writes a whole (not streamed) response with its `content-length`. With `close`, says so in
/// the head and then shuts the connection's sending side. Returns whether everything was
/// written and the connection may carry another request.
pub async fn answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    response: Response<axum::body::Body>,
    close: bool,
) -> bool {
    let (parts, body) = response.into_parts();
    // The router's answers other than streams are short texts and JSON documents.
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut head = response_head(parts.status, &parts.headers);
    head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    head.extend_from_slice(if close {
        b"connection: close\r\n\r\n"
    } else {
        b"\r\n"
    });
    // A client that sends requests but does not read the answers gets this long before its
    // connection is closed.
    let parts = [&head[..], &body[..]];
    let write = write_all(io, &parts, None);
    let written = matches!(tokio::time::timeout(ANSWER_WRITE, write).await, Ok(Ok(())));
    if close {
        let _ = tokio::io::AsyncWriteExt::shutdown(io).await;
    }
    written && !close
}

/// The status line and the headers of a response, with a `date`, without the blank line.
fn response_head(status: StatusCode, headers: &http::HeaderMap) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    http_date(|date| head.extend_from_slice(date));
    head.extend_from_slice(b"\r\n");
    head
}

/// Hands `f` the current time as an HTTP date (`Tue, 01 Dec 2026 12:00:00 GMT`), formatted at
/// most once a second per thread: every publish's answer carries one, and formatting it each
/// time was 1.5-2 % of the hub's CPU in the many-topics benchmark (hyper caches it the same way).
fn http_date(f: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with_borrow_mut(|(second, text)| {
        if *second != now {
            *second = now;
            *text = chrono::DateTime::from_timestamp(now as i64, 0)
                .unwrap_or_default()
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
        }
        f(text.as_bytes());
    });
}

/// Why a stream's connection ended.
enum End {
    /// The hub ended the stream (shutdown, token expiry); the closing chunk is sent.
    Finished,
    /// The hub dropped the subscriber (too slow): close at once.
    Dropped,
    /// The client closed its side, or the connection failed.
    Gone,
    /// The client kept sending on a connection that only receives.
    Stray,
}

/// Writes the head, then every chunk the stream yields, until the stream or the connection
/// ends.
async fn pump<S>(
    mut io: S,
    head: Vec<u8>,
    mut stream: SubscriberStream,
    path: &'static str,
    peer: SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let subscriber = stream.subscriber_id();
    let mut head = Some(head);
    let mut stray = 0usize;
    let end = loop {
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(wire) = stream.poll_wire(cx) {
                return Poll::Ready(wire.ok_or(End::Finished));
            }
            // A client never speaks on an event stream; reading is how its leaving is seen.
            // While nothing arrives this costs no system call: tokio knows the socket is idle.
            match poll_discard(&mut io, cx, &mut stray) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        if matches!(&next, Ok(Wire::Data(chunk) | Wire::Framed(chunk)) if chunk.is_empty()) {
            // An empty chunk would read as the end of the body.
            continue;
        }
        let head_bytes = head.take().unwrap_or_default();
        // Once the hub has ended the stream (shutdown, token expiry) the subscriber can no
        // longer be dropped as slow, so what is left to write gets a deadline instead.
        let deadline = stream.ending().then(|| Instant::now() + LAST_WRITES);
        let written = match &next {
            Ok(Wire::Data(chunk)) => {
                let mut size = [0u8; 18];
                let size = chunk_size_line(chunk.len(), &mut size);
                let parts: [&[u8]; 4] = [&head_bytes, size, chunk, b"\r\n"];
                within(deadline, write_all(&mut io, &parts, Some(&mut stream))).await
            }
            Ok(Wire::Framed(framed)) => {
                let parts: [&[u8]; 2] = [&head_bytes, framed];
                within(deadline, write_all(&mut io, &parts, Some(&mut stream))).await
            }
            // Dropped for being too slow: its socket is full, so close without a last word.
            Err(End::Finished) if stream.dropped_as_slow() => Err(End::Dropped),
            Err(End::Finished) => {
                let parts: [&[u8]; 2] = [&head_bytes, b"0\r\n\r\n"];
                within(deadline, write_all(&mut io, &parts, Some(&mut stream))).await
            }
            Err(_) => Ok(()),
        };
        match (next, written) {
            (Ok(_), Ok(())) => {}
            (Err(End::Finished), Ok(())) => {
                let shutdown = tokio::io::AsyncWriteExt::shutdown(&mut io);
                let _ = tokio::time::timeout(LAST_WRITES, shutdown).await;
                break End::Finished;
            }
            (_, Err(e)) | (Err(e), Ok(())) => break e,
        }
    };
    match end {
        End::Finished | End::Dropped => {}
        End::Gone => tracing::debug!(%peer, subscriber, "client closed its event stream"),
        End::Stray => tracing::info!(
            %peer,
            subscriber,
            "closing an event stream whose client kept sending data"
        ),
    }
    drop(stream);
    tracing::info!(subscriber, "Finished HTTP request at {path}");
}

/// `write` bounded by `deadline`, if any; past it the connection is taken as gone.
async fn within(
    deadline: Option<Instant>,
    write: impl std::future::Future<Output = Result<(), End>>,
) -> Result<(), End> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, write)
            .await
            .unwrap_or(Err(End::Gone)),
        None => write.await,
    }
}

/// Reads and throws away whatever the client sends. `Ready` when the connection is over.
fn poll_discard<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    stray: &mut usize,
) -> Poll<End> {
    let mut scratch = [0u8; 256];
    loop {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(End::Gone),
            Poll::Ready(Ok(())) => {
                *stray += buf.filled().len();
                if *stray > MAX_STRAY_INPUT {
                    return Poll::Ready(End::Stray);
                }
            }
            Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// `{len:x}\r\n` into `buf`, without allocating.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    let count = digits.len() - i;
    buf[..count].copy_from_slice(&digits[i..]);
    buf[count] = b'\r';
    buf[count + 1] = b'\n';
    &buf[..count + 2]
}

/// Writes every byte of `parts` with vectored writes, giving up with [`End::Dropped`] as soon
/// as the hub drops `stream`'s subscriber (one dropped while its socket is full would otherwise
/// wait here forever).
async fn write_all<S: AsyncWrite + Unpin>(
    io: &mut S,
    parts: &[&[u8]],
    mut stream: Option<&mut SubscriberStream>,
) -> Result<(), End> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    std::future::poll_fn(|cx| {
        // Checked on every poll, the flush included: a TLS stream takes a whole chunk into its
        // own buffer and then waits in the flush when the socket is full.
        if stream.as_mut().is_some_and(|s| s.poll_dropped(cx)) {
            return Poll::Ready(Err(End::Dropped));
        }
        while written < total {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = remaining(parts, written, &mut slices);
            match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(End::Gone)),
                Poll::Ready(Ok(k)) => written += k,
                Poll::Pending => return Poll::Pending,
            }
        }
        match Pin::new(&mut *io).poll_flush(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(_)) => Poll::Ready(Err(End::Gone)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The parts of `parts` after the first `skip` bytes, as at most four slices.
fn remaining<'a>(parts: &[&'a [u8]], mut skip: usize, out: &mut [IoSlice<'a>; 4]) -> usize {
    let mut n = 0;
    for part in parts {
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        if n == out.len() {
            break;
        }
        out[n] = IoSlice::new(&part[skip..]);
        skip = 0;
        n += 1;
    }
    n
}

/// A connection with the bytes already read from it put back in front, for hyper.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Shared handle the server uses to create a slot per stream request.
pub fn new_slot() -> StreamSlot {
    Arc::new(parking_lot::Mutex::new(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_is_now_in_rfc_7231_form() {
        let mut got = String::new();
        http_date(|d| got = String::from_utf8(d.to_vec()).unwrap());
        let parsed = chrono::DateTime::parse_from_rfc2822(&got.replace("GMT", "+0000")).unwrap();
        let off = (chrono::Utc::now() - parsed.with_timezone(&chrono::Utc)).num_seconds();
        assert!((0..=2).contains(&off), "{got} is {off} s from now");
        assert_eq!(got.len(), 29, "{got}");
        assert!(got.ends_with(" GMT"), "{got}");
    }

    #[test]
    fn chunk_size_lines() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size_line(10, &mut b), b"a\r\n");
        assert_eq!(chunk_size_line(4096, &mut b), b"1000\r\n");
        assert_eq!(chunk_size_line(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn remaining_skips_written_bytes() {
        let parts: [&[u8]; 3] = [b"abc", b"", b"defg"];
        let mut out = [IoSlice::new(&[]); 4];
        let n = remaining(&parts, 4, &mut out);
        assert_eq!(n, 1);
        assert_eq!(&*out[0], b"efg");
        let n = remaining(&parts, 0, &mut out);
        assert_eq!(n, 2);
        assert_eq!(remaining(&parts, 7, &mut out), 0);
    }

    /// Feeds `head` to a scan in pieces of `step` bytes; the piece count at which it ended.
    fn ends_after(head: &[u8], step: usize) -> Option<usize> {
        let mut scan = HeadScan::default();
        let mut pieces = 0;
        for end in (step..head.len() + step).step_by(step) {
            pieces += 1;
            if scan.complete(&head[..end.min(head.len())]) {
                return Some(pieces);
            }
        }
        None
    }

    #[test]
    fn a_head_ends_at_its_blank_line_however_it_is_cut() {
        for head in [
            &b"GET /events/ HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"GET /events/ HTTP/1.1\nHost: x\n\n",
            b"GET /events/ HTTP/1.1\nHost: x\n\r\n",
            b"\r\n\nGET /events/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\n\r\n",
        ] {
            let text = String::from_utf8_lossy(head);
            // In two pieces, cut anywhere (the blank line included): ends with the second.
            for cut in 1..head.len() {
                let mut scan = HeadScan::default();
                assert!(!scan.complete(&head[..cut]), "{text:?} cut at {cut}");
                assert!(scan.complete(head), "{text:?} cut at {cut}");
            }
            for step in [1, 2, 3, 5] {
                let pieces = head.len().div_ceil(step);
                assert_eq!(ends_after(head, step), Some(pieces), "{text:?} by {step}");
            }
        }
        // Only empty lines so far: not a head yet.
        assert_eq!(ends_after(b"\r\n\r\n\n\n\r\n", 1), None);
    }

    #[test]
    fn garbage_first_ends_the_head_and_extra_header_lines_do_not() {
        assert_eq!(ends_after(b"\x00\x01garbage", 20), Some(1));
        // 70 header lines, more than httparse is given room for: the head goes on to its end.
        let mut head = b"GET /healthz HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        let lines = head.len();
        head.extend_from_slice(b"\r\n");
        assert!(!HeadScan::default().complete(&head[..lines]));
        assert_eq!(ends_after(&head, lines), Some(2));
    }

    #[test]
    fn only_plain_stream_gets_are_taken() {
        let ok = b"GET /.well-known/mercure?topic=a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(stream_request(ok, 65536).is_some());
        assert!(stream_request(b"GET /events/ HTTP/1.1\r\n\r\n", 65536).is_some());
        for other in [
            &b"POST /.well-known/mercure HTTP/1.1\r\n\r\n"[..],
            b"GET /.well-known/mercure?topic=a HTTP/1.0\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n\r\n",
            b"GET /.well-known/mercure/subscriptions HTTP/1.1\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\nX: \xff\x00\r\n\r\n",
            b"GET /events/ HTTP/1.1\r\n",
            b"\x00\x01garbage\r\n\r\n",
        ] {
            assert!(
                stream_request(other, 65536).is_none(),
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        assert!(stream_request(ok, 10).is_none(), "head over the limit");
        let close = b"GET /events/ HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n";
        assert!(stream_request(close, 65536).unwrap().1);
        assert!(!stream_request(ok, 65536).unwrap().1);
    }

    #[test]
    fn the_head_size_limit_counts_the_parsed_head() {
        // Bare LF and no space after the colons: 60 lines of 1,000 bytes, 2 more each as
        // counted, and the request line's target only.
        let mut head = b"GET /events/ HTTP/1.1\n".to_vec();
        for i in 0..60 {
            head.extend_from_slice(format!("X-{i:02}:{}\n", "v".repeat(994)).as_bytes());
        }
        head.push(b'\n');
        let counted = "/events/".len() + 60 * 1002;
        assert_eq!(head.len(), 22 + 60 * 1000 + 1);
        assert!(stream_request(&head, counted).is_some());
        assert!(stream_request(&head, counted - 1).is_none());
    }
}
