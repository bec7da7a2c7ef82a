//! One vCPU: its boot state and its run loop.
//!
//! Each vCPU runs on its own thread. Port and MMIO exits go to the device
//! buses; everything that ends the VM (a reset request, a triple fault, a
//! KVM internal error) is reported through the [`ExitNotifier`] and the
//! thread returns. The VMM stops a vCPU by setting the shared stop flag and
//! kicking the thread with `SIGRTMIN`, which makes `KVM_RUN` return `EINTR`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{CpuId, Msrs, kvm_lapic_state};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::regs;
use crate::arch::{boot::BootEntry, cpuid};
use crate::devices::bus::Bus;
use crate::exit::{ExitNotifier, ExitReason};

use super::vm::{Vm, VmError};

/// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;

/// A configured vCPU, ready to run.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `index` of `count` and sets its CPUID, MSRs, FPU and
    /// LAPIC. The bootstrap vCPU (0) also gets the boot registers; the
    /// others wait for the guest's startup IPI in the in-kernel LAPIC.
    pub fn new(
        vm: &Vm,
        base_cpuid: &CpuId,
        index: u8,
        count: u8,
        boot: BootEntry,
    ) -> Result<Self, VmError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError("KVM_CREATE_VCPU", e))?;
        let mut cpuid = base_cpuid.clone();
        let host = cpuid::HostFeatures {
            tsc_deadline: vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        };
        cpuid::adjust(cpuid.as_mut_slice(), index, count, host);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| VmError("KVM_SET_CPUID2", e))?;

        let msrs = Msrs::from_entries(&regs::boot_msrs()).map_err(|_| {
            VmError(
                "building the MSR list",
                kvm_ioctls::Error::new(libc::EINVAL),
            )
        })?;
        let written = fd.set_msrs(&msrs).map_err(|e| VmError("KVM_SET_MSRS", e))?;
        if written != msrs.as_slice().len() {
            return Err(VmError(
                "KVM_SET_MSRS",
                kvm_ioctls::Error::new(libc::EINVAL),
            ));
        }
        fd.set_fpu(&regs::boot_fpu())
            .map_err(|e| VmError("KVM_SET_FPU", e))?;

        let mut lapic: kvm_lapic_state = fd.get_lapic().map_err(|e| VmError("KVM_GET_LAPIC", e))?;
        for register in [regs::APIC_LVT0, regs::APIC_LVT1] {
            let value = read_lapic(&lapic, register);
            write_lapic(&mut lapic, register, regs::lapic_lint(register, value));
        }
        fd.set_lapic(&lapic)
            .map_err(|e| VmError("KVM_SET_LAPIC", e))?;

        // Application processors keep their reset state: the guest starts
        // them with INIT/SIPI, which the in-kernel LAPIC handles.
        if index == 0 {
            let mut sregs = fd.get_sregs().map_err(|e| VmError("KVM_GET_SREGS", e))?;
            regs::set_boot_sregs(&mut sregs, boot.protocol);
            fd.set_sregs(&sregs)
                .map_err(|e| VmError("KVM_SET_SREGS", e))?;
            fd.set_regs(&regs::boot_regs(boot.protocol, boot.entry))
                .map_err(|e| VmError("KVM_SET_REGS", e))?;
        }
        Ok(Self { index, fd })
    }

    pub(crate) fn index(&self) -> u8 {
        self.index
    }

    pub(super) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    #[cfg(test)]
    pub(super) fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// A vCPU whose state was put in by its restorer (`snapshot.rs`).
    pub(super) fn from_fd(index: u8, fd: VcpuFd) -> Self {
        Self { index, fd }
    }

    /// Runs the guest until it ends the VM or `stop` is set. The reason the
    /// VM ended, if this vCPU saw it, goes to `exit`.
    pub fn run(&mut self, pio: &Bus, mmio: &Bus, stop: &AtomicBool, exit: &ExitNotifier) {
        while !stop.load(Ordering::Acquire) {
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    pio.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    mmio.write(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    mmio.read(addr, data);
                    continue;
                }
                Ok(VcpuExit::Intr) => continue,
                // Only for level-triggered routes, which the split
                // irqchip's IOAPIC never makes; nothing to do.
                Ok(VcpuExit::IoapicEoi(_)) => continue,
                Ok(VcpuExit::Hlt) => ExitReason::GuestShutdown,
                Ok(VcpuExit::Shutdown) => ExitReason::GuestCrash(format!(
                    "vCPU {} triple-faulted ({})",
                    self.index,
                    self.describe_state()
                )),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    SYSTEM_EVENT_SHUTDOWN | SYSTEM_EVENT_RESET => ExitReason::GuestShutdown,
                    other => ExitReason::GuestCrash(format!(
                        "vCPU {} reported system event {other}",
                        self.index
                    )),
                },
                Ok(VcpuExit::InternalError) => {
                    ExitReason::GuestCrash(format!("KVM internal error on vCPU {}", self.index))
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => ExitReason::GuestCrash(format!(
                    "KVM could not enter vCPU {} (hardware reason {reason:#x}, cpu {cpu})",
                    self.index
                )),
                Ok(other) => ExitReason::GuestCrash(format!(
                    "vCPU {} stopped with an unexpected exit: {other:?}",
                    self.index
                )),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => ExitReason::Error(format!("KVM_RUN on vCPU {} failed: {e}", self.index)),
            };
            exit.report(reason);
            return;
        }
    }
}

