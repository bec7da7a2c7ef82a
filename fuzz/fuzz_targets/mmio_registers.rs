//! The virtio-mmio transport under any sequence of register reads and
//! writes a guest can make (9 bytes each: read or write, offset, value),
//! around a real virtio-blk device whose worker serves what gets activated.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use capsid_vmm::devices::bus::BusDevice;
use capsid_vmm::devices::virtio::block::Block;
use capsid_vmm::devices::virtio::mmio::MmioTransport;
use capsid_vmm::devices::virtio::{Interrupt, VirtioDevice, WorkerHandle, no_init};
use capsid_vmm::memory::GuestRam;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fn ram() -> Arc<GuestRam> {
    static RAM: OnceLock<Arc<GuestRam>> = OnceLock::new();
    Arc::clone(RAM.get_or_init(|| Arc::new(GuestRam::new(1 << 20).unwrap())))
}

/// One transport for the whole run (its worker is a thread): each input
/// starts with a reset, as a driver's probe does.
fn transport() -> &'static Mutex<MmioTransport> {
    static TRANSPORT: OnceLock<Mutex<MmioTransport>> = OnceLock::new();
    TRANSPORT.get_or_init(|| {
        let mut device = Block::spare();
        let worker = WorkerHandle::spawn("fuzz", device.take_worker().unwrap(), no_init()).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(libc_nonblock()).unwrap()));
        let evts = vec![EventFd::new(libc_nonblock()).unwrap()];
        Mutex::new(MmioTransport::new(Box::new(device), ram(), interrupt, evts, worker).unwrap())
    })
}

const REG_STATUS: u64 = 0x70;

fuzz_target!(|data: &[u8]| {
    let mut transport = transport().lock().unwrap();
    transport.write(REG_STATUS, &0u32.to_le_bytes());
    for op in data.chunks_exact(9) {
        let offset = u64::from(u32::from_le_bytes([op[1], op[2], op[3], op[4]]) % 0x200);
        let value = [op[5], op[6], op[7], op[8]];
        let len = usize::from(op[0] >> 4).clamp(1, 4);
        if op[0] & 1 == 1 {
            transport.write(offset, &value[..len]);
        } else {
            let mut out = [0u8; 4];
            transport.read(offset, &mut out[..len]);
        }
    }
});

fn libc_nonblock() -> i32 {
    0o4000 // EFD_NONBLOCK
}
