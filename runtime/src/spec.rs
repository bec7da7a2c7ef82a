//! The bundle's OCI spec as the agent should apply it inside the guest.
//!
//! The agent applies a spec inside the guest, so anything in it that names
//! a host resource must be dealt with on the host. A bind mount's source is
//! a host path: the guest cannot see it, and passing it through would bind
//! whatever the guest has at that path. Such mounts are refused with the
//! reason; `disk:ID` sources (guest disks) pass. Hooks name host programs
//! and are dropped.

use oci_spec::runtime::Spec;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(
        "mount at {destination}: host bind mounts are not supported ({host_path} is on the host; \
         a micro-VM shares no file system with it)"
    )]
    HostBind {
        destination: String,
        host_path: String,
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

/// The bundle's spec as the agent should apply it in the guest.
pub fn container_spec(mut spec: Spec) -> Result<Spec, SpecError> {
    if let Some(mounts) = spec.mounts() {
        for mount in mounts {
            let source = mount
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_bind(mount) && !source.starts_with("disk:") {
                return Err(SpecError::HostBind {
                    destination: mount.destination().display().to_string(),
                    host_path: source,
                });
            }
        }
    }
    // The rootfs is the VM's disk; the bundle's path means nothing inside.
    if let Some(mut root) = spec.root().clone() {
        root.set_path("rootfs".into());
        spec.set_root(Some(root));
    }
    // Host hooks would run on the host with the container's say-so.
    spec.set_hooks(None);
    Ok(spec)
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
    fn host_binds_are_refused_and_guest_things_pass() {
        let ok = container_spec(spec(
            r#"[{"destination":"/proc","type":"proc","source":"proc"},
                {"destination":"/data","type":"bind","source":"disk:data"}]"#,
        ))
        .unwrap();
        assert_eq!(ok.root().as_ref().unwrap().path().to_str(), Some("rootfs"));
        assert!(ok.hooks().is_none(), "host hooks must not reach anything");
        let error = container_spec(spec(
            r#"[{"destination":"/etc/hosts","type":"none","source":"/var/lib/x/hosts",
                 "options":["rbind","ro"]}]"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("/etc/hosts") && error.contains("/var/lib/x/hosts"),
            "{error}"
        );
    }
}
