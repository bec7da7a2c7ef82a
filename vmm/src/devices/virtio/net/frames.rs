//! Frame processing: pure code over `virtio-queue` queues and a
//! [`FrameIo`] (the tap, or a fake in tests), so that hostile queues are
//! tested without KVM or a tap.
//!
//! Parse, then act. Transmit: a chain is read once ([`read_chain`]), must
//! be device-readable buffers in guest memory adding up to a header and an
//! Ethernet frame of at most [`MAX_FRAME_WITH_HEADER`] bytes, and its
//! header must ask only for what was negotiated (a checksum inside the
//! frame, segmentation only of the kinds the driver acknowledged); only
//! then are its bytes copied out and written to the tap. A refused frame
//! is dropped, counted and logged (rate-limited); its chain goes back with
//! length 0 and the queue keeps going.
//!
//! Receive: a frame read from the tap waits in [`Rx`] until the guest has
//! posted enough device-writable buffers for it. Chains popped for it are
//! held (at most a queue's worth) until the frame fits, so a guest that
//! stops posting buffers costs one frame of memory; the tap's own queue,
//! whose length the host bounds, holds the rest, and drops what overflows.
//! A chain the device cannot write into goes back with length 0.

use std::collections::VecDeque;
use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{
    ETH_HLEN, F_CSUM, F_HOST_TSO4, F_HOST_TSO6, GSO_NONE, GSO_TCPV4, GSO_TCPV6, HDR_F_NEEDS_CSUM,
    HEADER_LEN, MAX_FRAME_WITH_HEADER, NetHeader,
};
use crate::devices::virtio::{Buffer, ChainError, add_used, read_chain};

/// The other end of the device: frames with their 12-byte header.
pub trait FrameIo {
    /// Reads one frame into `buf`; `WouldBlock` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Counters, exported with the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct NetMetrics {
    pub(crate) rx_frames: u64,
    pub(crate) rx_bytes: u64,
    /// Frames from the tap that no posted buffer could hold.
    pub(crate) rx_dropped: u64,
    pub(crate) tx_frames: u64,
    pub(crate) tx_bytes: u64,
    /// Frames from the guest refused, or that the tap did not take.
    pub(crate) tx_dropped: u64,
    /// Chains the device could not use at all.
    pub(crate) invalid_chains: u64,
}

/// A frame or a chain the device refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The descriptor chain is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A buffer outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A buffer faces the wrong way for its queue.
    #[error("a {0} chain has a buffer facing the wrong way")]
    Direction(&'static str),
    /// A receive chain with no room at all.
    #[error("receive chain has no room")]
    Empty,
    /// Shorter than a header and an Ethernet header.
    #[error("frame of {0} bytes (header included) is shorter than {min}", min = HEADER_LEN + ETH_HLEN)]
    TooShort(usize),
    /// Longer than the longest frame.
    #[error("frame of {0} bytes (header included) is longer than {MAX_FRAME_WITH_HEADER}")]
    TooLong(u64),
    /// Header flags the device does not take.
    #[error("header flags {0:#x} ask for what was not negotiated")]
    Flags(u8),
    /// A segmentation type that was not negotiated.
    #[error("header asks for segmentation type {0:#x}, which was not negotiated")]
    Gso(u8),
    /// A segmented frame without what segmentation needs.
    #[error(
        "segmented frame with gso_size {gso_size}, hdr_len {hdr_len} and flags {flags:#x} in {len} bytes"
    )]
    GsoFields {
        /// The segment size.
        gso_size: u16,
        /// The headers' length.
        hdr_len: u16,
        /// The header's flags.
        flags: u8,
        /// The frame's length.
        len: usize,
    },
    /// A checksum position outside the frame.
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    Checksum {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame's length.
        len: usize,
    },
    /// Guest memory cannot be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

/// A chain's buffers, checked: all facing one way and in guest memory.
fn checked_chain(
    queue: &Queue,
    chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    writable: bool,
) -> Result<Vec<Buffer>, FrameError> {
    let buffers = read_chain(queue, chain)?;
    for buffer in &buffers {
        if buffer.writable != writable {
            return Err(FrameError::Direction(if writable {
                "receive"
            } else {
                "transmit"
            }));
        }
        if !buffer.in_memory(memory) {
            return Err(FrameError::OutsideMemory {
                addr: buffer.addr.0,
                len: buffer.len,
            });
        }
    }
    Ok(buffers)
}

