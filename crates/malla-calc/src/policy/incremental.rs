//! The policy program kept current change by change: the calculation graph's policy node.
//!
//! [`compile`](super::compile) computes a node's program from every pod and policy; that is the
//! start-up case ([`PolicyIndex::new`] runs it once and keeps what it learned). After it,
//! [`PolicyIndex`] takes one change at a time and does only the work that change touches:
//! - a pod (labels, addresses, ports, created or deleted): one membership test per set that
//!   follows from pods — a number that grows with the policies, not with the pods — and the
//!   pod's own program if it is local;
//! - a policy: the programs of the local pods of its namespace that it selected or selects;
//! - a namespace's labels: the membership of that namespace's pods.
//!
//! A set no program used before (a new peer) is filled from every pod, once; a set no rule
//! references any more is dropped. Each change returns a [`PolicyDelta`] in backend-neutral
//! terms — members added and removed, sets created and dropped, local endpoints whose program
//! to rewrite — and [`PolicyIndex::program`] equals what `compile` gives for the same objects:
//! the property test `policy_index_follows_changes_like_a_full_compile` checks both after
//! random sequences of changes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use malla_api::policy::{LabelSelector, NetworkPolicy, NetworkPolicyPeer};
use malla_api::service::Protocol;
use malla_api::{ContainerPort, Namespace};

use super::addrs::hosts;
use super::compile::{
    block_set, compile_recording, endpoint_program, named_base, named_set_key, peer_key, pod_set,
    set_name, GroupKey, NamedGroup, PeerRef, Pol, SetDef, SetSource,
};
use super::{EndpointProgram, PeerSet, PolicyPod, PolicyProgram};

/// A local endpoint: `(namespace, name)`.
pub type EndpointKey = (String, String);

/// What one change did to the program, in terms any dataplane can apply.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyDelta {
    /// Sets that did not exist before the change (their members: [`PolicyIndex::set`]).
    pub sets_added: BTreeSet<String>,
    /// Sets that existed and no longer do.
    pub sets_removed: BTreeSet<String>,
    /// Per set that existed before and still does: the addresses it gained.
    pub members_added: BTreeMap<String, BTreeSet<IpNet>>,
    /// Per set that existed before and still does: the addresses it lost.
    pub members_removed: BTreeMap<String, BTreeSet<IpNet>>,
    /// Local endpoints whose program is new or changed ([`PolicyIndex::endpoint`]).
    pub endpoints_changed: BTreeSet<EndpointKey>,
    /// Local endpoints that no longer have a program (deleted, or moved off this node).
    pub endpoints_removed: BTreeSet<EndpointKey>,
}

impl PolicyDelta {
    /// Whether the change left the program as it was.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the change only moved addresses in and out of sets that existed before and still
    /// do: no set created or dropped, no local endpoint's program changed or removed.
    pub fn members_only(&self) -> bool {
        self.sets_added.is_empty()
            && self.sets_removed.is_empty()
            && self.endpoints_changed.is_empty()
            && self.endpoints_removed.is_empty()
    }

    /// Adds what a later change did, so that one delta stands for a batch of changes.
    pub fn merge(&mut self, later: PolicyDelta) {
        for set in &later.sets_removed {
            self.set_dropped(set);
        }
        for set in &later.sets_added {
            self.set_created(set);
        }
        for (added, sets) in [(false, later.members_removed), (true, later.members_added)] {
            for (set, addrs) in sets {
                for addr in addrs {
                    self.member(&set, addr, added);
                }
            }
        }
        for key in later.endpoints_changed {
            self.endpoints_removed.remove(&key);
            self.endpoints_changed.insert(key);
        }
        for key in later.endpoints_removed {
            self.endpoints_changed.remove(&key);
            self.endpoints_removed.insert(key);
        }
    }

    fn member(&mut self, set: &str, addr: IpNet, added: bool) {
        if self.sets_added.contains(set) {
            return;
        }
        let (this, other) = if added {
            (&mut self.members_added, &mut self.members_removed)
        } else {
            (&mut self.members_removed, &mut self.members_added)
        };
        if other.get_mut(set).is_some_and(|s| s.remove(&addr)) {
            return;
        }
        this.entry(set.to_string()).or_default().insert(addr);
    }

    fn set_created(&mut self, set: &str) {
        if !self.sets_removed.remove(set) {
            self.sets_added.insert(set.to_string());
        }
    }

