//! The guard node against a from-scratch computation after random sequences of endpoint and
//! pod changes, its deltas applied to a rendered table against a full render, and the rendered
//! table checked by `nft -c` where that can run.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use malla_api::{Pod, WorkloadEndpoint};
use proptest::prelude::*;

use super::*;

fn ep(pod: &str, ifname: &str, ips: &[&str]) -> WorkloadEndpoint {
    WorkloadEndpoint {
        namespace: "ns".into(),
        pod: pod.into(),
        node: "me".into(),
        container_id: format!("c-{pod}"),
        ifname: "eth0".into(),
        host_ifname: ifname.into(),
        ips: ips
            .iter()
            .map(|s| IpNet::from(s.parse::<std::net::IpAddr>().unwrap()))
            .collect(),
        mac: "02:00:00:00:00:01".into(),
        ipam_handle: pod.into(),
    }
}

fn pod(name: &str, prefixes: &[&str]) -> Pod {
    Pod {
        namespace: "ns".into(),
        name: name.into(),
        labels: Default::default(),
        node: "me".into(),
        ports: vec![],
        ips: vec![],
        allowed_source_prefixes: prefixes.iter().map(|s| s.parse().unwrap()).collect(),
        host_network: false,
    }
}

fn entry(ifname: &str, net: &str, allowed: bool) -> GuardEntry {
    GuardEntry {
        ifname: ifname.into(),
        net: net.parse().unwrap(),
        allowed,
    }
}

/// Own 198.18.0.5 and fd00::5 of `ifname`, allowed `v4_prefix` and fd00:9::/64.
fn sample(ifname: &str, v4_prefix: &str) -> BTreeSet<GuardEntry> {
    [
        entry(ifname, "198.18.0.5/32", false),
        entry(ifname, "fd00::5/128", false),
        entry(ifname, v4_prefix, true),
        entry(ifname, "fd00:9::/64", true),
    ]
    .into()
}

