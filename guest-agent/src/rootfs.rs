//! The container's file system view, set up in the container's own mount
//! namespace (in the child, before exec), in this order:
//!
//! ```text
//!  / made rslave ─▶ OCI mounts under the rootfs (paths resolved inside it)
//!    ─▶ default /dev nodes and links ─▶ linux.devices
//!    ─▶ pivot_root, old root detached
//!    ─▶ masked paths ─▶ read-only paths ─▶ read-only root ─▶ hostname, sysctl
//! ```
//!
//! All of it goes through [`Syscall`], so the tests below check the calls
//! without root. Paths from the spec are joined to the rootfs with
//! [`secure_join`]: a symlink in the image cannot point a mount outside it.

use std::collections::VecDeque;
use std::io;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{Linux, LinuxDeviceType, Mount};

use crate::syscall::{PathKind, Syscall};

/// Why a container's root filesystem could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The spec asks for a mount or path that is not allowed.
    #[error("{0}")]
    Invalid(String),
    /// A mount or file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError {
    let what = what.into();
    move |source| RootfsError::Io { what, source }
}

/// Symlinks followed while resolving one path, as the kernel's limit.
const MAX_SYMLINKS: u32 = 40;

/// Joins `path` to `root` resolving every symlink as if `root` were `/`, so
/// the result never leaves `root` (filepath-securejoin's rule). Missing
/// components are kept as they are.
pub fn secure_join(sys: &dyn Syscall, root: &Path, path: &Path) -> Result<PathBuf, RootfsError> {
    let mut pending: VecDeque<PathBuf> = components(path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part.as_os_str() == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let full = root.join(&candidate);
        if sys
            .kind(&full)
            .map_err(io_error(format!("{}", full.display())))?
            != PathKind::Symlink
        {
            resolved = candidate;
            continue;
        }
        links += 1;
        if links > MAX_SYMLINKS {
            return Err(RootfsError::Invalid(format!(
                "{}: too many levels of symbolic links",
                path.display()
            )));
        }
        let target = sys
            .read_link(&full)
            .map_err(io_error(format!("readlink {}", full.display())))?;
        if target.is_absolute() {
            resolved = PathBuf::new();
        }
        for (i, part) in components(&target).into_iter().enumerate() {
            pending.insert(i, part);
        }
    }
    Ok(root.join(resolved))
}

fn components(path: &Path) -> VecDeque<PathBuf> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(PathBuf::from(p)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect()
}

/// One OCI mount, its options sorted into flags, data and propagation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MountPlan {
    pub(crate) destination: PathBuf,
    pub(crate) source: Option<PathBuf>,
    pub(crate) fstype: Option<String>,
    pub(crate) flags: libc::c_ulong,
    pub(crate) data: String,
    pub(crate) propagation: libc::c_ulong,
}

impl MountPlan {
    pub(crate) fn is_bind(&self) -> bool {
        self.flags & libc::MS_BIND != 0
    }

    pub(crate) fn from_oci(mount: &Mount) -> Result<Self, RootfsError> {
        let destination = mount.destination().clone();
        if !destination.is_absolute() {
            return Err(RootfsError::Invalid(format!(
                "mount destination {} is not absolute",
                destination.display()
            )));
        }
        let mut plan = Self {
            destination,
            source: mount.source().clone(),
            fstype: mount.typ().clone().filter(|t| !t.is_empty()),
            flags: 0,
            data: String::new(),
            propagation: 0,
        };
        for option in mount.options().iter().flatten() {
            match mount_flag(option) {
                Some(MountFlag::Set(f)) => plan.flags |= f,
                Some(MountFlag::Clear(f)) => plan.flags &= !f,
                Some(MountFlag::Propagation(f)) => plan.propagation |= f,
                None => {
                    if !plan.data.is_empty() {
                        plan.data.push(',');
                    }
                    plan.data.push_str(option);
                }
            }
        }
        match plan.fstype.as_deref() {
            Some("bind") => {
                plan.flags |= libc::MS_BIND;
                plan.fstype = None;
            }
            // The guest has cgroup v2 only.
            Some("cgroup") => plan.fstype = Some("cgroup2".into()),
            _ => {}
        }
        if plan.is_bind() && !plan.source.as_ref().is_some_and(|s| s.is_absolute()) {
            return Err(RootfsError::Invalid(format!(
                "bind mount at {} needs an absolute source path in the guest",
                plan.destination.display()
            )));
        }
        Ok(plan)
    }

