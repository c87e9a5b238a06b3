//! Tests only: an interpreter of the rendered `inet malla` table, so the property tests check
//! what the kernel would do with the ruleset text, not only the compiler's model of it.
//!
//! It runs a base chain (the forward hook's, or the input hook's for a pod's traffic to its own
//! node) for the first packet of a connection with nftables' semantics:
//! rules in order; `jump` pushes a return point, `goto` does not; `return` and falling off the
//! end of a regular chain go back to the last return point, and at the base chain (or after a
//! `goto` from it) the chain's policy applies; a verdict map lookup that finds nothing ends the
//! rule without a verdict. It understands exactly the statements the policy renderer writes
//! and fails on anything else, so a new rendering cannot slip past it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::service::Protocol;

use crate::nft;

/// The first packet of a new connection, as the forward hook sees it.
#[derive(Debug, Clone)]
pub struct Packet<'a> {
    pub iifname: &'a str,
    pub oifname: &'a str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
    /// The source port (Calico rules may match it).
    pub sport: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone)]
enum Cond {
    /// `ct state A,B`: true when the list holds `new`.
    CtNew(bool),
    /// `ip|ip6 saddr|daddr [!=] @set`, or an anonymous set `{ … }` of networks.
    Addr {
        v6: bool,
        dst: bool,
        neg: bool,
        set: AddrSet,
    },
    /// `meta nfproto ipv4|ipv6`.
    Nfproto { v6: bool },
    /// `meta l4proto [!=] P`.
    Proto { neg: bool, name: String },
    /// `th dport|sport [!=] N`, `A-B`, `{ … }`.
    Port {
        sport: bool,
        neg: bool,
        ranges: Vec<(u16, u16)>,
    },
    /// `icmpv6 type { … }` (neighbour discovery): never true of the transport packets run here.
    Icmpv6Type,
}

#[derive(Debug, Clone)]
enum AddrSet {
    Named(String),
    Nets(Vec<IpNet>),
}

#[derive(Debug, Clone)]
enum Action {
    Verdict(Verdict),
    /// `iifname vmap @m` (false) / `oifname vmap @m` (true).
    IfVmap {
        out: bool,
        map: String,
    },
    /// `th dport vmap @m` (after `meta l4proto P`).
    PortVmap(String),
    /// A rule without a verdict (only conditions): nothing happens.
    None,
}

#[derive(Debug, Clone)]
struct Rule {
    conds: Vec<Cond>,
    action: Action,
    /// A Malla log statement's prefix (`malla:…`), read back by [`Eval::run`].
    log: Option<String>,
}

struct Chain {
    base: bool,
    policy_accept: bool,
    rules: Vec<Rule>,
}

/// A parsed table.
pub struct Eval {
    sets: BTreeMap<String, (bool, Vec<IpNet>)>,
    if_maps: BTreeMap<String, BTreeMap<String, Verdict>>,
    port_maps: BTreeMap<String, Vec<(u16, u16, Verdict)>>,
    chains: BTreeMap<String, Chain>,
    base: String,
}

fn parse_verdict(w: &[&str]) -> Result<Verdict, String> {
    Ok(match w {
        ["accept"] => Verdict::Accept,
        ["drop"] => Verdict::Drop,
        ["return"] => Verdict::Return,
        ["jump", c] => Verdict::Jump(c.to_string()),
        ["goto", c] => Verdict::Goto(c.to_string()),
        _ => return Err(format!("not a verdict: {w:?}")),
    })
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let p = |x: &str| x.parse::<u16>().map_err(|e| format!("port {x}: {e}"));
    match s.split_once('-') {
        Some((a, b)) => Ok((p(a)?, p(b)?)),
        None => {
            let n = p(s)?;
            Ok((n, n))
        }
    }
}

fn strip_comment(rule: &str) -> &str {
    match rule.find(" comment \"") {
        Some(i) => &rule[..i],
        None => rule.strip_prefix("comment \"").map_or(rule, |_| ""),
    }
}

