//! The VMM's loader on the real guest kernel (no KVM needed): the vmlinux
//! boots through PVH, the bzImage through the 64-bit protocol, and the boot
//! parameters written for each are what the kernel expects.

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::hvm_start_info;
use microvm_guest_image::kernel::kernel;
use microvm_vmm::arch::layout::{CMDLINE_START, HIMEM_START, PVH_INFO_START, ZERO_PAGE_START};
use microvm_vmm::arch::regs::EntryMode;
use microvm_vmm::boot::{load_kernel, write_boot_params, BootSetup};
use microvm_vmm::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};

fn cmdline() -> Cmdline {
    Cmdline::try_from("console=ttyS0 quiet", 4096).unwrap()
}

#[test]
fn guest_vmlinux_boots_through_pvh() {
    let artifacts = kernel().expect("guest kernel (built and cached by microvm-image)");
    let ram = create_guest_memory(256 << 20).unwrap();
    let (loaded, params) = load_kernel(&ram.memory, &artifacts.vmlinux).unwrap();
    assert!(params.is_none());
    let EntryMode::Pvh { entry } = loaded.entry else {
        panic!(
            "vmlinux has a PVH note, expected PVH entry, got {:?}",
            loaded.entry
        )
    };
    assert!(
        entry >= HIMEM_START && entry < loaded.kernel_end,
        "entry {entry:#x}"
    );
    let cmdline = cmdline();
    write_boot_params(
        &ram.memory,
        BootSetup {
            kernel: loaded,
            bzimage_params: params,
            cmdline: &cmdline,
            initrd: Some((0x800_0000, 4096)),
        },
    )
    .unwrap();
    let info: hvm_start_info = ram.memory.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!(info.nr_modules, 1);
    let mut text = vec![0u8; 19];
    ram.memory
        .read_slice(&mut text, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(&text, b"console=ttyS0 quiet");
}

#[test]
fn guest_bzimage_boots_through_the_64bit_protocol() {
    let artifacts = kernel().expect("guest kernel (built and cached by microvm-image)");
    let ram = create_guest_memory(256 << 20).unwrap();
    let (loaded, params) = load_kernel(&ram.memory, &artifacts.bz_image).unwrap();
    let EntryMode::Long64 { entry } = loaded.entry else {
        panic!("bzImage must use the 64-bit entry, got {:?}", loaded.entry)
    };
    assert_eq!(entry, HIMEM_START + 0x200);
    let header = params.expect("bzImage setup header").hdr;
    assert_eq!({ header.header }, 0x5372_6448, "HdrS magic");
    let cmdline = cmdline();
    write_boot_params(
        &ram.memory,
        BootSetup {
            kernel: loaded,
            bzimage_params: params,
            cmdline: &cmdline,
            initrd: None,
        },
    )
    .unwrap();
    let zero_page: boot_params = ram.memory.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ zero_page.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ zero_page.hdr.type_of_loader }, 0xff);
    assert_eq!(zero_page.e820_entries, 3);
    assert_eq!({ zero_page.e820_table[2].addr }, HIMEM_START);
}
