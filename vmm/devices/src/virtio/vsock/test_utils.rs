//! Test helpers: a temporary directory, a fake fd registry and a minimal
//! virtio driver that plays the guest over plain memory.

use super::connection::Interest;
use super::muxer::FdRegistry;
use super::packet::{VsockHeader, HDR_SIZE};
use crate::interrupt::test_utils::CountingTrigger;
use crate::virtio::{ActivateContext, VirtioInterrupt};
use crate::GuestMemoryMmap;
use std::collections::HashMap;
use std::io;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vsock-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Records registrations and, like the event manager, refuses duplicates.
#[derive(Default)]
pub struct FakeRegistry {
    pub registered: HashMap<RawFd, Interest>,
    pub unregistered: Vec<RawFd>,
    /// Fail every registration.
    pub fail: bool,
}

impl FakeRegistry {
    pub fn interest(&self, fd: RawFd) -> Option<Interest> {
        self.registered.get(&fd).copied()
    }
}

impl FdRegistry for FakeRegistry {
    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("registration refused"));
        }
        if self.registered.insert(fd, interest).is_some() {
            return Err(io::ErrorKind::AlreadyExists.into());
        }
        Ok(())
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        match self.registered.get_mut(&fd) {
            Some(cur) => {
                *cur = interest;
                Ok(())
            }
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn unregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.registered
            .remove(&fd)
            .ok_or(io::Error::from(io::ErrorKind::NotFound))?;
        self.unregistered.push(fd);
        Ok(())
    }
}

const QUEUE_SIZE: u16 = 256;
const MEM_SIZE: usize = 0x400_0000;
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
const BUF_BASE: u64 = 0x40_0000;
/// Each descriptor owns one buffer slot of this size.
const SLOT: u64 = 0x1_0000;

struct DriverQueue {
    desc_table: u64,
    avail: u64,
    used: u64,
    buffers: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    used_seen: u16,
    used_total: usize,
}

/// The guest's virtio driver, reduced to what vsock tests need. Each
/// descriptor has a fixed 64 KiB buffer slot; descriptors are recycled when
/// the device returns their chain.
pub struct TestDriver {
    mem: GuestMemoryMmap,
    queues: Vec<DriverQueue>,
    kicks: Vec<EventFd>,
    trigger: Arc<CountingTrigger>,
    interrupt: Arc<VirtioInterrupt>,
    /// Rx chains the device gave back with length 0 (bad buffers).
    pub rx_returned_empty: usize,
}

