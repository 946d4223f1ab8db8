//! The pod's files on the host, outside its VM: which pod a bundle
//! belongs to ([`pod_id_of`]), what a serving shim records for the `delete`
//! after its death (the pod dir in each bundle, the shim's pid and the
//! console log's path in the pod dir), and the clean-ups that read them.
//! The pod record that microvm-ctl reads is [`crate::record`].
//!
//! In a bundle: [`POD_DIR_FILE`]. In the pod dir ([`PodLayout::dir`]):
//! [`SHIM_PID_FILE`], [`LOG_PATH_FILE`], plus the VM's pid files, cgroups
//! and sockets ([`PodLayout`]).

use crate::config::Config;
use crate::rootfs::{self, RootfsError};
use crate::vm::layout::PodLayout;
use crate::vm::supervisor::{kill_recorded, process_start_time, still_running};
use std::path::{Path, PathBuf};

/// The annotation that groups the containers of one pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Written into each bundle: the pod's state dir, for `delete` after a crash.
pub const POD_DIR_FILE: &str = "microvm-pod";
/// In the pod dir: the serving shim's pid and start time.
pub const SHIM_PID_FILE: &str = "shim.pid";
/// In the pod dir: the pod's console log path, so a `delete` after the
/// shim died removes the log with the pod.
pub const LOG_PATH_FILE: &str = "console-log";

/// containerd's own bound on an identifier (`identifiers.Validate`).
const POD_ID_MAX_LEN: usize = 76;

/// A pod id the shim will not join into a path or a socket name.
#[derive(Debug, thiserror::Error)]
#[error(
    "pod id {0:?} (the {SANDBOX_ID_ANNOTATION} annotation, else the container id) is not an \
     identifier: letters and digits in runs joined by one '.', '_' or '-', at most 76 bytes"
)]
pub struct BadPodId(pub String);

/// The pod of a container: the sandbox-id annotation, else the container.
/// The annotation comes from the tenant's spec, so it is checked by
/// containerd's own identifier rule before it names a dir, a cgroup or a
/// socket: no `/`, no `..`, nothing absolute.
pub fn pod_id_of(spec: &oci_spec::runtime::Spec, container_id: &str) -> Result<String, BadPodId> {
    let id = spec
        .annotations()
        .as_ref()
        .and_then(|annotations| annotations.get(SANDBOX_ID_ANNOTATION))
        .filter(|id| !id.is_empty())
        .map(String::as_str)
        .unwrap_or(container_id);
    if is_identifier(id) {
        Ok(id.to_owned())
    } else {
        Err(BadPodId(id.to_owned()))
    }
}

