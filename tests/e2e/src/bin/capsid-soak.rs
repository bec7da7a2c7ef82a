//! `capsid-soak` (`make soak`): start-stop cycles, back to back, with a leak
//! check every `--check-every` cycles. `capsid run -- true` first, then
//! `ctr run --rm` through our shim on a private containerd.
//!
//! ```text
//!  baseline (after one warm-up cycle each) ─▶ cycle … cycle ─▶ check ─▶ … ─▶ report
//!  check: nothing of ours left (capsid-vmm, shims, monitors, scratch
//!         directories, VM cgroups), and no count above the baseline
//!         (mounts, unix sockets, containerd's and its shims' fds, files in
//!         the run and cache directories)
//! ```
//!
//! Every failed cycle is kept with its cause (the first line capsid or ctr
//! printed); a guest booted again after crashing at boot is counted apart
//! (docs/reliability.md). The report gives the p50/p99 duration of the
//! first and last `--check-every` cycles (the drift) and the host's
//! available memory at each check. It exits 1 if a cycle failed or
//! something leaked; times are reported, never judged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use capsid_bench::report::percentile;
use capsid_e2e::require_kvm;
use capsid_testbed::artifact;
use capsid_testbed::containerd::{BUSYBOX, Containerd};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "capsid-soak",
    about = "capsid start-stop cycles with leak checks"
)]
struct Args {
    /// `capsid run -- true` cycles.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// `ctr run --rm` cycles.
    #[arg(long, default_value_t = 200)]
    ctr_runs: usize,
    /// Check for leaks every this many cycles (and after the last).
    #[arg(long, default_value_t = 100)]
    check_every: usize,
}

/// One cycle longer than this has hung.
const CYCLE_BOUND: Duration = Duration::from_secs(240);
/// Counts may settle for this long after a cycle before a rise is a leak.
const SETTLE: Duration = Duration::from_secs(10);

/// What the host holds that a cycle could leave behind.
#[derive(Debug, Clone)]
struct Snapshot {
    /// Must be empty after every cycle.
    left: Vec<String>,
    /// Must not rise above the baseline.
    counts: BTreeMap<&'static str, usize>,
    mem_available_kib: u64,
}

fn count_lines(path: &str) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// Files under `dir`, recursively (the image cache).
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            _ => 1,
        })
        .sum()
}

/// (pid, argv[0], argv[1]) of every process.
fn processes() -> Vec<(u32, String, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let mut args = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned());
            Some((pid, args.next()?, args.next().unwrap_or_default()))
        })
        .collect()
}

fn snapshot(containerd: Option<&Containerd>) -> Snapshot {
    let mut left = Vec::new();
    let mut shim_fds = 0;
    for (pid, program, first) in processes() {
        let capsid_monitor = program.ends_with("capsid") && first == "monitor";
        if program.ends_with("capsid-vmm")
            || program.ends_with("containerd-shim-capsid-v2")
            || capsid_monitor
        {
            left.push(format!("process {pid} ({program} {first})"));
            shim_fds += count_entries(Path::new(&format!("/proc/{pid}/fd")));
        }
    }
    for dir in ["/run/capsid/run", "/sys/fs/cgroup/capsid"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path().display().to_string()),
            );
        }
    }
    let mut counts = BTreeMap::new();
    counts.insert("mounts", count_lines("/proc/self/mountinfo"));
    counts.insert("unix sockets", count_lines("/proc/net/unix"));
    counts.insert(
        "files in /var/cache/capsid",
        count_files(Path::new("/var/cache/capsid")),
    );
    counts.insert("fds of leftover processes", shim_fds);
    if let Some(containerd) = containerd {
        left.extend(containerd.run_dir_leftovers());
        counts.insert(
            "containerd's fds",
            count_entries(Path::new(&format!("/proc/{}/fd", containerd.pid()))),
        );
        counts.insert(
            "files in containerd's state",
            count_files(&containerd.dir().join("state")),
        );
        counts.insert(
            "snapshots",
            count_entries(
                &containerd
                    .dir()
                    .join("root/io.containerd.snapshotter.v1.native/snapshots"),
            ),
        );
    }
    let mem_available_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0);
    Snapshot {
        left,
        counts,
        mem_available_kib,
    }
}