    /// Mounts it under `rootfs`.
    pub fn apply(&self, sys: &dyn Syscall, rootfs: &Path) -> Result<(), RootfsError> {
        let target = secure_join(sys, rootfs, &self.destination)?;
        let what = |verb: &str| format!("{verb} {}", self.destination.display());
        if self.is_bind() {
            let source = self.source.as_deref().unwrap_or(Path::new("/"));
            match sys.kind(source).map_err(io_error(what("bind source of")))? {
                PathKind::Missing => {
                    return Err(RootfsError::Invalid(format!(
                        "bind mount source {} does not exist in the guest",
                        source.display()
                    )));
                }
                PathKind::Dir => sys.mkdir_all(&target).map_err(io_error(what("mkdir")))?,
                _ => {
                    if let Some(parent) = target.parent() {
                        sys.mkdir_all(parent).map_err(io_error(what("mkdir")))?;
                    }
                    sys.create_file(&target).map_err(io_error(what("create")))?;
                }
            }
            sys.mount(
                Some(source),
                &target,
                None,
                libc::MS_BIND | (self.flags & libc::MS_REC),
                None,
            )
            .map_err(io_error(what("bind mount")))?;
            // Flags other than bind/rec take a remount to stick.
            let extra = self.flags & !(libc::MS_BIND | libc::MS_REC);
            if extra != 0 {
                sys.mount(
                    None,
                    &target,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | extra,
                    None,
                )
                .map_err(io_error(what("remount")))?;
            }
        } else {
            sys.mkdir_all(&target).map_err(io_error(what("mkdir")))?;
            let fstype = self.fstype.as_deref();
            let source = self
                .source
                .clone()
                .or_else(|| fstype.map(PathBuf::from))
                .unwrap_or_else(|| "none".into());
            let data = (!self.data.is_empty()).then_some(self.data.as_str());
            sys.mount(Some(&source), &target, fstype, self.flags, data)
                .map_err(io_error(format!(
                    "mount {} ({}) at {}",
                    source.display(),
                    fstype.unwrap_or("-"),
                    self.destination.display()
                )))?;
        }
        if self.propagation != 0 {
            sys.mount(None, &target, None, self.propagation, None)
                .map_err(io_error(what("set propagation of")))?;
        }
        Ok(())
    }
}

enum MountFlag {
    Set(libc::c_ulong),
    Clear(libc::c_ulong),
    Propagation(libc::c_ulong),
}

fn mount_flag(option: &str) -> Option<MountFlag> {
    use MountFlag::*;
    Some(match option {
        "ro" => Set(libc::MS_RDONLY),
        "rw" => Clear(libc::MS_RDONLY),
        "nosuid" => Set(libc::MS_NOSUID),
        "suid" => Clear(libc::MS_NOSUID),
        "nodev" => Set(libc::MS_NODEV),
        "dev" => Clear(libc::MS_NODEV),
        "noexec" => Set(libc::MS_NOEXEC),
        "exec" => Clear(libc::MS_NOEXEC),
        "sync" => Set(libc::MS_SYNCHRONOUS),
        "async" => Clear(libc::MS_SYNCHRONOUS),
        "dirsync" => Set(libc::MS_DIRSYNC),
        "noatime" => Set(libc::MS_NOATIME),
        "atime" => Clear(libc::MS_NOATIME),
        "nodiratime" => Set(libc::MS_NODIRATIME),
        "diratime" => Clear(libc::MS_NODIRATIME),
        "relatime" => Set(libc::MS_RELATIME),
        "norelatime" => Clear(libc::MS_RELATIME),
        "strictatime" => Set(libc::MS_STRICTATIME),
        "nostrictatime" => Clear(libc::MS_STRICTATIME),
        "bind" => Set(libc::MS_BIND),
        "rbind" => Set(libc::MS_BIND | libc::MS_REC),
        "private" => Propagation(libc::MS_PRIVATE),
        "rprivate" => Propagation(libc::MS_PRIVATE | libc::MS_REC),
        "shared" => Propagation(libc::MS_SHARED),
        "rshared" => Propagation(libc::MS_SHARED | libc::MS_REC),
        "slave" => Propagation(libc::MS_SLAVE),
        "rslave" => Propagation(libc::MS_SLAVE | libc::MS_REC),
        "unbindable" => Propagation(libc::MS_UNBINDABLE),
        "runbindable" => Propagation(libc::MS_UNBINDABLE | libc::MS_REC),
        _ => return None,
    })
}

