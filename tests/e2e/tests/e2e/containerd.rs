//! Real containerd, real `ctr`, our shim: each container in a micro-VM.
//! The harness (`capsid_testbed::containerd`) runs a private containerd with the
//! locally built busybox images imported.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use capsid_e2e::{on_a_pty, require_kvm};
use capsid_testbed::containerd::{BUSYBOX, BUSYBOX_USER, Containerd, RUNTIME, wait_bounded};
use capsid_testbed::procfs::{memory_outside_guest, pss_kib};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn pids_named(name: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim().starts_with(name))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Pids of processes whose program (argv[0]) ends with `name` and whose
/// command line contains `with`.
pub(crate) fn pids_of(name: &str, with: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let matches = args.first()?.ends_with(name) && args.iter().any(|a| a.contains(with));
            if matches {
                e.file_name().to_str()?.parse().ok()
            } else {
                None
            }
        })
        .collect()
}

/// One pid per running VM: its keeper, the `capsid-vmm` whose parent is
/// not one (the VMM proper runs under it, in its own PID namespace).
pub(crate) fn vms() -> Vec<i32> {
    let all = pids_of("capsid-vmm", "");
    all.iter()
        .copied()
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let parent: Option<i32> = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|p| p.trim().parse().ok());
            parent.is_none_or(|parent| !all.contains(&parent))
        })
        .collect()
}

