//! Rendering a [`PolicyProgram`] into the `inet malla` table.
//!
//! - Sets `pol-<hash>-v4` / `-v6` per [`PeerSet`] and family: pod addresses in hash sets,
//!   `ipBlock`s with networks in interval sets ([`PeerSet::interval`]).
//! - Base chain [`POLICY_FORWARD`] (filter, hook forward, priority filter):
//!   `ct state established,related accept`, `ct state invalid drop`, then
//!   `iifname vmap @pol-egress-dispatch` and `oifname vmap @pol-ingress-dispatch`, maps from a
//!   local pod's host interface to `jump pol-out-<ifname>` / `jump pol-in-<ifname>`. Only
//!   isolated directions get an entry.
//! - The endpoint chain `pol-in-<ifname>` (peers matched on `saddr`, allowing verdict
//!   `accept`) / `pol-out-<ifname>` (`daddr`, `return`, so that the destination's ingress chain
//!   still runs), port first, so that a new connection costs a few lookups however many
//!   policies select the pod:
//!   1. one rule per distinct peer set (× family) allowed on every port, whichever rules allow
//!      it (`ip saddr @pol-…-v4 accept`);
//!   2. per protocol, `meta l4proto tcp th dport vmap @<chain>-tcp`: an interval map from
//!      disjoint port segments (the rules' ranges cut at every edge, so overlapping ranges and
//!      `endPort`s never overlap in the map) to the allowing verdict when anyone may use the
//!      segment, else `goto pol-peers-<hash>`. One map per protocol rather than one keyed by
//!      `meta l4proto . th dport`: a concatenated interval map is a pipapo set, whose lookup
//!      grows with its elements (~4.5 µs at 1000 on the development VM), while a plain
//!      interval map is an rbtree, flat at that size;
//!   3. `drop`.
//! - `pol-peers-<hash>`: the peer sets allowed on one segment (and none of them on every port),
//!   one rule each per family with the direction's verdict, then `drop`. Named by a hash of its
//!   rules, so every segment and endpoint with the same peers shares one chain. Above
//!   [`UNION_ABOVE`] sets (here or in step 1), the sets are matched through union sets: one
//!   hash set of their pod addresses, one interval set of their `ipBlock` networks.
//! - Only the sets some rule refers to are written.
//!
//! Why `goto` and the trailing `drop`: the endpoint chain is jumped to from the base chain, so
//! its return point is the base chain's next rule. A `goto` keeps that return point: egress's
//! `return` in a peers chain goes back to the base chain (on to the ingress dispatch), exactly
//! like a `return` in the endpoint chain itself. Falling off the end of a peers chain would
//! return there too, i.e. let the packet through, hence the explicit `drop`.
//!
//! - Base chain [`POLICY_INPUT`] (filter, hook input, priority filter): traffic from a pod to
//!   its own node goes through the pod's egress chain too (`iifname vmap @pol-egress-dispatch`,
//!   after `ct state established,related accept`, `ct state invalid drop` and IPv6 neighbour
//!   discovery, which a pod needs with its node whatever its policy says). What follows an
//!   allowed egress is the cluster's endpoint-to-host action ([`render_endpoint_to_host`]).
//!
//! Traffic from a pod's own node is not handled here (the caller accepts it on the output
//! hook). Interface names must be kernel names (`[A-Za-z0-9_.-]`, at most 15 bytes); an endpoint
//! with another name is left out, as it could not be written into the ruleset.

use std::collections::{BTreeMap, BTreeSet};

use malla_api::service::Protocol;

use crate::nft::element::IfName;
use crate::nft::{self, BaseChain, Chain, Key, Map, Part, Set, Value};

use super::addrs::{hosts, nft_element, normalize};
use super::compile::{set_name, CompiledRule, EndpointProgram, PeerSet, PolicyProgram, PortMatch};
use super::flowlog::{self, LogPoint};
use super::fnv;

