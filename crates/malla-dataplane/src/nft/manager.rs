//! The nftables manager: owns the node's table. The first apply creates it (a cold load when
//! the kernel has none), later ones send only what changed — element changes alone straight
//! over nfnetlink, anything else as an `nft` text diff — and the table is replaced whole
//! hourly (or when a diff fails), repairing drift. UDP flows to endpoints that left a service
//! are cleared from conntrack.

use malla_calc::nft::Table;
use malla_calc::services::{EndpointPlan, ServiceEntry, ServiceMap};

use crate::driver::{ApplyStats, DriverError};
use crate::nft::elements::{ElementSocket, SetChange};
use crate::nft::{self, cold_load, diff, NftError};

/// How often the nft table is replaced whole (repairing drift) instead of diffed. Hourly, as
/// kube-proxy's nftables mode: a replace resets session affinity and per-endpoint counters,
/// and at 30k services costs seconds of `nft`.
const FULL_NFT_RESYNC: std::time::Duration = std::time::Duration::from_secs(3600);

/// The node's table as last applied, and how to reach the kernel.
pub struct NftManager {
    /// The table as last applied, the base of the next incremental transaction.
    applied_table: Option<Table>,
    applied_services: ServiceMap,
    last_full_nft: std::time::Instant,
    /// Where element changes go, kept open (see [`ElementSocket`]).
    element_socket: Option<ElementSocket>,
}

impl Default for NftManager {
    fn default() -> Self {
        Self {
            applied_table: None,
            applied_services: ServiceMap::default(),
            last_full_nft: std::time::Instant::now(),
            element_socket: None,
        }
    }
}

fn failed(what: &'static str) -> impl FnOnce(NftError) -> DriverError {
    move |source| DriverError::Nft { what, source }
}

impl NftManager {
    /// Sends element changes to the node's table over the kept socket, opened on first use
    /// and dropped after an error.
    fn send_elements(
        &mut self,
        family: u8,
        table: &str,
        changes: &[SetChange],
    ) -> Result<(), NftError> {
        let sock = match self.element_socket.take() {
            Some(s) => s,
            None => ElementSocket::open(None).map_err(NftError::Spawn)?,
        };
        let sent = sock.apply(family, table, changes);
        if sent.is_ok() {
            self.element_socket = Some(sock);
        }
        sent
    }

    /// Replaces the table whole when that is due.
    pub fn resync(&mut self, stats: &mut ApplyStats) -> Result<(), DriverError> {
        if self.last_full_nft.elapsed() >= FULL_NFT_RESYNC {
            if let Some(t) = &self.applied_table {
                nft::apply(
                    None,
                    &malla_calc::services::ruleset(t, &self.applied_services),
                )
                .map_err(failed("replacing the nftables table"))?;
                self.last_full_nft = std::time::Instant::now();
                stats.nft_applied = true;
            }
        }
        Ok(())
    }

    /// Applies the nft table: the first time and every few minutes as one full replacing
    /// transaction, otherwise as a small diff of what changed: element changes alone go
    /// straight over nfnetlink, anything else as an `nft` text diff; a failed diff falls back
    /// to full.
    pub fn apply(
        &mut self,
        table: Table,
        services: ServiceMap,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let full_due = self.last_full_nft.elapsed() >= FULL_NFT_RESYNC;
        if let (Some(old), false) = (&self.applied_table, full_due) {
            let new = &table;
            let elements = diff::ruleset_changes(old, new, &self.applied_services, &services)
                .zip(diff::family(&new.family));
            if let Some((changes, family)) = elements {
                if changes.is_empty() {
                    return Ok(());
                }
                match self.send_elements(family, &new.name, &changes) {
                    Ok(()) => {
                        self.finish(table, services, stats);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "element update failed; using the text diff")
                    }
                }
            }
        }
        let text_diff = match &self.applied_table {
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
        let applied = match text_diff {
            Some(d) => nft::apply(None, &d).map(|_| "diff").or_else(|e| {
                tracing::warn!(error = %e, "incremental nft update failed; replacing the table");
                nft::apply(None, &malla_calc::services::ruleset(&table, &services)).map(|_| "full")
            }),
            None => {
                let t = &table;
                let cold = self.applied_table.is_none()
                    && nft::table_exists(None, &t.family, &t.name).is_ok_and(|there| !there);
                let cold_loaded = cold
                    && cold_load::apply(None, t, &services)
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
        .map_err(failed("applying nftables table"))?;
        if applied == "full" {
            self.last_full_nft = std::time::Instant::now();
        }
        self.finish(table, services, stats);
        Ok(())
    }

    /// After `table` is in the kernel: UDP flows to endpoints gone are cleared, and the table
    /// becomes the base of the next diff.
    fn finish(&mut self, table: Table, services: ServiceMap, stats: &mut ApplyStats) {
        clear_stale_udp_flows(&self.applied_services.entries, &services.entries);
        self.applied_table = Some(table);
        self.applied_services = services;
        stats.nft_applied = true;
    }

    /// The table and service map as last applied, which the calculation plans the endpoint
    /// fast path against ([`malla_calc::services::plan_service_changes`]); None before the
    /// first apply.
    pub fn model_mut(&mut self) -> Option<(&mut Table, &mut ServiceMap)> {
        let table = self.applied_table.as_mut()?;
        Some((table, &mut self.applied_services))
    }

    /// The service path: the plan, made by the calculation against [`NftManager::model_mut`]
    /// (which it already changed), goes to the kernel without computing or diffing the node's
    /// whole table: element changes in one nfnetlink batch, or, when it creates or deletes
    /// objects (a service's chains), its text in one `nft` transaction. When the kernel
    /// refuses it, the model is put back as it was and the caller computes everything.
    pub fn apply_endpoints(
        &mut self,
        plan: EndpointPlan,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        let Some(table) = self.applied_table.take() else {
            return Err(DriverError::NoBase);
        };
        let changes = diff::family(&table.family).zip(diff::plan_changes(&table, &plan));
        let sent = match changes {
            Some((_, changes)) if changes.is_empty() => Ok(()),
            Some((family, changes)) => self.send_elements(family, &table.name, &changes),
            // Objects created or deleted (or elements nfnetlink cannot encode): the plan's
            // text, one `nft` transaction.
            None => {
                let text = plan.text(&table);
                if text.is_empty() {
                    Ok(())
                } else {
                    nft::apply(None, &text)
                }
            }
        };
        self.applied_table = Some(table);
        if let Err(e) = sent {
            if let Some(table) = self.applied_table.as_mut() {
                plan.undo(table, &mut self.applied_services);
            }
            return Err(failed("endpoint update")(e));
        }
        for c in &plan.changes {
            let (old, now) = c.entries(&self.applied_services);
            clear_stale_udp_flows(old, now);
        }
        stats.nft_applied = true;
        Ok(())
    }
}

/// UDP has no connection to break: conntrack would keep sending a flow to an endpoint that
/// is gone. Deletes the entries of every UDP endpoint in `before` that `now` lacks.
fn clear_stale_udp_flows(before: &[ServiceEntry], now: &[ServiceEntry]) {
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
                let _ = crate::conntrack::delete_udp_flows(Some(f.ip), f.port, ep.ip);
            }
            if let Some(np) = old.node_port {
                let _ = crate::conntrack::delete_udp_flows(None, np, ep.ip);
            }
        }
    }
}
