//! The transport: everything between a socket and the router. [`run`] builds the [`App`]
//! (the hub and what surrounds it) from the configuration, accepts connections until the stop
//! signal (`listener`), and then stops in order ([`shutdown`]).
//!
//! HTTP/1.1 event streams and plain publishes are served by the server's own paths ([`h1`]);
//! everything else, HTTP/2 included, by hyper (`hyper_conn`). Every connection holds a place
//! in the connection budget ([`budget`]); TLS is [`tls`].

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::ServeConfig;
use listener::Listener;
use shutdown::Shutdown;

pub(crate) mod budget;
pub(crate) mod h1;
mod hyper_conn;
mod listener;
pub mod shutdown;
pub(crate) mod tls;

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

/// Runs the hub on `listener` until `stop` is cancelled, then shuts down gracefully.
///
/// Several hubs may run in one process, each on its own listener with its own `stop`. What is
/// shared by the process: SIGHUP is taken over from its default action (ending the process)
/// for as long as the process lives, and each hub reloads its certificate on it.
pub async fn run(
    listener: TcpListener,
    config: ServeConfig,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new(stop);
    let app = App::build(&config, addr, &shutdown).await?;
    Listener::new(&app).accept(&listener, &shutdown).await;
    shutdown.drain(listener, &app.hub).await;
    Ok(())
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
