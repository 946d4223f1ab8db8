use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Default command line for a serial-console Linux guest without ACPI:
/// `reboot=k` turns a guest reboot into an i8042 reset (a clean VM exit),
/// `panic=1` reboots (and so exits) on panic instead of hanging.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// vmlinux ELF (PVH entry used when present) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Base command line; the VMM appends `virtio_mmio.device=` entries.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}
