//! The virtio-vsock device and its worker: queue processing glue between
//! the descriptor chains ([`super::packet`]) and the connections ([`Muxer`]).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::muxer::{Muxer, token_fd};
use super::packet::{read_tx, rx_capacity, write_rx};
use super::{DEVICE_TYPE, EVENT_TRANSPORT_RESET, QUEUE_SIZE};
use crate::devices::virtio::{
    ActivateContext, ActivateError, EventSetup, Interrupt, Memory, VirtioDevice, Worker, add_used,
    read_chain, read_config_bytes,
};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_LISTENER: u64 = 3;

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The host-side socket cannot be bound.
    #[error("cannot listen on vsock socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// Removes the listening socket's path when the device goes away.
#[derive(Debug)]
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// virtio-vsock backed by a Unix socket.
#[derive(Debug)]
pub struct Vsock {
    /// Held, not used: dropping the device removes the socket's path.
    _path: SocketPath,
    config: [u8; 8],
    worker: Option<VsockWorker>,
}

impl Vsock {
    /// Listens on `uds` (which must not exist) for host connections. The
    /// socket is made with the process's umask (the VMM sets 077).
    pub fn new(cid: u32, uds: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| VsockError::Bind(uds.to_owned(), e))?;
        let cid = u64::from(cid);
        Ok(Self {
            _path: SocketPath(uds.to_owned()),
            config: cid.to_le_bytes(),
            worker: Some(VsockWorker {
                active: None,
                muxer: Muxer::new(cid, uds, listener),
            }),
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn take_worker(&mut self) -> Option<Box<dyn Worker>> {
        self.worker
            .take()
            .map(|worker| Box::new(worker) as Box<dyn Worker>)
    }
}

/// The queues the driver set up, while the device is active; their
/// eventfds are the transport's (RX, TX, event, in that order).
struct Active {
    memory: Memory,
    rx: Queue,
    tx: Queue,
    /// Kept only to be handed back and for the reset event of a restore.
    event: Queue,
    /// The muxer's listener is watched: host connections are taken.
    listening: bool,
    evts: std::sync::Arc<Vec<EventFd>>,
    interrupt: std::sync::Arc<Interrupt>,
}

impl Active {
    fn evt(&self, index: usize) -> Option<&EventFd> {
        self.evts.get(index)
    }
}

/// Serves the vsock queues and the host sockets on the device's worker
/// thread. The listener outlives a device reset; connections do not.
pub struct VsockWorker {
    active: Option<Active>,
    muxer: Muxer,
}

impl std::fmt::Debug for VsockWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockWorker")
            .field("active", &self.active.is_some())
            .field("muxer", &self.muxer)
            .finish()
    }
}

impl VsockWorker {
    /// Takes every packet the guest queued on TX.
    fn process_tx(&mut self, setup: &EventSetup<'_>) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let memory = active.memory.memory();
        let queue = &mut active.tx;
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let packet = read_chain(queue, &chain)
                .map_err(super::packet::PacketError::from)
                .and_then(|buffers| read_tx(&buffers, memory));
            match packet {
                Ok((header, payload)) => self.muxer.handle_packet(&header, payload, setup),
                Err(e) => {
                    self.muxer.metrics.invalid_packets += 1;
                    crate::guest_warn!("virtio-vsock: TX packet dropped: {e}");
                }
            }
            add_used(queue, memory, head, 0);
            used = true;
        }
        used
    }

    /// Fills guest RX buffers with whatever the muxer has for the guest.
    fn process_rx(&mut self, setup: &EventSetup<'_>) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let memory = active.memory.memory();
        let queue = &mut active.rx;
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let buffers = match read_chain(queue, &chain)
                .map_err(super::packet::PacketError::from)
                .and_then(|b| rx_capacity(&b, memory).map(|cap| (b, cap)))
            {
                Ok(ok) => ok,
                Err(e) => {
                    crate::guest_warn!("virtio-vsock: unusable RX buffer: {e}");
                    add_used(queue, memory, head, 0);
                    used = true;
                    continue;
                }
            };
            let (buffers, capacity) = buffers;
            let Some((header, payload)) = self.muxer.next_rx(capacity, setup) else {
                queue.go_to_previous_position();
                break;
            };
            let len = match write_rx(&buffers, memory, &header, &payload) {
                Ok(len) => len,
                Err(e) => {
                    crate::guest_warn!("virtio-vsock: cannot write an RX packet: {e}");
                    0
                }
            };
            add_used(queue, memory, head, len);
            used = true;
        }
        used
    }
}

