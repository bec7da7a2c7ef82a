//! A container in a sandbox, and its processes (the init and execs).
//!
//! Each process goes through this state machine; [`Process::wait`] blocks
//! until `Stopped`, and the exit is reported once the process's output
//! has drained ([`ProcessIo::drain`]):
//!
//! ```text
//!  Created ──start──▶ Running ──the agent's WaitProcess answers──▶ Stopped(status)
//!     │   │              └──the VM died (the wait broke)──────────▶ Stopped(255)
//!     │   └──start refused──▶ Stopped(127 not found | 126 cannot run)
//!     └──kill before start──▶ Stopped(128 + signal)
//! ```
//!
//! Statuses follow runc's: a code, or 128 + the signal that ended it.
//!
//! `Io` is what an adapter keeps with each process for its stdio (the
//! shim's FIFO copiers; nothing for the CLI, which copies on its own).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use capsid_protocol::{
    ClientError, ContainerStats, ExecProcess, ExitStatus, ProcessRef, StdioRequest,
};
use oci_spec::runtime::LinuxResources;

use crate::agent::Agent;
use crate::sandbox::{Sandbox, SandboxError};
use capsid_base::lock;

/// The status of a process whose VM died under it.
pub const VM_DIED_STATUS: u32 = 255;
/// How long an exit waits for the process's output to drain.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(60);

/// What an adapter keeps with a process for its stdio.
pub trait ProcessIo: Send + Sync + 'static {
    /// Waits, at most `bound`, until the process's output has reached its
    /// reader, so an exit never overtakes the output.
    fn drain(&self, _bound: Duration) {}
}

impl ProcessIo for () {}

/// Where a process is in its life: Created → Running → Stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Made in the guest, its program not started.
    Created,
    /// Its program runs.
    Running,
    /// It ended (or never started, or its VM died).
    Stopped {
        /// runc's status: the code, 128 + a signal, 255 for a dead VM.
        status: u32,
        /// When the host learnt it.
        at: SystemTime,
    },
}

/// The init process or an exec.
#[derive(Debug)]
pub struct Process<Io = ()> {
    /// Which process of which container.
    pub process: ProcessRef,
    /// What the host sees as the process's pid: the VM's (its VMM's). The
    /// guest chooses its own pids; a host tool acting on one of those
    /// would hit whatever host process has it.
    pub pid: u32,
    /// What the adapter keeps with it (the shim: its FIFO copiers).
    pub io: Io,
    state: Mutex<ProcState>,
    changed: Condvar,
}

