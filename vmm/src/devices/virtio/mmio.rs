//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): the register
//! window through which the driver discovers a device, negotiates features,
//! sets up queues and reads the configuration space.
//!
//! ```text
//!  reset ──ACKNOWLEDGE──▶ DRIVER ──FEATURES_OK──▶ (queues set up) ──DRIVER_OK──▶ activated
//!    ▲                                                                             │
//!    └──────────────────────────── status = 0 (reset) ◀────────────────────────────┘
//! ```
//!
//! Register accesses run on the vCPU threads. Queue notifications do not:
//! KVM signals the queue's eventfd (an ioeventfd on `QueueNotify`) and the
//! device's worker thread picks it up. Everything the driver writes is
//! checked: a queue size above the maximum, a ring outside guest memory or
//! a status out of order marks the device FAILED/NEEDS_RESET instead of
//! activating it.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, INT_CONFIG, INT_USED_RING, Interrupt, Memory, QueueSnapshot,
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET, VIRTIO_F_VERSION_1, VirtioDevice, WorkerHandle,
};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Register offsets.
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// The queue-notify register, served by ioeventfds.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// One virtio device behind its MMIO register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: Memory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Shared with the worker while it serves the queues.
    queue_evts: Arc<Vec<EventFd>>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    /// The device's queue-serving thread, for the VM's whole life.
    worker: WorkerHandle,
    activated: bool,
    /// The worker did not let go of the queues within the bound at a
    /// reset: the device stays failed.
    broken: bool,
}

/// How long a reset waits for the worker to give the queues back.
const RESET_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A transport's registers and queues, as a snapshot keeps them. The
/// device behind it keeps nothing else the guest relies on: a disk's
/// contents are on the host, a vsock's connections are reset on restore.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// The virtio device ID, checked against the restoring VM's device.
    pub device_type: u32,
    /// The status register as the driver wrote it.
    pub status: u32,
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// The selector registers.
    pub queue_select: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// Interrupts raised and not yet acknowledged.
    pub interrupt_status: u32,
    /// One per queue of the device.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport's state cannot be taken or put back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportStateError {
    /// The device failed; its state means nothing.
    #[error("virtio device {0} has failed")]
    Failed(u32),
    /// The worker did not give the queues back in time.
    #[error("virtio device {0} did not stop serving its queues within {RESET_WAIT:?}")]
    Busy(u32),
    /// Another device is in this place.
    #[error("the snapshot has virtio device {found} here, the VM has device {want}")]
    DeviceType {
        /// The snapshot's device.
        found: u32,
        /// The restoring VM's.
        want: u32,
    },
    /// A queue of the state does not fit the device.
    #[error("virtio device {device}: queue {queue} of the snapshot does not fit the device")]
    Queue {
        /// The device ID.
        device: u32,
        /// The queue's index.
        queue: usize,
    },
    /// A status or feature set the driver cannot have reached.
    #[error("virtio device {0}: the snapshot's status or features are not a driver's")]
    Registers(u32),
}

/// Whether `status` is one a driver reaches by the rules `write_status`
/// enforces: the set-up bits in order, FAILED and NEEDS_RESET at any point.
fn reachable(status: u32) -> bool {
    let steps = [
        0,
        STATUS_ACKNOWLEDGE,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    ];
    steps.contains(&(status & !(STATUS_FAILED | STATUS_NEEDS_RESET)))
}

