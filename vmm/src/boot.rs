//! Loading the kernel, initrd and command line, and writing boot parameters.
//!
//! ELF (vmlinux) images boot through PVH when they carry the PVH note, and
//! through the 64-bit Linux boot protocol otherwise; bzImages always use the
//! 64-bit protocol.

use crate::arch::layout::*;
use crate::arch::regs::EntryMode;
use crate::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{
    self, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use std::fs::File;
use std::path::{Path, PathBuf};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither a loadable vmlinux ELF nor a bzImage (ELF: {elf}; bzImage: {bzimage})")]
    BadKernel {
        path: PathBuf,
        elf: loader::Error,
        bzimage: loader::Error,
    },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot write initrd to guest memory: {0}")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
    #[error("invalid kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(#[source] loader::Error),
    #[error("cannot write boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// What the vCPU setup needs to know after loading.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: EntryMode,
    pub kernel_end: u64,
}

/// Top of the RAM block that holds the initrd: the end of low memory.
fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1
}

pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
) -> Result<(LoadedKernel, Option<boot_params>), BootError> {
    let open = || {
        File::open(path).map_err(|source| BootError::OpenKernel {
            path: path.to_owned(),
            source,
        })
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = Elf::load(mem, None, &mut open()?, himem);
    let result = match elf {
        Ok(result) => result,
        Err(elf_err) => match BzImage::load(mem, None, &mut open()?, himem) {
            Ok(result) => result,
            Err(bz_err) => {
                return Err(BootError::BadKernel {
                    path: path.to_owned(),
                    elf: elf_err,
                    bzimage: bz_err,
                })
            }
        },
    };
    Ok(entry_for(&result))
}

fn entry_for(result: &KernelLoaderResult) -> (LoadedKernel, Option<boot_params>) {
    let kernel_end = result.kernel_end;
    if let Some(header) = result.setup_header {
        // bzImage: protected-mode code at kernel_load, 64-bit entry 0x200 in.
        let params = boot_params {
            hdr: header,
            ..Default::default()
        };
        let entry = result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET;
        return (
            LoadedKernel {
                entry: EntryMode::Long64 { entry },
                kernel_end,
            },
            Some(params),
        );
    }
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => EntryMode::Pvh {
            entry: addr.raw_value(),
        },
        _ => EntryMode::Long64 {
            entry: result.kernel_load.raw_value(),
        },
    };
    (LoadedKernel { entry, kernel_end }, None)
}

/// Places the initrd page-aligned at the top of low RAM.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    })?;
    let size = data.len() as u64;
    let limit = low_ram_end(mem);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(BootError::WriteInitrd)?;
    Ok((addr, size))
}

/// e820 map: low RAM up to the EBDA, the EBDA reserved, RAM from 1 MiB, and
/// RAM above 4 GiB if any.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    let low_end = low_ram_end(mem);
    map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    let last = mem.last_addr().raw_value() + 1;
    if last > MMIO_GAP_END {
        map.push((MMIO_GAP_END, last - MMIO_GAP_END, E820_RAM));
    }
    map
}

pub struct BootSetup<'a> {
    pub kernel: LoadedKernel,
    pub bzimage_params: Option<boot_params>,
    pub cmdline: &'a Cmdline,
    pub initrd: Option<(u64, u64)>,
}

/// Writes the command line and the boot parameters for the entry protocol.
pub fn write_boot_params(mem: &GuestMemoryMmap, setup: BootSetup<'_>) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), setup.cmdline)
        .map_err(BootError::LoadCmdline)?;
    let cmdline_size = setup.cmdline.as_cstring()?.as_bytes_with_nul().len() as u32;
    match setup.kernel.entry {
        EntryMode::Pvh { .. } => write_pvh_start_info(mem, setup.initrd),
        EntryMode::Long64 { .. } => {
            let mut params = setup.bzimage_params.unwrap_or_default();
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_size;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            if let Some((addr, size)) = setup.initrd {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            let map = e820_map(mem);
            for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
                *slot = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *kind,
                };
            }
            params.e820_entries = map.len() as u8;
            let boot = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
                .map_err(BootError::BootParams)
        }
    }
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem)
        .into_iter()
        .map(|(addr, size, kind)| hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut boot = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_START));
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        boot.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("microvm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("garbage");
        std::fs::write(&path, vec![0x5au8; 4096]).unwrap();
        let err = load_kernel(&ram.memory, &path).unwrap_err().to_string();
        assert!(
            err.contains("neither a loadable vmlinux ELF nor a bzImage"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_and_must_fit() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let dir = std::env::temp_dir().join(format!("microvm-initrd-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small");
        std::fs::write(&small, vec![1u8; 10_000]).unwrap();
        let (addr, size) = load_initrd(&ram.memory, &small, 0x20_0000).unwrap();
        assert_eq!(size, 10_000);
        assert_eq!(addr & 0xfff, 0);
        assert!(addr + size <= 32 << 20);
        let big = dir.join("big");
        std::fs::write(&big, vec![1u8; 31 << 20]).unwrap();
        let err = load_initrd(&ram.memory, &big, 0x20_0000).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn e820_has_ebda_hole_and_high_ram() {
        let ram = create_guest_memory(64 << 20).unwrap();
        let map = e820_map(&ram.memory);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
        assert_eq!(map.len(), 3);
    }

    #[test]
    fn pvh_start_info_is_written() {
        let ram = create_guest_memory(32 << 20).unwrap();
        write_pvh_start_info(&ram.memory, Some((0x100_0000, 0x1000))).unwrap();
        let info: hvm_start_info = ram.memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = ram
            .memory
            .read_obj(GuestAddress(PVH_MODLIST_START))
            .unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 0x1000));
    }
}
