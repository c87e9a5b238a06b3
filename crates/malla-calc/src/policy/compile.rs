//! The compiler: one node's [`PolicyProgram`]. For each local pod, its ingress and egress rules
//! (or "not isolated"), with peers matched through address sets — one per distinct peer
//! (selector pair with its namespace scope, or `ipBlock`), named by a stable hash of it and
//! shared between policies, so a label change only changes set elements.
//!
//! Named ports: for ingress they resolve against the local pod itself. For egress they depend on
//! the destination, so each (peer, port name, protocol) is split by the number the name resolves
//! to on each destination pod: one derived set per number, holding the peer's pod addresses that
//! declare that port (a named port never matches a destination that is not a pod).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::policy::{LabelSelector, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use malla_api::service::{Protocol, TargetPort};
use malla_api::Namespace;
use serde::Serialize;

use super::addrs::{host, normalize};
use super::reference::{isolating, peer_matches, rules};
use super::{fnv, Direction, Endpoint, PolicyPod};

/// An address set shared by every rule with the same peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSet {
    /// What the set stands for (hashed into its name).
    pub key: String,
    /// Which families the set is rendered in (an `ipBlock` has one, a selector both).
    pub v4: bool,
    pub v6: bool,
    /// Sorted, disjoint.
    pub addrs: Vec<IpNet>,
}

impl PeerSet {
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.addrs.iter().any(|n| n.contains(ip))
    }
}

/// The ports a rule matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PortMatch {
    /// Every protocol and port (a rule without `ports`).
    Any,
    /// Per protocol, sorted disjoint inclusive ranges (`0-65535`: every port of it). Never empty.
    Ports(BTreeMap<Protocol, Vec<(u16, u16)>>),
}

impl PortMatch {
    pub fn matches(&self, port: u16, proto: Protocol) -> bool {
        match self {
            Self::Any => true,
            Self::Ports(m) => m
                .get(&proto)
                .is_some_and(|r| r.iter().any(|(a, b)| *a <= port && port <= *b)),
        }
    }

    /// From (protocol, range) pairs; `None` when there are none (the rule matches nothing).
    fn from_ranges(v: impl IntoIterator<Item = (Protocol, (u16, u16))>) -> Option<Self> {
        let mut m: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
        for (p, r) in v {
            m.entry(p).or_default().push(r);
        }
        if m.is_empty() {
            return None;
        }
        for r in m.values_mut() {
            r.sort_unstable();
            let mut out: Vec<(u16, u16)> = Vec::with_capacity(r.len());
            for &(a, b) in r.iter() {
                match out.last_mut() {
                    Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
                    _ => out.push((a, b)),
                }
            }
            *r = out;
        }
        Some(Self::Ports(m))
    }
}

/// One compiled rule: traffic whose other end is in `peer` (`None`: anywhere) on `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompiledRule {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// Index of the rule in the policy's `ingress` / `egress`.
    pub rule: usize,
    /// Name of a set in [`PolicyProgram::sets`].
    pub peer: Option<String>,
    pub ports: PortMatch,
}

/// A local pod's programs: `None` for a direction in which it is not isolated; `Some(rules)`
/// allows what any rule matches and drops the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointProgram {
    pub namespace: String,
    pub name: String,
    pub host_ifname: String,
    pub ips: Vec<IpAddr>,
    pub ingress: Option<Vec<CompiledRule>>,
    pub egress: Option<Vec<CompiledRule>>,
}

/// One node's compiled policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyProgram {
    pub node: String,
    /// Set name (`pol-<hash>`) → set.
    pub sets: BTreeMap<String, PeerSet>,
    /// The local pods, by `namespace/name`.
    pub endpoints: Vec<EndpointProgram>,
}

impl PolicyProgram {
    fn rule_matches(&self, r: &CompiledRule, other: &IpAddr, port: u16, proto: Protocol) -> bool {
        let peer_ok = match &r.peer {
            None => true,
            Some(n) => self.sets.get(n).is_some_and(|s| s.contains(other)),
        };
        peer_ok && r.ports.matches(port, proto)
    }

