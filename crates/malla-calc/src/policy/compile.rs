//! The compiler: one node's [`PolicyProgram`]. For each local pod, its ingress and egress rules
//! (or "not isolated"), with peers matched through address sets — one per distinct peer
//! (selector pair with its namespace scope, or `ipBlock`), named by a stable hash of it and
//! shared between policies, so a label change only changes set elements.
//!
//! Named ports: for ingress they resolve against the local pod itself. For egress they depend on
//! the destination, so each (peer, port name, protocol) is split by the number the name resolves
//! to on each destination pod: one derived set per number, holding the peer's pod addresses that
//! declare that port (a named port never matches a destination that is not a pod).

use std::cell::{Cell, OnceCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::policy::{
    LabelSelector, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, Operator,
};
use malla_api::service::{Protocol, TargetPort};
use malla_api::Namespace;
use serde::Serialize;

use super::addrs::{hosts, normalize};
use super::reference::{has_type, rules};
use super::{fnv, namespace_labels, valid, Direction, PolicyPod};

/// An address set shared by every rule with the same peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSet {
    /// What the set stands for (hashed into its name).
    pub key: String,
    /// Which families the set is rendered in (an `ipBlock` has one, a selector both).
    pub v4: bool,
    pub v6: bool,
    /// Whether `addrs` may hold networks (an `ipBlock` that is not one address): rendered as
    /// an interval set. Otherwise every element is one address (pod addresses), rendered as a
    /// hash set, which the kernel looks up in O(1) and `nft` updates without reading the
    /// elements of other sets.
    pub interval: bool,
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
pub(crate) fn peer_key(policy_ns: &str, peer: &NetworkPolicyPeer) -> String {
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

/// A valid policy with what the compiler needs of it computed once.
pub(crate) struct Pol<'a> {
    pub(crate) p: &'a NetworkPolicy,
    /// `namespace/name`.
    pub(crate) key: String,
    pub(crate) ingress: bool,
    pub(crate) egress: bool,
}

impl<'a> Pol<'a> {
    pub(crate) fn new(p: &'a NetworkPolicy) -> Self {
        Self {
            p,
            key: p.key(),
            ingress: has_type(p, Direction::Ingress),
            egress: has_type(p, Direction::Egress),
        }
    }
}

/// Where rules get the names of their peers' address sets. The full compiler builds each set
/// once from every pod; the incremental index ([`super::incremental`]) reuses the sets it
/// keeps and builds only new ones. Both share the rule-building code below, so both give the
/// same program.
pub(crate) trait SetSource {
    /// The set of the selector or `ipBlock` peer `peer` of a policy in `policy_ns` (`at` names
    /// the peer within the program being compiled; a cache key only).
    fn peer_set(&mut self, at: PeerRef, policy_ns: &str, peer: &NetworkPolicyPeer) -> String;
    /// The derived sets of a peer (`None`: every pod) for an egress named port: (number, set
    /// name) per number the name resolves to on the peer's pods, in number order.
    fn named_sets(
        &mut self,
        at: Option<PeerRef>,
        policy_ns: &str,
        peer: Option<&NetworkPolicyPeer>,
        proto: Protocol,
        name: &str,
    ) -> Vec<(u16, String)>;
}

/// How a set's addresses follow from the pods, recorded for the sets that depend on pods (an
/// `ipBlock` set does not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetDef {
    pub(crate) policy_ns: String,
    /// `None`: every pod.
    pub(crate) peer: Option<NetworkPolicyPeer>,
    /// For a named-port set: the port's protocol, name and the number its members declare.
    pub(crate) named: Option<(Protocol, String, u16)>,
}

