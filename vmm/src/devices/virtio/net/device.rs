//! The virtio-net device and its worker.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::frames::{NetMetrics, Pass, Rx, process_tx};
use super::tap::{Tap, TapError};
use super::{
    DEVICE_TYPE, F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6, F_MAC,
    F_MRG_RXBUF, F_MTU, MAX_FRAME_WITH_HEADER, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::devices::virtio::{
    ActivateContext, ActivateError, EventSetup, Interrupt, Memory, VIRTIO_F_VERSION_1,
    VirtioDevice, Worker, read_config_bytes,
};

/// Epoll tokens of the worker.
const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
/// Frames each way per event before the worker serves its other fds
/// (a flood from either side cannot starve the other).
const BUDGET: usize = 64;

/// Why a network device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap descriptor is unusable.
    #[error("cannot use the tap")]
    Tap(#[from] TapError),
}

/// A virtio-net device over a tap.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    mtu: Option<u16>,
    worker: Option<NetWorker>,
}

impl Net {
    /// A device that gives the guest `mac` (and `mtu`, when given) and
    /// passes its frames to and from `tap`.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: Option<u16>) -> Self {
        Self {
            mac,
            mtu,
            worker: Some(NetWorker {
                tap,
                active: None,
                rx: Rx::default(),
                frame: Vec::with_capacity(MAX_FRAME_WITH_HEADER),
                metrics: NetMetrics::default(),
            }),
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | F_MAC
            | F_MRG_RXBUF
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | if self.mtu.is_some() { F_MTU } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `mac` (6 bytes), `status` (u16, no VIRTIO_NET_F_STATUS),
        // `max_virtqueue_pairs` (u16, no VIRTIO_NET_F_MQ), `mtu` (u16).
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn take_worker(&mut self) -> Option<Box<dyn Worker>> {
        self.worker
            .take()
            .map(|worker| Box::new(worker) as Box<dyn Worker>)
    }
}

/// The queues the driver set up, while the device is active.
#[derive(Debug)]
struct Active {
    memory: Memory,
    rx: Queue,
    tx: Queue,
    queue_evts: Arc<Vec<EventFd>>,
    interrupt: Arc<Interrupt>,
    acked: u64,
}

/// The tap offloads (`TUN_F_*`) matching what the driver takes.
fn tap_offloads(acked: u64) -> u32 {
    if acked & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut offloads = libc::TUN_F_CSUM;
    if acked & F_GUEST_TSO4 != 0 {
        offloads |= libc::TUN_F_TSO4;
    }
    if acked & F_GUEST_TSO6 != 0 {
        offloads |= libc::TUN_F_TSO6;
    }
    offloads
}

/// Serves the queues and the tap on the device's worker thread.
#[derive(Debug)]
pub struct NetWorker {
    tap: Tap,
    active: Option<Active>,
    rx: Rx,
    /// The copy of the frame being transmitted.
    frame: Vec<u8>,
    metrics: NetMetrics,
}

impl NetWorker {
    fn serve_rx(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let mergeable = active.acked & F_MRG_RXBUF != 0;
        let pass = self.rx.process(
            &mut active.rx,
            active.memory.memory(),
            &mut self.tap,
            mergeable,
            &mut self.metrics,
            BUDGET,
        );
        finish(active, RX_QUEUE, pass);
    }

    fn serve_tx(&mut self) {
        let Some(active) = &mut self.active else {
            return;
        };
        let pass = process_tx(
            &mut active.tx,
            active.memory.memory(),
            &mut self.tap,
            active.acked,
            &mut self.metrics,
            &mut self.frame,
            BUDGET,
        );
        finish(active, TX_QUEUE, pass);
    }
}

/// Interrupts the driver if the pass asks for it, and comes back to the
/// queue (through its own eventfd) if work was left.
fn finish(active: &Active, queue: usize, pass: Pass) {
    if pass.notify {
        active.interrupt.signal_used_queue();
    }
    if pass.more
        && let Some(evt) = active.queue_evts.get(queue)
        && let Err(e) = evt.write(1)
    {
        tracing::warn!("virtio-net: cannot requeue work on queue {queue}: {e}");
    }
}

impl Worker for NetWorker {
    fn activate(
        &mut self,
        ctx: ActivateContext,
        setup: &EventSetup<'_>,
    ) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), None, Some(rx_evt), Some(tx_evt)) = (
            queues.next(),
            queues.next(),
            queues.next(),
            ctx.queue_evts.get(RX_QUEUE),
            ctx.queue_evts.get(TX_QUEUE),
        ) else {
            return Err(ActivateError::QueueCount { got, want: 2 });
        };
        let offloads = tap_offloads(ctx.acked_features);
        if let Err(e) = self.tap.set_offloads(offloads) {
            tracing::warn!(
                "virtio-net: {}; the guest gets frames without offloads",
                capsid_base::error_chain(&e)
            );
            let _ = self.tap.set_offloads(0);
        }
        for (fd, token, events) in [
            (rx_evt.as_raw_fd(), RX_TOKEN, EventSet::IN),
            (tx_evt.as_raw_fd(), TX_TOKEN, EventSet::IN),
            (
                self.tap.as_raw_fd(),
                TAP_TOKEN,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
        ] {
            if let Err(e) = setup.add(fd, token, events) {
                setup.remove(rx_evt.as_raw_fd());
                setup.remove(tx_evt.as_raw_fd());
                setup.remove(self.tap.as_raw_fd());
                return Err(ActivateError::Watch(e));
            }
        }
        self.rx.reset();
        self.active = Some(Active {
            memory: ctx.memory,
            rx,
            tx,
            queue_evts: Arc::clone(&ctx.queue_evts),
            interrupt: ctx.interrupt,
            acked: ctx.acked_features,
        });
        // Frames that reached the tap before the driver was ready.
        self.serve_rx();
        Ok(())
    }

    fn deactivate(&mut self, setup: &EventSetup<'_>) -> Vec<Queue> {
        self.rx.reset();
        let Some(active) = self.active.take() else {
            return Vec::new();
        };
        for evt in active.queue_evts.iter() {
            setup.remove(evt.as_raw_fd());
        }
        setup.remove(self.tap.as_raw_fd());
        vec![active.rx, active.tx]
    }

    fn handle(&mut self, token: u64, _events: EventSet, _setup: &EventSetup<'_>) {
        let Some(active) = &self.active else {
            return;
        };
        match token {
            RX_TOKEN | TX_TOKEN => {
                let queue = if token == RX_TOKEN {
                    RX_QUEUE
                } else {
                    TX_QUEUE
                };
                if let Some(evt) = active.queue_evts.get(queue) {
                    let _ = evt.read();
                }
                if token == RX_TOKEN {
                    self.serve_rx();
                } else {
                    self.serve_tx();
                }
            }
            TAP_TOKEN => self.serve_rx(),
            _ => {}
        }
    }
}

impl Drop for NetWorker {
    fn drop(&mut self) {
        let metrics = serde_json::to_string(&self.metrics).unwrap_or_default();
        tracing::info!(tap = self.tap.name(), metrics = %metrics, "virtio-net stops");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_what_the_driver_takes() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(F_GUEST_TSO4),
            0,
            "no TSO without checksum offload"
        );
        assert_eq!(tap_offloads(F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
    }
}
