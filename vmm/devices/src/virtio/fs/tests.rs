//! The device against an in-process vhost-user back-end (built with the
//! `vhost-user-backend` crate), driven through the real virtio-mmio
//! transport over memfd guest memory, as a guest driver would.

use super::*;
use crate::interrupt::EventFdTrigger;
use crate::virtio::guest_ring::status::{ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET};
use crate::virtio::guest_ring::{bring_up, DriverRegisters, GuestRing};
use crate::virtio::mmio::{reg, MmioTransport};
use crate::virtio::{VirtioDevice, VirtioInterrupt};
use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use microvm_errors::error_chain;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap,
    MmapRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

type BackendMemory = GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>;

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const INDIRECT: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
const PACKED: u64 = 1 << VIRTIO_F_RING_PACKED;
const PROTOCOL: u64 = connection::PROTOCOL_FEATURES_BIT;

/// Records what the front-end told it; answers each request-queue chain by
/// writing its readable bytes, reversed, into its writable buffer.
struct FakeBackend {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queues: usize,
    max_queue_size: usize,
    acked: Mutex<Vec<u64>>,
    memory: Mutex<Option<BackendMemory>>,
    resets: AtomicUsize,
}

impl FakeBackend {
    fn new(features: u64, protocol: VhostUserProtocolFeatures, queues: usize) -> Self {
        Self {
            features,
            protocol,
            queues,
            max_queue_size: 1024,
            acked: Mutex::default(),
            memory: Mutex::default(),
            resets: AtomicUsize::new(0),
        }
    }

    fn virtiofsd_like() -> Self {
        Self::new(
            VERSION_1 | EVENT_IDX | INDIRECT | PACKED | PROTOCOL,
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::RESET_DEVICE
                | VhostUserProtocolFeatures::CONFIG,
            2,
        )
    }

    fn answer(&self, vring: &VringRwLock<BackendMemory>) -> io::Result<()> {
        let Some(memory) = self.memory.lock().unwrap().clone() else {
            return Ok(());
        };
        let mem = memory.memory();
        let mut used = Vec::new();
        {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let mut input = Vec::new();
                let mut output = None;
                for desc in chain {
                    if desc.is_write_only() {
                        output = Some((desc.addr(), desc.len()));
                    } else {
                        let mut buf = vec![0u8; desc.len() as usize];
                        mem.read_slice(&mut buf, desc.addr())
                            .map_err(io::Error::other)?;
                        input.extend(buf);
                    }
                }
                input.reverse();
                let (addr, len) = output.ok_or_else(|| io::Error::other("no output buffer"))?;
                input.truncate(len as usize);
                mem.write_slice(&input, addr).map_err(io::Error::other)?;
                used.push((head, input.len() as u32));
            }
            for (head, len) in &used {
                queue
                    .add_used(&*mem, *head, *len)
                    .map_err(io::Error::other)?;
            }
        }
        // Interrupts only for real completions, so the tests can count them.
        if used.is_empty() {
            return Ok(());
        }
        vring.signal_used_queue()
    }
}

impl VhostUserBackend for FakeBackend {
    type Bitmap = ();
    type Vring = VringRwLock<BackendMemory>;

    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn acked_features(&self, features: u64) {
        self.acked.lock().unwrap().push(features);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }
    fn reset_device(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
    fn set_event_idx(&self, _enabled: bool) {}
    /// Without one, the daemon's worker thread never leaves epoll_wait and
    /// dropping the daemon hangs.
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }
    fn update_memory(&self, mem: BackendMemory) -> io::Result<()> {
        *self.memory.lock().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.answer(vring),
            None => Ok(()),
        }
    }
}

/// The VMM's defaults: one request queue of 1024.
fn fs_config(socket: PathBuf, tag: &str) -> VhostUserFsConfig {
    VhostUserFsConfig {
        socket,
        tag: tag.into(),
        num_queues: 1,
        queue_size: 1024,
    }
}

