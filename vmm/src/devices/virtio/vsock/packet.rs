//! The vsock packet header and moving packets through descriptor chains.
//!
//! ```text
//! 0       8       16    20    24    28   30   32    36        40       44
//! src_cid dst_cid src_p dst_p len   type op   flags buf_alloc fwd_cnt  payload…
//! ```
//!
//! A host-bound (TX) chain is read whole into a bounded buffer: a header of
//! 44 bytes, then `len` bytes of payload, `len` at most [`MAX_PAYLOAD`]. A
//! guest-bound (RX) chain must be device-writable and hold at least a header.

use vm_memory::{Address, ByteValued, Bytes, GuestMemoryMmap, Le16, Le32, Le64};

use super::{HEADER_LEN, MAX_PAYLOAD};
use crate::devices::virtio::{Buffer, ChainError};

/// The header as it lies in guest memory (`struct virtio_vsock_hdr`: 44
/// bytes, packed, little-endian), read and written whole through
/// `ByteValued`. Code works on [`Header`], its aligned copy.
#[repr(C, packed)]
#[derive(Clone, Copy, Default)]
struct WireHeader {
    src_cid: Le64,
    dst_cid: Le64,
    src_port: Le32,
    dst_port: Le32,
    len: Le32,
    type_: Le16,
    op: Le16,
    flags: Le32,
    buf_alloc: Le32,
    fwd_cnt: Le32,
}

const _: () = assert!(std::mem::size_of::<WireHeader>() == HEADER_LEN);

// SAFETY: little-endian integers only, packed (no padding); every bit
// pattern is a valid value, and what it means is checked by the muxer.
unsafe impl ByteValued for WireHeader {}

/// The header, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// The sender's context id.
    pub src_cid: u64,
    /// The receiver's context id.
    pub dst_cid: u64,
    /// The sender's port.
    pub src_port: u32,
    /// The receiver's port.
    pub dst_port: u32,
    /// Payload bytes after the header.
    pub len: u32,
    /// The socket type (only `VSOCK_TYPE_STREAM` is served).
    pub type_: u16,
    /// The operation (`VSOCK_OP_*`).
    pub op: u16,
    /// `VSOCK_OP_SHUTDOWN`'s flags (receive, send).
    pub flags: u32,
    /// The sender's receive buffer size (credit).
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this stream (credit).
    pub fwd_cnt: u32,
}

impl Header {
    /// The header in its little-endian wire form.
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let mut wire = WireHeader::default();
        wire.as_mut_slice().copy_from_slice(b);
        Self {
            src_cid: wire.src_cid.into(),
            dst_cid: wire.dst_cid.into(),
            src_port: wire.src_port.into(),
            dst_port: wire.dst_port.into(),
            len: wire.len.into(),
            type_: wire.type_.into(),
            op: wire.op.into(),
            flags: wire.flags.into(),
            buf_alloc: wire.buf_alloc.into(),
            fwd_cnt: wire.fwd_cnt.into(),
        }
    }

    pub(crate) fn to_bytes(self) -> [u8; HEADER_LEN] {
        let wire = WireHeader {
            src_cid: self.src_cid.into(),
            dst_cid: self.dst_cid.into(),
            src_port: self.src_port.into(),
            dst_port: self.dst_port.into(),
            len: self.len.into(),
            type_: self.type_.into(),
            op: self.op.into(),
            flags: self.flags.into(),
            buf_alloc: self.buf_alloc.into(),
            fwd_cnt: self.fwd_cnt.into(),
        };
        let mut b = [0u8; HEADER_LEN];
        b.copy_from_slice(wire.as_slice());
        b
    }
}

/// A TX chain the device cannot take a packet from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    /// The descriptor chain is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A TX buffer the device could write.
    #[error("TX descriptor is device-writable")]
    WritableTx,
    /// An RX buffer the device could only read.
    #[error("RX descriptor is device-readable")]
    ReadableRx,
    /// A buffer outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Shorter than a header.
    #[error("packet of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TruncatedHeader(usize),
    /// The header claims more payload than the chain holds.
    #[error("packet header says {len} payload bytes, the chain holds {available}")]
    TruncatedPayload {
        /// The header's length.
        len: u32,
        /// The bytes the chain holds after the header.
        available: usize,
    },
    /// A payload over the limit.
    #[error("packet payload of {0} bytes is over the {MAX_PAYLOAD}-byte limit")]
    Oversized(u32),
    /// An RX buffer too small for a header.
    #[error("RX buffer of {0} bytes cannot hold a header")]
    SmallRx(usize),
    /// Guest memory cannot be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

fn check(
    buffers: &[Buffer],
    memory: &GuestMemoryMmap,
    writable: bool,
) -> Result<usize, PacketError> {
    let mut total = 0usize;
    for b in buffers {
        if b.writable != writable {
            return Err(if writable {
                PacketError::ReadableRx
            } else {
                PacketError::WritableTx
            });
        }
        if !b.in_memory(memory) {
            return Err(PacketError::OutsideMemory {
                addr: b.addr.0,
                len: b.len,
            });
        }
        total = total.saturating_add(usize::try_from(b.len).unwrap_or(usize::MAX));
    }
    Ok(total)
}

