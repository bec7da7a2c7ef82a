//! virtio-net (virtio 1.2, 5.1): one receive and one transmit queue, the
//! other end a tap the launcher opened.
//!
//! Every frame on either queue starts with a 12-byte header (virtio 1.x
//! always has `num_buffers`), which the tap speaks too (`IFF_VNET_HDR`,
//! header size 12), so frames pass between queue and tap unchanged but for
//! `num_buffers`:
//!
//! ```text
//! [ flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16 | num_buffers u16 ]
//! [ Ethernet frame ... ]
//! ```
//!
//! transmit (guest → tap): one device-readable chain per frame; the header
//! is checked against what was negotiated ([`frames`]) before the frame is
//! written to the tap. receive (tap → guest): a frame read from the tap is
//! written over one device-writable chain, or over several with
//! `VIRTIO_NET_F_MRG_RXBUF` (`num_buffers` says how many). A guest that
//! posts no receive buffers leaves one frame waiting in the device and the
//! rest in the tap's own queue, whose length the host bounds.

mod device;
mod frames;
mod tap;

pub use device::{Net, NetError};
pub use frames::{FrameIo, NetMetrics, Rx, process_tx};
pub use tap::{Tap, TapError};

use virtio_bindings::virtio_net as wire;
use vm_memory::{ByteValued, Le16};

/// virtio device ID.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
/// Each queue holds this many descriptors.
pub const QUEUE_SIZE: u16 = 256;
/// Queue indices.
pub const RX_QUEUE: usize = 0;
/// See [`RX_QUEUE`].
pub const TX_QUEUE: usize = 1;

/// The header's size on both queues and on the tap.
pub const HEADER_LEN: usize = 12;
/// An Ethernet header: the shortest frame we pass on.
pub const ETH_HLEN: usize = 14;
/// The longest frame with its header, either way: a 64 KiB GSO frame and
/// its Ethernet header (Firecracker's bound too).
pub const MAX_FRAME_WITH_HEADER: usize = HEADER_LEN + 65550;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Feature bits.
pub const F_CSUM: u64 = bit(wire::VIRTIO_NET_F_CSUM);
/// The driver takes frames with a partial checksum.
pub const F_GUEST_CSUM: u64 = bit(wire::VIRTIO_NET_F_GUEST_CSUM);
/// `mtu` in the configuration space is valid.
pub const F_MTU: u64 = bit(wire::VIRTIO_NET_F_MTU);
/// `mac` in the configuration space is valid.
pub const F_MAC: u64 = bit(wire::VIRTIO_NET_F_MAC);
/// The driver takes TCP segmentation offload frames (IPv4).
pub const F_GUEST_TSO4: u64 = bit(wire::VIRTIO_NET_F_GUEST_TSO4);
/// The driver takes TCP segmentation offload frames (IPv6).
pub const F_GUEST_TSO6: u64 = bit(wire::VIRTIO_NET_F_GUEST_TSO6);
/// The device takes TCP segmentation offload frames (IPv4).
pub const F_HOST_TSO4: u64 = bit(wire::VIRTIO_NET_F_HOST_TSO4);
/// The device takes TCP segmentation offload frames (IPv6).
pub const F_HOST_TSO6: u64 = bit(wire::VIRTIO_NET_F_HOST_TSO6);
/// Receive frames may span several chains.
pub const F_MRG_RXBUF: u64 = bit(wire::VIRTIO_NET_F_MRG_RXBUF);

/// Header flags and GSO types (one byte each on the wire).
#[allow(clippy::cast_possible_truncation)]
pub(crate) const HDR_F_NEEDS_CSUM: u8 = wire::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const GSO_NONE: u8 = wire::VIRTIO_NET_HDR_GSO_NONE as u8;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const GSO_TCPV4: u8 = wire::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
#[allow(clippy::cast_possible_truncation)]
pub(crate) const GSO_TCPV6: u8 = wire::VIRTIO_NET_HDR_GSO_TCPV6 as u8;

/// The header as both the driver and the tap lay it out
/// (`struct virtio_net_hdr_v1`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Bytes of headers before the segmented payload.
    pub hdr_len: Le16,
    /// The payload of each segment.
    pub gso_size: Le16,
    /// Where checksumming starts.
    pub csum_start: Le16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: Le16,
    /// The chains a received frame spans.
    pub num_buffers: Le16,
}

// SAFETY: two bytes and five little-endian u16s, 12 bytes with no padding;
// every bit pattern is a valid value.
unsafe impl ByteValued for NetHeader {}

const _: () = assert!(std::mem::size_of::<NetHeader>() == HEADER_LEN);
