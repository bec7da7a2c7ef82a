//! Boot benchmark: cocoon-vmm against QEMU's `microvm` machine, the same
//! kernel, initramfs and KVM, alternating boots so that drift hits both.
//!
//! Prints figures; never passes or fails on a time. Run through
//! `make bench-boot`, which builds what it needs and, on a machine without
//! a KVM that boots Linux, runs it inside the nested test host.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cocoon_e2e::vmm::{VmmRun, parse_times};
use cocoon_e2e::{artifact, initramfs_with_init};
use cocoon_testbed::ScratchDir;
use cocoon_testbed::child::ChildGuard;
use cocoon_testbed::probe::{Mode, probe};
use cocoon_testbed::qemu::DirectBoot;
use cocoon_testbed::serial::SerialLog;

const READY: &str = "COCOON-TEST-INIT: ready";
const IDLE: &str = "COCOON-TEST-INIT: step hang waiting";
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct Samples {
    /// Spawn to the init's ready line on the console, ms.
    to_ready: Vec<f64>,
    /// The VMM's own figures, ms since its start: ready to run vCPUs, and the boot marker.
    vmm_ready: Vec<f64>,
    vmm_marker: Vec<f64>,
    /// VMM CPU time at the boot marker, ms.
    vmm_marker_cpu: Vec<f64>,
    /// Host memory of the VMM process outside guest RAM, MiB.
    rss: Vec<f64>,
    pss: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn boot_ours(vmm: &Path, base: &[OsString], scratch: &Path, mem_mib: u32, s: &mut Samples) {
    let mut run = VmmRun::start(vmm, base, scratch, "bench-cocoon");
    let (_, to_ready) = run.wait_for_line(READY, TIMEOUT);
    run.wait_for_line(IDLE, TIMEOUT);
    let (rss, pss) = cocoon_e2e::memory_outside_guest(run.pid(), u64::from(mem_mib) << 10);
    let pid = i32::try_from(run.pid()).unwrap_or(0);
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = run.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(143), "{status}\n{}", run.describe());
    let times = parse_times(&run.log());
    s.to_ready.push(ms(to_ready));
    s.vmm_ready
        .push(times.ready_us.unwrap_or(0) as f64 / 1000.0);
    s.vmm_marker
        .push(times.marker_us.unwrap_or(0) as f64 / 1000.0);
    s.vmm_marker_cpu
        .push(times.marker_cpu_us.unwrap_or(0) as f64 / 1000.0);
    s.rss.push(rss as f64 / 1024.0);
    s.pss.push(pss as f64 / 1024.0);
}

