//! The transport: everything between a socket and the router. `listener` accepts connections
//! until the stop signal, and [`shutdown`] stops in order; [`crate::run`] puts them together
//! with the [`crate::App`] they serve. The transport knows the router and the hub's metrics,
//! not how they were built.
//!
//! HTTP/1.1 event streams and plain publishes are served by the server's own paths ([`h1`]);
//! everything else, HTTP/2 included, by hyper (`hyper_conn`). Every connection holds a place
//! in the connection budget ([`budget`]); TLS is [`tls`].

use std::net::SocketAddr;

use tokio::net::TcpListener;

pub(crate) mod budget;
pub(crate) mod h1;
mod hyper_conn;
pub(crate) mod listener;
pub mod shutdown;
mod stream_tasks;
pub(crate) mod tls;
pub(crate) mod tls_stream;

pub use stream_tasks::current_stream_cancel;

/// The largest request head, in bytes; larger ones get 431.
pub const MAX_HEAD: usize = 64 * 1024;

/// Binds the listening socket, with an error that says what to do when the port is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "is another server using this port? Stop it, or choose another address"
            }
            std::io::ErrorKind::AddrNotAvailable => {
                "that address is not one of this machine's; listen on one of its own (or 0.0.0.0)"
            }
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges (CAP_NET_BIND_SERVICE); use a higher port"
            }
            _ => "choose another address",
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}; {hint} with --listen (or SSEHUB_LISTEN)")
    })
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
