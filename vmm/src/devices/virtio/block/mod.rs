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
pub use request::{BlockMetrics, RequestError, process_queue};
pub use slot::{DiskSlot, DiskSlots, SlotError};

/// virtio device ID.
pub const DEVICE_TYPE: u32 = 2;
/// One queue of this many descriptors.
pub const QUEUE_SIZE: u16 = 256;
pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;
/// Length of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Feature bits.
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Status values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
