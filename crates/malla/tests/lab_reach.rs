//! Lab reach (issue 14): a `hostNetwork: true` pod runs in its node's namespace, as the kubelet
//! runs it (no CNI, the node's addresses are the pod's), and `malla lab probe` reaches a node's
//! own ports (`--to node/NAME --port N`) from pods, other nodes and `external` (`--from` narrows
//! to one of them).

mod common;

use common::Lab;
use serde_json::Value;

#[test]
fn host_network_pods_answer_on_their_nodes_address() {
    let lab = Lab::new(&common::malla_bin(), "reach");
    lab.run(&["lab", "up", "--nodes", "2", "--ipv6"]);
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: hostd}
spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 9090}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#,
    );
    let state = lab.state();
    let hostd = &state["pods"]["default/hostd"];
    let node1 = &state["nodes"][0];
    assert_eq!(hostd["netns"], node1["netns"], "{hostd}");
    let ips: Vec<&str> = hostd["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        ips,
        vec![
            node1["underlay_ipv4"].as_str().unwrap(),
            node1["underlay_ipv6"].as_str().unwrap()
        ]
    );
    // No CNI ADD: only the other pod holds an address.
    assert_eq!(lab.used_addresses(), 2, "p's IPv4 and IPv6 alone");

    // The node's port, from a pod, the other node and outside.
    let results = lab.probe(&["--to", "node/node-1", "--port", "9090", "--protocol", "tcp"]);
    let froms: Vec<&str> = results
        .iter()
        .map(|r| r["from"].as_str().unwrap())
        .collect();
    for want in ["default/p", "node/node-2", "external"] {
        assert!(froms.contains(&want), "{froms:?}");
    }
    for r in &results {
        assert_eq!(r["connected"], true, "{r}");
        assert_eq!(r["answeredBy"], "default/hostd", "{r}");
    }
    // The matrix includes the host-network pod as a target by its name too.
    let results = lab.probe(&["--to", "default/hostd"]);
    assert!(
        results.iter().all(|r| r["connected"] == true),
        "{results:#?}"
    );
    // A port nothing listens on: refused, not connected.
    let out = lab.try_run(&[
        "lab",
        "probe",
        "-o",
        "json",
        "--to",
        "node/node-1",
        "--port",
        "9999",
        "--protocol",
        "tcp",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(results.iter().all(|r| r["connected"] == false));

    // Narrowed to one source: outside, or a node.
    for from in ["external", "node/node-2"] {
        let results = lab.probe(&["--from", from, "--to", "node/node-1", "--port", "9090"]);
        assert_eq!(results.len(), 4, "tcp and udp, IPv4 and IPv6: {results:#?}");
        let tcp: Vec<&Value> = results.iter().filter(|r| r["protocol"] == "tcp").collect();
        assert!(tcp.iter().all(|r| r["connected"] == true), "{tcp:#?}");
    }

    // Deleting the host-network pod leaves the node's namespace alone.
    lab.apply_delete(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: hostd}\nspec: {containers: [{name: c}]}\n",
    );
    let results = lab.probe(&["--from", "node/node-2", "--to", "default/p"]);
    assert!(
        results.iter().all(|r| r["connected"] == true),
        "{results:#?}"
    );
    assert!(std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns("node-1"), "true"])
        .status()
        .unwrap()
        .success());
}
