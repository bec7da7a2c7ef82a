//! The tap a virtio-net device serves: a descriptor the launcher opened
//! (in the sandbox's network namespace) and passed down. The VMM checks
//! what it is given — a tap, without packet information, with virtio
//! headers — sets the header size and non-blocking mode, and later the
//! offloads the driver acknowledged. It never opens a device itself.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::HEADER_LEN;
use super::frames::FrameIo;

/// Why a descriptor cannot serve as a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The descriptor is not an open tun/tap device.
    #[error("descriptor {0} is not an open tap device: the launcher must pass the tap it opened")]
    NotATap(i32, #[source] io::Error),
    /// A tun device, or a tap without the flags the device needs.
    #[error(
        "descriptor {fd} ({name}) is a tun/tap opened with flags {flags:#x}; open it with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    Flags {
        /// The descriptor.
        fd: i32,
        /// The interface's name.
        name: String,
        /// The flags it was opened with.
        flags: i32,
    },
    /// An ioctl on the tap failed.
    #[error("cannot {0} on tap {1}")]
    Ioctl(&'static str, String, #[source] io::Error),
}

/// The flags a tap must have been opened with.
const TAP_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// A tap, ready for frames with 12-byte virtio headers.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

/// Checks that `raw` is a tap with the flags the device needs, and
/// returns its name.
fn check(raw: RawFd) -> Result<String, TapError> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which `ifr` is; a descriptor
    // that is not a tun/tap (or not open) fails and is not changed.
    if unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut ifr) } != 0 {
        return Err(TapError::NotATap(raw, io::Error::last_os_error()));
    }
    // SAFETY: the kernel NUL-terminates the name within IFNAMSIZ.
    let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: TUNGETIFF filled in the flags member of the union.
    let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
    if flags & TAP_FLAGS != TAP_FLAGS || flags & libc::IFF_TUN != 0 {
        return Err(TapError::Flags {
            fd: raw,
            name,
            flags,
        });
    }
    Ok(name)
}

impl Tap {
    /// Takes over descriptor `raw`, which the launcher passed: it must be
    /// a tap opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. A descriptor
    /// that is not one is left alone (it may be something else of ours).
    pub fn inherited(raw: RawFd) -> Result<Self, TapError> {
        let name = check(raw)?;
        // SAFETY: `raw` is an open tap (TUNGETIFF succeeded on it) that
        // nothing else in the VMM owns: the VMM opens no tap itself, and the
        // configuration names each tap descriptor once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Self::configure(fd, name)
    }

    /// Takes over `fd`, which must be a tap opened with `IFF_TAP |
    /// IFF_NO_PI | IFF_VNET_HDR`.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let name = check(fd.as_raw_fd())?;
        Self::configure(fd, name)
    }

    fn configure(fd: OwnedFd, name: String) -> Result<Self, TapError> {
        let tap = Self { fd, name };
        let size = i32::try_from(HEADER_LEN).unwrap_or(0);
        // SAFETY: TUNSETVNETHDRSZ reads one int, which `size` is.
        if unsafe { libc::ioctl(tap.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } != 0 {
            return Err(tap.ioctl_error("set the header size"));
        }
        // SAFETY: F_SETFL with a flag word on a descriptor we own.
        if unsafe { libc::fcntl(tap.fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
            return Err(tap.ioctl_error("make it non-blocking"));
        }
        // SAFETY: F_SETFD with a flag word on a descriptor we own.
        if unsafe { libc::fcntl(tap.fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(tap.ioctl_error("mark it close-on-exec"));
        }
        Ok(tap)
    }

    /// The interface's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the tap hand the device frames that need the offloads in
    /// `offloads` (`TUN_F_*`): those the driver acknowledged.
    pub fn set_offloads(&self, offloads: u32) -> Result<(), TapError> {
        let arg = std::ffi::c_ulong::from(offloads);
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, arg) } != 0 {
            return Err(self.ioctl_error("set offloads"));
        }
        Ok(())
    }

    fn ioctl_error(&self, what: &'static str) -> TapError {
        TapError::Ioctl(what, self.name.clone(), io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl FrameIo for Tap {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "wrote {n} of {} bytes",
                frame.len()
            ))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_a_tap_is_refused_with_its_number() {
        let file = tempfile::tempfile().unwrap();
        let fd = OwnedFd::from(file);
        let raw = fd.as_raw_fd();
        let e = Tap::from_fd(fd).unwrap_err();
        assert!(matches!(e, TapError::NotATap(n, _) if n == raw), "{e}");
    }

    /// Opens /dev/net/tun as interface `name` with `flags`, as a launcher
    /// does; None (and a printed reason) without the privilege to.
    fn open_tun(name: &str, flags: i32) -> Option<OwnedFd> {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src.cast_signed();
        }
        ifr.ifr_ifru.ifru_flags = i16::try_from(flags).unwrap();
        // SAFETY: a NUL-terminated path and flags; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if raw < 0 {
            println!(
                "skipped: cannot open /dev/net/tun: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: `raw` was just opened and is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads one ifreq, which `ifr` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr) } != 0 {
            println!(
                "skipped: creating a tap needs CAP_NET_ADMIN: {}",
                io::Error::last_os_error()
            );
            return None;
        }
        Some(fd)
    }

    #[test]
    fn a_tap_with_virtio_headers_is_taken_and_a_tun_is_refused() {
        let name = format!("cst{}", std::process::id() % 100_000);
        let Some(fd) = open_tun(&name, TAP_FLAGS) else {
            return;
        };
        let mut tap = Tap::from_fd(fd).unwrap();
        assert_eq!(tap.name(), name);
        let mut buf = [0u8; 64];
        let e = tap.recv(&mut buf).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WouldBlock,
            "non-blocking, nothing waiting"
        );
        tap.set_offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();

        // A tun (no Ethernet frames), or a tap without virtio headers, is
        // refused, naming what to change.
        for (suffix, flags) in [
            ("u", libc::IFF_TUN | libc::IFF_NO_PI),
            ("h", libc::IFF_TAP | libc::IFF_NO_PI),
        ] {
            let other = open_tun(&format!("{name}{suffix}"), flags).unwrap();
            let e = Tap::from_fd(other).unwrap_err().to_string();
            assert!(e.contains("IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"), "{e}");
        }
    }
}
