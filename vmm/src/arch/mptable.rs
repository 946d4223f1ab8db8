//! Intel MultiProcessor table (spec 1.4).
//!
//! Hand-written: no rust-vmm crate provides one, and a guest without ACPI
//! needs it to find its APs and the IOAPIC. Built as bytes with explicit
//! little-endian fields so no unsafe struct casting is needed.

use super::layout::{APIC_START, IOAPIC_PINS, IOAPIC_START, MPTABLE_START};
use crate::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

const MPC_SPEC_VERSION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const MP_FLOATING_POINTER_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("too many vCPUs for the MP table: {0}")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the MP floating pointer followed by the configuration table, as
/// they will sit at `MPTABLE_START`.
pub fn build(cpu_count: u8) -> Result<Vec<u8>, MptableError> {
    // The IOAPIC takes the APIC ID after the last CPU.
    if cpu_count == 0 || cpu_count >= 254 {
        return Err(MptableError::TooManyCpus(cpu_count));
    }
    let ioapic_id = cpu_count;
    let table_addr = MPTABLE_START as u32 + MP_FLOATING_POINTER_LEN as u32;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..cpu_count {
        let mut flags = CPU_ENABLED;
        if cpu == 0 {
            flags |= CPU_BOOTPROCESSOR;
        }
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        entry_count += 1;
    }
    // LINT0 is ExtINT (the PIC), LINT1 is NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC_VERSION);
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"MICROVM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(MP_FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&table_addr.to_le_bytes());
    floating.push(1); // length in 16-byte paragraphs
    floating.push(MPC_SPEC_VERSION);
    floating.push(0); // checksum, patched below
    floating.extend_from_slice(&[0; 5]); // feature bytes: config table present
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

pub fn write(mem: &GuestMemoryMmap, cpu_count: u8) -> Result<(), MptableError> {
    let bytes = build(cpu_count)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 8] {
            let bytes = build(cpus).unwrap();
            assert_eq!(&bytes[..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0);
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + IOAPIC_PINS as u16 + 2);
        }
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert!(build(0).is_err());
        assert!(build(254).is_err());
    }
}
