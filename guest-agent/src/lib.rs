//! `microvm-agent`: PID 1 of every pod VM and the OCI runtime of the pod's
//! containers, behind the gRPC API of `microvm-proto` (vsock port 1024, or
//! a unix socket for tests on the host).
//!
//! Layout: [`init`] does PID 1's duties, [`server`] maps the API onto
//! [`runtime`] (containers and processes), [`sandbox`], [`storage`] and
//! [`network`]. [`oci`] turns specs into plans that [`spawn`] runs between
//! clone3 and execve; [`cgroup`], [`stdio`] and [`events`] hold the rest.

pub mod async_fd;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod debug;
pub mod device_filter;
pub mod events;
pub mod guest;
pub mod init;
pub mod lock;
pub mod network;
pub mod oci;
pub mod peer;
pub mod port_forward;
pub mod runtime;
pub mod sandbox;
pub mod server;
pub mod spawn;
pub mod stdio;
pub mod storage;
pub mod sysctl;
pub mod vmm_ports;
