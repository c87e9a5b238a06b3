//! DNS-name egress rules for pods: Calico's `destination.domains` (and the
//! `allowedEgressDomains` of a GlobalNetworkSet an egress Allow rule's destination selector
//! picks) and ClusterNetworkPolicy's `domainNames` peers.
//!
//! A rule naming domains matches a destination address when the subject pod's own DNS answers
//! gave that address for a name the rule's patterns match ([`malla_api::domain`]). Addresses
//! are not configuration: per pod and pattern list there is a pair of nft sets
//! `dns-<hash>-v4` / `-v6` (`flags timeout`, so the table's diff leaves their elements alone:
//! [`crate::nft::Set::kernel_managed`]), which the rule matches with `ip daddr @dns-…`; the
//! agent's DNS proxy adds an answer's addresses to them, each with the answer's TTL as its
//! timeout, before the answer reaches the pod. Pods that learned nothing match nothing.
//!
//! [`DnsView`] is what pods learned, as the reference reads it (`name → addresses` per pod);
//! [`dns_sets`] lists a node's sets with the pods and patterns behind them, which the proxy
//! fills and [`fill`] fills from a view (the property test's way of learning). A rule's own
//! domains take any action (Allow, Deny, Pass, Log; Accept, Deny, Pass): a Deny rule drops what
//! the pod learned for a denied name before any later rule sees it, as tier order says. Network
//! sets' `allowedEgressDomains` count in egress Allow rules only (Calico's documented meaning).
//! Host endpoints never match domain rules (a host's own DNS is not proxied).
//!
//! What the agent learned is served as [`LearnedRecord`]s (its `GET /dns`), which `malla policy
//! trace` turns back into a view ([`DnsView::from_records`]) and explains with
//! [`domain_rules`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use malla_api::calico::{Action, Rule};
use malla_api::cnp::{CnpRule, Peer};
use malla_api::selector::Selector;

use super::tiers::{applying, Item, TierInputs};
use super::{fnv, Direction, PolicyPod};
use crate::host::reference::{rule_matches_in, HostPacket};
use crate::host::render::{rule_matches, SelectorSets};
use crate::host::{picks, Labelled};
use crate::nft::{self, Key, Part, Set};

/// Where the agent's DNS proxy listens in the node's namespace (UDP and TCP): pods' queries to
/// port 53 are redirected there.
pub const PROXY_PORT: u16 = 15053;

/// How long the agent keeps a record after its TTL ran out (so a trace can say it expired).
pub const EXPIRED_KEPT_SECS: u64 = 600;

/// One address in one of a pod's DNS sets, as the agent's proxy put it there (its `GET /dns`,
/// one JSON line each): the latest answer for it, whose TTL is the set element's timeout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LearnedRecord {
    /// The querying pod, `namespace/name`.
    pub pod: String,
    /// The set's base name ([`set_name`]).
    pub set: String,
    /// The set's patterns (the rule's domains).
    pub patterns: Vec<String>,
    /// The name the pod asked (normalized).
    pub name: String,
    /// The owner of the address record: the name asked or the end of its CNAME chain.
    pub record: String,
    /// `A` or `AAAA`.
    #[serde(rename = "type")]
    pub rtype: String,
    pub address: IpAddr,
    /// The answer's TTL in seconds (as the set element's timeout: at least 1, at most a day).
    pub ttl: u32,
    /// Milliseconds until the element times out; zero or less: it has, the address is no
    /// longer a member.
    pub ttl_left_ms: i64,
}

impl LearnedRecord {
    /// Whether the address is still in the set.
    pub fn live(&self) -> bool {
        self.ttl_left_ms > 0
    }

    /// `lat7.allowed.test A 198.19.1.7 (ttl 30 s, 12 s left)`, or `… expired 3 s ago`.
    pub fn describe(&self) -> String {
        let via = if self.record == self.name {
            String::new()
        } else {
            format!(" via CNAME {}", self.record)
        };
        let left = if self.live() {
            format!("{} s left", (self.ttl_left_ms + 999) / 1000)
        } else {
            format!("expired {} s ago", -self.ttl_left_ms / 1000)
        };
        format!(
            "{}{via} {} {} (ttl {} s, {left})",
            self.name, self.rtype, self.address, self.ttl
        )
    }
}

