//! capsid-vmm end to end: our kernel and the test init in a micro-VM, every
//! device used from inside the guest and checked from the host.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_testbed::ScratchDir;
use capsid_testbed::vmm::{VmmRun, parse_times};
use capsid_testbed::{artifact, initramfs_with_init};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
const STEP: &str = "CAPSID-TEST-INIT: step";
/// What the test init prints first: the guest booted.
const MARKER: &str = "CAPSID-TEST-INIT: ready";
/// Generous bounds: nested mode is slow, and a hang must still end the test.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const DISK_BYTES: usize = 1 << 20;
const WRITE_PATTERN: &[u8] = b"capsid-test-init wrote this through virtio-blk\n";

fn os(text: impl Into<OsString>) -> OsString {
    text.into()
}

/// `--kernel --initrd --cmdline` for our kernel and the test init running `steps`.
fn base_args(scratch: &ScratchDir, steps: &str) -> Vec<OsString> {
    let initrd = initramfs_with_init(&artifact("CAPSID_TEST_INIT"), &scratch.join("init.cpio"));
    let mut cmdline = CMDLINE.to_owned();
    if !steps.is_empty() {
        cmdline.push_str(&format!(" capsid_test={steps}"));
    }
    vec![
        os("--kernel"),
        artifact("CAPSID_KERNEL").into(),
        os("--initrd"),
        initrd.into(),
        os("--cmdline"),
        os(cmdline),
    ]
}

/// Replaces the value that follows `flag` in `args`.
fn set_arg(args: &mut [OsString], flag: &str, value: impl Into<OsString>) {
    let at = args.iter().position(|a| a == flag).expect("flag present") + 1;
    args[at] = value.into();
}

fn pattern(i: usize) -> u8 {
    u8::try_from((i * 7 + 3) % 256).unwrap()
}

/// Answers one connection on `<uds>_<port>` by echoing one line.
fn echo_server(uds: &Path, port: u32) -> std::thread::JoinHandle<String> {
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let listener = UnixListener::bind(PathBuf::from(path)).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        (&stream).write_all(line.as_bytes()).unwrap();
        line
    })
}

/// Connects to guest port `port` through the hybrid-vsock socket, retrying
/// until the guest listens, then sends a line and returns the reply.
fn talk_to_guest(uds: &Path, port: u32, message: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "guest never accepted on port {port}"
        );
        let Ok(mut stream) = UnixStream::connect(uds) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        stream.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut ok = String::new();
        // No listener yet: the guest answers RST and we read EOF. Retry.
        if reader.read_line(&mut ok).unwrap_or(0) == 0 || !ok.starts_with("OK ") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let host_port: u32 = ok.trim_end()[3..].parse().expect("OK <port>");
        assert!(host_port >= 1 << 30, "host port {host_port}");
        stream.write_all(message.as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        // Close our side so the guest's read ends.
        stream.shutdown(std::net::Shutdown::Both).unwrap();
        return reply;
    }
}

fn step_line<'a>(console: &'a str, step: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.starts_with(&format!("{STEP} {step} ")) && !l.ends_with(" listening"))
        .unwrap_or_else(|| panic!("no result for step {step}:\n{console}"))
}

