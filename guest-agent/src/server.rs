//! The gRPC services (microvm.agent.v1) over the runtime, sandbox, storage
//! and network modules, served on unix sockets and vsock.

use crate::events::AgentEvent;
use crate::network::{InterfaceRequest, NeighborRequest, Network, RouteRequest};
use crate::runtime::{ContainerStatus, CreateRequest, ExecRequest, Runtime};
use crate::sandbox::{Dns, Sandbox, SandboxRequest};
use crate::storage::{MountRequest, Storage, StorageSource};
use futures_util::Stream;
use microvm_proto::agent::v1 as api;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status, Streaming};

/// Window sizes for stdio throughput: HTTP/2's 64 KiB default would cap a
/// stream at one window per round trip.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Largest message accepted (a stdin chunk, a spec).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Everything the services share.
pub struct AgentState {
    pub runtime: Arc<Runtime>,
    pub sandbox: Sandbox,
    pub storage: Storage,
    pub network: Network,
    /// Fired by PowerOff after its answer is on its way.
    pub power_off: tokio::sync::Notify,
    /// The guest wall clock (settable only by the VM's init).
    pub clock: crate::clock::Clock,
}

/// A gRPC status whose message is the whole error chain, once.
pub fn status(code: tonic::Code, err: &dyn std::error::Error) -> Status {
    Status::new(code, microvm_errors::error_chain(err))
}

macro_rules! grpc_error {
    ($err:expr) => {{
        let err = $err;
        status(err.grpc_code(), &err)
    }};
}

fn unix_nanos(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn process_ref(process: Option<api::ProcessRef>) -> Result<api::ProcessRef, Status> {
    let process =
        process.ok_or_else(|| Status::invalid_argument("the request names no process"))?;
    if process.container_id.is_empty() {
        return Err(Status::invalid_argument(
            "the request has an empty container_id",
        ));
    }
    Ok(process)
}

/// Runs `work` as a task of its own: a client that goes away mid-call must
/// not cancel a half-done create or remove (that would leave a cgroup or a
/// process behind); the result then just has no one to go to.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|err| Status::internal(format!("request task failed: {err}")))?
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
pub struct Services(pub Arc<AgentState>);

#[tonic::async_trait]
impl api::health_server::Health for Services {
    async fn check(
        &self,
        request: Request<api::CheckRequest>,
    ) -> Result<Response<api::CheckResponse>, Status> {
        let ours = api::ApiVersion::current();
        if let Some(theirs) = request.into_inner().client_version {
            if !ours.compatible_with(&theirs) {
                return Err(Status::failed_precondition(format!(
                    "client API version {theirs} is incompatible with this agent's {ours}"
                )));
            }
        }
        Ok(Response::new(api::CheckResponse {
            agent_version: Some(ours),
            guest_uptime_seconds: crate::guest::read_uptime(),
            agent_build_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }
}

#[tonic::async_trait]
impl api::sandbox_server::Sandbox for Services {
    async fn create_sandbox(
        &self,
        request: Request<api::CreateSandboxRequest>,
    ) -> Result<Response<api::CreateSandboxResponse>, Status> {
        let request = request.into_inner();
        let dns = request.dns.unwrap_or_default();
        let mut sysctls: Vec<(String, String)> = request.sysctls.into_iter().collect();
        sysctls.sort();
        let state = Arc::clone(&self.0);
        let files = detached(async move {
            state
                .sandbox
                .create(
                    &state.runtime,
                    SandboxRequest {
                        id: request.sandbox_id,
                        hostname: request.hostname,
                        dns: Dns {
                            servers: dns.servers,
                            searches: dns.searches,
                            options: dns.options,
                        },
                        sysctls,
                        share_pid_namespace: request.share_pid_namespace,
                    },
                )
                .await
                .map_err(|err| grpc_error!(err))
        })
        .await?;
        Ok(Response::new(api::CreateSandboxResponse {
            resolv_conf_path: files.resolv_conf.display().to_string(),
            hostname_path: files.hostname.display().to_string(),
            hosts_path: files.hosts.display().to_string(),
        }))
    }

    async fn destroy_sandbox(
        &self,
        _request: Request<api::DestroySandboxRequest>,
    ) -> Result<Response<api::DestroySandboxResponse>, Status> {
        let state = Arc::clone(&self.0);
        detached(async move {
            state
                .sandbox
                .destroy(&state.runtime, &state.storage)
                .await
                .map_err(|err| grpc_error!(err))
        })
        .await?;
        Ok(Response::new(api::DestroySandboxResponse {}))
    }

    async fn get_guest_details(
        &self,
        _request: Request<api::GetGuestDetailsRequest>,
    ) -> Result<Response<api::GuestDetails>, Status> {
        let details = crate::guest::details();
        Ok(Response::new(api::GuestDetails {
            kernel_release: details.kernel_release,
            kernel_version: details.kernel_version,
            agent_build_version: env!("CARGO_PKG_VERSION").into(),
            api_version: Some(api::ApiVersion::current()),
            memory_total_bytes: details.memory_total_bytes,
            memory_available_bytes: details.memory_available_bytes,
            online_vcpus: details.online_vcpus,
            uptime_seconds: details.uptime_seconds,
        }))
    }

    async fn power_off(
        &self,
        _request: Request<api::PowerOffRequest>,
    ) -> Result<Response<api::PowerOffResponse>, Status> {
        tracing::info!("power off requested");
        self.0.power_off.notify_one();
        Ok(Response::new(api::PowerOffResponse {}))
    }
}

// --- Clock (API 1.1, issue #15) ---
#[tonic::async_trait]
impl api::clock_server::Clock for Services {
    async fn get_clock(
        &self,
        _request: Request<api::GetClockRequest>,
    ) -> Result<Response<api::ClockReading>, Status> {
        let realtime = crate::clock::realtime_nanos().map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::ClockReading {
            realtime_unix_nanos: realtime,
        }))
    }

    async fn step_clock(
        &self,
        request: Request<api::StepClockRequest>,
    ) -> Result<Response<api::ClockReading>, Status> {
        let step = request.into_inner().step_nanos;
        let realtime = self.0.clock.step(step).map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::ClockReading {
            realtime_unix_nanos: realtime,
        }))
    }
}
// --- end Clock ---

