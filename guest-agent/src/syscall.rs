//! The seam between container setup and the kernel (youki's `Syscall`):
//! every privileged call the set-up of a container process makes — its
//! root (mounts, pivot_root, devices), its namespaces (unshare, setns) and
//! its identity (rlimits, groups, ids, capabilities, no_new_privs,
//! seccomp). [`LinuxSyscall`] makes them; the recording implementation in
//! tests writes them down, so the set-up, and the order of its steps, is
//! tested without root.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability};

use crate::seccomp::SeccompProgram;

/// What is at a path (not following a final symlink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    Dir,
    File,
    Symlink,
}

pub trait Syscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn umount(&self, target: &Path, flags: libc::c_int) -> io::Result<()>;
    /// Makes `new_root` the root of this mount namespace and detaches the
    /// old root (`pivot_root(".", ".")`, as runc does).
    fn pivot_root(&self, new_root: &Path) -> io::Result<()>;
    fn mkdir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates an empty file (a bind-mount target) if nothing is there.
    fn create_file(&self, path: &Path) -> io::Result<()>;
    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()>;
    fn sethostname(&self, name: &str) -> io::Result<()>;
    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()>;
    /// Creates a device node; `kind` is `libc::S_IFCHR` or `S_IFBLK`.
    fn mknod(&self, path: &Path, kind: u32, mode: u32, major: u32, minor: u32) -> io::Result<()>;
    fn kind(&self, path: &Path) -> io::Result<PathKind>;
    fn read_link(&self, path: &Path) -> io::Result<PathBuf>;
    /// A new session, led by this process.
    fn setsid(&self) -> io::Result<()>;
    /// New namespaces (`CLONE_NEW*` flags) for this process.
    fn unshare(&self, flags: libc::c_int) -> io::Result<()>;
    /// Joins the namespaces `flags` of the process a pidfd names.
    fn setns(&self, pidfd: RawFd, flags: libc::c_int) -> io::Result<()>;
    fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()>;
    /// Removes `cap` from the bounding set.
    fn drop_bounding(&self, cap: Capability) -> io::Result<()>;
    /// `PR_SET_KEEPCAPS`: keep the permitted set across the change of uid.
    fn keep_caps(&self, keep: bool) -> io::Result<()>;
    fn set_groups(&self, groups: &[libc::gid_t]) -> io::Result<()>;
    /// Real, effective and saved group id.
    fn set_gid(&self, gid: libc::gid_t) -> io::Result<()>;
    /// Real, effective and saved user id.
    fn set_uid(&self, uid: libc::uid_t) -> io::Result<()>;
    fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> io::Result<()>;
    fn set_umask(&self, mask: libc::mode_t);
    fn chdir(&self, path: &Path) -> io::Result<()>;
    fn set_no_new_privs(&self) -> io::Result<()>;
    fn load_seccomp(&self, program: &SeccompProgram) -> io::Result<()>;
}

/// Drops the page cache of the block device at `path` (`BLKFLSBUF`). A
/// disk slot the host re-attaches to holds another image than before, and
/// pages cached from the old one must not be read as the new one's.
pub fn flush_block_device(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    const BLKFLSBUF: libc::c_ulong = 0x1261; // _IO(0x12, 97)
    let device = std::fs::File::open(path)?;
    // SAFETY: BLKFLSBUF takes no argument and only acts on the open block
    // device `device`, which lives until after the call.
    check(unsafe { libc::ioctl(device.as_raw_fd(), BLKFLSBUF, 0) })
}

/// The real calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSyscall;

