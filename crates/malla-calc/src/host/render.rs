//! Host endpoint policy as chains, maps and sets of the `inet malla` table (every name starts
//! with `hep-`, so the policy path's patches, which own `pol-`, never touch them).
//!
//! Base chains, each only when the node has a host endpoint (pre-DNAT and forward only when a
//! policy of theirs applies):
//! - [`PREDNAT`] (a nat chain at prerouting, priority -110: before the services' DNAT at -100;
//!   nat chains see only a connection's first packet, so established traffic costs nothing),
//!   [`INPUT`] (input, priority 5) and [`OUTPUT`] (output, priority 5), [`FORWARD`] (forward,
//!   priority 5) then its egress half [`FORWARD_OUT`]:
//!   1. the exemptions: established and related connections (first: nearly every packet),
//!      loopback, pods' interfaces (`mla*`), the failsafe ports (`meta l4proto P th dport { … } accept`, an entry with a
//!      network as its own rule), VXLAN between nodes (`@hep-nodes-v4/v6`);
//!   2. `iifname vmap @hep-<stage>-ifaces` (`oifname` for egress stages): each named host
//!      endpoint's interface → `goto` its first tier chain, or the verdict when no policy
//!      applies to it;
//!   3. the all-interfaces endpoint, if any: `goto` its first tier chain (pods' interfaces are
//!      already out of the way; in the forward chain, `iifname != "mla*"`).
//! - Tier chains `hep-<stage>-<endpoint>-t<k>`: the tier's policies' rules in order, one nft
//!   rule per rule and address family that can match, with the rule's verdict: Allow `accept`
//!   (forward ingress: `goto hep-fwd-out`, so the egress half still runs), Deny `drop`, Pass
//!   `goto` the next tier chain (or the endpoint's end), Log `log` and on. The chain ends with
//!   the tier's default: `drop`, or in pre-DNAT `goto` the next tier (no default drop).
//! - After the last tier: the profiles' verdict (input, output), accept (pre-DNAT, forward
//!   egress), `goto hep-fwd-out` (forward ingress).
//! - Sets `hep-sel-<hash>-v4/-v6` (interval): the addresses a rule side's selectors pick
//!   (pods, host endpoints' expected addresses, global network sets' networks); a rule's own
//!   networks are written in the rule as anonymous sets.
//!
//! A rule that cannot match in a family (its networks or selected addresses are all of the
//! other family, ICMP vs ICMPv6) writes nothing for it; a rule whose selector picks no address
//! writes nothing at all (it matches nothing until a render finds addresses).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::calico::{Action, EntityRule, HostEndpoint, Port, Proto, ProtoPort, Rule};
use malla_api::selector::Selector;

use super::{picks, profile_allows, tiers_for, CalicoView, Labelled, Stage};
use crate::nft::element::IfName;
use crate::nft::{self, BaseChain, Chain, Key, Map, Part, Set, Value};
use crate::policy::addrs::{nft_element, normalize};
use crate::policy::fnv;

pub const PREDNAT: &str = "hep-prednat";
pub const INPUT: &str = "hep-input";
pub const OUTPUT: &str = "hep-output";
pub const FORWARD: &str = "hep-forward";
pub const FORWARD_OUT: &str = "hep-fwd-out";
/// The other nodes' underlay addresses (VXLAN's exemption).
pub const NODES_V4: &str = "hep-nodes-v4";
pub const NODES_V6: &str = "hep-nodes-v6";
/// The prefix of Log rules' messages (Calico's, without its trailing space).
pub const LOG_PREFIX: &str = "calico-packet:";

/// The interface-name map of a stage.
pub fn ifaces_map(stage: Stage) -> String {
    format!("hep-{}-ifaces", stage.short())
}

/// The chain of tier `k` of endpoint `hep` at `stage`.
pub fn tier_chain(stage: Stage, hep: &str, k: usize) -> String {
    format!("hep-{}-{hep}-t{k}", stage.short())
}

/// What the node's host endpoint policy needs besides Calico's objects.
#[derive(Debug, Clone, Default)]
pub struct HostInputs<'a> {
    /// This node's host endpoints ([`super::local_host_endpoints`]).
    pub heps: Vec<HostEndpoint>,
    /// Everything rule selectors can pick ([`super::labelled`]).
    pub ents: Vec<Labelled>,
    /// The other nodes' underlay addresses.
    pub nodes: Vec<IpAddr>,
    pub config: Option<&'a malla_api::ClusterConfig>,
}

