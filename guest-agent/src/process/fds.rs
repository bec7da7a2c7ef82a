//! Descriptors between the agent and its children: pidfds, one byte with
//! a descriptor over a socket (the pty master), and the child's fd layout.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

pub(super) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a new descriptor that we now own.
    i32::try_from(fd)
        .ok()
        .filter(|&fd| fd >= 0)
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `signal` through a pidfd.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a pidfd, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Space for one descriptor's control message.
const CMSG_SPACE: usize = 64;

/// A message header over one byte and a control buffer.
fn one_byte_message(
    byte: &mut [u8; 1],
    iov: &mut libc::iovec,
    control: &mut [u8; CMSG_SPACE],
) -> libc::msghdr {
    iov.iov_base = byte.as_mut_ptr().cast();
    iov.iov_len = 1;
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = control.len();
    message
}

fn empty_iovec() -> libc::iovec {
    libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }
}

/// Sends one byte, and `fd` with it as SCM_RIGHTS.
pub(super) fn send_with_fd(socket: RawFd, byte: u8, fd: RawFd) -> io::Result<()> {
    let (mut data, mut iov, mut control) = ([byte], empty_iovec(), [0u8; CMSG_SPACE]);
    let mut message = one_byte_message(&mut data, &mut iov, &mut control);
    // SAFETY: CMSG_SPACE computes a size from a size.
    message.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
    // SAFETY: the control buffer is large enough for one header (checked
    // by CMSG_FIRSTHDR returning non-null) and one int of data.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&raw const message);
        if header.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<RawFd>(), fd);
    }
    // SAFETY: `message` points at live buffers described by their lengths.
    if unsafe { libc::sendmsg(socket, &raw const message, libc::MSG_NOSIGNAL) } != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one byte and the descriptor that came with it, if any. None:
/// end of stream.
pub(super) fn receive_with_fd(socket: &UnixStream) -> io::Result<(Option<u8>, Option<OwnedFd>)> {
    let (mut data, mut iov, mut control) = ([0u8], empty_iovec(), [0u8; CMSG_SPACE]);
    let mut message = one_byte_message(&mut data, &mut iov, &mut control);
    // SAFETY: `message` points at live buffers described by their lengths.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut message, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Ok((None, None));
    }
    let mut fd = None;
    // SAFETY: the kernel filled `control` up to msg_controllen; the CMSG
    // macros walk within it, and an SCM_RIGHTS header carries an int.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&raw const message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(header).cast::<RawFd>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            header = libc::CMSG_NXTHDR(&raw const message, header);
        }
    }
    Ok((Some(data[0]), fd))
}

/// Joins the namespaces `kinds` of the process `pidfd` names, all at once.
/// A pidfd of a process that has exited fails (ESRCH).
pub fn setns_pidfd(pidfd: RawFd, kinds: libc::c_int) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and flags; a pidfd with namespace
    // flags is supported since Linux 5.8.
    if unsafe { libc::setns(pidfd, kinds) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `fds` at 0, 1, 2, … and closes every other descriptor (another
/// container's pipes forked along with us included). Those from
/// `cloexec_from` on close on exec. Makes no allocation: it runs in a
/// child forked from the multi-threaded agent.
pub(super) fn arrange_fds(fds: &[RawFd], cloexec_from: usize) -> io::Result<()> {
    let mut high = [-1; 8];
    if fds.len() > high.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (slot, &fd) in high.iter_mut().zip(fds) {
        // SAFETY: F_DUPFD_CLOEXEC takes an fd and a lower bound.
        *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100) };
        if *slot < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for (target, &fd) in (0..).zip(&high[..fds.len()]) {
        // SAFETY: dup2 takes two descriptors; its copy is inherited.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if usize::try_from(target).is_ok_and(|t| t >= cloexec_from) {
            // SAFETY: F_SETFD takes an fd and flags.
            unsafe { libc::fcntl(target, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    let first_unused = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    // SAFETY: close_range takes a range of descriptors and flags.
    if unsafe { libc::syscall(libc::SYS_close_range, first_unused, u32::MAX, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joining_through_the_pidfd_of_an_exited_init_fails_instead_of_joining_another() {
        // The old exec opened /proc/<init pid>/ns/*: once the init had
        // exited, that pid could be anyone's. A pidfd names one process.
        // SAFETY: fork in a test; the child only calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        let pidfd = pidfd_open(pid).expect("pidfd_open");
        let mut status = 0;
        // SAFETY: reaps our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        let err = setns_pidfd(pidfd.as_raw_fd(), libc::CLONE_NEWUTS).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH), "{err}");
    }
}
