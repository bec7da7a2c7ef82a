//! The virtio-blk device and its worker.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::request::{BlockMetrics, Disk, process_queue};
use super::{DEVICE_TYPE, F_FLUSH, F_RO, F_SEG_MAX, ID_LEN, QUEUE_SIZE, SECTOR_SHIFT};
use crate::devices::virtio::{
    ActivateContext, ActivateError, EventSetup, Interrupt, Memory, VirtioDevice, Worker,
    read_config_bytes,
};
use capsid_base::lock;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {0}")]
    Open(String, #[source] std::io::Error),
    /// The image's size is not whole sectors.
    #[error("disk image {0} is {1} bytes, not a whole number of 512-byte sectors")]
    Size(String, u64),
    /// The image is not a regular file.
    #[error("disk image {0} is not a regular file")]
    NotAFile(String),
}

/// What a disk slot serves: an image file, or nothing (a spare slot that
/// the host has not attached an image to yet, or detached one from).
#[derive(Debug, Default)]
pub struct Backing {
    file: Option<File>,
    capacity_sectors: u64,
    id: Vec<u8>,
    /// Bumped on every change, so the driver can tell a torn read of the
    /// configuration space (virtio 1.2, 2.5.1).
    generation: u32,
}

impl Backing {
    /// Opens `path`, read-only if asked. `id` is what GET_ID returns.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        Self::from_file(file, &name, id)
    }

    /// Serves an image the caller opened (`name` is for messages). It must
    /// be a regular file of whole sectors.
    pub fn from_file(file: File, name: &str, id: Option<&str>) -> Result<Self, BlockError> {
        let name = name.to_owned();
        let metadata = file
            .metadata()
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        if !metadata.is_file() {
            return Err(BlockError::NotAFile(name));
        }
        let size = metadata.len();
        if size % (1 << SECTOR_SHIFT) != 0 {
            return Err(BlockError::Size(name, size));
        }
        let mut disk_id = id.unwrap_or_default().as_bytes().to_vec();
        disk_id.truncate(ID_LEN);
        Ok(Self {
            file: Some(file),
            capacity_sectors: size >> SECTOR_SHIFT,
            id: disk_id,
            generation: 0,
        })
    }

    /// The serial of the attached image, if there is one.
    pub fn id(&self) -> Option<&[u8]> {
        self.file.as_ref().map(|_| self.id.as_slice())
    }

    pub(crate) fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Puts `other`'s image in this slot (or empties it when `other` is
    /// empty) and bumps the generation.
    pub fn replace(&mut self, other: Backing) {
        let generation = self.generation.wrapping_add(1);
        *self = Backing {
            generation,
            ..other
        };
    }

    fn disk(&self, read_only: bool) -> Disk<'_> {
        Disk {
            file: self.file.as_ref(),
            capacity_sectors: self.capacity_sectors,
            read_only,
            id: &self.id,
        }
    }
}

/// A disk slot as a virtio-blk device. Its [`Backing`] is shared with the
/// VMM's API, which changes it while the guest runs and then raises a
/// configuration-change interrupt; the driver re-reads the capacity.
#[derive(Debug)]
pub struct Block {
    backing: Arc<Mutex<Backing>>,
    read_only: bool,
    worker: Option<BlockWorker>,
}

impl Block {
    /// A disk with `path` attached for the life of the VM.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        Ok(Self::with(
            Arc::new(Mutex::new(Backing::open(path, read_only, id)?)),
            read_only,
        ))
    }

    /// An empty, read-only slot that images are attached to later.
    pub fn spare() -> Self {
        Self::with(Arc::default(), true)
    }

    fn with(backing: Arc<Mutex<Backing>>, read_only: bool) -> Self {
        Self {
            worker: Some(BlockWorker {
                backing: Arc::clone(&backing),
                read_only,
                active: None,
                metrics: BlockMetrics::default(),
            }),
            backing,
            read_only,
        }
    }

    /// What the device reads and writes, shared with its slot.
    pub fn backing(&self) -> Arc<Mutex<Backing>> {
        Arc::clone(&self.backing)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_SEG_MAX | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `capacity` (u64, sectors), `size_max` (u32, unused), `seg_max`
        // (u32: data descriptors per request, the queue less header and status).
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&lock(&self.backing).capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn config_generation(&self) -> u32 {
        lock(&self.backing).generation
    }

    fn take_worker(&mut self) -> Option<Box<dyn Worker>> {
        self.worker
            .take()
            .map(|worker| Box::new(worker) as Box<dyn Worker>)
    }
}

/// The queue the driver set up, while the device is active.
#[derive(Debug)]
struct Active {
    memory: Memory,
    queue: Queue,
    /// The one queue's eventfd is the first.
    queue_evts: Arc<Vec<EventFd>>,
    interrupt: Arc<Interrupt>,
}

impl Active {
    fn queue_evt(&self) -> Option<&EventFd> {
        self.queue_evts.first()
    }
}

/// Serves the disk's queue on the device's worker thread.
#[derive(Debug)]
pub struct BlockWorker {
    backing: Arc<Mutex<Backing>>,
    read_only: bool,
    active: Option<Active>,
    metrics: BlockMetrics,
}

impl Worker for BlockWorker {
    fn activate(
        &mut self,
        ctx: ActivateContext,
        setup: &EventSetup<'_>,
    ) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let (Some(queue), Some(queue_evt)) =
            (ctx.queues.into_iter().next(), ctx.queue_evts.first())
        else {
            return Err(ActivateError::QueueCount { got, want: 1 });
        };
        setup
            .add(queue_evt.as_raw_fd(), 0, EventSet::IN)
            .map_err(ActivateError::Watch)?;
        self.active = Some(Active {
            memory: ctx.memory,
            queue,
            queue_evts: Arc::clone(&ctx.queue_evts),
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn deactivate(&mut self, setup: &EventSetup<'_>) -> Vec<Queue> {
        let Some(active) = self.active.take() else {
            return Vec::new();
        };
        if let Some(evt) = active.queue_evt() {
            setup.remove(evt.as_raw_fd());
        }
        vec![active.queue]
    }

    fn handle(&mut self, _token: u64, _events: EventSet, _setup: &EventSetup<'_>) {
        let Some(active) = &mut self.active else {
            return;
        };
        if let Some(evt) = active.queue_evt() {
            let _ = evt.read();
        }
        let backing = lock(&self.backing);
        if process_queue(
            &mut active.queue,
            active.memory.memory(),
            &backing.disk(self.read_only),
            &mut self.metrics,
        ) {
            active.interrupt.signal_used_queue();
        }
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        let metrics = serde_json::to_string(&self.metrics).unwrap_or_default();
        tracing::info!(metrics = %metrics, "virtio-blk stops");
    }
}
