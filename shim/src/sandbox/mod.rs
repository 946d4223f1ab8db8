//! The sandbox: the pod and its containers, the task logic behind the
//! ttrpc adapter ([`crate::service`]). It talks to the guest only through
//! [`PodAgent`] (the tonic client, or a fake in the tests) and to the pod's
//! host side only through [`PodHost`] ([`crate::pod::Pod`], or a fake); a
//! [`PodBooter`] boots the pod on the first Create. So every method here
//! can be tested without a VM (`sandbox::tests`).
//!
//! - this file: [`Sandbox`], the pod slot and the task methods;
//! - [`container`]: one container, its init and its execs;
//! - `watch`: the watchers (VM death, OOM events, each process's exit);
//! - `io`: a process's stdio wired to the agent's streams;
//! - [`stats`]: the agent's cgroup figures as containerd's v2 Metrics.
//!
//! Every error is a [`ShimError`], whose `code()` is the ttrpc code.
//!
//! Lock order: the pod slot (a tokio mutex, held across the boot and the
//! pod's shutdown) before the containers map or a container's execs (std
//! mutexes, never held across an await).

pub mod agent;
pub mod container;
#[cfg(test)]
mod fake;
pub mod host;
mod io;
pub mod stats;
#[cfg(test)]
mod tests;
mod watch;

pub use agent::{AgentExit, EventStream, NewContainer, PodAgent};
pub use container::Container;
pub use host::PodHost;

use crate::config::Config;
use crate::error::ShimError;
use crate::events::{EventQueue, TaskEvent};
use crate::pod::{error_chain, BootError, PodSettings};
use crate::process::{Process, StdioPaths};
use crate::rootfs::RootfsError;
use crate::state::{ExitStatus, Op, Status};
use crate::stdio::{self, process_ref};
use async_trait::async_trait;
use container::lock;
use containerd_shim::protos::api::Mount as ContainerdMount;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch as tokio_watch;

/// Exit status reported for processes of a VM that died.
pub const VM_DIED_EXIT_STATUS: u32 = 255;
/// How long after a process exits its output may still be drained.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a clean-up call to the agent (remove, signal) may take: a hung
/// agent must not hang containerd's Delete or Kill.
pub const AGENT_CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a broken agent stream waits for the VM's exit to show.
pub const VM_EXIT_GRACE: Duration = Duration::from_secs(3);

/// A booted pod's two handles.
#[derive(Debug, Clone)]
pub struct BootedPod {
    pub agent: Arc<dyn PodAgent>,
    pub host: Arc<dyn PodHost>,
}

/// Boots the pod on its first Create: the VM in the product
/// (`service::VmBooter`), a fake in the tests.
#[async_trait]
pub trait PodBooter: Send + Sync {
    async fn boot(
        &self,
        config: &Config,
        pod_id: &str,
        settings: PodSettings,
    ) -> Result<BootedPod, BootError>;
}

/// The booted pod in the sandbox's slot, and whether its VM died.
#[derive(Debug)]
struct LivePod {
    agent: Arc<dyn PodAgent>,
    host: Arc<dyn PodHost>,
    /// `Some(what exited)` once the VM died: agent calls fail at once.
    dead: tokio_watch::Sender<Option<String>>,
}

impl LivePod {
    fn new(booted: BootedPod) -> Self {
        Self {
            agent: booted.agent,
            host: booted.host,
            dead: tokio_watch::Sender::new(None),
        }
    }

    /// One agent call, named `what` in its error; a VM that is dead (or
    /// dies while the call waits) fails it with [`ShimError::VmDead`].
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, ShimError> {
        let mut dead = self.dead.subscribe();
        if let Some(exit) = dead.borrow_and_update().clone() {
            return Err(ShimError::VmDead { what, exit });
        }
        let died = async {
            let exit = dead.wait_for(Option::is_some).await.ok()?;
            exit.clone()
        };
        tokio::select! {
            result = call => result.map_err(|status| ShimError::agent(what, status)),
            Some(exit) = died => Err(ShimError::VmDead { what, exit }),
        }
    }
}

/// A container to create, decoded by the adapter.
#[derive(Debug)]
pub struct NewTask {
    pub id: String,
    pub bundle: String,
    pub spec: oci_spec::runtime::Spec,
    /// The shim config with the pod's annotations applied (boots the pod).
    pub config: Config,
    pub pod_id: String,
    pub settings: PodSettings,
    pub rootfs: Vec<ContainerdMount>,
    pub stdio: StdioPaths,
}

/// What State reports of one process.
#[derive(Debug, Clone)]
pub struct TaskState {
    /// The exec id, or the container id for init.
    pub id: String,
    pub bundle: String,
    pub pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
}

