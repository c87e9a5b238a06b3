//! The VXLAN manager: the node's VXLAN device, and a static neighbour (IPv4 and link-local
//! IPv6) and FDB entry per peer VTEP. In direct routing mode the device is removed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use malla_api::RoutingMode;
use malla_calc::links::LinkDelta;
use malla_calc::{NodeDataplane, VxlanPeer};

use super::Underlay;
use crate::driver::{ApplyStats, DriverError};
use crate::netlink::{FdbEntry, Link, Neighbour, Netlink, VxlanSpec};

/// Name of the node's VXLAN device.
pub const VXLAN_DEVICE: &str = "malla.vxlan";

/// Owns [`VXLAN_DEVICE`], its neighbours and its FDB.
pub struct VxlanManager {
    vtep_mac: [u8; 6],
}

impl VxlanManager {
    pub fn new(vtep_mac: [u8; 6]) -> Self {
        Self { vtep_mac }
    }

    /// Makes the device and its peers what `want` says; returns the device when the node
    /// routes over VXLAN.
    pub async fn sync(
        &self,
        nl: &Netlink,
        underlay: &Underlay,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> Result<Option<Link>, DriverError> {
        match want.mode {
            RoutingMode::Vxlan => {
                let dev = self.ensure_device(nl, underlay, want).await?;
                self.sync_peers(nl, &dev, want, stats).await?;
                Ok(Some(dev))
            }
            RoutingMode::Direct | RoutingMode::Bgp => {
                if let Some(dev) = nl.link_by_name(VXLAN_DEVICE).await? {
                    nl.delete_link(dev.index).await?;
                }
                Ok(None)
            }
        }
    }

    async fn ensure_device(
        &self,
        nl: &Netlink,
        underlay: &Underlay,
        want: &NodeDataplane,
    ) -> Result<Link, DriverError> {
        let local = underlay
            .ipv4
            .ok_or_else(|| DriverError::NoUnderlayIpv4(underlay.link.name.clone()))?;
        let spec = VxlanSpec {
            name: VXLAN_DEVICE.to_string(),
            vni: want.vxlan_vni,
            port: want.vxlan_port,
            local,
            underlay_ifindex: underlay.link.index,
            mtu: underlay.mtu.saturating_sub(malla_api::VXLAN_OVERHEAD),
            mac: self.vtep_mac,
        };
        if let Some(dev) = nl.link_by_name(VXLAN_DEVICE).await? {
            if dev.mac == Some(spec.mac) && dev.mtu == spec.mtu && dev.up {
                return Ok(dev);
            }
            nl.delete_link(dev.index).await?;
        }
        nl.create_vxlan(&spec).await?;
        nl.link_by_name(VXLAN_DEVICE)
            .await?
            .ok_or_else(|| DriverError::Vanished(VXLAN_DEVICE.to_string()))
    }

    /// The node's VXLAN device if it has one (no repair: [`VxlanManager::sync`] does that).
    pub async fn device(&self, nl: &Netlink) -> Result<Option<Link>, DriverError> {
        Ok(nl.link_by_name(VXLAN_DEVICE).await?)
    }

    /// Removes and adds the peers `delta` says (their neighbours and FDB entries), and nothing
    /// else. An entry to remove that is gone already is fine.
    pub async fn apply_delta(
        &self,
        nl: &Netlink,
        dev: &Link,
        delta: &LinkDelta,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        for old in &delta.peers_removed {
            let new = delta.peers_added.iter().find(|a| a.node == old.node);
            remove_peer_entries(nl, dev, old, new, stats).await?;
        }
        for p in &delta.peers_added {
            for n in peer_neighbours(dev, p) {
                nl.replace_neighbour(&n).await?;
                stats.neighbours_changed += 1;
            }
            nl.replace_fdb(&peer_fdb(dev, p)).await?;
            stats.fdb_changed += 1;
        }
        Ok(())
    }

    async fn sync_peers(
        &self,
        nl: &Netlink,
        dev: &Link,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let mut neigh_want: BTreeMap<IpAddr, [u8; 6]> = BTreeMap::new();
        let mut fdb_want: BTreeMap<[u8; 6], IpAddr> = BTreeMap::new();
        for p in &want.vxlan_peers {
            for n in peer_neighbours(dev, p) {
                neigh_want.insert(n.ip, n.mac);
            }
            let f = peer_fdb(dev, p);
            fdb_want.insert(f.mac, f.dst);
        }
        let have = nl.permanent_neighbours(dev.index).await?;
        for n in &have {
            if neigh_want.get(&n.ip) != Some(&n.mac) {
                nl.delete_neighbour(n).await?;
                stats.neighbours_changed += 1;
            }
        }
        for (ip, mac) in &neigh_want {
            if !have.iter().any(|n| n.ip == *ip && n.mac == *mac) {
                nl.replace_neighbour(&Neighbour {
                    ifindex: dev.index,
                    ip: *ip,
                    mac: *mac,
                })
                .await?;
                stats.neighbours_changed += 1;
            }
        }
        let fdb = nl.fdb_entries(dev.index).await?;
        for e in &fdb {
            if fdb_want.get(&e.mac) != Some(&e.dst) {
                nl.delete_fdb(e).await?;
                stats.fdb_changed += 1;
            }
        }
        for (mac, dst) in &fdb_want {
            if !fdb.iter().any(|e| e.mac == *mac && e.dst == *dst) {
                nl.replace_fdb(&FdbEntry {
                    ifindex: dev.index,
                    mac: *mac,
                    dst: *dst,
                })
                .await?;
                stats.fdb_changed += 1;
            }
        }
        Ok(())
    }
}

/// A peer's static neighbours on `dev`: its IPv4 underlay address and the link-local IPv6
/// address of its VTEP MAC, both at that MAC.
fn peer_neighbours(dev: &Link, p: &VxlanPeer) -> [Neighbour; 2] {
    [
        Neighbour {
            ifindex: dev.index,
            ip: IpAddr::V4(p.underlay_ipv4),
            mac: p.mac,
        },
        Neighbour {
            ifindex: dev.index,
            ip: IpAddr::V6(malla_api::link_local_from_mac(&p.mac)),
            mac: p.mac,
        },
    ]
}

/// A peer's FDB entry on `dev`: its VTEP MAC behind its IPv4 underlay address.
fn peer_fdb(dev: &Link, p: &VxlanPeer) -> FdbEntry {
    FdbEntry {
        ifindex: dev.index,
        mac: p.mac,
        dst: IpAddr::V4(p.underlay_ipv4),
    }
}

/// Deletes `old`'s neighbours and FDB entry on `dev`, except those its replacement `new` (the
/// same node with another address or MAC) writes again. An entry already gone is fine.
async fn remove_peer_entries(
    nl: &Netlink,
    dev: &Link,
    old: &VxlanPeer,
    new: Option<&VxlanPeer>,
    stats: &mut ApplyStats,
) -> Result<(), DriverError> {
    let gone =
        |e: &crate::netlink::NetlinkError| matches!(e.errno(), Some(libc::ENOENT | libc::ESRCH));
    let kept = new.map(|p| peer_neighbours(dev, p));
    for n in peer_neighbours(dev, old) {
        if kept.iter().flatten().any(|k| k.ip == n.ip) {
            continue;
        }
        match nl.delete_neighbour(&n).await {
            Ok(()) => stats.neighbours_changed += 1,
            Err(e) if gone(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let fdb = peer_fdb(dev, old);
    if new.is_some_and(|p| peer_fdb(dev, p) == fdb) {
        return Ok(());
    }
    match nl.delete_fdb(&fdb).await {
        Ok(()) => stats.fdb_changed += 1,
        Err(e) if gone(&e) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
