//! The bundle's OCI spec as the agent should apply it inside the guest.
//!
//! The agent applies a spec inside the guest, so anything in it that names
//! a host resource must be dealt with on the host. A bind mount's source is
//! a host path: the guest cannot see it, and passing it through would bind
//! whatever the guest has at that path. So:
//!
//! ```text
//!  bind of a small host file (CRI's /etc/hosts, resolv.conf, hostname)
//!      ─▶ its contents go along (CreateContainer.files), source `file:N`
//!  bind of an empty host tmpfs at /dev/shm (CRI's pod shm, docker's)
//!      ─▶ a tmpfs of the same size in the guest
//!  bind of a small host directory (a Kubernetes volume: a secret, a
//!  config map, the service account token, an emptyDir)
//!      ─▶ a tar of it goes along, source `tree:N`; the agent unpacks it
//!  bind of `disk:ID` (a disk of the VM)              ─▶ as it is
//!  bind of anything else, or too much to copy         ─▶ refused, with why
//! ```
//!
//! A directory is walked by descriptor, each name opened relative to its
//! parent without following a link, so a directory someone else can write
//! (a hostPath volume) cannot swap in a link to a host file between the
//! look and the read; links are copied as links, sockets, FIFOs and
//! devices refused, set-id bits dropped.
//!
//! Each container of a pod gets a /dev/shm of its own that way: POSIX
//! shared memory is not shared between the containers of a pod, as it is
//! under runc.
//!
//! The copy is one-way, taken at create: the host does not see what the
//! container writes there, the container does not see what changes on the
//! host later (a config map's update, a rotated token), and each container
//! has a copy of its own (an emptyDir is not shared between a pod's
//! containers). Hooks name host programs and never reach the guest
//! (capsid's OCI verbs run the host's, `hooks.rs`).

use capsid_protocol::{
    FILE_SOURCE, MAX_COPIED_BYTES, MAX_COPIED_FILES, MAX_TREE_ENTRIES, SharedNamespace,
    SharedNamespaces, TREE_SOURCE,
};
use oci_spec::runtime::Spec;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The largest `config.json` read (runc's example is 6 KiB; Kubernetes'
/// are tens of KiB).
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// A bundle's `config.json` that cannot be read as an OCI runtime spec.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Read(std::path::PathBuf, #[source] std::io::Error),
    /// It is larger than [`MAX_CONFIG_BYTES`].
    #[error("{0} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge(std::path::PathBuf),
    /// A value the spec does not allow, named by where it is.
    #[error("{file}: {field}: {problem}")]
    Invalid {
        /// The file.
        file: std::path::PathBuf,
        /// Where in it (`process.capabilities.bounding[2]`), or `.` for the
        /// document itself.
        field: String,
        /// What is wrong there.
        problem: String,
    },
}

/// Reads a bundle's `config.json` (`path`): a value the spec does not
/// allow is named by the field it is in (`process.capabilities.bounding[2]:
/// unknown variant CAP_TEST`), not only by a line and column.
pub fn load(path: &Path) -> Result<Spec, LoadError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read = |e| LoadError::Read(path.to_owned(), e);
    // Not blocking on a FIFO put there; then only a regular file is read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(read)?;
    if !file.metadata().map_err(read)?.is_file() {
        return Err(read(std::io::Error::other("not a regular file")));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(LoadError::TooLarge(path.to_owned()));
    }
    let mut document = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut document).map_err(|e| {
        let field = e.path().to_string();
        let problem = e.inner().to_string();
        LoadError::Invalid {
            file: path.to_owned(),
            field,
            problem,
        }
    })
}

