//! Seccomp: a forbidden system call kills the process (each thread kind's
//! filter, installed in a forked child), allowed ones work, and the VMM with
//! its filters on (the default) still boots the probe guest and moves vsock
//! and block traffic, with every thread filtered.

use microvm_tests::harness::{binary, wait_for_path, wait_for_text, ChildGuard, TempDir};
use microvm_tests::probe::{echo_socket_path, probe_guest_elf, spawn_echo, write_disk};
use microvm_vmm::seccomp::{SeccompFilters, ThreadKind, KVM_RUN};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn filters() -> SeccompFilters {
    SeccompFilters::build(microvm_vmm::vcpu::kick_signal()).unwrap()
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Exited(i32),
    Signaled(i32),
}

/// Forks; the child installs `kind`'s filter, runs `body` and exits with its
/// return value. Only raw system calls run in the child (no allocation), so
/// forking a threaded test process is safe.
fn in_filtered_child(kind: ThreadKind, body: fn() -> i32) -> Outcome {
    let filters = filters();
    // SAFETY: plain fork; the child only makes raw system calls and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = match filters.apply(kind) {
            Ok(()) => body(),
            Err(_) => 100,
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    if libc::WIFSIGNALED(status) {
        Outcome::Signaled(libc::WTERMSIG(status))
    } else {
        Outcome::Exited(libc::WEXITSTATUS(status))
    }
}

fn open_etc_hostname() -> i32 {
    // SAFETY: a raw openat with a static NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/etc/hostname".as_ptr(),
            libc::O_RDONLY,
        )
    };
    // Reaching here means the filter let it through.
    if fd >= 0 {
        1
    } else {
        2
    }
}

#[test]
fn every_thread_kind_is_killed_by_a_forbidden_syscall() {
    for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api] {
        assert_eq!(
            in_filtered_child(kind, open_etc_hostname),
            Outcome::Signaled(libc::SIGSYS),
            "{kind:?}: openat must kill the process"
        );
    }
    // Unfiltered, the same body runs to the end.
    assert_eq!(in_filtered_child_unfiltered(open_etc_hostname), 1);
}

fn in_filtered_child_unfiltered(body: fn() -> i32) -> i32 {
    // SAFETY: as in `in_filtered_child`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: ends the child.
        unsafe { libc::_exit(body()) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    libc::WEXITSTATUS(status)
}

#[test]
fn vcpu_filter_allows_only_kvm_run_among_ioctls_and_no_sockets() {
    fn other_ioctl() -> i32 {
        // TCGETS on stdin: harmless unfiltered, forbidden for a vCPU.
        let mut termios = [0u8; 64];
        // SAFETY: TCGETS writes at most sizeof(termios) (60) bytes.
        unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
        0
    }
    fn kvm_run_on_a_bad_fd() -> i32 {
        // Allowed by the filter, so it fails with EBADF instead of killing.
        // SAFETY: ioctl on an invalid fd touches no memory.
        let r = unsafe { libc::ioctl(-1, KVM_RUN as libc::c_ulong, 0) };
        if r == -1 {
            0
        } else {
            1
        }
    }
    fn unix_socket() -> i32 {
        // SAFETY: plain socket call.
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        0
    }
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, other_ioctl),
        Outcome::Signaled(libc::SIGSYS)
    );
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, kvm_run_on_a_bad_fd),
        Outcome::Exited(0)
    );
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, unix_socket),
        Outcome::Signaled(libc::SIGSYS)
    );
}

#[test]
fn vmm_filter_allows_unix_sockets_only() {
    fn unix_socket() -> i32 {
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            0
        } else {
            1
        }
    }
    fn inet_socket() -> i32 {
        // SAFETY: plain socket call.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        0
    }
    assert_eq!(
        in_filtered_child(ThreadKind::Vmm, unix_socket),
        Outcome::Exited(0)
    );
    assert_eq!(
        in_filtered_child(ThreadKind::Vmm, inet_socket),
        Outcome::Signaled(libc::SIGSYS)
    );
}

#[test]
fn api_filter_allows_threads_but_not_processes() {
    fn clone3_is_enosys() -> i32 {
        // SAFETY: clone3 with a null argument; the filter answers before the
        // kernel would read it.
        let r = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        let errno = std::io::Error::last_os_error().raw_os_error();
        if r == -1 && errno == Some(libc::ENOSYS) {
            0
        } else {
            1
        }
    }
    fn fork_process() -> i32 {
        // SAFETY: clone without CLONE_THREAD (a fork); killed before it runs.
        unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) };
        0
    }
    assert_eq!(
        in_filtered_child(ThreadKind::Api, clone3_is_enosys),
        Outcome::Exited(0)
    );
    assert_eq!(
        in_filtered_child(ThreadKind::Api, fork_process),
        Outcome::Signaled(libc::SIGSYS)
    );
}

