//! Tiered policy for pods: Calico's `GlobalNetworkPolicy` and namespaced `NetworkPolicy`
//! (`projectcalico.org/v3`) in their tiers, with Kubernetes NetworkPolicies where Calico puts
//! them — the `default` tier, at order 1000, named `knp.default.<namespace>/<name>`.
//!
//! Per pod and direction, when at least one Calico policy applies (else nothing changes: the
//! NetworkPolicy chains of [`super::render`] decide alone):
//! - tiers in order, each with the policies applying to the pod in that direction in order;
//!   rule by rule, the first Allow or Deny decides, Pass leaves the tier, Log goes on. A
//!   Kubernetes NetworkPolicy's rules are Allow rules. A tier whose policies applied but did not
//!   decide denies (its `defaultAction: Pass`: goes on to the next tier);
//! - after the last tier the pod's profile allows (Calico's namespace profiles for Kubernetes
//!   pods allow).
//!
//! Rendered as chains `tpol-in-<ifname>-t<k>` / `tpol-out-<ifname>-t<k>` (linear: one nft rule
//! per rule and family), the pod's entry in the dispatch maps pointing at its first tier chain;
//! Allow is the direction's allowing verdict (`accept` in, `return` out, so the destination's
//! ingress still runs), Pass and a passing tier end `goto` the next tier chain. A Kubernetes
//! policy's rules are the compiled program's ([`super::compile`]), matched on its address sets.
//! [`allowed`] is the reference: the same order read straight, NetworkPolicy rules through
//! [`super::reference`], Calico rules through [`crate::host::reference`].

use std::collections::BTreeMap;

use malla_api::calico::{order_key, Action, CalicoNetworkPolicy, Order, Proto, Rule};
use malla_api::cnp::{CnpAction, CnpRule, CnpTier, Peer};
use malla_api::policy::NetworkPolicy;
use malla_api::selector::Selector;
use malla_api::service::Protocol;
use malla_api::Namespace;

use super::compile::{CompiledRule, PolicyProgram, PortMatch};
use super::render::{egress_chain, ingress_chain, EGRESS_DISPATCH, INGRESS_DISPATCH};
use super::{namespace_labels, reference, Connection, Direction, PolicyPod};
use crate::host::reference::{DecidedBy, HostPacket};
use crate::host::render::SelectorSets;
use crate::host::{tier_table, CalicoView, Labelled};
use crate::nft::element::{IfName, Part};
use crate::nft::{self, Chain, Key, Set, Value};

/// What tiered policy reads.
#[derive(Clone, Copy)]
pub struct TierInputs<'a> {
    pub calico: &'a CalicoView,
    /// Kubernetes NetworkPolicies.
    pub policies: &'a [NetworkPolicy],
    pub namespaces: &'a [Namespace],
    pub pods: &'a [PolicyPod<'a>],
    /// What Calico rule selectors pick ([`crate::host::labelled`]).
    pub ents: &'a [Labelled],
    /// The nodes' names and addresses (ClusterNetworkPolicy's `nodes` peers; a node's labels
    /// are `kubernetes.io/hostname: NAME`).
    pub nodes: &'a [(String, Vec<std::net::IpAddr>)],
    /// What pods learned from their DNS answers (DNS-name rules: [`super::dns`]); the
    /// rendered table leaves the addresses to the agent's DNS proxy.
    pub dns: &'a super::dns::DnsView,
}

impl<'a> TierInputs<'a> {
    /// The inputs of `view`'s policies with what is derived from it once (its policy pods,
    /// [`crate::host::labelled`] entities, [`crate::routes::node_addresses`]), no DNS answers.
    pub fn of(
        view: &'a crate::ClusterView,
        pods: &'a [PolicyPod<'a>],
        ents: &'a [Labelled],
        nodes: &'a [(String, Vec<std::net::IpAddr>)],
    ) -> Self {
        TierInputs {
            calico: &view.calico,
            policies: &view.policies,
            namespaces: &view.namespaces,
            pods,
            ents,
            nodes,
            dns: super::dns::DnsView::EMPTY,
        }
    }
}

