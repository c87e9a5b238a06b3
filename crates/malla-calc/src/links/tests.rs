//! The links node against its reference: the plain loop over the whole view it replaced,
//! after every random sequence of node, block and endpoint changes; and its delta against the
//! difference of two references.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::{ClusterConfig, Node, RoutingMode, WorkloadEndpoint};
use proptest::prelude::*;

use super::{Links, LinksNode};
use crate::routes::{next_hop, ClusterView, RemoteRoute, VxlanPeer};

/// The links as the calculation computed them before the links node: one pass over the view.
fn reference(view: &ClusterView, me: &str) -> Links {
    let nodes: BTreeMap<&str, &Node> = view.nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut routes = BTreeSet::new();
    let mut problems = BTreeSet::new();
    let vxlan = view.config.routing == RoutingMode::Vxlan;
    let mut route_to = |dst: IpNet, owner: &str, problems: &mut BTreeSet<String>| {
        let Some(node) = nodes.get(owner) else {
            problems.insert(format!("{dst}: owner node {owner} is not registered"));
            return;
        };
        match next_hop(node, dst.addr().is_ipv6(), vxlan) {
            Some(via) => {
                routes.insert(RemoteRoute {
                    dst,
                    via,
                    node: owner.to_string(),
                });
            }
            None => {
                problems.insert(format!(
                    "{dst}: node {owner} has no underlay address of that family"
                ));
            }
        }
    };
    for (cidr, affinity) in &view.blocks {
        if let Some(owner) = affinity.as_deref().filter(|o| *o != me) {
            route_to(*cidr, owner, &mut problems);
        }
    }
    let mut affine: HashMap<&str, Vec<&IpNet>> = HashMap::new();
    for (cidr, owner) in &view.blocks {
        if let Some(owner) = owner.as_deref() {
            affine.entry(owner).or_default().push(cidr);
        }
    }
    for ep in view.endpoints.iter().filter(|e| e.node != me) {
        for ip in ep.addrs() {
            let in_own_block = affine
                .get(ep.node.as_str())
                .is_some_and(|cidrs| cidrs.iter().any(|c| c.contains(&ip)));
            if !in_own_block {
                route_to(IpNet::from(ip), &ep.node, &mut problems);
            }
        }
    }
    let vxlan_peers = if vxlan {
        view.nodes
            .iter()
            .filter(|n| n.name != me)
            .filter_map(|n| {
                Some(VxlanPeer {
                    node: n.name.clone(),
                    mac: malla_api::parse_mac(&n.vtep_mac)?,
                    underlay_ipv4: n.underlay_ipv4?,
                    underlay_ipv6: n.underlay_ipv6,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut local_endpoints: Vec<WorkloadEndpoint> = view
        .endpoints
        .iter()
        .filter(|e| e.node == me)
        .cloned()
        .collect();
    local_endpoints.sort_by(|a, b| a.host_ifname.cmp(&b.host_ifname));
    let guard = local_endpoints
        .iter()
        .flat_map(|e| crate::guard::interface_entries(&e.host_ifname, [(e, &[][..])]))
        .collect();
    Links {
        remote_routes: routes.into_iter().collect(),
        vxlan_peers,
        local_endpoints,
        problems: problems.into_iter().collect(),
        guard,
        kernel_reverse_path: false,
    }
}

fn node(name: &str, v4: Option<&str>, v6: Option<&str>) -> Node {
    Node {
        name: name.into(),
        underlay_ipv4: v4.map(|s| s.parse().unwrap()),
        underlay_ipv6: v6.map(|s| s.parse().unwrap()),
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(name)),
    }
}

fn ep(slot: usize, node: &str, ips: &[IpAddr]) -> WorkloadEndpoint {
    WorkloadEndpoint {
        namespace: "default".into(),
        pod: format!("p{slot}"),
        node: node.into(),
        container_id: format!("c{slot}"),
        ifname: "eth0".into(),
        host_ifname: format!("mla{slot}"),
        ips: ips.iter().map(|ip| IpNet::from(*ip)).collect(),
        mac: "02:00:00:00:00:01".into(),
        ipam_handle: format!("h{slot}"),
    }
}

const NODES: [&str; 4] = ["a", "b", "c", "d"];
const BLOCKS: [&str; 6] = [
    "198.18.0.0/26",
    "198.18.0.64/26",
    "198.18.0.128/26",
    "198.18.0.192/26",
    "fd00:198:18::/122",
    "fd00:198:18::40/122",
];
const ADDRS: [&str; 7] = [
    "198.18.0.1",
    "198.18.0.65",
    "198.18.0.130",
    "198.18.1.7",
    "fd00:198:18::1",
    "fd00:198:18::41",
    "fd00:198:19::9",
];

/// One change: to a node record, a block's affinity or an endpoint slot.
#[derive(Debug, Clone)]
enum Change {
    /// Node `i`: absent, or present with/without each underlay family.
    Node(usize, Option<(bool, bool)>),
    /// Block `i`: absent, or affine to node `j` (4: a node that never registers), or unclaimed.
    Block(usize, Option<Option<usize>>),
    /// Endpoint slot `i`: absent, or on node `j` with some addresses.
    Endpoint(usize, Option<(usize, Vec<usize>)>),
    /// Take the delta now.
    Take,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (
            0..4usize,
            proptest::option::of((any::<bool>(), any::<bool>()))
        )
            .prop_map(|(i, n)| Change::Node(i, n)),
        (
            0..6usize,
            proptest::option::of(proptest::option::of(0..5usize))
        )
            .prop_map(|(i, b)| Change::Block(i, b)),
        (
            0..8usize,
            proptest::option::of((0..5usize, proptest::collection::vec(0..7usize, 0..3)))
        )
            .prop_map(|(i, e)| Change::Endpoint(i, e)),
        Just(Change::Take),
    ]
}

fn owner_name(j: usize) -> String {
    NODES.get(j).map_or("gone".to_string(), |n| n.to_string())
}

/// The test's own copy of the cluster, keyed by slot.
#[derive(Default)]
struct Cluster {
    nodes: BTreeMap<usize, Node>,
    blocks: BTreeMap<usize, (IpNet, Option<String>)>,
    endpoints: BTreeMap<usize, WorkloadEndpoint>,
}

impl Cluster {
    fn view(&self, mode: RoutingMode) -> ClusterView {
        ClusterView {
            config: ClusterConfig {
                routing: mode,
                ..ClusterConfig::default()
            },
            nodes: self.nodes.values().cloned().collect(),
            blocks: self.blocks.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            ..ClusterView::default()
        }
    }

    /// Applies `c` here and to `links`.
    fn apply(&mut self, c: &Change, links: &mut LinksNode) {
        match c {
            Change::Node(i, n) => {
                let after = n.map(|(v4, v6)| {
                    let o = 11 + *i;
                    node(
                        NODES[*i],
                        v4.then(|| format!("198.19.0.{o}")).as_deref(),
                        v6.then(|| format!("fd00:198:19::{o}")).as_deref(),
                    )
                });
                let before = self.nodes.remove(i);
                links.node(before.as_ref(), after.as_ref());
                if let Some(a) = after {
                    self.nodes.insert(*i, a);
                }
            }
            Change::Block(i, b) => {
                let after = b.map(|owner| (BLOCKS[*i].parse().unwrap(), owner.map(owner_name)));
                let before = self.blocks.remove(i);
                links.block(before.as_ref(), after.as_ref());
                if let Some(a) = after {
                    self.blocks.insert(*i, a);
                }
            }
            Change::Endpoint(i, e) => {
                let after = e.as_ref().map(|(n, ips)| {
                    let ips: BTreeSet<IpAddr> =
                        ips.iter().map(|k| ADDRS[*k].parse().unwrap()).collect();
                    ep(*i, &owner_name(*n), &ips.into_iter().collect::<Vec<_>>())
                });
                let before = self.endpoints.remove(i);
                links.endpoint(before.as_ref(), after.as_ref());
                if let Some(a) = after {
                    self.endpoints.insert(*i, a);
                }
            }
            Change::Take => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// After any changes, the node's links equal the reference's over the same view, and the
    /// deltas it handed over, applied to the first links, give the same.
    #[test]
    fn the_links_node_follows_changes_like_the_reference(
        vxlan in any::<bool>(),
        start in proptest::collection::vec(change(), 0..12),
        changes in proptest::collection::vec(change(), 1..40),
    ) {
        let mode = if vxlan { RoutingMode::Vxlan } else { RoutingMode::Direct };
        let me = "a";
        let mut cluster = Cluster::default();
        let mut scratch = LinksNode::new(me, mode);
        for c in &start {
            cluster.apply(c, &mut scratch);
        }
        let mut links = LinksNode::from_view(&cluster.view(mode), me);
        prop_assert_eq!(links.links(), reference(&cluster.view(mode), me));
        let mut applied = links.links();
        for c in &changes {
            cluster.apply(c, &mut links);
            if matches!(c, Change::Take) {
                let delta = links.take_delta();
                delta.apply_to(&mut applied);
                let want = reference(&cluster.view(mode), me);
                // Problems are reported, not applied.
                applied.problems = want.problems.clone();
                prop_assert_eq!(&applied, &want);
            }
        }
        let delta = links.take_delta();
        delta.apply_to(&mut applied);
        let want = reference(&cluster.view(mode), me);
        applied.problems = want.problems.clone();
        prop_assert_eq!(&links.links(), &want);
        prop_assert_eq!(&applied, &want);
        // Each object at most once in a delta, and never both added and removed.
        let again = links.take_delta();
        prop_assert!(again.is_empty(), "{again:?}");
    }
}

#[test]
fn a_pod_on_another_node_touches_only_that_nodes_routes() {
    let me = "a";
    let view = ClusterView {
        nodes: vec![
            node("a", Some("198.19.0.11"), None),
            node("b", Some("198.19.0.12"), None),
        ],
        blocks: vec![
            ("198.18.0.0/26".parse().unwrap(), Some("a".into())),
            ("198.18.0.64/26".parse().unwrap(), Some("b".into())),
        ],
        ..ClusterView::default()
    };
    let mut links = LinksNode::from_view(&view, me);
    // A pod in b's own block: no route of its own.
    let inside = ep(1, "b", &["198.18.0.70".parse().unwrap()]);
    links.endpoint(None, Some(&inside));
    assert!(links.take_delta().is_empty());
    // A pod of b's with an address of a's block: one host route to b, and its removal.
    let borrowed = ep(2, "b", &["198.18.0.5".parse().unwrap()]);
    links.endpoint(None, Some(&borrowed));
    let d = links.take_delta();
    assert_eq!(d.routes_added.len(), 1);
    assert_eq!(d.routes_added[0].dst.to_string(), "198.18.0.5/32");
    assert_eq!(d.routes_added[0].node, "b");
    links.endpoint(Some(&borrowed), None);
    let d = links.take_delta();
    assert_eq!(d.routes_removed.len(), 1);
    assert!(d.routes_added.is_empty());
    // A local pod: only the local endpoints move.
    let local = ep(3, "a", &["198.18.0.6".parse().unwrap()]);
    links.endpoint(None, Some(&local));
    let d = links.take_delta();
    assert_eq!(d.local_added, vec![local.clone()]);
    assert!(d.routes_added.is_empty() && d.routes_removed.is_empty());
    // Added and removed within one batch: nothing.
    let other = ep(4, "a", &["198.18.0.7".parse().unwrap()]);
    links.endpoint(None, Some(&other));
    links.endpoint(Some(&other), None);
    assert!(links.take_delta().is_empty());
}

#[test]
fn bgp_mode_makes_no_routes_and_announces_blocks_and_borrowed_addresses() {
    use crate::testutil::{ep, node};
    let view = ClusterView {
        config: ClusterConfig {
            routing: RoutingMode::Bgp,
            ..ClusterConfig::default()
        },
        nodes: vec![
            node("a", "198.19.0.11", None),
            node("b", "198.19.0.12", None),
        ],
        blocks: vec![
            ("198.18.0.0/26".parse().unwrap(), Some("a".into())),
            ("198.18.0.64/26".parse().unwrap(), Some("b".into())),
        ],
        endpoints: vec![
            ep("a", "198.18.0.1"),
            ep("b", "198.18.0.65"),
            ep("b", "198.18.0.2"),
        ],
        ..ClusterView::default()
    };
    let mut n = LinksNode::from_view(&view, "a");
    assert!(
        n.links().remote_routes.is_empty(),
        "BIRD routes in bgp mode"
    );
    assert_eq!(n.links().local_endpoints.len(), 1);
    assert!(n.follows(RoutingMode::Bgp) && !n.follows(RoutingMode::Direct));
    let (blocks, borrowed) = n.announced("b");
    assert_eq!(blocks, vec!["198.18.0.64/26".parse::<IpNet>().unwrap()]);
    assert_eq!(borrowed, vec!["198.18.0.2/32".parse::<IpNet>().unwrap()]);
    // The borrowed address goes away with its pod.
    n.endpoint(Some(&ep("b", "198.18.0.2")), None);
    assert!(n.take_delta().routes_added.is_empty());
    assert!(n.announced("b").1.is_empty());
}
