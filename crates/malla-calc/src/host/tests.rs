//! Host endpoint policy: the rendered chains, run by a small interpreter of exactly the
//! statements [`super::render`] writes (it fails on anything else), agree with the reference
//! evaluator on random policies, endpoints and packets.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::calico::{
    Action, EntityRule, GlobalNetworkPolicy, GlobalNetworkPolicySpec, HostEndpoint,
    HostEndpointSpec, Order, PolicyType, Port, Proto, Rule, Tier,
};
use proptest::prelude::*;

use super::reference::{verdict, HostPacket};
use super::render::{self, HostInputs};
use super::{CalicoView, Labelled, Stage};
use crate::nft::element::{IfName, Part};
use crate::nft::{self, Key, Value};

/// A packet as the interpreter sees it.
struct Seen<'a> {
    iif: &'a str,
    oif: &'a str,
    p: &'a HostPacket,
}

fn tokens(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = rule.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' {
            chars.next();
            let s: String = chars.by_ref().take_while(|&c| c != '"').collect();
            out.push(format!("\"{s}\""));
        } else if c == '{' {
            let s: String = chars.by_ref().take_while(|&c| c != '}').collect();
            out.push(format!("{s}}}"));
        } else {
            let mut s = String::new();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                s.push(c);
                chars.next();
            }
            out.push(s);
        }
    }
    out
}

fn ports_of(t: &str) -> Vec<(u16, u16)> {
    t.trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => {
                let p = s.parse().unwrap();
                (p, p)
            }
        })
        .collect()
}

fn nets_of(t: &str) -> Vec<IpNet> {
    t.trim_matches(|c| c == '{' || c == '}')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .unwrap_or_else(|_| IpNet::from(s.parse::<IpAddr>().unwrap()))
        })
        .collect()
}

fn in_set(table: &nft::Table, name: &str, a: IpAddr) -> bool {
    let set = table
        .sets
        .get(name)
        .unwrap_or_else(|| panic!("no set {name}"));
    set.elements.iter().any(|k| {
        k.parts().any(|p| match p {
            Part::Addr(x) => x == a,
            Part::Net(n) => n.contains(&a),
            _ => false,
        })
    })
}

fn wild(pattern: &str, name: &str) -> bool {
    let pattern = pattern.trim_matches('"');
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == pattern,
    }
}

enum Step {
    Accept,
    Drop,
    Goto(String),
    Next,
}

fn value_step(v: &Value) -> Step {
    match v {
        Value::Verdict(nft::Verdict::Accept) => Step::Accept,
        Value::Verdict(nft::Verdict::Drop) => Step::Drop,
        Value::Verdict(nft::Verdict::Goto(c)) => Step::Goto(c.to_string()),
        other => panic!("unexpected map value {other:?}"),
    }
}

/// One rule: Next when it does not match or has no verdict.
fn rule(table: &nft::Table, text: &str, s: &Seen) -> Step {
    let t = tokens(text);
    let mut i = 0;
    let p = s.p;
    let v6 = p.src.is_ipv6();
    while i < t.len() {
        let w = t[i].as_str();
        let next = |k: usize| t[i + k].as_str();
        match w {
            "accept" => return Step::Accept,
            "drop" => return Step::Drop,
            "goto" => return Step::Goto(next(1).to_string()),
            "comment" => return Step::Next,
            "log" => {
                assert_eq!(next(1), "prefix");
                i += 3;
                continue;
            }
            "iifname" | "oifname" => {
                let name = if w == "iifname" { s.iif } else { s.oif };
                if next(1) == "vmap" {
                    let map = &table.maps[next(2).trim_start_matches('@')];
                    let key = Key::one(Part::Iface(IfName::new(name).unwrap()));
                    return match map.elements.get(&key) {
                        Some(v) => value_step(v),
                        None => Step::Next,
                    };
                }
                let (neg, pat) = if next(1) == "!=" {
                    (true, next(2))
                } else {
                    (false, next(1))
                };
                if wild(pat, name) == neg {
                    return Step::Next;
                }
                i += if neg { 3 } else { 2 };
            }
            "ct" => {
                assert_eq!(next(1), "state");
                // A new connection: never established, related or invalid.
                return Step::Next;
            }
            "meta" => match next(1) {
                "nfproto" => {
                    if (next(2) == "ipv6") != v6 {
                        return Step::Next;
                    }
                    i += 3;
                }
                "l4proto" => {
                    let (neg, name) = if next(2) == "!=" {
                        (true, next(3))
                    } else {
                        (false, next(2))
                    };
                    let is = name == p.proto.nft();
                    if is == neg {
                        return Step::Next;
                    }
                    i += if neg { 4 } else { 3 };
                }
                other => panic!("meta {other} in {text}"),
            },
            "th" => {
                let port = match next(1) {
                    "dport" => p.dport,
                    "sport" => p.sport,
                    other => panic!("th {other}"),
                };
                let (neg, list) = if next(2) == "!=" {
                    (true, next(3))
                } else {
                    (false, next(2))
                };
                let hit = ports_of(list).iter().any(|(a, b)| *a <= port && port <= *b);
                if hit == neg {
                    return Step::Next;
                }
                i += if neg { 4 } else { 3 };
            }
            "ip" | "ip6" => {
                if (w == "ip6") != v6 {
                    return Step::Next;
                }
                let a = match next(1) {
                    "saddr" => p.src,
                    "daddr" => p.dst,
                    other => panic!("{w} {other}"),
                };
                let (neg, what) = if next(2) == "!=" {
                    (true, next(3))
                } else {
                    (false, next(2))
                };
                let hit = match what.strip_prefix('@') {
                    Some(set) => in_set(table, set, a),
                    None => nets_of(what).iter().any(|n| n.contains(&a)),
                };
                if hit == neg {
                    return Step::Next;
                }
                i += if neg { 4 } else { 3 };
            }
            "icmp" | "icmpv6" => {
                let Some((ty, code)) = p.icmp else {
                    return Step::Next;
                };
                let have = if next(1) == "type" { ty } else { code };
                let (neg, n) = if next(2) == "!=" {
                    (true, next(3))
                } else {
                    (false, next(2))
                };
                if (have.to_string() == n) == neg {
                    return Step::Next;
                }
                i += if neg { 4 } else { 3 };
            }
            other => panic!("unknown statement {other:?} in {text:?}"),
        }
    }
    Step::Next
}

