//! `capsid run`: one command in a fresh micro-VM, attached.
//!
//! ```text
//!  probe KVM ─▶ rootfs DIR → erofs image (cached) ─▶ scratch dir
//!   ─▶ spawn capsid-vmm (kernel, agent initramfs, image as disk "rootfs",
//!      vsock socket in the scratch dir) ─▶ agent answers
//!   ─▶ CreateContainer ─▶ attach stdin/stdout/stderr ─▶ Start ─▶ Wait
//!   ─▶ Shutdown ─▶ VMM exits ─▶ scratch dir removed ─▶ exit with the status
//! ```
//!
//! SIGINT, SIGTERM and SIGHUP are passed on to the command once it runs (a
//! second one kills it; `attach`). Whatever happens (an error, a timeout, a
//! signal before the command ran), the VMM is killed
//! and the scratch directory removed before `capsid` exits. A SIGKILL takes
//! the VMM with it (its parent-death signal); the scratch directory and the
//! VM's cgroup it leaves are removed by the next `capsid run` or `capsid
//! doctor` ([`capsid_runtime::scratch`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use capsid_runtime::config::parse_size_mib;
use capsid_runtime::protocol::{ClientError, ContainerStats, ExitStatus, Rootfs};
use capsid_runtime::scratch::{self, Scratch};
use capsid_runtime::vmm_api::host::{self, HostReport, Mode, Probe};
use capsid_runtime::{
    BootRequest, Config, ContainerRequest, MicroVmError, Sandbox, SandboxError, Teardown, VmSize,
};
use clap::Args;
use oci_spec::runtime::Spec;

use crate::attach;
use crate::workload::{self, Workload};

/// Where the guest kernel, initramfs and VMM are: these flags, else the
/// environment (CAPSID_KERNEL, CAPSID_AGENT_INITRAMFS, CAPSID_VMM), else the
/// configuration file (CAPSID_CONFIG or /etc/capsid/config.toml).
#[derive(Args, Debug)]
pub struct Artifacts {
    /// Guest kernel (vmlinux).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initramfs with capsid-agent as /init.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The capsid-vmm binary (default: next to capsid, then PATH).
    #[arg(long)]
    pub vmm: Option<PathBuf>,
}

impl Artifacts {
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load()?;
        if let Some(kernel) = &self.kernel {
            config.kernel = kernel.clone();
        }
        if let Some(initrd) = &self.initrd {
            config.initramfs = initrd.clone();
        }
        if let Some(vmm) = &self.vmm {
            config.vmm = vmm.clone();
        }
        Ok(config)
    }
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The container's root file system, a directory (converted to an erofs
    /// image once per content, cached in $CAPSID_CACHE).
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    rootfs: Option<PathBuf>,
    /// An OCI image layout directory, with :TAG when it holds several
    /// (unpacked once, cached in $CAPSID_CACHE); its Entrypoint, Cmd, Env,
    /// WorkingDir and User apply unless the command line says otherwise.
    #[arg(long, value_name = "OCI-LAYOUT[:TAG]")]
    image: Option<String>,
    /// vCPUs of the micro-VM (default: the configuration's, 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=32))]
    cpus: Option<u32>,
    /// Memory of the micro-VM: a number with an optional K, M or G suffix
    /// (default: the configuration's, 256M).
    #[arg(long, value_parser = parse_size_mib)]
    memory: Option<u32>,
    /// The container's writable layer on a sparse scratch disk of this
    /// size (a number with K, M or G; made per run, never mounted on the
    /// host) instead of the guest's memory, so a disk filler stops at
    /// ENOSPC; without it, writes count against --memory.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    disk: Option<u64>,
    /// A host directory in the container (repeatable): `:ro` (the
    /// default) as a read-only erofs image of it, cached by content; `:rw`
    /// as a writable ext4 copy made for the run, which is dropped after.
    /// The guest never sees the host's file system, only images of it.
    #[arg(long = "volume", short = 'v', value_name = "HOST_DIR:GUEST_PATH[:ro|:rw]", value_parser = parse_volume)]
    volumes: Vec<Volume>,
    /// A persistent cache (repeatable): an ext4 image kept as
    /// $CAPSID_CACHE/caches/NAME.ext4 between runs (made empty, of SIZE,
    /// default 1G, the first time), mounted read-write at GUEST_PATH, never
    /// on the host, and held by one run at a time.
    #[arg(long = "cache", value_name = "NAME:GUEST_PATH[:SIZE]", value_parser = parse_cache)]
    caches: Vec<CacheArg>,
    /// The most processes and threads the container may have at once
    /// (its cgroup's pids.max in the guest; -1: no limit, the default), so
    /// a fork bomb stops there.
    #[arg(long, value_name = "N", allow_hyphen_values = true, value_parser = parse_pids_limit)]
    pids_limit: Option<i64>,
    /// An environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<String>,
    /// UID[:GID] to run the command as.
    #[arg(long, short = 'u', value_parser = parse_user)]
    user: Option<(u32, u32)>,
    /// Give the command a terminal.
    #[arg(long, short = 't')]
    tty: bool,
    /// Kill the command after this long (e.g. 30s, 5m); exit status 124.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Boot the guest kernel instead of restoring the micro-VM from its
    /// template (a snapshot of a booted guest, made by the first run of
    /// each size); the configuration's `warm_start = false` does this for
    /// every run. A run with a network, --disk or volumes always boots.
    #[arg(long)]
    cold: bool,
    /// seccomp=unconfined runs the command without the default seccomp
    /// profile (Docker's, which among others refuses vsock sockets);
    /// seccomp=PATH uses the OCI profile in that JSON file instead.
    #[arg(long = "security-opt", value_name = "seccomp=unconfined|seccomp=PATH", value_parser = parse_security_opt)]
    security_opt: Vec<SecurityOpt>,
    /// The micro-VM's network: none (no network device; only loopback);
    /// nat, a network of its own that reaches out through the host
    /// (masqueraded, as Docker's bridge network); or netns:PATH, the
    /// interfaces of the network namespace at PATH (made by `ip netns
    /// add`, CNI or a container engine) with their addresses and routes.
    #[arg(long, value_name = "none|nat|netns:PATH", default_value = "none", value_parser = parse_network)]
    network: Network,
    /// With --network nat: publish the workload's port on the host's
    /// (HOST_PORT:CONTAINER_PORT[/tcp|/udp], repeatable), for connections
    /// from other hosts and namespaces.
    #[arg(long = "publish", short = 'p', value_name = "HOST:CONTAINER[/udp]")]
    publish: Vec<capsid_runtime::nat::Publish>,
    /// With --network nat: the only destinations the workload may open
    /// connections to (IPv4 CIDR, with a TCP/UDP port or any), enforced by
    /// the host's nftables where nothing in the guest can change it.
    /// Link-local addresses (cloud metadata) are refused unless listed,
    /// also without --egress.
    #[arg(long, value_name = "allow=CIDR[:PORT],…")]
    egress: Option<capsid_runtime::nat::Egress>,
    /// A secret for the command (repeatable): FILE's contents at
    /// /run/secrets/NAME in the container, read-only. It goes over vsock
    /// into guest memory only: never into an image, a disk, a cache or a
    /// log (requests are logged with the files' sizes alone).
    #[arg(long = "secret", value_name = "NAME=@FILE", value_parser = parse_secret)]
    secrets: Vec<Secret>,
    /// When the command ends (also on a failure or --timeout), copy the
    /// container's GUEST_DIR to HOST_DIR (repeatable). The host checks
    /// every entry — no absolute paths, no `..`, no link leading outside,
    /// no hard links, devices, fifos or set-id bits, at most 1 GiB and
    /// 100,000 entries — and HOST_DIR (new, or an empty directory) appears
    /// only when all of it was accepted; a refused entry is named.
    #[arg(long = "output", value_name = "GUEST_DIR:HOST_DIR", value_parser = parse_output)]
    outputs: Vec<Output>,
    /// The most bytes of file contents each --output may hold (a number
    /// with an optional K, M or G suffix; default 1G).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    output_max_bytes: Option<u64>,
    /// The most entries (files, directories, links) each --output may
    /// hold (default 100000).
    #[arg(long, value_name = "N")]
    output_max_entries: Option<u64>,
    /// Write what a CI system shows its users to FILE (JSON), also when
    /// the run fails: the exit status, the signal, whether the OOM killer
    /// or --timeout ended it, durations (image, boot, run, output), the
    /// container's peak memory and the bytes of each stream.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    #[command(flatten)]
    artifacts: Artifacts,
    /// The command and its arguments (with --image: the image's Cmd if none).
    /// Options before it are capsid's: an unknown one is an error, not the
    /// command (`--` ends them, for a command that starts with `-`).
    #[arg(trailing_var_arg = true)]
    command: Vec<String>,
}

