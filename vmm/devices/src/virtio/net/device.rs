//! The virtio-net device: rx queue 0, tx queue 1, a MAC and link status in
//! config space, no offloads.

use super::backend::NetBackend;
use super::tap::{Tap, TapError};
use super::VNET_HDR_LEN;
use crate::metrics::Counter;
use crate::rate_limiter::RateLimiter;
use crate::virtio::util::{
    chain_shape, drain_queue_with, read_config_bytes, signal_used, Activation, ChainVerdict,
};
use crate::virtio::{
    ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::{guest_warn, GuestMemoryMmap};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

pub const NET_QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// Header plus the largest frame a tap hands out without GSO (64 KiB MTU
/// plus Ethernet and VLAN headers).
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + 65_550;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("failed to create the activate eventfd")]
    EventFd(#[source] io::Error),
}

#[derive(Default, Debug, Serialize)]
pub struct NetMetrics {
    pub rx_frames: Counter,
    pub rx_bytes: Counter,
    /// Frames larger than the guest's rx buffer chain.
    pub rx_dropped_too_big: Counter,
    pub rx_backend_errors: Counter,
    pub tx_frames: Counter,
    pub tx_bytes: Counter,
    /// Tx chains that are not a frame: bad shape, direction or length.
    pub tx_dropped_malformed: Counter,
    /// Frames the back-end refused (full or failed).
    pub tx_backend_errors: Counter,
    /// Malformed chains on either queue.
    pub guest_faults: Counter,
    pub event_errors: Counter,
    /// Times a rate limiter made rx or tx wait.
    pub rx_throttled: Counter,
    pub tx_throttled: Counter,
}

pub(super) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why an rx pass stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RxStop {
    /// Nothing more to read; keep polling the back-end.
    BackendEmpty,
    /// A frame is waiting for the guest to post buffers; stop polling the
    /// back-end until the rx queue is kicked.
    NoBuffers,
    /// Not active, or the back-end is gone.
    Idle,
    /// The rx rate limiter said wait; its timer resumes rx.
    Throttled,
}

pub struct Net {
    pub(super) backend: Box<dyn NetBackend>,
    config_space: [u8; 8],
    acked_features: u64,
    pub(super) activation: Activation<ActiveState>,
    pub(super) metrics: NetMetrics,
    /// Whether the back-end fd is in the event loop's interest list.
    pub(super) backend_registered: bool,
    /// The back-end reported end-of-file or an error; stop polling it.
    pub(super) backend_closed: bool,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the back-end but not yet delivered.
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    /// Host-to-guest frames.
    pub(super) rx_limiter: RateLimiter,
    /// Guest-to-host frames.
    pub(super) tx_limiter: RateLimiter,
}

