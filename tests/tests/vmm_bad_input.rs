//! Bad input to `microvm-vmm`: each case is one line on stderr, exit status 2,
//! and nothing left behind in the run directory.

use microvm_tests::harness::{binary, run_with_timeout, TempDir};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// A syntactically valid but non-bootable kernel would still fail later; for
/// checks that happen before loading, any existing file will do.
fn placeholder_kernel(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, b"\x7fELF not really").unwrap();
    path
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn run_vmm(dir: &TempDir, args: &[&str]) -> Outcome {
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.current_dir(dir.path()).args(args);
    let done =
        run_with_timeout(&mut cmd, Duration::from_secs(30)).expect("microvm-vmm hung on bad input");
    Outcome {
        code: done.code(),
        stderr: done.stderr,
    }
}

/// Asserts the failure shape and returns the error line.
fn assert_clean_failure(dir: &TempDir, before: &[String], outcome: &Outcome, expect: &str) {
    assert_eq!(
        outcome.code,
        Some(2),
        "exit status; stderr: {}",
        outcome.stderr
    );
    let lines: Vec<&str> = outcome
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {:?}", lines);
    assert!(lines[0].starts_with("microvm-vmm: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(expect),
        "expected {expect:?} in {:?}",
        lines[0]
    );
    assert_eq!(dir.entries(), before, "files left behind");
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    let dir = TempDir::new("bad-kernel-missing");
    let before = dir.entries();
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            "/nonexistent/vmlinux",
            "--serial-output",
            "console.log",
        ],
    );
    assert_clean_failure(
        &dir,
        &before,
        &outcome,
        "boot.kernel /nonexistent/vmlinux: no such file",
    );
}

#[test]
fn garbage_kernel() {
    let dir = TempDir::new("bad-kernel-garbage");
    let kernel = dir.join("garbage");
    std::fs::write(&kernel, vec![0x42u8; 64 << 10]).unwrap();
    let before = dir.entries();
    let vsock = dir.join("v.sock");
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--serial-output",
            "console.log",
            "--vsock-uds",
            path_str(&vsock),
        ],
    );
    assert_clean_failure(
        &dir,
        &before,
        &outcome,
        "neither a loadable vmlinux ELF nor a bzImage",
    );
}

#[test]
fn initrd_larger_than_memory() {
    let dir = TempDir::new("bad-initrd");
    let kernel = placeholder_kernel(&dir);
    let initrd = dir.join("initrd");
    let file = std::fs::File::create(&initrd).unwrap();
    file.set_len(64 << 20).unwrap(); // sparse: costs no disk
    let before = dir.entries();
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--initrd",
            path_str(&initrd),
            "--memory-mib",
            "32",
        ],
    );
    assert_clean_failure(&dir, &before, &outcome, "larger than the guest's 32 MiB");
}

#[test]
fn zero_memory() {
    let dir = TempDir::new("bad-mem0");
    let kernel = placeholder_kernel(&dir);
    let before = dir.entries();
    let outcome = run_vmm(&dir, &["--kernel", path_str(&kernel), "--memory-mib", "0"]);
    assert_clean_failure(&dir, &before, &outcome, "memory_mib must be at least");
}

#[test]
fn absurd_memory() {
    let dir = TempDir::new("bad-mem-huge");
    let kernel = placeholder_kernel(&dir);
    let before = dir.entries();
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--memory-mib",
            "1099511627776",
        ],
    );
    assert_clean_failure(&dir, &before, &outcome, "exceeds the host's");
}

#[test]
fn zero_vcpus() {
    let dir = TempDir::new("bad-vcpus");
    let kernel = placeholder_kernel(&dir);
    let before = dir.entries();
    let outcome = run_vmm(&dir, &["--kernel", path_str(&kernel), "--vcpus", "0"]);
    assert_clean_failure(&dir, &before, &outcome, "vcpus must be between 1 and");
}

#[test]
fn missing_disk() {
    let dir = TempDir::new("bad-disk");
    let kernel = placeholder_kernel(&dir);
    let before = dir.entries();
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--disk",
            "/nonexistent/disk.img",
        ],
    );
    assert_clean_failure(
        &dir,
        &before,
        &outcome,
        "disks[0].path /nonexistent/disk.img: no such file",
    );
}

#[test]
fn api_socket_in_use() {
    let dir = TempDir::new("bad-api-sock");
    let sock = dir.join("api.sock");
    let _live = UnixListener::bind(&sock).unwrap();
    let before = dir.entries();
    let outcome = run_vmm(&dir, &["--api-sock", path_str(&sock)]);
    assert_clean_failure(&dir, &before, &outcome, "already in use");
    assert!(sock.exists(), "the live socket must not be removed");
}

#[test]
fn vsock_socket_in_use() {
    let dir = TempDir::new("bad-vsock-sock");
    let kernel = microvm_tests::probe::probe_guest_elf().expect("probe guest build");
    let sock = dir.join("v.sock");
    let _live = UnixListener::bind(&sock).unwrap();
    let before = dir.entries();
    let outcome = run_vmm(
        &dir,
        &[
            "--kernel",
            path_str(&kernel),
            "--vsock-uds",
            path_str(&sock),
            "--serial-output",
            "console.log",
        ],
    );
    assert_clean_failure(&dir, &before, &outcome, "already in use");
    assert!(sock.exists(), "the live socket must not be removed");
}

#[test]
fn unknown_config_key_is_named() {
    let dir = TempDir::new("bad-config");
    let config = dir.join("vm.json");
    std::fs::write(
        &config,
        r#"{"boot": {"kernel": "/k"}, "machine": {"vcpu": 2}}"#,
    )
    .unwrap();
    let before = dir.entries();
    let outcome = run_vmm(&dir, &["--config", path_str(&config)]);
    assert_clean_failure(&dir, &before, &outcome, "unknown field `vcpu`");
}