#[cfg(test)]
impl RunArgs {
    /// The command as parsed.
    pub fn command(&self) -> Vec<String> {
        self.command.clone()
    }
}

/// A `--volume HOST_DIR:GUEST_PATH[:ro|:rw]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    host: PathBuf,
    guest: String,
    writable: bool,
}

pub fn parse_volume(text: &str) -> Result<Volume, String> {
    let bad = || format!("{text:?} is not HOST_DIR:GUEST_PATH[:ro|:rw] (GUEST_PATH absolute)");
    let (rest, writable) = match text.rsplit_once(':') {
        Some((rest, "ro")) => (rest, false),
        Some((rest, "rw")) => (rest, true),
        _ => (text, false),
    };
    match rest.split_once(':') {
        Some((host, guest))
            if !host.is_empty()
                && guest.starts_with('/')
                && guest != "/"
                && !guest.contains(':') =>
        {
            Ok(Volume {
                host: host.into(),
                guest: guest.to_owned(),
                writable,
            })
        }
        _ => Err(bad()),
    }
}

/// A `--cache NAME:GUEST_PATH[:SIZE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheArg {
    name: String,
    guest: String,
    bytes: u64,
}

/// A new cache's size unless given.
const CACHE_BYTES: u64 = 1 << 30;

pub fn parse_cache(text: &str) -> Result<CacheArg, String> {
    let bad = || format!("{text:?} is not NAME:GUEST_PATH[:SIZE] (GUEST_PATH absolute)");
    let mut parts = text.splitn(3, ':');
    let (Some(name), Some(guest)) = (parts.next(), parts.next()) else {
        return Err(bad());
    };
    if !capsid_runtime::images::caches::valid_name(name) {
        return Err(format!(
            "{name:?}: a cache's name is 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)"
        ));
    }
    if !guest.starts_with('/') || guest == "/" {
        return Err(bad());
    }
    let bytes = match parts.next() {
        Some(size) => parse_bytes(size)?,
        None => CACHE_BYTES,
    };
    Ok(CacheArg {
        name: name.to_owned(),
        guest: guest.to_owned(),
        bytes,
    })
}

/// The most volumes and caches one run attaches.
const MAX_EXTRA_DISKS: usize = 8;

/// What `--volume` and `--cache` give the VM: its disks, the container's
/// mounts of them, and the caches' locks, held for the run.
#[derive(Default)]
struct ExtraDisks {
    disks: Vec<capsid_runtime::Disk>,
    mounts: Vec<oci_spec::runtime::Mount>,
    held: Vec<capsid_runtime::images::caches::HeldCache>,
}

fn disk_mount(
    guest: &str,
    id: &str,
    fstype: &str,
    writable: bool,
) -> anyhow::Result<oci_spec::runtime::Mount> {
    let mut options = vec!["nosuid".to_owned(), "nodev".to_owned()];
    if !writable {
        options.push("ro".into());
    }
    oci_spec::runtime::MountBuilder::default()
        .destination(guest)
        .typ(fstype)
        .source(format!("disk:{id}"))
        .options(options)
        .build()
        .context("a disk's mount")
}

