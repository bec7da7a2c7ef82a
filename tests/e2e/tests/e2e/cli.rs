//! `capsid run` end to end: the CLI converts the test rootfs directory,
//! boots a micro-VM, runs the command attached, and leaves nothing behind.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capsid_e2e::{on_a_pty, require_kvm};
use capsid_testbed::artifact;

/// Generous (nested mode), but a hang must end the test with what was said.
const RUN_BOUND: Duration = Duration::from_secs(150);

pub(crate) fn unsafe_free_kill(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

pub(crate) fn capsid_run(args: &[&str], stdin: &[u8]) -> (Output, Duration) {
    let rootfs = std::env::var_os("CAPSID_TEST_ROOTFS_DIR")
        .map(PathBuf::from)
        .expect("CAPSID_TEST_ROOTFS_DIR is set by `make test`");
    capsid_run_from(&["--rootfs".as_ref(), rootfs.as_os_str()], args, stdin)
}

/// `capsid run SOURCE... ARGS...` (SOURCE: `--rootfs DIR` or `--image ...`).
fn capsid_run_from(source: &[&std::ffi::OsStr], args: &[&str], stdin: &[u8]) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = Command::new(artifact("CAPSID_CLI"))
        .arg("run")
        .args(source)
        .args(args)
        .env("TMPDIR", std::env::temp_dir())
        .env("CAPSID_DEBUG", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn capsid");
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let pipe = |mut from: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = from.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().unwrap()));
    let stderr = pipe(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_BOUND {
            // SIGTERM first: capsid cleans up on it.
            unsafe_free_kill(child.id(), libc::SIGTERM);
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let status = child.wait().unwrap();
            let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!(
                "capsid run {args:?} still running after {RUN_BOUND:?} ({status}); stderr:\n{err}"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    feeder.join().unwrap();
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    (output, start.elapsed())
}

/// Waits at most `bound` for every capsid-vmm and monitor to be gone (a
/// SIGKILLed VMM takes a moment to give its guest's memory back); what is
/// still there.
pub(crate) fn processes_left_after(bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    loop {
        let left: Vec<String> = leftovers()
            .into_iter()
            .filter(|l| l.starts_with("process"))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes and scratch directories `capsid run` could leave behind.
pub(crate) fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let monitor = cmdline.split(|&b| b == 0).nth(1) == Some(b"monitor".as_slice());
        if comm.trim() == "capsid-vmm" || (comm.trim() == "capsid" && monitor) {
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map_or(String::new(), |v| v.trim().to_owned())
            };
            found.push(format!(
                "process {} ({}, state {}, parent {})",
                entry.file_name().to_string_lossy(),
                comm.trim(),
                field("State:"),
                field("PPid:")
            ));
        }
    }
    // `capsid run`'s scratch directories (the default run_dir's).
    for dir in [std::env::temp_dir(), PathBuf::from("/run/capsid/run")] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("capsid-run-")
            {
                found.push(entry.path().display().to_string());
            }
        }
    }
    // Writable disks have no name from the start (the default disk_dir's).
    for entry in std::fs::read_dir("/var/lib/capsid/disks")
        .into_iter()
        .flatten()
        .flatten()
    {
        found.push(format!("disk {}", entry.path().display()));
    }
    // Each VM's cgroup goes with it.
    for entry in std::fs::read_dir("/sys/fs/cgroup/capsid")
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.path().is_dir() {
            found.push(format!("cgroup {}", entry.path().display()));
        }
    }
    found
}

