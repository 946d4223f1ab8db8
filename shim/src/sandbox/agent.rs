//! [`PodAgent`]: everything the sandbox asks of the guest, and nothing
//! else. The tonic client ([`AgentClient`]) is the product's implementation;
//! the sandbox's tests use an in-memory fake (`sandbox::fake`).
//!
//! Errors are the agent's gRPC status as it came (the deadline layer of
//! [`crate::deadline`] turns a silent agent into DEADLINE_EXCEEDED); the
//! sandbox names the call and maps it into [`crate::error::ShimError`].

use crate::agent::AgentClient;
use crate::stdio;
use async_trait::async_trait;
use microvm_proto::agent::v1 as api;
use std::pin::Pin;
use tokio::task::JoinHandle;
use tonic::Status;

/// The agent's event stream (OOM kills, lost events).
pub type EventStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<api::Event, Status>> + Send>>;

/// One new container in the guest.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub stdin: bool,
}

/// One process exit as the agent reports it.
#[derive(Debug, Clone, Copy)]
pub struct AgentExit {
    /// 128 + signal for a killed process, as containerd expects.
    pub code: i32,
    /// The guest's clock; 0 when unknown.
    pub exited_at_unix_nanos: i64,
}

#[async_trait]
pub trait PodAgent: Send + Sync + std::fmt::Debug {
    /// Creates the container; its init's pid.
    async fn create_container(&self, container: NewContainer) -> Result<u32, Status>;
    async fn start_container(&self, container_id: &str) -> Result<(), Status>;
    /// Starts an exec (an OCI Process as JSON); its pid.
    async fn exec_process(
        &self,
        process: api::ProcessRef,
        process_json: Vec<u8>,
        stdin: bool,
    ) -> Result<u32, Status>;
    async fn signal_process(
        &self,
        process: api::ProcessRef,
        signal: u32,
        all: bool,
    ) -> Result<(), Status>;
    /// Waits (no deadline) for the process to exit.
    async fn wait_process(&self, process: api::ProcessRef) -> Result<AgentExit, Status>;
    async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), Status>;
    async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, Status>;
    async fn container_stats(
        &self,
        container_id: &str,
    ) -> Result<api::ContainerStatsResponse, Status>;
    /// `resources_json`: an OCI LinuxResources as containerd sent it.
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), Status>;
    async fn resize_tty(
        &self,
        process: api::ProcessRef,
        width: u32,
        height: u32,
    ) -> Result<(), Status>;
    async fn close_stdin(&self, process: api::ProcessRef) -> Result<(), Status>;
    async fn subscribe_events(&self) -> Result<EventStream, Status>;
    /// Copies one output stream of the process to the FIFO at `path`
    /// (nowhere when empty); the task ends when the stream does.
    fn copy_output(
        &self,
        process: api::ProcessRef,
        stream: api::OutputStream,
        path: String,
    ) -> JoinHandle<()>;
    /// Feeds the FIFO at `path` to the process's stdin.
    fn copy_stdin(&self, process: api::ProcessRef, path: String) -> JoinHandle<()>;
}

#[async_trait]
impl PodAgent for AgentClient {
    async fn create_container(&self, container: NewContainer) -> Result<u32, Status> {
        let response = self
            .containers
            .clone()
            .create_container(api::CreateContainerRequest {
                container_id: container.id,
                oci_spec_json: container.spec_json.into(),
                bundle_path: String::new(),
                stdin: container.stdin,
            })
            .await?;
        Ok(response.into_inner().pid)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), Status> {
        self.containers
            .clone()
            .start_container(api::StartContainerRequest {
                container_id: container_id.to_owned(),
            })
            .await?;
        Ok(())
    }

    async fn exec_process(
        &self,
        process: api::ProcessRef,
        process_json: Vec<u8>,
        stdin: bool,
    ) -> Result<u32, Status> {
        let response = self
            .processes
            .clone()
            .exec_process(api::ExecProcessRequest {
                process: Some(process),
                oci_process_json: process_json.into(),
                stdin,
            })
            .await?;
        Ok(response.into_inner().pid)
    }

    async fn signal_process(
        &self,
        process: api::ProcessRef,
        signal: u32,
        all: bool,
    ) -> Result<(), Status> {
        self.processes
            .clone()
            .signal_process(api::SignalProcessRequest {
                process: Some(process),
                signal,
                all,
            })
            .await?;
        Ok(())
    }

    async fn wait_process(&self, process: api::ProcessRef) -> Result<AgentExit, Status> {
        let response = self
            .processes
            .clone()
            .wait_process(api::WaitProcessRequest {
                process: Some(process),
            })
            .await?
            .into_inner();
        Ok(AgentExit {
            code: response.exit_code,
            exited_at_unix_nanos: response.exited_at_unix_nanos,
        })
    }

    async fn remove_container(&self, container_id: &str, force: bool) -> Result<(), Status> {
        self.containers
            .clone()
            .remove_container(api::RemoveContainerRequest {
                container_id: container_id.to_owned(),
                force,
            })
            .await?;
        Ok(())
    }

    async fn list_pids(&self, container_id: &str) -> Result<Vec<u32>, Status> {
        let response = self
            .containers
            .clone()
            .list_pids(api::ListPidsRequest {
                container_id: container_id.to_owned(),
            })
            .await?;
        Ok(response.into_inner().pids)
    }

    async fn container_stats(
        &self,
        container_id: &str,
    ) -> Result<api::ContainerStatsResponse, Status> {
        let response = self
            .containers
            .clone()
            .container_stats(api::ContainerStatsRequest {
                container_id: container_id.to_owned(),
            })
            .await?;
        Ok(response.into_inner())
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<(), Status> {
        self.containers
            .clone()
            .update_container(api::UpdateContainerRequest {
                container_id: container_id.to_owned(),
                oci_resources_json: resources_json.into(),
            })
            .await?;
        Ok(())
    }

    async fn resize_tty(
        &self,
        process: api::ProcessRef,
        width: u32,
        height: u32,
    ) -> Result<(), Status> {
        self.processes
            .clone()
            .resize_tty(api::ResizeTtyRequest {
                process: Some(process),
                width,
                height,
            })
            .await?;
        Ok(())
    }

    async fn close_stdin(&self, process: api::ProcessRef) -> Result<(), Status> {
        self.processes
            .clone()
            .close_stdin(api::CloseStdinRequest {
                process: Some(process),
            })
            .await?;
        Ok(())
    }

    async fn subscribe_events(&self) -> Result<EventStream, Status> {
        let stream = self
            .events
            .clone()
            .subscribe_events(api::SubscribeEventsRequest {})
            .await?
            .into_inner();
        Ok(Box::pin(stream))
    }

    fn copy_output(
        &self,
        process: api::ProcessRef,
        stream: api::OutputStream,
        path: String,
    ) -> JoinHandle<()> {
        stdio::copy_output(self, process, stream, path)
    }

    fn copy_stdin(&self, process: api::ProcessRef, path: String) -> JoinHandle<()> {
        stdio::copy_stdin(self, process, path)
    }
}
