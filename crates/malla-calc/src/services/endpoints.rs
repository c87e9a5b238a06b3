//! The service path, planned by the calculation: each changed service's entries are rebuilt
//! alone ([`super::build_service`]) and their change to the applied table found, one service
//! after the other, against the model as the previous ones leave it: element changes when only
//! endpoints moved within the same counts ([`super::endpoint_delta`]), else a patch of the
//! service's objects ([`super::reshape`]: a service created, deleted or reshaped). The model
//! (the table and service map the dataplane last applied) is changed as planned, and the plan
//! is data: the dataplane driver sends it without computing anything (element changes over
//! nfnetlink, or the patches' text), and [`EndpointPlan::undo`] puts the model back when the
//! kernel refuses it.

use std::collections::BTreeSet;

use super::{
    build_service, endpoint_delta, reshape::reshape, EndpointDelta, ProxyService, ProxySlice,
    ServiceEntry, ServiceMap,
};
use crate::nft::patch::Patch;
use crate::nft::{Key, Table};

/// One service's planned change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChange {
    /// The table's element changes, found against the model as the changes before this one in
    /// the plan left it.
    pub delta: EndpointDelta,
    /// What undoes `delta` (its map values are the keys `delta` replaced).
    undo: EndpointDelta,
    /// The service's objects created, deleted or changed (`delta` then holds only its dispatch
    /// elements), when its change is more than endpoints moving.
    pub patch: Option<Patch>,
    /// Where the service's entries are in the service map.
    start: usize,
    /// How many entries it has now.
    count: usize,
    /// Its entries before.
    old: Vec<ServiceEntry>,
}

impl ServiceChange {
    /// Whether `delta` gives key `key` of map `map` a new value (rather than adding it).
    pub fn replaces(&self, map: &str, key: &Key) -> bool {
        self.undo
            .map_values
            .iter()
            .any(|(m, k, _)| m == map && k == key)
    }

    /// Whether only elements change: the driver can send it over nfnetlink.
    pub fn elements_only(&self) -> bool {
        self.patch.as_ref().is_none_or(Patch::elements_only)
    }

    /// The change as `nft` text, to follow the plan's earlier changes in one transaction;
    /// `table` is the model (for the declarations of the maps `delta` touches).
    pub fn text(&self, table: &Table) -> String {
        let mut out = String::new();
        let d = &self.delta;
        if !(d.map_values.is_empty() && d.set_added.is_empty() && d.set_removed.is_empty()) {
            let mut as_patch = Patch::new(&table.family, &table.name);
            for (map, key, value) in &d.map_values {
                let Some(m) = table.maps.get(map) else {
                    continue;
                };
                for t in [&mut as_patch.before, &mut as_patch.after] {
                    t.maps
                        .entry(map.clone())
                        .or_insert_with(|| crate::nft::patch::declaration_of_map(m));
                }
                as_patch
                    .after
                    .maps
                    .get_mut(map)
                    .map(|x| x.elements.insert(key.clone(), value.clone()));
            }
            for (map, key, value) in &self.undo.map_values {
                as_patch
                    .before
                    .maps
                    .get_mut(map)
                    .map(|x| x.elements.insert(key.clone(), value.clone()));
            }
            for (sets, after) in [(&d.set_removed, false), (&d.set_added, true)] {
                for (set, e) in sets {
                    let Some(s) = table.sets.get(set) else {
                        continue;
                    };
                    for t in [&mut as_patch.before, &mut as_patch.after] {
                        t.sets
                            .entry(set.clone())
                            .or_insert_with(|| crate::nft::patch::declaration_of_set(s));
                    }
                    let t = if after {
                        &mut as_patch.after
                    } else {
                        &mut as_patch.before
                    };
                    t.sets.get_mut(set).map(|x| x.elements.insert(e.clone()));
                }
            }
            out.push_str(&as_patch.text());
        }
        if let Some(p) = &self.patch {
            out.push_str(&p.text());
        }
        out.push_str(&d.dispatch.text(&format!("{} {}", table.family, table.name)));
        out
    }

