//! `cocoon doctor`: what this host has, and for each problem the fix.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::Args;
use cocoon_vmm::probe::{self, Mode};

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
    let artifacts = &args.artifacts;
    report(
        "guest kernel",
        artifacts
            .kernel()
            .map_err(|e| e.to_string())
            .and_then(|p| file(&p)),
        "`make demo` builds it (kernel-config/build.sh); pass --kernel or set COCOON_KERNEL",
    );
    report(
        "guest initramfs",
        artifacts
            .initrd()
            .map_err(|e| e.to_string())
            .and_then(|p| file(&p)),
        "`make demo` builds it (cocoon-image initramfs); pass --initrd or set COCOON_AGENT_INITRAMFS",
    );
    report(
        "cocoon-vmm",
        artifacts
            .vmm()
            .map_err(|e| e.to_string())
            .and_then(|p| file(&p)),
        "build it with `cargo build --release -p cocoon-vmm`; pass --vmm or set COCOON_VMM",
    );
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
        "apt-get install containerd (needed for the shim only; `cocoon run` works without)",
    );
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Used by `Artifacts` to look next to the `cocoon` binary.
pub fn beside_me(name: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let candidate = me.parent()?.join(name);
    candidate.is_file().then_some(candidate)
}
