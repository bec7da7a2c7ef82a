//! The Intel MultiProcessor table, which tells a guest without ACPI how many
//! CPUs it has and how the IOAPIC pins are wired (MP spec 1.4).
//!
//! ```text
//! MPTABLE_ADDR   floating pointer "_MP_" (16 bytes) -> config table
//!      +16       config table "PCMP" (44-byte header), then entries:
//!                processor x N, bus "ISA", IOAPIC, interrupt x 24, local interrupt x 2
//! ```
//!
//! Every ISA IRQ n is wired to IOAPIC pin n, edge-triggered, as our devices
//! (serial on 4, virtio from 5) signal through KVM irqfds.

use super::layout::{APIC_ADDR, IOAPIC_ADDR, IOAPIC_PINS, MAX_VCPUS};

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6; FPU and APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Why the table cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than the table describes.
    #[error("{0} vCPUs requested; the MP table describes 1 to {MAX_VCPUS}")]
    VcpuCount(u8),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// The IOAPIC's APIC ID: the first after the vCPUs' (0 to `vcpus - 1`).
/// The table announces it, and the split irqchip's IOAPIC answers with it.
pub(crate) fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// Builds the floating pointer and configuration table for `vcpus` CPUs,
/// to be written at guest address `base`.
pub fn build(vcpus: u8, base: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic_id = ioapic_id(vcpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        let pin = u8::try_from(pin).unwrap_or(u8::MAX);
        // type, interrupt type, flags (2 bytes: conforms to the bus), bus, IRQ, IOAPIC, pin
        entries.extend_from_slice(&[ENTRY_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        // Delivered to every local APIC (0xff).
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = u16::try_from(HEADER_LEN + entries.len()).unwrap_or(u16::MAX);
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"CAPSID  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    let table_addr = base + u32::try_from(FLOATING_POINTER_LEN).unwrap_or(0);
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a config table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn both_structures_checksum_to_zero_and_point_at_each_other() {
        for vcpus in [1, 2, 4, MAX_VCPUS] {
            let bytes = build(vcpus, 0xf_0000).unwrap();
            assert_eq!(&bytes[..4], b"_MP_");
            assert_eq!(sum(&bytes[..16]), 0);
            let table_addr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            assert_eq!(table_addr, 0xf_0010);
            let table = &bytes[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = usize::from(u16::from_le_bytes([table[4], table[5]]));
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let entries = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(usize::from(entries), usize::from(vcpus) + 2 + 24 + 2);
            // The first processor is the bootstrap one, the others are not.
            assert_eq!(table[HEADER_LEN + 3], CPU_ENABLED | CPU_BOOTSTRAP);
            if vcpus > 1 {
                assert_eq!(table[HEADER_LEN + 20 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn vcpu_counts_outside_the_table_are_refused() {
        assert!(build(0, 0).is_err());
        assert!(build(MAX_VCPUS + 1, 0).is_err());
    }
}
