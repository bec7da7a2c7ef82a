//! One micro-VM as its user sees it: a `capsid-vmm` process booting our
//! kernel with the agent initramfs and the given disks, and the agent
//! answering on the VM's hybrid-vsock socket.
//!
//! ```text
//!  MicroVm::launch ─▶ capsid-vmm confined to DIR/vm (confine.rs), in the
//!                     VM's cgroup (log → DIR/vm/vmm.log, vsock →
//!                     DIR/vm/vsock.sock, guest console → DIR/vm/console.log)
//!  MicroVm::connect ─▶ retry the agent's hello until it answers, noticing a
//!                      VMM that died or a caller that gave up meanwhile
//!  MicroVm::boot ─▶ both, booting again (logged, counted) a guest that
//!                   crashed before its agent answered
//!  MicroVm::attach ─▶ a container joining a pod: its rootfs image goes to
//!                     a spare disk slot, through the VMM's API socket
//!  drop / kill ─▶ SIGKILL the VMM and reap it
//! ```
//!
//! The VMM child is reaped only through [`MicroVm`], so a pid it signals is
//! never a recycled one.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use capsid_images::rootfs::{Format, RootfsImage};
use capsid_protocol::{AgentClient, ClientError, DEFAULT_AGENT_PORT, Filesystem, Rootfs};
use capsid_vmm_api::{
    ApiRequest, ApiResponse, DEFAULT_CMDLINE, DiskConfig, Irqchip, MacAddr, NetConfig,
    SerialConfig, VmConfig, VsockConfig,
};

use crate::config::BootFiles;
use crate::confine::{self, ConfineError, Confinement, VmCgroup, untrusted_tail};

