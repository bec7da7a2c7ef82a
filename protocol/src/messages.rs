//! The messages. Field names are the wire names; every enum is tagged by
//! `"type"` so a dump reads on its own.

use oci_spec::runtime::{LinuxResources, LinuxSeccomp, Process, Spec};
use serde::{Deserialize, Serialize};

/// The first frame on every connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Hello {
    /// Requests and responses follow.
    Control {
        /// The protocol version the host speaks ([`crate::PROTOCOL_VERSION`]).
        version: u32,
    },
    /// After `Response::Ok`, plain bytes of one stream of one process.
    Stdio {
        /// The protocol version the host speaks.
        version: u32,
        /// Whose stream.
        process: ProcessRef,
        /// Which of its streams.
        stream: Stream,
    },
    /// After `Response::Ok`, a tar stream of a directory of a container's
    /// root file system, then EOF (`capsid run --output`). What it holds
    /// came from the container: the host checks every entry.
    Archive {
        /// The protocol version the host speaks.
        version: u32,
        /// The container ([`validate_id`]).
        container_id: String,
        /// The directory, an absolute path inside the container.
        path: String,
    },
}

/// One of a process's standard streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Host → process.
    Stdin,
    /// Process → host (also a terminal's output).
    Stdout,
    /// Process → host.
    Stderr,
}

/// A process of a container: its init (`exec_id: None`) or an exec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRef {
    /// The container's id.
    pub container_id: String,
    /// The exec's id; `None` for the container's init.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_id: Option<String>,
}

impl ProcessRef {
    /// The init process of `container_id`.
    pub fn init(container_id: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            exec_id: None,
        }
    }

    /// The exec `exec_id` of `container_id`.
    pub fn exec(container_id: &str, exec_id: &str) -> Self {
        Self {
            container_id: container_id.to_owned(),
            exec_id: Some(exec_id.to_owned()),
        }
    }

    /// Both ids are plain words ([`validate_id`]); the error says which
    /// is not.
    pub fn validate(&self) -> Result<(), String> {
        validate_id("container id", &self.container_id)?;
        match &self.exec_id {
            Some(exec) => validate_id("exec id", exec),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.exec_id {
            Some(exec) => write!(f, "{}/{exec}", self.container_id),
            None => write!(f, "{}", self.container_id),
        }
    }
}

/// The longest container or exec id.
pub const MAX_ID_LEN: usize = 128;

/// Ids name directories in the guest, so they are plain words: 1 to 128 of
/// `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {id:?} is not 1 to {MAX_ID_LEN} of [A-Za-z0-9_.-] (not starting with '.')"
        ))
    }
}

/// Which standard streams the host will attach; the others are /dev/null.
/// With `process.terminal` the process gets a pty, and its output comes on
/// `stdout` only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioRequest {
    /// The host will write the process's stdin.
    pub stdin: bool,
    /// The host will read its stdout.
    pub stdout: bool,
    /// The host will read its stderr.
    pub stderr: bool,
}

/// The file system of a rootfs disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filesystem {
    /// Read-only, compressed: what the runtime makes of a rootfs directory.
    Erofs,
    /// Writable.
    Ext4,
}

impl Filesystem {
    /// Its name for mount(2).
    pub fn name(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Ext4 => "ext4",
        }
    }
}

/// The container's root filesystem: a virtio-blk disk found by its id
/// (`--disk PATH,id=ID` on the VMM side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rootfs {
    /// The disk's serial, as the VMM was given it.
    pub disk_id: String,
    /// What is on it.
    pub filesystem: Filesystem,
    /// True: the disk is read-only and writes go to an overlay on tmpfs
    /// (or on `upper_disk`). False: the disk itself is mounted read-write.
    pub overlay: bool,
    /// With `overlay`: the id of a disk holding an ext4 file system on
    /// which the overlay's writes go instead of the guest's memory
    /// (`capsid run --disk`), so a disk filler meets ENOSPC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_disk: Option<String>,
}

