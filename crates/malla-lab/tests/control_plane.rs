//! The control plane harness against the real binaries (built once by
//! `scripts/k8s-control-plane`; without them this fails and says so): etcd + kube-apiserver +
//! kube-controller-manager on 127.0.0.1 with free ports, no root needed.

use std::time::{Duration, Instant};

use malla_lab::control_plane::Options;
use malla_test_kit::control_plane::{loopback, ControlPlane};
use serde_json::{json, Value};

fn state_dir() -> tempfile::TempDir {
    // tmpfs when there is one: etcd fsyncs every write.
    let b = tempfile::Builder::new().prefix("malla-cp-test").clone();
    if std::path::Path::new("/dev/shm").is_dir() {
        b.tempdir_in("/dev/shm")
    } else {
        b.tempdir()
    }
    .unwrap()
}

fn start(dir: &tempfile::TempDir) -> ControlPlane {
    ControlPlane::start(loopback(dir.path()))
        .unwrap_or_else(|e| panic!("starting the control plane: {e:#}"))
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    cp.kubectl_run(args, None)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

fn apply(cp: &ControlPlane, obj: &Value) {
    cp.kubectl_run(&["apply", "-f", "-"], Some(&obj.to_string()))
        .unwrap_or_else(|e| panic!("applying {obj}: {e:#}"));
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Value {
    try_get_json(cp, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The object, or the error (e.g. NotFound while a controller has yet to create it).
fn try_get_json(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    Ok(serde_json::from_str(&cp.kubectl_run(&a, None)?)?)
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
fn eventually<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn serves_derives_endpoints_and_survives_outages() {
    let dir = state_dir();
    let mut cp = start(&dir);

    // Ready, through the generated kubeconfig (as a flag and as KUBECONFIG).
    assert_eq!(kubectl(&cp, &["get", "--raw", "/readyz"]).trim(), "ok");
    let out = std::process::Command::new(&cp.access().kubectl_bin)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .arg("--cache-dir")
        .arg(dir.path().join("kubectl-cache"))
        .args(["version", "--short"])
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.contains("Server Version: v1.20.2"), "{version}");
    assert!(cp.server_url().starts_with("https://127.0.0.1:"));

    // A pod (already bound to a node: no scheduler) and a Service selecting it. The Node
    // object must exist: 1.20's endpoint-slice controller looks the pod's node up and gives
    // up on the whole Service when it is missing.
    apply(
        &cp,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}}),
    );
    apply(
        &cp,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "web", "image": "example.invalid/web",
                                "ports": [{"name": "http", "containerPort": 8080}]}]
            }
        }),
    );
    apply(
        &cp,
        &json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}
        }),
    );
    let svc = get_json(&cp, &["get", "service", "web"]);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with("198.19."), "{cluster_ip}");

    // What a kubelet would report: an address and Ready. 1.20's kubectl has no
    // --subresource, so the status goes through the raw API.
    let mut pod = get_json(&cp, &["get", "pod", "web-1"]);
    pod["status"] = json!({
        "phase": "Running",
        "podIP": "198.18.0.10",
        "podIPs": [{"ip": "198.18.0.10"}],
        "conditions": [{"type": "Ready", "status": "True"}]
    });
    cp.kubectl_run(
        &[
            "replace",
            "--raw",
            "/api/v1/namespaces/default/pods/web-1/status",
            "-f",
            "-",
        ],
        Some(&pod.to_string()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));

    let endpoints = eventually(60, "the Endpoints of web", || {
        let ep = try_get_json(&cp, &["get", "endpoints", "web"]).ok()?;
        let sub = ep["subsets"].get(0)?.clone();
        Some(sub)
    });
    assert_eq!(
        endpoints["addresses"][0]["ip"], "198.18.0.10",
        "{endpoints}"
    );
    assert_eq!(endpoints["addresses"][0]["nodeName"], "node-1");
    assert_eq!(endpoints["ports"][0]["port"], 8080, "{endpoints}");

    let slice = eventually(60, "an EndpointSlice of web", || {
        let list = get_json(
            &cp,
            &[
                "get",
                "endpointslices.v1beta1.discovery.k8s.io",
                "-l",
                "kubernetes.io/service-name=web",
            ],
        );
        let item = list["items"].get(0)?.clone();
        item["endpoints"].get(0)?;
        Some(item)
    });
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(slice["endpoints"][0]["addresses"], json!(["198.18.0.10"]));
    assert_eq!(slice["endpoints"][0]["conditions"]["ready"], true);
    assert_eq!(slice["ports"][0]["port"], 8080);
    assert_eq!(slice["ports"][0]["name"], "http");

    // An outage: requests fail while the API server is down and succeed once it is back,
    // with the cluster's state intact (it lives in etcd).
    cp.stop_apiserver();
    let err = cp
        .kubectl_run(&["get", "--raw", "/readyz", "--request-timeout=2s"], None)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("refused"),
        "unexpected error while stopped: {err:#}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(cp
        .kubectl_run(&["get", "pods", "--request-timeout=2s"], None)
        .is_err());
    cp.start_apiserver()
        .unwrap_or_else(|e| panic!("restarting the API server: {e:#}"));
    assert_eq!(kubectl(&cp, &["get", "--raw", "/readyz"]).trim(), "ok");
    let pod = get_json(&cp, &["get", "pod", "web-1"]);
    assert_eq!(pod["status"]["podIP"], "198.18.0.10");
    apply(
        &cp,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "after-outage", "namespace": "default"}}),
    );

    // An etcd outage: the API server stays up but is not ready, and recovers on its own once
    // etcd (same data) is back.
    cp.stop_etcd();
    eventually(30, "readyz failing without etcd", || {
        cp.kubectl_run(&["get", "--raw", "/readyz", "--request-timeout=3s"], None)
            .is_err()
            .then_some(())
    });
    cp.start_etcd()
        .unwrap_or_else(|e| panic!("restarting etcd: {e:#}"));
    eventually(60, "readyz after etcd is back", || {
        cp.access().is_ready().then_some(())
    });
    let cm = get_json(&cp, &["get", "configmap", "after-outage"]);
    assert_eq!(cm["metadata"]["name"], "after-outage");

    // Drop stops every process; nothing of ours keeps running.
    let pids = cp.pids();
    drop(cp);
    for pid in [pids.etcd, pids.apiserver, pids.controller_manager]
        .into_iter()
        .flatten()
    {
        assert!(
            !malla_lab::control_plane::is_running(pid, dir.path()),
            "pid {pid} still runs"
        );
    }
}

