//! The `capsid-testbed` binary in nested mode: a command's output and exit code
//! come back from the test host, and an interrupted run leaves no QEMU and no
//! file behind.
//!
//! Needs Debian's cloud kernel (`CAPSID_TESTHOST_KERNEL_DIR`, set by `make test`);
//! skips with a reason without it unless `CAPSID_E2E_REQUIRED=1`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;
use std::{fs, thread};

use capsid_testbed::ScratchDir;

fn host_kernel_dir(test: &str) -> Option<String> {
    match std::env::var("CAPSID_TESTHOST_KERNEL_DIR") {
        Ok(dir) => Some(dir),
        Err(_) => {
            assert!(
                std::env::var("CAPSID_E2E_REQUIRED").as_deref() != Ok("1"),
                "{test}: CAPSID_TESTHOST_KERNEL_DIR is not set"
            );
            eprintln!(
                "SKIPPED {test}: CAPSID_TESTHOST_KERNEL_DIR is not set (`make test` sets it)"
            );
            None
        }
    }
}

fn testbed(kernel_dir: &str, tmp: &Path, script: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsid-testbed"));
    command
        .env("CAPSID_TESTBED_MODE", "nested")
        .env("TMPDIR", tmp)
        .args([
            "run",
            "--host-kernel",
            kernel_dir,
            "--memory-mib",
            "1024",
            "--",
        ])
        .args(["/bin/sh", "-c", script]);
    command
}

fn leftovers(tmp: &Path) -> Vec<String> {
    fs::read_dir(tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn processes_mentioning(needle: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn output_and_exit_code_come_back_from_the_test_host() {
    let Some(kernel) = host_kernel_dir("output_and_exit_code_come_back_from_the_test_host") else {
        return;
    };
    let tmp = ScratchDir::new("capsid-testbed-it").unwrap();
    let output = testbed(
        &kernel,
        tmp.path(),
        "echo inside $(cat /proc/sys/kernel/osrelease); test -c /dev/kvm && exit 7",
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(7),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("inside 6.1"), "stdout:\n{stdout}");
    assert!(stderr.contains("nested mode"), "stderr:\n{stderr}");
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn ctrl_c_stops_the_test_host_and_removes_its_files() {
    let Some(kernel) = host_kernel_dir("ctrl_c_stops_the_test_host_and_removes_its_files") else {
        return;
    };
    let tmp = ScratchDir::new("capsid-testbed-it").unwrap();
    let mut child = testbed(&kernel, tmp.path(), "echo started; sleep 600")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("started") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        panic!("the command never started inside the test host");
    }
    let scratch_prefix = format!("capsid-testbed.{}.", child.id());
    assert!(
        !processes_mentioning(&scratch_prefix).is_empty(),
        "QEMU should be running now"
    );
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's PID, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(processes_mentioning(&scratch_prefix), Vec::<String>::new());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}
