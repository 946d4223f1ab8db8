//! An in-memory pod for the sandbox's tests: one [`FakePod`] is both the
//! guest agent ([`PodAgent`]) and the pod's host side ([`PodHost`]); it
//! records every call, can fail or stall any agent method, lets the test end
//! processes, send agent events, and kill the VM.

use super::{AgentExit, BootedPod, EventStream, NewContainer, PodAgent, PodBooter, PodHost};
use crate::config::Config;
use crate::pod::{BootError, PodSettings};
use crate::rootfs::RootfsError;
use crate::vm::supervisor::ProcessExit;
use async_trait::async_trait;
use containerd_shim::protos::api::Mount as ContainerdMount;
use microvm_proto::agent::v1 as api;
use oci_spec::runtime::Spec;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Status;

/// What an agent method does when called.
#[derive(Debug, Clone)]
pub enum Behaviour {
    Fail(Status),
    /// Never answers.
    Stall,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    behaviours: HashMap<&'static str, Behaviour>,
    next_pid: u32,
    /// Per process (container, exec): its exit code once it exited.
    exits: HashMap<(String, String), watch::Sender<Option<i32>>>,
    events: Option<mpsc::UnboundedReceiver<Result<api::Event, Status>>>,
    fail_prepare: bool,
    /// The next host removal fails (a mount left behind).
    fail_remove: bool,
    removed_dirs: Vec<String>,
    shutdowns: Vec<bool>,
}

#[derive(Debug)]
pub struct FakePod {
    id: String,
    state: Mutex<State>,
    events: mpsc::UnboundedSender<Result<api::Event, Status>>,
    vm_dead: watch::Sender<bool>,
    /// Shutdown waits until this is true (a slow teardown).
    shutdown_gate: watch::Sender<bool>,
}

