//! virtio-vsock (virtio 1.2, 5.10) with its host side on Unix sockets, the
//! "hybrid vsock" of Firecracker and Cloud Hypervisor:
//!
//! ```text
//! host connects:  client ──connect──▶ <uds>   "CONNECT <port>\n" ──▶ REQUEST to guest port
//!                 client ◀── "OK <hostport>\n" ◀── RESPONSE from the guest
//! guest connects: guest REQUEST to CID 2, port P ──▶ connect <uds>_P ──▶ RESPONSE (or RST)
//! ```
//!
//! Then bytes flow both ways as RW packets, with credit-based flow control:
//! each side advertises its buffer (`buf_alloc`) and how much it has consumed
//! (`fwd_cnt`), and never sends more than the other can hold. The pieces:
//! [`packet`] (headers, reading and writing chains), [`connection`] (one
//! connection's protocol state machine, pure), [`muxer`] (routing, host
//! sockets and their epoll interest), [`device`] (the virtio device).

mod connection;
mod device;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockError};

/// virtio device ID.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
/// Size of each of the three queues: guest-bound packets (RX), host-bound
/// packets (TX), events, in that order.
pub const QUEUE_SIZE: u16 = 256;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Header length on the wire.
pub const HEADER_LEN: usize = 44;
/// The largest payload of one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: usize = 64 << 10;
/// The receive buffer we advertise per connection (guest to host).
pub const CONN_BUF_ALLOC: u32 = 256 << 10;
/// At most this many connections at once; more are refused with RST.
pub const MAX_CONNECTIONS: usize = 256;

/// `type`: stream sockets only.
pub const TYPE_STREAM: u16 = 1;

/// `op` values.
pub const OP_REQUEST: u16 = 1;
pub(crate) const OP_RESPONSE: u16 = 2;
pub(crate) const OP_RST: u16 = 3;
pub(crate) const OP_SHUTDOWN: u16 = 4;
pub(crate) const OP_RW: u16 = 5;
pub(crate) const OP_CREDIT_UPDATE: u16 = 6;
pub(crate) const OP_CREDIT_REQUEST: u16 = 7;

/// The event-queue event that tells the driver its connections are gone
/// (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`), sent after a restore: the guest
/// resets every connected socket and keeps its listeners.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `flags` of OP_SHUTDOWN.
pub const SHUTDOWN_RCV: u32 = 1;
pub(crate) const SHUTDOWN_SEND: u32 = 2;