impl TestDriver {
    pub fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let queues = (0..3u64)
            .map(|i| {
                let base = RING_BASE + i * RING_STRIDE;
                DriverQueue {
                    desc_table: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    buffers: BUF_BASE + i * SLOT * u64::from(QUEUE_SIZE),
                    free: (0..QUEUE_SIZE).rev().collect(),
                    chains: HashMap::new(),
                    avail_idx: 0,
                    used_seen: 0,
                    used_total: 0,
                }
            })
            .collect();
        let trigger = Arc::new(CountingTrigger::default());
        Self {
            mem,
            queues,
            kicks: (0..3)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: Arc::new(VirtioInterrupt::new(trigger.clone())),
            trigger,
            rx_returned_empty: 0,
        }
    }

    pub fn activate_context(&self) -> ActivateContext {
        let queues = self
            .queues
            .iter()
            .map(|dq| {
                let mut q = Queue::new(QUEUE_SIZE).unwrap();
                q.set_size(QUEUE_SIZE);
                q.set_desc_table_address(Some(dq.desc_table as u32), Some(0));
                q.set_avail_ring_address(Some(dq.avail as u32), Some(0));
                q.set_used_ring_address(Some(dq.used as u32), Some(0));
                q.set_ready(true);
                q
            })
            .collect();
        ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events: self.kicks.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: self.interrupt.clone(),
        }
    }

    pub fn interrupts(&self) -> u64 {
        self.trigger.count()
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// Makes a chain of `(bytes, device_writable)` parts available on `q`.
    /// Writable parts only give their length.
    fn add_chain(&mut self, q: usize, parts: &[(Vec<u8>, bool)]) {
        let dq = &mut self.queues[q];
        let descs: Vec<u16> = (0..parts.len())
            .map(|_| dq.free.pop().expect("test driver ran out of descriptors"))
            .collect();
        for (i, ((bytes, writable), &idx)) in parts.iter().zip(&descs).enumerate() {
            assert!(bytes.len() as u64 <= SLOT);
            let addr = dq.buffers + u64::from(idx) * SLOT;
            if !writable {
                self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            }
            let mut flags = 0u16;
            if *writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = descs.get(i + 1).copied().unwrap_or(0);
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let entry = dq.desc_table + u64::from(idx) * 16;
            self.mem
                .write_obj(addr.to_le(), GuestAddress(entry))
                .unwrap();
            self.mem
                .write_obj((bytes.len() as u32).to_le(), GuestAddress(entry + 8))
                .unwrap();
            self.mem
                .write_obj(flags.to_le(), GuestAddress(entry + 12))
                .unwrap();
            self.mem
                .write_obj(next.to_le(), GuestAddress(entry + 14))
                .unwrap();
        }
        let head = descs[0];
        let slot = dq.avail + 4 + 2 * u64::from(dq.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(dq.avail_idx.to_le(), GuestAddress(dq.avail + 2))
            .unwrap();
        dq.chains.insert(head, descs);
    }

    /// Sends a packet: header and data in separate descriptors.
    pub fn push_tx(&mut self, hdr: &VsockHeader, data: &[u8]) {
        let mut parts = vec![(hdr.to_bytes().to_vec(), false)];
        if !data.is_empty() {
            parts.push((data.to_vec(), false));
        }
        self.push_tx_raw(&parts);
    }

    pub fn push_tx_raw(&mut self, parts: &[(Vec<u8>, bool)]) {
        self.reclaim_tx();
        self.add_chain(1, parts);
        self.kick(1);
    }

    pub fn add_rx_buffers(&mut self, n: usize, size: usize) {
        for _ in 0..n {
            self.add_chain(0, &[(vec![0u8; size], true)]);
        }
        self.kick(0);
    }

    pub fn add_rx_raw(&mut self, parts: &[(Vec<u8>, bool)]) {
        self.add_chain(0, parts);
        self.kick(0);
    }

    /// Used entries of `q` since the last call, with the chain's buffers.
    fn take_used(&mut self, q: usize) -> Vec<(u32, Vec<(u64, u32)>)> {
        let dq = &mut self.queues[q];
        let used_idx: u16 = self.mem.read_obj(GuestAddress(dq.used + 2)).unwrap();
        let mut out = Vec::new();
        while dq.used_seen != used_idx {
            let elem = dq.used + 4 + 8 * u64::from(dq.used_seen % QUEUE_SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            dq.used_seen = dq.used_seen.wrapping_add(1);
            dq.used_total += 1;
            let descs = dq.chains.remove(&(id as u16)).expect("unknown used id");
            let bufs = descs
                .iter()
                .map(|&i| {
                    let entry = dq.desc_table + u64::from(i) * 16;
                    let addr: u64 = self.mem.read_obj(GuestAddress(entry)).unwrap();
                    let dlen: u32 = self.mem.read_obj(GuestAddress(entry + 8)).unwrap();
                    (addr, dlen)
                })
                .collect();
            dq.free.extend(descs);
            out.push((len, bufs));
        }
        out
    }

    fn reclaim_tx(&mut self) {
        self.take_used(1);
    }

    /// Chains of `q` the device has returned so far.
    pub fn used_count(&mut self, q: usize) -> usize {
        self.take_used(q);
        self.queues[q].used_total
    }

    /// Packets the device has put in the rx ring since the last call.
    pub fn recv_rx(&mut self) -> Vec<(VsockHeader, Vec<u8>)> {
        let mut pkts = Vec::new();
        for (len, bufs) in self.take_used(0) {
            if len == 0 {
                self.rx_returned_empty += 1;
                continue;
            }
            let mut bytes = Vec::new();
            for (addr, dlen) in bufs {
                let mut chunk = vec![0u8; dlen as usize];
                self.mem.read_slice(&mut chunk, GuestAddress(addr)).unwrap();
                bytes.extend(chunk);
            }
            bytes.truncate(len as usize);
            assert!(bytes.len() >= HDR_SIZE, "used length {len} below a header");
            let mut raw = [0u8; HDR_SIZE];
            raw.copy_from_slice(&bytes[..HDR_SIZE]);
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(
                hdr.len as usize,
                bytes.len() - HDR_SIZE,
                "len field vs used length"
            );
            pkts.push((hdr, bytes[HDR_SIZE..].to_vec()));
        }
        pkts
    }
}
