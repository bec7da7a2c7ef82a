//! virtio over MMIO: the transport ([`mmio`]), the devices ([`block`],
//! [`net`], [`vsock`]), and what they share: the device interface, interrupts, the
//! worker thread that serves a device's queues, and descriptor-chain checks.
//!
//! Every device follows the same template (Firecracker's): `mod.rs` with the
//! wire definitions, `device.rs` with the [`VirtioDevice`] and its worker's
//! event handling, and the queue processing as pure code over `virtio-queue`
//! (`request.rs`, `frames.rs`, `packet.rs`, `muxer.rs`), unit-tested with its mock queues.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestRam;
pub use worker::{EventSetup, ThreadInit, Worker, WorkerError, WorkerHandle, no_init};

/// `VIRTIO_F_VERSION_1`: the device speaks virtio 1.x (no legacy layout).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device status bits (virtio 1.2, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub(crate) const STATUS_DRIVER: u32 = 2;
pub(crate) const STATUS_DRIVER_OK: u32 = 4;
pub(crate) const STATUS_FEATURES_OK: u32 = 8;
pub(crate) const STATUS_NEEDS_RESET: u32 = 0x40;
pub(crate) const STATUS_FAILED: u32 = 0x80;
/// `InterruptStatus` bits: a used buffer was added; the configuration changed.
pub const INT_USED_RING: u32 = 1;
pub(crate) const INT_CONFIG: u32 = 2;

/// The guest-memory view handed to devices: RAM kept alive by an `Arc`.
pub type Memory = Arc<GuestRam>;

/// Raises the device's interrupt and keeps its `InterruptStatus` register.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raised by writing `irqfd` (registered with KVM).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that used buffers are waiting.
    pub fn signal_used_queue(&self) {
        self.status.fetch_or(INT_USED_RING, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            crate::guest_warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver to re-read the configuration space.
    pub fn signal_config_change(&self) {
        self.status.fetch_or(INT_CONFIG, Ordering::AcqRel);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio configuration interrupt: {e}");
        }
    }

    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets `bits` without raising the line: for a restored device, whose
    /// line is raised once the vCPUs' interrupt controllers are back
    /// ([`Self::raise_if_pending`]); raised before, it would be lost.
    pub(crate) fn raise_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
    }

    /// Raises the line if an interrupt is pending (a restored VM, before
    /// its vCPUs run).
    pub(crate) fn raise_if_pending(&self) {
        if self.status() != 0
            && let Err(e) = self.irqfd.write(1)
        {
            tracing::warn!("cannot raise a restored virtio interrupt: {e}");
        }
    }

    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }
}

/// What a device needs to start serving its queues.
#[derive(Debug)]
pub struct ActivateContext {
    pub(crate) memory: Memory,
    pub(crate) queues: Vec<Queue>,
    /// Signalled (by KVM) when the driver notifies queue i; shared with
    /// the transport (no descriptor is duplicated on a vCPU thread).
    pub queue_evts: Arc<Vec<EventFd>>,
    pub(crate) interrupt: Arc<Interrupt>,
    /// The features the driver acknowledged (the device's own offer, masked).
    pub acked_features: u64,
    /// The queues come from a snapshot: the device was serving them in
    /// another VMM process, and whatever it held outside guest memory
    /// (vsock connections) is gone.
    pub restored: bool,
}

/// One queue as a snapshot keeps it: `virtio_queue::QueueState`, which
/// has no serde, field for field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// Where the device takes the next available entry.
    pub next_avail: u16,
    /// Where the device puts the next used entry.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver set the queue up.
    pub ready: bool,
    /// Guest addresses of the descriptor table and the two rings.
    pub desc_table: u64,
    /// The available (driver) ring.
    pub avail_ring: u64,
    /// The used (device) ring.
    pub used_ring: u64,
}

impl QueueSnapshot {
    /// `queue`'s state.
    pub fn of(queue: &Queue) -> Self {
        let state = queue.state();
        Self {
            max_size: state.max_size,
            next_avail: state.next_avail,
            next_used: state.next_used,
            event_idx_enabled: state.event_idx_enabled,
            size: state.size,
            ready: state.ready,
            desc_table: state.desc_table,
            avail_ring: state.avail_ring,
            used_ring: state.used_ring,
        }
    }

