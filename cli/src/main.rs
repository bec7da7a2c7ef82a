//! `cocoon`: the daemonless CLI.
//!
//! - `cocoon run --rootfs DIR [...] -- CMD...` runs one command in a fresh
//!   micro-VM, attached, and exits with its status (see `run.rs`).
//! - `cocoon doctor` checks the host and says how to fix each problem.

mod doctor;
mod run;

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Verb::Run(args) => run::run(args),
        Verb::Doctor(args) => doctor::doctor(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cocoon: error: {e:#}");
            // 125: the runtime failed, as docker and podman report it.
            ExitCode::from(125)
        }
    }
}
