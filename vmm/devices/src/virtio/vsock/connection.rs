//! One stream between a guest port and a host unix stream: its state,
//! credit-based flow control and half-close. No epoll and no queues here: the
//! muxer feeds guest packets and host readiness in and pulls packets out.
//!
//! Flow control, both ways:
//! - guest to host: we advertise `buf_alloc` and `fwd_cnt` (bytes handed to
//!   the host stream). Guest bytes the stream cannot take yet wait in
//!   `tx_buf`, which a guest that honours its credit never overfills; one that
//!   does not gets RST.
//! - host to guest: we never send more than
//!   `peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`.

use super::packet::{
    VsockHeader, MAX_PKT_DATA, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::HOST_CID;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

/// What a connection needs from its host-side stream.
pub trait HostStream: Read + Write {
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// A connection is named by its host-side and guest-side ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// The host asked for this connection; waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

/// Why a connection must be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The guest sent RST.
    PeerReset,
    /// Both directions are shut down and flushed.
    Finished,
    /// The guest sent something invalid in this state.
    ProtocolError,
    /// The guest sent more data than its credit allowed.
    BufferOverflow,
    /// The host stream failed or went away.
    HostError,
}

/// Which host-stream readiness the connection wants to hear about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    pub read: bool,
    pub write: bool,
}

impl Interest {
    pub fn is_empty(&self) -> bool {
        !self.read && !self.write
    }
}

/// Control packets owed to the guest.
#[derive(Debug, Default)]
struct Pending {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown_send: bool,
}

pub struct Connection<S> {
    stream: S,
    key: ConnKey,
    guest_cid: u64,
    state: ConnState,

    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    credit_requested: bool,

    /// Bytes for the host stream that it has not accepted yet.
    tx_buf: VecDeque<u8>,
    /// Leading bytes of `tx_buf` that are our `OK` line, not guest data, so
    /// they count neither against the guest's credit nor in `fwd_cnt`.
    reply_bytes: usize,

    pending: Pending,
    request_sent: bool,
    /// epoll said the stream is readable and no read has hit EAGAIN since.
    host_readable: bool,
    /// The host stream returned EOF: the host will send nothing more.
    host_eof: bool,
    /// SHUTDOWN flags received from the guest.
    peer_shutdown: u32,
    host_write_shut: bool,
    close: Option<CloseReason>,
}

