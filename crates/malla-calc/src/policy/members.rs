//! The policy member path: the agent's normal path for a change that only moves addresses in
//! and out of peer sets (a pod's labels entering or leaving a selector, a namespace's labels).
//!
//! [`PolicyNode`] keeps the node's [`PolicyIndex`] (one full compile when it is built, at the
//! agent's first full apply), follows each batch's changed policy inputs ([`PolicyInputs`]: keys
//! the agent's mirror reports) from the cluster view — on the full path too, whose policy
//! program is then the node's rather than a new compile — and when the resulting [`PolicyDelta`] only changes
//! set members, [`plan_member_changes`] turns it into element changes of the applied table —
//! each touched set per family as [`render`](super::render) names it, and every union set it is
//! matched through — made to that table with their undo, as the services endpoint plan is
//! ([`crate::services::plan_service_changes`]). The driver sends them as an
//! `Update::Endpoints`. Anything else (a program changed, a set created or dropped: a policy
//! created or deleted, a new local pod a policy selects) re-renders the policy part of the
//! table alone from the node's program and patches the objects that differ
//! ([`policy_patch`]): work in the size of the policy program, not of the node's services.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ipnet::IpNet;
use malla_api::WorkloadEndpoint;

use super::addrs::nft_element;
use super::render::{rendered_sets, RenderedSets};
use super::tiermembers::{self, PodChange, TierDefs};
use super::{PolicyDelta, PolicyIndex, PolicyProgram};
use crate::nft::patch::Patch;
use crate::nft::Table;
use crate::services::{EndpointDelta, EndpointPlan};
use crate::ClusterView;

/// What a batch changed among the policy program's inputs, by key (the agent's mirror reports
/// them; nothing is copied).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyInputs {
    /// Pods (`namespace`, `name`) whose object or endpoint record changed.
    pub pods: BTreeSet<(String, String)>,
    /// NetworkPolicies (`namespace`, `name`).
    pub policies: BTreeSet<(String, String)>,
    /// Namespaces (their labels).
    pub namespaces: BTreeSet<String>,
}

impl PolicyInputs {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.policies.is_empty() && self.namespaces.is_empty()
    }

    pub fn extend(&mut self, o: PolicyInputs) {
        self.pods.extend(o.pods);
        self.policies.extend(o.policies);
        self.namespaces.extend(o.namespaces);
    }

    pub fn clear(&mut self) {
        *self = PolicyInputs::default();
    }
}

/// Above this many changed pods in one batch, their records are found through a map of the
/// view rather than by walking it once each.
const WALK_UP_TO: usize = 8;

/// The calculation graph's policy node as the agent keeps it: the index, and which sets the
/// render of its program writes (found when first needed, kept while only members change).
#[derive(Debug)]
pub struct PolicyNode {
    index: PolicyIndex,
    rendered: Option<RenderedSets>,
    /// False when the view had two endpoint records for one pod (one moving between nodes):
    /// the index, keyed by pod, cannot follow that; only full computes can.
    followable: bool,
    /// The tier selector sets' definitions (read from the Calico objects when first needed;
    /// [`PolicyNode::calico_changed`] drops them).
    tier_defs: Option<TierDefs>,
}

impl PolicyNode {
    /// The node's policy program for `view`: one full compile.
    pub fn new(view: &ClusterView, node: &str) -> Self {
        let pods = crate::routes::policy_pods(view);
        let mut seen = HashSet::with_capacity(pods.len());
        let followable = pods.iter().all(|p| seen.insert((&p.namespace, &p.name)));
        PolicyNode {
            index: PolicyIndex::new(node, &view.policies, &view.namespaces, &pods),
            rendered: None,
            followable,
            tier_defs: None,
        }
    }

    /// The whole program, as `compile` gives it for the view the node follows.
    pub fn program(&self) -> PolicyProgram {
        self.index.program()
    }

