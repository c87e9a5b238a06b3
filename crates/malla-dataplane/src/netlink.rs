//! A small, typed face over rtnetlink for the objects Malla owns: veth pairs, addresses,
//! routes stamped with [`MALLA_ROUTE_PROTOCOL`], static neighbours, VXLAN devices and their FDB.
//!
//! A [`Netlink`] talks to one namespace: the one its socket was opened in. [`Netlink::connect_in`]
//! opens the socket on a short-lived thread inside the target namespace, so the caller's threads
//! never switch namespaces.

use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::netns::{NetNs, NetnsError};
use crate::MALLA_ROUTE_PROTOCOL;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{op}: {source}")]
    Request {
        op: String,
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl NetlinkError {
    /// The errno the kernel answered with, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

fn req(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

/// What Malla needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    pub up: bool,
    /// `veth`, `vxlan`, `bridge`, … when the kernel says.
    pub kind: Option<String>,
}

/// A route in the main table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    pub oif: u32,
    pub onlink: bool,
    /// `scope link` (a directly attached destination) instead of `scope global`.
    pub scope_link: bool,
}

/// A permanent neighbour (ARP/NDP) entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// A VXLAN forwarding entry: frames for `mac` go to the tunnel endpoint `dst`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// Parameters of a node's VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: std::net::Ipv4Addr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
}

