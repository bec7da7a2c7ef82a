//! CPUID for the guest: what KVM supports on this host
//! (`KVM_GET_SUPPORTED_CPUID`), adjusted so that each vCPU sees its own APIC
//! ID, the topology of this VM (N cores of one thread in one package), the
//! hypervisor bit, the TSC-deadline timer when KVM emulates it (as
//! Firecracker sets it: without it the guest checks the IO-APIC timer and
//! calibrates against the PIT, thousands of port exits at boot), no
//! performance-monitoring unit we do not emulate, an XSAVE layout that
//! is consistent (leaf 0xD), and a brand string when the host's CPU has
//! none.
//!
//! Leaf 0xD was passed through as KVM reported it. We offer the x87, SSE,
//! AVX and AVX-512 states only (no PKRU, no MPX, no AMX), and recompute the
//! largest XSAVE area from the offsets and sizes of what is offered. In our
//! nested test host the guest still warns at every boot ("XSAVE
//! consistency problem: size 832 != kernel_size 576", QEMU's guests there
//! likewise with 2696): EBX of leaf 0xD, which KVM keeps at the size for
//! the guest's XCR0, still says x87 and SSE after the guest enabled AVX,
//! i.e. that KVM never saw the guest's XSETBV. That is the test host's, not
//! this table's (docs/reliability.md).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
/// Leaf 7: MPX (EBX 14), PKU and OSPKE (ECX 3, 4).
const EBX_MPX: u32 = 1 << 14;
const ECX_PKU: u32 = 1 << 3;
const ECX_OSPKE: u32 = 1 << 4;
/// XSAVE state components offered: x87, SSE, AVX, and AVX-512's three.
const XSTATE_OFFERED: u32 = 0b1110_0111;
/// The legacy area and the XSAVE header: where component 2 starts.
const XSAVE_BASE_SIZE: u32 = 576;
/// Leaf 0xB level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `count` things (the APIC ID shift of a level).
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// What the host's KVM offers beyond `KVM_GET_SUPPORTED_CPUID`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC has the TSC-deadline mode.
    pub tsc_deadline: bool,
}

/// Adjusts `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of
/// `count`. The APIC ID of a vCPU is its index.
pub fn adjust(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8, host: HostFeatures) {
    let apic_id = u32::from(index);
    let xsave_size = offered_xsave_size(entries);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
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
            LEAF_EXT_FEATURES if entry.index == 0 => {
                entry.ebx &= !EBX_MPX;
                entry.ecx &= !(ECX_PKU | ECX_OSPKE);
            }
            LEAF_XSAVE => match entry.index {
                0 => {
                    // Supported XCR0 bits (EAX low, EDX high) and the largest
                    // area they need (ECX); EBX follows XCR0 (KVM updates it).
                    entry.eax &= XSTATE_OFFERED;
                    entry.edx = 0;
                    entry.ecx = xsave_size;
                }
                1 => {
                    // XSAVEOPT/XSAVEC/XGETBV1/XSAVES stay; no supervisor states.
                    entry.ecx = 0;
                    entry.edx = 0;
                }
                i if i < 32 && XSTATE_OFFERED & (1 << i) != 0 => {}
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = 0;
                    entry.edx = 0;
                }
            },
            LEAF_AMD_SIZE_IDS => {
                // ECX[15:12] APIC ID bits for cores, ECX[7:0] cores - 1.
                let cores = u32::from(count.max(1)) - 1;
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(count) << 12) | cores;
            }
            _ => {}
        }
    }
    fill_empty_brand(entries);
}

/// Leaves 0x8000_0002..=0x8000_0004: the processor brand string, 16 bytes
/// each in EAX, EBX, ECX, EDX (little-endian), NUL-padded.
const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
/// The brand the guest sees when the host's CPU has none (the nested test
/// host's TCG CPU): "model name" in its /proc/cpuinfo, instead of nothing.
const FALLBACK_BRAND: &str = "capsid virtual CPU";

