//! Tests: a golden ruleset for a fixed world (checked with `nft -c` when possible), concrete
//! semantics, and the property that the compiled program decides like the reference evaluator.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use malla_api::policy::{
    EgressRule, IngressRule, IpBlock, LabelSelector, LabelSelectorRequirement, NetworkPolicy,
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, Operator, PolicyType,
};
use malla_api::service::{Protocol, TargetPort};
use malla_api::{ContainerPort, Namespace};
use proptest::prelude::*;

use super::*;
use crate::nft;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ns(name: &str, kv: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.into(),
        labels: labels(kv),
    }
}

#[allow(clippy::too_many_arguments)]
fn pod(
    namespace: &str,
    name: &str,
    kv: &[(&str, &str)],
    ips: &[&str],
    node: &str,
    ports: &[(&str, Protocol, u16)],
    ifname: &str,
) -> PolicyPod<'static> {
    PolicyPod {
        namespace: namespace.to_string().into(),
        name: name.to_string().into(),
        labels: Cow::Owned(labels(kv)),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        node: node.to_string().into(),
        ports: ports
            .iter()
            .map(|(n, protocol, port)| ContainerPort {
                name: (!n.is_empty()).then(|| n.to_string()),
                protocol: *protocol,
                port: *port,
            })
            .collect::<Vec<_>>()
            .into(),
        host_ifname: ifname.to_string().into(),
    }
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> NetworkPolicy {
    let p = NetworkPolicy {
        namespace: namespace.into(),
        name: name.into(),
        spec: serde_json::from_value(spec).unwrap(),
    };
    assert_eq!(p.validate(), Ok(()), "{name}");
    p
}

struct World {
    policies: Vec<NetworkPolicy>,
    namespaces: Vec<Namespace>,
    pods: Vec<PolicyPod<'static>>,
}

fn fixed_world() -> World {
    use Protocol::*;
    let namespaces = vec![
        ns("shop", &[("team", "shop")]),
        ns("ops", &[("team", "ops")]),
    ];
    let pods = vec![
        pod(
            "shop",
            "web",
            &[("app", "web")],
            &["198.18.0.10", "fd00:198:18::10"],
            "n1",
            &[("http", Tcp, 8080)],
            "mla0a1b2c3d4e",
        ),
        pod(
            "shop",
            "db",
            &[("app", "db")],
            &["198.18.0.11"],
            "n1",
            &[("pg", Tcp, 5432)],
            "mla11",
        ),
        pod(
            "shop",
            "client",
            &[("app", "client")],
            &["198.18.1.5", "fd00:198:18::105"],
            "n2",
            &[],
            "mla15",
        ),
        pod(
            "ops",
            "prom",
            &[("app", "prom")],
            &["198.18.1.6"],
            "n2",
            &[("metrics", Tcp, 9090)],
            "mla16",
        ),
        pod(
            "ops",
            "cache",
            &[("app", "cache")],
            &["198.18.1.7"],
            "n2",
            &[("redis", Tcp, 6379)],
            "mla17",
        ),
        pod(
            "ops",
            "free",
            &[("app", "free")],
            &["198.18.0.12"],
            "n1",
            &[],
            "mla12",
        ),
    ];
    let policies = vec![
        policy(
            "shop",
            "default-deny-ingress",
            serde_json::json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
        ),
        policy(
            "shop",
            "web",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [
                        {"podSelector": {"matchLabels": {"app": "client"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "ops"}},
                         "podSelector": {"matchLabels": {"app": "prom"}}}
                    ],
                    "ports": [{"port": "http"}, {"port": 8000, "endPort": 8100}]
                }]
            }),
        ),
        policy(
            "shop",
            "db",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "db"}},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                    "ports": [{"port": 5432}]
                }],
                "egress": [
                    {"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                    {"to": [{"namespaceSelector": {"matchLabels": {"team": "ops"}},
                             "podSelector": {"matchLabels": {"app": "cache"}}}],
                     "ports": [{"port": "redis"}]}
                ]
            }),
        ),
        // Overlaps shop/web's range: the port map cuts 8000-8100 at 8080 and 8091.
        policy(
            "shop",
            "web-from-ops",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [{"namespaceSelector": {"matchLabels": {"team": "ops"}}}],
                    "ports": [{"port": 8080, "endPort": 8090}, {"protocol": "UDP", "port": 53}]
                }]
            }),
        ),
        // The same peer as shop/web's first: shares its set.
        policy(
            "shop",
            "db-from-client",
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "db"}},
                "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]
            }),
        ),
    ];
    World {
        policies,
        namespaces,
        pods,
    }
}

fn rendered(prog: &PolicyProgram) -> nft::Table {
    let mut t = nft::Table::new("inet", "malla");
    render_policy(prog, &mut t);
    t
}

/// Each node's rendered policy table (union sets above `union_above` peer sets), read by the
/// interpreter.
fn node_evals(
    w: &World,
    nodes: &[&'static str],
    union_above: usize,
) -> Vec<(&'static str, nfteval::Eval)> {
    nodes
        .iter()
        .map(|n| {
            let mut t = nft::Table::new("inet", "malla");
            let prog = compile(&w.policies, &w.namespaces, &w.pods, n);
            render::render_policy_with(&prog, &mut t, union_above);
            let e = nfteval::Eval::new(&t, render::POLICY_FORWARD)
                .unwrap_or_else(|e| panic!("{e}\n{}", nft::render_full(&t)));
            (*n, e)
        })
        .collect()
}

/// What the rendered tables decide for a new connection: on every node, the forward hook
/// (the interfaces are the pods' host interfaces where they are local, else the uplink).
fn rendered_allows(
    w: &World,
    evals: &[(&str, nfteval::Eval)],
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    proto: Protocol,
) -> Result<bool, String> {
    Ok(rendered_run(w, evals, src, dst, port, proto)?.0)
}

/// [`rendered_allows`], with the Malla log prefixes the nodes' chains wrote on the way.
fn rendered_run(
    w: &World,
    evals: &[(&str, nfteval::Eval)],
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    proto: Protocol,
) -> Result<(bool, Vec<String>), String> {
    let mut logs = Vec::new();
    let ifname = |node: &str, ip: IpAddr| {
        w.pods
            .iter()
            .find(|p| p.node == node && p.ips.contains(&ip))
            .map_or("ul0", |p| &*p.host_ifname)
    };
    // The source's node first, as the packet travels.
    let src_node = w
        .pods
        .iter()
        .find(|p| p.ips.contains(&src))
        .map(|p| &*p.node);
    let mut order: Vec<&(&str, nfteval::Eval)> = evals.iter().collect();
    order.sort_by_key(|(n, _)| Some(*n) != src_node);
    for (node, e) in order {
        let packet = nfteval::Packet {
            iifname: ifname(node, src),
            oifname: ifname(node, dst),
            src,
            dst,
            proto,
            dport: port,
            sport: super::tiers::SOURCE_PORT,
        };
        let (ok, mut l) = e.run(&packet)?;
        logs.append(&mut l);
        if !ok {
            return Ok((false, logs));
        }
    }
    Ok((true, logs))
}

fn conn<'a>(w: &'a World, src: &str, dst: &str, port: u16, proto: Protocol) -> Connection<'a> {
    Connection {
        src: Endpoint::resolve(&w.pods, src.parse().unwrap()),
        dst: Endpoint::resolve(&w.pods, dst.parse().unwrap()),
        port,
        proto,
    }
}

#[test]
fn policy_golden_ruleset() {
    let w = fixed_world();
    let prog = compile(&w.policies, &w.namespaces, &w.pods, "n1");
    let text = nft::render_full(&rendered(&prog));
    crate::testutil::golden(
        "policy.nft",
        &text,
        include_str!("../../testdata/policy.nft"),
    );
    match crate::testutil::nft_check(&text) {
        None => eprintln!("nft -c not run"),
        Some(r) => assert_eq!(r, Ok(()), "{text}"),
    }
}

