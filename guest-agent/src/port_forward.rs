//! The guest end of CRI port forwarding: a raw vsock listener on
//! [`PORT_FORWARD_VSOCK_PORT`]. Each connection from the host carries one
//! forwarded TCP connection: an 8-byte request names the port, the agent
//! connects to it on the VM's loopback (the pod's network namespace is the
//! VM's), answers with a reply and then copies bytes both ways
//! ([`bridge`]). Wire format: `microvm_abi::port_forward`.
//!
//! Only the host (CID 2) is served, as for the API ([`crate::peer`]).
//! Everything a peer can influence is bounded: connections in flight
//! ([`MAX_CONNECTIONS`]), the time to send a request and to connect
//! ([`HEADER_TIMEOUT`]), buffers ([`COPY_BUFFER`] per direction) and how
//! long a half-closed connection may linger ([`LINGER_TIMEOUT`]).

use microvm_proto::abi::port_forward::{
    HeaderError, Reply, Request, HEADER_TIMEOUT, LINGER_TIMEOUT, REQUEST_LEN,
};
use microvm_proto::abi::vsock::PORT_FORWARD_PORT as PORT_FORWARD_VSOCK_PORT;
use microvm_proto::port_forward::bridge;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Forwarded connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes buffered per direction of one connection.
pub const COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("cannot listen on vsock port {port} for port forwarding")]
    Bind {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("no port-forward request within {HEADER_TIMEOUT:?}")]
    RequestTimeout,
    #[error("reading the port-forward request failed")]
    ReadRequest(#[source] io::Error),
    #[error("bad port-forward request: {0}")]
    BadRequest(HeaderError),
    #[error("writing the port-forward reply failed")]
    WriteReply(#[source] io::Error),
}

/// Connects to `port` on the VM's loopback: 127.0.0.1, then ::1 (a server
/// may listen on either), each attempt bounded by [`HEADER_TIMEOUT`].
pub async fn connect_loopback(port: u16) -> io::Result<TcpStream> {
    let mut last = io::Error::from(io::ErrorKind::ConnectionRefused);
    for address in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ] {
        match tokio::time::timeout(HEADER_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => last = err,
            Err(_) => last = io::Error::from(io::ErrorKind::TimedOut),
        }
    }
    Err(last)
}

fn errno_of(err: &io::Error) -> u16 {
    err.raw_os_error()
        .and_then(|errno| u16::try_from(errno).ok())
        .unwrap_or(libc::EIO as u16)
}

/// Serves one host connection: request, connect, reply, bridge. Returns
/// the port and what was carried, or why nothing was.
pub async fn serve_connection<S>(mut stream: S) -> Result<(u16, u64, u64), PortForwardError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut header = [0u8; REQUEST_LEN];
    match tokio::time::timeout(HEADER_TIMEOUT, stream.read_exact(&mut header)).await {
        Err(_) => return Err(PortForwardError::RequestTimeout),
        Ok(Err(err)) => return Err(PortForwardError::ReadRequest(err)),
        Ok(Ok(_)) => {}
    }
    let request = Request::decode(&header).map_err(PortForwardError::BadRequest)?;
    let target = connect_loopback(request.port).await;
    let reply = match &target {
        Ok(_) => Reply::Connected,
        Err(err) => Reply::Failed {
            errno: errno_of(err),
        },
    };
    tokio::time::timeout(HEADER_TIMEOUT, stream.write_all(&reply.encode()))
        .await
        .map_err(|_| PortForwardError::WriteReply(io::ErrorKind::TimedOut.into()))?
        .map_err(PortForwardError::WriteReply)?;
    let Ok(target) = target else {
        return Ok((request.port, 0, 0));
    };
    // Small writes (an interactive protocol) go out at once.
    let _ = target.set_nodelay(true);
    let carried = bridge(stream, target, COPY_BUFFER, LINGER_TIMEOUT).await;
    Ok((request.port, carried.a_to_b, carried.b_to_a))
}

