//! A direct run: the command here, bounded in time, in a process group of
//! its own so a timeout or a stop signal ends all of it.

use crate::protocol::{CommandSpec, NESTED_ENV};
use crate::STOP_SIGNAL;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the command did not finish within {0:?}; it was killed")]
    TimedOut(Duration),
    #[error("interrupted by signal {0}; the command was killed")]
    Interrupted(i32),
}

impl DirectError {
    pub fn exit_status(&self) -> i32 {
        match self {
            DirectError::TimedOut(_) => 124,
            DirectError::Interrupted(signal) => 128 + signal,
            DirectError::Spawn { .. } => 125,
        }
    }
}

/// Runs `spec` here; its status as a shell gives it.
pub fn run(spec: &CommandSpec, timeout: Duration) -> Result<i32, DirectError> {
    let (program, args) = spec.argv.split_first().ok_or_else(|| DirectError::Spawn {
        program: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
    })?;
    let mut child = Command::new(program)
        .args(args)
        .env(NESTED_ENV, "direct")
        .current_dir(&spec.cwd)
        .process_group(0)
        .spawn()
        .map_err(|source| DirectError::Spawn {
            program: program.clone(),
            source,
        })?;
    let group = child.id() as libc::pid_t;
    let kill_group = || {
        // SAFETY: signals the process group this function created.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            // Whatever it left in its group goes with it.
            kill_group();
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 || Instant::now() >= deadline {
            kill_group();
            let _ = child.wait();
            return Err(if signal != 0 {
                DirectError::Interrupted(signal)
            } else {
                DirectError::TimedOut(timeout)
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(argv: &[&str]) -> CommandSpec {
        CommandSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            cwd: "/".into(),
        }
    }

    #[test]
    fn statuses_timeouts_and_missing_programs() {
        assert_eq!(
            run(&spec(&["sh", "-c", "exit 7"]), Duration::from_secs(10)).unwrap(),
            7
        );
        assert_eq!(
            run(
                &spec(&["sh", "-c", "kill -TERM $$"]),
                Duration::from_secs(10)
            )
            .unwrap(),
            128 + libc::SIGTERM
        );
        let started = Instant::now();
        let err = run(&spec(&["sleep", "30"]), Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.exit_status(), 124);
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = run(&spec(&["/nonexistent/cmd"]), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.exit_status(), 125);
        assert!(err.to_string().contains("/nonexistent/cmd"), "{err}");
    }
}
