//! virtio-net queue processing over guest memory the input writes: the
//! descriptor table (0x0), the available ring (0x100), the used ring
//! (0x200) and the buffers are all the guest's; byte 0x3f8 picks the
//! features the driver acknowledged, 0x3f0..0x3f6 the lengths of three
//! frames the tap hands the device. The same memory serves as a transmit
//! queue, then as a receive queue. Nothing may panic, hang, or pass the
//! tap a frame that failed a check.
#![no_main]

use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, OnceLock};

use capsid_vmm::devices::virtio::net::{
    F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_MRG_RXBUF, FrameIo, HEADER_LEN, MAX_FRAME_WITH_HEADER,
    NetMetrics, Rx, process_tx,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: usize = 1 << 20;
const INPUT: usize = 64 << 10;

/// The tap: takes every frame (checking it is whole), hands out `incoming`.
struct Tap {
    incoming: VecDeque<usize>,
}

impl FrameIo for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let len = len.min(buf.len());
        buf[..len].fill(0x5a);
        Ok(len)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() > HEADER_LEN && frame.len() <= MAX_FRAME_WITH_HEADER);
        Ok(())
    }
}

fn memory() -> &'static Mutex<GuestMemoryMmap> {
    static MEMORY: OnceLock<Mutex<GuestMemoryMmap>> = OnceLock::new();
    MEMORY.get_or_init(|| {
        Mutex::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap())
    })
}

fn queue() -> Queue {
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(16);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    queue
}

fuzz_target!(|data: &[u8]| {
    let memory = memory().lock().unwrap();
    let mut page = vec![0u8; INPUT];
    let n = data.len().min(INPUT);
    page[..n].copy_from_slice(&data[..n]);
    memory.write_slice(&page, GuestAddress(0)).unwrap();
    let pick = page[0x3f8];
    let acked = [F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_MRG_RXBUF]
        .iter()
        .enumerate()
        .filter(|(i, _)| pick & (1 << i) != 0)
        .fold(0, |all, (_, f)| all | f);
    let incoming = (0..3)
        .map(|i| {
            usize::from(u16::from_le_bytes([
                page[0x3f0 + 2 * i],
                page[0x3f1 + 2 * i],
            ]))
        })
        .collect();
    let mut tap = Tap { incoming };
    let mut metrics = NetMetrics::default();

    let mut frame = Vec::new();
    process_tx(
        &mut queue(),
        &memory,
        &mut tap,
        acked,
        &mut metrics,
        &mut frame,
        64,
    );

    let mut rx = Rx::default();
    let mut queue = queue();
    for _ in 0..2 {
        rx.process(
            &mut queue,
            &memory,
            &mut tap,
            acked & F_MRG_RXBUF != 0,
            &mut metrics,
            64,
        );
    }
});
