//! One vsock stream connection as a pure state machine: the protocol state,
//! the credit accounting both ways and the bytes waiting for the host. It
//! owns no socket and knows no epoll; the [`muxer`](super::muxer) does the
//! I/O and derives what to watch from [`Connection::wants_read`] and
//! [`Connection::wants_write`] after every change, so the two can never
//! disagree.
//!
//! ```text
//!  host-initiated:  AwaitingResponse ──RESPONSE──▶ Established
//!  guest-initiated: (REQUEST, host socket connected) ─────▶ Established
//!  Established ──SHUTDOWN(RCV|SEND)──▶ draining: what the guest sent goes to
//!                                      the host, then close (RST)
//!  any ──RST──▶ closed            any ──protocol violation──▶ reset (RST)
//! ```
//!
//! Credit (virtio 1.2, 5.10.6.3): each side advertises its buffer
//! (`buf_alloc`) and how much of what it received it has passed on
//! (`fwd_cnt`); a sender never has more than `buf_alloc` bytes in flight.
//! We read from the host only while the guest has room, and a guest that
//! sends past the room we advertised is reset.

use std::collections::VecDeque;

use super::packet::Header;
use super::{
    CONN_BUF_ALLOC, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND,
};

/// Send a credit update once the guest believes we have less room than this.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest.
    AwaitingResponse,
    Established,
}

/// What a guest packet asks the muxer to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing beyond re-deriving what to watch.
    Continue,
    /// The guest accepted a host-initiated connection: tell the host
    /// `OK <port>`.
    Accepted,
    /// Bytes for the host were buffered: write them out.
    Flush,
    /// The guest asked how much room we have.
    SendCredit,
    /// The guest reset the connection: drop it without answering.
    Closed,
    /// The guest broke the protocol: reset the connection (RST).
    Reset(&'static str),
}

#[derive(Debug)]
pub struct Connection {
    state: State,
    /// Bytes from the guest not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// Bytes received from the guest, and written on to the host.
    recv_cnt: u32,
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_sent: u32,
    /// The guest's buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// The guest will send no more / receive no more.
    guest_shut_send: bool,
    guest_shut_rcv: bool,
    /// The host closed its write side (we read EOF).
    host_eof: bool,
}

impl Connection {
    /// A host-initiated connection, waiting for the guest's RESPONSE.
    pub fn awaiting_response() -> Self {
        Self::new(State::AwaitingResponse)
    }

    /// A guest-initiated connection whose host socket is connected; the
    /// guest's REQUEST carried its credit.
    pub fn established(request: &Header) -> Self {
        let mut conn = Self::new(State::Established);
        conn.update_peer_credit(request);
        conn
    }

