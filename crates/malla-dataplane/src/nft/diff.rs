//! The change from one rendered nft table to the next as element changes alone, when that is
//! all that changed (an endpoint moving, a pod joining an address set): the nft manager then
//! sends them over nfnetlink ([`crate::nft::elements`]) instead of running `nft`, which would
//! first read the whole table back from the kernel. Anything else (a chain, a rule, a set's
//! definition, an interval set other than an address set, a type it cannot encode) yields None,
//! and the caller uses the text diff. An address set's prefixes travel as their intervals' two
//! elements ([`Element::interval`]). Also the encoding of the calculation's endpoint plans ([`plan_changes`]): the
//! deltas come as data, nothing here computes them.

use std::collections::BTreeMap;

use crate::nft::elements::{Element, Kind, Layout, SetChange, Value, NFPROTO_INET};
use malla_calc::nft::Key;
use malla_calc::nft::Table;
use malla_calc::services::{self, EndpointDelta, EndpointPlan, ServiceMap};

/// The `nfgenmsg` family of a table family name.
pub fn family(name: &str) -> Option<u8> {
    match name {
        "inet" => Some(NFPROTO_INET),
        "ip" => Some(libc::NFPROTO_IPV4 as u8),
        "ip6" => Some(libc::NFPROTO_IPV6 as u8),
        _ => None,
    }
}

/// The layout of a map's elements, if they can be encoded.
pub fn map_layout(m: &malla_calc::nft::Map) -> Option<Layout> {
    Some(Layout {
        key: Kind::of_key(&m.type_)?,
        value: if m.value == "verdict" {
            Value::Verdict
        } else {
            Value::Data(Kind::of_data(&m.value)?)
        },
    })
}

/// What turns `old` into `new`, as element changes per set and map; None when anything but
/// elements changed or a touched set cannot be encoded. Sets whose elements the kernel manages
/// (timeouts: session affinity) are left alone, as the text diff does.
pub fn element_changes(old: &Table, new: &Table) -> Option<Vec<SetChange>> {
    if old.family != new.family || old.name != new.name || old.chains != new.chains {
        return None;
    }
    if !old.sets.keys().eq(new.sets.keys()) || !old.maps.keys().eq(new.maps.keys()) {
        return None;
    }
    let mut out = Vec::new();
    for (name, n) in &new.sets {
        let o = old.sets.get(name)?;
        if o.type_ != n.type_ || o.flags != n.flags || o.timeout != n.timeout {
            return None;
        }
        if n.kernel_managed() || o.elements == n.elements {
            continue;
        }
        let key = Kind::of_key(&n.type_)?;
        let (delete, add) = if n.flags.iter().any(|f| f == "interval") {
            // An address set's prefixes, each as its interval's two elements (no other
            // interval set is encoded here).
            if !matches!(key.as_slice(), [Kind::Ipv4] | [Kind::Ipv6]) {
                return None;
            }
            let bounds = |keys: Vec<&Key>| -> Option<Vec<Element>> {
                let mut out = Vec::with_capacity(2 * keys.len());
                for k in keys {
                    out.extend(Element::interval(k)?);
                }
                Some(out)
            };
            (
                bounds(o.elements.difference(&n.elements).collect())?,
                bounds(n.elements.difference(&o.elements).collect())?,
            )
        } else {
            let element = |k: &Key| Element::key(k.clone());
            (
                o.elements.difference(&n.elements).map(element).collect(),
                n.elements.difference(&o.elements).map(element).collect(),
            )
        };
        out.push(SetChange {
            set: name.clone(),
            layout: Layout {
                key,
                value: Value::None,
            },
            delete,
            add,
        });
    }
    for (name, n) in &new.maps {
        let o = old.maps.get(name)?;
        if !o.same_definition(n) {
            return None;
        }
        if o.elements == n.elements {
            continue;
        }
        if n.flags.iter().any(|f| f == "interval") {
            return None;
        }
        let layout = map_layout(n)?;
        // A key whose value changed is deleted, then added again (one batch, in that order).
        let delete = o
            .elements
            .iter()
            .filter(|(k, v)| n.elements.get(*k) != Some(*v))
            .map(|(k, _)| Element::key(k.clone()))
            .collect();
        let add = n
            .elements
            .iter()
            .filter(|(k, v)| o.elements.get(*k) != Some(*v))
            .map(|(k, v)| Element::pair(k.clone(), v.clone()))
            .collect();
        out.push(SetChange {
            set: name.clone(),
            layout,
            delete,
            add,
        });
    }
    Some(out)
}

