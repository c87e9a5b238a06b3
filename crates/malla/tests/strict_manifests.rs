//! Manifests are decoded strictly, as `kubectl apply --validate=strict` does: the misspellings of
//! issue 13 (a NetworkPolicy's `matchLabel:`, which used to become an empty selector — a
//! namespace-wide deny — and a pod's `label:`, `nodename:` and `port:`) are refused naming the
//! document and the field, and nothing of the file is created: no pod namespace, no pod in
//! `malla lab get pods`, no object in the datastore. A file whose last document alone is bad is
//! refused whole. The same files with the typo mended apply, so the checks can fail.

mod common;

use common::Lab;
use malla_api::keys;
use malla_lab::LabPaths;
use malla_store::Store;

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: typo}\n";

fn pod(meta: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, namespace: typo, {meta}}}\nspec:\n{spec}")
}

const SPEC: &str = "  nodeName: node-1\n  containers:\n  - name: c\n    image: busybox\n    ports:\n    - containerPort: 8080\n";

fn policy(selector: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: db, namespace: typo}}\nspec:\n  podSelector:\n    {selector}: {{app: db}}\n  policyTypes: [Ingress]\n")
}

/// Pod network namespaces of the lab, datastore keys under the lab's objects, pods it lists.
fn created(lab: &Lab) -> (Vec<String>, Vec<String>, String) {
    let prefix = lab.netns("pod-");
    let netns: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let paths = LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("lab paths");
    let store = malla_store::LocalStore::open(&paths.store()).expect("the lab's datastore");
    let mut keys_found = Vec::new();
    for prefix in [
        keys::PODS,
        keys::NETWORK_POLICIES,
        &format!("{}typo", keys::NAMESPACES),
    ] {
        let (kvs, _) = store.list(prefix).expect("list");
        keys_found.extend(kvs.into_iter().map(|kv| kv.key));
    }
    let pods = lab.run(&["lab", "get", "pods", "-o", "json"]);
    (netns, keys_found, pods)
}

fn assert_nothing(lab: &Lab, what: &str) {
    let (netns, keys_found, pods) = created(lab);
    assert!(
        netns.is_empty(),
        "{what}: pod namespaces created: {netns:?}"
    );
    assert!(
        keys_found.is_empty(),
        "{what}: in the datastore: {keys_found:?}"
    );
    let pods: serde_json::Value = serde_json::from_str(&pods).expect("json");
    assert_eq!(pods, serde_json::json!([]), "{what}: pods listed");
    let state = lab.state();
    assert!(
        !state["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .any(|n| n == "typo"),
        "{what}: namespace created"
    );
}

#[test]
fn misspelt_fields_are_refused_and_nothing_is_applied() {
    let lab = Lab::new(&common::malla_bin(), "strict");
    lab.run(&["lab", "up", "--nodes", "2"]);
    assert_nothing(&lab, "a new lab");

    let good_pod = pod("labels: {app: db}", SPEC);
    let cases = [
        (
            format!("{NAMESPACE}{}", policy("matchLabel")),
            "document 2 (NetworkPolicy \"typo/db\"): spec.podSelector.matchLabel: unknown field (did you mean \"matchLabels\"?)",
        ),
        (
            format!("{NAMESPACE}{}", pod("label: {app: db}", SPEC)),
            "document 2 (Pod \"typo/a\"): metadata.label: unknown field (did you mean \"labels\"?)",
        ),
        (
            format!("{NAMESPACE}{}", pod("labels: {app: db}", &SPEC.replace("nodeName", "nodename"))),
            "document 2 (Pod \"typo/a\"): spec.nodename: unknown field (did you mean \"nodeName\"?)",
        ),
        (
            format!("{NAMESPACE}{}", pod("labels: {app: db}", &SPEC.replace("containerPort", "port"))),
            "document 2 (Pod \"typo/a\"): spec.containers[0].ports[0].port: unknown field; valid fields here: containerPort,",
        ),
        // Only the last document is bad: the namespace, pod and policy before it are not applied.
        (
            format!("{NAMESPACE}{good_pod}{}{}", policy("matchLabels"), pod("labels: {app: x}", &SPEC.replace("nodeName", "nodename")).replace("name: a,", "name: b,")),
            "document 4 (Pod \"typo/b\"): spec.nodename: unknown field",
        ),
    ];
    for (i, (manifest, expected)) in cases.iter().enumerate() {
        let f = lab.dir().join(format!("typo-{i}.yaml"));
        std::fs::write(&f, manifest).expect("write manifest");
        let out = lab.try_run(&["lab", "apply", "-f", f.to_str().expect("utf8")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} was accepted:\n{manifest}");
        assert!(
            err.contains(expected),
            "case {i}: expected {expected:?} in:\n{err}"
        );
        assert_nothing(&lab, &format!("case {i}"));
    }

    // Mended, the whole file applies: the checks above see what a file creates.
    let mended = format!("{NAMESPACE}{good_pod}{}", policy("matchLabels"));
    lab.apply(&mended);
    let (netns, keys_found, pods) = created(&lab);
    assert_eq!(netns, [lab.netns("pod-typo-a")], "the pod's namespace");
    assert!(pods.contains("\"typo\""), "{pods}");
    assert!(
        keys_found.contains(&keys::pod("typo", "a")),
        "{keys_found:?}"
    );
    let policy_key = keys::network_policy("typo", "db");
    assert!(keys_found.contains(&policy_key), "{keys_found:?}");
    // …and the policy's selector is the one written, not an empty one.
    let paths = LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("lab paths");
    let store = malla_store::LocalStore::open(&paths.store()).expect("the lab's datastore");
    let kv = store.get(&policy_key).expect("get").expect("the policy");
    let p: malla_api::policy::NetworkPolicy = serde_json::from_str(&kv.value).expect("policy");
    assert_eq!(p.spec.pod_selector.match_labels["app"], "db");
}
