//! End to end: a private containerd runs busybox containers through
//! `containerd-shim-microvm-v2`, each pod in its own VM booted from the
//! guest image, driven with `ctr`. Every case runs on two backends:
//! `builtin` with the default config (microvm-vmm jailed as 65534; under
//! real KVM, in the KVM harness's L1 on these PVM hosts) and `qemu` under
//! TCG on this host.
//!
//! Needs containerd, ctr, qemu-system-x86_64, virtiofsd, vhost-device-vsock
//! and busybox-static (scripts/install-deps.sh installs them all); a missing
//! piece fails the tests and says which.

use microvm_tests::containerd::{
    is_zombie, mounts_under, pids_matching, Containerd, ShimSetup, TestBackend,
};
use microvm_tests::harness::{Finished, TempDir};
use microvm_tests::kvm::Suite;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RUNTIME: &str = "io.containerd.microvm.v2";
const IMAGE: &str = "docker.io/library/busybox:microvm-test";
const SHIM: &str = "containerd-shim-microvm-v2";
/// One container run under TCG: VM boot plus the command. Generous: the
/// machine is shared with other builds.
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// One pod VM at a time: each runs QEMU under TCG, and two of them on a
/// 2-core machine starve each other's guest past the agent timeout.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Fixture {
    _turn: std::sync::MutexGuard<'static, ()>,
    backend: TestBackend,
    containerd: Containerd,
    /// State and log dirs of the shim, and the config file.
    work: TempDir,
    config: PathBuf,
    _bin: TempDir,
}

impl Fixture {
    /// Panics when the host lacks a piece: scripts/install-deps.sh installs
    /// them all, so a missing one is a setup failure, not a skip.
    fn new(tag: &str, backend: TestBackend) -> Self {
        // A test that failed while holding the lock poisons it; the next one
        // can still run.
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let ShimSetup {
            containerd,
            work,
            config,
            bin,
        } = ShimSetup::start_on(backend, tag, IMAGE, "");
        Self {
            _turn: turn,
            backend,
            containerd,
            work,
            config,
            _bin: bin,
        }
    }

    fn config_arg(&self) -> String {
        self.config.to_string_lossy().into_owned()
    }

    /// `ctr run --rm` of `args` in a new container `id`.
    fn run(&self, id: &str, extra: &[&str], args: &[&str]) -> Finished {
        let config = self.config_arg();
        let mut all = vec![
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config,
        ];
        all.extend_from_slice(extra);
        all.push(IMAGE);
        all.push(id);
        all.extend_from_slice(args);
        self.containerd
            .ctr(&all, RUN_TIMEOUT)
            .unwrap_or_else(|err| panic!("{err}\n{}", self.diagnostics()))
    }

    /// Starts `id` detached, running `args`.
    fn run_detached(&self, id: &str, extra: &[&str], args: &[&str]) {
        let config = self.config_arg();
        let mut all = vec![
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            "--runtime-config-path",
            &config,
        ];
        all.extend_from_slice(extra);
        all.push(IMAGE);
        all.push(id);
        all.extend_from_slice(args);
        self.containerd
            .ctr_ok(&all, RUN_TIMEOUT)
            .unwrap_or_else(|err| panic!("{err}\n{}", self.diagnostics()));
    }

    fn ctr_ok(&self, args: &[&str]) -> Finished {
        self.containerd
            .ctr_ok(args, RUN_TIMEOUT)
            .unwrap_or_else(|err| panic!("{err}\n{}", self.diagnostics()))
    }

    fn state_dir(&self) -> PathBuf {
        self.work.join("state")
    }

