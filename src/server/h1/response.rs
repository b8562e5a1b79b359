//! Writing responses on the server's own HTTP/1.1 paths: a whole answer with its
//! `content-length`, or an event stream's head before its task takes the connection over. The
//! `date` header is formatted once a second, as hyper does.

use std::net::SocketAddr;

use http::{header, Response, StatusCode};
use tokio::io::AsyncWrite;

use super::io::StreamIo;
use super::pump::{pump, write_all};
use crate::http::StreamSlot;
use crate::server::budget::Permit;
use crate::server::shutdown::Shutdown;

/// How long writing a whole answer may take.
const ANSWER_WRITE: std::time::Duration = std::time::Duration::from_secs(10);

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
    shutdown: &Shutdown,
    permit: Permit,
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
    if let Some(sink) = &sink {
        stream.attach_sink(sink.clone());
    }
    // The stream gets a task of its own, holding only what it needs: the routing above ran
    // on a much larger future that can now be freed. The pump is the task itself, not awaited
    // inside an `async` block: such a block would keep its own copy of every value it moves
    // into the pump (a TLS connection is more than a KiB) for as long as the stream lasts.
    shutdown.spawn_stream(pump(io, sink, head, stream, path, peer, (busy, permit)));
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
        // Over TLS the shutdown sends what is left and close_notify, which wait on a client
        // that does not read: bounded as a stream's last writes are, so such a client cannot
        // keep the connection (and its place) by never reading its answer.
        let shutdown = tokio::io::AsyncWriteExt::shutdown(io);
        let _ = tokio::time::timeout(crate::hub::LAST_WRITES, shutdown).await;
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

    /// Over TLS, shutting the sending side down writes close_notify, which waits on the socket.
    /// `answer` bounds its write (`ANSWER_WRITE`) and the shutdown after it (`LAST_WRITES`), so a
    /// TLS client that stops reading and then asks for `Connection: close` (or gets a refusal)
    /// cannot keep its connection, and its place in the budget (review 22S: it could, for as
    /// long as it liked).
    #[tokio::test(start_paused = true)]
    async fn an_answer_that_closes_a_tls_connection_its_client_does_not_read_ends() {
        use std::time::Duration;
        use tokio::io::AsyncWriteExt as _;
        let (server, client) = crate::server::tls_stream::tests::configs();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let peer = std::thread::spawn(move || {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut conn = rustls::ClientConnection::new(client, name).unwrap();
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).unwrap();
            }
            // Reads nothing more until told.
            let _ = go_rx.recv();
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let mut stream = crate::server::tls_stream::accept(tcp, server, Duration::from_secs(3600))
            .await
            .unwrap();
        // Earlier answers the client did not read fill the socket.
        let chunk = vec![b'x'; 16 * 1024];
        while let Ok(written) =
            tokio::time::timeout(Duration::from_millis(200), stream.write(&chunk)).await
        {
            assert!(written.unwrap() > 0);
        }
        let refusal = Response::new(axum::body::Body::from("refused"));
        let started = tokio::time::Instant::now();
        let done =
            tokio::time::timeout(Duration::from_secs(60), answer(&mut stream, refusal, true)).await;
        let took = started.elapsed();
        let _ = go_tx.send(());
        drop(stream);
        peer.join().unwrap();
        assert!(
            done.is_ok(),
            "answer(close) still waiting after {took:?} on a client that does not read"
        );
    }
}
