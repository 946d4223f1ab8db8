//! The vsock packet header and its transfer over descriptor chains.
//!
//! Chains are read and written through virtio-queue's `Reader`/`Writer`, so a
//! header may be split across descriptors at any byte. Those types silently
//! skip descriptors of the wrong direction and stop at a loop, so the chain is
//! walked once first to reject both.

use crate::GuestMemoryMmap;
use std::io::{Read, Write};
use virtio_queue::{DescriptorChain, Reader, Writer};

pub const HDR_SIZE: usize = 44;
/// Largest data payload accepted from the guest or sent to it.
pub const MAX_PKT_DATA: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `struct virtio_vsock_hdr`, little endian, packed, 44 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// Field offsets are fixed by the virtio spec.
impl VsockHeader {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("descriptor chain is empty")]
    EmptyChain,
    #[error("descriptor chain is broken (loop, bad next index or unreadable table)")]
    BrokenChain,
    #[error("device-writable descriptor in a tx chain")]
    WritableInTx,
    #[error("device-readable descriptor in an rx chain")]
    ReadableInRx,
    #[error("descriptor chain points outside guest memory")]
    BadMemory(#[source] virtio_queue::Error),
    #[error("header needs {HDR_SIZE} bytes, the chain has {0}")]
    ShortHeader(usize),
    #[error("len field {len} exceeds the {available} data bytes in the chain")]
    LenBeyondChain { len: u32, available: usize },
    #[error("len field {0} exceeds the {MAX_PKT_DATA}-byte cap")]
    LenTooLarge(u32),
    #[error("rx buffer of {0} bytes cannot hold a header")]
    RxTooSmall(usize),
    #[error("packet type {0} is not STREAM")]
    BadType(u16),
    #[error("unknown op {0}")]
    BadOp(u16),
    #[error("src_cid {src} / dst_cid {dst} do not match the guest and host CIDs")]
    BadCid { src: u64, dst: u64 },
    #[error("copying guest memory failed")]
    Io(#[source] std::io::Error),
}

/// Which counter a rejected packet goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketFault {
    Chain,
    Len,
    Cid,
    Op,
}

impl PacketError {
    pub fn fault(&self) -> PacketFault {
        match self {
            Self::EmptyChain
            | Self::BrokenChain
            | Self::WritableInTx
            | Self::ReadableInRx
            | Self::BadMemory(_)
            | Self::RxTooSmall(_)
            | Self::Io(_) => PacketFault::Chain,
            Self::ShortHeader(_) | Self::LenBeyondChain { .. } | Self::LenTooLarge(_) => {
                PacketFault::Len
            }
            Self::BadCid { .. } => PacketFault::Cid,
            Self::BadType(_) | Self::BadOp(_) => PacketFault::Op,
        }
    }
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// Walks the chain once: every descriptor must have the wanted direction and
/// the chain must end with a descriptor without NEXT (the iterator stops
/// silently on a loop or a bad index, leaving the last one with NEXT set).
fn check_chain(chain: &Chain<'_>, device_writable: bool) -> Result<(), PacketError> {
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain.clone() {
        count += 1;
        if desc.is_write_only() != device_writable {
            return Err(if device_writable {
                PacketError::ReadableInRx
            } else {
                PacketError::WritableInTx
            });
        }
        last_has_next = desc.has_next();
    }
    if count == 0 {
        return Err(PacketError::EmptyChain);
    }
    if last_has_next {
        return Err(PacketError::BrokenChain);
    }
    Ok(())
}

/// A packet from the guest: a validated header and its payload.
#[derive(Debug)]
pub struct TxPacket {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

/// Checks the fields every guest packet must get right.
pub fn validate_guest_header(hdr: &VsockHeader, guest_cid: u64) -> Result<(), PacketError> {
    if hdr.src_cid != guest_cid || hdr.dst_cid != super::HOST_CID {
        return Err(PacketError::BadCid {
            src: hdr.src_cid,
            dst: hdr.dst_cid,
        });
    }
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::BadType(hdr.type_));
    }
    if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
        return Err(PacketError::BadOp(hdr.op));
    }
    Ok(())
}

