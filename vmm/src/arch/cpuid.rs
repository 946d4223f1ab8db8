//! CPUID: start from what KVM supports, then normalise it for a VM.

use crate::config::CpuTemplate;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_EXTENDED_FEATURES: u32 = 0x7;
const LEAF_PERF_MON: u32 = 0xa;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;

const ECX_HYPERVISOR_BIT: u32 = 1 << 31;
const EDX_HTT_BIT: u32 = 1 << 28;

/// Baseline template: leaf 7.0 EBX bits masked (HLE, RTM, MPX, AVX-512
/// F/DQ/IFMA/PF/ER/CD/BW/VL).
const BASELINE_LEAF7_EBX_MASK: u32 = (1 << 4)
    | (1 << 11)
    | (1 << 14)
    | (1 << 16)
    | (1 << 17)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 30)
    | (1 << 31);
/// Leaf 7.0 ECX: AVX512_VBMI, PKU, OSPKE, AVX512_VBMI2, AVX512_VNNI, BITALG, VPOPCNTDQ.
const BASELINE_LEAF7_ECX_MASK: u32 =
    (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);

/// Rewrites the host-supported CPUID for vCPU `cpu_index` of `cpu_count`.
pub fn normalize(cpuid: &mut CpuId, cpu_index: u8, cpu_count: u8, template: CpuTemplate) {
    for entry in cpuid.as_mut_slice() {
        normalize_entry(entry, cpu_index, cpu_count, template);
    }
}

fn normalize_entry(
    entry: &mut kvm_cpuid_entry2,
    cpu_index: u8,
    cpu_count: u8,
    template: CpuTemplate,
) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, EBX[23:16] logical processor count.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            entry.ecx |= ECX_HYPERVISOR_BIT;
            if cpu_count > 1 {
                entry.edx |= EDX_HTT_BIT;
            } else {
                entry.edx &= !EDX_HTT_BIT;
            }
        }
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26]: cores per package minus one; every vCPU is a core.
            entry.eax = (entry.eax & 0x03ff_ffff) | (count.saturating_sub(1) << 26);
            // EAX[25:14]: logical processors sharing this cache minus one.
            entry.eax = (entry.eax & !(0xfff << 14)) | (count.saturating_sub(1) << 14);
        }
        LEAF_EXTENDED_FEATURES if entry.index == 0 && template == CpuTemplate::Baseline => {
            entry.ebx &= !BASELINE_LEAF7_EBX_MASK;
            entry.ecx &= !BASELINE_LEAF7_ECX_MASK;
        }
        // No virtual PMU is offered, so say so rather than leak the host's.
        LEAF_PERF_MON => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_EXTENDED_TOPOLOGY => {
            entry.edx = apic_id;
            match entry.index {
                // SMT level: one thread per core.
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = (1 << 8) | entry.index;
                }
                // Core level: all vCPUs in one package.
                1 => {
                    entry.eax = 32 - count.next_power_of_two().leading_zeros() - 1;
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_counts_are_per_vcpu() {
        let mut leaf1 = entry(LEAF_FEATURES, 0);
        normalize_entry(&mut leaf1, 3, 4, CpuTemplate::Host);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR_BIT, 0);
        let mut single = entry(LEAF_FEATURES, 0);
        normalize_entry(&mut single, 0, 1, CpuTemplate::Host);
        assert_eq!(single.edx & EDX_HTT_BIT, 0);
        let mut topo = entry(LEAF_EXTENDED_TOPOLOGY, 1);
        normalize_entry(&mut topo, 2, 4, CpuTemplate::Host);
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 4, 2));
    }

    #[test]
    fn baseline_masks_avx512_and_tsx_but_host_does_not() {
        let mut host = entry(LEAF_EXTENDED_FEATURES, 0);
        normalize_entry(&mut host, 0, 1, CpuTemplate::Host);
        assert_eq!(host.ebx, 0xffff_ffff);
        let mut baseline = entry(LEAF_EXTENDED_FEATURES, 0);
        normalize_entry(&mut baseline, 0, 1, CpuTemplate::Baseline);
        assert_eq!(baseline.ebx & (1 << 16), 0, "AVX512F");
        assert_eq!(baseline.ebx & (1 << 11), 0, "RTM");
        assert_ne!(baseline.ebx & (1 << 5), 0, "AVX2 stays");
        assert_eq!(baseline.ecx & (1 << 3), 0, "PKU");
    }

    #[test]
    fn pmu_is_hidden() {
        let mut pmu = entry(LEAF_PERF_MON, 0);
        normalize_entry(&mut pmu, 0, 1, CpuTemplate::Host);
        assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
    }
}
