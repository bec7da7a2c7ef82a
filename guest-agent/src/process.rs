//! Starting a container process: everything of the OCI process spec is
//! checked and converted before the fork ([`ProcessPlan`]); the child then
//! applies it and stops before exec until the host says start.
//!
//! ```text
//!  agent                                   child
//!  ─────                                   ─────
//!  plan (spec checked, seccomp compiled)
//!  thread: unshare/setns PID ns, fork ──▶  fds 0-2, 3 = status, 4 = start
//!                                          setsid, join cgroup, namespaces,
//!                                          rootfs (init only), pty opened in
//!                                          the container's /dev/pts
//!  read status ◀── "R" + pty master ───   wait on fd 4
//!              (or "E<why>")
//!  StartProcess: write fd 4 ──────────▶   rlimits, groups, gid, uid, caps,
//!                                          umask, cwd, no_new_privs, seccomp,
//!  read status to EOF ◀── EOF (or "E") ─   execve (fd 3 closes on exec)
//! ```

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use caps::{CapSet, Capability};
use oci_spec::runtime::Process;

use crate::reaper::{ExitCell, Reaper};
use crate::rootfs::RootfsPlan;
use crate::stdio::ChildStdio;
use crate::syscall::LinuxSyscall;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("container process setup failed: {0}")]
    Child(String),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(io::Error) -> ProcessError {
    move |source| ProcessError::Io { what, source }
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone)]
pub struct CapsPlan {
    pub bounding: HashSet<Capability>,
    pub effective: HashSet<Capability>,
    pub permitted: HashSet<Capability>,
    pub inheritable: HashSet<Capability>,
    pub ambient: HashSet<Capability>,
}

impl CapsPlan {
    /// No capability in any set.
    pub fn none() -> Self {
        Self {
            bounding: HashSet::new(),
            effective: HashSet::new(),
            permitted: HashSet::new(),
            inheritable: HashSet::new(),
            ambient: HashSet::new(),
        }
    }
}

/// The OCI process, checked and converted for the child.
#[derive(Debug)]
pub struct ProcessPlan {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    pub path: String,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub rlimits: Vec<(u32, u64, u64)>,
    pub caps: CapsPlan,
    pub no_new_privs: bool,
    pub seccomp: Option<crate::seccomp::SeccompProgram>,
    pub terminal: bool,
}

fn cstrings(what: &str, items: &[String]) -> Result<Vec<CString>, ProcessError> {
    items
        .iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| ProcessError::Invalid(format!("{what} {s:?} contains a NUL byte")))
        })
        .collect()
}

fn capability_set(
    set: &Option<HashSet<oci_spec::runtime::Capability>>,
) -> Result<HashSet<Capability>, ProcessError> {
    set.iter()
        .flatten()
        .map(|cap| {
            let name = serde_json::to_value(cap)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            Capability::from_str(&name)
                .map_err(|_| ProcessError::Invalid(format!("unknown capability {name:?}")))
        })
        .collect()
}

fn rlimit_resource(name: &str) -> Option<u32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