/// Reads one packet from a tx chain. Only `OP_RW` carries data; the payload of
/// any other op is ignored.
pub fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: Chain<'_>,
    guest_cid: u64,
) -> Result<TxPacket, PacketError> {
    check_chain(&chain, false)?;
    let mut reader: Reader<'_> = Reader::new(mem, chain).map_err(PacketError::BadMemory)?;
    let available = reader.available_bytes();
    if available < HDR_SIZE {
        return Err(PacketError::ShortHeader(available));
    }
    let mut raw = [0u8; HDR_SIZE];
    reader.read_exact(&mut raw).map_err(PacketError::Io)?;
    let hdr = VsockHeader::from_bytes(&raw);

    let len = hdr.len as usize;
    if len > MAX_PKT_DATA {
        return Err(PacketError::LenTooLarge(hdr.len));
    }
    if len > reader.available_bytes() {
        return Err(PacketError::LenBeyondChain {
            len: hdr.len,
            available: reader.available_bytes(),
        });
    }
    validate_guest_header(&hdr, guest_cid)?;

    let mut data = Vec::new();
    if hdr.op == OP_RW && len > 0 {
        data.resize(len, 0);
        reader.read_exact(&mut data).map_err(PacketError::Io)?;
    }
    Ok(TxPacket { hdr, data })
}

/// A validated rx chain, ready to take one packet.
pub struct RxBuffer<'a> {
    writer: Writer<'a>,
}

