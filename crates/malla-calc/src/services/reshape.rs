//! A service created, deleted or reshaped (ports, type, traffic policies, affinity, endpoint
//! counts) without rendering the node: the service's entries are rendered alone, before and
//! after, and the difference becomes a [`Patch`] of the table the dataplane last applied, equal
//! to what a render of the whole node would change. At 30k services that is a few objects
//! instead of a render and a text diff of the whole table (~130 ms).
//!
//! A service's objects are its own (chains, affinity sets and maps are named after it) except
//! for what it shares with other services, each followed here as a full render makes it:
//! - the frontend elements of `service-ips-…`, `service-nodeports-…` and the no-endpoint maps,
//!   which the first service in map order claims: a service sharing an address and port, or a
//!   node port, with another one (Kubernetes never allocates that) is declined;
//! - the `hairpin-…` elements, removed only when no other service renders them;
//! - the `pick-…` chains and `dispatch-…` maps of plain entries (see [`super`]): created with
//!   their first user, a count's chain past [`PICK_CHAINS_UP_TO`] removed with its last user,
//!   the map and its chains with the last plain entry of its family and protocol;
//! - the slots of the endpoint maps: a new dispatch chain takes its natural slot when free (as
//!   [`super::place`] gives it), and a chain leaving frees its slot when no chain after it could
//!   have probed past it; otherwise the change is declined;
//! - the declared sizes of `service-ips-…` and `dispatch-…`: a change that would re-declare
//!   one is declined.
//!
//! Declined means None: the caller renders the whole node, which stays the reference (the
//! property tests below check the patch against it).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use malla_api::service::Protocol;

use super::{
    dispatch, dispatch_map, dispatch_slots, endpoints_map, endpoints_map_declaration,
    hairpin_elements, map_size, natural_slot, node_ports_map, pick_chain, render_entry,
    service_ips_map, IpFamily, ServiceEntry, ServiceMap, FAMILIES, PICK_CHAINS_UP_TO, SLOTS,
    SLOT_SIZE,
};
use crate::nft::element::Chains;
use crate::nft::patch::{declaration_of_map, declaration_of_set, Patch};
use crate::nft::{Key, Part, Table};

const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// The maps whose elements frontends claim (the first service in map order keeps one).
fn claim_maps() -> Vec<String> {
    FAMILIES
        .iter()
        .flat_map(|fam| {
            let s = fam.suffix();
            [
                service_ips_map(*fam),
                format!("no-endpoint-services-{s}"),
                node_ports_map(*fam),
                format!("no-endpoint-nodeports-{s}"),
            ]
        })
        .collect()
}

fn hairpin_sets() -> Vec<String> {
    FAMILIES
        .iter()
        .map(|fam| format!("hairpin-{}", fam.suffix()))
        .collect()
}

/// Whether a dispatch chain starts at `slot` in `table`.
fn occupied(table: &Table, slot: u64) -> bool {
    let first = Key::one(Part::Int((slot * SLOT_SIZE) as u32));
    FAMILIES.iter().any(|fam| {
        PROTOCOLS.iter().any(|p| {
            table
                .maps
                .get(&endpoints_map(*fam, p.nft(), slot))
                .is_some_and(|m| m.elements.contains_key(&first))
        })
    })
}

/// A table holding the declarations (no elements) of the shared maps and sets `model` has.
fn seeded(model: &Table) -> Table {
    let mut t = Table::new(&model.family, &model.name);
    for name in claim_maps() {
        if let Some(m) = model.maps.get(&name) {
            t.maps.insert(name, declaration_of_map(m));
        }
    }
    for name in hairpin_sets() {
        if let Some(s) = model.sets.get(&name) {
            t.sets.insert(name, declaration_of_set(s));
        }
    }
    t
}

/// Shared objects followed by their users (see the module doc), not by one service.
fn shared(name: &str) -> bool {
    name.starts_with("pick-") || name.starts_with("dispatch-")
}

/// The element counts of plain entries with endpoints, by family and protocol: the users of
/// the pick chains and dispatch maps.
type Users = BTreeMap<(IpFamily, Protocol), BTreeSet<usize>>;

