//! Confinement: how `capsid-vmm`, started as root by the runtime, walls
//! itself in before it reads a byte the guest wrote. Firecracker's jailer
//! does this as a separate program that then execs the VMM; here the VMM
//! does it to itself, at the top of `main`, while it is still one thread
//! with nothing of the guest's running — so the steps that need root
//! (opening `/dev/kvm`, the images, the log files; namespaces; mounts) are
//! done, then root is given up for good.
//!
//! ```text
//!  capsid-vmm (root, one thread)
//!   ├─ open /dev/kvm, kernel, initrd, disks, log and console files
//!   ├─ join the VM's cgroup (memory.max, pids.max: made by the runtime)
//!   ├─ unshare(PID) + fork ──────────────────────────────┐
//!   │                                                    ▼
//!   │  keeper (host PID namespace)            VMM (PID 1 of a new namespace)
//!   │   uid/gid of the jail, no caps,          unshare(mount, IPC, UTS, net)
//!   │   no_new_privs, seccomp "keeper":        root = empty read-only tmpfs,
//!   │   forwards SIGTERM/INT/HUP, exits        /vm = the VM's directory
//!   │   with the VMM's status                  (pivot_root), rlimits,
//!   │                                          uid/gid of the jail, no caps,
//!   │                                          no_new_privs, not dumpable,
//!   │                                          Landlock (/vm: make sockets,
//!   │                                          remove files; nothing else),
//!   │                                          then build the VM; each
//!   │                                          thread installs its seccomp
//! ```
//!
//! `/dev/kvm` access: the VMM opens it while still root, and keeps the
//! descriptor; the jail has no `/dev` at all. Nothing of the host's file
//! system is visible after the pivot but the VM's own directory.
//!
//! On a host whose root is the initial ramfs (as our nested test host's),
//! `pivot_root` is refused (EINVAL); the new root is then moved over `/`
//! and entered with `chroot`, runc's `--no-pivot` way. With every
//! capability gone, the chroot cannot be left.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the VM's directory appears inside the jail.
pub const JAIL_VM_DIR: &str = "/vm";

/// How to confine the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    /// The VM's directory on the host (made by the runtime, owned by `uid`,
    /// mode 0700); it becomes `/vm` in the jail, and is all the VMM sees.
    pub dir: PathBuf,
    /// The unprivileged user the VMM becomes.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// A cgroup v2 directory made for this VM, which the VMM joins.
    pub cgroup: Option<PathBuf>,
    /// The largest file the VMM may write (its writable disks, its logs).
    pub max_file_bytes: u64,
    /// How many threads the VMM's user may run (its vCPUs, workers, API).
    pub max_threads: u64,
}

/// Which side of the fork the caller is on.
#[derive(Debug)]
pub enum Role {
    /// Outside the PID namespace: wait for `vmm`, forward signals to it.
    Keeper {
        /// The VMM's pid (in the keeper's namespace).
        vmm: libc::pid_t,
    },
    /// Inside every wall: go on and run the VM.
    Vmm,
}

