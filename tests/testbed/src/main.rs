//! `capsid-testbed`: runs a command where KVM can boot real guests.
//!
//! ```text
//! capsid-testbed probe
//! capsid-testbed run [--host-kernel DIR] [--with PATH]... -- COMMAND [ARGS]...
//! ```
//!
//! In native mode the command runs directly. In nested mode it runs inside a
//! test host booted for this one invocation; its output streams back and its
//! exit code becomes ours. Ctrl-C or SIGTERM stops the host and removes every
//! file made for it.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use capsid_testbed::child::ChildGuard;
use capsid_testbed::nested::{HostKernel, NestedError, NestedRun};
use capsid_testbed::probe::{Mode, probe};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Run capsid's end-to-end tests where KVM can boot a real guest")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Say whether this machine runs guests natively or needs the nested test host.
    Probe,
    /// Inside the test host: hold one idle VM open until killed (see `nested::hold_kvm`).
    #[command(hide = true)]
    HoldKvm,
    /// Run COMMAND natively, or inside the nested test host.
    Run {
        /// Extracted Debian cloud kernel package (tests/testhost/fetch-kernel.sh prints it).
        #[arg(long, env = "CAPSID_TESTHOST_KERNEL_DIR")]
        host_kernel: Option<PathBuf>,
        /// A file, program or directory the command needs inside the test host (repeatable).
        #[arg(long = "with")]
        with: Vec<PathBuf>,
        /// vCPUs of the test host.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Memory of the test host, MiB.
        #[arg(long, default_value_t = 6144)]
        memory_mib: u32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 2400)]
        timeout_secs: u64,
        /// Seconds without any output after which the test host counts as
        /// wedged; the run is then repeated once on a fresh test host.
        #[arg(long, default_value_t = 600)]
        stall_secs: u64,
        /// How QEMU's TCG runs the test host's vCPUs: `multi` (a host
        /// thread each) or `single` (one thread taking turns).
        #[arg(long, env = "CAPSID_TESTHOST_TCG_THREAD", default_value = "multi",
              value_parser = ["multi", "single"])]
        tcg_thread: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsid-testbed: error: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Verb::HoldKvm = cli.command {
        capsid_testbed::nested::hold_kvm().context("cannot hold a VM open")?;
        return Ok(ExitCode::SUCCESS);
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install signal handlers")?;
    }
    let probe = probe();
    eprintln!("capsid-testbed: {probe}");
    let Verb::Run {
        host_kernel,
        with,
        cpus,
        memory_mib,
        timeout_secs,
        stall_secs,
        tcg_thread,
        command,
    } = cli.command
    else {
        return Ok(ExitCode::SUCCESS);
    };

    if probe.mode == Mode::Native {
        let mut child = ChildGuard::spawn(Command::new(&command[0]).args(&command[1..]))
            .with_context(|| format!("cannot run {}", command[0]))?;
        loop {
            if let Some(status) = child.wait_timeout(Duration::from_millis(100))? {
                // A command killed by a signal exits 128 + signal, as in a shell.
                let code = status.code().or(status.signal().map(|s| 128 + s));
                return Ok(exit_code(code.unwrap_or(1)));
            }
            if stop.load(Ordering::Relaxed) {
                child.kill()?;
                return Ok(ExitCode::from(130));
            }
        }
    }

    let Some(dir) = host_kernel else {
        bail!(
            "nested mode needs Debian's cloud kernel: pass --host-kernel DIR \
             (tests/testhost/fetch-kernel.sh downloads and prints it)"
        );
    };
    let kernel = HostKernel::from_dir(&dir)?;
    eprintln!(
        "capsid-testbed: booting the nested test host: QEMU TCG -cpu max, {cpus} vCPUs, \
         {memory_mib} MiB, Debian kernel {}",
        kernel.release
    );
    // CAPSID_TESTBED_NESTED tells the command it runs inside the test host
    // (benchmarks say that their absolute times are inflated).
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with("CAPSID_") || k.starts_with("RUST_") || k == "CI")
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "CAPSID_TESTBED_MODE" | "CAPSID_TESTHOST_KERNEL_DIR" | "CAPSID_TESTHOST_TCG_THREAD"
            )
        })
        .chain([("CAPSID_TESTBED_NESTED".to_owned(), "1".to_owned())])
        .collect();
    let nested = NestedRun {
        kernel: &kernel,
        command,
        with,
        env,
        cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
        cpus,
        tcg_thread: &tcg_thread,
        memory_mib,
        timeout: Duration::from_secs(timeout_secs),
        stall: Duration::from_secs(stall_secs),
        stop: &stop,
    };
    // A wedged test host is a failure of the emulated machine, not of the
    // command (the command's own steps time out and report themselves), so
    // it gets one fresh test host. The wedge is printed in full either way.
    // A kernel panic of the test host is the same kind of failure (a
    // process cannot crash a sound kernel; TCG's emulated SVM can).
    let mut outcome = nested.run();
    let host_failed = match &outcome {
        Err(NestedError::Wedged { .. }) => true,
        Err(NestedError::HostDied { console, .. }) => console.contains("Kernel panic"),
        _ => false,
    };
    if host_failed {
        if let Err(failure) = &outcome {
            eprintln!("capsid-testbed: WARNING: {failure}");
        }
        eprintln!(
            "capsid-testbed: WARNING: the test host itself failed (not the command); \
             running the command again on a fresh test host"
        );
        outcome = nested.run();
    }
    match outcome {
        Ok(outcome) => {
            eprintln!(
                "capsid-testbed: test host booted in {:.1} s (initramfs {} MiB); \
                 command exited {} after {:.1} s in all",
                outcome.boot_time.as_secs_f64(),
                outcome.initramfs_bytes >> 20,
                outcome.exit_code,
                outcome.total_time.as_secs_f64()
            );
            Ok(exit_code(outcome.exit_code))
        }
        Err(NestedError::Interrupted) => {
            eprintln!("capsid-testbed: interrupted; test host stopped and cleaned up");
            Ok(ExitCode::from(130))
        }
        Err(e) => Err(e.into()),
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
