//! What `/proc` says about processes the tests and the benchmark start:
//! their memory, and the QEMUs among their children.

/// The QEMU processes that are children of this process.
pub fn qemu_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": comm may contain spaces, so split after ')'.
            let Some((comm, rest)) = stat.split_once(") ") else {
                return false;
            };
            comm.contains("qemu") && rest.split_whitespace().nth(1) == Some(me.as_str())
        })
        .collect()
}

/// PSS of a process in KiB, from smaps_rollup.
pub fn pss_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Rss and Pss (KiB) of `pid`, leaving out mappings of at least `guest_kib`
/// (guest RAM is the only mapping that big).
pub fn memory_outside_guest(pid: u32, guest_kib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut rss, mut pss, mut skip) = (0, 0, false);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else {
            continue;
        };
        let kib: u64 = value.parse().unwrap_or(0);
        match key {
            "Size:" => skip = kib >= guest_kib,
            "Rss:" if !skip => rss += kib,
            "Pss:" if !skip => pss += kib,
            _ => {}
        }
    }
    (rss, pss)
}
