//! The lab's pods on a `lab up --kubelet` lab: `lab apply` creates them through the API
//! server as real pod specs (the image's `malla lab probe-server` as the container's command,
//! serving the pod's declared ports), the scheduler places them, the node's kubelet starts
//! them through containerd and Malla's CNI plugin; `lab delete` deletes them through the API
//! server. `lab probe` enters a pod's network namespace through its container's process: the
//! container ID the API server reports, its task's pid in the node's containerd.
//!
//! What differs from the plain lab's pods: the node is the scheduler's choice unless
//! `spec.nodeName` is given; the container image is the Malla image `lab up --image` imported
//! (any other `image` or `command` of the manifest is not used: the lab's pods run its probe
//! server); a pod keeps running until deleted even when the lab's commands are not asked.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::control_plane::Access;
use crate::kubelet::{self, NodeFiles};
use crate::manifest::PodSpec;
use crate::state::{LabPaths, LabState, PodState};

/// How long `lab apply` waits for its pods to be Ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the probe server writes its ready file inside the container.
const READY_FILE: &str = "/tmp/malla-probe.ready";

/// The lab's kubectl (admin kubeconfig, from the fabric namespace).
pub fn access(paths: &LabPaths, state: &LabState) -> anyhow::Result<Access> {
    crate::control_plane::access(&crate::store::control_plane_options(
        paths,
        &state.fabric_netns,
    ))
}

/// The Malla image the nodes have (imported by `lab up --image`): a reference in the first
/// node's containerd whose repository ends in `/malla`.
pub fn probe_image(paths: &LabPaths, state: &LabState) -> anyhow::Result<String> {
    let node = state.nodes.first().context("the lab has no nodes")?;
    let sock = NodeFiles::new(paths, &node.name).containerd_sock();
    let listed = kubelet::ctr(&sock, &["images", "ls", "-q"])?;
    let mut found: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|r| {
            r.rsplit_once(':')
                .is_some_and(|(repo, _)| repo == "malla" || repo.ends_with("/malla"))
        })
        .collect();
    found.sort_unstable();
    found.first().map(|s| s.to_string()).with_context(|| {
        format!(
            "{}'s containerd holds no Malla image to run the probe server: bring the lab up with \
             `--image` (an archive from scripts/build-image)",
            node.name
        )
    })
}

/// The pod as the API server gets it: the manifest's metadata, node, host network and ports
/// (written as the Kubernetes datastore writes a pod, `malla_api::k8s::write::pod`); its one
/// container runs the probe server from `image`.
pub fn pod_manifest(spec: &PodSpec, image: &str) -> Value {
    let listen: Vec<String> = spec
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol))
        .collect();
    let api = malla_api::Pod {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        labels: spec.labels.clone(),
        node: spec.node_name.clone().unwrap_or_default(),
        ports: spec
            .ports
            .iter()
            .map(|p| malla_api::ContainerPort {
                name: p.name.clone(),
                protocol: match p.protocol.as_str() {
                    "udp" => malla_api::service::Protocol::Udp,
                    _ => malla_api::service::Protocol::Tcp,
                },
                port: p.port,
            })
            .collect(),
        ips: Vec::new(),
        allowed_source_prefixes: spec.allowed_source_prefixes.clone(),
        host_network: spec.host_network,
    };
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace},
    });
    malla_api::k8s::write::pod(&api, &mut pod, false);
    let pod_spec = &mut pod["spec"];
    if spec.node_name.is_none() {
        // The scheduler's to choose.
        pod_spec.as_object_mut().map(|s| s.remove("nodeName"));
    }
    pod_spec["terminationGracePeriodSeconds"] = json!(1);
    pod_spec["enableServiceLinks"] = json!(false);
    let container = &mut pod_spec["containers"][0];
    container["name"] = json!("probe");
    container["image"] = json!(image);
    container["imagePullPolicy"] = json!("Never");
    container["command"] = json!([
        "malla",
        "lab",
        "probe-server",
        "--name",
        spec.key(),
        "--listen",
        listen.join(","),
        "--ready-file",
        READY_FILE,
    ]);
    pod
}