impl ProcessPlan {
    pub fn from_oci(
        process: &Process,
        seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    ) -> Result<Self, ProcessError> {
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(ProcessError::Invalid("process.args is empty".into()));
        }
        let env = process.env().clone().unwrap_or_default();
        if let Some(bad) = env.iter().find(|e| !e.contains('=')) {
            return Err(ProcessError::Invalid(format!(
                "environment entry {bad:?} is not KEY=VALUE"
            )));
        }
        let path = env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH)
            .to_owned();
        let cwd = process.cwd().clone();
        if !cwd.is_absolute() {
            return Err(ProcessError::Invalid(format!(
                "process.cwd {} is not absolute",
                cwd.display()
            )));
        }
        let user = process.user();
        let mut rlimits = Vec::new();
        for rlimit in process.rlimits().iter().flatten() {
            let name = serde_json::to_value(rlimit.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let resource = rlimit_resource(&name)
                .ok_or_else(|| ProcessError::Invalid(format!("unknown rlimit {name:?}")))?;
            if rlimit.soft() > rlimit.hard() {
                return Err(ProcessError::Invalid(format!(
                    "{name}: soft limit {} is above hard limit {}",
                    rlimit.soft(),
                    rlimit.hard()
                )));
            }
            rlimits.push((resource, rlimit.soft(), rlimit.hard()));
        }
        // A spec that names no capabilities gets none (runc's rule): the
        // agent is root with every capability, and nothing of that may pass
        // to a process by omission.
        let caps = match process.capabilities() {
            Some(c) => CapsPlan {
                bounding: capability_set(c.bounding())?,
                effective: capability_set(c.effective())?,
                permitted: capability_set(c.permitted())?,
                inheritable: capability_set(c.inheritable())?,
                ambient: capability_set(c.ambient())?,
            },
            None => CapsPlan::none(),
        };
        if process
            .apparmor_profile()
            .as_deref()
            .is_some_and(|p| !p.is_empty())
            || process
                .selinux_label()
                .as_deref()
                .is_some_and(|p| !p.is_empty())
        {
            tracing::warn!("AppArmor and SELinux labels are ignored (the guest has neither)");
        }
        Ok(Self {
            args: cstrings("argument", &args)?,
            env: cstrings("environment entry", &env)?,
            path,
            cwd,
            uid: user.uid(),
            gid: user.gid(),
            additional_gids: user.additional_gids().clone().unwrap_or_default(),
            umask: user.umask(),
            rlimits,
            caps,
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            seccomp: seccomp.map(crate::seccomp::compile).transpose()?,
            terminal: process.terminal().unwrap_or(false),
        })
    }
}

/// Which namespaces the child gets.
#[derive(Debug, Clone, Copy)]
pub enum Namespaces {
    /// A container's init: new namespaces (`CLONE_NEW*` flags, the PID one
    /// made by the spawning thread).
    New { flags: libc::c_int, pid: bool },
    /// An exec: the namespaces of the container's init, joined through
    /// its pidfd (atomically, and never those of a process that took a
    /// reused pid).
    Join { init_pidfd: RawFd },
}

#[derive(Debug)]
pub struct SpawnRequest<'a> {
    pub plan: &'a ProcessPlan,
    pub namespaces: Namespaces,
    pub rootfs: Option<&'a RootfsPlan>,
    pub cgroup_procs: &'a Path,
    pub stdio: ChildStdio,
}

