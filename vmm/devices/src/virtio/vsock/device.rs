//! The vsock device: virtio plumbing and the moves between queues and muxer.

use super::muxer::Muxer;
use super::packet::{read_tx_packet, PacketFault, RxBuffer};
use super::{VsockError, VsockLimits, VsockMetrics, WarnLimiter, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use std::path::PathBuf;
use std::sync::Arc;
use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// Stream sockets only: VIRTIO_VSOCK_F_SEQPACKET is not offered.
const AVAIL_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
/// Linux caps CIDs at 32 bits (`VMADDR_CID_ANY` is u32::MAX); 0-2 are reserved.
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    /// Written by `activate()` (on a vCPU thread) so that the event loop
    /// registers the queue events; see `virtio/mod.rs`.
    pub(super) activate_evt: EventFd,
    pub(super) active: Option<ActivateContext>,
    pub(super) queue_evts_registered: bool,
    pub(super) muxer: Muxer,
    pub(super) metrics: Arc<VsockMetrics>,
    pub(super) warn: WarnLimiter,
    /// Payload scratch for packets to the guest, reused to avoid allocations.
    rx_data: Vec<u8>,
}

impl Vsock {
    /// Creates the device and binds its host socket at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        Self::with_limits(guest_cid, uds_path, VsockLimits::default())
    }

    pub fn with_limits(
        guest_cid: u64,
        uds_path: PathBuf,
        limits: VsockLimits,
    ) -> Result<Self, VsockError> {
        if !(3..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(guest_cid, &uds_path, limits, metrics.clone())?;
        Ok(Self {
            guest_cid,
            acked_features: 0,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            active: None,
            queue_evts_registered: false,
            muxer,
            metrics,
            warn: WarnLimiter::default(),
            rx_data: Vec::new(),
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn vsock_metrics(&self) -> &Arc<VsockMetrics> {
        &self.metrics
    }

    /// Hands every available tx chain to the muxer. Returns whether any used
    /// entries were added.
    pub(super) fn process_tx(&mut self) -> bool {
        let Some(ctx) = self.active.as_mut() else {
            return false;
        };
        let mem = &ctx.mem;
        let queue = &mut ctx.queues[TX_QUEUE];
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match read_tx_packet(mem, chain, self.guest_cid) {
                Ok(pkt) => {
                    self.metrics.tx_packets.inc();
                    self.metrics.tx_bytes.add(pkt.data.len() as u64);
                    self.muxer.on_guest_packet(&pkt);
                }
                Err(e) => {
                    let counter = match e.fault() {
                        PacketFault::Chain => &self.metrics.tx_bad_chain,
                        PacketFault::Len => &self.metrics.tx_bad_len,
                        PacketFault::Cid => &self.metrics.tx_bad_cid,
                        PacketFault::Op => &self.metrics.tx_bad_op,
                    };
                    counter.inc();
                    self.warn
                        .warn(format_args!("dropping tx packet (head {head}): {e}"));
                }
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                // Only a head index outside the ring gets here.
                self.metrics.tx_bad_chain.inc();
                self.warn
                    .warn(format_args!("cannot return tx chain {head}: {e}"));
            } else {
                used = true;
            }
        }
        used
    }

    /// Fills rx chains while the muxer has packets. Returns whether any used
    /// entries were added.
    pub(super) fn process_rx(&mut self) -> bool {
        let Some(ctx) = self.active.as_mut() else {
            return false;
        };
        let mem = &ctx.mem;
        let queue = &mut ctx.queues[RX_QUEUE];
        let mut used = false;
        while self.muxer.has_pending_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match RxBuffer::new(mem, chain) {
                Ok(buf) => {
                    let Some(hdr) = self
                        .muxer
                        .next_rx_packet(buf.data_capacity(), &mut self.rx_data)
                    else {
                        // Nothing to send after all: keep the buffer.
                        queue.go_to_previous_position();
                        break;
                    };
                    match buf.write(&hdr, &self.rx_data) {
                        Ok(n) => {
                            self.metrics.rx_packets.inc();
                            self.metrics.rx_bytes.add(self.rx_data.len() as u64);
                            n
                        }
                        Err(e) => {
                            // The buffer was validated, so this is a bug, not
                            // the guest; the packet is lost.
                            tracing::error!(error = %e, "vsock: writing an rx packet failed");
                            0
                        }
                    }
                }
                Err(e) => {
                    self.metrics.rx_bad_chain.inc();
                    self.warn
                        .warn(format_args!("returning bad rx chain (head {head}): {e}"));
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, written) {
                self.metrics.rx_bad_chain.inc();
                self.warn
                    .warn(format_args!("cannot return rx chain {head}: {e}"));
            } else {
                used = true;
            }
        }
        used
    }

    /// Raises the used-ring interrupt.
    pub(super) fn signal_used(&self) {
        let Some(ctx) = self.active.as_ref() else {
            return;
        };
        if let Err(e) = ctx.interrupt.signal_used_queue() {
            self.metrics.event_fails.inc();
            tracing::error!(error = %e, "vsock: failed to signal the guest");
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, features: u64) {
        let unknown = features & !AVAIL_FEATURES;
        if unknown != 0 {
            self.warn.warn(format_args!(
                "driver acked unoffered features {unknown:#x}, ignoring them"
            ));
        }
        self.acked_features = features & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // The config space is `le64 guest_cid`; reads past it give zeros.
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|pos| usize::try_from(pos).ok())
                .and_then(|pos| config.get(pos).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.metrics.cfg_write_ignored.inc();
        self.warn.warn(format_args!(
            "ignoring {}-byte write to read-only config at {offset:#x}",
            data.len()
        ));
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.active.is_some() {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::AlreadyActive);
        }
        let expected = QUEUE_SIZES.len();
        for got in [ctx.queues.len(), ctx.queue_events.len()] {
            if got != expected {
                self.metrics.activate_fails.inc();
                return Err(ActivateError::QueueCount { expected, got });
            }
        }
        if let Some(bad) = ctx.queues.iter().position(|q| !q.is_valid(&ctx.mem)) {
            self.metrics.activate_fails.inc();
            return Err(ActivateError::InvalidQueue(bad));
        }
        self.active = Some(ctx);
        if let Err(e) = self.activate_evt.write(1) {
            self.active = None;
            self.metrics.activate_fails.inc();
            return Err(ActivateError::ActivateEvent(e));
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Not supported: connections and epoll registrations live in the event
    /// loop, which a vCPU-thread reset cannot reach safely. The transport then
    /// marks the device as needing a reset, like Firecracker's vsock.
    fn reset(&mut self) -> bool {
        false
    }

    fn metrics(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&*self.metrics).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "open_connections".into(),
                self.muxer.connection_count().into(),
            );
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::test_utils::{TempDir, TestDriver};

    fn device(dir: &TempDir) -> Vsock {
        Vsock::new(3, dir.path().join("v.sock")).unwrap()
    }

    #[test]
    fn identity_and_config() {
        let dir = TempDir::new();
        let mut dev = Vsock::new(0x1_0203, dir.path().join("v.sock")).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(dev.avail_features(), 1 << 32);
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features, 1 << 32);

        let mut cfg = [0xffu8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1_0203);
        let mut part = [0xffu8; 4];
        dev.read_config(6, &mut part);
        assert_eq!(part, [0, 0, 0, 0]);
        dev.read_config(1, &mut part);
        assert_eq!(part, [0x02, 0x01, 0, 0]);
        dev.read_config(u64::MAX, &mut part);
        assert_eq!(part, [0; 4]);
        dev.write_config(0, &[1, 2, 3]);
        dev.read_config(0, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 0x1_0203);
    }

    #[test]
    fn reserved_cids_are_refused() {
        let dir = TempDir::new();
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(
                Vsock::new(cid, dir.path().join("v.sock")),
                Err(VsockError::InvalidCid(c)) if c == cid
            ));
        }
    }

    #[test]
    fn activate_checks_queue_count_and_refuses_twice() {
        let dir = TempDir::new();
        let mut dev = device(&dir);
        let driver = TestDriver::new();
        let mut ctx = driver.activate_context();
        ctx.queues.pop();
        assert!(matches!(
            dev.activate(ctx),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        assert!(!dev.is_activated());
        dev.activate(driver.activate_context()).unwrap();
        assert!(dev.is_activated());
        assert_eq!(dev.activate_evt.read().unwrap(), 1);
        assert!(matches!(
            dev.activate(driver.activate_context()),
            Err(ActivateError::AlreadyActive)
        ));
        assert!(!dev.reset());
    }

    #[test]
    fn socket_file_is_removed_on_drop() {
        let dir = TempDir::new();
        let path = dir.path().join("v.sock");
        let dev = device(&dir);
        assert!(path.exists());
        drop(dev);
        assert!(!path.exists());
    }

    #[test]
    fn metrics_are_json_counters() {
        let dir = TempDir::new();
        let dev = device(&dir);
        let m = dev.metrics();
        assert_eq!(m["tx_bad_chain"], 0);
        assert_eq!(m["open_connections"], 0);
    }
}
