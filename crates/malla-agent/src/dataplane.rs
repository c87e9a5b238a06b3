//! Applies a [`NodeDataplane`] to the kernel by diffing against what is there: remote routes
//! (Malla's route protocol, on the underlay or VXLAN device), the VXLAN device with its static
//! neighbours and FDB, the host side of local pods, and the nftables table.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Context};
use malla_api::RoutingMode;
use malla_calc::NodeDataplane;
use malla_dataplane::netlink::{FdbEntry, Link, Neighbour, Netlink, Route, VxlanSpec};
use malla_dataplane::nft_elements::{ElementSocket, SetChange};
use malla_dataplane::{nft, sysctl, MALLA_ROUTE_PROTOCOL};

/// Name of the node's VXLAN device.
pub const VXLAN_DEVICE: &str = "malla.vxlan";

/// The underlay as the node sees it.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub link: Link,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub mtu: u32,
}

/// What one apply changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApplyStats {
    pub routes_added: usize,
    pub routes_removed: usize,
    pub neighbours_changed: usize,
    pub fdb_changed: usize,
    pub pods_repaired: usize,
    pub nft_applied: bool,
}

impl ApplyStats {
    pub fn changed(&self) -> bool {
        self.routes_added
            + self.routes_removed
            + self.neighbours_changed
            + self.fdb_changed
            + self.pods_repaired
            > 0
            || self.nft_applied
    }
}

pub struct Dataplane {
    nl: Netlink,
    underlay_name: String,
    vtep_mac: [u8; 6],
    /// The table as last applied, the base of the next incremental transaction.
    applied_table: Option<malla_calc::nft::Table>,
    applied_services: malla_calc::services::ServiceMap,
    last_full_nft: std::time::Instant,
    /// The rest of what was last applied (routes, peers, local pods), for [`Dataplane::repair`].
    last_applied: Option<NodeDataplane>,
    /// Where element changes go, kept open (see [`ElementSocket`]).
    element_socket: Option<ElementSocket>,
}

/// How often the nft table is replaced whole (repairing drift) instead of diffed. Hourly, as
/// kube-proxy's nftables mode: a replace resets session affinity and per-endpoint counters,
/// and at 30k services costs seconds of `nft`.
const FULL_NFT_RESYNC: std::time::Duration = std::time::Duration::from_secs(3600);

impl Dataplane {
    pub async fn connect(node: &str, underlay_interface: &str) -> anyhow::Result<Self> {
        Ok(Self {
            nl: Netlink::connect()?,
            underlay_name: underlay_interface.to_string(),
            vtep_mac: malla_api::mac_from_name(node),
            applied_table: None,
            applied_services: Default::default(),
            last_full_nft: std::time::Instant::now(),
            last_applied: None,
            element_socket: None,
        })
    }

    /// Sends element changes to the node's table over the kept socket, opened on first use
    /// and dropped after an error.
    fn send_elements(
        &mut self,
        family: u8,
        table: &str,
        changes: &[SetChange],
    ) -> Result<(), malla_dataplane::nft::NftError> {
        let sock = match self.element_socket.take() {
            Some(s) => s,
            None => ElementSocket::open(None).map_err(malla_dataplane::nft::NftError::Spawn)?,
        };
        let sent = sock.apply(family, table, changes);
        if sent.is_ok() {
            self.element_socket = Some(sock);
        }
        sent
    }

    /// A node routes for its pods.
    pub fn enable_forwarding(&self) -> anyhow::Result<()> {
        sysctl::set("net.ipv4.ip_forward", "1")?;
        sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
        Ok(())
    }

    pub async fn underlay(&self) -> anyhow::Result<Underlay> {
        let link = self
            .nl
            .link_by_name(&self.underlay_name)
            .await?
            .ok_or_else(|| anyhow!("underlay interface {} not found", self.underlay_name))?;
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

    /// Applies `want`, which the dataplane keeps (its nft table is the base of the next
    /// incremental transaction, the rest what [`Dataplane::repair`] checks the kernel against).
    pub async fn apply(&mut self, mut want: NodeDataplane) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        self.sync_kernel(&want, &mut stats).await?;
        let table = std::mem::take(&mut want.nft_table);
        let services = std::mem::take(&mut want.service_map);
        self.sync_nft(table, services, &mut stats)?;
        self.last_applied = Some(want);
        Ok(stats)
    }

