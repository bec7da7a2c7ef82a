//! What a guest restored from a snapshot must not share with the other
//! guests restored from it (`Request::Refresh`): the state of its random
//! number generator, and its clock.
//!
//! Every clone of a template starts with the same kernel RNG state, so
//! until it is reseeded two clones would hand their workloads the same
//! "random" bytes: keys, nonces, TCP sequence numbers. The host's entropy
//! is mixed in and credited (`RNDADDENTROPY`, which needs CAP_SYS_ADMIN:
//! the agent's, never a container's), then the kernel is made to reseed
//! its CRNG from it at once (`RNDRESEEDCRNG`) rather than at its next
//! scheduled reseed. Linux's own answer to this is the VM generation ID
//! (`vmgenid`), an ACPI device; our VMs have no ACPI.
//!
//! The guest's clock carries on from the snapshot's kvm-clock, so its wall
//! time is the time the template was made: it is set to the host's.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use capsid_protocol::{REFRESH_ENTROPY_BYTES, Refresh};

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The request's entropy is not the size the protocol says.
    #[error("a refresh brings {REFRESH_ENTROPY_BYTES} bytes of entropy, not {0}")]
    Entropy(usize),
    /// The request's time is not a time this guest can have.
    #[error("{0} ns since the epoch is not a time to set")]
    Time(u64),
    /// The kernel refused.
    #[error("cannot {0}")]
    Kernel(&'static str, #[source] std::io::Error),
}

/// `struct rand_pool_info` with its buffer: what `RNDADDENTROPY` takes.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; REFRESH_ENTROPY_BYTES],
}

/// Checks `refresh`, then reseeds the RNG and sets the clock.
pub fn refresh(refresh: &Refresh) -> Result<(), IdentityError> {
    let time = checked_time(refresh)?;
    reseed(&refresh.entropy)?;
    // SAFETY: `time` is a valid timespec that outlives the call.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &raw const time) } != 0 {
        return Err(IdentityError::Kernel(
            "set the clock",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The time to set, once the request is known to be whole: the right
/// amount of entropy, a time after 2020 that a `time_t` holds.
fn checked_time(refresh: &Refresh) -> Result<libc::timespec, IdentityError> {
    if refresh.entropy.len() != REFRESH_ENTROPY_BYTES {
        return Err(IdentityError::Entropy(refresh.entropy.len()));
    }
    const YEAR_2020_NS: u64 = 1_577_836_800 * 1_000_000_000;
    let ns = refresh.unix_time_ns;
    let secs = libc::time_t::try_from(ns / 1_000_000_000)
        .ok()
        .filter(|_| ns >= YEAR_2020_NS)
        .ok_or(IdentityError::Time(ns))?;
    Ok(libc::timespec {
        tv_sec: secs,
        tv_nsec: libc::c_long::try_from(ns % 1_000_000_000).unwrap_or(0),
    })
}

fn reseed(entropy: &[u8]) -> Result<(), IdentityError> {
    let random = OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| IdentityError::Kernel("open /dev/urandom", e))?;
    let mut info = PoolInfo {
        entropy_count: libc::c_int::try_from(REFRESH_ENTROPY_BYTES * 8).unwrap_or(0),
        buf_size: libc::c_int::try_from(REFRESH_ENTROPY_BYTES).unwrap_or(0),
        buf: [0; REFRESH_ENTROPY_BYTES],
    };
    info.buf.copy_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info whose buffer holds `buf_size`
    // bytes, and outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, &raw mut info) } != 0 {
        return Err(IdentityError::Kernel(
            "add the host's entropy",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(IdentityError::Kernel(
            "reseed the random number generator",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_without_its_entropy_or_with_an_odd_time_is_refused() {
        let good = Refresh {
            entropy: vec![7; REFRESH_ENTROPY_BYTES],
            unix_time_ns: 1_800_000_000_123_456_789,
        };
        let time = checked_time(&good).unwrap();
        assert_eq!((time.tv_sec, time.tv_nsec), (1_800_000_000, 123_456_789));
        let short = Refresh {
            entropy: vec![7; 8],
            ..good.clone()
        };
        assert!(matches!(
            checked_time(&short),
            Err(IdentityError::Entropy(8))
        ));
        for ns in [0, 1_000_000_000, u64::MAX] {
            let odd = Refresh {
                unix_time_ns: ns,
                ..good.clone()
            };
            assert!(
                matches!(checked_time(&odd), Err(IdentityError::Time(_))) || ns == u64::MAX,
                "{ns}"
            );
        }
    }

    #[test]
    fn the_pool_info_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<PoolInfo>(), 8 + REFRESH_ENTROPY_BYTES);
        // _IOW('R', 3, int[2]): write, size 8, type 'R', number 3.
        assert_eq!(RNDADDENTROPY, (1 << 30) | (8 << 16) | (0x52 << 8) | 3);
        assert_eq!(RNDRESEEDCRNG, (0x52 << 8) | 7);
    }
}