/// A network namespace of this test (`malla-cp-…`), deleted by exact name on drop.
struct TestNetns(String);

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = malla_dataplane::netns::delete(&self.0);
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The lab's way: detached processes inside a namespace on 198.19.0.1 with the lab's ports,
/// found again by their pids, stopped by them.
#[test]
fn detached_in_a_network_namespace() {
    assert!(
        is_root(),
        "this test needs root (a network namespace); run the suite as root"
    );
    use malla_lab::control_plane::{is_running, start_detached, stop_detached, ControlPlanePids};
    let ns = TestNetns(format!("malla-cp-test-{}", std::process::id()));
    malla_dataplane::netns::create(&ns.0).unwrap();
    // The lab's fabric address, here on the namespace's loopback.
    malla_dataplane::netns::run_ip(&["-n", &ns.0, "addr", "add", "198.19.0.1/32", "dev", "lo"])
        .unwrap();
    let dir = state_dir();
    let opts = Options::in_netns(dir.path(), &ns.0, "198.19.0.1".parse().unwrap());
    assert_eq!(opts.server_url(), "https://198.19.0.1:6443");
    let (pids, access) = start_detached(&opts, &ControlPlanePids::default())
        .unwrap_or_else(|e| panic!("starting detached: {e:#}"));
    // Stop them even if an assertion fails.
    struct Stop<'a>(&'a std::path::Path, ControlPlanePids);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            stop_detached(self.0, &self.1);
        }
    }
    let _stop = Stop(dir.path(), pids);
    let all = [pids.etcd, pids.apiserver, pids.controller_manager];
    assert!(all
        .iter()
        .all(|p| p.is_some_and(|p| is_running(p, dir.path()))));
    assert!(access.is_ready());
    // kubectl runs inside the namespace, where the address is.
    assert_eq!(
        access
            .kubectl_run(&["get", "ns", "kube-system", "-o", "name"], None)
            .unwrap()
            .trim(),
        "namespace/kube-system"
    );

    // Another process (here: another call) finds it from the options alone; starting again
    // keeps what runs.
    let again = malla_lab::control_plane::access(&opts).unwrap();
    assert!(again.is_ready());
    let (same, _) = start_detached(&opts, &pids).unwrap();
    assert_eq!(same, pids);

    stop_detached(dir.path(), &pids);
    for pid in all.into_iter().flatten() {
        assert!(!is_running(pid, dir.path()), "pid {pid} still runs");
    }
}
