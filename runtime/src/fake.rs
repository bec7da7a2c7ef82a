//! An agent and a VM that live in memory, for tests of the sandbox
//! lifecycle and of its adapters (the shim's task service): they keep
//! what a real agent and VMM would, record every call, and fail or die
//! when a test says so. Built for this crate's tests and, with the
//! `fake` feature, for other crates' tests.
//!
//! A process of the fake agent runs until the test ends it
//! ([`FakeAgent::exit`]), a signal whose default action ends a process
//! reaches it, or the VM dies ([`FakeAgent::vm_died`]): then every wait
//! breaks, as a real one does when the vsock connection goes.

use std::collections::HashMap;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use capsid_images::rootfs::{Format, RootfsImage};
use capsid_protocol::{
    ClientError, ContainerStats, CreateContainer, ErrorCode, ExecProcess, ExitStatus, Filesystem,
    ProcessRef, Rootfs, StdioRequest, Stream,
};
use oci_spec::runtime::{LinuxResources, Spec};

use crate::agent::Agent;
use crate::sandbox::{ContainerRequest, Sandbox, Vm};
use crate::vm::MicroVmError;
use capsid_base::lock;

/// Signals whose default action does not end a process.
const HARMLESS_SIGNALS: [i32; 8] = [
    libc::SIGCHLD,
    libc::SIGCONT,
    libc::SIGSTOP,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGURG,
    libc::SIGWINCH,
];

#[derive(Debug, Default)]
struct FakeProcess {
    started: bool,
    exited: Option<ExitStatus>,
    /// The agent's ends of attached streams, for the test to use; dropped
    /// (EOF for the host) when the process exits.
    streams: Vec<(Stream, UnixStream)>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    processes: HashMap<ProcessRef, FakeProcess>,
    refusals: HashMap<&'static str, (ErrorCode, String)>,
    vm_died: bool,
    next_pid: u32,
    oom_kills: u64,
}

/// An agent in memory.
#[derive(Debug, Default)]
pub struct FakeAgent {
    state: Mutex<State>,
    changed: Condvar,
}

impl FakeAgent {
    /// A request to create container `id` on the boot disk.
    pub fn request(id: &str) -> ContainerRequest {
        ContainerRequest {
            id: id.to_owned(),
            rootfs: Rootfs {
                disk_id: crate::vm::ROOTFS_DISK.into(),
                filesystem: Filesystem::Erofs,
                overlay: true,
                upper_disk: None,
            },
            disk: None,
            spec: Spec::default(),
            files: Vec::new(),
            stdio: StdioRequest::default(),
            share: None,
        }
    }

    /// Every call so far, in order: its name and what it was about.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    /// The next call named `call` is refused with `code`.
    pub fn refuse(&self, call: &'static str, code: ErrorCode) {
        self.refuse_with(call, code, "refused by the test");
    }

    /// The next call named `call` is refused with `code` and `message`.
    pub fn refuse_with(&self, call: &'static str, code: ErrorCode, message: &str) {
        lock(&self.state)
            .refusals
            .insert(call, (code, message.to_owned()));
    }

    /// The process exits with `status`: its waits answer, its streams end.
    pub fn exit(&self, process: &ProcessRef, status: ExitStatus) {
        let mut state = lock(&self.state);
        if let Some(p) = state.processes.get_mut(process) {
            p.exited.get_or_insert(status);
            p.streams.clear();
        }
        self.changed.notify_all();
    }

    /// The VM died: every wait breaks, every later call fails.
    pub fn vm_died(&self) {
        let mut state = lock(&self.state);
        state.vm_died = true;
        for p in state.processes.values_mut() {
            p.streams.clear();
        }
        self.changed.notify_all();
    }

    /// Stats report this many OOM kills from now on.
    pub fn set_oom_kills(&self, kills: u64) {
        lock(&self.state).oom_kills = kills;
    }

    /// The agent's end of an attached stream of `process`.
    pub fn stream(&self, process: &ProcessRef, which: Stream) -> Option<UnixStream> {
        let state = lock(&self.state);
        let p = state.processes.get(process)?;
        let (_, end) = p.streams.iter().find(|(s, _)| *s == which)?;
        end.try_clone().ok()
    }

    /// Records `call` and answers whether it goes ahead: not when the VM
    /// died or the test said to refuse it.
    fn enter(&self, call: &'static str, about: String) -> Result<State2<'_>, ClientError> {
        let mut state = lock(&self.state);
        state.calls.push(if about.is_empty() {
            call.to_owned()
        } else {
            format!("{call} {about}")
        });
        if state.vm_died {
            return Err(broken());
        }
        if let Some((code, message)) = state.refusals.remove(call) {
            return Err(ClientError::Agent {
                call,
                code,
                message,
            });
        }
        Ok(State2(state))
    }
}

/// The agent's state, held for one call.
struct State2<'a>(std::sync::MutexGuard<'a, State>);

