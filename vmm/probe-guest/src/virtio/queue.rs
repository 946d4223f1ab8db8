//! The driver side of a split virtqueue (virtio 1.2, 2.7) in DMA memory.

use crate::dma::{self, DmaBuf};
use crate::fail::{Fail, Result};
use core::sync::atomic::{fence, Ordering};

pub const MAX_QUEUE_SIZE: u16 = 32;
/// The longest chain any probe request uses (blk: header, data, status).
pub const MAX_CHAIN: usize = 4;

const DESC_SIZE: usize = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const RING_HEADER: usize = 4;
const USED_ELEM_SIZE: usize = 8;

/// One buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Segment {
    /// A buffer the device reads.
    pub fn out(buf: &DmaBuf) -> Self {
        Self {
            addr: buf.addr(),
            len: len_u32(buf),
            device_writes: false,
        }
    }

    /// A buffer the device writes.
    pub fn input(buf: &DmaBuf) -> Self {
        Self {
            addr: buf.addr(),
            len: len_u32(buf),
            device_writes: true,
        }
    }
}

fn len_u32(buf: &DmaBuf) -> u32 {
    u32::try_from(buf.len()).unwrap_or(u32::MAX)
}

/// A completed chain: its head descriptor and the bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

pub struct SplitQueue {
    size: u16,
    desc: DmaBuf,
    avail: DmaBuf,
    used: DmaBuf,
    free: [u16; MAX_QUEUE_SIZE as usize],
    free_count: usize,
    /// Descriptors of each in-flight chain, by head; length 0 = not in flight.
    chains: [([u16; MAX_CHAIN], u8); MAX_QUEUE_SIZE as usize],
    next_avail: u16,
    last_used: u16,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two up to `MAX_QUEUE_SIZE`).
    pub fn new(size: u16) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Fail::with("bad queue size", u64::from(size)));
        }
        let n = usize::from(size);
        let out_of_memory = Fail::new("out of dma memory");
        let desc = dma::alloc(DESC_SIZE * n, 64).ok_or(out_of_memory)?;
        let avail = dma::alloc(RING_HEADER + 2 * n + 2, 64).ok_or(out_of_memory)?;
        let used = dma::alloc(RING_HEADER + USED_ELEM_SIZE * n + 2, 64).ok_or(out_of_memory)?;
        let mut free = [0u16; MAX_QUEUE_SIZE as usize];
        for (i, slot) in free.iter_mut().enumerate().take(n) {
            // Popped from the end: descriptor 0 is handed out first.
            *slot = size - 1 - i as u16;
        }
        Ok(Self {
            size,
            desc,
            avail,
            used,
            free,
            free_count: n,
            chains: [([0; MAX_CHAIN], 0); MAX_QUEUE_SIZE as usize],
            next_avail: 0,
            last_used: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn desc_addr(&self) -> u64 {
        self.desc.addr()
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail.addr()
    }

    pub fn used_addr(&self) -> u64 {
        self.used.addr()
    }

    pub fn free_descriptors(&self) -> usize {
        self.free_count
    }

    /// Publishes a chain to the device (the caller notifies); returns its head.
    pub fn add(&mut self, segments: &[Segment]) -> Result<u16> {
        if segments.is_empty() || segments.len() > MAX_CHAIN {
            return Err(Fail::with("bad chain length", segments.len() as u64));
        }
        if segments.len() > self.free_count {
            return Err(Fail::new("virtqueue full"));
        }
        let mut ids = [0u16; MAX_CHAIN];
        for id in ids.iter_mut().take(segments.len()) {
            self.free_count -= 1;
            *id = self.free[self.free_count];
        }
        for (i, segment) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let mut flags = if last { 0 } else { DESC_F_NEXT };
            if segment.device_writes {
                flags |= DESC_F_WRITE;
            }
            let base = DESC_SIZE * usize::from(ids[i]);
            self.desc.write::<u64>(base, segment.addr);
            self.desc.write::<u32>(base + 8, segment.len);
            self.desc.write::<u16>(base + 12, flags);
            self.desc
                .write::<u16>(base + 14, if last { 0 } else { ids[i + 1] });
        }
        let head = ids[0];
        self.chains[usize::from(head)] = (ids, segments.len() as u8);
        let slot = usize::from(self.next_avail % self.size);
        self.avail.write::<u16>(RING_HEADER + 2 * slot, head);
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::Release);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.avail.write::<u16>(2, self.next_avail);
        Ok(head)
    }

    /// Takes the next completed chain, if any, and frees its descriptors.
    /// The device's answer is checked: a head that is not in flight or a used
    /// index that ran ahead is an error (a broken or hostile VMM).
    pub fn pop_used(&mut self) -> Result<Option<Used>> {
        let used_idx = self.used.read::<u16>(2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.size {
            return Err(Fail::with("used index ran ahead", u64::from(used_idx)));
        }
        // Read the element only after seeing the index that published it.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let id = self.used.read::<u32>(RING_HEADER + USED_ELEM_SIZE * slot);
        let len = self
            .used
            .read::<u32>(RING_HEADER + USED_ELEM_SIZE * slot + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&head| head < self.size && self.chains[usize::from(head)].1 != 0)
            .ok_or(Fail::with("used id not in flight", u64::from(id)))?;
        let (ids, count) = self.chains[usize::from(head)];
        for &desc in ids.iter().take(usize::from(count)) {
            self.free[self.free_count] = desc;
            self.free_count += 1;
        }
        self.chains[usize::from(head)].1 = 0;
        Ok(Some(Used { head, len }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::vec::Vec;

    /// The device side, reading and writing the rings the way a VMM would.
    pub(crate) struct FakeDevice {
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub size: u16,
        pub next_avail: u16,
        pub next_used: u16,
    }

    /// A chain as the device sees it: (addr, len, device-writable).
    pub(crate) type Chain = Vec<(u64, u32, bool)>;

    fn peek<T: Copy>(addr: u64) -> T {
        // SAFETY: tests only pass addresses inside queues from the arena.
        unsafe { core::ptr::read_volatile(addr as *const T) }
    }

    fn poke<T: Copy>(addr: u64, value: T) {
        // SAFETY: as in `peek`.
        unsafe { core::ptr::write_volatile(addr as *mut T, value) }
    }

    impl FakeDevice {
        pub fn new(queue: &SplitQueue) -> Self {
            Self {
                desc: queue.desc_addr(),
                avail: queue.avail_addr(),
                used: queue.used_addr(),
                size: queue.size(),
                next_avail: 0,
                next_used: 0,
            }
        }

        /// Pops the next available chain: (head, chain).
        pub fn pop(&mut self) -> Option<(u16, Chain)> {
            if peek::<u16>(self.avail + 2) == self.next_avail {
                return None;
            }
            let slot = u64::from(self.next_avail % self.size);
            let head = peek::<u16>(self.avail + 4 + 2 * slot);
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut chain = Vec::new();
            let mut id = head;
            loop {
                let d = self.desc + 16 * u64::from(id);
                let flags = peek::<u16>(d + 12);
                chain.push((
                    peek::<u64>(d),
                    peek::<u32>(d + 8),
                    flags & DESC_F_WRITE != 0,
                ));
                if flags & DESC_F_NEXT == 0 {
                    break;
                }
                id = peek::<u16>(d + 14);
                assert!(chain.len() <= usize::from(self.size), "descriptor loop");
            }
            Some((head, chain))
        }

        pub fn complete(&mut self, head: u32, len: u32) {
            let slot = u64::from(self.next_used % self.size);
            poke::<u32>(self.used + 4 + 8 * slot, head);
            poke::<u32>(self.used + 8 + 8 * slot, len);
            self.next_used = self.next_used.wrapping_add(1);
            poke::<u16>(self.used + 2, self.next_used);
        }

        /// Writes `data` into the device-writable buffers of `chain`, in order.
        pub fn write_chain(chain: &Chain, data: &[u8]) -> u32 {
            let mut written = 0usize;
            for &(addr, len, writable) in chain {
                if !writable {
                    continue;
                }
                let take = (len as usize).min(data.len() - written);
                for i in 0..take {
                    poke::<u8>(addr + i as u64, data[written + i]);
                }
                written += take;
            }
            written as u32
        }

        /// Reads the device-readable buffers of `chain`, in order.
        pub fn read_chain(chain: &Chain) -> Vec<u8> {
            let mut out = Vec::new();
            for &(addr, len, writable) in chain {
                if !writable {
                    out.extend((0..u64::from(len)).map(|i| peek::<u8>(addr + i)));
                }
            }
            out
        }
    }

    #[test]
    fn chains_reach_the_device_and_come_back() {
        let mut queue = SplitQueue::new(4).unwrap();
        let mut device = FakeDevice::new(&queue);
        let a = dma::alloc(16, 8).unwrap();
        let b = dma::alloc(32, 8).unwrap();
        let head = queue.add(&[Segment::out(&a), Segment::input(&b)]).unwrap();
        assert_eq!(queue.free_descriptors(), 2);
        let (seen_head, chain) = device.pop().unwrap();
        assert_eq!(seen_head, head);
        assert_eq!(chain, [(a.addr(), 16, false), (b.addr(), 32, true)]);
        assert!(device.pop().is_none());
        assert_eq!(queue.pop_used().unwrap(), None);
        device.complete(u32::from(head), 32);
        assert_eq!(queue.pop_used().unwrap(), Some(Used { head, len: 32 }));
        assert_eq!(queue.free_descriptors(), 4);
    }

    #[test]
    fn out_of_order_completion_and_index_wrap() {
        let mut queue = SplitQueue::new(8).unwrap();
        let mut device = FakeDevice::new(&queue);
        let buf = dma::alloc(8, 8).unwrap();
        // Past 65536 so both ring indices wrap.
        for _ in 0..(70_000 / 2) {
            let first = queue.add(&[Segment::out(&buf)]).unwrap();
            let second = queue
                .add(&[Segment::input(&buf), Segment::input(&buf)])
                .unwrap();
            assert_eq!(device.pop().unwrap().0, first);
            assert_eq!(device.pop().unwrap().0, second);
            device.complete(u32::from(second), 5);
            device.complete(u32::from(first), 0);
            assert_eq!(
                queue.pop_used().unwrap(),
                Some(Used {
                    head: second,
                    len: 5
                })
            );
            assert_eq!(
                queue.pop_used().unwrap(),
                Some(Used {
                    head: first,
                    len: 0
                })
            );
        }
        assert_eq!(queue.free_descriptors(), 8);
    }

    #[test]
    fn full_queue_is_an_error_not_a_panic() {
        let mut queue = SplitQueue::new(2).unwrap();
        let buf = dma::alloc(8, 8).unwrap();
        queue
            .add(&[Segment::out(&buf), Segment::out(&buf)])
            .unwrap();
        assert_eq!(
            queue.add(&[Segment::out(&buf)]),
            Err(Fail::new("virtqueue full"))
        );
        assert!(queue.add(&[]).is_err());
        assert!(SplitQueue::new(3).is_err());
        assert!(SplitQueue::new(64).is_err());
    }

    #[test]
    fn bogus_device_answers_are_rejected() {
        let mut queue = SplitQueue::new(4).unwrap();
        let mut device = FakeDevice::new(&queue);
        let buf = dma::alloc(8, 8).unwrap();
        let head = queue.add(&[Segment::out(&buf)]).unwrap();
        device.pop().unwrap();
        device.complete(3, 0); // never handed out
        assert_eq!(
            queue.pop_used(),
            Err(Fail::with("used id not in flight", 3))
        );
        device.complete(u32::from(head), 0);
        assert_eq!(queue.pop_used().unwrap().unwrap().head, head);
        device.complete(u32::from(head), 0); // completed twice
        assert!(queue.pop_used().is_err());
        poke::<u16>(device.used + 2, device.next_used.wrapping_add(100));
        assert_eq!(
            queue.pop_used(),
            Err(Fail::with("used index ran ahead", 103))
        );
    }
}