    fn new(state: State) -> Self {
        Self {
            state,
            to_host: VecDeque::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_eof: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// How many bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Room the guest believes we have left.
    fn credit_seen_by_guest(&self) -> u32 {
        CONN_BUF_ALLOC.saturating_sub(self.recv_cnt.wrapping_sub(self.fwd_cnt_sent))
    }

    /// Applies one packet from the guest (already checked to be for this
    /// connection, from the guest's CID, of stream type).
    pub fn on_packet(&mut self, header: &Header, payload: Vec<u8>) -> Verdict {
        if header.op == OP_RST {
            return Verdict::Closed;
        }
        self.update_peer_credit(header);
        match (header.op, self.state) {
            (OP_RESPONSE, State::AwaitingResponse) => {
                self.state = State::Established;
                Verdict::Accepted
            }
            (OP_RW, State::Established) => {
                if self.guest_shut_send {
                    return Verdict::Reset("guest sent data after shutting down");
                }
                if self.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize {
                    return Verdict::Reset("guest sent past its credit");
                }
                self.recv_cnt = self
                    .recv_cnt
                    .wrapping_add(u32::try_from(payload.len()).unwrap_or(0));
                self.to_host.extend(payload);
                Verdict::Flush
            }
            (OP_CREDIT_UPDATE, State::Established) => Verdict::Continue,
            (OP_CREDIT_REQUEST, State::Established) => Verdict::SendCredit,
            (OP_SHUTDOWN, State::Established) => {
                self.guest_shut_send |= header.flags & SHUTDOWN_SEND != 0;
                self.guest_shut_rcv |= header.flags & SHUTDOWN_RCV != 0;
                Verdict::Flush
            }
            _ => Verdict::Reset("unexpected packet for the connection's state"),
        }
    }

    /// Whether bytes from the host socket should be read now: the guest
    /// still receives, has room, and the host has not ended its side.
    pub fn wants_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Whether bytes wait to be written to the host socket.
    pub fn wants_write(&self) -> bool {
        !self.to_host.is_empty()
    }

    fn guest_shut_send_and_rcv(&self) -> bool {
        self.guest_shut_send && self.guest_shut_rcv
    }

    /// The guest shut both directions and everything it sent reached the
    /// host: the connection is over (we then send RST, as Linux does).
    pub fn finished(&self) -> bool {
        self.guest_shut_send_and_rcv() && self.to_host.is_empty()
    }

    /// Whether the host socket's write side should be shut: the guest will
    /// send nothing more and nothing is left to write.
    pub fn host_write_done(&self) -> bool {
        self.guest_shut_send && self.to_host.is_empty()
    }

    /// The bytes waiting for the host, front first.
    pub fn pending_for_host(&self) -> &[u8] {
        self.to_host.as_slices().0
    }

    /// `n` bytes of [`Connection::pending_for_host`] reached the host.
    pub fn forwarded(&mut self, n: usize) {
        let n = n.min(self.to_host.len());
        self.to_host.drain(..n);
        self.fwd_cnt = self
            .fwd_cnt
            .wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// At most how many bytes may be read from the host for the guest now.
    pub fn read_budget(&self, capacity: usize) -> usize {
        if !self.wants_read() {
            return 0;
        }
        capacity
            .min(usize::try_from(self.peer_credit()).unwrap_or(usize::MAX))
            .min(super::MAX_PAYLOAD)
    }

    /// `n` bytes read from the host are on their way to the guest.
    pub fn sent_to_guest(&mut self, n: usize) {
        self.tx_cnt = self
            .tx_cnt
            .wrapping_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The host closed its write side.
    pub fn host_closed(&mut self) {
        self.host_eof = true;
    }

    /// Whether the host closed its write side (we read EOF).
    pub fn host_eof(&self) -> bool {
        self.host_eof
    }

    /// Whether the guest should hear how much room we have again.
    pub fn needs_credit_update(&self) -> bool {
        self.state == State::Established && self.credit_seen_by_guest() < CREDIT_UPDATE_THRESHOLD
    }

    /// Stamps a header to the guest with our credit; the guest now knows
    /// our `fwd_cnt`.
    pub fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = CONN_BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt;
        self.fwd_cnt_sent = self.fwd_cnt;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::{MAX_PAYLOAD, TYPE_STREAM};

    fn packet(op: u16, len: usize, buf_alloc: u32, fwd_cnt: u32) -> (Header, Vec<u8>) {
        let header = Header {
            op,
            type_: TYPE_STREAM,
            len: u32::try_from(len).unwrap(),
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        };
        (header, vec![0u8; len])
    }

    #[test]
    fn reading_follows_the_guests_credit() {
        let (request, _) = packet(1, 0, 100, 0);
        let mut conn = Connection::established(&request);
        assert_eq!(conn.read_budget(4096), 100);
        conn.sent_to_guest(100);
        assert!(!conn.wants_read(), "no credit left");
        let (update, payload) = packet(OP_CREDIT_UPDATE, 0, 100, 60);
        assert_eq!(conn.on_packet(&update, payload), Verdict::Continue);
        assert_eq!(conn.read_budget(4096), 60);
        assert_eq!(conn.read_budget(10), 10);
        let big = Header {
            buf_alloc: u32::MAX,
            ..update
        };
        conn.on_packet(&big, Vec::new());
        assert_eq!(conn.read_budget(usize::MAX), MAX_PAYLOAD);
    }

    #[test]
    fn a_guest_past_its_credit_or_after_shutdown_is_reset() {
        let (request, _) = packet(1, 0, 100, 0);
        let mut conn = Connection::established(&request);
        let (rw, payload) = packet(OP_RW, CONN_BUF_ALLOC as usize, 100, 0);
        assert_eq!(conn.on_packet(&rw, payload), Verdict::Flush);
        let (more, payload) = packet(OP_RW, 1, 100, 0);
        assert!(matches!(conn.on_packet(&more, payload), Verdict::Reset(_)));

        let mut conn = Connection::established(&request);
        let shutdown = Header {
            flags: SHUTDOWN_SEND,
            ..packet(OP_SHUTDOWN, 0, 100, 0).0
        };
        conn.on_packet(&shutdown, Vec::new());
        let (rw, payload) = packet(OP_RW, 1, 100, 0);
        assert!(matches!(conn.on_packet(&rw, payload), Verdict::Reset(_)));
    }

    #[test]
    fn shutdown_both_ways_finishes_once_the_host_has_everything() {
        let (request, _) = packet(1, 0, 100, 0);
        let mut conn = Connection::established(&request);
        let (rw, payload) = packet(OP_RW, 10, 100, 0);
        conn.on_packet(&rw, payload);
        let shutdown = Header {
            flags: SHUTDOWN_SEND | SHUTDOWN_RCV,
            ..packet(OP_SHUTDOWN, 0, 100, 0).0
        };
        assert_eq!(conn.on_packet(&shutdown, Vec::new()), Verdict::Flush);
        assert!(!conn.wants_read());
        assert!(!conn.finished(), "10 bytes still for the host");
        conn.forwarded(10);
        assert!(conn.finished() && conn.host_write_done());
    }

    #[test]
    fn a_host_initiated_connection_waits_for_the_response() {
        let mut conn = Connection::awaiting_response();
        assert!(!conn.wants_read());
        let (rw, payload) = packet(OP_RW, 1, 100, 0);
        assert!(matches!(conn.on_packet(&rw, payload), Verdict::Reset(_)));
        let mut conn = Connection::awaiting_response();
        let (response, payload) = packet(OP_RESPONSE, 0, 100, 0);
        assert_eq!(conn.on_packet(&response, payload), Verdict::Accepted);
        assert!(conn.wants_read());
        let (rst, payload) = packet(OP_RST, 0, 0, 0);
        assert_eq!(conn.on_packet(&rst, payload), Verdict::Closed);
    }
}