/// Images the volumes (read-only ones cached by content, writable ones
/// copied into `scratch`) and takes the caches.
fn extra_disks(args: &RunArgs, disk_dir: &Path) -> anyhow::Result<ExtraDisks> {
    use capsid_runtime::images::{caches, rootfs};
    if args.volumes.len() + args.caches.len() > MAX_EXTRA_DISKS {
        bail!("at most {MAX_EXTRA_DISKS} --volume and --cache in all");
    }
    let mut extra = ExtraDisks::default();
    let cache_dir = capsid_runtime::images::cache_dir();
    for (n, volume) in args.volumes.iter().enumerate() {
        let what = || format!("--volume {}", volume.host.display());
        if !volume.host.is_dir() {
            bail!("{}: not a directory", what());
        }
        let format = if volume.writable {
            rootfs::Format::Ext4
        } else {
            rootfs::Format::Erofs
        };
        let progress = attach::Progress::start(&format!("imaging {}", volume.host.display()));
        let image = rootfs::image(&volume.host, Some(format), &cache_dir).with_context(what)?;
        drop(progress);
        let id = format!("vol{n}");
        // The cached image stays as it was made: the guest writes a copy.
        let file = if volume.writable {
            let copy = rootfs::anonymous_copy(disk_dir, &image.path)
                .with_context(|| format!("{}: copy its image", what()))?;
            Some(capsid_runtime::DiskFile(std::sync::Arc::new(copy)))
        } else {
            None
        };
        extra.disks.push(capsid_runtime::Disk {
            file,
            path: image.path.clone(),
            read_only: !volume.writable,
            id: id.clone(),
        });
        extra.mounts.push(disk_mount(
            &volume.guest,
            &id,
            image.format.name(),
            volume.writable,
        )?);
    }
    for (n, cache) in args.caches.iter().enumerate() {
        let held = caches::hold(&cache_dir, &cache.name, cache.bytes)
            .with_context(|| format!("--cache {}", cache.name))?;
        let id = format!("cache{n}");
        extra.disks.push(capsid_runtime::Disk {
            file: None,
            path: held.path.clone(),
            read_only: false,
            id: id.clone(),
        });
        extra
            .mounts
            .push(disk_mount(&cache.guest, &id, "ext4", true)?);
        extra.held.push(held);
    }
    Ok(extra)
}

/// A `--output GUEST_DIR:HOST_DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    guest: String,
    host: PathBuf,
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    capsid_base::parse_size(text, capsid_base::BareUnit::Bytes)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a size like 512K, 100M or 2G"))
}

pub fn parse_output(text: &str) -> Result<Output, String> {
    match text.split_once(':') {
        Some((guest, host)) if guest.starts_with('/') && !host.is_empty() => Ok(Output {
            guest: guest.to_owned(),
            host: host.into(),
        }),
        _ => Err(format!(
            "{text:?} is not GUEST_DIR:HOST_DIR (GUEST_DIR absolute, in the container)"
        )),
    }
}

/// How long the output stream may stall before it is given up on.
const OUTPUT_IDLE: Duration = Duration::from_secs(30);
/// How long one output may take in all: a guest that drip-feeds it
/// (a byte just within [`OUTPUT_IDLE`]) cannot hold capsid for longer.
const OUTPUT_DEADLINE: Duration = Duration::from_secs(600);

/// A reader that fails once `until` has passed.
struct Until<R> {
    inner: R,
    until: Instant,
}

impl<R: std::io::Read> std::io::Read for Until<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if Instant::now() > self.until {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the output took longer than {} s",
                    OUTPUT_DEADLINE.as_secs()
                ),
            ));
        }
        self.inner.read(buf)
    }
}

/// Copies each `--output` out of the finished container; what to report
/// of each, and whether all arrived.
fn collect_outputs(
    outputs: &[Output],
    limits: capsid_runtime::images::output::Limits,
    agent: &dyn capsid_runtime::Agent,
) -> (Vec<OutputReport>, bool) {
    use capsid_runtime::images::output;
    let mut reports = Vec::new();
    let mut all = true;
    for out in outputs {
        let started = Instant::now();
        let result = agent
            .archive(CONTAINER_ID, &out.guest, OUTPUT_IDLE)
            .map_err(anyhow::Error::from)
            .and_then(|stream| {
                let bounded = Until {
                    inner: stream,
                    until: started + OUTPUT_DEADLINE,
                };
                output::unpack(bounded, &out.host, limits).map_err(Into::into)
            });
        let mut report = OutputReport {
            guest: out.guest.clone(),
            host: out.host.display().to_string(),
            ms: millis(started.elapsed()),
            ..OutputReport::default()
        };
        match result {
            Ok(unpacked) => {
                report.files = unpacked.files;
                report.bytes = unpacked.bytes;
                eprintln!(
                    "capsid: copied {} to {}: {} files, {} bytes",
                    out.guest,
                    out.host.display(),
                    unpacked.files,
                    unpacked.bytes
                );
            }
            Err(e) => {
                all = false;
                let message = format!(
                    "--output {}: {e:#}; nothing was written to {}",
                    out.guest,
                    out.host.display()
                );
                eprintln!("capsid: {message}");
                report.error = Some(message);
            }
        }
        reports.push(report);
    }
    (reports, all)
}

/// A `--secret NAME=@FILE`, before it is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    name: String,
    file: PathBuf,
}

/// Where the container sees its secrets, as docker's.
const SECRETS_DIR: &str = "/run/secrets";

pub fn parse_secret(text: &str) -> Result<Secret, String> {
    let Some((name, file)) = text.split_once("=@") else {
        return Err(format!("{text:?} is not NAME=@FILE"));
    };
    let plain = !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !plain {
        return Err(format!(
            "{name:?}: a secret's name is 1 to 64 of A-Z a-z 0-9 . _ - (it becomes {SECRETS_DIR}/NAME)"
        ));
    }
    if file.is_empty() {
        return Err(format!("{text:?}: no FILE after =@"));
    }
    Ok(Secret {
        name: name.to_owned(),
        file: file.into(),
    })
}

/// The secrets' contents, read before anything boots, with the bind
/// mounts that show them (`file:N` sources; the agent writes them into
/// its own memory), within what one request may copy.
fn read_secrets(
    secrets: &[Secret],
) -> anyhow::Result<(Vec<Vec<u8>>, Vec<oci_spec::runtime::Mount>)> {
    use capsid_runtime::protocol::{FILE_SOURCE, MAX_COPIED_BYTES, MAX_COPIED_FILES};
    if secrets.len() > MAX_COPIED_FILES {
        bail!("{} secrets: at most {MAX_COPIED_FILES}", secrets.len());
    }
    let mut files = Vec::new();
    let mut mounts = Vec::new();
    let mut total = 0;
    for (n, secret) in secrets.iter().enumerate() {
        if secrets[..n].iter().any(|s| s.name == secret.name) {
            bail!("--secret {}: given twice", secret.name);
        }
        let what = || format!("--secret {}: {}", secret.name, secret.file.display());
        let metadata = std::fs::metadata(&secret.file).with_context(what)?;
        if !metadata.is_file() {
            bail!("{}: not a regular file", what());
        }
        let room = MAX_COPIED_BYTES - total;
        let mut contents = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(
                std::fs::File::open(&secret.file).with_context(what)?,
                room as u64 + 1,
            ),
            &mut contents,
        )
        .with_context(what)?;
        if contents.len() > room {
            bail!(
                "{}: the secrets come to more than {} KiB in all",
                what(),
                MAX_COPIED_BYTES / 1024
            );
        }
        total += contents.len();
        files.push(contents);
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(format!("{SECRETS_DIR}/{}", secret.name))
                .typ("bind")
                .source(format!("{FILE_SOURCE}{n}"))
                .options(
                    ["rbind", "ro", "nosuid", "nodev", "noexec"]
                        .map(String::from)
                        .to_vec(),
                )
                .build()
                .context("a secret's mount")?,
        );
    }
    Ok((files, mounts))
}

