//! `malla audit` on real labs: it reports the control-plane ports it finds listening in the
//! nodes and whether pods and `external` reach them, the kubelet's answer to an anonymous
//! request, and, on a `--datastore kubernetes` lab, the real kube-apiserver and its etcd; and a
//! finding disappears once it is fixed (the listener bound to 127.0.0.1, or stopped).

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::Value;

/// `malla audit -o json`: (exit status, document, how long it took).
fn audit(lab: &Lab) -> (i32, Value, Duration) {
    let start = Instant::now();
    let out = lab.try_run(&["audit", "-o", "json"]);
    let took = start.elapsed();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "audit output is not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), doc, took)
}

/// The findings of `check` whose place starts with `place` (e.g. `node-1 `) on `port`.
fn find<'a>(doc: &'a Value, check: &str, place: &str, port: Option<u16>) -> Vec<&'a Value> {
    doc["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| {
            f["check"] == check
                && f["where"].as_str().is_some_and(|w| w.starts_with(place))
                && port.is_none_or(|p| f["port"] == p)
        })
        .collect()
}

/// A TCP listener on `addr` inside the namespace `netns` (it stays there when handed back).
fn listen_in(netns: &str, addr: &str) -> TcpListener {
    let addr = addr.to_string();
    malla_dataplane::netns::NetNs::open_named(netns)
        .unwrap()
        .run(move || TcpListener::bind(&addr))
        .unwrap()
        .unwrap()
}

