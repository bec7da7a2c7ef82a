//! capsid-agent end to end: our kernel, the agent as PID 1, the busybox test
//! image on a virtio-blk disk, driven through the host's client over the
//! VMM's hybrid vsock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_protocol::{ClientError, ExitStatus, ProcessRef, StdioRequest};
use capsid_testbed::agent::{AgentVm, Outcome};
use oci_spec::runtime::{LinuxResources, LinuxSeccomp, Process, Spec};

/// Bytes 0..=255 in a scrambled order, `len` of them (binary, every value).
fn binary_data(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn with_process(mut spec: Spec, edit: impl FnOnce(&mut Process)) -> Spec {
    let mut process = spec.process().clone().unwrap();
    edit(&mut process);
    spec.set_process(Some(process));
    spec
}

fn json<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap()
}

#[test]
fn agent_runs_a_command_with_exact_stdio_and_exit_code() {
    if !require_kvm("agent_runs_a_command_with_exact_stdio_and_exit_code") {
        return;
    }
    let vm = AgentVm::boot("agent-basic", 1, 256);
    eprintln!(
        "agent ready {:.2} s after the VMM started ({})",
        vm.ready_after.as_secs_f64(),
        vm.client.agent()
    );
    let outcome = vm.run(
        "basic",
        AgentVm::spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
        None,
    );
    assert_eq!(outcome.stdout_text(), "out\n");
    assert_eq!(outcome.stderr_text(), "err\n");
    assert_eq!(outcome.status, ExitStatus::Code(3));

    // A program that is not there: an error naming it, at start.
    let stdio = StdioRequest::default();
    vm.create("missing", AgentVm::spec(&["no-such-program"]), stdio);
    let err = vm
        .client
        .start_process(&ProcessRef::init("missing"))
        .unwrap_err();
    assert!(err.to_string().contains("no-such-program"), "{err}");
    vm.client.remove_container("missing").unwrap();

    // Hostile-ish requests from the host are refused, not obeyed.
    let err = vm
        .client
        .remove_container("../../etc")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not 1 to 128"), "{err}");
    let rss = agent_rss_kib(&vm);
    eprintln!("agent RSS in the guest: {rss} KiB");
    vm.shutdown();
}

/// The agent's VmRSS, read from inside a container (it shares the VM's
/// /proc only through a fresh mount, so look it up by name in a pid
/// namespace-free container).
fn agent_rss_kib(vm: &AgentVm) -> u64 {
    let mut spec = AgentVm::spec(&["sh", "-c", "grep VmRSS /proc/1/status"]);
    // No PID namespace: /proc shows the VM's processes, PID 1 is the agent.
    let mut linux = spec.linux().clone().unwrap();
    let namespaces = linux
        .namespaces()
        .clone()
        .unwrap()
        .into_iter()
        .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Pid)
        .collect();
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
    let outcome = vm.run("rss", spec, None);
    outcome
        .stdout_text()
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {:?}", outcome.stdout_text()))
}

#[test]
fn stdin_and_stdout_are_byte_exact_and_fast() {
    if !require_kvm("stdin_and_stdout_are_byte_exact_and_fast") {
        return;
    }
    let vm = AgentVm::boot("agent-stdio", 1, 256);
    let input = binary_data(1 << 20);
    let start = Instant::now();
    let outcome = vm.run("cat", AgentVm::spec(&["cat"]), Some(&input));
    let elapsed = start.elapsed();
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{}",
        outcome.stderr_text()
    );
    assert_eq!(outcome.stdout.len(), input.len());
    assert!(
        outcome.stdout == input,
        "1 MiB through cat came back changed"
    );
    eprintln!(
        "stdin→cat→stdout 1 MiB round trip: {:.2} s",
        elapsed.as_secs_f64()
    );

    let bytes = 16 << 20;
    let start = Instant::now();
    let outcome = vm.run(
        "out",
        AgentVm::spec(&["head", "-c", &bytes.to_string(), "/dev/zero"]),
        None,
    );
    let elapsed = start.elapsed();
    assert_eq!(outcome.status, ExitStatus::Code(0));
    assert_eq!(outcome.stdout.len(), bytes);
    assert!(outcome.stdout.iter().all(|&b| b == 0));
    eprintln!(
        "stdout throughput guest→host: {:.1} MiB/s (16 MiB in {:.2} s, create to exit)",
        16.0 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    vm.shutdown();
}

