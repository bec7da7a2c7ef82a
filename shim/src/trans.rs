//! Conversions at the shim's boundary: containerd's exec specs into what the
//! agent takes, and the agent's stats into containerd's cgroup v2 metrics.
//! (The bundle's spec goes through `capsid_runtime::spec`, which `capsid
//! create` shares.)

use capsid_runtime::protocol::ContainerStats;
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

/// Copies the named counters, which have the same names on both sides.
macro_rules! copy {
    ($to:expr, $from:expr; $($field:ident),* $(,)?) => {
        $($to.$field = $from.$field;)*
    };
}

/// The agent's stats as containerd's `io.containerd.cgroups.v2.Metrics`:
/// everything the guest measured, its memory the limit when the
/// container has none.
pub fn metrics(stats: &ContainerStats) -> Metrics {
    let mut metrics = Metrics::new();
    let mut pids = PidsStat::new();
    pids.current = stats.pids_current;
    pids.limit = stats.pids_limit;
    metrics.pids = Some(pids).into();
    let mut cpu = CPUStat::new();
    copy!(cpu, stats.cpu; usage_usec, user_usec, system_usec, nr_periods, nr_throttled,
        throttled_usec, nr_bursts, burst_usec);
    metrics.cpu = Some(cpu).into();
    let mut memory = MemoryStat::new();
    memory.usage = stats.memory_current_bytes;
    memory.usage_limit = stats.memory_limit_bytes;
    memory.max_usage = stats.memory_peak_bytes;
    memory.swap_usage = stats.swap_current_bytes;
    copy!(memory, stats.memory; anon, file, kernel_stack, slab, sock, shmem, file_mapped,
        file_dirty, file_writeback, anon_thp, inactive_anon, active_anon, inactive_file,
        active_file, unevictable, slab_reclaimable, slab_unreclaimable, pgfault, pgmajfault,
        workingset_refault, workingset_activate, workingset_nodereclaim, pgrefill, pgscan,
        pgsteal, pgactivate, pgdeactivate, pglazyfree, pglazyfreed, thp_fault_alloc,
        thp_collapse_alloc);
    metrics.memory = Some(memory).into();
    let mut events = MemoryEvents::new();
    copy!(events, stats.memory_events; low, high, max, oom, oom_kill, oom_group_kill);
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
    fn stats_become_cgroup_v2_metrics_with_nothing_dropped() {
        let mut stats = ContainerStats {
            memory_current_bytes: 10,
            memory_limit_bytes: 256 << 20,
            memory_peak_bytes: 20,
            pids_current: 3,
            pids_limit: 64,
            ..ContainerStats::default()
        };
        stats.cpu = capsid_runtime::protocol::CpuCounters::parse(
            "usage_usec 99\nuser_usec 60\nsystem_usec 39\nnr_throttled 2\n",
        );
        stats.memory = capsid_runtime::protocol::MemoryCounters::parse("anon 4096\nfile 8192\n");
        stats.memory_events =
            capsid_runtime::protocol::MemoryEvents::parse("max 5\noom 1\noom_kill 1\n");
        let metrics = metrics(&stats);
        assert_eq!((metrics.pids.current, metrics.pids.limit), (3, 64));
        assert_eq!(metrics.memory.usage_limit, 256 << 20);
        assert_eq!((metrics.memory.anon, metrics.memory.file), (4096, 8192));
        assert_eq!(
            (
                metrics.memory_events.max,
                metrics.memory_events.oom,
                metrics.memory_events.oom_kill
            ),
            (5, 1, 1)
        );
        assert_eq!(
            (
                metrics.cpu.usage_usec,
                metrics.cpu.user_usec,
                metrics.cpu.system_usec
            ),
            (99, 60, 39)
        );
        assert_eq!(metrics.cpu.nr_throttled, 2);
    }
}
