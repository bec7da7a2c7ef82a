//! The QEMU command line shared by the nested test host and the `microvm`
//! peer: a kernel and initramfs booted directly, no default devices, no
//! display, and `-no-reboot`, so a guest reboot ends QEMU with status 0.

use std::path::Path;
use std::process::{Command, Stdio};

/// What to boot and how big the machine is.
#[derive(Debug)]
pub struct DirectBoot<'a> {
    /// Machine, accelerator and CPU model arguments.
    pub machine: &'a [&'a str],
    /// vCPUs.
    pub cpus: u32,
    /// Memory, in MiB.
    pub memory_mib: u32,
    /// The kernel.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// One file per serial port, in port order (ttyS0, ttyS1, ...).
    pub serial_logs: &'a [&'a Path],
}

impl DirectBoot<'_> {
    /// The command; standard input and output are detached from ours.
    pub fn command(&self) -> Command {
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(self.machine)
            .arg("-smp")
            .arg(self.cpus.to_string())
            .arg("-m")
            .arg(self.memory_mib.to_string())
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .arg("-append")
            .arg(self.cmdline);
        for log in self.serial_logs {
            qemu.arg("-serial").arg(format!("file:{}", log.display()));
        }
        qemu.stdin(Stdio::null()).stdout(Stdio::null());
        qemu
    }
}
