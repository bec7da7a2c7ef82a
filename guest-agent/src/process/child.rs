//! `capsid-init`: the agent binary executed again in a forked child
//! (`spawn.rs`), a fresh single-threaded process. It reads its plan,
//! enters the container (session, cgroup, namespaces, root), reports
//! ready, waits for start, then takes the process's identity, limits and
//! privileges and executes its program. It is not dumpable from its first
//! instruction to that exec: a container's processes, which may share its
//! PID namespace (an exec), cannot read or trace it while it is still
//! privileged.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use caps::CapSet;

use super::ProcessPlan;
use super::fds::send_with_fd;
use super::spawn::{ChildPlan, JOIN_PIDFD, MAX_PLAN, PLAN_FD, START_FD, STATUS_FD};
use crate::syscall::{LinuxSyscall, Syscall};

/// The child's `argv[0]`, by which the agent's `main` knows to run
/// [`main`] instead of serving.
pub const INIT_NAME: &str = "capsid-init";
pub(super) const INIT_NAME_C: &CStr = c"capsid-init";

fn errno(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Why `capsid-init` failed, as the agent is told: a status byte, then why.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// "E": anything before the exec.
    Setup(String),
    /// "N": the program is not there (a shell's 127).
    NotFound(String),
    /// "X": the program is there but cannot be executed (126).
    NotExecutable(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Self {
        Self::Setup(why)
    }
}

impl Failure {
    fn message(&self) -> Vec<u8> {
        let (kind, why) = match self {
            Self::Setup(why) => ('E', why),
            Self::NotFound(why) => ('N', why),
            Self::NotExecutable(why) => ('X', why),
        };
        format!("{kind}{why}").into_bytes()
    }

    /// A failed execve(2) of `program`, by its errno: ENOENT and ENOTDIR
    /// (the file, or a script's interpreter, is not there) are not found;
    /// anything else (EACCES, ENOEXEC, …) cannot be executed.
    fn of_exec(program: &str, error: &io::Error) -> Self {
        let why = format!("exec {program}: {error}");
        match error.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => Self::NotFound(why),
            _ => Self::NotExecutable(why),
        }
    }
}

