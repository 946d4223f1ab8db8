//! A cgroup on the host, on cgroup v1 (one directory per mounted
//! hierarchy) or v2 (one directory in the unified tree), from a cgroupfs
//! path (`/kubepods/pod<uid>/<id>`) or a systemd-driver path
//! (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, which names
//! `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`).
//!
//! With a systemd path the directories are made at the place systemd would
//! give the scope; no unit is registered with systemd (there is no D-Bus
//! client here). That is what kubelet's accounting and containerd's
//! PodSandboxStats read.
//!
//! cgroup v2 puts two rules on a tree, and [`Cgroup`] follows both:
//! a controller can be used in a cgroup only if its parent lists it in
//! `cgroup.subtree_control` (so it is enabled on every level from the root
//! down), and a cgroup that enables controllers for its children holds no
//! processes itself (so processes go into leaves, see [`Cgroup::child`]).

use crate::mountinfo::{self, MountinfoError};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a cgroup whose last process just exited may stay busy.
const BUSY_RETRIES: u32 = 50;
const BUSY_WAIT: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("cannot find the host's cgroup hierarchies")]
    Hierarchies(#[source] MountinfoError),
    #[error("no cgroup hierarchy is mounted under {CGROUP_ROOT}")]
    NoHierarchy,
    #[error("cannot create cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enable the {controller} controller for the children of {path}{hint}")]
    Enable {
        path: PathBuf,
        controller: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no {controller} controller on this host (needed for {file})")]
    NoController { controller: String, file: String },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
}

/// The OCI spec's `linux.cgroupsPath`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupsPath {
    /// An absolute cgroupfs path, relative to each hierarchy's root.
    Cgroupfs(PathBuf),
    /// `slice:prefix:name`, the systemd cgroup driver's form.
    Systemd {
        slice: String,
        prefix: String,
        name: String,
    },
}

impl CgroupsPath {
    pub fn parse(text: &str) -> Result<Self, CgroupError> {
        let bad = |why| CgroupError::BadPath {
            path: text.to_owned(),
            why,
        };
        if text.contains(':') {
            let mut parts = text.split(':');
            let (Some(slice), Some(prefix), Some(name), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad("a systemd path is slice:prefix:name"));
            };
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            expand_slice(slice).map_err(bad)?;
            for part in [prefix, name] {
                if !is_unit_word(part) {
                    return Err(bad(
                        "the prefix and name are letters, digits, '-', '_' and '.'",
                    ));
                }
            }
            if name.is_empty() {
                return Err(bad("a systemd path needs a name"));
            }
            return Ok(Self::Systemd {
                slice: slice.to_owned(),
                prefix: prefix.to_owned(),
                name: name.to_owned(),
            });
        }
        let path = Path::new(text);
        if !path.is_absolute() {
            return Err(bad("a cgroupfs path is absolute"));
        }
        let mut relative = PathBuf::new();
        for component in path.components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => relative.push(part),
                _ => return Err(bad("a cgroupfs path has no '.' or '..'")),
            }
        }
        if relative.as_os_str().is_empty() {
            return Err(bad("the root cgroup is not a pod's"));
        }
        Ok(Self::Cgroupfs(relative))
    }

    /// The path below each hierarchy's root.
    pub fn relative(&self) -> PathBuf {
        match self {
            Self::Cgroupfs(relative) => relative.clone(),
            Self::Systemd {
                slice,
                prefix,
                name,
            } => {
                // Checked by parse.
                let mut path = expand_slice(slice).unwrap_or_default();
                let unit = if prefix.is_empty() {
                    format!("{name}.scope")
                } else {
                    format!("{prefix}-{name}.scope")
                };
                path.push(unit);
                path
            }
        }
    }
}

fn is_unit_word(word: &str) -> bool {
    word.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !word.starts_with('.')
}

/// `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice` (systemd.slice(5));
/// `-.slice` is the root.
pub fn expand_slice(slice: &str) -> Result<PathBuf, &'static str> {
    let name = slice
        .strip_suffix(".slice")
        .ok_or("a systemd slice ends in .slice")?;
    if name == "-" {
        return Ok(PathBuf::new());
    }
    if name.is_empty()
        || name.starts_with('-')
        || name.ends_with('-')
        || name.contains("--")
        || !is_unit_word(name)
    {
        return Err("a slice name is words joined by single '-'");
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for word in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(word);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// The host's cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchies {
    /// The unified tree's root.
    V2(PathBuf),
    /// Each v1 hierarchy's mount point and controllers (a named one, such
    /// as `name=systemd`, has none).
    V1(Vec<(PathBuf, Vec<String>)>),
}