    fn set_dropped(&mut self, set: &str) {
        self.members_added.remove(set);
        self.members_removed.remove(set);
        if !self.sets_added.remove(set) {
            self.sets_removed.insert(set.to_string());
        }
    }
}

/// A local pod's program and the named-port groups it read.
#[derive(Debug, Clone)]
struct LocalEndpoint {
    program: EndpointProgram,
    groups: Vec<GroupKey>,
}

impl LocalEndpoint {
    fn sets(&self) -> impl Iterator<Item = &String> {
        let p = &self.program;
        p.ingress
            .iter()
            .chain(p.egress.iter())
            .flatten()
            .filter_map(|r| r.peer.as_ref())
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The sets of the program and how each follows from the pods.
#[derive(Debug, Default)]
struct Sets {
    sets: BTreeMap<String, PeerSet>,
    /// The sets that follow from pods (not `ipBlock` peers' own sets).
    defs: HashMap<String, SetDef>,
    /// How many rules of local programs name each set.
    refs: HashMap<String, usize>,
    groups: HashMap<GroupKey, NamedGroup>,
    /// How many local programs read each named-port group.
    group_refs: HashMap<GroupKey, usize>,
}

/// One node's policy program, kept current change by change (see the module doc).
#[derive(Debug)]
pub struct PolicyIndex {
    node: String,
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// The valid policies: namespace → name → policy (the compiler's order).
    policies: BTreeMap<String, BTreeMap<String, NetworkPolicy>>,
    /// Every pod with an address record, by `namespace/name`.
    pods: HashMap<String, StoredPod>,
    /// What many pods share (label maps, port lists, namespace and node names), kept once.
    interned: Interner,
    /// Address → the pods holding it (one, unless records disagree).
    by_ip: HashMap<IpAddr, Vec<String>>,
    sets: Sets,
    endpoints: BTreeMap<EndpointKey, LocalEndpoint>,
}

/// `p` owning its parts (for a pod used while the index changes).
fn owned(p: &PolicyPod) -> PolicyPod<'static> {
    PolicyPod {
        namespace: Cow::Owned(p.namespace.to_string()),
        name: Cow::Owned(p.name.to_string()),
        labels: Cow::Owned(p.labels.clone().into_owned()),
        ips: p.ips.clone(),
        node: Cow::Owned(p.node.to_string()),
        ports: Cow::Owned(p.ports.to_vec()),
        host_ifname: Cow::Owned(p.host_ifname.to_string()),
    }
}

/// A pod as the index keeps it. Label maps, port lists and namespace and node names are
/// interned: the pods of one workload share them, so a pod costs its name, addresses and
/// interface name (the index held a whole copy of every pod before, ~2 KiB each).
#[derive(Debug)]
struct StoredPod {
    namespace: Arc<str>,
    name: Box<str>,
    labels: Arc<BTreeMap<String, String>>,
    ips: Box<[IpAddr]>,
    node: Arc<str>,
    ports: Arc<[ContainerPort]>,
    host_ifname: Box<str>,
}

impl StoredPod {
    /// The pod as policy reads it, borrowed.
    fn view(&self) -> PolicyPod<'_> {
        PolicyPod {
            namespace: Cow::Borrowed(&self.namespace),
            name: Cow::Borrowed(&self.name),
            labels: Cow::Borrowed(&self.labels),
            ips: self.ips.to_vec(),
            node: Cow::Borrowed(&self.node),
            ports: Cow::Borrowed(&self.ports),
            host_ifname: Cow::Borrowed(&self.host_ifname),
        }
    }
}

/// The values pods share, each kept once while some pod holds it.
#[derive(Debug, Default)]
struct Interner {
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    names: HashSet<Arc<str>>,
    ports: HashSet<Arc<[ContainerPort]>>,
}

/// The shared copy of `v` in `set`, made by `make` when there is none yet.
fn intern<T: Hash + Eq + ?Sized>(
    set: &mut HashSet<Arc<T>>,
    v: &T,
    make: impl FnOnce() -> Arc<T>,
) -> Arc<T> {
    if let Some(a) = set.get(v) {
        return a.clone();
    }
    let a = make();
    set.insert(a.clone());
    a
}

/// Drops `set`'s copy of `v` when `v` was its last holder.
fn release<T: Hash + Eq + ?Sized>(set: &mut HashSet<Arc<T>>, v: Arc<T>) {
    if Arc::strong_count(&v) == 2 {
        set.remove(&*v);
    }
}

