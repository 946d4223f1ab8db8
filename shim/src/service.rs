//! The task service: containerd's Task API over ttrpc, a thin adapter
//! over the [`Sandbox`]. Each method decodes its request, calls one
//! `Sandbox` method and encodes the reply; every error is a [`ShimError`],
//! whose `code()` picks the ttrpc code (`From<ShimError> for
//! ttrpc::Error`). Pause, Resume and Checkpoint are refused with
//! UNIMPLEMENTED.
//!
//! The product's [`PodBooter`] is here too ([`VmBooter`]): it boots the
//! pod's VM ([`Pod::boot`]) and hands the sandbox the pod's agent and host
//! handles.

use crate::annotations;
use crate::config::Config;
use crate::error::ShimError;
use crate::events::{timestamp, EventQueue};
use crate::pod::{BootError, Pod, PodSettings};
use crate::process::StdioPaths;
use crate::sandbox::{BootedPod, NewTask, PodBooter, Sandbox};
use crate::state::Status;
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::{self, r#async::TtrpcContext};
use containerd_shim::ExitSignal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use crate::pod_files::{pod_id_of, POD_DIR_FILE, SANDBOX_ID_ANNOTATION};
pub use crate::sandbox::VM_DIED_EXIT_STATUS;

/// CRI's runtime options type (`ConfigPath`).
const CRI_RUNTIME_OPTIONS_SUFFIX: &str = "runtimeoptions.v1.Options";
/// What CRI decodes Stats into.
const CGROUPS_V2_METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

type TtrpcResult<T> = ttrpc::Result<T>;

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

/// The product's pod boot: the VM, its agent, its record.
struct VmBooter {
    namespace: String,
    /// Applies the config's log level once it is known.
    log_level: Box<dyn Fn(&str) + Send + Sync>,
}

#[async_trait]
impl PodBooter for VmBooter {
    async fn boot(
        &self,
        config: &Config,
        pod_id: &str,
        settings: PodSettings,
    ) -> Result<BootedPod, BootError> {
        (self.log_level)(config.log_level.as_filter());
        let pod = Arc::new(Pod::boot(config, &self.namespace, pod_id, settings).await?);
        crate::record::running(&pod, config, &self.namespace).await; // microvm-ctl: pod record
        Ok(BootedPod {
            agent: Arc::new(pod.agent.clone()),
            host: pod,
        })
    }
}

#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    exit: Arc<ExitSignal>,
    sandbox: Sandbox,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        events: EventQueue,
        exit: Arc<ExitSignal>,
        log_level: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Self {
        let booter = VmBooter {
            namespace: namespace.to_owned(),
            log_level,
        };
        Self {
            namespace: namespace.to_owned(),
            exit,
            sandbox: Sandbox::new(events, Box::new(booter)),
        }
    }

    /// Stops the pod VM and removes its host state (a stop signal).
    pub async fn stop_pod(&self) {
        self.sandbox.stop_pod().await;
    }

    /// Decodes a Create: the bundle's spec, the config (named by the task
    /// options) with the pod's annotations, and records the pod in the
    /// bundle before anything boots.
    fn new_task(&self, req: &api::CreateTaskRequest) -> Result<NewTask, ShimError> {
        let bundle = Path::new(&req.bundle);
        let spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).map_err(|error| {
            ShimError::Spec {
                bundle: req.bundle.clone(),
                error,
            }
        })?;
        let mut config = Config::load(config_path_from_options(req.options.as_ref()).as_deref())?;
        let pod_id = pod_id_of(&spec, &req.id)?;
        // The pod's first container (CRI's sandbox) sizes and shapes the VM.
        if let Some(annotations) = spec.annotations() {
            annotations::apply(&mut config, annotations)?;
        }
        let settings = PodSettings::from_spec(&spec, &pod_id);
        Ok(NewTask {
            id: req.id.clone(),
            bundle: req.bundle.clone(),
            spec,
            config,
            pod_id,
            settings,
            rootfs: req.rootfs.clone(),
            stdio: StdioPaths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        })
    }

    /// Written before the boot: a shim killed while the VM boots leaves a
    /// pod dir, mounts, a cgroup and processes that containerd's `delete`
    /// (cleanup_after_dead_shim) must find.
    fn record_pod_dir(&self, task: &NewTask) {
        let pod_dir = crate::vm::layout::PodLayout::new(
            &task.config.paths.state_dir,
            &task.config.paths.log_dir,
            &self.namespace,
            &task.pod_id,
        )
        .dir;
        crate::pod_files::record_pod_dir(Path::new(&task.bundle), &pod_dir);
    }
}

