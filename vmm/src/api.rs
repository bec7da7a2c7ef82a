//! The VMM's control socket (`--api-uds PATH`): how the host attaches disk
//! images to the spare slots of a running VM, and detaches them
//! ([`DiskSlots`]). The shim uses it to put a second container of a pod in
//! the pod's VM. The requests and replies are `capsid_vmm_api`'s, shared
//! with the runtime; an attach brings the image as a descriptor, because
//! the confined VMM cannot open host paths.
//!
//! Only the host speaks here (the socket is created 0600 under the VMM's
//! umask, in a directory only the VMM's user and root can enter), but a
//! request is still bounded ([`MAX_REQUEST`] bytes, at most one descriptor,
//! read within 5 s) and checked: unknown fields and operations are refused
//! with the reason.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsid_vmm_api::{ApiRequest, ApiResponse, MAX_REQUEST};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::virtio::ThreadInit;
use crate::devices::virtio::block::DiskSlots;

const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers one request; `fd` is the descriptor that came with it.
pub fn answer(slots: &DiskSlots, line: &str, fd: Option<File>) -> ApiResponse {
    let request = match serde_json::from_str::<ApiRequest>(line) {
        Ok(request) => request,
        Err(e) => {
            return ApiResponse::Error {
                error: format!("bad request: {e}"),
            };
        }
    };
    let done = match (&request, fd) {
        (ApiRequest::Attach { id }, Some(file)) => slots.attach(file, id, id),
        (ApiRequest::Attach { .. }, None) => {
            return ApiResponse::Error {
                error: "attach needs the image's descriptor with the request".into(),
            };
        }
        (ApiRequest::Detach { .. }, Some(_)) => {
            return ApiResponse::Error {
                error: "detach takes no descriptor".into(),
            };
        }
        (ApiRequest::Detach { id }, None) => slots.detach(id),
    };
    match done {
        Ok(slot) => {
            tracing::info!(?request, slot, "disk slot changed");
            ApiResponse::Slot { slot }
        }
        Err(e) => ApiResponse::Error {
            error: capsid_base::error_chain(&e),
        },
    }
}

/// The socket and the thread serving it; dropping it stops the thread and
/// removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Listens on `path` (which must not exist) and serves `slots` on a
    /// thread that runs `init` first.
    pub fn start(path: &Path, slots: Arc<DiskSlots>, init: ThreadInit) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        // Made before anything else can fail, so its drop removes the socket.
        let mut server = Self {
            path: path.to_owned(),
            stop: EventFd::new(libc::EFD_NONBLOCK)?,
            thread: None,
        };
        listener.set_nonblocking(true)?;
        let stop = server.stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || match init() {
                Ok(()) => serve(&listener, &slots, &stop),
                Err(e) => tracing::error!("api: cannot confine the thread: {e}"),
            })?;
        server.thread = Some(thread);
        Ok(server)
    }
}

/// Waits until `fd` is readable or `stop` is signalled; whether `fd` is.
fn readable(fd: RawFd, stop: &EventFd, timeout: Option<Duration>) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
    loop {
        // SAFETY: `fds` is an array of two pollfds that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n >= 0 {
            return fds[1].revents == 0 && fds[0].revents != 0;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

fn serve(listener: &UnixListener, slots: &DiskSlots, stop: &EventFd) {
    while readable(listener.as_raw_fd(), stop, None) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_one(&stream, slots, stop) {
                    tracing::warn!("API connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("API socket: {e}"),
        }
    }
}

/// Reads one request line and the descriptor that came with it, within
/// [`READ_TIMEOUT`] and [`MAX_REQUEST`] bytes.
fn read_request(
    stream: &UnixStream,
    stop: &EventFd,
) -> std::io::Result<Result<(String, Option<File>), String>> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut line = Vec::new();
    let mut file = None;
    let mut extra_fds = false;
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if line.len() >= MAX_REQUEST
            || left.is_zero()
            || !readable(stream.as_raw_fd(), stop, Some(left))
        {
            return Ok(Err(format!(
                "a request is one line of at most {MAX_REQUEST} bytes, sent within {READ_TIMEOUT:?}"
            )));
        }
        let room = (MAX_REQUEST - line.len()).min(buf.len());
        // Room for one descriptor: the kernel closes any more sent along.
        let (n, received) = match stream.recv_with_fd(&mut buf[..room]) {
            Ok(got) => got,
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => continue,
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
        };
        if let Some(received) = received {
            if file.is_some() {
                extra_fds = true;
            }
            file = Some(received);
        }
        if n == 0 {
            return Ok(Err("the request ended without a newline".into()));
        }
        line.extend_from_slice(&buf[..n]);
    }
    if extra_fds {
        return Ok(Err("a request carries at most one descriptor".into()));
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok(String::from_utf8(line)
        .map(|line| (line, file))
        .map_err(|_| "the request is not UTF-8".into()))
}

