//! One container: the micro-VM it runs in (its own or its pod's, see
//! `sandbox.rs`), its init process and execs.
//!
//! Each process goes through this state machine; `Wait` blocks until
//! `Stopped`, and the exit is published once the output streams ended:
//!
//! ```text
//!  Created ──Start──▶ Running ──agent's WaitProcess answers──▶ Stopped
//!     │                  └──the VM died (the wait connection broke)──▶ Stopped(255)
//!     └──Delete (never started)──▶ gone
//! ```
//!
//! What the container's VM left on the host is listed in `capsid.json` in
//! its bundle (the VMM's pid, the scratch directory), so `delete` after a
//! shim crash finds and removes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use capsid_protocol::{
    AgentClient, CreateContainer, DEFAULT_AGENT_PORT, ExecProcess, ExitStatus, ProcessRef,
};
use capsid_runtime::Config;
use containerd_shim::protos::types::mount::Mount;
use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

use crate::rootfs;
use crate::sandbox::{Role, Sandbox};
use crate::stdio::{Copiers, StdioPaths};

/// The exit status reported when the VM died under a process.
pub const VM_DIED_STATUS: u32 = 255;
/// How long an exit waits for the process's output to reach containerd.
const OUTPUT_DRAIN: Duration = Duration::from_secs(60);
/// Every agent call but WaitProcess must answer within this.
pub const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
const STATE_FILE: &str = "capsid.json";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("cannot read the bundle's config.json")]
    Bundle(#[source] oci_spec::OciSpecError),
    #[error(transparent)]
    Config(#[from] capsid_runtime::ConfigError),
    #[error(transparent)]
    Spec(#[from] capsid_runtime::spec::SpecError),
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    #[error("cannot make a scratch directory in {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Vm(#[from] capsid_runtime::VmError),
    #[error(transparent)]
    Agent(#[from] capsid_protocol::ClientError),
    #[error(transparent)]
    Stdio(#[from] crate::stdio::StdioError),
    #[error("pod sandbox {0} does not run in this shim: create its sandbox container first")]
    NoPod(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Created,
    Running,
    Stopped { status: u32, at: SystemTime },
}

/// The init process or an exec.
#[derive(Debug)]
pub struct Proc {
    pub process: ProcessRef,
    /// What containerd sees as the process's pid: the VM's (its VMM's),
    /// a host pid. The guest chooses its own pids; a host tool acting on
    /// one of those would hit whatever host process has it.
    pub pid: u32,
    pub stdio: StdioPaths,
    pub copiers: Copiers,
    state: Mutex<ProcState>,
    changed: Condvar,
}

impl Proc {
    fn new(process: ProcessRef, pid: u32, stdio: StdioPaths, copiers: Copiers) -> Self {
        Self {
            process,
            pid,
            stdio,
            copiers,
            state: Mutex::new(ProcState::Created),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ProcState {
        *self.lock()
    }

    pub fn set_running(&self) {
        *self.lock() = ProcState::Running;
    }

    pub fn set_stopped(&self, status: u32) -> ProcState {
        let mut state = self.lock();
        if !matches!(*state, ProcState::Stopped { .. }) {
            *state = ProcState::Stopped {
                status,
                at: SystemTime::now(),
            };
            self.changed.notify_all();
        }
        *state
    }

    /// Blocks until the process has stopped; its status and when.
    pub fn wait(&self) -> (u32, SystemTime) {
        let mut state = self.lock();
        loop {
            if let ProcState::Stopped { status, at } = *state {
                return (status, at);
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What `delete` needs to clean up after a shim that died: the VM's
/// scratch directory, which names its VMM. Written before the VMM starts,
/// so that a shim killed while its guest boots leaves nothing either.
#[derive(Debug, Serialize, Deserialize)]
struct Leftovers {
    scratch: PathBuf,
}

impl Leftovers {
    fn record(&self, bundle: &Path) {
        if let Ok(json) = serde_json::to_vec(self) {
            let _ = std::fs::write(bundle.join(STATE_FILE), json);
        }
    }
}

#[derive(Debug)]
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// The VM it runs in, shared with the rest of its pod.
    pub sandbox: Arc<Sandbox>,
    /// The disk its rootfs image was attached as, when it joined a pod's VM.
    disk: Option<String>,
    pub init: Arc<Proc>,
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl Container {
    /// Creates the container (not started): in a VM of its own, or for a
    /// pod's container in the pod's VM, which `pod` finds by sandbox id.
    /// On an error nothing it made is left.
    pub fn create(
        config: &Config,
        id: &str,
        bundle: &Path,
        mounts: &[Mount],
        stdio: StdioPaths,
        pod: &dyn Fn(&str) -> Option<Arc<Sandbox>>,
    ) -> Result<Self, ContainerError> {
        let spec = Spec::load(bundle.join("config.json")).map_err(ContainerError::Bundle)?;
        let role = Role::of(&spec);
        let size = config.size_for(&spec)?;
        let root_path = capsid_runtime::spec::root_path(&spec);
        let (agent_spec, files) = capsid_runtime::spec::container_spec(spec)?;
        let image = rootfs::image(bundle, mounts, &root_path)?;
        let (sandbox, disk, rootfs) = match role {
            Role::PodMember { sandbox_id } => {
                let sandbox = pod(&sandbox_id).ok_or(ContainerError::NoPod(sandbox_id))?;
                let (disk, rootfs) = sandbox.join(id, &image)?;
                (sandbox, Some(disk), rootfs)
            }
            Role::Alone | Role::PodSandbox => {
                let spare = if role == Role::PodSandbox {
                    config.pod_containers
                } else {
                    0
                };
                let record = |scratch: &Path| {
                    Leftovers {
                        scratch: scratch.to_owned(),
                    }
                    .record(bundle);
                };
                let (sandbox, rootfs) = Sandbox::boot(config, id, size, &image, spare, &record)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(bundle.join(STATE_FILE));
                    })?;
                (Arc::new(sandbox), None, rootfs)
            }
        };
        // From here a failure takes the container out of the VM again (and
        // the VM down, if it was the VM's only container).
        let leave = |e: ContainerError| {
            sandbox.leave(id, disk.as_deref());
            let _ = std::fs::remove_file(bundle.join(STATE_FILE));
            e
        };
        Leftovers {
            scratch: sandbox.scratch().to_owned(),
        }
        .record(bundle);
        let pid = sandbox
            .client
            .create_container(CreateContainer {
                id: id.to_owned(),
                rootfs,
                spec: agent_spec,
                stdio: stdio.request(),
                files,
            })
            .map_err(|e| leave(e.into()))?;
        let process = ProcessRef::init(id);
        let copiers = match Copiers::attach(&sandbox.client, &process, &stdio) {
            Ok(copiers) => copiers,
            Err(e) => {
                let _ = sandbox.client.remove_container(id);
                return Err(leave(e.into()));
            }
        };
        let vmm_pid = sandbox.vmm_pid;
        log::info!("{id}: created; its init is pid {pid} in micro-VM {vmm_pid}");
        Ok(Self {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            sandbox,
            disk,
            init: Arc::new(Proc::new(process, vmm_pid, stdio, copiers)),
            execs: Mutex::new(HashMap::new()),
        })
    }

    pub fn client(&self) -> &AgentClient {
        &self.sandbox.client
    }

    pub fn exec(
        &self,
        exec_id: &str,
        spec: Process,
        stdio: StdioPaths,
    ) -> Result<Arc<Proc>, ContainerError> {
        let process = ProcessRef::exec(&self.id, exec_id);
        let pid = self.client().exec_process(ExecProcess {
            process: process.clone(),
            spec,
            stdio: stdio.request(),
        })?;
        let copiers = Copiers::attach(self.client(), &process, &stdio)?;
        log::info!("{}: exec {exec_id} is pid {pid} in the guest", self.id);
        let proc = Arc::new(Proc::new(process, self.sandbox.vmm_pid, stdio, copiers));
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(exec_id.to_owned(), Arc::clone(&proc));
        Ok(proc)
    }

    pub fn find(&self, exec_id: &str) -> Option<Arc<Proc>> {
        if exec_id.is_empty() {
            return Some(Arc::clone(&self.init));
        }
        self.execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(exec_id)
            .cloned()
    }

    /// Starts `proc` and, on a thread of its own, waits for it to exit; then
    /// waits for its output to drain, marks it stopped and calls `on_exit`
    /// with its status.
    pub fn start(
        &self,
        proc: &Arc<Proc>,
        on_exit: impl FnOnce(u32, SystemTime) + Send + 'static,
    ) -> Result<(), ContainerError> {
        // The wait gets its own connection, made before the start so a
        // quick exit cannot be missed.
        let waiter = AgentClient::connect(
            &self.sandbox.uds(),
            DEFAULT_AGENT_PORT,
            AGENT_IO_TIMEOUT,
            AGENT_IO_TIMEOUT,
        )?;
        self.client().start_process(&proc.process)?;
        proc.set_running();
        let proc = Arc::clone(proc);
        // Weak: a process that outlives its container must not keep the VM.
        let sandbox = Arc::downgrade(&self.sandbox);
        std::thread::spawn(move || {
            let status = match waiter.wait_process(&proc.process) {
                Ok(ExitStatus::Code(code)) => u32::try_from(code).unwrap_or(VM_DIED_STATUS),
                Ok(status) => u32::try_from(status.shell_code()).unwrap_or(VM_DIED_STATUS),
                Err(e) => {
                    log::error!(
                        "{:?}: lost the process: {}; {}",
                        proc.process,
                        capsid_protocol::error_chain(&e),
                        sandbox.upgrade().map_or_else(
                            || "the micro-VM was taken down".into(),
                            |sandbox| sandbox.post_mortem()
                        )
                    );
                    VM_DIED_STATUS
                }
            };
            proc.copiers.wait_outputs(OUTPUT_DRAIN);
            if let ProcState::Stopped { status, at } = proc.set_stopped(status) {
                on_exit(status, at);
            }
        });
        Ok(())
    }

    /// Marks every process stopped (the VM is gone or going).
    pub fn stop_all(&self) {
        self.init.set_stopped(VM_DIED_STATUS);
        for proc in self
            .execs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            proc.set_stopped(VM_DIED_STATUS);
        }
    }

    /// Removes the container from its VM (the VM goes down with its last
    /// container) and everything it made on the host.
    pub fn destroy(&self) {
        if self.sandbox.running()
            && let Err(e) = self.client().remove_container(&self.id)
        {
            log::warn!("{}: {}", self.id, capsid_protocol::error_chain(&e));
        }
        self.stop_all();
        self.sandbox.leave(&self.id, self.disk.as_deref());
        let _ = std::fs::remove_file(self.bundle.join(STATE_FILE));
    }
}

/// After a shim died: kill its VMM if it still runs and remove its scratch
/// directory, its state file and a rootfs mount it may have left.
pub fn cleanup_leftovers(bundle: &Path, id: &str) {
    let state = bundle.join(STATE_FILE);
    if let Some(leftovers) = std::fs::read(&state)
        .ok()
        .and_then(|json| serde_json::from_slice::<Leftovers>(&json).ok())
    {
        let scratch = leftovers.scratch.to_string_lossy();
        // Only a VM directory of ours: the file is in a bundle others write.
        if leftovers.scratch.is_absolute() && scratch.contains("/vm-") {
            let confinement = Config::load().unwrap_or_default().confinement();
            let killed = capsid_runtime::vm::kill_orphans(&leftovers.scratch, &confinement);
            if killed > 0 {
                log::warn!("{id}: killed the capsid-vmm its shim left ({scratch})");
            }
            let _ = std::fs::remove_dir_all(&leftovers.scratch);
        }
        let _ = std::fs::remove_file(&state);
    }
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}
