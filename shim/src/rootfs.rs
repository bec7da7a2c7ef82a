//! containerd's rootfs mounts → one read-only block image for the VM.
//!
//! ```text
//!  CreateTaskRequest.rootfs: a bind of a native snapshot (read in place), or
//!  an overlay of the layers (mounted read-only on BUNDLE/rootfs, its upper
//!  directory as the top layer) ─▶ erofs image, cached by content
//!  ($CAPSID_CACHE/rootfs) ─▶ unmounted
//! ```
//!
//! The container writes into an overlay on tmpfs inside the guest; the
//! image is shared by every container with the same content, so a second
//! container from an image pays only the content hash.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use capsid_runtime::images::rootfs::RootfsImage;
use containerd_shim::protos::types::mount::Mount;

/// Why containerd's snapshot could not become the VM's rootfs image.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot create the mount point {0}")]
    MountPoint(PathBuf, #[source] std::io::Error),
    #[error("cannot mount the rootfs ({kind} from {source_path}) on {target}: {reason}")]
    Mount {
        kind: String,
        source_path: String,
        target: PathBuf,
        reason: String,
    },
    #[error(
        "snapshot mounts of type {0} are not supported (use the overlayfs or native snapshotter)"
    )]
    Unsupported(String),
    #[error("the container's root {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot make the rootfs image")]
    Image(#[source] capsid_runtime::images::rootfs::RootfsError),
}

/// Unmounts the rootfs view when dropped (also on an error path).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.0.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path; umount2 reads nothing else.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                log::warn!(
                    "cannot unmount {}: {}",
                    self.0.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The options of an overlay mount that build a read-only view of the
/// snapshot: its upper directory becomes the top lower layer, so nothing
/// on the host is written.
fn overlay_view(options: &[String]) -> Option<String> {
    let option = |name: &str| {
        options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    };
    let lower = option("lowerdir")?;
    Some(match option("upperdir") {
        Some(upper) => format!("lowerdir={upper}:{lower}"),
        None => format!("lowerdir={lower}"),
    })
}

fn mount_overlay(options: &str, target: &Path) -> std::io::Result<Mounted> {
    let to_c = |s: &[u8]| CString::new(s).map_err(|_| std::io::ErrorKind::InvalidInput);
    let source = to_c(b"overlay")?;
    let target_c = to_c(target.as_os_str().as_bytes())?;
    let data = to_c(options.as_bytes())?;
    // SAFETY: NUL-terminated strings that outlive the call; the kernel
    // copies them.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            source.as_ptr(),
            libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Mounted(target.to_owned()))
}

/// The image of the container's root: made from containerd's snapshot
/// mount if there is one, else from the bundle's `root.path`.
pub fn image(
    bundle: &Path,
    mounts: &[Mount],
    root_path: &Path,
) -> Result<RootfsImage, SnapshotError> {
    let cache = capsid_runtime::images::cache_dir();
    let build = |dir: &Path| {
        capsid_runtime::images::rootfs::image(dir, None, &cache).map_err(SnapshotError::Image)
    };
    match mounts {
        [] => {
            let dir = bundle.join(root_path);
            if !dir.is_dir() {
                return Err(SnapshotError::NotADirectory(dir));
            }
            build(&dir)
        }
        // The native snapshotter: the snapshot is a plain directory.
        [mount] if mount.type_ == "bind" || mount.type_ == "rbind" => {
            let dir = PathBuf::from(&mount.source);
            if !dir.is_dir() {
                return Err(SnapshotError::NotADirectory(dir));
            }
            build(&dir)
        }
        [mount] if mount.type_ == "overlay" => {
            let unsupported = |reason: &str| SnapshotError::Mount {
                kind: mount.type_.clone(),
                source_path: mount.source.clone(),
                target: bundle.join("rootfs"),
                reason: reason.into(),
            };
            let options = overlay_view(&mount.options).ok_or_else(|| unsupported("no lowerdir"))?;
            let target = bundle.join("rootfs");
            std::fs::create_dir_all(&target)
                .map_err(|e| SnapshotError::MountPoint(target.clone(), e))?;
            let mounted =
                mount_overlay(&options, &target).map_err(|e| unsupported(&e.to_string()))?;
            let image = build(&target);
            drop(mounted);
            image
        }
        _ => Err(SnapshotError::Unsupported(
            mounts
                .iter()
                .map(|m| m.type_.clone())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlay_snapshot_becomes_a_read_only_view() {
        let options = [
            "index=off".to_owned(),
            "workdir=/w".to_owned(),
            "upperdir=/u".to_owned(),
            "lowerdir=/l1:/l2".to_owned(),
        ];
        assert_eq!(
            overlay_view(&options).as_deref(),
            Some("lowerdir=/u:/l1:/l2")
        );
        assert_eq!(
            overlay_view(&["lowerdir=/l".to_owned()]).as_deref(),
            Some("lowerdir=/l")
        );
        assert_eq!(overlay_view(&["upperdir=/u".to_owned()]), None);
    }
}