/// Reads `len` bytes starting `skip` bytes into the chain.
fn gather(
    memory: &GuestMemoryMmap,
    buffers: &[Buffer],
    mut skip: usize,
    out: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0;
    for b in buffers {
        let len = usize::try_from(b.len).unwrap_or(0);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        let addr = b.addr.unchecked_add(u64::try_from(skip).unwrap_or(0));
        memory
            .read_slice(&mut out[done..done + n], addr)
            .map_err(|e| PacketError::Memory(e.to_string()))?;
        done += n;
        skip = 0;
        if done == out.len() {
            break;
        }
    }
    Ok(())
}

/// Takes one packet out of a TX chain: the header and its payload.
pub fn read_tx(
    buffers: &[Buffer],
    memory: &GuestMemoryMmap,
) -> Result<(Header, Vec<u8>), PacketError> {
    let total = check(buffers, memory, false)?;
    if total < HEADER_LEN {
        return Err(PacketError::TruncatedHeader(total));
    }
    let mut raw = [0u8; HEADER_LEN];
    gather(memory, buffers, 0, &mut raw)?;
    let header = Header::from_bytes(&raw);
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(PacketError::Oversized(header.len));
    }
    if len > total - HEADER_LEN {
        return Err(PacketError::TruncatedPayload {
            len: header.len,
            available: total - HEADER_LEN,
        });
    }
    let mut payload = vec![0u8; len];
    gather(memory, buffers, HEADER_LEN, &mut payload)?;
    Ok((header, payload))
}

/// How many payload bytes an RX chain can take after the header.
pub fn rx_capacity(buffers: &[Buffer], memory: &GuestMemoryMmap) -> Result<usize, PacketError> {
    let total = check(buffers, memory, true)?;
    total
        .checked_sub(HEADER_LEN)
        .ok_or(PacketError::SmallRx(total))
}

/// Writes a packet into a checked RX chain; returns the bytes written.
pub fn write_rx(
    buffers: &[Buffer],
    memory: &GuestMemoryMmap,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header.to_bytes());
    bytes.extend_from_slice(payload);
    let mut rest = &bytes[..];
    for b in buffers {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(usize::try_from(b.len).unwrap_or(0));
        memory
            .write_slice(&rest[..n], b.addr)
            .map_err(|e| PacketError::Memory(e.to_string()))?;
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        return Err(PacketError::SmallRx(bytes.len() - rest.len()));
    }
    Ok(u32::try_from(bytes.len()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn buf(addr: u64, len: u32, writable: bool) -> Buffer {
        Buffer {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    fn header(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: 1,
            op: 5,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn a_packet_split_across_descriptors_reads_back_whole() {
        let mem = memory();
        let mut bytes = header(5).to_bytes().to_vec();
        bytes.extend_from_slice(b"hello");
        // Header split at 10 bytes, payload in a third descriptor.
        mem.write_slice(&bytes[..10], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&bytes[10..44], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&bytes[44..], GuestAddress(0x3000)).unwrap();
        let chain = [
            buf(0x1000, 10, false),
            buf(0x2000, 34, false),
            buf(0x3000, 5, false),
        ];
        let (h, payload) = read_tx(&chain, &mem).unwrap();
        assert_eq!(h, header(5));
        assert_eq!(payload, b"hello");
    }

    #[test]
    fn truncated_oversized_and_misdirected_packets_are_refused() {
        let mem = memory();
        mem.write_slice(&header(100).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_tx(&[buf(0x1000, 20, false)], &mem),
            Err(PacketError::TruncatedHeader(20))
        );
        assert_eq!(
            read_tx(&[buf(0x1000, 44 + 10, false)], &mem),
            Err(PacketError::TruncatedPayload {
                len: 100,
                available: 10
            })
        );
        mem.write_slice(&header(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_tx(&[buf(0x1000, 0xf000, false)], &mem),
            Err(PacketError::Oversized(u32::MAX))
        );
        assert_eq!(
            read_tx(&[buf(0x1000, 44, true)], &mem),
            Err(PacketError::WritableTx)
        );
        assert!(matches!(
            read_tx(&[buf(0xf_fff0, 44, false)], &mem),
            Err(PacketError::OutsideMemory { .. })
        ));
        assert_eq!(
            rx_capacity(&[buf(0x1000, 40, true)], &mem),
            Err(PacketError::SmallRx(40))
        );
        assert_eq!(
            rx_capacity(&[buf(0x1000, 40, false)], &mem),
            Err(PacketError::ReadableRx)
        );
    }

    #[test]
    fn an_rx_packet_fills_the_chain_in_order() {
        let mem = memory();
        let chain = [buf(0x1000, 30, true), buf(0x2000, 100, true)];
        assert_eq!(rx_capacity(&chain, &mem), Ok(86));
        let written = write_rx(&chain, &mem, &header(3), b"abc").unwrap();
        assert_eq!(written, 47);
        let mut raw = [0u8; 44];
        mem.read_slice(&mut raw[..30], GuestAddress(0x1000))
            .unwrap();
        mem.read_slice(&mut raw[30..], GuestAddress(0x2000))
            .unwrap();
        assert_eq!(Header::from_bytes(&raw), header(3));
        let mut payload = [0u8; 3];
        mem.read_slice(&mut payload, GuestAddress(0x200e)).unwrap();
        assert_eq!(&payload, b"abc");
    }
}