impl Net {
    /// A device on the tap interface `tap_name`.
    pub fn with_tap(tap_name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        Self::new(Box::new(Tap::open(tap_name)?), mac)
    }

    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Result<Self, NetError> {
        // struct virtio_net_config: mac[6], status (le16).
        let mut config_space = [0u8; 8];
        config_space[..6].copy_from_slice(&mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Ok(Self {
            backend,
            config_space,
            acked_features: 0,
            activation: Activation::new().map_err(NetError::EventFd)?,
            metrics: NetMetrics::default(),
            backend_registered: false,
            backend_closed: false,
            rx_buf: vec![0; MAX_FRAME_LEN],
            rx_pending: None,
            tx_buf: vec![0; MAX_FRAME_LEN],
            rx_limiter: RateLimiter::unlimited(),
            tx_limiter: RateLimiter::unlimited(),
        })
    }

    /// Limits frames to the guest (`rx`) and from it (`tx`). Call before the
    /// device joins the event loop, which then watches their timers.
    pub fn with_rate_limiters(mut self, rx: RateLimiter, tx: RateLimiter) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    pub fn net_metrics(&self) -> &NetMetrics {
        &self.metrics
    }

    /// Moves frames from the back-end into rx buffers until one side runs
    /// dry. A frame that finds no buffer is kept, never dropped.
    pub(super) fn process_rx(&mut self) -> RxStop {
        let Some(active) = self.activation.state_mut() else {
            return RxStop::Idle;
        };
        let metrics = &self.metrics;
        let mut completed = 0;
        let stop = loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None if self.backend_closed => break RxStop::Idle,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(0) => {
                        tracing::error!("virtio-net: back-end closed");
                        self.backend_closed = true;
                        break RxStop::Idle;
                    }
                    Ok(len) => len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break RxStop::BackendEmpty,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        metrics.rx_backend_errors.inc();
                        tracing::error!(error = %e, "virtio-net: back-end read failed");
                        break RxStop::BackendEmpty;
                    }
                },
            };
            if len < VNET_HDR_LEN || len > self.rx_buf.len() {
                metrics.rx_backend_errors.inc();
                self.rx_pending = None;
                continue;
            }
            self.rx_pending = Some(len);
            let Some(chain) = active.rx.pop_descriptor_chain(&active.mem) else {
                break RxStop::NoBuffers;
            };
            if !self.rx_limiter.is_unlimited()
                && !self
                    .rx_limiter
                    .consume((len - VNET_HDR_LEN) as u64, Instant::now())
            {
                // Keep the buffer and the frame for when the timer fires.
                metrics.rx_throttled.inc();
                active
                    .rx
                    .set_next_avail(active.rx.next_avail().wrapping_sub(1));
                break RxStop::Throttled;
            }
            let head = chain.head_index();
            let frame = &mut self.rx_buf[..len];
            // num_buffers = 1: we never merge rx buffers.
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match deliver_frame(&active.mem, chain, frame) {
                Ok(()) => {
                    self.rx_pending = None;
                    metrics.rx_frames.inc();
                    metrics.rx_bytes.add((len - VNET_HDR_LEN) as u64);
                    if add_used(&mut active.rx, &active.mem, head, len as u32, metrics) {
                        completed += 1;
                    }
                }
                Err(RxError::TooBig(room)) => {
                    // Drop the frame but keep the buffer for the next one.
                    self.rx_pending = None;
                    metrics.rx_dropped_too_big.inc();
                    guest_warn!(
                        len,
                        room,
                        "virtio-net: rx frame larger than the buffer; dropped"
                    );
                    active
                        .rx
                        .set_next_avail(active.rx.next_avail().wrapping_sub(1));
                }
                Err(RxError::Guest(reason)) => {
                    // Return the useless buffer; the frame waits for the next.
                    metrics.guest_faults.inc();
                    guest_warn!(reason, "virtio-net: bad rx buffer");
                    if add_used(&mut active.rx, &active.mem, head, 0, metrics) {
                        completed += 1;
                    }
                }
            }
        };
        if let Err(e) = signal_used(&mut active.rx, &active.mem, &active.interrupt, completed) {
            metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-net: failed to signal the guest");
        }
        stop
    }

    /// Sends every frame the guest queued for transmission.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.activation.state_mut() else {
            return;
        };
        let metrics = &self.metrics;
        let backend = &mut self.backend;
        let buf = &mut self.tx_buf;
        let limiter = &mut self.tx_limiter;
        let stats = drain_queue_with(&mut active.tx, &active.mem, |chain| {
            if !limiter.is_unlimited() {
                // A malformed chain is charged nothing; gather_frame drops it.
                let bytes = chain_shape(&chain)
                    .map(|s| s.readable_bytes.saturating_sub(VNET_HDR_LEN as u64))
                    .unwrap_or(0);
                if !limiter.consume(bytes, Instant::now()) {
                    metrics.tx_throttled.inc();
                    return ChainVerdict::Defer;
                }
            }
            match gather_frame(&active.mem, chain, buf) {
                Ok(len) => match backend.write_frame(&buf[..len]) {
                    Ok(_) => {
                        metrics.tx_frames.inc();
                        metrics.tx_bytes.add((len - VNET_HDR_LEN) as u64);
                    }
                    Err(e) => {
                        metrics.tx_backend_errors.inc();
                        tracing::debug!(error = %e, "virtio-net: back-end refused a frame");
                    }
                },
                Err(reason) => {
                    metrics.tx_dropped_malformed.inc();
                    metrics.guest_faults.inc();
                    guest_warn!(reason, "virtio-net: malformed tx chain dropped");
                }
            }
            ChainVerdict::Done(0)
        });
        metrics.guest_faults.add(stats.used_ring_errors);
        if stats.stalled {
            metrics.guest_faults.inc();
            guest_warn!("virtio-net: tx avail index runs ahead of the ring");
        }
        if let Err(e) = signal_used(
            &mut active.tx,
            &active.mem,
            &active.interrupt,
            stats.completed,
        ) {
            metrics.event_errors.inc();
            tracing::error!(error = %e, "virtio-net: failed to signal the guest");
        }
    }
}

fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    metrics: &NetMetrics,
) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            metrics.guest_faults.inc();
            guest_warn!(head, error = %e, "virtio-net: failed to return an rx chain");
            false
        }
    }
}

enum RxError {
    /// The chain is fine but smaller than the frame (bytes of room given).
    TooBig(usize),
    Guest(&'static str),
}

fn deliver_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
) -> Result<(), RxError> {
    let shape = chain_shape(&chain).map_err(|_| RxError::Guest("malformed chain"))?;
    if shape.readable_bytes > 0 {
        return Err(RxError::Guest("device-readable buffer in an rx chain"));
    }
    let mut writer =
        Writer::new(mem, chain).map_err(|_| RxError::Guest("buffer outside guest memory"))?;
    let room = writer.available_bytes();
    if room < VNET_HDR_LEN {
        return Err(RxError::Guest("rx buffer smaller than the header"));
    }
    if room < frame.len() {
        return Err(RxError::TooBig(room));
    }
    writer
        .write_all(frame)
        .map_err(|_| RxError::Guest("rx buffer not writable"))
}

fn gather_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> Result<usize, &'static str> {
    let shape = chain_shape(&chain).map_err(|_| "malformed chain")?;
    if shape.writable_bytes > 0 {
        return Err("device-writable buffer in a tx chain");
    }
    let mut reader = Reader::new(mem, chain).map_err(|_| "buffer outside guest memory")?;
    let len = reader.available_bytes();
    if len < VNET_HDR_LEN {
        return Err("tx chain shorter than the header");
    }
    if len > buf.len() {
        return Err("tx frame too large");
    }
    reader
        .read_exact(&mut buf[..len])
        .map_err(|_| "tx buffer not readable")?;
    Ok(len)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_NET_F_MAC) | (1u64 << VIRTIO_NET_F_STATUS)
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is writable only in legacy virtio; we are 1.x only.
        guest_warn!(
            offset,
            "virtio-net: config space is read-only; write ignored"
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activation
            .activate_queues(ctx, |mem, [rx, tx], interrupt| ActiveState {
                mem,
                rx,
                tx,
                interrupt,
            })
    }

    fn is_activated(&self) -> bool {
        self.activation.is_active()
    }

    fn reset(&mut self) -> bool {
        self.rx_pending = None;
        self.activation
            .reset("virtio-net", &mut self.acked_features)
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
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const W: u32 = VRING_DESC_F_WRITE;
    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x2a];

    /// One end of a datagram socketpair: message boundaries are kept, like a tap.
    struct SocketBackend(UnixDatagram);

    impl NetBackend for SocketBackend {
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

    struct Harness<'a> {
        net: Arc<Mutex<Net>>,
        manager: EventManager<Arc<Mutex<Net>>>,
        rx: TestQueue<'a>,
        tx: TestQueue<'a>,
        kicks: [EventFd; 2],
        peer: UnixDatagram,
        trigger: Arc<CountingTrigger>,
    }

    fn harness(mem: &GuestMemoryMmap) -> Harness<'_> {
        limited_harness(mem, RateLimiter::unlimited(), RateLimiter::unlimited())
    }

    fn limited_harness(mem: &GuestMemoryMmap, rx: RateLimiter, tx: RateLimiter) -> Harness<'_> {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        let net = Arc::new(Mutex::new(
            Net::new(Box::new(SocketBackend(ours)), MAC)
                .unwrap()
                .with_rate_limiters(rx, tx),
        ));
        let mut manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        manager.add_subscriber(net.clone());
        let rx = TestQueue::new(mem, 0, NET_QUEUE_SIZE);
        let tx = TestQueue::new(mem, 0x8000, NET_QUEUE_SIZE);
        let kicks = [
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        ];
        let trigger = Arc::new(CountingTrigger::default());
        net.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![rx.queue(), tx.queue()],
                queue_events: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                interrupt: Arc::new(VirtioInterrupt::new(trigger.clone())),
            })
            .unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert!(net.lock().unwrap().backend_registered);
        Harness {
            net,
            manager,
            rx,
            tx,
            kicks,
            peer,
            trigger,
        }
    }

    impl Harness<'_> {
        fn kick(&mut self, queue: usize) {
            self.kicks[queue].write(1).unwrap();
            self.run();
        }
        /// Runs the loop until nothing is ready.
        fn run(&mut self) {
            while self.manager.run_with_timeout(0).unwrap() > 0 {}
        }
        fn metric(&self, name: &str) -> u64 {
            self.net.lock().unwrap().metrics()[name].as_u64().unwrap()
        }
        fn recv_all(&self) -> Vec<Vec<u8>> {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME_LEN];
            while let Ok(n) = self.peer.recv(&mut buf) {
                frames.push(buf[..n].to_vec());
            }
            frames
        }
    }

    /// A header (12 bytes, all zero) followed by `payload_len` patterned bytes.
    fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..payload_len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
        f
    }

    #[test]
    fn config_and_features() {
        let (ours, _peer) = UnixDatagram::pair().unwrap();
        let net = Net::new(Box::new(SocketBackend(ours)), MAC).unwrap();
        let mut cfg = [0u8; 8];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &MAC);
        assert_eq!(
            u16::from_le_bytes([cfg[6], cfg[7]]),
            VIRTIO_NET_S_LINK_UP as u16
        );
        let mut past = [0xffu8; 2];
        net.read_config(8, &mut past);
        assert_eq!(past, [0, 0]);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let features = net.avail_features();
        for bit in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS] {
            assert_ne!(features & (1u64 << bit), 0, "bit {bit}");
        }
    }

    #[test]
    fn tx_gathers_split_chains() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let f = frame(100, 1);
        // Header split across two descriptors, payload in a third.
        write_guest(&mem, 0x10_0000, &f[..5]);
        write_guest(&mem, 0x10_1000, &f[5..40]);
        write_guest(&mem, 0x10_2000, &f[40..]);
        h.tx.add_chain(&[
            RawDesc::new(0x10_0000, 5, 0),
            RawDesc::new(0x10_1000, 35, 0),
            RawDesc::new(0x10_2000, (f.len() - 40) as u32, 0),
        ]);
        let g = frame(60, 9);
        write_guest(&mem, 0x11_0000, &g);
        h.tx.add_chain(&[RawDesc::new(0x11_0000, g.len() as u32, 0)]);
        h.kick(TX_QUEUE);
        assert_eq!(h.recv_all(), vec![f, g]);
        assert_eq!(h.tx.used_idx(), 2);
        assert_eq!(h.tx.used(0), (0, 0));
        assert_eq!(h.metric("tx_frames"), 2);
        assert_eq!(h.metric("tx_bytes"), 160);
        assert_eq!(h.trigger.count(), 1);
    }

    #[test]
    fn rx_delivers_frames_when_backend_readable() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.rx.add_chain(&[
            RawDesc::new(0x10_0000, 10, W),
            RawDesc::new(0x10_1000, 1600, W),
        ]);
        h.kick(RX_QUEUE);
        let f = frame(200, 3);
        h.peer.send(&f).unwrap();
        h.run();
        assert_eq!(h.rx.used_idx(), 1);
        assert_eq!(h.rx.used(0), (0, f.len() as u32));
        let mut got = read_guest(&mem, 0x10_0000, 10);
        got.extend(read_guest(&mem, 0x10_1000, f.len() - 10));
        let mut expected = f.clone();
        expected[10..12].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(got, expected);
        assert_eq!(h.metric("rx_frames"), 1);
        assert_eq!(h.metric("rx_bytes"), 200);
        assert!(h.trigger.count() >= 1);
    }

    #[test]
    fn rx_without_buffers_keeps_the_frame_and_stops_polling() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let (f1, f2) = (frame(50, 1), frame(70, 2));
        h.peer.send(&f1).unwrap();
        h.peer.send(&f2).unwrap();
        h.run();
        {
            let net = h.net.lock().unwrap();
            assert_eq!(net.rx_pending, Some(f1.len()));
            assert!(!net.backend_registered);
        }
        assert_eq!(h.rx.used_idx(), 0);
        // One buffer: the first frame goes in; the second waits again.
        h.rx.add_chain(&[RawDesc::new(0x10_0000, 1600, W)]);
        h.kick(RX_QUEUE);
        assert_eq!(h.rx.used_idx(), 1);
        assert_eq!(read_guest(&mem, 0x10_0000 + 12, 50), f1[12..].to_vec());
        assert!(!h.net.lock().unwrap().backend_registered);
        h.rx.add_chain(&[RawDesc::new(0x11_0000, 1600, W)]);
        h.kick(RX_QUEUE);
        assert_eq!(h.rx.used_idx(), 2);
        assert_eq!(read_guest(&mem, 0x11_0000 + 12, 70), f2[12..].to_vec());
        assert!(h.net.lock().unwrap().backend_registered);
        assert_eq!(h.metric("rx_frames"), 2);
        assert_eq!(h.metric("rx_dropped_too_big"), 0);
    }

    #[test]
    fn rx_frame_larger_than_buffer_is_dropped_and_buffer_reused() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        h.rx.add_chain(&[RawDesc::new(0x10_0000, 500, W)]);
        h.kick(RX_QUEUE);
        write_guest(&mem, 0x10_0000, &[0xee; 500]);
        h.peer.send(&frame(1000, 1)).unwrap();
        let small = frame(100, 5);
        h.peer.send(&small).unwrap();
        h.run();
        assert_eq!(h.metric("rx_dropped_too_big"), 1);
        assert_eq!(h.rx.used_idx(), 1);
        assert_eq!(h.rx.used(0), (0, small.len() as u32));
        assert_eq!(read_guest(&mem, 0x10_0000 + 12, 100), small[12..].to_vec());
    }

    #[test]
    fn rx_hostile_buffers_are_returned_and_the_frame_kept() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        write_guest(&mem, 0x10_0000, &[0xee; 64]);
        // Readable, outside memory, self-loop, smaller than a header,
        // huge length, then a good buffer.
        h.rx.add_chain(&[RawDesc::new(0x10_0000, 64, 0)]);
        h.rx.add_chain(&[RawDesc::new(0xffff_0000_0000, 1600, W)]);
        let head =
            h.rx.add_chain(&[RawDesc::linked(0x10_0000, 64, W | VRING_DESC_F_NEXT, 2)]);
        assert_eq!(head, 2);
        h.rx.add_chain(&[RawDesc::new(0x10_0000, 4, W)]);
        h.rx.add_chain(&[RawDesc::new(0x10_0000, u32::MAX, W)]);
        h.rx.add_chain(&[RawDesc::new(0x20_0000, 1600, W)]);
        h.kick(RX_QUEUE);
        let f = frame(64, 4);
        h.peer.send(&f).unwrap();
        h.run();
        assert_eq!(h.rx.used_idx(), 6);
        for i in 0..5 {
            assert_eq!(h.rx.used(i).1, 0, "chain {i}");
        }
        assert_eq!(h.rx.used(5), (5, f.len() as u32));
        assert_eq!(read_guest(&mem, 0x10_0000, 64), vec![0xee; 64]);
        assert_eq!(h.metric("guest_faults"), 5);
        assert_eq!(h.metric("rx_frames"), 1);
    }

    #[test]
    fn tx_hostile_chains_are_dropped_and_counted() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        let good = frame(30, 8);
        write_guest(&mem, 0x12_0000, &good);
        // Loop, outside memory, zero length, shorter than a header,
        // device-writable, larger than any frame, huge length, then good.
        let head =
            h.tx.add_chain(&[RawDesc::linked(0x10_0000, 64, VRING_DESC_F_NEXT, 0)]);
        assert_eq!(head, 0);
        h.tx.add_chain(&[RawDesc::new(0xffff_0000_0000, 64, 0)]);
        h.tx.add_chain(&[RawDesc::new(0x10_0000, 0, 0)]);
        h.tx.add_chain(&[RawDesc::new(0x10_0000, 8, 0)]);
        h.tx.add_chain(&[RawDesc::new(0x10_0000, 64, W)]);
        h.tx.add_chain(&[RawDesc::new(0x10_0000, MAX_FRAME_LEN as u32 + 1, 0)]);
        h.tx.add_chain(&[RawDesc::new(0x10_0000, u32::MAX, 0)]);
        h.tx.add_chain(&[RawDesc::new(0x12_0000, good.len() as u32, 0)]);
        h.kick(TX_QUEUE);
        assert_eq!(h.recv_all(), vec![good]);
        assert_eq!(h.tx.used_idx(), 8);
        assert_eq!(h.metric("tx_dropped_malformed"), 7);
        assert_eq!(h.metric("tx_frames"), 1);
    }

    fn frames_per(ms: u64, frames: u64) -> RateLimiter {
        use crate::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
        let config = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: frames,
                one_time_burst: 0,
                refill_time_ms: ms,
            }),
        };
        RateLimiter::new(&config, Instant::now()).unwrap()
    }

    fn run_until(h: &mut Harness<'_>, done: impl Fn(&Harness<'_>) -> bool) {
        let start = Instant::now();
        while !done(h) && start.elapsed() < std::time::Duration::from_secs(5) {
            h.manager.run_with_timeout(100).unwrap();
        }
    }

    #[test]
    fn tx_rate_limit_holds_frames_until_the_timer() {
        let mem = guest_memory();
        let mut h = limited_harness(&mem, RateLimiter::unlimited(), frames_per(40, 2));
        let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(20, i)).collect();
        for (i, f) in frames.iter().enumerate() {
            let addr = 0x10_0000 + i as u64 * 0x1000;
            write_guest(&mem, addr, f);
            h.tx.add_chain(&[RawDesc::new(addr, f.len() as u32, 0)]);
        }
        h.kick(TX_QUEUE);
        assert_eq!(h.recv_all(), frames[..2].to_vec());
        assert_eq!(h.tx.used_idx(), 2);
        assert_eq!(h.metric("tx_throttled"), 1);
        let start = Instant::now();
        run_until(&mut h, |h| h.tx.used_idx() == 4);
        assert!(start.elapsed() >= std::time::Duration::from_millis(15));
        assert_eq!(h.recv_all(), frames[2..].to_vec());
        assert_eq!(h.metric("tx_frames"), 4);
    }

    #[test]
    fn rx_rate_limit_keeps_the_frame_and_the_buffer() {
        let mem = guest_memory();
        let mut h = limited_harness(&mem, frames_per(40, 1), RateLimiter::unlimited());
        for i in 0..3u64 {
            h.rx.add_chain(&[RawDesc::new(0x10_0000 + i * 0x1000, 1600, W)]);
        }
        h.kick(RX_QUEUE);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(30, i)).collect();
        for f in &frames {
            h.peer.send(f).unwrap();
        }
        h.run();
        assert_eq!(h.rx.used_idx(), 1);
        assert!(h.metric("rx_throttled") >= 1);
        assert!(!h.net.lock().unwrap().backend_registered);
        run_until(&mut h, |h| h.rx.used_idx() == 3);
        assert_eq!(h.rx.used_idx(), 3);
        for (i, f) in frames.iter().enumerate() {
            let got = read_guest(&mem, 0x10_0000 + i as u64 * 0x1000 + 12, 30);
            assert_eq!(got, f[12..].to_vec(), "frame {i}");
        }
        assert_eq!(h.metric("rx_frames"), 3);
        assert_eq!(h.metric("rx_dropped_too_big"), 0);
    }

    /// A back-end that is always readable and always at end-of-file.
    struct EofBackend(EventFd);

    impl NetBackend for EofBackend {
        fn read_frame(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
            Ok(0)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            Ok(frame.len())
        }
        fn raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    #[test]
    fn backend_eof_stops_polling() {
        let mem = guest_memory();
        let readable = EventFd::new(EFD_NONBLOCK).unwrap();
        readable.write(1).unwrap();
        let net = Arc::new(Mutex::new(
            Net::new(Box::new(EofBackend(readable)), MAC).unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        manager.add_subscriber(net.clone());
        let rx = TestQueue::new(&mem, 0, NET_QUEUE_SIZE);
        let tx = TestQueue::new(&mem, 0x8000, NET_QUEUE_SIZE);
        net.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![rx.queue(), tx.queue()],
                queue_events: vec![],
                interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingTrigger::default()))),
            })
            .unwrap();
        // Activation reads EOF at once; the fd is never left in the loop, so
        // a level-triggered readable fd cannot spin it.
        manager.run_with_timeout(100).unwrap();
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
        let net = net.lock().unwrap();
        assert!(net.backend_closed);
        assert!(!net.backend_registered);
    }

    #[test]
    fn reset_stops_backend_polling() {
        let mem = guest_memory();
        let mut h = harness(&mem);
        assert!(h.net.lock().unwrap().reset());
        h.run();
        {
            let net = h.net.lock().unwrap();
            assert!(!net.backend_registered);
            assert_eq!(net.activation.registered_queue_events(), 0);
        }
        // A frame arriving now is not read (nobody polls).
        h.peer.send(&frame(10, 0)).unwrap();
        assert_eq!(h.manager.run_with_timeout(0).unwrap(), 0);
    }

    #[test]
    fn activate_needs_two_queues() {
        let mem = guest_memory();
        let (ours, _peer) = UnixDatagram::pair().unwrap();
        let mut net = Net::new(Box::new(SocketBackend(ours)), MAC).unwrap();
        let tq = TestQueue::new(&mem, 0, 16);
        let result = net.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![tq.queue()],
            queue_events: vec![],
            interrupt: Arc::new(VirtioInterrupt::new(Arc::new(CountingTrigger::default()))),
        });
        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        assert!(!net.is_activated());
    }
}