pub fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with a NUL byte"))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Syscall for LinuxSyscall {
    fn mount(
        &self,
        source: Option<&Path>,
        target: &Path,
        fstype: Option<&str>,
        flags: libc::c_ulong,
        data: Option<&str>,
    ) -> io::Result<()> {
        let source = source.map(cstring).transpose()?;
        let target = cstring(target)?;
        let fstype = fstype
            .map(|t| CString::new(t).map_err(|_| io::ErrorKind::InvalidInput))
            .transpose()?;
        let data = data
            .map(|d| CString::new(d).map_err(|_| io::ErrorKind::InvalidInput))
            .transpose()?;
        let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        // SAFETY: every pointer is null or a NUL-terminated string that
        // outlives the call.
        check(unsafe {
            libc::mount(
                ptr(&source),
                target.as_ptr(),
                ptr(&fstype),
                flags,
                ptr(&data).cast(),
            )
        })
    }

    fn umount(&self, target: &Path, flags: libc::c_int) -> io::Result<()> {
        let target = cstring(target)?;
        // SAFETY: `target` is a NUL-terminated string.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })
    }

    fn pivot_root(&self, new_root: &Path) -> io::Result<()> {
        std::env::set_current_dir(new_root)?;
        let dot = c".";
        // SAFETY: both arguments are NUL-terminated strings.
        if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The old root is stacked under the new one; keep its unmount from
        // propagating anywhere, then detach it.
        self.mount(
            None,
            Path::new("."),
            None,
            libc::MS_SLAVE | libc::MS_REC,
            None,
        )?;
        self.umount(Path::new("."), libc::MNT_DETACH)?;
        std::env::set_current_dir("/")
    }

    fn mkdir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn create_file(&self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map(drop)
    }

    fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn sethostname(&self, name: &str) -> io::Result<()> {
        // SAFETY: the pointer and length describe `name`.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
    }

    fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
        std::fs::write(path, contents)
    }

    fn mknod(&self, path: &Path, kind: u32, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let path = cstring(path)?;
        // SAFETY: `path` is a NUL-terminated string.
        check(unsafe {
            libc::mknod(
                path.as_ptr(),
                kind | (mode & 0o7777),
                libc::makedev(major, minor),
            )
        })
    }

    fn kind(&self, path: &Path) -> io::Result<PathKind> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(PathKind::Dir),
            Ok(m) if m.file_type().is_symlink() => Ok(PathKind::Symlink),
            Ok(_) => Ok(PathKind::File),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(PathKind::Missing),
            Err(e) => Err(e),
        }
    }

    fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::read_link(path)
    }

    fn setsid(&self) -> io::Result<()> {
        // SAFETY: setsid takes no arguments.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: unshare takes flags only.
        check(unsafe { libc::unshare(flags) })
    }

    fn setns(&self, pidfd: RawFd, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: setns takes a descriptor and flags; a pidfd with
        // namespace flags is supported since Linux 5.8.
        check(unsafe { libc::setns(pidfd, flags) })
    }

    fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: `limit` is a valid rlimit.
        check(unsafe { libc::setrlimit(resource, &limit) })
    }

    fn drop_bounding(&self, cap: Capability) -> io::Result<()> {
        caps::drop(None, CapSet::Bounding, cap).map_err(io::Error::other)
    }

    fn keep_caps(&self, keep: bool) -> io::Result<()> {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) })
    }

    fn set_groups(&self, groups: &[libc::gid_t]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `groups`.
        check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })
    }

    fn set_gid(&self, gid: libc::gid_t) -> io::Result<()> {
        // SAFETY: setresgid takes ids only.
        check(unsafe { libc::setresgid(gid, gid, gid) })
    }

    fn set_uid(&self, uid: libc::uid_t) -> io::Result<()> {
        // SAFETY: setresuid takes ids only.
        check(unsafe { libc::setresuid(uid, uid, uid) })
    }

    fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> io::Result<()> {
        caps::set(None, set, caps).map_err(io::Error::other)
    }

    fn set_umask(&self, mask: libc::mode_t) {
        // SAFETY: umask takes a mode only.
        unsafe { libc::umask(mask & 0o777) };
    }

    fn chdir(&self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn set_no_new_privs(&self) -> io::Result<()> {
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }

    fn load_seccomp(&self, program: &SeccompProgram) -> io::Result<()> {
        program.load()
    }
}

#[cfg(test)]
pub mod recording {
    //! Writes calls down instead of making them. The file system it answers
    //! `kind` and `read_link` from is a real directory (no root needed).
    use super::*;
    use std::cell::RefCell;

    #[derive(Debug, Default)]
    pub struct RecordingSyscall {
        pub calls: RefCell<Vec<String>>,
        /// A mount whose target ends so fails (EIO), after it is written down.
        pub failing_mount: Option<&'static str>,
    }

    impl RecordingSyscall {
        fn note(&self, call: String) {
            self.calls.borrow_mut().push(call);
        }

