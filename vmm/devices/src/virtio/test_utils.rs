//! Driver-side fixtures for device tests: guest memory in plain process memory
//! and virtqueues laid out by `virtio_queue::mock::MockSplitQueue`.

use crate::GuestMemoryMmap;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::{Descriptor as SplitDescriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Size of the guest memory built by [`guest_memory`].
pub const MEM_SIZE: usize = 0x100_0000;
/// Where tests put data buffers: above any queue built by these helpers.
pub const DATA_ADDR: u64 = 0x10_0000;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test guest memory")
}

/// One descriptor as the test writes it into the table.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    /// `None`: link to the following descriptor of the slice (NEXT set on all
    /// but the last). `Some(n)`: write flags and next exactly as given.
    pub next: Option<u16>,
}

impl RawDesc {
    pub fn new(addr: u64, len: u32, flags: u32) -> Self {
        Self {
            addr,
            len,
            flags: flags as u16,
            next: None,
        }
    }

    pub fn linked(addr: u64, len: u32, flags: u32, next: u16) -> Self {
        Self {
            addr,
            len,
            flags: flags as u16,
            next: Some(next),
        }
    }
}

/// A split virtqueue driven from the test (driver) side.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    vq: MockSplitQueue<'a, GuestMemoryMmap>,
    size: u16,
    next_free: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, start: u64, size: u16) -> Self {
        Self {
            mem,
            vq: MockSplitQueue::create(mem, GuestAddress(start), size),
            size,
            next_free: 0,
        }
    }

    /// Writes `descs` into consecutive table slots and publishes the first as
    /// a new available chain. Returns the head index.
    pub fn add_chain(&mut self, descs: &[RawDesc]) -> u16 {
        let base = self.next_free;
        for (pos, d) in descs.iter().enumerate() {
            let index = (base + pos as u16) % self.size;
            let (flags, next) = match d.next {
                Some(next) => (d.flags, next),
                None if pos + 1 < descs.len() => {
                    (d.flags | VRING_DESC_F_NEXT as u16, (index + 1) % self.size)
                }
                None => (d.flags & !(VRING_DESC_F_NEXT as u16), 0),
            };
            let raw = RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next));
            self.vq.desc_table().store(index, raw).expect("store desc");
        }
        self.next_free = (base + descs.len() as u16) % self.size;
        self.publish(base);
        base
    }

    /// Puts `head` in the available ring, whatever it points to.
    pub fn publish(&mut self, head: u16) {
        let idx = self.vq.avail().idx().load();
        self.vq
            .avail()
            .ring()
            .ref_at(usize::from(idx % self.size))
            .expect("avail slot")
            .store(head);
        self.vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Overwrites the avail index directly (to fake a hostile driver).
    pub fn set_avail_idx(&self, idx: u16) {
        self.vq.avail().idx().store(idx);
    }

    /// A device-side queue for this ring, ready to use.
    pub fn queue(&self) -> Queue {
        self.vq.create_queue::<Queue>().expect("queue")
    }

    pub fn used_idx(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// (head id, written length) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let elem: VirtqUsedElem = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from(i % self.size))
            .expect("used slot")
            .load();
        (elem.id(), elem.len())
    }

    pub fn desc_table_addr(&self) -> u64 {
        self.vq.desc_table_addr().0
    }

    pub fn avail_addr(&self) -> u64 {
        self.vq.avail_addr().0
    }

    pub fn used_addr(&self) -> u64 {
        self.vq.used_addr().0
    }

    pub fn mem(&self) -> &'a GuestMemoryMmap {
        self.mem
    }
}

/// Builds one chain in a 16-entry queue at address 0 and pops it. For tests of
/// code that works on a single `DescriptorChain`.
pub fn build_chain<'a>(
    mem: &'a GuestMemoryMmap,
    descs: &[RawDesc],
) -> (Queue, DescriptorChain<&'a GuestMemoryMmap>) {
    let mut tq = TestQueue::new(mem, 0, 16);
    tq.add_chain(descs);
    let mut queue = tq.queue();
    let chain = queue.pop_descriptor_chain(mem).expect("chain");
    (queue, chain)
}

/// Fills guest memory at `addr` with `data`.
pub fn write_guest(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(addr))
        .expect("write guest");
}

pub fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr))
        .expect("read guest");
    buf
}

/// A file under the system temp dir, removed on drop.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn with_contents(contents: &[u8]) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "microvm-devices-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write temp file");
        Self { path }
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read temp file")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
