//! `capsid-bench` (`capsid bench`, `make bench`): start-up latency,
//! footprint, density and throughput of capsid, each measured side by side
//! with a peer on the same host in the same run.
//!
//! | scenario     | ours                                         | peer                              |
//! |--------------|----------------------------------------------|-----------------------------------|
//! | `boot`       | capsid-vmm spawn → test init ready; → agent  | QEMU `microvm`, same kernel+initrd |
//! | `run`        | `capsid run -- true`, `-- echo hi`           | runc and gVisor, same rootfs      |
//! | `ctr`        | `ctr run --rm` with our shim                 | `io.containerd.runc.v2` with runc, and with gVisor's `runsc` |
//! | `concurrent` | K `capsid run` at once                       | K `runc run` at once              |
//! | `footprint`  | shim + VMM PSS per sandbox; how many fit     | runc's and gVisor's shim + sandbox |
//! | `throughput` | guest stdout → host, virtio-blk cold read    | runc stdout; QEMU virtio-blk      |
//! | `net`        | TCP host ↔ sandbox over a pod's namespace    | runc in the same namespace        |
//!
//! Method: every time is taken here, outside the measured processes
//! (spawn → first byte on the pipe → exit), except the VMM's own boot
//! marker. Ours and the peer alternate (A B B A …; with gVisor as a
//! second peer, the order rotates A B C, B C A, …) so drift hits all, each
//! after one warm-up that is not counted. Every sample is kept and printed
//! in the JSON; nothing passes or fails on a time.
//!
//! `capsid-bench render FILE.json --out DIR` renders a report measured
//! elsewhere (the nested test host) into the table and SVG.
//!
//! Layout: one module per scenario (`boot.rs`, `run.rs`, …, each a method
//! of [`Bench`]); `guests.rs` boots the test-init guests; what every
//! scenario shares is here; the report (and its table, JSON and SVG) is
//! the library's `capsid_bench::report`. Guests, containerd and the
//! artefacts come from the test bed (`capsid_testbed`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsid_bench::report::{Comparison, Host, Report, Scenario, Series, Who};
use capsid_runtime::vmm_api::{DEFAULT_CMDLINE, DiskConfig, VmConfig};
use capsid_testbed::agent::AgentVm;
use capsid_testbed::child::ChildGuard;
use capsid_testbed::containerd::{BUSYBOX, Containerd, RUNTIME};
use capsid_testbed::probe::{Mode, probe};
use capsid_testbed::procfs::{memory_outside_guest, pss_kib};
use capsid_testbed::qemu::DirectBoot;
use capsid_testbed::serial::SerialLog;
use capsid_testbed::vmm::{VmmRun, parse_times};
use capsid_testbed::{ScratchDir, artifact, initramfs_with_init};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

mod boot;
mod concurrent;
mod ctr;
mod footprint;
mod guests;
mod gvisor;
mod net;
mod run;
mod throughput;
mod warm;

