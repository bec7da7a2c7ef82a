//! The nested test host: a QEMU TCG machine with `-cpu max` (which exposes AMD
//! SVM with nested paging) running Debian's cloud kernel with `kvm-amd`, so a
//! working `/dev/kvm` exists inside it even where the outer machine has none.
//!
//! Everything the command needs travels in the host's initramfs at its own
//! absolute path (programs with their shared libraries), so the very same test
//! binary runs inside unchanged:
//!
//! ```text
//!  outer test-bed                         test host (QEMU TCG, cloud kernel)
//!  ─────────────────                      ──────────────────────────────────
//!  initramfs: busybox, modules,      ──▶  /init: mount, insmod irqbypass kvm kvm-amd overlay
//!    the command, --with paths             run.sh: env, cwd, the command
//!  ttyS0 → console.log (kernel)            kernel messages
//!  ttyS1 → output.log, echoed live   ◀──   command stdout+stderr,
//!                                          "CAPSID-TESTBED-EXIT <code>", poweroff
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use std::{fs, io, thread};

use crate::child::ChildGuard;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::qemu::DirectBoot;
use crate::scratch::ScratchDir;
use crate::serial::SerialLog;

/// Printed by the test host's init when it is about to run the command.
pub const READY_MARKER: &str = "CAPSID-TESTBED-READY";
/// Printed by the test host's init with the command's exit code.
pub const EXIT_MARKER: &str = "CAPSID-TESTBED-EXIT";
/// The test host's kernel modules, in load order, and where Debian's
/// package has them: the three that give it `/dev/kvm`, overlayfs (for
/// containerd's default snapshotter), tun (the taps virtio-net serves),
/// veth, what the runtime redirects a sandbox's traffic with (the
/// ingress qdisc, the u32 classifier, the mirred action), nftables
/// with NAT for `capsid run --network nat` (and conntrack matches for its
/// egress filter), and the bridge CNI's bridge
/// for the CRI tests. The test host has no modprobe that could load them
/// on demand.
const HOST_MODULES: [(&str, &str); 23] = [
    ("irqbypass", "virt/lib/irqbypass.ko"),
    ("kvm", "arch/x86/kvm/kvm.ko"),
    ("kvm-amd", "arch/x86/kvm/kvm-amd.ko"),
    ("overlay", "fs/overlayfs/overlay.ko"),
    ("tun", "drivers/net/tun.ko"),
    ("veth", "drivers/net/veth.ko"),
    ("sch_ingress", "net/sched/sch_ingress.ko"),
    ("cls_u32", "net/sched/cls_u32.ko"),
    ("act_mirred", "net/sched/act_mirred.ko"),
    ("nfnetlink", "net/netfilter/nfnetlink.ko"),
    ("libcrc32c", "lib/libcrc32c.ko"),
    ("nf_tables", "net/netfilter/nf_tables.ko"),
    ("nf_defrag_ipv4", "net/ipv4/netfilter/nf_defrag_ipv4.ko"),
    ("nf_defrag_ipv6", "net/ipv6/netfilter/nf_defrag_ipv6.ko"),
    ("nf_conntrack", "net/netfilter/nf_conntrack.ko"),
    ("nf_nat", "net/netfilter/nf_nat.ko"),
    ("nft_chain_nat", "net/netfilter/nft_chain_nat.ko"),
    ("nft_masq", "net/netfilter/nft_masq.ko"),
    ("nft_nat", "net/netfilter/nft_nat.ko"),
    ("nft_ct", "net/netfilter/nft_ct.ko"),
    ("llc", "net/llc/llc.ko"),
    ("stp", "net/802/stp.ko"),
    ("bridge", "net/bridge/bridge.ko"),
];
/// Where the testbed binary itself goes in the test host, for `hold-kvm`.
const HOLD_KVM_PROGRAM: &str = "/testbed/capsid-testbed";

