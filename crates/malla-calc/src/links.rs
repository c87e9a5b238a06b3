//! The links node of the calculation graph: routes to other nodes' pods, the VXLAN peers and
//! this node's own pods (with what they may send from: [`crate::guard`]), kept current record
//! by record.
//!
//! It consumes the records it depends on one change at a time, each as it was and as it is
//! ([`LinksNode::node`], [`LinksNode::block`], [`LinksNode::endpoint`]) and keeps its own indexes: blocks by the node
//! they are affine to, and every pod address by the node it is used on. A route belongs to the
//! node it leads to (one per remote block, one per address a node borrowed from a block it does
//! not own), so a change marks only the nodes it touches, and [`LinksNode::take_delta`] computes
//! those nodes' routes again and hands over what was added and removed: work in proportion to
//! what changed, never a pass over the cluster. A full computation ([`LinksNode::from_view`]) is
//! the start-up case, and feeds the same indexes.
//!
//! A routing mode, VNI or port change is not followed here: it changes the VXLAN device itself,
//! and the caller builds the node again.
//!
//! The reference it is tested against (`reference` in the tests) is the plain loop over the
//! whole view that this node replaced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::{Node, Pod, RoutingMode, WorkloadEndpoint};

use crate::guard::{GuardDelta, GuardEntry, GuardNode};
use crate::routes::{ClusterView, RemoteRoute, VxlanPeer};

/// What the routes, peers and local pods of one node are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Links {
    pub remote_routes: Vec<RemoteRoute>,
    pub vxlan_peers: Vec<VxlanPeer>,
    /// Sorted by host interface name.
    pub local_endpoints: Vec<WorkloadEndpoint>,
    /// Remote objects that could not be routed, with the reason.
    pub problems: Vec<String>,
    /// The sources this node's pods may send from (anti-spoofing, [`crate::guard`]).
    pub guard: BTreeSet<GuardEntry>,
    /// The node's kernel checks IPv4 sources on its veths
    /// ([`crate::guard::GuardConfig::kernel_reverse_path`]): a fact of the node, which the agent
    /// sets before computing; false from [`LinksNode::links`].
    pub kernel_reverse_path: bool,
}

/// What changed in a node's [`Links`] since the last [`LinksNode::take_delta`]: what to add and
/// what to remove, each object at most once (a change undone within the batch is neither).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkDelta {
    pub routes_removed: Vec<RemoteRoute>,
    pub routes_added: Vec<RemoteRoute>,
    pub peers_removed: Vec<VxlanPeer>,
    pub peers_added: Vec<VxlanPeer>,
    pub local_removed: Vec<WorkloadEndpoint>,
    pub local_added: Vec<WorkloadEndpoint>,
    /// Anti-spoofing entries of local pods that changed.
    pub guard: GuardDelta,
    /// Problems that appeared with this delta (each is also in [`LinksNode::problems`]).
    pub new_problems: Vec<String>,
}

impl LinkDelta {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.routes_removed.is_empty()
            && self.routes_added.is_empty()
            && self.peers_removed.is_empty()
            && self.peers_added.is_empty()
            && self.local_removed.is_empty()
            && self.local_added.is_empty()
            && self.guard.is_empty()
    }

    /// Applies the delta to `links` (what a driver keeps of its last apply); problems are
    /// reported, not applied, and stay as they are.
    pub fn apply_to(&self, links: &mut Links) {
        fn patch<T: Ord + Clone>(v: &mut Vec<T>, removed: &[T], added: &[T]) {
            let mut set: BTreeSet<T> = std::mem::take(v).into_iter().collect();
            for r in removed {
                set.remove(r);
            }
            set.extend(added.iter().cloned());
            *v = set.into_iter().collect();
        }
        patch(
            &mut links.remote_routes,
            &self.routes_removed,
            &self.routes_added,
        );
        patch(
            &mut links.vxlan_peers,
            &self.peers_removed,
            &self.peers_added,
        );
        for ep in &self.local_removed {
            if let Some(i) = links.local_endpoints.iter().position(|e| e == ep) {
                links.local_endpoints.remove(i);
            }
        }
        for ep in &self.local_added {
            let at = links
                .local_endpoints
                .partition_point(|e| e.host_ifname <= ep.host_ifname);
            links.local_endpoints.insert(at, ep.clone());
        }
        for e in &self.guard.removed {
            links.guard.remove(e);
        }
        links.guard.extend(self.guard.added.iter().cloned());
    }
}

