//! `containerd-shim-microvm-v2`: the containerd shim v2 that runs each pod
//! in its own microVM and each container in it under the guest agent.
//!
//! - [`config`]: the TOML config; [`annotations`]: pod annotations on top
//!   of it (VM sizing, allow-listed overrides);
//! - [`state`]: the per-process task state machine;
//! - [`events`]: task events, queued in containerd's order;
//! - [`vm`]: the backend trait, the `builtin` and `qemu` backends, and the
//!   supervisor of the pod's host processes;
//! - [`network`]: the pod netns's veth redirected to the VM's tap;
//! - [`agent`]: the gRPC client of the guest agent over hybrid vsock;
//! - [`pod`]: boots the pod (VM, agent, sandbox, shared dir);
//! - [`process`], [`stdio`], [`rootfs`]: per-process state and stdio,
//!   container filesystems;
//! - [`service`]: the task API; [`shim`]: start, serve, delete.

pub mod agent;
pub mod annotations;
pub mod config;
pub mod events;
pub mod network;
pub mod pod;
pub mod process;
pub mod rootfs;
pub mod service;
pub mod shim;
pub mod state;
pub mod stdio;
pub mod vm;