impl Interner {
    fn store(&mut self, p: &PolicyPod) -> StoredPod {
        StoredPod {
            namespace: intern(&mut self.names, &p.namespace, || Arc::from(&*p.namespace)),
            name: Box::from(&*p.name),
            labels: intern(&mut self.labels, &p.labels, || {
                Arc::new(p.labels.clone().into_owned())
            }),
            ips: p.ips.clone().into_boxed_slice(),
            node: intern(&mut self.names, &p.node, || Arc::from(&*p.node)),
            ports: intern(&mut self.ports, &p.ports, || Arc::from(&*p.ports)),
            host_ifname: Box::from(&*p.host_ifname),
        }
    }

    fn release(&mut self, p: StoredPod) {
        release(&mut self.names, p.namespace);
        release(&mut self.names, p.node);
        release(&mut self.labels, p.labels);
        release(&mut self.ports, p.ports);
    }
}

fn endpoint_key(p: &PolicyPod) -> EndpointKey {
    (p.namespace.to_string(), p.name.to_string())
}

impl PolicyIndex {
    /// The program of `node` for these objects: a full compile, remembered.
    pub fn new(
        node: &str,
        policies: &[NetworkPolicy],
        namespaces: &[Namespace],
        pods: &[PolicyPod],
    ) -> Self {
        let (program, recorded) = compile_recording(policies, namespaces, pods, node, true);
        let mut index = Self {
            node: node.to_string(),
            namespaces: namespaces
                .iter()
                .map(|n| (n.name.clone(), n.labels.clone()))
                .collect(),
            policies: BTreeMap::new(),
            pods: HashMap::with_capacity(pods.len()),
            interned: Interner::default(),
            by_ip: HashMap::with_capacity(pods.len()),
            sets: Sets {
                sets: program.sets,
                defs: recorded.defs,
                refs: HashMap::new(),
                groups: recorded.groups,
                group_refs: HashMap::new(),
            },
            endpoints: BTreeMap::new(),
        };
        for p in super::valid(policies) {
            index
                .policies
                .entry(p.namespace.clone())
                .or_default()
                .insert(p.name.clone(), p.clone());
        }
        for p in pods {
            index.add_pod_record(p);
        }
        for (program, groups) in program.endpoints.into_iter().zip(recorded.endpoint_groups) {
            let ep = LocalEndpoint { program, groups };
            index.sets.reference(&ep, 1);
            let key = (ep.program.namespace.clone(), ep.program.name.clone());
            index.endpoints.insert(key, ep);
        }
        index
    }

    /// The whole program, as [`compile`](super::compile) would give it.
    pub fn program(&self) -> PolicyProgram {
        PolicyProgram {
            node: self.node.clone(),
            sets: self.sets.sets.clone(),
            endpoints: self.endpoints.values().map(|e| e.program.clone()).collect(),
        }
    }

