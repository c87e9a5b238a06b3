//! Rendering a [`PolicyProgram`] into the `inet malla` table.
//!
//! - Sets `pol-<hash>-v4` / `-v6` (`flags interval`) per [`PeerSet`] and family.
//! - Base chain [`POLICY_FORWARD`] (filter, hook forward, priority filter):
//!   `ct state established,related accept`, `ct state invalid drop`, then
//!   `iifname vmap @pol-egress-dispatch` and `oifname vmap @pol-ingress-dispatch`, maps from a
//!   local pod's host interface to `jump pol-out-<ifname>` / `jump pol-in-<ifname>`. Only
//!   isolated directions get an entry.
//! - `pol-out-<ifname>`: one rule per (rule × peer set × family × protocol) matching `daddr`,
//!   verdict `return` so that the destination's ingress chain still runs; then `drop`.
//! - `pol-in-<ifname>`: the same on `saddr` with `accept`; then `drop`.
//!
//! Traffic from a pod's own node is not handled here (the caller accepts it on the output
//! hook). Interface names must be kernel names (`[A-Za-z0-9_.-]`, at most 15 bytes); an endpoint
//! with another name is left out, as it could not be written into the ruleset.

use crate::nft::{self, BaseChain, Chain, Map, Set};

use super::addrs::nft_element;
use super::compile::{CompiledRule, PeerSet, PolicyProgram, PortMatch};

/// The policy base chain.
pub const POLICY_FORWARD: &str = "policy-forward";
/// Map: host interface → `jump pol-in-<ifname>`.
pub const INGRESS_DISPATCH: &str = "pol-ingress-dispatch";
/// Map: host interface → `jump pol-out-<ifname>`.
pub const EGRESS_DISPATCH: &str = "pol-egress-dispatch";

/// The ingress chain of an endpoint.
pub fn ingress_chain(ifname: &str) -> String {
    format!("pol-in-{ifname}")
}

/// The egress chain of an endpoint.
pub fn egress_chain(ifname: &str) -> String {
    format!("pol-out-{ifname}")
}

fn ifname_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

fn families(set: &PeerSet) -> Vec<(&'static str, &'static str)> {
    let mut v = Vec::new();
    if set.v4 {
        v.push(("ip", "v4"));
    }
    if set.v6 {
        v.push(("ip6", "v6"));
    }
    v
}

fn port_matches(pm: &PortMatch) -> Vec<String> {
    match pm {
        PortMatch::Any => vec![String::new()],
        PortMatch::Ports(m) => m
            .iter()
            .map(|(proto, ranges)| {
                let one = |(a, b): &(u16, u16)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                };
                let mut s = format!("meta l4proto {}", proto.nft());
                match ranges.as_slice() {
                    [(0, u16::MAX)] => {}
                    [r] => s.push_str(&format!(" th dport {}", one(r))),
                    rs => {
                        let v: Vec<String> = rs.iter().map(one).collect();
                        s.push_str(&format!(" th dport {{ {} }}", v.join(", ")));
                    }
                }
                s
            })
            .collect(),
    }
}

fn comment(r: &CompiledRule, dir: &str) -> String {
    let text: String = format!("{} {dir}[{}]", r.policy, r.rule)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_./[] ".contains(*c))
        .take(120)
        .collect();
    format!("comment \"{text}\"")
}

fn chain_rules(
    prog: &PolicyProgram,
    rules: &[CompiledRule],
    addr: &str,
    dir: &str,
    verdict: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for r in rules {
        let peers: Vec<String> = match &r.peer {
            None => vec![String::new()],
            Some(name) => match prog.sets.get(name) {
                Some(set) => families(set)
                    .into_iter()
                    .map(|(kw, fam)| format!("{kw} {addr} @{name}-{fam}"))
                    .collect(),
                None => Vec::new(),
            },
        };
        for p in &peers {
            for ports in port_matches(&r.ports) {
                let m: Vec<&str> = [p.as_str(), ports.as_str()]
                    .into_iter()
                    .filter(|s| !s.is_empty())
                    .collect();
                let mut line = m.join(" ");
                if !line.is_empty() {
                    line.push(' ');
                }
                line.push_str(verdict);
                line.push(' ');
                line.push_str(&comment(r, dir));
                out.push(line);
            }
        }
    }
    out.push("drop".into());
    out
}

/// Adds the program's sets, maps and chains to `table` (the `inet malla` table).
pub fn render_policy(prog: &PolicyProgram, table: &mut nft::Table) {
    for (name, set) in &prog.sets {
        for (_, fam) in families(set) {
            let ty = if fam == "v4" {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            };
            let elements = set
                .addrs
                .iter()
                .filter(|n| n.addr().is_ipv4() == (fam == "v4"))
                .map(nft_element)
                .collect();
            table.sets.insert(
                format!("{name}-{fam}"),
                Set {
                    type_: ty.into(),
                    flags: vec!["interval".into()],
                    timeout: None,
                    elements,
                },
            );
        }
    }
    let mut ingress = Map {
        type_: "ifname".into(),
        value: "verdict".into(),
        ..Map::default()
    };
    let mut egress = ingress.clone();
    for ep in &prog.endpoints {
        if !ifname_ok(&ep.host_ifname) {
            continue;
        }
        let key = format!("\"{}\"", ep.host_ifname);
        if let Some(rules) = &ep.ingress {
            let chain = ingress_chain(&ep.host_ifname);
            ingress
                .elements
                .insert(key.clone(), format!("jump {chain}"));
            table.chains.insert(
                chain,
                Chain {
                    base: None,
                    rules: chain_rules(prog, rules, "saddr", "ingress", "accept"),
                },
            );
        }
        if let Some(rules) = &ep.egress {
            let chain = egress_chain(&ep.host_ifname);
            egress.elements.insert(key, format!("jump {chain}"));
            table.chains.insert(
                chain,
                Chain {
                    base: None,
                    rules: chain_rules(prog, rules, "daddr", "egress", "return"),
                },
            );
        }
    }
    table.maps.insert(INGRESS_DISPATCH.into(), ingress);
    table.maps.insert(EGRESS_DISPATCH.into(), egress);
    table.chains.insert(
        POLICY_FORWARD.into(),
        Chain {
            base: Some(BaseChain::new("filter", "forward", "filter")),
            rules: vec![
                "ct state established,related accept".into(),
                "ct state invalid drop".into(),
                format!("iifname vmap @{EGRESS_DISPATCH}"),
                format!("oifname vmap @{INGRESS_DISPATCH}"),
            ],
        },
    );
}
