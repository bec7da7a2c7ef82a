//! `capsid-vmm`: runs one micro-VM until the guest shuts down.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use capsid_vmm::builder::HostFiles;
use capsid_vmm::config::{DiskConfig, Irqchip, NetConfig, SerialConfig, VmConfig, VsockConfig};
use capsid_vmm::jail::{self, JailConfig, Role};
use capsid_vmm::logging::BoundedFile;
use capsid_vmm::seccomp::{Filters, SeccompMode, ThreadKind};
use capsid_vmm::vmm::{EXIT_VMM_ERROR, ExitReason};
use clap::Parser;

const EXIT_CODES: &str = "\
Exit status:
  0        the guest shut down or rebooted, or the VM was snapshotted
  1        VMM error (bad configuration, KVM unavailable, runtime failure)
  2        bad command-line arguments
  3        the guest crashed (triple fault, KVM internal or entry error)
  128+N    stopped by signal N (SIGTERM: 143); the guest is stopped and
           everything the VMM made is removed";

/// Runs one KVM micro-VM: a Linux kernel with a serial console, an i8042
/// reset line, a boot-time marker, virtio-blk disks (images can be attached
/// to spare slots while it runs), virtio-vsock and virtio-net over taps.
/// A VM can be snapshotted through its API socket and restored with
/// --restore.
#[derive(Debug, Parser)]
#[command(name = "capsid-vmm", version, after_help = EXIT_CODES)]
struct Args {
    /// JSON file with the VM configuration; flags given as well override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Guest kernel: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs to load next to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: "console=ttyS0 reboot=k panic=-1 quiet"].
    #[arg(long)]
    cmdline: Option<String>,
    /// Number of vCPUs (1-32) [default: 1].
    #[arg(long)]
    vcpus: Option<u8>,
    /// Guest RAM in MiB [default: 128].
    #[arg(long)]
    mem_mib: Option<u32>,
    /// A virtio-blk disk: PATH[,ro][,id=ID]. Repeatable; /dev/vda is the first.
    #[arg(long = "disk", value_name = "PATH[,ro][,id=ID]")]
    disks: Vec<DiskConfig>,
    /// A virtio-net device over a tap the launcher opened (IFF_TAP |
    /// IFF_NO_PI | IFF_VNET_HDR) and passed as descriptor N:
    /// fd=N,mac=XX:XX:XX:XX:XX:XX[,mtu=N]. Repeatable; eth0 is the first.
    #[arg(long = "net", value_name = "fd=N,mac=MAC[,mtu=N]")]
    nets: Vec<NetConfig>,
    /// Unix socket for virtio-vsock (host side of hybrid vsock).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID [default: 3].
    #[arg(long)]
    vsock_cid: Option<u32>,
    /// Empty read-only disk slots (after the --disk ones), for images
    /// attached while the VM runs, through --api-uds.
    #[arg(long)]
    spare_disks: Option<u8>,
    /// Unix socket on which the VMM takes attach/detach requests (JSON lines).
    #[arg(long)]
    api_uds: Option<PathBuf>,
    /// Where the interrupt controllers live: kernel (KVM's PIC, IOAPIC and
    /// PIT) or split (KVM's LAPICs, the VMM's IOAPIC, no PIC or PIT)
    /// [default: kernel; split falls back to it where KVM has no
    /// TSC-deadline timer].
    #[arg(long, value_name = "kernel|split")]
    irqchip: Option<Irqchip>,
    /// Where the serial console goes: stdout, file:PATH (at most 1 MiB, the
    /// older half dropped) or none [default: stdout].
    #[arg(long)]
    serial: Option<SerialConfig>,
    /// Log filter for the VMM's own messages (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn", env = "CAPSID_VMM_LOG")]
    log_level: tracing::Level,
    /// Where the VMM's own messages go instead of stderr: a file kept within
    /// 1 MiB (its newest output kept), which also becomes stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Confine the VMM (needs root): its own PID, mount, IPC, UTS and
    /// network namespaces, DIR as its only file system (seen as /vm; the
    /// sockets must be in it), --uid/--gid with no capabilities,
    /// no_new_privs, rlimits, Landlock.
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
    jail: Option<PathBuf>,
    /// The unprivileged user the confined VMM runs as.
    #[arg(long, requires = "jail")]
    uid: Option<u32>,
    /// The unprivileged group the confined VMM runs as.
    #[arg(long, requires = "jail")]
    gid: Option<u32>,
    /// A cgroup v2 directory made for this VM, which the VMM joins first.
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// What a syscall outside a thread's allowlist does.
    #[arg(long, value_enum, default_value_t = SeccompMode::Kill)]
    seccomp: SeccompMode,
    /// PID, the process that starts the VMM: die (SIGKILL) when it dies,
    /// however it dies, and do not start if it is gone already (the VM of
    /// a `capsid run` that was killed goes with it).
    #[arg(long, value_name = "PID")]
    die_with_parent: Option<libc::pid_t>,
    /// Carry on from the snapshot in DIR (its state.json and memory)
    /// instead of booting a kernel: the snapshot's vCPUs and memory, and
    /// the spare slots and vsock it was taken with.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "disks", "nets"])]
    restore: Option<PathBuf>,
    /// Print what this host gives a VMM (can its KVM boot Linux, Landlock,
    /// the seccomp allowlists) as JSON, and exit; no VM runs.
    #[arg(long, conflicts_with_all = ["config", "kernel", "jail"])]
    probe: bool,
}

