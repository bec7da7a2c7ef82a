//! Templates: a guest booted once to "agent ready, no container" and kept
//! as a snapshot, from which every sandbox of its shape is restored instead
//! of booting (warm start; Kata's VM templating, Firecracker's snapshots).
//!
//! ```text
//!  $CAPSID_CACHE/templates/<key>/state.json, memory
//!    key = sha256(vmm, kernel, initramfs (path, size, mtime, inode),
//!                 kernel parameters, vCPUs, MiB, spare slots)
//! ```
//!
//! A template is made the first time a sandbox of its shape starts: a VM
//! with spare slots and no disk boots, its agent answers, and the VMM
//! writes its snapshot into a directory of its own, which is then renamed
//! into place. One process makes it (an `flock` on `.<key>.lock`); the
//! others starting meanwhile wait for it, within their boot's deadline. Any change to the VMM, kernel, initramfs or parameters makes
//! another key, so a stale template is never used; the VMM also refuses a
//! snapshot of another build or CPU, and the sandbox then boots cold and
//! removes the template. Inputs are identified by their metadata, not
//! hashed: a 20 MiB kernel hashed on every start would cost more than the
//! restore saves.
//!
//! A restored guest shares the template's memory copy-on-write (the page
//! cache holds one copy of its clean pages for every clone) and, until it
//! is refreshed, its RNG state and clock: the sandbox refreshes it
//! (`Agent::refresh`) before anything runs in it (`docs/security.md`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{BootFiles, VmSize};
use crate::confine::Confinement;
use crate::vm::{BootPolicy, MicroVm, MicroVmError, SNAPSHOT_MEMORY, SNAPSHOT_STATE, VmSpec};

/// Bumped when what a template holds changes meaning for the runtime.
const TEMPLATE_FORMAT: &str = "capsid-template-1";
/// How long a template's VMM may take to end after its snapshot.
const SNAPSHOT_EXIT_WAIT: Duration = Duration::from_secs(30);

/// Why no template could be had.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A file or directory of the template cache.
    #[error("template cache {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// The template VM did not boot, or could not be snapshotted.
    #[error("cannot make the template")]
    Vm(#[from] MicroVmError),
    /// The template VM did not end as a snapshotted VM does.
    #[error("the template VM did not end after its snapshot ({0})")]
    Exit(String),
}

/// The shape of the VMs a template serves.
#[derive(Debug, Clone)]
pub struct TemplateSpec<'a> {
    /// What the VM boots.
    pub boot: &'a BootFiles,
    /// Its vCPUs and memory.
    pub size: VmSize,
    /// Its spare disk slots (the first container's rootfs takes one).
    pub slots: u8,
    /// How its VMM is confined.
    pub confinement: Confinement,
}

impl TemplateSpec<'_> {
    /// The template's cache key: the identity of every input.
    pub fn key(&self) -> Result<String, TemplateError> {
        let mut hash = Sha256::new();
        hash.update(TEMPLATE_FORMAT);
        for path in [&self.boot.vmm, &self.boot.kernel, &self.boot.initramfs] {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(path).map_err(|e| TemplateError::Io(path.clone(), e))?;
            hash.update(path.as_os_str().as_encoded_bytes());
            for n in [
                meta.len(),
                u64::try_from(meta.mtime()).unwrap_or(0),
                u64::try_from(meta.mtime_nsec()).unwrap_or(0),
                meta.ino(),
                meta.dev(),
            ] {
                hash.update(n.to_le_bytes());
            }
        }
        hash.update(self.boot.kernel_params.as_bytes());
        for n in [self.size.vcpus, self.size.memory_mib, u32::from(self.slots)] {
            hash.update(n.to_le_bytes());
        }
        let digest = hash.finalize();
        Ok(digest.iter().take(12).map(|b| format!("{b:02x}")).collect())
    }
}

/// Where templates live: `$CAPSID_CACHE/templates`.
pub fn templates_dir() -> PathBuf {
    capsid_images::cache_dir().join("templates")
}

/// Whether `dir` holds a whole template.
fn complete(dir: &Path) -> bool {
    dir.join(SNAPSHOT_STATE).is_file() && dir.join(SNAPSHOT_MEMORY).is_file()
}