    /// The queue again; virtio-queue refuses a size above the maximum or
    /// not a power of two, and misaligned rings.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up the wrong number of queues.
    #[error("the driver set up {got} queues, the device has {want}")]
    QueueCount {
        /// Queues the driver set up.
        got: usize,
        /// Queues the device has.
        want: usize,
    },
    /// The queue eventfds cannot be registered.
    #[error("cannot watch the device's queues")]
    Watch(#[source] std::io::Error),
}

/// A virtio device, as the MMIO transport sees it.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// The virtio device ID (1 = net, 2 = block, 19 = vsock).
    fn device_type(&self) -> u32;
    /// The largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers.
    fn features(&self) -> u64;
    /// Reads from the configuration space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Changes whenever the configuration space does (`ConfigGeneration`).
    fn config_generation(&self) -> u32 {
        0
    }
    /// Writes to the configuration space; none of our devices has a
    /// writable field, so writes are dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        crate::guest_warn!(
            device = self.device_type(),
            offset,
            len = data.len(),
            "guest wrote read-only virtio config space"
        );
    }
    /// The half of the device that serves its queues on a thread of its
    /// own; handed over once, when the VM is built.
    fn take_worker(&mut self) -> Option<Box<dyn Worker>>;
}

/// Copies `config[offset..]` into `data`, zero-filling past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A descriptor chain the device refuses to look into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain loops or is too long.
    #[error("descriptor chain loops or is longer than the queue ({0} entries)")]
    Unterminated(u16),
    /// A descriptor index past the table.
    #[error("descriptor {index} is outside the {size}-entry descriptor table")]
    OutsideTable {
        /// The descriptor's index.
        index: u16,
        /// The table's size.
        size: u16,
    },
    /// A descriptor cannot be read.
    #[error("descriptor table entry {0} is not in guest memory")]
    Unreadable(u16),
    /// An indirect descriptor (not offered).
    #[error("descriptor {0} is indirect, a feature the device does not offer")]
    Indirect(u16),
    /// The chain's buffers add up to over 4 GiB.
    #[error("descriptor chain is longer than 4 GiB in total")]
    TooLong,
}

/// One descriptor, reduced to what a device needs. Its range is not yet
/// known to be in guest memory: see [`Buffer::in_memory`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Where it starts in guest memory.
    pub addr: GuestAddress,
    /// Its length in bytes.
    pub len: u32,
    /// Device-writable (the driver reads it back).
    pub writable: bool,
}

impl Buffer {
    /// Whether every byte of the buffer is guest RAM.
    pub fn in_memory(&self, memory: &GuestMemoryMmap) -> bool {
        use vm_memory::GuestMemoryBackend;
        self.len == 0
            || usize::try_from(self.len).is_ok_and(|len| memory.check_range(self.addr, len))
    }
}

/// Reads the descriptors of the chain `chain` heads, once each, before any
/// is used, and checks that the chain ends: no loop, no more descriptors
/// than the queue holds, no `next` outside the table, no indirect
/// descriptor (we never offer `VIRTIO_RING_F_INDIRECT_DESC`), at most 4 GiB
/// in all.
///
/// The walk is ours rather than `DescriptorChain`'s iterator: that one
/// follows indirect tables by itself, and stops silently on a chain it
/// cannot read. Each descriptor is read from guest memory exactly once, so
/// a guest rewriting its table meanwhile changes nothing we checked.
pub fn read_chain(
    queue: &Queue,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<Buffer>, ChainError> {
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::Bytes;
    let memory = chain.memory();
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = chain.head_index();
    let mut buffers = Vec::new();
    let mut total = 0u32;
    for _ in 0..size {
        if index >= size {
            return Err(ChainError::OutsideTable { index, size });
        }
        let entry = table
            .0
            .checked_add(u64::from(index) * 16)
            .map(GuestAddress)
            .ok_or(ChainError::Unreadable(index))?;
        let desc: Descriptor = memory
            .read_obj(entry)
            .map_err(|_| ChainError::Unreadable(index))?;
        if u32::from(desc.flags()) & VRING_DESC_F_INDIRECT != 0 {
            return Err(ChainError::Indirect(index));
        }
        total = total.checked_add(desc.len()).ok_or(ChainError::TooLong)?;
        buffers.push(Buffer {
            addr: GuestAddress(desc.addr().0),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(buffers);
        }
        index = desc.next();
    }
    Err(ChainError::Unterminated(size))
}

/// Puts a chain on the used ring; a failure means the guest broke the ring
/// itself, which is logged (rate-limited) and otherwise ignored.
pub fn add_used(queue: &mut Queue, memory: &GuestMemoryMmap, head: u16, len: u32) {
    if let Err(e) = queue.add_used(memory, head, len) {
        crate::guest_warn!("cannot return a descriptor chain to the guest: {e:?}");
    }
}
