//! virtio-blk (device ID 2): read sector 0, write sector 1, flush, and read
//! sector 1 back.

use super::mmio::Mmio;
use super::queue::{Segment, SplitQueue};
use super::Notify;
use crate::deadline;
use crate::dma::{self, DmaBuf};
use crate::fail::{Fail, Result};
use crate::say;
use crate::serial::Printable;

pub const DEVICE_ID: u32 = 2;
pub const SECTOR_SIZE: usize = 512;
/// What the probe writes at the start of sector 1 (the rest is zeros).
pub const WRITE_MARK: &[u8] = b"probe-blk-write-ok";
/// Bytes of sector 0 the probe prints.
pub const SHOWN: usize = 16;

pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Written into the status byte first, so a device that never writes it is caught.
const S_UNSET: u8 = 0xff;

const REQUEST_TIMEOUT_MS: u64 = 5000;

/// Handshake and the read/write/flush sequence on the device at `mmio`.
pub fn run(mmio: &Mmio) -> Result<()> {
    let features = mmio.begin_init(F_RO | F_FLUSH)?;
    let queue = mmio.setup_queue(0, 8)?;
    mmio.driver_ok()?;
    let capacity = mmio.config_u64(0)?;
    say!("blk capacity={} sectors features={:#x}", capacity, features);
    if capacity < 2 {
        return Err(Fail::with("disk smaller than 2 sectors", capacity));
    }
    let mut disk = Disk::new(mmio, queue, REQUEST_TIMEOUT_MS)?;
    let sector = disk.read(0)?;
    let mut shown = [0u8; SHOWN];
    sector.copy_to(0, &mut shown);
    say!("blk read {}", Printable(&shown));
    if features & F_RO != 0 {
        say!("blk read-only, write skipped");
    } else {
        disk.write(1, WRITE_MARK)?;
        if features & F_FLUSH != 0 {
            disk.flush()?;
        }
        let back = disk.read(1)?;
        let mut mark = [0u8; WRITE_MARK.len()];
        back.copy_to(0, &mut mark);
        if mark != WRITE_MARK {
            return Err(Fail::new(
                "sector 1 read back differs from what was written",
            ));
        }
    }
    mmio.check_health()?;
    say!("blk ok");
    Ok(())
}

pub struct Disk<N: Notify> {
    notify: N,
    queue: SplitQueue,
    header: DmaBuf,
    data: DmaBuf,
    status: DmaBuf,
    timeout_ms: u64,
}

impl<N: Notify> Disk<N> {
    pub fn new(notify: N, queue: SplitQueue, timeout_ms: u64) -> Result<Self> {
        let oom = Fail::new("out of dma memory");
        Ok(Self {
            notify,
            queue,
            header: dma::alloc(16, 16).ok_or(oom)?,
            data: dma::alloc(SECTOR_SIZE, SECTOR_SIZE).ok_or(oom)?,
            status: dma::alloc(1, 1).ok_or(oom)?,
            timeout_ms,
        })
    }

    /// Reads one sector; the returned buffer holds it until the next request.
    pub fn read(&mut self, sector: u64) -> Result<DmaBuf> {
        self.data.fill(0);
        self.request(T_IN, sector, Some(true))?;
        Ok(self.data)
    }

    /// Writes `bytes` followed by zeros to one sector.
    pub fn write(&mut self, sector: u64, bytes: &[u8]) -> Result<()> {
        self.data.fill(0);
        self.data
            .copy_from(0, &bytes[..bytes.len().min(SECTOR_SIZE)]);
        self.request(T_OUT, sector, Some(false))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(T_FLUSH, 0, None)
    }

