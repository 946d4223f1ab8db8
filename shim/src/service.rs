//! The task service: containerd's Task API over ttrpc, a thin adapter over
//! the pod (VM + agent) and the per-process state machine. Every method is
//! implemented; Pause, Resume and Checkpoint are refused with
//! UNIMPLEMENTED. A transition the state machine refuses is
//! FAILED_PRECONDITION.

use crate::annotations;
use crate::config::Config;
use crate::events::{timestamp, EventQueue, TaskEvent};
use crate::pod::{error_chain, Pod, PodSettings};
use crate::process::{Process, StdioPaths};
use crate::rootfs;
use crate::state::{ExitStatus, Op, Status, TransitionError};
use crate::stdio::{self, process_ref};
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::ExitSignal;
use microvm_proto::agent::v1 as agent_api;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The annotation that groups the containers of one pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Written into each bundle: the pod's state dir, for `delete` after a crash.
pub const POD_DIR_FILE: &str = "microvm-pod";
/// Exit status reported for processes of a VM that died.
pub const VM_DIED_EXIT_STATUS: u32 = 255;
/// How long after a process exits its output may still be drained.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a clean-up call to the agent (remove, signal) may take: a hung
/// agent must not hang containerd's Delete or Kill.
const AGENT_CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);
/// CRI's runtime options type (`ConfigPath`).
const CRI_RUNTIME_OPTIONS_SUFFIX: &str = "runtimeoptions.v1.Options";
/// What CRI decodes Stats into.
const CGROUPS_V2_METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

type TtrpcResult<T> = ttrpc::Result<T>;

fn status(code: ttrpc::Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn transition_error(err: TransitionError) -> ttrpc::Error {
    match err {
        TransitionError::AlreadyExited => status(ttrpc::Code::NOT_FOUND, err.to_string()),
        TransitionError::Invalid { .. } => {
            status(ttrpc::Code::FAILED_PRECONDITION, err.to_string())
        }
    }
}

/// The agent's gRPC status as a ttrpc status (both use the gRPC codes).
fn agent_error(what: &str, err: tonic::Status) -> ttrpc::Error {
    let code =
        <ttrpc::Code as containerd_shim::protos::protobuf::Enum>::from_i32(err.code() as i32)
            .unwrap_or(ttrpc::Code::UNKNOWN);
    status(code, format!("{what}: {}", err.message()))
}

/// CRI's `runtimeoptions.v1.Options`, hand-declared: containerd-shim-protos
/// does not ship it and it has two string fields.
#[derive(Clone, PartialEq, prost::Message)]
struct CriRuntimeOptions {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(string, tag = "2")]
    config_path: String,
}

/// The config file the task options name, if any.
pub fn config_path_from_options(options: Option<&Any>) -> Option<PathBuf> {
    let options = options?;
    if !options.type_url.ends_with(CRI_RUNTIME_OPTIONS_SUFFIX) {
        return None;
    }
    let decoded = <CriRuntimeOptions as prost::Message>::decode(options.value.as_slice()).ok()?;
    (!decoded.config_path.is_empty()).then(|| PathBuf::from(decoded.config_path))
}

pub fn pod_id_of(spec: &oci_spec::runtime::Spec, container_id: &str) -> String {
    spec.annotations()
        .as_ref()
        .and_then(|annotations| annotations.get(SANDBOX_ID_ANNOTATION))
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(|| container_id.to_owned())
}

