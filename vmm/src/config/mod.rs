//! VM configuration: serde structs (one file per resource) plus validation.
//!
//! The same JSON shape is accepted from `--config FILE` and from the control
//! API's `configure` request. Unknown fields are errors that name the field.

pub mod boot;
pub mod devices;
pub mod fs;
mod machine;

pub use boot::BootConfig;
pub use devices::{
    DiskConfig, NetConfig, RateLimiterConfig, SerialConfig, TokenBucketConfig, VsockConfig,
};
pub use fs::FsConfig;
pub use machine::{CpuTemplate, MachineConfig};

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    #[serde(default)]
    pub machine: MachineConfig,
    pub boot: BootConfig,
    #[serde(default)]
    pub serial: SerialConfig,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// virtio-fs shares served by vhost-user back-ends (virtiofsd).
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Offer a virtio-rng device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// Per-thread seccomp filters on the vCPU and VMM threads. `--no-seccomp`
    /// turns every filter off whatever this says.
    #[serde(default = "default_true")]
    pub seccomp: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("machine.vcpus must be between 1 and {max}, got {got}")]
    Vcpus { got: u32, max: u32 },
    #[error("machine.memory_mib must be at least {min} MiB, got {got}")]
    MemoryTooSmall { got: u64, min: u64 },
    #[error("machine.memory_mib {got} MiB exceeds the host's {host} MiB of RAM")]
    MemoryTooLarge { got: u64, host: u64 },
    #[error("boot.kernel {0}: no such file")]
    KernelMissing(PathBuf),
    #[error("boot.initrd {0}: no such file")]
    InitrdMissing(PathBuf),
    #[error("boot.initrd {path} ({size} bytes) is larger than the guest's {memory_mib} MiB of memory can hold")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        memory_mib: u64,
    },
    #[error("disks[{index}].path {path}: no such file")]
    DiskMissing { index: usize, path: PathBuf },
    #[error("too many devices: {got} virtio devices, at most {max}")]
    TooManyDevices { got: usize, max: usize },
    #[error("vsock.guest_cid must be 3 or more (0-2 are reserved), got {0}")]
    GuestCid(u64),
    #[error("net[{index}].mac {mac:?} is not a MAC address like 02:00:00:00:00:01")]
    Mac { index: usize, mac: String },
    #[error("net[{index}].tap {tap:?} is not a valid interface name (1-15 characters)")]
    TapName { index: usize, tap: String },
    #[error("{key}: {source}")]
    RateLimiter {
        key: String,
        source: microvm_devices::rate_limiter::RateLimiterError,
    },
    #[error("vsock.max_connections must be between 1 and {max}, got {got}")]
    VsockConnections { got: usize, max: usize },
    #[error("vsock.conn_buffer_bytes must be between 4096 and {max}, got {got}")]
    VsockBuffer { got: u32, max: u32 },
    #[error("fs[{index}].tag {tag:?} is not a valid mount tag: {reason}")]
    FsTag {
        index: usize,
        tag: String,
        reason: &'static str,
    },
    #[error("fs[{index}].tag {tag:?} is used by an earlier share")]
    FsDuplicateTag { index: usize, tag: String },
    #[error("fs[{index}].num_queues must be between 1 and {max}, got {got}")]
    FsQueues { index: usize, got: u16, max: u16 },
    #[error("fs[{index}].queue_size must be a power of two up to 32768, got {got}")]
    FsQueueSize { index: usize, got: u16 },
    #[error("fs[{index}].socket {path}: no such unix socket (start virtiofsd first)")]
    FsSocketMissing { index: usize, path: PathBuf },
}

/// Smallest guest the loader can place a kernel, initrd and tables in.
pub const MIN_MEMORY_MIB: u64 = 16;
pub const MAX_VCPUS: u32 = 64;