    /// Feeds the index the changed inputs as `view` now has them; returns what the batch did
    /// to the program, or None when the node cannot follow (it must then be built again).
    /// Following the same inputs again changes nothing.
    pub fn follow(&mut self, view: &ClusterView, changed: &PolicyInputs) -> Option<PolicyDelta> {
        if !self.followable {
            return None;
        }
        let index = &mut self.index;
        let mut delta = PolicyDelta::default();
        for name in &changed.namespaces {
            let labels = view.namespaces.iter().find(|n| n.name == *name);
            delta.merge(index.set_namespace(name, labels.map(|n| &n.labels)));
        }
        for (ns, name) in &changed.policies {
            let policy = view
                .policies
                .iter()
                .find(|p| p.namespace == *ns && p.name == *name);
            delta.merge(match policy {
                Some(p) => index.upsert_policy(p),
                None => index.remove_policy(ns, name),
            });
        }
        for ((ns, name), eps, pod) in pod_records(view, changed) {
            delta.merge(match eps.as_slice() {
                [] => index.remove_pod(ns, name),
                [ep] => index.upsert_pod(&crate::routes::policy_pod(ep, pod)),
                _ => {
                    self.followable = false;
                    return None;
                }
            });
        }
        if !delta.members_only() {
            // Programs or sets changed: the render groups sets differently.
            self.rendered = None;
        }
        Some(delta)
    }

    /// The Calico objects (or anything the tier chains read besides pods) may have changed:
    /// the tier member path reads their selector sets again when next needed. The agent calls
    /// it whenever it computes the whole node.
    pub fn calico_changed(&mut self) {
        self.tier_defs = None;
    }

    /// The member path with tiered policy ([`super::tiermembers`]): follows `changed` (pods
    /// alone) and plans, against `table` (the node's table as last applied, a whole-node
    /// render with tier chains), the element changes of the NetworkPolicy sets and of the tier
    /// chains' selector sets, making them to the table. None, with `table` as it was, when the
    /// change needs the whole node computed (the index may then have followed it: following
    /// the same inputs again changes nothing).
    pub fn plan_tiered(
        &mut self,
        view: &ClusterView,
        changed: &PolicyInputs,
        table: &mut Table,
    ) -> Option<EndpointPlan> {
        if !self.followable || !tiermembers::followable(view, changed) {
            return None;
        }
        let defs = self
            .tier_defs
            .get_or_insert_with(|| TierDefs::of(&view.calico));
        let mut changes = Vec::with_capacity(changed.pods.len());
        for ((ns, name), eps, pod) in pod_records(view, changed) {
            let new = match eps.as_slice() {
                [] => None,
                [ep] => Some(crate::routes::policy_pod(ep, pod)),
                _ => return None,
            };
            changes.push(PodChange {
                old: self.index.pod(ns, name),
                new,
            });
        }
        let sets = tiermembers::plan_sets(defs, view, self.index.node(), &changes, table)?;
        drop(changes);
        let delta = self.follow(view, changed)?;
        if !delta.members_only() {
            return None;
        }
        let mut plan = self.plan(table, &delta)?;
        if !(sets.before.sets.is_empty() && sets.after.sets.is_empty()) {
            sets.apply_to(table);
            plan.changes.extend(EndpointPlan::patch(sets).changes);
        }
        Some(plan)
    }

    /// Plans the policy part of `table` (the node's table as last applied, rendered from
    /// another program or none) as a render of this node's program, making it to the table: a
    /// node just built, e.g. for the first NetworkPolicy.
    pub fn plan_render(&mut self, table: &mut Table) -> EndpointPlan {
        let patch = policy_patch(table, &self.index.program());
        patch.apply_to(table);
        self.rendered = None;
        EndpointPlan::patch(patch)
    }

    /// Plans `delta` (what [`PolicyNode::follow`] returned) against `table`, the node's table
    /// as last applied, making it to the table: set members in place (see
    /// [`plan_member_changes`]), else a patch of the policy objects that differ from a render
    /// of the node's program ([`policy_patch`]). None when the member change cannot be made
    /// in place.
    pub fn plan(&mut self, table: &mut Table, delta: &PolicyDelta) -> Option<EndpointPlan> {
        if !delta.members_only() {
            return Some(self.plan_render(table));
        }
        let index = &self.index;
        let rendered = self
            .rendered
            .get_or_insert_with(|| rendered_sets(index.endpoints(), index.sets()));
        plan_member_changes(table, index, rendered, delta)
    }
}

