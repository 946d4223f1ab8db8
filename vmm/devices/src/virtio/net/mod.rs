//! virtio-net over a tap device (or any frame back-end).

mod backend;
mod device;
mod event_handler;
pub mod tap;

pub use backend::NetBackend;
pub use device::{Net, NetError, NetMetrics, MAX_FRAME_LEN, NET_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
pub use tap::{Tap, TapError};

/// `struct virtio_net_hdr_v1` (with VERSION_1 the header always carries
/// num_buffers), in front of every frame in both directions and on the tap.
pub const VNET_HDR_LEN: usize = 12;
