//! The virtio-fs device model: config space, feature offer and the device
//! lifecycle. Its queues are served by the back-end, which the guest's
//! notifications (ioeventfds) reach directly and which interrupts the guest
//! directly (irqfd); the VMM is only on the control path.

use super::config_space::{self, CONFIG_SPACE_SIZE};
use super::connection::{Connection, ConnectionError, RingSetup, PROTOCOL_FEATURES_BIT};
use super::metrics::FsMetrics;
use crate::guest_warn;
use crate::virtio::util::read_config_bytes;
use crate::virtio::{ActivateContext, ActivateError, VirtioDevice};
use microvm_errors::error_chain;
use serde::Serialize;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Features we pass through to the guest when the back-end offers them. Not
/// packed rings (the transport sets up split rings only) and nothing that
/// needs an IOMMU or a DAX window.
const PASSTHROUGH_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

/// What the device needs: the VMM fills it from its own (serde) config, which
/// is also where the values are validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserFsConfig {
    /// The back-end's vhost-user socket; it must be listening.
    pub socket: PathBuf,
    /// What the guest mounts (at most [`super::FS_TAG_MAX_LEN`] bytes).
    pub tag: String,
    /// Request queues; the device has one more, the high-priority queue.
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs {tag:?}: {source}")]
    Connect {
        tag: String,
        #[source]
        source: ConnectionError,
    },
    #[error("cannot create the interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsState {
    /// Connected, waiting for the driver.
    Ready,
    /// The back-end runs this many rings.
    Active(usize),
    /// The back-end is gone or misbehaved; the guest's I/O on this share
    /// stops. Only a new VMM (and back-end) recovers.
    Failed,
}

pub struct VhostUserFs {
    tag: String,
    socket: PathBuf,
    config_space: [u8; CONFIG_SPACE_SIZE],
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    /// `None` once failed.
    pub(super) connection: Option<Connection>,
    /// A second handle on the back-end socket, which the event loop watches.
    /// Only the event loop drops it (after unregistering it): closing an fd
    /// still registered with epoll would leave the event manager a stale
    /// entry that a later device's fd could collide with.
    pub(super) watch: Option<UnixStream>,
    /// The back-end's call fd for every queue. The VMM registers it with KVM
    /// as this device's irqfd.
    interrupt_evt: EventFd,
    pub(super) state: FsState,
    pub(super) metrics: FsMetrics,
}

impl VhostUserFs {
    /// Connects to the back-end and negotiates what can be negotiated before
    /// the guest driver shows up.
    pub fn connect(config: &VhostUserFsConfig) -> Result<Self, FsError> {
        let queue_count = usize::from(config.num_queues) + 1;
        let (connection, watch) =
            Connection::connect(&config.socket, queue_count).map_err(|source| {
                FsError::Connect {
                    tag: config.tag.clone(),
                    source,
                }
            })?;
        let avail_features = connection.backend_features() & PASSTHROUGH_FEATURES;
        tracing::info!(
            tag = %config.tag,
            socket = %config.socket.display(),
            backend_features = format_args!("{:#x}", connection.backend_features()),
            protocol_features = format_args!("{:#x}", connection.protocol_features().bits()),
            "virtio-fs: connected to the vhost-user back-end"
        );
        Ok(Self {
            tag: config.tag.clone(),
            socket: config.socket.clone(),
            config_space: config_space::build(&config.tag, u32::from(config.num_queues)),
            queue_sizes: vec![config.queue_size; queue_count],
            avail_features,
            acked_features: 0,
            connection: Some(connection),
            watch: Some(watch),
            interrupt_evt: EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd)?,
            state: FsState::Ready,
            metrics: FsMetrics::default(),
        })
    }

    /// The eventfd the back-end writes when it used buffers. Register it as
    /// the device's irqfd (and build the transport's interrupt on it).
    pub fn interrupt_eventfd(&self) -> &EventFd {
        &self.interrupt_evt
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn state(&self) -> FsState {
        self.state
    }

    /// Gives up on the back-end: logged once, counted, and the connection
    /// shut down (the back-end sees EOF; the event loop sees the hang-up and
    /// lets go of the socket). The guest's requests on this share will not
    /// complete.
    pub(super) fn fail(&mut self, why: &dyn std::fmt::Display) {
        if self.state != FsState::Failed {
            tracing::error!(
                tag = %self.tag,
                socket = %self.socket.display(),
                "virtio-fs: {why}; the share stops working until the VM is restarted"
            );
            self.metrics.backend_failures.inc();
        }
        self.state = FsState::Failed;
        self.connection = None;
        if let Some(watch) = &self.watch {
            // An error means it is disconnected already.
            let _ = watch.shutdown(Shutdown::Both);
        }
    }

    fn start_rings(&mut self, ctx: &ActivateContext) -> Result<(), ConnectionError> {
        let Some(connection) = self.connection.as_mut() else {
            return Err(ConnectionError::Socket(std::io::Error::from(
                std::io::ErrorKind::NotConnected,
            )));
        };
        let features =
            self.acked_features | (connection.backend_features() & PROTOCOL_FEATURES_BIT);
        connection.start(&RingSetup {
            features,
            mem: &ctx.mem,
            queues: &ctx.queues,
            kicks: &ctx.queue_events,
            call: &self.interrupt_evt,
        })
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
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
        self.metrics.guest_faults.inc();
        guest_warn!(
            offset,
            "virtio-fs: config space is read-only; write ignored"
        );
    }

    /// Runs on the vCPU thread that wrote DRIVER_OK: a few request/reply
    /// round trips, each bounded by the socket timeout.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        match self.state {
            FsState::Active(_) => return Err(ActivateError::AlreadyActive),
            FsState::Failed => {
                self.metrics.activation_failures.inc();
                return Err(ActivateError::Backend(format!(
                    "the vhost-user back-end at {} is gone",
                    self.socket.display()
                )));
            }
            FsState::Ready => {}
        }
        let expected = self.queue_sizes.len();
        if ctx.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                got: ctx.queues.len(),
            });
        }
        if let Err(e) = self.start_rings(&ctx) {
            self.metrics.activation_failures.inc();
            let message = error_chain(&e);
            // The session is in an unknown state after a half-done setup.
            self.fail(&format_args!("activation failed: {message}"));
            return Err(ActivateError::Backend(message));
        }
        self.metrics.activations.inc();
        self.state = FsState::Active(expected);
        tracing::debug!(tag = %self.tag, queues = expected, "virtio-fs: rings handed to the back-end");
        Ok(())
    }

    fn is_activated(&self) -> bool {
        matches!(self.state, FsState::Active(_))
    }

    fn reset(&mut self) -> bool {
        let FsState::Active(queues) = self.state else {
            // Nothing runs: never activated, or the back-end is gone.
            self.acked_features = 0;
            return true;
        };
        let result = match self.connection.as_mut() {
            Some(connection) => connection.stop(queues),
            None => Ok(()),
        };
        match result {
            Ok(()) => {
                self.metrics.resets.inc();
                self.state = FsState::Ready;
                self.acked_features = 0;
                true
            }
            Err(e) => {
                // The back-end may still be using the rings: the transport
                // must not hand the guest a fresh device.
                self.fail(&format_args!(
                    "stopping the rings failed: {}",
                    error_chain(&e)
                ));
                false
            }
        }
    }

    fn metrics(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.metrics).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("tag".into(), self.tag.clone().into());
            map.insert(
                "state".into(),
                serde_json::to_value(self.state).unwrap_or_default(),
            );
        }
        value
    }
}
