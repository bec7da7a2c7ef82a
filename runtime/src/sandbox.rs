//! A sandbox: one micro-VM, its agent, and the containers in it. This is
//! the one place the lifecycle is written; the shim (containerd's task
//! API), the CLI (`capsid run`, the OCI verbs) and the end-to-end tests
//! adapt it to their callers.
//!
//! ```text
//!  Sandbox::boot ─▶ capsid-vmm with the first container's rootfs image
//!                   as disk "rootfs" (and spare slots for a pod) ─▶ the
//!                   agent answers (a guest that crashed first is booted
//!                   again, visibly: vm.rs)
//!  Sandbox::join ─▶ a pod's next container: its rootfs image on a spare
//!                   slot, through the VMM's API
//!  Sandbox::create ─▶ CreateContainer; the adapter attaches its stdio
//!      └─▶ Container::start ─▶ StartProcess; a thread waits for the exit
//!                             (Container: container.rs)
//!  Container::destroy ─▶ RemoveContainer, its disk detached ─▶ the last
//!                        container gone: Shutdown if the guest writes a
//!                        disk, the VMM killed (at once without one, else
//!                        if it lingers), the VM's directory removed
//! ```
//!
//! The sandbox talks to the guest through the [`Agent`] trait and to its
//! VMM through the [`Vm`] trait, so that tests drive it with fakes
//! (`crate::fake`).

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsid_images::rootfs::RootfsImage;
use capsid_protocol::{
    AgentClient, ClientError, CreateContainer, DEFAULT_AGENT_PORT, ErrorCode, ProcessRef, Rootfs,
    SharedNamespaces, StdioRequest,
};
use oci_spec::runtime::Spec;

use crate::agent::Agent;
use crate::config::{Config, ConfigError, VmSize};
use crate::confine::Confinement;
use crate::container::{Container, Process, ProcessIo};
use crate::network::{self, Wiring};
use crate::template::{self, TemplateSpec};
use crate::vm::{
    BootPolicy, Disk, DiskFile, MicroVm, MicroVmError, ROOTFS_DISK, VmApi, VmNet, VmSpec,
    alive_with, diagnostics_in, kill_orphans, rootfs_disk, vsock_path,
};
use capsid_base::lock;

