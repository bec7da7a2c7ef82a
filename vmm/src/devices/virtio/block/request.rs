//! Block request processing: pure code over a `virtio-queue` queue and a
//! file, so that it is tested with mock queues and a temp file.
//!
//! Parse, then act: [`read_chain`] reads a chain's descriptors once (it
//! must end, no loop, no indirect table), [`parse`] turns them into a typed
//! request — a readable 16-byte header first, a writable status byte last,
//! data buffers in guest memory facing the right way, whole sectors inside
//! the disk — and only then does [`execute`] touch the file. A request that fails a check gets
//! `IOERR` (or `UNSUPP` for an unknown type) in its status byte when there
//! is a status byte to write; a chain without one goes back with length 0.
//! Either way the queue keeps going with the next chain.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestMemoryMmap, Le32, Le64};

use super::{
    ID_LEN, S_IOERR, S_OK, S_UNSUPP, SECTOR_SHIFT, SECTOR_SIZE, T_FLUSH, T_GET_ID, T_IN, T_OUT,
};
use crate::devices::virtio::{Buffer, ChainError, add_used, read_chain};

/// A request the device refuses, with the status the guest gets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The descriptor chain is malformed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A data buffer outside guest memory.
    #[error("data buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The header is missing or too short.
    #[error("request has no device-readable 16-byte header")]
    Header,
    /// The status byte is missing.
    #[error("request has no device-writable status byte at its end")]
    Status,
    /// A data buffer has the wrong direction.
    #[error("data buffer faces the wrong way for request type {0}")]
    Direction(u32),
    /// The data length is not whole sectors.
    #[error("request length {0} is not a whole number of sectors")]
    Unaligned(u64),
    /// The request goes past the disk's end.
    #[error(
        "request at sector {sector} for {sectors} sectors ends past the disk ({capacity} sectors)"
    )]
    PastEnd {
        /// The first sector.
        sector: u64,
        /// The sectors asked for.
        sectors: u64,
        /// The disk's size in sectors.
        capacity: u64,
    },
    /// The slot has no image.
    #[error("no image is attached to this disk slot")]
    Empty,
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// The request type is not served.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The host file's read or write failed.
    #[error("disk I/O failed: {0}")]
    Io(String),
    /// Guest memory cannot be read or written.
    #[error("guest memory access failed: {0}")]
    Memory(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// Counters, exported with the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlockMetrics {
    pub(crate) read_bytes: u64,
    pub(crate) write_bytes: u64,
    pub(crate) flushes: u64,
    pub(crate) invalid_requests: u64,
}

/// The disk a queue works on.
#[derive(Debug)]
pub struct Disk<'a> {
    /// None: an empty slot.
    pub file: Option<&'a File>,
    /// Its size in 512-byte sectors, as the driver was told.
    pub capacity_sectors: u64,
    /// Writes are refused (`VIRTIO_BLK_S_IOERR`).
    pub read_only: bool,
    /// What `VIRTIO_BLK_T_GET_ID` answers.
    pub id: &'a [u8],
}

/// The request header as the driver lays it out (virtio 1.2, 5.2.6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RequestHeader {
    type_: Le32,
    reserved: Le32,
    sector: Le64,
}

// SAFETY: three little-endian integers, 16 bytes with no padding; every
// bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// A request that passed every check: what to do, and where the status
/// byte goes. Only a `Parsed` request reaches [`execute`].
#[derive(Debug, PartialEq, Eq)]
struct Parsed {
    op: Op,
    status: Buffer,
}

#[derive(Debug, PartialEq, Eq)]
enum Op {
    /// Read `data` (device-writable buffers, whole sectors, inside the
    /// disk) from byte `offset`.
    Read {
        offset: u64,
        data: Vec<Buffer>,
    },
    /// Write `data` (device-readable) at byte `offset` of a writable disk.
    Write {
        offset: u64,
        data: Vec<Buffer>,
    },
    Flush,
    /// Write the serial into `buffer` (device-writable).
    GetId {
        buffer: Buffer,
    },
}

