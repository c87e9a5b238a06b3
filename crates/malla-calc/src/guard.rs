//! Anti-spoofing: only a pod's own addresses, and the prefixes its
//! `malla.dev/allowed-source-prefixes` annotation allows, may leave its host-side veth.
//!
//! Two mechanisms, so that the common case costs no rule on the packet path:
//! - **IPv4, kernel**: every workload interface without allowed IPv4 prefixes gets strict
//!   reverse-path filtering (`net.ipv4.conf.<veth>.rp_filter = 1`, [`strict_interfaces`]). A
//!   pod's /32 routes point at its veth, so the kernel drops, while routing the packet, any
//!   IPv4 source whose route back is not that veth: another pod's, an unused pool address (the
//!   node's blackhole route), an outside address or a node's (the underlay). Counted in the
//!   node's `IPReversePathFilter` statistic. This is Calico's mechanism for IPv4.
//! - **nft chain** [`CHAIN`], hooked at prerouting with raw priority (before conntrack: a
//!   forged packet never creates a conntrack entry, is never DNATed nor routed). Rendered when
//!   the kernel check cannot do the job: for IPv6 (no reverse-path sysctl; the cluster has an
//!   IPv6 pool or a pod an IPv6 address), for a pod with allowed prefixes (its veth's
//!   `rp_filter` is 0 and the chain holds it), and when the node's `conf.all.rp_filter` is 2
//!   (loose wins over a veth's 1: [`GuardConfig::kernel_reverse_path`] false). When it is
//!   there it checks every family by itself. Measured with `guard-bench`: on a 2-CPU VM the
//!   chain made a pod-to-pod connect ~4 % slower (any extra rule or hook on that path cost
//!   3–4 %), strict `rp_filter` ~1.5 %.
//!
//! In the chain, a packet that comes in on a workload interface (a name starting with
//! [`malla_api::HOST_IFNAME_PREFIX`]) passes when `iifname . saddr` is in the set of own
//! addresses ([`SET_V4`], [`SET_V6`]: exact, hashed) or in the set of allowed prefixes
//! ([`ALLOW_V4`], [`ALLOW_V6`]: interval); IPv6 link-local sources and `::` (duplicate address
//! detection) always pass, so neighbour discovery works. Everything else is dropped, counted by
//! a counter rule just before the drop (comments `spoofed-v4`, `spoofed-v6`). An interface the node has no
//! endpoint for yet passes nothing, as Calico's `cali+` interfaces. The sets are there whenever
//! anti-spoofing is on (the CNI plugin adds a new pod's addresses to them at ADD, and sets its
//! veth's `rp_filter`), the chain only when needed.
//!
//! What the sets hold is a function of the local endpoints and the pods' annotations,
//! [`GuardEntry`] values. [`GuardNode`] keeps them per interface and hands over what changed
//! ([`GuardDelta`]), which travels in the links node's delta (a new local pod never waits for
//! a full computation); [`render`] puts the whole of them into a full table and
//! [`apply_delta`] applies a delta to a rendered table, so the driver's model of the table
//! stays what a full render gives (tested below); a delta that would need the chain added or
//! taken away asks for a full computation instead ([`Recompute`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use ipnet::IpNet;
use malla_api::{Pod, WorkloadEndpoint};

use crate::nft::element::IfName;
use crate::nft::{self, BaseChain, Chain, Key, Part, Set};
use crate::policy::flowlog::LogPoint;

/// The anti-spoofing chain of Malla's table.
pub const CHAIN: &str = "guard";
/// `ifname . ipv4_addr`: each workload interface's own IPv4 addresses.
pub const SET_V4: &str = "guard-v4";
/// `ifname . ipv6_addr`: each workload interface's own IPv6 addresses.
pub const SET_V6: &str = "guard-v6";
/// `ifname . ipv4_addr`, interval: the IPv4 prefixes a pod is allowed besides its own.
pub const ALLOW_V4: &str = "guard-allow-v4";
/// `ifname . ipv6_addr`, interval: the IPv6 prefixes a pod is allowed besides its own.
pub const ALLOW_V6: &str = "guard-allow-v6";
/// The comment of the IPv4 drop rule, whose counter counts dropped forged packets.
pub const DROPPED_V4: &str = "spoofed-v4";
/// The comment of the IPv6 drop rule.
pub const DROPPED_V6: &str = "spoofed-v6";

