//! The guest agent's gRPC client. The transport is hybrid vsock: connect to
//! the VMM's unix socket, write `CONNECT <port>\n`, read `OK <n>\n`, and
//! the rest of the stream is the guest's vsock connection, over which
//! tonic speaks HTTP/2. Every request carries the API version
//! ([`microvm_proto::with_api_version`]).

use hyper_util::rt::TokioIo;
use microvm_proto::agent::v1 as api;
use microvm_proto::agent::v1::{
    containers_client::ContainersClient, events_client::EventsClient, health_client::HealthClient,
    network_client::NetworkClient, processes_client::ProcessesClient,
    sandbox_client::SandboxClient, storage_client::StorageClient,
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
    #[error("agent speaks API {agent}, this shim {shim}: major versions differ")]
    Incompatible { agent: String, shim: String },
}

/// Opens one hybrid vsock connection to `port` in the guest.
pub async fn connect_hybrid_vsock(path: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let mut stream = UnixStream::connect(path)
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

type Intercepted = InterceptedService<
    Channel,
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
}

impl AgentClient {
    /// Connects to the agent behind the hybrid vsock socket `path`.
    /// The channel reconnects through the same handshake if the connection
    /// drops.
    pub async fn connect(path: &Path, port: u32) -> Result<Self, AgentError> {
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
            .connect_with_connector(connector)
            .await
            .map_err(AgentError::Channel)?;
        Ok(Self::with_channel(channel))
    }

    pub fn with_channel(channel: Channel) -> Self {
        let interceptor = version_interceptor();
        Self {
            health: HealthClient::with_interceptor(channel.clone(), interceptor),
            sandbox: SandboxClient::with_interceptor(channel.clone(), interceptor),
            containers: ContainersClient::with_interceptor(channel.clone(), interceptor),
            processes: ProcessesClient::with_interceptor(channel.clone(), interceptor),
            events: EventsClient::with_interceptor(channel.clone(), interceptor),
            storage: StorageClient::with_interceptor(channel.clone(), interceptor),
            network: NetworkClient::with_interceptor(channel, interceptor),
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
    }

    #[tonic::async_trait]
    impl Health for FakeHealth {
        async fn check(
            &self,
            request: tonic::Request<api::CheckRequest>,
        ) -> Result<tonic::Response<api::CheckResponse>, tonic::Status> {
            microvm_proto::check_client_api_version(request.metadata())?;
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
                .add_service(HealthServer::new(FakeHealth { major }))
                .serve_with_incoming(incoming)
                .await;
        })
    }

    #[tokio::test]
    async fn check_over_hybrid_vsock() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let server = serve_fake(&socket, microvm_proto::API_VERSION_MAJOR);
        let client = AgentClient::connect(&socket, microvm_proto::AGENT_VSOCK_PORT)
            .await
            .unwrap();
        let response = client.check().await.unwrap();
        assert_eq!(response.agent_build_version, "test");
        assert_eq!(response.guest_uptime_seconds, 1.5);
        // A second call reuses the connection.
        client.check().await.unwrap();
        server.abort();
    }

    #[tokio::test]
    async fn incompatible_agent_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let socket = tmp.path().join("vs.sock");
        let server = serve_fake(&socket, microvm_proto::API_VERSION_MAJOR + 1);
        let client = AgentClient::connect(&socket, microvm_proto::AGENT_VSOCK_PORT)
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