#[derive(Debug)]
struct Container {
    id: String,
    bundle: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("exec {exec_id} not found")))
    }

    fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(lock(&self.execs).values().cloned());
        all
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Inner {
    namespace: String,
    events: EventQueue,
    exit: Arc<ExitSignal>,
    pod: tokio::sync::Mutex<Option<Arc<Pod>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    shutting_down: AtomicBool,
    /// Applies the config's log level once it is known.
    log_level: Box<dyn Fn(&str) + Send + Sync>,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        events: EventQueue,
        exit: Arc<ExitSignal>,
        log_level: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                namespace: namespace.to_owned(),
                events,
                exit,
                pod: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
                shutting_down: AtomicBool::new(false),
                log_level,
            }),
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        lock(&self.inner.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("container {id} not found")))
    }

    async fn pod(&self) -> TtrpcResult<Arc<Pod>> {
        self.inner.pod.lock().await.clone().ok_or_else(|| {
            status(
                ttrpc::Code::FAILED_PRECONDITION,
                "the pod VM is not running",
            )
        })
    }

    /// The pod, booted on the first Create.
    async fn pod_for(
        &self,
        config: &Config,
        pod_id: &str,
        settings: PodSettings,
    ) -> TtrpcResult<Arc<Pod>> {
        let mut slot = self.inner.pod.lock().await;
        if let Some(pod) = slot.as_ref() {
            if pod.id != pod_id {
                return Err(status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("this shim serves pod {}, not {pod_id}", pod.id),
                ));
            }
            return Ok(pod.clone());
        }
        (self.inner.log_level)(config.log_level.as_filter());
        let pod = Pod::boot(config, &self.inner.namespace, pod_id, settings)
            .await
            .map_err(|err| {
                let message = error_chain(&err);
                tracing::error!("pod {pod_id}: {message}");
                status(ttrpc::Code::FAILED_PRECONDITION, message)
            })?;
        let pod = Arc::new(pod);
        self.watch_vm(&pod).await;
        self.watch_oom(&pod);
        *slot = Some(pod.clone());
        Ok(pod)
    }

    /// A VM (or one of its host processes) that dies mid-run ends every
    /// process of the pod, each with a TaskExit.
    async fn watch_vm(&self, pod: &Arc<Pod>) {
        let watch = pod.exit_watch().await;
        let service = self.clone();
        let log = pod.layout.log_file.display().to_string();
        tokio::spawn(async move {
            let exit = watch.first_exit().await;
            if service.inner.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            tracing::error!(
                "pod VM died: {} exited ({}); every container exits with status {VM_DIED_EXIT_STATUS}; console: {log}",
                exit.name,
                exit.status
            );
            let containers: Vec<_> = lock(&service.inner.containers).values().cloned().collect();
            let at = SystemTime::now();
            for container in containers {
                for process in container.all_processes() {
                    process.exited(
                        ExitStatus {
                            code: VM_DIED_EXIT_STATUS,
                            at,
                        },
                        &service.inner.events,
                    );
                }
            }
        });
    }

    fn watch_oom(&self, pod: &Arc<Pod>) {
        let mut events_client = pod.agent.events.clone();
        let queue = self.inner.events.clone();
        tokio::spawn(async move {
            let mut stream = match events_client
                .subscribe_events(agent_api::SubscribeEventsRequest {})
                .await
            {
                Ok(stream) => stream.into_inner(),
                Err(err) => {
                    tracing::warn!("no OOM events from the agent: {err}");
                    return;
                }
            };
            while let Ok(Some(event)) = stream.message().await {
                match event.kind {
                    Some(agent_api::event::Kind::OomKilled(oom)) => queue.push(TaskEvent::Oom {
                        container_id: oom.container_id,
                    }),
                    Some(agent_api::event::Kind::EventsLost(lost)) => {
                        tracing::warn!("the agent dropped {} events", lost.count);
                    }
                    _ => {}
                }
            }
        });
    }

    /// Waits in the agent for `process` to exit, drains its output, then
    /// reports the exit. Once per process.
    fn watch_exit(&self, pod: &Arc<Pod>, process: &Arc<Process>) {
        if process.exit_watch_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut processes = pod.agent.processes.clone();
        let process = process.clone();
        let events = self.inner.events.clone();
        tokio::spawn(async move {
            let request = agent_api::WaitProcessRequest {
                process: Some(process_ref(&process.container_id, &process.exec_id)),
            };
            let exit = match processes.wait_process(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    let nanos = u64::try_from(response.exited_at_unix_nanos).unwrap_or(0);
                    ExitStatus {
                        // 128 + signal for a killed process, as containerd expects.
                        code: u32::try_from(response.exit_code).unwrap_or(VM_DIED_EXIT_STATUS),
                        at: if nanos == 0 {
                            SystemTime::now()
                        } else {
                            SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
                        },
                    }
                }
                Err(err) => {
                    tracing::error!(
                        "waiting for {} in the agent failed: {err}",
                        process.event_id()
                    );
                    ExitStatus {
                        code: VM_DIED_EXIT_STATUS,
                        at: SystemTime::now(),
                    }
                }
            };
            for task in process.take_output_tasks() {
                if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, task)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "output of {} still open {OUTPUT_DRAIN_TIMEOUT:?} after its exit (a child holds it?)",
                        process.event_id()
                    );
                }
            }
            process.exited(exit, &events);
        });
    }

    fn start_io(&self, pod: &Pod, process: &Process) {
        let reference = process_ref(&process.container_id, &process.exec_id);
        let mut tasks = vec![stdio::copy_output(
            &pod.agent,
            reference.clone(),
            agent_api::OutputStream::Stdout,
            process.stdio.stdout.clone(),
        )];
        if !process.stdio.terminal {
            tasks.push(stdio::copy_output(
                &pod.agent,
                reference.clone(),
                agent_api::OutputStream::Stderr,
                process.stdio.stderr.clone(),
            ));
        }
        if !process.stdio.stdin.is_empty() {
            // Not an output task: stdin may stay open past the exit.
            drop(stdio::copy_stdin(
                &pod.agent,
                reference,
                process.stdio.stdin.clone(),
            ));
        }
        process.add_output_tasks(tasks);
    }

    async fn create_container(
        &self,
        req: &api::CreateTaskRequest,
    ) -> TtrpcResult<(Arc<Pod>, Arc<Process>)> {
        if lock(&self.inner.containers).contains_key(&req.id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let bundle = Path::new(&req.bundle);
        let mut spec =
            oci_spec::runtime::Spec::load(bundle.join("config.json")).map_err(|err| {
                status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("reading {}/config.json: {err}", req.bundle),
                )
            })?;
        let mut config = Config::load(config_path_from_options(req.options.as_ref()).as_deref())
            .map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, error_chain(&err)))?;
        let pod_id = pod_id_of(&spec, &req.id);
        // The pod's first container (CRI's sandbox) sizes and shapes the VM.
        if let Some(annotations) = spec.annotations() {
            annotations::apply(&mut config, annotations)
                .map_err(|err| status(ttrpc::Code::INVALID_ARGUMENT, err.to_string()))?;
        }
        let settings = PodSettings::from_spec(&spec, &pod_id);
        let pod = self.pod_for(&config, &pod_id, settings).await?;
        if let Err(err) = std::fs::write(
            bundle.join(POD_DIR_FILE),
            pod.layout.dir.as_os_str().as_encoded_bytes(),
        ) {
            tracing::warn!("cannot record the pod dir in the bundle: {err}");
        }
        let container_dir = pod.layout.container_dir(&req.id);
        if let Err(err) =
            rootfs::prepare_container(&pod.layout, &req.id, bundle, &req.rootfs, &mut spec).await
        {
            rootfs::remove_mounted_tree(&container_dir);
            return Err(status(ttrpc::Code::INTERNAL, error_chain(&err)));
        }
        let spec_json = serde_json::to_vec(&spec).map_err(|err| {
            status(
                ttrpc::Code::INTERNAL,
                format!("serializing the spec: {err}"),
            )
        })?;
        let created = pod
            .agent
            .containers
            .clone()
            .create_container(agent_api::CreateContainerRequest {
                container_id: req.id.clone(),
                oci_spec_json: spec_json.into(),
                bundle_path: String::new(),
                stdin: !req.stdin.is_empty(),
            })
            .await;
        let pid = match created {
            Ok(response) => response.into_inner().pid,
            Err(err) => {
                rootfs::remove_mounted_tree(&container_dir);
                return Err(agent_error("agent CreateContainer", err));
            }
        };
        let process = Arc::new(Process::new(
            &req.id,
            "",
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        ));
        process.set_pid(pid);
        Ok((pod, process))
    }

    async fn teardown_container(&self, pod: &Pod, container: &Container) {
        let mut containers = pod.agent.containers.clone();
        let removed = tokio::time::timeout(
            AGENT_CLEANUP_TIMEOUT,
            containers.remove_container(agent_api::RemoveContainerRequest {
                container_id: container.id.clone(),
                force: true,
            }),
        )
        .await;
        match removed {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::debug!("agent RemoveContainer {}: {err}", container.id),
            Err(_) => tracing::error!(
                "agent RemoveContainer {} did not answer within {AGENT_CLEANUP_TIMEOUT:?}",
                container.id
            ),
        }
        for process in container.all_processes() {
            stdio::release_stdin_fifo(&process.stdio.stdin);
        }
        rootfs::remove_mounted_tree(&pod.layout.container_dir(&container.id));
    }

    /// Stops the pod VM and removes its host state (a stop signal).
    pub async fn stop_pod(&self) {
        self.shutdown_pod().await;
    }

    async fn shutdown_pod(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let pod = self.inner.pod.lock().await.take();
        if let Some(pod) = pod {
            pod.shutdown().await;
        }
    }
}