/// What went wrong with a sandbox or one of its containers.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The configuration or an annotation is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The VM could not be booted or changed.
    #[error(transparent)]
    Vm(#[from] MicroVmError),
    /// An agent call failed.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The VM has died.
    #[error("the micro-VM is gone")]
    Gone,
    /// The agent connection broke (neither a refusal nor a missed
    /// deadline): what the VMM's exit and the guest console say, taken
    /// before the sandbox went down and removed them.
    #[error("{}; {post_mortem}", capsid_base::error_chain(cause))]
    Lost {
        /// How the call failed.
        cause: ClientError,
        /// The VMM's exit (or that it runs on), its log, the console.
        post_mortem: String,
    },
    /// The sandbox's network could not be wired.
    #[error("cannot give the micro-VM its network")]
    Network(#[from] crate::network::NetworkError),
    /// The process has ended.
    #[error("process {0} has already finished")]
    Finished(ProcessRef),
    /// The process was started before.
    #[error("process {0} was already started")]
    AlreadyStarted(ProcessRef),
    /// Only a running container can be paused.
    #[error("container {0} is not running")]
    NotRunning(String),
    /// A paused container takes no new process.
    #[error("container {0} is paused; resume it first")]
    Paused(String),
    /// Only a paused container can be resumed.
    #[error("container {0} is not paused")]
    NotPaused(String),
    /// No entropy for a restored guest.
    #[error("cannot read entropy for a restored guest from /dev/urandom")]
    Entropy(#[source] std::io::Error),
}

impl SandboxError {
    /// The agent's refusal, when that is what this is: its code keeps its
    /// meaning for the caller's caller (containerd's errdefs, say).
    pub fn agent_code(&self) -> Option<ErrorCode> {
        match self {
            Self::Agent(ClientError::Agent { code, .. }) => Some(*code),
            _ => None,
        }
    }

    /// Whether the agent missed a call's deadline.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Agent(e) if e.is_timeout())
    }
}

/// What a sandbox needs of the machine its agent runs in. The real one is
/// a [`MicroVm`] ([`BootedVm`]); tests use `crate::fake::FakeVm`.
pub trait Vm: Send + Sync + std::fmt::Debug {
    /// The VMM's host pid: what containerd and runc's callers see as the
    /// container's pid (the guest's pids mean nothing on the host).
    fn pid(&self) -> u32;
    /// Whether the VMM still runs.
    fn running(&self) -> bool;
    /// Waits up to `timeout` for the VMM to exit by itself; whether it
    /// did. Looks at [`Vm::running`] every 10 ms.
    fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
    /// Attaches `image` read-only to a spare disk slot as disk `id`.
    fn attach_disk(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError>;
    /// Detaches disk `id`; the agent has unmounted it.
    fn detach_disk(&self, id: &str) -> Result<(), MicroVmError>;
    /// If the VMM exited (waiting up to `grace`), what its status means.
    fn exit_report(&self, grace: Duration) -> Option<String>;
    /// The VMM's log and the guest console's end, for an error message.
    fn diagnostics(&self) -> String;
    /// SIGKILLs the VMM if it still runs, and reaps it.
    fn kill(&self);
}

/// A booted [`MicroVm`] shared between threads: each look at it takes its
/// lock briefly, never across a wait, so a kill is never held up; its API
/// is used without the lock.
#[derive(Debug)]
pub struct BootedVm {
    vm: Mutex<MicroVm>,
    api: VmApi,
    pid: u32,
}

impl BootedVm {
    /// Takes charge of `vm`.
    pub fn new(vm: MicroVm) -> Self {
        Self {
            api: vm.api(),
            pid: vm.pid(),
            vm: Mutex::new(vm),
        }
    }
}

impl Vm for BootedVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn running(&self) -> bool {
        matches!(lock(&self.vm).try_wait(), Ok(None))
    }

    fn attach_disk(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError> {
        self.api.attach(image, id)
    }

    fn detach_disk(&self, id: &str) -> Result<(), MicroVmError> {
        self.api.detach(id)
    }

    fn exit_report(&self, grace: Duration) -> Option<String> {
        if !self.wait_exit(grace) {
            return None;
        }
        lock(&self.vm).exit_report(Duration::ZERO)
    }

    fn diagnostics(&self) -> String {
        lock(&self.vm).diagnostics()
    }

    fn kill(&self) {
        lock(&self.vm).kill();
    }
}

/// A VM another process launched and owns (the OCI verbs' monitor), found
/// again from its scratch directory: its VMM is told from a recycled pid
/// by its arguments, which name that directory.
#[derive(Debug)]
pub struct AdoptedVm {
    pid: u32,
    dir: PathBuf,
    api: VmApi,
    confinement: Confinement,
}

impl AdoptedVm {
    /// The VM whose VMM (launcher) is `pid`, with its directory `dir`,
    /// confined as `confinement` says.
    pub fn new(pid: u32, dir: &Path, confinement: Confinement) -> Self {
        Self {
            pid,
            dir: dir.to_owned(),
            api: VmApi::in_dir(dir),
            confinement,
        }
    }
}

impl Vm for AdoptedVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn running(&self) -> bool {
        alive_with(self.pid, &[&self.dir.to_string_lossy()])
    }

    fn attach_disk(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError> {
        self.api.attach(image, id)
    }

    fn detach_disk(&self, id: &str) -> Result<(), MicroVmError> {
        self.api.detach(id)
    }

    fn exit_report(&self, grace: Duration) -> Option<String> {
        // Not our child: its exit status went to its owner.
        self.wait_exit(grace)
            .then(|| "the micro-VM is gone: its capsid-vmm no longer runs".to_owned())
    }

    fn diagnostics(&self) -> String {
        diagnostics_in(&self.dir)
    }

    fn kill(&self) {
        kill_orphans(&self.dir, &self.confinement);
    }
}

/// How to boot a sandbox's VM.
#[derive(Debug)]
pub struct BootRequest<'a> {
    /// Names the sandbox in log lines (its first container's id).
    pub name: &'a str,
    /// vCPUs and memory.
    pub size: VmSize,
    /// The first container's rootfs image, the VM's disk "rootfs".
    pub image: &'a RootfsImage,
    /// Slots for the rootfs images of containers that join later (a pod).
    pub spare_disks: u8,
    /// The VM's directory; it must exist. See [`Teardown`].
    pub dir: &'a Path,
    /// What shutting down removes.
    pub teardown: Teardown,
    /// The VMM dies with the thread that boots it (see [`VmSpec`]).
    pub die_with_owner: bool,
    /// The deadline, the retries, and where to say so.
    pub policy: BootPolicy<'a>,
    /// The network namespace whose interfaces the VM gets
    /// ([`crate::network`]); `None`: no network device at all.
    pub network: Option<&'a Path>,
    /// An ext4 image with no name on the host
    /// (`capsid_images::rootfs::anonymous_scratch_disk`) for the first
    /// container's writes, the VM's writable disk "scratch"; `None`: they
    /// go to the guest's memory.
    pub scratch_disk: Option<&'a DiskFile>,
    /// Further disks from boot on, which the container's mounts name by
    /// id (`disk:ID`): `capsid run --volume` and `--cache`.
    pub extra_disks: &'a [Disk],
    /// Boot the kernel even where a template could be restored
    /// (`capsid run --cold`); the configuration's `warm_start = false`
    /// does this for every sandbox.
    pub cold: bool,
}

/// Gives a guest restored from a template its own entropy (the host's
/// `/dev/urandom`) and the host's time, before anything runs in it.
fn take_identity(agent: &AgentClient) -> Result<(), SandboxError> {
    use std::io::Read;
    let mut entropy = vec![0u8; capsid_protocol::REFRESH_ENTROPY_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut entropy))
        .map_err(SandboxError::Entropy)?;
    let unix_time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    agent.refresh(&capsid_protocol::Refresh {
        entropy,
        unix_time_ns,
    })?;
    Ok(())
}

