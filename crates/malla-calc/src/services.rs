//! The service map (what kube-proxy computes from Services and EndpointSlices) and its
//! rendering into the node's nftables table, in the style of kube-proxy's nftables mode: verdict
//! maps keyed by `address . protocol . port`, so a packet's cost does not grow with the number of
//! services.
//!
//! Packet paths (`<h>` is [`chain_hash`] of the service port and family, `<sfx>` is
//! `ns/name/proto/port`):
//! - `nat-prerouting` / `nat-output` (nat, priority `dstnat` / `-100`, the same value)
//!   `jump services`, which looks up
//!   `service-ips-v4|v6` (cluster IPs, external IPs, load-balancer IPs) and, for destinations of
//!   type local (not loopback), `service-nodeports-v4|v6`.
//! - A *plain* service port (cluster IPs only, `internalTrafficPolicy: Cluster`, no session
//!   affinity: nearly all of them) has no chain of its own: its cluster IP's element is
//!   `goto pick-<v4|v6>-<proto>-<N>`, a chain shared by every plain port with N endpoints, whose
//!   one rule is `dnat ip to ip daddr . tcp dport . numgen random mod N map @dispatch-v4-tcp`:
//!   one map per family and protocol from `cluster IP . port . index` to `address . port`. A
//!   node with 30k services then has a few dozen chains instead of 30k (the kernel loads the
//!   table in ~1 s instead of ~3 s), and an endpoint joining, leaving or moving changes
//!   elements only. Pick chains for 1 to [`PICK_CHAINS_UP_TO`] endpoints always exist. The
//!   rendered table declares the dispatch maps but does not hold their elements: they follow
//!   from the service map ([`dispatch`]; [`ruleset`] and [`ruleset_diff`] add them to the
//!   table's text).
//! - Any other cluster IP goes to `svc-<h>-<sfx>` (all endpoints), or with
//!   `internalTrafficPolicy: Local` to `local-<h>-<sfx>` (this node's endpoints; `drop` when
//!   there is none).
//! - External traffic (node port, external IP, LB IP) goes to `ext-<h>-<sfx>`. With
//!   `externalTrafficPolicy: Cluster` it is marked for masquerade ([`MASQ_MARK`]) and sent to
//!   `svc-…`. With `Local`, traffic from a pod of the cluster (`@pools-v4|v6`) or from the node
//!   itself (`fib saddr type local`) is marked and sent to `svc-…` (all endpoints, masqueraded so
//!   the reply comes back through this node); everything else goes to `local-…` unmarked, so the
//!   client address is preserved, and is dropped when the node has no local endpoint.
//! - `svc-…` / `local-…`: one rule,
//!   `dnat ip to numgen random mod N offset K map @endpoints-<v4|v6>-<proto>-<xx>`: the chain's
//!   own index range in a map (index -> `address . port`) shared with other services. No chain
//!   per endpoint: with 10k
//!   services of 10 endpoints, ~110k chains made the kernel take ~30 s to load the table and
//!   ~1 s to commit any change that adds a `goto` (see `place`).
//! - With session affinity only, `svc-…` / `local-…` first try
//!   `ip saddr @aff-<h>-<ip>/<port> goto ep-…` per endpoint, then
//!   `numgen random mod N vmap @<chain>-pick` (or a single `goto`); `ep-<h>-<ip>/<port>`
//!   refreshes the affinity set, then counts and `dnat`s.
//! - `nat-postrouting` (priority `srcnat`): packets carrying [`MASQ_MARK`] have the bit cleared
//!   (so e.g. a VXLAN outer packet does not inherit it) and are masqueraded; so is hairpin
//!   traffic (a pod reaching itself through a service): DNATed packets whose
//!   `saddr . daddr` is in `hairpin-v4|v6` (`addr . addr` for every endpoint on this node or
//!   without a node: a remote pod is DNATed by its own node, or through the marked external path).
//! - `service-ips-…` and `service-nodeports-…` count new connections per element (frontend);
//!   endpoints are not counted in the kernel (300k per-element counters cost it ~1 s to load).
//! - Service ports with no usable endpoint are not DNATed; `filter-input|forward|output` (filter,
//!   priority `-10`) `ct state new jump endpoints-check`, which looks up
//!   `no-endpoint-services-v4|v6` and (for local destinations) `no-endpoint-nodeports-v4|v6` and
//!   `goto reject-chain`: TCP reset, else ICMP port unreachable.
//!
//! One `inet` table carries both families, so the node-port maps are per family too
//! (`service-nodeports-v4|v6`): a dual-stack service has one node port for two entries.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use malla_api::service::{AddressType, EndpointConditions, Protocol, ServiceType, TrafficPolicy};
use malla_api::IpPool;
use serde::Serialize;

use crate::nft::element::Chains;
use crate::nft::{self, BaseChain, Chain, Key, Map, Part, Set, Value};

pub mod dispatch;
mod endpoints;
mod node_name;
mod proxy_service;
mod proxy_slice;
mod reshape;

pub use endpoints::{plan_service_changes, EndpointPlan, ServiceChange};
pub use node_name::NodeName;
pub use proxy_service::{ProxyPort, ProxyService};
pub use proxy_slice::{ProxyEndpoint, ProxySlice, SlicePort};

/// The packet mark bit that asks `nat-postrouting` to masquerade.
pub const MASQ_MARK: u32 = 0x4000;

/// Address family of a service map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

impl IpFamily {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::IPv4
        } else {
            Self::IPv6
        }
    }

    fn of_slice(t: AddressType) -> Self {
        match t {
            AddressType::IPv4 => Self::IPv4,
            AddressType::IPv6 => Self::IPv6,
        }
    }

    /// `v4` / `v6`, the suffix of per-family sets and maps.
    pub fn suffix(&self) -> &'static str {
        match self {
            Self::IPv4 => "v4",
            Self::IPv6 => "v6",
        }
    }

    /// `ip` / `ip6`, the nft payload keyword.
    fn kw(&self) -> &'static str {
        match self {
            Self::IPv4 => "ip",
            Self::IPv6 => "ip6",
        }
    }

    fn addr_type(&self) -> &'static str {
        match self {
            Self::IPv4 => "ipv4_addr",
            Self::IPv6 => "ipv6_addr",
        }
    }

    fn loopback(&self) -> &'static str {
        match self {
            Self::IPv4 => "127.0.0.0/8",
            Self::IPv6 => "::1",
        }
    }
}

/// Which kind of address a frontend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
}

/// An address and port a service answers on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub kind: FrontendKind,
}

/// A resolved backend of a service port (24 bytes: there is one per endpoint and port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ServiceEndpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The node the endpoint runs on.
    pub node: Option<NodeName>,
}

/// One service port in one address family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    /// `namespace/name` (shared with the [`ProxyService`]'s key).
    #[serde(serialize_with = "serialize_str")]
    pub service: Arc<str>,
    pub port_name: Box<str>,
    pub protocol: Protocol,
    /// The service port (every frontend's port).
    pub port: u16,
    pub family: IpFamily,
    /// Cluster IPs of the family, then external IPs, then load-balancer IPs.
    pub frontends: Box<[Frontend]>,
    /// Only for `NodePort` and `LoadBalancer` services.
    pub node_port: Option<u16>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
    /// Ready endpoints, or if there is none, serving-and-terminating ones. Sorted, deduplicated.
    pub cluster_endpoints: Box<[ServiceEndpoint]>,
    /// Same rule applied to this node's endpoints alone (a node whose local endpoints are all
    /// terminating keeps using them for `Local` policies, as KEP-1669 asks).
    pub local_endpoints: Box<[ServiceEndpoint]>,
}

/// A shared string as a string.
fn serialize_str<S: serde::Serializer>(s: &Arc<str>, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s)
}

impl ServiceEntry {
    /// A cluster-IP-only port with `internalTrafficPolicy: Cluster` and no session affinity:
    /// the common case, dispatched without a chain of its own (see the module doc).
    pub fn is_plain(&self) -> bool {
        self.affinity_timeout.is_none()
            && self.internal_traffic_policy == TrafficPolicy::Cluster
            && !self.has_external()
    }

    /// Whether any traffic takes the external path.
    pub fn has_external(&self) -> bool {
        self.node_port.is_some()
            || self
                .frontends
                .iter()
                .any(|f| f.kind != FrontendKind::ClusterIp)
    }
}

/// Everything the proxy needs on one node.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ServiceMap {
    /// Sorted by service, protocol, port, family.
    pub entries: Vec<ServiceEntry>,
    /// This node's own addresses (where its node ports answer; informational: the rules match
    /// any local destination address except loopback).
    pub node_ips: Vec<IpAddr>,
    /// The cluster's pod pools: traffic from these is "from a pod".
    pub pod_cidrs: Vec<IpNet>,
}

struct Candidate {
    endpoint: ServiceEndpoint,
    conditions: EndpointConditions,
}

/// Ready endpoints; failing that, serving and terminating ones; never not-serving ones.
fn select<'a>(cands: impl Iterator<Item = &'a Candidate> + Clone) -> Box<[ServiceEndpoint]> {
    let pick = |keep: &dyn Fn(&EndpointConditions) -> bool| {
        let mut out: BTreeMap<(IpAddr, u16), ServiceEndpoint> = BTreeMap::new();
        for c in cands.clone().filter(|c| keep(&c.conditions)) {
            out.entry((c.endpoint.ip, c.endpoint.port))
                .or_insert(c.endpoint);
        }
        out.into_values().collect::<Box<[_]>>()
    };
    let ready = pick(&|c| c.ready && c.serving());
    if !ready.is_empty() {
        return ready;
    }
    pick(&|c| c.serving() && c.terminating)
}

/// Computes the service map of node `node`.
///
/// A slice belongs to a service by namespace and `service` name; a service port takes the slice
/// port of the same name and protocol; an endpoint's first address is its address (as in
/// Kubernetes; [`ProxySlice`] keeps only that one). Headless services (no cluster IP) get no
/// entry. A service port without endpoints keeps its entry with empty lists.
pub fn build(
    services: &[ProxyService],
    slices: &[ProxySlice],
    node: &str,
    node_ips: &[IpAddr],
    pools: &[IpPool],
) -> ServiceMap {
    let mut entries = Vec::new();
    // Slices by owning service: one pass, so building is linear in services + slices.
    let mut by_service: BTreeMap<&str, Vec<&ProxySlice>> = BTreeMap::new();
    for slice in slices {
        by_service.entry(&slice.service).or_default().push(slice);
    }
    let node = NodeName::find(node);
    for svc in services {
        let own = by_service.get(&*svc.key).map_or(&[][..], Vec::as_slice);
        entries.extend(service_entries(svc, own, node));
    }
    entries.sort_by(|a, b| {
        (&a.service, a.protocol, a.port, a.family).cmp(&(&b.service, b.protocol, b.port, b.family))
    });
    entries.shrink_to_fit();
    let node_ips: BTreeSet<IpAddr> = node_ips.iter().copied().collect();
    let pod_cidrs: BTreeSet<IpNet> = pools.iter().map(|p| p.cidr).collect();
    ServiceMap {
        entries,
        node_ips: node_ips.into_iter().collect(),
        pod_cidrs: pod_cidrs.into_iter().collect(),
    }
}

