//! The guest's network, as the host describes it: each virtio-net
//! interface (found by its MAC address) gets the MTU and addresses of the
//! host interface it stands for, then the routes are added; loopback is
//! brought up at boot whatever the network. Over netlink
//! (`capsid-netlink`), with no `ip` binary in the guest.
//!
//! The description comes from the host, which is trusted with the guest's
//! network but is checked all the same: bounded counts, prefixes that fit
//! their family, unicast MACs, MTUs in range, each route's interface one
//! of the described ones. It is applied once per VM.

use std::sync::atomic::{AtomicBool, Ordering};

use capsid_netlink::{IpNet, Link, Netlink, NetlinkError, Route};
use capsid_protocol::{
    MAX_ADDRESSES, MAX_INTERFACES, MAX_ROUTES, NetInterface, NetRoute, NetworkConfig,
};

/// The MTU range an interface may be given.
const MTU: std::ops::RangeInclusive<u32> = 68..=65521;

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The description is malformed.
    #[error("invalid network configuration: {0}")]
    Invalid(String),
    /// No guest interface has a MAC address the host named.
    #[error(
        "no network interface in the guest has MAC address {0} (does the VM have its virtio-net device?)"
    )]
    NoInterface(String),
    /// The network was configured already.
    #[error("the guest's network is configured already")]
    Again,
    /// A netlink request failed.
    #[error("cannot configure the guest's network")]
    Netlink(#[from] NetlinkError),
}

static CONFIGURED: AtomicBool = AtomicBool::new(false);

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Checks `config` before anything is applied.
pub fn check(config: &NetworkConfig) -> Result<(), NetworkError> {
    let invalid = |why: String| Err(NetworkError::Invalid(why));
    if config.interfaces.len() > MAX_INTERFACES || config.routes.len() > MAX_ROUTES {
        return invalid(format!(
            "{} interfaces and {} routes: at most {MAX_INTERFACES} and {MAX_ROUTES}",
            config.interfaces.len(),
            config.routes.len()
        ));
    }
    for (i, interface) in config.interfaces.iter().enumerate() {
        let NetInterface {
            name,
            mac,
            mtu,
            addresses,
        } = interface;
        if name.is_empty() || name.len() > 15 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return invalid(format!("interface name {name:?}"));
        }
        if mac[0] & 1 != 0 || *mac == [0; 6] {
            return invalid(format!(
                "{name}: MAC address {} is not unicast",
                mac_text(mac)
            ));
        }
        if config.interfaces[..i].iter().any(|other| other.mac == *mac) {
            return invalid(format!("{name}: MAC address {} given twice", mac_text(mac)));
        }
        if !MTU.contains(mtu) {
            return invalid(format!("{name}: MTU {mtu} is not within {MTU:?}"));
        }
        if addresses.len() > MAX_ADDRESSES {
            return invalid(format!("{name}: more than {MAX_ADDRESSES} addresses"));
        }
        if let Some(bad) = addresses.iter().find(|a| !a.is_valid()) {
            return invalid(format!("{name}: address {bad}"));
        }
    }
    for route in &config.routes {
        if let Some(bad) = route.dest.filter(|d| !d.is_valid()) {
            return invalid(format!("route to {bad}"));
        }
        if !config.interfaces.iter().any(|i| i.mac == route.mac) {
            return invalid(format!(
                "a route through {}, which no interface has",
                mac_text(&route.mac)
            ));
        }
    }
    Ok(())
}

/// Brings the loopback interface up (at boot: `localhost` works in every
/// guest, with or without a network).
pub fn loopback_up() -> Result<(), NetlinkError> {
    let mut netlink = Netlink::new()?;
    if let Some(lo) = netlink.links()?.into_iter().find(|l| l.loopback) {
        netlink.set_up(lo.index, None)?;
    }
    Ok(())
}

/// Checks and applies `config`, once per VM.
pub fn configure(config: &NetworkConfig) -> Result<(), NetworkError> {
    check(config)?;
    if CONFIGURED.swap(true, Ordering::SeqCst) {
        return Err(NetworkError::Again);
    }
    let outcome = apply(config);
    if outcome.is_err() {
        // Nothing was promised: the host may try again.
        CONFIGURED.store(false, Ordering::SeqCst);
    }
    outcome
}

fn apply(config: &NetworkConfig) -> Result<(), NetworkError> {
    let mut netlink = Netlink::new()?;
    let links = netlink.links()?;
    let by_mac = |mac: &[u8; 6]| -> Result<&Link, NetworkError> {
        links
            .iter()
            .find(|l| l.mac.as_ref() == Some(mac))
            .ok_or_else(|| NetworkError::NoInterface(mac_text(mac)))
    };
    for interface in &config.interfaces {
        let link = by_mac(&interface.mac)?;
        netlink.set_up(link.index, Some(interface.mtu))?;
        for address in &interface.addresses {
            netlink.add_address(
                link.index,
                IpNet {
                    addr: address.addr,
                    prefix: address.prefix,
                },
            )?;
        }
        tracing::info!(
            "network: {} ({}) has {}",
            link.name,
            interface.name,
            interface
                .addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for NetRoute { dest, gateway, mac } in &config.routes {
        let link = by_mac(mac)?;
        netlink.add_route(&Route {
            dest: dest.map(|d| IpNet {
                addr: d.addr,
                prefix: d.prefix,
            }),
            gateway: *gateway,
            link: link.index,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsid_protocol::IpNet as WireNet;

    fn good() -> NetworkConfig {
        let mac = [2, 0, 0, 0, 0, 1];
        NetworkConfig {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac,
                mtu: 1500,
                addresses: vec![WireNet {
                    addr: "10.88.0.5".parse().unwrap(),
                    prefix: 16,
                }],
            }],
            routes: vec![NetRoute {
                dest: None,
                gateway: Some("10.88.0.1".parse().unwrap()),
                mac,
            }],
        }
    }

    #[test]
    fn a_network_description_is_checked_before_anything_is_applied() {
        assert!(check(&good()).is_ok());
        let mut cases: Vec<(NetworkConfig, &str)> = Vec::new();
        let mut c = good();
        c.interfaces[0].mac = [1, 0, 0, 0, 0, 1];
        cases.push((c, "not unicast"));
        let mut c = good();
        c.interfaces[0].mtu = 20;
        cases.push((c, "MTU 20"));
        let mut c = good();
        c.interfaces[0].name = "a name far too long".into();
        cases.push((c, "interface name"));
        let mut c = good();
        c.interfaces[0].addresses[0].prefix = 33;
        cases.push((c, "10.88.0.5/33"));
        let mut c = good();
        c.routes[0].mac = [2, 0, 0, 0, 0, 9];
        cases.push((c, "which no interface has"));
        let mut c = good();
        c.interfaces.push(c.interfaces[0].clone());
        cases.push((c, "given twice"));
        let mut c = good();
        c.routes = vec![c.routes[0].clone(); MAX_ROUTES + 1];
        cases.push((c, "at most"));
        for (config, want) in cases {
            let e = check(&config).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