impl SetDef {
    /// The addresses of `pod` (whose namespace has `ns_labels`) that belong to the set.
    pub(crate) fn addrs_of<'p>(
        &self,
        pod: &'p PolicyPod,
        ns_labels: &BTreeMap<String, String>,
    ) -> impl Iterator<Item = IpAddr> + 'p {
        let declared = match &self.named {
            None => true,
            Some((proto, name, k)) => pod.named_port(name, *proto).contains(k),
        };
        let whole_pod = declared
            && match &self.peer {
                None => true,
                Some(peer) if peer.ip_block.is_some() => true,
                Some(peer) => {
                    let ns_ok = match &peer.namespace_selector {
                        None => *pod.namespace == *self.policy_ns,
                        Some(s) => s.matches(ns_labels),
                    };
                    ns_ok
                        && peer
                            .pod_selector
                            .as_ref()
                            .is_none_or(|s| s.matches(&pod.labels))
                }
            };
        let block = self
            .peer
            .as_ref()
            .and_then(|p| p.ip_block.as_ref())
            .map(|b| b.parsed());
        pod.ips.iter().copied().filter(move |ip| {
            whole_pod
                && match &block {
                    None => true,
                    Some(None) => false,
                    Some(Some((cidr, ex))) => {
                        cidr.contains(ip) && !ex.iter().any(|e| e.contains(ip))
                    }
                }
        })
    }
}

/// The set of an `ipBlock` peer: its addresses, fixed.
pub(crate) fn block_set(key: String, b: &malla_api::policy::IpBlock) -> PeerSet {
    match b.parsed() {
        Some((cidr, ex)) => {
            let addrs = normalize([cidr], ex);
            PeerSet {
                key,
                v4: cidr.addr().is_ipv4(),
                v6: cidr.addr().is_ipv6(),
                interval: addrs.iter().any(|n| n.prefix_len() < n.max_prefix_len()),
                addrs,
            }
        }
        None => PeerSet {
            key,
            v4: false,
            v6: false,
            interval: false,
            addrs: Vec::new(),
        },
    }
}

/// A pod set: host addresses, both families.
pub(crate) fn pod_set(key: String, addrs: Vec<IpNet>) -> PeerSet {
    PeerSet {
        key,
        v4: true,
        v6: true,
        interval: false,
        addrs,
    }
}

/// The key of a named-port derived set.
pub(crate) fn named_set_key(base: &str, proto: Protocol, name: &str, k: u16) -> String {
    format!("{base} port {}/{name}={k}", proto.nft())
}

/// The base of a named-port group: the peer's key, or `any`.
pub(crate) fn named_base(policy_ns: &str, peer: Option<&NetworkPolicyPeer>) -> String {
    peer.map_or_else(|| "any".to_string(), |p| peer_key(policy_ns, p))
}

/// Pods of one namespace group, by their index in it.
type Bits = Vec<u64>;

fn and(acc: &mut Bits, b: &Bits) {
    acc.iter_mut().zip(b).for_each(|(a, b)| *a &= b);
}

fn and_not(acc: &mut Bits, b: &Bits) {
    acc.iter_mut().zip(b).for_each(|(a, b)| *a &= !b);
}

fn or(acc: &mut Bits, b: &Bits) {
    acc.iter_mut().zip(b).for_each(|(a, b)| *a |= b);
}

/// The pods' labels of one namespace group: key → (the pods with that key, value → the pods
/// with that value). Ordered maps: label keys and values are short, so a few comparisons beat
/// hashing them (and no label can make a lookup slow).
type LabelIndex<'a> = BTreeMap<&'a str, (Bits, BTreeMap<&'a str, Bits>)>;

/// The pods of one namespace, with that namespace's labels and (built on first use) an index
/// of the pods' labels, so that a selector costs a few bit operations, not a match per pod.
struct NsGroup<'a> {
    labels: &'a BTreeMap<String, String>,
    pods: Vec<&'a PolicyPod<'a>>,
    index: OnceCell<LabelIndex<'a>>,
    /// Selectors matched pod by pod so far (before the index is built).
    direct: Cell<u32>,
}