fn parse_rule(text: &str) -> Result<Rule, String> {
    let w: Vec<&str> = strip_comment(text).split_whitespace().collect();
    let mut conds = Vec::new();
    let mut log: Option<String> = None;
    let mut i = 0;
    let bad = |i: usize| format!("cannot read {:?} at word {i} of {text:?}", w.get(i));
    while i < w.len() {
        match w[i] {
            "ct" if w.get(i + 1) == Some(&"state") => {
                let states = w.get(i + 2).ok_or_else(|| bad(i))?;
                conds.push(Cond::CtNew(states.split(',').any(|s| s == "new")));
                i += 3;
            }
            "ip" | "ip6" => {
                let dst = match w.get(i + 1) {
                    Some(&"saddr") => false,
                    Some(&"daddr") => true,
                    _ => return Err(bad(i + 1)),
                };
                let mut j = i + 2;
                let neg = w.get(j) == Some(&"!=");
                if neg {
                    j += 1;
                }
                let set = if w.get(j) == Some(&"{") {
                    let mut nets = Vec::new();
                    j += 1;
                    while w.get(j).is_some_and(|x| *x != "}") {
                        let t = w[j].trim_end_matches(',');
                        let n = t
                            .parse::<IpNet>()
                            .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|e| format!("{t}: {e} in {text:?}"))?;
                        nets.push(n);
                        j += 1;
                    }
                    if w.get(j) != Some(&"}") {
                        return Err(bad(j));
                    }
                    AddrSet::Nets(nets)
                } else {
                    let set = w
                        .get(j)
                        .and_then(|s| s.strip_prefix('@'))
                        .ok_or_else(|| bad(j))?;
                    AddrSet::Named(set.to_string())
                };
                conds.push(Cond::Addr {
                    v6: w[i] == "ip6",
                    dst,
                    neg,
                    set,
                });
                i = j + 1;
            }
            "th" if w.get(i + 1..i + 3) == Some(&["dport", "vmap"][..]) => {
                if !conds.iter().any(|c| matches!(c, Cond::Proto { .. })) {
                    return Err(format!("th dport without meta l4proto in {text:?}"));
                }
                let map = w
                    .get(i + 3)
                    .and_then(|s| s.strip_prefix('@'))
                    .ok_or_else(|| bad(i + 3))?;
                if i + 4 != w.len() {
                    return Err(bad(i + 4));
                }
                return Ok(Rule {
                    conds,
                    action: Action::PortVmap(map.to_string()),
                    log,
                });
            }
            // Flow-log statements (policy::flowlog): no effect on the verdict. A deny log's
            // `limit rate over … goto flowlog-lost-…` (the lost chain gives the same verdict
            // as the rules after it) is never over its limit for the one connection run here.
            "limit" if w.get(i + 1) == Some(&"rate") && w.get(i + 2) == Some(&"over") => {
                return Ok(Rule {
                    conds: vec![Cond::Icmpv6Type],
                    action: Action::None,
                    log: None,
                });
            }
            "limit" if w.get(i + 1) == Some(&"rate") => {
                i += 3;
                if w.get(i) == Some(&"burst") {
                    i += 3;
                }
            }
            "log" => {
                i += 1;
                while let Some(&opt) = w.get(i) {
                    match opt {
                        "group" => i += 2,
                        "prefix" => {
                            let p = w.get(i + 1).ok_or_else(|| bad(i + 1))?.trim_matches('"');
                            if p.starts_with("malla:") {
                                log = Some(p.to_string());
                            }
                            i += 2;
                        }
                        _ => break,
                    }
                }
            }
            "meta" if w.get(i + 1) == Some(&"l4proto") => {
                let neg = w.get(i + 2) == Some(&"!=");
                let at = if neg { i + 3 } else { i + 2 };
                let p = w.get(at).ok_or_else(|| bad(at))?;
                conds.push(Cond::Proto {
                    neg,
                    name: p.to_string(),
                });
                i = at + 1;
            }
            "meta" if w.get(i + 1) == Some(&"nfproto") => {
                let v6 = match w.get(i + 2) {
                    Some(&"ipv4") => false,
                    Some(&"ipv6") => true,
                    _ => return Err(bad(i + 2)),
                };
                conds.push(Cond::Nfproto { v6 });
                i += 3;
            }
            "th" if matches!(w.get(i + 1), Some(&"dport") | Some(&"sport")) => {
                let sport = w[i + 1] == "sport";
                let neg = w.get(i + 2) == Some(&"!=");
                if neg {
                    i += 1;
                }
                let mut ranges = Vec::new();
                if w.get(i + 2) == Some(&"{") {
                    let mut j = i + 3;
                    while w.get(j).is_some_and(|x| *x != "}") {
                        ranges.push(parse_port_range(w[j].trim_end_matches(','))?);
                        j += 1;
                    }
                    if w.get(j) != Some(&"}") {
                        return Err(bad(j));
                    }
                    i = j + 1;
                } else {
                    ranges.push(parse_port_range(w.get(i + 2).ok_or_else(|| bad(i + 2))?)?);
                    i += 3;
                }
                conds.push(Cond::Port { sport, neg, ranges });
            }
            "icmpv6" if w.get(i + 1..i + 3) == Some(&["type", "{"][..]) => {
                let mut j = i + 3;
                while w.get(j).is_some_and(|x| *x != "}") {
                    j += 1;
                }
                if w.get(j) != Some(&"}") {
                    return Err(bad(j));
                }
                conds.push(Cond::Icmpv6Type);
                i = j + 1;
            }
            "iifname" | "oifname" if w.get(i + 1) == Some(&"vmap") => {
                let map = w
                    .get(i + 2)
                    .and_then(|s| s.strip_prefix('@'))
                    .ok_or_else(|| bad(i + 2))?;
                if i + 3 != w.len() {
                    return Err(bad(i + 3));
                }
                return Ok(Rule {
                    conds,
                    log,
                    action: Action::IfVmap {
                        out: w[i] == "oifname",
                        map: map.to_string(),
                    },
                });
            }
            _ => {
                let v = parse_verdict(&w[i..]).map_err(|e| format!("{e} in {text:?}"))?;
                return Ok(Rule {
                    conds,
                    action: Action::Verdict(v),
                    log,
                });
            }
        }
    }
    Ok(Rule {
        conds,
        action: Action::None,
        log,
    })
}