impl FakePod {
    pub fn new(id: &str) -> Arc<Self> {
        let (events, receiver) = mpsc::unbounded_channel();
        Arc::new(Self {
            id: id.to_owned(),
            state: Mutex::new(State {
                next_pid: 100,
                events: Some(receiver),
                ..State::default()
            }),
            events,
            vm_dead: watch::Sender::new(false),
            shutdown_gate: watch::Sender::new(true),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes agent method `method` (its PodAgent name) fail or stall.
    pub fn set(&self, method: &'static str, behaviour: Behaviour) {
        self.lock().behaviours.insert(method, behaviour);
    }

    pub fn clear(&self, method: &'static str) {
        self.lock().behaviours.remove(method);
    }

    pub fn fail_prepare(&self) {
        self.lock().fail_prepare = true;
    }

    /// The next `remove_container` fails, once.
    pub fn fail_remove(&self) {
        self.lock().fail_remove = true;
    }

    /// The agent calls so far, as "method container/exec".
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    pub fn removed_dirs(&self) -> Vec<String> {
        self.lock().removed_dirs.clone()
    }

    /// Each shutdown's `power_off`.
    pub fn shutdowns(&self) -> Vec<bool> {
        self.lock().shutdowns.clone()
    }

    /// The process exits with `code` in the guest.
    pub fn exit(&self, container_id: &str, exec_id: &str, code: i32) {
        self.exit_sender(container_id, exec_id)
            .send_replace(Some(code));
    }

    pub fn send_event(&self, kind: api::event::Kind) {
        let _ = self.events.send(Ok(api::Event {
            timestamp_unix_nanos: 0,
            kind: Some(kind),
        }));
    }

    /// The VMM dies.
    pub fn kill_vm(&self) {
        self.vm_dead.send_replace(true);
    }

    /// Shutdown blocks until [`Self::open_shutdown`].
    pub fn hold_shutdown(&self) {
        self.shutdown_gate.send_replace(false);
    }

    pub fn open_shutdown(&self) {
        self.shutdown_gate.send_replace(true);
    }

    fn exit_sender(&self, container_id: &str, exec_id: &str) -> watch::Sender<Option<i32>> {
        self.lock()
            .exits
            .entry((container_id.to_owned(), exec_id.to_owned()))
            .or_insert_with(|| watch::Sender::new(None))
            .clone()
    }

    /// Records the call, then answers as its behaviour says.
    async fn enter(&self, method: &'static str, target: &str) -> Result<(), Status> {
        let behaviour = {
            let mut state = self.lock();
            state.calls.push(format!("{method} {target}"));
            state.behaviours.get(method).cloned()
        };
        match behaviour {
            None => Ok(()),
            Some(Behaviour::Fail(status)) => Err(status),
            Some(Behaviour::Stall) => std::future::pending().await,
        }
    }

    fn next_pid(&self) -> u32 {
        let mut state = self.lock();
        state.next_pid += 1;
        state.next_pid
    }
}

fn target(process: &api::ProcessRef) -> String {
    format!("{}/{}", process.container_id, process.exec_id)
}

#[async_trait]
impl PodAgent for FakePod {
    async fn create_container(&self, container: NewContainer) -> Result<u32, Status> {
        self.enter("create_container", &container.id).await?;
        Ok(self.next_pid())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), Status> {
        self.enter("start_container", container_id).await
    }

    async fn exec_process(
        &self,
        process: api::ProcessRef,
        _process_json: Vec<u8>,
        _stdin: bool,
    ) -> Result<u32, Status> {
        self.enter("exec_process", &target(&process)).await?;
        Ok(self.next_pid())
    }

    async fn signal_process(
        &self,
        process: api::ProcessRef,
        signal: u32,
        _all: bool,
    ) -> Result<(), Status> {
        self.enter("signal_process", &target(&process)).await?;
        // A signal kills the process, as 128 + signal.
        let code = 128 + i32::try_from(signal).unwrap_or(0);
        self.exit(&process.container_id, &process.exec_id, code);
        Ok(())
    }

    async fn wait_process(&self, process: api::ProcessRef) -> Result<AgentExit, Status> {
        self.enter("wait_process", &target(&process)).await?;
        let mut exited = self
            .exit_sender(&process.container_id, &process.exec_id)
            .subscribe();
        let mut dead = self.vm_dead.subscribe();
        tokio::select! {
            Ok(code) = exited.wait_for(Option::is_some) => Ok(AgentExit {
                code: code.unwrap_or_default(),
                exited_at_unix_nanos: 0,
            }),
            // A dead VM breaks the agent's streams.
            Ok(_) = dead.wait_for(|dead| *dead) => Err(Status::unavailable("connection reset")),
        }
    }

    async fn remove_container(&self, container_id: &str, _force: bool) -> Result<(), Status> {
        self.enter("remove_container", container_id).await
    }

    async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, Status> {
        self.enter("list_pids", container_id).await?;
        Ok(vec![101, 102])
    }

    async fn container_stats(
        &self,
        container_id: &str,
    ) -> Result<api::ContainerStatsResponse, Status> {
        self.enter("container_stats", container_id).await?;
        Ok(api::ContainerStatsResponse {
            pids: Some(api::PidsStats {
                current: 2,
                limit: 10,
            }),
            ..Default::default()
        })
    }

    async fn update_container(
        &self,
        container_id: &str,
        _resources_json: Vec<u8>,
    ) -> Result<(), Status> {
        self.enter("update_container", container_id).await
    }

    async fn resize_tty(
        &self,
        process: api::ProcessRef,
        _width: u32,
        _height: u32,
    ) -> Result<(), Status> {
        self.enter("resize_tty", &target(&process)).await
    }

    async fn close_stdin(&self, process: api::ProcessRef) -> Result<(), Status> {
        self.enter("close_stdin", &target(&process)).await
    }

    async fn subscribe_events(&self) -> Result<EventStream, Status> {
        self.enter("subscribe_events", "").await?;
        let receiver = self
            .lock()
            .events
            .take()
            .ok_or_else(|| Status::failed_precondition("subscribed twice"))?;
        Ok(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
        ))
    }

    fn copy_output(
        &self,
        _process: api::ProcessRef,
        _stream: api::OutputStream,
        _path: String,
    ) -> JoinHandle<()> {
        tokio::spawn(async {})
    }

    fn copy_stdin(&self, _process: api::ProcessRef, _path: String) -> JoinHandle<()> {
        tokio::spawn(async {})
    }
}

#[async_trait]
impl PodHost for FakePod {
    fn id(&self) -> &str {
        &self.id
    }

    fn console_log(&self) -> String {
        "/fake/console.log".into()
    }

    async fn set_oom_score(&self, _adj: i32) {}

    async fn prepare_container(
        &self,
        _container_id: &str,
        _bundle: &Path,
        _rootfs: &[ContainerdMount],
        _spec: &mut Spec,
    ) -> Result<(), RootfsError> {
        if self.lock().fail_prepare {
            return Err(RootfsError::NoRoot);
        }
        Ok(())
    }

    fn remove_container(&self, container_id: &str) -> Result<(), RootfsError> {
        let mut state = self.lock();
        if state.fail_remove {
            state.fail_remove = false;
            return Err(RootfsError::MountsLeft {
                path: container_id.into(),
                count: 1,
            });
        }
        state.removed_dirs.push(container_id.to_owned());
        Ok(())
    }

    async fn vm_exit(&self) -> ProcessExit {
        let mut dead = self.vm_dead.subscribe();
        let _ = dead.wait_for(|dead| *dead).await;
        ProcessExit {
            name: "microvm-vmm",
            is_vmm: true,
            status: "signal 9 (SIGKILL)".into(),
        }
    }

    async fn shutdown(&self, power_off: bool) {
        let mut gate = self.shutdown_gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        self.lock().shutdowns.push(power_off);
    }
}

/// Boots a [`FakePod`] (or fails as told); counts the boots.
#[derive(Debug)]
pub struct FakeBooter {
    pub pod: Arc<FakePod>,
    pub fail: Mutex<HashSet<String>>,
    pub boots: Mutex<u32>,
}

impl FakeBooter {
    pub fn new(pod: Arc<FakePod>) -> Arc<Self> {
        Arc::new(Self {
            pod,
            fail: Mutex::new(HashSet::new()),
            boots: Mutex::new(0),
        })
    }
}

#[async_trait]
impl PodBooter for Arc<FakeBooter> {
    async fn boot(
        &self,
        _config: &Config,
        pod_id: &str,
        _settings: PodSettings,
    ) -> Result<BootedPod, BootError> {
        *self.boots.lock().unwrap() += 1;
        if self.fail.lock().unwrap().contains(pod_id) {
            return Err(BootError::Sandbox(Status::invalid_argument(
                "bad sysctl net.ipv4.foo",
            )));
        }
        Ok(BootedPod {
            agent: self.pod.clone(),
            host: self.pod.clone(),
        })
    }
}
