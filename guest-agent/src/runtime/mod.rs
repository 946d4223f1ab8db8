//! The OCI runtime of the pod: containers, their processes and the pod's
//! shared PID namespace. The gRPC layer ([`crate::server`]) only maps
//! requests onto this.
//!
//! Locks: `containers` and each container's `execs` are std mutexes held
//! only for map lookups and inserts, never across an await; take
//! `containers` before `execs` when both are needed.

pub mod error;
pub mod process;

use crate::cgroup::{CgroupRoot, CgroupStats, ContainerCgroup};
use crate::events::{AgentEvent, EventBus, OomWatcher};
use crate::oci::{self, process::PreparedProcess, seccomp::CompiledSeccomp};
use crate::spawn::plan::{ChildPlan, ChildStdio, SeccompProgram};
use crate::spawn::sync::{self, SyncSocket};
use crate::spawn::{Spawned, Spawner};
use crate::stdio::{self, OutputPipe, StdinPipe};
pub use error::{validate_id, RuntimeError};
use oci_spec::runtime::{LinuxResources, Process as OciProcess};
use process::{await_setup, describe_failure, Process, SetupOutcome, StepLabels};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

/// How long removal waits for a container's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Namespaces an exec enters through the init's pidfd (PID is entered on
/// the spawner thread).
const EXEC_NAMESPACES: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A container's state, as containerd names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerStatus {
    Created,
    Running,
    Stopped,
}

impl ContainerStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

enum Slot<T> {
    /// Reserved by a create (or exec) in progress.
    Reserved,
    Ready(Arc<T>),
}

pub struct Container {
    pub id: String,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Slot<Process>>>,
    /// The sync socket of the waiting init, until Start takes it.
    start: tokio::sync::Mutex<Option<SyncSocket>>,
    started: std::sync::atomic::AtomicBool,
    removing: std::sync::atomic::AtomicBool,
    cgroup: ContainerCgroup,
    cgroup_fd: OwnedFd,
    seccomp: Option<Arc<CompiledSeccomp>>,
    rootfs: PathBuf,
    labels: StepLabels,
}

impl Container {
    pub fn status(&self) -> ContainerStatus {
        if self.init.exited().is_some() {
            ContainerStatus::Stopped
        } else if self.started.load(std::sync::atomic::Ordering::Acquire) {
            ContainerStatus::Running
        } else {
            ContainerStatus::Created
        }
    }

    pub fn exec_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.execs)
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready(_)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut processes = vec![Arc::clone(&self.init)];
        processes.extend(lock(&self.execs).values().filter_map(|slot| match slot {
            Slot::Ready(process) => Some(Arc::clone(process)),
            Slot::Reserved => None,
        }));
        processes
    }
}

pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub spec_json: &'a [u8],
    pub bundle: Option<&'a Path>,
    pub stdin: bool,
}

pub struct ExecRequest<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
    pub process_json: &'a [u8],
    pub stdin: bool,
}

/// The pod's own PID namespace, held by a sleeping process.
struct PodPidNamespace {
    holder: Spawned,
    namespace: OwnedFd,
}

pub struct Runtime {
    cgroups: CgroupRoot,
    spawner: Spawner,
    events: EventBus,
    oom: Arc<OomWatcher>,
    containers: Mutex<HashMap<String, Slot<Container>>>,
    pod_pid: Mutex<Option<PodPidNamespace>>,
    last_capability: u32,
}

/// Removes a reservation unless disarmed (the create or exec failed).
struct Reservation<'a, T> {
    map: &'a Mutex<HashMap<String, Slot<T>>>,
    id: String,
    armed: bool,
}

impl<T> Reservation<'_, T> {
    fn fill(mut self, value: Arc<T>) {
        lock(self.map).insert(self.id.clone(), Slot::Ready(value));
        self.armed = false;
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            lock(self.map).remove(&self.id);
        }
    }
}

fn reserve<'a, T>(
    map: &'a Mutex<HashMap<String, Slot<T>>>,
    id: &str,
    exists: impl FnOnce() -> RuntimeError,
) -> Result<Reservation<'a, T>, RuntimeError> {
    let mut guard = lock(map);
    if guard.contains_key(id) {
        return Err(exists());
    }
    guard.insert(id.to_owned(), Slot::Reserved);
    Ok(Reservation {
        map,
        id: id.to_owned(),
        armed: true,
    })
}

