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
//! - the files themselves are [`RotatingFile`]s: the log (`--log-file`)
//!   and the guest console (`--serial file:`) each keep at most 1 MiB.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
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

    pub const fn with_burst(burst: u64) -> Self {
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

/// A file that output without end cannot grow without bound: once `PATH`
/// holds `half` bytes ([`RotatingFile::HALF`] by default) it becomes
/// `PATH.1` (replacing the one before) and `PATH` starts again. The latest
/// output, which says why a guest or the VMM died, is always in `PATH.1` +
/// `PATH`, and the two never hold more than twice `half`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    file: File,
    /// Bytes in `path` now.
    len: u64,
    half: u64,
    /// Also make each new file the process's stderr (the VMM's own log,
    /// so that a panic message lands beside the last log lines).
    as_stderr: bool,
}

impl RotatingFile {
    pub const HALF: u64 = 512 << 10;

    /// Opens `path` for appending (what is there counts towards the bound).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::with_half(path, Self::HALF)
    }

    /// Opens `path` like [`RotatingFile::open`] and makes it stderr, now and
    /// after every rotation.
    pub fn open_as_stderr(path: &Path) -> std::io::Result<Self> {
        let mut file = Self::open(path)?;
        file.as_stderr = true;
        file.redirect_stderr()?;
        Ok(file)
    }

    pub(crate) fn with_half(path: &Path, half: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            file,
            len,
            half,
            as_stderr: false,
        })
    }

    /// Where the output before `path`'s start went.
    pub fn older(path: &Path) -> PathBuf {
        let mut older = path.as_os_str().to_owned();
        older.push(".1");
        older.into()
    }

    fn redirect_stderr(&self) -> std::io::Result<()> {
        // SAFETY: dup2 takes two descriptors; ours stays open, and fd 2 is
        // replaced atomically.
        if unsafe { libc::dup2(self.file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, Self::older(&self.path))?;
        self.file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)?;
        self.len = 0;
        if self.as_stderr {
            self.redirect_stderr()?;
        }
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.len >= self.half {
            self.rotate()?;
        }
        let room = usize::try_from(self.half - self.len).unwrap_or(usize::MAX);
        let n = self.file.write(&buf[..buf.len().min(room)])?;
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
    fn the_console_file_keeps_the_latest_output_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"0123").unwrap();
        let mut console = std::io::LineWriter::new(RotatingFile::with_half(&path, 20).unwrap());
        let mut everything = String::from("0123");
        for line in 0..40 {
            writeln!(console, "line {line}").unwrap();
            everything += &format!("line {line}\n");
        }
        console.flush().unwrap();
        let older = std::fs::read_to_string(RotatingFile::older(&path)).unwrap();
        let newer = std::fs::read_to_string(&path).unwrap();
        // At most twice the half, and always at least the last half.
        assert!(
            older.len() == 20 && newer.len() <= 20,
            "{older:?} {newer:?}"
        );
        assert!(
            everything.ends_with(&format!("{older}{newer}")),
            "{older:?} {newer:?}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn the_log_rotates_and_stays_stderr() {
        // In a child process: fd 2 of the test harness must stay as it is.
        if std::env::var_os("CAPSID_TEST_STDERR_CHILD").is_none() {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "logging::tests::the_log_rotates_and_stays_stderr",
                ])
                .env("CAPSID_TEST_STDERR_CHILD", "1")
                .status()
                .unwrap();
            assert!(status.success());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmm.log");
        let mut log = RotatingFile::open_as_stderr(&path).unwrap();
        log.half = 16;
        // Through the fd (eprint! is captured by the test harness).
        let stderr = || std::io::stderr();
        stderr().write_all(b"before ").unwrap();
        log.write_all(b"0123456789abcdef").unwrap();
        log.write_all(b"after rotation\n").unwrap();
        stderr().write_all(b"stderr follows").unwrap();
        let older = std::fs::read_to_string(RotatingFile::older(&path)).unwrap();
        let newer = std::fs::read_to_string(&path).unwrap();
        assert!(older.starts_with("before "), "{older:?}");
        assert_eq!(newer, "after rotation\nstderr follows");
    }
}
