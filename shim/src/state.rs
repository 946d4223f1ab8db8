//! The state of one process (a container's init or an exec), as containerd
//! sees it. Every task method goes through [`ProcessState::apply`]; a
//! transition the table below does not allow is a [`TransitionError`], which
//! the service maps to FAILED_PRECONDITION (NOT_FOUND for signalling a
//! process that already exited, as containerd's own shims do: CRI's
//! StopContainer relies on it).
//!
//! | from \ op | start | exit | kill | delete | exec/resize/close-io |
//! |---|---|---|---|---|---|
//! | created | running | stopped | ok | deleted | ok |
//! | running | — | stopped | ok | — | ok |
//! | stopped | — | (ignored) | not found | deleted | — |
//! | deleted | — | — | — | — | — |

use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Stopped(ExitStatus),
    Deleted(Option<ExitStatus>),
}

impl Status {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped(_) => "stopped",
            Self::Deleted(_) => "deleted",
        }
    }

    pub fn exit(&self) -> Option<ExitStatus> {
        match *self {
            Self::Stopped(exit) => Some(exit),
            Self::Deleted(exit) => exit,
            Self::Created | Self::Running => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Start,
    Exit(ExitStatus),
    Kill,
    Delete,
    /// Exec into, resize the terminal of, close the stdin of, update.
    Use,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Exit(_) => "exit",
            Self::Kill => "kill",
            Self::Delete => "delete",
            Self::Use => "use",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("cannot {op} a process that is {state}")]
    Invalid {
        op: &'static str,
        state: &'static str,
    },
    #[error("process already finished")]
    AlreadyExited,
}

/// What an allowed op did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    /// Allowed, nothing to change: a kill or use of a live process, or a
    /// second exit report (the VM died after the agent reported the exit,
    /// say), where the first one stands.
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessState {
    status: Status,
}

impl Default for ProcessState {
    fn default() -> Self {
        Self {
            status: Status::Created,
        }
    }
}

impl ProcessState {
    pub fn status(&self) -> Status {
        self.status
    }

    /// Applies `op`, or leaves the state as it was and says why not.
    pub fn apply(&mut self, op: Op) -> Result<Outcome, TransitionError> {
        let invalid = || TransitionError::Invalid {
            op: op.name(),
            state: self.status.name(),
        };
        let next = match (self.status, op) {
            (Status::Created, Op::Start) => Status::Running,
            (Status::Created | Status::Running, Op::Exit(exit)) => Status::Stopped(exit),
            (Status::Stopped(_), Op::Exit(_)) => return Ok(Outcome::Unchanged),
            (Status::Created | Status::Running, Op::Kill | Op::Use) => {
                return Ok(Outcome::Unchanged)
            }
            (Status::Stopped(_), Op::Kill) => return Err(TransitionError::AlreadyExited),
            (Status::Created, Op::Delete) => Status::Deleted(None),
            (Status::Stopped(exit), Op::Delete) => Status::Deleted(Some(exit)),
            _ => return Err(invalid()),
        };
        self.status = next;
        Ok(Outcome::Changed)
    }

    /// Checks `op` without applying it.
    pub fn check(&self, op: Op) -> Result<(), TransitionError> {
        self.clone().apply(op).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: u32) -> ExitStatus {
        ExitStatus {
            code,
            at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn normal_life_cycle() {
        let mut state = ProcessState::default();
        assert_eq!(state.status(), Status::Created);
        state.apply(Op::Use).unwrap();
        state.apply(Op::Start).unwrap();
        assert_eq!(state.status(), Status::Running);
        state.apply(Op::Kill).unwrap();
        assert_eq!(state.apply(Op::Exit(exit(137))), Ok(Outcome::Changed));
        assert_eq!(state.status().exit(), Some(exit(137)));
        state.apply(Op::Delete).unwrap();
        assert_eq!(state.status(), Status::Deleted(Some(exit(137))));
    }

    #[test]
    fn bad_transitions_leave_the_state_alone() {
        let mut state = ProcessState::default();
        state.apply(Op::Start).unwrap();
        let err = state.apply(Op::Start).unwrap_err();
        assert_eq!(err.to_string(), "cannot start a process that is running");
        let err = state.apply(Op::Delete).unwrap_err();
        assert_eq!(err.to_string(), "cannot delete a process that is running");
        assert_eq!(state.status(), Status::Running);

        state.apply(Op::Exit(exit(0))).unwrap();
        assert!(state.apply(Op::Start).is_err());
        assert!(state.apply(Op::Use).is_err());
        assert_eq!(state.apply(Op::Kill), Err(TransitionError::AlreadyExited));
        state.apply(Op::Delete).unwrap();
        for op in [Op::Start, Op::Kill, Op::Delete, Op::Use, Op::Exit(exit(1))] {
            assert!(state.apply(op).is_err(), "{op:?} after delete");
        }
    }

    #[test]
    fn the_first_exit_wins() {
        let mut state = ProcessState::default();
        state.apply(Op::Start).unwrap();
        state.apply(Op::Exit(exit(3))).unwrap();
        assert_eq!(state.apply(Op::Exit(exit(255))), Ok(Outcome::Unchanged));
        assert_eq!(state.status().exit(), Some(exit(3)));
    }

    #[test]
    fn a_created_process_may_exit_or_be_deleted_unstarted() {
        let mut killed = ProcessState::default();
        killed.apply(Op::Exit(exit(137))).unwrap();
        assert!(killed.apply(Op::Start).is_err());

        let mut deleted = ProcessState::default();
        deleted.apply(Op::Delete).unwrap();
        assert_eq!(deleted.status(), Status::Deleted(None));
    }

    #[test]
    fn check_does_not_apply() {
        let state = ProcessState::default();
        state.check(Op::Start).unwrap();
        assert_eq!(state.status(), Status::Created);
        assert!(state.check(Op::Kill).is_ok());
    }
}
