//! A split virtqueue written from the guest's side at fixed addresses, for
//! tests that play the driver of a device they do not own the memory of
//! (the vhost-user devices' unit and integration tests), and the driver's
//! side of the virtio-mmio handshake. Unlike
//! `test_utils::TestQueue` it keeps no borrow of the memory, so a test
//! driver can hold it beside the guest RAM. Test code: panics on a memory
//! error.

use super::mmio::reg;
use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Device status bits as a driver writes them.
pub mod status {
    use virtio_bindings::virtio_config as config;
    pub const ACK: u32 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = config::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = config::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = config::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const NEEDS_RESET: u32 = config::VIRTIO_CONFIG_S_NEEDS_RESET;
}

/// A virtio-mmio register file seen from the guest.
pub trait DriverRegisters {
    fn read_reg(&mut self, offset: u64) -> u32;
    fn write_reg(&mut self, offset: u64, value: u32);
}

/// The driver's handshake: reset, ACKNOWLEDGE, DRIVER, `features`,
/// FEATURES_OK, queue `i` on `rings[i]`, DRIVER_OK. Returns the status
/// register after DRIVER_OK.
pub fn bring_up(regs: &mut impl DriverRegisters, features: u64, rings: &[GuestRing]) -> u32 {
    use status::{ACK, DRIVER, DRIVER_OK, FEATURES_OK};
    regs.write_reg(reg::STATUS, 0);
    regs.write_reg(reg::STATUS, ACK);
    regs.write_reg(reg::STATUS, ACK | DRIVER);
    regs.write_reg(reg::DRIVER_FEATURES_SEL, 0);
    regs.write_reg(reg::DRIVER_FEATURES, features as u32);
    regs.write_reg(reg::DRIVER_FEATURES_SEL, 1);
    regs.write_reg(reg::DRIVER_FEATURES, (features >> 32) as u32);
    regs.write_reg(reg::STATUS, ACK | DRIVER | FEATURES_OK);
    for (index, ring) in rings.iter().enumerate() {
        regs.write_reg(reg::QUEUE_SEL, index as u32);
        regs.write_reg(reg::QUEUE_NUM, u32::from(ring.size));
        regs.write_reg(reg::QUEUE_DESC_LOW, ring.desc as u32);
        regs.write_reg(reg::QUEUE_AVAIL_LOW, ring.avail as u32);
        regs.write_reg(reg::QUEUE_USED_LOW, ring.used as u32);
        regs.write_reg(reg::QUEUE_READY, 1);
    }
    regs.write_reg(reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    regs.read_reg(reg::STATUS)
}

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
/// Descriptors per chain slot: chains take fixed slots of the table.
const CHAIN_SLOT: u16 = 4;

/// One split ring: descriptor table at `base`, avail ring at `base +
/// 0x400`, used ring at `base + 0x800` (room for 64 entries each).
#[derive(Debug)]
pub struct GuestRing {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    size: u16,
    next_avail: u16,
}

impl GuestRing {
    pub fn at(base: u64, size: u16) -> Self {
        assert!(
            size.is_power_of_two() && (CHAIN_SLOT..=64).contains(&size),
            "queue size {size}"
        );
        Self {
            desc: base,
            avail: base + 0x400,
            used: base + 0x800,
            size,
            next_avail: 0,
        }
    }

    /// Makes a chain of (address, length, device-writable) buffers (at
    /// most four; `size / 4` chains in flight) available to the device.
    pub fn add(&mut self, mem: &GuestMemoryMmap, buffers: &[(u64, u32, bool)]) {
        assert!(buffers.len() <= usize::from(CHAIN_SLOT));
        let head = (self.next_avail % (self.size / CHAIN_SLOT)) * CHAIN_SLOT;
        for (i, (addr, len, writable)) in buffers.iter().enumerate() {
            let index = head + i as u16;
            let mut flags = if *writable { DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= DESC_F_NEXT;
            }
            let at = self.desc + u64::from(index) * 16;
            mem.write_obj(*addr, GuestAddress(at)).unwrap();
            mem.write_obj(*len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(index + 1, GuestAddress(at + 14)).unwrap();
        }
        let slot = self.avail + 4 + u64::from(self.next_avail % self.size) * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        mem.write_obj(self.next_avail, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Asks for an interrupt on the next completion (VIRTIO_F_EVENT_IDX's
    /// used_event field), as Linux does before it waits.
    pub fn request_interrupt_on_next(&self, mem: &GuestMemoryMmap) {
        let used_event = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.used_idx(mem), GuestAddress(used_event))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (descriptor head, bytes written) of used element `index`.
    pub fn used(&self, mem: &GuestMemoryMmap, index: u16) -> (u32, u32) {
        let at = self.used + 4 + u64::from(index % self.size) * 8;
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::guest_memory;

    #[test]
    fn chains_land_where_a_split_queue_reads_them() {
        use virtio_queue::{Queue, QueueOwnedT, QueueT};
        let mem = guest_memory();
        let mut ring = GuestRing::at(0x1000, 16);
        ring.add(&mem, &[(0x10_0000, 14, false), (0x11_0000, 64, true)]);
        ring.add(&mem, &[(0x12_0000, 8, false)]);
        let mut queue = Queue::new(16).unwrap();
        queue.set_desc_table_address(Some(ring.desc as u32), Some((ring.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(ring.avail as u32), Some(0));
        queue.set_used_ring_address(Some(ring.used as u32), Some(0));
        queue.set_ready(true);
        let chains: Vec<Vec<(u64, u32, bool)>> = queue
            .iter(&mem)
            .unwrap()
            .map(|chain| {
                chain
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect()
            })
            .collect();
        assert_eq!(
            chains,
            [
                vec![(0x10_0000, 14, false), (0x11_0000, 64, true)],
                vec![(0x12_0000, 8, false)]
            ]
        );
        queue.add_used(&mem, 0, 64).unwrap();
        assert_eq!(ring.used_idx(&mem), 1);
        assert_eq!(ring.used(&mem, 0), (0, 64));
    }
}
