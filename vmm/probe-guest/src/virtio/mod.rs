//! Minimal virtio 1.x drivers: the virtio-mmio transport, split virtqueues,
//! and the two devices the probe exercises (vsock, blk). Hand-written: the
//! probe is `no_std` without an allocator, which the virtio driver crates we
//! know of (e.g. `virtio-drivers`) would pull in or wrap in HAL traits bigger
//! than these drivers.

pub mod blk;
pub mod mmio;
pub mod queue;
pub mod vsock;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// VIRTIO_F_VERSION_1: the modern interface; the only one the probe speaks.
pub const F_VERSION_1: u64 = 1 << 32;

/// Kicks a device's queue: the MMIO transport in the guest, a no-op in host
/// unit tests (where a thread plays the device and polls).
pub trait Notify {
    fn notify(&self, queue: u32);
}

impl Notify for &mmio::Mmio {
    fn notify(&self, queue: u32) {
        mmio::Mmio::notify(self, queue);
    }
}
