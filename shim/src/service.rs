//! containerd's Task service over the shim's containers, and the events it
//! owes containerd.
//!
//! Calls map onto a [`Task`] (a capsid-runtime container) and its
//! processes; events go through one
//! publishing thread, so containerd sees them in the order they happened
//! (TaskCreate before TaskStart before TaskExit). Errors carry the gRPC
//! code containerd's errdefs expect: NotFound for an unknown or finished
//! process, FailedPrecondition for a call in the wrong state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsid_base::lock;
use capsid_runtime::protocol::ErrorCode;
use capsid_runtime::{Config, Exit, ProcState, SandboxError};
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{TtrpcContext, TtrpcResult, api};

use crate::container::{ContainerError, MicroVms, Proc, Task, Vms};
use crate::stdio::StdioPaths;
use crate::trans;

pub type BoxedEvent = Box<dyn Event + Send>;

pub struct Service {
    config: Config,
    vms: Box<dyn Vms>,
    containers: Mutex<HashMap<String, Arc<Task>>>,
    events: Mutex<Sender<BoxedEvent>>,
    shutdown: (Mutex<bool>, Condvar),
}

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn internal(e: &dyn std::error::Error) -> ttrpc::Error {
    status(Code::INTERNAL, capsid_base::error_chain(e))
}

/// The agent's refusal keeps its meaning for containerd.
fn from_container(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::Sandbox(
            SandboxError::AlreadyStarted(_)
            | SandboxError::NotRunning(_)
            | SandboxError::NotPaused(_)
            | SandboxError::Paused(_),
        ) => Code::FAILED_PRECONDITION,
        ContainerError::Sandbox(SandboxError::Finished(_)) => Code::NOT_FOUND,
        ContainerError::Sandbox(e) => match e.agent_code() {
            Some(ErrorCode::InvalidArgument) => Code::INVALID_ARGUMENT,
            Some(ErrorCode::NotFound) => Code::NOT_FOUND,
            Some(ErrorCode::AlreadyExists) => Code::ALREADY_EXISTS,
            Some(ErrorCode::FailedPrecondition) => Code::FAILED_PRECONDITION,
            Some(ErrorCode::Unsupported) => Code::UNIMPLEMENTED,
            // The caller's to fix, as the agent's other set-up failures.
            Some(ErrorCode::ProgramNotFound | ErrorCode::ProgramNotExecutable) => {
                Code::FAILED_PRECONDITION
            }
            Some(ErrorCode::Internal) | None => Code::INTERNAL,
        },
        ContainerError::Config(_) | ContainerError::Spec(_) | ContainerError::Bundle(_) => {
            Code::INVALID_ARGUMENT
        }
        _ => Code::INTERNAL,
    };
    status(code, capsid_base::error_chain(&e))
}

fn from_sandbox(e: SandboxError) -> ttrpc::Error {
    from_container(e.into())
}

fn timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

/// How long an event waits for containerd (restarting, say) before it is
/// dropped; each attempt's own bound.
const PUBLISH_BOUND: Duration = Duration::from_secs(60);
const PUBLISH_CALL_BOUND: Duration = Duration::from_secs(10);

