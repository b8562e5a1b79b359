//! The `text/event-stream` format, with no I/O.
//!
//! Encoding happens once per update (the bytes are shared by every subscriber); parsing is
//! incremental so the client can feed it whatever a socket read returns.

mod encode;
mod parse;

pub use encode::{encode_event, HEARTBEAT, OPENING};
pub use parse::{Event, Parser};
