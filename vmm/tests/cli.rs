//! The `capsid-vmm` command line: bad input gets a clear error and the
//! documented exit status, and leaves nothing behind. None of these boot a
//! guest.

use std::path::Path;
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsid-vmm"))
        .args(args)
        .output()
        .expect("run capsid-vmm")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_documents_the_exit_statuses() {
    let output = vmm(&["--help"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--kernel",
        "--disk",
        "--vsock-uds",
        "--config",
        "128+N",
        "crashed",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from --help:\n{text}"
        );
    }
}

#[test]
fn a_missing_kernel_is_named() {
    let output = vmm(&[]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no kernel given"),
        "{}",
        stderr(&output)
    );

    let output = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("kernel /nonexistent/vmlinux does not exist"),
        "{err}"
    );
}

#[test]
fn malformed_flags_are_usage_errors() {
    for args in [
        &["--kernel", "/k", "--disk", "/d,rx"][..],
        &["--kernel", "/k", "--serial", "tty"],
        &["--kernel", "/k", "--vcpus", "many"],
        &["--kernel", "/k", "--frobnicate"],
    ] {
        let output = vmm(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let err = stderr(&vmm(&["--kernel", "/k", "--disk", "/d,rx"]));
    assert!(err.contains("PATH[,ro][,id=ID]"), "{err}");
}

#[test]
fn out_of_range_values_say_what_is_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let k = path(&kernel);
    for (args, needle) in [
        (vec!["--vcpus", "0"], "vcpus = 0: give 1 to 32"),
        (vec!["--vcpus", "33"], "vcpus = 33"),
        (vec!["--mem-mib", "4"], "mem_mib = 4"),
        (
            vec!["--disk", "/nonexistent.img"],
            "disk /nonexistent.img does not exist",
        ),
        (
            vec!["--vsock-uds", "/nonexistent-dir/v.sock"],
            "directory /nonexistent-dir does not exist",
        ),
    ] {
        let mut all = vec!["--kernel", k];
        all.extend(args);
        let output = vmm(&all);
        assert_eq!(output.status.code(), Some(1), "{all:?}");
        assert!(
            stderr(&output).contains(needle),
            "{all:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn an_existing_vsock_path_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"x").unwrap();
    let uds = dir.path().join("v.sock");
    std::fs::write(&uds, b"someone else's").unwrap();
    let output = vmm(&["--kernel", path(&kernel), "--vsock-uds", path(&uds)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("already exists"),
        "{}",
        stderr(&output)
    );
    assert_eq!(std::fs::read(&uds).unwrap(), b"someone else's");
}

#[test]
fn a_config_file_is_checked_like_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(&config, r#"{"kernel": "/k", "ram": 5}"#).unwrap();
    let output = vmm(&["--config", path(&config)]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("vm.json is not valid") && err.contains("ram"),
        "{err}"
    );

    // Flags override the file.
    std::fs::write(&config, r#"{"kernel": "/from-file", "vcpus": 2}"#).unwrap();
    let output = vmm(&["--config", path(&config), "--kernel", "/from-flag"]);
    assert!(
        stderr(&output).contains("/from-flag"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_file_that_is_no_kernel_fails_and_leaves_no_socket() {
    if !capsid_vmm::probe::kvm_for_test("a_file_that_is_no_kernel_fails_and_leaves_no_socket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, vec![0u8; 8192]).unwrap();
    let uds = dir.path().join("v.sock");
    let output = vmm(&[
        "--kernel",
        path(&kernel),
        "--vsock-uds",
        path(&uds),
        "--mem-mib",
        "32",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let err = stderr(&output);
    assert!(
        err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
    assert!(
        !uds.exists(),
        "the vsock socket made before the failure is removed"
    );
}

#[test]
fn probe_reports_the_host_as_json_and_takes_no_vm_flags() {
    // The verdict is forced, so this does not need (or time) a KVM.
    let output = Command::new(env!("CARGO_BIN_EXE_capsid-vmm"))
        .arg("--probe")
        .env("CAPSID_TESTBED_MODE", "nested")
        .output()
        .expect("run capsid-vmm");
    assert!(output.status.success(), "{}", stderr(&output));
    let report: capsid_vmm_api::host::HostReport =
        serde_json::from_slice(&output.stdout).expect("a host report");
    assert_eq!(report.kvm.mode, capsid_vmm_api::host::Mode::Nested);
    let threads: Vec<&str> = report.seccomp.iter().map(|l| l.thread.as_str()).collect();
    assert_eq!(threads, ["main", "vcpu", "worker", "api", "keeper"]);
    assert!(report.seccomp.iter().all(|l| l.syscalls > 0));

    let output = vmm(&["--probe", "--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("cannot be used with"),
        "{}",
        stderr(&output)
    );
}
