//! The tier member path: a pod change that only moves addresses in and out of the tier
//! chains' selector sets (`hep-sel-*`, see [`super::tiers`]), planned as element changes of
//! the applied table instead of computing the whole node again.
//!
//! The tier chains of this node's pods read other pods only through those sets: a Calico
//! rule side's `selector` / `notSelector` with its `namespaceSelector` and the policy's
//! namespace ([`crate::host::picks`], network sets included), and a ClusterNetworkPolicy's
//! `namespaces` and `pods` peers. [`TierDefs`] holds, per set name, what its members are, read
//! from the Calico objects (kept while they do not change: the agent's full path drops them).
//! For changed pods that are not this node's, [`plan_sets`] evaluates each set's selector on
//! the pod before (the policy index's copy) and after (the view), and re-derives only the
//! sets whose membership moved, against the sets as the applied table holds them.
//!
//! It declines (the whole node is then computed) when the change could alter a chain: a
//! local pod changed (which tiers and policies apply to it), a set becomes empty or stops
//! being empty in a family (rules matching it are written only when it is not), a
//! ClusterNetworkPolicy peer with named ports moves (its per-port sets follow the pods'
//! ports), and for inputs this path does not follow: policy or namespace changes, staged
//! policies, host endpoints.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use malla_api::calico::{EntityRule, Rule};
use malla_api::policy::LabelSelector;
use malla_api::selector::Selector;

use super::addrs::{nft_element, normalize};
use super::members::PolicyInputs;
use super::{namespace_labels, PolicyPod};
use crate::host::render::picked_name;
use crate::host::{labelled_others, picks, pod_labelled, CalicoView, Labelled};
use crate::nft::element::Part;
use crate::nft::patch::Patch;
use crate::nft::Table;
use crate::ClusterView;

/// What a selector set holds.
#[derive(Debug, Clone)]
enum Def {
    /// What a Calico rule side's selector (or not-selector) with its namespace selector picks,
    /// in a namespaced policy's namespace (`scope`).
    Calico {
        sel: Option<Selector>,
        ns: Option<Selector>,
        scope: Option<String>,
    },
    /// A ClusterNetworkPolicy `namespaces` (`pods` None) or `pods` peer; `named_ports` when
    /// a rule with the peer names ports (sets per destination port follow it).
    Cluster {
        ns: LabelSelector,
        pods: Option<LabelSelector>,
        named_ports: bool,
    },
}

impl Def {
    /// Whether the set picks `pod` (`e`: the same pod as Calico selectors see it).
    fn picks(&self, pod: &PolicyPod, e: &Labelled, view: &ClusterView) -> bool {
        match self {
            Def::Calico { sel, ns, scope } => picks(sel.as_ref(), ns.as_ref(), e, scope.as_deref()),
            Def::Cluster { ns, pods, .. } => {
                ns.matches(namespace_labels(&view.namespaces, &pod.namespace))
                    && pods.as_ref().is_none_or(|s| s.matches(&pod.labels))
            }
        }
    }

    /// Whether the set picks `e`, something other than a pod (a network set).
    fn picks_other(&self, e: &Labelled) -> bool {
        match self {
            Def::Calico { sel, ns, scope } => picks(sel.as_ref(), ns.as_ref(), e, scope.as_deref()),
            Def::Cluster { .. } => false,
        }
    }
}

/// The tier selector sets that follow pods, by name (without family), as the Calico objects
/// define them.
#[derive(Debug, Clone, Default)]
pub struct TierDefs {
    defs: BTreeMap<String, Def>,
}