impl<'a> RxBuffer<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, chain: Chain<'a>) -> Result<Self, PacketError> {
        check_chain(&chain, true)?;
        let writer: Writer<'a> = Writer::new(mem, chain).map_err(PacketError::BadMemory)?;
        if writer.available_bytes() < HDR_SIZE {
            return Err(PacketError::RxTooSmall(writer.available_bytes()));
        }
        Ok(Self { writer })
    }

    /// Payload bytes that fit after the header (capped at `MAX_PKT_DATA`).
    pub fn data_capacity(&self) -> usize {
        (self.writer.available_bytes() - HDR_SIZE).min(MAX_PKT_DATA)
    }

    /// Writes the header, with `len` set from `data`, then `data`. Returns the
    /// byte count for the used ring.
    pub fn write(mut self, hdr: &VsockHeader, data: &[u8]) -> Result<u32, PacketError> {
        let mut hdr = *hdr;
        hdr.len = u32::try_from(data.len()).map_err(|_| PacketError::LenTooLarge(u32::MAX))?;
        if data.len() > self.data_capacity() {
            return Err(PacketError::LenTooLarge(hdr.len));
        }
        self.writer
            .write_all(&hdr.to_bytes())
            .map_err(PacketError::Io)?;
        self.writer.write_all(data).map_err(PacketError::Io)?;
        // At most HDR_SIZE + MAX_PKT_DATA, so it fits.
        Ok((HDR_SIZE + data.len()) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const DATA_BASE: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn hdr(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: super::super::HOST_CID,
            src_port: 1234,
            dst_port: 5678,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    /// Writes `bytes` into guest memory split into descriptors of `sizes`
    /// (the last size takes whatever is left) and parses the chain.
    fn parse_split(
        m: &GuestMemoryMmap,
        bytes: &[u8],
        sizes: &[usize],
    ) -> Result<TxPacket, PacketError> {
        let vq = MockSplitQueue::new(m, 16);
        let mut descs = Vec::new();
        let mut off = 0;
        for (i, &size) in sizes.iter().enumerate() {
            let size = if i == sizes.len() - 1 {
                bytes.len() - off
            } else {
                size
            };
            // Leave gaps between buffers so adjacency cannot hide bugs.
            let addr = DATA_BASE + (i as u64) * 0x2_0000;
            m.write_slice(&bytes[off..off + size], GuestAddress(addr))
                .unwrap();
            descs.push(desc(addr, size as u32, false));
            off += size;
        }
        let chain = vq.build_desc_chain(&descs).unwrap();
        read_tx_packet(m, chain, GUEST_CID)
    }

    fn packet_bytes(h: &VsockHeader, data: &[u8]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn header_round_trips_at_spec_offsets() {
        let h = VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 9,
            len: 10,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1000,
            fwd_cnt: 0x2000,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(VsockHeader::from_bytes(&b), h);
    }

    #[test]
    fn header_split_at_every_offset() {
        let m = mem();
        let data = b"hello vsock";
        let bytes = packet_bytes(&hdr(OP_RW, data.len() as u32), data);
        for split in 0..=HDR_SIZE {
            // A zero-length first descriptor is legal and must work too.
            let pkt = parse_split(&m, &bytes, &[split, 0])
                .unwrap_or_else(|e| panic!("split at {split}: {e}"));
            assert_eq!(pkt.hdr, hdr(OP_RW, data.len() as u32), "split at {split}");
            assert_eq!(pkt.data, data, "split at {split}");
        }
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let m = mem();
        let bytes = packet_bytes(&hdr(OP_RW, 3), b"abc");
        let pkt = parse_split(&m, &bytes, &[bytes.len()]).unwrap();
        assert_eq!(pkt.data, b"abc");
    }

    #[test]
    fn data_spread_over_many_descriptors() {
        let m = mem();
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let bytes = packet_bytes(&hdr(OP_RW, 1000), &data);
        // Header in 3 pieces, data in 1-byte, 7-byte and bigger pieces.
        let sizes = [10, 20, 14, 1, 7, 100, 300, 0];
        let pkt = parse_split(&m, &bytes, &sizes).unwrap();
        assert_eq!(pkt.data, data);
    }

    #[test]
    fn non_rw_payload_is_ignored() {
        let m = mem();
        let bytes = packet_bytes(&hdr(OP_CREDIT_UPDATE, 3), b"xyz");
        let pkt = parse_split(&m, &bytes, &[bytes.len()]).unwrap();
        assert!(pkt.data.is_empty());
    }

    #[test]
    fn short_header_is_rejected_at_every_length() {
        let m = mem();
        let bytes = hdr(OP_RW, 0).to_bytes();
        for n in 0..HDR_SIZE {
            let err = parse_split(&m, &bytes[..n], &[n]).unwrap_err();
            assert!(
                matches!(err, PacketError::ShortHeader(got) if got == n),
                "{n}: {err}"
            );
            assert_eq!(err.fault(), PacketFault::Len);
        }
    }

    #[test]
    fn len_beyond_chain_or_cap_is_rejected() {
        let m = mem();
        let bytes = packet_bytes(&hdr(OP_RW, 10), b"short");
        let err = parse_split(&m, &bytes, &[HDR_SIZE, 0]).unwrap_err();
        assert!(matches!(
            err,
            PacketError::LenBeyondChain {
                len: 10,
                available: 5
            }
        ));

        let bytes = hdr(OP_RW, MAX_PKT_DATA as u32 + 1).to_bytes();
        let err = parse_split(&m, &bytes, &[HDR_SIZE]).unwrap_err();
        assert!(matches!(err, PacketError::LenTooLarge(_)));

        let bytes = hdr(OP_RW, u32::MAX).to_bytes();
        let err = parse_split(&m, &bytes, &[HDR_SIZE]).unwrap_err();
        assert!(matches!(err, PacketError::LenTooLarge(u32::MAX)));
    }

    #[test]
    fn bad_cid_type_and_op_are_rejected() {
        let m = mem();
        let cases: Vec<(VsockHeader, PacketFault)> = vec![
            (
                VsockHeader {
                    src_cid: 4,
                    ..hdr(OP_RW, 0)
                },
                PacketFault::Cid,
            ),
            (
                VsockHeader {
                    dst_cid: 3,
                    ..hdr(OP_RW, 0)
                },
                PacketFault::Cid,
            ),
            (
                VsockHeader {
                    type_: 2,
                    ..hdr(OP_RW, 0)
                },
                PacketFault::Op,
            ),
            (hdr(0, 0), PacketFault::Op),
            (hdr(8, 0), PacketFault::Op),
            (hdr(0xffff, 0), PacketFault::Op),
        ];
        for (h, fault) in cases {
            let bytes = h.to_bytes();
            let err = parse_split(&m, &bytes, &[HDR_SIZE]).unwrap_err();
            assert_eq!(err.fault(), fault, "{h:?}");
        }
    }

    #[test]
    fn zero_length_chain_is_rejected() {
        let m = mem();
        let err = parse_split(&m, &[], &[0]).unwrap_err();
        assert!(matches!(err, PacketError::ShortHeader(0)));
    }

    #[test]
    fn descriptor_loop_is_rejected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&hdr(OP_RW, 0).to_bytes(), GuestAddress(DATA_BASE))
            .unwrap();
        // Descriptor 0 -> 1 -> 0 -> ...
        let d0 = SplitDescriptor::new(DATA_BASE, 44, VRING_DESC_F_NEXT as u16, 1);
        let d1 = SplitDescriptor::new(DATA_BASE, 44, VRING_DESC_F_NEXT as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
        vq.desc_table().store(1, RawDescriptor::from(d1)).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        use virtio_queue::QueueOwnedT;
        let chain = q.iter(&m).unwrap().next().unwrap();
        let err = read_tx_packet(&m, chain, GUEST_CID).unwrap_err();
        assert!(matches!(err, PacketError::BrokenChain), "{err}");
    }

    #[test]
    fn next_index_out_of_table_is_rejected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let d0 = SplitDescriptor::new(DATA_BASE, 44, VRING_DESC_F_NEXT as u16, 200);
        vq.desc_table().store(0, RawDescriptor::from(d0)).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        use virtio_queue::QueueOwnedT;
        let chain = q.iter(&m).unwrap().next().unwrap();
        let err = read_tx_packet(&m, chain, GUEST_CID).unwrap_err();
        assert!(matches!(err, PacketError::BrokenChain), "{err}");
    }

    #[test]
    fn head_index_outside_table_gives_empty_chain() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(200);
        vq.avail().idx().store(1);
        use virtio_queue::QueueOwnedT;
        let chain = q.iter(&m).unwrap().next().unwrap();
        let err = read_tx_packet(&m, chain.clone(), GUEST_CID).unwrap_err();
        assert!(matches!(err, PacketError::EmptyChain), "{err}");
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::EmptyChain)
        ));
    }

    #[test]
    fn out_of_range_address_is_rejected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        for (addr, len) in [
            (0x1000_0000u64, 44u32),
            (0x40_0000 - 20, 44),
            (u64::MAX - 10, 44),
        ] {
            let chain = vq.build_desc_chain(&[desc(addr, len, false)]).unwrap();
            let err = read_tx_packet(&m, chain, GUEST_CID).unwrap_err();
            assert!(matches!(err, PacketError::BadMemory(_)), "{addr:#x}: {err}");
            let chain = vq.build_desc_chain(&[desc(addr, len, true)]).unwrap();
            assert!(RxBuffer::new(&m, chain).is_err());
        }
    }

    #[test]
    fn wrong_direction_descriptors_are_rejected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&hdr(OP_RW, 0).to_bytes(), GuestAddress(DATA_BASE))
            .unwrap();
        // A tx chain that ends in a writable descriptor.
        let chain = vq
            .build_desc_chain(&[
                desc(DATA_BASE, 44, false),
                desc(DATA_BASE + 0x1000, 8, true),
            ])
            .unwrap();
        let err = read_tx_packet(&m, chain, GUEST_CID).unwrap_err();
        assert!(matches!(err, PacketError::WritableInTx));
        // An rx chain that starts with a readable descriptor.
        let chain = vq
            .build_desc_chain(&[
                desc(DATA_BASE, 44, false),
                desc(DATA_BASE + 0x1000, 4096, true),
            ])
            .unwrap();
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::ReadableInRx)
        ));
    }

    #[test]
    fn rx_buffer_too_small_is_rejected() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[
                desc(DATA_BASE, 20, true),
                desc(DATA_BASE + 0x1000, 23, true),
            ])
            .unwrap();
        assert!(matches!(
            RxBuffer::new(&m, chain),
            Err(PacketError::RxTooSmall(43))
        ));
    }

    #[test]
    fn rx_write_splits_header_across_descriptors() {
        let h = VsockHeader {
            src_cid: 2,
            dst_cid: 3,
            op: OP_RW,
            type_: TYPE_STREAM,
            ..Default::default()
        };
        for split in 1..HDR_SIZE as u64 {
            // Fresh rings each time: the mock's avail ring only holds 16.
            let m = mem();
            let vq = MockSplitQueue::new(&m, 16);
            let second = DATA_BASE + 0x1000;
            let chain = vq
                .build_desc_chain(&[desc(DATA_BASE, split as u32, true), desc(second, 100, true)])
                .unwrap();
            let buf = RxBuffer::new(&m, chain).unwrap();
            assert_eq!(buf.data_capacity(), split as usize + 100 - HDR_SIZE);
            let n = buf.write(&h, b"payload").unwrap();
            assert_eq!(n as usize, HDR_SIZE + 7);
            let mut raw = [0u8; HDR_SIZE + 7];
            m.read_slice(&mut raw[..split as usize], GuestAddress(DATA_BASE))
                .unwrap();
            m.read_slice(&mut raw[split as usize..], GuestAddress(second))
                .unwrap();
            let mut hb = [0u8; HDR_SIZE];
            hb.copy_from_slice(&raw[..HDR_SIZE]);
            assert_eq!(VsockHeader { len: 7, ..h }, VsockHeader::from_bytes(&hb));
            assert_eq!(&raw[HDR_SIZE..], b"payload");
        }
    }

    #[test]
    fn rx_write_refuses_more_than_capacity() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq.build_desc_chain(&[desc(DATA_BASE, 50, true)]).unwrap();
        let buf = RxBuffer::new(&m, chain).unwrap();
        assert!(buf.write(&VsockHeader::default(), &[0u8; 7]).is_err());
    }
}
