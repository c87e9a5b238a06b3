//! Malla in a real Kubernetes cluster (issue 17): `malla lab up --kubelet --nodes 3` runs a
//! kubelet and containerd on every node; Malla is installed the way a user installs it,
//! `kubectl apply -f deploy/` (the image from `scripts/build-image`, imported into every
//! node's containerd; `configmap.yaml` edited for the lab as its comments ask). Then: every
//! node turns Ready; pods the kubelet started (the image's `malla lab probe-server` as their
//! command) reach each other across nodes over TCP and UDP without NAT; a pod reaches the API
//! server through the `default/kubernetes` Service with its service-account token; and the
//! machine-wide sysctls the kubelet would set are the machine's own while the lab is up and
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

/// deploy/ as a user edits it for this cluster: the nodes' underlay interface is `ul0`, and
/// the API server before Services work is the lab's (198.19.0.1:6443).
fn deploy_for_lab(dir: &Path) -> PathBuf {
    let out = dir.join("deploy");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir(repo().join("deploy")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), out.join(e.file_name())).unwrap();
    }
    let cm = out.join("configmap.yaml");
    let text = std::fs::read_to_string(&cm).unwrap();
    for needle in [
        "underlayInterface: eth0",
        "data: {}\n  # KUBERNETES_SERVICE_HOST",
    ] {
        assert!(text.contains(needle), "configmap.yaml has {needle:?}");
    }
    let text = text
        .replace("underlayInterface: eth0", "underlayInterface: ul0")
        .replace(
            "data: {}\n  # KUBERNETES_SERVICE_HOST",
            "data:\n  KUBERNETES_SERVICE_HOST: \"198.19.0.1\"\n  KUBERNETES_SERVICE_PORT: \"6443\"\n  # KUBERNETES_SERVICE_HOST",
        );
    std::fs::write(&cm, text).unwrap();
    out
}

fn kubectl(lab: &Lab, args: &[&str]) -> String {
    let mut all = vec!["lab", "kubectl", "--"];
    all.extend_from_slice(args);
    lab.run(&all)
}

/// A pod on `node` running the image's probe server on 8080/tcp and 8080/udp.
fn probe_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: probe}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: probe\n    image: ghcr.io/malla-net/malla:0.1.0\n    imagePullPolicy: Never\n    command: [malla, lab, probe-server, --name, {name}, --listen, \"8080/tcp,8080/udp\"]\n    ports:\n    - containerPort: 8080\n    - containerPort: 8080\n      protocol: UDP\n"
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

/// Runs `f` on a thread inside the network namespace of `pid`.
fn in_netns_of<T: Send + 'static>(pid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    malla_dataplane::netns::NetNs::open(format!("/proc/{pid}/ns/net"))
        .expect("the pod's network namespace")
        .run(f)
        .expect("a thread in the pod's network namespace")
}

/// What the probe server at `to` answered over TCP and over UDP, asked from `pid`'s netns.
fn ask(pid: u32, to: IpAddr) -> (String, String) {
    in_netns_of(pid, move || {
        let t = Duration::from_secs(3);
        let tcp = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&SocketAddr::from((to, 8080)), t)?;
            s.set_read_timeout(Some(t))?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out.trim().to_string())
        })()
        .unwrap_or_else(|e| format!("tcp error: {e}"));
        let udp = (|| -> std::io::Result<String> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(t))?;
            s.send_to(b"probe", (to, 8080))?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })()
        .unwrap_or_else(|e| format!("udp error: {e}"));
        (tcp, udp)
    })
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
    kubectl(
        &lab,
        &[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/malla",
            "--timeout=240s",
        ],
    );
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

    let cgroup = format!("/sys/fs/cgroup/memory/malla-lab-{}", lab.name);
    assert!(Path::new(&cgroup).is_dir(), "{cgroup} while up");
    lab.run(&["lab", "down"]);
    assert!(!Path::new(&cgroup).exists(), "{cgroup} removed by lab down");
    assert_eq!(machine_sysctls(), before, "no machine-wide sysctl changed");
    drop(lab);
    let _ = std::io::stdout().flush();
}
