//! `capsid-check`: run inside a container, prints what the process sees of
//! the OCI spec that made it, one `key=value` per line, for end-to-end tests
//! to compare with what they asked for (youki's `runtimetest` idea).

use std::fs;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
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
