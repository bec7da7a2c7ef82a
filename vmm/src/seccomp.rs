//! Per-thread seccomp allowlists (rust-vmm's `seccompiler`), Firecracker's
//! model: each kind of thread the VMM runs gets the syscalls it needs and
//! nothing else, most with their arguments pinned (ioctl request numbers,
//! socket families, no `PROT_EXEC` mappings, signals only to ourselves).
//! Anything else kills the whole process (`SECCOMP_RET_KILL_PROCESS`), or,
//! with `--seccomp log`, is allowed and logged by the kernel's audit
//! (`type=1326 … syscall=N` in `dmesg`), to find what a filter misses.
//!
//! ```text
//!  thread    what it does after its filter is on
//!  main      waits for the end (poll on an eventfd and a signalfd), kicks and
//!            joins the vCPUs, removes its sockets, frees everything
//!  vcpu      KVM_RUN; port and MMIO exits: device registers, eventfds, the
//!            console file
//!  worker    a device's queues: epoll, eventfds, disk reads and writes, and
//!            for vsock its Unix sockets (AF_UNIX only)
//!  api       the API socket: accept, a request with a descriptor, the reply
//!  keeper    (outside the PID namespace) waits for the VMM, forwards signals
//! ```
//!
//! No filter allows `clone`, `execve`, `open`, `openat` or `ptrace`: every
//! thread exists before filters go on (see `devices::virtio::worker`), and
//! everything the VMM opens by path is opened before it confines itself.
//! Filters apply per thread (no `TSYNC`), and the main thread installs its
//! own last, once it has started every other thread, so no thread inherits
//! a filter it did not ask for.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::builder::ThreadInits;
use crate::devices::virtio::ThreadInit;

/// What a syscall outside a filter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// Kill the process (the default).
    #[default]
    Kill,
    /// Allow it and let the kernel log it (audit type 1326): for finding
    /// what a filter misses, never for production.
    Log,
    /// No filters at all.
    None,
}

/// The kinds of thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread (signals, the VM's end).
    Main,
    /// A vCPU thread (`KVM_RUN`, port and MMIO exits).
    Vcpu,
    /// A device worker thread (queues, disk and socket I/O).
    Worker,
    /// The API thread (attach and detach).
    Api,
    /// The keeper outside the PID namespace (waits and forwards signals).
    Keeper,
}

