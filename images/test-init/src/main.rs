//! PID 1 of the boot-test initramfs.
//!
//! It proves a guest kernel reached user space: it mounts `/proc`, prints one
//! marker line with what it sees (uptime, kernel release, CPUs, memory) on the
//! console, and reboots the VM, which with `-no-reboot` (QEMU) or our VMM ends
//! the VMM with status 0. Linked statically (`-C target-feature=+crt-static`)
//! so the initramfs needs nothing else.

use std::ffi::CStr;
use std::fs;
use std::io::{self, Write};

/// The line end-to-end tests wait for.
const MARKER: &str = "COCOON-TEST-INIT: ready";

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("cocoon-test-init: must run as PID 1 of a guest");
        std::process::exit(2);
    }
    let report = match mount("proc", c"/proc", c"proc") {
        Ok(()) => describe_guest(),
        Err(e) => format!("error=mount-proc:{e}"),
    };
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{MARKER} {report}");
    let _ = stdout.flush();
    drop(stdout);
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; as PID 1 we own the machine.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reached if the reboot failed; PID 1 must not exit.
    eprintln!(
        "cocoon-test-init: reboot failed: {}",
        io::Error::last_os_error()
    );
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn mount(source: &str, target: &CStr, fstype: &CStr) -> io::Result<()> {
    let _ = fs::create_dir_all(target.to_string_lossy().as_ref());
    let source = std::ffi::CString::new(source).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; data is null, which mount(2) accepts for proc.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn describe_guest() -> String {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let uptime = read("/proc/uptime");
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    let release = read("/proc/sys/kernel/osrelease");
    let cpus = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "uptime={uptime}s kernel={} cpus={cpus} mem_mib={}",
        release.trim(),
        mem_kib / 1024
    )
}