/// A leak: what is left, or a count above the baseline, still there after
/// [`SETTLE`].
fn leaks(baseline: &Snapshot, containerd: Option<&Containerd>) -> (Vec<String>, Snapshot) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = snapshot(containerd);
        let mut found = now.left.clone();
        for (what, &count) in &now.counts {
            let before = baseline.counts.get(what).copied().unwrap_or(0);
            if count > before {
                found.push(format!("{what}: {count}, {before} at the start"));
            }
        }
        if found.is_empty() || Instant::now() >= deadline {
            return (found, now);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The outcome of one cycle.
struct Cycle {
    took: Duration,
    /// `None`: it succeeded.
    failure: Option<String>,
    /// Guests booted again after crashing at boot.
    retries: usize,
    /// It failed because a guest died as the nested test host's guests do
    /// ([`HOST_DEATH`]).
    host_death: bool,
    /// A failed cycle's stderr, its last lines (the VMM's log and the
    /// guest's console, where it died).
    detail: String,
}

/// How many lines of a failed cycle's stderr are printed.
const DETAIL_LINES: usize = 60;

/// What capsid-vmm says of a guest that died as the nested test host's
/// guests do, QEMU's too: a triple fault reported at the reset vector,
/// with no word from the guest kernel first (docs/reliability.md). Counted
/// apart from the failures of ours.
const HOST_DEATH: &str = "triple-faulted (rip=0xfff0 ";

/// Runs `command` to its end (bounded); a failure is the first line of
/// stderr that says what went wrong.
fn cycle(mut command: Command) -> Cycle {
    let started = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return Cycle {
                took: started.elapsed(),
                failure: Some(format!("cannot start: {e}")),
                retries: 0,
                host_death: false,
                detail: String::new(),
            };
        }
    };
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > CYCLE_BOUND => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let took = started.elapsed();
    let stderr = reader.join().unwrap_or_default();
    let retries = stderr.matches("booting it again").count();
    let failure = match status {
        Some(status) if status.success() => None,
        Some(status) => Some(format!(
            "{status}: {}",
            stderr
                .lines()
                .find(|l| l.contains("error") || l.contains("capsid:"))
                .or_else(|| stderr.lines().next())
                .unwrap_or("(nothing on stderr)")
                .chars()
                .take(300)
                .collect::<String>()
        )),
        None => Some(format!("hung for {CYCLE_BOUND:?}")),
    };
    let lines: Vec<&str> = stderr.lines().collect();
    let detail = lines[lines.len().saturating_sub(DETAIL_LINES)..]
        .iter()
        .map(|l| format!("    | {}\n", l.chars().take(300).collect::<String>()))
        .collect();
    Cycle {
        took,
        host_death: failure.is_some() && stderr.contains(HOST_DEATH),
        failure,
        retries,
        detail,
    }
}

/// What one series of cycles found.
#[derive(Default)]
struct Phase {
    name: String,
    millis: Vec<f64>,
    failures: BTreeMap<String, Vec<usize>>,
    /// Cycles lost to a guest that died as the test host's guests do.
    host_deaths: Vec<usize>,
    retries: usize,
    leaks: Vec<(usize, Vec<String>)>,
    /// (cycle, MemAvailable KiB) at each check.
    memory: Vec<(usize, u64)>,
}

impl Phase {
    fn failed(&self) -> usize {
        self.failures.values().map(Vec::len).sum()
    }

    fn report(&self, every: usize) -> String {
        let mut out = format!(
            "{}: {} cycles, {} failed, {} guests booted again after crashing at boot, {} leak checks failed\n",
            self.name,
            self.millis.len(),
            self.failed(),
            self.retries,
            self.leaks.len()
        );
        if !self.host_deaths.is_empty() {
            out += &format!(
                "  besides: {} cycles (cycles {:?}) lost to a guest that died as the nested test host's \
                 guests do (a triple fault at the reset vector, no word from its kernel; \
                 docs/reliability.md)\n",
                self.host_deaths.len(),
                self.host_deaths
            );
        }
        let window = every.min(self.millis.len());
        if window > 0 {
            let first = &self.millis[..window];
            let last = &self.millis[self.millis.len() - window..];
            out += &format!(
                "  duration, first {window} cycles: p50 {:.0} ms, p99 {:.0} ms; last {window}: p50 {:.0} ms, p99 {:.0} ms (drift of p50 {:+.1}%)\n",
                percentile(first, 50),
                percentile(first, 99),
                percentile(last, 50),
                percentile(last, 99),
                100.0 * (percentile(last, 50) / percentile(first, 50) - 1.0)
            );
        }
        if let (Some(first), Some(last)) = (self.memory.first(), self.memory.last()) {
            out += &format!(
                "  host MemAvailable: {} MiB at cycle {}, {} MiB at cycle {} ({:+} MiB)\n",
                first.1 / 1024,
                first.0,
                last.1 / 1024,
                last.0,
                (i128::from(last.1) - i128::from(first.1)) / 1024
            );
        }
        for (cause, cycles) in &self.failures {
            out += &format!(
                "  failed {}× (cycles {:?}): {cause}\n",
                cycles.len(),
                cycles
            );
        }
        for (at, found) in &self.leaks {
            out += &format!("  leak at cycle {at}: {found:?}\n");
        }
        // For scripts that add batches up: tab-separated.
        out += &format!(
            "SOAK-PHASE\t{}\t{}\t{}\t{}\t{}\t{:.0}\t{:.0}\t{}\n",
            self.name,
            self.millis.len(),
            self.failed(),
            self.retries,
            self.leaks.len(),
            percentile(&self.millis, 50),
            percentile(&self.millis, 99),
            self.host_deaths.len()
        );
        out
    }
}

