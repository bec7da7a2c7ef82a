//! The default seccomp profile for containers that do not bring one
//! (`capsid run`, and the OCI verbs on a spec without `linux.seccomp`): the
//! allowlist Docker and containerd apply by default, in the OCI form the
//! agent compiles. What it refuses matters most here: `socket(AF_VSOCK)`
//! (the agent's transport), the namespace-creating `clone` flags and
//! `unshare`/`setns`/`mount` without CAP_SYS_ADMIN, `bpf`, `ptrace`,
//! `kexec_load`, `keyctl`, `userfaultfd` and the other syscalls containers
//! have no business making. Refused calls fail with EPERM (clone3 with
//! ENOSYS, so libc falls back to `clone`, whose flags can be checked).

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// AF_VSOCK: the family of the agent's sockets.
const AF_VSOCK: u64 = 40;

/// Allowed to every container, whatever its capabilities (whitespace
/// separated; `socket`, `personality` and `clone` come with conditions
/// below). No 32-bit multiplexers (`socketcall`, `ipc`): their arguments
/// sit in memory, where the AF_VSOCK rule could not see them.
const ALLOWED: &str = "
    accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
    clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range
    creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2
    epoll_wait eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2
    fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown fchownat
    fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs
    fsync ftruncate futex futex_waitv futimesat get_robust_list get_thread_area getcpu
    getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer getpeername
    getpgid getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit
    getrusage getsid getsockname getsockopt gettid gettimeofday getuid getxattr
    inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy
    io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set kill lchown
    lgetxattr link linkat listen listxattr llistxattr lremovexattr lseek lsetxattr lstat
    madvise membarrier memfd_create mincore mkdir mkdirat mknod mknodat mlock mlock2
    mlockall mmap modify_ldt mprotect mq_getsetattr mq_notify mq_open mq_timedreceive
    mq_timedsend mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall
    munmap nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal
    pipe pipe2 poll ppoll prctl pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev
    pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg
    remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq
    rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
    rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min
    sched_getaffinity sched_getattr sched_getparam sched_getscheduler
    sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam
    sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop sendfile
    sendmmsg sendmsg sendto set_robust_list set_thread_area set_tid_address setfsgid
    setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
    setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget
    shutdown sigaltstack signalfd signalfd4 socketpair splice stat statfs statx symlink
    symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create
    timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
    timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime
    utimensat utimes vfork vmsplice wait4 waitid write writev
";

/// What a capability in the bounding set adds, as Docker does.
const WITH_CAPABILITY: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "mount",
            "mount_setattr",
            "move_mount",
            "name_to_handle_at",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "clock_settime", "clock_adjtime", "adjtimex"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &["get_mempolicy", "mbind", "set_mempolicy"],
    ),
    (Capability::Syslog, &["syslog"]),
];

/// The namespace flags of `clone` that need CAP_SYS_ADMIN.
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

fn rule(names: &[&str], action: LinuxSeccompAction) -> LinuxSyscall {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
        .action(action)
        .build()
        .unwrap_or_else(|_| unreachable_rule())
}

