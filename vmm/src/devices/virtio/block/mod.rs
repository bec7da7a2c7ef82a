//! virtio-blk (virtio 1.2, 5.2): a raw disk image file.
//!
//! Request layout, as the driver chains it:
//!
//! ```text
//! [ header: type u32, reserved u32, sector u64 ]  device-readable, 16 bytes
//! [ data ... ]                                    readable (OUT) or writable (IN, GET_ID)
//! [ status u8 ]                                   device-writable, last
//! ```

mod device;
mod request;
mod slot;

pub use device::{Backing, Block, BlockError};
pub use request::{BlockMetrics, Disk, RequestError, process_queue};
pub use slot::{DiskSlot, DiskSlots, SlotError};

use virtio_bindings::bindings::virtio_blk as wire;

/// virtio device ID.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// One queue of this many descriptors.
pub const QUEUE_SIZE: u16 = 256;
pub(crate) const SECTOR_SIZE: u64 = 512;
pub(crate) const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = wire::VIRTIO_BLK_ID_BYTES as usize;

/// Feature bits.
pub const F_SEG_MAX: u64 = 1 << wire::VIRTIO_BLK_F_SEG_MAX;
pub(crate) const F_RO: u64 = 1 << wire::VIRTIO_BLK_F_RO;
pub(crate) const F_FLUSH: u64 = 1 << wire::VIRTIO_BLK_F_FLUSH;

/// Request types.
pub const T_IN: u32 = wire::VIRTIO_BLK_T_IN;
pub(crate) const T_OUT: u32 = wire::VIRTIO_BLK_T_OUT;
pub(crate) const T_FLUSH: u32 = wire::VIRTIO_BLK_T_FLUSH;
pub(crate) const T_GET_ID: u32 = wire::VIRTIO_BLK_T_GET_ID;

/// Status values (one byte on the wire; the bindings' values all fit).
#[allow(clippy::cast_possible_truncation)]
pub const S_OK: u8 = wire::VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const S_IOERR: u8 = wire::VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const S_UNSUPP: u8 = wire::VIRTIO_BLK_S_UNSUPP as u8;
