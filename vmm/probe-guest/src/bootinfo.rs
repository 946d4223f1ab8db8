//! What the boot loader handed over: the PVH `hvm_start_info` (EBX at the PVH
//! entry) or a Linux `boot_params` zero page (RSI at the 64-bit entry).

use core::ptr;

/// Which entry the stub came through; matches `BOOT_KIND_*` in `boot.s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    Pvh,
    Linux64,
    Unknown,
}

impl BootKind {
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            1 => Self::Pvh,
            2 => Self::Linux64,
            _ => Self::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Pvh => "pvh",
            Self::Linux64 => "linux64",
            Self::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub kind: BootKind,
    pub cmdline: &'static [u8],
    /// Sum of the usable RAM ranges in the memory map (0 when there is none).
    pub ram_bytes: u64,
    /// Set when the boot structure looked wrong; the probe reports it.
    pub problem: Option<&'static str>,
}

pub const PVH_START_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: usize = 4;
const PVH_CMDLINE_PADDR: usize = 24;
const PVH_MEMMAP_PADDR: usize = 40;
const PVH_MEMMAP_ENTRIES: usize = 48;
const PVH_MEMMAP_ENTRY_SIZE: usize = 24;

const ZP_EXT_CMD_LINE_PTR: usize = 0xc8;
const ZP_E820_ENTRIES: usize = 0x1e8;
const ZP_CMD_LINE_PTR: usize = 0x228;
const ZP_E820_TABLE: usize = 0x2d0;
const ZP_E820_ENTRY_SIZE: usize = 20;

const E820_RAM: u32 = 1;
/// More entries than any loader writes; bounds the walk over a garbage count.
const MAX_MEMMAP_ENTRIES: usize = 128;
const MAX_CMDLINE: usize = 4096;

/// Reads the boot structure at `info`.
///
/// # Safety
/// `info`, and the command line and memory map it points to, must be readable
/// at their physical addresses (the probe identity-maps 0-4 GiB) and not be
/// written while the returned command line is in use.
pub unsafe fn parse(kind: BootKind, info: u64) -> BootInfo {
    let base = info as usize as *const u8;
    let mut boot = BootInfo {
        kind,
        cmdline: &[],
        ram_bytes: 0,
        problem: None,
    };
    if base.is_null() {
        boot.problem = Some("no boot info pointer");
        return boot;
    }
    match kind {
        // SAFETY: the caller guarantees the structure and what it points to
        // are readable; the offsets are within the fixed-size structure.
        BootKind::Pvh => unsafe {
            if read::<u32>(base, 0) != PVH_START_MAGIC {
                boot.problem = Some("bad hvm_start_info magic");
                return boot;
            }
            boot.cmdline = c_string(read::<u64>(base, PVH_CMDLINE_PADDR));
            if read::<u32>(base, PVH_VERSION) >= 1 {
                let map = read::<u64>(base, PVH_MEMMAP_PADDR) as usize as *const u8;
                let entries = read::<u32>(base, PVH_MEMMAP_ENTRIES) as usize;
                boot.ram_bytes = ram_in_map(map, entries, PVH_MEMMAP_ENTRY_SIZE);
            }
        },
        // SAFETY: as above, for the 4 KiB zero page.
        BootKind::Linux64 => unsafe {
            let low = u64::from(read::<u32>(base, ZP_CMD_LINE_PTR));
            let high = u64::from(read::<u32>(base, ZP_EXT_CMD_LINE_PTR));
            boot.cmdline = c_string(high << 32 | low);
            let entries = usize::from(read::<u8>(base, ZP_E820_ENTRIES));
            boot.ram_bytes = ram_in_map(base.add(ZP_E820_TABLE), entries, ZP_E820_ENTRY_SIZE);
        },
        BootKind::Unknown => boot.problem = Some("unknown boot kind"),
    }
    boot
}

/// # Safety
/// `base + offset` must be readable for `size_of::<T>()` bytes.
unsafe fn read<T: Copy>(base: *const u8, offset: usize) -> T {
    // SAFETY: per the function's contract; unaligned reads are allowed.
    unsafe { ptr::read_unaligned(base.add(offset).cast::<T>()) }
}

/// Sums RAM entries of an e820-style map (`addr u64, size u64, type u32`).
///
/// # Safety
/// `map` must be readable for `entries * entry_size` bytes (capped).
unsafe fn ram_in_map(map: *const u8, entries: usize, entry_size: usize) -> u64 {
    if map.is_null() {
        return 0;
    }
    (0..entries.min(MAX_MEMMAP_ENTRIES))
        .map(|i| {
            // SAFETY: within the map per the caller.
            unsafe {
                let entry = map.add(i * entry_size);
                (read::<u64>(entry, 8), read::<u32>(entry, 16))
            }
        })
        .filter(|&(_, kind)| kind == E820_RAM)
        .fold(0u64, |sum, (size, _)| sum.saturating_add(size))
}

