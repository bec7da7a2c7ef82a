//! AF_VSOCK stream sockets: a listener on the agent's port and its
//! connections. Thin wrappers over the socket calls; std has no vsock.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The size of a socket address or option type, as the calls take it.
fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A listening `AF_VSOCK` stream socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
}

impl VsockListener {
    /// Listens on `port`. Connections come from the host (CID 2) through
    /// the virtio transport; the kernel has no loopback transport, and
    /// [`Admission`] refuses any other peer all the same.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new socket that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: `addr` is a valid sockaddr_vm and its size is passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                socklen::<libc::sockaddr_vm>(),
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen() takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The next connection, and the CID it comes from.
    pub fn accept(&self) -> io::Result<(VsockStream, u32)> {
        loop {
            // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
            let mut peer: libc::sockaddr_vm = unsafe { mem::zeroed() };
            let mut len = socklen::<libc::sockaddr_vm>();
            // SAFETY: `peer` and `len` describe a writable sockaddr_vm.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    (&raw mut peer).cast(),
                    &raw mut len,
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: accept4 returned a new descriptor we now own.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
                let cid = if peer.svm_family == family {
                    peer.svm_cid
                } else {
                    libc::VMADDR_CID_ANY
                };
                return Ok((VsockStream { fd }, cid));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Who may talk to the agent: the host, and only so many connections at
/// once. A container process must never command the agent (it could start
/// a privileged container or read another's stdio); the guest kernel has
/// no vsock loopback, and this is the second wall.
#[derive(Debug)]
pub struct Admission {
    open: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// The most connections the agent serves at once (each has a thread).
pub const MAX_CONNECTIONS: usize = 512;

/// Why a connection was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The peer is not the host.
    #[error("connection from CID {0} refused: only the host (CID 2) may connect")]
    NotHost(u32),
    /// Every connection slot is taken.
    #[error("connection refused: {0} connections are open already")]
    Full(usize),
}

impl Admission {
    /// Admits at most `max` connections at once.
    pub fn new(max: usize) -> Self {
        Self {
            open: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// Admits a connection from `cid`; the returned ticket frees its place
    /// when dropped.
    pub fn admit(&self, cid: u32) -> Result<Ticket<'_>, Refusal> {
        use std::sync::atomic::Ordering;
        if cid != libc::VMADDR_CID_HOST {
            return Err(Refusal::NotHost(cid));
        }
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Full(self.max));
        }
        Ok(Ticket(self))
    }
}

/// One admitted connection's place.
#[derive(Debug)]
pub struct Ticket<'a>(&'a Admission);

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One connection from the host.
#[derive(Debug)]
pub struct VsockStream {
    fd: OwnedFd,
}

impl VsockStream {
    /// Any connected stream socket (tests use a Unix socket pair).
    #[cfg(test)]
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    pub(crate) fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        let how = match how {
            std::net::Shutdown::Read => libc::SHUT_RD,
            std::net::Shutdown::Write => libc::SHUT_WR,
            std::net::Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown() takes no pointers; the fd is ours.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), how) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Bounds blocking reads (None: wait forever).
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        let timeout = timeout.unwrap_or_default();
        let tv = libc::timeval {
            tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
            tv_usec: timeout.subsec_micros().into(),
        };
        // SAFETY: `tv` is a valid timeval and its size is passed.
        let set = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                socklen::<libc::timeval>(),
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsFd for VsockStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Read for &VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Write for &VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for reads of its length. MSG_NOSIGNAL: a
        // closed peer is an error here, not a SIGPIPE for PID 1.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.unsigned_abs())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_is_admitted_and_only_so_many_at_once() {
        // Before the fix any peer was served: a container process reached
        // the agent through CID 1 (loopback) or the guest's own CID.
        let admission = Admission::new(2);
        for cid in [libc::VMADDR_CID_LOCAL, 3, libc::VMADDR_CID_ANY, 0] {
            assert_eq!(admission.admit(cid).unwrap_err(), Refusal::NotHost(cid));
        }
        let first = admission.admit(2).unwrap();
        let second = admission.admit(2).unwrap();
        assert_eq!(admission.admit(2).unwrap_err(), Refusal::Full(2));
        drop(first);
        let third = admission.admit(2).unwrap();
        drop((second, third));
        assert_eq!(admission.open.load(std::sync::atomic::Ordering::Acquire), 0);
    }
}
