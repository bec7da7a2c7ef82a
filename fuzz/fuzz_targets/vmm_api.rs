//! The VMM API's request parser: any line, with no, one or two
//! descriptors. Snapshots are refused by the desk (this VM "cannot be
//! snapshotted"), so a snapshot request answers at once.
#![no_main]

use std::sync::Arc;

use capsid_vmm::api::{ApiContext, answer};
use capsid_vmm::devices::virtio::Interrupt;
use capsid_vmm::devices::virtio::block::{Block, DiskSlot, DiskSlots};
use capsid_vmm::exit::ExitNotifier;
use capsid_vmm::snapshot::SnapshotDesk;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fn api() -> ApiContext {
    let block = Block::spare();
    let irq = Arc::new(Interrupt::new(EventFd::new(0o4000).unwrap()));
    let slots = Arc::new(DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)]));
    let exit = Arc::new(ExitNotifier::new().unwrap());
    let refusal = Some("this VM cannot be snapshotted: fuzzing".to_owned());
    ApiContext::new(slots, Arc::new(SnapshotDesk::new(exit, refusal)))
}

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let files = match data.first() {
        Some(b'{') => 1,
        Some(b' ') => 2,
        _ => 0,
    };
    let files = (0..files)
        .map(|_| {
            let file = tempfile::tempfile().unwrap();
            file.set_len(4096).unwrap();
            file
        })
        .collect();
    let _ = answer(&api(), &line, files);
});