fn net_text(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn nets_text(nets: &[IpNet]) -> String {
    let items: Vec<String> = nets.iter().map(net_text).collect();
    format!("{{ {} }}", items.join(", "))
}

fn ports_text(ports: &[Port]) -> String {
    let items: Vec<String> = ports
        .iter()
        .filter_map(|p| match p {
            Port::Range(a, b) if a == b => Some(a.to_string()),
            Port::Range(a, b) => Some(format!("{a}-{b}")),
            Port::Named(_) => None,
        })
        .collect();
    format!("{{ {} }}", items.join(", "))
}

/// The address family being written: `ip` / `ip6`, and its set suffix.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Family {
    v6: bool,
}

impl Family {
    fn kw(self) -> &'static str {
        if self.v6 {
            "ip6"
        } else {
            "ip"
        }
    }
    fn suffix(self) -> &'static str {
        if self.v6 {
            "v6"
        } else {
            "v4"
        }
    }
    fn of(self, nets: &[IpNet]) -> Vec<IpNet> {
        normalize(
            nets.iter()
                .copied()
                .filter(|n| n.addr().is_ipv6() == self.v6),
            [],
        )
    }
}

/// The name (without family) of the set of addresses [`SelectorSets::fixed`] makes for `key`.
pub(crate) fn fixed_name(key: &str) -> String {
    format!("hep-sel-{:016x}", fnv(key))
}

/// The name (without family) of the set of what `sel` with `ns` picks in `scope` (see
/// [`super::picks`]): the tier member path ([`crate::policy::tiermembers`]) finds a set's
/// selectors by it.
pub(crate) fn picked_name(
    sel: Option<&Selector>,
    ns: Option<&Selector>,
    scope: Option<&str>,
) -> String {
    fixed_name(&format!(
        "{} | {} | {}",
        sel.map(|s| s.to_string()).unwrap_or_default(),
        ns.map(|s| s.to_string()).unwrap_or_default(),
        scope.unwrap_or_default()
    ))
}

/// Selector sets made while rendering: name (without family) → addresses.
#[derive(Default)]
pub(crate) struct SelectorSets {
    sets: BTreeMap<String, Vec<IpNet>>,
}

impl SelectorSets {
    /// A set of the given addresses, named by `key` (what it stands for).
    pub(crate) fn fixed(&mut self, key: &str, nets: impl IntoIterator<Item = IpNet>) -> String {
        let name = fixed_name(key);
        self.sets
            .entry(name.clone())
            .or_insert_with(|| normalize(nets, []));
        name
    }

    /// The addresses of set `name` (made by this renderer).
    pub(crate) fn nets(&self, name: &str) -> &[IpNet] {
        self.sets.get(name).map_or(&[], Vec::as_slice)
    }

    /// Writes every set made (both families) into `table`.
    pub(crate) fn write(self, table: &mut nft::Table) {
        for (name, nets) in self.sets {
            for f in [Family { v6: false }, Family { v6: true }] {
                let nets = f.of(&nets);
                table.sets.insert(
                    format!("{name}-{}", f.suffix()),
                    Set {
                        type_: if f.v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
                        flags: vec!["interval".into()],
                        timeout: None,
                        elements: nets.iter().map(nft_element).collect(),
                    },
                );
            }
        }
    }

    /// The addresses of what `sel` with `ns` picks, and the set's name.
    fn picked(
        &mut self,
        sel: Option<&Selector>,
        ns: Option<&Selector>,
        ents: &[Labelled],
        scope: Option<&str>,
    ) -> (String, Vec<IpNet>) {
        let name = picked_name(sel, ns, scope);
        let nets = self
            .sets
            .entry(name.clone())
            .or_insert_with(|| {
                normalize(
                    ents.iter()
                        .filter(|e| picks(sel, ns, e, scope))
                        .flat_map(|e| e.nets.iter().copied()),
                    [],
                )
            })
            .clone();
        (name, nets)
    }
}

