//! Who may use the API over vsock: the host (CID 2) only.
//!
//! A guest process can reach the agent's vsock port without the host: with
//! the loopback transport (CID 1), or through a device that routes the
//! guest's packets for its own CID back into the guest (vhost-device-vsock
//! does, for sibling VMs). Such a connection arrives with the peer's CID, so
//! every accepted connection whose peer is not the host is closed before
//! tonic sees a byte of it.
//!
//! Also here: `microvm-agent --probe-vsock <cid> <port>`, the guest-side
//! client the in-guest test runs inside a container to prove the refusal.

use futures_util::{Stream, StreamExt};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_vsock::VsockAddr;

/// The only peer the API serves (`VMADDR_CID_HOST`).
pub const HOST_CID: u32 = vsock::VMADDR_CID_HOST;

/// At most one refusal warning per this interval; the rest are counted.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a connection from `peer_cid` may be served.
pub fn is_host_peer(peer_cid: u32) -> bool {
    peer_cid == HOST_CID
}

/// Refused connections on one listener: a counter and a rate-limited
/// warning (a guest process can connect in a loop; the console costs an
/// exit per byte). Hand-written: one timestamp is all it takes.
#[derive(Debug, Default)]
pub struct RefusedPeers {
    refused: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl RefusedPeers {
    /// Connections refused so far.
    pub fn count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Counts a refusal of `peer`; returns whether it was logged.
    pub fn record(&self, peer: VsockAddr, now: Instant) -> bool {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = crate::lock::lock(&self.last_warning);
        let due = last.is_none_or(|at| now.duration_since(at) >= WARN_INTERVAL);
        if due {
            *last = Some(now);
            tracing::warn!(
                "refused a vsock connection from CID {} port {}: only the host (CID {HOST_CID}) \
                 may use the agent API ({total} refused so far)",
                peer.cid(),
                peer.port()
            );
        }
        due
    }
}

/// The accepted connections of `incoming` whose peer is the host; any
/// other is dropped (closed) at once and counted in `refused`. Accept
/// errors pass through, as tonic logs and skips them.
pub fn host_only<C, S>(
    incoming: S,
    refused: std::sync::Arc<RefusedPeers>,
) -> impl Stream<Item = io::Result<C>>
where
    S: Stream<Item = io::Result<(C, VsockAddr)>>,
{
    incoming.filter_map(move |accepted| {
        let item = match accepted {
            Ok((connection, peer)) if is_host_peer(peer.cid()) => Some(Ok(connection)),
            Ok((connection, peer)) => {
                drop(connection);
                refused.record(peer, Instant::now());
                None
            }
            Err(err) => Some(Err(err)),
        };
        std::future::ready(item)
    })
}

/// What a guest-side client saw when it tried the agent's port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// connect() failed.
    Refused(String),
    /// Connected, then the connection closed before any byte came back.
    Closed,
    /// The server answered: an HTTP/2 server sends its SETTINGS first.
    Served,
}

impl std::fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(err) => write!(f, "refused: {err}"),
            Self::Closed => f.write_str("closed"),
            Self::Served => f.write_str("served"),
        }
    }
}

/// HTTP/2 client preface plus an empty SETTINGS frame: what any gRPC
/// client sends first, so a serving agent answers it.
const HTTP2_PREFACE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Connects to `cid:port` as a gRPC client would and reports whether the
/// server answered. Blocking; connect() gives up after the kernel's vsock
/// connect timeout (2 s), the read after `read_timeout`.
pub fn probe(cid: u32, port: u32, read_timeout: Duration) -> ProbeOutcome {
    use std::io::{Read, Write};
    let mut stream = match vsock::VsockStream::connect_with_cid_port(cid, port) {
        Ok(stream) => stream,
        Err(err) => return ProbeOutcome::Refused(err.to_string()),
    };
    if stream.set_read_timeout(Some(read_timeout)).is_err() {
        return ProbeOutcome::Closed;
    }
    // A write into a connection the server already closed may fail: that
    // is the same answer as reading EOF.
    let _ = stream.write_all(HTTP2_PREFACE);
    let mut answer = [0u8; 9];
    match stream.read(&mut answer) {
        Ok(0) | Err(_) => ProbeOutcome::Closed,
        Ok(_) => ProbeOutcome::Served,
    }
}