impl Vcpu {
    /// Completes the exit the vCPU last left `KVM_RUN` for (the data of a
    /// port or MMIO read goes into the guest's register on the next entry)
    /// without running the guest: `KVM_RUN` with `immediate_exit` set
    /// returns at once. Its state is then complete, for a snapshot.
    pub fn finish_pending_io(&mut self) -> Result<(), VmError> {
        self.fd.set_kvm_immediate_exit(1);
        let done = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(VmError("KVM_RUN (immediate exit)", e)),
            Ok(_) => Ok(()),
        };
        self.fd.set_kvm_immediate_exit(0);
        done
    }

    /// The registers that tell where a crashed vCPU was, for the crash report.
    fn describe_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                regs.rip, regs.rsp, sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, sregs.cs.selector
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Where a stopped vCPU was: its instruction and stack pointers, its
    /// flags (IF says whether it took interrupts), its run state (halted,
    /// waiting for a startup IPI) and what KVM had pending for it. Logged
    /// when a VM is stopped from outside, so a guest that hung says where.
    pub fn describe_stopped(&self) -> String {
        let mp_state = match self.fd.get_mp_state().map(|s| s.mp_state) {
            Ok(kvm_bindings::KVM_MP_STATE_RUNNABLE) => "runnable".to_owned(),
            Ok(kvm_bindings::KVM_MP_STATE_UNINITIALIZED) => "uninitialized".to_owned(),
            Ok(kvm_bindings::KVM_MP_STATE_INIT_RECEIVED) => "init-received".to_owned(),
            Ok(kvm_bindings::KVM_MP_STATE_HALTED) => "halted".to_owned(),
            Ok(kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED) => "sipi-received".to_owned(),
            Ok(other) => format!("state {other}"),
            Err(e) => format!("state unavailable ({e})"),
        };
        let pending = match self.fd.get_vcpu_events() {
            Ok(ev) => format!(
                "interrupt pending={} nr={} nmi pending={} exception pending={} nr={}",
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.nmi.pending,
                ev.exception.injected,
                ev.exception.nr
            ),
            Err(e) => format!("events unavailable ({e})"),
        };
        let rflags = match self.fd.get_regs() {
            Ok(regs) => format!("rflags={:#x}", regs.rflags),
            Err(e) => format!("rflags unavailable ({e})"),
        };
        format!(
            "vCPU {}: {} {rflags} {mp_state}; {pending}",
            self.index,
            self.describe_state()
        )
    }
}

fn read_lapic(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i].to_ne_bytes()[0]);
    u32::from_le_bytes(bytes)
}

fn write_lapic(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = i8::from_ne_bytes([byte]);
    }
}

/// How long stopping the vCPUs may take in all.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The vCPU threads of a running VM; each gives its vCPU back when it ends.
#[derive(Debug, Default)]
pub struct VcpuThreads {
    handles: Vec<std::thread::JoinHandle<Option<Vcpu>>>,
    stop: Arc<AtomicBool>,
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl VcpuThreads {
    /// Starts one thread per vCPU.
    pub fn start(
        vcpus: Vec<Vcpu>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitNotifier>,
        init: &crate::devices::virtio::ThreadInit,
    ) -> std::io::Result<Self> {
        vmm_sys_util::signal::register_signal_handler(
            vmm_sys_util::signal::SIGRTMIN(),
            ignore_kick,
        )
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Self {
            handles: Vec::new(),
            stop: Arc::clone(&stop),
        };
        for mut vcpu in vcpus {
            let (pio, mmio, exit, stop, init) = (
                Arc::clone(&pio),
                Arc::clone(&mmio),
                Arc::clone(&exit),
                Arc::clone(&stop),
                Arc::clone(init),
            );
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || {
                    if let Err(e) = init() {
                        exit.report(ExitReason::Error(format!(
                            "cannot confine vCPU {}: {e}",
                            vcpu.index()
                        )));
                        return None;
                    }
                    vcpu.run(&pio, &mmio, &stop, &exit);
                    Some(vcpu)
                })?;
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    /// Stops every vCPU and waits for its thread, for at most
    /// [`STOP_WAIT`] in all: a vCPU that does not leave (stuck outside
    /// `KVM_RUN`) is left to the process's exit rather than holding it up.
    /// Returns the vCPUs whose threads ended, in order.
    pub fn stop(&mut self) -> Vec<Vcpu> {
        let mut stopped = Vec::new();
        use std::time::{Duration, Instant};
        use vmm_sys_util::signal::Killable;
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_WAIT;
        for handle in self.handles.drain(..) {
            // A kick that lands just before the thread enters KVM_RUN is lost,
            // so kick again if it has not stopped, backing off: under nested
            // virtualization every kick is an interrupt storm for the host.
            let mut wait = Duration::from_micros(100);
            while !handle.is_finished() && Instant::now() < deadline {
                let _ = handle.kill(vmm_sys_util::signal::SIGRTMIN());
                let until = (Instant::now() + wait).min(deadline);
                while !handle.is_finished() && Instant::now() < until {
                    std::thread::sleep(Duration::from_micros(50));
                }
                wait = (wait * 2).min(Duration::from_millis(50));
            }
            if handle.is_finished() {
                if let Ok(Some(vcpu)) = handle.join() {
                    stopped.push(vcpu);
                }
            } else {
                tracing::warn!("a vCPU did not stop within {STOP_WAIT:?}; leaving it to the exit");
            }
        }
        stopped
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        drop(self.stop());
    }
}
