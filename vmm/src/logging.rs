//! Rate-limited logging for lines a guest can trigger.
//!
//! A hostile guest must not be able to fill the host's disk through our logs
//! (Firecracker's rule). Each call site of [`guest_warn!`](crate::guest_warn)
//! owns a [`RateLimit`]: at most [`BURST`] lines per [`WINDOW`]; the rest are
//! counted and the count is reported with the next line that gets through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lines let through per window, per call site.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 1000;

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    /// Start of the current window, in ms since the process's first log.
    window_start: AtomicU64,
    /// Lines seen in the current window.
    seen: AtomicU64,
    /// Lines dropped since the last line that got through.
    suppressed: AtomicU64,
}

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self {
            window_start: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(n)` when a line may be logged now, `n` being the number
    /// of lines dropped before it; `None` when this line must be dropped.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(now_ms())
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS {
            self.window_start.store(now, Ordering::Relaxed);
            self.seen.store(0, Ordering::Relaxed);
        }
        if self.seen.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` for events a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        if let Some(suppressed) = LIMIT.admit() {
            if suppressed > 0 {
                tracing::warn!(suppressed, $($arg)+);
            } else {
                tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_through_then_lines_are_counted_not_logged() {
        let limit = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(limit.admit_at(5), Some(0));
        }
        assert_eq!(limit.admit_at(6), None);
        assert_eq!(limit.admit_at(7), None);
        // The next window lets a line through and reports the two dropped.
        assert_eq!(limit.admit_at(5 + WINDOW_MS), Some(2));
        assert_eq!(limit.admit_at(5 + WINDOW_MS), Some(0));
    }
}
