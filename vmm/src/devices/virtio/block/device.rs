//! The virtio-blk device and its worker.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::request::{BlockMetrics, Disk, process_queue};
use super::{DEVICE_TYPE, F_FLUSH, F_RO, F_SEG_MAX, ID_LEN, QUEUE_SIZE, SECTOR_SHIFT};
use crate::devices::virtio::worker::EventSetup;
use crate::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, Memory, VirtioDevice, Worker, WorkerHandle,
    read_config_bytes,
};

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {0}")]
    Open(String, #[source] std::io::Error),
    #[error("disk image {0} is {1} bytes, not a whole number of 512-byte sectors")]
    Size(String, u64),
}

/// A raw disk image as a virtio-blk device.
#[derive(Debug)]
pub struct Block {
    file: Option<File>,
    capacity_sectors: u64,
    read_only: bool,
    id: Vec<u8>,
    /// The configuration space: `capacity` (u64, sectors), `size_max` (u32),
    /// `seg_max` (u32).
    config: [u8; 16],
}

impl Block {
    /// Opens `path`, read-only if asked. `id` is what GET_ID returns.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        let name = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(name.clone(), e))?;
        let size = file
            .metadata()
            .map_err(|e| BlockError::Open(name.clone(), e))?
            .len();
        if size % (1 << SECTOR_SHIFT) != 0 {
            return Err(BlockError::Size(name, size));
        }
        let capacity_sectors = size >> SECTOR_SHIFT;
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        // seg_max: data descriptors per request (the queue less header and status).
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        let mut disk_id = id.unwrap_or_default().as_bytes().to_vec();
        disk_id.truncate(ID_LEN);
        Ok(Self {
            file: Some(file),
            capacity_sectors,
            read_only,
            id: disk_id,
            config,
        })
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
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<WorkerHandle, ActivateError> {
        let got = ctx.queues.len();
        let (Some(queue), Some(queue_evt)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_evts.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount { got, want: 1 });
        };
        let file = self
            .file
            .take()
            .ok_or_else(|| ActivateError::Setup("the disk was already activated once".into()))?;
        let worker = BlockWorker {
            memory: ctx.memory,
            queue,
            queue_evt,
            interrupt: ctx.interrupt,
            file,
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: self.id.clone(),
            metrics: BlockMetrics::default(),
        };
        Ok(WorkerHandle::spawn("virtio-blk", worker)?)
    }
}

struct BlockWorker {
    memory: Memory,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: std::sync::Arc<Interrupt>,
    file: File,
    capacity_sectors: u64,
    read_only: bool,
    id: Vec<u8>,
    metrics: BlockMetrics,
}

impl Worker for BlockWorker {
    fn init(&mut self, setup: &EventSetup<'_>) -> std::io::Result<()> {
        setup.add(self.queue_evt.as_raw_fd(), 0, EventSet::IN)
    }

    fn handle(&mut self, _token: u64, _events: EventSet, _setup: &EventSetup<'_>) {
        let _ = self.queue_evt.read();
        let disk = Disk {
            file: &self.file,
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: &self.id,
        };
        if process_queue(
            &mut self.queue,
            self.memory.memory(),
            &disk,
            &mut self.metrics,
        ) {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        let metrics = serde_json::to_string(&self.metrics).unwrap_or_default();
        tracing::info!(metrics = %metrics, "virtio-blk stops");
    }
}