/// One source a workload interface may send from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuardEntry {
    /// The host-side interface.
    pub ifname: String,
    /// An own address (a host prefix) or an allowed prefix.
    pub net: IpNet,
    /// An allowed prefix (from the annotation) rather than an own address.
    pub allowed: bool,
}

impl GuardEntry {
    /// The set the entry belongs to.
    pub fn set(&self) -> &'static str {
        match (self.allowed, self.net.addr().is_ipv4()) {
            (false, true) => SET_V4,
            (false, false) => SET_V6,
            (true, true) => ALLOW_V4,
            (true, false) => ALLOW_V6,
        }
    }

    /// The set element (`"mla…" . 198.18.0.5`); None when the name is not an interface name.
    pub fn key(&self) -> Option<Key> {
        let ifname = IfName::new(&self.ifname)?;
        Some(Key::new([Part::Iface(ifname), Part::net(&self.net)]))
    }
}

/// What changed in the entries: what to remove, then what to add.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuardDelta {
    pub removed: Vec<GuardEntry>,
    pub added: Vec<GuardEntry>,
}

impl GuardDelta {
    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

/// The entries of one interface, given its endpoints and each one's allowed prefixes: the own
/// addresses, and the allowed prefixes merged per family into prefixes that do not overlap
/// (an interval set refuses overlapping elements).
pub fn interface_entries<'a>(
    ifname: &str,
    endpoints: impl IntoIterator<Item = (&'a WorkloadEndpoint, &'a [IpNet])>,
) -> BTreeSet<GuardEntry> {
    let mut out = BTreeSet::new();
    let mut allowed: Vec<IpNet> = Vec::new();
    for (ep, prefixes) in endpoints {
        for ip in ep.addrs() {
            out.insert(GuardEntry {
                ifname: ifname.to_string(),
                net: IpNet::from(ip),
                allowed: false,
            });
        }
        allowed.extend(prefixes.iter().map(IpNet::trunc));
    }
    for net in IpNet::aggregate(&allowed) {
        out.insert(GuardEntry {
            ifname: ifname.to_string(),
            net,
            allowed: true,
        });
    }
    out
}

/// The anti-spoofing entries of this node's pods, kept current record by record.
#[derive(Debug, Default)]
pub struct GuardNode {
    /// Allowed prefixes of every pod that has some, by namespace and name.
    prefixes: HashMap<(String, String), Vec<IpNet>>,
    /// Local endpoints by host interface (one each, unless records disagree).
    local: BTreeMap<String, Vec<WorkloadEndpoint>>,
    /// Entries per interface, as last handed over.
    current: BTreeMap<String, BTreeSet<GuardEntry>>,
    /// Interfaces whose entries must be computed again.
    dirty: BTreeSet<String>,
}

impl GuardNode {
    pub fn new() -> Self {
        Self::default()
    }

    /// A local endpoint changed from `before` to `after` (either None: created, deleted).
    pub fn endpoint(
        &mut self,
        before: Option<&WorkloadEndpoint>,
        after: Option<&WorkloadEndpoint>,
    ) {
        if let Some(b) = before {
            if let Some(list) = self.local.get_mut(&b.host_ifname) {
                if let Some(i) = list.iter().position(|e| e == b) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.local.remove(&b.host_ifname);
                }
            }
            self.dirty.insert(b.host_ifname.clone());
        }
        if let Some(a) = after {
            self.local
                .entry(a.host_ifname.clone())
                .or_default()
                .push(a.clone());
            self.dirty.insert(a.host_ifname.clone());
        }
    }

    /// A pod changed from `before` to `after`; true when that changes a local interface's
    /// entries (its allowed prefixes).
    pub fn pod(&mut self, before: Option<&Pod>, after: Option<&Pod>) -> bool {
        let mut touched = BTreeSet::new();
        for (p, keep) in [(before, false), (after, true)] {
            let Some(p) = p else { continue };
            let id = (p.namespace.clone(), p.name.clone());
            let old = self.prefixes.get(&id);
            let new = (keep && !p.allowed_source_prefixes.is_empty())
                .then_some(&p.allowed_source_prefixes);
            if old == new {
                continue;
            }
            match new {
                Some(n) => self.prefixes.insert(id.clone(), n.clone()),
                None => self.prefixes.remove(&id),
            };
            touched.insert(id);
        }
        let mut changed = false;
        for (ifname, eps) in &self.local {
            if eps
                .iter()
                .any(|e| touched.contains(&(e.namespace.clone(), e.pod.clone())))
            {
                self.dirty.insert(ifname.clone());
                changed = true;
            }
        }
        changed
    }

    fn entries_of(&self, ifname: &str) -> BTreeSet<GuardEntry> {
        let eps = self
            .local
            .get(ifname)
            .map(Vec::as_slice)
            .unwrap_or_default();
        interface_entries(
            ifname,
            eps.iter().map(|e| {
                let prefixes = self
                    .prefixes
                    .get(&(e.namespace.clone(), e.pod.clone()))
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                (e, prefixes)
            }),
        )
    }

    /// Computes the entries of every interface a change touched again, and hands over what
    /// changed since the last call.
    pub fn take_delta(&mut self) -> GuardDelta {
        let mut delta = GuardDelta::default();
        for ifname in std::mem::take(&mut self.dirty) {
            let new = self.entries_of(&ifname);
            let old = self.current.remove(&ifname).unwrap_or_default();
            delta.removed.extend(old.difference(&new).cloned());
            delta.added.extend(new.difference(&old).cloned());
            if !new.is_empty() {
                self.current.insert(ifname, new);
            }
        }
        delta
    }

    /// Every entry, as last handed over.
    pub fn entries(&self) -> BTreeSet<GuardEntry> {
        self.current.values().flatten().cloned().collect()
    }
}

