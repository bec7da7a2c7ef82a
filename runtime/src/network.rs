//! A sandbox's network, wired the way Kubernetes wires it (Kata's
//! `tcfilter`). Whoever made the sandbox's network namespace (CNI, for a
//! pod) put an interface in it — a veth, usually — with addresses and
//! routes. Inside that namespace the runtime makes one tap per such
//! interface and redirects every frame that arrives on either out through
//! the other (an ingress qdisc on each, a u32 filter matching everything,
//! a `mirred` redirect), then hands the tap to the VMM as a virtio-net
//! device with the interface's MAC address. The agent gives the guest's
//! interface the addresses, MTU and routes the host's had, so the pod's IP
//! answers from inside the VM, and ARP and the bridge see the MAC they
//! expect.
//!
//! ```text
//!  sandbox netns:  eth0 (veth from CNI) ──ingress, mirred──▶ tap0_capsid ──fd──▶ capsid-vmm ──▶ guest eth0
//!                  eth0 ◀──mirred, ingress── tap0_capsid ◀──────────────────── capsid-vmm ◀── guest eth0
//! ```
//!
//! The work runs on a thread of its own that joins the namespace
//! (`setns` changes only the calling thread) and ends with it. A tap goes
//! when the last descriptor to it closes (the VMM's, once the runtime
//! dropped its own); [`unwire`] removes what is left, the ingress qdiscs
//! of the interfaces (with their filters).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use capsid_netlink::{Link, Netlink, NetlinkError};
use capsid_protocol::{IpNet, NetInterface, NetRoute, NetworkConfig};
use capsid_vmm_api::MacAddr;
use serde::{Deserialize, Serialize};

use crate::tap::{TapError, create_tap};

/// The most interfaces of a namespace the runtime wires.
const MAX_INTERFACES: usize = capsid_protocol::MAX_INTERFACES;

/// Why a sandbox's network could not be wired or unwired.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The namespace cannot be opened or joined.
    #[error("cannot enter the network namespace {0}")]
    Netns(PathBuf, #[source] std::io::Error),
    /// A netlink request failed.
    #[error("in the network namespace {0}")]
    Netlink(PathBuf, #[source] NetlinkError),
    /// A tap cannot be made.
    #[error("in the network namespace {0}")]
    Tap(PathBuf, #[source] TapError),
    /// The tap just made is not there.
    #[error("the tap made in the network namespace {0} is not there")]
    NoTap(PathBuf),
    /// More interfaces than a VM takes.
    #[error("the network namespace {0} has {1} interfaces; a VM takes at most {MAX_INTERFACES}")]
    TooMany(PathBuf, usize),
    /// The namespace's thread panicked.
    #[error("the thread working in the network namespace {0} failed")]
    Thread(PathBuf),
}

/// One virtio-net device of the VM: its tap and what the guest is told.
#[derive(Debug)]
pub struct NetDevice {
    /// The tap, close-on-exec; the VMM gets a copy.
    pub tap: OwnedFd,
    /// The MAC address of the host interface it stands for.
    pub mac: MacAddr,
    /// That interface's MTU.
    pub mtu: u16,
}

/// What [`unwire`] needs: where, and which interfaces got a redirect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wiring {
    /// The network namespace.
    pub netns: PathBuf,
    /// The host interfaces whose traffic goes to the VM.
    pub interfaces: Vec<String>,
}

/// A wired network namespace.
#[derive(Debug)]
pub struct Wired {
    /// One device per host interface, in the order of their indices (the
    /// first is the guest's `eth0`).
    pub devices: Vec<NetDevice>,
    /// What the agent gives the guest's interfaces.
    pub config: NetworkConfig,
    /// What [`unwire`] takes down.
    pub wiring: Wiring,
}

/// Runs `work` on a thread of its own inside the network namespace at
/// `netns`.
pub(crate) fn in_netns<T: Send>(
    netns: &Path,
    work: impl FnOnce(&mut Netlink) -> Result<T, NetworkError> + Send,
) -> Result<T, NetworkError> {
    let file = File::open(netns).map_err(|e| NetworkError::Netns(netns.to_owned(), e))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns with a descriptor we opened and a namespace
                // type; it changes only this thread, which ends after `work`.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(NetworkError::Netns(
                        netns.to_owned(),
                        std::io::Error::last_os_error(),
                    ));
                }
                let mut netlink =
                    Netlink::new().map_err(|e| NetworkError::Netlink(netns.to_owned(), e))?;
                work(&mut netlink)
            })
            .join()
            .unwrap_or_else(|_| Err(NetworkError::Thread(netns.to_owned())))
    })
}

