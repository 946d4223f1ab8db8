//! A serving shim stops its pod and exits on SIGTERM and SIGINT, even with
//! no containerd to ask it (issue #5: it used to ignore them).
//!
//! The shim runs in serve mode against a stand-in for containerd's ttrpc
//! socket (it only has to accept the event publisher's connection). Its pod
//! is faked as a VM caught mid-boot: a recorded host process, and the
//! shared directory bind-mounted onto itself (when run as root).

use microvm_tests::containerd::mounts_under;
use microvm_tests::harness::{binary, wait_for_listener, TempDir};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHIM: &str = "containerd-shim-microvm-v2";
const NAMESPACE: &str = "ns";
const POD: &str = "pod1";
/// The brief's bound: a signalled shim is gone within a few seconds.
const EXIT_WITHIN: Duration = Duration::from_secs(5);

/// Accepts and holds every connection, as containerd's ttrpc socket would.
fn fake_containerd_ttrpc(path: &Path) {
    let listener = UnixListener::bind(path).expect("bind the fake ttrpc socket");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 1..];
    rest.split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .expect("starttime")
}

struct Setup {
    work: TempDir,
    shim: Child,
    socket: std::path::PathBuf,
    pod_dir: std::path::PathBuf,
    vm_stand_in: Child,
}

/// A serving shim whose pod VM is booting: the pod dir the config names,
/// a recorded "qemu" (a sleep), and a mounted shared dir.
fn serving_shim_with_a_booting_pod(tag: &str) -> Setup {
    let work = TempDir::new(tag);
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{"io.kubernetes.cri.sandbox-id":"{POD}"}}}}"#
        ),
    )
    .unwrap();
    let config = work.join("microvm.toml");
    std::fs::write(
        &config,
        format!(
            "[paths]\nstate_dir = \"{}\"\nlog_dir = \"{}\"\n",
            work.join("state").display(),
            work.join("logs").display()
        ),
    )
    .unwrap();
    let pod_dir = work.join("state").join(NAMESPACE).join(POD);
    std::fs::create_dir_all(pod_dir.join("pids")).unwrap();
    let vm_stand_in = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(
        pod_dir.join("pids/qemu"),
        format!("{} {}\n", vm_stand_in.id(), start_time(vm_stand_in.id())),
    )
    .unwrap();
    if is_root() {
        let shared = pod_dir.join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        let status = Command::new("mount")
            .arg("--bind")
            .arg(&shared)
            .arg(&shared)
            .status()
            .unwrap();
        assert!(status.success(), "bind-mounting the shared dir");
    }

    let ttrpc = work.join("ttrpc.sock");
    fake_containerd_ttrpc(&ttrpc);
    let socket = work.join("shim.sock");
    let shim = Command::new(binary(SHIM))
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", &ttrpc)
        .env("MICROVM_SHIM_CONFIG", &config)
        .args(["-namespace", NAMESPACE, "-id", "c1", "-address"])
        .arg(work.join("containerd.sock"))
        .arg("-socket")
        .arg(format!("unix://{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join("shim.log")).unwrap())
        .spawn()
        .expect("start the shim");
    let mut setup = Setup {
        work,
        shim,
        socket,
        pod_dir,
        vm_stand_in,
    };
    if !wait_for_listener(&setup.socket, Duration::from_secs(10)) {
        let _ = setup.shim.kill();
        panic!(
            "the shim did not listen within 10 s; log:\n{}",
            std::fs::read_to_string(setup.work.join("shim.log")).unwrap_or_default()
        );
    }
    setup
}

fn signal_and_expect_a_clean_exit(signal: i32, tag: &str) {
    let mut setup = serving_shim_with_a_booting_pod(tag);
    let pid = i32::try_from(setup.shim.id()).unwrap();
    // SAFETY: kill(2) with plain integers, on our own child.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = setup.shim.try_wait().unwrap() {
            break Some(status);
        }
        if sent.elapsed() > EXIT_WITHIN {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(setup.work.join("shim.log")).unwrap_or_default();
    let Some(status) = status else {
        let _ = setup.shim.kill();
        let _ = setup.shim.wait();
        let _ = setup.vm_stand_in.kill();
        panic!("the shim ignored signal {signal} for {EXIT_WITHIN:?}; log:\n{log}");
    };
    let took = sent.elapsed();
    assert!(
        status.success(),
        "exit status {status} after signal {signal}; log:\n{log}"
    );
    // The pod went with it: its host process, its mounts, its state.
    let vm = setup.vm_stand_in.wait().unwrap();
    assert!(!vm.success(), "the recorded VM process was killed ({vm})");
    assert!(
        mounts_under(setup.work.path()).is_empty(),
        "mounts left: {:?}",
        mounts_under(setup.work.path())
    );
    assert!(!setup.pod_dir.exists(), "the pod dir is removed");
    assert!(!setup.socket.exists(), "the shim's socket is removed");
    eprintln!("signal {signal}: the shim exited {status} in {took:?}");
}

#[test]
fn sigterm_stops_the_pod_and_exits() {
    signal_and_expect_a_clean_exit(libc::SIGTERM, "sig-term");
}

#[test]
fn sigint_stops_the_pod_and_exits() {
    signal_and_expect_a_clean_exit(libc::SIGINT, "sig-int");
}
