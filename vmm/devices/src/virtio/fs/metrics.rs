use crate::metrics::Counter;
use serde::Serialize;

#[derive(Default, Debug, Serialize)]
pub struct FsMetrics {
    /// Rings handed to the back-end (one per DRIVER_OK).
    pub activations: Counter,
    /// Activations the back-end refused or did not answer.
    pub activation_failures: Counter,
    /// Driver resets that stopped the rings.
    pub resets: Counter,
    /// The back-end hung up, broke the protocol or failed a request; the
    /// device stays failed afterwards.
    pub backend_failures: Counter,
    /// Guest writes to the read-only config space, and similar faults.
    pub guest_faults: Counter,
}
