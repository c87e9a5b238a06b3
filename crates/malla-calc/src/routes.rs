//! Routes to other nodes' pods: one per remote block (its affine node), one /32 or /128 per
//! address a node borrowed from a block it does not own, and the VXLAN peers in overlay mode.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use malla_api::{ClusterConfig, IpPool, Node, RoutingMode, WorkloadEndpoint};

/// Everything the calculation reads, as of one datastore revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub config: ClusterConfig,
    pub nodes: Vec<Node>,
    pub pools: Vec<IpPool>,
    /// Every claimed block with the node it is affine to.
    pub blocks: Vec<(IpNet, Option<String>)>,
    pub endpoints: Vec<WorkloadEndpoint>,
    /// Services as the proxy keeps them.
    pub services: Vec<crate::services::ProxyService>,
    /// EndpointSlices as the proxy keeps them (the first address, conditions and node of each
    /// endpoint).
    pub endpoint_slices: Vec<crate::services::ProxySlice>,
    pub pods: Vec<malla_api::Pod>,
    pub namespaces: Vec<malla_api::Namespace>,
    pub policies: Vec<malla_api::policy::NetworkPolicy>,
    /// Calico's objects (tiers, global policies, host endpoints, network sets).
    pub calico: crate::host::CalicoView,
}

/// A route to pods on another node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRoute {
    pub dst: IpNet,
    /// The remote node's underlay address of the same family.
    pub via: IpAddr,
    pub node: String,
}

/// A remote VXLAN tunnel endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct VxlanPeer {
    pub node: String,
    pub mac: [u8; 6],
    pub underlay_ipv4: Ipv4Addr,
    pub underlay_ipv6: Option<Ipv6Addr>,
}

/// One node's desired state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeDataplane {
    pub mode: RoutingMode,
    pub vxlan_vni: u32,
    pub vxlan_port: u16,
    pub remote_routes: Vec<RemoteRoute>,
    pub vxlan_peers: Vec<VxlanPeer>,
    /// This node's pods, whose host-side routes and neighbours the agent keeps in place.
    pub local_endpoints: Vec<WorkloadEndpoint>,
    /// The node's whole `inet malla` table; apply changes with [`crate::nft::render_diff`].
    pub nft_table: crate::nft::Table,
    /// The services as this node proxies them.
    pub service_map: crate::services::ServiceMap,
    /// Remote objects that could not be routed, with the reason (e.g. a node without an
    /// IPv6 underlay address owning an IPv6 block).
    pub problems: Vec<String>,
}

/// The next hop towards `node`: its underlay address in direct mode; over VXLAN the IPv4
/// underlay address (on-link) or, for IPv6, the link-local address of its VTEP MAC, so IPv6 pods
/// cross an IPv4-only underlay.
pub(crate) fn next_hop(node: &Node, family_v6: bool, vxlan: bool) -> Option<IpAddr> {
    match (family_v6, vxlan) {
        (false, _) => node.underlay_ipv4.map(IpAddr::V4),
        (true, false) => node.underlay_ipv6.map(IpAddr::V6),
        (true, true) => malla_api::parse_mac(&node.vtep_mac)
            .map(|m| IpAddr::V6(malla_api::link_local_from_mac(&m))),
    }
}

/// Pods as policy sees them: the API object (labels, ports) joined with its endpoint record
/// (addresses, host interface), borrowed from `view`. A pod without an endpoint has no address
/// yet: nothing to match.
pub fn policy_pods(view: &ClusterView) -> Vec<crate::policy::PolicyPod<'_>> {
    let mut pods: HashMap<(&str, &str), &malla_api::Pod> = HashMap::with_capacity(view.pods.len());
    pods.extend(
        view.pods
            .iter()
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p)),
    );
    view.endpoints
        .iter()
        .map(|ep| {
            policy_pod(
                ep,
                pods.get(&(ep.namespace.as_str(), ep.pod.as_str())).copied(),
            )
        })
        .collect()
}

/// One pod as policy sees it: its endpoint record joined with its API object, if any (see
/// [`policy_pods`]).
pub fn policy_pod<'a>(
    ep: &'a WorkloadEndpoint,
    pod: Option<&'a malla_api::Pod>,
) -> crate::policy::PolicyPod<'a> {
    use std::borrow::Cow;
    crate::policy::PolicyPod {
        namespace: Cow::Borrowed(&ep.namespace),
        name: Cow::Borrowed(&ep.pod),
        labels: pod.map_or_else(Cow::default, |p| Cow::Borrowed(&p.labels)),
        ips: ep.addrs().collect(),
        node: Cow::Borrowed(&ep.node),
        ports: pod.map_or_else(Cow::default, |p| Cow::Borrowed(&p.ports[..])),
        host_ifname: Cow::Borrowed(&ep.host_ifname),
    }
}