/// The disk id of [`BootRequest::scratch_disk`] in the VM.
pub const SCRATCH_DISK: &str = "scratch";

/// Where a sandbox's network wiring is kept for [`Sandbox::reopen`] and
/// for a sweep after its owner died.
const NETWORK_FILE: &str = network::WIRING_FILE;

/// What taking a sandbox down removes besides its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// The VM's directory goes with it.
    RemoveDir,
    /// The caller owns the directory (and removes it, or keeps state in it).
    KeepDir,
}

/// One VM, its agent and its containers.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    agent: Arc<dyn Agent>,
    vm: Arc<dyn Vm>,
    /// Removed when the sandbox goes down, if it owns it.
    dir: Option<PathBuf>,
    members: Mutex<HashSet<String>>,
    next_disk: AtomicU32,
    down: AtomicBool,
    /// Whether the VM goes down with this sandbox (its last container, its
    /// drop); not for one [`Sandbox::reopen`] found.
    owner: bool,
    /// What [`crate::network::unwire`] takes down when the sandbox goes.
    network: Option<Wiring>,
    /// The VM was restored from its template rather than booted.
    restored: bool,
    /// The guest can write to a disk, so it must sync and power off before
    /// its VMM goes; a VM whose disks are all read-only is killed at once
    /// (what it held in memory dies with it either way).
    writes_disks: bool,
}

