pub mod agent;
pub mod agent_qemu;
pub mod containerd;
pub mod cri;
pub mod harness;
pub mod oci_image;
pub mod probe;
pub mod rootfs;
