//! The thread that serves one device's queues: an epoll loop over the
//! device's queue eventfds (and, for vsock, its sockets), plus a control
//! eventfd through which the transport activates, deactivates and stops it.
//!
//! ```text
//!  build ──spawn──▶ idle ──Activate(queues)──▶ serving ──Deactivate──▶ idle (ack)
//!                     └───────────────────────── Stop ─────────────────────▶ gone
//! ```
//!
//! The thread is spawned when the VM is built, before the guest runs and
//! before any seccomp filter is installed, and lives until the VMM ends.
//! So a vCPU never creates a thread (its filter does not allow it), every
//! thread's filter is its own rather than stacked on its creator's, and a
//! device reset costs a message and a bounded wait for the worker to let
//! go of the queues, never a join.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use virtio_queue::Queue;

use super::{ActivateContext, ActivateError};

/// The token reserved for the control eventfd.
const CONTROL_TOKEN: u64 = u64::MAX;
/// How long dropping a handle waits for its thread to end.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The epoll instance cannot be made.
    #[error("cannot set up the worker's epoll")]
    Epoll(#[source] std::io::Error),
    /// The thread cannot be spawned.
    #[error("cannot spawn the worker thread")]
    Spawn(#[source] std::io::Error),
}

/// Runs first on every thread the VMM starts (its seccomp filter).
pub type ThreadInit = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// A [`ThreadInit`] that does nothing (tests, and a VMM run without filters).
pub fn no_init() -> ThreadInit {
    Arc::new(|| Ok(()))
}

/// Adds and removes watched fds from inside an event handler.
#[derive(Debug)]
pub struct EventSetup<'a> {
    epoll: &'a Epoll,
}

impl<'a> EventSetup<'a> {
    /// Registrations go to `epoll`.
    pub fn new(epoll: &'a Epoll) -> Self {
        Self { epoll }
    }