/// Holds one idle VM (in-kernel irqchip, one vCPU that never runs) open
/// until the process is killed. Run in the test host for the whole run.
///
/// Why: creating the first VM and destroying the last one makes KVM enable
/// and disable SVM on every CPU by IPI, and a VM's LAPIC coming and going
/// flips KVM's `apic_hw_disabled`/`apic_sw_disabled` static keys, which
/// patches kernel text with int3 breakpoints. Under multi-threaded TCG that
/// patching intermittently left one test-host CPU looping on the int3 while
/// the other spun on a lock (seen with the QEMU monitor, after some tens of
/// guest boots, with capsid-vmm and QEMU alike). With one VM always alive,
/// these counts never fall to zero and the kernel text is left alone.
pub fn hold_kvm() -> Result<(), kvm_ioctls::Error> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    let _vcpu = vm.create_vcpu(0)?;
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

/// kvm-amd features the TCG-emulated SVM handles poorly: with virtual GIF and
/// virtual VMLOAD/VMSAVE on, the test host wedged or crashed after some tens
/// of guest boots.
const KVM_AMD_ARGS: &str = "vgif=0 vls=0";
const BUSYBOX: &str = "/bin/busybox";

/// Why a command in the nested test host did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// The test host's kernel or a module is missing.
    #[error("test host kernel: {0}")]
    HostKernel(String),
    /// The command cannot be run inside (e.g. a path outside the trees copied in).
    #[error("command: {0}")]
    Command(String),
    /// The test host's initramfs could not be built.
    #[error("cannot build the test host's initramfs")]
    Initramfs(#[source] InitramfsError),
    /// QEMU could not be started.
    #[error("cannot start qemu-system-x86_64 (install Debian's qemu-system-x86)")]
    Spawn(#[source] io::Error),
    /// The console or a file could not be read or written.
    #[error("i/o error while running the test host")]
    Io(#[source] io::Error),
    /// The test host stopped before the command's end was reported.
    #[error(
        "the test host stopped ({status}) before the command finished; last console lines:\n{console}"
    )]
    HostDied {
        /// QEMU's exit status.
        status: String,
        /// The test host's last console lines.
        console: String,
    },
    /// The command outlived the run's limit.
    #[error("the command did not finish within {timeout:?}; last console lines:\n{console}")]
    Timeout {
        /// The limit that passed.
        timeout: Duration,
        /// The test host's last console lines.
        console: String,
    },
    /// The test host itself stopped making progress: no output for
    /// `silence` while the kernel reported a lockup or stall, or no output
    /// at all for `NestedRun::stall`. Not a failure of the command.
    #[error(
        "the test host wedged (no output for {silence:?}{lockup}); \
         last console lines:\n{console}\nCPU registers (QEMU monitor):\n{registers}"
    )]
    Wedged {
        /// How long nothing came.
        silence: Duration,
        /// What the kernel reported (a soft lockup, an RCU stall), or empty.
        lockup: &'static str,
        /// The test host's last console lines.
        console: String,
        /// The vCPUs' registers, from QEMU's monitor.
        registers: String,
    },
    /// Stopped early by a signal (`NestedRun::stop`).
    #[error("interrupted")]
    Interrupted,
}

/// Debian's cloud kernel and the modules the test host loads, from its package.
#[derive(Debug, Clone)]
pub struct HostKernel {
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// The modules the test host loads (kvm, kvm-amd, vsock …), in load order.
    pub modules: Vec<PathBuf>,
    /// The kernel's release (`uname -r`).
    pub release: String,
}

impl HostKernel {
    /// Finds the kernel in an extracted `linux-image-*-cloud-amd64` package
    /// (the directory `tests/testhost/fetch-kernel.sh` prints).
    pub fn from_dir(dir: &Path) -> Result<Self, NestedError> {
        let missing = |what: String| {
            NestedError::HostKernel(format!(
                "{what} not found under {} (run tests/testhost/fetch-kernel.sh)",
                dir.display()
            ))
        };
        let vmlinuz = fs::read_dir(dir.join("boot"))
            .map_err(|_| missing("boot/".into()))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or_else(|| missing("boot/vmlinuz-*".into()))?;
        let release = vmlinuz
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches("vmlinuz-")
                    .to_owned()
            })
            .unwrap_or_default();
        let module_dir = dir.join("lib/modules").join(&release).join("kernel");
        let modules = HOST_MODULES
            .iter()
            .map(|(_, p)| module_dir.join(p))
            .map(|p| {
                if p.exists() {
                    Ok(p)
                } else {
                    Err(missing(p.display().to_string()))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vmlinuz,
            modules,
            release,
        })
    }
}