impl TierDefs {
    /// Every selector set the Calico objects' rules can make (a superset of those a render
    /// writes: only those in the table are followed).
    pub fn of(calico: &CalicoView) -> Self {
        let mut defs = BTreeMap::new();
        let mut calico_rules = |rules: &[Rule], scope: Option<&str>| {
            for r in rules {
                for side in [&r.source, &r.destination] {
                    add_side(&mut defs, side, scope);
                }
            }
        };
        for p in &calico.policies {
            calico_rules(&p.spec.ingress, None);
            calico_rules(&p.spec.egress, None);
        }
        for p in &calico.network_policies {
            calico_rules(&p.spec.ingress, Some(&p.namespace));
            calico_rules(&p.spec.egress, Some(&p.namespace));
        }
        for p in &calico.cluster_policies {
            for r in p.spec.ingress.iter().chain(&p.spec.egress) {
                let named = r
                    .protocols
                    .iter()
                    .any(|p| p.destination_named_port.is_some());
                for peer in &r.peers {
                    let (key, def) = if let Some(n) = &peer.namespaces {
                        (
                            super::tiers::namespaces_peer_key(n),
                            Def::Cluster {
                                ns: n.clone(),
                                pods: None,
                                named_ports: named,
                            },
                        )
                    } else if let Some(np) = &peer.pods {
                        (
                            super::tiers::pods_peer_key(np),
                            Def::Cluster {
                                ns: np.namespace_selector.clone(),
                                pods: Some(np.pod_selector.clone()),
                                named_ports: named,
                            },
                        )
                    } else {
                        continue;
                    };
                    let name = crate::host::render::fixed_name(&key);
                    match defs.entry(name).or_insert(def) {
                        Def::Cluster { named_ports, .. } => *named_ports |= named,
                        Def::Calico { .. } => {}
                    }
                }
            }
        }
        TierDefs { defs }
    }
}

/// The sets a rule side makes (as [`crate::host::render`]'s `side` does).
fn add_side(defs: &mut BTreeMap<String, Def>, e: &EntityRule, scope: Option<&str>) {
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| Selector::parse(t).ok());
    let (sel, not_sel, ns) = (
        parse(&e.selector),
        parse(&e.not_selector),
        parse(&e.namespace_selector),
    );
    let mut add = |sel: Option<Selector>| {
        let name = picked_name(sel.as_ref(), ns.as_ref(), scope);
        defs.entry(name).or_insert_with(|| Def::Calico {
            sel,
            ns: ns.clone(),
            scope: scope.map(str::to_string),
        });
    };
    if sel.is_some() || ns.is_some() {
        add(sel);
    }
    if not_sel.is_some() {
        add(not_sel);
    }
}

/// Whether the tier member path can follow `changed` in `view` at all (see the module doc):
/// pods alone changed, and no staged policy or host endpoint reads them another way.
pub fn followable(view: &ClusterView, changed: &PolicyInputs) -> bool {
    changed.policies.is_empty()
        && changed.namespaces.is_empty()
        && view.calico.staged.is_empty()
        && view.calico.host_endpoints.is_empty()
        && !view.config.auto_host_endpoints
}

/// One changed pod: as the policy index held it, and as the view has it (None: absent).
pub(crate) struct PodChange<'a> {
    pub old: Option<PolicyPod<'a>>,
    pub new: Option<PolicyPod<'a>>,
}

