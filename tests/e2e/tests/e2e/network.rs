//! Networking end to end: a network namespace made as CNI makes a pod's
//! (a veth pair, one end in it with an address and a default route), its
//! interface handed to a micro-VM by `capsid run --network netns:PATH`,
//! TCP both ways between the host and the workload, and nothing left in
//! the namespace afterwards.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use capsid_e2e::require_kvm;
use capsid_netlink::{IpNet, Netlink, Route};

use crate::cli::capsid_run;

/// A network namespace bound at a path, as `ip netns add` makes one.
struct Netns {
    path: PathBuf,
}

impl Netns {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        File::create(&path).unwrap();
        let target = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        std::thread::spawn(move || {
            // SAFETY: unshare with a namespace flag changes only this thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            // SAFETY: a bind mount of this thread's namespace onto a file
            // we made; both paths are NUL-terminated.
            let rc = unsafe {
                libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        })
        .join()
        .unwrap();
        Self { path }
    }

    /// Runs `work` with a netlink socket inside the namespace.
    fn inside<T: Send>(&self, work: impl FnOnce(&mut Netlink) -> T + Send) -> T {
        let file = File::open(&self.path).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace descriptor; this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0);
                work(&mut Netlink::new().unwrap())
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let target = CString::new(self.path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2 with a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_file(&self.path);
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

#[test]
fn capsid_run_joins_a_network_namespace_and_talks_tcp_both_ways() {
    if !require_kvm("capsid_run_joins_a_network_namespace_and_talks_tcp_both_ways") {
        return;
    }
    let pid = std::process::id() % 10_000;
    let netns = Netns::new(&format!("capsid-e2e-netns-{pid}"));
    let host_end = format!("ce2e-{pid}");
    // The pod's side: eth0 with 10.233.0.2/24 and a default route.
    let mut host = Netlink::new().unwrap();
    let ns_file = File::open(&netns.path).unwrap();
    host.add_veth(&host_end, "eth0", Some(ns_file.as_fd()))
        .unwrap();
    let veth = host.link_by_name(&host_end).unwrap().unwrap();
    host.add_address(
        veth.index,
        IpNet {
            addr: v4(10, 233, 0, 1),
            prefix: 24,
        },
    )
    .unwrap();
    host.set_up(veth.index, None).unwrap();
    netns.inside(|netlink| {
        let eth0 = netlink.link_by_name("eth0").unwrap().unwrap();
        netlink.set_up(eth0.index, Some(1400)).unwrap();
        netlink
            .add_address(
                eth0.index,
                IpNet {
                    addr: v4(10, 233, 0, 2),
                    prefix: 24,
                },
            )
            .unwrap();
        let default = Route {
            dest: None,
            gateway: Some(v4(10, 233, 0, 1)),
            link: eth0.index,
        };
        netlink.add_route(&default).unwrap();
    });

    // The host serves one page; then it calls the workload back.
    let server = TcpListener::bind("10.233.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let serve = std::thread::spawn(move || {
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
            match TcpStream::connect_timeout(
                &"10.233.0.2:8080".parse().unwrap(),
                Duration::from_secs(2),
            ) {
                Ok(mut stream) => {
                    stream.write_all(b"ping from the host\n").unwrap();
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("the workload never listened: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    let network = format!("netns:{}", netns.path.display());
    let script = format!(
        "ip -o -4 addr show eth0; ip route; wget -qO- http://10.233.0.1:{port}/; nc -l -p 8080"
    );
    let (output, took) = capsid_run(
        &[
            "--network",
            &network,
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
    serve.join().unwrap();
    assert!(stdout.contains("inet 10.233.0.2/24"), "{stdout}");
    assert!(
        stdout.contains("default via 10.233.0.1 dev eth0"),
        "{stdout}"
    );
    assert!(stdout.contains("hello from the host"), "{stdout}");
    assert!(stdout.contains("ping from the host"), "{stdout}");

    // Nothing left in the namespace: no tap, no ingress qdisc on eth0.
    netns.inside(|netlink| {
        let links = netlink.links().unwrap();
        assert!(links.iter().all(|l| l.name != "tap0_capsid"), "{links:?}");
        let eth0 = links.iter().find(|l| l.name == "eth0").unwrap();
        assert!(
            netlink.del_ingress_qdisc(eth0.index).is_err(),
            "eth0 still had its ingress qdisc"
        );
    });
    host.del_link(veth.index).unwrap();
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
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("supported are none and netns:PATH"),
        "{stderr}"
    );
}
