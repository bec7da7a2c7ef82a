//! `capsid doctor`: what this host has, and for each problem the fix.

use std::path::Path;
use std::process::{Command, ExitCode};

use capsid_runtime::vmm_api::host::{HostReport, Mode};
use clap::Args;

use crate::run::{Artifacts, ask_vmm};

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

/// Each wall around a VMM (docs/security.md), and whether this host has it.
/// `host` is what capsid-vmm reported about this host, or why it did not.
fn walls(
    artifacts: &Artifacts,
    host: &Result<HostReport, String>,
) -> Vec<(&'static str, Result<String, String>, &'static str)> {
    let config = artifacts.config().ok();
    let jail = config.as_ref().is_none_or(|c| c.vmm_jail);
    let mut walls = Vec::new();
    let namespaces = ["mnt", "pid", "net", "ipc", "uts", "cgroup"];
    let missing: Vec<&str> = namespaces
        .iter()
        .copied()
        .filter(|ns| !Path::new(&format!("/proc/self/ns/{ns}")).exists())
        .collect();
    walls.push((
        "VMM confinement",
        if !jail {
            Err("vmm_jail = false in the configuration: VMMs run unconfined, as root".into())
        } else if !capsid_runtime::confine::is_root() {
            Err(
                "not root: the runtime cannot confine VMMs (namespaces, a private root, \
                 an unprivileged user of each VM's own)"
                    .into(),
            )
        } else if !missing.is_empty() {
            Err(format!(
                "the kernel lacks namespaces: {}",
                missing.join(", ")
            ))
        } else {
            Ok(format!(
                "own {} namespaces, an empty root with only /vm, a user per VM, no \
                 capabilities, no_new_privs",
                namespaces.join("/")
            ))
        },
        "run the runtime as root on a kernel with namespaces, and keep vmm_jail = true",
    ));
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Seccomp:"));
    walls.push((
        "VMM seccomp",
        match (seccomp, config.as_ref().map(|c| c.vmm_seccomp.as_str())) {
            (false, _) => Err("the kernel has no seccomp".into()),
            (true, Some("none")) => Err("vmm_seccomp = \"none\": no filters".into()),
            (true, Some("log")) => Err("vmm_seccomp = \"log\": filters only log".into()),
            (true, _) => match host {
                Ok(host) => Ok(format!(
                    "per-thread allowlists, a syscall outside kills the VMM (syscalls \
                     allowed: {})",
                    host.seccomp
                        .iter()
                        .map(|list| format!("{} {}", list.thread, list.syscalls))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Err(e) => Err(format!("cannot tell: {e}")),
            },
        },
        "a kernel with CONFIG_SECCOMP_FILTER, and vmm_seccomp = \"kill\"",
    ));
    walls.push((
        "Landlock",
        match host {
            Ok(HostReport {
                landlock_abi: Some(abi),
                ..
            }) => Ok(format!(
                "ABI {abi}: the VMM may only make and remove sockets in /vm"
            )),
            Ok(_) => Err(
                "not available: the kernel lacks it or it is not in lsm=; VMMs run without \
                 this second wall"
                    .to_owned(),
            ),
            Err(e) => Err(format!("cannot tell: {e}")),
        },
        "a kernel with CONFIG_SECURITY_LANDLOCK and landlock in its lsm= list",
    ));
    let cgroup_root = Path::new("/sys/fs/cgroup");
    walls.push((
        "VM cgroups",
        if capsid_runtime::confine::cgroup2_has(cgroup_root, &["memory", "pids"]) {
            Ok(
                "cgroup v2 with memory and pids: each VMM bounded to its guest's RAM \
                plus overhead"
                    .into(),
            )
        } else {
            Err(
                "no cgroup v2 with the memory and pids controllers at /sys/fs/cgroup: \
                 VMMs run without memory and process limits"
                    .into(),
            )
        },
        "boot with the unified cgroup hierarchy (systemd.unified_cgroup_hierarchy=1)",
    ));
    walls
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
    // capsid-vmm itself says what this host gives a VMM.
    let vmm = args.artifacts.config().ok().and_then(|c| c.vmm_path());
    let host = match vmm.filter(|vmm| vmm.is_file()) {
        Some(vmm) => ask_vmm(&vmm).map_err(|e| format!("{e:#}")),
        None => Err("capsid-vmm not found (see below), so nothing asked it".to_owned()),
    };
    let kvm = match &host {
        Ok(host) => match host.kvm.mode {
            Mode::Native => Ok(format!("native ({})", host.kvm.reason)),
            Mode::Nested if !Path::new("/dev/kvm").exists() => {
                Err("none: there is no /dev/kvm".into())
            }
            Mode::Nested if host.paravirtual_kvm => {
                Err(format!("paravirtual: {}", host.kvm.reason))
            }
            Mode::Nested => Err(format!("unusable: {}", host.kvm.reason)),
        },
        Err(e) => Err(format!("cannot tell: {e}")),
    };
    report(
        "KVM",
        kvm,
        "run on a host with hardware virtualization (VT-x/AMD-V, or nested virtualization \
         enabled); here, `make demo` and `make test` boot guests inside a nested test host",
    );
    for (what, result, fix) in walls(&args.artifacts, &host) {
        report(what, result, fix);
    }
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
            let swept = capsid_runtime::scratch::sweep(&config.run_dir, &config.confinement());
            report(
                "left behind",
                Ok(if swept.is_empty() {
                    "no micro-VM left by a killed capsid run".into()
                } else {
                    let names = |paths: &[std::path::PathBuf]| {
                        paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    let mut said = Vec::new();
                    if !swept.dirs.is_empty() {
                        said.push(format!(
                            "removed what killed capsid runs left (their VMs, cgroups and {})",
                            names(&swept.dirs)
                        ));
                    }
                    if !swept.cgroups.is_empty() {
                        said.push(format!(
                            "removed the empty cgroups that slow teardowns left ({})",
                            names(&swept.cgroups)
                        ));
                    }
                    said.join("; ")
                }),
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