/// The conditions of one side of a rule in family `f`, or None when it cannot match there.
fn side(
    e: &EntityRule,
    dir: &str,
    port_dir: &str,
    f: Family,
    ents: &[Labelled],
    sets: &mut SelectorSets,
    scope: Option<&str>,
) -> Option<Vec<String>> {
    let mut out = Vec::new();
    if !e.nets.is_empty() {
        let nets = f.of(&e.nets);
        if nets.is_empty() {
            return None;
        }
        out.push(format!("{} {dir} {}", f.kw(), nets_text(&nets)));
    }
    let not = f.of(&e.not_nets);
    if !not.is_empty() {
        out.push(format!("{} {dir} != {}", f.kw(), nets_text(&not)));
    }
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| Selector::parse(t).ok());
    let (sel, not_sel, ns) = (
        parse(&e.selector),
        parse(&e.not_selector),
        parse(&e.namespace_selector),
    );
    if sel.is_some() || ns.is_some() {
        let (name, nets) = sets.picked(sel.as_ref(), ns.as_ref(), ents, scope);
        if f.of(&nets).is_empty() {
            return None;
        }
        out.push(format!("{} {dir} @{name}-{}", f.kw(), f.suffix()));
    }
    if not_sel.is_some() {
        let (name, nets) = sets.picked(not_sel.as_ref(), ns.as_ref(), ents, scope);
        if !f.of(&nets).is_empty() {
            out.push(format!("{} {dir} != @{name}-{}", f.kw(), f.suffix()));
        }
    }
    if !e.ports.is_empty() {
        out.push(format!("th {port_dir} {}", ports_text(&e.ports)));
    }
    if !e.not_ports.is_empty() {
        out.push(format!("th {port_dir} != {}", ports_text(&e.not_ports)));
    }
    Some(out)
}

/// The match part of `rule`, one text per family it can match in (`scope`: a namespaced
/// policy's namespace).
pub(crate) fn rule_matches(
    rule: &Rule,
    ents: &[Labelled],
    sets: &mut SelectorSets,
    scope: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    // DNS-name rules are pods' ([`crate::policy::dns`]): as written, they match nothing here.
    if !rule.destination.domains.is_empty() {
        return out;
    }
    for f in [Family { v6: false }, Family { v6: true }] {
        if rule.ip_version.is_some_and(|v| (v == 6) != f.v6) {
            continue;
        }
        if (rule.protocol == Some(Proto::ICMP) && f.v6)
            || (rule.protocol == Some(Proto::ICMPV6) && !f.v6)
        {
            continue;
        }
        let mut conds = vec![format!(
            "meta nfproto {}",
            if f.v6 { "ipv6" } else { "ipv4" }
        )];
        if let Some(p) = rule.protocol {
            conds.push(format!("meta l4proto {}", p.nft()));
        }
        if let Some(p) = rule.not_protocol {
            conds.push(format!("meta l4proto != {}", p.nft()));
        }
        let icmp_kw = if f.v6 { "icmpv6" } else { "icmp" };
        if let Some(i) = rule.icmp {
            conds.push(format!("{icmp_kw} type {}", i.type_));
            if let Some(c) = i.code {
                conds.push(format!("{icmp_kw} code {c}"));
            }
        }
        if let Some(i) = rule.not_icmp {
            // Validation allows a type alone here (nft has no "not (type and code)").
            conds.push(format!("{icmp_kw} type != {}", i.type_));
        }
        let Some(src) = side(&rule.source, "saddr", "sport", f, ents, sets, scope) else {
            continue;
        };
        let Some(dst) = side(&rule.destination, "daddr", "dport", f, ents, sets, scope) else {
            continue;
        };
        conds.extend(src);
        conds.extend(dst);
        out.push(conds.join(" "));
    }
    out
}

/// The verdicts of a stage: what Allow writes, and what follows the last tier.
fn allow_verdict(stage: Stage) -> String {
    match stage {
        Stage::ForwardIn => format!("goto {FORWARD_OUT}"),
        _ => "accept".into(),
    }
}

fn end_verdict(stage: Stage, hep: &HostEndpoint) -> Value {
    match stage {
        Stage::PreDnat | Stage::ForwardOut => Value::Verdict(nft::Verdict::Accept),
        Stage::ForwardIn => Value::goto(FORWARD_OUT),
        Stage::Input | Stage::Output => Value::Verdict(if profile_allows(hep) {
            nft::Verdict::Accept
        } else {
            nft::Verdict::Drop
        }),
    }
}