fn broken() -> ClientError {
    ClientError::Socket(
        PathBuf::from("fake-vsock.sock"),
        io::Error::from(io::ErrorKind::ConnectionReset),
    )
}

fn not_found(call: &'static str, what: &ProcessRef) -> ClientError {
    ClientError::Agent {
        call,
        code: ErrorCode::NotFound,
        message: format!("no process {what}"),
    }
}

impl Agent for FakeAgent {
    fn describe(&self) -> &str {
        "fake-agent"
    }

    fn create_container(&self, request: CreateContainer) -> Result<u32, ClientError> {
        let mut state = self.enter("CreateContainer", request.id.clone())?;
        let init = ProcessRef::init(&request.id);
        if state.0.processes.contains_key(&init) {
            return Err(ClientError::Agent {
                call: "CreateContainer",
                code: ErrorCode::AlreadyExists,
                message: format!("container {} exists", request.id),
            });
        }
        state.0.processes.insert(init, FakeProcess::default());
        state.0.next_pid += 1;
        Ok(state.0.next_pid)
    }

    fn exec_process(&self, request: ExecProcess) -> Result<u32, ClientError> {
        let mut state = self.enter("ExecProcess", request.process.to_string())?;
        let init = ProcessRef::init(&request.process.container_id);
        if !state.0.processes.contains_key(&init) {
            return Err(not_found("ExecProcess", &init));
        }
        state
            .0
            .processes
            .insert(request.process, FakeProcess::default());
        state.0.next_pid += 1;
        Ok(state.0.next_pid)
    }

    fn start_process(&self, process: &ProcessRef) -> Result<(), ClientError> {
        let mut state = self.enter("StartProcess", process.to_string())?;
        let p = state
            .0
            .processes
            .get_mut(process)
            .ok_or_else(|| not_found("StartProcess", process))?;
        p.started = true;
        Ok(())
    }

    fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, ClientError> {
        let state = self.enter("WaitProcess", process.to_string())?;
        let mut state = state.0;
        loop {
            if state.vm_died {
                return Err(broken());
            }
            match state.processes.get(process) {
                None => return Err(not_found("WaitProcess", process)),
                Some(FakeProcess {
                    exited: Some(status),
                    ..
                }) => return Ok(*status),
                Some(_) => {}
            }
            // Bounded, so a test that forgot to end a process fails
            // instead of hanging; the caller sees a broken wait.
            let (next, timeout) =
                capsid_base::wait_timeout(&self.changed, state, Duration::from_secs(30));
            state = next;
            if timeout.timed_out() {
                return Err(broken());
            }
        }
    }

    fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        let mut state = self.enter("SignalProcess", format!("{process} {signal} all={all}"))?;
        let targets: Vec<ProcessRef> = state
            .0
            .processes
            .keys()
            .filter(|p| *p == process || (all && p.container_id == process.container_id))
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(not_found("SignalProcess", process));
        }
        if !HARMLESS_SIGNALS.contains(&signal) {
            for target in targets {
                if let Some(p) = state.0.processes.get_mut(&target)
                    && p.started
                {
                    p.exited.get_or_insert(ExitStatus::Signal(signal));
                    p.streams.clear();
                }
            }
            self.changed.notify_all();
        }
        Ok(())
    }

    fn resize_tty(&self, process: &ProcessRef, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.enter("ResizeTty", format!("{process} {rows}x{cols}"))
            .map(drop)
    }

    fn close_stdin(&self, process: &ProcessRef) -> Result<(), ClientError> {
        self.enter("CloseStdin", process.to_string()).map(drop)
    }

    fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let state = self.enter("Stats", container_id.to_owned())?;
        let mut stats = ContainerStats {
            memory_current_bytes: 1 << 20,
            memory_limit_bytes: 256 << 20,
            pids_current: 1,
            ..ContainerStats::default()
        };
        stats.memory_events.oom_kill = state.0.oom_kills;
        Ok(stats)
    }

    fn update_resources(
        &self,
        container_id: &str,
        _resources: LinuxResources,
    ) -> Result<(), ClientError> {
        self.enter("UpdateResources", container_id.to_owned())
            .map(drop)
    }

    fn freeze(&self, container_id: &str, frozen: bool) -> Result<(), ClientError> {
        self.enter("Freeze", format!("{container_id} {frozen}"))
            .map(drop)
    }

    fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        self.enter("ListProcesses", container_id.to_owned())
            .map(|_| vec![1])
    }

    fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        let mut state = self.enter("RemoveContainer", container_id.to_owned())?;
        state
            .0
            .processes
            .retain(|p, _| p.container_id != container_id);
        self.changed.notify_all();
        Ok(())
    }

    fn configure_network(
        &self,
        config: &capsid_protocol::NetworkConfig,
    ) -> Result<(), ClientError> {
        let names: Vec<&str> = config.interfaces.iter().map(|i| i.name.as_str()).collect();
        self.enter("ConfigureNetwork", names.join(",")).map(drop)
    }

    fn refresh(&self, refresh: &capsid_protocol::Refresh) -> Result<(), ClientError> {
        self.enter("Refresh", refresh.entropy.len().to_string())
            .map(drop)
    }

    fn shutdown(&self) -> Result<(), ClientError> {
        let mut state = self.enter("Shutdown", String::new())?;
        state.0.vm_died = true;
        self.changed.notify_all();
        Ok(())
    }

    fn attach(&self, process: &ProcessRef, stream: Stream) -> Result<UnixStream, ClientError> {
        let mut state = self.enter("Attach", format!("{process} {stream:?}"))?;
        let p = state
            .0
            .processes
            .get_mut(process)
            .ok_or_else(|| not_found("Attach", process))?;
        let (host, agent) =
            UnixStream::pair().map_err(|e| ClientError::Socket("pair".into(), e))?;
        if p.exited.is_none() {
            p.streams.push((stream, agent));
        }
        Ok(host)
    }

    fn archive(
        &self,
        container_id: &str,
        path: &str,
        _idle: std::time::Duration,
    ) -> Result<UnixStream, ClientError> {
        let _state = self.enter("Archive", format!("{container_id} {path}"))?;
        Err(ClientError::Agent {
            call: "Archive",
            code: ErrorCode::Unsupported,
            message: "the fake agent keeps no files".into(),
        })
    }
}

