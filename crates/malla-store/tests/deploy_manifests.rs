//! `deploy/` against a real kube-apiserver (v1.20, from `scripts/k8s-control-plane`): the CRDs
//! install, every manifest passes a server-side dry run (admission and validation included),
//! and objects of each Malla kind — built from Malla's own types, so the printer columns'
//! JSON paths are checked against the real serialized field names — print their columns.

use std::path::{Path, PathBuf};

use malla_test_kit::control_plane::{loopback, ControlPlane};
use serde_json::{json, Value};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> String {
    cp.kubectl_run(args, stdin)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A Malla object as the Kubernetes datastore stores it: `spec` is the model, as-is.
fn object(kind: &str, name: &str, key: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "malla.dev/v1",
        "kind": kind,
        "metadata": {"name": name, "annotations": {"malla.dev/key": key}},
        "spec": spec,
    })
}

/// The row of `kubectl get KIND NAME [-o wide]` as columns, with the header's names.
fn row(cp: &ControlPlane, kind: &str, name: &str, wide: bool) -> Vec<(String, String)> {
    let mut args = vec!["get", kind, name];
    if wide {
        args.extend(["-o", "wide"]);
    }
    let out = kubectl(cp, &args, None);
    let mut lines = out.lines();
    let header = lines.next().expect("a header line");
    let values = lines.next().expect("a row");
    // Columns start where the header's names start (kubectl pads with spaces).
    let starts: Vec<usize> = header
        .char_indices()
        .filter(|&(i, c)| c != ' ' && (i == 0 || header.as_bytes()[i - 1] == b' '))
        .map(|(i, _)| i)
        .collect();
    let cut = |s: &str, k: usize| -> String {
        let end = starts
            .get(k + 1)
            .copied()
            .unwrap_or(usize::MAX)
            .min(s.len());
        s.get(starts[k].min(s.len())..end)
            .unwrap_or("")
            .trim()
            .to_string()
    };
    (0..starts.len())
        .map(|k| (cut(header, k), cut(values, k)))
        .collect()
}

fn column<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(h, _)| h == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no column {name} in {row:?}"))
}

