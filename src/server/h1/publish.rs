//! The server's own HTTP/1.1 path for publishes.
//!
//! A publisher usually keeps one connection open and sends `POST /.well-known/mercure` after
//! `POST`, each with a small form body. Served by hyper, each of these requests wakes its own
//! connection task while that task is running: hyper's connection and the handler reading the
//! body signal each other through a channel, and both are polled by the same task. tokio
//! answers such a wake by queueing the task again and waking a second worker thread to share
//! the queue, which finds nothing to do and goes back to sleep: two futex calls and two
//! context switches per publish, about a quarter of the hub's CPU when publishes are frequent
//! and each reaches few subscribers (the many-topics benchmark, S6).
//!
//! So when a connection's head is a plain publish with a `Content-Length` and its whole body has
//! already arrived (a client sends both at once), the request goes through the same axum router
//! as every other one (same checks, same answers) with the body whole, and the answer is
//! written straight back; the connection then waits for its next request. Anything this path
//! does not take, a body still on its way included (hyper's path then answers a slow or broken
//! one as it always did), goes to hyper with the bytes already read put back in front of the
//! connection, for the rest of the connection's life.
//!
//! A client that has closed the connection by the time its whole request is read (an end of
//! input right after it) is gone, and its publish is not applied: that is a client that gave
//! up waiting, its request left in the kernel's queue while the hub could not accept, and that
//! may well send it again. hyper's path does the same (its default, `half_close(false)`, takes
//! an end of input in the middle of a request as the client gone), as the event stream path
//! does: a client may not half-close its sending side and wait for the answer.

use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::task::Poll;

use bytes::BytesMut;
use http::Method;
use tokio::io::AsyncRead;
use tokio::time::Instant;
use tower::ServiceExt as _;

use super::head::{plain_head, read_more_head, PlainHead};
use super::io::StreamIo;
use super::response::answer;
use super::Http1;
use crate::http::{Connection, MERCURE_PATH};
use crate::server::budget::Permit;
use crate::server::MAX_HEAD;

/// Is this head a publish this path can serve: a `POST` to the hub with a body of known length
/// within `max_body`? (hyper answers the others, the 413 for a larger body included.)
pub fn publish_head(buf: &[u8], max_head: usize, max_body: usize) -> Option<PlainHead> {
    let head = plain_head(buf, max_head, Method::POST, |path| path == MERCURE_PATH)?;
    (head.content_length? <= max_body).then_some(head)
}

/// Largest step by which the buffer grows while a body is read: a head announcing a large
/// body reserves nothing the client has not sent.
const READ_STEP: usize = 64 * 1024;

/// What [`read_ready`] found of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrived {
    /// All of it, on a connection still open.
    Whole,
    /// Part of it (the rest still on its way, or never to come): hyper's to answer.
    Partial,
    /// All of it, then the end of the connection (or an error): the client is gone, and the
    /// request is not to be applied.
    Abandoned,
}

/// Reads what `io` has ready, without waiting, until `buf` holds `len` bytes. A body still on
/// its way, a connection that ended or failed before its end, is left to hyper with what was
/// read (hyper then waits for the rest, or answers as it always did). A whole one is
/// followed by one more look, without waiting, unless the next request has begun to come: an
/// end of input there (read, or seen by `peer_closed`, see `StreamIo::peer_closed`) is a
/// client that left.
pub async fn read_ready<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    len: usize,
    peer_closed: impl Fn(&S) -> bool,
) -> Arrived {
    std::future::poll_fn(|cx| {
        while buf.len() < len {
            if buf.capacity() == buf.len() {
                buf.reserve((len - buf.len()).min(READ_STEP));
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                Poll::Ready(Ok(n)) if n > 0 => {}
                // Nothing more yet (the waker stays registered: a wake-up later is harmless),
                // the end of input, or an error.
                _ => return Poll::Ready(Arrived::Partial),
            }
        }
        if buf.len() > len {
            return Poll::Ready(Arrived::Whole);
        }
        if buf.capacity() == buf.len() {
            buf.reserve(1024);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(Arrived::Abandoned),
            Poll::Ready(Ok(_)) => Poll::Ready(Arrived::Whole),
            Poll::Pending if peer_closed(io) => Poll::Ready(Arrived::Abandoned),
            Poll::Pending => Poll::Ready(Arrived::Whole),
        }
    })
    .await
}

