//! Assembling a VM, in boot order:
//!
//! 1. check the configuration (nothing is created for a bad one);
//! 2. guest RAM, the KVM VM, its memory slots and in-kernel irqchip + PIT;
//! 3. devices: serial, i8042 and boot marker on ports; virtio-blk disks,
//!    virtio-vsock and virtio-net (over the launcher's taps) on MMIO, each with an irqfd and a queue-notify ioeventfd,
//!    and announced on the kernel command line; spare disk slots and the
//!    API socket that attaches images to them;
//! 4. kernel, initrd, command line and boot parameters into guest memory,
//!    then the MP table, GDT and page tables;
//! 5. vCPUs, with CPUID, MSRs, FPU, LAPIC and the boot registers.
//!
//! [`Vmm::run`] then starts the vCPU threads.

use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiContext, ApiServer};
use crate::arch::boot::{self, BootError, NamedFile};
use crate::arch::layout::{
    BOOT_MARKER_PORT, I8042_PORT, I8042_PORT_LEN, IOAPIC_ADDR, SERIAL_IRQ, SERIAL_PORT,
    SERIAL_PORT_LEN, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::arch::mptable;
use crate::config::{ConfigError, Irqchip, SerialConfig, Validate, VmConfig};
use crate::devices::bus::{Bus, BusError};
use crate::devices::ioapic::{IOAPIC_SIZE, Ioapic};
use crate::devices::legacy::{BootMarker, I8042, SerialConsole};
use crate::devices::virtio::block::{Block, DiskSlot, DiskSlots};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, Tap, TapError};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, ThreadInit, VirtioDevice, WorkerHandle};
use crate::logging::BoundedFile;
use crate::memory::{GuestRam, MemoryError};
use crate::snapshot::{MEMORY_FILE, SnapshotDesk, SnapshotError, SnapshotState};
use crate::vmm::{ExitNotifier, Vmm};
use crate::vstate::vcpu::{Vcpu, VcpuThreads};
use crate::vstate::vm::{Vm, VmError};

