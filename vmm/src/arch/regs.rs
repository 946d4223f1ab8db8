//! Initial vCPU state: registers, segments, page tables, FPU, MSRs, LAPIC.

use super::layout::*;
use crate::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot tables to guest memory: {0}")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    MsrsPartial { set: usize, wanted: usize },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Long64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit (the Intel SDM layout).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry & 0x0000_0000_0000_ffff) | ((entry & 0x000f_0000_0000_0000) >> 32)) as u32;
    let granular = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if granular == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// Boot GDT: null, code, data, TSS. The code entry is 64-bit (L=1) for the
/// Linux 64-bit entry and 32-bit (D=1) for PVH.
fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Long64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, IDT and (for 64-bit entry) identity page tables, and
/// returns the special registers that go with them.
pub fn boot_sregs(
    mem: &GuestMemoryMmap,
    mode: EntryMode,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, RegsError> {
    let gdt = boot_gdt(mode);
    for (index, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + index as u64 * 8))
            .map_err(RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Memory)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    match mode {
        EntryMode::Long64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first 1 GiB with 2 MiB pages: enough for the kernel to
/// reach its own page-table setup.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(RegsError::Memory)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(RegsError::Memory)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(RegsError::Memory)?;
    }
    Ok(())
}

pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    match mode {
        EntryMode::Long64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 0x1;

/// The MSRs a freshly reset CPU would have, restricted to the ones this KVM
/// supports (`supported` from KVM_GET_MSR_INDEX_LIST).
pub fn boot_msr_entries(supported: &[u32]) -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ]
    .into_iter()
    .filter(|(index, _)| supported.contains(index))
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), RegsError> {
    let entries = boot_msr_entries(supported);
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrsPartial {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::MsrsPartial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 → ExtINT (the legacy PIC), LINT1 → NMI, as a PC firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = read_lapic_reg(&lapic.regs, offset);
        write_lapic_reg(&mut lapic.regs, offset, set_apic_delivery_mode(reg, mode));
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

fn read_lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        regs[offset + i] = byte as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_decode_to_the_expected_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.l, code64.db, code64.type_, code64.present),
            (1, 0, 0xb, 1)
        );
        assert_eq!(
            (code64.selector, code64.limit, code64.g),
            (8, 0xffff_ffff, 1)
        );
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.selector, data.s), (3, 16, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_and_page_tables() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let sregs = boot_sregs(
            &ram.memory,
            EntryMode::Long64 { entry: 0x100_0000 },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let pde1: u64 = ram.memory.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde1, (1 << 21) | 0x83);
        let regs = boot_regs(EntryMode::Long64 { entry: 0x100_0000 });
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, ZERO_PAGE_START));
    }

    #[test]
    fn pvh_sregs_are_flat_32_bit_without_paging() {
        let ram = create_guest_memory(32 << 20).unwrap();
        let sregs = boot_sregs(
            &ram.memory,
            EntryMode::Pvh { entry: 0x10_0000 },
            kvm_sregs::default(),
        )
        .unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l, sregs.efer), (1, 0, 0));
        assert_eq!(
            boot_regs(EntryMode::Pvh { entry: 0x10_0000 }).rbx,
            PVH_INFO_START
        );
    }

    #[test]
    fn msrs_are_filtered_by_support() {
        let all = boot_msr_entries(&[MSR_IA32_TSC, MSR_IA32_MISC_ENABLE]);
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].data, MISC_ENABLE_FAST_STRING);
    }

    #[test]
    fn lapic_delivery_mode_is_replaced() {
        assert_eq!(
            set_apic_delivery_mode(0x0001_0700, APIC_MODE_NMI),
            0x0001_0400
        );
        let mut regs = [0 as std::os::raw::c_char; 1024];
        write_lapic_reg(&mut regs, APIC_LVT1, 0x1234_5678);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT1), 0x1234_5678);
    }
}
