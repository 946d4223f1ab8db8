//! The pod's host cgroups. The VM's host processes run under the
//! sandbox's `linux.cgroupsPath` (below kubelet's pod cgroup), so the node
//! accounts the VM to the pod and containerd's PodSandboxStats (which reads
//! that cgroup) shows what the VM costs. cgroupfs and systemd-driver paths,
//! cgroup v1 and v2, through the host module the VMM's jail uses too
//! (`microvm_host::cgroup`).
//!
//! Processes go into two leaves, because cgroup v2 lets only a cgroup
//! without processes give its children controllers:
//! - `<pod>/helpers`: virtiofsd, vhost-device-vsock and the builtin VMM's
//!   jail supervisor;
//! - `<pod>/vmm`: the VM itself (QEMU, or the jailed microvm-vmm, whose
//!   jail writes its limits there), so one pod's limits never touch
//!   another's.
//!
//! A pod without a cgroups path (a bare `ctr run --cgroup ""`) gets
//! `microvm/<namespace>/<pod dir name>-<hash of its path>`.

use microvm_host::cgroup::{self as host, Cgroup, CgroupsPath, Hierarchies};
use std::ffi::CString;
use std::path::{Path, PathBuf};

pub use microvm_host::cgroup::CgroupError;

/// The leaf for the pod's helper processes.
pub const HELPERS: &str = "helpers";
/// The leaf for the VM process.
pub const VMM: &str = "vmm";
/// Where pods without a cgroups path go.
const FALLBACK_PARENT: &str = "microvm";
/// What the pod's processes are accounted and limited by.
const CONTROLLERS: &[&str] = &["cpu", "io", "memory", "pids"];

/// Which of the pod's leaves a process joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaf {
    Helpers,
    Vmm,
}

#[derive(Debug, Clone)]
pub struct PodCgroups {
    pod: Cgroup,
    helpers: Cgroup,
    vmm: Cgroup,
}

impl PodCgroups {
    /// Creates the pod's cgroup and its two leaves. `cgroups_path` is the
    /// sandbox spec's; without one, `microvm/<namespace>/<unique_name>`.
    pub fn create(
        cgroups_path: Option<&str>,
        namespace: &str,
        unique_name: &str,
    ) -> Result<Self, CgroupError> {
        let relative = match cgroups_path {
            Some(path) => CgroupsPath::parse(path)?.relative(),
            None => Self::fallback(namespace, unique_name)?,
        };
        let hierarchies = Hierarchies::detect()?;
        let pod = Cgroup::create(&hierarchies, &relative, CONTROLLERS)?;
        let leaves = pod
            .child(HELPERS, CONTROLLERS)
            .and_then(|helpers| Ok((helpers, pod.child(VMM, CONTROLLERS)?)));
        match leaves {
            Ok((helpers, vmm)) => Ok(Self { pod, helpers, vmm }),
            Err(err) => {
                pod.remove();
                Err(err)
            }
        }
    }

    fn fallback(namespace: &str, unique_name: &str) -> Result<PathBuf, CgroupError> {
        let path = format!("/{FALLBACK_PARENT}/{namespace}/{unique_name}");
        Ok(CgroupsPath::parse(&path)?.relative())
    }

    /// The pod's cgroup below each hierarchy's root (the jail's
    /// `--cgroup-parent`).
    pub fn pod_relative(&self) -> &Path {
        self.pod.relative()
    }

    pub fn is_v2(&self) -> bool {
        self.pod.hierarchies().is_v2()
    }

    /// The `cgroup.procs` files of `leaf`, for a child to join before exec.
    pub fn procs_files(&self, leaf: Leaf) -> Vec<CString> {
        match leaf {
            Leaf::Helpers => self.helpers.procs_files(),
            Leaf::Vmm => self.vmm.procs_files(),
        }
    }

    /// Writes a limit of the VM's leaf (`memory.max`, `pids.max`).
    pub fn limit_vmm(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        self.vmm.set(file, value)
    }

    /// Records what was made in `file`, for the cleanup after a crashed
    /// shim ([`remove_recorded`]).
    pub fn record(&self, file: &Path) {
        let text = [&self.pod, &self.helpers, &self.vmm]
            .iter()
            .map(|cgroup| cgroup.record())
            .collect::<String>();
        if let Err(err) = std::fs::write(file, text) {
            tracing::warn!(
                "cannot record the pod's cgroups in {}: {err}",
                file.display()
            );
        }
    }

    /// Removes the pod's cgroups once its processes are gone (blocking: a
    /// just-reaped process may keep a cgroup busy for a moment).
    pub fn remove(&self) {
        for cgroup in [&self.vmm, &self.helpers, &self.pod] {
            cgroup.remove();
        }
    }
}

/// Removes the cgroups recorded in `file` by [`PodCgroups::record`].
pub fn remove_recorded(file: &Path) {
    if let Ok(text) = std::fs::read_to_string(file) {
        host::remove_recorded(&text);
    }
}

pub use microvm_host::cgroup::join_in_child;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_without_a_path_get_their_own_under_microvm() {
        assert_eq!(
            PodCgroups::fallback("k8s.io", "abc").unwrap(),
            PathBuf::from("microvm/k8s.io/abc")
        );
        assert!(PodCgroups::fallback("..", "abc").is_err());
    }

    /// Root on this host (v1; v2 in the KVM harness's L1): the pod, its
    /// leaves, a limit on the VM's, a child process in the helpers', and
    /// the crash cleanup from the record alone.
    #[test]
    fn a_pod_gets_two_leaves_and_the_record_removes_them() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to create cgroups");
            return;
        }
        let path = format!("/microvm-shim-test-{}/pod", std::process::id());
        let cgroups = PodCgroups::create(Some(&path), "ns", "pod").unwrap();
        cgroups.limit_vmm("pids.max", "20").unwrap();
        cgroups.limit_vmm("memory.max", "268435456").unwrap();
        let files = cgroups.procs_files(Leaf::Helpers);
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        use std::os::unix::process::CommandExt;
        // SAFETY: join_in_child only opens, writes and closes files.
        unsafe {
            command.pre_exec(move || join_in_child(&files));
        }
        let mut child = command.spawn().unwrap();
        let joined = cgroups.helpers.dirs()[0].join("cgroup.procs");
        let procs = std::fs::read_to_string(joined).unwrap();
        assert!(
            procs.lines().any(|l| l == child.id().to_string()),
            "{procs}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let record = std::env::temp_dir().join(format!("microvm-cgroups-{}", std::process::id()));
        cgroups.record(&record);
        remove_recorded(&record);
        let _ = std::fs::remove_file(&record);
        for dir in cgroups.pod.dirs() {
            assert!(!dir.exists(), "{}", dir.display());
            assert!(!dir.parent().unwrap().exists(), "{}", dir.display());
        }
    }
}
