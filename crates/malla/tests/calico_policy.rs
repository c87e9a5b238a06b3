//! Calico's policy model on pods (issue 15 item 2): a `security` tier before the `default` tier
//! where Kubernetes NetworkPolicies live, a global deny with Pass (Calico's documented
//! pattern), a namespaced Calico NetworkPolicy, a GlobalNetworkSet picked by label, and Log —
//! applied unchanged with `malla lab apply` on a real 2-node lab; every cell of the probe matrix
//! is checked against what Calico documents, and `malla policy trace` says the same.

mod common;

use std::collections::BTreeMap;

use common::Lab;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, labels: {app: frontend}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, labels: {app: backend}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: dev, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
"#;

/// Calico's documented tiered setup: the security tier denies what comes from dev namespaces
/// and passes the rest to the default tier, where a Kubernetes NetworkPolicy lets only the
/// frontend into the backend; egress to a blocked network set is denied; a Log rule logs and
/// goes on.
const POLICIES: &str = r#"
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: blocked, labels: {blocked: "true"}}
spec: {nets: [198.19.1.2/32]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.quarantine-dev}
spec:
  tier: security
  order: 10
  selector: all()
  types: [Ingress, Egress]
  ingress:
  - action: Log
    source: {namespaceSelector: env == 'dev'}
  - action: Deny
    source: {namespaceSelector: env == 'dev'}
  - action: Pass
  egress:
  - action: Deny
    destination: {selector: blocked == 'true'}
  - action: Pass
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: backend-from-frontend}
spec:
  podSelector: {matchLabels: {app: backend}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: frontend}}}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: dev-client-closed, namespace: dev}
spec:
  selector: app == 'client'
  types: [Ingress]
  ingress:
  - action: Allow
    protocol: TCP
    source: {selector: app == 'client'}
"#;

/// Whether every probe from `from` to `to` connected.
fn matrix(lab: &Lab) -> BTreeMap<(String, String), bool> {
    let mut out: BTreeMap<(String, String), bool> = BTreeMap::new();
    for r in lab.probe(&["--protocol", "tcp"]) {
        let key = (
            r["from"].as_str().unwrap().to_string(),
            r["to"].as_str().unwrap().to_string(),
        );
        let ok = r["connected"] == true;
        *out.entry(key).or_insert(ok) &= ok;
    }
    out
}

fn cell(m: &BTreeMap<(String, String), bool>, from: &str, to: &str) -> bool {
    *m.get(&(from.to_string(), to.to_string()))
        .unwrap_or_else(|| panic!("no probe {from} -> {to}: {m:#?}"))
}

#[test]
fn calico_tiers_global_deny_with_pass_network_sets_and_namespaced_policy() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "calico");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(PODS);
    let before = matrix(&lab);
    assert!(before.values().all(|ok| *ok), "{before:#?}");

    let out = lab.apply(POLICIES);
    assert!(out.contains("tier/security"), "{out}");
    assert!(
        out.contains("networkpolicy.projectcalico.org/dev/dev-client-closed"),
        "{out}"
    );
    let m = matrix(&lab);
    eprintln!("{} probe pairs: {m:?}", m.len());
    let pods = [
        "default/frontend",
        "default/backend",
        "default/other",
        "dev/client",
    ];
    // What Calico documents, cell by cell.
    let expected = |from: &str, to: &str| -> bool {
        if from == to {
            return true;
        }
        if to == "external" {
            return false; // egress to the blocked network set, from every pod
        }
        if from == "dev/client" && to != "dev/client" {
            return false; // security tier: ingress from dev denied everywhere
        }
        match to {
            "default/backend" => from == "default/frontend", // the NetworkPolicy
            "dev/client" => false,                           // only app=client of dev, itself
            _ => true, // passed to default, where nothing applies
        }
    };
    for from in pods {
        for to in pods.iter().copied().chain(["external"]) {
            if from == to {
                continue;
            }
            assert_eq!(
                cell(&m, from, to),
                expected(from, to),
                "{from} -> {to}: {m:#?}"
            );
            if to != "external" {
                let (allowed, why) = common::trace_allowed(&lab, from, to, 8080);
                assert_eq!(allowed, expected(from, to), "trace {from} -> {to}: {why}");
            }
        }
    }
    // From outside the cluster the security tier passes; the default tier's NetworkPolicy
    // keeps the backend closed.
    assert!(common::trace_allowed(&lab, "198.19.1.2", "default/frontend", 8080).0);
    assert!(!common::trace_allowed(&lab, "198.19.1.2", "default/backend", 8080).0);

    // Everything deleted: open again.
    lab.apply_delete(POLICIES);
    let after = matrix(&lab);
    assert!(after.values().all(|ok| *ok), "{after:#?}");
}