/// Kills a half-made process unless disarmed.
struct KillOnDrop<'a> {
    pidfd: Option<&'a OwnedFd>,
}

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd {
            let _ = crate::spawn::pidfd_signal(pidfd, libc::SIGKILL);
        }
    }
}

fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(40)
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}

fn dup(fd: &OwnedFd) -> io::Result<OwnedFd> {
    let duplicate = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor owned by no one else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(duplicate) })
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

/// The agent's side of stdio once the child is set up.
fn agent_stdio(
    ends: AgentEnds,
    pty_master: Option<OwnedFd>,
) -> io::Result<(Option<StdinPipe>, OutputPipe, OutputPipe, Option<OwnedFd>)> {
    if let Some(master) = pty_master {
        let stdin = StdinPipe::new(dup(&master)?, true)?;
        let resize = dup(&master)?;
        let stdout = OutputPipe::new("stdout", master, true)?;
        return Ok((
            Some(stdin),
            stdout,
            OutputPipe::finished("stderr"),
            Some(resize),
        ));
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
    Ok((stdin, stdout, stderr, None))
}

impl Runtime {
    pub fn new(
        cgroup_root: &Path,
        events: EventBus,
        reaper: Arc<crate::spawn::Reaper>,
    ) -> Result<Self, RuntimeError> {
        let cgroups = CgroupRoot::open(cgroup_root).map_err(|source| RuntimeError::Cgroup {
            id: "(agent)".into(),
            source,
        })?;
        let spawner = Spawner::start(reaper).map_err(|source| RuntimeError::Io {
            id: "(agent)".into(),
            what: "starting the spawner thread".into(),
            source,
        })?;
        let oom = OomWatcher::start(events.clone()).map_err(|source| RuntimeError::Io {
            id: "(agent)".into(),
            what: "starting the OOM watcher".into(),
            source,
        })?;
        Ok(Self {
            cgroups,
            spawner,
            events,
            oom,
            containers: Mutex::new(HashMap::new()),
            pod_pid: Mutex::new(None),
            last_capability: last_capability(),
        })
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>, RuntimeError> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(container)) => Ok(Arc::clone(container)),
            _ => Err(RuntimeError::ContainerNotFound(id.to_owned())),
        }
    }

    pub fn containers(&self) -> Vec<Arc<Container>> {
        let mut list: Vec<Arc<Container>> = lock(&self.containers)
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(container) => Some(Arc::clone(container)),
                Slot::Reserved => None,
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub fn process(&self, container_id: &str, exec_id: &str) -> Result<Arc<Process>, RuntimeError> {
        let container = self.container(container_id)?;
        if exec_id.is_empty() {
            return Ok(Arc::clone(&container.init));
        }
        let found = match lock(&container.execs).get(exec_id) {
            Some(Slot::Ready(process)) => Some(Arc::clone(process)),
            _ => None,
        };
        found.ok_or_else(|| RuntimeError::ProcessNotFound {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
        })
    }

    /// Sets a container up and leaves its process waiting for Start.
    pub async fn create(&self, request: CreateRequest<'_>) -> Result<u32, RuntimeError> {
        let id = request.id;
        validate_id("container", id)?;
        let reservation = reserve(&self.containers, id, || {
            RuntimeError::ContainerExists(id.to_owned())
        })?;
        let spec_error = |source| RuntimeError::Spec {
            id: id.to_owned(),
            source,
        };
        let spec = oci::parse_spec(request.spec_json).map_err(spec_error)?;
        let oci_process = spec
            .process()
            .as_ref()
            .ok_or(oci::SpecError::Missing("process"))
            .map_err(spec_error)?;
        let pod_pid = lock(&self.pod_pid)
            .as_ref()
            .map(|pod| dup(&pod.namespace))
            .transpose()
            .map_err(RuntimeError::PodNamespace)?;
        let namespaces = oci::namespace_plan(&spec, pod_pid.is_some()).map_err(spec_error)?;
        let cgroup_error = |source| RuntimeError::Cgroup {
            id: id.to_owned(),
            source,
        };
        let cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.cgroups_path().clone());
        let cgroup_dir = self
            .cgroups
            .container_dir(cgroups_path.as_deref(), id)
            .map_err(cgroup_error)?;
        let setup = oci::container_setup(&spec, request.bundle, &namespaces, &cgroup_dir)
            .map_err(spec_error)?;
        let prepared =
            oci::process::prepare(oci_process, Some(&setup.rootfs_path), self.last_capability)
                .map_err(spec_error)?;
        for name in setup
            .seccomp
            .as_ref()
            .map(|seccomp| seccomp.skipped_syscalls.as_slice())
            .unwrap_or_default()
        {
            tracing::debug!(
                container = id,
                "seccomp: no syscall {name} on this architecture"
            );
        }
        if spec.hooks().is_some() {
            tracing::warn!(
                container = id,
                "ignoring OCI hooks: host hooks cannot run in the VM"
            );
        }

        let cgroup = self
            .cgroups
            .create(&cgroup_dir, setup.resources.as_ref())
            .map_err(cgroup_error)?;
        let io_error = |what: &str| {
            let what = what.to_owned();
            move |source| RuntimeError::Io {
                id: id.to_owned(),
                what,
                source,
            }
        };
        let result = async {
            let cgroup_fd = open_dir(cgroup.dir()).map_err(io_error("opening the cgroup"))?;
            let (child_stdio, ends) =
                make_stdio(&prepared, request.stdin).map_err(io_error("making stdio pipes"))?;
            let (sync_agent, sync_child) =
                sync::pair().map_err(io_error("making the sync socket"))?;
            let sync_socket = SyncSocket::new(sync_agent).map_err(io_error("the sync socket"))?;
            let labels = StepLabels {
                setup: setup.labels.clone(),
                program: prepared.program.clone(),
                search_path: prepared.search_path.clone(),
                cwd: oci_process.cwd().display().to_string(),
                rlimits: prepared.rlimit_labels.clone(),
                user: format!(
                    "uid {} gid {}",
                    prepared.credentials.uid, prepared.credentials.gid
                ),
            };
            let seccomp = setup.seccomp.map(Arc::new);
            let (seccomp_programs, seccomp_flags) = seccomp_programs(seccomp.as_deref());
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
                oom_score_adj,
                ..
            } = prepared;
            let plan = ChildPlan {
                new_namespaces: namespaces.new_namespaces,
                join_pid_namespace: if namespaces.join_pod_pid {
                    pod_pid
                } else {
                    None
                },
                setns: Vec::new(),
                cgroup: Some(dup(&cgroup_fd).map_err(io_error("duplicating the cgroup fd"))?),
                sync: sync_child,
                stdio: child_stdio,
                rootfs: Some(setup.rootfs),
                hostname: setup.hostname,
                domainname: setup.domainname,
                sysctls: setup.sysctls,
                rlimits,
                io_priority,
                umask,
                credentials,
                capabilities,
                last_capability: self.last_capability,
                no_new_privileges,
                seccomp: seccomp_programs,
                seccomp_flags,
                cwd,
                exec_candidates,
                argv,
                envp,
                wait_for_start: true,
                namespace_holder: false,
            };
            let spawned = self
                .spawner
                .spawn(plan)
                .await
                .map_err(io_error("clone3 of the container process"))?;
            let kill_guard = KillOnDrop {
                pidfd: Some(&spawned.pidfd),
            };
            if let Some(score) = oom_score_adj {
                set_oom_score_adj(spawned.pid, score);
            }
            let outcome = await_setup(&sync_socket, true)
                .await
                .map_err(io_error("reading the sync socket"))?;
            let pty_master = match outcome {
                SetupOutcome::Done { pty_master } => pty_master,
                SetupOutcome::Failed { step, index, errno } => {
                    let (step, code) = describe_failure(step, index, &labels);
                    return Err(RuntimeError::Setup {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                        step,
                        code,
                        source: io::Error::from_raw_os_error(errno),
                    });
                }
                SetupOutcome::Closed => {
                    return Err(RuntimeError::ExitedDuringSetup {
                        container_id: id.to_owned(),
                        exec_id: String::new(),
                    })
                }
            };
            let (stdin, stdout, stderr, pty) =
                agent_stdio(ends, pty_master).map_err(io_error("stdio"))?;
            drop(kill_guard_disarm(kill_guard));
            Ok((
                spawned,
                stdin,
                stdout,
                stderr,
                pty,
                cgroup_fd,
                sync_socket,
                seccomp,
                labels,
            ))
        }
        .await;
        let (spawned, stdin, stdout, stderr, pty, cgroup_fd, sync_socket, seccomp, labels) =
            match result {
                Ok(parts) => parts,
                Err(err) => {
                    if let Err(cleanup) = cgroup.destroy(KILL_TIMEOUT).await {
                        tracing::warn!(
                            container = id,
                            "cleaning up after a failed create: {cleanup}"
                        );
                    }
                    return Err(err);
                }
            };
        let pid = u32::try_from(spawned.pid).unwrap_or_default();
        let init = self.track_process(id, "", spawned, stdin, stdout, stderr, pty, true);
        self.oom.watch(id, &cgroup.memory_events_path());
        let container = Arc::new(Container {
            id: id.to_owned(),
            init,
            execs: Mutex::new(HashMap::new()),
            start: tokio::sync::Mutex::new(Some(sync_socket)),
            started: std::sync::atomic::AtomicBool::new(false),
            removing: std::sync::atomic::AtomicBool::new(false),
            cgroup,
            cgroup_fd,
            seccomp,
            rootfs: setup.rootfs_path,
            labels,
        });
        reservation.fill(container);
        tracing::info!(container = id, pid, "created");
        Ok(pid)
    }

    /// Wraps a spawned process and starts the task that records its exit
    /// and publishes it.
    #[allow(clippy::too_many_arguments)]
    fn track_process(
        &self,
        container_id: &str,
        exec_id: &str,
        spawned: Spawned,
        stdin: Option<StdinPipe>,
        stdout: OutputPipe,
        stderr: OutputPipe,
        pty: Option<OwnedFd>,
        is_init: bool,
    ) -> Arc<Process> {
        let (exit_tx, exit_rx) = watch::channel(None);
        let pid = u32::try_from(spawned.pid).unwrap_or_default();
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

    /// Lets a created container's process execve.
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let container = self.container(id)?;
        let wrong_state = |container: &Container| RuntimeError::WrongState {
            id: id.to_owned(),
            state: container.status().name(),
            action: "start",
            needed: "created",
        };
        let mut start = container.start.lock().await;
        let Some(sync_socket) = start.take() else {
            return Err(wrong_state(&container));
        };
        if container.init.exited().is_some() {
            return Err(wrong_state(&container));
        }
        let io_error = |what: &'static str| {
            move |source| RuntimeError::Io {
                id: id.to_owned(),
                what: what.into(),
                source,
            }
        };
        sync_socket
            .send_start()
            .await
            .map_err(|_| RuntimeError::ExitedDuringSetup {
                container_id: id.to_owned(),
                exec_id: String::new(),
            })?;
        let outcome = await_setup(&sync_socket, false).await;
        match outcome.map_err(io_error("reading the sync socket"))? {
            SetupOutcome::Done { .. } | SetupOutcome::Closed => {
                container
                    .started
                    .store(true, std::sync::atomic::Ordering::Release);
                tracing::info!(container = id, "started");
                Ok(())
            }
            SetupOutcome::Failed { step, index, errno } => {
                let (step, code) = describe_failure(step, index, &container.labels);
                Err(RuntimeError::Setup {
                    container_id: id.to_owned(),
                    exec_id: String::new(),
                    step,
                    code,
                    source: io::Error::from_raw_os_error(errno),
                })
            }
        }
    }

    /// Starts a process in a running container.
    pub async fn exec(&self, request: ExecRequest<'_>) -> Result<u32, RuntimeError> {
        let ExecRequest {
            container_id,
            exec_id,
            process_json,
            stdin,
        } = request;
        validate_id("exec", exec_id)?;
        let container = self.container(container_id)?;
        let status = container.status();
        if status != ContainerStatus::Running
            || container
                .removing
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(RuntimeError::WrongState {
                id: container_id.to_owned(),
                state: status.name(),
                action: "exec",
                needed: "running",
            });
        }
        let reservation = reserve(&container.execs, exec_id, || RuntimeError::ExecExists {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
        })?;
        let spec_error = |source| RuntimeError::Spec {
            id: container_id.to_owned(),
            source,
        };
        let oci_process: OciProcess = serde_json::from_slice(process_json)
            .map_err(oci::SpecError::Parse)
            .map_err(spec_error)?;
        let prepared =
            oci::process::prepare(&oci_process, Some(&container.rootfs), self.last_capability)
                .map_err(spec_error)?;
        let io_error = |what: &str| {
            let what = what.to_owned();
            move |source| RuntimeError::Io {
                id: container_id.to_owned(),
                what,
                source,
            }
        };
        let (child_stdio, ends) =
            make_stdio(&prepared, stdin).map_err(io_error("making stdio pipes"))?;
        let (sync_agent, sync_child) = sync::pair().map_err(io_error("making the sync socket"))?;
        let sync_socket = SyncSocket::new(sync_agent).map_err(io_error("the sync socket"))?;
        let labels = StepLabels {
            program: prepared.program.clone(),
            search_path: prepared.search_path.clone(),
            cwd: oci_process.cwd().display().to_string(),
            rlimits: prepared.rlimit_labels.clone(),
            user: format!(
                "uid {} gid {}",
                prepared.credentials.uid, prepared.credentials.gid
            ),
            ..StepLabels::default()
        };
        let (seccomp, seccomp_flags) = seccomp_programs(container.seccomp.as_deref());
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
            oom_score_adj,
            ..
        } = prepared;
        let init_pidfd = &container.init.pidfd;
        let plan = ChildPlan {
            new_namespaces: 0,
            join_pid_namespace: Some(dup(init_pidfd).map_err(io_error("duplicating the pidfd"))?),
            setns: vec![(
                dup(init_pidfd).map_err(io_error("duplicating the pidfd"))?,
                EXEC_NAMESPACES,
            )],
            cgroup: Some(dup(&container.cgroup_fd).map_err(io_error("duplicating the cgroup fd"))?),
            sync: sync_child,
            stdio: child_stdio,
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
        let spawned = self
            .spawner
            .spawn(plan)
            .await
            .map_err(io_error("clone3 of the exec process"))?;
        let kill_guard = KillOnDrop {
            pidfd: Some(&spawned.pidfd),
        };
        if let Some(score) = oom_score_adj {
            set_oom_score_adj(spawned.pid, score);
        }
        let pty_master = match await_setup(&sync_socket, false)
            .await
            .map_err(io_error("reading the sync socket"))?
        {
            SetupOutcome::Done { pty_master } => pty_master,
            SetupOutcome::Closed => None,
            SetupOutcome::Failed { step, index, errno } => {
                let (step, code) = describe_failure(step, index, &labels);
                return Err(RuntimeError::Setup {
                    container_id: container_id.to_owned(),
                    exec_id: exec_id.to_owned(),
                    step,
                    code,
                    source: io::Error::from_raw_os_error(errno),
                });
            }
        };
        let (stdin, stdout, stderr, pty) =
            agent_stdio(ends, pty_master).map_err(io_error("stdio"))?;
        drop(kill_guard_disarm(kill_guard));
        let pid = u32::try_from(spawned.pid).unwrap_or_default();
        let process = self.track_process(
            container_id,
            exec_id,
            spawned,
            stdin,
            stdout,
            stderr,
            pty,
            false,
        );
        reservation.fill(process);
        tracing::debug!(
            container = container_id,
            exec = exec_id,
            pid,
            "exec started"
        );
        Ok(pid)
    }

    pub fn signal(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), RuntimeError> {
        let Ok(signal_number) = libc::c_int::try_from(signal) else {
            return Err(RuntimeError::BadSignal(signal));
        };
        if !(1..=libc::SIGRTMAX()).contains(&signal_number) {
            return Err(RuntimeError::BadSignal(signal));
        }
        let process = self.process(container_id, exec_id)?;
        if all && exec_id.is_empty() {
            let container = self.container(container_id)?;
            let pids = container
                .cgroup
                .pids()
                .map_err(|source| RuntimeError::Cgroup {
                    id: container_id.to_owned(),
                    source,
                })?;
            if pids.is_empty() && process.exited().is_some() {
                return Err(RuntimeError::Exited {
                    container_id: container_id.to_owned(),
                    exec_id: String::new(),
                });
            }
            for pid in pids {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: kill takes integers; the pids are in the
                    // container's cgroup.
                    unsafe { libc::kill(pid, signal_number) };
                }
            }
            return Ok(());
        }
        process.signal(signal_number)
    }

    /// Kills (with `force`) and removes a container: its processes, cgroup
    /// and pipes. Its mounts lived in its mount namespace and are gone
    /// with its last process.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let container = self.container(id)?;
        let status = container.status();
        if status == ContainerStatus::Running && !force {
            return Err(RuntimeError::WrongState {
                id: id.to_owned(),
                state: status.name(),
                action: "remove without force",
                needed: "created or stopped",
            });
        }
        container
            .removing
            .store(true, std::sync::atomic::Ordering::Release);
        // A created container's process never ran user code: kill it.
        container.start.lock().await.take();
        container.cgroup.kill_all();
        let _ = crate::spawn::pidfd_signal(&container.init.pidfd, libc::SIGKILL);
        for process in container.all_processes() {
            if tokio::time::timeout(KILL_TIMEOUT, process.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    container = id,
                    pid = process.pid,
                    "process did not die after SIGKILL"
                );
            }
        }
        container
            .cgroup
            .destroy(KILL_TIMEOUT)
            .await
            .map_err(|source| RuntimeError::Cgroup {
                id: id.to_owned(),
                source,
            })?;
        self.oom.unwatch(id);
        lock(&self.containers).remove(id);
        tracing::info!(container = id, "removed");
        Ok(())
    }

    /// Force-removes every container (sandbox teardown, power off).
    pub async fn remove_all(&self) -> Vec<RuntimeError> {
        let mut errors = Vec::new();
        for container in self.containers() {
            if let Err(err) = self.remove(&container.id, true).await {
                errors.push(err);
            }
        }
        errors
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), RuntimeError> {
        let container = self.container(id)?;
        let resources: LinuxResources =
            serde_json::from_slice(resources_json).map_err(|err| RuntimeError::Spec {
                id: id.to_owned(),
                source: oci::SpecError::Parse(err),
            })?;
        container
            .cgroup
            .apply(&resources)
            .map_err(|source| RuntimeError::Cgroup {
                id: id.to_owned(),
                source,
            })
    }

    pub fn stats(&self, id: &str) -> Result<(CgroupStats, u32), RuntimeError> {
        let container = self.container(id)?;
        let init_pid = if container.init.exited().is_none() {
            container.init.pid
        } else {
            0
        };
        Ok((container.cgroup.stats(), init_pid))
    }

    pub fn pids(&self, id: &str) -> Result<Vec<u32>, RuntimeError> {
        let container = self.container(id)?;
        container
            .cgroup
            .pids()
            .map_err(|source| RuntimeError::Cgroup {
                id: id.to_owned(),
                source,
            })
    }

    /// Starts the process that holds the pod's PID namespace.
    pub async fn create_pod_pid_namespace(&self) -> Result<(), RuntimeError> {
        if lock(&self.pod_pid).is_some() {
            return Ok(());
        }
        let pod_error = RuntimeError::PodNamespace;
        let (sync_agent, sync_child) = sync::pair().map_err(pod_error)?;
        let plan = ChildPlan {
            new_namespaces: libc::CLONE_NEWPID as u64,
            join_pid_namespace: None,
            setns: Vec::new(),
            cgroup: None,
            sync: sync_child,
            stdio: ChildStdio::Pipes {
                stdin: stdio::dev_null().map_err(pod_error)?,
                stdout: stdio::dev_null().map_err(pod_error)?,
                stderr: stdio::dev_null().map_err(pod_error)?,
            },
            rootfs: None,
            hostname: None,
            domainname: None,
            sysctls: Vec::new(),
            rlimits: Vec::new(),
            io_priority: None,
            umask: None,
            credentials: crate::spawn::plan::Credentials {
                uid: 0,
                gid: 0,
                additional_gids: Vec::new(),
            },
            capabilities: None,
            last_capability: self.last_capability,
            no_new_privileges: false,
            seccomp: Vec::new(),
            seccomp_flags: 0,
            cwd: c"/".to_owned(),
            exec_candidates: Vec::new(),
            argv: crate::spawn::plan::CStringArray::new(Vec::new()),
            envp: crate::spawn::plan::CStringArray::new(Vec::new()),
            wait_for_start: false,
            namespace_holder: true,
        };
        let holder = self.spawner.spawn(plan).await.map_err(pod_error)?;
        drop(sync_agent);
        let namespace =
            std::fs::File::open(format!("/proc/{}/ns/pid", holder.pid)).map_err(pod_error)?;
        *lock(&self.pod_pid) = Some(PodPidNamespace {
            holder,
            namespace: namespace.into(),
        });
        Ok(())
    }

    pub fn destroy_pod_pid_namespace(&self) {
        if let Some(pod) = lock(&self.pod_pid).take() {
            let _ = crate::spawn::pidfd_signal(&pod.holder.pidfd, libc::SIGKILL);
        }
    }

    pub fn has_pod_pid_namespace(&self) -> bool {
        lock(&self.pod_pid).is_some()
    }
}

fn kill_guard_disarm(mut guard: KillOnDrop<'_>) -> KillOnDrop<'_> {
    guard.pidfd = None;
    guard
}

/// Best effort: a host without CAP_SYS_RESOURCE refuses negative values.
fn set_oom_score_adj(pid: libc::pid_t, score: i32) {
    let path = format!("/proc/{pid}/oom_score_adj");
    if let Err(err) = std::fs::write(&path, score.to_string()) {
        tracing::warn!("cannot set oom_score_adj {score} for pid {pid}: {err}");
    }
}
