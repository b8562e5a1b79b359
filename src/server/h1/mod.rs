//! The server's own HTTP/1.1 paths, for event streams and publishes, and the dispatch between
//! them and hyper.
//!
//! Most of a hub's connections are subscribers that send one `GET` and then only receive. Served
//! through hyper, each keeps a read buffer (~16 KiB), a write buffer (~8 KiB) and a large
//! connection future for as long as it is open, which made an idle subscriber cost ~20 KiB of
//! server memory; and every update passes through hyper's body polling and chunk encoder.
//!
//! So the first request head of a connection is read here ([`head`]). When it is a `GET` for an
//! event stream, it is routed through the same axum router as everything else (same checks,
//! same headers, CORS included), the handler leaves the subscriber's stream in the
//! connection's [`StreamSlot`], and a small task ([`pump`]) writes the response head
//! ([`response`]) and the chunks straight to the socket: one vectored write per wake-up,
//! nothing buffered but what the hub already shares. A plain publish is answered by
//! [`publish`]'s path. Any other request, or anything unusual about these, goes to hyper with
//! the bytes already read put back in front of the connection ([`io::Prefixed`]), so hyper
//! answers it as it always did.
//!
//! Over plain TCP the socket is shared with the hub ([`io::DirectTcp`]): while the stream's task
//! waits with nothing in flight, a publishing thread may write an update to it directly. The
//! hub hands out event bytes only; framing them as chunks is done here, and what a direct
//! write left over stays with the connection until the task has finished it (see
//! `hub::subscriber`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::budget::Permit;
use super::hyper_conn::serve_hyper;
use super::shutdown::Shutdown;
use super::MAX_HEAD;
use crate::http::{Connection, StreamSlot};
use head::{malformed_head, read_more_head, stream_request};
use io::{Prefixed, StreamIo};
use publish::{publish_head, Next};
use response::{answer, respond};

pub mod head;
pub mod io;
pub mod publish;
pub mod pump;
pub mod response;

/// A new slot for the stream a subscribe handler may leave there.
fn new_slot() -> StreamSlot {
    Arc::new(parking_lot::Mutex::new(None))
}

/// What an HTTP/1.1 connection needs to be served, by this module's paths or by hyper.
pub(super) struct Http1 {
    pub(super) builder: auto::Builder<TokioExecutor>,
    pub(super) app: axum::Router,
    pub(super) kill: CancellationToken,
    pub(super) peer: SocketAddr,
    /// Stops the connection, and runs its event stream's task.
    pub(super) shutdown: Shutdown,
    /// The largest publish body (`--max-body`).
    pub(super) max_body: usize,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
}

impl Http1 {
    /// Reads the first request head, after the bytes already `read` from the connection; an
    /// event stream request or a plain publish is answered here, any other by hyper, with the
    /// head put back in front of the connection. A head not whole when shutdown starts, or
    /// when the hub needs the connection's place, is given up. `permit` is held as long as
    /// the connection is open.
    pub(super) async fn serve<S, Svc>(
        self,
        mut io: S,
        read: BytesMut,
        deadline: Instant,
        service: Svc,
        permit: Permit,
    ) where
        S: StreamIo,
        Svc: hyper::service::Service<
                http::Request<hyper::body::Incoming>,
                Response = axum::response::Response,
                Error = std::convert::Infallible,
            > + Send
            + 'static,
        Svc::Future: Send + 'static,
    {
        let idle_timeout = permit.timeouts().idle;
        let head = tokio::select! {
            _ = self.shutdown.stopped() => return,
            _ = permit.evicted(deadline.checked_sub(idle_timeout).unwrap_or(deadline)) => {
                return tracing::debug!(peer = %self.peer, "closed to make room: no whole head yet");
            }
            h = read_more_head(&mut io, read, deadline, MAX_HEAD + 1) => h,
        };
        let Some(mut head) = head else {
            return tracing::debug!(peer = %self.peer, "no request within the head deadline");
        };
        loop {
            if let Some((mut req, close)) = stream_request(&head, MAX_HEAD) {
                drop(head);
                let slot = new_slot();
                req.extensions_mut().insert(Connection {
                    kill: self.kill.clone(),
                    stream_slot: Some(slot.clone()),
                });
                let Ok(response) = Box::pin(self.app.oneshot(req)).await;
                let (peer, shutdown) = (self.peer, &self.shutdown);
                respond(io, response, close, &slot, peer, shutdown, permit).await;
                return;
            }
            let Some(publish) = publish_head(&head, MAX_HEAD, self.max_body) else {
                break;
            };
            match self.publish(&mut io, head, publish, &permit).await {
                Next::Request(h) => head = h,
                Next::Hyper(h) => {
                    head = h;
                    break;
                }
                Next::Closed => return,
            }
        }
        if let Some(reason) = malformed_head(&head) {
            let refusal = crate::http::reject(http::StatusCode::BAD_REQUEST, reason);
            answer(&mut io, refusal, true).await;
            return;
        }
        let io = Prefixed::new(head.freeze(), io);
        let conn = std::pin::pin!(self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned());
        let (kill, peer) = (self.kill, self.peer);
        serve_hyper(conn, &permit, Instant::now(), kill, &self.shutdown, peer).await;
    }
}
