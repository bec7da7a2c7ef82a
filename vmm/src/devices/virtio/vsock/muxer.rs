//! Connections between the guest and host Unix sockets: packet routing,
//! the host sockets and their epoll interest, and the hybrid-vsock
//! handshake. The protocol state of each connection is
//! [`Connection`](super::connection::Connection), a pure state machine;
//! this module does the I/O it asks for.
//!
//! ```text
//!  host-initiated:  accepted ──"CONNECT p\n"──▶ REQUEST to the guest ──RESPONSE──▶ "OK <port>\n"
//!  guest-initiated: REQUEST ──non-blocking connect <uds>_p──▶ RESPONSE (or RST when refused,
//!                                                              the listener's backlog full included)
//! ```
//!
//! What a host socket is watched for is derived from its connection's
//! state after every change ([`Muxer::sync`]): readable while the guest has
//! credit and the connection is not already waiting its turn to be read,
//! writable while bytes wait for the host, and not watched at all when
//! neither (so a hung-up socket whose guest posts no RX buffers is not
//! reported again and again: epoll reports a hang-up whatever the interest,
//! unless the fd is out of the set). A connection waits in the RX queue at
//! most once, so the queue is bounded by the connection count.
//!
//! Nothing here trusts the guest: a packet with the wrong CIDs, type or op,
//! for a connection that does not exist, or with more data than the credit
//! we gave, gets an RST (never for an RST) and a rate-limited log line. The
//! memory the muxer holds is bounded: [`MAX_CONNECTIONS`] connections with
//! at most [`CONN_BUF_ALLOC`] bytes buffered towards the host each, the RX
//! queue, and a bounded queue of control packets towards the guest.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, State, Verdict};
use super::packet::Header;
use super::{
    CONN_BUF_ALLOC, HOST_CID, MAX_CONNECTIONS, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_SEND, TYPE_STREAM,
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
/// Host ports of host-initiated connections start at a random place in
/// `[FIRST_LOCAL_PORT, FIRST_LOCAL_PORT + LOCAL_PORT_SPREAD)`, and wrap to
/// `FIRST_LOCAL_PORT`.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const LOCAL_PORT_SPREAD: u32 = 1 << 29;

/// Where this muxer's host ports start: at random, so that a VMM restored
/// from a snapshot does not hand its first connection the port of one the
/// guest still holds from the snapshot (until it has handled the
/// transport reset, a REQUEST on that port would land on the stale socket).
fn first_local_port() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: `bytes` is writable for its 4 bytes; GRND_NONBLOCK cannot
    // block (the host's pool is long initialised by now).
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 4, libc::GRND_NONBLOCK) };
    if n != 4 {
        return FIRST_LOCAL_PORT;
    }
    FIRST_LOCAL_PORT + u32::from_ne_bytes(bytes) % LOCAL_PORT_SPREAD
}

/// A connection: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ConnKey {
    pub(crate) local_port: u32,
    pub(crate) peer_port: u32,
}

/// Counters, exported with the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VsockMetrics {
    pub(crate) connections: u64,
    pub(crate) bytes_to_host: u64,
    pub(crate) bytes_to_guest: u64,
    pub(crate) rst_sent: u64,
    pub(crate) invalid_packets: u64,
}

