//! `capsid`: the daemonless CLI.
//!
//! - `capsid run --rootfs DIR | --image LAYOUT[:TAG] [...] -- CMD...` runs one
//!   command in a fresh micro-VM, attached, and exits with its status (see
//!   `run.rs`, `workload.rs`).
//! - `capsid doctor` checks the host and says how to fix each problem.
//! - `capsid create|start|state|kill|delete|exec`: the OCI runtime verbs on a
//!   bundle, with runc's conventions (see `oci.rs`).
//! - `capsid bench …` runs `capsid-bench` (the benchmark, the `bench/`
//!   crate; its peers and containerd harness stay out of this binary).

mod attach;
mod doctor;
mod oci;
mod run;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Run containers in KVM micro-VMs")]
struct Cli {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Run one command in a fresh micro-VM, attached; exit with its status.
    Run(run::RunArgs),
    /// Check this host (KVM, kernel, initramfs, tools) and say how to fix it.
    Doctor(doctor::DoctorArgs),
    /// OCI: create a container from a bundle, in its own micro-VM (not started).
    Create(oci::CreateArgs),
    /// OCI: start a created container.
    Start(oci::IdArgs),
    /// OCI: print a container's state as JSON.
    State(oci::IdArgs),
    /// OCI: send a signal to a container's init process (or all processes).
    Kill(oci::KillArgs),
    /// OCI: delete a container and its micro-VM.
    Delete(oci::DeleteArgs),
    /// OCI: run a process in a running container, attached.
    Exec(oci::ExecArgs),
    /// Measure start-up, footprint and throughput against peers (runs
    /// capsid-bench; `make bench` builds it and runs it where guests boot).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Holds a created container's micro-VM (started by `create`).
    #[command(hide = true)]
    Monitor(oci::MonitorArgs),
}

/// Hands over to `capsid-bench`, found beside this binary or in PATH.
fn bench(args: &[std::ffi::OsString]) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let beside_me = std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("capsid-bench")))
        .filter(|p| p.is_file());
    let program = beside_me.unwrap_or_else(|| "capsid-bench".into());
    let error = std::process::Command::new(&program).args(args).exec();
    anyhow::bail!(
        "cannot run {}: {error}; build it with `cargo build --release -p capsid-bench`, \
         or run `make bench`, which builds it and runs it where guests can boot",
        program.display()
    )
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Verb::Run(args) => run::run(args),
        Verb::Doctor(args) => doctor::doctor(&args),
        Verb::Create(args) => oci::create(&args),
        Verb::Start(args) => oci::start(&args),
        Verb::State(args) => oci::state(&args),
        Verb::Kill(args) => oci::kill(&args),
        Verb::Delete(args) => oci::delete(&args),
        Verb::Exec(args) => oci::exec(&args),
        Verb::Monitor(args) => oci::monitor(&args),
        Verb::Bench { args } => bench(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsid: error: {e:#}");
            // 125: the runtime failed, as docker and podman report it.
            ExitCode::from(125)
        }
    }
}