/// The entries of one service (as [`build`] makes them, in its order), from the slices of
/// the cluster that belong to it.
pub fn build_service(svc: &ProxyService, slices: &[ProxySlice], node: &str) -> Vec<ServiceEntry> {
    let own: Vec<&ProxySlice> = slices.iter().filter(|s| *s.service == *svc.key).collect();
    let mut entries = service_entries(svc, &own, NodeName::find(node));
    entries.sort_by_key(|e| (e.protocol, e.port, e.family));
    entries
}

/// One service's entries, one per port and family, from its own slices.
fn service_entries(
    svc: &ProxyService,
    own: &[&ProxySlice],
    node: Option<NodeName>,
) -> Vec<ServiceEntry> {
    let mut entries = Vec::new();
    let families: BTreeSet<IpFamily> = svc.cluster_ips().map(IpFamily::of).collect();
    for sp in &svc.ports {
        for &fam in &families {
            let mut seen = BTreeSet::new();
            let mut frontends = Vec::new();
            for &(ip, kind) in svc
                .frontends
                .iter()
                .filter(|(ip, _)| IpFamily::of(ip) == fam)
            {
                if seen.insert(ip) {
                    frontends.push(Frontend {
                        ip,
                        port: sp.port,
                        kind,
                    });
                }
            }
            let mut cands = Vec::new();
            for slice in own.iter().filter(|s| s.family == fam) {
                let Some(port) = slice
                    .ports
                    .iter()
                    .find(|p| *p.name == *sp.name && p.protocol == sp.protocol)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    cands.push(Candidate {
                        endpoint: ServiceEndpoint {
                            ip: ep.ip,
                            port: port.port,
                            node: ep.node,
                        },
                        conditions: ep.conditions,
                    });
                }
            }
            let cluster_endpoints = select(cands.iter());
            let local_endpoints = select(
                cands
                    .iter()
                    .filter(|c| node.is_some() && c.endpoint.node == node),
            );
            entries.push(ServiceEntry {
                service: svc.key.clone(),
                port_name: sp.name.clone(),
                protocol: sp.protocol,
                port: sp.port,
                family: fam,
                // Kept for the life of the map, one per service port: no spare capacity (a Vec
                // pushed once holds four, ~2 MiB at 30k services).
                frontends: frontends.into(),
                node_port: match svc.kind {
                    ServiceType::ClusterIP => None,
                    ServiceType::NodePort | ServiceType::LoadBalancer => sp.node_port,
                },
                affinity_timeout: svc.affinity_timeout,
                external_traffic_policy: svc.external_traffic_policy,
                internal_traffic_policy: svc.internal_traffic_policy,
                cluster_endpoints,
                local_endpoints,
            });
        }
    }
    entries
}

/// 32-bit FNV-1a: stable across releases and platforms.
fn fnv1a32(s: &str) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in s.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The 8 hex digits naming an entry's chains: FNV-1a of `ns/name/proto/port/family`.
pub fn chain_hash(e: &ServiceEntry) -> String {
    format!(
        "{:08x}",
        fnv1a32(&format!(
            "{}/{}/{}/{}",
            e.service,
            e.protocol.nft(),
            e.port,
            e.family.suffix()
        ))
    )
}

fn suffix(e: &ServiceEntry) -> String {
    format!("{}/{}/{}", e.service, e.protocol.nft(), e.port)
}

/// `svc-<hash>-ns/name/proto/port`: dispatch over all cluster endpoints.
pub fn svc_chain(e: &ServiceEntry) -> String {
    format!("svc-{}-{}", chain_hash(e), suffix(e))
}

/// `local-<hash>-ns/name/proto/port`: dispatch over this node's endpoints.
pub fn local_chain(e: &ServiceEntry) -> String {
    format!("local-{}-{}", chain_hash(e), suffix(e))
}

/// `ext-<hash>-ns/name/proto/port`: external traffic (node port, external and LB IPs).
pub fn ext_chain(e: &ServiceEntry) -> String {
    format!("ext-{}-{}", chain_hash(e), suffix(e))
}

/// An address as an nft identifier fragment: IPv6 colons become dots (`fd00..1`); an IPv6
/// address whose text has dots (IPv4-mapped) is written as its eight hex groups.
fn ip_ident(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => {
            let s = a.to_string();
            if s.contains('.') {
                a.segments()
                    .iter()
                    .map(|g| format!("{g:x}"))
                    .collect::<Vec<_>>()
                    .join(".")
            } else {
                s.replace(':', ".")
            }
        }
    }
}

/// `ep-<hash>-<ip>/<port>`.
pub fn ep_chain(e: &ServiceEntry, ep: &ServiceEndpoint) -> String {
    format!("ep-{}-{}/{}", chain_hash(e), ip_ident(&ep.ip), ep.port)
}

/// `aff-<hash>-<ip>/<port>`: the clients stuck to an endpoint.
pub fn aff_set(e: &ServiceEntry, ep: &ServiceEndpoint) -> String {
    format!("aff-{}-{}/{}", chain_hash(e), ip_ident(&ep.ip), ep.port)
}