/// Makes a new network namespace, bound at `path` (a file made here), as
/// `ip netns add` does: it lives until [`unbind_netns`].
pub fn bind_new_netns(path: &Path) -> std::io::Result<()> {
    File::create(path)?;
    let target =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare with a namespace flag changes only this
            // thread, which ends here.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
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
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace's thread panicked")))
    })
}

/// Unbinds and removes a namespace made by [`bind_new_netns`]; one not
/// there is not an error.
pub fn unbind_netns(path: &Path) {
    if let Ok(target) = CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 with a NUL-terminated path; not mounted is fine.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(path);
}

/// Wires every Ethernet interface of the namespace at `netns` (but
/// loopback and taps) to a tap of its own, and reads what the guest's
/// interfaces get. A namespace with none (`--network none` of an engine,
/// which still makes one) gives the VM no device, as runc's container
/// gets only loopback. On an error nothing is left in the namespace.
pub fn wire(netns: &Path, record: &(dyn Fn(&Wiring) + Sync)) -> Result<Wired, NetworkError> {
    let at = netns.to_owned();
    in_netns(netns, move |netlink| {
        let nl = |e| NetworkError::Netlink(at.clone(), e);
        let mut links: Vec<Link> = netlink
            .links()
            .map_err(nl)?
            .into_iter()
            .filter(|l| !l.loopback && l.mac.is_some() && l.kind.as_deref() != Some("tun"))
            .collect();
        links.sort_by_key(|l| l.index);
        if links.len() > MAX_INTERFACES {
            return Err(NetworkError::TooMany(at.clone(), links.len()));
        }
        // Told before anything is made: an owner killed from here on
        // leaves a record a sweep takes the wiring down by.
        record(&Wiring {
            netns: at.clone(),
            interfaces: links.iter().map(|l| l.name.clone()).collect(),
        });
        let mut wired = Wired {
            devices: Vec::new(),
            config: NetworkConfig::default(),
            wiring: Wiring {
                netns: at.clone(),
                interfaces: Vec::new(),
            },
        };
        for (i, link) in links.iter().enumerate() {
            if let Err(e) = wire_one(netlink, &at, i, link, &mut wired) {
                remove_qdiscs(netlink, &wired.wiring.interfaces);
                return Err(e);
            }
        }
        Ok(wired)
    })
}

