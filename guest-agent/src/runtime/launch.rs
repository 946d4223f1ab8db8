//! The one path that starts a process in a container, for a container's
//! first process (Create) and for an exec alike: stdio and the sync socket,
//! the child's plan, clone3, and the wait for the child's setup.
//!
//! What differs between the two is [`Placement`]: a container's first
//! process makes the container's namespaces and root and waits for Start;
//! an exec enters those of the first process and goes straight on.

use super::error::RuntimeError;
use super::process::{await_setup, describe_failure, Process, SetupOutcome, StepLabels};
use super::{dup, Runtime};
use crate::events::AgentEvent;
use crate::oci::{process::PreparedProcess, seccomp::CompiledSeccomp, SetupLabels};
use crate::spawn::plan::{ChildPlan, ChildStdio, RootfsPlan, SeccompProgram};
use crate::spawn::sync::{self, SyncSocket};
use crate::spawn::Spawned;
use crate::stdio::{self, OutputPipe, StdinPipe};
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tokio::sync::watch;

/// Namespaces an exec enters through the init's pidfd (PID is entered on
/// the spawner thread).
const EXEC_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// Where a new process lives: its namespaces, cgroup and root.
pub(super) enum Placement<'a> {
    /// A container's first process: it makes the container's namespaces,
    /// mounts its root and waits for Start before execve. (Boxed: it is
    /// large, and made once per container.)
    Init(Box<NewContainer<'a>>),
    /// An exec: it enters the namespaces of the container's first process
    /// (through its pidfd) and the container's cgroup, and execs at once.
    Exec {
        init_pidfd: &'a OwnedFd,
        cgroup: &'a OwnedFd,
    },
}

/// The namespaces, cgroup and root a container's first process makes.
pub(super) struct NewContainer<'a> {
    /// CLONE_NEW* flags for clone3.
    pub new_namespaces: u64,
    /// The pod's PID namespace, when the spec shares it.
    pub pod_pid: Option<OwnedFd>,
    /// The container's cgroup directory.
    pub cgroup: &'a OwnedFd,
    pub rootfs: RootfsPlan,
    pub hostname: Option<CString>,
    pub domainname: Option<CString>,
    pub sysctls: Vec<(CString, CString)>,
    pub labels: SetupLabels,
}

impl Placement<'_> {
    fn waits_for_start(&self) -> bool {
        matches!(self, Self::Init(_))
    }
}

/// One process to start in a container.
pub(super) struct LaunchRequest<'a> {
    pub container_id: &'a str,
    /// Empty for the container's first process.
    pub exec_id: &'a str,
    pub process: PreparedProcess,
    /// The spec's cwd, for messages.
    pub cwd_label: String,
    /// Give the process a stdin pipe (no pty): else /dev/null.
    pub stdin: bool,
    pub seccomp: Option<&'a CompiledSeccomp>,
    pub placement: Placement<'a>,
}

/// A process that has finished its setup: waiting for Start (a container's
/// first process) or exec'd.
pub(super) struct Launched {
    pub process: Arc<Process>,
    /// Start sends its go-ahead here (a container's first process).
    pub sync: SyncSocket,
    /// Texts for failures the child reports later (at Start).
    pub labels: StepLabels,
}

/// `RuntimeError::Io` of container `id` for a failed `what`.
pub(super) fn io_error<'a>(
    id: &'a str,
    what: &'a str,
) -> impl FnOnce(io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        id: id.to_owned(),
        what: what.to_owned(),
        source,
    }
}