/// The endpoint records and pod object of each changed pod in `view`.
#[allow(clippy::type_complexity)]
fn pod_records<'c, 'v>(
    view: &'v ClusterView,
    changed: &'c PolicyInputs,
) -> Vec<(
    (&'c str, &'c str),
    Vec<&'v WorkloadEndpoint>,
    Option<&'v malla_api::Pod>,
)> {
    let walk = changed.pods.len() <= WALK_UP_TO;
    let mut records: HashMap<(&str, &str), Vec<&WorkloadEndpoint>> = HashMap::new();
    let mut objects: HashMap<(&str, &str), &malla_api::Pod> = HashMap::new();
    if !walk {
        for ep in &view.endpoints {
            records
                .entry((&ep.namespace, &ep.pod))
                .or_default()
                .push(ep);
        }
        objects.extend(view.pods.iter().map(|p| ((&*p.namespace, &*p.name), p)));
    }
    changed
        .pods
        .iter()
        .map(|(ns, name)| {
            let key = (ns.as_str(), name.as_str());
            if walk {
                let eps: Vec<&WorkloadEndpoint> = view
                    .endpoints
                    .iter()
                    .filter(|e| e.namespace == *ns && e.pod == *name)
                    .collect();
                let pod = view
                    .pods
                    .iter()
                    .find(|p| p.namespace == *ns && p.name == *name);
                (key, eps, pod)
            } else {
                let eps = records.get(&key).cloned().unwrap_or_default();
                (key, eps, objects.get(&key).copied())
            }
        })
        .collect()
}

/// Whether an object of the node's table is the policy render's (see [`super::render`]).
pub fn is_policy_object(name: &str) -> bool {
    name.starts_with("pol-")
        || name == super::render::POLICY_FORWARD
        || name == super::render::POLICY_INPUT
}

