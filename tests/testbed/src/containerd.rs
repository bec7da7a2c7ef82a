//! A private containerd for the tests: Debian's `containerd` with its own
//! root, state directory and sockets in a temporary directory, our shim on
//! its PATH, the locally built test images imported, driven with `ctr`.
//!
//! ```text
//!  DIR/config.toml   root=DIR/root state=DIR/state grpc=DIR/containerd.sock
//!  DIR/bin/containerd-shim-capsid-v2 → $CAPSID_SHIM
//!  DIR/capsid.toml   kernel, initramfs, vmm from the test artefacts;
//!                    run_dir=DIR/run (the VMs' scratch directories)
//! ```
//!
//! Dropping it stops containerd and removes the directory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::artifact;

/// containerd's name for our runtime (the shim binary `containerd-shim-capsid-v2`).
pub const RUNTIME: &str = "io.containerd.capsid.v2";
/// The busybox test image, imported from the local OCI layout.
pub const BUSYBOX: &str = "docker.io/capsid/busybox:latest";
/// The busybox test image whose config runs as an unprivileged user.
pub const BUSYBOX_USER: &str = "docker.io/capsid/busybox-user:latest";
/// The pods' pause image (CRI's `sandbox_image`), made locally.
pub const PAUSE: &str = "docker.io/capsid/pause:latest";
/// CRI's runtime handler for capsid (a pod's `runtime_handler`, a
/// Kubernetes RuntimeClass's `handler`).
pub const CRI_HANDLER: &str = "capsid";
/// The pods' subnet, which the bridge CNI's host-local IPAM hands out.
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// The bridge the bridge CNI puts the pods' host ends on; CNI leaves it.
pub const POD_BRIDGE: &str = "capsid-cni0";
/// Where Debian's containernetworking-plugins has the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// A `ctr` call that takes longer has hung (nested guests boot in seconds).
const CTR_BOUND: Duration = Duration::from_secs(240);

/// A private containerd (its own root, state and sockets under a temporary directory) with capsid's shim; stopped, and checked for leftover shims, on drop.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    daemon: Child,
    /// Shim sockets that were there before (another containerd's).
    sockets_before: Vec<PathBuf>,
}