#[test]
fn ctr_run_gives_output_exit_code_stdin_and_a_tty() {
    if !require_kvm("ctr_run_gives_output_exit_code_stdin_and_a_tty") {
        return;
    }
    let containerd = Containerd::start();

    // Output, its two streams, the exit code; and the time to the first byte.
    let args = Containerd::run_args(
        &["--rm"],
        BUSYBOX,
        "c1",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    let started = Instant::now();
    let mut child = containerd
        .ctr_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    let first_byte = match stdout.read(&mut first) {
        Ok(1) => Some(started.elapsed()),
        _ => None,
    };
    let mut rest = Vec::new();
    let _ = stdout.read_to_end(&mut rest);
    let output = wait_bounded(child, &args);
    let stderr = text(&output.stderr);
    let mut printed = first[..usize::from(first_byte.is_some())].to_vec();
    printed.extend_from_slice(&rest);
    assert_eq!(
        text(&printed),
        "out\n",
        "stderr: {stderr}\n{}",
        containerd.log()
    );
    assert!(stderr.lines().any(|l| l == "err"), "{stderr}");
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    eprintln!(
        "figure: ctr run → first output byte {:.2} s, → exit {:.2} s",
        first_byte.unwrap_or_default().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // The overlayfs snapshotter (containerd's default): the shim reads the
    // layers through a read-only overlay of its own.
    let args = [
        "run",
        "--runtime",
        RUNTIME,
        "--snapshotter",
        "overlayfs",
        "--rm",
        BUSYBOX,
        "c10",
        "sh",
        "-c",
        "echo overlay; exit 4",
    ];
    let output = containerd.ctr(&args);
    assert_eq!(
        text(&output.stdout),
        "overlay\n",
        "{}\n{}",
        text(&output.stderr),
        containerd.log()
    );
    assert_eq!(output.status.code(), Some(4));

    // Stdin without a terminal (ctr always attaches it), byte-exact; the
    // user of the image.
    let input: Vec<u8> = (0..=255u8).cycle().take(128 * 1024).collect();
    let args = Containerd::run_args(&["--rm"], BUSYBOX, "c2", &["cat"]);
    let output = containerd.ctr_with_input(&args, &input);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(
        output.stdout == input,
        "stdin came back changed ({} bytes)",
        output.stdout.len()
    );
    let args = Containerd::run_args(&["--rm"], BUSYBOX_USER, "c3", &["id"]);
    let id = containerd.ctr_ok(&args);
    assert!(id.starts_with("uid=1000(capsid) gid=1000(capsid)"), "{id}");

    // A terminal: the process sees a pty, input reaches it, the code returns.
    let args = Containerd::run_args(&["--rm", "-t"], BUSYBOX, "c4", &["sh", "-c", "tty; exit 5"]);
    let (printed, code) = on_a_pty(&mut containerd.ctr_command(&args), &args);
    assert!(printed.contains("/dev/pts/"), "{printed:?}");
    assert_eq!(code, Some(5), "{printed:?}");
    // No stray NUL (shown as ^@) at the start of a tty session.
    assert!(
        !printed.contains('\0') && !printed.contains("^@"),
        "{printed:?}"
    );

    // Two at once.
    let spawn = |id: &'static str| {
        let args = Containerd::run_args(&["--rm"], BUSYBOX, id, &["echo", id]);
        let child = containerd
            .ctr_command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        (child, args)
    };
    let (a, args_a) = spawn("c5");
    let (b, args_b) = spawn("c6");
    let (a, b) = (wait_bounded(a, &args_a), wait_bounded(b, &args_b));
    assert_eq!(text(&a.stdout), "c5\n", "{}", text(&a.stderr));
    assert_eq!(text(&b.stdout), "c6\n", "{}", text(&b.stderr));

    // A small host file bind-mounted, as CRI does with /etc/hosts: copied in.
    let greeting = containerd.dir().join("greeting");
    std::fs::write(&greeting, "hello from the host\n").unwrap();
    let mount = format!(
        "type=bind,src={},dst=/etc/greeting,options=rbind:ro",
        greeting.display()
    );
    let args = Containerd::run_args(
        &["--rm", "--mount", &mount],
        BUSYBOX,
        "c8",
        &["cat", "/etc/greeting"],
    );
    assert_eq!(containerd.ctr_ok(&args), "hello from the host\n");
    // A host directory that cannot be copied (containerd's own, with its
    // socket): refused at create, naming what and why.
    let mount = format!(
        "type=bind,src={},dst=/srv,options=rbind",
        containerd.dir().display()
    );
    let args = Containerd::run_args(&["--rm", "--mount", &mount], BUSYBOX, "c9", &["true"]);
    let output = containerd.ctr(&args);
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("mount at /srv: cannot copy")
            && stderr.contains("a socket, FIFO or device is not copied"),
        "{stderr}"
    );
    let _ = containerd.ctr(&["containers", "rm", "c9"]);

    // A bundle the runtime refuses: the error says why, nothing is left.
    let args = Containerd::run_args(&["--rm"], BUSYBOX, "c7", &["no-such-program"]);
    let output = containerd.ctr(&args);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("no-such-program"),
        "{}",
        text(&output.stderr)
    );
    let _ = containerd.ctr(&["containers", "rm", "c7"]);

    containerd.assert_no_leftovers();
}

#[test]
fn the_disk_annotation_puts_a_containers_writes_on_a_scratch_disk() {
    if !require_kvm("the_disk_annotation_puts_a_containers_writes_on_a_scratch_disk") {
        return;
    }
    let containerd = Containerd::start();
    // As `capsid run --disk`: a disk filler meets ENOSPC at 64 MiB.
    let args = Containerd::run_args(
        &["--rm", "--annotation", "io.capsid.disk=64M"],
        BUSYBOX,
        "disk1",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/fill bs=1M count=200 2>&1 | grep -m1 'No space'; echo alive",
        ],
    );
    let output = containerd.ctr_bounded(&args);
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}{}\n{}",
        text(&output.stderr),
        containerd.log()
    );
    assert!(stdout.contains("No space left on device"), "{stdout}");
    assert!(stdout.ends_with("alive\n"), "{stdout}");
}