    /// Pod `namespace/name` as the index holds it (its state before the change being followed).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PolicyPod<'_>> {
        self.pods
            .get(&format!("{namespace}/{name}"))
            .map(StoredPod::view)
    }

    /// The node whose program this is.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// One set of the program.
    pub fn set(&self, name: &str) -> Option<&PeerSet> {
        self.sets.sets.get(name)
    }

    /// Every set of the program, by name.
    pub fn sets(&self) -> &BTreeMap<String, PeerSet> {
        &self.sets.sets
    }

    /// The local endpoints' programs, in the program's order.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointProgram> {
        self.endpoints.values().map(|e| &e.program)
    }

    /// One local endpoint's program.
    pub fn endpoint(&self, key: &EndpointKey) -> Option<&EndpointProgram> {
        self.endpoints.get(key).map(|e| &e.program)
    }

    /// A pod was created or changed (labels, addresses, ports, node).
    pub fn upsert_pod(&mut self, pod: &PolicyPod) -> PolicyDelta {
        let key = pod.key();
        let old = self.remove_pod_record(&key);
        self.add_pod_record(pod);
        let mut delta = PolicyDelta::default();
        self.pod_moved(
            old.as_ref().map(StoredPod::view).as_ref(),
            Some(pod),
            &mut delta,
        );
        if let Some(old) = old {
            self.interned.release(old);
        }
        delta
    }

    /// A pod (or its address record) is gone.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> PolicyDelta {
        let mut delta = PolicyDelta::default();
        if let Some(old) = self.remove_pod_record(&format!("{namespace}/{name}")) {
            self.pod_moved(Some(&old.view()), None, &mut delta);
            self.interned.release(old);
        }
        delta
    }

    /// A policy was created or changed. One that fails validation does not exist.
    pub fn upsert_policy(&mut self, policy: &NetworkPolicy) -> PolicyDelta {
        let old = self.take_policy(&policy.namespace, &policy.name);
        if policy.validate().is_ok() {
            self.policies
                .entry(policy.namespace.clone())
                .or_default()
                .insert(policy.name.clone(), policy.clone());
        }
        let mut delta = PolicyDelta::default();
        self.policy_moved(old.as_ref(), Some(policy), &mut delta);
        delta
    }

    /// A policy is gone.
    pub fn remove_policy(&mut self, namespace: &str, name: &str) -> PolicyDelta {
        let mut delta = PolicyDelta::default();
        if let Some(old) = self.take_policy(namespace, name) {
            self.policy_moved(Some(&old), None, &mut delta);
        }
        delta
    }

    /// A namespace's labels changed (`None`: the namespace is gone; its pods match as having
    /// no labels).
    pub fn set_namespace(
        &mut self,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> PolicyDelta {
        let old = match labels {
            Some(l) => self.namespaces.insert(name.to_string(), l.clone()),
            None => self.namespaces.remove(name),
        }
        .unwrap_or_default();
        let mut delta = PolicyDelta::default();
        let new = labels.unwrap_or(&NO_LABELS);
        if old == *new {
            return delta;
        }
        let members: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| *p.namespace == *name)
            .map(|(k, _)| k.clone())
            .collect();
        for key in members {
            let Some(pod) = self.pods.get(&key) else {
                continue;
            };
            let pod = owned(&pod.view());
            let dirty = self.memberships(Some((&pod, &old)), Some((&pod, new)), &mut delta);
            self.recompute_all(dirty, &mut delta);
        }
        delta
    }

    fn take_policy(&mut self, namespace: &str, name: &str) -> Option<NetworkPolicy> {
        let in_ns = self.policies.get_mut(namespace)?;
        let old = in_ns.remove(name);
        if in_ns.is_empty() {
            self.policies.remove(namespace);
        }
        old
    }

    fn add_pod_record(&mut self, pod: &PolicyPod) {
        let key = pod.key();
        for ip in &pod.ips {
            self.by_ip.entry(*ip).or_default().push(key.clone());
        }
        let stored = self.interned.store(pod);
        self.pods.insert(key, stored);
    }

    /// Takes the pod's record out (release it to the interner once done with it).
    fn remove_pod_record(&mut self, key: &str) -> Option<StoredPod> {
        let old = self.pods.remove(key)?;
        for ip in &old.ips {
            if let Some(holders) = self.by_ip.get_mut(ip) {
                holders.retain(|k| k != key);
                if holders.is_empty() {
                    self.by_ip.remove(ip);
                }
            }
        }
        Some(old)
    }

    fn ns_labels(&self, ns: &str) -> &BTreeMap<String, String> {
        self.namespaces.get(ns).unwrap_or(&NO_LABELS)
    }

    /// A pod changed from `old` to `new` (its record is already updated).
    fn pod_moved(
        &mut self,
        old: Option<&PolicyPod>,
        new: Option<&PolicyPod>,
        delta: &mut PolicyDelta,
    ) {
        let old_labels = old.map(|p| self.ns_labels(&p.namespace).clone());
        let new_labels = new.map(|p| self.ns_labels(&p.namespace).clone());
        let mut dirty = self.memberships(
            old.zip(old_labels.as_ref()),
            new.zip(new_labels.as_ref()),
            delta,
        );
        for p in old.iter().chain(new.iter()) {
            if p.node == self.node {
                dirty.insert(endpoint_key(p));
            }
        }
        self.recompute_all(dirty, delta);
    }

    /// Updates every pod-derived set for one pod going from `old` to `new` (each with its
    /// namespace's labels); returns the local endpoints whose named-port rules must be built
    /// again because a group's numbers changed.
    fn memberships(
        &mut self,
        old: Option<(&PolicyPod, &BTreeMap<String, String>)>,
        new: Option<(&PolicyPod, &BTreeMap<String, String>)>,
        delta: &mut PolicyDelta,
    ) -> BTreeSet<EndpointKey> {
        let key = old.or(new).map(|(p, _)| p.key()).unwrap_or_default();
        let Sets { sets, defs, .. } = &mut self.sets;
        for (name, def) in defs.iter() {
            let before: Vec<IpAddr> =
                old.map_or_else(Vec::new, |(p, l)| def.addrs_of(p, l).collect());
            let after: Vec<IpAddr> =
                new.map_or_else(Vec::new, |(p, l)| def.addrs_of(p, l).collect());
            if before == after {
                continue;
            }
            let Some(set) = sets.get_mut(name) else {
                continue;
            };
            for ip in before.iter().filter(|ip| !after.contains(ip)) {
                // Another pod may hold the same address and still belong.
                let kept = self.by_ip.get(ip).is_some_and(|holders| {
                    holders.iter().filter(|k| **k != key).any(|k| {
                        self.pods.get(k).is_some_and(|q| {
                            let l = self.namespaces.get(&*q.namespace).unwrap_or(&NO_LABELS);
                            def.addrs_of(&q.view(), l).any(|a| a == *ip)
                        })
                    })
                });
                let net = IpNet::from(*ip);
                if !kept {
                    if let Ok(i) = set.addrs.binary_search(&net) {
                        set.addrs.remove(i);
                        delta.member(name, net, false);
                    }
                }
            }
            for ip in after.iter().filter(|ip| !before.contains(ip)) {
                let net = IpNet::from(*ip);
                if let Err(i) = set.addrs.binary_search(&net) {
                    set.addrs.insert(i, net);
                    delta.member(name, net, true);
                }
            }
        }
        // Named-port groups: a number appears when the first member declares it and goes when
        // the last leaves; the programs reading the group get a rule more or less.
        let mut changed: Vec<GroupKey> = Vec::new();
        let Sets {
            sets, defs, groups, ..
        } = &mut self.sets;
        for (gk, g) in groups.iter_mut() {
            let (base, proto, port) = gk;
            let mut numbers_changed = false;
            if let Some((p, l)) = new {
                let def = SetDef {
                    policy_ns: g.policy_ns.clone(),
                    peer: g.peer.clone(),
                    named: None,
                };
                let addrs: Vec<IpAddr> = def.addrs_of(p, l).collect();
                if !addrs.is_empty() {
                    for k in p.named_port(port, *proto) {
                        if let Err(i) = g.numbers.binary_search_by(|(n, _)| n.cmp(&k)) {
                            let set_key = named_set_key(base, *proto, port, k);
                            let name = set_name(&set_key);
                            sets.insert(name.clone(), pod_set(set_key, hosts(addrs.clone())));
                            defs.insert(
                                name.clone(),
                                SetDef {
                                    named: Some((*proto, port.clone(), k)),
                                    ..def.clone()
                                },
                            );
                            delta.set_created(&name);
                            g.numbers.insert(i, (k, name));
                            numbers_changed = true;
                        }
                    }
                }
            }
            let before = g.numbers.len();
            g.numbers
                .retain(|(_, set)| sets.get(set).is_some_and(|s| !s.addrs.is_empty()));
            numbers_changed |= g.numbers.len() != before;
            if numbers_changed {
                changed.push(gk.clone());
            }
        }
        self.endpoints
            .iter()
            .filter(|(_, e)| e.groups.iter().any(|g| changed.contains(g)))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A policy changed from `old` to `new` (the policy map is already updated).
    fn policy_moved(
        &mut self,
        old: Option<&NetworkPolicy>,
        new: Option<&NetworkPolicy>,
        delta: &mut PolicyDelta,
    ) {
        let Some(ns) = old.or(new).map(|p| p.namespace.clone()) else {
            return;
        };
        // Stored policies are valid; a new one that is not selects nothing.
        let selectors: Vec<&LabelSelector> = old
            .into_iter()
            .chain(new.filter(|p| p.validate().is_ok()))
            .map(|p| &p.spec.pod_selector)
            .collect();
        let dirty: BTreeSet<EndpointKey> = self
            .endpoints
            .range((ns.clone(), String::new())..)
            .take_while(|((n, _), _)| *n == ns)
            .map(|(k, _)| k.clone())
            .chain(
                self.pods
                    .values()
                    .filter(|p| *p.node == *self.node && *p.namespace == *ns)
                    .map(|p| (p.namespace.to_string(), p.name.to_string())),
            )
            .filter(|(n, name)| {
                let Some(pod) = self.pods.get(&format!("{n}/{name}")) else {
                    return true;
                };
                selectors.iter().any(|s| s.matches(&pod.labels))
            })
            .collect();
        self.recompute_all(dirty, delta);
    }

    fn recompute_all(&mut self, dirty: BTreeSet<EndpointKey>, delta: &mut PolicyDelta) {
        for key in dirty {
            self.recompute(key, delta);
        }
    }

    /// Builds one local endpoint's program again, creating the sets it newly needs and
    /// dropping those nothing names any more.
    fn recompute(&mut self, key: EndpointKey, delta: &mut PolicyDelta) {
        let old = self.endpoints.remove(&key);
        let pod = self
            .pods
            .get(&format!("{}/{}", key.0, key.1))
            .filter(|p| *p.node == *self.node)
            .map(StoredPod::view);
        let new = pod.map(|pod| {
            let pols: Vec<Pol> = self
                .policies
                .get(&key.0)
                .map(|m| m.values().map(Pol::new).collect())
                .unwrap_or_default();
            let selecting: Vec<usize> = (0..pols.len())
                .filter(|&i| pols[i].p.spec.pod_selector.matches(&pod.labels))
                .collect();
            let mut source = IndexSource {
                sets: &mut self.sets,
                pods: &self.pods,
                namespaces: &self.namespaces,
                used: Vec::new(),
                delta: &mut *delta,
            };
            let program = endpoint_program(&mut source, &pols, &selecting, &pod);
            LocalEndpoint {
                program,
                groups: source.used,
            }
        });
        if let Some(n) = &new {
            self.sets.reference(n, 1);
        }
        if let Some(o) = &old {
            for dropped in self.sets.reference(o, -1) {
                delta.set_dropped(&dropped);
            }
        }
        match new {
            Some(n) => {
                if old.as_ref().is_none_or(|o| o.program != n.program) {
                    delta.endpoints_changed.insert(key.clone());
                }
                delta.endpoints_removed.remove(&key);
                self.endpoints.insert(key, n);
            }
            None => {
                if old.is_some() {
                    delta.endpoints_changed.remove(&key);
                    delta.endpoints_removed.insert(key);
                }
            }
        }
    }
}