impl Eval {
    /// Parses the policy part of `t`: its sets, the two interface dispatch maps, the port maps
    /// (`inet_service : verdict`, interval) and every chain. `base` names the base chain to
    /// run.
    pub fn new(t: &nft::Table, base: &str) -> Result<Self, String> {
        let mut sets = BTreeMap::new();
        for (name, s) in &t.sets {
            let v6 = match s.type_.as_str() {
                "ipv4_addr" => false,
                "ipv6_addr" => true,
                _ => continue,
            };
            let interval = s.flags.iter().any(|f| f == "interval");
            let mut v = Vec::new();
            // The elements as rendered: this reads the table as `nft` would.
            for e in s.elements.iter().map(ToString::to_string) {
                let n: IpNet = match e.parse::<IpNet>() {
                    Ok(n) if interval => n,
                    Ok(n) => return Err(format!("network {n} in the non-interval set {name}")),
                    Err(_) => IpNet::from(
                        e.parse::<IpAddr>()
                            .map_err(|err| format!("element {e} of {name}: {err}"))?,
                    ),
                };
                if n.addr().is_ipv6() != v6 {
                    return Err(format!("element {e} of the wrong family in {name}"));
                }
                v.push(n);
            }
            sets.insert(name.clone(), (v6, v));
        }
        let mut if_maps = BTreeMap::new();
        let mut port_maps = BTreeMap::new();
        for (name, m) in &t.maps {
            if m.value != "verdict" {
                continue;
            }
            match m.type_.as_str() {
                "ifname" => {
                    let mut els = BTreeMap::new();
                    for (k, v) in m
                        .elements
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                    {
                        let k = k
                            .strip_prefix('"')
                            .and_then(|k| k.strip_suffix('"'))
                            .ok_or(format!("unquoted ifname {k} in {name}"))?;
                        let v: Vec<&str> = v.split_whitespace().collect();
                        els.insert(k.to_string(), parse_verdict(&v)?);
                    }
                    if_maps.insert(name.clone(), els);
                }
                "inet_service" => {
                    if !m.flags.iter().any(|f| f == "interval") {
                        return Err(format!("{name}: port map without flags interval"));
                    }
                    let mut els: Vec<(u16, u16, Verdict)> = Vec::new();
                    for (k, v) in m
                        .elements
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                    {
                        let (lo, hi) = parse_port_range(&k)?;
                        if lo > hi {
                            return Err(format!("empty range {k} in {name}"));
                        }
                        if els.iter().any(|(a, b, _)| lo <= *b && *a <= hi) {
                            return Err(format!("overlapping element {k} in {name}"));
                        }
                        let v: Vec<&str> = v.split_whitespace().collect();
                        els.push((lo, hi, parse_verdict(&v)?));
                    }
                    port_maps.insert(name.clone(), els);
                }
                _ => {}
            }
        }
        let mut chains = BTreeMap::new();
        for (name, c) in &t.chains {
            let rules = c
                .rules
                .iter()
                .map(|r| parse_rule(r))
                .collect::<Result<Vec<_>, _>>();
            // Chains of other parts of the table (services, masquerade) are not run here; a
            // rule of theirs the interpreter cannot read only matters if it is reached.
            let rules = match rules {
                Ok(r) => r,
                Err(e)
                    if name.starts_with("pol")
                        || name.starts_with("tpol")
                        || name.starts_with("spol")
                        || name == base =>
                {
                    return Err(e)
                }
                Err(_) => continue,
            };
            chains.insert(
                name.clone(),
                Chain {
                    base: c.base.is_some(),
                    policy_accept: c.base.as_ref().is_none_or(|b| b.policy == "accept"),
                    rules,
                },
            );
        }
        if !chains.get(base).is_some_and(|c| c.base) {
            return Err(format!("no base chain {base}"));
        }
        Ok(Self {
            sets,
            if_maps,
            port_maps,
            chains,
            base: base.to_string(),
        })
    }

