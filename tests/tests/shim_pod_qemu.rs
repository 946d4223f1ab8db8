//! The shim's pod layer against a real guest: `Pod::boot` with the `qemu`
//! backend (QEMU+TCG, vhost-device-vsock, virtiofsd) boots the guest image,
//! the shim's agent client passes the health check over hybrid vsock,
//! creates the sandbox and mounts the shared directory; a second pod runs
//! beside it; a QEMU killed with SIGKILL is seen by the exit watch; and
//! after shutdown no process, mount, socket or state file is left.
//!
//! Needs qemu-system-x86_64, virtiofsd and vhost-device-vsock (installed by
//! scripts/install-deps.sh); without them the test fails and says which.

use microvm_proto::agent::v1 as api;
use microvm_shim::config::{BackendKind, Config};
use microvm_shim::pod::{error_chain, Pod, PodSettings};
use microvm_tests::containerd::{mounts_under, pids_matching, test_guest_image, which};
use microvm_tests::harness::TempDir;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn missing_prerequisite() -> Option<String> {
    ["qemu-system-x86_64", "virtiofsd", "vhost-device-vsock"]
        .into_iter()
        .find(|tool| which(tool).is_none())
        .map(|tool| format!("{tool} is not in PATH"))
}

fn live_processes_under(dir: &Path) -> Vec<(u32, String)> {
    pids_matching(&dir.to_string_lossy())
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| !stat.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_pods_boot_answer_and_leave_nothing_behind() {
    if let Some(reason) = missing_prerequisite() {
        panic!("shim pod test cannot run: {reason} (run scripts/install-deps.sh)");
    }
    let (vmlinux, initramfs) = test_guest_image();
    let work = TempDir::new("shim-pod");
    let mut config = Config {
        backend: BackendKind::Qemu,
        ..Config::default()
    };
    config.vm.kernel = vmlinux;
    config.vm.initramfs = initramfs;
    config.paths.state_dir = work.join("state");
    config.paths.log_dir = work.join("logs");
    config.timeouts.boot_seconds = 180.0;
    config.timeouts.agent_seconds = 60.0;

    let (first, second) = tokio::join!(
        Pod::boot(&config, "ns", "pod-a", PodSettings::default()),
        Pod::boot(&config, "ns", "pod-b", PodSettings::default())
    );
    let logs = || {
        files_under(&work.join("logs"))
            .iter()
            .map(|log| std::fs::read_to_string(log).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    let first = first.unwrap_or_else(|err| panic!("pod-a: {}\n{}", error_chain(&err), logs()));
    let second = second.unwrap_or_else(|err| panic!("pod-b: {}\n{}", error_chain(&err), logs()));
    eprintln!(
        "pod-a boot: host processes {:?}, guest {:?}, agent {:?}",
        first.times.launch, first.times.boot, first.times.agent
    );

    // The agent answers through the shim's client; the guest runs its own
    // kernel, and each pod is its own VM.
    let details = |pod: &Pod| {
        let mut sandbox = pod.agent.sandbox.clone();
        async move {
            sandbox
                .get_guest_details(api::GetGuestDetailsRequest {})
                .await
                .map(|response| response.into_inner())
        }
    };
    let a = details(&first).await.expect("guest details of pod-a");
    let b = details(&second).await.expect("guest details of pod-b");
    let host_release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    assert_ne!(a.kernel_release, host_release.trim());
    assert!(a.kernel_release.starts_with("6.1"), "{a:?}");
    assert_eq!(a.kernel_release, b.kernel_release);
    assert_eq!(first.host_pids().await.len(), 3);
    let pids_a: Vec<u32> = first
        .host_pids()
        .await
        .iter()
        .map(|(_, pid)| *pid)
        .collect();
    let pids_b: Vec<u32> = second
        .host_pids()
        .await
        .iter()
        .map(|(_, pid)| *pid)
        .collect();
    assert!(pids_a.iter().all(|pid| !pids_b.contains(pid)));
    // The shared dir is mounted on the host (a shared bind of itself).
    assert!(!mounts_under(&first.layout.shared_dir()).is_empty());

    // SIGKILL to pod-b's QEMU: the exit watch reports the VMM.
    let watch = second.exit_watch().await;
    let qemu = second
        .host_pids()
        .await
        .into_iter()
        .find(|(name, _)| *name == "qemu")
        .expect("qemu pid");
    let qemu_pid = i32::try_from(qemu.1).unwrap();
    // SAFETY: kill(2) with plain integers, on this test's own QEMU.
    let killed = unsafe { libc::kill(qemu_pid, libc::SIGKILL) };
    assert_eq!(killed, 0);
    let exit = tokio::time::timeout(Duration::from_secs(30), watch.first_exit())
        .await
        .expect("exit watch");
    assert_eq!(exit.name, "qemu");
    assert!(exit.is_vmm);
    assert!(exit.status.contains("SIGKILL"), "{}", exit.status);

    // The per-pod log has the console in it while the pod lives...
    let log = std::fs::read_to_string(&first.layout.log_file).unwrap();
    assert!(log.contains("microvm-agent: ready"), "{log}");
    first.shutdown().await;
    second.shutdown().await;
    let state = config.paths.state_dir.clone();
    assert!(
        live_processes_under(&state).is_empty(),
        "{:?}",
        live_processes_under(&state)
    );
    assert!(
        mounts_under(&state).is_empty(),
        "{:?}",
        mounts_under(&state)
    );
    assert!(files_under(&state).is_empty(), "{:?}", files_under(&state));
    // ...and goes with it (issue #13: logs must not pile up on the node).
    assert!(!first.layout.log_file.exists());
    assert!(!second.layout.log_file.exists());
}