/// The patch (elements only) that takes the tier selector sets of `table` (a render of the
/// view before `changes`) to what a render of `view` (after them) holds; None when the change
/// is more than that (see the module doc). An empty patch when no set moves.
pub(crate) fn plan_sets(
    defs: &TierDefs,
    view: &ClusterView,
    me: &str,
    changes: &[PodChange],
    table: &Table,
) -> Option<Patch> {
    let mut patch = Patch::new(&table.family, &table.name);
    if changes
        .iter()
        .flat_map(|c| c.old.iter().chain(&c.new))
        .any(|p| p.node == me)
    {
        return None;
    }
    let labelled = |p: &Option<PolicyPod>| p.as_ref().map(|p| pod_labelled(p, &view.namespaces));
    let ents: Vec<(Option<Labelled>, Option<Labelled>)> = changes
        .iter()
        .map(|c| (labelled(&c.old), labelled(&c.new)))
        .collect();
    // The addresses a changed pod held, and what in the view now holds each of them (pods, by
    // their endpoint records; network sets): whether a set keeps an address is theirs to say.
    let old_addrs: BTreeSet<IpNet> = ents
        .iter()
        .filter_map(|(o, _)| o.as_ref())
        .flat_map(|e| e.nets.iter().copied())
        .collect();
    let mut holders: BTreeMap<IpNet, Vec<(PolicyPod, Labelled)>> = BTreeMap::new();
    if !old_addrs.is_empty() {
        let eps: Vec<&malla_api::WorkloadEndpoint> = view
            .endpoints
            .iter()
            .filter(|e| e.addrs().any(|a| old_addrs.contains(&IpNet::from(a))))
            .collect();
        let objects: BTreeMap<(&str, &str), &malla_api::Pod> = view
            .pods
            .iter()
            .filter(|p| {
                eps.iter()
                    .any(|e| e.namespace == p.namespace && e.pod == p.name)
            })
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
            .collect();
        for ep in eps {
            let pod =
                crate::routes::policy_pod(ep, objects.get(&(&*ep.namespace, &*ep.pod)).copied());
            let e = pod_labelled(&pod, &view.namespaces);
            for a in pod.ips.iter().map(|ip| IpNet::from(*ip)) {
                if old_addrs.contains(&a) {
                    holders.entry(a).or_default().push((pod.clone(), e.clone()));
                }
            }
        }
    }
    let others: Vec<Labelled> = if old_addrs.is_empty() {
        Vec::new()
    } else {
        labelled_others(view)
    };
    for (name, def) in &defs.defs {
        let v4 = format!("{name}-v4");
        let v6 = format!("{name}-v6");
        let (Some(s4), Some(s6)) = (table.sets.get(&v4), table.sets.get(&v6)) else {
            continue;
        };
        let mut moved = false;
        let mut adds: Vec<IpNet> = Vec::new();
        for (c, (eo, en)) in changes.iter().zip(&ents) {
            if let (Some(p), Some(e)) = (&c.old, eo) {
                moved |= def.picks(p, e, view);
            }
            if let (Some(p), Some(e)) = (&c.new, en) {
                if def.picks(p, e, view) {
                    moved = true;
                    adds.extend(e.nets.iter().copied());
                }
            }
        }
        if !moved {
            continue;
        }
        if matches!(
            def,
            Def::Cluster {
                named_ports: true,
                ..
            }
        ) {
            return None;
        }
        // What the set holds now, from the table; the changed pods' old addresses go unless
        // something the set picks still holds them.
        let current =
            s4.elements
                .iter()
                .chain(&s6.elements)
                .filter_map(|k| match k.parts().next()? {
                    Part::Addr(a) => Some(IpNet::from(a)),
                    Part::Net(n) => Some(n),
                    _ => None,
                });
        let kept = |a: &IpNet| {
            holders
                .get(a)
                .is_some_and(|hs| hs.iter().any(|(p, e)| def.picks(p, e, view)))
                || others
                    .iter()
                    .any(|o| o.nets.iter().any(|n| n.contains(a)) && def.picks_other(o))
        };
        let gone: Vec<IpNet> = old_addrs.iter().filter(|a| !kept(a)).copied().collect();
        let now = normalize(current.chain(adds), gone);
        for (set_name, held, v6) in [(&v4, s4, false), (&v6, s6, true)] {
            let want: BTreeSet<_> = now
                .iter()
                .filter(|n| n.addr().is_ipv6() == v6)
                .map(nft_element)
                .collect();
            if want == held.elements {
                continue;
            }
            // A rule matching the set in this family is written only when it holds something.
            if want.is_empty() != held.elements.is_empty() {
                return None;
            }
            let decl = |elements| crate::nft::Set {
                elements,
                ..crate::nft::patch::declaration_of_set(held)
            };
            patch.before.sets.insert(
                set_name.clone(),
                decl(held.elements.difference(&want).cloned().collect()),
            );
            patch.after.sets.insert(
                set_name.clone(),
                decl(want.difference(&held.elements).cloned().collect()),
            );
        }
    }
    Some(patch)
}
