//! The connections the server's own HTTP/1.1 paths write to: the trait they need, plain TCP
//! shared between a stream's task and the hub's direct writes, TLS, and a connection handed to
//! hyper with the bytes already read put back in front. Chunk framing stays here, with them:
//! the hub hands out event bytes, and a chunk a direct write could not finish is kept here.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hub::{DirectSink, Sent};

/// A connection an event stream can be written to by the server's own paths ([`super::pump`]).
pub trait StreamIo: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// What the stream's task writes to.
    type Pumped: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The connection for the stream's task, and a sink for direct writes if the connection
    /// allows them.
    fn into_pumped(self) -> (Self::Pumped, Option<Arc<DirectTcp>>);

    /// Whether the client has closed the connection (or reset it) with nothing left unread
    /// on its TCP socket, as the kernel knows now. Reading cannot tell: after a read that
    /// left the socket empty, tokio answers the next one "nothing yet" without asking the
    /// kernel until the socket signals again, and an end of input that came before that read
    /// signals nothing more.
    fn peer_closed(&self) -> bool;
}

impl StreamIo for tokio::net::TcpStream {
    type Pumped = SharedTcp;

    fn into_pumped(self) -> (SharedTcp, Option<Arc<DirectTcp>>) {
        let socket = Arc::new(self);
        let sink = DirectTcp {
            socket: socket.clone(),
            unfinished: Mutex::new(None),
        };
        (SharedTcp(socket), Some(Arc::new(sink)))
    }

    fn peer_closed(&self) -> bool {
        tcp_peer_closed(self)
    }
}

/// TLS keeps its session state on one side: only the stream's task writes. The connection
/// goes to the task boxed: a future keeps what it was started with apart from what it moved
/// into its later states, so a TLS connection (more than a KiB inline) given by value was held
/// twice by every stream's task (heaptrack: 3.6 KB per stream; boxed, 1.3 KB of task and
/// 1.2 KB of connection).
impl StreamIo for crate::server::tls_stream::TlsStream {
    type Pumped = Box<Self>;

    fn into_pumped(self) -> (Box<Self>, Option<Arc<DirectTcp>>) {
        (Box::new(self), None)
    }

    /// A TLS client's `close_notify` before its TCP end is data to TCP: seen only once
    /// rustls has read it.
    fn peer_closed(&self) -> bool {
        tcp_peer_closed(self.tcp())
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

/// Direct writes to a plain TCP stream: one chunk per write, framed on the stack and written
/// without waiting.
pub struct DirectTcp {
    socket: Arc<tokio::net::TcpStream>,
    /// The framed rest of a chunk the socket took only part of. Nothing else may go on the
    /// connection before it: the hub keeps every other writer away (its writer is `Carry`) until
    /// the stream's task has taken it ([`DirectTcp::take_unfinished`]). Locked only then.
    unfinished: Mutex<Option<Bytes>>,
}

impl DirectTcp {
    /// What the last direct write left unwritten, for the stream's task to write first.
    pub fn take_unfinished(&self) -> Option<Bytes> {
        self.unfinished.lock().take()
    }
}

impl DirectSink for DirectTcp {
    fn try_send(&self, events: &[u8]) -> Sent {
        let mut size = [0u8; 18];
        let size = chunk_size_line(events.len(), &mut size);
        let parts: [&[u8]; 3] = [size, events, b"\r\n"];
        let total = size.len() + events.len() + 2;
        let mut written = 0;
        while written < total {
            let mut slices = [IoSlice::new(&[]); 4];
            let n = remaining(&parts, written, &mut slices);
            match self.socket.try_write_vectored(&slices[..n]) {
                Ok(k) if k > 0 => written += k,
                // Full, or failed: the stream's task writes the rest when it can, or finds
                // the connection gone and ends the stream.
                _ => break,
            }
        }
        if written == total {
            return Sent::All;
        }
        let mut rest = BytesMut::with_capacity(total - written);
        let mut slices = [IoSlice::new(&[]); 4];
        let n = remaining(&parts, written, &mut slices);
        for s in &slices[..n] {
            rest.extend_from_slice(s);
        }
        let earlier = self.unfinished.lock().replace(rest.freeze());
        debug_assert!(
            earlier.is_none(),
            "a direct write before the last one was finished"
        );
        Sent::Partly
    }
}

/// `{len:x}\r\n` into `buf`, without allocating. Marked inline, as [`remaining`] is: both run
/// on every delivery, from the pump's module as well as from [`DirectTcp`].
#[inline]
pub(super) fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
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

/// The parts of `parts` after the first `skip` bytes, as at most four slices.
#[inline]
pub(super) fn remaining<'a>(
    parts: &[&'a [u8]],
    mut skip: usize,
    out: &mut [IoSlice<'a>; 4],
) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size_line(10, &mut b), b"a\r\n");
        assert_eq!(chunk_size_line(4096, &mut b), b"1000\r\n");
        assert_eq!(chunk_size_line(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
    }

    /// A direct write the socket takes only part of: the sink keeps the framed rest until the
    /// stream's task takes it, and what the client reads, followed by it, is the whole chunk.
    #[tokio::test]
    async fn a_direct_write_cut_short_keeps_its_framed_rest() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        // Small buffers on both sides, so that the chunk cannot fit in them.
        client.set_recv_buffer_size(4096).unwrap();
        let (client, accepted) = tokio::join!(
            client.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let mut client = client.unwrap();
        let server = accepted.unwrap().0;
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let (_pumped, sink) = server.into_pumped();
        let sink = sink.unwrap();

        assert_eq!(sink.try_send(b"data: small\n\n"), Sent::All);
        let events = vec![b'x'; 4 << 20];
        assert_eq!(sink.try_send(&events), Sent::Partly);
        let rest = sink.take_unfinished().expect("the rest is kept");
        assert!(sink.take_unfinished().is_none(), "and taken once");

        let mut expected = b"d\r\ndata: small\n\n\r\n400000\r\n".to_vec();
        expected.extend_from_slice(&events);
        expected.extend_from_slice(b"\r\n");
        let mut wire = vec![0u8; expected.len() - rest.len()];
        client.read_exact(&mut wire).await.unwrap();
        wire.extend_from_slice(&rest);
        assert!(wire == expected, "the chunk, whole and in order");
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
}
