//! All connections of one device: routes guest packets to them, accepts host
//! connections, queues what the guest must receive, and keeps the set of fds
//! the event loop watches in step with what each connection wants.
//!
//! The muxer does not touch epoll itself: `sync_interest` reports changes to
//! an `FdRegistry`. A stream leaving the muxer is parked until that call has
//! unregistered it, because closing an fd that is still registered would let
//! a new fd with the same number collide with the stale registration.

use super::connection::{CloseReason, ConnKey, Connection, Interest};
use super::host_socket::{connect_nonblocking, port_path, Handshake, HandshakeStep, HostListener};
use super::packet::{TxPacket, VsockHeader, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::{VsockError, VsockLimits, VsockMetrics, WarnLimiter, HOST_CID};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Host ports handed out for host-initiated connections start here, away from
/// the well-known ports a guest is likely to connect to.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Accepts per listener event, so one burst cannot starve the guest.
const ACCEPTS_PER_EVENT: usize = 32;

/// Where the muxer's fd interest goes (epoll in the device, a fake in tests).
pub trait FdRegistry {
    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()>;
    fn unregister(&mut self, fd: RawFd) -> io::Result<()>;
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    limits: VsockLimits,
    listener: HostListener,
    listening: bool,
    conns: HashMap<ConnKey, Connection<UnixStream>>,
    fd_to_key: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake<UnixStream>>,
    /// Connections that may have packets for the guest, served round-robin.
    /// May hold keys of removed connections; those are skipped.
    rxq: VecDeque<ConnKey>,
    in_rxq: HashSet<ConnKey>,
    /// RSTs for connections that are gone (or never existed).
    rst_queue: VecDeque<ConnKey>,
    /// Streams removed but maybe still registered; see the module docs.
    graveyard: Vec<UnixStream>,
    registered: HashMap<RawFd, Interest>,
    next_local_port: u32,
    metrics: Arc<VsockMetrics>,
    warn: WarnLimiter,
}

impl Muxer {
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        limits: VsockLimits,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            limits,
            listener: HostListener::bind(uds_path)?,
            listening: false,
            conns: HashMap::new(),
            fd_to_key: HashMap::new(),
            handshakes: HashMap::new(),
            rxq: VecDeque::new(),
            in_rxq: HashSet::new(),
            rst_queue: VecDeque::new(),
            graveyard: Vec::new(),
            registered: HashMap::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics,
            warn: WarnLimiter::default(),
        })
    }

    /// Starts accepting host connections (at activation: before it there is
    /// no guest to relay to, and connects wait in the listen backlog).
    pub fn start_listening(&mut self) {
        self.listening = true;
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    #[cfg(test)]
    pub fn connection(&self, key: ConnKey) -> Option<&Connection<UnixStream>> {
        self.conns.get(&key)
    }

    #[cfg(test)]
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Applies a validated packet from the guest.
    pub fn on_guest_packet(&mut self, pkt: &TxPacket) {
        let hdr = &pkt.hdr;
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(hdr, &pkt.data);
            self.after_touch(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(key, hdr),
            OP_RST => {}
            // Anything else for an unknown connection gets RST.
            _ => self.push_rst(key),
        }
    }

    fn guest_connect(&mut self, key: ConnKey, request: &VsockHeader) {
        if self.conns.len() >= self.limits.max_connections {
            self.metrics.conn_limit_rejects.inc();
            self.warn.warn(format_args!(
                "guest connect to port {} refused: {} connections open",
                key.local_port,
                self.conns.len()
            ));
            self.push_rst(key);
            return;
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let conn = Connection::new_guest_initiated(
                    stream,
                    key,
                    self.guest_cid,
                    self.limits.conn_tx_buf_size,
                    request,
                );
                self.insert_conn(conn);
            }
            Err(e) => {
                // Usually just nothing listening on that port.
                self.metrics.guest_connect_fails.inc();
                tracing::debug!(path = %path.display(), error = %e, "vsock: guest connect failed");
                self.push_rst(key);
            }
        }
    }

    fn insert_conn(&mut self, conn: Connection<UnixStream>) {
        let key = conn.key();
        self.fd_to_key.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.metrics.conns_added.inc();
        self.after_touch(key);
    }

    /// Removes a closed connection, or queues it for rx if it has packets.
    fn after_touch(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.close_reason().is_some() {
            self.remove_conn(key);
        } else if conn.has_pending_rx() && self.in_rxq.insert(key) {
            self.rxq.push_back(key);
        }
    }

    fn remove_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        self.fd_to_key.remove(&conn.stream().as_raw_fd());
        self.in_rxq.remove(&key);
        if conn.needs_rst() {
            self.push_rst(key);
        }
        match conn.close_reason() {
            Some(CloseReason::ProtocolError) => {
                self.metrics.conn_protocol_errors.inc();
                self.warn.warn(format_args!(
                    "guest broke the protocol on port {}, resetting",
                    key.local_port
                ));
            }
            Some(CloseReason::BufferOverflow) => {
                self.metrics.conn_buffer_overflows.inc();
                self.warn.warn(format_args!(
                    "guest overran its credit on port {}, resetting",
                    key.local_port
                ));
            }
            Some(CloseReason::HostError) => self.metrics.conn_host_errors.inc(),
            Some(CloseReason::PeerReset | CloseReason::Finished) | None => {}
        }
        self.metrics.conns_removed.inc();
        self.graveyard.push(conn.into_stream());
    }

    fn push_rst(&mut self, key: ConnKey) {
        // Bounded: a guest that posts no rx buffers loses RSTs, not memory.
        if self.rst_queue.len() >= self.limits.max_connections {
            self.metrics.rst_queue_overflows.inc();
            return;
        }
        self.rst_queue.push_back(key);
    }

    fn rst_header(&self, key: ConnKey) -> VsockHeader {
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Default::default()
        }
    }

    /// A host fd the muxer owns became ready. Returns false for unknown fds.
    pub fn handle_fd_event(&mut self, fd: RawFd, readable: bool, writable: bool) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept_host_connections();
        } else if self.handshakes.contains_key(&fd) {
            self.advance_handshake(fd);
        } else if let Some(&key) = self.fd_to_key.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_host_event(readable, writable);
            }
            self.after_touch(key);
        } else {
            return false;
        }
        true
    }

    fn accept_host_connections(&mut self) {
        for _ in 0..ACCEPTS_PER_EVENT {
            match self.listener.accept() {
                Ok(stream) => {
                    if self.handshakes.len() >= self.limits.max_handshakes {
                        // Never registered, so it can be closed at once.
                        self.metrics.handshake_limit_rejects.inc();
                        continue;
                    }
                    self.handshakes
                        .insert(stream.as_raw_fd(), Handshake::new(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.metrics.event_fails.inc();
                    tracing::error!(error = %e, path = %self.listener.path().display(), "vsock: accept failed");
                    return;
                }
            }
        }
    }

    fn advance_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let step = handshake.advance();
        let port = match step {
            HandshakeStep::Pending => return,
            HandshakeStep::Done(port) => port,
            HandshakeStep::Failed(e) => {
                self.metrics.host_handshake_fails.inc();
                tracing::debug!(error = %e, "vsock: host handshake failed");
                if let Some(hs) = self.handshakes.remove(&fd) {
                    self.graveyard.push(hs.into_stream());
                }
                return;
            }
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let stream = hs.into_stream();
        if self.conns.len() >= self.limits.max_connections {
            self.metrics.conn_limit_rejects.inc();
            tracing::debug!(
                port,
                "vsock: host connect refused, connection limit reached"
            );
            self.graveyard.push(stream);
            return;
        }
        let key = ConnKey {
            local_port: self.alloc_local_port(port),
            peer_port: port,
        };
        let conn = Connection::new_host_initiated(
            stream,
            key,
            self.guest_cid,
            self.limits.conn_tx_buf_size,
        );
        self.insert_conn(conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        // Ends: there are far fewer connections than ports in the range.
        loop {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    pub fn has_pending_rx(&self) -> bool {
        !self.rst_queue.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest, with at most `data_cap` payload bytes
    /// left in `data`. Visits each queued connection at most once.
    pub fn next_rx_packet(&mut self, data_cap: usize, data: &mut Vec<u8>) -> Option<VsockHeader> {
        data.clear();
        if let Some(key) = self.rst_queue.pop_front() {
            return Some(self.rst_header(key));
        }
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            self.in_rxq.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let hdr = conn.next_rx(data_cap, data);
            self.after_touch(key);
            if hdr.is_some() {
                return hdr;
            }
            // The connection may have just closed and owe an RST.
            if let Some(key) = self.rst_queue.pop_front() {
                return Some(self.rst_header(key));
            }
        }
        None
    }

    /// Brings the registry in line with what every fd wants.
    pub fn sync_interest(&mut self, reg: &mut dyn FdRegistry) {
        self.bury(reg);

        let listener_interest = Interest {
            read: self.listening,
            write: false,
        };
        if apply_interest(
            &mut self.registered,
            reg,
            self.listener.as_raw_fd(),
            listener_interest,
        )
        .is_err()
        {
            self.metrics.event_fails.inc();
        }

        let mut failed_handshakes = Vec::new();
        for &fd in self.handshakes.keys() {
            let want = Interest {
                read: true,
                write: false,
            };
            if apply_interest(&mut self.registered, reg, fd, want).is_err() {
                failed_handshakes.push(fd);
            }
        }
        let mut failed_conns = Vec::new();
        for (key, conn) in &self.conns {
            let fd = conn.stream().as_raw_fd();
            if apply_interest(&mut self.registered, reg, fd, conn.interest()).is_err() {
                failed_conns.push(*key);
            }
        }

        for fd in failed_handshakes {
            self.metrics.event_fails.inc();
            if let Some(hs) = self.handshakes.remove(&fd) {
                self.graveyard.push(hs.into_stream());
            }
        }
        for key in failed_conns {
            self.metrics.event_fails.inc();
            // Without epoll the connection would stall: reset it instead.
            self.remove_conn_with_rst(key);
        }
        self.bury(reg);
    }

    fn remove_conn_with_rst(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            self.fd_to_key.remove(&conn.stream().as_raw_fd());
            self.in_rxq.remove(&key);
            self.push_rst(key);
            self.metrics.conns_removed.inc();
            self.graveyard.push(conn.into_stream());
        }
    }

    /// Unregisters and closes removed streams.
    fn bury(&mut self, reg: &mut dyn FdRegistry) {
        for stream in self.graveyard.drain(..) {
            let fd = stream.as_raw_fd();
            if self.registered.remove(&fd).is_some() {
                if let Err(e) = reg.unregister(fd) {
                    self.metrics.event_fails.inc();
                    tracing::error!(fd, error = %e, "vsock: failed to unregister stream");
                }
            }
        }
    }
}

fn apply_interest(
    registered: &mut HashMap<RawFd, Interest>,
    reg: &mut dyn FdRegistry,
    fd: RawFd,
    want: Interest,
) -> io::Result<()> {
    let result = match registered.get(&fd).copied() {
        None if want.is_empty() => return Ok(()),
        None => reg.register(fd, want),
        // Nothing wanted: leave epoll entirely, as it reports hang-ups even
        // for an empty interest set and would spin on a stalled stream.
        Some(_) if want.is_empty() => {
            registered.remove(&fd);
            return reg.unregister(fd);
        }
        Some(cur) if cur == want => return Ok(()),
        Some(_) => reg.modify(fd, want),
    };
    match result {
        Ok(()) => {
            registered.insert(fd, want);
            Ok(())
        }
        Err(e) => {
            tracing::error!(fd, error = %e, "vsock: epoll registration failed");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::{OP_CREDIT_UPDATE, OP_RESPONSE, OP_RW};
    use crate::virtio::vsock::test_utils::{FakeRegistry, TempDir};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    const CID: u64 = 3;

    fn muxer(dir: &TempDir, limits: VsockLimits) -> Muxer {
        Muxer::new(
            CID,
            &dir.path().join("v.sock"),
            limits,
            Arc::new(VsockMetrics::default()),
        )
        .unwrap()
    }

    fn guest_pkt(op: u16, src_port: u32, dst_port: u32, data: &[u8]) -> TxPacket {
        TxPacket {
            hdr: VsockHeader {
                src_cid: CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len: data.len() as u32,
                type_: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 64 * 1024,
                fwd_cnt: 0,
            },
            data: data.to_vec(),
        }
    }

    fn next(m: &mut Muxer) -> Option<(VsockHeader, Vec<u8>)> {
        let mut data = Vec::new();
        m.next_rx_packet(4096, &mut data).map(|h| (h, data))
    }

    #[test]
    fn guest_connect_without_listener_gets_rst() {
        let dir = TempDir::new();
        let mut m = muxer(&dir, VsockLimits::default());
        m.on_guest_packet(&guest_pkt(OP_REQUEST, 5000, 52, &[]));
        let (h, _) = next(&mut m).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (OP_RST, 52, 5000, CID)
        );
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.metrics.guest_connect_fails.get(), 1);
    }

    #[test]
    fn guest_connect_with_listener_gets_response_and_data_flows() {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let mut m = muxer(&dir, VsockLimits::default());
        let mut reg = FakeRegistry::default();
        m.on_guest_packet(&guest_pkt(OP_REQUEST, 5000, 52, &[]));
        let (h, _) = next(&mut m).unwrap();
        assert_eq!(h.op, OP_RESPONSE);
        m.sync_interest(&mut reg);
        let (mut host, _) = listener.accept().unwrap();

        m.on_guest_packet(&guest_pkt(OP_RW, 5000, 52, b"ping"));
        let mut buf = [0u8; 4];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        host.write_all(b"pong").unwrap();
        let key = ConnKey {
            local_port: 52,
            peer_port: 5000,
        };
        let fd = m.connection(key).unwrap().stream().as_raw_fd();
        assert!(reg.interest(fd).unwrap().read);
        assert!(m.handle_fd_event(fd, true, false));
        let (h, data) = next(&mut m).unwrap();
        assert_eq!((h.op, data.as_slice()), (OP_RW, &b"pong"[..]));
    }

    #[test]
    fn connection_limit_resets_the_excess() {
        let dir = TempDir::new();
        let _listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let limits = VsockLimits {
            max_connections: 2,
            ..Default::default()
        };
        let mut m = muxer(&dir, limits);
        for port in 0..3 {
            m.on_guest_packet(&guest_pkt(OP_REQUEST, 6000 + port, 52, &[]));
        }
        assert_eq!(m.connection_count(), 2);
        assert_eq!(m.metrics.conn_limit_rejects.get(), 1);
        let mut ops = Vec::new();
        while let Some((h, _)) = next(&mut m) {
            ops.push((h.op, h.dst_port));
        }
        assert!(ops.contains(&(OP_RST, 6002)), "{ops:?}");
        assert_eq!(ops.iter().filter(|(op, _)| *op == OP_RESPONSE).count(), 2);
    }

    #[test]
    fn packets_for_unknown_connections_get_rst_but_rst_does_not() {
        let dir = TempDir::new();
        let mut m = muxer(&dir, VsockLimits::default());
        m.on_guest_packet(&guest_pkt(OP_RST, 1, 2, &[]));
        assert!(!m.has_pending_rx());
        m.on_guest_packet(&guest_pkt(OP_RW, 1, 2, b"x"));
        assert_eq!(next(&mut m).unwrap().0.op, OP_RST);
        m.on_guest_packet(&guest_pkt(OP_CREDIT_UPDATE, 1, 2, &[]));
        assert_eq!(next(&mut m).unwrap().0.op, OP_RST);
    }

    #[test]
    fn rst_queue_is_bounded() {
        let dir = TempDir::new();
        let limits = VsockLimits {
            max_connections: 4,
            ..Default::default()
        };
        let mut m = muxer(&dir, limits);
        for port in 0..10 {
            m.on_guest_packet(&guest_pkt(OP_RW, port, 2, b"x"));
        }
        assert_eq!(m.rst_queue.len(), 4);
        assert_eq!(m.metrics.rst_queue_overflows.get(), 6);
    }

    #[test]
    fn guest_rst_removes_and_unregisters_the_connection() {
        let dir = TempDir::new();
        let listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let mut m = muxer(&dir, VsockLimits::default());
        let mut reg = FakeRegistry::default();
        m.on_guest_packet(&guest_pkt(OP_REQUEST, 5000, 52, &[]));
        next(&mut m).unwrap();
        m.sync_interest(&mut reg);
        let (mut host, _) = listener.accept().unwrap();
        let key = ConnKey {
            local_port: 52,
            peer_port: 5000,
        };
        let fd = m.connection(key).unwrap().stream().as_raw_fd();
        assert!(reg.interest(fd).is_some());

        m.on_guest_packet(&guest_pkt(OP_RST, 5000, 52, &[]));
        assert_eq!(m.connection_count(), 0);
        assert!(next(&mut m).is_none(), "no RST back for an RST");
        m.sync_interest(&mut reg);
        assert!(reg.interest(fd).is_none());
        assert_eq!(reg.unregistered, vec![fd]);
        // The host sees the stream closed.
        let mut buf = [0u8; 1];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn host_handshake_creates_a_request() {
        let dir = TempDir::new();
        let mut m = muxer(&dir, VsockLimits::default());
        let mut reg = FakeRegistry::default();
        m.start_listening();
        m.sync_interest(&mut reg);
        assert!(reg.interest(m.listener_fd()).unwrap().read);

        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        m.handle_fd_event(m.listener_fd(), true, false);
        assert_eq!(m.handshake_count(), 1);
        m.sync_interest(&mut reg);
        let fd = *m.handshakes.keys().next().unwrap();
        assert!(reg.interest(fd).unwrap().read);

        host.write_all(b"CONNECT 1024\n").unwrap();
        m.handle_fd_event(fd, true, false);
        assert_eq!((m.handshake_count(), m.connection_count()), (0, 1));
        let (h, _) = next(&mut m).unwrap();
        assert_eq!(
            (h.op, h.dst_port, h.src_port),
            (OP_REQUEST, 1024, FIRST_LOCAL_PORT)
        );
        // No host I/O until the guest answers.
        m.sync_interest(&mut reg);
        assert!(reg.interest(fd).is_none());
    }

    #[test]
    fn bad_handshake_is_closed_and_counted() {
        let dir = TempDir::new();
        let mut m = muxer(&dir, VsockLimits::default());
        let mut reg = FakeRegistry::default();
        m.start_listening();
        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        m.handle_fd_event(m.listener_fd(), true, false);
        m.sync_interest(&mut reg);
        let fd = *m.handshakes.keys().next().unwrap();
        host.write_all(b"HELLO\n").unwrap();
        m.handle_fd_event(fd, true, false);
        assert_eq!(m.handshake_count(), 0);
        assert_eq!(m.metrics.host_handshake_fails.get(), 1);
        m.sync_interest(&mut reg);
        assert_eq!(reg.unregistered, vec![fd]);
        let mut buf = [0u8; 1];
        assert_eq!(host.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn handshake_limit_closes_the_excess() {
        let dir = TempDir::new();
        let limits = VsockLimits {
            max_handshakes: 2,
            ..Default::default()
        };
        let mut m = muxer(&dir, limits);
        m.start_listening();
        let hosts: Vec<_> = (0..3)
            .map(|_| UnixStream::connect(dir.path().join("v.sock")).unwrap())
            .collect();
        m.handle_fd_event(m.listener_fd(), true, false);
        assert_eq!(m.handshake_count(), 2);
        assert_eq!(m.metrics.handshake_limit_rejects.get(), 1);
        drop(hosts);
    }

    #[test]
    fn local_ports_are_unique_per_peer_port() {
        let dir = TempDir::new();
        let mut m = muxer(&dir, VsockLimits::default());
        let a = m.alloc_local_port(1024);
        let b = m.alloc_local_port(1024);
        assert_ne!(a, b);
        m.next_local_port = u32::MAX;
        assert_eq!(m.alloc_local_port(1), u32::MAX);
        assert_eq!(m.alloc_local_port(1), FIRST_LOCAL_PORT);
    }

    #[test]
    fn failed_registration_resets_the_connection() {
        let dir = TempDir::new();
        let _listener = UnixListener::bind(dir.path().join("v.sock_52")).unwrap();
        let mut m = muxer(&dir, VsockLimits::default());
        let mut reg = FakeRegistry {
            fail: true,
            ..Default::default()
        };
        m.on_guest_packet(&guest_pkt(OP_REQUEST, 5000, 52, &[]));
        next(&mut m).unwrap();
        // Host data makes the connection want to read; registering fails.
        m.sync_interest(&mut reg);
        assert_eq!(m.connection_count(), 0);
        assert_eq!(next(&mut m).unwrap().0.op, OP_RST);
    }
}