impl MmioTransport {
    /// Wraps `device`; `queue_evts` (one per queue) are the eventfds KVM
    /// signals on `QueueNotify` writes, `interrupt` the device's interrupt
    /// line, `worker` the thread serving the device's worker half.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: Memory,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
        worker: WorkerHandle,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = new_queues(device.as_ref())?;
        Ok(Self {
            device,
            memory,
            interrupt,
            queues,
            queue_evts: Arc::new(queue_evts),
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            worker,
            activated: false,
            broken: false,
        })
    }

    /// Takes the transport's state for a snapshot; an active device stops
    /// serving its queues and hands them over (the VM does not run again
    /// after a snapshot).
    pub fn save(&mut self) -> Result<TransportState, TransportStateError> {
        let device = self.device.device_type();
        if self.broken || self.worker.failed() {
            return Err(TransportStateError::Failed(device));
        }
        let queues = if std::mem::take(&mut self.activated) {
            let queues = self
                .worker
                .deactivate(RESET_WAIT)
                .ok_or(TransportStateError::Busy(device))?;
            if queues.len() != self.queues.len() {
                return Err(TransportStateError::Failed(device));
            }
            queues.iter().map(QueueSnapshot::of).collect()
        } else {
            self.queues.iter().map(QueueSnapshot::of).collect()
        };
        Ok(TransportState {
            device_type: device,
            status: self.status,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            interrupt_status: self.interrupt.status(),
            queues,
        })
    }

    /// A transport for `device` as `state` left it, checked against the
    /// device first. A device the driver had activated is activated again
    /// with the saved queues, marked as restored.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        memory: Memory,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
        worker: WorkerHandle,
        state: &TransportState,
    ) -> Result<Self, TransportStateError> {
        let want = device.device_type();
        if state.device_type != want {
            return Err(TransportStateError::DeviceType {
                found: state.device_type,
                want,
            });
        }
        let offered = device.features() | VIRTIO_F_VERSION_1;
        if !reachable(state.status) || state.acked_features & !offered != 0 {
            return Err(TransportStateError::Registers(want));
        }
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(TransportStateError::Queue {
                device: want,
                queue: state.queues.len().min(max_sizes.len()),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (queue, (saved, max)) in state.queues.iter().zip(max_sizes).enumerate() {
            let restored = saved
                .to_queue()
                .ok()
                .filter(|_| saved.max_size == *max)
                .ok_or(TransportStateError::Queue {
                    device: want,
                    queue,
                })?;
            queues.push(restored);
        }
        interrupt.raise_status(state.interrupt_status & (INT_USED_RING | INT_CONFIG));
        let mut transport = Self {
            device,
            memory,
            interrupt,
            queues,
            queue_evts: Arc::new(queue_evts),
            queue_select: state.queue_select,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            acked_features: state.acked_features,
            status: state.status,
            worker,
            activated: false,
            broken: false,
        };
        if state.status & STATUS_DRIVER_OK != 0 && state.status & STATUS_FAILED == 0 {
            transport.start_worker(true);
            // Activated before the VM runs: what the worker does on
            // activation (vsock's reset event) is done before the
            // interrupts are raised.
            if !transport.worker.sync(RESET_WAIT) {
                return Err(TransportStateError::Busy(want));
            }
        }
        Ok(transport)
    }

    /// Raises the device's interrupt if one is pending: for a restored VM,
    /// once its vCPUs (and their LAPICs) are restored.
    pub fn raise_pending(&self) {
        self.interrupt.raise_if_pending();
    }

    #[cfg(test)]
    fn is_activated(&self) -> bool {
        self.activated
    }

    /// The status register: what the driver wrote, and NEEDS_RESET when
    /// the device cannot serve (its worker failed).
    fn status(&self) -> u32 {
        if self.broken || self.worker.failed() {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let index = usize::try_from(self.queue_select).ok()?;
        self.queues.get_mut(index)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn queue_setup_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self.status & STATUS_FAILED == 0
    }

    fn read_u32(&self, offset: u64) -> u32 {
        let queue = usize::try_from(self.queue_select)
            .ok()
            .and_then(|i| self.queues.get(i));
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => {
                let features = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => u32::try_from(features & 0xffff_ffff).unwrap_or(0),
                    1 => u32::try_from(features >> 32).unwrap_or(0),
                    _ => 0,
                }
            }
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.device.config_generation(),
            _ => {
                crate::guest_warn!(offset, "guest read an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_u32(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM if setup => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue refuses sizes above the maximum or not a power of two.
                    if q.try_set_size(u16::try_from(value).unwrap_or(0)).is_err() {
                        crate::guest_warn!(value, "guest set an invalid virtio queue size");
                        self.status |= STATUS_NEEDS_RESET;
                    }
                }
            }
            REG_QUEUE_READY if setup => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH if setup => {
                let (low, high) = split(offset == REG_QUEUE_DESC_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(low, high);
                }
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH if setup => {
                let (low, high) = split(offset == REG_QUEUE_DRIVER_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(low, high);
                }
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH if setup => {
                let (low, high) = split(offset == REG_QUEUE_DEVICE_LOW, value);
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(low, high);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NOTIFY => {
                // Served by the ioeventfd; an exit here means KVM did not match
                // the queue index. Forward it so a notification is never lost.
                if let Some(evt) = usize::try_from(value)
                    .ok()
                    .and_then(|i| self.queue_evts.get(i))
                {
                    let _ = evt.write(1);
                }
            }
            _ => {
                crate::guest_warn!(
                    offset,
                    value,
                    status = self.status,
                    "guest wrote a virtio-mmio register it may not write now"
                );
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            crate::guest_warn!("guest wrote driver features outside feature negotiation");
            return;
        }
        let offered = self.device.features() | VIRTIO_F_VERSION_1;
        let value = u64::from(value);
        let acked = match self.driver_features_select {
            0 => value,
            1 => value << 32,
            _ => 0,
        };
        if acked & !offered != 0 {
            crate::guest_warn!(
                acked,
                offered,
                "guest acked features the device did not offer"
            );
        }
        self.acked_features |= acked & offered;
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        let removed = self.status & !value;
        // The driver only ever adds bits, in order (virtio 1.2, 3.1.1).
        let in_order = removed == 0
            && match added {
                STATUS_ACKNOWLEDGE => self.status == 0,
                STATUS_DRIVER => self.status == STATUS_ACKNOWLEDGE,
                STATUS_FEATURES_OK => self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER,
                STATUS_DRIVER_OK => {
                    self.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
                }
                STATUS_FAILED => true,
                _ => false,
            };
        if !in_order {
            crate::guest_warn!(
                old = self.status,
                new = value,
                "guest changed the virtio device status out of order"
            );
            return;
        }
        if added == STATUS_FEATURES_OK && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: refuse, so it does not set FEATURES_OK.
            crate::guest_warn!("guest driver did not accept VIRTIO_F_VERSION_1");
            return;
        }
        self.status = value;
        if added == STATUS_DRIVER_OK {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.start_worker(false);
    }

    /// Hands the queues to the worker, if they are valid; `restored` when
    /// they come from a snapshot.
    fn start_worker(&mut self, restored: bool) {
        if self.broken || self.worker.failed() {
            crate::guest_warn!("guest activated a virtio device that has failed");
            return;
        }
        let memory = self.memory.memory();
        if let Some(index) = self.queues.iter().position(|q| !q.is_valid(memory)) {
            crate::guest_warn!(
                queue = index,
                "guest activated a virtio device with an invalid queue"
            );
            self.status |= STATUS_NEEDS_RESET;
            return;
        }
        // The device serves a copy; the transport's own copy answers the
        // driver's register reads (QueueReady, virtio 1.2, 4.2.2.2) until a
        // reset clears it.
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(queues) => queues,
            Err(e) => {
                tracing::error!("cannot copy virtio queues: {e:?}");
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        };
        let ctx = ActivateContext {
            memory: Arc::clone(&self.memory),
            queues,
            queue_evts: Arc::clone(&self.queue_evts),
            interrupt: Arc::clone(&self.interrupt),
            acked_features: self.acked_features,
            restored,
        };
        self.worker.activate(ctx);
        self.activated = true;
    }

    /// Back to the state after power-on. The worker gives the queues back
    /// (within [`RESET_WAIT`]; one that does not leaves the device failed
    /// rather than a vCPU waiting) and waits idle for the next activation.
    fn reset(&mut self) {
        if std::mem::take(&mut self.activated) && self.worker.deactivate(RESET_WAIT).is_none() {
            tracing::error!(
                device = self.device.device_type(),
                "a virtio device's worker did not stop within {RESET_WAIT:?}; the device stays failed"
            );
            self.broken = true;
        }
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.interrupt.ack(u32::MAX);
        for queue in &mut self.queues {
            queue.reset();
        }
    }
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, virtio_queue::Error> {
    device
        .queue_max_sizes()
        .iter()
        .map(|max| Queue::new(*max))
        .collect()
}

/// `(low, high)` halves for the virtio-queue address setters.
fn split(low: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if low {
        (Some(value), None)
    } else {
        (None, Some(value))
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset.is_multiple_of(4) => *bytes = self.read_u32(offset).to_le_bytes(),
            _ => {
                crate::guest_warn!(
                    offset,
                    len = data.len(),
                    "guest made a non-32-bit virtio-mmio register read"
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_u32(offset, u32::from_le_bytes(bytes))
            }
            _ => crate::guest_warn!(
                offset,
                len = data.len(),
                "guest made a non-32-bit virtio-mmio register write"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{ActivateError, EventSetup, Worker, no_init, read_config_bytes};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct Dummy;

    /// Counts activations; `stuck` makes deactivation take longer than a
    /// reset waits.
    struct Counting {
        activations: Arc<AtomicUsize>,
        restored: Arc<AtomicUsize>,
        stuck: bool,
        queues: Vec<Queue>,
    }

    impl Worker for Counting {
        fn activate(
            &mut self,
            ctx: ActivateContext,
            _: &EventSetup<'_>,
        ) -> Result<(), ActivateError> {
            self.activations.fetch_add(1, Ordering::SeqCst);
            if ctx.restored {
                self.restored.fetch_add(1, Ordering::SeqCst);
            }
            self.queues = ctx.queues;
            Ok(())
        }
        fn deactivate(&mut self, _: &EventSetup<'_>) -> Vec<Queue> {
            if self.stuck {
                std::thread::sleep(RESET_WAIT * 2);
            }
            std::mem::take(&mut self.queues)
        }
        fn handle(&mut self, _: u64, _: vmm_sys_util::epoll::EventSet, _: &EventSetup<'_>) {}
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&[1, 2, 3, 4], offset, data);
        }
        fn take_worker(&mut self) -> Option<Box<dyn Worker>> {
            None
        }
    }

    /// A counting worker's thread, and its counts of activations and of
    /// restored ones.
    fn counting(stuck: bool) -> (WorkerHandle, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let activations = Arc::new(AtomicUsize::new(0));
        let restored = Arc::new(AtomicUsize::new(0));
        let worker = Box::new(Counting {
            activations: Arc::clone(&activations),
            restored: Arc::clone(&restored),
            stuck,
            queues: Vec::new(),
        });
        let worker = WorkerHandle::spawn("dummy", worker, no_init()).unwrap();
        (worker, activations, restored)
    }

    fn ram() -> Memory {
        Arc::new(crate::memory::GuestRam::new(1 << 20).unwrap())
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(0).unwrap()))
    }

    fn transport_with(stuck: bool) -> (MmioTransport, Arc<AtomicUsize>) {
        let (worker, activations, _) = counting(stuck);
        let evts = vec![EventFd::new(0).unwrap()];
        (
            MmioTransport::new(Box::new(Dummy), ram(), interrupt(), evts, worker).unwrap(),
            activations,
        )
    }

    /// A transport restored from `state`, and its worker's counts.
    fn restored(
        state: &TransportState,
    ) -> (
        Result<MmioTransport, TransportStateError>,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
    ) {
        let (worker, activations, restored) = counting(false);
        let evts = vec![EventFd::new(0).unwrap()];
        let t = MmioTransport::restore(Box::new(Dummy), ram(), interrupt(), evts, worker, state);
        (t, activations, restored)
    }

    #[test]
    fn an_active_device_saved_and_restored_serves_the_same_queue_again() {
        let (mut t, activations) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 8);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 1);
        let state = t.save().unwrap();
        assert!(!t.is_activated(), "the worker gave the queue back");
        assert_eq!(state.device_type, 42);
        assert_eq!(state.status, ALL_OK);
        assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
        let queue = state.queues[0];
        assert_eq!(
            (
                queue.size,
                queue.ready,
                queue.desc_table,
                queue.avail_ring,
                queue.used_ring
            ),
            (8, true, 0x1000, 0x2000, 0x3000)
        );

        let (t, activations, restored_count) = restored(&state);
        let mut t = t.unwrap();
        assert_eq!(seen(&t, &activations), 1, "activated again");
        assert_eq!(restored_count.load(Ordering::SeqCst), 1, "as restored");
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1);
        assert_eq!(t.save().unwrap(), state, "nothing changed on the way");
    }

    #[test]
    fn a_device_the_driver_had_not_activated_is_restored_inactive() {
        let (mut t, _) = transport();
        negotiate(&mut t);
        let state = t.save().unwrap();
        let (t, activations, _) = restored(&state);
        let mut t = t.unwrap();
        assert_eq!(seen(&t, &activations), 0);
        assert_eq!(
            read(&mut t, REG_STATUS),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        // The driver carries on setting it up.
        setup_queue(&mut t, 16);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 1);
    }

    #[test]
    fn a_state_that_does_not_fit_the_device_is_refused() {
        let (mut t, activations) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 1);
        let good = t.save().unwrap();
        let refused = |edit: &dyn Fn(&mut TransportState)| {
            let mut state = good.clone();
            edit(&mut state);
            let (t, activations, _) = restored(&state);
            assert_eq!(activations.load(Ordering::SeqCst), 0);
            t.expect_err("refused")
        };
        assert_eq!(
            refused(&|s| s.device_type = 2),
            TransportStateError::DeviceType { found: 2, want: 42 }
        );
        let queue = TransportStateError::Queue {
            device: 42,
            queue: 0,
        };
        assert_eq!(refused(&|s| s.queues[0].size = 12), queue);
        assert_eq!(refused(&|s| s.queues[0].max_size = 256), queue);
        assert_eq!(refused(&|s| s.queues[0].desc_table = 0x1001), queue);
        assert_eq!(
            refused(&|s| s.queues.push(s.queues[0])),
            TransportStateError::Queue {
                device: 42,
                queue: 1
            }
        );
        let registers = TransportStateError::Registers(42);
        assert_eq!(
            refused(&|s| s.status = STATUS_ACKNOWLEDGE | STATUS_DRIVER_OK),
            registers
        );
        assert_eq!(refused(&|s| s.acked_features |= 1 << 40), registers);
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>) {
        transport_with(false)
    }

    /// Activations the worker has seen once it caught up.
    fn seen(t: &MmioTransport, count: &AtomicUsize) -> usize {
        assert!(t.worker.sync(std::time::Duration::from_secs(5)));
        count.load(Ordering::SeqCst)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, 1);
        write(
            t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, size: u32) {
        write(t, REG_QUEUE_SEL, 0);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, 0x1000);
        write(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        write(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        write(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn a_driver_that_follows_the_protocol_activates_the_device() {
        let (mut t, activations) = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is offered");
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 16);
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 1);
        assert!(t.is_activated());
        assert_eq!(read(&mut t, REG_QUEUE_READY), 1, "reads back while active");
        let mut config = [0u8; 2];
        t.read(REG_CONFIG + 2, &mut config);
        assert_eq!(config, [3, 4]);
        write(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(read(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_is_not_activated() {
        let (mut t, activations) = transport();
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        // The used ring past the end of the 1 MiB of RAM.
        write(&mut t, REG_QUEUE_DEVICE_LOW, 0x10_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 0);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn out_of_order_status_and_oversized_queues_are_refused() {
        let (mut t, activations) = transport();
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        negotiate(&mut t);
        setup_queue(&mut t, 1024);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(seen(&t, &activations), 0);
        // Queue registers are ignored before FEATURES_OK.
        let (mut t, _) = transport();
        write(&mut t, REG_QUEUE_NUM, 8);
        write(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0);
    }

    #[test]
    fn a_driver_without_version_1_cannot_finish_negotiation() {
        let (mut t, _) = transport();
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_reset_waits_a_bounded_time_and_a_device_reactivates_after_it() {
        let (mut t, activations) = transport();
        for round in 1..=2 {
            negotiate(&mut t);
            setup_queue(&mut t, 16);
            write(&mut t, REG_STATUS, ALL_OK);
            assert_eq!(seen(&t, &activations), round);
            write(&mut t, REG_STATUS, 0);
            assert_eq!(read(&mut t, REG_STATUS), 0);
        }
        // A worker that does not give its queues back in time: the vCPU
        // is released after the bound and the device reports it failed.
        let (mut t, _) = transport_with(true);
        negotiate(&mut t);
        setup_queue(&mut t, 16);
        write(&mut t, REG_STATUS, ALL_OK);
        let started = std::time::Instant::now();
        write(&mut t, REG_STATUS, 0);
        assert!(started.elapsed() < RESET_WAIT * 2);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0);
    }
}