/// `ip 10.0.0.1` -> `10.0.0.1`, `[fd00::1]` for IPv6 in `dnat … to`.
fn dnat_addr(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

fn mark_rule() -> String {
    format!("meta mark set meta mark | {MASQ_MARK:#x}")
}

/// The rule in `nat-postrouting` that masquerades marked packets.
pub fn masquerade_mark_rule() -> String {
    format!(
        "meta mark & {m:#x} == {m:#x} meta mark set meta mark ^ {m:#x} masquerade comment \"services\"",
        m = MASQ_MARK
    )
}

/// The rule in `nat-postrouting` that masquerades hairpin traffic (a pod reaching itself
/// through a service): after DNAT, source and destination are the same endpoint, listed in
/// `hairpin-v4|v6` as `addr . addr`. One rule for every endpoint, instead of a mark per
/// endpoint chain.
pub fn hairpin_rule(fam: IpFamily) -> String {
    format!(
        "ct status dnat {kw} saddr . {kw} daddr @hairpin-{s} masquerade comment \"hairpin\"",
        kw = fam.kw(),
        s = fam.suffix()
    )
}

/// The name of the nat postrouting chain shared with [`crate::masquerade`].
pub const NAT_POSTROUTING: &str = "nat-postrouting";
/// Filter chains' priority: before the default filter priority (0).
pub const FILTER_PRIORITY: &str = "-10";
const REJECT_CHAIN: &str = "reject-chain";
const FAMILIES: [IpFamily; 2] = [IpFamily::IPv4, IpFamily::IPv6];

fn verdict_map(table: &mut nft::Table, name: String, key: &str, counter: bool) {
    table.maps.entry(name).or_insert_with(|| Map {
        type_: key.into(),
        value: "verdict".into(),
        flags: Vec::new(),
        counter,
        size: None,
        elements: BTreeMap::new(),
    });
}

fn chain(table: &mut nft::Table, name: &str, base: Option<BaseChain>, rules: Vec<String>) {
    table.chains.insert(name.to_string(), Chain { base, rules });
}

/// The chains, maps and sets every node has, services or not.
fn skeleton(map: &ServiceMap, table: &mut nft::Table) {
    for fam in FAMILIES {
        let s = fam.suffix();
        table
            .sets
            .entry(format!("pools-{s}"))
            .or_insert_with(|| Set {
                type_: fam.addr_type().into(),
                flags: vec!["interval".into()],
                timeout: None,
                elements: map
                    .pod_cidrs
                    .iter()
                    .filter(|c| IpFamily::of(&c.addr()) == fam)
                    .map(|c| Key::one(Part::Net(*c)))
                    .collect(),
            });
        table
            .sets
            .entry(format!("hairpin-{s}"))
            .or_insert_with(|| Set {
                type_: format!("{t} . {t}", t = fam.addr_type()),
                flags: Vec::new(),
                timeout: None,
                elements: BTreeSet::new(),
            });
        let key = format!("{} . inet_proto . inet_service", fam.addr_type());
        // The frontends count new connections (`malla services`); endpoints are not counted
        // (300k per-element counters cost the kernel ~1 s to load at 30k services).
        verdict_map(table, service_ips_map(fam), &key, true);
        verdict_map(table, format!("no-endpoint-services-{s}"), &key, false);
        let port_key = "inet_proto . inet_service";
        verdict_map(table, node_ports_map(fam), port_key, true);
        verdict_map(table, format!("no-endpoint-nodeports-{s}"), port_key, false);
    }
    let jump = vec!["jump services".to_string()];
    chain(
        table,
        "nat-prerouting",
        Some(BaseChain::new("nat", "prerouting", "dstnat")),
        jump.clone(),
    );
    chain(
        table,
        "nat-output",
        // `dstnat` is only a valid name in prerouting for nft < 1.0.7; it is -100.
        Some(BaseChain::new("nat", "output", "-100")),
        jump,
    );
    let post = table
        .chains
        .entry(NAT_POSTROUTING.to_string())
        .or_insert_with(|| Chain {
            base: Some(BaseChain::new("nat", "postrouting", "srcnat")),
            rules: Vec::new(),
        });
    let masq = masquerade_mark_rule();
    if !post.rules.contains(&masq) {
        post.rules.insert(0, masq);
    }
    for (i, fam) in FAMILIES.iter().enumerate() {
        let rule = hairpin_rule(*fam);
        if !post.rules.contains(&rule) {
            post.rules.insert(1 + i, rule);
        }
    }
    for hook in ["input", "forward", "output"] {
        chain(
            table,
            &format!("filter-{hook}"),
            Some(BaseChain::new("filter", hook, FILTER_PRIORITY)),
            vec!["ct state new jump endpoints-check".into()],
        );
    }
    let mut services = Vec::new();
    let mut check = Vec::new();
    for fam in FAMILIES {
        let (kw, s) = (fam.kw(), fam.suffix());
        services.push(format!(
            "{kw} daddr . meta l4proto . th dport vmap @service-ips-{s}"
        ));
        check.push(format!(
            "{kw} daddr . meta l4proto . th dport vmap @no-endpoint-services-{s}"
        ));
    }
    for fam in FAMILIES {
        let (kw, s, lo) = (fam.kw(), fam.suffix(), fam.loopback());
        services.push(format!(
            "{kw} daddr != {lo} fib daddr type local meta l4proto . th dport vmap @service-nodeports-{s}"
        ));
        check.push(format!(
            "{kw} daddr != {lo} fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports-{s}"
        ));
    }
    chain(table, "services", None, services);
    chain(table, "endpoints-check", None, check);
    let mut reject = crate::policy::flowlog::LogPoint::NoEndpoint
        .deny_rules(table)
        .to_vec();
    reject.push("meta l4proto tcp reject with tcp reset".into());
    reject.push("reject".into());
    chain(table, REJECT_CHAIN, None, reject);
}

/// Indices of the endpoint maps: each map-dispatched chain owns runs of [`SLOT_SIZE`]
/// consecutive indices (`numgen random mod N offset K`), a slot being one of 2^20 in the 32-bit
/// index space.
const SLOT_SIZE: u64 = 4096;
const SLOTS: u64 = 1 << 20;
/// Slots per endpoint map: 256 maps per family at most.
const SLOTS_PER_MAP: u64 = 4096;

/// `endpoints-v4|v6-<proto>-<xx>`: the endpoint map holding slot `slot`.
fn endpoints_map(fam: IpFamily, proto: &str, slot: u64) -> String {
    format!(
        "endpoints-{}-{proto}-{:02x}",
        fam.suffix(),
        slot / SLOTS_PER_MAP
    )
}

/// `service-ips-v4|v6`: every cluster, external and load-balancer address of a family, keyed
/// by [`frontend_key`], to the chain that takes it (counting new connections).
pub fn service_ips_map(fam: IpFamily) -> String {
    format!("service-ips-{}", fam.suffix())
}

/// `service-nodeports-v4|v6`: the node ports of a family, keyed by [`node_port_key`].
pub fn node_ports_map(fam: IpFamily) -> String {
    format!("service-nodeports-{}", fam.suffix())
}

/// `addr . proto . port`: frontend `f` of entry `e` in [`service_ips_map`].
pub fn frontend_key(e: &ServiceEntry, f: &Frontend) -> String {
    frontend_element(e, f).to_string()
}

/// `proto . port`: node port `port` of entry `e` in [`node_ports_map`].
pub fn node_port_key(e: &ServiceEntry, port: u16) -> String {
    node_port_element(e, port).to_string()
}

/// The protocol of `p` as an element part.
pub fn proto_part(p: Protocol) -> Part {
    Part::Proto(match p {
        Protocol::Tcp => nft::element::TCP,
        Protocol::Udp => nft::element::UDP,
        Protocol::Sctp => nft::element::SCTP,
    })
}

/// [`frontend_key`] as the element it is.
pub fn frontend_element(e: &ServiceEntry, f: &Frontend) -> Key {
    Key::new([Part::Addr(f.ip), proto_part(e.protocol), Part::port(f.port)])
}

/// [`node_port_key`] as the element it is.
pub fn node_port_element(e: &ServiceEntry, port: u16) -> Key {
    Key::new([proto_part(e.protocol), Part::port(port)])
}

/// `address . port`: an endpoint as a map's data.
pub fn endpoint_value(ip: IpAddr, port: u16) -> Value {
    Value::Data(Key::new([Part::Addr(ip), Part::port(port)]))
}

/// `address . address`: a hairpin set's element.
fn hairpin_element(ip: IpAddr) -> Key {
    Key::new([Part::Addr(ip), Part::Addr(ip)])
}

/// `dispatch-v4|v6-<proto>`: the endpoints of every plain entry (see [`ServiceEntry::is_plain`])
/// of a family and protocol, keyed by the packet's `address . port` (its cluster IP) and an
/// index.
pub fn dispatch_map(fam: IpFamily, proto: &str) -> String {
    format!("dispatch-{}-{proto}", fam.suffix())
}

/// `pick-v4|v6-<proto>-<n>`: the chain that picks one of `n` endpoints of a plain entry in
/// [`dispatch_map`]; shared by every plain entry with `n` endpoints.
pub fn pick_chain(fam: IpFamily, proto: &str, n: usize) -> String {
    format!("pick-{}-{proto}-{n}", fam.suffix())
}

/// Pick chains made for every count up to this one as soon as a family and protocol has a
/// plain entry, so that a service scaling within it changes elements only.
pub const PICK_CHAINS_UP_TO: usize = 16;

/// Creates the dispatch map and the pick chains over `n` endpoints of `fam` and `proto` (and
/// over 1 to [`PICK_CHAINS_UP_TO`]), unless they exist.
fn pick(table: &mut nft::Table, fam: IpFamily, proto: &str, n: usize) -> String {
    if !table.maps.contains_key(&dispatch_map(fam, proto)) {
        for k in 1..=PICK_CHAINS_UP_TO {
            pick_one(table, fam, proto, k);
        }
    }
    pick_one(table, fam, proto, n)
}

/// Creates the dispatch map unless it exists, and the pick chain over `n` endpoints; returns
/// the chain's name.
fn pick_one(table: &mut nft::Table, fam: IpFamily, proto: &str, n: usize) -> String {
    let kw = fam.kw();
    let map = dispatch_map(fam, proto);
    table.maps.entry(map.clone()).or_insert_with(|| Map {
        // Not `th dport`: see `place`.
        type_: format!("typeof {kw} daddr . {proto} dport . numgen random mod 2"),
        value: format!("{kw} daddr . {proto} dport"),
        flags: Vec::new(),
        counter: false,
        size: None,
        elements: BTreeMap::new(),
    });
    let name = pick_chain(fam, proto, n);
    table.chains.entry(name.clone()).or_insert_with(|| Chain {
        base: None,
        rules: vec![format!(
            "meta l4proto {proto} dnat {kw} to {kw} daddr . {proto} dport . numgen random mod {n} map @{map}"
        )],
    });
    name
}

/// A dispatch chain without affinity, waiting for its slot.
struct Pending {
    chain: String,
    family: IpFamily,
    protocol: &'static str,
    eps: Vec<(IpAddr, u16)>,
}

/// Where a map-dispatched chain's endpoints are: `(map, offset, count)`, read back from its
/// rule (`… numgen random mod N offset K map @M`).
fn dispatch_slots(table: &nft::Table, chain: &str) -> Option<(String, u32, u32)> {
    let rule = table.chains.get(chain)?.rules.first()?;
    let w: Vec<&str> = rule.split_whitespace().collect();
    let at = |k: &str| w.iter().position(|x| *x == k).and_then(|i| w.get(i + 1));
    let n = at("mod")?.parse().ok()?;
    let off = at("offset")?.parse().ok()?;
    let map = at("map")?.strip_prefix('@')?.to_string();
    Some((map, off, n))
}

/// Gives each pending chain its slots and writes its rule and map elements.
///
/// For the ports that are not plain (see [`ServiceEntry::is_plain`]: node ports, external
/// IPs, traffic policies `Local`), whose chains the packet reaches by more than its cluster
/// IP. Without session affinity such a dispatch chain is one rule, `dnat ip to numgen random
/// mod N offset K map @endpoints-…`, into a map from index to `address . port` shared with
/// other services. Neither a
/// chain per endpoint (~110k chains for 10k services of 10 endpoints: ~30 s to load, ~1 s per
/// commit) nor a map per service (the kernel finds named sets by a linear scan: ~10 s) nor one
/// map for all (each rule binding a data map walks all its elements: minutes), but at most
/// 256 maps per family and protocol. A chain's slot is a hash of its name, probing forward on
/// collision (processed in hash order), so a change rarely moves another chain's endpoints.
fn place(table: &mut nft::Table, mut pending: Vec<Pending>) {
    pending.sort_by_cached_key(|p| (natural_slot(&p.chain), p.chain.clone()));
    let mut used: BTreeSet<u64> = BTreeSet::new();
    for p in pending {
        let k = p.slots();
        let mut slot = natural_slot(&p.chain);
        let mut tries = 0;
        while slot + k > SLOTS || (slot..slot + k).any(|s| used.contains(&s)) {
            slot = if slot + k >= SLOTS { 0 } else { slot + 1 };
            tries += 1;
            if tries > SLOTS {
                // 2^20 slots taken: unreachable in practice; leave the rest unprogrammed.
                return;
            }
        }
        used.extend(slot..slot + k);
        p.write(table, slot);
    }
}

/// The slot a dispatch chain takes when it is free: a hash of its name.
fn natural_slot(chain: &str) -> u64 {
    (u64::from(fnv1a32(chain)) * SLOTS) >> 32
}

impl Pending {
    /// How many slots its endpoints take.
    fn slots(&self) -> u64 {
        (self.eps.len() as u64).div_ceil(SLOT_SIZE).max(1)
    }

    /// Writes the chain's rule and its endpoints at `slot` into `table` (creating the endpoint
    /// map unless it exists).
    fn write(&self, table: &mut nft::Table, slot: u64) {
        let off = slot * SLOT_SIZE;
        let kw = self.family.kw();
        let name = endpoints_map(self.family, self.protocol, slot);
        let map = table
            .maps
            .entry(name.clone())
            .or_insert_with(|| endpoints_map_declaration(self.family, self.protocol));
        for (i, (ip, port)) in self.eps.iter().enumerate() {
            map.elements.insert(
                Key::one(Part::Int((off + i as u64) as u32)),
                endpoint_value(*ip, *port),
            );
        }
        if let Some(c) = table.chains.get_mut(&self.chain) {
            c.rules = vec![format!(
                "meta l4proto {} dnat {kw} to numgen random mod {} offset {off} map @{name}",
                self.protocol,
                self.eps.len()
            )];
        }
    }
}

/// An endpoint map of `fam` and `proto`, empty.
fn endpoints_map_declaration(fam: IpFamily, proto: &str) -> Map {
    Map {
        type_: "typeof numgen random mod 2".into(),
        // Not `th dport`: nft 1.0.6 then fails to read the table back ("conflicting
        // protocols specified: tcp vs. th").
        value: format!("{} daddr . {proto} dport", fam.kw()),
        flags: Vec::new(),
        counter: false,
        size: None,
        elements: BTreeMap::new(),
    }
}

/// The rules of the dispatch chain `chain_name` over `eps`.
///
/// Without session affinity, the chain is left for [`place`] (see there). With affinity,
/// each endpoint needs its own chain (to refresh its affinity set): first
/// `ip saddr @aff-… goto ep-…` per endpoint, then a random pick through the named verdict map
/// `<chain>-pick`. Maps are named, not anonymous: the kernel names each anonymous set by
/// scanning the table's sets, which made 3k services take 18 s to load instead of 2.4 s.
fn dispatch(
    table: &mut nft::Table,
    chains: &mut Chains,
    pending: &mut Vec<Pending>,
    chain_name: &str,
    e: &ServiceEntry,
    eps: &[ServiceEndpoint],
) -> Vec<String> {
    let mut rules = Vec::new();
    if eps.is_empty() {
        rules.push("drop".to_string());
        return rules;
    }
    let kw = e.family.kw();
    if e.affinity_timeout.is_none() {
        pending.push(Pending {
            chain: chain_name.to_string(),
            family: e.family,
            protocol: e.protocol.nft(),
            eps: eps.iter().map(|ep| (ep.ip, ep.port)).collect(),
        });
        return rules;
    }
    for ep in eps {
        rules.push(format!(
            "{kw} saddr @{} goto {}",
            aff_set(e, ep),
            ep_chain(e, ep)
        ));
    }
    if let [only] = eps {
        rules.push(format!("goto {}", ep_chain(e, only)));
    } else {
        let map = format!("{chain_name}-pick");
        table.maps.insert(
            map.clone(),
            nft::Map {
                type_: "typeof numgen random mod 2".into(),
                value: "verdict".into(),
                flags: Vec::new(),
                counter: false,
                size: None,
                elements: eps
                    .iter()
                    .enumerate()
                    .map(|(i, ep)| {
                        let chain = chains.get(&ep_chain(e, ep));
                        (Key::one(Part::Int(i as u32)), Value::goto(chain))
                    })
                    .collect(),
            },
        );
        rules.push(format!("numgen random mod {} vmap @{map}", eps.len()));
    }
    rules
}

fn render_entry(
    e: &ServiceEntry,
    table: &mut nft::Table,
    chains: &mut Chains,
    pending: &mut Vec<Pending>,
) {
    let s = e.family.suffix();
    let kw = e.family.kw();
    let proto = e.protocol.nft();
    let put = |table: &mut nft::Table, chains: &mut Chains, map: String, key: Key, to: &str| {
        if let Some(m) = table.maps.get_mut(&map) {
            // The first service (in map order) to claim an address and port keeps it.
            m.elements
                .entry(key)
                .or_insert_with(|| Value::goto(chains.get(to)));
        }
    };

    if e.cluster_endpoints.is_empty() {
        for f in &e.frontends {
            put(
                table,
                chains,
                format!("no-endpoint-services-{s}"),
                frontend_element(e, f),
                REJECT_CHAIN,
            );
        }
        if let Some(np) = e.node_port {
            put(
                table,
                chains,
                format!("no-endpoint-nodeports-{s}"),
                node_port_element(e, np),
                REJECT_CHAIN,
            );
        }
        return;
    }

    // Every endpoint (local ones may include a terminating one the cluster list lacks).
    let all: BTreeSet<&ServiceEndpoint> = e
        .cluster_endpoints
        .iter()
        .chain(e.local_endpoints.iter())
        .collect();
    // Hairpin: only an endpoint on this node can be the client of its own service here (a pod
    // elsewhere is DNATed by its own node, or its traffic takes the external path, which is
    // marked for masquerade), and endpoints without a node, which could be anywhere.
    if let Some(h) = table.sets.get_mut(&format!("hairpin-{s}")) {
        let here = e
            .local_endpoints
            .iter()
            .chain(e.cluster_endpoints.iter().filter(|ep| ep.node.is_none()));
        h.elements.extend(here.map(|ep| hairpin_element(ep.ip)));
    }
    if e.is_plain() {
        let pick = pick(table, e.family, proto, e.cluster_endpoints.len());
        // The endpoints go to `dispatch-…`, whose elements the table does not hold (see
        // [`dispatch`]).
        for f in &e.frontends {
            put(
                table,
                chains,
                service_ips_map(e.family),
                frontend_element(e, f),
                &pick,
            );
        }
        return;
    }
    // Endpoint chains, only with session affinity.
    if let Some(t) = e.affinity_timeout {
        for ep in all {
            let aff = aff_set(e, ep);
            let rules = vec![
                format!("update @{aff} {{ {kw} saddr }}"),
                format!(
                    "meta l4proto {proto} dnat {kw} to {}:{}",
                    dnat_addr(&ep.ip),
                    ep.port
                ),
            ];
            table.sets.insert(
                aff,
                Set {
                    type_: e.family.addr_type().into(),
                    flags: vec!["dynamic".into(), "timeout".into()],
                    timeout: Some(t),
                    elements: BTreeSet::new(),
                },
            );
            chain(table, &ep_chain(e, ep), None, rules);
        }
    }

    let svc = svc_chain(e);
    if e.internal_traffic_policy == TrafficPolicy::Cluster || e.has_external() {
        let rules = dispatch(table, chains, pending, &svc, e, &e.cluster_endpoints);
        chain(table, &svc, None, rules);
    }
    let local_needed = e.internal_traffic_policy == TrafficPolicy::Local
        || (e.external_traffic_policy == TrafficPolicy::Local && e.has_external());
    let local = local_chain(e);
    if local_needed {
        let rules = dispatch(table, chains, pending, &local, e, &e.local_endpoints);
        chain(table, &local, None, rules);
    }
    let internal = if e.internal_traffic_policy == TrafficPolicy::Local {
        &local
    } else {
        &svc
    };
    for f in e
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
    {
        put(
            table,
            chains,
            service_ips_map(e.family),
            frontend_element(e, f),
            internal,
        );
    }
    if !e.has_external() {
        return;
    }
    let ext = ext_chain(e);
    let rules = match e.external_traffic_policy {
        TrafficPolicy::Cluster => vec![mark_rule(), format!("goto {svc}")],
        TrafficPolicy::Local => vec![
            format!("{kw} saddr @pools-{s} {} goto {svc}", mark_rule()),
            format!("fib saddr type local {} goto {svc}", mark_rule()),
            format!("goto {local}"),
        ],
    };
    chain(table, &ext, None, rules);
    for f in e
        .frontends
        .iter()
        .filter(|f| f.kind != FrontendKind::ClusterIp)
    {
        put(
            table,
            chains,
            service_ips_map(e.family),
            frontend_element(e, f),
            &ext,
        );
    }
    if let Some(np) = e.node_port {
        put(
            table,
            chains,
            node_ports_map(e.family),
            node_port_element(e, np),
            &ext,
        );
    }
}

/// Adds the service proxy to `table`: the fixed chains and maps (see the module doc), and per
/// entry its chains, sets and map elements. Sets `pools-v4|v6` are created from the map's pod
/// CIDRs unless the table has them already.
pub fn render_services(map: &ServiceMap, table: &mut nft::Table) {
    skeleton(map, table);
    let mut pending = Vec::new();
    let mut chains = Chains::default();
    for e in &map.entries {
        render_entry(e, table, &mut chains, &mut pending);
    }
    place(table, pending);
    for (name, m) in table.maps.iter_mut() {
        if name.starts_with("service-ips-") {
            m.size = Some(map_size(m.elements.len()));
        }
    }
    for fam in FAMILIES {
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            if let Some(m) = table.maps.get_mut(&dispatch_map(fam, proto.nft())) {
                m.size = Some(map_size(dispatch::count(&map.entries, fam, proto)));
            }
        }
    }
}