fn container_status(status: ContainerStatus) -> api::ContainerStatus {
    match status {
        ContainerStatus::Created => api::ContainerStatus::Created,
        ContainerStatus::Running => api::ContainerStatus::Running,
        ContainerStatus::Stopped => api::ContainerStatus::Stopped,
    }
}

#[tonic::async_trait]
impl api::containers_server::Containers for Services {
    async fn create_container(
        &self,
        request: Request<api::CreateContainerRequest>,
    ) -> Result<Response<api::CreateContainerResponse>, Status> {
        let request = request.into_inner();
        let runtime = Arc::clone(&self.0.runtime);
        let pid = detached(async move {
            let bundle =
                (!request.bundle_path.is_empty()).then(|| PathBuf::from(&request.bundle_path));
            runtime
                .create(CreateRequest {
                    id: &request.container_id,
                    spec_json: &request.oci_spec_json,
                    bundle: bundle.as_deref(),
                    stdin: request.stdin,
                })
                .await
                .map_err(|err| grpc_error!(err))
        })
        .await?;
        Ok(Response::new(api::CreateContainerResponse { pid }))
    }

    async fn start_container(
        &self,
        request: Request<api::StartContainerRequest>,
    ) -> Result<Response<api::StartContainerResponse>, Status> {
        let runtime = Arc::clone(&self.0.runtime);
        let id = request.into_inner().container_id;
        detached(async move { runtime.start(&id).await.map_err(|err| grpc_error!(err)) }).await?;
        Ok(Response::new(api::StartContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<api::RemoveContainerRequest>,
    ) -> Result<Response<api::RemoveContainerResponse>, Status> {
        let request = request.into_inner();
        let runtime = Arc::clone(&self.0.runtime);
        detached(async move {
            runtime
                .remove(&request.container_id, request.force)
                .await
                .map_err(|err| grpc_error!(err))
        })
        .await?;
        Ok(Response::new(api::RemoveContainerResponse {}))
    }

    async fn update_container(
        &self,
        request: Request<api::UpdateContainerRequest>,
    ) -> Result<Response<api::UpdateContainerResponse>, Status> {
        let request = request.into_inner();
        self.0
            .runtime
            .update(&request.container_id, &request.oci_resources_json)
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::UpdateContainerResponse {}))
    }

