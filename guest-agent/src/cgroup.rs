//! Each container's cgroup v2 in the guest, `/sys/fs/cgroup/capsid/<id>`,
//! with the limits of `linux.resources`: memory, pids, cpu. The OOM killer
//! acts inside it, so a container over its limit loses a process while the
//! agent (in the root cgroup) goes on.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsid_protocol::{ContainerStats, CpuCounters, MemoryCounters, MemoryEvents};
use oci_spec::runtime::LinuxResources;

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: &str = "+memory +pids +cpu";

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {what}")]
pub struct CgroupError {
    path: String,
    what: String,
    #[source]
    source: io::Error,
}

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

/// The guest's memory (`MemTotal` of `/proc/meminfo`), in bytes.
fn guest_memory_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// What bounds the container's memory: its `memory.max`, or the guest's
/// memory when that is "max" or larger (the VM is the limit then).
fn effective_limit(memory_max: &str, guest_memory: Option<u64>) -> u64 {
    let own = memory_max.trim().parse::<u64>().ok();
    match (own, guest_memory) {
        (Some(own), Some(guest)) => own.min(guest),
        (Some(limit), None) | (None, Some(limit)) => limit,
        (None, None) => u64::MAX,
    }
}

/// A limit in cgroup v2's words: a number, or "max".
fn limit(value: Option<i64>) -> String {
    match value {
        Some(v) if v >= 0 => v.to_string(),
        _ => "max".into(),
    }
}

/// The cgroup v1 cpu shares (2..262144) as a v2 weight (1..10000), the
/// conversion runc and crun use.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// The files and values `resources` asks for, in the order they are written.
pub fn settings(resources: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(memory) = resources.memory() {
        if let Some(max) = memory.limit() {
            out.push(("memory.max", limit(Some(max))));
        }
        if let Some(low) = memory.reservation() {
            out.push(("memory.low", limit(Some(low))));
        }
    }
    if let Some(pids) = resources.pids() {
        out.push(("pids.max", limit(Some(pids.limit()))));
    }
    if let Some(cpu) = resources.cpu() {
        if cpu.quota().is_some() || cpu.period().is_some() {
            let period = cpu.period().unwrap_or(100_000);
            out.push(("cpu.max", format!("{} {period}", limit(cpu.quota()))));
        }
        if let Some(shares) = cpu.shares() {
            out.push(("cpu.weight", shares_to_weight(shares).to_string()));
        }
    }
    out
}

/// How long a freeze or a thaw may take to complete.
pub const FREEZE_WAIT: Duration = Duration::from_secs(10);

/// `frozen` of a `cgroup.events` file, if it has one.
fn is_frozen(events: &str) -> Option<bool> {
    events.lines().find_map(|line| match line.split_once(' ') {
        Some(("frozen", "1")) => Some(true),
        Some(("frozen", "0")) => Some(false),
        _ => None,
    })
}