/// The change to set `name` in `by_set`, started with its layout the first time.
fn change_for<'m, 'n>(
    by_set: &'m mut BTreeMap<&'n str, SetChange>,
    name: &'n str,
    layout: impl FnOnce() -> Option<Layout>,
) -> Option<&'m mut SetChange> {
    if !by_set.contains_key(name) {
        by_set.insert(
            name,
            SetChange {
                set: name.to_string(),
                layout: layout()?,
                delete: Vec::new(),
                add: Vec::new(),
            },
        );
    }
    by_set.get_mut(name)
}

/// A service's [`EndpointDelta`] as element changes, with the layouts of `table`'s sets and
/// maps (`replaces`: whether the delta's map value replaces one there); None when one cannot
/// be encoded.
pub fn delta_changes(
    table: &Table,
    delta: &EndpointDelta,
    replaces: impl Fn(&str, &Key) -> bool,
) -> Option<Vec<SetChange>> {
    let mut by_set: BTreeMap<&str, SetChange> = BTreeMap::new();
    for (map, key, value) in &delta.map_values {
        let m = table.maps.get(map)?;
        change_for(&mut by_set, map, || map_layout(m))?.put(key, value, replaces(map, key));
    }
    for (sets, adding) in [(&delta.set_removed, false), (&delta.set_added, true)] {
        for (set, element) in sets {
            let s = table.sets.get(set)?;
            if s.flags.iter().any(|f| f == "interval") {
                return None;
            }
            let change = change_for(&mut by_set, set, || {
                Some(Layout {
                    key: Kind::of_key(&s.type_)?,
                    value: Value::None,
                })
            })?;
            let e = Element::key(element.clone());
            if adding {
                change.add.push(e);
            } else {
                change.delete.push(e);
            }
        }
    }
    let mut changes: Vec<SetChange> = by_set.into_values().collect();
    changes.extend(dispatch_changes(table, &delta.dispatch)?);
    Some(changes)
}

/// What turns the ruleset of `old_table` (rendered from `old`) into that of `new_table` (from
/// `new`) as element changes: the tables' (see [`element_changes`]) and the dispatch maps'.
pub fn ruleset_changes(
    old_table: &Table,
    new_table: &Table,
    old: &ServiceMap,
    new: &ServiceMap,
) -> Option<Vec<SetChange>> {
    let mut changes = element_changes(old_table, new_table)?;
    changes.extend(dispatch_changes(
        new_table,
        &services::dispatch::diff(old, new),
    )?);
    Some(changes)
}

/// Changes to the `dispatch-…` maps as element changes, with the layouts `table` declares for
/// them; None when one is not declared or cannot be encoded.
pub fn dispatch_changes(table: &Table, c: &services::dispatch::Changes) -> Option<Vec<SetChange>> {
    let mut by_map: BTreeMap<&str, SetChange> = BTreeMap::new();
    for (map, key) in &c.removed {
        let m = table.maps.get(map)?;
        change_for(&mut by_map, map, || map_layout(m))?
            .delete
            .push(Element::key(key.clone()));
    }
    for (map, key, value, replaces) in &c.set {
        let m = table.maps.get(map)?;
        change_for(&mut by_map, map, || map_layout(m))?.put(key, value, *replaces);
    }
    Some(by_map.into_values().collect())
}

