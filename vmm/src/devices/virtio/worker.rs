//! The thread that serves one activated device: an epoll loop over the
//! device's queue eventfds (and, for vsock, its sockets), plus a kill
//! eventfd through which [`WorkerHandle`] stops it.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// The token reserved for the kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the worker's epoll")]
    Epoll(#[source] std::io::Error),
    #[error("cannot spawn the worker thread")]
    Spawn(#[source] std::io::Error),
}

/// Adds and removes watched fds from inside an event handler.
#[derive(Debug)]
pub struct EventSetup<'a> {
    epoll: &'a Epoll,
}

impl<'a> EventSetup<'a> {
    pub fn new(epoll: &'a Epoll) -> Self {
        Self { epoll }
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// A device's event handling, run on its worker thread.
pub trait Worker: Send + 'static {
    /// Registers the fds to watch at start.
    fn init(&mut self, setup: &EventSetup<'_>) -> std::io::Result<()>;
    /// Handles readiness `events` on the fd registered with `token`.
    fn handle(&mut self, token: u64, events: EventSet, setup: &EventSetup<'_>);
}

/// A running worker; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct WorkerHandle {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts `worker` on a thread called `name`.
    pub fn spawn<W: Worker>(name: &str, mut worker: W) -> Result<Self, WorkerError> {
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Epoll)?;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        let setup = EventSetup { epoll: &epoll };
        setup
            .add(kill.as_raw_fd(), KILL_TOKEN, EventSet::IN)
            .map_err(WorkerError::Epoll)?;
        worker.init(&setup).map_err(WorkerError::Epoll)?;
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&epoll, &mut worker))
            .map_err(WorkerError::Spawn)?;
        Ok(Self {
            kill,
            thread: Some(thread),
        })
    }
}

fn run<W: Worker>(epoll: &Epoll, worker: &mut W) {
    let setup = EventSetup { epoll };
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("device worker stops: epoll_wait failed: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            if event.data() == KILL_TOKEN {
                return;
            }
            worker.handle(event.data(), event.event_set(), &setup);
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