/// A `--network`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// No network device.
    None,
    /// A network of the run's own, masqueraded.
    Nat,
    /// The interfaces of this network namespace.
    Netns(PathBuf),
}

pub fn parse_network(text: &str) -> Result<Network, String> {
    match text.split_once(':') {
        None if text == "none" => Ok(Network::None),
        None if text == "nat" => Ok(Network::Nat),
        Some(("netns", path)) if !path.is_empty() => Ok(Network::Netns(path.into())),
        _ => Err(format!(
            "{text:?}: supported are none, nat and netns:PATH (a network namespace, e.g. /run/netns/NAME)"
        )),
    }
}

/// A `--security-opt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecurityOpt {
    /// No seccomp filter.
    SeccompUnconfined,
    /// The OCI seccomp profile in this file.
    SeccompProfile(PathBuf),
}

pub fn parse_security_opt(text: &str) -> Result<SecurityOpt, String> {
    match text.split_once('=') {
        Some(("seccomp", "unconfined")) => Ok(SecurityOpt::SeccompUnconfined),
        Some(("seccomp", path)) if !path.is_empty() => Ok(SecurityOpt::SeccompProfile(path.into())),
        _ => Err(format!(
            "{text:?}: supported are seccomp=unconfined and seccomp=PATH (an OCI profile)"
        )),
    }
}

/// The seccomp profile the command runs under: the default, none, or one
/// from a file.
fn seccomp_for(
    options: &[SecurityOpt],
    process: &oci_spec::runtime::Process,
) -> anyhow::Result<Option<oci_spec::runtime::LinuxSeccomp>> {
    match options.last() {
        Some(SecurityOpt::SeccompUnconfined) => Ok(None),
        Some(SecurityOpt::SeccompProfile(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the seccomp profile {}", path.display()))?;
            let profile = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an OCI seccomp profile", path.display()))?;
            Ok(Some(profile))
        }
        None => {
            let bounding: Vec<_> = process
                .capabilities()
                .as_ref()
                .and_then(|c| c.bounding().as_ref())
                .map(|set| set.iter().copied().collect())
                .unwrap_or_default();
            Ok(Some(capsid_runtime::seccomp_profile::default_profile(
                &bounding,
            )))
        }
    }
}

pub fn parse_env(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() => Ok(text.to_owned()),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

pub fn parse_user(text: &str) -> Result<(u32, u32), String> {
    let number = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{text:?}: use numeric UID[:GID] (names are not looked up)"))
    };
    match text.split_once(':') {
        Some((uid, gid)) => Ok((number(uid)?, number(gid)?)),
        None => number(text).map(|uid| (uid, uid)),
    }
}

fn parse_pids_limit(text: &str) -> Result<i64, String> {
    match text.parse::<i64>() {
        Ok(n) if n >= 1 || n == -1 => Ok(n),
        _ => Err(format!(
            "{text:?}: give a number of processes, 1 or more (-1: no limit)"
        )),
    }
}

/// `spec` with the container's cgroup limits from the command line.
fn with_limits(mut spec: Spec, pids_limit: Option<i64>) -> anyhow::Result<Spec> {
    let Some(limit) = pids_limit.filter(|&n| n > 0) else {
        return Ok(spec);
    };
    let mut linux = spec.linux().clone().unwrap_or_default();
    let mut resources = linux.resources().clone().unwrap_or_default();
    resources.set_pids(Some(
        oci_spec::runtime::LinuxPidsBuilder::default()
            .limit(limit)
            .build()
            .context("the pids limit")?,
    ));
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));
    Ok(spec)
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s or 5m"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("{text:?}: the unit must be s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

/// Progress lines on stderr when CAPSID_DEBUG is set.
macro_rules! debug {
    ($($arg:tt)*) => {
        if std::env::var_os("CAPSID_DEBUG").is_some() {
            eprintln!("capsid: {}", format_args!($($arg)*));
        }
    };
}

const CONTAINER_ID: &str = "run";

/// How long `capsid-vmm --probe` may take (its tiny guest gives up after
/// 10 s).
const PROBE_DEADLINE: Duration = Duration::from_secs(20);

/// The KVM verdict `capsid run` acts on. A native one is kept in
/// `RUN_DIR/kvm-probe.json` for this boot of the host and this capsid-vmm
/// binary, so that a run does not pay for the probe's exec and tiny VM
/// each time (a few hundred ms in the nested test host); `capsid doctor`
/// always asks afresh, and `CAPSID_TESTBED_MODE` bypasses the file.
fn kvm_verdict(run_dir: &Path, vmm: &Path) -> anyhow::Result<Probe> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Cached {
        key: String,
        kvm: Probe,
    }
    let file = run_dir.join("kvm-probe.json");
    let key = probe_key(vmm).filter(|_| std::env::var_os("CAPSID_TESTBED_MODE").is_none());
    if let Some(key) = &key
        && let Ok(text) = std::fs::read_to_string(&file)
        && let Ok(cached) = serde_json::from_str::<Cached>(&text)
        && cached.key == *key
        && cached.kvm.mode == Mode::Native
    {
        return Ok(cached.kvm);
    }
    let kvm = ask_vmm(vmm)?.kvm;
    if let Some(key) = key
        && kvm.mode == Mode::Native
        && run_dir.is_dir()
    {
        // Whole or not at all; a failure only costs the next run a probe.
        let json = serde_json::to_vec(&Cached {
            key,
            kvm: kvm.clone(),
        })?;
        let partial = run_dir.join(format!(".kvm-probe.{}", std::process::id()));
        if std::fs::write(&partial, json)
            .and_then(|()| std::fs::rename(&partial, &file))
            .is_err()
        {
            let _ = std::fs::remove_file(&partial);
        }
    }
    Ok(kvm)
}