/// The transaction that replaces a node's table with `table`, rendered from `map`: the
/// table (see [`nft::render_full`]) and the dispatch elements.
pub fn ruleset(table: &nft::Table, map: &ServiceMap) -> String {
    nft::render_full(table) + &dispatch::render_full(table, map)
}

/// The transaction from `old_table` (rendered from `old`) to `new_table` (from `new`): the
/// table's diff (see [`nft::render_diff`]) and the dispatch elements'; empty when nothing
/// changed.
pub fn ruleset_diff(
    old_table: &nft::Table,
    new_table: &nft::Table,
    old: &ServiceMap,
    new: &ServiceMap,
) -> String {
    nft::render_diff(old_table, new_table).unwrap_or_default()
        + &dispatch::render_diff(old_table, new_table, old, new)
}

/// The `size` of a map of `elements`: the smallest power of 4 (at least 2^16) that is twice
/// as many, so a map is re-declared (a text diff re-creating it) only when its elements grow
/// or shrink about fourfold, and rarely flips back and forth. The kernel allocates a bucket
/// per 0.75 of it (16 MB for 300k elements).
pub fn map_size(elements: usize) -> u64 {
    let mut size: u64 = 1 << 16;
    while size < 2 * elements as u64 {
        size *= 4;
    }
    size
}

/// Whether `map` is one of the proxy's element maps (dispatch by address and port, endpoints,
/// no-endpoint rejects): while they are empty, no packet is translated or rejected, as before
/// the proxy ran, so a cold load may fill them after the rest of the table.
pub fn is_proxy_map(name: &str) -> bool {
    [
        "endpoints-",
        "service-ips-",
        "service-nodeports-",
        "no-endpoint-services-",
        "no-endpoint-nodeports-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// The change to a rendered table when one service's endpoints change and nothing else does:
/// the same ports, frontends and policies, and every dispatch chain keeping its endpoint
/// count (an endpoint replaced, its pod rescheduled with a new address, a condition flipping
/// between two endpoints). Then only elements change: the chain's indices in its endpoint
/// map, and the hairpin set. [`endpoint_delta`] finds it; anything else needs a render.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EndpointDelta {
    /// `(map, key, value)`: elements of the table given a new value.
    pub map_values: Vec<(String, Key, Value)>,
    /// Changes to the `dispatch-…` maps, whose elements the table does not hold.
    pub dispatch: dispatch::Changes,
    /// `(set, element)`.
    pub set_added: Vec<(String, Key)>,
    pub set_removed: Vec<(String, Key)>,
}

impl EndpointDelta {
    pub fn is_empty(&self) -> bool {
        self.map_values.is_empty()
            && self.dispatch.is_empty()
            && self.set_added.is_empty()
            && self.set_removed.is_empty()
    }

    /// Makes `table` what a render of the new entries would be; returns the delta that undoes
    /// it (a map value's key is always there already). The dispatch changes are not the
    /// table's: the service map holds those endpoints.
    pub fn apply_to(&self, table: &mut nft::Table) -> EndpointDelta {
        let mut undo = EndpointDelta::default();
        for (map, key, value) in &self.map_values {
            if let Some(m) = table.maps.get_mut(map) {
                if let Some(old) = m.elements.insert(key.clone(), value.clone()) {
                    undo.map_values.push((map.clone(), key.clone(), old));
                }
            }
        }
        for (set, e) in &self.set_removed {
            if let Some(s) = table.sets.get_mut(set) {
                if s.elements.remove(e) {
                    undo.set_added.push((set.clone(), e.clone()));
                }
            }
        }
        for (set, e) in &self.set_added {
            if let Some(s) = table.sets.get_mut(set) {
                if s.elements.insert(e.clone()) {
                    undo.set_removed.push((set.clone(), e.clone()));
                }
            }
        }
        undo
    }
}

/// The hairpin elements an entry renders (see [`render_entry`]).
fn hairpin_elements(e: &ServiceEntry) -> impl Iterator<Item = (String, Key)> + '_ {
    let set = format!("hairpin-{}", e.family.suffix());
    let rendered = !e.cluster_endpoints.is_empty();
    e.local_endpoints
        .iter()
        .chain(e.cluster_endpoints.iter().filter(|ep| ep.node.is_none()))
        .filter(move |_| rendered)
        .map(move |ep| (set.clone(), hairpin_element(ep.ip)))
}

