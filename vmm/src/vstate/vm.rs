//! The KVM VM: guest RAM registered as memory slots, the in-kernel irqchip
//! (PIC + IOAPIC + LAPICs) and PIT, and interrupt/notification eventfds.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};
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

    /// Creates the in-kernel PIC, IOAPIC and PIT (before any vCPU).
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDR)
            .map_err(|e| VmError("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(|e| VmError("KVM_SET_IDENTITY_MAP_ADDR", e))?;
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
