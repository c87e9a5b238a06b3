//! The Linux driver: netlink for links, routes and neighbours, nftables for the node's table.
//! Each kind of kernel object has its manager, which diffs the desired state against what the
//! kernel has and changes only the difference (so a restarted agent adopts what is there):
//! [`vxlan::VxlanManager`] (the device, its FDB and neighbours), [`routes::RoutesManager`]
//! (routes to other nodes' blocks), [`workloads::WorkloadsManager`] (the host side of local
//! pods), [`guard::GuardManager`] (local pods' anti-spoofing entries on the links path) and
//! [`crate::nft::manager::NftManager`] (the table).

pub mod guard;
pub mod routes;
pub mod vxlan;
pub mod workloads;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use malla_calc::links::{LinkDelta, Links};
use malla_calc::nft::Table;
use malla_calc::services::ServiceMap;
use malla_calc::NodeDataplane;

use crate::driver::{ApplyStats, Driver, DriverError, Update};
use crate::netlink::{Link, Netlink};
use crate::nft::manager::NftManager;
use crate::sysctl;

pub use vxlan::VXLAN_DEVICE;

/// The underlay as the node sees it.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub link: Link,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// The netlink + nftables driver of one node.
pub struct LinuxDriver {
    nl: Netlink,
    underlay_name: String,
    vxlan: vxlan::VxlanManager,
    routes: routes::RoutesManager,
    workloads: workloads::WorkloadsManager,
    nft: NftManager,
    guard: guard::GuardManager,
    /// The rest of what was last applied (routes, peers, local pods), for [`Driver::resync`].
    last_applied: Option<NodeDataplane>,
}

impl LinuxDriver {
    /// A driver for node `node` (its VTEP MAC follows from the name) whose underlay is
    /// `underlay_interface`, in the caller's network namespace.
    pub fn connect(node: &str, underlay_interface: &str) -> Result<Self, DriverError> {
        Ok(Self {
            nl: Netlink::connect()?,
            underlay_name: underlay_interface.to_string(),
            vxlan: vxlan::VxlanManager::new(malla_api::mac_from_name(node)),
            routes: routes::RoutesManager,
            workloads: workloads::WorkloadsManager,
            nft: NftManager::default(),
            guard: guard::GuardManager::default(),
            last_applied: None,
        })
    }

    /// The underlay interface with its addresses.
    pub async fn underlay(&self) -> Result<Underlay, DriverError> {
        let link = self
            .nl
            .link_by_name(&self.underlay_name)
            .await?
            .ok_or_else(|| DriverError::NoUnderlay(self.underlay_name.clone()))?;
        let addrs = self.nl.addresses(link.index).await?;
        let ipv4 = addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V4(v4) => Some(v4),
            _ => None,
        });
        let ipv6 = addrs.iter().find_map(|a| match a.addr() {
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) != 0xfe80 => Some(v6),
            _ => None,
        });
        Ok(Underlay {
            mtu: link.mtu,
            link,
            ipv4,
            ipv6,
        })
    }

    /// Routes, the VXLAN device and its peers, and local pods' host sides.
    async fn sync_links(
        &mut self,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let underlay = self.underlay().await?;
        let vxlan = self.vxlan.sync(&self.nl, &underlay, want, stats).await?;
        self.routes
            .sync(&self.nl, &underlay, vxlan.as_ref(), want, stats)
            .await?;
        self.workloads.sync(&self.nl, want, stats).await?;
        Ok(())
    }
}