fn wire_one(
    netlink: &mut Netlink,
    netns: &Path,
    i: usize,
    link: &Link,
    wired: &mut Wired,
) -> Result<(), NetworkError> {
    let nl = |e| NetworkError::Netlink(netns.to_owned(), e);
    let mac = link.mac.unwrap_or_default();
    let name = format!("tap{i}_capsid");
    let tap = create_tap(&name).map_err(|e| NetworkError::Tap(netns.to_owned(), e))?;
    let tap_link = netlink
        .link_by_name(&name)
        .map_err(nl)?
        .ok_or_else(|| NetworkError::NoTap(netns.to_owned()))?;
    netlink.set_up(tap_link.index, Some(link.mtu)).map_err(nl)?;
    netlink.add_ingress_qdisc(link.index).map_err(nl)?;
    wired.wiring.interfaces.push(link.name.clone());
    netlink.add_ingress_qdisc(tap_link.index).map_err(nl)?;
    netlink.redirect(link.index, tap_link.index).map_err(nl)?;
    netlink.redirect(tap_link.index, link.index).map_err(nl)?;

    let addresses = netlink
        .addresses(link.index)
        .map_err(nl)?
        .into_iter()
        .map(|a| IpNet {
            addr: a.addr,
            prefix: a.prefix,
        })
        .collect();
    let mut routes: Vec<NetRoute> = netlink
        .routes(link.index)
        .map_err(nl)?
        .into_iter()
        .map(|r| NetRoute {
            dest: r.dest.map(|d| IpNet {
                addr: d.addr,
                prefix: d.prefix,
            }),
            gateway: r.gateway,
            mac,
        })
        .collect();
    // Directly reachable networks first: a gateway must be reachable when
    // its route is added.
    routes.sort_by_key(|r| r.gateway.is_some());
    wired.config.routes.extend(routes);
    wired.config.interfaces.push(NetInterface {
        name: link.name.clone(),
        mac,
        mtu: link.mtu,
        addresses,
    });
    wired.devices.push(NetDevice {
        tap,
        mac: MacAddr(mac),
        mtu: u16::try_from(link.mtu).unwrap_or(u16::MAX),
    });
    Ok(())
}

fn remove_qdiscs(netlink: &mut Netlink, interfaces: &[String]) {
    for name in interfaces {
        if let Ok(Some(link)) = netlink.link_by_name(name)
            && let Err(e) = netlink.del_ingress_qdisc(link.index)
        {
            log::warn!("cannot remove the ingress qdisc of {name}: {e}");
        }
    }
}

/// Takes down what [`wire`] left in the namespace once the VM is gone:
/// the interfaces' ingress qdiscs and their redirects. A namespace or an
/// interface that is gone already (CNI removed it) is not an error.
pub fn unwire(wiring: &Wiring) -> Result<(), NetworkError> {
    if !wiring.netns.exists() {
        return Ok(());
    }
    let interfaces = wiring.interfaces.clone();
    in_netns(&wiring.netns, move |netlink| {
        remove_qdiscs(netlink, &interfaces);
        Ok(())
    })
}

/// Where a sandbox records its [`Wiring`] in its directory, so that the
/// wiring is taken down when its owner died (a swept `capsid run`, a shim
/// containerd cleans up after).
pub const WIRING_FILE: &str = "network.json";

/// Takes down the wiring recorded in the directory `dir` of a sandbox
/// whose owner is gone, and forgets it.
pub fn unwire_recorded(dir: &Path) {
    let path = dir.join(WIRING_FILE);
    let Some(wiring) = std::fs::read(&path)
        .ok()
        .and_then(|json| serde_json::from_slice::<Wiring>(&json).ok())
    else {
        return;
    };
    if let Err(e) = unwire(&wiring) {
        log::warn!("{}", capsid_base::error_chain(&e));
    }
    let _ = std::fs::remove_file(path);
}