#[test]
fn signals_exec_and_an_unreachable_agent() {
    if !require_kvm("signals_exec_and_an_unreachable_agent") {
        return;
    }
    let vm = AgentVm::boot("agent-signals", 1, 256);
    let init = ProcessRef::init("sleeper");
    let stdio = StdioRequest {
        stdin: false,
        stdout: true,
        stderr: true,
    };
    let pid = vm.create("sleeper", AgentVm::spec(&["sleep", "1000"]), stdio);
    vm.client.start_process(&init).unwrap();
    let pids = vm.client.list_processes("sleeper").unwrap();
    assert!(pids.contains(&pid), "{pid} not in {pids:?}");

    // An exec joins the container: same PID namespace (its PID 1 is sleep).
    let exec = ProcessRef::exec("sleeper", "probe");
    let spec = with_process(AgentVm::spec(&[]), |p| {
        p.set_args(Some(vec![
            "sh".into(),
            "-c".into(),
            "tr '\\0' ' ' < /proc/1/cmdline; echo; echo exec-ok".into(),
        ]));
    });
    vm.client
        .exec_process(capsid_protocol::ExecProcess {
            process: exec.clone(),
            spec: spec.process().clone().unwrap(),
            stdio,
        })
        .unwrap();
    let outcome = vm.run_process(&exec, stdio, b"");
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{}",
        outcome.stderr_text()
    );
    assert_eq!(outcome.stdout_text(), "sleep 1000 \nexec-ok\n");

    // CloseStdin ends a stdin the host keeps open (containerd's CloseIO).
    let reader = ProcessRef::exec("sleeper", "reader");
    let stdio_in = StdioRequest {
        stdin: true,
        stdout: true,
        stderr: false,
    };
    let cat = with_process(AgentVm::spec(&["cat"]), |_| {});
    vm.client
        .exec_process(capsid_protocol::ExecProcess {
            process: reader.clone(),
            spec: cat.process().clone().unwrap(),
            stdio: stdio_in,
        })
        .unwrap();
    let mut stdout = vm
        .client
        .attach(&reader, capsid_protocol::Stream::Stdout)
        .unwrap();
    let mut stdin = vm
        .client
        .attach(&reader, capsid_protocol::Stream::Stdin)
        .unwrap();
    vm.client.start_process(&reader).unwrap();
    std::io::Write::write_all(&mut stdin, b"kept open\n").unwrap();
    let mut line = [0u8; 10];
    std::io::Read::read_exact(&mut stdout, &mut line).unwrap();
    assert_eq!(&line, b"kept open\n");
    vm.client.close_stdin(&reader).unwrap();
    assert_eq!(
        vm.client.wait_process(&reader).unwrap(),
        ExitStatus::Code(0)
    );
    drop(stdin);

    let waiter = {
        let client = &vm.client;
        let init = &init;
        std::thread::scope(|s| {
            let wait = s.spawn(move || client.wait_process(init));
            std::thread::sleep(Duration::from_millis(200));
            client.signal_process(init, libc::SIGKILL, false).unwrap();
            wait.join().unwrap()
        })
    };
    let status = waiter.unwrap();
    assert_eq!(status, ExitStatus::Signal(9));
    assert_eq!(status.shell_code(), 137);
    let err = vm
        .client
        .signal_process(&init, libc::SIGTERM, false)
        .unwrap_err();
    assert!(err.to_string().contains("already exited"), "{err}");
    vm.client.remove_container("sleeper").unwrap();
    let err = vm.client.list_processes("sleeper").unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Agent {
                code: capsid_protocol::ErrorCode::NotFound,
                ..
            }
        ),
        "{err}"
    );

    // Nothing listens on port 4242: a clear error, within the bound given.
    let start = Instant::now();
    let err = capsid_protocol::AgentClient::connect(
        &vm.uds,
        4242,
        Duration::from_secs(3),
        Duration::from_secs(3),
    )
    .unwrap_err();
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(10), "took {waited:?}");
    let text = err.to_string();
    assert!(text.contains("did not answer on vsock port 4242"), "{text}");
    eprintln!(
        "unreachable agent reported after {:.1} s: {text}",
        waited.as_secs_f64()
    );
    vm.shutdown();
}

