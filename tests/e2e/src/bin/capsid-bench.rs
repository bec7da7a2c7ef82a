//! `capsid-bench` (`capsid bench`, `make bench`): start-up latency,
//! footprint, density and throughput of capsid, each measured side by side
//! with a peer on the same host in the same run.
//!
//! | scenario     | ours                                         | peer                              |
//! |--------------|----------------------------------------------|-----------------------------------|
//! | `boot`       | capsid-vmm spawn → test init ready; → agent  | QEMU `microvm`, same kernel+initrd |
//! | `run`        | `capsid run -- true`, `-- echo hi`           | runc, same rootfs                 |
//! | `ctr`        | `ctr run --rm` with our shim                 | the same with `io.containerd.runc.v2` |
//! | `concurrent` | K `capsid run` at once                       | K `runc run` at once              |
//! | `footprint`  | shim + VMM PSS per sandbox; how many fit     | runc's shim + container           |
//! | `throughput` | guest stdout → host, virtio-blk cold read    | runc stdout; QEMU virtio-blk      |
//!
//! Method: every time is taken here, outside the measured processes
//! (spawn → first byte on the pipe → exit), except the VMM's own boot
//! marker. Ours and the peer alternate (A B B A …) so drift hits both, each
//! after one warm-up that is not counted. Every sample is kept and printed
//! in the JSON; nothing passes or fails on a time.
//!
//! `capsid-bench render FILE.json --out DIR` renders a report measured
//! elsewhere (the nested test host) into the table and SVG.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_e2e::agent::AgentVm;
use capsid_e2e::bench::{Host, Report, Scenario, Series, Who};
use capsid_e2e::containerd::{BUSYBOX, Containerd, RUNTIME};
use capsid_e2e::vmm::{VmmRun, parse_times};
use capsid_e2e::{artifact, initramfs_with_init, memory_outside_guest, pss_kib};
use capsid_runtime::vmm_api::{DEFAULT_CMDLINE, DiskConfig, VmConfig};
use capsid_testbed::ScratchDir;
use capsid_testbed::child::ChildGuard;
use capsid_testbed::probe::{Mode, probe};
use capsid_testbed::qemu::DirectBoot;
use capsid_testbed::serial::SerialLog;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

