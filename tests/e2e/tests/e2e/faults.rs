//! Faults injected from outside (docs/reliability.md's fault matrix): each
//! ends with a clear error or an exit event within a bound, and nothing
//! left behind. Others live beside the feature they break: a VMM killed
//! under `capsid run` (cli.rs), under a containerd task, and a shim killed
//! (containerd.rs).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsid_e2e::containerd::{BUSYBOX, Containerd};
use capsid_e2e::{artifact, require_kvm};

use crate::cli::{capsid_run, child_named, leftovers, processes_left_after};

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
