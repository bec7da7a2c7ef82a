//! The OCI runtime verbs on a bundle, daemonless, with runc's arguments and
//! output: `create`, `start`, `state`, `kill`, `delete`, `exec`.
//!
//! ```text
//!  create --bundle B ID ─▶ forks `capsid monitor` (its own session, the
//!      caller's stdio) ─▶ the monitor boots the VM, creates the container,
//!      copies its stdio, writes ROOT/ID/state.json ─▶ "ok" on the ready
//!      pipe ─▶ create exits 0 (or prints the monitor's error, exit 1)
//!  start ID  ─▶ StartProcess; ROOT/ID/started
//!  monitor   ─▶ WaitProcess returns ─▶ output drained ─▶ exit status into
//!      state.json ─▶ the VM shut down ─▶ the monitor exits
//!  state ID  ─▶ runc's JSON (created / running / stopped)
//!  kill ID [SIGNAL] [--all] ─▶ SignalProcess
//!  exec ID -- CMD ─▶ ExecProcess, attached, its exit status
//!  delete [--force] ID ─▶ SIGTERM the monitor (it takes the VM down), then
//!      SIGKILL whatever is left, remove ROOT/ID
//! ```
//!
//! The container's status is derived, never stored twice: stopped once
//! `state.json` has an exit status or the monitor is gone, running once
//! `started` exists, created before.

use std::fs::File;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use capsid_runtime::protocol::{ExecProcess, ProcessRef, StdioRequest, Stream};
use capsid_runtime::{
    Agent, BootRequest, Container, ContainerRequest, ProcessIo, Sandbox, SandboxError, Teardown,
};
use clap::Args;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::run::{Artifacts, parse_env, parse_user};
use crate::{attach, workload};
use capsid_runtime::hooks;

const DEFAULT_ROOT: &str = "/run/capsid/oci";
/// The fd the monitor's ready pipe arrives on.
const READY_FD: i32 = 3;
const AGENT_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The OCI runtime spec versions capsid takes (`state`, `features`).
const OCI_VERSION_MIN: &str = "1.0.0";
const OCI_VERSION: &str = "1.0.2";

/// runc's other global options: what containerd's runc shim, Docker and
/// conmon pass before the verb.
#[derive(Args, Debug)]
pub struct RuncOptions {
    /// Also write errors to FILE (runc's `--log`: containerd's runc shim
    /// and conmon read the last error from it).
    #[arg(long, global = true, value_name = "FILE")]
    log: Option<PathBuf>,
    /// The format of `--log`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Accepted, as runc's: a container's cgroups are its guest's, which
    /// capsid makes itself; the VM's own cgroup is capsid's configuration.
    #[arg(long = "systemd-cgroup", global = true)]
    _systemd_cgroup: bool,
    /// Accepted, as runc's (capsid's own log level is `RUST_LOG`'s).
    #[arg(long = "debug", global = true)]
    _debug: bool,
}

/// runc's `--log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// logrus's text lines: `time="…" level=error msg="…"`.
    Text,
    /// One JSON object a line: `{"level":"error","msg":"…","time":"…"}`.
    Json,
}

impl RuncOptions {
    /// Appends `message` to the `--log` file, if one was given, as an
    /// error line in its format. Best effort: the message went to stderr.
    pub fn log_error(&self, message: &str) {
        let Some(path) = &self.log else { return };
        let line = log_line(self.log_format, &now_rfc3339(), message);
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut file| file.write_all(line.as_bytes()));
    }
}

/// One error line of runc's log in `format`, newline-terminated.
fn log_line(format: LogFormat, time: &str, message: &str) -> String {
    match format {
        LogFormat::Json => {
            let object = serde_json::json!({"level": "error", "msg": message, "time": time});
            format!("{object}\n")
        }
        // JSON's string quoting is logrus's (Go's %q) for what errors hold.
        LogFormat::Text => format!(
            "time={} level=error msg={}\n",
            serde_json::Value::from(time),
            serde_json::Value::from(message)
        ),
    }
}

