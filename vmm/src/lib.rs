//! `microvm-vmm`: a KVM microVM monitor, one process per VM.
//!
//! Module map (mirrors the architecture):
//! - [`config`]: the serde config structs, one file per resource.
//! - [`memory`]: memfd-backed guest memory.
//! - [`arch`]: x86_64 layout, CPUID, MSRs, registers, MP table.
//! - [`boot`]: kernel/initrd loading and boot parameters (linux-loader).
//! - [`devices`]: building the device bus from the config.
//! - [`vcpu`]: vCPU threads and KVM-exit dispatch.
//! - [`vm`]: one running VM: KVM objects, devices, vCPUs.
//! - [`api`]: the control socket protocol and server.
//! - [`vmm`]: the controller loop that ties them together.
//! - [`stop`]: why a VM stopped, and the process exit code for it.
//! - [`seccomp`]: the per-thread system-call filters.
//! - [`jail`]: namespaces, minimal root, cgroup and credentials for the VMM.

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod devices;
pub mod jail;
pub mod memory;
pub mod seccomp;
pub mod stop;
pub mod vcpu;
pub mod vm;
pub mod vmm;

pub use microvm_devices::GuestMemoryMmap;
