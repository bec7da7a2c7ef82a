//! The VMM's control socket (`--api-uds PATH`): how the host attaches disk
//! images to the spare slots of a running VM, and detaches them
//! ([`DiskSlots`]). The shim uses it to put a second container of a pod in
//! the pod's VM.
//!
//! One request per connection, one JSON object on one line each way:
//!
//! ```text
//! → {"op":"attach","path":"/var/cache/capsid/…/rootfs.erofs","id":"c1"}   ← {"slot":0}
//! → {"op":"detach","id":"c1"}                                             ← {"slot":0}
//!                                                              a failure  ← {"error":"…"}
//! ```
//!
//! Only the host speaks here (the socket is made 0600), but a request is
//! still bounded (4 KiB, read within 5 s) and checked: unknown fields and
//! operations are refused with the reason.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::devices::virtio::block::DiskSlots;

/// The longest request line.
pub const MAX_REQUEST: u64 = 4096;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ApiRequest {
    /// Attach the image at `path`, read-only, with serial `id`.
    Attach { path: PathBuf, id: String },
    /// Detach the image with serial `id`.
    Detach { id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiResponse {
    Slot { slot: usize },
    Error { error: String },
}

/// Answers one request line.
pub fn answer(slots: &DiskSlots, line: &str) -> ApiResponse {
    let request = match serde_json::from_str::<ApiRequest>(line) {
        Ok(request) => request,
        Err(e) => {
            return ApiResponse::Error {
                error: format!("bad request: {e}"),
            };
        }
    };
    let done = match &request {
        ApiRequest::Attach { path, id } => slots.attach(path, id),
        ApiRequest::Detach { id } => slots.detach(id),
    };
    match done {
        Ok(slot) => {
            tracing::info!(?request, slot, "disk slot changed");
            ApiResponse::Slot { slot }
        }
        Err(e) => ApiResponse::Error {
            error: crate::error_chain(&e),
        },
    }
}

/// The socket and the thread serving it; dropping it stops the thread and
/// removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (which must not exist) and serves `slots`.
    pub fn start(path: &Path, slots: Arc<DiskSlots>) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        // Made before anything else can fail, so its drop removes the socket.
        let mut server = Self {
            path: path.to_owned(),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::clone(&server.stop);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve(&listener, &slots, &stop))?;
        server.thread = Some(thread);
        Ok(server)
    }
}

fn serve(listener: &UnixListener, slots: &DiskSlots, stop: &AtomicBool) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match stream {
            Ok(stream) => {
                if let Err(e) = serve_one(stream, slots) {
                    tracing::warn!("API connection: {e}");
                }
            }
            Err(e) => tracing::warn!("API socket: {e}"),
        }
    }
}

fn serve_one(stream: UnixStream, slots: &DiskSlots) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line)?;
    let response = if line.ends_with('\n') {
        answer(slots, line.trim_end())
    } else {
        ApiResponse::Error {
            error: format!("a request is one line of at most {MAX_REQUEST} bytes"),
        }
    };
    let mut reply = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    reply.push(b'\n');
    (&stream).write_all(&reply)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept; the thread sees the flag and returns.
        let _ = UnixStream::connect(&self.path);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::Interrupt;
    use crate::devices::virtio::block::{Block, DiskSlot};
    use vmm_sys_util::eventfd::EventFd;

    fn one_slot() -> Arc<DiskSlots> {
        let block = Block::spare();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Arc::new(DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)]))
    }

    fn call(path: &Path, request: &[u8]) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        stream.write_all(request).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    #[test]
    fn requests_over_the_socket_attach_and_detach() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let sock = dir.path().join("api.sock");
        let server = ApiServer::start(&sock, one_slot()).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let attach = format!(
            "{{\"op\":\"attach\",\"path\":{:?},\"id\":\"c1\"}}\n",
            image.display()
        );
        assert_eq!(call(&sock, attach.as_bytes()), "{\"slot\":0}\n");
        let again = call(&sock, attach.as_bytes());
        assert!(
            again.contains("all 1 spare disk slots") || again.contains("already"),
            "{again}"
        );
        assert_eq!(
            call(&sock, b"{\"op\":\"detach\",\"id\":\"c1\"}\n"),
            "{\"slot\":0}\n"
        );
        drop(server);
        assert!(!sock.exists(), "the socket outlived the server");
    }

    #[test]
    fn bad_requests_get_the_reason() {
        let slots = one_slot();
        for (line, want) in [
            ("not json", "bad request"),
            ("{\"op\":\"format\",\"id\":\"x\"}", "unknown variant"),
            (
                "{\"op\":\"detach\",\"id\":\"x\",\"force\":true}",
                "unknown field",
            ),
            ("{\"op\":\"detach\",\"id\":\"x\"}", "no image with id"),
        ] {
            let ApiResponse::Error { error } = answer(&slots, line) else {
                panic!("{line} was accepted");
            };
            assert!(error.contains(want), "{line}: {error}");
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _server = ApiServer::start(&sock, slots).unwrap();
        // A request is cut at 4 KiB; the server then answers the next one.
        let long = vec![b'x'; 4096];
        assert!(call(&sock, &long).contains("at most 4096 bytes"));
        assert!(call(&sock, b"{\"op\":\"detach\"").contains("one line"));
        assert!(call(&sock, b"{\"op\":\"detach\",\"id\":\"y\"}\n").contains("no image"));
    }
}
