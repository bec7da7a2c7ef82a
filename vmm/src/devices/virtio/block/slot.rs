//! Spare disk slots: images attached to and detached from a running VM.
//!
//! A pod's VM boots with a few empty, read-only virtio-blk slots. When a
//! container joins the pod, the host attaches the container's rootfs image
//! to a free slot (through the VMM's API, [`crate::api`]) and detaches it
//! once the container is gone. The guest gets a configuration-change
//! interrupt and re-reads the capacity; the image's id is the disk's serial,
//! which is how the agent finds it.
//!
//! ```text
//!   empty ──attach(path, id)──▶ attached(id) ──detach(id)──▶ empty
//! ```

use std::fs::File;
use std::sync::{Arc, Mutex};

use super::ID_LEN;
use super::device::{Backing, BlockError};
use crate::devices::virtio::Interrupt;
use capsid_base::lock;

/// Why an image could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// The id is not a valid disk serial.
    #[error("disk id {0:?}: give 1 to {ID_LEN} letters, digits, '-', '_' or '.'")]
    BadId(String),
    /// The id is attached already.
    #[error("an image with id {0:?} is already attached")]
    Duplicate(String),
    /// Every spare slot is taken.
    #[error("all {0} spare disk slots are in use (the VM was started with --spare-disks {0})")]
    Full(usize),
    /// No image with this id is attached.
    #[error("no image with id {0:?} is attached")]
    NotAttached(String),
    /// The image is not a regular, non-empty file.
    #[error("disk image {0} is not a regular, non-empty file")]
    NotAFile(String),
    /// The image cannot be used as a disk.
    #[error(transparent)]
    Open(#[from] BlockError),
}

/// One spare slot: the device's backing and its interrupt line.
#[derive(Debug)]
pub struct DiskSlot {
    backing: Arc<Mutex<Backing>>,
    interrupt: Arc<Interrupt>,
}

impl DiskSlot {
    /// The slot of a spare device: its backing and the interrupt that tells the driver of a change.
    pub fn new(backing: Arc<Mutex<Backing>>, interrupt: Arc<Interrupt>) -> Self {
        Self { backing, interrupt }
    }

    fn holds(&self, id: &str) -> bool {
        lock(&self.backing).id() == Some(id.as_bytes())
    }

    fn is_empty(&self) -> bool {
        lock(&self.backing).id().is_none()
    }

    fn replace(&self, backing: Backing) {
        lock(&self.backing).replace(backing);
        self.interrupt.signal_config_change();
    }
}

/// The VM's spare slots.
#[derive(Debug, Default)]
pub struct DiskSlots {
    slots: Vec<DiskSlot>,
    /// Serialises attach and detach, so two cannot pick the same slot.
    changing: Mutex<()>,
}

impl DiskSlots {
    /// The VM's spare slots, in device order.
    pub fn new(slots: Vec<DiskSlot>) -> Self {
        Self {
            slots,
            changing: Mutex::new(()),
        }
    }