        /// A recorder whose mounts onto a path ending in `target` fail.
        pub fn failing_mount(target: &'static str) -> Self {
            Self {
                failing_mount: Some(target),
                ..Self::default()
            }
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    impl Syscall for RecordingSyscall {
        fn mount(
            &self,
            source: Option<&Path>,
            target: &Path,
            fstype: Option<&str>,
            flags: libc::c_ulong,
            data: Option<&str>,
        ) -> io::Result<()> {
            self.note(format!(
                "mount {} {} {} {:#x} {}",
                source.map_or("-".into(), |s| s.display().to_string()),
                target.display(),
                fstype.unwrap_or("-"),
                flags,
                data.unwrap_or("-")
            ));
            match self.failing_mount {
                Some(end) if target.ends_with(end) => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => Ok(()),
            }
        }
        fn umount(&self, target: &Path, flags: libc::c_int) -> io::Result<()> {
            self.note(format!("umount {} {flags}", target.display()));
            Ok(())
        }
        fn pivot_root(&self, new_root: &Path) -> io::Result<()> {
            self.note(format!("pivot_root {}", new_root.display()));
            Ok(())
        }
        fn mkdir_all(&self, path: &Path) -> io::Result<()> {
            self.note(format!("mkdir {}", path.display()));
            std::fs::create_dir_all(path)
        }
        fn create_file(&self, path: &Path) -> io::Result<()> {
            self.note(format!("touch {}", path.display()));
            LinuxSyscall.create_file(path)
        }
        fn symlink(&self, target: &Path, link: &Path) -> io::Result<()> {
            self.note(format!("symlink {} {}", target.display(), link.display()));
            Ok(())
        }
        fn sethostname(&self, name: &str) -> io::Result<()> {
            self.note(format!("sethostname {name}"));
            Ok(())
        }
        fn write_file(&self, path: &Path, contents: &str) -> io::Result<()> {
            self.note(format!("write {} {contents}", path.display()));
            Ok(())
        }
        fn mknod(
            &self,
            path: &Path,
            kind: u32,
            mode: u32,
            major: u32,
            minor: u32,
        ) -> io::Result<()> {
            self.note(format!(
                "mknod {} {kind:#o} {mode:#o} {major}:{minor}",
                path.display()
            ));
            Ok(())
        }
        fn kind(&self, path: &Path) -> io::Result<PathKind> {
            LinuxSyscall.kind(path)
        }
        fn read_link(&self, path: &Path) -> io::Result<PathBuf> {
            LinuxSyscall.read_link(path)
        }
        fn setsid(&self) -> io::Result<()> {
            self.note("setsid".into());
            Ok(())
        }
        fn unshare(&self, flags: libc::c_int) -> io::Result<()> {
            self.note(format!("unshare {flags:#x}"));
            Ok(())
        }
        fn setns(&self, pidfd: RawFd, flags: libc::c_int) -> io::Result<()> {
            self.note(format!("setns {pidfd} {flags:#x}"));
            Ok(())
        }
        fn set_rlimit(&self, resource: u32, soft: u64, hard: u64) -> io::Result<()> {
            self.note(format!("setrlimit {resource} {soft} {hard}"));
            Ok(())
        }
        fn drop_bounding(&self, cap: Capability) -> io::Result<()> {
            self.note(format!("drop bounding {cap}"));
            Ok(())
        }
        fn keep_caps(&self, keep: bool) -> io::Result<()> {
            self.note(format!("keepcaps {keep}"));
            Ok(())
        }
        fn set_groups(&self, groups: &[libc::gid_t]) -> io::Result<()> {
            self.note(format!("setgroups {groups:?}"));
            Ok(())
        }
        fn set_gid(&self, gid: libc::gid_t) -> io::Result<()> {
            self.note(format!("setgid {gid}"));
            Ok(())
        }
        fn set_uid(&self, uid: libc::uid_t) -> io::Result<()> {
            self.note(format!("setuid {uid}"));
            Ok(())
        }
        fn set_caps(&self, set: CapSet, caps: &HashSet<Capability>) -> io::Result<()> {
            let mut names: Vec<String> = caps.iter().map(ToString::to_string).collect();
            names.sort();
            self.note(format!("caps {set:?} {}", names.join(",")));
            Ok(())
        }
        fn set_umask(&self, mask: libc::mode_t) {
            self.note(format!("umask {mask:#o}"));
        }
        fn chdir(&self, path: &Path) -> io::Result<()> {
            self.note(format!("chdir {}", path.display()));
            Ok(())
        }
        fn set_no_new_privs(&self) -> io::Result<()> {
            self.note("no_new_privs".into());
            Ok(())
        }
        fn load_seccomp(&self, _program: &SeccompProgram) -> io::Result<()> {
            self.note("seccomp".into());
            Ok(())
        }
    }
}
