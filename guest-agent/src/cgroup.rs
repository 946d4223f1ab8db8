//! cgroup v2: one directory per container under the agent's cgroup root,
//! its limits from the spec's LinuxResources, its statistics, and its
//! removal. Plain file writes; hand-written because the cgroups crates
//! either fix the root at /sys/fs/cgroup or bring a whole runtime.

use crate::device_filter::{self, DeviceFilterError};
use crate::lock::lock;
use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxPids, LinuxResources};
use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup root {0} is not a cgroup v2 directory (no cgroup.controllers)")]
    NotCgroup2(PathBuf),
    #[error("cgroups path {0:?} must be relative to the cgroup root, without \"..\"")]
    BadPath(String),
    #[error("cgroup {0} already exists")]
    Exists(PathBuf),
    #[error("the {controller} controller is not available under {root} (needed for {setting})")]
    ControllerMissing {
        controller: &'static str,
        root: PathBuf,
        setting: String,
    },
    #[error("{setting}: {reason}")]
    BadValue { setting: String, reason: String },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} still has processes after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
    #[error(transparent)]
    Devices(#[from] DeviceFilterError),
}

impl CgroupError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::BadPath(_)
            | Self::BadValue { .. }
            | Self::Devices(DeviceFilterError::BadRule { .. }) => tonic::Code::InvalidArgument,
            Self::Exists(_) => tonic::Code::AlreadyExists,
            Self::ControllerMissing { .. } | Self::NotCgroup2(_) | Self::Busy { .. } => {
                tonic::Code::FailedPrecondition
            }
            Self::Io { .. } | Self::Devices(DeviceFilterError::Bpf { .. }) => tonic::Code::Internal,
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The controllers the agent enables for containers, when available.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// The agent's cgroup root (in the VM, /sys/fs/cgroup).
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    root: PathBuf,
    /// Serialises directory creation and removal, so one container's
    /// cleanup cannot remove a parent another is being created in.
    tree: Arc<Mutex<()>>,
}