impl Sets {
    /// Adds (`by` 1) or removes (`by` -1) one program's references; returns the sets dropped.
    fn reference(&mut self, ep: &LocalEndpoint, by: isize) -> Vec<String> {
        let mut dropped = Vec::new();
        for set in ep.sets() {
            let n = self.refs.entry(set.clone()).or_default();
            *n = n.saturating_add_signed(by);
            if *n == 0 {
                self.refs.remove(set);
                self.sets.remove(set);
                self.defs.remove(set);
                dropped.push(set.clone());
            }
        }
        for g in &ep.groups {
            let n = self.group_refs.entry(g.clone()).or_default();
            *n = n.saturating_add_signed(by);
            if *n == 0 {
                self.group_refs.remove(g);
                // A number's set that appeared after the last reader built its rules (a pod
                // declaring the port joined in the same change) is named by no rule: it goes
                // with the group.
                if let Some(group) = self.groups.remove(g) {
                    for (_, set) in group.numbers {
                        if !self.refs.contains_key(&set) && self.sets.remove(&set).is_some() {
                            self.defs.remove(&set);
                            dropped.push(set);
                        }
                    }
                }
            }
        }
        dropped
    }
}

/// The index's [`SetSource`]: existing sets by name; a new one filled from every pod.
struct IndexSource<'a> {
    sets: &'a mut Sets,
    pods: &'a HashMap<String, StoredPod>,
    namespaces: &'a HashMap<String, BTreeMap<String, String>>,
    used: Vec<GroupKey>,
    delta: &'a mut PolicyDelta,
}