/// `capsid-init`'s whole life; never returns. Errors go to the agent as
/// "E<why>" ("N" or "X" for the program; [`Failure`]) on the status
/// socket, then the process exits 127.
pub fn main() -> ! {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    // The program it executes inherits fds 0-2 only.
    for fd in [STATUS_FD, START_FD, PLAN_FD, JOIN_PIDFD] {
        // SAFETY: F_SETFD takes an fd and flags; an fd not open fails
        // with EBADF, which is harmless.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: fd 3 is the status socket, handed to us by the agent.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let result = read_plan()
        .map_err(Failure::from)
        .and_then(|plan| run(&plan, &mut status));
    if let Err(failure) = result {
        let _ = status.write_all(&failure.message());
    }
    // SAFETY: _exit ends this process without running Rust's cleanup.
    unsafe { libc::_exit(127) }
}

fn read_plan() -> Result<ChildPlan, String> {
    // SAFETY: fd 5 is the plan's memfd, handed to us by the agent.
    let file = unsafe { File::from_raw_fd(PLAN_FD) };
    let mut json = Vec::new();
    file.take(MAX_PLAN)
        .read_to_end(&mut json)
        .map_err(|e| format!("read the process plan: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("read the process plan: {e}"))
}

/// Enter the container, report ready, wait for start, exec.
fn run(plan: &ChildPlan, status: &mut File) -> Result<(), Failure> {
    prepare(&LinuxSyscall, plan)?;
    if plan.process.terminal {
        let master = open_terminal()?;
        send_with_fd(STATUS_FD, b'R', master.as_raw_fd())
            .map_err(|e| format!("report ready: {e}"))?;
    } else {
        status
            .write_all(b"R")
            .map_err(|e| format!("report ready: {e}"))?;
    }
    // SAFETY: fd 4 is the start pipe's read end, handed to us by the agent.
    let mut start = unsafe { File::from_raw_fd(START_FD) };
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
    finish_and_exec(&plan.process)
}

/// Session, cgroup, namespaces and rootfs: what happens before the
/// process reports ready.
fn prepare(sys: &impl Syscall, plan: &ChildPlan) -> Result<(), String> {
    sys.setsid().map_err(|e| format!("setsid: {e}"))?;
    sys.write_file(&plan.cgroup_procs, "0")
        .map_err(|e| format!("join cgroup {}: {e}", plan.cgroup_procs.display()))?;
    if let Some(kinds) = plan.join {
        sys.setns(JOIN_PIDFD, kinds)
            .map_err(|e| format!("join the pod's namespaces: {e}"))?;
    }
    match plan.unshare {
        Some(flags) => sys
            .unshare(flags)
            .map_err(|e| format!("create namespaces: {e}"))?,
        None => sys
            .setns(
                JOIN_PIDFD,
                libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS,
            )
            .map_err(|e| format!("join the container's namespaces: {e}"))?,
    }
    if let Some(rootfs) = &plan.rootfs {
        rootfs
            .apply(sys)
            .map_err(|e| capsid_base::error_chain(&e))?;
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
fn finish_and_exec(plan: &ProcessPlan) -> Result<(), Failure> {
    // Before a seccomp profile might refuse the calls.
    reset_signals()?;
    take_identity(&LinuxSyscall, plan)?;
    let program = find_program(plan)?;
    let mut argv: Vec<*const libc::c_char> = plan.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: `program` is NUL-terminated; argv and envp are null-terminated
    // arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(Failure::of_exec(
        &program.to_string_lossy(),
        &io::Error::last_os_error(),
    ))
}

/// The process's limits, ids and privileges, in runc's order: rlimits;
/// the seccomp filter now if it cannot wait for no_new_privs (loading it
/// needs CAP_SYS_ADMIN then, which may be about to go); the bounding set;
/// groups, gid, uid (the permitted set kept across); the capability sets,
/// effective first (it must stay within permitted at every step),
/// inheritable while permitted is still wide, then permitted and
/// ambient; umask and cwd; no_new_privs, then the filter.
fn take_identity(sys: &impl Syscall, plan: &ProcessPlan) -> Result<(), String> {
    for &(resource, soft, hard) in &plan.rlimits {
        sys.set_rlimit(resource, soft, hard)
            .map_err(|e| format!("setrlimit {resource}: {e}"))?;
    }
    let seccomp = || match &plan.seccomp {
        Some(program) => sys
            .load_seccomp(program)
            .map_err(|e| format!("load the seccomp filter: {e}")),
        None => Ok(()),
    };
    if !plan.no_new_privs {
        seccomp()?;
    }
    let caps = &plan.caps;
    for cap in caps::all() {
        if !caps.bounding.contains(&cap) {
            sys.drop_bounding(cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
    }
    sys.keep_caps(true)
        .map_err(|e| format!("keep capabilities: {e}"))?;
    sys.set_groups(&plan.additional_gids)
        .map_err(|e| format!("setgroups: {e}"))?;
    sys.set_gid(plan.gid)
        .map_err(|e| format!("setgid {}: {e}", plan.gid))?;
    sys.set_uid(plan.uid)
        .map_err(|e| format!("setuid {}: {e}", plan.uid))?;
    sys.keep_caps(false)
        .map_err(|e| format!("keep capabilities: {e}"))?;
    for (set, name, wanted) in [
        (CapSet::Effective, "effective", &caps.effective),
        (CapSet::Inheritable, "inheritable", &caps.inheritable),
        (CapSet::Permitted, "permitted", &caps.permitted),
        (CapSet::Ambient, "ambient", &caps.ambient),
    ] {
        sys.set_caps(set, wanted)
            .map_err(|e| format!("set {name} capabilities: {e}"))?;
    }
    if let Some(umask) = plan.umask {
        sys.set_umask(umask);
    }
    sys.chdir(&plan.cwd)
        .map_err(|e| format!("cwd {}: {e}", plan.cwd.display()))?;
    if plan.no_new_privs {
        sys.set_no_new_privs()
            .map_err(|e| format!("set no_new_privs: {e}"))?;
        seccomp()?;
    }
    Ok(())
}

/// args[0], searched in the process's PATH when it has no slash.
fn find_program(plan: &ProcessPlan) -> Result<CString, Failure> {
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
    Err(Failure::NotFound(format!(
        "exec {}: not found in PATH {}",
        String::from_utf8_lossy(name),
        plan.path
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::recording::RecordingSyscall;

    #[test]
    fn a_program_not_there_and_one_that_cannot_run_are_told_apart() {
        // Before, every failure was "E<why>", and the host guessed 127 or
        // 126 from the words.
        let not_found = Failure::of_exec("/x", &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(
            not_found,
            Failure::NotFound("exec /x: No such file or directory (os error 2)".into())
        );
        assert_eq!(
            Failure::of_exec("/x/y", &io::Error::from_raw_os_error(libc::ENOTDIR)).message()[0],
            b'N'
        );
        for errno in [libc::EACCES, libc::ENOEXEC, libc::EISDIR, libc::ETXTBSY] {
            let failure = Failure::of_exec("/bin", &io::Error::from_raw_os_error(errno));
            assert!(matches!(failure, Failure::NotExecutable(_)), "{errno}");
            assert_eq!(failure.message()[0], b'X');
        }
        assert_eq!(
            Failure::from("setsid: EPERM".to_owned()).message(),
            b"Esetsid: EPERM"
        );
        let plan = plan(
            r#"{"args": ["no-such-program"], "cwd": "/", "env": ["PATH=/nonexistent:/bin"],
                "user": {"uid": 0, "gid": 0}}"#,
            false,
        );
        assert!(matches!(find_program(&plan), Err(Failure::NotFound(_))));
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

    fn plan(json: &str, seccomp: bool) -> ProcessPlan {
        let process: oci_spec::runtime::Process = serde_json::from_str(json).unwrap();
        let profile: oci_spec::runtime::LinuxSeccomp =
            serde_json::from_str(r#"{"defaultAction": "SCMP_ACT_ALLOW"}"#).unwrap();
        ProcessPlan::from_oci(&process, seccomp.then_some(&profile)).unwrap()
    }

    /// The calls in order, the bounding-set drops counted as one step.
    fn steps(sys: &RecordingSyscall) -> Vec<String> {
        let mut steps: Vec<String> = Vec::new();
        for call in sys.calls() {
            let call = if call.starts_with("drop bounding") {
                "drop bounding …".to_owned()
            } else {
                call
            };
            if steps.last() != Some(&call) {
                steps.push(call);
            }
        }
        steps
    }

    #[test]
    fn a_process_takes_its_identity_in_runc_order() {
        let sys = RecordingSyscall::default();
        let plan = plan(
            r#"{"args": ["id"], "cwd": "/work", "noNewPrivileges": true,
                "user": {"uid": 1000, "gid": 100, "additionalGids": [10, 20], "umask": 18},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                    "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []}}"#,
            true,
        );
        take_identity(&sys, &plan).unwrap();
        assert_eq!(
            steps(&sys),
            [
                format!("setrlimit {} 1024 4096", libc::RLIMIT_NOFILE),
                "drop bounding …".into(),
                "keepcaps true".into(),
                "setgroups [10, 20]".into(),
                "setgid 100".into(),
                "setuid 1000".into(),
                "keepcaps false".into(),
                "caps Effective CAP_KILL".into(),
                "caps Inheritable ".into(),
                "caps Permitted CAP_KILL".into(),
                "caps Ambient ".into(),
                "umask 0o22".into(),
                "chdir /work".into(),
                "no_new_privs".into(),
                "seccomp".into(),
            ]
        );
        // Every capability but the one kept leaves the bounding set.
        let dropped = sys
            .calls()
            .iter()
            .filter(|c| c.starts_with("drop bounding"))
            .count();
        assert_eq!(dropped, caps::all().len() - 1);
        assert!(!sys.calls().contains(&"drop bounding CAP_KILL".to_owned()));
    }

    #[test]
    fn without_no_new_privs_the_filter_is_loaded_while_the_process_may_still_do_so() {
        let sys = RecordingSyscall::default();
        let plan = plan(
            r#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
            true,
        );
        take_identity(&sys, &plan).unwrap();
        let steps = steps(&sys);
        assert_eq!(steps[0], "seccomp", "{steps:?}");
        assert_eq!(steps[1], "drop bounding …");
        assert!(!steps.contains(&"no_new_privs".to_owned()));
        assert_eq!(steps.iter().filter(|s| *s == "seccomp").count(), 1);
    }

    #[test]
    fn an_init_joins_its_cgroup_then_makes_its_namespaces_and_an_exec_joins_the_inits() {
        let sys = RecordingSyscall::default();
        let child = |unshare, join| ChildPlan {
            process: plan(
                r#"{"args": ["id"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#,
                false,
            ),
            unshare,
            join,
            rootfs: None,
            cgroup_procs: "/sys/fs/cgroup/c1/cgroup.procs".into(),
        };
        prepare(
            &sys,
            &child(Some(libc::CLONE_NEWNS | libc::CLONE_NEWUTS), None),
        )
        .unwrap();
        prepare(&sys, &child(None, None)).unwrap();
        // A pod's container: its sandbox's IPC and UTS, then its own mounts.
        let shared = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        prepare(&sys, &child(Some(libc::CLONE_NEWNS), Some(shared))).unwrap();
        let joined =
            libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS;
        assert_eq!(
            sys.calls(),
            [
                "setsid".to_owned(),
                "write /sys/fs/cgroup/c1/cgroup.procs 0".to_owned(),
                format!("unshare {:#x}", libc::CLONE_NEWNS | libc::CLONE_NEWUTS),
                "setsid".to_owned(),
                "write /sys/fs/cgroup/c1/cgroup.procs 0".to_owned(),
                format!("setns {JOIN_PIDFD} {joined:#x}"),
                "setsid".to_owned(),
                "write /sys/fs/cgroup/c1/cgroup.procs 0".to_owned(),
                format!("setns {JOIN_PIDFD} {shared:#x}"),
                format!("unshare {:#x}", libc::CLONE_NEWNS),
            ]
        );
    }
}
