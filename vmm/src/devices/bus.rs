//! An address bus: non-overlapping ranges, each served by one device.
//!
//! vCPU threads look up the device for every port or MMIO exit. An access
//! that hits no device reads as all ones and writes are dropped, as on a PC;
//! the kernel probes such addresses routinely, so this is not logged.

use std::sync::{Arc, Mutex};

use capsid_base::lock;

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be added.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or overlaps another device's.
    #[error("range {start:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Where the new range starts.
        start: u64,
        /// Its length.
        len: u64,
    },
}

struct Range {
    start: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of devices keyed by address range.
#[derive(Default)]
pub struct Bus {
    /// Sorted by start address, non-overlapping.
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.start, r.len)))
            .finish()
    }
}

impl Bus {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `start..start + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        start: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = start.checked_add(len).filter(|_| len > 0);
        let overlaps = |r: &Range| end.is_none_or(|end| start < r.start + r.len && r.start < end);
        if end.is_none() || self.ranges.iter().any(overlaps) {
            return Err(BusError::Overlap { start, len });
        }
        let at = self.ranges.partition_point(|r| r.start < start);
        self.ranges.insert(at, Range { start, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let at = self
            .ranges
            .partition_point(|r| r.start <= addr)
            .checked_sub(1)?;
        let range = &self.ranges[at];
        let offset = addr - range.start;
        let fits = offset
            .checked_add(u64::try_from(size).ok()?)
            .is_some_and(|end| end <= range.len);
        fits.then_some((range, offset))
    }

    pub(crate) fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr, data.len()) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub(crate) fn write(&self, addr: u64, data: &[u8]) {
        if let Some((range, offset)) = self.find(addr, data.len()) {
            lock(&range.device).write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset_and_misses_read_ones() {
        let device = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(device.clone(), 0x3f8, 8).unwrap();
        bus.write(0x3fb, &[7]);
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.read(0x400, &mut data);
        assert_eq!(data, [0xff]);
        // An access straddling the end of the range hits nothing.
        let mut wide = [0u8; 4];
        bus.read(0x3fe, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        assert_eq!(lock(&device).writes, vec![(3, vec![7])]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        let device = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(device.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(device.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(device.clone(), 0xf0, 0x11).is_err());
        assert!(bus.insert(device.clone(), 0x200, 0).is_err());
        assert!(bus.insert(device, u64::MAX, 2).is_err());
    }
}