fn check_output(outcome: &Outcome) -> (HashMap<String, String>, Vec<String>) {
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{}",
        outcome.stderr_text()
    );
    let mut fields = HashMap::new();
    let mut mounts = Vec::new();
    for line in outcome.stdout_text().lines() {
        let (key, value) = line.split_once('=').unwrap();
        if key == "mount" {
            mounts.push(value.to_owned());
        } else if key == "env" {
            fields.insert(format!("env:{value}"), String::new());
        } else {
            fields.insert(key.to_owned(), value.to_owned());
        }
    }
    (fields, mounts)
}

#[test]
fn the_process_spec_is_applied_inside_the_container() {
    if !require_kvm("the_process_spec_is_applied_inside_the_container") {
        return;
    }
    let vm = AgentVm::boot("agent-spec", 1, 256);
    let mut spec = with_process(AgentVm::spec(&["capsid-check"]), |p| {
        *p = json(
            r#"{
              "args": ["capsid-check"], "cwd": "/home/capsid",
              "env": ["PATH=/usr/bin:/bin", "CAPSID_X=y"],
              "user": {"uid": 1000, "gid": 1000, "additionalGids": [2000], "umask": 23},
              "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 123, "hard": 456}],
              "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"],
                               "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"],
                               "ambient": ["CAP_KILL"]},
              "noNewPrivileges": true
            }"#,
        );
    });
    spec.set_hostname(Some("capsid-box".into()));
    let mut root = spec.root().clone().unwrap();
    root.set_readonly(Some(true));
    spec.set_root(Some(root));
    let mut linux = spec.linux().clone().unwrap();
    linux.set_seccomp(Some(json::<LinuxSeccomp>(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )));
    spec.set_linux(Some(linux));

    let outcome = vm.run("check", spec.clone(), None);
    let (seen, mounts) = check_output(&outcome);
    eprintln!("capsid-check saw:\n{}", outcome.stdout_text());
    let expect = [
        ("pid", "1"),
        ("uid", "1000"),
        ("gid", "1000"),
        ("groups", "2000"),
        ("cwd", "/home/capsid"),
        ("hostname", "capsid-box"),
        ("nofile", "123 456"),
        ("umask", "0027"),
        ("no_new_privs", "1"),
        ("seccomp", "2"),
        // CAP_KILL is bit 5, CAP_CHOWN bit 0.
        ("cap_eff", "0000000000000020"),
        ("cap_prm", "0000000000000020"),
        ("cap_amb", "0000000000000020"),
        ("cap_bnd", "0000000000000021"),
        ("root_writable", "false"),
        // /proc/timer_list is a masked path: /dev/null over it.
        ("timer_list_bytes", "0"),
    ];
    for (key, value) in expect {
        assert_eq!(seen.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert!(seen.contains_key("env:CAPSID_X=y"), "{seen:?}");
    for (target, fstype) in [
        ("/", "overlay"),
        ("/proc", "proc"),
        ("/dev", "tmpfs"),
        ("/dev/pts", "devpts"),
        ("/dev/shm", "tmpfs"),
        ("/dev/mqueue", "mqueue"),
        ("/sys", "sysfs"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|m| m.starts_with(&format!("{target} {fstype} "))),
            "no {target} ({fstype}) in {mounts:#?}"
        );
    }
    assert!(
        mounts.iter().any(|m| m.starts_with("/sys sysfs ro")),
        "{mounts:#?}"
    );

    // The seccomp profile is enforced.
    let mkdir = with_process(spec, |p| {
        p.set_args(Some(vec!["mkdir".into(), "/tmp/x".into()]));
        p.set_cwd("/".into());
    });
    let outcome = vm.run("seccomp", mkdir, None);
    assert_eq!(outcome.status, ExitStatus::Code(1));
    assert!(
        outcome.stderr_text().contains("Operation not permitted"),
        "{}",
        outcome.stderr_text()
    );
    vm.shutdown();
}

