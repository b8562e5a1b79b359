//! The event-stream pump: the task that writes a subscriber's stream to its connection, chunk
//! by chunk, one vectored write per wake-up, and notices when the client leaves, misbehaves or
//! is dropped by the hub.

use std::future::Future as _;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::io::{chunk_size_line, remaining, DirectTcp};
use crate::hub::{SubscriberStream, Wire, LAST_WRITES};
use crate::metrics::DropReason;

/// Bytes a subscriber may send after its request before it is taken as misbehaving (clients
/// send nothing on an event stream; this bounds the work one that does can cause).
const MAX_STRAY_INPUT: usize = 64 * 1024;

/// Why a stream's connection ended.
pub(super) enum End {
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
/// ends. `sink` is the connection's for direct writes, if it has one: what it could not finish
/// goes out before anything newer. `held` (the connection's place and its request counted as
/// under way) is let go once the stream has ended.
///
/// Not an `async fn`: one keeps each of its arguments twice for as long as it runs (where it
/// was called with them, and where its body moved them to), and this one runs for as long as
/// the stream lasts. An `async` block uses what it captured where it is.
#[allow(clippy::manual_async_fn)]
pub(super) fn pump<S, H>(
    mut io: S,
    sink: Option<std::sync::Arc<DirectTcp>>,
    mut head: Vec<u8>,
    mut stream: SubscriberStream,
    path: &'static str,
    peer: SocketAddr,
    held: H,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        let subscriber = stream.subscriber_id();
        let mut stray = 0usize;
        // When the stream's last writes must be done by, once the hub has ended it.
        let mut last_writes: Option<Instant> = None;
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
            if matches!(&next, Ok(Wire::Data(chunk)) if chunk.is_empty()) {
                // An empty chunk would read as the end of the body.
                continue;
            }
            // The response's head goes out with the first write (and is empty afterwards).
            let head_bytes = std::mem::take(&mut head);
            let slow = stream.dropped_as_slow();
            let watch = Some(Watch {
                stream: &mut stream,
                last_writes: &mut last_writes,
            });
            let written = match &next {
                Ok(Wire::Data(chunk)) => {
                    let mut size = [0u8; 18];
                    let size = chunk_size_line(chunk.len(), &mut size);
                    let parts: [&[u8]; 4] = [&head_bytes, size, chunk, b"\r\n"];
                    write_all(&mut io, &parts, watch).await
                }
                Ok(Wire::FinishDirect) => {
                    // The hub lets nobody else write until the task asks it again: the rest of a
                    // direct write the socket cut short goes out now, before anything newer.
                    let rest = sink.as_ref().and_then(|s| s.take_unfinished());
                    let parts: [&[u8]; 2] = [&head_bytes, rest.as_deref().unwrap_or_default()];
                    write_all(&mut io, &parts, watch).await
                }
                // Dropped for being too slow: its socket is full, so close without a last word.
                Err(End::Finished) if slow => Err(End::Dropped),
                Err(End::Finished) => {
                    let parts: [&[u8]; 2] = [&head_bytes, b"0\r\n\r\n"];
                    write_all(&mut io, &parts, watch).await
                }
                Err(_) => Ok(()),
            };
            match (next, written) {
                (Ok(_), Ok(())) => {}
                (Err(End::Finished), Ok(())) => {
                    let shutdown = tokio::io::AsyncWriteExt::shutdown(&mut io);
                    // Within the last writes' deadline (set by the closing chunk's write): over
                    // TLS the shutdown writes close_notify, which can wait on a full socket.
                    // Boxed, as `write_all`'s timer.
                    let by = last_writes.unwrap_or_else(|| Instant::now() + LAST_WRITES);
                    let _ = Box::pin(tokio::time::timeout_at(by, shutdown)).await;
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
        // The socket is closed before its place is given back: a connection taking the place
        // must find the descriptor free (at the open-file limit it would fail to accept).
        drop(io);
        drop(sink);
        drop(held);
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

/// What a write to an event stream's connection watches besides the socket.
pub(super) struct Watch<'a> {
    pub stream: &'a mut SubscriberStream,
    /// When the stream's last writes must be done by: set by the first write that finds the
    /// stream ended, kept for the writes after it.
    pub last_writes: &'a mut Option<Instant>,
}

/// Writes every byte of `parts` with vectored writes. With a `watch`, gives up with
/// [`End::Dropped`] as soon as the hub drops the stream's subscriber as slow, and with
/// [`End::Gone`] once a stream the hub has ended (shutdown, the token's expiry, the lifetime)
/// is past its last writes' deadline: either would otherwise wait here for as long as its
/// client does not read, and an ended stream can no longer be dropped as slow. The deadline's
/// timer is boxed and made only then: a task is as large as its largest state for as long as
/// it lasts, so a timer inline would cost every idle stream.
///
/// Not an `async fn` for the same reason: one would keep its arguments and counters and, beside
/// them, the references to each that the polling closure borrowed (80 bytes more in the stream's
/// task, which made it a size class larger). The closure here owns them.
pub(super) fn write_all<'a, S: AsyncWrite + Unpin>(
    io: &'a mut S,
    parts: &'a [&'a [u8]],
    mut watch: Option<Watch<'a>>,
) -> impl std::future::Future<Output = Result<(), End>> + 'a {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0;
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(move |cx| {
        // Checked on every poll, the flush included: a TLS stream takes a whole chunk into its
        // own buffer and then waits in the flush when the socket is full.
        if let Some(w) = watch.as_mut() {
            match w.stream.poll_closed(cx) {
                Some(DropReason::Slow) => return Poll::Ready(Err(End::Dropped)),
                Some(_) => {
                    let at = *w
                        .last_writes
                        .get_or_insert_with(|| Instant::now() + LAST_WRITES);
                    let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(End::Gone));
                    }
                }
                None => {}
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting on a write is the pump's largest state, so the write's future is part of every
    /// stream's task for as long as it lasts: it holds its state once (an `async fn` held it and,
    /// beside it, the polling closure's references to it: 144 bytes).
    #[tokio::test]
    async fn a_write_keeps_its_state_once() {
        let mut io: Vec<u8> = Vec::new();
        let parts: [&[u8]; 3] = [b"ab", b"", b"cd"];
        let write = write_all(&mut io, &parts, None);
        let size = std::mem::size_of_val(&write);
        assert!(size <= 64, "the write's future is {size} bytes");
        assert!(write.await.is_ok());
        assert_eq!(io, b"abcd");
    }
}
