//! Faults injected from outside (docs/reliability.md's fault matrix): each
//! ends with a clear error or an exit event within a bound, and nothing
//! left behind. Others live beside the feature they break: a VMM killed
//! under `capsid run` (cli.rs), under a containerd task, and a shim killed
//! (containerd.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_testbed::artifact;
use capsid_testbed::containerd::{BUSYBOX, Containerd};

use crate::cli::{
    capsid, capsid_run, child_named, leftovers, oci_bundle, oci_status, processes_left_after,
    started_in_a_micro_vm, tempfile_dir, unsafe_free_kill,
};
use crate::containerd::{pids_of, vms};

fn rootfs() -> String {
    std::env::var("CAPSID_TEST_ROOTFS_DIR").expect("CAPSID_TEST_ROOTFS_DIR is set by `make test`")
}

#[test]
fn a_capsid_run_killed_while_its_guest_boots_leaves_no_vm_and_doctor_clears_the_rest() {
    if !require_kvm(
        "a_capsid_run_killed_while_its_guest_boots_leaves_no_vm_and_doctor_clears_the_rest",
    ) {
        return;
    }
    let mut child = Command::new(artifact("CAPSID_CLI"))
        .args(["run", "--rootfs", &rootfs(), "--", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn capsid");
    // Killed as soon as its VMM exists: the guest is still booting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let vmm = loop {
        if let Some(vmm) = child_named(child.id(), "capsid-vmm") {
            break vmm;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("capsid run started no VMM within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    let left = processes_left_after(Duration::from_secs(10));
    assert!(
        left.is_empty(),
        "10 s after capsid run {} was killed while booting (its VMM was {vmm}): {left:?}",
        child.id()
    );
    let doctor = Command::new(artifact("CAPSID_CLI"))
        .arg("doctor")
        .output()
        .expect("run capsid doctor");
    let said = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        said.contains("removed what killed capsid runs left"),
        "capsid doctor:\n{said}"
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// A tmpfs of `kib` KiB at a fresh directory; unmounted and removed on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(kib: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("capsid-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "capsid-full",
            ])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", dir.display());
        Self(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Regular files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => files_under(&e.path()),
            _ => vec![e.path()],
        })
        .collect()
}

#[test]
fn a_full_cache_file_system_fails_the_image_conversion_clearly_and_leaves_nothing() {
    if !require_kvm(
        "a_full_cache_file_system_fails_the_image_conversion_clearly_and_leaves_nothing",
    ) {
        return;
    }
    // The test rootfs is about 3 MiB; its image cannot fit in 256 KiB.
    let cache = SmallFs::mount(256);
    let started = Instant::now();
    let output = Command::new(artifact("CAPSID_CLI"))
        .args(["run", "--rootfs", &rootfs(), "--", "true"])
        .env("CAPSID_CACHE", &cache.0)
        .stdin(Stdio::null())
        .output()
        .expect("run capsid");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("what capsid run says when the cache is full:\n{stderr}");
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(60), "{stderr}");
    assert!(
        stderr.contains("rootfs image") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    // No half-written image stays to be taken for a whole one.
    assert_eq!(files_under(&cache.0), Vec::<PathBuf>::new());
    assert_eq!(leftovers(), Vec::<String>::new());
    drop(cache);
    // The next run, with room, works.
    let (output, _) = capsid_run(&["--", "true"], b"");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn shim_pids() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with("containerd-shim"))
        })
        .map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let state = status
                .lines()
                .find(|l| l.starts_with("State:"))
                .unwrap_or("")
                .to_owned();
            format!("{} {state}", e.file_name().to_string_lossy())
        })
        .collect()
}

