//! The containers of this VM and their processes ([`Containers`]).
//!
//! ```text
//!  CreateContainer ─▶ created (init forked, stopped before exec)
//!        StartProcess ─▶ running ─▶ exited (status kept for WaitProcess)
//!  ExecProcess (while init runs) ─▶ created ─▶ running ─▶ exited
//!  RemoveContainer ─▶ everything killed, rootfs unmounted, cgroup removed
//! ```
//!
//! Each container's files live under `/run/capsid/containers/<id>/`: the
//! image disk at `lower/`, the overlay's `upper/` and `work/` on the VM's
//! tmpfs, and the merged view at `rootfs/`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsid_protocol::{
    ContainerStats, CreateContainer, ExecProcess, ExitStatus, FILE_SOURCE, MAX_COPIED_BYTES,
    MAX_COPIED_FILES, MAX_TREE_ENTRIES, ProcessRef, SharedNamespace, SharedNamespaces, Stream,
    TREE_SOURCE, validate_id,
};
use oci_spec::runtime::{LinuxNamespaceType, LinuxResources, LinuxSeccomp, Mount};

use crate::cgroup::{Cgroup, CgroupError};
use crate::process::{self, Namespaces, ProcessError, ProcessPlan, Share, SpawnRequest, StartGate};
use crate::reaper::{ExitCell, Reaper};
use crate::rootfs::{RootfsError, RootfsPlan};
use crate::stdio::{ProcessIo, StdioError};
use crate::syscall::{LinuxSyscall, Syscall};
use crate::vsock::VsockStream;
use capsid_base::lock;

const CONTAINERS_DIR: &str = "/run/capsid/containers";
/// A mount source naming a virtio-blk disk by id.
pub const DISK_SOURCE: &str = "disk:";
/// Exited execs beyond this many are forgotten, oldest first.
const MAX_EXECS: usize = 256;
/// How long RemoveContainer waits for killed processes.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The container's root file system never honours device nodes: an image
/// (or a process with CAP_MKNOD writing to the overlay) must not be able
/// to bring its own /dev/mem. Devices come only from the agent's /dev, as
/// `linux.devices` and the device rules allow.
const ROOTFS_FLAGS: libc::c_ulong = libc::MS_NODEV;

/// Why a container operation failed; `rpc.rs` maps each to the protocol's error code.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The request is malformed or asks for what cannot be.
    #[error("{0}")]
    InvalidArgument(String),
    /// No container or process by that id.
    #[error("{0} not found")]
    NotFound(String),
    /// The id is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The container is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request asks for something the agent does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Starting or signalling a process failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Preparing the container's root filesystem failed.
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    /// The container's cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Its stdio could not be set up.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The guest's network could not be configured.
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    /// A restored guest could not take its own identity.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

#[derive(Debug)]
pub(crate) struct ContainerProcess {
    pub(crate) pid: i32,
    pidfd: Option<OwnedFd>,
    pub(crate) io: ProcessIo,
    pub(crate) exit: Arc<ExitCell>,
    gate: Mutex<Option<StartGate>>,
}

impl ContainerProcess {
    fn signal(&self, signal: i32) -> Result<(), ContainerError> {
        if self.exit.get().is_some() {
            return Err(ContainerError::FailedPrecondition(
                "the process has already exited".into(),
            ));
        }
        let result = match &self.pidfd {
            Some(pidfd) => process::pidfd_signal(pidfd, signal),
            None => Err(io::Error::from_raw_os_error(libc::ESRCH)),
        };
        result.map_err(io_error(format!("signal {signal} to pid {}", self.pid)))
    }
}

#[derive(Debug)]
pub(crate) struct Container {
    id: String,
    dir: PathBuf,
    /// Agent-side mounts, undone in reverse order.
    mounts: Vec<PathBuf>,
    cgroup: Cgroup,
    seccomp: Option<LinuxSeccomp>,
    init: Arc<ContainerProcess>,
    execs: Mutex<Vec<(String, Arc<ContainerProcess>)>>,
}

/// Every container of this guest, and the reaper of their processes.
#[derive(Debug, Default)]
pub struct Containers {
    containers: Mutex<HashMap<String, Arc<Container>>>,
    reaper: Arc<Reaper>,
}

/// How long a disk may take to appear: one the host attaches to a spare
/// slot while the VM runs shows up when the guest has handled the
/// configuration-change interrupt.
const DISK_WAIT: Duration = Duration::from_secs(10);

