//! `capsid doctor`: what this host has, and for each problem the fix.

use std::path::Path;
use std::process::{Command, ExitCode};

use capsid_vmm::probe::{self, Mode};
use clap::Args;

use crate::run::Artifacts;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    artifacts: Artifacts,
}

fn tool(name: &str, arg: &str) -> Option<String> {
    let output = Command::new(name).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    Some(text.lines().next().unwrap_or("").trim().to_owned())
}

fn file(path: &Path) -> Result<String, String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(format!("{} ({} KiB)", path.display(), m.len() / 1024)),
        _ => Err(format!("{} is missing", path.display())),
    }
}

pub fn doctor(args: &DoctorArgs) -> anyhow::Result<ExitCode> {
    let mut problems = 0;
    let mut report = |what: &str, result: Result<String, String>, fix: &str| match result {
        Ok(detail) => println!("ok       {what}: {detail}"),
        Err(problem) => {
            problems += 1;
            println!("PROBLEM  {what}: {problem}\n         fix: {fix}");
        }
    };
    let verdict = probe::probe();
    let kvm = match verdict.mode {
        Mode::Native => Ok(format!("native ({})", verdict.reason)),
        Mode::Nested if !Path::new("/dev/kvm").exists() => Err("none: there is no /dev/kvm".into()),
        Mode::Nested if probe::paravirtual_kvm() => Err(format!("paravirtual: {}", verdict.reason)),
        Mode::Nested => Err(format!("unusable: {}", verdict.reason)),
    };
    report(
        "KVM",
        kvm,
        "run on a host with hardware virtualization (VT-x/AMD-V, or nested virtualization \
         enabled); here, `make demo` and `make test` boot guests inside a nested test host",
    );
    match args.artifacts.config() {
        Ok(config) => {
            report(
                "configuration",
                Ok(
                    std::env::var_os(capsid_runtime::config::CONFIG_ENV).map_or_else(
                        || {
                            capsid_runtime::config::DEFAULT_CONFIG_PATH.to_owned()
                                + " (or defaults)"
                        },
                        |p| p.to_string_lossy().into_owned(),
                    ),
                ),
                "",
            );
            report(
                "guest kernel",
                file(&config.kernel),
                "`make demo` builds it (kernel-config/build.sh); set kernel in the configuration, \
                 CAPSID_KERNEL or --kernel",
            );
            report(
                "guest initramfs",
                file(&config.initramfs),
                "`make demo` builds it (capsid-image initramfs); set initramfs in the \
                 configuration, CAPSID_AGENT_INITRAMFS or --initrd",
            );
            report(
                "capsid-vmm",
                config
                    .vmm_path()
                    .ok_or_else(|| {
                        format!(
                            "{} not found beside capsid or in PATH",
                            config.vmm.display()
                        )
                    })
                    .and_then(|p| file(&p)),
                "build it with `cargo build --release -p capsid-vmm`; set vmm in the \
                 configuration, CAPSID_VMM or --vmm",
            );
        }
        Err(e) => report(
            "configuration",
            Err(format!("{e:#}")),
            "fix the key it names (docs/containerd.md lists them)",
        ),
    }
    report(
        "rootfs images",
        tool("mkfs.erofs", "-V")
            .filter(|v| !v.is_empty())
            .map(|v| format!("mkfs.erofs {v}"))
            .or_else(|| tool("mkfs.ext4", "-V").map(|v| format!("mkfs.ext4 {v} (no erofs)")))
            .ok_or_else(|| "neither mkfs.erofs nor mkfs.ext4 found".to_owned()),
        "apt-get install erofs-utils",
    );
    report(
        "containerd",
        tool("containerd", "--version").ok_or_else(|| "containerd not found".to_owned()),
        "apt-get install containerd (needed for the shim only; `capsid run` works without)",
    );
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