/// Serves every available chain of `queue`. Returns whether the driver
/// must be interrupted.
pub fn process_queue(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    disk: &Disk<'_>,
    metrics: &mut BlockMetrics,
) -> bool {
    let mut used_any = false;
    while let Some(chain) = queue.pop_descriptor_chain(memory) {
        let head = chain.head_index();
        let used = match read_chain(queue, &chain) {
            Err(e) => {
                metrics.invalid_requests += 1;
                crate::guest_warn!("virtio-blk: {e}");
                // Without a trustworthy chain there is no status byte to write.
                0
            }
            Ok(buffers) => {
                let outcome = parse(&buffers, memory, disk).and_then(|parsed| {
                    let status = parsed.status;
                    execute(parsed, memory, disk, metrics).map_err(|e| (e, Some(status)))
                });
                match outcome {
                    Ok(len) => len,
                    Err((e, status)) => {
                        metrics.invalid_requests += 1;
                        crate::guest_warn!("virtio-blk: {e}");
                        match status {
                            Some(status) if memory.write_obj(e.status(), status.addr).is_ok() => 1,
                            _ => 0,
                        }
                    }
                }
            }
        };
        add_used(queue, memory, head, used);
        used_any = true;
    }
    used_any && queue.needs_notification(memory).unwrap_or(true)
}

/// Checks a chain and turns it into a request: a readable 16-byte header
/// first, a writable status byte last, data buffers in guest memory facing
/// the right way, whole sectors inside the disk, no write to a read-only
/// disk, no I/O on an empty slot. On failure, also returns the status
/// buffer when the chain has a usable one.
fn parse(
    buffers: &[Buffer],
    memory: &GuestMemoryMmap,
    disk: &Disk<'_>,
) -> Result<Parsed, (RequestError, Option<Buffer>)> {
    let status = buffers
        .last()
        .copied()
        .filter(|b| b.writable && b.len >= 1 && buffers.len() >= 2 && b.in_memory(memory));
    let Some(status) = status else {
        return Err((RequestError::Status, None));
    };
    let fail = |e: RequestError| (e, Some(status));
    let header_buffer = buffers[0];
    if header_buffer.writable || header_buffer.len < 16 || !header_buffer.in_memory(memory) {
        return Err(fail(RequestError::Header));
    }
    let header: RequestHeader = memory
        .read_obj(header_buffer.addr)
        .map_err(|e| fail(RequestError::Memory(e.to_string())))?;
    let (kind, sector) = (header.type_.to_native(), header.sector.to_native());
    let data = &buffers[1..buffers.len() - 1];
    if let Some(outside) = data.iter().find(|b| !b.in_memory(memory)) {
        return Err(fail(RequestError::OutsideMemory {
            addr: outside.addr.0,
            len: outside.len,
        }));
    }
    let op = match kind {
        T_IN | T_OUT | T_FLUSH if disk.file.is_none() => return Err(fail(RequestError::Empty)),
        T_IN | T_OUT => {
            let writing = kind == T_OUT;
            if data.iter().any(|b| b.writable == writing) {
                return Err(fail(RequestError::Direction(kind)));
            }
            if writing && disk.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            let data_len: u64 = data.iter().map(|b| u64::from(b.len)).sum();
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::Unaligned(data_len)));
            }
            let sectors = data_len >> SECTOR_SHIFT;
            if sector
                .checked_add(sectors)
                .is_none_or(|end| end > disk.capacity_sectors)
            {
                return Err(fail(RequestError::PastEnd {
                    sector,
                    sectors,
                    capacity: disk.capacity_sectors,
                }));
            }
            let offset = sector << SECTOR_SHIFT;
            let data = data.to_vec();
            if writing {
                Op::Write { offset, data }
            } else {
                Op::Read { offset, data }
            }
        }
        T_FLUSH => Op::Flush,
        T_GET_ID => {
            let Some(buffer) = data.first().copied().filter(|b| b.writable) else {
                return Err(fail(RequestError::Direction(kind)));
            };
            Op::GetId { buffer }
        }
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    Ok(Parsed { op, status })
}

