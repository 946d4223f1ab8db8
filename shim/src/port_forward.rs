//! The host end of CRI port forwarding (issue #15).
//!
//! For `PortForward`, containerd dials `127.0.0.1:<port>` inside the pod's
//! network namespace on the host. The server runs in the VM, so nothing
//! listens there. The shim listens on one loopback port of that namespace
//! and installs a NAT rule (`iptables -t nat OUTPUT -o lo ... REDIRECT`)
//! that sends every other loopback TCP connection made in the namespace to
//! it; `SO_ORIGINAL_DST` tells which port was dialled. Each connection is
//! then carried to the agent over one hybrid-vsock stream (header:
//! [`microvm_proto::abi::port_forward`]) and bridged
//! ([`microvm_proto::port_forward::bridge`]).
//!
//! Only containerd (and the shim's own helpers) run in the pod's network
//! namespace on the host, so redirecting its loopback traffic takes
//! nothing from anyone. The rule dies with the namespace; the listener
//! with [`PortForwarder`].

use crate::agent::connect_hybrid_vsock;
use microvm_proto::abi::port_forward::{Reply, Request, HEADER_TIMEOUT, LINGER_TIMEOUT, REPLY_LEN};
use microvm_proto::abi::vsock::PORT_FORWARD_PORT;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Forwarded connections carried at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;
/// Bytes buffered per direction of one connection.
const COPY_BUFFER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PortForwardError {
    #[error("cannot enter the pod's network namespace {netns}")]
    Netns {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the loopback of {netns}")]
    Listen {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run iptables in {netns}")]
    Iptables {
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("iptables in {netns} failed ({status}): {stderr}")]
    IptablesFailed {
        netns: PathBuf,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the port-forward thread for {0} died")]
    Thread(PathBuf),
}

/// The loopback port the redirect rule sends connections to, until dropped.
#[derive(Debug)]
pub struct PortForwarder {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PortForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The iptables arguments of the redirect rule to `port`.
pub fn redirect_rule(port: u16) -> Vec<String> {
    let port = port.to_string();
    [
        "-w",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "-d",
        "127.0.0.1",
        "!",
        "--dport",
        &port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect()
}

/// On a thread of its own that joined `netns` (the shim's other threads
/// stay where they are): bind the listener, then run iptables, which
/// inherits the thread's namespace.
fn listen_in(netns: &Path) -> Result<std::net::TcpListener, PortForwardError> {
    let file = std::fs::File::open(netns).map_err(|source| PortForwardError::Netns {
        netns: netns.to_owned(),
        source,
    })?;
    let path = netns.to_owned();
    let thread = std::thread::Builder::new()
        .name("netns-portfwd".into())
        .spawn(move || {
            use std::os::fd::AsFd;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                |errno| PortForwardError::Netns {
                    netns: path.clone(),
                    source: errno.into(),
                },
            )?;
            let listener =
                std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| {
                    PortForwardError::Listen {
                        netns: path.clone(),
                        source,
                    }
                })?;
            let port = listener
                .local_addr()
                .map_err(|source| PortForwardError::Listen {
                    netns: path.clone(),
                    source,
                })?
                .port();
            let output = std::process::Command::new("iptables")
                .args(redirect_rule(port))
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|source| PortForwardError::Iptables {
                    netns: path.clone(),
                    source,
                })?;
            if !output.status.success() {
                return Err(PortForwardError::IptablesFailed {
                    netns: path,
                    status: output.status,
                    stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
                });
            }
            listener
                .set_nonblocking(true)
                .map_err(|source| PortForwardError::Listen {
                    netns: path.clone(),
                    source,
                })?;
            Ok(listener)
        })
        .map_err(|_| PortForwardError::Thread(netns.to_owned()))?;
    thread
        .join()
        .map_err(|_| PortForwardError::Thread(netns.to_owned()))?
}

/// The port a redirected connection was made to (`SO_ORIGINAL_DST`).
fn original_port(stream: &tokio::net::TcpStream) -> std::io::Result<u16> {
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the fd is the stream's, open for the call; `address` and
    // `len` are valid for writes of `len` bytes, which the kernel honours.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut address as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u16::from_be(address.sin_port))
}

/// Carries one redirected connection to the agent.
async fn forward(
    stream: tokio::net::TcpStream,
    vsock: &Path,
    own_port: u16,
) -> Result<(u16, u64, u64), String> {
    let port = original_port(&stream).map_err(|err| format!("SO_ORIGINAL_DST: {err}"))?;
    if port == own_port {
        return Err(format!(
            "a direct connection to the forwarder's port {port}"
        ));
    }
    let mut guest = tokio::time::timeout(
        HEADER_TIMEOUT,
        connect_hybrid_vsock(vsock, PORT_FORWARD_PORT),
    )
    .await
    .map_err(|_| "connecting to the agent timed out".to_owned())?
    .map_err(|err| format!("connecting to the agent: {err}"))?;
    guest
        .write_all(&Request { port }.encode())
        .await
        .map_err(|err| format!("sending the request: {err}"))?;
    let mut reply = [0u8; REPLY_LEN];
    tokio::time::timeout(HEADER_TIMEOUT, guest.read_exact(&mut reply))
        .await
        .map_err(|_| format!("port {port}: no reply from the agent"))?
        .map_err(|err| format!("port {port}: reading the reply: {err}"))?;
    match Reply::decode(&reply) {
        Ok(Reply::Connected) => {}
        Ok(Reply::Failed { errno }) => {
            return Err(format!(
                "port {port} in the VM: {}",
                std::io::Error::from_raw_os_error(i32::from(errno))
            ))
        }
        Err(err) => return Err(format!("port {port}: {err}")),
    }
    let _ = stream.set_nodelay(true);
    let carried =
        microvm_proto::port_forward::bridge(stream, guest, COPY_BUFFER, LINGER_TIMEOUT).await;
    Ok((port, carried.a_to_b, carried.b_to_a))
}

impl PortForwarder {
    /// Listens in `netns` and forwards to the agent behind `vsock`.
    pub fn start(pod_id: &str, netns: &Path, vsock: PathBuf) -> Result<Self, PortForwardError> {
        let listener = listen_in(netns)?;
        let port = listener
            .local_addr()
            .map_err(|source| PortForwardError::Listen {
                netns: netns.to_owned(),
                source,
            })?
            .port();
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
            PortForwardError::Listen {
                netns: netns.to_owned(),
                source,
            }
        })?;
        tracing::info!(
            "pod {pod_id}: port forwarding from the loopback of {} (via 127.0.0.1:{port})",
            netns.display()
        );
        let pod_id = pod_id.to_owned();
        let vsock = Arc::new(vsock);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!("pod {pod_id}: port forward accept: {err}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(
                        "pod {pod_id}: {MAX_CONNECTIONS} forwarded connections open, one refused"
                    );
                    continue;
                };
                let vsock = Arc::clone(&vsock);
                let pod_id = pod_id.clone();
                tokio::spawn(async move {
                    match forward(stream, &vsock, port).await {
                        Ok((port, sent, received)) => tracing::debug!(
                            "pod {pod_id}: forwarded connection to port {port} closed ({sent} bytes in, {received} out)"
                        ),
                        Err(err) => tracing::info!("pod {pod_id}: port forward: {err}"),
                    }
                    drop(slot);
                });
            }
        });
        Ok(Self { port, task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn the_rule_redirects_every_other_loopback_port() {
        let rule = redirect_rule(40123).join(" ");
        assert_eq!(
            rule,
            "-w -t nat -A OUTPUT -o lo -p tcp -d 127.0.0.1 ! --dport 40123 -j REDIRECT --to-ports 40123"
        );
    }

    #[test]
    fn a_missing_netns_is_named() {
        let err = listen_in(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }

    /// A direct (not redirected) connection has no original destination
    /// other than its own port: refused.
    #[test]
    fn direct_connections_are_refused() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            let _client =
                tokio::net::TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
                    .await
                    .unwrap();
            let (stream, _) = listener.accept().await.unwrap();
            let err = forward(stream, Path::new("/nonexistent"), port)
                .await
                .unwrap_err();
            // Without conntrack state SO_ORIGINAL_DST fails (ENOENT), or it
            // names the listener's own port.
            assert!(
                err.contains("SO_ORIGINAL_DST") || err.contains("direct connection"),
                "{err}"
            );
        });
    }
}
