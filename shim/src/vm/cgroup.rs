//! The pod's host cgroup. The VM's host processes (VMM and helpers) start
//! in the sandbox's `linux.cgroupsPath`, under kubelet's pod cgroup, so the
//! node accounts the VM to the pod and CRI's PodSandboxStats (containerd
//! reads the pod's cgroup on the host) shows what the VM uses.
//!
//! cgroupfs paths only (`/kubepods/pod<uid>/<id>`), cgroup v1 (every
//! mounted hierarchy) or v2. A systemd-driver path (`slice:prefix:name`)
//! is not handled: the processes then stay in the shim's cgroup, and the
//! shim logs that.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups path {0:?} is not an absolute cgroupfs path (systemd cgroup paths are not supported)")]
    Unsupported(String),
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The pod's cgroup, in every hierarchy; removed (with the parents this
/// shim created) by [`HostCgroup::remove`].
#[derive(Debug, Clone, Default)]
pub struct HostCgroup {
    /// The leaf in each hierarchy.
    leaves: Vec<PathBuf>,
    /// Directories this shim created, deepest first.
    created: Vec<PathBuf>,
}

impl HostCgroup {
    /// Creates `cgroups_path` under each hierarchy's mount point.
    pub fn create(cgroups_path: &str) -> Result<Self, CgroupError> {
        let relative = relative_path(cgroups_path)?;
        let mut cgroup = Self::default();
        for root in hierarchies() {
            let leaf = root.join(&relative);
            let mut missing = Vec::new();
            let mut dir = leaf.as_path();
            while !dir.exists() && dir.starts_with(&root) && dir != root {
                missing.push(dir.to_path_buf());
                match dir.parent() {
                    Some(parent) => dir = parent,
                    None => break,
                }
            }
            for dir in missing.iter().rev() {
                let created = match std::fs::create_dir(dir) {
                    Ok(()) => inherit_cpuset(dir),
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                    Err(err) => Err(err),
                };
                if let Err(source) = created {
                    cgroup.created.extend(missing.iter().cloned());
                    cgroup.remove();
                    return Err(CgroupError::Create {
                        path: dir.clone(),
                        source,
                    });
                }
            }
            cgroup.created.extend(missing);
            cgroup.leaves.push(leaf);
        }
        Ok(cgroup)
    }

    /// Records what [`HostCgroup::create`] made in `file`, so the cleanup
    /// after a crashed shim (`delete`) can remove it
    /// ([`remove_recorded`]).
    pub fn record(&self, file: &Path) {
        let text: String = self
            .created
            .iter()
            .map(|dir| format!("{}\n", dir.display()))
            .collect();
        if let Err(err) = std::fs::write(file, text) {
            tracing::warn!(
                "cannot record the pod's cgroups in {}: {err}",
                file.display()
            );
        }
    }