/// A policy as a tier holds it.
#[derive(Debug, Clone, Copy)]
pub enum Item<'a> {
    /// A Calico policy's rules of the direction; `scope` is a namespaced policy's namespace.
    Calico {
        name: &'a str,
        rules: &'a [Rule],
        scope: Option<&'a str>,
    },
    /// A Kubernetes NetworkPolicy isolating the pod in the direction.
    Kubernetes(&'a NetworkPolicy),
    /// A ClusterNetworkPolicy's rules of the direction.
    Cluster { name: &'a str, rules: &'a [CnpRule] },
}

impl Item<'_> {
    /// The name shown in comments and traces.
    pub fn name(&self) -> String {
        match self {
            Item::Calico {
                name,
                scope: Some(ns),
                ..
            } => format!("{ns}/{name}"),
            Item::Calico { name, .. } => name.to_string(),
            Item::Kubernetes(p) => format!("knp.default.{}/{}", p.namespace, p.name),
            Item::Cluster { name, .. } => format!("cnp.{name}"),
        }
    }
}

/// A policy placed in its tier: its order and sort name, and itself.
type Placed<'a> = (Option<Order>, String, Item<'a>);

/// One tier as a pod meets it in one direction.
#[derive(Debug, Clone)]
pub struct Group<'a> {
    pub tier: String,
    pub pass_by_default: bool,
    pub items: Vec<Item<'a>>,
}

/// A pod's labels as Calico's selectors see them (its own, and `projectcalico.org/namespace`).
fn calico_labels(pod: &PolicyPod) -> BTreeMap<String, String> {
    let mut l = pod.labels.clone().into_owned();
    l.insert(
        "projectcalico.org/namespace".into(),
        pod.namespace.to_string(),
    );
    l
}

fn takes(types: (bool, bool), dir: Direction) -> bool {
    match dir {
        Direction::Ingress => types.0,
        Direction::Egress => types.1,
    }
}