/// The virtio-blk disk whose serial (the VMM's `id=`) is `id`, once it has
/// an image (a non-zero size), with no stale pages cached.
pub fn find_disk(id: &str) -> Result<PathBuf, ContainerError> {
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let blocks = fs::read_dir("/sys/block").map_err(io_error("list /sys/block"))?;
        for entry in blocks.flatten() {
            let serial = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
            let size = fs::read_to_string(entry.path().join("size")).unwrap_or_default();
            let attached = size.trim().parse::<u64>().is_ok_and(|sectors| sectors > 0);
            if serial.trim_end_matches(['\n', '\0']) == id && attached {
                let disk = Path::new("/dev").join(entry.file_name());
                crate::syscall::flush_block_device(&disk)
                    .map_err(io_error(format!("flush {}", disk.display())))?;
                return Ok(disk);
            }
        }
        if Instant::now() >= deadline {
            return Err(ContainerError::NotFound(format!(
                "disk with id {id:?} after {} s (is it given to the VMM with --disk PATH,id={id}, or attached to a spare slot?)",
                DISK_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mount sources `disk:ID` name further virtio-blk disks (`--disk
/// IMG,id=ID` on the VMM); they become the device's path, mounted with the
/// mount's type (ext4 or erofs) in the container.
pub fn with_disks(mounts: &[Mount]) -> Result<Vec<Mount>, ContainerError> {
    let mut out = mounts.to_vec();
    for mount in &mut out {
        let Some(id) = mount
            .source()
            .as_ref()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix(DISK_SOURCE))
            .map(str::to_owned)
        else {
            continue;
        };
        validate_id("disk id", &id).map_err(ContainerError::InvalidArgument)?;
        let typ = mount.typ().clone().unwrap_or_default();
        if !["ext4", "erofs"].contains(&typ.as_str()) {
            return Err(ContainerError::InvalidArgument(format!(
                "mount of disk {id:?} at {}: type {typ:?} should be ext4 or erofs",
                mount.destination().display()
            )));
        }
        mount.set_source(Some(find_disk(&id)?));
    }
    Ok(out)
}

/// Bind sources `file:N` name the N-th file the host copied in
/// (`CreateContainer::files`), and `tree:N` the N-th as a tar of a
/// directory; they become its path under the container's directory, where
/// [`write_files`] puts it. Returns the mounts and which files are trees.
pub fn with_files(
    mounts: &[Mount],
    files: &[Vec<u8>],
    dir: &Path,
) -> Result<(Vec<Mount>, Vec<usize>), ContainerError> {
    let total: usize = files.iter().map(Vec::len).sum();
    if files.len() > MAX_COPIED_FILES || total > MAX_COPIED_BYTES {
        return Err(ContainerError::InvalidArgument(format!(
            "{} copied files of {total} bytes: at most {MAX_COPIED_FILES} and {MAX_COPIED_BYTES} bytes",
            files.len()
        )));
    }
    let mut out = mounts.to_vec();
    let mut trees = Vec::new();
    for mount in &mut out {
        let Some(source) = mount.source().as_ref().and_then(|s| s.to_str()) else {
            continue;
        };
        let (prefix, index, under) = if let Some(index) = source.strip_prefix(FILE_SOURCE) {
            (FILE_SOURCE, index.to_owned(), "files")
        } else if let Some(index) = source.strip_prefix(TREE_SOURCE) {
            (TREE_SOURCE, index.to_owned(), "trees")
        } else {
            continue;
        };
        let n = index
            .parse::<usize>()
            .ok()
            .filter(|&n| n < files.len())
            .ok_or_else(|| {
                ContainerError::InvalidArgument(format!(
                    "mount at {}: source {prefix}{index} names no copied file ({} given)",
                    mount.destination().display(),
                    files.len()
                ))
            })?;
        if prefix == TREE_SOURCE && !trees.contains(&n) {
            trees.push(n);
        }
        mount.set_source(Some(dir.join(under).join(n.to_string())));
    }
    Ok((out, trees))
}

/// Writes the copied files under `dir`: each at `files/N`, and each of
/// `trees` unpacked at `trees/N` (owners and modes kept; no entry outside
/// it, none written through a link, at most [`MAX_TREE_ENTRIES`]).
fn write_files(files: &[Vec<u8>], trees: &[usize], dir: &Path) -> Result<(), ContainerError> {
    for (n, contents) in files.iter().enumerate() {
        if trees.contains(&n) {
            let at = dir.join("trees").join(n.to_string());
            fs::create_dir_all(&at).map_err(io_error(format!("mkdir {}", at.display())))?;
            unpack_tree(contents, &at).map_err(io_error(format!("unpack {}", at.display())))?;
            continue;
        }
        let at = dir.join("files");
        fs::create_dir_all(&at).map_err(io_error(format!("mkdir {}", at.display())))?;
        let path = at.join(n.to_string());
        fs::write(&path, contents).map_err(io_error(format!("write {}", path.display())))?;
    }
    Ok(())
}

/// Unpacks the tar `contents` into the directory `at`.
fn unpack_tree(contents: &[u8], at: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(contents);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    for (n, entry) in archive.entries()?.enumerate() {
        if n >= MAX_TREE_ENTRIES {
            return Err(io::Error::other(format!(
                "more than {MAX_TREE_ENTRIES} entries"
            )));
        }
        let mut entry = entry?;
        use tar::EntryType;
        if !matches!(
            entry.header().entry_type(),
            EntryType::Regular | EntryType::Directory | EntryType::Symlink
        ) {
            return Err(io::Error::other(
                "an entry that is not a file, a directory or a link",
            ));
        }
        // What the host packed: relative plain names only.
        let path = entry.path()?.into_owned();
        if !path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(io::Error::other(format!(
                "{} is not a relative plain path",
                path.display()
            )));
        }
        // Refuses a write through a link too.
        if !entry.unpack_in(at)? {
            return Err(io::Error::other(format!(
                "{} would land outside",
                entry.path()?.display()
            )));
        }
    }
    Ok(())
}

/// The mounts of a container being created, unmounted (and its directory
/// removed) when dropped before [`Mounts::keep`].
struct Mounts<'a> {
    sys: &'a dyn Syscall,
    dir: PathBuf,
    mounts: Vec<PathBuf>,
    kept: bool,
}

impl<'a> Mounts<'a> {
    fn new(sys: &'a dyn Syscall, dir: PathBuf) -> Self {
        Self {
            sys,
            dir,
            mounts: Vec::new(),
            kept: false,
        }
    }

    fn push(&mut self, mount: PathBuf) {
        self.mounts.push(mount);
    }

    /// Creation succeeded: the container owns its mounts now.
    fn keep(mut self) -> Vec<PathBuf> {
        self.kept = true;
        std::mem::take(&mut self.mounts)
    }
}

impl Drop for Mounts<'_> {
    fn drop(&mut self) {
        if !self.kept {
            unmount_all(self.sys, &self.mounts, &self.dir);
        }
    }
}

/// Runs `undo` when dropped, unless disarmed: one step of a creation's
/// rollback.
struct OnFailure<F: FnOnce()> {
    undo: Option<F>,
}

impl<F: FnOnce()> OnFailure<F> {
    fn new(undo: F) -> Self {
        Self { undo: Some(undo) }
    }

    /// The step stays.
    fn disarm(mut self) {
        self.undo = None;
    }
}

impl<F: FnOnce()> Drop for OnFailure<F> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo();
        }
    }
}