/// A process we started, killed (by its pid) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTPS server in `netns` on `port` answering 200 to every request (`openssl s_server
/// -www`): a kubelet with anonymous authentication on and authorization AlwaysAllow.
fn open_kubelet(lab: &Lab, netns: &str, port: u16) -> Killed {
    let dir = lab.dir().join("kubelet-pki");
    std::fs::create_dir_all(&dir).unwrap();
    let (key, cert) = common::self_signed(&dir, "kubelet");
    let child = Command::new("ip")
        .args([
            "netns", "exec", netns, "openssl", "s_server", "-quiet", "-www",
        ])
        .arg("-accept")
        .arg(port.to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Killed(child);
    // Listening once the node's table says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !malla_dataplane::netns::NetNs::open_named(netns)
        .unwrap()
        .run(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        .unwrap()
    {
        assert!(Instant::now() < deadline, "openssl s_server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

#[test]
fn findings_come_with_the_listener_and_go_when_it_is_fixed() {
    let lab = Lab::new(&common::malla_bin(), "au");
    lab.run(&["lab", "up", "--nodes", "3"]);
    lab.apply(&common::two_pods_per_node(3));

    // Nothing of the control plane listens in a plain lab.
    let (code, doc, took) = audit(&lab);
    assert_eq!(code, 0, "{doc:#}");
    assert!(
        find(&doc, "reachable-from-pods", "", None).is_empty(),
        "{doc:#}"
    );
    assert_eq!(
        doc["probedFromPods"].as_array().unwrap().len(),
        3,
        "{doc:#}"
    );
    assert_eq!(doc["probedFromOutside"], "external");
    assert!(took < Duration::from_secs(5), "audit took {took:?}");

    // A kubelet port and an etcd port bound to all addresses in two nodes.
    let kubelet = listen_in(&lab.netns("node-1"), "0.0.0.0:10250");
    let etcd = listen_in(&lab.netns("node-2"), "0.0.0.0:2379");
    let (code, doc, took) = audit(&lab);
    assert_eq!(code, 3, "a high finding exits 3: {doc:#}");
    assert!(took < Duration::from_secs(5), "audit took {took:?}");
    let from_pods = find(
        &doc,
        "reachable-from-pods",
        "node-1 0.0.0.0:10250",
        Some(10250),
    );
    assert_eq!(from_pods.len(), 1, "{doc:#}");
    assert_eq!(from_pods[0]["severity"], "medium");
    assert!(
        from_pods[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("3/3 pods"),
        "every node's pod reaches it: {}",
        from_pods[0]
    );
    assert!(!from_pods[0]["remediation"].as_str().unwrap().is_empty());
    assert_eq!(
        find(&doc, "reachable-from-outside", "node-1 ", Some(10250)).len(),
        1,
        "{doc:#}"
    );
    for check in ["reachable-from-pods", "reachable-from-outside"] {
        let f = find(&doc, check, "node-2 0.0.0.0:2379", Some(2379));
        assert_eq!(f.len(), 1, "{check}: {doc:#}");
        assert_eq!(f[0]["severity"], "high", "{check}");
    }
    // A plain TCP listener is no kubelet: said so, without inventing an answer.
    assert_eq!(
        find(&doc, "kubelet-no-https", "node-1 ", Some(10250)).len(),
        1
    );
    // The same table for people.
    let table = String::from_utf8(lab.try_run(&["audit"]).stdout).unwrap();
    assert!(table.starts_with("SEVERITY"), "{table}");
    assert!(
        table.contains("etcd client port 2379 is reachable from pods"),
        "{table}"
    );

    // Fixed: both bound to 127.0.0.1.
    drop((kubelet, etcd));
    let _kubelet = listen_in(&lab.netns("node-1"), "127.0.0.1:10250");
    let _etcd = listen_in(&lab.netns("node-2"), "127.0.0.1:2379");
    let (code, doc, _) = audit(&lab);
    assert_eq!(code, 0, "{doc:#}");
    for check in ["reachable-from-pods", "reachable-from-outside"] {
        assert!(find(&doc, check, "", None).is_empty(), "{check}: {doc:#}");
    }
    // Still reported, as what it is now.
    let listening = find(&doc, "listening", "node-1 127.0.0.1:10250", Some(10250));
    assert_eq!(listening.len(), 1, "{doc:#}");
    assert_eq!(listening[0]["severity"], "info");

    // A kubelet answering anonymous requests (authentication on, AlwaysAllow)…
    let server = open_kubelet(&lab, &lab.netns("node-3"), 10250);
    let (code, doc, _) = audit(&lab);
    assert_eq!(code, 3, "{doc:#}");
    let open = find(&doc, "kubelet-anonymous-allowed", "node-3 ", Some(10250));
    assert_eq!(open.len(), 1, "{doc:#}");
    assert_eq!(open[0]["severity"], "high");
    assert!(open[0]["evidence"].as_str().unwrap().contains("HTTP 200"));
    // …gone with it.
    drop(server);
    let (code, doc, _) = audit(&lab);
    assert_eq!(code, 0, "{doc:#}");
    assert!(find(&doc, "kubelet-anonymous-allowed", "", None).is_empty());
    assert!(find(&doc, "reachable-from-pods", "node-3 ", None).is_empty());
}

#[test]
fn the_kubernetes_lab_control_plane_is_audited() {
    let lab = Lab::new(&common::malla_bin(), "ak");
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "kubernetes"]);
    lab.apply(&common::two_pods_per_node(2));
    let (code, doc, took) = audit(&lab);
    assert!(took < Duration::from_secs(5), "audit took {took:?}");
    // The real kube-apiserver on 198.19.0.1:6443: reached by pods and from outside (as it
    // must be), anonymous requests authenticated and refused by RBAC (its 1.20 default).
    let api = find(
        &doc,
        "reachable-from-pods",
        "control-plane 198.19.0.1:6443",
        Some(6443),
    );
    assert_eq!(api.len(), 1, "{doc:#}");
    assert_eq!(api[0]["severity"], "info");
    let anonymous = find(&doc, "apiserver-anonymous-auth", "control-plane", None);
    assert_eq!(anonymous.len(), 1, "{doc:#}");
    assert!(
        anonymous[0]["evidence"]
            .as_str()
            .unwrap()
            .contains("HTTP 403"),
        "{}",
        anonymous[0]
    );
    // Its flags, from its command line: no insecure port, kubelet certificates not verified.
    assert_eq!(
        find(
            &doc,
            "apiserver-insecure-port-off",
            "control-plane kube-apiserver",
            None
        )
        .len(),
        1,
        "{doc:#}"
    );
    assert_eq!(
        find(
            &doc,
            "apiserver-kubelet-ca-missing",
            "control-plane kube-apiserver",
            None
        )
        .len(),
        1,
        "{doc:#}"
    );
    // Its etcd answers plain HTTP, to pods too, and counts the cluster's keys for anyone.
    let etcd = find(
        &doc,
        "etcd-plaintext",
        "control-plane 198.19.0.1:2379",
        Some(2379),
    );
    assert_eq!(etcd.len(), 1, "{doc:#}");
    assert!(
        etcd[0]["evidence"].as_str().unwrap().contains("counted"),
        "{}",
        etcd[0]
    );
    assert_eq!(
        find(
            &doc,
            "reachable-from-pods",
            "control-plane 198.19.0.1:2379",
            Some(2379)
        )
        .len(),
        1
    );
    // Its peer port only on loopback.
    assert_eq!(
        find(
            &doc,
            "listening",
            "control-plane 127.0.0.1:2380",
            Some(2380)
        )
        .len(),
        1,
        "{doc:#}"
    );
    assert_eq!(code, 3, "high findings exit 3");

    // The same host audited as a real node would be, from inside it (`--datastore` given):
    // its sockets judged by their binding, its kube-apiserver process, the kubeconfig's server.
    let kubeconfig = lab.dir().join("kubernetes/kubeconfig");
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns("fabric")])
        .arg(common::malla_bin())
        .args(["audit", "-o", "json", "--datastore"])
        .arg(format!("kubernetes:{}", kubeconfig.display()))
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert_eq!(out.status.code(), Some(3), "{doc:#}");
    assert!(doc.get("lab").is_none());
    assert_eq!(doc["probedFromPods"].as_array().unwrap().len(), 0);
    let host = doc["hosts"][0].as_str().unwrap().to_string();
    let exposed = find(
        &doc,
        "listening-on-network",
        &format!("{host} 198.19.0.1:2379"),
        Some(2379),
    );
    assert_eq!(exposed.len(), 1, "{doc:#}");
    assert_eq!(exposed[0]["severity"], "high");
    assert_eq!(
        find(&doc, "etcd-plaintext", &host, Some(2379)).len(),
        1,
        "{doc:#}"
    );
    assert_eq!(
        find(
            &doc,
            "apiserver-kubelet-ca-missing",
            &format!("{host} kube-apiserver"),
            None
        )
        .len(),
        1,
        "{doc:#}"
    );
    assert_eq!(
        find(&doc, "apiserver-anonymous-auth", "", None).len(),
        1,
        "{doc:#}"
    );
}

#[test]
fn the_etcd_lab_datastore_wants_a_client_certificate() {
    let lab = Lab::new(&common::malla_bin(), "ae");
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "etcd"]);
    lab.apply(&common::two_pods_per_node(2));
    let (code, doc, _) = audit(&lab);
    // Pods reach its port, but it refuses whoever shows no certificate of the lab's CA: a
    // medium finding (attack surface), not a high one (an open datastore).
    let refused = find(
        &doc,
        "etcd-client-cert-required",
        "control-plane 198.19.0.1:2379",
        Some(2379),
    );
    assert_eq!(refused.len(), 1, "{doc:#}");
    let reach = find(
        &doc,
        "reachable-from-pods",
        "control-plane 198.19.0.1:2379",
        Some(2379),
    );
    assert_eq!(reach.len(), 1, "{doc:#}");
    assert_eq!(reach[0]["severity"], "medium");
    assert!(find(&doc, "etcd-plaintext", "", None).is_empty(), "{doc:#}");
    assert!(
        find(&doc, "etcd-no-client-cert", "", None).is_empty(),
        "{doc:#}"
    );
    assert_eq!(code, 0, "no high finding: {doc:#}");
    // --fail-on medium makes it a problem.
    let out = lab.try_run(&["audit", "--fail-on", "medium"]);
    assert_eq!(out.status.code(), Some(3));
}
