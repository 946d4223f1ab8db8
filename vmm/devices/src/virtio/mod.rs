//! Virtio devices and their MMIO transport.
//!
//! Shape (after Firecracker's `devices/virtio`): a device is shared as
//! `Arc<Mutex<D>>` between the MMIO transport (on vCPU threads) and the VMM's
//! event loop (`event_manager::MutEventSubscriber`). When the driver sets
//! DRIVER_OK the transport calls [`VirtioDevice::activate`]; the device stores
//! the queues and writes its own activate `EventFd`, and on that event (in the
//! event loop) it registers its queue and back-end fds with the event manager.
//!
//! Lock order: transport mutex, then device mutex. The event loop only ever
//! takes the device mutex, so the two cannot deadlock.

pub mod block;
pub mod fs;
#[cfg(any(test, feature = "test-utils"))]
pub mod guest_ring;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod test_utils;
pub mod util;
pub mod vsock;

use crate::interrupt::IrqTrigger;
use crate::GuestMemoryMmap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit every device offers: modern (virtio 1.x) interface.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Interrupt status bits (virtio-mmio InterruptStatus register).
pub const INTERRUPT_STATUS_USED_RING: u32 = 0x1;
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 0x2;

/// Interrupt state shared by the transport (which reads and acks it) and the
/// device (which raises it).
pub struct VirtioInterrupt {
    status: AtomicU32,
    trigger: Arc<dyn IrqTrigger>,
}

impl VirtioInterrupt {
    pub fn new(trigger: Arc<dyn IrqTrigger>) -> Self {
        Self {
            status: AtomicU32::new(0),
            trigger,
        }
    }

    /// Tells the driver that the device has put buffers in a used ring.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_STATUS_USED_RING)
    }

    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.signal(INTERRUPT_STATUS_CONFIG_CHANGED)
    }

    fn signal(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.trigger.trigger()
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// One entry per queue the driver set up, in queue-index order.
    pub queues: Vec<Queue>,
    /// The per-queue notification events (clones of the transport's, which the
    /// VMM registers with KVM as ioeventfds).
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("driver set up {got} queues, the device needs {expected}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("device is already active")]
    AlreadyActive,
    #[error("failed to signal activation: {0}")]
    ActivateEvent(#[source] std::io::Error),
    #[error("back-end failed: {0}")]
    Backend(String),
}

/// A virtio device behind a transport. Implementations must never panic on
/// anything the guest does: bad config offsets read as zero, bad writes are
/// ignored with a rate-limited warning.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads the device-specific config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Hands the queues to the device (see the module docs).
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// Returns the device to its pre-activation state. Returns false if the
    /// device cannot be reset; the transport then marks it as needing reset.
    fn reset(&mut self) -> bool;
    /// Per-device counters for the control API.
    fn metrics(&self) -> serde_json::Value;
}
