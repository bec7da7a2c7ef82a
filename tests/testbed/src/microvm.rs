//! Boots a kernel and initramfs under QEMU's `microvm` machine on this
//! machine's KVM and waits for a marker line on the serial console.
//!
//! This is the peer our own VMM is measured against, and, before our VMM
//! existed, the way to prove the guest kernel and the harness.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use std::{fs, io, thread};

use crate::child::ChildGuard;
use crate::qemu::DirectBoot;
use crate::serial::SerialLog;

/// Why a QEMU `microvm` boot failed.
#[derive(Debug, thiserror::Error)]
pub enum MicrovmError {
    /// QEMU could not be started.
    #[error("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86)")]
    Spawn(#[source] io::Error),
    /// The console or the process could not be read.
    #[error("i/o error while watching the guest")]
    Io(#[source] io::Error),
    /// The guest never printed its boot marker.
    #[error("the guest did not print {marker:?} within {timeout:?}; console:\n{console}")]
    NoMarker {
        /// The line that was awaited.
        marker: String,
        /// How long it was awaited.
        timeout: Duration,
        /// Everything the guest printed.
        console: String,
    },
    /// QEMU exited before the marker appeared.
    #[error("QEMU exited ({status}) before the guest printed {marker:?}; console:\n{console}")]
    ExitedEarly {
        /// The line that was awaited.
        marker: String,
        /// QEMU's exit status.
        status: String,
        /// Everything the guest printed.
        console: String,
    },
    /// The guest booted but never shut down.
    #[error("the guest printed its marker but did not shut down within {0:?}")]
    NoShutdown(Duration),
}

/// A guest to boot.
#[derive(Debug, Clone)]
pub struct MicrovmBoot {
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest's initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, in MiB.
    pub memory_mib: u32,
    /// The line the guest prints when it has booted.
    pub marker: String,
    /// Limit for reaching the marker, and again for shutting down after it.
    pub timeout: Duration,
}

/// What one boot showed.
#[derive(Debug)]
pub struct BootReport {
    /// The whole console line that contained the marker.
    pub marker_line: String,
    /// From QEMU's spawn to the marker appearing on the console.
    pub to_marker: Duration,
    /// From QEMU's spawn to its exit.
    pub to_exit: Duration,
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// Everything the guest printed.
    pub console: String,
}

impl MicrovmBoot {
    /// Boots once; `scratch` holds the console log. QEMU never outlives this.
    pub fn boot(&self, scratch: &Path) -> Result<BootReport, MicrovmError> {
        let console_path = scratch.join("microvm-console.log");
        let _ = fs::remove_file(&console_path);
        let mut qemu = DirectBoot {
            machine: &["-M", "microvm,rtc=off", "-accel", "kvm", "-cpu", "host"],
            cpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: &self.kernel,
            initrd: &self.initrd,
            cmdline: &self.cmdline,
            serial_logs: &[&console_path],
        }
        .command();
        qemu.stderr(Stdio::piped());
        let start = Instant::now();
        let mut qemu = ChildGuard::spawn(&mut qemu).map_err(MicrovmError::Spawn)?;
        let mut console = SerialLog::new(&console_path);
        let (marker_line, to_marker) = loop {
            console.poll().map_err(MicrovmError::Io)?;
            if let Some(line) = console.line_with(&self.marker) {
                break (line, start.elapsed());
            }
            if let Some(status) = qemu.try_wait().map_err(MicrovmError::Io)? {
                console.poll().map_err(MicrovmError::Io)?;
                return Err(MicrovmError::ExitedEarly {
                    marker: self.marker.clone(),
                    status: status.to_string(),
                    console: console.text(),
                });
            }
            if start.elapsed() > self.timeout {
                return Err(MicrovmError::NoMarker {
                    marker: self.marker.clone(),
                    timeout: self.timeout,
                    console: console.text(),
                });
            }
            thread::sleep(Duration::from_millis(2));
        };
        let status = qemu
            .wait_timeout(self.timeout)
            .map_err(MicrovmError::Io)?
            .ok_or(MicrovmError::NoShutdown(self.timeout))?;
        let to_exit = start.elapsed();
        console.poll().map_err(MicrovmError::Io)?;
        Ok(BootReport {
            marker_line,
            to_marker,
            to_exit,
            status,
            console: console.text(),
        })
    }
}
