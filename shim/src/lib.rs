//! `containerd-shim-microvm-v2`: the containerd shim v2 that runs each pod
//! in its own microVM and each container in it under the guest agent.
//!
//! - [`config`]: the TOML config;
//! - [`state`]: the per-process task state machine;
//! - [`events`]: task events, queued in containerd's order;
//! - [`vm`]: the backend trait, the `builtin` and `qemu` backends, and the
//!   supervisor of the pod's host processes;
//! - [`agent`]: the gRPC client of the guest agent over hybrid vsock.

pub mod agent;
pub mod config;
pub mod events;
pub mod state;
pub mod vm;
