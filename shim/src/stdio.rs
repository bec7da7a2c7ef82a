//! A process's stdio: containerd's FIFOs (or `file://` logs) on one side,
//! the agent's vsock streams on the other, one copying thread per stream.
//!
//! ```text
//!  stdin FIFO ──read──▶ thread ──▶ agent stdin stream (half-close = EOF)
//!  agent stdout stream ──▶ thread ──write──▶ stdout FIFO     (stderr alike)
//! ```
//!
//! The stdin FIFO is opened by its thread too; the open waits for
//! containerd's writer and the copy ends when that writer closes. `CloseIO`
//! only matters when no writer ever came: it opens and closes one, so the
//! waiting thread reads EOF and lets go.
//! An output FIFO is opened by its thread (the open waits for a reader);
//! when the reader goes away the thread keeps draining the agent's stream,
//! so the process never blocks on a reader that left.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use capsid_base::lock;
use capsid_runtime::Agent;
use capsid_runtime::protocol::{ClientError, ProcessRef, StdioRequest, Stream};

/// Where containerd wants a process's streams; empty means none.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn request(&self) -> StdioRequest {
        StdioRequest {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            // With a terminal, everything comes on the pty's one stream.
            stderr: !self.stderr.is_empty() && !self.terminal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot attach to the process's {0:?}")]
    Attach(Stream, #[source] ClientError),
}

/// The copying threads of one process.
#[derive(Debug, Default)]
pub struct Copiers {
    outputs: Mutex<Vec<JoinHandle<()>>>,
    stdin_path: Mutex<Option<String>>,
}

fn open_output(path: &str) -> io::Result<File> {
    match path.strip_prefix("file://") {
        Some(file) => OpenOptions::new().create(true).append(true).open(file),
        // Blocks until containerd's reader is there, as a FIFO open does.
        None => OpenOptions::new().write(true).open(path),
    }
}

fn copy_output(mut from: std::os::unix::net::UnixStream, path: String) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut to = match open_output(&path) {
            Ok(file) => Some(file),
            Err(e) => {
                log::warn!("cannot open {path}: {e}; discarding the stream");
                None
            }
        };
        let mut buffer = vec![0; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(file) = &mut to
                        && file.write_all(&buffer[..n]).is_err()
                    {
                        // The reader left: keep draining so the process
                        // does not block on a full stream.
                        to = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

impl Copiers {
    /// Attaches every stream `paths` asks for; call before the process starts.
    pub fn attach(
        client: &dyn Agent,
        process: &ProcessRef,
        paths: &StdioPaths,
    ) -> Result<Self, StdioError> {
        let wanted = paths.request();
        let mut copiers = Self::default();
        for (stream, path, on) in [
            (Stream::Stdout, &paths.stdout, wanted.stdout),
            (Stream::Stderr, &paths.stderr, wanted.stderr),
        ] {
            if on {
                let from = client
                    .attach(process, stream)
                    .map_err(|e| StdioError::Attach(stream, e))?;
                copiers
                    .outputs
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(copy_output(from, path.clone()));
            }
        }
        if wanted.stdin {
            let path = paths.stdin.clone();
            let mut to = client
                .attach(process, Stream::Stdin)
                .map_err(|e| StdioError::Attach(Stream::Stdin, e))?;
            *lock(&copiers.stdin_path) = Some(path.clone());
            thread::spawn(move || {
                // The open waits for containerd's writer, as a FIFO open
                // does; EOF comes when that writer closes.
                match File::open(&path) {
                    Ok(mut fifo) => {
                        let _ = io::copy(&mut fifo, &mut to);
                    }
                    Err(e) => log::warn!("cannot open {path}: {e}"),
                }
                let _ = to.shutdown(Shutdown::Write);
            });
        }
        Ok(copiers)
    }

    /// containerd's CloseIO: stdin ends after what was already written.
    pub fn close_stdin(&self) {
        let path = lock(&self.stdin_path).take();
        // A copy still waiting in its open (no writer ever came) gets one
        // that closes at once, so it reads EOF instead of waiting forever.
        if let Some(path) = path {
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }

    /// Waits until the output streams have ended (the agent closes them
    /// after the process and everything it started have exited), at most
    /// `timeout`, so an exit event never overtakes the process's output.
    pub fn wait_outputs(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let handles = std::mem::take(&mut *lock(&self.outputs));
        for handle in handles {
            while !handle.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if handle.is_finished() {
                let _ = handle.join();
            }
        }
    }
}