#[test]
fn allowed_syscalls_work_under_every_filter() {
    fn write_mmap_futex() -> i32 {
        // SAFETY: a zero-length write, an anonymous mapping that is unmapped
        // again, and a futex wake on a local word: no memory is shared.
        unsafe {
            if libc::write(2, b"".as_ptr().cast(), 0) != 0 {
                return 1;
            }
            let page = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if page == libc::MAP_FAILED || libc::munmap(page, 4096) != 0 {
                return 2;
            }
            let word = 0u32;
            if libc::syscall(libc::SYS_futex, &word, libc::FUTEX_WAKE, 1) < 0 {
                return 3;
            }
        }
        0
    }
    for kind in [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api] {
        assert_eq!(
            in_filtered_child(kind, write_mmap_futex),
            Outcome::Exited(0),
            "{kind:?}"
        );
    }
}

/// (thread name, Seccomp mode, filter count) for every thread of `pid`.
fn thread_seccomp(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A connection thread may have exited since the listing.
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((
            field("Name:"),
            field("Seccomp:").parse().unwrap_or(99),
            field("Seccomp_filters:").parse().unwrap_or(99),
        ));
    }
    out
}

fn api_call(sock: &Path, request: &str) -> serde_json::Value {
    let stream = UnixStream::connect(sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    writeln!(writer, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

fn boot_idle_probe(dir: &TempDir, extra: &[&str]) -> (ChildGuard, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    write_disk(&disk).unwrap();
    let uds = dir.join("v.sock");
    let console = dir.join("console.log");
    let sock = dir.join("api.sock");
    let child = ChildGuard(Some(
        Command::new(binary("microvm-vmm"))
            .args(["--kernel", probe_guest_elf().unwrap().to_str().unwrap()])
            .args(["--cmdline", "probe.idle=1"])
            .args(["--disk", disk.to_str().unwrap()])
            .args(["--vsock-uds", uds.to_str().unwrap()])
            .args(["--serial-output", console.to_str().unwrap()])
            .args(["--api-sock", sock.to_str().unwrap()])
            .args(["--log-level", "warn"])
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    assert!(wait_for_path(&sock, Duration::from_secs(10)));
    (child, console)
}

#[test]
fn probe_guest_moves_vsock_and_blk_traffic_with_every_thread_filtered() {
    let dir = TempDir::new("seccomp-probe");
    let echo = spawn_echo(UnixListener::bind(echo_socket_path(&dir.join("v.sock"))).unwrap());
    let (mut child, console) = boot_idle_probe(&dir, &[]);
    let pid = child.0.as_ref().unwrap().id();
    assert!(
        wait_for_text(&console, "probe: idle status=0", Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let serial = std::fs::read_to_string(&console).unwrap();
    for line in ["probe: vsock ok", "probe: blk ok", "probe: blk read hello"] {
        assert!(serial.contains(line), "missing {line:?}:\n{serial}");
    }
    assert_eq!(echo.join().unwrap(), b"probe-vsock-echo");

    // A host-initiated vsock connection exercises the accept path (accept4,
    // FIONBIO, the CONNECT line) under the VMM thread's filter.
    let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
    host.write_all(b"CONNECT 1234\n").unwrap();
    // The API thread spawns a connection thread per request under its filter.
    let state = api_call(&dir.join("api.sock"), r#"{"action":"state"}"#);
    assert_eq!(state["result"]["state"], "running", "{state}");
    let metrics = api_call(&dir.join("api.sock"), r#"{"action":"metrics"}"#);
    assert!(
        metrics["result"]["virtio"]["vsock"].is_object(),
        "{metrics}"
    );

    let threads = thread_seccomp(pid);
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    assert!(
        names.contains(&"vcpu0") && names.contains(&"api"),
        "{threads:?}"
    );
    for (name, mode, count) in &threads {
        assert_eq!(*mode, 2, "thread {name} is not filtered: {threads:?}");
        let expected = if name.starts_with("api") { 2 } else { 1 };
        assert_eq!(*count, expected, "thread {name}: {threads:?}");
    }
    drop(host);
    let done = api_call(&dir.join("api.sock"), r#"{"action":"shutdown"}"#);
    assert_eq!(done["ok"], true, "{done}");
    let status = child.0.as_mut().unwrap().wait().unwrap();
    child.0 = None;
    // Teardown (closing, unmapping, unlinking sockets) ran under the filter.
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!dir.join("v.sock").exists() && !dir.join("api.sock").exists());
}

#[test]
fn no_seccomp_leaves_threads_unfiltered() {
    let dir = TempDir::new("seccomp-off");
    let _echo = spawn_echo(UnixListener::bind(echo_socket_path(&dir.join("v.sock"))).unwrap());
    let (mut child, console) = boot_idle_probe(&dir, &["--no-seccomp"]);
    let pid = child.0.as_ref().unwrap().id();
    assert!(wait_for_text(
        &console,
        "probe: idle status=0",
        Duration::from_secs(30)
    ));
    let threads = thread_seccomp(pid);
    assert!(threads.iter().all(|t| t.1 == 0), "{threads:?}");
    api_call(&dir.join("api.sock"), r#"{"action":"shutdown"}"#);
    let status = child.0.as_mut().unwrap().wait().unwrap();
    child.0 = None;
    assert_eq!(status.code(), Some(0));
}
