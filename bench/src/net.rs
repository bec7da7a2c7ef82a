//! `net`: TCP between the host and a sandbox over a pod's network — the
//! same namespace for both, made as CNI's bridge plugin makes one (a veth,
//! `eth0` in the namespace); ours hands it to the guest's virtio-net
//! (`docs/networking.md`), runc's container uses it directly.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use capsid_testbed::netns::PodNet;

use super::*;

/// Round trips per sandbox in the latency series.
const ROUND_TRIPS: usize = 200;
/// The sandbox's echo port.
const ECHO_PORT: u16 = 8080;

impl Bench {
    pub(crate) fn net(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "net",
            "TCP over a pod's network (a veth in a namespace, as CNI makes it): N bytes host → sandbox (`wget` of an HTTP body) and sandbox → host (`head -c N /dev/zero | nc`), timed by the host from the first body byte to the last; 200 one-byte round trips the host drives to `nc -l -e cat` in the sandbox",
        );
        let pod = PodNet::new(90);
        let bytes = self.args.stdout_bytes;
        let mut down = Pair::new("capsid: host → sandbox", "runc: host → sandbox", "MB/s");
        let mut up = Pair::new("capsid: sandbox → host", "runc: sandbox → host", "MB/s");
        let mut rtt = Pair::new("capsid: round trip", "runc: round trip", "µs");
        let rounds = self.args.runs.clamp(1, 5);
        self.rounds(rounds, "net", |ours, counted| {
            let who = who(ours);
            // Host → sandbox.
            let (url, server) = serve(&pod, move |stream| send_body(stream, bytes));
            let t = timed(&mut self.sandbox_in(ours, &pod, &["wget", "-qO", "/dev/null", &url]));
            match (self.ok(&format!("{who} net wget"), &t, None), server.join()) {
                (true, Ok(Ok(took))) if counted => down.of(ours).samples.push(rate(bytes, took)),
                (true, Ok(Err(e))) => self.failed(format!("{who} net wget: the host: {e}")),
                _ => {}
            }
            // Sandbox → host: the host closes once it has every byte,
            // which ends `nc`.
            let (url, server) = serve(&pod, move |stream| take_bytes(stream, bytes));
            let host_port = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .replace(':', " ");
            let script = format!("head -c {bytes} /dev/zero | nc {host_port}");
            let t = timed(&mut self.sandbox_in(ours, &pod, &["sh", "-c", &script]));
            match (self.ok(&format!("{who} net nc"), &t, None), server.join()) {
                (true, Ok(Ok(took))) if counted => up.of(ours).samples.push(rate(bytes, took)),
                (true, Ok(Err(e))) => self.failed(format!("{who} net nc: the host: {e}")),
                _ => {}
            }
            // Round trips, driven from the host.
            let port = ECHO_PORT.to_string();
            let mut sandbox = self
                .sandbox_in(ours, &pod, &["nc", "-l", "-p", &port, "-e", "cat"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start the echo sandbox");
            match round_trips(&pod.pod_ip()) {
                Ok(samples) if counted => rtt.of(ours).samples.extend(samples),
                Ok(_) => {}
                Err(e) => {
                    let _ = sandbox.kill();
                    self.failed(format!("{who} net round trips: {e}"));
                }
            }
            let _ = sandbox.wait();
        });
        down.into(&mut scenario, "host → sandbox MB/s (higher is better)");
        up.into(&mut scenario, "sandbox → host MB/s (higher is better)");
        rtt.into(&mut scenario, "TCP round trip µs (lower is better)");
        scenario
    }

    /// `command` in a fresh sandbox in `pod`'s network namespace.
    fn sandbox_in(&self, ours: bool, pod: &PodNet, command: &[&str]) -> Command {
        if ours {
            let options = ["--network".into(), pod.network_arg().into()];
            self.capsid_run_with(&options, command)
        } else {
            self.runc_run_in(command, Some(&pod.netns.path))
        }
    }
}

fn rate(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64().max(1e-9) / 1e6
}

/// The host's side of one transfer: the thread serving it, and the flag
/// that tells it the sandbox has ended (so it stops waiting for a
/// connection that will not come).
struct Served {
    thread: JoinHandle<std::io::Result<Duration>>,
    sandbox_ended: Arc<AtomicBool>,
}

impl Served {
    fn join(self) -> std::thread::Result<std::io::Result<Duration>> {
        self.sandbox_ended.store(true, Ordering::Relaxed);
        self.thread.join()
    }
}

/// Listens on the pod's host end and serves one connection with `serve`
/// (which returns how long the body took); the URL to reach it.
fn serve(
    pod: &PodNet,
    serve: impl FnOnce(TcpStream) -> std::io::Result<Duration> + Send + 'static,
) -> (String, Served) {
    let listener = TcpListener::bind((pod.host_ip().as_str(), 0)).expect("listen on the host end");
    let url = format!("http://{}/", listener.local_addr().expect("its address"));
    let sandbox_ended = Arc::new(AtomicBool::new(false));
    let ended = Arc::clone(&sandbox_ended);
    let thread = std::thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline || ended.load(Ordering::Relaxed) {
                        return Err(std::io::Error::other("the sandbox never connected"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        serve(stream)
    });
    (
        url,
        Served {
            thread,
            sandbox_ended,
        },
    )
}

/// Reads an HTTP request's head; its Content-Length.
fn read_head(reader: &mut impl BufRead) -> std::io::Result<u64> {
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            return Ok(length);
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
}

/// Answers a GET with `bytes` bytes; the time from the first to the end of
/// the connection (the client closes it once it has them all).
fn send_body(stream: TcpStream, bytes: u64) -> std::io::Result<Duration> {
    let mut reader = BufReader::new(stream.try_clone()?);
    read_head(&mut reader)?;
    let mut stream = stream;
    write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {bytes}\r\n\r\n")?;
    let chunk = vec![0u8; 1 << 16];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(1 << 16)).unwrap_or(1 << 16);
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    // The client's close: it has read everything.
    let _ = reader.read_to_end(&mut Vec::new());
    Ok(started.elapsed())
}

/// Reads `bytes` bytes and closes; the time from the first to the last.
fn take_bytes(mut stream: TcpStream, bytes: u64) -> std::io::Result<Duration> {
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    let mut started = None;
    while got < bytes {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other(format!(
                "the stream ended after {got} bytes"
            )));
        }
        started.get_or_insert_with(Instant::now);
        got += n as u64;
    }
    Ok(started.map(|s| s.elapsed()).unwrap_or_default())
}

/// Connects to the sandbox's echo port (retrying while it starts) and
/// times one-byte round trips, in µs.
fn round_trips(pod_ip: &str) -> std::io::Result<Vec<f64>> {
    let addr: std::net::SocketAddr = format!("{pod_ip}:{ECHO_PORT}")
        .parse()
        .map_err(std::io::Error::other)?;
    let deadline = Instant::now() + TIMEOUT;
    let mut stream = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut samples = Vec::with_capacity(ROUND_TRIPS);
    let mut byte = [0u8; 1];
    for i in 0..ROUND_TRIPS {
        let started = Instant::now();
        stream.write_all(&[u8::try_from(i % 256).unwrap_or(0)])?;
        stream.read_exact(&mut byte)?;
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples)
}