impl Hierarchies {
    /// The hierarchies mounted under [`CGROUP_ROOT`].
    pub fn detect() -> Result<Self, CgroupError> {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return Ok(Self::V2(root.to_path_buf()));
        }
        let mounts = mountinfo::mounts().map_err(CgroupError::Hierarchies)?;
        let mut v1: Vec<(PathBuf, Vec<String>)> = mounts
            .into_iter()
            .filter(|mount| mount.fs_type == "cgroup" && mount.mount_point.starts_with(root))
            .map(|mount| {
                let controllers = mount
                    .super_options
                    .split(',')
                    .filter(|option| !matches!(*option, "rw" | "ro") && !option.contains('='))
                    .map(str::to_owned)
                    .collect();
                (mount.mount_point, controllers)
            })
            .collect();
        v1.sort();
        v1.dedup_by(|a, b| a.0 == b.0);
        if v1.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(Self::V1(v1))
    }

    pub fn is_v2(&self) -> bool {
        matches!(self, Self::V2(_))
    }

    /// The roots the cgroup gets a directory under.
    fn roots(&self) -> Vec<&Path> {
        match self {
            Self::V2(root) => vec![root.as_path()],
            Self::V1(all) => all.iter().map(|(point, _)| point.as_path()).collect(),
        }
    }
}

/// One cgroup: its directory in each hierarchy, and the directories this
/// process made for it (removed again by [`Cgroup::remove`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    hierarchies: Hierarchies,
    relative: PathBuf,
    dirs: Vec<PathBuf>,
    created: Vec<PathBuf>,
}

fn create_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    }
}

impl Cgroup {
    /// Makes `relative` in every hierarchy, with `controllers` usable in it
    /// (on v2: enabled on every level above it; those the host lacks are
    /// left out, and a later [`Cgroup::set`] of theirs fails by name).
    pub fn create(
        hierarchies: &Hierarchies,
        relative: &Path,
        controllers: &[&str],
    ) -> Result<Self, CgroupError> {
        let mut cgroup = Self {
            hierarchies: hierarchies.clone(),
            relative: relative.to_path_buf(),
            dirs: Vec::new(),
            created: Vec::new(),
        };
        if let Err(err) = cgroup.make(controllers) {
            cgroup.remove();
            return Err(err);
        }
        Ok(cgroup)
    }

    fn make(&mut self, controllers: &[&str]) -> Result<(), CgroupError> {
        for root in self.hierarchies.roots() {
            let root = root.to_path_buf();
            let mut dir = root.clone();
            for part in self.relative.components() {
                if self.hierarchies.is_v2() {
                    enable_for_children(&dir, controllers)?;
                }
                dir.push(part);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {
                        self.created.push(dir.clone());
                        if !self.hierarchies.is_v2() {
                            inherit_v1_cpuset(&dir).map_err(create_err(&dir))?;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(create_err(&dir)(err)),
                }
            }
            self.dirs.push(dir);
        }
        Ok(())
    }

    /// The cgroup `name` below this one, for processes (on v2 this one then
    /// holds none itself, and enables `controllers` for its children).
    pub fn child(&self, name: &str, controllers: &[&str]) -> Result<Self, CgroupError> {
        if !is_unit_word(name) || name.is_empty() {
            return Err(CgroupError::BadPath {
                path: name.to_owned(),
                why: "a child cgroup is one plain name",
            });
        }
        Self::create(&self.hierarchies, &self.relative.join(name), controllers)
    }

    /// The path below each hierarchy's root.
    pub fn relative(&self) -> &Path {
        &self.relative
    }

    /// Its directory in each hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    pub fn hierarchies(&self) -> &Hierarchies {
        &self.hierarchies
    }

