//! The jailed QEMU (`[qemu] jail`, on by default), seen from the host while
//! a real pod runs through containerd and the shim: QEMU is under a
//! seccomp filter, runs as the unprivileged jail ids with no capability,
//! its root is the pod's empty `qemu-root`, and the container still runs
//! and prints. With `jail = false` QEMU is root, unfiltered, at the host's
//! root. A jailed QEMU loses its parent-death signal when it drops its uid,
//! so after a SIGKILLed shim it is containerd's cleanup (`shim delete`) that
//! must kill it: checked too.
//!
//! Needs what shim_e2e needs (scripts/install-deps.sh); a missing piece
//! fails the test and says which.

use microvm_tests::containerd::{is_zombie, pids_matching, Containerd, ShimSetup};
use microvm_tests::harness::TempDir;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.microvm.v2";
const IMAGE: &str = "docker.io/library/busybox:microvm-test";
const SHIM: &str = "containerd-shim-microvm-v2";
/// VM boot under TCG on a shared 2-core machine, plus the command.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);
const NOBODY: &str = "65534";

/// One TCG VM at a time: two starve each other on 2 cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Pod {
    containerd: Containerd,
    work: TempDir,
    _bin: TempDir,
}

impl Pod {
    /// A private containerd running `sleep 600` in container `box` (its own
    /// pod VM) with the qemu backend; `extra_qemu_keys` go into `[qemu]`.
    fn start(tag: &str, extra_qemu_keys: &str) -> Self {
        let ShimSetup {
            containerd,
            work,
            config,
            bin,
        } = ShimSetup::start(tag, IMAGE, extra_qemu_keys);
        let pod = Self {
            containerd,
            work,
            _bin: bin,
        };
        let config = config.to_string_lossy().into_owned();
        pod.ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config,
            IMAGE,
            "box",
            "sleep",
            "600",
        ]);
        pod
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        match self.containerd.ctr_ok(args, RUN_TIMEOUT) {
            Ok(done) => done.stdout,
            Err(err) => panic!("{err}\n{}", self.diagnostics()),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.work.join("state")
    }

    /// The pod dir of container `box` (a pod of its own).
    fn pod_dir(&self) -> PathBuf {
        self.state_dir().join(self.containerd.namespace).join("box")
    }

    /// The pod's QEMU (it carries the state dir in its arguments).
    fn qemu_pid(&self) -> u32 {
        let qemu: Vec<u32> = pids_matching(&self.state_dir().to_string_lossy())
            .into_iter()
            .filter(|(pid, cmdline)| cmdline.starts_with("qemu-system") && !is_zombie(*pid))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(qemu.len(), 1, "{qemu:?}\n{}", self.diagnostics());
        qemu[0]
    }

    /// `echo` inside the running container, through the agent in the VM.
    fn assert_container_prints(&self) {
        let out = self.ctr_ok(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "box",
            "echo",
            "hello from the pod",
        ]);
        assert_eq!(out.trim(), "hello from the pod");
    }

    fn diagnostics(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.work.join("logs")) {
            for entry in entries.filter_map(Result::ok) {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                text.push_str(&format!("--- {} (tail) ---\n", entry.path().display()));
                text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                text.push('\n');
            }
        }
        let log = self.containerd.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        text.push_str("--- containerd.log (tail) ---\n");
        text.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        text
    }
}

/// The values of `key:` in /proc/<pid>/status, split on whitespace.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in\n{status}"));
    line.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn jailed_qemu_is_filtered_unprivileged_and_sees_an_empty_root() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pod = Pod::start("qemu-jailed", "");
    let qemu = pod.qemu_pid();

    assert_eq!(status_field(qemu, "Seccomp"), ["2"], "seccomp filter mode");
    assert_eq!(
        status_field(qemu, "Uid"),
        [NOBODY; 4],
        "real/effective/saved/fs uid"
    );
    assert_eq!(status_field(qemu, "Gid"), [NOBODY; 4]);
    assert_eq!(status_field(qemu, "Groups"), [NOBODY]);
    assert_eq!(status_field(qemu, "CapEff"), ["0000000000000000"]);
    assert_eq!(status_field(qemu, "CapPrm"), ["0000000000000000"]);

    let root = std::fs::read_link(format!("/proc/{qemu}/root")).expect("QEMU's root");
    assert_eq!(root, pod.pod_dir().join("qemu-root"));
    // What QEMU sees at "/": nothing.
    let visible: Vec<_> = std::fs::read_dir(format!("/proc/{qemu}/root"))
        .expect("list QEMU's root")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .collect();
    assert!(visible.is_empty(), "{visible:?}");

    // The VM's devices were all opened before the drop: the guest works.
    pod.assert_container_prints();

    // A SIGKILLed shim: the jailed QEMU kept no parent-death signal, so
    // containerd's dead-shim cleanup has to kill it.
    let socket = pod.containerd.socket.to_string_lossy().into_owned();
    let shims: Vec<u32> = pids_matching(&socket)
        .into_iter()
        .filter(|(pid, cmdline)| cmdline.contains(SHIM) && !is_zombie(*pid))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(shims.len(), 1, "{shims:?}");
    let shim = i32::try_from(shims[0]).expect("pid");
    // SAFETY: kill(2) with plain integers, on this test's own shim.
    assert_eq!(unsafe { libc::kill(shim, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !is_zombie(qemu) {
        assert!(
            Instant::now() < deadline,
            "the jailed QEMU {qemu} outlived its SIGKILLed shim\n{}",
            pod.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn with_the_jail_off_qemu_is_root_unfiltered_at_the_host_root() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pod = Pod::start("qemu-unjailed", "jail = false\n");
    let qemu = pod.qemu_pid();
    assert_eq!(status_field(qemu, "Seccomp"), ["0"]);
    assert_eq!(status_field(qemu, "Uid"), ["0"; 4]);
    let root = std::fs::read_link(format!("/proc/{qemu}/root")).expect("QEMU's root");
    assert_eq!(root, Path::new("/"));
    assert!(pod.pod_dir().is_dir());
    assert!(!pod.pod_dir().join("qemu-root").exists());
    pod.assert_container_prints();
}
