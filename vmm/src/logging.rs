//! The VMM's own log and the bounds on what a guest can make it write.
//!
//! A hostile guest must not be able to fill the host's disk through our logs
//! (Firecracker's rule). Three bounds keep it from doing so:
//!
//! - each call site of [`guest_warn!`](crate::guest_warn) owns a
//!   [`RateLimit`]: at most [`BURST`] lines per [`WINDOW_MS`]; the rest are
//!   counted and the count is reported with the next line that gets through;
//! - all those call sites together share one more limit, [`TOTAL_BURST`]
//!   lines per window, so 26 sites cannot add up to 260 lines a second;
//! - the files themselves are [`BoundedFile`]s: the log (`--log-file`)
//!   and the guest console (`--serial file:`) each keep at most their
//!   newest 1 MiB.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Lines let through per window, per call site.
pub const BURST: u64 = 10;
/// Lines let through per window, all guest-triggered call sites together.
pub const TOTAL_BURST: u64 = 30;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 1000;

/// The state of one limit.
#[derive(Debug)]
pub struct RateLimit {
    burst: u64,
    /// Start of the current window, in ms since the process's first log.
    window_start: AtomicU64,
    /// Lines seen in the current window.
    seen: AtomicU64,
    /// Lines dropped since the last line that got through.
    suppressed: AtomicU64,
}

/// The limit shared by every guest-triggered call site.
pub static TOTAL: RateLimit = RateLimit::with_burst(TOTAL_BURST);

fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl RateLimit {
    /// A call site's limit: [`BURST`] lines per window.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self::with_burst(BURST)
    }

    pub(crate) const fn with_burst(burst: u64) -> Self {
        Self {
            burst,
            window_start: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(n)` when a line may be logged now, `n` being the number
    /// of lines dropped before it at this site; `None` when this line must
    /// be dropped, by this site's limit or by the overall one.
    pub fn admit(&self) -> Option<u64> {
        self.admit_within(&TOTAL, now_ms())
    }

    fn admit_within(&self, total: &RateLimit, now: u64) -> Option<u64> {
        if self.take(now) && total.take(now) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Counts one line against this limit; whether it is within it.
    fn take(&self, now: u64) -> bool {
        let start = self.window_start.load(Ordering::Relaxed);
        if now.saturating_sub(start) >= WINDOW_MS {
            self.window_start.store(now, Ordering::Relaxed);
            self.seen.store(0, Ordering::Relaxed);
        }
        self.seen.fetch_add(1, Ordering::Relaxed) < self.burst
    }
}

/// `tracing::warn!` for events a guest can cause, rate-limited per call site
/// and overall.
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

/// A file that output without end cannot grow without bound: once it
/// would pass `max` bytes ([`BoundedFile::MAX`] by default), its older half
/// is dropped in place — the newest `max / 2` bytes move to its start and
/// the file is cut there — and writing goes on after them. The latest
/// output, which says why a guest or the VMM died, is always there.
///
/// Everything happens on the descriptor opened at start (`pread`,
/// `pwrite`, `ftruncate`): no path is looked up again, so a confined VMM
/// needs no `open` or `rename` to keep its logs bounded.
#[derive(Debug)]
pub struct BoundedFile {
    file: File,
    /// Bytes in the file at our last write (writes through a shared stderr
    /// are counted at the next one).
    len: u64,
    max: u64,
}

impl BoundedFile {
    pub(crate) const MAX: u64 = 1 << 20;

    /// Opens `path` for writing at its end (what is there counts towards
    /// the bound).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::with_max(path, Self::MAX)
    }

    /// Opens `path` like [`BoundedFile::open`] and makes it stderr too
    /// (the VMM's own log: a panic message lands beside the last lines).
    pub fn open_as_stderr(path: &Path) -> std::io::Result<Self> {
        let file = Self::open(path)?;
        // SAFETY: dup2 takes two descriptors; ours stays open, and fd 2 is
        // replaced atomically. They share the file offset.
        if unsafe { libc::dup2(file.file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(file)
    }

    pub(crate) fn with_max(path: &Path, max: u64) -> std::io::Result<Self> {
        // Not O_APPEND: pwrite must write where it is told.
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        let len = file.seek(SeekFrom::End(0))?;
        let mut bounded = Self {
            file,
            len,
            max: max.max(2),
        };
        if len > bounded.max {
            bounded.compact()?;
        }
        Ok(bounded)
    }

    /// Keeps the newest half: moves it to the start and cuts the file there.
    fn compact(&mut self) -> std::io::Result<()> {
        // lseek, not fstat: the seccomp filters allow only what this needs.
        let len = self.file.seek(SeekFrom::End(0))?;
        let keep = (self.max / 2).min(len);
        let mut newest = vec![0u8; usize::try_from(keep).unwrap_or(0)];
        self.file.read_exact_at(&mut newest, len - keep)?;
        self.file.write_all_at(&newest, 0)?;
        self.file.set_len(keep)?;
        self.len = self.file.seek(SeekFrom::Start(keep))?;
        Ok(())
    }
}

impl Write for BoundedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.max / 2).unwrap_or(usize::MAX));
        // Where the shared offset is now: what others wrote through stderr
        // counts too.
        self.len = self.file.stream_position()?;
        if self.len + n as u64 > self.max {
            self.compact()?;
        }
        let n = self.file.write(&buf[..n])?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_gets_through_then_lines_are_counted_not_logged() {
        let limit = RateLimit::new();
        let total = RateLimit::with_burst(1000);
        for _ in 0..BURST {
            assert_eq!(limit.admit_within(&total, 5), Some(0));
        }
        assert_eq!(limit.admit_within(&total, 6), None);
        assert_eq!(limit.admit_within(&total, 7), None);
        // The next window lets a line through and reports the two dropped.
        assert_eq!(limit.admit_within(&total, 5 + WINDOW_MS), Some(2));
        assert_eq!(limit.admit_within(&total, 5 + WINDOW_MS), Some(0));
    }

    #[test]
    fn many_call_sites_together_stay_within_the_overall_limit() {
        // 26 sites at their own burst each would let 260 lines a second
        // through; the overall limit lets TOTAL_BURST through.
        let total = RateLimit::with_burst(TOTAL_BURST);
        let sites: Vec<RateLimit> = (0..26).map(|_| RateLimit::new()).collect();
        let mut logged = 0;
        for site in &sites {
            for _ in 0..BURST {
                logged += u64::from(site.admit_within(&total, 100).is_some());
            }
        }
        assert_eq!(logged, TOTAL_BURST);
        // A site refused by the overall limit reports its drops later.
        let last = sites.last().unwrap();
        assert_eq!(last.admit_within(&total, 100 + WINDOW_MS), Some(BURST));
    }

    #[test]
    fn the_file_keeps_its_newest_output_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"0123").unwrap();
        let mut console = std::io::LineWriter::new(BoundedFile::with_max(&path, 40).unwrap());
        let mut everything = String::from("0123");
        for line in 0..40 {
            writeln!(console, "line {line}").unwrap();
            everything += &format!("line {line}\n");
            let now = std::fs::read_to_string(&path).unwrap();
            assert!(now.len() <= 40, "{now:?}");
            assert!(everything.ends_with(&now), "{now:?}");
        }
        console.flush().unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.len() >= 20, "at least the newest half: {now:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Reopening a file over the bound cuts it at once.
        std::fs::write(&path, vec![b'x'; 100]).unwrap();
        drop(BoundedFile::with_max(&path, 40).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 20);
    }

    #[test]
    fn the_log_stays_bounded_and_stays_stderr() {
        // In a child process: fd 2 of the test harness must stay as it is.
        if std::env::var_os("CAPSID_TEST_STDERR_CHILD").is_none() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "logging::tests::the_log_stays_bounded_and_stays_stderr",
                ])
                .env("CAPSID_TEST_STDERR_CHILD", "1")
                .status()
                .unwrap();
            assert!(status.success());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let mut log = BoundedFile::open_as_stderr(&path).unwrap();
        log.max = 32;
        // Through the fd (eprint! is captured by the test harness).
        let stderr = || std::io::stderr();
        stderr().write_all(b"before ").unwrap();
        log.write_all(b"0123456789abcdef").unwrap();
        stderr().write_all(b"stderr ").unwrap();
        log.write_all(b"after it is cut\n").unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        assert!(now.len() <= 32, "{now:?}");
        assert!(now.ends_with("stderr after it is cut\n"), "{now:?}");
    }
}
