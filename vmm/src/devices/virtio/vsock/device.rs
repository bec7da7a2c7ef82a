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
use super::{DEVICE_TYPE, QUEUE_SIZE};
use crate::devices::virtio::worker::EventSetup;
use crate::devices::virtio::{
    ActivateContext, ActivateError, Interrupt, Memory, VirtioDevice, Worker, WorkerHandle,
    add_used, read_chain, read_config_bytes,
};

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_LISTENER: u64 = 3;

/// Why the vsock device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
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
    cid: u64,
    path: SocketPath,
    listener: Option<UnixListener>,
    config: [u8; 8],
}

impl Vsock {
    /// Listens on `uds` (which must not exist) for host connections.
    pub fn new(cid: u32, uds: &Path) -> Result<Self, VsockError> {
        let listener = UnixListener::bind(uds)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| VsockError::Bind(uds.to_owned(), e))?;
        Ok(Self {
            cid: u64::from(cid),
            path: SocketPath(uds.to_owned()),
            listener: Some(listener),
            config: u64::from(cid).to_le_bytes(),
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

    fn activate(&mut self, ctx: ActivateContext) -> Result<WorkerHandle, ActivateError> {
        if ctx.queues.len() != 3 || ctx.queue_evts.len() != 3 {
            return Err(ActivateError::QueueCount {
                got: ctx.queues.len(),
                want: 3,
            });
        }
        let listener = self
            .listener
            .take()
            .ok_or_else(|| ActivateError::Setup("vsock was already activated once".into()))?;
        let mut queues = ctx.queues.into_iter();
        let mut evts = ctx.queue_evts.into_iter();
        let mut next = || queues.next().zip(evts.next());
        let (Some(rx), Some(tx), Some(event)) = (next(), next(), next()) else {
            return Err(ActivateError::QueueCount { got: 0, want: 3 });
        };
        let worker = VsockWorker {
            memory: ctx.memory,
            rx,
            tx,
            event,
            interrupt: ctx.interrupt,
            muxer: Muxer::new(self.cid, &self.path.0, listener),
        };
        Ok(WorkerHandle::spawn("virtio-vsock", worker)?)
    }
}

struct VsockWorker {
    memory: Memory,
    rx: (Queue, EventFd),
    tx: (Queue, EventFd),
    event: (Queue, EventFd),
    interrupt: std::sync::Arc<Interrupt>,
    muxer: Muxer,
}

impl VsockWorker {
    /// Takes every packet the guest queued on TX.
    fn process_tx(&mut self, setup: &EventSetup<'_>) -> bool {
        let memory = self.memory.memory();
        let queue = &mut self.tx.0;
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            let packet = read_chain(chain)
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
        let memory = self.memory.memory();
        let queue = &mut self.rx.0;
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                break;
            };
            let head = chain.head_index();
            let buffers = match read_chain(chain)
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
    fn init(&mut self, setup: &EventSetup<'_>) -> std::io::Result<()> {
        setup.add(self.rx.1.as_raw_fd(), TOKEN_RX, EventSet::IN)?;
        setup.add(self.tx.1.as_raw_fd(), TOKEN_TX, EventSet::IN)?;
        setup.add(self.event.1.as_raw_fd(), TOKEN_EVENT, EventSet::IN)?;
        setup.add(self.muxer.listener_fd(), TOKEN_LISTENER, EventSet::IN)
    }

    fn handle(&mut self, token: u64, events: EventSet, setup: &EventSetup<'_>) {
        let mut used = false;
        match token {
            TOKEN_RX => {
                let _ = self.rx.1.read();
            }
            TOKEN_TX => {
                let _ = self.tx.1.read();
                used |= self.process_tx(setup);
            }
            TOKEN_EVENT => {
                // We never send transport events; nothing to do.
                let _ = self.event.1.read();
            }
            TOKEN_LISTENER => self.muxer.handle_listener(setup),
            other => match token_fd(other) {
                Some(fd) => self.muxer.handle_stream(fd, events, setup),
                None => setup.remove(i32::try_from(other).unwrap_or(-1)),
            },
        }
        used |= self.process_rx(setup);
        if used {
            self.interrupt.signal_used_queue();
        }
    }
}

impl Drop for VsockWorker {
    fn drop(&mut self) {
        tracing::debug!(metrics = ?self.muxer.metrics, "virtio-vsock stops");
    }
}