/// containerd's identifier grammar: `[A-Za-z0-9]+([._-][A-Za-z0-9]+)*`.
fn is_identifier(id: &str) -> bool {
    id.len() <= POD_ID_MAX_LEN
        && !id.is_empty()
        && id
            .split(['.', '_', '-'])
            .all(|run| !run.is_empty() && run.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Records the pod dir in the bundle (before the pod boots: a shim killed
/// while the VM boots leaves state that containerd's `delete` must find).
pub fn record_pod_dir(bundle: &Path, pod_dir: &Path) {
    if let Err(err) = std::fs::write(
        bundle.join(POD_DIR_FILE),
        pod_dir.as_os_str().as_encoded_bytes(),
    ) {
        tracing::warn!("cannot record the pod dir in the bundle: {err}");
    }
}

/// Records the serving shim in the pod dir (for [`cleanup_after_dead_shim`]).
pub fn record_shim(layout: &PodLayout) {
    let pid = std::process::id();
    if let Some(start_time) = process_start_time(pid) {
        let _ = std::fs::create_dir_all(&layout.dir);
        if let Err(err) = std::fs::write(
            layout.dir.join(SHIM_PID_FILE),
            format!("{pid} {start_time}\n"),
        ) {
            tracing::warn!("cannot record the shim pid: {err}");
        }
    }
    if !layout.log_file.as_os_str().is_empty() {
        let _ = std::fs::create_dir_all(&layout.dir);
        if let Err(err) = std::fs::write(
            layout.dir.join(LOG_PATH_FILE),
            layout.log_file.as_os_str().as_encoded_bytes(),
        ) {
            tracing::warn!("cannot record the console log path: {err}");
        }
    }
}

fn shim_alive(pod_dir: &Path) -> bool {
    let text = std::fs::read_to_string(pod_dir.join(SHIM_PID_FILE)).unwrap_or_default();
    let mut words = text.split_whitespace();
    let pid = words.next().and_then(|w| w.parse::<u32>().ok());
    let start_time = words.next().and_then(|w| w.parse::<u64>().ok());
    match (pid, start_time) {
        (Some(pid), Some(start_time)) => {
            pid != std::process::id() && still_running(pid, start_time)
        }
        _ => false,
    }
}

/// The pod directories this serving shim may have made: the one recorded in
/// its bundle once a container was created, and the one its config names
/// (a signal can arrive while the first container's VM still boots).
fn own_pod_dirs(bundle: &Path, namespace: &str, container_id: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(recorded) = std::fs::read(bundle.join(POD_DIR_FILE)) {
        dirs.push(PathBuf::from(
            String::from_utf8_lossy(&recorded).into_owned(),
        ));
    }
    let spec = oci_spec::runtime::Spec::load(bundle.join("config.json"));
    if let (Ok(spec), Ok(config)) = (spec, Config::load(None)) {
        // A bad id never named a dir: nothing of it to find.
        if let Ok(pod_id) = pod_id_of(&spec, container_id) {
            let layout = PodLayout::new(
                &config.paths.state_dir,
                &config.paths.log_dir,
                namespace,
                &pod_id,
            );
            if !dirs.contains(&layout.dir) {
                dirs.push(layout.dir);
            }
        }
    }
    dirs
}

/// Stops this shim's pod without the agent: kills the VM's recorded host
/// processes, unmounts and removes the pod's state. Blocking (it waits
/// until each killed process is gone). Returns the pod dirs it removed.
pub fn stop_own_pod(bundle: &Path, namespace: &str, container_id: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for dir in own_pod_dirs(bundle, namespace, container_id) {
        if !dir.exists() {
            continue;
        }
        let layout = PodLayout {
            dir: dir.clone(),
            log_file: PathBuf::new(),
        };
        let killed = kill_recorded(&layout.pid_dir());
        tracing::info!("killed {killed:?}, removing {}", dir.display());
        if remove_pod_dir(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

/// What `delete` does. With the pod's shim gone: kills the VM's host
/// processes, unmounts and removes the pod's state. With it alive (another
/// container of the pod still runs): removes this container's files only.
/// An error means mounts or files were left (logged and counted already):
/// `delete` then exits non-zero so containerd logs it too.
pub fn cleanup_after_dead_shim(bundle: &Path, container_id: &str) -> Result<(), RootfsError> {
    let Ok(pod_dir) = std::fs::read(bundle.join(POD_DIR_FILE)) else {
        tracing::info!("delete {container_id}: no pod recorded in the bundle; nothing to clean");
        return Ok(());
    };
    let pod_dir = PathBuf::from(String::from_utf8_lossy(&pod_dir).into_owned());
    let layout = PodLayout {
        dir: pod_dir.clone(),
        log_file: PathBuf::new(),
    };
    if shim_alive(&pod_dir) {
        tracing::info!(
            "delete {container_id}: the pod's shim lives; removing the container's files"
        );
        rootfs::remove_mounted_tree(&layout.container_dir(container_id))?;
    } else {
        let killed = kill_recorded(&layout.pid_dir());
        tracing::info!(
            "delete {container_id}: the pod's shim is gone; killed {killed:?}, removing {}",
            pod_dir.display()
        );
        crate::vm::cgroup::remove_recorded(&layout.cgroups_file());
        let log = std::fs::read(pod_dir.join(LOG_PATH_FILE)).ok();
        // On failure the console log stays with the state for whoever looks.
        remove_pod_dir(&pod_dir)?;
        if let Some(log) = log {
            remove_logs(Path::new(&String::from_utf8_lossy(&log).into_owned()));
        }
    }
    let _ = std::fs::remove_file(bundle.join(POD_DIR_FILE));
    Ok(())
}

/// Removes a pod's state dir; if mounts or files are left, marks its
/// record `teardown-failed` with the reason (logged and counted already).
pub fn remove_pod_dir(dir: &Path) -> Result<(), RootfsError> {
    rootfs::remove_mounted_tree(dir)
        .inspect_err(|err| crate::record::teardown_failed(dir, &crate::pod::error_chain(err)))
}

/// The pod's console log and its rotated file go with the pod.
pub fn remove_logs(log_file: &Path) {
    if log_file.as_os_str().is_empty() {
        return;
    }
    for path in [
        log_file.to_path_buf(),
        crate::vm::console::rotated_path(log_file),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => tracing::warn!("removing {}: {err}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A bundle and a pod dir whose recorded VMM (`qemu`) is a live
    /// `sleep`.
    fn pod_with_a_recorded_vmm(tmp: &Path) -> (std::path::PathBuf, PodLayout, std::process::Child) {
        let bundle = tmp.join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let layout = PodLayout {
            dir: tmp.join("state/ns/pod"),
            log_file: tmp.join("pod.log"),
        };
        std::fs::create_dir_all(layout.pid_dir()).unwrap();
        std::fs::create_dir_all(layout.socket_dir()).unwrap();
        let vmm = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let start = process_start_time(vmm.id()).unwrap();
        std::fs::write(
            layout.pid_dir().join("qemu"),
            format!("{} {start}", vmm.id()),
        )
        .unwrap();
        (bundle, layout, vmm)
    }

    #[test]
    fn cleanup_kills_the_recorded_vm_and_removes_the_pod_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (bundle, layout, mut vmm) = pod_with_a_recorded_vmm(tmp.path());
        std::fs::create_dir_all(layout.container_dir("c1")).unwrap();
        std::fs::write(layout.agent_socket(), "").unwrap();
        // The shim that recorded itself is dead: a pid that is not running.
        std::fs::write(layout.dir.join(SHIM_PID_FILE), "4194303 1").unwrap();
        std::fs::write(bundle.join(POD_DIR_FILE), layout.dir.to_str().unwrap()).unwrap();
        // The console log (and its rotated file) the dead shim recorded.
        let log = tmp.path().join("logs/ns-pod.log");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "console").unwrap();
        std::fs::write(crate::vm::console::rotated_path(&log), "older").unwrap();
        std::fs::write(layout.dir.join(LOG_PATH_FILE), log.to_str().unwrap()).unwrap();

        let reaper = std::thread::spawn(move || vmm.wait().unwrap());
        cleanup_after_dead_shim(&bundle, "c1").unwrap();
        assert!(!reaper.join().unwrap().success(), "the VMM was killed");
        assert!(!layout.dir.exists());
        assert!(!log.exists() && !crate::vm::console::rotated_path(&log).exists());
        assert!(!bundle.join(POD_DIR_FILE).exists());
        // A second delete finds nothing and does not fail.
        cleanup_after_dead_shim(&bundle, "c1").unwrap();
    }

    #[test]
    fn stop_own_pod_kills_the_recorded_vm_and_removes_the_pod_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let (bundle, layout, mut vmm) = pod_with_a_recorded_vmm(tmp.path());
        // This shim itself is recorded as the pod's (and alive).
        record_shim(&layout);
        std::fs::write(bundle.join(POD_DIR_FILE), layout.dir.to_str().unwrap()).unwrap();

        let reaper = std::thread::spawn(move || vmm.wait().unwrap());
        let removed = stop_own_pod(&bundle, "ns", "c1");
        assert!(!reaper.join().unwrap().success(), "the VMM was killed");
        assert_eq!(removed, vec![layout.dir.clone()]);
        assert!(!layout.dir.exists());
        // Nothing left: a second stop finds nothing.
        assert!(stop_own_pod(&bundle, "ns", "c1").is_empty());
    }

    #[test]
    fn cleanup_with_a_live_shim_removes_only_the_container() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(&bundle).unwrap();
        let layout = PodLayout {
            dir: tmp.path().join("state/ns/pod"),
            log_file: tmp.path().join("pod.log"),
        };
        std::fs::create_dir_all(layout.container_dir("c1")).unwrap();
        std::fs::create_dir_all(layout.container_dir("c2")).unwrap();
        // A live "shim": another process.
        let mut shim = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let start = process_start_time(shim.id()).unwrap();
        std::fs::write(
            layout.dir.join(SHIM_PID_FILE),
            format!("{} {start}", shim.id()),
        )
        .unwrap();
        std::fs::write(bundle.join(POD_DIR_FILE), layout.dir.to_str().unwrap()).unwrap();
        cleanup_after_dead_shim(&bundle, "c1").unwrap();
        assert!(!layout.container_dir("c1").exists());
        assert!(layout.container_dir("c2").exists());
        shim.kill().unwrap();
        shim.wait().unwrap();
    }

    #[test]
    fn pod_id_is_the_sandbox_annotation_or_the_container_id() {
        let mut spec = oci_spec::runtime::Spec::default();
        assert_eq!(pod_id_of(&spec, "c1").unwrap(), "c1");
        spec.set_annotations(Some(HashMap::from([(
            SANDBOX_ID_ANNOTATION.to_owned(),
            "pod9".to_owned(),
        )])));
        assert_eq!(pod_id_of(&spec, "c1").unwrap(), "pod9");
    }

    #[test]
    fn a_pod_id_that_is_not_an_identifier_is_refused() {
        let mut spec = oci_spec::runtime::Spec::default();
        for good in ["a", "pod-1.b_c", &"x".repeat(76)] {
            spec.set_annotations(Some(HashMap::from([(
                SANDBOX_ID_ANNOTATION.to_owned(),
                good.to_owned(),
            )])));
            assert_eq!(pod_id_of(&spec, "c1").unwrap(), good);
        }
        for bad in [
            "..",
            "../../etc",
            "/abs",
            "a/b",
            ".hidden",
            "a..b",
            "trailing-",
            "sp ace",
            "\u{e9}t\u{e9}",
            &"x".repeat(77),
        ] {
            spec.set_annotations(Some(HashMap::from([(
                SANDBOX_ID_ANNOTATION.to_owned(),
                bad.to_owned(),
            )])));
            let err = pod_id_of(&spec, "c1").unwrap_err();
            assert_eq!(err.0, bad);
        }
        // With no annotation the container id is checked the same way.
        spec.set_annotations(None);
        assert!(pod_id_of(&spec, "../c1").is_err());
    }
}
