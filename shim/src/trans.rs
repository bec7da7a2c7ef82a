//! Conversions at the shim's boundary: containerd's exec specs into what the
//! agent takes, and the agent's stats into containerd's cgroup v2 metrics.
//! (The bundle's spec goes through `capsid_runtime::spec`, which `capsid
//! create` shares.)

use capsid_protocol::ContainerStats;
use containerd_shim::protos::cgroups_v2::metrics::{
    CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use oci_spec::runtime::{LinuxResources, Process};

#[derive(Debug, thiserror::Error)]
pub enum TransError {
    #[error("the exec spec is not an OCI process")]
    ExecSpec(#[source] serde_json::Error),
    #[error("the update is not OCI Linux resources")]
    Resources(#[source] serde_json::Error),
}

/// An exec's process spec, as containerd sends it (JSON in an Any).
pub fn exec_spec(value: &[u8]) -> Result<Process, TransError> {
    serde_json::from_slice(value).map_err(TransError::ExecSpec)
}

/// An update's resources, as containerd sends them (JSON in an Any).
pub fn resources(value: &[u8]) -> Result<LinuxResources, TransError> {
    serde_json::from_slice(value).map_err(TransError::Resources)
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

    #[test]
    fn exec_specs_parse_or_say_why() {
        let process = exec_spec(br#"{"args":["sh"],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(process.args().as_deref(), Some(&["sh".to_owned()][..]));
        assert!(exec_spec(b"{not json").is_err());
    }

    #[test]
    fn updates_parse_or_say_why() {
        let update = resources(br#"{"memory":{"limit":67108864},"pids":{"limit":64}}"#).unwrap();
        assert_eq!(
            update.memory().as_ref().and_then(|m| m.limit()),
            Some(67_108_864)
        );
        assert!(resources(b"{\"memory\": 5}").is_err());
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
