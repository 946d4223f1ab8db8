//! The virtio-blk device: config space, features, activation and the request
//! queue. Request parsing lives in `request.rs`, epoll glue in
//! `event_handler.rs`.

use super::metrics::BlockMetrics;
use super::request::{self, Disk, DiskBackend, RequestError, RequestType, ID_BYTES, IO_CHUNK};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterError};
use crate::virtio::util::{
    chain_shape, drain_queue_with, read_config_bytes, signal_used, Activation, ChainVerdict,
};
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::{guest_warn, GuestMemoryMmap};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_queue::Queue;

pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Data segments per request we tell the driver it may use (two descriptors
/// of a chain go to the header and the status).
const SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 / 2 - 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Returned by GET_ID (at most 20 bytes); the guest agent finds disks by it.
    pub serial: Option<String>,
    /// Limits on request bytes and count; unlimited by default.
    pub rate_limiter: RateLimiterConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot get the size of disk image {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk serial {serial:?} is longer than {ID_BYTES} bytes")]
    SerialTooLong { serial: String },
    #[error("failed to create the activate eventfd")]
    EventFd(#[source] io::Error),
    #[error("rate_limiter")]
    RateLimiter(#[from] RateLimiterError),
}

/// Header (16 bytes) and status (1 byte) of a request: not charged to the
/// bandwidth bucket.
const REQUEST_OVERHEAD: u64 = 17;

pub(super) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub interrupt: Arc<VirtioInterrupt>,
}

pub struct Block {
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config_space: [u8; 16],
    pub(super) activation: Activation<ActiveState>,
    pub(super) metrics: BlockMetrics,
    pub(super) rate_limiter: RateLimiter,
    io_buf: Vec<u8>,
}

impl Block {
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?;
        // Seeking works for block devices too, where metadata().len() is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: config.path.clone(),
                source,
            })?;
        let mut block = Self::with_backend(
            Box::<File>::new(file),
            size,
            config.read_only,
            config.serial.as_deref(),
        )?;
        block.rate_limiter = RateLimiter::new(&config.rate_limiter, Instant::now())?;
        Ok(block)
    }

    /// A device over any backend of `size_bytes` (rounded down to sectors).
    pub fn with_backend(
        backend: Box<dyn DiskBackend>,
        size_bytes: u64,
        read_only: bool,
        serial: Option<&str>,
    ) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_BYTES];
        if let Some(serial) = serial {
            let bytes = serial.as_bytes();
            if bytes.len() > ID_BYTES {
                return Err(BlockError::SerialTooLong {
                    serial: serial.to_string(),
                });
            }
            id[..bytes.len()].copy_from_slice(bytes);
        }
        let capacity_sectors = size_bytes / request::SECTOR_SIZE;
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config_space = [0u8; 16];
        config_space[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config_space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(Self {
            disk: Disk {
                backend,
                capacity_sectors,
                read_only,
                id,
            },
            avail_features,
            acked_features: 0,
            config_space,
            activation: Activation::new().map_err(BlockError::EventFd)?,
            metrics: BlockMetrics::default(),
            rate_limiter: RateLimiter::unlimited(),
            io_buf: vec![0; IO_CHUNK],
        })
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_sectors
    }

    pub fn block_metrics(&self) -> &BlockMetrics {
        &self.metrics
    }

    /// Runs every pending request and signals the guest if it wants to know.
    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.activation.state_mut() else {
            return;
        };
        let disk = &mut self.disk;
        let buf = &mut self.io_buf;
        let metrics = &self.metrics;
        let limiter = &mut self.rate_limiter;
        let stats = drain_queue_with(&mut active.queue, &active.mem, |chain| {
            if !limiter.is_unlimited() {
                // A malformed chain is charged nothing; execute() fails it.
                let bytes = chain_shape(&chain)
                    .map(|s| (s.readable_bytes + s.writable_bytes).saturating_sub(REQUEST_OVERHEAD))
                    .unwrap_or(0);
                if !limiter.consume(bytes, Instant::now()) {
                    metrics.throttled.inc();
                    return ChainVerdict::Defer;
                }
            }
            metrics.requests.inc();
            let completion = request::execute(&active.mem, chain, disk, buf);
            match completion.request {
                Some(RequestType::In) => metrics.read_bytes.add(completion.data_bytes),
                Some(RequestType::Out) => metrics.write_bytes.add(completion.data_bytes),
                Some(RequestType::Flush) => metrics.flushes.inc(),
                Some(RequestType::Unsupported(_)) => metrics.unsupported.inc(),
                _ => {}
            }
            if let Some(error) = &completion.error {
                record_error(metrics, error);
            }
            ChainVerdict::Done(completion.used_len)
        });
        metrics.guest_faults.add(stats.used_ring_errors);
        if stats.stalled {
            metrics.guest_faults.inc();
            guest_warn!("virtio-blk: avail index runs ahead of the ring");
        }
        if let Err(e) = signal_used(
            &mut active.queue,
            &active.mem,
            &active.interrupt,
            stats.completed,
        ) {
            metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-blk: failed to signal the guest");
        }
    }
}

