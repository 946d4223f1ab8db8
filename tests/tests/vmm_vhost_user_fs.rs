//! virtio-fs end to end without a guest kernel: the real virtiofsd serves a
//! temp dir; the test plays the guest driver against the VMM's virtio-fs
//! device and its virtio-mmio transport over memfd guest memory (what the
//! VMM gives the back-end), sends FUSE requests on the request queue through
//! the notify register, and reads virtiofsd's replies from the used ring
//! after waiting on the irqfd the back-end writes. No KVM is involved.
//!
//! Needs virtiofsd in PATH (scripts/install-deps.sh installs it).

use microvm_devices::interrupt::EventFdTrigger;
use microvm_devices::virtio::fs::{
    FsState, MmioAddress, MutDeviceMmio, VhostUserFs, VhostUserMmio,
};
use microvm_devices::virtio::guest_ring::status::{
    ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET,
};
use microvm_devices::virtio::guest_ring::{bring_up, DriverRegisters, GuestRing};
use microvm_devices::virtio::mmio::{reg, MmioTransport};
use microvm_devices::virtio::{VirtioDevice, VirtioInterrupt};
use microvm_tests::agent_qemu::find_tool;
use microvm_tests::harness::{binary, run_with_timeout, ChildGuard, TempDir};
use microvm_vmm::config::FsConfig;
use microvm_vmm::memory::create_guest_memory;
use microvm_vmm::seccomp::{SeccompFilters, ThreadKind};
use microvm_vmm::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const QUEUE_SIZE: u16 = 16;

const FUSE_LOOKUP: u32 = 1;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;
const IN_HEADER_LEN: u32 = 40;
const OUT_HEADER_LEN: u32 = 16;

struct Driver {
    mem: GuestMemoryMmap,
    mmio: VhostUserMmio,
    device: Arc<Mutex<VhostUserFs>>,
    irq_fd: i32,
    request_queue: GuestRing,
}

impl DriverRegisters for Driver {
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

impl Driver {
    fn read(&mut self, offset: u64) -> u32 {
        self.read_reg(offset)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.write_reg(offset, value)
    }

    /// Features, both queues (hiprio and one request queue), DRIVER_OK.
    fn bring_up(&mut self, features: u64) -> u32 {
        // Fresh rings, as a driver allocates them after a reset.
        self.mem
            .write_slice(&[0u8; 0x2000], GuestAddress(0x10_0000))
            .unwrap();
        let mut rings: Vec<GuestRing> = (0..2u64)
            .map(|queue| GuestRing::at(0x10_0000 + queue * 0x1000, QUEUE_SIZE))
            .collect();
        let status = bring_up(self, features, &rings);
        if let Some(request_queue) = rings.pop() {
            self.request_queue = request_queue;
        }
        status
    }

    /// Sends one FUSE request on the request queue and returns the reply.
    fn roundtrip(&mut self, request: &[u8]) -> Vec<u8> {
        let (request_at, reply_at) = (0x20_0000u64, 0x30_0000u64);
        self.mem
            .write_slice(request, GuestAddress(request_at))
            .unwrap();
        self.mem
            .write_slice(&[0u8; 4096], GuestAddress(reply_at))
            .unwrap();
        let before = self.request_queue.used_idx(&self.mem);
        // As Linux does: an interrupt for this very completion.
        self.request_queue.request_interrupt_on_next(&self.mem);
        self.request_queue.add(
            &self.mem,
            &[
                (request_at, request.len() as u32, false),
                (reply_at, 4096, true),
            ],
        );
        // Through the notify register: the transport writes the queue's
        // eventfd, which the back-end got as its kick fd (with KVM, the
        // ioeventfd fires without a VM exit to the VMM).
        self.write(reg::QUEUE_NOTIFY, 1);
        assert!(
            wait_readable(self.irq_fd, Duration::from_secs(10)),
            "virtiofsd did not signal the call eventfd (irqfd)"
        );
        // Clear the eventfd, as KVM does when it injects the interrupt.
        let _ = self.device.lock().unwrap().interrupt_eventfd().read();
        assert_eq!(
            self.request_queue.used_idx(&self.mem),
            before.wrapping_add(1)
        );
        let (_, written) = self.request_queue.used(&self.mem, before);
        let mut reply = vec![0u8; written as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(reply_at))
            .unwrap();
        reply
    }
}

/// Runs `work` on a fresh thread that first installs the VMM's vCPU filter.
fn on_vcpu_thread<T: Send>(filters: &SeccompFilters, work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                filters.apply(ThreadKind::Vcpu).unwrap();
                work()
            })
            .join()
            .unwrap()
    })
}

fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
    ready == 1
}

fn in_header(len: u32, opcode: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut header = Vec::with_capacity(IN_HEADER_LEN as usize);
    header.extend(len.to_le_bytes());
    header.extend(opcode.to_le_bytes());
    header.extend(unique.to_le_bytes());
    header.extend(nodeid.to_le_bytes());
    header.extend(0u32.to_le_bytes()); // uid
    header.extend(0u32.to_le_bytes()); // gid
    header.extend(std::process::id().to_le_bytes());
    header.extend(0u32.to_le_bytes()); // total_extlen, padding
    header
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

struct Virtiofsd {
    _child: ChildGuard,
    pid: u32,
}

fn spawn_virtiofsd(socket: &Path, shared: &Path, log: &Path) -> Virtiofsd {
    let binary = find_tool("virtiofsd")
        .expect("virtiofsd not found in PATH (cargo install virtiofsd; scripts/install-deps.sh)");
    let child = Command::new(binary)
        .arg("--socket-path")
        .arg(socket)
        .arg("--shared-dir")
        .arg(shared)
        .args(["--sandbox", "none", "--cache", "auto"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Virtiofsd {
        pid: child.id(),
        _child: ChildGuard(Some(child)),
    }
}

/// The VMM's device connected to the back-end. Connecting before virtiofsd
/// listens is refused (not consumed), so retrying is safe with a
/// one-connection back-end.
fn connect(config: &FsConfig, log: &Path) -> VhostUserFs {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match VhostUserFs::connect(&config.device_config()) {
            Ok(device) => return device,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!(
                "cannot connect to virtiofsd: {}\nvirtiofsd log:\n{}",
                microvm_vmm::vmm::error_chain(&e),
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

fn driver(device: VhostUserFs, memory_mib: u64) -> Driver {
    let ram = create_guest_memory(memory_mib << 20).unwrap();
    let irq = device.interrupt_eventfd().try_clone().unwrap();
    let irq_fd = irq.as_raw_fd();
    let device = Arc::new(Mutex::new(device));
    let interrupt = Arc::new(VirtioInterrupt::new(Arc::new(EventFdTrigger::new(irq))));
    let transport = MmioTransport::new(ram.memory.clone(), device.clone(), interrupt).unwrap();
    Driver {
        // The memfd stays open through the regions' own file handles.
        mem: ram.memory.clone(),
        mmio: VhostUserMmio::new(transport),
        device,
        irq_fd,
        request_queue: GuestRing::at(0, QUEUE_SIZE),
    }
}

#[test]
fn virtiofsd_answers_fuse_init_and_lookup_through_the_device() {
    let dir = TempDir::new("vhost-user-fs");
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let content = b"shared with the guest\n";
    std::fs::write(shared.join("hello.txt"), content).unwrap();
    let socket = dir.join("virtiofsd.sock");
    let log = dir.join("virtiofsd.log");
    let virtiofsd = spawn_virtiofsd(&socket, &shared, &log);
    let config = FsConfig::new(socket.clone(), "microvm-shared".into());
    let device = connect(&config, &log);
    let mut guest = driver(device, 64);

    // Identity and config space, as the guest's virtio-fs driver reads them.
    assert_eq!(guest.read(reg::DEVICE_ID), 26, "device id is virtio-fs");
    let mut tag = [0u8; 36];
    guest.mmio.mmio_read(MmioAddress(0), reg::CONFIG, &mut tag);
    assert_eq!(&tag[..14], b"microvm-shared");
    assert_eq!(guest.read(reg::CONFIG + 36), 1, "one request queue");
    guest.write(reg::DEVICE_FEATURES_SEL, 1);
    assert_ne!(guest.read(reg::DEVICE_FEATURES) & 1, 0, "VERSION_1 offered");

    // Activation runs on the vCPU thread that writes DRIVER_OK, under the
    // vCPU seccomp filter: a vhost-user request it forbade would kill this
    // whole test process with SIGSYS.
    let filters = SeccompFilters::build(microvm_vmm::vcpu::kick_signal()).unwrap();
    let status = on_vcpu_thread(&filters, || guest.bring_up(VERSION_1 | EVENT_IDX));
    assert_eq!(
        status,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
        "activation failed; virtiofsd log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_eq!(guest.device.lock().unwrap().state(), FsState::Active(2));

    // FUSE_INIT: in header + fuse_init_in (7.31, no flags).
    let unique = 0x1234_5678_9abc_def0u64;
    let mut init = in_header(IN_HEADER_LEN + 16, FUSE_INIT, unique, 0);
    for word in [7u32, 31, 0x2_0000, 0] {
        init.extend(word.to_le_bytes());
    }
    let reply = guest.roundtrip(&init);
    assert!(reply.len() >= OUT_HEADER_LEN as usize + 8, "{reply:?}");
    assert_eq!(u32_at(&reply, 0) as usize, reply.len(), "out header len");
    assert_eq!(u32_at(&reply, 4), 0, "FUSE_INIT error");
    assert_eq!(u64_at(&reply, 8), unique, "unique echoed");
    assert_eq!(u32_at(&reply, 16), 7, "FUSE major version");
    assert!(u32_at(&reply, 20) >= 27, "FUSE minor version");
    // The guest's ISR read shows the used-ring bit, though the back-end
    // raised the interrupt behind the transport's back.
    assert_eq!(guest.read(reg::INTERRUPT_STATUS) & 1, 1);

    // FUSE_LOOKUP of a file in the shared dir: its size comes back.
    let name = b"hello.txt\0";
    let mut lookup = in_header(
        IN_HEADER_LEN + name.len() as u32,
        FUSE_LOOKUP,
        unique + 1,
        FUSE_ROOT_ID,
    );
    lookup.extend(name);
    let reply = guest.roundtrip(&lookup);
    assert_eq!(u32_at(&reply, 4), 0, "FUSE_LOOKUP error");
    assert_eq!(u64_at(&reply, 8), unique + 1);
    // fuse_entry_out: nodeid, generation, entry_valid, attr_valid, two
    // nsec words, then fuse_attr { ino, size, .. }.
    assert_ne!(u64_at(&reply, 16), 0, "nodeid");
    assert_eq!(u64_at(&reply, 16 + 40 + 8), content.len() as u64, "size");

    // A driver reset stops the rings; the device comes back up and serves
    // a fresh session.
    on_vcpu_thread(&filters, || guest.write(reg::STATUS, 0));
    assert_eq!(guest.read(reg::STATUS), 0);
    assert_eq!(guest.device.lock().unwrap().state(), FsState::Ready);
    assert_eq!(
        guest.bring_up(VERSION_1),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
    let reply = guest.roundtrip(&init);
    assert_eq!((u32_at(&reply, 4), u64_at(&reply, 8)), (0, unique));
    assert_eq!(guest.device.lock().unwrap().metrics()["activations"], 2);
    drop(virtiofsd);
}

#[test]
fn a_dead_virtiofsd_fails_the_device_without_taking_the_vmm_down() {
    let dir = TempDir::new("vhost-user-fs-dead");
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.join("virtiofsd.sock");
    let log = dir.join("virtiofsd.log");
    let virtiofsd = spawn_virtiofsd(&socket, &shared, &log);
    let device = connect(&FsConfig::new(socket, "t".into()), &log);
    let mut guest = driver(device, 32);
    assert_eq!(guest.bring_up(VERSION_1) & DRIVER_OK, DRIVER_OK);
    // SIGKILL: no goodbye on the socket.
    // SAFETY: plain kill of our own, not yet reaped, child by pid.
    let killed = unsafe { libc::kill(virtiofsd.pid as i32, libc::SIGKILL) };
    assert_eq!(killed, 0);
    drop(virtiofsd);
    // The driver resets: stopping the rings needs the back-end, so the
    // device is marked failed and the transport asks for a reset; this
    // process (the VMM) is still here, with no SIGPIPE.
    // On a thread with the vCPU filter: the failure path (shutting the
    // socket down) must not be a forbidden system call either.
    let filters = SeccompFilters::build(microvm_vmm::vcpu::kick_signal()).unwrap();
    on_vcpu_thread(&filters, || guest.write(reg::STATUS, 0));
    assert_eq!(guest.read(reg::STATUS) & NEEDS_RESET, NEEDS_RESET);
    let device = guest.device.lock().unwrap();
    assert_eq!(device.state(), FsState::Failed);
    assert_eq!(device.metrics()["backend_failures"], 1);
}

/// The binary: `--fs` with the VMM's seccomp filters on. The probe guest
/// boots (KVM), finds the virtio-fs device (id 26) in its slot and powers
/// off; the VMM connected to virtiofsd at start without dying.
#[test]
fn vmm_binary_offers_the_share_to_the_probe_guest() {
    let dir = TempDir::new("vhost-user-fs-vmm");
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.join("virtiofsd.sock");
    let log = dir.join("virtiofsd.log");
    let _virtiofsd = spawn_virtiofsd(&socket, &shared, &log);
    // Connecting before virtiofsd listens would fail the VMM's start; a
    // refused connect is not consumed, so probe for listen() here.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !unix_socket_listening(&socket) {
        assert!(Instant::now() < deadline, "virtiofsd did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let probe = microvm_tests::probe::probe_guest_elf().expect("building the probe guest");
    let console = dir.join("console.log");
    let fs_arg = format!("{},tag=microvm-shared", socket.display());
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--kernel", probe.to_str().unwrap()])
        .args(["--fs", &fs_arg, "--no-rng"])
        .args(["--serial-output", console.to_str().unwrap()]);
    let done = run_with_timeout(&mut cmd, Duration::from_secs(60)).unwrap();
    let serial = std::fs::read_to_string(&console).unwrap_or_default();
    assert_eq!(
        done.code(),
        Some(0),
        "serial:\n{serial}\nstderr:\n{}",
        done.stderr
    );
    assert!(
        serial.contains("virtio-mmio 0xd0000000 id=26"),
        "no virtio-fs device in the first slot; serial:\n{serial}"
    );
    assert!(
        done.stderr
            .contains("virtio-fs: connected to the vhost-user back-end"),
        "{}",
        done.stderr
    );
}

#[test]
fn vmm_binary_refuses_bad_fs_flags_with_exit_status_2() {
    let dir = TempDir::new("vhost-user-fs-flags");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let run = |fs: &str| {
        let mut cmd = Command::new(binary("microvm-vmm"));
        cmd.args(["--kernel", kernel.to_str().unwrap(), "--fs", fs]);
        run_with_timeout(&mut cmd, Duration::from_secs(20)).unwrap()
    };
    let done = run("/nonexistent/fs.sock,tag=microvm-shared");
    assert_eq!(done.code(), Some(2), "{}", done.stderr);
    assert!(
        done.stderr.contains("fs[0].socket /nonexistent/fs.sock")
            && done.stderr.contains("start virtiofsd first"),
        "{}",
        done.stderr
    );
    let done = run("/run/fs.sock");
    assert_eq!(done.code(), Some(2), "{}", done.stderr);
    assert!(
        done.stderr.contains("tag=TAG is required"),
        "{}",
        done.stderr
    );
}

/// Whether a unix socket bound at `path` is listening, from /proc/net/unix
/// (connecting to find out would use up virtiofsd's only connection).
fn unix_socket_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .unwrap_or(0);
        fields.get(7).map(Path::new) == Some(path) && flags & SO_ACCEPTCON != 0
    })
}

/// Under `--jail` the share's socket directory is mounted and the config
/// rewritten to the socket's place in the jail.
#[test]
fn jail_plan_maps_the_share_socket_into_the_jail() {
    let mut config = microvm_vmm::config::VmConfig::from_json(
        r#"{"boot": {"kernel": "/images/vmlinux"},
            "fs": [{"socket": "/run/pod/fs/virtiofsd.sock", "tag": "microvm-shared"}]}"#,
    )
    .unwrap();
    config.vsock = Some(microvm_vmm::config::VsockConfig::new(
        3,
        "/run/pod/vsock.sock".into(),
    ));
    let plan = microvm_vmm::jail::plan(&config, None).unwrap();
    let socket = &plan.config.fs[0].socket;
    let dir = socket.parent().unwrap();
    assert_eq!(socket.file_name().unwrap(), "virtiofsd.sock");
    assert!(dir.starts_with("/run/"), "{}", socket.display());
    let mount = plan
        .mounts
        .iter()
        .find(|m| m.jail == dir)
        .expect("the socket directory is mounted");
    assert_eq!(mount.host, Path::new("/run/pod/fs"));
    assert!(mount.dir && !mount.read_only);
    assert_eq!(plan.config.fs[0].tag, "microvm-shared");
}