/// The template for `spec` in `cache`, made first if there is none. A
/// made template's VM runs in a scratch directory of its own under
/// `run_dir` (`crate::scratch`), and is gone when this returns, whatever
/// happened.
pub fn ensure(
    cache: &Path,
    run_dir: &Path,
    spec: &TemplateSpec<'_>,
    policy: &BootPolicy<'_>,
) -> Result<PathBuf, TemplateError> {
    let key = spec.key()?;
    let dir = cache.join(&key);
    if complete(&dir) {
        return Ok(dir);
    }
    capsid_images::private_dir(cache).map_err(|e| TemplateError::Io(cache.to_owned(), e))?;
    // One maker per template; the others wait for it (within the boot's
    // deadline) and take what it made.
    let lock_path = cache.join(format!(".{key}.lock"));
    let lock =
        std::fs::File::create(&lock_path).map_err(|e| TemplateError::Io(lock_path.clone(), e))?;
    let deadline = std::time::Instant::now() + policy.wait;
    loop {
        match crate::scratch::flock(&lock, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => break,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(TemplateError::Io(lock_path, e)),
        }
    }
    if complete(&dir) {
        return Ok(dir);
    }
    // What a maker killed before us left; nobody else makes this one now.
    let partial = format!(".making-{key}-");
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&partial) {
            discard(&entry.path());
        }
    }
    std::fs::create_dir_all(run_dir).map_err(|e| TemplateError::Io(run_dir.to_owned(), e))?;
    let making = tempfile::Builder::new()
        .prefix(&partial)
        .tempdir_in(cache)
        .map_err(|e| TemplateError::Io(cache.to_owned(), e))?;
    // A scratch directory like `capsid run`'s: if this process is killed
    // while the template VM runs, the VM dies with it, and the next
    // `capsid run` or `capsid doctor` sweeps the directory and its cgroup.
    let vm_dir = crate::scratch::Scratch::create(run_dir)
        .map_err(|e| TemplateError::Io(crate::scratch::runs_dir(run_dir), e))?;
    let (mut vm, client) = MicroVm::boot(
        &VmSpec {
            boot: spec.boot.clone(),
            vcpus: spec.size.vcpus,
            memory_mib: spec.size.memory_mib,
            disks: Vec::new(),
            spare_disks: spec.slots,
            dir: vm_dir.path().to_owned(),
            log_level: "warn".into(),
            confinement: spec.confinement.clone(),
            die_with_owner: true,
            nets: Vec::new(),
            restore: None,
        },
        policy,
    )?;
    // Every restored guest's first container would compile the default
    // seccomp profile; its template's agent does it once, for all of them.
    let prepare = capsid_protocol::Prepare {
        seccomp: vec![crate::seccomp_profile::default_profile(
            &crate::seccomp_profile::DEFAULT_CAPABILITIES,
        )],
    };
    if let Err(e) = client.prepare(&prepare) {
        log::warn!(
            "the template's agent could not prepare the default seccomp profile (each container compiles it): {}",
            capsid_base::error_chain(&e)
        );
    }
    // The agent's connection is reset by the restore; nothing is sent on
    // it any more.
    drop(client);
    let saved_ms = vm.snapshot(making.path())?;
    match vm.wait_timeout(SNAPSHOT_EXIT_WAIT)? {
        Some(status) if status.success() => {}
        other => {
            return Err(TemplateError::Exit(match other {
                Some(status) => status.to_string(),
                None => format!("still running after {SNAPSHOT_EXIT_WAIT:?}"),
            }));
        }
    }
    drop(vm);
    match std::fs::rename(making.path(), &dir) {
        Ok(()) => {
            // Renamed: nothing is left at the old path for the drop.
            let _ = making.keep();
            log::info!(
                "template {} made ({} vCPUs, {} MiB, {} slots; the VM was paused {saved_ms} ms)",
                dir.display(),
                spec.size.vcpus,
                spec.size.memory_mib,
                spec.slots
            );
        }
        // Another maker was first; ours goes with `making`.
        Err(_) if complete(&dir) => {}
        Err(e) => return Err(TemplateError::Io(dir, e)),
    }
    Ok(dir)
}