/// Sends `event` to containerd. A send that failed because the connection
/// broke (containerd restarted: its socket is a new one) is tried again on
/// a new connection, with a growing pause, for at most [`PUBLISH_BOUND`];
/// one containerd answered with an error is not.
fn publish(
    publisher: &mut Option<RemotePublisher>,
    address: &str,
    namespace: &str,
    event: &(dyn Event + Send),
) {
    let topic = event.topic();
    let message: &dyn MessageDyn = event;
    let deadline = Instant::now() + PUBLISH_BOUND;
    let mut pause = Duration::from_millis(50);
    loop {
        if publisher.is_none() {
            *publisher = RemotePublisher::new(address).ok();
        }
        let result = match publisher.as_ref() {
            Some(p) => {
                let bound = i64::try_from(PUBLISH_CALL_BOUND.as_nanos()).unwrap_or(i64::MAX);
                p.publish(
                    ttrpc::context::with_timeout(bound),
                    &topic,
                    namespace,
                    message.clone_box(),
                )
            }
            None => Err(containerd_shim::Error::Other(format!(
                "cannot connect to {address}"
            ))),
        };
        let error = match result {
            Ok(()) => return,
            Err(containerd_shim::Error::Ttrpc(ttrpc::Error::RpcStatus(status))) => {
                log::warn!("containerd refused {topic}: {status:?}");
                return;
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            log::warn!(
                "cannot publish {topic} to containerd for {PUBLISH_BOUND:?}, dropped: {error}"
            );
            return;
        }
        log::debug!("cannot publish {topic} ({error}); connecting again");
        *publisher = None;
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

impl Service {
    /// `publisher` is connected to containerd's events at `events_address`;
    /// it is connected again there when containerd restarts.
    pub fn new(
        namespace: String,
        config: Config,
        events_address: String,
        publisher: RemotePublisher,
    ) -> Self {
        let (events, queue) = channel::<BoxedEvent>();
        std::thread::spawn(move || {
            let mut publisher = Some(publisher);
            for event in queue {
                publish(&mut publisher, &events_address, &namespace, &*event);
            }
        });
        Self::with(config, Box::new(MicroVms), events)
    }

    /// A service whose VMs come from `vms` and whose events go to `events`
    /// (what the tests use, with fakes).
    pub fn with(config: Config, vms: Box<dyn Vms>, events: Sender<BoxedEvent>) -> Self {
        Self {
            config,
            vms,
            containers: Mutex::new(HashMap::new()),
            events: Mutex::new(events),
            shutdown: (Mutex::new(false), Condvar::new()),
        }
    }

    fn publish(&self, event: impl Event + Send + 'static) {
        let _ = lock(&self.events).send(Box::new(event));
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Task>>> {
        lock(&self.containers)
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Task>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Task>, Arc<Proc>)> {
        let container = self.container(id)?;
        let proc = container.container.find(exec_id).ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec_id} of container {id} not found"),
            )
        })?;
        Ok((container, proc))
    }

    pub fn wait_for_shutdown(&self) {
        let (flag, changed) = &self.shutdown;
        let mut done = lock(flag);
        while !*done {
            done = capsid_base::wait(changed, done);
        }
    }

    fn signal_shutdown(&self) {
        let (flag, changed) = &self.shutdown;
        *lock(flag) = true;
        changed.notify_all();
    }

    /// Takes every VM down, then lets the shim exit.
    pub fn shutdown_all(&self) {
        let containers: Vec<_> = self.containers().drain().map(|(_, c)| c).collect();
        for container in containers {
            container.destroy();
        }
        self.signal_shutdown();
    }

    /// What to publish when `proc` of `container` exits: TaskOOM first if
    /// the guest OOM-killed in its cgroup, then TaskExit. Only queues them
    /// (the runtime calls it with the process's lock held).
    fn exit_event(&self, container: &Task, proc: &Proc) -> impl FnOnce(Exit) + Send + 'static {
        let events = lock(&self.events).clone();
        let container_id = container.container.id.clone();
        let id = proc
            .process
            .exec_id
            .clone()
            .unwrap_or_else(|| container_id.clone());
        let pid = proc.pid;
        move |exit: Exit| {
            if exit.oom_killed {
                let _ = events.send(Box::new(TaskOOM {
                    container_id: container_id.clone(),
                    ..Default::default()
                }));
            }
            let _ = events.send(Box::new(TaskExit {
                container_id,
                id,
                pid,
                exit_status: exit.status,
                exited_at: Some(timestamp(exit.at)).into(),
                ..Default::default()
            }));
        }
    }
}

fn stdio_paths(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
    StdioPaths {
        stdin: stdin.to_owned(),
        stdout: stdout.to_owned(),
        stderr: stderr.to_owned(),
        terminal,
    }
}

