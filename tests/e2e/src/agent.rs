//! A micro-VM running `capsid-agent` with the busybox test image as a disk,
//! and the host's client connected to it: what the agent tests and the
//! benchmarks start from.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use capsid_protocol::{
    AgentClient, CreateContainer, DEFAULT_AGENT_PORT, ExitStatus, Filesystem, ProcessRef, Rootfs,
    StdioRequest, Stream,
};
use capsid_testbed::ScratchDir;
use capsid_vmm_api::{DiskConfig, VmConfig, VsockConfig};
use oci_spec::runtime::Spec;

use crate::vmm::VmmRun;
use crate::{BOOTS_PER_GUEST, announce_boot_retry, artifact};

/// Generous: nested mode boots slowly, but a dead agent must still end a test.
pub const AGENT_WAIT: Duration = Duration::from_secs(180);
/// The disk id of the test image's rootfs.
pub const ROOTFS_DISK: &str = "rootfs";

#[derive(Debug)]
pub struct AgentVm {
    pub vmm: VmmRun,
    pub client: AgentClient,
    pub uds: PathBuf,
    /// VMM spawn → the agent answered its first hello.
    pub ready_after: Duration,
    _scratch: ScratchDir,
}

/// What a process printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

impl Outcome {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Connects to the agent of `vmm` within [`AGENT_WAIT`], giving up as soon
/// as the VMM exits.
fn connect(vmm: &mut VmmRun, uds: &std::path::Path) -> Result<AgentClient, String> {
    let deadline = Instant::now() + AGENT_WAIT;
    loop {
        match AgentClient::connect(
            uds,
            DEFAULT_AGENT_PORT,
            Duration::from_millis(500),
            AGENT_WAIT,
        ) {
            Ok(client) => return Ok(client),
            Err(_) if vmm.exited() => return Err("capsid-vmm exited".into()),
            Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
            Err(_) => {}
        }
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
        let uds = scratch.join("vsock.sock");
        let mut config = VmConfig {
            kernel: artifact("CAPSID_KERNEL"),
            initrd: Some(artifact("CAPSID_AGENT_INITRAMFS")),
            vcpus: u8::try_from(vcpus).expect("at most 255 vCPUs"),
            mem_mib,
            disks: vec![DiskConfig {
                path: artifact("CAPSID_TEST_ROOTFS_IMAGE"),
                read_only: true,
                id: Some(ROOTFS_DISK.into()),
            }],
            vsock: Some(VsockConfig {
                uds: uds.clone(),
                cid: capsid_vmm_api::config::DEFAULT_CID,
            }),
            ..VmConfig::default()
        };
        for (image, id) in disks {
            let copy = scratch.join(&format!("{id}.img"));
            std::fs::copy(image, &copy).expect("copy a disk image");
            config.disks.push(DiskConfig {
                path: copy,
                read_only: false,
                id: Some((*id).to_owned()),
            });
        }
        let config_path = scratch.join("vm.json");
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).expect("write vm.json");
        let args: Vec<OsString> = vec!["--config".into(), config_path.into()];
        let mut boots = 0;
        let (vmm, client) = loop {
            boots += 1;
            let _ = std::fs::remove_file(&uds);
            let mut vmm = VmmRun::start(&artifact("CAPSID_VMM"), &args, scratch.path(), name);
            match connect(&mut vmm, &uds) {
                Ok(client) => break (vmm, client),
                Err(_) if vmm.crashed() && boots < BOOTS_PER_GUEST => {
                    announce_boot_retry(name, &vmm.describe());
                }
                Err(e) => panic!("agent never answered: {e}\n{}", vmm.describe()),
            }
        };
        let ready_after = vmm.started().elapsed();
        Self {
            vmm,
            client,
            uds,
            ready_after,
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
                },
                spec,
                stdio,
                files: Vec::new(),
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
            .unwrap_or_else(|e| panic!("wait for {process}: {e}\n{}", self.vmm.snapshot()));
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
        let status = self.vmm.wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "VMM exit {status}\n{}",
            self.vmm.describe()
        );
        assert!(!self.uds.exists(), "vsock socket left behind");
        eprintln!(
            "shutdown → VMM exit in {:.2} s",
            start.elapsed().as_secs_f64()
        );
    }
}
