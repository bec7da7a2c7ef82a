//! A small synchronous rtnetlink client: what capsid needs to wire a
//! sandbox's network. On the host, inside the sandbox's network namespace,
//! it reads the interface CNI made (its MAC, MTU, addresses and routes) and
//! redirects its traffic to and from the tap the VMM serves (an ingress
//! qdisc on each, and a u32 filter matching every frame whose `mirred`
//! action sends it out through the other: Kata's `tcfilter`). In the guest, the agent
//! gives the interfaces what the host read.
//!
//! One request at a time on one socket, each answered within a deadline;
//! messages are built and parsed with `netlink-packet-route`, and only
//! answers to our own sequence number count. The socket belongs to the
//! network namespace of the thread that made it.

#![warn(missing_docs)]

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long the kernel has to answer one request.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The most messages one answer may hold (a dump of every link, address
/// or route of a namespace is far below).
const MAX_MESSAGES: usize = 4096;
/// `ETH_P_ALL`, in network byte order, as a filter's protocol.
const ETH_P_ALL_BE: u16 = 0x0003_u16.to_be();
/// The priority of the redirect filter.
const FILTER_PRIORITY: u32 = 1;

/// A request the kernel refused or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket cannot be made.
    #[error("cannot open a netlink socket")]
    Socket(#[source] io::Error),
    /// The request cannot be sent, or its answer read.
    #[error("netlink {0}: the kernel did not answer")]
    Io(&'static str, #[source] io::Error),
    /// The kernel refused the request.
    #[error("netlink {0} refused")]
    Refused(&'static str, #[source] io::Error),
    /// The answer does not parse.
    #[error("netlink {0}: cannot parse the answer: {1}")]
    Decode(&'static str, String),
    /// The answer is larger than any we expect.
    #[error("netlink {0}: the answer has more than {MAX_MESSAGES} messages")]
    TooLong(&'static str),
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its hardware address, when it is an Ethernet one.
    pub mac: Option<[u8; 6]>,
    /// Its MTU.
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// The loopback interface.
    pub loopback: bool,
    /// Its kind (`veth`, `tun`, `bridge` …), when it has one.
    pub kind: Option<String>,
}

/// An address with its prefix length (`10.88.0.5/16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

/// A route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Where it leads; `None` is the default route.
    pub dest: Option<IpNet>,
    /// Through which router; `None` for a directly reachable network.
    pub gateway: Option<IpAddr>,
    /// Out through which interface.
    pub link: u32,
}

/// A netlink route socket in the calling thread's network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens the socket, in the network namespace of the calling thread.
    pub fn new() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        let timeout = libc::timeval {
            tv_sec: libc::time_t::try_from(ANSWER_WITHIN.as_secs()).unwrap_or(5),
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which `timeout` is.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(0),
            )
        };
        if rc != 0 {
            return Err(NetlinkError::Socket(io::Error::last_os_error()));
        }
        Ok(Self {
            socket,
            sequence: 0,
            buf: vec![0; 64 << 10],
        })
    }

    /// Sends `message` and collects what answers it: the messages of a dump
    /// (`NLM_F_DUMP`), or nothing but the kernel's acknowledgement.
    fn request(
        &mut self,
        what: &'static str,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(header, NetlinkPayload::from(message));
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket
            .send(&bytes, 0)
            .map_err(|e| NetlinkError::Io(what, e))?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut answers = Vec::new();
        loop {
            self.buf.clear();
            let n = self
                .socket
                .recv(&mut self.buf, 0)
                .map_err(|e| NetlinkError::Io(what, e))?;
            let mut at = 0;
            while at < n {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..n])
                    .map_err(|e| NetlinkError::Decode(what, e.to_string()))?;
                let len = usize::try_from(message.header.length).unwrap_or(0);
                if len == 0 {
                    return Err(NetlinkError::Decode(what, "a message of length 0".into()));
                }
                at += len;
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) => {
                        return match error.code {
                            None => Ok(answers),
                            Some(code) => Err(NetlinkError::Refused(
                                what,
                                io::Error::from_raw_os_error(-code.get()),
                            )),
                        };
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        if answers.len() >= MAX_MESSAGES {
                            return Err(NetlinkError::TooLong(what));
                        }
                        answers.push(inner);
                    }
                    _ => {}
                }
            }
            if !dump && answers.is_empty() && at == 0 {
                return Err(NetlinkError::Decode(what, "an empty answer".into()));
            }
        }
    }

    /// Every interface of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>> {
        let answers = self.request(
            "list links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|message| match message {
                RouteNetlinkMessage::NewLink(link) => Some(link_of(link)),
                _ => None,
            })
            .collect())
    }

    /// The interface named `name`, if there is one.
    pub fn link_by_name(&mut self, name: &str) -> Result<Option<Link>> {
        Ok(self.links()?.into_iter().find(|link| link.name == name))
    }

    /// The addresses of interface `link` that reach beyond it (scope
    /// universe: not the IPv6 link-local ones).
    pub fn addresses(&mut self, link: u32) -> Result<Vec<IpNet>> {
        let answers = self.request(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
        )?;
        Ok(answers
            .into_iter()
            .filter_map(|message| match message {
                RouteNetlinkMessage::NewAddress(address)
                    if address.header.index == link
                        && address.header.scope == AddressScope::Universe =>
                {
                    let prefix = address.header.prefix_len;
                    address.attributes.into_iter().find_map(|a| match a {
                        AddressAttribute::Address(addr) => Some(IpNet { addr, prefix }),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// The routes of the main table out through interface `link`, but
    /// those the kernel made for the interface's own addresses.
    pub fn routes(&mut self, link: u32) -> Result<Vec<Route>> {
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let answers = self.request(
                "list routes",
                RouteNetlinkMessage::GetRoute(query),
                NLM_F_DUMP,
            )?;
            routes.extend(answers.into_iter().filter_map(|message| match message {
                RouteNetlinkMessage::NewRoute(route) => route_of(route, link),
                _ => None,
            }));
        }
        Ok(routes)
    }

    /// Sets interface `link` up, with `mtu` when given.
    pub fn set_up(&mut self, link: u32, mtu: Option<u32>) -> Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = link;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        if let Some(mtu) = mtu {
            message.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(
            "set a link up",
            RouteNetlinkMessage::SetLink(message),
            NLM_F_ACK,
        )?;
        Ok(())
    }

    /// Makes a veth pair, `name` here and `peer` in the network namespace
    /// open at `peer_netns` (here when `None`).
    pub fn add_veth(
        &mut self,
        name: &str,
        peer: &str,
        peer_netns: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<()> {
        let mut peer_message = LinkMessage::default();
        peer_message
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        if let Some(fd) = peer_netns {
            peer_message
                .attributes
                .push(LinkAttribute::NetNsFd(fd.as_raw_fd()));
        }
        let mut message = LinkMessage::default();
        message
            .attributes
            .push(LinkAttribute::IfName(name.to_owned()));
        message.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_message))),
        ]));
        self.request(
            "add a veth pair",
            RouteNetlinkMessage::NewLink(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes interface `link` (and a veth's peer with it).
    pub fn del_link(&mut self, link: u32) -> Result<()> {
        let mut message = LinkMessage::default();
        message.header.index = link;
        self.request(
            "remove a link",
            RouteNetlinkMessage::DelLink(message),
            NLM_F_ACK,
        )?;
        Ok(())
    }

    /// Gives interface `link` the address `net`.
    pub fn add_address(&mut self, link: u32, net: IpNet) -> Result<()> {
        let mut message = AddressMessage::default();
        message.header.family = family_of(net.addr);
        message.header.prefix_len = net.prefix;
        message.header.index = link;
        message.attributes.push(AddressAttribute::Local(net.addr));
        message.attributes.push(AddressAttribute::Address(net.addr));
        self.request(
            "add an address",
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Adds `route` to the main table.
    pub fn add_route(&mut self, route: &Route) -> Result<()> {
        let mut message = RouteMessage::default();
        let family = route
            .dest
            .map(|d| d.addr)
            .or(route.gateway)
            .map_or(AddressFamily::Inet, family_of);
        message.header.address_family = family;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.kind = RouteType::Unicast;
        message.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some(dest) = route.dest {
            message.header.destination_prefix_length = dest.prefix;
            message
                .attributes
                .push(RouteAttribute::Destination(route_address(dest.addr)));
        }
        if let Some(gateway) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(route_address(gateway)));
        }
        message.attributes.push(RouteAttribute::Oif(route.link));
        self.request(
            "add a route",
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Adds an ingress qdisc to interface `link`.
    pub fn add_ingress_qdisc(&mut self, link: u32) -> Result<()> {
        self.request(
            "add an ingress qdisc",
            RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(link)?),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes interface `link`'s ingress qdisc and its filters.
    pub fn del_ingress_qdisc(&mut self, link: u32) -> Result<()> {
        self.request(
            "remove an ingress qdisc",
            RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(link)?),
            NLM_F_ACK,
        )?;
        Ok(())
    }

    /// Sends every frame that arrives on interface `from` out through
    /// interface `to` (`from` needs an ingress qdisc).
    pub fn redirect(&mut self, from: u32, to: u32) -> Result<()> {
        let mut mirror = TcMirror::default();
        mirror.generic = TcActionGeneric::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.tab = 1;
        action.attributes = vec![
            TcActionAttribute::Kind("mirred".into()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut message = TcMessage::default();
        message.header.index = index_of(from)?;
        message.header.parent = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        message.header.info = (FILTER_PRIORITY << 16) | u32::from(ETH_P_ALL_BE);
        // A u32 filter with one key that matches any bytes (mask 0): the
        // classifier every kernel we meet has (`matchall` is not always built).
        let mut selector = TcU32Selector::default();
        selector.flags = TcU32SelectorFlags::Terminal;
        selector.nkeys = 1;
        selector.keys = vec![TcU32Key::default()];
        message.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ];
        self.request(
            "add a redirect filter",
            RouteNetlinkMessage::NewTrafficFilter(message),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

fn index_of(link: u32) -> Result<i32> {
    i32::try_from(link).map_err(|_| {
        NetlinkError::Refused(
            "address an interface",
            io::Error::from_raw_os_error(libc::EINVAL),
        )
    })
}

fn ingress_qdisc(link: u32) -> Result<TcMessage> {
    let mut message = TcMessage::default();
    message.header.index = index_of(link)?;
    message.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    message.header.parent = TcHandle::INGRESS;
    message.attributes = vec![TcAttribute::Kind("ingress".into())];
    Ok(message)
}

fn family_of(addr: IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

fn route_address(addr: IpAddr) -> RouteAddress {
    match addr {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

fn link_of(message: LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: message.header.flags.contains(LinkFlags::Up),
        loopback: message.header.flags.contains(LinkFlags::Loopback),
        kind: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Address(bytes) => link.mac = <[u8; 6]>::try_from(bytes).ok(),
            LinkAttribute::Mtu(mtu) => link.mtu = mtu,
            LinkAttribute::LinkInfo(infos) => {
                link.kind = infos.into_iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind_name(&kind)),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    link
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Veth => "veth".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Bridge => "bridge".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A route worth giving the guest: main table, unicast, out through `link`,
/// not one the kernel derives from an address.
fn route_of(message: RouteMessage, link: u32) -> Option<Route> {
    let header = &message.header;
    if header.table != RouteHeader::RT_TABLE_MAIN
        || header.kind != RouteType::Unicast
        || header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let prefix = header.destination_prefix_length;
    let mut route = Route {
        dest: None,
        gateway: None,
        link: 0,
    };
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Destination(dest) => {
                route.dest = ip_of(dest).map(|addr| IpNet { addr, prefix });
            }
            RouteAttribute::Gateway(gateway) => route.gateway = ip_of(gateway),
            RouteAttribute::Oif(oif) => route.link = *oif,
            _ => {}
        }
    }
    // An IPv6 link-local route (fe80::/64) is the guest kernel's own.
    let link_local =
        matches!(route.dest, Some(IpNet { addr: IpAddr::V6(a), .. }) if a.is_unicast_link_local());
    (route.link == link && !link_local).then_some(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// Runs `test` on a thread of its own in a fresh network namespace
    /// (namespaces are per thread); false when this process may not.
    fn in_new_netns(test: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            // SAFETY: unshare with a namespace flag changes only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                println!(
                    "skipped: cannot make a network namespace: {}",
                    io::Error::last_os_error()
                );
                return false;
            }
            test();
            true
        })
        .join()
        .unwrap()
    }

    /// A tap with virtio headers, as the runtime makes them.
    fn tap(name: &str) -> OwnedFd {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src.cast_signed();
        }
        ifr.ifr_ifru.ifru_flags =
            i16::try_from(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR).unwrap();
        // SAFETY: a NUL-terminated path and flags; the result is checked.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(raw >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `raw` was just opened and is ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: TUNSETIFF reads one ifreq, which `ifr` is.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &ifr) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        fd
    }

    #[test]
    fn links_addresses_routes_and_a_redirect_round_trip_through_the_kernel() {
        in_new_netns(|| {
            let mut netlink = Netlink::new().unwrap();
            let links = netlink.links().unwrap();
            let lo = links.iter().find(|l| l.loopback).expect("lo");
            assert_eq!(lo.name, "lo");
            assert!(!lo.up, "a fresh namespace's lo is down");
            netlink.set_up(lo.index, None).unwrap();

            let (tap_a, tap_b) = (tap("nlt-a"), tap("nlt-b"));
            let a = netlink.link_by_name("nlt-a").unwrap().unwrap();
            let b = netlink.link_by_name("nlt-b").unwrap().unwrap();
            assert_eq!(a.kind.as_deref(), Some("tun"));
            assert!(a.mac.is_some());
            netlink.set_up(a.index, Some(1400)).unwrap();
            let net = IpNet {
                addr: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
                prefix: 24,
            };
            netlink.add_address(a.index, net).unwrap();
            assert_eq!(netlink.addresses(a.index).unwrap(), vec![net]);
            assert_eq!(netlink.link_by_name("nlt-a").unwrap().unwrap().mtu, 1400);
            let default = Route {
                dest: None,
                gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 1))),
                link: a.index,
            };
            let other = Route {
                dest: Some(IpNet {
                    addr: IpAddr::V4(Ipv4Addr::new(192, 168, 7, 0)),
                    prefix: 24,
                }),
                gateway: None,
                link: a.index,
            };
            netlink.add_route(&default).unwrap();
            netlink.add_route(&other).unwrap();
            let routes = netlink.routes(a.index).unwrap();
            assert!(
                routes.contains(&default) && routes.contains(&other),
                "{routes:?}"
            );
            assert_eq!(
                routes.len(),
                2,
                "the kernel's own 10.1.2.0/24 is left out: {routes:?}"
            );
            // The same address twice is refused, with the kernel's reason.
            let e = netlink.add_address(a.index, net).unwrap_err();
            assert!(e.to_string().contains("add an address refused"), "{e}");

            netlink.add_ingress_qdisc(a.index).unwrap();
            netlink.add_ingress_qdisc(b.index).unwrap();
            netlink.redirect(a.index, b.index).unwrap();
            netlink.redirect(b.index, a.index).unwrap();
            netlink.set_up(b.index, None).unwrap();
            // A frame that enters through one tap leaves through the other,
            // whole: a 10-byte virtio header (the taps' default), then an
            // Ethernet frame to nobody in particular.
            let mut frame = vec![0u8; 10];
            frame.extend([0x02, 0, 0, 0, 0, 0x0b, 0x02, 0, 0, 0, 0, 0x0a, 0x88, 0xb5]);
            frame.extend(b"through the redirect");
            // SAFETY: `frame` is valid for reads of its length.
            let n = unsafe { libc::write(tap_a.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            assert_eq!(
                usize::try_from(n).ok(),
                Some(frame.len()),
                "{}",
                io::Error::last_os_error()
            );
            let mut got = vec![0u8; 256];
            let mut poll = libc::pollfd {
                fd: tap_b.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut poll, 1, 5000) };
            assert_eq!(ready, 1, "nothing came out of the other tap");
            // SAFETY: `got` is valid for writes of its length.
            let n = unsafe { libc::read(tap_b.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
            assert_eq!(&got[10..usize::try_from(n).unwrap()], &frame[10..]);
            netlink.del_ingress_qdisc(a.index).unwrap();
            netlink.del_ingress_qdisc(b.index).unwrap();
            assert!(netlink.del_ingress_qdisc(b.index).is_err(), "already gone");
        });
    }
}
