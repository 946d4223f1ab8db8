//! virtio-rng (entropy device) fed from the host's /dev/urandom.

mod device;
mod event_handler;

pub use device::{EntropySource, Rng, RngError, RngMetrics, MAX_BYTES_PER_REQUEST, RNG_QUEUE_SIZE};
