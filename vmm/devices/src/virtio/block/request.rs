//! One virtio-blk request: parse a descriptor chain of any shape with
//! virtio-queue's Reader/Writer and run it against a [`DiskBackend`].
//! Pure logic, no event loop; tested in plain memory.

use crate::virtio::util::{chain_shape, ChainError};
use crate::GuestMemoryMmap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};

pub const SECTOR_SIZE: u64 = 512;
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the bounce buffer between guest memory and the disk: requests are
/// copied in pieces of this size, whatever length the guest asks for.
pub const IO_CHUNK: usize = 64 * 1024;
const HEADER_LEN: usize = 16;

/// Positional I/O on the disk image.
pub trait DiskBackend: Send {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable.
    fn flush(&mut self) -> io::Result<()>;
}

impl DiskBackend for File {
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// What the disk looks like to a request.
pub struct Disk {
    pub backend: Box<dyn DiskBackend>,
    /// Whole sectors only: a trailing partial sector is not addressable.
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub id: [u8; ID_BYTES],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(raw: u32) -> Self {
        match raw {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed descriptor chain")]
    Chain(#[from] ChainError),
    #[error("descriptor chain names memory outside the guest")]
    Memory(#[source] virtio_queue::Error),
    #[error("no device-writable byte for the status")]
    NoStatus,
    #[error("request header is shorter than 16 bytes")]
    ShortHeader,
    #[error("{0:?} request has data buffers in the wrong direction")]
    WrongDirection(RequestType),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    #[error("sectors {sector}+{len} bytes are past the end of the disk")]
    OutOfRange { sector: u64, len: usize },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("copy between guest memory and the bounce buffer failed")]
    GuestCopy(#[source] io::Error),
    #[error("disk I/O failed")]
    Disk(#[source] io::Error),
}

impl RequestError {
    /// True when the guest built a bad request (as opposed to a host failure
    /// or a legitimate refusal).
    pub fn is_guest_fault(&self) -> bool {
        !matches!(self, Self::Disk(_) | Self::ReadOnly)
    }
}

/// The result of one request, for the used ring and the metrics.
#[derive(Debug)]
pub struct Completion {
    /// Bytes written into the chain (data plus status), for the used ring.
    pub used_len: u32,
    /// The status byte written, if the chain had room for one.
    pub status: Option<u8>,
    pub request: Option<RequestType>,
    /// Data bytes moved to or from the disk.
    pub data_bytes: u64,
    pub error: Option<RequestError>,
}

/// Executes the request in `chain`. Never panics; every failure the guest
/// can cause becomes an IOERR status (if there is room for one) and an error.
pub fn execute(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut Disk,
    buf: &mut [u8],
) -> Completion {
    let mut completion = Completion {
        used_len: 0,
        status: None,
        request: None,
        data_bytes: 0,
        error: None,
    };
    if let Err(e) = chain_shape(&chain) {
        completion.error = Some(e.into());
        return completion;
    }
    let mut writer = match Writer::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            completion.error = Some(RequestError::Memory(e));
            return completion;
        }
    };
    let Some(status_at) = writer.available_bytes().checked_sub(1) else {
        completion.error = Some(RequestError::NoStatus);
        return completion;
    };
    let mut status_writer = match writer.split_at(status_at) {
        Ok(w) => w,
        Err(e) => {
            completion.error = Some(RequestError::Memory(e));
            return completion;
        }
    };

    let result = Reader::new(mem, chain)
        .map_err(RequestError::Memory)
        .and_then(|mut reader| run(&mut reader, &mut writer, disk, buf, &mut completion));
    let status = match result {
        Ok(status) => status,
        Err(e) => {
            completion.error = Some(e);
            VIRTIO_BLK_S_IOERR as u8
        }
    };
    if status_writer.write_all(&[status]).is_ok() {
        completion.status = Some(status);
    }
    let written = writer.bytes_written() + status_writer.bytes_written();
    completion.used_len = u32::try_from(written).unwrap_or(u32::MAX);
    completion
}

fn run(
    reader: &mut Reader,
    writer: &mut Writer,
    disk: &mut Disk,
    buf: &mut [u8],
    completion: &mut Completion,
) -> Result<u8, RequestError> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::ShortHeader)?;
    let (raw_type, sector) = parse_header(&header);
    let request = RequestType::from_raw(raw_type);
    completion.request = Some(request);
    match request {
        RequestType::In => {
            if reader.available_bytes() != 0 {
                return Err(RequestError::WrongDirection(request));
            }
            let len = writer.available_bytes();
            let offset = checked_range(disk, sector, len)?;
            copy_disk_to_guest(disk, offset, len, writer, buf, completion)?;
        }
        RequestType::Out => {
            if disk.read_only {
                return Err(RequestError::ReadOnly);
            }
            if writer.available_bytes() != 0 {
                return Err(RequestError::WrongDirection(request));
            }
            let len = reader.available_bytes();
            let offset = checked_range(disk, sector, len)?;
            copy_guest_to_disk(disk, offset, len, reader, buf, completion)?;
        }
        RequestType::Flush => {
            if !disk.read_only {
                disk.backend.flush().map_err(RequestError::Disk)?;
            }
        }
        RequestType::GetId => {
            let len = writer.available_bytes().min(ID_BYTES);
            writer
                .write_all(&disk.id[..len])
                .map_err(RequestError::GuestCopy)?;
        }
        RequestType::Unsupported(_) => return Ok(VIRTIO_BLK_S_UNSUPP as u8),
    }
    Ok(VIRTIO_BLK_S_OK as u8)
}

fn parse_header(header: &[u8; HEADER_LEN]) -> (u32, u64) {
    let mut raw_type = [0u8; 4];
    raw_type.copy_from_slice(&header[0..4]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    (u32::from_le_bytes(raw_type), u64::from_le_bytes(sector))
}

/// Returns the byte offset of `sector` if `len` bytes from there fit the disk.
fn checked_range(disk: &Disk, sector: u64, len: usize) -> Result<u64, RequestError> {
    if len as u64 % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned(len));
    }
    let end_sector = sector.checked_add(len as u64 / SECTOR_SIZE);
    match end_sector {
        Some(end) if end <= disk.capacity_sectors => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange { sector, len }),
    }
}