#[test]
fn own_addresses_exact_allowed_prefixes_merged() {
    let e = ep("a", "mla0", &["198.18.0.5", "fd00::5"]);
    let prefixes: Vec<IpNet> = [
        "198.18.5.0/25",
        "198.18.5.128/25",
        "198.18.5.7/32",
        "fd00:9::/64",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let got = interface_entries("mla0", [(&e, prefixes.as_slice())]);
    assert_eq!(got, sample("mla0", "198.18.5.0/24"));
    assert_eq!(got.iter().filter(|e| e.set() == ALLOW_V4).count(), 1);
}

#[test]
fn a_pods_annotation_follows_it_and_only_local_pods_count() {
    let mut g = GuardNode::new();
    g.endpoint(None, Some(&ep("a", "mla0", &["198.18.0.5"])));
    let d = g.take_delta();
    assert_eq!(d.added, vec![entry("mla0", "198.18.0.5/32", false)]);
    assert!(g.pod(None, Some(&pod("a", &["198.18.9.0/24"]))));
    let d = g.take_delta();
    assert_eq!(d.added, vec![entry("mla0", "198.18.9.0/24", true)]);
    assert!(d.removed.is_empty());
    // A pod with no local endpoint changes nothing here.
    assert!(!g.pod(None, Some(&pod("b", &["198.18.10.0/24"]))));
    assert!(g.take_delta().is_empty());
    // b's endpoint arrives: its prefixes come with it.
    g.endpoint(None, Some(&ep("b", "mla1", &["198.18.0.6"])));
    let d = g.take_delta();
    assert_eq!(d.added.len(), 2, "{d:?}");
    // The annotation is removed: the prefix goes.
    assert!(g.pod(Some(&pod("a", &["198.18.9.0/24"])), Some(&pod("a", &[]))));
    let d = g.take_delta();
    assert_eq!(d.removed, vec![entry("mla0", "198.18.9.0/24", true)]);
    g.endpoint(Some(&ep("a", "mla0", &["198.18.0.5"])), None);
    assert_eq!(
        g.take_delta().removed,
        vec![entry("mla0", "198.18.0.5/32", false)]
    );
    assert_eq!(g.entries().len(), 2);
}

#[test]
fn render_off_is_nothing_and_on_checks_with_nft() {
    let mut t = nft::Table::new("inet", "malla");
    render(&BTreeSet::new(), GuardConfig::default(), &mut t);
    assert_eq!(t, nft::Table::new("inet", "malla"));
    assert_eq!(apply_delta(&mut t, &GuardDelta::default()), Ok(None));
    let entries = sample("mla0123456789a", "198.18.9.0/24");
    render(&entries, ON, &mut t);
    let text = nft::render_full(&t);
    assert!(
        text.contains("type filter hook prerouting priority raw;"),
        "{text}"
    );
    assert!(
        text.contains("\"mla0123456789a\" . 198.18.9.0/24"),
        "{text}"
    );
    if let Some(r) = crate::testutil::nft_check(&text) {
        r.unwrap();
    }
}

/// Anti-spoofing on, checked by the chain alone (the pure computation's default).
const ON: GuardConfig = GuardConfig {
    on: true,
    kernel_reverse_path: false,
    ipv6: false,
};

/// With the kernel checking IPv4, an IPv4-only node with no allowed prefix has the sets but no
/// chain, and every interface is strict; an allowed IPv4 prefix brings the chain and makes its
/// interface loose; an IPv6 address or pool brings the chain too.
#[test]
fn the_kernel_checks_ipv4_and_the_chain_the_rest() {
    let kernel = GuardConfig {
        on: true,
        kernel_reverse_path: true,
        ipv6: false,
    };
    let v4_only: BTreeSet<GuardEntry> = [
        entry("mla0", "198.18.0.5/32", false),
        entry("mla1", "198.18.0.6/32", false),
    ]
    .into();
    let mut t = nft::Table::new("inet", "malla");
    render(&v4_only, kernel, &mut t);
    assert!(!t.chains.contains_key(CHAIN));
    assert_eq!(t.sets.len(), 4);
    assert_eq!(
        strict_interfaces(&t),
        ["mla0".to_string(), "mla1".to_string()].into()
    );

    let mut with_v6_pool = nft::Table::new("inet", "malla");
    render(
        &v4_only,
        GuardConfig {
            ipv6: true,
            ..kernel
        },
        &mut with_v6_pool,
    );
    assert!(with_v6_pool.chains.contains_key(CHAIN));

    // An allowed prefix arriving by delta needs the chain: a full computation, table untouched.
    let before = t.clone();
    let delta = GuardDelta {
        removed: vec![],
        added: vec![entry("mla1", "198.19.5.0/24", true)],
    };
    assert_eq!(apply_delta(&mut t, &delta), Err(Recompute));
    assert_eq!(t, before);
    let mut both = v4_only.clone();
    both.extend(delta.added.iter().cloned());
    let mut full = nft::Table::new("inet", "malla");
    render(&both, kernel, &mut full);
    assert!(full.chains.contains_key(CHAIN));
    assert_eq!(strict_interfaces(&full), ["mla0".to_string()].into());

    // Off: no sets, nothing strict.
    let mut off = nft::Table::new("inet", "malla");
    render(&both, GuardConfig::default(), &mut off);
    assert!(strict_interfaces(&off).is_empty());
}

/// A change to the guard's inputs.
#[derive(Debug, Clone)]
enum Change {
    Endpoint { pod: u8, addr: u8, on: bool },
    Annotation { pod: u8, prefixes: Vec<u8> },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (0u8..5, 0u8..4, any::<bool>()).prop_map(|(pod, addr, on)| Change::Endpoint {
            pod,
            addr,
            on
        }),
        (0u8..5, proptest::collection::vec(0u8..6, 0..3))
            .prop_map(|(pod, prefixes)| Change::Annotation { pod, prefixes }),
    ]
}

fn prefix(i: u8) -> &'static str {
    [
        "198.18.8.0/24",
        "198.18.8.0/25",
        "198.18.9.0/24",
        "fd00:8::/64",
        "fd00:8::/60",
        "198.18.8.7/32",
    ][usize::from(i)]
}

