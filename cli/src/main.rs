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
#[command(
    about = "Run containers in KVM micro-VMs",
    disable_version_flag = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(flatten)]
    root: oci::Root,
    #[command(flatten)]
    runc: oci::RuncOptions,
    /// Print the version, in runc's format.
    #[arg(long, short = 'v')]
    version: bool,
    #[command(subcommand)]
    command: Option<Verb>,
}

#[derive(Subcommand, Debug)]
enum Verb {
    /// Run one command in a fresh micro-VM, attached; exit with its status.
    Run(Box<run::RunArgs>),
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
    /// OCI: the host pids standing for a container's processes.
    Ps(oci::PsArgs),
    /// OCI: new cgroup limits for a container (memory, CPU, pids).
    Update(oci::UpdateArgs),
    /// OCI: freeze every process of a running container.
    Pause(oci::IdArgs),
    /// OCI: thaw a paused container.
    Resume(oci::IdArgs),
    /// OCI: print what this runtime supports, as JSON (runc's `features`).
    Features,
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

/// The exit status of a usage error (an unknown option, a bad value), as
/// of every other failure of capsid itself: docker's and podman's 125, not
/// clap's 2, which a command's own status could be.
const USAGE_ERROR: u8 = 125;

/// The command line, or how to exit: `--help` and `--version` print and
/// succeed; a usage error is printed and exits [`USAGE_ERROR`].
fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Cli, ExitCode> {
    Cli::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::from(USAGE_ERROR)
        } else {
            ExitCode::SUCCESS
        }
    })
}

fn main() -> ExitCode {
    let cli = match parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let root = &cli.root;
    let result = match cli.command {
        _ if cli.version => {
            print!("{}", oci::version());
            Ok(ExitCode::SUCCESS)
        }
        None => Err(anyhow::anyhow!(
            "no command given; `capsid --help` lists them"
        )),
        Some(Verb::Run(args)) => run::run(*args),
        Some(Verb::Doctor(args)) => doctor::doctor(&args),
        Some(Verb::Create(args)) => oci::create(root, &args),
        Some(Verb::Start(args)) => oci::start(root, &args),
        Some(Verb::State(args)) => oci::state(root, &args),
        Some(Verb::Kill(args)) => oci::kill(root, &args),
        Some(Verb::Delete(args)) => oci::delete(root, &args),
        Some(Verb::Exec(args)) => oci::exec(root, &args),
        Some(Verb::Ps(args)) => oci::ps(root, &args),
        Some(Verb::Update(args)) => oci::update(root, &args),
        Some(Verb::Pause(args)) => oci::pause(root, &args),
        Some(Verb::Resume(args)) => oci::resume(root, &args),
        Some(Verb::Features) => oci::features(),
        Some(Verb::Monitor(args)) => oci::monitor(root, &args),
        Some(Verb::Bench { args }) => bench(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("capsid: error: {message}");
            cli.runc.log_error(&message);
            ExitCode::from(failure_status(&e))
        }
    }
}

/// How capsid exits when it failed: 127 when the command's program is not
/// there, 126 when it cannot be executed (the agent says which), else 125:
/// the runtime failed. As docker and podman report them.
pub(crate) fn failure_status(e: &anyhow::Error) -> u8 {
    use capsid_runtime::protocol::ClientError;
    e.chain()
        .find_map(|cause| match cause.downcast_ref::<ClientError>() {
            Some(ClientError::Agent { code, .. }) => code.start_status(),
            _ => None,
        })
        .unwrap_or(125)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Vec<String>, clap::error::ErrorKind> {
        let args = ["capsid", "run", "--rootfs", "/r"].iter().chain(args);
        match Cli::try_parse_from(args) {
            Ok(Cli {
                command: Some(Verb::Run(run)),
                ..
            }) => Ok(run.command()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.kind()),
        }
    }

    #[test]
    fn an_unknown_option_before_the_command_is_an_error_not_the_command() {
        // Before the fix each of these booted a VM and tried to execute the
        // option as the command.
        use clap::error::ErrorKind::UnknownArgument;
        for args in [
            &["--frobnicate", "true"][..],
            &["-it", "sh"],
            &["--rm", "true"],
            &["--memroy", "128M", "true"],
        ] {
            assert_eq!(run(args), Err(UnknownArgument), "{args:?}");
        }
        // The command's own options are its own, with or without `--`.
        assert_eq!(
            run(&["ls", "-la", "--color"]).unwrap(),
            ["ls", "-la", "--color"]
        );
        assert_eq!(run(&["--", "-x", "--rm"]).unwrap(), ["-x", "--rm"]);
        assert_eq!(
            run(&["-e", "A=1", "--", "env"]).unwrap(),
            ["env"],
            "capsid's options before --"
        );
    }

    #[test]
    fn a_program_not_found_exits_127_one_not_executable_126_else_125() {
        use capsid_runtime::protocol::{ClientError, ErrorCode};
        let refused = |code| {
            anyhow::Error::new(ClientError::Agent {
                call: "StartProcess",
                code,
                message: "exec x: not found in PATH /bin".into(),
            })
            .context("cannot start the command")
        };
        assert_eq!(failure_status(&refused(ErrorCode::ProgramNotFound)), 127);
        assert_eq!(
            failure_status(&refused(ErrorCode::ProgramNotExecutable)),
            126
        );
        assert_eq!(failure_status(&refused(ErrorCode::Internal)), 125);
        assert_eq!(failure_status(&anyhow::anyhow!("no kernel")), 125);
    }

    #[test]
    fn usage_errors_exit_125_and_help_succeeds() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let code = |a: &[&str]| format!("{:?}", parse(args(a)).err());
        assert_eq!(
            code(&["capsid", "run", "--rootfs", "/r", "--memroy", "1M", "true"]),
            format!("{:?}", Some(ExitCode::from(125)))
        );
        assert!(parse(args(&["capsid", "--version"])).is_ok_and(|cli| cli.version));
    }

    #[test]
    fn runcs_create_options_are_taken() {
        let cli = Cli::try_parse_from([
            "capsid",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "--no-pivot",
            "--no-new-keyring",
            "c1",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Verb::Create(_))));
        let Some(Verb::Create(args)) =
            Cli::try_parse_from(["capsid", "create", "--console-socket", "/s", "c1"])
                .unwrap()
                .command
        else {
            panic!("create")
        };
        let e = oci::create(&cli.root, &args).unwrap_err().to_string();
        assert!(
            e.starts_with("--console-socket /s: ") && e.contains("without -t"),
            "{e}"
        );
    }

    #[test]
    fn runcs_global_options_go_before_or_after_the_verb() {
        let parse = |a: &[&str]| Cli::try_parse_from(a).unwrap();
        for line in [
            &[
                "capsid",
                "--root",
                "/r",
                "--log",
                "/l.json",
                "--log-format",
                "json",
                "--systemd-cgroup",
                "state",
                "c1",
            ][..],
            &[
                "capsid",
                "state",
                "--root",
                "/r",
                "--log",
                "/l.json",
                "--log-format=json",
                "c1",
            ],
        ] {
            let cli = parse(line);
            assert_eq!(
                format!("{:?}", cli.root),
                r#"Root { root: "/r" }"#,
                "{line:?}"
            );
            assert!(
                format!("{:?}", cli.runc).contains(r#"log: Some("/l.json"), log_format: Json"#)
            );
            assert!(matches!(cli.command, Some(Verb::State(_))), "{line:?}");
        }
    }
}
