//! The jail: `microvm-vmm --jail` runs the VMM in its own mount and PID
//! namespaces, rooted at the jail directory, in a cgroup, as an unprivileged
//! uid/gid, with no inherited fds and an empty environment; the probe guest
//! still moves vsock and block traffic; everything is removed afterwards.

use microvm_tests::harness::{binary, wait_for_path, wait_for_text, ChildGuard, TempDir};
use microvm_tests::probe::{echo_socket_path, probe_guest_elf, spawn_echo, write_disk};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `nobody` on Debian.
const UID: u32 = 65534;
const GID: u32 = 65534;

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

/// The only child of `pid` (the supervisor's jailed VMM).
fn child_of(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no jailed child of {pid}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

#[test]
fn jailed_vmm_runs_the_probe_isolated_and_leaves_nothing_behind() {
    let dir = TempDir::new("jail");
    // What the shim would prepare: files and a socket directory the jailed
    // uid may use.
    let disk = dir.join("disk.img");
    write_disk(&disk).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(GID)).unwrap();
    let socks = dir.join("socks");
    std::fs::create_dir(&socks).unwrap();
    std::os::unix::fs::chown(&socks, Some(UID), Some(GID)).unwrap();
    let uds = socks.join("v.sock");
    let api = socks.join("api.sock");
    let console = dir.join("console.log");
    let jail_name = format!("mvt-jail-{}", std::process::id());
    let jail = dir.join(&jail_name);

    let echo_path = echo_socket_path(&uds);
    let listener = UnixListener::bind(&echo_path).unwrap();
    std::fs::set_permissions(&echo_path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let echo = spawn_echo(listener);

    // An fd the VMM must not inherit, and an environment it must not see.
    let leaked = std::fs::File::open("/etc/hostname").unwrap();
    let leaked_fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    let mut cmd = Command::new(binary("microvm-vmm"));
    cmd.args(["--jail", jail.to_str().unwrap()])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .args(["--cgroup", "pids.max=40"])
        .args(["--kernel", probe_guest_elf().unwrap().to_str().unwrap()])
        .args(["--cmdline", "probe.idle=1"])
        .args(["--disk", disk.to_str().unwrap()])
        .args(["--vsock-uds", uds.to_str().unwrap()])
        .args(["--serial-output", console.to_str().unwrap()])
        .args(["--api-sock", api.to_str().unwrap()])
        .args(["--log-level", "warn"])
        .env("MICROVM_JAIL_TEST_SECRET", "must-not-leak")
        .stdin(Stdio::null());
    // SAFETY: dup2 in the forked child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(leaked_fd, 42) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut supervisor = ChildGuard(Some(cmd.spawn().unwrap()));
    let supervisor_pid = supervisor.0.as_ref().unwrap().id();
    assert!(
        wait_for_path(&api, Duration::from_secs(10)),
        "API socket never appeared"
    );
    assert!(
        wait_for_text(&console, "probe: idle status=0", Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    let serial = std::fs::read_to_string(&console).unwrap();
    for line in ["probe: vsock ok", "probe: blk read hello", "probe: blk ok"] {
        assert!(serial.contains(line), "missing {line:?}:\n{serial}");
    }
    assert_eq!(echo.join().unwrap(), b"probe-vsock-echo");
    assert!(std::fs::read(&disk).unwrap()[512..].starts_with(b"probe-blk-write-ok"));
    // The supervisor still holds the leaked fd; the VMM must not.
    assert!(std::fs::read_link(format!("/proc/{supervisor_pid}/fd/42")).is_ok());

    let vmm = child_of(supervisor_pid);
    let vmm_s = vmm.to_string();

    // Root: the jail directory (same inode), seen as "/" from inside.
    let root = std::fs::metadata(format!("/proc/{vmm}/root/.")).unwrap();
    let jail_meta = std::fs::metadata(&jail).unwrap();
    assert_eq!((root.dev(), root.ino()), (jail_meta.dev(), jail_meta.ino()));
    assert!(Path::new(&format!("/proc/{vmm}/root/vm/config.json")).exists());
    assert!(!Path::new(&format!("/proc/{vmm}/root/etc")).exists());

    // Namespaces.
    for kind in ["mnt", "pid"] {
        assert_ne!(ns(&vmm_s, kind), ns("self", kind), "{kind} namespace");
    }
    assert_eq!(
        status_field(vmm, "NSpid:").split_whitespace().last(),
        Some("1")
    );

    // Credentials, seccomp.
    let ids = format!("{UID}\t{UID}\t{UID}\t{UID}");
    assert_eq!(status_field(vmm, "Uid:"), ids);
    assert_eq!(
        status_field(vmm, "Gid:"),
        ids.replace(&UID.to_string(), &GID.to_string())
    );
    assert_eq!(status_field(vmm, "Seccomp:"), "2");

    // Environment.
    let environ = std::fs::read(format!("/proc/{vmm}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&environ)
    );

    // File descriptors: stdio plus what a VMM opens, nothing inherited.
    let allowed_prefixes = [
        "anon_inode:[eventfd]",
        "anon_inode:[eventpoll]",
        "anon_inode:[timerfd]",
        "anon_inode:kvm-vm",
        "anon_inode:kvm-vcpu:",
        "/memfd:microvm-guest-ram",
        "socket:[",
        "/dev/kvm",
        "/dev/urandom",
        "/vm/disk0",
        "/vm/console",
    ];
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{vmm}/fd")).unwrap() {
        let entry = entry.unwrap();
        let fd: u32 = entry.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(entry.path()).unwrap();
        let target = target.to_string_lossy().into_owned();
        if fd > 2 {
            assert!(
                allowed_prefixes.iter().any(|p| target.starts_with(p)),
                "unexpected fd {fd} -> {target}"
            );
        }
        seen.push(target);
    }
    assert!(!seen.iter().any(|t| t.contains("hostname")), "{seen:?}");
    for needed in ["/dev/kvm", "/vm/disk0", "/vm/console", "anon_inode:kvm-vm"] {
        assert!(
            seen.iter().any(|t| t == needed),
            "{needed} missing: {seen:?}"
        );
    }

    // Cgroup: the VMM is in <parent>/<jail name> with our limit.
    let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    let expected = format!("/microvm/{jail_name}");
    assert!(cgroup.contains(&expected), "{cgroup}");
    let pids_dir = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from(format!("/sys/fs/cgroup/microvm/{jail_name}"))
    } else {
        PathBuf::from(format!("/sys/fs/cgroup/pids/microvm/{jail_name}"))
    };
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .unwrap()
            .trim(),
        "40"
    );

    // Stop over the API; the supervisor reports the VMM's status and cleans up.
    let done = api_call(&api, r#"{"action":"shutdown"}"#);
    assert_eq!(done["ok"], true, "{done}");
    let status = supervisor.0.as_mut().unwrap().wait().unwrap();
    supervisor.0 = None;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(!jail.exists(), "jail directory left behind");
    assert!(!pids_dir.exists(), "cgroup left behind");
    assert!(!uds.exists() && !api.exists(), "sockets left behind");
    // The files that were mounted into the jail are intact.
    assert!(disk.exists() && console.exists());
    drop(leaked);
}

#[test]
fn jail_refuses_bad_input_and_leaves_nothing_behind() {
    let dir = TempDir::new("jail-bad");
    let existing = dir.join("already");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("keep"), b"x").unwrap();
    let out = Command::new(binary("microvm-vmm"))
        .args(["--jail", existing.to_str().unwrap()])
        .args(["--kernel", probe_guest_elf().unwrap().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(
        existing.join("keep").exists(),
        "an existing directory was touched"
    );

    let out = Command::new(binary("microvm-vmm"))
        .args(["--jail", dir.join("new").to_str().unwrap()])
        .args(["--api-sock", dir.join("api.sock").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("needs the VM config"), "{stderr}");
    assert!(!dir.join("new").exists());

    // A limit the kernel refuses: nothing half made is left behind.
    let name = format!("mvt-jail-bad-{}", std::process::id());
    let out = Command::new(binary("microvm-vmm"))
        .args(["--jail", dir.join(&name).to_str().unwrap()])
        .args(["--cgroup", "pids.max=lots"])
        .args(["--kernel", probe_guest_elf().unwrap().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pids.max"), "{stderr}");
    assert!(!dir.join(&name).exists());
    for hierarchy in ["pids/", "memory/", ""] {
        let cgroup = format!("/sys/fs/cgroup/{hierarchy}microvm/{name}");
        assert!(!Path::new(&cgroup).exists(), "{cgroup} left behind");
    }
}

/// A supervisor killed outright (SIGKILL, which it cannot forward) takes the
/// jailed VMM with it: the VMM is PID 1 of its own namespace and would
/// otherwise run on with nobody to stop it.
#[test]
fn jailed_vmm_dies_with_a_killed_supervisor() {
    let dir = TempDir::new("jail-kill");
    let jail_name = format!("mvt-jail-kill-{}", std::process::id());
    let jail = dir.join(&jail_name);
    let console = dir.join("console.log");
    let mut supervisor = ChildGuard(Some(
        Command::new(binary("microvm-vmm"))
            .args(["--jail", jail.to_str().unwrap()])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .args(["--kernel", probe_guest_elf().unwrap().to_str().unwrap()])
            .args(["--cmdline", "probe.idle=1"])
            .args(["--serial-output", console.to_str().unwrap()])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let supervisor_pid = supervisor.0.as_ref().unwrap().id();
    let vmm = child_of(supervisor_pid);
    assert!(
        wait_for_text(&console, "probe: idle", Duration::from_secs(30)),
        "{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    assert_eq!(
        status_field(vmm, "Seccomp:"),
        "2",
        "the VMM is not running yet"
    );

    supervisor.0.as_mut().unwrap().kill().unwrap();
    supervisor.0.as_mut().unwrap().wait().unwrap();
    supervisor.0 = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{vmm}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists(),
        "the jailed VMM (pid {vmm}) outlived its killed supervisor"
    );
    // What a killed supervisor cannot clean up is its caller's: the jail
    // directory (no mounts in this namespace) and the cgroup.
    std::fs::remove_dir_all(&jail).unwrap();
    for hierarchy in ["pids/", "memory/", "cpu/", "cpuset/", ""] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{hierarchy}microvm/{jail_name}"));
    }
}
