//! Scratch directories of `capsid run` that outlive a killed owner.
//!
//! Each run's VM lives in `RUN_DIR/run/capsid-run-XXXX`: its sockets, the
//! VMM's log, the guest console, and the name of its cgroup. The owner
//! holds an exclusive `flock` on the directory for as long as it runs; the
//! kernel drops the lock when the owner dies, however it dies. The VMM dies
//! with its owner (`--die-with-parent`), but a `kill -9` leaves the
//! directory and the VM's cgroup: [`sweep`], called by the next `capsid
//! run` and by `capsid doctor`, removes every directory whose lock it can
//! take, killing anything left in its cgroup first.
//!
//! ```text
//!   owner:   mkdir (0700) ─▶ flock LOCK_EX ─▶ write `owner` ─▶ … ─▶ rmdir ─▶ exit
//!   sweep:   open ─▶ flock LOCK_EX|LOCK_NB ─┬─ busy: an owner runs ─▶ skip
//!                                           ├─ no `owner`: being made or removed ─▶ skip
//!                                           └─ `owner` there: owner died ─▶ kill, remove
//! ```

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::confine::Confinement;

/// Where the scratch directories go, under the configuration's `run_dir`.
pub fn runs_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("run")
}

const PREFIX: &str = "capsid-run-";
/// Written once the owner holds the lock: a directory without it is being
/// made (or removed) and is never swept.
const OWNER: &str = "owner";

/// A scratch directory held by this process; removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    /// Holds the lock; dropped after `dir` is removed.
    _lock: File,
}

impl Scratch {
    /// Makes a directory under `runs_dir(run_dir)`, locked for this process.
    pub fn create(run_dir: &Path) -> io::Result<Self> {
        let parent = runs_dir(run_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&parent)?;
        let dir = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempdir_in(&parent)?;
        let lock = File::open(dir.path())?;
        // Blocking: a sweep may hold the lock for a moment, then lets go
        // because there is no `owner` yet.
        flock(&lock, libc::LOCK_EX)?;
        std::fs::write(dir.path().join(OWNER), format!("{}\n", std::process::id()))?;
        Ok(Self { dir, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub(crate) fn flock(file: &File, operation: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: flock takes an open descriptor and an operation.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Whether `name` exists in the directory open as `dir` (the locked one,
/// not whatever its path names now).
fn has_entry(dir: &File, name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `dir` is an open directory and `name` NUL-terminated.
    unsafe {
        libc::faccessat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::F_OK,
            libc::AT_SYMLINK_NOFOLLOW,
        ) == 0
    }
}

/// What a [`sweep`] removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Scratch directories of owners that died.
    pub dirs: Vec<PathBuf>,
    /// Empty VM cgroups a teardown left (see [`crate::confine::LEFTOVER_AGE`]).
    pub cgroups: Vec<PathBuf>,
}

impl Swept {
    /// Nothing was left behind.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.cgroups.is_empty()
    }
}

/// Removes the scratch directories of owners that died, after killing what
/// is left of their VMs (their cgroups, and any capsid-vmm serving them),
/// then the empty VM cgroups that teardowns left. A directory that cannot
/// be removed is logged and left for the next sweep.
pub fn sweep(run_dir: &Path, confinement: &Confinement) -> Swept {
    let dirs = sweep_dirs(run_dir, confinement);
    let cgroups = confinement
        .cgroup_parent
        .as_deref()
        .map(|parent| crate::confine::sweep_cgroups(parent, crate::confine::LEFTOVER_AGE))
        .unwrap_or_default();
    Swept { dirs, cgroups }
}

fn sweep_dirs(run_dir: &Path, confinement: &Confinement) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(runs_dir(run_dir)) else {
        return Vec::new();
    };
    let mut swept = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = entry.file_name().to_string_lossy().starts_with(PREFIX);
        if !ours || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(dir) = File::open(&path) else {
            continue;
        };
        if flock(&dir, libc::LOCK_EX | libc::LOCK_NB).is_err() || !has_entry(&dir, OWNER) {
            continue;
        }
        crate::vm::kill_orphans(&path, confinement);
        // Its network: the redirect in the namespace it joined, then (for
        // `--network nat`) the namespace bound in the directory, its veth
        // and its rules.
        crate::network::unwire_recorded(&path);
        crate::nat::sweep_dir(&path);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => swept.push(path),
            Err(e) => log::warn!(
                "cannot remove {}, left by a capsid run that died: {e}",
                path.display()
            ),
        }
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_cgroups() -> Confinement {
        Confinement {
            cgroup_parent: None,
            ..Confinement::default()
        }
    }

    #[test]
    fn a_held_directory_is_never_swept_and_goes_with_its_owner() {
        let run = tempfile::tempdir().unwrap();
        let scratch = Scratch::create(run.path()).unwrap();
        let path = scratch.path().to_owned();
        assert!(path.starts_with(runs_dir(run.path())));
        assert!(path.join(OWNER).is_file());
        assert_eq!(sweep(run.path(), &no_cgroups()), Swept::default());
        assert!(path.is_dir());
        drop(scratch);
        assert!(!path.exists());
    }

    #[test]
    fn a_directory_whose_owner_died_is_swept_and_one_being_made_is_not() {
        let run = tempfile::tempdir().unwrap();
        let runs = runs_dir(run.path());
        // What a killed owner leaves: `owner` written, nobody holding the lock.
        let orphan = runs.join("capsid-run-dead");
        std::fs::create_dir_all(orphan.join("vm")).unwrap();
        std::fs::write(orphan.join(OWNER), "4242\n").unwrap();
        std::fs::write(orphan.join("vm/vmm.log"), "the end\n").unwrap();
        // An owner between mkdir and writing `owner`.
        let young = runs.join("capsid-run-young");
        std::fs::create_dir_all(&young).unwrap();
        // Not ours.
        let other = runs.join("something-else");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(OWNER), "1\n").unwrap();
        assert_eq!(sweep(run.path(), &no_cgroups()).dirs, vec![orphan.clone()]);
        assert!(!orphan.exists() && young.is_dir() && other.is_dir());
    }

    #[test]
    fn a_missing_run_directory_sweeps_nothing() {
        let run = tempfile::tempdir().unwrap();
        assert!(sweep(&run.path().join("nope"), &no_cgroups()).is_empty());
    }
}