/// Pending additions and removals of one kind, a change and its undoing cancelling out.
#[derive(Debug)]
struct Pending<T> {
    removed: Vec<T>,
    added: Vec<T>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            removed: Vec::new(),
            added: Vec::new(),
        }
    }
}

impl<T: PartialEq> Pending<T> {
    fn remove(&mut self, x: T) {
        match self.added.iter().position(|a| *a == x) {
            Some(i) => {
                self.added.swap_remove(i);
            }
            None => self.removed.push(x),
        }
    }

    fn add(&mut self, x: T) {
        match self.removed.iter().position(|r| *r == x) {
            Some(i) => {
                self.removed.swap_remove(i);
            }
            None => self.added.push(x),
        }
    }
}

/// The routes leading to one node, and why some could not be made.
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeRoutes {
    routes: BTreeSet<RemoteRoute>,
    problems: BTreeSet<String>,
}

/// The links node: its indexes, its current output and what changed since it was last taken.
#[derive(Debug)]
pub struct LinksNode {
    me: String,
    vxlan: bool,
    /// BGP mode: the node's speaker routes to other nodes, this node makes no routes.
    bgp: bool,
    nodes: HashMap<String, Node>,
    /// Every affine block, and the node it is affine to.
    blocks: HashMap<IpNet, String>,
    /// Blocks by the node they are affine to.
    affine: HashMap<String, BTreeSet<IpNet>>,
    /// Pod addresses by the node they are used on, counted (two records may name one address).
    addrs: HashMap<String, BTreeMap<IpAddr, u32>>,
    /// Routes to each node other than this one, as last computed.
    routes: HashMap<String, NodeRoutes>,
    peers: BTreeMap<String, VxlanPeer>,
    local: Vec<WorkloadEndpoint>,
    /// Nodes whose routes must be computed again.
    dirty: BTreeSet<String>,
    peers_pending: Pending<VxlanPeer>,
    local_pending: Pending<WorkloadEndpoint>,
    /// Anti-spoofing entries of the local pods.
    guard: GuardNode,
}

impl LinksNode {
    /// An empty node for `me` in `mode`.
    pub fn new(me: &str, mode: RoutingMode) -> Self {
        Self {
            me: me.to_string(),
            vxlan: mode == RoutingMode::Vxlan,
            bgp: mode == RoutingMode::Bgp,
            nodes: HashMap::new(),
            blocks: HashMap::new(),
            affine: HashMap::new(),
            addrs: HashMap::new(),
            routes: HashMap::new(),
            peers: BTreeMap::new(),
            local: Vec::new(),
            dirty: BTreeSet::new(),
            peers_pending: Pending::default(),
            local_pending: Pending::default(),
            guard: GuardNode::new(),
        }
    }

    /// The node built from a whole view: the start-up case. Its delta is taken (it is all in
    /// [`LinksNode::links`]).
    pub fn from_view(view: &ClusterView, me: &str) -> Self {
        let mut n = Self::new(me, view.config.routing);
        for node in &view.nodes {
            n.node(None, Some(node));
        }
        for block in &view.blocks {
            n.block(None, Some(block));
        }
        for pod in &view.pods {
            n.pod(None, Some(pod));
        }
        for ep in &view.endpoints {
            n.endpoint(None, Some(ep));
        }
        n.take_delta();
        n
    }

    /// Whether this node follows `mode` (else build it again).
    pub fn follows(&self, mode: RoutingMode) -> bool {
        self.vxlan == (mode == RoutingMode::Vxlan) && self.bgp == (mode == RoutingMode::Bgp)
    }

    /// A node record changed from `before` to `after` (either None: created, deleted).
    pub fn node(&mut self, before: Option<&Node>, after: Option<&Node>) {
        if before == after {
            return;
        }
        if let Some(b) = before {
            if self.nodes.get(&b.name) == Some(b) {
                self.set_node(&b.name, None);
            }
        }
        if let Some(a) = after {
            self.set_node(&a.name, Some(a));
        }
    }

