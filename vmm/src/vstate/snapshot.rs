//! The KVM state of a paused VM, saved and put back into a fresh VM: each
//! vCPU's registers, FPU/XSAVE, XCRs, MSRs, LAPIC, MP state, pending events
//! and debug registers, and the VM's PIC, IOAPIC, PIT and kvm-clock. With
//! guest RAM (`memory::GuestRam::save_to`, `GuestRam::from_snapshot`) and
//! the devices' state it makes a snapshot (issue 18's warm start).
//!
//! The order of the puts is KVM's, not the struct's:
//!
//! ```text
//!  CPUID → SREGS (APIC base, EFER) → MSRs but TSC_DEADLINE → REGS → XSAVE
//!  → XCRS → DEBUGREGS → LAPIC → TSC_DEADLINE (needs the LAPIC's timer
//!  mode) → MP state → vCPU events (pending exceptions and interrupts, last)
//! ```
//!
//! State read back from a file is as hostile as anything else we did not
//! just make: KVM checks each register value, and what KVM cannot check
//! (how many vCPUs, MSRs and CPUID entries) is bounded here.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::vcpu::Vcpu;
use super::vm::{Vm, VmError};

/// The TSC-deadline timer's MSR: put back after the LAPIC, whose timer mode
/// decides whether KVM keeps it.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The MTRRs, which `KVM_GET_MSR_INDEX_LIST` leaves out: the default type
/// (whose enable bit capsid-vmm sets at boot), the fixed ranges and KVM's
/// eight variable pairs. Without them a restored guest's memory is all
/// uncacheable, which an emulating KVM honours (a guest there crawls).
fn mtrr_msrs() -> impl Iterator<Item = u32> {
    let fixed = [
        0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
    ];
    std::iter::once(0x2ff).chain(fixed).chain(0x200..0x210)
}

fn invalid(what: &'static str) -> VmError {
    VmError(what, kvm_ioctls::Error::new(libc::EINVAL))
}

/// One vCPU's state, as KVM keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lists for saving that the vCPU let us read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// The FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// DR0–DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The in-kernel LAPIC's registers.
    pub lapic: kvm_lapic_state,
    /// Running, halted, or waiting for its startup IPI.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs, interrupt shadows.
    pub events: kvm_vcpu_events,
}

/// The VM's in-kernel interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The first 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The second 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC's redirection table.
    pub ioapic: kvm_irqchip,
    /// The PIT's three channels.
    pub pit: kvm_pit_state2,
    /// kvm-clock's time.
    pub clock: kvm_clock_data,
}

