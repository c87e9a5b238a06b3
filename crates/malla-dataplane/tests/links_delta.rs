//! The Linux driver applying a links delta in a namespace of its own (real kernel): after a
//! full apply, node, block and endpoint changes followed by the calculation's links node reach
//! the kernel as routes, neighbours and FDB entries added and removed, nothing else is touched,
//! and a resync afterwards finds nothing to repair (what the driver recorded is what it did).
//! Needs root; skipped otherwise.

use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::{ClusterConfig, Node, RoutingMode, WorkloadEndpoint};
use malla_calc::links::LinksNode;
use malla_calc::ClusterView;
use malla_dataplane::driver::{Driver, Update};
use malla_dataplane::linux::{LinuxDriver, VXLAN_DEVICE};
use malla_dataplane::netlink::Netlink;
use malla_dataplane::MALLA_ROUTE_PROTOCOL;

mod common;

fn node(name: &str, last: u8) -> Node {
    Node {
        name: name.into(),
        underlay_ipv4: Some(format!("198.19.0.{last}").parse().unwrap()),
        underlay_ipv6: Some(format!("fd00:198:19::{last}").parse().unwrap()),
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(name)),
    }
}

fn block(cidr: &str, owner: &str) -> (IpNet, Option<String>) {
    (cidr.parse().unwrap(), Some(owner.into()))
}

fn endpoint(node: &str, ip: &str) -> WorkloadEndpoint {
    WorkloadEndpoint {
        namespace: "default".into(),
        pod: format!("p-{ip}"),
        node: node.into(),
        container_id: ip.into(),
        ifname: "eth0".into(),
        host_ifname: format!("mla{}", ip.len()),
        ips: vec![IpNet::from(ip.parse::<IpAddr>().unwrap())],
        mac: "02:00:00:00:00:01".into(),
        ipam_handle: ip.into(),
    }
}

/// The kernel's Malla routes as `dst via gateway`, sorted.
async fn kernel_routes(nl: &Netlink) -> Vec<String> {
    let mut r: Vec<String> = nl
        .routes_with_protocol(MALLA_ROUTE_PROTOCOL)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            format!(
                "{} via {}",
                r.dst,
                r.gateway.map_or("-".into(), |g| g.to_string())
            )
        })
        .collect();
    r.sort();
    r
}

fn want_routes(links: &LinksNode) -> Vec<String> {
    let mut r: Vec<String> = links
        .links()
        .remote_routes
        .iter()
        .map(|r| format!("{} via {}", r.dst, r.via))
        .collect();
    r.sort();
    r
}

/// The VXLAN device's static neighbours (`ip mac`) and FDB entries (`mac dst`), sorted.
async fn kernel_peers(nl: &Netlink) -> (Vec<String>, Vec<String>) {
    let dev = nl.link_by_name(VXLAN_DEVICE).await.unwrap().unwrap();
    let mac = |m: &[u8; 6]| malla_api::format_mac(m);
    let mut neigh: Vec<String> = nl
        .permanent_neighbours(dev.index)
        .await
        .unwrap()
        .iter()
        .map(|n| format!("{} {}", n.ip, mac(&n.mac)))
        .collect();
    neigh.sort();
    let mut fdb: Vec<String> = nl
        .fdb_entries(dev.index)
        .await
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", mac(&e.mac), e.dst))
        .collect();
    fdb.sort();
    (neigh, fdb)
}

fn want_peers(links: &LinksNode) -> (Vec<String>, Vec<String>) {
    let mut neigh = Vec::new();
    let mut fdb = Vec::new();
    for p in links.links().vxlan_peers {
        let mac = malla_api::format_mac(&p.mac);
        neigh.push(format!("{} {mac}", p.underlay_ipv4));
        neigh.push(format!("{} {mac}", malla_api::link_local_from_mac(&p.mac)));
        fdb.push(format!("{mac} {}", p.underlay_ipv4));
    }
    neigh.sort();
    fdb.sort();
    (neigh, fdb)
}