/// What Delete reports.
#[derive(Debug, Clone, Copy)]
pub struct Deleted {
    pub pid: u32,
    pub exit: Option<ExitStatus>,
}

struct Inner {
    events: EventQueue,
    booter: Box<dyn PodBooter>,
    pod: tokio::sync::Mutex<Option<Arc<LivePod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutting_down: AtomicBool,
}

/// The pod and its containers. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct Sandbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("containers", &lock(&self.inner.containers).len())
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    pub fn new(events: EventQueue, booter: Box<dyn PodBooter>) -> Self {
        Self {
            inner: Arc::new(Inner {
                events,
                booter,
                pod: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                shutting_down: AtomicBool::new(false),
            }),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ShimError> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::ContainerNotFound(id.to_owned()))
    }

    fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        self.container(id)?.process(exec_id)
    }

    async fn pod(&self) -> Result<Arc<LivePod>, ShimError> {
        self.inner
            .pod
            .lock()
            .await
            .clone()
            .ok_or(ShimError::PodNotRunning)
    }

    /// Refuses an id that is taken (before the adapter decodes the bundle).
    pub fn ensure_new(&self, id: &str) -> Result<(), ShimError> {
        if lock(&self.inner.containers).contains_key(id) {
            return Err(ShimError::ContainerExists(id.to_owned()));
        }
        Ok(())
    }

    /// The pod, booted on the first Create.
    async fn pod_for(
        &self,
        config: &Config,
        pod_id: &str,
        settings: PodSettings,
    ) -> Result<Arc<LivePod>, ShimError> {
        let mut slot = self.inner.pod.lock().await;
        if let Some(pod) = slot.as_ref() {
            if pod.host.id() != pod_id {
                return Err(ShimError::OtherPod {
                    serving: pod.host.id().to_owned(),
                    asked: pod_id.to_owned(),
                });
            }
            return Ok(pod.clone());
        }
        let booted = self
            .inner
            .booter
            .boot(config, pod_id, settings)
            .await
            .map_err(|err| {
                let err = ShimError::Boot(err);
                tracing::error!("pod {pod_id}: {}", error_chain(&err));
                err
            })?;
        let pod = Arc::new(LivePod::new(booted));
        self.watch_vm(&pod);
        self.watch_oom(&pod);
        *slot = Some(pod.clone());
        Ok(pod)
    }

    /// Creates the container (booting the pod first if needed); its pid.
    pub async fn create(&self, task: NewTask) -> Result<u32, ShimError> {
        self.ensure_new(&task.id)?;
        let pod = self
            .pod_for(&task.config, &task.pod_id, task.settings)
            .await?;
        let mut spec = task.spec;
        // The VM's host processes are the pod: its QoS OOM score, not
        // containerd's.
        if let Some(adj) = crate::oom_score::of_spec(&spec) {
            pod.host.set_oom_score(adj).await;
        }
        if let Err(err) = pod
            .host
            .prepare_container(&task.id, Path::new(&task.bundle), &task.rootfs, &mut spec)
            .await
        {
            // The create's own error is the one to report; a failed
            // removal is logged and counted where it happens.
            let _ = pod.host.remove_container(&task.id);
            return Err(err.into());
        }
        let spec_json = serde_json::to_vec(&spec).map_err(ShimError::SerializeSpec)?;
        let created = pod
            .call(
                "agent CreateContainer",
                pod.agent.create_container(NewContainer {
                    id: task.id.clone(),
                    spec_json,
                    stdin: !task.stdio.stdin.is_empty(),
                }),
            )
            .await;
        let pid = match created {
            Ok(pid) => pid,
            Err(err) => {
                let _ = pod.host.remove_container(&task.id);
                return Err(err);
            }
        };
        let process = Arc::new(Process::new(&task.id, "", task.stdio.clone()));
        process.set_pid(pid);
        self.start_io(&pod, &process);
        let container = Arc::new(Container::new(&task.id, &task.bundle, process));
        // Registered and queued under the map's lock: no other method can
        // see the container before its create event is queued.
        let mut containers = lock(&self.inner.containers);
        containers.insert(task.id.clone(), container);
        self.inner.events.push(TaskEvent::Create {
            container_id: task.id,
            bundle: task.bundle,
            stdin: task.stdio.stdin,
            stdout: task.stdio.stdout,
            stderr: task.stdio.stderr,
            terminal: task.stdio.terminal,
            pid,
        });
        Ok(pid)
    }

    /// Starts the container's init (empty `exec_id`) or an exec; its pid.
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ShimError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        process.check(Op::Start)?;
        let pod = self.pod().await?;
        if exec_id.is_empty() {
            pod.call("agent StartContainer", pod.agent.start_container(id))
                .await?;
            process.transition(Op::Start, &self.inner.events, |p, _| {
                Some(TaskEvent::Start {
                    container_id: p.container_id.clone(),
                    pid: p.pid(),
                })
            })?;
        } else {
            ensure_running(&container)?;
            let pid = pod
                .call(
                    "agent ExecProcess",
                    pod.agent.exec_process(
                        process_ref(id, exec_id),
                        process.exec_spec.clone(),
                        !process.stdio.stdin.is_empty(),
                    ),
                )
                .await?;
            process.set_pid(pid);
            self.start_io(&pod, &process);
            process.transition(Op::Start, &self.inner.events, |p, _| {
                Some(TaskEvent::ExecStarted {
                    container_id: p.container_id.clone(),
                    exec_id: p.exec_id.clone(),
                    pid: p.pid(),
                })
            })?;
        }
        self.watch_exit(&pod, &process);
        Ok(process.pid())
    }

    /// Deletes an exited (or never started) process; for init, the
    /// container with it.
    ///
    /// Delete runs to its end even if the caller stops waiting
    /// ([`run_to_completion`]): a container cut off mid-teardown would stay
    /// in the map, and the shim would then never shut down.
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted, ShimError> {
        let sandbox = self.clone();
        let (id, exec_id) = (id.to_owned(), exec_id.to_owned());
        run_to_completion(async move { sandbox.delete_now(&id, &exec_id).await }).await
    }

    async fn delete_now(&self, id: &str, exec_id: &str) -> Result<Deleted, ShimError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        process.check(Op::Delete)?;
        if exec_id.is_empty() {
            if let Ok(pod) = self.pod().await {
                // Not deleted while its host dir holds mounts: containerd
                // retries Delete, and the retry redoes the clean-up.
                teardown_container(&pod, &container)
                    .await
                    .map_err(|source| ShimError::Teardown {
                        id: id.to_owned(),
                        source,
                    })?;
            }
        }
        let mut deleted = None;
        process.transition(Op::Delete, &self.inner.events, |p, status| {
            deleted = Some(status);
            let exit = status.exit();
            p.exec_id.is_empty().then(|| TaskEvent::Delete {
                container_id: p.container_id.clone(),
                pid: p.pid(),
                exit_status: exit.map_or(0, |e| e.code),
                exited_at: exit.map_or_else(SystemTime::now, |e| e.at),
            })
        })?;
        if exec_id.is_empty() {
            lock(&self.inner.containers).remove(id);
        } else {
            lock(&container.execs).remove(exec_id);
        }
        Ok(Deleted {
            pid: process.pid(),
            exit: deleted.and_then(|status| status.exit()),
        })
    }

    pub async fn kill(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ShimError> {
        let process = self.process(id, exec_id)?;
        process.check(Op::Kill)?;
        let pod = self.pod().await?;
        let what = "agent SignalProcess";
        let signalled = pod.call(
            what,
            pod.agent
                .signal_process(process_ref(id, exec_id), signal, all),
        );
        tokio::time::timeout(AGENT_CLEANUP_TIMEOUT, signalled)
            .await
            .map_err(|_| ShimError::AgentTimeout {
                what,
                timeout: AGENT_CLEANUP_TIMEOUT,
            })??;
        // A created process killed before start exits too: Wait must see it.
        if process.status() == Status::Created {
            self.watch_exit(&pod, &process);
        }
        Ok(())
    }

    /// Adds an exec (started by [`Self::start`]); `spec` is its OCI Process.
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
    ) -> Result<(), ShimError> {
        let container = self.container(id)?;
        ensure_running(&container)?;
        if spec.is_empty() {
            return Err(ShimError::NoExecSpec);
        }
        let process = Arc::new(Process::with_exec_spec(id, exec_id, stdio, spec));
        let mut execs = lock(&container.execs);
        if execs.contains_key(exec_id) {
            return Err(ShimError::ExecExists(exec_id.to_owned()));
        }
        execs.insert(exec_id.to_owned(), process);
        self.inner.events.push(TaskEvent::ExecAdded {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        });
        Ok(())
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<TaskState, ShimError> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        Ok(TaskState {
            id: process.event_id().to_owned(),
            bundle: container.bundle.clone(),
            pid: process.pid(),
            status: process.status(),
            stdio: process.stdio.clone(),
        })
    }

    /// Resolves once the process exited (or was deleted unstarted).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Status, ShimError> {
        let process = self.process(id, exec_id)?;
        Ok(process.wait().await)
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<u32>, ShimError> {
        self.container(id)?;
        let pod = self.pod().await?;
        pod.call("agent ListPids", pod.agent.list_pids(id)).await
    }

    pub async fn stats(&self, id: &str) -> Result<cg2::Metrics, ShimError> {
        self.container(id)?;
        let pod = self.pod().await?;
        let stats = pod
            .call("agent ContainerStats", pod.agent.container_stats(id))
            .await?;
        Ok(stats::cgroup_v2_metrics(&stats))
    }

    /// `resources_json`: an OCI LinuxResources as containerd sent it.
    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<(), ShimError> {
        let container = self.container(id)?;
        container.init.check(Op::Use)?;
        let pod = self.pod().await?;
        pod.call(
            "agent UpdateContainer",
            pod.agent.update_container(id, resources_json),
        )
        .await
    }

    pub async fn resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), ShimError> {
        let process = self.process(id, exec_id)?;
        process.check(Op::Use)?;
        let pod = self.pod().await?;
        pod.call(
            "agent ResizeTty",
            pod.agent
                .resize_tty(process_ref(id, exec_id), width, height),
        )
        .await
    }

    /// Closes the process's stdin (when `stdin`; else only checks the ids).
    pub async fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<(), ShimError> {
        let process = self.process(id, exec_id)?;
        if !stdin {
            return Ok(());
        }
        process.check(Op::Use)?;
        let pod = self.pod().await?;
        pod.call(
            "agent CloseStdin",
            pod.agent.close_stdin(process_ref(id, exec_id)),
        )
        .await?;
        stdio::release_stdin_fifo(&process.stdio.stdin);
        Ok(())
    }

    /// The init's pid, if the container is known (Connect).
    pub fn init_pid(&self, id: &str) -> Option<u32> {
        self.container(id)
            .ok()
            .map(|container| container.init.pid())
    }

    /// Stops the pod when no container is left; whether it did (then the
    /// shim may exit).
    pub async fn shutdown(&self) -> bool {
        if !lock(&self.inner.containers).is_empty() {
            return false;
        }
        self.stop_pod().await;
        true
    }

    /// Stops the pod VM and removes its host state (Shutdown, a stop
    /// signal). Runs to its end even if the caller stops waiting.
    pub async fn stop_pod(&self) {
        let sandbox = self.clone();
        run_to_completion(async move { sandbox.stop_pod_now().await }).await;
    }

    async fn stop_pod_now(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        // The slot stays locked until the pod is gone: containerd sends a
        // Shutdown per container, and one that found the slot already
        // empty would let the shim exit in the middle of the first one's
        // teardown, leaving the pod's mounts, dir and cgroup behind.
        let mut slot = self.inner.pod.lock().await;
        if let Some(pod) = slot.take() {
            // A dead VM's agent is not asked to power off.
            let power_off = pod.dead.borrow().is_none();
            pod.host.shutdown(power_off).await;
        }
    }

    #[cfg(test)]
    pub(crate) fn insert_container(&self, container: Container) {
        lock(&self.inner.containers).insert(container.id.clone(), Arc::new(container));
    }
}