/// The policy base chain.
pub const POLICY_FORWARD: &str = "policy-forward";
/// The base chain applying a pod's egress policy to traffic addressed to its own node.
pub const POLICY_INPUT: &str = "policy-input";
/// The base chain of the endpoint-to-host action `Drop` (after [`POLICY_INPUT`]).
pub const HOST_FROM_WORKLOADS: &str = "host-from-workloads";
/// IPv6 neighbour discovery between a pod and its node: never subject to policy.
const NEIGHBOUR_DISCOVERY: &str =
    "meta l4proto ipv6-icmp icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept";
/// Map: host interface → `jump pol-in-<ifname>`.
pub const INGRESS_DISPATCH: &str = "pol-ingress-dispatch";
/// Map: host interface → `jump pol-out-<ifname>`.
pub const EGRESS_DISPATCH: &str = "pol-egress-dispatch";

/// The ingress chain of an endpoint.
pub fn ingress_chain(ifname: &str) -> String {
    format!("pol-in-{ifname}")
}

/// The egress chain of an endpoint.
pub fn egress_chain(ifname: &str) -> String {
    format!("pol-out-{ifname}")
}

/// The port map of an endpoint chain for one protocol: port range → the verdict for that
/// segment.
pub fn ports_map(chain: &str, proto: Protocol) -> String {
    format!("{chain}-{}", proto.nft())
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// The families a set is rendered in: (`ip` / `ip6`, `v4` / `v6`).
type Families = Vec<(&'static str, &'static str)>;

fn families(set: &PeerSet) -> Families {
    let mut v = Vec::new();
    if set.v4 {
        v.push(("ip", "v4"));
    }
    if set.v6 {
        v.push(("ip6", "v6"));
    }
    v
}

/// The rules allowing one peer (`None`: anyone): indices into the direction's rules.
type Peers<'a> = BTreeMap<Option<&'a str>, BTreeSet<usize>>;

/// A port range of a rule: (first, last, peer, rule index).
type Range<'a> = (u32, u32, Option<&'a str>, usize);

/// One direction of an endpoint, grouped for rendering: the peers allowed on every port, and
/// disjoint port segments, each with the peers allowed there (none of which is allowed on every
/// port already).
struct Dispatch<'a> {
    any_port: Peers<'a>,
    /// (protocol, first port, last port, peers), sorted, disjoint, never with empty peers.
    segments: Vec<(Protocol, u16, u16, Peers<'a>)>,
}

/// Splits the port ranges of `rules` into disjoint segments: the ranges' edges cut each
/// protocol's ports into pieces on which the same rules apply; neighbours allowing the same
/// peers by the same rules are joined again.
fn dispatch(rules: &[CompiledRule]) -> Dispatch<'_> {
    let mut any_port: Peers = BTreeMap::new();
    let mut by_proto: BTreeMap<Protocol, Vec<Range>> = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        let peer = r.peer.as_deref();
        match &r.ports {
            PortMatch::Any => {
                any_port.entry(peer).or_default().insert(i);
            }
            PortMatch::Ports(m) => {
                for (proto, ranges) in m {
                    let v = by_proto.entry(*proto).or_default();
                    v.extend(
                        ranges
                            .iter()
                            .map(|&(a, b)| (u32::from(a), u32::from(b), peer, i)),
                    );
                }
            }
        }
    }
    let mut segments: Vec<(Protocol, u16, u16, Peers)> = Vec::new();
    if any_port.contains_key(&None) {
        return Dispatch { any_port, segments };
    }
    for (proto, mut items) in by_proto {
        items.sort_unstable();
        let edges: BTreeSet<u32> = items.iter().flat_map(|&(a, b, _, _)| [a, b + 1]).collect();
        let edges: Vec<u32> = edges.into_iter().collect();
        let mut next = 0;
        let mut active: Vec<Range> = Vec::new();
        for w in edges.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            while next < items.len() && items[next].0 <= lo {
                active.push(items[next]);
                next += 1;
            }
            active.retain(|it| it.1 >= lo);
            let mut peers: Peers = BTreeMap::new();
            for &(_, _, peer, i) in &active {
                if !any_port.contains_key(&peer) {
                    peers.entry(peer).or_default().insert(i);
                }
            }
            if peers.is_empty() {
                continue;
            }
            let (Ok(lo), Ok(hi)) = (u16::try_from(lo), u16::try_from(hi)) else {
                continue;
            };
            match segments.last_mut() {
                Some((p, _, last, q))
                    if *p == proto && u32::from(*last) + 1 == u32::from(lo) && *q == peers =>
                {
                    *last = hi;
                }
                _ => segments.push((proto, lo, hi, peers)),
            }
        }
    }
    Dispatch { any_port, segments }
}