#[test]
fn policy_fixed_world_verdicts() {
    use Protocol::*;
    let w = fixed_world();
    let progs: Vec<PolicyProgram> = ["n1", "n2"]
        .iter()
        .map(|n| compile(&w.policies, &w.namespaces, &w.pods, n))
        .collect();
    let evals = node_evals(&w, &["n1", "n2"], render::UNION_ABOVE);
    let cases = [
        ("198.18.1.5", "198.18.0.10", 8080, Tcp, true), // client -> web http
        ("198.18.1.5", "198.18.0.10", 8050, Tcp, true), // range
        ("198.18.1.5", "198.18.0.10", 8101, Tcp, false), // outside range
        ("198.18.1.5", "198.18.0.10", 8080, Udp, false), // wrong protocol
        ("fd00:198:18::105", "fd00:198:18::10", 8080, Tcp, true),
        ("198.18.1.6", "198.18.0.10", 8080, Tcp, true), // prom from ops
        ("198.18.1.7", "198.18.0.10", 8000, Tcp, false), // cache is not prom
        ("198.18.1.7", "198.18.0.10", 8080, Tcp, true), // but in ops: web-from-ops
        ("198.18.1.7", "198.18.0.10", 8090, Tcp, true),
        ("198.18.1.7", "198.18.0.10", 8091, Tcp, false),
        ("198.18.1.7", "198.18.0.10", 53, Udp, true),
        ("198.18.1.5", "198.18.0.10", 8091, Tcp, true), // client: shop/web's range
        ("198.18.1.5", "198.18.0.10", 53, Udp, false),
        ("198.18.0.10", "198.18.0.11", 5432, Tcp, true), // web -> db
        ("198.18.1.5", "198.18.0.11", 22, Tcp, true),    // db-from-client: all ports
        ("198.18.1.6", "198.18.0.11", 5432, Tcp, false),
        ("198.18.0.11", "10.2.3.4", 53, Udp, true), // db egress ipBlock
        ("198.18.0.11", "10.1.3.4", 53, Udp, false), // except
        ("198.18.0.11", "198.18.1.7", 6379, Tcp, true), // named egress port
        ("198.18.0.11", "198.18.1.7", 6380, Tcp, false),
        ("198.18.0.11", "198.18.1.6", 6379, Tcp, false), // prom has no redis port
        ("198.18.0.11", "198.18.0.12", 80, Tcp, false),  // db egress isolated
        ("198.18.0.12", "198.18.1.7", 1, Udp, true),     // nothing isolates these
        ("192.0.2.1", "198.18.0.10", 8080, Tcp, false),  // outside client
    ];
    for (src, dst, port, proto, want) in cases {
        let c = conn(&w, src, dst, port, proto);
        let reference = reference::allowed(&w.policies, &w.namespaces, &c);
        let compiled = progs
            .iter()
            .all(|p| p.allows(src.parse().unwrap(), dst.parse().unwrap(), port, proto));
        let why = explain(&w.policies, &w.namespaces, &c);
        let nft = rendered_allows(
            &w,
            &evals,
            src.parse().unwrap(),
            dst.parse().unwrap(),
            port,
            proto,
        );
        assert_eq!(reference, want, "reference {src} -> {dst} {port}: {why}");
        assert_eq!(compiled, want, "compiled {src} -> {dst} {port}: {why}");
        assert_eq!(nft, Ok(want), "rendered {src} -> {dst} {port}: {why}");
        assert_eq!(why.allowed, want, "{why}");
    }
}

#[test]
fn policy_explain_names_rules() {
    let w = fixed_world();
    let c = conn(&w, "198.18.1.5", "198.18.0.11", 5432, Protocol::Tcp);
    let e = explain(&w.policies, &w.namespaces, &c);
    assert_eq!(e.egress.verdict, Verdict::NotIsolated);
    assert_eq!(
        e.ingress.selected_by,
        vec![
            "shop/default-deny-ingress",
            "shop/db",
            "shop/db-from-client"
        ]
    );
    assert_eq!(
        e.ingress.verdict,
        Verdict::Allowed {
            by: vec![("shop/db-from-client".into(), 0)]
        }
    );
    let c = conn(&w, "198.18.0.11", "10.1.0.1", 53, Protocol::Udp);
    let e = explain(&w.policies, &w.namespaces, &c);
    assert_eq!(e.egress.verdict, Verdict::Denied);
    assert_eq!(e.ingress.verdict, Verdict::NotAPod);
    assert!(!e.allowed);
    let text = e.to_string();
    assert!(
        text.contains("egress: shop/db selected by shop/db; no rule allows it"),
        "{text}"
    );
}

#[test]
fn policy_sets_are_shared_and_label_changes_only_touch_elements() {
    let mut w = fixed_world();
    let prog = compile(&w.policies, &w.namespaces, &w.pods, "n1");
    let client_sets: Vec<&PeerSet> = prog
        .sets
        .values()
        .filter(|s| s.key.contains("app=client"))
        .collect();
    assert_eq!(client_sets.len(), 1, "{:#?}", prog.sets);
    let before = rendered(&prog);
    // A second client appears and prom loses its label.
    let mut extra = w.pods[2].clone();
    extra.name = "client-2".into();
    extra.ips = vec!["198.18.1.99".parse().unwrap()];
    w.pods.push(extra);
    w.pods[3]
        .labels
        .to_mut()
        .insert("app".into(), "other".into());
    let after = rendered(&compile(&w.policies, &w.namespaces, &w.pods, "n1"));
    assert_eq!(before.chains, after.chains);
    assert_eq!(before.maps, after.maps);
    let diff = nft::render_diff(&before, &after).unwrap();
    for line in diff.lines() {
        assert!(
            line.starts_with("add element") || line.starts_with("delete element"),
            "{diff}"
        );
    }
    assert!(diff.contains("198.18.1.99"), "{diff}");
    assert!(diff.contains("delete element inet malla pol-") && diff.contains("198.18.1.6"));
}

/// Many policies allowing different peers on one port: the peers chain of that port matches
/// them through one union set per family, the verdicts stay the reference's, and a label change
/// still only touches set elements.
#[test]
fn policy_many_peers_on_one_port_are_one_lookup() {
    use Protocol::*;
    let mut w = fixed_world();
    for i in 0..8 {
        w.policies.push(policy(
            "shop",
            &format!("web-from-c{i}"),
            serde_json::json!({
                "podSelector": {"matchLabels": {"app": "web"}},
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"app": format!("c{i}")}}}],
                    "ports": [{"port": 9000}]
                }]
            }),
        ));
    }
    w.policies.push(policy(
        "shop",
        "web-from-net",
        serde_json::json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "192.0.2.0/24"}}], "ports": [{"port": 9000}]}]
        }),
    ));
    w.pods[2].labels.to_mut().insert("app".into(), "c3".into());
    let prog = compile(&w.policies, &w.namespaces, &w.pods, "n1");
    let t = rendered(&prog);
    let map = &t.maps["pol-in-mla0a1b2c3d4e-tcp"];
    let nft::Value::Verdict(nft::Verdict::Goto(chain)) = &map.elements[&nft::element::k("9000")]
    else {
        panic!("a peers chain");
    };
    let chain: &str = chain;
    let rules = &t.chains[chain].rules;
    // Pod addresses (v4, v6) through one union, the ipBlock on its own, then the deny's flow
    // log (beyond its limit to the lost chain, then the log) and drop.
    assert_eq!(rules.len(), 6, "{}", nft::render_full(&t));
    let evals = node_evals(&w, &["n1", "n2"], render::UNION_ABOVE);
    for (src, want) in [
        ("198.18.1.5", true),
        ("fd00:198:18::105", true),
        ("198.18.1.6", false),
        ("192.0.2.7", true),
        ("192.0.3.7", false),
    ] {
        let dst = if src.contains(':') {
            "fd00:198:18::10"
        } else {
            "198.18.0.10"
        };
        let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
        let c = Connection {
            src: Endpoint::resolve(&w.pods, src),
            dst: Endpoint::resolve(&w.pods, dst),
            port: 9000,
            proto: Tcp,
        };
        assert_eq!(reference::allowed(&w.policies, &w.namespaces, &c), want);
        assert_eq!(
            rendered_allows(&w, &evals, src, dst, 9000, Tcp),
            Ok(want),
            "{src}"
        );
    }
    // A new pod labelled c6 appears: one address added to the union, nothing else.
    let mut extra = w.pods[2].clone();
    extra.name = "c6".into();
    extra.ips = vec!["198.18.1.66".parse().unwrap()];
    extra.labels.to_mut().insert("app".into(), "c6".into());
    w.pods.push(extra);
    let after = rendered(&compile(&w.policies, &w.namespaces, &w.pods, "n1"));
    assert_eq!(t.chains, after.chains);
    assert_eq!(t.maps, after.maps);
    let diff = nft::render_diff(&t, &after).unwrap();
    assert_eq!(diff.lines().count(), 1, "{diff}");
    assert!(
        diff.starts_with("add element") && diff.contains("198.18.1.66"),
        "{diff}"
    );
}