/// A part of the bundle's spec the guest cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A namespace joined by path that is not the pod's sandbox's.
    #[error(
        "linux.namespaces: the {kind} namespace at {path} is not the pod's: a container in a \
         micro-VM shares namespaces only with its pod's sandbox (/proc/{sandbox_pid}/ns/{kind})"
    )]
    ForeignNamespace {
        /// ipc, uts or pid.
        kind: &'static str,
        /// The path the spec names.
        path: String,
        /// The pid the sandbox's namespaces are named by (its VMM's).
        sandbox_pid: u32,
    },
    /// A bind mount of a host directory (the VM shares no file system).
    #[error(
        "mount at {destination}: host bind mounts are not supported ({host_path} is on the host; \
         a micro-VM shares no file system with it)"
    )]
    HostBind {
        /// Where it would be mounted in the container.
        destination: String,
        /// The host path.
        host_path: String,
    },
    /// A host file to copy in (what CRI binds) that cannot be.
    #[error("mount at {destination}: cannot copy {host_path} into the micro-VM: {reason}")]
    Copy {
        /// Where it would be mounted in the container.
        destination: String,
        /// The host path.
        host_path: String,
        /// Why not (too large, too many, unreadable).
        reason: String,
    },
}

fn is_bind(mount: &oci_spec::runtime::Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The container's root in the bundle, as the spec names it (runc's
/// default: `rootfs`).
pub fn root_path(spec: &Spec) -> std::path::PathBuf {
    spec.root()
        .as_ref()
        .map_or_else(|| "rootfs".into(), |r| r.path().clone())
}

/// The network namespace the spec joins by path (what CRI, CNI, Docker
/// and Podman give a pod or container): its interfaces become the VM's.
/// A spec that asks for a new namespace, or none, gets no network device.
pub fn network_namespace(spec: &Spec) -> Option<std::path::PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// The settings of `spec` that capsid accepts and does not apply, each
/// with why, for a warning: the guest kernel has no AppArmor or SELinux.
pub fn ignored_settings(spec: &Spec) -> Vec<String> {
    let mut ignored = Vec::new();
    let set = |value: Option<&String>| value.is_some_and(|v| !v.is_empty());
    if let Some(process) = spec.process() {
        if set(process.apparmor_profile().as_ref()) {
            ignored.push("process.apparmorProfile is ignored: the guest has no AppArmor".into());
        }
        if set(process.selinux_label().as_ref()) {
            ignored.push("process.selinuxLabel is ignored: the guest has no SELinux".into());
        }
    }
    if set(spec.linux().as_ref().and_then(|l| l.mount_label().as_ref())) {
        ignored.push("linux.mountLabel is ignored: the guest has no SELinux".into());
    }
    ignored
}

/// The bundle's spec as the agent should apply it in the guest, and the
/// host files copied in for its `file:N` mounts.
pub fn container_spec(mut spec: Spec) -> Result<(Spec, Vec<Vec<u8>>), SpecError> {
    let mut files: Vec<Vec<u8>> = Vec::new();
    if let Some(mut mounts) = spec.mounts().clone() {
        for mount in &mut mounts {
            let source = mount
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !is_bind(mount) || source.starts_with("disk:") {
                continue;
            }
            let destination = mount.destination().display().to_string();
            if destination == "/dev/shm"
                && let Some(bytes) = empty_host_tmpfs_bytes(&source)
            {
                *mount = guest_shm(mount, bytes);
                continue;
            }
            let copy_error = |reason: String| SpecError::Copy {
                destination: destination.clone(),
                host_path: source.clone(),
                reason,
            };
            let used: usize = files.iter().map(Vec::len).sum();
            if files.len() >= MAX_COPIED_FILES {
                return Err(copy_error(format!(
                    "at most {MAX_COPIED_FILES} files and {} KiB in all are copied",
                    MAX_COPIED_BYTES / 1024
                )));
            }
            let mut prefix = FILE_SOURCE;
            let contents = match read_small_file(&source, MAX_COPIED_BYTES - used) {
                Ok(SmallFile::Contents(contents)) => contents,
                Ok(SmallFile::Directory) => {
                    prefix = TREE_SOURCE;
                    small_tree(Path::new(&source), MAX_COPIED_BYTES - used).map_err(copy_error)?
                }
                Ok(SmallFile::NotAFile) => {
                    return Err(SpecError::HostBind {
                        destination,
                        host_path: source,
                    });
                }
                Ok(SmallFile::TooLarge) => {
                    return Err(copy_error(format!(
                        "at most {MAX_COPIED_FILES} files and {} KiB in all are copied",
                        MAX_COPIED_BYTES / 1024
                    )));
                }
                Err(e) => return Err(copy_error(e.to_string())),
            };
            mount.set_source(Some(format!("{prefix}{}", files.len()).into()));
            files.push(contents);
        }
        spec.set_mounts(Some(mounts));
    }
    // The rootfs is the VM's disk; the bundle's path means nothing inside.
    if let Some(mut root) = spec.root().clone() {
        root.set_path("rootfs".into());
        spec.set_root(Some(root));
    }
    // Host hooks would run on the host with the container's say-so.
    spec.set_hooks(None);
    // A network namespace joined by path is the host's: its interfaces are
    // the VM's now (`crate::network`), and the container shares the VM's.
    if let Some(mut linux) = spec.linux().clone()
        && let Some(mut namespaces) = linux.namespaces().clone()
    {
        for ns in &mut namespaces {
            if ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network {
                ns.set_path(None);
            }
        }
        linux.set_namespaces(Some(namespaces));
        spec.set_linux(Some(linux));
    }
    Ok((spec, files))
}

/// The namespaces a pod's container joins by path (what CRI gives it:
/// the IPC and UTS namespaces of its pod's sandbox, and its PID namespace
/// when the pod shares one), taken out of `spec` and named for the agent,
/// which joins the sandbox container's in the guest. The sandbox's are
/// named by `/proc/PID/ns/KIND`, PID being what the shim reported for it
/// (its VMM's); any other path is refused.
pub fn pod_namespaces(
    spec: &mut Spec,
    sandbox_id: &str,
    sandbox_pid: u32,
) -> Result<Option<SharedNamespaces>, SpecError> {
    use oci_spec::runtime::LinuxNamespaceType;
    let Some(mut linux) = spec.linux().clone() else {
        return Ok(None);
    };
    let Some(namespaces) = linux.namespaces().clone() else {
        return Ok(None);
    };
    let mut kinds = Vec::new();
    let mut kept = Vec::new();
    for ns in namespaces {
        let (kind, name) = match ns.typ() {
            LinuxNamespaceType::Ipc => (SharedNamespace::Ipc, "ipc"),
            LinuxNamespaceType::Uts => (SharedNamespace::Uts, "uts"),
            LinuxNamespaceType::Pid => (SharedNamespace::Pid, "pid"),
            _ => {
                kept.push(ns);
                continue;
            }
        };
        let Some(path) = ns.path() else {
            kept.push(ns);
            continue;
        };
        if *path != std::path::Path::new(&format!("/proc/{sandbox_pid}/ns/{name}")) {
            return Err(SpecError::ForeignNamespace {
                kind: name,
                path: path.display().to_string(),
                sandbox_pid,
            });
        }
        kinds.push(kind);
    }
    if kinds.is_empty() {
        return Ok(None);
    }
    linux.set_namespaces(Some(kept));
    spec.set_linux(Some(linux));
    Ok(Some(SharedNamespaces {
        container: sandbox_id.to_owned(),
        kinds,
    }))
}

/// The size of the host tmpfs that directory `path` is on, if it is on
/// one and empty (what containerd's CRI and docker bind at /dev/shm).
fn empty_host_tmpfs_bytes(path: &str) -> Option<u64> {
    let c_path = std::ffi::CString::new(path).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c_path` is a NUL-terminated string and `stat` points to a
    // `statfs` the call may write; nothing else is touched.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: statfs succeeded, so it filled in `stat` (zeroed before).
    let stat = unsafe { stat.assume_init() };
    if stat.f_type != libc::TMPFS_MAGIC {
        return None;
    }
    let mut entries = std::fs::read_dir(path).ok()?;
    if entries.next().is_some() {
        return None;
    }
    let blocks = stat.f_blocks;
    let block_size = u64::try_from(stat.f_bsize).ok()?;
    Some(blocks.saturating_mul(block_size))
}

/// A tmpfs of `bytes` at `bind`'s destination in the guest, read-only and
/// with nosuid, nodev, noexec where the bind had them.
fn guest_shm(bind: &oci_spec::runtime::Mount, bytes: u64) -> oci_spec::runtime::Mount {
    let kept = ["ro", "nosuid", "nodev", "noexec"];
    let mut options: Vec<String> = bind
        .options()
        .iter()
        .flatten()
        .filter(|o| kept.contains(&o.as_str()))
        .cloned()
        .collect();
    options.push("mode=1777".into());
    options.push(format!("size={bytes}"));
    let mut shm = bind.clone();
    shm.set_typ(Some("tmpfs".into()));
    shm.set_source(Some("shm".into()));
    shm.set_options(Some(options));
    shm
}

/// What [`read_small_file`] found.
enum SmallFile {
    Contents(Vec<u8>),
    /// A directory: see [`small_tree`].
    Directory,
    /// A FIFO, a device, a socket: not copied.
    NotAFile,
    TooLarge,
}

/// How deep a copied directory may go.
const MAX_TREE_DEPTH: usize = 8;

/// The host directory at `path` as a tar of at most `max` bytes and
/// [`MAX_TREE_ENTRIES`] entries, or why it cannot be copied. See the
/// module's documentation for how it is walked.
fn small_tree(path: &Path, max: usize) -> Result<Vec<u8>, String> {
    use rustix::fs::{Mode, OFlags};
    let root = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| std::io::Error::from(e).to_string())?;
    let mut walk = TreeWalk {
        tar: tar::Builder::new(Vec::new()),
        entries: 0,
        max,
    };
    walk.directory(&root, Path::new(""), 0)?;
    let tar = walk
        .tar
        .into_inner()
        .map_err(|e| format!("cannot pack it: {e}"))?;
    if tar.len() > max {
        return Err(walk_too_large(max));
    }
    Ok(tar)
}

fn walk_too_large(max: usize) -> String {
    format!(
        "more than {MAX_TREE_ENTRIES} entries or {} KiB left of the {} KiB copied in all",
        max / 1024,
        MAX_COPIED_BYTES / 1024
    )
}

/// One directory copy in progress.
struct TreeWalk {
    tar: tar::Builder<Vec<u8>>,
    entries: usize,
    max: usize,
}

impl TreeWalk {
    /// Adds what is in the directory open as `dir` (at `at` in the copy).
    fn directory(
        &mut self,
        dir: &rustix::fd::OwnedFd,
        at: &Path,
        depth: usize,
    ) -> Result<(), String> {
        use rustix::fs::{AtFlags, FileType, Mode, OFlags};
        let io = |what: &Path, e: rustix::io::Errno| {
            format!("{}: {}", what.display(), std::io::Error::from(e))
        };
        let mut names = Vec::new();
        let listing = rustix::fs::Dir::read_from(dir).map_err(|e| io(at, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| io(at, e))?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(entry.file_name().to_owned());
            }
            if names.len() > MAX_TREE_ENTRIES {
                return Err(walk_too_large(self.max));
            }
        }
        names.sort();
        for name in names {
            self.entries += 1;
            if self.entries > MAX_TREE_ENTRIES || self.tar.get_ref().len() > self.max {
                return Err(walk_too_large(self.max));
            }
            let path = at.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
            let stat = rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io(&path, e))?;
            let mut header = tar::Header::new_gnu();
            // The mode without set-id bits; the owner as on the host (a
            // pod's fsGroup); no time.
            header.set_mode(stat.st_mode & 0o1777);
            header.set_uid(u64::from(stat.st_uid));
            header.set_gid(u64::from(stat.st_gid));
            header.set_mtime(0);
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory => {
                    if depth >= MAX_TREE_DEPTH {
                        return Err(format!(
                            "{}: more than {MAX_TREE_DEPTH} directories deep",
                            path.display()
                        ));
                    }
                    let sub = rustix::fs::openat(
                        dir,
                        &name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io(&path, e))?;
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_size(0);
                    self.tar
                        .append_data(&mut header, &path, std::io::empty())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    self.directory(&sub, &path, depth + 1)?;
                }
                FileType::RegularFile => {
                    let file = rustix::fs::openat(
                        dir,
                        &name,
                        OFlags::RDONLY
                            | OFlags::NOFOLLOW
                            | OFlags::NONBLOCK
                            | OFlags::NOCTTY
                            | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| io(&path, e))?;
                    // What is read is what was opened: still a file, and
                    // no more than the room left.
                    let room = self.max.saturating_sub(self.tar.get_ref().len());
                    let contents = match read_bounded(std::fs::File::from(file), room) {
                        Ok(SmallFile::Contents(contents)) => contents,
                        Ok(SmallFile::TooLarge) => return Err(walk_too_large(self.max)),
                        Ok(SmallFile::Directory | SmallFile::NotAFile) => {
                            return Err(format!(
                                "{}: it changed while it was copied",
                                path.display()
                            ));
                        }
                        Err(e) => return Err(format!("{}: {e}", path.display())),
                    };
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_size(contents.len() as u64);
                    self.tar
                        .append_data(&mut header, &path, contents.as_slice())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                FileType::Symlink => {
                    let target =
                        rustix::fs::readlinkat(dir, &name, Vec::new()).map_err(|e| io(&path, e))?;
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_size(0);
                    self.tar
                        .append_link(
                            &mut header,
                            &path,
                            std::ffi::OsStr::from_bytes(target.as_bytes()),
                        )
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                _ => {
                    return Err(format!(
                        "{}: a socket, FIFO or device is not copied",
                        path.display()
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads the host file at `path` if it is a regular file of at most `max`
/// bytes. What is checked is what is read: the file is opened first (a
/// FIFO without blocking), its kind and size taken from the descriptor,
/// and the read stops after `max + 1` bytes whatever the file became.
fn read_small_file(path: &str, max: usize) -> std::io::Result<SmallFile> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    read_bounded(file, max)
}

/// What the open `file` holds, read if it is a regular file of at most
/// `max` bytes: its kind and size from the descriptor, and the read
/// stopped after `max + 1` bytes whatever the file became.
fn read_bounded(file: std::fs::File, max: usize) -> std::io::Result<SmallFile> {
    use std::io::Read;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Ok(SmallFile::Directory);
    }
    if !meta.is_file() {
        return Ok(SmallFile::NotAFile);
    }
    if usize::try_from(meta.len()).map_or(true, |len| len > max) {
        return Ok(SmallFile::TooLarge);
    }
    let mut contents = Vec::new();
    file.take(u64::try_from(max).unwrap_or(u64::MAX) + 1)
        .read_to_end(&mut contents)?;
    if contents.len() > max {
        return Ok(SmallFile::TooLarge);
    }
    Ok(SmallFile::Contents(contents))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mounts: &str) -> Spec {
        serde_json::from_str(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"/run/containerd/x/rootfs"}},
                "hooks":{{"prestart":[{{"path":"/usr/bin/evil"}}]}},
                "mounts":{mounts}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn only_a_network_namespace_joined_by_path_brings_a_network() {
        let with = |namespaces: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":{namespaces}}}}}"#
            ))
            .unwrap()
        };
        let cni = with(r#"[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1"}]"#);
        assert_eq!(
            network_namespace(&cni).as_deref(),
            Some(std::path::Path::new("/var/run/netns/cni-1"))
        );
        assert_eq!(network_namespace(&with(r#"[{"type":"network"}]"#)), None);
        // The guest's spec keeps the namespace but not the host's path.
        let (guest, _) = container_spec(cni).unwrap();
        let namespaces = guest
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .clone()
            .unwrap();
        assert_eq!(namespaces.len(), 2);
        assert!(
            namespaces.iter().all(|ns| ns.path().is_none()),
            "{namespaces:?}"
        );
        assert_eq!(network_namespace(&with(r#"[{"type":"pid"}]"#)), None);
        assert_eq!(network_namespace(&spec("[]")), None);
    }

    #[test]
    fn small_host_files_are_copied_and_fifos_refused() {
        let host = tempfile::tempdir().unwrap();
        let hosts = host.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let (ok, files) = container_spec(spec(&format!(
            r#"[{{"destination":"/proc","type":"proc","source":"proc"}},
                {{"destination":"/data","type":"bind","source":"disk:data"}},
                {{"destination":"/etc/hosts","type":"bind","source":"{}","options":["rbind","ro"]}}]"#,
            hosts.display()
        )))
        .unwrap();
        assert_eq!(ok.root().as_ref().unwrap().path().to_str(), Some("rootfs"));
        assert!(ok.hooks().is_none(), "host hooks must not reach anything");
        let mounts = ok.mounts().as_ref().unwrap();
        assert_eq!(
            mounts[1].source().as_ref().unwrap().to_str(),
            Some("disk:data")
        );
        assert_eq!(
            mounts[2].source().as_ref().unwrap().to_str(),
            Some("file:0")
        );
        assert_eq!(files, vec![b"127.0.0.1 localhost\n".to_vec()]);

        // A FIFO (or a socket, a device) is neither a file nor a directory.
        let fifo = host.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let error = container_spec(spec(&format!(
            r#"[{{"destination":"/srv","type":"none","source":"{}","options":["rbind"]}}]"#,
            fifo.display()
        )))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("/srv") && error.contains("host bind mounts"),
            "{error}"
        );

        let big = host.path().join("big");
        std::fs::write(&big, vec![0u8; MAX_COPIED_BYTES + 1]).unwrap();
        let error = container_spec(spec(&format!(
            r#"[{{"destination":"/big","type":"bind","source":"{}"}}]"#,
            big.display()
        )))
        .unwrap_err()
        .to_string();
        assert!(error.contains("KiB in all"), "{error}");
    }

    /// The entries of a tar: (path, kind, mode, contents or link target).
    fn entries(tar: &[u8]) -> Vec<(String, char, u32, String)> {
        let mut archive = tar::Archive::new(tar);
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().display().to_string();
                let kind = match entry.header().entry_type() {
                    tar::EntryType::Directory => 'd',
                    tar::EntryType::Symlink => 'l',
                    tar::EntryType::Regular => 'f',
                    _ => '?',
                };
                let mode = entry.header().mode().unwrap();
                let mut text = String::new();
                if kind == 'l' {
                    text = entry.link_name().unwrap().unwrap().display().to_string();
                } else {
                    std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
                }
                (path, kind, mode, text)
            })
            .collect()
    }

    #[test]
    fn a_small_host_directory_goes_along_as_a_tar_with_its_links_and_no_set_id_bit() {
        use std::os::unix::fs::PermissionsExt;
        // A Kubernetes secret volume, as the kubelet writes one.
        let host = tempfile::tempdir().unwrap();
        let data = host.path().join("..2026_12_02_04_00_00.1");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("token"), "secret-token").unwrap();
        std::fs::write(data.join("tool"), "#!/bin/sh").unwrap();
        std::fs::set_permissions(data.join("tool"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink("..2026_12_02_04_00_00.1", host.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", host.path().join("token")).unwrap();
        // A link out is copied as a link: the host file is not read.
        std::os::unix::fs::symlink("/etc/passwd", host.path().join("passwd")).unwrap();
        let (ok, files) = container_spec(spec(&format!(
            r#"[{{"destination":"/var/run/secrets/x","type":"bind","source":"{}","options":["rbind","ro"]}}]"#,
            host.path().display()
        )))
        .unwrap();
        let mount = &ok.mounts().as_ref().unwrap()[0];
        assert_eq!(mount.source().as_ref().unwrap().to_str(), Some("tree:0"));
        assert_eq!(files.len(), 1);
        let found = entries(&files[0]);
        let names: Vec<(&str, char)> = found.iter().map(|(p, k, _, _)| (p.as_str(), *k)).collect();
        assert_eq!(
            names,
            [
                ("..2026_12_02_04_00_00.1", 'd'),
                ("..2026_12_02_04_00_00.1/token", 'f'),
                ("..2026_12_02_04_00_00.1/tool", 'f'),
                ("..data", 'l'),
                ("passwd", 'l'),
                ("token", 'l'),
            ]
        );
        assert_eq!(found[1].3, "secret-token");
        assert_eq!(found[2].2, 0o755, "the setuid bit is dropped");
        assert_eq!(found[4].3, "/etc/passwd");
        assert_eq!(found[5].3, "..data/token");

        // Too much, or something that is not a file, a directory or a link:
        // refused, naming it.
        std::fs::write(data.join("big"), vec![0u8; MAX_COPIED_BYTES]).unwrap();
        let bind = format!(
            r#"[{{"destination":"/v","type":"bind","source":"{}"}}]"#,
            host.path().display()
        );
        let error = container_spec(spec(&bind)).unwrap_err().to_string();
        assert!(error.contains("/v") && error.contains("KiB"), "{error}");
        std::fs::remove_file(data.join("big")).unwrap();
        for n in 0..=MAX_TREE_ENTRIES {
            std::fs::write(data.join(format!("f{n}")), "").unwrap();
        }
        let error = container_spec(spec(&bind)).unwrap_err().to_string();
        assert!(error.contains("entries"), "{error}");
        for n in 0..=MAX_TREE_ENTRIES {
            std::fs::remove_file(data.join(format!("f{n}"))).unwrap();
        }
        let made = std::process::Command::new("mkfifo")
            .arg(data.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        let error = container_spec(spec(&bind)).unwrap_err().to_string();
        assert!(error.contains("fifo") && error.contains("FIFO"), "{error}");
    }

    #[test]
    fn an_empty_host_tmpfs_at_dev_shm_becomes_a_guest_tmpfs_of_its_size() {
        // What containerd's CRI binds at a pod's /dev/shm: an empty tmpfs.
        // /dev/shm is a tmpfs on every Debian host.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let bind = |source: &std::path::Path| {
            spec(&format!(
                r#"[{{"destination":"/dev/shm","type":"bind","source":"{}",
                     "options":["rbind","ro","nosuid","nodev","noexec"]}}]"#,
                source.display()
            ))
        };
        let (ok, files) = container_spec(bind(shm.path())).unwrap();
        assert!(files.is_empty());
        let mount = &ok.mounts().as_ref().unwrap()[0];
        assert_eq!(mount.typ().as_deref(), Some("tmpfs"));
        assert_eq!(mount.source().as_ref().unwrap().to_str(), Some("shm"));
        let options = mount.options().as_ref().unwrap();
        for kept in ["ro", "nosuid", "nodev", "noexec", "mode=1777"] {
            assert!(options.iter().any(|o| o == kept), "{kept}: {options:?}");
        }
        let size = empty_host_tmpfs_bytes(shm.path().to_str().unwrap()).unwrap();
        assert!(size > 0);
        assert!(options.contains(&format!("size={size}")), "{options:?}");
        assert!(!options.iter().any(|o| o.contains("bind")), "{options:?}");

        // Something in it, or a directory on disk: copied, as any small
        // directory is.
        std::fs::write(shm.path().join("segment"), b"x").unwrap();
        let (copied, files) = container_spec(bind(shm.path())).unwrap();
        let mount = &copied.mounts().as_ref().unwrap()[0];
        assert_eq!(mount.source().as_ref().unwrap().to_str(), Some("tree:0"));
        assert_eq!(entries(&files[0])[0].0, "segment");
        let on_disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let (copied, files) = container_spec(bind(on_disk.path())).unwrap();
        let mount = &copied.mounts().as_ref().unwrap()[0];
        assert_eq!(mount.source().as_ref().unwrap().to_str(), Some("tree:0"));
        assert!(entries(&files[0]).is_empty());
    }

    #[test]
    fn a_pod_containers_namespaces_joined_by_path_become_its_sandboxs() {
        let member = |ipc: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"namespaces":[
                    {{"type":"mount"}},
                    {{"type":"network","path":"/var/run/netns/cni-1"}},
                    {{"type":"ipc","path":"{ipc}"}},
                    {{"type":"uts","path":"/proc/42/ns/uts"}},
                    {{"type":"pid"}}]}}}}"#
            ))
            .unwrap()
        };
        let mut spec = member("/proc/42/ns/ipc");
        let share = pod_namespaces(&mut spec, "pod", 42).unwrap().unwrap();
        assert_eq!(share.container, "pod");
        assert_eq!(share.kinds, [SharedNamespace::Ipc, SharedNamespace::Uts]);
        let left: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|ns| format!("{:?}", ns.typ()))
            .collect();
        // Its own PID namespace stays; the network is the VM's.
        assert_eq!(left, ["Mount", "Network", "Pid"]);

        let error = pod_namespaces(&mut member("/proc/1/ns/ipc"), "pod", 42)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("/proc/1/ns/ipc") && error.contains("pod's sandbox"),
            "{error}"
        );
        let mut alone = spec.clone();
        assert!(pod_namespaces(&mut alone, "pod", 42).unwrap().is_none());
    }

    #[test]
    fn settings_capsid_does_not_apply_are_named() {
        let mut spec: serde_json::Value = serde_json::to_value(Spec::default()).unwrap();
        assert!(ignored_settings(&Spec::default()).is_empty());
        spec["process"]["apparmorProfile"] = "docker-default".into();
        spec["linux"]["mountLabel"] = "system_u:object_r:container_file_t:s0".into();
        let spec: Spec = serde_json::from_value(spec).unwrap();
        let ignored = ignored_settings(&spec).join("; ");
        for field in ["process.apparmorProfile", "linux.mountLabel"] {
            assert!(ignored.contains(field), "{ignored}");
        }
        assert!(!ignored.contains("selinuxLabel"), "{ignored}");
    }

    #[test]
    fn a_bad_config_is_named_by_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut spec = serde_json::to_value(Spec::default()).unwrap();
        spec["process"]["capabilities"]["bounding"][1] = "CAP_TEST".into();
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        // Before: "serde failed: no variant for CAP_TEST (converted to
        // TEST) at line 1 column …", which named no field.
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains(": process.capabilities.bounding[1]: ") && e.contains("CAP_TEST"),
            "{e}"
        );
        std::fs::write(&path, serde_json::to_vec(&Spec::default()).unwrap()).unwrap();
        assert_eq!(load(&path).unwrap(), Spec::default());
        // A FIFO is refused, not waited on.
        let fifo = dir.path().join("fifo.json");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        assert!(load(&fifo).unwrap_err().to_string().contains("cannot read"));
    }

    #[test]
    fn what_is_read_is_what_was_checked() {
        // The old code checked the path's metadata, then read the path
        // again without bound: a FIFO or a huge file swapped in between
        // hung the shim or filled its memory. Now the checks are on the
        // opened descriptor, and the read is bounded.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let started = std::time::Instant::now();
        assert!(matches!(
            read_small_file(fifo.to_str().unwrap(), 100),
            Ok(SmallFile::NotAFile)
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let sparse = dir.path().join("sparse");
        std::fs::File::create(&sparse)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        assert!(matches!(
            read_small_file(sparse.to_str().unwrap(), 100),
            Ok(SmallFile::TooLarge)
        ));
        let small = dir.path().join("small");
        std::fs::write(&small, "ok").unwrap();
        assert!(matches!(
            read_small_file(small.to_str().unwrap(), 100),
            Ok(SmallFile::Contents(c)) if c == b"ok"
        ));
    }
}
