//! A process in the guest, attached to this terminal: its output to ours,
//! our input to it (raw mode and the window size with a tty), its exit
//! status; `--timeout` and SIGINT/SIGTERM kill it. Shared by `capsid run`
//! and `capsid exec`.

use std::io::{self, IsTerminal, Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A spinner on stderr for a long step (image conversion, boot), when
/// stderr is a terminal; cleared when dropped.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    pub fn start(message: &str) -> Self {
        if !io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(format!("capsid: {message}"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    /// Prints `line` on stderr above the spinner.
    pub fn say(&self, line: &str) {
        match &self.0 {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
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
    pub stop: &'a AtomicBool,
}

#[derive(Debug, Clone, Copy)]
pub enum Ended {
    Exited(ExitStatus),
    TimedOut(Duration),
}

impl Ended {
    /// The command's status as a shell reports it; 124 on a timeout.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Self::Exited(status) => {
                ExitCode::from(u8::try_from(status.shell_code()).unwrap_or(255))
            }
            Self::TimedOut(after) => {
                eprintln!("capsid: timed out after {after:?}; the command was killed");
                ExitCode::from(124)
            }
        }
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
) -> anyhow::Result<Ended> {
    let Session { agent, process, .. } = *session;
    let client: &dyn Agent = &**agent;
    if session.tty
        && let Some((rows, cols)) = window_size()
    {
        client.resize_tty(process, rows, cols)?;
    }
    let (done, drained) = std::sync::mpsc::channel();
    let copy_out = |stream: Stream, mut to: Box<dyn Write + Send>| -> anyhow::Result<_> {
        let mut from = client.attach(process, stream)?;
        let done = done.clone();
        thread::spawn(move || {
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
            }
            let _ = done.send(());
        });
        Ok(())
    };
    // Detached: a stream held open in the guest must not hold us (`drain`).
    copy_out(Stream::Stdout, Box::new(io::stdout()))?;
    if !session.tty {
        copy_out(Stream::Stderr, Box::new(io::stderr()))?;
    }
    let mut stdin_stream = client.attach(process, Stream::Stdin)?;
    let raw = RawTerminal::enter(session.tty);
    client.start_process(process)?;
    // Stdin is copied by a thread that may block in read forever; it is not
    // joined (the process exits without it).
    thread::spawn(move || {
        let mut buffer = vec![0; 64 * 1024];
        let mut stdin = io::stdin();
        while let Ok(n) = stdin.read(&mut buffer) {
            if n == 0 || stdin_stream.write_all(&buffer[..n]).is_err() {
                break;
            }
        }
        let _ = stdin_stream.shutdown(Shutdown::Write);
    });

    let (status_tx, status_rx) = std::sync::mpsc::channel();
    {
        // The wait blocks on a connection of its own; calls go on meanwhile.
        let waiter = Arc::clone(agent);
        let process = process.clone();
        thread::spawn(move || {
            let _ = status_tx.send(waiter.wait_process(&process));
        });
    }
    let started = Instant::now();
    let mut timed_out = None;
    let status = loop {
        match status_rx.recv_timeout(Duration::from_millis(50)) {
            Ok(status) => break status?,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("lost the wait"),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        alive()?;
        let expired = session.timeout.filter(|&t| started.elapsed() > t);
        if (expired.is_some() && timed_out.is_none()) || session.stop.load(Ordering::Relaxed) {
            timed_out = timed_out.or(expired);
            client.signal_process(process, libc::SIGKILL, process.exec_id.is_none())?;
            session.stop.store(false, Ordering::Relaxed);
        }
    };
    let copiers = if session.tty { 1 } else { 2 };
    if !drain(&drained, copiers, DRAIN_BOUND) {
        eprintln!(
            "capsid: the command's output did not end within {DRAIN_BOUND:?} of its exit \
             (something in the guest still holds it open); the rest is dropped"
        );
    }
    drop(raw);
    Ok(match timed_out {
        Some(after) => Ended::TimedOut(after),
        None => Ended::Exited(status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
