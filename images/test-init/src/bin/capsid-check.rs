//! `capsid-check`: run inside a container, prints what the process sees of
//! the OCI spec that made it, one `key=value` per line, for end-to-end tests
//! to compare with what they asked for (youki's `runtimetest` idea).
//! `capsid-check vsock CID:PORT...` instead tries to reach each vsock
//! address and says whether anything answered (the agent must not, from a
//! container).

use std::fs;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Tries to open a vsock connection to `cid:port` and prints how it went:
/// `vsock CID:PORT connected`, or `vsock CID:PORT refused: <why>` (the
/// socket call or the connect failed, or the peer hung up at once).
fn vsock(cid: u32, port: u32) {
    // SAFETY: socket() takes integers only; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        println!("vsock {cid}:{port} refused: socket: {e}");
        return;
    }
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_vm>()).unwrap_or(0);
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    let connected = unsafe { libc::connect(fd, (&raw const addr).cast(), len) };
    if connected != 0 {
        let e = std::io::Error::last_os_error();
        println!("vsock {cid}:{port} refused: connect: {e}");
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        return;
    }
    // Connected: does anything answer a hello? The agent's protocol is a
    // length-prefixed JSON frame; an agent that refuses us hangs up.
    let hello = br#"{"type":"control","version":1}"#;
    let mut frame = u32::try_from(hello.len())
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    frame.extend_from_slice(hello);
    // SAFETY: `frame` is valid for its length; the fd is ours.
    unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), libc::MSG_NOSIGNAL) };
    let mut reply = [0u8; 64];
    // SAFETY: `reply` is writable for its length.
    let n = unsafe { libc::recv(fd, reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n > 0 {
        println!("vsock {cid}:{port} connected: the peer answered {n} bytes");
    } else {
        println!("vsock {cid}:{port} refused: the peer hung up");
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("vsock") {
        for target in &args[1..] {
            let parsed = target
                .split_once(':')
                .and_then(|(c, p)| Some((c.parse().ok()?, p.parse().ok()?)));
            match parsed {
                Some((cid, port)) => vsock(cid, port),
                None => println!("vsock {target}: expected CID:PORT"),
            }
        }
        return;
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = Vec::new();
    out.push(format!("pid={}", std::process::id()));
    // SAFETY: getuid/getgid take no arguments and cannot fail.
    out.push(format!("uid={}", unsafe { libc::getuid() }));
    // SAFETY: as above.
    out.push(format!("gid={}", unsafe { libc::getgid() }));
    for (key, field) in [
        ("groups", "Groups"),
        ("cap_inh", "CapInh"),
        ("cap_prm", "CapPrm"),
        ("cap_eff", "CapEff"),
        ("cap_bnd", "CapBnd"),
        ("cap_amb", "CapAmb"),
        ("no_new_privs", "NoNewPrivs"),
        ("seccomp", "Seccomp"),
        ("umask", "Umask"),
    ] {
        out.push(format!("{key}={}", status_field(&status, field)));
    }
    let cwd = std::env::current_dir().map(|p| p.display().to_string());
    out.push(format!("cwd={}", cwd.unwrap_or_default()));
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    out.push(format!("hostname={}", hostname.trim()));
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit to write into.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    out.push(format!("nofile={} {}", limit.rlim_cur, limit.rlim_max));
    for (key, value) in std::env::vars() {
        if key.starts_with("CAPSID_") || key == "HOME" || key == "PATH" {
            out.push(format!("env={key}={value}"));
        }
    }
    let writable = fs::write("/.capsid-check", b"x").is_ok();
    let _ = fs::remove_file("/.capsid-check");
    out.push(format!("root_writable={writable}"));
    for line in fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
    {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 4 {
            out.push(format!("mount={} {} {}", fields[1], fields[2], fields[3]));
        }
    }
    // A masked path of the default spec: empty when masked.
    let timer_list = fs::read("/proc/timer_list").map(|b| b.len());
    out.push(format!(
        "timer_list_bytes={}",
        timer_list.unwrap_or(usize::MAX)
    ));
    println!("{}", out.join("\n"));
}