    fn set_node(&mut self, name: &str, node: Option<&Node>) {
        if self.nodes.get(name) == node {
            return;
        }
        match node {
            Some(n) => self.nodes.insert(name.to_string(), n.clone()),
            None => self.nodes.remove(name),
        };
        self.mark(name);
        let peer = node.and_then(|n| self.peer_of(n));
        if self.peers.get(name) != peer.as_ref() {
            if let Some(old) = self.peers.remove(name) {
                self.peers_pending.remove(old);
            }
            if let Some(p) = peer {
                self.peers.insert(name.to_string(), p.clone());
                self.peers_pending.add(p);
            }
        }
    }

    /// A block changed from `before` to `after` (`(cidr, affine node)`; either None: created,
    /// deleted).
    pub fn block(
        &mut self,
        before: Option<&(IpNet, Option<String>)>,
        after: Option<&(IpNet, Option<String>)>,
    ) {
        if before == after {
            return;
        }
        if let Some((cidr, owner)) = before {
            if self.blocks.get(cidr) == owner.as_ref() {
                self.set_block(*cidr, None);
            }
        }
        if let Some((cidr, owner)) = after {
            self.set_block(*cidr, owner.as_deref());
        }
    }

    fn set_block(&mut self, cidr: IpNet, owner: Option<&str>) {
        if self.blocks.get(&cidr).map(String::as_str) == owner {
            return;
        }
        if let Some(old) = self.blocks.remove(&cidr) {
            if let Some(set) = self.affine.get_mut(&old) {
                set.remove(&cidr);
                if set.is_empty() {
                    self.affine.remove(&old);
                }
            }
            self.mark(&old);
        }
        if let Some(owner) = owner {
            self.blocks.insert(cidr, owner.to_string());
            self.affine
                .entry(owner.to_string())
                .or_default()
                .insert(cidr);
            self.mark(owner);
        }
    }

    /// An endpoint record changed from `before` to `after` (either None: created, deleted).
    pub fn endpoint(
        &mut self,
        before: Option<&WorkloadEndpoint>,
        after: Option<&WorkloadEndpoint>,
    ) {
        if before == after {
            return;
        }
        let (lb, la) = (
            before.filter(|e| e.node == self.me),
            after.filter(|e| e.node == self.me),
        );
        if lb.is_some() || la.is_some() {
            self.guard.endpoint(lb, la);
        }
        if let Some(ep) = before {
            if let Some(addrs) = self.addrs.get_mut(&ep.node) {
                for ip in ep.addrs() {
                    if let Some(c) = addrs.get_mut(&ip) {
                        *c -= 1;
                        if *c == 0 {
                            addrs.remove(&ip);
                        }
                    }
                }
                if addrs.is_empty() {
                    self.addrs.remove(&ep.node);
                }
            }
            self.mark(&ep.node);
            if ep.node == self.me {
                if let Some(i) = self.local.iter().position(|e| e == ep) {
                    self.local.remove(i);
                }
                self.local_pending.remove(ep.clone());
            }
        }
        if let Some(ep) = after {
            let addrs = self.addrs.entry(ep.node.clone()).or_default();
            for ip in ep.addrs() {
                *addrs.entry(ip).or_default() += 1;
            }
            self.mark(&ep.node);
            if ep.node == self.me {
                let at = self
                    .local
                    .partition_point(|e| e.host_ifname <= ep.host_ifname);
                self.local.insert(at, ep.clone());
                self.local_pending.add(ep.clone());
            }
        }
    }

    /// A pod changed from `before` to `after`: its allowed source prefixes (anti-spoofing).
    /// True when that changes what this node's pods may send from.
    pub fn pod(&mut self, before: Option<&Pod>, after: Option<&Pod>) -> bool {
        before != after && self.guard.pod(before, after)
    }

    fn mark(&mut self, node: &str) {
        if node != self.me && !self.dirty.contains(node) {
            self.dirty.insert(node.to_string());
        }
    }

    fn peer_of(&self, n: &Node) -> Option<VxlanPeer> {
        if !self.vxlan || n.name == self.me {
            return None;
        }
        Some(VxlanPeer {
            node: n.name.clone(),
            mac: malla_api::parse_mac(&n.vtep_mac)?,
            underlay_ipv4: n.underlay_ipv4?,
            underlay_ipv6: n.underlay_ipv6,
        })
    }