/// Guest RAM in a memfd, as the VMM makes it: a vhost-user back-end can
/// map only file-backed memory.
fn memfd_memory(size: usize) -> GuestMemoryMmap {
    // SAFETY: the name is NUL-terminated, the flags are valid and the
    // result is checked before use.
    let fd = unsafe { libc::memfd_create(c"microvm-fs-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let region = MmapRegion::from_file(FileOffset::new(file, 0), size).unwrap();
    let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
    GuestMemoryMmap::from_regions(vec![region]).unwrap()
}

/// A fake back-end serving one connection on a fresh socket.
struct Served {
    socket: PathBuf,
    backend: Arc<FakeBackend>,
    shutdown: mpsc::Receiver<ShutdownHandle>,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    fn start(name: &str, backend: FakeBackend) -> Self {
        let socket =
            std::env::temp_dir().join(format!("microvm-vufs-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let mut listener = Listener::new(&socket, true).unwrap();
        let backend = Arc::new(backend);
        let mut daemon = VhostUserDaemon::new(
            "fake-fs".into(),
            backend.clone(),
            GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new()),
        )
        .unwrap();
        let (tx, shutdown) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            daemon.start(&mut listener).unwrap();
            let _ = tx.send(daemon.shutdown_handle().unwrap());
            let _ = daemon.wait();
        });
        Self {
            socket,
            backend,
            shutdown,
            thread: Some(thread),
        }
    }

    fn config(&self) -> VhostUserFsConfig {
        fs_config(self.socket.clone(), "microvm-shared")
    }

    fn kill(&mut self) {
        let handle = self.shutdown.recv_timeout(Duration::from_secs(5)).unwrap();
        handle.shutdown();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

const QUEUE_SIZE: u16 = 16;

struct Guest {
    memory: GuestMemoryMmap,
    mmio: VhostUserMmio,
    device: Arc<Mutex<VhostUserFs>>,
    rings: Vec<GuestRing>,
}

impl DriverRegisters for Guest {
    fn read_reg(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.mmio.mmio_read(MmioAddress(0), offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        self.mmio
            .mmio_write(MmioAddress(0), offset, &value.to_le_bytes());
    }
}

impl Guest {
    fn new(device: VhostUserFs) -> Self {
        let memory = memfd_memory(32 << 20);
        let irq = device.interrupt_eventfd().try_clone().unwrap();
        let device = Arc::new(Mutex::new(device));
        let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(EventFdTrigger::new(irq))));
        let transport = MmioTransport::new(memory.clone(), device.clone(), interrupt).unwrap();
        Self {
            memory,
            mmio: VhostUserMmio::new(transport),
            device,
            rings: Vec::new(),
        }
    }

    fn read(&mut self, offset: u64) -> u32 {
        self.read_reg(offset)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.write_reg(offset, value)
    }

    fn offered_features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        low | (u64::from(self.read(reg::DEVICE_FEATURES)) << 32)
    }

    /// The whole driver handshake; returns the status register after
    /// DRIVER_OK.
    fn bring_up(&mut self, features: u64) -> u32 {
        let rings: Vec<GuestRing> = (0..2u64)
            .map(|queue| GuestRing::at(0x10_0000 + queue * 0x1000, QUEUE_SIZE))
            .collect();
        let status = bring_up(self, features, &rings);
        self.rings = rings;
        status
    }

    fn wait_for_interrupt(&self) -> bool {
        let fd = self.device.lock().unwrap().interrupt_eventfd().as_raw_fd();
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pollfd, 1, 5000) };
        // Consume it, so the next wait waits for the next interrupt.
        let _ = self.device.lock().unwrap().interrupt_eventfd().read();
        ready == 1
    }
}

const ALL_DRIVER_FEATURES: u64 = VERSION_1 | EVENT_IDX | INDIRECT;

#[test]
fn offers_only_passthrough_features_and_serves_the_config_space() {
    let served = Served::start("offer", FakeBackend::virtiofsd_like());
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    assert_eq!(guest.read(reg::DEVICE_ID), 26);
    // No packed rings, no vhost-user protocol bit.
    assert_eq!(guest.offered_features(), VERSION_1 | EVENT_IDX | INDIRECT);
    guest.write(reg::QUEUE_SEL, 1);
    assert_eq!(guest.read(reg::QUEUE_NUM_MAX), 1024);
    guest.write(reg::QUEUE_SEL, 2);
    assert_eq!(guest.read(reg::QUEUE_NUM_MAX), 0);
    let mut tag = [0u8; CONFIG_SPACE_SIZE];
    guest.mmio.mmio_read(MmioAddress(0), reg::CONFIG, &mut tag);
    assert_eq!(&tag[..14], b"microvm-shared");
    assert_eq!(guest.read(reg::CONFIG + 36), 1, "num_request_queues");
    // The config space is read-only.
    guest.write(reg::STATUS, ACK);
    guest.write(reg::STATUS, ACK | DRIVER);
    guest.write(reg::CONFIG, 0x4141_4141);
    assert_eq!(guest.read(reg::CONFIG) & 0xff, u32::from(b'm'));
    assert_eq!(guest.device.lock().unwrap().metrics()["guest_faults"], 1);
}