/// The NUL-terminated string at `addr`, at most `MAX_CMDLINE` bytes.
///
/// # Safety
/// `addr` must be readable up to its NUL or `MAX_CMDLINE` bytes, and stay
/// unchanged for the rest of the run.
unsafe fn c_string(addr: u64) -> &'static [u8] {
    let start = addr as usize as *const u8;
    if start.is_null() {
        return &[];
    }
    // SAFETY: per the function's contract.
    unsafe {
        let len = (0..MAX_CMDLINE)
            .find(|&i| start.add(i).read() == 0)
            .unwrap_or(MAX_CMDLINE);
        core::slice::from_raw_parts(start, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;
    use std::vec;
    use std::vec::Vec;

    fn put<T: Copy>(buf: &mut [u8], offset: usize, value: T) {
        let slot = &mut buf[offset..offset + core::mem::size_of::<T>()];
        // SAFETY: `slot` is exactly `size_of::<T>()` writable bytes.
        unsafe { ptr::write_unaligned(slot.as_mut_ptr().cast::<T>(), value) };
    }

    fn leak(bytes: Vec<u8>) -> u64 {
        Box::leak(bytes.into_boxed_slice()).as_ptr() as u64
    }

    #[test]
    fn pvh_start_info_gives_cmdline_and_ram() {
        let cmdline = leak(b"probe.quick=1 x\0junk".to_vec());
        let mut map = vec![0u8; 3 * PVH_MEMMAP_ENTRY_SIZE];
        put(&mut map, 8, 0x9fc00u64);
        put(&mut map, 16, E820_RAM);
        put(&mut map, 24 + 8, 0x1000u64);
        put(&mut map, 24 + 16, 2u32);
        put(&mut map, 48 + 8, 127u64 << 20);
        put(&mut map, 48 + 16, E820_RAM);
        let map = leak(map);
        let mut info = vec![0u8; 56];
        put(&mut info, 0, PVH_START_MAGIC);
        put(&mut info, PVH_VERSION, 1u32);
        put(&mut info, PVH_CMDLINE_PADDR, cmdline);
        put(&mut info, PVH_MEMMAP_PADDR, map);
        put(&mut info, PVH_MEMMAP_ENTRIES, 3u32);
        let info = leak(info);
        // SAFETY: all pointers come from leaked buffers above.
        let boot = unsafe { parse(BootKind::Pvh, info) };
        assert_eq!(boot.problem, None);
        assert_eq!(boot.cmdline, b"probe.quick=1 x");
        assert_eq!(boot.ram_bytes, 0x9fc00 + (127 << 20));
    }

    #[test]
    fn pvh_bad_magic_is_reported() {
        let info = leak(vec![0u8; 56]);
        // SAFETY: a leaked 56-byte buffer.
        let boot = unsafe { parse(BootKind::Pvh, info) };
        assert_eq!(boot.problem, Some("bad hvm_start_info magic"));
        assert!(boot.cmdline.is_empty());
    }

    #[test]
    fn zero_page_gives_cmdline_and_e820() {
        let cmdline = leak(b"console=ttyS0\0".to_vec());
        let mut zero_page = vec![0u8; 4096];
        put(&mut zero_page, ZP_CMD_LINE_PTR, cmdline as u32);
        put(&mut zero_page, ZP_EXT_CMD_LINE_PTR, (cmdline >> 32) as u32);
        put(&mut zero_page, ZP_E820_ENTRIES, 2u8);
        put(&mut zero_page, ZP_E820_TABLE + 8, 0x9fc00u64);
        put(&mut zero_page, ZP_E820_TABLE + 16, E820_RAM);
        put(&mut zero_page, ZP_E820_TABLE + 20 + 8, 64u64 << 20);
        put(&mut zero_page, ZP_E820_TABLE + 20 + 16, E820_RAM);
        let zero_page = leak(zero_page);
        // SAFETY: all pointers come from leaked buffers above.
        let boot = unsafe { parse(BootKind::Linux64, zero_page) };
        assert_eq!(boot.cmdline, b"console=ttyS0");
        assert_eq!(boot.ram_bytes, 0x9fc00 + (64 << 20));
    }

    #[test]
    fn unterminated_cmdline_is_capped() {
        let cmdline = leak(vec![b'a'; MAX_CMDLINE + 100]);
        // SAFETY: the buffer is longer than the cap.
        let text = unsafe { c_string(cmdline) };
        assert_eq!(text.len(), MAX_CMDLINE);
    }
}