/// Selectors a namespace group matches pod by pod before it builds its label index: indexing
/// costs a few matches' worth per pod, so a group few selectors reach never pays it.
const DIRECT_SELECTS: u32 = 4;

impl<'a> NsGroup<'a> {
    fn none(&self) -> Bits {
        vec![0; self.pods.len().div_ceil(64)]
    }

    fn index(&self) -> &LabelIndex<'a> {
        self.index.get_or_init(|| {
            let mut index: LabelIndex<'a> = BTreeMap::new();
            for (i, &q) in self.pods.iter().enumerate() {
                let (word, bit) = (i / 64, 1u64 << (i % 64));
                let labels: &'a BTreeMap<String, String> = &q.labels;
                for (k, v) in labels {
                    let (has, values) = index
                        .entry(k.as_str())
                        .or_insert_with(|| (self.none(), BTreeMap::new()));
                    has[word] |= bit;
                    values.entry(v.as_str()).or_insert_with(|| self.none())[word] |= bit;
                }
            }
            index
        })
    }

    /// The pods `s` selects, as [`LabelSelector::matches`] decides.
    fn select(&self, s: &LabelSelector) -> Bits {
        let n = self.pods.len();
        let mut acc: Bits = vec![u64::MAX; n.div_ceil(64)];
        if !n.is_multiple_of(64) {
            if let Some(last) = acc.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        if s.is_empty() {
            return acc;
        }
        // The first few selectors match pod by pod; the index pays for itself when more come.
        if self.index.get().is_none() && self.direct.get() < DIRECT_SELECTS {
            self.direct.set(self.direct.get() + 1);
            let mut bits = self.none();
            for (i, q) in self.pods.iter().enumerate() {
                if s.matches(&q.labels) {
                    bits[i / 64] |= 1u64 << (i % 64);
                }
            }
            return bits;
        }
        let index = self.index();
        for (k, v) in &s.match_labels {
            match index
                .get(k.as_str())
                .and_then(|(_, vals)| vals.get(v.as_str()))
            {
                Some(b) => and(&mut acc, b),
                None => return self.none(),
            }
        }
        for e in &s.match_expressions {
            let entry = index.get(e.key.as_str());
            let any_of = |values: &[String]| {
                let mut u = self.none();
                if let Some((_, vals)) = entry {
                    for v in values {
                        if let Some(b) = vals.get(v.as_str()) {
                            or(&mut u, b);
                        }
                    }
                }
                u
            };
            match e.operator {
                Operator::In => and(&mut acc, &any_of(&e.values)),
                Operator::NotIn => and_not(&mut acc, &any_of(&e.values)),
                Operator::Exists => match entry {
                    Some((has, _)) => and(&mut acc, has),
                    None => return self.none(),
                },
                Operator::DoesNotExist => {
                    if let Some((has, _)) = entry {
                        and_not(&mut acc, has);
                    }
                }
                Operator::Other(_) => return self.none(),
            }
        }
        acc
    }

    /// The pods of `bits`.
    fn pods_of<'b>(&'b self, bits: &'b Bits) -> impl Iterator<Item = &'a PolicyPod<'a>> + 'b {
        bits.iter().enumerate().flat_map(move |(w, &word)| {
            (0..64)
                .filter(move |b| word & (1u64 << b) != 0)
                .map(move |b| self.pods[w * 64 + b])
        })
    }
}

/// Which peer of which rule: (policy index, direction, rule index, peer index).
pub(crate) type PeerRef = (usize, Direction, usize, usize);

/// What a named-port group is: the peer whose pods' numbers split it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamedGroup {
    pub(crate) policy_ns: String,
    pub(crate) peer: Option<NetworkPolicyPeer>,
    /// (number, set name), in number order: one per number some member declares.
    pub(crate) numbers: Vec<(u16, String)>,
}

/// The key of a named-port group: (peer key or `any`, protocol, port name).
pub(crate) type GroupKey = (String, Protocol, String);