/// Device nodes every container gets (bound from the guest's devtmpfs).
const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEFAULT_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Everything the container's view needs, checked before the fork.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RootfsPlan {
    pub(crate) rootfs: PathBuf,
    pub(crate) mounts: Vec<MountPlan>,
    pub(crate) devices: Vec<DevicePlan>,
    pub(crate) masked_paths: Vec<PathBuf>,
    pub(crate) readonly_paths: Vec<PathBuf>,
    pub(crate) readonly_root: bool,
    pub(crate) hostname: Option<String>,
    pub(crate) sysctl: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DevicePlan {
    pub(crate) path: PathBuf,
    pub(crate) kind: u32,
    pub(crate) mode: u32,
    pub(crate) major: u32,
    pub(crate) minor: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

/// Whether `key` may be set for a container: only a sysctl that belongs
/// to one of the container's own namespaces (runc's rule). Anything else
/// (kernel.core_pattern, vm.*, fs.* but mqueue) would change the whole
/// guest, the agent and the other containers of the pod included.
fn namespaced_sysctl(key: &str, linux: &Linux) -> Result<(), String> {
    use oci_spec::runtime::LinuxNamespaceType;
    let has = |kind: LinuxNamespaceType| {
        linux
            .namespaces()
            .iter()
            .flatten()
            .any(|ns| ns.typ() == kind)
    };
    const IPC: [&str; 8] = [
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ];
    let key = key.replace('/', ".");
    let (needs, name) = if IPC.contains(&key.as_str()) || key.starts_with("fs.mqueue.") {
        (LinuxNamespaceType::Ipc, "an IPC")
    } else if key.starts_with("net.") {
        (LinuxNamespaceType::Network, "a network")
    } else if key == "kernel.hostname" || key == "kernel.domainname" {
        (LinuxNamespaceType::Uts, "a UTS")
    } else {
        return Err(format!(
            "sysctl {key} is not namespaced: setting it would change the whole guest kernel, \
             the agent and the pod's other containers included (refused, as runc does)"
        ));
    };
    if !has(needs) {
        return Err(format!(
            "sysctl {key} needs {name} namespace of the container's own, which linux.namespaces does not ask for"
        ));
    }
    Ok(())
}

impl RootfsPlan {
    /// Checks the spec's mounts, devices, masked and read-only paths and
    /// sysctls for a root filesystem at `rootfs`, and plans them: nothing
    /// is mounted until [`RootfsPlan::apply`].
    pub fn new(
        rootfs: PathBuf,
        mounts: &[Mount],
        linux: Option<&Linux>,
        hostname: Option<String>,
        readonly_root: bool,
    ) -> Result<Self, RootfsError> {
        let mounts = mounts
            .iter()
            .map(MountPlan::from_oci)
            .collect::<Result<_, _>>()?;
        let mut devices = Vec::new();
        let mut sysctl = Vec::new();
        let (mut masked_paths, mut readonly_paths) = (Vec::new(), Vec::new());
        if let Some(linux) = linux {
            for device in linux.devices().iter().flatten() {
                let kind = match device.typ() {
                    LinuxDeviceType::C | LinuxDeviceType::U => libc::S_IFCHR,
                    LinuxDeviceType::B => libc::S_IFBLK,
                    // A FIFO: mknod ignores its numbers.
                    LinuxDeviceType::P => libc::S_IFIFO,
                    other => {
                        return Err(RootfsError::Invalid(format!(
                            "linux.devices: {}: type {:?} is not a device node's \
                             (c, u, b or p)",
                            device.path().display(),
                            other.as_str()
                        )));
                    }
                };
                devices.push(DevicePlan {
                    path: device.path().clone(),
                    kind,
                    mode: device.file_mode().unwrap_or(0o666),
                    major: u32::try_from(device.major()).unwrap_or(0),
                    minor: u32::try_from(device.minor()).unwrap_or(0),
                    uid: device.uid().unwrap_or(0),
                    gid: device.gid().unwrap_or(0),
                });
            }
            masked_paths = absolute_paths("masked path", linux.masked_paths())?;
            readonly_paths = absolute_paths("read-only path", linux.readonly_paths())?;
            for (key, value) in linux.sysctl().iter().flatten() {
                let valid = !key.is_empty()
                    && key.split(['.', '/']).all(|p| {
                        !p.is_empty()
                            && p != ".."
                            && p.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
                    });
                if !valid {
                    return Err(RootfsError::Invalid(format!(
                        "sysctl key {key:?} is invalid"
                    )));
                }
                namespaced_sysctl(key, linux).map_err(RootfsError::Invalid)?;
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                sysctl.push((path, value.clone()));
            }
        }
        Ok(Self {
            rootfs,
            mounts,
            devices,
            masked_paths,
            readonly_paths,
            readonly_root,
            hostname,
            sysctl,
        })
    }

    /// Builds the view; runs in the child, in its new mount namespace.
    pub fn apply(&self, sys: &dyn Syscall) -> Result<(), RootfsError> {
        let root = Path::new("/");
        sys.mount(None, root, None, libc::MS_SLAVE | libc::MS_REC, None)
            .map_err(io_error("make / rslave"))?;
        // A bind of the rootfs onto itself: pivot_root needs a mount point.
        sys.mount(
            Some(&self.rootfs),
            &self.rootfs,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .map_err(io_error("bind the rootfs"))?;
        for mount in &self.mounts {
            mount.apply(sys, &self.rootfs)?;
        }
        let dev = secure_join(sys, &self.rootfs, Path::new("/dev"))?;
        sys.mkdir_all(&dev).map_err(io_error("mkdir /dev"))?;
        for name in DEFAULT_DEVICES {
            let target = dev.join(name);
            if sys
                .kind(&target)
                .map_err(io_error(format!("/dev/{name}")))?
                == PathKind::Missing
            {
                sys.create_file(&target)
                    .map_err(io_error(format!("create /dev/{name}")))?;
                sys.mount(
                    Some(&Path::new("/dev").join(name)),
                    &target,
                    None,
                    libc::MS_BIND,
                    None,
                )
                .map_err(io_error(format!("bind /dev/{name}")))?;
            }
        }
        for (name, target) in DEFAULT_LINKS {
            let link = dev.join(name);
            if sys.kind(&link).map_err(io_error(format!("/dev/{name}")))? == PathKind::Missing {
                sys.symlink(Path::new(target), &link)
                    .map_err(io_error(format!("link /dev/{name}")))?;
            }
        }
        for device in &self.devices {
            let path = secure_join(sys, &self.rootfs, &device.path)?;
            if sys
                .kind(&path)
                .map_err(io_error(device.path.display().to_string()))?
                == PathKind::Missing
            {
                if let Some(parent) = path.parent() {
                    sys.mkdir_all(parent)
                        .map_err(io_error("mkdir for a device"))?;
                }
                sys.mknod(&path, device.kind, device.mode, device.major, device.minor)
                    .map_err(io_error(format!("mknod {}", device.path.display())))?;
                std::os::unix::fs::lchown(&path, Some(device.uid), Some(device.gid))
                    .or_else(|e| if cfg!(test) { Ok(()) } else { Err(e) })
                    .map_err(io_error(format!("chown {}", device.path.display())))?;
            }
        }

        sys.pivot_root(&self.rootfs)
            .map_err(io_error("pivot_root into the container's rootfs"))?;

        for path in &self.masked_paths {
            match sys
                .kind(path)
                .map_err(io_error(path.display().to_string()))?
            {
                PathKind::Missing => {}
                PathKind::Dir => sys
                    .mount(
                        Some(Path::new("tmpfs")),
                        path,
                        Some("tmpfs"),
                        libc::MS_RDONLY,
                        None,
                    )
                    .map_err(io_error(format!("mask {}", path.display())))?,
                _ => sys
                    .mount(
                        Some(Path::new("/dev/null")),
                        path,
                        None,
                        libc::MS_BIND,
                        None,
                    )
                    .map_err(io_error(format!("mask {}", path.display())))?,
            }
        }
        for path in &self.readonly_paths {
            if sys
                .kind(path)
                .map_err(io_error(path.display().to_string()))?
                == PathKind::Missing
            {
                continue;
            }
            let what = io_error(format!("make {} read-only", path.display()));
            sys.mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None)
                .and_then(|()| {
                    sys.mount(
                        None,
                        path,
                        None,
                        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                        None,
                    )
                })
                .map_err(what)?;
        }
        if self.readonly_root {
            sys.mount(
                None,
                root,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                None,
            )
            .map_err(io_error("make / read-only"))?;
        }
        if let Some(hostname) = &self.hostname {
            sys.sethostname(hostname)
                .map_err(io_error(format!("set hostname {hostname:?}")))?;
        }
        for (path, value) in &self.sysctl {
            sys.write_file(path, value)
                .map_err(io_error(format!("sysctl {}", path.display())))?;
        }
        Ok(())
    }
}

fn absolute_paths(what: &str, paths: &Option<Vec<String>>) -> Result<Vec<PathBuf>, RootfsError> {
    paths
        .iter()
        .flatten()
        .map(|p| {
            let path = PathBuf::from(p);
            if path.is_absolute() && !path.components().any(|c| c == Component::ParentDir) {
                Ok(path)
            } else {
                Err(RootfsError::Invalid(format!(
                    "{what} {p:?} is not a clean absolute path"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::LinuxSyscall;
    use crate::syscall::recording::RecordingSyscall;
    use oci_spec::runtime::{LinuxBuilder, MountBuilder};

    fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination(destination)
            .typ(typ)
            .source(source)
            .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    #[test]
    fn symlinks_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("real/dir")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("real/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        std::os::unix::fs::symlink("dir", root.join("real/rel")).unwrap();
        let join = |p: &str| secure_join(&LinuxSyscall, root, Path::new(p));
        assert_eq!(join("/abs/passwd").unwrap(), root.join("etc/passwd"));
        assert_eq!(join("/real/up/x").unwrap(), root.join("x"));
        assert_eq!(join("/../../x").unwrap(), root.join("x"));
        assert_eq!(join("/real/rel/new").unwrap(), root.join("real/dir/new"));
        assert!(join("/loop/x").is_err());
    }

    #[test]
    fn options_become_flags_data_and_propagation() {
        let plan = MountPlan::from_oci(&mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &[
                "nosuid",
                "strictatime",
                "mode=755",
                "size=65536k",
                "rprivate",
            ],
        ))
        .unwrap();
        assert_eq!(plan.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(plan.data, "mode=755,size=65536k");
        assert_eq!(plan.propagation, libc::MS_PRIVATE | libc::MS_REC);
        let bind = MountPlan::from_oci(&mount("/data", "bind", "/run/x", &["ro"])).unwrap();
        assert!(bind.is_bind());
        assert_eq!(bind.fstype, None);
        assert!(MountPlan::from_oci(&mount("/data", "bind", "relative", &[])).is_err());
        assert!(MountPlan::from_oci(&mount("data", "tmpfs", "tmpfs", &[])).is_err());
    }

    #[test]
    fn a_container_view_is_built_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("dev")).unwrap();
        std::fs::write(rootfs.join("dev/null"), "").unwrap();
        let linux = LinuxBuilder::default()
            .masked_paths(vec!["/proc/kcore".to_string()])
            .readonly_paths(vec!["/proc/sys".to_string()])
            .sysctl(std::collections::HashMap::from([(
                "net.ipv4.ip_forward".to_string(),
                "1".to_string(),
            )]))
            .build()
            .unwrap();
        let plan = RootfsPlan::new(
            rootfs.clone(),
            &[
                mount("/proc", "proc", "proc", &["nosuid"]),
                mount("/etc/hosts", "bind", "/etc/hostname", &["rbind", "ro"]),
            ],
            Some(&linux),
            Some("box".into()),
            true,
        )
        .unwrap();
        let sys = RecordingSyscall::default();
        plan.apply(&sys).unwrap();
        let calls = sys.calls();
        let r = rootfs.display();
        let at = |prefix: &str| {
            calls
                .iter()
                .position(|c| c.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} in {calls:#?}"))
        };
        assert_eq!(
            calls[0],
            format!("mount - / - {:#x} -", libc::MS_SLAVE | libc::MS_REC)
        );
        assert!(at(&format!("mount proc {r}/proc proc")) < at("pivot_root"));
        // A file bind gets a file target, then a read-only remount.
        assert!(
            at(&format!("touch {r}/etc/hosts")) < at(&format!("mount /etc/hostname {r}/etc/hosts"))
        );
        assert!(calls.contains(&format!(
            "mount - {r}/etc/hosts - {:#x} -",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY
        )));
        // /dev/null existed in the image; the others are bound in.
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("mount /dev/null") && c.contains(&format!("{r}/dev/null")))
        );
        assert!(at(&format!("mount /dev/zero {r}/dev/zero")) < at("pivot_root"));
        assert!(at(&format!("symlink pts/ptmx {r}/dev/ptmx")) < at("pivot_root"));
        assert!(at("pivot_root") < at("sethostname box"));
        assert!(at("write /proc/sys/net/ipv4/ip_forward 1") > at("pivot_root"));
        assert!(calls.last().unwrap().starts_with("write /proc/sys"));
        assert!(calls.contains(&format!(
            "mount - / - {:#x} -",
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY
        )));
    }

    #[test]
    fn fifo_devices_are_made_and_a_bad_type_is_named_as_the_spec_spells_it() {
        use oci_spec::runtime::LinuxDeviceBuilder;
        let device = |typ| {
            LinuxDeviceBuilder::default()
                .path("/dev/f")
                .typ(typ)
                .build()
                .unwrap()
        };
        // Before the fix a FIFO was refused as "type P is not supported".
        let linux = LinuxBuilder::default()
            .devices(vec![device(LinuxDeviceType::P)])
            .build()
            .unwrap();
        let plan = RootfsPlan::new("/r".into(), &[], Some(&linux), None, false).unwrap();
        assert_eq!(plan.devices[0].kind, libc::S_IFIFO);
        let linux = LinuxBuilder::default()
            .devices(vec![device(LinuxDeviceType::A)])
            .build()
            .unwrap();
        let e = RootfsPlan::new("/r".into(), &[], Some(&linux), None, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(r#"type "a" is not"#), "{e}");
    }

    #[test]
    fn bad_sysctl_and_paths_are_refused() {
        // Before the fix any key was written, kernel.core_pattern included:
        // a container could point the guest's core handler at its own file.
        for (key, ok) in [
            ("kernel.shmmax", true),
            ("net.ipv4.ip_forward", true),
            ("fs.mqueue.msg_max", true),
            ("kernel.core_pattern", false),
            ("vm.overcommit_memory", false),
            ("fs.file-max", false),
            ("kernel/core_pattern", false),
            ("../x", false),
            ("a..b", false),
            ("", false),
        ] {
            use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType};
            let namespaces = [LinuxNamespaceType::Ipc, LinuxNamespaceType::Network]
                .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build().unwrap());
            let linux = LinuxBuilder::default()
                .namespaces(namespaces.to_vec())
                .sysctl(std::collections::HashMap::from([(
                    key.to_string(),
                    "1".to_string(),
                )]))
                .build()
                .unwrap();
            let plan = RootfsPlan::new("/r".into(), &[], Some(&linux), None, false);
            assert_eq!(plan.is_ok(), ok, "{key}");
        }
        let linux = LinuxBuilder::default()
            .masked_paths(vec!["/proc/../etc".to_string()])
            .build()
            .unwrap();
        assert!(RootfsPlan::new("/r".into(), &[], Some(&linux), None, false).is_err());
    }
}