/// Runs `work` on a task of its own and waits for it: dropping the waiter
/// (ttrpc drops a handler at its caller's deadline, as containerd's
/// Shutdown and Delete have) does not stop it. A teardown cut in the
/// middle would leave the VM's mounts, cgroup and state, and a live shim.
pub(crate) async fn run_to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(work).await {
        Ok(value) => value,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        // Only a runtime shutting down cancels it; nothing is left to do.
        Err(err) => panic!("teardown task cancelled: {err}"),
    }
}

/// Exec needs a running init.
fn ensure_running(container: &Container) -> Result<(), ShimError> {
    let status = container.init.status();
    if status != Status::Running {
        return Err(ShimError::NotRunning {
            id: container.id.clone(),
            state: status.name(),
        });
    }
    Ok(())
}

/// Removes the container in the guest (bounded) and on the host; only the
/// host part can fail it (the guest's answer is not trusted either way).
async fn teardown_container(pod: &LivePod, container: &Container) -> Result<(), RootfsError> {
    let what = "agent RemoveContainer";
    let removed = tokio::time::timeout(
        AGENT_CLEANUP_TIMEOUT,
        pod.call(what, pod.agent.remove_container(&container.id, true)),
    )
    .await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!("removing {}: {}", container.id, error_chain(&err)),
        Err(_) => tracing::error!(
            "{what} {} did not answer within {AGENT_CLEANUP_TIMEOUT:?}",
            container.id
        ),
    }
    for process in container.all_processes() {
        stdio::release_stdin_fifo(&process.stdio.stdin);
    }
    pod.host.remove_container(&container.id)
}