/// The full compiler's [`SetSource`]: every set computed once from all pods, through a label
/// index per namespace.
struct SetBuilder<'a> {
    pods: &'a [PolicyPod<'a>],
    /// Pods grouped by namespace (namespaces in order of first appearance).
    groups: Vec<NsGroup<'a>>,
    /// Namespace → index into `groups`.
    group_of: BTreeMap<&'a str, usize>,
    sets: BTreeMap<String, PeerSet>,
    /// Peer → its key (computed once per peer of a policy).
    peer_keys: HashMap<PeerRef, String>,
    /// Peer → name of its set.
    peer_sets: HashMap<PeerRef, String>,
    /// Named-port groups and their sets per number.
    named: HashMap<GroupKey, NamedGroup>,
    /// Whether to record how each pod set follows from the pods (for the incremental index).
    record: bool,
    defs: HashMap<String, SetDef>,
    /// The groups used since the last `take_used` (recorded only when `record`).
    used: Vec<GroupKey>,
}

impl<'a> SetBuilder<'a> {
    fn new(namespaces: &'a [Namespace], pods: &'a [PolicyPod<'a>], record: bool) -> Self {
        let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut groups: Vec<NsGroup<'a>> = Vec::new();
        for q in pods {
            let i = *group_of.entry(&q.namespace).or_insert_with(|| {
                groups.push(NsGroup {
                    labels: namespace_labels(namespaces, &q.namespace),
                    pods: Vec::new(),
                    index: OnceCell::new(),
                    direct: Cell::new(0),
                });
                groups.len() - 1
            });
            groups[i].pods.push(q);
        }
        Self {
            pods,
            groups,
            group_of,
            sets: BTreeMap::new(),
            peer_keys: HashMap::new(),
            peer_sets: HashMap::new(),
            named: HashMap::new(),
            record,
            defs: HashMap::new(),
            used: Vec::new(),
        }
    }

    /// The pod addresses `peer` matches (`None`: every pod address), as `peer_matches` decides.
    fn peer_pod_ips(
        &self,
        policy_ns: &str,
        peer: Option<&NetworkPolicyPeer>,
    ) -> Vec<(IpAddr, &'a PolicyPod<'a>)> {
        let mut out = Vec::new();
        let Some(peer) = peer else {
            for q in self.pods {
                out.extend(q.ips.iter().map(|ip| (*ip, q)));
            }
            return out;
        };
        if let Some(b) = &peer.ip_block {
            let Some((cidr, ex)) = b.parsed() else {
                return out;
            };
            for q in self.pods {
                for ip in &q.ips {
                    if cidr.contains(ip) && !ex.iter().any(|e| e.contains(ip)) {
                        out.push((*ip, q));
                    }
                }
            }
            return out;
        }
        let groups: Vec<&NsGroup<'a>> = match &peer.namespace_selector {
            None => self
                .group_of
                .get(policy_ns)
                .map(|&i| &self.groups[i])
                .into_iter()
                .collect(),
            Some(s) => self.groups.iter().filter(|g| s.matches(g.labels)).collect(),
        };
        for g in groups {
            match &peer.pod_selector {
                None => {
                    for &q in &g.pods {
                        out.extend(q.ips.iter().map(|ip| (*ip, q)));
                    }
                }
                Some(s) => {
                    let bits = g.select(s);
                    for q in g.pods_of(&bits) {
                        out.extend(q.ips.iter().map(|ip| (*ip, q)));
                    }
                }
            }
        }
        out
    }

    fn peer_key(&mut self, at: PeerRef, policy_ns: &str, peer: &NetworkPolicyPeer) -> &str {
        self.peer_keys
            .entry(at)
            .or_insert_with(|| peer_key(policy_ns, peer))
    }
}