fn state_status(status: Status) -> api::Status {
    match status {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Stopped(_) | Status::Deleted(_) => api::Status::STOPPED,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let state = self.sandbox.state(&req.id, &req.exec_id)?;
        let mut response = api::StateResponse::new();
        response.id = state.id;
        response.exec_id = req.exec_id;
        response.bundle = state.bundle;
        response.pid = state.pid;
        response.status = state_status(state.status).into();
        response.stdin = state.stdio.stdin;
        response.stdout = state.stdio.stdout;
        response.stderr = state.stdio.stderr;
        response.terminal = state.stdio.terminal;
        if let Some(exit) = state.status.exit() {
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
        self.sandbox.ensure_new(&req.id)?;
        let task = self.new_task(&req)?;
        let new_record =
            crate::record::booting(&task.config, &self.namespace, &task.pod_id, &task.spec);
        self.record_pod_dir(&task);
        let pid = match self.sandbox.create(task).await {
            Ok(pid) => pid,
            Err(err) => {
                // The record of a pod that did not boot goes (one that runs
                // keeps its own).
                if let (Some(record), ShimError::Boot(_) | ShimError::OtherPod { .. }) =
                    (new_record, &err)
                {
                    crate::record::boot_failed(&record);
                }
                return Err(err.into());
            }
        };
        let mut response = api::CreateTaskResponse::new();
        response.pid = pid;
        Ok(response)
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let mut response = api::StartResponse::new();
        response.pid = self.sandbox.start(&req.id, &req.exec_id).await?;
        Ok(response)
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let deleted = self.sandbox.delete(&req.id, &req.exec_id).await?;
        let mut response = api::DeleteResponse::new();
        response.pid = deleted.pid;
        if let Some(exit) = deleted.exit {
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
        let pids = self.sandbox.pids(&req.id).await?;
        let mut response = api::PidsResponse::new();
        response.processes = pids
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
        Err(ShimError::Unimplemented("Pause").into())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unimplemented("Resume").into())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        Err(ShimError::Unimplemented("Checkpoint").into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.sandbox
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let spec = req
            .spec
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        let stdio = StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        };
        self.sandbox.exec(&req.id, &req.exec_id, stdio, spec)?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        self.sandbox
            .resize_pty(&req.id, &req.exec_id, req.width, req.height)
            .await?;
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        self.sandbox
            .close_io(&req.id, &req.exec_id, req.stdin)
            .await?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        let resources = req
            .resources
            .as_ref()
            .map(|any| any.value.clone())
            .unwrap_or_default();
        self.sandbox.update(&req.id, resources).await?;
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let finished = self.sandbox.wait(&req.id, &req.exec_id).await?;
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
        let metrics = self.sandbox.stats(&req.id).await?;
        let mut any = Any::new();
        any.type_url = CGROUPS_V2_METRICS_TYPE.to_owned();
        any.value = metrics.write_to_bytes().map_err(ShimError::EncodeMetrics)?;
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
        if let Some(pid) = self.sandbox.init_pid(&req.id) {
            response.task_pid = pid;
        }
        Ok(response)
    }

    /// Exits only when no container is left; then stops the VM first.
    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        // The exit goes with the teardown: ttrpc may drop this handler at
        // containerd's deadline, and a pod torn down without it would leave
        // a shim with nothing to serve running.
        let (sandbox, exit) = (self.sandbox.clone(), self.exit.clone());
        crate::sandbox::run_to_completion(async move {
            if sandbox.shutdown().await {
                exit.signal();
            }
        })
        .await;
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::TaskEvent;
    use crate::process::Process;
    use crate::sandbox::Container;
    use crate::state::{ExitStatus, Op};
    use std::collections::HashMap;
    use std::time::{Duration, SystemTime};

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
        service
            .sandbox
            .insert_container(Container::new("c1", "/b", init.clone()));
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
}
