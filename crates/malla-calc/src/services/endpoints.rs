//! The endpoint fast path, planned by the calculation: when only some services' endpoints
//! moved within the same counts, each service's entries are rebuilt alone
//! ([`super::build_service`]) and their change to the applied table found
//! ([`super::endpoint_delta`]), one service after the other, against the model as the
//! previous ones leave it. The model (the table and service map the dataplane last applied)
//! is changed as planned, and the plan is data: the dataplane driver sends its element
//! changes without computing anything, and [`EndpointPlan::undo`] puts the model back when the
//! kernel refuses them.

use std::collections::BTreeSet;

use super::{
    build_service, endpoint_delta, EndpointDelta, ProxyService, ProxySlice, ServiceEntry,
    ServiceMap,
};
use crate::nft::{Key, Table};

/// One service's planned change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceChange {
    /// The table's element changes, found against the model as the changes before this one in
    /// the plan left it.
    pub delta: EndpointDelta,
    /// What undoes `delta` (its map values are the keys `delta` replaced).
    undo: EndpointDelta,
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

/// Plans the endpoint changes of the services `changed` (keys `namespace/name`), rebuilt from
/// `services` and `slices` for node `node`, against `table` (rendered from `map`), making them
/// to both. None, with the model as it was, when one of them is more than endpoints moving
/// within the same counts (or is gone): then the whole node must be computed.
pub fn plan_endpoint_changes(
    table: &mut Table,
    map: &mut ServiceMap,
    services: &[ProxyService],
    slices: &[ProxySlice],
    node: &str,
    changed: &BTreeSet<String>,
) -> Option<EndpointPlan> {
    let mut plan = EndpointPlan::default();
    for service in changed {
        let planned = find_service(services, service).and_then(|svc| {
            let key = &*svc.key;
            let start = map.entries.partition_point(|e| *e.service < *key);
            let end = start + map.entries[start..].partition_point(|e| *e.service == *key);
            let entries = build_service(svc, slices, node);
            let delta = endpoint_delta(table, map, &map.entries[start..end], &entries)?;
            Some((start..end, entries, delta))
        });
        let Some((range, entries, delta)) = planned else {
            plan.undo(table, map);
            return None;
        };
        let undo = delta.apply_to(table);
        let (start, count) = (range.start, entries.len());
        let old = map.entries.splice(range, entries).collect();
        plan.changes.push(ServiceChange {
            delta,
            undo,
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
        let plan = plan_endpoint_changes(
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

    /// A service that is gone (or any that needs a render) declines the whole plan, and the
    /// changes planned before it are taken back.
    #[test]
    fn one_service_declining_leaves_the_model_as_it_was() {
        let (services, slices, moved, mut changed) = two_moved();
        changed.insert("zzz/gone".to_string());
        let (before, after, plan) = planned(&services, &slices, &moved, &changed);
        assert!(plan.is_none());
        assert_eq!(after, before);
    }
}
