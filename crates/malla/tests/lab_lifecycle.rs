//! The lab's own contract: `up` is idempotent, bad manifests are rejected whole with the
//! document and field named, apply/delete go through CNI and give addresses back, probe filters
//! narrow, and `down` leaves nothing behind — also after a crash lost the lab's state file.

mod common;

use common::Lab;

const PODS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: web}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: front, namespace: web, labels: {app: front}}\n\
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}, {containerPort: 53, protocol: UDP}]}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: back, namespace: web}\n\
spec: {containers: [{name: c, ports: [{containerPort: 8080}]}]}\n";

fn namespaces_with(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn lifecycle() {
    let lab = Lab::new(&common::malla_bin(), "life");
    lab.run(&["lab", "up", "--nodes", "2"]);
    let pids = lab.state()["nodes"].clone();
    // Idempotent: a second `up` changes nothing and keeps the same agents.
    lab.run(&["lab", "up", "--nodes", "2"]);
    assert_eq!(lab.state()["nodes"], pids);
    // A different shape is refused rather than silently merged.
    assert!(!lab.try_run(&["lab", "up", "--nodes", "3"]).status.success());

    // A bad document anywhere rejects the whole file, naming document and field.
    let bad = format!("{PODS}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: broken}}\nspec: {{containers: [{{name: c, ports: [{{containerPort: 0}}]}}]}}\n");
    let f = lab.dir().join("bad.yaml");
    std::fs::write(&f, bad).unwrap();
    let out = lab.try_run(&["lab", "apply", "-f", f.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("document 4") && err.contains("spec.containers[0].ports[0].containerPort"),
        "{err}"
    );
    assert_eq!(
        lab.state()["pods"].as_object().unwrap().len(),
        0,
        "nothing applied"
    );
    let unknown = lab.dir().join("unknown.yaml");
    std::fs::write(
        &unknown,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n",
    )
    .unwrap();
    let err = String::from_utf8_lossy(
        &lab.try_run(&["lab", "apply", "-f", unknown.to_str().unwrap()])
            .stderr,
    )
    .into_owned();
    assert!(err.contains("document 1") && err.contains("kind"), "{err}");
    let no_ns = lab.dir().join("nons.yaml");
    std::fs::write(&no_ns, "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: nowhere}\nspec: {containers: [{name: c}]}\n").unwrap();
    let err = String::from_utf8_lossy(
        &lab.try_run(&["lab", "apply", "-f", no_ns.to_str().unwrap()])
            .stderr,
    )
    .into_owned();
    assert!(err.contains("metadata.namespace"), "{err}");

    let out = lab.apply(PODS);
    assert!(
        out.contains("pod/web/front created") && out.contains("pod/web/back created"),
        "{out}"
    );
    assert!(lab.apply(PODS).contains("pod/web/front unchanged"));
    assert_eq!(lab.used_addresses(), 2);
    let pods: serde_json::Value =
        serde_json::from_str(&lab.run(&["lab", "get", "pods", "-o", "json"])).unwrap();
    assert_eq!(pods.as_array().unwrap().len(), 2);
    assert!(lab
        .run(&["lab", "get", "pods", "-o", "wide"])
        .contains("80/tcp,53/udp"));

    // Filters narrow the probe to the pairs asked for.
    let r = lab.probe(&[
        "--from",
        "web/back",
        "--to",
        "web/front",
        "--protocol",
        "udp",
    ]);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["port"], 53);
    assert_eq!(r[0]["connected"], true);
    assert_eq!(r[0]["answeredBy"], "web/front");
    let r = lab.probe(&["--from", "node/node-1"]);
    assert!(
        r.iter().all(|p| p["to"] == "web/front"),
        "a node probes only its own pods: {r:?}"
    );

    // Delete goes through CNI DEL: addresses come back, the pod namespaces go.
    let f = lab.dir().join("pods.yaml");
    std::fs::write(&f, PODS).unwrap();
    let out = lab.run(&["lab", "delete", "-f", f.to_str().unwrap()]);
    assert!(out.contains("pod/web/front deleted"), "{out}");
    assert_eq!(lab.used_addresses(), 0);
    assert!(namespaces_with(&lab.netns("pod-")).is_empty());

    // A crash that lost the state file: `down` still finds every namespace by the lab's prefix.
    lab.apply(PODS);
    let agent_pid = lab.state()["nodes"][0]["agent_pid"].as_u64().unwrap();
    std::fs::remove_file(lab.dir().join("lab.json")).unwrap();
    lab.run(&["lab", "down"]);
    assert!(
        namespaces_with(&format!("malla-{}-", lab.name)).is_empty(),
        "nothing left"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    // Stopped: gone, or a zombie waiting for an init that does not reap (as in containers).
    let alive = std::fs::read_to_string(format!("/proc/{agent_pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false);
    assert!(!alive, "the agent was stopped");
}