    async fn container_stats(
        &self,
        request: Request<api::ContainerStatsRequest>,
    ) -> Result<Response<api::ContainerStatsResponse>, Status> {
        let (stats, init_pid) = self
            .0
            .runtime
            .stats(&request.into_inner().container_id)
            .map_err(|err| grpc_error!(err))?;
        let network = crate::network::interface_counters(init_pid)
            .into_iter()
            .map(|counters| api::NetworkInterfaceStats {
                name: counters.name,
                rx_bytes: counters.rx_bytes,
                rx_packets: counters.rx_packets,
                rx_errors: counters.rx_errors,
                rx_dropped: counters.rx_dropped,
                tx_bytes: counters.tx_bytes,
                tx_packets: counters.tx_packets,
                tx_errors: counters.tx_errors,
                tx_dropped: counters.tx_dropped,
            })
            .collect();
        Ok(Response::new(api::ContainerStatsResponse {
            cpu: Some(api::CpuStats {
                usage_usec: stats.cpu.usage_usec,
                user_usec: stats.cpu.user_usec,
                system_usec: stats.cpu.system_usec,
                nr_periods: stats.cpu.nr_periods,
                nr_throttled: stats.cpu.nr_throttled,
                throttled_usec: stats.cpu.throttled_usec,
            }),
            memory: stats.memory.map(|memory| api::MemoryStats {
                usage_bytes: memory.usage,
                limit_bytes: memory.limit,
                swap_usage_bytes: memory.swap_usage,
                oom_events: memory.oom,
                oom_kill_events: memory.oom_kill,
                stat: memory.stat.into_iter().collect(),
            }),
            pids: stats.pids.map(|pids| api::PidsStats {
                current: pids.current,
                limit: pids.limit,
            }),
            io: stats
                .io
                .into_iter()
                .map(|io| api::IoDeviceStats {
                    major: io.major,
                    minor: io.minor,
                    read_bytes: io.read_bytes,
                    write_bytes: io.write_bytes,
                    read_ios: io.read_ios,
                    write_ios: io.write_ios,
                })
                .collect(),
            network,
        }))
    }

    async fn list_pids(
        &self,
        request: Request<api::ListPidsRequest>,
    ) -> Result<Response<api::ListPidsResponse>, Status> {
        let pids = self
            .0
            .runtime
            .pids(&request.into_inner().container_id)
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::ListPidsResponse { pids }))
    }

    async fn list_containers(
        &self,
        _request: Request<api::ListContainersRequest>,
    ) -> Result<Response<api::ListContainersResponse>, Status> {
        let containers = self
            .0
            .runtime
            .containers()
            .into_iter()
            .map(|container| api::ContainerInfo {
                container_id: container.id.clone(),
                status: container_status(container.status()) as i32,
                pid: container.init.pid,
                exec_ids: container.exec_ids(),
            })
            .collect();
        Ok(Response::new(api::ListContainersResponse { containers }))
    }
}

#[tonic::async_trait]
impl api::processes_server::Processes for Services {
    type ReadOutputStream = BoxStream<api::OutputChunk>;

    async fn exec_process(
        &self,
        request: Request<api::ExecProcessRequest>,
    ) -> Result<Response<api::ExecProcessResponse>, Status> {
        let request = request.into_inner();
        let process = process_ref(request.process)?;
        let runtime = Arc::clone(&self.0.runtime);
        let pid = detached(async move {
            runtime
                .exec(ExecRequest {
                    container_id: &process.container_id,
                    exec_id: &process.exec_id,
                    process_json: &request.oci_process_json,
                    stdin: request.stdin,
                })
                .await
                .map_err(|err| grpc_error!(err))
        })
        .await?;
        Ok(Response::new(api::ExecProcessResponse { pid }))
    }

