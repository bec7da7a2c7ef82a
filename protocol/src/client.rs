//! The host's side: a blocking client for one agent, reached through the
//! VMM's hybrid-vsock Unix socket (`CONNECT <port>\n` → `OK <hostport>\n`).
//!
//! Everything the agent sends is checked: the handshake line, frame sizes
//! (in the codec), the reply's kind for each call, pids, exit statuses, and
//! error texts (cut and stripped of control characters before they reach a
//! host log).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::codec::{CodecError, read_frame, write_frame};
use crate::messages::*;
use crate::{MAX_FRAME_BYTES, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent did not answer on vsock port {port} through {uds} within {waited:?} \
         (last attempt: {last}); is the guest booting the capsid agent?"
    )]
    Unreachable {
        uds: PathBuf,
        port: u32,
        waited: Duration,
        last: String,
    },
    #[error("cannot reach the VMM's vsock socket {0}")]
    Socket(PathBuf, #[source] io::Error),
    #[error("hybrid-vsock handshake: {0}")]
    Handshake(String),
    #[error("agent speaks protocol version {theirs}, we speak {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
    #[error("agent connection")]
    Codec(#[source] CodecError),
    #[error("agent refused {call}: {message} ({code:?})")]
    Agent {
        call: &'static str,
        code: ErrorCode,
        message: String,
    },
    #[error("agent answered {call} with {got}, which is not a valid answer")]
    BadReply { call: &'static str, got: String },
}

/// How long one hybrid-vsock handshake may take before it is retried.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Error texts from the guest are cut to this many characters.
const MAX_ERROR_TEXT: usize = 1024;

/// A connection to one agent: a control connection for calls, and fresh
/// connections for waits and stdio streams.
#[derive(Debug)]
pub struct AgentClient {
    uds: PathBuf,
    port: u32,
    io_timeout: Duration,
    control: Mutex<UnixStream>,
    agent: String,
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
            let attempt = hybrid_connect(uds, port).and_then(|mut stream| {
                stream
                    .set_read_timeout(Some(io_timeout))
                    .map_err(|e| ClientError::Socket(uds.into(), e))?;
                let agent = hello(
                    &mut stream,
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
                        control: Mutex::new(stream),
                        agent,
                    });
                }
                // A version mismatch will not go away by waiting.
                Err(e @ ClientError::Version { .. }) => return Err(e),
                Err(e) if start.elapsed() >= wait => {
                    return Err(ClientError::Unreachable {
                        uds: uds.into(),
                        port,
                        waited: start.elapsed(),
                        last: error_chain(&e),
                    });
                }
                Err(_) => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }

    /// What the agent said it is (name and version).
    pub fn agent(&self) -> &str {
        &self.agent
    }

    pub fn create_container(&self, request: CreateContainer) -> Result<u32, ClientError> {
        let call = "CreateContainer";
        match self.call(call, &Request::CreateContainer(Box::new(request)))? {
            Response::Pid { pid } if pid > 1 => Ok(pid),
            other => Err(bad_reply(call, &other)),
        }
    }

    pub fn exec_process(&self, request: ExecProcess) -> Result<u32, ClientError> {
        let call = "ExecProcess";
        match self.call(call, &Request::ExecProcess(Box::new(request)))? {
            Response::Pid { pid } if pid > 1 => Ok(pid),
            other => Err(bad_reply(call, &other)),
        }
    }

    pub fn start_process(&self, process: &ProcessRef) -> Result<(), ClientError> {
        self.call_ok("StartProcess", &Request::StartProcess(process.clone()))
    }

    /// Blocks until the process exits, on a connection of its own so other
    /// calls go on meanwhile. Ends with an error if the VM goes away.
    pub fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, ClientError> {
        let call = "WaitProcess";
        let mut stream = self.open(&Hello::Control {
            version: PROTOCOL_VERSION,
        })?;
        stream
            .set_read_timeout(None)
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        match exchange(&mut stream, call, &Request::WaitProcess(process.clone()))? {
            Response::Exited { status } if status.is_valid() => Ok(status),
            other => Err(bad_reply(call, &other)),
        }
    }

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

    pub fn close_stdin(&self, process: &ProcessRef) -> Result<(), ClientError> {
        self.call_ok("CloseStdin", &Request::CloseStdin(process.clone()))
    }

    pub fn stats(&self, container_id: &str) -> Result<ContainerStats, ClientError> {
        let call = "Stats";
        let request = Request::Stats {
            container_id: container_id.into(),
        };
        match self.call(call, &request)? {
            Response::Stats { stats } => Ok(stats),
            other => Err(bad_reply(call, &other)),
        }
    }

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

    pub fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        let request = Request::RemoveContainer {
            container_id: container_id.into(),
        };
        self.call_ok("RemoveContainer", &request)
    }

    /// Asks the agent to stop everything and reboot the VM (the VMM then
    /// exits 0).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.call_ok("Shutdown", &Request::Shutdown)?;
        // The agent reboots once it sees this end close (so the answer is
        // not lost in the reset).
        let control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let _ = control.shutdown(std::net::Shutdown::Write);
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
        connection
            .set_read_timeout(None)
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        Ok(connection)
    }

    fn open(&self, first: &Hello) -> Result<UnixStream, ClientError> {
        let mut stream = hybrid_connect(&self.uds, self.port)?;
        stream
            .set_read_timeout(Some(self.io_timeout))
            .map_err(|e| ClientError::Socket(self.uds.clone(), e))?;
        hello(&mut stream, first)?;
        Ok(stream)
    }

    fn call(&self, call: &'static str, request: &Request) -> Result<Response, ClientError> {
        let mut control = self.control.lock().unwrap_or_else(|e| e.into_inner());
        exchange(&mut control, call, request)
    }

    fn call_ok(&self, call: &'static str, request: &Request) -> Result<(), ClientError> {
        match self.call(call, request)? {
            Response::Ok => Ok(()),
            other => Err(bad_reply(call, &other)),
        }
    }
}