/// `CreateContainer`: the OCI spec as the bundle has it. The agent uses
/// `process`, `hostname`, `mounts` and `linux` (namespaces, resources,
/// seccomp, masked and read-only paths, sysctl); `root.path` is replaced by
/// `rootfs`, and hooks are refused (they would run host programs).
/// Its `Debug` shows the copied files' sizes only: they may be secrets
/// (`capsid run --secret`), and requests are logged.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// The container's id ([`validate_id`]).
    pub id: String,
    /// Its root file system.
    pub rootfs: Rootfs,
    /// The bundle's `config.json`.
    pub spec: Spec,
    /// The streams of its init process the host will attach.
    pub stdio: StdioRequest,
    /// Small host files the container sees at bind mounts whose source is
    /// `file:N` (N indexes this list): what CRI binds (`/etc/hosts`,
    /// `/etc/resolv.conf`, …), copied in because the VM shares no file
    /// system with the host; or, for a source `tree:N`, a small host
    /// directory as a tar ([`TREE_SOURCE`]). At most [`MAX_COPIED_FILES`]
    /// of them and [`MAX_COPIED_BYTES`] bytes in all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<Vec<u8>>,
    /// Namespaces it shares with another container of the VM instead of
    /// having its own: a pod's containers with its sandbox, as CRI asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<SharedNamespaces>,
}

impl std::fmt::Debug for CreateContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<String> = self
            .files
            .iter()
            .map(|file| format!("<{} bytes>", file.len()))
            .collect();
        f.debug_struct("CreateContainer")
            .field("id", &self.id)
            .field("rootfs", &self.rootfs)
            .field("spec", &self.spec)
            .field("stdio", &self.stdio)
            .field("files", &sizes)
            .field("share", &self.share)
            .finish()
    }
}

/// The namespaces a container joins, those of another container's init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedNamespaces {
    /// The container whose namespaces are joined ([`validate_id`]).
    pub container: String,
    /// Which of them.
    pub kinds: Vec<SharedNamespace>,
}

/// A namespace kind a pod's containers may share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedNamespace {
    /// System V IPC and POSIX message queues.
    Ipc,
    /// The hostname.
    Uts,
    /// Process ids (a pod that shares its process namespace).
    Pid,
}

/// A bind mount source naming the N-th of [`CreateContainer::files`].
pub const FILE_SOURCE: &str = "file:";
/// A bind mount source naming the N-th of [`CreateContainer::files`] as a
/// tar of a small host directory (a Kubernetes volume: a secret, a config
/// map, the service account's token, an emptyDir), unpacked in the guest.
pub const TREE_SOURCE: &str = "tree:";
/// The most entries of one copied directory.
pub const MAX_TREE_ENTRIES: usize = 256;
/// The most files a [`CreateContainer`] copies in.
pub const MAX_COPIED_FILES: usize = 16;
/// The most bytes of them, in all.
pub const MAX_COPIED_BYTES: usize = 128 * 1024;

/// `ExecProcess`: a further process in a created container.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecProcess {
    /// The container and the new exec's id.
    pub process: ProcessRef,
    /// What to run, as the OCI `process` object.
    pub spec: Process,
    /// The streams the host will attach.
    pub stdio: StdioRequest,
}

