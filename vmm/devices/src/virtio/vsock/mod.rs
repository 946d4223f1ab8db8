//! virtio-vsock with Firecracker's hybrid back end: guest vsock streams are
//! relayed to unix sockets on the host.
//!
//! - Host to guest: the host connects to `uds_path` and sends `CONNECT <port>\n`;
//!   once the guest accepts, the device answers `OK <host port>\n` and relays.
//! - Guest to host: a guest connection to CID 2 port `P` is relayed to the unix
//!   socket `<uds_path>_P`.
//!
//! Layout: `packet` (header and descriptor-chain parsing), `host_socket` (the
//! listener, the `CONNECT` line), `connection` (one stream's state machine and
//! flow control) and `muxer` (all connections, fd interest) are pure and tested
//! directly; `device` (queues, `VirtioDevice`) and `event_handler` (epoll glue)
//! tie them to the event loop.

mod connection;
mod device;
mod event_handler;
mod host_socket;
mod metrics;
mod muxer;
mod packet;
#[cfg(test)]
mod test_utils;

pub use device::Vsock;
pub use metrics::VsockMetrics;

use std::time::{Duration, Instant};

/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;

/// Resource caps. Every connection can hold at most `conn_tx_buf_size` bytes
/// of guest data the host has not read yet (this is also the `buf_alloc`
/// advertised to the guest), so host memory is bounded by
/// `max_connections * conn_tx_buf_size`.
#[derive(Clone, Copy, Debug)]
pub struct VsockLimits {
    pub max_connections: usize,
    /// Host connections still sending their `CONNECT` line.
    pub max_handshakes: usize,
    pub conn_tx_buf_size: u32,
}

impl Default for VsockLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 64,
            conn_tx_buf_size: 128 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved or out of range (must be 3..=0xffff_fffe)")]
    InvalidCid(u64),
    #[error(transparent)]
    Socket(#[from] crate::unix_socket::UnixSocketError),
    #[error("failed to create the activate event")]
    EventFd(#[source] std::io::Error),
}

/// Caps guest-caused warnings at one per second, so a hostile guest cannot
/// flood the log; the counters in `VsockMetrics` still see every fault.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    const INTERVAL: Duration = Duration::from_secs(1);

    pub(crate) fn warn(&mut self, args: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Self::INTERVAL => self.suppressed += 1,
            _ => {
                tracing::warn!(suppressed = self.suppressed, "vsock: {args}");
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
