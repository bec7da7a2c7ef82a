//! `capsid run --cache NAME:GUEST_PATH[:SIZE]`: a persistent ext4 image per
//! cache name (dependency caches that outlive a job), under
//! `$CAPSID_CACHE/caches/NAME.ext4`.
//!
//! The host makes it empty (`rootfs::scratch_disk`) and never mounts it:
//! only guests do, read-write. One job at a time holds it: an exclusive
//! `flock` on `NAME.lock` for as long as the run lives; a second job is
//! refused at once with a message that says which cache is busy. A cache is
//! shared by every job that names it, so a job can leave anything in it for
//! the next: give jobs of different trust different names.

use std::fs::File;
use std::path::{Path, PathBuf};

use rustix::fs::FlockOperation;

use crate::rootfs::{RootfsError, scratch_disk};

/// Why a cache cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Not a plain name.
    #[error("{0:?}: a cache's name is 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)")]
    BadName(String),
    /// Another job holds it.
    #[error("the cache {0:?} is in use by another job; wait for it, or name another")]
    Busy(String),
    /// Its directory, lock or image failed.
    #[error("cache {name:?}: {what}")]
    Io {
        /// The cache.
        name: String,
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Making its image failed.
    #[error("cache {0:?}: cannot make its image")]
    Image(String, #[source] RootfsError),
}

/// A cache held for one run: its image, locked until this is dropped.
#[derive(Debug)]
pub struct HeldCache {
    /// The ext4 image, for the VM's writable disk.
    pub path: PathBuf,
    /// Whether this run made it (it was empty).
    pub created: bool,
    _lock: File,
}

/// Whether `name` is a plain cache name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Takes the cache `name` under `cache` (`$CAPSID_CACHE`), making an empty
/// one of `bytes` if there is none.
pub fn hold(cache: &Path, name: &str, bytes: u64) -> Result<HeldCache, CacheError> {
    if !valid_name(name) {
        return Err(CacheError::BadName(name.to_owned()));
    }
    let io = |what: String| {
        let name = name.to_owned();
        move |source| CacheError::Io { name, what, source }
    };
    let dir = cache.join("caches");
    crate::private_dir(&dir).map_err(io(format!("mkdir {}", dir.display())))?;
    let lock_path = dir.join(format!("{name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io(format!("open {}", lock_path.display())))?;
    match rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => return Err(CacheError::Busy(name.to_owned())),
        Err(e) => return Err(io(format!("lock {}", lock_path.display()))(e.into())),
    }
    let path = dir.join(format!("{name}.ext4"));
    let created = !path.exists();
    if created {
        // Made beside it and renamed: a job killed meanwhile leaves no
        // half-made cache.
        let partial = dir.join(format!(".{name}.ext4.partial"));
        let _ = std::fs::remove_file(&partial);
        scratch_disk(&partial, bytes).map_err(|e| CacheError::Image(name.to_owned(), e))?;
        std::fs::rename(&partial, &path).map_err(io(format!("rename to {}", path.display())))?;
    }
    Ok(HeldCache {
        path,
        created,
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_is_made_once_kept_and_held_by_one_job_at_a_time() {
        if !Path::new("/sbin/mkfs.ext4").exists() && !Path::new("/usr/sbin/mkfs.ext4").exists() {
            eprintln!("skipped: no mkfs.ext4");
            return;
        }
        let cache = tempfile::tempdir().unwrap();
        let held = hold(cache.path(), "cargo-registry", 64 << 20).unwrap();
        assert!(held.created);
        assert_eq!(std::fs::metadata(&held.path).unwrap().len(), 64 << 20);
        // A second job while the first holds it: refused at once.
        let busy = hold(cache.path(), "cargo-registry", 64 << 20).unwrap_err();
        assert!(busy.to_string().contains("in use by another job"), "{busy}");
        drop(held);
        let again = hold(cache.path(), "cargo-registry", 1 << 30).unwrap();
        assert!(!again.created, "kept between runs");
        assert_eq!(std::fs::metadata(&again.path).unwrap().len(), 64 << 20);
        for bad in ["", ".hidden", "a/b", "../x", &"x".repeat(65)] {
            assert!(matches!(
                hold(cache.path(), bad, 1 << 20),
                Err(CacheError::BadName(_))
            ));
        }
    }
}