    /// The pod logs and containerd's log, for failure messages.
    fn diagnostics(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.work.join("logs")) {
            for entry in entries.filter_map(Result::ok) {
                let log = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                text.push_str(&format!(
                    "--- {} (tail) ---\n{}\n",
                    entry.path().display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        let log = self.containerd.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        text.push_str(&format!(
            "--- containerd.log (tail) ---\n{}\n",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
        text
    }

    /// Processes of this fixture's pods still alive: those that carry the
    /// state dir in their arguments (QEMU, virtiofsd, vhost-device-vsock,
    /// the VMM's jail supervisor) and their children (the jailed VMM).
    fn leftover_processes(&self) -> Vec<(u32, String)> {
        let mut found: Vec<(u32, String)> = pids_matching(&self.state_dir().to_string_lossy())
            .into_iter()
            .filter(|(pid, _)| !is_zombie(*pid))
            .collect();
        let children: Vec<(u32, String)> = found
            .iter()
            .flat_map(|(pid, _)| children_of(*pid))
            .filter(|(pid, _)| !found.iter().any(|(known, _)| known == pid))
            .collect();
        found.extend(children);
        found
    }

    fn shim_processes(&self) -> Vec<(u32, String)> {
        pids_matching(&self.containerd.socket.to_string_lossy())
            .into_iter()
            .filter(|(pid, cmdline)| cmdline.contains(SHIM) && !is_zombie(*pid))
            .collect()
    }

    /// Asserts nothing of the shim's is left: processes, mounts, state.
    fn assert_clean(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let processes = self.leftover_processes();
            let shims = self.shim_processes();
            let mounts = mounts_under(&self.state_dir());
            let state = list_tree(&self.state_dir());
            if processes.is_empty() && shims.is_empty() && mounts.is_empty() && state.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                panic!(
                    "left behind: processes {processes:?}, shims {shims:?}, mounts {mounts:?}, state {state:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The live children of `pid`, with their command lines.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|child| child.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter(|child| !is_zombie(*child))
        .map(|child| {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            (child, String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

/// Files (not directories) left under `dir`.
fn list_tree(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            files.extend(list_tree(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn host_kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn container_runs_in_its_own_kernel_and_exit_codes_propagate(backend: TestBackend) {
    let fixture = Fixture::new("shim-uname", backend);
    let done = fixture.run("uname", &[], &["uname", "-r"]);
    assert!(
        done.status.success(),
        "ctr run failed ({}): {}\n{}",
        done.status,
        done.stderr,
        fixture.diagnostics()
    );
    let guest_release = done.stdout.trim();
    assert!(
        !guest_release.is_empty(),
        "no output\n{}",
        fixture.diagnostics()
    );
    assert_ne!(guest_release, host_kernel_release());
    eprintln!(
        "guest kernel {guest_release}, host {}",
        host_kernel_release()
    );

    let done = fixture.run("exit7", &[], &["sh", "-c", "echo bye; exit 7"]);
    assert_eq!(done.code(), Some(7), "stderr: {}", done.stderr);
    assert_eq!(done.stdout.trim(), "bye");
    fixture.assert_clean();
}

/// Seconds to wait for a task to reach a status in `ctr task ls`.
const STATUS_TIMEOUT: Duration = Duration::from_secs(60);

impl Fixture {
    /// The STATUS column of `ctr task ls` for `id`.
    fn task_status(&self, id: &str) -> Option<String> {
        let done = self
            .containerd
            .ctr(&["tasks", "ls"], Duration::from_secs(20))
            .ok()?;
        done.stdout.lines().find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(id)).then(|| words.nth(1).unwrap_or("").to_owned())
        })
    }

    fn wait_status(&self, id: &str, wanted: &str) {
        let deadline = std::time::Instant::now() + STATUS_TIMEOUT;
        while std::time::Instant::now() < deadline {
            if self.task_status(id).as_deref() == Some(wanted) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "task {id} is {:?}, not {wanted}\n{}",
            self.task_status(id),
            self.diagnostics()
        );
    }

    /// Deletes a stopped task and its container.
    fn remove(&self, id: &str) {
        self.ctr_ok(&["tasks", "delete", id]);
        self.ctr_ok(&["containers", "delete", id]);
    }

    /// The processes that run the guest: QEMU, or the jailed microvm-vmm
    /// (the jail supervisor's child, which runs as `/microvm-vmm` in the
    /// jail's root).
    fn vmm_processes(&self) -> Vec<(u32, String)> {
        let name = self.backend.vmm_process();
        let processes = self.leftover_processes();
        let vmms: Vec<(u32, String)> = processes
            .iter()
            .filter(|(_, cmdline)| cmdline.contains(name))
            .cloned()
            .collect();
        match self.backend {
            TestBackend::Builtin => vmms
                .iter()
                .filter(|(_, cmdline)| !cmdline.contains("--jail"))
                .cloned()
                .collect(),
            _ => vmms,
        }
    }
}

fn exec_with_and_without_tty_ps_and_kill(backend: TestBackend) {
    let fixture = Fixture::new("shim-exec", backend);
    fixture.run_detached("box", &[], &["sleep", "600"]);
    fixture.wait_status("box", "RUNNING");

    let done = fixture.ctr_ok(&["tasks", "exec", "--exec-id", "e1", "box", "echo", "hello"]);
    assert_eq!(done.stdout.trim(), "hello");
    let done = fixture
        .containerd
        .ctr(
            &[
                "tasks",
                "exec",
                "--exec-id",
                "e2",
                "box",
                "sh",
                "-c",
                "exit 3",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    assert_eq!(done.code(), Some(3), "{}", done.stderr);

    // -t needs a terminal on ctr's side: script(1) gives it one.
    let ctr_line = format!(
        "ctr --address {} --namespace {} tasks exec -t --exec-id e3 box sh -c 'tty; echo tty-ok'",
        fixture.containerd.socket.display(),
        microvm_tests::containerd::NAMESPACE
    );
    let done = microvm_tests::harness::run_with_timeout(
        std::process::Command::new("script").args(["-qec", &ctr_line, "/dev/null"]),
        RUN_TIMEOUT,
    )
    .unwrap();
    assert!(
        done.stdout.contains("tty-ok"),
        "{}{}",
        done.stdout,
        done.stderr
    );
    assert!(
        done.stdout.contains("/dev/pts/"),
        "no tty in the guest: {}",
        done.stdout
    );

    let ps = fixture.ctr_ok(&["tasks", "ps", "box"]);
    let pids: Vec<&str> = ps
        .stdout
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        !pids.is_empty(),
        "ctr task ps listed nothing: {}",
        ps.stdout
    );

    fixture.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "box"]);
    fixture.wait_status("box", "STOPPED");
    fixture.remove("box");
    fixture.assert_clean();
}

fn containers_with_one_sandbox_id_share_a_vm_and_a_shim(backend: TestBackend) {
    let fixture = Fixture::new("shim-pod", backend);
    let annotation = "io.kubernetes.cri.sandbox-id=pod1";
    fixture.run_detached("pod1", &["--annotation", annotation], &["sleep", "600"]);
    fixture.run_detached("pod1-app", &["--annotation", annotation], &["sleep", "600"]);
    fixture.wait_status("pod1-app", "RUNNING");
    assert_eq!(
        fixture.shim_processes().len(),
        1,
        "{:?}",
        fixture.shim_processes()
    );
    assert_eq!(
        fixture.vmm_processes().len(),
        1,
        "{:?}",
        fixture.vmm_processes()
    );
    let boot_id = |id: &str, exec: &str| {
        fixture
            .ctr_ok(&[
                "tasks",
                "exec",
                "--exec-id",
                exec,
                id,
                "cat",
                "/proc/sys/kernel/random/boot_id",
            ])
            .stdout
            .trim()
            .to_owned()
    };
    assert_eq!(boot_id("pod1", "b1"), boot_id("pod1-app", "b2"));

    for id in ["pod1-app", "pod1"] {
        fixture.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", id]);
        fixture.wait_status(id, "STOPPED");
        fixture.remove(id);
    }
    fixture.assert_clean();
}

fn events_come_in_containerd_order(backend: TestBackend) {
    let fixture = Fixture::new("shim-events", backend);
    let mut events = fixture
        .containerd
        .ctr_command(&["events"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = events.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let guard = microvm_tests::harness::ChildGuard(Some(events));
    std::thread::sleep(Duration::from_millis(500));

    fixture.run_detached("ev", &[], &["sleep", "600"]);
    fixture.wait_status("ev", "RUNNING");
    fixture.ctr_ok(&["tasks", "exec", "--exec-id", "x1", "ev", "true"]);
    fixture.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "ev"]);
    fixture.wait_status("ev", "STOPPED");
    fixture.remove("ev");
    std::thread::sleep(Duration::from_millis(500));
    drop(guard);
    let lines = lines.join().unwrap();
    let topics: Vec<&str> = lines
        .iter()
        .filter(|line| line.contains("\"ev\"") || line.contains("ev "))
        .filter_map(|line| {
            line.split_whitespace()
                .find(|word| word.starts_with("/tasks/"))
        })
        .collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ],
        "all events:\n{}",
        lines.join("\n")
    );
    fixture.assert_clean();
}

fn twenty_create_delete_cycles_leave_nothing(backend: TestBackend) {
    let fixture = Fixture::new("shim-cycles", backend);
    // Inside the KVM harness's L1 every instruction is emulated and one
    // cycle costs about a minute: fewer there, the same checks.
    let cycles = if microvm_tests::kvm::in_nested_kvm() {
        5
    } else {
        20
    };
    for cycle in 0..cycles {
        let id = format!("cycle{cycle}");
        let done = fixture.run(&id, &[], &["true"]);
        assert!(
            done.status.success(),
            "cycle {cycle}: {}\n{}",
            done.stderr,
            fixture.diagnostics()
        );
    }
    fixture.assert_clean();
}

fn vmm_killed_mid_run_exits_the_task_and_leaves_nothing(backend: TestBackend) {
    let fixture = Fixture::new("shim-kill9", backend);
    fixture.run_detached("victim", &[], &["sleep", "600"]);
    fixture.wait_status("victim", "RUNNING");
    let vmm = fixture.vmm_processes();
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    let pid = i32::try_from(vmm[0].0).unwrap();
    // SAFETY: kill(2) with plain integers, on the test's own QEMU.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    fixture.wait_status("victim", "STOPPED");
    let info = fixture.ctr_ok(&["tasks", "ls"]);
    assert!(info.stdout.contains("victim"), "{}", info.stdout);
    fixture.remove("victim");
    fixture.assert_clean();
    let shim_log = fixture.containerd.log();
    assert!(
        shim_log.contains(&format!(
            "pod VM died: {} exited",
            vmm_name(fixture.backend)
        )),
        "no reason in the shim log\n{}",
        fixture.diagnostics()
    );
}

fn a_missing_kernel_or_a_vm_that_does_not_boot_fails_create_with_the_reason(backend: TestBackend) {
    let fixture = Fixture::new("shim-fail", backend);
    let config = std::fs::read_to_string(&fixture.config).unwrap();
    let kernel_line = config
        .lines()
        .find(|line| line.starts_with("kernel = "))
        .unwrap()
        .to_owned();

    let missing = fixture.work.join("no-such-vmlinux");
    std::fs::write(
        &fixture.config,
        config.replace(&kernel_line, &format!("kernel = \"{}\"", missing.display())),
    )
    .unwrap();
    let done = fixture.run("nokernel", &[], &["true"]);
    assert!(!done.status.success());
    assert!(
        done.stderr.contains("guest kernel") && done.stderr.contains("no-such-vmlinux"),
        "{}",
        done.stderr
    );
    fixture.assert_clean();

    // A file QEMU cannot boot: the VM exits during boot.
    let junk = fixture.work.join("junk-kernel");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    std::fs::write(
        &fixture.config,
        config.replace(&kernel_line, &format!("kernel = \"{}\"", junk.display())),
    )
    .unwrap();
    let done = fixture.run("junk", &[], &["true"]);
    assert!(!done.status.success());
    // QEMU gets as far as a boot; microvm-vmm refuses the file at once, and
    // its own reason is quoted.
    let reason = match backend {
        TestBackend::Builtin => "is neither a loadable vmlinux ELF nor a bzImage",
        TestBackend::QemuKvm | TestBackend::QemuTcg => "the VM did not boot",
    };
    assert!(done.stderr.contains(reason), "{}", done.stderr);
    fixture.assert_clean();
}

/// The name the shim gives the VM process in its logs.
fn vmm_name(backend: TestBackend) -> &'static str {
    match backend {
        TestBackend::Builtin => "vmm",
        TestBackend::QemuKvm | TestBackend::QemuTcg => "qemu",
    }
}

type Case = fn(TestBackend);

const CASES: &[(&str, Case)] = &[
    (
        "container_runs_in_its_own_kernel_and_exit_codes_propagate",
        container_runs_in_its_own_kernel_and_exit_codes_propagate,
    ),
    (
        "exec_with_and_without_tty_ps_and_kill",
        exec_with_and_without_tty_ps_and_kill,
    ),
    (
        "containers_with_one_sandbox_id_share_a_vm_and_a_shim",
        containers_with_one_sandbox_id_share_a_vm_and_a_shim,
    ),
    (
        "events_come_in_containerd_order",
        events_come_in_containerd_order,
    ),
    (
        "twenty_create_delete_cycles_leave_nothing",
        twenty_create_delete_cycles_leave_nothing,
    ),
    (
        "vmm_killed_mid_run_exits_the_task_and_leaves_nothing",
        vmm_killed_mid_run_exits_the_task_and_leaves_nothing,
    ),
    (
        "a_missing_kernel_or_a_vm_that_does_not_boot_fails_create_with_the_reason",
        a_missing_kernel_or_a_vm_that_does_not_boot_fails_create_with_the_reason,
    ),
];

fn main() {
    let mut suite = Suite::new("shim_e2e", Duration::from_secs(1800));
    for (name, case) in CASES {
        let case = *case;
        suite.host(libtest_mimic::Trial::test(
            format!("qemu_tcg::{name}"),
            move || {
                case(TestBackend::QemuTcg);
                Ok(())
            },
        ));
        suite.kvm(format!("builtin::{name}"), move || {
            case(TestBackend::Builtin);
            Ok(())
        });
    }
    suite.run()
}
