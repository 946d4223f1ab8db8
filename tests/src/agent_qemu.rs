//! The real agent as PID 1 of a guest under QEMU+TCG, reached over hybrid
//! vsock (`vhost-device-vsock`), with a busybox rootfs shared by virtio-fs
//! (`virtiofsd`) and another one inside the initramfs. This is where cgroup
//! v2 limits are tested: the host has cgroup v1, the guest kernel v2.
//!
//! Needs qemu-system-x86 (apt), and `vhost-device-vsock` and `virtiofsd`
//! (`cargo install`), found on PATH or in ~/.cargo/bin.

use crate::agent::{AgentClient, CONNECTION_WINDOW, STREAM_WINDOW};
use crate::harness::TempDir;
use hyper_util::rt::TokioIo;
use microvm_guest_image::initramfs::{self, Entry, EntryKind};
use microvm_guest_image::{kernel, qemu_cmdline};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Endpoint, Uri};

/// Where the initramfs rootfs is inside the guest.
pub const GUEST_ROOTFS: &str = "/rootfs";
/// The virtio-fs tag of the shared rootfs.
pub const VIRTIOFS_TAG: &str = "rootfs";
const GUEST_CID: u32 = 3;

/// A helper binary on PATH, or in ~/.cargo/bin (where `cargo install` puts it).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// Why the guest tests cannot run here, if they cannot.
pub fn missing_tools() -> Option<String> {
    let missing: Vec<&str> = ["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"]
        .into_iter()
        .filter(|tool| find_tool(tool).is_none())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "missing {}: apt-get install qemu-system-x86; cargo install vhost-device-vsock virtiofsd",
            missing.join(", ")
        )
    })
}

/// The busybox rootfs as initramfs entries under `prefix`.
fn rootfs_entries(prefix: &str) -> Result<Vec<Entry>, String> {
    let busybox =
        std::fs::read(crate::rootfs::BUSYBOX).map_err(|err| format!("read busybox: {err}"))?;
    let mut entries = vec![Entry::dir(prefix, 0o755)];
    for dir in ["bin", "dev", "etc", "proc", "root", "run", "sys", "tmp"] {
        entries.push(Entry::dir(
            &format!("{prefix}/{dir}"),
            if dir == "tmp" { 0o1777 } else { 0o755 },
        ));
    }
    entries.push(Entry::file(
        &format!("{prefix}/bin/busybox"),
        0o755,
        busybox,
    ));
    for applet in crate::rootfs::applets().map_err(|err| err.to_string())? {
        if applet == "busybox" {
            continue;
        }
        entries.push(Entry {
            path: format!("{prefix}/bin/{applet}"),
            permissions: 0o777,
            kind: EntryKind::Symlink("busybox".into()),
        });
    }
    entries.push(Entry::file(
        &format!("{prefix}/etc/passwd"),
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    ));
    Ok(entries)
}

/// Kills and reaps a helper process on drop.
pub struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child dies with the thread that started it, even when the test
/// process is killed before its guards run.
fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
    }
}

/// Spawns `command` with its stderr in `log`; it dies with its parent.
pub fn spawn_helper(command: &mut Command, log: &Path) -> Result<Helper, String> {
    let log_file = std::fs::File::create(log).map_err(|err| err.to_string())?;
    let child = die_with_parent(command)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|err| format!("spawn {command:?}: {err}"))?;
    Ok(Helper(child))
}

/// Writes the guest's initramfs to `path`: the static agent as `/init`,
/// and `extra`.
pub fn write_agent_initrd(path: &Path, extra: Vec<Entry>) -> Result<(), String> {
    let agent_path = initramfs::build_agent().map_err(|err| format!("static agent: {err}"))?;
    let agent = std::fs::read(&agent_path).map_err(|err| format!("read the agent: {err}"))?;
    let mut entries = initramfs::entries(agent, None);
    entries.extend(extra);
    let archive = initramfs::write_newc(&entries, Vec::new()).map_err(|err| err.to_string())?;
    std::fs::write(path, archive).map_err(|err| err.to_string())
}

/// QEMU (microvm machine, TCG, `memory_mib` of shareable RAM) booting
/// `kernel` and `initrd`, its serial console in `console` and its vsock
/// on the vhost-user socket `vhost_socket`.
pub fn qemu_command(
    qemu: &Path,
    memory_mib: u32,
    kernel: &Path,
    initrd: &Path,
    console: &Path,
    vhost_socket: &Path,
) -> Command {
    let memory_backend = format!("memory-backend-memfd,id=mem,size={memory_mib}M,share=on");
    let memory = memory_mib.to_string();
    let mut command = Command::new(qemu);
    command
        .args([
            "-M",
            "microvm,acpi=off,x-option-roms=off,isa-serial=on,rtc=off,memory-backend=mem",
            "-object",
            memory_backend.as_str(),
            "-m",
            memory.as_str(),
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "{} microvm_agent_log=microvm_agent=debug",
            qemu_cmdline()
        ))
        .arg("-chardev")
        .arg(format!("socket,id=vsock0,path={}", vhost_socket.display()))
        .args(["-device", "vhost-user-vsock-device,chardev=vsock0"]);
    command
}

fn wait_for(path: &Path, timeout: Duration) -> bool {
    crate::harness::wait_for_path(path, timeout)
}

/// A booted guest running the agent.
pub struct GuestAgent {
    qemu: Option<Child>,
    _vsock: Helper,
    _virtiofsd: Helper,
    pub vsock_uds: PathBuf,
    pub console: PathBuf,
    pub shared_rootfs: PathBuf,
    pub dir: TempDir,
}

