//! virtio-blk backed by a file.

mod device;
mod event_handler;
mod metrics;
pub mod request;

pub use device::{Block, BlockConfig, BlockError, BLOCK_QUEUE_SIZE};
pub use metrics::BlockMetrics;