/// Runs base chain `base` (absent: accept); whether the packet passes.
fn passes(table: &nft::Table, base: &str, s: &Seen) -> bool {
    let Some(mut chain) = table.chains.get(base) else {
        return true;
    };
    let mut hops = 0;
    'chain: loop {
        for r in &chain.rules {
            match rule(table, r, s) {
                Step::Accept => return true,
                Step::Drop => return false,
                Step::Goto(c) => {
                    hops += 1;
                    assert!(hops < 100, "goto loop");
                    chain = table
                        .chains
                        .get(&c)
                        .unwrap_or_else(|| panic!("no chain {c}"));
                    continue 'chain;
                }
                Step::Next => {}
            }
        }
        // Off the end: back to the base chain's caller, whose policy is accept.
        return true;
    }
}

const ADDRS: [&str; 6] = [
    "198.19.0.11",
    "198.19.0.12",
    "198.19.1.2",
    "198.18.0.5",
    "fd00:198:19::11",
    "fd00:198:18::5",
];
const NETS: [&str; 5] = [
    "198.19.0.0/24",
    "198.19.1.2/32",
    "198.18.0.0/16",
    "fd00:198:19::/64",
    "0.0.0.0/0",
];
const SELECTORS: [&str; 5] = [
    "app == 'a'",
    "has(role)",
    "role == 'node'",
    "all()",
    "app in {'a', 'b'}",
];

fn ents() -> Vec<Labelled> {
    let l = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    vec![
        Labelled {
            labels: l("app", "a"),
            namespace: Some(BTreeMap::new()),
            ns_name: Some("default".into()),
            nets: vec!["198.18.0.5/32".parse().unwrap()],
        },
        Labelled {
            labels: l("app", "b"),
            namespace: Some(BTreeMap::new()),
            ns_name: Some("default".into()),
            nets: vec!["fd00:198:18::5/128".parse().unwrap()],
        },
        Labelled {
            labels: l("role", "node"),
            namespace: None,
            ns_name: None,
            nets: vec![
                "198.19.0.12/32".parse().unwrap(),
                "fd00:198:19::11/128".parse().unwrap(),
            ],
        },
    ]
}