fn shim_sockets() -> Vec<PathBuf> {
    std::fs::read_dir("/run/containerd/s")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

impl Containerd {
    /// Starts one and waits until it answers; panics when it cannot.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// Starts one with its CRI plugin, as a Kubernetes node runs it: the
    /// runtime handlers `capsid` (ours) and `runc`, the bridge CNI (with
    /// host-local IPAM on [`POD_SUBNET`]) and the locally made pause image,
    /// the test images in CRI's namespace `k8s.io`. The CRI socket is the
    /// gRPC one, [`Containerd::socket`].
    pub fn start_cri() -> Self {
        Self::start_with(true)
    }

    fn start_with(cri: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("capsid-ctd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::os::unix::fs::symlink(
            artifact("CAPSID_SHIM"),
            dir.join("bin/containerd-shim-capsid-v2"),
        )
        .unwrap();
        let d = dir.display();
        let plugins = if cri {
            std::fs::create_dir_all(dir.join("cni")).unwrap();
            std::fs::write(dir.join("cni/10-capsid-test.conflist"), cni_config()).unwrap();
            cri_config(&dir)
        } else {
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n".to_owned()
        };
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n{plugins}"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("capsid.toml"),
            format!(
                "kernel = {:?}\ninitramfs = {:?}\nvmm = {:?}\nrun_dir = \"{d}/run\"\n\
                 agent_timeout_secs = 200\nlog_level = \"debug\"\n",
                artifact("CAPSID_KERNEL"),
                artifact("CAPSID_AGENT_INITRAMFS"),
                artifact("CAPSID_VMM"),
            ),
        )
        .unwrap();
        let daemon = spawn_daemon(&dir);
        let containerd = Self {
            dir,
            daemon,
            sockets_before: shim_sockets(),
        };
        containerd.wait_until_it_answers();
        let images_dir = PathBuf::from(
            std::env::var_os("CAPSID_TEST_IMAGES_DIR")
                .expect("CAPSID_TEST_IMAGES_DIR is set by `make test`"),
        );
        if cri {
            // CRI's namespace, unpacked for its snapshotter (overlayfs).
            for image in ["busybox.oci.tar", "pause.oci.tar"] {
                let tar = images_dir.join(image);
                containerd.ctr_ok(&[
                    "--namespace",
                    "k8s.io",
                    "images",
                    "import",
                    "--snapshotter",
                    "overlayfs",
                    tar.to_str().unwrap(),
                ]);
            }
            return containerd;
        }
        for image in ["busybox.oci.tar", "busybox-user.oci.tar"] {
            let tar = images_dir.join(image);
            let tar = tar.to_str().unwrap();
            for snapshotter in ["native", "overlayfs"] {
                containerd.ctr_ok(&["images", "import", "--snapshotter", snapshotter, tar]);
            }
        }
        containerd
    }

    /// Its gRPC socket, which also serves CRI when started with it.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn wait_until_it_answers(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not answer in 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops containerd (SIGTERM, as a service manager does) and starts it
    /// again on the same root and state; running tasks' shims live on.
    pub fn restart(&mut self) {
        self.stop_daemon();
        self.daemon = spawn_daemon(&self.dir);
        self.wait_until_it_answers();
    }

    fn stop_daemon(&mut self) {
        // SAFETY: kill() takes plain integers; the child is ours and unreaped.
        unsafe { libc::kill(i32::try_from(self.daemon.id()).unwrap_or(0), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }

    /// Its directory (config, root, state, sockets, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.daemon.id()
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, with `stdin` as its input.
    pub fn ctr_with_input(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = self
            .ctr_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ctr");
        let mut input = child.stdin.take().unwrap();
        let bytes = stdin.to_vec();
        let feeder = std::thread::spawn(move || {
            let _ = input.write_all(&bytes);
        });
        let output = wait_bounded(child, args);
        feeder.join().unwrap();
        output
    }

    /// `ctr` against this containerd.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_input(args, b"")
    }

    /// `ctr`, which must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(
            output.status.success(),
            "ctr {args:?}: {}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A `ctr` command against this containerd, not yet run.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(args);
        command
    }

    /// `ctr ARGS...`, its output once it ended, at most [`CTR_BOUND`] on.
    pub fn ctr_bounded(&self, args: &[&str]) -> Output {
        let child = self
            .ctr_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}"));
        wait_bounded(child, args)
    }

    /// `ctr run` with our runtime and the native snapshotter: `ctr run
    /// [options] IMAGE ID CMD...`.
    pub fn run_args<'a>(
        options: &[&'a str],
        image: &'a str,
        id: &'a str,
        command: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec!["run", "--runtime", RUNTIME, "--snapshotter", "native"];
        args.extend_from_slice(options);
        args.push(image);
        args.push(id);
        args.extend_from_slice(command);
        args
    }

    /// Waits (at most 60 s) until `ctr task ls` shows task `id` as `status`.
    pub fn wait_for_status(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ls = self.ctr_ok(&["task", "ls"]);
            if ls.lines().any(|l| l.starts_with(id) && l.contains(status)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {status}:\n{ls}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the shims left in their run directory: each VM's directory,
    /// and each scratch directory of a template VM in `run/run`
    /// (`capsid_runtime::scratch`; the directory itself stands, like
    /// /run/capsid/run).
    pub fn run_dir_leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.dir.join("run"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name() == "run" {
                found.extend(
                    std::fs::read_dir(entry.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path().display().to_string()),
                );
            } else {
                found.push(entry.path().display().to_string());
            }
        }
        found
    }

    /// What our runtime left on the host: processes, VM scratch
    /// directories, shim sockets, mounts under our directory.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let program = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            let program = String::from_utf8_lossy(program);
            if program.ends_with("capsid-vmm") || program.ends_with("containerd-shim-capsid-v2") {
                found.push(format!(
                    "process {} ({program})",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
        found.extend(self.run_dir_leftovers());
        for socket in shim_sockets() {
            if !self.sockets_before.contains(&socket) {
                found.push(format!("shim socket {}", socket.display()));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let ours = self.dir.to_string_lossy().into_owned();
        found.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&ours))
                .map(|l| format!("mount {l}")),
        );
        found
    }

    /// Nothing of ours remains; shims exit right after containerd's
    /// Shutdown, so they get a short grace.
    pub fn assert_no_leftovers(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.leftovers().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let left = self.leftovers();
        assert!(
            left.is_empty(),
            "left behind: {left:#?}\ncontainerd's log:\n{}",
            self.log()
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop_daemon();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The CRI plugin's section of containerd's configuration (version 2, as
/// containerd 1.6 reads it): our runtime as handler [`CRI_HANDLER`], runc
/// as the default, the CNI configuration in `dir/cni`.
fn cri_config(dir: &Path) -> String {
    let d = dir.display();
    // runc cannot pivot_root out of an initramfs (the nested test host's
    // root), as `runc --no-pivot` says.
    let no_pivot = root_is_initramfs();
    format!(
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20 sandbox_image = \"{PAUSE}\"\n\
         \x20 stream_server_address = \"127.0.0.1\"\n\
         \x20 stream_server_port = \"0\"\n\
         \x20 disable_apparmor = true\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         \x20   snapshotter = \"overlayfs\"\n\
         \x20   default_runtime_name = \"runc\"\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20     runtime_type = \"io.containerd.runc.v2\"\n\
         \x20     [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
         \x20       NoPivotRoot = {no_pivot}\n\
         \x20   [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{CRI_HANDLER}]\n\
         \x20     runtime_type = \"{RUNTIME}\"\n\
         \x20 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20   bin_dir = \"{CNI_BIN_DIR}\"\n\
         \x20   conf_dir = \"{d}/cni\"\n\
         \x20   max_conf_num = 1\n"
    )
}

/// Whether `/` is the initramfs (the kernel's `rootfs`), which cannot be
/// pivoted out of.
fn root_is_initramfs() -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|mounts| {
        mounts
            .lines()
            .any(|l| l.split(' ').nth(4) == Some("/") && l.contains(" - rootfs "))
    })
}

/// The pods' network: Debian's bridge plugin on [`POD_BRIDGE`], the node's
/// gateway on it, host-local addresses from [`POD_SUBNET`].
fn cni_config() -> String {
    format!(
        r#"{{"cniVersion": "1.0.0", "name": "capsid-test", "plugins": [
  {{"type": "bridge", "bridge": "{POD_BRIDGE}", "isGateway": true, "ipMasq": false,
    "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{POD_SUBNET}"}}]],
             "routes": [{{"dst": "0.0.0.0/0"}}]}}}}
]}}
"#
    )
}

/// containerd on `dir`'s configuration, logging (appending) to
/// `dir/containerd.log`.
fn spawn_daemon(dir: &Path) -> Child {
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .unwrap();
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(["--log-level", "debug"])
        .env("PATH", path)
        .env("CAPSID_CONFIG", dir.join("capsid.toml"))
        .env_remove("CAPSID_KERNEL")
        .env_remove("CAPSID_AGENT_INITRAMFS")
        .env_remove("CAPSID_VMM")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start containerd (Debian's containerd package; `make test` installs it)")
}

/// Waits for `child` (its stdout and stderr piped) at most [`CTR_BOUND`].
pub fn wait_bounded(mut child: Child, args: &[&str]) -> Output {
    let pipe = |from: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut from) = from {
                let _ = from.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = pipe(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let stderr = pipe(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > CTR_BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ctr {args:?} hung for {CTR_BOUND:?}; stderr: {}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}
