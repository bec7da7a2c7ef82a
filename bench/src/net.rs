//! `net`: TCP between the host and a sandbox over a pod's network — the
//! same namespace for both, made as CNI's bridge plugin makes one (a veth,
//! `eth0` in the namespace); ours hands it to the guest's virtio-net
//! (`docs/networking.md`), runc's container uses it directly — and between
//! two pods, routed through the host as a node routes between its pods.
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
/// The port the pod → pod server listens on.
const POD_PORT: u16 = 8081;
/// Prints the time since boot in seconds, to the hundredth (/proc/uptime:
/// busybox's `date` has no sub-second field, and a container's seccomp
/// profile may refuse `adjtimex`).
const CLOCK: &str = "now() { read -r t _ < /proc/uptime; echo \"$t\"; }";
/// How long the pod → pod client's `nc` may take (busybox `timeout`: runc
/// has no `--timeout` of its own).
const CLIENT_SECS: u32 = 120;

impl Bench {
    pub(crate) fn net(&self) -> Scenario {
        let mut scenario = Scenario::new(
            "net",
            "TCP over a pod's network (a veth in a namespace, as CNI makes it): N bytes host → sandbox (`wget` of an HTTP body) and sandbox → host (`head -c N /dev/zero | nc`), timed by the host from the first body byte to the last; 200 one-byte round trips the host drives to `nc -l -e cat` in the sandbox; N bytes pod → pod (a sandbox in a second pod, routed through the host, serves them with `nc -l -e head`; once the host has seen it answer, a sandbox in the first pod reads them with `nc`; the server stays up until the host stops it), timed in the client sandbox around its `nc` (/proc/uptime, to 10 ms; connect included)",
        );
        let pod = PodNet::new(90);
        let peer = PodNet::new(91);
        let _forwarding = Forwarding::on();
        let bytes = self.args.stdout_bytes;
        let mut across = Pair::new("capsid: pod → pod", "runc: pod → pod", "MB/s");
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
            // Two VMs at once: a counted round tries once more after a
            // failure (noted all the same), so one lost guest does not
            // leave the series without its sample.
            for attempt in 0..if counted { 2 } else { 1 } {
                match self.pod_to_pod(ours, &pod, &peer, bytes) {
                    Ok(took) => {
                        if counted {
                            across.of(ours).samples.push(rate(bytes, took));
                        }
                        break;
                    }
                    Err(e) => {
                        self.failed(format!("{who} net pod → pod (try {}): {e}", attempt + 1))
                    }
                }
            }
        });
        down.into(&mut scenario, "host → sandbox MB/s (higher is better)");
        up.into(&mut scenario, "sandbox → host MB/s (higher is better)");
        rtt.into(&mut scenario, "TCP round trip µs (lower is better)");
        across.into(&mut scenario, "pod → pod MB/s (higher is better)");
        scenario
    }

    /// One pod → pod transfer of `bytes`, as the client sandbox timed it.
    /// A sandbox in `server_pod` serves two connections, one after the
    /// other: the host takes the first (so the client starts only once the
    /// server answers, and a server that never does is told apart from a
    /// route that does not carry), a sandbox in `client_pod` the second.
    fn pod_to_pod(
        &self,
        ours: bool,
        client_pod: &PodNet,
        server_pod: &PodNet,
        bytes: u64,
    ) -> Result<Duration, String> {
        // It stays up after serving: its VM going down with the stream's
        // end still in the guest's socket buffer would cut the stream (seen:
        // 4,050,056 of 4,194,304 bytes). The host stops it after the client.
        let once = format!("nc -l -p {POD_PORT} -e head -c {bytes} /dev/zero");
        let script = format!("{once}; {once}; exec sleep 600");
        let mut command = self.sandbox_in(ours, server_pod, &["sh", "-c", &script]);
        let id = command
            .get_args()
            .last()
            .map(|id| id.to_string_lossy().into_owned());
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start the server sandbox: {e}"))?;
        let log = drain(&mut child);
        let mut server = Server {
            child,
            runc_id: if ours { None } else { id },
        };
        let result = self.read_from_server(ours, client_pod, server_pod, bytes, &mut server);
        let status = server.stop();
        result.map_err(|e| {
            let log = log.join().unwrap_or_default();
            format!(
                "{e}; the server sandbox ({status}) said: {}",
                if log.trim().is_empty() {
                    "nothing"
                } else {
                    log.trim_end()
                }
            )
        })
    }

    /// The host waits for the server to answer, then the client reads.
    fn read_from_server(
        &self,
        ours: bool,
        client_pod: &PodNet,
        server_pod: &PodNet,
        bytes: u64,
        server: &mut Server,
    ) -> Result<Duration, String> {
        let ip = server_pod.pod_ip();
        first_answer(&ip, POD_PORT, &mut server.child)?;
        let script = format!(
            "{CLOCK}; s=$(now); n=$(timeout {CLIENT_SECS} nc {ip} {POD_PORT} </dev/null | wc -c); \
             e=$(now); echo \"POD2POD $n $s $e\""
        );
        let client = self
            .sandbox_in(ours, client_pod, &["sh", "-c", &script])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run the client sandbox: {e}"))?;
        let stdout = String::from_utf8_lossy(&client.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("POD2POD "))
            .ok_or_else(|| {
                format!(
                    "the client said nothing ({}): {}",
                    client.status,
                    String::from_utf8_lossy(&client.stderr).trim_end()
                )
            })?;
        parse_pod_to_pod(line, bytes)
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

/// The pod → pod server sandbox, stopped on drop if it still runs.
struct Server {
    child: Child,
    /// runc's container id: `runc run` passes SIGTERM on to the container,
    /// whose init (`sh`, PID 1 there) ignores it, so runc's is killed by id.
    runc_id: Option<String>,
}

impl Server {
    /// Ends it (it serves, then sleeps until stopped); how it ended.
    fn stop(mut self) -> String {
        if matches!(self.child.try_wait(), Ok(None)) {
            match &self.runc_id {
                Some(id) => {
                    let _ = Command::new("runc")
                        .args(["kill", id, "KILL"])
                        .stderr(Stdio::null())
                        .status();
                }
                // `capsid run` passes the first SIGTERM on to the command
                // (`sleep`, which as its container's init ignores it) and
                // kills it on the second, then takes its VM down.
                None => {
                    if let Ok(pid) = i32::try_from(self.child.id()) {
                        for _ in 0..2 {
                            // SAFETY: kill(2) on our own child, not yet reaped.
                            unsafe { libc::kill(pid, libc::SIGTERM) };
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return "killed: it outlived its stop by 60 s".into();
                }
            }
        }
    }
}

/// Connects to the server at `ip:port` (retrying while it boots) and reads
/// a first byte of its answer, then closes; an error if it has not
/// answered within the benchmark's timeout or ended first.
fn first_answer(ip: &str, port: u16, server: &mut Child) -> Result<(), String> {
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    let deadline = Instant::now() + TIMEOUT;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!(
                "the server ended ({status}) before it answered the host ({last})"
            ));
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut stream) => {
                stream
                    .set_read_timeout(Some(Duration::from_secs(30)))
                    .map_err(|e| e.to_string())?;
                let mut byte = [0u8; 1];
                return match stream.read(&mut byte) {
                    Ok(1) => Ok(()),
                    Ok(_) => Err("the server closed the host's connection without a byte".into()),
                    Err(e) => Err(format!("the host's read from the server: {e}")),
                };
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "the server did not answer the host within {} s ({last})",
        TIMEOUT.as_secs()
    ))
}