/// Creates (or relabels) `specs` through the API server and waits until each is Ready and its
/// probe server listens; returns their state. On failure the pods this call created are
/// deleted again.
pub fn apply(
    paths: &LabPaths,
    state: &LabState,
    specs: &[&PodSpec],
) -> anyhow::Result<Vec<PodState>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let access = access(paths, state)?;
    let image = probe_image(paths, state)?;
    let items: Vec<Value> = specs.iter().map(|s| pod_manifest(s, &image)).collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    let fresh: Vec<String> = specs
        .iter()
        .filter(|s| !state.pods.contains_key(&s.key()))
        .map(|s| s.key())
        .collect();
    let result = access
        .kubectl_run(&["apply", "-f", "-"], Some(&list))
        .context("creating the pods through the API server")
        .and_then(|_| wait_ready(paths, &access, specs));
    if result.is_err() {
        let _ = delete(paths, state, &fresh);
    }
    result
}

/// One pod as the API server reports it.
struct Reported {
    node: String,
    ips: Vec<IpAddr>,
    ready: bool,
    /// The probe container's ID in its node's containerd.
    container_id: Option<String>,
}

/// Every pod of the cluster, by `namespace/name`.
fn list_pods(access: &Access) -> anyhow::Result<BTreeMap<String, Reported>> {
    let out = access.kubectl_run(&["get", "pods", "--all-namespaces", "-o", "json"], None)?;
    let v: Value = serde_json::from_str(&out).context("kubectl get pods: not JSON")?;
    let mut pods = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        let key = format!(
            "{}/{}",
            p["metadata"]["namespace"].as_str().unwrap_or_default(),
            p["metadata"]["name"].as_str().unwrap_or_default()
        );
        let status = &p["status"];
        let ips = status["podIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["ip"].as_str()?.parse().ok())
            .collect();
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let container_id = status["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == "probe")
            .and_then(|c| c["containerID"].as_str())
            .and_then(|id| id.strip_prefix("containerd://"))
            .map(str::to_string);
        pods.insert(
            key,
            Reported {
                node: p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ips,
                ready,
                container_id,
            },
        );
    }
    Ok(pods)
}

/// The pid of every running task in `node`'s containerd, by container ID.
fn task_pids(paths: &LabPaths, node: &str) -> anyhow::Result<BTreeMap<String, u32>> {
    let sock = NodeFiles::new(paths, node).containerd_sock();
    let out = kubelet::ctr(&sock, &["tasks", "ls"])?;
    Ok(out
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.to_string();
            let pid: u32 = f.next()?.parse().ok()?;
            (f.next()? == "RUNNING").then_some((id, pid))
        })
        .collect())
}

/// The network namespace of a kubelet pod's container `pid`, as the lab's probes open it
/// (`NetNs::open_named` of an absolute path opens that path).
fn netns_of(pid: u32) -> String {
    format!("/proc/{pid}/ns/net")
}