/// Does a parsed request's I/O and writes `S_OK`; returns the used length
/// (bytes written into guest memory, the status byte included).
fn execute(
    parsed: Parsed,
    memory: &GuestMemoryMmap,
    disk: &Disk<'_>,
    metrics: &mut BlockMetrics,
) -> Result<u32, RequestError> {
    let written = match parsed.op {
        Op::Read { offset, data } | Op::Write { offset, data } if disk.file.is_some() => {
            let writing = data.first().is_some_and(|b| !b.writable);
            let mut at = offset;
            let mut total = 0u64;
            for buffer in &data {
                if let Some(file) = disk.file {
                    transfer(memory, file, *buffer, at, writing)?;
                }
                at += u64::from(buffer.len);
                total += u64::from(buffer.len);
            }
            if writing {
                metrics.write_bytes += total;
                0
            } else {
                metrics.read_bytes += total;
                u32::try_from(total).unwrap_or(u32::MAX)
            }
        }
        Op::Read { .. } | Op::Write { .. } => return Err(RequestError::Empty),
        Op::Flush => {
            if let Some(file) = disk.file.filter(|_| !disk.read_only) {
                file.sync_data()
                    .map_err(|e| RequestError::Io(e.to_string()))?;
            }
            metrics.flushes += 1;
            0
        }
        Op::GetId { buffer } => {
            let mut id = [0u8; ID_LEN];
            let n = disk.id.len().min(ID_LEN);
            id[..n].copy_from_slice(&disk.id[..n]);
            let len = usize::try_from(buffer.len).unwrap_or(0).min(ID_LEN);
            memory
                .write_slice(&id[..len], buffer.addr)
                .map_err(|e| RequestError::Memory(e.to_string()))?;
            u32::try_from(len).unwrap_or(0)
        }
    };
    memory
        .write_obj(S_OK, parsed.status.addr)
        .map_err(|e| RequestError::Memory(e.to_string()))?;
    Ok(written + 1)
}

