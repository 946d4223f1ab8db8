//! virtio-vsock (device ID 19): one stream connection from (guest CID, port
//! 1234) to (host CID 2, port 52), one echo round trip, then an orderly close.
//!
//! Buffers use the layout of Linux 6.1's driver (our guest kernel): every rx
//! buffer is a two-descriptor chain (44-byte header, then data) and every tx
//! packet is a header descriptor plus, when there is a payload, a data
//! descriptor.

use super::mmio::Mmio;
use super::queue::{Segment, SplitQueue, MAX_QUEUE_SIZE};
use super::Notify;
use crate::deadline;
use crate::dma::{self, DmaBuf};
use crate::fail::{Fail, Result};
use crate::say;

pub const DEVICE_ID: u32 = 19;
pub const HOST_CID: u64 = 2;
pub const HOST_PORT: u32 = 52;
pub const GUEST_PORT: u32 = 1234;
/// Receive buffer space the probe advertises to the host.
pub const BUF_ALLOC: u32 = 64 * 1024;
pub const ECHO: &[u8] = b"probe-vsock-echo";

pub const HDR_SIZE: usize = 44;
const RX_DATA_SIZE: usize = 4096;
const RX_BUFFERS: usize = 8;
const EVENT_BUFFERS: usize = 4;
const EVENT_SIZE: usize = 8;
/// Bytes of a received payload the probe keeps (it only needs the echo).
const KEEP: usize = 64;

const RX_QUEUE: u32 = 0;
const TX_QUEUE: u32 = 1;
const EVENT_QUEUE: u32 = 2;

pub const TYPE_STREAM: u16 = 1;

pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

pub const SHUTDOWN_BOTH: u32 = 3;
/// Stray packets reported before the probe goes quiet about them.
const STRAY_REPORTS: u32 = 3;

/// `struct virtio_vsock_hdr`, little-endian and packed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut out = [0u8; HDR_SIZE];
        out[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        out[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        out[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        out[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        out[24..28].copy_from_slice(&self.len.to_le_bytes());
        out[28..30].copy_from_slice(&self.kind.to_le_bytes());
        out[30..32].copy_from_slice(&self.op.to_le_bytes());
        out[32..36].copy_from_slice(&self.flags.to_le_bytes());
        out[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        out[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        out
    }

    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                b[i],
                b[i + 1],
                b[i + 2],
                b[i + 3],
                b[i + 4],
                b[i + 5],
                b[i + 6],
                b[i + 7],
            ])
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect_ms: u64,
    pub echo_ms: u64,
    pub tx_ms: u64,
    pub close_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: 5000,
            echo_ms: 5000,
            tx_ms: 2000,
            close_ms: 1000,
        }
    }
}

/// A received packet; the payload is kept up to `KEEP` bytes.
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    pub hdr: Header,
    pub data: [u8; KEEP],
}

impl Packet {
    pub fn kept(&self) -> &[u8] {
        &self.data[..(self.hdr.len as usize).min(KEEP)]
    }
}

/// Handshake, queues, then the echo test on the device at `mmio`.
pub fn run(mmio: &Mmio) -> Result<()> {
    mmio.begin_init(0)?;
    let rx = mmio.setup_queue(RX_QUEUE, MAX_QUEUE_SIZE)?;
    let tx = mmio.setup_queue(TX_QUEUE, 8)?;
    let event = mmio.setup_queue(EVENT_QUEUE, EVENT_BUFFERS as u16)?;
    mmio.driver_ok()?;
    let guest_cid = mmio.config_u64(0)?;
    say!("vsock guest_cid={}", guest_cid);
    if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
        return Err(Fail::with("bad guest_cid", guest_cid));
    }
    let mut conn = Connection::new(mmio, rx, tx, event, guest_cid, Timeouts::default())?;
    let result = conn.echo();
    if result.is_ok() {
        say!("vsock ok");
        let how = conn.close();
        say!("vsock closed: {}", how);
    }
    mmio.check_health()?;
    result
}

pub struct Connection<N: Notify> {
    notify: N,
    rx: SplitQueue,
    tx: SplitQueue,
    event: SplitQueue,
    rx_bufs: [(DmaBuf, DmaBuf); RX_BUFFERS],
    /// rx buffer slot by head descriptor.
    rx_slot_of_head: [u8; MAX_QUEUE_SIZE as usize],
    tx_hdr: DmaBuf,
    tx_data: DmaBuf,
    guest_cid: u64,
    timeouts: Timeouts,
    fwd_cnt: u32,
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    strays: u32,
}

