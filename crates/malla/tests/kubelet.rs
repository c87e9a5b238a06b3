//! Malla in a real Kubernetes cluster (issue 17): `malla lab up --kubelet --nodes 3` runs a
//! kubelet and containerd on every node; Malla is installed the way a user installs it,
//! `kubectl apply -f deploy/` (the image from `scripts/build-image`, imported into every
//! node's containerd; `configmap.yaml` edited for the lab as its comments ask). Then: every
//! node turns Ready; pods the kubelet started (the image's `malla lab probe-server` as their
//! command) reach each other across nodes over TCP and UDP without NAT, their node reaches
//! them and they reach the outside as their node; a Deployment of 3 answers behind a Service
//! through kube-controller-manager's EndpointSlices; a pod reaches the API server through the
//! `default/kubernetes` Service with its service-account token; a rolling update of the
//! DaemonSet keeps a pod-to-pod and a Service stream whole; a NetworkPolicy denies; the lab's
//! own `lab apply`, `get pods`, `probe` and `delete` work on pods the kubelets run;
//! `kubectl delete -f deploy/` leaves every node clean (no Malla table, routes, links or
//! files); and the machine-wide sysctls the kubelet would set are the machine's own while the lab is up and
//! after it is down, as are the lab's cgroups gone.
//!
//! Needs root, the Kubernetes binaries (`scripts/k8s-control-plane`), containerd, runc,
//! buildah and musl-gcc (`scripts/deps`).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{malla_bin, Lab};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use malla_dataplane::netns::NetNs;
use malla_lab::kubelet::KUBELET_SYSCTLS;
use malla_test_kit::runtimes;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The machine's values of the sysctls the kubelet sets.
fn machine_sysctls() -> Vec<(String, String)> {
    KUBELET_SYSCTLS
        .iter()
        .map(|(k, _)| {
            let v = std::fs::read_to_string(format!("/proc/sys/{k}")).expect("sysctl");
            (k.to_string(), v.trim().to_string())
        })
        .collect()
}

/// Malla's image, built by scripts/build-image (static binaries in their own target dir).
fn build_image(out: &Path) {
    let target = std::env::var_os("MALLA_IMAGE_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/malla-image-target".into());
    let status = Command::new(repo().join("scripts/build-image"))
        .arg(out)
        .env("CARGO_TARGET_DIR", target)
        .status()
        .expect("running scripts/build-image");
    assert!(status.success(), "scripts/build-image failed");
}

/// deploy/ as a user edits it for this cluster (the lab's underlay interface and API server).
fn deploy_for_lab(dir: &Path) -> PathBuf {
    malla_lab::kubelet::deploy_for_lab(&repo().join("deploy"), &dir.join("deploy"))
        .expect("deploy/ edited for the lab")
}

fn kubectl(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["lab", "kubectl", "--"];
    all.extend_from_slice(args);
    lab.run(&all)
}

/// A Deployment of 3 probe servers (each named after its pod) and its Service on 8080.
const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: ghcr.io/malla-net/malla:0.1.0
        imagePullPolicy: Never
        command: [malla, lab, probe-server, --name, $(POD_NAME), --listen, \"8080/tcp\"]
        env:
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 8080
    targetPort: 8080
";

/// What `malla lab apply` runs on the cluster: a namespace, pods `a` (node-1), `b` (node-2)
/// and `c` (where the scheduler puts it), a Service in front of `b`, a NodePort Service in
/// front of `a`, and a NetworkPolicy letting only `a` reach `b`. The pods name no image nor
/// command: the lab runs its probe server from the image it imported.
const LAB_APP: &str = "apiVersion: v1
kind: Namespace
metadata: {name: lab}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: lab, labels: {app: a}}
spec:
  nodeName: node-1
  containers:
  - name: probe
    ports:
    - containerPort: 8080
    - {containerPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: lab, labels: {app: b}}
spec:
  nodeName: node-2
  containers:
  - name: probe
    ports:
    - containerPort: 8080
    - {containerPort: 8080, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: lab, labels: {app: c}}
spec:
  containers:
  - name: probe
    ports:
    - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: lab}
spec:
  selector: {app: b}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: lab}
spec:
  type: NodePort
  selector: {app: a}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: lab}
spec:
  podSelector:
    matchLabels: {app: b}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: a}
";

