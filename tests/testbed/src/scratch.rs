//! Scratch directories that are removed even after a crash.
//!
//! Each directory is named `<prefix>.<pid>.<n>` under the temp dir. Dropping a
//! [`ScratchDir`] removes it; a process killed with SIGKILL cannot do that, so
//! creating a scratch directory first sweeps any whose owning process is gone.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::{fs, io};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory removed with everything in it when dropped.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `$TMPDIR/<prefix>.<pid>.<n>`, first removing leftovers of the
    /// same prefix whose process no longer exists.
    pub fn new(prefix: &str) -> io::Result<Self> {
        let base = std::env::temp_dir();
        sweep_stale(&base, prefix);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("{prefix}.{}.{n}", std::process::id()));
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path in the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sweep_stale(base: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_prefix('.'))
        else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_on_drop() {
        let dir = ScratchDir::new("capsid-testbed-unit").unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn leftovers_of_dead_processes_are_swept() {
        // PIDs are below 2^22 on Linux, so this one cannot be alive.
        let stale = std::env::temp_dir().join("capsid-testbed-sweep.4294967294.0");
        fs::create_dir_all(stale.join("sub")).unwrap();
        let live = ScratchDir::new("capsid-testbed-sweep").unwrap();
        assert!(!stale.exists());
        assert!(live.path().exists());
    }
}
