//! A built VM and how it ends.
//!
//! The main thread starts the vCPU threads and then waits on one eventfd,
//! the [`ExitNotifier`]. Whatever ends the VM reports its reason there: a vCPU
//! (triple fault, KVM error), the i8042 reset line (the guest rebooted), or
//! the signal thread (SIGTERM, SIGINT, SIGHUP). The first reason wins. Then
//! the vCPUs are stopped and joined, the device workers stopped, and the VM,
//! its memory and its sockets are released, in that order.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{Bus, lock};
use crate::memory::GuestRam;
use crate::vstate::vcpu::{Vcpu, VcpuThreads};
use crate::vstate::vm::Vm;

/// Why the VM ended, and the process exit status that says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted or shut down (i8042 reset, KVM system event). Exit 0.
    GuestShutdown,
    /// The guest crashed: triple fault, KVM internal error, failed entry. Exit 3.
    GuestCrash(String),
    /// The VMM was told to stop by a signal. Exit 128 + the signal number.
    Signal(i32),
    /// The VMM failed while running the guest. Exit 1.
    Error(String),
}

pub use capsid_vmm_api::{EXIT_GUEST_CRASH, EXIT_GUEST_SHUTDOWN, EXIT_SIGNAL_BASE, EXIT_VMM_ERROR};

impl ExitReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestShutdown => EXIT_GUEST_SHUTDOWN,
            ExitReason::GuestCrash(_) => EXIT_GUEST_CRASH,
            ExitReason::Signal(signal) => EXIT_SIGNAL_BASE + signal,
            ExitReason::Error(_) => EXIT_VMM_ERROR,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestShutdown => f.write_str("the guest shut down"),
            ExitReason::GuestCrash(why) => write!(f, "the guest crashed: {why}"),
            ExitReason::Signal(signal) => write!(f, "stopped by signal {signal}"),
            ExitReason::Error(why) => write!(f, "VMM error: {why}"),
        }
    }
}

/// Where the reason the VM ends is reported; the first report wins.
#[derive(Debug)]
pub struct ExitNotifier {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(0)?,
            reason: Mutex::new(None),
        })
    }

    pub fn report(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            let _ = self.evt.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    /// Blocks until a reason has been reported or one of the blocked stop
    /// signals arrives on `signals` (a signalfd), and returns the reason.
    pub fn wait_or_signal(&self, signals: &OwnedFd) -> ExitReason {
        let mut fds = [
            libc::pollfd {
                fd: self.evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            // SAFETY: `fds` is an array of two pollfds that outlives the call.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                self.report(ExitReason::Error(format!("waiting for the VM to end: {e}")));
                continue;
            }
            if fds[1].revents != 0 {
                // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::signalfd_siginfo>();
                // SAFETY: `info` is writable for `size` bytes.
                let n = unsafe { libc::read(signals.as_raw_fd(), (&raw mut info).cast(), size) };
                if usize::try_from(n).is_ok_and(|n| n == size) {
                    let signal = i32::try_from(info.ssi_signo).unwrap_or(libc::SIGTERM);
                    self.report(ExitReason::Signal(signal));
                }
            }
            if fds[0].revents != 0 {
                let _ = self.evt.read();
            }
        }
    }

    /// Blocks until a reason has been reported and returns it.
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            if let Err(e) = self.evt.read()
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                return ExitReason::Error(format!("waiting for the VM to end: {e}"));
            }
        }
    }
}

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
    /// Held, not used: the VM and its RAM must outlive the vCPUs and devices.
    pub(crate) _vm: Vm,
    pub(crate) _ram: Arc<GuestRam>,
    pub(crate) started: Instant,
    /// What each vCPU thread runs first (its seccomp filter).
    pub(crate) vcpu_init: crate::devices::virtio::ThreadInit,
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
        self.vcpu_threads.stop();
        reason
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