impl Worker for VsockWorker {
    fn activate(
        &mut self,
        ctx: ActivateContext,
        setup: &EventSetup<'_>,
    ) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount { got, want: 3 });
        };
        if ctx.queue_evts.len() != 3 {
            return Err(ActivateError::QueueCount {
                got: ctx.queue_evts.len(),
                want: 3,
            });
        }
        let tokens = [TOKEN_RX, TOKEN_TX, TOKEN_EVENT];
        for (evt, token) in ctx.queue_evts.iter().zip(tokens) {
            setup
                .add(evt.as_raw_fd(), token, EventSet::IN)
                .map_err(ActivateError::Watch)?;
        }
        let mut active = Active {
            memory: ctx.memory,
            rx,
            tx,
            event,
            evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            listening: false,
        };
        // After a restore, host connections wait until the guest has
        // handled the transport reset: Linux resets every connected socket
        // when it does, so a connection made before would be dropped on the
        // guest's side without a word to the host. The guest gives the
        // event buffer back when it is done (see `handle`).
        if ctx.restored && send_transport_reset(&mut active) {
            // Raised with the restored VM's other pending interrupts, once
            // its vCPUs are back (`MmioTransport::raise_pending`).
            active
                .interrupt
                .raise_status(crate::devices::virtio::INT_USED_RING);
        } else {
            listen(&self.muxer, &mut active, setup).map_err(ActivateError::Watch)?;
        }
        self.active = Some(active);
        Ok(())
    }

    fn deactivate(&mut self, setup: &EventSetup<'_>) -> Vec<Queue> {
        self.muxer.reset_all(setup);
        let Some(active) = self.active.take() else {
            return Vec::new();
        };
        for evt in active.evts.iter() {
            setup.remove(evt.as_raw_fd());
        }
        if active.listening {
            setup.remove(self.muxer.listener_fd());
        }
        vec![active.rx, active.tx, active.event]
    }

    fn handle(&mut self, token: u64, events: EventSet, setup: &EventSetup<'_>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        match token {
            TOKEN_RX => {
                // Buffers were added (used below).
                if let Some(evt) = active.evt(0) {
                    let _ = evt.read();
                }
            }
            TOKEN_EVENT => {
                // The guest gave an event buffer back: after a restore, it
                // has handled the transport reset, and host connections
                // may come in.
                if let Some(evt) = active.evt(2) {
                    let _ = evt.read();
                }
                if !active.listening {
                    if let Err(e) = listen(&self.muxer, active, setup) {
                        tracing::error!("virtio-vsock: cannot take host connections: {e}");
                    } else {
                        tracing::info!("virtio-vsock: the guest handled the transport reset");
                    }
                }
            }
            TOKEN_TX => {
                if let Some(evt) = active.evt(1) {
                    let _ = evt.read();
                }
                used |= self.process_tx(setup);
            }
            TOKEN_LISTENER => self.muxer.handle_listener(setup),
            other => match token_fd(other) {
                Some(fd) => self.muxer.handle_stream(fd, events, setup),
                None => setup.remove(i32::try_from(other).unwrap_or(-1)),
            },
        }
        used |= self.process_rx(setup);
        if used && let Some(active) = &self.active {
            active.interrupt.signal_used_queue();
        }
    }
}

/// Starts taking host connections (the muxer's listener, watched).
fn listen(muxer: &Muxer, active: &mut Active, setup: &EventSetup<'_>) -> std::io::Result<()> {
    setup.add(muxer.listener_fd(), TOKEN_LISTENER, EventSet::IN)?;
    active.listening = true;
    Ok(())
}