#[test]
fn a_terminal_process_gets_a_pty_of_the_size_asked() {
    if !require_kvm("a_terminal_process_gets_a_pty_of_the_size_asked") {
        return;
    }
    let vm = AgentVm::boot("agent-tty", 1, 256);
    let spec = with_process(
        AgentVm::spec(&["sh", "-c", "tty; stty size; exit 5"]),
        |p| {
            p.set_terminal(Some(true));
        },
    );
    let stdio = StdioRequest {
        stdin: true,
        stdout: true,
        stderr: false,
    };
    let process = ProcessRef::init("tty");
    vm.create("tty", spec, stdio);
    vm.client.resize_tty(&process, 40, 100).unwrap();
    let outcome = vm.run_process(&process, stdio, b"");
    let text = outcome.stdout_text();
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("40 100\r\n"), "{text:?}");
    assert_eq!(outcome.status, ExitStatus::Code(5));
    vm.client.remove_container("tty").unwrap();
    vm.shutdown();
}

#[test]
fn a_writable_disk_mounted_in_two_containers_keeps_what_was_written() {
    if !require_kvm("a_writable_disk_mounted_in_two_containers_keeps_what_was_written") {
        return;
    }
    let data = capsid_testbed::artifact("CAPSID_TEST_DATA_IMAGE");
    let vm = AgentVm::boot_with_disks("agent-disk", 1, 256, &[(data, "data")]);
    let with_data = |args: &[&str]| {
        let mut spec = AgentVm::spec(args);
        let mut mounts = spec.mounts().clone().unwrap();
        mounts.push(json(
            r#"{"destination": "/data", "type": "ext4", "source": "disk:data", "options": ["rw", "nosuid"]}"#,
        ));
        spec.set_mounts(Some(mounts));
        spec
    };
    let outcome = vm.run(
        "writer",
        with_data(&[
            "sh",
            "-c",
            "cat /data/seed.txt && echo persisted > /data/hello && sync",
        ]),
        None,
    );
    assert_eq!(
        outcome.status,
        ExitStatus::Code(0),
        "{}",
        outcome.stderr_text()
    );
    assert_eq!(outcome.stdout_text(), "seed from the host\n");
    // The first container is gone and its mount with it; a second one mounts
    // the same disk again.
    let outcome = vm.run("reader", with_data(&["cat", "/data/hello"]), None);
    assert_eq!(
        outcome.stdout_text(),
        "persisted\n",
        "{}",
        outcome.stderr_text()
    );

    // A disk mount without a file system type is refused with the reason.
    let mut bad = AgentVm::spec(&["true"]);
    let mut mounts = bad.mounts().clone().unwrap();
    mounts.push(json(
        r#"{"destination": "/x", "type": "bind", "source": "disk:data"}"#,
    ));
    bad.set_mounts(Some(mounts));
    let err = vm
        .client
        .create_container(capsid_protocol::CreateContainer {
            id: "bad".into(),
            rootfs: capsid_protocol::Rootfs {
                disk_id: capsid_testbed::agent::ROOTFS_DISK.into(),
                filesystem: capsid_protocol::Filesystem::Erofs,
                overlay: true,
                upper_disk: None,
            },
            spec: bad,
            stdio: StdioRequest::default(),
            files: Vec::new(),
            share: None,
        })
        .unwrap_err();
    assert!(err.to_string().contains("should be ext4 or erofs"), "{err}");
    vm.shutdown();
}

