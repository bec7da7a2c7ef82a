//! One containerd task: a runtime [`Container`] (its own VM, or its pod's)
//! with containerd's stdio FIFOs copied for each process, and the bundle
//! it came from.
//!
//! ```text
//!  Create ─▶ config.json ─▶ CRI's role: alone / pod sandbox ─▶ boot a VM
//!                                       pod member ─▶ join the pod's VM
//!         ─▶ Sandbox::create, the FIFOs attached (capsid-runtime)
//! ```
//!
//! What the container's VM left on the host is listed in `capsid.json` in
//! its bundle (the VM's directory, which names its VMM), written before
//! the VMM starts, so that `delete` after a shim crash finds and removes
//! it (see [`cleanup_leftovers`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsid_runtime::container::Process;
use capsid_runtime::images::rootfs::RootfsImage;
use capsid_runtime::{
    Agent, BootRequest, Config, ContainerRequest, ProcessIo, Role, Sandbox, SandboxError, Teardown,
    VmSize,
};
use containerd_shim::protos::types::mount::Mount;
use serde::{Deserialize, Serialize};

use crate::rootfs;
use crate::stdio::{Copiers, StdioPaths};

/// Every agent call but WaitProcess must answer within this.
pub const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(60);
const STATE_FILE: &str = "capsid.json";

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("the bundle's config.json")]
    Bundle(#[source] capsid_runtime::spec::LoadError),
    #[error(transparent)]
    Config(#[from] capsid_runtime::ConfigError),
    #[error(transparent)]
    Spec(#[from] capsid_runtime::spec::SpecError),
    #[error(transparent)]
    Rootfs(#[from] rootfs::SnapshotError),
    #[error("cannot make a scratch directory in {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    #[error("cannot make the scratch disk (io.capsid.disk)")]
    ScratchDisk(#[source] Box<capsid_runtime::images::rootfs::RootfsError>),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Stdio(#[from] crate::stdio::StdioError),
    #[error("pod sandbox {0} does not run in this shim: create its sandbox container first")]
    NoPod(String),
}

/// A process's stdio as containerd gave it, and the threads copying it.
#[derive(Debug)]
pub struct Fifos {
    pub paths: StdioPaths,
    pub copiers: Copiers,
}

impl Fifos {
    /// Attaches every stream `paths` asks for (before the process starts).
    fn attach(
        agent: &dyn Agent,
        process: &capsid_runtime::protocol::ProcessRef,
        paths: StdioPaths,
    ) -> Result<Self, ContainerError> {
        let copiers = Copiers::attach(agent, process, &paths)?;
        Ok(Self { paths, copiers })
    }
}

impl ProcessIo for Fifos {
    fn drain(&self, bound: Duration) {
        self.copiers.wait_outputs(bound);
    }
}

/// A process of a task.
pub type Proc = Process<Fifos>;

/// What a task's VM gets besides its size and first image.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmOptions<'a> {
    /// Disk slots for the pod's other containers.
    pub spare_disks: u8,
    /// The network namespace whose interfaces the VM gets (the spec's).
    pub network: Option<&'a Path>,
    /// A scratch disk of this many bytes for the container's writes
    /// (`io.capsid.disk`), made in the VM's directory.
    pub disk: Option<u64>,
}

/// Where a task's VM comes from: booted by capsid-runtime, or (in tests)
/// made of fakes.
pub trait Vms: Send + Sync {
    /// The read-only image of the container's root file system.
    fn image(
        &self,
        bundle: &Path,
        mounts: &[Mount],
        root: &Path,
    ) -> Result<RootfsImage, ContainerError>;
    /// Boots a VM for container `id`; `record` hears of the VM's directory
    /// before its VMM starts.
    fn boot(
        &self,
        config: &Config,
        id: &str,
        size: VmSize,
        image: &RootfsImage,
        options: VmOptions<'_>,
        record: &dyn Fn(&Path),
    ) -> Result<(Sandbox, capsid_runtime::protocol::Rootfs), ContainerError>;
}

/// The real thing.
#[derive(Debug)]
pub struct MicroVms;

impl Vms for MicroVms {
    fn image(
        &self,
        bundle: &Path,
        mounts: &[Mount],
        root: &Path,
    ) -> Result<RootfsImage, ContainerError> {
        Ok(rootfs::image(bundle, mounts, root)?)
    }

    fn boot(
        &self,
        config: &Config,
        id: &str,
        size: VmSize,
        image: &RootfsImage,
        options: VmOptions<'_>,
        record: &dyn Fn(&Path),
    ) -> Result<(Sandbox, capsid_runtime::protocol::Rootfs), ContainerError> {
        std::fs::create_dir_all(&config.run_dir)
            .map_err(|e| ContainerError::Scratch(config.run_dir.clone(), e))?;
        let dir = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(&config.run_dir)
            .map_err(|e| ContainerError::Scratch(config.run_dir.clone(), e))?;
        record(dir.path());
        let scratch_disk = match options.disk {
            Some(bytes) => Some(capsid_runtime::DiskFile(Arc::new(
                capsid_runtime::images::rootfs::anonymous_scratch_disk(&config.disk_dir, bytes)
                    .map_err(|e| ContainerError::ScratchDisk(Box::new(e)))?,
            ))),
            None => None,
        };
        let (sandbox, rootfs) = Sandbox::boot(
            config,
            BootRequest {
                name: id,
                size,
                image,
                spare_disks: options.spare_disks,
                dir: dir.path(),
                teardown: Teardown::RemoveDir,
                // The shim boots from a pool thread that may end first;
                // containerd's `shim delete` cleans up after a killed shim.
                die_with_owner: false,
                policy: config.boot_policy(AGENT_IO_TIMEOUT, &|| false, &|why| {
                    log::warn!("{id}: {why}");
                }),
                network: options.network,
                scratch_disk: scratch_disk.as_ref(),
                extra_disks: &[],
                // The configuration's `warm_start` decides.
                cold: false,
            },
        )?;
        // The sandbox owns the directory from here.
        let _ = dir.keep();
        Ok((sandbox, rootfs))
    }
}

/// What `delete` needs to clean up after a shim that died: the VM's
/// directory, which names its VMM. Written before the VMM starts, so that
/// a shim killed while its guest boots leaves nothing either.
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

/// A containerd task.
#[derive(Debug)]
pub struct Task {
    pub bundle: PathBuf,
    pub container: capsid_runtime::Container<Fifos>,
}

impl Task {
    /// Creates the container (not started): in a VM of its own, or for a
    /// pod's container in the pod's VM, which `pod` finds by sandbox id.
    /// On an error nothing it made is left.
    pub fn create(
        vms: &dyn Vms,
        config: &Config,
        id: &str,
        bundle: &Path,
        mounts: &[Mount],
        stdio: StdioPaths,
        pod: &dyn Fn(&str) -> Option<Arc<Sandbox>>,
    ) -> Result<Self, ContainerError> {
        let spec = capsid_runtime::spec::load(&bundle.join("config.json"))
            .map_err(ContainerError::Bundle)?;
        let role = Role::of(&spec);
        let size = config.size_for(&spec)?;
        let disk = config.disk_for(&spec)?;
        let root_path = capsid_runtime::spec::root_path(&spec);
        let netns = capsid_runtime::spec::network_namespace(&spec);
        for ignored in capsid_runtime::spec::ignored_settings(&spec) {
            log::warn!("{id}: {ignored}");
        }
        if spec.hooks().is_some() {
            // containerd runs no hooks through a v2 shim's spec; capsid's
            // OCI verbs run them (capsid_runtime::hooks).
            log::warn!("{id}: the spec's hooks are not run by the shim");
        }
        let (mut agent_spec, files) = capsid_runtime::spec::container_spec(spec)?;
        let mut share = None;
        let image = vms.image(bundle, mounts, &root_path)?;
        let (sandbox, disk, rootfs) = match role {
            Role::PodMember { sandbox_id } => {
                if disk.is_some() {
                    return Err(ContainerError::Config(
                        capsid_runtime::ConfigError::Annotation {
                            key: capsid_runtime::config::ANNOTATION_DISK.into(),
                            value: format!("{disk:?}"),
                            reason: "a pod's containers share its VM: give the pod the annotation"
                                .into(),
                        },
                    ));
                }
                let sandbox = pod(&sandbox_id).ok_or(ContainerError::NoPod(sandbox_id.clone()))?;
                share = capsid_runtime::spec::pod_namespaces(
                    &mut agent_spec,
                    &sandbox_id,
                    sandbox.vmm_pid(),
                )?;
                let (disk, rootfs) = sandbox.join(id, &image)?;
                (sandbox, Some(disk), rootfs)
            }
            Role::Alone | Role::PodSandbox => {
                let options = VmOptions {
                    spare_disks: if role == Role::PodSandbox {
                        config.pod_containers
                    } else {
                        0
                    },
                    network: netns.as_deref(),
                    disk,
                };
                let record = |scratch: &Path| {
                    Leftovers {
                        scratch: scratch.to_owned(),
                    }
                    .record(bundle);
                };
                let (sandbox, rootfs) = vms
                    .boot(config, id, size, &image, options, &record)
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(bundle.join(STATE_FILE));
                    })?;
                (Arc::new(sandbox), None, rootfs)
            }
        };
        let request = ContainerRequest {
            id: id.to_owned(),
            rootfs,
            disk,
            spec: agent_spec,
            files,
            stdio: stdio.request(),
            share,
        };
        let container = sandbox
            .create(request, |agent, process| {
                Fifos::attach(agent, process, stdio)
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_file(bundle.join(STATE_FILE));
            })?;
        Ok(Self {
            bundle: bundle.to_owned(),
            container,
        })
    }

    /// Adds exec `exec_id` (not started), its stdio attached.
    pub fn exec(
        &self,
        exec_id: &str,
        spec: oci_spec::runtime::Process,
        stdio: StdioPaths,
    ) -> Result<Arc<Proc>, ContainerError> {
        let request = stdio.request();
        self.container
            .exec(exec_id, spec, request, |agent, process| {
                Fifos::attach(agent, process, stdio)
            })
    }

    /// Removes the container from its VM (the VM goes down with its last
    /// container) and everything it made on the host.
    pub fn destroy(&self) {
        self.container.destroy();
        let _ = std::fs::remove_file(self.bundle.join(STATE_FILE));
    }
}

/// After a shim died: kill its VMM if it still runs and remove its
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
            capsid_runtime::network::unwire_recorded(&leftovers.scratch);
            let _ = std::fs::remove_dir_all(&leftovers.scratch);
        }
        let _ = std::fs::remove_file(&state);
    }
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}