    async fn signal_process(
        &self,
        request: Request<api::SignalProcessRequest>,
    ) -> Result<Response<api::SignalProcessResponse>, Status> {
        let request = request.into_inner();
        let process = process_ref(request.process)?;
        self.0
            .runtime
            .signal(
                &process.container_id,
                &process.exec_id,
                request.signal,
                request.all,
            )
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::SignalProcessResponse {}))
    }

    async fn wait_process(
        &self,
        request: Request<api::WaitProcessRequest>,
    ) -> Result<Response<api::WaitProcessResponse>, Status> {
        let process = process_ref(request.into_inner().process)?;
        let process = self
            .0
            .runtime
            .process(&process.container_id, &process.exec_id)
            .map_err(|err| grpc_error!(err))?;
        let exit = process.wait().await;
        Ok(Response::new(api::WaitProcessResponse {
            exit_code: exit.code,
            exited_at_unix_nanos: unix_nanos(exit.at),
        }))
    }

    async fn resize_tty(
        &self,
        request: Request<api::ResizeTtyRequest>,
    ) -> Result<Response<api::ResizeTtyResponse>, Status> {
        let request = request.into_inner();
        let process = process_ref(request.process)?;
        let (Ok(rows), Ok(columns)) = (u16::try_from(request.height), u16::try_from(request.width))
        else {
            return Err(Status::invalid_argument(format!(
                "terminal size {}x{} is out of range",
                request.width, request.height
            )));
        };
        self.0
            .runtime
            .process(&process.container_id, &process.exec_id)
            .and_then(|found| found.resize(rows, columns))
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::ResizeTtyResponse {}))
    }

    async fn close_stdin(
        &self,
        request: Request<api::CloseStdinRequest>,
    ) -> Result<Response<api::CloseStdinResponse>, Status> {
        let process = process_ref(request.into_inner().process)?;
        let found = self
            .0
            .runtime
            .process(&process.container_id, &process.exec_id)
            .map_err(|err| grpc_error!(err))?;
        found.close_stdin().await.map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::CloseStdinResponse {}))
    }

    async fn write_stdin(
        &self,
        request: Request<Streaming<api::StdinChunk>>,
    ) -> Result<Response<api::WriteStdinResponse>, Status> {
        let mut stream = request.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument(
                "empty stdin stream: the first message must name the process",
            ));
        };
        let process = process_ref(first.process.clone())?;
        let found = self
            .0
            .runtime
            .process(&process.container_id, &process.exec_id)
            .map_err(|err| grpc_error!(err))?;
        let mut written: u64 = 0;
        let mut next = Some(first);
        while let Some(chunk) = next {
            if !chunk.data.is_empty() {
                found
                    .write_stdin(&chunk.data)
                    .await
                    .map_err(|err| grpc_error!(err))?;
                written += chunk.data.len() as u64;
            }
            if chunk.close_stdin {
                found.close_stdin().await.map_err(|err| grpc_error!(err))?;
            }
            next = stream.message().await?;
        }
        Ok(Response::new(api::WriteStdinResponse {
            bytes_written: written,
        }))
    }

    async fn read_output(
        &self,
        request: Request<api::ReadOutputRequest>,
    ) -> Result<Response<Self::ReadOutputStream>, Status> {
        let request = request.into_inner();
        let stderr = match api::OutputStream::try_from(request.stream) {
            Ok(api::OutputStream::Stdout) => false,
            Ok(api::OutputStream::Stderr) => true,
            _ => {
                return Err(Status::invalid_argument(
                    "stream must be OUTPUT_STREAM_STDOUT or OUTPUT_STREAM_STDERR",
                ))
            }
        };
        let process = process_ref(request.process)?;
        let found = self
            .0
            .runtime
            .process(&process.container_id, &process.exec_id)
            .map_err(|err| grpc_error!(err))?;
        let reader = found
            .output_reader(stderr)
            .map_err(|err| grpc_error!(err))?;
        // Reads only when tonic asks for the next message: what a reader
        // that goes away never asked for stays in the pipe.
        let stream = futures_util::stream::unfold(Some(reader), |state| async move {
            let mut reader = state?;
            match reader.next_chunk().await {
                Ok(Some(data)) => Some((Ok(api::OutputChunk { data }), Some(reader))),
                Ok(None) => None,
                Err(err) => Some((Err(status(tonic::Code::Internal, &err)), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn event_message(event: AgentEvent) -> api::Event {
    let now = unix_nanos(SystemTime::now());
    let kind = match event {
        AgentEvent::ProcessExited {
            container_id,
            exec_id,
            pid,
            exit,
        } => api::event::Kind::ProcessExited(api::ProcessExited {
            container_id,
            exec_id,
            pid,
            exit_code: exit.code,
            exited_at_unix_nanos: unix_nanos(exit.at),
        }),
        AgentEvent::OomKilled {
            container_id,
            oom_kill_count,
        } => api::event::Kind::OomKilled(api::OomKilled {
            container_id,
            oom_kill_count,
        }),
    };
    api::Event {
        timestamp_unix_nanos: now,
        kind: Some(kind),
    }
}

#[tonic::async_trait]
impl api::events_server::Events for Services {
    type SubscribeEventsStream = BoxStream<api::Event>;

    async fn subscribe_events(
        &self,
        _request: Request<api::SubscribeEventsRequest>,
    ) -> Result<Response<Self::SubscribeEventsStream>, Status> {
        let receiver = self.0.runtime.events().subscribe();
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            use tokio::sync::broadcast::error::RecvError;
            let event = match receiver.recv().await {
                Ok(event) => event_message(event),
                Err(RecvError::Lagged(count)) => api::Event {
                    timestamp_unix_nanos: unix_nanos(SystemTime::now()),
                    kind: Some(api::event::Kind::EventsLost(api::EventsLost { count })),
                },
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), receiver))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl api::storage_server::Storage for Services {
    async fn mount_storage(
        &self,
        request: Request<api::MountStorageRequest>,
    ) -> Result<Response<api::MountStorageResponse>, Status> {
        let request = request.into_inner();
        let source = match request.source {
            Some(api::mount_storage_request::Source::VirtioFsTag(tag)) => {
                StorageSource::VirtioFs { tag }
            }
            Some(api::mount_storage_request::Source::BlockSerial(serial)) => {
                StorageSource::BlockSerial(serial)
            }
            Some(api::mount_storage_request::Source::BlockMmioAddress(address)) => {
                StorageSource::BlockMmioAddress(address)
            }
            None => {
                return Err(Status::invalid_argument(
                    "the request names no storage source",
                ))
            }
        };
        let source = self
            .0
            .storage
            .mount(MountRequest {
                source,
                target: PathBuf::from(request.target),
                fstype: request.fstype,
                options: request.options,
            })
            .await
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::MountStorageResponse { source }))
    }

    async fn unmount_storage(
        &self,
        request: Request<api::UnmountStorageRequest>,
    ) -> Result<Response<api::UnmountStorageResponse>, Status> {
        let target = PathBuf::from(request.into_inner().target);
        self.0
            .storage
            .unmount(&target)
            .await
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::UnmountStorageResponse {}))
    }
}

#[tonic::async_trait]
impl api::network_server::Network for Services {
    async fn update_interface(
        &self,
        request: Request<api::UpdateInterfaceRequest>,
    ) -> Result<Response<api::UpdateInterfaceResponse>, Status> {
        let request = request.into_inner();
        let (name, index) = self
            .0
            .network
            .update_interface(&InterfaceRequest {
                mac: request.mac,
                name: request.name,
                addresses: request.addresses,
                mtu: request.mtu,
                up: request.up,
            })
            .await
            .map_err(|err| grpc_error!(err))?;
        Ok(Response::new(api::UpdateInterfaceResponse { name, index }))
    }

    async fn update_routes(
        &self,
        request: Request<api::UpdateRoutesRequest>,
    ) -> Result<Response<api::UpdateRoutesResponse>, Status> {
        for route in request.into_inner().routes {
            self.0
                .network
                .add_route(&RouteRequest {
                    destination: route.destination,
                    gateway: route.gateway,
                    device: route.device,
                    source: route.source,
                    metric: route.metric,
                })
                .await
                .map_err(|err| grpc_error!(err))?;
        }
        Ok(Response::new(api::UpdateRoutesResponse {}))
    }

    async fn add_neighbors(
        &self,
        request: Request<api::AddNeighborsRequest>,
    ) -> Result<Response<api::AddNeighborsResponse>, Status> {
        for neighbor in request.into_inner().neighbors {
            self.0
                .network
                .add_neighbor(&NeighborRequest {
                    ip: neighbor.ip,
                    mac: neighbor.mac,
                    device: neighbor.device,
                })
                .await
                .map_err(|err| grpc_error!(err))?;
        }
        Ok(Response::new(api::AddNeighborsResponse {}))
    }
}

/// Refuses requests without a compatible API version (see
/// [`microvm_proto::check_client_api_version`]).
#[allow(clippy::result_large_err)]
fn check_version(request: Request<()>) -> Result<Request<()>, Status> {
    microvm_proto::check_client_api_version(request.metadata())?;
    Ok(request)
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Vsock(u32),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(port) = text.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Self::Vsock)
                .map_err(|_| format!("vsock port {port:?} is not a number"));
        }
        Err(format!("{text:?}: expected unix:<path> or vsock:<port>"))
    }
}