async fn run(mode: RoutingMode) {
    let mut view = ClusterView {
        config: ClusterConfig {
            routing: mode,
            ..ClusterConfig::default()
        },
        nodes: vec![node("a", 11), node("b", 12), node("c", 13)],
        blocks: vec![
            block("198.18.0.0/26", "a"),
            block("198.18.0.64/26", "b"),
            block("198.18.0.128/26", "c"),
            block("fd00:198:18::/122", "b"),
        ],
        ..ClusterView::default()
    };
    let mut driver = LinuxDriver::connect("a", "ul0").unwrap();
    driver.start().await.unwrap();
    let full = malla_calc::compute(&view, "a");
    driver.apply(Update::Full(Box::new(full))).await.unwrap();
    let nl = Netlink::connect().unwrap();
    let mut links = LinksNode::from_view(&view, "a");
    assert_eq!(kernel_routes(&nl).await, want_routes(&links));
    assert_eq!(kernel_routes(&nl).await.len(), 3);
    if mode == RoutingMode::Vxlan {
        assert_eq!(kernel_peers(&nl).await, want_peers(&links));
        // Nothing changed: a resync repairs nothing (the FDB is read back as it was written).
        let stats = driver.resync().await.unwrap();
        assert!(
            !stats.changed(),
            "a resync right after the apply repaired {stats:?}"
        );
    }

    // Node c leaves with its block, d joins with one, b's pod borrows an address of a's block,
    // and b moves to another underlay address.
    let c = view.nodes.remove(2);
    links.node(Some(&c), None);
    let cb = view.blocks.remove(2);
    links.block(Some(&cb), None);
    let d = node("d", 14);
    links.node(None, Some(&d));
    view.nodes.push(d);
    let db = block("198.18.0.192/26", "d");
    links.block(None, Some(&db));
    view.blocks.push(db);
    let ep = endpoint("b", "198.18.0.9");
    links.endpoint(None, Some(&ep));
    view.endpoints.push(ep);
    let b_moved = node("b", 22);
    links.node(Some(&view.nodes[1]), Some(&b_moved));
    view.nodes[1] = b_moved;

    let delta = links.take_delta();
    assert!(!delta.is_empty());
    let stats = driver.apply(Update::Links(delta)).await.unwrap();
    assert!(
        stats.routes_added > 0 && stats.routes_removed > 0,
        "{stats:?}"
    );
    assert_eq!(kernel_routes(&nl).await, want_routes(&links));
    assert!(kernel_routes(&nl)
        .await
        .contains(&"198.18.0.9/32 via 198.19.0.22".to_string()));
    if mode == RoutingMode::Vxlan {
        assert_eq!(kernel_peers(&nl).await, want_peers(&links));
    }
    // What the driver recorded is what the kernel has: a resync repairs nothing, and the same
    // state computed whole is what it recorded.
    let stats = driver.resync().await.unwrap();
    assert!(
        !stats.changed(),
        "resync after a links delta repaired {stats:?}"
    );
    assert_eq!(
        want_routes(&LinksNode::from_view(&view, "a")),
        want_routes(&links)
    );

    // Undone: the borrowed address returns, d leaves.
    let ep = view.endpoints.pop().unwrap();
    links.endpoint(Some(&ep), None);
    let d = view.nodes.pop().unwrap();
    links.node(Some(&d), None);
    driver
        .apply(Update::Links(links.take_delta()))
        .await
        .unwrap();
    assert_eq!(kernel_routes(&nl).await, want_routes(&links));
    if mode == RoutingMode::Vxlan {
        assert_eq!(kernel_peers(&nl).await, want_peers(&links));
    }
    let stats = driver.resync().await.unwrap();
    assert!(!stats.changed(), "{stats:?}");
}

fn in_namespace(mode: RoutingMode) {
    if !common::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let name = format!("mlt-links-{}-{mode:?}", std::process::id()).to_lowercase();
    common::in_namespace(&name, true, move || run(mode));
}

#[test]
fn a_links_delta_changes_direct_routes_alone() {
    in_namespace(RoutingMode::Direct);
}

#[test]
fn a_links_delta_changes_vxlan_routes_and_peers_alone() {
    in_namespace(RoutingMode::Vxlan);
}
