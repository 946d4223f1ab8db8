//! The guest agent's gRPC client. The transport is hybrid vsock: connect to
//! the VMM's unix socket, write `CONNECT <port>\n`, read `OK <n>\n`, and
//! the rest of the stream is the guest's vsock connection, over which
//! tonic speaks HTTP/2. Every request carries the API version
//! ([`microvm_proto::with_api_version`]).

use hyper_util::rt::TokioIo;
use microvm_proto::agent::v1 as api;
use microvm_proto::agent::v1::{
    clock_client::ClockClient, containers_client::ContainersClient, debug_client::DebugClient,
    events_client::EventsClient, health_client::HealthClient, network_client::NetworkClient,
    processes_client::ProcessesClient, sandbox_client::SandboxClient,
    storage_client::StorageClient,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The longest handshake reply accepted ("OK 4294967295").
const MAX_REPLY: usize = 32;

/// HTTP/2 flow control towards the agent. h2's defaults (64 KiB windows,
/// 16 KiB frames) cut a container's output into many small frames, each a
/// wakeup; 1 MiB frames took agent-bench's stdout stream from about 500 to
/// 780 MB/s (tests/src/agent.rs sets the same frame size). The
/// windows stay small enough that a container whose log reader stalls
/// buffers at most 1 MiB per stream in the shim.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
/// HTTP/2 pings towards the agent, and how long one may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the VM's vsock socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake on {path} failed")]
    Handshake {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock: the VMM refused port {port}: {reply:?}")]
    Refused { port: u32, reply: String },
    #[error("gRPC channel to the agent")]
    Channel(#[source] tonic::transport::Error),
    #[error("agent health check failed: {0}")]
    Check(tonic::Status),
    #[error("version mismatch: the agent speaks API {agent}, this shim API {shim} (major versions differ); the guest image's agent and the shim must come from compatible releases: rebuild or reinstall the guest image (microvm-ctl install)")]
    Incompatible { agent: String, shim: String },
}

/// Connects to the unix socket `path` without following a symlink as its
/// last component: the jailed VMM owns the socket's directory and could
/// put a link to another pod's socket there. The socket is opened `O_PATH |
/// O_NOFOLLOW`, checked to be a socket, and connected to through the fd's
/// magic link, which names exactly that inode.
async fn connect_no_follow(path: &Path) -> std::io::Result<UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::Socket {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a socket but a {kind:?}: refused, never followed"),
        ));
    }
    use std::os::fd::AsRawFd;
    let stream = UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd())).await;
    drop(fd);
    stream
}

