//! What this host's `/dev/kvm` is, and so where a KVM command must run.

use std::fmt;
use std::path::Path;

/// The kinds of `/dev/kvm` that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kvm {
    /// Hardware virtualization (VT-x or AMD-V): a stock Linux guest boots.
    Real { module: &'static str },
    /// A PVM hypervisor (`kvm_pvm`): guest kernel mode is emulated one
    /// instruction at a time and a stock Linux guest dies during boot.
    Pvm,
    /// `/dev/kvm` exists but no vendor module says what serves it.
    Unknown,
    /// No `/dev/kvm`.
    Missing,
}

impl Kvm {
    /// Whether a stock Linux guest can boot on this host's KVM.
    pub fn boots_linux(self) -> bool {
        matches!(self, Kvm::Real { .. })
    }
}

impl fmt::Display for Kvm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kvm::Real { module } => write!(f, "real KVM ({module})"),
            Kvm::Pvm => write!(
                f,
                "a PVM hypervisor (kvm_pvm), which cannot boot a stock Linux guest"
            ),
            Kvm::Unknown => write!(f, "/dev/kvm without kvm_intel or kvm_amd"),
            Kvm::Missing => write!(f, "no /dev/kvm"),
        }
    }
}

/// Reads the host's KVM kind from `/dev/kvm` and `/sys/module`.
pub fn detect() -> Kvm {
    detect_in(Path::new("/"))
}

fn detect_in(root: &Path) -> Kvm {
    if !root.join("dev/kvm").exists() {
        return Kvm::Missing;
    }
    let modules = root.join("sys/module");
    // kvm_pvm first: a PVM host may also have the vendor modules loaded.
    if modules.join("kvm_pvm").exists() {
        return Kvm::Pvm;
    }
    for module in ["kvm_intel", "kvm_amd"] {
        if modules.join(module).exists() {
            return Kvm::Real { module };
        }
    }
    Kvm::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(entries: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for entry in entries {
            std::fs::create_dir_all(root.path().join(entry)).unwrap();
        }
        root
    }

    #[test]
    fn kinds_come_from_dev_kvm_and_the_loaded_modules() {
        assert_eq!(detect_in(host(&[]).path()), Kvm::Missing);
        assert_eq!(
            detect_in(host(&["dev/kvm", "sys/module/kvm_amd"]).path()),
            Kvm::Real { module: "kvm_amd" }
        );
        assert_eq!(
            detect_in(host(&["dev/kvm", "sys/module/kvm_intel"]).path()),
            Kvm::Real {
                module: "kvm_intel"
            }
        );
        assert_eq!(
            detect_in(host(&["dev/kvm", "sys/module/kvm_pvm", "sys/module/kvm_intel"]).path()),
            Kvm::Pvm
        );
        assert_eq!(
            detect_in(host(&["dev/kvm", "sys/module/kvm"]).path()),
            Kvm::Unknown
        );
        assert!(Kvm::Real { module: "kvm_amd" }.boots_linux());
        assert!(!Kvm::Pvm.boots_linux());
    }
}