/// Mounts the container's rootfs disk at `DIR/rootfs`: read-only under a
/// writable overlay (`DIR/lower`, `upper`, `work`) when the request asks
/// for one, else as it is. Each mount is pushed to `mounts` as soon as it
/// is made, so a failure unmounts what came before it.
fn mount_rootfs(
    mounts: &mut Mounts<'_>,
    disk: &Path,
    request: &capsid_protocol::Rootfs,
) -> Result<(), ContainerError> {
    let sys = mounts.sys;
    let dir = mounts.dir.clone();
    let rootfs = dir.join("rootfs");
    let fstype = request.filesystem.name();
    if request.overlay {
        // The writes go to the guest's tmpfs, or to a disk of their own.
        let writes = match &request.upper_disk {
            Some(id) => {
                let scratch = dir.join("scratch");
                sys.mkdir_all(&scratch)
                    .map_err(io_error(format!("mkdir {}", scratch.display())))?;
                let disk = find_disk(id)?;
                sys.mount(
                    Some(&disk),
                    &scratch,
                    Some("ext4"),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    None,
                )
                .map_err(io_error(format!(
                    "mount the scratch disk {}",
                    disk.display()
                )))?;
                mounts.push(scratch.clone());
                scratch
            }
            None => dir.clone(),
        };
        let (lower, upper, work) = (dir.join("lower"), writes.join("upper"), writes.join("work"));
        for d in [&lower, &upper, &work, &rootfs] {
            sys.mkdir_all(d)
                .map_err(io_error(format!("mkdir {}", d.display())))?;
        }
        sys.mount(
            Some(disk),
            &lower,
            Some(fstype),
            libc::MS_RDONLY | ROOTFS_FLAGS,
            None,
        )
        .map_err(io_error(format!("mount {} ({fstype})", disk.display())))?;
        mounts.push(lower.clone());
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        sys.mount(
            Some(Path::new("overlay")),
            &rootfs,
            Some("overlay"),
            ROOTFS_FLAGS,
            Some(&data),
        )
        .map_err(io_error("mount the overlay"))?;
    } else {
        sys.mkdir_all(&rootfs).map_err(io_error("mkdir rootfs"))?;
        sys.mount(Some(disk), &rootfs, Some(fstype), ROOTFS_FLAGS, None)
            .map_err(io_error(format!("mount {} ({fstype})", disk.display())))?;
    }
    mounts.push(rootfs);
    Ok(())
}

/// Undoes what a failed create or a remove leaves mounted.
fn unmount_all(sys: &dyn Syscall, mounts: &[PathBuf], dir: &Path) {
    for mount in mounts.iter().rev() {
        if let Err(e) = sys.umount(mount, libc::MNT_DETACH) {
            tracing::warn!(path = %mount.display(), "unmount failed: {e}");
        }
    }
    let _ = fs::remove_dir_all(dir);
}

