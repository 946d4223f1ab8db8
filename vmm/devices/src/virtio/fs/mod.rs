//! virtio-fs over a vhost-user back-end (virtiofsd).
//!
//! This device keeps the control path: the virtio-mmio transport, the config
//! space (mount tag and request-queue count) and the feature offer. On
//! DRIVER_OK it hands the rings to the back-end with the `vhost` crate's
//! front-end: SET_FEATURES, SET_MEM_TABLE (the guest-RAM memfd), and per
//! queue SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE. The kick fds are the
//! transport's queue-notify eventfds (which the VMM registers as KVM
//! ioeventfds) and the call fd is the device's irqfd, so the data path never
//! passes through the VMM. Nothing here knows of KVM: the VMM fills a
//! [`VhostUserFsConfig`] from its own config and wires the two eventfds.
//!
//! Interrupt status: see [`transport`]. Back-end failure: the event loop
//! watches the socket; a hang-up marks the device failed (logged once,
//! counted in the metrics); the VMM keeps running and the guest's I/O on the
//! share stops. A later DRIVER_OK on a failed device gets DEVICE_NEEDS_RESET.
//!
//! Lock order: as for every virtio device, transport then device. vhost-user
//! requests are made only with the device lock held, on the vCPU thread that
//! activates or resets the device; the event loop takes the same lock before
//! looking at the socket.

mod config_space;
mod connection;
mod device;
mod event_handler;
mod metrics;
pub mod transport;

pub use config_space::CONFIG_SPACE_SIZE;
pub use connection::{ConnectionError, REQUEST_TIMEOUT};
pub use device::{FsError, FsState, VhostUserFs, VhostUserFsConfig};
pub use metrics::FsMetrics;
pub use transport::VhostUserMmio;

/// Longest mount tag the virtio-fs config space holds (bytes of UTF-8).
pub const FS_TAG_MAX_LEN: usize = 36;
/// Re-exported so that code outside this crate (integration tests) can drive
/// a transport without depending on `vm-device` itself.
pub use vm_device::bus::MmioAddress;
pub use vm_device::MutDeviceMmio;

#[cfg(test)]
mod tests;
