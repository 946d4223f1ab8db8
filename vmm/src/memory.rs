//! Guest memory: one memfd, mapped shared, so that a vhost-user back-end can
//! map the same pages later.

use crate::arch::layout::ram_ranges;
use crate::GuestMemoryMmap;
use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size guest memory to {size} bytes: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest memory: {0}")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions overlap or are empty")]
    Regions,
}

pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    /// The backing memfd; kept so it can be handed to vhost-user back-ends.
    pub memfd: File,
    pub size: u64,
}

/// The guest RAM memfd's name: `/memfd:microvm-guest-ram (deleted)` in
/// `/proc/<pid>/smaps` of the VMM and of every vhost-user back-end that
/// maps it (how `cri-bench` tells guest RAM from the VMM's own memory).
pub const GUEST_RAM_MEMFD_NAME: &CStr = c"microvm-guest-ram";

pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    let name = GUEST_RAM_MEMFD_NAME;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid and
    // the returned fd is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let memfd = unsafe { File::from_raw_fd(fd) };
    let ranges = ram_ranges(size);
    memfd
        .set_len(size)
        .map_err(|source| MemoryError::Truncate { size, source })?;
    let mut regions = Vec::with_capacity(ranges.len());
    let mut file_offset = 0u64;
    for (guest_base, len) in ranges {
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::Regions)?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, file_offset), len_usize)
            .map_err(MemoryError::Mmap)?;
        regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(guest_base)).ok_or(MemoryError::Regions)?,
        );
        file_offset += len;
    }
    let memory = GuestMemoryMmap::from_regions(regions).map_err(|_| MemoryError::Regions)?;
    Ok(GuestRam {
        memory,
        memfd,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_memfd_backed_and_usable() {
        let ram = create_guest_memory(32 << 20).unwrap();
        assert_eq!(ram.memory.num_regions(), 1);
        ram.memory
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&ram.memfd)
        ))
        .unwrap();
        assert!(
            link.to_string_lossy()
                .contains(&format!("memfd:{}", GUEST_RAM_MEMFD_NAME.to_string_lossy())),
            "{link:?}"
        );
        let total: u64 = ram.memory.iter().map(|r| r.len()).sum();
        assert_eq!(total, 32 << 20);
    }
}