/// One command run inside a freshly booted test host.
#[derive(Debug)]
pub struct NestedRun<'a> {
    /// The test host's kernel.
    pub kernel: &'a HostKernel,
    /// The program and its arguments, as on the outer machine.
    pub command: Vec<String>,
    /// More host paths the command needs (programs, files, trees).
    pub with: Vec<PathBuf>,
    /// Environment for the command inside.
    pub env: Vec<(String, String)>,
    /// The working directory of the command.
    pub cwd: PathBuf,
    /// The test host's CPUs.
    pub cpus: u32,
    /// QEMU's TCG threading for the test host: "multi" or "single".
    pub tcg_thread: &'a str,
    /// The test host's memory, in MiB.
    pub memory_mib: u32,
    /// The limit for the whole run, boot included.
    pub timeout: Duration,
    /// No output at all for this long means the test host is wedged (the
    /// command's own steps have shorter timeouts and report themselves).
    pub stall: Duration,
    /// Set from a signal handler to stop early; QEMU is killed, files removed.
    pub stop: &'a AtomicBool,
}

/// What happened inside.
#[derive(Debug)]
pub struct NestedOutcome {
    /// The command's exit code.
    pub exit_code: i32,
    /// The size of the test host's initramfs (the command and what it needs).
    pub initramfs_bytes: u64,
    /// From QEMU's start until the host's init was about to run the command.
    pub boot_time: Duration,
    /// From QEMU's start until the command's exit was reported.
    pub total_time: Duration,
}