impl IndexSource<'_> {
    /// Every pod address `def` holds.
    fn fill(&self, def: &SetDef) -> Vec<IpAddr> {
        self.pods
            .values()
            .flat_map(|p| {
                let l = self.namespaces.get(&*p.namespace).unwrap_or(&NO_LABELS);
                def.addrs_of(&p.view(), l).collect::<Vec<_>>()
            })
            .collect()
    }
}

impl SetSource for IndexSource<'_> {
    fn peer_set(&mut self, _at: PeerRef, policy_ns: &str, peer: &NetworkPolicyPeer) -> String {
        let key = peer_key(policy_ns, peer);
        let name = set_name(&key);
        if !self.sets.sets.contains_key(&name) {
            let set = match &peer.ip_block {
                Some(b) => block_set(key, b),
                None => {
                    let def = SetDef {
                        policy_ns: policy_ns.to_string(),
                        peer: Some(peer.clone()),
                        named: None,
                    };
                    let set = pod_set(key, hosts(self.fill(&def)));
                    self.sets.defs.insert(name.clone(), def);
                    set
                }
            };
            self.sets.sets.insert(name.clone(), set);
            self.delta.set_created(&name);
        }
        name
    }

    fn named_sets(
        &mut self,
        _at: Option<PeerRef>,
        policy_ns: &str,
        peer: Option<&NetworkPolicyPeer>,
        proto: Protocol,
        name: &str,
    ) -> Vec<(u16, String)> {
        let gk: GroupKey = (named_base(policy_ns, peer), proto, name.to_string());
        self.used.push(gk.clone());
        if let Some(g) = self.sets.groups.get(&gk) {
            return g.numbers.clone();
        }
        let base = SetDef {
            policy_ns: policy_ns.to_string(),
            peer: peer.cloned(),
            named: None,
        };
        let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
        for p in self.pods.values() {
            let p = p.view();
            let l = self.namespaces.get(&*p.namespace).unwrap_or(&NO_LABELS);
            let addrs: Vec<IpAddr> = base.addrs_of(&p, l).collect();
            if addrs.is_empty() {
                continue;
            }
            for k in p.named_port(name, proto) {
                by_port.entry(k).or_default().extend(&addrs);
            }
        }
        let mut numbers = Vec::with_capacity(by_port.len());
        for (k, ips) in by_port {
            let key = named_set_key(&gk.0, proto, name, k);
            let set = set_name(&key);
            if !self.sets.sets.contains_key(&set) {
                self.sets.sets.insert(set.clone(), pod_set(key, hosts(ips)));
                self.sets.defs.insert(
                    set.clone(),
                    SetDef {
                        named: Some((proto, name.to_string(), k)),
                        ..base.clone()
                    },
                );
                self.delta.set_created(&set);
            }
            numbers.push((k, set));
        }
        self.sets.groups.insert(
            gk,
            NamedGroup {
                policy_ns: policy_ns.to_string(),
                peer: peer.cloned(),
                numbers: numbers.clone(),
            },
        );
        numbers
    }
}

