//! virtio-blk counters, read through `VirtioDevice::metrics()`.

use crate::metrics::Counter;
use serde::Serialize;

#[derive(Default, Debug, Serialize)]
pub struct BlockMetrics {
    /// Chains taken from the request queue.
    pub requests: Counter,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    pub flushes: Counter,
    pub unsupported: Counter,
    /// Requests that failed on the host side (disk I/O, read-only refusal).
    pub io_errors: Counter,
    /// Malformed requests: bad chains, addresses, lengths or directions.
    pub guest_faults: Counter,
    /// Event-loop or interrupt failures on the host.
    pub event_errors: Counter,
    /// Times the rate limiter made the queue wait.
    pub throttled: Counter,
}