fn users<'a>(entries: impl Iterator<Item = &'a ServiceEntry>, of: Option<&Users>) -> Users {
    let mut out = Users::new();
    for e in entries.filter(|e| e.is_plain() && !e.cluster_endpoints.is_empty()) {
        let fp = (e.family, e.protocol);
        if of.is_some_and(|o| !o.contains_key(&fp)) {
            continue;
        }
        out.entry(fp).or_default().insert(e.cluster_endpoints.len());
    }
    out
}

/// The change that turns `table` (rendered from `map`) into the render with service
/// `service`'s entries replaced by `new` (none: the service is gone; none before: it is new):
/// the table's patch and the dispatch elements' changes. None when the change touches what
/// another service holds (see the module doc).
pub(super) fn reshape(
    table: &Table,
    map: &ServiceMap,
    service: &str,
    new: &[ServiceEntry],
) -> Option<(Patch, dispatch::Changes)> {
    let start = map.entries.partition_point(|e| *e.service < *service);
    let end = start + map.entries[start..].partition_point(|e| *e.service == *service);
    let old = &map.entries[start..end];
    let others = || map.entries[..start].iter().chain(&map.entries[end..]);

    // Nothing shared with another service's frontends or node ports.
    let frontends: BTreeSet<(IpAddr, Protocol, u16)> = old
        .iter()
        .chain(new)
        .flat_map(|e| e.frontends.iter().map(move |f| (f.ip, e.protocol, f.port)))
        .collect();
    let node_ports: BTreeSet<(IpFamily, Protocol, u16)> = old
        .iter()
        .chain(new)
        .filter_map(|e| e.node_port.map(|p| (e.family, e.protocol, p)))
        .collect();
    let clash = others().any(|e| {
        e.frontends
            .iter()
            .any(|f| frontends.contains(&(f.ip, e.protocol, f.port)))
            || e.node_port
                .is_some_and(|p| node_ports.contains(&(e.family, e.protocol, p)))
    });
    if clash {
        return None;
    }

    // Each side rendered alone.
    let mut chains = Chains::default();
    let mut was = seeded(table);
    let mut pending_was = Vec::new();
    for e in old {
        render_entry(e, &mut was, &mut chains, &mut pending_was);
    }
    let mut now = seeded(table);
    let mut pending_now = Vec::new();
    for e in new {
        render_entry(e, &mut now, &mut chains, &mut pending_now);
    }
    let claims: BTreeSet<String> = claim_maps().into_iter().collect();
    let hairpins: BTreeSet<String> = hairpin_sets().into_iter().collect();
    let mut patch = Patch::new(&table.family, &table.name);
    let seed = seeded(table);
    patch.before.maps.extend(seed.maps.clone());
    patch.after.maps.extend(seed.maps);
    patch.before.sets.extend(seed.sets.clone());
    patch.after.sets.extend(seed.sets);

    // Before: the service's objects as the table holds them.
    for name in was.chains.keys().filter(|n| !shared(n)) {
        patch
            .before
            .chains
            .insert(name.clone(), table.chains.get(name)?.clone());
    }
    for name in was.sets.keys().filter(|n| !hairpins.contains(*n)) {
        patch
            .before
            .sets
            .insert(name.clone(), table.sets.get(name)?.clone());
    }
    for (name, m) in &was.maps {
        if claims.contains(name) {
            let held = &table.maps.get(name)?.elements;
            let touched = &mut patch.before.maps.get_mut(name)?.elements;
            for (k, v) in &m.elements {
                // Another service's element (or a table out of step): a render.
                if held.get(k) != Some(v) {
                    return None;
                }
                touched.insert(k.clone(), v.clone());
            }
        } else if !shared(name) {
            patch
                .before
                .maps
                .insert(name.clone(), table.maps.get(name)?.clone());
        }
    }
    // The old dispatch chains' endpoints, where the table has them.
    let mut freed = BTreeSet::new();
    for p in &pending_was {
        let (m, off, n) = dispatch_slots(table, &p.chain)?;
        let slot = u64::from(off) / SLOT_SIZE;
        if n as usize != p.eps.len() || p.slots() != 1 || slot != natural_slot(&p.chain) {
            return None;
        }
        let held = table.maps.get(&m)?;
        let touched = patch
            .before
            .maps
            .entry(m.clone())
            .or_insert_with(|| declaration_of_map(held));
        for i in 0..n {
            let k = Key::one(Part::Int(off + i));
            touched
                .elements
                .insert(k.clone(), held.elements.get(&k)?.clone());
        }
        patch
            .after
            .maps
            .entry(m)
            .or_insert_with(|| declaration_of_map(held));
        freed.insert(slot);
    }

    // After: the service's objects as a render makes them.
    for (name, c) in now.chains.iter().filter(|(n, _)| !shared(n)) {
        patch.after.chains.insert(name.clone(), c.clone());
    }
    for (name, s) in now.sets.iter().filter(|(n, _)| !hairpins.contains(*n)) {
        patch.after.sets.insert(name.clone(), s.clone());
    }
    for (name, m) in &now.maps {
        if claims.contains(name) {
            patch
                .after
                .maps
                .get_mut(name)?
                .elements
                .extend(m.elements.iter().map(|(k, v)| (k.clone(), v.clone())));
        } else if !shared(name) {
            patch.after.maps.insert(name.clone(), m.clone());
        }
    }
    // New dispatch chains at their natural slots.
    pending_now.sort_by_cached_key(|p| (natural_slot(&p.chain), p.chain.clone()));
    let mut taken = BTreeSet::new();
    for p in &pending_now {
        let slot = natural_slot(&p.chain);
        let free = !occupied(table, slot) || freed.contains(&slot);
        if p.slots() != 1 || !free || !taken.insert(slot) {
            return None;
        }
        let m = endpoints_map(p.family, p.protocol, slot);
        if let Some(held) = table.maps.get(&m) {
            for t in [&mut patch.before, &mut patch.after] {
                t.maps
                    .entry(m.clone())
                    .or_insert_with(|| declaration_of_map(held));
            }
        } else {
            patch
                .after
                .maps
                .entry(m)
                .or_insert_with(|| endpoints_map_declaration(p.family, p.protocol));
        }
        p.write(&mut patch.after, slot);
    }
    // A slot left free: a chain placed after it may have probed past it, and a render would
    // move it there.
    for s in freed.difference(&taken) {
        let mut t = (s + 1) % SLOTS;
        while freed.contains(&t) && !taken.contains(&t) && t != *s {
            t = (t + 1) % SLOTS;
        }
        if occupied(table, t) && !freed.contains(&t) {
            return None;
        }
    }
    // Endpoint maps left empty go.
    let endpoint_maps: Vec<String> = patch
        .before
        .maps
        .keys()
        .filter(|n| n.starts_with("endpoints-"))
        .cloned()
        .collect();
    for m in endpoint_maps {
        let held = table.maps.get(&m)?;
        // The touched keys go, then the new ones come (on slots that were free or freed).
        let removed = patch.before.maps[&m].elements.len();
        let added = patch.after.maps.get(&m).map_or(0, |x| x.elements.len());
        if held.elements.len() - removed + added == 0 {
            patch.before.maps.insert(m.clone(), held.clone());
            patch.after.maps.remove(&m);
        }
    }

    // Hairpin elements: removed when no other service renders them, added when new.
    for name in &hairpins {
        let (Some(w), Some(n), Some(held)) =
            (was.sets.get(name), now.sets.get(name), table.sets.get(name))
        else {
            continue;
        };
        let gone: BTreeSet<&Key> = w.elements.difference(&n.elements).collect();
        let kept: BTreeSet<Key> = if gone.is_empty() {
            BTreeSet::new()
        } else {
            others()
                .flat_map(hairpin_elements)
                .filter(|(s, e)| s == name && gone.contains(e))
                .map(|(_, e)| e)
                .collect()
        };
        let removed = gone
            .into_iter()
            .filter(|e| !kept.contains(*e) && held.elements.contains(*e));
        patch
            .before
            .sets
            .get_mut(name)?
            .elements
            .extend(removed.cloned());
        let added = n.elements.iter().filter(|e| !held.elements.contains(*e));
        patch
            .after
            .sets
            .get_mut(name)?
            .elements
            .extend(added.cloned());
    }

    // Pick chains and dispatch maps, by their users.
    let (users_was, users_now) = (users(old.iter(), None), users(new.iter(), None));
    let mut mine = users_was.clone();
    mine.extend(users_now.clone());
    let users_else = users(others(), Some(&mine));
    let mut gone_maps = BTreeSet::new();
    for (fam, proto) in mine.keys().copied() {
        let d = dispatch_map(fam, proto.nft());
        let counts_now = users_now.get(&(fam, proto));
        let counts_else = users_else.get(&(fam, proto));
        let counts_was = users_was.get(&(fam, proto));
        let pick = |n: usize| pick_chain(fam, proto.nft(), n);
        match (table.maps.get(&d), counts_now.or(counts_else).is_some()) {
            (None, true) => {
                if counts_else.is_some() {
                    return None;
                }
                let mut m = declaration_of_map(now.maps.get(&d)?);
                m.size = Some(map_size(dispatch::count(new, fam, proto)));
                patch.after.maps.insert(d.clone(), m);
                let made = now.chains.iter().filter(|(n, _)| n.starts_with("pick-"));
                for (name, c) in made.filter(|(n, _)| {
                    (1..=PICK_CHAINS_UP_TO)
                        .chain(counts_now.into_iter().flatten().copied())
                        .any(|k| **n == pick(k))
                }) {
                    patch.after.chains.insert(name.clone(), c.clone());
                }
            }
            (Some(m), true) => {
                let count = dispatch::count(&map.entries, fam, proto)
                    - dispatch::count(old, fam, proto)
                    + dispatch::count(new, fam, proto);
                if m.size != Some(map_size(count)) {
                    return None;
                }
                for n in counts_now.into_iter().flatten() {
                    let name = pick(*n);
                    if !table.chains.contains_key(&name) {
                        patch
                            .after
                            .chains
                            .insert(name.clone(), now.chains.get(&name)?.clone());
                    }
                }
                for n in counts_was.into_iter().flatten() {
                    let unused = *n > PICK_CHAINS_UP_TO
                        && !counts_now.is_some_and(|c| c.contains(n))
                        && !counts_else.is_some_and(|c| c.contains(n));
                    let name = pick(*n);
                    if unused {
                        patch
                            .before
                            .chains
                            .insert(name.clone(), table.chains.get(&name)?.clone());
                    }
                }
            }
            (Some(m), false) => {
                patch.before.maps.insert(d.clone(), m.clone());
                let prefix = format!("pick-{}-{}-", fam.suffix(), proto.nft());
                for (name, c) in table.chains.range(prefix.clone()..) {
                    if !name.starts_with(&prefix) {
                        break;
                    }
                    patch.before.chains.insert(name.clone(), c.clone());
                }
                gone_maps.insert(d);
            }
            (None, false) => {
                if counts_was.is_some() {
                    return None;
                }
            }
        }
    }

    // A declared size that would change is a re-declared map: a render.
    for name in claim_maps() {
        let (Some(held), Some(b), Some(a)) = (
            table.maps.get(&name),
            patch.before.maps.get(&name),
            patch.after.maps.get(&name),
        ) else {
            continue;
        };
        let Some(size) = held.size else { continue };
        // No other service holds an element of the service's frontends (checked above).
        if map_size(held.elements.len() - b.elements.len() + a.elements.len()) != size {
            return None;
        }
    }

    // The dispatch elements of the frontends the service owns.
    let (lists_was, lists_now) = (dispatch::lists_of(old), dispatch::lists_of(new));
    let mut changes = dispatch::Changes::default();
    let fronts: BTreeSet<&dispatch::Frontend> = lists_was.keys().chain(lists_now.keys()).collect();
    for f in fronts {
        let b = lists_was.get(f).copied().unwrap_or_default();
        let a = lists_now.get(f).copied().unwrap_or_default();
        if b != a {
            changes.push(f, b, a);
        }
    }
    // A dispatch map deleted takes its elements with it.
    changes.removed.retain(|(m, _)| !gone_maps.contains(m));
    patch.prune();
    Some((patch, changes))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use malla_api::service::{EndpointSlice, Service, ServiceType, TrafficPolicy};
    use proptest::prelude::*;

    fn render(services: &[Service], slices: &[EndpointSlice]) -> (nft::Table, ServiceMap) {
        let m = build(
            &proxied(services),
            &proxy(slices),
            ME,
            &[ip("198.19.0.1")],
            &pools(),
        );
        (crate::masquerade::node_table(&pools(), &m), m)
    }

    /// Plans the change from the cluster `(s0, e0)` to `(s1, e1)` for service `key` against
    /// the render of the first, and checks the result against the render of the second: the
    /// table, the service map and the dispatch elements, then the undo. Whether it planned.
    fn check(
        (s0, e0): (&[Service], &[EndpointSlice]),
        (s1, e1): (&[Service], &[EndpointSlice]),
        key: &str,
    ) -> Result<bool, TestCaseError> {
        let (t0, m0) = render(s0, e0);
        let (want_t, want_m) = render(s1, e1);
        let (mut t, mut m) = (t0.clone(), m0.clone());
        let changed = BTreeSet::from([key.to_string()]);
        let Some(plan) =
            plan_service_changes(&mut t, &mut m, &proxied(s1), &proxy(e1), ME, &changed)
        else {
            prop_assert_eq!(&t, &t0, "a declined plan leaves the model");
            return Ok(false);
        };
        prop_assert_eq!(&m, &want_m);
        prop_assert_eq!(
            &t,
            &want_t,
            "{}",
            nft::render_diff(&want_t, &t).unwrap_or_default()
        );
        // The dispatch elements follow.
        let mut elements = dispatch_elements(&m0);
        for c in &plan.changes {
            for (map, k) in &c.delta.dispatch.removed {
                elements.remove(&(map.clone(), k.clone()));
            }
            for (map, k, v, replaces) in &c.delta.dispatch.set {
                let old = elements.insert((map.clone(), k.clone()), v.clone());
                prop_assert_eq!(old.is_some(), *replaces);
            }
        }
        // A map deleted took its elements along.
        elements.retain(|(map, _), _| t.maps.contains_key(map));
        prop_assert_eq!(elements, dispatch_elements(&want_m));
        // The text is what the whole tables' diff says, but for the dispatch elements.
        if plan.changes.iter().all(|c| c.delta.dispatch.is_empty()) {
            let whole = nft::render_diff(&t0, &want_t).unwrap_or_default();
            let mut a: Vec<&str> = whole.lines().collect();
            let text = plan.text(&t0);
            let mut b: Vec<&str> = text.lines().collect();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
        }
        plan.undo(&mut t, &mut m);
        prop_assert_eq!(&t, &t0, "the undo restores the table");
        prop_assert_eq!(&m, &m0);
        Ok(true)
    }

    fn without(
        services: &[Service],
        slices: &[EndpointSlice],
        name: &str,
    ) -> (Vec<Service>, Vec<EndpointSlice>) {
        (
            services
                .iter()
                .filter(|s| s.name != name)
                .cloned()
                .collect(),
            slices
                .iter()
                .filter(|s| s.service != name)
                .cloned()
                .collect(),
        )
    }

    /// Every service of the fixture cluster, deleted and created again, is planned (none
    /// shares an address with another) and equals the render.
    #[test]
    fn every_fixture_service_is_created_and_deleted_without_a_render() {
        let (services, slices) = cluster();
        for s in &services {
            let (s1, e1) = without(&services, &slices, &s.name);
            let key = s.key();
            assert!(
                check((&services, &slices), (&s1, &e1), &key).unwrap(),
                "delete {key}"
            );
            assert!(
                check((&s1, &e1), (&services, &slices), &key).unwrap(),
                "create {key}"
            );
        }
    }

    /// A service that shares a cluster IP and port with another one is rendered.
    #[test]
    fn a_service_sharing_a_frontend_is_declined() {
        let (services, slices) = cluster();
        let mut more = services.clone();
        more.push(svc(
            "zdup",
            ServiceType::ClusterIP,
            &["10.96.0.10"],
            vec![port("", Protocol::Tcp, 80, None)],
        ));
        assert!(!check((&services, &slices), (&more, &slices), "default/zdup").unwrap());
    }

    /// The last service with 20 endpoints takes the 20-endpoint pick chain with it; the last
    /// plain service of a protocol the dispatch map and its chains.
    #[test]
    fn shared_pick_chains_and_dispatch_maps_follow_their_users() {
        let (mut services, mut slices) = cluster();
        services.push(svc(
            "big",
            ServiceType::ClusterIP,
            &["10.96.0.40"],
            vec![port("", Protocol::Sctp, 80, None)],
        ));
        slices.push(slice(
            "big",
            "big-1",
            AddressType::IPv4,
            (1..=20)
                .map(|i| ready(&format!("198.18.3.{i}"), "node-b"))
                .collect(),
            &[("", Protocol::Sctp, 8080)],
        ));
        let (t, _) = render(&services, &slices);
        assert!(
            t.chains.contains_key("pick-v4-sctp-20") && t.maps.contains_key("dispatch-v4-sctp")
        );
        let (s1, e1) = without(&services, &slices, "big");
        assert!(check((&services, &slices), (&s1, &e1), "default/big").unwrap());
        assert!(check((&s1, &e1), (&services, &slices), "default/big").unwrap());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// Any reshaping of one fixture service (type, ports, traffic policies, affinity,
        /// endpoint count), or its creation or deletion: the plan equals the render.
        #[test]
        fn a_reshaped_service_equals_a_render(
            pick in 0..64usize,
            present in (any::<bool>(), any::<bool>()),
            kind in 0..3u8,
            affinity in any::<bool>(),
            policies in (any::<bool>(), any::<bool>()),
            extra_port in any::<bool>(),
            keep in 0..25usize,
            node_port in 30000..30010u16,
        ) {
            let (services, slices) = cluster();
            let i = pick % services.len();
            let name = services[i].name.clone();
            let mut changed = services[i].clone();
            changed.kind = [ServiceType::ClusterIP, ServiceType::NodePort, ServiceType::LoadBalancer][kind as usize];
            changed.session_affinity_timeout = affinity.then_some(60);
            let policy = |local: bool| if local { TrafficPolicy::Local } else { TrafficPolicy::Cluster };
            changed.external_traffic_policy = policy(policies.0);
            changed.internal_traffic_policy = policy(policies.1);
            for p in changed.ports.iter_mut() {
                p.node_port = (changed.kind != ServiceType::ClusterIP).then_some(node_port + p.port % 7);
            }
            if extra_port {
                changed.ports.push(port("extra", Protocol::Udp, 7777, None));
            }
            let mut slices1 = slices.clone();
            for s in slices1.iter_mut().filter(|s| s.service == name) {
                s.endpoints.truncate(keep);
                while s.endpoints.len() < keep {
                    let n = s.endpoints.len();
                    let addr = if s.address_type == AddressType::IPv6 {
                        format!("fd00:198:18::7:{n:x}")
                    } else {
                        format!("198.18.7.{n}")
                    };
                    s.endpoints.push(ready(&addr, if n % 3 == 0 { ME } else { "node-b" }));
                }
            }
            let side = |present: bool, reshaped: bool| {
                let (mut s, mut e) = without(&services, &slices, &name);
                if present {
                    s.push(if reshaped { changed.clone() } else { services[i].clone() });
                    e.extend(if reshaped { slices1.clone() } else { slices.clone() }.into_iter().filter(|x| x.service == name));
                }
                (s, e)
            };
            let (s0, e0) = side(present.0, false);
            let (s1, e1) = side(present.1, true);
            // Node ports the fixture uses elsewhere would clash: then it may decline.
            let clash = s0.iter().chain(&s1).filter(|s| s.name != name).any(|s| {
                s.ports.iter().any(|p| changed.ports.iter().any(|q| p.node_port.is_some() && p.node_port == q.node_port))
            });
            let planned = check((&s0, &e0), (&s1, &e1), &services[i].key())?;
            prop_assert!(planned || clash, "declined without a clash");
        }
    }
}