fn boot_qemu(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    scratch: &Path,
    mem_mib: u32,
    s: &mut Samples,
) {
    let console_path = scratch.join("bench-qemu.console");
    let _ = std::fs::remove_file(&console_path);
    let mut command = DirectBoot {
        machine: &["-M", "microvm,rtc=off", "-accel", "kvm", "-cpu", "host"],
        cpus: 1,
        memory_mib: mem_mib,
        kernel,
        initrd,
        cmdline,
        serial_logs: &[&console_path],
    }
    .command();
    command.stderr(std::process::Stdio::null());
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(&mut command).expect("spawn QEMU");
    let mut console = SerialLog::new(&console_path);
    let mut to_ready = None;
    loop {
        let _ = console.poll();
        if to_ready.is_none() && console.line_with(READY).is_some() {
            to_ready = Some(started.elapsed());
        }
        if console.line_with(IDLE).is_some() {
            break;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "QEMU never booted:\n{}",
            console.tail(20)
        );
        assert!(
            qemu.try_wait().ok().flatten().is_none(),
            "QEMU exited:\n{}",
            console.tail(20)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (rss, pss) = cocoon_e2e::memory_outside_guest(qemu.id(), u64::from(mem_mib) << 10);
    let _ = qemu.kill();
    s.to_ready.push(ms(to_ready.unwrap_or_default()));
    s.rss.push(rss as f64 / 1024.0);
    s.pss.push(pss as f64 / 1024.0);
}

/// Nearest-rank percentile, `p` in percent.
fn percentile(samples: &[f64], p: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

fn row(name: &str, unit: &str, samples: &[f64]) -> String {
    format!(
        "{name:<44} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {unit}",
        percentile(samples, 50),
        percentile(samples, 90),
        percentile(samples, 99),
        percentile(samples, 100),
    )
}

fn json_array(samples: &[f64]) -> String {
    let items: Vec<String> = samples.iter().map(|v| format!("{v:.3}")).collect();
    format!("[{}]", items.join(","))
}

#[derive(Clone, Copy, Debug)]
enum Peer {
    Cocoon,
    QemuMicrovm,
}

/// What every boot of the run shares.
struct Bench {
    vmm: PathBuf,
    base: Vec<OsString>,
    kernel: PathBuf,
    initrd: PathBuf,
    qemu_cmdline: String,
    scratch: ScratchDir,
    mem_mib: u32,
}

impl Bench {
    fn boot(&self, peer: Peer, samples: &mut Samples) {
        let scratch = self.scratch.path();
        match peer {
            Peer::Cocoon => boot_ours(&self.vmm, &self.base, scratch, self.mem_mib, samples),
            Peer::QemuMicrovm => boot_qemu(
                &self.kernel,
                &self.initrd,
                &self.qemu_cmdline,
                scratch,
                self.mem_mib,
                samples,
            ),
        }
    }
}

fn main() {
    let boots: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);
    let mem_mib = 128;
    let probe = probe();
    if probe.mode != Mode::Native {
        eprintln!(
            "cocoon-boot-bench: this machine cannot boot Linux guests ({probe}); run it with `make bench-boot`"
        );
        std::process::exit(2);
    }
    let nested = std::env::var_os("COCOON_TESTBED_NESTED").is_some();
    let scratch = ScratchDir::new("cocoon-bench").expect("scratch dir");
    let kernel = artifact("COCOON_KERNEL");
    let initrd = initramfs_with_init(&artifact("COCOON_TEST_INIT"), &scratch.join("init.cpio"));
    let initrd_kib = std::fs::metadata(&initrd)
        .map(|m| m.len() / 1024)
        .unwrap_or(0);
    let steps = "cocoon_test=marker,hang";
    let base: Vec<OsString> = vec![
        "--kernel".into(),
        kernel.clone().into(),
        "--initrd".into(),
        initrd.clone().into(),
        "--cmdline".into(),
        format!("console=ttyS0 reboot=k panic=-1 quiet {steps}").into(),
        "--mem-mib".into(),
        mem_mib.to_string().into(),
    ];
    let bench = Bench {
        vmm: artifact("COCOON_VMM"),
        base,
        kernel,
        initrd,
        // microvm has no i8042; the guest never reboots here anyway.
        qemu_cmdline: format!("console=ttyS0 reboot=t panic=-1 quiet {steps}"),
        scratch,
        mem_mib,
    };

    let (mut ours, mut qemu) = (Samples::default(), Samples::default());
    // One warm-up boot of each, not counted.
    bench.boot(Peer::Cocoon, &mut Samples::default());
    bench.boot(Peer::QemuMicrovm, &mut Samples::default());
    for i in 0..boots {
        // A B B A: neither always goes first.
        let order = if i % 2 == 0 {
            [Peer::Cocoon, Peer::QemuMicrovm]
        } else {
            [Peer::QemuMicrovm, Peer::Cocoon]
        };
        for peer in order {
            let samples = match peer {
                Peer::Cocoon => &mut ours,
                Peer::QemuMicrovm => &mut qemu,
            };
            bench.boot(peer, samples);
        }
        eprintln!("cocoon-boot-bench: {}/{boots} boots of each", i + 1);
    }

    let ratio = percentile(&qemu.to_ready, 50) / percentile(&ours.to_ready, 50);
    println!("cocoon boot benchmark: {boots} boots each after one warm-up, 1 vCPU, {mem_mib} MiB,");
    println!(
        "  kernel {} ({initrd_kib} KiB initramfs), {probe}",
        bench.kernel.display()
    );
    if nested {
        println!(
            "  NESTED MODE: this KVM runs inside QEMU TCG; absolute times are inflated many-fold"
        );
        println!(
            "  and only the ratio against the peer, measured in the same run, means anything."
        );
    }
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9}",
        "", "p50", "p90", "p99", "max"
    );
    let table = [
        (
            "cocoon-vmm: spawn -> init ready on console",
            "ms",
            &ours.to_ready,
        ),
        (
            "QEMU microvm: spawn -> init ready on console",
            "ms",
            &qemu.to_ready,
        ),
        (
            "cocoon-vmm: process start -> vCPUs ready",
            "ms",
            &ours.vmm_ready,
        ),
        (
            "cocoon-vmm: process start -> boot marker",
            "ms",
            &ours.vmm_marker,
        ),
        (
            "cocoon-vmm: VMM CPU time at boot marker",
            "ms",
            &ours.vmm_marker_cpu,
        ),
        ("cocoon-vmm: RSS outside guest RAM", "MiB", &ours.rss),
        ("cocoon-vmm: PSS outside guest RAM", "MiB", &ours.pss),
        ("QEMU microvm: RSS outside guest RAM", "MiB", &qemu.rss),
        ("QEMU microvm: PSS outside guest RAM", "MiB", &qemu.pss),
    ];
    for (name, unit, samples) in &table {
        println!("{}", row(name, unit, samples));
    }
    println!("boot ratio (p50 QEMU / p50 cocoon-vmm, spawn -> init ready): {ratio:.2}x");
    let series: Vec<String> = table
        .iter()
        .map(|(name, unit, samples)| {
            format!(
                "{{\"name\":\"{name}\",\"unit\":\"{unit}\",\"samples\":{}}}",
                json_array(samples)
            )
        })
        .collect();
    println!(
        "BENCH-JSON {{\"boots\":{boots},\"mem_mib\":{mem_mib},\"mode\":\"{}\",\"ratio_p50\":{ratio:.3},\"series\":[{}]}}",
        if nested { "nested" } else { "native" },
        series.join(",")
    );
}