/// What a cached verdict holds for: this boot of the host, this binary.
fn probe_key(vmm: &Path) -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let binary = std::fs::metadata(vmm).ok()?;
    let modified = binary
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!(
        "{} {} {} {}",
        boot.trim(),
        vmm.display(),
        binary.len(),
        modified.as_nanos()
    ))
}

/// Asks capsid-vmm what this host gives a VMM: can its KVM boot a Linux
/// guest, and which walls (`capsid-vmm --probe`).
pub fn ask_vmm(vmm: &Path) -> anyhow::Result<HostReport> {
    host::ask(vmm, PROBE_DEADLINE)
        .with_context(|| format!("cannot ask {} --probe about this host", vmm.display()))
}

/// `--report FILE.json`: one run, for a CI system's users.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    /// capsid's exit status.
    exit_status: u8,
    /// The command's exit code, if it exited.
    exit_code: Option<i32>,
    /// The signal that ended the command, if one did.
    signal: Option<i32>,
    /// The out-of-memory killer ended it.
    oom_killed: bool,
    /// `--timeout` ended it.
    timed_out: bool,
    /// Why capsid failed, if it did.
    error: Option<String>,
    /// How the micro-VM started: "restored" from its template, or
    /// "booted" (`--cold`, a network, a disk, or no template).
    start: Option<&'static str>,
    /// Milliseconds of each step that ran.
    durations_ms: Durations,
    /// The container's peak memory (its cgroup's memory.peak).
    peak_memory_bytes: Option<u64>,
    /// What each stream carried.
    bytes: Bytes,
    /// Each `--output`.
    outputs: Vec<OutputReport>,
}

#[derive(Debug, Default, serde::Serialize)]
struct OutputReport {
    guest: String,
    host: String,
    files: u64,
    bytes: u64,
    /// Milliseconds to copy it.
    ms: u64,
    /// Why it was refused or failed; then nothing is at `host`.
    error: Option<String>,
}

#[derive(Debug, Default, serde::Serialize)]
struct Durations {
    /// Checking the arguments, the host and the boot files.
    prepare: Option<u64>,
    /// The rootfs image (or the image unpacked and converted).
    image: Option<u64>,
    /// Making the `--disk` scratch disk.
    disk: Option<u64>,
    /// Spawning the VMM until its agent answered (restored: and the
    /// rootfs image attached).
    boot: Option<u64>,
    /// Creating the container in the guest.
    create: Option<u64>,
    /// The command's start to its exit.
    run: Option<u64>,
    /// Its exit to the end of its output.
    output: Option<u64>,
    /// Taking the micro-VM down.
    shutdown: Option<u64>,
    /// All of `capsid run`.
    total: u64,
}

#[derive(Debug, Default, serde::Serialize)]
struct Bytes {
    stdin: u64,
    stdout: u64,
    stderr: u64,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Report {
    /// Written whole or not at all: to a temporary file beside it, then
    /// renamed.
    fn write(&self, path: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        let partial = path.with_extension(format!("partial.{}", std::process::id()));
        std::fs::write(&partial, json)
            .and_then(|()| std::fs::rename(&partial, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                anyhow::anyhow!("cannot write the report {}: {e}", path.display())
            })
    }
}

/// A `--report` whose directory is missing is named before anything boots.
fn check_report_path(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "--report {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("--report {}: a directory, not a file", path.display());
    }
    Ok(())
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.report.clone() else {
        return run_with(&args, &mut Report::default());
    };
    check_report_path(&path)?;
    let started = Instant::now();
    let mut report = Report::default();
    let result = run_with(&args, &mut report);
    report.durations_ms.total = millis(started.elapsed());
    if let Err(e) = &result {
        report.exit_status = crate::failure_status(e);
        report.error = Some(format!("{e:#}"));
    }
    if let Err(e) = report.write(&path) {
        eprintln!("capsid: {e:#}");
    }
    result
}