/// Now, in RFC 3339 with nanoseconds, UTC (runc's `created` and log times).
fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(at: SystemTime) -> String {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `capsid --version`, in runc's format (Docker reads the first line's
/// version and the `commit:` line; `spec:` is the OCI version).
pub fn version() -> String {
    format!(
        "capsid version {}\ncommit: {}\nspec: {OCI_VERSION}\n",
        env!("CARGO_PKG_VERSION"),
        option_env!("CAPSID_COMMIT").unwrap_or("unknown"),
    )
}

/// `capsid features`: what the runtime takes, as runc prints it (the OCI
/// runtime spec's features document). Only what the guest applies is
/// listed: no hooks yet, no user namespace, cgroup v2 only.
pub fn features() -> anyhow::Result<ExitCode> {
    println!("{}", serde_json::to_string_pretty(&features_document())?);
    Ok(ExitCode::SUCCESS)
}

fn features_document() -> serde_json::Value {
    let mut capabilities: Vec<String> = caps::all().iter().map(ToString::to_string).collect();
    capabilities.sort();
    serde_json::json!({
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": MOUNT_OPTIONS,
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "uts"],
            "capabilities": capabilities,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                    "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                    "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                    "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"
                ],
                "archs": ["SCMP_ARCH_X32", "SCMP_ARCH_X86", "SCMP_ARCH_X86_64"]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "org.capsid.version": env!("CARGO_PKG_VERSION"),
            "org.capsid.isolation": "a KVM micro-VM per container"
        }
    })
}

/// The mount options the guest agent applies (guest-agent/src/rootfs.rs).
const MOUNT_OPTIONS: [&str; 29] = [
    "async",
    "atime",
    "bind",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "runbindable",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
    "unbindable",
];

/// runc's global options, given before or after the verb.
#[derive(Args, Debug)]
pub struct Root {
    /// Where container state lives (like runc's --root).
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    root: PathBuf,
}

impl Root {
    fn dir(&self, id: &str) -> anyhow::Result<PathBuf> {
        capsid_runtime::protocol::validate_id("container id", id).map_err(anyhow::Error::msg)?;
        let dir = self.root.join(id);
        // The VM's vsock socket (and its `_PORT` siblings) must fit sun_path.
        if capsid_runtime::vm::vsock_path(&dir).as_os_str().len() + "_4294967295".len() > 107 {
            bail!(
                "--root {} with id {id} makes socket paths too long",
                self.root.display()
            );
        }
        Ok(dir)
    }
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the root file system).
    #[arg(long, short = 'b', default_value = ".")]
    bundle: PathBuf,
    /// Write the pid that stands for the container's init here: its
    /// monitor, which lives as long as the workload and exits with its
    /// status.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// runc's terminal for the container: not supported yet (refused with
    /// what to do).
    #[arg(long, value_name = "SOCKET")]
    console_socket: Option<PathBuf>,
    /// Accepted, as runc's: the guest's agent sets up the container's root
    /// itself.
    #[arg(long = "no-pivot")]
    _no_pivot: bool,
    /// Accepted, as runc's: the container's session keyring is the guest
    /// kernel's, which no host process shares.
    #[arg(long = "no-new-keyring")]
    _no_new_keyring: bool,
    #[command(flatten)]
    artifacts: Artifacts,
    id: String,
}

#[derive(Args, Debug)]
pub struct IdArgs {
    id: String,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(long, short = 'a')]
    all: bool,
    id: String,
    /// A signal name (TERM, SIGKILL) or number.
    #[arg(default_value = "SIGTERM")]
    signal: String,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    /// `table` or `json` (runc's: the host pids, which `docker top` reads).
    #[arg(long, short = 'f', default_value = "table")]
    format: String,
    id: String,
}

#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The new limits as OCI `linux.resources` JSON, from FILE or `-`
    /// (stdin), as Docker's `docker update` passes them.
    #[arg(long, short = 'r', value_name = "FILE")]
    resources: Option<PathBuf>,
    /// Memory limit in bytes.
    #[arg(long, short = 'm')]
    memory: Option<i64>,
    /// Memory plus swap limit in bytes.
    #[arg(long)]
    memory_swap: Option<i64>,
    /// CPU weight in cgroup v1 shares.
    #[arg(long)]
    cpu_shares: Option<u64>,
    /// CPU CFS period in microseconds.
    #[arg(long)]
    cpu_period: Option<u64>,
    /// CPU CFS quota in microseconds.
    #[arg(long)]
    cpu_quota: Option<i64>,
    /// Most processes the container may have.
    #[arg(long)]
    pids_limit: Option<i64>,
    id: String,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Kill a running container first.
    #[arg(long, short = 'f')]
    force: bool,
    id: String,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// An environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<String>,
    /// UID[:GID] to run as.
    #[arg(long, short = 'u', value_parser = parse_user)]
    user: Option<(u32, u32)>,
    /// Working directory inside the container.
    #[arg(long)]
    cwd: Option<String>,
    /// An OCI process.json instead of the command line.
    #[arg(long, short = 'p')]
    process: Option<PathBuf>,
    /// Return once the process has started; a detached `capsid exec`
    /// stands for it (it lives as long as the process, carries its stdio,
    /// passes signals on and exits with its status).
    #[arg(long, short = 'd')]
    detach: bool,
    /// Write the pid that stands for the process here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Where a detached exec says it started (set by `--detach`).
    #[arg(long, hide = true)]
    ready_fd: Option<i32>,
    id: String,
    /// The command and its arguments (options before it are capsid's).
    #[arg(trailing_var_arg = true)]
    command: Vec<String>,
}