const READY: &str = "CAPSID-TEST-INIT: ready";
const IDLE: &str = "CAPSID-TEST-INIT: step hang waiting";
const TIMEOUT: Duration = Duration::from_secs(180);
/// Guest memory of the sandboxes the benchmark starts.
const MEM_MIB: u32 = 128;
/// Guest memory of the sandboxes the density count starts.
const DENSITY_MIB: u32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "capsid-bench",
    about = "capsid's start-up, footprint and throughput, side by side with peers"
)]
struct Args {
    #[command(subcommand)]
    render: Option<Render>,
    /// Measured runs per series, after one warm-up.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Scenarios to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "boot,run,ctr,concurrent,footprint,throughput"
    )]
    scenarios: Vec<Which>,
    /// Sandbox counts for `concurrent`, comma-separated [default: 1,5,10;
    /// nested: 1,5, as 10 at once has crashed the nested test host's kernel].
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// The most 64 MiB sandboxes `footprint` starts when counting how many
    /// fit [default: 32; nested: 8, as about 10 running at once has crashed
    /// the nested test host's kernel].
    #[arg(long)]
    density_cap: Option<usize>,
    /// Bytes the guest writes to stdout in `throughput`.
    #[arg(long, default_value_t = 32 << 20)]
    stdout_bytes: u64,
    /// Where bench.json and bench.svg are written.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Render {
    /// Renders a report (JSON) into the table, bench.json and bench.svg,
    /// without measuring. A file of several reports, one per line (runs of
    /// some scenarios each), becomes one report.
    Render {
        json: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    Boot,
    Run,
    Ctr,
    Concurrent,
    Footprint,
    Throughput,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A progress bar on a terminal; plain lines otherwise (the nested test
/// host's output is a serial line).
struct Progress {
    bar: ProgressBar,
    plain: bool,
}

impl Progress {
    /// `plain`: lines instead of a bar (the nested test host's stderr is a
    /// serial line that ends up in a log).
    fn new(total: u64, plain: bool) -> Self {
        let target = if plain {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
        {
            bar.set_style(style);
        }
        Self {
            plain: bar.is_hidden(),
            bar,
        }
    }

    fn step(&self, what: &str) {
        self.bar.inc(1);
        self.bar.set_message(what.to_owned());
        if self.plain {
            eprintln!(
                "capsid-bench: {}/{} {what}",
                self.bar.position(),
                self.bar.length().unwrap_or(0)
            );
        }
    }
}

/// The A B B A order of run `i`.
fn ours_first(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// One process whose output the harness times: spawn → first stdout byte
/// → end of stdout → exit.
struct Timed {
    first_byte: Option<Duration>,
    exit: Duration,
    bytes: u64,
    /// From the first byte to the end of stdout.
    streaming: Duration,
    code: Option<i32>,
    stderr: String,
}

fn timed(command: &mut Command) -> Timed {
    let started = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stderr = drain(&mut child);
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut buf = vec![0u8; 1 << 16];
    let mut first_byte = None;
    let mut bytes = 0u64;
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                first_byte.get_or_insert_with(|| started.elapsed());
                bytes += n as u64;
            }
        }
    }
    let eof = started.elapsed();
    let status = child.wait().expect("wait");
    let exit = started.elapsed();
    Timed {
        first_byte,
        exit,
        bytes,
        streaming: eof.saturating_sub(first_byte.unwrap_or(eof)),
        code: status.code(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

impl Timed {
    /// To the first output byte, or to the exit when there was none.
    fn to_output(&self) -> Duration {
        self.first_byte.unwrap_or(self.exit)
    }
}

fn drain(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    })
}

/// What `capsid` prints when it boots a crashed guest again.
const BOOT_RETRY: &str = "booting it again (retry";

/// Why a run failed, in one line: capsid's error line (its log and console
/// quotes follow it), else the last line printed. The whole of stderr goes
/// to ours.
fn reason(t: &Timed) -> String {
    if !t.stderr.trim().is_empty() {
        eprintln!(
            "capsid-bench: a failed run's stderr:\n{}",
            t.stderr.trim_end()
        );
    }
    let mut lines = t.stderr.lines().map(str::trim);
    lines
        .clone()
        .find(|l| l.starts_with("capsid: error:"))
        .or_else(|| lines.rfind(|l| !l.is_empty()))
        .unwrap_or("no message")
        .to_owned()
}

/// What every scenario shares.
struct Bench {
    args: Args,
    scratch: ScratchDir,
    rootfs: PathBuf,
    progress: Progress,
    counter: std::cell::Cell<usize>,
    /// runc cannot pivot_root out of an initramfs (the nested test host's
    /// root): it then runs with `--no-pivot`.
    no_pivot: bool,
    /// Runs that failed in the current scenario, with their reasons. A
    /// failure is reported in the scenario's notes, never hidden; it does
    /// not end the benchmark (nested guests fail now and then).
    failures: std::cell::RefCell<Vec<String>>,
    /// Successful `capsid` runs whose guest crashed before its agent
    /// answered and was booted again (docs/reliability.md): their samples
    /// include both boots, and the notes say how many.
    boot_retries: std::cell::Cell<usize>,
    /// `runc spec`'s default config, made once.
    runc_spec: std::cell::OnceCell<serde_json::Value>,
}

impl Bench {
    /// Whether `t` succeeded (and printed `bytes`, if given); a failure is
    /// recorded with its reason.
    fn ok(&self, what: &str, t: &Timed, bytes: Option<u64>) -> bool {
        let failure = match (t.code, bytes) {
            (Some(0), Some(want)) if t.bytes != want => {
                Some(format!("{what}: printed {} bytes, not {want}", t.bytes))
            }
            (Some(0), _) => None,
            (code, _) => Some(format!("{what}: exit {code:?}: {}", reason(t))),
        };
        let retries = t.stderr.matches(BOOT_RETRY).count();
        if retries > 0 {
            eprintln!(
                "capsid-bench: {what}: its guest was booted again:\n{}",
                t.stderr.trim_end()
            );
            self.boot_retries.set(self.boot_retries.get() + retries);
        }
        match failure {
            Some(failure) => {
                eprintln!("capsid-bench: FAILED {failure}");
                self.failures.borrow_mut().push(failure);
                false
            }
            None => true,
        }
    }

    /// Records a failed run (see `failures`).
    fn failed(&self, failure: String) {
        eprintln!("capsid-bench: FAILED {failure}");
        self.failures.borrow_mut().push(failure);
    }

    fn unique(&self, prefix: &str) -> String {
        let n = self.counter.get();
        self.counter.set(n + 1);
        format!("{prefix}-{}-{n}", std::process::id())
    }

    fn capsid_run(&self, command: &[&str]) -> Command {
        let mut cmd = Command::new(artifact("CAPSID_CLI"));
        // Bounded, so that a guest that hangs is a recorded failure (124).
        let timeout = format!("{}s", TIMEOUT.as_secs());
        cmd.args([
            "run",
            "--memory",
            &format!("{MEM_MIB}M"),
            "--timeout",
            &timeout,
        ])
        .arg("--rootfs")
        .arg(&self.rootfs)
        .arg("--")
        .args(command);
        cmd
    }

    /// `command` in a fresh sandbox: ours (`capsid run`) or runc's.
    fn sandbox(&self, ours: bool, command: &[&str]) -> Command {
        if ours {
            self.capsid_run(command)
        } else {
            self.runc_run(command)
        }
    }

    /// A runc bundle over the same rootfs (read-only), running `command`.
    fn runc_run(&self, command: &[&str]) -> Command {
        let id = self.unique("runc");
        let bundle = self.scratch.join(&id);
        std::fs::create_dir_all(&bundle).expect("bundle dir");
        let path = bundle.join("config.json");
        let mut config = self
            .runc_spec
            .get_or_init(|| {
                // `runc spec` once, in its own directory; every bundle starts from it.
                let dir = self.scratch.join("runc-spec");
                std::fs::create_dir_all(&dir).expect("runc spec dir");
                let spec = Command::new("runc")
                    .args(["spec", "--bundle"])
                    .arg(&dir)
                    .output()
                    .expect("runc spec (Debian's runc)");
                assert!(spec.status.success(), "runc spec: {spec:?}");
                let json = std::fs::read(dir.join("config.json")).expect("config.json");
                serde_json::from_slice(&json).expect("runc spec wrote JSON")
            })
            .clone();
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = command
            .iter()
            .map(|s| (*s).into())
            .collect::<Vec<serde_json::Value>>()
            .into();
        config["root"]["path"] = self.rootfs.to_string_lossy().into_owned().into();
        config["root"]["readonly"] = true.into();
        std::fs::write(&path, config.to_string()).expect("write config.json");
        let mut cmd = Command::new("runc");
        cmd.args(["run", "--bundle"]).arg(&bundle);
        if self.no_pivot {
            cmd.arg("--no-pivot");
        }
        cmd.arg(id);
        cmd
    }

    fn scenarios(&self) -> Vec<Scenario> {
        let mut out = Vec::new();
        for which in &self.args.scenarios {
            let scenario = match which {
                Which::Boot => self.boot(),
                Which::Run => self.run(),
                Which::Ctr => self.ctr(),
                Which::Concurrent => self.concurrent(),
                Which::Footprint => self.footprint(),
                Which::Throughput => self.throughput(),
            };
            let mut scenario = scenario;
            let retries = self.boot_retries.replace(0);
            if retries > 0 {
                scenario.notes.push(format!(
                    "{retries} guests crashed before their agent answered and were booted again; those runs' samples include both boots"
                ));
            }
            let failures = std::mem::take(&mut *self.failures.borrow_mut());
            if let Some(first) = failures.first() {
                scenario.notes.push(format!(
                    "{} runs failed and are not in the samples; the first: {first}",
                    failures.len()
                ));
                scenario
                    .notes
                    .extend(failures.iter().skip(1).take(4).cloned());
            }
            out.push(scenario);
        }
        out
    }

    /// `rounds` measured rounds after one warm-up. In each, `turn(ours,
    /// counted)` runs for ours and for the peer, A B B A, then the progress
    /// moves on.
    fn rounds(&self, rounds: usize, what: &str, mut turn: impl FnMut(bool, bool)) {
        for i in 0..=rounds {
            for ours in [ours_first(i), !ours_first(i)] {
                turn(ours, i > 0);
            }
            self.progress.step(what);
        }
    }

    /// `ctr run` options for ours or runc's runtime.
    fn ctr_runtime(&self, ours: bool) -> Vec<&'static str> {
        match ours {
            true => vec!["--runtime", RUNTIME],
            false if self.no_pivot => vec!["--runtime", "io.containerd.runc.v2", "--no-pivot"],
            false => vec!["--runtime", "io.containerd.runc.v2"],
        }
    }

    fn boot(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "boot",
            "spawn → the test init's ready line on the console (same kernel, initramfs, 1 vCPU, 128 MiB); \
             the VMM's memory outside guest RAM once the guest idles; \
             capsid-vmm's own start → boot marker; spawn → the capsid agent answers on vsock",
        );
        let guest = TestInitGuest::new(&self.scratch, "boot", "marker,hang");
        let mut ready = Pair::new(
            "capsid-vmm: spawn → init ready",
            "QEMU microvm: spawn → init ready",
            "ms",
        );
        let mut marker = Series::new("capsid-vmm: process start → boot marker", "ms", Who::Ours);
        let mut vcpus = Series::new("capsid-vmm: process start → vCPUs running", "ms", Who::Ours);
        let mut agent = Series::new("capsid-vmm + agent: spawn → agent answers", "ms", Who::Ours);
        let mut vmm_rss = Pair::new(
            "capsid-vmm: RSS outside guest RAM",
            "QEMU microvm: RSS outside guest RAM",
            "MiB",
        );
        let mut vmm_pss = Pair::new(
            "capsid-vmm: PSS outside guest RAM",
            "QEMU microvm: PSS outside guest RAM",
            "MiB",
        );
        self.rounds(self.args.runs, "boot", |ours, counted| {
            if ours {
                let mut run = guest.vmm(&self.scratch, None);
                let waited = run
                    .try_wait_for_line(READY, TIMEOUT)
                    .and_then(|(_, to_ready)| {
                        Ok((to_ready, run.try_wait_for_line(IDLE, TIMEOUT)?))
                    });
                let to_ready = match waited {
                    Ok((to_ready, _)) => to_ready,
                    Err(e) => {
                        self.failed(format!("capsid-vmm boot: {}", first_line(&e)));
                        return;
                    }
                };
                let (rss, pss) = memory_outside_guest(run.pid(), u64::from(MEM_MIB) << 10);
                let times = parse_times(&run.log());
                drop(run);
                let vm = AgentVm::boot("bench-agent", 1, MEM_MIB);
                let to_agent = vm.ready_after;
                vm.shutdown();
                if counted {
                    ready.ours.samples.push(ms(to_ready));
                    marker
                        .samples
                        .push(times.marker_us.unwrap_or(0) as f64 / 1000.0);
                    vcpus
                        .samples
                        .push(times.ready_us.unwrap_or(0) as f64 / 1000.0);
                    agent.samples.push(ms(to_agent));
                    vmm_rss.ours.samples.push(mib(rss));
                    vmm_pss.ours.samples.push(mib(pss));
                }
            } else {
                // Until the same idle line, so both are measured settled.
                match guest.qemu(&self.scratch, None, IDLE) {
                    Ok(boot) if counted => {
                        ready.peer.samples.push(ms(boot.to_ready));
                        vmm_rss.peer.samples.push(mib(boot.rss_kib));
                        vmm_pss.peer.samples.push(mib(boot.pss_kib));
                    }
                    Ok(_) => {}
                    Err(e) => self.failed(format!("QEMU boot: {e}")),
                }
            }
        });
        ready.into(&mut scenario, "spawn → init ready");
        vmm_rss.into(&mut scenario, "VMM RSS outside guest RAM");
        vmm_pss.into(&mut scenario, "VMM PSS outside guest RAM");
        scenario.series.extend([marker, vcpus, agent]);
        scenario
    }

    fn run(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "run",
            "`capsid run --rootfs DIR -- CMD` (a fresh micro-VM each time) against `runc run` of a bundle over the same rootfs",
        );
        let mut exit_true = Pair::new(
            "capsid run -- true: → exit",
            "runc run -- true: → exit",
            "ms",
        );
        let mut first_hi = Pair::new(
            "capsid run -- echo hi: → first byte",
            "runc run -- echo hi: → first byte",
            "ms",
        );
        let mut exit_hi = Pair::new(
            "capsid run -- echo hi: → exit",
            "runc run -- echo hi: → exit",
            "ms",
        );
        self.rounds(self.args.runs, "run", |ours, counted| {
            let t = timed(&mut self.sandbox(ours, &["true"]));
            let h = timed(&mut self.sandbox(ours, &["echo", "hi"]));
            let ok = self.ok(&format!("{} true", who(ours)), &t, None)
                & self.ok(&format!("{} echo hi", who(ours)), &h, Some(3));
            if ok && counted {
                exit_true.of(ours).samples.push(ms(t.exit));
                first_hi.of(ours).samples.push(ms(h.to_output()));
                exit_hi.of(ours).samples.push(ms(h.exit));
            }
        });
        exit_true.into(&mut scenario, "true → exit");
        first_hi.into(&mut scenario, "echo hi → first byte");
        exit_hi.into(&mut scenario, "echo hi → exit");
        scenario
    }

    fn ctr(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "ctr",
            "`ctr run --rm IMAGE ID echo hi` through one private containerd, with our shim and with runc's (io.containerd.runc.v2)",
        );
        let containerd = Containerd::start();
        let mut first = Pair::new(
            "ctr run (capsid): → first byte",
            "ctr run (runc): → first byte",
            "ms",
        );
        let mut exit = Pair::new(
            "ctr run --rm (capsid): → exit",
            "ctr run --rm (runc): → exit",
            "ms",
        );
        self.rounds(self.args.runs, "ctr", |ours, counted| {
            let id = self.unique("ctr");
            let mut args = vec!["run", "--rm", "--snapshotter", "native"];
            args.extend(self.ctr_runtime(ours));
            args.extend([BUSYBOX, id.as_str(), "echo", "hi"]);
            let t = timed(&mut containerd.ctr_command(&args));
            if self.ok(&format!("ctr {}", args.join(" ")), &t, Some(3)) && counted {
                first.of(ours).samples.push(ms(t.to_output()));
                exit.of(ours).samples.push(ms(t.exit));
            }
        });
        containerd.assert_no_leftovers();
        first.into(&mut scenario, "→ first byte");
        exit.into(&mut scenario, "→ exit");
        scenario
    }

    fn concurrent(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "concurrent",
            "K sandboxes started at once (`capsid run -- echo hi` against `runc run`): each one's time to its output, and the time until all had printed",
        );
        for &k in &self.args.concurrency {
            let mut each = Pair::new(
                format!("K={k} capsid: each → output"),
                format!("K={k} runc: each → output"),
                "ms",
            );
            let mut all = Pair::new(
                format!("K={k} capsid: all → output"),
                format!("K={k} runc: all → output"),
                "ms",
            );
            // Fewer rounds: each round is K sandboxes.
            // At least 2, so that one guest dying (rare, nested) cannot
            // leave the "all" series without a sample.
            let rounds = self.args.runs.div_ceil(k.max(1)).max(2);
            self.rounds(rounds, &format!("concurrent K={k}"), |ours, counted| {
                let threads: Vec<_> = (0..k)
                    .map(|_| {
                        let mut command = self.sandbox(ours, &["echo", "hi"]);
                        std::thread::spawn(move || timed(&mut command))
                    })
                    .collect();
                let results: Vec<Timed> = threads
                    .into_iter()
                    .map(|t| t.join().expect("thread"))
                    .collect();
                // A sandbox that failed under the load is counted and its
                // reason kept, not hidden and not fatal.
                let (ok, failed): (Vec<Timed>, Vec<Timed>) =
                    results.into_iter().partition(|t| t.code == Some(0));
                if let Some(first) = failed.first() {
                    self.failures.borrow_mut().push(format!(
                        "K={k}: {} of {k} {} sandboxes failed{}: {}",
                        failed.len(),
                        if ours { "capsid" } else { "runc" },
                        if counted { "" } else { " (warm-up)" },
                        first.stderr.lines().last().unwrap_or("").trim()
                    ));
                }
                if counted {
                    let firsts: Vec<f64> = ok.iter().map(|t| ms(t.to_output())).collect();
                    if failed.is_empty() {
                        all.of(ours)
                            .samples
                            .push(firsts.iter().copied().fold(0.0, f64::max));
                    }
                    each.of(ours).samples.extend(firsts);
                }
            });
            each.into(&mut scenario, &format!("K={k} each → output"));
            all.into(&mut scenario, &format!("K={k} all → output"));
        }
        scenario
    }

    fn footprint(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "footprint",
            "host memory per running sandbox (`ctr run -d … sleep`), 64 MiB guests: shim + VMM PSS outside guest RAM, VMM RSS, guest RAM touched; runc's shim + container as the peer; then how many 64 MiB sandboxes start before one fails",
        );
        let containerd = Containerd::start();
        let mut pss = Pair::new(
            "capsid: shim + VMM PSS, guest RAM included",
            "runc: shim + container PSS",
            "MiB",
        );
        let mut ours_outside =
            Series::new("capsid: shim + VMM PSS outside guest RAM", "MiB", Who::Ours);
        let mut vmm_rss = Series::new("capsid-vmm RSS outside guest RAM", "MiB", Who::Ours);
        let mut guest = Series::new("guest RAM touched", "MiB", Who::Ours);
        let mem = format!("io.capsid.memory={DENSITY_MIB}M");
        let start = |id: &str, ours: bool| {
            let mut args = vec!["run", "-d", "--snapshotter", "native", "--annotation", &mem];
            args.extend(self.ctr_runtime(ours));
            args.extend([BUSYBOX, id, "sleep", "1000"]);
            containerd.ctr(&args)
        };
        // Fewer rounds: each sandbox is measured after it settled.
        self.rounds(self.args.runs.clamp(1, 5), "footprint", |ours, counted| {
            let id = self.unique("fp");
            let out = start(&id, ours);
            if !out.status.success() {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                let failure = format!("{} ctr run -d: {why}", who(ours));
                eprintln!("capsid-bench: FAILED {failure}");
                self.failures.borrow_mut().push(failure);
                let _ = containerd.ctr(&["containers", "rm", &id]);
                return;
            }
            assert!(
                out.status.success(),
                "ctr run -d: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // Let the guest settle before measuring it.
            std::thread::sleep(Duration::from_secs(2));
            let shim_kib: u64 = pids_with("containerd-shim", &id)
                .iter()
                .filter_map(|&p| pss_kib(p))
                .sum();
            if ours {
                let vmm = pids_with("capsid-vmm", "");
                let (rss, outside) = vmm.first().map_or((0, 0), |&p| {
                    memory_outside_guest(p, u64::from(DENSITY_MIB) << 10)
                });
                let total = vmm.first().and_then(|&p| pss_kib(p)).unwrap_or(0);
                if counted {
                    pss.ours.samples.push(mib(shim_kib + total));
                    ours_outside.samples.push(mib(shim_kib + outside));
                    vmm_rss.samples.push(mib(rss));
                    guest.samples.push(mib(total.saturating_sub(outside)));
                }
            } else if counted {
                let task = containerd.ctr_ok(&["task", "ls"]);
                let pid = task
                    .lines()
                    .find(|l| l.starts_with(&id))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                pss.peer
                    .samples
                    .push(mib(shim_kib + pid.and_then(pss_kib).unwrap_or(0)));
            }
            remove(&containerd, std::slice::from_ref(&id));
        });
        pss.into(&mut scenario, "host PSS per sandbox, all of it");
        scenario.series.extend([ours_outside, vmm_rss, guest]);

        // Density: 64 MiB sandboxes, one after another, until one fails or the cap.
        let mut started = Vec::new();
        let mut failure = None;
        // Resolved in main (8 nested, 32 native).
        let cap = self.args.density_cap.unwrap_or(8);
        while started.len() < cap {
            let id = self.unique("dense");
            let out = start(&id, true);
            if !out.status.success() {
                failure = Some(String::from_utf8_lossy(&out.stderr).trim().to_owned());
                let _ = containerd.ctr(&["containers", "rm", &id]);
                break;
            }
            started.push(id);
            self.progress.step("density");
        }
        let fitted = started.len();
        scenario.notes.push(match &failure {
            Some(why) => format!("density: {fitted} sandboxes of {DENSITY_MIB} MiB ran at once; the next failed: {why}"),
            None => format!(
                "density: {fitted} sandboxes of {DENSITY_MIB} MiB ran at once, the cap (--density-cap); the host did not run out"
            ),
        });
        remove(&containerd, &started);
        containerd.assert_no_leftovers();
        scenario
    }

    fn throughput(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "throughput",
            "guest stdout → host (`head -c N /dev/zero`, first byte to end of stream); a cold read of a 64 MiB virtio-blk disk in the guest (1 MiB reads)",
        );
        let bytes = self.args.stdout_bytes.to_string();
        let mut stdout = Pair::new("capsid run: stdout", "runc run: stdout", "MB/s");
        // Fewer rounds: each moves the whole stream.
        let rounds = self.args.runs.clamp(1, 5);
        self.rounds(rounds, "throughput", |ours, counted| {
            let t = timed(&mut self.sandbox(ours, &["head", "-c", bytes.as_str(), "/dev/zero"]));
            let what = format!("{} head -c", who(ours));
            if self.ok(&what, &t, Some(self.args.stdout_bytes)) && counted {
                let rate = t.bytes as f64 / t.streaming.as_secs_f64().max(1e-9) / 1e6;
                stdout.of(ours).samples.push(rate);
            }
        });
        stdout.into(&mut scenario, "stdout MB/s (higher is better)");

        let disk = self.scratch.join("bench-disk.img");
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk, data).expect("write the disk image");
        let guest = TestInitGuest::new(&self.scratch, "blk", "blk-speed:/dev/vda,hang");
        let mut blk = Pair::new(
            "capsid-vmm: virtio-blk cold read",
            "QEMU microvm: virtio-blk cold read",
            "MB/s",
        );
        self.rounds(rounds, "throughput", |ours, counted| {
            let line = if ours {
                let mut run = guest.vmm(&self.scratch, Some(&disk));
                match run.try_wait_for_line("step blk-speed", TIMEOUT) {
                    Ok((line, _)) => line,
                    Err(e) => {
                        self.failed(format!("capsid-vmm blk-speed: {}", first_line(&e)));
                        return;
                    }
                }
            } else {
                match guest.qemu(&self.scratch, Some(&disk), "step blk-speed") {
                    Ok(boot) => boot.line,
                    Err(e) => {
                        self.failed(format!("QEMU blk-speed: {e}"));
                        return;
                    }
                }
            };
            let Some(rate) = blk_rate(&line) else {
                let failure = format!("{} blk-speed: {line}", who(ours));
                eprintln!("capsid-bench: FAILED {failure}");
                self.failures.borrow_mut().push(failure);
                return;
            };
            if counted {
                blk.of(ours).samples.push(rate);
            }
        });
        blk.into(&mut scenario, "virtio-blk MB/s (higher is better)");
        scenario
    }
}