fn guard_set(interval: bool, v4: bool) -> Set {
    Set {
        type_: format!("ifname . {}", if v4 { "ipv4_addr" } else { "ipv6_addr" }),
        flags: if interval {
            vec!["interval".into()]
        } else {
            Vec::new()
        },
        timeout: None,
        elements: BTreeSet::new(),
    }
}

/// How a node's anti-spoofing is rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuardConfig {
    /// The cluster config's `antiSpoofing`.
    pub on: bool,
    /// The node's kernel checks IPv4 sources strictly on a veth whose `rp_filter` is 1 (its
    /// `conf.all.rp_filter` is not 2); the agent finds out at start. False renders the chain
    /// whatever the entries (the pure computation's default: what the goldens show).
    pub kernel_reverse_path: bool,
    /// The cluster has an IPv6 pool.
    pub ipv6: bool,
}

impl GuardConfig {
    /// The chain is needed for these entries.
    fn needs_chain(&self, entries: &BTreeSet<GuardEntry>) -> bool {
        self.on
            && (!self.kernel_reverse_path
                || self.ipv6
                || entries.iter().any(GuardEntry::needs_chain))
    }
}

impl GuardEntry {
    /// Only the chain checks this entry's interface: an IPv6 address or an allowed prefix.
    fn needs_chain(&self) -> bool {
        self.allowed || self.net.addr().is_ipv6()
    }
}

/// The sets whose elements need the chain ([`GuardEntry::needs_chain`]).
const CHAIN_SETS: [&str; 3] = [SET_V6, ALLOW_V4, ALLOW_V6];

/// The table's entries need the chain.
fn entries_need_chain(t: &nft::Table) -> bool {
    CHAIN_SETS
        .iter()
        .any(|s| t.sets.get(*s).is_some_and(|set| !set.elements.is_empty()))
}

/// The workload interfaces whose IPv4 sources the kernel checks (strict `rp_filter`) in a
/// table [`render`] made: those with an own address and no allowed IPv4 prefix. Empty when
/// anti-spoofing is off (every other workload interface gets `rp_filter` 0).
pub fn strict_interfaces(t: &nft::Table) -> BTreeSet<String> {
    let names = |set: &str| -> BTreeSet<String> {
        t.sets
            .get(set)
            .into_iter()
            .flat_map(|s| s.elements.iter())
            .filter_map(|k| {
                k.parts().find_map(|p| match p {
                    Part::Iface(n) => Some(n.as_str().to_string()),
                    _ => None,
                })
            })
            .collect()
    };
    let loose = names(ALLOW_V4);
    let mut out = names(SET_V4);
    out.extend(names(SET_V6));
    out.retain(|n| !loose.contains(n));
    out
}