/// Moves one buffer between guest memory and the file, through a bounce
/// buffer of at most 64 KiB at a time.
fn transfer(
    memory: &GuestMemoryMmap,
    file: &File,
    buffer: Buffer,
    mut offset: u64,
    to_disk: bool,
) -> Result<(), RequestError> {
    const CHUNK: usize = 64 << 10;
    let total = usize::try_from(buffer.len).unwrap_or(0);
    let mut bounce = vec![0u8; total.min(CHUNK)];
    let mut done = 0usize;
    while done < total {
        let n = (total - done).min(CHUNK);
        let addr = buffer.addr.unchecked_add(u64::try_from(done).unwrap_or(0));
        let chunk = &mut bounce[..n];
        if to_disk {
            memory
                .read_slice(chunk, addr)
                .map_err(|e| RequestError::Memory(e.to_string()))?;
            file.write_all_at(chunk, offset)
                .map_err(|e| RequestError::Io(e.to_string()))?;
        } else {
            file.read_exact_at(chunk, offset)
                .map_err(|e| RequestError::Io(e.to_string()))?;
            memory
                .write_slice(chunk, addr)
                .map_err(|e| RequestError::Memory(e.to_string()))?;
        }
        done += n;
        offset += u64::try_from(n).unwrap_or(0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x12_0000;
    const W: u16 = 2; // VRING_DESC_F_WRITE

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    struct Setup {
        file: tempfile::NamedTempFile,
        read_only: bool,
        /// Serve as an empty slot (no image attached).
        empty: bool,
    }

    impl Setup {
        fn new(read_only: bool) -> Self {
            let file = tempfile::NamedTempFile::new().unwrap();
            let pattern: Vec<u8> = (0..8 * 512u32)
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect();
            std::fs::write(file.path(), pattern).unwrap();
            Self {
                file,
                read_only,
                empty: false,
            }
        }

        /// Runs one chain and returns (status byte, used length, metrics).
        fn run(
            &self,
            mem: &GuestMemoryMmap,
            kind: u32,
            sector: u64,
            descs: &[RawDescriptor],
        ) -> (u8, u32, BlockMetrics) {
            mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mock = MockSplitQueue::new(mem, 16);
            let mut queue: Queue = mock.create_queue().unwrap();
            mock.build_desc_chain(descs).unwrap();
            let file = self.file.reopen().unwrap();
            let disk = Disk {
                file: (!self.empty).then_some(&file),
                capacity_sectors: 8,
                read_only: self.read_only,
                id: if self.empty { b"" } else { b"disk-one" },
            };
            let mut metrics = BlockMetrics::default();
            process_queue(&mut queue, mem, &disk, &mut metrics);
            let used = mock.used().ring().ref_at(0).unwrap().load();
            (
                mem.read_obj(GuestAddress(STATUS)).unwrap(),
                used.len(),
                metrics,
            )
        }
    }

    fn chain(data: RawDescriptor) -> Vec<RawDescriptor> {
        vec![desc(HEADER, 16, 0), data, desc(STATUS, 1, W)]
    }

    #[test]
    fn reads_and_writes_reach_the_file() {
        let mem = memory();
        let setup = Setup::new(false);
        let (status, used, metrics) = setup.run(&mem, T_IN, 1, &chain(desc(DATA, 1024, W)));
        assert_eq!((status, used), (S_OK, 1025));
        assert_eq!(metrics.read_bytes, 1024);
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let expected: Vec<u8> = (512..1536u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        assert_eq!(got, expected);

        mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
        let (status, used, _) = setup.run(&mem, T_OUT, 7, &chain(desc(DATA, 512, 0)));
        assert_eq!((status, used), (S_OK, 1));
        let on_disk = std::fs::read(setup.file.path()).unwrap();
        assert_eq!(&on_disk[7 * 512..], &[0xaa; 512][..]);

        let (status, _, metrics) =
            setup.run(&mem, T_FLUSH, 0, &[desc(HEADER, 16, 0), desc(STATUS, 1, W)]);
        assert_eq!((status, metrics.flushes), (S_OK, 1));
        let (status, used, _) = setup.run(&mem, T_GET_ID, 0, &chain(desc(DATA, 20, W)));
        assert_eq!((status, used), (S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"disk-one\0");
    }

    #[test]
    fn an_empty_slot_answers_io_with_ioerr_and_an_empty_id() {
        let mem = memory();
        let setup = Setup {
            empty: true,
            ..Setup::new(true)
        };
        let (status, used, metrics) = setup.run(&mem, T_IN, 0, &chain(desc(DATA, 512, W)));
        assert_eq!((status, used, metrics.invalid_requests), (S_IOERR, 1, 1));
        let (status, _, _) =
            setup.run(&mem, T_FLUSH, 0, &[desc(HEADER, 16, 0), desc(STATUS, 1, W)]);
        assert_eq!(status, S_IOERR);
        mem.write_slice(&[0xff; 20], GuestAddress(DATA)).unwrap();
        let (status, used, _) = setup.run(&mem, T_GET_ID, 0, &chain(desc(DATA, 20, W)));
        assert_eq!((status, used), (S_OK, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(id, [0u8; 20]);
    }

    #[test]
    fn requests_past_the_end_of_the_disk_get_ioerr_and_touch_nothing() {
        let mem = memory();
        let setup = Setup::new(false);
        let before = std::fs::read(setup.file.path()).unwrap();
        let (status, used, metrics) = setup.run(&mem, T_OUT, 7, &chain(desc(DATA, 1024, 0)));
        assert_eq!((status, used, metrics.invalid_requests), (S_IOERR, 1, 1));
        let (status, _, _) = setup.run(&mem, T_IN, u64::MAX, &chain(desc(DATA, 512, W)));
        assert_eq!(status, S_IOERR);
        assert_eq!(std::fs::read(setup.file.path()).unwrap(), before);
    }

    #[test]
    fn a_write_to_a_read_only_disk_or_the_wrong_direction_gets_ioerr() {
        let mem = memory();
        let ro = Setup::new(true);
        let (status, ..) = ro.run(&mem, T_OUT, 0, &chain(desc(DATA, 512, 0)));
        assert_eq!(status, S_IOERR);
        let rw = Setup::new(false);
        // A read whose data buffer is device-readable would make the device
        // write into memory the driver marked read-only.
        let (status, ..) = rw.run(&mem, T_IN, 0, &chain(desc(DATA, 512, 0)));
        assert_eq!(status, S_IOERR);
        let (status, ..) = rw.run(&mem, T_IN, 0, &chain(desc(DATA, 100, W)));
        assert_eq!(status, S_IOERR, "partial sectors are refused");
        let (status, ..) = rw.run(&mem, 99, 0, &chain(desc(DATA, 512, W)));
        assert_eq!(status, S_UNSUPP);
    }

    #[test]
    fn a_buffer_outside_guest_memory_gets_ioerr() {
        let mem = memory();
        let setup = Setup::new(false);
        let (status, used, _) = setup.run(&mem, T_IN, 0, &chain(desc(0x1f_ff00, 512, W)));
        assert_eq!((status, used), (S_IOERR, 1));
        let (status, used, _) = setup.run(&mem, T_IN, 0, &chain(desc(u64::MAX - 10, 512, W)));
        assert_eq!((status, used), (S_IOERR, 1));
        // A status byte outside memory: nothing is written, the chain goes back empty.
        let descs = vec![
            desc(HEADER, 16, 0),
            desc(DATA, 512, W),
            desc(0x20_0000, 1, W),
        ];
        let (_, used, _) = setup.run(&mem, T_IN, 0, &descs);
        assert_eq!(used, 0);
    }

    #[test]
    fn a_bad_status_buffer_leaves_memory_untouched_and_the_queue_going() {
        let mem = memory();
        let setup = Setup::new(false);
        // Status descriptor is device-readable: there is nothing we may write.
        let descs = vec![desc(HEADER, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)];
        let (status, used, _) = setup.run(&mem, T_IN, 0, &descs);
        assert_eq!((status, used), (0xff, 0));
        // A header shorter than 16 bytes.
        let descs = vec![desc(HEADER, 8, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        let (status, ..) = setup.run(&mem, T_IN, 0, &descs);
        assert_eq!(status, S_IOERR);
    }

    #[test]
    fn a_looping_chain_is_refused_and_the_next_chain_is_served() {
        let mem = memory();
        let setup = Setup::new(false);
        let file = setup.file.reopen().unwrap();
        let disk = Disk {
            file: Some(&file),
            capacity_sectors: 8,
            read_only: false,
            id: b"",
        };
        let mock = MockSplitQueue::new(&mem, 16);
        let mut queue: Queue = mock.create_queue().unwrap();
        let next = 1; // VRING_DESC_F_NEXT
        // Chain 1 at index 0: 0 -> 1 -> 0 -> ... ; chain 2 at 2: header, status.
        let table = mock.desc_table();
        table
            .store(0, RawDescriptor::from(Descriptor::new(HEADER, 16, next, 1)))
            .unwrap();
        table
            .store(
                1,
                RawDescriptor::from(Descriptor::new(DATA, 512, next | W, 0)),
            )
            .unwrap();
        table
            .store(2, RawDescriptor::from(Descriptor::new(HEADER, 16, next, 3)))
            .unwrap();
        table
            .store(3, RawDescriptor::from(Descriptor::new(STATUS, 1, W, 0)))
            .unwrap();
        mem.write_obj(T_FLUSH, GuestAddress(HEADER)).unwrap();
        let avail = mock.avail();
        avail.ring().ref_at(0).unwrap().store(0);
        avail.ring().ref_at(1).unwrap().store(2);
        avail.idx().store(2);
        let mut metrics = BlockMetrics::default();
        process_queue(&mut queue, &mem, &disk, &mut metrics);
        assert_eq!(metrics.invalid_requests, 1);
        assert_eq!(metrics.flushes, 1);
        assert_eq!(mock.used().idx().load(), 2);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    }

    #[test]
    fn an_indirect_descriptor_is_refused_though_its_table_holds_a_valid_request() {
        // VIRTIO_RING_F_INDIRECT_DESC is never offered, so a chain that
        // points at an indirect table is the guest breaking the protocol:
        // before the fix, virtio-queue followed the table (a 1000-entry one
        // on a 16-entry queue too) and the request was served.
        let mem = memory();
        let setup = Setup::new(false);
        const TABLE: u64 = 0x13_0000;
        let next = 1u16; // VRING_DESC_F_NEXT
        let entries = 1000u16;
        for i in 0..entries {
            let (addr, len, flags) = match i {
                0 => (HEADER, 16, next),
                i if i == entries - 1 => (STATUS, 1, W),
                _ => (DATA, 0, next | W),
            };
            let d = Descriptor::new(addr, len, flags, i + 1);
            mem.write_obj(d, GuestAddress(TABLE + u64::from(i) * 16))
                .unwrap();
        }
        let indirect = 4u16; // VRING_DESC_F_INDIRECT
        let (status, used, metrics) = setup.run(
            &mem,
            T_FLUSH,
            0,
            &[desc(TABLE, u32::from(entries) * 16, indirect)],
        );
        assert_eq!((status, used, metrics.flushes), (0xff, 0, 0));
        assert_eq!(metrics.invalid_requests, 1);
    }

    #[test]
    fn parsing_yields_a_typed_request_and_touches_no_file() {
        let mem = memory();
        let setup = Setup::new(false);
        let file = setup.file.reopen().unwrap();
        let disk = Disk {
            file: Some(&file),
            capacity_sectors: 8,
            read_only: false,
            id: b"",
        };
        mem.write_obj(T_IN, GuestAddress(HEADER)).unwrap();
        mem.write_obj(2u64, GuestAddress(HEADER + 8)).unwrap();
        let buffer = |addr: u64, len: u32, writable: bool| Buffer {
            addr: GuestAddress(addr),
            len,
            writable,
        };
        let parsed = parse(
            &[
                buffer(HEADER, 16, false),
                buffer(DATA, 1024, true),
                buffer(STATUS, 1, true),
            ],
            &mem,
            &disk,
        )
        .unwrap();
        assert_eq!(
            parsed,
            Parsed {
                op: Op::Read {
                    offset: 1024,
                    data: vec![buffer(DATA, 1024, true)]
                },
                status: buffer(STATUS, 1, true),
            }
        );
    }
}