/// Opens one hybrid vsock connection to `port` in the guest.
pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let mut stream = connect_no_follow(path)
        .await
        .map_err(|source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let handshake_error = |source| AgentError::Handshake {
        path: path.to_path_buf(),
        source,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(handshake_error)?;
    // Byte by byte: anything after the newline is the guest's data and
    // must stay in the stream.
    let mut reply = Vec::with_capacity(MAX_REPLY);
    loop {
        let byte = stream.read_u8().await.map_err(handshake_error)?;
        if byte == b'\n' {
            break;
        }
        reply.push(byte);
        if reply.len() > MAX_REPLY {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    match reply.strip_prefix("OK ") {
        Some(rest) if rest.trim().parse::<u32>().is_ok() => Ok(stream),
        _ => Err(AgentError::Refused { port, reply }),
    }
}

pub(crate) type Intercepted = InterceptedService<
    // microvm-ctl: agent RPC metrics; every call's deadline (deadline.rs).
    crate::metrics::Timed<crate::deadline::Deadline<Channel>>,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

fn version_interceptor() -> fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    microvm_proto::with_api_version::<()>
}

/// All services of one agent, over one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    pub health: HealthClient<Intercepted>,
    pub sandbox: SandboxClient<Intercepted>,
    pub containers: ContainersClient<Intercepted>,
    pub processes: ProcessesClient<Intercepted>,
    pub events: EventsClient<Intercepted>,
    pub storage: StorageClient<Intercepted>,
    pub network: NetworkClient<Intercepted>,
    /// microvm-ctl: guest metrics, the console policy.
    pub debug: DebugClient<Intercepted>,
    /// The guest wall clock (API 1.1, [`crate::clock`]).
    pub clock: ClockClient<Intercepted>,
}

impl AgentClient {
    /// Connects to the agent behind the hybrid vsock socket `path`.
    /// The channel reconnects through the same handshake if the connection
    /// drops.
    pub async fn connect(path: &Path, port: u32) -> Result<Self, AgentError> {
        Self::connect_with_deadline(path, port, crate::deadline::DEFAULT_CALL_TIMEOUT).await
    }

    /// [`Self::connect`], every call (but those that wait by design) failing
    /// with DEADLINE_EXCEEDED after `call_timeout`.
    pub async fn connect_with_deadline(
        path: &Path,
        port: u32,
        call_timeout: Duration,
    ) -> Result<Self, AgentError> {
        // Fail fast with the handshake's own error: tonic would wrap it.
        drop(connect_hybrid_vsock(path, port).await?);
        let socket = path.to_path_buf();
        let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                connect_hybrid_vsock(&socket, port)
                    .await
                    .map(TokioIo::new)
                    .map_err(std::io::Error::other)
            }
        });
        // The URI is never dialled: the connector ignores it.
        let channel = Endpoint::from_static("http://microvm-agent")
            .connect_timeout(Duration::from_secs(5))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            // A guest that stops answering is noticed even on an idle
            // connection.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(AgentError::Channel)?;
        Ok(Self::with_channel_and_deadline(channel, call_timeout))
    }

    pub fn with_channel(channel: Channel) -> Self {
        Self::with_channel_and_deadline(channel, crate::deadline::DEFAULT_CALL_TIMEOUT)
    }

    pub fn with_channel_and_deadline(channel: Channel, call_timeout: Duration) -> Self {
        let interceptor = version_interceptor();
        let channel = crate::deadline::Deadline::new(channel, call_timeout);
        let channel = crate::metrics::Timed::new(channel); // microvm-ctl: agent RPC metrics
        Self {
            health: HealthClient::with_interceptor(channel.clone(), interceptor),
            sandbox: SandboxClient::with_interceptor(channel.clone(), interceptor),
            containers: ContainersClient::with_interceptor(channel.clone(), interceptor),
            processes: ProcessesClient::with_interceptor(channel.clone(), interceptor),
            events: EventsClient::with_interceptor(channel.clone(), interceptor),
            storage: StorageClient::with_interceptor(channel.clone(), interceptor),
            network: NetworkClient::with_interceptor(channel.clone(), interceptor),
            clock: ClockClient::with_interceptor(channel.clone(), interceptor),
            debug: DebugClient::with_interceptor(channel, interceptor),
        }
    }

    /// Health and version check; refuses an agent of another major version.
    pub async fn check(&self) -> Result<api::CheckResponse, AgentError> {
        let ours = api::ApiVersion::current();
        let response = self
            .health
            .clone()
            .check(api::CheckRequest {
                client_version: Some(ours),
            })
            .await
            .map_err(AgentError::Check)?
            .into_inner();
        let theirs = response.agent_version.unwrap_or_default();
        if !ours.compatible_with(&theirs) {
            return Err(AgentError::Incompatible {
                agent: theirs.to_string(),
                shim: ours.to_string(),
            });
        }
        Ok(response)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use api::health_server::{Health, HealthServer};
    use tokio::net::UnixListener;

    /// A fake agent: a Health server behind a fake hybrid vsock muxer that
    /// answers `CONNECT 1024` with `OK` and refuses every other port.
    pub(crate) struct FakeHealth {
        pub major: u32,
        /// Never answers: a stalled agent.
        pub stall: bool,
    }

    #[tonic::async_trait]
    impl Health for FakeHealth {
        async fn check(
            &self,
            request: tonic::Request<api::CheckRequest>,
        ) -> Result<tonic::Response<api::CheckResponse>, tonic::Status> {
            microvm_proto::check_client_api_version(request.metadata())?;
            if self.stall {
                std::future::pending::<()>().await;
            }
            Ok(tonic::Response::new(api::CheckResponse {
                agent_version: Some(api::ApiVersion {
                    major: self.major,
                    minor: 3,
                }),
                guest_uptime_seconds: 1.5,
                agent_build_version: "test".into(),
            }))
        }
    }

    pub(crate) fn serve_fake(socket: &Path, major: u32) -> tokio::task::JoinHandle<()> {
        serve_fake_health(
            socket,
            FakeHealth {
                major,
                stall: false,
            },
        )
    }

    pub(crate) fn serve_fake_health(
        socket: &Path,
        health: FakeHealth,
    ) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(socket).unwrap();
        let (conn_tx, conn_rx) =
            tokio::sync::mpsc::unbounded_channel::<std::io::Result<UnixStream>>();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let conn_tx = conn_tx.clone();
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    while let Ok(byte) = stream.read_u8().await {
                        if byte == b'\n' {
                            break;
                        }
                        line.push(byte);
                    }
                    if line == b"CONNECT 1024" {
                        let _ = stream.write_all(b"OK 1024\n").await;
                        let _ = conn_tx.send(Ok(stream));
                    }
                    // Other ports: closed without a reply, as a VMM does
                    // when nothing listens in the guest.
                });
            }
        });
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(conn_rx);
            let _ = tonic::transport::Server::builder()
                .add_service(HealthServer::new(health))
                .serve_with_incoming(incoming)
                .await;
        })
    }

    #[tokio::test]
    async fn check_over_hybrid_vsock() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let server = serve_fake(&socket, microvm_proto::API_VERSION_MAJOR);
        let client = AgentClient::connect(&socket, microvm_proto::abi::vsock::AGENT_PORT)
            .await
            .unwrap();
        let response = client.check().await.unwrap();
        assert_eq!(response.agent_build_version, "test");
        assert_eq!(response.guest_uptime_seconds, 1.5);
        // A second call reuses the connection.
        client.check().await.unwrap();
        server.abort();
    }

    /// The jailed VMM owns the socket dir: a link it plants there in place
    /// of its socket (say, to another pod's) is refused, not followed.
    #[tokio::test]
    async fn a_symlink_in_place_of_the_socket_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let other_pod = tmp.path().join("other-vs.sock");
        let server = serve_fake(&other_pod, microvm_proto::API_VERSION_MAJOR);
        let planted = tmp.path().join("vs.sock");
        std::os::unix::fs::symlink(&other_pod, &planted).unwrap();
        let port = microvm_proto::abi::vsock::AGENT_PORT;
        let err = AgentClient::connect(&planted, port).await.unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }), "{err}");
        let text = microvm_errors::error_chain(&err);
        assert!(
            text.contains("not a socket") || text.contains("symbolic link"),
            "{text}"
        );
        // A regular file is refused too; the real socket still works.
        std::fs::remove_file(&planted).unwrap();
        std::fs::write(&planted, "").unwrap();
        let err = AgentClient::connect(&planted, port).await.unwrap_err();
        assert!(
            microvm_errors::error_chain(&err).contains("not a socket"),
            "{err}"
        );
        AgentClient::connect(&other_pod, port).await.unwrap();
        server.abort();
    }

    #[tokio::test]
    async fn a_stalled_agent_fails_the_call_within_its_deadline() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let server = serve_fake_health(
            &socket,
            FakeHealth {
                major: microvm_proto::API_VERSION_MAJOR,
                stall: true,
            },
        );
        let deadline = Duration::from_millis(300);
        let client = AgentClient::connect_with_deadline(
            &socket,
            microvm_proto::abi::vsock::AGENT_PORT,
            deadline,
        )
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let err = client.check().await.unwrap_err();
        let AgentError::Check(status) = err else {
            panic!("{err}");
        };
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status}");
        assert!(
            status.message().contains("did not answer within"),
            "{status}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(started.elapsed() >= deadline);
        server.abort();
    }

    #[test]
    fn only_waiting_calls_are_exempt_from_the_deadline() {
        use crate::deadline::is_exempt;
        assert!(is_exempt("/microvm.agent.v1.Processes/WaitProcess"));
        for unary in [
            "CreateContainer",
            "StartContainer",
            "UpdateContainer",
            "ContainerStats",
            "ListPids",
        ] {
            assert!(!is_exempt(&format!("/microvm.agent.v1.Containers/{unary}")));
        }
        for unary in ["ExecProcess", "ResizeTty", "CloseStdin", "SignalProcess"] {
            assert!(!is_exempt(&format!("/microvm.agent.v1.Processes/{unary}")));
        }
    }

    #[tokio::test]
    async fn incompatible_agent_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let server = serve_fake(&socket, microvm_proto::API_VERSION_MAJOR + 1);
        let client = AgentClient::connect(&socket, microvm_proto::abi::vsock::AGENT_PORT)
            .await
            .unwrap();
        let err = client.check().await.unwrap_err();
        assert!(matches!(err, AgentError::Incompatible { .. }), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn handshake_errors_are_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let err = connect_hybrid_vsock(&socket, 1024).await.unwrap_err();
        assert!(matches!(err, AgentError::Connect { .. }));

        let server = serve_fake(&socket, microvm_proto::API_VERSION_MAJOR);
        let err = connect_hybrid_vsock(&socket, 9).await.unwrap_err();
        assert!(matches!(err, AgentError::Handshake { .. }), "{err}");
        server.abort();

        // A VMM that answers something other than OK.
        let socket = tmp.path().join("refuse.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 16];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"FAILED\n").await;
            }
        });
        let err = connect_hybrid_vsock(&socket, 1024).await.unwrap_err();
        assert!(
            matches!(err, AgentError::Refused { port: 1024, .. }),
            "{err}"
        );
    }
}