/// Why a micro-VM could not be booted or changed.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// A file of the VM's directory could not be made.
    #[error("cannot create {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    /// The VMM could not be started.
    #[error("cannot start {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The VMM ended before the agent answered.
    #[error("capsid-vmm exited ({status}) before the agent answered{log}")]
    DiedBooting {
        /// How it exited, in words.
        status: String,
        /// Its log and the guest's console, quoted.
        log: String,
        /// The guest crashed (a triple fault, a KVM error): what
        /// [`MicroVm::boot`] boots again.
        crashed: bool,
        /// The VMM failed on its own (exit 1): it refused its
        /// configuration, or a snapshot to restore.
        vmm_error: bool,
    },
    /// A signal asked the boot to stop.
    #[error("interrupted while the micro-VM booted")]
    Interrupted,
    /// The agent did not answer within the boot's deadline.
    #[error("the micro-VM's agent never answered{log}")]
    Unreachable {
        /// The last attempt's failure.
        #[source]
        source: ClientError,
        /// The VMM's log and the guest's console, quoted.
        log: String,
    },
    /// Waiting for the VMM failed.
    #[error("cannot wait for capsid-vmm")]
    Wait(#[source] std::io::Error),
    /// A disk was attached to a VM that has no spare slot.
    #[error("the micro-VM was started without spare disk slots")]
    NoSpareSlots,
    /// The VMM's API socket failed.
    #[error("cannot reach the VMM's API socket {0}")]
    Api(PathBuf, #[source] std::io::Error),
    /// An image to attach could not be opened.
    #[error("cannot open the disk image {0}")]
    Image(PathBuf, #[source] std::io::Error),
    /// The VMM could not be confined.
    #[error(transparent)]
    Confine(#[from] ConfineError),
    /// The VMM answered an API request with an error.
    #[error("capsid-vmm refused to {op} {what}: {reason}")]
    Refused {
        /// "attach", "detach" or "snapshot".
        op: &'static str,
        /// What it was asked to do it to: a disk, the VM.
        what: String,
        /// The VMM's words.
        reason: String,
    },
}

/// A disk for the VM; the agent finds it by `id` (its virtio-blk serial).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image; with `file`, only what messages call it.
    pub path: PathBuf,
    /// The guest may not write it.
    pub read_only: bool,
    /// Its serial.
    pub id: String,
    /// A file with no name (`capsid_images::rootfs::anonymous_disk`): the
    /// VMM gets a copy of the descriptor, so the disk lives exactly as
    /// long as the VMM (or this).
    pub file: Option<DiskFile>,
}

/// An open disk image shared with the VMM at launch (see [`Disk::file`]).
#[derive(Debug, Clone)]
pub struct DiskFile(pub Arc<File>);

impl PartialEq for DiskFile {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for DiskFile {}

/// How long the VMM's API may take to answer.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a snapshot may take: a little more than the VMM waits for it.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(130);
/// The files of a snapshot directory (`capsid_vmm::snapshot`'s).
pub const SNAPSHOT_STATE: &str = "state.json";
/// The memory file of a snapshot directory.
pub const SNAPSHOT_MEMORY: &str = "memory";

/// The disk id a container's rootfs image has in its VM.
pub const ROOTFS_DISK: &str = "rootfs";

/// A container's rootfs image as the VM's read-only disk, and as the agent
/// is told to mount it (with a writable overlay on tmpfs in the guest).
pub fn rootfs_disk(image: &RootfsImage) -> (Disk, Rootfs) {
    let disk = Disk {
        file: None,
        path: image.path.clone(),
        read_only: true,
        id: ROOTFS_DISK.into(),
    };
    (disk, rootfs_on(image, ROOTFS_DISK))
}

/// How the agent mounts `image` when it is the disk `id`.
fn rootfs_on(image: &RootfsImage, id: &str) -> Rootfs {
    Rootfs {
        disk_id: id.into(),
        filesystem: match image.format {
            Format::Erofs => Filesystem::Erofs,
            Format::Ext4 => Filesystem::Ext4,
        },
        overlay: true,
        upper_disk: None,
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Checked to exist by [`crate::Config::boot_files`].
    pub boot: BootFiles,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// Disks from boot on.
    pub disks: Vec<Disk>,
    /// Empty slots for rootfs images of containers that join later (a pod's
    /// VM); 0 for a VM that runs one container.
    pub spare_disks: u8,
    /// The VM's scratch directory (the caller's, removed by the caller);
    /// it must exist. The VMM's world, `DIR/vm`, is made in it.
    pub dir: PathBuf,
    /// The VMM's `--log-level`.
    pub log_level: String,
    /// How the VMM is confined.
    pub confinement: Confinement,
    /// The VMM dies (SIGKILL) with the thread that launches it: for a
    /// caller whose VM must not outlive it (`capsid run`, a monitor), and
    /// that boots it from a thread that lives as long as the VM.
    pub die_with_owner: bool,
    /// virtio-net devices, over taps the caller keeps open while the VM is
    /// launched ([`crate::network`]); the first is the guest's `eth0`.
    pub nets: Vec<VmNet>,
    /// A snapshot directory ([`MicroVm::snapshot`]) to carry on from
    /// instead of booting: `vcpus`, `memory_mib`, `spare_disks` must be
    /// those it was taken with, and `disks` and `nets` empty.
    pub restore: Option<PathBuf>,
}

/// A virtio-net device of a VM to launch.
#[derive(Debug, Clone, Copy)]
pub struct VmNet {
    /// The tap, open (close-on-exec) in the caller; the VMM gets a copy.
    pub tap: RawFd,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The guest's MTU.
    pub mtu: u16,
}

/// The descriptor number the VMM gets the first tap as; the others
/// follow, then the disks' files ([`Disk::file`]).
const FIRST_TAP_FD: RawFd = 3;
/// The most taps one VM takes.
const MAX_TAPS: usize = capsid_protocol::MAX_INTERFACES;
/// The most descriptors passed to one VMM: its taps and disk files.
const MAX_PASSED: usize = MAX_TAPS + 16;

/// In the child between fork and exec: puts each descriptor of `fds`
/// (the first `count`) at [`FIRST_TAP_FD`] + its index, without the
/// close-on-exec flag. Each is first copied above every target, so a
/// source that sits on a target is not overwritten before it is copied.
/// Only async-signal-safe calls, and no allocation.
fn place_fds(fds: &[RawFd; MAX_PASSED], count: usize) -> std::io::Result<()> {
    let count = count.min(MAX_PASSED);
    let above = FIRST_TAP_FD + RawFd::try_from(MAX_PASSED).unwrap_or(64);
    let mut moved = [-1; MAX_PASSED];
    for i in 0..count {
        // SAFETY: fcntl on a descriptor the parent keeps open; the copy
        // is close-on-exec, and replaced below.
        moved[i] = unsafe { libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, above) };
        if moved[i] < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, source) in moved.iter().enumerate().take(count) {
        let target = FIRST_TAP_FD + RawFd::try_from(i).unwrap_or(0);
        // SAFETY: dup2 of our copy onto the target number, which is not
        // close-on-exec afterwards.
        if unsafe { libc::dup2(*source, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl VmSpec {
    /// The VM as capsid-vmm takes it (`--config`): its sockets and console
    /// in the VMM's directory ([`vm_dir`]), the API socket only with spare
    /// disk slots.
    pub fn vm_config(&self) -> VmConfig {
        let boot = &self.boot;
        let dir = vm_dir(&self.dir);
        VmConfig {
            kernel: boot.kernel.clone(),
            initrd: Some(boot.initramfs.clone()),
            cmdline: if boot.kernel_params.is_empty() {
                DEFAULT_CMDLINE.to_owned()
            } else {
                format!("{DEFAULT_CMDLINE} {}", boot.kernel_params)
            },
            // Out of range: the VMM refuses it with the range allowed.
            vcpus: u8::try_from(self.vcpus).unwrap_or(u8::MAX),
            mem_mib: self.memory_mib,
            disks: {
                let mut passed = FIRST_TAP_FD + RawFd::try_from(self.nets.len()).unwrap_or(0);
                self.disks
                    .iter()
                    .map(|disk| DiskConfig {
                        path: match &disk.file {
                            // Opened again by the VMM, before it is confined.
                            Some(_) => {
                                passed += 1;
                                format!("{}{}", capsid_vmm_api::config::INHERITED_FD, passed - 1)
                                    .into()
                            }
                            None => disk.path.clone(),
                        },
                        read_only: disk.read_only,
                        id: Some(disk.id.clone()),
                    })
                    .collect()
            },
            vsock: Some(VsockConfig {
                uds: vsock_path(&self.dir),
                cid: capsid_vmm_api::config::DEFAULT_CID,
            }),
            serial: SerialConfig::File(dir.join(CONSOLE)),
            spare_disks: self.spare_disks,
            api_uds: (self.spare_disks > 0).then(|| dir.join(API_SOCKET)),
            irqchip: Irqchip::default(),
            nets: self
                .nets
                .iter()
                .zip(FIRST_TAP_FD..)
                .map(|(net, tap_fd)| NetConfig {
                    tap_fd,
                    mac: net.mac,
                    mtu: Some(net.mtu),
                })
                .collect(),
            restore: self.restore.clone(),
        }
    }
}

/// A capsid-vmm this process started (see [`MicroVm::boot`]); dropping it
/// kills the VM and removes its cgroup (its directory is the caller's).
#[derive(Debug)]
pub struct MicroVm {
    child: Child,
    uds: PathBuf,
    /// The VMM's API socket, when it has spare disk slots.
    api: Option<PathBuf>,
    /// Where the sockets, the VMM's log and the guest console are.
    dir: PathBuf,
    log: PathBuf,
    exited: Option<ExitStatus>,
    /// Removed (with anything left in it) after the VMM.
    cgroup: Option<VmCgroup>,
}

/// The directory the VMM of the VM whose scratch directory is `dir` lives
/// in (its sockets and logs; `/vm` in its jail).
pub fn vm_dir(dir: &Path) -> PathBuf {
    dir.join("vm")
}

/// The VM's configuration as capsid-vmm reads it (`--config`), for the VM
/// whose scratch directory is `dir`.
pub fn vmm_config_path(dir: &Path) -> PathBuf {
    dir.join("vmm-config.json")
}

/// The hybrid-vsock socket of the VM whose scratch directory is `dir`.
pub fn vsock_path(dir: &Path) -> PathBuf {
    vm_dir(dir).join("vsock.sock")
}

/// The console file the VMM writes the guest's serial output to; it keeps
/// its newest 1 MiB.
const CONSOLE: &str = "console.log";
/// The VMM's own log, kept within 1 MiB.
const VMM_LOG: &str = "vmm.log";
/// The VMM's API socket, when the VM has spare disk slots.
const API_SOCKET: &str = "api.sock";
/// Lines of the VMM's log and of the guest console an error message quotes,
/// from at most this many bytes at the end of each file.
const QUOTED_LINES: usize = 20;
const TAIL_BYTES: u64 = 8 << 10;

/// The last `QUOTED_LINES` lines of `text`, indented under `heading`; empty
/// when `text` is. Control characters become spaces: the guest wrote the
/// console, and must not drive the operator's terminal.
fn quote(heading: &str, text: &str) -> String {
    // Lines keep their own indentation (the agent's log pads its levels).
    let text = text.trim_end();
    if text.trim_start().is_empty() {
        return String::new();
    }
    let tail: Vec<&str> = text
        .lines()
        .rev()
        .filter(|line| !line.trim().is_empty())
        .take(QUOTED_LINES)
        .collect();
    let mut out = format!("; {heading}:");
    for line in tail.into_iter().rev() {
        out.push_str("\n  ");
        out.extend(line.chars().map(|c| if c.is_control() { ' ' } else { c }));
    }
    out
}

/// What the VMM whose own directory is `vm_dir` logged and how its guest
/// console ended (with the reason of a kernel panic first), for an error
/// message; empty if both are.
fn diagnostics_at(vm_dir: &Path) -> String {
    let log = untrusted_tail(&vm_dir.join(VMM_LOG), TAIL_BYTES);
    let log = String::from_utf8_lossy(&log).into_owned();
    let console = untrusted_tail(&vm_dir.join(CONSOLE), PANIC_SEARCH_BYTES);
    let panicked = panic_reason(&String::from_utf8_lossy(&console))
        .map(|why| format!("; the guest kernel panicked: {why}"))
        .unwrap_or_default();
    panicked
        + &quote("capsid-vmm said", &log)
        + &quote("the guest console ended with", &console_tail(vm_dir))
}

/// [`MicroVm::diagnostics`] for the VM whose scratch directory is `dir`,
/// from whichever process launched it.
pub fn diagnostics_in(dir: &Path) -> String {
    diagnostics_at(&vm_dir(dir))
}

/// The end of the guest console.
fn console_tail(dir: &Path) -> String {
    String::from_utf8_lossy(&untrusted_tail(&dir.join(CONSOLE), TAIL_BYTES)).into_owned()
}

/// How far back in the console a kernel panic's first line is looked for:
/// its register and stack dump follow it.
const PANIC_SEARCH_BYTES: u64 = 32 << 10;
/// What the kernel prints first when it panics.
const PANIC_MARK: &str = "Kernel panic - not syncing: ";

/// Why the guest kernel panicked, from the last panic line in `console`
/// (cleaned and cut to 200 characters), if it did.
fn panic_reason(console: &str) -> Option<String> {
    let line = console.lines().rev().find(|l| l.contains(PANIC_MARK))?;
    let (_, why) = line.split_once(PANIC_MARK)?;
    Some(clean(why.trim()).chars().take(200).collect())
}

/// What a VMM exit status means for the guest (`capsid_vmm_api` has the table).
fn explain_exit(status: ExitStatus) -> String {
    match status.code().and_then(capsid_vmm_api::exit_meaning) {
        Some(why) => format!("{}: {why}", describe(status)),
        None => describe(status),
    }
}

/// Text from the VMM (which runs next to a hostile guest) for a message:
/// at most 512 characters, control characters as spaces.
fn clean(text: &str) -> String {
    text.chars()
        .take(512)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl MicroVm {
    /// Starts `capsid-vmm` for `spec`, confined as `spec.confinement`
    /// says. On an error nothing it made is left but what is in `spec.dir`.
    pub fn launch(spec: &VmSpec) -> Result<Self, MicroVmError> {
        let confinement = &spec.confinement;
        if confinement.jail && !confine::is_root() {
            return Err(MicroVmError::Confine(ConfineError::NotRoot));
        }
        let owner = confinement
            .jail
            .then(|| confine::vm_user(confinement, &spec.dir));
        let dir = confine::make_vm_dir(&vm_dir(&spec.dir), owner)?;
        let uds = vsock_path(&spec.dir);
        let log = dir.join(VMM_LOG);
        let cgroup = match (&confinement.cgroup_parent, confinement.jail) {
            (Some(parent), true) => VmCgroup::create(
                parent,
                &confine::cgroup_name(&spec.dir),
                (u64::from(spec.memory_mib) + confine::VMM_OVERHEAD_MIB) << 20,
                u64::from(spec.vcpus) + confine::VMM_PIDS,
            )?,
            _ => None,
        };
        // Until the VMM opens its log itself, its stderr (a usage error)
        // goes to the same file.
        let log_file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&log)
                .map_err(|e| MicroVmError::Scratch(log.clone(), e))?
        };
        let boot = &spec.boot;
        // The VM itself goes in a file of the VMM's own configuration type;
        // the flags say how the process runs. Beside the VMM's directory,
        // not in it: the VMM reads it before it is confined, and its jail
        // holds only its sockets and logs.
        let config = spec.vm_config();
        let config_path = vmm_config_path(&spec.dir);
        let json = serde_json::to_vec_pretty(&config).map_err(std::io::Error::other);
        json.and_then(|json| std::fs::write(&config_path, json))
            .map_err(|e| MicroVmError::Scratch(config_path.clone(), e))?;
        let mut command = Command::new(&boot.vmm);
        command
            .env_clear()
            .arg("--config")
            .arg(&config_path)
            .args(["--log-level", &spec.log_level])
            .arg("--log-file")
            .arg(&log)
            .args(["--seccomp", &confinement.seccomp]);
        if let Some((uid, gid)) = owner {
            command.arg("--jail").arg(&dir).args([
                "--uid",
                &uid.to_string(),
                "--gid",
                &gid.to_string(),
            ]);
        }
        if let Some(cgroup) = &cgroup {
            command.arg("--cgroup").arg(cgroup.path());
        }
        if spec.die_with_owner {
            // Our pid, not the VMM's getppid(): we may die before it asks.
            command.args(["--die-with-parent", &std::process::id().to_string()]);
        }
        // The taps, then the disks' files, in the order `vm_config` numbers
        // them.
        let passed: Vec<RawFd> = spec
            .nets
            .iter()
            .map(|net| net.tap)
            .chain(spec.disks.iter().filter_map(|disk| {
                use std::os::fd::AsRawFd;
                disk.file.as_ref().map(|file| file.0.as_raw_fd())
            }))
            .collect();
        if !passed.is_empty() {
            if spec.nets.len() > MAX_TAPS || passed.len() > MAX_PASSED {
                return Err(MicroVmError::Scratch(
                    spec.dir.clone(),
                    std::io::Error::other(format!(
                        "more than {MAX_TAPS} network devices or {MAX_PASSED} devices in all"
                    )),
                ));
            }
            let mut fds = [-1; MAX_PASSED];
            for (slot, fd) in fds.iter_mut().zip(&passed) {
                *slot = *fd;
            }
            let count = passed.len();
            // SAFETY: the closure runs between fork and exec and makes only
            // async-signal-safe calls (fcntl, dup2) on descriptors the
            // caller keeps open; it allocates nothing.
            unsafe {
                command.pre_exec(move || place_fds(&fds, count));
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| MicroVmError::Spawn(boot.vmm.clone(), e))?;
        Ok(Self {
            child,
            uds,
            api: config.api_uds,
            dir,
            log,
            exited: None,
            cgroup,
        })
    }

    /// The VMM's (launcher's) pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The hybrid-vsock socket of the VM.
    pub fn uds(&self) -> &Path {
        &self.uds
    }

    /// The VM's API, usable without holding the `MicroVm` (it only needs
    /// the socket's path).
    pub fn api(&self) -> VmApi {
        VmApi {
            path: self.api.clone(),
        }
    }

    /// What the VMM logged and how the guest console ended, for an error
    /// message; empty if both are.
    pub fn diagnostics(&self) -> String {
        diagnostics_at(&self.dir)
    }

    /// Whether the VMM has exited, waiting up to `grace` for it (a broken
    /// agent connection comes a moment before the VMM's exit): if so, what
    /// its status means, for an error message.
    pub fn exit_report(&mut self, grace: Duration) -> Option<String> {
        let status = self.wait_timeout(grace).ok().flatten()?;
        Some(format!(
            "the micro-VM is gone: capsid-vmm {}",
            explain_exit(status)
        ))
    }

    /// Waits for the agent to answer, for at most `wait`, giving up early
    /// if the VMM dies or `interrupted` says so.
    pub fn connect(
        &mut self,
        wait: Duration,
        io_timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<AgentClient, MicroVmError> {
        let deadline = Instant::now() + wait;
        loop {
            match AgentClient::connect(
                &self.uds,
                DEFAULT_AGENT_PORT,
                Duration::from_millis(500),
                io_timeout,
            ) {
                Ok(client) => return Ok(client),
                Err(e) => {
                    if let Some(status) = self.try_wait()? {
                        return Err(MicroVmError::DiedBooting {
                            status: explain_exit(status),
                            log: self.diagnostics(),
                            crashed: status.code() == Some(capsid_vmm_api::EXIT_GUEST_CRASH),
                            vmm_error: status.code() == Some(capsid_vmm_api::EXIT_VMM_ERROR),
                        });
                    }
                    if interrupted() {
                        return Err(MicroVmError::Interrupted);
                    }
                    if Instant::now() >= deadline {
                        self.stop_for_post_mortem(POST_MORTEM_WAIT);
                        return Err(MicroVmError::Unreachable {
                            source: e,
                            log: self.diagnostics(),
                        });
                    }
                }
            }
        }
    }

    /// Asks the VMM of a guest that never answered to stop (SIGTERM,
    /// which its keeper passes on), so that its log says where each vCPU
    /// was, and waits up to `grace` for it; the caller kills it after.
    fn stop_for_post_mortem(&mut self, grace: Duration) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id())
            && let Ok(None) = self.try_wait()
        {
            // SAFETY: kill(2) on our own child, not reaped yet (try_wait).
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = self.wait_timeout(grace);
        }
    }

    /// Launches the VM and waits for its agent ([`MicroVm::launch`], then
    /// [`MicroVm::connect`]), all within `policy.wait`. A guest that
    /// crashed before its agent answered is booted again, up to
    /// `policy.retries` times: each time is logged, told to
    /// `policy.on_retry` and counted ([`boot_retries`]), never silent. Only
    /// our kernel and agent have run by then, so no workload can cause a
    /// retry; the crashes seen are the nested test host's, and QEMU's
    /// guests die as often there (docs/reliability.md).
    pub fn boot(spec: &VmSpec, policy: &BootPolicy) -> Result<(Self, AgentClient), MicroVmError> {
        let deadline = Instant::now() + policy.wait;
        let mut retries = 0;
        loop {
            let mut vm = Self::launch(spec)?;
            let wait = deadline.saturating_duration_since(Instant::now());
            match vm.connect(wait, policy.io_timeout, policy.interrupted) {
                Err(MicroVmError::DiedBooting {
                    status,
                    crashed: true,
                    ..
                }) if retries < policy.retries && Instant::now() < deadline => {
                    retries += 1;
                    BOOT_RETRIES.fetch_add(1, Ordering::Relaxed);
                    let message = format!(
                        "the guest crashed before its agent answered (capsid-vmm {status}; {}); \
                         booting it again (retry {retries} of {})",
                        vm.last_words(),
                        policy.retries
                    );
                    log::warn!("{message}");
                    (policy.on_retry)(&message);
                    // Reaped, its cgroup removed; then a fresh directory.
                    drop(vm);
                    let dir = vm_dir(&spec.dir);
                    std::fs::remove_dir_all(&dir).map_err(|e| MicroVmError::Scratch(dir, e))?;
                }
                other => return other.map(|client| (vm, client)),
            }
        }
    }

    /// The VMM log's last line, for a one-line message.
    fn last_words(&self) -> String {
        let log = untrusted_tail(&self.log, TAIL_BYTES);
        let log = String::from_utf8_lossy(&log);
        let line = log.lines().rev().find(|l| !l.trim().is_empty());
        clean(line.unwrap_or("its log is empty").trim())
    }

    /// Attaches `image` to a spare disk slot (see [`VmApi::attach`]).
    pub fn attach(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError> {
        self.api().attach(image, id)
    }

    /// Snapshots the VM into `dir` and ends it (see [`VmApi::snapshot`]).
    pub fn snapshot(&self, dir: &Path) -> Result<u64, MicroVmError> {
        self.api().snapshot(dir)
    }

    /// Detaches disk `id` (see [`VmApi::detach`]).
    pub fn detach(&self, id: &str) -> Result<(), MicroVmError> {
        self.api().detach(id)
    }

    /// The VMM's exit status if it has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, MicroVmError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(MicroVmError::Wait)?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for the VMM to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, MicroVmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the VMM (if it still runs) and reaps it; removes its
    /// cgroup with anything left in it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.try_wait() {
            // The keeper's death takes the VMM with it (its parent-death
            // signal); the cgroup, where there is one, kills both at once.
            if let Some(cgroup) = &self.cgroup {
                let _ = std::fs::write(cgroup.path().join("cgroup.kill"), "1");
            }
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited = Some(status);
            }
        }
        if let Some(cgroup) = self.cgroup.take() {
            cgroup.remove();
        }
    }
}

/// How long a VMM whose guest never answered has to say where its vCPUs
/// were before it is killed.
const POST_MORTEM_WAIT: Duration = Duration::from_secs(2);

/// Guests booted again by [`MicroVm::boot`] in this process.
static BOOT_RETRIES: AtomicU64 = AtomicU64::new(0);

/// How many guests this process has booted again after they crashed
/// before their agent answered.
pub fn boot_retries() -> u64 {
    BOOT_RETRIES.load(Ordering::Relaxed)
}

/// How [`MicroVm::boot`] waits, and how often it boots again.
pub struct BootPolicy<'a> {
    /// The whole boot's deadline, retries included.
    pub wait: Duration,
    /// Each agent call's deadline once it answered.
    pub io_timeout: Duration,
    /// How many times a guest that crashed before its agent answered is
    /// booted again.
    pub retries: u32,
    /// Polled while waiting: the caller gave up.
    pub interrupted: &'a dyn Fn() -> bool,
    /// Told of each retry, in a line for the user.
    pub on_retry: &'a dyn Fn(&str),
}

impl std::fmt::Debug for BootPolicy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootPolicy")
            .field("wait", &self.wait)
            .field("io_timeout", &self.io_timeout)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// A running VM's API socket: attaching and detaching disk images.
#[derive(Debug, Clone)]
pub struct VmApi {
    /// `None`: the VM was started without spare disk slots.
    path: Option<PathBuf>,
}

impl VmApi {
    /// The API of the VM whose scratch directory is `dir`, launched by
    /// another process; it has none if it was started without spare slots.
    pub fn in_dir(dir: &Path) -> Self {
        let path = vm_dir(dir).join(API_SOCKET);
        Self {
            path: path.exists().then_some(path),
        }
    }

    /// Attaches `image` to a spare disk slot of the running VM as disk `id`
    /// (at most 20 letters, digits, '-', '_', '.'); returns how the agent
    /// mounts it. The image goes to the VMM as an open descriptor (the
    /// confined VMM cannot open host paths); the agent waits for the disk
    /// to appear.
    pub fn attach(&self, image: &RootfsImage, id: &str) -> Result<Rootfs, MicroVmError> {
        let file =
            File::open(&image.path).map_err(|e| MicroVmError::Image(image.path.clone(), e))?;
        let request = ApiRequest::Attach { id: id.to_owned() };
        match self.api_call(&request, &[&file], API_TIMEOUT) {
            Ok(ApiResponse::Slot { .. }) => Ok(rootfs_on(image, id)),
            other => Err(refused("attach", format!("disk {id:?}"), other)),
        }
    }

    /// Detaches disk `id`; the agent must have unmounted it.
    pub fn detach(&self, id: &str) -> Result<(), MicroVmError> {
        let request = ApiRequest::Detach { id: id.to_owned() };
        match self.api_call(&request, &[], API_TIMEOUT) {
            Ok(ApiResponse::Slot { .. }) => Ok(()),
            other => Err(refused("detach", format!("disk {id:?}"), other)),
        }
    }

    /// Snapshots the VM into `dir` (which must exist and hold no snapshot):
    /// the VMM writes `state.json` and `memory` through descriptors made
    /// here, and ends the VM. How long the VM was paused, in milliseconds.
    pub fn snapshot(&self, dir: &Path) -> Result<u64, MicroVmError> {
        use std::os::unix::fs::OpenOptionsExt;
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| MicroVmError::Scratch(path, e))
        };
        let state = create(SNAPSHOT_STATE)?;
        let memory = create(SNAPSHOT_MEMORY)?;
        match self.api_call(&ApiRequest::Snapshot, &[&state, &memory], SNAPSHOT_TIMEOUT) {
            Ok(ApiResponse::Saved { saved_ms }) => Ok(saved_ms),
            other => Err(refused("snapshot", "the VM".into(), other)),
        }
    }

    /// One request on the VMM's API socket: a JSON line out (with
    /// `files`), a JSON line back, each way within `timeout`. The reply,
    /// `Err` holding the VMM's error if it refused.
    fn api_call(
        &self,
        request: &ApiRequest,
        files: &[&File],
        timeout: Duration,
    ) -> Result<ApiResponse, Result<String, MicroVmError>> {
        use std::io::{BufRead, Read, Write};
        use std::os::fd::AsRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let api = self.path.as_ref().ok_or(Err(MicroVmError::NoSpareSlots))?;
        let io = |e| Err(MicroVmError::Api(api.clone(), e));
        let stream = std::os::unix::net::UnixStream::connect(api).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let mut line = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        if files.is_empty() {
            (&stream).write_all(&line).map_err(io)?;
        } else {
            let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
            let sent = stream
                .send_with_fds(&[&line[..]], &fds)
                .map_err(|e| io(std::io::Error::from_raw_os_error(e.errno())))?;
            (&stream).write_all(&line[sent..]).map_err(io)?;
        }
        let mut reply = String::new();
        std::io::BufReader::new((&stream).take(4096))
            .read_line(&mut reply)
            .map_err(io)?;
        match serde_json::from_str::<ApiResponse>(&reply) {
            Ok(ApiResponse::Error { error }) => Err(Ok(clean(&error))),
            Ok(answer) => Ok(answer),
            Err(_) => Err(Ok("no answer".to_owned())),
        }
    }
}

/// The error for an API call that did not do `op` on `what`.
fn refused(
    op: &'static str,
    what: String,
    outcome: Result<ApiResponse, Result<String, MicroVmError>>,
) -> MicroVmError {
    let reason = match outcome {
        Err(Err(e)) => return e,
        Err(Ok(reason)) => reason,
        Ok(_) => "an answer to another request".to_owned(),
    };
    MicroVmError::Refused { op, what, reason }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `pid` is a live process each of `needles` is part of one of
/// its arguments: how a pid recorded in a state file is told from a
/// recycled one before it is signalled.
pub fn alive_with(pid: u32, needles: &[&str]) -> bool {
    pid != 0
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            needles.iter().all(|n| args.iter().any(|a| a.contains(n)))
        })
}

