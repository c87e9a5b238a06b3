//! The agent's copy of the cluster, kept current by the datastore's
//! [`malla_store::Syncer`] (typed records, then `InSync`; [`Mirror::apply_sync`]), so a change
//! elsewhere in the cluster costs a node the change (replace one entry), not a re-read of every
//! record. [`Mirror::load`] and [`Mirror::apply`] build the same copy from a list and the
//! key-value watch ([`crate::read_view`], tests).
//!
//! The copy is the calculation's [`ClusterView`] itself, each kind kept in key order (the
//! order a list returns), so a view built by events equals one built by [`crate::read_view`]
//! at the same revision. Only what the calculation reads is kept: every IPAM block is a
//! `(cidr, affinity)` pair, except this node's own blocks, kept whole for the node IPAM cache.
//! Services and EndpointSlices are kept as the proxy reads them ([`ProxyService`],
//! [`ProxySlice`]: 24 bytes an endpoint): at 300k endpoints they are most of the agent's memory.
//! A malformed record is skipped with a warning naming its key; the rest of the cluster keeps
//! working.

use std::collections::{BTreeMap, BTreeSet};

use malla_api::policy::NetworkPolicy;
use malla_api::{keys, Namespace, Node, Pod, WorkloadEndpoint};
use malla_calc::links::LinksNode;
use malla_calc::policy::PolicyInputs;
use malla_calc::services::{ProxyService, ProxySlice};
use malla_calc::ClusterView;
use malla_ipam::Block;
use malla_store::{Event, KeyValue, Resource, Revision, Store, StoreError, SyncEvent};

/// The record of the expected kind, or None when deleted, or when another kind came for the
/// key (warned about, naming the key).
macro_rules! take {
    ($key:expr, $value:expr, $variant:ident) => {
        match $value {
            None => None,
            Some(Resource::$variant(x)) => Some(x),
            Some(_) => {
                tracing::warn!(key = %$key, "a record of another kind at this key; skipped");
                None
            }
        }
    };
}

/// The prefix the mirror watches.
pub const WATCH_PREFIX: &str = "/";

/// The keys of one kind, sorted, parallel to the view's vector of that kind, each kept without
/// the prefix every key of the kind shares (at 30k Services and 30k EndpointSlices the keys
/// were ~5 MiB of the agent).
#[derive(Debug)]
struct Keys {
    /// Where the kind lives; a key without it is not of the kind.
    prefix: &'static str,
    /// The items carry their own key's tail (read by the `tail_of` given to the `_by`
    /// methods): no copy is kept.
    in_items: bool,
    tails: Vec<Box<str>>,
}

/// Services: the key's tail is `namespace/name`, the service's own key.
fn service_tail(s: &ProxyService) -> &str {
    &s.key
}

impl Keys {
    fn new(prefix: &'static str) -> Keys {
        Keys {
            prefix,
            in_items: false,
            tails: Vec::new(),
        }
    }

    /// Keys whose tail the items hold (read by `tail_of`).
    fn in_items(prefix: &'static str) -> Keys {
        Keys {
            in_items: true,
            ..Keys::new(prefix)
        }
    }

    fn find<T>(&self, items: &[T], tail: &str, tail_of: fn(&T) -> &str) -> Result<usize, usize> {
        if self.in_items {
            items.binary_search_by(|t| tail_of(t).cmp(tail))
        } else {
            self.tails.binary_search_by(|k| (**k).cmp(tail))
        }
    }

