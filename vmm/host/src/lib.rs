//! Host-side OS plumbing that the VMM's jail and the shim share, so each
//! rule has one home:
//! - [`mountinfo`]: `/proc/self/mountinfo` read as bytes (mount points may
//!   hold any byte but NUL and `/`), failing closed;
//! - [`cgroup`]: a process group's cgroup on cgroup v1 or v2, from a
//!   cgroupfs path or a systemd-driver path, with controllers enabled down
//!   the tree and nothing left behind on removal.

pub mod cgroup;
pub mod mountinfo;
