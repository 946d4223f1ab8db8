//! The guest's wall clock (the Clock service).
//!
//! The VM may boot without a wall clock (QEMU's microvm runs with rtc=off;
//! the builtin VMM's kvm-clock gives one) and a paused VM falls behind, so
//! the shim reads this clock against its own and steps it by the measured
//! difference. A relative step (read, add, set) puts none of the request's
//! transit time into the result.
//!
//! Only the VM's init may set the clock: an agent that is not PID 1 runs on
//! a host (the tests) and must never step the host's clock.

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading CLOCK_REALTIME failed")]
    Read(#[source] nix::Error),
    #[error("setting CLOCK_REALTIME failed")]
    Set(#[source] nix::Error),
    #[error("stepping the clock by {step_nanos} ns from {now_nanos} ns would leave 0..2^63 ns since the epoch")]
    OutOfRange { now_nanos: i64, step_nanos: i64 },
    #[error("this agent is not the VM's init (PID 1): it refuses to set the host's clock")]
    NotInit,
}

impl ClockError {
    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::OutOfRange { .. } => tonic::Code::InvalidArgument,
            Self::NotInit => tonic::Code::FailedPrecondition,
            Self::Read(_) | Self::Set(_) => tonic::Code::Internal,
        }
    }
}

fn nanos(spec: TimeSpec) -> i64 {
    spec.tv_sec()
        .saturating_mul(1_000_000_000)
        .saturating_add(spec.tv_nsec())
}

fn timespec(nanos: i64) -> TimeSpec {
    TimeSpec::new(nanos / 1_000_000_000, nanos % 1_000_000_000)
}

/// CLOCK_REALTIME in nanoseconds since the epoch (negative before it).
pub fn realtime_nanos() -> Result<i64, ClockError> {
    clock_gettime(ClockId::CLOCK_REALTIME)
        .map(nanos)
        .map_err(ClockError::Read)
}

/// `now + step`, if that stays within 0..=i64::MAX.
pub fn stepped(now_nanos: i64, step_nanos: i64) -> Result<i64, ClockError> {
    now_nanos
        .checked_add(step_nanos)
        .filter(|result| *result >= 0)
        .ok_or(ClockError::OutOfRange {
            now_nanos,
            step_nanos,
        })
}

/// Who may set the clock, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    settable: bool,
}

impl Clock {
    /// `is_init`: this agent is PID 1 of a VM.
    pub fn new(is_init: bool) -> Self {
        Self { settable: is_init }
    }

    /// Steps CLOCK_REALTIME by `step_nanos`; returns the clock after it.
    pub fn step(&self, step_nanos: i64) -> Result<i64, ClockError> {
        if !self.settable {
            return Err(ClockError::NotInit);
        }
        let target = stepped(realtime_nanos()?, step_nanos)?;
        clock_settime(ClockId::CLOCK_REALTIME, timespec(target)).map_err(ClockError::Set)?;
        tracing::info!(step_nanos, "guest clock stepped");
        realtime_nanos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_stay_within_the_epoch_and_i64() {
        assert_eq!(stepped(5, -5).unwrap(), 0);
        assert_eq!(
            stepped(1_700_000_000_000_000_000, 1_000).unwrap(),
            1_700_000_000_000_001_000
        );
        assert!(matches!(stepped(5, -6), Err(ClockError::OutOfRange { .. })));
        let err = stepped(i64::MAX, 1).unwrap_err();
        assert_eq!(err.grpc_code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("by 1 ns"), "{err}");
    }

    #[test]
    fn timespecs_round_trip() {
        for value in [0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_123_456_789] {
            assert_eq!(nanos(timespec(value)), value);
        }
    }

    #[test]
    fn an_agent_that_is_not_init_never_sets_the_clock() {
        let before = realtime_nanos().unwrap();
        let err = Clock::new(false).step(3_600_000_000_000).unwrap_err();
        assert!(matches!(err, ClockError::NotInit));
        assert_eq!(err.grpc_code(), tonic::Code::FailedPrecondition);
        let after = realtime_nanos().unwrap();
        assert!(
            (0..60_000_000_000).contains(&(after - before)),
            "{before} {after}"
        );
    }
}