/// Puts a transport-reset event in the guest's first event buffer: the
/// guest forgets the connections it had when the snapshot was taken (their
/// host ends are gone). Whether an event was put; a guest that posted no
/// usable event buffer gets none, and its stale connections are reset
/// one by one as they are used (the muxer answers them with RST).
fn send_transport_reset(active: &mut Active) -> bool {
    use vm_memory::Bytes;
    let memory = active.memory.memory();
    let queue = &mut active.event;
    let Some(chain) = queue.pop_descriptor_chain(memory) else {
        crate::guest_warn!("virtio-vsock: no event buffer for the transport reset");
        return false;
    };
    let head = chain.head_index();
    let event = EVENT_TRANSPORT_RESET.to_le_bytes();
    let written = match read_chain(queue, &chain) {
        Ok(buffers) => match buffers.first() {
            Some(buffer)
                if buffer.writable
                    && usize::try_from(buffer.len).is_ok_and(|len| len >= event.len()) =>
            {
                memory.write_slice(&event, buffer.addr).is_ok()
            }
            _ => false,
        },
        Err(_) => false,
    };
    if !written {
        crate::guest_warn!("virtio-vsock: unusable event buffer for the transport reset");
    }
    let len = if written { 4 } else { 0 };
    add_used(queue, memory, head, len);
    true
}

impl Drop for VsockWorker {
    fn drop(&mut self) {
        let metrics = serde_json::to_string(&self.muxer.metrics).unwrap_or_default();
        tracing::info!(metrics = %metrics, "virtio-vsock stops");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::packet::Header;
    use crate::devices::virtio::vsock::{HEADER_LEN, HOST_CID, OP_REQUEST, OP_RST, TYPE_STREAM};
    use std::sync::Arc;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::Epoll;

    const W: u16 = 2; // VRING_DESC_F_WRITE
    const CID: u64 = 3;

    fn header(op: u16, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 4000,
            dst_port: 9,
            len,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Header::default()
        }
    }

    /// An `Active` over mock queues whose event queue holds `events`.
    fn active_with_events(ram: &Arc<crate::memory::GuestRam>, events: &[RawDescriptor]) -> Active {
        let mem = ram.memory();
        let queue = |addr| MockSplitQueue::create(mem, GuestAddress(addr), 16);
        let event = queue(0x3_0000);
        if !events.is_empty() {
            event.add_desc_chains(events, 0).unwrap();
        }
        Active {
            memory: Arc::clone(ram),
            rx: queue(0x1_0000).create_queue().unwrap(),
            tx: queue(0x2_0000).create_queue().unwrap(),
            event: event.create_queue().unwrap(),
            evts: Arc::new((0..3).map(|_| EventFd::new(0).unwrap()).collect()),
            interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            listening: false,
        }
    }

    #[test]
    fn a_restored_device_takes_host_connections_once_the_guest_handled_the_reset() {
        let ram = Arc::new(crate::memory::GuestRam::new(4 << 20).unwrap());
        let mem = ram.memory();
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let epoll = Epoll::new().unwrap();
        let setup = EventSetup::new(&epoll);
        for restored in [false, true] {
            let _ = std::fs::remove_file(&uds);
            let listener = UnixListener::bind(&uds).unwrap();
            listener.set_nonblocking(true).unwrap();
            let mut worker = VsockWorker {
                active: None,
                muxer: Muxer::new(CID, &uds, listener),
            };
            let queue = |addr| MockSplitQueue::create(mem, GuestAddress(addr), 16);
            let event = queue(0x3_0000);
            event
                .add_desc_chains(
                    &[RawDescriptor::from(Descriptor::new(0x10_0000, 4, W, 0))],
                    0,
                )
                .unwrap();
            let ctx = ActivateContext {
                memory: Arc::clone(&ram),
                queues: vec![
                    queue(0x1_0000).create_queue().unwrap(),
                    queue(0x2_0000).create_queue().unwrap(),
                    event.create_queue().unwrap(),
                ],
                queue_evts: Arc::new((0..3).map(|_| EventFd::new(0).unwrap()).collect()),
                interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
                acked_features: 0,
                restored,
            };
            worker.activate(ctx, &setup).unwrap();
            let listening = |w: &VsockWorker| w.active.as_ref().unwrap().listening;
            // A fresh device takes them at once; a restored one after the
            // guest gave the reset event's buffer back.
            assert_eq!(listening(&worker), !restored);
            // The guest kicks the event queue (its eventfd, as KVM would).
            let kick = |w: &mut VsockWorker| {
                w.active.as_ref().unwrap().evts[2].write(1).unwrap();
                w.handle(TOKEN_EVENT, EventSet::IN, &setup);
            };
            kick(&mut worker);
            assert!(listening(&worker));
            // Watched once only: a second event changes nothing.
            kick(&mut worker);
            let queues = worker.deactivate(&setup);
            assert_eq!(queues.len(), 3);
            assert_eq!(queues[2].next_used(), u16::from(restored));
        }
    }

