//! PID 1 reaps every child: one thread waits for any child and hands each
//! status to the process it belongs to. Orphans the agent never started are
//! reaped and forgotten, so no zombie stays behind.
//!
//! A child can exit before its spawner has registered it; the spawner holds
//! [`Reaper::lock`] from before the fork until it has registered the pid, so
//! the reaper thread (which takes the same lock to deliver) always finds it.

use capsid_base::lock;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use capsid_protocol::ExitStatus;

/// Where one process's exit status lands; waiters block on it.
#[derive(Debug, Default)]
pub struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    exited: Condvar,
}

impl ExitCell {
    pub fn set(&self, status: ExitStatus) {
        *lock(&self.status) = Some(status);
        self.exited.notify_all();
    }

    pub fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    pub fn wait(&self) -> ExitStatus {
        let mut status = lock(&self.status);
        loop {
            if let Some(status) = *status {
                return status;
            }
            status = capsid_base::wait(&self.exited, status);
        }
    }

    /// Waits up to `timeout`; None if still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let status = lock(&self.status);
        let (status, _) = self
            .exited
            .wait_timeout_while(status, timeout, |s| s.is_none())
            .unwrap_or_else(|e| e.into_inner());
        *status
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    watched: HashMap<i32, Arc<ExitCell>>,
}

impl Registry {
    pub fn watch(&mut self, pid: i32, cell: Arc<ExitCell>) {
        self.watched.insert(pid, cell);
    }
}

#[derive(Debug, Default)]
pub struct Reaper {
    registry: Mutex<Registry>,
    children: Condvar,
}

impl Reaper {
    /// Held across fork and `Registry::watch`.
    pub fn lock(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    /// Wakes the reaper thread after a fork (it sleeps while there are no
    /// children).
    pub fn child_started(&self) {
        self.children.notify_all();
    }

    /// The reaper thread's body; never returns.
    pub fn run(&self) -> ! {
        loop {
            let mut raw = 0;
            // SAFETY: `raw` is a valid place for the status.
            let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
            if pid > 0 {
                let status = decode(raw);
                let cell = lock(&self.registry).watched.remove(&pid);
                match cell {
                    Some(cell) => {
                        tracing::debug!(pid, ?status, "process exited");
                        cell.set(status);
                    }
                    None => tracing::trace!(pid, ?status, "reaped an orphan"),
                }
                continue;
            }
            // ECHILD: nothing to wait for until the next fork.
            let registry = lock(&self.registry);
            let _ = capsid_base::wait_timeout(&self.children, registry, Duration::from_secs(1));
        }
    }
}

/// A wait status as the protocol reports it.
pub fn decode(raw: i32) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decode_to_code_or_signal() {
        assert_eq!(decode(3 << 8), ExitStatus::Code(3));
        assert_eq!(decode(9), ExitStatus::Signal(9));
        assert_eq!(decode(0), ExitStatus::Code(0));
    }

    #[test]
    fn exit_cell_wakes_waiters() {
        let cell = Arc::new(ExitCell::default());
        assert_eq!(cell.wait_timeout(Duration::from_millis(1)), None);
        let setter = Arc::clone(&cell);
        let t = std::thread::spawn(move || setter.set(ExitStatus::Code(7)));
        assert_eq!(cell.wait(), ExitStatus::Code(7));
        t.join().unwrap();
    }
}
