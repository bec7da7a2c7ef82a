//! Shared set-up for capsid's end-to-end tests.
//!
//! Every test starts with [`require_kvm`]: where this machine's KVM cannot boot
//! a real guest the test says so and skips — unless `CAPSID_E2E_REQUIRED=1`
//! (set by `make test`, which runs these tests through `capsid-testbed`), in
//! which case it fails. Artefacts built by the project's scripts arrive in
//! environment variables and are checked by [`artifact`].

pub mod agent;
pub mod bench;
pub mod containerd;
pub mod vmm;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use capsid_testbed::initramfs::Initramfs;
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

/// How many times a test boots one guest whose kernel crashed before it
/// booted: twice. The nested test host's guests die now and then at boot,
/// QEMU's as often as ours (docs/reliability.md, `make deaths`); a second
/// crash fails the test.
pub const BOOTS_PER_GUEST: usize = 2;

/// What each boot again prints first, on a line of its own; the test
/// command counts these lines.
pub const BOOT_RETRY_TAG: &str = "E2E-BOOT-RETRY";

/// Says, loudly, that `what`'s guest crashed before it booted and is booted
/// again, with what its VMM left (`why`).
pub fn announce_boot_retry(what: &str, why: &str) {
    eprintln!(
        "{BOOT_RETRY_TAG} {what}: the guest crashed before it booted; booting it again \
         (docs/reliability.md). What the crashed one left:\n{why}"
    );
}

/// A file the test needs, named by an environment variable set by `make test`.
pub fn artifact(variable: &str) -> PathBuf {
    let path = std::env::var_os(variable).unwrap_or_else(|| {
        panic!("{variable} is not set: run the tests with `make test`, which builds it")
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{variable}={} does not exist; rebuild with `make test`",
        path.display()
    );
    path
}

/// Writes an initramfs whose `/init` is `init` (a static program).
pub fn initramfs_with_init(init: &Path, out: &Path) -> PathBuf {
    let mut archive = Initramfs::create(out).expect("create initramfs");
    archive.file("/init", init).expect("add /init");
    archive
        .char_device("/dev/console", 5, 1, 0o600)
        .expect("add /dev/console");
    archive.dir("/proc").expect("add /proc");
    archive.finish().expect("write initramfs");
    out.to_owned()
}

/// The QEMU processes that are children of this process.
pub fn qemu_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may contain spaces, so split after ')'.
            let Some((comm, rest)) = stat.split_once(") ") else {
                return false;
            };
            comm.contains("qemu") && rest.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

/// PSS of a process in KiB, from smaps_rollup.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Rss and Pss (KiB) of `pid`, leaving out mappings of at least `guest_kib`
/// (guest RAM is the only mapping that big).
pub fn memory_outside_guest(pid: u32, guest_kib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut pss, mut skip) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let kib: u64 = value.parse().unwrap_or(0);
        match key {
            "Size:" => skip = kib >= guest_kib,
            "Rss:" if !skip => rss += kib,
            "Pss:" if !skip => pss += kib,
            _ => {}
        }
    }
    (rss, pss)
}

/// Runs `command` on a new pty as its controlling terminal (`ctr -t` and
/// `capsid run -t` need one); what it printed and its exit code. `args`
/// name it in a failure.
pub fn on_a_pty(command: &mut Command, args: &[&str]) -> (String, Option<i32>) {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two fds; the name, termios and size are optional.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
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
