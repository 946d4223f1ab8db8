//! Why a VM stopped, and the process exit code that says so.

use serde::Serialize;

/// Process exit codes of `microvm-vmm`. Documented in docs/vmm-api.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Guest powered off with status 0, or a requested shutdown completed.
    Ok = 0,
    /// The VMM failed after the VM was created (host-side fault).
    VmmError = 1,
    /// Bad arguments or config: nothing was created.
    BadConfig = 2,
    /// Guest powered off with a non-zero status.
    GuestFailure = 3,
    /// Guest rebooted (i8042 reset or KVM reset event).
    GuestReboot = 4,
    /// Guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 5,
    /// KVM could not run the guest (entry failure or emulation failure).
    GuestUnrunnable = 6,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum StopReason {
    /// The guest wrote its status to the shutdown port.
    GuestShutdown {
        status: u8,
    },
    GuestReboot,
    TripleFault,
    /// KVM refused or failed to run guest code.
    GuestUnrunnable {
        detail: String,
    },
    /// `shutdown` over the API or SIGTERM/SIGINT.
    ShutdownRequested {
        graceful: bool,
    },
    VmmError {
        detail: String,
    },
}

impl StopReason {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StopReason::GuestShutdown { status: 0 } | StopReason::ShutdownRequested { .. } => {
                ExitCode::Ok
            }
            StopReason::GuestShutdown { .. } => ExitCode::GuestFailure,
            StopReason::GuestReboot => ExitCode::GuestReboot,
            StopReason::TripleFault => ExitCode::TripleFault,
            StopReason::GuestUnrunnable { .. } => ExitCode::GuestUnrunnable,
            StopReason::VmmError { .. } => ExitCode::VmmError,
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestShutdown { status } => {
                write!(f, "guest shut down with status {status}")
            }
            StopReason::GuestReboot => write!(f, "guest rebooted"),
            StopReason::TripleFault => write!(f, "guest triple-faulted"),
            StopReason::GuestUnrunnable { detail } => {
                write!(f, "KVM cannot run the guest: {detail}")
            }
            StopReason::ShutdownRequested { graceful: true } => {
                write!(f, "graceful shutdown requested")
            }
            StopReason::ShutdownRequested { graceful: false } => {
                write!(f, "forced shutdown requested")
            }
            StopReason::VmmError { detail } => write!(f, "VMM error: {detail}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_reason() {
        assert_eq!(StopReason::GuestShutdown { status: 0 }.exit_code() as u8, 0);
        assert_eq!(StopReason::GuestShutdown { status: 9 }.exit_code() as u8, 3);
        assert_eq!(StopReason::GuestReboot.exit_code() as u8, 4);
        assert_eq!(StopReason::TripleFault.exit_code() as u8, 5);
        let json = serde_json::to_value(StopReason::GuestShutdown { status: 2 }).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"reason": "guest-shutdown", "status": 2})
        );
    }
}