#[test]
fn containerd_restarted_while_a_task_runs_keeps_it_and_can_still_delete_it() {
    if !require_kvm("containerd_restarted_while_a_task_runs_keeps_it_and_can_still_delete_it") {
        return;
    }
    let mut containerd = Containerd::start();
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "r1",
        &["sh", "-c", "echo before > /tmp/mark; sleep 1000"],
    ));
    containerd.wait_for_status("r1", "RUNNING");
    let shims_before = shim_pids();
    let bundle = containerd
        .dir()
        .join("state/io.containerd.runtime.v2.task/default/r1");
    let listing = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let bundle_before = listing(&bundle);
    containerd.restart();
    // The shim and its VM lived on; the new containerd finds them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ls = containerd.ctr_ok(&["task", "ls"]);
        if ls
            .lines()
            .any(|l| l.starts_with("r1") && l.contains("RUNNING"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1 is not RUNNING after containerd restarted:\n{ls}\nshims before {shims_before:?}, \
             now {:?}; bundle before {bundle_before:?}, now {:?}\ncontainerd's log:\n{}",
            shim_pids(),
            listing(&bundle),
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let exec = containerd.ctr(&["task", "exec", "--exec-id", "x1", "r1", "cat", "/tmp/mark"]);
    assert!(
        exec.status.success() && String::from_utf8_lossy(&exec.stdout) == "before\n",
        "exec after the restart: {exec:?}\ncontainerd's log:\n{}",
        containerd.log()
    );
    // The shim publishes to the new containerd: the exit reaches those
    // who listen for events (CRI does), not only `task ls`.
    let mut events = containerd
        .ctr_command(&["events"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    let stream = events.stdout.take().unwrap();
    let (seen, exit_event) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            if line.contains("/tasks/exit") {
                let _ = seen.send(line);
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "r1"]);
    containerd.wait_for_status("r1", "STOPPED");
    let exit = exit_event.recv_timeout(Duration::from_secs(60));
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        exit.is_ok(),
        "no /tasks/exit event reached the restarted containerd in 60 s; its log:\n{}",
        containerd.log()
    );
    containerd.ctr_ok(&["task", "delete", "r1"]);
    containerd.ctr_ok(&["containers", "rm", "r1"]);
    containerd.assert_no_leftovers();
}

/// SIGKILLs the shim serving container `id`, once it runs.
fn kill_shim_of(id: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let [shim] = pids_of("containerd-shim-capsid-v2", id)[..] {
            // SAFETY: kill() takes plain integers.
            unsafe { libc::kill(shim, libc::SIGKILL) };
            return shim;
        }
        assert!(Instant::now() < deadline, "no shim for {id} within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits at most 60 s for `child` (a command a fault broke); its status.
fn ended_within_a_minute_of_the_fault(
    child: &mut std::process::Child,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still ran 60 s after the fault");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what containerd still lists of `id` after a fault; a task or
/// container may already be gone.
fn forget(containerd: &Containerd, id: &str) {
    let _ = containerd.ctr(&["task", "delete", "--force", id]);
    let _ = containerd.ctr(&["containers", "rm", id]);
}

#[test]
fn the_shim_killed_while_creating_in_an_exec_or_deleting_leaves_nothing() {
    if !require_kvm("the_shim_killed_while_creating_in_an_exec_or_deleting_leaves_nothing") {
        return;
    }
    let containerd = Containerd::start();

    // Creating: killed once its VMM exists, while the guest boots and
    // before the agent answered.
    let mut run = containerd
        .ctr_command(&Containerd::run_args(
            &["-d"],
            BUSYBOX,
            "k1",
            &["sleep", "1000"],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr run");
    let deadline = Instant::now() + Duration::from_secs(60);
    while vms().is_empty() {
        assert!(Instant::now() < deadline, "k1 started no VMM within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    kill_shim_of("k1");
    let status = ended_within_a_minute_of_the_fault(&mut run, "ctr run");
    assert!(
        !status.success(),
        "ctr run of k1 succeeded without its shim"
    );
    forget(&containerd, "k1");
    containerd.assert_no_leftovers();

    // In an exec: the exec's `ctr` ends with an error, the task stops.
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "k2",
        &["sleep", "1000"],
    ));
    let mut exec = containerd
        .ctr_command(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "k2",
            "sh",
            "-c",
            "echo started; sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task exec");
    let mut said = [0u8; 8];
    if let Err(e) = std::io::Read::read_exact(exec.stdout.as_mut().unwrap(), &mut said) {
        let _ = exec.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(exec.stderr.as_mut().unwrap(), &mut err);
        panic!(
            "the exec's first line: {e}; ctr said: {err}\ncontainerd's log:\n{}",
            containerd.log()
        );
    }
    assert_eq!(&said, b"started\n");
    kill_shim_of("k2");
    let status = ended_within_a_minute_of_the_fault(&mut exec, "ctr task exec");
    assert!(!status.success(), "the exec succeeded without its shim");
    forget(&containerd, "k2");
    containerd.assert_no_leftovers();

    // Deleting: killed while `ctr task delete` tears the VM down (or just
    // before, or just after: either way, nothing may stay).
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "k3",
        &["sleep", "1000"],
    ));
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "k3"]);
    containerd.wait_for_status("k3", "STOPPED");
    let mut delete = containerd
        .ctr_command(&["task", "delete", "k3"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr task delete");
    // The VM goes first in a delete; the shim is killed right after, as
    // it removes the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vms().is_empty() {
        assert!(
            Instant::now() < deadline,
            "k3's VM lived on 60 s into its delete"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    kill_shim_of("k3");
    ended_within_a_minute_of_the_fault(&mut delete, "ctr task delete");
    forget(&containerd, "k3");
    containerd.assert_no_leftovers();
}

#[test]
fn a_guest_kernel_panic_under_a_task_stops_it_and_the_log_names_the_panic() {
    if !require_kvm("a_guest_kernel_panic_under_a_task_stops_it_and_the_log_names_the_panic") {
        return;
    }
    let containerd = Containerd::start();
    // An operator's kernel_params make any OOM panic the guest's kernel;
    // each shim reads the configuration when containerd starts it.
    let mut config = std::fs::OpenOptions::new()
        .append(true)
        .open(containerd.dir().join("capsid.toml"))
        .unwrap();
    std::io::Write::write_all(
        &mut config,
        b"kernel_params = \"sysctl.vm.panic_on_oom=2\"\n",
    )
    .unwrap();
    let started = Instant::now();
    let run = containerd.ctr(&Containerd::run_args(
        &["--memory-limit", "33554432"],
        BUSYBOX,
        "p1",
        // Less than the VM's 96 MiB (the limit + overhead_mib), so the
        // allocation succeeds and touching it is what runs out.
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=48M", "count=1"],
    ));
    let log = containerd.log();
    assert_eq!(
        run.status.code(),
        Some(255),
        "a task whose guest kernel panicked: {run:?}\ncontainerd's log:\n{log}"
    );
    assert!(started.elapsed() < Duration::from_secs(120), "{run:?}");
    assert!(
        log.contains("the guest kernel panicked: Out of memory") && log.contains("panic_on_oom"),
        "the shim's log does not quote the guest's panic:\n{log}"
    );
    let _ = containerd.ctr(&["task", "delete", "p1"]);
    containerd.ctr_ok(&["containers", "rm", "p1"]);
    containerd.assert_no_leftovers();
}

/// `capsid VERB ...` started with its output in files under `scratch`,
/// for a test to kill.
fn spawn_capsid(args: &[&str], scratch: &Path) -> std::process::Child {
    Command::new(artifact("CAPSID_CLI"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(scratch.join(format!("out-killed-{}", args[0]))).unwrap())
        .stderr(std::fs::File::create(scratch.join(format!("err-killed-{}", args[0]))).unwrap())
        .spawn()
        .expect("spawn capsid")
}

/// `capsid delete --force ID` after a fault: it succeeds, or the
/// container is already gone; then nothing of it is left.
fn force_delete_leaves_nothing(root: &str, id: &str, scratch: &Path) {
    let (_, err, code) = capsid(&["delete", "--force", "--root", root, id], scratch);
    assert!(
        code == Some(0) || err.contains("does not exist"),
        "delete --force {id} after a fault: {err}"
    );
    let left = processes_left_after(Duration::from_secs(20));
    assert!(left.is_empty(), "after delete --force {id}: {left:?}");
    assert!(
        !Path::new(root).join(id).exists(),
        "{id}'s state directory is left"
    );
}

#[test]
fn capsid_create_exec_and_delete_killed_midway_leave_nothing_after_delete_force() {
    if !require_kvm("capsid_create_exec_and_delete_killed_midway_leave_nothing_after_delete_force")
    {
        return;
    }
    let scratch = tempfile_dir("capsid-oci-faults");
    let bundle = oci_bundle(&scratch, "exec sleep 1000");
    let root = scratch.join("state");
    let root = root.to_str().unwrap();
    let bundle = bundle.to_str().unwrap();

    // create, killed once its VMM exists: the guest still boots.
    let mut create = spawn_capsid(
        &["create", "--root", root, "--bundle", bundle, "o1"],
        &scratch,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers().iter().any(|l| l.contains("capsid-vmm")) {
        assert!(
            Instant::now() < deadline,
            "create started no VMM within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    create.kill().unwrap();
    create.wait().unwrap();
    force_delete_leaves_nothing(root, "o1", &scratch);

    // exec, killed while its command runs: the container lives on.
    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "o2"],
        &scratch,
    );
    assert_eq!(code, Some(0), "create: {err}");
    let (_, err, code) = capsid(&["start", "--root", root, "o2"], &scratch);
    assert_eq!(code, Some(0), "start: {err}");
    let mut exec = spawn_capsid(
        &[
            "exec",
            "--root",
            root,
            "o2",
            "--",
            "sh",
            "-c",
            "echo in-exec; exec sleep 1000",
        ],
        &scratch,
    );
    let said = scratch.join("out-killed-exec");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&said).unwrap_or_default() != "in-exec\n" {
        assert!(Instant::now() < deadline, "the exec did not start in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    exec.kill().unwrap();
    exec.wait().unwrap();
    assert_eq!(oci_status(root, "o2", &scratch), "running");
    force_delete_leaves_nothing(root, "o2", &scratch);

    // delete, killed once it has told the monitor to stop.
    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "o3"],
        &scratch,
    );
    assert_eq!(code, Some(0), "create: {err}");
    let mut delete = spawn_capsid(&["delete", "--force", "--root", root, "o3"], &scratch);
    std::thread::sleep(Duration::from_millis(100));
    delete.kill().unwrap();
    delete.wait().unwrap();
    force_delete_leaves_nothing(root, "o3", &scratch);
    assert_eq!(leftovers(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn a_frozen_micro_vm_under_capsid_run_fails_the_call_within_its_deadline_and_quotes_the_console() {
    if !require_kvm(
        "a_frozen_micro_vm_under_capsid_run_fails_the_call_within_its_deadline_and_quotes_the_console",
    ) {
        return;
    }
    let scratch = tempfile_dir("capsid-frozen");
    let config = scratch.join("capsid.toml");
    std::fs::write(&config, "agent_timeout_secs = 20\n").unwrap();
    let (mut child, keeper) = started_in_a_micro_vm(
        &["--timeout", "4s"],
        &[("CAPSID_CONFIG", &config)],
        100,
        Stdio::piped(),
    );
    let mut stderr = child.stderr.take().unwrap();
    // A guest that stops answering: the VMM and its keeper frozen, as a
    // wedged vCPU or a stuck host would leave them.
    let vmm = child_named(keeper, "capsid-vmm").expect("the confined VMM under its keeper");
    unsafe_free_kill(vmm, libc::SIGSTOP);
    unsafe_free_kill(keeper, libc::SIGSTOP);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("capsid run went on for 90 s with its VMM frozen");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    eprintln!("what capsid run says when its VM freezes:\n{err}");
    assert_eq!(status.code(), Some(125), "{err}");
    assert!(
        err.contains("did not answer")
            && err.contains("within 20s")
            && err.contains("the micro-VM was still running and is stopped")
            && err.contains("the guest console ended with"),
        "{err}"
    );
    let left = processes_left_after(Duration::from_secs(10));
    assert!(left.is_empty(), "after a frozen VM: {left:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn the_vmm_killed_while_booting_or_in_an_exec_ends_the_call_with_its_cause() {
    if !require_kvm("the_vmm_killed_while_booting_or_in_an_exec_ends_the_call_with_its_cause") {
        return;
    }
    // The template of this size exists (a VMM killed while it is made
    // only costs the run its warm start: it boots).
    let made = Command::new(artifact("CAPSID_CLI"))
        .args(["run", "--rootfs", &rootfs(), "--", "true"])
        .output()
        .expect("capsid run");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    // capsid run, its guest booting (--cold) or being restored: the run
    // fails, naming the VMM's end.
    for start in [&["--cold"][..], &[]] {
        let mut run = Command::new(artifact("CAPSID_CLI"))
            .args(["run", "--rootfs", &rootfs()])
            .args(start)
            .args(["--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capsid");
        let deadline = Instant::now() + Duration::from_secs(60);
        let keeper = loop {
            if let Some(keeper) = child_named(run.id(), "capsid-vmm") {
                break keeper;
            }
            assert!(
                Instant::now() < deadline,
                "capsid run started no VMM within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        unsafe_free_kill(keeper, libc::SIGKILL);
        let status = ended_within_a_minute_of_the_fault(&mut run, "capsid run");
        let mut err = String::new();
        std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(125), "{start:?}: {err}");
        assert!(err.contains("killed by signal 9"), "{start:?}: {err}");
        assert_eq!(
            processes_left_after(Duration::from_secs(10)),
            Vec::<String>::new()
        );
        assert_eq!(leftovers(), Vec::<String>::new());
    }

    let containerd = Containerd::start();
    // The shim's template exists, so the VM below is being restored.
    containerd.ctr_ok(&Containerd::run_args(&["--rm"], BUSYBOX, "v0", &["true"]));
    // ctr run, its guest being restored: the create fails.
    let mut create = containerd
        .ctr_command(&Containerd::run_args(
            &["-d"],
            BUSYBOX,
            "v1",
            &["sleep", "1000"],
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run");
    let deadline = Instant::now() + Duration::from_secs(60);
    let keeper = loop {
        if let [keeper] = vms()[..] {
            break keeper;
        }
        assert!(Instant::now() < deadline, "v1 started no VMM within 60 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    // SAFETY: kill() takes plain integers.
    unsafe { libc::kill(keeper, libc::SIGKILL) };
    let status = ended_within_a_minute_of_the_fault(&mut create, "ctr run");
    let mut err = String::new();
    std::io::Read::read_to_string(create.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        !status.success() && err.contains("killed by signal 9"),
        "ctr run of v1 with its VMM killed while booting: {status}: {err}"
    );
    forget(&containerd, "v1");
    containerd.assert_no_leftovers();

    // In an exec: the exec ends (255, as with runc when the container's
    // namespace dies), so does the task.
    containerd.ctr_ok(&Containerd::run_args(
        &["-d"],
        BUSYBOX,
        "v2",
        &["sleep", "1000"],
    ));
    let mut exec = containerd
        .ctr_command(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "v2",
            "sh",
            "-c",
            "echo started; sleep 1000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr task exec");
    let mut said = [0u8; 8];
    if let Err(e) = std::io::Read::read_exact(exec.stdout.as_mut().unwrap(), &mut said) {
        let _ = exec.kill();
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(exec.stderr.as_mut().unwrap(), &mut err);
        panic!(
            "the exec's first line: {e}; ctr said: {err}\ncontainerd's log:\n{}",
            containerd.log()
        );
    }
    let [keeper] = vms()[..] else {
        panic!("not one VM for v2: {:?}", vms());
    };
    // SAFETY: kill() takes plain integers.
    unsafe { libc::kill(keeper, libc::SIGKILL) };
    let status = ended_within_a_minute_of_the_fault(&mut exec, "ctr task exec");
    assert_eq!(status.code(), Some(255), "the exec whose VM died");
    containerd.wait_for_status("v2", "STOPPED");
    containerd.ctr_ok(&["task", "delete", "v2"]);
    containerd.ctr_ok(&["containers", "rm", "v2"]);
    containerd.assert_no_leftovers();
}

#[test]
fn a_guest_too_small_for_its_agent_is_refused_with_what_does_not_fit() {
    if !require_kvm("a_guest_too_small_for_its_agent_is_refused_with_what_does_not_fit") {
        return;
    }
    // 32 MiB is the smallest VM the configuration allows; our kernel and
    // initramfs need a little more (36 MiB boots).
    let (output, took) = capsid_run(&["--memory", "32M", "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(took < Duration::from_secs(60), "{took:?}: {stderr}");
    assert!(
        stderr.contains("does not fit in guest memory"),
        "capsid run --memory 32M: {stderr}"
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}