/// The patch that makes the policy part of `table` a render of `program`: every policy object
/// that differs, whole, before and after (the services' objects are left alone).
pub fn policy_patch(table: &Table, program: &PolicyProgram) -> Patch {
    let mut now = Table::new(&table.family, &table.name);
    super::render_policy(program, &mut now);
    let mut patch = Patch::new(&table.family, &table.name);
    fn changed<T: Clone + PartialEq>(
        held: &BTreeMap<String, T>,
        wanted: &BTreeMap<String, T>,
        before: &mut BTreeMap<String, T>,
        after: &mut BTreeMap<String, T>,
    ) {
        let ours = held
            .range::<str, _>((
                std::ops::Bound::Included("pol-"),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(n, _)| n.starts_with("pol-"))
            .chain(held.get_key_value(super::render::POLICY_FORWARD))
            .chain(held.get_key_value(super::render::POLICY_INPUT));
        for (n, x) in ours {
            if wanted.get(n) != Some(x) {
                before.insert(n.clone(), x.clone());
            }
        }
        for (n, x) in wanted {
            if held.get(n) != Some(x) {
                after.insert(n.clone(), x.clone());
            }
        }
    }
    changed(
        &table.chains,
        &now.chains,
        &mut patch.before.chains,
        &mut patch.after.chains,
    );
    changed(
        &table.sets,
        &now.sets,
        &mut patch.before.sets,
        &mut patch.after.sets,
    );
    changed(
        &table.maps,
        &now.maps,
        &mut patch.before.maps,
        &mut patch.after.maps,
    );
    patch
}

/// Plans the element changes that take `table` (a render of the program before `delta`) to a
/// render of `index`'s program, `delta` being the change between the two and only moving set
/// members; `rendered` says which sets that render writes (unchanged by such a change). Every
/// address `delta` names is looked up in the sets as `index` has them now: in each touched set
/// (`<set>-v4` / `-v6`) and in each union set one of its members is matched through. The
/// changes are made to `table`; the plan's undo puts it back. None, with `table` as it was,
/// when `delta` is more than members or the table lacks a set the render writes.
pub fn plan_member_changes(
    table: &mut Table,
    index: &PolicyIndex,
    rendered: &RenderedSets,
    delta: &PolicyDelta,
) -> Option<EndpointPlan> {
    if !delta.members_only() {
        return None;
    }
    let mut touched: BTreeMap<&str, BTreeSet<IpNet>> = BTreeMap::new();
    for (set, addrs) in delta.members_added.iter().chain(&delta.members_removed) {
        touched
            .entry(set.as_str())
            .or_default()
            .extend(addrs.iter().copied());
    }
    let holds = |set: &str, a: &IpNet| {
        index
            .set(set)
            .is_some_and(|s| s.addrs.binary_search(a).is_ok())
    };
    let mut out = EndpointDelta::default();
    for (set, addrs) in &touched {
        // A set the NetworkPolicy render does not match may still be in the table: the tier
        // chains match a Kubernetes policy's sets one by one ([`super::tiers`]).
        let used = rendered.used.contains(*set);
        for a in addrs {
            if used || table.sets.contains_key(&family_set(set, a)) {
                element(table, set, a, holds(set, a), &mut out)?;
            }
        }
    }
    for (union, members) in &rendered.unions {
        let addrs: BTreeSet<&IpNet> = members
            .iter()
            .filter_map(|m| touched.get(m.as_str()))
            .flatten()
            .collect();
        for a in addrs {
            let want = members.iter().any(|m| holds(m, a));
            element(table, union, a, want, &mut out)?;
        }
    }
    let undo = out.apply_to(table);
    Some(EndpointPlan::elements(out, undo))
}

/// The table set of `set` for `a`'s family.
fn family_set(set: &str, a: &IpNet) -> String {
    format!("{set}-{}", if a.addr().is_ipv4() { "v4" } else { "v6" })
}

/// Adds to `out` what makes host address `a` a member of `set`'s table set of its family
/// (`want`) or not, against `table`; None when the table has no such hash set.
fn element(table: &Table, set: &str, a: &IpNet, want: bool, out: &mut EndpointDelta) -> Option<()> {
    let name = family_set(set, a);
    let s = table.sets.get(&name)?;
    if s.flags.iter().any(|f| f == "interval") || a.prefix_len() != a.max_prefix_len() {
        return None;
    }
    let e = nft_element(a);
    match (want, s.elements.contains(&e)) {
        (true, false) => out.set_added.push((name, e)),
        (false, true) => out.set_removed.push((name, e)),
        _ => {}
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use malla_api::policy::NetworkPolicy;
    use malla_api::{Namespace, Pod, WorkloadEndpoint};

    use super::*;

    const ME: &str = "me";

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Adds pod `name` of namespace `prod` on `node` with `ips` and labels `kv`.
    fn add_pod(v: &mut ClusterView, name: &str, node: &str, ips: &[&str], kv: &[(&str, &str)]) {
        v.pods.push(Pod {
            namespace: "prod".into(),
            name: name.into(),
            labels: labels(kv),
            node: node.into(),
            ports: Vec::new(),
            ips: Vec::new(),
            allowed_source_prefixes: Vec::new(),
            host_network: false,
        });
        v.endpoints.push(WorkloadEndpoint {
            namespace: "prod".into(),
            pod: name.into(),
            node: node.into(),
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            host_ifname: format!("m{name}"),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            mac: String::new(),
            ipam_handle: String::new(),
        });
    }

    fn policy(name: &str, spec: serde_json::Value) -> NetworkPolicy {
        let p = NetworkPolicy {
            namespace: "prod".into(),
            name: name.into(),
            spec: serde_json::from_value(spec).unwrap(),
        };
        assert_eq!(p.validate(), Ok(()), "{name}");
        p
    }

    /// A local web pod isolated by two policies: clients on any port (one set, matched alone),
    /// and five apps on port 80 (five sets, matched through one union set); remote pods, one
    /// of them dual-stack.
    fn view() -> ClusterView {
        let mut v = ClusterView {
            namespaces: vec![Namespace {
                name: "prod".into(),
                labels: labels(&[("team", "a")]),
            }],
            ..ClusterView::default()
        };
        add_pod(&mut v, "web", ME, &["198.18.0.2/32"], &[("app", "web")]);
        add_pod(
            &mut v,
            "c0",
            "other",
            &["198.18.1.2/32"],
            &[("role", "client")],
        );
        add_pod(
            &mut v,
            "c1",
            "other",
            &["198.18.1.3/32", "fd00::13/128"],
            &[("role", "none")],
        );
        for i in 1..=5 {
            let ip = format!("198.18.2.{i}/32");
            add_pod(
                &mut v,
                &format!("a{i}"),
                "other",
                &[&ip],
                &[("app", &format!("a{i}"))],
            );
        }
        v.policies.push(policy(
            "clients",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]
            }),
        ));
        let apps: Vec<serde_json::Value> = (1..=5)
            .map(|i| serde_json::json!({"podSelector": {"matchLabels": {"app": format!("a{i}")}}}))
            .collect();
        v.policies.push(policy(
            "apps",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{"from": apps, "ports": [{"protocol": "TCP", "port": 80}]}]
            }),
        ));
        v
    }

    fn pod_mut<'a>(v: &'a mut ClusterView, name: &str) -> &'a mut Pod {
        v.pods.iter_mut().find(|p| p.name == name).unwrap()
    }

    fn changed_pods(names: &[&str]) -> PolicyInputs {
        PolicyInputs {
            pods: names
                .iter()
                .map(|n| ("prod".to_string(), n.to_string()))
                .collect(),
            ..PolicyInputs::default()
        }
    }

    /// Label changes moving remote pods (one dual-stack) into and out of a set matched alone
    /// and sets matched through a union: the planned table equals a full computation's, and
    /// the undo puts the table back.
    #[test]
    fn a_member_change_planned_equals_a_full_render_and_undo_restores() {
        let mut v = view();
        let before = crate::compute(&v, ME).nft_table;
        let mut node = PolicyNode::new(&v, ME);
        assert_eq!(
            crate::routes::compute_with_policy(&v, ME, &node.program()).nft_table,
            before
        );
        let rendered = rendered_sets(node.index.endpoints(), node.index.sets());
        assert_eq!(rendered.unions.len(), 1, "{rendered:?}");
        assert!(rendered.unions.values().all(|m| m.len() == 5));

        pod_mut(&mut v, "c1").labels = labels(&[("role", "client"), ("app", "a3")]);
        pod_mut(&mut v, "c0").labels = labels(&[("role", "gone")]);
        pod_mut(&mut v, "a2").labels = labels(&[("app", "a4")]);
        pod_mut(&mut v, "a5").labels = labels(&[]);
        let delta = node
            .follow(&v, &changed_pods(&["c0", "c1", "a2", "a5"]))
            .unwrap();
        assert!(delta.members_only() && !delta.is_empty(), "{delta:?}");

        let mut table = before.clone();
        let plan = node.plan(&mut table, &delta).expect("a member plan");
        let want = crate::compute(&v, ME).nft_table;
        assert_ne!(want, before);
        assert_eq!(table, want);
        let c = &plan.changes[0].delta;
        assert!(c.map_values.is_empty() && c.dispatch.is_empty());
        let union = rendered.unions.keys().next().unwrap();
        let in_union = |s: &str| s.strip_suffix("-v4").or(s.strip_suffix("-v6")) == Some(union);
        assert!(c
            .set_added
            .iter()
            .any(|(s, e)| in_union(s) && e == "fd00::13"));
        assert!(c
            .set_removed
            .iter()
            .any(|(s, e)| in_union(s) && e == "198.18.2.5"));
        assert!(!c
            .set_removed
            .iter()
            .any(|(s, e)| in_union(s) && e == "198.18.2.2"));
        plan.undo(&mut table, &mut Default::default());
        assert_eq!(table, before);
    }

    /// A change that rewrites a local program (the web pod loses the label the policies
    /// select) is planned as a patch of the policy objects: the table becomes what a compile
    /// and render of the new view give, and the undo puts it back; the node keeps following
    /// (member changes again, unions included); a pod with two endpoint records stops the node
    /// from following.
    #[test]
    fn more_than_members_is_a_patch_of_the_policy_objects() {
        let mut v = view();
        let before = crate::compute(&v, ME).nft_table;
        let mut node = PolicyNode::new(&v, ME);
        pod_mut(&mut v, "web").labels = labels(&[("app", "other")]);
        let delta = node.follow(&v, &changed_pods(&["web"])).unwrap();
        assert!(!delta.members_only());
        let mut table = before.clone();
        let plan = node.plan(&mut table, &delta).expect("a patch");
        let patch = plan.changes[0].patch.as_ref().expect("a patch");
        assert!(!patch.elements_only(), "the web pod's chains change");
        assert_eq!(table, crate::compute(&v, ME).nft_table);
        plan.undo(&mut table, &mut Default::default());
        assert_eq!(table, before);
        let mut table = crate::compute(&v, ME).nft_table;
        pod_mut(&mut v, "web").labels = labels(&[("app", "web")]);
        let delta = node.follow(&v, &changed_pods(&["web"])).unwrap();
        node.plan(&mut table, &delta).expect("a patch");
        assert_eq!(table, crate::compute(&v, ME).nft_table);
        pod_mut(&mut v, "c1").labels = labels(&[("app", "a1")]);
        let delta = node.follow(&v, &changed_pods(&["c1"])).unwrap();
        let plan = node.plan(&mut table, &delta).expect("a member plan");
        assert!(plan.changes.iter().all(|c| c.patch.is_none()));
        assert_eq!(table, crate::compute(&v, ME).nft_table);

        let mut v = view();
        let mut node = PolicyNode::new(&v, ME);
        let mut moved = v.endpoints[1].clone();
        moved.node = "third".into();
        v.endpoints.push(moved);
        assert!(node.follow(&v, &changed_pods(&["c0"])).is_none());
    }

    /// A namespace's labels and a policy that selects no local pod: followed and planned like
    /// pods (nothing to change in the table here).
    #[test]
    fn namespaces_and_policies_are_followed() {
        let mut v = view();
        let before = crate::compute(&v, ME).nft_table;
        let mut node = PolicyNode::new(&v, ME);
        v.namespaces[0].labels = labels(&[("team", "b")]);
        v.policies.push(policy(
            "nobody",
            serde_json::json!({"podSelector": {"matchLabels": {"app": "none"}}}),
        ));
        let inputs = PolicyInputs {
            namespaces: ["prod".to_string()].into(),
            policies: [("prod".to_string(), "nobody".to_string())].into(),
            ..PolicyInputs::default()
        };
        let delta = node.follow(&v, &inputs).unwrap();
        let mut table = before.clone();
        node.plan(&mut table, &delta).expect("a plan");
        assert_eq!(table, crate::compute(&v, ME).nft_table);
        let pods = crate::routes::policy_pods(&v);
        let program = crate::policy::compile(&v.policies, &v.namespaces, &pods, ME);
        assert_eq!(node.program(), program);
    }

    /// With a Calico policy on the web pod (Allow from `role == 'client'` pods, in a tier), a
    /// remote pod's label change takes the tier member path: the tier chain's selector set
    /// changes by elements, the table equals the whole node's; a local pod's change declines.
    #[test]
    fn tiered_policy_label_changes_are_set_elements() {
        let mut v = view();
        v.calico.tiers.push(malla_api::calico::Tier {
            name: "security".into(),
            order: Some(malla_api::calico::Order(100.0)),
            default_action: Some(malla_api::calico::Action::Pass),
        });
        v.calico.policies.push(malla_api::calico::GlobalNetworkPolicy {
            name: "clients".into(),
            spec: serde_json::from_value(serde_json::json!({
                "tier": "security", "order": 1,
                "selector": "app == 'web'",
                "types": ["Ingress"],
                "ingress": [
                    {"action": "Allow", "source": {"selector": "role == 'client'"}},
                    {"action": "Deny", "source": {"namespaceSelector": "team == 'a'", "notSelector": "has(app)"}}
                ]
            }))
            .unwrap(),
        });
        let mut table = crate::compute(&v, ME).nft_table;
        assert!(table.chains.keys().any(|c| c.starts_with("tpol-")));
        let mut node = PolicyNode::new(&v, ME);
        // c1 is dual-stack: its IPv6 address would make the set's IPv6 half non-empty, a
        // new rule in the chain.
        pod_mut(&mut v, "c1").labels = labels(&[("role", "client")]);
        assert!(node
            .plan_tiered(&v, &changed_pods(&["c1"]), &mut table)
            .is_none());
        pod_mut(&mut v, "c1").labels = labels(&[("role", "none")]);
        node.follow(&v, &changed_pods(&["c1"])).unwrap();
        pod_mut(&mut v, "a1").labels = labels(&[("role", "client"), ("app", "a1")]);
        let before = table.clone();
        let plan = node
            .plan_tiered(&v, &changed_pods(&["a1"]), &mut table)
            .expect("a member plan");
        assert!(plan.elements_only());
        assert_eq!(table, crate::compute(&v, ME).nft_table);
        let sets: Vec<&String> = plan
            .changes
            .iter()
            .filter_map(|c| c.patch.as_ref())
            .flat_map(|p| p.after.sets.keys())
            .collect();
        assert!(sets.iter().any(|s| s.starts_with("hep-sel-")), "{sets:?}");
        plan.undo(&mut table, &mut Default::default());
        assert_eq!(table, before);
        let mut table = crate::compute(&v, ME).nft_table;
        // A pod leaving a set whose other members stay (c0 and a1 both clients; c0 goes).
        v.pods.retain(|p| p.name != "c0");
        v.endpoints.retain(|e| e.pod != "c0");
        node.plan_tiered(&v, &changed_pods(&["c0"]), &mut table)
            .expect("a member plan");
        assert_eq!(table, crate::compute(&v, ME).nft_table);
        // The last client goes: the Allow rule's set empties, its rule is no longer written.
        pod_mut(&mut v, "a1").labels = labels(&[]);
        assert!(node
            .plan_tiered(&v, &changed_pods(&["a1"]), &mut table)
            .is_none());
        let mut table = crate::compute(&v, ME).nft_table;
        node.calico_changed();
        pod_mut(&mut v, "web").labels = labels(&[("app", "web"), ("x", "y")]);
        assert!(node
            .plan_tiered(&v, &changed_pods(&["web"]), &mut table)
            .is_none());
    }
}