impl ExecArgs {
    /// The arguments of the same exec, attached, for its detached stand-in.
    fn attached_args(&self, root: &Root) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), root.root.clone().into()];
        args.push("exec".into());
        if self.tty {
            args.push("--tty".into());
        }
        for env in &self.env {
            args.push(format!("--env={env}").into());
        }
        if let Some((uid, gid)) = self.user {
            args.push(format!("--user={uid}:{gid}").into());
        }
        if let Some(cwd) = &self.cwd {
            args.push(format!("--cwd={cwd}").into());
        }
        if let Some(process) = &self.process {
            args.push("--process".into());
            args.push(process.clone().into());
        }
        args.push(format!("--ready-fd={READY_FD}").into());
        args.push(self.id.clone().into());
        if !self.command.is_empty() {
            args.push("--".into());
            args.extend(self.command.iter().map(Into::into));
        }
        args
    }
}

#[derive(Args, Debug)]
pub struct MonitorArgs {
    #[arg(long)]
    bundle: PathBuf,
    #[command(flatten)]
    artifacts: Artifacts,
    id: String,
}

/// What the monitor records; read by every other verb.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    id: String,
    bundle: PathBuf,
    monitor_pid: u32,
    vmm_pid: u32,
    created: u64,
    exit_status: Option<i32>,
}

fn read_state(dir: &Path) -> anyhow::Result<State> {
    let path = dir.join("state.json");
    let id = dir.file_name().unwrap_or_default().to_string_lossy();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("container {id} does not exist")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read the state of {id}")),
    };
    serde_json::from_slice(&bytes).with_context(|| format!("{} is damaged", path.display()))
}

fn write_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(state)?)?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
}

/// The monitor of the container in `dir` (`capsid monitor --root R ... ID`).
fn monitor_alive(pid: u32, dir: &Path) -> bool {
    let root = dir.parent().unwrap_or(dir).to_string_lossy();
    let id = dir.file_name().unwrap_or_default().to_string_lossy();
    capsid_runtime::vm::alive_with(pid, &["monitor", &root, &id])
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Status {
    fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        }
    }
}

/// Present in a container's directory while `pause` has frozen it.
const PAUSED: &str = "paused";

/// `pause ID`: freezes every process of a running container (its cgroup
/// in the guest), as runc's.
pub fn pause(root: &Root, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    match status(&dir, &state) {
        Status::Running => {}
        other => bail!("container {} is {}, not running", args.id, other.name()),
    }
    sandbox(&dir, &state)?.agent().freeze(&args.id, true)?;
    std::fs::write(dir.join(PAUSED), b"")?;
    Ok(ExitCode::SUCCESS)
}