/// How long a guest has to shut down by itself before its VMM is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Sandbox {
    /// Boots a VM with `request.image` as its rootfs disk and waits for its
    /// agent; returns the sandbox and how the first container's rootfs is
    /// mounted. An agent that later misses a call's deadline takes the VM
    /// down (a guest that stalls one call may stall them all). On an
    /// error, nothing it made is left (the directory is the caller's).
    pub fn boot(config: &Config, request: BootRequest<'_>) -> Result<(Self, Rootfs), SandboxError> {
        let (disk, mut rootfs) = rootfs_disk(request.image);
        let mut disks = vec![disk];
        if let Some(file) = request.scratch_disk {
            disks.push(Disk {
                file: Some(file.clone()),
                path: "(the scratch disk)".into(),
                read_only: false,
                id: SCRATCH_DISK.into(),
            });
            rootfs.upper_disk = Some(SCRATCH_DISK.into());
        }
        disks.extend(request.extra_disks.iter().cloned());
        let name = request.name;
        // The wiring is recorded before anything of it is made: an owner
        // killed from there on leaves it to a sweep
        // (`network::unwire_recorded`).
        let record = |wiring: &network::Wiring| {
            let recorded = serde_json::to_vec(wiring)
                .map_err(std::io::Error::other)
                .and_then(|json| std::fs::write(request.dir.join(NETWORK_FILE), json));
            if let Err(e) = recorded {
                log::warn!("{name}: cannot record the network wiring: {e}");
            }
        };
        let wired = request
            .network
            .map(|netns| network::wire(netns, &record))
            .transpose()?
            .filter(|w| !w.devices.is_empty());
        // The taps live in `wired` until the VM is up: the VMM holds its
        // copies from then on, and a tap goes with the VMM.
        let unwire = |wired: &Option<network::Wired>| {
            if let Some(wired) = wired
                && let Err(e) = network::unwire(&wired.wiring)
            {
                log::warn!("{name}: {}", capsid_base::error_chain(&e));
            }
        };
        let nets = wired
            .iter()
            .flat_map(|w| &w.devices)
            .map(|device| VmNet {
                tap: device.tap.as_raw_fd(),
                mac: device.mac,
                mtu: device.mtu,
            })
            .collect();
        let cold_spec = VmSpec {
            boot: config.boot_files()?,
            vcpus: request.size.vcpus,
            memory_mib: request.size.memory_mib,
            disks,
            spare_disks: request.spare_disks,
            dir: request.dir.to_owned(),
            log_level: "warn".into(),
            confinement: config.confinement(),
            die_with_owner: request.die_with_owner,
            nets,
            restore: None,
        };
        // Warm start: a VM with nothing but its rootfs image is restored
        // from its shape's template and takes the image through a spare
        // slot; anything a restore cannot bring back (taps, writable disks
        // given at boot) boots cold.
        let warm = config.warm_start
            && !request.cold
            && cold_spec.nets.is_empty()
            && request.scratch_disk.is_none()
            && request.extra_disks.is_empty();
        // The template's spare slots: the first container's image, then
        // the pod's.
        let slots = request.spare_disks.saturating_add(1);
        let template = warm
            .then(|| {
                let spec = TemplateSpec {
                    boot: &cold_spec.boot,
                    size: request.size,
                    slots,
                    confinement: config.confinement(),
                };
                template::ensure(
                    &template::templates_dir(),
                    &config.run_dir,
                    &spec,
                    &request.policy,
                )
                .map_err(|e| {
                    log::warn!(
                        "{name}: no template, booting cold: {}",
                        capsid_base::error_chain(&e)
                    );
                })
                .ok()
            })
            .flatten();
        let restored = match template {
            None => None,
            Some(dir) => {
                let spec = VmSpec {
                    disks: Vec::new(),
                    spare_disks: slots,
                    restore: Some(dir.clone()),
                    ..cold_spec.clone()
                };
                let attempt = MicroVm::boot(&spec, &request.policy)
                    .map_err(SandboxError::from)
                    .and_then(|(vm, client)| {
                        take_identity(&client)?;
                        let rootfs = vm.attach(request.image, ROOTFS_DISK)?;
                        Ok((vm, client, rootfs))
                    });
                match attempt {
                    Ok(restored) => Some(restored),
                    // The VMM refused the template (another build's, another
                    // CPU's, damaged): it goes, and this VM boots.
                    Err(SandboxError::Vm(MicroVmError::DiedBooting {
                        vmm_error: true,
                        status,
                        log,
                        ..
                    })) => {
                        log::warn!(
                            "{name}: capsid-vmm refused the template {} ({status}{log}); removing it and booting",
                            dir.display(),
                        );
                        template::discard(&dir);
                        let vm_dir = crate::vm::vm_dir(request.dir);
                        if let Err(e) = std::fs::remove_dir_all(&vm_dir)
                            && e.kind() != std::io::ErrorKind::NotFound
                        {
                            log::warn!("{name}: cannot remove {}: {e}", vm_dir.display());
                        }
                        None
                    }
                    Err(e) => {
                        unwire(&wired);
                        return Err(e);
                    }
                }
            }
        };
        let warm_started = restored.is_some();
        let start = if warm_started {
            "restored from its template"
        } else {
            "booted"
        };
        let booted = match restored {
            Some((vm, client, attached)) => {
                rootfs = attached;
                Ok((vm, client))
            }
            None => MicroVm::boot(&cold_spec, &request.policy),
        };
        let (vm, client) = match booted {
            Ok(booted) => booted,
            Err(e) => {
                unwire(&wired);
                return Err(e.into());
            }
        };
        log::info!(
            "{name}: micro-VM {} ({} vCPUs, {} MiB, {} spare disk slots) {start} with {}",
            vm.pid(),
            request.size.vcpus,
            request.size.memory_mib,
            request.spare_disks,
            request.image.path.display()
        );
        if let Some(w) = &wired {
            let configured = client.configure_network(&w.config);
            if let Err(e) = configured {
                drop(vm);
                unwire(&wired);
                return Err(e.into());
            }
            log::info!(
                "{name}: network from {}: {}",
                w.wiring.netns.display(),
                network::describe(&w.config)
            );
        }
        let vm: Arc<dyn Vm> = Arc::new(BootedVm::new(vm));
        let weak = Arc::downgrade(&vm);
        let owner = name.to_owned();
        client.on_timeout(Box::new(move |call| {
            if let Some(vm) = weak.upgrade() {
                log::error!(
                    "{owner}: the agent missed the deadline of {call}; killing micro-VM {}",
                    vm.pid()
                );
                vm.kill();
            }
        }));
        let dir = (request.teardown == Teardown::RemoveDir).then(|| request.dir.to_owned());
        let mut sandbox = Self::new(name, Arc::new(client), vm, dir);
        sandbox.network = wired.map(|w| w.wiring);
        sandbox.restored = warm_started;
        sandbox.writes_disks = cold_spec.disks.iter().any(|disk| !disk.read_only);
        Ok((sandbox, rootfs))
    }

    /// A sandbox over a running VM and its agent, with no container yet;
    /// `dir` is removed when it goes down.
    pub fn new(name: &str, agent: Arc<dyn Agent>, vm: Arc<dyn Vm>, dir: Option<PathBuf>) -> Self {
        Self {
            name: name.to_owned(),
            agent,
            vm,
            dir,
            members: Mutex::new(HashSet::new()),
            next_disk: AtomicU32::new(1),
            down: AtomicBool::new(false),
            owner: true,
            network: None,
            restored: false,
            writes_disks: true,
        }
    }

    /// Whether the VM was restored from its template (warm start) rather
    /// than booted.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// The sandbox another process booted in `dir` (its VMM is `vmm_pid`),
    /// to act on its containers: its agent answers within `wait`, then each
    /// call within `io_timeout`. The VM stays up when this goes; its owner
    /// takes it down.
    pub fn reopen(
        name: &str,
        dir: &Path,
        vmm_pid: u32,
        confinement: Confinement,
        wait: Duration,
        io_timeout: Duration,
    ) -> Result<Self, SandboxError> {
        let vm = AdoptedVm::new(vmm_pid, dir, confinement);
        if !vm.running() {
            return Err(SandboxError::Gone);
        }
        let client = AgentClient::connect(&vsock_path(dir), DEFAULT_AGENT_PORT, wait, io_timeout)?;
        let mut sandbox = Self::new(name, Arc::new(client), Arc::new(vm), None);
        sandbox.owner = false;
        sandbox.network = std::fs::read(dir.join(NETWORK_FILE))
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok());
        Ok(sandbox)
    }

    /// Its agent.
    pub fn agent(&self) -> &Arc<dyn Agent> {
        &self.agent
    }

    /// The host pid that stands for the VM (its VMM's launcher).
    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Whether its VMM still runs.
    pub fn running(&self) -> bool {
        self.vm.running()
    }

    /// Attaches container `id`'s rootfs image to a spare disk slot of the
    /// running VM. Returns the disk's id and how the agent mounts it.
    pub fn join(&self, id: &str, image: &RootfsImage) -> Result<(String, Rootfs), SandboxError> {
        let disk = format!("ctr-{}", self.next_disk.fetch_add(1, Ordering::Relaxed));
        let rootfs = self.vm.attach_disk(image, &disk)?;
        log::info!("{id}: joins micro-VM {} on disk {disk}", self.vm.pid());
        Ok((disk, rootfs))
    }

    /// Creates container `request.id` (not started) on `rootfs`, the boot
    /// disk or one [`Sandbox::join`] attached as `disk`; `attach` connects
    /// the init's stdio before it can run. On an error the container is
    /// gone from the VM again (and the VM down, if it had no other).
    pub fn create<Io: ProcessIo, E: From<SandboxError>>(
        self: &Arc<Self>,
        request: ContainerRequest,
        attach: impl FnOnce(&dyn Agent, &ProcessRef) -> Result<Io, E>,
    ) -> Result<Container<Io>, E> {
        let ContainerRequest {
            id,
            rootfs,
            disk,
            spec,
            files,
            stdio,
            share,
        } = request;
        lock(&self.members).insert(id.clone());
        let created = self.agent.create_container(CreateContainer {
            id: id.clone(),
            rootfs,
            spec,
            stdio,
            files,
            share,
        });
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                let e = self.explain(e);
                self.leave(&id, disk.as_deref());
                return Err(e.into());
            }
        };
        let init = ProcessRef::init(&id);
        let io = match attach(&*self.agent, &init) {
            Ok(io) => io,
            Err(e) => {
                let _ = self.agent.remove_container(&id);
                self.leave(&id, disk.as_deref());
                return Err(e);
            }
        };
        log::info!(
            "{id}: created; its init is pid {pid} in micro-VM {}",
            self.vm.pid()
        );
        Ok(Container::new(
            id,
            Arc::clone(self),
            disk,
            Process::new(init, self.vm.pid(), io),
        ))
    }

    /// Container `id` is gone from the VM (the agent removed it): detach
    /// its disk, if it joined with one. The last container takes the VM
    /// down.
    pub fn leave(&self, id: &str, disk: Option<&str>) {
        if let Some(disk) = disk
            && self.running()
            && let Err(e) = self.vm.detach_disk(disk)
        {
            log::warn!("{id}: {}", capsid_base::error_chain(&e));
        }
        let mut members = lock(&self.members);
        members.remove(id);
        if members.is_empty() && self.owner {
            drop(members);
            let _ = self.shut_down();
        }
    }

    /// An agent call's failure, as the caller should see it: a broken
    /// connection carries the post-mortem, which is gone once the sandbox
    /// went down; a refusal or a missed deadline is what it is.
    pub(crate) fn explain(&self, e: ClientError) -> SandboxError {
        if matches!(e, ClientError::Agent { .. }) || e.is_timeout() {
            return e.into();
        }
        let post_mortem = self.post_mortem();
        SandboxError::Lost {
            cause: e,
            post_mortem,
        }
    }

    /// Why the VM is gone, with the VMM's log and the end of the guest
    /// console (for a log line when the agent connection broke); or that
    /// it still runs.
    pub fn post_mortem(&self) -> String {
        match self.vm.exit_report(Duration::from_millis(500)) {
            Some(report) => report + &self.vm.diagnostics(),
            None => "the micro-VM still runs".to_owned() + &self.vm.diagnostics(),
        }
    }

    /// Whether the VMM exited (waiting up to `grace`; a broken agent
    /// connection comes a moment before the exit), and what its status
    /// means; `None` if it still runs.
    pub fn exit_report(&self, grace: Duration) -> Option<String> {
        self.vm.exit_report(grace)
    }

    /// The VMM's log and the guest console's end, for an error message.
    pub fn diagnostics(&self) -> String {
        self.vm.diagnostics()
    }

    /// Kills the VM now, without asking its guest (a forced delete; a VM
    /// already dead). [`Sandbox::shut_down`] still removes what it owns.
    pub fn kill(&self) {
        self.vm.kill();
    }

    /// Takes the VM down: a guest that writes a disk is asked to shut down
    /// (it syncs) and has 5 s before its VMM is killed; one whose disks are
    /// all read-only is killed at once. Removes the VM's directory if the
    /// sandbox owns it. Once only; the agent's refusal is returned (the VM
    /// is gone all the same).
    pub fn shut_down(&self) -> Result<(), SandboxError> {
        if self.down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let mut outcome = Ok(());
        // Nothing of a guest with read-only disks outlives it, so there is
        // nothing to wait for: its VMM is killed, as Cloud Hypervisor's and
        // QEMU's quit do. A guest that writes a disk syncs it first.
        if self.writes_disks && self.vm.running() {
            match self.agent.shutdown() {
                Ok(()) => {
                    self.vm.wait_exit(SHUTDOWN_GRACE);
                }
                Err(e) => outcome = Err(e.into()),
            }
        }
        self.vm.kill();
        if let Some(wiring) = &self.network
            && let Err(e) = network::unwire(wiring)
        {
            log::warn!("{}: {}", self.name, capsid_base::error_chain(&e));
        }
        if let Some(dir) = &self.dir
            && let Err(e) = std::fs::remove_dir_all(dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            log::warn!("{}: cannot remove {}: {e}", self.name, dir.display());
        }
        outcome
    }
}