impl ThreadKind {
    pub(crate) const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Worker,
        ThreadKind::Api,
        ThreadKind::Keeper,
    ];
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A filter cannot be compiled.
    #[error("cannot compile the {0:?} thread's seccomp filter")]
    Compile(ThreadKind, #[source] seccompiler::BackendError),
    /// A filter cannot be installed.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// A syscall's rule: allowed whatever its arguments, or only when one of
/// the argument patterns matches.
enum Rule {
    Any,
    /// Each inner list is one alternative; its conditions all must hold.
    When(Vec<Vec<(u8, SeccompCmpOp, u64)>>),
}

type Rules = BTreeMap<i64, Rule>;

fn allow(rules: &mut Rules, syscalls: &[libc::c_long]) {
    for &nr in syscalls {
        rules.insert(nr, Rule::Any);
    }
}

/// `syscall(arg == value)` for each value, beside what is allowed already.
fn allow_arg(rules: &mut Rules, nr: libc::c_long, arg: u8, values: &[u64]) {
    let alternatives = values.iter().map(|&v| vec![(arg, SeccompCmpOp::Eq, v)]);
    match rules.entry(nr).or_insert_with(|| Rule::When(Vec::new())) {
        Rule::Any => {}
        Rule::When(existing) => existing.extend(alternatives),
    }
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

// The ioctl request numbers we allow, built as the kernel headers do
// (in a module of their own: the macros make public functions).
mod nr {
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, kvm_bindings::KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_REGS,
        kvm_bindings::KVMIO,
        0x81,
        kvm_bindings::kvm_regs
    );
    vmm_sys_util::ioctl_ior_nr!(
        KVM_GET_SREGS,
        kvm_bindings::KVMIO,
        0x83,
        kvm_bindings::kvm_sregs
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_GSI_ROUTING,
        kvm_bindings::KVMIO,
        0x6a,
        kvm_bindings::kvm_irq_routing
    );
    // What a snapshot reads (the main thread, the vCPUs stopped).
    use kvm_bindings::*;
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

    /// Every ioctl a snapshot makes.
    pub fn snapshot() -> [u64; 15] {
        [
            KVM_RUN(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSR_INDEX_LIST(),
            KVM_GET_IRQCHIP(),
            KVM_GET_CLOCK(),
            KVM_GET_PIT2(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]
    }
}
use nr::{KVM_GET_REGS, KVM_GET_SREGS, KVM_RUN, KVM_SET_GSI_ROUTING};

/// What every thread of ours needs once running: memory (never
/// executable), locks and channels (`futex`, `sched_yield` in their
/// backoff), time (`clock_gettime` where the vDSO cannot serve it),
/// logging (the log file is kept bounded in place: `lseek`, `pread64`,
/// `pwrite64`, `ftruncate`), and leaving the thread (`sigaltstack`,
/// `rt_sigprocmask`, `exit`).
fn common(rules: &mut Rules) {
    allow(
        rules,
        &[
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_madvise,
            libc::SYS_brk,
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_clock_gettime,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            libc::SYS_exit,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_ftruncate,
        ],
    );
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(
            nr,
            Rule::When(vec![vec![(2, SeccompCmpOp::MaskedEq(PROT_EXEC), 0)]]),
        );
    }
    // Through to the second filter, which fails them (REFUSED_QUIETLY).
    allow(rules, &REFUSED_QUIETLY);
    if cfg!(debug_assertions) {
        // Rust's standard library checks a descriptor before it closes it
        // in debug builds.
        allow_arg(rules, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
    }
}

fn rules(kind: ThreadKind, pid: u32) -> Rules {
    let mut rules = Rules::new();
    if kind != ThreadKind::Keeper {
        common(&mut rules);
    }
    match kind {
        ThreadKind::Main => {
            // Waiting (an eventfd and a signalfd), kicking and joining the
            // vCPUs (pthread_kill: getpid + tgkill, to ourselves only),
            // removing its sockets, ending the process.
            allow(
                &mut rules,
                &[
                    libc::SYS_read,
                    libc::SYS_poll,
                    libc::SYS_clock_nanosleep,
                    libc::SYS_getpid,
                    libc::SYS_unlink,
                    libc::SYS_exit_group,
                ],
            );
            allow_arg(&mut rules, libc::SYS_tgkill, 0, &[u64::from(pid)]);
            // A snapshot, asked for through the API: KVM's state of the
            // stopped vCPUs and of the VM, written to the files the request
            // brought.
            allow_arg(&mut rules, libc::SYS_ioctl, 1, &nr::snapshot());
            allow(&mut rules, &[libc::SYS_fsync]);
        }
        ThreadKind::Vcpu => {
            allow_arg(
                &mut rules,
                libc::SYS_ioctl,
                1,
                // The split irqchip's IOAPIC sets its routes on an MMIO exit.
                &[
                    KVM_RUN(),
                    KVM_GET_REGS(),
                    KVM_GET_SREGS(),
                    KVM_SET_GSI_ROUTING(),
                ],
            );
            // The kick's handler returns; a kick may interrupt a timed wait
            // for a worker's answer.
            allow(
                &mut rules,
                &[libc::SYS_rt_sigreturn, libc::SYS_restart_syscall],
            );
        }
        ThreadKind::Worker => {
            allow(
                &mut rules,
                &[
                    libc::SYS_read,
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_fdatasync,
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_shutdown,
                    libc::SYS_recvfrom,
                    libc::SYS_sendto,
                ],
            );
            allow_arg(&mut rules, libc::SYS_socket, 0, &[libc::AF_UNIX as u64]);
            // A network device's tap: the offloads the driver took, set
            // when it activates the device.
            allow_arg(
                &mut rules,
                libc::SYS_ioctl,
                1,
                &[libc::FIONBIO, libc::TUNSETOFFLOAD],
            );
        }
        ThreadKind::Api => {
            // A request with an image's descriptor: its kind and size.
            allow(
                &mut rules,
                &[
                    libc::SYS_poll,
                    libc::SYS_accept4,
                    libc::SYS_recvmsg,
                    // The reply: std writes to a socket with send(2).
                    libc::SYS_sendto,
                    libc::SYS_setsockopt,
                    libc::SYS_statx,
                    libc::SYS_fstat,
                ],
            );
            allow_arg(&mut rules, libc::SYS_ioctl, 1, &[libc::FIONBIO]);
        }
        ThreadKind::Keeper => {
            allow(
                &mut rules,
                &[
                    libc::SYS_wait4,
                    libc::SYS_rt_sigtimedwait,
                    libc::SYS_rt_sigprocmask,
                    libc::SYS_rt_sigaction,
                    libc::SYS_getpid,
                    libc::SYS_kill,
                    libc::SYS_exit_group,
                ],
            );
        }
    }
    rules
}

/// How many syscalls the filter of `kind` allows to succeed (for the docs
/// and doctor): the quietly refused ones do not count.
pub fn allowed_count(kind: ThreadKind) -> usize {
    rules(kind, 1)
        .keys()
        .filter(|nr| !REFUSED_QUIETLY.contains(nr))
        .count()
}

fn compile(kind: ThreadKind, pid: u32, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let compiled = |e| SeccompError::Compile(kind, e);
    let mut map = BTreeMap::new();
    for (nr, rule) in rules(kind, pid) {
        let mut list = Vec::new();
        if let Rule::When(alternatives) = rule {
            for conditions in alternatives {
                let conditions = conditions
                    .into_iter()
                    .map(|(arg, op, value)| {
                        SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(compiled)?;
                list.push(SeccompRule::new(conditions).map_err(compiled)?);
            }
        }
        map.insert(nr, list);
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::KillProcess,
    };
    let filter = SeccompFilter::new(map, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(compiled)?;
    BpfProgram::try_from(filter).map_err(compiled)
}

/// Syscalls a filter lets through only for the second filter to fail them
/// with EACCES: glibc opens files on its own now and then (trimming a
/// thread's heap reads /proc/sys/vm/overcommit_memory) and copes with a
/// refusal, where a kill would take the VM down. Nothing is ever opened.
const REFUSED_QUIETLY: [libc::c_long; 3] = [libc::SYS_open, libc::SYS_openat, libc::SYS_openat2];

/// The second filter every thread gets: `REFUSED_QUIETLY` fail with
/// EACCES, everything else is left to the allowlist. (Of two filters the
/// kernel takes the stricter answer: EACCES over allow, kill over both.)
fn refusals() -> Result<BpfProgram, SeccompError> {
    let compiled = |e| SeccompError::Compile(ThreadKind::Main, e);
    let map = REFUSED_QUIETLY.iter().map(|&nr| (nr, Vec::new())).collect();
    let errno = u32::try_from(libc::EACCES).unwrap_or(13);
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        TargetArch::x86_64,
    )
    .map_err(compiled)?;
    BpfProgram::try_from(filter).map_err(compiled)
}

/// A thread's filters: its allowlist and the quiet refusals.
#[derive(Debug)]
struct ThreadFilter {
    allowlist: BpfProgram,
    refusals: Arc<BpfProgram>,
}

impl ThreadFilter {
    fn apply(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.refusals).map_err(SeccompError::Install)?;
        seccompiler::apply_filter(&self.allowlist).map_err(SeccompError::Install)
    }
}

/// The compiled filters of one VMM process.
#[derive(Debug, Default)]
pub struct Filters {
    programs: BTreeMap<ThreadKind, Arc<ThreadFilter>>,
}

impl Filters {
    /// Compiles every thread's filter for this process (`pid` as the
    /// process sees itself, for the signal rules); none with `mode` None.
    pub fn compile(mode: SeccompMode, pid: u32) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        if mode != SeccompMode::None {
            let refusals = Arc::new(refusals()?);
            for kind in ThreadKind::ALL {
                let filter = ThreadFilter {
                    allowlist: compile(kind, pid, mode)?,
                    refusals: Arc::clone(&refusals),
                };
                programs.insert(kind, Arc::new(filter));
            }
        }
        Ok(Self { programs })
    }

    /// Installs the filter of `kind` on the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        match self.programs.get(&kind) {
            Some(filter) => filter.apply(),
            None => Ok(()),
        }
    }

    fn init(&self, kind: ThreadKind) -> ThreadInit {
        match self.programs.get(&kind) {
            Some(filter) => {
                let filter = Arc::clone(filter);
                Arc::new(move || {
                    filter
                        .apply()
                        .map_err(|e| std::io::Error::other(e.to_string()))
                })
            }
            None => crate::devices::virtio::no_init(),
        }
    }

    /// What each kind of thread the builder starts runs first.
    pub fn thread_inits(&self) -> ThreadInits {
        ThreadInits {
            vcpu: self.init(ThreadKind::Vcpu),
            worker: self.init(ThreadKind::Worker),
            api: self.init(ThreadKind::Api),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn every_filter_compiles_and_stays_small() {
        for kind in ThreadKind::ALL {
            compile(kind, 1, SeccompMode::Kill).unwrap();
            compile(kind, 1, SeccompMode::Log).unwrap();
        }
        // Firecracker's counts, which we aim at or below: VMM 38, API 27, vCPU 21.
        for (kind, firecracker) in [
            (ThreadKind::Main, 38),
            (ThreadKind::Worker, 38),
            (ThreadKind::Api, 27),
            (ThreadKind::Vcpu, 21),
        ] {
            let ours = allowed_count(kind) - usize::from(cfg!(debug_assertions));
            assert!(ours <= firecracker, "{kind:?}: {ours}");
        }
        assert!(allowed_count(ThreadKind::Keeper) < 10);
    }

    /// Runs `case` in a child process (a re-run of this test binary) and
    /// returns how it ended.
    fn in_child(case: &str) -> std::process::ExitStatus {
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "seccomp::tests::child", "--nocapture"])
            .env("CAPSID_SECCOMP_CASE", case)
            .status()
            .unwrap()
    }

    /// The child side of [`in_child`]: installs a filter, then makes one
    /// syscall it allows and one it does not.
    #[test]
    fn child() {
        let Ok(case) = std::env::var("CAPSID_SECCOMP_CASE") else {
            return;
        };
        let pid = std::process::id();
        if case == "console-under-every-filter" {
            // The bounded console and log files compact themselves under
            // every thread's filter (the vCPU writes the console).
            use std::io::Write;
            let dir = std::env::temp_dir().join(format!("capsid-seccomp-{pid}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut files: Vec<_> = ThreadKind::ALL
                .iter()
                .map(|kind| {
                    let path = dir.join(format!("{kind:?}.log"));
                    crate::logging::BoundedFile::with_max(&path, 4096).unwrap()
                })
                .collect();
            let filters = Filters::compile(SeccompMode::Kill, pid).unwrap();
            for (kind, file) in ThreadKind::ALL.iter().zip(&mut files) {
                if *kind == ThreadKind::Keeper {
                    continue;
                }
                let kind = *kind;
                let file = std::mem::replace(
                    file,
                    crate::logging::BoundedFile::with_max(&dir.join("spare"), 4096).unwrap(),
                );
                std::thread::spawn(move || {
                    let mut file = file;
                    filters_for_child(kind).apply(kind).unwrap();
                    for _ in 0..100 {
                        file.write_all(&[b'x'; 100]).unwrap();
                    }
                })
                .join()
                .unwrap();
            }
            drop(filters);
            drop(files);
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(0);
        }
        if case == "api-under-its-filter" {
            api_under_its_filter(pid);
            std::process::exit(0);
        }
        if case == "vsock-under-the-worker-filter" {
            vsock_under_the_worker_filter(pid);
            std::process::exit(0);
        }
        if case == "open-is-refused" {
            let filters = Filters::compile(SeccompMode::Kill, pid).unwrap();
            std::thread::spawn(move || {
                filters.apply(ThreadKind::Worker).unwrap();
                let error = std::fs::File::open("/proc/sys/vm/overcommit_memory").unwrap_err();
                assert_eq!(error.raw_os_error(), Some(libc::EACCES));
            })
            .join()
            .unwrap();
            std::process::exit(0);
        }
        let (kind, forbidden): (ThreadKind, fn()) = match case.as_str() {
            "vcpu-socket" => (ThreadKind::Vcpu, inet_socket),
            "worker-inet" => (ThreadKind::Worker, inet_socket),
            "main-exec-mmap" => (ThreadKind::Main, executable_mapping),
            _ => panic!("unknown case {case}"),
        };
        let filters = Filters::compile(SeccompMode::Kill, pid).unwrap();
        filters.apply(kind).unwrap();
        // Allowed: a write to stderr, and memory.
        let v = vec![1u8; 1 << 20];
        eprintln!("filter on ({} bytes allocated)", v.len());
        forbidden();
        // Not reached: the syscall above kills the process.
        std::process::exit(0);
    }

    fn inet_socket() {
        // SAFETY: socket() takes integers only.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }

    fn executable_mapping() {
        // SAFETY: a new anonymous mapping; nothing is overwritten.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
    }

    fn filters_for_child(_kind: ThreadKind) -> Filters {
        Filters::compile(SeccompMode::Kill, std::process::id()).unwrap()
    }

    /// The API thread attaches and detaches an image under its filter (its
    /// reply is a send(2): the API thread was killed in the e2e run).
    fn api_under_its_filter(pid: u32) {
        use crate::api::ApiServer;
        use crate::devices::virtio::Interrupt;
        use crate::devices::virtio::block::{Block, DiskSlot, DiskSlots};
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let filters = Filters::compile(SeccompMode::Kill, pid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let block = Block::spare();
        let irq = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let slots = Arc::new(DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)]));
        let exit = Arc::new(crate::exit::ExitNotifier::new().unwrap());
        let api = crate::api::ApiContext {
            slots,
            snapshots: Arc::new(crate::snapshot::SnapshotDesk::new(exit, None)),
        };
        let server = ApiServer::start(&sock, api, filters.thread_inits().api).unwrap();
        let image = tempfile::NamedTempFile::new().unwrap();
        image.as_file().set_len(4096).unwrap();
        for (line, fd) in [
            (
                &b"{\"op\":\"attach\",\"id\":\"c1\"}\n"[..],
                Some(image.as_file()),
            ),
            (&b"{\"op\":\"detach\",\"id\":\"c1\"}\n"[..], None),
        ] {
            let mut stream = UnixStream::connect(&sock).unwrap();
            match fd {
                Some(file) => {
                    stream.send_with_fd(line, file.as_raw_fd()).unwrap();
                }
                None => stream.write_all(line).unwrap(),
            }
            let mut reply = String::new();
            stream.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "{\"slot\":0}\n");
        }
        drop(server);
    }

    /// A device worker's vsock traffic under its filter: a host connection
    /// (accept, the CONNECT line, data both ways) and a guest connection to
    /// a host listener (socket, connect).
    fn vsock_under_the_worker_filter(pid: u32) {
        use crate::devices::virtio::EventSetup;
        use crate::devices::virtio::vsock::muxer::Muxer;
        use crate::devices::virtio::vsock::packet::Header;
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let filters = Filters::compile(SeccompMode::Kill, pid).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut port = uds.clone().into_os_string();
        port.push("_77");
        let service = UnixListener::bind(&port).unwrap();
        let mut client = UnixStream::connect(&uds).unwrap();
        client.write_all(b"CONNECT 52\nping").unwrap();
        // Made before the filter, as the worker's epoll and muxer are (when
        // the VM is built).
        let epoll = vmm_sys_util::epoll::Epoll::new().unwrap();
        let mut muxer = Muxer::new(3, &uds, listener);
        let worker = std::thread::spawn(move || {
            filters.apply(ThreadKind::Worker).unwrap();
            let setup = EventSetup::new(&epoll);
            let guest = |op: u16, local: u32, peer: u32, len: u32| Header {
                src_cid: 3,
                dst_cid: 2,
                src_port: peer,
                dst_port: local,
                len,
                type_: 1,
                op,
                buf_alloc: 1 << 20,
                ..Header::default()
            };
            muxer.handle_listener(&setup);
            for _ in 0..100 {
                for fd in 0..64 {
                    muxer.handle_stream(fd, vmm_sys_util::epoll::EventSet::IN, &setup);
                }
                if let Some((request, _)) = muxer.next_rx(4096, &setup) {
                    let local = request.src_port;
                    muxer.handle_packet(&guest(2, local, 52, 0), Vec::new(), &setup);
                    muxer.handle_packet(&guest(5, local, 52, 4), b"pong".to_vec(), &setup);
                    // A guest connection to host port 77.
                    muxer.handle_packet(&guest(1, 77, 9, 0), Vec::new(), &setup);
                    while muxer.next_rx(4096, &setup).is_some() {}
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            panic!("no REQUEST for the guest");
        });
        worker.join().unwrap();
        let mut answer = [0u8; 64];
        let n = client.read(&mut answer).unwrap();
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("OK "));
        assert!(service.accept().is_ok(), "the guest's connection arrived");
    }

    #[test]
    fn the_api_and_a_vsock_worker_work_under_their_filters() {
        for case in ["api-under-its-filter", "vsock-under-the-worker-filter"] {
            let status = in_child(case);
            assert!(status.success(), "{case}: {status:?}");
        }
    }

    #[test]
    fn opening_a_file_fails_quietly_instead_of_killing() {
        // glibc opens /proc/sys/vm/overcommit_memory when it trims a
        // thread's heap: that killed a worker (audit: virtio1 syscall=257)
        // before opens were refused with EACCES instead.
        let status = in_child("open-is-refused");
        assert!(status.success(), "{status:?}");
    }

    #[test]
    fn the_bounded_console_works_under_every_filter() {
        let status = in_child("console-under-every-filter");
        assert!(status.success(), "{status:?}");
    }

    #[test]
    fn a_syscall_outside_the_allowlist_kills_the_process() {
        use std::os::unix::process::ExitStatusExt;
        for case in ["vcpu-socket", "worker-inet", "main-exec-mmap"] {
            let status = in_child(case);
            assert_eq!(status.signal(), Some(libc::SIGSYS), "{case}: {status:?}");
        }
    }
}