    /// The item at `key` (keys kept here, not in the items).
    fn get<'a, T>(&self, items: &'a [T], key: &str) -> Option<&'a T> {
        debug_assert!(!self.in_items, "{}: use get_by", self.prefix);
        self.get_by(items, key, |_| "")
    }

    fn get_by<'a, T>(&self, items: &'a [T], key: &str, tail_of: fn(&T) -> &str) -> Option<&'a T> {
        let tail = key.strip_prefix(self.prefix)?;
        let i = self.find(items, tail, tail_of).ok()?;
        items.get(i)
    }

    /// Sets (Some) or removes (None) `key`'s item; returns whether the view changed (keys
    /// kept here, not in the items).
    fn upsert<T: PartialEq>(&mut self, items: &mut Vec<T>, key: &str, item: Option<T>) -> bool {
        debug_assert!(!self.in_items, "{}: use upsert_by", self.prefix);
        self.upsert_by(items, key, item, |_| "")
    }

    fn upsert_by<T: PartialEq>(
        &mut self,
        items: &mut Vec<T>,
        key: &str,
        item: Option<T>,
        tail_of: fn(&T) -> &str,
    ) -> bool {
        let Some(tail) = key.strip_prefix(self.prefix) else {
            return false;
        };
        // An item that names another key would break the order: it is not this key's.
        let item = item.filter(|t| {
            let fits = !self.in_items || tail_of(t) == tail;
            if !fits {
                tracing::warn!(%key, "a record whose name differs from its key; skipped");
            }
            fits
        });
        match (self.find(items, tail, tail_of), item) {
            (Ok(i), Some(t)) => {
                if items[i] == t {
                    return false;
                }
                items[i] = t;
            }
            (Ok(i), None) => {
                if !self.in_items {
                    self.tails.remove(i);
                }
                items.remove(i);
            }
            (Err(i), Some(t)) => {
                if !self.in_items {
                    self.tails.insert(i, tail.into());
                }
                items.insert(i, t);
            }
            (Err(_), None) => return false,
        }
        true
    }
}

/// What one batch of events changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The calculation's input changed: compute and apply the dataplane again.
    pub view: bool,
    /// This node's own blocks, its node record or the cluster config changed: refresh the
    /// node IPAM cache.
    pub node_cache: bool,
    /// Services (`namespace/name`) whose Service or EndpointSlices changed.
    pub services: BTreeSet<String>,
    /// The policy program's inputs that changed (pods by their object or endpoint record,
    /// NetworkPolicies, Namespaces), by key: what the agent's policy node follows.
    pub policy: PolicyInputs,
    /// A node record, a block's affinity or an endpoint record changed: the mirror's
    /// [`LinksNode`] has a delta to hand over ([`Mirror::links_mut`]).
    pub links: bool,
    /// An IP pool changed: the table's pool sets follow ([`malla_calc::masquerade::pools_patch`]).
    pub pools: bool,
    /// This node's own record changed: its addresses in the service map (informational) and
    /// the links (see `links`) follow.
    pub own_node: bool,
    /// Something else the calculation reads changed (the cluster config): the whole node is
    /// computed again.
    pub other: bool,
}

impl Applied {
    fn merge(&mut self, o: Applied) {
        self.view |= o.view;
        self.node_cache |= o.node_cache;
        self.services.extend(o.services);
        self.policy.extend(o.policy);
        self.links |= o.links;
        self.pools |= o.pools;
        self.own_node |= o.own_node;
        self.other |= o.other;
    }
}

/// The cluster as this node knows it.
pub struct Mirror {
    node: String,
    view: ClusterView,
    own_blocks: BTreeMap<String, Block>,
    /// The calculation's links node, fed each node, block and endpoint change as it is applied.
    links: LinksNode,
    revision: Revision,
    nodes: Keys,
    pools: Keys,
    blocks: Keys,
    endpoints: Keys,
    services: Keys,
    slices: Keys,
    pods: Keys,
    namespaces: Keys,
    policies: Keys,
    tiers: Keys,
    global_policies: Keys,
    host_endpoints: Keys,
    network_sets: Keys,
    calico_policies: Keys,
    cluster_policies: Keys,
    staged: Keys,
}

