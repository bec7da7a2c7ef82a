//! The register state a vCPU starts in, for each boot protocol.
//!
//! - **PVH** (ELF `vmlinux` with a `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit
//!   protected mode, flat segments, paging off, `rbx` = the start info.
//! - **64-bit boot protocol** (bzImage, or ELF without the note): long mode
//!   with the first GiB identity-mapped by 2 MiB pages, `rsi` = the zero page.
//!
//! Application processors start in the same state, held in wait-for-SIPI by
//! the in-kernel LAPIC until the bootstrap processor wakes them.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};

use super::layout::{
    BOOT_STACK_TOP, GDT_ADDR, PD_ADDR, PDPT_ADDR, PML4_ADDR, PVH_INFO_ADDR, ZERO_PAGE_ADDR,
};

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Enter the PVH entry point in 32-bit protected mode.
    Pvh,
    /// Enter `startup_64` in long mode with a zero page.
    Linux64,
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PAGE_PRESENT_RW: u64 = 0b11;
const PAGE_SIZE_2M: u64 = 1 << 7;
const RFLAGS_RESERVED: u64 = 0x2;

/// GDT: null, 64-bit code (0x08), 32-bit code (0x10), data (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
];
const CODE64_SELECTOR: u16 = 0x08;
const CODE32_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;

/// The GDT as bytes, to be written at [`GDT_ADDR`].
pub fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Page tables identity-mapping the first GiB, as (guest address, bytes).
pub fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | PAGE_PRESENT_RW | PAGE_SIZE_2M).to_le_bytes())
        .collect();
    vec![
        (
            PML4_ADDR,
            (PDPT_ADDR | PAGE_PRESENT_RW).to_le_bytes().to_vec(),
        ),
        (
            PDPT_ADDR,
            (PD_ADDR | PAGE_PRESENT_RW).to_le_bytes().to_vec(),
        ),
        (PD_ADDR, pd),
    ]
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets the segment and control registers of `sregs` for `protocol`.
pub fn set_boot_sregs(sregs: &mut kvm_sregs, protocol: BootProtocol) {
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = u16::try_from(GDT.len() * 8 - 1).unwrap_or(u16::MAX);
    match protocol {
        BootProtocol::Pvh => {
            sregs.cs = segment(CODE32_SELECTOR, 0xb, false);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            sregs.cs = segment(CODE64_SELECTOR, 0xb, true);
            sregs.cr3 = PML4_ADDR;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// The general registers of the bootstrap processor.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    match protocol {
        BootProtocol::Pvh => kvm_regs {
            rip: entry,
            rbx: PVH_INFO_ADDR,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        BootProtocol::Linux64 => kvm_regs {
            rip: entry,
            rsi: ZERO_PAGE_ADDR,
            rsp: BOOT_STACK_TOP,
            rbp: BOOT_STACK_TOP,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// x87 and SSE control words at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs a vCPU boots with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
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
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// LAPIC register offsets and delivery modes for LINT0/LINT1.
pub const APIC_LVT0: usize = 0x350;
pub(crate) const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 delivers the PIC's ExtINT, LINT1 NMIs (as on a PC).
pub fn lapic_lint(register: usize, value: u32) -> u32 {
    let mode = if register == APIC_LVT0 {
        APIC_MODE_EXTINT
    } else {
        APIC_MODE_NMI
    };
    (value & !0x700) | (mode << 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_starts_in_flat_protected_mode_with_the_start_info_in_rbx() {
        let mut sregs = kvm_sregs::default();
        set_boot_sregs(&mut sregs, BootProtocol::Pvh);
        assert_eq!(sregs.cr0 & CR0_PG, 0);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(boot_regs(BootProtocol::Pvh, 0x100_0000).rbx, PVH_INFO_ADDR);
    }

    #[test]
    fn linux64_starts_in_long_mode_over_an_identity_map() {
        let mut sregs = kvm_sregs::default();
        set_boot_sregs(&mut sregs, BootProtocol::Linux64);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cr3, PML4_ADDR);
        let tables = page_tables();
        let pd = &tables[2].1;
        assert_eq!(pd.len(), 4096);
        let last = u64::from_le_bytes(pd[4088..].try_into().unwrap());
        assert_eq!(last & !0xfff, 511 << 21);
        assert_eq!(boot_regs(BootProtocol::Linux64, 0).rsi, ZERO_PAGE_ADDR);
    }

    #[test]
    fn lint_modes_are_extint_and_nmi() {
        assert_eq!((lapic_lint(APIC_LVT0, 0x10700) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_lint(APIC_LVT1, 0) >> 8) & 7, APIC_MODE_NMI);
        assert_eq!(lapic_lint(APIC_LVT0, 0x10000) & 0x10000, 0x10000);
    }
}
