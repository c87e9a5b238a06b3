//! The Kubernetes e2e NetworkPolicy model as lab tests: namespaces x, y, z with pods a, b, c,
//! each serving ports 80 and 81 on TCP and UDP. Every case applies policies, then compares the
//! whole 9×9×ports matrix observed by `malla lab probe` with the truth table written from the
//! upstream case, and checks that `malla policy trace` agrees with what was observed.

mod common;

use std::collections::BTreeMap;

use common::Lab;
use serde_json::Value;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

/// One probe: (from, to, port, protocol) with pods named `ns/pod`.
type Key = (String, String, u16, String);

fn model() -> String {
    let mut y = String::new();
    for ns in NAMESPACES {
        y.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"));
    }
    let mut node = 0;
    for ns in NAMESPACES {
        for pod in PODS {
            node = node % 3 + 1;
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  nodeName: node-{node}\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: 80, name: serve-80-tcp}}\n    - {{containerPort: 81, name: serve-81-tcp}}\n    - {{containerPort: 80, protocol: UDP, name: serve-80-udp}}\n    - {{containerPort: 81, protocol: UDP, name: serve-81-udp}}\n"
            ));
        }
    }
    y
}

struct Model {
    lab: Lab,
    ips: BTreeMap<String, String>,
}

impl Model {
    fn new() -> Self {
        let lab = Lab::new(&common::malla_bin(), "np");
        lab.run(&["lab", "up", "--nodes", "3"]);
        lab.apply(&model());
        let ips = lab.state()["pods"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, p)| (k.clone(), p["ips"][0].as_str().unwrap().to_string()))
            .collect();
        Model { lab, ips }
    }

    /// The observed pod-to-pod matrix.
    fn observe(&self) -> BTreeMap<Key, bool> {
        self.lab
            .probe(&["--timeout-ms", "500"])
            .into_iter()
            .filter(|r| {
                let (f, t) = (r["from"].as_str().unwrap(), r["to"].as_str().unwrap());
                f.contains('/') && !f.starts_with("node/") && t.len() == 3 && t.contains('/')
            })
            .map(|r| {
                (
                    (
                        r["from"].as_str().unwrap().to_string(),
                        r["to"].as_str().unwrap().to_string(),
                        r["port"].as_u64().unwrap() as u16,
                        r["protocol"].as_str().unwrap().to_string(),
                    ),
                    r["connected"] == true,
                )
            })
            .collect()
    }

    /// Applies `policies`, compares with `expect`, checks the trace, then removes them.
    fn case(&self, name: &str, policies: &str, expect: impl Fn(&str, &str, u16, &str) -> bool) {
        if !policies.is_empty() {
            self.lab.apply(policies);
        }
        self.check(name, &expect);
        if !policies.is_empty() {
            self.lab.apply_delete(policies);
        }
    }

    fn check(&self, name: &str, expect: &impl Fn(&str, &str, u16, &str) -> bool) {
        // Each case is about new connections. Established flows outlive a policy change (as in
        // Calico), and a UDP probe whose random source port repeats an earlier allowed flow's
        // would ride that flow's conntrack entry: start every case from an empty table.
        for n in 1..=3 {
            let ns = self.lab.netns(&format!("node-{n}"));
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &ns, "conntrack", "-F"])
                .output();
        }
        let observed = self.observe();
        assert_eq!(
            observed.len(),
            9 * 8 * 4,
            "{name}: every pair, port and protocol probed"
        );
        let wrong: Vec<String> = observed
            .iter()
            .filter(|((f, t, p, pr), ok)| expect(f, t, *p, pr) != **ok)
            .map(|((f, t, p, pr), ok)| format!("{f} -> {t} {pr}/{p}: observed {ok}"))
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}: {} cells differ from the truth table:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
        // The trace command explains the same verdicts.
        let trace: Value =
            serde_json::from_str(&self.lab.run(&["policy", "trace", "--all", "-o", "json"]))
                .unwrap();
        let mut disagree = Vec::new();
        for t in trace.as_array().unwrap() {
            let key = (
                t["from"].as_str().unwrap().to_string(),
                t["to"].as_str().unwrap().to_string(),
                t["port"].as_u64().unwrap() as u16,
                t["protocol"].as_str().unwrap().to_lowercase(),
            );
            if let Some(ok) = observed.get(&key) {
                if t["allowed"].as_bool() != Some(*ok) {
                    disagree.push(format!("{key:?}: trace {} observed {ok}", t["allowed"]));
                }
            }
        }
        assert!(
            disagree.is_empty(),
            "{name}: trace disagrees:\n{}",
            disagree.join("\n")
        );
    }
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

fn ns_of(p: &str) -> &str {
    &p[..1]
}

