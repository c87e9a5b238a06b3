//! The pod side of an attachment: a veth pair with one end in the pod's namespace as
//! `CNI_IFNAME`, the pod's /32 and /128 addresses, a default route via a static link-local
//! gateway, and on the host a route plus a permanent neighbour entry per pod address.

use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::{ClusterConfig, Node, RoutingMode, VXLAN_OVERHEAD};
use malla_dataplane::netlink::{Neighbour, Netlink, NetlinkError, Route};
use malla_dataplane::netns::NetNs;
use malla_dataplane::{HOST_VETH_MAC, POD_GATEWAY_V4, POD_GATEWAY_V6};

use crate::error::{self, CniError};

/// Prefix of every host-side pod veth (`mla` + 11 hex digits of a hash).
pub const HOST_IFNAME_PREFIX: &str = "mla";

/// The host-side veth name of an attachment: stable, so DEL finds it without the datastore.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([b'/']).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{HOST_IFNAME_PREFIX}{:011x}", h & 0xfff_ffff_ffff)
}

/// The pod MTU: the underlay's, less the encapsulation overhead in VXLAN mode.
pub fn pod_mtu(node: &Node, cluster: &ClusterConfig) -> u32 {
    let base = if node.underlay_mtu == 0 {
        1500
    } else {
        node.underlay_mtu
    };
    match cluster.routing {
        RoutingMode::Direct | RoutingMode::Bgp => base,
        RoutingMode::Vxlan => base - VXLAN_OVERHEAD,
    }
}

pub struct WireRequest {
    pub netns: String,
    pub ifname: String,
    pub host_ifname: String,
    pub addrs: Vec<IpAddr>,
    pub mtu: u32,
    /// The `mac` capability: the pod interface's MAC, if the runtime chose one.
    pub mac: Option<[u8; 6]>,
}

/// What was built, for the result.
pub struct Wired {
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
}

fn nl_err(e: NetlinkError) -> CniError {
    CniError::new(error::IO_FAILURE, "netlink", e.to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(error::IO_FAILURE, "tokio runtime", e.to_string()))
}

/// Why [`wire`] failed, and whether it had created the host veth by then (the caller removes
/// it then, and only then: a veth it did not create may be a live attachment's).
#[derive(Debug)]
pub struct WireFailure {
    pub error: CniError,
    pub created_veth: bool,
}

impl From<CniError> for WireFailure {
    fn from(error: CniError) -> Self {
        WireFailure {
            error,
            created_veth: false,
        }
    }
}

/// Builds the attachment.
pub fn wire(req: &WireRequest) -> Result<Wired, WireFailure> {
    let ns = NetNs::open(&req.netns).map_err(|e| {
        CniError::new(
            error::UNKNOWN_CONTAINER,
            "cannot open the pod's network namespace",
            e.to_string(),
        )
    })?;
    let mut created_veth = false;
    let result = runtime()?.block_on(async {
        let host = Netlink::connect().map_err(nl_err)?;
        let pod = Netlink::connect_in(&ns).map_err(nl_err)?;
        if pod
            .link_by_name(&req.ifname)
            .await
            .map_err(nl_err)?
            .is_some()
        {
            return Err(CniError::new(
                error::INVALID_CONFIG,
                format!(
                    "interface {} already exists in the pod's namespace",
                    req.ifname
                ),
                req.netns.clone(),
            ));
        }
        if let Some(stale) = host.link_by_name(&req.host_ifname).await.map_err(nl_err)? {
            // A leftover of an earlier ADD of this very attachment that was cut short.
            host.delete_link(stale.index).await.map_err(nl_err)?;
        }
        host.create_veth_into(
            &req.host_ifname,
            Some(HOST_VETH_MAC),
            &req.ifname,
            &ns,
            req.mac,
            req.mtu,
        )
        .await
        .map_err(nl_err)?;
        created_veth = true;
        let eth = pod
            .link_by_name(&req.ifname)
            .await
            .map_err(nl_err)?
            .ok_or_else(|| {
                CniError::new(
                    error::IO_FAILURE,
                    "pod interface missing after creation",
                    req.ifname.clone(),
                )
            })?;
        pod.set_up(eth.index).await.map_err(nl_err)?;
        for addr in &req.addrs {
            pod.add_address(eth.index, IpNet::from(*addr), true)
                .await
                .map_err(nl_err)?;
        }
        for gw in gateways(&req.addrs) {
            pod.replace_neighbour(&Neighbour {
                ifindex: eth.index,
                ip: gw,
                mac: HOST_VETH_MAC,
            })
            .await
            .map_err(nl_err)?;
            let default: IpNet = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" }
                .parse()
                .map_err(|_| CniError::new(error::IO_FAILURE, "default route", ""))?;
            pod.add_route_unowned(&Route {
                dst: default,
                gateway: Some(gw),
                oif: eth.index,
                onlink: true,
                scope_link: false,
            })
            .await
            .map_err(nl_err)?;
        }
        let pod_mac = req.mac.or(eth.mac).unwrap_or_default();

        let veth = host
            .link_by_name(&req.host_ifname)
            .await
            .map_err(nl_err)?
            .ok_or_else(|| {
                CniError::new(
                    error::IO_FAILURE,
                    "host veth missing",
                    req.host_ifname.clone(),
                )
            })?;
        host.set_up(veth.index).await.map_err(nl_err)?;
        malla_dataplane::workload::program_host_side(&host, veth.index, &req.addrs, pod_mac)
            .await
            .map_err(nl_err)?;
        // Best effort: without the agent's table there is nothing to let through yet. With it
        // (anti-spoofing is on) the kernel checks the veth's IPv4 sources before the pod runs;
        // the agent loosens that for a pod with allowed prefixes once its chain holds them.
        if malla_dataplane::workload::allow_own_sources(&req.host_ifname, &req.addrs).is_ok() {
            let _ =
                malla_dataplane::sysctl::set_interface("ipv4", &req.host_ifname, "rp_filter", "1");
        }
        Ok(Wired {
            pod_mac,
            host_mac: HOST_VETH_MAC,
        })
    });
    result.map_err(|error| WireFailure {
        error,
        created_veth,
    })
}

/// The pod's gateways: one per family it has an address of.
pub fn gateways(addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if addrs.iter().any(IpAddr::is_ipv4) {
        out.push(IpAddr::V4(POD_GATEWAY_V4));
    }
    if addrs.iter().any(IpAddr::is_ipv6) {
        out.push(IpAddr::V6(POD_GATEWAY_V6));
    }
    out
}

/// Removes the host veth (its peer in the pod goes with it). Missing is fine: DEL is idempotent.
pub fn unwire(host_ifname: &str) -> Result<(), CniError> {
    runtime()?.block_on(async {
        let host = Netlink::connect().map_err(nl_err)?;
        if let Some(link) = host.link_by_name(host_ifname).await.map_err(nl_err)? {
            match host.delete_link(link.index).await {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc_enodev()) => {}
                Err(e) => return Err(nl_err(e)),
            }
        }
        Ok(())
    })
}

fn libc_enodev() -> i32 {
    19
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifname_is_stable_short_and_distinct() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("mla"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(a, host_ifname("abd", "eth0"));
    }

    #[test]
    fn mtu_subtracts_vxlan_overhead() {
        let node = Node {
            name: "a".into(),
            underlay_ipv4: None,
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: String::new(),
        };
        let mut c = ClusterConfig::default();
        assert_eq!(pod_mtu(&node, &c), 1500);
        c.routing = RoutingMode::Vxlan;
        assert_eq!(pod_mtu(&node, &c), 1450);
    }
}