fn state_status(status: Status) -> api::Status {
    match status {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Stopped(_) | Status::Deleted(_) => api::Status::STOPPED,
    }
}

fn unimplemented(method: &str) -> ttrpc::Error {
    status(
        ttrpc::Code::UNIMPLEMENTED,
        format!("{method} is not supported by the microvm runtime"),
    )
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let current = process.status();
        let mut response = api::StateResponse::new();
        response.id = process.event_id().to_owned();
        response.exec_id = req.exec_id.clone();
        response.bundle = container.bundle.clone();
        response.pid = process.pid();
        response.status = state_status(current).into();
        response.stdin = process.stdio.stdin.clone();
        response.stdout = process.stdio.stdout.clone();
        response.stderr = process.stdio.stderr.clone();
        response.terminal = process.stdio.terminal;
        if let Some(exit) = current.exit() {
            response.exit_status = exit.code;
            response.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(response)
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        tracing::info!("create {} (bundle {})", req.id, req.bundle);
        let (pod, process) = self.create_container(&req).await?;
        self.start_io(&pod, &process);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            init: process.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        // Registered and queued under the map's lock: no other method can
        // see the container before its create event is queued.
        {
            let mut containers = lock(&self.inner.containers);
            containers.insert(req.id.clone(), container);
            self.inner.events.push(TaskEvent::Create {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                pid: process.pid(),
            });
        }
        let mut response = api::CreateTaskResponse::new();
        response.pid = process.pid();
        Ok(response)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        process.check(Op::Start).map_err(transition_error)?;
        let pod = self.pod().await?;
        if req.exec_id.is_empty() {
            pod.agent
                .containers
                .clone()
                .start_container(agent_api::StartContainerRequest {
                    container_id: req.id.clone(),
                })
                .await
                .map_err(|err| agent_error("agent StartContainer", err))?;
            process
                .transition(Op::Start, &self.inner.events, |p, _| {
                    Some(TaskEvent::Start {
                        container_id: p.container_id.clone(),
                        pid: p.pid(),
                    })
                })
                .map_err(transition_error)?;
        } else {
            if container.init.status() != Status::Running {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "cannot exec in container {}: it is {}",
                        req.id,
                        container.init.status().name()
                    ),
                ));
            }
            let started = pod
                .agent
                .processes
                .clone()
                .exec_process(agent_api::ExecProcessRequest {
                    process: Some(process_ref(&req.id, &req.exec_id)),
                    oci_process_json: process.exec_spec.clone().into(),
                    stdin: !process.stdio.stdin.is_empty(),
                })
                .await
                .map_err(|err| agent_error("agent ExecProcess", err))?;
            process.set_pid(started.into_inner().pid);
            self.start_io(&pod, &process);
            process
                .transition(Op::Start, &self.inner.events, |p, _| {
                    Some(TaskEvent::ExecStarted {
                        container_id: p.container_id.clone(),
                        exec_id: p.exec_id.clone(),
                        pid: p.pid(),
                    })
                })
                .map_err(transition_error)?;
        }
        self.watch_exit(&pod, &process);
        let mut response = api::StartResponse::new();
        response.pid = process.pid();
        Ok(response)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        process.check(Op::Delete).map_err(transition_error)?;
        if req.exec_id.is_empty() {
            if let Ok(pod) = self.pod().await {
                self.teardown_container(&pod, &container).await;
            }
        }
        let mut deleted = None;
        process
            .transition(Op::Delete, &self.inner.events, |p, status| {
                deleted = Some(status);
                let exit = status.exit();
                p.exec_id.is_empty().then(|| TaskEvent::Delete {
                    container_id: p.container_id.clone(),
                    pid: p.pid(),
                    exit_status: exit.map_or(0, |e| e.code),
                    exited_at: exit.map_or_else(SystemTime::now, |e| e.at),
                })
            })
            .map_err(transition_error)?;
        if req.exec_id.is_empty() {
            lock(&self.inner.containers).remove(&req.id);
        } else {
            lock(&container.execs).remove(&req.exec_id);
        }
        let mut response = api::DeleteResponse::new();
        response.pid = process.pid();
        if let Some(exit) = deleted.and_then(|status| status.exit()) {
            response.exit_status = exit.code;
            response.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(response)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        self.container(&req.id)?;
        let pod = self.pod().await?;
        let pids = pod
            .agent
            .containers
            .clone()
            .list_pids(agent_api::ListPidsRequest {
                container_id: req.id.clone(),
            })
            .await
            .map_err(|err| agent_error("agent ListPids", err))?
            .into_inner();
        let mut response = api::PidsResponse::new();
        response.processes = pids
            .pids
            .into_iter()
            .map(|pid| {
                let mut info = containerd_shim::protos::types::task::ProcessInfo::new();
                info.pid = pid;
                info
            })
            .collect();
        Ok(response)
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Pause"))
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Resume"))
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(unimplemented("Checkpoint"))
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        process.check(Op::Kill).map_err(transition_error)?;
        let pod = self.pod().await?;
        let mut processes = pod.agent.processes.clone();
        let signalled = processes.signal_process(agent_api::SignalProcessRequest {
            process: Some(process_ref(&req.id, &req.exec_id)),
            signal: req.signal,
            all: req.all,
        });
        tokio::time::timeout(AGENT_CLEANUP_TIMEOUT, signalled)
            .await
            .map_err(|_| {
                status(
                    ttrpc::Code::DEADLINE_EXCEEDED,
                    format!("agent SignalProcess did not answer within {AGENT_CLEANUP_TIMEOUT:?}"),
                )
            })?
            .map_err(|err| agent_error("agent SignalProcess", err))?;
        // A created process killed before start exits too: Wait must see it.
        if process.status() == Status::Created {
            self.watch_exit(&pod, &process);
        }
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        if container.init.status() != Status::Running {
            return Err(status(
                ttrpc::Code::FAILED_PRECONDITION,
                format!(
                    "cannot exec in container {}: it is {}",
                    req.id,
                    container.init.status().name()
                ),
            ));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        if spec.is_empty() {
            return Err(status(
                ttrpc::Code::INVALID_ARGUMENT,
                "exec without a process spec",
            ));
        }
        let process = Arc::new(Process::with_exec_spec(
            &req.id,
            &req.exec_id,
            StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            spec,
        ));
        let mut execs = lock(&container.execs);
        if execs.contains_key(&req.exec_id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        execs.insert(req.exec_id.clone(), process);
        self.inner.events.push(TaskEvent::ExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
        });
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        process.check(Op::Use).map_err(transition_error)?;
        let pod = self.pod().await?;
        pod.agent
            .processes
            .clone()
            .resize_tty(agent_api::ResizeTtyRequest {
                process: Some(process_ref(&req.id, &req.exec_id)),
                width: req.width,
                height: req.height,
            })
            .await
            .map_err(|err| agent_error("agent ResizeTty", err))?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        if !req.stdin {
            return Ok(api::Empty::new());
        }
        process.check(Op::Use).map_err(transition_error)?;
        let pod = self.pod().await?;
        pod.agent
            .processes
            .clone()
            .close_stdin(agent_api::CloseStdinRequest {
                process: Some(process_ref(&req.id, &req.exec_id)),
            })
            .await
            .map_err(|err| agent_error("agent CloseStdin", err))?;
        stdio::release_stdin_fifo(&process.stdio.stdin);
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        container.init.check(Op::Use).map_err(transition_error)?;
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        let pod = self.pod().await?;
        pod.agent
            .containers
            .clone()
            .update_container(agent_api::UpdateContainerRequest {
                container_id: req.id.clone(),
                oci_resources_json: resources.into(),
            })
            .await
            .map_err(|err| agent_error("agent UpdateContainer", err))?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let container = self.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let finished = process.wait().await;
        let mut response = api::WaitResponse::new();
        if let Some(exit) = finished.exit() {
            response.exit_status = exit.code;
            response.exited_at = MessageField::some(timestamp(exit.at));
        }
        Ok(response)
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.container(&req.id)?;
        let pod = self.pod().await?;
        let stats = pod
            .agent
            .containers
            .clone()
            .container_stats(agent_api::ContainerStatsRequest {
                container_id: req.id.clone(),
            })
            .await
            .map_err(|err| agent_error("agent ContainerStats", err))?
            .into_inner();
        let metrics = cgroup_v2_metrics(&stats);
        let mut any = Any::new();
        any.type_url = CGROUPS_V2_METRICS_TYPE.to_owned();
        any.value = metrics
            .write_to_bytes()
            .map_err(|err| status(ttrpc::Code::INTERNAL, format!("encoding metrics: {err}")))?;
        let mut response = api::StatsResponse::new();
        response.stats = MessageField::some(any);
        Ok(response)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut response = api::ConnectResponse::new();
        response.shim_pid = std::process::id();
        response.version = env!("CARGO_PKG_VERSION").to_owned();
        if let Ok(container) = self.container(&req.id) {
            response.task_pid = container.init.pid();
        }
        Ok(response)
    }

    /// Exits only when no container is left; then stops the VM first.
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        if !lock(&self.inner.containers).is_empty() {
            return Ok(api::Empty::new());
        }
        self.shutdown_pod().await;
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

/// The agent's cgroup v2 figures in containerd's v2 Metrics message.
pub fn cgroup_v2_metrics(stats: &agent_api::ContainerStatsResponse) -> cg2::Metrics {
    let mut metrics = cg2::Metrics::new();
    if let Some(cpu) = &stats.cpu {
        let mut out = cg2::CPUStat::new();
        out.usage_usec = cpu.usage_usec;
        out.user_usec = cpu.user_usec;
        out.system_usec = cpu.system_usec;
        out.nr_periods = cpu.nr_periods;
        out.nr_throttled = cpu.nr_throttled;
        out.throttled_usec = cpu.throttled_usec;
        metrics.cpu = MessageField::some(out);
    }
    if let Some(memory) = &stats.memory {
        let stat = |key: &str| memory.stat.get(key).copied().unwrap_or(0);
        let mut out = cg2::MemoryStat::new();
        out.usage = memory.usage_bytes;
        out.usage_limit = memory.limit_bytes;
        out.swap_usage = memory.swap_usage_bytes;
        out.anon = stat("anon");
        out.file = stat("file");
        out.kernel_stack = stat("kernel_stack");
        out.slab = stat("slab");
        out.sock = stat("sock");
        out.shmem = stat("shmem");
        out.file_mapped = stat("file_mapped");
        out.file_dirty = stat("file_dirty");
        out.file_writeback = stat("file_writeback");
        out.inactive_anon = stat("inactive_anon");
        out.active_anon = stat("active_anon");
        out.inactive_file = stat("inactive_file");
        out.active_file = stat("active_file");
        out.unevictable = stat("unevictable");
        out.pgfault = stat("pgfault");
        out.pgmajfault = stat("pgmajfault");
        metrics.memory = MessageField::some(out);
        let mut events = cg2::MemoryEvents::new();
        events.oom = memory.oom_events;
        events.oom_kill = memory.oom_kill_events;
        metrics.memory_events = MessageField::some(events);
    }
    if let Some(pids) = &stats.pids {
        let mut out = cg2::PidsStat::new();
        out.current = pids.current;
        out.limit = pids.limit;
        metrics.pids = MessageField::some(out);
    }
    if !stats.io.is_empty() {
        let mut io = cg2::IOStat::new();
        io.usage = stats
            .io
            .iter()
            .map(|device| {
                let mut entry = cg2::IOEntry::new();
                entry.major = u64::from(device.major);
                entry.minor = u64::from(device.minor);
                entry.rbytes = device.read_bytes;
                entry.wbytes = device.write_bytes;
                entry.rios = device.read_ios;
                entry.wios = device.write_ios;
                entry
            })
            .collect();
        metrics.io = MessageField::some(io);
    }
    metrics.network = stats
        .network
        .iter()
        .map(|net| {
            let mut out = cg2::NetworkStat::new();
            out.name = net.name.clone();
            out.rx_bytes = net.rx_bytes;
            out.rx_packets = net.rx_packets;
            out.rx_errors = net.rx_errors;
            out.rx_dropped = net.rx_dropped;
            out.tx_bytes = net.tx_bytes;
            out.tx_packets = net.tx_packets;
            out.tx_errors = net.tx_errors;
            out.tx_dropped = net.tx_dropped;
            out
        })
        .collect();
    metrics
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> (TaskService, tokio::sync::mpsc::UnboundedReceiver<TaskEvent>) {
        let (events, receiver) = EventQueue::new();
        (
            TaskService::new(
                "ns",
                events,
                Arc::new(ExitSignal::default()),
                Box::new(|_| {}),
            ),
            receiver,
        )
    }

    fn code_of(err: ttrpc::Error) -> ttrpc::Code {
        match err {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    fn test_ctx() -> TtrpcContext {
        TtrpcContext {
            mh: ttrpc::MessageHeader::default(),
            metadata: HashMap::new(),
            timeout_nano: 0,
        }
    }

    #[tokio::test]
    async fn unsupported_methods_are_unimplemented_not_not_found() {
        let (service, _) = service();
        let ctx = test_ctx();
        let codes = [
            code_of(
                service
                    .pause(&ctx, api::PauseRequest::new())
                    .await
                    .unwrap_err(),
            ),
            code_of(
                service
                    .resume(&ctx, api::ResumeRequest::new())
                    .await
                    .unwrap_err(),
            ),
            code_of(
                service
                    .checkpoint(&ctx, api::CheckpointTaskRequest::new())
                    .await
                    .unwrap_err(),
            ),
        ];
        assert_eq!(codes, [ttrpc::Code::UNIMPLEMENTED; 3]);
    }

    #[tokio::test]
    async fn unknown_containers_are_not_found_and_shutdown_exits_when_empty() {
        let (events, _receiver) = EventQueue::new();
        let exit = Arc::new(ExitSignal::default());
        let service = TaskService::new("ns", events, exit.clone(), Box::new(|_| {}));
        let ctx = test_ctx();
        let mut state = api::StateRequest::new();
        state.id = "nope".into();
        assert_eq!(
            code_of(service.state(&ctx, state).await.unwrap_err()),
            ttrpc::Code::NOT_FOUND
        );
        let mut kill = api::KillRequest::new();
        kill.id = "nope".into();
        assert_eq!(
            code_of(service.kill(&ctx, kill).await.unwrap_err()),
            ttrpc::Code::NOT_FOUND
        );
        let connect = service
            .connect(&ctx, api::ConnectRequest::new())
            .await
            .unwrap();
        assert_eq!(connect.shim_pid, std::process::id());
        service
            .shutdown(&ctx, api::ShutdownRequest::new())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), exit.wait())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn shutdown_waits_while_a_container_is_left() {
        let (events, _receiver) = EventQueue::new();
        let exit = Arc::new(ExitSignal::default());
        let service = TaskService::new("ns", events, exit.clone(), Box::new(|_| {}));
        let init = Arc::new(Process::new("c1", "", StdioPaths::default()));
        lock(&service.inner.containers).insert(
            "c1".into(),
            Arc::new(Container {
                id: "c1".into(),
                bundle: "/b".into(),
                init: init.clone(),
                execs: Mutex::new(HashMap::new()),
            }),
        );
        let ctx = test_ctx();
        service
            .shutdown(&ctx, api::ShutdownRequest::new())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(100), exit.wait())
                .await
                .is_err()
        );

        // Bad transitions are FAILED_PRECONDITION: deleting a running task.
        let (queue, _rx) = EventQueue::new();
        init.transition(Op::Start, &queue, |_, _| None).unwrap();
        let mut delete = api::DeleteRequest::new();
        delete.id = "c1".into();
        assert_eq!(
            code_of(service.delete(&ctx, delete.clone()).await.unwrap_err()),
            ttrpc::Code::FAILED_PRECONDITION
        );
        // Exec into a container whose init has not started: refused too.
        let mut state = api::StateRequest::new();
        state.id = "c1".into();
        let response = service.state(&ctx, state).await.unwrap();
        assert_eq!(response.status.enum_value(), Ok(api::Status::RUNNING));

        // Wait blocks until the exit, then reports it.
        let waiter = {
            let service = service.clone();
            tokio::spawn(async move {
                let mut wait = api::WaitRequest::new();
                wait.id = "c1".into();
                service.wait(&test_ctx(), wait).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        init.exited(
            ExitStatus {
                code: 7,
                at: SystemTime::now(),
            },
            &queue,
        );
        let waited = waiter.await.unwrap().unwrap();
        assert_eq!(waited.exit_status, 7);

        // Now delete works (no pod: nothing to tear down), then shutdown exits.
        let deleted = service.delete(&ctx, delete).await.unwrap();
        assert_eq!(deleted.exit_status, 7);
        service
            .shutdown(&ctx, api::ShutdownRequest::new())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), exit.wait())
            .await
            .unwrap();
    }

    #[test]
    fn config_path_comes_from_cri_runtime_options() {
        let options = CriRuntimeOptions {
            type_url: "io.containerd.microvm.v2".into(),
            config_path: "/etc/microvm/other.toml".into(),
        };
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".into();
        any.value = prost::Message::encode_to_vec(&options);
        assert_eq!(
            config_path_from_options(Some(&any)),
            Some(PathBuf::from("/etc/microvm/other.toml"))
        );
        any.type_url = "containerd.runc.v1.Options".into();
        assert_eq!(config_path_from_options(Some(&any)), None);
        assert_eq!(config_path_from_options(None), None);
    }

    #[test]
    fn pod_id_is_the_sandbox_annotation_or_the_container_id() {
        let mut spec = oci_spec::runtime::Spec::default();
        assert_eq!(pod_id_of(&spec, "c1"), "c1");
        spec.set_annotations(Some(HashMap::from([(
            SANDBOX_ID_ANNOTATION.to_owned(),
            "pod9".to_owned(),
        )])));
        assert_eq!(pod_id_of(&spec, "c1"), "pod9");
    }

    #[test]
    fn metrics_carry_the_agent_figures() {
        let stats = agent_api::ContainerStatsResponse {
            cpu: Some(agent_api::CpuStats {
                usage_usec: 1234,
                ..Default::default()
            }),
            memory: Some(agent_api::MemoryStats {
                usage_bytes: 4096,
                limit_bytes: 8192,
                oom_kill_events: 1,
                stat: HashMap::from([("anon".to_owned(), 100)]),
                ..Default::default()
            }),
            pids: Some(agent_api::PidsStats {
                current: 3,
                limit: 0,
            }),
            io: vec![],
            network: vec![],
        };
        let metrics = cgroup_v2_metrics(&stats);
        let bytes = metrics.write_to_bytes().unwrap();
        let decoded = cg2::Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(decoded.cpu.usage_usec, 1234);
        assert_eq!(decoded.memory.usage, 4096);
        assert_eq!(decoded.memory.usage_limit, 8192);
        assert_eq!(decoded.memory.anon, 100);
        assert_eq!(decoded.memory_events.oom_kill, 1);
        assert_eq!(decoded.pids.current, 3);
    }
}