/// What pods learned from their DNS answers: pod key (`namespace/name`) → name (normalized)
/// → addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsView {
    pub learned: BTreeMap<String, BTreeMap<String, BTreeSet<IpAddr>>>,
}

impl DnsView {
    /// An empty view (nothing learned).
    pub const EMPTY: &'static DnsView = &DnsView {
        learned: BTreeMap::new(),
    };

    /// Records that `pod` was told `name` has `addrs`.
    pub fn learn(&mut self, pod: &str, name: &str, addrs: impl IntoIterator<Item = IpAddr>) {
        self.learned
            .entry(pod.to_string())
            .or_default()
            .entry(malla_api::domain::normalize(name))
            .or_default()
            .extend(addrs);
    }

    /// The view of the records still in their sets.
    pub fn from_records<'a>(records: impl IntoIterator<Item = &'a LearnedRecord>) -> DnsView {
        let mut v = DnsView::default();
        for r in records.into_iter().filter(|r| r.live()) {
            v.learn(&r.pod, &r.name, [r.address]);
        }
        v
    }

    /// The first name matching one of `patterns` that gave `ip` to `pod`, if any.
    pub fn source(&self, pod: &str, patterns: &[String], ip: IpAddr) -> Option<&str> {
        self.learned.get(pod)?.iter().find_map(|(name, addrs)| {
            (addrs.contains(&ip) && patterns.iter().any(|p| malla_api::domain::matches(p, name)))
                .then_some(name.as_str())
        })
    }
}

/// The base name (without `-v4`/`-v6`) of the set of `pod`'s addresses for `patterns`.
pub fn set_name(pod: &str, patterns: &[String]) -> String {
    let mut p: Vec<String> = patterns.iter().map(|x| x.to_ascii_lowercase()).collect();
    p.sort();
    p.dedup();
    format!("dns-{:016x}", fnv(&format!("{pod}|{}", p.join(","))))
}

/// A node's DNS set: the pod it belongs to (key and addresses, the sources of its queries) and
/// the patterns whose answers fill it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSet {
    /// Base name; the sets are `{set}-v4` and `{set}-v6`.
    pub set: String,
    pub pod: String,
    /// The pod's host-side interface (its queries are redirected to the proxy).
    pub ifname: String,
    pub pod_ips: Vec<IpAddr>,
    pub patterns: Vec<String>,
}