impl Http1 {
    /// Answers the publish whose head `publish` describes, at the start of `buf`, if its body
    /// has come whole (and its client is still there); then reads the connection's next head,
    /// unless the hub needs the connection's place meanwhile.
    pub(super) async fn publish<S: StreamIo>(
        &self,
        io: &mut S,
        mut buf: BytesMut,
        publish: PlainHead,
        permit: &Permit,
    ) -> Next {
        let len = publish.len + publish.content_length.unwrap_or(0);
        match read_ready(io, &mut buf, len, S::peer_closed).await {
            Arrived::Whole => {}
            Arrived::Partial => return Next::Hyper(buf),
            Arrived::Abandoned => {
                tracing::debug!(
                    peer = %self.peer,
                    "publish not applied: its client closed the connection before the answer"
                );
                return Next::Closed;
            }
        }
        let body = buf.split_to(len).freeze().split_off(publish.len);
        let mut req = match publish.request.body(axum::body::Body::from(body)) {
            Ok(r) => r,
            Err(_) => return Next::Closed,
        };
        req.extensions_mut().insert(Connection {
            kill: self.kill.clone(),
            stream_slot: None,
        });
        // Shutdown waits for a publish under way (the connection's task is tracked), not for
        // an idle connection; one that ends meanwhile says the connection closes.
        let Ok(response) = Box::pin(self.app.clone().oneshot(req)).await;
        self.metrics.plain_publishes.fetch_add(1, Relaxed);
        let close = publish.close || self.shutdown.is_stopping();
        if !answer(io, response, close).await {
            return Next::Closed;
        }
        let answered = Instant::now();
        let deadline = answered + permit.timeouts().idle;
        tokio::select! {
            biased;
            _ = self.shutdown.stopped() => Next::Closed,
            _ = self.kill.cancelled() => Next::Closed,
            _ = permit.evicted(answered) => Next::Closed,
            head = read_more_head(io, buf, deadline, MAX_HEAD + 1) => {
                head.map_or(Next::Closed, Next::Request)
            }
        }
    }
}

/// What follows a publish on a connection.
pub(super) enum Next {
    /// The next request's head, for the server's own paths.
    Request(BytesMut),
    /// What has been read of a request left to hyper.
    Hyper(BytesMut),
    /// Nothing: the connection is done.
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1000;

    fn head(text: &str) -> Option<PlainHead> {
        publish_head(text.as_bytes(), 65536, LIMIT)
    }

    #[test]
    fn plain_publishes_are_taken() {
        let h =
            head("POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 12\r\n\r\ntopic=a&data")
                .unwrap();
        assert_eq!((h.len, h.content_length, h.close), (58, Some(12), false));
        let h = head("POST /.well-known/mercure?authorization=x HTTP/1.1\r\nconnection: keep-alive, Close\r\ncontent-length: 1000\r\n\r\n")
            .unwrap();
        assert_eq!((h.content_length, h.close), (Some(1000), true));
        let req = h.request.body(()).unwrap();
        assert_eq!(req.uri().query(), Some("authorization=x"));
        assert_eq!(req.headers()["content-length"], "1000");
    }

    #[test]
    fn everything_else_is_left_to_hyper() {
        for other in [
            "POST /.well-known/mercure HTTP/1.1\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.0\r\nContent-Length: 5\r\n\r\n",
            "POST /.well-known/mercure/subscriptions HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "PUT /.well-known/mercure HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET /.well-known/mercure?topic=a HTTP/1.1\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 5\r\n",
            "POST /.well-known/mercure?x=<y> HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
        ] {
            assert!(head(other).is_none(), "{other:?}");
        }
        let long = "POST /.well-known/mercure HTTP/1.1\r\nContent-Length: 5\r\n\r\n";
        assert!(
            publish_head(long.as_bytes(), 20, LIMIT).is_none(),
            "head over the limit"
        );
    }

    #[tokio::test]
    async fn bodies_are_taken_only_when_already_here() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::from(&b"abc"[..]);
        client.write_all(b"defgh").await.unwrap();
        assert_eq!(
            read_ready(&mut server, &mut buf, 8, |_| false).await,
            Arrived::Whole
        );
        assert_eq!(&buf[..], b"abcdefgh");
        // Part of the rest: what came is kept, and nothing waits for the remainder.
        client.write_all(b"ij").await.unwrap();
        assert_eq!(
            read_ready(&mut server, &mut buf, 11, |_| false).await,
            Arrived::Partial
        );
        assert_eq!(&buf[..], b"abcdefghij");
        drop(client);
        assert_eq!(
            read_ready(&mut server, &mut buf, 11, |_| false).await,
            Arrived::Partial
        );
        // A long body announced: the buffer grows with what arrives, by bounded steps.
        let mut buf = BytesMut::new();
        assert_eq!(
            read_ready(&mut server, &mut buf, 1 << 30, |_| false).await,
            Arrived::Partial
        );
        assert!(buf.capacity() <= READ_STEP, "{}", buf.capacity());
    }

    #[tokio::test]
    async fn a_whole_request_then_the_end_of_input_is_abandoned() {
        use tokio::io::AsyncWriteExt as _;
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"abcd").await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        assert_eq!(
            read_ready(&mut server, &mut buf, 4, |_| false).await,
            Arrived::Abandoned
        );
        // Nothing more to read yet, but the kernel knows the client has closed.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"abcd").await.unwrap();
        let mut buf = BytesMut::new();
        let closed = read_ready(&mut server, &mut buf, 4, |_| true).await;
        assert_eq!(closed, Arrived::Abandoned);
        // The next request already begun: the request before it is whole, whatever follows.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"abcdPOST").await.unwrap();
        drop(client);
        let mut buf = BytesMut::new();
        assert_eq!(
            read_ready(&mut server, &mut buf, 4, |_| false).await,
            Arrived::Whole
        );
    }
}
