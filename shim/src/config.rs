//! The shim's TOML config (`/etc/microvm/config.toml`, or the CRI runtime
//! option `ConfigPath`). Every table denies unknown keys, and every error
//! names the key (`vm.vcpus`), through `serde_path_to_error` for parse errors
//! and [`Config::validate`] for values serde accepts but the shim cannot use.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config is read from when the runtime options name none.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/microvm/config.toml";
/// Overrides [`DEFAULT_CONFIG_PATH`] (tests, hosts without /etc/microvm).
pub const CONFIG_PATH_ENV: &str = "MICROVM_SHIM_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read shim config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shim config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `microvm-vmm`, this repo's VMM.
    #[default]
    Builtin,
    /// `qemu-system-x86_64 -M microvm` with vhost-user vsock and fs.
    Qemu,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::Qemu => "qemu",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    #[default]
    Tcg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_filter(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

/// The whole file. Every table is optional; defaults are in the `Default`
/// impls and in `config/microvm.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub backend: BackendKind,
    pub log_level: LogLevel,
    pub vm: VmConfig,
    pub paths: PathsConfig,
    pub timeouts: TimeoutsConfig,
    pub qemu: QemuConfig,
    pub builtin: BuiltinConfig,
    pub annotations: AnnotationsConfig,
    pub network: NetworkConfig,
    /// microvm-ctl's debug console.
    pub console: ConsoleConfig,
}

/// `microvm-ctl console POD`: a shell in the pod's VM, outside every
/// container. A door into the guest: off unless this says otherwise, and no
/// pod annotation can turn it on (it is not an annotation key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    pub enabled: bool,
    /// A static shell binary (busybox-static's); microvm-ctl sends it to
    /// the agent, which runs it from memory.
    pub shell: PathBuf,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            shell: PathBuf::from("/bin/busybox"),
        }
    }
}

/// Which `io.microvm.config.<key>` pod annotations may override the config
/// (see [`crate::annotations`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnotationsConfig {
    pub allowed: Vec<String>,
}

impl Default for AnnotationsConfig {
    fn default() -> Self {
        Self {
            allowed: vec![
                "vm.vcpus".into(),
                "vm.memory_mib".into(),
                "vm.kernel_args".into(),
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// A pod that asks for the host's network (CRI `hostNetwork: true`: its
    /// sandbox has no network namespace) cannot share it from inside a VM.
    /// false: its Create fails and says so. true: it runs with loopback
    /// only.
    pub allow_host_network: bool,
    /// The tap device created in the pod's network namespace.
    pub tap_name: String,
    /// Caps on each pod's traffic, in bytes per second (0: none), from the
    /// guest's side. Applied on the host (tbf qdiscs on the tap and the
    /// veth), so they hold for both backends.
    pub guest_rx_bytes_per_second: u64,
    pub guest_tx_bytes_per_second: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            allow_host_network: false,
            tap_name: "tap0_microvm".into(),
            guest_rx_bytes_per_second: 0,
            guest_tx_bytes_per_second: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// Guest kernel (vmlinux with a PVH note, or bzImage). Empty: the cached
    /// guest image (`microvm-image all`).
    pub kernel: PathBuf,
    /// Empty: the cached release initramfs.
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Extra kernel command line words, after the image's own.
    pub kernel_args: String,
    /// Boot the guest with `microvm_debug_shell=1` (debug initramfs only).
    pub debug_console: bool,
    /// The largest VM a pod may get (annotations and CRI sizing included).
    /// 0: the host's CPU count.
    pub max_vcpus: u32,
    /// 0: the host's memory (MemTotal).
    pub max_memory_mib: u32,
}

impl VmConfig {
    /// `max_vcpus`, or the host's CPU count; never above [`MAX_VCPUS`].
    pub fn vcpu_limit(&self) -> u32 {
        let limit = if self.max_vcpus == 0 {
            std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(MAX_VCPUS))
                .unwrap_or(1)
        } else {
            self.max_vcpus
        };
        limit.min(MAX_VCPUS)
    }

    /// `max_memory_mib`, or the host's MemTotal.
    pub fn memory_limit_mib(&self) -> u32 {
        if self.max_memory_mib != 0 {
            return self.max_memory_mib;
        }
        host_memory_mib().unwrap_or(u32::MAX)
    }
}

fn host_memory_mib() -> Option<u32> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    u32::try_from(kib / 1024).ok()
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initramfs: PathBuf::new(),
            vcpus: 1,
            memory_mib: 256,
            kernel_args: String::new(),
            debug_console: false,
            max_vcpus: 0,
            max_memory_mib: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Per-pod runtime state (sockets, shared dir, pid files).
    pub state_dir: PathBuf,
    /// Per-pod guest console + agent log files.
    pub log_dir: PathBuf,
    /// A pod's log moves to `<log>.1` (one older file kept) once it passes
    /// this size, so a guest cannot fill the host's disk.
    pub log_max_mib: u32,
    pub virtiofsd: PathBuf,
}

impl Default for PathsConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/run/microvm"),
            log_dir: PathBuf::from("/var/log/microvm"),
            log_max_mib: 16,
            virtiofsd: PathBuf::from("virtiofsd"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// From VM launch until the agent prints its ready line.
    pub boot_seconds: f64,
    /// From the ready line until the agent answers its health check.
    pub agent_seconds: f64,
    /// The deadline of every agent call (Create, Start, Exec, Pids, ...);
    /// only the calls that wait by design are exempt (deadline.rs).
    pub call_seconds: f64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            boot_seconds: 60.0,
            agent_seconds: 10.0,
            call_seconds: crate::deadline::DEFAULT_CALL_TIMEOUT.as_secs_f64(),
        }
    }
}