#[test]
fn policy_invalid_policies_are_ignored() {
    let w = fixed_world();
    let mut bad = w.policies[0].clone();
    bad.spec.ingress = vec![IngressRule {
        from: vec![NetworkPolicyPeer::default()],
        ports: vec![],
    }];
    let only_bad = [bad];
    let prog = compile(&only_bad, &w.namespaces, &w.pods, "n1");
    assert!(prog.endpoints.iter().all(|e| e.ingress.is_none()));
}

// ---------------------------------------------------------------------------------------------
// Property: compiled == reference on random small worlds.

const KEYS: [&str; 3] = ["a", "b", "c"];
const VALUES: [&str; 2] = ["x", "y"];
const PORT_NAMES: [&str; 3] = ["http", "dns", "web"];
const NUMBERS: [u16; 5] = [53, 80, 81, 90, 8080];
const BARE_IPS: [&str; 5] = [
    "10.0.0.200",
    "10.0.1.9",
    "192.168.3.4",
    "fd00::99",
    "2001:db8::1",
];
const BLOCKS: [(&str, &[&str]); 8] = [
    ("10.0.0.0/24", &[]),
    ("10.0.0.0/24", &["10.0.0.0/30"]),
    ("10.0.0.0/8", &["10.0.0.4/31", "10.0.1.0/24"]),
    ("0.0.0.0/0", &[]),
    ("0.0.0.0/0", &["10.0.0.0/29"]),
    ("fd00::/64", &["fd00::/126"]),
    ("::/0", &[]),
    ("192.168.0.0/16", &[]),
];

fn s(v: &str) -> String {
    v.to_string()
}

fn arb_labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map(
        prop::sample::select(&KEYS[..]).prop_map(s),
        prop::sample::select(&VALUES[..]).prop_map(s),
        0..3,
    )
}

fn arb_requirement() -> impl Strategy<Value = LabelSelectorRequirement> {
    (
        prop::sample::select(&KEYS[..]),
        0..4usize,
        prop::collection::btree_set(prop::sample::select(&VALUES[..]), 1..3),
    )
        .prop_map(|(key, op, values)| {
            let (operator, values) = match op {
                0 => (Operator::In, values.into_iter().map(s).collect()),
                1 => (Operator::NotIn, values.into_iter().map(s).collect()),
                2 => (Operator::Exists, vec![]),
                _ => (Operator::DoesNotExist, vec![]),
            };
            LabelSelectorRequirement {
                key: s(key),
                operator,
                values,
            }
        })
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    (
        prop::collection::btree_map(
            prop::sample::select(&KEYS[..]).prop_map(s),
            prop::sample::select(&VALUES[..]).prop_map(s),
            0..2,
        ),
        prop::collection::vec(arb_requirement(), 0..2),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector {
            match_labels,
            match_expressions,
        })
}

fn arb_peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        arb_selector().prop_map(|p| NetworkPolicyPeer {
            pod_selector: Some(p),
            ..Default::default()
        }),
        arb_selector().prop_map(|n| NetworkPolicyPeer {
            namespace_selector: Some(n),
            ..Default::default()
        }),
        (arb_selector(), arb_selector()).prop_map(|(p, n)| NetworkPolicyPeer {
            pod_selector: Some(p),
            namespace_selector: Some(n),
            ..Default::default()
        }),
        prop::sample::select(&BLOCKS[..]).prop_map(|(cidr, except)| NetworkPolicyPeer {
            ip_block: Some(IpBlock {
                cidr: s(cidr),
                except: except.iter().map(|e| s(e)).collect(),
            }),
            ..Default::default()
        }),
    ]
}

fn arb_proto() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

fn arb_port() -> impl Strategy<Value = NetworkPolicyPort> {
    (
        arb_proto(),
        0..4usize,
        prop::sample::select(&NUMBERS[..]),
        prop::sample::select(&[0u16, 1, 10, 8000][..]),
        prop::sample::select(&PORT_NAMES[..]),
    )
        .prop_map(|(protocol, kind, n, width, name)| {
            let (port, end_port) = match kind {
                0 => (None, None),
                1 => (Some(TargetPort::Number(n)), None),
                2 => (Some(TargetPort::Number(n)), Some(n.saturating_add(width))),
                _ => (Some(TargetPort::Name(s(name))), None),
            };
            NetworkPolicyPort {
                protocol,
                port,
                end_port,
            }
        })
}