/// The element changes of plain entry `o` (rendered into `table` from `map`) getting the
/// endpoints `after`: its `dispatch-…` elements behind each frontend it owns, and the frontend's
/// verdict when the count changes. None when it gains or loses its last endpoint (the
/// no-endpoint maps change) or the count's pick chain is not in the table.
fn plain_delta(
    table: &nft::Table,
    map: &ServiceMap,
    o: &ServiceEntry,
    after: &[ServiceEndpoint],
    delta: &mut EndpointDelta,
) -> Option<()> {
    let before = &o.cluster_endpoints;
    if **before == *after {
        return Some(());
    }
    if before.is_empty() || after.is_empty() {
        return None;
    }
    let (fam, proto) = (o.family, o.protocol.nft());
    let ips_map = service_ips_map(fam);
    let ips = table.maps.get(&ips_map)?;
    let new_pick = pick_chain(fam, proto, after.len());
    if !table.chains.contains_key(&new_pick) {
        return None;
    }
    // A pick chain past the ones always made goes with its last user: a render then.
    let last_user = |n: usize| {
        n > PICK_CHAINS_UP_TO
            && !map.entries.iter().any(|x| {
                x.service != o.service
                    && x.is_plain()
                    && (x.family, x.protocol) == (fam, o.protocol)
                    && x.cluster_endpoints.len() == n
            })
    };
    if before.len() != after.len() && last_user(before.len()) {
        return None;
    }
    for f in &o.frontends {
        let owned = dispatch::Frontend {
            family: fam,
            protocol: o.protocol,
            ip: f.ip,
            port: f.port,
        };
        if dispatch::claimed_before(map, o, &owned) {
            continue;
        }
        let key = frontend_element(o, f);
        if before.len() != after.len() && ips.elements.contains_key(&key) {
            delta
                .map_values
                .push((ips_map.clone(), key, Value::goto(new_pick.as_str())));
        }
        delta.dispatch.push(&owned, before, after);
    }
    Some(())
}

/// The element changes that turn `table` (rendered from `map`, which holds `old`, the
/// service's entries) into the render with `new` in their place; None when the change is more
/// than endpoints moving within the same counts (see [`EndpointDelta`]).
pub fn endpoint_delta(
    table: &nft::Table,
    map: &ServiceMap,
    old: &[ServiceEntry],
    new: &[ServiceEntry],
) -> Option<EndpointDelta> {
    if old.len() != new.len() {
        return None;
    }
    let mut delta = EndpointDelta::default();
    for (o, n) in old.iter().zip(new) {
        let same_shape = ServiceEntry {
            cluster_endpoints: Box::default(),
            local_endpoints: Box::default(),
            ..o.clone()
        } == ServiceEntry {
            cluster_endpoints: Box::default(),
            local_endpoints: Box::default(),
            ..n.clone()
        };
        if !same_shape || o.affinity_timeout.is_some() {
            return None;
        }
        if o.is_plain() {
            plain_delta(table, map, o, &n.cluster_endpoints, &mut delta)?;
            continue;
        }
        for (chain, before, after) in [
            (svc_chain(o), &o.cluster_endpoints, &n.cluster_endpoints),
            (local_chain(o), &o.local_endpoints, &n.local_endpoints),
        ] {
            if !table.chains.contains_key(&chain) {
                // Not rendered for this entry: the list matters only through the hairpin set.
                continue;
            }
            if before == after {
                continue;
            }
            if before.len() != after.len() || after.is_empty() {
                return None;
            }
            let (m, offset, count) = dispatch_slots(table, &chain)?;
            if count as usize != after.len() {
                return None;
            }
            for (i, (b, a)) in before.iter().zip(after).enumerate() {
                if (b.ip, b.port) != (a.ip, a.port) {
                    delta.map_values.push((
                        m.clone(),
                        Key::one(Part::Int(offset + i as u32)),
                        endpoint_value(a.ip, a.port),
                    ));
                }
            }
        }
        // Whether endpoints exist decides the no-endpoint maps and every chain: unchanged.
        if o.cluster_endpoints.is_empty() != n.cluster_endpoints.is_empty() {
            return None;
        }
    }
    // A dispatch map outgrowing (or shrinking out of) its declared size is re-declared: a
    // render. Its count with the new entries in the old ones' place:
    for (fam, proto) in old
        .iter()
        .map(|e| (e.family, e.protocol))
        .collect::<BTreeSet<_>>()
    {
        let Some(declared) = table.maps.get(&dispatch_map(fam, proto.nft())) else {
            continue;
        };
        let count = dispatch::count(&map.entries, fam, proto) + dispatch::count(new, fam, proto)
            - dispatch::count(old, fam, proto);
        if declared.size != Some(map_size(count)) {
            return None;
        }
    }
    // Hairpin elements: added when new, removed when no other entry still renders them.
    let before: BTreeSet<(String, Key)> = old.iter().flat_map(hairpin_elements).collect();
    let after: BTreeSet<(String, Key)> = new.iter().flat_map(hairpin_elements).collect();
    let service = old.first().map(|e| &*e.service);
    let gone: Vec<&(String, Key)> = before.difference(&after).collect();
    if !gone.is_empty() {
        let kept: BTreeSet<(String, Key)> = map
            .entries
            .iter()
            .filter(|e| Some(&*e.service) != service)
            .flat_map(hairpin_elements)
            .filter(|x| gone.contains(&x))
            .collect();
        delta.set_removed = gone
            .into_iter()
            .filter(|x| !kept.contains(*x))
            .cloned()
            .collect();
    }
    delta.set_added = after
        .difference(&before)
        .filter(|(set, e)| !table.sets.get(set).is_some_and(|s| s.elements.contains(e)))
        .cloned()
        .collect();
    Some(delta)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! A fixed cluster of services for golden tests.
    use super::*;
    use malla_api::service::{Endpoint, EndpointPort, EndpointSlice, Service, ServicePort};

    pub const ME: &str = "node-a";

    pub fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub fn svc(name: &str, kind: ServiceType, ips: &[&str], ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "default".into(),
            name: name.into(),
            kind,
            cluster_ips: ips.iter().map(|s| ip(s)).collect(),
            ports,
            ..Service::default()
        }
    }

    pub fn port(name: &str, proto: Protocol, port: u16, node_port: Option<u16>) -> ServicePort {
        ServicePort {
            name: name.into(),
            protocol: proto,
            port,
            target_port: None,
            node_port,
        }
    }

    pub fn ep(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
        Endpoint {
            addresses: vec![ip(addr)],
            conditions: EndpointConditions {
                ready,
                serving: Some(serving),
                terminating,
            },
            node_name: Some(node.into()),
            target: Some(format!("default/pod-{addr}")),
        }
    }

    pub fn ready(addr: &str, node: &str) -> Endpoint {
        ep(addr, node, true, true, false)
    }

    pub fn slice(
        svc: &str,
        name: &str,
        t: AddressType,
        endpoints: Vec<Endpoint>,
        ports: &[(&str, Protocol, u16)],
    ) -> EndpointSlice {
        EndpointSlice {
            namespace: "default".into(),
            name: name.into(),
            service: svc.into(),
            address_type: t,
            endpoints,
            ports: ports
                .iter()
                .map(|(n, p, port)| EndpointPort {
                    name: n.to_string(),
                    protocol: *p,
                    port: *port,
                })
                .collect(),
        }
    }

    /// Every dispatch element of `m`: `(map, key) -> value`.
    pub fn dispatch_elements(m: &ServiceMap) -> BTreeMap<(String, Key), Value> {
        dispatch::elements(m)
            .into_iter()
            .flat_map(|(map, els)| els.into_iter().map(move |(k, v)| ((map.clone(), k), v)))
            .collect()
    }

    /// The slices as the proxy keeps them.
    pub fn proxy(slices: &[EndpointSlice]) -> Vec<ProxySlice> {
        slices.iter().map(ProxySlice::from).collect()
    }

    /// The services as the proxy keeps them.
    pub fn proxied(services: &[Service]) -> Vec<ProxyService> {
        services.iter().map(ProxyService::from).collect()
    }

    pub fn pools() -> Vec<IpPool> {
        vec![
            IpPool {
                name: "v4".into(),
                cidr: "198.18.0.0/16".parse().unwrap(),
                block_size: 26,
                nat_outgoing: true,
                disabled: false,
            },
            IpPool {
                name: "v6".into(),
                cidr: "fd00:198:18::/64".parse().unwrap(),
                block_size: 122,
                nat_outgoing: false,
                disabled: false,
            },
        ]
    }

    /// ClusterIP with 3 endpoints, multi-port with names, NodePort eTP Local, LoadBalancer eTP
    /// Cluster with external and LB IPs, affinity, no endpoints, dual-stack, terminating
    /// fallback, iTP Local without local endpoints.
    pub fn cluster() -> (Vec<Service>, Vec<EndpointSlice>) {
        use AddressType::{IPv4, IPv6};
        use Protocol::{Tcp, Udp};
        let mut services = Vec::new();
        let mut slices = Vec::new();

        services.push(svc(
            "web",
            ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("", Tcp, 80, None)],
        ));
        slices.push(slice(
            "web",
            "web-1",
            IPv4,
            vec![
                ready("198.18.0.1", "node-a"),
                ready("198.18.0.65", "node-b"),
                ready("198.18.0.129", "node-c"),
            ],
            &[("", Tcp, 8080)],
        ));

        services.push(svc(
            "multi",
            ServiceType::ClusterIP,
            &["10.96.0.11"],
            vec![
                port("http", Tcp, 80, None),
                port("metrics", Tcp, 9090, None),
            ],
        ));
        slices.push(slice(
            "multi",
            "multi-1",
            IPv4,
            vec![
                ready("198.18.0.2", "node-a"),
                ready("198.18.0.66", "node-b"),
            ],
            &[("http", Tcp, 8080), ("metrics", Tcp, 9100)],
        ));

        let mut s = svc(
            "np-local",
            ServiceType::NodePort,
            &["10.96.0.12"],
            vec![port("", Tcp, 80, Some(30080))],
        );
        s.external_traffic_policy = TrafficPolicy::Local;
        services.push(s);
        slices.push(slice(
            "np-local",
            "np-local-1",
            IPv4,
            vec![
                ready("198.18.0.3", "node-a"),
                ready("198.18.0.67", "node-b"),
            ],
            &[("", Tcp, 8080)],
        ));

        let mut s = svc(
            "lb",
            ServiceType::LoadBalancer,
            &["10.96.0.13"],
            vec![port("https", Tcp, 443, Some(30443))],
        );
        s.external_ips = vec![ip("203.0.113.10")];
        s.load_balancer_ips = vec![ip("203.0.113.20")];
        services.push(s);
        slices.push(slice(
            "lb",
            "lb-1",
            IPv4,
            vec![ready("198.18.0.68", "node-b")],
            &[("https", Tcp, 8443)],
        ));

        let mut s = svc(
            "sticky",
            ServiceType::ClusterIP,
            &["10.96.0.14"],
            vec![port("", Tcp, 80, None)],
        );
        s.session_affinity_timeout = Some(10800);
        services.push(s);
        slices.push(slice(
            "sticky",
            "sticky-1",
            IPv4,
            vec![
                ready("198.18.0.4", "node-a"),
                ready("198.18.0.69", "node-b"),
            ],
            &[("", Tcp, 8080)],
        ));

        services.push(svc(
            "empty",
            ServiceType::NodePort,
            &["10.96.0.15"],
            vec![port("", Tcp, 80, Some(30081))],
        ));

        services.push(svc(
            "dual",
            ServiceType::ClusterIP,
            &["10.96.0.16", "fd00:96::16"],
            vec![port("dns", Udp, 53, None)],
        ));
        slices.push(slice(
            "dual",
            "dual-v4",
            IPv4,
            vec![ready("198.18.0.5", "node-a")],
            &[("dns", Udp, 5353)],
        ));
        slices.push(slice(
            "dual",
            "dual-v6",
            IPv6,
            vec![
                ready("fd00:198:18::5", "node-a"),
                ready("fd00:198:18::45", "node-b"),
            ],
            &[("dns", Udp, 5353)],
        ));

        services.push(svc(
            "drain",
            ServiceType::ClusterIP,
            &["10.96.0.17"],
            vec![port("", Tcp, 80, None)],
        ));
        slices.push(slice(
            "drain",
            "drain-1",
            IPv4,
            vec![
                ep("198.18.0.6", "node-a", false, true, true),
                ep("198.18.0.7", "node-a", false, false, true),
                ep("198.18.0.70", "node-b", false, false, false),
            ],
            &[("", Tcp, 8080)],
        ));

        let mut s = svc(
            "itp-local",
            ServiceType::ClusterIP,
            &["10.96.0.18"],
            vec![port("", Tcp, 80, None)],
        );
        s.internal_traffic_policy = TrafficPolicy::Local;
        services.push(s);
        slices.push(slice(
            "itp-local",
            "itp-local-1",
            IPv4,
            vec![ready("198.18.0.71", "node-b")],
            &[("", Tcp, 8080)],
        ));

        (services, slices)
    }

    pub fn map() -> ServiceMap {
        let (services, slices) = cluster();
        build(
            &proxied(&services),
            &proxy(&slices),
            ME,
            &[ip("198.19.0.11"), ip("fd00:198:19::11")],
            &pools(),
        )
    }
}

