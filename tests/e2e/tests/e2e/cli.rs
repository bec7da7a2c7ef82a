//! `cocoon run` end to end: the CLI converts the test rootfs directory,
//! boots a micro-VM, runs the command attached, and leaves nothing behind.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cocoon_e2e::{artifact, require_kvm};

/// Generous (nested mode), but a hang must end the test with what was said.
const RUN_BOUND: Duration = Duration::from_secs(150);

fn unsafe_free_kill(pid: u32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

fn cocoon_run(args: &[&str], stdin: &[u8]) -> (Output, Duration) {
    let rootfs = std::env::var_os("COCOON_TEST_ROOTFS_DIR")
        .map(PathBuf::from)
        .expect("COCOON_TEST_ROOTFS_DIR is set by `make test`");
    let start = Instant::now();
    let mut child = Command::new(artifact("COCOON_CLI"))
        .arg("run")
        .arg("--rootfs")
        .arg(&rootfs)
        .args(args)
        .env("TMPDIR", std::env::temp_dir())
        .env("COCOON_DEBUG", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cocoon");
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
            // SIGTERM first: cocoon cleans up on it.
            unsafe_free_kill(child.id(), libc::SIGTERM);
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let status = child.wait().unwrap();
            let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!(
                "cocoon run {args:?} still running after {RUN_BOUND:?} ({status}); stderr:\n{err}"
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

/// Processes and scratch directories `cocoon run` could leave behind.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim() == "cocoon-vmm" {
            found.push(format!("process {}", entry.file_name().to_string_lossy()));
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("cocoon-run-")
        {
            found.push(entry.path().display().to_string());
        }
    }
    found
}

#[test]
fn cocoon_run_gives_the_commands_output_and_exit_code() {
    if !require_kvm("cocoon_run_gives_the_commands_output_and_exit_code") {
        return;
    }
    let (output, took) = cocoon_run(
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
    eprintln!("cocoon run → exit in {:.2} s", took.as_secs_f64());

    let input: Vec<u8> = (0..=255u8).cycle().take(256 * 1024).collect();
    let (output, _) = cocoon_run(
        &["--user", "1000:1000", "--", "sh", "-c", "id -u >&2; cat"],
        &input,
    );
    assert_eq!(output.status.code(), Some(0));
    assert!(output.stdout == input, "stdin came back changed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.lines().any(|l| l == "1000"), "{stderr}");

    let (output, took) = cocoon_run(&["--timeout", "2s", "--", "sleep", "100"], b"");
    assert_eq!(
        output.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(took < Duration::from_secs(90), "{took:?}");

    let (output, _) = cocoon_run(&["--", "no-such-program"], b"");
    assert_eq!(output.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no-such-program"));
    assert_eq!(leftovers(), Vec::<String>::new());
}