/// `malla lab apply` / `get pods` / `probe` / `delete` on pods the kubelets run ([`LAB_APP`]),
/// beside objects made with kubectl, which the lab leaves alone.
fn lab_tools_on_kubelet_pods(lab: &Lab, dir: &Path) {
    let app = dir.join("lab-app.yaml");
    std::fs::write(&app, LAB_APP).unwrap();
    let app = app.to_str().unwrap();
    let namespace_lab = || {
        kubectl(
            lab,
            &[
                "get",
                "namespace",
                "lab",
                "--ignore-not-found",
                "-o",
                "name",
            ],
        )
    };
    // Malformed: refused with the document and field named, nothing applied.
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{LAB_APP}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: d, namespace: lab}}\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 70000\n"),
    )
    .unwrap();
    let out = lab.try_run(&["lab", "apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("document 8")
            && err.contains("spec.containers[0].ports[0].containerPort"),
        "a bad containerPort is refused with the document and field: {err}"
    );
    std::fs::write(
        &bad,
        LAB_APP.replace("nodeName: node-2", "nodeName: node-9"),
    )
    .unwrap();
    let out = lab.try_run(&["lab", "apply", "-f", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("spec.nodeName: no node \"node-9\""),
        "an unknown node is refused: {err}"
    );
    assert_eq!(
        namespace_lab().trim(),
        "",
        "nothing of a refused apply is kept"
    );

    let t = Instant::now();
    let applied = lab.run(&["lab", "apply", "-f", app]);
    eprintln!(
        "lab apply (3 pods, 2 Services, a NetworkPolicy) on kubelets: {:?}",
        t.elapsed()
    );
    for want in [
        "namespace/lab created",
        "pod/lab/a created",
        "pod/lab/b created",
        "pod/lab/c created",
        "service/lab/b created",
        "networkpolicy/lab/b-from-a created",
    ] {
        assert!(applied.contains(want), "lab apply says {want}: {applied}");
    }
    assert!(
        lab.run(&["lab", "apply", "-f", app])
            .contains("pod/lab/a unchanged"),
        "a second apply changes nothing"
    );

    // The API server has them, the kubelets run them, `lab get pods` shows them.
    let api: Value =
        serde_json::from_str(&kubectl(lab, &["get", "pods", "-n", "lab", "-o", "json"])).unwrap();
    let api_pods = api["items"].as_array().unwrap();
    assert_eq!(api_pods.len(), 3, "3 pods in the API server: {api}");
    let got: Value = serde_json::from_str(&lab.run(&["lab", "get", "pods", "-o", "json"])).unwrap();
    let got = got.as_array().expect("a list of pods");
    assert_eq!(got.len(), 3, "lab get pods: {got:?}");
    for p in api_pods {
        let name = p["metadata"]["name"].as_str().unwrap();
        let mine = got
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("lab get pods shows {name}: {got:?}"));
        assert_eq!(mine["namespace"], "lab");
        assert_eq!(mine["node"], p["spec"]["nodeName"], "{name}'s node");
        assert_eq!(mine["ips"][0], p["status"]["podIP"], "{name}'s address");
        assert!(
            mine["ips"][0].as_str().unwrap().starts_with("198.18."),
            "{name} has a pool address: {mine}"
        );
        let c = &p["spec"]["containers"][0];
        assert_eq!(
            c["command"][2], "probe-server",
            "{name} runs the probe server: {c}"
        );
        assert_eq!(
            p["status"]["containerStatuses"][0]["ready"], true,
            "{name} is Ready"
        );
    }
    assert_eq!(
        got.iter().find(|g| g["name"] == "a").unwrap()["node"],
        "node-1"
    );
    assert_eq!(
        got.iter().find(|g| g["name"] == "b").unwrap()["node"],
        "node-2"
    );

    // From a: every pod, the Service and the outside; pods and Service without NAT.
    let from_a = lab.probe(&["--from", "lab/a"]);
    let targets: std::collections::BTreeSet<&str> =
        from_a.iter().map(|r| r["to"].as_str().unwrap()).collect();
    for want in ["lab/b", "lab/c", "svc/lab/b", "svc/lab/a", "external"] {
        assert!(targets.contains(want), "lab/a probes {want}: {targets:?}");
    }
    for r in &from_a {
        assert_eq!(r["connected"], true, "from lab/a: {r}");
        let nat = r["clientIp"] != r["seenSourceIp"];
        // (a through its own Service may come back hairpinned: either is right.)
        if r["to"] != "svc/lab/a" {
            assert_eq!(nat, r["to"] == "external", "NAT only to the outside: {r}");
        }
    }
    // c -> b: the policy denies it, on the pod and through the Service; `lab probe` says so.
    for to in ["lab/b", "svc/lab/b"] {
        let out = lab.try_run(&[
            "lab",
            "probe",
            "--from",
            "lab/c",
            "--to",
            to,
            "--timeout-ms",
            "700",
        ]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(3),
            "lab/c -> {to} does not connect: {table}"
        );
        assert!(
            table.contains("denied") && !table.contains("FAIL") && !table.contains(" ok"),
            "lab/c -> {to} reads denied: {table}"
        );
    }
    let b_to_c = lab.probe(&["--from", "lab/b", "--to", "lab/c"]);
    assert!(
        !b_to_c.is_empty() && b_to_c.iter().all(|r| r["connected"] == true),
        "lab/b -> lab/c: {b_to_c:?}"
    );
    // Nodes reach their own pods; the outside reaches a through its node port on every node.
    let from_node = lab.probe(&["--from", "node/node-1", "--to", "lab/a"]);
    assert!(
        from_node.len() == 2 && from_node.iter().all(|r| r["connected"] == true),
        "node-1 -> lab/a: {from_node:?}"
    );
    let from_outside = lab.probe(&["--from", "external"]);
    assert_eq!(
        from_outside.len(),
        3,
        "a node port on each node: {from_outside:?}"
    );
    for r in &from_outside {
        assert_eq!(r["connected"], true, "external -> {}: {r}", r["to"]);
        assert_eq!(r["answeredBy"], "lab/a", "{r}");
    }

    // Deleted through the API server; what kubectl made stays.
    let deleted = lab.run(&["lab", "delete", "-f", app]);
    for want in [
        "pod/lab/a deleted",
        "service/lab/b deleted",
        "networkpolicy/lab/b-from-a deleted",
        "namespace/lab deleted",
    ] {
        assert!(deleted.contains(want), "lab delete says {want}: {deleted}");
    }
    let left = kubectl(lab, &["get", "pods", "-n", "lab", "-o", "name"]);
    assert_eq!(left.trim(), "", "the kubelets stopped the lab's pods");
    let got: Value = serde_json::from_str(&lab.run(&["lab", "get", "pods", "-o", "json"])).unwrap();
    assert_eq!(got.as_array().map(Vec::len), Some(0), "lab get pods: {got}");
    let kept = kubectl(
        lab,
        &[
            "get",
            "service/web",
            "service/sink",
            "networkpolicy/only-probe-3",
            "pod/probe-1",
            "-o",
            "name",
        ],
    );
    assert_eq!(kept.lines().count(), 4, "kubectl's objects stay: {kept}");
}