impl Args {
    fn to_config(&self) -> Result<VmConfig, capsid_vmm::ConfigError> {
        let mut config = match &self.config {
            Some(path) => capsid_vmm::config::from_file(path)?,
            None => VmConfig::default(),
        };
        if let Some(kernel) = self.kernel.clone() {
            config.kernel = kernel;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd.clone();
        }
        if let Some(cmdline) = self.cmdline.clone() {
            config.cmdline = cmdline;
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(mem_mib) = self.mem_mib {
            config.mem_mib = mem_mib;
        }
        config.disks.extend(self.disks.iter().cloned());
        config.nets.extend(self.nets.iter().cloned());
        match (self.vsock_uds.clone(), &mut config.vsock) {
            (Some(uds), Some(vsock)) => vsock.uds = uds,
            (Some(uds), None) => {
                config.vsock = Some(VsockConfig {
                    uds,
                    cid: capsid_vmm::config::DEFAULT_CID,
                })
            }
            (None, _) => {}
        }
        if let (Some(cid), Some(vsock)) = (self.vsock_cid, &mut config.vsock) {
            vsock.cid = cid;
        }
        if let Some(serial) = self.serial.clone() {
            config.serial = serial;
        }
        if let Some(spare) = self.spare_disks {
            config.spare_disks = spare;
        }
        if let Some(irqchip) = self.irqchip {
            config.irqchip = irqchip;
        }
        if self.api_uds.is_some() {
            config.api_uds = self.api_uds.clone();
        }
        if self.restore.is_some() {
            config.restore = self.restore.clone();
        }
        Ok(config)
    }
}

/// Prints an error and its causes on one line each.
fn report(error: &dyn std::error::Error) {
    eprintln!("capsid-vmm: error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Every file and socket the VMM makes is its own only (0600, 0700).
    // SAFETY: umask takes a mode and cannot fail.
    unsafe { libc::umask(0o077) };
    let args = Args::parse();
    let config = args.to_config();
    // Nothing the launcher left open reaches the VMM (or the guest) but
    // the taps and disk files it passed.
    let passed: Vec<i32> = match &config {
        Ok(config) => config
            .nets
            .iter()
            .map(|net| net.tap_fd)
            .chain(config.disks.iter().filter_map(|d| d.inherited_fd()))
            .collect(),
        Err(_) => Vec::new(),
    };
    if let Err(e) = jail::close_inherited_fds(&passed) {
        eprintln!("capsid-vmm: error: cannot close inherited descriptors: {e}");
        return exit_code(EXIT_VMM_ERROR);
    }
    if args.probe {
        return match serde_json::to_string(&capsid_vmm::probe::report()) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                report(&e);
                exit_code(EXIT_VMM_ERROR)
            }
        };
    }
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_target(false);
    match &args.log_file {
        Some(path) => match BoundedFile::open_as_stderr(path) {
            Ok(file) => subscriber
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init(),
            Err(e) => {
                eprintln!(
                    "capsid-vmm: error: cannot open the log file {}: {e}",
                    path.display()
                );
                return exit_code(EXIT_VMM_ERROR);
            }
        },
        None => subscriber
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .init(),
    }
    match run(&args, config, started) {
        Ok(reason) => {
            match &reason {
                ExitReason::GuestShutdown => tracing::info!("{reason}"),
                _ => eprintln!("capsid-vmm: {reason}"),
            }
            exit_code(reason.exit_code())
        }
        Err(e) => {
            report(e.as_ref());
            exit_code(EXIT_VMM_ERROR)
        }
    }
}