impl CgroupRoot {
    pub fn open(root: &Path) -> Result<Self, CgroupError> {
        if !root.join("cgroup.controllers").is_file() {
            return Err(CgroupError::NotCgroup2(root.to_path_buf()));
        }
        Ok(Self {
            root: root.to_path_buf(),
            tree: Arc::new(Mutex::new(())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Where the container's cgroup goes: the spec's cgroupsPath when it is
    /// a plain path (systemd "slice:prefix:name" forms are not), else
    /// `microvm/<container id>`.
    pub fn container_dir(
        &self,
        cgroups_path: Option<&Path>,
        container_id: &str,
    ) -> Result<PathBuf, CgroupError> {
        let relative = match cgroups_path {
            Some(path) if !path.as_os_str().is_empty() && !path.to_string_lossy().contains(':') => {
                let mut clean = PathBuf::new();
                for component in path.components() {
                    match component {
                        Component::RootDir | Component::CurDir => {}
                        Component::Normal(part) => clean.push(part),
                        Component::ParentDir | Component::Prefix(_) => {
                            return Err(CgroupError::BadPath(path.display().to_string()))
                        }
                    }
                }
                if clean.as_os_str().is_empty() {
                    return Err(CgroupError::BadPath(path.display().to_string()));
                }
                clean
            }
            _ => Path::new("microvm").join(container_id),
        };
        Ok(self.root.join(relative))
    }

    fn available(&self, dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Creates `dir` (and missing parents), enabling the controllers for
    /// each new level, then applies `resources`.
    pub fn create(
        &self,
        dir: &Path,
        resources: Option<&LinuxResources>,
    ) -> Result<ContainerCgroup, CgroupError> {
        if dir.exists() {
            return Err(CgroupError::Exists(dir.to_path_buf()));
        }
        let relative = dir
            .strip_prefix(&self.root)
            .map_err(|_| CgroupError::BadPath(dir.display().to_string()))?;
        let mut current = self.root.clone();
        let tree = lock(&self.tree);
        let result = (|| {
            for component in relative.components() {
                self.enable_controllers(&current)?;
                current.push(component);
                match std::fs::create_dir(&current) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(err) => return Err(io_error("create", &current)(err)),
                }
            }
            Ok(())
        })();
        drop(tree);
        let cgroup = ContainerCgroup {
            dir: dir.to_path_buf(),
            root: self.root.clone(),
            tree: Arc::clone(&self.tree),
        };
        if let Err(err) = result {
            let _ = cgroup.remove_dirs();
            return Err(err);
        }
        if let Some(resources) = resources {
            if let Err(err) = cgroup.apply(resources) {
                let _ = cgroup.remove_dirs();
                return Err(err);
            }
        }
        Ok(cgroup)
    }

    fn enable_controllers(&self, dir: &Path) -> Result<(), CgroupError> {
        let available = self.available(dir);
        let enabled =
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        let wanted: Vec<String> = CONTROLLERS
            .iter()
            .filter(|name| available.iter().any(|a| a == *name))
            .filter(|name| !enabled.split_whitespace().any(|e| e == **name))
            .map(|name| format!("+{name}"))
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let path = dir.join("cgroup.subtree_control");
        std::fs::write(&path, wanted.join(" ")).map_err(io_error("enable controllers in", &path))
    }
}

/// One container's cgroup directory.
#[derive(Debug)]
pub struct ContainerCgroup {
    dir: PathBuf,
    root: PathBuf,
    tree: Arc<Mutex<()>>,
}

/// runc's conversion of cgroup v1 cpu.shares (2-262144) to cpu.weight.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// runc's conversion of blkio weight (10-1000) to io.weight.
pub fn blkio_weight_to_io_weight(weight: u16) -> u64 {
    let weight = u64::from(weight.clamp(10, 1000));
    1 + (weight - 10) * 9999 / 990
}

fn limit_text(value: i64) -> String {
    if value < 0 {
        "max".to_owned()
    } else {
        value.to_string()
    }
}

impl ContainerCgroup {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, file: &str, value: &str, controller: &'static str) -> Result<(), CgroupError> {
        let path = self.dir.join(file);
        if !path.exists() {
            return Err(CgroupError::ControllerMissing {
                controller,
                root: self.root.clone(),
                setting: file.to_owned(),
            });
        }
        std::fs::write(&path, value).map_err(|source| CgroupError::Io {
            action: "write",
            path,
            source,
        })
    }

    /// Writes the limits in `resources` (cgroup v2 files) and attaches the
    /// device program for its device rules, if it has any.
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        if let Some(rules) = resources.devices().as_deref().filter(|r| !r.is_empty()) {
            let mut rules = device_filter::rules_from_spec(rules)?;
            rules.extend(device_filter::DEFAULT_ALLOWED);
            device_filter::attach(&self.dir, &rules)?;
        }
        if let Some(memory) = resources.memory() {
            self.apply_memory(memory)?;
        }
        if let Some(cpu) = resources.cpu() {
            self.apply_cpu(cpu)?;
        }
        if let Some(pids) = resources.pids() {
            self.apply_pids(pids)?;
        }
        if let Some(block_io) = resources.block_io() {
            self.apply_block_io(block_io)?;
        }
        for hugepage in resources.hugepage_limits().as_deref().unwrap_or_default() {
            self.write(
                &format!("hugetlb.{}.max", hugepage.page_size()),
                &hugepage.limit().to_string(),
                "hugetlb",
            )?;
        }
        let mut unified: Vec<(&String, &String)> = resources
            .unified()
            .as_ref()
            .map(|map| map.iter().collect())
            .unwrap_or_default();
        unified.sort();
        for (key, value) in unified {
            if key.contains('/') || key.starts_with('.') || key.starts_with("cgroup.") {
                return Err(CgroupError::BadValue {
                    setting: format!("unified {key:?}"),
                    reason: "not a controller file name".into(),
                });
            }
            self.write(key, value, "unified")?;
        }
        Ok(())
    }

    /// memory.max, memory.low and memory.swap.max.
    fn apply_memory(&self, memory: &LinuxMemory) -> Result<(), CgroupError> {
        if let Some(limit) = memory.limit() {
            self.write("memory.max", &limit_text(limit), "memory")?;
        }
        if let Some(reservation) = memory.reservation() {
            self.write("memory.low", &limit_text(reservation), "memory")?;
        }
        if let Some(swap) = memory.swap() {
            // OCI swap is memory+swap; v2 swap.max is swap alone.
            let value = match (swap, memory.limit()) {
                (swap, _) if swap < 0 => "max".to_owned(),
                (swap, Some(limit)) if limit >= 0 => swap.saturating_sub(limit).max(0).to_string(),
                (swap, _) => swap.to_string(),
            };
            // A kernel without swap has no memory.swap.max; asking for
            // no swap (or unlimited) is then already true.
            let no_swap_file = !self.dir.join("memory.swap.max").exists();
            if !(no_swap_file && (value == "0" || value == "max")) {
                self.write("memory.swap.max", &value, "memory")?;
            }
        }
        Ok(())
    }

    /// cpu.weight, cpu.max, cpu.idle and the cpuset.
    fn apply_cpu(&self, cpu: &LinuxCpu) -> Result<(), CgroupError> {
        if let Some(shares) = cpu.shares() {
            let weight = shares_to_weight(shares);
            if weight > 0 {
                self.write("cpu.weight", &weight.to_string(), "cpu")?;
            }
        }
        if cpu.quota().is_some() || cpu.period().is_some() {
            let quota = cpu.quota().map_or("max".to_owned(), limit_text);
            let period = cpu.period().unwrap_or(100_000);
            self.write("cpu.max", &format!("{quota} {period}"), "cpu")?;
        }
        if let Some(idle) = cpu.idle() {
            self.write("cpu.idle", &idle.to_string(), "cpu")?;
        }
        if let Some(cpus) = cpu.cpus().as_deref().filter(|cpus| !cpus.is_empty()) {
            self.write("cpuset.cpus", cpus, "cpuset")?;
        }
        if let Some(mems) = cpu.mems().as_deref().filter(|mems| !mems.is_empty()) {
            self.write("cpuset.mems", mems, "cpuset")?;
        }
        Ok(())
    }

    fn apply_pids(&self, pids: &LinuxPids) -> Result<(), CgroupError> {
        let limit = pids.limit();
        let value = if limit <= 0 {
            "max".to_owned()
        } else {
            limit.to_string()
        };
        self.write("pids.max", &value, "pids")?;
        Ok(())
    }

    /// io.weight and the io.max throttles.
    fn apply_block_io(&self, block_io: &LinuxBlockIo) -> Result<(), CgroupError> {
        if let Some(weight) = block_io.weight() {
            self.write(
                "io.weight",
                &format!("default {}", blkio_weight_to_io_weight(weight)),
                "io",
            )?;
        }
        let throttles = [
            ("rbps", block_io.throttle_read_bps_device()),
            ("wbps", block_io.throttle_write_bps_device()),
            ("riops", block_io.throttle_read_iops_device()),
            ("wiops", block_io.throttle_write_iops_device()),
        ];
        for (key, devices) in throttles {
            for device in devices.as_deref().unwrap_or_default() {
                self.write(
                    "io.max",
                    &format!(
                        "{}:{} {key}={}",
                        device.major(),
                        device.minor(),
                        device.rate()
                    ),
                    "io",
                )?;
            }
        }
        Ok(())
    }

    fn read(&self, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(file)).ok()
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        let text = self.read(file)?;
        let text = text.trim();
        if text == "max" {
            Some(0)
        } else {
            text.parse().ok()
        }
    }

    /// "key value" lines (cpu.stat, memory.stat, memory.events).
    fn read_flat(&self, file: &str) -> Option<HashMap<String, u64>> {
        let text = self.read(file)?;
        Some(parse_flat_keyed(&text))
    }

    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.dir.join("cgroup.procs");
        let text = std::fs::read_to_string(&path).map_err(io_error("read", &path))?;
        Ok(text
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect())
    }

