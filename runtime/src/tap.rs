//! Taps for virtio-net. The runtime makes them, in the sandbox's network
//! namespace, and passes the descriptor to the VMM (`--net fd=N`), which
//! opens no device itself and runs in a network namespace of its own.
//! A tap made here is not persistent: it goes when its last descriptor
//! closes, so a VMM that dies takes its tap with it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Why a tap cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or has a NUL.
    #[error("tap name {0:?} is not a valid interface name (1 to 15 bytes)")]
    Name(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    Open(#[source] io::Error),
    /// The kernel refused the tap.
    #[error("cannot create tap {0} (it needs CAP_NET_ADMIN in its network namespace)")]
    Create(String, #[source] io::Error),
}

/// Creates the tap `name` in the caller's network namespace, as the VMM's
/// virtio-net device needs it: Ethernet frames, no packet information,
/// virtio headers (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`). The descriptor is
/// close-on-exec; the launcher passes it on explicitly.
pub fn create_tap(name: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= ifr.ifr_name.len() || name.contains('\0') {
        return Err(TapError::Name(name.to_owned()));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src.cast_signed();
    }
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    ifr.ifr_ifru.ifru_flags = i16::try_from(flags).unwrap_or(0);
    // SAFETY: a NUL-terminated path and flags; the result is checked.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(TapError::Open(io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just opened and is ours alone.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: TUNSETIFF reads one ifreq, which `ifr` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr) } != 0 {
        return Err(TapError::Create(
            name.to_owned(),
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked_before_any_call() {
        for name in ["", "a-name-of-16-byt", "nul\0in"] {
            assert!(
                matches!(create_tap(name), Err(TapError::Name(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn a_tap_lives_as_long_as_its_descriptor() {
        let name = format!("crt{}", std::process::id() % 100_000);
        let fd = match create_tap(&name) {
            Ok(fd) => fd,
            Err(e) => {
                println!("skipped: {}", capsid_base::error_chain(&e));
                return;
            }
        };
        let sys = std::path::Path::new("/sys/class/net").join(&name);
        assert!(
            sys.exists(),
            "{} exists while its descriptor is open",
            sys.display()
        );
        let flags = std::fs::read_to_string(sys.join("tun_flags")).unwrap();
        let flags = i32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(
            flags & 0x7003,
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR
        );
        drop(fd);
        assert!(!sys.exists(), "the tap goes with its last descriptor");
    }
}