/// `comment "…"` naming the policy rules behind a peer (deduplicated, in policy order).
fn comment(rules: &[CompiledRule], which: &BTreeSet<usize>, dir: &str) -> String {
    let mut names: Vec<String> = Vec::new();
    for &i in which {
        let r = &rules[i];
        let n = format!("{} {dir}[{}]", r.policy, r.rule);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let mut text: String = names
        .join(", ")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_./[], ".contains(*c))
        .collect();
    if text.len() > 120 {
        text.truncate(117);
        text.push_str("...");
    }
    format!("comment \"{text}\"")
}

/// How a direction is rendered: the address it matches peers on and its allowing verdict.
struct Dir {
    /// `ingress` / `egress` (comments).
    name: &'static str,
    /// `saddr` / `daddr`.
    addr: &'static str,
    /// `accept` (ingress: the last word) / `return` (egress: back to the base chain, where the
    /// destination's ingress chain still runs).
    verdict: &'static str,
    /// `verdict` as a port map's value.
    map_verdict: nft::Verdict,
    /// The direction in flow logs.
    log: flowlog::Dir,
}

/// The allow log statement of the first of the rules `which` (flow logs).
fn allow_log(rules: &[CompiledRule], which: &BTreeSet<usize>, d: &Dir) -> String {
    match which.first().and_then(|&i| rules.get(i)) {
        Some(r) => LogPoint::allow(d.log, &r.policy, r.rule).statement(),
        None => String::new(),
    }
}

const INGRESS: Dir = Dir {
    name: "ingress",
    addr: "saddr",
    verdict: "accept",
    map_verdict: nft::Verdict::Accept,
    log: flowlog::Dir::In,
};
const EGRESS: Dir = Dir {
    name: "egress",
    addr: "daddr",
    verdict: "return",
    map_verdict: nft::Verdict::Return,
    log: flowlog::Dir::Out,
};

/// The name of a shared peers chain: a hash of its rules.
fn peers_chain_name(rules: &[String], salt: u32) -> String {
    let mut text = rules.join("\n");
    if salt > 0 {
        text.push_str(&format!("\n{salt}"));
    }
    format!("pol-peers-{:016x}", fnv(&text))
}

/// Above this many distinct peer sets in one place (the any-port part of an endpoint chain, or
/// a peers chain), the sets are matched through union sets instead, so that a packet costs at
/// most this many lookups per family whatever the policies.
pub const UNION_ABOVE: usize = 4;

/// What a union set stands for (hashed into its name): its members' names.
fn union_key(names: &[&str]) -> String {
    format!("union of {}", names.join(","))
}

/// How the peer sets allowed in one place are matched: each alone, or above `union_above` sets
/// by kind (pod-address hash sets, `ipBlock` interval sets), a kind of two or more sets through
/// one union set (a part of one set is matched alone).
fn grouped<'p, T>(
    sets: Vec<(&'p str, &'p PeerSet, T)>,
    union_above: usize,
) -> Vec<Vec<(&'p str, &'p PeerSet, T)>> {
    if sets.len() <= union_above {
        return sets.into_iter().map(|s| vec![s]).collect();
    }
    let (intervals, hashes): (Vec<_>, Vec<_>) = sets.into_iter().partition(|(_, s, _)| s.interval);
    [hashes, intervals]
        .into_iter()
        .filter(|part| !part.is_empty())
        .collect()
}