impl LinuxDriver {
    /// Changes the routes, peers and local pods `delta` names, and records them as applied.
    async fn apply_links(
        &mut self,
        delta: &LinkDelta,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let Some(last) = self.last_applied.as_mut() else {
            return Err(DriverError::NoBase);
        };
        // What was applied is recorded first: a failure below leaves drift that the next
        // resync (or full apply) repairs against it.
        let mut links = Links {
            remote_routes: std::mem::take(&mut last.remote_routes),
            vxlan_peers: std::mem::take(&mut last.vxlan_peers),
            local_endpoints: std::mem::take(&mut last.local_endpoints),
            problems: Vec::new(),
            // Anti-spoofing entries live in the nft table (see below).
            guard: Default::default(),
            kernel_reverse_path: false,
        };
        delta.apply_to(&mut links);
        last.remote_routes = links.remote_routes;
        last.vxlan_peers = links.vxlan_peers;
        last.local_endpoints = links.local_endpoints;
        let vxlan_mode = last.mode == malla_api::RoutingMode::Vxlan;
        let underlay = self.underlay().await?;
        let vxlan = match vxlan_mode {
            true => Some(
                self.vxlan
                    .device(&self.nl)
                    .await?
                    .ok_or_else(|| DriverError::Vanished(VXLAN_DEVICE.to_string()))?,
            ),
            false => None,
        };
        if let Some(dev) = &vxlan {
            self.vxlan.apply_delta(&self.nl, dev, delta, stats).await?;
        }
        self.routes
            .apply_delta(&self.nl, &underlay, vxlan.as_ref(), delta, stats)
            .await?;
        self.workloads
            .repair(&self.nl, &delta.local_added, stats)
            .await?;
        self.guard.apply(&mut self.nft, &delta.guard, stats)?;
        let touched: std::collections::BTreeSet<String> = (delta.guard.removed.iter())
            .chain(&delta.guard.added)
            .map(|e| e.ifname.clone())
            .collect();
        if let (false, Some((table, _))) = (touched.is_empty(), self.nft.model_mut()) {
            self.guard.reverse_path(table, Some(&touched))?;
        }
        Ok(())
    }
}

impl Driver for LinuxDriver {
    /// A node routes for its pods.
    async fn start(&mut self) -> Result<(), DriverError> {
        sysctl::set("net.ipv4.ip_forward", "1").map_err(DriverError::Sysctl)?;
        sysctl::set("net.ipv6.conf.all.forwarding", "1").map_err(DriverError::Sysctl)?;
        Ok(())
    }

    /// Applies `update`, which the driver keeps (its nft table is the base of the next
    /// incremental transaction, the rest what [`Driver::resync`] checks the kernel against).
    async fn apply(&mut self, update: Update) -> Result<ApplyStats, DriverError> {
        let mut stats = ApplyStats::default();
        let mut want = match update {
            Update::Full(want) => *want,
            Update::Endpoints(plan) => {
                self.nft.apply_endpoints(plan, &mut stats)?;
                return Ok(stats);
            }
            Update::Links(delta) => {
                self.apply_links(&delta, &mut stats).await?;
                return Ok(stats);
            }
        };
        self.sync_links(&want, &mut stats).await?;
        let table = std::mem::take(&mut want.nft_table);
        let services = std::mem::take(&mut want.service_map);
        self.nft.apply(table, services, &mut stats)?;
        self.last_applied = Some(want);
        if let Some((table, _)) = self.nft.model_mut() {
            self.guard.reverse_path(table, None)?;
        }
        Ok(stats)
    }

    /// The periodic repair when nothing changed: the kernel's routes, VXLAN device and peers
    /// and pods' host sides checked against what was last applied, and the table replaced
    /// whole when that is due; nothing is computed again.
    async fn resync(&mut self) -> Result<ApplyStats, DriverError> {
        let mut stats = ApplyStats::default();
        let Some(want) = self.last_applied.take() else {
            return Ok(stats);
        };
        let synced = self.sync_links(&want, &mut stats).await;
        self.last_applied = Some(want);
        synced?;
        self.nft.resync(&mut stats)?;
        if let Some((table, _)) = self.nft.model_mut() {
            self.guard.reverse_path(table, None)?;
        }
        Ok(stats)
    }

    fn service_model(&mut self) -> Option<(&mut Table, &mut ServiceMap)> {
        self.nft.model_mut()
    }
}
