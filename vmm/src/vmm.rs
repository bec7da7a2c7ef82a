//! A built VM and how it ends ([`crate::exit`]).
//!
//! The main thread starts the vCPU threads and then waits on one eventfd,
//! the [`ExitNotifier`]. Whatever ends the VM reports its reason there: a vCPU
//! (triple fault, KVM error), the i8042 reset line (the guest rebooted), or
//! the signal thread (SIGTERM, SIGINT, SIGHUP). The first reason wins. Then
//! the vCPUs are stopped and joined, the device workers stopped, and the VM,
//! its memory and its sockets are released, in that order.

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use capsid_base::lock;

use crate::devices::bus::Bus;
use crate::devices::legacy::SerialConsole;
use crate::devices::virtio::block::DiskSlots;
use crate::devices::virtio::mmio::MmioTransport;
use crate::memory::GuestRam;
use crate::snapshot::{DeviceStates, SnapshotDesk, SnapshotState};
use crate::vstate::vcpu::{Vcpu, VcpuThreads};
use crate::vstate::vm::Vm;

pub use crate::exit::{
    EXIT_GUEST_CRASH, EXIT_GUEST_SHUTDOWN, EXIT_SIGNAL_BASE, EXIT_VMM_ERROR, ExitNotifier,
    ExitReason,
};

/// A VM ready to run, as [`crate::build`] made it.
///
/// Fields drop in declaration order: the API before vCPUs, vCPUs before
/// devices, devices before the VM, the VM before its memory.
pub struct Vmm {
    /// Held, not used: dropping it closes and removes the API socket.
    pub(crate) _api: Option<crate::api::ApiServer>,
    pub(crate) vcpu_threads: VcpuThreads,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) exit: Arc<ExitNotifier>,
    /// The devices with state, for a snapshot (also on the buses).
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) slots: Arc<DiskSlots>,
    pub(crate) snapshots: Arc<SnapshotDesk>,
    /// The VM and its RAM outlive the vCPUs and devices.
    pub(crate) vm: Arc<Vm>,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) started: Instant,
    /// What each vCPU thread runs first (its seccomp filter).
    pub(crate) vcpu_init: crate::devices::virtio::ThreadInit,
    /// How many vCPUs the VM has (they leave `vcpus` when they start).
    pub(crate) vcpu_count: u8,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        // Before the API thread is stopped and joined: a snapshot request
        // waiting there hears that there will be none.
        drop(self.snapshots.close());
    }
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Where to report a reason to end the VM from outside (signals, tests).
    pub fn exit_notifier(&self) -> Arc<ExitNotifier> {
        Arc::clone(&self.exit)
    }

    /// Runs the guest until it ends, then frees everything. Returns why it
    /// ended. `signals` is the signalfd of [`block_stop_signals`];
    /// `main_init` runs on this thread once every other thread has started
    /// (it installs the main thread's seccomp filter).
    pub fn run<E: std::fmt::Display>(
        mut self,
        signals: OwnedFd,
        main_init: impl FnOnce() -> Result<(), E>,
    ) -> ExitReason {
        let vcpus = std::mem::take(&mut self.vcpus);
        self.vcpu_count = u8::try_from(vcpus.len()).unwrap_or(u8::MAX);
        match VcpuThreads::start(
            vcpus,
            Arc::clone(&self.pio),
            Arc::clone(&self.mmio),
            Arc::clone(&self.exit),
            &self.vcpu_init,
        ) {
            Ok(threads) => self.vcpu_threads = threads,
            Err(e) => return ExitReason::Error(format!("cannot start the vCPU threads: {e}")),
        }
        let ready_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            ready_us,
            cpu_us = crate::devices::legacy::process_cpu_us(),
            "vCPUs running"
        );
        if let Err(e) = main_init() {
            self.exit.report(ExitReason::Error(format!(
                "cannot confine the main thread: {e}"
            )));
        }
        let reason = self.exit.wait_or_signal(&signals);
        let mut vcpus = self.vcpu_threads.stop();
        if matches!(reason, ExitReason::Signal(_)) {
            // Stopped from outside, maybe because the guest hung: say where
            // it was (an address of the guest kernel's System.map).
            for vcpu in &vcpus {
                tracing::info!("stopped from outside: {}", vcpu.describe_stopped());
            }
        }
        // A snapshot job is taken even when another reason won, so that
        // its requester hears at once that there will be none.
        match (self.snapshots.close(), &reason) {
            (Some(job), ExitReason::Snapshot) => {
                let paused = Instant::now();
                let outcome = self.save(&mut vcpus, &job.state, &job.memory);
                let saved_ms = u64::try_from(paused.elapsed().as_millis()).unwrap_or(u64::MAX);
                let failed = outcome.as_ref().err().cloned();
                job.answer(outcome.map(|()| saved_ms));
                match failed {
                    None => {
                        tracing::info!(saved_ms, "snapshot taken");
                        reason
                    }
                    Some(why) => ExitReason::Error(format!("the snapshot failed: {why}")),
                }
            }
            _ => reason,
        }
    }

    /// Saves the paused VM (`vcpus` are all of its vCPUs, stopped) into
    /// the state and memory files of a snapshot request. The devices stop
    /// serving their queues; the VM does not run again.
    fn save(&self, vcpus: &mut [Vcpu], state: &File, memory: &File) -> Result<(), String> {
        if vcpus.len() != usize::from(self.vcpu_count) {
            return Err(format!(
                "only {} of {} vCPUs stopped",
                vcpus.len(),
                self.vcpu_count
            ));
        }
        if self.slots.attached() > 0 {
            return Err("images are attached to spare slots; detach them before a snapshot".into());
        }
        let kvm = |e: crate::vstate::vm::VmError| capsid_base::error_chain(&e);
        let mut vcpu_states = Vec::with_capacity(vcpus.len());
        for vcpu in vcpus {
            vcpu.finish_pending_io().map_err(kvm)?;
            vcpu_states.push(vcpu.save_state(&self.vm).map_err(kvm)?);
        }
        let vm_state = self.vm.save_state().map_err(kvm)?;
        let mut virtio = Vec::with_capacity(self.transports.len());
        for transport in &self.transports {
            virtio.push(lock(transport).save().map_err(|e| e.to_string())?);
        }
        let devices = DeviceStates {
            serial: lock(&self.serial).save(),
            virtio,
        };
        self.ram
            .save_to(memory)
            .map_err(|e| format!("cannot write the memory file: {e}"))?;
        SnapshotState::new(self.ram.size(), vm_state, vcpu_states, devices)
            .write_to(state)
            .map_err(|e| format!("cannot write the state file: {e}"))
    }
}

