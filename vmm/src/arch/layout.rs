//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT (boot segments)
//! 0x0000_6000  PVH start info, then its memory map and module list
//! 0x0000_7000  zero page (64-bit boot protocol)
//! 0x0000_8ff0  boot stack top (64-bit boot protocol)
//! 0x0000_9000  page tables: PML4, PDPT, PD (identity map of the first GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 1 MiB: reserved; the MP table sits at 0xf_0000
//! 0x0010_0000  RAM: kernel (at its ELF physical address), initrd at the top
//! 0xc000_0000  MMIO gap up to 4 GiB: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM beyond 3 GiB continues here
//! ```

/// The boot GDT.
pub const GDT_ADDR: u64 = 0x500;
/// The PVH `hvm_start_info`, followed by its memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// The PVH memory map (after the 56-byte start info, 8-byte aligned).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// The PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit boot protocol.
pub const PML4_ADDR: u64 = 0x9000;
pub(crate) const PDPT_ADDR: u64 = 0xa000;
pub(crate) const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// x86's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// The MP floating pointer and configuration table (in the BIOS area Linux scans).
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// First byte above the legacy area: the kernel and everything big go above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The gap below 4 GiB where no RAM is mapped.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub(crate) const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub(crate) const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC and local APIC register windows.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub(crate) const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS and identity-map pages, inside the MMIO gap (Intel only).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
pub(crate) const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy I/O ports and their interrupt lines.
pub const SERIAL_PORT: u16 = 0x3f8;
pub(crate) const SERIAL_PORT_LEN: u16 = 8;
pub(crate) const SERIAL_IRQ: u32 = 4;
pub(crate) const I8042_PORT: u16 = 0x60;
pub(crate) const I8042_PORT_LEN: u16 = 5;
/// The boot-time marker port and value, the same as Firecracker's, so guest
/// images made for either work with both.
pub const BOOT_MARKER_PORT: u16 = 0x3f0;
pub(crate) const BOOT_MARKER_VALUE: u8 = 123;
/// First interrupt line for virtio devices; the IOAPIC has 24 pins.
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub(crate) const IOAPIC_PINS: u32 = 24;
/// The most vCPUs: one MP table processor entry each, APIC IDs below the IOAPIC's.
pub const MAX_VCPUS: u8 = 32;

/// One contiguous RAM range, as guest physical start and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    pub(crate) start: u64,
    pub(crate) len: u64,
}

/// Where `mem_bytes` of RAM go: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<RamRange> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![RamRange { start: 0, len: low }];
    if mem_bytes > low {
        ranges.push(RamRange {
            start: MMIO_GAP_END,
            len: mem_bytes - low,
        });
    }
    ranges
}

/// The RAM entries of the e820 / PVH memory map: low memory below the EBDA,
/// then everything from 1 MiB on. The legacy area in between is left out,
/// which the kernel treats as reserved.
pub fn e820_ram(mem_bytes: u64) -> Vec<RamRange> {
    let mut map = vec![RamRange {
        start: 0,
        len: EBDA_START,
    }];
    for range in ram_ranges(mem_bytes) {
        let start = range.start.max(HIMEM_START);
        let end = range.start + range.len;
        if end > start {
            map.push(RamRange {
                start,
                len: end - start,
            });
        }
    }
    map
}

/// The end of RAM below the MMIO gap: the initrd goes just under it.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_and_the_legacy_area_is_not_ram() {
        assert_eq!(
            ram_ranges(128 << 20),
            vec![RamRange {
                start: 0,
                len: 128 << 20
            }]
        );
        let e820 = e820_ram(128 << 20);
        assert_eq!(e820[0].start + e820[0].len, EBDA_START);
        assert_eq!(e820[1].start, HIMEM_START);
        assert_eq!(e820[1].start + e820[1].len, 128 << 20);
    }

    #[test]
    fn memory_beyond_the_gap_moves_above_4_gib() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges[0].len, MMIO_GAP_START);
        assert_eq!(ranges[1].start, MMIO_GAP_END);
        assert_eq!(ranges[1].len, (4 << 30) - MMIO_GAP_START);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
        // Devices live in the gap, not in RAM.
        const { assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START) };
        const { assert!(IOAPIC_ADDR as u64 >= MMIO_GAP_START) };
    }
}