    fn cond(&self, c: &Cond, p: &Packet) -> Result<bool, String> {
        Ok(match c {
            Cond::CtNew(new) => *new,
            Cond::Addr { v6, dst, neg, set } => {
                let ip = if *dst { p.dst } else { p.src };
                // A packet of the other family never matches, negated or not.
                if ip.is_ipv6() != *v6 {
                    return Ok(false);
                }
                let hit = match set {
                    AddrSet::Named(set) => {
                        let (set_v6, nets) = self.sets.get(set).ok_or(format!("no set {set}"))?;
                        if set_v6 != v6 {
                            return Err(format!("set {set} used with the wrong family"));
                        }
                        nets.iter().any(|n| n.contains(&ip))
                    }
                    AddrSet::Nets(nets) => {
                        if nets.iter().any(|n| n.addr().is_ipv6() != *v6) {
                            return Err(format!("{nets:?} in a rule of the other family"));
                        }
                        nets.iter().any(|n| n.contains(&ip))
                    }
                };
                hit != *neg
            }
            Cond::Nfproto { v6 } => p.src.is_ipv6() == *v6,
            Cond::Proto { neg, name } => (p.proto.nft() == name) != *neg,
            // Only ever written after `meta l4proto`: the packet has a transport header.
            Cond::Port { sport, neg, ranges } => {
                let port = if *sport { p.sport } else { p.dport };
                ranges.iter().any(|(a, b)| *a <= port && port <= *b) != *neg
            }
            Cond::Icmpv6Type => false,
        })
    }

    /// Whether the base chain accepts the packet.
    pub fn accepts(&self, p: &Packet) -> Result<bool, String> {
        Ok(self.run(p)?.0)
    }

    /// Whether the base chain accepts the packet, and the Malla log prefixes written on the
    /// way (rate limits assumed not reached).
    pub fn run(&self, p: &Packet) -> Result<(bool, Vec<String>), String> {
        let mut logs = Vec::new();
        let verdict = self.walk(p, &mut logs)?;
        Ok((verdict, logs))
    }

    fn walk(&self, p: &Packet, logs: &mut Vec<String>) -> Result<bool, String> {
        let mut stack: Vec<(String, usize)> = Vec::new();
        let mut chain = self.base.clone();
        let mut at = 0usize;
        let base_policy = self.chains[&self.base].policy_accept;
        for _ in 0..100_000 {
            let c = self.chains.get(&chain).ok_or(format!("no chain {chain}"))?;
            let Some(rule) = c.rules.get(at) else {
                // Off the end: back to the last return point, or the base chain's policy.
                match stack.pop() {
                    Some((c, i)) => {
                        chain = c;
                        at = i;
                        continue;
                    }
                    None => return Ok(base_policy),
                }
            };
            at += 1;
            let mut ok = true;
            for cond in &rule.conds {
                if !self.cond(cond, p)? {
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            if let Some(l) = &rule.log {
                logs.push(l.clone());
            }
            let verdict = match &rule.action {
                Action::None => continue,
                Action::Verdict(v) => v.clone(),
                Action::IfVmap { out, map } => {
                    let m = self.if_maps.get(map).ok_or(format!("no map {map}"))?;
                    match m.get(if *out { p.oifname } else { p.iifname }) {
                        Some(v) => v.clone(),
                        None => continue,
                    }
                }
                Action::PortVmap(map) => {
                    let m = self.port_maps.get(map).ok_or(format!("no map {map}"))?;
                    let hit = m.iter().find(|(a, b, _)| *a <= p.dport && p.dport <= *b);
                    match hit {
                        Some((_, _, v)) => v.clone(),
                        None => continue,
                    }
                }
            };
            let (to, push) = match verdict {
                Verdict::Accept => return Ok(true),
                Verdict::Drop => return Ok(false),
                Verdict::Return => match stack.pop() {
                    Some((c, i)) => {
                        chain = c;
                        at = i;
                        continue;
                    }
                    None => return Ok(base_policy),
                },
                Verdict::Jump(to) => (to, true),
                Verdict::Goto(to) => (to, false),
            };
            let target = self.chains.get(&to).ok_or(format!("no chain {to}"))?;
            if target.base {
                return Err(format!("jump to the base chain {to}"));
            }
            if push {
                stack.push((chain, at));
            }
            chain = to;
            at = 0;
        }
        Err("no verdict after 100000 steps (a loop?)".into())
    }
}