impl Mirror {
    /// An empty mirror, to be filled by a [`malla_store::Syncer`] ([`Mirror::apply_sync`]).
    pub fn new(node: &str) -> Mirror {
        Mirror {
            node: node.to_string(),
            view: ClusterView::default(),
            own_blocks: BTreeMap::new(),
            links: LinksNode::new(node, malla_api::RoutingMode::default()),
            revision: 0,
            nodes: Keys::new(keys::NODES),
            pools: Keys::new(keys::POOLS),
            blocks: Keys::new(keys::BLOCKS),
            endpoints: Keys::new(keys::ENDPOINTS),
            services: Keys::in_items(keys::SERVICES),
            slices: Keys::new(keys::ENDPOINT_SLICES),
            pods: Keys::new(keys::PODS),
            namespaces: Keys::new(keys::NAMESPACES),
            policies: Keys::new(keys::NETWORK_POLICIES),
            tiers: Keys::new(keys::TIERS),
            global_policies: Keys::new(keys::GLOBAL_NETWORK_POLICIES),
            host_endpoints: Keys::new(keys::HOST_ENDPOINTS),
            network_sets: Keys::new(keys::GLOBAL_NETWORK_SETS),
            calico_policies: Keys::new(keys::CALICO_NETWORK_POLICIES),
            cluster_policies: Keys::new(keys::CLUSTER_NETWORK_POLICIES),
            staged: Keys::new(keys::STAGED_POLICIES),
        }
    }

    /// Lists every kind the calculation reads. The mirror's revision is the oldest of the
    /// lists' revisions, so a watch from it replays whatever changed during the listing.
    pub fn load(store: &dyn Store, node: &str) -> Result<Mirror, StoreError> {
        let mut m = Mirror::new(node);
        m.revision = Revision::MAX;
        // Every prefix a syncer follows; the watch covers the whole key space (`/`), so it
        // also sees the writes that carry no record of these kinds and the revision keeps up.
        for prefix in malla_api::kinds::synced() {
            let (kvs, rev) = store.list(prefix)?;
            m.revision = m.revision.min(rev);
            for kv in kvs {
                m.put(&kv);
            }
        }
        if m.revision == Revision::MAX {
            m.revision = store.revision()?;
        }
        Ok(m)
    }

    /// The newest revision the mirror reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The calculation's input, owned.
    pub fn into_view(self) -> ClusterView {
        self.view
    }

    /// The calculation's input.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The links node (routes, VXLAN peers, local pods), current with the mirror.
    pub fn links_mut(&mut self) -> &mut LinksNode {
        &mut self.links
    }

    /// This node's record, if registered.
    pub fn me(&self) -> Option<&Node> {
        self.view.nodes.iter().find(|n| n.name == self.node)
    }

    /// The blocks affine to this node, whole.
    pub fn own_blocks(&self) -> impl Iterator<Item = &Block> {
        self.own_blocks.values()
    }

    /// Applies a batch of changes in order.
    pub fn apply(&mut self, events: Vec<Event>) -> Applied {
        let mut changed = Applied::default();
        for e in events {
            self.revision = self.revision.max(e.revision());
            changed.merge(match &e {
                Event::Put(kv) => self.put(kv),
                Event::Delete { key, .. } => self.delete(key),
            });
        }
        changed
    }

    /// Applies a syncer's batch in order: typed records, no decoding. Returns what changed and
    /// whether the batch said the feed is in sync (the mirror then holds the whole cluster).
    pub fn apply_sync(&mut self, events: Vec<SyncEvent>) -> (Applied, bool) {
        let mut changed = Applied::default();
        let mut in_sync = false;
        for e in events {
            match e {
                SyncEvent::InSync => in_sync = true,
                SyncEvent::Update(u) => changed.merge(self.set(&u.key, u.resource)),
            }
        }
        (changed, in_sync)
    }