fn soak(
    name: &str,
    cycles: usize,
    every: usize,
    containerd: Option<&Containerd>,
    mut one: impl FnMut(usize) -> Cycle,
) -> Phase {
    let mut phase = Phase {
        name: name.into(),
        ..Phase::default()
    };
    // The warm-up makes what is cached for good (the rootfs image).
    let warm = one(0);
    if let Some(why) = warm.failure {
        eprintln!("{name}: the warm-up cycle failed: {why}");
    }
    // The baseline's counts are what they are; only what is left of the
    // warm-up is a leak already.
    let deadline = Instant::now() + SETTLE;
    let baseline = loop {
        let now = snapshot(containerd);
        if now.left.is_empty() || Instant::now() >= deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    if !baseline.left.is_empty() {
        phase.leaks.push((0, baseline.left.clone()));
    }
    phase.memory.push((0, baseline.mem_available_kib));
    let started = Instant::now();
    for n in 1..=cycles {
        let outcome = one(n);
        phase.millis.push(outcome.took.as_secs_f64() * 1000.0);
        phase.retries += outcome.retries;
        if let Some(cause) = outcome.failure {
            if outcome.host_death {
                eprintln!(
                    "{name} cycle {n}: its guest died as the nested test host's guests do \
                     (counted apart): {cause}\n{}",
                    outcome.detail
                );
                phase.host_deaths.push(n);
            } else {
                eprintln!("{name} cycle {n} failed: {cause}\n{}", outcome.detail);
                phase.failures.entry(cause).or_default().push(n);
            }
        }
        if n % every == 0 || n == cycles {
            let (found, now) = leaks(&baseline, containerd);
            phase.memory.push((n, now.mem_available_kib));
            eprintln!(
                "{name}: {n}/{cycles} cycles in {:.0} s, {} failed, {} leaks, MemAvailable {} MiB",
                started.elapsed().as_secs_f64(),
                phase.failed(),
                found.len(),
                now.mem_available_kib / 1024
            );
            if !found.is_empty() {
                eprintln!("{name}: leaked at cycle {n}: {found:?}");
                phase.leaks.push((n, found));
            }
        }
    }
    phase
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !require_kvm("capsid-soak") {
        return ExitCode::FAILURE;
    }
    let every = args.check_every.max(1);
    let mut phases = Vec::new();
    if args.runs > 0 {
        let cli = artifact("CAPSID_CLI");
        let rootfs = PathBuf::from(
            std::env::var_os("CAPSID_TEST_ROOTFS_DIR").expect("CAPSID_TEST_ROOTFS_DIR is set"),
        );
        phases.push(soak("capsid run -- true", args.runs, every, None, |_| {
            let mut command = Command::new(&cli);
            command
                .arg("run")
                .arg("--rootfs")
                .arg(&rootfs)
                .args(["--", "true"]);
            cycle(command)
        }));
    }
    if args.ctr_runs > 0 {
        let containerd = Containerd::start();
        let log_retries = |c: &Containerd| c.log().matches("booting it again").count();
        let mut seen = log_retries(&containerd);
        let phase = soak(
            "ctr run --rm",
            args.ctr_runs,
            every,
            Some(&containerd),
            |n| {
                let id = format!("soak-{n}");
                let mut command = containerd.ctr_command(&Containerd::run_args(
                    &["--rm"],
                    BUSYBOX,
                    &id,
                    &["true"],
                ));
                command.env_remove("CAPSID_DEBUG");
                let mut outcome = cycle(command);
                // The shim says it in containerd's log, not on ctr's stderr.
                let now = log_retries(&containerd);
                outcome.retries += now - seen;
                seen = now;
                outcome
            },
        );
        phases.push(phase);
    }
    let mut report = String::from("soak report\n");
    for phase in &phases {
        report += &phase.report(every);
    }
    let bad = phases.iter().any(|p| p.failed() > 0 || !p.leaks.is_empty());
    report += &format!(
        "SOAK-RESULT {}\n",
        if bad {
            "FAILED (a cycle failed or something leaked)"
        } else {
            "ok: no failed cycle, no leak"
        }
    );
    print!("{report}");
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
