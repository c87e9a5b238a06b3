//! The routes manager: routes to other nodes' blocks, stamped with
//! [`crate::MALLA_ROUTE_PROTOCOL`], over the underlay (direct) or the VXLAN device. Routes of
//! that protocol it does not want are removed; others' routes are never touched.

use std::collections::{BTreeMap, BTreeSet};

use malla_calc::links::LinkDelta;
use malla_calc::{NodeDataplane, RemoteRoute};

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
        let desired: BTreeMap<ipnet::IpNet, Route> = want
            .remote_routes
            .iter()
            .map(|r| (r.dst, kernel_route(r, underlay, vxlan)))
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
        failed(failures)
    }

    /// Removes and adds the routes `delta` says, and nothing else (the routes of the nodes a
    /// change touched; [`RoutesManager::sync`] is the repair). A route to remove that is gone
    /// already is fine.
    pub async fn apply_delta(
        &self,
        nl: &Netlink,
        underlay: &Underlay,
        vxlan: Option<&Link>,
        delta: &LinkDelta,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let mut failures = Vec::new();
        // A destination moving from one node to another is replaced, not removed.
        let added: BTreeSet<ipnet::IpNet> = delta.routes_added.iter().map(|r| r.dst).collect();
        for r in delta
            .routes_removed
            .iter()
            .filter(|r| !added.contains(&r.dst))
        {
            match nl.delete_route(&kernel_route(r, underlay, vxlan)).await {
                Ok(()) => stats.routes_removed += 1,
                Err(e) if e.errno() == Some(libc::ESRCH) => {}
                Err(e) => failures.push(format!("delete {}: {e}", r.dst)),
            }
        }
        for r in &delta.routes_added {
            match nl.replace_route(&kernel_route(r, underlay, vxlan)).await {
                Ok(()) => stats.routes_added += 1,
                Err(e) => failures.push(format!("{} via {}: {e}", r.dst, r.via)),
            }
        }
        failed(failures)
    }
}

/// The kernel route for `r`: over the VXLAN device when given (IPv4 next hops on-link; IPv6
/// next hops over VXLAN are link-local and need no on-link flag), else over the underlay.
fn kernel_route(r: &RemoteRoute, underlay: &Underlay, vxlan: Option<&Link>) -> Route {
    let (oif, onlink) = match vxlan {
        Some(dev) => (dev.index, true),
        None => (underlay.link.index, false),
    };
    Route {
        dst: r.dst,
        gateway: Some(r.via),
        oif,
        onlink: onlink && r.dst.addr().is_ipv4(),
        scope_link: false,
    }
}

/// One bad route must not keep the others out: every failure is reported at the end.
fn failed(failures: Vec<String>) -> Result<(), DriverError> {
    if failures.is_empty() {
        Ok(())
    } else {
        Err(DriverError::Routes(failures))
    }
}
