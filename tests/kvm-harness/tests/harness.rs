//! The harness binary as people use it: a command's output and status come
//! back, L1 has a real /dev/kvm and cgroup v2, a hang is cut off, a CPU
//! without SVM is a clear error, and no run leaves anything on the host.
//! On a host with real KVM, `auto` runs the command directly and the
//! nested cases still run (`--mode nested`).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn harness() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_microvm-kvm-harness"));
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}

/// Runs the harness; its output and pid (for [`leftovers`]).
fn output_of(command: &mut Command) -> (Output, u32) {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the harness");
    let pid = child.id();
    (child.wait_with_output().expect("wait for the harness"), pid)
}

fn nested(args: &[&str]) -> (Output, u32) {
    output_of(
        harness()
            .args(["run", "--mode", "nested", "--timeout", "120"])
            .args(args),
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What the run of harness `pid` left: its temp dir, or any process
/// (QEMU, virtiofsd) whose command line names that dir.
fn leftovers(pid: u32) -> Vec<String> {
    let marker = format!("microvm-kvm-harness.{pid}.");
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/tmp").into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&marker) {
            left.push(entry.path().display().to_string());
        }
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if text(&cmdline).contains(&marker) {
            left.push(text(&cmdline).replace('\0', " "));
        }
    }
    left
}

#[test]
fn output_status_kvm_and_cgroup_v2_come_back_from_l1() {
    let started = Instant::now();
    let (out, pid) = nested(&[
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; test -c /dev/kvm && echo kvm; \
         stat -fc %T /sys/fs/cgroup; cat /sys/fs/cgroup/cgroup.subtree_control; \
         echo \"$MICROVM_KVM_HARNESS\"; pwd; touch /usr/written-in-l1; exit 7",
    ]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "out");
    assert_eq!(lines[1], "kvm", "{stdout}");
    assert_eq!(lines[2], "cgroup2fs");
    assert!(
        lines[3].contains("memory") && lines[3].contains("pids"),
        "{stdout}"
    );
    assert_eq!(lines[4], "nested");
    assert_eq!(lines[5], env!("CARGO_MANIFEST_DIR"));
    assert!(stderr.starts_with("err\n"), "{stderr}");
    assert!(stderr.contains("L1 kernel"), "{stderr}");
    // L1's writes stay in L1.
    assert!(!PathBuf::from("/usr/written-in-l1").exists());
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
    println!("nested run: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn a_hanging_command_is_killed_at_the_timeout() {
    let started = Instant::now();
    let (out, pid) = output_of(harness().args([
        "run",
        "--mode",
        "nested",
        "--timeout",
        "25",
        "--",
        "sleep",
        "600",
    ]));
    assert_eq!(out.status.code(), Some(124));
    assert!(
        text(&out.stderr).contains("did not finish within 25s"),
        "{}",
        text(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
}

#[test]
fn a_cpu_without_svm_is_a_clear_error() {
    let (out, pid) = nested(&["--l1-cpu", "max,-svm", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("no /dev/kvm in L1: kvm_amd did not load"),
        "{stderr}"
    );
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
}

#[test]
fn a_missing_program_and_a_cwd_l1_lacks_are_clear_errors() {
    let (out, pid) = nested(&["--", "/nonexistent/program"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("cannot run /nonexistent/program in L1"),
        "{}",
        text(&out.stderr)
    );
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));
    let tmp = tempfile::tempdir().unwrap();
    let out = harness()
        .current_dir(tmp.path())
        .args(["run", "--mode", "nested", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("does not exist in L1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn help_and_detect_say_what_they_do() {
    let help = harness().args(["run", "--help"]).output().unwrap();
    assert!(help.status.success());
    for word in ["--timeout", "--mode", "--memory-mib", "--l1-cpu"] {
        assert!(text(&help.stdout).contains(word), "{word}");
    }
    let detect = harness().arg("detect").output().unwrap();
    assert!(detect.status.success());
    let said = text(&detect.stdout);
    assert!(said.starts_with("kvm: "), "{said}");
    assert!(said.contains("\nrun: "), "{said}");
}

/// Waits until `done` holds, for at most `timeout`.
fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_stopped_or_killed_harness_leaves_nothing() {
    // SIGTERM while L1 boots: the harness cleans up and says why.
    let child = harness()
        .args(["run", "--mode", "nested", "--", "sleep", "600"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    assert!(
        eventually(Duration::from_secs(30), || !leftovers(pid).is_empty()),
        "the run never started"
    );
    // SAFETY: signals the child this test spawned.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    assert!(text(&out.stderr).contains("interrupted by signal 15"));
    assert!(leftovers(pid).is_empty(), "{:?}", leftovers(pid));

    // SIGKILL once the command runs: QEMU and virtiofsd die with it (their
    // parent-death signal) and the temp dir is already gone.
    let mut child = harness()
        .args([
            "run",
            "--mode",
            "nested",
            "--",
            "sh",
            "-c",
            "echo up; sleep 600",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"up\n");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || leftovers(pid).is_empty()),
        "{:?}",
        leftovers(pid)
    );
}