impl Containers {
    /// The reaper, whose thread waits for every child of PID 1.
    pub fn reaper(&self) -> Arc<Reaper> {
        Arc::clone(&self.reaper)
    }

    /// The directory `path` of container `id`'s root file system, opened
    /// inside that root, for a tar stream (`crate::archive`).
    pub fn archive_dir(&self, id: &str, path: &str) -> Result<OwnedFd, ContainerError> {
        use crate::archive::ArchiveError;
        validate_id("container id", id).map_err(ContainerError::InvalidArgument)?;
        let container = self.container(id)?;
        crate::archive::open_in_root(&container.dir.join("rootfs"), path).map_err(|e| match e {
            ArchiveError::BadPath(_) => ContainerError::InvalidArgument(e.to_string()),
            ArchiveError::NotFound(_) => ContainerError::FailedPrecondition(e.to_string()),
            ArchiveError::Open { path, source } => ContainerError::Io {
                what: format!("open {path} in the container"),
                source,
            },
        })
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?}")))
    }

    fn process(&self, process: &ProcessRef) -> Result<Arc<ContainerProcess>, ContainerError> {
        process
            .validate()
            .map_err(ContainerError::InvalidArgument)?;
        let container = self.container(&process.container_id)?;
        match &process.exec_id {
            None => Ok(Arc::clone(&container.init)),
            Some(exec) => lock(&container.execs)
                .iter()
                .find(|(id, _)| id == exec)
                .map(|(_, p)| Arc::clone(p))
                .ok_or_else(|| ContainerError::NotFound(format!("process {process}"))),
        }
    }

    /// The container `id` shares namespaces with, and the `CLONE_NEW*`
    /// kinds it joins, checked: a running container of this guest other
    /// than itself, whose init has a pidfd, and no kind the spec also asks
    /// a new namespace of (`own`, `own_pid`).
    fn sharer(
        &self,
        id: &str,
        share: &SharedNamespaces,
        own: libc::c_int,
        own_pid: bool,
    ) -> Result<(Arc<Container>, libc::c_int), ContainerError> {
        validate_id("shared namespaces' container id", &share.container)
            .map_err(ContainerError::InvalidArgument)?;
        if share.container == id {
            return Err(ContainerError::InvalidArgument(format!(
                "container {id:?} cannot share its own namespaces"
            )));
        }
        let mut kinds = 0;
        for kind in &share.kinds {
            let (flag, asked_new) = match kind {
                SharedNamespace::Ipc => (libc::CLONE_NEWIPC, own & libc::CLONE_NEWIPC != 0),
                SharedNamespace::Uts => (libc::CLONE_NEWUTS, own & libc::CLONE_NEWUTS != 0),
                SharedNamespace::Pid => (libc::CLONE_NEWPID, own_pid),
            };
            if asked_new {
                return Err(ContainerError::InvalidArgument(format!(
                    "the spec asks for a new {kind:?} namespace and to share {:?}'s",
                    share.container
                )));
            }
            kinds |= flag;
        }
        let sandbox = self.container(&share.container)?;
        if sandbox.init.exit.get().is_some() || sandbox.init.pidfd.is_none() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?}, whose namespaces {id:?} shares, is not running",
                share.container
            )));
        }
        Ok((sandbox, kinds))
    }

    pub(crate) fn create(&self, request: CreateContainer) -> Result<u32, ContainerError> {
        let id = request.id.clone();
        validate_id("container id", &id).map_err(ContainerError::InvalidArgument)?;
        validate_id("disk id", &request.rootfs.disk_id).map_err(ContainerError::InvalidArgument)?;
        if lock(&self.containers).contains_key(&id) {
            return Err(ContainerError::AlreadyExists(format!("container {id:?}")));
        }
        let spec = &request.spec;
        if spec.hooks().is_some() {
            tracing::warn!(container = %id, "OCI hooks are ignored: they would run host programs");
        }
        let process = spec
            .process()
            .as_ref()
            .ok_or_else(|| ContainerError::InvalidArgument("the spec has no process".into()))?;
        let linux = spec.linux().as_ref();
        let mut flags = libc::CLONE_NEWNS;
        let mut pid_ns = false;
        let mut uts = false;
        for ns in linux
            .and_then(|l| l.namespaces().as_ref())
            .into_iter()
            .flatten()
        {
            if let Some(path) = ns.path() {
                return Err(ContainerError::Unsupported(format!(
                    "linux.namespaces: joining the {} namespace at {} is not supported: \
                     the container runs in its own micro-VM, whose kernel has no such path",
                    namespace_name(ns.typ()),
                    path.display()
                )));
            }
            match ns.typ() {
                LinuxNamespaceType::Pid => pid_ns = true,
                LinuxNamespaceType::Uts => {
                    uts = true;
                    flags |= libc::CLONE_NEWUTS;
                }
                LinuxNamespaceType::Ipc => flags |= libc::CLONE_NEWIPC,
                LinuxNamespaceType::Cgroup => flags |= libc::CLONE_NEWCGROUP,
                LinuxNamespaceType::Mount => {}
                // The VM is the network boundary: its containers share its
                // network, which the host gave the interfaces of the
                // namespace the spec named (`capsid_runtime::network`).
                LinuxNamespaceType::Network => {}
                other => {
                    return Err(ContainerError::Unsupported(format!(
                        "linux.namespaces: a {} namespace is not supported yet (the micro-VM is \
                         the container's isolation boundary); remove it from the spec \
                         (docker: --userns=host)",
                        namespace_name(other)
                    )));
                }
            }
        }
        // A pod's container joins its sandbox's namespaces through the
        // sandbox init's pidfd; `sharer` keeps that init for the spawn.
        let sharer = match &request.share {
            Some(share) => Some(self.sharer(&id, share, flags, pid_ns)?),
            None => None,
        };
        if let Some((_, kinds)) = &sharer {
            uts &= kinds & libc::CLONE_NEWUTS == 0;
        }
        let plan = ProcessPlan::from_oci(process, linux.and_then(|l| l.seccomp().as_ref()))?;
        let dir = Path::new(CONTAINERS_DIR).join(&id);
        let rootfs = dir.join("rootfs");
        let hostname = if uts { spec.hostname().clone() } else { None };
        let readonly = spec
            .root()
            .as_ref()
            .and_then(|r| r.readonly())
            .unwrap_or(false);
        let (mounts, trees) = with_files(
            &with_disks(spec.mounts().as_deref().unwrap_or_default())?,
            &request.files,
            &dir,
        )?;
        let rootfs_plan = RootfsPlan::new(rootfs.clone(), &mounts, linux, hostname, readonly)?;
        let device_rules = crate::devices::rules(
            linux
                .and_then(|l| l.resources().as_ref())
                .and_then(|r| r.devices().as_deref())
                .unwrap_or_default(),
        )
        .map_err(ContainerError::InvalidArgument)?;
        let disk = find_disk(&request.rootfs.disk_id)?;

        // What is made from here on is unmade by these guards, in reverse
        // order, if a later step fails.
        let mut mounts = Mounts::new(&LinuxSyscall, dir.clone());
        mount_rootfs(&mut mounts, &disk, &request.rootfs)?;
        write_files(&request.files, &trees, &dir)?;
        let cgroup = Cgroup::create(&id, linux.and_then(|l| l.resources().as_ref()))?;
        let cgroup_made = OnFailure::new(|| cgroup.remove());
        // Dropped (killed) before the cgroup and the mounts go.
        let init = self.spawn(
            &plan,
            request.stdio,
            Namespaces::New {
                flags,
                pid: pid_ns,
                share: sharer.as_ref().and_then(|(sandbox, kinds)| {
                    Some(Share {
                        pidfd: sandbox.init.pidfd.as_ref()?.as_raw_fd(),
                        kinds: *kinds,
                    })
                }),
            },
            Some(&rootfs_plan),
            &cgroup,
        )?;
        // The device rules go on once the init has made its mounts (the
        // disks it mounts are block devices the rules may well deny). It
        // waits for StartProcess meanwhile: nothing of the workload has run.
        crate::devices::restrict(cgroup.path(), &device_rules)
            .map_err(io_error("apply the device rules (linux.resources.devices)"))?;
        cgroup_made.disarm();
        let mounts = mounts.keep();
        let pid = init.pid;
        let container = Container {
            id: id.clone(),
            dir,
            mounts,
            cgroup,
            seccomp: linux.and_then(|l| l.seccomp().clone()),
            init: Arc::new(init),
            execs: Mutex::default(),
        };
        tracing::info!(container = %id, pid, "container created");
        lock(&self.containers).insert(id, Arc::new(container));
        Ok(pid.unsigned_abs())
    }

    pub(crate) fn exec(&self, request: ExecProcess) -> Result<u32, ContainerError> {
        request
            .process
            .validate()
            .map_err(ContainerError::InvalidArgument)?;
        let Some(exec_id) = request.process.exec_id.clone() else {
            return Err(ContainerError::InvalidArgument(
                "an exec needs an exec id".into(),
            ));
        };
        let container = self.container(&request.process.container_id)?;
        if container.init.exit.get().is_some() || lock(&container.init.gate).is_some() {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?} is not running",
                container.id
            )));
        }
        if lock(&container.execs).iter().any(|(id, _)| *id == exec_id) {
            return Err(ContainerError::AlreadyExists(format!(
                "process {}",
                request.process
            )));
        }
        let plan = ProcessPlan::from_oci(&request.spec, container.seccomp.as_ref())?;
        // Through the init's pidfd, never its pid: a pid the init left
        // could name another process by now.
        let Some(init_pidfd) = container.init.pidfd.as_ref().map(|fd| fd.as_raw_fd()) else {
            return Err(ContainerError::FailedPrecondition(format!(
                "container {:?}: its init has no pidfd to join its namespaces through",
                container.id
            )));
        };
        let namespaces = Namespaces::Join { init_pidfd };
        let process = self.spawn(&plan, request.stdio, namespaces, None, &container.cgroup)?;
        let pid = process.pid;
        let mut execs = lock(&container.execs);
        while execs.len() >= MAX_EXECS {
            match execs.iter().position(|(_, p)| p.exit.get().is_some()) {
                Some(oldest) => drop(execs.remove(oldest)),
                None => break,
            }
        }
        execs.push((exec_id, Arc::new(process)));
        Ok(pid.unsigned_abs())
    }

    /// Opens the stdio, forks, and waits until the process is ready to
    /// exec (see `process::spawn`).
    fn spawn(
        &self,
        plan: &ProcessPlan,
        stdio: capsid_protocol::StdioRequest,
        namespaces: Namespaces,
        rootfs: Option<&RootfsPlan>,
        cgroup: &Cgroup,
    ) -> Result<ContainerProcess, ContainerError> {
        let (io, child_stdio) =
            ProcessIo::open(stdio, plan.terminal).map_err(io_error("open the process's stdio"))?;
        let exit = Arc::new(ExitCell::default());
        let spawned = process::spawn(
            &self.reaper,
            Arc::clone(&exit),
            SpawnRequest {
                plan,
                namespaces,
                rootfs,
                cgroup_procs: &cgroup.procs_file(),
                stdio: child_stdio,
            },
        )?;
        if let Some(master) = spawned.terminal {
            io.set_terminal(master).map_err(io_error("keep the pty"))?;
        }
        Ok(ContainerProcess {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            io,
            exit,
            gate: Mutex::new(Some(spawned.gate)),
        })
    }

    pub(crate) fn start(&self, process: &ProcessRef) -> Result<(), ContainerError> {
        let target = self.process(process)?;
        let gate = lock(&target.gate).take().ok_or_else(|| {
            ContainerError::FailedPrecondition(format!("process {process} was already started"))
        })?;
        gate.start()?;
        Ok(())
    }

    /// Blocks until the process exits.
    pub fn wait(&self, process: &ProcessRef) -> Result<ExitStatus, ContainerError> {
        let target = self.process(process)?;
        let status = target.exit.wait();
        target.io.release();
        Ok(status)
    }

    pub(crate) fn signal(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ContainerError> {
        if !(1..=64).contains(&signal) {
            return Err(ContainerError::InvalidArgument(format!(
                "signal {signal} is not 1 to 64"
            )));
        }
        if all {
            let container = self.container(&process.container_id)?;
            if signal == libc::SIGKILL {
                container.cgroup.kill_all();
            } else {
                container.cgroup.signal_all(signal);
            }
            return Ok(());
        }
        self.process(process)?.signal(signal)
    }

    pub(crate) fn attach(
        &self,
        process: &ProcessRef,
        stream: Stream,
        connection: VsockStream,
        ack: impl FnOnce(&mut VsockStream) -> io::Result<()>,
    ) -> Result<(), ContainerError> {
        Ok(self.process(process)?.io.attach(stream, connection, ack)?)
    }

    pub(crate) fn resize(
        &self,
        process: &ProcessRef,
        rows: u16,
        cols: u16,
    ) -> Result<(), ContainerError> {
        Ok(self.process(process)?.io.resize(rows, cols)?)
    }

    pub(crate) fn close_stdin(&self, process: &ProcessRef) -> Result<(), ContainerError> {
        self.process(process)?.io.close_stdin();
        Ok(())
    }

    pub(crate) fn stats(&self, id: &str) -> Result<ContainerStats, ContainerError> {
        Ok(self.container(id)?.cgroup.stats())
    }

    /// New cgroup limits for a container (`ctr task update`).
    pub fn update(&self, id: &str, resources: &LinuxResources) -> Result<(), ContainerError> {
        self.container(id)?.cgroup.update(resources)?;
        Ok(())
    }

    /// Freezes or thaws every process of container `id`.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        self.container(id)?.cgroup.freeze(frozen)?;
        tracing::info!(container = %id, frozen, "container frozen or thawed");
        Ok(())
    }

    pub(crate) fn pids(&self, id: &str) -> Result<Vec<u32>, ContainerError> {
        Ok(self.container(id)?.cgroup.pids())
    }

    /// Kills every process of the container, waits for its init, and
    /// removes its mounts, directory and cgroup.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        validate_id("container id", id).map_err(ContainerError::InvalidArgument)?;
        let container = lock(&self.containers)
            .remove(id)
            .ok_or_else(|| ContainerError::NotFound(format!("container {id:?}")))?;
        container.cgroup.kill_all();
        // A created-but-not-started init waits on its start pipe: dropping
        // the gate ends it.
        drop(lock(&container.init.gate).take());
        for (_, exec) in lock(&container.execs).iter() {
            drop(lock(&exec.gate).take());
        }
        if container.init.exit.wait_timeout(KILL_WAIT).is_none() {
            tracing::warn!(container = %id, "init did not exit after SIGKILL");
        }
        container.cgroup.remove();
        unmount_all(&LinuxSyscall, &container.mounts, &container.dir);
        tracing::info!(container = %id, "container removed");
        Ok(())
    }

    /// Removes every container (for Shutdown).
    pub fn remove_all(&self) {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id) {
                tracing::warn!(container = %id, "remove failed: {e}");
            }
        }
    }
}

