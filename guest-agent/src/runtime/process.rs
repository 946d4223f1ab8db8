//! A process the agent started in a container: its pidfd, stdio and exit.

use super::error::RuntimeError;
use crate::oci::SetupLabels;
use crate::spawn::child::Step;
use crate::spawn::sync::{MessageKind, Received, SyncSocket};
use crate::spawn::{pidfd_signal, ProcessExit};
use crate::stdio::{OutputPipe, OutputReader, StdinPipe};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::sync::watch;
use tonic::Code;

pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub stdin: Option<StdinPipe>,
    pub stdout: OutputPipe,
    pub stderr: OutputPipe,
    /// A duplicate of the pty master, for resizes.
    pub pty: Option<OwnedFd>,
    pub exit: watch::Receiver<Option<ProcessExit>>,
}

impl Process {
    pub fn exited(&self) -> Option<ProcessExit> {
        *self.exit.borrow()
    }

    pub async fn wait(&self) -> ProcessExit {
        let mut exit = self.exit.clone();
        loop {
            if let Some(done) = *exit.borrow_and_update() {
                return done;
            }
            if exit.changed().await.is_err() {
                // The exit watcher is gone without a result: cannot happen
                // while the reaper runs; report a kill rather than hang.
                return ProcessExit {
                    code: 128 + libc::SIGKILL,
                    signal: Some(libc::SIGKILL),
                    at: std::time::SystemTime::now(),
                };
            }
        }
    }

    fn exited_error(&self) -> RuntimeError {
        RuntimeError::Exited {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        }
    }

    pub fn signal(&self, signal: libc::c_int) -> Result<(), RuntimeError> {
        if self.exited().is_some() {
            return Err(self.exited_error());
        }
        pidfd_signal(&self.pidfd, signal).map_err(|err| match err.raw_os_error() {
            Some(libc::ESRCH) => self.exited_error(),
            Some(libc::EINVAL) => RuntimeError::BadSignal(signal.unsigned_abs()),
            _ => RuntimeError::Io {
                id: self.container_id.clone(),
                what: format!("signal {signal} to pid {}", self.pid),
                source: err,
            },
        })
    }

