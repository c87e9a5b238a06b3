//! A structured model of one nftables table (sets, verdict maps, chains of rule text) with two
//! renderings for `nft -f -`: [`render_full`], one transaction that replaces the whole table, and
//! [`render_diff`], one small transaction that turns the kernel's `old` table into `new` without
//! touching what did not change (so dynamic sets such as session affinity keep their state).
//!
//! Rules are kept as nft text; the model only needs to know which sets (`@name`) and chains
//! (`goto name`, `jump name`) a rule refers to, to order a diff so that every reference resolves.
//! Set and map elements are typed ([`element`]) and become text only here, in nft's order
//! (sorted as text, as `nft` lists them).

pub mod element;
pub mod patch;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use serde::Serialize;

pub use element::{Key, Part, Value, Verdict};

/// One nftables table.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Table {
    /// `inet`, `ip`, `ip6`…
    pub family: String,
    pub name: String,
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, Map>,
    pub chains: BTreeMap<String, Chain>,
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Set {
    /// `ipv4_addr`, `ipv4_addr . inet_proto . inet_service`…
    pub type_: String,
    /// `interval`, `timeout`, `dynamic`.
    pub flags: Vec<String>,
    /// Default element timeout in seconds.
    pub timeout: Option<u32>,
    pub elements: BTreeSet<Key>,
}

/// A named map, e.g. a verdict map.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Map {
    /// The key type.
    pub type_: String,
    /// The value type, e.g. `verdict`.
    pub value: String,
    pub flags: Vec<String>,
    /// Every element carries a counter (`counter;` in the declaration), which the kernel bumps
    /// whenever a lookup finds the element (e.g. a `dnat … map` picking an endpoint).
    pub counter: bool,
    /// `size N;`: the most elements the map holds (the kernel refuses more). The kernel then
    /// sizes its hash table once, instead of growing it (rehashing every element) while a
    /// large map is filled.
    pub size: Option<u64>,
    /// Key -> value, e.g. `10.96.0.10 . tcp . 80` -> `goto svc-…`.
    pub elements: BTreeMap<Key, Value>,
}