/// The global network sets `r`'s destination selector picks, as rule selectors see them.
fn picked_domains(inp: &TierInputs, r: &Rule, scope: Option<&str>) -> Vec<String> {
    let d = &r.destination;
    if d.selector.is_none() && d.namespace_selector.is_none() {
        return Vec::new();
    }
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| Selector::parse(t).ok());
    let (sel, ns) = (parse(&d.selector), parse(&d.namespace_selector));
    let mut out: Vec<String> = Vec::new();
    for s in &inp.calico.network_sets {
        if s.spec.allowed_egress_domains.is_empty() || s.validate().is_err() {
            continue;
        }
        let l = Labelled {
            labels: s.labels.clone(),
            namespace: None,
            ns_name: None,
            nets: s.spec.nets.clone(),
        };
        if picks(sel.as_ref(), ns.as_ref(), &l, scope) {
            out.extend(s.spec.allowed_egress_domains.iter().cloned());
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A Calico rule's domain parts in `dir`: the rule as a domain rule (its domains cleared) with
/// its patterns, and whether it is the rule's whole match (its own `domains`) or an
/// alternative besides its other match (network sets' `allowedEgressDomains`).
fn calico_domain_rule(
    inp: &TierInputs,
    r: &Rule,
    dir: Direction,
    scope: Option<&str>,
) -> Option<(Rule, Vec<String>, bool)> {
    if dir != Direction::Egress {
        return None;
    }
    if !r.destination.domains.is_empty() {
        let mut c = r.clone();
        let pats = std::mem::take(&mut c.destination.domains);
        return Some((c, pats, true));
    }
    if r.action != Action::Allow {
        return None;
    }
    let pats = picked_domains(inp, r, scope);
    if pats.is_empty() {
        return None;
    }
    let mut c = r.clone();
    c.destination.selector = None;
    c.destination.namespace_selector = None;
    Some((c, pats, false))
}

/// Whether Calico rule `r` of `pod` (the subject) in `dir` matches `p`: the reference.
pub fn calico_rule_matches(
    inp: &TierInputs,
    pod: &PolicyPod,
    dir: Direction,
    r: &Rule,
    p: &HostPacket,
    scope: Option<&str>,
) -> bool {
    let by_name = |c: &Rule, pats: &[String]| {
        rule_matches_in(c, p, inp.ents, scope) && inp.dns.source(&pod.key(), pats, p.dst).is_some()
    };
    match calico_domain_rule(inp, r, dir, scope) {
        Some((c, pats, true)) => by_name(&c, &pats),
        Some((c, pats, false)) => rule_matches_in(r, p, inp.ents, scope) || by_name(&c, &pats),
        None => rule_matches_in(r, p, inp.ents, scope),
    }
}

/// Declares the pair of sets `base-v4`/`base-v6` in `table` (empty: the proxy fills them).
fn declare(table: &mut nft::Table, base: &str) {
    for (fam, ty) in [("v4", "ipv4_addr"), ("v6", "ipv6_addr")] {
        table
            .sets
            .entry(format!("{base}-{fam}"))
            .or_insert_with(|| Set {
                type_: ty.into(),
                flags: vec!["timeout".into()],
                timeout: None,
                elements: Default::default(),
            });
    }
}

/// The texts of a domain rule `c` (domains cleared) for `pod` and `pats`, one per family.
fn domain_texts(
    inp: &TierInputs,
    pod: &PolicyPod,
    c: &Rule,
    pats: &[String],
    sets: &mut SelectorSets,
    scope: Option<&str>,
    table: &mut nft::Table,
) -> Vec<String> {
    let base = set_name(&pod.key(), pats);
    declare(table, &base);
    rule_matches(c, inp.ents, sets, scope)
        .into_iter()
        .map(|t| {
            if t.starts_with("meta nfproto ipv6") {
                format!("{t} ip6 daddr @{base}-v6")
            } else {
                format!("{t} ip daddr @{base}-v4")
            }
        })
        .collect()
}

/// The match texts of Calico rule `r` of `pod` in `dir` (the tier chains' hook: rules without
/// domains are [`rule_matches`]'s).
pub(crate) fn calico_rule_texts(
    inp: &TierInputs,
    pod: &PolicyPod,
    dir: Direction,
    r: &Rule,
    sets: &mut SelectorSets,
    scope: Option<&str>,
    table: &mut nft::Table,
) -> Vec<String> {
    match calico_domain_rule(inp, r, dir, scope) {
        Some((c, pats, true)) => domain_texts(inp, pod, &c, &pats, sets, scope, table),
        Some((c, pats, false)) => {
            let mut out = rule_matches(r, inp.ents, sets, scope);
            out.extend(domain_texts(inp, pod, &c, &pats, sets, scope, table));
            out
        }
        None => rule_matches(r, inp.ents, sets, scope),
    }
}

/// Whether a ClusterNetworkPolicy peer names domains that gave `ip` to `pod` (the subject).
pub fn cnp_peer_matches(inp: &TierInputs, pod: &PolicyPod, peer: &Peer, ip: IpAddr) -> bool {
    peer.domain_names
        .as_ref()
        .is_some_and(|d| inp.dns.source(&pod.key(), d, ip).is_some())
}

/// The match texts of a ClusterNetworkPolicy rule's `domainNames` peers for `pod` (egress),
/// one per peer, family and protocol (named ports cannot go with domain names).
pub(crate) fn cnp_rule_texts(pod: &PolicyPod, r: &CnpRule, table: &mut nft::Table) -> Vec<String> {
    let mut out = Vec::new();
    for names in r.peers.iter().filter_map(|p| p.domain_names.as_ref()) {
        let base = set_name(&pod.key(), names);
        declare(table, &base);
        for (kw, fam) in [("ip", "v4"), ("ip6", "v6")] {
            let peer = format!("{kw} daddr @{base}-{fam} ");
            if r.protocols.is_empty() {
                out.push(peer);
                continue;
            }
            for p in &r.protocols {
                super::tiers::cnp_numbered_port_texts(p, &peer, &mut out);
            }
        }
    }
    out
}

/// The DNS sets of node `me`'s pods: what the proxy fills, per querying pod.
pub fn dns_sets(inp: &TierInputs, me: &str) -> Vec<DnsSet> {
    let mut out: BTreeMap<String, DnsSet> = BTreeMap::new();
    for pod in inp.pods.iter().filter(|p| p.node == me) {
        let (calico, groups) = applying(inp, pod, Direction::Egress);
        if !calico {
            continue;
        }
        let key = pod.key();
        let mut add = |pats: &[String]| {
            let set = set_name(&key, pats);
            out.entry(set.clone()).or_insert_with(|| DnsSet {
                set,
                pod: key.clone(),
                ifname: pod.host_ifname.to_string(),
                pod_ips: pod.ips.clone(),
                patterns: pats.to_vec(),
            });
        };
        for g in &groups {
            for item in &g.items {
                match item {
                    Item::Calico { rules, scope, .. } => {
                        for r in rules.iter() {
                            if let Some((_, pats, _)) =
                                calico_domain_rule(inp, r, Direction::Egress, *scope)
                            {
                                add(&pats);
                            }
                        }
                    }
                    Item::Cluster { rules, .. } => {
                        for names in rules
                            .iter()
                            .flat_map(|r| &r.peers)
                            .filter_map(|p| p.domain_names.as_ref())
                        {
                            add(names);
                        }
                    }
                    Item::Kubernetes(_) => {}
                }
            }
        }
    }
    out.into_values().collect()
}

/// A rule of a pod's egress tiers that names domains: where it is, what it does, and the
/// patterns whose answers make an address a member.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainRule {
    pub tier: String,
    pub policy: String,
    /// The rule's index in the policy's egress rules.
    pub index: usize,
    /// `Allow`, `Deny`, `Pass`, `Log` (Calico) or `Accept`, `Deny`, `Pass` (cluster).
    pub action: String,
    pub patterns: Vec<String>,
}

/// The domain rules of `pod`'s egress, in tier order (none when no Calico policy applies).
pub fn domain_rules(inp: &TierInputs, pod: &PolicyPod) -> Vec<DomainRule> {
    let (calico, groups) = applying(inp, pod, Direction::Egress);
    let mut out = Vec::new();
    if !calico {
        return out;
    }
    for g in &groups {
        for item in &g.items {
            let mut push = |index: usize, action: String, patterns: Vec<String>| {
                out.push(DomainRule {
                    tier: g.tier.clone(),
                    policy: item.name(),
                    index,
                    action,
                    patterns,
                })
            };
            match item {
                Item::Calico { rules, scope, .. } => {
                    for (i, r) in rules.iter().enumerate() {
                        if let Some((_, pats, _)) =
                            calico_domain_rule(inp, r, Direction::Egress, *scope)
                        {
                            push(i, format!("{:?}", r.action), pats);
                        }
                    }
                }
                Item::Cluster { rules, .. } => {
                    for (i, r) in rules.iter().enumerate() {
                        for names in r.peers.iter().filter_map(|p| p.domain_names.as_ref()) {
                            push(i, format!("{:?}", r.action), names.clone());
                        }
                    }
                }
                Item::Kubernetes(_) => {}
            }
        }
    }
    out
}

/// Adds to `table`'s DNS sets what `view` says their pods learned (the proxy's work, done from
/// a view: tests and the reference's rendered twin).
pub fn fill(table: &mut nft::Table, sets: &[DnsSet], view: &DnsView) {
    for s in sets {
        let Some(names) = view.learned.get(&s.pod) else {
            continue;
        };
        for (name, addrs) in names {
            if !s
                .patterns
                .iter()
                .any(|p| malla_api::domain::matches(p, name))
            {
                continue;
            }
            for ip in addrs {
                let fam = if ip.is_ipv6() { "v6" } else { "v4" };
                if let Some(set) = table.sets.get_mut(&format!("{}-{fam}", s.set)) {
                    set.elements.insert(Key::one(Part::Addr(*ip)));
                }
            }
        }
    }
}

/// The set of interfaces whose pods' DNS queries go through the proxy.
pub const PROXIED_PODS: &str = "dns-proxied-pods";
/// The chain checking a proxied query against the pod's egress policy (original destination).
pub const CHECK_CHAIN: &str = "dns-check";
/// The chain redirecting proxied queries to the proxy.
pub const REDIRECT_CHAIN: &str = "dns-redirect";

/// The proxy's part of the node's table, when some local pod has a DNS set and the node has an
/// IPv4 address: UDP port 53 from those pods' interfaces is first put through the pod's egress
/// policy with its original destination (a filter chain before NAT, jumping into the egress
/// dispatch: a denied query is dropped there), then DNATed to the node's address on
/// [`PROXY_PORT`], and the policy input chain accepts it there (it was checked already).
pub fn render_proxy(sets: &[DnsSet], node_ip: Option<std::net::Ipv4Addr>, table: &mut nft::Table) {
    use crate::nft::element::IfName;
    let Some(ip) = node_ip else { return };
    let ifaces: BTreeSet<Key> = sets
        .iter()
        .filter_map(|s| IfName::new(&s.ifname))
        .map(|i| Key::one(Part::Iface(i)))
        .collect();
    if ifaces.is_empty() {
        return;
    }
    table.sets.insert(
        PROXIED_PODS.into(),
        Set {
            type_: "ifname".into(),
            flags: Vec::new(),
            timeout: None,
            elements: ifaces,
        },
    );
    let query = format!("iifname @{PROXIED_PODS} meta l4proto udp udp dport 53");
    table.chains.insert(
        CHECK_CHAIN.into(),
        nft::Chain {
            base: Some(nft::BaseChain::new("filter", "prerouting", "-110")),
            rules: vec![format!(
                "{query} iifname vmap @{}",
                super::render::EGRESS_DISPATCH
            )],
        },
    );
    table.chains.insert(
        REDIRECT_CHAIN.into(),
        nft::Chain {
            base: Some(nft::BaseChain::new("nat", "prerouting", "-105")),
            rules: vec![format!("{query} dnat ip to {ip}:{PROXY_PORT}")],
        },
    );
    // The policy input chain (and an endpoint-to-host Drop after it) accept the redirected
    // query: its policy was decided before NAT.
    for chain in [
        super::render::POLICY_INPUT,
        super::render::HOST_FROM_WORKLOADS,
    ] {
        if let Some(c) = table.chains.get_mut(chain) {
            let at = c.rules.len().min(1);
            c.rules.insert(
                at,
                format!(
                    "meta l4proto udp udp dport {PROXY_PORT} ct status dnat ct original proto-dst 53 accept comment \"DNS proxy: checked before NAT\""
                ),
            );
        }
    }
}

/// The DNS sets of node `me` and its IPv4 address, from the whole cluster (what the agent's
/// proxy serves after each full apply; the same sets [`crate::routes`] renders).
pub fn node_dns_sets(
    view: &crate::routes::ClusterView,
    me: &str,
) -> (Vec<DnsSet>, Option<std::net::Ipv4Addr>) {
    let ip = view
        .nodes
        .iter()
        .find(|n| n.name == me)
        .and_then(|n| n.underlay_ipv4);
    if !view.calico.applies_to_workloads() {
        return (Vec::new(), ip);
    }
    let pods = crate::routes::policy_pods(view);
    let nodes = crate::routes::node_addresses(view);
    let ents = crate::host::labelled(view);
    let inputs = TierInputs::of(view, &pods, &ents, &nodes);
    (dns_sets(&inputs, me), ip)
}
