//! The lab's etcd (`--datastore etcd`) takes clients with a certificate of the lab's CA only:
//! a pod that reaches its address gets nothing without the client key (plain HTTP, TLS without
//! a certificate, or TLS skipping verification), while the same pod with the key is answered
//! (so the refusals are authentication, not routing). The key files are private.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::Lab;

/// `etcdctl get --prefix /` from `netns` with `args`: (succeeded, output).
fn etcdctl(netns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "etcdctl"])
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(args)
        .args(["get", "--prefix", "/", "--keys-only"])
        .env("ETCDCTL_API", "3")
        .output()
        .expect("etcdctl (Debian package etcd-client)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn etcd_from_a_pod_without_the_client_key_gets_nothing() {
    let lab = Lab::new(&common::malla_bin(), "ea");
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", "etcd"]);
    lab.apply(&common::two_pods_per_node(2));
    let pki = lab.dir().join("etcd-pki");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&pki), 0o700);
    for key in ["ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&pki.join(key)), 0o600, "{key}");
    }
    let pod = lab.netns("pod-default-pod-2a");
    assert!(
        malla_dataplane::netns::exists(&pod),
        "pod namespace {pod} (lab state: {})",
        lab.state()["pods"]
    );
    let (ca, cert, key) = (
        format!("--cacert={}", pki.join("ca.crt").display()),
        format!("--cert={}", pki.join("client.crt").display()),
        format!("--key={}", pki.join("client.key").display()),
    );
    let https = "--endpoints=https://198.19.0.1:2379";
    // With the key, from the pod: answered, and the cluster's keys are there.
    let (ok, out) = etcdctl(&pod, &[https, &ca, &cert, &key]);
    assert!(ok, "with the client key: {out}");
    assert!(out.contains("/nodes/node-1"), "{out}");
    // Without it: nothing, however asked.
    for args in [
        vec!["--endpoints=http://198.19.0.1:2379"],
        vec![https, ca.as_str()],
        vec![https, "--insecure-skip-tls-verify"],
    ] {
        let (ok, out) = etcdctl(&pod, &args);
        assert!(!ok, "{args:?} must fail: {out}");
        assert!(!out.contains("/nodes/"), "{args:?} leaked keys: {out}");
    }
    // A self-made client certificate is not of the lab's CA.
    let dir = tempfile::tempdir().unwrap();
    let (k, c) = common::self_signed(dir.path(), "malla");
    let (ok, out) = etcdctl(
        &pod,
        &[
            https,
            &ca,
            &format!("--cert={}", c.display()),
            &format!("--key={}", k.display()),
        ],
    );
    assert!(!ok, "a self-made client certificate must fail: {out}");
    // The lab still works on it.
    assert!(lab.used_addresses() >= 4);
}
