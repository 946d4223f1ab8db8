//! Fuzzing entry points: each builds one guest-facing parser over plain
//! guest memory (no KVM) and feeds it the input. The cargo-fuzz targets in
//! `fuzz/` call these; the unit tests below replay every saved crash input
//! (`fuzz/regressions/<target>/`) and run a short seeded random pass, so the
//! regressions are checked by every `cargo test`.
//!
//! Compiled for tests and with the `fuzzing` feature only.
//!
//! Queue targets share one input layout: byte 0 picks the queue size
//! (`1 << (b % 9)`), byte 1 the number of kick rounds, and the rest is
//! copied into guest memory from address 0, where the rings sit packed (see
//! [`queue_layout`]: every avail ring first, then the descriptor tables,
//! then the used rings), followed by buffer space. So the first few hundred
//! input bytes are the rings and descriptors the devices read.

use crate::interrupt::IrqTrigger;
use crate::legacy::{SerialDevice, SerialOutput};
use crate::virtio::block::request::DiskBackend;
use crate::virtio::block::Block;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{Net, NetBackend};
use crate::virtio::rng::Rng;
use crate::virtio::vsock::Vsock;
use crate::virtio::{ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size for every target: small, so most fuzzed addresses
/// either hit it or are plainly outside.
pub const MEM_SIZE: usize = 1 << 20;
const MAX_ROUNDS: u8 = 4;

/// Where the rings start: not 0, which virtio-queue takes for "never set up".
pub const RINGS_BASE: u64 = 0x10;

/// Guest addresses of each queue's (descriptor table, avail ring, used
/// ring) for `queues` queues of `size` entries, packed from [`RINGS_BASE`]
/// with the avail rings first, so short inputs reach them.
pub fn queue_layout(size: u16, queues: usize) -> Vec<(u64, u64, u64)> {
    let size = u64::from(size);
    let round16 = |n: u64| n.div_ceil(16) * 16;
    let avail_len = round16(6 + 2 * size);
    let desc_len = 16 * size;
    let used_len = round16(6 + 8 * size);
    let q = queues as u64;
    (0..q)
        .map(|i| {
            let avail = RINGS_BASE + i * avail_len;
            let desc = RINGS_BASE + q * avail_len + i * desc_len;
            let used = RINGS_BASE + q * (avail_len + desc_len) + i * used_len;
            (desc, avail, used)
        })
        .collect()
}

/// An interrupt line that only counts.
#[derive(Default)]
pub struct NullIrq(AtomicU64);

impl IrqTrigger for NullIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn memory_with(contents: &[u8]) -> GuestMemoryMmap {
    let mem = match GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) {
        Ok(mem) => mem,
        Err(e) => panic!("fuzz harness: cannot allocate guest memory: {e}"),
    };
    let len = contents.len().min(MEM_SIZE);
    // In range by construction.
    let _ = mem.write_slice(&contents[..len], GuestAddress(0));
    mem
}

fn queue_at((desc, avail, used): (u64, u64, u64), size: u16) -> Queue {
    let mut queue = match Queue::new(256) {
        Ok(q) => q,
        Err(e) => panic!("fuzz harness: {e}"),
    };
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_ready(true);
    queue
}

/// Activates `device` with its queues over `data` and kicks every queue for
/// the rounds the input asks for, through the real event handler.
/// `before_kicks` runs once the device is active; what it returns is kept
/// until the end of the run and then returned.
fn run_queues<D, K>(
    device: D,
    data: &[u8],
    before_kicks: impl FnOnce(&Arc<Mutex<D>>) -> K,
) -> Option<K>
where
    D: VirtioDevice + MutEventSubscriber + 'static,
{
    let (size_sel, rounds, contents) = match data {
        [a, b, rest @ ..] => (*a, *b % MAX_ROUNDS + 1, rest),
        _ => return None,
    };
    let size = 1u16 << (size_sel % 9);
    let mem = memory_with(contents);
    let queue_count = device.queue_max_sizes().len();
    let device = Arc::new(Mutex::new(device));
    let Ok(mut manager) = EventManager::<Arc<Mutex<D>>>::new() else {
        return None;
    };
    manager.add_subscriber(device.clone());
    let kicks: Vec<EventFd> = (0..queue_count)
        .filter_map(|_| EventFd::new(EFD_NONBLOCK).ok())
        .collect();
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: queue_layout(size, queue_count)
            .into_iter()
            .map(|addrs| queue_at(addrs, size))
            .collect(),
        queue_events: kicks.iter().filter_map(|k| k.try_clone().ok()).collect(),
        interrupt: Arc::new(VirtioInterrupt::new(Arc::new(NullIrq::default()))),
    };
    let activated = lock(&device).activate(ctx).is_ok();
    if !activated {
        return None;
    }
    let keep = before_kicks(&device);
    let _ = manager.run_with_timeout(0);
    for _ in 0..rounds {
        for kick in &kicks {
            let _ = kick.write(1);
        }
        // Bounded: a device that keeps itself busy must not hang the run.
        for _ in 0..4 {
            if !matches!(manager.run_with_timeout(0), Ok(n) if n > 0) {
                break;
            }
        }
    }
    // A reset at the end exercises teardown with whatever state is left.
    lock(&device).reset();
    let _ = manager.run_with_timeout(0);
    Some(keep)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A disk in memory; reads and writes past its end fail like a short file.