/// Why the VMM cannot confine itself.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The `--jail` setting is invalid.
    #[error("--jail {0}: {1}")]
    Config(PathBuf, &'static str),
    /// The cgroup cannot be joined.
    #[error("cannot join cgroup {0}")]
    Cgroup(PathBuf, #[source] std::io::Error),
    /// A system call failed.
    #[error("cannot {0}")]
    Sys(&'static str, #[source] std::io::Error),
    /// Asked to run as root.
    #[error("the VMM must not run as root: give --uid and --gid of an unprivileged user")]
    Root,
    /// Landlock rules cannot be applied.
    #[error("Landlock")]
    Landlock(#[source] landlock::RulesetError),
}

fn check(what: &'static str, result: libc::c_int) -> Result<(), JailError> {
    if result < 0 {
        return Err(JailError::Sys(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::Config(path.to_owned(), "the path holds a NUL byte"))
}

/// `path` as the jailed VMM sees it: under [`JAIL_VM_DIR`] when it is in
/// the VM's directory `dir`; `None` when it is outside it.
pub fn inside(dir: &Path, path: &Path) -> Option<PathBuf> {
    let rest = path.strip_prefix(dir).ok()?;
    Some(Path::new(JAIL_VM_DIR).join(rest))
}

/// Closes every descriptor above 2 but those in `keep` (the taps the
/// launcher passed): the VMM starts with only what it opens itself and
/// what it was handed on purpose.
pub fn close_inherited_fds(keep: &[i32]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .filter(|fd| *fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let close = |first: u32, last: u32| {
        // SAFETY: close_range takes a range of descriptors and flags;
        // nothing above 2 is ours yet but the descriptors kept.
        if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    let mut from = 3u32;
    for fd in keep {
        if fd > from {
            close(from, fd - 1)?;
        }
        from = fd + 1;
    }
    close(from, u32::MAX)?;
    Ok(())
}

/// Confines the calling process (which must be single-threaded and root)
/// as the module documentation tells. Returns twice, as fork does.
pub fn enter(config: &JailConfig) -> Result<Role, JailError> {
    if config.uid == 0 || config.gid == 0 {
        return Err(JailError::Root);
    }
    let dir = cstring(&config.dir)?;
    if let Some(cgroup) = &config.cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), "0")
            .map_err(|e| JailError::Cgroup(cgroup.clone(), e))?;
    }
    // The keeper holds the write end: the VMM sees EOF once it is gone.
    let (alive_read, alive_write) = pipe()?;
    // SAFETY: unshare takes flags only.
    check("create a PID namespace", unsafe {
        libc::unshare(libc::CLONE_NEWPID)
    })?;
    // SAFETY: the process is single-threaded (checked by the caller's
    // design: no thread is started before the jail), so the child may run
    // Rust code.
    let pid = unsafe { libc::fork() };
    check("fork into the PID namespace", pid)?;
    if pid > 0 {
        drop(alive_read);
        std::mem::forget(alive_write);
        drop_identity(config)?;
        harden()?;
        return Ok(Role::Keeper { vmm: pid });
    }
    drop(alive_write);
    let namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP;
    // SAFETY: unshare takes flags only.
    let unshared = unsafe { libc::unshare(namespaces) };
    check(
        "create mount, IPC, UTS, network and cgroup namespaces",
        unshared,
    )?;
    make_root(&dir)?;
    let name = b"capsid-vmm";
    // SAFETY: `name` is valid for its length.
    check("set the hostname", unsafe {
        libc::sethostname(name.as_ptr().cast(), name.len())
    })?;
    set_limits(config)?;
    drop_identity(config)?;
    harden()?;
    // Die with the keeper, and make sure it did not die already.
    // SAFETY: prctl with integer arguments.
    check("set the parent-death signal", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    set_nonblocking(&alive_read)?;
    let mut probe = [0u8; 1];
    if let Ok(0) = File::from(alive_read).read(&mut probe) {
        return Err(JailError::Sys(
            "start: the keeper is gone",
            std::io::ErrorKind::BrokenPipe.into(),
        ));
    }
    restrict_paths()?;
    Ok(Role::Vmm)
}

/// SIGKILL for the calling process when `launcher`, its parent, dies; an
/// error if it died already (the launcher names itself: asking getppid()
/// at start would name whoever adopted us if it died before we asked). Changing the process's user or group clears
/// this, so it is set after [`enter`] (in the keeper; the VMM dies with
/// the keeper).
pub fn die_with(launcher: libc::pid_t) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check("set the parent-death signal", unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0)
    })?;
    // SAFETY: getppid takes no arguments and cannot fail.
    if unsafe { libc::getppid() } != launcher {
        return Err(JailError::Sys(
            "start: the process that started capsid-vmm is gone",
            std::io::ErrorKind::BrokenPipe.into(),
        ));
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check("create a pipe", unsafe {
        libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC)
    })?;
    // SAFETY: pipe2 returned two new descriptors that we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), JailError> {
    // SAFETY: F_SETFL on our own descriptor.
    check("set O_NONBLOCK", unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK)
    })
}