    /// memory.events "oom_kill", if the memory controller is on.
    pub fn oom_kills(&self) -> Option<u64> {
        self.read_flat("memory.events")?.get("oom_kill").copied()
    }

    pub fn memory_events_path(&self) -> PathBuf {
        self.dir.join("memory.events")
    }

    pub fn stats(&self) -> CgroupStats {
        let cpu = self.read_flat("cpu.stat").unwrap_or_default();
        let memory = self.read_u64("memory.current").map(|usage| {
            let events = self.read_flat("memory.events").unwrap_or_default();
            MemoryStats {
                usage,
                limit: self.read_u64("memory.max").unwrap_or(0),
                swap_usage: self.read_u64("memory.swap.current").unwrap_or(0),
                oom: events.get("oom").copied().unwrap_or(0),
                oom_kill: events.get("oom_kill").copied().unwrap_or(0),
                stat: self.read_flat("memory.stat").unwrap_or_default(),
            }
        });
        let pids = self.read_u64("pids.current").map(|current| PidsStats {
            current,
            limit: self.read_u64("pids.max").unwrap_or(0),
        });
        let io = self
            .read("io.stat")
            .map(|text| parse_io_stat(&text))
            .unwrap_or_default();
        CgroupStats {
            cpu: CpuStats {
                usage_usec: cpu.get("usage_usec").copied().unwrap_or(0),
                user_usec: cpu.get("user_usec").copied().unwrap_or(0),
                system_usec: cpu.get("system_usec").copied().unwrap_or(0),
                nr_periods: cpu.get("nr_periods").copied().unwrap_or(0),
                nr_throttled: cpu.get("nr_throttled").copied().unwrap_or(0),
                throttled_usec: cpu.get("throttled_usec").copied().unwrap_or(0),
            },
            memory,
            pids,
            io,
        }
    }