/// Renders the tier chains of `hep` at `stage` into `table`; returns where the stage sends
/// the endpoint's packets (its first tier chain, or the end verdict when no policy applies).
fn render_endpoint(
    view: &CalicoView,
    hep: &HostEndpoint,
    stage: Stage,
    ents: &[Labelled],
    sets: &mut SelectorSets,
    table: &mut nft::Table,
) -> Value {
    let tiers = tiers_for(view, hep, stage);
    let end = end_verdict(stage, hep);
    if tiers.is_empty() {
        return end;
    }
    let n = tiers.len();
    let next = |k: usize| -> String {
        if k + 1 < n {
            format!("goto {}", tier_chain(stage, &hep.name, k + 1))
        } else {
            end.to_string()
        }
    };
    for (k, group) in tiers.iter().enumerate() {
        let tier = &group.name;
        let mut rules = Vec::new();
        for pol in &group.policies {
            let list = if stage.ingress() {
                &pol.spec.ingress
            } else {
                &pol.spec.egress
            };
            for (i, r) in list.iter().enumerate() {
                let verdict = match r.action {
                    Action::Allow => allow_verdict(stage),
                    Action::Deny => "drop".into(),
                    Action::Pass => next(k),
                    Action::Log => format!("log prefix \"{LOG_PREFIX}\""),
                };
                let dir = if stage.ingress() { "ingress" } else { "egress" };
                let comment = format!("comment \"{tier}/{} {dir}[{i}]\"", pol.name);
                for m in rule_matches(r, ents, sets, None) {
                    rules.push(format!("{m} {verdict} {comment}"));
                }
            }
        }
        rules.push(if stage == Stage::PreDnat || group.pass_by_default {
            next(k)
        } else {
            format!("drop comment \"{tier}: end of tier\"")
        });
        table
            .chains
            .insert(tier_chain(stage, &hep.name, k), Chain { base: None, rules });
    }
    Value::goto(tier_chain(stage, &hep.name, 0))
}

fn failsafe_rules(list: &[ProtoPort], dir: &str) -> Vec<String> {
    let mut plain: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    let mut out = Vec::new();
    for f in list {
        match f.net {
            None => {
                plain.entry(f.protocol.nft()).or_default().insert(f.port);
            }
            Some(n) => {
                let kw = if n.addr().is_ipv6() { "ip6" } else { "ip" };
                out.push(format!(
                    "{kw} {dir} {} meta l4proto {} th dport {} accept comment \"failsafe\"",
                    net_text(&n),
                    f.protocol.nft(),
                    f.port
                ));
            }
        }
    }
    for (proto, ports) in plain {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        out.insert(
            0,
            format!(
                "meta l4proto {proto} th dport {{ {} }} accept comment \"failsafe\"",
                ports.join(", ")
            ),
        );
    }
    out
}