/// `update ID`: new cgroup limits for a running container, in the guest,
/// from `--resources` (OCI JSON) with the flags over it, as runc's.
pub fn update(root: &Root, args: &UpdateArgs) -> anyhow::Result<ExitCode> {
    use oci_spec::runtime::{LinuxPids, LinuxResources};
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    match status(&dir, &state) {
        Status::Running | Status::Paused | Status::Created => {}
        other => bail!("container {} is {}", args.id, other.name()),
    }
    let mut resources: LinuxResources = match &args.resources {
        Some(path) => {
            let bytes = if path.as_os_str() == "-" {
                use std::io::Read;
                let mut bytes = Vec::new();
                std::io::stdin().take(1 << 20).read_to_end(&mut bytes)?;
                bytes
            } else {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            };
            serde_json::from_slice(&bytes).context("--resources is not OCI linux.resources JSON")?
        }
        None => LinuxResources::default(),
    };
    if args.memory.is_some() || args.memory_swap.is_some() {
        let mut memory = resources.memory().unwrap_or_default();
        if let Some(limit) = args.memory {
            memory.set_limit(Some(limit));
        }
        if let Some(swap) = args.memory_swap {
            memory.set_swap(Some(swap));
        }
        resources.set_memory(Some(memory));
    }
    if args.cpu_shares.is_some() || args.cpu_period.is_some() || args.cpu_quota.is_some() {
        let mut cpu = resources.cpu().clone().unwrap_or_default();
        if let Some(shares) = args.cpu_shares {
            cpu.set_shares(Some(shares));
        }
        if let Some(period) = args.cpu_period {
            cpu.set_period(Some(period));
        }
        if let Some(quota) = args.cpu_quota {
            cpu.set_quota(Some(quota));
        }
        resources.set_cpu(Some(cpu));
    }
    if let Some(limit) = args.pids_limit {
        let mut pids = LinuxPids::default();
        pids.set_limit(limit);
        resources.set_pids(Some(pids));
    }
    sandbox(&dir, &state)?
        .agent()
        .update_resources(&args.id, resources)?;
    Ok(ExitCode::SUCCESS)
}

