//! What PID 1 does before serving: a root that containers can pivot away
//! from, the kernel file systems, and at the end a clean reboot.

use std::fs;
use std::io;
use std::path::Path;

use crate::syscall::{LinuxSyscall, Syscall};

/// The initramfs root (rootfs) cannot be pivoted away from, and a
/// container's pivot_root needs a parent mount. So PID 1 moves itself onto
/// a tmpfs first: mount it, move it over `/`, chroot into it (what
/// switch_root does, without a second program).
pub fn move_root_to_tmpfs() -> io::Result<()> {
    let sys = LinuxSyscall;
    let new_root = Path::new("/.root");
    fs::create_dir_all(new_root)?;
    sys.mount(
        Some(Path::new("tmpfs")),
        new_root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    )?;
    std::env::set_current_dir(new_root)?;
    sys.mount(
        Some(Path::new(".")),
        Path::new("/"),
        None,
        libc::MS_MOVE,
        None,
    )?;
    let dot = c".";
    // SAFETY: chroot takes a NUL-terminated path.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::env::set_current_dir("/")
}

/// /proc, /sys, /dev (+ pts, shm), /run, /tmp and cgroup2.
pub fn mount_kernel_filesystems() -> io::Result<()> {
    let sys = LinuxSyscall;
    let common = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mounts: [(&str, &str, libc::c_ulong, Option<&str>); 8] = [
        ("/proc", "proc", common, None),
        ("/sys", "sysfs", common, None),
        ("/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755")),
        (
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        ("/dev/shm", "tmpfs", common, Some("mode=1777")),
        (
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some("mode=1777"),
        ),
        ("/sys/fs/cgroup", "cgroup2", common, None),
    ];
    for (target, fstype, flags, data) in mounts {
        let target = Path::new(target);
        sys.mkdir_all(target)?;
        sys.mount(Some(Path::new(fstype)), target, Some(fstype), flags, data)
            .map_err(|e| io::Error::new(e.kind(), format!("mount {}: {e}", target.display())))?;
    }
    Ok(())
}

/// Syncs and reboots the VM (the VMM sees the i8042 reset and exits 0).
pub fn reboot() -> ! {
    // SAFETY: sync takes no arguments.
    unsafe { libc::sync() };
    // SAFETY: reboot with a command constant; it does not return on success.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only PID 1 with CAP_SYS_BOOT gets here on failure; exiting PID 1
    // panics the kernel, which with panic=-1 also restarts the VM.
    std::process::exit(1)
}

/// Tells the VMM (port 0x3f0, value 123) that the agent is ready; the VMM
/// logs the time since its own start. Best effort.
pub fn boot_marker() {
    const PORT: u16 = 0x3f0;
    const VALUE: u8 = 123;
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(PORT), 1, 1) } != 0 {
        return;
    }
    // SAFETY: the port is ours to write (ioperm above); the VMM's boot
    // marker device is there, or nothing is and the write is dropped.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") PORT, in("al") VALUE, options(nomem, nostack));
    }
}