/// `--probe-vsock <cid> <port>` as the first arguments: runs [`probe`],
/// prints its outcome on stdout and returns the exit code (0; 2 for bad
/// arguments). `None` for any other command line.
pub fn probe_command(args: &[String]) -> Option<std::process::ExitCode> {
    let [flag, cid, port] = args else {
        return None;
    };
    if flag != "--probe-vsock" {
        return None;
    }
    let (Ok(cid), Ok(port)) = (cid.parse::<u32>(), port.parse::<u32>()) else {
        eprintln!("usage: microvm-agent --probe-vsock <cid> <port>");
        return Some(std::process::ExitCode::from(2));
    };
    println!("{}", probe(cid, port, Duration::from_secs(10)));
    Some(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    #[test]
    fn only_the_host_cid_is_served() {
        assert!(is_host_peer(2));
        for cid in [0, 1, 3, 4, 42, u32::MAX - 1, vsock::VMADDR_CID_ANY] {
            assert!(!is_host_peer(cid), "CID {cid} must be refused");
        }
    }

    #[test]
    fn refusals_are_counted_and_warned_at_most_once_per_interval() {
        let refused = RefusedPeers::default();
        let start = Instant::now();
        let peer = VsockAddr::new(3, 5000);
        assert!(refused.record(peer, start));
        assert!(!refused.record(peer, start + Duration::from_secs(1)));
        assert!(!refused.record(peer, start + WARN_INTERVAL - Duration::from_millis(1)));
        assert!(refused.record(peer, start + WARN_INTERVAL));
        assert_eq!(refused.count(), 4);
    }

    /// The filter over real sockets: refused connections are closed (their
    /// client end reads EOF), the host's come through in order, accept
    /// errors pass through.
    #[test]
    fn host_only_closes_other_peers_and_passes_the_host() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for cid in [1, 2, 3, 2, 7] {
            let (server, client) = UnixStream::pair().unwrap();
            clients.push((cid, client));
            accepted.push(Ok((server, VsockAddr::new(cid, 4000 + cid))));
        }
        accepted.push(Err(io::Error::from_raw_os_error(libc::EMFILE)));
        let refused = Arc::new(RefusedPeers::default());
        let served: Vec<io::Result<UnixStream>> = runtime.block_on(
            host_only(futures_util::stream::iter(accepted), Arc::clone(&refused)).collect(),
        );

        assert_eq!(served.len(), 3, "two host connections and the error");
        assert!(served[0].is_ok() && served[1].is_ok());
        assert_eq!(
            served[2].as_ref().err().and_then(io::Error::raw_os_error),
            Some(libc::EMFILE)
        );
        assert_eq!(refused.count(), 3);
        for (cid, mut client) in clients {
            client.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            match client.read(&mut byte) {
                Ok(0) => assert!(!is_host_peer(cid), "host connection {cid} was closed"),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    assert!(is_host_peer(cid), "CID {cid} connection is still open")
                }
                other => panic!("CID {cid}: unexpected read {other:?}"),
            }
        }
    }

    #[test]
    fn probe_command_takes_only_its_own_command_line() {
        let args = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(probe_command(&args(&["--listen", "unix:/x", "y"])).is_none());
        assert!(probe_command(&args(&["--probe-vsock", "3"])).is_none());
        assert!(probe_command(&args(&[])).is_none());
        assert_eq!(
            probe_command(&args(&["--probe-vsock", "x", "1024"])),
            Some(std::process::ExitCode::from(2))
        );
    }

    #[test]
    fn probe_outcomes_print_as_the_test_reads_them() {
        assert_eq!(ProbeOutcome::Served.to_string(), "served");
        assert_eq!(ProbeOutcome::Closed.to_string(), "closed");
        assert!(ProbeOutcome::Refused("timed out".into())
            .to_string()
            .starts_with("refused: "));
    }
}