    /// What this node's program decides for a new connection: the egress program of `src` if
    /// it is a local pod, and the ingress program of `dst` if it is one. Directions decided on
    /// other nodes count as allowed here.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, port: u16, proto: Protocol) -> bool {
        let find = |ip: &IpAddr| self.endpoints.iter().find(|e| e.ips.contains(ip));
        if let Some(rules) = find(&src).and_then(|e| e.egress.as_ref()) {
            if !rules
                .iter()
                .any(|r| self.rule_matches(r, &dst, port, proto))
            {
                return false;
            }
        }
        if let Some(rules) = find(&dst).and_then(|e| e.ingress.as_ref()) {
            if !rules
                .iter()
                .any(|r| self.rule_matches(r, &src, port, proto))
            {
                return false;
            }
        }
        true
    }
}

fn selector_key(s: &LabelSelector) -> String {
    let s = s.canonical();
    let mut out = String::from("{");
    for (k, v) in &s.match_labels {
        let _ = write!(out, "{k}={v},");
    }
    for e in &s.match_expressions {
        let _ = write!(out, "{} {} [{}],", e.key, e.operator, e.values.join(","));
    }
    out.push('}');
    out
}

/// The stable identity of a peer of a policy in `policy_ns`.
fn peer_key(policy_ns: &str, peer: &NetworkPolicyPeer) -> String {
    if let Some(b) = &peer.ip_block {
        return match b.parsed() {
            Some((cidr, mut ex)) => {
                ex.sort();
                ex.dedup();
                let ex: Vec<String> = ex.iter().map(|n| n.to_string()).collect();
                format!("ipBlock {cidr} except [{}]", ex.join(","))
            }
            None => format!("ipBlock invalid {:?}", b.cidr),
        };
    }
    let scope = match &peer.namespace_selector {
        None => format!("namespace {policy_ns}"),
        Some(s) => format!("namespaces {}", selector_key(s)),
    };
    let pods = peer
        .pod_selector
        .as_ref()
        .map_or_else(|| selector_key(&LabelSelector::default()), selector_key);
    format!("pods {pods} in {scope}")
}

/// The set name for a key.
pub fn set_name(key: &str) -> String {
    format!("pol-{:016x}", fnv(key))
}

struct Compiler<'a> {
    namespaces: &'a [Namespace],
    pods: &'a [PolicyPod],
    sets: BTreeMap<String, PeerSet>,
}

