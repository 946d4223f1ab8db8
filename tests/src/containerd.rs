//! A private containerd (Debian's 1.6) for end-to-end tests: its own root,
//! state and sockets under a temp dir, the CRI plugin off, and a PATH that
//! finds our shim first. Dropping it removes every task and container it
//! knows, stops it, unmounts what is left under its dir and removes it.

use crate::harness::{run_with_timeout, Finished, TempDir};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CONTAINERD: &str = "containerd";
pub const CTR: &str = "ctr";
pub const NAMESPACE: &str = "microvm-test";
/// How long containerd may take to answer at start: 30 s, or 120 s in the
/// KVM harness's L1, where it is emulated (and slower still on a busy host).
fn start_timeout() -> Duration {
    if crate::kvm::in_nested_kvm() {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(30)
    }
}
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Finds `name` in PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

pub struct Containerd {
    pub dir: TempDir,
    pub socket: PathBuf,
    /// The containerd namespace `ctr` works in (CRI uses `k8s.io`).
    pub namespace: &'static str,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd with `bin_dir` first in its PATH (where the shim
    /// binary is linked), and `env` added to its environment (shims
    /// inherit it).
    pub fn start(tag: &str, bin_dir: &Path, env: &[(&str, &str)]) -> Result<Self, String> {
        Self::start_with(TempDir::new(tag), bin_dir, env, None, None)
    }

