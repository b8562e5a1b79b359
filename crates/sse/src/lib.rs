//! The `text/event-stream` format, with no I/O and no state beyond one parser's partial line.
//!
//! Encoding happens once per update (the bytes are shared by every subscriber); parsing is
//! incremental so the client can feed it whatever a socket read returns. It is a crate of its
//! own because both the hub (`ssehub`, as `ssehub::sse`) and the load generator
//! (`ssehub-bench`) speak it, and the load generator must not depend on the hub.

mod encode;
mod parse;

pub use encode::{encode_event, HEARTBEAT, OPENING};
pub use parse::{Event, Parser};
