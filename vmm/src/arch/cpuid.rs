//! CPUID for the guest: what KVM supports on this host
//! (`KVM_GET_SUPPORTED_CPUID`), adjusted so that each vCPU sees its own APIC
//! ID, the topology of this VM (N cores of one thread in one package), the
//! hypervisor bit, and no performance-monitoring unit we do not emulate.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` things (the APIC ID shift of a level).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Adjusts `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of
/// `count`. The APIC ID of a vCPU is its index.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
                let cores = u32::from(count.max(1)) - 1;
                let sharing = if entry.eax & 0xe0 == 0x60 { cores } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (cores << 26) | (sharing << 14);
            }
            LEAF_PMU => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_EXT_TOPOLOGY => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        // One thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDS => {
                // ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
                let cores = u32::from(count.max(1)) - 1;
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | cores;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xdead_beef,
            ecx: 0,
            edx: 0,
            eax: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_vm_topology() {
        let mut entries = vec![
            leaf(1, 0),
            leaf(0xb, 0),
            leaf(0xb, 1),
            leaf(0xb, 2),
            leaf(0xa, 0),
        ];
        adjust(&mut entries, 2, 4);
        assert_eq!(entries[0].ebx >> 24, 2);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 4);
        assert_eq!(entries[0].ebx & 0xffff, 0xbeef);
        assert_ne!(entries[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & EDX_HTT, 0);
        assert_eq!(entries[1].edx, 2);
        assert_eq!(entries[1].ebx, 1);
        assert_eq!(entries[2].ebx, 4);
        assert_eq!(entries[2].eax, 2);
        assert_eq!(entries[2].ecx >> 8, LEVEL_TYPE_CORE);
        assert_eq!(entries[3].ebx, 0);
        assert_eq!(entries[4].eax, 0, "no PMU is advertised");
    }

    #[test]
    fn apic_id_bits_round_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(32), 5);
    }
}