#[test]
fn a_small_host_directory_bound_in_is_copied_as_kubernetes_volumes_need() {
    if !require_kvm("a_small_host_directory_bound_in_is_copied_as_kubernetes_volumes_need") {
        return;
    }
    let containerd = Containerd::start();
    // A secret volume as the kubelet writes one: the data in a dated
    // directory, `..data` pointing at it, each key a link through it.
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-tree").unwrap();
    let volume = scratch.join("secret");
    let data = volume.join("..2026_12_02_04_00_00.1");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("token"), "a-token\n").unwrap();
    std::fs::write(data.join("sub/ca.crt"), "a-ca\n").unwrap();
    std::os::unix::fs::symlink("..2026_12_02_04_00_00.1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", volume.join("token")).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/var/run/secrets/x,options=rbind:ro",
        volume.display()
    );
    let args = Containerd::run_args(
        &["--rm", "--mount", &mount],
        BUSYBOX,
        "tree1",
        &[
            "sh",
            "-c",
            "cat /var/run/secrets/x/token /var/run/secrets/x/..data/sub/ca.crt; \
             readlink /var/run/secrets/x/token; \
             touch /var/run/secrets/x/new 2>/dev/null || echo read-only",
        ],
    );
    let output = containerd.ctr_bounded(&args);
    let stdout = text(&output.stdout);
    assert_eq!(
        stdout,
        "a-token\na-ca\n..data/token\nread-only\n",
        "{}\n{}",
        text(&output.stderr),
        containerd.log()
    );
    assert_eq!(output.status.code(), Some(0));
    // The host's directory is as it was.
    assert!(!volume.join("new").exists());
}