#[test]
fn kubernetes_network_policy_model() {
    let m = Model::new();
    let all = |_: &str, _: &str, _: u16, _: &str| true;
    m.case("no policies: everything connects", "", all);

    // Invalid policies are refused as the API server would, naming the field.
    for (spec, field) in [
        ("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/16}, podSelector: {}}]}]", "spec.ingress[0].from[0]"),
        ("  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 198.18.0.0/16, except: [10.0.0.0/8]}}]}]", "spec.ingress[0].from[0].ipBlock.except[0]"),
        ("  podSelector: {}\n  ingress: [{ports: [{port: serve-80-tcp, endPort: 90}]}]", "spec.ingress[0].ports[0].endPort"),
        ("  podSelector: {matchExpressions: [{key: a, operator: In}]}", "spec.podSelector.matchExpressions[0].values"),
    ] {
        let f = m.lab.dir().join("bad-policy.yaml");
        std::fs::write(&f, np("x", "bad", spec)).unwrap();
        let out = m.lab.try_run(&["lab", "apply", "-f", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{spec} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{spec}: error should name {field}: {err}");
    }

    // A person reads the trace: which policy and rule decided.
    m.lab.apply(&np("x", "from-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]"));
    let text = m
        .lab
        .run(&["policy", "trace", "x/b", "x/a", "--port", "80"]);
    assert!(
        text.contains("ALLOWED") && text.contains("x/from-b"),
        "{text}"
    );
    let text = m
        .lab
        .run(&["policy", "trace", "y/b", "x/a", "--port", "80"]);
    assert!(text.contains("DENIED"), "{text}");
    m.lab.apply_delete(&np("x", "from-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]"));

    m.case(
        "default-deny-ingress",
        &np(
            "x",
            "deny-ingress",
            "  podSelector: {}\n  policyTypes: [Ingress]",
        ),
        |_, t, _, _| ns_of(t) != "x",
    );
    // The pod's own node still reaches it (kubelet probes) under default deny.
    m.lab.apply(&np(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    ));
    let node_probes: Vec<Value> = m
        .lab
        .probe(&["--from", "node/node-1", "--timeout-ms", "500"]);
    assert!(
        node_probes
            .iter()
            .filter(|r| r["to"].as_str().unwrap().starts_with("x/"))
            .all(|r| r["connected"] == true),
        "{node_probes:?}"
    );
    m.lab.apply_delete(&np(
        "x",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    ));

    m.case(
        "default-deny-all",
        &np(
            "x",
            "deny-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
        ),
        |f, t, _, _| ns_of(f) != "x" && ns_of(t) != "x",
    );
    m.case(
        "default-deny-egress",
        &np(
            "x",
            "deny-egress",
            "  podSelector: {}\n  policyTypes: [Egress]",
        ),
        |f, _, _, _| ns_of(f) != "x",
    );
    m.case(
        "allow-all ingress",
        &np("x", "allow-all", "  podSelector: {}\n  ingress: [{}]"),
        all,
    );
    m.case(
        "allow from pod in same namespace by podSelector",
        &np("x", "from-b", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]"),
        |f, t, _, _| t != "x/a" || f == "x/b",
    );
    m.case(
        "allow from namespace by namespaceSelector",
        &np("x", "from-y", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"),
        |f, t, _, _| t != "x/a" || ns_of(f) == "y",
    );
    m.case(
        "podSelector with matchExpressions",
        &np("x", "expr", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: pod, operator: In, values: [b]}]}}]}]"),
        |f, t, _, _| t != "x/a" || f == "x/b",
    );
    m.case(
        "namespaceSelector with matchExpressions",
        &np("x", "expr-ns", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: In, values: [y]}]}}]}]"),
        |f, t, _, _| t != "x/a" || ns_of(f) == "y",
    );
    m.case(
        "podSelector OR namespaceSelector (two peers)",
        &np("x", "or", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}, {podSelector: {matchLabels: {pod: b}}}]}]"),
        |f, t, _, _| t != "x/a" || ns_of(f) != "x" || f == "x/b",
    );
    m.case(
        "podSelector AND namespaceSelector (one peer)",
        &np("x", "and", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}, podSelector: {matchLabels: {pod: b}}}]}]"),
        |f, t, _, _| t != "x/a" || (ns_of(f) != "x" && f.ends_with("/b")),
    );
    m.case(
        "namespaceSelector NotIn two namespaces",
        &np("x", "notin", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x, y]}]}}]}]"),
        |f, t, _, _| t != "x/a" || ns_of(f) == "z",
    );
    m.case(
        "Exists and DoesNotExist",
        &np("x", "exists", "  podSelector: {matchExpressions: [{key: pod, operator: Exists}]}\n  ingress: [{from: [{podSelector: {matchExpressions: [{key: nothing, operator: DoesNotExist}]}}]}]"),
        |f, t, _, _| ns_of(t) != "x" || ns_of(f) == "x",
    );
    m.case(
        "ingress on port 81 only, from namespace y",
        &np("x", "port81", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]"),
        |f, t, p, pr| t != "x/a" || (ns_of(f) == "y" && p == 81 && pr == "tcp"),
    );
    m.case(
        "ingress on a named port",
        &np(
            "x",
            "named",
            "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: serve-80-tcp}]}]",
        ),
        |_, t, p, pr| t != "x/a" || (p == 80 && pr == "tcp"),
    );
    m.case(
        "ingress UDP on a named port",
        &np("x", "named-udp", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{port: serve-81-udp, protocol: UDP}]}]"),
        |_, t, p, pr| t != "x/a" || (p == 81 && pr == "udp"),
    );
    m.case(
        "egress on a named port",
        &np("x", "egress-named", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-80-tcp}]}]"),
        |f, _, p, pr| f != "x/a" || (p == 80 && pr == "tcp"),
    );
    m.case(
        "endPort range",
        &np("x", "range", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{ports: [{protocol: TCP, port: 81, endPort: 90}]}]"),
        |_, t, p, pr| t != "x/a" || (p == 81 && pr == "tcp"),
    );
    let xb = m.ips["x/b"].clone();
    m.case(
        "ipBlock with except",
        &np("x", "block", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 198.18.0.0/16, except: [{xb}/32]}}}}]}}]")),
        |f, t, _, _| t != "x/a" || f != "x/b",
    );
    let ya = m.ips["y/a"].clone();
    m.case(
        "egress to an ipBlock",
        &np("x", "egress-block", &format!("  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress: [{{to: [{{ipBlock: {{cidr: {ya}/32}}}}]}}]")),
        |f, t, _, _| f != "x/a" || t == "y/a",
    );
    m.case(
        "egress to a namespace",
        &np("x", "egress-ns", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: y}}}]}]"),
        |f, t, _, _| f != "x/a" || ns_of(t) == "y",
    );
    m.case(
        "egress within the namespace only",
        &np(
            "x",
            "egress-same",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {}}]}]",
        ),
        |f, t, _, _| ns_of(f) != "x" || ns_of(t) == "x",
    );
    m.case(
        "multiple policies add up",
        &(np("x", "p1", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]")
            + &np("x", "p2", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]")),
        |f, t, _, _| t != "x/a" || f == "x/b" || ns_of(f) == "y",
    );
    m.case(
        "ingress and egress policies on different pods",
        &(np("x", "in", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]")
            + &np("x", "out", "  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {pod: a}}}]}]")),
        |f, t, _, _| (t != "x/a" || f == "x/c") && (f != "x/c" || t == "x/a"),
    );

    // A policy updated in place.
    let v1 = np("x", "moving", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]");
    let v2 = np("x", "moving", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]");
    m.lab.apply(&v1);
    m.check(
        "policy before update",
        &|f: &str, t: &str, _: u16, _: &str| t != "x/a" || f == "x/b",
    );
    m.lab.apply(&v2);
    m.check(
        "policy updated in place",
        &|f: &str, t: &str, _: u16, _: &str| t != "x/a" || f == "x/c",
    );
    // Policies created, changed and deleted: node-1's agent (x/a's node) patched its policy
    // objects alone, without computing the whole node.
    let log = std::fs::read_to_string(m.lab.dir().join("logs").join("agent-node-1.log")).unwrap();
    assert!(
        log.contains("policy objects patched in place"),
        "node-1's agent took the policy path:\n{log}"
    );

    // Label changes on pods and namespaces take effect.
    let labelled = np("x", "moving", "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b, role: friend}}}, {namespaceSelector: {matchLabels: {trust: high}}}]}]");
    m.lab.apply(&labelled);
    m.check(
        "nobody matches yet",
        &|_: &str, t: &str, _: u16, _: &str| t != "x/a",
    );
    // x/a is on node-1, x/b on node-2: node-1's agent changes the set's members in place.
    let member_updates = || {
        let log = m.lab.dir().join("logs").join("agent-node-1.log");
        let log = std::fs::read_to_string(log).unwrap();
        log.matches("policy set members updated in place").count()
    };
    let before = member_updates();
    m.lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {pod: b, role: friend}}\nspec:\n  nodeName: node-2\n  containers:\n  - name: c\n    ports:\n    - {containerPort: 80, name: serve-80-tcp}\n    - {containerPort: 81, name: serve-81-tcp}\n    - {containerPort: 80, protocol: UDP, name: serve-80-udp}\n    - {containerPort: 81, protocol: UDP, name: serve-81-udp}\n");
    m.check("pod label added", &|f: &str, t: &str, _: u16, _: &str| {
        t != "x/a" || f == "x/b"
    });
    assert!(
        member_updates() > before,
        "node-1's agent took the member path for x/b's label"
    );
    m.lab.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: z, labels: {ns: z, trust: high}}\n",
    );
    m.check(
        "namespace label added",
        &|f: &str, t: &str, _: u16, _: &str| t != "x/a" || f == "x/b" || ns_of(f) == "z",
    );

    // Deleting the policy lifts the isolation.
    m.lab.apply_delete(&labelled);
    m.check("policy deleted", &all);
}
