//! Network namespaces for tests and the benchmark: one bound at a path as
//! `ip netns add` makes it, and a pod's as CNI's bridge plugin leaves it
//! (a veth pair, `eth0` in the namespace with an address and a default
//! route through the host's end). Everything goes when dropped.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use capsid_netlink::{IpNet, Netlink, Route};

/// A network namespace bound at a path, as `ip netns add` makes one.
#[derive(Debug)]
pub struct Netns {
    /// Where it is bound.
    pub path: PathBuf,
}

impl Netns {
    /// A new namespace, bound at `name` in the temporary directory.
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(name);
        capsid_runtime::network::bind_new_netns(&path).unwrap();
        Self { path }
    }

    /// Runs `work` on a thread inside the namespace (sockets it makes are
    /// the namespace's).
    pub fn enter<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let file = File::open(&self.path).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor; this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            work()
        })
    }

    /// Runs `work` with a netlink socket inside the namespace.
    pub fn inside<T: Send>(&self, work: impl FnOnce(&mut Netlink) -> T + Send) -> T {
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
        capsid_runtime::network::unbind_netns(&self.path);
    }
}

/// The names of this namespace's network interfaces (the host's, for a
/// test's leak checks).
pub fn link_names() -> Vec<String> {
    Netlink::new()
        .unwrap()
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect()
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

/// What CNI makes for a pod: a namespace with `eth0`, one end of a veth
/// pair, at 10.233.`subnet`.2/24 with a default route through the other
/// end, 10.233.`subnet`.1 in the host's namespace.
#[derive(Debug)]
pub struct PodNet {
    /// The pod's namespace.
    pub netns: Netns,
    host: Netlink,
    veth: u32,
    subnet: u8,
}

impl PodNet {
    /// Makes it; `subnet` tells concurrent ones apart.
    pub fn new(subnet: u8) -> Self {
        let pid = std::process::id() % 10_000;
        let netns = Netns::new(&format!("capsid-pod-netns-{pid}-{subnet}"));
        let host_end = format!("cpod-{pid}-{subnet}");
        let mut host = Netlink::new().unwrap();
        let ns_file = File::open(&netns.path).unwrap();
        host.add_veth(&host_end, "eth0", Some(ns_file.as_fd()))
            .unwrap();
        let veth = host.link_by_name(&host_end).unwrap().unwrap().index;
        host.add_address(
            veth,
            IpNet {
                addr: v4(10, 233, subnet, 1),
                prefix: 24,
            },
        )
        .unwrap();
        host.set_up(veth, None).unwrap();
        netns.inside(|netlink| {
            let eth0 = netlink.link_by_name("eth0").unwrap().unwrap();
            netlink.set_up(eth0.index, Some(1400)).unwrap();
            netlink
                .add_address(
                    eth0.index,
                    IpNet {
                        addr: v4(10, 233, subnet, 2),
                        prefix: 24,
                    },
                )
                .unwrap();
            let default = Route {
                dest: None,
                gateway: Some(v4(10, 233, subnet, 1)),
                link: eth0.index,
            };
            netlink.add_route(&default).unwrap();
        });
        Self {
            netns,
            host,
            veth,
            subnet,
        }
    }

    /// The host's end.
    pub fn host_ip(&self) -> String {
        format!("10.233.{}.1", self.subnet)
    }

    /// The pod's `eth0`.
    pub fn pod_ip(&self) -> String {
        format!("10.233.{}.2", self.subnet)
    }

    /// `netns:PATH`, for `capsid run --network`.
    pub fn network_arg(&self) -> String {
        format!("netns:{}", self.netns.path.display())
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        let _ = self.host.del_link(self.veth);
    }
}