const NO_SLOT: u8 = u8::MAX;

impl<N: Notify> Connection<N> {
    /// Takes live queues, fills rx and event with buffers and notifies.
    pub fn new(
        notify: N,
        rx: SplitQueue,
        tx: SplitQueue,
        event: SplitQueue,
        guest_cid: u64,
        timeouts: Timeouts,
    ) -> Result<Self> {
        let oom = Fail::new("out of dma memory");
        let rx_buffers = (usize::from(rx.size()) / 2).min(RX_BUFFERS);
        if rx_buffers == 0 {
            return Err(Fail::with("rx queue too small", u64::from(rx.size())));
        }
        let mut rx_bufs =
            [(dma::alloc(0, 1).ok_or(oom)?, dma::alloc(0, 1).ok_or(oom)?); RX_BUFFERS];
        for slot in rx_bufs.iter_mut().take(rx_buffers) {
            *slot = (
                dma::alloc(HDR_SIZE, 8).ok_or(oom)?,
                dma::alloc(RX_DATA_SIZE, 8).ok_or(oom)?,
            );
        }
        let mut conn = Self {
            notify,
            rx,
            tx,
            event,
            rx_bufs,
            rx_slot_of_head: [NO_SLOT; MAX_QUEUE_SIZE as usize],
            tx_hdr: dma::alloc(HDR_SIZE, 8).ok_or(oom)?,
            tx_data: dma::alloc(KEEP, 8).ok_or(oom)?,
            guest_cid,
            timeouts,
            fwd_cnt: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            strays: 0,
        };
        for slot in 0..rx_buffers {
            conn.post_rx(slot)?;
        }
        conn.notify.notify(RX_QUEUE);
        let events = usize::from(conn.event.size()).min(EVENT_BUFFERS);
        for _ in 0..events {
            let buf = dma::alloc(EVENT_SIZE, 8).ok_or(oom)?;
            conn.event.add(&[Segment::input(&buf)])?;
        }
        conn.notify.notify(EVENT_QUEUE);
        Ok(conn)
    }

    /// Connects, sends `ECHO`, and waits for the same bytes to come back.
    pub fn echo(&mut self) -> Result<()> {
        self.send(op::REQUEST, 0, &[])?;
        loop {
            let packet = self.next(self.timeouts.connect_ms, "no response to connect")?;
            match packet.hdr.op {
                op::RESPONSE => break,
                op::CREDIT_UPDATE => continue,
                op::RST => return Err(Fail::new("connection refused (RST)")),
                other => {
                    return Err(Fail::with(
                        "unexpected op while connecting",
                        u64::from(other),
                    ))
                }
            }
        }
        if self.peer_credit() < ECHO.len() as u32 {
            self.send(op::CREDIT_REQUEST, 0, &[])?;
            while self.peer_credit() < ECHO.len() as u32 {
                let packet = self.next(self.timeouts.echo_ms, "no credit from host")?;
                if packet.hdr.op != op::CREDIT_UPDATE {
                    return Err(Fail::with(
                        "unexpected op while waiting for credit",
                        u64::from(packet.hdr.op),
                    ));
                }
            }
        }
        self.send(op::RW, 0, ECHO)?;
        let mut got = [0u8; KEEP];
        let mut got_len = 0usize;
        while got_len < ECHO.len() {
            let packet = self.next(self.timeouts.echo_ms, "no echo")?;
            match packet.hdr.op {
                op::RW => {
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(packet.hdr.len);
                    let kept = packet.kept();
                    let take = kept.len().min(KEEP - got_len);
                    got[got_len..got_len + take].copy_from_slice(&kept[..take]);
                    got_len += packet.hdr.len as usize;
                }
                op::CREDIT_UPDATE => {}
                op::RST | op::SHUTDOWN => {
                    return Err(Fail::with("host closed before echoing", got_len as u64));
                }
                other => return Err(Fail::with("unexpected op while echoing", u64::from(other))),
            }
        }
        if got_len != ECHO.len() || &got[..got_len] != ECHO {
            return Err(Fail::with("echo mismatch, bytes", got_len as u64));
        }
        Ok(())
    }