    /// Writes `value` to the interface file `file` (`memory.max`,
    /// `pids.max`, ...). On v1 it goes to the hierarchy of the file's
    /// controller; v1 names used by older callers are mapped on v2.
    pub fn set(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let controller = file.split('.').next().unwrap_or_default();
        let (dir, file) = match &self.hierarchies {
            Hierarchies::V2(_) => {
                let file = match file {
                    "memory.limit_in_bytes" => "memory.max",
                    other => other,
                };
                (self.dirs.first(), file.to_owned())
            }
            Hierarchies::V1(all) => {
                let file = match file {
                    "memory.max" => "memory.limit_in_bytes",
                    other => other,
                };
                let index = all
                    .iter()
                    .position(|(_, controllers)| controllers.iter().any(|c| c == controller));
                (index.and_then(|i| self.dirs.get(i)), file.to_owned())
            }
        };
        let dir = dir.ok_or_else(|| CgroupError::NoController {
            controller: controller.to_owned(),
            file: file.clone(),
        })?;
        let path = dir.join(&file);
        if !path.exists() {
            return Err(CgroupError::NoController {
                controller: controller.to_owned(),
                file,
            });
        }
        std::fs::write(&path, value).map_err(|source| CgroupError::Write {
            path,
            value: value.to_owned(),
            source,
        })
    }

    /// The `cgroup.procs` files a child process writes itself into,
    /// prepared before fork (no allocation in the child).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|dir| CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Moves the calling process here.
    pub fn join(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let procs = dir.join("cgroup.procs");
            std::fs::write(&procs, "0").map_err(|source| CgroupError::Write {
                path: procs,
                value: "0".into(),
                source,
            })?;
        }
        Ok(())
    }

    /// The directories this process made, one per line, for
    /// [`remove_recorded`] after a crash.
    pub fn record(&self) -> String {
        self.created
            .iter()
            .map(|dir| format!("{}\n", dir.display()))
            .collect()
    }

    /// Removes what [`Cgroup::create`] made, cgroups made below it by
    /// others (a jail's own) included, once their processes are gone.
    /// Best effort: what stays busy is logged and left.
    pub fn remove(&self) {
        for dir in &self.dirs {
            if self.created.contains(dir) {
                remove_below(dir);
            }
        }
        remove_dirs(&self.created, &self.dirs);
    }
}

/// Enables `controllers` (those `dir` offers) for the children of `dir`.
fn enable_for_children(dir: &Path, controllers: &[&str]) -> Result<(), CgroupError> {
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in controllers {
        let offered = available.split_whitespace().any(|c| c == *controller);
        let on = enabled.split_whitespace().any(|c| c == *controller);
        if !offered || on {
            continue;
        }
        let control = dir.join("cgroup.subtree_control");
        std::fs::write(&control, format!("+{controller}")).map_err(|source| {
            let busy = source.raw_os_error() == Some(libc::EBUSY);
            CgroupError::Enable {
                path: dir.to_path_buf(),
                controller: (*controller).to_owned(),
                hint: if busy {
                    " (it holds processes: cgroup v2 enables controllers for children only in a cgroup without processes)"
                } else {
                    ""
                },
                source,
            }
        })?;
    }
    Ok(())
}

/// A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and
/// joining it fails with ENOSPC: give it its parent's.
fn inherit_v1_cpuset(dir: &Path) -> std::io::Result<()> {
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

/// rmdir, retried while the kernel still counts a just-exited process.
fn remove_dir_retrying(dir: &Path, retry_busy: bool) {
    for attempt in 0..=BUSY_RETRIES {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err)
                if err.raw_os_error() == Some(libc::EBUSY)
                    && retry_busy
                    && attempt < BUSY_RETRIES =>
            {
                std::thread::sleep(BUSY_WAIT);
            }
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && !retry_busy => {
                tracing::debug!("cgroup {} is still in use; left", dir.display());
                return;
            }
            Err(err) => {
                tracing::warn!("cannot remove cgroup {}: {err}", dir.display());
                return;
            }
        }
    }
}

/// Removes every cgroup below `dir`, deepest first (a cgroup directory
/// holds only interface files, which rmdir does not mind).
fn remove_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            let child = entry.path();
            remove_below(&child);
            remove_dir_retrying(&child, true);
        }
    }
}

/// Removes `created`, deepest first across hierarchies. The `leaves` held
/// processes and are retried while busy; a parent still busy holds another
/// pod's cgroup and is left to its owner.
fn remove_dirs(created: &[PathBuf], leaves: &[PathBuf]) {
    let mut created = created.to_vec();
    created.sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
    for dir in created {
        remove_dir_retrying(&dir, leaves.contains(&dir));
    }
}

