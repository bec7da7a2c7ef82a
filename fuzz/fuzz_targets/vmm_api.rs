//! The VMM API's request parser: any line, with or without an image.
#![no_main]

use std::sync::Arc;

use capsid_vmm::api::answer;
use capsid_vmm::devices::virtio::Interrupt;
use capsid_vmm::devices::virtio::block::{Block, DiskSlot, DiskSlots};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fn slots() -> DiskSlots {
    let block = Block::spare();
    let irq = Arc::new(Interrupt::new(EventFd::new(0o4000).unwrap()));
    DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)])
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let image = (data.first() == Some(&b'{')).then(|| {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        file
    });
    let _ = answer(&slots(), &line, image);
});