/// The element changes of `plan`, made by the calculation against `table` (see
/// [`malla_calc::services::plan_service_changes`]); None when one cannot be encoded or the
/// plan creates or deletes objects (a service's chains: its text then).
pub fn plan_changes(table: &Table, plan: &EndpointPlan) -> Option<Vec<SetChange>> {
    let mut out = Vec::new();
    for c in &plan.changes {
        if let Some(p) = &c.patch {
            if !p.elements_only() {
                return None;
            }
            out.extend(element_changes(&p.before, &p.after)?);
        }
        out.extend(delta_changes(table, &c.delta, |map, key| {
            c.replaces(map, key)
        })?);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_calc::nft::{Chain, Map, Set};

    fn k(s: &str) -> Key {
        s.parse().unwrap()
    }

    fn v(s: &str) -> malla_calc::nft::Value {
        s.parse().unwrap()
    }

    fn table() -> Table {
        let mut t = Table::new("inet", "malla");
        t.maps.insert(
            "endpoints-v4-tcp-00".into(),
            Map {
                type_: "typeof numgen random mod 2".into(),
                value: "ip daddr . tcp dport".into(),
                counter: true,
                elements: [(k("0"), v("198.18.0.5 . 80"))].into(),
                ..Map::default()
            },
        );
        t.maps.insert(
            "service-ips-v4".into(),
            Map {
                type_: "ipv4_addr . inet_proto . inet_service".into(),
                value: "verdict".into(),
                elements: [(k("198.19.64.2 . tcp . 80"), v("goto svc-a"))].into(),
                ..Map::default()
            },
        );
        t.sets.insert(
            "hairpin-v4".into(),
            Set {
                type_: "ipv4_addr . ipv4_addr".into(),
                ..Set::default()
            },
        );
        t.sets.insert(
            "aff-x".into(),
            Set {
                type_: "ipv4_addr".into(),
                flags: vec!["dynamic".into(), "timeout".into()],
                timeout: Some(10),
                ..Set::default()
            },
        );
        t.chains.insert("svc-a".into(), Chain::default());
        t
    }

    #[test]
    fn an_endpoint_move_is_a_delete_and_an_add_of_its_index() {
        let old = table();
        let mut new = table();
        new.maps
            .get_mut("endpoints-v4-tcp-00")
            .unwrap()
            .elements
            .insert(k("0"), v("198.18.0.9 . 80"));
        new.sets
            .get_mut("hairpin-v4")
            .unwrap()
            .elements
            .insert(k("198.18.0.9 . 198.18.0.9"));
        // Kernel-managed: ignored.
        new.sets
            .get_mut("aff-x")
            .unwrap()
            .elements
            .insert(k("1.2.3.4"));
        let c = element_changes(&old, &new).unwrap();
        assert_eq!(c.len(), 2, "{c:?}");
        let ep = c.iter().find(|c| c.set == "endpoints-v4-tcp-00").unwrap();
        assert_eq!(ep.layout.key, [Kind::HostU32]);
        assert_eq!(ep.layout.value, Value::Data(vec![Kind::Ipv4, Kind::Port]));
        assert_eq!(ep.delete.len(), 1);
        assert_eq!(ep.add[0].value, Some(v("198.18.0.9 . 80")));
        let hp = c.iter().find(|c| c.set == "hairpin-v4").unwrap();
        assert_eq!(hp.layout.key, [Kind::Ipv4, Kind::Ipv4]);
        assert!(hp.delete.is_empty() && hp.add.len() == 1);
        assert_eq!(element_changes(&old, &old).unwrap(), []);
    }

    #[test]
    fn anything_but_elements_needs_the_text_diff() {
        let old = table();
        let mut chain = table();
        chain.chains.insert("svc-b".into(), Chain::default());
        assert!(element_changes(&old, &chain).is_none());
        let mut rule = table();
        rule.chains
            .get_mut("svc-a")
            .unwrap()
            .rules
            .push("drop".into());
        assert!(element_changes(&old, &rule).is_none());
        let mut map = table();
        map.maps.remove("service-ips-v4");
        assert!(element_changes(&old, &map).is_none());
        let mut retyped = table();
        retyped.maps.get_mut("endpoints-v4-tcp-00").unwrap().counter = false;
        assert!(element_changes(&old, &retyped).is_none());
        let mut unknown = table();
        unknown.sets.insert(
            "odd".into(),
            Set {
                type_: "ether_addr".into(),
                ..Set::default()
            },
        );
        let mut unknown2 = unknown.clone();
        unknown2
            .sets
            .get_mut("odd")
            .unwrap()
            .elements
            .insert(k("1"));
        assert!(element_changes(&unknown, &unknown2).is_none());
    }
}
