//! PID 1 of capsid's test initramfs.
//!
//! It proves a guest kernel reached user space and exercises the VMM's
//! devices from the inside. It mounts `/proc` and `/dev`, prints one marker
//! line with what it sees (uptime, kernel release, CPUs, memory), runs the
//! steps named in `capsid_test=` on the kernel command line (which the kernel
//! hands to init as an environment variable), printing one result line per
//! step, and reboots the VM — which ends QEMU (`-no-reboot`) or capsid-vmm
//! with status 0. Linked statically so the initramfs needs nothing else.
//!
//! Steps (comma-separated):
//!
//! | step                  | what it does                                                    |
//! |-----------------------|-----------------------------------------------------------------|
//! | `marker`              | writes the boot-time marker (123 to port 0x3f0)                 |
//! | `vsock-echo:P`        | connects to host CID 2 port P, sends a line, expects it back    |
//! | `vsock-listen:P`      | accepts one host connection on port P, answers `guest got: …`   |
//! | `blk-read:DEV:N`      | reads N bytes of DEV, checks the pattern `(i * 7 + 3) % 256`    |
//! | `blk-speed:DEV`       | reads all of DEV in 1 MiB reads, reports bytes and microseconds |
//! | `blk-ro:DEV`          | checks that DEV refuses writes                                  |
//! | `blk-write:DEV`       | writes [`WRITE_PATTERN`] at offset 4096 of DEV and syncs        |
//! | `net-up:ADDR`         | gives eth0 ADDR/24 and brings it up; reports its MAC and MTU   |
//! | `net-echo:IP:P`       | TCP to IP:P, sends a line, expects it back                      |
//! | `net-pull:IP:P:N`     | TCP to IP:P, reads N bytes, checks the pattern `i % 251`        |
//! | `net-push:IP:P:N`     | TCP to IP:P, writes N bytes of the pattern, expects `got N`     |
//! | `hang`                | waits forever (for tests that stop the VM from outside)         |

use std::ffi::CStr;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// The line end-to-end tests wait for.
const MARKER: &str = "CAPSID-TEST-INIT: ready";
/// Prefix of each step's result line: `CAPSID-TEST-INIT: step NAME ok|FAILED …`.
const STEP: &str = "CAPSID-TEST-INIT: step";
/// What `blk-write` writes.
const WRITE_PATTERN: &[u8] = b"capsid-test-init wrote this through virtio-blk\n";
const BOOT_MARKER_PORT: u16 = 0x3f0;
const BOOT_MARKER_VALUE: u8 = 123;
const HOST_CID: u32 = 2;

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("capsid-test-init: must run as PID 1 of a guest");
        std::process::exit(2);
    }
    let report = match mount("proc", c"/proc", c"proc") {
        Ok(()) => describe_guest(),
        Err(e) => format!("error=mount-proc:{e}"),
    };
    say(&format!("{MARKER} {report}"));
    if let Ok(steps) = std::env::var("capsid_test") {
        if let Err(e) = mount("devtmpfs", c"/dev", c"devtmpfs") {
            say(&format!("{STEP} mount-dev FAILED {e}"));
        }
        for step in steps.split(',').filter(|s| !s.is_empty()) {
            match run_step(step) {
                Ok(detail) => say(&format!("{STEP} {step} ok {detail}")),
                Err(e) => say(&format!("{STEP} {step} FAILED {e}")),
            }
        }
        say("CAPSID-TEST-INIT: done");
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command; as PID 1 we own the machine.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // Only reached if the reboot failed; PID 1 must not exit.
    eprintln!(
        "capsid-test-init: reboot failed: {}",
        io::Error::last_os_error()
    );
    pause_forever();
}

fn say(line: &str) {
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

fn pause_forever() -> ! {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

fn run_step(step: &str) -> io::Result<String> {
    let mut parts = step.split(':');
    let name = parts.next().unwrap_or_default();
    let mut arg = || {
        parts
            .next()
            .ok_or_else(|| io::Error::other(format!("{name}: missing argument")))
    };
    match name {
        "marker" => write_boot_marker(),
        "vsock-echo" => vsock_echo(parse(arg()?)?),
        "vsock-listen" => vsock_listen(parse(arg()?)?),
        "blk-read" => {
            let device = arg()?;
            blk_read(device, parse(arg()?)?)
        }
        "blk-speed" => blk_speed(arg()?),
        "blk-ro" => blk_ro(arg()?),
        "blk-write" => blk_write(arg()?),
        "net-up" => net_up(arg()?),
        "net-echo" => {
            let ip = arg()?;
            net_echo(ip, parse(arg()?)?)
        }
        "net-pull" | "net-push" => {
            let (ip, port) = (arg()?, parse(arg()?)?);
            net_stream(ip, port, parse(arg()?)?, name == "net-push")
        }
        "hang" => {
            say(&format!("{STEP} hang waiting"));
            pause_forever()
        }
        _ => Err(io::Error::other(format!("unknown step {name}"))),
    }
}

/// An `ifreq` for eth0.
fn eth0_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"eth0") {
        *dst = src.cast_signed();
    }
    ifr
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let addr = libc::sockaddr_in {
        sin_family: libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0),
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data.
    unsafe { std::mem::transmute(addr) }
}