fn arb_rule() -> impl Strategy<Value = (Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> {
    (
        prop::collection::vec(arb_peer(), 0..3),
        prop::collection::vec(arb_port(), 0..3),
    )
}

fn arb_policy(n_ns: usize) -> impl Strategy<Value = (usize, NetworkPolicySpec)> {
    (
        0..n_ns,
        arb_selector(),
        0..5usize,
        prop::collection::vec(arb_rule(), 0..3),
        prop::collection::vec(arb_rule(), 0..3),
    )
        .prop_map(|(ns, pod_selector, types, ingress, egress)| {
            let policy_types = match types {
                0 => None,
                1 => Some(vec![]),
                2 => Some(vec![PolicyType::Ingress]),
                3 => Some(vec![PolicyType::Egress]),
                _ => Some(vec![PolicyType::Ingress, PolicyType::Egress]),
            };
            (
                ns,
                NetworkPolicySpec {
                    pod_selector,
                    policy_types,
                    ingress: ingress
                        .into_iter()
                        .map(|(from, ports)| IngressRule { from, ports })
                        .collect(),
                    egress: egress
                        .into_iter()
                        .map(|(to, ports)| EgressRule { to, ports })
                        .collect(),
                },
            )
        })
}

type PodSpec = (
    usize,
    BTreeMap<String, String>,
    Vec<Option<u16>>,
    bool,
    bool,
    bool,
);

fn arb_pod(n_ns: usize) -> impl Strategy<Value = PodSpec> {
    (
        0..n_ns,
        arb_labels(),
        prop::collection::vec(prop::option::of(prop::sample::select(&NUMBERS[..])), 3),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
}

/// A generated pod's declared ports: the named ones drawn, and an unnamed one if asked.
fn pod_ports(ports: Vec<Option<u16>>, unnamed: bool) -> Vec<ContainerPort> {
    let protos = [Protocol::Tcp, Protocol::Udp, Protocol::Tcp];
    let mut cports: Vec<ContainerPort> = ports
        .into_iter()
        .enumerate()
        .filter_map(|(j, n)| {
            n.map(|port| ContainerPort {
                name: Some(s(PORT_NAMES[j])),
                protocol: protos[j],
                port,
            })
        })
        .collect();
    if unnamed {
        cports.push(ContainerPort {
            name: None,
            protocol: Protocol::Tcp,
            port: 90,
        });
    }
    cports
}

fn arb_world() -> impl Strategy<Value = World> {
    (2..=3usize).prop_flat_map(|n_ns| {
        (
            prop::collection::vec(arb_labels(), n_ns),
            prop::collection::vec(arb_pod(n_ns), 3..=6),
            prop::collection::vec(arb_policy(n_ns), 0..=4),
        )
            .prop_map(move |(ns_labels, pods, policies)| {
                let namespaces: Vec<Namespace> = ns_labels
                    .into_iter()
                    .enumerate()
                    .map(|(i, labels)| Namespace {
                        name: format!("ns{i}"),
                        labels,
                    })
                    .collect();
                let pods = pods
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ns, labels, ports, dual, unnamed, remote))| {
                        let cports = pod_ports(ports, unnamed);
                        let mut ips: Vec<IpAddr> =
                            vec![format!("10.0.0.{}", i + 1).parse().unwrap()];
                        if dual {
                            ips.push(format!("fd00::{}", i + 1).parse().unwrap());
                        }
                        PolicyPod {
                            namespace: format!("ns{ns}").into(),
                            name: format!("pod{i}").into(),
                            labels: Cow::Owned(labels),
                            ips,
                            node: if remote { "n2" } else { "n1" }.into(),
                            ports: cports.into(),
                            host_ifname: format!("mla{i}").into(),
                        }
                    })
                    .collect();
                let policies = policies
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ns, spec))| NetworkPolicy {
                        namespace: format!("ns{ns}"),
                        name: format!("p{i}"),
                        spec,
                    })
                    .collect();
                World {
                    policies,
                    namespaces,
                    pods,
                }
            })
    })
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "namespaces: {:?}", self.namespaces)?;
        for p in &self.pods {
            writeln!(
                f,
                "pod {} labels={:?} ips={:?} node={} ports={:?}",
                p.key(),
                p.labels,
                p.ips,
                p.node,
                p.ports
            )?;
        }
        for p in &self.policies {
            writeln!(
                f,
                "policy {}: {}",
                p.key(),
                serde_json::to_string(&p.spec).unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// Ports the property test probes: every number the generator uses, and the edges of its
/// ranges (`n + width`, one past).
const PROBED_PORTS: [u16; 15] = [
    53, 54, 55, 64, 80, 81, 82, 83, 85, 90, 91, 92, 8080, 8081, 8091,
];

fn addresses(w: &World) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = w.pods.iter().flat_map(|p| p.ips.clone()).collect();
    v.extend(BARE_IPS.iter().map(|s| s.parse::<IpAddr>().unwrap()));
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn policy_compiled_matches_reference(w in arb_world()) {
        let progs: Vec<PolicyProgram> = ["n1", "n2"]
            .iter()
            .map(|n| compile(&w.policies, &w.namespaces, &w.pods, n))
            .collect();
        let evals = node_evals(&w, &["n1", "n2"], render::UNION_ABOVE);
        // Every place with two peer sets or more matched through unions.
        let union_evals = node_evals(&w, &["n1", "n2"], 1);
        let addrs = addresses(&w);
        for &src in &addrs {
            for &dst in &addrs {
                if src.is_ipv4() != dst.is_ipv4() {
                    continue;
                }
                for port in PROBED_PORTS {
                    for proto in [Protocol::Tcp, Protocol::Udp] {
                        let c = Connection {
                            src: Endpoint::resolve(&w.pods, src),
                            dst: Endpoint::resolve(&w.pods, dst),
                            port,
                            proto,
                        };
                        let want = reference::allowed(&w.policies, &w.namespaces, &c);
                        let got = progs.iter().all(|p| p.allows(src, dst, port, proto));
                        let nft = rendered_allows(&w, &evals, src, dst, port, proto);
                        let why = explain(&w.policies, &w.namespaces, &c);
                        prop_assert_eq!(
                            rendered_allows(&w, &union_evals, src, dst, port, proto), Ok(want),
                            "rendered with unions: {} -> {} {}/{}\n{}", src, dst, port, proto.nft(), why
                        );
                        prop_assert_eq!(
                            nft.clone(), Ok(want),
                            "rendered: {} -> {} {}/{}\n{}\nn1:\n{}\nn2:\n{}",
                            src, dst, port, proto.nft(), why,
                            nft::render_full(&rendered(&progs[0])),
                            nft::render_full(&rendered(&progs[1]))
                        );
                        prop_assert_eq!(
                            got, want,
                            "{} -> {} {}/{}\n{}\nprograms: {}",
                            src, dst, port, proto.nft(), why,
                            serde_json::to_string_pretty(&progs).unwrap_or_default()
                        );
                        prop_assert_eq!(why.allowed, want, "{}", why);
                    }
                }
            }
        }
    }

    /// Selectors over namespaces of more than 64 pods (the label index's bit sets span words);
    /// more selectors than a group matches pod by pod, so the later ones use the index.
    #[test]
    fn policy_selector_sets_in_large_namespaces(
        labels in prop::collection::vec(arb_labels(), 130..200),
        sels in prop::collection::vec(arb_selector(), 6),
    ) {
        let pods: Vec<PolicyPod> = labels
            .into_iter()
            .enumerate()
            .map(|(i, l)| PolicyPod {
                namespace: "big".into(),
                name: format!("p{i}").into(),
                labels: Cow::Owned(l),
                ips: vec![IpAddr::from([10, 1, (i / 256) as u8, (i % 256) as u8])],
                node: if i == 0 { "n1" } else { "n2" }.into(),
                host_ifname: format!("mla{i}").into(),
                ..Default::default()
            })
            .collect();
        let ingress: Vec<serde_json::Value> = sels
            .iter()
            .enumerate()
            .map(|(j, sel)| serde_json::json!({"from": [{"podSelector": sel}], "ports": [{"port": 80 + j}]}))
            .collect();
        let policies = vec![policy(
            "big",
            "from-selected",
            serde_json::json!({"podSelector": {"matchLabels": {}}, "ingress": ingress}),
        )];
        let namespaces = vec![ns("big", &[])];
        let prog = compile(&policies, &namespaces, &pods, "n1");
        let to = pods[0].ips[0];
        for p in &pods[1..] {
            for (j, sel) in sels.iter().enumerate() {
                prop_assert_eq!(
                    prog.allows(p.ips[0], to, 80 + j as u16, Protocol::Tcp),
                    sel.matches(&p.labels),
                    "{} {:?} selector {}", p.name, p.labels, j
                );
            }
        }
    }

    #[test]
    fn policy_random_rulesets_pass_nft_check(w in arb_world()) {
        let prog = compile(&w.policies, &w.namespaces, &w.pods, "n1");
        let text = nft::render_full(&rendered(&prog));
        if let Some(r) = crate::testutil::nft_check(&text) {
            prop_assert_eq!(r, Ok(()), "{}", text);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// A node's policy table, diffed from one random world to another and back, applies to a
    /// real kernel: every object a diff refers to exists when it is referred to (nft 1.0.6
    /// refused an interval verdict map's element whose chain was declared after the map).
    #[test]
    fn policy_diffs_apply_to_a_real_kernel(a in arb_world(), b in arb_world()) {
        let table = |w: &World| {
            let mut t = nft::Table::new("inet", "malla");
            t.chains.insert("forward".into(), nft::Chain {
                base: Some(nft::BaseChain::new("filter", "forward", "0")),
                rules: vec![],
            });
            render_policy(&compile(&w.policies, &w.namespaces, &w.pods, "n1"), &mut t);
            t
        };
        let (ta, tb) = (table(&a), table(&b));
        let empty = table(&World { policies: vec![], namespaces: a.namespaces.clone(), pods: a.pods.clone() });
        let diff = |x: &nft::Table, y: &nft::Table| nft::render_diff(x, y).unwrap_or_default();
        let steps = [nft::render_full(&empty), diff(&empty, &ta), diff(&ta, &tb), diff(&tb, &ta), diff(&ta, &empty)];
        if let Some(r) = crate::testutil::nft_apply_in_private_netns(&steps) {
            prop_assert_eq!(r, Ok(()), "{}", steps.join("\n----\n"));
        }
    }
}

/// One change to a generated world, for the incremental index.
#[derive(Debug, Clone)]
enum Change {
    PodLabels(usize, BTreeMap<String, String>),
    PodPorts(usize, Vec<Option<u16>>, bool),
    PodNode(usize, bool),
    /// A pod takes another pod's first address (records that disagree).
    PodSharesAddress(usize, usize),
    RemovePod(usize),
    NamespaceLabels(usize, Option<BTreeMap<String, String>>),
    /// Replaces policy `i` (or adds one past the end).
    Policy(usize, (usize, NetworkPolicySpec)),
    RemovePolicy(usize),
}

fn arb_change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0..8usize, arb_labels()).prop_map(|(i, l)| Change::PodLabels(i, l)),
        1 => (
            0..8usize,
            prop::collection::vec(prop::option::of(prop::sample::select(&NUMBERS[..])), 3),
            any::<bool>()
        )
            .prop_map(|(i, p, u)| Change::PodPorts(i, p, u)),
        1 => (0..8usize, any::<bool>()).prop_map(|(i, r)| Change::PodNode(i, r)),
        1 => (0..8usize, 0..8usize).prop_map(|(i, j)| Change::PodSharesAddress(i, j)),
        1 => (0..8usize).prop_map(Change::RemovePod),
        1 => (0..3usize, prop::option::of(arb_labels())).prop_map(|(i, l)| Change::NamespaceLabels(i, l)),
        2 => (0..5usize, arb_policy(3)).prop_map(|(i, p)| Change::Policy(i, p)),
        1 => (0..5usize).prop_map(Change::RemovePolicy),
    ]
}