/// A forked process, stopped before exec.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    /// The pty master, for a process with a terminal.
    pub terminal: Option<OwnedFd>,
    /// For signals that cannot hit a recycled pid.
    pub pidfd: Option<OwnedFd>,
    pub gate: StartGate,
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor that we now own.
    i32::try_from(fd)
        .ok()
        .filter(|&fd| fd >= 0)
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` through a pidfd.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
            (Status::Error(why), _) => Err(ProcessError::Child(why)),
            (Status::Ready, _) => Err(ProcessError::Child("unexpected status".into())),
        }
    }
}

enum Status {
    Ready,
    Error(String),
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
    Ok((Status::Error(why), None))
}

/// Space for one descriptor's control message.
const CMSG_SPACE: usize = 64;

/// A message header over one byte and a control buffer.
fn one_byte_message(
    byte: &mut [u8; 1],
    iov: &mut libc::iovec,
    control: &mut [u8; CMSG_SPACE],
) -> libc::msghdr {
    iov.iov_base = byte.as_mut_ptr().cast();
    iov.iov_len = 1;
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control.len();
    message
}

fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

/// Sends one byte, and `fd` with it as SCM_RIGHTS.
fn send_with_fd(socket: RawFd, byte: u8, fd: RawFd) -> io::Result<()> {
    let (mut data, mut iov, mut control) = ([byte], empty_iovec(), [0u8; CMSG_SPACE]);
    let mut message = one_byte_message(&mut data, &mut iov, &mut control);
    // SAFETY: CMSG_SPACE computes a size from a size.
    message.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer is large enough for one header (checked
    // by CMSG_FIRSTHDR returning non-null) and one int of data.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        if header.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: `message` points at live buffers described by their lengths.
    if unsafe { libc::sendmsg(socket, &raw const message, libc::MSG_NOSIGNAL) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one byte and the descriptor that came with it, if any. None:
/// end of stream.
fn receive_with_fd(socket: &UnixStream) -> io::Result<(Option<u8>, Option<OwnedFd>)> {
    let (mut data, mut iov, mut control) = ([0u8], empty_iovec(), [0u8; CMSG_SPACE]);
    let mut message = one_byte_message(&mut data, &mut iov, &mut control);
    // SAFETY: `message` points at live buffers described by their lengths.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut message, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok((None, None));
    }
    let mut fd = None;
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG
    // macros walk within it, and an SCM_RIGHTS header carries an int.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
    }
    Ok((Some(data[0]), fd))
}

/// Joins the namespaces `kinds` of the process `pidfd` names, all at once.
/// A pidfd of a process that has exited fails (ESRCH).
pub fn setns_pidfd(pidfd: RawFd, kinds: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and flags; a pidfd with namespace
    // flags is supported since Linux 5.8.
    if unsafe { libc::setns(pidfd, kinds) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
    // A thread of its own: a PID namespace chosen with unshare or setns
    // applies to the children of the calling thread only.
    let (pid, pidfd) = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(i32, Option<OwnedFd>), ProcessError> {
                match namespaces {
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
                let mut registry = reaper.lock();
                // SAFETY: fork has no preconditions; the child only runs
                // `child_main`, which ends in exec or _exit.
                let pid = unsafe { libc::fork() };
                if pid < 0 {
                    return Err(io_error("fork")(io::Error::last_os_error()));
                }
                if pid == 0 {
                    child_main(&request, &status_write, &start_read);
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
        (Status::Ready, terminal) => Ok(Spawned {
            pid,
            terminal,
            pidfd,
            gate: StartGate {
                start: start_write,
                status,
            },
        }),
        (Status::Error(why), _) => Err(ProcessError::Child(why)),
        (Status::Eof, _) => Err(ProcessError::Child(
            "the process ended during setup without saying why".into(),
        )),
    }
}

/// The child: never returns.
fn child_main(request: &SpawnRequest<'_>, status: &UnixStream, start: &File) -> ! {
    // No allocation here: the agent forked us while other threads ran.
    let mut fds = [
        request.stdio.stdin.as_raw_fd(),
        request.stdio.stdout.as_raw_fd(),
        request.stdio.stderr.as_raw_fd(),
        status.as_raw_fd(),
        start.as_raw_fd(),
        -1,
    ];
    let mut count = 5;
    // An exec keeps the init's pidfd, as fd 5, until it has joined.
    if let Namespaces::Join { init_pidfd } = request.namespaces {
        fds[5] = init_pidfd;
        count = 6;
    }
    if let Err(e) = arrange_fds(&fds[..count]) {
        // No status pipe yet to report through.
        let _ = e;
        // SAFETY: _exit ends this process without running Rust's cleanup.
        unsafe { libc::_exit(126) };
    }
    // From here on: fd 3 is the status pipe, fd 4 the start pipe.
    // SAFETY: fd 3 is the status pipe's write end, owned by this process.
    let mut status = unsafe { File::from_raw_fd(3) };
    let result = prepare(request).and_then(|()| {
        if request.plan.terminal {
            let master = open_terminal()?;
            send_with_fd(3, b'R', master.as_raw_fd()).map_err(|e| format!("report ready: {e}"))?;
        } else {
            status
                .write_all(b"R")
                .map_err(|e| format!("report ready: {e}"))?;
        }
        // SAFETY: fd 4 is the start pipe's read end, owned by this process.
        let mut start = unsafe { File::from_raw_fd(4) };
        let mut go = [0u8];
        match start.read(&mut go) {
            Ok(1) => {}
            // The agent dropped us (the container was removed).
            _ => {
                // SAFETY: _exit ends this process without cleanup.
                unsafe { libc::_exit(0) }
            }
        }
        drop(start);
        finish_and_exec(request.plan)
    });
    if let Err(why) = result {
        let _ = status.write_all(format!("E{why}").as_bytes());
    }
    // SAFETY: _exit ends this process without running Rust's cleanup.
    unsafe { libc::_exit(127) }
}

/// Puts `fds` at 0, 1, 2, … and closes every other descriptor (another
/// container's pipes forked along with us included). Those from 3 on close
/// on exec.
fn arrange_fds(fds: &[RawFd]) -> io::Result<()> {
    let mut high = [-1; 8];
    if fds.len() > high.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (slot, &fd) in high.iter_mut().zip(fds) {
        // SAFETY: F_DUPFD_CLOEXEC takes an fd and a lower bound.
        *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if *slot < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (target, &fd) in (0..).zip(&high[..fds.len()]) {
        // SAFETY: dup2 takes two descriptors.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if target >= 3 {
            // The status and start pipes (and a pidfd) close on exec.
            // SAFETY: F_SETFD takes an fd and flags.
            unsafe { libc::fcntl(target, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    let first_unused = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    // SAFETY: close_range takes a range of descriptors and flags.
    if unsafe { libc::syscall(libc::SYS_close_range, first_unused, u32::MAX, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn errno(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Where an exec's child keeps the init's pidfd until it has joined.
const JOIN_PIDFD: RawFd = 5;

/// Session, terminal, cgroup, namespaces and rootfs: what happens before
/// the process reports ready.
fn prepare(request: &SpawnRequest<'_>) -> Result<(), String> {
    // SAFETY: setsid takes no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(errno("setsid"));
    }
    std::fs::write(request.cgroup_procs, "0")
        .map_err(|e| format!("join cgroup {}: {e}", request.cgroup_procs.display()))?;
    match request.namespaces {
        Namespaces::New { flags, .. } => {
            // SAFETY: unshare takes flags only.
            if unsafe { libc::unshare(flags) } != 0 {
                return Err(errno("create namespaces"));
            }
        }
        Namespaces::Join { .. } => {
            // The init's pidfd is fd 5 here (see `child_main`).
            setns_pidfd(
                JOIN_PIDFD,
                libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS,
            )
            .map_err(|e| format!("join the container's namespaces: {e}"))?;
        }
    }
    if let Some(rootfs) = request.rootfs {
        rootfs
            .apply(&LinuxSyscall)
            .map_err(|e| capsid_protocol::error_chain(&e))?;
    }
    Ok(())
}

/// Opens a pty in the container's own /dev/pts (so `tty` and ttyname work
/// inside), makes it the controlling terminal and fds 0-2; returns the
/// master for the agent.
fn open_terminal() -> Result<OwnedFd, String> {
    // SAFETY: posix_openpt takes flags only.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(errno("open /dev/ptmx in the container"));
    }
    // SAFETY: a new descriptor that we now own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: unlockpt takes our master descriptor.
    if unsafe { libc::unlockpt(master.as_raw_fd()) } != 0 {
        return Err(errno("unlock the pty"));
    }
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: `name` is writable for its length.
    if unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) } != 0 {
        return Err(errno("name the pty"));
    }
    // SAFETY: `name` is NUL-terminated by ptsname_r.
    let slave = unsafe { libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
    if slave < 0 {
        return Err(errno("open the pty's slave"));
    }
    // SAFETY: TIOCSCTTY on the slave with argument 0; we lead our session.
    if unsafe { libc::ioctl(slave, libc::TIOCSCTTY, 0) } != 0 {
        return Err(errno("make the pty the controlling terminal"));
    }
    for target in 0..3 {
        // SAFETY: dup2 takes two descriptors.
        if unsafe { libc::dup2(slave, target) } < 0 {
            return Err(errno("put the pty on fds 0-2"));
        }
    }
    if slave > 2 {
        // SAFETY: closes our own extra copy.
        unsafe { libc::close(slave) };
    }
    Ok(master)
}

/// Every signal back to its default action and none blocked, as runc
/// leaves them: the agent's runtime ignores SIGPIPE, and an ignored signal
/// stays ignored across exec (`yes | head` would say "Broken pipe").
fn reset_signals() -> Result<(), String> {
    for signal in 1..=libc::SIGRTMAX() {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL installs no handler; glibc refuses the two
        // real-time signals it keeps for itself (EINVAL), which it never
        // lets be ignored either.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `none` is a valid sigset_t for both calls.
    let unblocked = unsafe {
        libc::sigemptyset(&raw mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut())
    };
    if unblocked != 0 {
        return Err(errno("unblock signals"));
    }
    Ok(())
}

/// Identity, limits, privileges, then exec. Runs in the container's root.
fn finish_and_exec(plan: &ProcessPlan) -> Result<(), String> {
    // Before a seccomp profile might refuse the calls.
    reset_signals()?;
    for &(resource, soft, hard) in &plan.rlimits {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `limit` is a valid rlimit.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(errno(&format!("setrlimit {resource}")));
        }
    }
    // Without no_new_privs, loading a filter needs CAP_SYS_ADMIN, which the
    // process may be about to lose: load it now (runc's order).
    if !plan.no_new_privs {
        load_seccomp(plan)?;
    }
    let caps = &plan.caps;
    for cap in caps::all() {
        if !caps.bounding.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let groups: Vec<libc::gid_t> = plan.additional_gids.clone();
    // SAFETY: the pointer and length describe `groups`.
    if unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } != 0 {
        return Err(errno("setgroups"));
    }
    // SAFETY: setresgid/setresuid take ids only.
    if unsafe { libc::setresgid(plan.gid, plan.gid, plan.gid) } != 0 {
        return Err(errno(&format!("setgid {}", plan.gid)));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(plan.uid, plan.uid, plan.uid) } != 0 {
        return Err(errno(&format!("setuid {}", plan.uid)));
    }
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    // Effective first (it must stay within permitted at every step),
    // inheritable while permitted is still wide, then permitted.
    caps::set(None, CapSet::Effective, &caps.effective)
        .map_err(|e| format!("set effective capabilities: {e}"))?;
    caps::set(None, CapSet::Inheritable, &caps.inheritable)
        .map_err(|e| format!("set inheritable capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &caps.permitted)
        .map_err(|e| format!("set permitted capabilities: {e}"))?;
    caps::set(None, CapSet::Ambient, &caps.ambient)
        .map_err(|e| format!("set ambient capabilities: {e}"))?;
    if let Some(umask) = plan.umask {
        // SAFETY: umask takes a mode only.
        unsafe { libc::umask(umask & 0o777) };
    }
    std::env::set_current_dir(&plan.cwd).map_err(|e| format!("cwd {}: {e}", plan.cwd.display()))?;
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(errno("set no_new_privs"));
        }
        load_seccomp(plan)?;
    }
    let program = find_program(plan)?;
    let mut argv: Vec<*const libc::c_char> = plan.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: `program` is NUL-terminated; argv and envp are null-terminated
    // arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(errno(&format!("exec {}", program.to_string_lossy())))
}

fn load_seccomp(plan: &ProcessPlan) -> Result<(), String> {
    match &plan.seccomp {
        Some(program) => program
            .load()
            .map_err(|e| format!("load the seccomp filter: {e}")),
        None => Ok(()),
    }
}

/// args[0], searched in the process's PATH when it has no slash.
fn find_program(plan: &ProcessPlan) -> Result<CString, String> {
    let name = plan.args[0].as_bytes();
    if name.contains(&b'/') {
        return Ok(plan.args[0].clone());
    }
    for dir in plan.path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(std::ffi::OsStr::from_bytes(name));
        let Ok(c) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        // SAFETY: `c` is NUL-terminated.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && candidate.is_file() {
            return Ok(c);
        }
    }
    Err(format!(
        "exec {}: not found in PATH {}",
        String::from_utf8_lossy(name),
        plan.path
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_process_starts_with_default_signal_actions_and_nothing_blocked() {
        // As the agent is: SIGPIPE ignored (Rust's runtime does it), and a
        // signal blocked and one handled for good measure.
        extern "C" fn handler(_: libc::c_int) {}
        // SAFETY: fork in a test; the child only makes signal calls, reads
        // its own state and calls _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain signal calls on this (child) process.
            let code = unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                libc::signal(libc::SIGUSR2, handler as *const () as libc::sighandler_t);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&raw mut set);
                libc::sigaddset(&raw mut set, libc::SIGUSR1);
                libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
                let reset = reset_signals().is_ok();
                let mut action: libc::sigaction = std::mem::zeroed();
                let mut dispositions_default = true;
                for signal in [libc::SIGPIPE, libc::SIGUSR2] {
                    libc::sigaction(signal, std::ptr::null(), &raw mut action);
                    dispositions_default &= action.sa_sigaction == libc::SIG_DFL;
                }
                let mut blocked: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &raw mut blocked);
                let none_blocked = libc::sigismember(&raw const blocked, libc::SIGUSR1) == 0;
                i32::from(!reset)
                    | i32::from(!dispositions_default) << 1
                    | i32::from(!none_blocked) << 2
            };
            // SAFETY: _exit ends the child without Rust's cleanup.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status));
        // 1: reset failed; 2: a signal still ignored or handled; 4: SIGUSR1
        // still blocked.
        assert_eq!(libc::WEXITSTATUS(status), 0);
    }

    #[test]
    fn a_full_process_spec_converts() {
        let plan = ProcessPlan::from_oci(
            &process(
                r#"{"args": ["sh", "-c", "id"], "cwd": "/tmp", "terminal": true,
                    "env": ["A=1", "PATH=/bin:/usr/bin"],
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 63},
                    "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 100, "hard": 200}],
                    "capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["CAP_KILL"],
                                     "permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"]},
                    "noNewPrivileges": true}"#,
            ),
            None,
        )
        .unwrap();
        assert_eq!(plan.path, "/bin:/usr/bin");
        assert_eq!(
            (plan.uid, plan.gid, plan.additional_gids.clone()),
            (1000, 1000, vec![2000])
        );
        assert_eq!(plan.umask, Some(63));
        assert_eq!(plan.rlimits, vec![(libc::RLIMIT_NOFILE, 100, 200)]);
        let caps = &plan.caps;
        assert_eq!(caps.bounding.len(), 2);
        assert!(caps.ambient.contains(&Capability::CAP_KILL));
        assert!(plan.no_new_privs && plan.terminal);
    }

    #[test]
    fn joining_through_the_pidfd_of_an_exited_init_fails_instead_of_joining_another() {
        // The old exec opened /proc/<init pid>/ns/*: once the init had
        // exited, that pid could be anyone's. A pidfd names one process.
        // SAFETY: fork in a test; the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        let pidfd = pidfd_open(pid).expect("pidfd_open");
        let mut status = 0;
        // SAFETY: reaps our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        let err = setns_pidfd(pidfd.as_raw_fd(), libc::CLONE_NEWUTS).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }

    #[test]
    fn a_process_without_capabilities_gets_none() {
        // Before the fix a spec that named no capabilities left the child
        // with the agent's full set: root in the container was root in the
        // guest.
        let plan = ProcessPlan::from_oci(
            &process(r#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#),
            None,
        )
        .unwrap();
        let caps = &plan.caps;
        for set in [
            &caps.bounding,
            &caps.effective,
            &caps.permitted,
            &caps.inheritable,
            &caps.ambient,
        ] {
            assert!(set.is_empty(), "{caps:?}");
        }
    }

    #[test]
    fn bad_process_specs_are_refused_with_the_reason() {
        for (json, reason) in [
            (
                r#"{"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                "args is empty",
            ),
            (
                r#"{"args": ["x"], "cwd": "rel", "user": {"uid": 0, "gid": 0}}"#,
                "not absolute",
            ),
            (
                r#"{"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["NOEQUALS"]}"#,
                "KEY=VALUE",
            ),
            (
                r#"{"args": ["x\u0000y"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                "NUL",
            ),
            (
                r#"{"args": ["x"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 2, "hard": 1}]}"#,
                "above hard",
            ),
        ] {
            let err = ProcessPlan::from_oci(&process(json), None).unwrap_err();
            assert!(err.to_string().contains(reason), "{json}: {err}");
        }
    }
}