fn ifreq_call(socket: &OwnedFd, request: libc::Ioctl, ifr: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one ifreq.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, &raw mut *ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn net_up(addr: &str) -> io::Result<String> {
    let ip: std::net::Ipv4Addr = parse(addr)?;
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr = eth0_ifreq();
    ifr.ifr_ifru.ifru_addr = sockaddr_in(ip);
    ifreq_call(&socket, libc::SIOCSIFADDR, &mut ifr)?;
    ifr.ifr_ifru.ifru_netmask = sockaddr_in(std::net::Ipv4Addr::new(255, 255, 255, 0));
    ifreq_call(&socket, libc::SIOCSIFNETMASK, &mut ifr)?;
    ifreq_call(&socket, libc::SIOCGIFFLAGS, &mut ifr)?;
    // SAFETY: SIOCGIFFLAGS filled in the flags.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | i16::try_from(libc::IFF_UP).unwrap_or(0);
    ifreq_call(&socket, libc::SIOCSIFFLAGS, &mut ifr)?;
    ifreq_call(&socket, libc::SIOCGIFHWADDR, &mut ifr)?;
    // SAFETY: SIOCGIFHWADDR filled in the hardware address.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr.sa_data };
    let mac: Vec<String> = hw[..6]
        .iter()
        .map(|b| format!("{:02x}", b.cast_unsigned()))
        .collect();
    ifreq_call(&socket, libc::SIOCGIFMTU, &mut ifr)?;
    // SAFETY: SIOCGIFMTU filled in the MTU.
    let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
    Ok(format!("mac={} mtu={mtu}", mac.join(":")))
}

/// Connects to `ip:port`, retrying for a while (the host's side may still
/// be learning the guest's address).
fn tcp_connect(ip: &str, port: u16) -> io::Result<std::net::TcpStream> {
    let addr: std::net::Ipv4Addr = parse(ip)?;
    let mut last = io::Error::other("no attempt");
    for _ in 0..50 {
        match std::net::TcpStream::connect_timeout(
            &(addr, port).into(),
            std::time::Duration::from_secs(5),
        ) {
            Ok(stream) => {
                stream.set_read_timeout(Some(std::time::Duration::from_secs(60)))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Err(last)
}

fn net_echo(ip: &str, port: u16) -> io::Result<String> {
    let mut stream = tcp_connect(ip, port)?;
    let message = "hello over virtio-net\n";
    stream.write_all(message.as_bytes())?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while reply.len() < 4096 && stream.read(&mut byte)? == 1 {
        reply.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    if reply != message.as_bytes() {
        return Err(io::Error::other(format!(
            "echo came back as {:?}",
            String::from_utf8_lossy(&reply)
        )));
    }
    Ok(format!("echoed {} bytes", message.len()))
}

/// Byte `i` of what `net-pull` and `net-push` carry.
fn net_pattern(i: u64) -> u8 {
    u8::try_from(i % 251).unwrap_or(0)
}

/// Reads (pull) or writes (push) `len` bytes over TCP, checking them, and
/// reports the time it took.
fn net_stream(ip: &str, port: u16, len: u64, push: bool) -> io::Result<String> {
    let mut stream = tcp_connect(ip, port)?;
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from((len - done).min(64 << 10)).unwrap_or(0);
        if push {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = net_pattern(done + i as u64);
            }
            stream.write_all(&buf[..n])?;
        } else {
            let got = stream.read(&mut buf[..n])?;
            if got == 0 {
                return Err(io::Error::other(format!(
                    "the host closed after {done} bytes"
                )));
            }
            if let Some(i) = (0..got).find(|i| buf[*i] != net_pattern(done + *i as u64)) {
                return Err(io::Error::other(format!(
                    "byte {} is wrong",
                    done + i as u64
                )));
            }
            done += got as u64;
            continue;
        }
        done += n as u64;
    }
    if push {
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        if reply.trim_end() != format!("got {len}") {
            return Err(io::Error::other(format!("the host answered {reply:?}")));
        }
    }
    Ok(format!("bytes={len} us={}", started.elapsed().as_micros()))
}

fn parse<T: std::str::FromStr>(text: &str) -> io::Result<T> {
    text.parse()
        .map_err(|_| io::Error::other(format!("bad number {text}")))
}

fn write_boot_marker() -> io::Result<String> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(BOOT_MARKER_PORT), 1, 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the port was just granted; writing it has no effect on memory.
    unsafe {
        std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") BOOT_MARKER_VALUE);
    }
    Ok(String::new())
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or(0);
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory preconditions; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sizeof(struct sockaddr_vm)`: 16 bytes, far below `socklen_t::MAX`.
#[allow(clippy::cast_possible_truncation)]
const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

fn read_line(stream: &mut fs::File) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).map_err(io::Error::other)
}

fn vsock_echo(port: u32) -> io::Result<String> {
    let socket = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    let rc = unsafe { libc::connect(socket.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stream = fs::File::from(socket);
    let message = "hello from the guest\n";
    stream.write_all(message.as_bytes())?;
    let reply = read_line(&mut stream)?;
    if reply != message {
        return Err(io::Error::other(format!("echo came back as {reply:?}")));
    }
    Ok(format!("echoed {} bytes", message.len()))
}

fn vsock_listen(port: u32) -> io::Result<String> {
    let socket = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    if unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), ADDR_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen on a bound socket.
    if unsafe { libc::listen(socket.as_raw_fd(), 1) } != 0 {
        return Err(io::Error::last_os_error());
    }
    say(&format!("{STEP} vsock-listen:{port} listening"));
    // SAFETY: null address arguments are allowed.
    let fd = unsafe {
        libc::accept(
            socket.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly accepted connection this function owns.
    let mut stream = fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let line = read_line(&mut stream)?;
    stream.write_all(format!("guest got: {line}").as_bytes())?;
    // Wait for the host to close, so the reply is not cut off by the reboot.
    let mut rest = [0u8; 64];
    while stream.read(&mut rest)? > 0 {}
    Ok(format!("answered {:?}", line.trim_end()))
}

fn pattern(i: u64) -> u8 {
    u8::try_from((i * 7 + 3) % 256).unwrap_or(0)
}

fn blk_read(device: &str, len: u64) -> io::Result<String> {
    let disk = fs::File::open(device)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    while offset < len {
        let n = disk.read_at(&mut buf, offset)?;
        if n == 0 {
            return Err(io::Error::other(format!("{device} ended at {offset}")));
        }
        for (i, byte) in buf[..n].iter().enumerate() {
            let at = offset + i as u64;
            if at < len && *byte != pattern(at) {
                return Err(io::Error::other(format!("byte {at} is {byte:#x}")));
            }
        }
        offset += n as u64;
    }
    Ok(format!("{len} bytes match"))
}

/// For the throughput benchmark: `bytes=N us=T`, a cold read of the whole
/// device (nothing read it before in this boot).
fn blk_speed(device: &str) -> io::Result<String> {
    let mut disk = fs::File::open(device)?;
    let mut buf = vec![0u8; 1 << 20];
    let started = std::time::Instant::now();
    let mut bytes = 0u64;
    loop {
        let n = disk.read(&mut buf)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
    }
    Ok(format!(
        "bytes={bytes} us={}",
        started.elapsed().as_micros()
    ))
}

fn blk_ro(device: &str) -> io::Result<String> {
    match OpenOptions::new().write(true).open(device) {
        Ok(disk) => match disk.write_at(b"x", 0).and_then(|_| disk.sync_all()) {
            Ok(()) => Err(io::Error::other("a write to the read-only disk succeeded")),
            Err(e) => Ok(format!("write refused: {e}")),
        },
        Err(e) => Ok(format!("open for writing refused: {e}")),
    }
}

fn blk_write(device: &str) -> io::Result<String> {
    let disk = OpenOptions::new().write(true).open(device)?;
    disk.write_all_at(WRITE_PATTERN, 4096)?;
    disk.sync_all()?;
    Ok(format!("{} bytes at 4096", WRITE_PATTERN.len()))
}

fn mount(source: &str, target: &CStr, fstype: &CStr) -> io::Result<()> {
    let _ = fs::create_dir_all(target.to_string_lossy().as_ref());
    let source = std::ffi::CString::new(source).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; data is null, which mount(2) accepts for proc and devtmpfs.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn describe_guest() -> String {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let uptime = read("/proc/uptime");
    let uptime = uptime.split_whitespace().next().unwrap_or("?");
    let release = read("/proc/sys/kernel/osrelease");
    let cpus = read("/proc/cpuinfo")
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    format!(
        "uptime={uptime}s kernel={} cpus={cpus} mem_mib={}",
        release.trim(),
        mem_kib / 1024
    )
}