pub struct MemDisk(pub Vec<u8>);

impl DiskBackend for MemDisk {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::WriteZero)?;
        let dst = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get_mut(start..end))
            .ok_or(io::ErrorKind::WriteZero)?;
        dst.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const DISK_SIZE: usize = 64 << 10;

fn mem_block(read_only: bool) -> Option<Block> {
    // The disk is a little larger than a whole number of sectors, like the
    // unit tests' image, so the partial-sector edge is reachable.
    Block::with_backend(
        Box::new(MemDisk(vec![0x5a; DISK_SIZE + 100])),
        (DISK_SIZE + 100) as u64,
        read_only,
        Some("fuzz-disk"),
    )
    .ok()
}

/// virtio-blk request queue.
pub fn block_queue(data: &[u8]) {
    let read_only = data.get(2).is_some_and(|b| b & 1 == 1);
    if let Some(block) = mem_block(read_only) {
        run_queues(block, data, |_| {});
    }
}

/// A frame back-end over one end of a datagram socketpair (frames keep their
/// boundaries, like a tap).
struct PairBackend(UnixDatagram);

impl NetBackend for PairBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv(buf)
    }
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.0.send(frame)
    }
    fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// virtio-net rx and tx queues. Byte 2 picks how many frames the host sends
/// (their bytes come from the input's tail), so rx has work too.
pub fn net_queue(data: &[u8]) {
    let Ok((ours, peer)) = UnixDatagram::pair() else {
        return;
    };
    if ours.set_nonblocking(true).is_err() || peer.set_nonblocking(true).is_err() {
        return;
    }
    let Ok(net) = Net::new(Box::new(PairBackend(ours)), [2, 0, 0, 0, 0, 1]) else {
        return;
    };
    let frames = data.get(2).map_or(0, |b| b % 4);
    let tail = &data[data.len().saturating_sub(2048)..];
    run_queues(net, data, |_| {
        for i in 0..usize::from(frames) {
            // Lengths from 0 up, including shorter than a virtio-net header.
            let len = (tail.len() / 4 * i).min(tail.len());
            let _ = peer.send(&tail[..len]);
        }
    });
    // Drain what the device sent, so the pair never fills across runs.
    let mut buf = [0u8; 2048];
    while peer.recv(&mut buf).is_ok() {}
}

/// virtio-rng request queue.
pub fn rng_queue(data: &[u8]) {
    if let Ok(rng) = Rng::new() {
        run_queues(rng, data, |_| {});
    }
}

const VSOCK_DIR_PREFIX: &str = "microvm-fuzz-";

static VSOCK_DIR: OnceLock<Option<(PathBuf, UnixListener)>> = OnceLock::new();

/// A directory for this process's vsock sockets, with a listener on host
/// port 1024 that never accepts (guest connects land in its backlog).
/// Statics are never dropped and libFuzzer ends the process with exit(),
/// so an atexit handler removes the directory; one left by a process that
/// was killed is removed by the next.
fn vsock_dir() -> Option<&'static (PathBuf, UnixListener)> {
    VSOCK_DIR
        .get_or_init(|| {
            remove_dirs_of_dead_processes();
            let dir =
                std::env::temp_dir().join(format!("{VSOCK_DIR_PREFIX}{}", std::process::id()));
            std::fs::create_dir_all(&dir).ok()?;
            // SAFETY: registers a plain extern "C" function with no
            // arguments; it only reads a static that is set by then.
            unsafe { libc::atexit(remove_vsock_dir) };
            let port = dir.join("v.sock_1024");
            let _ = std::fs::remove_file(&port);
            let listener = UnixListener::bind(&port).ok()?;
            Some((dir, listener))
        })
        .as_ref()
}