    #[test]
    fn a_restored_device_tells_the_guest_its_connections_are_gone() {
        let ram = Arc::new(crate::memory::GuestRam::new(4 << 20).unwrap());
        let mem = ram.memory();
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
            .unwrap();
        let mut active = active_with_events(
            &ram,
            &[RawDescriptor::from(Descriptor::new(0x10_0000, 4, W, 0))],
        );
        assert!(send_transport_reset(&mut active));
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
            EVENT_TRANSPORT_RESET
        );
        assert_eq!(active.event.next_used(), 1);
        // No buffer: no event, and nothing written anywhere.
        assert!(!send_transport_reset(&mut active));

        // A buffer the device may not write, or too small: returned unwritten.
        for (flags, len) in [(0, 4), (W, 2)] {
            mem.write_obj(0xffff_ffffu32, GuestAddress(0x10_0000))
                .unwrap();
            let mut active = active_with_events(
                &ram,
                &[RawDescriptor::from(Descriptor::new(
                    0x10_0000, len, flags, 0,
                ))],
            );
            assert!(send_transport_reset(&mut active));
            assert_eq!(
                mem.read_obj::<u32>(GuestAddress(0x10_0000)).unwrap(),
                0xffff_ffff
            );
            assert_eq!(active.event.next_used(), 1, "the buffer goes back");
        }
    }

    #[test]
    fn bad_tx_chains_are_dropped_and_good_ones_answered_on_rx() {
        let ram = Arc::new(crate::memory::GuestRam::new(4 << 20).unwrap());
        let mem = ram.memory();
        let rx_mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
        let tx_mock = MockSplitQueue::create(mem, GuestAddress(0x2_0000), 16);
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut worker = VsockWorker {
            active: Some(Active {
                memory: Arc::clone(&ram),
                rx: rx_mock.create_queue().unwrap(),
                tx: tx_mock.create_queue().unwrap(),
                event: MockSplitQueue::create(mem, GuestAddress(0x3_0000), 16)
                    .create_queue()
                    .unwrap(),
                evts: Arc::new((0..3).map(|_| EventFd::new(0).unwrap()).collect()),
                interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
                listening: true,
            }),
            muxer: Muxer::new(CID, &uds, listener),
        };

        // TX, in one go: a truncated header (20 bytes), a header claiming
        // 1 MiB of payload, a writable TX descriptor, a buffer outside RAM,
        // then a REQUEST for a port nobody listens on.
        let pkt = |addr: u64, h: Header| {
            mem.write_slice(&h.to_bytes(), GuestAddress(addr)).unwrap();
        };
        pkt(0x10_0000, header(OP_REQUEST, 0));
        pkt(0x10_1000, header(OP_REQUEST, 1 << 20));
        pkt(0x10_2000, header(OP_REQUEST, 0));
        let len = u32::try_from(HEADER_LEN).unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x10_0000, 20, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x10_1000, len + 16, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x10_0000, len, W, 0)),
            RawDescriptor::from(Descriptor::new(0x3ff_fff0, len, 0, 0)),
            RawDescriptor::from(Descriptor::new(0x10_2000, len, 0, 0)),
        ];
        tx_mock.add_desc_chains(&descs, 0).unwrap();
        // RX: two buffers, the first too small for a header.
        rx_mock
            .add_desc_chains(
                &[
                    RawDescriptor::from(Descriptor::new(0x20_0000, 16, W, 0)),
                    RawDescriptor::from(Descriptor::new(0x20_1000, 4096, W, 0)),
                ],
                0,
            )
            .unwrap();

        let epoll = Epoll::new().unwrap();
        let setup = EventSetup::new(&epoll);
        assert!(worker.process_tx(&setup));
        assert_eq!(tx_mock.used().idx().load(), 5, "every TX chain is returned");
        assert_eq!(worker.muxer.metrics.invalid_packets, 4);
        assert!(worker.process_rx(&setup));
        assert_eq!(rx_mock.used().idx().load(), 2);
        let answer = rx_mock.used().ring().ref_at(1).unwrap().load();
        assert_eq!(answer.len(), len);
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x20_1000)).unwrap();
        let rst = Header::from_bytes(&raw);
        assert_eq!(
            (rst.op, rst.dst_port, rst.src_port, rst.dst_cid),
            (OP_RST, 4000, 9, CID)
        );
    }
}