/// The sets a render of a program writes: the program's sets some rule matches directly, and
/// the union sets (by name) with their members (names of the program's sets). A change that
/// only moves addresses in and out of the program's sets leaves this as it is, so the member
/// path ([`super::members`]) finds from it every table set an address change touches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderedSets {
    pub used: BTreeSet<String>,
    pub unions: BTreeMap<String, Vec<String>>,
}

/// [`RenderedSets`] of the program made of `endpoints` over `sets`, as [`render_policy`]
/// groups them, without rendering anything.
pub fn rendered_sets<'a>(
    endpoints: impl IntoIterator<Item = &'a EndpointProgram>,
    sets: &BTreeMap<String, PeerSet>,
) -> RenderedSets {
    let mut out = RenderedSets::default();
    for ep in endpoints.into_iter().filter(|e| ifname_ok(&e.host_ifname)) {
        for rules in ep.ingress.iter().chain(ep.egress.iter()) {
            let disp = dispatch(rules);
            let places = std::iter::once(&disp.any_port).chain(
                disp.segments
                    .iter()
                    .map(|(_, _, _, peers)| peers)
                    .filter(|peers| !peers.contains_key(&None)),
            );
            for peers in places {
                let here: Vec<(&str, &PeerSet, ())> = peers
                    .keys()
                    .flatten()
                    .filter_map(|n| sets.get_key_value(*n))
                    .map(|(n, s)| (n.as_str(), s, ()))
                    .collect();
                for part in grouped(here, UNION_ABOVE) {
                    let names: Vec<&str> = part.iter().map(|(n, _, _)| *n).collect();
                    match names.as_slice() {
                        [one] => {
                            out.used.insert(one.to_string());
                        }
                        _ => {
                            let name = set_name(&union_key(&names));
                            let members = names.iter().map(|n| n.to_string()).collect();
                            out.unions.insert(name, members);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Rendering state: the sets rules refer to (the program's, and unions made on the way).
struct Render<'p> {
    prog: &'p PolicyProgram,
    union_above: usize,
    /// Program sets some rule refers to.
    used: BTreeSet<&'p str>,
    /// Union sets, by name.
    unions: BTreeMap<String, PeerSet>,
}

impl<'p> Render<'p> {
    /// The union of `members` (all hash sets or all interval sets), named by its members.
    fn union(&mut self, members: &[(&'p str, &'p PeerSet)]) -> String {
        let names: Vec<&str> = members.iter().map(|(n, _)| *n).collect();
        let key = union_key(&names);
        let name = set_name(&key);
        if !self.unions.contains_key(&name) {
            let interval = members.iter().any(|(_, s)| s.interval);
            let all = members.iter().flat_map(|(_, s)| s.addrs.iter().copied());
            let set = PeerSet {
                v4: members.iter().any(|(_, s)| s.v4),
                v6: members.iter().any(|(_, s)| s.v6),
                interval,
                addrs: if interval {
                    normalize(all, [])
                } else {
                    hosts(all.map(|n| n.addr()))
                },
                key,
            };
            self.unions.insert(name.clone(), set);
        }
        name
    }

    /// The rules allowing `peers`, with the direction's verdict: a peer `None` (anyone) is one
    /// bare verdict; a set one rule per family. Above [`UNION_ABOVE`] sets, the pod-address
    /// sets are matched through one union set and the `ipBlock` networks through another.
    fn peer_rules(&mut self, rules: &[CompiledRule], peers: &Peers<'p>, d: &Dir) -> Vec<String> {
        let prog = self.prog;
        let mut out = Vec::new();
        let mut sets: Vec<(&'p str, &'p PeerSet, &BTreeSet<usize>)> = Vec::new();
        for (peer, which) in peers {
            match peer {
                None => out.push(format!(
                    "{} {} {}",
                    allow_log(rules, which, d),
                    d.verdict,
                    comment(rules, which, d.name)
                )),
                Some(name) => {
                    if let Some((name, set)) = prog.sets.get_key_value(*name) {
                        sets.push((name.as_str(), set, which));
                    }
                }
            }
        }
        // (set name, its families, the rules behind it)
        let mut groups: Vec<(String, Families, BTreeSet<usize>)> = Vec::new();
        for part in grouped(sets, self.union_above) {
            let which: BTreeSet<usize> = part
                .iter()
                .flat_map(|(_, _, w)| w.iter().copied())
                .collect();
            match part.as_slice() {
                [(name, set, _)] => {
                    self.used.insert(name);
                    groups.push((name.to_string(), families(set), which));
                }
                _ => {
                    let members: Vec<(&'p str, &'p PeerSet)> =
                        part.iter().map(|(n, s, _)| (*n, *s)).collect();
                    let name = self.union(&members);
                    let fams = families(&self.unions[&name]);
                    groups.push((name, fams, which));
                }
            }
        }
        for (name, fams, which) in groups {
            let c = comment(rules, &which, d.name);
            let log = allow_log(rules, &which, d);
            for (kw, fam) in fams {
                out.push(format!(
                    "{kw} {} @{name}-{fam} {log} {} {c}",
                    d.addr, d.verdict
                ));
            }
        }
        out
    }

    /// Renders one isolated direction of an endpoint: its chain `chain`, its port map and the
    /// peers chains its segments go to (shared with every endpoint whose segment has the same
    /// rules).
    fn direction(
        &mut self,
        rules: &'p [CompiledRule],
        chain: &str,
        d: &Dir,
        table: &mut nft::Table,
    ) {
        let disp = dispatch(rules);
        let mut out = self.peer_rules(rules, &disp.any_port, d);
        if disp.any_port.contains_key(&None) {
            table.chains.insert(
                chain.to_string(),
                Chain {
                    base: None,
                    rules: out,
                },
            );
            return;
        }
        let mut maps: BTreeMap<Protocol, Map> = BTreeMap::new();
        for (proto, lo, hi, peers) in &disp.segments {
            let key = Key::one(if lo == hi {
                Part::Int(u32::from(*lo))
            } else {
                Part::Range(u32::from(*lo), u32::from(*hi))
            });
            let value = if peers.contains_key(&None) {
                Value::Verdict(d.map_verdict.clone())
            } else {
                let mut body = self.peer_rules(rules, peers, d);
                body.extend(LogPoint::Deny { dir: d.log }.deny_rules(table));
                body.push("drop".into());
                let mut salt = 0;
                let name = loop {
                    let name = peers_chain_name(&body, salt);
                    match table.chains.get(&name) {
                        Some(c) if c.rules != body => salt += 1,
                        _ => break name,
                    }
                };
                table.chains.insert(
                    name.clone(),
                    Chain {
                        base: None,
                        rules: body,
                    },
                );
                Value::goto(name)
            };
            maps.entry(*proto)
                .or_insert_with(|| Map {
                    type_: "inet_service".into(),
                    value: "verdict".into(),
                    flags: vec!["interval".into()],
                    ..Map::default()
                })
                .elements
                .insert(key, value);
        }
        for (proto, map) in maps {
            let name = ports_map(chain, proto);
            out.push(format!(
                "meta l4proto {} th dport vmap @{name}",
                proto.nft()
            ));
            table.maps.insert(name, map);
        }
        out.extend(LogPoint::Deny { dir: d.log }.deny_rules(table));
        out.push("drop".into());
        table.chains.insert(
            chain.to_string(),
            Chain {
                base: None,
                rules: out,
            },
        );
    }
}

/// Adds the program's sets, maps and chains to `table` (the `inet malla` table). Only sets
/// some rule refers to are written.
pub fn render_policy(prog: &PolicyProgram, table: &mut nft::Table) {
    render_policy_with(prog, table, UNION_ABOVE);
}

/// [`render_policy`] with another threshold for union sets (tests).
pub(crate) fn render_policy_with(prog: &PolicyProgram, table: &mut nft::Table, union_above: usize) {
    let mut r = Render {
        prog,
        union_above,
        used: BTreeSet::new(),
        unions: BTreeMap::new(),
    };
    let mut ingress = Map {
        type_: "ifname".into(),
        value: "verdict".into(),
        ..Map::default()
    };
    let mut egress = ingress.clone();
    for ep in &prog.endpoints {
        if !ifname_ok(&ep.host_ifname) {
            continue;
        }
        let Some(name) = IfName::new(&ep.host_ifname) else {
            continue;
        };
        let key = Key::one(Part::Iface(name));
        if let Some(rules) = &ep.ingress {
            let chain = ingress_chain(&ep.host_ifname);
            ingress
                .elements
                .insert(key.clone(), Value::jump(chain.as_str()));
            r.direction(rules, &chain, &INGRESS, table);
        }
        if let Some(rules) = &ep.egress {
            let chain = egress_chain(&ep.host_ifname);
            egress.elements.insert(key, Value::jump(chain.as_str()));
            r.direction(rules, &chain, &EGRESS, table);
        }
    }
    let used = r
        .used
        .iter()
        .filter_map(|n| prog.sets.get_key_value(*n))
        .chain(r.unions.iter());
    for (name, set) in used {
        for (_, fam) in families(set) {
            let ty = if fam == "v4" {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            let elements = set
                .addrs
                .iter()
                .filter(|n| n.addr().is_ipv4() == (fam == "v4"))
                .map(nft_element)
                .collect();
            let flags = if set.interval {
                vec!["interval".into()]
            } else {
                Vec::new()
            };
            table.sets.insert(
                format!("{name}-{fam}"),
                Set {
                    type_: ty.into(),
                    flags,
                    timeout: None,
                    elements,
                },
            );
        }
    }
    table.maps.insert(INGRESS_DISPATCH.into(), ingress);
    table.maps.insert(EGRESS_DISPATCH.into(), egress);
    table.chains.insert(
        POLICY_FORWARD.into(),
        Chain {
            base: Some(BaseChain::new("filter", "forward", "filter")),
            rules: vec![
                "ct state established,related accept".into(),
                "ct state invalid drop".into(),
                format!("iifname vmap @{EGRESS_DISPATCH}"),
                format!("oifname vmap @{INGRESS_DISPATCH}"),
            ],
        },
    );
    table.chains.insert(
        POLICY_INPUT.into(),
        Chain {
            base: Some(BaseChain::new("filter", "input", "filter")),
            rules: vec![
                "ct state established,related accept".into(),
                "ct state invalid drop".into(),
                NEIGHBOUR_DISCOVERY.into(),
                format!("iifname vmap @{EGRESS_DISPATCH}"),
            ],
        },
    );
}

/// The endpoint-to-host action after [`POLICY_INPUT`]: with `Drop`, a base chain one priority
/// later drops what pods send their node, except replies to connections the node opened (its
/// probes of its pods) and IPv6 neighbour discovery. With `Accept` nothing is added: an egress
/// the pod's policy allowed is accepted.
pub fn render_endpoint_to_host(action: malla_api::EndpointToHostAction, table: &mut nft::Table) {
    if action == malla_api::EndpointToHostAction::Accept {
        return;
    }
    table.chains.insert(
        HOST_FROM_WORKLOADS.into(),
        Chain {
            base: Some(BaseChain::new("filter", "input", "1")),
            rules: vec![
                "ct state established,related accept".into(),
                NEIGHBOUR_DISCOVERY.into(),
                format!(
                    "iifname \"{}*\" counter drop comment \"endpoint-to-host\"",
                    malla_api::HOST_IFNAME_PREFIX
                ),
            ],
        },
    );
}