/// A connection and its host socket.
#[derive(Debug)]
struct Entry {
    conn: Connection,
    stream: UnixStream,
    /// In the RX queue, waiting its turn to be read for the guest.
    queued: bool,
    /// What epoll watches the socket for; `None`: not in the set.
    watched: Option<EventSet>,
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
    conns: HashMap<ConnKey, Entry>,
    by_fd: HashMap<RawFd, ConnKey>,
    control: VecDeque<Header>,
    /// Connections whose socket is readable and whose guest has room, each
    /// at most once (`Entry::queued`).
    rx_ready: VecDeque<ConnKey>,
    next_local_port: u32,
    pub(crate) metrics: VsockMetrics,
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

/// Connects to the Unix socket at `path` without ever blocking: a
/// listener whose backlog is full refuses with `WouldBlock` instead of
/// stalling the device's thread.
fn connect_nonblocking(path: &std::ffi::OsStr) -> std::io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un of `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
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
            next_local_port: first_local_port(),
            metrics: VsockMetrics::default(),
        }
    }

    pub(crate) fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Entries waiting in the RX queue (bounded by the connection count).
    pub fn rx_queue_len(&self) -> usize {
        self.rx_ready.len()
    }

    fn header(&self, key: ConnKey, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
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
        let mut header = self.header(key, op);
        header.flags = flags;
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.stamp(&mut header);
        }
        if op == OP_RST {
            self.metrics.rst_sent += 1;
        }
        self.control.push_back(header);
    }

    /// Drops a connection and its socket (the host sees EOF).
    fn close(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        if let Some(entry) = self.conns.remove(&key) {
            let fd = entry.stream.as_raw_fd();
            if entry.watched.is_some() {
                setup.remove(fd);
            }
            self.by_fd.remove(&fd);
            if entry.queued {
                self.rx_ready.retain(|k| *k != key);
            }
        }
    }

    fn reset(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        self.send_control(key, OP_RST, 0);
        self.close(key, setup);
    }

    /// Drops every connection (a device reset); host sockets see EOF.
    pub fn reset_all(&mut self, setup: &EventSetup<'_>) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.close(key, setup);
        }
        for (fd, _) in self.pending.drain() {
            setup.remove(fd);
        }
        self.control.clear();
        self.rx_ready.clear();
    }

    /// Brings a connection's socket and epoll interest in line with its
    /// state: closes a finished connection, shuts the host's write side
    /// when the guest is done sending, and watches the socket for exactly
    /// what the connection can act on now.
    fn sync(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.finished() {
            // Everything the guest sent is with the host: now close.
            self.reset(key, setup);
            return;
        }
        if entry.conn.host_write_done() {
            let _ = entry.stream.shutdown(Shutdown::Write);
        }
        let wanted = match entry.conn.state() {
            // Only a hang-up matters until the guest answers (epoll reports
            // it with an empty set), and it ends the connection.
            State::AwaitingResponse => Some(EventSet::empty()),
            State::Established => {
                let mut set = EventSet::empty();
                if entry.conn.wants_read() && !entry.queued {
                    set |= EventSet::IN;
                }
                if entry.conn.wants_write() {
                    set |= EventSet::OUT;
                }
                if set.is_empty() && entry.conn.host_eof() {
                    // The host's write side is done: a hang-up means it
                    // closed the socket, and ends the connection.
                    Some(set)
                } else {
                    (!set.is_empty()).then_some(set)
                }
            }
        };
        if wanted != entry.watched {
            let fd = entry.stream.as_raw_fd();
            let done = match (entry.watched, wanted) {
                (None, Some(set)) => setup.add(fd, token(fd), set),
                (Some(_), Some(set)) => setup.modify(fd, token(fd), set),
                (Some(_), None) => {
                    setup.remove(fd);
                    Ok(())
                }
                (None, None) => Ok(()),
            };
            match done {
                Ok(()) => entry.watched = wanted,
                Err(e) => {
                    tracing::error!("vsock: cannot watch a host socket: {e}");
                    self.reset(key, setup);
                    return;
                }
            }
        }
        if entry.conn.needs_credit_update() {
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
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
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let hung_up = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if entry.conn.state() == State::AwaitingResponse {
            if hung_up {
                // The host gave up before the guest answered.
                self.reset(key, setup);
            }
            return;
        }
        if hung_up && entry.conn.host_eof() && !entry.conn.wants_write() {
            // The host closed both directions and everything it sent is read.
            self.reset(key, setup);
            return;
        }
        if events.contains(EventSet::OUT) {
            self.flush_to_host(key, setup);
        }
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        // Readable, or hung up (a read then says EOF or why): its turn to
        // be read comes when the guest has an RX buffer.
        if (events.contains(EventSet::IN) || hung_up) && entry.conn.wants_read() && !entry.queued {
            entry.queued = true;
            self.rx_ready.push_back(key);
        }
        self.sync(key, setup);
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
        setup.remove(fd);
        let port = done.and_then(|()| parse_connect(&pending.line).ok_or("malformed CONNECT line"));
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                tracing::warn!("vsock: host connection dropped: {why}");
                return;
            }
        };
        let key = ConnKey {
            local_port: self.allocate_local_port(),
            peer_port: port,
        };
        self.insert(key, Connection::awaiting_response(), pending.stream);
        self.send_control(key, OP_REQUEST, 0);
        self.sync(key, setup);
    }

    fn insert(&mut self, key: ConnKey, conn: Connection, stream: UnixStream) {
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns.insert(
            key,
            Entry {
                conn,
                stream,
                queued: false,
                watched: None,
            },
        );
        self.metrics.connections += 1;
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

    /// Writes buffered guest data to the host socket.
    fn flush_to_host(&mut self, key: ConnKey, setup: &EventSetup<'_>) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while entry.conn.wants_write() {
            match entry.stream.write(entry.conn.pending_for_host()) {
                Ok(n) => {
                    entry.conn.forwarded(n);
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
        } else {
            self.sync(key, setup);
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
        let Some(entry) = self.conns.get_mut(&key) else {
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
        match entry.conn.on_packet(header, payload) {
            Verdict::Continue => self.sync(key, setup),
            Verdict::Accepted => {
                let line = format!("OK {}\n", key.local_port);
                // The socket is fresh: a line this short always fits.
                if entry.stream.write_all(line.as_bytes()).is_err() {
                    self.reset(key, setup);
                } else {
                    self.sync(key, setup);
                }
            }
            Verdict::Flush => self.flush_to_host(key, setup),
            Verdict::SendCredit => {
                self.send_control(key, OP_CREDIT_UPDATE, 0);
                self.sync(key, setup);
            }
            Verdict::Closed => self.close(key, setup),
            Verdict::Reset(why) => {
                self.metrics.invalid_packets += 1;
                crate::guest_warn!(
                    op = header.op,
                    len = header.len,
                    "vsock: {why}; connection reset"
                );
                self.reset(key, setup);
            }
        }
    }

    /// A guest connection to host port P: connect to `<uds>_P`, never
    /// blocking.
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
        let stream = match connect_nonblocking(&path) {
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
        self.insert(key, Connection::established(header), stream);
        self.send_control(key, super::OP_RESPONSE, 0);
        self.sync(key, setup);
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
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            let n = entry.conn.read_budget(capacity);
            if n == 0 {
                if entry.conn.wants_read() {
                    // Credit, but a buffer too small for any payload: keep
                    // its place and wait for a bigger buffer.
                    self.rx_ready.push_front(key);
                    return None;
                }
                // No credit (or nothing more to read): epoll takes over
                // again once the connection can be read.
                entry.queued = false;
                self.sync(key, setup);
                continue;
            }
            let mut data = vec![0u8; n];
            match entry.stream.read(&mut data) {
                Ok(0) => {
                    entry.conn.host_closed();
                    entry.queued = false;
                    let mut header = self.header(key, OP_SHUTDOWN);
                    header.flags = SHUTDOWN_SEND;
                    if let Some(entry) = self.conns.get_mut(&key) {
                        entry.conn.stamp(&mut header);
                    }
                    self.sync(key, setup);
                    return Some((header, Vec::new()));
                }
                Ok(read) => {
                    data.truncate(read);
                    entry.conn.sent_to_guest(read);
                    self.metrics.bytes_to_guest += u64::try_from(read).unwrap_or(0);
                    let mut header = self.header(key, OP_RW);
                    header.len = u32::try_from(read).unwrap_or(0);
                    if let Some(entry) = self.conns.get_mut(&key) {
                        entry.conn.stamp(&mut header);
                        // There may be more: its turn comes again.
                        self.rx_ready.push_back(key);
                    }
                    return Some((header, data));
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    entry.queued = false;
                    self.sync(key, setup);
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
    use crate::devices::virtio::vsock::{MAX_PAYLOAD, OP_RESPONSE, SHUTDOWN_RCV};
    use std::io::{BufRead, BufReader};
    use std::time::Duration;
    use vmm_sys_util::epoll::Epoll;

    const GUEST_CID: u64 = 3;
    const LISTENER: u64 = 3;

    #[test]
    fn each_muxer_starts_its_host_ports_somewhere_else() {
        // Two VMMs restored from one snapshot, or one and the VMM that took
        // it: their first connections get different host ports (equal by
        // chance once in 2^29).
        let firsts: Vec<u32> = (0..3)
            .map(|_| Harness::new().muxer.next_local_port)
            .collect();
        assert!(
            firsts
                .iter()
                .all(|p| (FIRST_LOCAL_PORT..FIRST_LOCAL_PORT + LOCAL_PORT_SPREAD).contains(p)),
            "{firsts:?}"
        );
        assert!(
            firsts[0] != firsts[1] || firsts[1] != firsts[2],
            "{firsts:?}"
        );
    }

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
            let epoll = Epoll::new().unwrap();
            EventSetup::new(&epoll)
                .add(muxer.listener_fd(), LISTENER, EventSet::IN)
                .unwrap();
            Self {
                _dir: dir,
                uds,
                epoll,
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

        /// Dispatches what epoll reports, as the device's worker does.
        fn poll(&mut self) {
            use vmm_sys_util::epoll::EpollEvent;
            let setup = EventSetup::new(&self.epoll);
            let mut events = vec![EpollEvent::default(); 64];
            // A few rounds: handling one event can make another fd ready.
            for _ in 0..4 {
                let n = self.epoll.wait(0, &mut events).unwrap();
                for event in &events[..n] {
                    match event.data() {
                        LISTENER => self.muxer.handle_listener(&setup),
                        other => {
                            let fd = token_fd(other).unwrap();
                            self.muxer.handle_stream(fd, event.event_set(), &setup);
                        }
                    }
                }
            }
        }

        /// The events epoll reports now, without handling them.
        fn ready(&self) -> Vec<(u64, EventSet)> {
            use vmm_sys_util::epoll::EpollEvent;
            let mut events = vec![EpollEvent::default(); 64];
            let n = self.epoll.wait(0, &mut events).unwrap();
            events[..n]
                .iter()
                .map(|e| (e.data(), e.event_set()))
                .collect()
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
        // "ping" was sent right after the CONNECT line and waited in the
        // socket; epoll now reports it readable.
        h.poll();
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

    /// A guest connection to `<uds>_77`, established; returns the host's end.
    fn established(h: &mut Harness) -> (UnixListener, UnixStream) {
        let mut path = h.uds.clone().into_os_string();
        path.push("_77");
        let listener = UnixListener::bind(&path).unwrap();
        h.guest(OP_REQUEST, 77, 1, b"");
        assert_eq!(h.rx().unwrap().0.op, OP_RESPONSE);
        let (server, _) = listener.accept().unwrap();
        (listener, server)
    }

    #[test]
    fn credit_updates_while_rx_buffers_hold_only_a_header_do_not_grow_the_rx_queue() {
        // Before the fix, each credit update queued the connection again
        // while a header-only RX buffer kept it from being read: a million
        // updates, a million entries.
        let mut h = Harness::new();
        let (_listener, mut server) = established(&mut h);
        server.write_all(b"data for the guest").unwrap();
        h.poll();
        let setup = EventSetup::new(&h.epoll);
        for _ in 0..100_000 {
            h.muxer
                .handle_packet(&guest_header(OP_CREDIT_UPDATE, 77, 1), Vec::new(), &setup);
            assert!(h.muxer.next_rx(0, &setup).is_none());
        }
        assert!(h.muxer.rx_queue_len() <= 1, "{}", h.muxer.rx_queue_len());
        // A real buffer then gets the data.
        let (rw, data) = h.muxer.next_rx(4096, &setup).unwrap();
        assert_eq!(
            (rw.op, data.as_slice()),
            (OP_RW, &b"data for the guest"[..])
        );
    }

    #[test]
    fn a_hung_up_host_socket_is_not_reported_again_while_the_guest_posts_no_rx_buffers() {
        // Before the fix the socket stayed in the epoll set with an empty
        // interest, and epoll reports a hang-up regardless: the worker spun.
        let mut h = Harness::new();
        let (_listener, mut server) = established(&mut h);
        server.write_all(b"last words").unwrap();
        drop(server);
        h.poll();
        assert_eq!(h.muxer.rx_queue_len(), 1, "waiting for an RX buffer");
        assert!(h.ready().is_empty(), "{:?}", h.ready());
        // With a buffer: the data, then the host's shutdown.
        let (rw, data) = h.rx().unwrap();
        assert_eq!((rw.op, data.as_slice()), (OP_RW, &b"last words"[..]));
        let (shutdown, _) = h.rx().unwrap();
        assert_eq!((shutdown.op, shutdown.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        // The hang-up, now watched, ends the connection.
        h.poll();
        assert_eq!(h.rx().unwrap().0.op, OP_RST);
        assert_eq!(h.muxer.connection_count(), 0);
        assert!(h.ready().is_empty());
    }

    #[test]
    fn a_guest_connection_to_a_listener_with_a_full_backlog_is_refused_at_once() {
        // Before the fix, connect blocked the device's thread until the
        // listener accepted, which a host that stopped accepting never does.
        let mut h = Harness::new();
        let mut path = h.uds.clone().into_os_string();
        path.push("_88");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: listen() on our own socket, to shrink its backlog to 0.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _first = UnixStream::connect(&path).unwrap();
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            h.guest(OP_REQUEST, 88, 2, b"");
            let _ = done.send(h.rx().map(|(header, _)| header.op));
        });
        let op = outcome
            .recv_timeout(Duration::from_secs(10))
            .expect("the muxer blocked on a full listener");
        assert_eq!(op, Some(OP_RST));
        drop(listener);
    }

    #[test]
    fn a_device_reset_closes_every_host_socket() {
        let mut h = Harness::new();
        let (_listener, mut server) = established(&mut h);
        let setup = EventSetup::new(&h.epoll);
        h.muxer.reset_all(&setup);
        assert_eq!(h.muxer.connection_count(), 0);
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).unwrap(), 0);
        assert!(h.ready().is_empty());
    }
}
