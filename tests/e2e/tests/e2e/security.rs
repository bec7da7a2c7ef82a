//! The walls, checked from where an attacker would stand: a container
//! process trying to reach the agent, and the VMM process as the host sees
//! it (docs/security.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_testbed::artifact;

use crate::cli::{capsid_run, child_named, leftovers};

/// Every vsock address a container might try for the agent's port: the
/// loopback CID, the host, the guest's own CID, and "any".
const AGENT_ADDRESSES: [&str; 4] = ["1:1024", "2:1024", "3:1024", "4294967295:1024"];

#[test]
fn a_container_process_cannot_reach_the_agent_over_vsock() {
    if !require_kvm("a_container_process_cannot_reach_the_agent_over_vsock") {
        return;
    }
    // Before the fix a process in a container, root or not, connected to
    // CID 1 or the guest's own CID, port 1024, and the agent answered it.
    for extra in [
        &[][..],
        &["-u", "1000:1000"],
        &["--security-opt", "seccomp=unconfined"],
        &["-u", "1000:1000", "--security-opt", "seccomp=unconfined"],
    ] {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--", "capsid-check", "vsock"]);
        args.extend(AGENT_ADDRESSES);
        let (output, _) = capsid_run(&args, b"");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{extra:?}: {stdout}{stderr}");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), AGENT_ADDRESSES.len(), "{extra:?}: {stdout}");
        for line in &lines {
            assert!(line.contains("refused"), "{extra:?}: {line}");
        }
        if !extra.contains(&"seccomp=unconfined") {
            // The default profile refuses the socket itself.
            assert!(
                lines
                    .iter()
                    .all(|l| l.contains("socket: Operation not permitted")),
                "{extra:?}: {stdout}"
            );
        }
        eprintln!("{extra:?}:\n{stdout}");
    }
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// `Key:\tvalue` from a /proc status file.
fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// What the host sees of every thread of process `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        seen.push((status_field(&status, "Name"), status));
    }
    seen
}

fn namespace(pid: &str, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn the_vmm_runs_unprivileged_in_its_own_namespaces_with_seccomp_on_every_thread() {
    if !require_kvm("the_vmm_runs_unprivileged_in_its_own_namespaces_with_seccomp_on_every_thread")
    {
        return;
    }
    let rootfs = std::env::var("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let mut capsid = Command::new(artifact("CAPSID_CLI"))
        .args(["run", "--rootfs", &rootfs, "--", "sleep", "60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // The keeper is capsid's child; the VMM is the keeper's, in its own
    // PID namespace. Wait until the VMM runs its vCPU.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (keeper, vmm) = loop {
        assert!(Instant::now() < deadline, "no capsid-vmm appeared");
        if let Some(keeper) = child_named(capsid.id(), "capsid-vmm")
            && let Some(vmm) = child_named(keeper, "capsid-vmm")
            && threads(vmm).iter().any(|(name, _)| name == "vcpu0")
        {
            break (keeper, vmm);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut names = Vec::new();
    for pid in [keeper, vmm] {
        for (name, status) in threads(pid) {
            let uid = status_field(&status, "Uid");
            assert!(
                !uid.starts_with("0\t") && !uid.is_empty(),
                "{pid} {name}: Uid {uid}"
            );
            for (key, want) in [
                ("CapEff", "0000000000000000"),
                ("CapPrm", "0000000000000000"),
                ("CapBnd", "0000000000000000"),
                ("NoNewPrivs", "1"),
                ("Seccomp", "2"),
            ] {
                assert_eq!(status_field(&status, key), want, "{pid} {name}: {key}");
            }
            names.push(name);
        }
    }
    eprintln!("confined threads: {names:?}");
    assert!(names.iter().any(|n| n == "vcpu0") && names.iter().any(|n| n.starts_with("virtio")));
    // Its root holds only /vm, its sockets and logs.
    let root: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(root, ["vm"]);
    let mut vm: Vec<String> = std::fs::read_dir(format!("/proc/{vmm}/root/vm"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    vm.sort();
    // A VM restored from its template also has its API socket: its image
    // came through a spare slot.
    let files: Vec<&str> = vm
        .iter()
        .map(String::as_str)
        .filter(|name| *name != "api.sock")
        .collect();
    assert_eq!(files, ["console.log", "vmm.log", "vsock.sock"], "{vm:?}");
    // Made owner-only when created (the VMM's umask), never chmod-ed after.
    for name in &vm {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::symlink_metadata(format!("/proc/{vmm}/root/vm/{name}"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name}: {mode:o}");
    }
    // Namespaces of its own.
    for ns in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
        assert_ne!(
            namespace(&vmm.to_string(), ns),
            namespace("self", ns),
            "{ns} namespace"
        );
    }
    let limits = std::fs::read_to_string(format!("/proc/{vmm}/limits")).unwrap();
    for (limit, want) in [("Max core file size", "0"), ("Max open files", "1024")] {
        let line = limits.lines().find(|l| l.starts_with(limit)).unwrap();
        assert_eq!(line.split_whitespace().nth_back(2), Some(want), "{line}");
    }
    // Its cgroup bounds its memory: guest RAM + overhead.
    let cgroup = std::fs::read_to_string(format!("/proc/{vmm}/cgroup")).unwrap();
    eprintln!("VMM cgroup: {}", cgroup.trim());
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        let name = cgroup.trim().rsplit('/').next().unwrap().to_owned();
        let max = std::fs::read_to_string(format!("/sys/fs/cgroup/capsid/{name}/memory.max"))
            .unwrap_or_default();
        assert_eq!(max.trim(), ((256 + 192) << 20).to_string(), "{cgroup}");
    }
    // SIGTERM: capsid takes everything down.
    let _ = Command::new("kill").arg(capsid.id().to_string()).status();
    let status = capsid.wait().unwrap();
    assert!(!status.success());
    assert_eq!(leftovers(), Vec::<String>::new());
}