/// Waits until the DaemonSet is rolled out on every node.
fn rollout_status(lab: &Lab) {
    kubectl(
        lab,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/malla",
            "--timeout=240s",
        ],
    );
}

/// A pod on `node` running the image's probe server on 8080/tcp and 8080/udp.
fn probe_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: probe, name: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: probe\n    image: ghcr.io/malla-net/malla:0.1.0\n    imagePullPolicy: Never\n    command: [malla, lab, probe-server, --name, {name}, --listen, \"8080/tcp,8080/udp\"]\n    ports:\n    - containerPort: 8080\n    - containerPort: 8080\n      protocol: UDP\n"
    )
}

/// The pid of the probe server of pod `name` (its container's process: in the pod's network
/// namespace, with the pod's volumes).
fn probe_pid(name: &str) -> Option<u32> {
    let needle = format!("probe-server\0--name\0{name}\0");
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(&needle)
            .then_some(pid)
    })
}

/// What the probe server at `to` answered over TCP and over UDP, asked from `pid`'s netns.
fn ask(pid: u32, to: IpAddr) -> (String, String) {
    ask_in(
        NetNs::open(format!("/proc/{pid}/ns/net")).expect("the pod's network namespace"),
        to,
    )
}

/// What the probe server at `to` answered over TCP and over UDP, asked from `ns`.
fn ask_in(ns: NetNs, to: IpAddr) -> (String, String) {
    let t = Duration::from_secs(3);
    ns.run(move || (tcp_answer(to, t), udp_answer(to, t)))
        .expect("a thread in the namespace")
}

