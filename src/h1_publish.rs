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
//! So when a connection's head is a plain publish with a `Content-Length`, the body is read
//! here, the request goes through the same axum router as every other one (same checks, same
//! answers) with the body already whole, and the answer is written straight back; the
//! connection then waits for its next request. Anything this path does not take goes to hyper
//! with the bytes already read put back in front of the connection.

use bytes::BytesMut;
use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::time::Instant;

use crate::h1_stream::{plain_head, PlainHead};
use crate::http::MERCURE_PATH;

/// Is this head a publish this path can serve: a `POST` to the hub with a body of known length
/// within `max_body`? (hyper answers the others, the 413 for a larger body included.)
pub fn publish_head(buf: &[u8], max_head: usize, max_body: usize) -> Option<PlainHead> {
    let head = plain_head(buf, max_head, Method::POST, |path| path == MERCURE_PATH)?;
    (head.content_length? <= max_body).then_some(head)
}

/// Why a body could not be read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    /// It did not arrive by the deadline.
    Late,
    /// The connection ended or failed before it was complete.
    Cut,
}

/// Reads from `io` until `buf` holds at least `len` bytes.
pub async fn read_to<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    len: usize,
    deadline: Instant,
) -> Result<(), BodyError> {
    if buf.len() < len {
        buf.reserve(len - buf.len());
    }
    while buf.len() < len {
        match tokio::time::timeout_at(deadline, io.read_buf(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(BodyError::Cut),
            Ok(Ok(_)) => {}
            Err(_) => return Err(BodyError::Late),
        }
    }
    Ok(())
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
    async fn bodies_are_read_whole_or_not_at_all() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::from(&b"abc"[..]);
        let far = Instant::now() + std::time::Duration::from_secs(5);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"defgh")
            .await
            .unwrap();
        read_to(&mut server, &mut buf, 8, far).await.unwrap();
        assert_eq!(&buf[..], b"abcdefgh");
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(
            read_to(&mut server, &mut buf, 9, soon).await,
            Err(BodyError::Late)
        );
        drop(client);
        assert_eq!(
            read_to(&mut server, &mut buf, 9, far).await,
            Err(BodyError::Cut)
        );
    }
}