fn run_with(args: &RunArgs, report: &mut Report) -> anyhow::Result<ExitCode> {
    let preparing = Instant::now();
    if !args.publish.is_empty() && args.network != Network::Nat {
        bail!("--publish needs --network nat: a published port leads into the run's own network");
    }
    if args.egress.is_some() && args.network != Network::Nat {
        bail!(
            "--egress needs --network nat: it filters the run's own network \
             (without a network the workload reaches nothing)"
        );
    }
    if let Some(rootfs) = &args.rootfs {
        workload::check_rootfs(rootfs)?;
    }
    for out in &args.outputs {
        capsid_runtime::images::output::check_destination(&out.host)
            .with_context(|| format!("--output {}", out.guest))?;
    }
    let config = args.artifacts.config()?;
    // A missing kernel, initramfs or VMM is named before anything else.
    let files = config.boot_files()?;
    let swept = scratch::sweep(&config.run_dir, &config.confinement());
    for dir in &swept.dirs {
        eprintln!(
            "capsid: removed {}, left with its micro-VM by a capsid run that was killed",
            dir.display()
        );
    }
    for cgroup in &swept.cgroups {
        eprintln!(
            "capsid: removed the empty cgroup {}, left by a micro-VM's teardown",
            cgroup.display()
        );
    }
    debug!("probing KVM");
    let verdict = kvm_verdict(&config.run_dir, &files.vmm)?;
    if verdict.mode != Mode::Native {
        bail!(
            "this host's KVM cannot boot a Linux guest ({}). Run capsid on a host with \
             hardware virtualization; on this one, `make demo` runs inside a nested test host",
            verdict.reason
        );
    }
    let workload = workload::resolve(
        &workload::Overrides {
            rootfs: args.rootfs.as_deref(),
            image: args.image.as_deref(),
            command: &args.command,
            env: &args.env,
            user: args.user,
        },
        &capsid_runtime::images::cache_dir(),
    )?;
    let (secret_files, secret_mounts) = read_secrets(&args.secrets)?;
    let signals = attach::Signals::install()?;
    report.durations_ms.prepare = Some(millis(preparing.elapsed()));

    let started = Instant::now();
    debug!("rootfs image for {}", workload.rootfs.display());
    let progress = attach::Progress::start("making the rootfs image");
    let image = capsid_runtime::images::rootfs::image(
        &workload.rootfs,
        None,
        &capsid_runtime::images::cache_dir(),
    )
    .context("cannot make the rootfs image")?;
    drop(progress);
    report.durations_ms.image = Some(millis(started.elapsed()));
    if image.built {
        eprintln!(
            "capsid: converted {} to an {} image in {:.1} s (cached for next time)",
            workload.rootfs.display(),
            image.format.name(),
            started.elapsed().as_secs_f64()
        );
    }
    let scratch = Scratch::create(&config.run_dir).with_context(|| {
        format!(
            "cannot make a scratch directory in {}",
            scratch::runs_dir(&config.run_dir).display()
        )
    })?;
    // Declared before the sandbox: it goes after the VM.
    let nat = match args.network {
        Network::Nat => Some(
            capsid_runtime::nat::NatNetwork::create(
                scratch.path(),
                &args.publish,
                args.egress.as_ref(),
            )
            .context("cannot make the run's network (--network nat)")?,
        ),
        _ => None,
    };
    let netns = match (&args.network, &nat) {
        (Network::Netns(path), _) => Some(path.clone()),
        (Network::Nat, Some(nat)) => Some(nat.netns()),
        _ => None,
    };
    let extra = extra_disks(args, &config.disk_dir)?;
    let scratch_disk = match args.disk {
        Some(bytes) => {
            let made = Instant::now();
            let progress = attach::Progress::start("making the scratch disk");
            let file =
                capsid_runtime::images::rootfs::anonymous_scratch_disk(&config.disk_dir, bytes)
                    .context("cannot make the scratch disk (--disk)")?;
            drop(progress);
            report.durations_ms.disk = Some(millis(made.elapsed()));
            Some(capsid_runtime::DiskFile(std::sync::Arc::new(file)))
        }
        None => None,
    };
    // Wait for the agent, but notice a VMM that died and a signal meanwhile.
    let wait = config.agent_timeout();
    let progress = attach::Progress::start("booting the micro-VM");
    let booting = Instant::now();
    let (sandbox, rootfs) = Sandbox::boot(
        &config,
        BootRequest {
            name: CONTAINER_ID,
            size: VmSize {
                vcpus: args.cpus.unwrap_or(config.vcpus),
                memory_mib: args.memory.unwrap_or(config.memory_mib),
            },
            image: &image,
            spare_disks: 0,
            dir: scratch.path(),
            // `scratch` removes it, and sweeps it after a SIGKILL.
            teardown: Teardown::KeepDir,
            // Booted on the main thread: the VM dies with this process,
            // even of a SIGKILL.
            die_with_owner: true,
            network: netns.as_deref(),
            scratch_disk: scratch_disk.as_ref(),
            extra_disks: &extra.disks,
            cold: args.cold,
            policy: config.boot_policy(wait, &|| signals.any(), &|why| {
                progress.say(&format!("capsid: {why}"));
            }),
        },
    )?;
    let sandbox = Arc::new(sandbox);
    drop(progress);
    report.durations_ms.boot = Some(millis(booting.elapsed()));
    report.start = Some(if sandbox.restored() {
        "restored"
    } else {
        "booted"
    });
    debug!("agent answered: {}", sandbox.agent().describe());
    let mut mounts = secret_mounts;
    mounts.extend(extra.mounts.iter().cloned());
    let additions = Additions {
        files: secret_files,
        mounts,
    };
    let outcome = drive(
        args, &workload, rootfs, additions, &sandbox, &signals, report,
    );
    drop(extra);
    outcome.map_err(|e| explain(e, &sandbox))
}

/// An agent connection that broke because the VM died says little by
/// itself: name the VMM's exit, and quote its log and the console. The VM
/// may take a moment to exit after the connection broke. A VM the agent
/// refused a request of was shut down by us, and one that missed a call's
/// deadline killed; an error from booting quotes the log and console
/// already.
fn explain(e: anyhow::Error, sandbox: &Sandbox) -> anyhow::Error {
    let sandbox_error = |test: fn(&SandboxError) -> bool| {
        e.chain()
            .any(|cause| cause.downcast_ref::<SandboxError>().is_some_and(test))
    };
    let client_error = |test: fn(&ClientError) -> bool| {
        e.chain()
            .any(|cause| cause.downcast_ref::<ClientError>().is_some_and(test))
    };
    // A lost agent connection carries its post-mortem already.
    let booting = sandbox_error(|e| matches!(e, SandboxError::Vm(_) | SandboxError::Lost { .. }))
        || e.chain()
            .any(|cause| cause.downcast_ref::<MicroVmError>().is_some());
    let refused = sandbox_error(|e| e.agent_code().is_some())
        || client_error(|e| matches!(e, ClientError::Agent { .. }));
    if booting || refused {
        return e;
    }
    // A guest that stalls a call while its VM runs on says why, if at all,
    // on its console; the sandbox killed the VM at the missed deadline.
    if sandbox_error(SandboxError::is_timeout) || client_error(ClientError::is_timeout) {
        return anyhow::anyhow!(
            "{e:#}; the micro-VM was still running and is stopped{}",
            sandbox.diagnostics()
        );
    }
    match sandbox.exit_report(Duration::from_millis(500)) {
        Some(report) => anyhow::anyhow!("{:#}{}", e.context(report), sandbox.diagnostics()),
        None => e,
    }
}

