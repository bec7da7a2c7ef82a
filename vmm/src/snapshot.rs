//! A snapshot on disk: a directory with `state.json` (this module's
//! [`SnapshotState`]: the KVM state of every vCPU and of the VM, and what
//! the snapshot may be restored on) and `memory` (guest RAM, sparse,
//! `GuestRam::save_to`).
//!
//! A snapshot is restored only by the build that took it, on the CPU it was
//! taken on: the state's layout is this build's, and a guest whose CPUID
//! changes under it (other features, other XSAVE layout) can fail in ways
//! nobody would trace back to a restore. Anything else is refused with a
//! message that says to take the snapshot again (Firecracker refuses other
//! snapshot versions the same way). The file is read with a bound and
//! checked before any of it reaches KVM.
//!
//! ```text
//!  SNAPSHOT_DIR/
//!    state.json   {"format": 1, "build": "capsid-vmm 0.1.0", "cpu": "…",
//!                  "mem_bytes": …, "vm": {…}, "vcpus": [{…}, …]}
//!    memory       guest RAM, its ranges one after another, holes for zeros
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;
use crate::exit::{ExitNotifier, ExitReason};
use crate::vstate::snapshot::{VcpuState, VmState};

/// Bumped whenever a field of the state changes meaning.
pub const FORMAT: u32 = 2;
/// The build that writes and reads snapshots.
pub const BUILD: &str = concat!("capsid-vmm ", env!("CARGO_PKG_VERSION"));
/// The most `state.json` may hold: 255 vCPUs' state is about 3 MiB.
const MAX_STATE_BYTES: u64 = 16 << 20;
/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Why a snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot cannot be written or read.
    #[error("cannot {0} {1}")]
    Io(&'static str, PathBuf, #[source] std::io::Error),
    /// The state file is larger than any snapshot's.
    #[error("{0} has more than {MAX_STATE_BYTES} bytes: not a snapshot's state")]
    TooLarge(PathBuf),
    /// The state file is not a snapshot's state.
    #[error("{0} is not a snapshot's state")]
    Parse(PathBuf, #[source] serde_json::Error),
    /// Another format.
    #[error(
        "the snapshot has format {found}, this capsid-vmm reads format {FORMAT}: take the snapshot again"
    )]
    Format {
        /// The snapshot's format.
        found: u32,
    },
    /// Another build took it.
    #[error(
        "the snapshot was taken by {found}, this is {BUILD}: take the snapshot again with this build"
    )]
    Build {
        /// The build that took it.
        found: String,
    },
    /// Another CPU.
    #[error(
        "the snapshot was taken on another CPU ({found}; this host: {ours}): take the snapshot again on this host"
    )]
    Cpu {
        /// The CPU it was taken on.
        found: String,
        /// This host's.
        ours: String,
    },
    /// The state does not describe a VM this VMM can make.
    #[error("the snapshot's state is inconsistent: {0}")]
    Invalid(String),
}

/// What `state.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// [`BUILD`] when written.
    pub build: String,
    /// [`host_cpu`] when written.
    pub cpu: String,
    /// The guest's RAM, in bytes (the memory file's content is that long).
    pub mem_bytes: u64,
    /// The VM's interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// Each vCPU's state, vCPU 0 first.
    pub vcpus: Vec<VcpuState>,
    /// The devices' state.
    pub devices: DeviceStates,
}

/// The state of the devices that have any: the serial console's UART and
/// each virtio-mmio transport, in the order of their MMIO slots. The i8042
/// and the boot marker have none the guest relies on after boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    /// The serial console.
    pub serial: SerialSnapshot,
    /// Each virtio device's transport and queues.
    pub virtio: Vec<TransportState>,
}

/// This host's CPU as CPUID names it: vendor, then family, model and
/// stepping (leaf 1 EAX).
pub fn host_cpu() -> String {
    let vendor = std::arch::x86_64::__cpuid(0);
    let signature = std::arch::x86_64::__cpuid(1).eax;
    let bytes: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    format!(
        "{} {signature:#010x}",
        String::from_utf8_lossy(&bytes).trim_matches('\0')
    )
}

impl SnapshotState {
    /// The state of a VM with `mem_bytes` of RAM, stamped with this build
    /// and this host's CPU.
    pub fn new(mem_bytes: u64, vm: VmState, vcpus: Vec<VcpuState>, devices: DeviceStates) -> Self {
        Self {
            format: FORMAT,
            build: BUILD.to_owned(),
            cpu: host_cpu(),
            mem_bytes,
            vm,
            vcpus,
            devices,
        }
    }

