//! What the runtime does so that `capsid-vmm` can confine itself
//! (`capsid_vmm::jail`): the VM's directory, owned by an unprivileged user
//! of the VM's own, the VM's cgroup (memory and process limits), and the
//! flags that tell the VMM to use them.
//!
//! ```text
//!  DIR/            the caller's scratch directory (0700, root)
//!  DIR/vm/         the VMM's whole world, seen as /vm (0700, the VM's user):
//!                  vsock.sock, api.sock, console.log, vmm.log
//!  /sys/fs/cgroup/capsid/<vm>/   memory.max = guest RAM + VMM overhead,
//!                                pids.max; removed with the VM
//! ```
//!
//! Everything in `DIR/vm` may have been written by a compromised VMM: the
//! runtime opens those files without following links, checks they are
//! regular, and reads a bounded tail.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The first of the user ids given to VMMs, one per VM (the VM's
/// directory hashed into [`VM_UID_SPAN`] ids above it): far from the ids
/// of people, system users and the usual subordinate-id ranges.
pub const VM_UID_BASE: u32 = 0x7000_0000;
/// How many ids from [`VM_UID_BASE`] VMs take.
pub const VM_UID_SPAN: u32 = 1 << 24;
/// What a VMM process may use beyond its guest's RAM before its cgroup
/// stops it: its own heap and stacks, page tables, and the vsock buffers
/// (256 connections of 256 KiB at most).
pub const VMM_OVERHEAD_MIB: u64 = 192;
/// Processes and threads of one VM's cgroup beyond its vCPUs.
pub const VMM_PIDS: u64 = 64;

/// How the runtime confines each VMM (from the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Run the VMM in its jail (needs root).
    pub jail: bool,
    /// The jail's user and group; `None`: one of its own per VM.
    pub uid: Option<u32>,
    /// See `uid`.
    pub gid: Option<u32>,
    /// The VMM's `--seccomp`: kill, log or none.
    pub seccomp: String,
    /// Where each VM's cgroup goes; `None`, or no cgroup v2 there: none.
    pub cgroup_parent: Option<PathBuf>,
}

impl Default for Confinement {
    fn default() -> Self {
        Self {
            jail: true,
            uid: None,
            gid: None,
            seccomp: "kill".into(),
            cgroup_parent: Some(PathBuf::from(DEFAULT_CGROUP_PARENT)),
        }
    }
}

/// Where VM cgroups go unless the configuration says otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "/sys/fs/cgroup/capsid";

/// Why a VMM could not be confined as configured.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// Confinement needs root.
    #[error(
        "confining capsid-vmm needs root (namespaces, a private root, an unprivileged user): \
         run as root, or set vmm_jail = false in the configuration to run it unconfined"
    )]
    NotRoot,
    /// The VM's directory could not be made or handed to its user.
    #[error("cannot prepare the VM's directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    /// The VM's cgroup could not be made or limited.
    #[error("cannot make the VM's cgroup {0}")]
    Cgroup(PathBuf, #[source] std::io::Error),
}

/// The user and group the VMM of the VM in `dir` runs as.
pub fn vm_user(confinement: &Confinement, dir: &Path) -> (u32, u32) {
    // FNV-1a over the directory's path: stable for the VM's life, and
    // different for two VMs but by a 1 in 16 M chance (which would only
    // put two VMMs, in PID and mount namespaces of their own, under one id).
    let mut hash: u32 = 0x811c_9dc5;
    for byte in dir.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
    }
    let own = VM_UID_BASE + hash % VM_UID_SPAN;
    (
        confinement.uid.unwrap_or(own),
        confinement.gid.unwrap_or(own),
    )
}

/// Makes `vm`, the VMM's world: owned by `uid:gid`, 0700.
pub fn make_vm_dir(vm: &Path, owner: Option<(u32, u32)>) -> Result<PathBuf, ConfineError> {
    use std::os::unix::fs::DirBuilderExt;
    let vm = vm.to_owned();
    let err = |e| ConfineError::Dir(vm.clone(), e);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&vm)
        .map_err(err)?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&vm, Some(uid), Some(gid)).map_err(err)?;
    }
    Ok(vm)
}

/// Whether this process may confine a VMM.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The VM's cgroup, removed (with anything left in it) when dropped.
#[derive(Debug)]
pub struct VmCgroup {
    path: PathBuf,
}