/// The TCP answer of the probe server at `to` (port 8080), asked from `pid`'s netns.
fn ask_tcp(pid: u32, to: IpAddr) -> String {
    NetNs::open(format!("/proc/{pid}/ns/net"))
        .expect("the pod's network namespace")
        .run(move || tcp_answer(to, Duration::from_millis(1500)))
        .expect("a thread in the pod's network namespace")
}

/// What the probe server at `to`:8080 answers over TCP (from this thread's namespace).
fn tcp_answer(to: IpAddr, t: Duration) -> String {
    (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::from((to, 8080)), t)?;
        s.set_read_timeout(Some(t))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })()
    .unwrap_or_else(|e| format!("tcp error: {e}"))
}

/// What the probe server at `to`:8080 answers over UDP (from this thread's namespace).
fn udp_answer(to: IpAddr, t: Duration) -> String {
    (|| -> std::io::Result<String> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(t))?;
        s.send_to(b"probe", (to, 8080))?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })()
    .unwrap_or_else(|e| format!("udp error: {e}"))
}

/// A TCP stream from `from_pid`'s network namespace to `to` (a sink listening on `sink_port`
/// in `sink_pid`'s): the sender connects (retrying for 30 s), then writes a 4 KiB block every
/// 5 ms until [`Stream::finish`].
struct Stream {
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<std::io::Result<u64>>,
    sink: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl Stream {
    fn start(from_pid: u32, sink_pid: u32, sink_port: u16, to: SocketAddr) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let sink_ns = NetNs::open(format!("/proc/{sink_pid}/ns/net")).expect("sink netns");
        let sink = std::thread::spawn(move || -> std::io::Result<u64> {
            sink_ns.enter_this_thread().expect("enter the sink's netns");
            let l = TcpListener::bind(("0.0.0.0", sink_port))?;
            tx.send(()).expect("ready");
            common::count_until_eof(&l)
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("sink listening");
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let from_ns = NetNs::open(format!("/proc/{from_pid}/ns/net")).expect("sender netns");
        let sender = std::thread::spawn(move || -> std::io::Result<u64> {
            from_ns
                .enter_this_thread()
                .expect("enter the sender's netns");
            // A new Service's rules reach the agents a moment after it is created.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut s = loop {
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            let block = vec![0x5au8; 4096];
            let mut sent = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                s.write_all(&block)?;
                sent += block.len() as u64;
                std::thread::sleep(Duration::from_millis(5));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        Self { stop, sender, sink }
    }

    /// Stops the sender; (bytes sent, bytes received), panicking if either side failed.
    fn finish(self, what: &str) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let sent = self.sender.join().unwrap();
        let sent = sent.unwrap_or_else(|e| panic!("{what}: the sender failed: {e}"));
        let received = self.sink.join().unwrap();
        let received = received.unwrap_or_else(|e| panic!("{what}: the sink failed: {e}"));
        (sent, received)
    }
}

/// The containerd socket of a node of `lab`.
fn containerd_sock(lab: &Lab, node: &str) -> PathBuf {
    lab.state_root
        .path()
        .join(&lab.name)
        .join("nodes")
        .join(node)
        .join("k8s/containerd.sock")
}

/// What Malla put on lab node `node` and is still there: its nftables table, routes stamped
/// with its protocol, its VXLAN device and pod veths, the CNI files install-cni wrote and the
/// agent's ready file.
fn malla_leftovers(lab: &Lab, node: &str) -> Vec<String> {
    let ns = format!("malla-{}-{node}", lab.name);
    let run = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?} in {ns}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut left = Vec::new();
    if run(&["nft", "list", "tables"])
        .lines()
        .any(|l| l.trim() == "table inet malla")
    {
        left.push("table inet malla".to_string());
    }
    for family in ["-4", "-6"] {
        for r in run(&["ip", family, "route", "show", "proto", "77"]).lines() {
            left.push(format!("route {r}"));
        }
    }
    for l in run(&["ip", "-o", "link", "show"]).lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or("");
        if name == "malla.vxlan" || name.starts_with("mla") {
            left.push(format!("link {name}"));
        }
    }
    let dir = lab
        .state_root
        .path()
        .join(&lab.name)
        .join("nodes")
        .join(node);
    for f in [
        "net.d/10-malla.conflist",
        "net.d/malla-kubeconfig",
        "net.d/malla-ca.crt",
        "opt/cni/bin/malla",
        "run-malla/agent.ready",
    ] {
        if dir.join(f).exists() {
            left.push(f.to_string());
        }
    }
    left
}

#[test]
fn malla_from_deploy_runs_pods_the_kubelet_starts() {
    common::require_root();
    runtimes::require_tools(&["containerd", "ctr", "runc", "buildah", "musl-gcc", "curl"]);
    let before = machine_sysctls();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("malla-image.tar");
    build_image(&image);
    let deploy = deploy_for_lab(dir.path());

    let lab = Lab::new(&malla_bin(), "kub");
    let t = Instant::now();
    lab.run(&[
        "lab",
        "up",
        "--kubelet",
        "--nodes",
        "3",
        "--image",
        image.to_str().unwrap(),
    ]);
    eprintln!("lab up --kubelet --nodes 3: {:?}", t.elapsed());
    assert_eq!(
        machine_sysctls(),
        before,
        "the kubelets changed no machine-wide sysctl"
    );
    let nodes = kubectl(&lab, &["get", "nodes", "-o", "json"]);
    let nodes: Value = serde_json::from_str(&nodes).unwrap();
    assert_eq!(
        nodes["items"].as_array().unwrap().len(),
        3,
        "3 nodes registered"
    );

    // Installed as the README says.
    let t = Instant::now();
    kubectl(&lab, &["apply", "-f", deploy.to_str().unwrap()]);
    rollout_status(&lab);
    kubectl(
        &lab,
        &[
            "wait",
            "--for=condition=Ready",
            "node",
            "--all",
            "--timeout=120s",
        ],
    );
    eprintln!(
        "kubectl apply -f deploy/ to every node Ready: {:?}",
        t.elapsed()
    );
    // `lab get nodes` sees the DaemonSet's agents.
    let got: Value =
        serde_json::from_str(&lab.run(&["lab", "get", "nodes", "-o", "json"])).unwrap();
    for n in got.as_array().expect("a list of nodes") {
        assert_eq!(n["agentRunning"], true, "lab get nodes: {n}");
    }

    // Pods the kubelet starts, one per node.
    let names = ["probe-1", "probe-2", "probe-3"];
    let manifest: String = names
        .iter()
        .enumerate()
        .map(|(i, n)| probe_pod(n, &format!("node-{}", i + 1)))
        .collect();
    let f = dir.path().join("pods.yaml");
    std::fs::write(&f, manifest).unwrap();
    let t = Instant::now();
    kubectl(&lab, &["apply", "-f", f.to_str().unwrap()]);
    kubectl(
        &lab,
        &[
            "wait",
            "--for=condition=Ready",
            "pod",
            "-l",
            "app=probe",
            "--timeout=120s",
        ],
    );
    eprintln!("3 pods Ready: {:?}", t.elapsed());
    let pods: Value = serde_json::from_str(&kubectl(
        &lab,
        &["get", "pods", "-l", "app=probe", "-o", "json"],
    ))
    .unwrap();
    let ip_of = |name: &str| -> IpAddr {
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["metadata"]["name"] == name)
            .and_then(|p| p["status"]["podIP"].as_str())
            .unwrap_or_else(|| panic!("{name} has an IP: {pods}"))
            .parse()
            .unwrap()
    };
    let pid_of = |name: &str| probe_pid(name).unwrap_or_else(|| panic!("{name}'s process"));
    for n in names {
        let ip = ip_of(n);
        assert!(
            matches!(ip, IpAddr::V4(a) if a.octets()[..2] == [198, 18]),
            "{n}'s address {ip} is from the lab's pool"
        );
    }
    // Every pair across nodes, both ways: the answer names the target and the source address
    // it saw is the client pod's own (no NAT).
    for from in names {
        for to in names.iter().filter(|t| **t != from) {
            let (tcp, udp) = ask(pid_of(from), ip_of(to));
            let want = format!("{to} {}", ip_of(from));
            assert_eq!(tcp, want, "TCP {from} -> {to}");
            assert_eq!(udp, want, "UDP {from} -> {to}");
        }
    }