#[cfg(test)]
mod golden_tests {
    use super::fixtures::*;
    use crate::masquerade::node_table;
    use crate::testutil::{golden, nft_check};

    /// The node's whole ruleset for `m`.
    fn full(m: &super::ServiceMap) -> String {
        super::ruleset(&node_table(&pools(), m), m)
    }

    /// The change from `a`'s ruleset to `b`'s.
    fn diff(a: &super::ServiceMap, b: &super::ServiceMap) -> String {
        let (ta, tb) = (node_table(&pools(), a), node_table(&pools(), b));
        super::ruleset_diff(&ta, &tb, a, b)
    }

    #[test]
    fn golden_node_table_with_services() {
        let text = full(&map());
        golden(
            "services.nft",
            &text,
            include_str!("../testdata/services.nft"),
        );
    }

    #[test]
    fn golden_service_map_json() {
        let json = serde_json::to_string_pretty(&map()).unwrap() + "\n";
        golden(
            "services.json",
            &json,
            include_str!("../testdata/services.json"),
        );
    }

    /// The fixture after a round of changes: `web` loses an endpoint, `sticky` goes away,
    /// `empty` gets an endpoint, a new service arrives, `lb` switches to eTP Local.
    fn changed() -> super::ServiceMap {
        use malla_api::service::{AddressType, Protocol, ServiceType, TrafficPolicy};
        let (mut services, mut slices) = cluster();
        services.retain(|s| s.name != "sticky");
        slices.retain(|s| s.service != "sticky");
        slices
            .iter_mut()
            .filter(|s| s.service == "web")
            .for_each(|s| {
                s.endpoints.pop();
            });
        slices.push(slice(
            "empty",
            "empty-1",
            AddressType::IPv4,
            vec![ready("198.18.0.72", "node-b")],
            &[("", Protocol::Tcp, 8080)],
        ));
        for s in services.iter_mut().filter(|s| s.name == "lb") {
            s.external_traffic_policy = TrafficPolicy::Local;
        }
        services.push(svc(
            "new",
            ServiceType::ClusterIP,
            &["10.96.0.19"],
            vec![port("", Protocol::Tcp, 80, None)],
        ));
        slices.push(slice(
            "new",
            "new-1",
            AddressType::IPv4,
            vec![ready("198.18.0.8", ME)],
            &[("", Protocol::Tcp, 8080)],
        ));
        super::build(&proxied(&services), &proxy(&slices), ME, &[], &pools())
    }

    #[test]
    fn golden_service_diff() {
        let d = diff(&map(), &changed());
        golden(
            "services-diff.nft",
            &d,
            include_str!("../testdata/services-diff.nft"),
        );
        // Full table plus the diff, checked as one transaction.
        let both = full(&map()) + &d;
        if let Some(r) = nft_check(&both) {
            r.unwrap_or_else(|e| panic!("nft -c rejected the diff:\n{e}"));
        }
    }

    /// Applies the full table then the diff for real, in a private network namespace
    /// (`unshare -n`, nothing on the host changes). Skipped without root or `unshare`.
    #[test]
    fn real_nft_applies_full_then_diff_in_a_private_netns() {
        let (old, new) = (map(), changed());
        let steps = [
            self::full(&old),
            self::diff(&old, &new),
            self::diff(&new, &old),
            self::diff(&old, &new),
        ];
        if let Some(r) = crate::testutil::nft_apply_in_private_netns(&steps) {
            r.unwrap_or_else(|e| panic!("nft failed:\n{e}"));
        }
    }