fn rule_with_arg(
    name: &str,
    index: usize,
    op: LinuxSeccompOperator,
    value: u64,
    value_two: Option<u64>,
) -> LinuxSyscall {
    let mut arg = LinuxSeccompArgBuilder::default();
    arg = arg.index(index).op(op).value(value);
    if let Some(two) = value_two {
        arg = arg.value_two(two);
    }
    let args = arg.build().map(|a| vec![a]).unwrap_or_default();
    LinuxSyscallBuilder::default()
        .names(vec![name.to_owned()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(args)
        .build()
        .unwrap_or_else(|_| unreachable_rule())
}

/// A rule that allows nothing (what a builder error, which cannot happen
/// with these fixed fields, would leave).
fn unreachable_rule() -> LinuxSyscall {
    LinuxSyscall::default()
}

/// Docker's default capabilities (moby's `oci/caps/defaults.go`).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The default profile for a container whose bounding set is `bounding`.
pub fn default_profile(bounding: &[Capability]) -> LinuxSeccomp {
    let allowed: Vec<&str> = ALLOWED.split_whitespace().collect();
    let mut syscalls = vec![rule(&allowed, LinuxSeccompAction::ScmpActAllow)];
    // The agent's transport stays out of reach, whatever else is allowed.
    syscalls.push(rule_with_arg(
        "socket",
        0,
        LinuxSeccompOperator::ScmpCmpNe,
        AF_VSOCK,
        None,
    ));
    // Only the execution domains programs use (Linux, and the variants
    // that ask for the uname or a 32-bit address space), and queries.
    for persona in [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff] {
        syscalls.push(rule_with_arg(
            "personality",
            0,
            LinuxSeccompOperator::ScmpCmpEq,
            persona,
            None,
        ));
    }
    let mut admin = false;
    for (capability, names) in WITH_CAPABILITY {
        if bounding.contains(capability) {
            admin |= *capability == Capability::SysAdmin;
            syscalls.push(rule(names, LinuxSeccompAction::ScmpActAllow));
        }
    }
    if admin {
        syscalls.push(rule(&["clone"], LinuxSeccompAction::ScmpActAllow));
    } else {
        syscalls.push(rule_with_arg(
            "clone",
            0,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
            NAMESPACE_FLAGS,
            Some(0),
        ));
    }
    // clone3's flags sit in memory seccomp cannot read: ENOSYS makes libc
    // use clone, whose flags the rule above checks.
    let mut clone3 = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno);
    clone3.set_errno_ret(Some(u32::try_from(libc::ENOSYS).unwrap_or(38)));
    syscalls.push(clone3);
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(u32::try_from(libc::EPERM).unwrap_or(1))
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(syscalls)
        .build()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(profile: &LinuxSeccomp, name: &str) -> bool {
        profile.syscalls().iter().flatten().any(|rule| {
            rule.action() == LinuxSeccompAction::ScmpActAllow
                && rule.names().iter().any(|n| n == name)
        })
    }

    #[test]
    fn vsock_sockets_namespaces_and_admin_calls_are_refused_by_default() {
        let profile = default_profile(&[Capability::Chown, Capability::Kill]);
        assert_eq!(profile.default_action(), LinuxSeccompAction::ScmpActErrno);
        for refused in [
            "mount",
            "unshare",
            "setns",
            "bpf",
            "ptrace",
            "kexec_load",
            "keyctl",
        ] {
            assert!(!allows(&profile, refused), "{refused}");
        }
        let socket: Vec<_> = profile
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.names().iter().any(|n| n == "socket"))
            .collect();
        assert_eq!(socket.len(), 1);
        let arg = &socket[0].args().as_ref().unwrap()[0];
        assert_eq!(
            (arg.index(), arg.op(), arg.value()),
            (0, LinuxSeccompOperator::ScmpCmpNe, AF_VSOCK)
        );
        let clone = profile
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names().iter().any(|n| n == "clone"))
            .unwrap();
        assert!(
            clone.args().is_some(),
            "clone is checked for namespace flags"
        );
        let with_admin = default_profile(&[Capability::SysAdmin]);
        assert!(allows(&with_admin, "mount") && allows(&with_admin, "unshare"));
    }

    #[test]
    fn what_every_program_calls_is_allowed() {
        // `id` printed uid=4294967295 when getuid was missing.
        let profile = default_profile(&[]);
        for name in [
            "getuid",
            "getgid",
            "geteuid",
            "read",
            "write",
            "execve",
            "exit_group",
            "openat",
            "mmap",
            "wait4",
        ] {
            assert!(allows(&profile, name), "{name}");
        }
    }

    #[test]
    fn the_profile_serialises_as_oci_json() {
        let json = serde_json::to_value(default_profile(&[])).unwrap();
        assert_eq!(json["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(json["defaultErrnoRet"], 1);
    }
}
