//! Workload-to-host policy (issue 14): a pod's traffic to its own node takes the pod's egress
//! policy, then the cluster's endpoint-to-host action (`defaultEndpointToHostAction`, Accept by
//! default, as Felix's `DefaultEndpointToHostAction`), and `malla policy trace` says the same.
//! The node's "kubelet" is a hostNetwork pod listening on 10250 in node-1's namespace (also
//! behind a Service, as an API server would be), its "DNS" another on UDP 53.

mod common;

use common::Lab;
use malla_api::EndpointToHostAction;
use serde_json::Value;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: kubelet, labels: {app: kubelet}}
spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 10250}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: dns}
spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 53, protocol: UDP}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: apiserver}
spec: {selector: {app: kubelet}, ports: [{port: 443, targetPort: 10250}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: b}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: c, labels: {app: c}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

const DENY_EGRESS_A: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress}
spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Egress]}
"#;

/// Who reached node-1's port 10250 over TCP, by source.
fn reach(lab: &Lab) -> std::collections::BTreeMap<String, bool> {
    lab.probe(&[
        "--to",
        "node/node-1",
        "--port",
        "10250",
        "--protocol",
        "tcp",
    ])
    .iter()
    .map(|r| {
        (
            r["from"].as_str().unwrap().to_string(),
            r["connected"] == true,
        )
    })
    .collect()
}

fn trace(lab: &Lab, from: &str) -> Value {
    let out = lab.try_run(&[
        "policy",
        "trace",
        from,
        "node/node-1",
        "--port",
        "10250",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter().next().unwrap()
}

fn endpoint_to_host(lab: &Lab, action: EndpointToHostAction) {
    let paths =
        malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("paths");
    let state = malla_lab::state::LabState::require(&paths).expect("state");
    malla_lab::topology::update_cluster_config(&paths, &state, |c| {
        c.default_endpoint_to_host_action = action
    })
    .expect("agents applied the config");
}

#[test]
fn a_pods_egress_policy_and_the_endpoint_to_host_action_guard_its_node() {
    let lab = Lab::new(&common::malla_bin(), "w2h");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(PODS);

    // No policy: every pod reaches its node's port (and the other node's pod too).
    let r = reach(&lab);
    for from in ["default/a", "default/b", "default/c", "external"] {
        assert_eq!(r.get(from), Some(&true), "{from}: {r:?}");
    }
    assert_eq!(trace(&lab, "default/a")["allowed"], true);
    assert_eq!(trace(&lab, "default/a")["toHost"], "Accept");
    // What a pod needs of its node keeps working: DNS on the node, and an API server on the
    // node's address behind its Service.
    let dns = lab.probe(&[
        "--from",
        "default/b",
        "--to",
        "node/node-1",
        "--port",
        "53",
        "--protocol",
        "udp",
    ]);
    assert!(
        !dns.is_empty() && dns.iter().all(|r| r["connected"] == true),
        "{dns:#?}"
    );
    let api = lab.probe(&["--from", "default/b", "--to", "svc/default/apiserver"]);
    assert!(
        !api.is_empty() && api.iter().all(|r| r["connected"] == true),
        "{api:#?}"
    );

    // An egress deny-all on a: it no longer reaches its own node; the others still do.
    lab.apply(DENY_EGRESS_A);
    let r = reach(&lab);
    assert_eq!(r.get("default/a"), Some(&false), "{r:?}");
    for from in ["default/b", "default/c", "external"] {
        assert_eq!(r.get(from), Some(&true), "{from}: {r:?}");
    }
    let t = trace(&lab, "default/a");
    assert_eq!(t["allowed"], false, "{t}");
    assert_eq!(t["egress"]["verdict"]["verdict"], "denied", "{t}");

    // Drop: no pod reaches its own node, whatever its policy; another node's pod, the other
    // node and outside still do, and the node still reaches its pods.
    endpoint_to_host(&lab, EndpointToHostAction::Drop);
    let r = reach(&lab);
    for from in ["default/a", "default/b"] {
        assert_eq!(r.get(from), Some(&false), "{from}: {r:?}");
    }
    for from in ["default/c", "external"] {
        assert_eq!(r.get(from), Some(&true), "{from}: {r:?}");
    }
    let t = trace(&lab, "default/b");
    assert_eq!(
        (&t["allowed"], &t["toHost"]),
        (&Value::Bool(false), &Value::from("Drop")),
        "{t}"
    );
    let from_node = lab.probe(&["--from", "node/node-1", "--to", "default/b"]);
    assert!(
        from_node.iter().all(|r| r["connected"] == true),
        "{from_node:#?}"
    );

    // Accept again: b reaches its node, a (deny-all) still does not.
    endpoint_to_host(&lab, EndpointToHostAction::Accept);
    let r = reach(&lab);
    assert_eq!(r.get("default/b"), Some(&true), "{r:?}");
    assert_eq!(r.get("default/a"), Some(&false), "{r:?}");
}