/// Checks a transmit header against the frame after it (`len` bytes) and
/// the features the driver acknowledged.
pub(crate) fn check_tx_header(
    header: &NetHeader,
    len: usize,
    acked: u64,
) -> Result<(), FrameError> {
    let needs_csum = header.flags & HDR_F_NEEDS_CSUM != 0;
    if header.flags & !HDR_F_NEEDS_CSUM != 0 || (needs_csum && acked & F_CSUM == 0) {
        return Err(FrameError::Flags(header.flags));
    }
    if needs_csum {
        let (start, offset) = (
            header.csum_start.to_native(),
            header.csum_offset.to_native(),
        );
        if usize::from(start) + usize::from(offset) + 2 > len {
            return Err(FrameError::Checksum { start, offset, len });
        }
    }
    let allowed = match header.gso_type {
        GSO_NONE => return Ok(()),
        GSO_TCPV4 => acked & F_HOST_TSO4 != 0,
        GSO_TCPV6 => acked & F_HOST_TSO6 != 0,
        _ => false,
    };
    if !allowed {
        return Err(FrameError::Gso(header.gso_type));
    }
    let (gso_size, hdr_len) = (header.gso_size.to_native(), header.hdr_len.to_native());
    if gso_size == 0 || !needs_csum || usize::from(hdr_len) > len {
        return Err(FrameError::GsoFields {
            gso_size,
            hdr_len,
            flags: header.flags,
            len,
        });
    }
    Ok(())
}

/// Copies a transmit chain into `frame` and checks it.
fn parse_tx(
    buffers: &[Buffer],
    memory: &GuestMemoryMmap,
    acked: u64,
    frame: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let total: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
    let len = usize::try_from(total)
        .ok()
        .filter(|len| *len <= MAX_FRAME_WITH_HEADER)
        .ok_or(FrameError::TooLong(total))?;
    if len < HEADER_LEN + ETH_HLEN {
        return Err(FrameError::TooShort(len));
    }
    frame.clear();
    frame.resize(len, 0);
    let mut at = 0;
    for buffer in buffers {
        let n = usize::try_from(buffer.len).unwrap_or(0);
        memory
            .read_slice(&mut frame[at..at + n], buffer.addr)
            .map_err(|e| FrameError::Memory(e.to_string()))?;
        at += n;
    }
    // Read from our copy: the guest cannot change it after the check.
    let mut header = NetHeader::default();
    vm_memory::ByteValued::as_mut_slice(&mut header).copy_from_slice(&frame[..HEADER_LEN]);
    check_tx_header(&header, len - HEADER_LEN, acked)
}

/// What a transmit or receive pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The driver must be interrupted.
    pub notify: bool,
    /// The budget ran out with work left: serve the queue again.
    pub more: bool,
}

/// Sends up to `budget` available transmit chains to `io`. `frame` is the
/// reusable copy buffer.
pub fn process_tx(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    io: &mut dyn FrameIo,
    acked: u64,
    metrics: &mut NetMetrics,
    frame: &mut Vec<u8>,
    budget: usize,
) -> Pass {
    let mut used_any = false;
    for _ in 0..budget {
        let Some(chain) = queue.pop_descriptor_chain(memory) else {
            return Pass {
                notify: used_any && queue.needs_notification(memory).unwrap_or(true),
                more: false,
            };
        };
        let head = chain.head_index();
        let parsed = checked_chain(queue, &chain, memory, false)
            .and_then(|buffers| parse_tx(&buffers, memory, acked, frame));
        match parsed {
            Ok(()) => match io.send(frame) {
                Ok(()) => {
                    metrics.tx_frames += 1;
                    metrics.tx_bytes += u64::try_from(frame.len() - HEADER_LEN).unwrap_or(0);
                }
                Err(e) => {
                    metrics.tx_dropped += 1;
                    crate::guest_warn!("virtio-net: the tap did not take a frame: {e}");
                }
            },
            Err(e) => {
                metrics.tx_dropped += 1;
                crate::guest_warn!("virtio-net: transmit: {e}");
            }
        }
        add_used(queue, memory, head, 0);
        used_any = true;
    }
    Pass {
        notify: used_any && queue.needs_notification(memory).unwrap_or(true),
        more: true,
    }
}