#[test]
fn capsid_run_gives_the_commands_output_and_exit_code() {
    if !require_kvm("capsid_run_gives_the_commands_output_and_exit_code") {
        return;
    }
    let (output, took) = capsid_run(
        &[
            "--env",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING; echo err >&2; exit 4",
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hi\n", "{stderr}");
    assert!(stderr.lines().any(|l| l == "err"), "{stderr}");
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    eprintln!("capsid run → exit in {:.2} s", took.as_secs_f64());

    let input: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let (output, _) = capsid_run(
        &["--user", "1000:1000", "--", "sh", "-c", "id -u >&2; cat"],
        &input,
    );
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout == input, "stdin came back changed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.lines().any(|l| l == "1000"), "{stderr}");

    let (output, took) = capsid_run(&["--timeout", "2s", "--", "sleep", "100"], b"");
    assert_eq!(
        output.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(took < Duration::from_secs(90), "{took:?}");

    // A terminal: the command sees a pty and its exit code comes back.
    let rootfs = std::env::var("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let args = [
        "run",
        "--rootfs",
        &rootfs,
        "-t",
        "--",
        "sh",
        "-c",
        "tty; stty size; exit 5",
    ];
    let (printed, code) = on_a_pty(Command::new(artifact("CAPSID_CLI")).args(args), &args);
    assert!(printed.contains("/dev/pts/"), "{printed:?}");
    assert!(
        printed.contains("24 80"),
        "the terminal's size: {printed:?}"
    );
    assert_eq!(code, Some(5), "{printed:?}");
    // No stray NUL (shown as ^@) at the start of a tty session.
    assert!(
        !printed.contains('\0') && !printed.contains("^@"),
        "{printed:?}"
    );

    // As docker: 127 for a program that is not there, 126 for one that
    // cannot be executed (before, both were 125).
    for (command, code) in [
        ("no-such-program", 127),
        ("/no/such/program", 127),
        ("/bin", 126),
        ("/etc/passwd", 126),
    ] {
        let (output, _) = capsid_run(&["--", command], b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{command}: {stderr}");
        assert!(stderr.contains(command), "{stderr}");
    }
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_container_gets_dockers_defaults() {
    if !require_kvm("a_container_gets_dockers_defaults") {
        return;
    }
    // Before: hostname `youki`, TERM=xterm without a tty, no HOME, and
    // three capabilities (inheritable and ambient too), so root could not
    // chown.
    let script = "hostname; echo \"$HOSTNAME|$HOME|${TERM-unset}\"; \
                  grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
                  touch /owned && chown 1000:1000 /owned && echo chowned";
    let (output, _) = capsid_run(&["--", "sh", "-c", script], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let hostname = lines[0];
    assert!(
        hostname.len() == 12 && hostname.bytes().all(|b| b.is_ascii_hexdigit()),
        "{stdout}"
    );
    assert_eq!(lines[1], format!("{hostname}|/root|unset"), "{stdout}");
    for (key, want) in [
        ("CapInh", "0000000000000000"),
        ("CapPrm", "00000000a80425fb"),
        ("CapEff", "00000000a80425fb"),
        ("CapBnd", "00000000a80425fb"),
        ("CapAmb", "0000000000000000"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(key) && l.ends_with(want)),
            "{key} {want}: {stdout}"
        );
    }
    assert_eq!(lines.last(), Some(&"chowned"), "{stdout}{stderr}");
}

#[test]
fn a_fork_bomb_stops_at_the_pids_limit_and_the_next_job_runs() {
    if !require_kvm("a_fork_bomb_stops_at_the_pids_limit_and_the_next_job_runs") {
        return;
    }
    // An inner shell forks sleepers until fork fails, noting each; the
    // outer one (the container's init) then kills them all with builtins
    // (no fork is left to it) and says how many there were.
    let script = "sh -c 'n=0; while :; do sleep 60 & n=$((n + 1)); echo $n > /tmp/n; done' \
                  2>/dev/null; kill -KILL -1; read n < /tmp/n; echo forked $n";
    let (output, _) = capsid_run(
        &[
            "--pids-limit",
            "16",
            "--timeout",
            "60s",
            "--",
            "sh",
            "-c",
            script,
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    let forked: u32 = stdout
        .trim()
        .strip_prefix("forked ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}{stderr}"));
    // 16 in all: the two shells and at most 14 sleepers.
    assert!((8..=14).contains(&forked), "{forked}: {stderr}");
    let (output, _) = capsid_run(&["--", "echo", "next"], b"");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "next\n");
    let (output, _) = capsid_run(&["--pids-limit", "0", "--", "true"], b"");
    assert_eq!(output.status.code(), Some(125));
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_secret_is_readable_in_the_container_and_nowhere_on_the_host_after() {
    if !require_kvm("a_secret_is_readable_in_the_container_and_nowhere_on_the_host_after") {
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let token = format!("capsid-secret-{}-{nanos}", std::process::id());
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-secret").unwrap();
    let source = scratch.join("token");
    std::fs::write(&source, &token).unwrap();
    let arg = format!("token=@{}", source.display());
    let script = "cat /run/secrets/token; echo; \
                  (echo x > /run/secrets/token) 2>/dev/null && echo writable; \
                  grep -c ' /run/secrets/token ' /proc/self/mounts";
    let (output, _) = capsid_run(&["--secret", &arg, "--", "sh", "-c", script], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, format!("{token}\n1\n"), "read-only, mounted once");
    assert!(
        !stderr.contains(&token),
        "the secret reached capsid's stderr"
    );
    // Nowhere on the host but its source: not in a scratch dir, a cache,
    // a log or a run dir.
    let cache = std::env::var("CAPSID_CACHE").unwrap_or_else(|_| "/var/cache/capsid".into());
    let found = Command::new("grep")
        .args(["-rlsF", "--exclude-dir=proc", "--exclude-dir=sys", &token])
        .arg(std::env::temp_dir())
        .args(["/run", "/var/log", "/var/tmp", &cache])
        .output()
        .unwrap();
    let found = String::from_utf8_lossy(&found.stdout);
    let elsewhere: Vec<&str> = found
        .lines()
        .filter(|path| std::path::Path::new(path) != source)
        .collect();
    assert_eq!(
        elsewhere,
        Vec::<&str>::new(),
        "the secret was written there"
    );
    // A bad secret is refused before anything boots.
    let (output, took) = capsid_run(&["--secret", "x=@/no/such/file", "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("--secret x: /no/such/file"), "{stderr}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn an_oom_kill_is_named_not_a_silent_137() {
    if !require_kvm("an_oom_kill_is_named_not_a_silent_137") {
        return;
    }
    // A string that grows by 1 MiB at a time in a 128 MiB micro-VM: no
    // single allocation is refused, the OOM killer takes awk. (A single
    // 120 MiB buffer is refused by the kernel's overcommit heuristic:
    // `dd: out of memory`, exit 1.)
    let hog = "BEGIN { c = sprintf(\"%1024s\", \"\"); for (i = 0; i < 10; i++) c = c c; \
               while (1) s = s c }";
    let (output, _) = capsid_run(&["--memory", "128M", "--", "awk", hog], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(137), "{stderr}");
    assert!(
        stderr.contains("capsid: the command was killed: out of memory"),
        "{stderr}"
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// `capsid run --report FILE ARGS...`: the run's output and its report.
fn reported(args: &[&str], stdin: &[u8]) -> (Output, serde_json::Value) {
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-report").unwrap();
    let path = scratch.join("report.json");
    let mut all = vec!["--report", path.to_str().unwrap()];
    all.extend(args);
    let (output, _) = capsid_run(&all, stdin);
    let text = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, serde_json::from_slice(&text).unwrap())
}

#[test]
fn runs_are_restored_from_a_template_each_with_its_own_randomness_and_time() {
    if !require_kvm("runs_are_restored_from_a_template_each_with_its_own_randomness_and_time") {
        return;
    }
    // A size of its own: the first run makes this test's template, which
    // is then left to age, so that a clone whose clock were not set would
    // be that far behind.
    const AGE: Duration = Duration::from_secs(40);
    let (output, report) = reported(&["--memory", "208M", "--", "true"], b"");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(report["start"], "restored", "{report}");
    std::thread::sleep(AGE);
    let probe = [
        "--memory",
        "208M",
        "--",
        "sh",
        "-c",
        "head -c 16 /dev/urandom | od -An -tx1; date +%s",
    ];
    let mut randoms = Vec::new();
    for _ in 0..2 {
        let (output, report) = reported(&probe, b"");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(report["start"], "restored", "{report}");
        let mut lines = stdout.lines();
        randoms.push(lines.next().unwrap_or_default().to_owned());
        let guest_time: u64 = lines.next().unwrap_or_default().trim().parse().unwrap();
        let host_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            guest_time.abs_diff(host_time) < AGE.as_secs() / 4,
            "the guest's clock says {guest_time}, the host's {host_time}: the template's time"
        );
    }
    // Clones of one template share its RNG state until the agent reseeds it.
    assert_ne!(
        randoms[0], randoms[1],
        "two clones read the same random bytes"
    );
    let (output, report) = reported(&["--memory", "208M", "--cold", "--", "true"], b"");
    assert!(output.status.success());
    assert_eq!(report["start"], "booted", "{report}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_report_says_how_the_run_went() {
    if !require_kvm("a_report_says_how_the_run_went") {
        return;
    }
    let (output, report) = reported(
        &["--", "sh", "-c", "cat; echo out; echo err >&2; exit 3"],
        b"abc",
    );
    assert_eq!(output.status.code(), Some(3));
    eprintln!("report: {report:#}");
    assert_eq!(report["exit_status"], 3);
    assert_eq!(report["exit_code"], 3);
    assert_eq!(report["signal"], serde_json::Value::Null);
    assert_eq!(report["oom_killed"], false);
    assert_eq!(report["timed_out"], false);
    assert_eq!(report["bytes"]["stdin"], 3);
    assert_eq!(report["bytes"]["stdout"], 7);
    assert_eq!(report["bytes"]["stderr"], 4);
    for step in [
        "prepare", "image", "boot", "create", "run", "output", "shutdown", "total",
    ] {
        assert!(report["durations_ms"][step].is_u64(), "{step}: {report}");
    }
    assert!(report["durations_ms"]["boot"].as_u64() > Some(0));
    assert!(report["peak_memory_bytes"].as_u64() > Some(0), "{report}");

    let (output, report) = reported(&["--timeout", "2s", "--", "sleep", "100"], b"");
    assert_eq!(output.status.code(), Some(124));
    assert_eq!(
        (
            report["exit_status"].as_u64(),
            report["timed_out"].as_bool()
        ),
        (Some(124), Some(true))
    );

    // A failure is reported too.
    let (output, report) = reported(&["--", "no-such-program"], b"");
    assert_eq!(output.status.code(), Some(127));
    assert_eq!(report["exit_status"], 127);
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-program")),
        "{report}"
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// Names in `dir`, sorted.
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_jobs_output_comes_out_checked_also_after_a_failure_or_timeout() {
    if !require_kvm("a_jobs_output_comes_out_checked_also_after_a_failure_or_timeout") {
        return;
    }
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-output").unwrap();
    let host = |name: &str| scratch.join(name).to_str().unwrap().to_owned();
    // A failing job's artefacts arrive, links that stay inside included.
    let out = format!("/work/dist:{}", host("dist"));
    let (output, report) = reported(
        &[
            "--output",
            &out,
            "--",
            "sh",
            "-c",
            "mkdir -p /work/dist/sub && echo hi > /work/dist/a.txt && echo deep > /work/dist/sub/b \
             && ln -s a.txt /work/dist/latest && ln /work/dist/a.txt /work/dist/hard; exit 3",
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let dist = scratch.join("dist");
    assert_eq!(
        std::fs::read_to_string(dist.join("latest")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_to_string(dist.join("sub/b")).unwrap(),
        "deep\n"
    );
    // A hard link arrives as a copy (the agent sends contents, never links).
    assert_eq!(std::fs::read_to_string(dist.join("hard")).unwrap(), "hi\n");
    assert_eq!(report["outputs"][0]["files"], 3, "{report}");
    assert_eq!(report["outputs"][0]["error"], serde_json::Value::Null);
    // A job that timed out still hands over what it made.
    let out = format!("/o:{}", host("partial"));
    let (output, _) = capsid_run(
        &[
            "--timeout",
            "3s",
            "--output",
            &out,
            "--",
            "sh",
            "-c",
            "mkdir /o; echo so far > /o/f; sleep 100",
        ],
        b"",
    );
    assert_eq!(output.status.code(), Some(124));
    assert_eq!(
        std::fs::read_to_string(scratch.join("partial/f")).unwrap(),
        "so far\n"
    );

    // Hostile outputs: refused by name, nothing written, and a job that
    // succeeded fails (125) since its output did not arrive.
    for (script, limits, refusal) in [
        ("ln -s /etc/shadow /o/x", &[][..], "absolute path"),
        ("ln -s ../../etc /o/x", &[], "outside the output"),
        ("mknod /o/null c 1 3", &[], "character device"),
        ("mkfifo /o/pipe", &[], "fifo"),
        ("touch /o/su && chmod u+s /o/su", &[], "set-user-id"),
        (
            "for i in $(seq 30); do : > /o/$i; done",
            &["--output-max-entries", "20"][..],
            "more than 20 entries",
        ),
        (
            "head -c 2097152 /dev/zero > /o/big",
            &["--output-max-bytes", "1M"],
            "more than 1048576 bytes",
        ),
    ] {
        let dest = host("hostile");
        let out = format!("/o:{dest}");
        let mut args = vec!["--output", &out];
        args.extend(limits);
        let script = format!("mkdir /o && {script}");
        args.extend(["--", "sh", "-c", &script]);
        let (output, report) = reported(&args, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(125), "{script}: {stderr}");
        assert!(stderr.contains(refusal), "{script}: {stderr}");
        assert!(
            report["outputs"][0]["error"]
                .as_str()
                .is_some_and(|e| e.contains(refusal)),
            "{report}"
        );
        assert!(
            !std::path::Path::new(&dest).exists(),
            "{script}: {dest} appeared"
        );
        assert_eq!(
            names_in(scratch.path()),
            ["dist", "partial"],
            "{script}: written beside"
        );
    }
    // A destination that is there already is named before anything boots.
    let out = format!("/o:{}", host("dist"));
    let (output, took) = capsid_run(&["--output", &out, "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("not an empty directory"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_disk_filler_stops_at_the_scratch_disk_and_the_next_job_runs() {
    if !require_kvm("a_disk_filler_stops_at_the_scratch_disk_and_the_next_job_runs") {
        return;
    }
    // 200 MiB into a 64 MiB writable layer: ENOSPC, the VM lives on.
    let script = "dd if=/dev/zero of=/fill bs=1M count=200 2>&1 | grep -m1 'No space'; \
                  df -k / | tail -1; echo alive";
    let (output, report) = reported(&["--disk", "64M", "--", "sh", "-c", script], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("No space left on device"), "{stdout}");
    assert!(stdout.ends_with("alive\n"), "{stdout}");
    let size_kib: u64 = stdout
        .lines()
        .find(|l| l.starts_with("overlay"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overlay in df: {stdout}"));
    assert!((48_000..=66_000).contains(&size_kib), "{size_kib} KiB");
    assert!(report["durations_ms"]["disk"].is_u64(), "{report}");
    // Without --disk the writes stay in guest memory, bounded all the
    // same: the guest's tmpfs stops them at half the VM's memory.
    let script = "dd if=/dev/zero of=/fill bs=1M count=200 2>&1 | grep -m1 'No space'; echo next";
    let (output, _) = capsid_run(&["--memory", "128M", "--", "sh", "-c", script], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("No space left on device") && stdout.ends_with("\nnext\n"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(leftovers(), Vec::<String>::new());

    // The disk's blocks come from disk_dir's file system (not /run's
    // tmpfs, host memory), taken up front: a disk it has no room for is
    // refused before anything boots.
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-disk-dir").unwrap();
    let small = scratch.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success());
    let rootfs = std::env::var_os("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let output = Command::new(artifact("CAPSID_CLI"))
        .args(["run", "--disk", "64M", "--rootfs"])
        .arg(rootfs)
        .args(["--", "true"])
        .env("CAPSID_DISK_DIR", &small)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let listed = names_in(&small);
    let _ = Command::new("umount").arg(&small).status();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("no room for a 64 MiB disk in") && stderr.contains("MiB free there"),
        "{stderr}"
    );
    assert!(listed.is_empty(), "{listed:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn volumes_are_images_of_host_dirs_and_caches_outlive_a_run_held_by_one_at_a_time() {
    if !require_kvm(
        "volumes_are_images_of_host_dirs_and_caches_outlive_a_run_held_by_one_at_a_time",
    ) {
        return;
    }
    let scratch = capsid_testbed::ScratchDir::new("capsid-e2e-volume").unwrap();
    let src = scratch.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a.txt"), "from the host\n").unwrap();
    let ro = format!("{}:/src", src.display());
    let rw = format!("{}:/rw:rw", src.display());
    let script = "cat /src/a.txt; (echo x > /src/new) 2>/dev/null || echo read-only; \
                  echo changed > /rw/a.txt && cat /rw/a.txt";
    let (output, _) = capsid_run(&["-v", &ro, "-v", &rw, "--", "sh", "-c", script], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "from the host\nread-only\nchanged\n");
    // The host's directory never saw the guest's writes.
    assert_eq!(
        std::fs::read_to_string(src.join("a.txt")).unwrap(),
        "from the host\n"
    );
    assert_eq!(names_in(&src), ["a.txt"]);

    // A cache: what one run leaves, the next finds.
    let name = format!("e2e-{}", std::process::id());
    let cache = format!("{name}:/cache:64M");
    let (output, _) = capsid_run(
        &[
            "--cache",
            &cache,
            "--",
            "sh",
            "-c",
            "echo kept > /cache/stamp",
        ],
        b"",
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (output, _) = capsid_run(&["--cache", &cache, "--", "cat", "/cache/stamp"], b"");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "kept\n");
    // Held by one run at a time: a second is refused at once.
    let rootfs = std::env::var("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let mut holder = Command::new(artifact("CAPSID_CLI"))
        .args([
            "run",
            "--rootfs",
            &rootfs,
            "--cache",
            &cache,
            "--",
            "sh",
            "-c",
            "echo ready; sleep 60",
        ])
        .env("TMPDIR", std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "ready\n");
    let (output, took) = capsid_run(&["--cache", &cache, "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("in use by another job"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    unsafe_free_kill(holder.id(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    unsafe_free_kill(holder.id(), libc::SIGTERM);
    let _ = holder.wait();
    let caches = std::path::PathBuf::from(
        std::env::var("CAPSID_CACHE").unwrap_or_else(|_| "/var/cache/capsid".into()),
    )
    .join("caches");
    for file in [format!("{name}.ext4"), format!("{name}.lock")] {
        std::fs::remove_file(caches.join(file)).unwrap();
    }
    assert_eq!(
        processes_left_after(Duration::from_secs(10)),
        Vec::<String>::new()
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn an_unknown_option_is_a_usage_error_and_boots_nothing() {
    // Before, `--memroy 128M true` booted a VM and tried to execute
    // "--memroy" (exit 125 after a boot); clap's usage errors exited 2.
    for args in [
        &["--memroy", "128M", "true"][..],
        &["--rm", "true"],
        &["-it", "sh"],
    ] {
        let (output, took) = capsid_run(args, b"");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(stderr.contains("unexpected argument"), "{stderr}");
        assert!(!stderr.contains("agent answered"), "it booted: {stderr}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
    let (output, _) = capsid_run(&["--memroy", "128M", "true"], b"");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--memory"),
        "the near miss is named"
    );
    // A rootfs that cannot be one is refused before anything boots.
    let empty = capsid_testbed::ScratchDir::new("capsid-e2e-empty-rootfs").unwrap();
    let source = ["--rootfs".as_ref(), empty.path().as_os_str()];
    let (output, took) = capsid_run_from(&source, &["--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("an empty directory"), "{stderr}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_signal_to_capsid_run_reaches_the_command_and_a_second_one_kills_it() {
    if !require_kvm("a_signal_to_capsid_run_reaches_the_command_and_a_second_one_kills_it") {
        return;
    }
    let rootfs = std::env::var("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let run = |script: &str| {
        Command::new(artifact("CAPSID_CLI"))
            .args(["run", "--rootfs", &rootfs, "--", "sh", "-c", script])
            .env("TMPDIR", std::env::temp_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn capsid")
    };
    // Waits for the line `ready` on stdout, sends `signals`, returns the
    // output and status.
    let drive = |mut child: std::process::Child, signals: &[i32]| {
        use std::io::BufRead;
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let started = Instant::now();
        while line.trim() != "ready" {
            line.clear();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 || started.elapsed() > RUN_BOUND {
                let _ = child.kill();
                let output = child.wait_with_output().unwrap();
                panic!("no `ready`: {}", String::from_utf8_lossy(&output.stderr));
            }
        }
        for &signal in signals {
            unsafe_free_kill(child.id(), signal);
            std::thread::sleep(Duration::from_millis(300));
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        let output = child.wait_with_output().unwrap();
        (rest, output, started.elapsed())
    };
    // A CI runner's cancel: the job's trap runs and its status is ours.
    let trapping = run("trap 'echo cleaned up; exit 3' TERM; echo ready; sleep 60 & wait");
    let (rest, output, took) = drive(trapping, &[libc::SIGTERM]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(rest, "cleaned up\n", "{stderr}");
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("passed SIGTERM on to the command"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(50), "{took:?}");
    // One that ignores it: a second signal kills it at once.
    let deaf = run("trap '' TERM INT; echo ready; sleep 60 & wait; wait");
    let (_, output, took) = drive(deaf, &[libc::SIGTERM, libc::SIGINT]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("killing the command"), "{stderr}");
    assert!(took < Duration::from_secs(50), "{took:?}");
    assert_eq!(
        processes_left_after(Duration::from_secs(10)),
        Vec::<String>::new()
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn capsid_run_from_an_oci_layout_uses_the_images_config() {
    if !require_kvm("capsid_run_from_an_oci_layout_uses_the_images_config") {
        return;
    }
    let layout = std::env::var_os("CAPSID_TEST_IMAGES_DIR")
        .map(|d| PathBuf::from(d).join("busybox-user.oci"))
        .expect("CAPSID_TEST_IMAGES_DIR is set by `make test`");
    // No command: the image's Cmd (/bin/sh, reading stdin) as its User.
    let image = format!("{}:latest", layout.display());
    let (output, _) = capsid_run_from(
        &["--image".as_ref(), image.as_ref()],
        &[],
        b"id; pwd; echo $PATH; exit 6\n",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("uid=1000(capsid) gid=1000(capsid)"),
        "{stdout}"
    );
    assert_eq!(lines[1], "/", "{stdout}");
    assert!(lines[2].contains("/usr/local/sbin"), "{stdout}");
    // The command line wins over the image's config.
    let (output, _) = capsid_run_from(
        &["--image".as_ref(), layout.as_os_str()],
        &["--user", "0:0", "--", "id", "-u"],
        b"",
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout), "0\n");
    let (output, _) = capsid_run_from(
        &["--image".as_ref(), "/no/such/layout".as_ref()],
        &["--", "true"],
        b"",
    );
    assert_eq!(output.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an OCI layout"));
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// The pid of a child of `parent` whose command is `comm`.
#[test]
fn a_command_starts_with_default_signal_actions_so_a_closed_pipe_ends_it_quietly() {
    if !require_kvm("a_command_starts_with_default_signal_actions_so_a_closed_pipe_ends_it_quietly")
    {
        return;
    }
    // The agent ignores SIGPIPE (Rust's runtime does); its children must not.
    let (output, _) = capsid_run(
        &[
            "--",
            "sh",
            "-c",
            "grep -E '^Sig(Ign|Blk):' /proc/self/status; yes | head -n 1",
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stdout, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\ny\n",
        "{stderr}"
    );
    assert!(
        !stderr.contains("pipe") && !stderr.contains("write error"),
        "{stderr}"
    );
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn the_guest_sees_a_cpu_with_a_name() {
    if !require_kvm("the_guest_sees_a_cpu_with_a_name") {
        return;
    }
    // The host's brand string, or ours when the host's CPU has none (the
    // nested test host's): never an empty "model name".
    let (output, _) = capsid_run(&["--", "grep", "-m1", "^model name", "/proc/cpuinfo"], b"");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let name = stdout.split_once(':').map_or("", |(_, name)| name.trim());
    eprintln!("the guest's CPU: {name:?}");
    assert!(
        !name.is_empty(),
        "{stdout:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// A child of `parent` whose program is `comm`; for capsid-vmm, one that
/// runs a VM.
pub(crate) fn child_named(parent: u32, comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            // `capsid-vmm --probe` (what `capsid run` asks first) runs no
            // VM. A process in the middle of its exec has its new name but
            // no arguments yet: not known until they are there.
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let known =
                !cmdline.is_empty() && !cmdline.split(|&b| b == 0).any(|arg| arg == b"--probe");
            (field("Name:") == Some(comm) && field("PPid:") == Some(&parent.to_string()) && known)
                .then_some(pid)
        })
}

/// `capsid run OPTIONS -- sh -c "echo started; sleep SECONDS"` with `envs`
/// added to its environment, once the command said it started: the CLI's
/// process (stderr as asked) and its VMM's pid (the keeper's, under which
/// the confined VMM runs).
pub(crate) fn started_in_a_micro_vm(
    options: &[&str],
    envs: &[(&str, &std::path::Path)],
    seconds: u32,
    stderr: Stdio,
) -> (std::process::Child, u32) {
    let rootfs = std::env::var("CAPSID_TEST_ROOTFS_DIR").unwrap();
    let mut child = Command::new(artifact("CAPSID_CLI"))
        .arg("run")
        .args(options)
        .args(["--rootfs", &rootfs, "--", "sh", "-c"])
        .arg(format!("echo started; sleep {seconds}"))
        .env("TMPDIR", std::env::temp_dir())
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn capsid");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (sender, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut stdout, &mut line);
        let _ = sender.send(line);
    });
    let line = started.recv_timeout(RUN_BOUND);
    let vmm = child_named(child.id(), "capsid-vmm");
    let (Ok("started\n"), Some(vmm)) = (line.as_deref(), vmm) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the command did not start in a micro-VM: {line:?}, VMM {vmm:?}");
    };
    (child, vmm)
}

#[test]
fn a_micro_vm_that_dies_under_a_command_is_named_with_its_console() {
    if !require_kvm("a_micro_vm_that_dies_under_a_command_is_named_with_its_console") {
        return;
    }
    let (mut child, vmm) = started_in_a_micro_vm(&[], &[], 100, Stdio::piped());
    let mut stderr = child.stderr.take().unwrap();
    // As if the guest or the VMM died under the command.
    unsafe_free_kill(vmm, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("capsid run went on for 30 s after its VMM died");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
    eprintln!("what capsid run says when its VMM dies:\n{err}");
    assert_eq!(status.code(), Some(125), "{err}");
    assert!(
        err.contains("the micro-VM is gone: capsid-vmm killed by signal 9"),
        "{err}"
    );
    // The console's end is quoted: the agent logs there that it created
    // the container (after "capsid-agent ready" in a guest that booted,
    // after its refresh in one restored from its template).
    let console = err
        .split("the guest console ended with:")
        .nth(1)
        .unwrap_or_else(|| panic!("no console quoted: {err}"));
    assert!(console.contains("container created container=run"), "{err}");
    assert_eq!(leftovers(), Vec::<String>::new());
}

#[test]
fn a_killed_capsid_run_takes_its_micro_vm_with_it_and_the_next_run_clears_the_rest() {
    if !require_kvm(
        "a_killed_capsid_run_takes_its_micro_vm_with_it_and_the_next_run_clears_the_rest",
    ) {
        return;
    }
    // The workload would end by itself after 15 s; the VM must not wait for it.
    let (mut child, vmm) = started_in_a_micro_vm(&[], &[], 15, Stdio::null());
    child.kill().unwrap();
    child.wait().unwrap();
    let left = processes_left_after(Duration::from_secs(10));
    if !left.is_empty() {
        unsafe_free_kill(vmm, libc::SIGKILL);
        panic!("10 s after capsid run {} was killed: {left:?}", child.id());
    }
    let left = leftovers();
    assert!(
        left.iter()
            .any(|l| l.starts_with("/run/capsid/run/capsid-run-")),
        "a SIGKILL leaves the scratch directory, for the next run to remove: {left:?}"
    );
    // The next run removes what the killed one left, and says so.
    let (output, _) = capsid_run(&["--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("left with its micro-VM by a capsid run that was killed"),
        "{stderr}"
    );
    assert_eq!(leftovers(), Vec::<String>::new());
}

/// `capsid ARGS`, bounded; stdout, stderr, exit code. The output goes to
/// files: `create` leaves a monitor holding them, as runc's container does.
pub(crate) fn capsid(args: &[&str], scratch: &std::path::Path) -> (String, String, Option<i32>) {
    program(&artifact("CAPSID_CLI"), args, scratch)
}

/// `PROGRAM ARGS` as [`capsid`] runs capsid (runc, to compare with).
fn program(
    program: &std::path::Path,
    args: &[&str],
    scratch: &std::path::Path,
) -> (String, String, Option<i32>) {
    let name = program.file_name().unwrap_or_default().to_string_lossy();
    let prefix = if name == "capsid" {
        String::new()
    } else {
        format!("{name}-")
    };
    // Named after the verb (not an option or its path value).
    let verb = args
        .iter()
        .find(|a| !a.starts_with('-') && !a.contains('/'))
        .unwrap_or(&"none");
    let out = scratch.join(format!("{prefix}out-{verb}"));
    let err = scratch.join(format!("{prefix}err-{verb}"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn the program");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < RUN_BOUND, "{args:?} hung");
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    (read(&out), read(&err), status.code())
}

/// Whether process `pid` runs (a zombie that its new parent has not
/// reaped yet has ended).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// The keys of a JSON object.
fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[test]
fn capsid_version_features_and_state_read_as_runcs() {
    if !require_kvm("capsid_version_features_and_state_read_as_runcs") {
        return;
    }
    let runc = std::path::Path::new("/usr/sbin/runc");
    let scratch = tempfile_dir("capsid-runc-format");
    // --version: "NAME version V", "commit: C", "spec: S", as Docker reads them.
    let (ours, _, code) = capsid(&["--version"], &scratch);
    assert_eq!(code, Some(0));
    let (theirs, _, _) = program(runc, &["--version"], &scratch);
    let shape = |text: &str| -> Vec<String> {
        text.lines()
            .take(3)
            .map(|l| l.split_whitespace().skip(1).take(1).collect::<String>())
            .collect()
    };
    assert_eq!(shape(&theirs)[0], "version", "{theirs}");
    assert_eq!(shape(&ours)[0], "version", "{ours}");
    let prefixes = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .take(2)
            .map(|l| l.split(':').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(prefixes(&ours), prefixes(&theirs), "{ours}\n{theirs}");

    // features: runc's document, with the same sections.
    let (ours, err, code) = capsid(&["features"], &scratch);
    assert_eq!(code, Some(0), "{err}");
    let (theirs, _, _) = program(runc, &["features"], &scratch);
    let (ours, theirs): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&ours).unwrap(),
        serde_json::from_str(&theirs).unwrap(),
    );
    assert_eq!(keys(&ours), keys(&theirs));
    for key in keys(&ours["linux"]) {
        assert!(
            theirs["linux"].get(&key).is_some(),
            "linux.{key} is not runc's"
        );
    }

    // state of a created container: runc's fields; the pid is the one in
    // --pid-file, a live host process that stands for the init.
    let bundle = oci_bundle(&scratch, "cat /proc/self/oom_score_adj; exec sleep 1000");
    // runc applies process.oomScoreAdj; so must we.
    let mut spec = oci_spec::runtime::Spec::load(bundle.join("config.json")).unwrap();
    let mut process = spec.process().clone().unwrap();
    process.set_oom_score_adj(Some(123));
    spec.set_process(Some(process));
    spec.save(bundle.join("config.json")).unwrap();
    let bundle = bundle.to_str().unwrap();
    let root = scratch.join("state");
    let root = root.to_str().unwrap();
    let pid_file = scratch.join("pid");
    let (_, err, code) = capsid(
        &[
            "--root",
            root,
            "create",
            "--bundle",
            bundle,
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ],
        &scratch,
    );
    assert_eq!(code, Some(0), "create: {err}");
    let runc_root = scratch.join("runc-state");
    let runc_root = runc_root.to_str().unwrap();
    // runc takes no symbolic link as the rootfs: its bundle names the
    // test rootfs itself (read-only, as Spec::default has it).
    let runc_bundle = scratch.join("runc-bundle");
    std::fs::create_dir_all(&runc_bundle).unwrap();
    let mut runc_spec =
        oci_spec::runtime::Spec::load(std::path::Path::new(bundle).join("config.json")).unwrap();
    let rootfs =
        std::fs::canonicalize(std::env::var_os("CAPSID_TEST_ROOTFS_DIR").unwrap()).unwrap();
    let mut runc_root_fs = runc_spec.root().clone().unwrap();
    runc_root_fs.set_path(rootfs);
    runc_spec.set_root(Some(runc_root_fs));
    runc_spec.save(runc_bundle.join("config.json")).unwrap();
    let (_, err, code) = program(
        runc,
        &[
            "--root",
            runc_root,
            "create",
            // The test host's root is an initramfs, where pivot_root fails.
            "--no-pivot",
            "--bundle",
            runc_bundle.to_str().unwrap(),
            "r1",
        ],
        &scratch,
    );
    assert_eq!(code, Some(0), "runc create: {err}");
    let (ours, err, code) = capsid(&["state", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "{err}");
    let (theirs, err, code) = program(runc, &["--root", runc_root, "state", "r1"], &scratch);
    assert_eq!(code, Some(0), "runc state: {err}");
    let _ = program(
        runc,
        &["--root", runc_root, "delete", "--force", "r1"],
        &scratch,
    );
    let (ours, theirs): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&ours).unwrap(),
        serde_json::from_str(&theirs).unwrap(),
    );
    for key in keys(&theirs) {
        assert!(ours.get(&key).is_some(), "state lacks runc's {key}: {ours}");
    }
    assert_eq!(ours["status"], theirs["status"]);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(
        ours["pid"].as_u64().map(|p| p.to_string()),
        Some(pid.clone())
    );
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "capsid", "the pid stands for the init");
    let created = ours["created"].as_str().unwrap_or_default();
    assert!(
        created.len() > 19 && created.as_bytes()[10] == b'T',
        "{created}"
    );
    // The pid lives as long as the workload.
    let (_, err, code) = capsid(&["start", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "start: {err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let printed = || std::fs::read_to_string(scratch.join("out-create")).unwrap_or_default();
    while !printed().contains('\n') {
        assert!(Instant::now() < deadline, "the workload printed nothing");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(printed().trim(), "123", "process.oomScoreAdj applies");
    // pause freezes the container (an exec is refused meanwhile), resume
    // thaws it; state says so, as runc's.
    let (_, err, code) = capsid(&["pause", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "pause: {err}");
    assert_eq!(oci_status(root, "c1", &scratch), "paused");
    let (_, err, code) = capsid(&["exec", "--root", root, "c1", "--", "true"], &scratch);
    assert_eq!(code, Some(125));
    assert!(err.contains("paused"), "{err}");
    let (_, err, code) = capsid(&["resume", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "resume: {err}");
    assert_eq!(oci_status(root, "c1", &scratch), "running");
    let (out, err, code) = capsid(
        &["exec", "--root", root, "c1", "--", "echo", "thawed"],
        &scratch,
    );
    assert_eq!((out.as_str(), code), ("thawed\n", Some(0)), "exec: {err}");
    // update gives the container new limits in the guest, as runc's.
    let (_, err, code) = capsid(
        &[
            "update",
            "--root",
            root,
            "--memory",
            "67108864",
            "--pids-limit",
            "50",
            "c1",
        ],
        &scratch,
    );
    assert_eq!(code, Some(0), "update: {err}");
    let (out, err, code) = capsid(
        &[
            "exec",
            "--root",
            root,
            "c1",
            "--",
            "cat",
            "/sys/fs/cgroup/memory.max",
            "/sys/fs/cgroup/pids.max",
        ],
        &scratch,
    );
    assert_eq!(
        (out.as_str(), code),
        ("67108864\n50\n", Some(0)),
        "exec: {err}"
    );
    // ps --format json: the host pids, as docker top reads runc's.
    let (out, err, code) = capsid(&["ps", "--root", root, "--format", "json", "c1"], &scratch);
    assert_eq!(code, Some(0), "ps: {err}");
    assert_eq!(out.trim(), format!("[{}]", pid.trim()));
    // exec --detach returns once the process runs; the pid in --pid-file
    // stands for it and lives as long as it.
    let exec_pid = scratch.join("exec.pid");
    let started = Instant::now();
    let (_, err, code) = capsid(
        &[
            "exec",
            "--root",
            root,
            "--detach",
            "--pid-file",
            exec_pid.to_str().unwrap(),
            "c1",
            "--",
            "sleep",
            "3",
        ],
        &scratch,
    );
    assert_eq!(code, Some(0), "exec --detach: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "it did not wait"
    );
    let stand_in = std::fs::read_to_string(&exec_pid).unwrap();
    assert!(running(&stand_in), "the exec's stand-in runs");
    while running(&stand_in) {
        assert!(
            Instant::now() < deadline,
            "the stand-in outlived its process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "it lived as long as its process"
    );
    let (_, err, code) = capsid(&["kill", "--root", root, "c1", "KILL"], &scratch);
    assert_eq!(code, Some(0), "kill: {err}");
    while running(&pid) {
        assert!(Instant::now() < deadline, "the pid outlived its workload");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, err, code) = capsid(&["delete", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "delete: {err}");
    assert_eq!(leftovers(), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&scratch);
}

pub(crate) fn oci_status(root: &str, id: &str, scratch: &std::path::Path) -> String {
    let (out, err, code) = capsid(&["state", "--root", root, id], scratch);
    assert_eq!(code, Some(0), "{err}");
    let state: serde_json::Value = serde_json::from_str(&out).unwrap();
    state["status"].as_str().unwrap().to_owned()
}

/// A bundle in `scratch/bundle` over the test rootfs whose process runs
/// `sh -c script`, without a terminal.
pub(crate) fn oci_bundle(scratch: &std::path::Path, script: &str) -> PathBuf {
    let bundle = scratch.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let rootfs = std::env::var_os("CAPSID_TEST_ROOTFS_DIR").expect("set by `make test`");
    std::os::unix::fs::symlink(rootfs, bundle.join("rootfs")).unwrap();
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap();
    process.set_args(Some(vec!["sh".into(), "-c".into(), script.into()]));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.save(bundle.join("config.json")).unwrap();
    bundle
}

#[test]
fn capsid_oci_verbs_follow_runcs_conventions() {
    if !require_kvm("capsid_oci_verbs_follow_runcs_conventions") {
        return;
    }
    let scratch = tempfile_dir("capsid-oci-test");
    let bundle = oci_bundle(&scratch, "echo started; exec sleep 1000");
    // Host hooks, as runc runs them: each writes its name, its argument and
    // the id and status of the state on its stdin.
    let hooked = scratch.join("hooks.log");
    let hook = |name: &str| {
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c",
            format!(r#"read -r s; echo "$0 $(echo "$s" | tr -d '{{}}' | tr ',' '\n' | grep -E '"(id|status)"' | tr '\n' ' ')" >> {}"#,
                hooked.display()), name]})
    };
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    spec["hooks"] = serde_json::json!({
        "createRuntime": [hook("createRuntime")],
        "poststart": [hook("poststart")],
        "poststop": [hook("poststop")],
    });
    std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
    let root = scratch.join("state");
    let root = root.to_str().unwrap();
    let bundle = bundle.to_str().unwrap();

    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "c1"],
        &scratch,
    );
    assert_eq!(code, Some(0), "create: {err}");
    assert_eq!(oci_status(root, "c1", &scratch), "created");
    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "c1"],
        &scratch,
    );
    assert_eq!(code, Some(125));
    assert!(err.contains("already exists"), "{err}");

    let (_, err, code) = capsid(&["start", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "start: {err}");
    assert_eq!(oci_status(root, "c1", &scratch), "running");
    let (out, err, code) = capsid(
        &[
            "exec",
            "--root",
            root,
            "c1",
            "--",
            "sh",
            "-c",
            "echo in-exec; exit 3",
        ],
        &scratch,
    );
    assert_eq!((out.as_str(), code), ("in-exec\n", Some(3)), "exec: {err}");
    let (_, err, code) = capsid(&["delete", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(125));
    assert!(err.contains("running"), "{err}");

    let (_, err, code) = capsid(&["kill", "--root", root, "c1", "KILL"], &scratch);
    assert_eq!(code, Some(0), "kill: {err}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while oci_status(root, "c1", &scratch) != "stopped" {
        assert!(Instant::now() < deadline, "c1 did not stop after SIGKILL");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The container's stdout was create's.
    let created_out = std::fs::read_to_string(scratch.join("out-create")).unwrap_or_default();
    assert!(created_out.contains("started"), "{created_out:?}");
    let (_, err, code) = capsid(&["delete", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(0), "delete: {err}");
    let (_, err, code) = capsid(&["state", "--root", root, "c1"], &scratch);
    assert_eq!(code, Some(125));
    assert!(err.contains("does not exist"), "{err}");
    let ran = std::fs::read_to_string(&hooked).unwrap_or_default();
    let ran: Vec<&str> = ran.lines().map(str::trim).collect();
    assert_eq!(
        ran,
        [
            r#"createRuntime "id":"c1" "status":"creating""#,
            r#"poststart "id":"c1" "status":"running""#,
            r#"poststop "id":"c1" "status":"stopped""#,
        ],
        "hooks ran in order with the state"
    );
    // A failing createRuntime hook fails create, which leaves nothing.
    spec["hooks"] = serde_json::json!({"createRuntime": [
        {"path": "/bin/sh", "args": ["sh", "-c", "echo no network for you >&2; exit 7"]}
    ]});
    std::fs::write(
        std::path::Path::new(bundle).join("config.json"),
        spec.to_string(),
    )
    .unwrap();
    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "c3"],
        &scratch,
    );
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("hooks.createRuntime[0] (/bin/sh) failed: exit status: 7")
            && err.contains("no network for you"),
        "{err}"
    );
    assert!(!std::path::Path::new(root).join("c3").exists());
    assert_eq!(leftovers(), Vec::<String>::new());
    spec["hooks"] = serde_json::Value::Null;
    std::fs::write(
        std::path::Path::new(bundle).join("config.json"),
        spec.to_string(),
    )
    .unwrap();

    // delete --force takes a running container's VM down.
    let (_, err, code) = capsid(
        &["create", "--root", root, "--bundle", bundle, "c2"],
        &scratch,
    );
    assert_eq!(code, Some(0), "create: {err}");
    let (_, err, code) = capsid(&["start", "--root", root, "c2"], &scratch);
    assert_eq!(code, Some(0), "start c2: {err}");
    assert_eq!(oci_status(root, "c2", &scratch), "running");
    let (_, err, code) = capsid(&["delete", "--force", "--root", root, "c2"], &scratch);
    assert_eq!(code, Some(0), "delete --force: {err}");
    assert_eq!(leftovers(), Vec::<String>::new());
    assert_eq!(std::fs::read_dir(root).unwrap().count(), 0);
    let _ = std::fs::remove_dir_all(&scratch);
}

pub(crate) fn tempfile_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
