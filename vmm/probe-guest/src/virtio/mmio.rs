//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2). Registers are
//! accessed 32 bits wide with plain `mov`s, which any VMM's MMIO emulation
//! (including KVM's instruction emulator on a PVM host) decodes.

use super::queue::{SplitQueue, MAX_QUEUE_SIZE};
use super::{status, F_VERSION_1};
use crate::deadline;
use crate::fail::{Fail, Result};
use core::ptr;

pub const MAGIC_VALUE: u32 = 0x7472_6976;

const MAGIC: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
const CONFIG: usize = 0x100;

/// How long a device gets to finish a reset.
const RESET_TIMEOUT_MS: u64 = 1000;

/// What sits in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub version: u32,
    pub device_id: u32,
}

pub struct Mmio {
    base: usize,
}

impl Mmio {
    /// # Safety
    /// `base` must be the start of a virtio-mmio register window, or of MMIO
    /// space where 32-bit reads and writes have no harmful effect (an empty
    /// slot reads as zeros or all-ones).
    pub unsafe fn new(base: u64) -> Self {
        Self {
            base: base as usize,
        }
    }

    pub fn base(&self) -> u64 {
        self.base as u64
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: an aligned register inside the window `new` vouched for.
        unsafe { ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// The device in this slot, or `None` for an empty one (bad magic or
    /// device ID 0, which the spec reserves for "no device").
    pub fn identify(&self) -> Option<Identity> {
        if self.read(MAGIC) != MAGIC_VALUE {
            return None;
        }
        let device_id = self.read(DEVICE_ID);
        (device_id != 0).then(|| Identity {
            version: self.read(VERSION),
            device_id,
        })
    }

    fn status(&self) -> u32 {
        self.read(STATUS)
    }

    fn set_status(&self, bits: u32) {
        self.write(STATUS, bits);
    }

    /// Tells the device the driver gave up (best effort).
    pub fn fail(&self) {
        self.set_status(self.status() | status::FAILED);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation, FEATURES_OK. Accepts
    /// VERSION_1 plus whichever of `optional` the device offers; returns the
    /// accepted set.
    pub fn begin_init(&self, optional: u64) -> Result<u64> {
        self.set_status(0);
        deadline::poll(RESET_TIMEOUT_MS, || (self.status() == 0).then_some(()))
            .ok_or(Fail::new("device did not reset"))?;
        self.set_status(status::ACKNOWLEDGE);
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(DEVICE_FEATURES));
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.read(DEVICE_FEATURES));
        let offered = high << 32 | low;
        if offered & F_VERSION_1 == 0 {
            return Err(Fail::with("device lacks VIRTIO_F_VERSION_1", offered));
        }
        let accepted = F_VERSION_1 | (offered & optional);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        let driver = status::ACKNOWLEDGE | status::DRIVER;
        self.set_status(driver | status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(Fail::with("device refused features", accepted));
        }
        Ok(accepted)
    }

    /// Sets up queue `index` with up to `wanted` entries.
    pub fn setup_queue(&self, index: u32, wanted: u16) -> Result<SplitQueue> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 {
            return Err(Fail::with("queue already live", u64::from(index)));
        }
        let max = self.read(QUEUE_NUM_MAX);
        if max == 0 {
            return Err(Fail::with("queue not available", u64::from(index)));
        }
        let limit = u32::from(wanted.min(MAX_QUEUE_SIZE)).min(max);
        // Split rings are a power of two long: round down.
        let size = 1u16 << (31 - limit.leading_zeros());
        let queue = SplitQueue::new(size)?;
        self.write(QUEUE_NUM, u32::from(size));
        write_pair(self, QUEUE_DESC_LOW, QUEUE_DESC_HIGH, queue.desc_addr());
        write_pair(
            self,
            QUEUE_DRIVER_LOW,
            QUEUE_DRIVER_HIGH,
            queue.avail_addr(),
        );
        write_pair(self, QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, queue.used_addr());
        self.write(QUEUE_READY, 1);
        Ok(queue)
    }

    pub fn driver_ok(&self) -> Result<()> {
        self.set_status(
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        self.check_health()
    }

    /// Fails if the device has flagged itself broken.
    pub fn check_health(&self) -> Result<()> {
        let now = self.status();
        if now & status::NEEDS_RESET != 0 {
            return Err(Fail::with("device needs reset", u64::from(now)));
        }
        if now & status::DRIVER_OK == 0 {
            return Err(Fail::with("device dropped DRIVER_OK", u64::from(now)));
        }
        Ok(())
    }

    pub fn notify(&self, queue: u32) {
        self.write(QUEUE_NOTIFY, queue);
    }

    pub fn config_u32(&self, offset: usize) -> u32 {
        self.read(CONFIG + offset)
    }

    /// A 64-bit config field, read as two halves under the generation counter
    /// so a concurrent change cannot tear it.
    pub fn config_u64(&self, offset: usize) -> Result<u64> {
        for _ in 0..16 {
            let before = self.read(CONFIG_GENERATION);
            let low = u64::from(self.config_u32(offset));
            let high = u64::from(self.config_u32(offset + 4));
            if self.read(CONFIG_GENERATION) == before {
                return Ok(high << 32 | low);
            }
        }
        Err(Fail::new("config generation never settled"))
    }
}

fn write_pair(mmio: &Mmio, low: usize, high: usize, value: u64) {
    mmio.write(low, value as u32);
    mmio.write(high, (value >> 32) as u32);
}
