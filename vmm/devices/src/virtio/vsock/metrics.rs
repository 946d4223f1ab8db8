//! Counters for the vsock device. Guest faults each have their own counter.

use crate::metrics::Counter;
use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    pub activate_fails: Counter,
    pub cfg_write_ignored: Counter,
    /// Event-loop plumbing failures on the host side (eventfd, epoll).
    pub event_fails: Counter,

    /// Packets from the guest (tx queue) that were well-formed.
    pub tx_packets: Counter,
    /// Stream bytes from the guest.
    pub tx_bytes: Counter,
    /// Tx chains that were empty, broken (loop, bad index), pointed outside
    /// guest memory or held device-writable descriptors.
    pub tx_bad_chain: Counter,
    /// Tx headers shorter than 44 bytes, or a `len` beyond the chain or the cap.
    pub tx_bad_len: Counter,
    /// Tx packets with a wrong source or destination CID.
    pub tx_bad_cid: Counter,
    /// Tx packets with an unknown op or a type other than STREAM.
    pub tx_bad_op: Counter,

    /// Packets to the guest (rx queue).
    pub rx_packets: Counter,
    /// Stream bytes to the guest.
    pub rx_bytes: Counter,
    /// Rx chains that were broken, outside memory, device-readable or too
    /// small for a header; each is returned to the guest with length 0.
    pub rx_bad_chain: Counter,

    pub conns_added: Counter,
    pub conns_removed: Counter,
    /// Connections refused or reset because `max_connections` was reached.
    pub conn_limit_rejects: Counter,
    /// Connections reset because the guest sent more than its credit allowed
    /// and the per-connection buffer would have overflowed.
    pub conn_buffer_overflows: Counter,
    /// Connections reset because the guest broke the protocol.
    pub conn_protocol_errors: Counter,
    /// Connections reset because the host stream failed or closed under us.
    pub conn_host_errors: Counter,
    /// Guest connects to `<uds_path>_<port>` that failed.
    pub guest_connect_fails: Counter,
    /// Host connections closed for a bad, oversized or unfinished CONNECT line.
    pub host_handshake_fails: Counter,
    /// Host connections closed because too many were still handshaking.
    pub handshake_limit_rejects: Counter,
    /// RST packets dropped because the guest posted no rx buffers for too long.
    pub rst_queue_overflows: Counter,
}
