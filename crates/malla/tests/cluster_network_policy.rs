//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, issue 15 item 1) on a real 2-node
//! lab: cases from the areas the upstream conformance suite covers — the Admin tier, the
//! Baseline tier, priority order, Pass into NetworkPolicy and on to Baseline, port numbers,
//! ranges and named ports, networks peers, and an update that reorders rules. Each case checks
//! the full probe matrix (every pod to every pod on every declared port, and to `external`)
//! against what the API defines, and `malla policy trace` against every pod-to-pod cell.

mod common;

use std::collections::BTreeMap;

use common::Lab;

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {env: dev}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: prod, labels: {app: web}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {app: db}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: dev, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, labels: {app: admin}}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
"#;

const PODS: [&str; 4] = ["prod/web", "prod/db", "dev/client", "default/admin"];

fn ns(p: &str) -> &str {
    p.split('/').next().unwrap()
}

type Matrix = BTreeMap<(String, String, u16), bool>;

/// Every probe from a pod, by (from, to, port); a cell is true when every probe connected.
fn matrix(lab: &Lab) -> Matrix {
    let mut out = Matrix::new();
    for r in lab.probe(&["--protocol", "tcp"]) {
        let from = r["from"].as_str().unwrap().to_string();
        if !PODS.contains(&from.as_str()) {
            continue;
        }
        let key = (
            from,
            r["to"].as_str().unwrap().to_string(),
            r["port"].as_u64().unwrap() as u16,
        );
        let ok = r["connected"] == true;
        *out.entry(key).or_insert(ok) &= ok;
    }
    out
}

fn trace(lab: &Lab, from: &str, to: &str, port: u16) -> (bool, String) {
    let port = port.to_string();
    let out = lab.try_run(&["policy", "trace", from, to, "--port", &port, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    (v[0]["allowed"].as_bool().unwrap(), v[0].to_string())
}

/// Applies `yaml`, checks every cell against `expect` (and the trace on pod-to-pod cells),
/// then deletes it when `delete`.
fn case(lab: &Lab, name: &str, yaml: &str, expect: &dyn Fn(&str, &str, u16) -> bool, delete: bool) {
    lab.apply(yaml);
    let m = matrix(lab);
    assert!(m.len() >= 24, "{name}: {m:?}");
    for ((from, to, port), ok) in &m {
        assert_eq!(
            *ok,
            expect(from, to, *port),
            "{name}: {from} -> {to}:{port}\n{m:#?}"
        );
        if to != "external" {
            let (allowed, why) = trace(lab, from, to, *port);
            assert_eq!(allowed, *ok, "{name}: trace {from} -> {to}:{port}: {why}");
        }
    }
    if delete {
        lab.apply_delete(yaml);
    }
}

#[test]
fn cluster_network_policy_tiers_priorities_pass_ports_and_updates() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "cnp");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(WORLD);
    let open = matrix(&lab);
    assert!(open.values().all(|ok| *ok), "{open:#?}");

    // 1. Admin Deny: dev may not reach prod.
    case(
        &lab,
        "admin deny",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: isolate-prod-from-dev}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - {action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}
"#,
        &|from, to, _| !(ns(from) == "dev" && ns(to) == "prod"),
        true,
    );

    // 2. Admin Accept wins over a NetworkPolicy's isolation.
    case(
        &lab,
        "admin accept over networkpolicy",
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-closed, namespace: prod}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: admin-to-db}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {app: db}}}}
  ingress:
  - action: Accept
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: admin}}}}]
"#,
        &|from, to, _| to != "prod/db" || from == "default/admin",
        true,
    );

    // 3. Pass into the NetworkPolicy tier, then a lower-precedence Deny.
    case(
        &lab,
        "admin pass then deny",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: prod-passes-prod}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - {action: Pass, from: [{namespaces: {matchLabels: {env: prod}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: prod-closed}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}]}
"#,
        &|from, to, _| ns(to) != "prod" || ns(from) == "prod",
        true,
    );

    // 4. Baseline deny-all, overridden by a NetworkPolicy where one selects the pod.
    case(
        &lab,
        "baseline under networkpolicy",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline-closed}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  ingress:
  - {action: Deny, from: [{namespaces: {}}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
"#,
        &|from, to, _| to == "external" || (to == "prod/db" && from == "prod/web"),
        true,
    );

    // 5. Priority order: the lower number decides first.
    case(
        &lab,
        "priority order",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-dev}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - {action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: client-to-web}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}
  ingress:
  - action: Accept
    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]
"#,
        &|from, to, _| !(from == "dev/client" && to == "prod/db"),
        true,
    );

    // 6. Port numbers and ranges: only 9090 is covered (the range stops short of 8080).
    case(
        &lab,
        "ports and ranges",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: prod-metrics-closed}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - action: Deny
    from: [{namespaces: {}}]
    protocols:
    - tcp: {destinationPort: {number: 9090}}
    - tcp: {destinationPort: {range: {start: 8000, end: 8079}}}
"#,
        &|_, to, port| !(ns(to) == "prod" && port == 9090),
        true,
    );

    // 7. A named port on egress: each destination's own `metrics` port.
    case(
        &lab,
        "named port",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: dev-no-metrics}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {env: dev}}}
  egress:
  - action: Deny
    to: [{namespaces: {}}]
    protocols: [{destinationNamedPort: metrics}]
"#,
        &|from, to, port| !(from == "dev/client" && to != "external" && port == 9090),
        true,
    );

    // 8. A networks peer: prod may not reach outside.
    case(
        &lab,
        "networks",
        r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: prod-stays-in}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {env: prod}}}
  egress:
  - {action: Deny, to: [{networks: [198.19.1.0/24]}]}
"#,
        &|from, to, _| !(ns(from) == "prod" && to == "external"),
        true,
    );

    // 9. An update that reorders rules: Accept before Deny, then Deny before Accept.
    let accept_first = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: reorder}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
  - {action: Accept, from: [{namespaces: {matchLabels: {env: dev}}}]}
  - {action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}
"#;
    case(&lab, "accept first", accept_first, &|_, _, _| true, false);
    let deny_first = accept_first.replace(
        "  - {action: Accept, from: [{namespaces: {matchLabels: {env: dev}}}]}\n  - {action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}",
        "  - {action: Deny, from: [{namespaces: {matchLabels: {env: dev}}}]}\n  - {action: Accept, from: [{namespaces: {matchLabels: {env: dev}}}]}",
    );
    assert_ne!(deny_first, accept_first);
    case(
        &lab,
        "deny first (updated)",
        &deny_first,
        &|from, to, _| !(ns(from) == "dev" && ns(to) == "prod"),
        true,
    );

    // Malformed: refused, the field named, nothing applied.
    let bad = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: bad}
spec:
  tier: Admin
  priority: 1001
  subject: {namespaces: {}}
"#;
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.yaml");
    std::fs::write(&f, bad).unwrap();
    let out = lab.try_run(&["lab", "apply", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.priority"), "{err}");
    let after = matrix(&lab);
    assert!(after.values().all(|ok| *ok), "{after:#?}");
}