/// What the host asks of the agent, one per frame on the control
/// connection; each gets one [`Response`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Prepares the container and its init process, stopped before exec.
    /// Answer: `Pid`.
    CreateContainer(Box<CreateContainer>),
    /// Prepares a further process in a created container. Answer: `Pid`.
    ExecProcess(Box<ExecProcess>),
    /// Lets a created process run its program. Answer: `Ok`.
    StartProcess(ProcessRef),
    /// Blocks until the process has exited. Answer: `Exited`.
    WaitProcess(ProcessRef),
    /// Signals the process, or with `all` every process of the container.
    SignalProcess {
        /// The process.
        process: ProcessRef,
        /// The signal's number.
        signal: i32,
        /// Every process of the container, not only this one.
        all: bool,
    },
    /// The process's terminal gets a new size. Answer: `Ok`.
    ResizeTty {
        /// The process (it has a terminal).
        process: ProcessRef,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// The process's stdin gets EOF (also when no stdin stream is attached).
    CloseStdin(ProcessRef),
    /// The container's cgroup counters. Answer: `Stats`.
    Stats {
        /// The container.
        container_id: String,
    },
    /// New cgroup limits (memory, pids, cpu) for a running container.
    /// Answer: `Ok`.
    UpdateResources {
        /// The container.
        container_id: String,
        /// The limits, as OCI's `linux.resources`.
        resources: Box<LinuxResources>,
    },
    /// Freezes (`frozen`) or thaws every process of the container (its
    /// cgroup's `cgroup.freeze`); answers once the cgroup says it is.
    /// Answer: `Ok`.
    Freeze {
        /// The container.
        container_id: String,
        /// Frozen, or thawed.
        frozen: bool,
    },
    /// The guest pids of the container's processes. Answer: `Processes`.
    ListProcesses {
        /// The container.
        container_id: String,
    },
    /// Kills what is left of the container and removes it. Answer: `Ok`.
    RemoveContainer {
        /// The container.
        container_id: String,
    },
    /// Gives the guest's network interfaces what the host's have (once,
    /// before the first container). Answer: `Ok`.
    ConfigureNetwork(Box<NetworkConfig>),
    /// Answers `Ok`, then stops every process, syncs and reboots the VM.
    Shutdown,
    /// The guest was restored from a snapshot that other guests were
    /// restored from too: mix fresh host entropy into its random number
    /// generator and reseed it, and set its clock (stale since the
    /// snapshot). Before the first container. Answer: `Ok`.
    Refresh(Box<Refresh>),
    /// Does now, in a template VM before its snapshot, work that every
    /// guest restored from it would otherwise repeat for its first
    /// container. Answer: `Ok`.
    Prepare(Box<Prepare>),
}

/// What a template's agent prepares: see [`Request::Prepare`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prepare {
    /// Seccomp profiles to compile and keep, at most
    /// [`MAX_PREPARED_PROFILES`]: a container whose spec has one of them
    /// gets its program without compiling it again.
    pub seccomp: Vec<LinuxSeccomp>,
}

/// The most profiles one [`Prepare`] carries, and the most compiled
/// programs an agent keeps.
pub const MAX_PREPARED_PROFILES: usize = 4;

/// What a restored guest takes to be its own: see [`Request::Refresh`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refresh {
    /// Random bytes from the host's `getrandom`, [`REFRESH_ENTROPY_BYTES`]
    /// of them.
    pub entropy: Vec<u8>,
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub unix_time_ns: u64,
}

/// How many bytes of entropy a [`Refresh`] carries: 256 bits, what the
/// kernel's RNG needs to be fully seeded, twice over.
pub const REFRESH_ENTROPY_BYTES: usize = 64;

/// An address and its prefix length, `10.88.0.5/16` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpNet {
    /// The address.
    pub addr: std::net::IpAddr,
    /// The prefix length (at most 32 for IPv4, 128 for IPv6).
    pub prefix: u8,
}

impl IpNet {
    /// Whether the prefix fits the address family.
    pub fn is_valid(&self) -> bool {
        self.prefix <= if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The most interfaces, addresses per interface and routes a
/// [`NetworkConfig`] may hold (the agent refuses more).
pub const MAX_INTERFACES: usize = 16;
/// See [`MAX_INTERFACES`].
pub const MAX_ADDRESSES: usize = 64;
/// See [`MAX_INTERFACES`].
pub const MAX_ROUTES: usize = 256;

/// The guest's network: one interface per virtio-net device, as the
/// host's interface it stands for was configured, and the routes out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interfaces, found in the guest by their MAC address.
    pub interfaces: Vec<NetInterface>,
    /// The routes, after the interfaces' addresses.
    pub routes: Vec<NetRoute>,
}

/// One guest interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetInterface {
    /// The name of the host interface it stands for (`eth0`), for messages.
    pub name: String,
    /// Its MAC address (the virtio-net device's).
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: u32,
    /// Its addresses.
    pub addresses: Vec<IpNet>,
}

/// One route of the guest's main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRoute {
    /// Where it leads; `None` is the default route.
    #[serde(default)]
    pub dest: Option<IpNet>,
    /// Through which router; `None` for a directly reachable network.
    #[serde(default)]
    pub gateway: Option<std::net::IpAddr>,
    /// Out through the interface with this MAC address.
    pub mac: [u8; 6],
}

