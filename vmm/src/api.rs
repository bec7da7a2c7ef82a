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

use capsid_vmm_api::{ApiRequest, ApiResponse, MAX_DESCRIPTORS, MAX_REQUEST};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::devices::virtio::ThreadInit;
use crate::devices::virtio::block::DiskSlots;
use crate::snapshot::SnapshotDesk;

const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a snapshot request waits for the VM to be saved: writing a
/// 1 GiB guest's memory to a slow disk takes this long at worst.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);

/// What the API serves: the spare disk slots, and the desk where a
/// snapshot request waits for the main thread.
#[derive(Debug)]
pub struct ApiContext {
    pub(crate) slots: Arc<DiskSlots>,
    pub(crate) snapshots: Arc<SnapshotDesk>,
}

impl ApiContext {
    /// Serves `slots` and takes snapshot requests to `snapshots`.
    pub fn new(slots: Arc<DiskSlots>, snapshots: Arc<SnapshotDesk>) -> Self {
        Self { slots, snapshots }
    }
}

/// Answers one request; `files` are the descriptors that came with it.
pub fn answer(api: &ApiContext, line: &str, files: Vec<File>) -> ApiResponse {
    let request = match serde_json::from_str::<ApiRequest>(line) {
        Ok(request) => request,
        Err(e) => {
            return ApiResponse::Error {
                error: format!("bad request: {e}"),
            };
        }
    };
    if files.len() != request.descriptors() {
        let error = match &request {
            ApiRequest::Attach { .. } => "attach needs the image's descriptor with the request",
            ApiRequest::Detach { .. } => "detach takes no descriptor",
            ApiRequest::Snapshot => {
                "snapshot needs two descriptors with the request: the state file, then the memory file"
            }
        };
        return ApiResponse::Error {
            error: error.into(),
        };
    }
    let mut files = files.into_iter();
    let done = match (&request, files.next(), files.next()) {
        (ApiRequest::Attach { id }, Some(file), _) => api.slots.attach(file, id, id),
        (ApiRequest::Detach { id }, _, _) => api.slots.detach(id),
        (ApiRequest::Snapshot, Some(state), Some(memory)) => {
            return match api.snapshots.request(state, memory, SNAPSHOT_WAIT) {
                Ok(saved_ms) => ApiResponse::Saved { saved_ms },
                Err(error) => ApiResponse::Error { error },
            };
        }
        _ => {
            return ApiResponse::Error {
                error: "the request's descriptors are missing".into(),
            };
        }
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
    /// Listens on `path` (which must not exist) and serves `api` on a
    /// thread that runs `init` first.
    pub fn start(path: &Path, api: ApiContext, init: ThreadInit) -> std::io::Result<Self> {
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
                Ok(()) => serve(&listener, &api, &stop),
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

fn serve(listener: &UnixListener, api: &ApiContext, stop: &EventFd) {
    while readable(listener.as_raw_fd(), stop, None) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = serve_one(&stream, api, stop) {
                    tracing::warn!("API connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("API socket: {e}"),
        }
    }
}

/// Reads one request line and the descriptors that came with it (at most
/// [`MAX_DESCRIPTORS`]), within [`READ_TIMEOUT`] and [`MAX_REQUEST`] bytes.
fn read_request(
    stream: &UnixStream,
    stop: &EventFd,
) -> std::io::Result<Result<(String, Vec<File>), String>> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut line = Vec::new();
    let mut files = Vec::new();
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
        let n = match recv_with_files(stream, &mut buf[..room], &mut files) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(Err("the request ended without a newline".into()));
        }
        line.extend_from_slice(&buf[..n]);
    }
    if files.len() > MAX_DESCRIPTORS {
        return Ok(Err(format!(
            "a request carries at most {MAX_DESCRIPTORS} descriptors"
        )));
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    line.truncate(end);
    Ok(String::from_utf8(line)
        .map(|line| (line, files))
        .map_err(|_| "the request is not UTF-8".into()))
}

/// Receives bytes into `buf` and the descriptors sent with them into
/// `files`: room for one more than a request may carry, so that too many
/// are seen (the kernel closes any beyond the room).
fn recv_with_files(
    stream: &UnixStream,
    buf: &mut [u8],
    files: &mut Vec<File>,
) -> std::io::Result<usize> {
    use std::os::fd::FromRawFd;
    let mut fds = [-1; MAX_DESCRIPTORS + 1];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points at `buf`, which is writable for its whole
    // length and outlives the call.
    let (n, received) = unsafe { stream.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    for &fd in fds.iter().take(received) {
        // SAFETY: the kernel just gave us `fd`; nothing else owns it.
        files.push(unsafe { File::from_raw_fd(fd) });
    }
    Ok(n)
}

fn serve_one(stream: &UnixStream, api: &ApiContext, stop: &EventFd) -> std::io::Result<()> {
    stream.set_nonblocking(true)?;
    let response = match read_request(stream, stop)? {
        Ok((line, files)) => answer(api, line.trim_end(), files),
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
    use crate::exit::ExitNotifier;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    /// An API with one spare slot, and the exit notifier its snapshot
    /// desk reports to.
    fn api_with(refusal: Option<&str>) -> (ApiContext, Arc<ExitNotifier>) {
        let block = Block::spare();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let api = ApiContext {
            slots: Arc::new(DiskSlots::new(vec![DiskSlot::new(block.backing(), irq)])),
            snapshots: Arc::new(SnapshotDesk::new(
                Arc::clone(&exit),
                refusal.map(str::to_owned),
            )),
        };
        (api, exit)
    }

    fn one_slot() -> ApiContext {
        api_with(None).0
    }

    fn call(path: &Path, request: &[u8], fd: Option<&File>) -> String {
        call_with(path, request, fd.into_iter().collect())
    }

    fn call_with(path: &Path, request: &[u8], files: Vec<&File>) -> String {
        let mut stream = UnixStream::connect(path).unwrap();
        if files.is_empty() {
            stream.write_all(request).unwrap();
        } else {
            let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
            stream.send_with_fds(&[request], &fds).unwrap();
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
    fn a_snapshot_request_brings_two_files_and_waits_for_the_main_thread() {
        use crate::exit::ExitReason;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let (api, exit) = api_with(None);
        let desk = Arc::clone(&api.snapshots);
        let _server = ApiServer::start(&sock, api, no_init()).unwrap();
        let state = tempfile::tempfile().unwrap();
        let memory = tempfile::tempfile().unwrap();
        let request = b"{\"op\":\"snapshot\"}\n";
        assert!(call(&sock, request, Some(&state)).contains("needs two descriptors"));
        let three = call_with(&sock, request, vec![&state, &memory, &state]);
        assert!(three.contains("at most 2 descriptors"), "{three}");

        // The main thread: waits for the reason, takes the job, writes into
        // the files the request brought, answers.
        let main = std::thread::spawn(move || {
            assert_eq!(exit.wait(), ExitReason::Snapshot);
            let job = desk.close().expect("a job");
            (&job.state).write_all(b"state").unwrap();
            (&job.memory).write_all(b"memory").unwrap();
            job.answer(Ok(7));
        });
        let reply = call_with(&sock, request, vec![&state, &memory]);
        assert_eq!(reply, "{\"saved_ms\":7}\n");
        main.join().unwrap();
        let read = |mut f: &File| {
            let mut text = String::new();
            std::io::Seek::rewind(&mut f).unwrap();
            f.read_to_string(&mut text).unwrap();
            text
        };
        assert_eq!(
            (read(&state), read(&memory)),
            ("state".into(), "memory".into())
        );
        // The desk is closed: the VM is ending.
        assert!(call_with(&sock, request, vec![&state, &memory]).contains("the VM has ended"));
    }

    #[test]
    fn a_vm_that_cannot_be_snapshotted_or_ends_first_says_so_at_once() {
        let files = || vec![tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap()];
        let (api, _) = api_with(Some(
            "this VM cannot be snapshotted: it has network devices",
        ));
        let ApiResponse::Error { error } = answer(&api, r#"{"op":"snapshot"}"#, files()) else {
            panic!("a refused VM was snapshotted");
        };
        assert!(error.contains("network devices"), "{error}");

        // Another reason ended the VM: the main thread closes the desk and
        // drops the job unanswered.
        let (api, exit) = api_with(None);
        let desk = Arc::clone(&api.snapshots);
        let main = std::thread::spawn(move || {
            exit.wait();
            drop(desk.close());
        });
        let started = Instant::now();
        let ApiResponse::Error { error } = answer(&api, r#"{"op":"snapshot"}"#, files()) else {
            panic!("snapshotted after the end");
        };
        assert!(error.contains("ended for another reason"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        main.join().unwrap();
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
            let ApiResponse::Error { error } = answer(&slots, line, Vec::new()) else {
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