/// The tiers of `pod` in `dir`, and whether any Calico policy is among them (if not, tiers do
/// not apply and NetworkPolicy alone decides).
pub fn applying<'a>(
    inp: &TierInputs<'a>,
    pod: &PolicyPod,
    dir: Direction,
) -> (bool, Vec<Group<'a>>) {
    let labels = calico_labels(pod);
    let ns_labels = namespace_labels(inp.namespaces, &pod.namespace);
    let rules_of = |spec: &'a malla_api::calico::GlobalNetworkPolicySpec| -> &'a [Rule] {
        match dir {
            Direction::Ingress => &spec.ingress,
            Direction::Egress => &spec.egress,
        }
    };
    // (tier, order, sort name, item)
    let mut placed: Vec<(&'a str, Option<Order>, String, Item<'a>)> = Vec::new();
    for p in &inp.calico.policies {
        if p.spec.pre_dnat
            || !valid(&p.name, || p.validate().is_ok())
            || !takes(p.effective_types(), dir)
        {
            continue;
        }
        let Ok(sel) = p.selector() else { continue };
        if !sel.matches(&labels, true) {
            continue;
        }
        if let Some(ns) = &p.spec.namespace_selector {
            match Selector::parse(ns) {
                Ok(n) if n.matches(ns_labels, true) => {}
                _ => continue,
            }
        }
        placed.push((
            p.tier(),
            p.spec.order,
            p.name.clone(),
            Item::Calico {
                name: &p.name,
                rules: rules_of(&p.spec),
                scope: None,
            },
        ));
    }
    for p in &inp.calico.network_policies {
        let p: &'a CalicoNetworkPolicy = p;
        if p.namespace != pod.namespace
            || !valid(&p.name, || p.validate().is_ok())
            || !takes(p.as_global().effective_types(), dir)
        {
            continue;
        }
        let Ok(sel) = Selector::parse(&p.spec.selector) else {
            continue;
        };
        if !sel.matches(&labels, true) {
            continue;
        }
        placed.push((
            p.tier(),
            p.spec.order,
            format!("{}/{}", p.namespace, p.name),
            Item::Calico {
                name: &p.name,
                rules: rules_of(&p.spec),
                scope: Some(&p.namespace),
            },
        ));
    }
    for p in &inp.calico.cluster_policies {
        let rules: &'a [CnpRule] = match dir {
            Direction::Ingress => &p.spec.ingress,
            Direction::Egress => &p.spec.egress,
        };
        // A policy without rules of a direction does not affect it.
        if rules.is_empty()
            || !valid(&p.name, || p.validate().is_ok())
            || !cnp_subject(p, pod, ns_labels)
        {
            continue;
        }
        let tier = match p.spec.tier {
            CnpTier::Admin => crate::host::ADMIN_TIER,
            CnpTier::Baseline => crate::host::BASELINE_TIER,
        };
        placed.push((
            tier,
            Some(Order(f64::from(p.spec.priority))),
            p.name.clone(),
            Item::Cluster {
                name: &p.name,
                rules,
            },
        ));
    }
    let calico = !placed.is_empty();
    for p in reference::isolating(inp.policies, pod, dir) {
        placed.push((
            malla_api::calico::DEFAULT_TIER,
            Some(Order(1000.0)),
            format!("knp.default.{}/{}", p.namespace, p.name),
            Item::Kubernetes(p),
        ));
    }
    let table = tier_table(inp.calico);
    let mut by_tier: BTreeMap<&str, Vec<Placed<'a>>> = BTreeMap::new();
    for (tier, order, name, item) in placed {
        if table.contains_key(tier) {
            by_tier.entry(tier).or_default().push((order, name, item));
        }
    }
    let mut groups: Vec<Group<'a>> = by_tier
        .into_iter()
        .map(|(tier, mut items)| {
            items.sort_by_key(|(o, n, _)| order_key(*o, n));
            Group {
                tier: tier.to_string(),
                pass_by_default: table[tier].1,
                items: items.into_iter().map(|(_, _, i)| i).collect(),
            }
        })
        .collect();
    groups.sort_by_key(|g| order_key(table[g.tier.as_str()].0, &g.tier));
    (calico, groups)
}

/// Whether a policy named `name` counts: staged ones of the pending view were checked when it
/// was built ([`super::staged::pending_view`]; their names would fail), others are checked now.
fn valid(name: &str, check: impl FnOnce() -> bool) -> bool {
    super::staged::is_staged_name(name) || check()
}

/// Whether a ClusterNetworkPolicy's subject selects `pod`.
fn cnp_subject(
    p: &malla_api::cnp::ClusterNetworkPolicy,
    pod: &PolicyPod,
    ns_labels: &BTreeMap<String, String>,
) -> bool {
    match (&p.spec.subject.namespaces, &p.spec.subject.pods) {
        (Some(n), _) => n.matches(ns_labels),
        (None, Some(np)) => {
            np.namespace_selector.matches(ns_labels) && np.pod_selector.matches(&pod.labels)
        }
        (None, None) => false,
    }
}

/// The labels a node has for `nodes` peers.
fn node_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())])
}

/// Whether `peer` of a ClusterNetworkPolicy rule matches the connection's other end `e`.
fn cnp_peer_matches(inp: &TierInputs, peer: &Peer, e: &super::Endpoint) -> bool {
    let pod_in = |ns_sel: &malla_api::policy::LabelSelector,
                  pod_sel: Option<&malla_api::policy::LabelSelector>| {
        e.pod.is_some_and(|p| {
            ns_sel.matches(namespace_labels(inp.namespaces, &p.namespace))
                && pod_sel.is_none_or(|s| s.matches(&p.labels))
        })
    };
    if let Some(n) = &peer.namespaces {
        return pod_in(n, None);
    }
    if let Some(np) = &peer.pods {
        return pod_in(&np.namespace_selector, Some(&np.pod_selector));
    }
    if let Some(sel) = &peer.nodes {
        return inp
            .nodes
            .iter()
            .any(|(name, ips)| ips.contains(&e.ip) && sel.matches(&node_labels(name)));
    }
    if let Some(nets) = &peer.networks {
        return malla_api::cnp::in_networks(nets, &e.ip);
    }
    false
}

