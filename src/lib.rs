//! ssehub: a Server-Sent Events hub that speaks the Mercure protocol.
//!
//! Data flows one way: a publish enters [`http`], becomes a [`hub::Draft`], is encoded once by
//! [`sse`], stored and fanned out by [`hub`], and leaves through each subscriber's stream.
//! `docs/ARCHITECTURE.md` in the repository explains who writes to a subscriber's socket, and
//! when.
//!
//! Most users run the `ssehub` binary. An application can also embed the hub: build an [`App`]
//! from the same settings as `ssehub serve`, mount its routes in its own router, and publish
//! from its own code.
//!
//! ```
//! use clap::Parser as _;
//! use ssehub::config::ServeArgs;
//! use ssehub::hub::Draft;
//! use ssehub::server::shutdown::Shutdown;
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "multi_thread")]
//! # async fn main() -> anyhow::Result<()> {
//! // The flags of `ssehub serve` (environment variables `SSEHUB_…` apply too).
//! let config = ServeArgs::try_parse_from([
//!     "ssehub",
//!     "--publisher-jwt-key", "a secret of at least thirty-two bytes!",
//!     "--data-dir", "none",
//!     "--clock-interval", "0",
//! ])?
//! .validate()
//! .map_err(anyhow::Error::msg)?;
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let stop = CancellationToken::new();
//! let shutdown = Shutdown::new(stop.clone());
//! let hub = ssehub::App::build(&config, listener.local_addr()?, &shutdown).await?;
//!
//! // The hub's routes beside the application's own.
//! let router = axum::Router::new()
//!     .route("/hello", axum::routing::get(|| async { "the application's own page" }))
//!     .merge(hub.router());
//! # let addr = listener.local_addr()?;
//! let server = tokio::spawn(async move { axum::serve(listener, router).await });
//! # // A subscriber over TCP, through the merged router: the publish below must reach it.
//! # let url = format!("http://{addr}/.well-known/mercure?topic=https://example.com/books/1");
//! # let target = ssehub::client::Target::parse(&url)?;
//! # let mut stream = ssehub::client::EventStream::open(&target, &Default::default()).await?;
//!
//! // A publish from the application's code is checked, stored and delivered like a POST.
//! let id = hub
//!     .publish(Draft {
//!         topics: vec!["https://example.com/books/1".into()],
//!         data: r#"{"status": "sold"}"#.into(),
//!         ..Draft::default()
//!     })
//!     .await?;
//! assert!(id.starts_with("urn:uuid:"));
//! # let event = stream.next().await?.expect("the update");
//! # assert_eq!((event.id.as_str(), event.data.as_str()), (id.as_str(), r#"{"status": "sold"}"#));
//!
//! stop.cancel();
//! server.abort();
//! # Ok(())
//! # }
//! ```

pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub(crate) mod clock;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod http;
pub mod hub;
pub(crate) mod metrics;
pub mod server;
pub use ssehub_sse as sse;

pub use app::{run, App};