impl NestedRun<'_> {
    /// Boots the test host, runs the command there echoing its output to our
    /// stdout, and returns its exit code. QEMU and every file made for the run
    /// are gone when this returns, whatever the outcome.
    pub fn run(&self) -> Result<NestedOutcome, NestedError> {
        let scratch = ScratchDir::new("capsid-testbed").map_err(NestedError::Io)?;
        let initrd = scratch.join("testhost.cpio");
        let initramfs_bytes = self.build_initramfs(&initrd)?;

        let console_log = scratch.join("console.log");
        let output_log = scratch.join("output.log");
        let accel = format!("tcg,thread={}", self.tcg_thread);
        let mut qemu = DirectBoot {
            machine: &["-accel", &accel, "-cpu", "max"],
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            kernel: &self.kernel.vmlinuz,
            initrd: &initrd,
            // No transparent huge pages: khugepaged's TLB-flush IPIs are what
            // a wedged test host was last seen waiting on (a CPU inside a
            // nested guest never answered them).
            cmdline: "console=ttyS0 panic=-1 mitigations=off nokaslr transparent_hugepage=never",
            serial_logs: &[&console_log, &output_log],
        }
        .command();
        let mut monitor = std::ffi::OsString::from("unix:");
        monitor.push(scratch.join("monitor.sock"));
        monitor.push(",server=on,wait=off");
        qemu.arg("-monitor").arg(monitor);
        qemu.stderr(fs::File::create(scratch.join("qemu.log")).map_err(NestedError::Io)?);
        let start = Instant::now();
        let mut qemu = ChildGuard::spawn(&mut qemu).map_err(NestedError::Spawn)?;

        let mut console = SerialLog::new(&console_log);
        let mut output = SerialLog::new(&output_log);
        let mut boot_time = None;
        let mut last_output = Instant::now();
        let stdout = io::stdout();
        loop {
            // Checked before reading the output, so that output written just
            // before an exit is read in this same round.
            let exited = qemu.try_wait().map_err(NestedError::Io)?;
            let fresh = output.poll().map_err(NestedError::Io)?;
            if !fresh.is_empty() {
                last_output = Instant::now();
                let mut out = stdout.lock();
                out.write_all(fresh).map_err(NestedError::Io)?;
                out.flush().map_err(NestedError::Io)?;
            }
            if boot_time.is_none() && output.line_with(READY_MARKER).is_some() {
                boot_time = Some(start.elapsed());
            }
            if let Some(code) = exit_code(&output) {
                let total_time = start.elapsed();
                // The host powers itself off; give it a moment, then force it.
                if qemu
                    .wait_timeout(Duration::from_secs(30))
                    .map_err(NestedError::Io)?
                    .is_none()
                {
                    qemu.kill().map_err(NestedError::Io)?;
                }
                return Ok(NestedOutcome {
                    exit_code: code,
                    initramfs_bytes,
                    boot_time: boot_time.unwrap_or(total_time),
                    total_time,
                });
            }
            if let Some(status) = exited {
                console.poll().map_err(NestedError::Io)?;
                let qemu_log = fs::read_to_string(scratch.join("qemu.log")).unwrap_or_default();
                return Err(NestedError::HostDied {
                    status: status.to_string(),
                    console: format!("{}\n{}", console.tail(40), qemu_log.trim()),
                });
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(NestedError::Interrupted);
            }
            let silence = last_output.elapsed();
            if silence > LOCKUP_GRACE.min(self.stall) {
                console.poll().map_err(NestedError::Io)?;
                let lockup = LOCKUP_SIGNS.iter().find(|s| console.line_with(s).is_some());
                if lockup.is_some() || silence > self.stall {
                    return Err(NestedError::Wedged {
                        silence,
                        lockup: lockup.map_or("", |_| ", and the kernel reported a lockup"),
                        console: console.tail(40),
                        registers: monitor_registers(&scratch.join("monitor.sock")),
                    });
                }
            }
            if start.elapsed() > self.timeout {
                console.poll().map_err(NestedError::Io)?;
                return Err(NestedError::Timeout {
                    timeout: self.timeout,
                    console: console.tail(40),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn build_initramfs(&self, path: &Path) -> Result<u64, NestedError> {
        let mut archive = Initramfs::create(path).map_err(NestedError::Initramfs)?;
        let add = |archive: &mut Initramfs, path: &Path| {
            archive.add_path(path).map_err(NestedError::Initramfs)
        };
        add(&mut archive, Path::new(BUSYBOX))?;
        for ((name, _), module) in HOST_MODULES.iter().zip(&self.kernel.modules) {
            archive
                .file(&format!("/lib/testbed/{name}.ko"), module)
                .map_err(NestedError::Initramfs)?;
        }
        let program = resolve_program(&self.command[0])?;
        add(&mut archive, &program)?;
        let testbed = std::env::current_exe().map_err(NestedError::Io)?;
        archive
            .add_program_as(HOLD_KVM_PROGRAM, &testbed)
            .map_err(NestedError::Initramfs)?;
        for path in &self.with {
            add(&mut archive, path)?;
        }
        archive
            .bytes("/init", init_script().as_bytes(), 0o755)
            .map_err(NestedError::Initramfs)?;
        let mut command = self.command.clone();
        command[0] = program.to_string_lossy().into_owned();
        archive
            .bytes(
                "/testbed/run.sh",
                run_script(&self.env, &self.cwd, &command).as_bytes(),
                0o755,
            )
            .map_err(NestedError::Initramfs)?;
        archive.finish().map_err(NestedError::Initramfs)
    }
}

/// How long the output may be silent once the kernel has reported a lockup.
const LOCKUP_GRACE: Duration = Duration::from_secs(120);
/// Kernel messages of a CPU that stopped answering.
const LOCKUP_SIGNS: [&str; 3] = [
    "BUG: soft lockup",
    "rcu_sched detected stalls",
    "csd: CSD lock",
];

/// Every vCPU's registers from the QEMU monitor, for the report of a wedge.
fn monitor_registers(socket: &Path) -> String {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let ask = || -> io::Result<String> {
        let mut monitor = UnixStream::connect(socket)?;
        monitor.set_read_timeout(Some(Duration::from_secs(5)))?;
        monitor.write_all(b"info registers -a\n")?;
        thread::sleep(Duration::from_secs(2));
        let mut answer = vec![0; 256 * 1024];
        let n = monitor.read(&mut answer)?;
        let text = String::from_utf8_lossy(&answer[..n]).into_owned();
        Ok(text
            .lines()
            .filter(|l| l.starts_with("CPU#") || l.starts_with("RIP=") || l.starts_with("CR0="))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    ask().unwrap_or_else(|e| format!("(monitor unavailable: {e})"))
}

/// The exit code from the host's `CAPSID-TESTBED-EXIT <code>` line, if seen.
fn exit_code(output: &SerialLog) -> Option<i32> {
    let line = output.line_with(EXIT_MARKER)?;
    line.split_whitespace().last()?.parse().ok()
}

fn resolve_program(name: &str) -> Result<PathBuf, NestedError> {
    let candidate = Path::new(name);
    if candidate.components().count() > 1 {
        return candidate
            .canonicalize()
            .map_err(|e| NestedError::Command(format!("{name}: {e}")));
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| NestedError::Command(format!("{name} not found in PATH")))
}

/// Single-quotes a word for the POSIX shell.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn run_script(env: &[(String, String)], cwd: &Path, command: &[String]) -> String {
    let mut script = String::from("#!/bin/sh\n");
    for (key, value) in env {
        script += &format!("export {key}={}\n", shell_quote(value));
    }
    let cwd = shell_quote(&cwd.to_string_lossy());
    script += &format!("mkdir -p {cwd} && cd {cwd}\n");
    let words: Vec<String> = command.iter().map(|w| shell_quote(w)).collect();
    script += &format!("exec {}\n", words.join(" "));
    script
}

fn init_script() -> String {
    let modules: Vec<String> = HOST_MODULES
        .iter()
        .map(|(m, _)| format!("/lib/testbed/{m}.ko"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run /root
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# /tmp stays on the initramfs (a tmpfs itself), so --with paths under /tmp are visible.
ip link set lo up 2>/dev/null
# What every node has, and containerd's CRI copies into each pod.
mkdir -p /etc
[ -e /etc/hosts ] || printf '127.0.0.1 localhost\n::1 localhost\n' > /etc/hosts
[ -e /etc/resolv.conf ] || printf 'nameserver 127.0.0.1\n' > /etc/resolv.conf
out=/dev/ttyS1
stty -F $out raw -echo
for m in {modules}; do
    args=
    case $m in */kvm-amd.ko) args="{kvm_amd_args}" ;; esac
    insmod $m $args || echo "testbed: insmod $m failed" > $out
done
[ -c /dev/kvm ] || echo "testbed: the test host has no /dev/kvm" > $out
# One idle VM held open for the whole run (see hold_kvm).
{hold_kvm} hold-kvm &
echo "{READY_MARKER} kernel $(uname -r), $(nproc) vCPUs" > $out
HOME=/root PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin TMPDIR=/tmp \
    /bin/sh /testbed/run.sh > $out 2>&1 < /dev/null
echo "{EXIT_MARKER} $?" > $out
sync
poweroff -f
"#,
        modules = modules.join(" "),
        kvm_amd_args = KVM_AMD_ARGS,
        hold_kvm = HOLD_KVM_PROGRAM,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_script_quotes_everything() {
        let script = run_script(
            &[("CAPSID_X".into(), "it's".into())],
            Path::new("/work/a b"),
            &["/bin/echo".into(), "$HOME".into()],
        );
        assert!(script.contains("export CAPSID_X='it'\\''s'\n"));
        assert!(script.contains("cd '/work/a b'\n"));
        assert!(script.ends_with("exec '/bin/echo' '$HOME'\n"));
    }

    #[test]
    fn init_loads_kvm_modules_in_dependency_order() {
        let init = init_script();
        let at = |m: &str| init.find(&format!("/lib/testbed/{m}.ko")).unwrap();
        assert!(at("irqbypass") < at("kvm") && at("kvm") < at("kvm-amd"));
        // Each after what its `depends=` names (the test host has no modprobe).
        for (module, needs) in [
            ("nf_tables", &["nfnetlink", "libcrc32c"][..]),
            (
                "nf_conntrack",
                &["nf_defrag_ipv4", "nf_defrag_ipv6", "libcrc32c"],
            ),
            ("nf_nat", &["nf_conntrack"]),
            ("nft_chain_nat", &["nf_tables", "nf_nat"]),
            ("nft_masq", &["nf_tables", "nf_nat", "nf_conntrack"]),
            ("nft_nat", &["nf_tables", "nf_nat", "nf_conntrack"]),
        ] {
            for need in needs {
                assert!(at(need) < at(module), "{need} before {module}");
            }
        }
        assert!(init.contains(EXIT_MARKER));
    }
}