/// Removes the cgroups a crashed process recorded with [`Cgroup::record`]:
/// only directories below [`CGROUP_ROOT`], with no `..`, and what was made
/// below them.
pub fn remove_recorded(record: &str) {
    let created: Vec<PathBuf> = record
        .lines()
        .map(PathBuf::from)
        .filter(|dir| {
            dir.starts_with(CGROUP_ROOT)
                && dir.components().count() > 4
                && dir.components().all(|c| !matches!(c, Component::ParentDir))
        })
        .collect();
    let depth = created.iter().map(|dir| dir.components().count()).max();
    let leaves: Vec<PathBuf> = created
        .iter()
        .filter(|dir| Some(dir.components().count()) == depth)
        .cloned()
        .collect();
    for leaf in &leaves {
        remove_below(leaf);
    }
    remove_dirs(&created, &leaves);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_absolute_and_plain() {
        assert_eq!(
            CgroupsPath::parse("/kubepods/pod1/abc").unwrap().relative(),
            PathBuf::from("kubepods/pod1/abc")
        );
        for bad in ["kubepods/x", "/a/../../etc", "/", "/.."] {
            assert!(CgroupsPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn systemd_paths_expand_like_systemd() {
        let path =
            CgroupsPath::parse("kubepods-besteffort-pod1a2b.slice:cri-containerd:f00d").unwrap();
        assert_eq!(
            path.relative(),
            PathBuf::from(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/cri-containerd-f00d.scope"
            )
        );
        assert_eq!(
            CgroupsPath::parse(":cri:x").unwrap().relative(),
            PathBuf::from("system.slice/cri-x.scope")
        );
        assert_eq!(
            CgroupsPath::parse("-.slice::x").unwrap().relative(),
            PathBuf::from("x.scope")
        );
        for bad in [
            "kubepods.slice:a:b:c",
            "kubepods:cri:x",
            "a--b.slice:cri:x",
            "../x.slice:cri:x",
            "a.slice:cri/../..:x",
            "a.slice:cri:",
            "a.slice:cri:..",
        ] {
            assert!(CgroupsPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v2_names_map_to_v1_and_back() {
        // A fake v2 tree: interface files are plain files here.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "memory pids").unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let hierarchies = Hierarchies::V2(root.path().to_path_buf());
        let cgroup = Cgroup::create(&hierarchies, Path::new("pod/vmm"), &["memory"]).unwrap();
        std::fs::write(cgroup.dirs()[0].join("memory.max"), "").unwrap();
        cgroup.set("memory.limit_in_bytes", "1024").unwrap();
        assert_eq!(
            std::fs::read_to_string(cgroup.dirs()[0].join("memory.max")).unwrap(),
            "1024"
        );
        let err = cgroup.set("pids.max", "10").unwrap_err();
        assert!(matches!(err, CgroupError::NoController { .. }), "{err}");
        assert_eq!(
            cgroup.record(),
            format!(
                "{}\n{}\n",
                root.path().join("pod").display(),
                root.path().join("pod/vmm").display()
            )
        );
    }

    /// The host's own cgroups (v1 here, v2 in the KVM harness): a pod
    /// cgroup with a child process leaf, limits, and nothing left.
    #[test]
    fn a_child_joins_a_leaf_and_everything_is_removed() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to create cgroups");
            return;
        }
        let hierarchies = Hierarchies::detect().unwrap();
        let relative = PathBuf::from(format!("microvm-host-test-{}/pod", std::process::id()));
        let pod = Cgroup::create(&hierarchies, &relative, &["memory", "pids"]).unwrap();
        let leaf = pod.child("vmm", &["memory", "pids"]).unwrap();
        leaf.set("memory.max", "268435456").unwrap();
        leaf.set("pids.max", "20").unwrap();
        let files = leaf.procs_files();
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        use std::os::unix::process::CommandExt;
        // SAFETY: join_in_child only opens, writes and closes files.
        unsafe {
            command.pre_exec(move || join_in_child(&files));
        }
        let mut child = command.spawn().unwrap();
        let procs = std::fs::read_to_string(leaf.dirs()[0].join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == child.id().to_string()),
            "{procs}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        // A crash cleanup from the record alone removes both.
        let record = format!("{}{}", pod.record(), leaf.record());
        remove_recorded(&record);
        for dir in pod.dirs() {
            assert!(!dir.exists(), "{}", dir.display());
            assert!(!dir.parent().unwrap().exists());
        }
    }
}
