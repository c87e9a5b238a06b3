//! The workloads manager: the host side of local pods (a route and a permanent neighbour per
//! pod address on the host-side veth, see [`crate::workload`]). The CNI plugin programs them
//! at ADD; this repairs what went missing. A pod whose veth is gone is being deleted (or
//! leaked, for garbage collection): nothing to repair.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use malla_api::WorkloadEndpoint;
use malla_calc::NodeDataplane;

use crate::driver::{ApplyStats, DriverError};
use crate::netlink::{Link, Netlink};
use crate::MALLA_ROUTE_PROTOCOL;

/// Owns the host side of local pods.
pub struct WorkloadsManager;

impl WorkloadsManager {
    /// Re-programs the host side of every local pod whose routes are missing.
    pub async fn sync(
        &self,
        nl: &Netlink,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        self.repair(nl, &want.local_endpoints, stats).await
    }

    /// Re-programs the host side of those of `endpoints` whose routes are missing (a pod the
    /// CNI plugin just added has them: nothing is changed).
    pub async fn repair(
        &self,
        nl: &Netlink,
        endpoints: &[WorkloadEndpoint],
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        if endpoints.is_empty() {
            return Ok(());
        }
        let routes: BTreeSet<(ipnet::IpNet, u32)> = nl
            .routes_with_protocol(MALLA_ROUTE_PROTOCOL)
            .await?
            .into_iter()
            .map(|r| (r.dst, r.oif))
            .collect();
        let links: BTreeMap<String, Link> = nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        for ep in endpoints {
            let Some(veth) = links.get(&ep.host_ifname) else {
                continue;
            };
            let missing = ep.ips.iter().any(|ip| !routes.contains(&(*ip, veth.index)));
            if missing {
                let Some(mac) = malla_api::parse_mac(&ep.mac) else {
                    continue;
                };
                let addrs: Vec<IpAddr> = ep.addrs().collect();
                crate::workload::program_host_side(nl, veth.index, &addrs, mac).await?;
                stats.pods_repaired += 1;
            }
        }
        Ok(())
    }
}
