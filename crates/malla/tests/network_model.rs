//! The network-model conformance test: a 3-node lab, 2 pods per node, in direct and VXLAN mode,
//! IPv4 and dual-stack. Every pod reaches every pod on TCP and UDP without NAT, every node
//! reaches its own pods, and pod→external is masqueraded to the node's address.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;

use common::{two_pods_per_node, Lab};
use serde_json::Value;

fn conformance(routing: &str, ipv6: bool) {
    conformance_on(routing, ipv6, "local");
}

fn conformance_on(routing: &str, ipv6: bool, datastore: &str) {
    let lab = Lab::new(
        &common::malla_bin(),
        &format!(
            "{}{}{}",
            &routing[..1],
            if ipv6 { "6" } else { "4" },
            &datastore[..1]
        ),
    );
    let mut up = vec![
        "lab",
        "up",
        "--nodes",
        "3",
        "--routing",
        routing,
        "--datastore",
        datastore,
    ];
    if ipv6 {
        up.push("--ipv6");
    }
    lab.run(&up);
    lab.apply(&two_pods_per_node(3));
    let state = lab.state();
    let node_ips = common::node_ips(&state);
    let pod_node = common::pod_nodes(&state);
    for p in state["pods"].as_object().unwrap().values() {
        let ips = p["ips"].as_array().unwrap();
        assert_eq!(ips.len(), if ipv6 { 2 } else { 1 }, "pod addresses: {p}");
    }

    // The pod MTU is the underlay's, less the VXLAN header in overlay mode.
    let want_mtu = if routing == "vxlan" {
        "mtu 1450"
    } else {
        "mtu 1500"
    };
    for key in pod_node.keys() {
        let (ns, name) = key.split_once('/').unwrap();
        let link = common::ip(&[
            "-n",
            &lab.netns(&format!("pod-{ns}-{name}")),
            "link",
            "show",
            "eth0",
        ]);
        assert!(link.contains(want_mtu), "{key}: {link}");
    }

    let results = lab.probe(&[]);
    let field = common::field;

    // 6 pods: 30 ordered pairs × (tcp + udp) × families; nodes → own pods; pods → external.
    let families = if ipv6 { 2 } else { 1 };
    let pod_pairs = common::pod_pairs_without_nat(&results, families);
    for r in &pod_pairs {
        let ip: IpAddr = field(r, "clientIp").parse().unwrap();
        let pod_ips: Vec<IpAddr> = state["pods"][field(r, "from")]["ips"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap().parse().unwrap())
            .collect();
        assert!(
            pod_ips.contains(&ip),
            "the client used its own pod address: {r}"
        );
    }
    for proto in ["tcp", "udp"] {
        assert!(pod_pairs.iter().any(|r| field(r, "protocol") == proto));
    }
    // The pods came after the agents synced: each agent followed them with links deltas
    // (routes, peers, local pods changed alone), not by computing its whole node again.
    for node in node_ips.keys() {
        let log = lab.dir().join("logs").join(format!("agent-{node}.log"));
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            log.contains("links updated in place"),
            "{node}'s agent never took the links path:\n{log}"
        );
    }
    let cross_node = pod_pairs
        .iter()
        .filter(|r| pod_node[&field(r, "from")] != pod_node[&field(r, "to")])
        .count();
    assert_eq!(cross_node, 24 * 2 * families, "pairs across nodes");

    let node_probes: Vec<&Value> = results
        .iter()
        .filter(|r| field(r, "from").starts_with("node/"))
        .collect();
    assert_eq!(
        node_probes.len(),
        6 * 2 * families,
        "every node probes its own pods"
    );
    for r in &node_probes {
        assert_eq!(
            format!("node/{}", pod_node[&field(r, "to")]),
            field(r, "from")
        );
    }

    let external: Vec<&Value> = results
        .iter()
        .filter(|r| field(r, "to") == "external")
        .collect();
    assert_eq!(external.len(), 6 * 2 * families);
    for r in &external {
        let node = &pod_node[&field(r, "from")];
        let seen: IpAddr = field(r, "seenSourceIp").parse().unwrap();
        assert!(
            node_ips[node].contains(&seen),
            "external saw {seen}, not node {node}'s address: {r}"
        );
        assert_ne!(r["clientIp"], r["seenSourceIp"], "masqueraded: {r}");
    }
    if datastore == "kubernetes" {
        service_through_the_controllers(&lab);
    }
}

/// On a real control plane the Service's EndpointSlices come from kube-controller-manager:
/// a ClusterIP spreads over every pod it selects, and a deleted pod stops answering.
fn service_through_the_controllers(lab: &common::Lab) {
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: test}\nspec:\n  selector: {app: test}\n  ports:\n  - {port: 80, targetPort: 8080}\n");
    let answered = |count: &str| -> BTreeMap<String, usize> {
        let r = lab.probe(&[
            "--from",
            "default/pod-1a",
            "--to",
            "svc/default/test",
            "--port",
            "80",
            "--count",
            count,
        ]);
        let mut by = BTreeMap::new();
        for x in &r {
            assert_eq!(x["connected"], true, "{x}");
            *by.entry(x["answeredBy"].as_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
        by
    };
    let by = answered("90");
    assert_eq!(by.len(), 6, "every selected pod answers: {by:?}");
    lab.apply_delete(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: pod-3b}\nspec: {nodeName: node-3, containers: [{name: c}]}\n",
    );
    let by = answered("30");
    assert!(
        !by.contains_key("default/pod-3b"),
        "a deleted pod answered: {by:?}"
    );
    assert_eq!(by.values().sum::<usize>(), 30);
}

#[test]
fn direct_ipv4() {
    conformance("direct", false);
}

#[test]
fn vxlan_ipv4() {
    conformance("vxlan", false);
}

#[test]
fn direct_dual_stack() {
    conformance("direct", true);
}

#[test]
fn vxlan_dual_stack() {
    conformance("vxlan", true);
}

/// The same network model with every agent and CNI plugin on a real etcd (run by the lab in its
/// fabric namespace, reached over the underlay).
#[test]
fn direct_ipv4_on_etcd() {
    conformance_on("direct", false, "etcd");
}

#[test]
fn vxlan_dual_stack_on_etcd() {
    conformance_on("vxlan", true, "etcd");
}

/// On a real Kubernetes control plane (kube-apiserver and kube-controller-manager v1.20, run by
/// the lab in its fabric namespace): Malla's records as custom resources, pods, namespaces and
/// Services as native objects, EndpointSlices from the controller.
#[test]
fn direct_ipv4_on_kubernetes() {
    conformance_on("direct", false, "kubernetes");
}

#[test]
fn vxlan_ipv4_on_kubernetes() {
    conformance_on("vxlan", false, "kubernetes");
}
