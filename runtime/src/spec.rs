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
//!  bind of `disk:ID` (a disk of the VM)              ─▶ as it is
//!  bind of a host directory, or too much to copy      ─▶ refused, with why
//! ```
//!
//! The copy is one-way, taken at create: the host does not see what the
//! container writes there. Hooks name host programs and are dropped.

use capsid_protocol::{FILE_SOURCE, MAX_COPIED_BYTES, MAX_COPIED_FILES};
use oci_spec::runtime::Spec;

/// A part of the bundle's spec the guest cannot be given.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
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
            let contents = match read_small_file(&source, MAX_COPIED_BYTES - used) {
                Ok(SmallFile::Contents(contents)) => contents,
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
            mount.set_source(Some(format!("{FILE_SOURCE}{}", files.len()).into()));
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

/// What [`read_small_file`] found.
enum SmallFile {
    Contents(Vec<u8>),
    /// A directory, a FIFO, a device, a socket: not copied.
    NotAFile,
    TooLarge,
}

/// Reads the host file at `path` if it is a regular file of at most `max`
/// bytes. What is checked is what is read: the file is opened first (a
/// FIFO without blocking), its kind and size taken from the descriptor,
/// and the read stops after `max + 1` bytes whatever the file became.
fn read_small_file(path: &str, max: usize) -> std::io::Result<SmallFile> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
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
    fn small_host_files_are_copied_and_directories_refused() {
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

        let error = container_spec(spec(&format!(
            r#"[{{"destination":"/srv","type":"none","source":"{}","options":["rbind"]}}]"#,
            host.path().display()
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