    /// The service's entries before the change, and (from `map`, the model after it) now.
    pub fn entries<'a>(&'a self, map: &'a ServiceMap) -> (&'a [ServiceEntry], &'a [ServiceEntry]) {
        let now = map
            .entries
            .get(self.start..self.start + self.count)
            .unwrap_or_default();
        (&self.old, now)
    }
}

/// The planned changes of some services, already made to the model they were planned on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointPlan {
    pub changes: Vec<ServiceChange>,
}

impl EndpointPlan {
    /// A plan of table element changes alone, already made to the table (`undo` takes them
    /// back), touching no service entry: the policy member path
    /// ([`crate::policy::members`]) rides the same driver update.
    pub(crate) fn elements(delta: EndpointDelta, undo: EndpointDelta) -> Self {
        EndpointPlan {
            changes: vec![ServiceChange {
                delta,
                undo,
                patch: None,
                start: 0,
                count: 0,
                old: Vec::new(),
            }],
        }
    }

    /// Whether only elements change: the driver can send the plan over nfnetlink.
    pub fn elements_only(&self) -> bool {
        self.changes.iter().all(ServiceChange::elements_only)
    }

    /// The plan as one `nft` transaction's text (see [`ServiceChange::text`]).
    pub fn text(&self, table: &Table) -> String {
        self.changes.iter().map(|c| c.text(table)).collect()
    }

    /// A plan of one table patch, already made to the table, touching no service entry: the
    /// policy path ([`crate::policy::members`]) rides the same driver update.
    pub fn patch(patch: Patch) -> Self {
        EndpointPlan {
            changes: vec![ServiceChange {
                delta: EndpointDelta::default(),
                undo: EndpointDelta::default(),
                patch: Some(patch),
                start: 0,
                count: 0,
                old: Vec::new(),
            }],
        }
    }

    /// Puts `table` and `map` back as they were before the plan.
    pub fn undo(self, table: &mut Table, map: &mut ServiceMap) {
        for c in self.changes.into_iter().rev() {
            c.undo.apply_to(table);
            if let Some(p) = &c.patch {
                p.undo(table);
            }
            map.entries.splice(c.start..c.start + c.count, c.old);
        }
    }
}

/// The service of key `key`: by binary search when `services` are in key order (as the agent's
/// mirror keeps them), else by walking them.
fn find_service<'a>(services: &'a [ProxyService], key: &str) -> Option<&'a ProxyService> {
    match services.binary_search_by(|s| (*s.key).cmp(key)) {
        Ok(i) => services.get(i),
        Err(_) => services.iter().find(|s| *s.key == *key),
    }
}

