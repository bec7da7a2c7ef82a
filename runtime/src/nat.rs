//! `capsid run --network nat`: a network of the run's own, the way Docker's
//! default bridge network gives a container one, built from the same parts
//! as a pod's ([`crate::network`] then hands its interface to the VM).
//!
//! ```text
//!  host: capsid-nI (10.240.a.b+1/30) ── veth ── run's netns: eth0 (10.240.a.b+2/30, default via +1)
//!        nftables `ip capsid`: postrouting masquerade of the /30 leaving by any other interface;
//!                              prerouting dnat HOST_PORT → guest:PORT for each -p;
//!                              input and forward: what comes in by capsid-nI may not
//!                              reach link-local addresses (cloud metadata), and with
//!                              --egress only the allowed destinations (replies to
//!                              connections made to the workload always)
//! ```
//!
//! The egress rules stand on the host, in the path every packet of the
//! workload takes (the tap is redirected to the veth by tc, past the run's
//! namespace, so nothing in the guest or that namespace can change them).
//!
//! Each run takes a /30 of 10.240.0.0/16, numbered I (0 to 16383), found
//! free by creating the host end `capsid-nI` (an existing name is taken by
//! a run that is still there: the next number is tried). The namespace is
//! bound at `DIR/netns` in the run's scratch directory, and `DIR/nat.json`
//! records I, so that a run killed with SIGKILL is cleaned up by the next
//! one's sweep ([`sweep_dir`]): its veth, its nftables rules (each carries
//! the comment `capsid-nI`) and its namespace. IPv4 forwarding is turned on,
//! as Docker does, and left on.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use capsid_netlink::{IpNet, Netlink, NetlinkError, Route};
use serde::{Deserialize, Serialize};

/// The runs' addresses.
const SUBNET: (u8, u8) = (10, 240);
/// How many /30s the subnet holds.
const SLOTS: u32 = 1 << 14;
/// How many numbers a run tries before it gives up.
const TRIES: u32 = 256;
/// The nftables table of capsid's rules.
const TABLE: &str = "capsid";
/// The files in the run's directory.
const NETNS_FILE: &str = "netns";
const RECORD_FILE: &str = "nat.json";

/// Why a run's network could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NatError {
    /// The namespace cannot be made.
    #[error("cannot make the run's network namespace at {0}")]
    Netns(PathBuf, #[source] std::io::Error),
    /// A netlink request failed.
    #[error("cannot make the run's network")]
    Netlink(#[from] NetlinkError),
    /// Every number tried is taken.
    #[error(
        "no free address block in 10.240.0.0/16 after {TRIES} tries (are that many runs going on?)"
    )]
    Exhausted,
    /// nftables refused the rules.
    #[error("nftables: {0}")]
    Nft(String),
    /// The run's namespace cannot be set up.
    #[error("cannot set up the run's network namespace")]
    Inside(#[source] Box<crate::network::NetworkError>),
    /// The record cannot be written.
    #[error("cannot record the run's network in {0}")]
    Record(PathBuf, #[source] std::io::Error),
}

/// A port published with `-p HOST:CONTAINER[/tcp|/udp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// The host's port.
    pub host: u16,
    /// The workload's port.
    pub guest: u16,
    /// UDP rather than TCP.
    pub udp: bool,
}

impl std::str::FromStr for Publish {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?}: expected HOST_PORT:CONTAINER_PORT[/tcp|/udp], as 8080:80");
        let (ports, udp) = match text.rsplit_once('/') {
            Some((ports, "tcp")) => (ports, false),
            Some((ports, "udp")) => (ports, true),
            Some(_) => return Err(bad()),
            None => (text, false),
        };
        let (host, guest) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad);
        Ok(Self {
            host: port(host)?,
            guest: port(guest)?,
            udp,
        })
    }
}

/// `--egress allow=CIDR[:PORT],…`: the only destinations a workload may
/// open connections to (TCP or UDP, on that port or any).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Egress {
    /// Each allowed destination.
    pub allow: Vec<Allowed>,
}

/// One allowed destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allowed {
    /// The network.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The port, or any.
    pub port: Option<u16>,
}

