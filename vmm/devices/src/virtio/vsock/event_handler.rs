//! Epoll glue: decides what woke the device and runs the queues.
//!
//! Events: the activate EventFd (registered in `init`), the three queue
//! EventFds and the host listener (registered on activation), and host
//! streams (added and removed as the muxer asks). After every event tx is
//! drained into the muxer, rx is refilled from it, fd interest is synced, and
//! the guest is interrupted if any used entry was added.

use super::connection::Interest;
use super::device::Vsock;
use super::muxer::FdRegistry;
use super::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

/// `FdRegistry` over the event manager's ops for this subscriber.
struct OpsRegistry<'a, 'b> {
    ops: &'a mut EventOps<'b>,
}

fn event_set(interest: Interest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

impl FdRegistry for OpsRegistry<'_, '_> {
    fn register(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.ops
            .add(Events::new_raw(fd, event_set(interest)))
            .map_err(io::Error::other)
    }

    fn modify(&mut self, fd: RawFd, interest: Interest) -> io::Result<()> {
        self.ops
            .modify(Events::new_raw(fd, event_set(interest)))
            .map_err(io::Error::other)
    }

    fn unregister(&mut self, fd: RawFd) -> io::Result<()> {
        self.ops
            .remove(Events::empty_raw(fd))
            .map_err(io::Error::other)
    }
}

impl Vsock {
    fn on_activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activate_evt.read() {
            tracing::error!(error = %e, "vsock: failed to read the activate event");
        }
        let Some(ctx) = self.active.as_ref() else {
            return;
        };
        if self.queue_evts_registered {
            return;
        }
        for evt in &ctx.queue_events {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                self.metrics.activate_fails.inc();
                tracing::error!(error = %e, "vsock: failed to register a queue event");
            }
        }
        self.queue_evts_registered = true;
        self.muxer.start_listening();
    }

    fn queue_index(&self, fd: RawFd) -> Option<usize> {
        let ctx = self.active.as_ref()?;
        ctx.queue_events.iter().position(|e| e.as_raw_fd() == fd)
    }

    fn consume_queue_event(&self, index: usize) {
        let Some(ctx) = self.active.as_ref() else {
            return;
        };
        if let Err(e) = ctx.queue_events[index].read() {
            // EAGAIN only: a spurious wake-up.
            tracing::debug!(queue = index, error = %e, "vsock: queue event read failed");
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            self.metrics.event_fails.inc();
            tracing::error!(error = %e, "vsock: failed to register the activate event");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let mut used = false;
        let mut tx_pending = false;

        if fd == self.activate_evt.as_raw_fd() {
            self.on_activate_event(ops);
            // The driver may have queued packets before we listened.
            tx_pending = true;
        } else if let Some(index) = self.queue_index(fd) {
            self.consume_queue_event(index);
            match index {
                TX_QUEUE => tx_pending = true,
                // New rx buffers: handled by the rx pass below.
                RX_QUEUE => {}
                // The driver only recycles event buffers; we never send events.
                EVENT_QUEUE => {}
                _ => {}
            }
        } else {
            let hangup = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
            let readable = set.contains(EventSet::IN) || hangup;
            let writable = set.contains(EventSet::OUT) || hangup;
            if !self.muxer.handle_fd_event(fd, readable, writable) {
                self.metrics.event_fails.inc();
                tracing::error!(fd, "vsock: event for an unknown fd, dropping it");
                let _ = ops.remove(Events::empty_raw(fd));
            }
        }

        if self.active.is_none() {
            return;
        }
        if tx_pending {
            used |= self.process_tx();
        }
        // Tx and host events both make rx work; a failed registration in the
        // sync can owe the guest an RST, hence the second round.
        for _ in 0..2 {
            used |= self.process_rx();
            self.muxer.sync_interest(&mut OpsRegistry { ops });
            if !self.muxer.has_pending_rx() {
                break;
            }
        }
        if used {
            self.signal_used();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::{
        VsockHeader, HDR_SIZE, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
        OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_SEND, TYPE_STREAM,
    };
    use crate::virtio::vsock::test_utils::{TempDir, TestDriver};
    use crate::virtio::vsock::{VsockError, VsockLimits, HOST_CID};
    use crate::virtio::VirtioDevice;
    use event_manager::{EventManager, SubscriberOps};
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const CID: u64 = 3;
    const GUEST_BUF: u32 = 64 * 1024;

    struct Harness {
        dir: TempDir,
        dev: Arc<Mutex<Vsock>>,
        em: EventManager<Arc<Mutex<Vsock>>>,
        driver: TestDriver,
    }

    impl Harness {
        fn new() -> Self {
            Self::with_limits(VsockLimits::default())
        }

        fn with_limits(limits: VsockLimits) -> Self {
            let mut h = Self::bare(limits);
            h.driver.add_rx_buffers(64, 4096);
            h.pump();
            h
        }

        /// An active device whose guest has posted no rx buffers yet.
        fn bare(limits: VsockLimits) -> Self {
            let dir = TempDir::new();
            let dev = Vsock::with_limits(CID, dir.path().join("v.sock"), limits).unwrap();
            let dev = Arc::new(Mutex::new(dev));
            let mut em = EventManager::new().unwrap();
            em.add_subscriber(dev.clone());
            let driver = TestDriver::new();
            dev.lock()
                .unwrap()
                .activate(driver.activate_context())
                .unwrap();
            let mut h = Self {
                dir,
                dev,
                em,
                driver,
            };
            h.pump();
            assert!(h.dev.lock().unwrap().queue_evts_registered);
            h
        }

        fn uds(&self) -> PathBuf {
            self.dir.path().join("v.sock")
        }

        /// Runs the event loop until it goes idle.
        fn pump(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.em.run_with_timeout(20).unwrap() > 0 {
                assert!(Instant::now() < deadline, "event loop never went idle");
            }
        }

        fn guest_send(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
            self.guest_send_hdr(
                VsockHeader {
                    op,
                    src_port,
                    dst_port,
                    ..guest_hdr()
                },
                data,
            );
        }

        fn guest_send_hdr(&mut self, hdr: VsockHeader, data: &[u8]) {
            self.driver.push_tx(
                &VsockHeader {
                    len: data.len() as u32,
                    ..hdr
                },
                data,
            );
            self.pump();
        }

        /// Pumps until the guest has received a packet with `op`; returns
        /// everything received up to and including it.
        fn guest_wait_for(&mut self, op: u16) -> Vec<(VsockHeader, Vec<u8>)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut got = Vec::new();
            loop {
                got.extend(self.driver.recv_rx());
                if got.iter().any(|(h, _)| h.op == op) {
                    return got;
                }
                assert!(Instant::now() < deadline, "op {op} never came: {got:?}");
                self.driver.add_rx_buffers(8, 4096);
                self.pump();
            }
        }

        fn conn_count(&self) -> usize {
            self.dev.lock().unwrap().muxer.connection_count()
        }

        fn metric(&self, name: &str) -> u64 {
            self.dev.lock().unwrap().metrics()[name].as_u64().unwrap()
        }
    }

    fn guest_hdr() -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            type_: TYPE_STREAM,
            buf_alloc: GUEST_BUF,
            ..Default::default()
        }
    }

    fn read_line(stream: &mut UnixStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    }

    fn read_exact_timeout(stream: &mut UnixStream, n: usize) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = vec![0u8; n];
        stream.read_exact(&mut buf).unwrap();
        buf
    }

    fn assert_eof(stream: &mut UnixStream) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(stream.read(&mut buf).unwrap(), 0, "expected EOF");
    }

    fn rw_bytes(pkts: &[(VsockHeader, Vec<u8>)]) -> Vec<u8> {
        pkts.iter()
            .filter(|(h, _)| h.op == OP_RW)
            .flat_map(|(_, d)| d.clone())
            .collect()
    }

    /// Host connects with CONNECT 1024; the guest accepts. Returns the host
    /// stream and the host port the device picked.
    fn host_connect(h: &mut Harness) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(h.uds()).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_REQUEST);
        let (req, _) = pkts.iter().find(|(p, _)| p.op == OP_REQUEST).unwrap();
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, CID, 1024)
        );
        assert_eq!(req.type_, TYPE_STREAM);
        let host_port = req.src_port;
        h.guest_send(OP_RESPONSE, 1024, host_port, &[]);
        assert_eq!(read_line(&mut host), format!("OK {host_port}\n"));
        (host, host_port)
    }

    #[test]
    fn host_initiated_connection_end_to_end() {
        let mut h = Harness::new();
        let (mut host, port) = host_connect(&mut h);
        assert_eq!(h.conn_count(), 1);

        host.write_all(b"hello guest").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_RW);
        let (rw, _) = pkts.iter().find(|(p, _)| p.op == OP_RW).unwrap();
        assert_eq!((rw.src_port, rw.dst_port), (port, 1024));
        assert_eq!(rw_bytes(&pkts), b"hello guest");

        h.guest_send(OP_RW, 1024, port, b"hello host");
        assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");
        assert!(h.driver.interrupts() > 0);
        assert_eq!(h.metric("tx_bytes"), 10);
        assert_eq!(h.metric("rx_bytes"), 11);
    }

    #[test]
    fn host_data_sent_with_the_connect_line_is_kept() {
        let mut h = Harness::new();
        let mut host = UnixStream::connect(h.uds()).unwrap();
        host.write_all(b"CONNECT 1024\nearly bytes").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_REQUEST);
        let port = pkts[0].0.src_port;
        h.guest_send(OP_RESPONSE, 1024, port, &[]);
        let pkts = h.guest_wait_for(OP_RW);
        assert_eq!(rw_bytes(&pkts), b"early bytes");
        assert_eq!(read_line(&mut host), format!("OK {port}\n"));
    }

    #[test]
    fn guest_rst_to_host_request_closes_the_host_stream() {
        let mut h = Harness::new();
        let mut host = UnixStream::connect(h.uds()).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_REQUEST);
        h.guest_send(OP_RST, 1024, pkts[0].0.src_port, &[]);
        assert_eof(&mut host);
        assert_eq!(h.conn_count(), 0);
    }

    #[test]
    fn garbage_connect_line_closes_the_host_stream() {
        let mut h = Harness::new();
        let mut host = UnixStream::connect(h.uds()).unwrap();
        host.write_all(b"CONNECT x\n").unwrap();
        h.pump();
        assert_eof(&mut host);
        assert_eq!(h.metric("host_handshake_fails"), 1);
        assert!(h.driver.recv_rx().is_empty());
    }

    #[test]
    fn guest_initiated_connection_end_to_end() {
        let mut h = Harness::new();
        let listener = UnixListener::bind(format!("{}_52", h.uds().display())).unwrap();
        h.guest_send(OP_REQUEST, 40000, 52, &[]);
        let pkts = h.guest_wait_for(OP_RESPONSE);
        let (resp, _) = &pkts[0];
        assert_eq!(
            (resp.op, resp.src_port, resp.dst_port),
            (OP_RESPONSE, 52, 40000)
        );
        let (mut host, _) = listener.accept().unwrap();

        h.guest_send(OP_RW, 40000, 52, b"from guest");
        assert_eq!(read_exact_timeout(&mut host, 10), b"from guest");
        host.write_all(b"from host").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_RW);
        assert_eq!(rw_bytes(&pkts), b"from host");
    }

    #[test]
    fn guest_connect_without_listener_gets_rst() {
        let mut h = Harness::new();
        h.guest_send(OP_REQUEST, 40000, 53, &[]);
        let pkts = h.guest_wait_for(OP_RST);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (53, 40000));
        assert_eq!(h.conn_count(), 0);
        assert_eq!(h.metric("guest_connect_fails"), 1);
    }

    #[test]
    fn guest_rst_removes_the_connection() {
        let mut h = Harness::new();
        let (mut host, port) = host_connect(&mut h);
        h.guest_send(OP_RST, 1024, port, &[]);
        assert_eq!(h.conn_count(), 0);
        assert_eof(&mut host);
        // A packet for the removed connection now gets RST.
        h.guest_send(OP_RW, 1024, port, b"x");
        h.guest_wait_for(OP_RST);
    }

    #[test]
    fn guest_shutdown_both_gets_rst_and_closes_the_host() {
        let mut h = Harness::new();
        let (mut host, port) = host_connect(&mut h);
        h.guest_send(OP_RW, 1024, port, b"last words");
        h.guest_send_hdr(
            VsockHeader {
                op: OP_SHUTDOWN,
                flags: SHUTDOWN_BOTH,
                src_port: 1024,
                dst_port: port,
                ..guest_hdr()
            },
            &[],
        );
        let pkts = h.guest_wait_for(OP_RST);
        assert_eq!(pkts.last().unwrap().0.op, OP_RST);
        assert_eq!(h.conn_count(), 0);
        assert_eq!(read_exact_timeout(&mut host, 10), b"last words");
        assert_eof(&mut host);
    }

    #[test]
    fn host_half_close_then_guest_finishes() {
        let mut h = Harness::new();
        let (host, port) = host_connect(&mut h);
        host.shutdown(std::net::Shutdown::Write).unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_SHUTDOWN);
        let (sd, _) = pkts.iter().find(|(p, _)| p.op == OP_SHUTDOWN).unwrap();
        assert_eq!(sd.flags, SHUTDOWN_SEND);
        assert_eq!(h.conn_count(), 1, "half-closed only");

        // The guest can still send.
        h.guest_send(OP_RW, 1024, port, b"still here");
        let mut host = host;
        assert_eq!(read_exact_timeout(&mut host, 10), b"still here");

        h.guest_send_hdr(
            VsockHeader {
                op: OP_SHUTDOWN,
                flags: SHUTDOWN_SEND,
                src_port: 1024,
                dst_port: port,
                ..guest_hdr()
            },
            &[],
        );
        h.guest_wait_for(OP_RST);
        assert_eq!(h.conn_count(), 0);
        assert_eof(&mut host);
    }

    #[test]
    fn device_never_exceeds_guest_credit() {
        let mut h = Harness::new();
        let mut host = UnixStream::connect(h.uds()).unwrap();
        host.write_all(b"CONNECT 1024\n").unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_REQUEST);
        let port = pkts[0].0.src_port;
        let small = VsockHeader {
            src_port: 1024,
            dst_port: port,
            buf_alloc: 5000,
            fwd_cnt: 0,
            ..guest_hdr()
        };
        h.guest_send_hdr(
            VsockHeader {
                op: OP_RESPONSE,
                ..small
            },
            &[],
        );
        read_line(&mut host);

        host.write_all(&vec![0xabu8; 50_000]).unwrap();
        h.pump();
        let pkts = h.guest_wait_for(OP_CREDIT_REQUEST);
        h.driver.add_rx_buffers(32, 4096);
        h.pump();
        let mut all = pkts;
        all.extend(h.driver.recv_rx());
        assert_eq!(rw_bytes(&all).len(), 5000, "exactly the credit, no more");

        // The guest's app consumed 3000 bytes.
        h.guest_send_hdr(
            VsockHeader {
                op: OP_CREDIT_UPDATE,
                fwd_cnt: 3000,
                ..small
            },
            &[],
        );
        h.driver.add_rx_buffers(32, 4096);
        h.pump();
        let more = h.driver.recv_rx();
        assert_eq!(rw_bytes(&more).len(), 3000);
        for (p, _) in &more {
            assert!(p.len as usize <= 4096 - HDR_SIZE);
        }
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let limits = VsockLimits {
            conn_tx_buf_size: 4096,
            ..Default::default()
        };
        let mut h = Harness::with_limits(limits);
        let (host, port) = host_connect(&mut h);
        // The host never reads; the guest ignores buf_alloc.
        let chunk = vec![1u8; 60_000];
        for _ in 0..40 {
            if h.conn_count() == 0 {
                break;
            }
            h.guest_send(OP_RW, 1024, port, &chunk);
        }
        assert_eq!(h.conn_count(), 0);
        assert_eq!(h.metric("conn_buffer_overflows"), 1);
        h.guest_wait_for(OP_RST);
        drop(host);
    }

    #[test]
    fn malformed_tx_packets_are_dropped_and_counted() {
        let mut h = Harness::new();
        // Short header.
        h.driver.push_tx_raw(&[(vec![0u8; 20], false)]);
        // Wrong CID.
        let bad = VsockHeader {
            src_cid: 99,
            op: OP_REQUEST,
            ..guest_hdr()
        };
        h.driver.push_tx(&bad, &[]);
        // Writable descriptor in tx.
        h.driver
            .push_tx_raw(&[(guest_hdr().to_bytes().to_vec(), false), (vec![0; 8], true)]);
        // Unknown op.
        h.driver.push_tx(
            &VsockHeader {
                op: 42,
                ..guest_hdr()
            },
            &[],
        );
        h.pump();
        assert_eq!(h.driver.used_count(1), 4, "every chain is returned");
        assert_eq!(h.metric("tx_bad_len"), 1);
        assert_eq!(h.metric("tx_bad_cid"), 1);
        assert_eq!(h.metric("tx_bad_chain"), 1);
        assert_eq!(h.metric("tx_bad_op"), 1);
        assert!(h.driver.recv_rx().is_empty());
    }

    #[test]
    fn bad_rx_buffers_are_returned_empty() {
        let mut h = Harness::bare(VsockLimits::default());
        // Readable (wrong direction), then too small for a header, then good.
        h.driver.add_rx_raw(&[(vec![0u8; 100], false)]);
        h.driver
            .add_rx_raw(&[(vec![0u8; 20], true), (vec![0u8; 23], true)]);
        h.driver.add_rx_buffers(1, 4096);
        h.guest_send(OP_RW, 1, 2, b"x");
        let pkts = h.driver.recv_rx();
        assert_eq!(pkts.len(), 1);
        assert_eq!(pkts[0].0.op, OP_RST);
        assert_eq!(h.driver.rx_returned_empty, 2);
        assert_eq!(h.metric("rx_bad_chain"), 2);
    }

    #[test]
    fn rx_work_waits_for_buffers() {
        let mut h = Harness::bare(VsockLimits::default());
        h.guest_send(OP_RW, 1, 2, b"x");
        assert!(h.driver.recv_rx().is_empty());
        h.driver.add_rx_buffers(1, 4096);
        h.pump();
        assert_eq!(h.driver.recv_rx()[0].0.op, OP_RST);
    }

    #[test]
    fn many_connections_come_and_go() {
        let mut h = Harness::new();
        let listener = UnixListener::bind(format!("{}_60", h.uds().display())).unwrap();
        for round in 0..3u32 {
            for i in 0..20u32 {
                h.guest_send(OP_REQUEST, 1000 + i, 60, &[]);
            }
            h.guest_wait_for(OP_RESPONSE);
            let streams: Vec<_> = (0..20).map(|_| listener.accept().unwrap().0).collect();
            assert_eq!(h.conn_count(), 20, "round {round}");
            for i in 0..20u32 {
                h.guest_send(OP_RST, 1000 + i, 60, &[]);
            }
            assert_eq!(h.conn_count(), 0);
            for mut s in streams {
                assert_eof(&mut s);
            }
            h.driver.recv_rx();
        }
    }

    #[test]
    fn new_refuses_a_live_socket_and_reclaims_a_stale_one() {
        let dir = TempDir::new();
        let path = dir.path().join("v.sock");
        let live = UnixListener::bind(&path).unwrap();
        let err = Vsock::new(CID, path.clone()).err().unwrap();
        assert!(matches!(
            err,
            VsockError::Socket(crate::unix_socket::UnixSocketError::InUse(_))
        ));
        assert!(err.to_string().contains(&path.display().to_string()));
        drop(live);
        // The file is still there, but nothing listens: reclaimed.
        assert!(path.exists());
        let dev = Vsock::new(CID, path.clone()).unwrap();
        UnixStream::connect(&path).unwrap();
        drop(dev);
        assert!(!path.exists());
    }
}