extern "C" fn remove_vsock_dir() {
    if let Some(Some((dir, _))) = VSOCK_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn remove_dirs_of_dead_processes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(VSOCK_DIR_PREFIX))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn vsock_device() -> Option<Vsock> {
    let (dir, _) = vsock_dir()?;
    Vsock::new(3, dir.join("v.sock")).ok()
}

/// virtio-vsock rx, tx and event queues: packet headers, ops, credit and
/// connection state from whatever the guest puts in the tx queue.
pub fn vsock_queue(data: &[u8]) {
    if let Some(vsock) = vsock_device() {
        run_queues(vsock, data, |_| {});
    }
}

/// The hybrid-vsock handshake: a host connection sends `data` as its
/// `CONNECT <port>\n` line (byte 0 bit 0: then half-close), through the
/// device's listener and event loop.
pub fn vsock_connect_line(data: &[u8]) {
    let Some((flags, line)) = data.split_first() else {
        return;
    };
    let Some(vsock) = vsock_device() else {
        return;
    };
    let Some((dir, _)) = vsock_dir() else {
        return;
    };
    let uds = dir.join("v.sock");
    let mut queue_bytes = vec![0u8, 0];
    // Empty rings: the device can only queue its REQUEST to the guest.
    queue_bytes.resize(16, 0);
    run_queues(vsock, &queue_bytes, |_| {
        // Kept open while the device reads the line.
        let mut host = UnixStream::connect(&uds).ok()?;
        let _ = host.set_nonblocking(true);
        let _ = host.write_all(line);
        if flags & 1 == 1 {
            let _ = host.shutdown(std::net::Shutdown::Write);
        }
        Some(host)
    });
}

/// The virtio-mmio register file in front of a virtio-blk device: byte 0 is
/// the number of 8-byte register operations that follow
/// (`[op, off_lo, off_hi, len, value(4)]`, op bit 0 = write, len picks 1, 2,
/// 4 or 8 bytes), the rest is guest memory. Queues the driver sets up and
/// activates are then kicked once.
pub fn mmio_registers(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(count) * 8).min(rest.len());
    let (ops, contents) = rest.split_at(ops_len);
    let mem = memory_with(contents);
    let Some(block) = mem_block(false) else {
        return;
    };
    let block = Arc::new(Mutex::new(block));
    let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(NullIrq::default())));
    let Ok(mut transport) = MmioTransport::new(mem, block.clone(), interrupt) else {
        return;
    };
    let Ok(mut manager) = EventManager::<Arc<Mutex<Block>>>::new() else {
        return;
    };
    manager.add_subscriber(block.clone());
    let base = MmioAddress(0xd000_0000);
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let len = [1usize, 2, 4, 8][usize::from(op[3] % 4)];
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[4..8]);
        if op[0] & 1 == 1 {
            transport.mmio_write(base, offset, &value[..len]);
        } else {
            transport.mmio_read(base, offset, &mut value[..len]);
        }
    }
    let _ = manager.run_with_timeout(0);
    for evt in transport.queue_events() {
        let _ = evt.write(1);
    }
    for _ in 0..4 {
        if !matches!(manager.run_with_timeout(0), Ok(n) if n > 0) {
            break;
        }
    }
}

/// Counts what reaches the console sink.
struct CountingSink(Arc<AtomicUsize>);

