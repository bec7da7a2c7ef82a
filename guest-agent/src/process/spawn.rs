//! The agent's side of starting a process: a thread that enters or makes
//! its PID namespace, a fork, and in the child at once an exec of the
//! agent binary as `capsid-init` (`child.rs`), with the plan in a memfd.
//! Between the fork and that exec the child only moves descriptors: it is
//! a copy of a multi-threaded process, whose locks another thread may have
//! held, and whose memory holds the other containers' data.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::fds::{arrange_fds, pidfd_open, receive_with_fd, setns_pidfd};
use super::{ProcessError, ProcessPlan, io_error};
use crate::reaper::{ExitCell, Reaper};
use crate::rootfs::RootfsPlan;
use crate::stdio::ChildStdio;

/// The child's descriptors after the fork: 0-2 its stdio, then these.
pub(super) const STATUS_FD: RawFd = 3;
/// The start pipe: a byte means exec, EOF means give up.
pub(super) const START_FD: RawFd = 4;
/// The memfd holding the [`ChildPlan`].
pub(super) const PLAN_FD: RawFd = 5;
/// An exec's: the container init's pidfd, until it has joined.
pub(super) const JOIN_PIDFD: RawFd = 6;

/// What the re-executed child needs, as JSON in a memfd (fd 5).
#[derive(Debug, Serialize, Deserialize)]
pub struct ChildPlan {
    /// The process.
    pub process: ProcessPlan,
    /// `CLONE_NEW*` flags to unshare (a container's init); `None`: join
    /// the namespaces of the init whose pidfd is [`JOIN_PIDFD`] (an exec).
    pub unshare: Option<libc::c_int>,
    /// A container's init that shares namespaces with another container:
    /// the `CLONE_NEW*` kinds to join through [`JOIN_PIDFD`] first.
    #[serde(default)]
    pub join: Option<libc::c_int>,
    /// The container's root, for its init.
    pub rootfs: Option<RootfsPlan>,
    /// The cgroup to join.
    pub cgroup_procs: PathBuf,
}

/// The longest plan the child reads.
pub(super) const MAX_PLAN: u64 = 16 << 20;

/// The agent's own binary, opened once (`O_PATH`): what the child
/// executes again, by descriptor, whatever happens to paths later.
fn agent_binary() -> Result<RawFd, ProcessError> {
    static BINARY: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = BINARY.get() {
        return Ok(fd.as_raw_fd());
    }
    // SAFETY: a NUL-terminated path and flags.
    let fd = unsafe { libc::open(c"/proc/self/exe".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_error("open the agent's binary")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor that we now own; a racing thread's copy is
    // dropped, which is harmless.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(BINARY.get_or_init(|| fd).as_raw_fd())
}

/// The plan in a memfd, at offset 0, for the child to read.
fn plan_file(plan: &ChildPlan) -> Result<File, ProcessError> {
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"capsid-plan".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_error("create the plan's memfd")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor that we now own.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let json = serde_json::to_vec(plan)
        .map_err(|e| ProcessError::Invalid(format!("cannot write the process plan: {e}")))?;
    file.write_all(&json)
        .and_then(|()| file.rewind())
        .map_err(io_error("write the process plan"))?;
    Ok(file)
}

/// Which namespaces the child gets.
#[derive(Debug, Clone, Copy)]
pub enum Namespaces {
    /// A container's init: new namespaces (`CLONE_NEW*` flags, the PID one
    /// made by the spawning thread).
    New {
        /// `CLONE_NEW*` flags the child unshares.
        flags: libc::c_int,
        /// Whether the spawning thread makes a new PID namespace.
        pid: bool,
        /// Namespaces joined instead (a pod's container, its sandbox's).
        share: Option<Share>,
    },
    /// An exec: the namespaces of the container's init, joined through
    /// its pidfd (atomically, and never those of a process that took a
    /// reused pid).
    Join {
        /// The container init's pidfd.
        init_pidfd: RawFd,
    },
}

/// Namespaces a container's init joins: another container init's.
#[derive(Debug, Clone, Copy)]
pub struct Share {
    /// That init's pidfd.
    pub pidfd: RawFd,
    /// `CLONE_NEWIPC`, `CLONE_NEWUTS`, `CLONE_NEWPID`: the ones joined.
    pub kinds: libc::c_int,
}

impl Namespaces {
    /// The pidfd whose namespaces the child joins, if any.
    fn join_pidfd(self) -> Option<RawFd> {
        match self {
            Self::New { share, .. } => share.map(|s| s.pidfd),
            Self::Join { init_pidfd } => Some(init_pidfd),
        }
    }
}

/// A process to start.
#[derive(Debug)]
pub struct SpawnRequest<'a> {
    /// What it runs, as whom, with what.
    pub plan: &'a ProcessPlan,
    /// Its namespaces.
    pub namespaces: Namespaces,
    /// The container's root to set up (a container's init only).
    pub rootfs: Option<&'a RootfsPlan>,
    /// The container cgroup's `cgroup.procs`, which it joins.
    pub cgroup_procs: &'a Path,
    /// Its fds 0-2.
    pub stdio: ChildStdio,
}

/// A forked process, stopped before exec.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the guest.
    pub pid: i32,
    /// The pty master, for a process with a terminal.
    pub terminal: Option<OwnedFd>,
    /// For signals that cannot hit a recycled pid.
    pub pidfd: Option<OwnedFd>,
    /// Lets it exec.
    pub gate: StartGate,
}