/// What makes a chain a base chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseChain {
    /// `nat`, `filter`, `route`.
    pub type_: String,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`.
    pub hook: String,
    /// `dstnat`, `srcnat`, `filter`, `-10`…
    pub priority: String,
    /// `accept` or `drop`.
    pub policy: String,
}

impl BaseChain {
    pub fn new(type_: &str, hook: &str, priority: &str) -> Self {
        Self {
            type_: type_.into(),
            hook: hook.into(),
            priority: priority.into(),
            policy: "accept".into(),
        }
    }

    fn spec(&self) -> String {
        format!(
            "type {} hook {} priority {}; policy {};",
            self.type_, self.hook, self.priority, self.policy
        )
    }
}

/// A chain: a base chain when `base` is set, otherwise a jump/goto target.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Chain {
    pub base: Option<BaseChain>,
    pub rules: Vec<String>,
}

impl Table {
    /// An empty table.
    pub fn new(family: &str, name: &str) -> Self {
        Self {
            family: family.into(),
            name: name.into(),
            ..Self::default()
        }
    }
}

impl Set {
    /// A set whose elements the kernel adds and expires (`update @set { … }`): its elements are
    /// state, not configuration, and a diff leaves them alone.
    pub fn kernel_managed(&self) -> bool {
        self.timeout.is_some() || self.flags.iter().any(|f| f == "timeout" || f == "dynamic")
    }

    fn spec(&self) -> String {
        let mut s = format!("type {};", self.type_);
        if !self.flags.is_empty() {
            let _ = write!(s, " flags {};", self.flags.join(","));
        }
        if let Some(t) = self.timeout {
            let _ = write!(s, " timeout {t}s;");
        }
        s
    }

    /// Whether `other` declares the same set (elements aside).
    pub fn same_definition(&self, other: &Set) -> bool {
        self.type_ == other.type_ && self.flags == other.flags && self.timeout == other.timeout
    }
}

impl Map {
    fn spec(&self) -> String {
        // `typeof EXPR` declares the key by an expression (e.g. numgen's integer).
        let mut s = if self.type_.starts_with("typeof ") {
            format!("{} : {};", self.type_, self.value)
        } else {
            format!("type {} : {};", self.type_, self.value)
        };
        if !self.flags.is_empty() {
            let _ = write!(s, " flags {};", self.flags.join(","));
        }
        if let Some(n) = self.size {
            let _ = write!(s, " size {n};");
        }
        if self.counter {
            s.push_str(" counter;");
        }
        s
    }

    /// Whether `other` declares the same map (elements aside).
    pub fn same_definition(&self, other: &Map) -> bool {
        self.type_ == other.type_
            && self.value == other.value
            && self.flags == other.flags
            && self.counter == other.counter
            && self.size == other.size
    }
}

/// Elements as nft text, sorted (the order `nft` lists them in, and the goldens').
fn sorted_text<T: std::fmt::Display>(e: impl Iterator<Item = T>) -> Vec<String> {
    let mut v: Vec<String> = e.map(|x| x.to_string()).collect();
    v.sort_unstable();
    v
}

fn set_elements<'a>(e: impl Iterator<Item = &'a Key>) -> String {
    sorted_text(e).join(", ")
}

fn map_elements<'a>(e: impl Iterator<Item = (&'a Key, &'a Value)>) -> String {
    by_key_text(e)
        .iter()
        .map(|(k, v)| format!("{k} : {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Map elements with their keys' text, sorted by it.
fn by_key_text<'a>(e: impl Iterator<Item = (&'a Key, &'a Value)>) -> Vec<(String, &'a Value)> {
    let mut v: Vec<(String, &Value)> = e.map(|(k, v)| (k.to_string(), v)).collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The sets and maps a rule refers to (`@name`).
pub fn set_refs(rule: &str) -> impl Iterator<Item = &str> {
    rule.split_whitespace().filter_map(|w| {
        w.strip_prefix('@')
            .map(|n| n.trim_end_matches([',', ';', '}']))
    })
}

/// The chains a rule or a verdict refers to (the word after `goto` or `jump`).
pub fn chain_refs(rule: &str) -> impl Iterator<Item = &str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let mut out = Vec::new();
    for pair in words.windows(2) {
        if pair[0] == "goto" || pair[0] == "jump" {
            out.push(pair[1].trim_end_matches([',', ';', '}']));
        }
    }
    out.into_iter()
}

/// The complete transaction text that (re)creates the table from scratch. The leading
/// `table …` + `delete table …` makes it work whether or not the table exists.
///
/// The table block declares the sets, maps and chains with their rules but no elements; the
/// elements follow as `add element` lines, still in the same transaction (one atomic commit, as
/// before). Order matters to the kernel: a rule binding a map (`… map @m`, `vmap @m`) walks
/// every element the map already holds (a hash-table walk), while an element added to a map
/// only runs a cheap check per rule bound to it. nft expands a table block into chains, then
/// sets with their elements, then rules, so elements inside the block were walked once per
/// binding rule: with 30k services of 10 endpoints (300k elements in 256 shared endpoint maps,
/// 30k binding rules) `nft -f` took 8.0 s with the elements in the block and 5.1 s with them
/// after it (kernel time 5.3 s -> 2.7 s).
pub fn render_full(t: &Table) -> String {
    let (fam, name) = (&t.family, &t.name);
    let mut out = String::new();
    let _ = writeln!(out, "table {fam} {name}");
    let _ = writeln!(out, "delete table {fam} {name}");
    let _ = writeln!(out, "table {fam} {name} {{");
    for (n, s) in &t.sets {
        let _ = writeln!(out, "  set {n} {{");
        let _ = writeln!(out, "    {}", s.spec());
        let _ = writeln!(out, "  }}");
    }
    for (n, m) in &t.maps {
        let _ = writeln!(out, "  map {n} {{");
        let _ = writeln!(out, "    {}", m.spec());
        let _ = writeln!(out, "  }}");
    }
    for (n, c) in &t.chains {
        let _ = writeln!(out, "  chain {n} {{");
        if let Some(b) = &c.base {
            let _ = writeln!(out, "    {}", b.spec());
        }
        for r in &c.rules {
            let _ = writeln!(out, "    {r}");
        }
        let _ = writeln!(out, "  }}");
    }
    let _ = writeln!(out, "}}");
    for (n, s) in t.sets.iter().filter(|(_, s)| !s.elements.is_empty()) {
        out.push_str("add element ");
        let _ = write!(out, "{fam} {name} {n} {{ ");
        push_joined(
            &mut out,
            sorted_text(s.elements.iter()).iter().map(String::as_str),
        );
        out.push_str(" }\n");
    }
    for (n, m) in &t.maps {
        let elements = by_key_text(m.elements.iter());
        push_map_elements(&mut out, &format!("{fam} {name}"), n, elements.into_iter());
    }
    out
}

/// Appends `add element <table> <map> { k : v, … }` (in the order given) and a newline;
/// nothing without elements. `table` is `family name`.
pub fn push_map_elements(
    out: &mut String,
    table: &str,
    map: &str,
    elements: impl Iterator<Item = (impl std::fmt::Display, impl std::fmt::Display)>,
) {
    let mut elements = elements.peekable();
    if elements.peek().is_none() {
        return;
    }
    let _ = write!(out, "add element {table} {map} {{ ");
    for (i, (k, v)) in elements.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{k} : {v}");
    }
    out.push_str(" }\n");
}

/// Appends `items` separated by `, `.
fn push_joined<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    for (i, x) in items.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(x);
    }
}

/// One transaction that turns the table `old` (as applied) into `new`, or `None` when there is
/// nothing to do.
///
/// Order, so that every reference resolves inside the transaction (the kernel refuses a rule or
/// element naming something missing, and deleting something still referenced):
/// 1. new chains, sets and maps (chains empty, so references among them resolve);
/// 2. sets and maps whose definition (type, flags, timeout) changed: the chains whose rules
///    refer to them are flushed, then they are deleted and re-created with their elements. Base
///    chains that become regular chains are re-created here too;
/// 3. every changed chain: `flush chain` + `add rule` lines;
/// 4. element changes of the other sets and maps: `delete element` (removed keys, changed
///    values), then `add element`. Elements of kernel-managed sets ([`Set::kernel_managed`],
///    e.g. session affinity) are state, never diffed;
/// 5. removed chains are flushed, removed maps and sets deleted; chains that become base chains
///    (no longer referenced by now) are re-created with their rules; removed chains deleted.
///
/// If family or name differ, the old table is deleted and the new one rendered in full.
pub fn render_diff(old: &Table, new: &Table) -> Option<String> {
    if old == new {
        return None;
    }
    if old.family != new.family || old.name != new.name {
        let mut out = format!(
            "table {f} {n}\ndelete table {f} {n}\n",
            f = old.family,
            n = old.name
        );
        out.push_str(&render_full(new));
        return Some(out);
    }
    let tbl = format!("{} {}", new.family, new.name);
    let mut out: Vec<String> = Vec::new();

    let recreated_sets: BTreeSet<&str> = new
        .sets
        .iter()
        .filter(|(n, s)| old.sets.get(*n).is_some_and(|o| !o.same_definition(s)))
        .map(|(n, _)| n.as_str())
        .collect();
    let recreated_maps: BTreeSet<&str> = new
        .maps
        .iter()
        .filter(|(n, m)| old.maps.get(*n).is_some_and(|o| !o.same_definition(m)))
        .map(|(n, _)| n.as_str())
        .collect();
    // Chains whose base changed: to a regular chain (re-created early: a base chain is never
    // referenced) or to a base chain (re-created late: once nothing refers to it).
    let rebased: BTreeSet<&str> = new
        .chains
        .iter()
        .filter(|(n, c)| old.chains.get(*n).is_some_and(|o| o.base != c.base))
        .map(|(n, _)| n.as_str())
        .collect();
    let (rebased_late, rebased_early): (BTreeSet<&str>, BTreeSet<&str>) = rebased
        .iter()
        .partition(|n| new.chains.get(**n).is_some_and(|c| c.base.is_some()));
    let flushed_early: BTreeSet<&str> = old
        .chains
        .iter()
        .filter(|(n, c)| {
            !c.rules.is_empty()
                && (rebased_early.contains(n.as_str())
                    || c.rules.iter().any(|r| {
                        set_refs(r)
                            .any(|s| recreated_sets.contains(s) || recreated_maps.contains(s))
                    }))
        })
        .map(|(n, _)| n.as_str())
        .collect();
    let add_chain = |n: &str, c: &Chain| match &c.base {
        Some(b) => format!("add chain {tbl} {n} {{ {} }}", b.spec()),
        None => format!("add chain {tbl} {n}"),
    };
    let add_set = |out: &mut Vec<String>, n: &str, s: &Set| {
        out.push(format!("add set {tbl} {n} {{ {} }}", s.spec()));
        if !s.elements.is_empty() {
            out.push(format!(
                "add element {tbl} {n} {{ {} }}",
                set_elements(s.elements.iter())
            ));
        }
    };
    let add_rules = |out: &mut Vec<String>, n: &str, c: &Chain| {
        for r in &c.rules {
            out.push(format!("add rule {tbl} {n} {r}"));
        }
    };

    // 1. New objects: chains first. nft (1.0.6) refuses an element of an interval verdict map
    // whose `goto` names a chain declared after the map in the same transaction ("No such file
    // or directory"), while a chain declared first is found.
    for (n, c) in new
        .chains
        .iter()
        .filter(|(n, _)| !old.chains.contains_key(*n))
    {
        out.push(add_chain(n, c));
    }
    for (n, s) in new.sets.iter().filter(|(n, _)| !old.sets.contains_key(*n)) {
        add_set(&mut out, n, s);
    }
    for (n, m) in new.maps.iter().filter(|(n, _)| !old.maps.contains_key(*n)) {
        out.push(format!("add map {tbl} {n} {{ {} }}", m.spec()));
    }

    // 2. Re-created sets, maps and chains that became regular.
    for n in &flushed_early {
        out.push(format!("flush chain {tbl} {n}"));
    }
    for n in &rebased_early {
        out.push(format!("delete chain {tbl} {n}"));
        out.push(add_chain(n, &new.chains[*n]));
    }
    for n in &recreated_sets {
        out.push(format!("delete set {tbl} {n}"));
        add_set(&mut out, n, &new.sets[*n]);
    }
    for n in &recreated_maps {
        out.push(format!("delete map {tbl} {n}"));
        out.push(format!("add map {tbl} {n} {{ {} }}", new.maps[*n].spec()));
    }

    // 3. Chain contents.
    for (n, c) in &new.chains {
        if rebased_late.contains(n.as_str()) {
            continue;
        }
        let before = old.chains.get(n);
        let flushed = before.is_none()
            || rebased_early.contains(n.as_str())
            || flushed_early.contains(n.as_str());
        if !flushed && before.is_some_and(|o| o.rules == c.rules) {
            continue;
        }
        if !flushed {
            out.push(format!("flush chain {tbl} {n}"));
        }
        add_rules(&mut out, n, c);
    }

    // 4. Elements.
    for (n, s) in &new.sets {
        let Some(o) = old.sets.get(n) else { continue };
        if recreated_sets.contains(n.as_str()) || s.kernel_managed() {
            continue;
        }
        let gone: Vec<&Key> = o.elements.difference(&s.elements).collect();
        if !gone.is_empty() {
            out.push(format!(
                "delete element {tbl} {n} {{ {} }}",
                set_elements(gone.into_iter())
            ));
        }
        let added: Vec<&Key> = s.elements.difference(&o.elements).collect();
        if !added.is_empty() {
            out.push(format!(
                "add element {tbl} {n} {{ {} }}",
                set_elements(added.into_iter())
            ));
        }
    }
    for (n, m) in &new.maps {
        let before = old
            .maps
            .get(n)
            .filter(|_| !recreated_maps.contains(n.as_str()));
        // Most maps are unchanged: one ordered scan instead of a lookup per element.
        if before.is_some_and(|o| o.elements == m.elements) {
            continue;
        }
        if let Some(o) = before {
            let gone: Vec<&Key> = o
                .elements
                .iter()
                .filter(|(k, v)| m.elements.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            if !gone.is_empty() {
                out.push(format!(
                    "delete element {tbl} {n} {{ {} }}",
                    set_elements(gone.into_iter())
                ));
            }
        }
        let added: Vec<(&Key, &Value)> = m
            .elements
            .iter()
            .filter(|(k, v)| before.is_none_or(|o| o.elements.get(*k) != Some(*v)))
            .collect();
        if !added.is_empty() {
            out.push(format!(
                "add element {tbl} {n} {{ {} }}",
                map_elements(added.into_iter())
            ));
        }
    }

    // 5. Removals, and chains that became base chains.
    let removed_chains: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for n in &removed_chains {
        if !old.chains[*n].rules.is_empty() && !flushed_early.contains(n.as_str()) {
            out.push(format!("flush chain {tbl} {n}"));
        }
    }
    for n in &rebased_late {
        if !old.chains[*n].rules.is_empty() {
            out.push(format!("flush chain {tbl} {n}"));
        }
    }
    for n in old.maps.keys().filter(|n| !new.maps.contains_key(*n)) {
        out.push(format!("delete map {tbl} {n}"));
    }
    for n in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        out.push(format!("delete set {tbl} {n}"));
    }
    for n in &rebased_late {
        out.push(format!("delete chain {tbl} {n}"));
        out.push(add_chain(n, &new.chains[*n]));
        add_rules(&mut out, n, &new.chains[*n]);
    }
    for n in &removed_chains {
        out.push(format!("delete chain {tbl} {n}"));
    }

    if out.is_empty() {
        return None;
    }
    out.push(String::new());
    Some(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Key {
        s.parse().unwrap()
    }

    fn v(s: &str) -> Value {
        s.parse().unwrap()
    }

    fn small() -> Table {
        let mut t = Table::new("inet", "malla");
        t.sets.insert(
            "pools-v4".into(),
            Set {
                type_: "ipv4_addr".into(),
                flags: vec!["interval".into()],
                timeout: None,
                elements: [k("198.18.0.0/16")].into(),
            },
        );
        t.sets.insert(
            "aff".into(),
            Set {
                type_: "ipv4_addr".into(),
                flags: vec!["dynamic".into(), "timeout".into()],
                timeout: Some(60),
                elements: BTreeSet::new(),
            },
        );
        t.maps.insert(
            "service-ips-v4".into(),
            Map {
                type_: "ipv4_addr . inet_proto . inet_service".into(),
                value: "verdict".into(),
                flags: vec![],
                counter: false,
                size: None,
                elements: [
                    (k("10.96.0.10 . tcp . 80"), v("goto svc-a")),
                    (k("10.96.0.11 . tcp . 80"), v("goto svc-b")),
                ]
                .into(),
            },
        );
        t.chains.insert(
            "nat-prerouting".into(),
            Chain {
                base: Some(BaseChain::new("nat", "prerouting", "dstnat")),
                rules: vec!["ip daddr . meta l4proto . th dport vmap @service-ips-v4".into()],
            },
        );
        t.chains.insert(
            "svc-a".into(),
            Chain {
                base: None,
                rules: vec![
                    "ip saddr @aff goto ep-a".into(),
                    "meta l4proto tcp dnat ip to 198.18.0.1:8080".into(),
                ],
            },
        );
        t.chains.insert(
            "ep-a".into(),
            Chain {
                base: None,
                rules: vec![
                    "update @aff { ip saddr }".into(),
                    "meta l4proto tcp dnat ip to 198.18.0.1:8080".into(),
                ],
            },
        );
        t.chains.insert(
            "svc-b".into(),
            Chain {
                base: None,
                rules: vec!["meta l4proto tcp dnat ip to 198.18.0.2:8080".into()],
            },
        );
        t
    }

    #[test]
    fn golden_full() {
        let want = "table inet malla
delete table inet malla
table inet malla {
  set aff {
    type ipv4_addr; flags dynamic,timeout; timeout 60s;
  }
  set pools-v4 {
    type ipv4_addr; flags interval;
  }
  map service-ips-v4 {
    type ipv4_addr . inet_proto . inet_service : verdict;
  }
  chain ep-a {
    update @aff { ip saddr }
    meta l4proto tcp dnat ip to 198.18.0.1:8080
  }
  chain nat-prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr . meta l4proto . th dport vmap @service-ips-v4
  }
  chain svc-a {
    ip saddr @aff goto ep-a
    meta l4proto tcp dnat ip to 198.18.0.1:8080
  }
  chain svc-b {
    meta l4proto tcp dnat ip to 198.18.0.2:8080
  }
}
add element inet malla pools-v4 { 198.18.0.0/16 }
add element inet malla service-ips-v4 { 10.96.0.10 . tcp . 80 : goto svc-a, 10.96.0.11 . tcp . 80 : goto svc-b }
";
        assert_eq!(render_full(&small()), want);
    }

    #[test]
    fn equal_tables_need_no_diff() {
        assert_eq!(render_diff(&small(), &small()), None);
        // Kernel-managed elements are state, not configuration.
        let mut t = small();
        t.sets
            .get_mut("aff")
            .unwrap()
            .elements
            .insert(k("10.0.0.1"));
        assert_eq!(render_diff(&t, &small()), None);
        assert_eq!(render_diff(&small(), &t), None);
    }

    #[test]
    fn golden_diff() {
        let old = small();
        let mut new = small();
        // svc-b goes away, svc-c arrives, svc-a's rules change, pools grow, the affinity set
        // keeps its definition, and a set changes type.
        new.chains.remove("svc-b");
        new.chains.insert(
            "svc-c".into(),
            Chain {
                base: None,
                rules: vec!["meta l4proto tcp dnat ip to 198.18.0.3:8080".into()],
            },
        );
        new.chains.get_mut("svc-a").unwrap().rules[1] = "goto ep-a".into();
        let m = new.maps.get_mut("service-ips-v4").unwrap();
        m.elements.remove(&k("10.96.0.11 . tcp . 80"));
        m.elements
            .insert(k("10.96.0.12 . tcp . 80"), v("goto svc-c"));
        m.elements
            .insert(k("10.96.0.10 . tcp . 80"), v("goto svc-c"));
        new.sets
            .get_mut("pools-v4")
            .unwrap()
            .elements
            .insert(k("198.19.0.0/16"));
        new.sets.get_mut("aff").unwrap().type_ = "ipv6_addr".into();
        new.chains.get_mut("svc-a").unwrap().rules[0] = "ip6 saddr @aff goto ep-a".into();
        new.chains.get_mut("ep-a").unwrap().rules[0] = "update @aff { ip6 saddr }".into();
        let want = "add chain inet malla svc-c
flush chain inet malla ep-a
flush chain inet malla svc-a
delete set inet malla aff
add set inet malla aff { type ipv6_addr; flags dynamic,timeout; timeout 60s; }
add rule inet malla ep-a update @aff { ip6 saddr }
add rule inet malla ep-a meta l4proto tcp dnat ip to 198.18.0.1:8080
add rule inet malla svc-a ip6 saddr @aff goto ep-a
add rule inet malla svc-a goto ep-a
add rule inet malla svc-c meta l4proto tcp dnat ip to 198.18.0.3:8080
add element inet malla pools-v4 { 198.19.0.0/16 }
delete element inet malla service-ips-v4 { 10.96.0.10 . tcp . 80, 10.96.0.11 . tcp . 80 }
add element inet malla service-ips-v4 { 10.96.0.10 . tcp . 80 : goto svc-c, 10.96.0.12 . tcp . 80 : goto svc-c }
flush chain inet malla svc-b
delete chain inet malla svc-b
";
        assert_eq!(render_diff(&old, &new).as_deref(), Some(want));
    }

    #[test]
    fn references_are_found() {
        let r =
            "ip saddr @aff-x goto ep-1, numgen random mod 2 vmap { 0 : goto ep-2, 1 : jump ep-3 }";
        assert_eq!(set_refs(r).collect::<Vec<_>>(), vec!["aff-x"]);
        assert_eq!(
            chain_refs(r).collect::<Vec<_>>(),
            vec!["ep-1", "ep-2", "ep-3"]
        );
        assert_eq!(
            set_refs("update @aff { ip saddr }").collect::<Vec<_>>(),
            vec!["aff"]
        );
    }
}

#[cfg(test)]
mod diff_props {
    //! Applying `render_diff(old, new)` to `old` yields `new`: checked with a small interpreter
    //! of the commands `render_diff` emits, which also enforces the kernel's reference rules
    //! (no dangling reference is created, nothing referenced is deleted).
    use super::*;
    use proptest::prelude::*;

    fn body(s: &str) -> Result<&str, String> {
        let open = s.find('{').ok_or(format!("no {{ in {s}"))?;
        let close = s.rfind('}').ok_or(format!("no }} in {s}"))?;
        Ok(s[open + 1..close].trim())
    }

    fn items(s: &str) -> Vec<&str> {
        s.split(", ")
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .collect()
    }

    fn referenced_set(t: &Table, name: &str) -> bool {
        t.chains
            .values()
            .any(|c| c.rules.iter().any(|r| set_refs(r).any(|s| s == name)))
    }

    fn referenced_chain(t: &Table, name: &str) -> bool {
        t.chains
            .values()
            .any(|c| c.rules.iter().any(|r| chain_refs(r).any(|s| s == name)))
            || t.maps
                .values()
                .any(|m| m.elements.values().any(|v| v.chain() == Some(name)))
    }

    fn check_refs(t: &Table, text: &str) -> Result<(), String> {
        for s in set_refs(text) {
            if !t.sets.contains_key(s) && !t.maps.contains_key(s) {
                return Err(format!("dangling @{s} in {text}"));
            }
        }
        for c in chain_refs(text) {
            if !t.chains.contains_key(c) {
                return Err(format!("dangling chain {c} in {text}"));
            }
        }
        Ok(())
    }

    /// Applies the commands of a diff to `t`.
    fn apply(t: &mut Table, diff: &str) -> Result<(), String> {
        for line in diff.lines() {
            let w: Vec<&str> = line.splitn(6, ' ').collect();
            if w.len() < 5 || w[2] != t.family || w[3] != t.name {
                return Err(format!("bad line {line}"));
            }
            let name = w[4].to_string();
            let rest = w.get(5).copied().unwrap_or("");
            match (w[0], w[1]) {
                ("add", "set") | ("add", "map") => {
                    if t.sets.contains_key(&name) || t.maps.contains_key(&name) {
                        return Err(format!("exists: {line}"));
                    }
                    let mut set = Set::default();
                    let mut map = Map::default();
                    for part in body(rest)?.split(';').map(str::trim) {
                        if let Some(ty) = part.strip_prefix("type ") {
                            match ty.split_once(" : ") {
                                Some((k, v)) => {
                                    map.type_ = k.into();
                                    map.value = v.into();
                                }
                                None => set.type_ = ty.into(),
                            }
                        } else if let Some(f) = part.strip_prefix("flags ") {
                            set.flags = f.split(',').map(String::from).collect();
                            map.flags = set.flags.clone();
                        } else if let Some(to) = part.strip_prefix("timeout ") {
                            set.timeout = Some(to.trim_end_matches('s').parse().unwrap());
                        } else if part == "counter" {
                            map.counter = true;
                        } else if !part.is_empty() {
                            return Err(format!("bad spec {part}"));
                        }
                    }
                    if w[1] == "set" {
                        t.sets.insert(name, set);
                    } else {
                        t.maps.insert(name, map);
                    }
                }
                ("add", "chain") => {
                    if t.chains.contains_key(&name) {
                        return Err(format!("exists: {line}"));
                    }
                    let base = if rest.is_empty() {
                        None
                    } else {
                        let b: Vec<&str> = body(rest)?.split_whitespace().collect();
                        Some(BaseChain {
                            type_: b[1].into(),
                            hook: b[3].into(),
                            priority: b[5].trim_end_matches(';').into(),
                            policy: b[7].trim_end_matches(';').into(),
                        })
                    };
                    t.chains.insert(
                        name,
                        Chain {
                            base,
                            rules: vec![],
                        },
                    );
                }
                ("flush", "chain") => {
                    t.chains
                        .get_mut(&name)
                        .ok_or(format!("no chain: {line}"))?
                        .rules
                        .clear();
                }
                ("add", "rule") => {
                    check_refs(t, rest)?;
                    t.chains
                        .get_mut(&name)
                        .ok_or(format!("no chain: {line}"))?
                        .rules
                        .push(rest.to_string());
                }
                ("add", "element") => {
                    let elems = items(body(rest)?);
                    if let Some(s) = t.sets.get_mut(&name) {
                        for e in elems {
                            if !s.elements.insert(e.parse()?) {
                                return Err(format!("element exists: {line}"));
                            }
                        }
                    } else {
                        for e in &elems {
                            let (_, v) = e.split_once(" : ").ok_or("no value")?;
                            check_refs(t, v)?;
                        }
                        let m = t.maps.get_mut(&name).ok_or(format!("no set: {line}"))?;
                        for e in elems {
                            let (k, v) = e.split_once(" : ").ok_or("no value")?;
                            if m.elements.insert(k.parse()?, v.parse()?).is_some() {
                                return Err(format!("element exists: {line}"));
                            }
                        }
                    }
                }
                ("delete", "element") => {
                    for e in items(body(rest)?) {
                        let key: Key = e.parse()?;
                        let gone = match t.sets.get_mut(&name) {
                            Some(s) => s.elements.remove(&key),
                            None => t
                                .maps
                                .get_mut(&name)
                                .is_some_and(|m| m.elements.remove(&key).is_some()),
                        };
                        if !gone {
                            return Err(format!("no element {e}: {line}"));
                        }
                    }
                }
                ("delete", "set") | ("delete", "map") => {
                    if referenced_set(t, &name) {
                        return Err(format!("busy: {line}"));
                    }
                    let gone = if w[1] == "set" {
                        t.sets.remove(&name).is_some()
                    } else {
                        t.maps.remove(&name).is_some()
                    };
                    if !gone {
                        return Err(format!("missing: {line}"));
                    }
                }
                ("delete", "chain") => {
                    if referenced_chain(t, &name) {
                        return Err(format!("busy: {line}"));
                    }
                    match t.chains.remove(&name) {
                        Some(c) if c.rules.is_empty() => {}
                        Some(_) => return Err(format!("not empty: {line}")),
                        None => return Err(format!("missing: {line}")),
                    }
                }
                _ => return Err(format!("unknown command {line}")),
            }
        }
        Ok(())
    }

    const SET_TYPES: [&str; 2] = ["ipv4_addr", "ipv6_addr"];

    /// Generated: set (type, flags, elements), map (type, elements), chain (base, rules).
    type SetGen = Option<(usize, usize, BTreeSet<u8>)>;
    type MapGen = Option<(usize, BTreeMap<u8, u8>)>;
    type ChainGen = Option<(Option<usize>, Vec<(u8, u8)>)>;

    fn build(sets: Vec<SetGen>, maps: Vec<MapGen>, chains: Vec<ChainGen>) -> Table {
        let mut t = Table::new("inet", "malla");
        for (i, s) in sets.into_iter().enumerate() {
            let Some((ty, flags, elems)) = s else {
                continue;
            };
            let (flags, timeout) = match flags {
                0 => (vec![], None),
                1 => (vec!["interval".to_string()], None),
                2 => (vec!["dynamic".to_string(), "timeout".to_string()], Some(60)),
                _ => (vec!["timeout".to_string()], Some(30)),
            };
            t.sets.insert(
                format!("s{i}"),
                Set {
                    type_: SET_TYPES[ty].into(),
                    flags,
                    timeout,
                    elements: elems
                        .into_iter()
                        .map(|e| Key::one(Part::Int(e.into())))
                        .collect(),
                },
            );
        }
        for (i, m) in maps.into_iter().enumerate() {
            let Some((ty, elems)) = m else { continue };
            t.maps.insert(
                format!("m{i}"),
                Map {
                    type_: SET_TYPES[ty].into(),
                    value: "verdict".into(),
                    flags: vec![],
                    counter: i % 2 == 1,
                    size: None,
                    elements: elems
                        .into_iter()
                        .map(|(k, v)| {
                            let v = match v {
                                0 => Value::Verdict(Verdict::Accept),
                                1 => Value::Verdict(Verdict::Drop),
                                n => Value::goto(format!("c{}", n - 2)),
                            };
                            (Key::one(Part::Int(k.into())), v)
                        })
                        .collect(),
                },
            );
        }
        let bases = [
            BaseChain::new("nat", "prerouting", "dstnat"),
            BaseChain::new("filter", "input", "-10"),
        ];
        for (i, c) in chains.into_iter().enumerate() {
            let Some((base, rules)) = c else { continue };
            let rules = rules
                .into_iter()
                .map(|(kind, a)| match kind {
                    0 => "counter".to_string(),
                    1 => format!("ip saddr @s{} accept", a % 3),
                    2 => format!("ip daddr vmap @m{}", a % 2),
                    3 => format!("jump c{}", a % 4),
                    4 => format!("goto c{}", a % 4),
                    _ => format!("update @s{} {{ ip saddr }}", a % 3),
                })
                .collect();
            t.chains.insert(
                format!("c{i}"),
                Chain {
                    base: base.map(|b| bases[b].clone()),
                    rules,
                },
            );
        }
        // Keep only references that resolve, and never to a base chain (the kernel refuses).
        let snapshot = t.clone();
        let ok = |text: &str| {
            check_refs(&snapshot, text).is_ok()
                && chain_refs(text)
                    .all(|c| snapshot.chains.get(c).is_some_and(|c| c.base.is_none()))
        };
        for c in t.chains.values_mut() {
            c.rules.retain(|r| ok(r));
        }
        for m in t.maps.values_mut() {
            m.elements.retain(|_, v| ok(&v.to_string()));
        }
        t
    }

    fn arb_table() -> impl Strategy<Value = Table> {
        let set = (
            0..2usize,
            0..4usize,
            prop::collection::btree_set(0..4u8, 0..4),
        );
        let map = (0..2usize, prop::collection::btree_map(0..4u8, 0..6u8, 0..4));
        let chain = (
            prop::option::of(0..2usize),
            prop::collection::vec((0..6u8, 0..4u8), 0..4),
        );
        (
            prop::collection::vec(prop::option::of(set), 3),
            prop::collection::vec(prop::option::of(map), 2),
            prop::collection::vec(prop::option::of(chain), 4),
        )
            .prop_map(|(s, m, c)| build(s, m, c))
    }

    /// What the kernel holds after the diff: `new`, except that kernel-managed sets kept with
    /// the same definition keep their old elements.
    fn expected(old: &Table, new: &Table) -> Table {
        let mut want = new.clone();
        for (n, s) in want.sets.iter_mut() {
            if let Some(o) = old.sets.get(n) {
                if s.kernel_managed() && o.same_definition(s) {
                    s.elements = o.elements.clone();
                }
            }
        }
        want
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn diff_turns_old_into_new(old in arb_table(), new in arb_table()) {
            let want = expected(&old, &new);
            let mut got = old.clone();
            match render_diff(&old, &new) {
                None => prop_assert_eq!(&old, &want),
                Some(diff) => {
                    prop_assert!(!diff.is_empty());
                    if let Err(e) = apply(&mut got, &diff) {
                        return Err(TestCaseError::fail(format!("{e}\n--- diff:\n{diff}")));
                    }
                    prop_assert_eq!(&got, &want, "diff:\n{}", diff);
                }
            }
        }

        #[test]
        fn diff_of_a_table_with_itself_is_none(t in arb_table()) {
            prop_assert_eq!(render_diff(&t, &t), None);
        }
    }
}
