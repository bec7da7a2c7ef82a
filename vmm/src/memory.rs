//! Guest RAM: private mappings, anonymous or of a snapshot's memory file
//! (copy-on-write), one per RAM range of the layout,
//! each between two inaccessible guard pages so that a bug that runs off the
//! end of a range faults instead of touching a neighbouring host mapping.
//!
//! The mappings are reserved `PROT_NONE` with the guard pages included, then
//! the middle is made readable and writable; [`GuestRam`] unmaps the whole
//! reservation when dropped. Pages are allocated only when the guest touches
//! them (`MAP_NORESERVE`).
//!
//! Each range starts at a host address aligned like its guest address, to
//! 2 MiB: KVM maps guest memory with 2 MiB pages only where the two agree,
//! and where the host backs it with transparent huge pages. Unaligned, every
//! guest page is mapped on its own, and each first touch is a nested page
//! fault (QEMU aligns its RAM the same way).

use std::fs::File;
use std::io;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::ram_ranges;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The address space cannot be reserved.
    #[error("cannot reserve {0} bytes of address space for guest RAM")]
    Reserve(usize, #[source] io::Error),
    /// Guest RAM cannot be mapped.
    #[error("cannot map {0} bytes of guest RAM")]
    Map(usize, #[source] io::Error),
    /// vm-memory refused the regions.
    #[error("cannot describe guest RAM to vm-memory: {0}")]
    Region(String),
    /// The size does not fit in the address space.
    #[error("guest memory size {0} MiB does not fit in this host's address space")]
    Size(u64),
    /// A snapshot's memory file cannot be read.
    #[error("cannot read the snapshot's memory file")]
    Snapshot(#[source] io::Error),
    /// A snapshot's memory file is not the size of the guest's RAM.
    #[error("the snapshot's memory file has {actual} bytes, not the {expected} of the guest's RAM")]
    SnapshotSize {
        /// The guest RAM's size.
        expected: u64,
        /// The file's.
        actual: u64,
    },
}

/// One reservation: `len` bytes at `base`, guard pages included.
#[derive(Debug)]
struct Reservation {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the reservation is a plain address range; it is only unmapped in
// `drop`, which needs exclusive ownership.
unsafe impl Send for Reservation {}
// SAFETY: no method reads or writes through the pointer.
unsafe impl Sync for Reservation {}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` is a mapping this struct created and nothing
        // else unmaps; the guest memory views of it are dropped before the
        // `GuestRam` that owns this reservation (field order).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// The guest's RAM and the host mappings behind it.
#[derive(Debug)]
pub struct GuestRam {
    /// Dropped first: the views into the reservations.
    memory: GuestMemoryMmap,
    _reservations: Vec<Arc<Reservation>>,
    /// The size it was made with.
    mem_bytes: u64,
}

/// The alignment of each RAM range's host address: an x86 large page.
const HUGE_PAGE: usize = 2 << 20;

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

impl GuestRam {
    /// Maps `mem_bytes` of RAM at the guest addresses of the layout.
    pub fn new(mem_bytes: u64) -> Result<Self, MemoryError> {
        Self::map(mem_bytes, None)
    }

    /// Maps `mem_bytes` of RAM from a snapshot's memory file (what
    /// [`Self::save_to`] wrote), privately: the guest's writes stay in this
    /// process (copy-on-write), and the file's pages that no clone wrote are
    /// shared by every VM restored from it through the page cache.
    pub fn from_snapshot(mem_bytes: u64, file: &File) -> Result<Self, MemoryError> {
        let expected: u64 = ram_ranges(mem_bytes).iter().map(|r| r.len).sum();
        let actual = file.metadata().map_err(MemoryError::Snapshot)?.len();
        if actual != expected {
            return Err(MemoryError::SnapshotSize { expected, actual });
        }
        Self::map(mem_bytes, Some(file))
    }

    /// Writes guest RAM to `file`, its ranges one after another from offset
    /// 0; pages of zeros are left as holes. The vCPUs must be paused.
    pub fn save_to(&self, file: &File) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let page = page_size();
        let mut offset = 0u64;
        let mut buf = vec![0u8; page];
        // Whatever the file held would show through the holes.
        file.set_len(0)?;
        for region in self.memory.iter() {
            let len = usize::try_from(region.len()).map_err(io::Error::other)?;
            let mut at = 0usize;
            while at < len {
                let n = page.min(len - at);
                let addr = vm_memory::MemoryRegionAddress(at as u64);
                vm_memory::Bytes::read_slice(region, &mut buf[..n], addr)
                    .map_err(io::Error::other)?;
                if buf[..n].iter().any(|&b| b != 0) {
                    file.write_all_at(&buf[..n], offset + at as u64)?;
                }
                at += n;
            }
            offset += len as u64;
        }
        file.set_len(offset)?;
        file.sync_all()
    }

    /// Maps RAM anonymous, or privately from `backing`'s pages in order.
    fn map(mem_bytes: u64, backing: Option<&File>) -> Result<Self, MemoryError> {
        use std::os::fd::AsRawFd;
        let page = page_size();
        let mut regions = Vec::new();
        let mut reservations = Vec::new();
        let mut file_offset = 0u64;
        for range in ram_ranges(mem_bytes) {
            let len = usize::try_from(range.len).map_err(|_| MemoryError::Size(mem_bytes >> 20))?;
            // Room for a guard page on each side and for the alignment.
            let total = len
                .checked_add(2 * page + HUGE_PAGE)
                .ok_or(MemoryError::Size(mem_bytes >> 20))?;
            // SAFETY: a fresh anonymous mapping at an address of the kernel's
            // choosing; the result is checked below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(MemoryError::Reserve(total, io::Error::last_os_error()));
            }
            let reservation = Arc::new(Reservation { base, len: total });
            let (flags, fd) = match backing {
                None => (
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                ),
                Some(file) => (libc::MAP_PRIVATE | libc::MAP_NORESERVE, file.as_raw_fd()),
            };
            let offset_in_file = libc::off_t::try_from(file_offset)
                .map_err(|_| MemoryError::Size(mem_bytes >> 20))?;
            file_offset += range.len;
            // The first address after a guard page that is aligned like the
            // range's guest address (ranges start at multiples of 2 MiB or
            // at 0): at most `page + HUGE_PAGE` into the reservation.
            let skew = usize::try_from(range.start).unwrap_or(0) % HUGE_PAGE;
            let first = base.addr() + page;
            let offset = page + (skew + HUGE_PAGE - first % HUGE_PAGE) % HUGE_PAGE;
            // SAFETY: `base + offset` lies inside the reservation just made,
            // with `offset >= page` and `offset + len + page <= total`;
            // MAP_FIXED replaces only our own pages. `fd` is -1 (anonymous)
            // or an open file checked to hold every range.
            let ram = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(offset).cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags | libc::MAP_FIXED,
                    fd,
                    offset_in_file,
                )
            };
            if ram == libc::MAP_FAILED {
                return Err(MemoryError::Map(len, io::Error::last_os_error()));
            }
            // SAFETY: `ram` is a valid mapping of `len` bytes with exactly
            // this protection and these flags, and it lives as long as
            // `reservation`, which `GuestRam` keeps until after the regions.
            let mapping = unsafe {
                MmapRegion::build_raw(ram.cast(), len, libc::PROT_READ | libc::PROT_WRITE, flags)
            }
            .map_err(|e| MemoryError::Region(e.to_string()))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(range.start))
                .ok_or_else(|| MemoryError::Region("region wraps the address space".into()))?;
            regions.push(region);
            reservations.push(reservation);
        }
        let memory = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Region(e.to_string()))?;
        Ok(Self {
            memory,
            _reservations: reservations,
            mem_bytes,
        })
    }

    /// The guest's RAM in bytes, as it was asked for.
    pub fn size(&self) -> u64 {
        self.mem_bytes
    }

    /// The guest memory, to read and write guest physical addresses.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn ram_is_usable_to_its_last_byte_and_not_beyond() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let memory = ram.memory();
        memory
            .write_obj(0xabu8, GuestAddress((8 << 20) - 1))
            .unwrap();
        assert_eq!(
            memory.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(),
            0xab
        );
        assert!(memory.write_obj(0u8, GuestAddress(8 << 20)).is_err());
        assert_eq!(memory.num_regions(), 1);
    }

    #[test]
    fn a_memory_file_written_over_an_old_one_keeps_none_of_it() {
        // Zero pages are holes; before the fix a file that held something
        // showed it through them.
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, &vec![0xffu8; 8 << 20]).unwrap();
        let ram = GuestRam::new(8 << 20).unwrap();
        ram.memory()
            .write_obj(0x5au8, GuestAddress(0x1000))
            .unwrap();
        ram.save_to(&file).unwrap();
        let restored = GuestRam::from_snapshot(8 << 20, &file).unwrap();
        let memory = restored.memory();
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x5a);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0)).unwrap(), 0);
        assert_eq!(restored.size(), 8 << 20);
    }

    #[test]
    fn each_range_sits_at_a_host_address_aligned_like_its_guest_address() {
        // Before the fix the RAM began one page into its reservation, so its
        // host and guest addresses never agreed modulo 2 MiB and KVM mapped
        // the guest with 4 KiB pages only.
        use vm_memory::GuestMemoryRegion;
        for mib in [8u64, 64, 4000] {
            let ram = GuestRam::new(mib << 20).unwrap();
            for region in ram.memory().iter() {
                let host = region.as_ptr().addr();
                let guest = usize::try_from(region.start_addr().0).unwrap();
                assert_eq!(
                    host % HUGE_PAGE,
                    guest % HUGE_PAGE,
                    "{mib} MiB at {guest:#x}"
                );
            }
        }
    }
}