/// One quantity, measured for ours and for the peer.
struct Pair {
    ours: Series,
    peer: Series,
}

impl Pair {
    fn new(ours: impl Into<String>, peer: impl Into<String>, unit: &str) -> Self {
        Self {
            ours: Series::new(ours, unit, Who::Ours),
            peer: Series::new(peer, unit, Who::Peer),
        }
    }

    fn of(&mut self, ours: bool) -> &mut Series {
        if ours { &mut self.ours } else { &mut self.peer }
    }

    /// Adds both series and their ratio to `scenario`.
    fn into(self, scenario: &mut Scenario, what: &str) {
        scenario.compare(what, self.ours, self.peer);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Our kernel with the test init running `steps`: booted by capsid-vmm or
/// by QEMU `microvm`, 1 vCPU and [`MEM_MIB`] each.
struct TestInitGuest {
    kernel: PathBuf,
    initrd: PathBuf,
    steps: String,
    name: String,
}

impl TestInitGuest {
    fn new(scratch: &ScratchDir, name: &str, steps: &str) -> Self {
        Self {
            kernel: artifact("CAPSID_KERNEL"),
            initrd: initramfs_with_init(
                &artifact("CAPSID_TEST_INIT"),
                &scratch.join(&format!("init-{name}.cpio")),
            ),
            steps: format!("capsid_test={steps}"),
            name: name.to_owned(),
        }
    }

    /// Starts capsid-vmm on this guest, with `disk` as a read-only disk.
    /// The VM goes in the VMM's own configuration type (`--config`).
    fn vmm(&self, scratch: &ScratchDir, disk: Option<&Path>) -> VmmRun {
        let config = VmConfig {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: format!("{DEFAULT_CMDLINE} {}", self.steps),
            mem_mib: MEM_MIB,
            disks: disk
                .map(|path| DiskConfig {
                    path: path.to_owned(),
                    read_only: true,
                    id: None,
                })
                .into_iter()
                .collect(),
            ..VmConfig::default()
        };
        let path = scratch.join(&format!("bench-{}.json", self.name));
        std::fs::write(
            &path,
            serde_json::to_vec(&config).expect("a VmConfig serializes"),
        )
        .expect("write the VM's configuration");
        VmmRun::start(
            &artifact("CAPSID_VMM"),
            &["--config".into(), path.into()],
            scratch.path(),
            &format!("bench-{}", self.name),
        )
    }

    /// Boots QEMU until a console line has `until`. `disk` is a read-only
    /// virtio-blk disk.
    fn qemu(
        &self,
        scratch: &ScratchDir,
        disk: Option<&Path>,
        until: &str,
    ) -> Result<QemuBoot, String> {
        // microvm has no i8042; the guest never reboots here anyway.
        let cmdline = format!("console=ttyS0 reboot=t panic=-1 quiet {}", self.steps);
        boot_qemu(
            &self.kernel,
            &self.initrd,
            &cmdline,
            disk,
            scratch.path(),
            until,
        )
    }
}

/// The first line of a long failure, for the report's notes (the whole of
/// it goes to stderr as it happens).
fn first_line(failure: &str) -> &str {
    eprintln!("capsid-bench: {failure}");
    failure.lines().next().unwrap_or("")
}

fn who(ours: bool) -> &'static str {
    if ours { "capsid" } else { "runc" }
}

/// `… blk-speed:/dev/vda ok bytes=N us=T` → MB/s.
fn blk_rate(line: &str) -> Option<f64> {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some(field("bytes=")? / field("us=")?.max(1.0))
}

/// A QEMU boot that got to the line it waited for.
struct QemuBoot {
    /// Spawn → the test init's ready line.
    to_ready: Duration,
    /// The line waited for.
    line: String,
    /// QEMU's memory outside guest RAM when the line came.
    rss_kib: u64,
    pss_kib: u64,
}

/// Boots QEMU microvm until a console line has `until`; returns the time to
/// the init's ready line and the `until` line. `disk` is a read-only
/// virtio-blk disk.
fn boot_qemu(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disk: Option<&Path>,
    scratch: &Path,
    until: &str,
) -> Result<QemuBoot, String> {
    let console_path = scratch.join("bench-qemu.console");
    let _ = std::fs::remove_file(&console_path);
    let mut command = DirectBoot {
        machine: &[
            "-M",
            "microvm,rtc=off,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ],
        cpus: 1,
        memory_mib: MEM_MIB,
        kernel,
        initrd,
        cmdline,
        serial_logs: &[&console_path],
    }
    .command();
    if let Some(disk) = disk {
        let mut drive = OsString::from("if=none,id=d0,format=raw,readonly=on,file=");
        drive.push(disk);
        command
            .arg("-drive")
            .arg(drive)
            .args(["-device", "virtio-blk-device,drive=d0"]);
    }
    command.stderr(Stdio::null());
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(&mut command).expect("spawn QEMU");
    let mut console = SerialLog::new(&console_path);
    let mut ready = None;
    loop {
        let _ = console.poll();
        if ready.is_none() && console.line_with(READY).is_some() {
            ready = Some(started.elapsed());
        }
        if let Some(line) = console.line_with(until) {
            let (rss_kib, pss_kib) = memory_outside_guest(qemu.id(), u64::from(MEM_MIB) << 10);
            let _ = qemu.kill();
            return Ok(QemuBoot {
                to_ready: ready.unwrap_or_default(),
                line,
                rss_kib,
                pss_kib,
            });
        }
        if started.elapsed() >= TIMEOUT {
            let _ = qemu.kill();
            return Err(format!("QEMU never got to {until:?}: {}", console.tail(3)));
        }
        if qemu.try_wait().ok().flatten().is_some() {
            return Err(format!("QEMU exited: {}", console.tail(3)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Pids whose program name starts with `name` and whose command line has `with`.
fn pids_with(name: &str, with: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (comm.trim().starts_with(name) && cmdline.contains(with))
                .then(|| e.file_name().to_str()?.parse().ok())
                .flatten()
        })
        .collect()
}

/// Kills, deletes and removes the containers `ids`.
fn remove(containerd: &Containerd, ids: &[String]) {
    for id in ids {
        let _ = containerd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    }
    for id in ids {
        containerd.wait_for_status(id, "STOPPED");
        containerd.ctr_ok(&["task", "delete", id]);
        containerd.ctr_ok(&["containers", "rm", id]);
    }
}

fn version(program: &str, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "not found".into())
}

fn write_outputs(report: &Report, out: &Path) {
    if let Err(e) = std::fs::create_dir_all(out)
        .and_then(|()| std::fs::write(out.join("bench.json"), report.json()))
        .and_then(|()| std::fs::write(out.join("bench.svg"), report.svg()))
    {
        eprintln!("capsid-bench: cannot write {}: {e}", out.display());
        return;
    }
    eprintln!(
        "capsid-bench: wrote {} and {}",
        out.join("bench.json").display(),
        out.join("bench.svg").display()
    );
}

fn main() {
    let args = Args::parse();
    if let Some(Render::Render { json, out }) = &args.render {
        let text = std::fs::read_to_string(json)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", json.display()));
        let parts = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<Vec<Report>, _>>()
            .unwrap_or_else(|e| panic!("{} is not a report: {e}", json.display()));
        let report = Report::merge(parts).unwrap_or_else(|| {
            panic!(
                "{}: no report, or reports of different commits or modes",
                json.display()
            )
        });
        print!("{}", report.table());
        write_outputs(&report, out);
        return;
    }
    let probe = probe();
    if probe.mode != Mode::Native {
        eprintln!(
            "capsid-bench: this machine cannot boot Linux guests ({probe}); `make bench` runs the benchmark inside the nested test host"
        );
        std::process::exit(2);
    }
    let nested = std::env::var_os("CAPSID_TESTBED_NESTED").is_some();
    let rootfs = PathBuf::from(
        std::env::var_os("CAPSID_TEST_ROOTFS_DIR")
            .expect("CAPSID_TEST_ROOTFS_DIR is set by `make bench`"),
    );
    let runs = args.runs.max(1);
    let mut args = args;
    if args.concurrency.is_empty() {
        args.concurrency = if nested { vec![1, 5] } else { vec![1, 5, 10] };
    }
    let density_cap = *args.density_cap.get_or_insert(if nested { 8 } else { 32 });
    let per_k: usize = args
        .concurrency
        .iter()
        .map(|&k| runs.div_ceil(k.max(1)).max(2) + 1)
        .sum();
    let total: usize = args
        .scenarios
        .iter()
        .map(|w| match w {
            Which::Boot | Which::Run | Which::Ctr => runs + 1,
            Which::Concurrent => per_k,
            Which::Footprint => runs.clamp(1, 5) + density_cap,
            Which::Throughput => 2 * (runs.clamp(1, 5) + 1),
        })
        .sum();
    let bench = Bench {
        progress: Progress::new(total as u64, nested),
        scratch: ScratchDir::new("capsid-bench").expect("scratch dir"),
        rootfs,
        counter: std::cell::Cell::new(0),
        failures: std::cell::RefCell::default(),
        boot_retries: std::cell::Cell::default(),
        runc_spec: std::cell::OnceCell::new(),
        no_pivot: nested,
        args: Args { runs, ..args },
    };
    let mode = if nested { "nested" } else { "native" };
    let versions = BTreeMap::from([
        (
            "capsid".to_owned(),
            version(&artifact("CAPSID_CLI").to_string_lossy(), "--version"),
        ),
        (
            "qemu".to_owned(),
            version("qemu-system-x86_64", "--version"),
        ),
        ("runc".to_owned(), version("runc", "--version")),
        ("containerd".to_owned(), version("containerd", "--version")),
    ]);
    let scenarios = bench.scenarios();
    bench.progress.bar.finish_and_clear();
    let report = Report {
        mode: mode.into(),
        probe: probe.to_string(),
        host: Host::this(),
        commit: std::env::var("CAPSID_COMMIT").unwrap_or_else(|_| "unknown".into()),
        versions,
        runs,
        scenarios,
    };
    print!("{}", report.table());
    write_outputs(&report, &bench.args.out);
    // For `make bench`, which relays this from the nested test host.
    println!("BENCH-JSON {}", report.json());
    // Sporadic failures are reported in the notes; a series that never
    // succeeded means the benchmark itself is broken.
    let empty: Vec<String> = report
        .scenarios
        .iter()
        .flat_map(|s| {
            s.series
                .iter()
                .filter(|x| x.samples.is_empty())
                .map(move |x| format!("{}: {}", s.name, x.name))
        })
        .collect();
    if !empty.is_empty() {
        eprintln!(
            "capsid-bench: no sample at all for {}: every run failed (the notes say why)",
            empty.join("; ")
        );
        std::process::exit(1);
    }
}