/// Applies `c` to the world and to the index, returning the index's delta.
fn apply_change(w: &mut World, index: &mut PolicyIndex, c: &Change) -> PolicyDelta {
    let pick = |n: usize, i: usize| (n > 0).then(|| i % n);
    match c {
        Change::PodLabels(i, l) => match pick(w.pods.len(), *i) {
            Some(i) => {
                w.pods[i].labels = Cow::Owned(l.clone());
                index.upsert_pod(&w.pods[i])
            }
            None => PolicyDelta::default(),
        },
        Change::PodPorts(i, p, u) => match pick(w.pods.len(), *i) {
            Some(i) => {
                w.pods[i].ports = pod_ports(p.clone(), *u).into();
                index.upsert_pod(&w.pods[i])
            }
            None => PolicyDelta::default(),
        },
        Change::PodNode(i, remote) => match pick(w.pods.len(), *i) {
            Some(i) => {
                w.pods[i].node = if *remote { "n2" } else { "n1" }.into();
                index.upsert_pod(&w.pods[i])
            }
            None => PolicyDelta::default(),
        },
        Change::PodSharesAddress(i, j) => match (pick(w.pods.len(), *i), pick(w.pods.len(), *j)) {
            (Some(i), Some(j)) => {
                let ip = w.pods[j].ips[0];
                w.pods[i].ips[0] = ip;
                index.upsert_pod(&w.pods[i])
            }
            _ => PolicyDelta::default(),
        },
        Change::RemovePod(i) => match pick(w.pods.len(), *i) {
            Some(i) => {
                let p = w.pods.remove(i);
                index.remove_pod(&p.namespace, &p.name)
            }
            None => PolicyDelta::default(),
        },
        Change::NamespaceLabels(i, l) => {
            let name = format!("ns{i}");
            w.namespaces.retain(|n| n.name != name);
            if let Some(l) = l {
                w.namespaces.push(Namespace {
                    name: name.clone(),
                    labels: l.clone(),
                });
            }
            index.set_namespace(&name, l.as_ref())
        }
        Change::Policy(i, (ns, spec)) => {
            let p = NetworkPolicy {
                namespace: format!("ns{ns}"),
                name: format!("q{i}"),
                spec: spec.clone(),
            };
            w.policies
                .retain(|q| (&q.namespace, &q.name) != (&p.namespace, &p.name));
            w.policies.push(p.clone());
            index.upsert_policy(&p)
        }
        Change::RemovePolicy(i) => match pick(w.policies.len(), *i) {
            Some(i) => {
                let p = w.policies.remove(i);
                index.remove_policy(&p.namespace, &p.name)
            }
            None => PolicyDelta::default(),
        },
    }
}