/// Plans the changes of the services `changed` (keys `namespace/name`), rebuilt from
/// `services` and `slices` for node `node`, against `table` (rendered from `map`), making them
/// to both. None, with the model as it was, when one of them touches what another service
/// holds (see [`super::reshape`]): then the whole node must be computed.
pub fn plan_service_changes(
    table: &mut Table,
    map: &mut ServiceMap,
    services: &[ProxyService],
    slices: &[ProxySlice],
    node: &str,
    changed: &BTreeSet<String>,
) -> Option<EndpointPlan> {
    let mut plan = EndpointPlan::default();
    for service in changed {
        let key = service.as_str();
        let start = map.entries.partition_point(|e| *e.service < *key);
        let end = start + map.entries[start..].partition_point(|e| *e.service == *key);
        let entries = find_service(services, key)
            .map(|svc| build_service(svc, slices, node))
            .unwrap_or_default();
        let planned = match endpoint_delta(table, map, &map.entries[start..end], &entries) {
            Some(delta) => Some((delta, None)),
            None => reshape(table, map, key, &entries).map(|(patch, dispatch)| {
                let delta = EndpointDelta {
                    dispatch,
                    ..EndpointDelta::default()
                };
                (delta, Some(patch))
            }),
        };
        let Some((delta, patch)) = planned else {
            plan.undo(table, map);
            return None;
        };
        let undo = delta.apply_to(table);
        if let Some(p) = &patch {
            p.apply_to(table);
        }
        let count = entries.len();
        let old = map.entries.splice(start..end, entries).collect();
        plan.changes.push(ServiceChange {
            delta,
            undo,
            patch,
            start,
            count,
            old,
        });
    }
    Some(plan)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::{build, endpoint_delta};
    use super::*;
    use malla_api::service::{AddressType, EndpointSlice, Service};

    /// The fixture cluster, and a copy in which the first endpoint of two services (each a
    /// change the fast path takes alone) moved; the keys of those services.
    fn two_moved() -> (
        Vec<Service>,
        Vec<EndpointSlice>,
        Vec<EndpointSlice>,
        BTreeSet<String>,
    ) {
        let (services, slices) = cluster();
        let m0 = build(&proxied(&services), &proxy(&slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        let mut moved = slices.clone();
        let mut changed = BTreeSet::new();
        for (i, s) in slices.iter().enumerate() {
            let svc = services
                .iter()
                .find(|v| v.namespace == s.namespace && v.name == s.service);
            let Some(svc) = svc else { continue };
            if changed.len() == 2 || s.endpoints.len() < 2 || s.address_type != AddressType::IPv4 {
                continue;
            }
            let mut one = slices.clone();
            one[i].endpoints[0].addresses = vec![ip(&format!("198.18.77.{}", i + 1))];
            let key = svc.key();
            let old: Vec<ServiceEntry> = m0
                .entries
                .iter()
                .filter(|e| *e.service == *key)
                .cloned()
                .collect();
            let new = build_service(&ProxyService::from(svc), &proxy(&one), ME);
            if endpoint_delta(&t0, &m0, &old, &new).is_some() {
                moved[i] = one[i].clone();
                changed.insert(key);
            }
        }
        assert_eq!(
            changed.len(),
            2,
            "two fixture services that take the fast path"
        );
        (services, slices, moved, changed)
    }

    /// A service map and the table rendered from it.
    type Model = (ServiceMap, Table);

    /// The model of the fixture cluster before (`slices`), the model after planning the
    /// services `changed` for `moved`, and the plan.
    fn planned(
        services: &[Service],
        slices: &[EndpointSlice],
        moved: &[EndpointSlice],
        changed: &BTreeSet<String>,
    ) -> (Model, Model, Option<EndpointPlan>) {
        let m0 = build(&proxied(services), &proxy(slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        let (mut t, mut m) = (t0.clone(), m0.clone());
        let plan = plan_service_changes(
            &mut t,
            &mut m,
            &proxied(services),
            &proxy(moved),
            ME,
            changed,
        );
        ((m0, t0), (m, t), plan)
    }

    /// Two services' endpoints moving at once: the plan leaves the model equal to a full
    /// computation and render of the new cluster, and its undo puts it back.
    #[test]
    fn a_plan_makes_the_model_a_full_render_and_its_undo_puts_it_back() {
        let (services, slices, moved, changed) = two_moved();
        let (before, (mut m, mut t), plan) = planned(&services, &slices, &moved, &changed);
        let plan = plan.expect("a plan");
        assert_eq!(plan.changes.len(), 2);
        assert!(plan.changes.iter().all(|c| !c.delta.is_empty()));
        let m1 = build(&proxied(&services), &proxy(&moved), ME, &[], &pools());
        assert_eq!(m, m1);
        assert_eq!(t, crate::masquerade::node_table(&pools(), &m1));
        plan.undo(&mut t, &mut m);
        assert_eq!((m, t), before);
    }

    /// A service that needs a render (here: a new one on another's cluster IP and port)
    /// declines the whole plan, and the changes planned before it are taken back.
    #[test]
    fn one_service_declining_leaves_the_model_as_it_was() {
        let (services, slices, moved, mut changed) = two_moved();
        let m0 = build(&proxied(&services), &proxy(&slices), ME, &[], &pools());
        let t0 = crate::masquerade::node_table(&pools(), &m0);
        let mut more = services.clone();
        more.push(svc(
            "zzz",
            malla_api::service::ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("", malla_api::service::Protocol::Tcp, 80, None)],
        ));
        changed.insert("default/zzz".to_string());
        let (mut t, mut m) = (t0.clone(), m0.clone());
        let plan = plan_service_changes(
            &mut t,
            &mut m,
            &proxied(&more),
            &proxy(&moved),
            ME,
            &changed,
        );
        assert!(plan.is_none());
        assert_eq!((m, t), (m0, t0));
    }
}
