//! Shared set-up for capsid's end-to-end tests.
//!
//! Every test starts with [`require_kvm`]: where this machine's KVM cannot boot
//! a real guest the test says so and skips — unless `CAPSID_E2E_REQUIRED=1`
//! (set by `make test`, which runs these tests through `capsid-testbed`), in
//! which case it fails. What the tests boot and drive (the artefacts, a
//! guest's agent, capsid-vmm, a private containerd) is the test bed's
//! (`capsid_testbed`), which the benchmark uses too.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use capsid_testbed::containerd;

pub mod cri;
use capsid_testbed::probe::{Mode, Probe, probe};

/// Whether real guests can boot here; prints the reason once per process.
pub fn require_kvm(test: &str) -> bool {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let probe = probe();
        eprintln!("capsid-e2e: {probe}");
        probe
    });
    if probe.mode == Mode::Native {
        return true;
    }
    assert!(
        std::env::var("CAPSID_E2E_REQUIRED").as_deref() != Ok("1"),
        "{test}: needs a KVM that boots Linux guests, but this is {probe}"
    );
    eprintln!(
        "SKIPPED {test}: this machine cannot boot a Linux guest ({probe}); \
         `make test` runs it inside the nested test host"
    );
    false
}

/// Runs `command` on a new pty as its controlling terminal (`ctr -t` and
/// `capsid run -t` need one); what it printed and its exit code. `args`
/// name it in a failure.
pub fn on_a_pty(command: &mut Command, args: &[&str]) -> (String, Option<i32>) {
    let (mut master, mut slave) = (0, 0);
    // A terminal's size, as a person's has: the command's tty is resized.
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty fills two fds; the name and termios are optional and
    // `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    command
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl(TIOCSCTTY) are async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, || {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let child = command.spawn().expect("run the command");
    // The parent's copies of the slave must go, or the reader never ends.
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let reader = std::thread::spawn(move || {
        let mut file = std::fs::File::from(master);
        let mut bytes = Vec::new();
        let mut buffer = [0; 4096];
        // EIO once the last slave fd closes.
        while let Ok(n) = file.read(&mut buffer) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buffer[..n]);
        }
        bytes
    });
    let output = containerd::wait_bounded(child, args);
    let printed = reader.join().unwrap();
    (
        String::from_utf8_lossy(&printed).into_owned(),
        output.status.code(),
    )
}