impl Runtime {
    /// Starts `request`'s process and waits for its setup: until it waits
    /// for Start, or until it has exec'd. A process that fails its setup is
    /// killed.
    pub(super) async fn launch(
        &self,
        request: LaunchRequest<'_>,
    ) -> Result<Launched, RuntimeError> {
        let LaunchRequest {
            container_id: id,
            exec_id,
            process,
            cwd_label,
            stdin,
            seccomp,
            placement,
        } = request;
        let (child_stdio, ends) =
            make_stdio(&process, stdin).map_err(io_error(id, "making stdio pipes"))?;
        let (sync_agent, sync_child) =
            sync::pair().map_err(io_error(id, "making the sync socket"))?;
        let sync_socket = SyncSocket::new(sync_agent).map_err(io_error(id, "the sync socket"))?;
        let labels = step_labels(&process, cwd_label, &placement);
        let waits_for_start = placement.waits_for_start();
        let oom_score_adj = process.oom_score_adj;
        let plan = self.child_plan(id, placement, process, sync_child, child_stdio, seccomp)?;
        let what = if waits_for_start {
            "clone3 of the container process"
        } else {
            "clone3 of the exec process"
        };
        let spawned = self.spawner.spawn(plan).await.map_err(io_error(id, what))?;
        let kill_guard = KillOnDrop {
            pidfd: Some(&spawned.pidfd),
        };
        if let Some(score) = oom_score_adj {
            set_oom_score_adj(spawned.pid, score);
        }
        let outcome = await_setup(&sync_socket, waits_for_start)
            .await
            .map_err(io_error(id, "reading the sync socket"))?;
        let pty_master = match outcome {
            SetupOutcome::Done { pty_master } => pty_master,
            SetupOutcome::Failed { step, index, errno } => {
                let (step, code) = describe_failure(step, index, &labels);
                return Err(RuntimeError::Setup {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    step,
                    code,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
            // Only while waiting for Ready: an exec'd process closes the
            // socket when it execs (Done).
            SetupOutcome::Closed => {
                return Err(RuntimeError::ExitedDuringSetup {
                    container_id: id.to_owned(),
                    exec_id: exec_id.to_owned(),
                })
            }
        };
        let stdio = agent_stdio(ends, pty_master).map_err(io_error(id, "stdio"))?;
        kill_guard.disarm();
        let process = self.track_process(id, exec_id, spawned, stdio, waits_for_start);
        Ok(Launched {
            process,
            sync: sync_socket,
            labels,
        })
    }

    /// The child's plan: `process` run where `placement` says.
    fn child_plan(
        &self,
        id: &str,
        placement: Placement<'_>,
        process: PreparedProcess,
        sync: OwnedFd,
        stdio: ChildStdio,
        seccomp: Option<&CompiledSeccomp>,
    ) -> Result<ChildPlan, RuntimeError> {
        let (seccomp, seccomp_flags) = seccomp_programs(seccomp);
        let PreparedProcess {
            argv,
            envp,
            exec_candidates,
            cwd,
            credentials,
            capabilities,
            no_new_privileges,
            rlimits,
            io_priority,
            umask,
            ..
        } = process;
        let mut plan = ChildPlan {
            new_namespaces: 0,
            join_pid_namespace: None,
            setns: Vec::new(),
            cgroup: None,
            sync,
            stdio,
            rootfs: None,
            hostname: None,
            domainname: None,
            sysctls: Vec::new(),
            rlimits,
            io_priority,
            umask,
            credentials,
            capabilities,
            last_capability: self.last_capability,
            no_new_privileges,
            seccomp,
            seccomp_flags,
            cwd,
            exec_candidates,
            argv,
            envp,
            wait_for_start: false,
            namespace_holder: false,
        };
        let duplicating_the_cgroup_fd = io_error(id, "duplicating the cgroup fd");
        match placement {
            Placement::Init(init) => {
                let NewContainer {
                    new_namespaces,
                    pod_pid,
                    cgroup,
                    rootfs,
                    hostname,
                    domainname,
                    sysctls,
                    labels: _,
                } = *init;
                plan.new_namespaces = new_namespaces;
                plan.join_pid_namespace = pod_pid;
                plan.cgroup = Some(dup(cgroup).map_err(duplicating_the_cgroup_fd)?);
                plan.rootfs = Some(rootfs);
                plan.hostname = hostname;
                plan.domainname = domainname;
                plan.sysctls = sysctls;
                plan.wait_for_start = true;
            }
            Placement::Exec { init_pidfd, cgroup } => {
                plan.join_pid_namespace =
                    Some(dup(init_pidfd).map_err(io_error(id, "duplicating the pidfd"))?);
                plan.setns = vec![(
                    dup(init_pidfd).map_err(io_error(id, "duplicating the pidfd"))?,
                    EXEC_NAMESPACES,
                )];
                plan.cgroup = Some(dup(cgroup).map_err(duplicating_the_cgroup_fd)?);
            }
        }
        Ok(plan)
    }

    /// Wraps a spawned process and starts the task that records its exit
    /// and publishes it.
    fn track_process(
        &self,
        container_id: &str,
        exec_id: &str,
        spawned: Spawned,
        stdio: AgentStdio,
        is_init: bool,
    ) -> Arc<Process> {
        let (exit_tx, exit_rx) = watch::channel(None);
        let pid = u32::try_from(spawned.pid).unwrap_or_default();
        let AgentStdio {
            stdin,
            stdout,
            stderr,
            pty,
        } = stdio;
        let process = Arc::new(Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            pid,
            pidfd: spawned.pidfd,
            stdin,
            stdout,
            stderr,
            pty,
            exit: exit_rx,
        });
        let events = self.events.clone();
        let oom = Arc::clone(&self.oom);
        let container_id = container_id.to_owned();
        let exec_id = exec_id.to_owned();
        let exit = spawned.exit;
        tokio::spawn(async move {
            let Ok(exit) = exit.await else { return };
            if is_init {
                oom.check(&container_id);
            }
            let _ = exit_tx.send(Some(exit));
            tracing::debug!(
                container = container_id,
                exec = exec_id,
                code = exit.code,
                "exited"
            );
            events.publish(AgentEvent::ProcessExited {
                container_id,
                exec_id,
                pid,
                exit,
            });
        });
        process
    }
}

/// Texts for the steps of `process`'s setup.
fn step_labels(process: &PreparedProcess, cwd: String, placement: &Placement<'_>) -> StepLabels {
    StepLabels {
        setup: match placement {
            Placement::Init(init) => init.labels.clone(),
            Placement::Exec { .. } => SetupLabels::default(),
        },
        program: process.program.clone(),
        search_path: process.search_path.clone(),
        cwd,
        rlimits: process.rlimit_labels.clone(),
        user: format!(
            "uid {} gid {}",
            process.credentials.uid, process.credentials.gid
        ),
    }
}

fn seccomp_programs(seccomp: Option<&CompiledSeccomp>) -> (Vec<SeccompProgram>, libc::c_ulong) {
    match seccomp {
        Some(compiled) => (
            compiled
                .programs
                .iter()
                .map(|program| SeccompProgram {
                    filter: program.filter.clone(),
                })
                .collect(),
            compiled.flags,
        ),
        None => (Vec::new(), 0),
    }
}

/// Kills a half-made process unless disarmed.
struct KillOnDrop<'a> {
    pidfd: Option<&'a OwnedFd>,
}

impl KillOnDrop<'_> {
    fn disarm(mut self) {
        self.pidfd = None;
    }
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd {
            let _ = crate::spawn::pidfd_signal(pidfd, libc::SIGKILL);
        }
    }
}

