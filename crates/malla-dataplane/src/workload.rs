//! The host's half of a pod attachment, shared by the CNI plugin (at ADD) and the node agent
//! (which repairs drift): a route and a permanent neighbour entry per pod address on the
//! host-side veth, so the host needs no ARP/NDP towards its pods; and the pod's own addresses
//! let through the node's anti-spoofing ([`allow_own_sources`]).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::netlink::{Neighbour, Netlink, NetlinkError, Route};

/// The host's half: a route and a permanent neighbour per pod address (no ARP/NDP needed).
/// The node agent calls this too, to repair drift.
pub async fn program_host_side(
    host: &Netlink,
    host_ifindex: u32,
    addrs: &[IpAddr],
    pod_mac: [u8; 6],
) -> Result<(), NetlinkError> {
    for addr in addrs {
        host.replace_neighbour(&Neighbour {
            ifindex: host_ifindex,
            ip: *addr,
            mac: pod_mac,
        })
        .await?;
        host.replace_route(&Route {
            dst: IpNet::from(*addr),
            gateway: None,
            oif: host_ifindex,
            onlink: false,
            scope_link: true,
        })
        .await?;
    }
    Ok(())
}

/// Lets the pod's own addresses leave its host-side veth at once: adds `host_ifname . addr`
/// to the anti-spoofing sets ([`malla_calc::guard`]) of the node's table, so a new pod works
/// before the agent learns of it (also while the datastore is away). The agent adds the same
/// entries when it does (adding what is there is no error) and removes them when the pod goes.
/// A node without the table or its sets (no agent yet, anti-spoofing off) is left alone: an
/// error, which the plugin ignores.
pub fn allow_own_sources(host_ifname: &str, addrs: &[IpAddr]) -> Result<(), crate::nft::NftError> {
    use crate::nft::elements::{self, Element, Kind, Layout, SetChange, Value};
    use malla_calc::guard::GuardEntry;
    let mut changes: Vec<SetChange> = Vec::new();
    for addr in addrs {
        let entry = GuardEntry {
            ifname: host_ifname.to_string(),
            net: IpNet::from(*addr),
            allowed: false,
        };
        let Some(key) = entry.key() else { continue };
        let kind = if addr.is_ipv4() {
            Kind::Ipv4
        } else {
            Kind::Ipv6
        };
        match changes.iter_mut().find(|c| c.set == entry.set()) {
            Some(c) => c.add.push(Element::key(key)),
            None => changes.push(SetChange {
                set: entry.set().to_string(),
                layout: Layout {
                    key: vec![Kind::Ifname, kind],
                    value: Value::None,
                },
                delete: Vec::new(),
                add: vec![Element::key(key)],
            }),
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    elements::apply(
        None,
        elements::NFPROTO_INET,
        malla_calc::masquerade::TABLE,
        &changes,
    )
}