/// One request and its response; an `Error` response becomes `Agent`.
fn exchange(
    stream: &mut UnixStream,
    call: &'static str,
    request: &Request,
) -> Result<Response, ClientError> {
    write_frame(stream, request).map_err(ClientError::Codec)?;
    match read_frame(stream).map_err(ClientError::Codec)? {
        Response::Error { code, message } => Err(ClientError::Agent {
            call,
            code,
            message: clean_text(&message),
        }),
        response => Ok(response),
    }
}

/// Sends the first frame; returns the agent's description for a control
/// connection, or "" for a stdio one.
fn hello(stream: &mut UnixStream, first: &Hello) -> Result<String, ClientError> {
    write_frame(stream, first).map_err(ClientError::Codec)?;
    let call = "Hello";
    match (first, read_frame(stream).map_err(ClientError::Codec)?) {
        (Hello::Control { .. }, Response::Hello { version, agent }) => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::Version { theirs: version });
            }
            Ok(clean_text(&agent))
        }
        (Hello::Stdio { .. }, Response::Ok) => Ok(String::new()),
        (_, Response::Error { code, message }) => Err(ClientError::Agent {
            call,
            code,
            message: clean_text(&message),
        }),
        (_, other) => Err(bad_reply(call, &other)),
    }
}

/// Connects to the VMM's socket and asks for the guest's `port`.
fn hybrid_connect(uds: &Path, port: u32) -> Result<UnixStream, ClientError> {
    let mut stream = UnixStream::connect(uds).map_err(|e| ClientError::Socket(uds.into(), e))?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ClientError::Socket(uds.into(), e))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| ClientError::Socket(uds.into(), e))?;
    // Read the answer a byte at a time: what follows the line is the
    // agent's, and must stay in the socket.
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8];
        match (&stream).read(&mut byte) {
            Ok(0) => {
                return Err(ClientError::Handshake(
                    "the VMM closed the connection (nothing listens on that port yet)".into(),
                ));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(byte[0]),
            Ok(_) => return Err(ClientError::Handshake("answer line too long".into())),
            Err(e) => return Err(ClientError::Socket(uds.into(), e)),
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
    let mut text = format!("{got:?}");
    text.truncate(200);
    ClientError::BadReply {
        call,
        got: clean_text(&text),
    }
}

/// Text from the guest, made safe for a host log line.
fn clean_text(text: &str) -> String {
    text.chars()
        .take(MAX_ERROR_TEXT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An error and its sources on one line: "what: why: because".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
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
                    },
                    spec: Default::default(),
                    stdio: StdioRequest::default(),
                    files: Vec::new(),
                })
                .unwrap_err();
            assert!(error_chain(&err).contains(check), "{}", error_chain(&err));
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
            let err = hybrid_connect(&path, 1).unwrap_err();
            assert!(matches!(err, ClientError::Handshake(_)), "{err}");
        }
    }
}