impl VmConfig {
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Ok(serde_json::from_str(text)?)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Checks everything that can be checked without creating the VM, so that
    /// bad input fails before any file or socket exists.
    pub fn validate(&self, host_memory_mib: u64) -> Result<(), ConfigError> {
        let vcpus = u32::from(self.machine.vcpus);
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus {
                got: vcpus,
                max: MAX_VCPUS,
            });
        }
        let memory = self.machine.memory_mib;
        if memory < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall {
                got: memory,
                min: MIN_MEMORY_MIB,
            });
        }
        if memory > host_memory_mib {
            return Err(ConfigError::MemoryTooLarge {
                got: memory,
                host: host_memory_mib,
            });
        }
        if !self.boot.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.boot.kernel.clone()));
        }
        if let Some(initrd) = &self.boot.initrd {
            let size = std::fs::metadata(initrd)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .ok_or_else(|| ConfigError::InitrdMissing(initrd.clone()))?;
            // The initrd sits in low RAM above the kernel at 1 MiB; the exact
            // fit is checked again at load time, this catches the absurd case
            // before anything is created.
            let low_ram = (memory << 20).min(crate::arch::layout::MMIO_GAP_START);
            if size >= low_ram.saturating_sub(crate::arch::layout::HIMEM_START) {
                return Err(ConfigError::InitrdTooLarge {
                    path: initrd.clone(),
                    size,
                    memory_mib: memory,
                });
            }
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if !disk.path.is_file() {
                return Err(ConfigError::DiskMissing {
                    index,
                    path: disk.path.clone(),
                });
            }
            if let Some(limiter) = &disk.rate_limiter {
                limiter
                    .validate()
                    .map_err(|source| ConfigError::RateLimiter {
                        key: format!("disks[{index}].rate_limiter"),
                        source,
                    })?;
            }
        }
        for (index, net) in self.net.iter().enumerate() {
            net.validate(index)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.guest_cid < 3 {
                return Err(ConfigError::GuestCid(vsock.guest_cid));
            }
            if !(1..=devices::MAX_VSOCK_CONNECTIONS).contains(&vsock.max_connections) {
                return Err(ConfigError::VsockConnections {
                    got: vsock.max_connections,
                    max: devices::MAX_VSOCK_CONNECTIONS,
                });
            }
            if !(4096..=devices::MAX_CONN_BUFFER_BYTES).contains(&vsock.conn_buffer_bytes) {
                return Err(ConfigError::VsockBuffer {
                    got: vsock.conn_buffer_bytes,
                    max: devices::MAX_CONN_BUFFER_BYTES,
                });
            }
        }
        fs::validate_all(&self.fs)?;
        let count = self.virtio_device_count();
        if count > crate::arch::layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices {
                got: count,
                max: crate::arch::layout::VIRTIO_MMIO_MAX_DEVICES,
            });
        }
        Ok(())
    }

    pub fn virtio_device_count(&self) -> usize {
        usize::from(self.vsock.is_some())
            + self.disks.len()
            + self.net.len()
            + usize::from(self.rng)
            + self.fs.len()
    }
}

/// Total host RAM in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
        .ok_or_else(|| std::io::Error::other("MemTotal missing from /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(kernel: &Path) -> String {
        format!(r#"{{"boot": {{"kernel": "{}"}}}}"#, kernel.display())
    }

    #[test]
    fn defaults_fill_in_and_validate() {
        let exe = std::env::current_exe().unwrap();
        let config = VmConfig::from_json(&minimal(&exe)).unwrap();
        assert_eq!(config.machine.vcpus, 1);
        assert_eq!(config.machine.memory_mib, 128);
        assert!(config.rng);
        config.validate(1024).unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let err = VmConfig::from_json(r#"{"boot": {"kernel": "/k", "kernal_args": ""}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernal_args"), "{err}");
    }

    #[test]
    fn bad_values_are_refused() {
        let exe = std::env::current_exe().unwrap();
        let mut config = VmConfig::from_json(&minimal(&exe)).unwrap();
        config.machine.vcpus = 0;
        assert!(matches!(
            config.validate(1024),
            Err(ConfigError::Vcpus { .. })
        ));
        config.machine.vcpus = 1;
        config.machine.memory_mib = 0;
        assert!(matches!(
            config.validate(1024),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        config.machine.memory_mib = 1 << 30;
        assert!(matches!(
            config.validate(1024),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        config.machine.memory_mib = 64;
        config.boot.kernel = "/nonexistent/vmlinux".into();
        assert!(matches!(
            config.validate(1024),
            Err(ConfigError::KernelMissing(_))
        ));
    }

    #[test]
    fn host_memory_is_readable() {
        assert!(host_memory_mib().unwrap() > 0);
    }
}