impl<Io> Process<Io> {
    /// A created process.
    pub fn new(process: ProcessRef, pid: u32, io: Io) -> Self {
        Self {
            process,
            pid,
            io,
            state: Mutex::new(ProcState::Created),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcState> {
        lock(&self.state)
    }

    /// Its state now.
    pub fn state(&self) -> ProcState {
        *self.lock()
    }

    /// The exec's id; `None` for the init.
    pub fn exec_id(&self) -> Option<&str> {
        self.process.exec_id.as_deref()
    }

    fn set_running(&self) {
        let mut state = self.lock();
        if *state == ProcState::Created {
            *state = ProcState::Running;
        }
    }

    /// Marks the process stopped with `status`, unless it already was;
    /// returns the state it is in now.
    pub fn set_stopped(&self, status: u32) -> ProcState {
        self.stop(status, false, |_| {});
        self.state()
    }

    /// Marks the process stopped, unless it already was, and then calls
    /// `notify` with the lock still held: whoever sees it stopped (a
    /// [`Process::wait`], a state query) sees it after `notify` ran, so an
    /// exit event queued there comes before anything they do next.
    fn stop(&self, status: u32, oom_killed: bool, notify: impl FnOnce(Exit)) {
        let mut state = self.lock();
        if matches!(*state, ProcState::Stopped { .. }) {
            return;
        }
        let at = SystemTime::now();
        *state = ProcState::Stopped { status, at };
        notify(Exit {
            status,
            at,
            oom_killed,
        });
        self.changed.notify_all();
    }

    /// Blocks until the process has stopped; its status and when.
    pub fn wait(&self) -> (u32, SystemTime) {
        let mut state = self.lock();
        loop {
            if let ProcState::Stopped { status, at } = *state {
                return (status, at);
            }
            state = capsid_base::wait(&self.changed, state);
        }
    }
}

/// How a process ended, as [`Container::start`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Its code, or 128 + the signal that ended it.
    pub status: u32,
    /// When the host learnt it.
    pub at: SystemTime,
    /// The init ended with the container's cgroup having OOM-killed a
    /// process (the guest's count).
    pub oom_killed: bool,
}

/// A container created in a [`Sandbox`] (see [`Sandbox::create`]).
#[derive(Debug)]
pub struct Container<Io = ()> {
    /// Its id.
    pub id: String,
    sandbox: Arc<Sandbox>,
    /// The disk its rootfs image was attached as, when it joined a pod.
    disk: Option<String>,
    /// Its init process.
    pub init: Arc<Process<Io>>,
    execs: Mutex<HashMap<String, Arc<Process<Io>>>>,
    /// Whether its processes are frozen ([`Container::pause`]).
    paused: std::sync::atomic::AtomicBool,
}

impl<Io: ProcessIo> Container<Io> {
    pub(crate) fn new(
        id: String,
        sandbox: Arc<Sandbox>,
        disk: Option<String>,
        init: Process<Io>,
    ) -> Self {
        Self {
            id,
            sandbox,
            disk,
            init: Arc::new(init),
            execs: Mutex::new(HashMap::new()),
            paused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Freezes every process of the container in the guest (its cgroup),
    /// as runc's `pause`; only a running container can be paused.
    pub fn pause(&self) -> Result<(), SandboxError> {
        if self.init.state() != ProcState::Running {
            return Err(SandboxError::NotRunning(self.id.clone()));
        }
        self.agent()
            .freeze(&self.id, true)
            .map_err(|e| self.sandbox.explain(e))?;
        self.paused
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Thaws what [`Container::pause`] froze.
    pub fn resume(&self) -> Result<(), SandboxError> {
        if !self.paused() {
            return Err(SandboxError::NotPaused(self.id.clone()));
        }
        self.agent()
            .freeze(&self.id, false)
            .map_err(|e| self.sandbox.explain(e))?;
        self.paused
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether its processes are frozen; a container whose init has ended
    /// is not.
    pub fn paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::Acquire)
            && self.init.state() == ProcState::Running
    }

    /// The sandbox (VM) it runs in.
    pub fn sandbox(&self) -> &Arc<Sandbox> {
        &self.sandbox
    }

    /// Its sandbox's agent.
    pub fn agent(&self) -> &dyn Agent {
        &**self.sandbox.agent()
    }

    /// Adds process `exec_id` (not started); `attach` connects its stdio.
    pub fn exec<E: From<SandboxError>>(
        &self,
        exec_id: &str,
        spec: oci_spec::runtime::Process,
        stdio: StdioRequest,
        attach: impl FnOnce(&dyn Agent, &ProcessRef) -> Result<Io, E>,
    ) -> Result<Arc<Process<Io>>, E> {
        if self.paused() {
            return Err(SandboxError::Paused(self.id.clone()).into());
        }
        let process = ProcessRef::exec(&self.id, exec_id);
        let pid = self
            .agent()
            .exec_process(ExecProcess {
                process: process.clone(),
                spec,
                stdio,
            })
            .map_err(|e| self.sandbox.explain(e))?;
        let io = attach(self.agent(), &process)?;
        log::info!("{}: exec {exec_id} is pid {pid} in the guest", self.id);
        let proc = Arc::new(Process::new(process, self.sandbox.vmm_pid(), io));
        lock(&self.execs).insert(exec_id.to_owned(), Arc::clone(&proc));
        Ok(proc)
    }

    /// The init (`""`) or exec `exec_id`.
    pub fn find(&self, exec_id: &str) -> Option<Arc<Process<Io>>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        lock(&self.execs).get(exec_id).cloned()
    }

    /// Forgets a finished exec.
    pub fn forget(&self, exec_id: &str) {
        lock(&self.execs).remove(exec_id);
    }

    /// Starts `proc` and, on a thread of its own, waits for it to exit;
    /// then drains its output, marks it stopped and calls `on_exit`, once,
    /// with the process's lock held: it must not block (queue an event),
    /// and whoever waits on the process sees it stopped only after it ran.
    /// A process the agent could not start has ended, as with runc (127:
    /// not found, 126: could not run): it is stopped, `on_exit` is called,
    /// and the error returned.
    pub fn start(
        &self,
        proc: &Arc<Process<Io>>,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) -> Result<(), SandboxError> {
        if proc.state() != ProcState::Created {
            return Err(SandboxError::AlreadyStarted(proc.process.clone()));
        }
        if let Err(e) = self.agent().start_process(&proc.process) {
            // The agent says which (ErrorCode::start_status); any other
            // failure to start is runc's 126 too.
            let code = match &e {
                ClientError::Agent { code, .. } => code.start_status().unwrap_or(126),
                _ => 126,
            };
            proc.stop(u32::from(code), false, on_exit);
            return Err(self.sandbox.explain(e));
        }
        proc.set_running();
        let proc = Arc::clone(proc);
        let agent = Arc::clone(self.sandbox.agent());
        // Weak: a process that outlives its container must not keep the VM.
        let sandbox = Arc::downgrade(&self.sandbox);
        std::thread::spawn(move || {
            let waited = agent.wait_process(&proc.process);
            // Asked before the exit is told, so the two arrive in order.
            let oom_killed = waited.is_ok()
                && proc.exec_id().is_none()
                && agent
                    .stats(&proc.process.container_id)
                    .is_ok_and(|stats| stats.memory_events.oom_kill > 0);
            let status = match waited {
                Ok(ExitStatus::Code(code)) => u32::try_from(code).unwrap_or(VM_DIED_STATUS),
                Ok(status) => u32::try_from(status.shell_code()).unwrap_or(VM_DIED_STATUS),
                Err(e) => {
                    log::error!(
                        "{}: lost the process: {}; {}",
                        proc.process,
                        capsid_base::error_chain(&e),
                        sandbox.upgrade().map_or_else(
                            || "the micro-VM was taken down".into(),
                            |sandbox| sandbox.post_mortem()
                        )
                    );
                    VM_DIED_STATUS
                }
            };
            proc.io.drain(OUTPUT_DRAIN);
            proc.stop(status, oom_killed, on_exit);
        });
        Ok(())
    }

    /// Sends `signal` (1 to 64) to `proc`, or with `all` to every process
    /// of the container. A process never started ends here, killed by it:
    /// it is stopped with 128 + `signal` and `on_exit` told as
    /// [`Container::start`] tells it (not at all if another caller
    /// stopped it first).
    pub fn kill(
        &self,
        proc: &Process<Io>,
        signal: u32,
        all: bool,
        on_exit: impl FnOnce(Exit),
    ) -> Result<(), SandboxError> {
        let number = i32::try_from(signal).unwrap_or(i32::MAX);
        match proc.state() {
            ProcState::Stopped { .. } => Err(SandboxError::Finished(proc.process.clone())),
            ProcState::Created => {
                // Nothing waits on it in the guest yet.
                let _ = self
                    .agent()
                    .signal_process(&proc.process, libc::SIGKILL, false);
                proc.stop(128 + signal, false, on_exit);
                Ok(())
            }
            ProcState::Running => self
                .agent()
                .signal_process(&proc.process, number, all)
                .map_err(|e| self.sandbox.explain(e)),
        }
    }

    /// Its cgroup counters, as the guest measured them.
    pub fn stats(&self) -> Result<ContainerStats, SandboxError> {
        self.agent()
            .stats(&self.id)
            .map_err(|e| self.sandbox.explain(e))
    }

    /// New cgroup limits in the guest. The VM's own size is fixed at boot:
    /// memory beyond the VM's is no limit at all.
    pub fn update(&self, resources: LinuxResources) -> Result<(), SandboxError> {
        self.agent()
            .update_resources(&self.id, resources)
            .map_err(|e| self.sandbox.explain(e))
    }

    /// The guest pids of its processes.
    pub fn guest_pids(&self) -> Result<Vec<u32>, SandboxError> {
        self.agent()
            .list_processes(&self.id)
            .map_err(|e| self.sandbox.explain(e))
    }

    /// Marks every process stopped (the VM is gone or going).
    pub fn stop_all(&self) {
        self.init.set_stopped(VM_DIED_STATUS);
        for proc in lock(&self.execs).values() {
            proc.set_stopped(VM_DIED_STATUS);
        }
    }

    /// Removes the container from its VM and its disk from the VM; the
    /// VM goes down with its last container.
    pub fn destroy(&self) {
        if self.sandbox.running()
            && let Err(e) = self.agent().remove_container(&self.id)
        {
            log::warn!("{}: {}", self.id, capsid_base::error_chain(&e));
        }
        self.stop_all();
        self.sandbox.leave(&self.id, self.disk.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeAgent, FakeVm, sandbox};
    use capsid_protocol::ErrorCode;
    use std::sync::mpsc;

    fn container() -> (Container, Arc<FakeAgent>, Arc<FakeVm>) {
        let (sandbox, agent, vm) = sandbox(None);
        let container = sandbox
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap();
        (container, agent, vm)
    }

    fn exits(container: &Container, proc: &Arc<Process>) -> mpsc::Receiver<u32> {
        let (tx, rx) = mpsc::channel();
        container
            .start(proc, move |exit| tx.send(exit.status).unwrap())
            .unwrap();
        rx
    }

    #[test]
    fn only_a_running_container_pauses_and_only_a_paused_one_resumes() {
        let (container, agent, _) = container();
        let init = Arc::clone(&container.init);
        assert!(matches!(
            container.pause(),
            Err(SandboxError::NotRunning(_))
        ));
        let exited = exits(&container, &init);
        assert!(matches!(
            container.resume(),
            Err(SandboxError::NotPaused(_))
        ));
        container.pause().unwrap();
        assert!(container.paused());
        container.resume().unwrap();
        assert!(!container.paused());
        container.pause().unwrap();
        // An exec would join the frozen cgroup and hang: refused.
        let exec = container.exec(
            "e1",
            oci_spec::runtime::Process::default(),
            StdioRequest::default(),
            |_, _| Ok::<_, SandboxError>(()),
        );
        assert!(matches!(exec, Err(SandboxError::Paused(_))), "{exec:?}");
        let calls = agent.calls();
        assert_eq!(
            calls.iter().filter(|c| c.starts_with("Freeze")).count(),
            3,
            "{calls:?}"
        );
        assert!(calls.contains(&"Freeze c1 false".to_owned()), "{calls:?}");
        // A container whose init ended is no longer paused.
        agent.exit(&init.process, ExitStatus::Code(0));
        assert_eq!(exited.recv_timeout(Duration::from_secs(5)), Ok(0));
        assert!(!container.paused());
    }

    #[test]
    fn a_start_or_a_query_that_loses_the_agent_says_how_the_vm_ended() {
        let (container, agent, vm) = container();
        let init = Arc::clone(&container.init);
        agent.vm_died();
        vm.crash();
        let lost = |e: SandboxError| {
            assert!(matches!(e, SandboxError::Lost { .. }), "{e:?}");
            let text = capsid_base::error_chain(&e);
            assert!(text.ends_with("the fake VM stopped"), "{text}");
        };
        lost(container.start(&init, |_| {}).unwrap_err());
        // A process the agent could not start has ended (runc's 126).
        assert_eq!(init.wait().0, 126);
        lost(container.stats().unwrap_err());
        lost(container.guest_pids().unwrap_err());
        lost(
            container
                .update(oci_spec::runtime::LinuxResources::default())
                .unwrap_err(),
        );
    }

    #[test]
    fn an_exit_is_reported_once_with_runcs_status() {
        let (container, agent, _) = container();
        let init = Arc::clone(&container.init);
        let exited = exits(&container, &init);
        assert_eq!(init.state(), ProcState::Running);
        agent.exit(&init.process, ExitStatus::Signal(libc::SIGTERM));
        assert_eq!(exited.recv_timeout(Duration::from_secs(5)), Ok(143));
        assert_eq!(init.wait().0, 143);
        assert!(matches!(
            container.start(&init, |_| {}),
            Err(SandboxError::AlreadyStarted(_))
        ));
        // The pid the host sees is the VMM's.
        assert_eq!(init.pid, FakeVm::PID);
    }

    #[test]
    fn a_vm_that_dies_stops_every_process_with_255() {
        let (container, agent, vm) = container();
        let init = Arc::clone(&container.init);
        let exec = container
            .exec(
                "e1",
                oci_spec::runtime::Process::default(),
                StdioRequest::default(),
                |_, _| Ok::<_, SandboxError>(()),
            )
            .unwrap();
        let init_exit = exits(&container, &init);
        let exec_exit = exits(&container, &exec);
        vm.crash();
        agent.vm_died();
        assert_eq!(init_exit.recv_timeout(Duration::from_secs(5)), Ok(255));
        assert_eq!(exec_exit.recv_timeout(Duration::from_secs(5)), Ok(255));
    }

    #[test]
    fn a_process_that_cannot_start_has_ended_as_runcs_would() {
        // By the agent's code, not its words: the agent says "not found in
        // PATH", which the old match on "No such file" took for 126.
        for (code, message, status) in [
            (
                ErrorCode::ProgramNotFound,
                "exec x: not found in PATH /bin",
                127,
            ),
            (
                ErrorCode::ProgramNotExecutable,
                "exec /bin: Permission denied",
                126,
            ),
            (
                ErrorCode::FailedPrecondition,
                "exec: No such file or directory",
                126,
            ),
        ] {
            let (container, agent, _) = container();
            agent.refuse_with("StartProcess", code, message);
            let (tx, rx) = mpsc::channel();
            let init = Arc::clone(&container.init);
            assert!(
                container
                    .start(&init, move |exit| tx.send(exit.status).unwrap())
                    .is_err()
            );
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(1)),
                Ok(status),
                "{code:?}"
            );
            assert!(matches!(
                init.state(),
                ProcState::Stopped { status: s, .. } if s == status
            ));
        }
    }