impl<S: HostStream> Connection<S> {
    /// A connection the host asked for; a REQUEST is owed to the guest.
    pub fn new_host_initiated(stream: S, key: ConnKey, guest_cid: u64, buf_alloc: u32) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, buf_alloc, ConnState::LocalInit);
        conn.pending.request = true;
        conn
    }

    /// A connection the guest asked for with `request`, whose host stream is
    /// already connected; a RESPONSE is owed to the guest.
    pub fn new_guest_initiated(
        stream: S,
        key: ConnKey,
        guest_cid: u64,
        buf_alloc: u32,
        request: &VsockHeader,
    ) -> Self {
        let mut conn = Self::new(stream, key, guest_cid, buf_alloc, ConnState::Established);
        conn.update_peer_credit(request);
        conn.pending.response = true;
        conn
    }

    fn new(stream: S, key: ConnKey, guest_cid: u64, buf_alloc: u32, state: ConnState) -> Self {
        Self {
            stream,
            key,
            guest_cid,
            state,
            buf_alloc,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            tx_buf: VecDeque::new(),
            reply_bytes: 0,
            pending: Pending::default(),
            request_sent: false,
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            host_write_shut: false,
            close: None,
        }
    }

    pub fn key(&self) -> ConnKey {
        self.key
    }

    #[cfg(test)]
    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn stream(&self) -> &S {
        &self.stream
    }

    #[cfg(test)]
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    pub fn into_stream(self) -> S {
        self.stream
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close
    }

    /// Whether removing this connection must be told to the guest with RST:
    /// not if the guest reset it, nor if it never heard of it.
    pub fn needs_rst(&self) -> bool {
        match self.close {
            None | Some(CloseReason::PeerReset) => false,
            Some(_) => self.state == ConnState::Established || self.request_sent,
        }
    }

    /// Credit the guest has left for data from us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A guest reporting more forwarded than we sent gets no credit.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host stream.
    pub fn buffered_guest_bytes(&self) -> usize {
        self.tx_buf.len() - self.reply_bytes
    }

    fn kill(&mut self, reason: CloseReason) {
        if self.close.is_none() {
            self.close = Some(reason);
        }
    }

    fn update_peer_credit(&mut self, hdr: &VsockHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Applies a packet the guest sent on this connection.
    pub fn on_guest_packet(&mut self, hdr: &VsockHeader, data: &[u8]) {
        if self.close.is_some() {
            return;
        }
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (_, OP_RST) => self.kill(CloseReason::PeerReset),
            (ConnState::LocalInit, OP_RESPONSE) if self.request_sent => {
                self.state = ConnState::Established;
                let reply = format!("OK {}\n", self.key.local_port);
                self.reply_bytes = reply.len();
                self.tx_buf.extend(reply.as_bytes());
                self.flush_tx();
            }
            (ConnState::LocalInit, _) | (_, OP_REQUEST) | (_, OP_RESPONSE) => {
                self.kill(CloseReason::ProtocolError)
            }
            (ConnState::Established, OP_RW) => self.push_guest_data(data),
            (ConnState::Established, OP_SHUTDOWN) => {
                let new = hdr.flags & SHUTDOWN_BOTH & !self.peer_shutdown;
                self.peer_shutdown |= new;
                if new & SHUTDOWN_RCV != 0 {
                    // The guest takes no more data: make the host's writes
                    // fail rather than pile up. Errors only mean it is gone.
                    let _ = self.stream.shutdown(Shutdown::Read);
                }
                self.progress_shutdown();
            }
            (ConnState::Established, OP_CREDIT_REQUEST) => self.pending.credit_update = true,
            // CREDIT_UPDATE: the credit fields were already applied above.
            (ConnState::Established, _) => {}
        }
    }

    fn push_guest_data(&mut self, data: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            // Data after the guest said it would send no more.
            self.kill(CloseReason::ProtocolError);
            return;
        }
        if data.is_empty() {
            return;
        }
        if self.buffered_guest_bytes() + data.len() > self.buf_alloc as usize {
            self.kill(CloseReason::BufferOverflow);
            return;
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            while written < data.len() {
                match self.stream.write(&data[written..]) {
                    Ok(0) => {
                        self.kill(CloseReason::HostError);
                        return;
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.kill(CloseReason::HostError);
                        return;
                    }
                }
            }
            self.account_forwarded(written);
        }
        self.tx_buf.extend(&data[written..]);
    }

    /// Writes as much of `tx_buf` as the host stream takes.
    fn flush_tx(&mut self) {
        while !self.tx_buf.is_empty() && self.close.is_none() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => self.kill(CloseReason::HostError),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let reply = n.min(self.reply_bytes);
                    self.reply_bytes -= reply;
                    self.account_forwarded(n - reply);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => self.kill(CloseReason::HostError),
            }
        }
        self.progress_shutdown();
    }

    fn account_forwarded(&mut self, n: usize) {
        // n <= buf_alloc, so it fits in u32; the counter wraps by design.
        self.fwd_cnt += Wrapping(n as u32);
        // Tell the guest about freed space once a quarter of the buffer has
        // drained; a guest that used all its credit then always hears back.
        let threshold = (self.buf_alloc / 4).max(1);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= threshold {
            self.pending.credit_update = true;
        }
    }

    /// Acts on shutdowns once the data before them has been flushed.
    fn progress_shutdown(&mut self) {
        if self.close.is_some() || self.state != ConnState::Established {
            return;
        }
        let guest_done_sending = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty();
        if guest_done_sending && !self.host_write_shut {
            // Half-close towards the host. An error means the host is gone,
            // which the next read reports.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        let host_done_sending = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        if guest_done_sending && host_done_sending {
            self.kill(CloseReason::Finished);
        }
    }

    /// The host stream is readable (or hung up) / writable.
    pub fn on_host_event(&mut self, readable: bool, writable: bool) {
        if self.close.is_some() {
            return;
        }
        if readable && self.state == ConnState::Established {
            self.host_readable = true;
        }
        if writable {
            self.flush_tx();
        }
    }

    fn wants_host_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    pub fn has_pending_rx(&self) -> bool {
        if self.close.is_some() {
            return false;
        }
        if self.pending.request {
            return true;
        }
        self.state == ConnState::Established
            && (self.pending.response
                || self.pending.credit_update
                || self.pending.shutdown_send
                || (self.wants_host_data()
                    && self.host_readable
                    && (self.peer_credit() > 0 || !self.credit_requested)))
    }

    pub fn interest(&self) -> Interest {
        if self.close.is_some() {
            return Interest::default();
        }
        Interest {
            read: self.wants_host_data() && !self.host_readable && self.peer_credit() > 0,
            write: !self.tx_buf.is_empty(),
        }
    }

    fn header(&mut self, op: u16, flags: u32) -> VsockHeader {
        // Every packet carries our credit, so it doubles as a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending.credit_update = false;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, if any. An `OP_RW` payload (at most
    /// `data_cap` bytes, and never beyond the guest's credit) is left in
    /// `data`, which is cleared for every other op.
    pub fn next_rx(&mut self, data_cap: usize, data: &mut Vec<u8>) -> Option<VsockHeader> {
        data.clear();
        if self.close.is_some() {
            return None;
        }
        if self.pending.request {
            self.pending.request = false;
            self.request_sent = true;
            return Some(self.header(OP_REQUEST, 0));
        }
        if self.state == ConnState::LocalInit {
            return None;
        }
        if self.pending.response {
            self.pending.response = false;
            return Some(self.header(OP_RESPONSE, 0));
        }
        if self.wants_host_data() && self.host_readable && data_cap > 0 {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some(self.header(OP_CREDIT_REQUEST, 0));
                }
            } else if let Some(hdr) = self.read_host(data_cap.min(credit).min(MAX_PKT_DATA), data) {
                return Some(hdr);
            }
            if self.close.is_some() {
                return None;
            }
        }
        if self.pending.shutdown_send {
            self.pending.shutdown_send = false;
            return Some(self.header(OP_SHUTDOWN, SHUTDOWN_SEND));
        }
        if self.pending.credit_update {
            return Some(self.header(OP_CREDIT_UPDATE, 0));
        }
        None
    }

    /// Reads up to `max` bytes from the host into an RW packet.
    fn read_host(&mut self, max: usize, data: &mut Vec<u8>) -> Option<VsockHeader> {
        data.resize(max, 0);
        loop {
            match self.stream.read(data) {
                Ok(0) => {
                    data.clear();
                    self.host_readable = false;
                    self.host_eof = true;
                    self.pending.shutdown_send = true;
                    self.progress_shutdown();
                    return None;
                }
                Ok(n) => {
                    data.truncate(n);
                    // n <= MAX_PKT_DATA.
                    self.rx_cnt += Wrapping(n as u32);
                    let mut hdr = self.header(OP_RW, 0);
                    hdr.len = n as u32;
                    return Some(hdr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    data.clear();
                    self.host_readable = false;
                    return None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    data.clear();
                    self.kill(CloseReason::HostError);
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::vsock::packet::OP_CREDIT_REQUEST;

    const GUEST_CID: u64 = 3;
    const BUF: u32 = 1024;
    const KEY: ConnKey = ConnKey {
        local_port: 1 << 30,
        peer_port: 1024,
    };

    /// A stream whose reads and writes the test controls.
    #[derive(Default)]
    struct MockStream {
        input: VecDeque<u8>,
        input_eof: bool,
        output: Vec<u8>,
        /// Bytes `write` accepts before returning WouldBlock.
        write_room: usize,
        write_error: bool,
    }

    impl Read for MockStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.input.is_empty() {
                return if self.input_eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.input.len());
            for (dst, src) in buf.iter_mut().zip(self.input.drain(..n)) {
                *dst = src;
            }
            Ok(n)
        }
    }

    impl Write for MockStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.write_error {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if self.write_room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_room);
            self.output.extend_from_slice(&buf[..n]);
            self.write_room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A mock stream plus the shutdowns asked of it (`shutdown` takes &self).
    struct Recording(MockStream, std::cell::RefCell<Vec<Shutdown>>);

    impl Read for Recording {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Recording {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    impl HostStream for Recording {
        fn shutdown(&self, how: Shutdown) -> io::Result<()> {
            self.1.borrow_mut().push(how);
            Ok(())
        }
    }

    fn stream(write_room: usize) -> Recording {
        Recording(
            MockStream {
                write_room,
                ..Default::default()
            },
            Default::default(),
        )
    }

    fn guest(op: u16, buf_alloc: u32, fwd_cnt: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: KEY.peer_port,
            dst_port: KEY.local_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    fn established(write_room: usize, peer_buf: u32) -> Connection<Recording> {
        let mut c = Connection::new_guest_initiated(
            stream(write_room),
            KEY,
            GUEST_CID,
            BUF,
            &guest(OP_REQUEST, peer_buf, 0),
        );
        let mut data = Vec::new();
        assert_eq!(c.next_rx(4096, &mut data).unwrap().op, OP_RESPONSE);
        c
    }

    #[test]
    fn host_initiated_request_then_ok_line() {
        let mut c = Connection::new_host_initiated(stream(100), KEY, GUEST_CID, BUF);
        assert!(
            c.interest().is_empty(),
            "no host I/O before the guest accepts"
        );
        let mut data = Vec::new();
        let req = c.next_rx(4096, &mut data).unwrap();
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(
            (req.src_port, req.dst_port),
            (KEY.local_port, KEY.peer_port)
        );
        assert_eq!(req.buf_alloc, BUF);
        assert!(c.next_rx(4096, &mut data).is_none());

        c.on_guest_packet(&guest(OP_RESPONSE, 4096, 0), &[]);
        assert_eq!(c.state(), ConnState::Established);
        assert_eq!(
            c.stream().0.output,
            format!("OK {}\n", 1u32 << 30).as_bytes()
        );
        // The OK line is not guest data.
        assert_eq!(c.fwd_cnt.0, 0);
        assert!(c.interest().read);
    }

    #[test]
    fn guest_rst_before_response_closes_without_rst() {
        let mut c = Connection::new_host_initiated(stream(100), KEY, GUEST_CID, BUF);
        let mut data = Vec::new();
        c.next_rx(4096, &mut data).unwrap();
        c.on_guest_packet(&guest(OP_RST, 0, 0), &[]);
        assert_eq!(c.close_reason(), Some(CloseReason::PeerReset));
        assert!(!c.needs_rst());
        assert!(c.stream().0.output.is_empty(), "no OK line");
    }

    #[test]
    fn request_never_sent_needs_no_rst() {
        let mut c = Connection::new_host_initiated(stream(100), KEY, GUEST_CID, BUF);
        c.kill(CloseReason::HostError);
        assert!(!c.needs_rst());
    }

    #[test]
    fn data_before_response_is_a_protocol_error() {
        let mut c = Connection::new_host_initiated(stream(100), KEY, GUEST_CID, BUF);
        let mut data = Vec::new();
        c.next_rx(4096, &mut data).unwrap();
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"early");
        assert_eq!(c.close_reason(), Some(CloseReason::ProtocolError));
        assert!(c.needs_rst());
    }

    #[test]
    fn second_request_on_a_live_connection_is_a_protocol_error() {
        let mut c = established(100, 4096);
        c.on_guest_packet(&guest(OP_REQUEST, 4096, 0), &[]);
        assert_eq!(c.close_reason(), Some(CloseReason::ProtocolError));
    }

    #[test]
    fn guest_data_is_buffered_while_the_host_blocks() {
        let mut c = established(3, 4096);
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"abcdefgh");
        assert_eq!(c.stream().0.output, b"abc");
        assert_eq!(c.buffered_guest_bytes(), 5);
        assert_eq!(c.fwd_cnt.0, 3);
        assert!(c.interest().write);

        c.stream_mut().0.write_room = 100;
        c.on_host_event(false, true);
        assert_eq!(c.stream().0.output, b"abcdefgh");
        assert_eq!(c.fwd_cnt.0, 8);
        assert!(!c.interest().write);
    }

    #[test]
    fn guest_exceeding_credit_is_reset() {
        let mut c = established(0, 4096);
        c.on_guest_packet(&guest(OP_RW, 4096, 0), &[1u8; BUF as usize]);
        assert_eq!(c.close_reason(), None);
        assert_eq!(c.buffered_guest_bytes(), BUF as usize);
        c.on_guest_packet(&guest(OP_RW, 4096, 0), &[1u8]);
        assert_eq!(c.close_reason(), Some(CloseReason::BufferOverflow));
        assert!(c.needs_rst());
    }

    #[test]
    fn host_write_error_resets() {
        let mut c = established(100, 4096);
        c.stream_mut().0.write_error = true;
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"x");
        assert_eq!(c.close_reason(), Some(CloseReason::HostError));
    }

    #[test]
    fn credit_update_after_a_quarter_of_the_buffer_drains() {
        let mut c = established(0, 4096);
        let mut data = Vec::new();
        c.on_guest_packet(&guest(OP_RW, 4096, 0), &[0u8; BUF as usize]);
        assert!(c.next_rx(4096, &mut data).is_none());
        c.stream_mut().0.write_room = (BUF / 4 - 1) as usize;
        c.on_host_event(false, true);
        assert!(!c.has_pending_rx());
        c.stream_mut().0.write_room = 1;
        c.on_host_event(false, true);
        let upd = c.next_rx(4096, &mut data).unwrap();
        assert_eq!(upd.op, OP_CREDIT_UPDATE);
        assert_eq!(upd.fwd_cnt, BUF / 4);
    }

    #[test]
    fn credit_request_gets_an_update() {
        let mut c = established(100, 4096);
        c.on_guest_packet(&guest(OP_CREDIT_REQUEST, 4096, 0), &[]);
        let mut data = Vec::new();
        let upd = c.next_rx(4096, &mut data).unwrap();
        assert_eq!(upd.op, OP_CREDIT_UPDATE);
        assert_eq!(upd.buf_alloc, BUF);
    }

    #[test]
    fn host_data_respects_peer_credit() {
        let mut c = established(100, 1000);
        c.stream_mut().0.input.extend(vec![7u8; 5000]);
        c.on_host_event(true, false);
        let mut data = Vec::new();
        let rw = c.next_rx(4096, &mut data).unwrap();
        assert_eq!((rw.op, rw.len as usize, data.len()), (OP_RW, 1000, 1000));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.interest().read);
        // Out of credit with data waiting: ask once, then stay quiet.
        assert_eq!(c.next_rx(4096, &mut data).unwrap().op, OP_CREDIT_REQUEST);
        assert!(c.next_rx(4096, &mut data).is_none());
        assert!(!c.has_pending_rx());

        // The guest consumed 600 bytes.
        c.on_guest_packet(&guest(OP_CREDIT_UPDATE, 1000, 600), &[]);
        assert!(c.has_pending_rx());
        let rw = c.next_rx(4096, &mut data).unwrap();
        assert_eq!(rw.len, 600);
        // A smaller rx buffer bounds the packet too.
        c.on_guest_packet(&guest(OP_CREDIT_UPDATE, 1000, 1600), &[]);
        let rw = c.next_rx(10, &mut data).unwrap();
        assert_eq!(rw.len, 10);
    }

    #[test]
    fn lying_fwd_cnt_gives_no_credit() {
        let mut c = established(100, 1000);
        c.on_guest_packet(&guest(OP_CREDIT_UPDATE, 1000, 5000), &[]);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn credit_invariant_holds_under_random_traffic() {
        let mut c = established(1 << 20, 3000);
        c.stream_mut()
            .0
            .input
            .extend((0..200_000u32).map(|i| i as u8));
        let mut data = Vec::new();
        let mut guest_fwd = 0u32;
        let mut received = 0u32;
        let mut seed = 12345u32;
        for _ in 0..2000 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            c.on_host_event(true, false);
            let cap = (seed >> 8) as usize % 5000;
            if let Some(h) = c.next_rx(cap, &mut data) {
                if h.op == OP_RW {
                    received += h.len;
                    assert!(received - guest_fwd <= 3000, "credit exceeded");
                    assert!(h.len as usize <= cap);
                }
            }
            if seed % 3 == 0 {
                // The guest's app reads some of what arrived.
                guest_fwd += (received - guest_fwd) / 2;
                c.on_guest_packet(&guest(OP_CREDIT_UPDATE, 3000, guest_fwd), &[]);
            }
        }
        assert!(received > 10_000, "traffic flowed: {received}");
    }

    #[test]
    fn host_eof_sends_shutdown_send_and_guest_can_still_send() {
        let mut c = established(100, 4096);
        c.stream_mut().0.input_eof = true;
        c.on_host_event(true, false);
        let mut data = Vec::new();
        let sd = c.next_rx(4096, &mut data).unwrap();
        assert_eq!((sd.op, sd.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(c.close_reason().is_none(), "half-closed, not closed");
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"late");
        assert_eq!(c.stream().0.output, b"late");
        // The guest finishes too: both sides are done.
        c.on_guest_packet(
            &VsockHeader {
                flags: SHUTDOWN_SEND,
                ..guest(OP_SHUTDOWN, 4096, 0)
            },
            &[],
        );
        assert_eq!(c.close_reason(), Some(CloseReason::Finished));
        assert!(c.needs_rst());
    }

    #[test]
    fn guest_shutdown_send_half_closes_the_host_after_flushing() {
        let mut c = established(2, 4096);
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"abcd");
        c.on_guest_packet(
            &VsockHeader {
                flags: SHUTDOWN_SEND,
                ..guest(OP_SHUTDOWN, 4096, 0)
            },
            &[],
        );
        assert!(c.stream().1.borrow().is_empty(), "data still buffered");
        c.stream_mut().0.write_room = 10;
        c.on_host_event(false, true);
        assert_eq!(*c.stream().1.borrow(), vec![Shutdown::Write]);
        assert!(c.close_reason().is_none());
        // The host can still send to the guest.
        c.stream_mut().0.input.extend(b"reply");
        c.on_host_event(true, false);
        let mut data = Vec::new();
        let rw = c.next_rx(4096, &mut data).unwrap();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"reply"[..]));
        // More guest data is a protocol error.
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"x");
        assert_eq!(c.close_reason(), Some(CloseReason::ProtocolError));
    }

    #[test]
    fn guest_full_shutdown_finishes_after_flush() {
        let mut c = established(0, 4096);
        c.on_guest_packet(&guest(OP_RW, 4096, 0), b"tail");
        c.on_guest_packet(
            &VsockHeader {
                flags: SHUTDOWN_BOTH,
                ..guest(OP_SHUTDOWN, 4096, 0)
            },
            &[],
        );
        assert_eq!(*c.stream().1.borrow(), vec![Shutdown::Read]);
        assert!(c.close_reason().is_none());
        assert!(!c.interest().read);
        c.stream_mut().0.write_room = 10;
        c.on_host_event(false, true);
        assert_eq!(c.stream().0.output, b"tail");
        assert_eq!(c.close_reason(), Some(CloseReason::Finished));
    }

    #[test]
    fn unknown_ops_never_panic_in_any_state() {
        for op in 0..=10u16 {
            let mut c = Connection::new_host_initiated(stream(10), KEY, GUEST_CID, BUF);
            c.on_guest_packet(&guest(op, 0, 0), b"zz");
            let mut c = established(10, 0);
            c.on_guest_packet(&guest(op, u32::MAX, u32::MAX), b"zz");
            let mut data = Vec::new();
            while c.next_rx(4096, &mut data).is_some() {}
        }
    }
}