#[test]
fn vmm_runs_a_guest_that_uses_every_device() {
    if !require_kvm("vmm_runs_a_guest_that_uses_every_device") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let ro_disk = scratch.join("ro.img");
    let rw_disk = scratch.join("rw.img");
    std::fs::write(&ro_disk, (0..DISK_BYTES).map(pattern).collect::<Vec<u8>>()).unwrap();
    std::fs::write(&rw_disk, vec![0u8; DISK_BYTES]).unwrap();
    let uds = scratch.join("vsock.sock");
    let echo = echo_server(&uds, 1234);

    let steps = format!(
        "marker,vsock-echo:1234,vsock-listen:5000,blk-read:/dev/vda:{DISK_BYTES},blk-ro:/dev/vda,blk-write:/dev/vdb"
    );
    let mut args = base_args(&scratch, &steps);
    args.extend([
        os("--disk"),
        os(format!("{},ro", ro_disk.display())),
        os("--disk"),
        rw_disk.clone().into(),
        os("--vsock-uds"),
        uds.clone().into(),
        os("--vcpus"),
        os("2"),
    ]);
    let vmm = artifact("CAPSID_VMM");
    let (mut run, _, _) =
        VmmRun::start_booted(&vmm, &args, scratch.path(), "devices", MARKER, BOOT_TIMEOUT);
    let reply = talk_to_guest(&uds, 5000, "ping from the host\n");
    assert_eq!(reply, "guest got: ping from the host\n");
    let status = run.wait_exit(BOOT_TIMEOUT);
    let console = run.console();
    let log = run.log();
    assert_eq!(status.code(), Some(0), "{}", run.describe());

    for step in [
        "marker".to_owned(),
        "vsock-echo:1234".to_owned(),
        "vsock-listen:5000".to_owned(),
        format!("blk-read:/dev/vda:{DISK_BYTES}"),
        "blk-ro:/dev/vda".to_owned(),
        "blk-write:/dev/vdb".to_owned(),
    ] {
        let line = step_line(&console, &step);
        assert!(line.contains(" ok"), "{line}\n{console}");
        println!("{line}");
    }
    assert_eq!(echo.join().unwrap(), "hello from the guest\n");
    let written = std::fs::read(&rw_disk).unwrap();
    assert_eq!(&written[4096..4096 + WRITE_PATTERN.len()], WRITE_PATTERN);
    assert!(
        written[..4096].iter().all(|b| *b == 0),
        "nothing else was written"
    );
    let unchanged: Vec<u8> = (0..DISK_BYTES).map(pattern).collect();
    assert!(
        std::fs::read(&ro_disk).unwrap() == unchanged,
        "the read-only disk changed"
    );

    let times = parse_times(&log);
    let marker = times.marker_us.expect("the VMM logged the boot marker");
    println!(
        "capsid-vmm: ready to run vCPUs after {} µs, boot marker after {marker} µs (VMM CPU {} µs)",
        times.ready_us.unwrap_or(0),
        times.marker_cpu_us.unwrap_or(0)
    );
    assert!(
        !uds.exists(),
        "the vsock socket is removed when the VMM ends"
    );
}

#[test]
fn vmm_guest_sees_the_vcpus_and_memory_it_was_given() {
    if !require_kvm("vmm_guest_sees_the_vcpus_and_memory_it_was_given") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let vmm = artifact("CAPSID_VMM");
    for (vcpus, mem_mib) in [(2u32, 64u64), (4, 1024)] {
        let mut args = base_args(&scratch, "");
        args.extend([
            os("--vcpus"),
            os(vcpus.to_string()),
            os("--mem-mib"),
            os(mem_mib.to_string()),
        ]);
        let name = format!("{vcpus}cpu-{mem_mib}mib");
        let (mut run, line, after) =
            VmmRun::start_booted(&vmm, &args, scratch.path(), &name, MARKER, BOOT_TIMEOUT);
        let status = run.wait_exit(BOOT_TIMEOUT);
        assert_eq!(status.code(), Some(0), "{}", run.describe());
        println!("{name}: {line} ({:.3} s)", after.as_secs_f64());
        assert!(line.contains(&format!("cpus={vcpus} ")), "{line}");
        let seen: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mem_mib=")?.parse().ok())
            .expect("mem_mib in the marker");
        // The kernel keeps some for itself: expect at least 75% of it.
        assert!(seen <= mem_mib && seen * 4 >= mem_mib * 3, "{line}");
    }
}

#[test]
fn vmm_reports_a_guest_crash_with_status_3() {
    if !require_kvm("vmm_reports_a_guest_crash_with_status_3") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    // `reboot=t` resets by triple fault: to the VMM, a crash.
    let mut args = base_args(&scratch, "");
    set_arg(
        &mut args,
        "--cmdline",
        "console=ttyS0 reboot=t panic=-1 quiet",
    );
    let mut run = VmmRun::start(&artifact("CAPSID_VMM"), &args, scratch.path(), "crash");
    let status = run.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(3), "{}", run.describe());
    let log = run.log();
    assert!(log.contains("triple-faulted"), "{log}");
}