/// A created process waiting for start.
#[derive(Debug)]
pub struct StartGate {
    start: File,
    status: UnixStream,
}

impl StartGate {
    /// Lets the process exec; returns once it has (or has failed to).
    pub fn start(self) -> Result<(), ProcessError> {
        let Self {
            mut start,
            mut status,
        } = self;
        start
            .write_all(b"S")
            .map_err(io_error("signal the process to start"))?;
        drop(start);
        match read_status(&mut status)? {
            (Status::Eof, _) => Ok(()),
            (Status::Error(error), _) => Err(error),
            (Status::Ready, _) => Err(ProcessError::Child("unexpected status".into())),
        }
    }
}

enum Status {
    Ready,
    Error(ProcessError),
    Eof,
}

/// Longest error text a child sends.
const MAX_STATUS: u64 = 4096;

/// Reads the child's status byte, with the descriptor that may come with
/// it, then the error text if it is one.
fn read_status(status: &mut UnixStream) -> Result<(Status, Option<OwnedFd>), ProcessError> {
    let (kind, fd) = loop {
        match receive_with_fd(status) {
            Ok((None, _)) => return Ok((Status::Eof, None)),
            Ok((Some(kind), fd)) => break (kind, fd),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error("read the child's status")(e)),
        }
    };
    if kind == b'R' {
        return Ok((Status::Ready, fd));
    }
    let mut why = String::new();
    let _ = status.take(MAX_STATUS).read_to_string(&mut why);
    Ok((Status::Error(child_error(kind, why)), None))
}

/// The child's error by its status byte (`child.rs`): the program not
/// found, not executable, or anything else.
fn child_error(kind: u8, why: String) -> ProcessError {
    match kind {
        b'N' => ProcessError::ProgramNotFound(why),
        b'X' => ProcessError::ProgramNotExecutable(why),
        _ => ProcessError::Child(why),
    }
}

/// Forks the process and waits until it is ready to exec. Its pid is
/// registered with the reaper, which fills `exit`.
pub fn spawn(
    reaper: &Reaper,
    exit: Arc<ExitCell>,
    request: SpawnRequest<'_>,
) -> Result<Spawned, ProcessError> {
    let (status_read, status_write) =
        UnixStream::pair().map_err(io_error("create a socket pair"))?;
    let (start_read, start_write) = crate::stdio::pipe().map_err(io_error("create a pipe"))?;
    let namespaces = request.namespaces;
    let binary = agent_binary()?;
    let plan = plan_file(&ChildPlan {
        process: request.plan.clone(),
        unshare: match namespaces {
            Namespaces::New { flags, .. } => Some(flags),
            Namespaces::Join { .. } => None,
        },
        // The PID namespace is the spawning thread's to join.
        join: match namespaces {
            Namespaces::New {
                share: Some(share), ..
            } => Some(share.kinds & !libc::CLONE_NEWPID),
            _ => None,
        },
        rootfs: request.rootfs.cloned(),
        cgroup_procs: request.cgroup_procs.to_owned(),
    })?;

    // A thread of its own: a PID namespace chosen with unshare or setns
    // applies to the children of the calling thread only.
    let (pid, pidfd) = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(i32, Option<OwnedFd>), ProcessError> {
                match namespaces {
                    Namespaces::New {
                        share: Some(share), ..
                    } if share.kinds & libc::CLONE_NEWPID != 0 => {
                        setns_pidfd(share.pidfd, libc::CLONE_NEWPID)
                            .map_err(io_error("join the pod's PID namespace"))?;
                    }
                    Namespaces::New { pid: true, .. } => {
                        // SAFETY: unshare takes flags only.
                        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                            return Err(io_error("create a PID namespace")(
                                io::Error::last_os_error(),
                            ));
                        }
                    }
                    Namespaces::New { .. } => {}
                    Namespaces::Join { init_pidfd } => {
                        setns_pidfd(init_pidfd, libc::CLONE_NEWPID)
                            .map_err(io_error("join the container's PID namespace"))?;
                    }
                }
                // Made before the fork: the child allocates nothing.
                let argv = [super::INIT_NAME_C.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null::<libc::c_char>()];
                let mut registry = reaper.lock();
                // SAFETY: fork has no preconditions; the child only runs
                // `exec_init`, which ends in exec or _exit.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(io_error("fork")(io::Error::last_os_error()));
                }
                if pid == 0 {
                    let child = ForkedChild {
                        stdio: &request.stdio,
                        status: &status_write,
                        start: &start_read,
                        plan: &plan,
                        namespaces,
                        binary,
                    };
                    child.exec_init(&argv, &envp);
                }
                registry.watch(pid, Arc::clone(&exit));
                // Opened while the reaper cannot yet deliver this pid's exit,
                // so it names this process and no later one.
                let pidfd = pidfd_open(pid);
                drop(registry);
                reaper.child_started();
                Ok((pid, pidfd))
            })
            .join()
            .unwrap_or_else(|_| Err(ProcessError::Invalid("spawn thread panicked".into())))
    })?;
    drop(status_write);
    drop(start_read);
    let mut status = status_read;
    match read_status(&mut status)? {
        (Status::Ready, terminal) => {
            // As runc's parent does: from here, in the guest's /proc, so a
            // container without /proc gets it too; inherited across exec.
            if let Some(adj) = request.plan.oom_score_adj {
                std::fs::write(format!("/proc/{pid}/oom_score_adj"), adj.to_string())
                    .map_err(io_error("set process.oomScoreAdj"))?;
            }
            Ok(Spawned {
                pid,
                terminal,
                pidfd,
                gate: StartGate {
                    start: start_write,
                    status,
                },
            })
        }
        (Status::Error(error), _) => Err(error),
        (Status::Eof, _) => Err(ProcessError::Child(
            "the process ended during setup without saying why".into(),
        )),
    }
}

