//! How the VM ends: the reasons, each with the exit status that says so,
//! and the [`ExitNotifier`] every part that can end it reports to (a vCPU,
//! the i8042 reset line, the signal thread). The first report wins. Its own
//! module so that the devices and vCPUs that report need nothing else of
//! [`crate::vmm`], which owns them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use capsid_base::lock;

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
    /// A snapshot was asked for through the API: the VM is paused, saved,
    /// and ends. Exit 0 once saved (the API reply says whether it was).
    Snapshot,
}

pub use capsid_vmm_api::{EXIT_GUEST_CRASH, EXIT_GUEST_SHUTDOWN, EXIT_SIGNAL_BASE, EXIT_VMM_ERROR};

impl ExitReason {
    /// The VMM's exit status for this reason (`capsid_vmm_api::exit`).
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestShutdown | ExitReason::Snapshot => EXIT_GUEST_SHUTDOWN,
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
            ExitReason::Snapshot => f.write_str("the VM was snapshotted"),
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
    /// A notifier no reason has been reported to yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(0)?,
            reason: Mutex::new(None),
        })
    }

    pub(crate) fn report(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason);
            let _ = self.evt.write(1);
        }
    }

    pub(crate) fn reason(&self) -> Option<ExitReason> {
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