    fn put(&mut self, kv: &KeyValue) -> Applied {
        let record = match Resource::from_json(&kv.key, &kv.value) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(key = %kv.key, error = %e, "skipping a malformed record");
                None
            }
        };
        self.set(&kv.key, record)
    }

    fn delete(&mut self, key: &str) -> Applied {
        self.set(key, None)
    }

    /// Sets or removes the record at `key` (an unknown key changes nothing).
    fn set(&mut self, key: &str, record: Option<Resource>) -> Applied {
        let mut applied = self.set_record(key, record);
        if applied.view
            && applied.services.is_empty()
            && applied.policy.is_empty()
            && !applied.links
            && !applied.pools
            && !applied.own_node
        {
            applied.other = true;
        }
        applied
    }

    fn set_record(&mut self, key: &str, value: Option<Resource>) -> Applied {
        let v = &mut self.view;
        if key.starts_with(keys::SERVICES) {
            let svc = take!(key, value, Service).map(|s| ProxyService::from(&s));
            let before = self
                .services
                .get_by(&v.services, key, service_tail)
                .map(|s| s.key.to_string());
            let after = svc.as_ref().map(|s| s.key.to_string());
            let changed = self
                .services
                .upsert_by(&mut v.services, key, svc, service_tail);
            return service_change(changed, before, after);
        }
        if key.starts_with(keys::ENDPOINT_SLICES) {
            let slice = take!(key, value, EndpointSlice).map(|s| ProxySlice::from(&s));
            let owner = |s: &ProxySlice| s.service.to_string();
            let before = self.slices.get(&v.endpoint_slices, key).map(owner);
            let after = slice.as_ref().map(owner);
            let changed = self.slices.upsert(&mut v.endpoint_slices, key, slice);
            return service_change(changed, before, after);
        }
        if key == keys::CLUSTER_CONFIG {
            let config = take!(key, value, ClusterConfig).unwrap_or_default();
            let changed = v.config != config;
            v.config = config;
            if !self.links.follows(v.config.routing) {
                // Another routing mode: other routes and peers everywhere, built again.
                self.links = LinksNode::from_view(v, &self.node);
            }
            return Applied {
                view: changed,
                node_cache: changed,
                ..Applied::default()
            };
        }
        if key.starts_with(keys::NODES) {
            let node = take!(key, value, Node);
            let before = self.nodes.get(&v.nodes, key).cloned();
            let mine = node.as_ref().is_some_and(|n| n.name == self.node)
                || before.as_ref().is_some_and(|n| n.name == self.node)
                || key == keys::node(&self.node);
            self.links.node(before.as_ref(), node.as_ref());
            let changed = self.nodes.upsert(&mut v.nodes, key, node);
            // This node's own addresses are its services' node addresses (informational: no
            // rule reads them).
            return Applied {
                view: changed,
                node_cache: changed && mine,
                links: changed,
                own_node: changed && mine,
                ..Applied::default()
            };
        }
        if key.starts_with(keys::BLOCKS) {
            return self.set_block(key, value);
        }
        if key.starts_with(keys::POOLS) {
            let changed = self
                .pools
                .upsert(&mut v.pools, key, take!(key, value, Pool));
            return Applied {
                view: changed,
                pools: changed,
                ..Applied::default()
            };
        }
        let mut policy = PolicyInputs::default();
        let mut guard = false;
        let changed = if key.starts_with(keys::ENDPOINTS) {
            let ep = take!(key, value, WorkloadEndpoint);
            let pod = |e: &WorkloadEndpoint| (e.namespace.clone(), e.pod.clone());
            let old = self.endpoints.get(&v.endpoints, key);
            self.links.endpoint(old, ep.as_ref());
            let before = old.map(pod);
            let after = ep.as_ref().map(pod);
            let changed = self.endpoints.upsert(&mut v.endpoints, key, ep);
            // Routes and local pods read endpoint records too: the links node follows them.
            return Applied {
                view: changed,
                links: changed,
                policy: PolicyInputs {
                    pods: if changed {
                        before.into_iter().chain(after).collect()
                    } else {
                        BTreeSet::new()
                    },
                    ..PolicyInputs::default()
                },
                ..Applied::default()
            };
        } else if key.starts_with(keys::PODS) {
            let pod = take!(key, value, Pod);
            let id = |p: &Pod| (p.namespace.clone(), p.name.clone());
            let old = self.pods.get(&v.pods, key);
            // A pod's allowed source prefixes: the links node's anti-spoofing follows them.
            guard = self.links.pod(old, pod.as_ref());
            policy.pods.extend(old.map(id));
            policy.pods.extend(pod.as_ref().map(id));
            self.pods.upsert(&mut v.pods, key, pod)
        } else if key.starts_with(keys::NAMESPACES) {
            let ns = take!(key, value, Namespace);
            let id = |n: &Namespace| n.name.clone();
            policy
                .namespaces
                .extend(self.namespaces.get(&v.namespaces, key).map(id));
            policy.namespaces.extend(ns.as_ref().map(id));
            self.namespaces.upsert(&mut v.namespaces, key, ns)
        } else if key.starts_with(keys::NETWORK_POLICIES) {
            let np = take!(key, value, NetworkPolicy);
            let id = |p: &NetworkPolicy| (p.namespace.clone(), p.name.clone());
            policy
                .policies
                .extend(self.policies.get(&v.policies, key).map(id));
            policy.policies.extend(np.as_ref().map(id));
            self.policies.upsert(&mut v.policies, key, np)
        } else if key.starts_with(keys::TIERS) {
            // Calico's objects: the host endpoint policy is rendered with the whole node.
            let t = take!(key, value, Tier);
            self.tiers.upsert(&mut v.calico.tiers, key, t)
        } else if key.starts_with(keys::GLOBAL_NETWORK_POLICIES) {
            let p = take!(key, value, GlobalNetworkPolicy);
            self.global_policies.upsert(&mut v.calico.policies, key, p)
        } else if key.starts_with(keys::HOST_ENDPOINTS) {
            let h = take!(key, value, HostEndpoint);
            self.host_endpoints
                .upsert(&mut v.calico.host_endpoints, key, h)
        } else if key.starts_with(keys::GLOBAL_NETWORK_SETS) {
            let n = take!(key, value, GlobalNetworkSet);
            self.network_sets.upsert(&mut v.calico.network_sets, key, n)
        } else if key.starts_with(keys::CALICO_NETWORK_POLICIES) {
            let p = take!(key, value, CalicoNetworkPolicy);
            self.calico_policies
                .upsert(&mut v.calico.network_policies, key, p)
        } else if key.starts_with(keys::CLUSTER_NETWORK_POLICIES) {
            let p = take!(key, value, ClusterNetworkPolicy);
            self.cluster_policies
                .upsert(&mut v.calico.cluster_policies, key, p)
        } else if key.starts_with(keys::STAGED_POLICIES) {
            let p = take!(key, value, StagedPolicy);
            self.staged.upsert(&mut v.calico.staged, key, p)
        } else {
            false
        };
        Applied {
            view: changed,
            links: guard,
            policy: if changed {
                policy
            } else {
                PolicyInputs::default()
            },
            ..Applied::default()
        }
    }

    /// A block: the view keeps `(cidr, affinity)`, so an allocation elsewhere in the cluster
    /// (the common write) changes nothing here; this node's blocks are kept whole.
    fn set_block(&mut self, key: &str, value: Option<Resource>) -> Applied {
        let block = take!(key, value, Block).and_then(|v| {
            serde_json::from_value::<Block>(serde_json::Value::Object(v))
                .map_err(|e| tracing::warn!(%key, error = %e, "skipping a malformed block"))
                .ok()
        });
        let summary = block.as_ref().map(|b| (b.cidr, b.affinity.clone()));
        let before = self.blocks.get(&self.view.blocks, key).cloned();
        self.links.block(before.as_ref(), summary.as_ref());
        let view = self.blocks.upsert(&mut self.view.blocks, key, summary);
        let node_cache = match block {
            Some(b) if b.affinity.as_deref() == Some(self.node.as_str()) => {
                let changed = self.own_blocks.get(key) != Some(&b);
                self.own_blocks.insert(key.to_string(), b);
                changed
            }
            _ => self.own_blocks.remove(key).is_some(),
        };
        Applied {
            view,
            node_cache,
            links: view,
            ..Applied::default()
        }
    }
}

/// A change to a Service or EndpointSlice: the services it belonged to and belongs to.
fn service_change(changed: bool, before: Option<String>, after: Option<String>) -> Applied {
    Applied {
        view: changed,
        services: if changed {
            before.into_iter().chain(after).collect()
        } else {
            BTreeSet::new()
        },
        ..Applied::default()
    }
}

#[cfg(test)]
mod tests;
