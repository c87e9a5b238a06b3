//! The host's half of a pod attachment, shared by the CNI plugin (at ADD) and the node agent
//! (which repairs drift): a route and a permanent neighbour entry per pod address on the
//! host-side veth, so the host needs no ARP/NDP towards its pods.

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