impl Vcpu {
    /// Reads this vCPU's state. The vCPU must not be running (its thread
    /// out of `KVM_RUN`, and kept out until this returns).
    pub fn save_state(&self, vm: &Vm) -> Result<VcpuState, VmError> {
        let fd = self.fd();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError("KVM_GET_CPUID2", e))?
            .as_slice()
            .to_vec();
        Ok(VcpuState {
            cpuid,
            msrs: self.save_msrs(vm)?,
            regs: fd.get_regs().map_err(|e| VmError("KVM_GET_REGS", e))?,
            sregs: fd.get_sregs().map_err(|e| VmError("KVM_GET_SREGS", e))?,
            xsave: fd.get_xsave().map_err(|e| VmError("KVM_GET_XSAVE", e))?,
            xcrs: fd.get_xcrs().map_err(|e| VmError("KVM_GET_XCRS", e))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(|e| VmError("KVM_GET_DEBUGREGS", e))?,
            lapic: fd.get_lapic().map_err(|e| VmError("KVM_GET_LAPIC", e))?,
            mp_state: fd
                .get_mp_state()
                .map_err(|e| VmError("KVM_GET_MP_STATE", e))?,
            events: fd
                .get_vcpu_events()
                .map_err(|e| VmError("KVM_GET_VCPU_EVENTS", e))?,
        })
    }

    /// Every MSR KVM lists as worth saving (`KVM_GET_MSR_INDEX_LIST`) that
    /// this vCPU lets us read; one it refuses (a feature this CPU lacks) is
    /// left out, as KVM would refuse to put it back too.
    fn save_msrs(&self, vm: &Vm) -> Result<Vec<kvm_msr_entry>, VmError> {
        let indices = vm
            .kvm()
            .get_msr_index_list()
            .map_err(|e| VmError("KVM_GET_MSR_INDEX_LIST", e))?;
        let mut left: Vec<kvm_msr_entry> = indices
            .as_slice()
            .iter()
            .copied()
            .chain(mtrr_msrs().filter(|m| !indices.as_slice().contains(m)))
            .map(|index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut saved = Vec::with_capacity(left.len());
        while !left.is_empty() {
            let chunk = left.len().min(KVM_MAX_MSR_ENTRIES);
            let mut msrs =
                Msrs::from_entries(&left[..chunk]).map_err(|_| invalid("building the MSR list"))?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(|e| VmError("KVM_GET_MSRS", e))?;
            // KVM reads in order and stops at the first it refuses.
            saved.extend_from_slice(&msrs.as_slice()[..read.min(chunk)]);
            let skip = if read < chunk { read + 1 } else { read };
            left.drain(..skip.min(left.len()));
        }
        Ok(saved)
    }

    /// Creates vCPU `index` of `vm` and puts `state` into it, in KVM's order
    /// (the module's header). The VM's interrupt controllers must exist.
    pub fn restore(vm: &Vm, index: u8, state: &VcpuState) -> Result<Self, VmError> {
        if state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid("a snapshot's CPUID table is too long"));
        }
        if state.msrs.len() > 16 * KVM_MAX_MSR_ENTRIES {
            return Err(invalid("a snapshot's MSR list is too long"));
        }
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError("KVM_CREATE_VCPU", e))?;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| invalid("KVM_SET_CPUID2"))?;
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmError("KVM_SET_CPUID2", e))?;
        fd.set_sregs(&state.sregs)
            .map_err(|e| VmError("KVM_SET_SREGS", e))?;
        let (deadline, msrs): (Vec<_>, Vec<_>) = state
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        set_msrs(&fd, &msrs)?;
        fd.set_regs(&state.regs)
            .map_err(|e| VmError("KVM_SET_REGS", e))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB area, and KVM reads more
        // than that only for state components this process was granted with
        // arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) (AMX), which capsid-vmm never
        // asks for; the struct lives across the call.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(|e| VmError("KVM_SET_XSAVE", e))?;
        fd.set_xcrs(&state.xcrs)
            .map_err(|e| VmError("KVM_SET_XCRS", e))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(|e| VmError("KVM_SET_DEBUGREGS", e))?;
        fd.set_lapic(&state.lapic)
            .map_err(|e| VmError("KVM_SET_LAPIC", e))?;
        set_msrs(&fd, &deadline)?;
        fd.set_mp_state(state.mp_state)
            .map_err(|e| VmError("KVM_SET_MP_STATE", e))?;
        fd.set_vcpu_events(&state.events)
            .map_err(|e| VmError("KVM_SET_VCPU_EVENTS", e))?;
        Ok(Self::from_fd(index, fd))
    }
}

/// Puts `entries` back, all of them or an error naming the first refused.
fn set_msrs(fd: &kvm_ioctls::VcpuFd, entries: &[&kvm_msr_entry]) -> Result<(), VmError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let owned: Vec<kvm_msr_entry> = chunk.iter().map(|&&m| m).collect();
        let msrs = Msrs::from_entries(&owned).map_err(|_| invalid("building the MSR list"))?;
        let written = fd.set_msrs(&msrs).map_err(|e| VmError("KVM_SET_MSRS", e))?;
        if written != owned.len() {
            tracing::warn!(
                "KVM refused MSR {:#x} of a snapshot",
                owned.get(written).map_or(0, |m| m.index)
            );
            return Err(invalid("KVM_SET_MSRS"));
        }
    }
    Ok(())
}