#[test]
fn activation_hands_the_rings_to_the_backend_end_to_end() {
    let served = Served::start("activate", FakeBackend::virtiofsd_like());
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    // The guest takes EVENT_IDX but not INDIRECT_DESC.
    let status = guest.bring_up(VERSION_1 | EVENT_IDX);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(guest.device.lock().unwrap().state(), FsState::Active(2));
    // SET_FEATURES carried the guest's choice plus the protocol bit.
    assert_eq!(
        *served.backend.acked.lock().unwrap(),
        vec![VERSION_1 | EVENT_IDX | PROTOCOL]
    );
    // A request on the request queue, through the notify register (which
    // writes the kick eventfd the back-end now owns).
    let mem = guest.memory.clone();
    mem.write_slice(b"hello, backend", GuestAddress(0x20_0000))
        .unwrap();
    guest.rings[1].add(&mem, &[(0x20_0000, 14, false), (0x21_0000, 64, true)]);
    guest.write(reg::QUEUE_NOTIFY, 1);
    assert!(guest.wait_for_interrupt(), "back-end never signalled");
    assert_eq!(guest.rings[1].used_idx(&mem), 1);
    assert_eq!(guest.rings[1].used(&mem, 0).1, 14);
    let mut reply = [0u8; 14];
    mem.read_slice(&mut reply, GuestAddress(0x21_0000)).unwrap();
    assert_eq!(&reply, b"dnekcab ,olleh");
    // The transport never saw that interrupt, yet the guest's ISR read must
    // show the used-ring bit.
    assert_eq!(guest.read(reg::INTERRUPT_STATUS) & 1, 1);
    assert_eq!(guest.device.lock().unwrap().metrics()["activations"], 1);
}

#[test]
fn reset_stops_the_rings_and_the_device_activates_again() {
    let served = Served::start("reset", FakeBackend::virtiofsd_like());
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    assert_eq!(guest.bring_up(ALL_DRIVER_FEATURES) & DRIVER_OK, DRIVER_OK);
    guest.write(reg::STATUS, 0);
    assert_eq!(guest.read(reg::STATUS), 0);
    // Before DRIVER_OK nothing claims a used ring.
    assert_eq!(guest.read(reg::INTERRUPT_STATUS), 0);
    assert_eq!(served.backend.resets.load(Ordering::SeqCst), 1);
    assert_eq!(guest.device.lock().unwrap().state(), FsState::Ready);
    assert_eq!(guest.bring_up(VERSION_1) & NEEDS_RESET, 0);
    let mem = guest.memory.clone();
    guest.rings[1].add(&mem, &[(0x20_0000, 4, false), (0x21_0000, 4, true)]);
    guest.write(reg::QUEUE_NOTIFY, 1);
    assert!(guest.wait_for_interrupt());
    assert_eq!(guest.rings[1].used_idx(&mem), 1);
    assert_eq!(
        served.backend.acked.lock().unwrap().last(),
        Some(&(VERSION_1 | PROTOCOL))
    );
}

#[test]
fn backend_death_is_noticed_by_the_event_loop_and_fails_the_device() {
    let mut served = Served::start("death", FakeBackend::virtiofsd_like());
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    let mut manager = EventManager::<Arc<Mutex<VhostUserFs>>>::new().unwrap();
    manager.add_subscriber(guest.device.clone());
    assert_eq!(guest.bring_up(ALL_DRIVER_FEATURES) & DRIVER_OK, DRIVER_OK);
    // Nothing to report while the back-end lives.
    assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    served.kill();
    assert_eq!(manager.run_with_timeout(2000).unwrap(), 1);
    let device = guest.device.clone();
    assert_eq!(device.lock().unwrap().state(), FsState::Failed);
    assert_eq!(device.lock().unwrap().metrics()["backend_failures"], 1);
    assert_eq!(device.lock().unwrap().metrics()["state"], "failed");
    // The fd is no longer watched: the loop stays quiet.
    assert_eq!(manager.run_with_timeout(50).unwrap(), 0);
    // A driver reset works (nothing runs), but the next activation is
    // refused with DEVICE_NEEDS_RESET rather than hanging or crashing.
    let status = guest.bring_up(ALL_DRIVER_FEATURES);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(device.lock().unwrap().metrics()["activation_failures"], 1);
}

