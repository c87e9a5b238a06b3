//! The routes manager: routes to other nodes' blocks, stamped with
//! [`crate::MALLA_ROUTE_PROTOCOL`], over the underlay (direct) or the VXLAN device. Routes of
//! that protocol it does not want are removed; others' routes are never touched.

use std::collections::{BTreeMap, BTreeSet};

use malla_calc::NodeDataplane;

use super::Underlay;
use crate::driver::{ApplyStats, DriverError};
use crate::netlink::{Link, Netlink, Route};
use crate::MALLA_ROUTE_PROTOCOL;

/// Owns the remote routes (a local pod's route belongs to
/// [`super::workloads::WorkloadsManager`]).
pub struct RoutesManager;

impl RoutesManager {
    /// Makes the remote routes what `want` says, through `vxlan` when given.
    pub async fn sync(
        &self,
        nl: &Netlink,
        underlay: &Underlay,
        vxlan: Option<&Link>,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let (oif, onlink) = match vxlan {
            Some(dev) => (dev.index, true),
            None => (underlay.link.index, false),
        };
        let desired: BTreeMap<ipnet::IpNet, Route> = want
            .remote_routes
            .iter()
            .map(|r| {
                (
                    r.dst,
                    // IPv6 next hops over VXLAN are link-local and need no on-link flag.
                    Route {
                        dst: r.dst,
                        gateway: Some(r.via),
                        oif,
                        onlink: onlink && r.dst.addr().is_ipv4(),
                        scope_link: false,
                    },
                )
            })
            .collect();
        let remote_oifs: BTreeSet<u32> = [Some(underlay.link.index), vxlan.map(|v| v.index)]
            .into_iter()
            .flatten()
            .collect();
        let have: Vec<Route> = nl
            .routes_with_protocol(MALLA_ROUTE_PROTOCOL)
            .await?
            .into_iter()
            .filter(|r| remote_oifs.contains(&r.oif) || r.gateway.is_some())
            .collect();
        // One bad route must not keep the others out: try all, report every failure.
        let mut failures = Vec::new();
        for r in &have {
            let keep = desired
                .get(&r.dst)
                .is_some_and(|d| d.gateway == r.gateway && d.oif == r.oif);
            if !keep {
                match nl.delete_route(r).await {
                    Ok(()) => stats.routes_removed += 1,
                    Err(e) => failures.push(format!("delete {}: {e}", r.dst)),
                }
            }
        }
        for (dst, d) in &desired {
            let present = have
                .iter()
                .any(|r| r.dst == *dst && r.gateway == d.gateway && r.oif == d.oif);
            if !present {
                match nl.replace_route(d).await {
                    Ok(()) => stats.routes_added += 1,
                    Err(e) => failures.push(format!("{dst} via {:?}: {e}", d.gateway)),
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DriverError::Routes(failures))
        }
    }
}
