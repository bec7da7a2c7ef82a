//! gVisor as a second peer: the sandbox people pick when they want more
//! isolation than runc without a VM. Debian's `runsc` (its ptrace
//! platform, the default) runs the same bundles as runc, both directly
//! (`run`) and behind containerd's runc shim (`ctr`, `footprint`, with
//! `--runc-binary`, as Docker runs it).
//!
//! `runsc` `pivot_root`s into a directory of its own for its sandbox and
//! gofer, which is refused where `/` is the initramfs (the nested test
//! host; runc there takes `--no-pivot`, which runsc has not). There the
//! benchmark starts runsc through `capsid-bench in-moved-root`: a mount
//! namespace of its own whose root is a bind mount of `/`, moved over `/`
//! and entered with `chroot`, as `switch_root` does, so runsc's root has a
//! parent and its own `pivot_root` works. The extra exec costs gVisor a few
//! milliseconds in nested mode only.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Bench;

/// Who starts the sandboxes of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runtime {
    Capsid,
    Runc,
    Gvisor,
}

impl Runtime {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Capsid => "capsid",
            Self::Runc => "runc",
            Self::Gvisor => "gVisor",
        }
    }
}

/// The runsc on `PATH`, if there is one.
pub(crate) fn find_runsc() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("runsc"))
        .find(|p| p.is_file())
}

impl Bench {
    /// Ours and the peers a start-up scenario measures: runc, and gVisor
    /// when `runsc` is installed.
    pub(crate) fn runtimes(&self) -> Vec<Runtime> {
        let mut all = vec![Runtime::Capsid, Runtime::Runc];
        if self.runsc.is_some() {
            all.push(Runtime::Gvisor);
        }
        all
    }

    /// `rounds` measured rounds after one warm-up, each running `turn(who,
    /// counted)` once for every runtime of `among`, the order rotating from
    /// round to round (for two: A B, B A, …).
    pub(crate) fn rounds_among(
        &self,
        among: &[Runtime],
        rounds: usize,
        what: &str,
        mut turn: impl FnMut(Runtime, bool),
    ) {
        for i in 0..=rounds {
            for k in 0..among.len() {
                turn(among[(i + k) % among.len()], i > 0);
            }
            self.progress.step(what);
        }
    }

    /// `command` in a fresh sandbox of `runtime`.
    pub(crate) fn sandbox_of(&self, runtime: Runtime, command: &[&str]) -> Command {
        match runtime {
            Runtime::Capsid => self.capsid_run(command),
            Runtime::Runc => self.runc_run(command),
            Runtime::Gvisor => self.runsc_run(command),
        }
    }

    /// `runsc run` of a bundle over the same rootfs (read-only), without a
    /// network (`capsid run` has no NIC unless asked), its state in the
    /// scratch directory.
    fn runsc_run(&self, command: &[&str]) -> Command {
        let (bundle, id) = self.bundle("runsc", command, None);
        let mut cmd = self.runsc_command();
        cmd.arg("--root")
            .arg(self.scratch.join("runsc-state"))
            .args(["--network=none", "run", "--bundle"])
            .arg(bundle)
            .arg(id);
        cmd
    }

    /// runsc, or, where `/` is an initramfs, runsc in a moved root.
    fn runsc_command(&self) -> Command {
        let runsc = self.runsc.as_deref().expect("runsc is installed");
        if !self.no_pivot {
            return Command::new(runsc);
        }
        let mut cmd = Command::new(std::env::current_exe().expect("the benchmark's own path"));
        cmd.arg("in-moved-root")
            .arg("--at")
            .arg(self.moved_root_dir())
            .arg(runsc);
        cmd
    }

    fn moved_root_dir(&self) -> PathBuf {
        let dir = self.scratch.join("moved-root");
        std::fs::create_dir_all(&dir).expect("a directory for the moved root");
        dir
    }

    /// The `--runc-binary` for containerd's runc shim to run gVisor: runsc
    /// itself, or a script that starts it in a moved root.
    pub(crate) fn runsc_for_shim(&self) -> PathBuf {
        let runsc = self.runsc.clone().expect("runsc is installed");
        if !self.no_pivot {
            return runsc;
        }
        self.runsc_wrapper
            .get_or_init(|| {
                let path = self.scratch.join("runsc-in-moved-root");
                let script = format!(
                    "#!/bin/sh\nexec '{}' in-moved-root --at '{}' '{}' \"$@\"\n",
                    std::env::current_exe()
                        .expect("the benchmark's own path")
                        .display(),
                    self.moved_root_dir().display(),
                    runsc.display()
                );
                std::fs::write(&path, script).expect("write the runsc wrapper");
                let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
                std::fs::set_permissions(&path, mode).expect("make the runsc wrapper executable");
                path
            })
            .clone()
    }
}

fn c_path(path: &OsStr) -> CString {
    CString::new(path.as_bytes()).unwrap_or_else(|_| panic!("{path:?} has a NUL byte"))
}

fn check(what: &str, rc: libc::c_int) {
    if rc != 0 {
        eprintln!(
            "capsid-bench in-moved-root: {what}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(125);
    }
}

/// `capsid-bench in-moved-root --at DIR PROGRAM ARGS…`: runs PROGRAM in a
/// mount namespace of its own, whose root is `/` bound at DIR and moved
/// over `/`; the working directory is kept (paths are the same there).
/// Runs in its own single-threaded process, before anything else.
pub(crate) fn in_moved_root(at: &Path, program: &Path, args: &[OsString]) -> ! {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let at_c = c_path(at.as_os_str());
    let root = c_path(OsStr::new("/"));
    let here = c_path(OsStr::new("."));
    // SAFETY: unshare takes flags only.
    check("unshare(CLONE_NEWNS)", unsafe {
        libc::unshare(libc::CLONE_NEWNS)
    });
    // SAFETY: the strings are NUL-terminated and live across the call; a
    // null source, type and data are allowed for a propagation change.
    check("making / private", unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    });
    // SAFETY: as above; a bind mount needs no type or data.
    check("binding / at the new root", unsafe {
        libc::mount(
            root.as_ptr(),
            at_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    });
    // SAFETY: the path is NUL-terminated and lives across the call.
    check("entering the new root", unsafe {
        libc::chdir(at_c.as_ptr())
    });
    // SAFETY: as for the mounts above; a move needs no type or data.
    check("moving the new root over /", unsafe {
        libc::mount(
            here.as_ptr(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    });
    // SAFETY: the path is NUL-terminated and lives across the call.
    check("chroot", unsafe { libc::chroot(here.as_ptr()) });
    let _ = std::env::set_current_dir(&cwd);
    let e = Command::new(program).args(args).exec();
    eprintln!(
        "capsid-bench in-moved-root: cannot run {}: {e}",
        program.display()
    );
    std::process::exit(127)
}