impl Drop for Sandbox {
    /// A sandbox dropped with containers still in it (a failed create, an
    /// error in its owner): nothing may outlive it.
    fn drop(&mut self) {
        if self.owner {
            let _ = self.shut_down();
        }
    }
}

/// A container to create in a sandbox.
#[derive(Debug)]
pub struct ContainerRequest {
    /// Its id.
    pub id: String,
    /// Its rootfs disk, as the agent mounts it.
    pub rootfs: Rootfs,
    /// The disk [`Sandbox::join`] attached, detached when it goes.
    pub disk: Option<String>,
    /// The OCI spec as the guest gets it ([`crate::spec::container_spec`]).
    pub spec: Spec,
    /// Host files its bind mounts name (`file:N`).
    pub files: Vec<Vec<u8>>,
    /// The streams of its init the host will attach.
    pub stdio: StdioRequest,
    /// The namespaces it shares with its pod's sandbox
    /// ([`crate::spec::pod_namespaces`]).
    pub share: Option<SharedNamespaces>,
}

/// CRI's annotation of what a container is in its pod ("sandbox" or
/// "container").
pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation of the pod's id (its sandbox container's id).
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Where a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not in a pod: a VM of its own.
    Alone,
    /// A pod's sandbox container: boots the pod's VM.
    PodSandbox,
    /// Another container of pod `sandbox_id`: joins the pod's VM.
    PodMember {
        /// The pod's id.
        sandbox_id: String,
    },
}

