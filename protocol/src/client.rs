//! The host's side: a blocking client for one agent, reached through the
//! VMM's hybrid-vsock Unix socket (`CONNECT <port>\n` → `OK <hostport>\n`).
//!
//! Everything the agent sends is checked: the handshake line, frame sizes
//! (in the codec), the reply's kind for each call, pids, exit statuses, and
//! error texts (cut by characters and stripped of control characters before
//! they reach a host log).
//!
//! Every call has one deadline for all of it — connecting, writing the
//! request, reading the reply — not a timeout per `read(2)` that a
//! drip-fed reply could stretch forever (`Deadline`). Calls take a
//! control connection from a small pool and put it back when done, so no
//! lock is held while a call waits on the guest: a call that hangs holds
//! up only itself. A connection that failed or timed out is dropped, never
//! reused out of step.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::codec::{CodecError, read_frame, write_frame};
use crate::messages::*;
use crate::{MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection before the deadline.
    #[error(
        "the agent did not answer on vsock port {port} through {uds} within {waited:?} \
         (last attempt: {last}); is the guest booting the capsid agent?"
    )]
    Unreachable {
        /// The VMM's hybrid-vsock socket.
        uds: PathBuf,
        /// The agent's port.
        port: u32,
        /// How long we tried.
        waited: Duration,
        /// Why the last attempt failed.
        last: String,
    },
    /// The VMM's socket failed.
    #[error("cannot reach the VMM's vsock socket {0}")]
    Socket(PathBuf, #[source] io::Error),
    /// The VMM's `CONNECT` handshake failed.
    #[error("hybrid-vsock handshake: {0}")]
    Handshake(String),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {theirs}, we speak {PROTOCOL_VERSION}")]
    Version {
        /// The agent's version.
        theirs: u32,
    },
    /// A frame could not be sent or read.
    #[error("agent connection")]
    Codec(#[source] CodecError),
    /// The agent answered with an error.
    // The code is for programs (containerd's errdefs); people read the
    // agent's words.
    #[error("the guest agent refused {call}: {message}")]
    Agent {
        /// The request.
        call: &'static str,
        /// The agent's error code.
        code: ErrorCode,
        /// The agent's words.
        message: String,
    },
    /// The answer does not fit the request (a hostile or broken agent).
    #[error("agent answered {call} with {got}, which is not a valid answer")]
    BadReply {
        /// The request.
        call: &'static str,
        /// The answer, shortened.
        got: String,
    },
    /// No answer within the call's deadline.
    #[error("the agent did not answer {call} within {after:?}")]
    Timeout {
        /// The request.
        call: &'static str,
        /// The deadline.
        after: Duration,
    },
}

impl ClientError {
    /// Whether the agent missed a call's deadline: the VM is then taken
    /// down by the caller, since a guest that stalls a call may stall all.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// How long one hybrid-vsock handshake may take before it is retried.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Error texts from the guest are cut to this many characters.
const MAX_ERROR_TEXT: usize = 1024;
/// Idle control connections kept for the next calls.
const POOL: usize = 4;
/// The longest pause between attempts to reach an agent that is not
/// answering yet.
const CONNECT_PAUSE: Duration = Duration::from_millis(20);

/// A socket whose every read and write is bounded by one instant: each
/// syscall gets the time left as its timeout, and none starts after it.
#[derive(Debug)]
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: Instant,
}

impl Deadline<'_> {
    fn arm(&self, read: bool) -> io::Result<()> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if read {
            self.stream.set_read_timeout(Some(left))
        } else {
            self.stream.set_write_timeout(Some(left))
        }
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        (&*self.stream).read(buf).map_err(|e| {
            if timed_out(&e) {
                io::ErrorKind::TimedOut.into()
            } else {
                e
            }
        })
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        (&*self.stream).write(buf).map_err(|e| {
            if timed_out(&e) {
                io::ErrorKind::TimedOut.into()
            } else {
                e
            }
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A connection to one agent: a pool of control connections for calls,
/// and fresh connections for waits and stdio streams.
#[derive(Debug)]
pub struct AgentClient {
    uds: PathBuf,
    port: u32,
    io_timeout: Duration,
    /// Idle control connections; taken for a call, put back after it.
    idle: Mutex<Vec<UnixStream>>,
    agent: String,
    /// Called when a call misses its deadline (the owner kills the VM).
    on_timeout: std::sync::OnceLock<Hook>,
}

/// What an [`AgentClient`] does when the agent misses a call's deadline.
pub type TimeoutHook = Box<dyn Fn(&'static str) + Send + Sync>;

struct Hook(TimeoutHook);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TimeoutHook")
    }
}

impl AgentClient {
    /// Connects to the agent, retrying until it answers or `wait` has
    /// passed (the guest may still be booting). `io_timeout` bounds each
    /// call after that, except `wait_process`.
    pub fn connect(
        uds: &Path,
        port: u32,
        wait: Duration,
        io_timeout: Duration,
    ) -> Result<Self, ClientError> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let deadline = Instant::now() + io_timeout.min(HANDSHAKE_TIMEOUT);
            let attempt =
                hybrid_connect(uds, port, io_timeout.min(HANDSHAKE_TIMEOUT)).and_then(|stream| {
                    let agent = hello(
                        &mut Deadline {
                            stream: &stream,
                            until: deadline,
                        },
                        "Hello",
                        &Hello::Control {
                            version: PROTOCOL_VERSION,
                        },
                    )?;
                    Ok((stream, agent))
                });
            match attempt {
                Ok((stream, agent)) => {
                    return Ok(Self {
                        uds: uds.into(),
                        port,
                        io_timeout,
                        idle: Mutex::new(vec![stream]),
                        agent,
                        on_timeout: std::sync::OnceLock::new(),
                    });
                }
                // A version mismatch will not go away by waiting.
                Err(e @ ClientError::Version { .. }) => return Err(e),
                Err(e) if start.elapsed() >= wait => {
                    return Err(ClientError::Unreachable {
                        uds: uds.into(),
                        port,
                        waited: start.elapsed(),
                        last: capsid_base::error_chain(&e),
                    });
                }
                Err(_) => {
                    // Short: a restored guest answers some 100 ms after its
                    // VMM starts, and each attempt costs little.
                    thread::sleep(pause);
                    pause = (pause * 2).min(CONNECT_PAUSE);
                }
            }
        }
    }

    /// A client on `stream`, a connection whose hello is done: what the
    /// tests and the fuzzer use to replay an agent's replies. Calls that
    /// need a new connection (waits, stdio) fail: there is no socket path.
    pub fn on_stream(stream: UnixStream, io_timeout: Duration) -> Self {
        Self {
            uds: PathBuf::from("/nonexistent/capsid-replay.sock"),
            port: 0,
            io_timeout,
            idle: Mutex::new(vec![stream]),
            agent: String::new(),
            on_timeout: std::sync::OnceLock::new(),
        }
    }

    /// Runs `hook` whenever a call misses its deadline: a guest that
    /// stalls one call may stall them all, so the owner takes the VM down
    /// (and the call still returns `Timeout`). Set once.
    pub fn on_timeout(&self, hook: TimeoutHook) {
        let _ = self.on_timeout.set(Hook(hook));
    }

    fn timed_out<T>(&self, outcome: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(ClientError::Timeout { call, .. }) = &outcome
            && let Some(hook) = self.on_timeout.get()
        {
            (hook.0)(call);
        }
        outcome
    }

    /// What the agent said it is (name and version).
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Creates a container and its init process, stopped before exec;
    /// returns the init's guest pid.
    pub fn create_container(&self, request: CreateContainer) -> Result<u32, ClientError> {
        let call = "CreateContainer";
        match self.call(call, &Request::CreateContainer(Box::new(request)))? {
            Response::Pid { pid } if pid > 1 => Ok(pid),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// Prepares an exec in a created container; returns its guest pid.
    pub fn exec_process(&self, request: ExecProcess) -> Result<u32, ClientError> {
        let call = "ExecProcess";
        match self.call(call, &Request::ExecProcess(Box::new(request)))? {
            Response::Pid { pid } if pid > 1 => Ok(pid),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// Lets a created process run its program.
    pub fn start_process(&self, process: &ProcessRef) -> Result<(), ClientError> {
        self.call_ok("StartProcess", &Request::StartProcess(process.clone()))
    }

    /// Blocks until the process exits, on a connection of its own so other
    /// calls go on meanwhile. Ends with an error if the VM goes away.
    pub fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, ClientError> {
        let call = "WaitProcess";
        let stream = self.open(&Hello::Control {
            version: PROTOCOL_VERSION,
        })?;
        // The reply comes when the process exits, however long it runs;
        // the request itself is bounded.
        let mut request = Deadline {
            stream: &stream,
            until: Instant::now() + self.io_timeout,
        };
        write_frame(&mut request, &Request::WaitProcess(process.clone()))
            .map_err(|e| codec_error(call, self.io_timeout, e))?;
        stream
            .set_read_timeout(None)
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        match reply(&mut &stream, call, self.io_timeout)? {
            Response::Exited { status } if status.is_valid() => Ok(status),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// Sends `signal` to the process, or with `all` to every process of
    /// its container.
    pub fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), ClientError> {
        let request = Request::SignalProcess {
            process: process.clone(),
            signal,
            all,
        };
        self.call_ok("SignalProcess", &request)
    }

    /// Gives the process's terminal a new size.
    pub fn resize_tty(
        &self,
        process: &ProcessRef,
        rows: u16,
        cols: u16,
    ) -> Result<(), ClientError> {
        let request = Request::ResizeTty {
            process: process.clone(),
            rows,
            cols,
        };
        self.call_ok("ResizeTty", &request)
    }

    /// Gives the process's stdin EOF.
    pub fn close_stdin(&self, process: &ProcessRef) -> Result<(), ClientError> {
        self.call_ok("CloseStdin", &Request::CloseStdin(process.clone()))
    }

    /// The container's cgroup counters, as the guest measured them.
    pub fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let call = "Stats";
        let request = Request::Stats {
            container_id: container_id.into(),
        };
        match self.call(call, &request)? {
            Response::Stats { stats } => Ok(*stats),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// New cgroup limits for a running container.
    pub fn update_resources(
        &self,
        container_id: &str,
        resources: oci_spec::runtime::LinuxResources,
    ) -> Result<(), ClientError> {
        let call = "UpdateResources";
        let request = Request::UpdateResources {
            container_id: container_id.into(),
            resources: Box::new(resources),
        };
        match self.call(call, &request)? {
            Response::Ok => Ok(()),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// Freezes or thaws every process of the container.
    pub fn freeze(&self, container_id: &str, frozen: bool) -> Result<(), ClientError> {
        let call = "Freeze";
        let request = Request::Freeze {
            container_id: container_id.into(),
            frozen,
        };
        match self.call(call, &request)? {
            Response::Ok => Ok(()),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// The guest pids of the container's processes.
    pub fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        let call = "ListProcesses";
        let request = Request::ListProcesses {
            container_id: container_id.into(),
        };
        match self.call(call, &request)? {
            Response::Processes { pids } if pids.iter().all(|&p| p > 0) => Ok(pids),
            other => Err(bad_reply(call, &other)),
        }
    }

    /// Kills what is left of the container and removes it.
    pub fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        let request = Request::RemoveContainer {
            container_id: container_id.into(),
        };
        self.call_ok("RemoveContainer", &request)
    }

    /// Gives the guest's interfaces their addresses, MTUs and routes.
    pub fn configure_network(&self, config: &crate::NetworkConfig) -> Result<(), ClientError> {
        let request = Request::ConfigureNetwork(Box::new(config.clone()));
        self.call_ok("ConfigureNetwork", &request)
    }

    /// Gives a guest restored from a snapshot its own entropy and the
    /// time (see [`crate::Request::Refresh`]).
    pub fn refresh(&self, refresh: &crate::Refresh) -> Result<(), ClientError> {
        let request = Request::Refresh(Box::new(refresh.clone()));
        self.call_ok("Refresh", &request)
    }

    /// Has a template's agent do now what its restored guests would each
    /// do for their first container (see [`crate::Request::Prepare`]).
    pub fn prepare(&self, prepare: &crate::Prepare) -> Result<(), ClientError> {
        let request = Request::Prepare(Box::new(prepare.clone()));
        self.call_ok("Prepare", &request)
    }

    /// Asks the agent to stop everything and reboot the VM (the VMM then
    /// exits 0).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        let call = "Shutdown";
        let stream = self.take()?;
        match self.exchange_on(&stream, call, &Request::Shutdown)? {
            Response::Ok => {}
            other => return Err(bad_reply(call, &other)),
        }
        // The agent reboots once it sees this end close (so the answer is
        // not lost in the reset).
        let _ = stream.shutdown(std::net::Shutdown::Write);
        capsid_base::lock(&self.idle).clear();
        Ok(())
    }

    /// Opens one standard stream of a created process. What is returned
    /// carries plain bytes; for stdin, `shutdown(Write)` is EOF.
    pub fn attach(&self, process: &ProcessRef, stream: Stream) -> Result<UnixStream, ClientError> {
        let connection = self.open(&Hello::Stdio {
            version: PROTOCOL_VERSION,
            process: process.clone(),
            stream,
        })?;
        // From here on a byte stream that lasts as long as the process's.
        connection
            .set_read_timeout(None)
            .and_then(|()| connection.set_write_timeout(None))
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        Ok(connection)
    }

    /// A tar stream of the directory `path` of a container's root file
    /// system (`Hello::Archive`); every read waits at most `idle`, so a
    /// guest that stalls the stream is an error, not a hang. Its contents
    /// are the container's: check every entry.
    pub fn archive(
        &self,
        container_id: &str,
        path: &str,
        idle: Duration,
    ) -> Result<UnixStream, ClientError> {
        let connection = self.open(&Hello::Archive {
            version: PROTOCOL_VERSION,
            container_id: container_id.to_owned(),
            path: path.to_owned(),
        })?;
        connection
            .set_read_timeout(Some(idle))
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        Ok(connection)
    }

    /// A new connection to the agent, its hello answered, within the
    /// call deadline.
    fn open(&self, first: &Hello) -> Result<UnixStream, ClientError> {
        let stream = hybrid_connect(&self.uds, self.port, self.io_timeout)?;
        let mut bounded = Deadline {
            stream: &stream,
            until: Instant::now() + self.io_timeout,
        };
        hello(&mut bounded, "Hello", first)?;
        Ok(stream)
    }

    /// An idle control connection, or a new one.
    fn take(&self) -> Result<UnixStream, ClientError> {
        let idle = capsid_base::lock(&self.idle).pop();
        match idle {
            Some(stream) => Ok(stream),
            None => self.open(&Hello::Control {
                version: PROTOCOL_VERSION,
            }),
        }
    }

    fn exchange_on(
        &self,
        stream: &UnixStream,
        call: &'static str,
        request: &Request,
    ) -> Result<Response, ClientError> {
        let mut bounded = Deadline {
            stream,
            until: Instant::now() + self.io_timeout,
        };
        exchange(&mut bounded, call, request, self.io_timeout)
    }

    /// One request and its reply on a pooled control connection, within
    /// the call deadline. No lock is held meanwhile; the connection goes
    /// back to the pool only after a complete exchange.
    fn call(&self, call: &'static str, request: &Request) -> Result<Response, ClientError> {
        let stream = self.timed_out(self.take())?;
        let outcome = self.timed_out(self.exchange_on(&stream, call, request));
        let complete = match &outcome {
            Ok(_) => true,
            // The agent answered with an error frame: still in step.
            Err(ClientError::Agent { .. }) | Err(ClientError::BadReply { .. }) => true,
            Err(_) => false,
        };
        if complete {
            let mut idle = capsid_base::lock(&self.idle);
            if idle.len() < POOL {
                idle.push(stream);
            }
        }
        outcome
    }

    fn call_ok(&self, call: &'static str, request: &Request) -> Result<(), ClientError> {
        match self.call(call, request)? {
            Response::Ok => Ok(()),
            other => Err(bad_reply(call, &other)),
        }
    }
}

/// A codec error as the call's error: a missed deadline is `Timeout`.
fn codec_error(call: &'static str, after: Duration, e: CodecError) -> ClientError {
    match &e {
        CodecError::Io(io) if io.kind() == io::ErrorKind::TimedOut => {
            ClientError::Timeout { call, after }
        }
        _ => ClientError::Codec(e),
    }
}

/// Reads a reply; an `Error` response becomes `Agent`.
fn reply<R: Read>(
    stream: &mut R,
    call: &'static str,
    after: Duration,
) -> Result<Response, ClientError> {
    match read_frame(stream).map_err(|e| codec_error(call, after, e))? {
        Response::Error { code, message } => Err(ClientError::Agent {
            call,
            code,
            message: clean_text(&message),
        }),
        response => Ok(response),
    }
}

/// One request and its response.
fn exchange<S: Read + Write>(
    stream: &mut S,
    call: &'static str,
    request: &Request,
    after: Duration,
) -> Result<Response, ClientError> {
    write_frame(stream, request).map_err(|e| codec_error(call, after, e))?;
    reply(stream, call, after)
}

/// Sends the first frame; returns the agent's description for a control
/// connection, or "" for a stdio one.
fn hello<S: Read + Write>(
    stream: &mut S,
    call: &'static str,
    first: &Hello,
) -> Result<String, ClientError> {
    let after = HANDSHAKE_TIMEOUT;
    write_frame(stream, first).map_err(|e| codec_error(call, after, e))?;
    match (
        first,
        read_frame(stream).map_err(|e| codec_error(call, after, e))?,
    ) {
        (Hello::Control { .. }, Response::Hello { version, agent }) => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::Version { theirs: version });
            }
            Ok(clean_text(&agent))
        }
        (Hello::Stdio { .. } | Hello::Archive { .. }, Response::Ok) => Ok(String::new()),
        (_, Response::Error { code, message }) => Err(ClientError::Agent {
            call,
            code,
            message: clean_text(&message),
        }),
        (_, other) => Err(bad_reply(call, &other)),
    }
}

/// Connects to the VMM's socket and asks for the guest's `port`.
fn hybrid_connect(uds: &Path, port: u32, within: Duration) -> Result<UnixStream, ClientError> {
    let stream = UnixStream::connect(uds).map_err(|e| ClientError::Socket(uds.into(), e))?;
    // One deadline for the line out and the answer back; a VMM that does
    // not answer in time has missed a deadline like an agent that does not.
    let missed = |e: io::Error| {
        if timed_out(&e) {
            ClientError::Timeout {
                call: "the vsock handshake",
                after: within,
            }
        } else {
            ClientError::Socket(uds.into(), e)
        }
    };
    let mut bounded = Deadline {
        stream: &stream,
        until: Instant::now() + within,
    };
    bounded
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(missed)?;
    // Read the answer a byte at a time: what follows the line is the
    // agent's, and must stay in the socket.
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8];
        match bounded.read(&mut byte) {
            Ok(0) => {
                return Err(ClientError::Handshake(
                    "the VMM closed the connection (nothing listens on that port yet)".into(),
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(byte[0]),
            Ok(_) => return Err(ClientError::Handshake("answer line too long".into())),
            Err(e) => return Err(missed(e)),
        }
    }
    let line = String::from_utf8_lossy(&line);
    match line.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(stream),
        _ => Err(ClientError::Handshake(format!(
            "unexpected answer {:?}",
            clean_text(&line)
        ))),
    }
}

fn bad_reply(call: &'static str, got: &Response) -> ClientError {
    ClientError::BadReply {
        call,
        got: cut(&format!("{got:?}"), 200),
    }
}

/// Text from the guest, made safe for a host log line.
fn clean_text(text: &str) -> String {
    cut(text, MAX_ERROR_TEXT)
}

/// At most `max` characters of `text` (never cut inside one: a byte index
/// there panics), control characters as spaces.
fn cut(text: &str, max: usize) -> String {
    text.chars()
        .take(max)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

// Frames are bounded by the codec; this keeps the two limits in one place.
const _: () = assert!(MAX_FRAME_BYTES as usize > MAX_ERROR_TEXT);

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake VMM + agent on a Unix socket: answers the handshake with
    /// `handshake`, then replays `replies` (raw bytes) to whatever comes.
    fn fake_agent(handshake: &'static [u8], replies: Vec<Vec<u8>>) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            for (stream, reply) in listener.incoming().zip(replies) {
                let mut stream = stream.unwrap();
                let mut line = [0u8; 64];
                let _ = stream.read(&mut line);
                let _ = stream.write_all(handshake);
                let _ = read_frame::<_, Hello>(&mut stream);
                let _ = stream.write_all(&reply);
                thread::sleep(Duration::from_millis(50));
            }
        });
        (dir, path)
    }

    fn frame(response: &Response) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, response).unwrap();
        bytes
    }

    mod tempdir {
        #[derive(Debug)]
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "capsid-protocol-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Self(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn nothing_listening_is_unreachable_within_the_wait() {
        let dir = tempdir::Dir::new();
        let start = Instant::now();
        let err = AgentClient::connect(
            &dir.0.join("missing.sock"),
            1024,
            Duration::from_millis(300),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(2));
        let text = err.to_string();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{text}");
        assert!(text.contains("vsock port 1024"), "{text}");
    }

    #[test]
    fn a_wrong_version_is_refused_at_once() {
        let reply = frame(&Response::Hello {
            version: PROTOCOL_VERSION + 1,
            agent: "x".into(),
        });
        let (_dir, path) = fake_agent(b"OK 1073741824\n", vec![reply]);
        let err = AgentClient::connect(&path, 1024, Duration::from_secs(5), Duration::from_secs(1))
            .unwrap_err();
        assert!(matches!(err, ClientError::Version { .. }), "{err}");
    }

    #[test]
    fn hostile_replies_are_errors() {
        let hello = frame(&Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "fake\x1b[2J agent".into(),
        });
        let oversized = (MAX_FRAME_BYTES + 1).to_be_bytes().to_vec();
        let bad_pid = frame(&Response::Pid { pid: 0 });
        let bad_status = frame(&Response::Exited {
            status: ExitStatus::Signal(99),
        });
        for (reply, check) in [
            (oversized, "larger than the limit"),
            (bad_pid, "not a valid answer"),
            (b"\x00\x00\x00\x05{{{{{".to_vec(), "malformed"),
        ] {
            let mut both = hello.clone();
            both.extend_from_slice(&reply);
            let (_dir, path) = fake_agent(b"OK 1073741824\n", vec![both]);
            let client =
                AgentClient::connect(&path, 1024, Duration::from_secs(5), Duration::from_secs(2))
                    .unwrap();
            assert_eq!(client.agent(), "fake [2J agent");
            let err = client
                .create_container(CreateContainer {
                    id: "c".into(),
                    rootfs: Rootfs {
                        disk_id: "r".into(),
                        filesystem: Filesystem::Erofs,
                        overlay: true,
                        upper_disk: None,
                    },
                    spec: Default::default(),
                    stdio: StdioRequest::default(),
                    files: Vec::new(),
                    share: None,
                })
                .unwrap_err();
            assert!(
                capsid_base::error_chain(&err).contains(check),
                "{}",
                capsid_base::error_chain(&err)
            );
        }
        let (_dir, path) = fake_agent(b"OK 1073741824\n", vec![hello.clone(), bad_status]);
        let client =
            AgentClient::connect(&path, 1024, Duration::from_secs(5), Duration::from_secs(2))
                .unwrap();
        let err = client.wait_process(&ProcessRef::init("c")).unwrap_err();
        assert!(matches!(err, ClientError::BadReply { .. }), "{err}");
    }

    #[test]
    fn bad_handshakes_are_errors() {
        for answer in [&b"NO\n"[..], b"OK x\n", &[b'O'; 100]] {
            let (_dir, path) = fake_agent(answer, vec![vec![]]);
            let err = hybrid_connect(&path, 1, HANDSHAKE_TIMEOUT).unwrap_err();
            assert!(matches!(err, ClientError::Handshake(_)), "{err}");
        }
    }

    #[test]
    fn a_reply_with_a_multibyte_character_at_the_cut_does_not_panic() {
        // bad_reply cut the reply's text with String::truncate at byte 200:
        // a character across that byte panicked (release builds abort).
        let prefix = format!(
            "{:?}",
            Response::Error {
                code: ErrorCode::Internal,
                message: String::new(),
            }
        );
        let before = prefix.len() - "\" }".len();
        let message = format!("{}é tail", "a".repeat(199 - before));
        let reply = Response::Error {
            code: ErrorCode::Internal,
            message,
        };
        assert!(!format!("{reply:?}").is_char_boundary(200));
        let err = bad_reply("Test", &reply);
        assert!(err.to_string().contains("aaaa"), "{err}");
    }

    /// A fake agent that answers the hello, then drips `reply` one byte per
    /// `pause`.
    fn dripping_agent(reply: Vec<u8>, pause: Duration) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hello = frame(&Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "drip".into(),
        });
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let (hello, reply) = (hello.clone(), reply.clone());
                thread::spawn(move || {
                    let mut line = [0u8; 64];
                    let _ = stream.read(&mut line);
                    let _ = stream.write_all(b"OK 1073741824\n");
                    let _ = read_frame::<_, Hello>(&mut stream);
                    let _ = stream.write_all(&hello);
                    let _ = read_frame::<_, Request>(&mut stream);
                    for byte in reply {
                        if stream.write_all(&[byte]).is_err() {
                            return;
                        }
                        thread::sleep(pause);
                    }
                    thread::sleep(Duration::from_secs(30));
                });
            }
        });
        (dir, path)
    }

    #[test]
    fn a_drip_fed_reply_cannot_outlive_the_call_deadline() {
        // Before the fix the timeout applied to each read(2): a byte every
        // 300 ms kept a 1 s "timeout" waiting as long as the agent liked.
        let reply = frame(&Response::Stats {
            stats: Box::default(),
        });
        let (_dir, path) = dripping_agent(reply, Duration::from_millis(300));
        let client =
            AgentClient::connect(&path, 1024, Duration::from_secs(5), Duration::from_secs(1))
                .unwrap();
        let started = Instant::now();
        let err = client.stats("c").unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_vmm_that_never_answers_the_handshake_misses_the_call_deadline() {
        // Before the fix a call's handshake gave up after 5 s with a socket
        // error, not a missed deadline: the shim's timeout hook never
        // fired, and `capsid run` did not say the VM had stalled.
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let held = thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let started = Instant::now();
        let err = hybrid_connect(&path, 1024, Duration::from_millis(300)).unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Timeout {
                    call: "the vsock handshake",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_timeout());
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held.join());
    }

    #[test]
    fn a_hung_call_does_not_hold_up_the_others() {
        // Before the fix one lock guarded the control connection for a
        // whole call: a call the agent never answered blocked every other.
        let dir = tempdir::Dir::new();
        let path = dir.0.join("vsock.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let hello = frame(&Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "x".into(),
        });
        thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let hello = hello.clone();
                thread::spawn(move || {
                    let mut line = [0u8; 64];
                    let _ = stream.read(&mut line);
                    let _ = stream.write_all(b"OK 1073741824\n");
                    let _ = read_frame::<_, Hello>(&mut stream);
                    let _ = stream.write_all(&hello);
                    while read_frame::<_, Request>(&mut stream).is_ok() {
                        if n == 0 {
                            // The first connection never answers.
                            thread::sleep(Duration::from_secs(30));
                        }
                        let _ = stream.write_all(&frame(&Response::Ok));
                    }
                });
            }
        });
        let client = std::sync::Arc::new(
            AgentClient::connect(&path, 1024, Duration::from_secs(5), Duration::from_secs(20))
                .unwrap(),
        );
        let hung = {
            let client = std::sync::Arc::clone(&client);
            thread::spawn(move || client.close_stdin(&ProcessRef::init("c")))
        };
        thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        client.close_stdin(&ProcessRef::init("c")).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(hung);
    }
}