    /// One request: header, optional data (`Some(device_writes)`), status.
    fn request(&mut self, kind: u32, sector: u64, data: Option<bool>) -> Result<()> {
        self.header.write::<u32>(0, kind);
        self.header.write::<u32>(4, 0);
        self.header.write::<u64>(8, sector);
        self.status.write::<u8>(0, S_UNSET);
        let header = Segment::out(&self.header);
        let status = Segment::input(&self.status);
        let head = match data {
            Some(true) => self
                .queue
                .add(&[header, Segment::input(&self.data), status])?,
            Some(false) => self
                .queue
                .add(&[header, Segment::out(&self.data), status])?,
            None => self.queue.add(&[header, status])?,
        };
        self.notify.notify(0);
        let queue = &mut self.queue;
        let used = deadline::poll(self.timeout_ms, || queue.pop_used().transpose())
            .ok_or(Fail::with("request timed out, type", u64::from(kind)))??;
        if used.head != head {
            return Err(Fail::with(
                "device completed an unknown request",
                u64::from(used.head),
            ));
        }
        match self.status.read::<u8>(0) {
            S_OK => Ok(()),
            S_IOERR => Err(Fail::with("I/O error, type", u64::from(kind))),
            S_UNSUPP => Err(Fail::with("unsupported request, type", u64::from(kind))),
            S_UNSET => Err(Fail::with(
                "device left status unwritten, type",
                u64::from(kind),
            )),
            other => Err(Fail::with("bad status", u64::from(other))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::FakeDevice;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread;
    use std::vec::Vec;

    struct NoNotify;
    impl Notify for NoNotify {
        fn notify(&self, _queue: u32) {}
    }

    /// A disk of `sectors` held in memory, served by a thread; `status`
    /// overrides the status byte when set.
    fn serve(
        queue: &SplitQueue,
        disk: Arc<Mutex<Vec<u8>>>,
        requests: Arc<Mutex<Vec<(u32, u64)>>>,
        status: Option<u8>,
        stop: Arc<AtomicBool>,
    ) -> thread::JoinHandle<()> {
        let mut device = FakeDevice::new(queue);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some((head, chain)) = device.pop() else {
                    thread::yield_now();
                    continue;
                };
                let out = FakeDevice::read_chain(&chain);
                let kind = u32::from_le_bytes(out[0..4].try_into().unwrap());
                let sector = u64::from_le_bytes(out[8..16].try_into().unwrap());
                requests.lock().unwrap().push((kind, sector));
                let at = sector as usize * SECTOR_SIZE;
                let mut reply = Vec::new();
                let mut disk = disk.lock().unwrap();
                match kind {
                    T_IN => reply.extend_from_slice(&disk[at..at + SECTOR_SIZE]),
                    T_OUT => disk[at..at + SECTOR_SIZE].copy_from_slice(&out[16..16 + SECTOR_SIZE]),
                    _ => {}
                }
                reply.push(status.unwrap_or(S_OK));
                let written = FakeDevice::write_chain(&chain, &reply);
                device.complete(u32::from(head), written);
            }
        })
    }

    #[test]
    fn read_write_flush_reach_the_disk() {
        let queue = SplitQueue::new(8).unwrap();
        let mut image = std::vec![0u8; 4 * SECTOR_SIZE];
        image[..SHOWN].copy_from_slice(b"hello-probe-disk");
        let image = Arc::new(Mutex::new(image));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(&queue, image.clone(), requests.clone(), None, stop.clone());
        let mut disk = Disk::new(NoNotify, queue, 2000).unwrap();
        let mut first = [0u8; SHOWN];
        disk.read(0).unwrap().copy_to(0, &mut first);
        assert_eq!(&first, b"hello-probe-disk");
        disk.write(1, WRITE_MARK).unwrap();
        disk.flush().unwrap();
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let image = image.lock().unwrap();
        assert_eq!(
            &image[SECTOR_SIZE..SECTOR_SIZE + WRITE_MARK.len()],
            WRITE_MARK
        );
        assert!(image[SECTOR_SIZE + WRITE_MARK.len()..2 * SECTOR_SIZE]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            *requests.lock().unwrap(),
            [(T_IN, 0), (T_OUT, 1), (T_FLUSH, 0)]
        );
    }

    #[test]
    fn device_errors_become_failures() {
        let queue = SplitQueue::new(4).unwrap();
        let image = Arc::new(Mutex::new(std::vec![0u8; 2 * SECTOR_SIZE]));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let server = serve(&queue, image, requests, Some(S_IOERR), stop.clone());
        let mut disk = Disk::new(NoNotify, queue, 2000).unwrap();
        assert_eq!(
            disk.read(0).map(|_| ()),
            Err(Fail::with("I/O error, type", 0))
        );
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }

    #[test]
    fn silent_device_times_out() {
        let queue = SplitQueue::new(4).unwrap();
        let mut disk = Disk::new(NoNotify, queue, 50).unwrap();
        assert_eq!(
            disk.flush(),
            Err(Fail::with("request timed out, type", T_FLUSH.into()))
        );
    }
}
