//! The OCI runtime of the pod: containers, their processes and the pod's
//! shared PID namespace. The gRPC layer ([`crate::server`]) only maps
//! requests onto this. Both a container's first process and an exec start
//! through [`launch`].
//!
//! Locks: `containers` and each container's `execs` are std mutexes held
//! only for map lookups and inserts, never across an await; take
//! `containers` before `execs` when both are needed.

pub mod error;
mod launch;
pub mod process;

use crate::cgroup::{CgroupRoot, CgroupStats, ContainerCgroup};
use crate::events::{EventBus, OomWatcher};
use crate::lock::lock;
use crate::oci::NamespacePlan;
use crate::oci::{self, process::PreparedProcess, seccomp::CompiledSeccomp, ContainerSetup};
use crate::spawn::plan::{ChildPlan, ChildStdio};
use crate::spawn::sync::{self, SyncSocket};
use crate::spawn::{Spawned, Spawner};
use crate::stdio;
pub use error::{validate_id, RuntimeError};
use launch::{io_error, LaunchRequest, Launched, NewContainer, Placement};
use oci_spec::runtime::{LinuxResources, Process as OciProcess};
use process::{await_setup, describe_failure, Process, SetupOutcome, StepLabels};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long removal waits for a container's processes to die.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What Create learns from the spec before it makes anything.
struct ContainerPlan {
    namespaces: NamespacePlan,
    /// A duplicate of the pod's PID namespace, when the spec joins it.
    pod_pid: Option<OwnedFd>,
    cgroup_dir: PathBuf,
    setup: ContainerSetup,
    process: PreparedProcess,
    /// The spec's process.cwd, for messages.
    cwd_label: String,
}

/// A container's first process, waiting for Start, and what the container
/// keeps of its making.
struct StartedInit {
    launched: Launched,
    cgroup_fd: OwnedFd,
    seccomp: Option<Arc<CompiledSeccomp>>,
    rootfs_path: PathBuf,
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
        let plan = self.plan_container(&request)?;
        let cgroup = self
            .cgroups
            .create(&plan.cgroup_dir, plan.setup.resources.as_ref())
            .map_err(|source| RuntimeError::Cgroup {
                id: id.to_owned(),
                source,
            })?;
        let init = match self.start_init(id, request.stdin, &cgroup, plan).await {
            Ok(init) => init,
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
        let StartedInit {
            launched,
            cgroup_fd,
            seccomp,
            rootfs_path,
        } = init;
        let pid = launched.process.pid;
        self.oom.watch(id, &cgroup.memory_events_path());
        let container = Arc::new(Container {
            id: id.to_owned(),
            init: launched.process,
            execs: Mutex::new(HashMap::new()),
            start: tokio::sync::Mutex::new(Some(launched.sync)),
            started: std::sync::atomic::AtomicBool::new(false),
            removing: std::sync::atomic::AtomicBool::new(false),
            cgroup,
            cgroup_fd,
            seccomp,
            rootfs: rootfs_path,
            labels: launched.labels,
        });
        reservation.fill(container);
        tracing::info!(container = id, pid, "created");
        Ok(pid)
    }

    /// Reads what Create needs from the spec, before anything is made.
    fn plan_container(&self, request: &CreateRequest<'_>) -> Result<ContainerPlan, RuntimeError> {
        let id = request.id;
        let spec_error = |source| RuntimeError::Spec {
            id: id.to_owned(),
            source,
        };
        let mut spec = oci::parse_spec(request.spec_json).map_err(spec_error)?;
        if oci::privileged::is_privileged(&spec, self.last_capability).map_err(spec_error)? {
            let guest = oci::privileged::guest_devices(Path::new(oci::privileged::GUEST_DEV));
            let added = oci::privileged::add_devices(&mut spec, guest);
            tracing::info!(
                container = id,
                "privileged: given the guest's devices {added:?}"
            );
        }
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
        let cgroups_path = spec
            .linux()
            .as_ref()
            .and_then(|linux| linux.cgroups_path().clone());
        let cgroup_dir = self
            .cgroups
            .container_dir(cgroups_path.as_deref(), id)
            .map_err(|source| RuntimeError::Cgroup {
                id: id.to_owned(),
                source,
            })?;
        let setup = oci::container_setup(&spec, request.bundle, &namespaces, &cgroup_dir)
            .map_err(spec_error)?;
        let process =
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
        Ok(ContainerPlan {
            pod_pid: if namespaces.join_pod_pid {
                pod_pid
            } else {
                None
            },
            namespaces,
            cgroup_dir,
            setup,
            process,
            cwd_label: oci_process.cwd().display().to_string(),
        })
    }

    /// Starts a container's first process in the container's new cgroup,
    /// up to where it waits for Start.
    async fn start_init(
        &self,
        id: &str,
        stdin: bool,
        cgroup: &ContainerCgroup,
        plan: ContainerPlan,
    ) -> Result<StartedInit, RuntimeError> {
        let cgroup_fd = open_dir(cgroup.dir()).map_err(io_error(id, "opening the cgroup"))?;
        let ContainerPlan {
            namespaces,
            pod_pid,
            cgroup_dir: _,
            setup,
            process,
            cwd_label,
        } = plan;
        let ContainerSetup {
            rootfs_path,
            rootfs,
            hostname,
            domainname,
            sysctls,
            seccomp,
            labels,
            resources: _,
        } = setup;
        let seccomp = seccomp.map(Arc::new);
        let launched = self
            .launch(LaunchRequest {
                container_id: id,
                exec_id: "",
                process,
                cwd_label,
                stdin,
                seccomp: seccomp.as_deref(),
                placement: Placement::Init(Box::new(NewContainer {
                    new_namespaces: namespaces.new_namespaces,
                    pod_pid,
                    cgroup: &cgroup_fd,
                    rootfs,
                    hostname,
                    domainname,
                    sysctls,
                    labels,
                })),
            })
            .await?;
        Ok(StartedInit {
            launched,
            cgroup_fd,
            seccomp,
            rootfs_path,
        })
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
        let process =
            oci::process::prepare(&oci_process, Some(&container.rootfs), self.last_capability)
                .map_err(spec_error)?;
        let launched = self
            .launch(LaunchRequest {
                container_id,
                exec_id,
                process,
                cwd_label: oci_process.cwd().display().to_string(),
                stdin,
                seccomp: container.seccomp.as_deref(),
                placement: Placement::Exec {
                    init_pidfd: &container.init.pidfd,
                    cgroup: &container.cgroup_fd,
                },
            })
            .await?;
        let pid = launched.process.pid;
        reservation.fill(launched.process);
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