/// `ps ID`: the host pids that stand for the container's processes (its
/// monitor: the processes themselves have guest pids), as runc's JSON
/// array; the table adds the guest's pids.
pub fn ps(root: &Root, args: &PsArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    let running = !matches!(status(&dir, &state), Status::Stopped | Status::Created);
    let host: Vec<u32> = if running {
        vec![state.monitor_pid]
    } else {
        Vec::new()
    };
    match args.format.as_str() {
        "json" => println!("{}", serde_json::to_string(&host)?),
        "table" => {
            let guest = if running {
                sandbox(&dir, &state)?.agent().list_processes(&args.id)?
            } else {
                Vec::new()
            };
            println!("PID\tGUEST PIDS");
            for pid in host {
                let guest: Vec<String> = guest.iter().map(ToString::to_string).collect();
                println!("{pid}\t{}", guest.join(" "));
            }
        }
        other => bail!("--format {other}: table or json"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `resume ID`: thaws a paused container.
pub fn resume(root: &Root, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    match status(&dir, &state) {
        Status::Paused => {}
        other => bail!("container {} is {}, not paused", args.id, other.name()),
    }
    sandbox(&dir, &state)?.agent().freeze(&args.id, false)?;
    std::fs::remove_file(dir.join(PAUSED))?;
    Ok(ExitCode::SUCCESS)
}

fn status(dir: &Path, state: &State) -> Status {
    if state.exit_status.is_some() || !monitor_alive(state.monitor_pid, dir) {
        Status::Stopped
    } else if dir.join(PAUSED).exists() {
        Status::Paused
    } else if dir.join("started").exists() {
        Status::Running
    } else {
        Status::Created
    }
}

/// The container's sandbox, as its monitor booted it in `dir`.
fn sandbox(dir: &Path, state: &State) -> anyhow::Result<Sandbox> {
    let confinement = capsid_runtime::Config::load()
        .unwrap_or_default()
        .confinement();
    Sandbox::reopen(
        &state.id,
        dir,
        state.vmm_pid,
        confinement,
        Duration::from_secs(5),
        AGENT_IO_TIMEOUT,
    )
    .context("cannot reach the container's micro-VM")
}

pub fn create(root: &Root, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    if let Some(socket) = &args.console_socket {
        bail!(
            "--console-socket {}: a terminal for a created container is not supported yet; \
             create it without one (docker and podman: without -t), or use `capsid run -t`",
            socket.display()
        );
    }
    let dir = root.dir(&args.id)?;
    let bundle = std::fs::canonicalize(&args.bundle)
        .with_context(|| format!("bundle {}", args.bundle.display()))?;
    if !bundle.join("config.json").is_file() {
        bail!("bundle {}: no config.json", bundle.display());
    }
    std::fs::create_dir_all(&root.root)
        .with_context(|| format!("cannot create {}", root.root.display()))?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!("container {} already exists", args.id)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let me = match std::env::current_exe() {
        Ok(me) => me,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
    };
    let mut command = Command::new(me);
    command
        .arg("monitor")
        .arg("--root")
        .arg(&root.root)
        .arg("--bundle")
        .arg(&bundle);
    for (flag, value) in [
        ("--kernel", &args.artifacts.kernel),
        ("--initrd", &args.artifacts.initrd),
        ("--vmm", &args.artifacts.vmm),
    ] {
        if let Some(value) = value {
            command.arg(flag).arg(value);
        }
    }
    command.arg(&args.id);
    let answer = match start_in_own_session(command) {
        Ok((_, answer)) => answer,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e).context("cannot start the monitor");
        }
    };
    // One line: "ok", or the error.
    if answer.trim() != "ok" {
        // The monitor removed what it made; say what it said.
        let _ = std::fs::remove_dir_all(&dir);
        bail!("{}", answer.trim().trim_start_matches("error: "));
    }
    if let Some(pid_file) = &args.pid_file {
        let state = read_state(&dir)?;
        std::fs::write(pid_file, state.monitor_pid.to_string())
            .with_context(|| format!("cannot write {}", pid_file.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The monitor: owns the VM from create to exit. Errors before "ok" go to
/// the ready pipe, and nothing it made is left.
pub fn monitor(root: &Root, args: &MonitorArgs) -> anyhow::Result<ExitCode> {
    // SAFETY: fcntl on a plain fd number; create's pre_exec put the ready
    // pipe there. Close-on-exec, so the VMM does not inherit it.
    if unsafe { libc::fcntl(READY_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        bail!("no ready pipe: `capsid monitor` is started by `capsid create`");
    }
    // SAFETY: the fd is open (checked above) and owned here alone.
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    let dir = root.dir(&args.id)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let set_up = || -> anyhow::Result<(Arc<Sandbox>, Container<Copies>)> {
        let config = args.artifacts.config()?;
        let spec = capsid_runtime::spec::load(&args.bundle.join("config.json"))?;
        // Before anything is made: hooks capsid cannot run are refused.
        hooks::check(&spec)?;
        let hook_spec = spec.clone();
        if spec
            .process()
            .as_ref()
            .and_then(|p| p.terminal())
            .unwrap_or(false)
        {
            bail!(
                "process.terminal needs a console socket, which capsid does not support yet; \
                 use `capsid run -t` or `capsid exec -t`"
            );
        }
        let size = config.size_for(&spec)?;
        let image = capsid_runtime::images::rootfs::image(
            &args.bundle.join(capsid_runtime::spec::root_path(&spec)),
            None,
            &capsid_runtime::images::cache_dir(),
        )
        .context("cannot make the rootfs image")?;
        let netns = capsid_runtime::spec::network_namespace(&spec);
        for ignored in capsid_runtime::spec::ignored_settings(&spec) {
            eprintln!("capsid: warning: {ignored}");
        }
        let (agent_spec, files) = capsid_runtime::spec::container_spec(spec)?;
        let (sandbox, rootfs) = Sandbox::boot(
            &config,
            BootRequest {
                name: &args.id,
                size,
                image: &image,
                spare_disks: 0,
                dir: &dir,
                // The state stays in it until `delete`.
                teardown: Teardown::KeepDir,
                // The monitor boots it on its main thread and lives as long.
                die_with_owner: true,
                policy: config.boot_policy(
                    AGENT_IO_TIMEOUT,
                    &|| stop.load(Ordering::Relaxed),
                    &|why| eprintln!("capsid: {why}"),
                ),
                network: netns.as_deref(),
                scratch_disk: None,
                extra_disks: &[],
                cold: false,
            },
        )?;
        let sandbox = Arc::new(sandbox);
        let request = ContainerRequest {
            id: args.id.clone(),
            rootfs,
            disk: None,
            spec: agent_spec,
            files,
            stdio: StdioRequest {
                stdin: true,
                stdout: true,
                stderr: true,
            },
            share: None,
        };
        let container = sandbox.create(request, Copies::attach)?;
        let state = State {
            id: args.id.clone(),
            bundle: args.bundle.clone(),
            monitor_pid: std::process::id(),
            vmm_pid: sandbox.vmm_pid(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
            exit_status: None,
        };
        write_state(&dir, &state)?;
        // runc's order: prestart, then createRuntime, once the container
        // exists; a failure fails create, which then leaves nothing.
        let mut json = oci_state(&state, Status::Created, Some(&hook_spec));
        // The spec's status while these run (runc's too).
        json["status"] = "creating".into();
        for phase in [hooks::Phase::Prestart, hooks::Phase::CreateRuntime] {
            hooks::run(&hook_spec, phase, &json)?;
        }
        Ok((sandbox, container))
    };
    let (sandbox, container) = match set_up() {
        Ok(parts) => parts,
        Err(e) => {
            let _ = writeln!(ready, "error: {e:#}");
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(ExitCode::FAILURE);
        }
    };
    let _ = writeln!(ready, "ok");
    drop(ready);

    // `capsid start` starts the init from its own process; the monitor
    // only waits for it.
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    let waiter = Arc::clone(sandbox.agent());
    let process = container.init.process.clone();
    std::thread::spawn(move || {
        let _ = status_tx.send(waiter.wait_process(&process));
    });
    let code = loop {
        match status_rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Ok(status)) => break status.shell_code(),
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break 255,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stop.load(Ordering::Relaxed) || !sandbox.running() {
            // `delete --force` (or the VM died): no output is owed anymore.
            sandbox.kill();
            break 128 + libc::SIGKILL;
        }
    };
    container.init.io.drain(Duration::from_secs(30));
    if let Ok(mut state) = read_state(&dir) {
        state.exit_status = Some(code);
        let _ = write_state(&dir, &state);
    }
    let _ = sandbox.shut_down();
    // The VM's socket and log go with it; the state stays until delete.
    let _ = std::fs::remove_file(capsid_runtime::vm::vsock_path(&dir));
    // The workload's status, as runc's init would give it to its waiter.
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

/// runc's detached create: the container's stdio is the monitor's (and
/// so `create`'s caller's), copied until the streams end.
#[derive(Debug)]
struct Copies(std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>);

impl Copies {
    fn attach(agent: &dyn Agent, process: &ProcessRef) -> Result<Self, SandboxError> {
        let mut copies = Vec::new();
        for (stream, fd) in [(Stream::Stdout, 1), (Stream::Stderr, 2)] {
            let mut from = agent.attach(process, stream)?;
            // SAFETY: fds 1 and 2 are ours for the monitor's life.
            let mut to = unsafe { File::from_raw_fd(libc::dup(fd)) };
            copies.push(std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
            }));
        }
        let mut to = agent.attach(process, Stream::Stdin)?;
        // SAFETY: fd 0 is ours for the monitor's life.
        let mut from = unsafe { File::from_raw_fd(libc::dup(0)) };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
        Ok(Self(std::sync::Mutex::new(copies)))
    }
}

impl ProcessIo for Copies {
    /// Waits at most `bound` for the output copies to end.
    fn drain(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        for copy in capsid_base::lock(&self.0).iter() {
            while !copy.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

pub fn start(root: &Root, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    if status(&dir, &state) != Status::Created {
        bail!(
            "container {} is {}, not created",
            args.id,
            status(&dir, &state).name()
        );
    }
    sandbox(&dir, &state)?
        .agent()
        .start_process(&ProcessRef::init(&args.id))?;
    std::fs::write(dir.join("started"), b"")?;
    // A poststart hook's failure is a warning (the spec's rule).
    if let Ok(spec) = Spec::load(state.bundle.join("config.json")) {
        let json = oci_state(&state, Status::Running, Some(&spec));
        if let Err(e) = hooks::run(&spec, hooks::Phase::Poststart, &json) {
            eprintln!("capsid: warning: {}", capsid_base::error_chain(&e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn state(root: &Root, args: &IdArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    let status = status(&dir, &state);
    let spec = Spec::load(state.bundle.join("config.json")).ok();
    let json = oci_state(&state, status, spec.as_ref());
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(ExitCode::SUCCESS)
}

/// The container's state as runc prints it and as hooks get it on stdin.
fn oci_state(state: &State, status: Status, spec: Option<&Spec>) -> serde_json::Value {
    let annotations = spec
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default();
    let rootfs = spec
        .map(|s| state.bundle.join(capsid_runtime::spec::root_path(s)))
        .unwrap_or_default();
    let created = rfc3339(UNIX_EPOCH + Duration::from_secs(state.created));
    serde_json::json!({
        "ociVersion": OCI_VERSION,
        "id": state.id,
        // The monitor stands for the container's init on the host: it
        // lives as long as the workload and exits with its status.
        "pid": if status == Status::Stopped { 0 } else { state.monitor_pid },
        "status": status.name(),
        "bundle": state.bundle,
        "rootfs": rootfs,
        "created": created,
        "owner": "",
        "annotations": annotations,
    })
}

fn parse_signal(text: &str) -> anyhow::Result<i32> {
    if let Ok(number) = text.parse::<i32>() {
        if (1..=64).contains(&number) {
            return Ok(number);
        }
        bail!("signal {number} is not 1 to 64");
    }
    let name = text.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let number = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "WINCH" => libc::SIGWINCH,
        _ => bail!("unknown signal {text:?}"),
    };
    Ok(number)
}

pub fn kill(root: &Root, args: &KillArgs) -> anyhow::Result<ExitCode> {
    let signal = parse_signal(&args.signal)?;
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    if status(&dir, &state) == Status::Stopped {
        bail!("container {} is not running", args.id);
    }
    sandbox(&dir, &state)?
        .agent()
        .signal_process(&ProcessRef::init(&args.id), signal, args.all)?;
    Ok(ExitCode::SUCCESS)
}

pub fn delete(root: &Root, args: &DeleteArgs) -> anyhow::Result<ExitCode> {
    let dir = root.dir(&args.id)?;
    let state = match read_state(&dir) {
        Ok(state) => state,
        // A create that died half-way: remove what there is.
        Err(_) if dir.is_dir() => State::default(),
        Err(e) => return Err(e),
    };
    let now = status(&dir, &state);
    if matches!(now, Status::Running | Status::Paused) && !args.force {
        bail!(
            "container {} is {}: kill it first or use --force",
            args.id,
            now.name()
        );
    }
    if monitor_alive(state.monitor_pid, &dir) {
        let pid = i32::try_from(state.monitor_pid)?;
        // SAFETY: kill() takes plain integers; the pid is our monitor's.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while monitor_alive(state.monitor_pid, &dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if monitor_alive(state.monitor_pid, &dir) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let confinement = capsid_runtime::Config::load()
        .unwrap_or_default()
        .confinement();
    capsid_runtime::vm::kill_orphans(&dir, &confinement);
    std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    // poststop, once the container is gone; a failure is a warning.
    if !state.id.is_empty()
        && let Ok(spec) = Spec::load(state.bundle.join("config.json"))
    {
        let json = oci_state(&state, Status::Stopped, Some(&spec));
        if let Err(e) = hooks::run(&spec, hooks::Phase::Poststop, &json) {
            eprintln!("capsid: warning: {}", capsid_base::error_chain(&e));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts `command` (a `capsid` verb that reports on [`READY_FD`]) in a
/// session of its own, the write end of a pipe as its `READY_FD`; returns
/// it and the first line it wrote there (empty if it ended first).
fn start_in_own_session(mut command: Command) -> anyhow::Result<(std::process::Child, String)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both were just opened and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write_end.as_raw_fd();
    // SAFETY: dup2 and setsid are async-signal-safe; the fd is open.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
            if libc::dup2(write_fd, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::setsid();
            Ok(())
        });
    }
    let child = command.spawn();
    // Only the child holds the write end now: EOF once it ends.
    drop(write_end);
    let child = child?;
    let mut answer = String::new();
    let _ = std::io::BufReader::new(File::from(read_end)).read_line(&mut answer);
    Ok((child, answer))
}

/// `exec --detach`: starts the same exec, attached, in a session of its
/// own and returns once it says the process started, its pid written to
/// `--pid-file`.
fn exec_detached(root: &Root, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let mut command = Command::new(std::env::current_exe()?);
    command.args(args.attached_args(root));
    let (child, answer) =
        start_in_own_session(command).context("cannot start the detached exec")?;
    // "ok" once the process started; else it said why on stderr and ended.
    if answer.trim() != "ok" {
        bail!("the process did not start");
    }
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, child.id().to_string())
            .with_context(|| format!("cannot write {}", pid_file.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn exec(root: &Root, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    if args.detach {
        return exec_detached(root, args);
    }
    // The ready pipe of a detached exec, close-on-exec from here.
    let ready = match args.ready_fd {
        // SAFETY: fcntl on a plain fd number.
        Some(fd) if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0 => {
            // SAFETY: the fd is open (checked above), ours alone.
            Some(unsafe { File::from_raw_fd(fd) })
        }
        Some(fd) => bail!("--ready-fd {fd} is not open"),
        None => None,
    };
    let dir = root.dir(&args.id)?;
    let state = read_state(&dir)?;
    match status(&dir, &state) {
        Status::Running => {}
        // Its process would join the frozen cgroup and hang.
        Status::Paused => bail!("container {} is paused; resume it first", args.id),
        _ => bail!("container {} is not running", args.id),
    }
    let mut process = match &args.process {
        Some(path) => {
            let text =
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not an OCI process", path.display()))?
        }
        None => {
            if args.command.is_empty() {
                bail!("no command: `capsid exec ID -- CMD...` or --process FILE");
            }
            let mut process = Spec::default().process().clone().unwrap_or_default();
            process.set_args(Some(args.command.clone()));
            process.set_terminal(Some(args.tty));
            process
        }
    };
    workload::apply(&mut process, &args.env, args.cwd.as_deref(), args.user);
    let tty = process.terminal().unwrap_or(false);
    let sandbox = sandbox(&dir, &state)?;
    let client = sandbox.agent();
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    );
    let target = ProcessRef::exec(&args.id, &exec_id);
    client.exec_process(ExecProcess {
        process: target.clone(),
        spec: process,
        stdio: attach::stdio_request(tty),
    })?;
    // This process stands for the exec'd one (as a detached one's does).
    if let Some(pid_file) = &args.pid_file {
        std::fs::write(pid_file, std::process::id().to_string())
            .with_context(|| format!("cannot write {}", pid_file.display()))?;
    }
    let signals = attach::Signals::install()?;
    // Told once the process runs: at the first look while it runs, or
    // when it ended before that.
    let ready = std::cell::RefCell::new(ready);
    let say_started = || {
        if let Some(mut ready) = ready.borrow_mut().take() {
            let _ = writeln!(ready, "ok");
        }
    };
    let mut started = || {
        say_started();
        Ok(())
    };
    let ended = attach::run_attached(
        &attach::Session {
            agent: client,
            process: &target,
            tty,
            timeout: None,
            signals: &signals,
            traffic: &Arc::default(),
        },
        &mut started,
    )?;
    say_started();
    Ok(ended.ended.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_and_features_read_as_runcs() {
        let version = version();
        let lines: Vec<&str> = version.lines().collect();
        assert!(lines[0].starts_with("capsid version "), "{version}");
        assert!(lines[1].starts_with("commit: "), "{version}");
        assert_eq!(lines[2], format!("spec: {OCI_VERSION}"));
        // The OCI features document, as the spec's types read it.
        let features: oci_spec::runtime::Features =
            serde_json::from_value(features_document()).unwrap();
        assert_eq!(features.oci_version_max(), OCI_VERSION);
        let linux = features.linux().as_ref().unwrap();
        assert!(
            linux
                .capabilities()
                .as_ref()
                .unwrap()
                .contains(&"CAP_SYS_ADMIN".to_owned())
        );
        let seccomp = linux.seccomp().as_ref().unwrap();
        assert_eq!(seccomp.enabled(), &Some(true));
        assert!(features.mount_options().as_ref().unwrap().len() > 20);
    }

    #[test]
    fn log_lines_are_runcs_text_or_json() {
        let time = "2026-12-02T16:00:00.5Z";
        let json = log_line(LogFormat::Json, time, "bad \"bundle\"");
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["level"], "error");
        assert_eq!(parsed["msg"], "bad \"bundle\"");
        assert_eq!(parsed["time"], time);
        assert!(json.ends_with('\n'));
        assert_eq!(
            log_line(LogFormat::Text, time, "bad \"bundle\""),
            "time=\"2026-12-02T16:00:00.5Z\" level=error msg=\"bad \\\"bundle\\\"\"\n"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(86_400)),
            "1970-01-02T00:00:00Z"
        );
    }

    #[test]
    fn a_missing_container_is_named_without_an_os_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_state(&dir.path().join("c9")).unwrap_err().to_string();
        assert_eq!(e, "container c9 does not exist");
    }

    #[test]
    fn signals_parse_by_name_or_number() {
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("SIGTERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("0").is_err() && parse_signal("BOGUS").is_err());
    }

    #[test]
    fn long_roots_are_refused_before_a_socket_path_overflows() {
        let root = Root {
            root: PathBuf::from("/run/".to_owned() + &"x".repeat(90)),
        };
        assert!(root.dir("c1").unwrap_err().to_string().contains("too long"));
        assert!(
            Root {
                root: DEFAULT_ROOT.into()
            }
            .dir("../x")
            .is_err()
        );
    }
}
