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

/// A hostNetwork pod on node-2 (its node's address): what `nodes` peers reach.
const HOST_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: host}
spec: {nodeName: node-2, hostNetwork: true, containers: [{name: c, ports: [{containerPort: 8080, name: http}, {containerPort: 9090, name: metrics}]}]}
"#;

fn cnp(name: &str, body: &str) -> String {
    format!("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n{body}")
}

fn ns(p: &str) -> &str {
    p.split('/').next().unwrap()
}

type Matrix = BTreeMap<(String, String, u16), bool>;

/// What a case expects of a cell (from, to, port).
type Expect = Box<dyn Fn(&str, &str, u16) -> bool>;

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
            // A hostNetwork pod is its node's address.
            let target = if to == "default/host" {
                "node/node-2"
            } else {
                to.as_str()
            };
            let (allowed, why) = common::trace_allowed(lab, from, target, *port);
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

#[test]
fn cluster_network_policy_more_cases_with_nodes() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "cnp2");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(WORLD);
    lab.apply(HOST_POD);
    let open = matrix(&lab);
    assert!(open.values().all(|ok| *ok), "{open:#?}");
    let pod_target = |to: &str| to != "external";
    let cases: Vec<(&str, String, Expect)> = vec![
        (
            "10 admin deny egress to every namespace",
            cnp("dev-out", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: dev}}}\n  egress:\n  - {action: Deny, to: [{namespaces: {}}]}\n"),
            Box::new(move |from, to, _| !(ns(from) == "dev" && pod_target(to) && to != "default/host")),
        ),
        (
            "11 admin pass egress, baseline deny",
            cnp("prod-pass", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Pass, to: [{namespaces: {}}]}\n")
                + "---\n"
                + &cnp("prod-base", "  tier: Baseline\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Deny, to: [{namespaces: {}}]}\n"),
            Box::new(|from, to, _| !(ns(from) == "prod" && to != "external" && to != "default/host")),
        ),
        (
            "12 admin accept egress over a networkpolicy's egress isolation",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-out, namespace: prod}\nspec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Egress]}\n---\n".to_string()
                + &cnp("web-to-db", "  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}}\n  egress:\n  - {action: Accept, to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}]}\n"),
            Box::new(|from, to, _| from != "prod/web" || to == "prod/db"),
        ),
        (
            "13 baseline accept before baseline deny",
            cnp("b-accept", "  tier: Baseline\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - {action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: admin}}}}]}\n")
                + "---\n"
                + &cnp("b-deny", "  tier: Baseline\n  priority: 2\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n"),
            Box::new(|from, to, _| ns(to) != "prod" || from == "default/admin"),
        ),
        (
            "14 subject by pod selector",
            cnp("db-closed", "  tier: Admin\n  priority: 1\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n"),
            Box::new(|_, to, _| to != "prod/db"),
        ),
        (
            "15 a UDP rule leaves TCP alone",
            cnp("udp-only", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n    protocols: [{udp: {}}]\n"),
            Box::new(|_, _, _| true),
        ),
        (
            "16 a port range covering 8080",
            cnp("range", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n    protocols: [{tcp: {destinationPort: {range: {start: 8000, end: 8100}}}}]\n"),
            Box::new(|_, to, port| !(ns(to) == "prod" && port == 8080)),
        ),
        (
            "17 an ingress named port",
            cnp("http-closed", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - action: Deny\n    from: [{namespaces: {}}]\n    protocols: [{destinationNamedPort: http}]\n"),
            Box::new(|_, to, port| !(ns(to) == "prod" && port == 8080)),
        ),
        (
            "18 networks 0.0.0.0/0 covers pods too",
            cnp("dev-nowhere", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: dev}}}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n"),
            Box::new(|from, _, _| ns(from) != "dev"),
        ),
        (
            "19 pass the pod network, deny the rest",
            cnp("dev-pass-pods", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: dev}}}\n  egress:\n  - {action: Pass, to: [{networks: [198.18.0.0/16]}]}\n")
                + "---\n"
                + &cnp("dev-deny-all", "  tier: Admin\n  priority: 2\n  subject: {namespaces: {matchLabels: {env: dev}}}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n"),
            Box::new(|from, to, _| ns(from) != "dev" || (to != "external" && to != "default/host")),
        ),
        (
            "20 nodes peer: every node",
            cnp("prod-no-nodes", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Deny, to: [{nodes: {}}]}\n"),
            Box::new(|from, to, _| !(ns(from) == "prod" && to == "default/host")),
        ),
        (
            "21 nodes peer: another node only",
            cnp("prod-not-node1", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Deny, to: [{nodes: {matchLabels: {kubernetes.io/hostname: node-1}}}]}\n"),
            Box::new(|_, _, _| true),
        ),
        (
            "22 namespace selector with expressions",
            cnp("from-default", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchExpressions: [{key: env, operator: In, values: [prod, dev]}]}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: default}}}]}\n"),
            Box::new(|from, to, _| !(ns(from) == "default" && (ns(to) == "prod" || ns(to) == "dev"))),
        ),
        (
            "23 baseline pass, then baseline deny",
            cnp("bp-pass", "  tier: Baseline\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - {action: Pass, from: [{namespaces: {matchLabels: {env: dev}}}]}\n")
                + "---\n"
                + &cnp("bp-deny", "  tier: Baseline\n  priority: 2\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}\n"),
            Box::new(|from, to, _| ns(to) != "prod" || ns(from) == "dev"),
        ),
        (
            "24 admin accept outside over a baseline deny of everything",
            cnp("out-ok", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Accept, to: [{networks: [198.19.1.0/24]}]}\n")
                + "---\n"
                + &cnp("nothing", "  tier: Baseline\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  egress:\n  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}\n"),
            Box::new(|from, to, _| ns(from) != "prod" || to == "external"),
        ),
        (
            "25 several peers in one rule",
            cnp("two-peers", "  tier: Admin\n  priority: 1\n  subject: {namespaces: {matchLabels: {env: prod}}}\n  ingress:\n  - action: Deny\n    from:\n    - {namespaces: {matchLabels: {env: dev}}}\n    - {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: admin}}}}\n"),
            Box::new(|from, to, _| !(ns(to) == "prod" && (ns(from) == "dev" || from == "default/admin"))),
        ),
    ];
    for (name, yaml, expect) in &cases {
        case(&lab, name, yaml, expect.as_ref(), true);
    }
}