impl std::str::FromStr for Egress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let list = text.strip_prefix("allow=").ok_or_else(|| {
            format!("{text:?}: expected allow=CIDR[:PORT],… (as allow=10.0.0.0/8:443,192.0.2.7)")
        })?;
        let allow = list
            .split(',')
            .map(|item| {
                let bad = || format!("{item:?}: expected an IPv4 CIDR[:PORT], as 10.0.0.0/8:443");
                let (net, port) = match item.rsplit_once(':') {
                    Some((net, port)) => {
                        let port = port
                            .parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(bad)?;
                        (net, Some(port))
                    }
                    None => (item, None),
                };
                let (addr, prefix) = match net.split_once('/') {
                    Some((addr, prefix)) => (addr, prefix.parse::<u8>().map_err(|_| bad())?),
                    None => (net, 32),
                };
                let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
                if prefix > 32 {
                    return Err(bad());
                }
                // The network itself: host bits cleared.
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                Ok(Allowed {
                    addr: Ipv4Addr::from(u32::from(addr) & mask),
                    prefix,
                    port,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { allow })
    }
}

/// The filter rules of the run whose host end is `name`: what comes in by
/// it may answer connections made to it, may not reach link-local
/// addresses (cloud metadata services) unless allowed, and with `egress`
/// may reach only what it allows.
fn filter_rules(name: &str, egress: Option<&Egress>) -> String {
    let mut script = String::new();
    for chain in ["input", "forward"] {
        let mut rule = |what: &str| {
            script.push_str(&format!(
                "add rule ip {TABLE} {chain} iifname \"{name}\" {what} comment \"{name}\"\n"
            ));
        };
        rule("ct state established,related accept");
        for allowed in egress.map(|e| e.allow.as_slice()).unwrap_or_default() {
            let net = format!("ip daddr {}/{}", allowed.addr, allowed.prefix);
            match allowed.port {
                Some(port) => rule(&format!(
                    "{net} meta l4proto {{ tcp, udp }} th dport {port} accept"
                )),
                None => rule(&format!("{net} accept")),
            }
        }
        rule("ip daddr 169.254.0.0/16 drop");
        if egress.is_some() {
            rule("drop");
        }
    }
    script
}

/// What a run's directory records of its network.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    slot: u32,
}

/// A run's own network: its namespace, veth, addresses and rules. Dropping
/// it takes them all down.
#[derive(Debug)]
pub struct NatNetwork {
    dir: PathBuf,
    slot: u32,
}

fn host_link(slot: u32) -> String {
    format!("capsid-n{slot}")
}

/// The address `offset` (1: the host's end, 2: the guest's) of `slot`'s /30.
fn address(slot: u32, offset: u32) -> Ipv4Addr {
    let n = slot * 4 + offset;
    let [_, _, c, d] = n.to_be_bytes();
    Ipv4Addr::new(SUBNET.0, SUBNET.1, c, d)
}