fn serve_one(stream: &UnixStream, slots: &DiskSlots, stop: &EventFd) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let response = match read_request(stream, stop)? {
        Ok((line, file)) => answer(slots, line.trim_end(), file),
        Err(error) => ApiResponse::Error { error },
    };
    let mut reply = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    reply.push(b'\n');
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    (&*stream).write_all(&reply)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::{Block, DiskSlot};
    use crate::devices::virtio::{Interrupt, no_init};
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn one_slot() -> Arc<DiskSlots> {
        let block = Block::spare();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        Arc::new(DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)]))
    }

    fn call(path: &Path, request: &[u8], fd: Option<&File>) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        match fd {
            Some(file) => {
                stream.send_with_fd(request, file.as_raw_fd()).unwrap();
            }
            None => stream.write_all(request).unwrap(),
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut reply = Vec::new();
        // A server that hangs up on bytes it did not read resets the
        // connection; what it said before stays readable.
        match stream.read_to_end(&mut reply) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                reply.extend_from_slice(b" [reset]");
            }
            Err(e) => panic!("{e}"),
        }
        String::from_utf8_lossy(&reply).into_owned()
    }

    #[test]
    fn requests_over_the_socket_attach_and_detach() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("rootfs.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let sock = dir.path().join("api.sock");
        // SAFETY: umask takes a mode; the VMM sets 077 at start.
        let old = unsafe { libc::umask(0o077) };
        let server = ApiServer::start(&sock, one_slot(), no_init()).unwrap();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "owner-only by the umask, never wider: {mode:o}"
        );

        let attach = br#"{"op":"attach","id":"c1"}
"#;
        let file = File::open(&image).unwrap();
        assert_eq!(call(&sock, attach, Some(&file)), "{\"slot\":0}\n");
        let again = call(&sock, attach, Some(&file));
        assert!(
            again.contains("all 1 spare disk slots") || again.contains("already"),
            "{again}"
        );
        assert!(call(&sock, attach, None).contains("needs the image's descriptor"));
        assert_eq!(
            call(&sock, b"{\"op\":\"detach\",\"id\":\"c1\"}\n", None),
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
            (
                "{\"op\":\"attach\",\"id\":\"x\",\"path\":\"/etc/shadow\"}",
                "unknown field",
            ),
            ("{\"op\":\"detach\",\"id\":\"x\"}", "no image with id"),
        ] {
            let ApiResponse::Error { error } = answer(&slots, line, None) else {
                panic!("{line} was accepted");
            };
            assert!(error.contains(want), "{line}: {error}");
        }
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let _server = ApiServer::start(&sock, slots, no_init()).unwrap();
        // A request is cut at MAX_REQUEST; the server then answers the next one.
        let long = vec![b'x'; MAX_REQUEST + 10];
        let reply = call(&sock, &long, None);
        assert!(
            reply.contains("at most 4096 bytes") || reply == " [reset]",
            "{reply}"
        );
        assert!(call(&sock, b"{\"op\":\"detach\"", None).contains("without a newline"));
        assert!(call(&sock, b"{\"op\":\"detach\",\"id\":\"y\"}\n", None).contains("no image"));
        // A client that says nothing is dropped after the timeout, and the
        // next one is served.
        let silent = UnixStream::connect(&sock).unwrap();
        let started = Instant::now();
        assert!(call(&sock, b"{\"op\":\"detach\",\"id\":\"z\"}\n", None).contains("no image"));
        assert!(started.elapsed() < READ_TIMEOUT * 3);
        drop(silent);
    }
}
