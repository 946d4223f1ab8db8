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
//!   [`clock`]: the guest's wall clock kept on the host's;
//! - [`pod`]: boots the pod (VM, agent, sandbox, shared dir);
//!   [`pod_files`]: the pod's files on the host (for `delete` after a crash);
//! - [`sandbox`]: the pod's containers and processes behind the task API,
//!   through the [`sandbox::PodAgent`] and [`sandbox::PodHost`] traits;
//! - [`process`], [`stdio`], [`rootfs`]: per-process state and stdio,
//!   container filesystems;
//! - [`service`]: the task API, a ttrpc adapter over [`sandbox::Sandbox`];
//!   [`shim`]: start, serve, delete.

pub mod agent;
pub mod annotations;
pub mod beneath;
pub mod clock;
pub mod config;
pub mod deadline;
pub mod error;
pub mod events;
pub mod network;
pub mod oom;
pub mod oom_score;
pub mod pod;
pub mod pod_files;
pub mod port_forward;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod shim;
pub mod state;
pub mod stdio;
pub mod vm;
// microvm-ctl: the pod record, metrics, version.
pub mod metrics;
pub mod record;
pub mod version;
