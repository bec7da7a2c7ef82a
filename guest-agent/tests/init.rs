//! `capsid-init`, the agent binary executed again for each container
//! process (see `capsid_agent::process`), driven here the way the agent
//! drives it: its stdio on 0-2, the status socket on 3, the start pipe on
//! 4, the plan's memfd on 5. No VM: the plan joins no namespace and sets
//! up no root.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use capsid_agent::process::{ChildPlan, INIT_NAME, ProcessPlan};

/// Whether this test can take the identity steps (setgroups, caps) of a
/// container process: they need root.
fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CAPSID_E2E_REQUIRED").as_deref() != Ok("1"),
        "{test}: needs root (CAPSID_E2E_REQUIRED=1)"
    );
    eprintln!("SKIPPED {test}: needs root");
    false
}

fn memfd(bytes: &[u8]) -> File {
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"plan".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor that we own.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(bytes).unwrap();
    file.rewind().unwrap();
    file
}

struct Init {
    child: std::process::Child,
    status: UnixStream,
    start: Option<File>,
}

/// Starts `capsid-init` with `plan`; its stdout is piped.
fn start(plan: &ChildPlan) -> Init {
    let plan = memfd(&serde_json::to_vec(plan).unwrap());
    let (status, child_status) = UnixStream::pair().unwrap();
    status
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two ends.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both ends are new and ours.
    let (start_read, start_write) =
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let handed = [
        child_status.as_raw_fd(),
        start_read.as_raw_fd(),
        plan.as_raw_fd(),
    ];
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsid-agent"));
    command
        .arg0(INIT_NAME)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: fcntl and dup2 are async-signal-safe; the copies at 3, 4, 5
    // are inherited (dup2 clears close-on-exec).
    unsafe {
        command.pre_exec(move || {
            // Out of the way first: one of them may sit at 3, 4 or 5.
            let mut high = [-1; 3];
            for (slot, fd) in high.iter_mut().zip(handed) {
                *slot = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (target, fd) in (3..).zip(high) {
                if libc::dup2(fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("run capsid-agent as capsid-init");
    Init {
        child,
        status,
        start: Some(start_write),
    }
}

fn plan(args: &str, cgroup_procs: &std::path::Path) -> ChildPlan {
    let process = serde_json::from_str(&format!(
        r#"{{"args": {args}, "cwd": "/", "user": {{"uid": 0, "gid": 0}}}}"#
    ))
    .unwrap();
    ChildPlan {
        process: ProcessPlan::from_oci(&process, None).unwrap(),
        // No new namespace: unshare(0).
        unshare: Some(0),
        join: None,
        rootfs: None,
        cgroup_procs: cgroup_procs.to_owned(),
    }
}

fn read_all(stream: &mut UnixStream) -> String {
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn capsid_init_reports_ready_waits_for_start_and_runs_the_program() {
    if !root("capsid_init_reports_ready_waits_for_start_and_runs_the_program") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A plain file stands for the cgroup's cgroup.procs.
    let procs = dir.path().join("cgroup.procs");
    std::fs::write(&procs, "").unwrap();
    let mut init = start(&plan(r#"["echo", "hi", "\u00e9"]"#, &procs));
    let mut ready = [0u8];
    init.status.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"R");
    // Ready, and it waits: nothing printed yet.
    std::thread::sleep(Duration::from_millis(200));
    assert!(init.child.try_wait().unwrap().is_none());
    init.start.take().unwrap().write_all(b"S").unwrap();
    // The status socket closes on exec, with nothing said.
    assert_eq!(read_all(&mut init.status), "");
    let output = init.child.wait_with_output().unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi \u{e9}\n");
    // It joined the "cgroup".
    assert_eq!(std::fs::read_to_string(&procs).unwrap(), "0");
}

#[test]
fn capsid_init_says_why_it_failed_and_a_closed_start_pipe_ends_it() {
    if !root("capsid_init_says_why_it_failed_and_a_closed_start_pipe_ends_it") {
        return;
    }
    let mut init = start(&plan(
        r#"["true"]"#,
        std::path::Path::new("/nonexistent/cgroup.procs"),
    ));
    let said = read_all(&mut init.status);
    assert!(
        said.starts_with("Ejoin cgroup /nonexistent/cgroup.procs"),
        "{said:?}"
    );
    assert_eq!(init.child.wait().unwrap().code(), Some(127));

    // The agent drops a created process (its container removed): the
    // start pipe closes, and it ends without running anything.
    let dir = tempfile::tempdir().unwrap();
    let procs = dir.path().join("cgroup.procs");
    std::fs::write(&procs, "").unwrap();
    let mut init = start(&plan(r#"["echo", "ran"]"#, &procs));
    let mut ready = [0u8];
    init.status.read_exact(&mut ready).unwrap();
    drop(init.start.take());
    let output = init.child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout.is_empty());
}