/// A netlink connection to one namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Connects to the calling thread's namespace. Needs a tokio runtime context.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Connects to `ns`: the socket is opened on a thread inside it, then served here.
    pub fn connect_in(ns: &NetNs) -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = ns
            .run(move || {
                let _guard = rt.enter();
                rtnetlink::new_connection().map(|(c, h, _)| (c, h))
            })?
            .map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("list links"))?;
        Ok(msgs.iter().map(link_from_message).collect())
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, NetlinkError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match s.try_next().await {
            Ok(m) => Ok(m.as_ref().map(link_from_message)),
            Err(e) => {
                let err = NetlinkError::Request {
                    op: format!("get link {name}"),
                    source: e,
                };
                if err.errno() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(err)
                }
            }
        }
    }

    /// Creates a veth pair whose peer is born inside `peer_ns` (one netlink request: no
    /// create-then-move, which costs the kernel a second device registration).
    pub async fn create_veth_into(
        &self,
        name: &str,
        mac: Option<[u8; 6]>,
        peer: &str,
        peer_ns: &NetNs,
        peer_mac: Option<[u8; 6]>,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
        use rtnetlink::LinkMessageBuilder;
        let mut peer_msg = LinkUnspec::new_with_name(peer)
            .mtu(mtu)
            .setns_by_fd(peer_ns.file().as_raw_fd());
        if let Some(m) = peer_mac {
            peer_msg = peer_msg.address(m.to_vec());
        }
        let mut b = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(name.to_string())
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg.build())));
        if let Some(m) = mac {
            b = b.address(m.to_vec());
        }
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(req(format!(
                "create veth {name} with {peer} in {}",
                peer_ns.path().display()
            )))
    }

    pub async fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(req(format!("set link {index} up")))
    }

    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(req(format!("delete link {index}")))
    }

    /// Adds an address; `nodad` skips IPv6 duplicate address detection (the address is ours).
    pub async fn add_address(
        &self,
        index: u32,
        addr: IpNet,
        nodad: bool,
    ) -> Result<(), NetlinkError> {
        let mut r = self
            .handle
            .address()
            .add(index, addr.addr(), addr.prefix_len())
            .replace();
        if nodad && addr.addr().is_ipv6() {
            r.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        r.execute()
            .await
            .map_err(req(format!("add address {addr} to link {index}")))
    }

    /// Addresses on a link.
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req("list addresses"))?;
        let mut out = Vec::new();
        for m in msgs {
            for a in &m.attributes {
                if let AddressAttribute::Address(ip) = a {
                    if let Ok(net) = IpNet::new(*ip, m.header.prefix_len) {
                        out.push(net);
                    }
                }
            }
        }
        Ok(out)
    }

    fn route_message(&self, route: &Route, protocol: u8) -> Result<RouteMessage, NetlinkError> {
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(route.dst.addr(), route.dst.prefix_len())
            .map_err(invalid)?
            .output_interface(route.oif)
            .protocol(RouteProtocol::from(protocol))
            .scope(if route.scope_link {
                RouteScope::Link
            } else {
                RouteScope::Universe
            });
        if let Some(gw) = route.gateway {
            b = b.gateway(gw).map_err(invalid)?;
        }
        if route.onlink {
            b = b.onlink();
        }
        Ok(b.build())
    }

    /// Adds or replaces a route stamped as Malla's.
    pub async fn replace_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let msg = self.route_message(route, MALLA_ROUTE_PROTOCOL)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("replace route {}", route.dst)))
    }

    /// Adds a route with the kernel's default protocol (used for a pod's own routes, which
    /// belong to the pod, not to the node agent).
    pub async fn add_route_unowned(&self, route: &Route) -> Result<(), NetlinkError> {
        let msg = self.route_message(route, 3 /* boot, as `ip route add` */)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(req(format!("add route {}", route.dst)))
    }

    pub async fn delete_route(&self, route: &Route) -> Result<(), NetlinkError> {
        let msg = self.route_message(route, MALLA_ROUTE_PROTOCOL)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(req(format!("delete route {}", route.dst)))
    }

    /// Every route of the main table stamped with `protocol`, both families.
    pub async fn routes_with_protocol(&self, protocol: u8) -> Result<Vec<Route>, NetlinkError> {
        let msgs = self.main_table_messages(protocol).await?;
        let mut out: Vec<Route> = msgs.iter().filter_map(route_from_message).collect();
        out.sort();
        Ok(out)
    }

    /// The kernel's messages for every route of the main table stamped with `protocol`.
    async fn main_table_messages(&self, protocol: u8) -> Result<Vec<RouteMessage>, NetlinkError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(msg)
                .execute()
                .try_collect()
                .await
                .map_err(req("list routes"))?;
            out.extend(
                msgs.into_iter()
                    .filter(|m| u8::from(m.header.protocol) == protocol && m.header.table == 254),
            );
        }
        Ok(out)
    }

    /// Deletes every route of the main table stamped with `protocol` (both families, any type:
    /// blackholes too), as the kernel lists them. Returns how many it deleted. For an
    /// uninstall: [`MALLA_ROUTE_PROTOCOL`], or BIRD's when the node ran it.
    pub async fn delete_routes_with_protocol(&self, protocol: u8) -> Result<usize, NetlinkError> {
        let mut deleted = 0;
        for m in self.main_table_messages(protocol).await? {
            let done = self
                .handle
                .route()
                .del(m)
                .execute()
                .await
                .map_err(req(format!("delete a route of protocol {protocol}")));
            match done {
                Ok(()) => deleted += 1,
                // Gone meanwhile (its link deleted first): nothing to do.
                Err(e) if matches!(e.errno(), Some(libc::ESRCH) | Some(libc::ENOENT)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Adds or replaces a permanent neighbour entry.
    pub async fn replace_neighbour(&self, n: &Neighbour) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(n.ifindex, n.ip)
            .link_layer_address(&n.mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!(
                "replace neighbour {} on link {}",
                n.ip, n.ifindex
            )))
    }

    /// Permanent neighbour entries on a link (IPv4 and IPv6).
    pub async fn permanent_neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("list neighbours"))?;
        Ok(msgs
            .iter()
            .filter(|m| {
                m.header.ifindex == ifindex
                    && m.header.state == NeighbourState::Permanent
                    && matches!(m.header.family, AddressFamily::Inet | AddressFamily::Inet6)
            })
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        Some(IpAddr::V6(*v6))
                    }
                    // A bridge-family message's destination is not parsed as an address.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
                        4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                })?;
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(&l[..]).ok(),
                    _ => None,
                })?;
                Some(Neighbour {
                    ifindex: m.header.ifindex,
                    ip,
                    mac,
                })
            })
            .collect())
    }

    pub async fn delete_neighbour(&self, n: &Neighbour) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match n.ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = n.ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(match n.ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(req(format!("delete neighbour {}", n.ip)))
    }

    /// Creates a VXLAN device with learning off and no multicast group (static FDB only).
    pub async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<(), NetlinkError> {
        let msg = LinkVxlan::new(&spec.name, spec.vni)
            .dev(spec.underlay_ifindex)
            .port(spec.port)
            .local(spec.local)
            .learning(false)
            .mtu(spec.mtu)
            .address(spec.mac.to_vec())
            .up()
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(req(format!("create vxlan {}", spec.name)))
    }

    /// Adds or replaces a static FDB entry on a VXLAN device.
    pub async fn replace_fdb(&self, e: &FdbEntry) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(e.ifindex, &e.mac)
            .destination(e.dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!("replace fdb {:?} -> {}", e.mac, e.dst)))
    }

    /// FDB entries of a VXLAN device that point at a remote endpoint.
    pub async fn fdb_entries(&self, ifindex: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(req("list fdb"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == ifindex)
            .filter_map(|m| {
                let dst = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        Some(IpAddr::V6(*v6))
                    }
                    // A bridge-family message's destination is not parsed as an address.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => match b.len() {
                        4 => <[u8; 4]>::try_from(&b[..]).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(&b[..]).ok().map(IpAddr::from),
                        _ => None,
                    },
                    _ => None,
                })?;
                let mac = m.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(&l[..]).ok(),
                    _ => None,
                })?;
                Some(FdbEntry { ifindex, mac, dst })
            })
            .collect())
    }

    pub async fn delete_fdb(&self, e: &FdbEntry) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = e.ifindex;
        msg.header.flags = NeighbourFlags::Own;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(e.mac.to_vec()));
        msg.attributes
            .push(NeighbourAttribute::Destination(match e.dst {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(req("delete fdb"))
    }
}

fn invalid(e: impl std::fmt::Display) -> NetlinkError {
    NetlinkError::Invalid(e.to_string())
}

fn link_from_message(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(&mac[..]).ok(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let rtnetlink::packet_route::link::LinkInfo::Kind(k) = i {
                        link.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn route_from_message(m: &RouteMessage) -> Option<Route> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst = None;
    let mut gateway = None;
    let mut oif = 0;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Oif(i) => oif = *i,
            _ => {}
        }
    }
    let dst = match dst {
        Some(d) => IpNet::new(d, m.header.destination_prefix_length).ok()?,
        None => match m.header.address_family {
            AddressFamily::Inet6 => "::/0".parse().ok()?,
            _ => "0.0.0.0/0".parse().ok()?,
        },
    };
    Some(Route {
        dst,
        gateway,
        oif,
        onlink: m.header.flags.contains(RouteFlags::Onlink),
        scope_link: m.header.scope == RouteScope::Link,
    })
}
