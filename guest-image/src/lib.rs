//! The two files every pod VM boots: the guest kernel (built from Debian's
//! `linux-source-6.1` and the fragments in `kernel-config/`) and the
//! initramfs (the static `microvm-agent` as `/init`), plus the kernel command
//! line the runtime passes.
//!
//! Both artifacts are cached outside the repo under [`cache::cache_root`]
//! (`$MICROVM_CACHE_DIR`, default `/var/cache/microvm`):
//! - `kernel/<source-version>-<hash>/{vmlinux,bzImage,config}`, keyed by the
//!   source package version and a hash of the fragments and build script;
//! - `initramfs/<variant>-<hash>.cpio`, keyed by its own content.
//!
//! [`kernel::kernel`] and [`initramfs::initramfs`] return those paths,
//! building what is missing. [`qemu`] boots them under QEMU+TCG (tests and
//! figures); [`figures`] measures them against Debian's cloud kernel.

pub mod cache;
pub mod figures;
pub mod initramfs;
pub mod kernel;
pub mod qemu;

// The command line, the ready line and the cache layout are the guest
// contract's: `microvm_abi`.
pub use microvm_abi::cmdline::{qemu as qemu_cmdline, KERNEL_CMDLINE};
pub use microvm_abi::console::{ready_uptime, READY_LINE_PREFIX};