    // A node reaches its own pods; a pod reaches the outside as its node (masqueraded).
    let node1 = NetNs::open_named(&format!("malla-{}-node-1", lab.name)).expect("node-1");
    let (tcp, udp) = ask_in(node1, ip_of("probe-1"));
    assert!(
        tcp.starts_with("probe-1 ") && udp.starts_with("probe-1 "),
        "node-1 -> probe-1: {tcp} / {udp}"
    );
    let (tcp, udp) = ask(pid_of("probe-1"), "198.19.1.2".parse().unwrap());
    assert_eq!(
        tcp, "external 198.19.0.11",
        "TCP probe-1 -> external, as node-1"
    );
    assert_eq!(
        udp, "external 198.19.0.11",
        "UDP probe-1 -> external, as node-1"
    );

    // A Deployment of 3 behind a Service, through kube-controller-manager's EndpointSlices.
    let web = dir.path().join("web.yaml");
    std::fs::write(&web, WEB).unwrap();
    kubectl(&lab, &["apply", "-f", web.to_str().unwrap()]);
    kubectl(
        &lab,
        &["rollout", "status", "deployment/web", "--timeout=120s"],
    );
    let slices: Value = serde_json::from_str(&kubectl(
        &lab,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "json",
        ],
    ))
    .unwrap();
    let endpoints: usize = slices["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(
        endpoints, 3,
        "the controller's EndpointSlices hold the 3 replicas: {slices}"
    );
    let web_ip: IpAddr = kubectl(
        &lab,
        &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"],
    )
    .trim()
    .parse()
    .unwrap();
    let mut answered = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.len() < 2 && Instant::now() < deadline {
        let a = ask_tcp(pid_of("probe-1"), web_ip);
        if let Some((name, source)) = a.split_once(' ') {
            assert!(name.starts_with("web-"), "a web replica answered: {a}");
            assert_eq!(
                source,
                ip_of("probe-1").to_string(),
                "no NAT of the client: {a}"
            );
            answered.insert(name.to_string());
        }
    }
    assert!(
        answered.len() >= 2,
        "several replicas answer the ClusterIP: {answered:?}"
    );

    // The API server through the `kubernetes` Service, with the pod's own token.
    let pid = pid_of("probe-1");
    let sa = format!("/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount");
    let token = std::fs::read_to_string(format!("{sa}/token")).expect("the pod's token");
    let svc = kubectl(
        &lab,
        &[
            "get",
            "service",
            "kubernetes",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    let curl = |path: &str| {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["curl", "-sS", "--max-time", "10", "--cacert"])
            .arg(format!("{sa}/ca.crt"))
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .arg(format!("https://{}:443{path}", svc.trim()))
            .output()
            .expect("curl");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let api = curl("/api");
    assert!(api.contains("\"kind\": \"APIVersions\""), "GET /api: {api}");
    let pods = curl("/api/v1/namespaces/kube-system/secrets");
    assert!(
        pods.contains("system:serviceaccount:default:default"),
        "the API server knows the pod's service account: {pods}"
    );
    assert_eq!(machine_sysctls(), before, "no machine-wide sysctl changed");

    // Day 2: a rolling update of the DaemonSet to a new tag keeps a pod-to-pod stream across
    // nodes and a stream through a Service, every byte, and every pod its address.
    let svc_yaml = dir.path().join("svc.yaml");
    std::fs::write(
        &svc_yaml,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: sink\nspec:\n  selector: {name: probe-3}\n  ports:\n  - port: 80\n    targetPort: 9001\n",
    )
    .unwrap();
    // The Service's endpoint is probe-3, on node-3; its sink below listens on 9001.
    kubectl(&lab, &["apply", "-f", svc_yaml.to_str().unwrap()]);
    let sink_ip: IpAddr = kubectl(
        &lab,
        &["get", "service", "sink", "-o", "jsonpath={.spec.clusterIP}"],
    )
    .trim()
    .parse()
    .unwrap();
    let direct = Stream::start(
        pid_of("probe-1"),
        pid_of("probe-2"),
        9000,
        SocketAddr::from((ip_of("probe-2"), 9000)),
    );
    let via_service = Stream::start(
        pid_of("probe-1"),
        pid_of("probe-3"),
        9001,
        SocketAddr::from((sink_ip, 80)),
    );
    for n in 1..=3 {
        let sock = containerd_sock(&lab, &format!("node-{n}"));
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", "k8s.io", "images", "tag", "--force"])
            .args([
                "ghcr.io/malla-net/malla:0.1.0",
                "ghcr.io/malla-net/malla:0.1.1",
            ])
            .output()
            .expect("ctr");
        assert!(out.status.success(), "ctr images tag: {out:?}");
    }
    let t = Instant::now();
    kubectl(
        &lab,
        &[
            "-n",
            "kube-system",
            "set",
            "image",
            "daemonset/malla",
            "agent=ghcr.io/malla-net/malla:0.1.1",
            "install-cni=ghcr.io/malla-net/malla:0.1.1",
        ],
    );
    rollout_status(&lab);
    eprintln!(
        "rolling update of the DaemonSet (3 nodes): {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (sent, received) = direct.finish("probe-1 -> probe-2");
    assert!(
        sent > 0 && sent == received,
        "pod to pod: sent {sent}, received {received}"
    );
    let (sent, received) = via_service.finish("probe-1 -> svc/sink -> probe-3");
    assert!(
        sent > 0 && sent == received,
        "through the Service: sent {sent}, received {received}"
    );
    eprintln!("streams through the rollout: every byte delivered");
    let after: Value = serde_json::from_str(&kubectl(
        &lab,
        &["get", "pods", "-l", "app=probe", "-o", "json"],
    ))
    .unwrap();
    for n in names {
        let now = after["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["metadata"]["name"] == n)
            .and_then(|p| p["status"]["podIP"].as_str())
            .map(|s| s.parse::<IpAddr>().unwrap());
        assert_eq!(now, Some(ip_of(n)), "{n} kept its address");
    }
    let (tcp, _) = ask(pid_of("probe-1"), ip_of("probe-2"));
    assert_eq!(
        tcp,
        format!("probe-2 {}", ip_of("probe-1")),
        "after the rollout"
    );

    // A NetworkPolicy: only probe-3 may reach probe-2.
    let np = dir.path().join("np.yaml");
    std::fs::write(
        &np,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: only-probe-3\nspec:\n  podSelector:\n    matchLabels: {name: probe-2}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - podSelector:\n        matchLabels: {name: probe-3}\n",
    )
    .unwrap();
    kubectl(&lab, &["apply", "-f", np.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let denied = loop {
        let a = ask_tcp(pid_of("probe-1"), ip_of("probe-2"));
        if a.starts_with("tcp error") || Instant::now() > deadline {
            break a;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        denied.starts_with("tcp error"),
        "probe-1 -> probe-2 denied: {denied}"
    );
    let allowed = ask_tcp(pid_of("probe-3"), ip_of("probe-2"));
    assert_eq!(
        allowed,
        format!("probe-2 {}", ip_of("probe-3")),
        "probe-3 -> probe-2 allowed"
    );

    lab_tools_on_kubelet_pods(&lab, dir.path());

    // Day 2, last: `kubectl delete -f deploy/` leaves every node clean. Each agent, on SIGTERM,
    // finds its DaemonSet gone and removes what Malla put on the node (pods still running there
    // lose their veths: their network went with Malla).
    let nodes = ["node-1", "node-2", "node-3"];
    for n in nodes {
        let have = malla_leftovers(&lab, n);
        for want in [
            "table inet malla",
            "net.d/10-malla.conflist",
            "opt/cni/bin/malla",
        ] {
            assert!(
                have.iter().any(|h| h == want),
                "{n} has {want} while installed: {have:?}"
            );
        }
        assert!(
            have.iter().any(|h| h.starts_with("route ")),
            "{n} has Malla's routes: {have:?}"
        );
    }
    let t = Instant::now();
    kubectl(&lab, &["delete", "-f", deploy.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let agents = kubectl(
            &lab,
            &[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=malla",
                "-o",
                "name",
            ],
        );
        let left: Vec<(&str, Vec<String>)> = nodes
            .iter()
            .map(|n| (*n, malla_leftovers(&lab, n)))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if (agents.trim().is_empty() && left.is_empty()) || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        left.is_empty(),
        "after kubectl delete -f deploy/, left on the nodes: {left:?}"
    );
    eprintln!(
        "kubectl delete -f deploy/ to every node clean: {:?}",
        t.elapsed()
    );

    let cgroup = format!("/sys/fs/cgroup/memory/malla-lab-{}", lab.name);
    assert!(Path::new(&cgroup).is_dir(), "{cgroup} while up");
    lab.run(&["lab", "down"]);
    assert!(!Path::new(&cgroup).exists(), "{cgroup} removed by lab down");
    assert_eq!(machine_sysctls(), before, "no machine-wide sysctl changed");
    drop(lab);
    let _ = std::io::stdout().flush();
}