/// The interfaces and addresses of `config`, for messages.
pub fn describe(config: &NetworkConfig) -> String {
    config
        .interfaces
        .iter()
        .map(|i| {
            let addresses: Vec<String> = i.addresses.iter().map(ToString::to_string).collect();
            format!("{} {}", i.name, addresses.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    /// A network namespace made for the test; gone when dropped.
    struct TestNetns {
        dir: tempfile::TempDir,
    }

    impl TestNetns {
        fn path(&self) -> PathBuf {
            self.dir.path().join("ns")
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            unbind_netns(&self.path());
        }
    }

    /// None (and a printed reason) when this process may not make one.
    fn test_netns() -> Option<TestNetns> {
        let ns = TestNetns {
            dir: tempfile::tempdir().unwrap(),
        };
        match bind_new_netns(&ns.path()) {
            Ok(()) => Some(ns),
            Err(e) => {
                println!("skipped: cannot make a network namespace: {e}");
                None
            }
        }
    }

    #[test]
    fn a_namespace_without_an_interface_gives_no_device_and_a_missing_one_is_named() {
        let Some(ns) = test_netns() else {
            return;
        };
        let wired = wire(&ns.path(), &|_| {}).unwrap();
        assert!(wired.devices.is_empty() && wired.config.interfaces.is_empty());
        let e = wire(Path::new("/nonexistent/netns"), &|_| {}).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netns"), "{e}");
        // Nothing to take down in a namespace that is gone.
        unwire(&Wiring {
            netns: "/nonexistent/netns".into(),
            interfaces: vec!["eth0".into()],
        })
        .unwrap();
    }

    #[test]
    fn an_interface_is_redirected_to_a_tap_and_its_addresses_and_routes_read() {
        let (Some(pod), Some(host)) = (test_netns(), test_netns()) else {
            return;
        };
        // What CNI would have made: a veth with its pod end `eth0` in the
        // pod's namespace, an address, a route and a default route.
        let host_ns = File::open(host.path()).unwrap();
        let eth0 = in_netns(&pod.path(), |netlink| {
            use std::os::fd::AsFd;
            netlink
                .add_veth("eth0", "veth-host", Some(host_ns.as_fd()))
                .unwrap();
            let link = netlink.link_by_name("eth0").unwrap().unwrap();
            netlink.set_up(link.index, Some(1450)).unwrap();
            let net = capsid_netlink::IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 5)),
                prefix: 16,
            };
            netlink.add_address(link.index, net).unwrap();
            let gateway = Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1)));
            let default = capsid_netlink::Route {
                dest: None,
                gateway,
                link: link.index,
            };
            netlink.add_route(&default).unwrap();
            Ok(link)
        })
        .unwrap();

        // The wiring is told before any of it is made (a run killed while
        // it wires leaves a record; this was told only afterwards).
        let told = std::sync::Mutex::new(Vec::new());
        let wired = wire(&pod.path(), &|wiring| {
            let mut netlink = Netlink::new().unwrap();
            assert!(netlink.link_by_name("tap0_capsid").unwrap().is_none());
            let eth0 = netlink.link_by_name("eth0").unwrap().unwrap();
            assert!(netlink.del_ingress_qdisc(eth0.index).is_err());
            told.lock().unwrap().push(wiring.interfaces.clone());
        })
        .unwrap();
        assert_eq!(*told.lock().unwrap(), vec![vec!["eth0".to_owned()]]);
        assert_eq!(wired.devices.len(), 1);
        assert_eq!(wired.devices[0].mac.0, eth0.mac.unwrap());
        assert_eq!(wired.devices[0].mtu, 1450);
        let interface = &wired.config.interfaces[0];
        assert_eq!((interface.name.as_str(), interface.mtu), ("eth0", 1450));
        assert_eq!(
            interface.addresses,
            vec![IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 5)),
                prefix: 16,
            }]
        );
        assert_eq!(
            wired.config.routes,
            vec![NetRoute {
                dest: None,
                gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 88, 0, 1))),
                mac: eth0.mac.unwrap(),
            }]
        );
        assert_eq!(wired.wiring.interfaces, vec!["eth0".to_owned()]);
        let seen = in_netns(&pod.path(), |netlink| Ok(netlink.links().unwrap())).unwrap();
        let tap = seen
            .iter()
            .find(|l| l.name == "tap0_capsid")
            .expect("the tap");
        assert!(tap.up && tap.mtu == 1450, "{tap:?}");
        // Wiring again while the first wiring stands is refused whole.
        assert!(wire(&pod.path(), &|_| {}).is_err());

        unwire(&wired.wiring).unwrap();
        drop(wired);
        let seen = in_netns(&pod.path(), |netlink| Ok(netlink.links().unwrap())).unwrap();
        assert!(
            seen.iter().all(|l| l.name != "tap0_capsid"),
            "the tap goes with its descriptor: {seen:?}"
        );
        // With the qdisc gone, the interface can be wired again.
        let again = wire(&pod.path(), &|_| {}).unwrap();
        unwire(&again.wiring).unwrap();
    }
}