impl SetSource for SetBuilder<'_> {
    fn peer_set(&mut self, at: PeerRef, policy_ns: &str, peer: &NetworkPolicyPeer) -> String {
        if let Some(name) = self.peer_sets.get(&at) {
            return name.clone();
        }
        let key = self.peer_key(at, policy_ns, peer).to_string();
        let name = set_name(&key);
        if !self.sets.contains_key(&name) {
            let set = match &peer.ip_block {
                Some(b) => block_set(key, b),
                None => {
                    let addrs = hosts(
                        self.peer_pod_ips(policy_ns, Some(peer))
                            .into_iter()
                            .map(|(ip, _)| ip),
                    );
                    if self.record {
                        self.defs.insert(
                            name.clone(),
                            SetDef {
                                policy_ns: policy_ns.to_string(),
                                peer: Some(peer.clone()),
                                named: None,
                            },
                        );
                    }
                    pod_set(key, addrs)
                }
            };
            self.sets.insert(name.clone(), set);
        }
        self.peer_sets.insert(at, name.clone());
        name
    }

    fn named_sets(
        &mut self,
        at: Option<PeerRef>,
        policy_ns: &str,
        peer: Option<&NetworkPolicyPeer>,
        proto: Protocol,
        name: &str,
    ) -> Vec<(u16, String)> {
        let base = match (at, peer) {
            (Some(at), Some(p)) => self.peer_key(at, policy_ns, p).to_string(),
            _ => "any".to_string(),
        };
        let group_key = (base, proto, name.to_string());
        if self.record {
            self.used.push(group_key.clone());
        }
        if let Some(g) = self.named.get(&group_key) {
            return g.numbers.clone();
        }
        let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
        for (ip, q) in self.peer_pod_ips(policy_ns, peer) {
            for k in q.named_port(name, proto) {
                by_port.entry(k).or_default().push(ip);
            }
        }
        let mut numbers = Vec::with_capacity(by_port.len());
        for (k, ips) in by_port {
            let key = named_set_key(&group_key.0, proto, name, k);
            let set = set_name(&key);
            if !self.sets.contains_key(&set) {
                self.sets.insert(set.clone(), pod_set(key, hosts(ips)));
                if self.record {
                    self.defs.insert(
                        set.clone(),
                        SetDef {
                            policy_ns: policy_ns.to_string(),
                            peer: peer.cloned(),
                            named: Some((proto, name.to_string(), k)),
                        },
                    );
                }
            }
            numbers.push((k, set));
        }
        self.named.insert(
            group_key,
            NamedGroup {
                policy_ns: policy_ns.to_string(),
                peer: peer.cloned(),
                numbers: numbers.clone(),
            },
        );
        numbers
    }
}

/// Rules for rule `index` (in direction `dir`) of policy `pols[pi]`, for the local pod `local`.
#[allow(clippy::too_many_arguments)] // the rule's coordinates, spelled out
fn rule(
    sets: &mut impl SetSource,
    pols: &[Pol],
    pi: usize,
    index: usize,
    (peers, ports): (&[NetworkPolicyPeer], &[NetworkPolicyPort]),
    dir: Direction,
    local: &PolicyPod,
    out: &mut Vec<CompiledRule>,
) {
    let policy = pols[pi].p;
    let ns = policy.namespace.as_str();
    let peer_list: Vec<Option<(usize, &NetworkPolicyPeer)>> = if peers.is_empty() {
        vec![None]
    } else {
        peers.iter().enumerate().map(Some).collect()
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
            let set = peer.map(|(j, p)| sets.peer_set((pi, dir, index, j), ns, p));
            out.push(CompiledRule {
                policy: pols[pi].key.clone(),
                rule: index,
                peer: set,
                ports: pm.clone(),
            });
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
            let at = peer.map(|(j, _)| (pi, dir, index, j));
            for (k, set) in sets.named_sets(at, ns, peer.map(|(_, p)| p), proto, name) {
                let mut m = BTreeMap::new();
                m.insert(proto, vec![(k, k)]);
                out.push(CompiledRule {
                    policy: pols[pi].key.clone(),
                    rule: index,
                    peer: Some(set),
                    ports: PortMatch::Ports(m),
                });
            }
        }
    }
}