use guests::TestInitGuest;
use gvisor::Runtime;

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
        default_value = "boot,run,ctr,concurrent,footprint,throughput,net,warm"
    )]
    scenarios: Vec<Which>,
    /// Micro-VMs of each kind running at once when `warm` measures their
    /// memory.
    #[arg(long, default_value_t = 10)]
    clones: usize,
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
    /// Runs PROGRAM with a root that is a mount of its own, in a mount
    /// namespace of its own: what gVisor's `runsc` needs where `/` is an
    /// initramfs (the nested test host), which it cannot `pivot_root` out
    /// of. The `ctr` scenario's `--runc-binary` wrapper calls it.
    #[command(hide = true)]
    InMovedRoot {
        /// An empty directory to bind `/` at.
        #[arg(long)]
        at: PathBuf,
        program: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
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
    Net,
    Warm,
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
    /// gVisor's runsc, the second peer, when it is installed.
    runsc: Option<PathBuf>,
    /// The `--runc-binary` script that starts runsc in a moved root.
    runsc_wrapper: std::cell::OnceCell<PathBuf>,
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
        self.capsid_run_with(&[], command)
    }

    /// [`Self::capsid_run`] with more `capsid run` options.
    fn capsid_run_with(&self, options: &[OsString], command: &[&str]) -> Command {
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
        .args(options)
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
        self.runc_run_in(command, None)
    }

    /// [`Self::runc_run`], in the network namespace at `netns` if given.
    fn runc_run_in(&self, command: &[&str], netns: Option<&Path>) -> Command {
        let (bundle, id) = self.bundle("runc", command, netns);
        let mut cmd = Command::new("runc");
        cmd.args(["run", "--bundle"]).arg(&bundle);
        if self.no_pivot {
            cmd.arg("--no-pivot");
        }
        cmd.arg(id);
        cmd
    }

    /// A bundle (and a container id) from `runc spec`'s default, over the
    /// same rootfs (read-only), running `command`, in the network
    /// namespace at `netns` if given.
    fn bundle(&self, prefix: &str, command: &[&str], netns: Option<&Path>) -> (PathBuf, String) {
        let id = self.unique(prefix);
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
        if let Some(netns) = netns
            && let Some(namespaces) = config["linux"]["namespaces"].as_array_mut()
        {
            for ns in namespaces.iter_mut().filter(|ns| ns["type"] == "network") {
                ns["path"] = netns.to_string_lossy().into_owned().into();
            }
        }
        std::fs::write(&path, config.to_string()).expect("write config.json");
        (bundle, id)
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
                Which::Net => self.net(),
                Which::Warm => self.warm(),
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

    /// `ctr run` options for `runtime`: our shim, or containerd's runc
    /// shim running runc or runsc.
    fn ctr_runtime_of(&self, runtime: Runtime) -> Vec<String> {
        match runtime {
            Runtime::Capsid => self
                .ctr_runtime(true)
                .into_iter()
                .map(String::from)
                .collect(),
            Runtime::Runc => self
                .ctr_runtime(false)
                .into_iter()
                .map(String::from)
                .collect(),
            Runtime::Gvisor => vec![
                "--runtime".into(),
                "io.containerd.runc.v2".into(),
                "--runc-binary".into(),
                self.runsc_for_shim().to_string_lossy().into_owned(),
            ],
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

/// One quantity, measured for ours and for each peer of a scenario.
struct Among {
    ours: Series,
    peers: Vec<(Runtime, Series)>,
}

impl Among {
    /// `name(runtime)` names each series; the first of `runtimes` is ours.
    fn new(runtimes: &[Runtime], name: impl Fn(Runtime) -> String, unit: &str) -> Self {
        Self {
            ours: Series::new(name(Runtime::Capsid), unit, Who::Ours),
            peers: runtimes
                .iter()
                .filter(|&&r| r != Runtime::Capsid)
                .map(|&r| (r, Series::new(name(r), unit, Who::Peer)))
                .collect(),
        }
    }

    fn of(&mut self, runtime: Runtime) -> &mut Series {
        match self.peers.iter_mut().find(|(r, _)| *r == runtime) {
            Some((_, series)) => series,
            None => &mut self.ours,
        }
    }

    /// Adds every series, and ours against each peer, to `scenario`.
    fn into(self, scenario: &mut Scenario, what: &str) {
        let peers = self
            .peers
            .into_iter()
            .map(|(r, series)| (r.name(), series))
            .collect();
        scenario.compare_each(what, self.ours, peers);
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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
    if let Some(Render::InMovedRoot { at, program, args }) = &args.render {
        gvisor::in_moved_root(at, program, args);
    }
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
            Which::Net => runs.clamp(1, 5) + 1,
            Which::Warm => runs + 1,
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
        runsc: gvisor::find_runsc(),
        runsc_wrapper: std::cell::OnceCell::new(),
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
        ("gvisor".to_owned(), version("runsc", "--version")),
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
