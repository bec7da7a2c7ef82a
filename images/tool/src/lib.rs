//! capsid's image builders: the guest initramfs (the agent as `/init`) and
//! container rootfs block images made from a directory, cached by content.

#![warn(missing_docs)]

pub mod caches;
pub mod initramfs;
pub mod oci;
pub mod output;
pub mod rootfs;

use std::path::{Path, PathBuf};

/// Writes the guest initramfs: `agent` as `/init`, `/dev/console` for its
/// stdio, and the directories it mounts on. Reproducible: fixed inode
/// numbers, owners and times. Returns its size in bytes.
pub fn agent_initramfs(agent: &Path, out: &Path) -> Result<u64, initramfs::InitramfsError> {
    let mut archive = initramfs::Initramfs::create(out)?;
    archive.file("/init", agent)?;
    archive.char_device("/dev/console", 5, 1, 0o600)?;
    for dir in ["/proc", "/sys", "/run", "/tmp"] {
        archive.dir(dir)?;
    }
    archive.finish()
}

/// Where cached images live: `$CAPSID_CACHE` or `/var/cache/capsid`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("CAPSID_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/capsid".into())
}

/// Makes `dir` (and its parents) and closes it to everyone but its owner
/// (0700), also when it existed with a wider mode. The caches hold what
/// images hold — setuid-root programs, private files — and only the
/// runtime (root) has any business in them.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