/// containerd's task API, one method per call (the trait below forwards).
impl Service {
    pub fn create(&self, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        capsid_runtime::protocol::validate_id("container id", &req.id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if self.containers().contains_key(&req.id) {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                Code::UNIMPLEMENTED,
                "capsid cannot restore checkpoints",
            ));
        }
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let bundle = PathBuf::from(&req.bundle);
        let pod = |sandbox_id: &str| {
            self.containers()
                .get(sandbox_id)
                .map(|sandbox| Arc::clone(sandbox.container.sandbox()))
        };
        let container = Task::create(
            &*self.vms,
            &self.config,
            &req.id,
            &bundle,
            &req.rootfs,
            stdio,
            &pod,
        )
        .map_err(|e| {
            log::error!(
                "{}: create failed: {}",
                req.id,
                capsid_base::error_chain(&e)
            );
            from_container(e)
        })?;
        let pid = container.container.init.pid;
        self.containers()
            .insert(req.id.clone(), Arc::new(container));
        self.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: Some(TaskIO {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
                ..Default::default()
            })
            .into(),
            pid,
            ..Default::default()
        });
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    pub fn start(&self, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        // A process that could not start has ended (127 or 126, as with
        // runc) and its exit is published, so Delete and `ctr run --rm`
        // clean it up instead of finding a task stuck in Created.
        let on_exit = self.exit_event(&container, &proc);
        container
            .container
            .start(&proc, on_exit)
            .map_err(from_sandbox)?;
        if req.exec_id.is_empty() {
            self.publish(TaskStart {
                container_id: req.id.clone(),
                pid: proc.pid,
                ..Default::default()
            });
        } else {
            self.publish(TaskExecStarted {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                pid: proc.pid,
                ..Default::default()
            });
        }
        Ok(api::StartResponse {
            pid: proc.pid,
            ..Default::default()
        })
    }

    pub fn state(&self, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let mut response = api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid: proc.pid,
            stdin: proc.io.paths.stdin.clone(),
            stdout: proc.io.paths.stdout.clone(),
            stderr: proc.io.paths.stderr.clone(),
            terminal: proc.io.paths.terminal,
            ..Default::default()
        };
        response.status = match proc.state() {
            ProcState::Created => Status::CREATED,
            // Every process of a paused container is frozen.
            ProcState::Running if container.container.paused() => Status::PAUSED,
            ProcState::Running => Status::RUNNING,
            ProcState::Stopped { status, at } => {
                response.exit_status = status;
                response.exited_at = Some(timestamp(at)).into();
                Status::STOPPED
            }
        }
        .into();
        Ok(response)
    }

    pub fn pids(&self, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        // Host pids only, as Kata answers: the VM's. The guest's own pids
        // (logged here) mean nothing on the host.
        let container = self.container(&req.id)?;
        let guest = container.container.guest_pids().map_err(from_sandbox)?;
        log::debug!("{}: guest processes {guest:?}", req.id);
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: container.container.sandbox().vmm_pid(),
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    pub fn kill(&self, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        if !(1..=64).contains(&req.signal) {
            return Err(status(
                Code::INVALID_ARGUMENT,
                format!("bad signal {}", req.signal),
            ));
        }
        // A process never started ends here, killed by the signal; its
        // exit is published as a started one's is.
        let on_exit = self.exit_event(&container, &proc);
        container
            .container
            .kill(&proc, req.signal, req.all, on_exit)
            .map_err(from_sandbox)?;
        Ok(api::Empty::new())
    }

    pub fn exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        capsid_runtime::protocol::validate_id("exec id", &req.exec_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if container.container.find(&req.exec_id).is_some() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let spec = trans::exec_spec(&req.spec.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, capsid_base::error_chain(&e)))?;
        let stdio = stdio_paths(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        container
            .exec(&req.exec_id, spec, stdio)
            .map_err(from_container)?;
        self.publish(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    pub fn resize_pty(&self, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        container
            .container
            .agent()
            .resize_tty(&proc.process, rows, cols)
            .map_err(|e| from_sandbox(e.into()))?;
        Ok(api::Empty::new())
    }

    pub fn close_io(&self, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_, proc) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            proc.io.copiers.close_stdin();
        }
        Ok(api::Empty::new())
    }

    /// Freezes every process of the container (runc's pause).
    pub fn pause(&self, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        container.container.pause().map_err(from_sandbox)?;
        self.publish(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    /// Thaws a paused container.
    pub fn resume(&self, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        container.container.resume().map_err(from_sandbox)?;
        self.publish(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(api::Empty::new())
    }

    pub fn update(&self, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let resources = trans::resources(&req.resources.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, capsid_base::error_chain(&e)))?;
        container
            .container
            .update(resources)
            .map_err(from_sandbox)?;
        Ok(api::Empty::new())
    }

    pub fn wait(&self, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_, proc) = self.process(&req.id, &req.exec_id)?;
        let (exit_status, at) = proc.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    pub fn delete(&self, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let (exit_status, at) = match proc.state() {
            ProcState::Running => {
                return Err(status(
                    Code::FAILED_PRECONDITION,
                    format!("process {:?} is still running; kill it first", proc.process),
                ));
            }
            ProcState::Stopped { status, at } => (status, at),
            ProcState::Created => (0, SystemTime::now()),
        };
        if req.exec_id.is_empty() {
            self.containers().remove(&req.id);
            container.destroy();
            self.publish(TaskDelete {
                container_id: req.id.clone(),
                pid: proc.pid,
                exit_status,
                exited_at: Some(timestamp(at)).into(),
                id: req.id.clone(),
                ..Default::default()
            });
        } else {
            container.container.forget(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid: proc.pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    pub fn stats(&self, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        let container = self.container(&req.id)?;
        let stats = container.container.stats().map_err(from_sandbox)?;
        let metrics = trans::metrics(&stats);
        let any =
            containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(|e| internal(&e))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    pub fn connect(&self, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .containers()
            .get(&req.id)
            .map_or(0, |c| c.container.sandbox().vmm_pid());
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    pub fn shutdown(&self, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after each Delete; the shim stays while a
        // container of its pod remains.
        if self.containers().is_empty() {
            self.signal_shutdown();
        }
        Ok(api::Empty::new())
    }
}

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        Service::create(self, req)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        Service::start(self, req)
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        Service::state(self, req)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        Service::pids(self, req)
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        Service::kill(self, req)
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        Service::exec(self, req)
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        Service::resize_pty(self, req)
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        Service::close_io(self, req)
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        Service::update(self, req)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        Service::pause(self, req)
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        Service::resume(self, req)
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        Service::wait(self, req)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Service::delete(self, req)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Service::stats(self, req)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        Service::connect(self, req)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        Service::shutdown(self, req)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::mpsc::Receiver;

    use capsid_runtime::fake::{FakeAgent, FakeVm};
    use capsid_runtime::images::rootfs::RootfsImage;
    use capsid_runtime::protocol::{ExitStatus, ProcessRef, Rootfs};
    use capsid_runtime::sandbox::Vm;
    use capsid_runtime::{Agent, Sandbox, VmSize};
    use containerd_shim::protos::types::mount::Mount;

    use super::*;

    /// VMs made of fakes; every boot gets the same agent and VM.
    struct FakeVms {
        agent: Arc<FakeAgent>,
        vm: Arc<FakeVm>,
        boots: Arc<Mutex<u32>>,
        /// Each boot's scratch disk size.
        disks: Arc<Mutex<Vec<Option<u64>>>>,
    }

    impl Vms for FakeVms {
        fn image(&self, _: &Path, _: &[Mount], _: &Path) -> Result<RootfsImage, ContainerError> {
            Ok(capsid_runtime::fake::image())
        }

        fn boot(
            &self,
            _config: &Config,
            id: &str,
            _size: VmSize,
            _image: &RootfsImage,
            options: crate::container::VmOptions<'_>,
            record: &dyn Fn(&Path),
        ) -> Result<(Sandbox, Rootfs), ContainerError> {
            record(Path::new("/run/capsid/vm-fake"));
            self.disks.lock().unwrap().push(options.disk);
            *self.boots.lock().unwrap() += 1;
            let sandbox = Sandbox::new(
                id,
                Arc::clone(&self.agent) as Arc<dyn Agent>,
                Arc::clone(&self.vm) as Arc<dyn Vm>,
                None,
            );
            Ok((sandbox, FakeAgent::request(id).rootfs))
        }
    }

    struct Harness {
        service: Service,
        agent: Arc<FakeAgent>,
        vm: Arc<FakeVm>,
        boots: Arc<Mutex<u32>>,
        disks: Arc<Mutex<Vec<Option<u64>>>>,
        events: Receiver<BoxedEvent>,
        bundle: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let agent = Arc::new(FakeAgent::default());
        let vm = Arc::new(FakeVm::default());
        let boots = Arc::new(Mutex::new(0));
        let disks = Arc::new(Mutex::new(Vec::new()));
        let vms = FakeVms {
            agent: Arc::clone(&agent),
            vm: Arc::clone(&vm),
            boots: Arc::clone(&boots),
            disks: Arc::clone(&disks),
        };
        let (tx, events) = channel();
        let service = Service::with(Config::default(), Box::new(vms), tx);
        let bundle = tempfile::tempdir().unwrap();
        write_spec(bundle.path(), "");
        Harness {
            service,
            agent,
            vm,
            boots,
            disks,
            events,
            bundle,
        }
    }

    fn write_spec(bundle: &Path, annotations: &str) {
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            format!(
                r#"{{"ociVersion":"1.0.2","process":{{"args":["sh"],"cwd":"/","user":{{"uid":0,"gid":0}}}},
                    "root":{{"path":"rootfs"}},"annotations":{{{annotations}}}}}"#
            ),
        )
        .unwrap();
    }

    impl Harness {
        fn create(&self, id: &str, bundle: &Path) -> TtrpcResult<api::CreateTaskResponse> {
            self.service.create(api::CreateTaskRequest {
                id: id.into(),
                bundle: bundle.to_string_lossy().into_owned(),
                ..Default::default()
            })
        }

        fn start(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StartResponse> {
            self.service.start(api::StartRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            })
        }

        fn delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
            self.service.delete(api::DeleteRequest {
                id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            })
        }

        fn wait(&self, id: &str, exec_id: &str) -> u32 {
            self.service
                .wait(api::WaitRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                })
                .unwrap()
                .exit_status
        }

        /// The topics of the events published so far, with the exit
        /// status and id of each TaskExit.
        fn topics(&self) -> Vec<String> {
            let mut topics = Vec::new();
            while let Ok(event) = self.events.recv_timeout(Duration::from_millis(200)) {
                let message: &dyn MessageDyn = &*event;
                topics.push(match message.downcast_ref::<TaskExit>() {
                    Some(exit) => format!("{} {} {}", event.topic(), exit.id, exit.exit_status),
                    None => event.topic(),
                });
            }
            topics
        }
    }

    fn code(result: TtrpcResult<impl std::fmt::Debug>) -> Code {
        match result {
            Err(ttrpc::Error::RpcStatus(status)) => status.code(),
            other => panic!("expected an error status, got {other:?}"),
        }
    }

    #[test]
    fn the_disk_annotation_gives_the_vm_a_scratch_disk_and_a_bad_one_is_refused() {
        let h = harness();
        let bundle = tempfile::tempdir().unwrap();
        write_spec(bundle.path(), r#""io.capsid.disk":"1G""#);
        h.create("c1", bundle.path()).unwrap();
        assert_eq!(*h.disks.lock().unwrap(), [Some(1 << 30)]);
        let bad = tempfile::tempdir().unwrap();
        write_spec(bad.path(), r#""io.capsid.disk":"lots""#);
        assert_eq!(code(h.create("c2", bad.path())), Code::INVALID_ARGUMENT);
        assert_eq!(h.disks.lock().unwrap().len(), 1, "nothing booted");
    }

    #[test]
    fn a_task_runs_exits_and_is_deleted_with_its_events_in_order() {
        let h = harness();
        let created = h.create("c1", h.bundle.path()).unwrap();
        assert_eq!(created.pid, FakeVm::PID, "containerd sees the VMM's pid");
        assert!(h.bundle.path().join("capsid.json").exists());
        h.start("c1", "").unwrap();
        assert_eq!(code(h.start("c1", "")), Code::FAILED_PRECONDITION);
        assert_eq!(
            code(h.delete("c1", "")),
            Code::FAILED_PRECONDITION,
            "a running task is not deleted"
        );
        h.agent.exit(&ProcessRef::init("c1"), ExitStatus::Code(3));
        assert_eq!(h.wait("c1", ""), 3);
        let state = h
            .service
            .state(api::StateRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(state.status.enum_value(), Ok(Status::STOPPED));
        assert_eq!(state.exit_status, 3);
        assert_eq!(h.delete("c1", "").unwrap().exit_status, 3);
        assert_eq!(
            h.topics(),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit c1 3",
                "/tasks/delete"
            ]
        );
        assert!(!h.vm.running() && !h.bundle.path().join("capsid.json").exists());
        let calls = h.agent.calls();
        assert_eq!(
            calls[calls.len() - 2..],
            ["RemoveContainer c1".to_owned(), "Shutdown".to_owned()]
        );
        assert_eq!(code(h.delete("c1", "")), Code::NOT_FOUND);
    }

    #[test]
    fn a_running_task_pauses_and_resumes_with_its_events() {
        // Before, containerd answered "Pause is not supported" for us.
        let h = harness();
        h.create("c1", h.bundle.path()).unwrap();
        let pause = || {
            h.service.pause(api::PauseRequest {
                id: "c1".into(),
                ..Default::default()
            })
        };
        let resume = || {
            h.service.resume(api::ResumeRequest {
                id: "c1".into(),
                ..Default::default()
            })
        };
        let status = || {
            h.service
                .state(api::StateRequest {
                    id: "c1".into(),
                    ..Default::default()
                })
                .unwrap()
                .status
                .enum_value()
        };
        assert_eq!(
            code(pause()),
            Code::FAILED_PRECONDITION,
            "created, not running"
        );
        h.start("c1", "").unwrap();
        assert_eq!(code(resume()), Code::FAILED_PRECONDITION, "not paused");
        pause().unwrap();
        assert_eq!(status(), Ok(Status::PAUSED));
        resume().unwrap();
        assert_eq!(status(), Ok(Status::RUNNING));
        assert_eq!(
            h.topics(),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/paused",
                "/tasks/resumed"
            ]
        );
        assert!(h.agent.calls().contains(&"Freeze c1 true".to_owned()));
    }

    #[test]
    fn execs_are_named_started_and_reported_by_their_own_id() {
        let h = harness();
        h.create("c1", h.bundle.path()).unwrap();
        h.start("c1", "").unwrap();
        let exec = |exec_id: &str| {
            h.service.exec(api::ExecProcessRequest {
                id: "c1".into(),
                exec_id: exec_id.into(),
                spec: Some(
                    containerd_shim::protos::protobuf::well_known_types::any::Any {
                        value: br#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#.to_vec(),
                        ..Default::default()
                    },
                )
                .into(),
                ..Default::default()
            })
        };
        exec("e1").unwrap();
        assert_eq!(code(exec("e1")), Code::ALREADY_EXISTS);
        assert_eq!(code(exec("../e")), Code::INVALID_ARGUMENT);
        h.start("c1", "e1").unwrap();
        h.agent
            .exit(&ProcessRef::exec("c1", "e1"), ExitStatus::Code(0));
        assert_eq!(h.wait("c1", "e1"), 0);
        h.delete("c1", "e1").unwrap();
        assert_eq!(code(h.start("c1", "e1")), Code::NOT_FOUND);
        assert_eq!(
            h.topics(),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exec-added",
                "/tasks/exec-started",
                "/tasks/exit e1 0"
            ]
        );
        assert!(h.vm.running(), "deleting an exec leaves the container");
    }

    #[test]
    fn a_task_killed_before_it_started_ends_with_the_signal() {
        let h = harness();
        h.create("c1", h.bundle.path()).unwrap();
        h.service
            .kill(api::KillRequest {
                id: "c1".into(),
                signal: 9,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(h.wait("c1", ""), 137);
        let again = h.service.kill(api::KillRequest {
            id: "c1".into(),
            signal: 9,
            ..Default::default()
        });
        assert_eq!(code(again), Code::NOT_FOUND);
        let bad = h.service.kill(api::KillRequest {
            id: "c1".into(),
            signal: 65,
            ..Default::default()
        });
        assert_eq!(code(bad), Code::INVALID_ARGUMENT);
        h.delete("c1", "").unwrap();
        assert_eq!(
            h.topics(),
            ["/tasks/create", "/tasks/exit c1 137", "/tasks/delete"]
        );
    }

    #[test]
    fn a_vm_that_dies_ends_its_processes_with_255_and_an_oom_is_told() {
        let h = harness();
        h.create("c1", h.bundle.path()).unwrap();
        h.start("c1", "").unwrap();
        h.vm.crash();
        h.agent.vm_died();
        assert_eq!(h.wait("c1", ""), 255);
        h.delete("c1", "").unwrap();
        assert_eq!(
            h.topics(),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/exit c1 255",
                "/tasks/delete"
            ]
        );

        let h = harness();
        h.create("c1", h.bundle.path()).unwrap();
        h.start("c1", "").unwrap();
        h.agent.set_oom_kills(1);
        h.agent.exit(&ProcessRef::init("c1"), ExitStatus::Signal(9));
        assert_eq!(h.wait("c1", ""), 137);
        assert_eq!(
            h.topics(),
            [
                "/tasks/create",
                "/tasks/start",
                "/tasks/oom",
                "/tasks/exit c1 137"
            ]
        );
    }

    #[test]
    fn a_failed_create_keeps_the_agents_code_and_leaves_nothing() {
        let h = harness();
        h.agent.refuse(
            "CreateContainer",
            capsid_runtime::protocol::ErrorCode::InvalidArgument,
        );
        assert_eq!(
            code(h.create("c1", h.bundle.path())),
            Code::INVALID_ARGUMENT
        );
        assert!(!h.vm.running(), "its VM is taken down");
        assert!(!h.bundle.path().join("capsid.json").exists());
        assert!(h.topics().is_empty());
        // The id is free again.
        assert_eq!(code(h.start("c1", "")), Code::NOT_FOUND);
        assert_eq!(
            code(h.create("../c", h.bundle.path())),
            Code::INVALID_ARGUMENT
        );
    }

    #[test]
    fn a_pods_containers_share_its_vm_which_goes_with_the_last() {
        let h = harness();
        let sandbox_bundle = tempfile::tempdir().unwrap();
        write_spec(
            sandbox_bundle.path(),
            r#""io.kubernetes.cri.container-type":"sandbox""#,
        );
        let member = tempfile::tempdir().unwrap();
        write_spec(
            member.path(),
            r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod""#,
        );
        // No pod yet.
        assert_eq!(code(h.create("m1", member.path())), Code::INTERNAL);
        h.create("pod", sandbox_bundle.path()).unwrap();
        h.create("m1", member.path()).unwrap();
        assert_eq!(*h.boots.lock().unwrap(), 1, "one VM for the pod");
        assert_eq!(h.vm.disks(), ["+ctr-1"]);
        h.delete("pod", "").unwrap();
        assert!(h.vm.running(), "m1 is still in the pod's VM");
        h.delete("m1", "").unwrap();
        assert!(!h.vm.running());
        assert_eq!(h.vm.disks(), ["+ctr-1", "-ctr-1"]);
    }
}