impl Vm {
    /// Reads the in-kernel PIC, IOAPIC, PIT and kvm-clock. The vCPUs must
    /// be paused. A VM with the split irqchip keeps its IOAPIC in the VMM,
    /// which this does not cover: refused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd()
                .get_irqchip(&mut chip)
                .map_err(|e| VmError("KVM_GET_IRQCHIP", e))?;
            Ok(chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self
                .fd()
                .get_pit2()
                .map_err(|e| VmError("KVM_GET_PIT2", e))?,
            clock: self
                .fd()
                .get_clock()
                .map_err(|e| VmError("KVM_GET_CLOCK", e))?,
        })
    }

    /// Puts `state` into this VM, whose in-kernel irqchip and PIT exist
    /// (`create_irqchip(Irqchip::Kernel)`), before its vCPUs are restored.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        let chips = [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        for (chip, id) in chips {
            // A chip saved as another one would be put in the wrong place.
            if chip.chip_id != id {
                return Err(invalid("KVM_SET_IRQCHIP"));
            }
            self.fd()
                .set_irqchip(chip)
                .map_err(|e| VmError("KVM_SET_IRQCHIP", e))?;
        }
        self.fd()
            .set_pit2(&state.pit)
            .map_err(|e| VmError("KVM_SET_PIT2", e))?;
        // The flags KVM_GET_CLOCK reports (TSC_STABLE, …) describe the host
        // it ran on; KVM_SET_CLOCK takes none of them back.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd()
            .set_clock(&clock)
            .map_err(|e| VmError("KVM_SET_CLOCK", e))
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::arch::boot::BootEntry;
    use crate::arch::layout::GDT_ADDR;
    use crate::arch::regs::{self, BootProtocol};
    use crate::config::Irqchip;
    use crate::memory::{GuestRam, MemoryError};

    const MEM: u64 = 16 << 20;
    const CODE: u64 = 0x1000;
    const PORT: u16 = 0x0cc0;
    const MTRR_DEF_TYPE: u32 = 0x2ff;

    /// `mov ebx, 0x11223344; mov byte [0x3000], 0x55; mov dx, PORT;
    /// mov al, 1; out dx, al` — the snapshot is taken here — then
    /// `mov al, [0x3000]; out dx, al; mov al, bl; out dx, al; hlt`: after a
    /// restore the guest reports a byte of its RAM and one of its registers.
    /// (With KVM's LAPIC a `hlt` waits inside KVM: the test stops before.)
    fn code() -> Vec<u8> {
        let mut code = vec![0xbb, 0x44, 0x33, 0x22, 0x11];
        code.extend_from_slice(&[0xc6, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0x55]);
        code.extend_from_slice(&[0x66, 0xba]);
        code.extend_from_slice(&PORT.to_le_bytes());
        code.extend_from_slice(&[0xb0, 0x01, 0xee]);
        code.extend_from_slice(&[0x8a, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, 0xee]);
        code.extend_from_slice(&[0x88, 0xd8, 0xee, 0xf4]);
        code
    }

    /// RAM holding the boot GDT, the page tables and [`code`].
    fn guest_ram() -> GuestRam {
        let ram = GuestRam::new(MEM).unwrap();
        ram.memory()
            .write_slice(&regs::gdt_bytes(), GuestAddress(GDT_ADDR))
            .unwrap();
        for (addr, table) in regs::page_tables() {
            ram.memory()
                .write_slice(&table, GuestAddress(addr))
                .unwrap();
        }
        ram.memory()
            .write_slice(&code(), GuestAddress(CODE))
            .unwrap();
        ram
    }

    fn vm_with(ram: &GuestRam) -> Vm {
        let vm = Vm::new().unwrap();
        vm.register_memory(ram).unwrap();
        vm.create_irqchip(Irqchip::Kernel).unwrap();
        vm
    }

    fn booted_vcpu(vm: &Vm) -> Vcpu {
        let cpuid = vm.kvm().get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let entry = BootEntry {
            protocol: BootProtocol::Linux64,
            entry: CODE,
        };
        Vcpu::new(vm, &cpuid, 0, 1, entry).unwrap()
    }

    /// Runs `vcpu` on its own thread to its next exit, which must be a
    /// one-byte port write: (port, byte), or what it was instead. A guest
    /// that neither exits nor ends within 60 s is stopped and reported.
    fn next_out(mut vcpu: Vcpu) -> (Vcpu, Result<(u16, u8), String>) {
        use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};
        extern "C" fn ignore(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        register_signal_handler(SIGRTMIN(), ignore).unwrap();
        let runner = std::thread::spawn(move || {
            let exit = match vcpu.fd_mut().run() {
                Ok(VcpuExit::IoOut(port, [byte])) => Ok((port, *byte)),
                Ok(other) => Err(format!("{other:?}")),
                Err(e) => Err(e.to_string()),
            };
            (vcpu, exit)
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !runner.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        while !runner.is_finished() {
            let _ = runner.kill(SIGRTMIN());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        runner.join().unwrap()
    }

    #[test]
    fn a_guest_paused_saved_and_restored_into_a_fresh_vm_carries_on_where_it_was() {
        if !crate::probe::kvm_for_test("a_guest_paused_saved_and_restored") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let memory_file = dir.path().join(crate::snapshot::MEMORY_FILE);
        {
            let ram = guest_ram();
            let vm = vm_with(&ram);
            let (mut vcpu, exit) = next_out(booted_vcpu(&vm));
            assert_eq!(exit, Ok((PORT, 1)));
            // Finish the port write inside KVM before saving, as a pause
            // does: KVM_RUN with immediate_exit returns at once.
            vcpu.fd_mut().set_kvm_immediate_exit(1);
            let err = vcpu.fd_mut().run().map(|_| ()).unwrap_err();
            assert_eq!(err.errno(), libc::EINTR);
            vcpu.fd_mut().set_kvm_immediate_exit(0);

            let vm_state = vm.save_state().unwrap();
            let vcpu_state = vcpu.save_state(&vm).unwrap();
            // The MTRRs, which KVM's list of MSRs to save leaves out, are in.
            assert!(
                vcpu_state
                    .msrs
                    .iter()
                    .any(|m| m.index == MTRR_DEF_TYPE && m.data != 0)
            );
            let file = std::fs::File::create(&memory_file).unwrap();
            ram.save_to(&file).unwrap();
            crate::snapshot::SnapshotState::new(
                MEM,
                vm_state,
                vec![vcpu_state],
                crate::snapshot::DeviceStates::default(),
            )
            .write(dir.path())
            .unwrap();
            // The first VM and its RAM are gone before the restore.
        }
        let state = crate::snapshot::SnapshotState::read(dir.path()).unwrap();
        let (vm_state, vcpu_state) = (state.vm, &state.vcpus[0]);
        let file = std::fs::File::open(&memory_file).unwrap();
        // Sparse: 16 MiB of RAM, of which the guest used a few pages.
        let used = std::os::unix::fs::MetadataExt::blocks(&file.metadata().unwrap()) * 512;
        assert!(used < 1 << 20, "{used} bytes on disk");
        let ram = GuestRam::from_snapshot(MEM, &file).unwrap();
        let vm = vm_with(&ram);
        vm.restore_state(&vm_state).unwrap();
        let vcpu = Vcpu::restore(&vm, 0, vcpu_state).unwrap();
        let (vcpu, exit) = next_out(vcpu);
        assert_eq!(exit, Ok((PORT, 0x55)), "a byte of guest RAM");
        let (_vcpu, exit) = next_out(vcpu);
        assert_eq!(exit, Ok((PORT, 0x44)), "a register");
        // The restored guest's writes stay in this process: the file keeps
        // what was saved.
        ram.memory()
            .write_obj(0xaau8, GuestAddress(0x3000))
            .unwrap();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, 0x3000).unwrap();
        assert_eq!(byte, [0x55]);
    }

    #[test]
    fn a_stopped_vcpu_says_where_it_was() {
        if !crate::probe::kvm_for_test("a_stopped_vcpu_says_where_it_was") {
            return;
        }
        let ram = guest_ram();
        let vm = vm_with(&ram);
        let (vcpu, exit) = next_out(booted_vcpu(&vm));
        assert_eq!(exit, Ok((PORT, 1)));
        let said = vcpu.describe_stopped();
        let rip = said
            .split_whitespace()
            .find_map(|w| u64::from_str_radix(w.strip_prefix("rip=0x")?, 16).ok())
            .unwrap_or_else(|| panic!("no rip in {said:?}"));
        let code_len = u64::try_from(code().len()).unwrap();
        assert!((CODE..=CODE + code_len).contains(&rip), "{said}");
        assert!(said.starts_with("vCPU 0: "), "{said}");
        assert!(said.contains(" runnable; "), "{said}");
        assert!(said.contains("rflags=0x"), "{said}");
    }

    #[test]
    fn a_memory_file_of_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("memory")).unwrap();
        file.set_len(MEM - 4096).unwrap();
        let err = GuestRam::from_snapshot(MEM, &file).unwrap_err();
        assert!(
            matches!(err, MemoryError::SnapshotSize { expected: MEM, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_state_with_more_cpuid_entries_than_kvm_takes_is_refused_before_kvm() {
        if !crate::probe::kvm_for_test("a_state_with_more_cpuid_entries") {
            return;
        }
        let ram = GuestRam::new(MEM).unwrap();
        let vm = vm_with(&ram);
        let mut state = booted_vcpu(&vm).save_state(&vm).unwrap();
        let first = state.cpuid[0];
        state.cpuid = vec![first; KVM_MAX_CPUID_ENTRIES + 1];
        let other_ram = GuestRam::new(MEM).unwrap();
        let other = vm_with(&other_ram);
        let err = Vcpu::restore(&other, 0, &state).unwrap_err();
        assert!(format!("{err:?}").contains("CPUID"), "{err:?}");
    }
}
