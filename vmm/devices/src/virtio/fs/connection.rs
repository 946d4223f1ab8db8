//! The vhost-user session with the back-end, on top of the `vhost` crate's
//! front-end: the feature handshake at connect time, and starting and
//! stopping the rings when the guest driver activates or resets the device.

use crate::GuestMemoryMmap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit in the virtio feature
/// word, never offered to the guest.
pub const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;

/// Protocol features we use when the back-end has them: more than one
/// queue, an ack for every request (so errors surface where they happen),
/// and a device reset that keeps the session.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// How long one request may wait for the back-end's answer. A back-end that
/// hangs must not hang the vCPU thread that activates the device forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("vhost-user socket {0} does not exist (is virtiofsd running?)")]
    SocketMissing(PathBuf),
    #[error("cannot connect to the vhost-user back-end at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("cannot set up the vhost-user socket: {0}")]
    Socket(#[source] io::Error),
    #[error("vhost-user {request} failed: {source}")]
    Request {
        request: &'static str,
        source: vhost::Error,
    },
    #[error("the back-end does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
    #[error("the back-end serves {have} queues, the device needs {want}")]
    TooFewQueues { want: usize, have: u64 },
    #[error("guest memory cannot be shared with the back-end (not file-backed): {0}")]
    MemoryRegion(#[source] vhost::Error),
    #[error("queue {queue}: {ring} at {addr:#x} is outside guest memory")]
    RingAddress {
        queue: usize,
        ring: &'static str,
        addr: u64,
    },
    #[error("{kicks} kick eventfds for {queues} queues")]
    KickCount { queues: usize, kicks: usize },
}

fn request(request: &'static str) -> impl FnOnce(vhost::Error) -> ConnectionError {
    move |source| ConnectionError::Request { request, source }
}

/// What the rings need when the driver activates the device.
pub struct RingSetup<'a> {
    /// Virtio features for SET_FEATURES (the guest's, plus the vhost-user
    /// protocol bit if negotiated).
    pub features: u64,
    pub mem: &'a GuestMemoryMmap,
    pub queues: &'a [Queue],
    /// Written by KVM when the guest notifies a queue (ioeventfds).
    pub kicks: &'a [EventFd],
    /// Written by the back-end when it used buffers (the irqfd).
    pub call: &'a EventFd,
}

pub struct Connection {
    frontend: Frontend,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
}

impl Connection {
    /// Connects and claims the back-end: SET_OWNER, then GET_FEATURES and,
    /// where supported, the protocol-feature and queue-count handshake.
    /// Also returns a second handle on the socket, for the event loop to
    /// watch for a hang-up.
    pub fn connect(path: &Path, queues: usize) -> Result<(Self, UnixStream), ConnectionError> {
        let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ConnectionError::SocketMissing(path.to_owned()),
            _ => ConnectionError::Connect {
                path: path.to_owned(),
                source,
            },
        })?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(ConnectionError::Socket)?;
        let watch = stream.try_clone().map_err(ConnectionError::Socket)?;
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        if backend_features & (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1) == 0 {
            return Err(ConnectionError::NoVersion1);
        }
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if backend_features & PROTOCOL_FEATURES_BIT != 0 {
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            protocol_features = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(protocol_features)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let have = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
                if have < queues as u64 {
                    return Err(ConnectionError::TooFewQueues { want: queues, have });
                }
            }
        }
        let connection = Self {
            frontend,
            backend_features,
            protocol_features,
        };
        Ok((connection, watch))
    }

    /// The virtio features the back-end offers (including the vhost-user
    /// protocol bit).
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    fn rings_start_disabled(&self) -> bool {
        self.backend_features & PROTOCOL_FEATURES_BIT != 0
    }

    /// Hands guest memory and the rings to the back-end and starts them.
    pub fn start(&mut self, setup: &RingSetup<'_>) -> Result<(), ConnectionError> {
        if setup.kicks.len() != setup.queues.len() {
            return Err(ConnectionError::KickCount {
                queues: setup.queues.len(),
                kicks: setup.kicks.len(),
            });
        }
        let rings_start_disabled = self.rings_start_disabled();
        let frontend = &mut self.frontend;
        frontend
            .set_features(setup.features)
            .map_err(request("SET_FEATURES"))?;
        let regions = setup
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ConnectionError::MemoryRegion)?;
        frontend
            .set_mem_table(&regions)
            .map_err(request("SET_MEM_TABLE"))?;
        for (index, (queue, kick)) in setup.queues.iter().zip(setup.kicks).enumerate() {
            // vhost-user ring addresses are in the front-end's address space;
            // the back-end translates them through the memory table.
            let host = |ring: &'static str, addr: u64| {
                setup
                    .mem
                    .get_host_address(GuestAddress(addr))
                    .map(|ptr| ptr as u64)
                    .map_err(|_| ConnectionError::RingAddress {
                        queue: index,
                        ring,
                        addr,
                    })
            };
            let ring = VringConfigData {
                queue_max_size: queue.max_size(),
                queue_size: queue.size(),
                flags: 0,
                desc_table_addr: host("descriptor table", queue.desc_table())?,
                used_ring_addr: host("used ring", queue.used_ring())?,
                avail_ring_addr: host("available ring", queue.avail_ring())?,
                log_addr: None,
            };
            frontend
                .set_vring_num(index, queue.size())
                .map_err(request("SET_VRING_NUM"))?;
            frontend
                .set_vring_addr(index, &ring)
                .map_err(request("SET_VRING_ADDR"))?;
            frontend
                .set_vring_base(index, queue.next_avail())
                .map_err(request("SET_VRING_BASE"))?;
            frontend
                .set_vring_call(index, setup.call)
                .map_err(request("SET_VRING_CALL"))?;
            frontend
                .set_vring_kick(index, kick)
                .map_err(request("SET_VRING_KICK"))?;
            if rings_start_disabled {
                frontend
                    .set_vring_enable(index, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the first `queues` rings (GET_VRING_BASE stops a ring) and, if
    /// the back-end can, resets its device state for the next driver.
    pub fn stop(&mut self, queues: usize) -> Result<(), ConnectionError> {
        for index in 0..queues {
            if self.rings_start_disabled() {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(request("GET_VRING_BASE"))?;
        }
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(request("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

/// Whether the back-end closed its end of `socket`: a zero-byte peek. Only
/// meaningful when no request is in flight, so pending bytes are a protocol
/// error. Does not block (the socket itself stays blocking for the
/// front-end).
pub fn peer_state(socket: &UnixStream) -> PeerState {
    let mut byte = 0u8;
    // SAFETY: `socket` is open for the duration of the call, the buffer is
    // one valid byte, and MSG_PEEK leaves any data in place.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => PeerState::Closed,
        n if n > 0 => PeerState::UnexpectedData,
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => PeerState::Alive,
            _ => PeerState::Closed,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Alive,
    Closed,
    UnexpectedData,
}
