//! Connections between the guest and host Unix sockets: the vsock protocol
//! state machine, credit accounting, and the hybrid-vsock handshake.
//!
//! ```text
//!  host-initiated:  accepted ──"CONNECT p\n"──▶ AwaitingResponse ──RESPONSE──▶ Established
//!                                        (REQUEST sent)             └──RST──▶ closed
//!  guest-initiated: REQUEST ──connect <uds>_p ok──▶ Established (RESPONSE sent)
//!                           └──refused──▶ RST sent
//!  Established ──SHUTDOWN both──▶ draining (what the guest sent reaches the host) ──▶ closed, RST sent
//!  Established ──RST / socket error──▶ closed (RST sent unless received)
//! ```
//!
//! Nothing here trusts the guest: a packet with the wrong CIDs, type or op,
//! for a connection that does not exist, or with more data than the credit
//! we gave, gets an RST (never for an RST) and a rate-limited log line. The
//! memory the muxer holds is bounded: [`MAX_CONNECTIONS`] connections with
//! at most [`CONN_BUF_ALLOC`] bytes buffered towards the host each, and a
//! bounded queue of control packets towards the guest.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::packet::Header;
use super::{
    CONN_BUF_ALLOC, HOST_CID, MAX_CONNECTIONS, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::devices::virtio::worker::EventSetup;

/// epoll token of a socket: its fd plus this base (lower tokens are the
/// device's queues and listener).
pub const STREAM_TOKEN_BASE: u64 = 16;
/// The longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Guest-bound control packets waiting for RX buffers; past this, new ones
/// are dropped (the guest starves only itself by not reading).
const MAX_CONTROL_BACKLOG: usize = 4 * MAX_CONNECTIONS;
/// First host port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Send a credit update once the guest believes we have less room than this.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// A connection: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// Counters, exported with the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VsockMetrics {
    pub connections: u64,
    pub bytes_to_host: u64,
    pub bytes_to_guest: u64,
    pub rst_sent: u64,
    pub invalid_packets: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest.
    AwaitingResponse,
    Established,
}

#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    state: State,
    /// Bytes from the guest not yet written to the socket.
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
    guest_shut_send: bool,
    /// The guest shut both directions: close once `to_host` is written.
    guest_done: bool,
    host_eof: bool,
    /// Waiting in `rx_ready` or for credit; not polled for input meanwhile.
    reading: bool,
    interest: EventSet,
}

impl Connection {
    fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            to_host: VecDeque::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            guest_shut_send: false,
            guest_done: false,
            host_eof: false,
            reading: false,
            interest: EventSet::empty(),
        }
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
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
}

/// A host socket that connected to the listener and has not yet said which
/// guest port it wants.
#[derive(Debug)]
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// What [`Muxer::next_rx`] hands the device: a header and its payload.
pub type RxPacket = (Header, Vec<u8>);

/// All vsock connections of one VM.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    pending: HashMap<RawFd, PendingHost>,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    control: VecDeque<Header>,
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
    pub metrics: VsockMetrics,
}

fn token(fd: RawFd) -> u64 {
    STREAM_TOKEN_BASE + u64::try_from(fd).unwrap_or(0)
}

/// The fd of a socket token, if it is one.
pub fn token_fd(token: u64) -> Option<RawFd> {
    token
        .checked_sub(STREAM_TOKEN_BASE)
        .and_then(|fd| RawFd::try_from(fd).ok())
}

