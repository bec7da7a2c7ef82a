//! A micro-VM running `capsid-agent` with the busybox test image as a disk,
//! and the host's client connected to it: what the agent tests and the
//! benchmarks start from.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use crate::ScratchDir;
use capsid_runtime::confine::Confinement;
use capsid_runtime::protocol::{
    AgentClient, CreateContainer, ExitStatus, Filesystem, ProcessRef, Rootfs, StdioRequest, Stream,
};
use capsid_runtime::{BootFiles, BootPolicy, Disk, MicroVm, VmSpec};
use oci_spec::runtime::Spec;

use capsid_base::error_chain;

use crate::artifact;
use crate::retry::{BOOTS_PER_GUEST, announce_boot_retry};

/// Generous: nested mode boots slowly, but a dead agent must still end a test.
pub const AGENT_WAIT: Duration = Duration::from_secs(180);
/// The disk id of the test image's rootfs.
pub const ROOTFS_DISK: &str = "rootfs";

/// A capsid-vmm guest whose agent answered, with a client to it; killed and cleaned up on drop.
#[derive(Debug)]
pub struct AgentVm {
    /// The VM (its VMM process and directory).
    pub vm: MicroVm,
    /// A client to the guest's agent.
    pub client: AgentClient,
    /// The VMM's hybrid-vsock socket (for more connections).
    pub uds: PathBuf,
    /// VMM spawn → the agent answered its first hello.
    pub ready_after: Duration,
    _scratch: ScratchDir,
}

/// What a process printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    /// Everything the process wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything the process wrote to stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

