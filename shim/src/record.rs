//! The pod record: `<pod dir>/pod.json`, what the shim knows of its pod for
//! the node's tools (`microvm-ctl ps`, `logs`, `console`, `metrics`).
//! Written atomically (a temporary file renamed over it) when the boot
//! starts, with state `booting`, and again once the pod runs. The pod dir
//! is root's (0700) and the guest cannot write it (only `shared/` is
//! shared), so what a reader finds here is what the shim wrote.
//!
//! Meant as the one home of the pod's on-disk state: the older records
//! (`pids/`, `cgroups`, `shim.pid`) can fold into it.

use crate::config::{BackendKind, Config};
use crate::pod::Pod;
use crate::vm::layout::PodLayout;
use crate::vm::supervisor::process_start_time;
use microvm_proto::agent::v1 as api;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The record's file name in the pod dir.
pub const RECORD_FILE: &str = "pod.json";
/// The shim's metrics socket in the pod dir (see [`crate::metrics`]).
pub const METRICS_SOCKET: &str = "metrics.sock";
/// The record's format; a reader refuses another.
pub const RECORD_FORMAT: u32 = 1;

/// CRI's sandbox annotations (containerd's pkg/cri/annotations).
pub const CRI_SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const CRI_SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("reading pod record {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pod record {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("pod record {path} has format {found}; this build reads format {RECORD_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("writing pod record {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodState {
    Booting,
    Running,
    /// The VM stopped but its state dir could not be removed (mounts left
    /// under it): kept, with the reason in `teardown_error`, for the
    /// operator (`microvm-ctl ps`).
    #[serde(rename = "teardown-failed")]
    TeardownFailed,
}

/// One host process of the pod's VM (VMM, virtiofsd, vhost-device-vsock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProcess {
    pub name: String,
    pub pid: u32,
    /// /proc/<pid>/stat field 22: tells a reused pid from the process.
    pub start_time: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodRecord {
    pub format: u32,
    pub pod_id: String,
    /// containerd's namespace (`k8s.io` under CRI).
    pub namespace: String,
    /// The Kubernetes pod, from CRI's sandbox annotations (empty under ctr).
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    pub backend: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub state: PodState,
    /// When the boot started (Unix milliseconds).
    pub created_unix_ms: u64,
    /// Once running: how long the host processes, the guest boot and the
    /// agent took (milliseconds).
    pub boot_ms: Option<BootMillis>,
    pub shim_pid: u32,
    pub shim_start_time: Option<u64>,
    pub shim_version: String,
    pub agent_version: String,
    pub agent_api_version: String,
    pub processes: Vec<HostProcess>,
    pub console_log: PathBuf,
    pub agent_socket: PathBuf,
    pub metrics_socket: PathBuf,
    pub console_enabled: bool,
    pub console_shell: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown_error: Option<String>,
    /// The builtin VMM's control API (its device counters); QEMU has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_api_socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BootMillis {
    pub launch: f64,
    pub boot: f64,
    pub agent: f64,
}

impl BootMillis {
    pub fn total(&self) -> f64 {
        self.launch + self.boot + self.agent
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

impl PodRecord {
    pub fn path_in(pod_dir: &Path) -> PathBuf {
        pod_dir.join(RECORD_FILE)
    }

    /// A record of a pod whose boot starts now.
    pub fn booting(
        config: &Config,
        layout: &PodLayout,
        namespace: &str,
        pod_id: &str,
        annotations: Option<&std::collections::HashMap<String, String>>,
    ) -> Self {
        let annotation = |key: &str| {
            annotations
                .and_then(|annotations| annotations.get(key))
                .cloned()
                .unwrap_or_default()
        };
        let pid = std::process::id();
        Self {
            format: RECORD_FORMAT,
            pod_id: pod_id.to_owned(),
            namespace: namespace.to_owned(),
            pod_name: annotation(CRI_SANDBOX_NAME),
            pod_namespace: annotation(CRI_SANDBOX_NAMESPACE),
            pod_uid: annotation(CRI_SANDBOX_UID),
            backend: config.backend.name().to_owned(),
            vcpus: config.vm.vcpus,
            memory_mib: config.vm.memory_mib,
            state: PodState::Booting,
            created_unix_ms: unix_ms(SystemTime::now()),
            boot_ms: None,
            shim_pid: pid,
            shim_start_time: process_start_time(pid),
            shim_version: crate::version::VERSION.to_owned(),
            agent_version: String::new(),
            agent_api_version: String::new(),
            processes: Vec::new(),
            console_log: layout.log_file.clone(),
            agent_socket: layout.agent_socket(),
            metrics_socket: layout.dir.join(METRICS_SOCKET),
            console_enabled: config.console.enabled,
            console_shell: config.console.shell.clone(),
            teardown_error: None,
            vmm_api_socket: (config.backend == BackendKind::Builtin)
                .then(|| layout.vmm_api_socket()),
        }
    }

    pub fn read(pod_dir: &Path) -> Result<Self, RecordError> {
        let path = Self::path_in(pod_dir);
        let text = std::fs::read(&path).map_err(|source| RecordError::Read {
            path: path.clone(),
            source,
        })?;
        let record: Self = serde_json::from_slice(&text).map_err(|source| RecordError::Parse {
            path: path.clone(),
            source,
        })?;
        if record.format != RECORD_FORMAT {
            return Err(RecordError::Format {
                path,
                found: record.format,
            });
        }
        Ok(record)
    }

    /// Writes `pod.json` in `pod_dir` atomically (temporary file, rename).
    pub fn write(&self, pod_dir: &Path) -> Result<(), RecordError> {
        let path = Self::path_in(pod_dir);
        let temporary = pod_dir.join(format!(".{RECORD_FILE}.tmp"));
        let error = |source| RecordError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(pod_dir).map_err(error)?;
        let text = serde_json::to_vec_pretty(self).map_err(|err| error(err.into()))?;
        std::fs::write(&temporary, text).map_err(error)?;
        std::fs::rename(&temporary, &path).map_err(error)
    }

    /// Whether the shim that wrote the record still runs (same pid and
    /// start time).
    pub fn shim_alive(&self) -> bool {
        match self.shim_start_time {
            Some(start_time) => process_start_time(self.shim_pid) == Some(start_time),
            None => false,
        }
    }
}

/// Hook (service.rs, before the pod boots): records the pod as booting,
/// unless a record exists (the pod's later containers). Returns the
/// record's path if this call wrote it, for [`boot_failed`].
pub fn booting(
    config: &Config,
    namespace: &str,
    pod_id: &str,
    spec: &oci_spec::runtime::Spec,
) -> Option<PathBuf> {
    let layout = PodLayout::new(
        &config.paths.state_dir,
        &config.paths.log_dir,
        namespace,
        pod_id,
    );
    let path = PodRecord::path_in(&layout.dir);
    if path.exists() {
        return None;
    }
    let record = PodRecord::booting(
        config,
        &layout,
        namespace,
        pod_id,
        spec.annotations().as_ref(),
    );
    match record.write(&layout.dir) {
        Ok(()) => Some(path),
        Err(err) => {
            tracing::warn!("{}", crate::pod::error_chain(&err));
            None
        }
    }
}

/// Hook (service.rs, the boot failed): removes the record [`booting`]
/// wrote, and the pod dir if the failed boot left it otherwise empty.
pub fn boot_failed(record: &Path) {
    if let Err(err) = std::fs::remove_file(record) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {err}", record.display());
        }
    }
    if let Some(dir) = record.parent() {
        // Fails (and is meant to) if anything else is still there.
        let _ = std::fs::remove_dir(dir);
    }
}

/// Hook (the pod's teardown failed): marks the record so `microvm-ctl ps`
/// shows the pod as `teardown-failed`, with why. A pod without a record
/// (it never booted this far) has only the shim's log to say it.
pub fn teardown_failed(pod_dir: &Path, error: &str) {
    let Ok(mut record) = PodRecord::read(pod_dir) else {
        return;
    };
    record.state = PodState::TeardownFailed;
    record.teardown_error = Some(error.to_owned());
    if let Err(err) = record.write(pod_dir) {
        tracing::warn!("{}", crate::pod::error_chain(&err));
    }
}

/// Hook (service.rs, once the pod booted): logs the agent's version, gives
/// the agent the console policy, starts the metrics socket, and records the
/// pod as running with its host processes and boot times.
pub async fn running(pod: &Pod, config: &Config, namespace: &str) {
    let mut record = PodRecord::read(&pod.layout.dir)
        .unwrap_or_else(|_| PodRecord::booting(config, &pod.layout, namespace, &pod.id, None));
    match pod.agent.check().await {
        Ok(check) => {
            let api_version = check.agent_version.unwrap_or_default();
            tracing::info!(
                "pod {}: agent {} (API {api_version}), shim {} ({})",
                pod.id,
                check.agent_build_version,
                crate::version::VERSION,
                crate::version::REVISION
            );
            record.agent_version = check.agent_build_version;
            record.agent_api_version = api_version.to_string();
        }
        Err(err) => tracing::warn!(
            "pod {}: agent version: {}",
            pod.id,
            crate::pod::error_chain(&err)
        ),
    }
    let policy = pod
        .agent
        .debug
        .clone()
        .set_console_policy(api::ConsolePolicy {
            enabled: config.console.enabled,
        })
        .await;
    if let Err(status) = policy {
        tracing::warn!("pod {}: setting the console policy: {status}", pod.id);
    }
    crate::metrics::serve(&pod.layout.dir.join(METRICS_SOCKET), pod.times);
    record.state = PodState::Running;
    record.boot_ms = Some(BootMillis {
        launch: millis(pod.times.launch),
        boot: millis(pod.times.boot),
        agent: millis(pod.times.agent),
    });
    record.processes = pod
        .host_pids()
        .await
        .into_iter()
        .map(|(name, pid)| HostProcess {
            name: name.to_owned(),
            pid,
            start_time: process_start_time(pid),
        })
        .collect();
    if let Err(err) = record.write(&pod.layout.dir) {
        tracing::warn!("{}", crate::pod::error_chain(&err));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_atomically_and_carry_the_cri_names() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.paths.state_dir = tmp.path().join("state");
        config.vm.vcpus = 2;
        let layout = PodLayout::new(&config.paths.state_dir, tmp.path(), "k8s.io", "pod1");
        let annotations = std::collections::HashMap::from([
            (CRI_SANDBOX_NAME.to_owned(), "web".to_owned()),
            (CRI_SANDBOX_NAMESPACE.to_owned(), "default".to_owned()),
            (CRI_SANDBOX_UID.to_owned(), "uid-1".to_owned()),
        ]);
        let record = PodRecord::booting(&config, &layout, "k8s.io", "pod1", Some(&annotations));
        record.write(&layout.dir).unwrap();
        let read = PodRecord::read(&layout.dir).unwrap();
        assert_eq!(read, record);
        assert_eq!(read.pod_name, "web");
        assert_eq!(read.pod_namespace, "default");
        assert_eq!(read.state, PodState::Booting);
        assert_eq!(read.vcpus, 2);
        assert!(read.shim_alive(), "this process wrote it");
        // No temporary file is left.
        let names: Vec<_> = std::fs::read_dir(&layout.dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(RECORD_FILE)]);

        let mut other = record.clone();
        other.format = 99;
        other.write(&layout.dir).unwrap();
        let err = PodRecord::read(&layout.dir).unwrap_err();
        assert!(err.to_string().contains("format 99"), "{err}");
    }

    #[test]
    fn a_failed_teardown_is_recorded_with_its_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config::default();
        let layout = PodLayout::new(tmp.path(), tmp.path(), "k8s.io", "pod1");
        let record = PodRecord::booting(&config, &layout, "k8s.io", "pod1", None);
        record.write(&layout.dir).unwrap();
        let text = std::fs::read_to_string(PodRecord::path_in(&layout.dir)).unwrap();
        assert!(!text.contains("teardown_error"), "{text}");

        teardown_failed(&layout.dir, "not removing x: 1 mount(s) left under it");
        let read = PodRecord::read(&layout.dir).unwrap();
        assert_eq!(read.state, PodState::TeardownFailed);
        assert_eq!(
            read.teardown_error.as_deref(),
            Some("not removing x: 1 mount(s) left under it")
        );
        let text = std::fs::read_to_string(PodRecord::path_in(&layout.dir)).unwrap();
        assert!(text.contains("\"teardown-failed\""), "{text}");
    }
}