/// A receive chain held for the frame that waits.
#[derive(Debug)]
struct RxChain {
    head: u16,
    buffers: Vec<Buffer>,
    capacity: usize,
}

/// What became of the waiting frame.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    Dropped,
    /// Not enough buffers yet: it keeps waiting.
    NoRoom,
}

/// The receive side: the frame read from the tap that waits for buffers,
/// and the chains held for it.
#[derive(Debug)]
pub struct Rx {
    frame: Vec<u8>,
    /// Bytes of `frame` that wait (0: none).
    pending: usize,
    held: VecDeque<RxChain>,
}

impl Default for Rx {
    fn default() -> Self {
        Self {
            frame: vec![0; MAX_FRAME_WITH_HEADER],
            pending: 0,
            held: VecDeque::new(),
        }
    }
}

impl Rx {
    /// Forgets the waiting frame and the held chains (a device reset).
    pub fn reset(&mut self) {
        self.pending = 0;
        self.held.clear();
    }

    /// Whether a frame waits for buffers.
    pub fn waiting(&self) -> bool {
        self.pending > 0
    }

    /// Moves up to `budget` frames from `io` into the guest's receive
    /// buffers; `mergeable` when the driver acknowledged
    /// `VIRTIO_NET_F_MRG_RXBUF`. Stops early when `io` has no frame left
    /// (`more` false) or the guest no buffer (`more` false, [`Rx::waiting`]).
    pub fn process(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        io: &mut dyn FrameIo,
        mergeable: bool,
        metrics: &mut NetMetrics,
        budget: usize,
    ) -> Pass {
        let mut used_any = false;
        let mut more = true;
        for _ in 0..budget {
            if self.pending == 0 {
                match io.recv(&mut self.frame) {
                    Ok(n) if n < HEADER_LEN + ETH_HLEN => {
                        metrics.rx_dropped += 1;
                        continue;
                    }
                    Ok(n) => self.pending = n.min(self.frame.len()),
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            tracing::warn!("virtio-net: cannot read from the tap: {e}");
                        }
                        more = false;
                        break;
                    }
                }
            }
            match self.deliver(queue, memory, mergeable, metrics, &mut used_any) {
                Delivery::Delivered | Delivery::Dropped => self.pending = 0,
                Delivery::NoRoom => {
                    more = false;
                    break;
                }
            }
        }
        Pass {
            notify: used_any && queue.needs_notification(memory).unwrap_or(true),
            more,
        }
    }

    /// Pops the next chain the device can write into; chains it cannot are
    /// given back empty.
    fn pop_chain(
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        metrics: &mut NetMetrics,
        used_any: &mut bool,
    ) -> Option<RxChain> {
        loop {
            let chain = queue.pop_descriptor_chain(memory)?;
            let head = chain.head_index();
            let checked = checked_chain(queue, &chain, memory, true).and_then(|buffers| {
                let capacity: u64 = buffers.iter().map(|b| u64::from(b.len)).sum();
                match usize::try_from(capacity) {
                    Ok(capacity) if capacity > 0 => Ok(RxChain {
                        head,
                        buffers,
                        capacity,
                    }),
                    _ => Err(FrameError::Empty),
                }
            });
            match checked {
                Ok(chain) => return Some(chain),
                Err(e) => {
                    metrics.invalid_chains += 1;
                    crate::guest_warn!("virtio-net: receive: {e}");
                    add_used(queue, memory, head, 0);
                    *used_any = true;
                }
            }
        }
    }

    fn deliver(
        &mut self,
        queue: &mut Queue,
        memory: &GuestMemoryMmap,
        mergeable: bool,
        metrics: &mut NetMetrics,
        used_any: &mut bool,
    ) -> Delivery {
        let len = self.pending;
        let limit = if mergeable {
            usize::from(queue.size())
        } else {
            1
        };
        while self.held.iter().map(|c| c.capacity).sum::<usize>() < len {
            if self.held.len() >= limit {
                // The held chains cannot take this frame; smaller ones may fit.
                metrics.rx_dropped += 1;
                crate::guest_warn!(
                    "virtio-net: a {len}-byte frame does not fit the guest's receive buffers; dropped"
                );
                return Delivery::Dropped;
            }
            match Self::pop_chain(queue, memory, metrics, used_any) {
                Some(chain) => self.held.push_back(chain),
                None => return Delivery::NoRoom,
            }
        }
        // The fewest chains that hold the frame, and how many: the header's
        // `num_buffers`.
        let mut room = 0;
        let chains = self
            .held
            .iter()
            .take_while(|c| {
                let before = room;
                room += c.capacity;
                before < len
            })
            .count();
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        self.frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut at = 0;
        for chain in self.held.drain(..chains) {
            let start = at;
            for buffer in &chain.buffers {
                let n = (len - at).min(usize::try_from(buffer.len).unwrap_or(0));
                if n == 0 {
                    break;
                }
                if let Err(e) = memory.write_slice(&self.frame[at..at + n], buffer.addr) {
                    crate::guest_warn!("virtio-net: receive: cannot write guest memory: {e}");
                    break;
                }
                at += n;
            }
            let written = u32::try_from(at - start).unwrap_or(0);
            add_used(queue, memory, chain.head, written);
            *used_any = true;
        }
        metrics.rx_frames += 1;
        metrics.rx_bytes += u64::try_from(len - HEADER_LEN).unwrap_or(0);
        Delivery::Delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap, Le16};

    use super::super::{F_MRG_RXBUF, GSO_TCPV6};

    const DATA: u64 = 0x10_0000;
    const MEM: u64 = 0x40_0000;
    const NEXT: u16 = 1; // VRING_DESC_F_NEXT
    const W: u16 = 2; // VRING_DESC_F_WRITE
    const ALL: u64 = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_MRG_RXBUF;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(MEM).unwrap())]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// A tap stand-in: frames to hand out, frames taken.
    #[derive(Default)]
    struct FakeTap {
        incoming: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
        refuse: bool,
    }

    impl FrameIo for FakeTap {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self
                .incoming
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }

        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            if self.refuse {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.sent.push(frame.to_vec());
            Ok(())
        }
    }

    /// A frame as the tap hands it: a header (num_buffers 0) and `len`
    /// bytes of a pattern starting at `seed`.
    fn tap_frame(len: usize, seed: u8) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend((0..len).map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap())));
        frame
    }

    fn header(flags: u8, gso_type: u8, gso_size: u16, csum: (u16, u16)) -> NetHeader {
        NetHeader {
            flags,
            gso_type,
            hdr_len: Le16::from(54),
            gso_size: Le16::from(gso_size),
            csum_start: Le16::from(csum.0),
            csum_offset: Le16::from(csum.1),
            num_buffers: Le16::from(0),
        }
    }

    /// Writes a transmit frame (header, then `len` pattern bytes) at `addr`.
    fn put_tx_frame(mem: &GuestMemoryMmap, addr: u64, header: NetHeader, len: usize) -> Vec<u8> {
        let mut frame = header.as_slice().to_vec();
        frame.extend((0..len).map(|i| u8::try_from(i % 253).unwrap()));
        mem.write_slice(&frame, GuestAddress(addr)).unwrap();
        frame
    }

    fn used(mock: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let entry = mock.used().ring().ref_at(i).unwrap().load();
        (entry.id(), entry.len())
    }

    fn used_count(mock: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mock.used().idx().load()
    }

    #[test]
    fn a_frame_split_over_descriptors_reaches_the_tap_whole() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let frame = put_tx_frame(&mem, DATA, header(0, GSO_NONE, 0, (0, 0)), 100);
        // The header alone, then the frame in two pieces.
        mock.add_desc_chains(
            &[
                desc(DATA, 12, NEXT, 1),
                desc(DATA + 12, 40, NEXT, 2),
                desc(DATA + 52, 60, 0, 0),
            ],
            0,
        )
        .unwrap();
        let (mut tap, mut metrics, mut buf) =
            (FakeTap::default(), NetMetrics::default(), Vec::new());
        let pass = process_tx(&mut queue, &mem, &mut tap, ALL, &mut metrics, &mut buf, 64);
        assert!(pass.notify && !pass.more);
        assert_eq!(tap.sent, vec![frame]);
        assert_eq!(used(&mock, 0), (0, 0));
        assert_eq!(
            (metrics.tx_frames, metrics.tx_bytes, metrics.tx_dropped),
            (1, 100, 0)
        );
    }

    #[test]
    fn headers_asking_for_what_was_not_negotiated_are_refused() {
        let ok = |h: NetHeader, len: usize, acked: u64| check_tx_header(&h, len, acked);
        let csum = HDR_F_NEEDS_CSUM;
        assert_eq!(ok(header(0, GSO_NONE, 0, (0, 0)), 60, 0), Ok(()));
        assert_eq!(ok(header(csum, GSO_NONE, 0, (34, 16)), 60, F_CSUM), Ok(()));
        assert_eq!(
            ok(header(csum, GSO_TCPV4, 1448, (34, 16)), 3000, ALL),
            Ok(())
        );
        assert_eq!(
            ok(header(csum, GSO_TCPV6, 1428, (54, 16)), 3000, ALL),
            Ok(())
        );
        for (h, len, acked, want) in [
            // A checksum the driver may not ask for, or outside the frame.
            (
                header(csum, GSO_NONE, 0, (34, 16)),
                60,
                0,
                FrameError::Flags(csum),
            ),
            (
                header(csum, GSO_NONE, 0, (50, 10)),
                60,
                F_CSUM,
                FrameError::Checksum {
                    start: 50,
                    offset: 10,
                    len: 60,
                },
            ),
            (
                header(csum, GSO_NONE, 0, (u16::MAX, u16::MAX)),
                60,
                F_CSUM,
                FrameError::Checksum {
                    start: u16::MAX,
                    offset: u16::MAX,
                    len: 60,
                },
            ),
            // Flags the device never takes (DATA_VALID is the device's to set).
            (
                header(2, GSO_NONE, 0, (0, 0)),
                60,
                ALL,
                FrameError::Flags(2),
            ),
            (
                header(0x80, GSO_NONE, 0, (0, 0)),
                60,
                ALL,
                FrameError::Flags(0x80),
            ),
            // Segmentation not negotiated, of an unknown kind, UDP, or ECN.
            (
                header(csum, GSO_TCPV4, 1448, (34, 16)),
                3000,
                F_CSUM,
                FrameError::Gso(GSO_TCPV4),
            ),
            (
                header(csum, GSO_TCPV6, 1448, (54, 16)),
                3000,
                F_CSUM | F_HOST_TSO4,
                FrameError::Gso(GSO_TCPV6),
            ),
            (
                header(csum, 3, 1448, (34, 6)),
                3000,
                ALL,
                FrameError::Gso(3),
            ),
            (
                header(csum, 0x81, 1448, (34, 16)),
                3000,
                ALL,
                FrameError::Gso(0x81),
            ),
            (
                header(csum, 9, 1448, (34, 16)),
                3000,
                ALL,
                FrameError::Gso(9),
            ),
        ] {
            assert_eq!(ok(h, len, acked), Err(want), "{h:?}");
        }
        // Segmentation without a segment size or a checksum, or with headers
        // longer than the frame.
        for h in [
            header(csum, GSO_TCPV4, 0, (34, 16)),
            header(0, GSO_TCPV4, 1448, (0, 0)),
            NetHeader {
                hdr_len: Le16::from(4000),
                ..header(csum, GSO_TCPV4, 1448, (34, 16))
            },
        ] {
            assert!(
                matches!(ok(h, 3000, ALL), Err(FrameError::GsoFields { .. })),
                "{h:?}"
            );
        }
    }

    #[test]
    fn hostile_transmit_chains_are_dropped_and_the_queue_keeps_going() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let good = put_tx_frame(&mem, DATA, header(0, GSO_NONE, 0, (0, 0)), 60);
        put_tx_frame(&mem, DATA + 0x1000, header(0x40, GSO_NONE, 0, (0, 0)), 60);
        let chains = [
            // A device-writable buffer in a transmit chain.
            desc(DATA, 72, W, 0),
            // Outside guest memory, and wrapping around the address space.
            desc(MEM - 8, 72, 0, 0),
            desc(u64::MAX - 4, 72, 0, 0),
            // Shorter than a header and an Ethernet header.
            desc(DATA, 12 + 13, 0, 0),
            // Longer than the longest frame.
            desc(
                DATA,
                u32::try_from(MAX_FRAME_WITH_HEADER).unwrap() + 1,
                0,
                0,
            ),
            // A header with flags the device does not take.
            desc(DATA + 0x1000, 72, 0, 0),
            // Then a good one.
            desc(DATA, 72, 0, 0),
        ];
        mock.add_desc_chains(&chains, 0).unwrap();
        let (mut tap, mut metrics, mut buf) =
            (FakeTap::default(), NetMetrics::default(), Vec::new());
        process_tx(&mut queue, &mem, &mut tap, ALL, &mut metrics, &mut buf, 64);
        assert_eq!(tap.sent, vec![good], "only the good frame reaches the tap");
        assert_eq!(used_count(&mock), 7, "every chain goes back");
        assert_eq!((metrics.tx_frames, metrics.tx_dropped), (1, 6));
        // The tap refusing a frame costs that frame only.
        mock.add_desc_chains(&[desc(DATA, 72, 0, 0)], 7).unwrap();
        tap.refuse = true;
        process_tx(&mut queue, &mem, &mut tap, ALL, &mut metrics, &mut buf, 64);
        assert_eq!((used_count(&mock), metrics.tx_dropped), (8, 7));
    }

    #[test]
    fn a_looping_transmit_chain_is_refused_without_spinning() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        put_tx_frame(&mem, DATA, header(0, GSO_NONE, 0, (0, 0)), 60);
        mock.add_desc_chains(&[desc(DATA, 12, NEXT, 1), desc(DATA + 12, 60, NEXT, 0)], 0)
            .unwrap();
        let (mut tap, mut metrics, mut buf) =
            (FakeTap::default(), NetMetrics::default(), Vec::new());
        process_tx(&mut queue, &mem, &mut tap, ALL, &mut metrics, &mut buf, 64);
        assert!(tap.sent.is_empty());
        assert_eq!((used_count(&mock), metrics.tx_dropped), (1, 1));
    }

    #[test]
    fn a_transmit_flood_is_served_in_budgets() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        put_tx_frame(&mem, DATA, header(0, GSO_NONE, 0, (0, 0)), 60);
        let chains: Vec<_> = (0..10).map(|_| desc(DATA, 72, 0, 0)).collect();
        mock.add_desc_chains(&chains, 0).unwrap();
        let (mut tap, mut metrics, mut buf) =
            (FakeTap::default(), NetMetrics::default(), Vec::new());
        let pass = process_tx(&mut queue, &mem, &mut tap, ALL, &mut metrics, &mut buf, 4);
        assert!(pass.more, "work is left: the worker comes back");
        assert_eq!(tap.sent.len(), 4);
    }

    /// Posts `n` receive chains of one `len`-byte writable buffer each,
    /// at DATA + i * 0x1_0000, from descriptor `first` on.
    fn post_rx(mock: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, n: u16, len: u32) {
        let chains: Vec<_> = (0..n)
            .map(|i| desc(DATA + u64::from(first + i) * 0x1_0000, len, W, 0))
            .collect();
        mock.add_desc_chains(&chains, first).unwrap();
    }

    fn read_rx(mem: &GuestMemoryMmap, chain: u16, len: u32) -> Vec<u8> {
        let mut got = vec![0u8; usize::try_from(len).unwrap()];
        mem.read_slice(&mut got, GuestAddress(DATA + u64::from(chain) * 0x1_0000))
            .unwrap();
        got
    }

    #[test]
    fn a_received_frame_spans_mergeable_buffers_and_says_how_many() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        post_rx(&mock, 0, 4, 1500);
        let frame = tap_frame(3000, 7);
        let mut tap = FakeTap {
            incoming: VecDeque::from([frame.clone()]),
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        let pass = rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 64);
        assert!(pass.notify && !pass.more && !rx.waiting());
        // 3012 bytes: two full buffers and 12 bytes of a third.
        assert_eq!(used_count(&mock), 3);
        assert_eq!(
            [used(&mock, 0), used(&mock, 1), used(&mock, 2)],
            [(0, 1500), (1, 1500), (2, 12)]
        );
        let mut got = read_rx(&mem, 0, 1500);
        got.extend(read_rx(&mem, 1, 1500));
        got.extend(read_rx(&mem, 2, 12));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[HEADER_LEN..], frame[HEADER_LEN..]);
        assert_eq!((metrics.rx_frames, metrics.rx_bytes), (1, 3000));
    }

    #[test]
    fn a_guest_that_posts_no_buffers_holds_one_frame_and_the_rest_stay_in_the_tap() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut tap = FakeTap {
            incoming: (0..1000u16)
                .map(|i| tap_frame(1000, i.to_le_bytes()[0]))
                .collect(),
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        for _ in 0..5 {
            let pass = rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 64);
            assert!(!pass.more && !pass.notify && rx.waiting());
        }
        assert_eq!(
            tap.incoming.len(),
            999,
            "one frame read, the rest left in the tap"
        );
        // Buffers arrive: the held frame goes first, in order.
        post_rx(&mock, 0, 2, 1500);
        rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 64);
        assert_eq!(used_count(&mock), 2);
        assert_eq!(
            read_rx(&mem, 0, 1012)[HEADER_LEN..],
            tap_frame(1000, 0)[HEADER_LEN..]
        );
        assert_eq!(
            read_rx(&mem, 1, 1012)[HEADER_LEN..],
            tap_frame(1000, 1)[HEADER_LEN..]
        );
        assert!(rx.waiting() && tap.incoming.len() == 997);
        assert_eq!(metrics.rx_dropped, 0);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_too_big_for_its_chain_is_dropped_and_the_chain_kept() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        post_rx(&mock, 0, 1, 1526);
        let mut tap = FakeTap {
            incoming: VecDeque::from([tap_frame(4000, 1), tap_frame(100, 2)]),
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        rx.process(&mut queue, &mem, &mut tap, false, &mut metrics, 64);
        assert_eq!((metrics.rx_dropped, metrics.rx_frames), (1, 1));
        assert_eq!(used(&mock, 0), (0, 112), "the chain took the next frame");
        assert_eq!(
            u16::from_le_bytes(read_rx(&mem, 0, 12)[10..12].try_into().unwrap()),
            1
        );
    }

    #[test]
    fn receive_chains_the_device_cannot_write_go_back_empty() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        mock.add_desc_chains(
            &[
                // Device-readable: the device must not write it.
                desc(DATA, 1500, 0, 0),
                // Outside guest memory.
                desc(MEM - 100, 1500, W, 0),
                // No room.
                desc(DATA, 0, W, 0),
                // Indirect.
                desc(DATA, 16, W | 4, 0),
                // A good one.
                desc(DATA + 0x2_0000, 1500, W, 0),
            ],
            0,
        )
        .unwrap();
        mem.write_slice(&[0xee; 1500], GuestAddress(DATA)).unwrap();
        let mut tap = FakeTap {
            incoming: VecDeque::from([tap_frame(200, 3)]),
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 64);
        assert_eq!(used_count(&mock), 5);
        for i in 0..4 {
            assert_eq!(used(&mock, i), (u32::try_from(i).unwrap(), 0));
        }
        assert_eq!(used(&mock, 4), (4, 212));
        assert_eq!(metrics.invalid_chains, 4);
        assert_eq!(
            read_rx(&mem, 0, 1500),
            vec![0xee; 1500],
            "a readable buffer stays unwritten"
        );
    }

    #[test]
    fn buffers_too_small_for_any_frame_cost_a_queue_of_chains_at_most() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        post_rx(&mock, 0, 16, 8);
        let mut tap = FakeTap {
            incoming: VecDeque::from([tap_frame(1000, 0), tap_frame(20, 0)]),
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 64);
        assert_eq!(
            metrics.rx_dropped, 1,
            "16 chains of 8 bytes cannot hold 1012"
        );
        // The next frame (32 bytes) fits four of the held chains.
        assert_eq!((metrics.rx_frames, used_count(&mock)), (1, 4));
        assert_eq!(rx.held.len(), 12);
        rx.reset();
        assert!(rx.held.is_empty() && !rx.waiting());
    }

    #[test]
    fn a_receive_flood_is_served_in_budgets_and_short_frames_are_dropped() {
        let mem = memory();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        post_rx(&mock, 0, 16, 1500);
        let mut incoming: VecDeque<_> = (0..20).map(|_| tap_frame(100, 0)).collect();
        incoming.push_front(vec![0; HEADER_LEN + 5]);
        let mut tap = FakeTap {
            incoming,
            ..FakeTap::default()
        };
        let (mut rx, mut metrics) = (Rx::default(), NetMetrics::default());
        let pass = rx.process(&mut queue, &mem, &mut tap, true, &mut metrics, 8);
        assert!(pass.more);
        assert_eq!((metrics.rx_dropped, metrics.rx_frames), (1, 7));
    }
}