/// Node `me`'s own underlay addresses (its node ports' addresses in the service map).
pub fn node_ips(view: &ClusterView, me: &str) -> Vec<IpAddr> {
    view.nodes
        .iter()
        .find(|n| n.name == me)
        .map(|n| {
            n.underlay_ipv4
                .map(IpAddr::V4)
                .into_iter()
                .chain(n.underlay_ipv6.map(IpAddr::V6))
                .collect()
        })
        .unwrap_or_default()
}

/// Every node's name and underlay addresses.
pub fn node_addresses(view: &ClusterView) -> Vec<(String, Vec<IpAddr>)> {
    view.nodes
        .iter()
        .map(|n| (n.name.clone(), node_ips(view, &n.name)))
        .collect()
}

/// This node's host endpoint policy ([`crate::host`]) into its table.
pub fn render_host(
    view: &ClusterView,
    me: &str,
    ents: Vec<crate::host::Labelled>,
    table: &mut crate::nft::Table,
) {
    let heps = crate::host::local_host_endpoints(&view.calico, me, view.config.auto_host_endpoints);
    if heps.is_empty() {
        return;
    }
    let inputs = crate::host::render::HostInputs {
        heps,
        ents,
        nodes: view
            .nodes
            .iter()
            .filter(|n| n.name != me)
            .flat_map(|n| {
                n.underlay_ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(n.underlay_ipv6.map(IpAddr::V6))
            })
            .collect(),
        config: Some(&view.config),
    };
    crate::host::render_host_endpoints(&view.calico, &inputs, table);
}

/// Computes `me`'s desired state from the whole cluster view.
pub fn compute(view: &ClusterView, me: &str) -> NodeDataplane {
    let program = crate::policy::compile(&view.policies, &view.namespaces, &policy_pods(view), me);
    compute_with_policy(view, me, &program)
}

/// [`compute`] with `me`'s policy program already compiled (the agent's policy node keeps it:
/// [`crate::policy::members::PolicyNode`]).
pub fn compute_with_policy(
    view: &ClusterView,
    me: &str,
    program: &crate::policy::PolicyProgram,
) -> NodeDataplane {
    let links = crate::links::LinksNode::from_view(view, me).links();
    compute_with_links(view, me, program, links)
}

