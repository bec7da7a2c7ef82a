//! Conversions at the shim's boundary: containerd's OCI bundle and exec
//! specs into what the agent takes, and the agent's stats into containerd's
//! cgroup v2 metrics.
//!
//! The agent applies a spec inside the guest, so anything in it that names
//! a host resource must be dealt with here. A bind mount's source is a host
//! path: the guest cannot see it, and passing it through would bind
//! whatever the guest has at that path. Such mounts are refused with the
//! reason; `disk:ID` sources (guest disks) pass.

use cocoon_protocol::ContainerStats;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use oci_spec::runtime::{Process, Spec};

#[derive(Debug, thiserror::Error)]
pub enum TransError {
    #[error(
        "mount at {destination}: host bind mounts are not supported ({host_path} is on the host; \
         a micro-VM shares no file system with it)"
    )]
    HostBind {
        destination: String,
        host_path: String,
    },
    #[error("the exec spec is not an OCI process")]
    ExecSpec(#[source] serde_json::Error),
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
pub fn container_spec(mut spec: Spec) -> Result<Spec, TransError> {
    if let Some(mounts) = spec.mounts() {
        for mount in mounts {
            let source = mount
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if is_bind(mount) && !source.starts_with("disk:") {
                return Err(TransError::HostBind {
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

/// An exec's process spec, as containerd sends it (JSON in an Any).
pub fn exec_spec(value: &[u8]) -> Result<Process, TransError> {
    serde_json::from_slice(value).map_err(TransError::ExecSpec)
}

/// The agent's stats as containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn metrics(stats: &ContainerStats) -> Metrics {
    let mut metrics = Metrics::new();
    let mut pids = PidsStat::new();
    pids.current = stats.pids_current;
    metrics.pids = Some(pids).into();
    let mut cpu = CPUStat::new();
    cpu.usage_usec = stats.cpu_usage_usec;
    metrics.cpu = Some(cpu).into();
    let mut memory = MemoryStat::new();
    memory.usage = stats.memory_current_bytes;
    memory.usage_limit = stats.memory_limit_bytes.unwrap_or(u64::MAX);
    memory.max_usage = stats.memory_peak_bytes;
    metrics.memory = Some(memory).into();
    let mut events = MemoryEvents::new();
    events.oom_kill = stats.oom_kills;
    metrics.memory_events = Some(events).into();
    metrics
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

    #[test]
    fn exec_specs_parse_or_say_why() {
        let process = exec_spec(br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(process.args().as_deref(), Some(&["sh".to_owned()][..]));
        assert!(exec_spec(b"{not json").is_err());
    }

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let metrics = metrics(&ContainerStats {
            memory_current_bytes: 10,
            memory_limit_bytes: None,
            memory_peak_bytes: 20,
            oom_kills: 1,
            pids_current: 3,
            cpu_usage_usec: 99,
        });
        assert_eq!(metrics.pids.current, 3);
        assert_eq!(metrics.memory.usage_limit, u64::MAX);
        assert_eq!(metrics.memory_events.oom_kill, 1);
        assert_eq!(metrics.cpu.usage_usec, 99);
    }
}