    /// Writes the state into `file` (from its start, whatever it held) and
    /// syncs it: what the VMM does with the state file a snapshot request
    /// brings.
    pub fn write_to(&self, mut file: &File) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        file.set_len(0)?;
        std::io::Seek::rewind(&mut file)?;
        file.write_all(&json)?;
        file.sync_all()
    }

    /// Writes `dir/state.json`, whole or not at all.
    pub fn write(&self, dir: &Path) -> Result<(), SnapshotError> {
        let path = dir.join(STATE_FILE);
        let partial = dir.join(format!("{STATE_FILE}.partial"));
        File::create(&partial)
            .and_then(|f| self.write_to(&f))
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&partial);
                SnapshotError::Io("write", path.clone(), e)
            })
    }

    /// Reads and checks `dir/state.json` for a restore by this build on
    /// this host.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let file = File::open(&path).map_err(|e| SnapshotError::Io("open", path.clone(), e))?;
        let mut json = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut json)
            .map_err(|e| SnapshotError::Io("read", path.clone(), e))?;
        if json.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge(path));
        }
        // The stamps first, so that another build's state is named as such
        // rather than as a parse error of a field that changed.
        #[derive(Deserialize)]
        struct Stamps {
            format: u32,
            build: String,
            cpu: String,
        }
        let stamps: Stamps =
            serde_json::from_slice(&json).map_err(|e| SnapshotError::Parse(path.clone(), e))?;
        if stamps.format != FORMAT {
            return Err(SnapshotError::Format {
                found: stamps.format,
            });
        }
        if stamps.build != BUILD {
            return Err(SnapshotError::Build {
                found: stamps.build,
            });
        }
        let ours = host_cpu();
        if stamps.cpu != ours {
            return Err(SnapshotError::Cpu {
                found: stamps.cpu,
                ours,
            });
        }
        let state: Self =
            serde_json::from_slice(&json).map_err(|e| SnapshotError::Parse(path, e))?;
        state.check()?;
        Ok(state)
    }

    /// What KVM cannot check for us.
    fn check(&self) -> Result<(), SnapshotError> {
        let invalid = |what: String| Err(SnapshotError::Invalid(what));
        if self.vcpus.is_empty() || self.vcpus.len() > usize::from(u8::MAX) {
            return invalid(format!("{} vCPUs (1 to 255)", self.vcpus.len()));
        }
        let mib = self.mem_bytes >> 20;
        if !(u64::from(crate::config::MIN_MEM_MIB)..=u64::from(crate::config::MAX_MEM_MIB))
            .contains(&mib)
            || !self.mem_bytes.is_multiple_of(1 << 20)
        {
            return invalid(format!("{} bytes of guest RAM", self.mem_bytes));
        }
        if self.devices.virtio.len() > crate::config::MAX_VIRTIO_DEVICES {
            return invalid(format!("{} virtio devices", self.devices.virtio.len()));
        }
        Ok(())
    }
}

/// A snapshot asked for through the API, waiting for the main thread:
/// the files to write, and where to say how it went.
#[derive(Debug)]
pub struct SnapshotJob {
    /// The state file (`state.json`), opened for writing.
    pub state: File,
    /// The memory file, opened for writing.
    pub memory: File,
    reply: std::sync::mpsc::Sender<Result<u64, String>>,
}

impl SnapshotJob {
    /// Tells the requester how it went: the pause in milliseconds, or why
    /// there is no snapshot.
    pub fn answer(self, outcome: Result<u64, String>) {
        let _ = self.reply.send(outcome);
    }
}

/// Where the API thread leaves a snapshot request for the main thread,
/// which alone can stop the vCPUs. The request is also the VM's exit
/// reason ([`ExitReason::Snapshot`]): a VM that ended for another reason
/// first never takes the job, and the requester hears so at once.
#[derive(Debug)]
pub struct SnapshotDesk {
    job: std::sync::Mutex<DeskState>,
    exit: std::sync::Arc<ExitNotifier>,
    /// Why this VM cannot be snapshotted at all, if it cannot.
    refusal: Option<String>,
}

#[derive(Debug)]
enum DeskState {
    Open,
    Waiting(SnapshotJob),
    Closed,
}

impl SnapshotDesk {
    /// A desk that reports to `exit`; `refusal` says why this VM cannot be
    /// snapshotted, if it cannot (every request gets that answer).
    pub fn new(exit: std::sync::Arc<ExitNotifier>, refusal: Option<String>) -> Self {
        Self {
            job: std::sync::Mutex::new(DeskState::Open),
            exit,
            refusal,
        }
    }

