//! A change to part of a table, as the objects it touches before and after: the calculation
//! plans one against the table the dataplane last applied (a service created, a policy's chains
//! re-rendered) without rendering or diffing the whole node, and the driver sends it as element
//! changes or as the text diff of the two small tables ([`super::render_diff`] of `before` and
//! `after`, whose order already makes every reference resolve).
//!
//! What the two partial tables mean, per object:
//! - a chain in `after` is the chain's new content (created or replaced); a chain only in
//!   `before` is deleted;
//! - a set or map in both (with the same definition) is touched by elements: `before` holds
//!   the touched elements as they were (removed or replaced), `after` as they become;
//! - a set or map only in `before` is deleted, only in `after` created, whole; one in both
//!   with another definition in `after` is re-created, whole, from `after`.

use super::{Set, Table};

/// The objects a change touches, before and after (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub before: Table,
    pub after: Table,
}

impl Patch {
    /// An empty patch of table `family name`.
    pub fn new(family: &str, name: &str) -> Self {
        Patch {
            before: Table::new(family, name),
            after: Table::new(family, name),
        }
    }

    /// Whether only elements change (no chain, set or map created, deleted or redefined): the
    /// driver can send it over nfnetlink.
    pub fn elements_only(&self) -> bool {
        let (b, a) = (&self.before, &self.after);
        b.chains.is_empty()
            && a.chains.is_empty()
            && b.sets.keys().eq(a.sets.keys())
            && b.maps.keys().eq(a.maps.keys())
            && b.sets
                .iter()
                .all(|(n, s)| a.sets.get(n).is_some_and(|x| x.same_definition(s)))
            && b.maps
                .iter()
                .all(|(n, m)| a.maps.get(n).is_some_and(|x| x.same_definition(m)))
    }

    /// Makes the change to `table` (the table it was planned against).
    pub fn apply_to(&self, table: &mut Table) {
        replace(table, &self.before, &self.after);
    }

    /// Takes the change back from `table`.
    pub fn undo(&self, table: &mut Table) {
        replace(table, &self.after, &self.before);
    }

    /// The `nft` text that makes the change; empty when it changes nothing.
    pub fn text(&self) -> String {
        super::render_diff(&self.before, &self.after).unwrap_or_default()
    }

    /// Drops the sets and maps that no element, creation or deletion touches (declarations
    /// copied in for elements that turned out unchanged).
    pub fn prune(&mut self) {
        let (b, a) = (&mut self.before, &mut self.after);
        let idle_sets: Vec<String> = b
            .sets
            .iter()
            .filter(|(n, s)| {
                a.sets.get(*n).is_some_and(|x| {
                    x.same_definition(s) && s.elements.is_empty() && x.elements.is_empty()
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in idle_sets {
            b.sets.remove(&n);
            a.sets.remove(&n);
        }
        let idle_maps: Vec<String> = b
            .maps
            .iter()
            .filter(|(n, m)| {
                a.maps.get(*n).is_some_and(|x| {
                    x.same_definition(m) && m.elements.is_empty() && x.elements.is_empty()
                })
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in idle_maps {
            b.maps.remove(&n);
            a.maps.remove(&n);
        }
    }
}

/// Turns the objects `from` describes in `table` into those `to` describes.
fn replace(table: &mut Table, from: &Table, to: &Table) {
    for name in from.chains.keys().filter(|n| !to.chains.contains_key(*n)) {
        table.chains.remove(name);
    }
    for (name, c) in &to.chains {
        table.chains.insert(name.clone(), c.clone());
    }
    for (name, s) in &from.sets {
        if to.sets.get(name).is_some_and(|t| t.same_definition(s)) {
            if let Some(t) = table.sets.get_mut(name) {
                for e in &s.elements {
                    t.elements.remove(e);
                }
            }
        } else {
            table.sets.remove(name);
        }
    }
    for (name, s) in &to.sets {
        if from.sets.get(name).is_some_and(|f| f.same_definition(s)) {
            if let Some(t) = table.sets.get_mut(name) {
                t.elements.extend(s.elements.iter().cloned());
            }
        } else {
            table.sets.insert(name.clone(), s.clone());
        }
    }
    for (name, m) in &from.maps {
        if to.maps.get(name).is_some_and(|t| t.same_definition(m)) {
            if let Some(t) = table.maps.get_mut(name) {
                for k in m.elements.keys() {
                    t.elements.remove(k);
                }
            }
        } else {
            table.maps.remove(name);
        }
    }
    for (name, m) in &to.maps {
        if from.maps.get(name).is_some_and(|f| f.same_definition(m)) {
            if let Some(t) = table.maps.get_mut(name) {
                t.elements
                    .extend(m.elements.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        } else {
            table.maps.insert(name.clone(), m.clone());
        }
    }
}

/// `set` with no elements (its declaration, to carry touched elements in a patch), made
/// without copying them.
pub fn declaration_of_set(set: &Set) -> Set {
    Set {
        type_: set.type_.clone(),
        flags: set.flags.clone(),
        timeout: set.timeout,
        elements: Default::default(),
    }
}

/// `map` with no elements, made without copying them.
pub fn declaration_of_map(map: &super::Map) -> super::Map {
    super::Map {
        type_: map.type_.clone(),
        value: map.value.clone(),
        flags: map.flags.clone(),
        counter: map.counter,
        size: map.size,
        elements: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Chain, Key, Map, Value};
    use super::*;

    fn k(s: &str) -> Key {
        s.parse().unwrap()
    }

    fn table() -> Table {
        let mut t = Table::new("inet", "malla");
        t.maps.insert(
            "ips".into(),
            Map {
                type_: "ipv4_addr . inet_proto . inet_service".into(),
                value: "verdict".into(),
                elements: [(k("198.19.0.1 . tcp . 80"), Value::goto("a"))].into(),
                ..Map::default()
            },
        );
        t.chains.insert("a".into(), Chain::default());
        t
    }

    #[test]
    fn a_patch_applied_and_undone_restores_the_table_and_its_text_is_the_diff() {
        let t0 = table();
        let mut p = Patch::new("inet", "malla");
        let ips = declaration_of_map(&t0.maps["ips"]);
        p.before.maps.insert("ips".into(), ips.clone());
        let mut added = ips;
        added
            .elements
            .insert(k("198.19.0.2 . tcp . 80"), Value::goto("b"));
        p.after.maps.insert("ips".into(), added);
        p.after.chains.insert(
            "b".into(),
            Chain {
                base: None,
                rules: vec!["drop".into()],
            },
        );
        assert!(!p.elements_only());
        let mut t = t0.clone();
        p.apply_to(&mut t);
        let mut want = t0.clone();
        want.chains.insert("b".into(), p.after.chains["b"].clone());
        want.maps
            .get_mut("ips")
            .unwrap()
            .elements
            .insert(k("198.19.0.2 . tcp . 80"), Value::goto("b"));
        assert_eq!(t, want);
        // The patch's text is the whole tables' diff.
        assert_eq!(
            p.text(),
            super::super::render_diff(&t0, &want).unwrap_or_default()
        );
        p.undo(&mut t);
        assert_eq!(t, t0);
    }
}