fn copy_disk_to_guest(
    disk: &mut Disk,
    mut offset: u64,
    len: usize,
    writer: &mut Writer,
    buf: &mut [u8],
    completion: &mut Completion,
) -> Result<(), RequestError> {
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        disk.backend
            .read_exact_at(&mut buf[..n], offset)
            .map_err(RequestError::Disk)?;
        writer
            .write_all(&buf[..n])
            .map_err(RequestError::GuestCopy)?;
        completion.data_bytes += n as u64;
        offset += n as u64;
        left -= n;
    }
    Ok(())
}

fn copy_guest_to_disk(
    disk: &mut Disk,
    mut offset: u64,
    len: usize,
    reader: &mut Reader,
    buf: &mut [u8],
    completion: &mut Completion,
) -> Result<(), RequestError> {
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        reader
            .read_exact(&mut buf[..n])
            .map_err(RequestError::GuestCopy)?;
        disk.backend
            .write_all_at(&buf[..n], offset)
            .map_err(RequestError::Disk)?;
        completion.data_bytes += n as u64;
        offset += n as u64;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        build_chain, guest_memory, read_guest, write_guest, RawDesc, MEM_SIZE,
    };
    use std::sync::{Arc, Mutex};
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const W: u32 = VRING_DESC_F_WRITE;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    /// An in-memory disk shared with the test, recording flushes.
    #[derive(Clone, Default)]
    pub(crate) struct MemDisk {
        pub data: Arc<Mutex<Vec<u8>>>,
        pub flushes: Arc<Mutex<u32>>,
        pub fail: bool,
    }

    impl DiskBackend for MemDisk {
        fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let data = self.data.lock().unwrap();
            let start = offset as usize;
            buf.copy_from_slice(&data[start..start + buf.len()]);
            Ok(())
        }
        fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("injected"));
            }
            let mut data = self.data.lock().unwrap();
            let start = offset as usize;
            data[start..start + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }

    fn disk(sectors: u64, read_only: bool) -> (Disk, MemDisk) {
        let backend = MemDisk::default();
        *backend.data.lock().unwrap() = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        let mut id = [0u8; ID_BYTES];
        id[..6].copy_from_slice(b"disk-7");
        (
            Disk {
                backend: Box::new(backend.clone()),
                capacity_sectors: sectors,
                read_only,
                id,
            },
            backend,
        )
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, raw_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&raw_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        write_guest(mem, addr, &h);
    }

    fn run_chain(mem: &GuestMemoryMmap, disk: &mut Disk, descs: &[RawDesc]) -> Completion {
        let (_q, chain) = build_chain(mem, descs);
        let mut buf = vec![0u8; IO_CHUNK];
        execute(mem, chain, disk, &mut buf)
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        read_guest(mem, STATUS, 1)[0]
    }

    #[test]
    fn read_returns_disk_data() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
        write_guest(&mem, STATUS, &[0xff]);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 1024, W),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert!(c.error.is_none(), "{:?}", c.error);
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
        assert_eq!(c.used_len, 1025);
        assert_eq!(c.data_bytes, 1024);
        let expected = backend.data.lock().unwrap()[1024..2048].to_vec();
        assert_eq!(read_guest(&mem, DATA, 1024), expected);
    }

    #[test]
    fn write_stores_guest_data() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 7);
        write_guest(&mem, DATA, &[0xab; 512]);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 512, 0),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(c.used_len, 1);
        assert_eq!(&backend.data.lock().unwrap()[7 * 512..], &[0xab; 512][..]);
    }

    #[test]
    fn merged_and_split_descriptors_work() {
        // Header and data in one readable descriptor, data split over two
        // descriptors at odd boundaries, status in the same writable buffer
        // as nothing else.
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        write_guest(&mem, HDR + 16, &[0x5a; 1024]);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16 + 100, 0),
                RawDesc::new(HDR + 116, 924, 0),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8), "{:?}", c.error);
        assert_eq!(&backend.data.lock().unwrap()[512..1536], &[0x5a; 1024][..]);

        // A read whose data and status share one writable descriptor.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 8, 0),
                RawDesc::new(HDR + 8, 8, 0),
                RawDesc::new(DATA, 513, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8), "{:?}", c.error);
        assert_eq!(read_guest(&mem, DATA, 512), vec![0x5a; 512]);
        assert_eq!(read_guest(&mem, DATA + 512, 1)[0], VIRTIO_BLK_S_OK as u8);
    }

    #[test]
    fn large_read_is_chunked() {
        let mem = guest_memory();
        let sectors = 2 * (IO_CHUNK as u64 / 512) + 8;
        let (mut d, backend) = disk(sectors, false);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let len = (sectors * 512) as u32;
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, len, W),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(
            read_guest(&mem, DATA, len as usize),
            *backend.data.lock().unwrap()
        );
    }

    #[test]
    fn flush_syncs_and_get_id_returns_serial() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let c = run_chain(
            &mem,
            &mut d,
            &[RawDesc::new(HDR, 16, 0), RawDesc::new(STATUS, 1, W)],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(*backend.flushes.lock().unwrap(), 1);

        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        write_guest(&mem, DATA, &[0xff; 20]);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 20, W),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK as u8));
        assert_eq!(c.used_len, 21);
        let mut expected = b"disk-7".to_vec();
        expected.resize(20, 0);
        assert_eq!(read_guest(&mem, DATA, 20), expected);
    }

    #[test]
    fn read_only_refuses_writes() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, true);
        let before = backend.data.lock().unwrap().clone();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 512, 0),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert!(matches!(c.error, Some(RequestError::ReadOnly)));
        assert_eq!(*backend.data.lock().unwrap(), before);
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let mem = guest_memory();
        let (mut d, _) = disk(8, false);
        header(&mem, HDR, 11, 0);
        let c = run_chain(
            &mem,
            &mut d,
            &[RawDesc::new(HDR, 16, 0), RawDesc::new(STATUS, 1, W)],
        );
        assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(c.request, Some(RequestType::Unsupported(11)));
        assert!(c.error.is_none());
    }

    #[test]
    fn out_of_range_and_unaligned_get_ioerr() {
        let mem = guest_memory();
        let (mut d, _) = disk(8, false);
        for (sector, len) in [(7u64, 1024u32), (8, 512), (u64::MAX, 512), (0, 100)] {
            header(&mem, HDR, VIRTIO_BLK_T_IN, sector);
            write_guest(&mem, DATA, &[0xee; 1024]);
            let c = run_chain(
                &mem,
                &mut d,
                &[
                    RawDesc::new(HDR, 16, 0),
                    RawDesc::new(DATA, len, W),
                    RawDesc::new(STATUS, 1, W),
                ],
            );
            assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8, "{sector} {len}");
            assert!(c.error.unwrap().is_guest_fault());
            // Nothing was copied into the guest.
            assert_eq!(read_guest(&mem, DATA, 1024), vec![0xee; 1024]);
        }
    }

    #[test]
    fn disk_failure_is_ioerr_not_guest_fault() {
        let mem = guest_memory();
        let (mut d, mut backend) = disk(8, false);
        backend.fail = true;
        d.backend = Box::new(backend);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 512, W),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert_eq!(c.status, Some(VIRTIO_BLK_S_IOERR as u8));
        assert!(!c.error.unwrap().is_guest_fault());
    }

    #[test]
    fn hostile_chains_are_rejected() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        let before = backend.data.lock().unwrap().clone();
        let cases: Vec<(&str, Vec<RawDesc>)> = vec![
            (
                "loop",
                vec![
                    RawDesc::linked(HDR, 16, VRING_DESC_F_NEXT, 1),
                    RawDesc::linked(STATUS, 1, W | VRING_DESC_F_NEXT, 0),
                ],
            ),
            (
                "next out of table",
                vec![RawDesc::linked(HDR, 16, VRING_DESC_F_NEXT, 500)],
            ),
            (
                "data outside memory",
                vec![
                    RawDesc::new(HDR, 16, 0),
                    RawDesc::new(0xffff_ffff_0000, 512, W),
                    RawDesc::new(STATUS, 1, W),
                ],
            ),
            (
                "huge length",
                vec![
                    RawDesc::new(HDR, 16, 0),
                    RawDesc::new(DATA, u32::MAX, W),
                    RawDesc::new(STATUS, 1, W),
                ],
            ),
            ("zero length", vec![RawDesc::new(HDR, 0, 0)]),
            (
                "status readable",
                vec![RawDesc::new(HDR, 16, 0), RawDesc::new(STATUS, 1, 0)],
            ),
            (
                "header writable",
                vec![RawDesc::new(HDR, 16, W), RawDesc::new(STATUS, 1, W)],
            ),
        ];
        for (name, descs) in cases {
            header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
            let c = run_chain(&mem, &mut d, &descs);
            let err = c.error.unwrap_or_else(|| panic!("{name}: accepted"));
            assert!(err.is_guest_fault(), "{name}: {err}");
            assert_ne!(c.status, Some(VIRTIO_BLK_S_OK as u8), "{name}");
        }
        assert_eq!(*backend.data.lock().unwrap(), before);
    }

    #[test]
    fn wrong_direction_data_is_rejected() {
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        let before = backend.data.lock().unwrap().clone();
        // A read whose data buffer is device-readable.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        write_guest(&mem, DATA, &[0x11; 512]);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 512, 0),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert!(matches!(c.error, Some(RequestError::WrongDirection(_))));
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(read_guest(&mem, DATA, 512), vec![0x11; 512]);
        // A write whose data buffer is device-writable.
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let c = run_chain(
            &mem,
            &mut d,
            &[
                RawDesc::new(HDR, 16, 0),
                RawDesc::new(DATA, 512, W),
                RawDesc::new(STATUS, 1, W),
            ],
        );
        assert!(matches!(c.error, Some(RequestError::WrongDirection(_))));
        assert_eq!(read_guest(&mem, DATA, 512), vec![0x11; 512]);
        assert_eq!(*backend.data.lock().unwrap(), before);
    }

    #[test]
    fn random_chains_only_touch_writable_buffers() {
        // A small fuzz loop: random descriptor tables (random directions,
        // links, lengths and addresses, some outside memory). The request
        // may fail any way it likes, but bytes may only change inside
        // device-writable descriptors, and the disk only on success.
        const WINDOW: u64 = 0x10_0000;
        const WINDOW_LEN: usize = 0x4000;
        let mem = guest_memory();
        let (mut d, backend) = disk(8, false);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut succeeded = 0;
        for _ in 0..3000 {
            // Eight table entries, links among them only, so every
            // descriptor the chain can reach is in `descs`.
            let descs: Vec<RawDesc> = (0..8)
                .map(|_| {
                    let r = next();
                    let addr = match r % 16 {
                        0 => 0xffff_ffff_f000,
                        1 => MEM_SIZE as u64 - 8,
                        _ => WINDOW + (r >> 8) % (WINDOW_LEN as u64 - 0x400),
                    };
                    let len = match (r >> 4) % 16 {
                        0 => u32::MAX,
                        1 => 0,
                        _ => ((r >> 20) % 0x400) as u32,
                    };
                    let flags = ((r >> 32) % 4) as u32; // NEXT and/or WRITE
                    RawDesc::linked(addr, len, flags, ((r >> 40) % 8) as u16)
                })
                .collect();
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&[0u32, 1, 4, 8, 99][(next() % 5) as usize].to_le_bytes());
            h[8..16].copy_from_slice(&(next() % 10).to_le_bytes());
            if descs[0].addr >= WINDOW && descs[0].addr < WINDOW + WINDOW_LEN as u64 - 16 {
                write_guest(&mem, descs[0].addr, &h);
            }
            let before = read_guest(&mem, WINDOW, WINDOW_LEN + 0x1000);
            let disk_before = backend.data.lock().unwrap().clone();
            let c = run_chain(&mem, &mut d, &descs);
            let after = read_guest(&mem, WINDOW, WINDOW_LEN + 0x1000);
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                if b == a {
                    continue;
                }
                let addr = WINDOW + i as u64;
                let inside = descs.iter().any(|d| {
                    d.flags & W as u16 != 0
                        && addr >= d.addr
                        && addr < d.addr.saturating_add(u64::from(d.len))
                });
                assert!(
                    inside,
                    "byte {addr:#x} changed outside writable buffers: {descs:?}"
                );
            }
            if c.status == Some(VIRTIO_BLK_S_OK as u8) {
                succeeded += 1;
            } else {
                assert_eq!(*backend.data.lock().unwrap(), disk_before);
            }
            assert!(c.used_len as usize <= descs.iter().map(|d| d.len as usize).sum::<usize>());
        }
        // The generator must reach the execution paths, not only rejections.
        println!("{succeeded} of 3000 random requests succeeded");
        assert!(succeeded > 30, "{succeeded}");
    }
}