    /// Attaches the image `file` (opened by the host; `name` is for
    /// messages), read-only, with serial `id`, to the first free slot;
    /// returns the slot's index.
    pub fn attach(&self, file: File, name: &str, id: &str) -> Result<usize, SlotError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if id.is_empty() || id.len() > ID_LEN || !id.chars().all(valid) {
            return Err(SlotError::BadId(id.to_owned()));
        }
        let _changing = lock(&self.changing);
        if self.slots.iter().any(|slot| slot.holds(id)) {
            return Err(SlotError::Duplicate(id.to_owned()));
        }
        let (index, slot) = self
            .slots
            .iter()
            .enumerate()
            .find(|(_, slot)| slot.is_empty())
            .ok_or(SlotError::Full(self.slots.len()))?;
        let backing = Backing::from_file(file, name, Some(id))?;
        if backing.capacity_sectors() == 0 {
            return Err(SlotError::NotAFile(name.to_owned()));
        }
        slot.replace(backing);
        Ok(index)
    }

    /// How many slots hold an image.
    pub fn attached(&self) -> usize {
        self.slots.iter().filter(|slot| !slot.is_empty()).count()
    }

    /// Empties the slot holding `id`; returns its index. The guest must have
    /// stopped using the disk: its further requests fail with IOERR.
    pub fn detach(&self, id: &str) -> Result<usize, SlotError> {
        let _changing = lock(&self.changing);
        let (index, slot) = self
            .slots
            .iter()
            .enumerate()
            .find(|(_, slot)| slot.holds(id))
            .ok_or_else(|| SlotError::NotAttached(id.to_owned()))?;
        slot.replace(Backing::default());
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn open(path: &Path) -> File {
        File::open(path).unwrap()
    }
    use crate::devices::virtio::block::Block;
    use crate::devices::virtio::{INT_CONFIG, VirtioDevice};
    use vmm_sys_util::eventfd::EventFd;

    fn slots(n: usize) -> (DiskSlots, Vec<Block>, Vec<Arc<Interrupt>>) {
        let blocks: Vec<Block> = (0..n).map(|_| Block::spare()).collect();
        let interrupts: Vec<Arc<Interrupt>> = (0..n)
            .map(|_| Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())))
            .collect();
        let slots = blocks
            .iter()
            .zip(&interrupts)
            .map(|(block, irq)| DiskSlot::new(block.backing(), Arc::clone(irq)))
            .collect();
        (DiskSlots::new(slots), blocks, interrupts)
    }

    fn capacity(block: &Block) -> u64 {
        let mut bytes = [0u8; 8];
        block.read_config(0, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn image(sectors: usize) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), vec![7u8; sectors * 512]).unwrap();
        file
    }

    #[test]
    fn attach_and_detach_change_capacity_generation_and_interrupt() {
        let (slots, blocks, irqs) = slots(2);
        assert_eq!(capacity(&blocks[0]), 0);
        assert!(blocks[0].features() & super::super::F_RO != 0);
        let img = image(8);
        let generation = blocks[0].config_generation();
        assert_eq!(slots.attach(open(img.path()), "img", "c1").unwrap(), 0);
        assert_eq!(capacity(&blocks[0]), 8);
        assert_ne!(blocks[0].config_generation(), generation);
        assert_eq!(irqs[0].status() & INT_CONFIG, INT_CONFIG);
        assert_eq!(irqs[1].status(), 0);

        // The next image goes to the next free slot; a detached slot is reused.
        assert_eq!(slots.attach(open(img.path()), "img", "c2").unwrap(), 1);
        assert_eq!(slots.attached(), 2);
        assert_eq!(slots.detach("c1").unwrap(), 0);
        assert_eq!(slots.attached(), 1);
        assert_eq!(capacity(&blocks[0]), 0);
        assert_eq!(slots.attach(open(img.path()), "img", "c3").unwrap(), 0);
        assert_eq!(capacity(&blocks[0]), 8);
    }

    #[test]
    fn bad_requests_are_refused_and_change_nothing() {
        let (slots, blocks, _) = slots(1);
        let img = image(4);
        let dir = tempfile::tempdir().unwrap();
        let empty = image(0);
        let odd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(odd.path(), [1u8; 100]).unwrap();
        for (path, id, want) in [
            (img.path(), "", "disk id"),
            (img.path(), "a/b", "disk id"),
            (img.path(), "twenty-one-bytes-long", "disk id"),
            (dir.path(), "x", "not a regular"),
            (empty.path(), "x", "not a regular"),
            (odd.path(), "x", "whole number"),
        ] {
            let error = slots
                .attach(open(path), "test", id)
                .unwrap_err()
                .to_string();
            assert!(error.contains(want), "{id:?}: {error}");
            assert_eq!(capacity(&blocks[0]), 0);
        }
        assert!(
            slots
                .detach("nothing")
                .unwrap_err()
                .to_string()
                .contains("no image")
        );
        slots.attach(open(img.path()), "img", "a").unwrap();
        let dup = slots
            .attach(open(img.path()), "img", "a")
            .unwrap_err()
            .to_string();
        assert!(dup.contains("already attached"), "{dup}");
        let full = slots
            .attach(open(img.path()), "img", "b")
            .unwrap_err()
            .to_string();
        assert!(full.contains("all 1 spare disk slots"), "{full}");
    }
}