/// Best effort: a host without CAP_SYS_RESOURCE refuses negative values.
fn set_oom_score_adj(pid: libc::pid_t, score: i32) {
    let path = format!("/proc/{pid}/oom_score_adj");
    if let Err(err) = std::fs::write(&path, score.to_string()) {
        tracing::warn!("cannot set oom_score_adj {score} for pid {pid}: {err}");
    }
}

/// The agent's ends of a process's stdio pipes (none with a pty).
struct AgentEnds {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// The child's stdio and the agent's ends of it.
fn make_stdio(prepared: &PreparedProcess, want_stdin: bool) -> io::Result<(ChildStdio, AgentEnds)> {
    if prepared.terminal {
        return Ok((
            ChildStdio::Pty {
                rows: prepared.console_size.0,
                columns: prepared.console_size.1,
            },
            AgentEnds {
                stdin: None,
                stdout: None,
                stderr: None,
            },
        ));
    }
    let (stdin_child, stdin_agent) = if want_stdin {
        let (read, write) = stdio::pipe()?;
        (read, Some(write))
    } else {
        (stdio::dev_null()?, None)
    };
    let (stdout_agent, stdout_child) = stdio::output_pipe()?;
    let (stderr_agent, stderr_child) = stdio::output_pipe()?;
    Ok((
        ChildStdio::Pipes {
            stdin: stdin_child,
            stdout: stdout_child,
            stderr: stderr_child,
        },
        AgentEnds {
            stdin: stdin_agent,
            stdout: Some(stdout_agent),
            stderr: Some(stderr_agent),
        },
    ))
}

/// The agent's side of a process's stdio, once the child is set up.
pub(super) struct AgentStdio {
    pub stdin: Option<StdinPipe>,
    pub stdout: OutputPipe,
    pub stderr: OutputPipe,
    /// A duplicate of the pty master, for resizes.
    pub pty: Option<OwnedFd>,
}

fn agent_stdio(ends: AgentEnds, pty_master: Option<OwnedFd>) -> io::Result<AgentStdio> {
    if let Some(master) = pty_master {
        let stdin = StdinPipe::new(dup(&master)?, true)?;
        let resize = dup(&master)?;
        let stdout = OutputPipe::new("stdout", master, true)?;
        return Ok(AgentStdio {
            stdin: Some(stdin),
            stdout,
            stderr: OutputPipe::finished("stderr"),
            pty: Some(resize),
        });
    }
    let stdin = ends.stdin.map(|fd| StdinPipe::new(fd, false)).transpose()?;
    let stdout = match ends.stdout {
        Some(fd) => OutputPipe::new("stdout", fd, false)?,
        None => OutputPipe::finished("stdout"),
    };
    let stderr = match ends.stderr {
        Some(fd) => OutputPipe::new("stderr", fd, false)?,
        None => OutputPipe::finished("stderr"),
    };
    Ok(AgentStdio {
        stdin,
        stdout,
        stderr,
        pty: None,
    })
}
