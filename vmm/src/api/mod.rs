//! The control API: newline-delimited JSON over a unix stream socket.
//!
//! Each request is one JSON object on one line; each gets exactly one
//! response line. `subscribe` turns the connection into an event stream.
//! The protocol is documented in docs/vmm-api.md.

mod protocol;
mod server;

pub use protocol::{Request, Response};
pub use server::{ApiCall, ApiServer, ApiStartError};
