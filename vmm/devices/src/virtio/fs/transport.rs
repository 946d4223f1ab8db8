//! The virtio-mmio transport as a vhost-user device needs it.
//!
//! The back-end signals used buffers by writing the irqfd itself, so the
//! transport's InterruptStatus never learns of them. Linux's virtio-mmio
//! interrupt handler reads InterruptStatus first and returns IRQ_NONE when
//! the used-ring bit is clear, so the guest would never see a completion (and
//! would soon disable the line as spurious). Once the driver is up
//! (DRIVER_OK), reads of InterruptStatus therefore always show the used-ring
//! bit. The cost: on any interrupt of this line the guest scans every queue
//! for used buffers, and finds none on a config-change interrupt.

use crate::virtio::mmio::MmioTransport;
use crate::virtio::INTERRUPT_STATUS_USED_RING;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

/// InterruptStatus in the virtio-mmio register file (virtio 1.2, 4.2.2).
pub const INTERRUPT_STATUS_OFFSET: u64 = 0x60;

/// An [`MmioTransport`] whose InterruptStatus reads include the used-ring
/// bit while the driver is up.
pub struct VhostUserMmio(MmioTransport);

impl VhostUserMmio {
    pub fn new(transport: MmioTransport) -> Self {
        Self(transport)
    }

    pub fn transport(&self) -> &MmioTransport {
        &self.0
    }
}

impl MutDeviceMmio for VhostUserMmio {
    fn mmio_read(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.mmio_read(base, offset, data);
        if offset == INTERRUPT_STATUS_OFFSET
            && self.0.status() & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && data.len() == 4
        {
            data[0] |= INTERRUPT_STATUS_USED_RING as u8;
        }
    }

    fn mmio_write(&mut self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.mmio_write(base, offset, data);
    }
}