#[test]
fn the_oom_killer_acts_inside_the_guest_and_the_vm_survives() {
    if !require_kvm("the_oom_killer_acts_inside_the_guest_and_the_vm_survives") {
        return;
    }
    let vm = AgentVm::boot("agent-oom", 1, 256);
    let mut spec = AgentVm::spec(&["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=1"]);
    let mut linux = spec.linux().clone().unwrap();
    linux.set_resources(Some(json::<LinuxResources>(
        r#"{"memory": {"limit": 33554432}, "pids": {"limit": 32}}"#,
    )));
    spec.set_linux(Some(linux));
    let stdio = StdioRequest {
        stdin: false,
        stdout: true,
        stderr: true,
    };
    vm.create("hog", spec, stdio);
    let outcome = vm.run_process(&ProcessRef::init("hog"), stdio, b"");
    assert_eq!(
        outcome.status,
        ExitStatus::Signal(9),
        "{}",
        outcome.stderr_text()
    );
    let stats = vm.client.stats("hog").unwrap();
    assert!(stats.memory_events.oom_kill >= 1, "{stats:?}");
    assert_eq!(stats.memory_limit_bytes, 32 << 20);
    eprintln!("after the OOM kill: {stats:?}");
    vm.client.remove_container("hog").unwrap();

    let outcome = vm.run("after", AgentVm::spec(&["echo", "alive"]), None);
    assert_eq!(outcome.stdout_text(), "alive\n");
    vm.shutdown();
}

/// A template, as the runtime will make one: an agent VM with a spare slot
/// and no disk, snapshotted once its agent answered (its host connection
/// still open: the restore resets it). Each clone restored from it answers
/// without a boot, takes the test image through its spare slot, and runs
/// a container from it.
#[test]
fn an_agent_restored_from_a_snapshot_runs_a_container_from_an_attached_image() {
    use capsid_runtime::images::rootfs::{Format, RootfsImage};
    if !require_kvm("an_agent_restored_from_a_snapshot_runs_a_container_from_an_attached_image") {
        return;
    }
    let template_dir = capsid_testbed::ScratchDir::new("capsid-e2e").unwrap();
    let mut spec = AgentVm::vm_spec(&template_dir, 1, 128);
    spec.disks.clear();
    spec.spare_disks = 1;
    let mut template = AgentVm::launch("template", &spec, template_dir);
    let cold = template.ready_after;
    let snapshot = capsid_testbed::ScratchDir::new("capsid-e2e").unwrap();
    let saved_ms = template.vm.snapshot(snapshot.path()).unwrap_or_else(|e| {
        panic!(
            "snapshot: {}{}",
            capsid_base::error_chain(&e),
            template.vm.diagnostics()
        )
    });
    let status = template
        .vm
        .wait_timeout(Duration::from_secs(60))
        .unwrap()
        .expect("the template's VMM ends after its snapshot");
    assert!(status.success(), "{status}{}", template.vm.diagnostics());
    drop(template);

    let image = RootfsImage {
        path: capsid_testbed::artifact("CAPSID_TEST_ROOTFS_IMAGE"),
        format: Format::Erofs,
        key: "test".into(),
        built: false,
    };
    for clone in 0..2 {
        let dir = capsid_testbed::ScratchDir::new("capsid-e2e").unwrap();
        let mut spec = AgentVm::vm_spec(&dir, 1, 128);
        spec.disks.clear();
        spec.spare_disks = 1;
        spec.restore = Some(snapshot.path().to_owned());
        let vm = AgentVm::launch("clone", &spec, dir);
        println!(
            "clone {clone}: agent answered {:?} after the VMM started (cold boot: {cold:?}; snapshot paused the template {saved_ms} ms)",
            vm.ready_after
        );
        vm.vm
            .attach(&image, capsid_testbed::agent::ROOTFS_DISK)
            .unwrap_or_else(|e| panic!("attach: {}", capsid_base::error_chain(&e)));
        let outcome = vm.run("c1", AgentVm::spec(&["echo", "hi from a clone"]), None);
        assert_eq!(
            (outcome.stdout_text().as_str(), outcome.status),
            ("hi from a clone\n", ExitStatus::Code(0)),
            "{}",
            outcome.stderr_text()
        );
        // The host's bytes reach the restored guest too (vsock's RX queue).
        let input = binary_data(300_000);
        let outcome = vm.run("c2", AgentVm::spec(&["cat"]), Some(&input));
        assert_eq!(
            outcome.status,
            ExitStatus::Code(0),
            "{}",
            outcome.stderr_text()
        );
        assert!(
            outcome.stdout == input,
            "cat gave back {} bytes",
            outcome.stdout.len()
        );
        vm.shutdown();
    }
}
