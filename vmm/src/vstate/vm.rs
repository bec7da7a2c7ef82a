//! The KVM VM: guest RAM registered as memory slots, the irqchip (all in
//! KVM: PIC + IOAPIC + LAPICs and the PIT; or split: only the LAPICs, with
//! the IOAPIC's routes set from the VMM), and interrupt/notification
//! eventfds.

use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_PIT_SPEAKER_DUMMY, KvmIrqRouting,
    kvm_enable_cap, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{IOAPIC_PINS, KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
use crate::config::Irqchip;
use crate::devices::ioapic::{Msi, MsiRouter};
use crate::memory::GuestRam;

/// A KVM call that failed, with the name of the ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{0} failed")]
pub struct VmError(pub &'static str, #[source] pub kvm_ioctls::Error);

/// An open `/dev/kvm` and one VM.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm` and creates an empty VM.
    pub fn new() -> Result<Self, VmError> {
        Self::with(Kvm::new().map_err(|e| VmError("opening /dev/kvm", e))?)
    }

    /// Creates an empty VM on an open `/dev/kvm`.
    pub fn with(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(|e| VmError("KVM_CREATE_VM", e))?;
        Ok(Self { kvm, fd })
    }

    pub(crate) fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub(crate) fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every RAM region of `ram` as a KVM memory slot.
    ///
    /// `ram` must outlive this VM: the VMM keeps both until it exits.
    pub fn register_memory(&self, ram: &GuestRam) -> Result<(), VmError> {
        for (slot, region) in ram.memory().iter().enumerate() {
            let host = region.as_ptr();
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).unwrap_or(u32::MAX),
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region describes a live mapping owned by `ram`,
            // which the caller keeps alive for as long as this VM.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(|e| VmError("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }

    /// Creates the interrupt controllers (before any vCPU): the in-kernel
    /// PIC, IOAPIC and PIT, or, split, only the in-kernel LAPICs with
    /// `IOAPIC_PINS` GSIs whose routes the VMM's IOAPIC sets.
    pub fn create_irqchip(&self, irqchip: Irqchip) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmError("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        if irqchip == Irqchip::Split {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = u64::from(IOAPIC_PINS);
            return self
                .fd
                .enable_cap(&cap)
                .map_err(|e| VmError("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)", e));
        }
        self.fd
            .create_irq_chip()
            .map_err(|e| VmError("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| VmError("KVM_CREATE_PIT2", e))
    }

    /// Makes a write to `evt` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError("KVM_IRQFD", e))
    }

    /// Makes a 4-byte guest write of `value` to MMIO address `addr` signal
    /// `evt` inside KVM, without an exit to the VMM.
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        value: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), value)
            .map_err(|e| VmError("KVM_IOEVENTFD", e))
    }
}

impl MsiRouter for Vm {
    fn set_routes(&self, routes: &[(u32, Msi)]) -> std::io::Result<()> {
        let mut table = KvmIrqRouting::new(routes.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::E2BIG))?;
        for (slot, (gsi, msi)) in table.as_mut_slice().iter_mut().zip(routes) {
            let mut entry = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = msi.address;
            entry.u.msi.data = msi.data;
            *slot = entry;
        }
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}