/// What the forked child holds until it executes `capsid-init`.
struct ForkedChild<'a> {
    stdio: &'a ChildStdio,
    status: &'a UnixStream,
    start: &'a File,
    plan: &'a File,
    namespaces: Namespaces,
    binary: RawFd,
}

impl ForkedChild<'_> {
    /// Puts the descriptors in place and executes the agent again as
    /// `capsid-init`; never returns. Allocates nothing and takes no lock.
    fn exec_init(&self, argv: &[*const libc::c_char; 2], envp: &[*const libc::c_char; 1]) -> ! {
        let mut fds = [
            self.stdio.stdin.as_raw_fd(),
            self.stdio.stdout.as_raw_fd(),
            self.stdio.stderr.as_raw_fd(),
            self.status.as_raw_fd(),
            self.start.as_raw_fd(),
            self.plan.as_raw_fd(),
            self.binary,
            -1,
        ];
        let mut count = 7;
        if let Some(pidfd) = self.namespaces.join_pidfd() {
            fds[6] = pidfd;
            fds[7] = self.binary;
            count = 8;
        }
        // Everything but the binary is inherited; capsid-init marks 3-6
        // close-on-exec itself.
        if arrange_fds(&fds[..count], count - 1).is_err() {
            // No status pipe yet to report through.
            // SAFETY: _exit ends this process without running Rust's cleanup.
            unsafe { libc::_exit(126) };
        }
        let binary = RawFd::try_from(count - 1).unwrap_or(RawFd::MAX);
        let empty: &CStr = c"";
        // SAFETY: argv and envp are null-terminated arrays of
        // NUL-terminated strings made before the fork; the binary is an
        // open descriptor (AT_EMPTY_PATH executes it).
        unsafe {
            libc::syscall(
                libc::SYS_execveat,
                binary,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        };
        const FAILED: &[u8] = b"Ecannot execute the agent again as capsid-init";
        // SAFETY: writes a static buffer to the status socket.
        unsafe { libc::write(STATUS_FD, FAILED.as_ptr().cast(), FAILED.len()) };
        // SAFETY: _exit ends this process without running Rust's cleanup.
        unsafe { libc::_exit(127) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_childs_status_byte_types_its_error() {
        assert!(matches!(
            child_error(b'N', "exec x: not found".into()),
            ProcessError::ProgramNotFound(why) if why == "exec x: not found"
        ));
        assert!(matches!(
            child_error(b'X', "exec /bin: Permission denied".into()),
            ProcessError::ProgramNotExecutable(_)
        ));
        for kind in [b'E', b'?', 0] {
            assert!(matches!(
                child_error(kind, "w".into()),
                ProcessError::Child(_)
            ));
        }
    }
}