impl TimeoutsConfig {
    pub fn boot(&self) -> Duration {
        Duration::from_secs_f64(self.boot_seconds)
    }

    pub fn agent(&self) -> Duration {
        Duration::from_secs_f64(self.agent_seconds)
    }

    pub fn call(&self) -> Duration {
        Duration::from_secs_f64(self.call_seconds)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub binary: PathBuf,
    pub accel: Accel,
    pub vhost_device_vsock: PathBuf,
    /// Confine each pod's QEMU with its own features: a seccomp filter
    /// (`-sandbox`), a chroot into an empty dir under the pod dir, and a
    /// drop to `jail_uid`/`jail_gid` once it has opened its files.
    /// Turning it off is this explicit flag.
    pub jail: bool,
    /// With the jail: the uid/gid QEMU drops to. Never 0.
    pub jail_uid: u32,
    pub jail_gid: u32,
}

/// The overflow uid/gid (`nobody`/`nogroup` on Debian): owns no file.
pub const NOBODY: u32 = 65534;

impl Default for QemuConfig {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            vhost_device_vsock: PathBuf::from("vhost-device-vsock"),
            jail: true,
            jail_uid: NOBODY,
            jail_gid: NOBODY,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuiltinConfig {
    pub vmm: PathBuf,
    /// Run each pod's VMM in microvm-vmm's jail (own mount and PID
    /// namespaces, a root holding only the VM's files, a cgroup, no
    /// inherited fds, empty environment). Turning it off is this explicit
    /// flag.
    pub jail: bool,
    /// With the jail: the uid/gid the VMM drops to; not 0 (refused, as for
    /// QEMU: a root VMM is what the jail is for). Every pod's VMM may share
    /// them: each is alone in its PID namespace, so it cannot signal
    /// another.
    pub jail_uid: u32,
    pub jail_gid: u32,
}

impl Default for BuiltinConfig {
    fn default() -> Self {
        Self {
            vmm: PathBuf::from("microvm-vmm"),
            jail: true,
            jail_uid: NOBODY,
            jail_gid: NOBODY,
        }
    }
}

impl BuiltinConfig {
    /// The uid and gid the jailed VMM drops to; `None` without the jail
    /// (or for a 0 that [`Config::validate`] refuses).
    pub fn jail_ids(&self) -> (Option<u32>, Option<u32>) {
        if !self.jail {
            return (None, None);
        }
        let id = |id: u32| (id != 0).then_some(id);
        (id(self.jail_uid), id(self.jail_gid))
    }
}

pub const MAX_VCPUS: u32 = 64;
/// Below this the guest kernel and agent do not come up.
pub const MIN_MEMORY_MIB: u32 = 64;

impl Config {
    /// Parses and validates `text`; `path` is only for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let key = err.path().to_string();
            // toml's message carries the line/column; keep its first line.
            let message = err.inner().message().to_owned();
            ConfigError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reads `path`; a missing default file gives the defaults, a missing
    /// file someone named is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let env_path = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let (path, named) = match (path, env_path) {
            (Some(path), _) => (path.to_path_buf(), true),
            (None, Some(path)) => (path, true),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(err) if !named && err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Values serde accepts but that cannot work.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_owned(),
            message,
        };
        if self.vm.vcpus == 0 || self.vm.vcpus > MAX_VCPUS {
            return Err(invalid(
                "vm.vcpus",
                format!("{} is not in 1..={MAX_VCPUS}", self.vm.vcpus),
            ));
        }
        if self.vm.memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "vm.memory_mib",
                format!(
                    "{} is below the minimum of {MIN_MEMORY_MIB}",
                    self.vm.memory_mib
                ),
            ));
        }
        if self.vm.max_vcpus > MAX_VCPUS {
            return Err(invalid(
                "vm.max_vcpus",
                format!("{} is above {MAX_VCPUS}", self.vm.max_vcpus),
            ));
        }
        if self.vm.max_memory_mib != 0 && self.vm.max_memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(
                "vm.max_memory_mib",
                format!(
                    "{} is below the minimum of {MIN_MEMORY_MIB}",
                    self.vm.max_memory_mib
                ),
            ));
        }
        for (key, seconds) in [
            ("timeouts.boot_seconds", self.timeouts.boot_seconds),
            ("timeouts.agent_seconds", self.timeouts.agent_seconds),
            ("timeouts.call_seconds", self.timeouts.call_seconds),
        ] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                return Err(invalid(key, format!("{seconds} is not in (0, 3600]")));
            }
        }
        for (key, dir) in [
            ("paths.state_dir", &self.paths.state_dir),
            ("paths.log_dir", &self.paths.log_dir),
        ] {
            if !dir.is_absolute() {
                return Err(invalid(
                    key,
                    format!("{} is not an absolute path", dir.display()),
                ));
            }
        }
        if !(1..=4096).contains(&self.paths.log_max_mib) {
            return Err(invalid(
                "paths.log_max_mib",
                format!("{} is not in 1..=4096", self.paths.log_max_mib),
            ));
        }
        if self.vm.kernel_args.contains('\n') {
            return Err(invalid("vm.kernel_args", "has a newline".into()));
        }
        for key in &self.annotations.allowed {
            if !crate::annotations::OVERRIDABLE_KEYS.contains(&key.as_str()) {
                return Err(invalid(
                    "annotations.allowed",
                    format!(
                        "{key:?} cannot be overridden; known: {}",
                        crate::annotations::OVERRIDABLE_KEYS.join(", ")
                    ),
                ));
            }
        }
        let jails = [
            (
                self.qemu.jail,
                "qemu",
                "QEMU",
                self.qemu.jail_uid,
                self.qemu.jail_gid,
            ),
            (
                self.builtin.jail,
                "builtin",
                "VMM",
                self.builtin.jail_uid,
                self.builtin.jail_gid,
            ),
        ];
        for (jailed, section, what, uid, gid) in jails {
            for (key, id) in [("jail_uid", uid), ("jail_gid", gid)] {
                if jailed && id == 0 {
                    return Err(invalid(
                        &format!("{section}.{key}"),
                        format!(
                            "0 would leave the jailed {what} root; set {section}.jail = false to run it unconfined"
                        ),
                    ));
                }
            }
        }
        let tap = &self.network.tap_name;
        if tap.is_empty() || tap.len() > 15 || tap.contains(['/', ' ', '\0']) {
            return Err(invalid(
                "network.tap_name",
                format!("{tap:?} is not an interface name (1-15 characters)"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/microvm/config.toml"))
    }

    fn error_of(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// config/microvm.toml documents every key with its default value.
    #[test]
    fn the_shipped_example_is_the_defaults() {
        let text = include_str!("../../config/microvm.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.backend, BackendKind::Builtin);
        assert_eq!(config.vm.vcpus, 1);
        assert_eq!(config.qemu.accel, Accel::Tcg);
    }

    #[test]
    fn full_file_parses() {
        let config = parse(
            r#"
            backend = "qemu"
            log_level = "debug"
            [vm]
            kernel = "/k/vmlinux"
            initramfs = "/k/initrd"
            vcpus = 2
            memory_mib = 512
            debug_console = true
            [timeouts]
            boot_seconds = 90
            agent_seconds = 2.5
            [qemu]
            accel = "kvm"
            [paths]
            state_dir = "/tmp/state"
            "#,
        )
        .unwrap();
        assert_eq!(config.backend, BackendKind::Qemu);
        assert_eq!(config.log_level, LogLevel::Debug);
        assert_eq!(config.vm.vcpus, 2);
        assert_eq!(config.vm.kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(config.timeouts.agent(), Duration::from_millis(2500));
        assert_eq!(config.timeouts.boot(), Duration::from_secs(90));
        assert_eq!(config.qemu.accel, Accel::Kvm);
        assert_eq!(config.paths.state_dir, PathBuf::from("/tmp/state"));
        // Untouched keys of a given table keep their defaults.
        assert_eq!(config.paths.log_dir, PathBuf::from("/var/log/microvm"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = error_of("[vm]\nvcpu = 2\n");
        assert!(err.contains("`vm.vcpu`"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
        let err = error_of("hypervisor = \"qemu\"\n");
        assert!(err.contains("`hypervisor`"), "{err}");
        let err = error_of("[networking]\n");
        assert!(err.contains("`networking`"), "{err}");
        let err = error_of("[network]\ntap = \"x\"\n");
        assert!(err.contains("`network.tap`"), "{err}");
        let err = error_of("[annotations]\nallowed = [\"paths.state_dir\"]\n");
        assert!(err.contains("`annotations.allowed`"), "{err}");
        assert!(err.contains("cannot be overridden"), "{err}");
        let err = error_of("[network]\ntap_name = \"a-name-longer-than-15\"\n");
        assert!(err.contains("`network.tap_name`"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = error_of("backend = \"firecracker\"\n");
        assert!(err.contains("`backend`"), "{err}");
        assert!(err.contains("firecracker"), "{err}");
        let err = error_of("[vm]\nvcpus = \"two\"\n");
        assert!(err.contains("`vm.vcpus`"), "{err}");
        let err = error_of("[vm]\nvcpus = 0\n");
        assert!(err.contains("`vm.vcpus`"), "{err}");
        let err = error_of("[vm]\nmemory_mib = 16\n");
        assert!(err.contains("`vm.memory_mib`"), "{err}");
        let err = error_of("[timeouts]\nagent_seconds = -1\n");
        assert!(err.contains("`timeouts.agent_seconds`"), "{err}");
        let err = error_of("[qemu]\naccel = \"hvf\"\n");
        assert!(err.contains("`qemu.accel`"), "{err}");
        let err = error_of("[paths]\nstate_dir = \"relative\"\n");
        assert!(err.contains("`paths.state_dir`"), "{err}");
        let err = error_of("[vm\n");
        assert!(err.contains("config.toml"), "{err}");
    }

    #[test]
    fn builtin_vmm_drops_to_nobody_and_a_jail_never_keeps_it_root() {
        let config = Config::default();
        assert_eq!(config.builtin.jail_ids(), (Some(65534), Some(65534)));
        let config = parse("[builtin]\njail_uid = 1000\njail_gid = 1001\n").unwrap();
        assert_eq!(config.builtin.jail_ids(), (Some(1000), Some(1001)));
        for key in ["jail_uid", "jail_gid"] {
            let err = error_of(&format!("[builtin]\n{key} = 0\n"));
            assert!(err.contains(&format!("`builtin.{key}`")), "{err}");
            assert!(err.contains("builtin.jail = false"), "{err}");
        }
        let config = parse("[builtin]\njail = false\njail_uid = 0\n").unwrap();
        assert_eq!(config.builtin.jail_ids(), (None, None));
        let config = parse("[builtin]\njail = false\n").unwrap();
        assert_eq!(config.builtin.jail_ids(), (None, None));
        let err = error_of("[builtin]\njail_uid = -1\n");
        assert!(err.contains("`builtin.jail_uid`"), "{err}");
    }

    #[test]
    fn qemu_is_jailed_as_nobody_unless_turned_off() {
        let config = parse("").unwrap();
        assert!(config.qemu.jail);
        assert_eq!((config.qemu.jail_uid, config.qemu.jail_gid), (65534, 65534));
        let config = parse("[qemu]\njail_uid = 1000\njail_gid = 1001\n").unwrap();
        assert_eq!((config.qemu.jail_uid, config.qemu.jail_gid), (1000, 1001));
        let err = error_of("[qemu]\njail_uid = 0\n");
        assert!(err.contains("`qemu.jail_uid`"), "{err}");
        assert!(err.contains("qemu.jail = false"), "{err}");
        let err = error_of("[qemu]\njail_gid = 0\n");
        assert!(err.contains("`qemu.jail_gid`"), "{err}");
        let err = error_of("[qemu]\njail_uid = -1\n");
        assert!(err.contains("`qemu.jail_uid`"), "{err}");
        // Off, the ids are unused: 0 is no contradiction.
        let config = parse("[qemu]\njail = false\njail_uid = 0\n").unwrap();
        assert!(!config.qemu.jail);
    }

    #[test]
    fn load_reports_a_named_missing_file() {
        let err = Config::load(Some(Path::new("/nonexistent/microvm.toml"))).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/microvm.toml"));
    }

    #[test]
    fn the_example_config_in_the_repo_parses() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/microvm.toml");
        let text = std::fs::read_to_string(&example).unwrap();
        let config = Config::parse(&text, &example).unwrap();
        assert_eq!(config.backend, BackendKind::Builtin);
    }
}