fn arb_side() -> impl Strategy<Value = EntityRule> {
    (
        prop::collection::vec(0..NETS.len(), 0..2),
        prop::collection::vec(0..NETS.len(), 0..2),
        prop::option::weighted(0.3, 0..SELECTORS.len()),
        prop::option::weighted(0.2, 0..SELECTORS.len()),
        prop::collection::vec((1u16..3, 0u16..3), 0..2),
        prop::collection::vec((1u16..3, 0u16..3), 0..2),
    )
        .prop_map(|(nets, not_nets, sel, not_sel, ports, not_ports)| {
            let port = |(a, w): (u16, u16)| Port::Range(a * 10, a * 10 + w);
            EntityRule {
                nets: nets.into_iter().map(|i| NETS[i].parse().unwrap()).collect(),
                not_nets: not_nets
                    .into_iter()
                    .map(|i| NETS[i].parse().unwrap())
                    .collect(),
                selector: sel.map(|i| SELECTORS[i].to_string()),
                not_selector: not_sel.map(|i| SELECTORS[i].to_string()),
                namespace_selector: None,
                ports: ports.into_iter().map(port).collect(),
                not_ports: not_ports.into_iter().map(port).collect(),
                domains: Vec::new(),
            }
        })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop_oneof![
            Just(Action::Allow),
            Just(Action::Deny),
            Just(Action::Pass),
            Just(Action::Log)
        ],
        prop::option::of(prop_oneof![
            Just(Proto::TCP),
            Just(Proto::UDP),
            Just(Proto::ICMP)
        ]),
        prop::option::weighted(0.2, prop_oneof![Just(4u8), Just(6u8)]),
        arb_side(),
        arb_side(),
    )
        .prop_map(
            |(action, protocol, ip_version, mut source, mut destination)| {
                if !protocol.is_some_and(Proto::has_ports) {
                    for s in [&mut source, &mut destination] {
                        s.ports.clear();
                        s.not_ports.clear();
                    }
                }
                if let Some(v) = ip_version {
                    for s in [&mut source, &mut destination] {
                        s.nets.retain(|n| (n.addr().is_ipv6()) == (v == 6));
                    }
                }
                Rule {
                    action,
                    protocol,
                    not_protocol: None,
                    ip_version,
                    icmp: None,
                    not_icmp: None,
                    source,
                    destination,
                    metadata: None,
                }
            },
        )
}

fn arb_policy() -> impl Strategy<Value = GlobalNetworkPolicy> {
    (
        0..3usize,
        prop::option::of(0..4u8),
        0..SELECTORS.len(),
        0..4u8,
        prop::collection::vec(arb_rule(), 0..4),
        prop::collection::vec(arb_rule(), 0..4),
        any::<u32>(),
    )
        .prop_map(|(tier, order, sel, flags, ingress, egress, id)| {
            let pre_dnat = flags == 3;
            let apply_on_forward = flags >= 2;
            GlobalNetworkPolicy {
                name: format!("p{id}"),
                spec: GlobalNetworkPolicySpec {
                    tier: [
                        None,
                        Some("security".to_string()),
                        Some("default".to_string()),
                    ][tier]
                        .clone(),
                    order: order.map(|o| Order(f64::from(o))),
                    selector: SELECTORS[sel].into(),
                    types: Some(if pre_dnat {
                        vec![PolicyType::Ingress]
                    } else {
                        vec![PolicyType::Ingress, PolicyType::Egress]
                    }),
                    egress: if pre_dnat { Vec::new() } else { egress },
                    ingress,
                    pre_dnat,
                    apply_on_forward,
                    ..GlobalNetworkPolicySpec::default()
                },
            }
        })
}

fn hep(name: &str, iface: &str, labels: &[(&str, &str)], allow: bool) -> HostEndpoint {
    HostEndpoint {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        spec: HostEndpointSpec {
            node: "n1".into(),
            interface_name: Some(iface.into()),
            profiles: if allow {
                vec![malla_api::calico::DEFAULT_ALLOW_PROFILE.into()]
            } else {
                Vec::new()
            },
            ..HostEndpointSpec::default()
        },
    }
}