    #[test]
    fn killing_a_process_never_started_ends_it_and_a_finished_one_is_refused() {
        let (container, agent, _) = container();
        let init = Arc::clone(&container.init);
        let (tx, told) = mpsc::channel();
        container
            .kill(&init, 9, false, move |exit| tx.send(exit.status).unwrap())
            .unwrap();
        assert_eq!(told.try_recv(), Ok(137), "told before kill returned");
        assert!(matches!(
            init.state(),
            ProcState::Stopped { status: 137, .. }
        ));
        assert!(matches!(
            container.kill(&init, 15, false, |_| panic!("told twice")),
            Err(SandboxError::Finished(_))
        ));
        assert_eq!(
            agent.calls(),
            ["CreateContainer c1", "SignalProcess c1 9 all=false"]
        );
    }

    #[test]
    fn a_running_process_gets_the_signal_asked_for() {
        let (container, agent, _) = container();
        let init = Arc::clone(&container.init);
        let exited = exits(&container, &init);
        container
            .kill(&init, 15, true, |_| {
                panic!("a running process's exit comes from its wait")
            })
            .unwrap();
        // The fake agent's processes die of the default action.
        assert_eq!(exited.recv_timeout(Duration::from_secs(5)), Ok(143));
        assert!(
            agent
                .calls()
                .contains(&"SignalProcess c1 15 all=true".to_owned())
        );
    }

    #[test]
    fn output_drains_before_the_exit_is_reported() {
        #[derive(Debug, Default)]
        struct Slow(Mutex<Vec<&'static str>>);
        impl ProcessIo for Arc<Slow> {
            fn drain(&self, _bound: Duration) {
                std::thread::sleep(Duration::from_millis(50));
                lock(&self.0).push("drained");
            }
        }
        let (sandbox, agent, _) = sandbox(None);
        let log = Arc::new(Slow::default());
        let io = Arc::clone(&log);
        let container = sandbox
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(io))
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let seen = Arc::clone(&log);
        container
            .start(&container.init, move |_| {
                lock(&seen.0).push("exit");
                tx.send(()).unwrap();
            })
            .unwrap();
        agent.exit(&container.init.process, ExitStatus::Code(0));
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(*lock(&log.0), ["drained", "exit"]);
    }
}