/// The agent's answer to a [`Hello`] or a [`Request`]. Hostile to the
/// host until checked: the client validates each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// To a `Hello`.
    Hello {
        /// The protocol version the agent speaks.
        version: u32,
        /// The agent's name and version.
        agent: String,
    },
    /// Done.
    Ok,
    /// The new process's pid in the guest.
    Pid {
        /// The pid.
        pid: u32,
    },
    /// The process has exited.
    Exited {
        /// How.
        status: ExitStatus,
    },
    /// The container's counters.
    Stats {
        /// The counters.
        stats: Box<ContainerStats>,
    },
    /// The container's processes.
    Processes {
        /// Their guest pids.
        pids: Vec<u32>,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// What went wrong, for a person.
        message: String,
    },
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal,
        }
    }

    /// Codes are 0..=255 and signals 1..=64; anything else is a lie.
    pub fn is_valid(self) -> bool {
        match self {
            Self::Code(code) => (0..=255).contains(&code),
            Self::Signal(signal) => (1..=64).contains(&signal),
        }
    }
}

/// From the container's cgroup in the guest, as the guest measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStats {
    /// `memory.current`.
    pub memory_current_bytes: u64,
    /// The container's memory limit; the guest's memory when it has none
    /// or a larger one (the VM is the limit then).
    pub memory_limit_bytes: u64,
    /// `memory.peak`.
    pub memory_peak_bytes: u64,
    /// `memory.swap.current`.
    pub swap_current_bytes: u64,
    /// `memory.stat`.
    pub memory: MemoryCounters,
    /// `memory.events`: how often the container hit each limit.
    pub memory_events: MemoryEvents,
    /// `pids.current`.
    pub pids_current: u64,
    /// 0: no limit.
    pub pids_limit: u64,
    /// `cpu.stat`.
    pub cpu: CpuCounters,
}

/// A struct of named `u64` counters, as a cgroup file lists them
/// (`NAME VALUE` per line), with the setter that parses such a file.
macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct $name {
            $(#[doc = concat!("`", stringify!($field), "`.")] pub $field: u64,)*
        }

        impl $name {
            /// The counters of a cgroup file's text; lines that name none
            /// of them, or whose value is not a number, are skipped.
            pub fn parse(text: &str) -> Self {
                let mut counters = Self::default();
                for line in text.lines() {
                    let mut words = line.split_ascii_whitespace();
                    let (Some(key), Some(Ok(value))) = (words.next(), words.next().map(str::parse))
                    else {
                        continue;
                    };
                    match key {
                        $(stringify!($field) => counters.$field = value,)*
                        _ => {}
                    }
                }
                counters
            }
        }
    };
}

counters!(
    /// The `memory.stat` counters containerd's cgroup v2 metrics carry.
    MemoryCounters {
        anon, file, kernel_stack, slab, sock, shmem, file_mapped, file_dirty, file_writeback,
        anon_thp, inactive_anon, active_anon, inactive_file, active_file, unevictable,
        slab_reclaimable, slab_unreclaimable, pgfault, pgmajfault, workingset_refault,
        workingset_activate, workingset_nodereclaim, pgrefill, pgscan, pgsteal, pgactivate,
        pgdeactivate, pglazyfree, pglazyfreed, thp_fault_alloc, thp_collapse_alloc,
    }
);

counters!(
    /// `memory.events`.
    MemoryEvents { low, high, max, oom, oom_kill, oom_group_kill }
);

counters!(
    /// `cpu.stat`, in microseconds and counts.
    CpuCounters {
        usage_usec, user_usec, system_usec, nr_periods, nr_throttled, throttled_usec, nr_bursts,
        burst_usec,
    }
);

/// What kind of failure a [`Response::Error`] reports (gRPC's codes, which
/// the shim passes on to containerd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or names something unacceptable.
    InvalidArgument,
    /// No such container or process.
    NotFound,
    /// A container or exec with that id exists.
    AlreadyExists,
    /// Not in this state (a process already started, a container running).
    FailedPrecondition,
    /// The agent does not do that.
    Unsupported,
    /// The agent failed.
    Internal,
    /// The process's program is not there (not in its PATH, or no such
    /// file): a shell's 127.
    ProgramNotFound,
    /// The process's program is there but cannot be executed (a directory,
    /// no exec permission, not an executable format): a shell's 126.
    ProgramNotExecutable,
}

