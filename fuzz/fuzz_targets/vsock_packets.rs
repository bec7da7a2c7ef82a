//! virtio-vsock: TX chains read out of guest memory, and the packets they
//! carry driven through the muxer (connections, credit, shutdowns), with
//! RX buffers of every size asked for in between. Nothing may panic,
//! grow without bound, or spin.
#![no_main]

use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use capsid_vmm::devices::virtio::Buffer;
use capsid_vmm::devices::virtio::EventSetup;
use capsid_vmm::devices::virtio::vsock::muxer::Muxer;
use capsid_vmm::devices::virtio::vsock::packet::{Header, read_tx};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;

const CID: u64 = 3;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

fuzz_target!(|data: &[u8]| {
    // The first half: a guest memory and a TX chain laid over it.
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
    let (chain, packets) = data.split_at(data.len() / 2);
    let _ = memory.write_slice(&chain[..chain.len().min(1 << 16)], GuestAddress(0));
    let buffers: Vec<Buffer> = chain
        .chunks_exact(9)
        .take(8)
        .map(|b| Buffer {
            addr: GuestAddress(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            len: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            writable: b[8] & 1 == 1,
        })
        .collect();
    let _ = read_tx(&buffers, &memory);

    // The second half: packets into a muxer.
    let uds = dir().join(format!("v{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let listener = UnixListener::bind(&uds).unwrap();
    listener.set_nonblocking(true).unwrap();
    let epoll = Epoll::new().unwrap();
    let setup = EventSetup::new(&epoll);
    let mut muxer = Muxer::new(CID, &uds, listener);
    let mut rest = packets;
    while rest.len() >= 45 {
        let mut raw = [0u8; 44];
        raw.copy_from_slice(&rest[..44]);
        let capacity = usize::from(rest[44]) * 64;
        rest = &rest[45..];
        let mut header = Header::from_bytes(&raw);
        // Mostly from the guest's CID to the host, so that packets get past
        // the first checks.
        if header.src_cid & 1 == 0 {
            header.src_cid = CID;
            header.dst_cid = 2;
        }
        let len = usize::try_from(header.len)
            .unwrap_or(usize::MAX)
            .min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        muxer.handle_packet(&header, payload.to_vec(), &setup);
        for _ in 0..4 {
            if muxer.next_rx(capacity, &setup).is_none() {
                break;
            }
        }
        assert!(muxer.rx_queue_len() <= muxer.connection_count() + 1);
    }
    drop(muxer);
    let _ = std::fs::remove_file(&uds);
});