impl GuestAgent {
    pub fn boot(tag: &str) -> Result<Self, String> {
        let kernel = kernel::kernel().map_err(|err| format!("guest kernel: {err}"))?;
        let rootfs = rootfs_entries(GUEST_ROOTFS.trim_start_matches('/'))?;
        let dir = TempDir::new(tag);
        let initrd = dir.join("initrd.cpio");
        write_agent_initrd(&initrd, rootfs)?;

        let shared_rootfs = dir.join("shared-rootfs");
        crate::rootfs::build_busybox_rootfs(&shared_rootfs).map_err(|err| err.to_string())?;
        std::fs::write(shared_rootfs.join("etc/shared-marker"), "virtio-fs\n")
            .map_err(|err| err.to_string())?;

        let vhost_socket = dir.join("vhu.sock");
        let vsock_uds = dir.join("vm.vsock");
        let fs_socket = dir.join("fs.sock");
        let vsock = spawn_helper(
            Command::new(find_tool("vhost-device-vsock").ok_or("vhost-device-vsock not found")?)
                .arg("--guest-cid")
                .arg(GUEST_CID.to_string())
                .arg("--socket")
                .arg(&vhost_socket)
                .arg("--uds-path")
                .arg(&vsock_uds),
            &dir.join("vhost-device-vsock.log"),
        )?;
        let virtiofsd = spawn_helper(
            Command::new(find_tool("virtiofsd").ok_or("virtiofsd not found")?)
                .arg("--socket-path")
                .arg(&fs_socket)
                .arg("--shared-dir")
                .arg(&shared_rootfs)
                .args(["--sandbox", "none", "--cache", "never"]),
            &dir.join("virtiofsd.log"),
        )?;
        for socket in [&vhost_socket, &fs_socket] {
            if !wait_for(socket, Duration::from_secs(10)) {
                return Err(format!("{} did not appear", socket.display()));
            }
        }
        let console = dir.join("console.log");
        let mut qemu = qemu_command(
            &find_tool("qemu-system-x86_64").ok_or("qemu not found")?,
            512,
            &kernel.vmlinux,
            &initrd,
            &console,
            &vhost_socket,
        );
        let qemu = die_with_parent(&mut qemu)
            .arg("-chardev")
            .arg(format!("socket,id=fs0,path={}", fs_socket.display()))
            .arg("-device")
            .arg(format!(
                "vhost-user-fs-device,chardev=fs0,tag={VIRTIOFS_TAG}"
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).map_err(|err| err.to_string())?)
            .spawn()
            .map_err(|err| format!("spawn QEMU: {err}"))?;
        Ok(Self {
            qemu: Some(qemu),
            _vsock: vsock,
            _virtiofsd: virtiofsd,
            vsock_uds,
            console,
            shared_rootfs,
            dir,
        })
    }

    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Console, QEMU and helper logs, for failure messages.
    pub fn diagnostics(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!(
            "--- console ---\n{}\n--- qemu ---\n{}\n--- vhost-device-vsock ---\n{}\n--- virtiofsd ---\n{}",
            self.console_text(),
            read("qemu.log"),
            read("vhost-device-vsock.log"),
            read("virtiofsd.log")
        )
    }

    /// Connects once the agent listens (retrying until `timeout`).
    pub async fn client(&self, timeout: Duration) -> Result<AgentClient, String> {
        connect_agent(&self.vsock_uds, timeout)
            .await
            .map_err(|err| format!("{err}\n{}", self.diagnostics()))
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let qemu = self.qemu.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = qemu.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for GuestAgent {
    fn drop(&mut self) {
        if let Some(mut qemu) = self.qemu.take() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
    }
}

/// One connection attempt (connect plus health check) to a guest agent.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the agent behind the hybrid-vsock socket `uds`, once the
/// agent answers Check (retrying until `timeout`).
pub async fn connect_agent(uds: &Path, timeout: Duration) -> Result<AgentClient, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let uds = uds.to_path_buf();
        let endpoint = Endpoint::from_static("http://guest.invalid")
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
            let uds = uds.clone();
            async move {
                // The product's own handshake, not a copy of it.
                microvm_shim::agent::connect_hybrid_vsock(
                    &uds,
                    microvm_proto::abi::vsock::AGENT_PORT,
                )
                .await
                .map(TokioIo::new)
                .map_err(std::io::Error::other)
            }
        }));
        // Each attempt is bounded: a CONNECT that reaches vhost-device-vsock
        // while the guest still boots can hang for good.
        let attempt = match tokio::time::timeout(ATTEMPT_TIMEOUT, connect).await {
            Ok(attempt) => attempt.map_err(|err| err.to_string()),
            Err(_) => Err(format!("no connection within {ATTEMPT_TIMEOUT:?}")),
        };
        match attempt {
            Ok(channel) => {
                let mut client = AgentClient::with_channel(channel);
                let check = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    client.health.check(microvm_proto::agent::v1::CheckRequest {
                        client_version: Some(microvm_proto::agent::v1::ApiVersion::current()),
                    }),
                )
                .await;
                if matches!(check, Ok(Ok(_))) {
                    return Ok(client);
                }
            }
            Err(_) if Instant::now() < deadline => {}
            Err(err) => {
                return Err(format!(
                    "no agent on vsock port {} within {timeout:?}: {err}",
                    microvm_proto::abi::vsock::AGENT_PORT
                ))
            }
        }
        if Instant::now() >= deadline {
            return Err("the agent did not answer Check".to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