/// The local pod's programs in direction `dir`, given the policies selecting it (indices into
/// `pols`, in order).
pub(crate) fn direction(
    sets: &mut impl SetSource,
    pols: &[Pol],
    selecting: &[usize],
    pod: &PolicyPod,
    dir: Direction,
) -> Option<Vec<CompiledRule>> {
    let chosen: Vec<usize> = selecting
        .iter()
        .copied()
        .filter(|&i| match dir {
            Direction::Ingress => pols[i].ingress,
            Direction::Egress => pols[i].egress,
        })
        .collect();
    if chosen.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    for pi in chosen {
        let p = pols[pi].p;
        for (i, r) in rules(p, dir).into_iter().enumerate() {
            rule(sets, pols, pi, i, r, dir, pod, &mut out);
        }
    }
    Some(out)
}

/// A local pod's program, given the policies selecting it (indices into `pols`, in order).
pub(crate) fn endpoint_program(
    sets: &mut impl SetSource,
    pols: &[Pol],
    selecting: &[usize],
    pod: &PolicyPod,
) -> EndpointProgram {
    EndpointProgram {
        namespace: pod.namespace.to_string(),
        name: pod.name.to_string(),
        host_ifname: pod.host_ifname.to_string(),
        ips: pod.ips.clone(),
        ingress: direction(sets, pols, selecting, pod, Direction::Ingress),
        egress: direction(sets, pols, selecting, pod, Direction::Egress),
    }
}

/// Everything the full compiler learned that the incremental index keeps: how each pod set
/// follows from the pods, the named-port groups, and which groups each endpoint uses (in the
/// program's endpoint order).
pub(crate) struct Recorded {
    pub(crate) defs: HashMap<String, SetDef>,
    pub(crate) groups: HashMap<GroupKey, NamedGroup>,
    pub(crate) endpoint_groups: Vec<Vec<GroupKey>>,
}

/// Compiles the policy of every pod on `local_node`.
pub fn compile(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    pods: &[PolicyPod],
    local_node: &str,
) -> PolicyProgram {
    compile_recording(policies, namespaces, pods, local_node, false).0
}

/// [`compile`], also returning what the incremental index needs when `record` is set.
pub(crate) fn compile_recording(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    pods: &[PolicyPod],
    local_node: &str,
    record: bool,
) -> (PolicyProgram, Recorded) {
    let mut sets = SetBuilder::new(namespaces, pods, record);
    let mut valid: Vec<&NetworkPolicy> = valid(policies).collect();
    valid.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let pols: Vec<Pol> = valid.into_iter().map(Pol::new).collect();
    let mut pols_by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, p) in pols.iter().enumerate() {
        pols_by_ns
            .entry(p.p.namespace.as_str())
            .or_default()
            .push(i);
    }
    let mut local: Vec<&PolicyPod> = pods.iter().filter(|p| p.node == local_node).collect();
    local.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut endpoint_groups = Vec::new();
    let endpoints = local
        .into_iter()
        .map(|pod| {
            // The valid policies selecting `pod`, in (namespace, name) order.
            let selecting: Vec<usize> = pols_by_ns
                .get(&*pod.namespace)
                .map(|v| {
                    v.iter()
                        .copied()
                        .filter(|&i| pols[i].p.spec.pod_selector.matches(&pod.labels))
                        .collect()
                })
                .unwrap_or_default();
            let program = endpoint_program(&mut sets, &pols, &selecting, pod);
            if record {
                endpoint_groups.push(std::mem::take(&mut sets.used));
            }
            program
        })
        .collect();
    let program = PolicyProgram {
        node: local_node.to_string(),
        sets: sets.sets,
        endpoints,
    };
    let recorded = Recorded {
        defs: sets.defs,
        groups: sets.named,
        endpoint_groups,
    };
    (program, recorded)
}