#[test]
fn deploy_manifests_apply_and_crds_print_their_columns() {
    let dir = tempfile::Builder::new()
        .prefix("malla-cp-deploy")
        .tempdir_in(if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    // No controller manager: nothing here needs one.
    let cp = ControlPlane::start(loopback(dir.path()).without_controller_manager())
        .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"));

    let crds = deploy_dir().join("crds.yaml");
    kubectl(&cp, &["apply", "-f", crds.to_str().unwrap()], None);
    let plurals = [
        "ippools",
        "ipamblocks",
        "ipamhandles",
        "workloadendpoints",
        "nodenetworks",
        "clusternetworks",
    ];
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let names: Vec<String> = plurals
        .iter()
        .map(|p| format!("crd/{p}.malla.dev"))
        .collect();
    wait.extend(names.iter().map(String::as_str));
    kubectl(&cp, &wait, None);

    // Every file of deploy/, in the order the README applies them, dry-run on the server.
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert_eq!(
        files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect::<Vec<_>>(),
        ["configmap.yaml", "crds.yaml", "daemonset.yaml", "rbac.yaml"]
    );
    for name in ["crds.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml"] {
        let f = deploy_dir().join(name);
        let out = kubectl(
            &cp,
            &["apply", "--dry-run=server", "-f", f.to_str().unwrap()],
            None,
        );
        assert!(out.contains("(server dry run)"), "{name}: {out}");
    }

    // One object of each kind, its spec serialized from Malla's own types.
    let pool = malla_api::IpPool {
        name: "default-ipv4".into(),
        cidr: "198.18.0.0/16".parse().unwrap(),
        block_size: 26,
        nat_outgoing: true,
        disabled: false,
    };
    let block = malla_ipam::Block::new(
        "198.18.0.64/26".parse().unwrap(),
        "default-ipv4",
        Some("node-1"),
    );
    let wep = malla_api::WorkloadEndpoint {
        namespace: "shop".into(),
        pod: "web".into(),
        node: "node-1".into(),
        container_id: "c0ffee".into(),
        ifname: "eth0".into(),
        host_ifname: "mla0c0ffee".into(),
        ips: vec!["198.18.0.65/32".parse().unwrap()],
        mac: "0e:00:00:00:00:01".into(),
        ipam_handle: "malla.c0ffee".into(),
    };
    let node = malla_api::Node {
        name: "node-1".into(),
        underlay_ipv4: Some("198.19.0.11".parse().unwrap()),
        underlay_ipv6: Some("fd00:198:19::11".parse().unwrap()),
        underlay_mtu: 1500,
        vtep_mac: "0e:11:22:33:44:55".into(),
    };
    let cluster = malla_api::ClusterConfig {
        routing: malla_api::RoutingMode::Vxlan,
        ..Default::default()
    };
    let cidr: ipnet::IpNet = "198.18.0.64/26".parse().unwrap();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": [
        object("IPPool", "default-ipv4", &malla_api::keys::pool("default-ipv4"),
               serde_json::to_value(&pool).unwrap()),
        object("IPAMBlock", "198.18.0.64-26", &malla_api::keys::block(&cidr),
               serde_json::to_value(&block).unwrap()),
        object("IPAMHandle", "malla.c0ffee", &malla_api::keys::handle("malla.c0ffee"),
               json!({"blocks": ["198.18.0.64/26"]})),
        object("WorkloadEndpoint", "node-1.c0ffee.eth0",
               &malla_api::keys::endpoint("node-1", "c0ffee", "eth0"),
               serde_json::to_value(&wep).unwrap()),
        object("NodeNetwork", "node-1", &malla_api::keys::node("node-1"),
               serde_json::to_value(&node).unwrap()),
        object("ClusterNetwork", "cluster", malla_api::keys::CLUSTER_CONFIG,
               serde_json::to_value(&cluster).unwrap()),
    ]});
    kubectl(&cp, &["create", "-f", "-"], Some(&list.to_string()));

    // The spec is kept as given (unknown fields preserved), the key annotation too.
    let got: Value = serde_json::from_str(&kubectl(
        &cp,
        &[
            "get",
            "workloadendpoint",
            "node-1.c0ffee.eth0",
            "-o",
            "json",
        ],
        None,
    ))
    .unwrap();
    assert_eq!(got["spec"], serde_json::to_value(&wep).unwrap());
    assert_eq!(
        got["metadata"]["annotations"]["malla.dev/key"],
        "/malla/endpoints/node-1/c0ffee/eth0"
    );
    assert!(
        got["metadata"]["namespace"].is_null(),
        "cluster-scoped: {got}"
    );

    // The printer columns, by header name.
    let out = kubectl(&cp, &["get", "ipamblocks"], None);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "CIDR", "NODE", "POOL", "AGE"], "{out}");
    let r = row(&cp, "ipamblocks", "198.18.0.64-26", false);
    assert_eq!(column(&r, "CIDR"), "198.18.0.64/26");
    assert_eq!(column(&r, "NODE"), "node-1");
    assert_eq!(column(&r, "POOL"), "default-ipv4");

    let r = row(&cp, "ippools", "default-ipv4", false);
    assert_eq!(column(&r, "CIDR"), "198.18.0.0/16");
    assert_eq!(column(&r, "BLOCKSIZE"), "26");
    assert_eq!(column(&r, "NATOUTGOING"), "true");
    assert_eq!(column(&r, "DISABLED"), "false");

    let r = row(&cp, "ipamhandles", "malla.c0ffee", true);
    assert!(column(&r, "BLOCKS").contains("198.18.0.64/26"), "{r:?}");

    let r = row(&cp, "workloadendpoints", "node-1.c0ffee.eth0", false);
    assert_eq!(column(&r, "NODE"), "node-1");
    assert_eq!(column(&r, "NAMESPACE"), "shop");
    assert_eq!(column(&r, "POD"), "web");
    assert!(column(&r, "IPS").contains("198.18.0.65/32"), "{r:?}");
    assert_eq!(column(&r, "INTERFACE"), "mla0c0ffee");

    let r = row(&cp, "nodenetworks", "node-1", false);
    assert_eq!(column(&r, "IPV4"), "198.19.0.11");
    assert_eq!(column(&r, "IPV6"), "fd00:198:19::11");
    assert_eq!(column(&r, "MTU"), "1500");
    assert_eq!(column(&r, "VTEP"), "0e:11:22:33:44:55");

    let r = row(&cp, "clusternetworks", "cluster", true);
    assert_eq!(column(&r, "ROUTING"), "vxlan");
    assert_eq!(column(&r, "VNI"), "4096");
    assert_eq!(column(&r, "VXLANPORT"), "4789");

    // The category lists them all.
    let all = kubectl(&cp, &["get", "malla"], None);
    for p in plurals {
        assert!(
            all.contains(&format!("{}.malla.dev/", &p[..p.len() - 1])),
            "{all}"
        );
    }
}