impl Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.fetch_add(buf.len(), Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The 8250 serial port: byte 0 sets the output limit, then 2-byte port
/// operations (`[op | offset << 1, value]`, op bit 0 = write). Checks that
/// the console never gets more than the limit.
pub fn serial(data: &[u8]) {
    let Some((&limit, ops)) = data.split_first() else {
        return;
    };
    let written = Arc::new(AtomicUsize::new(0));
    let output = SerialOutput::new(Box::new(CountingSink(written.clone())), u64::from(limit));
    let mut serial = SerialDevice::new(Arc::new(NullIrq::default()), output);
    let base = PioAddress(0x3f8);
    for op in ops.chunks_exact(2) {
        let offset = u16::from((op[0] >> 1) % 8);
        if op[0] & 1 == 1 {
            serial.pio_write(base, offset, &[op[1]]);
        } else {
            let mut value = [0u8];
            serial.pio_read(base, offset, &mut value);
        }
    }
    let written = written.load(Ordering::Relaxed);
    assert!(
        written <= usize::from(limit),
        "serial wrote {written} bytes past its {limit}-byte limit"
    );
}

pub type Target = fn(&[u8]);

/// Every target, by the name its cargo-fuzz binary and regression folder use.
pub const TARGETS: &[(&str, Target)] = &[
    ("virtio_block", block_queue),
    ("virtio_net", net_queue),
    ("virtio_rng", rng_queue),
    ("virtio_vsock", vsock_queue),
    ("vsock_connect_line", vsock_connect_line),
    ("virtio_mmio", mmio_registers),
    ("serial", serial),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fuzz_dir(kind: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz")
            .join(kind)
    }

    fn saved_inputs(kind: &str, target: &str) -> Vec<Vec<u8>> {
        let Ok(entries) = std::fs::read_dir(fuzz_dir(kind).join(target)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| std::fs::read(e.path()).unwrap())
            .collect()
    }

    /// Every saved crash input (and every seed) still runs cleanly.
    #[test]
    fn saved_crash_inputs_and_seeds_do_not_crash() {
        let mut replayed = 0;
        for (name, target) in TARGETS {
            for input in saved_inputs("regressions", name)
                .into_iter()
                .chain(saved_inputs("seeds", name))
            {
                target(&input);
                replayed += 1;
            }
        }
        assert!(replayed >= TARGETS.len(), "seeds missing: {replayed}");
    }

    /// The seeds are real work for the devices, not noise they reject.
    #[test]
    fn seeds_reach_the_device_logic() {
        let metric = |m: &serde_json::Value, key: &str| m[key].as_u64().unwrap_or(0);
        for input in saved_inputs("seeds", "virtio_block") {
            let block = mem_block(false).unwrap();
            let dev = run_queues(block, &input, |d| d.clone()).unwrap();
            let m = lock(&dev).metrics();
            assert_eq!(metric(&m, "requests"), 1, "{m}");
            assert_eq!(metric(&m, "guest_faults"), 0, "{m}");
        }
        for input in saved_inputs("seeds", "virtio_rng") {
            let dev = run_queues(Rng::new().unwrap(), &input, |d| d.clone()).unwrap();
            let m = lock(&dev).metrics();
            assert!(metric(&m, "bytes") > 0, "{m}");
        }
        for input in saved_inputs("seeds", "virtio_vsock") {
            let dev = run_queues(vsock_device().unwrap(), &input, |d| d.clone()).unwrap();
            let m = lock(&dev).metrics();
            assert!(metric(&m, "tx_packets") > 0, "{m}");
            assert_eq!(metric(&m, "conns_added"), 1, "{m}");
        }
    }

    /// A tiny xorshift, so the smoke pass is the same on every run.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// A short seeded random pass over every target: plausible descriptors
    /// (small addresses and lengths) rather than pure noise, so the device
    /// paths past the first check run too.
    #[test]
    fn seeded_random_inputs_do_not_crash() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for (_, target) in TARGETS {
            for _ in 0..40 {
                let len = (next(&mut state) % 0x4000) as usize;
                let mut input: Vec<u8> = (0..len).map(|_| next(&mut state) as u8).collect();
                // Descriptors of queue 0 with in-memory addresses (size 16,
                // three queues at most).
                if input.len() > 2 {
                    input[0] = 4;
                }
                let desc0 = queue_layout(16, 3)[0].0 as usize;
                for d in 0..16usize {
                    let at = 2 + desc0 + d * 16;
                    if at + 16 > input.len() {
                        break;
                    }
                    let addr = 0x10_000 + (next(&mut state) % 0xe_0000);
                    input[at..at + 8].copy_from_slice(&addr.to_le_bytes());
                    let dlen = (next(&mut state) % 0x2000) as u32;
                    input[at + 8..at + 12].copy_from_slice(&dlen.to_le_bytes());
                }
                target(&input);
            }
        }
    }

    #[test]
    fn queue_layout_packs_rings_without_overlap() {
        for size in [1u16, 8, 256] {
            let layout = queue_layout(size, 3);
            let mut spans: Vec<(u64, u64)> = Vec::new();
            for (desc, avail, used) in &layout {
                spans.push((*desc, desc + 16 * u64::from(size)));
                spans.push((*avail, avail + 6 + 2 * u64::from(size)));
                spans.push((*used, used + 6 + 8 * u64::from(size)));
                assert_eq!(desc % 16, 0);
                assert_eq!(used % 4, 0);
            }
            spans.sort();
            for pair in spans.windows(2) {
                assert!(pair[0].1 <= pair[1].0, "{size}: {spans:?}");
            }
            assert!(spans.last().unwrap().1 < MEM_SIZE as u64);
        }
        // Avail rings come first, right after the base.
        assert_eq!(queue_layout(8, 2)[0].1, RINGS_BASE);
    }

    #[test]
    fn serial_limit_is_enforced() {
        // Limit 3, then 10 writes to THR.
        let mut input = vec![3u8];
        for b in b"abcdefghij" {
            input.extend_from_slice(&[1, *b]);
        }
        serial(&input);
    }
}