#[test]
fn vmm_stops_on_sigterm_and_removes_what_it_made() {
    if !require_kvm("vmm_stops_on_sigterm_and_removes_what_it_made") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let uds = scratch.join("vsock.sock");
    let mut args = base_args(&scratch, "hang");
    args.extend([os("--vsock-uds"), uds.clone().into()]);
    let (mut run, _, _) = VmmRun::start_booted(
        &artifact("CAPSID_VMM"),
        &args,
        scratch.path(),
        "sigterm",
        &format!("{STEP} hang waiting"),
        BOOT_TIMEOUT,
    );
    assert!(uds.exists());
    let pid = i32::try_from(run.pid()).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = run.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(143), "{}", run.describe());
    assert!(!uds.exists(), "the vsock socket is removed");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM process is gone"
    );
    let log = run.log();
    assert!(log.contains("stopped by signal 15"), "{log}");
    // Where the guest was, as for one that hung: a kernel address (the
    // test init waits in a syscall, or the vCPU idles in the kernel).
    let said = log
        .lines()
        .find_map(|l| l.split("stopped from outside: ").nth(1))
        .unwrap_or_else(|| panic!("no vCPU state in the log:\n{log}"));
    assert!(
        said.starts_with("vCPU 0: rip=0xffffffff") && said.contains("rflags="),
        "{said}"
    );
}

#[test]
fn vmm_boots_a_bzimage_through_the_64_bit_boot_protocol() {
    if !require_kvm("vmm_boots_a_bzimage_through_the_64_bit_boot_protocol") {
        return;
    }
    // Debian's cloud kernel is a bzImage without a PVH entry: the other path
    // of the loader, the zero page, e820 and the long-mode start.
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let mut args = base_args(&scratch, "");
    set_arg(&mut args, "--kernel", artifact("CAPSID_CLOUD_KERNEL"));
    // That kernel reads no MP table (CONFIG_X86_MPPARSE is off; it expects
    // ACPI, which we do not offer), so it finds no IOAPIC: only KVM's PIC
    // gives it a timer interrupt (docs/reliability.md).
    args.extend([os("--mem-mib"), os("256"), os("--irqchip"), os("kernel")]);
    let (mut run, line, after) = VmmRun::start_booted(
        &artifact("CAPSID_VMM"),
        &args,
        scratch.path(),
        "bzimage",
        MARKER,
        BOOT_TIMEOUT,
    );
    let status = run.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", run.describe());
    assert!(line.contains("kernel=6.1.0"), "{line}");
    let log = run.log();
    assert!(log.contains("protocol=Linux64"), "{log}");
    println!("bzImage: {line} ({:.3} s)", after.as_secs_f64());
}

/// Byte `i` of what `net-pull` and `net-push` carry (as the test init).
fn net_pattern(i: u64) -> u8 {
    u8::try_from(i % 251).unwrap()
}

/// Serves one TCP connection on `listener` with `serve`, giving up (and
/// returning an error) when nobody connects before the deadline.
fn serve_one(
    listener: std::net::TcpListener,
    serve: impl FnOnce(std::net::TcpStream) -> std::io::Result<String> + Send + 'static,
) -> std::thread::JoinHandle<std::io::Result<String>> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(std::io::Error::other("the guest never connected"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(BOOT_TIMEOUT))?;
        serve(stream)
    })
}

fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ip {args:?}: {status}");
}