/// Removes a template that could not be restored (another build's, or
/// damaged), so that the next sandbox makes a fresh one.
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot remove the template {}: {e}", dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> BootFiles {
        let file = |name: &str| {
            let path = dir.join(name);
            std::fs::write(&path, name).unwrap();
            path
        };
        BootFiles {
            vmm: file("vmm"),
            kernel: file("vmlinux"),
            initramfs: file("initramfs"),
            kernel_params: String::new(),
        }
    }

    #[test]
    fn the_key_changes_with_every_input_and_only_then() {
        let dir = tempfile::tempdir().unwrap();
        let boot = files(dir.path());
        let spec = |boot: &BootFiles, vcpus, slots| {
            TemplateSpec {
                boot,
                size: VmSize {
                    vcpus,
                    memory_mib: 256,
                },
                slots,
                confinement: Confinement::default(),
            }
            .key()
            .unwrap()
        };
        let key = spec(&boot, 1, 1);
        assert_eq!(key.len(), 24);
        assert_eq!(spec(&boot, 1, 1), key, "the same inputs, the same key");
        assert_ne!(spec(&boot, 2, 1), key);
        assert_ne!(spec(&boot, 1, 9), key);
        let params = BootFiles {
            kernel_params: "quiet".into(),
            ..boot.clone()
        };
        assert_ne!(spec(&params, 1, 1), key);
        // A rebuilt kernel (a new file at the same path).
        std::fs::remove_file(&boot.kernel).unwrap();
        std::fs::write(&boot.kernel, "another kernel").unwrap();
        assert_ne!(spec(&boot, 1, 1), key);
        std::fs::remove_file(&boot.vmm).unwrap();
        assert!(matches!(
            TemplateSpec {
                boot: &boot,
                size: VmSize {
                    vcpus: 1,
                    memory_mib: 256
                },
                slots: 1,
                confinement: Confinement::default(),
            }
            .key(),
            Err(TemplateError::Io(..))
        ));
    }

    fn policy(wait: Duration) -> BootPolicy<'static> {
        BootPolicy {
            wait,
            io_timeout: wait,
            retries: 0,
            interrupted: &|| false,
            on_retry: &|_| {},
        }
    }

    #[test]
    fn a_whole_template_is_taken_and_a_maker_at_work_is_waited_for_within_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let boot = files(dir.path());
        let spec = TemplateSpec {
            boot: &boot,
            size: VmSize {
                vcpus: 1,
                memory_mib: 128,
            },
            slots: 1,
            confinement: Confinement::default(),
        };
        let cache = dir.path().join("templates");
        let run = dir.path().join("run");
        // Another process is making it: the lock is held.
        std::fs::create_dir(&cache).unwrap();
        let key = spec.key().unwrap();
        let held = std::fs::File::create(cache.join(format!(".{key}.lock"))).unwrap();
        crate::scratch::flock(&held, libc::LOCK_EX).unwrap();
        let started = std::time::Instant::now();
        let waited = ensure(&cache, &run, &spec, &policy(Duration::from_millis(300)));
        assert!(
            matches!(&waited, Err(TemplateError::Io(_, e)) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{waited:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        // The maker was killed, leaving a partial template; the next one
        // removes it, and a template it cannot make (the "VMM" here is not
        // one) leaves nothing either.
        drop(held);
        let partial = cache.join(format!(".making-{key}-x1"));
        std::fs::create_dir(&partial).unwrap();
        let failed = ensure(&cache, &run, &spec, &policy(Duration::from_secs(5)));
        assert!(matches!(failed, Err(TemplateError::Vm(_))), "{failed:?}");
        let left: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .chain(std::fs::read_dir(crate::scratch::runs_dir(&run)).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // Made by another: taken without booting anything.
        let made = cache.join(&key);
        std::fs::create_dir(&made).unwrap();
        std::fs::write(made.join(SNAPSHOT_STATE), "{}").unwrap();
        std::fs::write(made.join(SNAPSHOT_MEMORY), "").unwrap();
        assert_eq!(
            ensure(&cache, &run, &spec, &policy(Duration::from_secs(5))).unwrap(),
            made
        );
    }

    #[test]
    fn only_a_whole_template_counts_and_a_discarded_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("t");
        std::fs::create_dir(&template).unwrap();
        std::fs::write(template.join(SNAPSHOT_STATE), "{}").unwrap();
        assert!(!complete(&template));
        std::fs::write(template.join(SNAPSHOT_MEMORY), "").unwrap();
        assert!(complete(&template));
        discard(&template);
        assert!(!template.exists());
        discard(&template);
    }
}