/// `N START END` from the client's line: the time it took, if it read all
/// `bytes`.
fn parse_pod_to_pod(line: &str, bytes: u64) -> Result<Duration, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [n, start, end] = fields[..] else {
        return Err(format!("the client printed {line:?}, not `N START END`"));
    };
    let (Ok(n), Ok(start), Ok(end)) = (n.parse::<u64>(), start.parse::<f64>(), end.parse::<f64>())
    else {
        return Err(format!("the client printed {line:?}, not numbers"));
    };
    if n != bytes {
        return Err(format!("the client read {n} bytes, not {bytes}"));
    }
    if end <= start {
        return Err(format!(
            "the client's clock did not move ({line:?}): too short a transfer to time"
        ));
    }
    Ok(Duration::from_secs_f64(end - start))
}

/// IPv4 forwarding in the host's namespace while it lives (pod → pod goes
/// through the host, as a node routes between its pods), then as it was.
struct Forwarding(Option<String>);

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Forwarding {
    fn on() -> Self {
        let was = std::fs::read_to_string(IP_FORWARD).ok();
        if was.as_deref().map(str::trim) != Some("1") {
            let _ = std::fs::write(IP_FORWARD, "1");
        }
        Self(was)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if let Some(was) = &self.0
            && was.trim() != "1"
        {
            let _ = std::fs::write(IP_FORWARD, was.trim());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_to_pod_line_gives_the_time_only_for_every_byte_and_a_moving_clock() {
        assert_eq!(
            parse_pod_to_pod("4194304 12.30 13.55", 4_194_304),
            Ok(Duration::from_secs_f64(13.55 - 12.30))
        );
        let short = parse_pod_to_pod("1000 12.30 13.55", 4_194_304).unwrap_err();
        assert!(short.contains("read 1000 bytes, not 4194304"), "{short}");
        let still = parse_pod_to_pod("4194304 12.30 12.30", 4_194_304).unwrap_err();
        assert!(still.contains("clock did not move"), "{still}");
        for garbage in ["", "4194304 12.30", "x 1 2", "4194304 1 2 3", "-1 1 2"] {
            assert!(parse_pod_to_pod(garbage, 4_194_304).is_err(), "{garbage:?}");
        }
    }
}