/// Whether a ClusterNetworkPolicy rule's `protocols` match the connection (none: all).
fn cnp_protocols_match(rule: &CnpRule, c: &Connection) -> bool {
    rule.protocols.is_empty()
        || rule.protocols.iter().any(|p| {
            let ranged = |pp: &Option<malla_api::cnp::ProtocolPorts>, proto: Protocol| {
                pp.as_ref().is_some_and(|pp| {
                    c.proto == proto
                        && pp
                            .destination_port
                            .and_then(|d| d.range())
                            .is_none_or(|(a, b)| a <= c.port && c.port <= b)
                })
            };
            ranged(&p.tcp, Protocol::Tcp)
                || ranged(&p.udp, Protocol::Udp)
                || ranged(&p.sctp, Protocol::Sctp)
                || p.destination_named_port.as_deref().is_some_and(|name| {
                    c.dst
                        .pod
                        .is_some_and(|d| d.named_port(name, c.proto).contains(&c.port))
                })
        })
}

fn proto(p: Protocol) -> Proto {
    match p {
        Protocol::Tcp => Proto::TCP,
        Protocol::Udp => Proto::UDP,
        Protocol::Sctp => Proto::SCTP,
    }
}

/// The source port the reference assumes (a connection's source port is not part of a
/// NetworkPolicy question; Calico rules on source ports are read against it).
pub const SOURCE_PORT: u16 = 40000;

/// The tiered verdict of direction `dir` and what decided, or None when no Calico policy
/// applies to the subject (NetworkPolicy alone decides: [`reference::direction_allowed`]).
pub fn explain_direction(
    inp: &TierInputs,
    dir: Direction,
    c: &Connection,
) -> Option<(bool, DecidedBy)> {
    let (subject, _) = c.subject_and_peer(dir);
    let pod = subject.pod?;
    let (calico, groups) = applying(inp, pod, dir);
    if !calico {
        return None;
    }
    Some(explain_groups(inp, &groups, dir, c))
}

/// The verdict of `groups` (a subject's tiers in `dir`) for `c`, and what decided.
pub(crate) fn explain_groups(
    inp: &TierInputs,
    groups: &[Group],
    dir: Direction,
    c: &Connection,
) -> (bool, DecidedBy) {
    let Some(pod) = c.subject_and_peer(dir).0.pod else {
        return (true, DecidedBy::Default);
    };
    let p = HostPacket {
        src: c.src.ip,
        dst: c.dst.ip,
        proto: proto(c.proto),
        sport: SOURCE_PORT,
        dport: c.port,
        icmp: None,
    };
    for g in groups {
        let mut passed = false;
        'items: for item in &g.items {
            match item {
                Item::Calico { rules, scope, .. } => {
                    for (index, r) in rules.iter().enumerate() {
                        if !super::dns::calico_rule_matches(inp, pod, dir, r, &p, *scope) {
                            continue;
                        }
                        let by = || DecidedBy::Rule {
                            tier: g.tier.clone(),
                            policy: item.name(),
                            index,
                        };
                        match r.action {
                            Action::Allow => return (true, by()),
                            Action::Deny => return (false, by()),
                            Action::Pass => {
                                passed = true;
                                break 'items;
                            }
                            Action::Log => {}
                        }
                    }
                }
                Item::Cluster { rules, .. } => {
                    let (_, other) = c.subject_and_peer(dir);
                    for (index, r) in rules.iter().enumerate() {
                        if !(r.peers.iter().any(|p| {
                            cnp_peer_matches(inp, p, other)
                                || super::dns::cnp_peer_matches(inp, pod, p, other.ip)
                        }) && cnp_protocols_match(r, c))
                        {
                            continue;
                        }
                        let by = DecidedBy::Rule {
                            tier: g.tier.clone(),
                            policy: item.name(),
                            index,
                        };
                        match r.action {
                            CnpAction::Accept => return (true, by),
                            CnpAction::Deny => return (false, by),
                            CnpAction::Pass => {
                                passed = true;
                                break 'items;
                            }
                        }
                    }
                }
                Item::Kubernetes(np) => {
                    for (index, r) in reference::rules(np, dir).into_iter().enumerate() {
                        if reference::rule_allows(&np.namespace, r, inp.namespaces, dir, c) {
                            return (
                                true,
                                DecidedBy::Rule {
                                    tier: g.tier.clone(),
                                    policy: item.name(),
                                    index,
                                },
                            );
                        }
                    }
                }
            }
        }
        if !passed && !g.pass_by_default {
            return (
                false,
                DecidedBy::EndOfTier {
                    tier: g.tier.clone(),
                },
            );
        }
    }
    (true, DecidedBy::Default)
}