    #[test]
    fn real_nft_accepts_the_golden_rulesets() {
        for text in [
            include_str!("../testdata/services.nft"),
            include_str!("../testdata/masquerade.nft"),
        ] {
            match nft_check(text) {
                None => return,
                Some(r) => r.unwrap_or_else(|e| panic!("nft -c rejected:\n{e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;
    use crate::nft::element::{k, v};
    use malla_api::service::AddressType::IPv4;
    use malla_api::service::Protocol::{Tcp, Udp};
    use malla_api::service::Service;

    fn entry<'a>(m: &'a ServiceMap, svc: &str, port: u16, fam: IpFamily) -> &'a ServiceEntry {
        m.entries
            .iter()
            .find(|e| *e.service == format!("default/{svc}") && e.port == port && e.family == fam)
            .unwrap_or_else(|| panic!("no entry {svc}/{port}/{fam:?}"))
    }

    fn ips(eps: &[ServiceEndpoint]) -> Vec<String> {
        eps.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect()
    }

    fn one(s: Service, slices: Vec<malla_api::service::EndpointSlice>) -> ServiceMap {
        build(
            &[ProxyService::from(&s)],
            &proxy(&slices),
            ME,
            &[],
            &pools(),
        )
    }

    fn web() -> Service {
        svc(
            "web",
            ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("", Tcp, 80, None)],
        )
    }

    #[test]
    fn slices_belong_by_service_name_and_namespace() {
        let mut other_ns = slice(
            "web",
            "x",
            IPv4,
            vec![ready("198.18.0.9", "b")],
            &[("", Tcp, 8080)],
        );
        other_ns.namespace = "other".into();
        let other_svc = slice(
            "web2",
            "y",
            IPv4,
            vec![ready("198.18.0.8", "b")],
            &[("", Tcp, 8080)],
        );
        let own = slice(
            "web",
            "z",
            IPv4,
            vec![ready("198.18.0.7", "b")],
            &[("", Tcp, 8080)],
        );
        let m = one(web(), vec![other_ns, other_svc, own]);
        assert_eq!(
            ips(&m.entries[0].cluster_endpoints),
            vec!["198.18.0.7:8080"]
        );
    }

    #[test]
    fn ports_match_by_name_and_protocol() {
        let s = svc(
            "dns",
            ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("dns", Udp, 53, None), port("dns-tcp", Tcp, 53, None)],
        );
        let sl = slice(
            "dns",
            "a",
            IPv4,
            vec![ready("198.18.0.7", "b")],
            &[
                ("dns", Tcp, 1111),
                ("dns", Udp, 5353),
                ("dns-tcp", Tcp, 5354),
            ],
        );
        let m = one(s, vec![sl]);
        let udp = m.entries.iter().find(|e| e.protocol == Udp).unwrap();
        let tcp = m.entries.iter().find(|e| e.protocol == Tcp).unwrap();
        assert_eq!(ips(&udp.cluster_endpoints), vec!["198.18.0.7:5353"]);
        assert_eq!(ips(&tcp.cluster_endpoints), vec!["198.18.0.7:5354"]);
    }

    #[test]
    fn family_comes_from_the_slice_address_type() {
        let m = map();
        assert_eq!(
            ips(&entry(&m, "dual", 53, IpFamily::IPv4).cluster_endpoints),
            vec!["198.18.0.5:5353"]
        );
        let v6 = entry(&m, "dual", 53, IpFamily::IPv6);
        assert_eq!(
            ips(&v6.cluster_endpoints),
            vec!["fd00:198:18::5:5353", "fd00:198:18::45:5353"]
        );
        assert_eq!(v6.frontends.len(), 1);
        assert_eq!(v6.frontends[0].ip, ip("fd00:96::16"));
        // A v6 address in an IPv4 slice is ignored.
        let sl = slice(
            "web",
            "a",
            IPv4,
            vec![ready("fd00::1", "b")],
            &[("", Tcp, 80)],
        );
        assert!(one(web(), vec![sl]).entries[0].cluster_endpoints.is_empty());
    }

    #[test]
    fn ready_endpoints_win_over_terminating_ones() {
        let sl = slice(
            "web",
            "a",
            IPv4,
            vec![
                ready("198.18.0.1", "b"),
                ep("198.18.0.2", "b", false, true, true),
            ],
            &[("", Tcp, 80)],
        );
        assert_eq!(
            ips(&one(web(), vec![sl]).entries[0].cluster_endpoints),
            vec!["198.18.0.1:80"]
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_the_fallback_never_not_serving_ones() {
        let m = map();
        let e = entry(&m, "drain", 80, IpFamily::IPv4);
        assert_eq!(ips(&e.cluster_endpoints), vec!["198.18.0.6:8080"]);
        let sl = slice(
            "web",
            "a",
            IPv4,
            vec![
                ep("198.18.0.2", "b", false, false, true),
                ep("198.18.0.3", "b", false, false, false),
            ],
            &[("", Tcp, 80)],
        );
        assert!(one(web(), vec![sl]).entries[0].cluster_endpoints.is_empty());
    }

    #[test]
    fn addresses_are_deduplicated_across_slices() {
        let a = slice(
            "web",
            "a",
            IPv4,
            vec![ready("198.18.0.1", "b")],
            &[("", Tcp, 80)],
        );
        let b = slice(
            "web",
            "b",
            IPv4,
            vec![ready("198.18.0.1", "b"), ready("198.18.0.2", "b")],
            &[("", Tcp, 80)],
        );
        assert_eq!(
            ips(&one(web(), vec![a, b]).entries[0].cluster_endpoints),
            vec!["198.18.0.1:80", "198.18.0.2:80"]
        );
    }

    #[test]
    fn no_endpoints_keeps_the_entry_empty() {
        let m = map();
        let e = entry(&m, "empty", 80, IpFamily::IPv4);
        assert!(e.cluster_endpoints.is_empty() && e.local_endpoints.is_empty());
        assert_eq!(e.node_port, Some(30081));
    }

    #[test]
    fn local_endpoints_are_this_nodes_with_their_own_fallback() {
        let m = map();
        let e = entry(&m, "np-local", 80, IpFamily::IPv4);
        assert_eq!(ips(&e.local_endpoints), vec!["198.18.0.3:8080"]);
        assert_eq!(e.cluster_endpoints.len(), 2);
        // This node's only endpoint is terminating while others are ready elsewhere.
        let sl = slice(
            "web",
            "a",
            IPv4,
            vec![
                ready("198.18.0.65", "node-b"),
                ep("198.18.0.2", ME, false, true, true),
            ],
            &[("", Tcp, 80)],
        );
        let m = one(web(), vec![sl]);
        assert_eq!(ips(&m.entries[0].cluster_endpoints), vec!["198.18.0.65:80"]);
        assert_eq!(ips(&m.entries[0].local_endpoints), vec!["198.18.0.2:80"]);
    }

    #[test]
    fn frontends_node_ports_and_headless() {
        let m = map();
        let lb = entry(&m, "lb", 443, IpFamily::IPv4);
        let kinds: Vec<(String, FrontendKind)> = lb
            .frontends
            .iter()
            .map(|f| (f.ip.to_string(), f.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("10.96.0.13".into(), FrontendKind::ClusterIp),
                ("203.0.113.10".into(), FrontendKind::ExternalIp),
                ("203.0.113.20".into(), FrontendKind::LoadBalancer),
            ]
        );
        assert!(lb.frontends.iter().all(|f| f.port == 443));
        assert_eq!(lb.node_port, Some(30443));
        // ClusterIP services have no node port even if one is written.
        let mut s = web();
        s.ports[0].node_port = Some(30000);
        assert_eq!(one(s, vec![]).entries[0].node_port, None);
        // Headless: nothing to proxy.
        let mut s = web();
        s.cluster_ips.clear();
        assert!(one(s, vec![]).entries.is_empty());
    }

    #[test]
    fn chain_names_are_stable_and_valid_nft_identifiers() {
        let m = map();
        let e = entry(&m, "web", 80, IpFamily::IPv4);
        let h = chain_hash(e);
        assert_eq!(h.len(), 8);
        assert_eq!(svc_chain(e), format!("svc-{h}-default/web/tcp/80"));
        let v4 = entry(&m, "dual", 53, IpFamily::IPv4);
        let v6 = entry(&m, "dual", 53, IpFamily::IPv6);
        assert_ne!(
            svc_chain(v4),
            svc_chain(v6),
            "families get their own chains"
        );
        assert_eq!(
            ep_chain(v6, &v6.cluster_endpoints[0]),
            format!("ep-{}-fd00.198.18..5/5353", chain_hash(v6))
        );
        let mapped = ServiceEndpoint {
            ip: ip("::ffff:1.2.3.4"),
            port: 1,
            node: None,
        };
        assert!(!ep_chain(v6, &mapped).contains(':'));
    }

    #[test]
    fn map_dispatched_chains_own_disjoint_index_ranges_of_their_endpoints() {
        let m = map();
        let t = crate::masquerade::node_table(&pools(), &m);
        let mut ranges = Vec::new();
        for e in m.entries.iter().filter(|e| e.affinity_timeout.is_none()) {
            for (chain, eps) in [
                (svc_chain(e), &e.cluster_endpoints),
                (local_chain(e), &e.local_endpoints),
            ] {
                let Some((map, off, n)) = dispatch_slots(&t, &chain) else {
                    continue;
                };
                assert_eq!(n as usize, eps.len(), "{chain}");
                for (i, ep) in eps.iter().enumerate() {
                    assert_eq!(
                        t.maps[&map].elements[&k(&(off + i as u32).to_string())],
                        format!("{} . {}", ep.ip, ep.port)
                    );
                }
                ranges.push((off, off + n));
            }
        }
        assert!(ranges.len() >= 3, "{ranges:?}");
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0), "{ranges:?}");
    }

    #[test]
    fn plain_entries_dispatch_through_the_shared_pick_chain_of_their_count() {
        let m = map();
        let t = crate::masquerade::node_table(&pools(), &m);
        let mut plain = 0;
        for e in m.entries.iter().filter(|e| e.is_plain()) {
            assert!(!t.chains.contains_key(&svc_chain(e)), "{}", e.service);
            let proto = e.protocol.nft();
            for f in &e.frontends {
                let key = format!("{} . {proto} . {}", f.ip, f.port);
                let got = t.maps[&format!("service-ips-{}", e.family.suffix())]
                    .elements
                    .get(&k(&key));
                if e.cluster_endpoints.is_empty() {
                    assert_eq!(got, None, "{key}");
                    continue;
                }
                let pick = pick_chain(e.family, proto, e.cluster_endpoints.len());
                assert_eq!(got, Some(&v(&format!("goto {pick}"))), "{key}");
                assert!(t.chains[&pick].rules[0].contains(&format!(
                    "numgen random mod {} map @{}",
                    e.cluster_endpoints.len(),
                    dispatch_map(e.family, proto)
                )));
                // The table declares the map; the service map gives its elements.
                assert!(t.maps[&dispatch_map(e.family, proto)].elements.is_empty());
                let elements = &dispatch::elements(&m)[&dispatch_map(e.family, proto)];
                for (i, ep) in e.cluster_endpoints.iter().enumerate() {
                    let key = format!("{} . {} . {i}", f.ip, f.port);
                    let value = format!("{} . {}", ep.ip, ep.port);
                    assert!(elements.contains(&(k(&key), v(&value))), "{elements:?}");
                }
                plain += 1;
            }
        }
        assert!(plain >= 4, "{plain}");
        for n in 1..=PICK_CHAINS_UP_TO {
            assert!(t.chains.contains_key(&pick_chain(IpFamily::IPv4, "tcp", n)));
        }
    }

    #[test]
    fn external_policy_local_preserves_the_client_and_drops_without_local_endpoints() {
        let t = crate::masquerade::node_table(&pools(), &map());
        let e = entry(&map(), "np-local", 80, IpFamily::IPv4).clone();
        let ext = &t.chains[&ext_chain(&e)].rules;
        assert_eq!(ext.last().unwrap(), &format!("goto {}", local_chain(&e)));
        assert!(!ext.last().unwrap().contains("mark"));
        let e = entry(&map(), "itp-local", 80, IpFamily::IPv4).clone();
        assert_eq!(t.chains[&local_chain(&e)].rules, vec!["drop".to_string()]);
        assert_eq!(
            t.maps["service-ips-v4"].elements[&k("10.96.0.18 . tcp . 80")],
            format!("goto {}", local_chain(&e))
        );
        // No endpoints: rejected in the filter chains, not DNATed.
        assert_eq!(
            t.maps["no-endpoint-services-v4"].elements[&k("10.96.0.15 . tcp . 80")],
            "goto reject-chain"
        );
        assert!(!t.maps["service-ips-v4"]
            .elements
            .contains_key(&k("10.96.0.15 . tcp . 80")));
    }
}

#[cfg(test)]
mod endpoint_props {
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        /// The map never holds a not-serving endpoint, and holds a terminating (not ready) one
        /// only when its list has no ready one.
        #[test]
        fn never_not_serving_terminating_only_as_fallback(
            eps in proptest::collection::vec(
                (0..6u8, any::<bool>(), proptest::option::of(any::<bool>()), any::<bool>(), any::<bool>()),
                0..10,
            )
        ) {
            let endpoints: Vec<_> = eps
                .iter()
                .map(|(host, ready, serving, terminating, local)| {
                    let mut e = super::fixtures::ep(
                        &format!("198.18.0.{host}"),
                        if *local { ME } else { "node-b" },
                        *ready,
                        false,
                        *terminating,
                    );
                    e.conditions.serving = *serving;
                    e
                })
                .collect();
            let (half_a, half_b) = endpoints.split_at(endpoints.len() / 2);
            let slices = vec![
                slice("web", "a", AddressType::IPv4, half_a.to_vec(), &[("", Protocol::Tcp, 80)]),
                slice("web", "b", AddressType::IPv4, half_b.to_vec(), &[("", Protocol::Tcp, 80)]),
            ];
            let s = svc("web", ServiceType::ClusterIP, &["10.96.0.10"], vec![port("", Protocol::Tcp, 80, None)]);
            let m = build(&[ProxyService::from(&s)], &proxy(&slices), ME, &[], &pools());
            let e = &m.entries[0];
            let conds = |ip: IpAddr, local_only: bool| -> Vec<EndpointConditions> {
                endpoints
                    .iter()
                    .filter(|x| x.addresses[0] == ip)
                    .filter(|x| !local_only || x.node_name.as_deref() == Some(ME))
                    .map(|x| x.conditions)
                    .collect()
            };
            for (list, local_only) in [(&e.cluster_endpoints, false), (&e.local_endpoints, true)] {
                let any_ready = endpoints
                    .iter()
                    .filter(|x| !local_only || x.node_name.as_deref() == Some(ME))
                    .any(|x| x.conditions.ready && x.conditions.serving());
                for se in list.iter() {
                    let c = conds(se.ip, local_only);
                    prop_assert!(c.iter().any(|c| c.serving()), "not serving: {se:?}");
                    let is_ready = c.iter().any(|c| c.ready && c.serving());
                    if !is_ready {
                        prop_assert!(!any_ready, "terminating {se:?} while a ready one exists");
                        prop_assert!(c.iter().any(|c| c.terminating && c.serving()));
                    } else {
                        prop_assert!(any_ready);
                    }
                }
                // Something usable is never left out.
                let usable = endpoints
                    .iter()
                    .filter(|x| !local_only || x.node_name.as_deref() == Some(ME))
                    .any(|x| x.conditions.serving() && (x.conditions.ready || x.conditions.terminating));
                prop_assert_eq!(usable, !list.is_empty());
                // Deduplicated.
                let mut seen = BTreeSet::new();
                prop_assert!(list.iter().all(|x| seen.insert((x.ip, x.port))));
            }
        }
    }
}