#[test]
fn backend_death_is_noticed_at_reset_without_the_event_loop() {
    let mut served = Served::start("death-reset", FakeBackend::virtiofsd_like());
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    assert_eq!(guest.bring_up(ALL_DRIVER_FEATURES) & DRIVER_OK, DRIVER_OK);
    served.kill();
    // Stopping the rings fails: the transport refuses the reset.
    guest.write(reg::STATUS, 0);
    assert_eq!(guest.read(reg::STATUS) & NEEDS_RESET, NEEDS_RESET);
    assert_eq!(guest.device.lock().unwrap().state(), FsState::Failed);
}

#[test]
fn backend_without_protocol_features_still_works() {
    let served = Served::start(
        "plain",
        FakeBackend::new(VERSION_1, VhostUserProtocolFeatures::empty(), 2),
    );
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    assert_eq!(guest.offered_features(), VERSION_1);
    assert_eq!(guest.bring_up(VERSION_1) & NEEDS_RESET, 0);
    let mem = guest.memory.clone();
    guest.rings[1].add(&mem, &[(0x20_0000, 2, false), (0x21_0000, 2, true)]);
    guest.write(reg::QUEUE_NOTIFY, 1);
    assert!(guest.wait_for_interrupt());
    assert_eq!(guest.rings[1].used_idx(&mem), 1);
    // Without REPLY_ACK nothing was acknowledged, but the back-end has
    // handled SET_FEATURES (no protocol bit) by the time it served a request.
    assert_eq!(*served.backend.acked.lock().unwrap(), vec![VERSION_1]);
}

#[test]
fn unusable_backends_are_refused_with_clear_errors() {
    let no_version_1 = Served::start(
        "legacy",
        FakeBackend::new(EVENT_IDX, VhostUserProtocolFeatures::empty(), 2),
    );
    let err = VhostUserFs::connect(&no_version_1.config()).err().unwrap();
    let text = error_chain(&err);
    assert!(
        text.contains("microvm-shared") && text.contains("VERSION_1"),
        "{text}"
    );

    let one_queue = Served::start(
        "one-queue",
        FakeBackend::new(
            VERSION_1 | PROTOCOL,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            1,
        ),
    );
    let text = error_chain(&VhostUserFs::connect(&one_queue.config()).err().unwrap());
    assert!(
        text.contains("serves 1 queues, the device needs 2"),
        "{text}"
    );

    let missing = fs_config("/nonexistent/virtiofsd.sock".into(), "t");
    let text = error_chain(&VhostUserFs::connect(&missing).err().unwrap());
    assert!(
        text.contains("/nonexistent/virtiofsd.sock") && text.contains("is virtiofsd running"),
        "{text}"
    );

    // A socket nobody listens on any more.
    let path = std::env::temp_dir().join(format!("microvm-vufs-{}-stale.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let text = error_chain(
        &VhostUserFs::connect(&fs_config(path.clone(), "t"))
            .err()
            .unwrap(),
    );
    assert!(text.contains("cannot connect"), "{text}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_refused_activation_fails_the_device_and_lets_go_of_the_backend() {
    // The back-end takes rings of 8 at most; the driver sets up 16.
    let mut backend = FakeBackend::virtiofsd_like();
    backend.max_queue_size = 8;
    let mut served = Served::start("refused", backend);
    let mut guest = Guest::new(VhostUserFs::connect(&served.config()).unwrap());
    let mut manager = EventManager::<Arc<Mutex<VhostUserFs>>>::new().unwrap();
    manager.add_subscriber(guest.device.clone());
    let status = guest.bring_up(ALL_DRIVER_FEATURES);
    assert_eq!(status & NEEDS_RESET, NEEDS_RESET);
    {
        let device = guest.device.lock().unwrap();
        assert_eq!(device.state(), FsState::Failed);
        assert_eq!(device.metrics()["activation_failures"], 1);
        assert_eq!(device.metrics()["backend_failures"], 1);
    }
    // Our side shut the socket down: the back-end's session ends, and the
    // event loop sees the hang-up and lets go of the fd, counting nothing
    // twice.
    let thread = served.thread.take().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !thread.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "back-end still connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(manager.run_with_timeout(1000).unwrap(), 1);
    let device = guest.device.lock().unwrap();
    assert!(device.watch.is_none());
    assert_eq!(device.metrics()["backend_failures"], 1);
}