fn mount(
    what: &'static str,
    source: Option<&OsStr>,
    target: &CString,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let source = source.map(|s| CString::new(s.as_bytes()).unwrap_or_default());
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that
    // outlives the call.
    check(what, unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// The new root: an empty tmpfs over `dir` (in our own mount namespace,
/// so the host sees nothing), holding `/vm`, a bind mount of what `dir`
/// held; then pivot into it and make it read-only.
fn make_root(dir: &CString) -> Result<(), JailError> {
    let slash = CString::new("/").unwrap_or_default();
    // Nothing mounted from here on propagates to the host.
    mount(
        "make mounts private",
        None,
        &slash,
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    // SAFETY: `dir` is NUL-terminated; O_PATH opens no file for reading.
    let vm = unsafe {
        libc::open(
            dir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    check("open the VM's directory", vm)?;
    // SAFETY: a new descriptor that we now own.
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    let quiet = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount(
        "mount the jail's root",
        Some(OsStr::new("tmpfs")),
        dir,
        Some("tmpfs"),
        quiet,
        Some("size=16k,nr_inodes=8,mode=0755"),
    )?;
    let mut inner = dir.as_bytes().to_vec();
    inner.extend_from_slice(JAIL_VM_DIR.as_bytes());
    let inner = CString::new(inner).unwrap_or_default();
    // SAFETY: `inner` is NUL-terminated.
    check("make /vm", unsafe { libc::mkdir(inner.as_ptr(), 0o755) })?;
    let source = format!("/proc/self/fd/{}", vm.as_raw_fd());
    mount(
        "bind the VM's directory",
        Some(OsStr::new(&source)),
        &inner,
        None,
        libc::MS_BIND,
        None,
    )?;
    mount(
        "restrict /vm",
        None,
        &inner,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | quiet,
        None,
    )?;
    drop(vm);
    // SAFETY: `dir` is NUL-terminated.
    check("enter the jail's root", unsafe {
        libc::chdir(dir.as_ptr())
    })?;
    let dot = CString::new(".").unwrap_or_default();
    // SAFETY: two NUL-terminated paths.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if pivoted == 0 {
        // The old root is stacked under the new one: detach it.
        // SAFETY: a NUL-terminated path and flags.
        check("detach the old root", unsafe {
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
        })?;
    } else {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINVAL) {
            return Err(JailError::Sys("pivot_root", error));
        }
        // The root is the initial ramfs, which cannot be pivoted away.
        mount(
            "move the jail's root over /",
            Some(OsStr::new(".")),
            &slash,
            None,
            libc::MS_MOVE,
            None,
        )?;
        // SAFETY: a NUL-terminated path.
        check("chroot into the jail", unsafe {
            libc::chroot(dot.as_ptr())
        })?;
    }
    // SAFETY: a NUL-terminated path.
    check("enter /", unsafe { libc::chdir(slash.as_ptr()) })?;
    mount(
        "make the root read-only",
        None,
        &slash,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | quiet,
        None,
    )
}

fn set_limits(config: &JailConfig) -> Result<(), JailError> {
    let limits = [
        (libc::RLIMIT_NOFILE, 1024),
        (libc::RLIMIT_FSIZE, config.max_file_bytes),
        (libc::RLIMIT_NPROC, config.max_threads),
        // Guest memory never lands in a core file.
        (libc::RLIMIT_CORE, 0),
    ];
    for (resource, value) in limits {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit.
        check("set a resource limit", unsafe {
            libc::setrlimit(resource, &limit)
        })?;
    }
    Ok(())
}

/// The jail's user and group, no supplementary groups, no capability in
/// any set.
fn drop_identity(config: &JailConfig) -> Result<(), JailError> {
    use caps::CapSet;
    // SAFETY: an empty group list.
    check("drop supplementary groups", unsafe {
        libc::setgroups(0, std::ptr::null())
    })?;
    // The bounding set needs CAP_SETPCAP, so before the uid changes.
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap)
            .map_err(|e| JailError::Sys("drop a bounding capability", std::io::Error::other(e)))?;
    }
    // SAFETY: setresgid/setresuid take ids only.
    check("set the group", unsafe {
        libc::setresgid(config.gid, config.gid, config.gid)
    })?;
    // SAFETY: as above. With every id non-zero, the kernel clears the
    // permitted, effective and ambient sets.
    check("set the user", unsafe {
        libc::setresuid(config.uid, config.uid, config.uid)
    })?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| JailError::Sys("clear inheritable capabilities", std::io::Error::other(e)))?;
    let left = caps::read(None, CapSet::Permitted)
        .map_err(|e| JailError::Sys("read capabilities", std::io::Error::other(e)))?;
    if !left.is_empty() {
        return Err(JailError::Sys(
            "drop every capability",
            std::io::Error::other(format!("{left:?} remain")),
        ));
    }
    Ok(())
}

/// no_new_privs (no setuid binary, no file capability can give anything
/// back; required by seccomp and Landlock), and not dumpable (no core, no
/// ptrace by the same user, /proc entries owned by root).
fn harden() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    check("set no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    // SAFETY: as above.
    check("make the process undumpable", unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0)
    })
}

/// Landlock, the second wall around the file system: in `/vm`, sockets
/// may be made and files removed; nothing else may be opened, made or
/// changed anywhere; no TCP. Best effort: an older kernel enforces what it
/// knows, a kernel without Landlock nothing (`capsid doctor` says which).
fn restrict_paths() -> Result<(), JailError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr,
        RulesetCreatedAttr,
    };
    let abi = ABI::V5;
    let vm = PathFd::new(JAIL_VM_DIR)
        .map_err(|e| JailError::Sys("open /vm", std::io::Error::other(e)))?;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rule(PathBeneath::new(
                vm,
                AccessFs::MakeSock | AccessFs::RemoveFile,
            ))
        })
        .and_then(|r| r.restrict_self())
        .map_err(JailError::Landlock)?;
    tracing::debug!(?status, "Landlock");
    Ok(())
}