#[test]
fn ctr_task_exec_ps_metrics_kill_delete_and_deaths_leave_nothing() {
    if !require_kvm("ctr_task_exec_ps_metrics_kill_delete_and_deaths_leave_nothing") {
        return;
    }
    let containerd = Containerd::start();
    let args = Containerd::run_args(&["-d"], BUSYBOX, "d1", &["sleep", "1000"]);
    containerd.ctr_ok(&args);

    let exec = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo from exec; exit 2",
    ]);
    assert_eq!(text(&exec.stdout), "from exec\n", "{}", text(&exec.stderr));
    assert_eq!(exec.status.code(), Some(2));
    let input = b"exec stdin\n";
    let exec = containerd.ctr_with_input(&["task", "exec", "--exec-id", "e2", "d1", "cat"], input);
    assert_eq!(exec.stdout, input, "{}", text(&exec.stderr));

    // pause freezes the task's processes in the guest, resume thaws them
    // (containerd answered "Pause is not supported" before).
    containerd.ctr_ok(&["task", "pause", "d1"]);
    let tasks = containerd.ctr_ok(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("d1 ") && l.contains("PAUSED")),
        "{tasks}"
    );
    containerd.ctr_ok(&["task", "resume", "d1"]);
    let tasks = containerd.ctr_ok(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.starts_with("d1 ") && l.contains("RUNNING")),
        "{tasks}"
    );
    let exec = containerd.ctr(&["task", "exec", "--exec-id", "e3", "d1", "true"]);
    assert!(exec.status.success(), "{}", text(&exec.stderr));

    // containerd sees host pids only: the VM's (its VMM's), never the
    // guest's own, which name other processes on the host.
    let ps = containerd.ctr_ok(&["task", "ps", "d1"]);
    let listed: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let vm_pids: Vec<u32> = pids_named("capsid-vmm")
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        !listed.is_empty() && listed.iter().all(|p| vm_pids.contains(p)),
        "ctr task ps lists the VM's pid:\n{ps}\nVMMs: {vm_pids:?}"
    );
    let metrics = containerd.ctr_ok(&["task", "metrics", "d1"]);
    assert!(
        metrics.contains("memory") && metrics.contains("pids"),
        "ctr task metrics:\n{metrics}"
    );
    // What the guest measured, complete: CPU time split into user and
    // system, and the VM's memory (256 MiB) as the limit of a container
    // that has none, not 2^64-1.
    let json = containerd.ctr_ok(&["task", "metrics", "--format", "json", "d1"]);
    let value: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("ctr task metrics --format json: {e}:\n{json}"));
    let data = value.get("Data").unwrap_or(&value);
    let number = |path: &[&str]| {
        path.iter()
            .try_fold(data, |v, key| v.get(key))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0)
    };
    let cpu_time = number(&["cpu", "user_usec"]) + number(&["cpu", "system_usec"]);
    assert!(cpu_time > 0, "no user or system time:\n{json}");
    let limit = number(&["memory", "usage_limit"]);
    assert!(
        limit > 128 << 20 && limit <= 256 << 20,
        "memory limit {limit}, not the VM's 256 MiB:\n{json}"
    );
    assert!(
        number(&["memory", "anon"]) + number(&["memory", "file"]) > 0,
        "{json}"
    );
    let ls = containerd.ctr_ok(&["task", "ls"]);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("d1") && l.contains("RUNNING")),
        "{ls}"
    );

    // Host memory of one sandbox: the shim, and the VMM outside guest RAM
    // (256 MiB, the configuration's default), and the guest RAM it touched.
    let shim: u64 = pids_named("containerd-shim")
        .iter()
        .filter_map(|p| p.parse().ok().and_then(pss_kib))
        .sum();
    let vmm_pids = pids_named("capsid-vmm");
    let vmm: u64 = vmm_pids
        .iter()
        .filter_map(|p| p.parse().ok().and_then(pss_kib))
        .sum();
    let vmm_outside: u64 = vmm_pids
        .iter()
        .filter_map(|p| p.parse().ok())
        .map(|p| memory_outside_guest(p, 256 << 10).1)
        .sum();
    eprintln!(
        "figure: one sandbox's host PSS: shim {shim} KiB + capsid-vmm {vmm_outside} KiB outside \
         guest RAM = {} KiB; guest RAM touched {} KiB",
        shim + vmm_outside,
        vmm - vmm_outside
    );

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "d1"]);
    containerd.wait_for_status("d1", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "d1"]);
    containerd.ctr_ok(&["containers", "rm", "d1"]);
    containerd.assert_no_leftovers();

    // The VMM dies under a running task: the task stops (255), never hangs.
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "d2",
        &["sleep", "1000"],
    ));
    let vmms = vms();
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    // SAFETY: kill() takes plain integers.
    unsafe { libc::kill(vmms[0], libc::SIGKILL) };
    containerd.wait_for_status("d2", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "d2"]);
    containerd.ctr_ok(&["containers", "rm", "d2"]);
    containerd.assert_no_leftovers();

    // The shim dies: containerd runs `shim delete`, which kills the VM and
    // removes what the shim left.
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "d3",
        &["sleep", "1000"],
    ));
    let shims = pids_of("containerd-shim-capsid-v2", "d3");
    assert_eq!(shims.len(), 1, "{shims:?}");
    // SAFETY: kill() takes plain integers.
    unsafe { libc::kill(shims[0], libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while containerd
        .ctr_ok(&["task", "ls"])
        .lines()
        .any(|l| l.starts_with("d3") && l.contains("RUNNING"))
    {
        assert!(
            Instant::now() < deadline,
            "d3 still RUNNING after its shim died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = containerd.ctr(&["task", "delete", "d3"]);
    containerd.ctr_ok(&["containers", "rm", "d3"]);
    containerd.assert_no_leftovers();
}

/// `ctr run` options that make a container part of pod `pod`, as
/// containerd's CRI annotates it; `kind` is `sandbox` or `container`.
fn in_pod(kind: &str, pod: &str) -> [String; 4] {
    [
        "--annotation".into(),
        format!("io.kubernetes.cri.container-type={kind}"),
        "--annotation".into(),
        format!("io.kubernetes.cri.sandbox-id={pod}"),
    ]
}

/// A pod's containers share one micro-VM: the sandbox container boots it,
/// the others join it (their rootfs images attached to spare disk slots of
/// the running VM) and leave it, and it goes with the last of them.
#[test]
fn a_pods_containers_share_one_micro_vm() {
    if !require_kvm("a_pods_containers_share_one_micro_vm") {
        return;
    }
    let containerd = Containerd::start();
    let sandbox = in_pod("sandbox", "pod1");
    let member = in_pod("container", "pod1");
    let opts = |extra: &[&'static str], pod: &[String; 4]| -> Vec<String> {
        extra
            .iter()
            .map(|s| (*s).to_owned())
            .chain(pod.iter().cloned())
            .collect()
    };
    let run = |options: &[String], image: &str, id: &str, command: &[&str]| {
        let options: Vec<&str> = options.iter().map(String::as_str).collect();
        containerd.ctr(&Containerd::run_args(&options, image, id, command))
    };
    let boot_id = "/proc/sys/kernel/random/boot_id";

    let started = Instant::now();
    let out = run(
        &opts(&["-d"], &sandbox),
        BUSYBOX,
        "pod1",
        &["sleep", "1000"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let boot = started.elapsed();
    let vmms = vms();
    assert_eq!(vmms.len(), 1, "the pod's VM: {vmms:?}");
    let exec = containerd.ctr(&["task", "exec", "--exec-id", "b", "pod1", "cat", boot_id]);
    let pod_boot_id = text(&exec.stdout);
    assert_eq!(pod_boot_id.trim().len(), 36, "{}", text(&exec.stderr));

    // A container joins: same kernel (boot id), its own image and user, its
    // exit code; no second VM or shim.
    let started = Instant::now();
    let script = format!("cat {boot_id}; id -un; exit 6");
    let out = run(
        &opts(&["--rm"], &member),
        BUSYBOX_USER,
        "c1",
        &["sh", "-c", &script],
    );
    let join = started.elapsed();
    assert_eq!(
        text(&out.stdout),
        format!("{pod_boot_id}capsid\n"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(6));
    assert_eq!(vms(), vmms, "c1 ran in the pod's VM");
    assert_eq!(pids_of("containerd-shim-capsid-v2", "").len(), 1);
    eprintln!(
        "figure: ctr run → exit: the pod's sandbox {:.2} s (boots the VM), a container joining it {:.2} s",
        boot.as_secs_f64(),
        join.as_secs_f64()
    );

    // Two at once, one after the other reusing c1's freed disk slot; both
    // running side by side with the sandbox.
    for id in ["c2", "c3"] {
        let out = run(&opts(&["-d"], &member), BUSYBOX, id, &["sleep", "1000"]);
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
    }
    for id in ["c2", "c3"] {
        let exec = containerd.ctr(&["task", "exec", "--exec-id", "b", id, "cat", boot_id]);
        assert_eq!(
            text(&exec.stdout),
            pod_boot_id,
            "{id}: {}",
            text(&exec.stderr)
        );
        containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
        containerd.wait_for_status(id, "STOPPED");
        containerd.ctr_ok(&["task", "delete", id]);
        containerd.ctr_ok(&["containers", "rm", id]);
    }
    assert_eq!(vms(), vmms, "the VM stays with its sandbox");

    // A container of a pod whose sandbox is not running: refused, with the
    // reason, and nothing left of it.
    let out = run(
        &opts(&["--rm"], &in_pod("container", "nopod")),
        BUSYBOX,
        "c4",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("create its sandbox container first"),
        "{}",
        text(&out.stderr)
    );
    let _ = containerd.ctr(&["containers", "rm", "c4"]);

    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "pod1"]);
    containerd.wait_for_status("pod1", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "pod1"]);
    containerd.ctr_ok(&["containers", "rm", "pod1"]);
    containerd.assert_no_leftovers();
}