    pub(crate) fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub(crate) fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub(crate) fn remove(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// A device's queue processing, run on its worker thread.
pub trait Worker: Send {
    /// Starts serving the queues the driver set up: registers their fds.
    fn activate(
        &mut self,
        ctx: ActivateContext,
        setup: &EventSetup<'_>,
    ) -> Result<(), ActivateError>;
    /// Stops serving them (a device reset, or a snapshot): unregisters what
    /// `activate` registered and gives the queues back, in the order
    /// `activate` took them (none if the device was not active).
    fn deactivate(&mut self, setup: &EventSetup<'_>) -> Vec<Queue>;
    /// Handles readiness `events` on the fd registered with `token`. Events
    /// of an fd just unregistered may still arrive once.
    fn handle(&mut self, token: u64, events: EventSet, setup: &EventSetup<'_>);
}

enum Command {
    Activate(ActivateContext),
    Deactivate,
    /// Answered once everything sent before it is done (tests).
    Sync,
    Stop,
}

/// A device's worker thread, as its transport holds it. Dropping it stops
/// the thread (waiting a bounded time).
#[derive(Debug)]
pub struct WorkerHandle {
    control: EventFd,
    commands: Sender<Command>,
    /// Answers to Deactivate (the queues) and Sync (none).
    acks: Receiver<Vec<Queue>>,
    /// The worker could not start, install its filter, or activate.
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Activate(_) => "Activate",
            Command::Deactivate => "Deactivate",
            Command::Sync => "Sync",
            Command::Stop => "Stop",
        })
    }
}

impl WorkerHandle {
    /// Starts `worker`, idle, on a thread called `name` that runs `init`
    /// first.
    pub fn spawn(
        name: &str,
        mut worker: Box<dyn Worker>,
        init: ThreadInit,
    ) -> Result<Self, WorkerError> {
        let control = EventFd::new(libc::EFD_NONBLOCK).map_err(WorkerError::Epoll)?;
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        EventSetup { epoll: &epoll }
            .add(control.as_raw_fd(), CONTROL_TOKEN, EventSet::IN)
            .map_err(WorkerError::Epoll)?;
        let (commands, inbox) = channel();
        let (ack, acks) = channel();
        let failed = Arc::new(AtomicBool::new(false));
        let thread = {
            let control = control.try_clone().map_err(WorkerError::Epoll)?;
            let failed = Arc::clone(&failed);
            let name = name.to_owned();
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    if let Err(e) = init() {
                        tracing::error!("{name}: cannot confine the worker thread: {e}");
                        failed.store(true, Ordering::Release);
                        // Serve nothing; only wait to be stopped.
                        wait_for_stop(&inbox, &ack);
                        return;
                    }
                    let mut thread = Thread {
                        name: &name,
                        epoll: &epoll,
                        control: &control,
                        inbox: &inbox,
                        ack: &ack,
                        failed: &failed,
                    };
                    thread.run(worker.as_mut());
                })
                .map_err(WorkerError::Spawn)?
        };
        Ok(Self {
            control,
            commands,
            acks,
            failed,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        let _ = self.control.write(1);
        sent
    }

    /// Hands the driver's queues to the worker; it serves them from now on.
    pub fn activate(&self, ctx: ActivateContext) {
        if !self.send(Command::Activate(ctx)) {
            self.failed.store(true, Ordering::Release);
        }
    }

    /// Takes the queues back (a device reset, a snapshot), waiting at most
    /// `timeout` for the worker to let go of them: the queues as the
    /// worker left them, or `None` if it did not answer in time.
    pub fn deactivate(&self, timeout: Duration) -> Option<Vec<Queue>> {
        if !self.send(Command::Deactivate) {
            return None;
        }
        self.acks.recv_timeout(timeout).ok()
    }

    /// Waits until the worker has handled every command sent so far.
    pub fn sync(&self, timeout: Duration) -> bool {
        self.send(Command::Sync) && self.acks.recv_timeout(timeout).is_ok()
    }

    /// Whether the worker could not start, confine itself or activate.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

fn wait_for_stop(inbox: &Receiver<Command>, ack: &Sender<Vec<Queue>>) {
    while let Ok(command) = inbox.recv() {
        match command {
            Command::Stop => return,
            Command::Deactivate | Command::Sync => {
                let _ = ack.send(Vec::new());
            }
            Command::Activate(_) => {}
        }
    }
}

struct Thread<'a> {
    name: &'a str,
    epoll: &'a Epoll,
    control: &'a EventFd,
    inbox: &'a Receiver<Command>,
    ack: &'a Sender<Vec<Queue>>,
    failed: &'a AtomicBool,
}

impl Thread<'_> {
    fn run(&mut self, worker: &mut dyn Worker) {
        let setup = EventSetup { epoll: self.epoll };
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: stops: epoll_wait failed: {e}", self.name);
                    self.failed.store(true, Ordering::Release);
                    wait_for_stop(self.inbox, self.ack);
                    return;
                }
            };
            for event in &events[..ready] {
                if event.data() == CONTROL_TOKEN {
                    if !self.commands(worker, &setup) {
                        return;
                    }
                } else {
                    worker.handle(event.data(), event.event_set(), &setup);
                }
            }
        }
    }

    /// Handles what the transport sent; false once told to stop.
    fn commands(&mut self, worker: &mut dyn Worker, setup: &EventSetup<'_>) -> bool {
        let _ = self.control.read();
        while let Ok(command) = self.inbox.try_recv() {
            match command {
                Command::Activate(ctx) => {
                    if let Err(e) = worker.activate(ctx, setup) {
                        tracing::error!("{}: cannot activate: {e}", self.name);
                        self.failed.store(true, Ordering::Release);
                    }
                }
                Command::Deactivate => {
                    let queues = worker.deactivate(setup);
                    let _ = self.ack.send(queues);
                }
                Command::Sync => {
                    let _ = self.ack.send(Vec::new());
                }
                Command::Stop => {
                    worker.deactivate(setup);
                    return false;
                }
            }
        }
        true
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(thread) = self.thread.take() {
            // A worker in the middle of a long disk request is not waited
            // for beyond the bound: the process is ending anyway.
            let deadline = Instant::now() + STOP_WAIT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!("a device worker did not stop within {STOP_WAIT:?}");
            }
        }
    }
}
