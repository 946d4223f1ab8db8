use crate::cgroup::CgroupError;
use crate::oci::SpecError;
use crate::stdio::StdioError;
use std::io;
use tonic::Code;

/// Names a process for messages: "init" or "exec <id>".
pub fn process_name(exec_id: &str) -> String {
    if exec_id.is_empty() {
        "init process".to_owned()
    } else {
        format!("exec {exec_id:?}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid {kind} id {id:?}: use 1-128 characters from [A-Za-z0-9_.-], not starting with '.' or '-'")]
    InvalidId { kind: &'static str, id: String },
    #[error("container {0} already exists")]
    ContainerExists(String),
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("exec {exec_id:?} already exists in container {container_id}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("{} not found in container {container_id}", process_name(.exec_id))]
    ProcessNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {id}: invalid OCI spec")]
    Spec {
        id: String,
        #[source]
        source: SpecError,
    },
    #[error("container {id}: cgroup setup failed")]
    Cgroup {
        id: String,
        #[source]
        source: CgroupError,
    },
    #[error("container {id} is {state}; {action} needs it {needed}")]
    WrongState {
        id: String,
        state: &'static str,
        action: &'static str,
        needed: &'static str,
    },
    #[error("{} of container {container_id} has exited", process_name(.exec_id))]
    Exited {
        container_id: String,
        exec_id: String,
    },
    #[error("{} of container {container_id} has no terminal", process_name(.exec_id))]
    NoTerminal {
        container_id: String,
        exec_id: String,
    },
    #[error("{} of container {container_id} was created without stdin", process_name(.exec_id))]
    NoStdin {
        container_id: String,
        exec_id: String,
    },
    #[error("container {container_id}, {}: {step} failed", process_name(.exec_id))]
    Setup {
        container_id: String,
        exec_id: String,
        step: String,
        code: Code,
        #[source]
        source: io::Error,
    },
    #[error("container {container_id}, {}: the process exited during setup", process_name(.exec_id))]
    ExitedDuringSetup {
        container_id: String,
        exec_id: String,
    },
    #[error("container {container_id}, {}", process_name(.exec_id))]
    Stdio {
        container_id: String,
        exec_id: String,
        #[source]
        source: StdioError,
    },
    #[error("signal {0} is not a valid signal number (1-64)")]
    BadSignal(u32),
    #[error("container {id}: {what}")]
    Io {
        id: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the sandbox's PID namespace")]
    PodNamespace(#[source] io::Error),
}

impl RuntimeError {
    pub fn grpc_code(&self) -> Code {
        match self {
            Self::InvalidId { .. } | Self::BadSignal(_) => Code::InvalidArgument,
            Self::ContainerExists(_) | Self::ExecExists { .. } => Code::AlreadyExists,
            Self::ContainerNotFound(_) | Self::ProcessNotFound { .. } => Code::NotFound,
            Self::Spec { source, .. } => source.grpc_code(),
            Self::Cgroup { source, .. } => source.grpc_code(),
            Self::WrongState { .. }
            | Self::Exited { .. }
            | Self::NoTerminal { .. }
            | Self::NoStdin { .. }
            | Self::ExitedDuringSetup { .. } => Code::FailedPrecondition,
            Self::Setup { code, .. } => *code,
            Self::Stdio { source, .. } => match source {
                StdioError::Busy(_) | StdioError::StdinClosed | StdioError::BrokenPipe => {
                    Code::FailedPrecondition
                }
                StdioError::Io(_) => Code::Internal,
            },
            Self::Io { .. } | Self::PodNamespace(_) => Code::Internal,
        }
    }
}

/// Container and exec ids become paths and cgroup names: keep them plain.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), RuntimeError> {
    let valid = (1..=128).contains(&id.len())
        && !id.starts_with('.')
        && !id.starts_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId {
            kind,
            id: id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_names() {
        assert!(validate_id("container", "c1").is_ok());
        assert!(validate_id("container", "a.b_c-9").is_ok());
        for bad in ["", ".", "..", "-x", "a/b", "a b", &"x".repeat(129)] {
            let err = validate_id("container", bad).unwrap_err();
            assert_eq!(err.grpc_code(), Code::InvalidArgument, "{bad:?}");
        }
    }

    #[test]
    fn messages_name_the_object() {
        let err = RuntimeError::ProcessNotFound {
            container_id: "c1".into(),
            exec_id: "e7".into(),
        };
        assert_eq!(err.to_string(), "exec \"e7\" not found in container c1");
        assert_eq!(err.grpc_code(), Code::NotFound);
        let err = RuntimeError::Exited {
            container_id: "c1".into(),
            exec_id: String::new(),
        };
        assert_eq!(err.to_string(), "init process of container c1 has exited");
        assert_eq!(err.grpc_code(), Code::FailedPrecondition);
    }
}