/// Everything between the arguments and the VM's end: open what the VM
/// needs, confine the process, build the VM, run it.
fn run(
    args: &Args,
    config: Result<VmConfig, capsid_vmm::ConfigError>,
    started: Instant,
) -> Result<ExitReason, Box<dyn std::error::Error>> {
    let mut config = config?;
    if let Some(launcher) = args.die_with_parent {
        jail::die_with(launcher)?;
    }
    let files = HostFiles::open(&config)?;
    if let Some((vcpus, mem_mib)) = files.snapshot_shape() {
        config.vcpus = vcpus;
        config.mem_mib = mem_mib;
    }
    // SIGTERM, SIGINT and SIGHUP reach the main thread through a signalfd;
    // blocked before any thread exists, so every thread inherits the mask.
    let signals = capsid_vmm::vmm::block_stop_signals()?;
    if let Some(dir) = &args.jail {
        let jail = jail_config(args, dir, &config)?;
        for uds in [
            config.vsock.as_mut().map(|v| &mut v.uds),
            config.api_uds.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            *uds = jail::inside(dir, uds).ok_or_else(|| {
                format!(
                    "with --jail {}, the sockets must be in that directory ({} is not)",
                    dir.display(),
                    uds.display()
                )
            })?;
        }
        if let Role::Keeper { vmm } = jail::enter(&jail)? {
            drop(files);
            drop(signals);
            // Dropping the identity cleared the parent-death signal; the
            // VMM dies with the keeper in turn.
            if let Some(launcher) = args.die_with_parent {
                jail::die_with(launcher)?;
            }
            Filters::compile(args.seccomp, std::process::id())?.apply(ThreadKind::Keeper)?;
            jail::keep(vmm);
        }
    }
    let filters = Filters::compile(args.seccomp, std::process::id())?;
    let vmm = capsid_vmm::build(&config, files, started, &filters.thread_inits())?;
    Ok(vmm.run(signals, || filters.apply(ThreadKind::Main)))
}

/// The jail for `--jail DIR`: the largest file the VMM writes is its
/// largest writable disk, or with an API socket a snapshot's memory file
/// (the logs stay within 1 MiB); its threads are its vCPUs, one per
/// device, the API's and a margin.
fn jail_config(
    args: &Args,
    dir: &std::path::Path,
    config: &VmConfig,
) -> Result<JailConfig, Box<dyn std::error::Error>> {
    let mut max_file_bytes: u64 = 2 << 20;
    if config.api_uds.is_some() {
        // The memory file: guest RAM and no more (the state is far smaller).
        max_file_bytes = max_file_bytes.max(u64::from(config.mem_mib) << 20);
    }
    for disk in config.disks.iter().filter(|d| !d.read_only) {
        max_file_bytes = max_file_bytes.max(std::fs::metadata(&disk.path)?.len());
    }
    let threads = u64::from(config.vcpus) + u64::try_from(config.virtio_devices())? + 16;
    Ok(JailConfig {
        dir: dir.to_owned(),
        uid: args.uid.unwrap_or(0),
        gid: args.gid.unwrap_or(0),
        cgroup: args.cgroup.clone(),
        max_file_bytes,
        max_threads: threads,
    })
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