    fn populated(&self) -> bool {
        self.read_flat("cgroup.events")
            .and_then(|events| events.get("populated").copied())
            .is_some_and(|populated| populated != 0)
    }

    /// SIGKILL to every process in the cgroup: cgroup.kill where the kernel
    /// has it (5.14), else each pid in cgroup.procs.
    pub fn kill_all(&self) {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.pids().unwrap_or_default() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill takes integers; these pids are in our cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Kills what is left, waits until the cgroup is empty, and removes the
    /// directories its creation made.
    pub async fn destroy(&self, timeout: Duration) -> Result<(), CgroupError> {
        let started = std::time::Instant::now();
        let mut killed = false;
        while self.populated() {
            if !killed {
                self.kill_all();
                killed = true;
            }
            if started.elapsed() > timeout {
                return Err(CgroupError::Busy {
                    path: self.dir.clone(),
                    waited: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.remove_dirs()
    }

    /// Removes the container's directory, then every parent below the
    /// root that is left empty (the agent owns the whole tree in the VM).
    fn remove_dirs(&self) -> Result<(), CgroupError> {
        let _tree = lock(&self.tree);
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CgroupError::Io {
                    action: "remove",
                    path: self.dir.clone(),
                    source,
                })
            }
        }
        let mut parent = self.dir.parent();
        while let Some(dir) = parent {
            // EBUSY: another container's cgroup is still in there.
            if dir == self.root || !dir.starts_with(&self.root) || std::fs::remove_dir(dir).is_err()
            {
                break;
            }
            parent = dir.parent();
        }
        Ok(())
    }
}

pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn parse_io_stat(text: &str) -> Vec<IoStats> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (major, minor) = words.next()?.split_once(':')?;
            let mut stats = IoStats {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                ..IoStats::default()
            };
            for word in words {
                let Some((key, value)) = word.split_once('=') else {
                    continue;
                };
                let value: u64 = value.parse().unwrap_or(0);
                match key {
                    "rbytes" => stats.read_bytes = value,
                    "wbytes" => stats.write_bytes = value,
                    "rios" => stats.read_ios = value,
                    "wios" => stats.write_ios = value,
                    _ => {}
                }
            }
            Some(stats)
        })
        .collect()
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CpuStats {
    pub usage_usec: u64,
    pub user_usec: u64,
    pub system_usec: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_usec: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemoryStats {
    pub usage: u64,
    pub limit: u64,
    pub swap_usage: u64,
    pub oom: u64,
    pub oom_kill: u64,
    pub stat: HashMap<String, u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PidsStats {
    pub current: u64,
    pub limit: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IoStats {
    pub major: u32,
    pub minor: u32,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ios: u64,
    pub write_ios: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupStats {
    pub cpu: CpuStats,
    pub memory: Option<MemoryStats>,
    pub pids: Option<PidsStats>,
    pub io: Vec<IoStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory that looks like a cgroup v2 root with every controller.
    fn fake_root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn container_dir_follows_plain_cgroups_paths_only() {
        let root = fake_root();
        let cgroups = CgroupRoot::open(root.path()).unwrap();
        assert_eq!(
            cgroups
                .container_dir(Some(Path::new("/kubepods/pod1/c1")), "c1")
                .unwrap(),
            root.path().join("kubepods/pod1/c1")
        );
        assert_eq!(
            cgroups
                .container_dir(Some(Path::new("system.slice:cri:c1")), "c1")
                .unwrap(),
            root.path().join("microvm/c1")
        );
        assert_eq!(
            cgroups.container_dir(None, "c2").unwrap(),
            root.path().join("microvm/c2")
        );
        assert!(cgroups
            .container_dir(Some(Path::new("/a/../../etc")), "c1")
            .is_err());
    }

    #[tokio::test]
    async fn create_enables_controllers_and_removal_cleans_shared_parents() {
        let root = fake_root();
        let cgroups = CgroupRoot::open(root.path()).unwrap();
        let first_dir = cgroups.container_dir(None, "c1").unwrap();
        let second_dir = cgroups.container_dir(None, "c2").unwrap();
        let first = cgroups.create(&first_dir, None).unwrap();
        let second = cgroups.create(&second_dir, None).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +cpuset +io +memory +pids"
        );
        assert!(matches!(
            cgroups.create(&first_dir, None),
            Err(CgroupError::Exists(_))
        ));
        // (No cgroup.events in a fake tree: never populated.)
        first.destroy(Duration::from_secs(1)).await.unwrap();
        assert!(root.path().join("microvm").is_dir(), "still holds c2");
        second.destroy(Duration::from_secs(1)).await.unwrap();
        assert!(
            !root.path().join("microvm").exists(),
            "the shared parent went with the last"
        );
        assert!(root.path().is_dir());
    }

    #[test]
    fn apply_writes_v2_files_and_names_missing_controllers() {
        let root = fake_root();
        let dir = root.path().join("c");
        std::fs::create_dir(&dir).unwrap();
        for file in [
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.max",
            "cpu.weight",
        ] {
            std::fs::write(dir.join(file), "").unwrap();
        }
        let cgroup = ContainerCgroup {
            dir: dir.clone(),
            root: root.path().to_path_buf(),
            tree: Arc::default(),
        };
        let resources: LinuxResources = serde_json::from_value(serde_json::json!({
            "memory": {"limit": 33554432, "swap": 33554432},
            "cpu": {"shares": 1024, "quota": 50000, "period": 100000},
            "pids": {"limit": 20}
        }))
        .unwrap();
        cgroup.apply(&resources).unwrap();
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(read("memory.max"), "33554432");
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "20");
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("cpu.weight"), "39");

        let io: LinuxResources =
            serde_json::from_value(serde_json::json!({"blockIO": {"weight": 500}})).unwrap();
        let err = cgroup.apply(&io).unwrap_err();
        assert!(matches!(
            err,
            CgroupError::ControllerMissing {
                controller: "io",
                ..
            }
        ));
        assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);
    }

    #[test]
    fn conversions_match_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
    }

    #[test]
    fn stat_files_parse() {
        let flat = parse_flat_keyed("usage_usec 120\nuser_usec 100\nbad line\n");
        assert_eq!(flat.get("usage_usec"), Some(&120));
        assert_eq!(flat.len(), 2);
        let io = parse_io_stat("254:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n");
        assert_eq!(
            io,
            vec![IoStats {
                major: 254,
                minor: 0,
                read_bytes: 4096,
                write_bytes: 0,
                read_ios: 1,
                write_ios: 0
            }]
        );
    }
}