    /// Asks for a snapshot into `state` and `memory` and waits at most
    /// `wait` for it: the pause in milliseconds, or why there is none.
    pub fn request(
        &self,
        state: File,
        memory: File,
        wait: std::time::Duration,
    ) -> Result<u64, String> {
        use std::sync::mpsc::RecvTimeoutError;
        if let Some(why) = &self.refusal {
            return Err(why.clone());
        }
        let (reply, answer) = std::sync::mpsc::channel();
        {
            let mut desk = capsid_base::lock(&self.job);
            match *desk {
                DeskState::Open => {
                    *desk = DeskState::Waiting(SnapshotJob {
                        state,
                        memory,
                        reply,
                    })
                }
                DeskState::Waiting(_) => return Err("a snapshot is being taken already".into()),
                DeskState::Closed => return Err("the VM has ended".into()),
            }
        }
        self.exit.report(ExitReason::Snapshot);
        match answer.recv_timeout(wait) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "the VM was not saved within {wait:?}; it is ending without a snapshot"
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err("the VM ended for another reason before it could be saved".into())
            }
        }
    }

    /// Closes the desk (later requests are refused) and takes the job
    /// waiting on it, if any. A job taken and dropped unanswered tells its
    /// requester the VM ended first.
    pub fn close(&self) -> Option<SnapshotJob> {
        match std::mem::replace(&mut *capsid_base::lock(&self.job), DeskState::Closed) {
            DeskState::Waiting(job) => Some(job),
            DeskState::Open | DeskState::Closed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SnapshotState {
        SnapshotState::new(
            64 << 20,
            blank_vm(),
            vec![blank_vcpu()],
            DeviceStates::default(),
        )
    }

    fn blank_vm() -> VmState {
        VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        }
    }

    fn blank_vcpu() -> VcpuState {
        VcpuState {
            cpuid: Vec::new(),
            msrs: Vec::new(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            mp_state: Default::default(),
            events: Default::default(),
        }
    }

    /// Writes `state`, then edits its JSON with `edit`.
    fn written(state: &SnapshotState, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        state.write(dir.path()).unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut json);
        std::fs::write(&path, json.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_state_written_by_this_build_here_reads_back() {
        let dir = written(&state(), |_| {});
        let back = SnapshotState::read(dir.path()).unwrap();
        assert_eq!(back.mem_bytes, 64 << 20);
        assert_eq!(back.vcpus.len(), 1);
        assert!(!dir.path().join("state.json.partial").exists());
    }

    #[test]
    fn another_format_build_or_cpu_is_refused_with_what_to_do() {
        let dir = written(&state(), |j| j["format"] = 99.into());
        let err = SnapshotState::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("format 99") && err.contains("take the snapshot again"),
            "{err}"
        );

        let dir = written(&state(), |j| j["build"] = "capsid-vmm 0.0.9".into());
        let err = SnapshotState::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("capsid-vmm 0.0.9") && err.contains(BUILD),
            "{err}"
        );

        let dir = written(&state(), |j| j["cpu"] = "GenuineIntel 0x000806c1".into());
        let err = SnapshotState::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("another CPU") && err.contains(&host_cpu()),
            "{err}"
        );
    }

    #[test]
    fn a_state_without_vcpus_or_with_odd_memory_is_refused() {
        let dir = written(&state(), |j| j["vcpus"] = serde_json::json!([]));
        let err = SnapshotState::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("0 vCPUs"), "{err}");
        let dir = written(&state(), |j| j["mem_bytes"] = ((64u64 << 20) + 1).into());
        let err = SnapshotState::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("bytes of guest RAM"), "{err}");
    }

    #[test]
    fn a_huge_or_broken_state_file_is_refused_without_reading_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let file = File::create(&path).unwrap();
        file.set_len(MAX_STATE_BYTES + 4096).unwrap();
        let err = SnapshotState::read(dir.path()).unwrap_err();
        assert!(matches!(err, SnapshotError::TooLarge(_)), "{err:?}");
        std::fs::write(&path, b"{\"format\": 1").unwrap();
        let err = SnapshotState::read(dir.path()).unwrap_err();
        assert!(matches!(err, SnapshotError::Parse(..)), "{err:?}");
        assert!(SnapshotState::read(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_host_cpu_is_its_vendor_and_signature() {
        let cpu = host_cpu();
        let (vendor, signature) = cpu.rsplit_once(' ').unwrap();
        assert!(
            !vendor.is_empty() && vendor.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "{cpu}"
        );
        let signature = u32::from_str_radix(signature.trim_start_matches("0x"), 16).unwrap();
        // Family (bits 8-11) is never 0 on an x86_64 CPU.
        assert_ne!(signature & 0xf00, 0, "{cpu}");
    }
}