/// Twelve hex digits from the kernel's random numbers, as docker's short
/// container ids: the hostname the container sees.
fn container_hostname() -> String {
    let mut bytes = [0u8; 6];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| {
        use std::io::Read;
        f.read_exact(&mut bytes)
    });
    if read.is_err() {
        // Unique enough for a name nobody else sees.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes.copy_from_slice(&(nanos ^ u128::from(std::process::id())).to_le_bytes()[..6]);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the container gets besides its image: copied files (the
/// secrets) and mounts (the secrets', the volumes', the caches').
struct Additions {
    files: Vec<Vec<u8>>,
    mounts: Vec<oci_spec::runtime::Mount>,
}

fn drive(
    args: &RunArgs,
    workload: &Workload,
    rootfs: Rootfs,
    additions: Additions,
    sandbox: &Arc<Sandbox>,
    signals: &attach::Signals,
    report: &mut Report,
) -> anyhow::Result<ExitCode> {
    let spec = workload::docker_spec(workload, args.tty, &container_hostname())?;
    let mut spec = with_limits(spec, args.pids_limit)?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.extend(additions.mounts);
    spec.set_mounts(Some(mounts));
    let process = spec.process().clone().unwrap_or_default();
    let seccomp = seccomp_for(&args.security_opt, &process)?;
    if let Some(mut linux) = spec.linux().clone() {
        linux.set_seccomp(seccomp);
        spec.set_linux(Some(linux));
    }
    if let Some(mut root) = spec.root().clone() {
        root.set_readonly(Some(false));
        spec.set_root(Some(root));
    }
    let creating = Instant::now();
    let container = sandbox.create(
        ContainerRequest {
            id: CONTAINER_ID.into(),
            rootfs,
            disk: None,
            spec,
            files: additions.files,
            stdio: attach::stdio_request(args.tty),
            share: None,
        },
        |_, _| Ok::<(), SandboxError>(()),
    )?;
    debug!("container created");
    report.durations_ms.create = Some(millis(creating.elapsed()));
    let traffic = Arc::new(attach::Traffic::default());
    let attached = attach::run_attached(
        &attach::Session {
            agent: sandbox.agent(),
            process: &container.init.process,
            tty: args.tty,
            timeout: args.timeout,
            signals,
            traffic: &traffic,
        },
        &mut || {
            if sandbox.running() {
                Ok(())
            } else {
                bail!("the micro-VM stopped while the command ran")
            }
        },
    )?;
    let ended = attached.ended;
    let stats = sandbox.agent().stats(CONTAINER_ID).ok();
    let sigkilled = matches!(
        ended,
        attach::Ended::Exited(ExitStatus::Signal(libc::SIGKILL))
    );
    let oom = stats.as_ref().and_then(|stats| oom_line(stats, sigkilled));
    if let Some(line) = &oom {
        eprintln!("{line}");
    }
    let defaults = capsid_runtime::images::output::Limits::default();
    let limits = capsid_runtime::images::output::Limits {
        bytes: args.output_max_bytes.unwrap_or(defaults.bytes),
        entries: args.output_max_entries.unwrap_or(defaults.entries),
    };
    let (outputs, all_out) = collect_outputs(&args.outputs, limits, &**sandbox.agent());
    *report = Report {
        exit_status: ended.status(),
        exit_code: match ended {
            attach::Ended::Exited(ExitStatus::Code(code)) => Some(code),
            _ => None,
        },
        signal: match ended {
            attach::Ended::Exited(ExitStatus::Signal(signal)) => Some(signal),
            attach::Ended::TimedOut(_) => Some(libc::SIGKILL),
            attach::Ended::Exited(ExitStatus::Code(_)) => None,
        },
        oom_killed: oom.is_some(),
        timed_out: matches!(ended, attach::Ended::TimedOut(_)),
        error: None,
        start: report.start,
        durations_ms: Durations {
            run: Some(millis(attached.ran)),
            output: Some(millis(attached.drained)),
            ..std::mem::take(&mut report.durations_ms)
        },
        peak_memory_bytes: stats.map(|s| s.memory_peak_bytes),
        bytes: Bytes {
            stdin: traffic.stdin.load(std::sync::atomic::Ordering::Relaxed),
            stdout: traffic.stdout.load(std::sync::atomic::Ordering::Relaxed),
            stderr: traffic.stderr.load(std::sync::atomic::Ordering::Relaxed),
        },
        outputs,
    };
    debug!("output streams ended; shutting down");
    let stopping = Instant::now();
    sandbox.shut_down()?;
    report.durations_ms.shutdown = Some(millis(stopping.elapsed()));
    // A job that succeeded but whose output did not arrive has not.
    if !all_out && ended.status() == 0 {
        report.exit_status = 125;
        return Ok(ExitCode::from(125));
    }
    Ok(ended.exit_code())
}

/// What to say if the out-of-memory killer killed any of the command's
/// processes (as docker's `OOMKilled`): the command itself, when SIGKILL
/// ended it (not a silent 137), or some of its children.
fn oom_line(stats: &ContainerStats, sigkilled: bool) -> Option<String> {
    let kills = stats.memory_events.oom_kill;
    let limit = format!(
        "its limit: {} MiB; --memory gives the micro-VM more",
        stats.memory_limit_bytes >> 20
    );
    match kills {
        0 => None,
        _ if sigkilled => Some(format!(
            "capsid: the command was killed: out of memory ({limit})"
        )),
        n => Some(format!(
            "capsid: the out-of-memory killer killed {n} of the command's processes ({limit})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_native_verdict_is_kept_for_the_same_boot_and_binary_only() {
        let dir = tempfile::tempdir().unwrap();
        let vmm = dir.path().join("capsid-vmm");
        let calls = dir.path().join("calls");
        let report = |reason: &str| {
            format!(
                "#!/bin/sh\necho x >> {}\necho '{{\"kvm\":{{\"mode\":\"native\",\"reason\":\"{reason}\"}},\
                 \"paravirtual_kvm\":false,\"landlock_abi\":null,\"seccomp\":[]}}'\n",
                calls.display()
            )
        };
        let write_vmm = |body: String| {
            std::fs::write(&vmm, body).unwrap();
            let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(&vmm, executable).unwrap();
        };
        let asked = || {
            std::fs::read_to_string(&calls)
                .unwrap_or_default()
                .lines()
                .count()
        };
        write_vmm(report("first"));
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        assert_eq!(kvm_verdict(&run_dir, &vmm).unwrap().reason, "first");
        assert_eq!(kvm_verdict(&run_dir, &vmm).unwrap().reason, "first");
        assert_eq!(asked(), 1, "the second run asked again");
        // Another binary (another size): asked again.
        write_vmm(report("second, longer"));
        assert_eq!(
            kvm_verdict(&run_dir, &vmm).unwrap().reason,
            "second, longer"
        );
        assert_eq!(asked(), 2);
    }

    #[test]
    fn security_options_parse_or_say_what_is_supported() {
        assert_eq!(
            parse_security_opt("seccomp=unconfined"),
            Ok(SecurityOpt::SeccompUnconfined)
        );
        assert_eq!(
            parse_security_opt("seccomp=/p.json"),
            Ok(SecurityOpt::SeccompProfile("/p.json".into()))
        );
        assert!(
            parse_security_opt("apparmor=x")
                .unwrap_err()
                .contains("supported")
        );
    }

    #[test]
    fn commands_get_the_default_seccomp_profile_unless_told_otherwise() {
        // Before the fix `capsid run` gave containers no seccomp profile at
        // all, so any of them could open a vsock socket to the agent.
        let process = Spec::default().process().clone().unwrap();
        let profile = seccomp_for(&[], &process)
            .unwrap()
            .expect("a default profile");
        let json = serde_json::to_string(&profile).unwrap();
        assert!(json.contains("\"socket\""), "{json}");
        assert!(
            seccomp_for(&[SecurityOpt::SeccompUnconfined], &process)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_pids_limit_reaches_the_containers_resources() {
        assert_eq!(parse_pids_limit("64"), Ok(64));
        assert_eq!(parse_pids_limit("-1"), Ok(-1));
        for bad in ["0", "-2", "many", ""] {
            assert!(parse_pids_limit(bad).is_err(), "{bad:?}");
        }
        let pids = |spec: &Spec| {
            spec.linux()
                .as_ref()
                .and_then(|l| l.resources().as_ref())
                .and_then(|r| r.pids().as_ref())
                .map(|p| p.limit())
        };
        assert_eq!(
            pids(&with_limits(Spec::default(), Some(64)).unwrap()),
            Some(64)
        );
        assert_eq!(pids(&with_limits(Spec::default(), Some(-1)).unwrap()), None);
        assert_eq!(pids(&with_limits(Spec::default(), None).unwrap()), None);
    }

    #[test]
    fn secrets_are_named_plainly_read_before_the_boot_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret").unwrap();
        let arg = format!("npm_token=@{}", token.display());
        let secret = parse_secret(&arg).unwrap();
        for bad in ["x", "=@/f", "../x=@/f", "a/b=@/f", "x=@", ".=@/f"] {
            assert!(parse_secret(bad).is_err(), "{bad:?}");
        }
        let (files, mounts) = read_secrets(std::slice::from_ref(&secret)).unwrap();
        assert_eq!(files, [b"s3cret".to_vec()]);
        assert_eq!(mounts[0].destination(), Path::new("/run/secrets/npm_token"));
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("file:0")));
        assert!(
            mounts[0]
                .options()
                .as_ref()
                .unwrap()
                .contains(&"ro".to_owned())
        );
        // Twice, a directory, a missing file, too big: refused, by name.
        let twice = read_secrets(&[secret.clone(), secret]).unwrap_err();
        assert!(twice.to_string().contains("given twice"), "{twice}");
        let dir_arg = format!("d=@{}", dir.path().display());
        let e = read_secrets(&[parse_secret(&dir_arg).unwrap()]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(read_secrets(&[parse_secret("m=@/no/such/file").unwrap()]).is_err());
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 129 * 1024]).unwrap();
        let e =
            read_secrets(&[parse_secret(&format!("b=@{}", big.display())).unwrap()]).unwrap_err();
        assert!(e.to_string().contains("128 KiB"), "{e}");
    }

    #[test]
    fn a_report_is_checked_before_the_boot_and_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_report_path(&dir.path().join("r.json")).is_ok());
        let missing = check_report_path(&dir.path().join("no/r.json")).unwrap_err();
        assert!(missing.to_string().contains("does not exist"), "{missing}");
        assert!(check_report_path(dir.path()).is_err());
        let path = dir.path().join("r.json");
        let report = Report {
            exit_status: 137,
            signal: Some(9),
            oom_killed: true,
            ..Report::default()
        };
        report.write(&path).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["exit_status"], 137);
        assert_eq!(json["oom_killed"], true);
        assert_eq!(json["exit_code"], serde_json::Value::Null);
        assert_eq!(json["bytes"]["stdout"], 0);
        assert!(json["durations_ms"].get("boot").is_some());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no partial file left");
    }

    #[test]
    fn outputs_parse_as_guest_and_host_dirs() {
        assert_eq!(
            parse_output("/work/dist:out/dist"),
            Ok(Output {
                guest: "/work/dist".into(),
                host: "out/dist".into()
            })
        );
        for bad in ["dist:out", "/work", "/work:", ":out"] {
            assert!(parse_output(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_bytes("512K"), Ok(512 << 10));
        assert_eq!(parse_bytes("2G"), Ok(2 << 30));
        assert_eq!(parse_bytes("100"), Ok(100));
        for bad in ["0", "x", "1T", "-1M", ""] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_output_past_its_deadline_fails_its_next_read() {
        use std::io::Read;
        let mut late = Until {
            inner: &b"tar"[..],
            until: Instant::now() - Duration::from_secs(1),
        };
        let e = late.read(&mut [0; 8]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let mut early = Until {
            inner: &b"tar"[..],
            until: Instant::now() + Duration::from_secs(60),
        };
        assert_eq!(early.read(&mut [0; 8]).unwrap(), 3);
    }

    #[test]
    fn volumes_and_caches_parse_or_say_what_is_expected() {
        assert_eq!(
            parse_volume("src:/work"),
            Ok(Volume {
                host: "src".into(),
                guest: "/work".into(),
                writable: false
            })
        );
        assert!(parse_volume("/a:b:/c:rw").is_err(), "GUEST_PATH absolute");
        assert!(parse_volume("/data:/d:rw").unwrap().writable);
        assert!(!parse_volume("/data:/d:ro").unwrap().writable);
        for bad in ["src", ":/work", "src:work", "src:/", "src:/w:xx"] {
            assert!(parse_volume(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_cache("cargo:/root/.cargo:2G"),
            Ok(CacheArg {
                name: "cargo".into(),
                guest: "/root/.cargo".into(),
                bytes: 2 << 30
            })
        );
        assert_eq!(parse_cache("npm:/n").unwrap().bytes, CACHE_BYTES);
        for bad in ["npm", "../x:/n", "npm:n", "npm:/n:lots"] {
            assert!(parse_cache(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_oom_kill_is_named() {
        let mut stats = ContainerStats::default();
        assert_eq!(oom_line(&stats, true), None, "a SIGKILL by someone else");
        stats.memory_events.oom_kill = 2;
        stats.memory_limit_bytes = 96 << 20;
        let line = oom_line(&stats, true).unwrap();
        assert!(
            line.contains("killed: out of memory") && line.contains("96 MiB"),
            "{line}"
        );
        let line = oom_line(&stats, false).unwrap();
        assert!(
            line.contains("killed 2 of the command's processes"),
            "{line}"
        );
    }

    #[test]
    fn durations_users_and_env_parse_or_say_why() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_user("1000"), Ok((1000, 1000)));
        assert_eq!(parse_user("1000:2000"), Ok((1000, 2000)));
        assert!(parse_user("nobody").unwrap_err().contains("numeric"));
        assert!(parse_env("A=1").is_ok());
        assert!(parse_env("=1").is_err() && parse_env("A").is_err());
    }
}
