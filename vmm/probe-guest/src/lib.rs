//! The probe guest's logic: everything after the entry stub has dropped to
//! ring 3 (see `boot.s`). Built `no_std` for the guest image; built with std
//! for `cargo test` on the host, where the pure parts (command-line parsing,
//! the split virtqueue, packet layouts) are unit-tested in plain memory.
#![cfg_attr(not(test), no_std)]

pub mod bootinfo;
pub mod cmdline;
pub mod deadline;
pub mod dma;
pub mod fail;
pub mod pio;
pub mod probe;
pub mod serial;
pub mod virtio;

pub use probe::{run, shutdown};