    /// The `cgroup.procs` files a child writes itself into, prepared
    /// before fork (no allocation in the child).
    pub fn procs_files(&self) -> Vec<CString> {
        self.leaves
            .iter()
            .filter_map(|leaf| CString::new(leaf.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Removes what [`HostCgroup::create`] made, once its processes are
    /// gone. Best effort: a cgroup still in use stays (and is logged).
    pub fn remove(&self) {
        // Cgroups made below the pod's (the jailed VMM's own) outlive a
        // jail supervisor that was killed outright.
        for leaf in &self.leaves {
            if self.created.contains(leaf) {
                remove_nested(leaf);
            }
        }
        let mut created = self.created.clone();
        // Deepest first, across hierarchies.
        created.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
        for dir in created {
            // A process just reaped can still count as a member for a
            // moment (EBUSY): retry briefly.
            let is_leaf = self.leaves.contains(&dir);
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => break,
                    Err(err)
                        if err.raw_os_error() == Some(libc::EBUSY) && is_leaf && attempts < 40 =>
                    {
                        attempts += 1;
                        std::thread::sleep(std::time::Duration::from_millis(25));
                    }
                    // A parent this shim made that now holds another pod's
                    // cgroup: that pod's owner (or kubelet) removes it.
                    Err(err) if !is_leaf && err.raw_os_error() == Some(libc::EBUSY) => {
                        tracing::debug!("cgroup {} is still in use; left", dir.display());
                        break;
                    }
                    Err(err) => {
                        tracing::warn!("cannot remove cgroup {}: {err}", dir.display());
                        break;
                    }
                }
            }
        }
    }
}

/// Removes every cgroup below `dir`, deepest first (a cgroup directory
/// holds only interface files, which rmdir does not mind).
fn remove_nested(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            let child = entry.path();
            remove_nested(&child);
            // A process just killed can still count as a member for a
            // moment (EBUSY): retry briefly.
            for attempt in 0.. {
                match std::fs::remove_dir(&child) {
                    Err(err) if err.raw_os_error() == Some(libc::EBUSY) && attempt < 40 => {
                        std::thread::sleep(std::time::Duration::from_millis(25));
                    }
                    Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                        tracing::warn!("cannot remove cgroup {}: {err}", child.display());
                        break;
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Removes the cgroups recorded in `file` by [`HostCgroup::record`] (only
/// directories below the cgroup root; the processes must be gone).
pub fn remove_recorded(file: &Path) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    let created: Vec<PathBuf> = text
        .lines()
        .map(PathBuf::from)
        .filter(|dir| dir.starts_with(CGROUP_ROOT) && dir.components().count() > 4)
        .collect();
    // The deepest ones held the processes (just killed: retried briefly);
    // a parent still holding another pod is left.
    let depth = created.iter().map(|dir| dir.components().count()).max();
    let leaves = created
        .iter()
        .filter(|dir| Some(dir.components().count()) == depth)
        .cloned()
        .collect();
    HostCgroup { leaves, created }.remove();
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and
/// joining it fails with ENOSPC: give it its parent's.
fn inherit_cpuset(dir: &Path) -> std::io::Result<()> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let Ok(current) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        if current.trim().is_empty() {
            let inherited = std::fs::read_to_string(parent.join(file))?;
            if !inherited.trim().is_empty() {
                std::fs::write(dir.join(file), inherited.trim())?;
            }
        }
    }
    Ok(())
}

/// Writes "0" (the calling process) into each file. For `pre_exec`: only
/// open/write/close, which are async-signal-safe.
pub fn join_in_child(procs_files: &[CString]) -> std::io::Result<()> {
    for file in procs_files {
        // SAFETY: a valid NUL-terminated path and constant flags.
        let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: writes one byte from a static buffer to the fd we opened.
        let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
        let error = std::io::Error::last_os_error();
        // SAFETY: closes the fd this function opened, once.
        unsafe { libc::close(fd) };
        if written < 0 {
            return Err(error);
        }
    }
    Ok(())
}

/// `cgroups_path` as a path below a hierarchy root: absolute, no `..`.
fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let path = Path::new(cgroups_path);
    if !path.is_absolute() || cgroups_path.contains(':') {
        return Err(CgroupError::Unsupported(cgroups_path.to_owned()));
    }
    let mut relative = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir => {}
            Component::Normal(part) => relative.push(part),
            _ => return Err(CgroupError::Unsupported(cgroups_path.to_owned())),
        }
    }
    if relative.as_os_str().is_empty() {
        return Err(CgroupError::Unsupported(cgroups_path.to_owned()));
    }
    Ok(relative)
}

/// The mount points of the host's cgroup hierarchies: the v2 root, or
/// each v1 hierarchy (named ones included).
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_v1_mounts(&mountinfo)
}

fn parse_v1_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fstype = after.split_whitespace().next()?;
            let point = before.split_whitespace().nth(4)?;
            (fstype == "cgroup").then(|| PathBuf::from(point))
        })
        .collect();
    points.sort();
    points.dedup();
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_cgroupfs_paths_are_taken() {
        assert_eq!(
            relative_path("/kubepods/pod1/abc").unwrap(),
            PathBuf::from("kubepods/pod1/abc")
        );
        for bad in ["kubepods/x", "system.slice:cri:abc", "/a/../../etc", "/"] {
            assert!(relative_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v1_hierarchies_come_from_mountinfo() {
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
33 25 0:29 / /proc rw - proc proc rw";
        assert_eq!(
            parse_v1_mounts(mountinfo),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
    }

    /// Root on this host: a real cgroup, a child moved into it, removed.
    #[test]
    fn a_child_joins_the_cgroup_and_it_is_removed() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root to create cgroups");
            return;
        }
        let path = format!("/microvm-shim-test-{}/pod/leaf", std::process::id());
        let cgroup = HostCgroup::create(&path).unwrap();
        assert!(!cgroup.leaves.is_empty());
        let files = cgroup.procs_files();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        use std::os::unix::process::CommandExt;
        // SAFETY: join_in_child only opens, writes and closes files.
        unsafe {
            command.pre_exec(move || join_in_child(&files));
        }
        let mut child = command.spawn().unwrap();
        let procs = std::fs::read_to_string(cgroup.leaves[0].join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|line| line == child.id().to_string()),
            "{procs}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // What a jailed VMM whose supervisor was killed leaves: its own
        // cgroup below the pod's.
        for leaf in &cgroup.leaves {
            std::fs::create_dir_all(leaf.join("root/nested")).unwrap();
        }
        let record = std::env::temp_dir().join(format!("microvm-cgroups-{}", std::process::id()));
        cgroup.record(&record);
        remove_recorded(&record);
        let _ = std::fs::remove_file(&record);
        for leaf in &cgroup.leaves {
            assert!(!leaf.exists(), "{}", leaf.display());
            let top = leaf.parent().and_then(Path::parent).unwrap();
            assert!(!top.exists(), "{}", top.display());
        }
    }
}