fn record_error(metrics: &BlockMetrics, error: &RequestError) {
    if error.is_guest_fault() {
        metrics.guest_faults.inc();
        guest_warn!(error = %error, "virtio-blk: bad request");
    } else if let RequestError::ReadOnly = error {
        metrics.io_errors.inc();
        guest_warn!("virtio-blk: write to a read-only disk refused");
    } else {
        metrics.io_errors.inc();
        tracing::error!(error = %error, source = ?std::error::Error::source(error), "virtio-blk: request failed");
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[BLOCK_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!(
            offset,
            "virtio-blk: config space is read-only; write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activation
            .activate_queues(ctx, |mem, [queue], interrupt| ActiveState {
                mem,
                queue,
                interrupt,
            })
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }

    fn reset(&mut self) -> bool {
        self.activation
            .reset("virtio-blk", &mut self.acked_features)
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(&self.metrics).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_utils::CountingTrigger;
    use crate::virtio::test_utils::{
        guest_memory, read_guest, write_guest, RawDesc, TempFile, TestQueue,
    };
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const W: u32 = VRING_DESC_F_WRITE;

    struct Harness<'a> {
        block: Arc<Mutex<Block>>,
        manager: EventManager<Arc<Mutex<Block>>>,
        tq: TestQueue<'a>,
        kick: EventFd,
        trigger: Arc<CountingTrigger>,
    }

    fn image() -> TempFile {
        // 8 sectors plus a partial one that must not be addressable.
        let data: Vec<u8> = (0..8 * 512 + 100).map(|i| (i % 253) as u8).collect();
        TempFile::with_contents(&data)
    }

    fn config(file: &TempFile, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: file.path.clone(),
            read_only,
            serial: Some("ctr-rootfs-1".into()),
            rate_limiter: RateLimiterConfig::default(),
        }
    }

    fn activated(mem: &GuestMemoryMmap, block: Block) -> Harness<'_> {
        let block = Arc::new(Mutex::new(block));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let tq = TestQueue::new(mem, 0, BLOCK_QUEUE_SIZE);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = Arc::new(CountingTrigger::default());
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![tq.queue()],
            queue_events: vec![kick.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(trigger.clone())),
        };
        block.lock().unwrap().activate(ctx).unwrap();
        // The activate event registers the queue event.
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(
            block.lock().unwrap().activation.registered_queue_events(),
            1
        );
        Harness {
            block,
            manager,
            tq,
            kick,
            trigger,
        }
    }

    impl Harness<'_> {
        fn kick(&mut self) {
            self.kick.write(1).unwrap();
            assert_eq!(self.manager.run_with_timeout(100).unwrap(), 1);
        }
        fn metric(&self, name: &str) -> u64 {
            self.block.lock().unwrap().metrics()[name].as_u64().unwrap()
        }
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, raw_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&raw_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        write_guest(mem, addr, &h);
    }

    #[test]
    fn missing_file_error_names_path() {
        let path = PathBuf::from("/nonexistent/microvm/disk.img");
        let err = Block::new(&BlockConfig {
            path: path.clone(),
            read_only: true,
            serial: None,
            rate_limiter: RateLimiterConfig::default(),
        })
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("/nonexistent/microvm/disk.img"),
            "{err}"
        );
    }

    #[test]
    fn serial_longer_than_20_bytes_is_refused() {
        let file = image();
        let mut cfg = config(&file, false);
        cfg.serial = Some("x".repeat(21));
        assert!(matches!(
            Block::new(&cfg),
            Err(BlockError::SerialTooLong { .. })
        ));
    }

    #[test]
    fn config_space_and_features() {
        let file = image();
        let block = Block::new(&config(&file, true)).unwrap();
        assert_eq!(block.device_type(), TYPE_BLOCK);
        assert_eq!(block.queue_max_sizes(), &[256]);
        let mut capacity = [0u8; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 8);
        let mut seg_max = [0u8; 4];
        block.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), SEG_MAX);
        let mut past = [0xffu8; 4];
        block.read_config(100, &mut past);
        assert_eq!(past, [0; 4]);
        let features = block.avail_features();
        for bit in [VIRTIO_F_VERSION_1, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO] {
            assert_ne!(features & (1u64 << bit), 0, "bit {bit}");
        }
        let rw = Block::new(&config(&file, false)).unwrap();
        assert_eq!(rw.avail_features() & (1u64 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn requests_against_a_file_through_the_event_loop() {
        let mem = guest_memory();
        let file = image();
        let mut h = activated(&mem, Block::new(&config(&file, false)).unwrap());
        // Write sector 3, flush, read it back, get the id.
        header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 3);
        write_guest(&mem, 0x11_0000, &[0xc3; 512]);
        h.tq.add_chain(&[
            RawDesc::new(0x10_0000, 16, 0),
            RawDesc::new(0x11_0000, 512, 0),
            RawDesc::new(0x12_0000, 1, W),
        ]);
        header(&mem, 0x10_1000, VIRTIO_BLK_T_FLUSH, 0);
        h.tq.add_chain(&[
            RawDesc::new(0x10_1000, 16, 0),
            RawDesc::new(0x12_1000, 1, W),
        ]);
        header(&mem, 0x10_2000, VIRTIO_BLK_T_IN, 3);
        h.tq.add_chain(&[
            RawDesc::new(0x10_2000, 16, 0),
            RawDesc::new(0x13_0000, 512, W),
            RawDesc::new(0x12_2000, 1, W),
        ]);
        header(&mem, 0x10_3000, VIRTIO_BLK_T_GET_ID, 0);
        h.tq.add_chain(&[
            RawDesc::new(0x10_3000, 16, 0),
            RawDesc::new(0x14_0000, 20, W),
            RawDesc::new(0x12_3000, 1, W),
        ]);
        h.kick();

        assert_eq!(h.tq.used_idx(), 4);
        assert_eq!(h.tq.used(0), (0, 1));
        assert_eq!(h.tq.used(1), (3, 1));
        assert_eq!(h.tq.used(2), (5, 513));
        assert_eq!(h.tq.used(3), (8, 21));
        for status_addr in [0x12_0000, 0x12_1000, 0x12_2000, 0x12_3000] {
            assert_eq!(read_guest(&mem, status_addr, 1)[0], VIRTIO_BLK_S_OK as u8);
        }
        assert_eq!(&file.contents()[3 * 512..4 * 512], &[0xc3; 512][..]);
        assert_eq!(read_guest(&mem, 0x13_0000, 512), vec![0xc3; 512]);
        let mut id = b"ctr-rootfs-1".to_vec();
        id.resize(20, 0);
        assert_eq!(read_guest(&mem, 0x14_0000, 20), id);
        assert_eq!(h.trigger.count(), 1);
        assert_eq!(h.metric("requests"), 4);
        assert_eq!(h.metric("write_bytes"), 512);
        assert_eq!(h.metric("read_bytes"), 512);
        assert_eq!(h.metric("flushes"), 1);
        assert_eq!(h.metric("guest_faults"), 0);
    }

    #[test]
    fn read_only_file_refuses_writes() {
        let mem = guest_memory();
        let file = image();
        let before = file.contents();
        let mut h = activated(&mem, Block::new(&config(&file, true)).unwrap());
        header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        h.tq.add_chain(&[
            RawDesc::new(0x10_0000, 16, 0),
            RawDesc::new(0x11_0000, 512, 0),
            RawDesc::new(0x12_0000, 1, W),
        ]);
        h.kick();
        assert_eq!(read_guest(&mem, 0x12_0000, 1)[0], VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(file.contents(), before);
        assert_eq!(h.metric("io_errors"), 1);
    }

    #[test]
    fn read_past_capacity_is_ioerr() {
        let mem = guest_memory();
        let file = image();
        let mut h = activated(&mem, Block::new(&config(&file, false)).unwrap());
        // Sector 8 exists only partially in the file.
        header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 8);
        h.tq.add_chain(&[
            RawDesc::new(0x10_0000, 16, 0),
            RawDesc::new(0x11_0000, 512, W),
            RawDesc::new(0x12_0000, 1, W),
        ]);
        h.kick();
        assert_eq!(read_guest(&mem, 0x12_0000, 1)[0], VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(h.metric("guest_faults"), 1);
    }

    #[test]
    fn hostile_queue_contents_do_not_stop_the_device() {
        let mem = guest_memory();
        let file = image();
        let mut h = activated(&mem, Block::new(&config(&file, false)).unwrap());
        // A head index past the table, then a descriptor that links to
        // itself (an endless chain), then a good request.
        h.tq.publish(9999);
        let head =
            h.tq.add_chain(&[RawDesc::linked(0x10_0000, 16, VRING_DESC_F_NEXT, 0)]);
        assert_eq!(head, 0);
        header(&mem, 0x20_0000, VIRTIO_BLK_T_GET_ID, 0);
        h.tq.add_chain(&[
            RawDesc::new(0x20_0000, 16, 0),
            RawDesc::new(0x21_0000, 21, W),
        ]);
        h.kick();
        // The bad head cannot be returned (two faults: empty chain, used
        // ring); the loop is returned unprocessed; the good one completes.
        assert_eq!(h.tq.used_idx(), 2);
        assert_eq!(h.tq.used(0), (0, 0));
        assert_eq!(h.tq.used(1), (1, 21));
        assert_eq!(
            read_guest(&mem, 0x21_0000 + 20, 1)[0],
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(h.metric("guest_faults"), 3);
        assert_eq!(h.metric("requests"), 3);

        // An avail index far ahead of what was published: no spin, no panic.
        h.tq.set_avail_idx(h.tq.used_idx().wrapping_add(1000));
        h.kick();
        assert_eq!(h.tq.used_idx(), 2);
        assert_eq!(h.metric("guest_faults"), 4);
    }

    #[test]
    fn reset_unregisters_and_allows_reactivation() {
        let mem = guest_memory();
        let file = image();
        let mut h = activated(&mem, Block::new(&config(&file, false)).unwrap());
        assert!(h.block.lock().unwrap().reset());
        assert!(!h.block.lock().unwrap().is_activated());
        assert_eq!(h.manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(
            h.block.lock().unwrap().activation.registered_queue_events(),
            0
        );
        // A kick now reaches nobody.
        h.kick.write(1).unwrap();
        assert_eq!(h.manager.run_with_timeout(0).unwrap(), 0);

        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![h.tq.queue()],
            queue_events: vec![h.kick.try_clone().unwrap()],
            interrupt: Arc::new(VirtioInterrupt::new(h.trigger.clone())),
        };
        h.block.lock().unwrap().activate(ctx).unwrap();
        // The activate event fires and the pending kick is seen.
        h.manager.run_with_timeout(100).unwrap();
        assert_eq!(
            h.block.lock().unwrap().activation.registered_queue_events(),
            1
        );
        header(&mem, 0x20_0000, VIRTIO_BLK_T_FLUSH, 0);
        h.tq.add_chain(&[
            RawDesc::new(0x20_0000, 16, 0),
            RawDesc::new(0x21_0000, 1, W),
        ]);
        h.kick();
        assert_eq!(h.tq.used_idx(), 1);
        assert_eq!(h.metric("event_errors"), 0);
    }

    #[test]
    fn rate_limited_requests_wait_for_the_timer_then_complete_in_order() {
        use crate::rate_limiter::TokenBucketConfig;
        let mem = guest_memory();
        let file = image();
        let mut cfg = config(&file, false);
        // Two requests per 50 ms.
        cfg.rate_limiter.ops = Some(TokenBucketConfig {
            size: 2,
            one_time_burst: 0,
            refill_time_ms: 50,
        });
        let mut h = activated(&mem, Block::new(&cfg).unwrap());
        for i in 0..5u64 {
            header(&mem, 0x10_0000 + i * 0x1000, VIRTIO_BLK_T_IN, i);
            h.tq.add_chain(&[
                RawDesc::new(0x10_0000 + i * 0x1000, 16, 0),
                RawDesc::new(0x20_0000 + i * 0x1000, 512, W),
                RawDesc::new(0x30_0000 + i * 0x1000, 1, W),
            ]);
        }
        h.kick();
        // The bucket held two; the third waits for the timer.
        assert_eq!(h.tq.used_idx(), 2);
        assert_eq!(h.metric("requests"), 2);
        assert_eq!(h.metric("throttled"), 1);
        // Kicks while throttled do nothing.
        h.kick();
        assert_eq!(h.tq.used_idx(), 2);
        // The timer fires after about 25 ms (one token) and the queue moves.
        let start = Instant::now();
        while h.tq.used_idx() < 5 && start.elapsed() < std::time::Duration::from_secs(5) {
            h.manager.run_with_timeout(1000).unwrap();
        }
        assert_eq!(h.tq.used_idx(), 5);
        assert!(start.elapsed() >= std::time::Duration::from_millis(40));
        for i in 0..5u16 {
            assert_eq!(
                h.tq.used(i),
                (u32::from(i) * 3, 513),
                "request {i} in order"
            );
        }
        let expected: Vec<u8> = (512..1024).map(|i| (i % 253) as u8).collect();
        assert_eq!(read_guest(&mem, 0x20_1000, 512), expected);
        assert_eq!(h.metric("requests"), 5);
    }

    #[test]
    fn bandwidth_limit_counts_data_bytes() {
        use crate::rate_limiter::TokenBucketConfig;
        let file = image();
        let mut cfg = config(&file, false);
        cfg.rate_limiter.bandwidth = Some(TokenBucketConfig {
            size: 1024,
            one_time_burst: 0,
            refill_time_ms: 60_000,
        });
        let mem = guest_memory();
        let mut h = activated(&mem, Block::new(&cfg).unwrap());
        for i in 0..3u64 {
            header(&mem, 0x10_0000 + i * 0x1000, VIRTIO_BLK_T_IN, i);
            h.tq.add_chain(&[
                RawDesc::new(0x10_0000 + i * 0x1000, 16, 0),
                RawDesc::new(0x20_0000 + i * 0x1000, 512, W),
                RawDesc::new(0x30_0000 + i * 0x1000, 1, W),
            ]);
        }
        h.kick();
        // 1024 bytes: two 512-byte reads, the third must wait a minute.
        assert_eq!(h.tq.used_idx(), 2);
        assert_eq!(h.metric("read_bytes"), 1024);
        assert_eq!(h.metric("throttled"), 1);
    }

    #[test]
    fn invalid_rate_limiter_is_refused() {
        use crate::rate_limiter::TokenBucketConfig;
        let file = image();
        let mut cfg = config(&file, false);
        cfg.rate_limiter.ops = Some(TokenBucketConfig {
            size: 0,
            one_time_burst: 0,
            refill_time_ms: 10,
        });
        let err = Block::new(&cfg).err().unwrap();
        assert!(matches!(err, BlockError::RateLimiter(_)), "{err}");
    }

    #[test]
    fn activate_checks_queue_count_and_double_activation() {
        let mem = guest_memory();
        let file = image();
        let mut block = Block::new(&config(&file, false)).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(CountingTrigger::default())));
        let ctx = ActivateContext {
            mem: mem.clone(),
            queues: vec![],
            queue_events: vec![],
            interrupt: interrupt.clone(),
        };
        assert!(matches!(
            block.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 0
            })
        ));
        let tq = TestQueue::new(&mem, 0, 16);
        let ctx = |q| ActivateContext {
            mem: mem.clone(),
            queues: vec![q],
            queue_events: vec![],
            interrupt: interrupt.clone(),
        };
        block.activate(ctx(tq.queue())).unwrap();
        assert!(matches!(
            block.activate(ctx(tq.queue())),
            Err(ActivateError::AlreadyActive)
        ));
    }
}