/// SIGKILLs every capsid-vmm whose arguments name `dir`, left by a
/// process that died (a shim, a monitor, a `capsid run`), and removes the
/// VM's cgroup (killing what is left in it). A keeper takes its VMM with
/// it. Found by their arguments rather than a recorded pid, so that a VMM
/// started a moment before its owner died, before any pid was written
/// down, is found too. Returns how many were killed.
pub fn kill_orphans(dir: &Path, confinement: &Confinement) -> usize {
    let needle = dir.to_string_lossy();
    let mut killed = 0;
    if let Ok(processes) = std::fs::read_dir("/proc") {
        for process in processes.flatten() {
            let Some(pid) = process
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
            if comm.trim() != "capsid-vmm" || !alive_with(pid, &[&needle]) {
                continue;
            }
            if let Ok(pid) = i32::try_from(pid) {
                // SAFETY: kill() takes plain integers; the pid was just
                // checked to be a capsid-vmm serving `dir`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
            }
        }
    }
    if let Some(parent) = &confinement.cgroup_parent {
        confine::remove_cgroup(&parent.join(confine::cgroup_name(dir)));
    }
    killed
}

/// "exit status 1" or "killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path, vmm: &Path) -> VmSpec {
        VmSpec {
            nets: Vec::new(),
            boot: BootFiles {
                vmm: vmm.into(),
                kernel: vmm.into(),
                initramfs: vmm.into(),
                kernel_params: String::new(),
            },
            vcpus: 1,
            memory_mib: 64,
            disks: vec![],
            spare_disks: 0,
            dir: dir.into(),
            log_level: "warn".into(),
            confinement: Confinement {
                jail: false,
                ..Confinement::default()
            },
            die_with_owner: false,
            restore: None,
        }
    }

    /// A stand-in VMM: a shell script with `body`.
    fn fake_vmm(dir: &Path, body: &str) -> PathBuf {
        let script = dir.join("fake-vmm");
        std::fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        script
    }

    /// Launches a script written a moment ago. A child that another test thread
    /// forked while the script's write descriptor was open holds that
    /// descriptor until it execs, and exec then fails with ETXTBSY; that
    /// window is short, so retry.
    fn launch_fake(spec: &VmSpec) -> MicroVm {
        for _ in 0..100 {
            match MicroVm::launch(spec) {
                Err(MicroVmError::Spawn(_, e))
                    if e.kind() == std::io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed busy for 2 s", spec.boot.vmm.display());
    }

    #[test]
    fn a_disk_with_no_name_reaches_the_vmm_as_a_descriptor_after_the_taps() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let script = fake_vmm(
            dir.path(),
            &format!(
                "cat /proc/self/fd/3 /proc/self/fd/4 > {0}.part; mv {0}.part {0}; exec sleep 600",
                seen.display()
            ),
        );
        let mut spec = spec(dir.path(), &script);
        let mut tap = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut tap, b"tap;").unwrap();
        let tap = File::open(format!("/proc/self/fd/{}", tap.as_raw_fd())).unwrap();
        let mut disk = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut disk, b"disk").unwrap();
        let disk = File::open(format!("/proc/self/fd/{}", disk.as_raw_fd())).unwrap();
        spec.nets = vec![VmNet {
            tap: tap.as_raw_fd(),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            mtu: 1500,
        }];
        spec.disks = vec![Disk {
            file: Some(DiskFile(Arc::new(disk))),
            path: "(the scratch disk)".into(),
            read_only: false,
            id: "scratch".into(),
        }];
        let config = spec.vm_config();
        assert_eq!(config.nets[0].tap_fd, 3);
        assert_eq!(config.disks[0].path, Path::new("/proc/self/fd/4"));
        assert_eq!(config.disks[0].inherited_fd(), Some(4));
        let mut vm = launch_fake(&spec);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !seen.exists() {
            assert!(Instant::now() < deadline, "the fake VMM never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_to_string(&seen).unwrap(), "tap;disk");
        vm.kill();
    }

    #[test]
    fn the_vmm_gets_the_vm_in_its_own_configuration_type() {
        let dir = tempfile::tempdir().unwrap();
        let args = dir.path().join("args");
        let script = fake_vmm(
            dir.path(),
            &format!("echo \"$@\" > {}; exec sleep 600", args.display()),
        );
        let mut spec = spec(dir.path(), &script);
        spec.boot.kernel_params = "sysctl.vm.panic_on_oom=2".into();
        spec.disks = vec![Disk {
            file: None,
            path: "/images/r.erofs".into(),
            read_only: true,
            id: ROOTFS_DISK.into(),
        }];
        spec.spare_disks = 2;
        let vm = launch_fake(&spec);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&args).is_ok_and(|a| a.ends_with('\n')) {
            assert!(Instant::now() < deadline, "the fake VMM never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let args = std::fs::read_to_string(&args).unwrap();
        let config_path = vmm_config_path(dir.path());
        assert!(
            args.starts_with(&format!("--config {} ", config_path.display())),
            "{args}"
        );
        let config: VmConfig =
            serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        assert_eq!(
            config.cmdline,
            format!("{DEFAULT_CMDLINE} sysctl.vm.panic_on_oom=2")
        );
        assert_eq!(
            (config.vcpus, config.mem_mib, config.spare_disks),
            (1, 64, 2)
        );
        assert_eq!(config.disks[0].id.as_deref(), Some(ROOTFS_DISK));
        assert!(config.disks[0].read_only);
        assert_eq!(config.vsock.unwrap().uds, vsock_path(dir.path()));
        assert_eq!(config.api_uds, Some(vm_dir(dir.path()).join("api.sock")));
        assert_eq!(
            config.serial,
            SerialConfig::File(vm_dir(dir.path()).join(CONSOLE))
        );
        drop(vm);
    }

    #[test]
    fn a_missing_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = MicroVm::launch(&spec(dir.path(), Path::new("/nonexistent/capsid-vmm")))
            .unwrap_err()
            .to_string();
        assert!(error.contains("/nonexistent/capsid-vmm"), "{error}");
    }

    #[test]
    fn a_kernel_panic_is_named_from_its_first_line_above_the_dump() {
        let console = "[    1.5] Out of memory\n\
            [    1.58] Kernel panic - not syncing: Out of memory: compulsory panic_on_oom is enabled\x1b[2J\n\
            [    1.58] CPU: 0 PID: 35 Comm: dd\n[    1.58] Kernel Offset: disabled\n";
        assert_eq!(
            panic_reason(console).as_deref(),
            Some("Out of memory: compulsory panic_on_oom is enabled [2J")
        );
        assert_eq!(panic_reason("[ 0.1] Run /init as init process\n"), None);
    }

    #[test]
    fn a_guest_that_never_answers_is_stopped_so_that_its_vmm_says_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in "VMM" whose guest hangs: on SIGTERM it logs where its
        // vCPU was, as capsid-vmm does, and exits.
        let body = "trap 'echo \"stopped from outside: vCPU 0: rip=0xffffffff81000000\" >&2; exit 143' TERM\n\
                    while :; do sleep 0.05; done";
        let script = fake_vmm(dir.path(), body);
        let mut vm = launch_fake(&spec(dir.path(), &script));
        let error = vm
            .connect(Duration::from_millis(500), Duration::from_secs(1), &|| {
                false
            })
            .unwrap_err();
        assert!(
            matches!(error, MicroVmError::Unreachable { .. }),
            "{error:?}"
        );
        let error = capsid_base::error_chain(&error);
        assert!(
            error.contains("stopped from outside: vCPU 0: rip=0xffffffff81000000"),
            "{error}"
        );
        assert!(vm.try_wait().unwrap().is_some(), "the VMM has exited");
    }

    #[test]
    fn a_vmm_that_dies_while_booting_is_reported_with_its_log_and_console() {
        let dir = tempfile::tempdir().unwrap();
        // A stand-in "VMM" whose guest printed a panic (with a terminal escape
        // in it) before the VMM complained and exited 3, as on a triple fault.
        let console = dir.path().join("vm").join(CONSOLE);
        let body = format!(
            "printf 'booting\\nKernel panic - not syncing: \\033]0;pwned\\007 oops\\n' >> {}\n\
             echo 'guest crashed: triple fault' >&2\nexit 3",
            console.display()
        );
        let script = fake_vmm(dir.path(), &body);
        let mut vm = launch_fake(&spec(dir.path(), &script));
        let error = vm
            .connect(Duration::from_secs(20), Duration::from_secs(1), &|| false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("exit status 3: the guest crashed"),
            "{error}"
        );
        assert!(
            error.contains("capsid-vmm said:\n  guest crashed: triple fault"),
            "{error}"
        );
        assert!(
            error.contains("the guest console ended with:\n  booting\n  Kernel panic"),
            "{error}"
        );
        assert!(
            !error.contains('\u{1b}') && !error.contains('\u{7}'),
            "{error:?}"
        );
        assert_eq!(
            vm.exit_report(Duration::ZERO).as_deref(),
            Some(
                "the micro-VM is gone: capsid-vmm exit status 3: the guest crashed, a triple fault or a KVM error"
            )
        );
    }

    /// Boots with `retries`, retrying a launch that met ETXTBSY (see
    /// [`launch_fake`]); returns the outcome and what `on_retry` was told.
    fn boot_fake(spec: &VmSpec, retries: u32) -> (Result<(), MicroVmError>, Vec<String>) {
        let told = std::sync::Mutex::new(Vec::new());
        let policy = BootPolicy {
            wait: Duration::from_secs(20),
            io_timeout: Duration::from_secs(1),
            retries,
            interrupted: &|| false,
            on_retry: &|why| told.lock().unwrap().push(why.to_owned()),
        };
        for _ in 0..100 {
            match MicroVm::boot(spec, &policy) {
                Err(MicroVmError::Spawn(_, e))
                    if e.kind() == std::io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return (other.map(drop), told.into_inner().unwrap()),
            }
        }
        panic!("{} stayed busy for 2 s", spec.boot.vmm.display());
    }

    #[test]
    fn a_guest_that_crashed_before_its_agent_answered_is_booted_again_and_told() {
        let dir = tempfile::tempdir().unwrap();
        let launches = dir.path().join("launches");
        // Each boot leaves a console line in a directory of its own (a
        // leftover would make the next launch fail), then crashes.
        let body = format!(
            "echo boot >> {}\necho up > {}/vm/{CONSOLE}\n\
             echo 'capsid-vmm: the guest crashed: vCPU 0 triple-faulted' >&2\nexit 3",
            launches.display(),
            dir.path().display()
        );
        let script = fake_vmm(dir.path(), &body);
        let before = boot_retries();
        let (outcome, told) = boot_fake(&spec(dir.path(), &script), 2);
        let error = outcome.unwrap_err();
        assert!(
            matches!(error, MicroVmError::DiedBooting { crashed: true, .. }),
            "{error}"
        );
        assert_eq!(
            std::fs::read_to_string(&launches).unwrap().lines().count(),
            3
        );
        assert_eq!(told.len(), 2, "{told:?}");
        for (n, why) in told.iter().enumerate() {
            assert!(
                why.contains("the guest crashed before its agent answered")
                    && why.contains("vCPU 0 triple-faulted")
                    && why.contains(&format!("retry {} of 2", n + 1)),
                "{why}"
            );
        }
        assert!(boot_retries() >= before + 2);
    }

    #[test]
    fn a_vmm_that_failed_for_another_reason_is_not_booted_again() {
        let dir = tempfile::tempdir().unwrap();
        let launches = dir.path().join("launches");
        for code in [1, 2] {
            std::fs::write(&launches, "").unwrap();
            let _ = std::fs::remove_dir_all(dir.path().join("vm"));
            let body = format!("echo boot >> {}\nexit {code}", launches.display());
            let script = fake_vmm(dir.path(), &body);
            let (outcome, told) = boot_fake(&spec(dir.path(), &script), 2);
            let error = outcome.unwrap_err();
            assert!(
                matches!(error, MicroVmError::DiedBooting { crashed: false, .. }),
                "{error}"
            );
            assert_eq!(
                std::fs::read_to_string(&launches).unwrap().lines().count(),
                1
            );
            assert!(told.is_empty(), "{told:?}");
        }
    }

    #[test]
    fn dropping_kills_the_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let script = fake_vmm(dir.path(), "exec sleep 600");
        let vm = launch_fake(&spec(dir.path(), &script));
        let pid = vm.pid();
        drop(vm);
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        assert!(!alive, "the VMM {pid} outlived its MicroVm");
    }
}