/// Adds this node's host endpoint policy to `table` (nothing without a host endpoint).
pub fn render_host_endpoints(view: &CalicoView, inputs: &HostInputs, table: &mut nft::Table) {
    if inputs.heps.is_empty() {
        return;
    }
    let default_config = malla_api::ClusterConfig::default();
    let config = inputs.config.unwrap_or(&default_config);
    let mut sets = SelectorSets::default();
    let workloads = format!("\"{}*\"", malla_api::HOST_IFNAME_PREFIX);
    let vxlan = config.routing == malla_api::RoutingMode::Vxlan;
    let mut used_nodes = false;
    for stage in Stage::ALL {
        let mut map = Map {
            type_: "ifname".into(),
            value: "verdict".into(),
            ..Map::default()
        };
        let mut star: Option<Value> = None;
        let mut any_policy = false;
        for hep in &inputs.heps {
            let target = render_endpoint(view, hep, stage, &inputs.ents, &mut sets, table);
            any_policy |= target != end_verdict(stage, hep);
            if hep.all_interfaces() {
                star.get_or_insert(target);
            } else if let Some(name) = hep.spec.interface_name.as_deref().and_then(IfName::new) {
                map.elements
                    .entry(Key::one(Part::Iface(name)))
                    .or_insert(target);
            }
        }
        let needed = match stage {
            Stage::Input | Stage::Output => true,
            Stage::PreDnat | Stage::ForwardIn | Stage::ForwardOut => any_policy,
        };
        let (ifkw, egress) = match stage {
            Stage::Output | Stage::ForwardOut => ("oifname", true),
            _ => ("iifname", false),
        };
        let mut rules: Vec<String> = Vec::new();
        if needed {
            let m = ifaces_map(stage);
            rules.push(format!("{ifkw} vmap @{m}"));
            table.maps.insert(m, map);
            if let Some(s) = &star {
                let guard = if matches!(stage, Stage::ForwardIn | Stage::ForwardOut) {
                    format!("{ifkw} != {workloads} ")
                } else {
                    String::new()
                };
                rules.push(format!("{guard}{s}"));
            }
        }
        match stage {
            Stage::PreDnat | Stage::Input | Stage::Output => {
                if !needed {
                    continue;
                }
                // Input and output: established traffic first, it is nearly every packet and
                // one conntrack-state test ends it. Pre-DNAT is a nat chain, which sees only a
                // connection's first packet (below): there a pod's own connections (every
                // pod-to-pod SYN on the node) end at the interface test, one rule in.
                let established = "ct state established,related accept".to_string();
                let ifaces = [
                    format!("{ifkw} \"lo\" accept"),
                    format!("{ifkw} {workloads} accept"),
                ];
                let mut head = match stage {
                    Stage::PreDnat => {
                        let mut h: Vec<String> = ifaces.into_iter().rev().collect();
                        h.push(established);
                        h
                    }
                    _ => std::iter::once(established).chain(ifaces).collect(),
                };
                if egress {
                    head.extend(failsafe_rules(&config.failsafe_outbound(), "daddr"));
                } else {
                    head.extend(failsafe_rules(&config.failsafe_inbound(), "saddr"));
                }
                if vxlan && stage != Stage::PreDnat {
                    used_nodes = true;
                    let dir = if egress { "daddr" } else { "saddr" };
                    for (kw, set) in [("ip", NODES_V4), ("ip6", NODES_V6)] {
                        head.push(format!(
                            "meta l4proto udp th dport {} {kw} {dir} @{set} accept comment \"vxlan\"",
                            config.vxlan_port
                        ));
                    }
                }
                head.extend(rules);
                let (name, hook, prio) = match stage {
                    Stage::PreDnat => (PREDNAT, "prerouting", "-110"),
                    Stage::Input => (INPUT, "input", "5"),
                    _ => (OUTPUT, "output", "5"),
                };
                // Pre-DNAT is a nat chain: the kernel consults nat chains for a connection's
                // first packet only, so established traffic (a pod's cross-node stream) never
                // runs it, and a drop there still drops the connection's first packet.
                let kind = if stage == Stage::PreDnat {
                    "nat"
                } else {
                    "filter"
                };
                table.chains.insert(
                    name.into(),
                    Chain {
                        base: Some(BaseChain::new(kind, hook, prio)),
                        rules: head,
                    },
                );
            }
            Stage::ForwardIn => {
                // Written with the egress half (below), which decides whether forward exists.
                table.chains.insert(
                    FORWARD.into(),
                    Chain {
                        base: Some(BaseChain::new("filter", "forward", "5")),
                        rules: {
                            let mut r = vec!["ct state established,related accept".to_string()];
                            r.extend(rules);
                            r.push(format!("goto {FORWARD_OUT}"));
                            r
                        },
                    },
                );
                table.chains.insert(
                    FORWARD_OUT.into(),
                    Chain {
                        base: None,
                        rules: Vec::new(),
                    },
                );
            }
            Stage::ForwardOut => {
                if let Some(c) = table.chains.get_mut(FORWARD_OUT) {
                    c.rules = rules;
                }
            }
        }
    }
    // Forward exists only when some applyOnForward policy applies here.
    let forward_used = table.maps.contains_key(&ifaces_map(Stage::ForwardIn))
        || table.maps.contains_key(&ifaces_map(Stage::ForwardOut));
    if !forward_used {
        table.chains.remove(FORWARD);
        table.chains.remove(FORWARD_OUT);
    }
    sets.write(table);
    if used_nodes {
        for (set, v6) in [(NODES_V4, false), (NODES_V6, true)] {
            table.sets.insert(
                set.into(),
                Set {
                    type_: if v6 { "ipv6_addr" } else { "ipv4_addr" }.into(),
                    flags: Vec::new(),
                    timeout: None,
                    elements: inputs
                        .nodes
                        .iter()
                        .filter(|a| a.is_ipv6() == v6)
                        .map(|a| nft_element(&IpNet::from(*a)))
                        .collect(),
                },
            );
        }
    }
}