#[cfg(test)]
mod delta_props {
    use super::fixtures::*;
    use super::*;
    use proptest::prelude::*;

    /// Applies `c` to `elements` as the kernel would, asserting that each change finds the
    /// element there (removed, replaced) or not (added).
    fn apply_dispatch(elements: &mut BTreeMap<(String, Key), Value>, c: &dispatch::Changes) {
        for (map, key) in &c.removed {
            assert!(
                elements.remove(&(map.clone(), key.clone())).is_some(),
                "{key}"
            );
        }
        for (map, key, value, replaces) in &c.set {
            let old = elements.insert((map.clone(), key.clone()), value.clone());
            assert_eq!(old.is_some(), *replaces, "{key}");
        }
    }

    fn entries_of(m: &ServiceMap, key: &str) -> Vec<ServiceEntry> {
        m.entries
            .iter()
            .filter(|e| *e.service == *key)
            .cloned()
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Endpoint changes to one slice of the fixture cluster: whenever `endpoint_delta`
        /// answers, the table with the delta applied equals a full render of the new map; and
        /// `build_service` gives what `build` gives for that service.
        #[test]
        fn a_delta_applied_equals_a_full_render(
            pick in 0..64usize,
            changes in proptest::collection::vec((0..16usize, 0..40u8, any::<bool>(), any::<bool>()), 1..4),
        ) {
            let (services, slices) = cluster();
            let m0 = build(&proxied(&services), &proxy(&slices), ME, &[ip("198.19.0.1")], &pools());
            let t0 = crate::masquerade::node_table(&pools(), &m0);
            let mut slices1 = slices.clone();
            let si = pick % slices1.len();
            let six = slices1[si].address_type == AddressType::IPv6;
            for (which, host, local, ready) in &changes {
                let eps = &mut slices1[si].endpoints;
                if eps.is_empty() {
                    continue;
                }
                let i = which % eps.len();
                let addr = if six { format!("fd00:198:18::{host:x}") } else { format!("198.18.9.{host}") };
                eps[i].addresses = vec![ip(&addr)];
                eps[i].node_name = Some(if *local { ME.into() } else { "node-b".into() });
                eps[i].conditions.ready = *ready;
            }
            let m1 = build(&proxied(&services), &proxy(&slices1), ME, &[ip("198.19.0.1")], &pools());
            let want = crate::masquerade::node_table(&pools(), &m1);
            let owner = services
                .iter()
                .find(|s| s.namespace == slices1[si].namespace && s.name == slices1[si].service);
            let Some(owner) = owner else { return Ok(()) };
            let key = owner.key();
            let new = build_service(&ProxyService::from(owner), &proxy(&slices1), ME);
            prop_assert_eq!(&new, &entries_of(&m1, &key));
            if let Some(d) = endpoint_delta(&t0, &m0, &entries_of(&m0, &key), &new) {
                let mut got = t0.clone();
                let undo = d.apply_to(&mut got);
                prop_assert_eq!(&got, &want);
                undo.apply_to(&mut got);
                prop_assert_eq!(got, t0, "the undo restores the table");
                let mut elements = dispatch_elements(&m0);
                apply_dispatch(&mut elements, &d.dispatch);
                prop_assert_eq!(elements, dispatch_elements(&m1));
            }
            // The dispatch diff of the whole maps does the same.
            let mut elements = dispatch_elements(&m0);
            apply_dispatch(&mut elements, &dispatch::diff(&m0, &m1));
            prop_assert_eq!(elements, dispatch_elements(&m1));
        }
    }

    /// Two services on one cluster IP and port (Kubernetes never allocates that, a datastore
    /// may hold it): the first in map order owns the frontend; a change to the second moves
    /// no dispatch element, a change to the first does, and both equal a full render.
    #[test]
    fn a_shared_frontend_belongs_to_the_first_service() {
        let (mut services, mut slices) = cluster();
        services.push(svc(
            "zdup",
            ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("", Protocol::Tcp, 80, None)],
        ));
        slices.push(slice(
            "zdup",
            "zdup-1",
            AddressType::IPv4,
            vec![ready("198.18.5.1", "node-b"), ready("198.18.5.2", "node-b")],
            &[("", Protocol::Tcp, 8080)],
        ));
        let m0 = build(&proxied(&services), &proxy(&slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        for (name, want_changes) in [("zdup", false), ("web", true)] {
            let svc = services.iter().find(|s| s.name == name).unwrap();
            let mut moved = slices.clone();
            let si = moved.iter().position(|s| s.service == name).unwrap();
            moved[si].endpoints[0].addresses = vec![ip("198.18.77.7")];
            let new = build_service(&ProxyService::from(svc), &proxy(&moved), ME);
            let d = endpoint_delta(&t0, &m0, &entries_of(&m0, &svc.key()), &new).expect("a delta");
            assert_eq!(!d.dispatch.is_empty(), want_changes, "{name}: {d:?}");
            let m1 = build(&proxied(&services), &proxy(&moved), ME, &[], &pools());
            let mut elements = dispatch_elements(&m0);
            apply_dispatch(&mut elements, &d.dispatch);
            assert_eq!(elements, dispatch_elements(&m1), "{name}");
        }
    }

    #[test]
    fn map_sizes_grow_fourfold_with_twice_the_headroom() {
        assert_eq!(map_size(0), 1 << 16);
        assert_eq!(map_size(32_768), 1 << 16);
        assert_eq!(map_size(32_769), 1 << 18);
        assert_eq!(map_size(300_000), 1 << 20);
    }

    /// A plain service gaining an endpoint is a delta unless the dispatch map's declared size
    /// would change with its element count.
    #[test]
    fn a_delta_that_changes_a_map_size_is_declined() {
        let (services, slices) = cluster();
        let m0 = build(&proxied(&services), &proxy(&slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        let svc = services.iter().find(|s| s.name == "web").unwrap();
        let mut more = slices.clone();
        let si = more.iter().position(|s| s.service == "web").unwrap();
        more[si].endpoints.push(ready("198.18.0.200", "node-b"));
        let new = build_service(&ProxyService::from(svc), &proxy(&more), ME);
        let old = entries_of(&m0, "default/web");
        assert!(endpoint_delta(&t0, &m0, &old, &new).is_some());
        let mut odd = t0.clone();
        let declared = odd.maps.get_mut("dispatch-v4-tcp").unwrap();
        let count = dispatch::count(&m0.entries, IpFamily::IPv4, Protocol::Tcp);
        let held = dispatch_elements(&m0)
            .keys()
            .filter(|(m, _)| m == "dispatch-v4-tcp")
            .count();
        assert_eq!(count, held);
        assert_eq!(declared.size, Some(map_size(count)));
        declared.size = Some(map_size(count) * 4);
        assert!(endpoint_delta(&odd, &m0, &old, &new).is_none());
    }

    /// The benchmark's change, an endpoint moving to a new address, takes the delta: one map
    /// element. A plain service scaling down takes it too (its verdict and its last index),
    /// one with a chain of its own does not.
    #[test]
    fn an_endpoint_moving_is_one_element_and_scaling_a_plain_service_too() {
        let (services, slices) = cluster();
        let m0 = build(&proxied(&services), &proxy(&slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        let (si, svc) = slices
            .iter()
            .enumerate()
            .find_map(|(i, s)| {
                let svc = services
                    .iter()
                    .find(|v| v.name == s.service && v.session_affinity_timeout.is_none())?;
                (s.endpoints.len() >= 2 && s.address_type == AddressType::IPv4).then_some((i, svc))
            })
            .expect("a fixture slice with two endpoints");
        let mut moved = slices.clone();
        moved[si].endpoints[0].addresses = vec![ip("198.18.77.7")];
        let new = build_service(&ProxyService::from(svc), &proxy(&moved), ME);
        let d = endpoint_delta(&t0, &m0, &entries_of(&m0, &svc.key()), &new).expect("a delta");
        // The endpoints are in address order: the indices from the moved one's old place to its
        // new one change, and nothing else.
        assert!(
            d.map_values.is_empty() && d.dispatch.removed.is_empty(),
            "{d:?}"
        );
        assert!(
            !d.dispatch.set.is_empty()
                && d.dispatch
                    .set
                    .iter()
                    .all(|(m, _, _, replaces)| m == "dispatch-v4-tcp" && *replaces),
            "{d:?}"
        );
        let mut got = t0.clone();
        d.apply_to(&mut got);
        let m1 = build(&proxied(&services), &proxy(&moved), ME, &[], &pools());
        assert_eq!(got, crate::masquerade::node_table(&pools(), &m1));

        let mut fewer = slices.clone();
        fewer[si].endpoints.pop();
        let new = build_service(&ProxyService::from(svc), &proxy(&fewer), ME);
        let d = endpoint_delta(&t0, &m0, &entries_of(&m0, &svc.key()), &new)
            .expect("a plain service scaling down is a delta");
        assert_eq!(d.dispatch.removed.len(), 1, "{d:?}");
        assert_eq!(d.map_values.len(), 1, "the frontend's verdict: {d:?}");
        assert!(
            d.map_values[0]
                .2
                .to_string()
                .starts_with("goto pick-v4-tcp-"),
            "{d:?}"
        );
        let mut got = t0.clone();
        d.apply_to(&mut got);
        let m1 = build(&proxied(&services), &proxy(&fewer), ME, &[], &pools());
        assert_eq!(got, crate::masquerade::node_table(&pools(), &m1));

        let (si, svc) = slices
            .iter()
            .enumerate()
            .find_map(|(i, s)| {
                let svc = services.iter().find(|v| v.name == s.service)?;
                (s.endpoints.len() >= 2 && svc.kind == ServiceType::NodePort).then_some((i, svc))
            })
            .expect("a fixture node-port service with two endpoints");
        let mut fewer = slices.clone();
        fewer[si].endpoints.pop();
        let new = build_service(&ProxyService::from(svc), &proxy(&fewer), ME);
        assert!(endpoint_delta(&t0, &m0, &entries_of(&m0, &svc.key()), &new).is_none());
    }
}
