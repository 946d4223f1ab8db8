//! virtio-mmio transport, version 2 (virtio 1.x) only.
//!
//! The transport is a register file at offsets 0..0x100 plus the device's
//! config space from 0x100. It owns the queue configuration the driver writes
//! and, on DRIVER_OK, hands fresh `Queue`s to the device.
//!
//! Lock order: whoever owns the transport (the VMM's MMIO bus) locks it first;
//! the transport then takes the device mutex only for the duration of one
//! device call and never holds it across another lock. The event loop takes
//! only the device mutex, so the two paths cannot deadlock.

use super::{ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::guest_warn;
use crate::GuestMemoryMmap;
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
pub const MMIO_VERSION: u32 = 2;
/// We are nobody's PCI vendor; Linux does not look at this.
pub const MMIO_VENDOR_ID: u32 = 0;
/// Size of the MMIO window each device needs (registers plus config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify; the VMM registers ioeventfds at `base + this`.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// The virtio-mmio register offsets (virtio 1.2, 4.2.2), for the
/// transport and for tests that drive it as a guest driver would.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

const STATUS_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("device has no queues; virtio-mmio needs at least one")]
    NoQueues,
    #[error("queue {index} has invalid maximum size {max_size}")]
    QueueMaxSize {
        index: usize,
        max_size: u16,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("failed to create the notification eventfd for queue {index}")]
    QueueEvent {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Why a DRIVER_OK did not activate the device (all become DEVICE_NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum ActivationFailure {
    #[error("queue {0} is ready but an earlier queue is not; queues must be set up in order")]
    QueueGap(usize),
    #[error("queue {0} is not valid in guest memory")]
    InvalidQueue(usize),
    #[error("failed to copy queue {0}")]
    QueueCopy(usize, #[source] virtio_queue::Error),
    #[error("failed to clone the notification eventfd of queue {0}")]
    EventClone(usize, #[source] std::io::Error),
    #[error("device refused activation")]
    Device(#[source] ActivateError),
}

pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioInterrupt>,
    // Fixed properties of the device, cached so that most register reads do
    // not need the device lock.
    device_type: u32,
    avail_features: u64,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues);
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_events = Vec::with_capacity(max_sizes.len());
        for (index, &max_size) in max_sizes.iter().enumerate() {
            let queue = Queue::new(max_size).map_err(|source| MmioError::QueueMaxSize {
                index,
                max_size,
                source,
            })?;
            queues.push(queue);
            queue_events.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEvent { index, source })?,
            );
        }
        Ok(Self {
            mem,
            device,
            interrupt,
            device_type,
            avail_features,
            queues,
            queue_events,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, in queue order. The VMM registers each as a KVM
    /// ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with datamatch = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device status register as the driver sees it.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: the spec's "not present" is a length of -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    offset,
                    "virtio-mmio: read of unknown or write-only register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.write_status(value),
            reg::SHM_SEL => {}
            _ => guest_warn!(
                offset,
                value,
                "virtio-mmio: write to unknown or read-only register"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & (STATUS_DRIVER | STATUS_FEATURES_OK) != STATUS_DRIVER {
            guest_warn!(
                status = self.status,
                "virtio-mmio: driver features written outside the DRIVER state; ignored"
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            sel => guest_warn!(
                sel,
                "virtio-mmio: driver features page out of range; ignored"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues may be set up only between FEATURES_OK and DRIVER_OK.
        let wanted = STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK;
        if self.status != wanted {
            guest_warn!(
                offset,
                status = self.status,
                "virtio-mmio: queue register written in the wrong state; ignored"
            );
            return;
        }
        let queue_sel = self.queue_sel;
        let Some(queue) = self.queues.get_mut(queue_sel as usize) else {
            guest_warn!(
                queue_sel,
                "virtio-mmio: queue register written for a missing queue"
            );
            return;
        };
        // The setters below ignore invalid values (size not a power of two,
        // misaligned rings); `is_valid` catches the result at DRIVER_OK.
        match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) if queue.try_set_size(size).is_ok() => {}
                _ => guest_warn!(value, "virtio-mmio: invalid queue size; ignored"),
            },
            reg::QUEUE_READY => queue.set_ready(value == 1),
            reg::QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            reg::QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            reg::QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            reg::QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            reg::QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            reg::QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    fn notify_queue(&self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!(index, error = %e, "virtio-mmio: failed to signal queue event");
                }
            }
            None => guest_warn!(index, "virtio-mmio: notify for a missing queue"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's to set; drivers echo it back when they
        // OR new bits into the status they read.
        let current = self.status & !STATUS_NEEDS_RESET;
        let requested = value & !STATUS_NEEDS_RESET;
        if requested & current != current {
            guest_warn!(
                current,
                requested,
                "virtio-mmio: status bits may only be cleared by a reset; ignored"
            );
            return;
        }
        let added = requested & !current;
        if current & STATUS_FAILED != 0 && added != 0 {
            guest_warn!(
                requested,
                "virtio-mmio: status change after FAILED; reset first"
            );
            return;
        }
        if added == STATUS_FAILED {
            self.status |= STATUS_FAILED;
            return;
        }
        let added = added & !STATUS_FAILED;
        let failed = requested & STATUS_FAILED;
        match (current & !STATUS_FAILED, added) {
            (_, 0) => {}
            (0, STATUS_ACK) => self.status |= STATUS_ACK,
            (c, STATUS_DRIVER) if c == STATUS_ACK => self.status |= STATUS_DRIVER,
            (c, STATUS_FEATURES_OK) if c == STATUS_ACK | STATUS_DRIVER => {
                if self.features_acceptable() {
                    lock(&self.device).set_acked_features(self.acked_features);
                    self.status |= STATUS_FEATURES_OK;
                } else {
                    guest_warn!(
                        acked = self.acked_features,
                        offered = self.avail_features,
                        "virtio-mmio: driver features refused (not offered, or no VERSION_1)"
                    );
                }
            }
            (c, STATUS_DRIVER_OK) if c == STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK => {
                self.status |= STATUS_DRIVER_OK;
                if self.status & STATUS_NEEDS_RESET == 0 {
                    self.activate();
                }
            }
            _ => {
                guest_warn!(
                    current,
                    requested,
                    "virtio-mmio: invalid status transition; ignored"
                );
                return;
            }
        }
        self.status |= failed;
    }

    fn features_acceptable(&self) -> bool {
        let version_1 = 1u64 << VIRTIO_F_VERSION_1;
        self.acked_features & !self.avail_features == 0 && self.acked_features & version_1 != 0
    }

    fn activate(&mut self) {
        if let Err(e) = self.try_activate() {
            guest_warn!(error = %e, "virtio-mmio: activation failed; device needs reset");
            self.status |= STATUS_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
            if let Err(e) = self.interrupt.signal_config_change() {
                tracing::error!(error = %e, "virtio-mmio: failed to raise config-change interrupt");
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), ActivationFailure> {
        let ready = self.queues.iter().take_while(|q| q.ready()).count();
        if let Some(gap) = self.queues.iter().skip(ready).position(|q| q.ready()) {
            return Err(ActivationFailure::QueueGap(ready + gap));
        }
        let event_idx = self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(ready);
        let mut queue_events = Vec::with_capacity(ready);
        for (index, queue) in self.queues.iter().take(ready).enumerate() {
            if !queue.is_valid(&self.mem) {
                return Err(ActivationFailure::InvalidQueue(index));
            }
            let mut copy = Queue::try_from(queue.state())
                .map_err(|e| ActivationFailure::QueueCopy(index, e))?;
            copy.set_event_idx(event_idx);
            queues.push(copy);
            queue_events.push(
                self.queue_events[index]
                    .try_clone()
                    .map_err(|e| ActivationFailure::EventClone(index, e))?,
            );
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(ActivationFailure::Device)
    }

    fn reset(&mut self) {
        // A device that was never activated has nothing to undo; drivers reset
        // before every handshake, so this must work even for devices that
        // cannot reset once running.
        let mut device = lock(&self.device);
        let reset_ok = !device.is_activated() || device.reset();
        drop(device);
        if !reset_ok {
            guest_warn!("virtio-mmio: device cannot be reset; marking it as needing reset");
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        // Drop notifications left over from before the reset.
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.interrupt.ack(u32::MAX);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }
}

/// A poisoned device mutex means a device call panicked; the register file
/// must still answer, so take the state as it is.
fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn register_offset(offset: u64, len: usize) -> Option<u64> {
    (len == 4 && offset % 4 == 0 && offset < reg::CONFIG).then_some(offset)
}

impl MutDeviceMmio for MmioTransport {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        match register_offset(offset, data.len()) {
            Some(offset) => data.copy_from_slice(&self.read_register(offset).to_le_bytes()),
            None => guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register read of wrong width or alignment"
            ),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & STATUS_DRIVER == 0 {
                guest_warn!(offset, "virtio-mmio: config write before DRIVER; ignored");
                return;
            }
            lock(&self.device).write_config(offset - reg::CONFIG, data);
            return;
        }
        let Some(offset) = register_offset(offset, data.len()) else {
            guest_warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register write of wrong width or alignment"
            );
            return;
        };
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_utils::CountingTrigger;
    use crate::virtio::test_utils::{guest_memory, TestQueue};
    use crate::virtio::TYPE_BLOCK;
    use std::sync::atomic::Ordering;

    const BASE: MmioAddress = MmioAddress(0xd000_0000);
    const FEATURE_X: u64 = 1 << 5;

    /// Records what the transport does to it.
    struct FakeDevice {
        max_sizes: Vec<u16>,
        acked: u64,
        config: [u8; 8],
        activations: Vec<(usize, Vec<u16>, Vec<u64>)>,
        active: bool,
        resets: usize,
        can_reset: bool,
        fail_activate: bool,
    }

    impl FakeDevice {
        fn new(queues: usize) -> Self {
            Self {
                max_sizes: vec![16; queues],
                acked: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activations: Vec::new(),
                active: false,
                resets: 0,
                can_reset: true,
                fail_activate: false,
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn avail_features(&self) -> u64 {
            (1u64 << VIRTIO_F_VERSION_1) | FEATURE_X
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked = features;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            if let Some(src) = self.config.get(start..start.saturating_add(data.len())) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            if let Some(dst) = self.config.get_mut(start..start.saturating_add(data.len())) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::Backend("test".into()));
            }
            self.activations.push((
                ctx.queues.len(),
                ctx.queues.iter().map(|q| q.size()).collect(),
                ctx.queues.iter().map(|q| q.desc_table()).collect(),
            ));
            // The events are clones of the transport's: writing one here must
            // be visible through the transport's copy.
            for evt in &ctx.queue_events {
                evt.write(1).unwrap();
            }
            self.active = true;
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            if self.can_reset {
                self.active = false;
            }
            self.can_reset
        }
        fn metrics(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
    }

    struct Fixture {
        transport: MmioTransport,
        device: Arc<Mutex<FakeDevice>>,
        trigger: Arc<CountingTrigger>,
    }

    fn fixture(dev: FakeDevice, mem: &GuestMemoryMmap) -> Fixture {
        let device = Arc::new(Mutex::new(dev));
        let trigger = Arc::new(CountingTrigger::default());
        let interrupt = Arc::new(VirtioInterrupt::new(trigger.clone()));
        let transport = MmioTransport::new(mem.clone(), device.clone(), interrupt).unwrap();
        Fixture {
            transport,
            device,
            trigger,
        }
    }

    impl Fixture {
        fn read(&mut self, offset: u64) -> u32 {
            let mut data = [0xffu8; 4];
            self.transport.mmio_read(BASE, offset, &mut data);
            u32::from_le_bytes(data)
        }
        fn write(&mut self, offset: u64, value: u32) {
            self.transport
                .mmio_write(BASE, offset, &value.to_le_bytes());
        }
        fn features_handshake(&mut self, acked: u64) {
            self.write(reg::STATUS, STATUS_ACK);
            self.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER);
            self.write(reg::DRIVER_FEATURES_SEL, 0);
            self.write(reg::DRIVER_FEATURES, acked as u32);
            self.write(reg::DRIVER_FEATURES_SEL, 1);
            self.write(reg::DRIVER_FEATURES, (acked >> 32) as u32);
            self.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        }
        fn setup_queue(&mut self, index: u32, tq: &TestQueue) {
            self.write(reg::QUEUE_SEL, index);
            self.write(reg::QUEUE_NUM, 16);
            self.write(reg::QUEUE_DESC_LOW, tq.desc_table_addr() as u32);
            self.write(reg::QUEUE_DESC_HIGH, (tq.desc_table_addr() >> 32) as u32);
            self.write(reg::QUEUE_AVAIL_LOW, tq.avail_addr() as u32);
            self.write(reg::QUEUE_AVAIL_HIGH, 0);
            self.write(reg::QUEUE_USED_LOW, tq.used_addr() as u32);
            self.write(reg::QUEUE_USED_HIGH, 0);
            self.write(reg::QUEUE_READY, 1);
        }
    }

    fn all_features() -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | FEATURE_X
    }

    #[test]
    fn identity_registers() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(2), &mem);
        assert_eq!(f.read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(f.read(reg::VERSION), 2);
        assert_eq!(f.read(reg::DEVICE_ID), TYPE_BLOCK);
        assert_eq!(f.read(reg::VENDOR_ID), MMIO_VENDOR_ID);
        f.write(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(f.read(reg::DEVICE_FEATURES), FEATURE_X as u32);
        f.write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(f.read(reg::DEVICE_FEATURES), 1);
        f.write(reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(f.read(reg::DEVICE_FEATURES), 0);
        f.write(reg::QUEUE_SEL, 1);
        assert_eq!(f.read(reg::QUEUE_NUM_MAX), 16);
        f.write(reg::QUEUE_SEL, 2);
        assert_eq!(f.read(reg::QUEUE_NUM_MAX), 0);
        assert_eq!(f.read(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(f.read(reg::SHM_LEN_HIGH), u32::MAX);
        assert_eq!(f.transport.queue_events().len(), 2);
    }

    #[test]
    fn full_handshake_activates_with_queues() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let tq1 = TestQueue::new(&mem, 0x4000, 16);
        let mut f = fixture(FakeDevice::new(2), &mem);
        f.features_handshake(all_features());
        assert_eq!(
            f.read(reg::STATUS),
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        assert_eq!(f.device.lock().unwrap().acked, all_features());
        f.setup_queue(0, &tq0);
        f.setup_queue(1, &tq1);
        f.write(reg::QUEUE_SEL, 1);
        assert_eq!(f.read(reg::QUEUE_READY), 1);
        f.write(
            reg::STATUS,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(
            f.read(reg::STATUS),
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        );
        let dev = f.device.lock().unwrap();
        assert_eq!(dev.activations.len(), 1);
        let (count, sizes, descs) = &dev.activations[0];
        assert_eq!(*count, 2);
        assert_eq!(sizes, &vec![16, 16]);
        assert_eq!(descs, &vec![tq0.desc_table_addr(), tq1.desc_table_addr()]);
        drop(dev);
        // The device wrote its clones of the queue events.
        for evt in f.transport.queue_events() {
            assert_eq!(evt.read().unwrap(), 1);
        }
    }

    #[test]
    fn queue_notify_writes_event() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(2), &mem);
        f.write(reg::QUEUE_NOTIFY, 1);
        assert!(f.transport.queue_events()[0].read().is_err());
        assert_eq!(f.transport.queue_events()[1].read().unwrap(), 1);
        // A missing queue is ignored.
        f.write(reg::QUEUE_NOTIFY, 7);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.transport.interrupt().signal_used_queue().unwrap();
        f.transport.interrupt().signal_config_change().unwrap();
        assert_eq!(f.read(reg::INTERRUPT_STATUS), 3);
        f.write(reg::INTERRUPT_ACK, 1);
        assert_eq!(f.read(reg::INTERRUPT_STATUS), 2);
        assert_eq!(f.trigger.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn reset_returns_to_initial_state() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(all_features());
        f.setup_queue(0, &tq0);
        f.write(reg::STATUS, 0xf);
        assert!(f.device.lock().unwrap().active);
        f.write(reg::STATUS, 0);
        assert_eq!(f.read(reg::STATUS), 0);
        assert_eq!(f.device.lock().unwrap().resets, 1);
        assert!(!f.device.lock().unwrap().active);
        assert_eq!(f.read(reg::QUEUE_READY), 0);
        assert_eq!(f.read(reg::QUEUE_NUM_MAX), 16);
        // The handshake can run again and activates a second time.
        f.features_handshake(all_features());
        f.setup_queue(0, &tq0);
        f.write(reg::STATUS, 0xf);
        assert_eq!(f.device.lock().unwrap().activations.len(), 2);
    }

    #[test]
    fn failed_reset_sets_needs_reset() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let mut dev = FakeDevice::new(1);
        dev.can_reset = false;
        let mut f = fixture(dev, &mem);
        f.features_handshake(all_features());
        f.setup_queue(0, &tq0);
        f.write(reg::STATUS, 0xf);
        assert!(f.device.lock().unwrap().active);
        f.write(reg::STATUS, 0);
        assert_eq!(f.read(reg::STATUS), 0xf | STATUS_NEEDS_RESET);
    }

    #[test]
    fn reset_before_activation_works_even_if_the_device_cannot_reset() {
        let mem = guest_memory();
        let mut dev = FakeDevice::new(1);
        dev.can_reset = false;
        let mut f = fixture(dev, &mem);
        f.write(reg::STATUS, STATUS_ACK);
        f.write(reg::STATUS, 0);
        assert_eq!(f.read(reg::STATUS), 0);
        assert_eq!(f.device.lock().unwrap().resets, 0);
    }

    #[test]
    fn feature_ack_without_version_1_is_refused() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(FEATURE_X);
        assert_eq!(f.read(reg::STATUS), STATUS_ACK | STATUS_DRIVER);
        assert_eq!(f.device.lock().unwrap().acked, 0);
    }

    #[test]
    fn feature_ack_of_unoffered_bit_is_refused() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(all_features() | (1 << 3));
        assert_eq!(f.read(reg::STATUS), STATUS_ACK | STATUS_DRIVER);
    }

    #[test]
    fn features_cannot_change_after_features_ok() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(1u64 << VIRTIO_F_VERSION_1);
        f.write(reg::DRIVER_FEATURES_SEL, 0);
        f.write(reg::DRIVER_FEATURES, FEATURE_X as u32);
        assert_eq!(f.transport.acked_features, 1u64 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn bad_status_transitions_are_ignored() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        // Skipping ACK.
        f.write(reg::STATUS, STATUS_DRIVER);
        assert_eq!(f.read(reg::STATUS), 0);
        // DRIVER_OK straight after ACK|DRIVER.
        f.write(reg::STATUS, STATUS_ACK);
        f.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER);
        f.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_DRIVER_OK);
        assert_eq!(f.read(reg::STATUS), STATUS_ACK | STATUS_DRIVER);
        // Clearing a bit without reset.
        f.write(reg::STATUS, STATUS_ACK);
        assert_eq!(f.read(reg::STATUS), STATUS_ACK | STATUS_DRIVER);
        // The driver cannot set NEEDS_RESET itself.
        f.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_NEEDS_RESET);
        assert_eq!(f.read(reg::STATUS), STATUS_ACK | STATUS_DRIVER);
        // FAILED is always accepted.
        f.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FAILED);
        assert_eq!(
            f.read(reg::STATUS),
            STATUS_ACK | STATUS_DRIVER | STATUS_FAILED
        );
        assert!(f.device.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn queue_registers_ignored_before_features_ok() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.write(reg::STATUS, STATUS_ACK);
        f.setup_queue(0, &tq0);
        assert_eq!(f.read(reg::QUEUE_READY), 0);
    }

    #[test]
    fn invalid_queue_fails_activation() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(all_features());
        f.write(reg::QUEUE_SEL, 0);
        f.write(reg::QUEUE_NUM, 16);
        // Rings far outside guest memory.
        f.write(reg::QUEUE_DESC_HIGH, 0x10);
        f.write(reg::QUEUE_AVAIL_HIGH, 0x10);
        f.write(reg::QUEUE_USED_HIGH, 0x10);
        f.write(reg::QUEUE_READY, 1);
        f.write(reg::STATUS, 0xf);
        assert_ne!(f.read(reg::STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(f.device.lock().unwrap().activations.is_empty());
        assert_eq!(f.read(reg::INTERRUPT_STATUS), 2);
        assert_eq!(f.trigger.count(), 1);
    }

    #[test]
    fn queue_gap_fails_activation() {
        let mem = guest_memory();
        let tq1 = TestQueue::new(&mem, 0x4000, 16);
        let mut f = fixture(FakeDevice::new(2), &mem);
        f.features_handshake(all_features());
        f.setup_queue(1, &tq1);
        f.write(reg::STATUS, 0xf);
        assert_ne!(f.read(reg::STATUS) & STATUS_NEEDS_RESET, 0);
        assert!(f.device.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn device_activation_error_sets_needs_reset() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let mut dev = FakeDevice::new(1);
        dev.fail_activate = true;
        let mut f = fixture(dev, &mem);
        f.features_handshake(all_features());
        f.setup_queue(0, &tq0);
        f.write(reg::STATUS, 0xf);
        assert_eq!(f.read(reg::STATUS), 0xf | STATUS_NEEDS_RESET);
        assert_eq!(f.read(reg::INTERRUPT_STATUS), 2);
        // Echoing NEEDS_RESET back and then resetting recovers.
        f.write(reg::STATUS, 0);
        assert_eq!(f.read(reg::STATUS), 0);
    }

    #[test]
    fn wrong_width_accesses_are_ignored() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        let mut two = [0xffu8; 2];
        f.transport.mmio_read(BASE, reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xffu8; 8];
        f.transport.mmio_read(BASE, reg::MAGIC_VALUE, &mut eight);
        assert_eq!(eight, [0; 8]);
        let mut four = [0xffu8; 4];
        f.transport.mmio_read(BASE, reg::MAGIC_VALUE + 1, &mut four);
        assert_eq!(four, [0; 4]);
        f.transport.mmio_write(BASE, reg::STATUS, &[1]);
        f.transport
            .mmio_write(BASE, reg::STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f.read(reg::STATUS), 0);
    }

    #[test]
    fn config_space_is_forwarded() {
        let mem = guest_memory();
        let mut f = fixture(FakeDevice::new(1), &mem);
        let mut data = [0u8; 2];
        f.transport.mmio_read(BASE, reg::CONFIG + 2, &mut data);
        assert_eq!(data, [3, 4]);
        // Writes before DRIVER are ignored.
        f.transport.mmio_write(BASE, reg::CONFIG, &[9]);
        assert_eq!(f.device.lock().unwrap().config[0], 1);
        f.write(reg::STATUS, STATUS_ACK);
        f.write(reg::STATUS, STATUS_ACK | STATUS_DRIVER);
        f.transport.mmio_write(BASE, reg::CONFIG, &[9]);
        assert_eq!(f.device.lock().unwrap().config[0], 9);
        // Past the end reads as zero.
        let mut data = [0xffu8; 4];
        f.transport.mmio_read(BASE, reg::CONFIG + 6, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn every_offset_and_width_never_panics() {
        let mem = guest_memory();
        let tq0 = TestQueue::new(&mem, 0x0, 16);
        let mut f = fixture(FakeDevice::new(1), &mem);
        f.features_handshake(all_features());
        f.setup_queue(0, &tq0);
        f.write(reg::STATUS, 0xf);
        for offset in 0..0x200u64 {
            for len in [0usize, 1, 2, 3, 4, 8] {
                let mut data = vec![0u8; len];
                f.transport.mmio_read(BASE, offset, &mut data);
            }
        }
        for offset in (0..0x110u64).filter(|o| *o != reg::STATUS) {
            for len in [1usize, 2, 4, 8] {
                f.transport.mmio_write(BASE, offset, &vec![0xff; len]);
            }
        }
        let mut data = [0u8; 4];
        f.transport.mmio_read(BASE, u64::MAX - 1, &mut data);
        f.transport.mmio_write(BASE, u64::MAX - 1, &data);
        // Random junk into STATUS last.
        for value in [0xffu32, 0x40, 0x80, 0x4, 0x0] {
            f.write(reg::STATUS, value);
        }
        assert_eq!(f.read(reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    }
}
