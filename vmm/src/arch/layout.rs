//! Guest physical memory layout. One place, so the loader, the device manager
//! and the probe guest agree.

/// GDT used for the boot CPU (64-bit and PVH entry alike).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6400;
/// Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot stack top for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry (first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum size.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// The MP table sits in what a PC calls the EBDA.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of the low RAM block that the e820 map reports below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Everything from here to 4 GiB is MMIO: virtio devices, IOAPIC, LAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio slots: `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const VIRTIO_MMIO_MAX_DEVICES: usize = 16;
/// Legacy IRQs 0-4 are taken (timer, keyboard, cascade, COM2, COM1); virtio
/// devices get 5 onwards, one each.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel hosts; put them at the top of
/// the MMIO gap, out of the guest's way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest RAM ranges for `size` bytes: below the MMIO gap first, then above
/// 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut regions = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x40),
            (PVH_MEMMAP_START, 0x3c0),
            (PVH_MODLIST_START, 0x100),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x400),
        ];
        regions.sort();
        for pair in regions.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        const {
            assert!(
                BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000
            )
        };
    }
}
