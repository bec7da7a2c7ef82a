//! `capsid-vmm`: runs one micro-VM until the guest shuts down.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use capsid_vmm::config::{DiskConfig, SerialConfig, VmConfig, VsockConfig};
use capsid_vmm::logging::RotatingFile;
use capsid_vmm::vmm::{EXIT_VMM_ERROR, ExitReason};
use clap::Parser;

const EXIT_CODES: &str = "\
Exit status:
  0        the guest shut down or rebooted
  1        VMM error (bad configuration, KVM unavailable, runtime failure)
  2        bad command-line arguments
  3        the guest crashed (triple fault, KVM internal or entry error)
  128+N    stopped by signal N (SIGTERM: 143); the guest is stopped and
           everything the VMM made is removed";

/// Runs one KVM micro-VM: a Linux kernel with a serial console, an i8042
/// reset line, a boot-time marker, virtio-blk disks (images can be attached
/// to spare slots while it runs) and virtio-vsock.
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
    /// Where the serial console goes: stdout, file:PATH (at most 1 MiB, the
    /// older half in PATH.1) or none [default: stdout].
    #[arg(long)]
    serial: Option<SerialConfig>,
    /// Log filter for the VMM's own messages (error, warn, info, debug, trace).
    #[arg(long, default_value = "warn", env = "CAPSID_VMM_LOG")]
    log_level: tracing::Level,
    /// Where the VMM's own messages go instead of stderr: a file kept within
    /// 1 MiB (the older half in PATH.1), which also becomes stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
}

impl Args {
    fn into_config(self) -> Result<VmConfig, capsid_vmm::ConfigError> {
        let mut config = match &self.config {
            Some(path) => VmConfig::from_file(path)?,
            None => VmConfig::default(),
        };
        if let Some(kernel) = self.kernel {
            config.kernel = kernel;
        }
        if self.initrd.is_some() {
            config.initrd = self.initrd;
        }
        if let Some(cmdline) = self.cmdline {
            config.cmdline = cmdline;
        }
        if let Some(vcpus) = self.vcpus {
            config.vcpus = vcpus;
        }
        if let Some(mem_mib) = self.mem_mib {
            config.mem_mib = mem_mib;
        }
        config.disks.extend(self.disks);
        match (self.vsock_uds, &mut config.vsock) {
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
        if let Some(serial) = self.serial {
            config.serial = serial;
        }
        if let Some(spare) = self.spare_disks {
            config.spare_disks = spare;
        }
        if self.api_uds.is_some() {
            config.api_uds = self.api_uds;
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
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_target(false);
    match &args.log_file {
        Some(path) => match RotatingFile::open_as_stderr(path) {
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
    let config = match args.into_config() {
        Ok(config) => config,
        Err(e) => {
            report(&e);
            return exit_code(EXIT_VMM_ERROR);
        }
    };
    let vmm = match capsid_vmm::build(&config, started, &capsid_vmm::builder::ThreadInits::none()) {
        Ok(vmm) => vmm,
        Err(e) => {
            report(&e);
            return exit_code(EXIT_VMM_ERROR);
        }
    };
    if let Err(e) = forward_signals(&vmm) {
        report(&e);
        return exit_code(EXIT_VMM_ERROR);
    }
    let reason = vmm.run();
    match &reason {
        ExitReason::GuestShutdown => tracing::info!("{reason}"),
        _ => eprintln!("capsid-vmm: {reason}"),
    }
    exit_code(reason.exit_code())
}

/// SIGTERM, SIGINT and SIGHUP end the VM; the VMM then cleans up and exits 128+N.
fn forward_signals(vmm: &capsid_vmm::Vmm) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let exit = vmm.exit_notifier();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                exit.report(ExitReason::Signal(signal));
            }
        })?;
    Ok(())
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