impl ErrorCode {
    /// The exit status a process that could not start with this error has,
    /// as docker, runc and a shell give it: 127 when its program is not
    /// found, 126 when it is but cannot be executed; `None` for the other
    /// codes, which say nothing of the program.
    pub fn start_status(self) -> Option<u8> {
        match self {
            Self::ProgramNotFound => Some(127),
            Self::ProgramNotExecutable => Some(126),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn cgroup_counter_files_parse_by_name_and_skip_what_they_do_not_know() {
        let cpu = CpuCounters::parse(
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods x\nnew_thing 7\n\nburst_usec\n",
        );
        assert_eq!(
            (
                cpu.usage_usec,
                cpu.user_usec,
                cpu.system_usec,
                cpu.nr_periods,
                cpu.burst_usec
            ),
            (1500, 1000, 500, 0, 0)
        );
        let events = MemoryEvents::parse("low 0\nhigh 2\nmax 3\noom 1\noom_kill 1\n");
        assert_eq!((events.high, events.max, events.oom_kill), (2, 3, 1));
        let memory = MemoryCounters::parse("anon 4096\nfile 8192\npgfault 10\n");
        assert_eq!((memory.anon, memory.file, memory.pgfault), (4096, 8192, 10));
        // A peer that sends a counter we do not know is refused, as
        // everything else it sends.
        assert!(serde_json::from_str::<MemoryEvents>(r#"{"oom_kill": 1, "surprise": 2}"#).is_err());
    }

    pub(crate) fn sample_requests() -> Vec<Request> {
        let process = ProcessRef::exec("c1", "e1");
        vec![
            Request::CreateContainer(Box::new(CreateContainer {
                id: "c1".into(),
                rootfs: Rootfs {
                    disk_id: "rootfs".into(),
                    filesystem: Filesystem::Erofs,
                    overlay: true,
                    upper_disk: None,
                },
                spec: Spec::default(),
                stdio: StdioRequest {
                    stdin: true,
                    stdout: true,
                    stderr: false,
                },
                files: vec![b"127.0.0.1 localhost\n".to_vec()],
                share: Some(SharedNamespaces {
                    container: "pod".into(),
                    kinds: vec![SharedNamespace::Ipc, SharedNamespace::Uts],
                }),
            })),
            Request::ExecProcess(Box::new(ExecProcess {
                process: process.clone(),
                spec: Process::default(),
                stdio: StdioRequest::default(),
            })),
            Request::StartProcess(ProcessRef::init("c1")),
            Request::WaitProcess(process.clone()),
            Request::SignalProcess {
                process: process.clone(),
                signal: 9,
                all: true,
            },
            Request::ResizeTty {
                process: process.clone(),
                rows: 24,
                cols: 80,
            },
            Request::CloseStdin(process),
            Request::Stats {
                container_id: "c1".into(),
            },
            Request::ListProcesses {
                container_id: "c1".into(),
            },
            Request::Freeze {
                container_id: "c1".into(),
                frozen: true,
            },
            Request::RemoveContainer {
                container_id: "c1".into(),
            },
            Request::Shutdown,
        ]
    }

    #[test]
    fn a_logged_create_request_shows_the_copied_files_sizes_not_their_bytes() {
        let mut requests = sample_requests();
        let Request::CreateContainer(create) = &mut requests[0] else {
            panic!("the first sample creates")
        };
        create.files.push(b"hunter2-secret-token".to_vec());
        let logged = format!("{:?}", requests[0]);
        assert!(!logged.contains("hunter2"), "{logged}");
        assert!(!logged.contains("localhost"), "{logged}");
        assert!(
            logged.contains("<20 bytes>") && logged.contains("c1"),
            "{logged}"
        );
    }

    #[test]
    fn ids_are_plain_words() {
        for good in ["c1", "a.b-c_d", &"x".repeat(MAX_ID_LEN)] {
            assert!(validate_id("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "a\0",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_id("id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exit_status_is_checked() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert!(ExitStatus::Code(255).is_valid());
        assert!(!ExitStatus::Code(256).is_valid());
        assert!(!ExitStatus::Code(-1).is_valid());
        assert!(!ExitStatus::Signal(0).is_valid());
        assert!(!ExitStatus::Signal(65).is_valid());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = r#"{"type":"stats","container_id":"c","extra":1}"#;
        assert!(serde_json::from_str::<Request>(text).is_err());
    }
}