impl Role {
    /// What CRI's annotations on `spec` say.
    pub fn of(spec: &Spec) -> Self {
        let Some(annotations) = spec.annotations() else {
            return Role::Alone;
        };
        match (
            annotations.get(CRI_CONTAINER_TYPE).map(String::as_str),
            annotations.get(CRI_SANDBOX_ID),
        ) {
            (Some("sandbox"), _) => Role::PodSandbox,
            (Some("container"), Some(sandbox_id)) => Role::PodMember {
                sandbox_id: sandbox_id.clone(),
            },
            _ => Role::Alone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeAgent, sandbox};

    fn spec(annotations: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","annotations":{{{annotations}}}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn cri_annotations_say_where_a_container_runs() {
        assert_eq!(Role::of(&spec("")), Role::Alone);
        assert_eq!(
            Role::of(&spec(
                r#""io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.sandbox-id":"p1""#
            )),
            Role::PodSandbox
        );
        assert_eq!(
            Role::of(&spec(
                r#""io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"p1""#
            )),
            Role::PodMember {
                sandbox_id: "p1".into()
            }
        );
        // A container that names no pod runs alone.
        assert_eq!(
            Role::of(&spec(r#""io.kubernetes.cri.container-type":"container""#)),
            Role::Alone
        );
    }

    #[test]
    fn a_create_that_loses_the_agent_says_how_the_vm_ended() {
        let (lost, agent, vm) = sandbox(None);
        agent.vm_died();
        vm.crash();
        let e = lost
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap_err();
        assert!(matches!(e, SandboxError::Lost { .. }), "{e:?}");
        let text = capsid_base::error_chain(&e);
        assert!(
            text.contains("connection reset") && text.ends_with("the fake VM stopped"),
            "{text}"
        );

        // A refusal stays the agent's, with its code.
        let (refusing, agent, _vm) = sandbox(None);
        agent.refuse("CreateContainer", ErrorCode::InvalidArgument);
        let e = refusing
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap_err();
        assert_eq!(e.agent_code(), Some(ErrorCode::InvalidArgument), "{e:?}");
    }

    #[test]
    fn the_last_container_to_go_takes_the_vm_and_its_directory_down() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm-1");
        std::fs::create_dir(&vm_dir).unwrap();
        let (sandbox, agent, vm) = sandbox(Some(vm_dir.clone()));
        let first = sandbox
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap();
        let image = crate::fake::image();
        let (disk, rootfs) = sandbox.join("c2", &image).unwrap();
        let mut request = FakeAgent::request("c2");
        request.rootfs = rootfs;
        request.disk = Some(disk.clone());
        let second = sandbox
            .create(request, |_, _| Ok::<_, SandboxError>(()))
            .unwrap();
        first.destroy();
        assert!(vm.running(), "the pod's VM stays while c2 is in it");
        second.destroy();
        assert!(!vm.running() && !vm_dir.exists());
        assert_eq!(vm.disks(), vec![format!("+{disk}"), format!("-{disk}")]);
        assert_eq!(
            agent.calls(),
            [
                "CreateContainer c1",
                "CreateContainer c2",
                "RemoveContainer c1",
                "RemoveContainer c2",
                "Shutdown",
            ]
        );
    }

    #[test]
    fn a_failed_create_leaves_nothing() {
        let (sandbox, agent, vm) = sandbox(None);
        agent.refuse("CreateContainer", ErrorCode::InvalidArgument);
        let error = sandbox
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap_err();
        assert_eq!(error.agent_code(), Some(ErrorCode::InvalidArgument));
        assert!(!vm.running(), "a VM with no container left is taken down");

        // Its stdio could not be attached: the agent removes it again.
        let (sandbox, agent, vm) = self::sandbox(None);
        let error = sandbox
            .create(FakeAgent::request("c1"), |_, _| {
                Err::<(), _>(SandboxError::Gone)
            })
            .unwrap_err();
        assert!(matches!(error, SandboxError::Gone));
        assert_eq!(
            agent.calls(),
            ["CreateContainer c1", "RemoveContainer c1", "Shutdown"]
        );
        assert!(!vm.running());
    }

    #[test]
    fn a_reopened_sandbox_leaves_the_vm_to_its_owner() {
        let (sandbox, agent, vm) = sandbox(None);
        let mut view = Arc::try_unwrap(sandbox).unwrap();
        view.owner = false;
        let view = Arc::new(view);
        let container = view
            .create(FakeAgent::request("c1"), |_, _| Ok::<_, SandboxError>(()))
            .unwrap();
        container.destroy();
        drop(container);
        drop(view);
        assert!(vm.running());
        assert!(!agent.calls().contains(&"Shutdown".to_owned()));
        // A VMM that is gone is said so at once.
        let dir = tempfile::tempdir().unwrap();
        let gone = Sandbox::reopen(
            "c1",
            dir.path(),
            u32::MAX - 1,
            Confinement::default(),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        assert!(matches!(gone, Err(SandboxError::Gone)));
    }

    #[test]
    fn a_guest_with_read_only_disks_is_killed_without_a_shutdown() {
        let (sandbox, agent, vm) = sandbox(None);
        let mut sandbox = Arc::try_unwrap(sandbox).unwrap();
        sandbox.writes_disks = false;
        sandbox.shut_down().unwrap();
        assert!(!vm.running());
        assert!(agent.calls().is_empty(), "{:?}", agent.calls());
    }

    #[test]
    fn a_guest_that_will_not_shut_down_is_killed_and_the_refusal_returned() {
        let (sandbox, agent, vm) = sandbox(None);
        agent.refuse("Shutdown", ErrorCode::Internal);
        assert!(sandbox.shut_down().is_err());
        assert!(!vm.running());
        // Once only.
        assert!(sandbox.shut_down().is_ok());
        assert_eq!(agent.calls(), ["Shutdown"]);
    }
}
