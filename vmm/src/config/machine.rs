use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub cpu_template: CpuTemplate,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            cpu_template: CpuTemplate::default(),
        }
    }
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

/// Which CPU features the guest sees.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports on this host.
    #[default]
    Host,
    /// Masks features that differ across common server generations (AVX-512,
    /// TSX, PKU, ...) so a guest behaves the same on any of them.
    Baseline,
}