/// The reference verdict of one direction.
pub fn direction_allowed(inp: &TierInputs, dir: Direction, c: &Connection) -> bool {
    match explain_direction(inp, dir, c) {
        Some((ok, _)) => ok,
        None => reference::direction_allowed(inp.policies, inp.namespaces, dir, c),
    }
}

/// The reference verdict for a new connection, every tier considered.
pub fn allowed(inp: &TierInputs, c: &Connection) -> bool {
    direction_allowed(inp, Direction::Egress, c) && direction_allowed(inp, Direction::Ingress, c)
}

fn tier_chain(dir: Direction, ifname: &str, k: usize) -> String {
    match dir {
        Direction::Ingress => format!("t{}-t{k}", ingress_chain(ifname)),
        Direction::Egress => format!("t{}-t{k}", egress_chain(ifname)),
    }
}

/// The texts matching a compiled NetworkPolicy rule, one per family and protocol; the
/// program's sets they name are added to `table` when missing.
fn np_rule_texts(
    r: &CompiledRule,
    prog: &PolicyProgram,
    dir: Direction,
    table: &mut nft::Table,
) -> Vec<String> {
    let addr = match dir {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    let mut peers: Vec<String> = Vec::new();
    match &r.peer {
        None => peers.push(String::new()),
        Some(name) => {
            let Some(set) = prog.sets.get(name) else {
                return Vec::new();
            };
            for (kw, fam, v6) in [("ip", "v4", false), ("ip6", "v6", true)] {
                if (v6 && !set.v6) || (!v6 && !set.v4) {
                    continue;
                }
                let set_name = format!("{name}-{fam}");
                table.sets.entry(set_name.clone()).or_insert_with(|| Set {
                    type_: if v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
                    flags: if set.interval {
                        vec!["interval".into()]
                    } else {
                        Vec::new()
                    },
                    timeout: None,
                    elements: set
                        .addrs
                        .iter()
                        .filter(|n| n.addr().is_ipv6() == v6)
                        .map(super::addrs::nft_element)
                        .collect(),
                });
                peers.push(format!("{kw} {addr} @{set_name} "));
            }
        }
    }
    let ports: Vec<String> = match &r.ports {
        PortMatch::Any => vec![String::new()],
        PortMatch::Ports(m) => m
            .iter()
            .map(|(proto, ranges)| {
                let items: Vec<String> = ranges
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect();
                format!(
                    "meta l4proto {} th dport {{ {} }} ",
                    proto.nft(),
                    items.join(", ")
                )
            })
            .collect(),
    };
    let mut out = Vec::new();
    for p in &peers {
        for q in &ports {
            out.push(format!("{q}{p}"));
        }
    }
    out
}

/// What a ClusterNetworkPolicy's `namespaces` peer's set stands for (hashed into its name).
pub(crate) fn namespaces_peer_key(n: &malla_api::policy::LabelSelector) -> String {
    format!("cnp namespaces {n:?}")
}

/// What a ClusterNetworkPolicy's `pods` peer's set stands for (hashed into its name).
pub(crate) fn pods_peer_key(np: &malla_api::cnp::NamespacedPod) -> String {
    format!("cnp pods {np:?}")
}

/// The texts matching a ClusterNetworkPolicy rule for `pod` (the subject) in `dir`: one per
/// peer, family and protocol that can match. Peers' addresses go in named sets.
/// The match texts of one ClusterNetworkPolicy protocol entry's protocols and numbered ports
/// (`meta l4proto tcp th dport 80-90 ` before `peer`); its named port is the caller's.
pub(crate) fn cnp_numbered_port_texts(
    p: &malla_api::cnp::Protocol,
    peer: &str,
    out: &mut Vec<String>,
) {
    for (pp, proto) in [(&p.tcp, "tcp"), (&p.udp, "udp"), (&p.sctp, "sctp")] {
        let Some(pp) = pp else { continue };
        out.push(match pp.destination_port.and_then(|d| d.range()) {
            None => format!("meta l4proto {proto} {peer}"),
            Some((a, b)) if a == b => format!("meta l4proto {proto} th dport {a} {peer}"),
            Some((a, b)) => format!("meta l4proto {proto} th dport {a}-{b} {peer}"),
        });
    }
}

fn cnp_rule_texts(
    inp: &TierInputs,
    pod: &PolicyPod,
    r: &CnpRule,
    dir: Direction,
    sets: &mut SelectorSets,
) -> Vec<String> {
    use ipnet::IpNet;
    let addr = match dir {
        Direction::Ingress => "saddr",
        Direction::Egress => "daddr",
    };
    // (peer addresses as a set name, and the pods behind it for egress named ports)
    let mut peers: Vec<(String, Vec<&PolicyPod>)> = Vec::new();
    for p in &r.peers {
        let pods_of = |ns_sel: &malla_api::policy::LabelSelector,
                       pod_sel: Option<&malla_api::policy::LabelSelector>| {
            inp.pods
                .iter()
                .filter(|x| {
                    ns_sel.matches(namespace_labels(inp.namespaces, &x.namespace))
                        && pod_sel.is_none_or(|s| s.matches(&x.labels))
                })
                .collect::<Vec<_>>()
        };
        let (key, nets, pods): (String, Vec<IpNet>, Vec<&PolicyPod>) =
            if let Some(n) = &p.namespaces {
                let pods = pods_of(n, None);
                let nets = pods
                    .iter()
                    .flat_map(|x| x.ips.iter().map(|ip| IpNet::from(*ip)))
                    .collect();
                (namespaces_peer_key(n), nets, pods)
            } else if let Some(np) = &p.pods {
                let pods = pods_of(&np.namespace_selector, Some(&np.pod_selector));
                let nets = pods
                    .iter()
                    .flat_map(|x| x.ips.iter().map(|ip| IpNet::from(*ip)))
                    .collect();
                (pods_peer_key(np), nets, pods)
            } else if let Some(sel) = &p.nodes {
                let nets = inp
                    .nodes
                    .iter()
                    .filter(|(name, _)| sel.matches(&node_labels(name)))
                    .flat_map(|(_, ips)| ips.iter().map(|ip| IpNet::from(*ip)))
                    .collect();
                (format!("cnp nodes {sel:?}"), nets, Vec::new())
            } else if let Some(n) = &p.networks {
                (format!("cnp networks {n:?}"), n.clone(), Vec::new())
            } else {
                continue;
            };
        let name = sets.fixed(&key, nets);
        peers.push((name, pods));
    }
    let mut out = Vec::new();
    for (set, pods) in &peers {
        for (kw, fam, v6) in [("ip", "v4", false), ("ip6", "v6", true)] {
            if !sets.nets(set).iter().any(|n| n.addr().is_ipv6() == v6) {
                continue;
            }
            let peer = format!("{kw} {addr} @{set}-{fam} ");
            if r.protocols.is_empty() {
                out.push(peer);
                continue;
            }
            for p in &r.protocols {
                cnp_numbered_port_texts(p, &peer, &mut out);
                let Some(port_name) = &p.destination_named_port else {
                    continue;
                };
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    match dir {
                        // The subject is the destination: its own named port.
                        Direction::Ingress => {
                            for n in pod.named_port(port_name, proto) {
                                out.push(format!(
                                    "meta l4proto {} th dport {n} {peer}",
                                    proto.nft()
                                ));
                            }
                        }
                        // Each destination pod's own number: the pods grouped by it.
                        Direction::Egress => {
                            let mut by_port: BTreeMap<u16, Vec<IpNet>> = BTreeMap::new();
                            for x in pods {
                                for n in x.named_port(port_name, proto) {
                                    by_port.entry(n).or_default().extend(
                                        x.ips
                                            .iter()
                                            .filter(|ip| ip.is_ipv6() == v6)
                                            .map(|ip| IpNet::from(*ip)),
                                    );
                                }
                            }
                            for (n, nets) in by_port {
                                if nets.is_empty() {
                                    continue;
                                }
                                let s = sets.fixed(
                                    &format!("{set} port {port_name} {} {n} {fam}", proto.nft()),
                                    nets,
                                );
                                out.push(format!(
                                    "meta l4proto {} th dport {n} {kw} {addr} @{s}-{fam} ",
                                    proto.nft()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// How a tier chain's verdicts are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Enforced: Allow accepts (ingress) or returns (egress), Deny drops.
    Enforce,
    /// The pending view of staged policies ([`super::staged`]): every verdict only logs what
    /// it would be and returns, so the enforced chains decide.
    Pending,
}

/// The tier chains of one local pod in `dir` for `groups` into `table`; returns the first
/// chain's name. `compiled` holds the pod's compiled NetworkPolicy rules of `dir` (from
/// `prog`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn render_groups(
    inp: &TierInputs,
    prog: &PolicyProgram,
    pod: &PolicyPod,
    dir: Direction,
    groups: &[Group],
    mode: Mode,
    sets: &mut SelectorSets,
    table: &mut nft::Table,
) -> String {
    let ep = prog
        .endpoints
        .iter()
        .find(|e| e.namespace == pod.namespace && e.name == pod.name);
    let compiled: &[CompiledRule] = ep
        .and_then(|e| match dir {
            Direction::Ingress => e.ingress.as_deref(),
            Direction::Egress => e.egress.as_deref(),
        })
        .unwrap_or_default();
    let chain = |k: usize| match mode {
        Mode::Enforce => tier_chain(dir, &pod.host_ifname, k),
        Mode::Pending => super::staged::pending_chain(dir, &pod.host_ifname, k),
    };
    let enforce_allow = match dir {
        Direction::Ingress => "accept",
        Direction::Egress => "return",
    };
    // The statement and verdict of a decision (allowed or not) by `policy`'s rule `rule`.
    let decide = |allowed: bool, policy: &str, rule: super::staged::PendingRule| match mode {
        Mode::Enforce if allowed => enforce_allow.to_string(),
        Mode::Enforce => "drop".to_string(),
        Mode::Pending => format!(
            "{} return",
            super::staged::PendingPoint::new(dir, allowed, policy, rule).statement()
        ),
    };
    let n = groups.len();
    let end = decide(true, "-", super::staged::PendingRule::Default);
    let next = |k: usize| {
        if k + 1 < n {
            format!("goto {}", chain(k + 1))
        } else {
            end.clone()
        }
    };
    if groups.is_empty() {
        table.chains.insert(
            chain(0),
            Chain {
                base: None,
                rules: vec![end.clone()],
            },
        );
    }
    use super::staged::PendingRule::{EndOfTier, Index};
    for (k, g) in groups.iter().enumerate() {
        let mut rules = Vec::new();
        for item in &g.items {
            let policy = item.name();
            let comment =
                |i: usize| format!("comment \"{}/{policy} {}[{i}]\"", g.tier, dir.as_str());
            match item {
                Item::Calico {
                    rules: list, scope, ..
                } => {
                    for (i, r) in list.iter().enumerate() {
                        let verdict = match (r.action, mode) {
                            (Action::Allow, _) => decide(true, &policy, Index(i)),
                            (Action::Deny, _) => decide(false, &policy, Index(i)),
                            (Action::Pass, _) => next(k),
                            (Action::Log, Mode::Enforce) => {
                                format!("log prefix \"{}\"", crate::host::render::LOG_PREFIX)
                            }
                            // A staged Log rule logs nothing: it is not enforced.
                            (Action::Log, Mode::Pending) => continue,
                        };
                        for m in
                            super::dns::calico_rule_texts(inp, pod, dir, r, sets, *scope, table)
                        {
                            rules.push(format!("{m} {verdict} {}", comment(i)));
                        }
                    }
                }
                Item::Cluster { rules: list, .. } => {
                    for (i, r) in list.iter().enumerate() {
                        let verdict = match r.action {
                            CnpAction::Accept => decide(true, &policy, Index(i)),
                            CnpAction::Deny => decide(false, &policy, Index(i)),
                            CnpAction::Pass => next(k),
                        };
                        let mut texts = cnp_rule_texts(inp, pod, r, dir, sets);
                        texts.extend(super::dns::cnp_rule_texts(pod, r, table));
                        for m in texts {
                            rules.push(format!("{m}{verdict} {}", comment(i)));
                        }
                    }
                }
                Item::Kubernetes(np) => {
                    let key = format!("{}/{}", np.namespace, np.name);
                    for cr in compiled.iter().filter(|r| r.policy == key) {
                        let verdict = decide(true, &policy, Index(cr.rule));
                        for m in np_rule_texts(cr, prog, dir, table) {
                            rules.push(format!("{m}{verdict} {}", comment(cr.rule)));
                        }
                    }
                }
            }
        }
        rules.push(if g.pass_by_default {
            next(k)
        } else {
            // The tier's end, put down to its last policy (as Calico's flow logs do).
            let last = g.items.last().map(Item::name).unwrap_or_default();
            match mode {
                Mode::Enforce => format!("drop comment \"{}: end of tier\"", g.tier),
                Mode::Pending => decide(false, &last, EndOfTier),
            }
        });
        table.chains.insert(chain(k), Chain { base: None, rules });
    }
    chain(0)
}

/// Adds the tier chains of this node's pods to `table` (after [`super::render_policy`], whose
/// dispatch maps and sets it extends), and the pending chains of staged policies
/// ([`super::staged`]).
pub fn render_tiers(inp: &TierInputs, prog: &PolicyProgram, me: &str, table: &mut nft::Table) {
    let mut sets = SelectorSets::default();
    let pending = super::staged::Pending::of(inp, prog, me);
    for pod in inp.pods.iter().filter(|p| p.node == me) {
        let Some(ifname) = IfName::new(&pod.host_ifname) else {
            continue;
        };
        for dir in [Direction::Ingress, Direction::Egress] {
            let map = match dir {
                Direction::Ingress => INGRESS_DISPATCH,
                Direction::Egress => EGRESS_DISPATCH,
            };
            let (calico, groups) = applying(inp, pod, dir);
            if calico {
                let first = render_groups(
                    inp,
                    prog,
                    pod,
                    dir,
                    &groups,
                    Mode::Enforce,
                    &mut sets,
                    table,
                );
                // A Calico policy applies, so there is a first tier.
                if let Some(m) = table.maps.get_mut(map) {
                    m.elements
                        .insert(Key::one(Part::Iface(ifname)), Value::jump(first));
                }
            }
            if let Some(p) = &pending {
                p.render(inp, prog, pod, dir, &groups, ifname, map, &mut sets, table);
            }
        }
    }
    sets.write(table);
}
