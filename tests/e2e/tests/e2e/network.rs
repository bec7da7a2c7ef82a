//! Networking end to end: a network namespace made as CNI makes a pod's
//! (a veth pair, one end in it with an address and a default route), its
//! interface handed to a micro-VM by `capsid run --network netns:PATH`,
//! TCP both ways between the host and the workload, and nothing left in
//! the namespace afterwards.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_netlink::{IpNet, Netlink};
use capsid_testbed::containerd::{BUSYBOX, Containerd};
use capsid_testbed::netns::{Netns, PodNet, link_names};
use std::process::Stdio;

use crate::cli::capsid_run;

/// What these tests do with a pod's network.
trait PodTraffic {
    fn serve_and_call_back(&self) -> (u16, std::thread::JoinHandle<()>);
    fn script(&self, port: u16) -> String;
    fn check_output(&self, stdout: &str);
    fn check_nothing_left(&self);
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

impl PodTraffic for PodNet {
    /// Serves one HTTP GET from the pod, then connects to the pod's port
    /// 8080 (retrying until it listens) and says hello.
    fn serve_and_call_back(&self) -> (u16, std::thread::JoinHandle<()>) {
        let server = TcpListener::bind(format!("{}:0", self.host_ip())).unwrap();
        let port = server.local_addr().unwrap().port();
        let pod: std::net::SocketAddr = format!("{}:8080", self.pod_ip()).parse().unwrap();
        let thread = std::thread::spawn(move || {
            let (mut stream, _) = server.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).unwrap();
            stream
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 20\r\n\r\nhello from the host\n")
                .unwrap();
            drop(stream);
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                match TcpStream::connect_timeout(&pod, Duration::from_secs(2)) {
                    Ok(mut stream) => {
                        stream.write_all(b"ping from the host\n").unwrap();
                        return;
                    }
                    Err(e) if Instant::now() > deadline => {
                        panic!("the workload never listened: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        (port, thread)
    }

    /// The workload's side: show its address and routes, fetch the host's
    /// page, then wait for the host's call.
    fn script(&self, port: u16) -> String {
        format!(
            "ip -o -4 addr show eth0; ip route; wget -qO- http://{}:{port}/; nc -l -p 8080",
            self.host_ip()
        )
    }

    fn check_output(&self, stdout: &str) {
        assert!(
            stdout.contains(&format!("inet {}/24", self.pod_ip())),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("default via {} dev eth0", self.host_ip())),
            "{stdout}"
        );
        assert!(stdout.contains("hello from the host"), "{stdout}");
        assert!(stdout.contains("ping from the host"), "{stdout}");
    }

    /// Nothing of ours is left in the namespace: no tap, no ingress qdisc.
    fn check_nothing_left(&self) {
        self.netns.inside(|netlink| {
            let links = netlink.links().unwrap();
            assert!(links.iter().all(|l| l.name != "tap0_capsid"), "{links:?}");
            let eth0 = links.iter().find(|l| l.name == "eth0").unwrap();
            assert!(
                netlink.del_ingress_qdisc(eth0.index).is_err(),
                "eth0 still had its ingress qdisc"
            );
        });
    }
}

#[test]
fn capsid_run_joins_a_network_namespace_and_talks_tcp_both_ways() {
    if !require_kvm("capsid_run_joins_a_network_namespace_and_talks_tcp_both_ways") {
        return;
    }
    let pod = PodNet::new(0);
    let (port, host) = pod.serve_and_call_back();
    let network = pod.network_arg();
    let (output, took) = capsid_run(
        &[
            "--network",
            &network,
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            &pod.script(port),
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}(capsid run took {took:?})");
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    host.join().unwrap();
    pod.check_output(&stdout);
    pod.check_nothing_left();

    // A run killed with SIGKILL leaves its redirect in the namespace; the
    // next run's sweep takes it down.
    let mut killed = std::process::Command::new(capsid_testbed::artifact("CAPSID_CLI"))
        .args(["run", "--rootfs"])
        .arg(std::env::var_os("CAPSID_TEST_ROOTFS_DIR").unwrap())
        .args(["--network", &network, "--", "sleep", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pod
        .netns
        .inside(|netlink| netlink.link_by_name("tap0_capsid").unwrap().is_some())
    {
        assert!(
            Instant::now() < deadline,
            "the killed run never wired the namespace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    let (output, _) = capsid_run(&["--", "true"], b"");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    pod.check_nothing_left();
}

#[test]
fn a_container_started_by_containerd_in_a_network_namespace_gets_its_network() {
    if !require_kvm("a_container_started_by_containerd_in_a_network_namespace_gets_its_network") {
        return;
    }
    // What CRI does for a pod: the spec joins the namespace CNI made by its
    // path (ctr --with-ns), and the shim hands its interface to the VM.
    let pod = PodNet::new(1);
    let containerd = Containerd::start();
    let (port, host) = pod.serve_and_call_back();
    let with_ns = format!("network:{}", pod.netns.path.display());
    let script = pod.script(port);
    let args = Containerd::run_args(
        &["--rm", "--with-ns", &with_ns],
        BUSYBOX,
        "net1",
        &["sh", "-c", &script],
    );
    let output = containerd.ctr_bounded(&args);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{stdout}\n{stderr}\n{}",
        containerd.log()
    );
    host.join().unwrap();
    pod.check_output(&stdout);
    pod.check_nothing_left();
}

#[test]
fn a_network_namespace_that_is_not_there_is_named_and_nothing_boots() {
    let (output, _) = capsid_run(
        &["--network", "netns:/nonexistent/netns", "--", "true"],
        b"",
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0));
    assert!(
        stderr.contains("cannot enter the network namespace /nonexistent/netns"),
        "{stderr}"
    );
    let (output, _) = capsid_run(&["--network", "host", "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("supported are none, nat and netns:PATH"),
        "{stderr}"
    );
    let (output, _) = capsid_run(&["-p", "8080:80", "--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("--publish needs --network nat"), "{stderr}");
}

#[test]
fn with_egress_only_the_allowed_destinations_answer() {
    if !require_kvm("with_egress_only_the_allowed_destinations_answer") {
        return;
    }
    // Two servers on the test host's own addresses; the run's gateway is
    // one of them. Only the first port is allowed.
    let servers: Vec<TcpListener> = (0..2)
        .map(|_| TcpListener::bind("0.0.0.0:0").unwrap())
        .collect();
    let ports: Vec<u16> = servers
        .iter()
        .map(|s| s.local_addr().unwrap().port())
        .collect();
    for server in servers {
        server.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(150);
            while Instant::now() < deadline {
                match server.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.write_all(b"answered\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
    }
    let script = format!(
        "gw=$(ip route | awk '/default/ {{print $3}}'); \
         for p in {a} {b}; do if timeout 10 nc $gw $p </dev/null | grep -q answered; \
         then echo \"$p open\"; else echo \"$p closed\"; fi; done",
        a = ports[0],
        b = ports[1]
    );
    let allow = format!("allow=10.240.0.0/16:{}", ports[0]);
    let (output, _) = capsid_run(
        &[
            "--network",
            "nat",
            "--egress",
            &allow,
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            &script,
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(
        stdout,
        format!("{} open\n{} closed\n", ports[0], ports[1]),
        "{stderr}"
    );
    // Without --egress both answer (and the rules are gone).
    let (output, _) = capsid_run(
        &[
            "--network",
            "nat",
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            &script,
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout, format!("{} open\n{} open\n", ports[0], ports[1]));
    assert_eq!(nat_leftovers(), (Vec::new(), String::new()));
    let (output, _) = capsid_run(&["--egress", &allow, "--", "true"], b"");
    assert_eq!(output.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--egress needs --network nat"));
}

/// The host's `capsid-nN` interfaces and the nftables rules they own.
fn nat_leftovers() -> (Vec<String>, String) {
    let links = link_names()
        .into_iter()
        .filter(|n| n.starts_with("capsid-n"))
        .collect();
    let rules = std::process::Command::new("nft")
        .args(["list", "table", "ip", "capsid"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let rules = rules
        .lines()
        .filter(|l| l.contains("comment \"capsid-n"))
        .collect::<Vec<_>>()
        .join("\n");
    (links, rules)
}

#[test]
fn capsid_run_with_a_network_of_its_own_reaches_out_masqueraded_and_publishes_a_port() {
    if !require_kvm(
        "capsid_run_with_a_network_of_its_own_reaches_out_masqueraded_and_publishes_a_port",
    ) {
        return;
    }
    // "Outside": another host, 10.250.0.2, behind the test host's 10.250.0.1.
    let pid = std::process::id() % 10_000;
    let outside = Netns::new(&format!("capsid-e2e-outside-{pid}"));
    let mut host = Netlink::new().unwrap();
    let host_end = format!("ce2e-out-{pid}");
    let ns_file = File::open(&outside.path).unwrap();
    host.add_veth(&host_end, "eth0", Some(ns_file.as_fd()))
        .unwrap();
    let veth = host.link_by_name(&host_end).unwrap().unwrap().index;
    host.add_address(
        veth,
        IpNet {
            addr: v4(10, 250, 0, 1),
            prefix: 24,
        },
    )
    .unwrap();
    host.set_up(veth, None).unwrap();
    outside.inside(|netlink| {
        let eth0 = netlink.link_by_name("eth0").unwrap().unwrap();
        netlink.set_up(eth0.index, None).unwrap();
        netlink
            .add_address(
                eth0.index,
                IpNet {
                    addr: v4(10, 250, 0, 2),
                    prefix: 24,
                },
            )
            .unwrap();
    });
    // Outside serves a page and says who asked; then it calls the published port.
    let server = outside
        .enter(|| TcpListener::bind("10.250.0.2:0").unwrap())
        .join()
        .unwrap();
    let port = server.local_addr().unwrap().port();
    let outside_side = outside.enter(move || {
        let (mut stream, peer) = server.accept().unwrap();
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request).unwrap();
        let body = format!("you are {}\n", peer.ip());
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).unwrap();
        drop(stream);
        let published: std::net::SocketAddr = "10.250.0.1:18080".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match TcpStream::connect_timeout(&published, Duration::from_secs(2)) {
                Ok(mut stream) => {
                    stream
                        .write_all(b"ping through the published port\n")
                        .unwrap();
                    return peer.ip();
                }
                Err(e) if Instant::now() > deadline => panic!("the port was never published: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    let script =
        format!("ip -o -4 addr show eth0; wget -qO- http://10.250.0.2:{port}/; nc -l -p 8080");
    let (output, took) = capsid_run(
        &[
            "--network",
            "nat",
            "-p",
            "18080:8080",
            "--timeout",
            "120s",
            "--",
            "sh",
            "-c",
            &script,
        ],
        b"",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}(capsid run took {took:?})");
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    let seen_as = outside_side.join().unwrap();
    assert!(stdout.contains("inet 10.240."), "{stdout}");
    assert_eq!(
        seen_as,
        v4(10, 250, 0, 1),
        "the workload leaves masqueraded as the host"
    );
    assert!(stdout.contains("you are 10.250.0.1"), "{stdout}");
    assert!(
        stdout.contains("ping through the published port"),
        "{stdout}"
    );
    assert_eq!(
        nat_leftovers(),
        (Vec::new(), String::new()),
        "nothing left: {stderr}"
    );

    // A run killed with SIGKILL leaves its network; the next run sweeps it.
    let mut killed = std::process::Command::new(capsid_testbed::artifact("CAPSID_CLI"))
        .args(["run", "--rootfs"])
        .arg(std::env::var_os("CAPSID_TEST_ROOTFS_DIR").unwrap())
        .args(["--network", "nat", "-p", "18081:80", "--", "sleep", "100"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while nat_leftovers().0.is_empty() || nat_leftovers().1.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the killed run never made its network"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_ne!(
        nat_leftovers().0,
        Vec::<String>::new(),
        "SIGKILL left the veth"
    );
    let (output, _) = capsid_run(&["--", "true"], b"");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("left with its micro-VM by a capsid run that was killed"),
        "{stderr}"
    );
    assert_eq!(
        nat_leftovers(),
        (Vec::new(), String::new()),
        "the sweep took it all down"
    );
    host.del_link(veth).unwrap();
}
