//! Running `capsid-vmm` from a test: console and log to files in a scratch
//! directory, waiting for console lines, and an exit within a bound.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::child::ChildGuard;
use crate::serial::SerialLog;

use capsid_vmm_api::EXIT_GUEST_CRASH;

/// A running `capsid-vmm`.
#[derive(Debug)]
pub struct VmmRun {
    child: ChildGuard,
    console: SerialLog,
    console_path: PathBuf,
    log_path: PathBuf,
    started: Instant,
    /// Whether it was stopped because its guest never printed what a test
    /// waited for.
    stopped_hung: bool,
}

/// What every console line of the test init begins with.
const TEST_INIT_PREFIX: &str = "CAPSID-TEST-INIT";

impl VmmRun {
    /// Starts `vmm` with `args`; the serial console goes to
    /// `<scratch>/<name>.console`, the VMM's log (level info) to `<name>.log`.
    pub fn start(vmm: &Path, args: &[OsString], scratch: &Path, name: &str) -> Self {
        Self::start_passing(vmm, args, scratch, name, &[])
    }

    /// [`Self::start`], the VMM inheriting each descriptor `(ours, as)` of
    /// `pass` as its number `as` (a tap for `--net fd=N`). Ours stay
    /// close-on-exec: no other child of the test gets them.
    pub fn start_passing(
        vmm: &Path,
        args: &[OsString],
        scratch: &Path,
        name: &str,
        pass: &[(RawFd, RawFd)],
    ) -> Self {
        let console_path = scratch.join(format!("{name}.console"));
        let log_path = scratch.join(format!("{name}.log"));
        // The VMM appends to its console file: start from an empty one.
        let _ = std::fs::remove_file(&console_path);
        let log = File::create(&log_path).expect("create VMM log");
        let mut serial = OsString::from("file:");
        serial.push(&console_path);
        let mut command = Command::new(vmm);
        command
            .args(args)
            .arg("--serial")
            .arg(serial)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let pass = pass.to_vec();
        // SAFETY: the closure runs between fork and exec and calls only
        // dup2(2) and fcntl(2), which are async-signal-safe, on descriptors
        // the caller keeps open.
        unsafe {
            command.pre_exec(move || {
                for &(ours, theirs) in &pass {
                    let rc = if ours == theirs {
                        libc::fcntl(ours, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(ours, theirs)
                    };
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let child = ChildGuard::spawn(&mut command).expect("spawn capsid-vmm");
        Self {
            child,
            console: SerialLog::new(&console_path),
            console_path,
            log_path,
            started,
            stopped_hung: false,
        }
    }

    /// Starts `vmm` as [`Self::start`] and waits for the console line with
    /// `marker`, booting once more a guest that crashed before it
    /// (capsid-vmm's exit status 3) or hung in its kernel (see
    /// [`Self::hung_in_its_kernel`] and [`crate::retry::BOOTS_PER_GUEST`]).
    /// Panics with the console and log when it never comes.
    pub fn start_booted(
        vmm: &Path,
        args: &[OsString],
        scratch: &Path,
        name: &str,
        marker: &str,
        timeout: Duration,
    ) -> (Self, String, Duration) {
        Self::start_booted_passing(vmm, args, scratch, name, marker, timeout, &[])
    }

    /// [`Self::start_booted`], passing descriptors as [`Self::start_passing`].
    pub fn start_booted_passing(
        vmm: &Path,
        args: &[OsString],
        scratch: &Path,
        name: &str,
        marker: &str,
        timeout: Duration,
        pass: &[(RawFd, RawFd)],
    ) -> (Self, String, Duration) {
        let mut boots = 0;
        loop {
            boots += 1;
            let mut run = Self::start_passing(vmm, args, scratch, name, pass);
            match run.try_wait_for_line(marker, timeout) {
                Ok((line, after)) => return (run, line, after),
                Err(why)
                    if (run.crashed() || run.hung_in_its_kernel())
                        && boots < crate::retry::BOOTS_PER_GUEST =>
                {
                    crate::retry::announce_boot_retry(name, &why);
                    // The next VMM listens where this one did.
                    if let Some(at) = args.iter().position(|a| a == "--vsock-uds")
                        && let Some(uds) = args.get(at + 1)
                    {
                        let _ = std::fs::remove_file(uds);
                    }
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// Whether the guest hung in its kernel: [`Self::try_wait_for_line`]
    /// stopped it after its timeout, and its console has no line of the
    /// test init, so only the guest's kernel had run.
    pub fn hung_in_its_kernel(&mut self) -> bool {
        self.stopped_hung && !self.console().contains(TEST_INIT_PREFIX)
    }

    /// Stops a VMM whose guest did not get where a test waited for: with
    /// SIGTERM, which makes it log where each vCPU was (a hung guest says
    /// where it hung), then with SIGKILL if it has not exited in 5 s.
    fn stop_hung(&mut self) {
        self.stopped_hung = true;
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, which is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !matches!(self.child.wait_timeout(Duration::from_secs(5)), Ok(Some(_))) {
            let _ = self.child.kill();
        }
    }

    /// Whether the VMM has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Whether the VMM exited because its guest crashed (status 3).
    pub fn crashed(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(status)) if status.code() == Some(EXIT_GUEST_CRASH))
    }

    /// When the VMM was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line containing `marker`; returns it and the time
    /// since the VMM was spawned. Panics with the console and log on timeout
    /// or if the VMM exits first.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> (String, Duration) {
        self.try_wait_for_line(marker, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Self::wait_for_line`], with the failure (and the console and log)
    /// as an error instead of a panic.
    pub fn try_wait_for_line(
        &mut self,
        marker: &str,
        timeout: Duration,
    ) -> Result<(String, Duration), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let _ = self.console.poll();
            if let Some(line) = self.console.line_with(marker) {
                return Ok((line, self.started.elapsed()));
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let _ = self.console.poll();
                if let Some(line) = self.console.line_with(marker) {
                    return Ok((line, self.started.elapsed()));
                }
                return Err(format!(
                    "capsid-vmm exited with {status} before {marker:?}\n{}",
                    self.describe()
                ));
            }
            if Instant::now() >= deadline {
                self.stop_hung();
                return Err(format!(
                    "no {marker:?} within {timeout:?}; stopped it\n{}",
                    self.describe()
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the VMM to exit; panics (and kills it) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self
            .child
            .wait_timeout(timeout)
            .expect("wait for capsid-vmm")
        {
            Some(status) => {
                let _ = self.console.poll();
                status
            }
            None => {
                let _ = self.child.kill();
                panic!(
                    "capsid-vmm still running after {timeout:?}\n{}",
                    self.describe()
                );
            }
        }
    }

    /// Everything the guest printed so far.
    pub fn console(&mut self) -> String {
        let _ = self.console.poll();
        self.console.text()
    }

    /// The VMM's own log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The whole console and log as they are on disk now (no `&mut`).
    pub fn snapshot(&self) -> String {
        let console = std::fs::read_to_string(&self.console_path).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- console (tail) ---\n{}\n--- capsid-vmm log ---\n{}",
            tail.join("\n"),
            self.log()
        )
    }

    /// Console tail and log, for failure messages.
    pub fn describe(&mut self) -> String {
        let _ = self.console.poll();
        format!(
            "--- console (tail) ---\n{}\n--- capsid-vmm log ---\n{}",
            self.console.tail(30),
            self.log()
        )
    }
}

/// Boot-time figures the VMM logged, in microseconds since its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmmTimes {
    /// Ready to run vCPUs.
    pub ready_us: Option<u64>,
    /// The guest wrote the boot marker (wall and VMM CPU time).
    pub marker_us: Option<u64>,
    /// The VMM's CPU time when the guest wrote the boot marker.
    pub marker_cpu_us: Option<u64>,
}

/// Reads the `ready_us=` and `wall_us=`/`cpu_us=` fields from a VMM log.
pub fn parse_times(log: &str) -> VmmTimes {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.parse().ok())
    };
    let mut times = VmmTimes::default();
    for line in log.lines() {
        if line.contains("vCPUs running") {
            times.ready_us = field(line, "ready_us=");
        }
        if line.contains("guest boot marker") {
            times.marker_us = field(line, "wall_us=");
            times.marker_cpu_us = field(line, "cpu_us=");
        }
    }
    times
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_from_the_log() {
        let log = "2026 INFO vCPUs running ready_us=388223 cpu_us=406722\n\
                   2026 INFO guest boot marker wall_us=1200000 cpu_us=500000\n";
        assert_eq!(
            parse_times(log),
            VmmTimes {
                ready_us: Some(388_223),
                marker_us: Some(1_200_000),
                marker_cpu_us: Some(500_000)
            }
        );
    }
}