/// Adds the anti-spoofing sets holding `entries` to `t`, and the chain when it is needed
/// (module doc); nothing when anti-spoofing is off.
pub fn render(entries: &BTreeSet<GuardEntry>, cfg: GuardConfig, t: &mut nft::Table) {
    if !cfg.on {
        return;
    }
    for (name, interval, v4) in [
        (SET_V4, false, true),
        (SET_V6, false, false),
        (ALLOW_V4, true, true),
        (ALLOW_V6, true, false),
    ] {
        t.sets.insert(name.into(), guard_set(interval, v4));
    }
    for e in entries {
        if let (Some(key), Some(set)) = (e.key(), t.sets.get_mut(e.set())) {
            set.elements.insert(key);
        }
    }
    if !cfg.needs_chain(entries) {
        return;
    }
    let workloads = format!("\"{}*\"", malla_api::HOST_IFNAME_PREFIX);
    // Each family's drops: counted (every one, logged or not), then logged within the deny
    // log's limit (beyond it counted lost and dropped in the lost chain), then dropped.
    let [over, log] = LogPoint::Spoofed.deny_rules(t);
    // A pod's own packet of either family passes at the second or third rule; the rarer
    // passes (link-local, allowed prefixes) follow, then each family's drop.
    let mut rules = vec![
        format!("iifname != {workloads} accept"),
        format!("iifname . ip saddr @{SET_V4} accept"),
        format!("iifname . ip6 saddr @{SET_V6} accept"),
        "ip6 saddr { ::, fe80::/10 } accept".to_string(),
        format!("iifname . ip saddr @{ALLOW_V4} accept"),
        format!("iifname . ip6 saddr @{ALLOW_V6} accept"),
    ];
    for (fam, counter) in [("ipv4", DROPPED_V4), ("ipv6", DROPPED_V6)] {
        rules.extend([
            format!("meta nfproto {fam} counter comment \"{counter}\""),
            format!("meta nfproto {fam} {over}"),
            format!("meta nfproto {fam} {log}"),
            format!("meta nfproto {fam} drop"),
        ]);
    }
    t.chains.insert(
        CHAIN.into(),
        Chain {
            base: Some(BaseChain::new("filter", "prerouting", "raw")),
            rules,
        },
    );
}

/// Element changes to one set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SetEdit {
    pub set: &'static str,
    pub interval: bool,
    pub delete: Vec<Key>,
    pub add: Vec<Key>,
}

/// A delta [`apply_delta`] leaves to a full computation: after it, the chain would have to be
/// added (the first IPv6 address or allowed prefix on a node that checks IPv4 in the kernel)
/// or could go (the last one left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recompute;

/// Applies `delta` to a table [`render`] made, and returns the element changes per set that
/// turn the kernel's table the same way (removals of what is there, additions of what is not);
/// None when the table has no anti-spoofing (it is off). On [`Recompute`] nothing is changed.
pub fn apply_delta(
    t: &mut nft::Table,
    delta: &GuardDelta,
) -> Result<Option<Vec<SetEdit>>, Recompute> {
    if !t.sets.contains_key(SET_V4) {
        return Ok(None);
    }
    let chain = t.chains.contains_key(CHAIN);
    let needed_before = entries_need_chain(t);
    let mut edits: BTreeMap<&'static str, SetEdit> = BTreeMap::new();
    for (e, add) in delta
        .removed
        .iter()
        .map(|e| (e, false))
        .chain(delta.added.iter().map(|e| (e, true)))
    {
        let Some(key) = e.key() else { continue };
        let Some(set) = t.sets.get_mut(e.set()) else {
            continue;
        };
        let changed = match add {
            true => set.elements.insert(key.clone()),
            false => set.elements.remove(&key),
        };
        if !changed {
            continue;
        }
        let edit = edits.entry(e.set()).or_insert_with(|| SetEdit {
            set: e.set(),
            interval: e.allowed,
            ..SetEdit::default()
        });
        match add {
            true => edit.add.push(key),
            false => edit.delete.push(key),
        }
    }
    let edits: Vec<SetEdit> = edits
        .into_values()
        .filter(|e| !e.delete.is_empty() || !e.add.is_empty())
        .collect();
    let needed_after = entries_need_chain(t);
    if (!chain && needed_after) || (chain && needed_before && !needed_after) {
        undo(t, &edits);
        return Err(Recompute);
    }
    Ok(Some(edits))
}

/// Puts `edits` back out of `t` (the kernel refused them, or the delta needs a full
/// computation).
pub fn undo(t: &mut nft::Table, edits: &[SetEdit]) {
    for e in edits {
        if let Some(set) = t.sets.get_mut(e.set) {
            for k in &e.add {
                set.elements.remove(k);
            }
            set.elements.extend(e.delete.iter().cloned());
        }
    }
}

#[cfg(test)]
mod tests;