#[test]
fn vmm_guest_talks_tcp_to_the_host_over_virtio_net() {
    use std::io::Read;
    if !require_kvm("vmm_guest_talks_tcp_to_the_host_over_virtio_net") {
        return;
    }
    const BYTES: u64 = 4 << 20;
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    // The tap, as a launcher makes it; ours stays close-on-exec and the VMM
    // gets it as descriptor 3.
    let name = format!("capsid-t{}", std::process::id() % 10_000);
    let tap = capsid_runtime::tap::create_tap(&name).unwrap();
    ip(&["addr", "add", "10.231.77.1/24", "dev", &name]);
    ip(&["link", "set", &name, "up"]);
    let listen = || std::net::TcpListener::bind("10.231.77.1:0").unwrap();
    let (echo, pull, push) = (listen(), listen(), listen());
    let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
    let steps = format!(
        "net-up:10.231.77.2,net-echo:10.231.77.1:{},net-pull:10.231.77.1:{}:{BYTES},net-push:10.231.77.1:{}:{BYTES}",
        port(&echo),
        port(&pull),
        port(&push)
    );
    let echo = serve_one(echo, |mut stream| {
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        stream.write_all(line.as_bytes())?;
        Ok(line)
    });
    let pull = serve_one(pull, |mut stream| {
        let data: Vec<u8> = (0..BYTES).map(net_pattern).collect();
        stream.write_all(&data)?;
        Ok(format!("sent {BYTES}"))
    });
    let push = serve_one(push, |mut stream| {
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        let n = u64::try_from(data.len()).unwrap();
        let good = data.iter().zip(0..).all(|(b, i)| *b == net_pattern(i));
        stream.write_all(format!("got {n}\n").as_bytes())?;
        Ok(format!("received {n} good={good}"))
    });

    let mut args = base_args(&scratch, &steps);
    args.extend([os("--net"), os("fd=3,mac=02:ca:b5:1d:00:02,mtu=1400")]);
    let (mut run, _, _) = VmmRun::start_booted_passing(
        &artifact("CAPSID_VMM"),
        &args,
        scratch.path(),
        "net",
        MARKER,
        BOOT_TIMEOUT,
        &[(std::os::fd::AsRawFd::as_raw_fd(&tap), 3)],
    );
    let status = run.wait_exit(BOOT_TIMEOUT);
    let console = run.console();
    assert_eq!(status.code(), Some(0), "{}", run.describe());
    let up = step_line(&console, "net-up:10.231.77.2");
    assert!(
        up.contains("ok mac=02:ca:b5:1d:00:02 mtu=1400"),
        "{up}\n{console}"
    );
    for step in ["net-echo", "net-pull", "net-push"] {
        let line = console
            .lines()
            .find(|l| l.starts_with(&format!("{STEP} {step}:")))
            .unwrap_or_else(|| panic!("no {step} result:\n{console}"));
        assert!(line.contains(" ok"), "{line}\n{}", run.describe());
        println!("{line}");
    }
    assert_eq!(echo.join().unwrap().unwrap(), "hello over virtio-net\n");
    assert_eq!(pull.join().unwrap().unwrap(), format!("sent {BYTES}"));
    assert_eq!(
        push.join().unwrap().unwrap(),
        format!("received {BYTES} good=true")
    );
    let log = run.log();
    let metrics = log
        .lines()
        .find(|l| l.contains("virtio-net stops"))
        .unwrap_or_else(|| panic!("no virtio-net metrics in the VMM's log:\n{log}"));
    println!("{metrics}");
    assert!(metrics.contains("\"tx_dropped\":0"), "{metrics}");
    drop(tap);
    assert!(
        !Path::new("/sys/class/net").join(&name).exists(),
        "the tap goes with its last descriptor"
    );
}

/// Asks the VMM behind `api` for a snapshot into `dir` (state.json and
/// memory, made here and passed as descriptors); its reply line.
fn snapshot_through_api(api: &Path, dir: &Path) -> String {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let create = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap()
    };
    let (state, memory) = (create("state.json"), create("memory"));
    let stream = UnixStream::connect(api).unwrap();
    stream.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    stream
        .send_with_fds(
            &[&b"{\"op\":\"snapshot\"}\n"[..]],
            &[state.as_raw_fd(), memory.as_raw_fd()],
        )
        .unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    reply
}

