//! The guests the `boot` and `throughput` scenarios start: our kernel with
//! the test init, under capsid-vmm or QEMU `microvm`.
use super::*;

/// Our kernel with the test init running `steps`: booted by capsid-vmm or
/// by QEMU `microvm`, 1 vCPU and [`MEM_MIB`] each.
pub(crate) struct TestInitGuest {
    kernel: PathBuf,
    initrd: PathBuf,
    steps: String,
    name: String,
}

impl TestInitGuest {
    pub(crate) fn new(scratch: &ScratchDir, name: &str, steps: &str) -> Self {
        Self {
            kernel: artifact("CAPSID_KERNEL"),
            initrd: initramfs_with_init(
                &artifact("CAPSID_TEST_INIT"),
                &scratch.join(&format!("init-{name}.cpio")),
            ),
            steps: format!("capsid_test={steps}"),
            name: name.to_owned(),
        }
    }

    /// Starts capsid-vmm on this guest, with `disk` as a read-only disk.
    /// The VM goes in the VMM's own configuration type (`--config`).
    pub(crate) fn vmm(&self, scratch: &ScratchDir, disk: Option<&Path>) -> VmmRun {
        let config = VmConfig {
            kernel: self.kernel.clone(),
            initrd: Some(self.initrd.clone()),
            cmdline: format!("{DEFAULT_CMDLINE} {}", self.steps),
            mem_mib: MEM_MIB,
            disks: disk
                .map(|path| DiskConfig {
                    path: path.to_owned(),
                    read_only: true,
                    id: None,
                })
                .into_iter()
                .collect(),
            ..VmConfig::default()
        };
        let path = scratch.join(&format!("bench-{}.json", self.name));
        std::fs::write(
            &path,
            serde_json::to_vec(&config).expect("a VmConfig serializes"),
        )
        .expect("write the VM's configuration");
        VmmRun::start(
            &artifact("CAPSID_VMM"),
            &["--config".into(), path.into()],
            scratch.path(),
            &format!("bench-{}", self.name),
        )
    }

    /// Boots QEMU until a console line has `until`. `disk` is a read-only
    /// virtio-blk disk.
    pub(crate) fn qemu(
        &self,
        scratch: &ScratchDir,
        disk: Option<&Path>,
        until: &str,
    ) -> Result<QemuBoot, String> {
        // microvm has no i8042; the guest never reboots here anyway.
        let cmdline = format!("console=ttyS0 reboot=t panic=-1 quiet {}", self.steps);
        boot_qemu(
            &self.kernel,
            &self.initrd,
            &cmdline,
            disk,
            scratch.path(),
            until,
        )
    }
}

/// A QEMU boot that got to the line it waited for.
pub(crate) struct QemuBoot {
    /// Spawn → the test init's ready line.
    pub(crate) to_ready: Duration,
    /// The line waited for.
    pub(crate) line: String,
    /// QEMU's memory outside guest RAM when the line came.
    pub(crate) rss_kib: u64,
    pub(crate) pss_kib: u64,
}

/// Boots QEMU microvm until a console line has `until`; returns the time to
/// the init's ready line and the `until` line. `disk` is a read-only
/// virtio-blk disk.
pub(crate) fn boot_qemu(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disk: Option<&Path>,
    scratch: &Path,
    until: &str,
) -> Result<QemuBoot, String> {
    let console_path = scratch.join("bench-qemu.console");
    let _ = std::fs::remove_file(&console_path);
    let mut command = DirectBoot {
        machine: &[
            "-M",
            "microvm,rtc=off,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
        ],
        cpus: 1,
        memory_mib: MEM_MIB,
        kernel,
        initrd,
        cmdline,
        serial_logs: &[&console_path],
    }
    .command();
    if let Some(disk) = disk {
        let mut drive = OsString::from("if=none,id=d0,format=raw,readonly=on,file=");
        drive.push(disk);
        command
            .arg("-drive")
            .arg(drive)
            .args(["-device", "virtio-blk-device,drive=d0"]);
    }
    command.stderr(Stdio::null());
    let started = Instant::now();
    let mut qemu = ChildGuard::spawn(&mut command).expect("spawn QEMU");
    let mut console = SerialLog::new(&console_path);
    let mut ready = None;
    loop {
        let _ = console.poll();
        if ready.is_none() && console.line_with(READY).is_some() {
            ready = Some(started.elapsed());
        }
        if let Some(line) = console.line_with(until) {
            let (rss_kib, pss_kib) = memory_outside_guest(qemu.id(), u64::from(MEM_MIB) << 10);
            let _ = qemu.kill();
            return Ok(QemuBoot {
                to_ready: ready.unwrap_or_default(),
                line,
                rss_kib,
                pss_kib,
            });
        }
        if started.elapsed() >= TIMEOUT {
            let _ = qemu.kill();
            return Err(format!("QEMU never got to {until:?}: {}", console.tail(3)));
        }
        if qemu.try_wait().ok().flatten().is_some() {
            return Err(format!("QEMU exited: {}", console.tail(3)));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