    pub fn resize(&self, rows: u16, columns: u16) -> Result<(), RuntimeError> {
        let Some(pty) = &self.pty else {
            return Err(RuntimeError::NoTerminal {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            });
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize from a local; the descriptor is
        // a pty master this process owns.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(RuntimeError::Io {
                id: self.container_id.clone(),
                what: "resizing the terminal".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn stdin(&self) -> Result<&StdinPipe, RuntimeError> {
        self.stdin.as_ref().ok_or_else(|| RuntimeError::NoStdin {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
        })
    }

    fn stdio_error(&self, source: crate::stdio::StdioError) -> RuntimeError {
        RuntimeError::Stdio {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            source,
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), RuntimeError> {
        self.stdin()?
            .write_all(data)
            .await
            .map_err(|err| self.stdio_error(err))
    }

    pub async fn close_stdin(&self) -> Result<(), RuntimeError> {
        self.stdin()?
            .close()
            .await
            .map_err(|err| self.stdio_error(err))
    }

    pub fn output_reader(&self, stderr: bool) -> Result<OutputReader, RuntimeError> {
        let pipe = if stderr { &self.stderr } else { &self.stdout };
        pipe.reader().map_err(|err| self.stdio_error(err))
    }
}

/// Texts for the steps of one process's setup.
#[derive(Debug, Default, Clone)]
pub struct StepLabels {
    pub setup: SetupLabels,
    pub program: String,
    pub search_path: String,
    pub cwd: String,
    pub rlimits: Vec<String>,
    pub user: String,
}

fn label(list: &[String], index: u32) -> String {
    usize::try_from(index)
        .ok()
        .and_then(|index| list.get(index))
        .cloned()
        .unwrap_or_else(|| format!("#{index}"))
}

/// (what failed, gRPC code) for a child's (step, index); the errno goes
/// into the error's source.
pub fn describe_failure(step: u32, index: u32, labels: &StepLabels) -> (String, Code) {
    use Step::*;
    let Some(step) = Step::from_u32(step) else {
        return (format!("unknown setup step {step}"), Code::Internal);
    };
    let text = match step {
        CloseFds => "closing inherited descriptors".into(),
        Setsid => "setsid".into(),
        Setns => "entering the container's namespaces".into(),
        RootPropagation => "setting mount propagation of /".into(),
        BindRootfs => "bind-mounting the rootfs".into(),
        MountMkdir => format!(
            "creating the mount point for {}",
            label(&labels.setup.mounts, index)
        ),
        Mount => label(&labels.setup.mounts, index),
        BindRemount => format!("remounting ({})", label(&labels.setup.mounts, index)),
        MountPropagation => format!("propagation of ({})", label(&labels.setup.mounts, index)),
        Mknod => format!("creating {}", label(&labels.setup.devices, index)),
        Symlink => format!("creating {}", label(&labels.setup.symlinks, index)),
        PivotRoot => "pivot_root into the rootfs".into(),
        MaskPath => format!("masking {}", label(&labels.setup.masked_paths, index)),
        ReadonlyPath => format!(
            "making {} read-only",
            label(&labels.setup.readonly_paths, index)
        ),
        ReadonlyRoot => "making the rootfs read-only".into(),
        Hostname => "setting the hostname".into(),
        Domainname => "setting the domain name".into(),
        Sysctl => format!("setting {}", label(&labels.setup.sysctls, index)),
        Pty => "setting up the terminal".into(),
        Stdio => "setting up stdio".into(),
        Rlimit => format!("setting rlimit {}", label(&labels.rlimits, index)),
        IoPriority => "setting the I/O priority".into(),
        ExecLookup => {
            let text = if labels.program.contains('/') {
                format!("looking up executable {:?}", labels.program)
            } else {
                format!(
                    "looking up executable {:?} in PATH {}",
                    labels.program, labels.search_path
                )
            };
            return (text, Code::NotFound);
        }
        WaitForStart => "waiting for start".into(),
        Seccomp => "installing the seccomp filter".into(),
        CapabilityBounding => format!("dropping capability {index} from the bounding set"),
        Groups => format!("setting the groups of {}", labels.user),
        Setgid => format!("setting the gid of {}", labels.user),
        Setuid => format!("setting the uid of {}", labels.user),
        Capset => "setting capabilities".into(),
        AmbientCapabilities => "setting ambient capabilities".into(),
        NoNewPrivileges => "setting no_new_privileges".into(),
        Chdir => format!("changing to the working directory {}", labels.cwd),
        Execve => format!("executing {:?}", labels.program),
        ParentDeathSignal => "setting the parent death signal".into(),
        Signals => "resetting the signal mask".into(),
    };
    (text, Code::FailedPrecondition)
}

/// What the sync socket said about a process being set up.
pub enum SetupOutcome {
    /// The process is waiting for Start (containers) or has exec'd (execs).
    Done {
        pty_master: Option<OwnedFd>,
    },
    Failed {
        step: u32,
        index: u32,
        errno: i32,
    },
    /// The socket closed without a message before Ready.
    Closed,
}

/// Reads sync messages until Ready (when `until_ready`), an error, or the
/// socket closing (an exec'd process).
pub async fn await_setup(sync: &SyncSocket, until_ready: bool) -> io::Result<SetupOutcome> {
    let mut pty_master = None;
    loop {
        match sync.receive().await? {
            Received::Message(message, fd) => {
                if message.kind == MessageKind::Pty as u32 {
                    pty_master = fd;
                } else if message.kind == MessageKind::Ready as u32 && until_ready {
                    return Ok(SetupOutcome::Done { pty_master });
                } else if message.kind == MessageKind::Error as u32 {
                    return Ok(SetupOutcome::Failed {
                        step: message.step,
                        index: message.index,
                        errno: message.errno,
                    });
                }
            }
            Received::Closed if until_ready => return Ok(SetupOutcome::Closed),
            Received::Closed => return Ok(SetupOutcome::Done { pty_master }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_their_step() {
        let labels = StepLabels {
            setup: SetupLabels {
                mounts: vec!["mount of proc proc on /proc".into()],
                ..SetupLabels::default()
            },
            program: "nope".into(),
            search_path: "/bin:/usr/bin".into(),
            ..StepLabels::default()
        };
        let (text, code) = describe_failure(Step::Mount as u32, 0, &labels);
        assert_eq!(text, "mount of proc proc on /proc");
        assert_eq!(code, Code::FailedPrecondition);
        let (text, code) = describe_failure(Step::ExecLookup as u32, 0, &labels);
        assert_eq!(text, "looking up executable \"nope\" in PATH /bin:/usr/bin");
        assert_eq!(code, Code::NotFound);
        let (_, code) = describe_failure(999, 0, &labels);
        assert_eq!(code, Code::Internal);
    }
}