impl Muxer {
    /// `listener` is the bound, non-blocking socket at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            pending: HashMap::new(),
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            metrics: VsockMetrics::default(),
        }
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn header(guest_cid: u64, key: ConnKey, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: CONN_BUF_ALLOC,
            ..Header::default()
        }
    }

    /// Queues a control packet for the guest, stamped with our credit.
    fn send_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_CONTROL_BACKLOG {
            crate::guest_warn!(op, "vsock: guest is not reading; control packet dropped");
            return;
        }
        let mut header = Self::header(self.guest_cid, key, op);
        header.flags = flags;
        if let Some(conn) = self.conns.get_mut(&key) {
            header.fwd_cnt = conn.fwd_cnt;
            conn.fwd_cnt_sent = conn.fwd_cnt;
        }
        if op == OP_RST {
            self.metrics.rst_sent += 1;
        }
        self.control.push_back(header);
    }

    fn set_interest(conn: &mut Connection, interest: EventSet, setup: &EventSetup<'_>) {
        if conn.interest != interest {
            let fd = conn.stream.as_raw_fd();
            if let Err(e) = setup.modify(fd, token(fd), interest) {
                tracing::error!("vsock: cannot watch a host socket: {e}");
            }
            conn.interest = interest;
        }
    }

    /// Drops a connection and its socket (the host sees EOF).
    fn close(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.stream.as_raw_fd();
            setup.remove(fd);
            self.by_fd.remove(&fd);
        }
        self.rx_ready.retain(|k| *k != key);
    }

    fn reset(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        self.send_control(key, OP_RST, 0);
        self.close(key, setup);
    }

    /// Accepts every host connection waiting on the listener.
    pub fn handle_listener(&mut self, setup: &EventSetup<'_>) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(
                            "vsock: {MAX_CONNECTIONS} connections open; host connection refused"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = setup.add(fd, token(fd), EventSet::IN) {
                        tracing::error!("vsock: cannot watch a host socket: {e}");
                        continue;
                    }
                    self.pending.insert(
                        fd,
                        PendingHost {
                            stream,
                            line: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Handles readiness of a host socket.
    pub fn handle_stream(&mut self, fd: RawFd, events: EventSet, setup: &EventSetup<'_>) {
        if self.pending.contains_key(&fd) {
            self.read_connect_line(fd, setup);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            setup.remove(fd);
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == State::AwaitingResponse {
            if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                // The host gave up before the guest answered.
                self.reset(key, setup);
            }
            return;
        }
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && conn.host_eof {
            // The host closed both directions and everything it sent is read.
            self.reset(key, setup);
            return;
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host(key, setup);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.wake_reader(key, setup);
        }
    }

    /// Reads the `CONNECT <port>\n` line one byte at a time, so that bytes
    /// after it stay in the socket for the guest.
    fn read_connect_line(&mut self, fd: RawFd, setup: &EventSetup<'_>) {
        let Some(pending) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if pending.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long");
                }
                Ok(_) => pending.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("read failed"),
            }
        };
        let Some(pending) = self.pending.remove(&fd) else {
            return;
        };
        let port = done.and_then(|()| parse_connect(&pending.line).ok_or("malformed CONNECT line"));
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                tracing::warn!("vsock: host connection dropped: {why}");
                setup.remove(fd);
                return;
            }
        };
        let key = ConnKey {
            local_port: self.allocate_local_port(),
            peer_port: port,
        };
        let mut conn = Connection::new(pending.stream, State::AwaitingResponse);
        // Only hang-ups matter until the guest answers.
        Self::set_interest(&mut conn, EventSet::empty(), setup);
        self.conns.insert(key, conn);
        self.by_fd.insert(fd, key);
        self.metrics.connections += 1;
        self.send_control(key, OP_REQUEST, 0);
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == port) {
                return port;
            }
        }
    }

    /// Marks a connection as having input for the guest, if it may send.
    fn wake_reader(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want_out = if conn.to_host.is_empty() {
            EventSet::empty()
        } else {
            EventSet::OUT
        };
        if conn.host_eof || conn.reading {
            Self::set_interest(conn, want_out, setup);
            return;
        }
        conn.reading = true;
        Self::set_interest(conn, want_out, setup);
        self.rx_ready.push_back(key);
    }

    /// Writes buffered guest data to the host socket.
    fn flush_to_host(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while !conn.to_host.is_empty() {
            let (front, _) = conn.to_host.as_slices();
            match conn.stream.write(front) {
                Ok(n) => {
                    conn.to_host.drain(..n);
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                    self.metrics.bytes_to_host += u64::try_from(n).unwrap_or(0);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset(key, setup);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.to_host.is_empty() && conn.guest_done {
            // Everything the guest sent is with the host: now close.
            self.reset(key, setup);
            return;
        }
        let reading_in = if conn.reading || conn.host_eof || conn.guest_done {
            EventSet::empty()
        } else {
            EventSet::IN
        };
        let out = if conn.to_host.is_empty() {
            EventSet::empty()
        } else {
            EventSet::OUT
        };
        Self::set_interest(conn, reading_in | out, setup);
        if conn.to_host.is_empty() && conn.guest_shut_send {
            let _ = conn.stream.shutdown(Shutdown::Write);
        }
        if conn.credit_seen_by_guest() < CREDIT_UPDATE_THRESHOLD {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Handles one packet from the guest.
    pub fn handle_packet(&mut self, header: &Header, payload: Vec<u8>, setup: &EventSetup<'_>) {
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if header.src_cid != self.guest_cid {
            self.metrics.invalid_packets += 1;
            crate::guest_warn!(
                src_cid = header.src_cid,
                "vsock: packet with a spoofed source CID dropped"
            );
            return;
        }
        let valid = header.dst_cid == HOST_CID && header.type_ == TYPE_STREAM;
        if !valid {
            self.metrics.invalid_packets += 1;
            crate::guest_warn!(
                dst_cid = header.dst_cid,
                type_ = header.type_,
                "vsock: packet for another CID or of an unknown type"
            );
            if header.op != OP_RST {
                self.send_control(key, OP_RST, 0);
            }
            return;
        }
        if header.op == OP_REQUEST {
            self.guest_connect(key, header, setup);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != OP_RST {
                self.metrics.invalid_packets += 1;
                crate::guest_warn!(
                    op = header.op,
                    port = header.dst_port,
                    "vsock: packet for no connection"
                );
                self.send_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(header);
        match (header.op, &conn.state) {
            (OP_RESPONSE, State::AwaitingResponse) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                if conn.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key, setup);
                    return;
                }
                self.wake_reader(key, setup);
            }
            (OP_RW, State::Established) => {
                let over_credit = conn.to_host.len() + payload.len() > CONN_BUF_ALLOC as usize;
                if conn.guest_shut_send || over_credit {
                    self.metrics.invalid_packets += 1;
                    crate::guest_warn!(
                        len = payload.len(),
                        "vsock: guest sent past its credit or after shutting down"
                    );
                    self.reset(key, setup);
                    return;
                }
                conn.recv_cnt = conn
                    .recv_cnt
                    .wrapping_add(u32::try_from(payload.len()).unwrap_or(0));
                conn.to_host.extend(payload);
                self.flush_to_host(key, setup);
            }
            (OP_CREDIT_UPDATE, State::Established) => {
                if conn.peer_credit() > 0 {
                    self.wake_reader(key, setup);
                }
            }
            (OP_CREDIT_REQUEST, State::Established) => self.send_control(key, OP_CREDIT_UPDATE, 0),
            (OP_SHUTDOWN, State::Established) => {
                if header.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_shut_send = true;
                }
                if header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both directions are done: hand over what we hold, then
                    // close (flush_to_host closes once the buffer is empty;
                    // a host that does not read keeps it until the guest's
                    // own close timeout sends RST).
                    conn.guest_shut_send = true;
                    conn.guest_done = true;
                }
                self.flush_to_host(key, setup);
            }
            (OP_RST, _) => self.close(key, setup),
            (op, state) => {
                self.metrics.invalid_packets += 1;
                crate::guest_warn!(op, ?state, "vsock: unexpected packet; connection reset");
                self.reset(key, setup);
            }
        }
    }

    /// A guest connection to host port P: connect to `<uds>_P`.
    fn guest_connect(&mut self, key: ConnKey, header: &Header, setup: &EventSetup<'_>) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            crate::guest_warn!(
                port = key.local_port,
                "vsock: duplicate connection or too many; refused"
            );
            self.send_control(key, OP_RST, 0);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.local_port));
        let stream = UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s));
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(
                    port = key.local_port,
                    "vsock: guest connection refused: {e}"
                );
                self.send_control(key, OP_RST, 0);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        if setup.add(fd, token(fd), EventSet::empty()).is_err() {
            self.send_control(key, OP_RST, 0);
            return;
        }
        let mut conn = Connection::new(stream, State::Established);
        conn.update_peer_credit(header);
        self.conns.insert(key, conn);
        self.by_fd.insert(fd, key);
        self.metrics.connections += 1;
        self.send_control(key, OP_RESPONSE, 0);
        self.wake_reader(key, setup);
    }

    /// Whether anything may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest with at most `capacity` payload bytes.
    pub fn next_rx(&mut self, capacity: usize, setup: &EventSetup<'_>) -> Option<RxPacket> {
        if let Some(header) = self.control.pop_front() {
            return Some((header, Vec::new()));
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let credit = usize::try_from(conn.peer_credit()).unwrap_or(0);
            let n = capacity.min(credit).min(MAX_PAYLOAD);
            if n == 0 {
                // Wait for a credit update (or a bigger buffer) before reading.
                conn.reading = false;
                if credit > 0 {
                    self.rx_ready.push_front(key);
                    return None;
                }
                continue;
            }
            let mut data = vec![0u8; n];
            match conn.stream.read(&mut data) {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.reading = false;
                    let mut header = Self::header(self.guest_cid, key, OP_SHUTDOWN);
                    header.flags = SHUTDOWN_SEND;
                    header.fwd_cnt = conn.fwd_cnt;
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    let out = if conn.to_host.is_empty() {
                        EventSet::empty()
                    } else {
                        EventSet::OUT
                    };
                    Self::set_interest(conn, out, setup);
                    return Some((header, Vec::new()));
                }
                Ok(read) => {
                    data.truncate(read);
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(u32::try_from(read).unwrap_or(0));
                    let mut header = Self::header(self.guest_cid, key, OP_RW);
                    header.len = u32::try_from(read).unwrap_or(0);
                    header.fwd_cnt = conn.fwd_cnt;
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    self.metrics.bytes_to_guest += u64::try_from(read).unwrap_or(0);
                    // There may be more: read again on the next buffer.
                    self.rx_ready.push_back(key);
                    return Some((header, data));
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    conn.reading = false;
                    let out = if conn.to_host.is_empty() {
                        EventSet::empty()
                    } else {
                        EventSet::OUT
                    };
                    Self::set_interest(conn, EventSet::IN | out, setup);
                }
                Err(_) => {
                    self.reset(key, setup);
                    if let Some(header) = self.control.pop_front() {
                        return Some((header, Vec::new()));
                    }
                }
            }
        }
        None
    }
}