/// [`compute_with_policy`] with the links (routes, peers, local pods) already computed (the
/// agent's [`crate::links::LinksNode`] keeps them).
pub fn compute_with_links(
    view: &ClusterView,
    me: &str,
    program: &crate::policy::PolicyProgram,
    links: crate::links::Links,
) -> NodeDataplane {
    let node_ips = node_ips(view, me);
    let service_map = crate::services::build(
        &view.services,
        &view.endpoint_slices,
        me,
        &node_ips,
        &view.pools,
    );
    let mut nft_table = crate::masquerade::node_table(&view.pools, &service_map);
    crate::policy::render_policy(program, &mut nft_table);
    // What Calico rule selectors pick, once for the pods' tiers and the host endpoints.
    let ents = if view.calico.applies_to_workloads()
        || !view.calico.host_endpoints.is_empty()
        || view.config.auto_host_endpoints
    {
        crate::host::labelled(view)
    } else {
        Vec::new()
    };
    if view.calico.applies_to_workloads() {
        let pods = policy_pods(view);
        let nodes = node_addresses(view);
        let inputs = crate::policy::tiers::TierInputs::of(view, &pods, &ents, &nodes);
        crate::policy::tiers::render_tiers(&inputs, program, me, &mut nft_table);
        let dns_sets = crate::policy::dns::dns_sets(&inputs, me);
        let my_ip = view
            .nodes
            .iter()
            .find(|n| n.name == me)
            .and_then(|n| n.underlay_ipv4);
        crate::policy::dns::render_proxy(&dns_sets, my_ip, &mut nft_table);
    }
    crate::policy::render_endpoint_to_host(
        view.config.default_endpoint_to_host_action,
        &mut nft_table,
    );
    let guard = crate::guard::GuardConfig {
        on: view.config.anti_spoofing,
        kernel_reverse_path: links.kernel_reverse_path,
        ipv6: view.pools.iter().any(|p| p.cidr.addr().is_ipv6()),
    };
    crate::guard::render(&links.guard, guard, &mut nft_table);
    render_host(view, me, ents, &mut nft_table);

    NodeDataplane {
        mode: view.config.routing,
        vxlan_vni: view.config.vxlan_vni,
        vxlan_port: view.config.vxlan_port,
        remote_routes: links.remote_routes,
        vxlan_peers: links.vxlan_peers,
        local_endpoints: links.local_endpoints,
        nft_table,
        service_map,
        problems: links.problems,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::{ep, node};

    fn view() -> ClusterView {
        ClusterView {
            config: ClusterConfig::default(),
            nodes: vec![
                node("a", "198.19.0.11", Some("fd00:198:19::11")),
                node("b", "198.19.0.12", Some("fd00:198:19::12")),
                node("c", "198.19.0.13", None),
            ],
            pools: vec![],
            blocks: vec![
                ("198.18.0.0/26".parse().unwrap(), Some("a".into())),
                ("198.18.0.64/26".parse().unwrap(), Some("b".into())),
                ("198.18.0.128/26".parse().unwrap(), Some("c".into())),
                ("fd00:198:18::/122".parse().unwrap(), Some("b".into())),
                ("fd00:198:18::40/122".parse().unwrap(), Some("c".into())),
                ("198.18.0.192/26".parse().unwrap(), None),
            ],
            endpoints: vec![
                ep("a", "198.18.0.1"),
                ep("b", "198.18.0.65"),
                ep("c", "198.18.0.2"),
            ],
            services: vec![],
            endpoint_slices: vec![],
            ..Default::default()
        }
    }

    #[test]
    fn one_route_per_remote_block_via_owner_underlay() {
        let d = compute(&view(), "a");
        let dsts: Vec<String> = d
            .remote_routes
            .iter()
            .map(|r| format!("{}>{}", r.dst, r.via))
            .collect();
        assert!(dsts.contains(&"198.18.0.64/26>198.19.0.12".to_string()));
        assert!(dsts.contains(&"198.18.0.128/26>198.19.0.13".to_string()));
        assert!(dsts.contains(&"fd00:198:18::/122>fd00:198:19::12".to_string()));
        assert!(
            !dsts.iter().any(|d| d.starts_with("198.18.0.0/26")),
            "own block is local"
        );
        assert!(
            !dsts.iter().any(|d| d.starts_with("198.18.0.192/26")),
            "unclaimed block"
        );
    }

    #[test]
    fn borrowed_address_gets_a_host_route_to_its_node() {
        // c uses 198.18.0.2 from a's block: b must route that /32 to c, a must too.
        let b = compute(&view(), "b");
        assert!(b
            .remote_routes
            .iter()
            .any(|r| r.dst.to_string() == "198.18.0.2/32" && r.node == "c"));
        let a = compute(&view(), "a");
        assert!(a
            .remote_routes
            .iter()
            .any(|r| r.dst.to_string() == "198.18.0.2/32"));
        let c = compute(&view(), "c");
        assert!(!c
            .remote_routes
            .iter()
            .any(|r| r.dst.to_string() == "198.18.0.2/32"));
    }

    #[test]
    fn missing_v6_underlay_is_reported_not_routed() {
        let d = compute(&view(), "a");
        assert!(!d
            .remote_routes
            .iter()
            .any(|r| r.dst.to_string() == "fd00:198:18::40/122"));
        assert!(d.problems.iter().any(|p| p.contains("fd00:198:18::40/122")));
    }

    #[test]
    fn vxlan_routes_ipv6_via_the_peers_link_local() {
        let mut v = view();
        v.config.routing = RoutingMode::Vxlan;
        let d = compute(&v, "a");
        let r = d
            .remote_routes
            .iter()
            .find(|r| r.dst.to_string() == "fd00:198:18::40/122")
            .expect("routed over vxlan even without a v6 underlay");
        let mac = malla_api::mac_from_name("c");
        assert_eq!(r.via, IpAddr::V6(malla_api::link_local_from_mac(&mac)));
        assert!(d.problems.is_empty(), "{:?}", d.problems);
    }

    #[test]
    fn vxlan_peers_only_in_vxlan_mode() {
        let mut v = view();
        assert!(compute(&v, "a").vxlan_peers.is_empty());
        v.config.routing = RoutingMode::Vxlan;
        let d = compute(&v, "a");
        let names: Vec<&str> = d.vxlan_peers.iter().map(|p| p.node.as_str()).collect();
        assert_eq!(names, vec!["b", "c"]);
        assert_eq!(d.vxlan_peers[0].mac, malla_api::mac_from_name("b"));
    }

    #[test]
    fn local_endpoints_are_this_nodes() {
        let d = compute(&view(), "b");
        assert_eq!(d.local_endpoints.len(), 1);
        assert_eq!(d.local_endpoints[0].node, "b");
    }
}