/// A vsock connection for tonic: `Connected` is tonic's trait, so it
/// needs a local type (and saves pulling tonic's client stack in through
/// tokio-vsock's tonic feature).
pub struct VsockConnection(tokio_vsock::VsockStream);

impl tonic::transport::server::Connected for VsockConnection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for VsockConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for VsockConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no vsock device: the VM has no virtio-vsock device (local CID {0:?})")]
    NoVsockDevice(Option<u32>),
    #[error("cannot listen on {0}")]
    Bind(String, #[source] std::io::Error),
    #[error("serving on {0} failed")]
    Serve(String, #[source] tonic::transport::Error),
}

/// Serves every service on `listen` until `shutdown` completes.
pub async fn serve(
    state: Arc<AgentState>,
    listen: Listen,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    use api::{
        clock_server::ClockServer, containers_server::ContainersServer,
        events_server::EventsServer, health_server::HealthServer, network_server::NetworkServer,
        processes_server::ProcessesServer, sandbox_server::SandboxServer,
        storage_server::StorageServer,
    };
    let services = Services(state);
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .layer(tonic::service::InterceptorLayer::new(check_version))
        .add_service(HealthServer::new(services.clone()))
        .add_service(SandboxServer::new(services.clone()))
        .add_service(ContainersServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE))
        .add_service(ProcessesServer::new(services.clone()).max_decoding_message_size(MAX_MESSAGE))
        .add_service(EventsServer::new(services.clone()))
        .add_service(StorageServer::new(services.clone()))
        .add_service(ClockServer::new(services.clone()))
        .add_service(NetworkServer::new(services))
        // microvm-ctl: guest metrics and the debug console.
        .add_service(crate::debug::server());
    match listen {
        Listen::Unix(path) => {
            let name = format!("unix:{}", path.display());
            // A socket left by an earlier run would make bind fail.
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|err| ServeError::Bind(name.clone(), err))?;
            tracing::info!("listening on {name}");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    shutdown,
                )
                .await
                .map_err(|err| ServeError::Serve(name, err))
        }
        Listen::Vsock(port) => {
            let name = format!("vsock:{port}");
            // Binding succeeds even without a device (the transport is
            // built in), and then no connection could ever come.
            match vsock::get_local_cid() {
                Ok(cid) if cid != vsock::VMADDR_CID_ANY => {}
                Ok(cid) => return Err(ServeError::NoVsockDevice(Some(cid))),
                Err(_) => return Err(ServeError::NoVsockDevice(None)),
            }
            let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                tokio_vsock::VMADDR_CID_ANY,
                port,
            ))
            .map_err(|err| ServeError::Bind(name.clone(), err))?;
            tracing::info!("listening on {name}");
            // Only the host may connect: see crate::peer.
            let accepted =
                futures_util::stream::poll_fn(move |cx| listener.poll_accept(cx).map(Some));
            let refused = Arc::new(crate::peer::RefusedPeers::default());
            let incoming =
                futures_util::StreamExt::map(crate::peer::host_only(accepted, refused), |stream| {
                    stream.map(VsockConnection)
                });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
                .map_err(|err| ServeError::Serve(name, err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/a.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/a.sock".into())
        );
        assert_eq!("vsock:1024".parse::<Listen>().unwrap(), Listen::Vsock(1024));
        assert!("vsock:x".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("tcp:1".parse::<Listen>().is_err());
    }

    #[test]
    fn status_carries_the_whole_chain_once() {
        let err = crate::runtime::RuntimeError::Io {
            id: "c1".into(),
            what: "opening the cgroup".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let status = status(tonic::Code::Internal, &err);
        assert!(status
            .message()
            .starts_with("container c1: opening the cgroup: "));
        assert!(status.message().contains("No such file"));
    }
}