fn wait_ready(
    paths: &LabPaths,
    access: &Access,
    specs: &[&PodSpec],
) -> anyhow::Result<Vec<PodState>> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let reported = list_pods(access)?;
        let mut pids: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        let mut done = Vec::new();
        let mut waiting = Vec::new();
        for spec in specs {
            let key = spec.key();
            let Some(r) = reported.get(&key).filter(|r| r.ready && !r.ips.is_empty()) else {
                waiting.push(format!("{key} (not Ready)"));
                continue;
            };
            if !pids.contains_key(&r.node) {
                pids.insert(r.node.clone(), task_pids(paths, &r.node)?);
            }
            let pid = r
                .container_id
                .as_ref()
                .and_then(|id| pids[&r.node].get(id).copied());
            let listening = spec.ports.is_empty()
                || pid.is_some_and(|p| Path::new(&format!("/proc/{p}/root{READY_FILE}")).exists());
            let (Some(pid), true) = (pid, listening) else {
                waiting.push(format!("{key} (probe server not listening yet)"));
                continue;
            };
            let (labels, ports) = (spec.labels.clone(), spec.ports.clone());
            done.push(PodState {
                namespace: spec.namespace.clone(),
                name: spec.name.clone(),
                node: r.node.clone(),
                netns: netns_of(pid),
                container_id: r.container_id.clone().unwrap_or_default(),
                ips: r.ips.clone(),
                ports,
                labels,
                probe_pid: None,
                allowed_source_prefixes: spec.allowed_source_prefixes.clone(),
                host_network: spec.host_network,
            });
        }
        if waiting.is_empty() {
            return Ok(done);
        }
        if Instant::now() > deadline {
            bail!(
                "pods not running after {READY_TIMEOUT:?}: {} (see `malla lab kubectl -- describe pod`)",
                waiting.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Deletes pods (`namespace/name`) through the API server and waits until they are gone (the
/// kubelet has stopped them and called the plugin's DEL).
pub fn delete(paths: &LabPaths, state: &LabState, keys: &[String]) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let access = access(paths, state)?;
    let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for k in keys {
        let (ns, name) = k.split_once('/').unwrap_or(("default", k));
        by_namespace.entry(ns).or_default().push(name);
    }
    for (ns, names) in by_namespace {
        let mut args = vec![
            "delete",
            "pod",
            "-n",
            ns,
            "--ignore-not-found",
            "--wait",
            "--timeout=120s",
        ];
        args.extend(names);
        access.kubectl_run(&args, None)?;
    }
    Ok(())
}

/// Brings the lab's record of its kubelet pods up to date with the cluster: each pod's node,
/// addresses, container and the network namespace its probes enter (a restarted container is
/// another process). Pods gone from the API server drop out of `state`.
pub fn refresh(paths: &LabPaths, state: &mut LabState) -> anyhow::Result<()> {
    if state.pods.is_empty() {
        return Ok(());
    }
    let reported = list_pods(&access(paths, state)?)?;
    let mut pids: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    let mut gone = Vec::new();
    for (key, pod) in state.pods.iter_mut() {
        let Some(r) = reported.get(key) else {
            gone.push(key.clone());
            continue;
        };
        if !r.node.is_empty() && !pids.contains_key(&r.node) {
            pids.insert(
                r.node.clone(),
                task_pids(paths, &r.node).unwrap_or_default(),
            );
        }
        pod.node = r.node.clone();
        if !r.ips.is_empty() {
            pod.ips = r.ips.clone();
        }
        if let Some(id) = &r.container_id {
            pod.container_id = id.clone();
            if let Some(pid) = pids.get(&r.node).and_then(|p| p.get(id)) {
                pod.netns = netns_of(*pid);
            }
        }
    }
    for key in gone {
        state.pods.remove(&key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pod manifest of the one pod in `yaml`.
    fn manifest_of(yaml: &str, image: &str) -> Value {
        let objs = crate::manifest::parse(yaml).expect("a valid manifest");
        let crate::manifest::Object::Pod(spec) = &objs[0] else {
            panic!("a pod")
        };
        pod_manifest(spec, image)
    }

    #[test]
    fn pod_manifest_runs_the_probe_server_on_the_declared_ports() {
        let m = manifest_of(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  namespace: shop\n  labels: {app: a}\n  annotations: {malla.dev/allowed-source-prefixes: 198.18.9.0/24}\nspec:\n  nodeName: node-2\n  containers:\n  - name: c\n    image: busybox\n    ports:\n    - {containerPort: 80, name: http}\n    - {containerPort: 53, protocol: UDP}\n",
            "ghcr.io/malla-net/malla:0.1.0",
        );
        assert_eq!(m["metadata"]["namespace"], "shop");
        assert_eq!(m["metadata"]["labels"]["app"], "a");
        assert_eq!(
            m["metadata"]["annotations"]["malla.dev/allowed-source-prefixes"],
            "198.18.9.0/24"
        );
        assert_eq!(m["spec"]["nodeName"], "node-2");
        assert_eq!(m["spec"]["hostNetwork"], Value::Null);
        let c = &m["spec"]["containers"][0];
        assert_eq!(c["image"], "ghcr.io/malla-net/malla:0.1.0");
        assert_eq!(
            c["command"],
            json!([
                "malla",
                "lab",
                "probe-server",
                "--name",
                "shop/a",
                "--listen",
                "80/tcp,53/udp",
                "--ready-file",
                READY_FILE
            ])
        );
        assert_eq!(
            c["ports"],
            json!([
                {"containerPort": 80, "protocol": "TCP", "name": "http"},
                {"containerPort": 53, "protocol": "UDP"}
            ])
        );
        let m = manifest_of(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h}\nspec: {hostNetwork: true, containers: [{name: c}]}\n",
            "i",
        );
        assert_eq!(m["spec"]["hostNetwork"], true);
        assert_eq!(m["spec"].get("nodeName"), None, "the scheduler places it");
        assert_eq!(m["spec"]["containers"][0]["command"][6], "");
    }
}