impl VmCgroup {
    /// Makes `parent/name` with the VM's limits, enabling the memory and
    /// pids controllers on the way; `None` where there is no cgroup v2 with
    /// them (the VMM then runs without this wall; `capsid doctor` says so).
    pub fn create(
        parent: &Path,
        name: &str,
        memory_bytes: u64,
        pids: u64,
    ) -> Result<Option<Self>, ConfineError> {
        let Some(root) = parent.parent() else {
            return Ok(None);
        };
        if !cgroup2_has(root, &["memory", "pids"]) {
            return Ok(None);
        }
        let err = |path: &Path| {
            let path = path.to_owned();
            move |e| ConfineError::Cgroup(path, e)
        };
        if !parent.is_dir() {
            match std::fs::create_dir(parent) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(err(parent)(e)),
            }
        }
        for dir in [root, parent] {
            let control = dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if !(enabled.contains("memory") && enabled.contains("pids")) {
                std::fs::write(&control, "+memory +pids").map_err(err(&control))?;
            }
        }
        let path = parent.join(name);
        std::fs::create_dir(&path).map_err(err(&path))?;
        let cgroup = Self { path };
        std::fs::write(cgroup.path.join("memory.max"), memory_bytes.to_string())
            .map_err(err(&cgroup.path))?;
        std::fs::write(cgroup.path.join("pids.max"), pids.to_string())
            .map_err(err(&cgroup.path))?;
        Ok(Some(cgroup))
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Kills everything in the cgroup (`cgroup.kill`) and removes it,
    /// waiting up to [`CGROUP_EMPTY_WAIT`] for the processes to go.
    pub fn remove(&self) {
        remove_cgroup(&self.path);
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.remove();
    }
}

/// How long a killed VM's processes may take to leave its cgroup. A VMM
/// tearing down its guest's memory and KVM state takes well over a second
/// in the nested test host (a cgroup was left after a 1 s wait).
pub const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(10);

/// Kills what is in the cgroup at `path` and removes it (a leftover of a
/// shim or CLI that died included).
pub fn remove_cgroup(path: &Path) {
    if !path.is_dir() {
        return;
    }
    let _ = std::fs::write(path.join("cgroup.kill"), "1");
    let deadline = Instant::now() + CGROUP_EMPTY_WAIT;
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                log::warn!("cannot remove the VM's cgroup {}: {e}", path.display());
                return;
            }
        }
    }
}

/// How long an empty VM cgroup must have existed before a sweep takes it
/// for a leftover: a VM's cgroup holds its VMM within milliseconds of being
/// made, so an empty one this old is one whose teardown outlasted
/// [`CGROUP_EMPTY_WAIT`] (its owner gave up and went on).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// Removes the cgroups under `parent` that hold no process and were made
/// more than `age` ago; returns those removed. Only empty ones: a cgroup
/// with a process in it belongs to a VM still running (or to one that
/// [`crate::vm::kill_orphans`] finds by its directory).
pub fn sweep_cgroups(parent: &Path, age: Duration) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let old = entry
            .metadata()
            .ok()
            .filter(std::fs::Metadata::is_dir)
            .and_then(|m| m.modified().ok())
            .and_then(|made| made.elapsed().ok())
            .is_some_and(|elapsed| elapsed >= age);
        let empty = std::fs::read_to_string(path.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l.trim() == "populated 0"));
        if !old || !empty {
            continue;
        }
        match std::fs::remove_dir(&path) {
            Ok(()) => removed.push(path),
            Err(e) => log::warn!("cannot remove the empty cgroup {}: {e}", path.display()),
        }
    }
    removed
}

/// The cgroup name for the VM whose directory is `dir`.
pub fn cgroup_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (uid, _) = vm_user(&Confinement::default(), dir);
    format!("{name}-{uid:x}")
}

/// Whether `root` is a cgroup v2 hierarchy offering every one of `controllers`.
pub fn cgroup2_has(root: &Path, controllers: &[&str]) -> bool {
    std::fs::read_to_string(root.join("cgroup.controllers")).is_ok_and(|available| {
        controllers
            .iter()
            .all(|c| available.split_whitespace().any(|a| a == *c))
    })
}