proptest! {
    /// After every batch of changes: the node's entries are those computed from scratch, and
    /// the deltas applied to the first render give the table a full render gives.
    #[test]
    fn incremental_equals_from_scratch(
        batches in proptest::collection::vec(proptest::collection::vec(change(), 1..6), 1..8),
        kernel_reverse_path in any::<bool>(),
        ipv6 in any::<bool>(),
    ) {
        let cfg = GuardConfig { on: true, kernel_reverse_path, ipv6 };
        let mut g = GuardNode::new();
        let mut eps: BTreeMap<u8, WorkloadEndpoint> = BTreeMap::new();
        let mut pods: BTreeMap<u8, Pod> = BTreeMap::new();
        let mut table = nft::Table::new("inet", "malla");
        render(&BTreeSet::new(), cfg, &mut table);
        for batch in batches {
            for c in batch {
                match c {
                    Change::Endpoint { pod: p, addr, on } => {
                        let name = format!("p{p}");
                        // Odd pods are IPv4-only: the chain comes and goes with the others.
                        let (v4, v6) = (format!("198.18.0.{}", addr + 1), format!("fd00::{}", addr + 1));
                        let ips: Vec<&str> = if p % 2 == 1 { vec![&v4] } else { vec![&v4, &v6] };
                        let new = on.then(|| ep(&name, &format!("mla{p}"), &ips));
                        let old = eps.remove(&p);
                        g.endpoint(old.as_ref(), new.as_ref());
                        if let Some(n) = new { eps.insert(p, n); }
                    }
                    Change::Annotation { pod: p, prefixes } => {
                        let names: Vec<&str> = prefixes.iter().map(|i| prefix(*i)).collect();
                        let new = pod(&format!("p{p}"), &names);
                        let old = pods.insert(p, new.clone());
                        g.pod(old.as_ref(), Some(&new));
                    }
                }
            }
            let delta = g.take_delta();
            let before = table.clone();
            let applied = apply_delta(&mut table, &delta);
            let mut want = BTreeSet::new();
            for (p, e) in &eps {
                let prefixes = pods.get(p).map(|x| x.allowed_source_prefixes.clone()).unwrap_or_default();
                want.extend(interface_entries(&e.host_ifname, [(e, prefixes.as_slice())]));
            }
            prop_assert_eq!(&g.entries(), &want);
            let mut full = nft::Table::new("inet", "malla");
            render(&want, cfg, &mut full);
            match applied {
                Ok(edits) => {
                    prop_assert!(edits.is_some());
                    prop_assert_eq!(&table, &full);
                }
                Err(Recompute) => {
                    // Only when the chain comes or goes, and the model is left as it was.
                    prop_assert_eq!(&table, &before);
                    prop_assert!(kernel_reverse_path || before.chains.contains_key(CHAIN));
                    table = full;
                }
            }
        }
    }
}

/// The links path and the full path agree: a node's table computed in full after local pods
/// (one with an annotation) came and went holds the same anti-spoofing sets as the first full
/// table with the links node's deltas applied, as the driver applies them.
#[test]
fn links_deltas_and_full_render_give_the_same_sets() {
    use crate::links::LinksNode;
    use crate::routes::{compute_with_links, ClusterView};
    let program = crate::policy::compile(&[], &[], &[], "me");
    let mut view = ClusterView {
        endpoints: vec![ep("a", "mla0", &["198.18.0.5", "fd00::5"])],
        ..ClusterView::default()
    };
    view.endpoints[0].node = "me".into();
    let mut links = LinksNode::from_view(&view, "me");
    let mut table = compute_with_links(&view, "me", &program, links.links()).nft_table;
    let guard_sets = |t: &nft::Table| -> Vec<(String, Set)> {
        t.sets
            .iter()
            .filter(|(n, _)| n.starts_with("guard"))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    };
    assert_eq!(guard_sets(&table).len(), 4);
    assert_eq!(table.sets[SET_V4].elements.len(), 1);

    let b = ep("b", "mla1", &["198.18.0.6", "fd00::6"]);
    let pb = pod("b", &["198.18.7.0/24", "fd00:7::/64"]);
    assert!(!links.pod(None, Some(&pb)));
    links.endpoint(None, Some(&b));
    let old_a = view.endpoints[0].clone();
    links.endpoint(Some(&old_a), None);
    view.endpoints = vec![b];
    view.pods = vec![pb];
    let delta = links.take_delta();
    let edits = apply_delta(&mut table, &delta.guard).unwrap().unwrap();
    assert!(
        edits
            .iter()
            .any(|e| e.set == ALLOW_V4 && e.interval && e.add.len() == 1),
        "{edits:?}"
    );
    let full = compute_with_links(&view, "me", &program, links.links()).nft_table;
    assert_eq!(guard_sets(&table), guard_sets(&full));
    assert_eq!(full.sets[ALLOW_V6].elements.len(), 1);
    // From scratch, too.
    let scratch = LinksNode::from_view(&view, "me");
    assert_eq!(scratch.links().guard, links.links().guard);

    view.config.anti_spoofing = false;
    let off = compute_with_links(&view, "me", &program, links.links()).nft_table;
    assert!(guard_sets(&off).is_empty() && !off.chains.contains_key(CHAIN));
}
