//! A process's standard streams: pipes (or one pty) between the process and
//! the agent, and copier threads between those and the host's vsock
//! streams. Bytes are copied as they come; nothing is framed or polled.
//!
//! ```text
//!  host stdin stream ──▶ copier ──▶ pipe ──▶ process fd 0
//!  process fd 1 ──▶ pipe ──▶ copier ──▶ host stdout stream (EOF when all
//!  process fd 2 ──▶ pipe ──▶ copier ──▶ host stderr stream  writers close)
//! ```
//!
//! Output pipes exist from create on, so output written before the host
//! attaches waits in the pipe (the process blocks when it is full) and none
//! is lost.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;

use capsid_protocol::{StdioRequest, Stream};

use crate::vsock::VsockStream;
use capsid_base::lock;

/// The process's ends, moved to fds 0, 1 and 2 in the child.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The agent's ends.
#[derive(Debug, Default)]
pub struct ProcessIo {
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    pty: OnceLock<File>,
    /// Whether the host asked for stdin (for a terminal set up later).
    wants_stdin: bool,
    /// A second handle on the attached stdin stream, so CloseStdin can end
    /// the copier's read.
    stdin_stream: Mutex<Option<VsockStream>>,
    stdin_closed: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("{0} is not open for this process (not requested, or already attached)")]
    NotAvailable(&'static str),
    #[error("the process has no terminal")]
    NoTerminal,
    #[error("stdio: {0}")]
    Io(#[source] io::Error),
}

/// A pipe whose both ends close on exec: (read, write).
pub fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two new descriptors that we now own.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn dev_null() -> io::Result<OwnedFd> {
    Ok(File::options()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

impl ProcessIo {
    /// Opens what `request` asks for. With `terminal`, the child opens a
    /// pty in its own /dev/pts and hands the master over (see
    /// [`ProcessIo::set_terminal`]); until then its fds 0-2 are /dev/null.
    pub fn open(request: StdioRequest, terminal: bool) -> io::Result<(Self, ChildStdio)> {
        if terminal {
            let io = Self {
                wants_stdin: request.stdin,
                ..Self::default()
            };
            let child = ChildStdio {
                stdin: dev_null()?,
                stdout: dev_null()?,
                stderr: dev_null()?,
            };
            return Ok((io, child));
        }
        let mut io = Self::default();
        let stdin = if request.stdin {
            let (read, write) = pipe()?;
            io.stdin = Mutex::new(Some(write));
            read.into()
        } else {
            dev_null()?
        };
        let output = |wanted: bool, slot: &mut Mutex<Option<File>>| -> io::Result<OwnedFd> {
            if !wanted {
                return dev_null();
            }
            let (read, write) = pipe()?;
            *slot = Mutex::new(Some(read));
            Ok(write.into())
        };
        let stdout = output(request.stdout, &mut io.stdout)?;
        let stderr = output(request.stderr, &mut io.stderr)?;
        Ok((
            io,
            ChildStdio {
                stdin,
                stdout,
                stderr,
            },
        ))
    }

    /// Connects a host stream: takes the process's end, calls `ack` (which
    /// answers the host before any data flows), then a copier thread runs
    /// until EOF on either side.
    pub fn attach(
        &self,
        stream: Stream,
        mut connection: VsockStream,
        ack: impl FnOnce(&mut VsockStream) -> io::Result<()>,
    ) -> Result<(), StdioError> {
        match stream {
            Stream::Stdin => {
                if self.stdin_closed.load(Ordering::Acquire) {
                    return Err(StdioError::NotAvailable("stdin"));
                }
                let pipe = take(&self.stdin, "stdin")?;
                *lock(&self.stdin_stream) = Some(connection.try_clone().map_err(StdioError::Io)?);
                ack(&mut connection).map_err(StdioError::Io)?;
                thread::spawn(move || copy_in(connection, pipe));
            }
            Stream::Stdout | Stream::Stderr => {
                let (slot, name) = match stream {
                    Stream::Stdout => (&self.stdout, "stdout"),
                    _ => (&self.stderr, "stderr"),
                };
                let pipe = take(slot, name)?;
                ack(&mut connection).map_err(StdioError::Io)?;
                thread::spawn(move || copy_out(pipe, connection));
            }
        }
        Ok(())
    }

    /// The pty master the child sent: stdin writes to it, stdout reads it.
    pub fn set_terminal(&self, master: OwnedFd) -> io::Result<()> {
        let master = File::from(master);
        if self.wants_stdin {
            *lock(&self.stdin) = Some(master.try_clone()?);
        }
        *lock(&self.stdout) = Some(master.try_clone()?);
        let _ = self.pty.set(master);
        Ok(())
    }

    /// EOF for the process's stdin, whether or not a stream is attached.
    pub fn close_stdin(&self) {
        self.stdin_closed.store(true, Ordering::Release);
        drop(lock(&self.stdin).take());
        if let Some(stream) = lock(&self.stdin_stream).take() {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        let pty = self.pty.get().ok_or(StdioError::NoTerminal)?;
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize, which `size` is.
        if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &raw const size) } != 0 {
            return Err(StdioError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Drops every end the agent still holds (the process is gone).
    pub fn release(&self) {
        drop(lock(&self.stdin).take());
        drop(lock(&self.stdin_stream).take());
    }
}

fn take(slot: &Mutex<Option<File>>, name: &'static str) -> Result<File, StdioError> {
    lock(slot).take().ok_or(StdioError::NotAvailable(name))
}

const COPY_BUFFER: usize = 64 * 1024;

fn copy_in(mut from: VsockStream, mut to: File) {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // Dropping `to` is the process's EOF.
}

fn copy_out(mut from: File, mut to: VsockStream) {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        match from.read(&mut buffer) {
            // EIO: a pty whose last slave user is gone; that is its EOF.
            Ok(0) => break,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