/// Runs `nft -f -` with `script`.
fn nft(script: &str) -> Result<(), NatError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            NatError::Nft(format!(
                "cannot run nft ({e}): install Debian's nftables package"
            ))
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| NatError::Nft(e.to_string()))?;
    if !output.status.success() {
        return Err(NatError::Nft(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(())
}

/// The table and its chains, made if missing.
const TABLE_SCRIPT: &str = "add table ip capsid
add chain ip capsid postrouting { type nat hook postrouting priority srcnat; policy accept; }
add chain ip capsid prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain ip capsid input { type filter hook input priority filter; policy accept; }
add chain ip capsid forward { type filter hook forward priority filter; policy accept; }
";

impl NatNetwork {
    /// Makes the run's network in its directory `dir`, publishing
    /// `published`, reaching only what `egress` allows if given.
    pub fn create(
        dir: &Path,
        published: &[Publish],
        egress: Option<&Egress>,
    ) -> Result<Self, NatError> {
        let netns = dir.join(NETNS_FILE);
        crate::network::bind_new_netns(&netns).map_err(|e| NatError::Netns(netns.clone(), e))?;
        let ns_file = File::open(&netns).map_err(|e| NatError::Netns(netns.clone(), e))?;
        let mut host = Netlink::new()?;
        let start = std::process::id() % SLOTS;
        let mut slot = None;
        for n in 0..TRIES {
            let candidate = (start + n) % SLOTS;
            match host.add_veth(&host_link(candidate), "eth0", Some(ns_file.as_fd())) {
                Ok(()) => {
                    slot = Some(candidate);
                    break;
                }
                Err(NetlinkError::Refused(_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    crate::network::unbind_netns(&netns);
                    return Err(e.into());
                }
            }
        }
        let Some(slot) = slot else {
            crate::network::unbind_netns(&netns);
            return Err(NatError::Exhausted);
        };
        let network = Self {
            dir: dir.to_owned(),
            slot,
        };
        // From here on, dropping `network` takes down what was made.
        let record = serde_json::to_vec(&Record { slot }).map_err(std::io::Error::other);
        record
            .and_then(|json| std::fs::write(dir.join(RECORD_FILE), json))
            .map_err(|e| NatError::Record(dir.join(RECORD_FILE), e))?;
        network.configure(&mut host, published, egress)?;
        Ok(network)
    }

    fn configure(
        &self,
        host: &mut Netlink,
        published: &[Publish],
        egress: Option<&Egress>,
    ) -> Result<(), NatError> {
        let slot = self.slot;
        let link = host
            .link_by_name(&host_link(slot))?
            .ok_or(NatError::Exhausted)?;
        host.add_address(
            link.index,
            IpNet {
                addr: IpAddr::V4(address(slot, 1)),
                prefix: 30,
            },
        )?;
        host.set_up(link.index, None)?;
        let netns = self.netns();
        crate::network::in_netns(&netns, |netlink| {
            let inside = |netlink: &mut Netlink| -> Result<(), NetlinkError> {
                for l in netlink.links()? {
                    if l.loopback || l.name == "eth0" {
                        netlink.set_up(l.index, None)?;
                    }
                    if l.name == "eth0" {
                        let addr = IpAddr::V4(address(slot, 2));
                        netlink.add_address(l.index, IpNet { addr, prefix: 30 })?;
                        let gateway = Some(IpAddr::V4(address(slot, 1)));
                        let link = l.index;
                        netlink.add_route(&Route {
                            dest: None,
                            gateway,
                            link,
                        })?;
                    }
                }
                Ok(())
            };
            inside(netlink).map_err(|e| crate::network::NetworkError::Netlink(netns.clone(), e))
        })
        .map_err(|e| NatError::Inside(Box::new(e)))?;
        let forward = "/proc/sys/net/ipv4/ip_forward";
        if std::fs::read_to_string(forward).is_ok_and(|v| v.trim() != "1") {
            std::fs::write(forward, "1")
                .map_err(|e| NatError::Nft(format!("cannot turn on IPv4 forwarding: {e}")))?;
        }
        let name = host_link(slot);
        let mut script = TABLE_SCRIPT.to_owned();
        script.push_str(&format!(
            "add rule ip {TABLE} postrouting ip saddr {}/30 oifname != \"{name}\" masquerade comment \"{name}\"\n",
            address(slot, 0)
        ));
        for p in published {
            let proto = if p.udp { "udp" } else { "tcp" };
            script.push_str(&format!(
                "add rule ip {TABLE} prerouting {proto} dport {} dnat to {}:{} comment \"{name}\"\n",
                p.host,
                address(slot, 2),
                p.guest
            ));
        }
        script.push_str(&filter_rules(&name, egress));
        nft(&script)?;
        Ok(())
    }

    /// The run's network namespace, for [`crate::network::wire`].
    pub fn netns(&self) -> PathBuf {
        self.dir.join(NETNS_FILE)
    }

    /// The workload's address.
    pub fn guest_address(&self) -> Ipv4Addr {
        address(self.slot, 2)
    }
}

/// Removes the rules whose comment is `name` from capsid's table.
fn remove_rules(name: &str) -> Result<(), NatError> {
    // With its rules' handles (`-a`, which `nft -f` ignores for listings).
    let listing = Command::new("nft")
        .args(["-a", "list", "table", "ip", TABLE])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let listing = match listing {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).into_owned()
        }
        // No table (or no nft): nothing of ours.
        _ => return Ok(()),
    };
    let script = deletions(&listing, name);
    if !script.is_empty() {
        nft(&script)?;
    }
    Ok(())
}

/// The `delete rule` commands for the rules of `listing` (`nft -a list
/// table`) whose comment is `name`.
fn deletions(listing: &str, name: &str) -> String {
    let mut chain = "";
    let mut script = String::new();
    let tag = format!("comment \"{name}\"");
    for line in listing.lines() {
        let line = line.trim();
        // `chain postrouting { # handle 2`
        if let Some(rest) = line.strip_prefix("chain ") {
            chain = rest.split_whitespace().next().unwrap_or_default();
        } else if line.contains(&tag)
            && let Some((_, handle)) = line.rsplit_once("# handle ")
        {
            script.push_str(&format!("delete rule ip {TABLE} {chain} handle {handle}\n"));
        }
    }
    script
}

fn take_down(dir: &Path, slot: u32) {
    let name = host_link(slot);
    if let Err(e) = remove_rules(&name) {
        log::warn!("cannot remove the nftables rules of {name}: {e}");
    }
    match Netlink::new().and_then(|mut host| {
        if let Some(link) = host.link_by_name(&name)? {
            host.del_link(link.index)?;
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => log::warn!("cannot remove {name}: {e}"),
    }
    crate::network::unbind_netns(&dir.join(NETNS_FILE));
    let _ = std::fs::remove_file(dir.join(RECORD_FILE));
}

impl Drop for NatNetwork {
    fn drop(&mut self) {
        take_down(&self.dir, self.slot);
    }
}

/// Takes down the network a run that died recorded in its directory `dir`
/// (called before the directory is removed: its namespace is bound there).
pub fn sweep_dir(dir: &Path) {
    let record = std::fs::read(dir.join(RECORD_FILE))
        .ok()
        .and_then(|json| serde_json::from_slice::<Record>(&json).ok());
    match record {
        Some(Record { slot }) if slot < SLOTS => take_down(dir, slot),
        _ => crate::network::unbind_netns(&dir.join(NETNS_FILE)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_parse_and_a_bad_one_says_what_is_expected() {
        assert_eq!(
            "8080:80".parse::<Publish>(),
            Ok(Publish {
                host: 8080,
                guest: 80,
                udp: false
            })
        );
        assert_eq!(
            "53:5353/udp".parse::<Publish>(),
            Ok(Publish {
                host: 53,
                guest: 5353,
                udp: true
            })
        );
        for bad in ["80", "0:80", "8080:80/sctp", "a:b", "70000:1"] {
            let e = bad.parse::<Publish>().unwrap_err();
            assert!(e.contains("HOST_PORT:CONTAINER_PORT"), "{e}");
        }
    }

    #[test]
    fn a_runs_rules_are_found_by_their_comment_in_each_chain() {
        let listing = "table ip capsid { # handle 7
\tchain postrouting { # handle 1
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 10.240.0.0/30 oifname != \"capsid-n0\" masquerade comment \"capsid-n0\" # handle 3
\t\tip saddr 10.240.0.4/30 oifname != \"capsid-n1\" masquerade comment \"capsid-n1\" # handle 4
\t}
\tchain prerouting { # handle 2
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\ttcp dport 8080 dnat to 10.240.0.2:80 comment \"capsid-n0\" # handle 5
\t}
}
";
        assert_eq!(
            deletions(listing, "capsid-n0"),
            "delete rule ip capsid postrouting handle 3\ndelete rule ip capsid prerouting handle 5\n"
        );
        assert_eq!(deletions(listing, "capsid-n2"), "");
    }

    #[test]
    fn egress_lists_parse_to_networks_and_a_bad_one_says_what_is_expected() {
        let egress: Egress = "allow=10.1.2.3/8:443,192.0.2.7".parse().unwrap();
        assert_eq!(
            egress.allow,
            [
                Allowed {
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                    prefix: 8,
                    port: Some(443)
                },
                Allowed {
                    addr: Ipv4Addr::new(192, 0, 2, 7),
                    prefix: 32,
                    port: None
                },
            ]
        );
        let all: Egress = "allow=0.0.0.0/0".parse().unwrap();
        assert_eq!(all.allow[0].prefix, 0);
        for bad in [
            "10.0.0.0/8",
            "allow=",
            "allow=10.0.0.0/33",
            "allow=host:80",
            "allow=1.2.3.4:0",
        ] {
            assert!(bad.parse::<Egress>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_filter_refuses_metadata_always_and_all_but_the_allowed_with_egress() {
        let open = filter_rules("capsid-n7", None);
        assert!(open.contains(
            "add rule ip capsid forward iifname \"capsid-n7\" ip daddr 169.254.0.0/16 drop comment \"capsid-n7\""
        ));
        assert!(
            !open.lines().any(|l| l.contains("\" drop comment")),
            "{open}"
        );
        let egress: Egress = "allow=10.240.0.0/16:8080".parse().unwrap();
        let closed = filter_rules("capsid-n7", Some(&egress));
        for chain in ["input", "forward"] {
            let lines: Vec<&str> = closed
                .lines()
                .filter(|l| l.contains(&format!("capsid {chain} ")))
                .collect();
            assert_eq!(lines.len(), 4, "{closed}");
            assert!(lines[0].contains("ct state established,related accept"));
            assert!(
                lines[1].contains(
                    "ip daddr 10.240.0.0/16 meta l4proto { tcp, udp } th dport 8080 accept"
                )
            );
            assert!(lines[2].contains("169.254.0.0/16 drop"));
            assert!(
                lines[3].contains("iifname \"capsid-n7\" drop comment"),
                "{}",
                lines[3]
            );
        }
    }

    #[test]
    fn each_slot_is_a_slash_30_of_the_subnet() {
        assert_eq!(address(0, 1), Ipv4Addr::new(10, 240, 0, 1));
        assert_eq!(address(0, 2), Ipv4Addr::new(10, 240, 0, 2));
        assert_eq!(address(64, 2), Ipv4Addr::new(10, 240, 1, 2));
        assert_eq!(address(SLOTS - 1, 2), Ipv4Addr::new(10, 240, 255, 254));
        assert_eq!(host_link(SLOTS - 1).len(), 13, "within IFNAMSIZ");
    }
}