/// A VM in memory: it runs until killed or crashed, and records the disks
/// attached (`+ID`) and detached (`-ID`).
#[derive(Debug)]
pub struct FakeVm {
    running: AtomicBool,
    disks: Mutex<Vec<String>>,
}

impl Default for FakeVm {
    fn default() -> Self {
        Self {
            running: AtomicBool::new(true),
            disks: Mutex::new(Vec::new()),
        }
    }
}

impl FakeVm {
    /// The pid it reports.
    pub const PID: u32 = 4242;

    /// The VMM exits by itself (the guest crashed).
    pub fn crash(&self) {
        self.running.store(false, Ordering::SeqCst);
    }

    /// The ids of the disks attached now.
    pub fn disks(&self) -> Vec<String> {
        lock(&self.disks).clone()
    }
}

impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        Self::PID
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn wait_exit(&self, _timeout: Duration) -> bool {
        !self.running()
    }

    fn attach_disk(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError> {
        if !self.running() {
            return Err(MicroVmError::Api(
                "fake-api.sock".into(),
                io::Error::from(io::ErrorKind::NotFound),
            ));
        }
        lock(&self.disks).push(format!("+{id}"));
        Ok(Rootfs {
            disk_id: id.to_owned(),
            filesystem: match image.format {
                Format::Erofs => Filesystem::Erofs,
                Format::Ext4 => Filesystem::Ext4,
            },
            overlay: true,
            upper_disk: None,
        })
    }

    fn detach_disk(&self, id: &str) -> Result<(), MicroVmError> {
        lock(&self.disks).push(format!("-{id}"));
        Ok(())
    }

    fn exit_report(&self, _grace: Duration) -> Option<String> {
        (!self.running()).then(|| "the micro-VM is gone: the fake VM stopped".into())
    }

    fn diagnostics(&self) -> String {
        String::new()
    }

    fn kill(&self) {
        self.running.store(false, Ordering::SeqCst);
    }
}

/// A sandbox over a fresh fake agent and VM, with no container yet; `dir`
/// is removed when it goes down.
pub fn sandbox(dir: Option<PathBuf>) -> (Arc<Sandbox>, Arc<FakeAgent>, Arc<FakeVm>) {
    let agent = Arc::new(FakeAgent::default());
    let vm = Arc::new(FakeVm::default());
    let sandbox = Sandbox::new(
        "fake",
        Arc::clone(&agent) as Arc<dyn Agent>,
        Arc::clone(&vm) as Arc<dyn Vm>,
        dir,
    );
    (Arc::new(sandbox), agent, vm)
}

/// A rootfs image for tests (never opened by the fakes).
pub fn image() -> RootfsImage {
    RootfsImage {
        path: "/nonexistent/fake.erofs".into(),
        format: Format::Erofs,
        key: "fake".into(),
        built: false,
    }
}