    /// The periodic repair when nothing changed: the kernel's routes, VXLAN device and peers
    /// and pods' host sides checked against what was last applied, and the table replaced
    /// whole when that is due; nothing is computed again.
    pub async fn repair(&mut self) -> anyhow::Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let Some(want) = self.last_applied.take() else {
            return Ok(stats);
        };
        let synced = self.sync_kernel(&want, &mut stats).await;
        self.last_applied = Some(want);
        synced?;
        if self.last_full_nft.elapsed() >= FULL_NFT_RESYNC {
            if let Some(t) = &self.applied_table {
                nft::apply(
                    None,
                    &malla_calc::services::ruleset(t, &self.applied_services),
                )
                .context("replacing the nftables table")?;
                self.last_full_nft = std::time::Instant::now();
                stats.nft_applied = true;
            }
        }
        Ok(stats)
    }

    /// Routes, the VXLAN device and its peers, and local pods' host sides.
    async fn sync_kernel(
        &mut self,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        let underlay = self.underlay().await?;
        let vxlan = match want.mode {
            RoutingMode::Vxlan => Some(self.ensure_vxlan(&underlay, want).await?),
            RoutingMode::Direct => {
                if let Some(dev) = self.nl.link_by_name(VXLAN_DEVICE).await? {
                    self.nl.delete_link(dev.index).await?;
                }
                None
            }
        };
        if let Some(dev) = &vxlan {
            self.sync_vxlan_peers(dev, want, stats).await?;
        }
        self.sync_remote_routes(&underlay, vxlan.as_ref(), want, stats)
            .await?;
        self.sync_local_pods(want, stats).await?;
        Ok(())
    }

    /// Applies the nft table: the first time and every few minutes as one full replacing
    /// transaction, otherwise as a small diff of what changed: element changes alone go
    /// straight over nfnetlink, anything else as an `nft` text diff; a failed diff falls back
    /// to full.
    fn sync_nft(
        &mut self,
        table: malla_calc::nft::Table,
        services: malla_calc::services::ServiceMap,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        let full_due = self.last_full_nft.elapsed() >= FULL_NFT_RESYNC;
        if let (Some(old), false) = (&self.applied_table, full_due) {
            let new = &table;
            let elements =
                crate::element_diff::ruleset_changes(old, new, &self.applied_services, &services)
                    .zip(crate::element_diff::family(&new.family));
            if let Some((changes, family)) = elements {
                if changes.is_empty() {
                    return Ok(());
                }
                match self.send_elements(family, &new.name, &changes) {
                    Ok(()) => {
                        self.finish_nft(table, services, stats);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "element update failed; using the text diff")
                    }
                }
            }
        }
        let diff = match &self.applied_table {
            Some(old) if !full_due => {
                let text = malla_calc::services::ruleset_diff(
                    old,
                    &table,
                    &self.applied_services,
                    &services,
                );
                if text.is_empty() {
                    return Ok(());
                }
                Some(text)
            }
            _ => None,
        };
        let applied = match diff {
            Some(d) => nft::apply(None, &d).map(|_| "diff").or_else(|e| {
                tracing::warn!(error = %e, "incremental nft update failed; replacing the table");
                nft::apply(None, &malla_calc::services::ruleset(&table, &services)).map(|_| "full")
            }),
            None => {
                let t = &table;
                let cold = self.applied_table.is_none()
                    && nft::table_exists(None, &t.family, &t.name).is_ok_and(|there| !there);
                let cold_loaded = cold
                    && crate::cold_load::apply(None, t, &services)
                        .inspect_err(
                            |e| tracing::warn!(error = %e, "cold load failed; replacing the table"),
                        )
                        .is_ok();
                if cold_loaded {
                    tracing::info!("created the nft table (cold load)");
                    Ok("full")
                } else {
                    nft::apply(None, &malla_calc::services::ruleset(t, &services)).map(|_| "full")
                }
            }
        }
        .context("applying nftables table")?;
        if applied == "full" {
            self.last_full_nft = std::time::Instant::now();
        }
        self.finish_nft(table, services, stats);
        Ok(())
    }

    /// After `want`'s table is in the kernel: UDP flows to endpoints gone are cleared, and the
    /// table becomes the base of the next diff.
    fn finish_nft(
        &mut self,
        table: malla_calc::nft::Table,
        services: malla_calc::services::ServiceMap,
        stats: &mut ApplyStats,
    ) {
        self.clear_stale_udp_flows(&services);
        self.applied_table = Some(table);
        self.applied_services = services;
        stats.nft_applied = true;
    }

    /// UDP has no connection to break: conntrack would keep sending a flow to an endpoint that
    /// is gone. Deletes the entries of every UDP endpoint that left a service.
    fn clear_stale_udp_flows(&self, now: &malla_calc::services::ServiceMap) {
        clear_stale_udp_flows(&self.applied_services.entries, &now.entries);
    }

    /// The fast path for services whose endpoints moved within the same counts (see
    /// [`malla_calc::services::EndpointDelta`]): each service's entries are rebuilt alone, one
    /// after the other against the model as the previous ones left it, and the kernel gets
    /// all their changed elements in one nfnetlink batch, without computing or diffing the
    /// node's whole table. Ok(false) when one of them is not that kind of change (or nothing
    /// was applied before, or the batch failed): the model is put back as it was, and the
    /// caller computes everything.
    pub fn apply_endpoint_changes(
        &mut self,
        view: &malla_calc::ClusterView,
        node: &str,
        services: &std::collections::BTreeSet<String>,
    ) -> anyhow::Result<bool> {
        let Some(mut table) = self.applied_table.take() else {
            return Ok(false);
        };
        let Some(family) = crate::element_diff::family(&table.family) else {
            self.applied_table = Some(table);
            return Ok(false);
        };
        let mut changes = Vec::new();
        // Per service: the undo of its delta, where its entries are, the old ones, how many new.
        let mut done = Vec::new();
        let mut complete = true;
        for service in services {
            let Some(svc) = view.services.iter().find(|s| *s.key == **service) else {
                complete = false;
                break;
            };
            let Some(planned) = crate::element_diff::service_change(
                &table,
                &self.applied_services,
                svc,
                &view.endpoint_slices,
                node,
            ) else {
                complete = false;
                break;
            };
            changes.extend(planned.changes);
            let undo = planned.delta.apply_to(&mut table);
            let (start, count) = (planned.range.start, planned.entries.len());
            let old: Vec<_> = self
                .applied_services
                .entries
                .splice(planned.range, planned.entries)
                .collect();
            done.push((undo, start, old, count));
        }
        let sent = complete
            && (changes.is_empty()
                || self
                    .send_elements(family, &table.name, &changes)
                    .inspect_err(|e| tracing::warn!(error = %e, "endpoint update failed"))
                    .is_ok());
        if !sent {
            for (undo, start, old, count) in done.into_iter().rev() {
                undo.apply_to(&mut table);
                self.applied_services
                    .entries
                    .splice(start..start + count, old);
            }
            self.applied_table = Some(table);
            return Ok(false);
        }
        for (_, start, old, count) in &done {
            clear_stale_udp_flows(old, &self.applied_services.entries[*start..start + count]);
        }
        self.applied_table = Some(table);
        Ok(true)
    }

    async fn ensure_vxlan(
        &self,
        underlay: &Underlay,
        want: &NodeDataplane,
    ) -> anyhow::Result<Link> {
        let local = underlay
            .ipv4
            .ok_or_else(|| anyhow!("vxlan needs an IPv4 address on {}", underlay.link.name))?;
        let spec = VxlanSpec {
            name: VXLAN_DEVICE.to_string(),
            vni: want.vxlan_vni,
            port: want.vxlan_port,
            local,
            underlay_ifindex: underlay.link.index,
            mtu: underlay.mtu.saturating_sub(malla_api::VXLAN_OVERHEAD),
            mac: self.vtep_mac,
        };
        if let Some(dev) = self.nl.link_by_name(VXLAN_DEVICE).await? {
            if dev.mac == Some(spec.mac) && dev.mtu == spec.mtu && dev.up {
                return Ok(dev);
            }
            self.nl.delete_link(dev.index).await?;
        }
        self.nl.create_vxlan(&spec).await?;
        self.nl
            .link_by_name(VXLAN_DEVICE)
            .await?
            .ok_or_else(|| anyhow!("{VXLAN_DEVICE} vanished after creation"))
    }

    async fn sync_vxlan_peers(
        &self,
        dev: &Link,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        let mut neigh_want: BTreeMap<IpAddr, [u8; 6]> = BTreeMap::new();
        let mut fdb_want: BTreeMap<[u8; 6], IpAddr> = BTreeMap::new();
        for p in &want.vxlan_peers {
            neigh_want.insert(IpAddr::V4(p.underlay_ipv4), p.mac);
            neigh_want.insert(IpAddr::V6(malla_api::link_local_from_mac(&p.mac)), p.mac);
            fdb_want.insert(p.mac, IpAddr::V4(p.underlay_ipv4));
        }
        let have = self.nl.permanent_neighbours(dev.index).await?;
        for n in &have {
            if neigh_want.get(&n.ip) != Some(&n.mac) {
                self.nl.delete_neighbour(n).await?;
                stats.neighbours_changed += 1;
            }
        }
        for (ip, mac) in &neigh_want {
            if !have.iter().any(|n| n.ip == *ip && n.mac == *mac) {
                self.nl
                    .replace_neighbour(&Neighbour {
                        ifindex: dev.index,
                        ip: *ip,
                        mac: *mac,
                    })
                    .await?;
                stats.neighbours_changed += 1;
            }
        }
        let fdb = self.nl.fdb_entries(dev.index).await?;
        for e in &fdb {
            if fdb_want.get(&e.mac) != Some(&e.dst) {
                self.nl.delete_fdb(e).await?;
                stats.fdb_changed += 1;
            }
        }
        for (mac, dst) in &fdb_want {
            if !fdb.iter().any(|e| e.mac == *mac && e.dst == *dst) {
                self.nl
                    .replace_fdb(&FdbEntry {
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

    async fn sync_remote_routes(
        &self,
        underlay: &Underlay,
        vxlan: Option<&Link>,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
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
        let have: Vec<Route> = self
            .nl
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
                match self.nl.delete_route(r).await {
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
                match self.nl.replace_route(d).await {
                    Ok(()) => stats.routes_added += 1,
                    Err(e) => failures.push(format!("{dst} via {:?}: {e}", d.gateway)),
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(anyhow!("routes: {}", failures.join("; ")))
        }
    }

    async fn sync_local_pods(
        &self,
        want: &NodeDataplane,
        stats: &mut ApplyStats,
    ) -> anyhow::Result<()> {
        if want.local_endpoints.is_empty() {
            return Ok(());
        }
        let routes: BTreeSet<(ipnet::IpNet, u32)> = self
            .nl
            .routes_with_protocol(MALLA_ROUTE_PROTOCOL)
            .await?
            .into_iter()
            .map(|r| (r.dst, r.oif))
            .collect();
        let links: BTreeMap<String, Link> = self
            .nl
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        for ep in &want.local_endpoints {
            // A pod whose veth is gone is being deleted (or leaked, for GC); nothing to repair.
            let Some(veth) = links.get(&ep.host_ifname) else {
                continue;
            };
            let missing = ep.ips.iter().any(|ip| !routes.contains(&(*ip, veth.index)));
            if missing {
                let Some(mac) = malla_api::parse_mac(&ep.mac) else {
                    continue;
                };
                let addrs: Vec<IpAddr> = ep.addrs().collect();
                malla_dataplane::workload::program_host_side(&self.nl, veth.index, &addrs, mac)
                    .await?;
                stats.pods_repaired += 1;
            }
        }
        Ok(())
    }
}

/// UDP has no connection to break: conntrack would keep sending a flow to an endpoint that
/// is gone. Deletes the entries of every UDP endpoint in `before` that `now` lacks.
fn clear_stale_udp_flows(
    before: &[malla_calc::services::ServiceEntry],
    now: &[malla_calc::services::ServiceEntry],
) {
    use malla_api::service::Protocol;
    for old in before.iter().filter(|e| e.protocol == Protocol::Udp) {
        let current = now.iter().find(|e| {
            e.service == old.service && e.port_name == old.port_name && e.family == old.family
        });
        for ep in &old.cluster_endpoints {
            let still = current.is_some_and(|c| {
                c.cluster_endpoints
                    .iter()
                    .any(|x| x.ip == ep.ip && x.port == ep.port)
            });
            if still {
                continue;
            }
            for f in &old.frontends {
                let _ = malla_dataplane::conntrack::delete_udp_flows(Some(f.ip), f.port, ep.ip);
            }
            if let Some(np) = old.node_port {
                let _ = malla_dataplane::conntrack::delete_udp_flows(None, np, ep.ip);
            }
        }
    }
}
