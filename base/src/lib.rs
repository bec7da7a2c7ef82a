//! What every capsid process needs and used to define for itself: a lock
//! that survives a panicked holder, an error printed with its sources on
//! one line, and a size read as people write it. No dependencies, so the static guest agent and the
//! confined VMM can link it at no cost.

#![warn(missing_docs)]

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// Locks `mutex`, also when a thread panicked holding it.
///
/// The data behind capsid's locks is kept consistent between statements,
/// and a process that stops serving every later call because one call
/// panicked would be worse: the agent is PID 1 of the guest and serves
/// every container, the shim serves every task, and the VMM aborts on a
/// panic in release builds anyway.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `changed` with `guard` held, as [`Condvar::wait`], tolerating a
/// poisoned lock like [`lock`].
pub fn wait<'a, T>(changed: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    changed.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `changed` at most `timeout`, as [`Condvar::wait_timeout`],
/// tolerating a poisoned lock like [`lock`].
pub fn wait_timeout<'a, T>(
    changed: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    changed
        .wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
}

/// An error and its sources on one line: "what: why: because".
///
/// Libraries keep the source in `#[source]` rather than in their message;
/// this is where a binary or an RPC reply puts the chain back together.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The unit of a size written without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareUnit {
    /// Bytes (`--disk 1048576`, as Docker reads a bare number).
    Bytes,
    /// MiB (`--memory 256`, a VM's size).
    Mib,
}

/// Reads a size as people write it — `512K`, `100M`, `2G`, `2GiB`, `1gb`,
/// `100b`; K, M and G are powers of 1024, and a number alone is in `bare`
/// units — into bytes. `None` for anything else, an overflow included; the caller
/// says what it wanted and checks the range.
pub fn parse_size(text: &str, bare: BareUnit) -> Option<u64> {
    let text = text.trim();
    let at = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(at);
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" => match bare {
            BareUnit::Bytes => 0,
            BareUnit::Mib => 20,
        },
        "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        use BareUnit::{Bytes, Mib};
        assert_eq!(parse_size("512K", Bytes), Some(512 << 10));
        assert_eq!(parse_size("100m", Bytes), Some(100 << 20));
        assert_eq!(parse_size(" 2GiB ", Bytes), Some(2 << 30));
        assert_eq!(parse_size("1gb", Bytes), Some(1 << 30));
        assert_eq!(parse_size("100", Bytes), Some(100));
        assert_eq!(parse_size("256", Mib), Some(256 << 20));
        assert_eq!(parse_size("256b", Mib), Some(256));
        for bad in [
            "",
            "x",
            "1T",
            "-1M",
            "1.5G",
            "M",
            "1BB",
            "1iB",
            "1 G",
            "99999999999999999G",
        ] {
            assert_eq!(parse_size(bad, Bytes), None, "{bad:?}");
        }
    }
    use std::sync::Arc;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn the_chain_names_every_source_once_in_order() {
        let e = Layer(
            "cannot boot",
            Some(Box::new(Layer(
                "cannot open kernel",
                Some(Box::new(Layer("no such file", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "cannot boot: cannot open kernel: no such file"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }

    #[test]
    fn a_lock_whose_holder_panicked_is_still_taken() {
        let mutex = Arc::new(Mutex::new(1));
        let held = Arc::clone(&mutex);
        let panicked = std::thread::spawn(move || {
            let mut value = held.lock().unwrap();
            *value = 2;
            panic!("holder dies with the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 2);
    }
}
