//! The elements of the `dispatch-<v4|v6>-<proto>` maps: each plain service port's endpoints,
//! keyed by `cluster IP . port . index` (see the module doc of [`crate::services`]).
//!
//! They are a function of the service map alone, so the rendered table declares the maps but
//! does not hold their elements: at 30k services that is 300k elements the agent would keep
//! twice (as endpoints and as text). They are generated when the kernel needs all of them (a
//! node's first load, a full replace) and diffed from two service maps when it needs a change.
//!
//! A frontend's elements belong to the first entry in map order that has endpoints and
//! answers on that address and port, as [`super::render_services`] gives the `service-ips-…`
//! element to the first such entry; only a plain entry's frontends have dispatch elements.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use malla_api::service::Protocol;

use super::{dispatch_map, IpFamily, ServiceEndpoint, ServiceEntry, ServiceMap};
use crate::nft::{self, Key, Part, Value};

/// A frontend whose endpoints a dispatch map holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frontend {
    pub family: IpFamily,
    pub protocol: Protocol,
    pub ip: IpAddr,
    pub port: u16,
}

impl Frontend {
    /// The dispatch map holding this frontend's endpoints.
    pub fn map(&self) -> String {
        dispatch_map(self.family, self.protocol.nft())
    }

    /// The key of its `i`th endpoint: `address . port . i`.
    pub fn key(&self, i: usize) -> Key {
        Key::new([
            Part::Addr(self.ip),
            Part::port(self.port),
            Part::Int(i as u32),
        ])
    }
}

/// `address . port`: an endpoint as a dispatch map's value.
pub fn value(ep: &ServiceEndpoint) -> Value {
    super::endpoint_value(ep.ip, ep.port)
}

/// Every frontend of a plain entry that owns it, with that entry's endpoints.
pub fn lists(map: &ServiceMap) -> BTreeMap<Frontend, &[ServiceEndpoint]> {
    lists_of(&map.entries)
}

/// [`lists`] of some entries (in map order) alone.
pub fn lists_of(entries: &[ServiceEntry]) -> BTreeMap<Frontend, &[ServiceEndpoint]> {
    let mut claimed = BTreeSet::new();
    let mut out = BTreeMap::new();
    for e in entries.iter().filter(|e| !e.cluster_endpoints.is_empty()) {
        for f in &e.frontends {
            let owned = Frontend {
                family: e.family,
                protocol: e.protocol,
                ip: f.ip,
                port: f.port,
            };
            if claimed.insert(owned) && e.is_plain() {
                out.insert(owned, &*e.cluster_endpoints);
            }
        }
    }
    out
}

/// Whether an entry before `e` in map order (by service, protocol, port, family), with
/// endpoints, answers on `f`: then that entry owns it, not `e`. The same rule as [`lists`],
/// for one frontend.
pub fn claimed_before(map: &ServiceMap, e: &ServiceEntry, f: &Frontend) -> bool {
    fn order(x: &ServiceEntry) -> (&str, Protocol, u16, IpFamily) {
        (&*x.service, x.protocol, x.port, x.family)
    }
    let at = order(e);
    map.entries.iter().take_while(|x| order(x) < at).any(|x| {
        !x.cluster_endpoints.is_empty()
            && (x.family, x.protocol) == (f.family, f.protocol)
            && x.frontends.iter().any(|g| (g.ip, g.port) == (f.ip, f.port))
    })
}

/// How many elements `entries` give the dispatch map of `family` and `protocol`, counting
/// every frontend as owned: the count itself when no two services share an address and port
/// (Kubernetes gives each its own cluster IP), more otherwise. It sizes the map (see
/// [`super::map_size`]), so the size never falls short of the elements.
pub fn count<'a>(
    entries: impl IntoIterator<Item = &'a ServiceEntry>,
    family: IpFamily,
    protocol: Protocol,
) -> usize {
    entries
        .into_iter()
        .filter(|e| e.is_plain() && (e.family, e.protocol) == (family, protocol))
        .map(|e| e.frontends.len() * e.cluster_endpoints.len())
        .sum()
}