/// Why a VM could not be built. Nothing the build made is left behind.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// Guest memory cannot be set up.
    #[error("cannot set up guest memory")]
    Memory(#[from] MemoryError),
    /// A KVM call failed.
    #[error("KVM setup failed")]
    Kvm(#[from] VmError),
    /// An eventfd cannot be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The serial output file cannot be opened.
    #[error("cannot open serial output {0}")]
    SerialFile(String, #[source] std::io::Error),
    /// Two devices overlap.
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    /// A disk cannot be set up.
    #[error("cannot set up disk {0}")]
    Disk(String, #[source] crate::devices::virtio::block::BlockError),
    /// A network device's tap cannot be used.
    #[error("cannot set up the network device on tap descriptor {0}")]
    Net(i32, #[source] TapError),
    /// The vsock device cannot be set up.
    #[error("cannot set up vsock")]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// The virtio queues cannot be set up.
    #[error("cannot set up virtio queues: {0}")]
    Queue(String),
    /// A device worker cannot be started.
    #[error("cannot start a device worker")]
    Worker(#[source] crate::devices::virtio::WorkerError),
    /// The API socket cannot be served.
    #[error("cannot serve the API socket {0}")]
    Api(String, #[source] std::io::Error),
    /// The kernel, initrd or boot parameters cannot be loaded.
    #[error("cannot load the guest")]
    Boot(#[from] BootError),
    /// The snapshot cannot be read.
    #[error("cannot read the snapshot")]
    Snapshot(#[from] SnapshotError),
    /// The snapshot does not fit this VM's devices.
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
}

/// What each kind of thread the VMM starts runs first: its seccomp filter
/// (see [`crate::seccomp`]), or nothing.
#[derive(Clone)]
pub struct ThreadInits {
    pub(crate) vcpu: ThreadInit,
    pub(crate) worker: ThreadInit,
    pub(crate) api: ThreadInit,
}

impl std::fmt::Debug for ThreadInits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThreadInits")
    }
}

impl ThreadInits {
    /// No filters (tests, `--seccomp none`).
    pub fn none() -> Self {
        let nothing = crate::devices::virtio::no_init();
        Self {
            vcpu: nothing.clone(),
            worker: nothing.clone(),
            api: nothing,
        }
    }
}

/// What the VM starts from: a kernel to boot, or a snapshot to carry on.
#[derive(Debug)]
pub(crate) enum Guest {
    Boot {
        kernel: NamedFile,
        initrd: Option<NamedFile>,
    },
    Restore {
        state: Box<SnapshotState>,
        memory: std::fs::File,
    },
}

/// Everything the VMM opens by path, opened before it confines itself
/// (`crate::jail`): after that it has no host path to open.
#[derive(Debug)]
pub struct HostFiles {
    pub(crate) kvm: kvm_ioctls::Kvm,
    pub(crate) guest: Guest,
    /// One per `config.disks`, in order.
    pub disks: Vec<Block>,
    pub(crate) serial: Option<BoundedFile>,
    /// One per `config.nets`, in order, over the taps the launcher passed.
    pub(crate) nets: Vec<Net>,
}

impl HostFiles {
    /// Checks `config` and opens what it names.
    pub fn open(config: &VmConfig) -> Result<Self, BuildError> {
        config.validate()?;
        // The taps first: each descriptor is checked before it is taken.
        let nets = config
            .nets
            .iter()
            .map(|net| {
                let tap = Tap::inherited(net.tap_fd).map_err(|e| BuildError::Net(net.tap_fd, e))?;
                Ok(Net::new(tap, net.mac.0, net.mtu))
            })
            .collect::<Result<Vec<_>, BuildError>>()?;
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| VmError("opening /dev/kvm", e))?;
        let open = |what: &'static str, path: &std::path::Path| {
            NamedFile::open(path).map_err(|source| ConfigError::Missing {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let guest = match &config.restore {
            None => Guest::Boot {
                kernel: open("kernel", &config.kernel)?,
                initrd: config
                    .initrd
                    .as_deref()
                    .map(|path| open("initrd", path))
                    .transpose()?,
            },
            Some(dir) => {
                let state = SnapshotState::read(dir)?;
                let path = dir.join(MEMORY_FILE);
                let memory =
                    std::fs::File::open(&path).map_err(|e| SnapshotError::Io("open", path, e))?;
                Guest::Restore {
                    state: Box::new(state),
                    memory,
                }
            }
        };
        let disks = config
            .disks
            .iter()
            .map(|disk| {
                Block::open(&disk.path, disk.read_only, disk.id.as_deref())
                    .map_err(|e| BuildError::Disk(disk.path.display().to_string(), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serial = match &config.serial {
            SerialConfig::File(path) => Some(
                BoundedFile::open(path)
                    .map_err(|e| BuildError::SerialFile(path.display().to_string(), e))?,
            ),
            _ => None,
        };
        Ok(Self {
            kvm,
            guest,
            disks,
            serial,
            nets,
        })
    }

    /// The vCPU count and RAM in MiB of the snapshot to restore, if the VM
    /// is restored: they are the snapshot's, whatever the configuration
    /// said.
    pub fn snapshot_shape(&self) -> Option<(u8, u32)> {
        match &self.guest {
            Guest::Boot { .. } => None,
            Guest::Restore { state, .. } => Some((
                u8::try_from(state.vcpus.len()).unwrap_or(u8::MAX),
                u32::try_from(state.mem_bytes >> 20).unwrap_or(u32::MAX),
            )),
        }
    }
}

/// Builds a VM from `config` and the `files` it names, booting its kernel
/// or carrying on from its snapshot (`config.restore`): one sequence, the
/// snapshot's state put in at each step where a boot would set things up.
/// `started` is when the VMM process started; the boot marker is timed
/// from it. Every thread the VM needs but its vCPUs' is started here, each
/// running its `threads` init first. Sockets are made here, at the paths in
/// `config`.
pub fn build(
    config: &VmConfig,
    files: HostFiles,
    started: Instant,
    threads: &ThreadInits,
) -> Result<Vmm, BuildError> {
    let HostFiles {
        kvm,
        guest,
        disks,
        serial,
        nets,
    } = files;
    let phase = |name: &str| {
        tracing::debug!(us = started.elapsed().as_micros(), "build: {name}");
    };
    phase("configuration checked");
    let (ram, vcpu_count, boot, snapshot) = match guest {
        Guest::Boot { kernel, initrd } => (
            GuestRam::new(u64::from(config.mem_mib) << 20)?,
            config.vcpus,
            Some((kernel, initrd)),
            None,
        ),
        Guest::Restore { state, memory } => (
            GuestRam::from_snapshot(state.mem_bytes, &memory)?,
            u8::try_from(state.vcpus.len())
                .map_err(|_| BuildError::Restore("too many vCPUs".into()))?,
            None,
            Some(state),
        ),
    };
    let saved = snapshot.as_deref();
    let mem_bytes = ram.size();
    let ram = Arc::new(ram);
    let vm = Arc::new(Vm::with(kvm)?);
    vm.register_memory(&ram)?;
    let irqchip = usable_irqchip(
        config.irqchip,
        vm.kvm().check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
    );
    vm.create_irqchip(irqchip)?;
    if let Some(saved) = saved {
        vm.restore_state(&saved.vm)?;
    }
    phase("VM, memory and irqchip created");
    let exit = Arc::new(ExitNotifier::new().map_err(BuildError::EventFd)?);

    // Legacy devices on ports.
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial_out = serial_output(&config.serial, serial);
    let serial = Arc::new(Mutex::new(match saved {
        None => SerialConsole::new(serial_irq, serial_out),
        Some(saved) => SerialConsole::restore(serial_irq, serial_out, &saved.devices.serial)
            .map_err(BuildError::Restore)?,
    }));
    pio.insert(
        Arc::clone(&serial) as Arc<Mutex<dyn crate::devices::bus::BusDevice>>,
        u64::from(SERIAL_PORT),
        u64::from(SERIAL_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(Arc::clone(&exit)))),
        u64::from(I8042_PORT),
        u64::from(I8042_PORT_LEN),
    )?;
    pio.insert(
        Arc::new(Mutex::new(BootMarker::new(started))),
        u64::from(BOOT_MARKER_PORT),
        1,
    )?;

    // virtio devices on MMIO, each announced on the command line.
    // Disks first (the first is /dev/vda), then the spare slots, vsock, and
    // the network devices (the first is eth0).
    let snapshot_refusal = snapshot_refusal(config, irqchip);
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for block in disks {
        devices.push(Box::new(block));
    }
    let spare_from = devices.len();
    let mut spare_backings = Vec::new();
    for _ in 0..config.spare_disks {
        let block = Block::spare();
        spare_backings.push(block.backing());
        devices.push(Box::new(block));
    }
    if let Some(vsock) = &config.vsock {
        devices.push(Box::new(Vsock::new(vsock.cid, &vsock.uds)?));
    }
    for net in nets {
        devices.push(Box::new(net));
    }
    if let Some(saved) = saved
        && saved.devices.virtio.len() != devices.len()
    {
        return Err(BuildError::Restore(format!(
            "the snapshot has {} virtio devices, this VM {}: give the spare slots and vsock it was taken with",
            saved.devices.virtio.len(),
            devices.len()
        )));
    }
    let mut mmio = Bus::new();
    if irqchip == Irqchip::Split {
        let ioapic = Ioapic::new(mptable::ioapic_id(config.vcpus), Box::new(Arc::clone(&vm)));
        mmio.insert(
            Arc::new(Mutex::new(ioapic)),
            u64::from(IOAPIC_ADDR),
            IOAPIC_SIZE,
        )?;
    }
    let mut cmdline_devices = Vec::new();
    let mut spare_backings = spare_backings.into_iter();
    let mut slots = Vec::new();
    let mut transports = Vec::new();
    for (position, mut device) in devices.into_iter().enumerate() {
        let index = u32::try_from(position).unwrap_or(u32::MAX);
        let base = VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + index;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irqfd, irq)?;
        let mut queue_evts = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
            let queue = u32::try_from(queue).unwrap_or(u32::MAX);
            vm.register_mmio_notify(&evt, base + REG_QUEUE_NOTIFY, queue)?;
            queue_evts.push(evt);
        }
        let interrupt = Arc::new(Interrupt::new(irqfd));
        if position >= spare_from
            && let Some(backing) = spare_backings.next()
        {
            slots.push(DiskSlot::new(backing, Arc::clone(&interrupt)));
        }
        let worker = device
            .take_worker()
            .ok_or_else(|| BuildError::Queue("a virtio device has no worker".into()))?;
        let name = format!("virtio{index}");
        let worker = WorkerHandle::spawn(&name, worker, threads.worker.clone())
            .map_err(BuildError::Worker)?;
        let memory = Arc::clone(&ram);
        let transport = match saved.and_then(|s| s.devices.virtio.get(position)) {
            None => MmioTransport::new(device, memory, interrupt, queue_evts, worker)
                .map_err(|e| BuildError::Queue(format!("{e:?}")))?,
            Some(state) => {
                MmioTransport::restore(device, memory, interrupt, queue_evts, worker, state)
                    .map_err(|e| BuildError::Restore(e.to_string()))?
            }
        };
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(
            Arc::clone(&transport) as Arc<Mutex<dyn crate::devices::bus::BusDevice>>,
            base,
            VIRTIO_MMIO_SIZE,
        )?;
        transports.push(transport);
        cmdline_devices.push((base, irq));
    }

    let slots = Arc::new(DiskSlots::new(slots));
    let snapshots = Arc::new(SnapshotDesk::new(Arc::clone(&exit), snapshot_refusal));
    let api = match &config.api_uds {
        Some(path) => Some(
            ApiServer::start(
                path,
                ApiContext {
                    slots: Arc::clone(&slots),
                    snapshots: Arc::clone(&snapshots),
                },
                threads.api.clone(),
            )
            .map_err(|e| BuildError::Api(path.display().to_string(), e))?,
        ),
        None => None,
    };
    phase("devices created");

    let vcpus = match (boot, saved) {
        (Some((mut kernel, mut initrd)), _) => {
            let cmdline = boot::cmdline(&config.cmdline, &cmdline_devices)?;
            let entry = boot::load_guest(
                ram.memory(),
                mem_bytes,
                &mut kernel,
                initrd.as_mut(),
                &cmdline,
            )?;
            boot::write_arch_tables(ram.memory(), vcpu_count, entry.protocol)?;
            phase("guest loaded");
            tracing::info!(protocol = ?entry.protocol, entry = entry.entry, "kernel loaded");
            tracing::debug!(cmdline = ?cmdline.as_cstring().ok(), "command line");
            let cpuid = vm
                .kvm()
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| VmError("KVM_GET_SUPPORTED_CPUID", e))?;
            (0..vcpu_count)
                .map(|index| Vcpu::new(&vm, &cpuid, index, vcpu_count, entry))
                .collect::<Result<Vec<_>, _>>()?
        }
        (None, Some(saved)) => saved
            .vcpus
            .iter()
            .zip(0..vcpu_count)
            .map(|(state, index)| Vcpu::restore(&vm, index, state))
            .collect::<Result<Vec<_>, _>>()?,
        (None, None) => {
            return Err(BuildError::Restore(
                "the snapshot's state is missing".into(),
            ));
        }
    };
    phase("vCPUs configured");
    if saved.is_some() {
        // Interrupts a restored device had pending (and vsock's reset
        // event), now that the interrupt controllers they go to are back.
        for transport in &transports {
            capsid_base::lock(transport).raise_pending();
        }
    }

    Ok(Vmm {
        _api: api,
        vcpu_threads: VcpuThreads::default(),
        vcpus,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        exit,
        serial,
        transports,
        slots,
        snapshots,
        vm,
        ram,
        started,
        vcpu_init: threads.vcpu.clone(),
        vcpu_count,
    })
}

/// Why a VM built from `config` cannot be snapshotted, if it cannot: its
/// state would not be whole (the split irqchip's IOAPIC lives in the VMM),
/// or would hold what a restore cannot bring back (disk images given at
/// boot, taps).
fn snapshot_refusal(config: &VmConfig, irqchip: Irqchip) -> Option<String> {
    let why = if irqchip != Irqchip::Kernel {
        "it has the split irqchip; snapshots need the kernel irqchip"
    } else if !config.disks.is_empty() {
        "it has disks given at boot; a VM to snapshot takes its images through spare slots"
    } else if !config.nets.is_empty() {
        "it has network devices"
    } else {
        return None;
    };
    Some(format!("this VM cannot be snapshotted: {why}"))
}

fn serial_output(serial: &SerialConfig, file: Option<BoundedFile>) -> Box<dyn Write + Send> {
    match (serial, file) {
        (SerialConfig::File(_), Some(file)) => Box::new(LineWriter::new(file)),
        (SerialConfig::Stdout, _) => Box::new(LineWriter::new(std::io::stdout())),
        _ => Box::new(std::io::sink()),
    }
}

/// The irqchip a VM gets: the split one needs the TSC-deadline LAPIC timer
/// (it has no PIT to time with), so where KVM lacks it the VM gets KVM's
/// interrupt controllers, and the log says so.
fn usable_irqchip(asked: Irqchip, tsc_deadline: bool) -> Irqchip {
    if asked == Irqchip::Split && !tsc_deadline {
        tracing::warn!(
            "KVM has no TSC-deadline timer, which the split irqchip needs (it has no PIT); \
             using KVM's interrupt controllers"
        );
        return Irqchip::Kernel;
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_irqchip_falls_back_to_kvms_without_a_tsc_deadline_timer() {
        assert_eq!(usable_irqchip(Irqchip::Split, true), Irqchip::Split);
        assert_eq!(usable_irqchip(Irqchip::Split, false), Irqchip::Kernel);
        assert_eq!(usable_irqchip(Irqchip::Kernel, true), Irqchip::Kernel);
    }
}