impl Outcome {
    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl AgentVm {
    /// Boots the agent initramfs with the test image as a read-only disk.
    pub fn boot(name: &str, vcpus: u32, mem_mib: u32) -> Self {
        Self::boot_with_disks(name, vcpus, mem_mib, &[])
    }

    /// Also gives the VM a writable copy of each `(image, id)` (the image
    /// itself is left alone).
    pub fn boot_with_disks(
        name: &str,
        vcpus: u32,
        mem_mib: u32,
        disks: &[(PathBuf, &str)],
    ) -> Self {
        let scratch = ScratchDir::new("capsid-e2e").expect("scratch dir");
        let mut spec = Self::vm_spec(&scratch, vcpus, mem_mib);
        for (image, id) in disks {
            let copy = scratch.join(&format!("{id}.img"));
            std::fs::copy(image, &copy).expect("copy a disk image");
            spec.disks.push(Disk {
                file: None,
                path: copy,
                read_only: false,
                id: (*id).to_owned(),
            });
        }
        Self::launch(name, &spec, scratch)
    }

    /// The agent initramfs with the test image as a read-only disk, in
    /// `scratch`, confined as the runtime runs it for the shim and the CLI.
    pub fn vm_spec(scratch: &ScratchDir, vcpus: u32, mem_mib: u32) -> VmSpec {
        VmSpec {
            nets: Vec::new(),
            boot: BootFiles {
                vmm: artifact("CAPSID_VMM"),
                kernel: artifact("CAPSID_KERNEL"),
                initramfs: artifact("CAPSID_AGENT_INITRAMFS"),
                kernel_params: String::new(),
            },
            vcpus,
            memory_mib: mem_mib,
            disks: vec![Disk {
                file: None,
                path: artifact("CAPSID_TEST_ROOTFS_IMAGE"),
                read_only: true,
                id: ROOTFS_DISK.into(),
            }],
            spare_disks: 0,
            dir: scratch.path().to_owned(),
            log_level: "info".into(),
            confinement: Confinement::default(),
            die_with_owner: false,
            restore: None,
        }
    }

    /// Boots (or restores) `spec`, whose directory is `scratch`'s, until
    /// its agent answers.
    pub fn launch(name: &str, spec: &VmSpec, scratch: ScratchDir) -> Self {
        let started = Instant::now();
        // The runtime's boot: a guest that crashed before its agent
        // answered is booted once more, loudly (BOOTS_PER_GUEST).
        let on_retry = |why: &str| announce_boot_retry(name, why);
        let policy = BootPolicy {
            wait: AGENT_WAIT,
            io_timeout: AGENT_WAIT,
            retries: u32::try_from(BOOTS_PER_GUEST - 1).unwrap_or(1),
            interrupted: &|| false,
            on_retry: &on_retry,
        };
        let (vm, client) = MicroVm::boot(spec, &policy)
            .unwrap_or_else(|e| panic!("agent never answered: {}", error_chain(&e)));
        Self {
            uds: vm.uds().to_owned(),
            vm,
            client,
            ready_after: started.elapsed(),
            _scratch: scratch,
        }
    }

    /// A spec for the test image: runc's defaults, writable root, `args`.
    pub fn spec(args: &[&str]) -> Spec {
        let mut spec = Spec::default();
        let mut process = spec.process().clone().unwrap_or_default();
        process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        spec.set_process(Some(process));
        if let Some(mut root) = spec.root().clone() {
            root.set_readonly(Some(false));
            spec.set_root(Some(root));
        }
        spec
    }

    /// Creates container `id` from `spec` with the streams asked for.
    pub fn create(&self, id: &str, spec: Spec, stdio: StdioRequest) -> u32 {
        self.client
            .create_container(CreateContainer {
                id: id.into(),
                rootfs: Rootfs {
                    disk_id: ROOTFS_DISK.into(),
                    filesystem: Filesystem::Erofs,
                    overlay: true,
                    upper_disk: None,
                },
                spec,
                stdio,
                files: Vec::new(),
                share: None,
            })
            .unwrap_or_else(|e| panic!("create {id}: {e}"))
    }

    /// Attaches the streams, starts the process, feeds `stdin` (then EOF),
    /// and collects output until EOF and the exit status.
    pub fn run_process(&self, process: &ProcessRef, stdio: StdioRequest, stdin: &[u8]) -> Outcome {
        let reader = |stream| {
            let mut connection = self.client.attach(process, stream).expect("attach");
            thread::spawn(move || {
                let mut bytes = Vec::new();
                connection.read_to_end(&mut bytes).expect("read a stream");
                bytes
            })
        };
        let stdout = stdio.stdout.then(|| reader(Stream::Stdout));
        let stderr = stdio.stderr.then(|| reader(Stream::Stderr));
        let stdin_stream = stdio.stdin.then(|| {
            self.client
                .attach(process, Stream::Stdin)
                .expect("attach stdin")
        });
        self.client.start_process(process).expect("start");
        let feeder = stdin_stream.map(|mut stream| {
            let bytes = stdin.to_vec();
            thread::spawn(move || {
                // The process may exit before reading it all; that is its call.
                let _ = stream.write_all(&bytes);
                let _ = stream.shutdown(Shutdown::Write);
                // Keep the connection until the agent closes it.
                let _ = stream.read_to_end(&mut Vec::new());
            })
        });
        let status = self
            .client
            .wait_process(process)
            .unwrap_or_else(|e| panic!("wait for {process}: {e}{}", self.vm.diagnostics()));
        let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().expect("reader")).unwrap_or_default()
        };
        let outcome = Outcome {
            stdout: join(stdout),
            stderr: join(stderr),
            status,
        };
        if let Some(feeder) = feeder {
            feeder.join().expect("stdin feeder");
        }
        outcome
    }

    /// Creates, runs and removes a container: the common case.
    pub fn run(&self, id: &str, spec: Spec, stdin: Option<&[u8]>) -> Outcome {
        let stdio = StdioRequest {
            stdin: stdin.is_some(),
            stdout: true,
            stderr: !spec
                .process()
                .as_ref()
                .and_then(|p| p.terminal())
                .unwrap_or(false),
        };
        self.create(id, spec, stdio);
        let outcome = self.run_process(&ProcessRef::init(id), stdio, stdin.unwrap_or_default());
        self.client.remove_container(id).expect("remove");
        outcome
    }

    /// Asks the agent to shut the VM down and checks the VMM exits 0 and
    /// leaves no socket.
    pub fn shutdown(mut self) {
        let start = Instant::now();
        self.client.shutdown().expect("shutdown");
        let status = self
            .vm
            .wait_timeout(Duration::from_secs(60))
            .expect("wait for capsid-vmm")
            .unwrap_or_else(|| {
                panic!(
                    "capsid-vmm still runs 60 s after Shutdown{}",
                    self.vm.diagnostics()
                )
            });
        assert!(
            status.success(),
            "VMM exit {status}{}",
            self.vm.diagnostics()
        );
        assert!(!self.uds.exists(), "vsock socket left behind");
        eprintln!(
            "shutdown → VMM exit in {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
}