fn arb_packet() -> impl Strategy<Value = (HostPacket, bool)> {
    (
        0..ADDRS.len(),
        0..ADDRS.len(),
        prop_oneof![Just(Proto::TCP), Just(Proto::UDP), Just(Proto::ICMP)],
        prop_oneof![4 => 10u16..13, 4 => 20u16..23, 1 => 1u16..70, 1 => Just(53), 1 => Just(4789), 1 => Just(10250)],
        prop_oneof![10u16..13, 20u16..23, 1u16..70],
        any::<bool>(),
    )
        .prop_filter_map("families agree", |(s, d, proto, dport, sport, v)| {
            let (src, dst): (IpAddr, IpAddr) = (ADDRS[s].parse().unwrap(), ADDRS[d].parse().unwrap());
            if src.is_ipv4() != dst.is_ipv4() {
                return None;
            }
            let icmp = (proto == Proto::ICMP).then_some((8, 0));
            Some((
                HostPacket {
                    src,
                    dst,
                    proto: if proto == Proto::ICMP && src.is_ipv6() {
                        Proto::ICMPV6
                    } else {
                        proto
                    },
                    sport,
                    dport,
                    icmp,
                },
                v,
            ))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn rendered_host_policy_agrees_with_the_reference(
        policies in prop::collection::vec(arb_policy(), 0..5),
        tier_order in prop::option::of(0..2000u16),
        tier_pass in any::<bool>(),
        star_allow in any::<bool>(),
        named in any::<bool>(),
        vxlan in any::<bool>(),
        packets in prop::collection::vec((arb_packet(), 0..4usize, 0..5usize), 1..12),
    ) {
        let mut heps = vec![hep("n1-all", "*", &[("role", "node")], star_allow)];
        if named {
            heps.push(hep("n1-eth1", "eth1", &[("role", "edge"), ("app", "b")], false));
        }
        let view = CalicoView {
            tiers: vec![Tier {
                name: "security".into(),
                order: tier_order.map(|o| Order(f64::from(o))),
                default_action: tier_pass.then_some(Action::Pass),
            }],
            policies,
            host_endpoints: heps.clone(),
            network_sets: Vec::new(),
            network_policies: Vec::new(),
            cluster_policies: Vec::new(),
            staged: Vec::new(),
        };
        let config = malla_api::ClusterConfig {
            routing: if vxlan { malla_api::RoutingMode::Vxlan } else { malla_api::RoutingMode::Direct },
            ..malla_api::ClusterConfig::default()
        };
        let nodes: Vec<IpAddr> = vec!["198.19.0.12".parse().unwrap(), "fd00:198:19::12".parse().unwrap()];
        let ents = ents();
        let local = super::local_host_endpoints(&view, "n1", false);
        let mut table = nft::Table::new("inet", "malla");
        render::render_host_endpoints(
            &view,
            &HostInputs { heps: local.clone(), ents: ents.clone(), nodes: nodes.clone(), config: Some(&config) },
            &mut table,
        );
        let ifaces = ["eth0", "eth1", "mla3", "lo"];
        for ((p, _), i, st) in packets {
            let stage = Stage::ALL[st];
            let iface = ifaces[i];
            if iface == "lo" && matches!(stage, Stage::ForwardIn | Stage::ForwardOut) {
                continue; // nothing is routed through loopback
            }
            let want = verdict(&view, &config, &local, &nodes, stage, iface, &p, &ents).passes();
            let (base, seen) = match stage {
                Stage::PreDnat => (render::PREDNAT, Seen { iif: iface, oif: "", p: &p }),
                Stage::Input => (render::INPUT, Seen { iif: iface, oif: "", p: &p }),
                Stage::Output => (render::OUTPUT, Seen { iif: "", oif: iface, p: &p }),
                Stage::ForwardIn => (render::FORWARD, Seen { iif: iface, oif: "mla9", p: &p }),
                Stage::ForwardOut => (render::FORWARD, Seen { iif: "mla9", oif: iface, p: &p }),
            };
            let got = passes(&table, base, &seen);
            prop_assert_eq!(got, want, "{:?} on {} {:?}\n{}", stage, iface, p, nft::render_full(&table));
        }
    }
}

#[test]
fn a_deny_all_leaves_the_failsafe_ports() {
    let view = CalicoView {
        policies: vec![GlobalNetworkPolicy {
            name: "deny".into(),
            spec: GlobalNetworkPolicySpec {
                selector: "all()".into(),
                types: Some(vec![PolicyType::Ingress, PolicyType::Egress]),
                ..GlobalNetworkPolicySpec::default()
            },
        }],
        host_endpoints: vec![hep("n1-all", "*", &[], true)],
        ..CalicoView::default()
    };
    let config = malla_api::ClusterConfig::default();
    let local = super::local_host_endpoints(&view, "n1", false);
    let mut table = nft::Table::new("inet", "malla");
    render::render_host_endpoints(
        &view,
        &HostInputs {
            heps: local,
            ents: Vec::new(),
            nodes: Vec::new(),
            config: Some(&config),
        },
        &mut table,
    );
    let tcp = |dport| HostPacket {
        src: "198.19.1.2".parse().unwrap(),
        dst: "198.19.0.11".parse().unwrap(),
        proto: Proto::TCP,
        sport: 40000,
        dport,
        icmp: None,
    };
    for (port, open) in [(22, true), (6443, true), (10250, true), (9000, false)] {
        let p = tcp(port);
        let seen = Seen {
            iif: "eth0",
            oif: "",
            p: &p,
        };
        assert_eq!(passes(&table, render::INPUT, &seen), open, "{port}");
    }
    // Out: the API server yes, SSH no.
    for (port, open) in [(6443, true), (22, false)] {
        let p = tcp(port);
        let seen = Seen {
            iif: "",
            oif: "eth0",
            p: &p,
        };
        assert_eq!(passes(&table, render::OUTPUT, &seen), open, "{port}");
    }
    // No pre-DNAT or forward chains without such policies.
    assert!(!table.chains.contains_key(render::PREDNAT));
    assert!(!table.chains.contains_key(render::FORWARD));
}
