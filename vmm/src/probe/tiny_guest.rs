//! A hand-assembled 64-bit guest that counts a register down from N to zero and
//! then writes one byte to an I/O port.
//!
//! It answers one question honestly: does this `/dev/kvm` run guest
//! instructions on the CPU (hardware virtualization, native or nested), or does
//! it emulate them? A real Linux guest needs the former. The paravirtual (PVM)
//! KVM on our build machines emulates an unmodified guest at roughly 700k
//! instructions/s, so the loop below, 2N instructions, takes seconds there and
//! about a millisecond on hardware.
//!
//! The vCPU starts in long mode exactly as capsid-vmm starts a kernel through
//! the 64-bit boot protocol (`capsid_vmm::arch::regs`: its GDT at 0x500, its
//! identity page tables at 0x9000), so this probe also checks that setup on
//! any KVM. The code sits at 0x1000 in 2 MiB of RAM.

use std::thread;
use std::time::{Duration, Instant};

use crate::arch::layout::GDT_ADDR;
use crate::arch::regs::{self, BootProtocol};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// Why the tiny guest could not report a loop time.
#[derive(Debug, thiserror::Error)]
pub enum TinyGuestError {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM set-up call failed.
    #[error("KVM setup failed: {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory cannot be allocated.
    #[error("cannot allocate guest memory")]
    Memory(#[source] vm_memory::mmap::FromRangesError),
    /// Guest memory cannot be written.
    #[error("cannot write guest memory")]
    WriteMemory(#[source] vm_memory::GuestMemoryError),
    /// `KVM_RUN` failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The guest exited in a way it should not.
    #[error("the guest stopped with an unexpected exit: {0}")]
    UnexpectedExit(String),
    /// The guest did not finish in time.
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    /// The kick signal handler cannot be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

const MEM_SIZE: usize = 2 << 20;
const CODE_ADDR: u64 = 0x1000;
/// The port the guest writes to when its loop is done.
const DONE_PORT: u16 = 0x0cc0;
const DONE_VALUE: u8 = 0x2a;

/// The guest's code: `mov ecx, N; 1: dec ecx; jnz 1b; mov dx, PORT; mov al, V; out dx, al; hlt`.
fn code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0x66, 0xba]);
    code.extend_from_slice(&DONE_PORT.to_le_bytes());
    code.extend_from_slice(&[0xb0, DONE_VALUE, 0xee, 0xf4]);
    code
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs the counting loop for `iterations` rounds in a fresh one-vCPU VM and
/// returns the time from the first `KVM_RUN` to the guest's "done" write.
/// A guest still running after `timeout` is interrupted and reported as
/// [`TinyGuestError::Timeout`]; no thread is left behind.
pub fn time_loop(iterations: u32, timeout: Duration) -> Result<Duration, TinyGuestError> {
    let kvm = Kvm::new().map_err(TinyGuestError::OpenKvm)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| TinyGuestError::Setup("KVM_GET_SUPPORTED_CPUID", e))?;
    // Declared before the VM so that it outlives the VM that maps it.
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(TinyGuestError::Memory)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| TinyGuestError::Setup("KVM_CREATE_VM", e))?;
    let host_addr = memory
        .get_host_address(GuestAddress(0))
        .map_err(TinyGuestError::WriteMemory)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host_addr as u64,
    };
    // SAFETY: `region` describes the `memory` mapping just created, which is
    // MEM_SIZE bytes long and is dropped only after `vm` (declared later).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| TinyGuestError::Setup("KVM_SET_USER_MEMORY_REGION", e))?;

    let write = |addr: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(TinyGuestError::WriteMemory)
    };
    write(GDT_ADDR, &regs::gdt_bytes())?;
    for (addr, table) in regs::page_tables() {
        write(addr, &table)?;
    }
    write(CODE_ADDR, &code(iterations))?;

    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| TinyGuestError::Setup("KVM_CREATE_VCPU", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| TinyGuestError::Setup("KVM_SET_CPUID2", e))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| TinyGuestError::Setup("KVM_GET_SREGS", e))?;
    regs::set_boot_sregs(&mut sregs, BootProtocol::Linux64);
    vcpu.set_sregs(&sregs)
        .map_err(|e| TinyGuestError::Setup("KVM_SET_SREGS", e))?;
    let registers = regs::boot_regs(BootProtocol::Linux64, CODE_ADDR);
    vcpu.set_regs(&registers)
        .map_err(|e| TinyGuestError::Setup("KVM_SET_REGS", e))?;

    // The vCPU runs on its own thread so that a guest that never finishes can
    // be interrupted: a signal makes KVM_RUN return EINTR.
    register_signal_handler(SIGRTMIN(), ignore_kick).map_err(TinyGuestError::SignalHandler)?;
    let runner = thread::spawn(move || -> Result<Duration, TinyGuestError> {
        let start = Instant::now();
        loop {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(DONE_PORT, [DONE_VALUE])) => return Ok(start.elapsed()),
                Ok(exit) => return Err(TinyGuestError::UnexpectedExit(format!("{exit:?}"))),
                Err(e) if e.errno() == libc::EINTR => {
                    if start.elapsed() >= timeout {
                        return Err(TinyGuestError::Timeout(timeout));
                    }
                }
                Err(e) => return Err(TinyGuestError::Run(e)),
            }
        }
    });
    let deadline = Instant::now() + timeout;
    while !runner.is_finished() {
        if Instant::now() >= deadline {
            // Keep kicking: a signal that lands outside KVM_RUN is lost.
            let _ = runner.kill(SIGRTMIN());
        }
        thread::sleep(Duration::from_millis(5));
    }
    runner.join().unwrap_or_else(|_| {
        Err(TinyGuestError::UnexpectedExit(
            "vCPU thread panicked".into(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_jumps_back_to_the_decrement() {
        let code = code(7);
        assert_eq!(&code[..5], &[0xb9, 7, 0, 0, 0]);
        // `jnz` at offset 7 is two bytes long; its target is the `dec` at 5.
        let jnz_end = 9i32;
        let displacement = i32::from(code[8].cast_signed());
        assert_eq!(jnz_end + displacement, 5);
        assert_eq!(code.last(), Some(&0xf4));
    }

    #[test]
    fn guest_counts_down_and_reports_done() {
        if !crate::probe::kvm_for_test("guest_counts_down_and_reports_done") {
            return;
        }
        // Any KVM, even an emulating one, runs this tiny guest to its end.
        let elapsed = time_loop(10_000, Duration::from_secs(30)).unwrap();
        assert!(elapsed < Duration::from_secs(30));
    }

    #[test]
    fn a_guest_that_runs_too_long_is_interrupted() {
        if !crate::probe::kvm_for_test("a_guest_that_runs_too_long_is_interrupted") {
            return;
        }
        // 4 billion iterations take seconds even on hardware.
        let started = std::time::Instant::now();
        let result = time_loop(u32::MAX, Duration::from_millis(200));
        assert!(
            matches!(result, Err(TinyGuestError::Timeout(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
