//! The virtio-rng device: one queue of device-writable buffers, each filled
//! with random bytes.

use crate::metrics::Counter;
use crate::virtio::util::{chain_shape, drain_queue, signal_used, Activation};
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, TYPE_RNG, VIRTIO_F_VERSION_1,
};
use crate::{guest_warn, GuestMemoryMmap};
use serde::Serialize;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::Arc;
use virtio_queue::{DescriptorChain, Queue, Writer};

pub const RNG_QUEUE_SIZE: u16 = 256;
/// Upper bound on bytes given per request, so the buffer we fill from is
/// fixed-size whatever length the guest asks for.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
const URANDOM: &str = "/dev/urandom";

/// Where the random bytes come from.
pub trait EntropySource: Send {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()>;
}

impl EntropySource for File {
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact(buf)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot open {URANDOM}")]
    Open(#[source] io::Error),
    #[error("failed to create the activate eventfd")]
    EventFd(#[source] io::Error),
}

#[derive(Default, Debug, Serialize)]
pub struct RngMetrics {
    pub requests: Counter,
    pub bytes: Counter,
    /// The host entropy source failed.
    pub entropy_errors: Counter,
    /// Malformed chains: loops, bad addresses, readable or empty buffers.
    pub guest_faults: Counter,
    pub event_errors: Counter,
}

pub(super) struct ActiveState {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

pub struct Rng {
    source: Box<dyn EntropySource>,
    acked_features: u64,
    pub(super) activation: Activation<ActiveState>,
    pub(super) metrics: RngMetrics,
    buf: Vec<u8>,
}

impl Rng {
    /// Opens /dev/urandom once; it never blocks after early boot.
    pub fn new() -> Result<Self, RngError> {
        let file = File::open(URANDOM).map_err(RngError::Open)?;
        Self::with_source(Box::new(file))
    }

    pub fn with_source(source: Box<dyn EntropySource>) -> Result<Self, RngError> {
        Ok(Self {
            source,
            acked_features: 0,
            activation: Activation::new().map_err(RngError::EventFd)?,
            metrics: RngMetrics::default(),
            buf: vec![0; MAX_BYTES_PER_REQUEST],
        })
    }

    pub(super) fn process_queue(&mut self) {
        let Some(active) = self.activation.state_mut() else {
            return;
        };
        let source = &mut self.source;
        let buf = &mut self.buf;
        let metrics = &self.metrics;
        let stats = drain_queue(&mut active.queue, &active.mem, |chain| {
            metrics.requests.inc();
            match fill_chain(&active.mem, chain, source.as_mut(), buf) {
                Ok(n) => {
                    metrics.bytes.add(n as u64);
                    u32::try_from(n).unwrap_or(0)
                }
                Err(FillError::Entropy(e)) => {
                    metrics.entropy_errors.inc();
                    tracing::error!(error = %e, "virtio-rng: entropy source failed");
                    0
                }
                Err(FillError::Guest(reason)) => {
                    metrics.guest_faults.inc();
                    guest_warn!(reason, "virtio-rng: bad request");
                    0
                }
            }
        });
        metrics.guest_faults.add(stats.used_ring_errors);
        if stats.stalled {
            metrics.guest_faults.inc();
            guest_warn!("virtio-rng: avail index runs ahead of the ring");
        }
        if let Err(e) = signal_used(
            &mut active.queue,
            &active.mem,
            &active.interrupt,
            stats.completed,
        ) {
            metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-rng: failed to signal the guest");
        }
    }
}

enum FillError {
    Guest(&'static str),
    Entropy(io::Error),
}

/// Fills the writable part of `chain` (up to the cap) and returns the count.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    source: &mut dyn EntropySource,
    buf: &mut [u8],
) -> Result<usize, FillError> {
    let shape = chain_shape(&chain).map_err(|_| FillError::Guest("malformed chain"))?;
    if shape.readable_bytes > 0 {
        return Err(FillError::Guest("device-readable buffer in the chain"));
    }
    let mut writer =
        Writer::new(mem, chain).map_err(|_| FillError::Guest("buffer outside guest memory"))?;
    let n = writer.available_bytes().min(buf.len());
    if n == 0 {
        return Err(FillError::Guest("zero-length buffer"));
    }
    source.fill(&mut buf[..n]).map_err(FillError::Entropy)?;
    writer
        .write_all(&buf[..n])
        .map_err(|_| FillError::Guest("buffer not writable"))?;
    Ok(n)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RNG_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        guest_warn!(offset, "virtio-rng: no config space; write ignored");
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
            .reset("virtio-rng", &mut self.acked_features)
    }

    fn metrics(&self) -> serde_json::Value {
        serde_json::to_value(&self.metrics).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::test_utils::CountingTrigger;
    use crate::virtio::test_utils::{guest_memory, read_guest, write_guest, RawDesc, TestQueue};
    use event_manager::{EventManager, SubscriberOps};
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const W: u32 = VRING_DESC_F_WRITE;

    /// Counts up from 1 so that filled bytes are recognisable (never zero).
    struct Counting(u8);

    impl EntropySource for Counting {
        fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
            for b in buf {
                self.0 = self.0.wrapping_add(1).max(1);
                *b = self.0;
            }
            Ok(())
        }
    }

    struct Failing;

    impl EntropySource for Failing {
        fn fill(&mut self, _buf: &mut [u8]) -> io::Result<()> {
            Err(io::Error::other("no entropy"))
        }
    }

    fn activate<'a>(
        mem: &'a GuestMemoryMmap,
        rng: &mut Rng,
    ) -> (TestQueue<'a>, Arc<CountingTrigger>) {
        let tq = TestQueue::new(mem, 0, RNG_QUEUE_SIZE);
        let trigger = Arc::new(CountingTrigger::default());
        rng.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![tq.queue()],
            queue_events: vec![],
            interrupt: Arc::new(VirtioInterrupt::new(trigger.clone())),
        })
        .unwrap();
        (tq, trigger)
    }

    #[test]
    fn fills_from_urandom_through_the_event_loop() {
        let mem = guest_memory();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let mut manager = EventManager::<Arc<Mutex<Rng>>>::new().unwrap();
        manager.add_subscriber(rng.clone());
        let mut tq = TestQueue::new(&mem, 0, RNG_QUEUE_SIZE);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let trigger = Arc::new(CountingTrigger::default());
        rng.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![tq.queue()],
                queue_events: vec![kick.try_clone().unwrap()],
                interrupt: Arc::new(VirtioInterrupt::new(trigger.clone())),
            })
            .unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        write_guest(&mem, 0x10_0000, &[0; 4096]);
        tq.add_chain(&[
            RawDesc::new(0x10_0000, 1000, W),
            RawDesc::new(0x10_1000, 3096, W),
        ]);
        kick.write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(tq.used_idx(), 1);
        assert_eq!(tq.used(0), (0, 4096));
        // 1000 zero bytes in a row from urandom would be a miracle.
        assert!(read_guest(&mem, 0x10_0000, 1000).iter().any(|b| *b != 0));
        assert!(read_guest(&mem, 0x10_1000, 3096).iter().any(|b| *b != 0));
        assert_eq!(trigger.count(), 1);
        assert_eq!(rng.lock().unwrap().metrics()["bytes"], 4096);
    }

    #[test]
    fn large_request_is_capped() {
        let mem = guest_memory();
        let mut rng = Rng::with_source(Box::new(Counting(0))).unwrap();
        let (mut tq, _) = activate(&mem, &mut rng);
        tq.add_chain(&[RawDesc::new(0x10_0000, 1 << 20, W)]);
        rng.process_queue();
        assert_eq!(tq.used(0), (0, MAX_BYTES_PER_REQUEST as u32));
        // Nothing past the cap was touched.
        assert_eq!(
            read_guest(&mem, 0x10_0000 + MAX_BYTES_PER_REQUEST as u64, 16),
            vec![0; 16]
        );
    }

    #[test]
    fn hostile_chains_are_returned_empty() {
        let mem = guest_memory();
        let mut rng = Rng::with_source(Box::new(Counting(0))).unwrap();
        let (mut tq, trigger) = activate(&mem, &mut rng);
        write_guest(&mem, 0x10_0000, &[0; 64]);
        // Readable (wrong direction), zero length, outside memory, huge
        // length, a self-loop, then a good one.
        tq.add_chain(&[RawDesc::new(0x10_0000, 16, 0)]);
        tq.add_chain(&[RawDesc::new(0x10_0000, 0, W)]);
        tq.add_chain(&[RawDesc::new(0xffff_0000_0000, 16, W)]);
        tq.add_chain(&[RawDesc::new(0x10_0000, u32::MAX, W)]);
        let head = tq.add_chain(&[RawDesc::linked(0x10_0000, 16, W | VRING_DESC_F_NEXT, 4)]);
        assert_eq!(head, 4);
        tq.add_chain(&[
            RawDesc::new(0x10_0020, 16, 0),
            RawDesc::new(0x10_0030, 16, W),
        ]);
        tq.add_chain(&[RawDesc::new(0x20_0000, 8, W)]);
        rng.process_queue();
        assert_eq!(tq.used_idx(), 7);
        for i in 0..6 {
            assert_eq!(tq.used(i).1, 0, "chain {i}");
        }
        assert_eq!(tq.used(6).1, 8);
        assert_eq!(read_guest(&mem, 0x10_0000, 64), vec![0; 64]);
        assert_eq!(rng.metrics()["guest_faults"], 6);
        assert_eq!(trigger.count(), 1);
    }

    #[test]
    fn entropy_failure_is_counted() {
        let mem = guest_memory();
        let mut rng = Rng::with_source(Box::new(Failing)).unwrap();
        let (mut tq, _) = activate(&mem, &mut rng);
        tq.add_chain(&[RawDesc::new(0x10_0000, 16, W)]);
        rng.process_queue();
        assert_eq!(tq.used(0), (0, 0));
        assert_eq!(rng.metrics()["entropy_errors"], 1);
        assert_eq!(rng.metrics()["guest_faults"], 0);
    }

    #[test]
    fn reset_deactivates() {
        let mem = guest_memory();
        let mut rng = Rng::with_source(Box::new(Counting(0))).unwrap();
        let (mut tq, _) = activate(&mem, &mut rng);
        assert!(rng.is_activated());
        assert!(rng.reset());
        assert!(!rng.is_activated());
        tq.add_chain(&[RawDesc::new(0x10_0000, 16, W)]);
        rng.process_queue();
        assert_eq!(tq.used_idx(), 0);
        let mut cfg = [0xffu8; 4];
        rng.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 4]);
    }
}