impl Compiler<'_> {
    fn add_set(&mut self, key: String, make: impl FnOnce() -> PeerSet) -> String {
        let name = set_name(&key);
        self.sets.entry(name.clone()).or_insert_with(make);
        name
    }

    /// The pod addresses `peer` matches (`None`: every pod address).
    fn peer_pod_ips(
        &self,
        policy_ns: &str,
        peer: Option<&NetworkPolicyPeer>,
    ) -> Vec<(IpAddr, &PolicyPod)> {
        let mut out = Vec::new();
        for q in self.pods {
            for ip in &q.ips {
                let e = Endpoint {
                    pod: Some(q),
                    ip: *ip,
                };
                if peer.is_none_or(|p| peer_matches(policy_ns, p, self.namespaces, &e)) {
                    out.push((*ip, q));
                }
            }
        }
        out
    }

    fn peer_set(&mut self, policy_ns: &str, peer: &NetworkPolicyPeer) -> String {
        let key = peer_key(policy_ns, peer);
        if let Some(b) = &peer.ip_block {
            let parsed = b.parsed();
            return self.add_set(key.clone(), || match parsed {
                Some((cidr, ex)) => PeerSet {
                    key,
                    v4: cidr.addr().is_ipv4(),
                    v6: cidr.addr().is_ipv6(),
                    addrs: normalize([cidr], ex),
                },
                None => PeerSet {
                    key,
                    v4: false,
                    v6: false,
                    addrs: Vec::new(),
                },
            });
        }
        let addrs = normalize(
            self.peer_pod_ips(policy_ns, Some(peer))
                .into_iter()
                .map(|(ip, _)| host(ip)),
            [],
        );
        self.add_set(key.clone(), || PeerSet {
            key,
            v4: true,
            v6: true,
            addrs,
        })
    }

    /// Rules for one policy rule in direction `dir` of the local pod `local`.
    fn rule(
        &mut self,
        policy: &NetworkPolicy,
        index: usize,
        (peers, ports): (&[NetworkPolicyPeer], &[NetworkPolicyPort]),
        dir: Direction,
        local: &PolicyPod,
        out: &mut Vec<CompiledRule>,
    ) {
        let ns = policy.namespace.as_str();
        let peer_list: Vec<Option<&NetworkPolicyPeer>> = if peers.is_empty() {
            vec![None]
        } else {
            peers.iter().map(Some).collect()
        };
        let mut push = |peer: Option<String>, ports: PortMatch| {
            out.push(CompiledRule {
                policy: policy.key(),
                rule: index,
                peer,
                ports,
            })
        };
        let range = |pp: &NetworkPolicyPort| match &pp.port {
            None => Some((0, u16::MAX)),
            Some(TargetPort::Number(n)) => Some((*n, pp.end_port.unwrap_or(*n))),
            Some(TargetPort::Name(_)) => None,
        };
        // Ports that do not depend on the destination: all of them for ingress (named ports
        // resolve against the local pod, which is the destination).
        let fixed: Option<PortMatch> = if ports.is_empty() {
            Some(PortMatch::Any)
        } else {
            PortMatch::from_ranges(ports.iter().flat_map(|pp| {
                let r: Vec<(Protocol, (u16, u16))> = match (&pp.port, dir) {
                    (Some(TargetPort::Name(name)), Direction::Ingress) => local
                        .named_port(name, pp.protocol)
                        .into_iter()
                        .map(|k| (pp.protocol, (k, k)))
                        .collect(),
                    _ => range(pp).map(|r| (pp.protocol, r)).into_iter().collect(),
                };
                r
            }))
        };
        if let Some(pm) = fixed {
            for peer in &peer_list {
                let set = peer.map(|p| self.peer_set(ns, p));
                push(set, pm.clone());
            }
        }
        if dir == Direction::Ingress {
            return;
        }
        // Egress named ports: split each peer by the number the name resolves to.
        let named: BTreeSet<(Protocol, &str)> = ports
            .iter()
            .filter_map(|pp| match &pp.port {
                Some(TargetPort::Name(n)) => Some((pp.protocol, n.as_str())),
                _ => None,
            })
            .collect();
        for (proto, name) in named {
            for peer in &peer_list {
                let base = peer.map_or_else(|| "any".to_string(), |p| peer_key(ns, p));
                let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
                for (ip, q) in self.peer_pod_ips(ns, *peer) {
                    for k in q.named_port(name, proto) {
                        by_port.entry(k).or_default().push(ip);
                    }
                }
                for (k, ips) in by_port {
                    let key = format!("{base} port {}/{name}={k}", proto.nft());
                    let set = self.add_set(key.clone(), || PeerSet {
                        key,
                        v4: true,
                        v6: true,
                        addrs: normalize(ips.into_iter().map(host), []),
                    });
                    let mut m = BTreeMap::new();
                    m.insert(proto, vec![(k, k)]);
                    push(Some(set), PortMatch::Ports(m));
                }
            }
        }
    }

    fn direction(
        &mut self,
        policies: &[NetworkPolicy],
        pod: &PolicyPod,
        dir: Direction,
    ) -> Option<Vec<CompiledRule>> {
        let mut pols = isolating(policies, pod, dir);
        if pols.is_empty() {
            return None;
        }
        pols.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut out = Vec::new();
        for p in pols {
            for (i, r) in rules(p, dir).into_iter().enumerate() {
                self.rule(p, i, r, dir, pod, &mut out);
            }
        }
        Some(out)
    }
}

/// Compiles the policy of every pod on `local_node`.
pub fn compile(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    pods: &[PolicyPod],
    local_node: &str,
) -> PolicyProgram {
    let mut c = Compiler {
        namespaces,
        pods,
        sets: BTreeMap::new(),
    };
    let mut local: Vec<&PolicyPod> = pods.iter().filter(|p| p.node == local_node).collect();
    local.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let endpoints = local
        .into_iter()
        .map(|pod| EndpointProgram {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            host_ifname: pod.host_ifname.clone(),
            ips: pod.ips.clone(),
            ingress: c.direction(policies, pod, Direction::Ingress),
            egress: c.direction(policies, pod, Direction::Egress),
        })
        .collect();
    PolicyProgram {
        node: local_node.to_string(),
        sets: c.sets,
        endpoints,
    }
}