/// Accepts host connections on vsock [`PORT_FORWARD_VSOCK_PORT`] until the
/// listener fails; each is served on a task of its own.
pub async fn serve_vsock() -> Result<(), PortForwardError> {
    let port = PORT_FORWARD_VSOCK_PORT;
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        port,
    ))
    .map_err(|source| PortForwardError::Bind { port, source })?;
    tracing::info!("port forwarding on vsock:{port}");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let refused = crate::peer::RefusedPeers::default();
    let busy = crate::peer::RefusedPeers::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("port forwarding: accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        if !crate::peer::is_host_peer(peer.cid()) {
            drop(stream);
            refused.record(peer, std::time::Instant::now());
            continue;
        }
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            drop(stream);
            busy.record(peer, std::time::Instant::now());
            continue;
        };
        tokio::spawn(async move {
            match serve_connection(stream).await {
                Ok((port, sent, received)) => {
                    tracing::debug!(port, sent, received, "forwarded connection closed")
                }
                Err(err) => tracing::debug!("port forwarding: {err}"),
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use microvm_proto::abi::port_forward::REPLY_LEN;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn reply_of(stream: &mut tokio::io::DuplexStream) -> Reply {
        let mut bytes = [0u8; REPLY_LEN];
        stream.read_exact(&mut bytes).await.unwrap();
        Reply::decode(&bytes).unwrap()
    }

    /// A real TCP echo server on loopback: bytes go both ways, a close
    /// from the host side closes the server's connection, and the bridge
    /// ends.
    #[test]
    fn a_request_reaches_a_loopback_port_and_bytes_flow_both_ways() {
        runtime().block_on(async {
            let server = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .unwrap();
            let port = server.local_addr().unwrap().port();
            let echo = tokio::spawn(async move {
                let (mut conn, _) = server.accept().await.unwrap();
                let mut received = Vec::new();
                let mut buffer = [0u8; 1024];
                loop {
                    let n = conn.read(&mut buffer).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    received.extend_from_slice(&buffer[..n]);
                    conn.write_all(&buffer[..n]).await.unwrap();
                }
                received
            });
            let (mut host, guest) = tokio::io::duplex(4096);
            let served = tokio::spawn(serve_connection(guest));
            host.write_all(&Request { port }.encode()).await.unwrap();
            assert_eq!(reply_of(&mut host).await, Reply::Connected);
            host.write_all(b"hello").await.unwrap();
            let mut answer = [0u8; 5];
            host.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"hello");
            drop(host);
            assert_eq!(echo.await.unwrap(), b"hello");
            let (served_port, sent, received) = served.await.unwrap().unwrap();
            assert_eq!((served_port, sent, received), (port, 5, 5));
        });
    }

    #[test]
    fn a_closed_port_is_reported_with_its_errno() {
        runtime().block_on(async {
            // A port nothing listens on: bind one, learn it, close it.
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let (mut host, guest) = tokio::io::duplex(4096);
            let served = tokio::spawn(serve_connection(guest));
            host.write_all(&Request { port }.encode()).await.unwrap();
            assert_eq!(
                reply_of(&mut host).await,
                Reply::Failed {
                    errno: libc::ECONNREFUSED as u16
                }
            );
            // The agent closes its end after a failed reply.
            let mut rest = Vec::new();
            host.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            assert_eq!(served.await.unwrap().unwrap(), (port, 0, 0));
        });
    }

    #[test]
    fn bad_and_missing_requests_are_refused() {
        runtime().block_on(async {
            let (mut host, guest) = tokio::io::duplex(4096);
            let served = tokio::spawn(serve_connection(guest));
            host.write_all(b"GET / HTTP/1.0\r\n").await.unwrap();
            let err = served.await.unwrap().unwrap_err();
            assert!(
                matches!(err, PortForwardError::BadRequest(HeaderError::BadMagic)),
                "{err}"
            );

            // A peer that closes before a whole request.
            let (mut host, guest) = tokio::io::duplex(4096);
            let served = tokio::spawn(serve_connection(guest));
            host.write_all(b"MVPF").await.unwrap();
            drop(host);
            let err = served.await.unwrap().unwrap_err();
            assert!(matches!(err, PortForwardError::ReadRequest(_)), "{err}");
        });
    }

    /// A peer that sends nothing is dropped after the header timeout
    /// (paused time: the test does not wait 10 s).
    #[test]
    fn a_silent_peer_times_out() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let (_host, guest) = tokio::io::duplex(4096);
            let err = serve_connection(guest).await.unwrap_err();
            assert!(matches!(err, PortForwardError::RequestTimeout), "{err}");
        });
    }
}
