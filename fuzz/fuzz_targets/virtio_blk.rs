//! virtio-blk queue processing over guest memory the input writes: the
//! descriptor table (0x0), the available ring (0x100), the used ring
//! (0x200) and the buffers are all the guest's. Nothing may panic, hang,
//! or touch the disk outside a request that passed every check.
#![no_main]

use std::fs::File;
use std::sync::{Mutex, OnceLock};

use capsid_vmm::devices::virtio::block::{BlockMetrics, Disk, process_queue};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: usize = 1 << 20;
const INPUT: usize = 64 << 10;

struct World {
    memory: GuestMemoryMmap,
    disk: File,
}

fn world() -> &'static Mutex<World> {
    static WORLD: OnceLock<Mutex<World>> = OnceLock::new();
    WORLD.get_or_init(|| {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
        let disk = tempfile::tempfile().unwrap();
        disk.set_len(8 * 512).unwrap();
        Mutex::new(World { memory, disk })
    })
}

fuzz_target!(|data: &[u8]| {
    let world = world().lock().unwrap();
    let mut page = vec![0u8; INPUT];
    let n = data.len().min(INPUT);
    page[..n].copy_from_slice(&data[..n]);
    world.memory.write_slice(&page, GuestAddress(0)).unwrap();
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(16);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    for read_only in [true, false] {
        let disk = Disk {
            file: Some(&world.disk),
            capacity_sectors: 8,
            read_only,
            id: b"fuzz",
        };
        let mut metrics = BlockMetrics::default();
        process_queue(&mut queue, &world.memory, &disk, &mut metrics);
    }
});