/// Checks that `delta` takes `before` to `after`, naming exactly what changed.
fn check_delta(
    before: &PolicyProgram,
    after: &PolicyProgram,
    delta: &PolicyDelta,
) -> Result<(), String> {
    for (name, set) in &after.sets {
        match before.sets.get(name) {
            None if delta.sets_added.contains(name) => {}
            None => return Err(format!("set {name} appeared without sets_added")),
            Some(_) if delta.sets_added.contains(name) => {
                return Err(format!("set {name} existed but is in sets_added"))
            }
            Some(old) => {
                let mut addrs: std::collections::BTreeSet<_> = old.addrs.iter().copied().collect();
                for a in delta.members_removed.get(name).into_iter().flatten() {
                    if !addrs.remove(a) {
                        return Err(format!("{name}: removed {a}, which it did not hold"));
                    }
                }
                for a in delta.members_added.get(name).into_iter().flatten() {
                    if !addrs.insert(*a) {
                        return Err(format!("{name}: added {a}, which it held"));
                    }
                }
                let want: std::collections::BTreeSet<_> = set.addrs.iter().copied().collect();
                if addrs != want {
                    return Err(format!(
                        "{name}: delta gives {addrs:?}, program has {want:?}"
                    ));
                }
            }
        }
    }
    let gone: std::collections::BTreeSet<String> = before
        .sets
        .keys()
        .filter(|k| !after.sets.contains_key(*k))
        .cloned()
        .collect();
    if gone != delta.sets_removed {
        return Err(format!(
            "sets gone {gone:?}, delta says {:?}",
            delta.sets_removed
        ));
    }
    let key = |e: &EndpointProgram| (e.namespace.clone(), e.name.clone());
    let old: BTreeMap<_, _> = before.endpoints.iter().map(|e| (key(e), e)).collect();
    let new: BTreeMap<_, _> = after.endpoints.iter().map(|e| (key(e), e)).collect();
    let changed: std::collections::BTreeSet<_> = new
        .iter()
        .filter(|(k, e)| old.get(*k) != Some(*e))
        .map(|(k, _)| k.clone())
        .collect();
    let removed: std::collections::BTreeSet<_> = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    if changed != delta.endpoints_changed || removed != delta.endpoints_removed {
        return Err(format!(
            "endpoints changed {changed:?} removed {removed:?}, delta says {:?} / {:?}",
            delta.endpoints_changed, delta.endpoints_removed
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The index after any sequence of changes holds the program a full compile gives, and
    /// each change's delta takes the previous program to the next.
    #[test]
    fn policy_index_follows_changes_like_a_full_compile(
        mut w in arb_world(),
        changes in prop::collection::vec(arb_change(), 1..12),
    ) {
        let mut index = PolicyIndex::new("n1", &w.policies, &w.namespaces, &w.pods);
        let mut before = index.program();
        prop_assert_eq!(&before, &compile(&w.policies, &w.namespaces, &w.pods, "n1"));
        for (step, c) in changes.iter().enumerate() {
            let delta = apply_change(&mut w, &mut index, c);
            let after = index.program();
            let want = compile(&w.policies, &w.namespaces, &w.pods, "n1");
            prop_assert_eq!(
                &after, &want,
                "step {} {:?}\n{:?}", step, c, w
            );
            if let Err(e) = check_delta(&before, &after, &delta) {
                prop_assert!(false, "step {} {:?}: {}\n{:?}", step, c, e, w);
            }
            before = after;
        }
    }
}

/// A remote pod's label change touches one set's members and nothing else.
#[test]
fn policy_index_label_change_is_one_member() {
    let w = fixed_world();
    let mut index = PolicyIndex::new("n1", &w.policies, &w.namespaces, &w.pods);
    let before = index.program();
    let changed: Vec<&PolicyPod> = w.pods.iter().filter(|p| p.node != "n1").collect();
    let mut pod = changed[0].clone();
    pod.labels = Cow::Owned(labels(&[("role", "nothing-selects-this")]));
    let delta = index.upsert_pod(&pod);
    assert!(delta.endpoints_changed.is_empty() && delta.sets_added.is_empty());
    assert_eq!(check_delta(&before, &index.program(), &delta), Ok(()));
    // Setting the labels back restores the program exactly.
    let undo = index.upsert_pod(changed[0]);
    assert_eq!(index.program(), before);
    assert_eq!(delta.members_added, undo.members_removed);
    assert_eq!(delta.members_removed, undo.members_added);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The policy part of a node's table re-rendered from another program: the patch makes the
    /// table the other program's render (other objects untouched), its undo puts it back, and
    /// its text applies to a real kernel after the first table.
    #[test]
    fn a_policy_patch_makes_the_table_the_other_programs_render(a in arb_world(), b in arb_world()) {
        let table = |w: &World| {
            let mut t = nft::Table::new("inet", "malla");
            t.chains.insert("services".into(), nft::Chain { base: None, rules: vec!["drop".into()] });
            t.sets.insert("pools-v4".into(), nft::Set { type_: "ipv4_addr".into(), ..nft::Set::default() });
            // As every node's table (masquerade::node_table).
            super::flowlog::add_lost_chains(&mut t);
            render_policy(&compile(&w.policies, &w.namespaces, &w.pods, "n1"), &mut t);
            t
        };
        let (ta, tb) = (table(&a), table(&b));
        let patch = super::members::policy_patch(&ta, &compile(&b.policies, &b.namespaces, &b.pods, "n1"));
        prop_assert!(patch.before.chains.keys().chain(patch.after.chains.keys()).all(|n| super::members::is_policy_object(n)));
        let mut t = ta.clone();
        patch.apply_to(&mut t);
        prop_assert_eq!(&t, &tb);
        patch.undo(&mut t);
        prop_assert_eq!(&t, &ta);
        let steps = [nft::render_full(&ta), patch.text()];
        if let Some(r) = crate::testutil::nft_apply_in_private_netns(&steps) {
            prop_assert_eq!(r, Ok(()), "{}", steps.join("\n----\n"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A pod's traffic to its own node (the input hook): the rendered table applies the pod's
    /// egress policy exactly as the reference decides its egress to that address (the node is
    /// not a pod: no ingress side), so the trace and the dataplane agree on that path too.
    #[test]
    fn traffic_to_the_own_node_takes_the_pods_egress_policy(w in arb_world()) {
        let node_ip: IpAddr = "198.19.0.1".parse().unwrap();
        for node in ["n1", "n2"] {
            let prog = compile(&w.policies, &w.namespaces, &w.pods, node);
            let t = rendered(&prog);
            let e = nfteval::Eval::new(&t, render::POLICY_INPUT)
                .unwrap_or_else(|e| panic!("{e}\n{}", nft::render_full(&t)));
            for pod in w.pods.iter().filter(|p| p.node == node) {
                let Some(&src) = pod.ips.iter().find(|ip| ip.is_ipv4()) else { continue };
                for port in PROBED_PORTS {
                    let c = Connection {
                        src: Endpoint::resolve(&w.pods, src),
                        dst: Endpoint::resolve(&w.pods, node_ip),
                        port,
                        proto: Protocol::Tcp,
                    };
                    let why = explain(&w.policies, &w.namespaces, &c);
                    let packet = nfteval::Packet {
                        iifname: &pod.host_ifname,
                        oifname: "",
                        src,
                        dst: node_ip,
                        proto: Protocol::Tcp,
                        dport: port,
                        sport: super::tiers::SOURCE_PORT,
                    };
                    prop_assert_eq!(e.accepts(&packet), Ok(why.egress.allowed()), "{} -> node {}: {}", src, port, why);
                    prop_assert_eq!(why.allowed, why.egress.allowed());
                }
            }
        }
    }
}

// ---- Tiered policy (Calico's policies with NetworkPolicy in the default tier) ----

mod tiered {
    use super::*;
    use crate::host::{CalicoView, Labelled};
    use crate::policy::staged;
    use malla_api::calico::{
        Action, CalicoNetworkPolicy, EntityRule, GlobalNetworkPolicy, GlobalNetworkPolicySpec,
        Order, Port, Proto, Rule, Tier,
    };

    const SELECTORS: [&str; 7] = [
        "a == 'x'",
        "has(b)",
        "all()",
        "c != 'y'",
        "a in {'x', 'y'}",
        "!has(a)",
        "b == 'y' && has(c)",
    ];
    /// Patterns DNS-name rules name, and names pods learn.
    const DNS_PATTERNS: [&str; 4] = [
        "*.allowed.test",
        "api.example.com",
        "*.example.com",
        "x.other.test",
    ];
    const DNS_NAMES: [&str; 6] = [
        "a.allowed.test",
        "b.c.allowed.test",
        "allowed.test",
        "api.example.com",
        "x.other.test",
        "API.Example.com.",
    ];
    const NETS: [&str; 5] = [
        "10.0.0.0/24",
        "10.0.0.1/32",
        "fd00::/64",
        "192.168.0.0/16",
        "10.0.0.2/31",
    ];

    fn arb_side() -> impl Strategy<Value = EntityRule> {
        (
            prop::collection::vec(prop::sample::select(&NETS[..]), 0..2),
            prop::option::weighted(0.2, prop::sample::select(&NETS[..])),
            prop::option::weighted(0.4, prop::sample::select(&SELECTORS[..])),
            prop::option::weighted(0.2, prop::sample::select(&SELECTORS[..])),
            prop::option::weighted(0.2, prop::sample::select(&SELECTORS[..])),
            prop::collection::vec(
                prop::sample::select(&[(53u16, 53u16), (80, 85), (8080, 8091), (90, 90)][..]),
                0..2,
            ),
            prop::option::weighted(0.2, prop::sample::select(&[(80u16, 81u16), (53, 55)][..])),
        )
            .prop_map(
                |(nets, not_net, sel, not_sel, ns, ports, not_port)| EntityRule {
                    nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
                    not_nets: not_net.iter().map(|n| n.parse().unwrap()).collect(),
                    selector: sel.map(str::to_string),
                    not_selector: not_sel.map(str::to_string),
                    namespace_selector: ns.map(str::to_string),
                    ports: ports.iter().map(|(a, b)| Port::Range(*a, *b)).collect(),
                    not_ports: not_port.iter().map(|(a, b)| Port::Range(*a, *b)).collect(),
                    domains: Vec::new(),
                },
            )
    }

    fn arb_rule() -> impl Strategy<Value = Rule> {
        (
            prop_oneof![
                3 => Just(Action::Allow),
                2 => Just(Action::Deny),
                1 => Just(Action::Pass),
                1 => Just(Action::Log)
            ],
            prop::option::of(prop_oneof![Just(Proto::TCP), Just(Proto::UDP)]),
            prop::option::weighted(0.1, prop_oneof![Just(4u8), Just(6u8)]),
            prop::option::weighted(0.1, prop_oneof![Just(Proto::TCP), Just(Proto::UDP)]),
            arb_side(),
            arb_side(),
            prop::option::weighted(0.3, prop::sample::subsequence(&DNS_PATTERNS[..], 1..3)),
        )
            .prop_map(
                |(
                    action,
                    protocol,
                    ip_version,
                    not_protocol,
                    mut source,
                    mut destination,
                    domains,
                )| {
                    // A DNS-name rule: an Allow or Deny rule whose destination is its domains.
                    if let (Some(d), Action::Allow | Action::Deny) = (domains, action) {
                        destination = EntityRule {
                            ports: destination.ports,
                            not_ports: destination.not_ports,
                            domains: d.iter().map(|x| x.to_string()).collect(),
                            ..EntityRule::default()
                        };
                    }
                    if protocol.is_none() {
                        for s in [&mut source, &mut destination] {
                            s.ports.clear();
                            s.not_ports.clear();
                        }
                    }
                    if let Some(v) = ip_version {
                        for s in [&mut source, &mut destination] {
                            s.nets.retain(|n| n.addr().is_ipv6() == (v == 6));
                        }
                    }
                    Rule {
                        action,
                        protocol,
                        not_protocol,
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

    fn arb_spec(global: bool) -> impl Strategy<Value = GlobalNetworkPolicySpec> {
        (
            prop::sample::select(&[None, Some("security"), Some("default")][..]),
            prop::option::of(0..4u8),
            prop::sample::select(&SELECTORS[..]),
            prop::option::weighted(0.3, prop::sample::select(&SELECTORS[..]))
                .prop_map(move |s| s.filter(|_| global)),
            0..3u8,
            prop::collection::vec(arb_rule(), 0..4),
            prop::collection::vec(arb_rule(), 0..4),
        )
            .prop_map(|(tier, order, sel, ns, types, ingress, egress)| {
                let types = match types {
                    0 => None,
                    1 => Some(vec![malla_api::calico::PolicyType::Ingress]),
                    _ => Some(vec![
                        malla_api::calico::PolicyType::Ingress,
                        malla_api::calico::PolicyType::Egress,
                    ]),
                };
                let egress = match &types {
                    Some(t) if !t.contains(&malla_api::calico::PolicyType::Egress) => Vec::new(),
                    _ => egress,
                };
                GlobalNetworkPolicySpec {
                    tier: tier.map(str::to_string),
                    // 0, 500, 1000, 1500: before, beside and after the NetworkPolicies.
                    order: order.map(|o| Order(f64::from(o) * 500.0)),
                    selector: sel.into(),
                    namespace_selector: ns.map(str::to_string),
                    types,
                    ingress,
                    egress,
                    ..GlobalNetworkPolicySpec::default()
                }
            })
    }

    fn arb_cnp_peer(egress: bool) -> impl Strategy<Value = malla_api::cnp::Peer> {
        use malla_api::cnp::{NamespacedPod, Peer};
        (
            0..if egress { 5u8 } else { 2 },
            arb_selector(),
            arb_selector(),
            prop::sample::subsequence(&NETS[..], 1..3),
            prop::sample::subsequence(&DNS_PATTERNS[..], 1..3),
        )
            .prop_map(|(kind, a, b, nets, names)| match kind {
                4 => Peer {
                    domain_names: Some(names.iter().map(|x| x.to_string()).collect()),
                    ..Peer::default()
                },
                0 => Peer {
                    namespaces: Some(a),
                    ..Peer::default()
                },
                1 => Peer {
                    pods: Some(NamespacedPod {
                        namespace_selector: a,
                        pod_selector: b,
                    }),
                    ..Peer::default()
                },
                2 => Peer {
                    networks: Some(nets.iter().map(|n| n.parse().unwrap()).collect()),
                    ..Peer::default()
                },
                _ => Peer {
                    nodes: Some(if b.is_empty() {
                        b
                    } else {
                        LabelSelector {
                            match_labels: [(
                                "kubernetes.io/hostname".to_string(),
                                "n2".to_string(),
                            )]
                            .into(),
                            match_expressions: vec![],
                        }
                    }),
                    ..Peer::default()
                },
            })
    }

    fn arb_cnp_rule(egress: bool) -> impl Strategy<Value = malla_api::cnp::CnpRule> {
        use malla_api::cnp::{
            CnpAction, CnpPort, CnpRule, PortRange, Protocol as P, ProtocolPorts,
        };
        (
            prop_oneof![
                Just(CnpAction::Accept),
                Just(CnpAction::Deny),
                Just(CnpAction::Pass)
            ],
            prop::collection::vec(arb_cnp_peer(egress), 1..3),
            prop::collection::vec(
                (0..4u8, 0..4u8, prop::sample::select(&PORT_NAMES[..])),
                0..3,
            ),
        )
            .prop_map(|(action, peers, protos)| {
                let wide = peers
                    .iter()
                    .any(|p| p.networks.is_some() || p.nodes.is_some() || p.domain_names.is_some());
                let protocols = protos
                    .into_iter()
                    .map(|(kind, port, name)| {
                        let dp = match port {
                            0 => None,
                            1 => Some(CnpPort {
                                number: Some(80),
                                range: None,
                            }),
                            2 => Some(CnpPort {
                                number: Some(8080),
                                range: None,
                            }),
                            _ => Some(CnpPort {
                                number: None,
                                range: Some(PortRange { start: 80, end: 85 }),
                            }),
                        };
                        let pp = Some(ProtocolPorts {
                            destination_port: dp,
                        });
                        match kind {
                            0 => P {
                                tcp: pp,
                                ..P::default()
                            },
                            1 => P {
                                udp: pp,
                                ..P::default()
                            },
                            2 if !wide => P {
                                destination_named_port: Some(name.to_string()),
                                ..P::default()
                            },
                            _ => P {
                                tcp: pp,
                                ..P::default()
                            },
                        }
                    })
                    .collect();
                CnpRule {
                    name: String::new(),
                    action,
                    peers,
                    protocols,
                }
            })
    }

    fn arb_cnp() -> impl Strategy<Value = malla_api::cnp::ClusterNetworkPolicy> {
        use malla_api::cnp::{ClusterNetworkPolicy, CnpSpec, CnpTier, NamespacedPod, Subject};
        (
            any::<bool>(),
            0..3i32,
            any::<bool>(),
            arb_selector(),
            arb_selector(),
            prop::collection::vec(arb_cnp_rule(false), 0..3),
            prop::collection::vec(arb_cnp_rule(true), 0..3),
            any::<u16>(),
        )
            .prop_map(|(admin, priority, by_ns, a, b, ingress, egress, id)| {
                ClusterNetworkPolicy {
                    name: format!("cnp{id}"),
                    spec: CnpSpec {
                        tier: if admin {
                            CnpTier::Admin
                        } else {
                            CnpTier::Baseline
                        },
                        priority,
                        subject: if by_ns {
                            Subject {
                                namespaces: Some(a),
                                pods: None,
                            }
                        } else {
                            Subject {
                                namespaces: None,
                                pods: Some(NamespacedPod {
                                    namespace_selector: a,
                                    pod_selector: b,
                                }),
                            }
                        },
                        ingress,
                        egress,
                    },
                }
            })
    }

    fn arb_calico(n_ns: usize) -> impl Strategy<Value = CalicoView> {
        (
            prop::collection::vec(arb_spec(true), 0..3),
            prop::collection::vec((0..n_ns, arb_spec(false)), 0..3),
            prop::option::of(0..3u16),
            any::<bool>(),
            prop::collection::vec(arb_cnp(), 0..3),
            prop::option::weighted(0.5, prop::sample::subsequence(&DNS_PATTERNS[..], 1..3)),
        )
            .prop_map(
                |(globals, namespaced, tier_order, tier_pass, cnps, set_domains)| CalicoView {
                    cluster_policies: cnps,
                    staged: Vec::new(),
                    // A network set selectors pick, with names besides its network.
                    network_sets: set_domains
                        .map(|d| malla_api::calico::GlobalNetworkSet {
                            name: "dns-set".into(),
                            labels: [("a".to_string(), "x".to_string())].into(),
                            spec: malla_api::calico::GlobalNetworkSetSpec {
                                nets: vec!["192.168.0.0/16".parse().unwrap()],
                                allowed_egress_domains: d.iter().map(|x| x.to_string()).collect(),
                            },
                        })
                        .into_iter()
                        .collect(),
                    tiers: vec![Tier {
                        name: "security".into(),
                        order: tier_order.map(|o| Order(f64::from(o) * 800.0)),
                        default_action: tier_pass.then_some(Action::Pass),
                    }],
                    policies: globals
                        .into_iter()
                        .enumerate()
                        .map(|(i, spec)| GlobalNetworkPolicy {
                            name: format!("g{i}"),
                            spec,
                        })
                        .collect(),
                    network_policies: namespaced
                        .into_iter()
                        .enumerate()
                        .map(|(i, (ns, spec))| CalicoNetworkPolicy {
                            namespace: format!("ns{ns}"),
                            name: format!("c{i}"),
                            spec,
                        })
                        .collect(),
                    ..CalicoView::default()
                },
            )
    }

    /// Staged policies over the names `arb_calico` and `arb_world` use: replacing (`g0`, `c0`,
    /// `p0`, `cnp…`), new (`g7`, `sknp`) and deleting ones, of every kind.
    fn arb_staged(n_ns: usize) -> impl Strategy<Value = Vec<malla_api::staged::StagedPolicy>> {
        use malla_api::policy::{NetworkPolicySpec, PolicyType};
        use malla_api::staged::{Staged, StagedAction, StagedPolicy};
        let one = (
            0..5u8,
            any::<bool>(),
            any::<bool>(),
            0..n_ns,
            arb_spec(true),
            arb_spec(false),
            arb_cnp(),
            any::<bool>(),
        )
            .prop_map(
                move |(kind, delete, replace, ns, gspec, nspec, cnp, ingress)| {
                    let policy = match kind {
                        0 => Staged::GlobalNetworkPolicy(GlobalNetworkPolicy {
                            name: if replace { "g0" } else { "g7" }.into(),
                            spec: gspec,
                        }),
                        1 => Staged::NetworkPolicy(CalicoNetworkPolicy {
                            namespace: format!("ns{ns}"),
                            name: if replace { "c0" } else { "c7" }.into(),
                            spec: nspec,
                        }),
                        2 | 3 => Staged::KubernetesNetworkPolicy(NetworkPolicy {
                            namespace: format!("ns{ns}"),
                            name: if replace { "p0" } else { "sknp" }.into(),
                            // A deny-all of one direction.
                            spec: NetworkPolicySpec {
                                policy_types: Some(vec![if ingress {
                                    PolicyType::Ingress
                                } else {
                                    PolicyType::Egress
                                }]),
                                ..NetworkPolicySpec::default()
                            },
                        }),
                        _ => Staged::ClusterNetworkPolicy(cnp),
                    };
                    StagedPolicy {
                        staged_action: if delete {
                            StagedAction::Delete
                        } else {
                            StagedAction::Set
                        },
                        policy,
                    }
                },
            );
        prop::collection::vec(one, 1..3)
    }

    fn ents(w: &World) -> Vec<Labelled> {
        w.pods
            .iter()
            .map(|p| {
                let mut labels = p.labels.clone().into_owned();
                labels.insert(
                    "projectcalico.org/namespace".into(),
                    p.namespace.to_string(),
                );
                Labelled {
                    labels,
                    namespace: Some(namespace_labels(&w.namespaces, &p.namespace).clone()),
                    ns_name: Some(p.namespace.to_string()),
                    nets: p.ips.iter().map(|ip| ipnet::IpNet::from(*ip)).collect(),
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// The tiered dataplane (NetworkPolicy's chains plus the tier chains, run by the
        /// interpreter on both nodes) decides every connection as the tiered reference does.
        #[test]
        fn tiered_policy_rendered_matches_reference(
            w in arb_world(),
            calico in arb_calico(3),
            learned in prop::collection::vec((0..8usize, 0..DNS_NAMES.len(), 0..32usize), 0..40),
        ) {
            let mut ents = ents(&w);
            ents.extend(calico.network_sets.iter().map(|s| Labelled {
                labels: s.labels.clone(),
                namespace: None,
                ns_name: None,
                nets: s.spec.nets.clone(),
            }));
            // What pods learned from DNS: names with addresses of the world.
            let mut view = super::dns::DnsView::default();
            let all = addresses(&w);
            if !w.pods.is_empty() {
                for (pod, name, addr) in learned {
                    let pod = &w.pods[pod % w.pods.len()];
                    view.learn(&pod.key(), DNS_NAMES[name], [all[addr % all.len()]]);
                }
            }
            let nodes = vec![
                ("n1".to_string(), vec!["192.168.3.4".parse().unwrap()]),
                ("n2".to_string(), vec!["10.0.1.9".parse().unwrap(), "2001:db8::1".parse().unwrap()]),
            ];
            let inp = tiers::TierInputs {
                calico: &calico,
                policies: &w.policies,
                namespaces: &w.namespaces,
                pods: &w.pods,
                ents: &ents,
                nodes: &nodes,
                dns: &view,
            };
            let evals: Vec<(&str, nfteval::Eval)> = ["n1", "n2"]
                .iter()
                .map(|n| {
                    let mut t = nft::Table::new("inet", "malla");
                    let prog = compile(&w.policies, &w.namespaces, &w.pods, n);
                    render_policy(&prog, &mut t);
                    tiers::render_tiers(&inp, &prog, n, &mut t);
                    let ds = super::dns::dns_sets(&inp, n);
                    super::dns::fill(&mut t, &ds, &view);
                    let e = nfteval::Eval::new(&t, render::POLICY_FORWARD)
                        .unwrap_or_else(|e| panic!("{e}\n{}", nft::render_full(&t)));
                    (*n, e)
                })
                .collect();
            let addrs = addresses(&w);
            for &src in &addrs {
                for &dst in &addrs {
                    if src.is_ipv4() != dst.is_ipv4() {
                        continue;
                    }
                    for port in [53u16, 80, 81, 85, 90, 8080] {
                        for proto in [Protocol::Tcp, Protocol::Udp] {
                            let c = Connection {
                                src: Endpoint::resolve(&w.pods, src),
                                dst: Endpoint::resolve(&w.pods, dst),
                                port,
                                proto,
                            };
                            let want = tiers::allowed(&inp, &c);
                            let got = rendered_allows(&w, &evals, src, dst, port, proto);
                            prop_assert_eq!(got, Ok(want), "{} -> {} {:?}/{}\n{:?}\n{:#?}\n{:?}", src, dst, proto, port, w, calico, view);
                        }
                    }
                }
            }
        }

        /// Staged policies never change what is enforced, and the pending points the rendered
        /// chains log are the pending reference's: the egress one, and the ingress one when the
        /// enforced egress let the packet on to the destination's dispatch.
        #[test]
        fn staged_policy_logs_the_pending_reference(
            w in arb_world(),
            calico in arb_calico(3),
            staged in arb_staged(3),
        ) {
            let ents = ents(&w);
            let nodes = vec![
                ("n1".to_string(), vec!["192.168.3.4".parse().unwrap()]),
                ("n2".to_string(), vec!["10.0.1.9".parse().unwrap(), "2001:db8::1".parse().unwrap()]),
            ];
            let mut with_staged = calico.clone();
            with_staged.staged = staged;
            let inp = tiers::TierInputs {
                calico: &with_staged,
                policies: &w.policies,
                namespaces: &w.namespaces,
                pods: &w.pods,
                ents: &ents,
                nodes: &nodes,
                dns: super::dns::DnsView::EMPTY,
            };
            let evals: Vec<(&str, nfteval::Eval)> = ["n1", "n2"]
                .iter()
                .map(|n| {
                    let mut t = nft::Table::new("inet", "malla");
                    let prog = compile(&w.policies, &w.namespaces, &w.pods, n);
                    render_policy(&prog, &mut t);
                    tiers::render_tiers(&inp, &prog, n, &mut t);
                    let e = nfteval::Eval::new(&t, render::POLICY_FORWARD)
                        .unwrap_or_else(|e| panic!("{e}\n{}", nft::render_full(&t)));
                    (*n, e)
                })
                .collect();
            let addrs = addresses(&w);
            for &src in &addrs {
                for &dst in &addrs {
                    if src.is_ipv4() != dst.is_ipv4() {
                        continue;
                    }
                    for port in [53u16, 80, 8080] {
                        for proto in [Protocol::Tcp, Protocol::Udp] {
                            let c = Connection {
                                src: Endpoint::resolve(&w.pods, src),
                                dst: Endpoint::resolve(&w.pods, dst),
                                port,
                                proto,
                            };
                            let want = tiers::allowed(&inp, &c);
                            let (got, logs) = rendered_run(&w, &evals, src, dst, port, proto)
                                .map_err(TestCaseError::fail)?;
                            let pending: Vec<String> =
                                logs.into_iter().filter(|l| l.starts_with("malla:P:")).collect();
                            let mut expect = Vec::new();
                            if let Some(v) = staged::explain_pending(&inp, Direction::Egress, &c) {
                                expect.push(v.point.prefix());
                            }
                            if tiers::direction_allowed(&inp, Direction::Egress, &c) {
                                if let Some(v) = staged::explain_pending(&inp, Direction::Ingress, &c) {
                                    expect.push(v.point.prefix());
                                }
                            }
                            prop_assert_eq!(got, want, "enforced {} -> {} {:?}/{}", src, dst, proto, port);
                            prop_assert_eq!(&pending, &expect, "{} -> {} {:?}/{}\n{:?}\n{:#?}", src, dst, proto, port, w, with_staged);
                        }
                    }
                }
            }
        }

        /// The tier member path: random changes of pods (labels, deletion, a new address) on
        /// a node with tiered policy, each planned by the policy node against the table as last
        /// applied; when it plans, the table is what the whole-node computation gives (and the
        /// undo puts it back); when it declines, the whole node is computed, as the agent does.
        #[test]
        fn tier_member_path_equals_the_whole_node(
            w in arb_world(),
            calico in arb_calico(3),
            changes in prop::collection::vec((0..6usize, 0..4u8, arb_labels()), 1..6),
        ) {
            let mut v = cluster_view(&w, &calico);
            let mut table = crate::compute(&v, "n1").nft_table;
            let mut node = crate::policy::PolicyNode::new(&v, "n1");
            for (i, kind, labels) in changes {
                let i = i % v.endpoints.len().max(1);
                let Some(ep) = v.endpoints.get(i).cloned() else { break };
                match kind {
                    0 | 1 => {
                        if let Some(p) = v.pods.iter_mut().find(|p| p.name == ep.pod) {
                            p.labels = labels;
                        }
                    }
                    2 => {
                        v.endpoints.remove(i);
                        v.pods.retain(|p| p.name != ep.pod);
                    }
                    _ => {
                        // A new address (the pod deleted and created again elsewhere in its block).
                        let e = &mut v.endpoints[i];
                        e.ips = vec![format!("10.0.0.{}/32", 100 + i).parse().unwrap()];
                    }
                }
                let inputs = crate::policy::PolicyInputs {
                    pods: [(ep.namespace.clone(), ep.pod.clone())].into(),
                    ..Default::default()
                };
                let want = crate::compute(&v, "n1").nft_table;
                let before = table.clone();
                match node.plan_tiered(&v, &inputs, &mut table) {
                    Some(plan) => {
                        prop_assert!(plan.elements_only());
                        prop_assert_eq!(&table, &want, "{:?}\n{:#?}", w, calico);
                        plan.undo(&mut table, &mut Default::default());
                        prop_assert_eq!(&table, &before);
                        table = want;
                    }
                    None => {
                        table = want;
                        if node.follow(&v, &inputs).is_none() {
                            node = crate::policy::PolicyNode::new(&v, "n1");
                        }
                        node.calico_changed();
                    }
                }
            }
            let pods = crate::routes::policy_pods(&v);
            prop_assert_eq!(node.program(), compile(&v.policies, &v.namespaces, &pods, "n1"));
        }
    }

    /// World `w` with Calico's objects `calico` as a cluster view (pods on nodes `n1`, `n2`).
    fn cluster_view(w: &World, calico: &CalicoView) -> crate::ClusterView {
        let mut v = crate::ClusterView {
            namespaces: w.namespaces.clone(),
            policies: w.policies.clone(),
            calico: calico.clone(),
            ..Default::default()
        };
        for p in &w.pods {
            v.pods.push(malla_api::Pod {
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
                labels: p.labels.clone().into_owned(),
                node: p.node.to_string(),
                ports: p.ports.to_vec(),
                ips: Vec::new(),
                allowed_source_prefixes: Vec::new(),
                host_network: false,
            });
            v.endpoints.push(malla_api::WorkloadEndpoint {
                namespace: p.namespace.to_string(),
                pod: p.name.to_string(),
                node: p.node.to_string(),
                container_id: format!("c-{}", p.name),
                ifname: "eth0".into(),
                host_ifname: p.host_ifname.to_string(),
                ips: p.ips.iter().map(|ip| ipnet::IpNet::from(*ip)).collect(),
                mac: String::new(),
                ipam_handle: String::new(),
            });
        }
        v
    }
}