/// Gives the guest [`FALLBACK_BRAND`] when the host's brand string is
/// empty (only NULs and spaces); a host brand is left as it is.
fn fill_empty_brand(entries: &mut [kvm_cpuid_entry2]) {
    let mut brand: Vec<&mut kvm_cpuid_entry2> = entries
        .iter_mut()
        .filter(|e| (LEAF_BRAND_FIRST..LEAF_BRAND_FIRST + 3).contains(&e.function))
        .collect();
    if brand.len() != 3 {
        return;
    }
    brand.sort_by_key(|e| e.function);
    let empty = brand
        .iter()
        .flat_map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        .flat_map(u32::to_le_bytes)
        .all(|b| b == 0 || b == b' ');
    if !empty {
        return;
    }
    let mut bytes = [0u8; 48];
    bytes[..FALLBACK_BRAND.len()].copy_from_slice(FALLBACK_BRAND.as_bytes());
    let mut words = bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    for entry in brand {
        for register in [
            &mut entry.eax,
            &mut entry.ebx,
            &mut entry.ecx,
            &mut entry.edx,
        ] {
            *register = words.next().unwrap_or(0);
        }
    }
}

/// The XSAVE area (standard format) the offered components need: the end
/// of the furthest one, from its sub-leaf's size (EAX) and offset (EBX).
fn offered_xsave_size(entries: &[kvm_cpuid_entry2]) -> u32 {
    let supported = entries
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)
        .map_or(0, |e| e.eax);
    entries
        .iter()
        .filter(|e| e.function == LEAF_XSAVE && (2..32).contains(&e.index))
        .filter(|e| (supported & XSTATE_OFFERED) & (1 << e.index) != 0)
        .map(|e| e.ebx.saturating_add(e.eax))
        .fold(XSAVE_BASE_SIZE, u32::max)
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
        adjust(&mut entries, 2, 4, HostFeatures::default());
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

    fn xsave(index: u32, eax: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: LEAF_XSAVE,
            index,
            eax,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn the_xsave_layout_offered_is_consistent() {
        // What the nested test host's KVM reported: PKRU (component 9) at
        // offset 2688 in a 2696-byte area, which the guest found
        // inconsistent at every boot.
        let mut entries = vec![
            xsave(0, 0x207, 0x240, 0xa88),
            xsave(1, 0x5, 0, 0),
            xsave(2, 0x100, 0x240, 0),
            xsave(9, 0x8, 0xa80, 0),
            kvm_cpuid_entry2 {
                function: LEAF_EXT_FEATURES,
                ebx: EBX_MPX | 1,
                ecx: ECX_PKU | ECX_OSPKE | 2,
                ..Default::default()
            },
        ];
        adjust(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(entries[0].eax, 0x7, "x87, SSE, AVX; no PKRU");
        assert_eq!(entries[0].ecx, 576 + 256, "AVX ends the area");
        assert_eq!((entries[2].eax, entries[2].ebx), (0x100, 0x240));
        assert_eq!((entries[3].eax, entries[3].ebx), (0, 0), "PKRU is gone");
        assert_eq!((entries[4].ebx, entries[4].ecx), (1, 2), "no MPX, no PKU");
    }

    fn brand(entries: &[kvm_cpuid_entry2]) -> String {
        let bytes: Vec<u8> = entries
            .iter()
            .flat_map(|e| [e.eax, e.ebx, e.ecx, e.edx])
            .flat_map(u32::to_le_bytes)
            .collect();
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_owned()
    }

    #[test]
    fn an_empty_brand_string_becomes_ours_and_a_hosts_stays() {
        let empty = |function| kvm_cpuid_entry2 {
            function,
            ..Default::default()
        };
        let mut entries: Vec<_> = (0..3).map(|i| empty(LEAF_BRAND_FIRST + i)).collect();
        adjust(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(brand(&entries), "capsid virtual CPU");

        let mut entries: Vec<_> = (0..3).map(|i| empty(LEAF_BRAND_FIRST + i)).collect();
        entries[0].eax = u32::from_le_bytes(*b"AMD ");
        adjust(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(brand(&entries), "AMD ");
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_when_kvm_emulates_it() {
        let mut entries = vec![leaf(1, 0)];
        adjust(&mut entries, 0, 1, HostFeatures { tsc_deadline: true });
        assert_ne!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
        let mut entries = vec![leaf(1, 0)];
        adjust(&mut entries, 0, 1, HostFeatures::default());
        assert_eq!(entries[0].ecx & ECX_TSC_DEADLINE, 0);
    }
}