/// The last `max` bytes of a file the VMM may have tampered with: opened
/// without following a link and without blocking, read only if it is a
/// regular file.
pub fn untrusted_tail(path: &Path, max: u64) -> Vec<u8> {
    let Ok(mut file) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    else {
        return Vec::new();
    };
    let Ok(metadata) = file.metadata() else {
        return Vec::new();
    };
    if !metadata.is_file() {
        return Vec::new();
    }
    let mut tail = Vec::new();
    if file
        .seek(SeekFrom::Start(metadata.len().saturating_sub(max)))
        .is_ok()
    {
        let _ = file.take(max).read_to_end(&mut tail);
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_whose_processes_take_seconds_to_go_is_still_removed() {
        // A plain directory stands for the cgroup: it cannot be removed
        // while it holds files, as a cgroup cannot while it holds
        // processes; they go after 1.5 s (the old wait was 1 s).
        let parent = tempfile::tempdir().unwrap();
        let cgroup = parent.path().join("vm-test");
        std::fs::create_dir(&cgroup).unwrap();
        std::fs::write(cgroup.join("busy"), "").unwrap();
        let dir = cgroup.clone();
        let leaving = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::remove_file(dir.join("busy")).unwrap();
            let _ = std::fs::remove_file(dir.join("cgroup.kill"));
        });
        remove_cgroup(&cgroup);
        leaving.join().unwrap();
        assert!(!cgroup.exists(), "the cgroup was left behind");
    }

    /// A cgroup v2 hierarchy this test may write, or None (with the reason
    /// printed): the host's own `/sys/fs/cgroup`, or its `unified` part on
    /// a hybrid host.
    fn writable_cgroup2() -> Option<PathBuf> {
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| {
                p.join("cgroup.procs").is_file() && p.join("cgroup.subtree_control").exists()
            });
        let root = root.filter(|r| {
            let probe = r.join(format!("capsid-probe-{}", std::process::id()));
            let ok = std::fs::create_dir(&probe).is_ok();
            let _ = std::fs::remove_dir(&probe);
            ok
        });
        if root.is_none() {
            eprintln!("SKIPPED: needs root and a writable cgroup v2 hierarchy");
        }
        root
    }

    #[test]
    fn a_sweep_removes_empty_leftover_cgroups_and_keeps_those_in_use() {
        let Some(root) = writable_cgroup2() else {
            return;
        };
        let parent = root.join(format!("capsid-sweep-test-{}", std::process::id()));
        let (left, busy) = (parent.join("vm-left"), parent.join("vm-busy"));
        for dir in [&parent, &left, &busy] {
            std::fs::create_dir(dir).unwrap();
        }
        let mut sleeper = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string()).unwrap();

        // Too young: nothing goes.
        assert!(sweep_cgroups(&parent, LEFTOVER_AGE).is_empty());
        assert!(left.is_dir());
        // Old enough: the empty one goes, the one with a process stays.
        assert_eq!(
            sweep_cgroups(&parent, Duration::ZERO),
            std::slice::from_ref(&left)
        );
        assert!(!left.exists() && busy.is_dir());

        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        remove_cgroup(&busy);
        remove_cgroup(&parent);
        assert!(!parent.exists());
        assert!(
            sweep_cgroups(&parent, Duration::ZERO).is_empty(),
            "a missing parent sweeps nothing"
        );
    }

    #[test]
    fn each_vm_gets_a_user_of_its_own_unless_configured() {
        let auto = Confinement::default();
        let a = vm_user(&auto, Path::new("/run/capsid/vm-a"));
        let b = vm_user(&auto, Path::new("/run/capsid/vm-b"));
        assert_ne!(a, b);
        assert!(a.0 >= VM_UID_BASE && a.0 < VM_UID_BASE + VM_UID_SPAN);
        assert_eq!(a, vm_user(&auto, Path::new("/run/capsid/vm-a")));
        let fixed = Confinement {
            uid: Some(5000),
            gid: Some(6000),
            ..Confinement::default()
        };
        assert_eq!(vm_user(&fixed, Path::new("/x")), (5000, 6000));
    }

    #[test]
    fn untrusted_files_are_not_followed_or_read_when_not_regular() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "host secret").unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(untrusted_tail(&link, 100).is_empty());
        let fifo = dir.path().join("vmm.log");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(untrusted_tail(&fifo, 100).is_empty(), "a FIFO is not read");
        let log = dir.path().join("real.log");
        std::fs::write(&log, "0123456789").unwrap();
        assert_eq!(untrusted_tail(&log, 4), b"6789");
    }

    #[test]
    fn cgroup_names_are_safe_path_components() {
        let name = cgroup_name(Path::new("/tmp/capsid-run-a.b/c d"));
        assert!(name.starts_with("c_d-"), "{name}");
        assert!(!name.contains('/'));
    }
}
