//! Device models for `microvm-vmm`.
//!
//! Nothing here knows about KVM. A device sees guest memory, a bus access
//! (`vm_device::MutDeviceMmio` / `MutDevicePio`), an injected interrupt
//! trigger and, for back-ends, plain file descriptors. The VMM wires these to
//! KVM (irqfd, ioeventfd, exits); tests wire them to plain memory.

#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod interrupt;
pub mod legacy;
pub mod metrics;
pub mod rate_limiter;
pub mod unix_socket;
pub mod virtio;

/// The guest memory type shared by every device.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
