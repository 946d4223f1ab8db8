//! The one error of the task API: every failure a task method can return,
//! with ONE mapping to a ttrpc code ([`ShimError::code`]) by cause:
//!
//! | cause | code |
//! |---|---|
//! | unknown container or exec, signal to an exited process | NOT_FOUND |
//! | id taken | ALREADY_EXISTS |
//! | wrong state (a transition the state machine refuses, no pod) | FAILED_PRECONDITION |
//! | bad spec, config or annotation; another pod's container | INVALID_ARGUMENT |
//! | the VM is dead or did not boot | UNAVAILABLE |
//! | a deadline passed | DEADLINE_EXCEEDED |
//! | the agent's own gRPC status | its code |
//! | Pause, Resume, Checkpoint | UNIMPLEMENTED |
//! | a host teardown left mounts or files behind (retry Delete) | INTERNAL |
//! | anything else on the host | INTERNAL |
//!
//! The ttrpc message is the whole error chain, once ([`error_chain`]).

use crate::annotations::AnnotationError;
use crate::config::ConfigError;
use crate::pod::{error_chain, BootError};
use crate::pod_files::BadPodId;
use crate::rootfs::RootfsError;
use crate::state::TransitionError;
use containerd_shim::protos::ttrpc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("exec {0} not found")]
    ExecNotFound(String),
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("exec {0} already exists")]
    ExecExists(String),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("cannot exec in container {id}: it is {state}")]
    NotRunning { id: String, state: &'static str },
    #[error("the pod VM is not running")]
    PodNotRunning,
    #[error("this shim serves pod {serving}, not {asked}")]
    OtherPod { serving: String, asked: String },
    #[error("reading {bundle}/config.json: {error}")]
    Spec {
        bundle: String,
        error: oci_spec::OciSpecError,
    },
    #[error(transparent)]
    PodId(#[from] BadPodId),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("exec without a process spec")]
    NoExecSpec,
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The container's host dir could not be removed: the container stays
    /// known, so a retried Delete redoes the clean-up.
    #[error("removing container {id}'s host dir; Delete again to retry")]
    Teardown {
        id: String,
        #[source]
        source: RootfsError,
    },
    // The cause is in the message, not a source: the chain prints it once.
    #[error("serializing the spec: {0}")]
    SerializeSpec(serde_json::Error),
    #[error("encoding metrics: {0}")]
    EncodeMetrics(containerd_shim::protos::protobuf::Error),
    /// The agent answered with an error (or the deadline layer did).
    #[error("{what}: {}", status.message())]
    Agent {
        what: &'static str,
        status: tonic::Status,
    },
    /// The sandbox's own bound on a clean-up call passed.
    #[error("{what} did not answer within {timeout:?}")]
    AgentTimeout {
        what: &'static str,
        timeout: Duration,
    },
    /// The VM died: no agent call is made (or awaited) any more.
    #[error("{what}: the pod VM is dead ({exit}); no call reaches its agent")]
    VmDead { what: &'static str, exit: String },
    #[error("{0} is not supported by the microvm runtime")]
    Unimplemented(&'static str),
}

impl ShimError {
    pub fn agent(what: &'static str, status: tonic::Status) -> Self {
        Self::Agent { what, status }
    }

    /// The ttrpc code for this error: the one place codes are chosen.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Self::ContainerNotFound(_) | Self::ExecNotFound(_) => Code::NOT_FOUND,
            Self::ContainerExists(_) | Self::ExecExists(_) => Code::ALREADY_EXISTS,
            // containerd's own shims answer NOT_FOUND for a signal to an
            // exited process; CRI's StopContainer relies on it.
            Self::Transition(TransitionError::AlreadyExited) => Code::NOT_FOUND,
            Self::Transition(TransitionError::Invalid { .. })
            | Self::NotRunning { .. }
            | Self::PodNotRunning => Code::FAILED_PRECONDITION,
            Self::OtherPod { .. }
            | Self::Spec { .. }
            | Self::PodId(_)
            | Self::Config(_)
            | Self::Annotation(_)
            | Self::NoExecSpec => Code::INVALID_ARGUMENT,
            Self::Boot(err) => boot_code(err),
            Self::Rootfs(err) => rootfs_code(err),
            Self::SerializeSpec(_) | Self::EncodeMetrics(_) | Self::Teardown { .. } => {
                Code::INTERNAL
            }
            Self::Agent { status, .. } => grpc_code(status),
            Self::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
            Self::VmDead { .. } => Code::UNAVAILABLE,
            Self::Unimplemented(_) => Code::UNIMPLEMENTED,
        }
    }
}

/// The agent's gRPC code as a ttrpc code (both use the gRPC numbers).
fn grpc_code(status: &tonic::Status) -> ttrpc::Code {
    <ttrpc::Code as containerd_shim::protos::protobuf::Enum>::from_i32(status.code() as i32)
        .unwrap_or(ttrpc::Code::UNKNOWN)
}

fn boot_code(err: &BootError) -> ttrpc::Code {
    use ttrpc::Code;
    match err {
        // The node lacks what the pod needs (image, host network allowed).
        BootError::Image(_) | BootError::HostNetworkRefused(_) => Code::FAILED_PRECONDITION,
        BootError::VmExited { .. } => Code::UNAVAILABLE,
        BootError::BootTimeout { .. } | BootError::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
        BootError::Sandbox(status)
        | BootError::MountShared(status)
        | BootError::GuestNetwork { status, .. } => grpc_code(status),
        BootError::Shared(err) => rootfs_code(err),
        BootError::Launch(_) | BootError::Cgroup(_) | BootError::Network(_) => Code::INTERNAL,
    }
}

fn rootfs_code(err: &RootfsError) -> ttrpc::Code {
    match err {
        // The tenant's spec or id, not the host.
        RootfsError::NoRoot | RootfsError::BadId(_) => ttrpc::Code::INVALID_ARGUMENT,
        _ => ttrpc::Code::INTERNAL,
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(err: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(err.code(), error_chain(&err)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_cause() {
        use ttrpc::Code;
        let cases: Vec<(ShimError, Code)> = vec![
            (ShimError::ContainerNotFound("c".into()), Code::NOT_FOUND),
            (
                ShimError::Transition(TransitionError::AlreadyExited),
                Code::NOT_FOUND,
            ),
            (ShimError::PodNotRunning, Code::FAILED_PRECONDITION),
            (ShimError::NoExecSpec, Code::INVALID_ARGUMENT),
            (
                ShimError::Boot(BootError::HostNetworkRefused("p".into())),
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::Boot(BootError::VmExited {
                    name: "vmm",
                    status: "signal 9".into(),
                    log: String::new(),
                    tail: String::new(),
                }),
                Code::UNAVAILABLE,
            ),
            (
                ShimError::Boot(BootError::Sandbox(tonic::Status::invalid_argument("x"))),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShimError::Rootfs(RootfsError::NoRoot),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShimError::agent("agent StartContainer", tonic::Status::not_found("gone")),
                Code::NOT_FOUND,
            ),
            (
                ShimError::agent("x", tonic::Status::deadline_exceeded("slow")),
                Code::DEADLINE_EXCEEDED,
            ),
            (
                ShimError::VmDead {
                    what: "agent ListPids",
                    exit: "vmm exited".into(),
                },
                Code::UNAVAILABLE,
            ),
            (ShimError::Unimplemented("Pause"), Code::UNIMPLEMENTED),
            (
                ShimError::Teardown {
                    id: "c".into(),
                    source: RootfsError::NoRoot,
                },
                Code::INTERNAL,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn the_ttrpc_message_is_the_chain() {
        let err = ShimError::agent(
            "agent CreateContainer",
            tonic::Status::internal("no rootfs"),
        );
        let ttrpc::Error::RpcStatus(status) = ttrpc::Error::from(err) else {
            panic!("not a status");
        };
        assert_eq!(status.code(), ttrpc::Code::INTERNAL);
        assert_eq!(status.message(), "agent CreateContainer: no rootfs");
    }
}