/// Whether Landlock can be enforced on this kernel, and at which ABI.
pub fn landlock_abi() -> Option<i32> {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute only
    // asks for the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    i32::try_from(abi).ok().filter(|&abi| abi > 0)
}

/// The keeper's life: with `signals` blocked (SIGTERM, SIGINT, SIGHUP and
/// SIGCHLD), forward the first three to `vmm`, and when it ends, end the
/// same way. Never returns.
pub fn keep(vmm: libc::pid_t) -> ! {
    let mut set = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD]);
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    loop {
        // SAFETY: `set` is valid; no siginfo wanted.
        let signal = unsafe { libc::sigwaitinfo(&raw mut set, std::ptr::null_mut()) };
        if signal > 0 && signal != libc::SIGCHLD {
            // SAFETY: kill takes a pid and a signal.
            unsafe { libc::kill(vmm, signal) };
            continue;
        }
        let mut status = 0;
        // SAFETY: `status` is writable; WNOHANG never blocks.
        let reaped = unsafe { libc::waitpid(vmm, &raw mut status, libc::WNOHANG) };
        if reaped != vmm {
            continue;
        }
        if libc::WIFEXITED(status) {
            // SAFETY: _exit ends the process.
            unsafe { libc::_exit(libc::WEXITSTATUS(status)) };
        }
        let signal = libc::WTERMSIG(status);
        // Die of the same signal, so the launcher sees what happened.
        // SAFETY: plain signal calls on ourselves; SIG_DFL then kill.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let one = signal_set(&[signal]);
            libc::sigprocmask(libc::SIG_UNBLOCK, &raw const one, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
    }
}

/// A signal set holding `signals`.
pub fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for both calls.
    unsafe {
        libc::sigemptyset(&raw mut set);
        for &signal in signals {
            libc::sigaddset(&raw mut set, signal);
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_in_the_vm_directory_map_under_vm() {
        let dir = Path::new("/run/capsid/vm/vm-1");
        assert_eq!(
            inside(dir, Path::new("/run/capsid/vm/vm-1/vsock.sock")),
            Some(PathBuf::from("/vm/vsock.sock"))
        );
        assert_eq!(inside(dir, Path::new("/run/capsid/vm/vm-2/x")), None);
        assert_eq!(inside(dir, Path::new("/tmp/x")), None);
    }

    #[test]
    fn a_process_dies_with_the_process_that_started_it_even_of_a_sigkill() {
        let (read, write) = pipe().unwrap();
        // SAFETY: fork in a test; the child only forks, sleeps and exits.
        let launcher = unsafe { libc::fork() };
        assert!(launcher >= 0);
        if launcher == 0 {
            // SAFETY: as above; the grandchild makes plain calls and exits.
            if unsafe { libc::fork() } == 0 {
                // SAFETY: getppid takes no arguments.
                let parent = unsafe { libc::getppid() };
                if die_with(parent).is_ok() {
                    // SAFETY: one byte from a local to our pipe.
                    unsafe { libc::write(write.as_raw_fd(), b"A".as_ptr().cast(), 1) };
                }
                // SAFETY: sleep and _exit take integers.
                unsafe {
                    libc::sleep(30);
                    libc::_exit(0)
                };
            }
            // SAFETY: as above.
            unsafe {
                libc::sleep(30);
                libc::_exit(0)
            };
        }
        drop(write);
        let mut read = File::from(read);
        let mut armed = [0u8];
        assert_eq!(read.read(&mut armed).unwrap(), 1);
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(launcher, libc::SIGKILL);
            libc::waitpid(launcher, std::ptr::null_mut(), 0);
        }
        // The grandchild's end of the pipe closes when it dies.
        let mut poll = libc::pollfd {
            fd: read.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, 5000) };
        assert_eq!(ready, 1, "the grandchild outlived its launcher by 5 s");
        assert_eq!(read.read(&mut armed).unwrap(), 0);
    }

    #[test]
    fn root_is_refused() {
        let config = JailConfig {
            dir: "/nonexistent".into(),
            uid: 0,
            gid: 0,
            cgroup: None,
            max_file_bytes: 1 << 20,
            max_threads: 64,
        };
        assert!(matches!(enter(&config), Err(JailError::Root)));
    }
}
