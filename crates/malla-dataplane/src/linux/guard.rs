//! The anti-spoofing manager: the links path's share of the node's table, and the kernel's
//! IPv4 reverse-path filter on the workload interfaces. A local pod that comes or goes arrives
//! in the links node's delta ([`malla_calc::links::LinkDelta::guard`]), not as a full
//! computation, so its entries in the anti-spoofing sets ([`malla_calc::guard`]) are changed
//! here: in the nft manager's model of the table (the base of its next diff, which stays what a
//! full render gives) and in the kernel — own addresses over the kept nfnetlink socket, allowed
//! prefixes (interval sets, rare) as a small `nft` transaction. A full apply carries the same
//! entries in its table. After either, each workload interface's `rp_filter` is made what
//! [`malla_calc::guard::strict_interfaces`] says (1 strict, else 0), after the table: an
//! interface loosened for an allowed prefix is already held by the chain.

use std::collections::BTreeSet;

use malla_calc::guard::{self, GuardDelta, Recompute, SetEdit};
use malla_calc::nft::Table;

use crate::driver::{ApplyStats, DriverError};
use crate::nft::elements::{Element, ElementSocket, Kind, Layout, SetChange, Value};
use crate::nft::manager::NftManager;
use crate::nft::{diff, NftError};

/// Owns the socket anti-spoofing elements travel over.
#[derive(Default)]
pub struct GuardManager {
    socket: Option<ElementSocket>,
}

fn failed(source: NftError) -> DriverError {
    DriverError::Nft {
        what: "updating anti-spoofing sets",
        source,
    }
}

use guard::undo;

/// The node's kernel checks IPv4 sources strictly on a veth whose `rp_filter` is 1: its
/// `net.ipv4.conf.all.rp_filter` (of the calling thread's namespace) is 0 or 1. With 2 (loose,
/// as some distributions set it) the kernel takes the larger value, so the chain must check.
pub fn kernel_reverse_path_usable() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter")
        .is_ok_and(|v| matches!(v.trim(), "0" | "1"))
}

/// Writes `rp_filter` of workload interface `ifname`; an interface that is gone is no error.
fn set_reverse_path(ifname: &str, strict: bool) -> Result<(), DriverError> {
    let value = if strict { "1" } else { "0" };
    let path = format!("/proc/sys/net/ipv4/conf/{ifname}/rp_filter");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == value => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    match crate::sysctl::set_interface("ipv4", ifname, "rp_filter", value) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        done => done.map_err(DriverError::Sysctl),
    }
}

impl GuardManager {
    /// Applies `delta` to the node's table (nothing when anti-spoofing is off: the table has
    /// no guard chain). On failure the model is as before the call, and the caller computes
    /// everything.
    pub fn apply(
        &mut self,
        nft: &mut NftManager,
        delta: &GuardDelta,
        stats: &mut ApplyStats,
    ) -> Result<(), DriverError> {
        if delta.is_empty() {
            return Ok(());
        }
        let Some((table, _)) = nft.model_mut() else {
            return Err(DriverError::NoBase);
        };
        let edits = match guard::apply_delta(table, delta) {
            Ok(Some(edits)) => edits,
            Ok(None) => return Ok(()),
            Err(Recompute) => {
                return Err(DriverError::Recompute(
                    "the anti-spoofing chain comes or goes with this change",
                ))
            }
        };
        if edits.is_empty() {
            return Ok(());
        }
        let (exact, interval): (Vec<SetEdit>, Vec<SetEdit>) =
            edits.into_iter().partition(|e| !e.interval);
        if let Err(e) = self.send_exact(table, &exact) {
            undo(table, &exact);
            undo(table, &interval);
            return Err(failed(e));
        }
        if let Err(e) = send_interval(table, &interval) {
            undo(table, &interval);
            return Err(failed(e));
        }
        stats.nft_applied = true;
        Ok(())
    }

    /// Makes the IPv4 reverse-path filter of workload interfaces what `table` says
    /// ([`guard::strict_interfaces`]): of the interfaces in `only` (a delta's), or of every
    /// workload interface in the namespace (a full apply, a resync).
    pub fn reverse_path(
        &self,
        table: &Table,
        only: Option<&BTreeSet<String>>,
    ) -> Result<(), DriverError> {
        let strict = guard::strict_interfaces(table);
        let names: BTreeSet<String> = match only {
            Some(names) => names.clone(),
            None => std::fs::read_dir("/proc/sys/net/ipv4/conf")
                .map_err(DriverError::Sysctl)?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(malla_api::HOST_IFNAME_PREFIX))
                .collect(),
        };
        for name in &names {
            set_reverse_path(name, strict.contains(name))?;
        }
        Ok(())
    }

    fn send_exact(&mut self, table: &Table, edits: &[SetEdit]) -> Result<(), NftError> {
        if edits.is_empty() {
            return Ok(());
        }
        let family = diff::family(&table.family)
            .ok_or_else(|| NftError::Rejected(format!("table family {}", table.family)))?;
        let mut changes = Vec::new();
        for e in edits {
            let type_ = table
                .sets
                .get(e.set)
                .map(|s| s.type_.as_str())
                .unwrap_or("");
            let key = Kind::of_key(type_)
                .ok_or_else(|| NftError::Rejected(format!("set {} of type {type_}", e.set)))?;
            changes.push(SetChange {
                set: e.set.to_string(),
                layout: Layout {
                    key,
                    value: Value::None,
                },
                delete: e.delete.iter().cloned().map(Element::key).collect(),
                add: e.add.iter().cloned().map(Element::key).collect(),
            });
        }
        let sock = match self.socket.take() {
            Some(s) => s,
            None => ElementSocket::open(None).map_err(NftError::Spawn)?,
        };
        let sent = sock.apply(family, &table.name, &changes);
        if sent.is_ok() {
            self.socket = Some(sock);
        }
        sent
    }
}

/// Interval-set changes as one `nft` transaction: deletions, then additions.
fn send_interval(table: &Table, edits: &[SetEdit]) -> Result<(), NftError> {
    let text = interval_text(table, edits);
    if text.is_empty() {
        return Ok(());
    }
    crate::nft::apply(None, &text)
}

fn interval_text(table: &Table, edits: &[SetEdit]) -> String {
    let mut out = String::new();
    let tbl = format!("{} {}", table.family, table.name);
    for (verb, pick) in [
        (
            "delete",
            (|e: &SetEdit| &e.delete) as fn(&SetEdit) -> &Vec<_>,
        ),
        ("add", |e: &SetEdit| &e.add),
    ] {
        for e in edits {
            let keys = pick(e);
            if keys.is_empty() {
                continue;
            }
            let list: Vec<String> = keys.iter().map(ToString::to_string).collect();
            out.push_str(&format!(
                "{verb} element {tbl} {} {{ {} }}\n",
                e.set,
                list.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_changes_delete_first() {
        let t = Table::new("inet", "malla");
        let k = |s: &str| s.parse::<malla_calc::nft::Key>().unwrap();
        let edits = vec![SetEdit {
            set: guard::ALLOW_V4,
            interval: true,
            delete: vec![k("\"mla0\" . 198.18.8.0/25")],
            add: vec![k("\"mla0\" . 198.18.8.0/24")],
        }];
        assert_eq!(
            interval_text(&t, &edits),
            "delete element inet malla guard-allow-v4 { \"mla0\" . 198.18.8.0/25 }\n\
             add element inet malla guard-allow-v4 { \"mla0\" . 198.18.8.0/24 }\n"
        );
    }
}