/// A namespace's name as the spec spells it (`user`, `network`).
fn namespace_name(kind: LinuxNamespaceType) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{kind:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_named_as_the_spec_spells_them() {
        // Before: "User namespaces (the VM is the isolation boundary)".
        assert_eq!(namespace_name(LinuxNamespaceType::User), "user");
        assert_eq!(namespace_name(LinuxNamespaceType::Network), "network");
        assert_eq!(namespace_name(LinuxNamespaceType::Mount), "mount");
    }

    #[test]
    fn sharing_namespaces_needs_another_running_container_and_no_own_of_that_kind() {
        let containers = Containers::default();
        let share = |container: &str, kinds: &[SharedNamespace]| SharedNamespaces {
            container: container.into(),
            kinds: kinds.to_vec(),
        };
        let ipc_uts = [SharedNamespace::Ipc, SharedNamespace::Uts];
        let refused = |result: Result<(Arc<Container>, libc::c_int), ContainerError>| {
            result.map(|_| ()).unwrap_err().to_string()
        };
        let own = libc::CLONE_NEWNS;
        let error = refused(containers.sharer("app", &share("app", &ipc_uts), own, false));
        assert!(error.contains("its own namespaces"), "{error}");
        let error = refused(containers.sharer("app", &share("../x", &ipc_uts), own, false));
        assert!(error.contains("container id"), "{error}");
        let error = refused(containers.sharer(
            "app",
            &share("pod", &ipc_uts),
            own | libc::CLONE_NEWIPC,
            false,
        ));
        assert!(error.contains("new Ipc namespace"), "{error}");
        let error =
            refused(containers.sharer("app", &share("pod", &[SharedNamespace::Pid]), own, true));
        assert!(error.contains("new Pid namespace"), "{error}");
        // Checked before anything is looked up; then the pod must exist.
        let error = refused(containers.sharer("app", &share("pod", &ipc_uts), own, false));
        assert!(error.contains("pod"), "{error}");
    }

    #[test]
    fn a_failed_create_unmakes_its_steps_in_reverse_and_a_finished_one_keeps_them() {
        let undone = std::cell::RefCell::new(Vec::new());
        {
            let _first = OnFailure::new(|| undone.borrow_mut().push("first"));
            let _second = OnFailure::new(|| undone.borrow_mut().push("second"));
            // A `?` returns here.
        }
        assert_eq!(*undone.borrow(), ["second", "first"]);
        undone.borrow_mut().clear();
        OnFailure::new(|| undone.borrow_mut().push("kept")).disarm();
        assert!(undone.borrow().is_empty());

        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("c1");
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        drop(Mounts::new(&LinuxSyscall, dir.clone()));
        assert!(!dir.exists(), "a failed create leaves its directory");
        fs::create_dir_all(dir.join("rootfs")).unwrap();
        let mut mounts = Mounts::new(&LinuxSyscall, dir.clone());
        mounts.push(dir.join("rootfs"));
        assert_eq!(mounts.keep(), [dir.join("rootfs")]);
        assert!(dir.exists());
    }

    #[test]
    fn the_rootfs_disk_is_mounted_under_its_overlay_and_a_failed_mount_unmounts_what_came_before() {
        use crate::syscall::recording::RecordingSyscall;
        use capsid_protocol::{Filesystem, Rootfs};

        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("c1");
        let d = dir.display();
        let disk = Path::new("/dev/vdb");
        let request = |overlay| Rootfs {
            disk_id: "rootfs".into(),
            filesystem: Filesystem::Erofs,
            overlay,
            upper_disk: None,
        };
        let flags = |ro: bool| ROOTFS_FLAGS | if ro { libc::MS_RDONLY } else { 0 };

        let sys = RecordingSyscall::default();
        let mut mounts = Mounts::new(&sys, dir.clone());
        mount_rootfs(&mut mounts, disk, &request(true)).unwrap();
        assert_eq!(mounts.keep(), [dir.join("lower"), dir.join("rootfs")]);
        assert_eq!(
            sys.calls(),
            [
                format!("mkdir {d}/lower"),
                format!("mkdir {d}/upper"),
                format!("mkdir {d}/work"),
                format!("mkdir {d}/rootfs"),
                format!("mount /dev/vdb {d}/lower erofs {:#x} -", flags(true)),
                format!(
                    "mount overlay {d}/rootfs overlay {:#x} lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work",
                    flags(false)
                ),
            ]
        );

        // The overlay fails: the lower mount made before it goes, and so
        // does the container's directory.
        let sys = RecordingSyscall::failing_mount("rootfs");
        {
            let mut mounts = Mounts::new(&sys, dir.clone());
            let err = mount_rootfs(&mut mounts, disk, &request(true)).unwrap_err();
            assert!(err.to_string().contains("mount the overlay"), "{err}");
        }
        assert_eq!(
            sys.calls().last().unwrap(),
            &format!("umount {d}/lower {}", libc::MNT_DETACH)
        );
        assert!(!dir.exists());

        // Without an overlay the disk is the rootfs, writable only if the
        // filesystem is.
        let sys = RecordingSyscall::default();
        let mut mounts = Mounts::new(&sys, dir.clone());
        mount_rootfs(&mut mounts, disk, &request(false)).unwrap();
        assert_eq!(mounts.keep(), [dir.join("rootfs")]);
        assert_eq!(
            sys.calls(),
            [
                format!("mkdir {d}/rootfs"),
                format!("mount /dev/vdb {d}/rootfs erofs {:#x} -", flags(false)),
            ]
        );
    }

    /// A tar entry whose name is written raw (a builder refuses `..`).
    fn raw_entry(
        tar: &mut tar::Builder<Vec<u8>>,
        name: &str,
        kind: tar::EntryType,
        link: &str,
        data: &[u8],
    ) {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(0o644);
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        header.set_uid(u64::from(uid));
        header.set_gid(u64::from(gid));
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        header.set_cksum();
        tar.append(&header, data).unwrap();
    }

    #[test]
    fn a_copied_tree_unpacks_inside_its_directory_only() {
        use tar::EntryType::{Directory, Regular, Symlink};
        let unpack = |entries: &[(&str, tar::EntryType, &str, &[u8])]| {
            let dir = tempfile::tempdir().unwrap();
            let at = dir.path().join("trees/0");
            fs::create_dir_all(&at).unwrap();
            let mut tar = tar::Builder::new(Vec::new());
            for (name, kind, link, data) in entries {
                raw_entry(&mut tar, name, *kind, link, data);
            }
            let outcome = unpack_tree(&tar.into_inner().unwrap(), &at);
            (dir, outcome)
        };
        let (dir, outcome) = unpack(&[
            ("..2026", Directory, "", b""),
            ("..2026/token", Regular, "", b"secret"),
            ("..data", Symlink, "..2026", b""),
            ("token", Symlink, "..data/token", b""),
        ]);
        outcome.unwrap();
        let at = dir.path().join("trees/0");
        assert_eq!(fs::read_to_string(at.join("token")).unwrap(), "secret");
        // Out by `..`, by an absolute path, or through a link: refused, and
        // nothing written outside.
        for hostile in [
            vec![("../escaped", Regular, "", b"x".as_slice())],
            vec![("/escaped", Regular, "", b"x".as_slice())],
            vec![
                ("out", Symlink, "..", b"".as_slice()),
                ("out/escaped", Regular, "", b"x".as_slice()),
            ],
            vec![("dev", tar::EntryType::Char, "", b"".as_slice())],
        ] {
            let (dir, outcome) = unpack(&hostile);
            assert!(outcome.is_err(), "{hostile:?}");
            assert!(!dir.path().join("trees/escaped").exists(), "{hostile:?}");
            assert!(!dir.path().join("escaped").exists(), "{hostile:?}");
        }
    }

    #[test]
    fn copied_files_map_to_the_containers_directory_and_bad_indexes_are_refused() {
        let mount = |source: &str| {
            oci_spec::runtime::MountBuilder::default()
                .destination("/etc/hosts")
                .typ("bind")
                .source(source)
                .options(vec!["rbind".to_string()])
                .build()
                .unwrap()
        };
        let dir = Path::new("/run/capsid/containers/c1");
        let files = vec![b"127.0.0.1 localhost\n".to_vec()];
        let (mapped, trees) = with_files(&[mount("file:0")], &files, dir).unwrap();
        assert_eq!(
            mapped[0].source().as_deref(),
            Some(Path::new("/run/capsid/containers/c1/files/0"))
        );
        assert!(trees.is_empty());
        let (mapped, trees) = with_files(&[mount("tree:0")], &files, dir).unwrap();
        assert_eq!(
            mapped[0].source().as_deref(),
            Some(Path::new("/run/capsid/containers/c1/trees/0"))
        );
        assert_eq!(trees, [0]);
        assert!(with_files(&[mount("tree:1")], &files, dir).is_err());
        assert!(with_files(&[mount("file:1")], &files, dir).is_err());
        assert!(with_files(&[mount("file:-1")], &files, dir).is_err());
        let too_many = vec![Vec::new(); MAX_COPIED_FILES + 1];
        assert!(with_files(&[], &too_many, dir).is_err());
        let too_big = vec![vec![0; MAX_COPIED_BYTES + 1]];
        assert!(with_files(&[], &too_big, dir).is_err());
    }
}