/// Parses `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    line.strip_prefix("CONNECT ")?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::time::Duration;
    use vmm_sys_util::epoll::Epoll;

    const GUEST_CID: u64 = 3;

    struct Harness {
        _dir: tempfile::TempDir,
        uds: PathBuf,
        epoll: Epoll,
        muxer: Muxer,
    }

    impl Harness {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let uds = dir.path().join("vsock");
            let listener = UnixListener::bind(&uds).unwrap();
            listener.set_nonblocking(true).unwrap();
            let muxer = Muxer::new(GUEST_CID, &uds, listener);
            Self {
                _dir: dir,
                uds,
                epoll: Epoll::new().unwrap(),
                muxer,
            }
        }

        fn guest(&mut self, op: u16, local_port: u32, peer_port: u32, payload: &[u8]) {
            let header = Header {
                len: u32::try_from(payload.len()).unwrap(),
                ..guest_header(op, local_port, peer_port)
            };
            self.send(header, payload);
        }

        fn send(&mut self, header: Header, payload: &[u8]) {
            let setup = EventSetup::new(&self.epoll);
            self.muxer.handle_packet(&header, payload.to_vec(), &setup);
        }

        fn rx(&mut self) -> Option<RxPacket> {
            let setup = EventSetup::new(&self.epoll);
            self.muxer.next_rx(4096, &setup)
        }

        /// Polls all host sockets as the worker would.
        fn poll(&mut self) {
            let setup = EventSetup::new(&self.epoll);
            self.muxer.handle_listener(&setup);
            let fds: Vec<RawFd> = self
                .muxer
                .pending
                .keys()
                .chain(self.muxer.by_fd.keys())
                .copied()
                .collect();
            for fd in fds {
                self.muxer
                    .handle_stream(fd, EventSet::IN | EventSet::OUT, &setup);
            }
        }
    }

    fn read_line(stream: &UnixStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn a_host_connection_is_forwarded_both_ways() {
        let mut h = Harness::new();
        let mut client = UnixStream::connect(&h.uds).unwrap();
        client.write_all(b"CONNECT 52\nping").unwrap();
        h.poll();
        let (request, _) = h.rx().expect("REQUEST for the guest");
        assert_eq!(
            (request.op, request.dst_port, request.dst_cid),
            (OP_REQUEST, 52, GUEST_CID)
        );
        let local = request.src_port;
        assert!(local >= FIRST_LOCAL_PORT);
        h.guest(OP_RESPONSE, local, 52, b"");
        assert_eq!(read_line(&client), format!("OK {local}\n"));
        // "ping" was sent right after the CONNECT line and waited in the socket.
        let (rw, data) = h.rx().expect("data for the guest");
        assert_eq!((rw.op, rw.len, data.as_slice()), (OP_RW, 4, &b"ping"[..]));
        h.guest(OP_RW, local, 52, b"pong");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
        // The host closes its write side: the guest hears SHUTDOWN(SEND).
        client.shutdown(Shutdown::Write).unwrap();
        h.poll();
        let (shutdown, _) = h.rx().expect("shutdown for the guest");
        assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        let header = Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..guest_header(OP_SHUTDOWN, local, 52)
        };
        h.send(header, b"");
        let (rst, _) = h.rx().expect("RST for the guest");
        assert_eq!(rst.op, OP_RST);
        assert_eq!(h.muxer.connection_count(), 0);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "the host sees EOF");
    }

    #[test]
    fn data_buffered_at_shutdown_still_reaches_the_host() {
        let mut h = Harness::new();
        let mut client = UnixStream::connect(&h.uds).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        h.poll();
        let (request, _) = h.rx().unwrap();
        let local = request.src_port;
        h.guest(OP_RESPONSE, local, 52, b"");
        assert_eq!(read_line(&client), format!("OK {local}\n"));
        // The host reads nothing yet: the guest fills its whole credit, more
        // than the socket takes, then shuts down both directions.
        let chunk = vec![7u8; MAX_PAYLOAD];
        let chunks = CONN_BUF_ALLOC as usize / chunk.len();
        for _ in 0..chunks {
            h.guest(OP_RW, local, 52, &chunk);
        }
        let header = Header {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..guest_header(OP_SHUTDOWN, local, 52)
        };
        h.send(header, b"");
        assert_eq!(h.muxer.connection_count(), 1, "kept open while draining");
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all.len()
        });
        while h.muxer.connection_count() > 0 {
            h.poll();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(reader.join().unwrap(), chunks * chunk.len());
        let mut ops = Vec::new();
        while let Some((packet, _)) = h.rx() {
            ops.push(packet.op);
        }
        assert_eq!(ops.last(), Some(&OP_RST), "{ops:?}");
    }

    fn guest_header(op: u16, local_port: u32, peer_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: peer_port,
            dst_port: local_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1 << 20,
            ..Header::default()
        }
    }

    #[test]
    fn a_guest_connection_reaches_the_port_socket_or_gets_rst() {
        let mut h = Harness::new();
        let mut path = h.uds.clone().into_os_string();
        path.push("_1234");
        let listener = UnixListener::bind(&path).unwrap();
        h.guest(OP_REQUEST, 1234, 5000, b"");
        let (response, _) = h.rx().unwrap();
        assert_eq!(
            (response.op, response.src_port, response.dst_port),
            (OP_RESPONSE, 1234, 5000)
        );
        let (mut server, _) = listener.accept().unwrap();
        h.guest(OP_RW, 1234, 5000, b"hello\n");
        assert_eq!(read_line(&server), "hello\n");
        server.write_all(b"back").unwrap();
        h.poll();
        let (rw, data) = h.rx().unwrap();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"back"[..]));

        h.guest(OP_REQUEST, 4321, 5001, b"");
        let (rst, _) = h.rx().unwrap();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 4321, 5001));
    }

    #[test]
    fn bad_packets_get_rst_and_never_rst_for_rst() {
        let mut h = Harness::new();
        // RW for a connection that does not exist.
        h.guest(OP_RW, 9, 10, b"x");
        assert_eq!(h.rx().unwrap().0.op, OP_RST);
        // Unknown op, no connection.
        h.guest(99, 9, 10, b"");
        assert_eq!(h.rx().unwrap().0.op, OP_RST);
        // Another destination CID, another type: RST.
        let request = guest_header(OP_REQUEST, 9, 10);
        for bad in [
            Header {
                dst_cid: 7,
                ..request
            },
            Header {
                type_: 2,
                ..request
            },
        ] {
            h.send(bad, b"");
            assert_eq!(h.rx().unwrap().0.op, OP_RST);
        }
        // An RST is never answered, and a spoofed source CID is dropped.
        h.guest(OP_RST, 9, 10, b"");
        let spoofed = Header {
            src_cid: 2,
            ..guest_header(OP_RW, 9, 10)
        };
        h.send(spoofed, b"");
        assert!(h.rx().is_none());
        assert_eq!(h.muxer.metrics.invalid_packets, 5);
    }

    #[test]
    fn a_guest_that_sends_past_its_credit_is_reset() {
        let mut h = Harness::new();
        let mut path = h.uds.clone().into_os_string();
        path.push("_77");
        let listener = UnixListener::bind(&path).unwrap();
        h.guest(OP_REQUEST, 77, 1, b"");
        assert_eq!(h.rx().unwrap().0.op, OP_RESPONSE);
        let (_server, _) = listener.accept().unwrap();
        // The host never reads; the guest sends more than we advertised.
        let chunk = vec![0u8; MAX_PAYLOAD];
        let mut reset = false;
        for _ in 0..(2 * CONN_BUF_ALLOC as usize / MAX_PAYLOAD + 64) {
            h.guest(OP_RW, 77, 1, &chunk);
            while let Some((header, _)) = h.rx() {
                reset |= header.op == OP_RST;
            }
            if reset {
                break;
            }
        }
        assert!(reset);
        assert_eq!(h.muxer.connection_count(), 0);
    }

    #[test]
    fn malformed_connect_lines_close_the_host_socket() {
        for line in [
            &b"CONNECT\n"[..],
            b"HELLO 5\n",
            b"CONNECT 99999999999\n",
            &[b'A'; 100],
        ] {
            let mut h = Harness::new();
            let mut client = UnixStream::connect(&h.uds).unwrap();
            client.write_all(line).unwrap();
            h.poll();
            assert!(h.rx().is_none(), "{line:?}");
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            // Closed: EOF, or a reset when it closed with bytes unread; never a timeout.
            let mut rest = Vec::new();
            let closed = match client.read_to_end(&mut rest) {
                Ok(0) => true,
                Err(e) => e.kind() == ErrorKind::ConnectionReset,
                Ok(_) => false,
            };
            assert!(closed, "{line:?}");
        }
    }

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