#[cfg(test)]
mod interning_tests {
    use super::*;

    fn pod(name: &str, app: &str, ip: &str) -> PolicyPod<'static> {
        PolicyPod {
            namespace: Cow::Owned("shop".into()),
            name: Cow::Owned(name.into()),
            labels: Cow::Owned([("app".to_string(), app.to_string())].into()),
            ips: vec![ip.parse().unwrap()],
            node: Cow::Owned("n1".into()),
            ports: Cow::Owned(vec![]),
            host_ifname: Cow::Owned(format!("mla{name}")),
        }
    }

    /// Pods of one workload share one copy of their labels, and the last pod to go takes the
    /// shared copies with it (churn leaves nothing behind).
    #[test]
    fn shared_values_are_kept_once_and_released_with_their_last_pod() {
        let pods = [
            pod("a", "web", "198.18.0.1"),
            pod("b", "web", "198.18.0.2"),
            pod("c", "db", "198.18.0.3"),
        ];
        let mut index = PolicyIndex::new("n1", &[], &[], &pods);
        assert_eq!(index.interned.labels.len(), 2);
        assert_eq!(index.interned.names.len(), 2, "namespace and node");
        // A label change moves the pod to another shared map; the old one stays for b.
        index.upsert_pod(&pod("a", "db", "198.18.0.1"));
        assert_eq!(index.interned.labels.len(), 2);
        index.upsert_pod(&pod("b", "api", "198.18.0.2"));
        assert_eq!(index.interned.labels.len(), 2, "web is gone, api came");
        for name in ["a", "b", "c"] {
            index.remove_pod("shop", name);
        }
        assert!(index.pods.is_empty());
        assert!(index.interned.labels.is_empty());
        assert!(index.interned.names.is_empty());
        assert!(index.interned.ports.is_empty());
    }
}