/// Element changes to the dispatch maps.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// `(map, key, value, replaces)`: an element added, or given a new value when `replaces`.
    pub set: Vec<(String, Key, Value, bool)>,
    /// `(map, key)`: elements removed.
    pub removed: Vec<(String, Key)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }

    /// The changes as `nft` lines for table `tbl` (`family name`): deletions (removed keys,
    /// replaced values), then additions.
    pub fn text(&self, tbl: &str) -> String {
        let mut deleted: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut added: BTreeMap<&str, Vec<(Key, Value)>> = BTreeMap::new();
        for (m, k) in &self.removed {
            deleted.entry(m).or_default().push(k.to_string());
        }
        for (m, k, v, replaces) in &self.set {
            if *replaces {
                deleted.entry(m).or_default().push(k.to_string());
            }
            added.entry(m).or_default().push((k.clone(), v.clone()));
        }
        let mut out = String::new();
        for (m, keys) in deleted {
            out.push_str(&format!(
                "delete element {tbl} {m} {{ {} }}\n",
                keys.join(", ")
            ));
        }
        for (m, els) in &added {
            add_lines(&mut out, tbl, m, els);
        }
        out
    }

    /// Adds the changes of frontend `f`'s endpoints going from `before` to `after`: the
    /// indices whose endpoint changed, appeared or went.
    pub fn push(&mut self, f: &Frontend, before: &[ServiceEndpoint], after: &[ServiceEndpoint]) {
        let map = f.map();
        for i in 0..before.len().max(after.len()) {
            match (before.get(i), after.get(i)) {
                (Some(b), Some(a)) if (b.ip, b.port) == (a.ip, a.port) => {}
                (b, Some(a)) => self
                    .set
                    .push((map.clone(), f.key(i), value(a), b.is_some())),
                (Some(_), None) => self.removed.push((map.clone(), f.key(i))),
                (None, None) => {}
            }
        }
    }
}

/// From the dispatch elements of `old` to those of `new`.
pub fn diff(old: &ServiceMap, new: &ServiceMap) -> Changes {
    let (before, after) = (lists(old), lists(new));
    let frontends: BTreeSet<&Frontend> = before.keys().chain(after.keys()).collect();
    let mut out = Changes::default();
    for f in frontends {
        let b = before.get(f).copied().unwrap_or_default();
        let a = after.get(f).copied().unwrap_or_default();
        if b != a {
            out.push(f, b, a);
        }
    }
    out
}

/// Every element, grouped by map: `map -> [(key, value)]`.
pub fn elements(map: &ServiceMap) -> BTreeMap<String, Vec<(Key, Value)>> {
    elements_of(map, |_| true)
}

/// The elements of the dispatch maps `keep` names, grouped by map.
fn elements_of(
    map: &ServiceMap,
    keep: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<(Key, Value)>> {
    by_map(map)
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, lists)| (name, lazy_elements(lists).collect()))
        .collect()
}

/// The owned frontends of [`lists`] with their endpoints, grouped by dispatch map.
pub fn by_map(map: &ServiceMap) -> BTreeMap<String, Vec<(Frontend, &[ServiceEndpoint])>> {
    let mut out: BTreeMap<String, Vec<(Frontend, &[ServiceEndpoint])>> = BTreeMap::new();
    for (f, eps) in lists(map) {
        out.entry(f.map()).or_default().push((f, eps));
    }
    out
}

/// The `(key, value)` elements of `lists` (one map's, from [`by_map`]), made one at a time as
/// they are read: a node's first load sends 300k of them, which need not exist all at once.
pub fn lazy_elements<'a>(
    lists: Vec<(Frontend, &'a [ServiceEndpoint])>,
) -> impl Iterator<Item = (Key, Value)> + 'a {
    lists.into_iter().flat_map(|(f, eps)| {
        eps.iter()
            .enumerate()
            .map(move |(i, ep)| (f.key(i), value(ep)))
    })
}

fn add_lines(out: &mut String, tbl: &str, map: &str, elements: &[(Key, Value)]) {
    nft::push_map_elements(out, tbl, map, elements.iter().map(|(k, v)| (k, v)));
}

/// `add element` lines for every element of `map`, to follow [`nft::render_full`] of `table`.
pub fn render_full(table: &nft::Table, map: &ServiceMap) -> String {
    let tbl = format!("{} {}", table.family, table.name);
    let mut out = String::new();
    for (m, els) in elements(map) {
        add_lines(&mut out, &tbl, &m, &els);
    }
    out
}

/// The text that follows [`nft::render_diff`] of `old_table` to `new_table`: every element of
/// a dispatch map that diff creates or re-creates (its size changed), the changes of the others.
pub fn render_diff(
    old_table: &nft::Table,
    new_table: &nft::Table,
    old: &ServiceMap,
    new: &ServiceMap,
) -> String {
    let tbl = format!("{} {}", new_table.family, new_table.name);
    let fresh = |m: &str| match (old_table.maps.get(m), new_table.maps.get(m)) {
        (Some(o), Some(n)) => !o.same_definition(n),
        _ => true,
    };
    let mut out = String::new();
    // Only the maps the table diff creates get every element (usually none).
    let all = elements_of(new, fresh);
    let mut changes = diff(old, new);
    // The maps the table diff creates get every element (below), not changes.
    changes.removed.retain(|(m, _)| !fresh(m));
    changes.set.retain(|(m, ..)| !fresh(m));
    out.push_str(&changes.text(&tbl));
    for (m, els) in &all {
        add_lines(&mut out, &tbl, m, els);
    }
    out
}