extern "C" fn note_stop_signal(_: libc::c_int) {}

/// Blocks SIGTERM, SIGINT and SIGHUP for this thread and every thread it
/// starts, and returns a signalfd that reads them: the main thread waits
/// on it beside the exit eventfd, so no thread of ours runs a signal
/// handler for them and none needs a syscall to pass one on. A handler is
/// installed all the same: the VMM may be PID 1 of its namespace, where a
/// signal from outside with the default disposition is dropped before it
/// could be queued.
pub fn block_stop_signals() -> std::io::Result<OwnedFd> {
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];
    for signal in signals {
        // SAFETY: a handler that does nothing is async-signal-safe.
        if unsafe { libc::signal(signal, note_stop_signal as *const () as libc::sighandler_t) }
            == libc::SIG_ERR
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    let set = crate::jail::signal_set(&signals);
    // SAFETY: `set` is a valid sigset_t.
    if unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `set` is valid; -1 makes a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &raw const set, libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_wakes_the_waiter() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let waiter = {
            let exit = Arc::clone(&exit);
            std::thread::spawn(move || exit.wait())
        };
        exit.report(ExitReason::GuestCrash("triple fault".into()));
        exit.report(ExitReason::GuestShutdown);
        assert_eq!(
            waiter.join().unwrap(),
            ExitReason::GuestCrash("triple fault".into())
        );
    }

    #[test]
    fn exit_codes_follow_the_documented_table() {
        assert_eq!(ExitReason::GuestShutdown.exit_code(), 0);
        assert_eq!(ExitReason::Error(String::new()).exit_code(), 1);
        assert_eq!(ExitReason::GuestCrash(String::new()).exit_code(), 3);
        assert_eq!(ExitReason::Signal(libc::SIGTERM).exit_code(), 143);
    }
}
