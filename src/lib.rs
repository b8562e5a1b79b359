//! ssehub: a Server-Sent Events hub that speaks the Mercure protocol.
//!
//! Data flows one way: a publish enters [`http`], becomes a [`hub::Draft`], is encoded once by
//! [`sse`], stored and fanned out by [`hub`], and leaves through each subscriber's stream.

pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod server;
pub use ssehub_sse as sse;
pub mod store;
