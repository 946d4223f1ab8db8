//! `microvm-kvm-harness`: runs a command as root with a real `/dev/kvm`
//! and this machine's files, and returns its exit status and output.
//!
//! - Where the host's KVM boots Linux ([`host::Kvm::Real`]), the command
//!   runs here ([`direct`]).
//! - On a PVM host, or one without `/dev/kvm`, it runs inside L1: Debian's
//!   cloud kernel under `qemu-system-x86_64 -accel tcg -cpu max`, whose
//!   emulated AMD SVM lets `kvm_amd` load ([`nested`]). L1 sees the host's
//!   files read-only through virtiofsd with tmpfs writes on top, has cgroup
//!   v2, and its own `/tmp` and `/run`.
//!
//! [`image`] builds and caches L1's kernel and initramfs, [`protocol`] is
//! the host↔L1 contract, [`guest`] is PID 1 inside L1.

pub mod direct;
pub mod guest;
pub mod host;
pub mod image;
pub mod modules;
pub mod nested;
pub mod protocol;

/// How a command gets its KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Here if this host's KVM boots Linux, else nested.
    Auto,
    /// Here, whatever KVM this host has.
    Direct,
    /// In L1, whatever KVM this host has.
    Nested,
}

impl Mode {
    /// What `Auto` resolves to on this host, and why.
    pub fn resolve(self, kvm: host::Kvm) -> (Mode, String) {
        match self {
            Mode::Auto if kvm.boots_linux() => (Mode::Direct, format!("this host has {kvm}")),
            Mode::Auto => (
                Mode::Nested,
                format!("this host has {kvm}: the command runs in a nested-KVM L1"),
            ),
            Mode::Direct => (Mode::Direct, "--mode direct".into()),
            Mode::Nested => (Mode::Nested, "--mode nested".into()),
        }
    }
}

/// The last of SIGINT, SIGTERM or SIGHUP that arrived (0: none). A run
/// polls it and ends through its cleanup.
pub static STOP_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The harness binary's name, for the tests that spawn it.
pub const BINARY: &str = "microvm-kvm-harness";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_runs_here_only_on_real_kvm() {
        let real = host::Kvm::Real { module: "kvm_amd" };
        assert_eq!(Mode::Auto.resolve(real).0, Mode::Direct);
        for kvm in [host::Kvm::Pvm, host::Kvm::Missing, host::Kvm::Unknown] {
            let (mode, why) = Mode::Auto.resolve(kvm);
            assert_eq!(mode, Mode::Nested);
            assert!(why.contains("nested-KVM L1"), "{why}");
        }
        assert_eq!(Mode::Nested.resolve(real).0, Mode::Nested);
        assert_eq!(Mode::Direct.resolve(host::Kvm::Pvm).0, Mode::Direct);
    }
}
