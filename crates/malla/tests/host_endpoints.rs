//! Host endpoints (issue 14 item 3): Calico's `HostEndpoint` and `GlobalNetworkPolicy` guard the
//! nodes' own ports, the failsafe ports stay reachable whatever policy says, and a pre-DNAT
//! policy admits only the allowed client to a NodePort. Real kernel: two lab nodes whose
//! "control plane" listeners are hostNetwork pods (as the kubelet runs them) on 22, 2379,
//! 10250 and an ordinary service port 9000.

mod common;

use std::collections::BTreeMap;

use common::Lab;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: host-1}
spec:
  nodeName: node-1
  hostNetwork: true
  containers: [{name: c, ports: [{containerPort: 22}, {containerPort: 2379}, {containerPort: 10250}, {containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: host-2}
spec:
  nodeName: node-2
  hostNetwork: true
  containers: [{name: c, ports: [{containerPort: 22}, {containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
"#;

/// A host endpoint covering every interface of each node, and a deny-all policy on them.
const DENY_ALL_HOSTS: &str = r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: node-1-all, labels: {role: node}}
spec: {node: node-1, interfaceName: "*"}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: node-2-all, labels: {role: node}}
spec: {node: node-2, interfaceName: "*"}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-all-hosts}
spec:
  selector: role == 'node'
  types: [Ingress, Egress]
"#;

/// Calico's documented NodePort guard: pre-DNAT, only `external` may use the node ports.
const NODEPORT_GUARD: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: nodeports-from-external-only}
spec:
  selector: has(role)
  order: 10
  preDNAT: true
  applyOnForward: true
  ingress:
  - action: Allow
    protocol: TCP
    source: {nets: [198.19.1.2/32]}
    destination: {ports: [30080]}
  - action: Deny
    protocol: TCP
    destination: {ports: ["30000:32767"]}
"#;

/// Who connected to node-1's TCP `port`, by source (pods, the other node, external).
fn reach(lab: &Lab, port: u16) -> BTreeMap<String, bool> {
    let port = port.to_string();
    let rows = lab.probe(&["--to", "node/node-1", "--port", &port, "--protocol", "tcp"]);
    assert!(!rows.is_empty());
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    for r in rows {
        let from = r["from"].as_str().unwrap().to_string();
        let ok = r["connected"] == true;
        // Every probe of a source must agree (both families, retries).
        let e = out.entry(from).or_insert(ok);
        *e &= ok;
    }
    eprintln!("reach {port}: {out:?}");
    out
}

fn expect(r: &BTreeMap<String, bool>, what: &str, want: &[(&str, bool)]) {
    for (from, ok) in want {
        assert_eq!(r.get(*from), Some(ok), "{what}: from {from}: {r:?}");
    }
}

/// `malla policy trace FROM node/node-1 --port PORT`: whether it says allowed (`external` is
/// its address).
fn trace(lab: &Lab, from: &str, port: u16) -> bool {
    let from = if from == "external" {
        "198.19.1.2"
    } else {
        from
    };
    let port = port.to_string();
    let out = lab.try_run(&[
        "policy",
        "trace",
        from,
        "node/node-1",
        "--port",
        &port,
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["allowed"].as_bool().unwrap()
}

/// The probes of node-1's `port` and the trace agree for every source in `r`.
fn trace_agrees(lab: &Lab, r: &BTreeMap<String, bool>, port: u16) {
    for (from, connected) in r {
        if from.starts_with("default/host-") {
            continue; // hostNetwork pods trace as their node's address
        }
        assert_eq!(
            trace(lab, from, port),
            *connected,
            "trace {from} -> node-1:{port}: {r:?}"
        );
    }
}

#[test]
fn host_endpoints_keep_failsafe_ports_and_prednat_guards_a_nodeport() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "hep");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(PODS);

    // No host endpoint: node-1's ports are open to everyone.
    for port in [9000, 10250] {
        expect(
            &reach(&lab, port),
            &format!("before, port {port}"),
            &[
                ("external", true),
                ("node/node-2", true),
                ("default/web", true),
            ],
        );
    }

    // Deny-all on every node's host endpoint.
    let out = lab.apply(DENY_ALL_HOSTS);
    assert!(out.contains("globalnetworkpolicy/deny-all-hosts"), "{out}");
    // An ordinary port is closed to outside, to the other node and to another node's pod.
    expect(
        &reach(&lab, 9000),
        "deny-all, port 9000",
        &[
            ("external", false),
            ("node/node-2", false),
            ("default/web", false),
        ],
    );
    // Failsafe ports stay open: from outside every inbound one; from the other node those
    // its own (denied) egress may still send to, the outbound failsafes (etcd, kubelet).
    for port in [22, 2379, 10250] {
        expect(
            &reach(&lab, port),
            &format!("deny-all, failsafe {port}"),
            &[("external", true), ("default/web", true)],
        );
    }
    for port in [2379, 10250] {
        expect(
            &reach(&lab, port),
            &format!("deny-all, node to node {port}"),
            &[("node/node-2", true)],
        );
    }
    // SSH is an inbound failsafe only: node-2's egress policy stops it at node-2.
    let r = reach(&lab, 22);
    expect(&r, "deny-all, node-2 egress", &[("node/node-2", false)]);
    // The trace says what the dataplane does, on every source.
    trace_agrees(&lab, &r, 22);
    for port in [9000, 10250] {
        trace_agrees(&lab, &reach(&lab, port), port);
    }
    // Pods are not host endpoints: pod to pod across nodes, and a pod to its own node
    // (the endpoint-to-host action's), keep working.
    let pods = lab.probe(&["--from", "default/a", "--to", "default/web"]);
    assert!(
        !pods.is_empty() && pods.iter().all(|r| r["connected"] == true),
        "{pods:#?}"
    );
    expect(
        &reach(&lab, 9000),
        "deny-all, own pod",
        &[("default/a", true)],
    );
    // The node ports still work from outside (forwarded to the pod; normal host endpoint
    // policy does not apply to forwarded traffic without applyOnForward).
    let np = lab.probe(&["--from", "external", "--to", "nodeport/node-1"]);
    assert!(
        !np.is_empty() && np.iter().all(|r| r["connected"] == true),
        "{np:#?}"
    );
    expect(
        &reach(&lab, 30080),
        "deny-all, node port from a pod on node-2",
        &[("default/web", true), ("external", true)],
    );

    // Pre-DNAT: only external may use the node port; a pod on node-2 coming in through
    // node-1's interface is refused before DNAT.
    lab.apply(NODEPORT_GUARD);
    let r = reach(&lab, 30080);
    expect(
        &r,
        "pre-DNAT guard",
        &[("external", true), ("default/web", false)],
    );
    trace_agrees(&lab, &r, 30080);
    let np = lab.probe(&["--from", "external", "--to", "nodeport/node-2"]);
    assert!(
        !np.is_empty() && np.iter().all(|r| r["connected"] == true),
        "{np:#?}"
    );

    // Removing the host endpoints opens the nodes again.
    lab.apply_delete(DENY_ALL_HOSTS);
    expect(
        &reach(&lab, 9000),
        "after delete",
        &[("external", true), ("node/node-2", true)],
    );
    // What the node's table holds for host endpoints went with them.
    let table = common::ip(&[
        "netns",
        "exec",
        &lab.netns("node-1"),
        "nft",
        "list",
        "table",
        "inet",
        "malla",
    ]);
    assert!(!table.contains("hep-input"), "{table}");

    // Automatic host endpoints (opt-in): every node gets one, allowing by its profile until a
    // policy selects it.
    let paths =
        malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("paths");
    let state = malla_lab::state::LabState::require(&paths).expect("state");
    malla_lab::topology::update_cluster_config(&paths, &state, |c| c.auto_host_endpoints = true)
        .expect("agents applied the config");
    expect(&reach(&lab, 9000), "auto, no policy", &[("external", true)]);
    lab.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: auto-ingress}\n\
         spec: {selector: \"malla.dev/host-endpoint == 'auto'\", types: [Ingress]}\n",
    );
    let r = reach(&lab, 9000);
    expect(
        &r,
        "auto, deny ingress",
        &[("external", false), ("node/node-2", false)],
    );
    expect(
        &reach(&lab, 10250),
        "auto, failsafe",
        &[("external", true), ("node/node-2", true)],
    );
    trace_agrees(&lab, &r, 9000);
}