impl Cgroup {
    /// Makes the cgroup and applies the limits.
    pub fn create(id: &str, resources: Option<&LinuxResources>) -> Result<Self, CgroupError> {
        let parent = Path::new(ROOT).join("capsid");
        let cgroup = Self {
            path: parent.join(id),
        };
        let error = |path: &Path, what: &str| {
            let (path, what) = (path.display().to_string(), what.to_owned());
            move |source| CgroupError { path, what, source }
        };
        fs::write(Path::new(ROOT).join("cgroup.subtree_control"), CONTROLLERS)
            .map_err(error(Path::new(ROOT), "enable controllers"))?;
        match fs::create_dir(&parent) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(error(&parent, "create")(e));
            }
            _ => {}
        }
        fs::write(parent.join("cgroup.subtree_control"), CONTROLLERS)
            .map_err(error(&parent, "enable controllers"))?;
        fs::create_dir(&cgroup.path).map_err(error(&cgroup.path, "create"))?;
        for (file, value) in resources.map(settings).unwrap_or_default() {
            if let Err(e) = fs::write(cgroup.path.join(file), &value) {
                cgroup.remove();
                return Err(error(&cgroup.path, &format!("set {file} to {value}"))(e));
            }
        }
        Ok(cgroup)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes "0" to, to join.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every process in it (`cgroup.kill`, race-free).
    pub fn kill_all(&self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
    }

    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill() takes no pointers.
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    /// Writes the limits `resources` asks for; the others stay.
    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        for (file, value) in settings(resources) {
            fs::write(self.path.join(file), &value).map_err(|source| CgroupError {
                path: self.path.display().to_string(),
                what: format!("set {file} to {value}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Freezes or thaws every process in it (`cgroup.freeze`) and waits,
    /// up to [`FREEZE_WAIT`], until `cgroup.events` says it is done: a
    /// process in an uninterruptible sleep freezes only when it wakes.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let value = if frozen { "1" } else { "0" };
        let error = |what: &str| {
            let (path, what) = (self.path.display().to_string(), what.to_owned());
            move |source| CgroupError { path, what, source }
        };
        fs::write(self.path.join("cgroup.freeze"), value)
            .map_err(error(&format!("write {value} to cgroup.freeze")))?;
        let deadline = std::time::Instant::now() + FREEZE_WAIT;
        loop {
            let events = fs::read_to_string(self.path.join("cgroup.events"))
                .map_err(error("read cgroup.events"))?;
            if is_frozen(&events) == Some(frozen) {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(error(&format!(
                    "wait for cgroup.events to say frozen {value}"
                ))(io::Error::from(io::ErrorKind::TimedOut)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stats(&self) -> ContainerStats {
        let read = |file: &str| fs::read_to_string(self.path.join(file)).unwrap_or_default();
        let number = |file: &str| read(file).trim().parse().unwrap_or(0);
        let guest_memory =
            guest_memory_bytes(&fs::read_to_string("/proc/meminfo").unwrap_or_default());
        ContainerStats {
            memory_current_bytes: number("memory.current"),
            memory_limit_bytes: effective_limit(&read("memory.max"), guest_memory),
            memory_peak_bytes: number("memory.peak"),
            swap_current_bytes: number("memory.swap.current"),
            memory: MemoryCounters::parse(&read("memory.stat")),
            memory_events: MemoryEvents::parse(&read("memory.events")),
            pids_current: number("pids.current"),
            pids_limit: number("pids.max"),
            cpu: CpuCounters::parse(&read("cpu.stat")),
        }
    }

    /// Kills what is left and removes the directory (an emptied cgroup may
    /// take a moment to let go).
    pub fn remove(&self) {
        self.kill_all();
        for _ in 0..100 {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::warn!(path = %self.path.display(), "cgroup still busy; left in place");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frozen_state_is_read_from_cgroup_events() {
        assert_eq!(is_frozen("populated 1\nfrozen 1\n"), Some(true));
        assert_eq!(is_frozen("populated 1\nfrozen 0\n"), Some(false));
        assert_eq!(is_frozen("populated 0\n"), None);
        assert_eq!(is_frozen("frozen 2\n"), None);
    }

    #[test]
    fn a_container_without_a_memory_limit_is_bounded_by_the_guest() {
        let meminfo = "MemTotal:         231204 kB\nMemFree:          200000 kB\n";
        let guest = guest_memory_bytes(meminfo);
        assert_eq!(guest, Some(231_204 * 1024));
        assert_eq!(effective_limit("max\n", guest), 231_204 * 1024);
        assert_eq!(effective_limit("33554432\n", guest), 32 << 20);
        assert_eq!(effective_limit("999999999999\n", guest), 231_204 * 1024);
        assert_eq!(effective_limit("max", None), u64::MAX);
        assert_eq!(guest_memory_bytes("MemTotal: lots"), None);
    }

    #[test]
    fn resources_become_cgroup_v2_files() {
        let resources: LinuxResources = serde_json::from_str(
            r#"{"memory": {"limit": 33554432}, "pids": {"limit": 64},
                "cpu": {"quota": 50000, "period": 100000, "shares": 1024}}"#,
        )
        .unwrap();
        assert_eq!(
            settings(&resources),
            vec![
                ("memory.max", "33554432".to_string()),
                ("pids.max", "64".to_string()),
                ("cpu.max", "50000 100000".to_string()),
                ("cpu.weight", "39".to_string()),
            ]
        );
        let unlimited: LinuxResources =
            serde_json::from_str(r#"{"memory": {"limit": -1}, "cpu": {"period": 50000}}"#).unwrap();
        assert_eq!(
            settings(&unlimited),
            vec![
                ("memory.max", "max".to_string()),
                ("cpu.max", "max 50000".to_string())
            ]
        );
    }

    #[test]
    fn shares_map_onto_weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 100);
    }
}