    /// The routes to `owner` as the indexes say now.
    fn routes_to(&self, owner: &str) -> NodeRoutes {
        let mut out = NodeRoutes::default();
        if self.bgp {
            return out;
        }
        let own_blocks = self.affine.get(owner);
        let borrowed = self
            .addrs
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|(ip, _)| {
                let in_own_block = own_blocks.is_some_and(|b| b.iter().any(|c| c.contains(ip)));
                (!in_own_block).then(|| IpNet::from(*ip))
            });
        let dsts: Vec<IpNet> = own_blocks
            .into_iter()
            .flatten()
            .copied()
            .chain(borrowed)
            .collect();
        if dsts.is_empty() {
            return out;
        }
        let Some(node) = self.nodes.get(owner) else {
            out.problems.extend(
                dsts.iter()
                    .map(|dst| format!("{dst}: owner node {owner} is not registered")),
            );
            return out;
        };
        for dst in dsts {
            match crate::routes::next_hop(node, dst.addr().is_ipv6(), self.vxlan) {
                Some(via) => {
                    out.routes.insert(RemoteRoute {
                        dst,
                        via,
                        node: owner.to_string(),
                    });
                }
                None => {
                    out.problems.insert(format!(
                        "{dst}: node {owner} has no underlay address of that family"
                    ));
                }
            }
        }
        out
    }

    /// What node `owner` announces in BGP mode: its affine blocks, and the addresses its pods
    /// use from blocks it does not own (as /32 or /128).
    pub fn announced(&self, owner: &str) -> (Vec<IpNet>, Vec<IpNet>) {
        let own: Vec<IpNet> = self
            .affine
            .get(owner)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        let borrowed = self
            .addrs
            .get(owner)
            .into_iter()
            .flatten()
            .filter(|(ip, _)| !own.iter().any(|c| c.contains(*ip)))
            .map(|(ip, _)| IpNet::from(*ip))
            .collect();
        (own, borrowed)
    }

    /// Computes the routes of every node a change touched again, and hands over what changed
    /// since the last call.
    pub fn take_delta(&mut self) -> LinkDelta {
        let mut delta = LinkDelta::default();
        for owner in std::mem::take(&mut self.dirty) {
            let new = self.routes_to(&owner);
            let old = self.routes.remove(&owner).unwrap_or_default();
            delta
                .routes_removed
                .extend(old.routes.difference(&new.routes).cloned());
            delta
                .routes_added
                .extend(new.routes.difference(&old.routes).cloned());
            delta
                .new_problems
                .extend(new.problems.difference(&old.problems).cloned());
            if new != NodeRoutes::default() {
                self.routes.insert(owner, new);
            }
        }
        // Two owners may name one destination (two records claiming an address): a route moved
        // from one to the other is a removal and an addition of different values, both kept.
        let peers = std::mem::take(&mut self.peers_pending);
        delta.peers_removed = peers.removed;
        delta.peers_added = peers.added;
        let local = std::mem::take(&mut self.local_pending);
        delta.local_removed = local.removed;
        delta.local_added = local.added;
        delta.guard = self.guard.take_delta();
        delta
    }

    /// What this node's links are now (after [`LinksNode::take_delta`]).
    pub fn links(&self) -> Links {
        let mut remote_routes: Vec<RemoteRoute> = self
            .routes
            .values()
            .flat_map(|r| r.routes.iter().cloned())
            .collect();
        remote_routes.sort();
        Links {
            remote_routes,
            vxlan_peers: self.peers.values().cloned().collect(),
            local_endpoints: self.local.clone(),
            problems: self.problems(),
            guard: self.guard.entries(),
            kernel_reverse_path: false,
        }
    }

    /// How many routes, VXLAN peers and local pods there are now.
    pub fn counts(&self) -> (usize, usize, usize) {
        let routes = self.routes.values().map(|r| r.routes.len()).sum();
        (routes, self.peers.len(), self.local.len())
    }

    /// Every current problem, sorted.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .routes
            .values()
            .flat_map(|r| r.problems.iter().cloned())
            .collect();
        p.sort();
        p
    }
}

#[cfg(test)]
mod tests;