    /// Starts containerd in `dir`. `cri` enables the CRI plugin with that
    /// config section (its text is appended to the config, `{dir}` replaced
    /// by `dir`); `netns` runs containerd (and so its CNI plugins and
    /// shims) in that network namespace.
    pub fn start_with(
        dir: TempDir,
        bin_dir: &Path,
        env: &[(&str, &str)],
        cri: Option<&str>,
        netns: Option<&Path>,
    ) -> Result<Self, String> {
        let socket = dir.join("c.sock");
        let config = dir.join("containerd.toml");
        let disabled_cri = if cri.is_some() {
            ""
        } else {
            "\"io.containerd.grpc.v1.cri\", "
        };
        let mut text = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled_cri}"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
        );
        if let Some(cri) = cri {
            text.push('\n');
            text.push_str(&cri.replace("{dir}", &dir.path().display().to_string()));
        }
        std::fs::write(&config, text)
            .map_err(|err| format!("writing {}: {err}", config.display()))?;
        let log = std::fs::File::create(dir.join("containerd.log"))
            .map_err(|err| format!("containerd log: {err}"))?;
        let log_err = log
            .try_clone()
            .map_err(|err| format!("containerd log: {err}"))?;
        let path = match std::env::var_os("PATH") {
            Some(path) => {
                let mut joined = bin_dir.as_os_str().to_owned();
                joined.push(":");
                joined.push(path);
                joined
            }
            None => bin_dir.as_os_str().to_owned(),
        };
        let mut command = Command::new(CONTAINERD);
        command
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            // Its own process group: a terminal's Ctrl-C reaches only the
            // test or bench, whose cleanup then stops containerd in order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(netns) = netns {
            let netns_file = std::fs::File::open(netns)
                .map_err(|err| format!("opening netns {}: {err}", netns.display()))?;
            use std::os::fd::AsRawFd;
            let fd = netns_file.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; `fd` stays open in the
            // parent (netns_file lives until spawn returns) and is inherited.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
            let spawned = command.spawn();
            drop(netns_file);
            return Self::wait_started(dir, socket, spawned);
        }
        let spawned = command.spawn();
        Self::wait_started(dir, socket, spawned)
    }

    fn wait_started(
        dir: TempDir,
        socket: PathBuf,
        spawned: std::io::Result<Child>,
    ) -> Result<Self, String> {
        let child = spawned.map_err(|err| {
            format!("cannot start {CONTAINERD} (apt-get install containerd): {err}")
        })?;
        let mut containerd = Self {
            dir,
            socket,
            namespace: NAMESPACE,
            child: Some(child),
        };
        let deadline = Instant::now() + start_timeout();
        loop {
            if containerd.socket.exists() {
                let version = containerd.ctr(&["version"], Duration::from_secs(10));
                if matches!(&version, Ok(done) if done.status.success()) {
                    return Ok(containerd);
                }
            }
            if let Some(child) = containerd.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "containerd exited ({status}) at start:\n{}",
                        containerd.log()
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "containerd did not answer within {:?}:\n{}",
                    start_timeout(),
                    containerd.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `ctr` command for this containerd and the test namespace.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(CTR);
        command
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(self.namespace)
            .args(args);
        command
    }

    pub fn ctr(&self, args: &[&str], timeout: Duration) -> Result<Finished, String> {
        run_with_timeout(&mut self.ctr_command(args), timeout)
    }

    /// Runs ctr and fails with its output unless it exits 0.
    pub fn ctr_ok(&self, args: &[&str], timeout: Duration) -> Result<Finished, String> {
        let done = self.ctr(args, timeout)?;
        if done.status.success() {
            Ok(done)
        } else {
            Err(format!(
                "ctr {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
                done.status, done.stdout, done.stderr
            ))
        }
    }

    pub fn import(&self, archive: &Path) -> Result<(), String> {
        let path = archive.to_string_lossy().into_owned();
        self.ctr_ok(&["images", "import", &path], Duration::from_secs(60))
            .map(|_| ())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Ids listed by `ctr <what> ls -q`.
    pub fn list(&self, what: &str) -> Vec<String> {
        self.ctr(&[what, "ls", "-q"], Duration::from_secs(10))
            .map(|done| {
                done.stdout
                    .lines()
                    .map(str::trim)
                    .filter(|line| !line.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills and deletes every task, deletes every container.
    pub fn remove_all(&self) {
        let deadline = Instant::now() + CLEANUP_TIMEOUT;
        for task in self.list("tasks") {
            let _ = self.ctr(
                &["tasks", "kill", "-a", "-s", "SIGKILL", &task],
                Duration::from_secs(10),
            );
            while Instant::now() < deadline {
                let deleted = self.ctr(&["tasks", "delete", "-f", &task], Duration::from_secs(30));
                if matches!(&deleted, Ok(done) if done.status.success())
                    || !self.list("tasks").contains(&task)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for container in self.list("containers") {
            let _ = self.ctr(
                &["containers", "delete", &container],
                Duration::from_secs(30),
            );
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.remove_all();
        if let Some(mut child) = self.child.take() {
            if let Ok(raw) = i32::try_from(child.id()) {
                // SIGTERM first: containerd unmounts and closes cleanly.
                let _ = nix_kill(raw, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // A shim that outlived containerd (a test that failed half way):
        // its VM processes die with it (parent-death signal).
        let socket = self.socket.to_string_lossy().into_owned();
        for (pid, cmdline) in pids_matching(&socket) {
            if cmdline.contains("containerd-shim") {
                if let Ok(raw) = i32::try_from(pid) {
                    let _ = nix_kill(raw, libc::SIGKILL);
                }
            }
        }
        for point in mounts_under(self.dir.path()) {
            let _ = Command::new("umount").arg("-l").arg(&point).status();
        }
    }
}

fn nix_kill(pid: i32, signal: i32) -> std::io::Result<()> {
    // SAFETY: kill(2) with plain integers; `pid` is our own child.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Mount points at or below `dir` (deepest first).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|field| PathBuf::from(field.replace("\\040", " ")))
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.as_os_str().len()));
    points
}

/// Pids of processes whose command line contains `needle`.
pub fn pids_matching(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The backends the shim tests run pods on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    /// `builtin` (microvm-vmm, jailed as 65534): the default config. Needs
    /// real KVM.
    Builtin,
    /// `qemu` with `accel = "kvm"`. Needs real KVM.
    QemuKvm,
    /// `qemu` under TCG: runs on any host.
    QemuTcg,
}

impl TestBackend {
    /// A short name for test names (`builtin`, `qemu_kvm`, `qemu_tcg`).
    pub fn name(self) -> &'static str {
        match self {
            TestBackend::Builtin => "builtin",
            TestBackend::QemuKvm => "qemu_kvm",
            TestBackend::QemuTcg => "qemu_tcg",
        }
    }

    pub fn needs_real_kvm(self) -> bool {
        self != TestBackend::QemuTcg
    }

    /// The name of the process that is the VM on the host.
    pub fn vmm_process(self) -> &'static str {
        match self {
            TestBackend::Builtin => "microvm-vmm",
            TestBackend::QemuKvm | TestBackend::QemuTcg => "qemu-system-x86_64",
        }
    }

    /// The config's backend table: only what differs from the defaults.
    fn config_tail(self) -> &'static str {
        match self {
            // The shipped defaults: jail on, uid/gid 65534.
            TestBackend::Builtin => "backend = \"builtin\"\n",
            TestBackend::QemuKvm => "backend = \"qemu\"\n[qemu]\naccel = \"kvm\"\n",
            TestBackend::QemuTcg => "backend = \"qemu\"\n[qemu]\naccel = \"tcg\"\n",
        }
    }
}

/// Writes a shim config for `backend` with state and logs under `work`,
/// the test guest image and boot timeouts for an emulated machine; every
/// other key keeps its default. Its `[qemu]` table, if any, comes last.
/// The shim logs at debug level (see [`write_shim_config_at`]).
pub fn write_shim_config(
    work: &Path,
    kernel: &Path,
    initramfs: &Path,
    backend: TestBackend,
) -> Result<PathBuf, String> {
    write_shim_config_at(work, kernel, initramfs, backend, "debug")
}

/// [`write_shim_config`] with the shim's `log_level` (a benchmark logs at
/// `info`: debug logging would be part of what it measures).
pub fn write_shim_config_at(
    work: &Path,
    kernel: &Path,
    initramfs: &Path,
    backend: TestBackend,
    log_level: &str,
) -> Result<PathBuf, String> {
    let config = work.join("microvm.toml");
    let (head, tail) = match backend.config_tail().split_once('[') {
        Some((head, tail)) => (head.to_owned(), format!("[{tail}")),
        None => (backend.config_tail().to_owned(), String::new()),
    };
    let text = format!(
        r#"{head}log_level = "{log_level}"
[vm]
kernel = "{kernel}"
initramfs = "{initramfs}"
memory_mib = 256
kernel_args = "microvm_agent_log=info"
[timeouts]
boot_seconds = 180
agent_seconds = 60
[paths]
state_dir = "{state}"
log_dir = "{logs}"
{tail}"#,
        kernel = kernel.display(),
        initramfs = initramfs.display(),
        state = work.join("state").display(),
        logs = work.join("logs").display(),
    );
    std::fs::write(&config, text).map_err(|err| format!("writing {}: {err}", config.display()))?;
    Ok(config)
}

/// [`write_shim_config`] for `qemu` under TCG.
pub fn write_qemu_shim_config(
    work: &Path,
    kernel: &Path,
    initramfs: &Path,
) -> Result<PathBuf, String> {
    write_shim_config(work, kernel, initramfs, TestBackend::QemuTcg)
}

/// Overrides the test guest kernel (a vmlinux path).
pub const TEST_KERNEL_ENV: &str = "MICROVM_TEST_KERNEL";
/// Overrides the test initramfs.
pub const TEST_INITRAMFS_ENV: &str = "MICROVM_TEST_INITRAMFS";

/// The guest kernel's vmlinux and the release initramfs the shim tests
/// boot. [`TEST_KERNEL_ENV`] and [`TEST_INITRAMFS_ENV`] override them: a
/// nested KVM run gets the host's answer this way instead of checking the
/// image's inputs again under emulation, and another agent build can be
/// tried without touching the cache. Panics with the cause:
/// scripts/install-deps.sh provides it all.
pub fn test_guest_image() -> (PathBuf, PathBuf) {
    use microvm_guest_image::initramfs::{self, Variant};
    let kernel = match std::env::var_os(TEST_KERNEL_ENV) {
        Some(path) => PathBuf::from(path),
        None => {
            microvm_guest_image::kernel::kernel()
                .unwrap_or_else(|err| {
                    panic!("guest kernel: {}", microvm_shim::pod::error_chain(&err))
                })
                .vmlinux
        }
    };
    let initramfs = match std::env::var_os(TEST_INITRAMFS_ENV) {
        Some(path) => PathBuf::from(path),
        None => {
            initramfs::initramfs(Variant::Release)
                .unwrap_or_else(|err| panic!("initramfs: {}", microvm_shim::pod::error_chain(&err)))
                .path
        }
    };
    (kernel, initramfs)
}

/// Overrides the static agent binary that tests bind into containers.
pub const TEST_AGENT_ENV: &str = "MICROVM_TEST_AGENT";

/// The static agent binary (a vsock probe among other things), built if
/// needed; [`TEST_AGENT_ENV`] overrides it, as the nested KVM run does.
pub fn test_agent_binary() -> PathBuf {
    match std::env::var_os(TEST_AGENT_ENV) {
        Some(path) => PathBuf::from(path),
        None => microvm_guest_image::initramfs::build_agent()
            .unwrap_or_else(|err| panic!("static agent: {}", microvm_shim::pod::error_chain(&err))),
    }
}

/// A private containerd whose `io.containerd.microvm.v2` shim is this
/// workspace's, a `qemu`-backend shim config in `work`, and the busybox test
/// image imported as `image`.
pub struct ShimSetup {
    pub containerd: Containerd,
    /// State and log dirs of the shim, and the config file.
    pub work: TempDir,
    pub config: PathBuf,
    /// Holds the shim's link; the shim is found through it while it lives.
    pub bin: TempDir,
}

impl ShimSetup {
    /// A `qemu`/TCG pod setup; `extra_qemu_keys` are appended to the
    /// config's `[qemu]` table (or are whole tables of their own).
    pub fn start(tag: &str, image: &str, extra_qemu_keys: &str) -> Self {
        Self::start_on(TestBackend::QemuTcg, tag, image, extra_qemu_keys)
    }

    /// Panics when the host lacks a piece: scripts/install-deps.sh installs
    /// them all, so a missing one is a setup failure, not a skip. The VMM
    /// (`microvm-vmm`) is found on containerd's PATH, as with the default
    /// config on a node.
    pub fn start_on(backend: TestBackend, tag: &str, image: &str, extra_qemu_keys: &str) -> Self {
        const SHIM: &str = "containerd-shim-microvm-v2";
        if let Some(reason) = missing_shim_prerequisite() {
            panic!("shim tests cannot run: {reason} (run scripts/install-deps.sh)");
        }
        let (kernel, initramfs) = test_guest_image();
        let bin = TempDir::new(&format!("{tag}-bin"));
        for binary in [SHIM, "microvm-vmm"] {
            std::os::unix::fs::symlink(crate::harness::binary(binary), bin.join(binary))
                .expect("link the shim and the VMM");
        }
        let work = TempDir::new(&format!("{tag}-work"));
        let config = write_shim_config(work.path(), &kernel, &initramfs, backend)
            .expect("write the shim config");
        if !extra_qemu_keys.is_empty() {
            let mut text = std::fs::read_to_string(&config).expect("read the shim config");
            // Bare keys go into [qemu], which write_qemu_shim_config writes
            // last; whole tables go anywhere.
            if !extra_qemu_keys.trim_start().starts_with('[') {
                let last_table = text.lines().rfind(|line| line.starts_with('['));
                assert_eq!(last_table, Some("[qemu]"), "{text}");
            }
            text.push_str(extra_qemu_keys);
            std::fs::write(&config, text).expect("write the shim config");
        }
        let containerd = Containerd::start(tag, bin.path(), &[])
            .unwrap_or_else(|err| panic!("containerd: {err}"));
        let archive =
            crate::oci_image::write_busybox_image(work.path(), image).expect("busybox image");
        containerd.import(&archive).expect("import the image");
        Self {
            containerd,
            work,
            config,
            bin,
        }
    }
}

/// What the shim's end-to-end tests need and the host lacks, if anything.
pub fn missing_shim_prerequisite() -> Option<String> {
    for tool in [
        CONTAINERD,
        CTR,
        "qemu-system-x86_64",
        "virtiofsd",
        "vhost-device-vsock",
    ] {
        if which(tool).is_none() {
            return Some(format!("{tool} is not in PATH"));
        }
    }
    if !Path::new(crate::oci_image::BUSYBOX).is_file() {
        return Some("busybox-static is not installed".into());
    }
    None
}

/// Whether `pid` is a zombie or gone (its /proc/<pid>/stat state).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rfind(')')
                .and_then(|at| stat[at + 1..].split_whitespace().next())
                .is_none_or(|state| state == "Z")
        })
        .unwrap_or(true)
}