    /// SHUTDOWN, then wait briefly for the host's RST (sending one if it
    /// only answers with its own SHUTDOWN, or not at all). Says what happened.
    pub fn close(&mut self) -> &'static str {
        if self.send(op::SHUTDOWN, SHUTDOWN_BOTH, &[]).is_err() {
            return "shutdown not sent";
        }
        loop {
            match self.next(self.timeouts.close_ms, "no rst") {
                Ok(packet) => match packet.hdr.op {
                    op::RST => return "host sent rst",
                    op::SHUTDOWN => {
                        let _ = self.send(op::RST, 0, &[]);
                        return "host sent shutdown, probe sent rst";
                    }
                    op::RW => self.fwd_cnt = self.fwd_cnt.wrapping_add(packet.hdr.len),
                    _ => {}
                },
                Err(_) => {
                    let _ = self.send(op::RST, 0, &[]);
                    return "no answer, probe sent rst";
                }
            }
        }
    }

    /// Credit the host has left for our data (virtio 1.2, 5.10.6.3).
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .wrapping_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn post_rx(&mut self, slot: usize) -> Result<()> {
        let (hdr, data) = self.rx_bufs[slot];
        let head = self
            .rx
            .add(&[Segment::input(&hdr), Segment::input(&data)])?;
        self.rx_slot_of_head[usize::from(head)] = slot as u8;
        Ok(())
    }

    /// Sends one packet of this connection and waits until the device has
    /// taken it (one tx packet in flight keeps the buffers simple).
    pub fn send(&mut self, op: u16, flags: u32, payload: &[u8]) -> Result<()> {
        if payload.len() > self.tx_data.len() {
            return Err(Fail::with("payload too big", payload.len() as u64));
        }
        let header = Header {
            src_cid: self.guest_cid,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: HOST_PORT,
            len: payload.len() as u32,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        };
        self.tx_hdr.copy_from(0, &header.to_bytes());
        let data = self
            .tx_data
            .slice(0, payload.len())
            .ok_or(Fail::new("tx buffer"))?;
        data.copy_from(0, payload);
        if payload.is_empty() {
            self.tx.add(&[Segment::out(&self.tx_hdr)])?;
        } else {
            self.tx
                .add(&[Segment::out(&self.tx_hdr), Segment::out(&data)])?;
        }
        self.notify.notify(TX_QUEUE);
        let tx = &mut self.tx;
        deadline::poll(self.timeouts.tx_ms, || tx.pop_used().transpose()).ok_or(Fail::with(
            "device did not take tx packet, op",
            u64::from(op),
        ))??;
        if op == op::RW {
            self.tx_cnt = self.tx_cnt.wrapping_add(payload.len() as u32);
        }
        Ok(())
    }

    /// The next packet for this connection. Answers CREDIT_REQUEST itself,
    /// tracks the host's credit from every header, and skips packets for
    /// other addresses (reporting the first few).
    fn next(&mut self, timeout_ms: u64, timeout_reason: &'static str) -> Result<Packet> {
        let mut deadline = deadline::Deadline::after_ms(timeout_ms);
        loop {
            let packet = loop {
                if let Some(packet) = self.recv()? {
                    break packet;
                }
                if deadline.expired() {
                    return Err(Fail::new(timeout_reason));
                }
                core::hint::spin_loop();
            };
            let h = packet.hdr;
            let ours = h.src_cid == HOST_CID
                && h.dst_cid == self.guest_cid
                && h.src_port == HOST_PORT
                && h.dst_port == GUEST_PORT
                && h.kind == TYPE_STREAM;
            if !ours {
                self.strays += 1;
                if self.strays <= STRAY_REPORTS {
                    say!(
                        "vsock stray packet op={} {}:{} -> {}:{} type={}",
                        h.op,
                        h.src_cid,
                        h.src_port,
                        h.dst_cid,
                        h.dst_port,
                        h.kind
                    );
                }
                continue;
            }
            self.peer_buf_alloc = h.buf_alloc;
            self.peer_fwd_cnt = h.fwd_cnt;
            if h.op == op::CREDIT_REQUEST {
                self.send(op::CREDIT_UPDATE, 0, &[])?;
                continue;
            }
            return Ok(packet);
        }
    }

    /// One completed rx buffer, if any; the buffer goes straight back.
    fn recv(&mut self) -> Result<Option<Packet>> {
        let Some(used) = self.rx.pop_used()? else {
            return Ok(None);
        };
        let slot = self.rx_slot_of_head[usize::from(used.head)];
        self.rx_slot_of_head[usize::from(used.head)] = NO_SLOT;
        if slot == NO_SLOT {
            return Err(Fail::with("rx head without buffer", u64::from(used.head)));
        }
        let (hdr_buf, data_buf) = self.rx_bufs[usize::from(slot)];
        let mut raw = [0u8; HDR_SIZE];
        hdr_buf.copy_to(0, &mut raw);
        let hdr = Header::from_bytes(&raw);
        let mut data = [0u8; KEEP];
        let payload = hdr.len as usize;
        let fits = payload <= RX_DATA_SIZE && (used.len as usize) >= HDR_SIZE + payload;
        if fits {
            data_buf.copy_to(0, &mut data[..payload.min(KEEP)]);
        }
        self.post_rx(usize::from(slot))?;
        self.notify.notify(RX_QUEUE);
        if !fits {
            return Err(Fail::with(
                "rx used length does not cover packet",
                u64::from(used.len),
            ));
        }
        Ok(Some(Packet { hdr, data }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::tests::{Chain, FakeDevice};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::vec::Vec;

    struct NoNotify;
    impl Notify for NoNotify {
        fn notify(&self, _queue: u32) {}
    }

    const GUEST_CID: u64 = 3;

    fn host_header(op: u16, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: HOST_PORT,
            dst_port: GUEST_PORT,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// Packets as (header, payload).
    type Packets = Vec<(Header, Vec<u8>)>;

    /// What the fake host does with each packet the guest sends; returns the
    /// packets to deliver.
    type Behaviour = fn(&Header, &[u8]) -> Packets;

    /// Runs `behaviour` on a thread acting as the device until `stop`;
    /// returns everything the guest sent.
    fn fake_host(
        rx: &SplitQueue,
        tx: &SplitQueue,
        behaviour: Behaviour,
        stop: Arc<AtomicBool>,
    ) -> thread::JoinHandle<Packets> {
        let mut rx_dev = FakeDevice::new(rx);
        let mut tx_dev = FakeDevice::new(tx);
        thread::spawn(move || {
            let mut sent = Vec::new();
            let mut pending: Packets = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some((head, chain)) = tx_dev.pop() {
                    let bytes = FakeDevice::read_chain(&chain);
                    let hdr = Header::from_bytes(bytes[..HDR_SIZE].try_into().unwrap());
                    let payload = bytes[HDR_SIZE..].to_vec();
                    pending.extend(behaviour(&hdr, &payload));
                    sent.push((hdr, payload));
                    tx_dev.complete(u32::from(head), 0);
                }
                if !pending.is_empty() {
                    if let Some((head, chain)) = rx_dev.pop() {
                        let (hdr, payload) = pending.remove(0);
                        let chain: Chain = chain;
                        let mut bytes = hdr.to_bytes().to_vec();
                        bytes.extend(&payload);
                        let written = FakeDevice::write_chain(&chain, &bytes);
                        rx_dev.complete(u32::from(head), written);
                    }
                }
                thread::yield_now();
            }
            sent
        })
    }

    fn connect(
        behaviour: Behaviour,
    ) -> (
        Connection<NoNotify>,
        Arc<AtomicBool>,
        thread::JoinHandle<Packets>,
    ) {
        let rx = SplitQueue::new(16).unwrap();
        let tx = SplitQueue::new(8).unwrap();
        let event = SplitQueue::new(4).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let host = fake_host(&rx, &tx, behaviour, stop.clone());
        let timeouts = Timeouts {
            connect_ms: 2000,
            echo_ms: 2000,
            tx_ms: 2000,
            close_ms: 200,
        };
        let conn = Connection::new(NoNotify, rx, tx, event, GUEST_CID, timeouts).unwrap();
        (conn, stop, host)
    }

    fn finish(stop: Arc<AtomicBool>, host: thread::JoinHandle<Packets>) -> Packets {
        stop.store(true, Ordering::Relaxed);
        host.join().unwrap()
    }

    /// Accepts, echoes in two pieces after asking for credit, answers
    /// SHUTDOWN with RST.
    fn echo_host(hdr: &Header, payload: &[u8]) -> Packets {
        match hdr.op {
            op::REQUEST => std::vec![
                (host_header(op::CREDIT_REQUEST, 0), Vec::new()),
                (host_header(op::RESPONSE, 0), Vec::new()),
            ],
            op::RW => {
                let (a, b) = payload.split_at(5);
                std::vec![
                    (host_header(op::RW, a.len() as u32), a.to_vec()),
                    (host_header(op::RW, b.len() as u32), b.to_vec()),
                ]
            }
            op::SHUTDOWN => std::vec![(host_header(op::RST, 0), Vec::new())],
            _ => Vec::new(),
        }
    }

    #[test]
    fn header_layout_matches_the_spec() {
        let h = Header {
            op: op::RW,
            len: 0x0102_0304,
            kind: 1,
            buf_alloc: 7,
            ..Header::default()
        };
        let bytes = h.to_bytes();
        assert_eq!(&bytes[24..28], &[4, 3, 2, 1]);
        assert_eq!(&bytes[28..32], &[1, 0, 5, 0]);
        assert_eq!(bytes[36], 7);
        assert_eq!(Header::from_bytes(&bytes), h);
    }

    #[test]
    fn echo_round_trip_against_a_fake_host() {
        let (mut conn, stop, host) = connect(echo_host);
        conn.echo().unwrap();
        assert_eq!(conn.close(), "host sent rst");
        let sent = finish(stop, host);
        let ops: Vec<u16> = sent.iter().map(|(h, _)| h.op).collect();
        assert_eq!(ops, [op::REQUEST, op::CREDIT_UPDATE, op::RW, op::SHUTDOWN]);
        let (request, _) = &sent[0];
        assert_eq!(
            (
                request.src_cid,
                request.dst_cid,
                request.src_port,
                request.dst_port
            ),
            (GUEST_CID, HOST_CID, GUEST_PORT, HOST_PORT)
        );
        assert_eq!(
            (request.kind, request.buf_alloc, request.len),
            (TYPE_STREAM, BUF_ALLOC, 0)
        );
        assert_eq!(sent[2].1, ECHO);
        assert_eq!(sent[3].0.flags, SHUTDOWN_BOTH);
        // The SHUTDOWN went out after the echo was consumed: fwd_cnt counts it.
        assert_eq!(sent[3].0.fwd_cnt, ECHO.len() as u32);
    }

    #[test]
    fn refused_connection_fails_with_reason() {
        fn refuse(hdr: &Header, _: &[u8]) -> Packets {
            if hdr.op == op::REQUEST {
                std::vec![(host_header(op::RST, 0), Vec::new())]
            } else {
                Vec::new()
            }
        }
        let (mut conn, stop, host) = connect(refuse);
        assert_eq!(conn.echo(), Err(Fail::new("connection refused (RST)")));
        finish(stop, host);
    }

    #[test]
    fn wrong_echo_and_strays_are_caught() {
        fn garble(hdr: &Header, _: &[u8]) -> Packets {
            let mut stray = host_header(op::RW, 4);
            stray.dst_port = 999;
            match hdr.op {
                op::REQUEST => std::vec![(host_header(op::RESPONSE, 0), Vec::new())],
                op::RW => std::vec![
                    (stray, b"nope".to_vec()),
                    (host_header(op::RW, 16), b"probe-vsock-ECHO".to_vec()),
                ],
                _ => Vec::new(),
            }
        }
        let (mut conn, stop, host) = connect(garble);
        assert_eq!(conn.echo(), Err(Fail::with("echo mismatch, bytes", 16)));
        assert_eq!(conn.strays, 1);
        finish(stop, host);
    }

    #[test]
    fn silent_host_times_out_and_close_sends_rst() {
        fn silent(_: &Header, _: &[u8]) -> Packets {
            Vec::new()
        }
        let (mut conn, stop, host) = connect(silent);
        assert_eq!(conn.echo(), Err(Fail::new("no response to connect")));
        assert_eq!(conn.close(), "no answer, probe sent rst");
        let sent = finish(stop, host);
        assert_eq!(sent.last().map(|(h, _)| h.op), Some(op::RST));
    }
}
