//! What this host gives a VMM, as `capsid-vmm --probe` reports it: can
//! its KVM boot a Linux guest, and which of the VMM's walls does its
//! kernel offer. The CLI (`capsid run`, `capsid doctor`) and the test bed
//! ask the VMM binary through [`ask`] instead of linking the VMM, so the
//! answer comes from the code that will run the guests.
//!
//! ```text
//! $ capsid-vmm --probe
//! {"kvm":{"mode":"native","reason":"a KVM guest ran …"},"paravirtual_kvm":false,
//!  "landlock_abi":3,"seccomp":[{"thread":"main","syscalls":41},…]}
//! ```

use std::fmt;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where real guests can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// This machine's `/dev/kvm` runs guests on the CPU.
    Native,
    /// It does not; guests boot inside a nested test host.
    Nested,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Native => "native",
            Mode::Nested => "nested",
        })
    }
}

/// The KVM probe's verdict and the evidence for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Whether this host's KVM can boot a Linux guest.
    pub mode: Mode,
    /// Why, in words a user can act on.
    pub reason: String,
}

impl Probe {
    /// The verdict `CAPSID_TESTBED_MODE=native|nested` forces, if it is
    /// set to one of them (the VMM's probe and the test bed's honour it).
    pub fn forced() -> Option<Self> {
        let mode = match std::env::var("CAPSID_TESTBED_MODE").ok()?.as_str() {
            "native" => Mode::Native,
            "nested" => Mode::Nested,
            _ => return None,
        };
        Some(Self {
            mode,
            reason: "forced by CAPSID_TESTBED_MODE".into(),
        })
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mode: {}", self.mode, self.reason)
    }
}

/// One VMM thread's seccomp allowlist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowlist {
    /// The kind of thread ("main", "vcpu", …).
    pub thread: String,
    /// How many system calls it may make.
    pub syscalls: usize,
}

/// Everything `capsid-vmm --probe` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Can this host's KVM boot a Linux guest.
    pub kvm: Probe,
    /// Whether the `kvm_pvm` module (a paravirtual, instruction-emulating
    /// KVM) is loaded.
    pub paravirtual_kvm: bool,
    /// The kernel's Landlock ABI version; `None` without Landlock.
    pub landlock_abi: Option<i32>,
    /// The VMM's seccomp allowlists, one per kind of thread.
    pub seccomp: Vec<Allowlist>,
}

/// The longest report `ask` reads.
const MAX_REPORT: u64 = 64 * 1024;

/// Why [`ask`] got no report.
#[derive(Debug)]
pub enum AskError {
    /// The VMM binary could not be started.
    Spawn(std::io::Error),
    /// It ran past the deadline and was killed.
    Timeout(Duration),
    /// It exited unsuccessfully; what it said on stderr.
    Failed(std::process::ExitStatus, String),
    /// Its output is not a report.
    Reply(serde_json::Error),
}

impl fmt::Display for AskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn(_) => f.write_str("cannot run it"),
            Self::Timeout(limit) => {
                write!(f, "it did not answer within {limit:?} and was stopped")
            }
            Self::Failed(status, stderr) if stderr.trim().is_empty() => {
                write!(f, "it failed ({status}) and said nothing")
            }
            Self::Failed(status, stderr) => write!(f, "it failed ({status}): {}", stderr.trim()),
            Self::Reply(_) => f.write_str("its report does not parse"),
        }
    }
}

impl std::error::Error for AskError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn(e) => Some(e),
            Self::Reply(e) => Some(e),
            Self::Timeout(_) | Self::Failed(..) => None,
        }
    }
}

/// Runs `VMM --probe` and returns its report, killing it if it has not
/// answered within `timeout` (its own guest gives up after 10 s).
pub fn ask(vmm: &Path, timeout: Duration) -> Result<HostReport, AskError> {
    let mut command = Command::new(vmm);
    command
        .arg("--probe")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A caller killed while it asks takes the probe (and its tiny VM)
    // with it.
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(AskError::Spawn)?;
    // Readers on their own threads, so that a chatty child cannot block
    // on a full pipe while we wait for it; each reads a bounded amount.
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(MAX_REPORT).read_to_end(&mut text);
            }
            text
        })
    };
    let stdout = read(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().map_err(AskError::Spawn)? {
            Some(status) => break status,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(AskError::Timeout(timeout));
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if !status.success() {
        return Err(AskError::Failed(
            status,
            String::from_utf8_lossy(&stderr).into_owned(),
        ));
    }
    serde_json::from_slice(&stdout).map_err(AskError::Reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("fake-vmm");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("capsid-host-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_report_comes_from_the_vmm_binary_and_a_bad_answer_is_an_error() {
        let report = HostReport {
            kvm: Probe {
                mode: Mode::Nested,
                reason: "there is no /dev/kvm".into(),
            },
            paravirtual_kvm: false,
            landlock_abi: Some(3),
            seccomp: vec![Allowlist {
                thread: "vcpu".into(),
                syscalls: 12,
            }],
        };
        let dir = scratch("probe");
        let json = serde_json::to_string(&report).unwrap();
        let vmm = script(
            &dir,
            &format!("[ \"$1\" = --probe ] || exit 9\necho '{json}'"),
        );
        assert_eq!(ask(&vmm, Duration::from_secs(10)).unwrap(), report);

        // A VMM that fails, babbles or hangs is an error, not a verdict.
        // (One test: scripts written while another test spawns could be
        // "text file busy".)
        let vmm = script(&dir, "echo 'unknown flag --probe' >&2; exit 2");
        let e = ask(&vmm, Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("unknown flag --probe"), "{e}");

        let vmm = script(&dir, "echo not json");
        assert!(matches!(
            ask(&vmm, Duration::from_secs(10)),
            Err(AskError::Reply(_))
        ));

        let vmm = script(&dir, "exec sleep 30");
        let started = Instant::now();
        assert!(matches!(
            ask(&vmm, Duration::from_millis(300)),
            Err(AskError::Timeout(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));

        let e = ask(&dir.join("missing"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, AskError::Spawn(_)), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
