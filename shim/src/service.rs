//! containerd's Task service over the shim's containers, and the events it
//! owes containerd.
//!
//! Calls map onto [`Container`] and [`Proc`]; events go through one
//! publishing thread, so containerd sees them in the order they happened
//! (TaskCreate before TaskStart before TaskExit). Errors carry the gRPC
//! code containerd's errdefs expect: NotFound for an unknown or finished
//! process, FailedPrecondition for a call in the wrong state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsid_protocol::{ClientError, ErrorCode};
use capsid_runtime::Config;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskStart,
};
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{TtrpcContext, TtrpcResult, api};

use crate::container::{Container, ContainerError, Proc, ProcState};
use crate::stdio::StdioPaths;
use crate::trans;

type BoxedEvent = Box<dyn Event + Send>;

pub struct Service {
    config: Config,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    events: Mutex<Sender<BoxedEvent>>,
    shutdown: (Mutex<bool>, Condvar),
}

fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

fn internal(e: &dyn std::error::Error) -> ttrpc::Error {
    status(Code::INTERNAL, capsid_protocol::error_chain(e))
}

/// The agent's refusal keeps its meaning for containerd.
fn from_container(e: ContainerError) -> ttrpc::Error {
    let code = match &e {
        ContainerError::Agent(ClientError::Agent { code, .. }) => match code {
            ErrorCode::InvalidArgument => Code::INVALID_ARGUMENT,
            ErrorCode::NotFound => Code::NOT_FOUND,
            ErrorCode::AlreadyExists => Code::ALREADY_EXISTS,
            ErrorCode::FailedPrecondition => Code::FAILED_PRECONDITION,
            ErrorCode::Unsupported => Code::UNIMPLEMENTED,
            ErrorCode::Internal => Code::INTERNAL,
        },
        ContainerError::Config(_) | ContainerError::Spec(_) | ContainerError::Bundle(_) => {
            Code::INVALID_ARGUMENT
        }
        _ => Code::INTERNAL,
    };
    status(code, capsid_protocol::error_chain(&e))
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
        Self {
            config,
            containers: Mutex::new(HashMap::new()),
            events: Mutex::new(events),
            shutdown: (Mutex::new(false), Condvar::new()),
        }
    }

    fn publish(&self, event: impl Event + Send + 'static) {
        let _ = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(event));
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Proc>)> {
        let container = self.container(id)?;
        let proc = container.find(exec_id).ok_or_else(|| {
            status(
                Code::NOT_FOUND,
                format!("process {exec_id} of container {id} not found"),
            )
        })?;
        Ok((container, proc))
    }

    pub fn wait_for_shutdown(&self) {
        let (lock, changed) = &self.shutdown;
        let mut done = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*done {
            done = changed.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn signal_shutdown(&self) {
        let (lock, changed) = &self.shutdown;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
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

    fn exit_event(
        &self,
        container: &Arc<Container>,
        proc: &Arc<Proc>,
    ) -> impl FnOnce(u32, SystemTime) + Send + 'static {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let container = Arc::clone(container);
        let proc = Arc::clone(proc);
        move |exit_status, at| {
            let is_init = proc.process.exec_id.is_none();
            if is_init
                && let Ok(stats) = container.client().stats(&container.id)
                && stats.memory_events.oom_kill > 0
            {
                let _ = events.send(Box::new(TaskOOM {
                    container_id: container.id.clone(),
                    ..Default::default()
                }));
            }
            let _ = events.send(Box::new(TaskExit {
                container_id: container.id.clone(),
                id: proc
                    .process
                    .exec_id
                    .clone()
                    .unwrap_or_else(|| container.id.clone()),
                pid: proc.pid,
                exit_status,
                exited_at: Some(timestamp(at)).into(),
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

impl containerd_shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        capsid_protocol::validate_id("container id", &req.id)
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
                .map(|sandbox| Arc::clone(&sandbox.sandbox))
        };
        let container = Container::create(&self.config, &req.id, &bundle, &req.rootfs, stdio, &pod)
            .map_err(|e| {
                log::error!(
                    "{}: create failed: {}",
                    req.id,
                    capsid_protocol::error_chain(&e)
                );
                from_container(e)
            })?;
        let pid = container.init.pid;
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

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        if proc.state() != ProcState::Created {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("process {:?} was already started", proc.process),
            ));
        }
        let on_exit = self.exit_event(&container, &proc);
        if let Err(e) = container.start(&proc, on_exit) {
            // As with runc, a process that could not start has ended (127:
            // not found, 126: could not run), so Delete and `ctr run --rm`
            // clean it up instead of finding a task stuck in Created.
            let why = capsid_protocol::error_chain(&e);
            let code = if why.contains("No such file") {
                127
            } else {
                126
            };
            if let ProcState::Stopped { status, at } = proc.set_stopped(code) {
                (self.exit_event(&container, &proc))(status, at);
            }
            return Err(from_container(e));
        }
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

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let mut response = api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: container.bundle.to_string_lossy().into_owned(),
            pid: proc.pid,
            stdin: proc.stdio.stdin.clone(),
            stdout: proc.stdio.stdout.clone(),
            stderr: proc.stdio.stderr.clone(),
            terminal: proc.stdio.terminal,
            ..Default::default()
        };
        response.status = match proc.state() {
            ProcState::Created => Status::CREATED,
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

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        // Host pids only, as Kata answers: the VM's. The guest's own pids
        // (logged here) mean nothing on the host.
        let container = self.container(&req.id)?;
        let guest = container
            .client()
            .list_processes(&req.id)
            .map_err(|e| from_container(e.into()))?;
        log::debug!("{}: guest processes {guest:?}", req.id);
        Ok(api::PidsResponse {
            processes: vec![ProcessInfo {
                pid: container.sandbox.vmm_pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("bad signal {}", req.signal)))?;
        match proc.state() {
            ProcState::Stopped { .. } => {
                return Err(status(Code::NOT_FOUND, "process already finished"));
            }
            ProcState::Created => {
                // Never started: it ends here, as runc's would, killed by
                // the signal (nothing waits on it in the guest yet).
                let _ = container
                    .client()
                    .signal_process(&proc.process, libc::SIGKILL, false);
                if let ProcState::Stopped { status, at } = proc.set_stopped(128 + req.signal) {
                    (self.exit_event(&container, &proc))(status, at);
                }
                return Ok(api::Empty::new());
            }
            ProcState::Running => {}
        }
        container
            .client()
            .signal_process(&proc.process, signal, req.all)
            .map_err(|e| from_container(e.into()))?;
        Ok(api::Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        capsid_protocol::validate_id("exec id", &req.exec_id)
            .map_err(|e| status(Code::INVALID_ARGUMENT, e))?;
        if container.find(&req.exec_id).is_some() {
            return Err(status(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        let spec = trans::exec_spec(&req.spec.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, capsid_protocol::error_chain(&e)))?;
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

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (container, proc) = self.process(&req.id, &req.exec_id)?;
        let rows = u16::try_from(req.height).unwrap_or(u16::MAX);
        let cols = u16::try_from(req.width).unwrap_or(u16::MAX);
        container
            .client()
            .resize_tty(&proc.process, rows, cols)
            .map_err(|e| from_container(e.into()))?;
        Ok(api::Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_, proc) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            proc.copiers.close_stdin();
        }
        Ok(api::Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let container = self.container(&req.id)?;
        let resources = trans::resources(&req.resources.value)
            .map_err(|e| status(Code::INVALID_ARGUMENT, capsid_protocol::error_chain(&e)))?;
        // The VM's own size is fixed at boot; the container's cgroup in it
        // takes the new limits (memory beyond the VM's is no limit at all).
        container
            .client()
            .update_resources(&req.id, resources)
            .map_err(|e| from_container(e.into()))?;
        Ok(api::Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_, proc) = self.process(&req.id, &req.exec_id)?;
        let (exit_status, at) = proc.wait();
        Ok(api::WaitResponse {
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
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
            container
                .execs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&req.exec_id);
        }
        Ok(api::DeleteResponse {
            pid: proc.pid,
            exit_status,
            exited_at: Some(timestamp(at)).into(),
            ..Default::default()
        })
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let container = self.container(&req.id)?;
        let stats = container
            .client()
            .stats(&req.id)
            .map_err(|e| from_container(e.into()))?;
        let metrics = trans::metrics(&stats);
        let any =
            containerd_shim::util::convert_to_any(Box::new(metrics)).map_err(|e| internal(&e))?;
        Ok(api::StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .containers()
            .get(&req.id)
            .map_or(0, |c| c.sandbox.vmm_pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after each Delete; the shim stays while a
        // container of its pod remains.
        if self.containers().is_empty() {
            self.signal_shutdown();
        }
        Ok(api::Empty::new())
    }
}