#[test]
fn vmm_snapshot_restores_a_guest_that_carries_on_where_it_was() {
    if !require_kvm("vmm_snapshot_restores_a_guest_that_carries_on_where_it_was") {
        return;
    }
    let scratch = ScratchDir::new("capsid-e2e").unwrap();
    let snapshot = scratch.join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    let (uds, api) = (scratch.join("vsock.sock"), scratch.join("api.sock"));
    // The guest answers on port 5000, then listens on 5001: the snapshot
    // is taken while it waits there, and the restored guest answers.
    let mut args = base_args(&scratch, "vsock-listen:5000,vsock-listen:5001");
    args.extend([
        os("--vsock-uds"),
        uds.clone().into(),
        os("--api-uds"),
        api.clone().into(),
        os("--spare-disks"),
        os("1"),
        os("--vcpus"),
        os("2"),
        os("--mem-mib"),
        os("128"),
    ]);
    let vmm = artifact("CAPSID_VMM");
    let (mut run, _, booted) = VmmRun::start_booted(
        &vmm,
        &args,
        scratch.path(),
        "template",
        MARKER,
        BOOT_TIMEOUT,
    );
    assert_eq!(talk_to_guest(&uds, 5000, "before\n"), "guest got: before\n");
    run.wait_for_line(&format!("{STEP} vsock-listen:5001 listening"), BOOT_TIMEOUT);
    let reply = snapshot_through_api(&api, &snapshot);
    assert!(
        reply.starts_with("{\"saved_ms\":"),
        "{reply}\n{}",
        run.describe()
    );
    let status = run.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", run.describe());
    assert!(!uds.exists() && !api.exists(), "the sockets are removed");
    let memory = std::fs::metadata(snapshot.join("memory")).unwrap();
    use std::os::unix::fs::MetadataExt;
    println!(
        "snapshot: {}; memory file {} MiB, {} MiB on disk",
        reply.trim_end(),
        memory.len() >> 20,
        (memory.blocks() * 512) >> 20
    );
    assert_eq!(memory.len(), 128 << 20);

    // A fresh VMM carries on from the files: no boot, the guest's port
    // 5001 answers, and the test init goes on to its last step.
    let restored_at = Instant::now();
    let mut restore = VmmRun::start(
        &vmm,
        &[
            os("--restore"),
            snapshot.clone().into(),
            os("--vsock-uds"),
            uds.clone().into(),
            os("--api-uds"),
            api.clone().into(),
            os("--spare-disks"),
            os("1"),
        ],
        scratch.path(),
        "restored",
    );
    assert_eq!(talk_to_guest(&uds, 5001, "after\n"), "guest got: after\n");
    let answered = restored_at.elapsed();
    let status = restore.wait_exit(BOOT_TIMEOUT);
    let console = restore.console();
    assert_eq!(status.code(), Some(0), "{}", restore.describe());
    assert!(
        step_line(&console, "vsock-listen:5001").contains(" ok answered \"after\""),
        "{console}"
    );
    assert!(console.contains("CAPSID-TEST-INIT: done"), "{console}");
    assert!(
        !console.contains(MARKER),
        "the restored guest did not boot again:\n{console}"
    );
    println!(
        "restore: the guest answered {answered:?} after the VMM started; a boot took {booted:?} to the test init alone"
    );

    // A snapshot of another VM shape, or a damaged one, is refused and
    // leaves nothing behind.
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snapshot.join("state.json")).unwrap()).unwrap();
    state["build"] = "capsid-vmm 0.0.1".into();
    std::fs::write(snapshot.join("state.json"), state.to_string()).unwrap();
    let mut refused = VmmRun::start(
        &vmm,
        &[
            os("--restore"),
            snapshot.clone().into(),
            os("--vsock-uds"),
            uds.clone().into(),
        ],
        scratch.path(),
        "refused",
    );
    let status = refused.wait_exit(BOOT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", refused.describe());
    assert!(
        refused
            .log()
            .contains("take the snapshot again with this build"),
        "{}",
        refused.describe()
    );
    assert!(!uds.exists());
}
