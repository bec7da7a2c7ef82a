//! A process in the guest, attached to this terminal: its output to ours,
//! our input to it (raw mode and the window size with a tty), its exit
//! status; `--timeout` kills it, and SIGINT, SIGTERM and SIGHUP are passed
//! on to it (docker's sig-proxy; a second one, or [`GRACE`] without an
//! exit, kills it). Shared by `capsid run` and `capsid exec`.

use std::io::{self, IsTerminal, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::bail;
use capsid_runtime::Agent;
use capsid_runtime::protocol::{ExitStatus, ProcessRef, StdioRequest, Stream};

/// The terminal in raw mode while the command has a tty; restored on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter(wanted: bool) -> Self {
        if !wanted || !io::stdin().is_terminal() {
            return Self(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 and a valid termios to fill.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Self(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: fd 0 and a valid termios.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: fd 0 and the termios saved before.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

fn window_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: fd 1 and a valid winsize to fill.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_row > 0).then_some((size.ws_row, size.ws_col))
}

/// A spinner on stderr for a long step (image conversion, boot), when a
/// person watches it ([`draws_spinners`]); cleared when dropped. In a log
/// a step that took [`SLOW_STEP`] or more is one plain line when it ends,
/// with how long it took; a quick one says nothing.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// Without a spinner: the step and when it started.
    plain: Option<(String, Instant)>,
}

/// How long a step takes before a log is told of it.
const SLOW_STEP: Duration = Duration::from_secs(2);

/// Whether stderr is a terminal someone watches: a pseudo-terminal or a
/// virtual console (not a serial line or `/dev/console`, which a VM's or a
/// CI machine's log records), with a `TERM` that is not `dumb`, and not
/// under CI (`CI` set, as every CI service does). A log gets no spinner
/// frames.
fn draws_spinners(stderr_tty: Option<&Path>, term: Option<&str>, ci: Option<&str>) -> bool {
    let ci = ci.is_some_and(|v| !v.is_empty() && v != "0" && v != "false");
    let watched = stderr_tty.is_some_and(|tty| {
        let name = tty.to_string_lossy();
        name.starts_with("/dev/pts/")
            || name
                .strip_prefix("/dev/tty")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    });
    watched && !ci && term.is_some_and(|t| !t.is_empty() && t != "dumb")
}

/// The terminal stderr is, if it is one.
fn stderr_tty() -> Option<std::path::PathBuf> {
    io::stderr()
        .is_terminal()
        .then(|| std::fs::read_link("/proc/self/fd/2").ok())
        .flatten()
}

impl Progress {
    pub fn start(message: &str) -> Self {
        let var = |name| std::env::var(name).ok();
        if !draws_spinners(
            stderr_tty().as_deref(),
            var("TERM").as_deref(),
            var("CI").as_deref(),
        ) {
            return Self {
                bar: None,
                plain: Some((message.to_owned(), Instant::now())),
            };
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!("capsid: {message}"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Self {
            bar: Some(bar),
            plain: None,
        }
    }

    /// Prints `line` on stderr above the spinner.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

/// The plain line a step that took `took` leaves in a log, if any.
fn plain_line(step: &str, took: Duration) -> Option<String> {
    (took >= SLOW_STEP).then(|| format!("capsid: {step}: {:.1} s", took.as_secs_f64()))
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if let Some((step, started)) = &self.plain
            && let Some(line) = plain_line(step, started.elapsed())
        {
            eprintln!("{line}");
        }
    }
}

/// How long a command may take to exit after the first signal was passed
/// on to it before it is killed (`docker stop`'s default).
pub const GRACE: Duration = Duration::from_secs(10);

/// SIGINT, SIGTERM and SIGHUP sent to capsid. Until the command runs, any
/// of them stops what capsid is doing (the boot, say); while it runs,
/// [`run_attached`] passes the first on to it and kills it on the second.
#[derive(Debug, Default)]
pub struct Signals {
    count: AtomicUsize,
    last: AtomicI32,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Arc<Self>> {
        let signals = Arc::new(Self::default());
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let noted = Arc::clone(&signals);
            // SAFETY: the handler only stores to atomics, which is
            // async-signal-safe; it allocates and locks nothing.
            unsafe { signal_hook::low_level::register(signal, move || noted.note(signal)) }
                .map_err(|e| anyhow::anyhow!("cannot install signal handlers: {e}"))?;
        }
        Ok(signals)
    }

    fn note(&self, signal: i32) {
        self.last.store(signal, Ordering::SeqCst);
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether any came.
    pub fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// What to do about the signals that came while the command ran.
#[derive(Debug, Default)]
struct SigProxy {
    /// Signals dealt with.
    seen: usize,
    /// When the command is killed if it has not exited: set when the first
    /// signal was passed on.
    kill_at: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Act {
    Nothing,
    /// Pass this signal on.
    Pass(i32),
    /// Kill the command: a second signal, or the grace period is over.
    Kill,
}

impl SigProxy {
    fn act(&mut self, count: usize, last: i32, now: Instant) -> Act {
        if count > self.seen {
            let first = self.seen == 0 && count == 1;
            self.seen = count;
            if first {
                self.kill_at = Some(now + GRACE);
                return Act::Pass(last);
            }
            self.kill_at = None;
            return Act::Kill;
        }
        if self.kill_at.is_some_and(|at| now >= at) {
            self.kill_at = None;
            return Act::Kill;
        }
        Act::Nothing
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// The streams to ask for: with a tty, everything comes on stdout.
pub fn stdio_request(tty: bool) -> StdioRequest {
    StdioRequest {
        stdin: true,
        stdout: true,
        stderr: !tty,
    }
}

#[derive(Debug)]
pub struct Session<'a> {
    pub agent: &'a Arc<dyn Agent>,
    pub process: &'a ProcessRef,
    pub tty: bool,
    pub timeout: Option<Duration>,
    pub signals: &'a Signals,
    /// Counts the bytes each stream carried.
    pub traffic: &'a Arc<Traffic>,
}

/// Bytes the command's streams carried, counted as they are copied.
#[derive(Debug, Default)]
pub struct Traffic {
    pub stdin: AtomicU64,
    pub stdout: AtomicU64,
    pub stderr: AtomicU64,
}

/// How a session went: how the command ended, how long it ran (start to
/// exit) and how long its output took to drain after.
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    pub ended: Ended,
    pub ran: Duration,
    pub drained: Duration,
}

#[derive(Debug, Clone, Copy)]
pub enum Ended {
    Exited(ExitStatus),
    TimedOut(Duration),
}

impl Ended {
    /// The command's status as a shell reports it; 124 on a timeout.
    pub fn status(self) -> u8 {
        match self {
            Self::Exited(status) => u8::try_from(status.shell_code()).unwrap_or(255),
            Self::TimedOut(_) => 124,
        }
    }

    /// [`Self::status`], saying so on a timeout.
    pub fn exit_code(self) -> ExitCode {
        if let Self::TimedOut(after) = self {
            eprintln!("capsid: timed out after {after:?}; the command was killed");
        }
        ExitCode::from(self.status())
    }
}

/// How long the output may go on after the process exited: its last bytes
/// are in flight; a stream still open after this is held by something
/// else in the guest.
const DRAIN_BOUND: Duration = Duration::from_secs(10);

/// Waits until `copiers` output copiers said they are done on `done`, at
/// most `bound` in all; whether they all were.
fn drain(done: &std::sync::mpsc::Receiver<()>, copiers: usize, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    (0..copiers).all(|_| {
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    })
}

/// Attaches the process's streams to ours, starts it, and waits for it,
/// checking `alive` (the VM) meanwhile; returns once its output drained.
pub fn run_attached(
    session: &Session<'_>,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Attached> {
    let Session { agent, process, .. } = *session;
    let client: &dyn Agent = &**agent;
    if session.tty
        && let Some((rows, cols)) = window_size()
    {
        client.resize_tty(process, rows, cols)?;
    }
    // The wait blocks on a connection of its own, made while the streams
    // are attached; calls go on meanwhile.
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    {
        let waiter = Arc::clone(agent);
        let process = process.clone();
        thread::spawn(move || {
            let _ = status_tx.send(waiter.wait_process(&process));
        });
    }
    // Each stream has a connection of its own, all made at once: every one
    // is a round trip to the guest.
    let (stdout, stderr, stdin) = thread::scope(|scope| {
        let joined = |handle: thread::ScopedJoinHandle<'_, _>| {
            handle
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        };
        let stdout = scope.spawn(|| client.attach(process, Stream::Stdout));
        let stderr = (!session.tty).then(|| scope.spawn(|| client.attach(process, Stream::Stderr)));
        let stdin = client.attach(process, Stream::Stdin);
        (joined(stdout), stderr.map(joined), stdin)
    });
    let (done, drained) = std::sync::mpsc::channel();
    let copy_out = |stream: Stream, mut from: UnixStream, mut to: Box<dyn Write + Send>| {
        let done = done.clone();
        let traffic = Arc::clone(session.traffic);
        thread::spawn(move || {
            let counter = match stream {
                Stream::Stderr => &traffic.stderr,
                _ => &traffic.stdout,
            };
            let mut buffer = vec![0; 64 * 1024];
            while let Ok(n) = from.read(&mut buffer) {
                if n == 0
                    || to
                        .write_all(&buffer[..n])
                        .and_then(|()| to.flush())
                        .is_err()
                {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            let _ = done.send(());
        });
    };
    // Detached: a stream held open in the guest must not hold us (`drain`).
    copy_out(Stream::Stdout, stdout?, Box::new(io::stdout()));
    if let Some(stderr) = stderr {
        copy_out(Stream::Stderr, stderr?, Box::new(io::stderr()));
    }
    let mut stdin_stream = stdin?;
    let raw = RawTerminal::enter(session.tty);
    client.start_process(process)?;
    // Stdin is copied by a thread that may block in read forever; it is not
    // joined (the process exits without it).
    let traffic = Arc::clone(session.traffic);
    thread::spawn(move || {
        let mut buffer = vec![0; 64 * 1024];
        let mut stdin = io::stdin();
        while let Ok(n) = stdin.read(&mut buffer) {
            if n == 0 || stdin_stream.write_all(&buffer[..n]).is_err() {
                break;
            }
            traffic.stdin.fetch_add(n as u64, Ordering::Relaxed);
        }
        let _ = stdin_stream.shutdown(Shutdown::Write);
    });

    let started = Instant::now();
    let mut timed_out = None;
    let mut proxy = SigProxy::default();
    let kill = || client.signal_process(process, libc::SIGKILL, process.exec_id.is_none());
    let status = loop {
        match status_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(status) => break status?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("lost the wait"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        alive()?;
        let expired = session.timeout.filter(|&t| started.elapsed() > t);
        if expired.is_some() && timed_out.is_none() {
            timed_out = expired;
            kill()?;
        }
        let signals = session.signals;
        match proxy.act(
            signals.count.load(Ordering::SeqCst),
            signals.last.load(Ordering::SeqCst),
            Instant::now(),
        ) {
            Act::Nothing => {}
            Act::Pass(signal) => {
                eprintln!(
                    "capsid: passed {} on to the command; another signal, or {} s without \
                     an exit, kills it",
                    signal_name(signal),
                    GRACE.as_secs()
                );
                client.signal_process(process, signal, false)?;
            }
            Act::Kill => {
                eprintln!("capsid: killing the command");
                kill()?;
            }
        }
    };
    let ran = started.elapsed();
    let copiers = if session.tty { 1 } else { 2 };
    if !drain(&drained, copiers, DRAIN_BOUND) {
        eprintln!(
            "capsid: the command's output did not end within {DRAIN_BOUND:?} of its exit \
             (something in the guest still holds it open); the rest is dropped"
        );
    }
    drop(raw);
    Ok(Attached {
        ended: match timed_out {
            Some(after) => Ended::TimedOut(after),
            None => Ended::Exited(status),
        },
        ran,
        drained: started.elapsed().saturating_sub(ran),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_signal_is_passed_on_and_a_second_or_the_grace_period_kills() {
        let t0 = Instant::now();
        let mut proxy = SigProxy::default();
        assert_eq!(proxy.act(0, 0, t0), Act::Nothing);
        assert_eq!(
            proxy.act(1, libc::SIGTERM, t0),
            Act::Pass(libc::SIGTERM),
            "a CI runner's cancel reaches the job"
        );
        assert_eq!(proxy.act(1, libc::SIGTERM, t0 + GRACE / 2), Act::Nothing);
        assert_eq!(proxy.act(2, libc::SIGINT, t0 + GRACE / 2), Act::Kill);
        assert_eq!(proxy.act(2, libc::SIGINT, t0 + GRACE * 2), Act::Nothing);

        // No second signal: the grace period ends it, once.
        let mut proxy = SigProxy::default();
        assert_eq!(proxy.act(1, libc::SIGHUP, t0), Act::Pass(libc::SIGHUP));
        assert_eq!(proxy.act(1, libc::SIGHUP, t0 + GRACE), Act::Kill);
        assert_eq!(proxy.act(1, libc::SIGHUP, t0 + GRACE * 2), Act::Nothing);

        // Two at once (or one before the command ran and one after): kill.
        let mut proxy = SigProxy::default();
        assert_eq!(proxy.act(2, libc::SIGTERM, t0), Act::Kill);
    }

    #[test]
    fn spinners_are_drawn_only_for_a_person_at_a_terminal() {
        let pts = Some(Path::new("/dev/pts/3"));
        assert!(draws_spinners(pts, Some("xterm-256color"), None));
        assert!(draws_spinners(
            Some(Path::new("/dev/tty2")),
            Some("linux"),
            None
        ));
        assert!(!draws_spinners(None, Some("xterm"), None), "a pipe or file");
        // The nested test host's console, which the demo's log records: a
        // tty with TERM=linux. Before, some sixty spinner frames went there.
        for console in ["/dev/console", "/dev/ttyS0", "/dev/hvc0", "/dev/tty"] {
            assert!(
                !draws_spinners(Some(Path::new(console)), Some("linux"), None),
                "{console}"
            );
        }
        assert!(!draws_spinners(pts, None, None), "no TERM");
        assert!(!draws_spinners(pts, Some("dumb"), None));
        assert!(!draws_spinners(pts, Some("xterm"), Some("true")), "CI");
        assert!(draws_spinners(pts, Some("xterm"), Some("false")));
        assert_eq!(plain_line("booting", Duration::from_millis(300)), None);
        assert_eq!(
            plain_line("booting the micro-VM", Duration::from_millis(3250)).as_deref(),
            Some("capsid: booting the micro-VM: 3.2 s")
        );
    }

    #[test]
    fn signals_are_counted_with_the_last_one() {
        let signals = Signals::default();
        assert!(!signals.any());
        signals.note(libc::SIGTERM);
        signals.note(libc::SIGINT);
        assert!(signals.any());
        assert_eq!(signals.count.load(Ordering::SeqCst), 2);
        assert_eq!(signals.last.load(Ordering::SeqCst), libc::SIGINT);
    }

    #[test]
    fn output_that_never_ends_is_given_up_on_after_the_bound() {
        let (done, drained) = std::sync::mpsc::channel::<()>();
        // stdout ended; stderr is held open by the guest and never does.
        done.send(()).unwrap();
        let started = Instant::now();
        assert!(!drain(&drained, 2, Duration::from_millis(200)));
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
        drop(done);
    }

    #[test]
    fn output_that_ends_is_waited_for() {
        let (done, drained) = std::sync::mpsc::channel();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            done.send(()).unwrap();
            done.send(()).unwrap();
        });
        assert!(drain(&drained, 2, Duration::from_secs(5)));
        late.join().unwrap();
    }
}
