//! The lab as container runtime: `apply` creates each pod's namespace, calls the node's CNI
//! conflist, and starts the pod's probe server; `delete` reverses it through CNI DEL. On a
//! `lab up --kubelet` lab the kubelets are the runtime: pods go through the API server
//! ([`crate::kube_pods`]), and the lab touches only the API objects it applied itself.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use malla_dataplane::netns;

use crate::cni_exec::{self, Attachment, Runtime};
use crate::manifest::{Object, PodSpec};
use crate::process;
use crate::services;
use crate::state::{LabLock, LabPaths, LabState, PodState};

/// What `apply` did to each object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created(String),
    Configured(String),
    Unchanged(String),
    Deleted(String),
    NotFound(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Created(s) => write!(f, "{s} created"),
            Outcome::Configured(s) => write!(f, "{s} configured"),
            Outcome::Unchanged(s) => write!(f, "{s} unchanged"),
            Outcome::Deleted(s) => write!(f, "{s} deleted"),
            Outcome::NotFound(s) => write!(f, "{s} not found"),
        }
    }
}

fn container_id(lab: &str, pod: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h: u64 = 0xcbf29ce484222325;
    for b in format!("{lab}/{pod}/{nanos}/{}", std::process::id()).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let h2 = h.rotate_left(29).wrapping_mul(0x9e3779b97f4a7c15);
    format!("{h:016x}{h2:016x}")
}

/// The runtime for one node: its conflist, the lab's CNI bin dir, its namespace.
pub fn node_runtime(paths: &LabPaths, state: &LabState, node: &str) -> anyhow::Result<Runtime> {
    let n = state
        .node(node)
        .with_context(|| format!("no node {node}"))?;
    Runtime::load(
        &paths.conflist(node),
        &paths.cni_bin_dir(),
        Some(n.netns.clone()),
    )
}

/// Applies parsed objects: all checks first, then the changes; a failure rolls back this call's
/// pods so nothing is left half-applied.
pub fn apply(
    paths: &LabPaths,
    malla_bin: &Path,
    objects: &[Object],
) -> anyhow::Result<Vec<Outcome>> {
    let _lock = LabLock::acquire(paths)?;
    let mut state = LabState::require(paths)?;
    if state.kubelet {
        crate::kube_pods::refresh(paths, &mut state)?;
    }
    let before = state.clone();
    let mut namespaces: BTreeSet<String> = state.namespaces.iter().cloned().collect();
    for o in objects {
        if let Object::Namespace { name, .. } = o {
            namespaces.insert(name.clone());
        }
    }
    let mut seen = BTreeSet::new();
    for o in objects {
        let Object::Pod(p) = o else { continue };
        if !seen.insert(p.key()) {
            bail!("pod {} appears twice in the manifest", p.key());
        }
        if !namespaces.contains(&p.namespace) {
            bail!(
                "pod {}: metadata.namespace: namespace {:?} does not exist",
                p.key(),
                p.namespace
            );
        }
        if let Some(n) = &p.node_name {
            if state.node(n).is_none() {
                let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
                bail!(
                    "pod {}: spec.nodeName: no node {n:?} (nodes: {})",
                    p.key(),
                    names.join(", ")
                );
            }
        }
        if let Some(existing) = state.pods.get(&p.key()) {
            // Labels may change in place (as with kubectl label); the rest of a pod is immutable.
            let same = existing.ports == p.ports
                && existing.host_network == p.host_network
                && existing.allowed_source_prefixes == p.allowed_source_prefixes
                && p.node_name.as_ref().is_none_or(|n| *n == existing.node);
            if !same {
                bail!(
                    "pod {}: exists with a different spec; pods are immutable except their labels, delete it first",
                    p.key()
                );
            }
        }
    }

    // Services: allocate (or keep) addresses and node ports now, so a clash fails the whole file.
    let mut services: Vec<malla_api::service::Service> = Vec::new();
    {
        let mut taken_ips: BTreeSet<std::net::IpAddr> = state
            .services
            .values()
            .flat_map(|s| s.cluster_ips.iter().copied())
            .collect();
        let mut taken_ports: BTreeSet<u16> = state
            .services
            .values()
            .flat_map(|s| s.ports.iter().filter_map(|p| p.node_port))
            .collect();
        // LoadBalancer addresses given out (a BGP lab allocates them: crate::bgp).
        let mut taken_lb: BTreeSet<std::net::IpAddr> = state
            .services
            .values()
            .flat_map(|s| s.load_balancer_ips.iter().copied())
            .collect();
        for o in objects {
            let Object::Service(spec) = o else { continue };
            let key = spec.key();
            if !namespaces.contains(&spec.service.namespace) {
                bail!(
                    "service {key}: metadata.namespace: namespace {:?} does not exist",
                    spec.service.namespace
                );
            }
            let mut spec = spec.clone();
            if let Some(old) = state.services.get(&key) {
                // Keep what was allocated, as the API server does on update.
                for ip in &old.cluster_ips {
                    taken_ips.remove(ip);
                }
                if spec.service.cluster_ips.is_empty() && !spec.headless {
                    spec.service.cluster_ips = old.cluster_ips.clone();
                }
                for (p, o) in spec.service.ports.iter_mut().zip(&old.ports) {
                    if let Some(n) = o.node_port {
                        taken_ports.remove(&n);
                        if p.node_port.is_none() && p.name == o.name {
                            p.node_port = Some(n);
                        }
                    }
                }
            }
            let bgp = state.routing == malla_api::RoutingMode::Bgp;
            if let Some(old) = state.services.get(&key).filter(|_| bgp) {
                // A BGP lab gave it its LoadBalancer address: kept while it stays one.
                for ip in &old.load_balancer_ips {
                    taken_lb.remove(ip);
                }
                if spec.service.kind == malla_api::service::ServiceType::LoadBalancer
                    && spec.service.load_balancer_ips.is_empty()
                {
                    spec.service.load_balancer_ips = old.load_balancer_ips.clone();
                }
            }
            let mut svc = services::allocate(&spec, state.ipv6, &taken_ips, &taken_ports)
                .with_context(|| format!("service {key}"))?;
            if bgp {
                crate::bgp::allocate_load_balancer(&mut svc, &mut taken_lb)
                    .with_context(|| format!("service {key}"))?;
            }
            for ip in &svc.cluster_ips {
                anyhow::ensure!(
                    taken_ips.insert(*ip),
                    "service {key}: spec.clusterIP {ip} is already allocated"
                );
            }
            taken_ports.extend(svc.ports.iter().filter_map(|p| p.node_port));
            services.push(svc);
        }
        for o in objects {
            let Object::EndpointSlice(slice) = o else {
                continue;
            };
            if !namespaces.contains(&slice.namespace) {
                bail!(
                    "endpointslice {}/{}: metadata.namespace: namespace {:?} does not exist",
                    slice.namespace,
                    slice.name,
                    slice.namespace
                );
            }
        }
    }

    let mut outcomes = Vec::new();
    for o in objects {
        if let Object::Namespace { name, labels } = o {
            let mut labels = labels.clone();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            let known = state.namespaces.contains(name);
            let unchanged = known && state.namespace_labels.get(name) == Some(&labels);
            if !known {
                state.namespaces.push(name.clone());
            }
            state.namespace_labels.insert(name.clone(), labels);
            outcomes.push(match (known, unchanged) {
                (false, _) => Outcome::Created(format!("namespace/{name}")),
                (true, true) => Outcome::Unchanged(format!("namespace/{name}")),
                (true, false) => Outcome::Configured(format!("namespace/{name}")),
            });
        }
    }
    let kubelet = state.kubelet;
    if kubelet {
        apply_kubelet_pods(paths, &before, &mut state, objects, &mut outcomes)?;
    }
    let mut created: Vec<String> = Vec::new();
    for o in objects.iter().filter(|_| !kubelet) {
        let Object::Pod(spec) = o else { continue };
        if let Some(existing) = state.pods.get_mut(&spec.key()) {
            if existing.labels == spec.labels {
                outcomes.push(Outcome::Unchanged(format!("pod/{}", spec.key())));
            } else {
                existing.labels = spec.labels.clone();
                outcomes.push(Outcome::Configured(format!("pod/{}", spec.key())));
            }
            continue;
        }
        match create_pod(paths, malla_bin, &state, spec) {
            Ok(pod) => {
                created.push(pod.key());
                state.pods.insert(pod.key(), pod);
                outcomes.push(Outcome::Created(format!("pod/{}", spec.key())));
            }
            Err(e) => {
                for key in created.iter().rev() {
                    if let Some(pod) = state.pods.remove(key) {
                        let _ = remove_pod(paths, &state, &pod);
                    }
                }
                return Err(e.context(format!(
                    "creating pod {} (nothing from this apply was kept)",
                    spec.key()
                )));
            }
        }
    }
    for svc in services {
        let key = svc.key();
        let outcome = if state.services.get(&key) == Some(&svc) {
            Outcome::Unchanged(format!("service/{key}"))
        } else {
            Outcome::Created(format!("service/{key}"))
        };
        state.services.insert(key, svc);
        outcomes.push(outcome);
    }
    for o in objects {
        let Object::EndpointSlice(slice) = o else {
            continue;
        };
        let key = format!("{}/{}", slice.namespace, slice.name);
        let outcome = if state.manual_slices.get(&key) == Some(slice) {
            Outcome::Unchanged(format!("endpointslice/{key}"))
        } else {
            Outcome::Created(format!("endpointslice/{key}"))
        };
        state.manual_slices.insert(key, slice.clone());
        outcomes.push(outcome);
    }
    for o in objects {
        let Object::NetworkPolicy(p) = o else {
            continue;
        };
        let key = p.key();
        let outcome = match state.policies.get(&key) {
            None => Outcome::Created(format!("networkpolicy/{key}")),
            Some(old) if old == p => Outcome::Unchanged(format!("networkpolicy/{key}")),
            Some(_) => Outcome::Configured(format!("networkpolicy/{key}")),
        };
        state.policies.insert(key, p.clone());
        outcomes.push(outcome);
    }
    for o in objects {
        let Object::Calico(c) = o else {
            continue;
        };
        let (key, json) = (c.key(), c.to_json());
        let outcome = match state.calico.get(&key) {
            None => Outcome::Created(c.id()),
            Some(old) if *old == json => Outcome::Unchanged(c.id()),
            Some(_) => Outcome::Configured(c.id()),
        };
        state.calico.insert(key, json);
        outcomes.push(outcome);
    }
    sync_objects(paths, &before, &state)?;
    state.save(paths)?;
    crate::topology::wait_converged(paths, &state, Duration::from_secs(30))?;
    Ok(outcomes)
}

/// The pods of `objects` on a `--kubelet` lab: the new ones and those whose labels changed go
/// to the API server (after the namespaces they live in), the kubelets start them; the
/// outcomes in the manifest's order. On failure the namespaces this apply created go again.
fn apply_kubelet_pods(
    paths: &LabPaths,
    before: &LabState,
    state: &mut LabState,
    objects: &[Object],
    outcomes: &mut Vec<Outcome>,
) -> anyhow::Result<()> {
    let specs: Vec<&PodSpec> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        })
        .collect();
    let changed: Vec<&PodSpec> = specs
        .iter()
        .copied()
        .filter(|p| {
            state
                .pods
                .get(&p.key())
                .is_none_or(|e| e.labels != p.labels)
        })
        .collect();
    let mut applied = Vec::new();
    if !changed.is_empty() {
        sync_objects(paths, before, state)?;
        match crate::kube_pods::apply(paths, state, &changed) {
            Ok(pods) => applied = pods,
            Err(e) => {
                let _ = sync_objects(paths, state, before);
                return Err(e.context("(nothing from this apply was kept)"));
            }
        }
    }
    for spec in specs {
        let key = spec.key();
        let outcome = match applied.iter().position(|p| p.key() == key) {
            None => Outcome::Unchanged(format!("pod/{key}")),
            Some(i) => {
                let pod = applied.swap_remove(i);
                let known = state.pods.contains_key(&key);
                state.pods.insert(key.clone(), pod);
                match known {
                    true => Outcome::Configured(format!("pod/{key}")),
                    false => Outcome::Created(format!("pod/{key}")),
                }
            }
        };
        outcomes.push(outcome);
    }
    Ok(())
}

/// Writes the API objects — namespaces, pods, services and EndpointSlices (given, or derived
/// from selectors over the current pods) — to the datastore, and removes those that no longer
/// exist: the lab's API server and endpoint-slice controller in one. On a Kubernetes datastore
/// the real endpoint-slice controller derives the slices; this waits until it has. On a
/// `--kubelet` lab, where users also create objects with kubectl, only what the lab had in
/// `before` and no longer has is removed, and pods are [`crate::kube_pods`]' own.
pub fn sync_objects(paths: &LabPaths, before: &LabState, state: &LabState) -> anyhow::Result<()> {
    use malla_api::keys;
    let kubernetes = state.datastore == crate::store::Backend::Kubernetes;
    let store = crate::store::open(paths, state)?;
    let pods: Vec<&PodState> = state.pods.values().collect();
    let mut want = wanted(state)?;
    let removed: BTreeSet<String> = match state.kubelet {
        true => {
            let now: BTreeSet<&String> = want.keys().collect();
            wanted(before)?
                .into_keys()
                .filter(|k| !now.contains(k))
                .collect()
        }
        false => BTreeSet::new(),
    };
    for prefix in [
        keys::NAMESPACES,
        keys::PODS,
        keys::SERVICES,
        keys::ENDPOINT_SLICES,
        keys::NETWORK_POLICIES,
        keys::TIERS,
        keys::GLOBAL_NETWORK_POLICIES,
        keys::HOST_ENDPOINTS,
        keys::GLOBAL_NETWORK_SETS,
        keys::CALICO_NETWORK_POLICIES,
        keys::CLUSTER_NETWORK_POLICIES,
        keys::STAGED_POLICIES,
    ] {
        if state.kubelet && prefix == keys::PODS {
            continue;
        }
        let (have, _) = store.list(prefix)?;
        for kv in have {
            if kubernetes
                && (system_object(prefix, &kv.key)
                    || prefix == keys::ENDPOINT_SLICES && controller_made(state, &kv.value))
            {
                continue;
            }
            match want.get(&kv.key) {
                Some(v) if *v == kv.value => {
                    want.remove(&kv.key);
                }
                Some(_) => {}
                None if state.kubelet && !removed.contains(&kv.key) => {}
                None => {
                    store.delete(&kv.key, Some(kv.mod_revision))?;
                }
            }
        }
    }
    // Namespaces before what lives in them.
    let (first, rest): (Vec<_>, Vec<_>) = want
        .into_iter()
        .partition(|(k, _)| k.starts_with(keys::NAMESPACES));
    for (k, v) in first.into_iter().chain(rest) {
        store.put(&k, &v)?;
    }
    if kubernetes {
        wait_for_controller_slices(&*store, state, &pods)?;
    }
    Ok(())
}

/// The datastore's objects as the lab's state has them, by key (a `--kubelet` lab's pods are
/// the kubelets', not among them).
fn wanted(state: &LabState) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    use malla_api::keys;
    let kubernetes = state.datastore == crate::store::Backend::Kubernetes;
    let pods: Vec<&PodState> = state.pods.values().collect();
    let mut want: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for ns in &state.namespaces {
        let mut labels = state.namespace_labels.get(ns).cloned().unwrap_or_default();
        labels.insert("kubernetes.io/metadata.name".into(), ns.clone());
        let obj = malla_api::Namespace {
            name: ns.clone(),
            labels,
        };
        want.insert(keys::namespace(ns), serde_json::to_string(&obj)?);
    }
    for pod in state.pods.values().filter(|_| !state.kubelet) {
        want.insert(
            keys::pod(&pod.namespace, &pod.name),
            serde_json::to_string(&pod.api_object())?,
        );
    }
    for svc in state.services.values() {
        want.insert(
            keys::service(&svc.namespace, &svc.name),
            serde_json::to_string(svc)?,
        );
        if kubernetes {
            continue;
        }
        for slice in services::derive_slices(svc, &pods) {
            want.insert(
                keys::endpoint_slice(&slice.namespace, &slice.name),
                serde_json::to_string(&slice)?,
            );
        }
    }
    for p in state.policies.values() {
        want.insert(
            keys::network_policy(&p.namespace, &p.name),
            serde_json::to_string(p)?,
        );
    }
    for (key, json) in &state.calico {
        want.insert(key.clone(), json.clone());
    }
    for slice in state.manual_slices.values() {
        want.insert(
            keys::endpoint_slice(&slice.namespace, &slice.name),
            serde_json::to_string(slice)?,
        );
    }
    Ok(want)
}

/// Whether a key names what a Kubernetes API server keeps for itself (its namespaces, what
/// lives in `kube-*` namespaces, the `default/kubernetes` Service): never the lab's to delete.
fn system_object(prefix: &str, key: &str) -> bool {
    let tail = &key[prefix.len()..];
    let namespace = tail.split('/').next().unwrap_or_default();
    namespace.starts_with("kube-")
        || (prefix == malla_api::keys::NAMESPACES && tail == "default")
        || tail == "default/kubernetes"
        || (prefix == malla_api::keys::ENDPOINT_SLICES && tail.starts_with("default/kubernetes"))
}

/// Whether a slice belongs to a Service with a selector: the endpoint-slice controller's to
/// write and delete (through its owner reference), not the lab's.
fn controller_made(state: &LabState, slice_json: &str) -> bool {
    let Ok(slice) = serde_json::from_str::<malla_api::service::EndpointSlice>(slice_json) else {
        return false;
    };
    state
        .services
        .get(&format!("{}/{}", slice.namespace, slice.service))
        .is_some_and(|svc| svc.selector.is_some())
}

/// Waits (up to 30 s) until the endpoint-slice controller's slices hold, for every Service
/// with a selector, the addresses the lab's own derivation gives.
fn wait_for_controller_slices(
    store: &dyn malla_store::Store,
    state: &LabState,
    pods: &[&PodState],
) -> anyhow::Result<()> {
    use std::collections::{BTreeMap, BTreeSet};
    let addresses = |slices: &mut dyn Iterator<Item = malla_api::service::EndpointSlice>| {
        let mut by_service: BTreeMap<String, BTreeSet<std::net::IpAddr>> = BTreeMap::new();
        for s in slices {
            let set = by_service
                .entry(format!("{}/{}", s.namespace, s.service))
                .or_default();
            for e in s.endpoints.iter().filter(|e| e.conditions.ready) {
                set.extend(e.addresses.iter().copied());
            }
        }
        by_service.retain(|_, v| !v.is_empty());
        by_service
    };
    let expected = addresses(
        &mut state
            .services
            .values()
            .filter(|s| s.selector.is_some())
            .flat_map(|s| services::derive_slices(s, pods)),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (have, _) = malla_store::list_json::<malla_api::service::EndpointSlice>(
            store,
            malla_api::keys::ENDPOINT_SLICES,
        )?;
        let mut have = addresses(&mut have.into_iter().map(|(_, s, _)| s));
        // Only Services with a selector are the controller's (expected holds no other).
        have.retain(|k, _| state.services.get(k).is_some_and(|s| s.selector.is_some()));
        if state.kubelet {
            // Pods made with kubectl may match too: only the lab's own are compared.
            let ours: BTreeSet<std::net::IpAddr> =
                pods.iter().flat_map(|p| p.ips.iter().copied()).collect();
            for set in have.values_mut() {
                set.retain(|ip| ours.contains(ip));
            }
            have.retain(|_, v| !v.is_empty());
        }
        if have == expected {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "the endpoint-slice controller has not caught up after 30 s: want {expected:?}, have {have:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pick_node(state: &LabState, spec: &PodSpec) -> String {
    if let Some(n) = &spec.node_name {
        return n.clone();
    }
    state
        .nodes
        .iter()
        .min_by_key(|n| state.pods.values().filter(|p| p.node == n.name).count())
        .map(|n| n.name.clone())
        .unwrap_or_default()
}

/// The namespace name of a pod.
pub fn pod_netns(paths: &LabPaths, namespace: &str, name: &str) -> String {
    paths.netns(&format!("pod-{namespace}-{name}"))
}

fn create_pod(
    paths: &LabPaths,
    malla_bin: &Path,
    state: &LabState,
    spec: &PodSpec,
) -> anyhow::Result<PodState> {
    let node = pick_node(state, spec);
    // A host-network pod runs in its node's namespace, as the kubelet runs it: no CNI, and the
    // node's addresses are the pod's.
    let host = match spec.host_network {
        true => Some(
            state
                .node(&node)
                .with_context(|| format!("no node {node}"))?,
        ),
        false => None,
    };
    let netns_name = match host {
        Some(n) => n.netns.clone(),
        None => {
            let name = pod_netns(paths, &spec.namespace, &spec.name);
            netns::create(&name)?;
            name
        }
    };
    let mut pod = PodState {
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        node: node.clone(),
        netns: netns_name.clone(),
        container_id: container_id(&paths.name, &spec.key()),
        ips: Vec::new(),
        ports: spec.ports.clone(),
        labels: spec.labels.clone(),
        probe_pid: None,
        allowed_source_prefixes: spec.allowed_source_prefixes.clone(),
        host_network: spec.host_network,
    };
    let result = (|| {
        match host {
            Some(n) => {
                pod.ips = std::iter::once(std::net::IpAddr::V4(n.underlay_ipv4))
                    .chain(n.underlay_ipv6.map(std::net::IpAddr::V6))
                    .collect();
            }
            None => {
                let rt = node_runtime(paths, state, &node)?;
                let result = rt.add(&attachment(&pod))?;
                pod.ips = cni_exec::result_ips(&result);
                std::fs::write(result_cache(paths, &pod), result.to_string())?;
            }
        }
        if !pod.ports.is_empty() {
            let ready = paths.dir.join(format!("probe-{}.ready", pod.container_id));
            let listen: Vec<String> = pod
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            let mut cmd = Command::new(malla_bin);
            cmd.args([
                "lab",
                "probe-server",
                "--name",
                &pod.key(),
                "--listen",
                &listen.join(","),
            ])
            .arg("--ready-file")
            .arg(&ready);
            pod.probe_pid = Some(process::spawn_detached(
                cmd,
                &netns_name,
                &paths.log(&format!("probe-{}-{}", pod.namespace, pod.name)),
            )?);
            process::wait_for_file(&ready, Duration::from_secs(10))
                .context("probe server did not start")?;
            let _ = std::fs::remove_file(&ready);
        }
        anyhow::Ok(())
    })();
    if let Err(e) = result {
        let _ = remove_pod(paths, state, &pod);
        return Err(e);
    }
    Ok(pod)
}

fn result_cache(paths: &LabPaths, pod: &PodState) -> std::path::PathBuf {
    paths
        .node_dir(&pod.node)
        .join(format!("result-{}.json", pod.container_id))
}

pub fn attachment(pod: &PodState) -> Attachment {
    Attachment {
        container_id: pod.container_id.clone(),
        netns_path: format!("{}/{}", netns::NETNS_DIR, pod.netns),
        ifname: "eth0".into(),
        pod_namespace: pod.namespace.clone(),
        pod_name: pod.name.clone(),
    }
}

/// Stops the probe server, calls CNI DEL, deletes the namespace (a host-network pod's is its
/// node's: only its probe server goes).
fn remove_pod(paths: &LabPaths, state: &LabState, pod: &PodState) -> anyhow::Result<()> {
    if let Some(pid) = pod.probe_pid {
        process::stop(pid);
    }
    if pod.host_network {
        return Ok(());
    }
    let cache = result_cache(paths, pod);
    let cached = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let del = node_runtime(paths, state, &pod.node)
        .and_then(|rt| rt.del(&attachment(pod), cached.as_ref()));
    netns::delete(&pod.netns)?;
    let _ = std::fs::remove_file(cache);
    del
}

/// Deletes the pods (and namespaces, with their pods) named in `objects`.
pub fn delete(paths: &LabPaths, objects: &[Object]) -> anyhow::Result<Vec<Outcome>> {
    let _lock = LabLock::acquire(paths)?;
    let mut state = LabState::require(paths)?;
    if state.kubelet {
        crate::kube_pods::refresh(paths, &mut state)?;
    }
    let before = state.clone();
    let mut outcomes = Vec::new();
    let mut doomed: Vec<String> = Vec::new();
    for o in objects {
        match o {
            Object::Pod(p) => doomed.push(p.key()),
            Object::Service(_)
            | Object::EndpointSlice(_)
            | Object::NetworkPolicy(_)
            | Object::Calico(_) => {}
            Object::Namespace { name, .. } => {
                doomed.extend(
                    state
                        .pods
                        .values()
                        .filter(|p| &p.namespace == name)
                        .map(PodState::key),
                );
            }
        }
    }
    for o in objects {
        match o {
            Object::Service(spec) => {
                let key = spec.key();
                outcomes.push(match state.services.remove(&key) {
                    Some(_) => Outcome::Deleted(format!("service/{key}")),
                    None => Outcome::NotFound(format!("service/{key}")),
                });
            }
            Object::EndpointSlice(slice) => {
                let key = format!("{}/{}", slice.namespace, slice.name);
                outcomes.push(match state.manual_slices.remove(&key) {
                    Some(_) => Outcome::Deleted(format!("endpointslice/{key}")),
                    None => Outcome::NotFound(format!("endpointslice/{key}")),
                });
            }
            Object::NetworkPolicy(p) => {
                let key = p.key();
                outcomes.push(match state.policies.remove(&key) {
                    Some(_) => Outcome::Deleted(format!("networkpolicy/{key}")),
                    None => Outcome::NotFound(format!("networkpolicy/{key}")),
                });
            }
            Object::Calico(c) => {
                outcomes.push(match state.calico.remove(&c.key()) {
                    Some(_) => Outcome::Deleted(c.id()),
                    None => Outcome::NotFound(c.id()),
                });
            }
            Object::Namespace { .. } | Object::Pod(_) => {}
        }
    }
    // What else lives in a deleted namespace goes with it (after the objects named above, so
    // that those read `deleted`).
    for o in objects {
        if let Object::Namespace { name, .. } = o {
            state.policies.retain(|_, p| &p.namespace != name);
            state.services.retain(|_, s| &s.namespace != name);
            state.manual_slices.retain(|_, s| &s.namespace != name);
        }
    }
    // A pod named and in a namespace named is deleted once.
    let mut once = BTreeSet::new();
    doomed.retain(|k| once.insert(k.clone()));
    let mut errors = Vec::new();
    if state.kubelet {
        let known: Vec<String> = doomed
            .iter()
            .filter(|k| state.pods.contains_key(*k))
            .cloned()
            .collect();
        if let Err(e) = crate::kube_pods::delete(paths, &state, &known) {
            errors.push(format!("{e:#}"));
        }
    }
    for key in doomed {
        match state.pods.get(&key).cloned() {
            Some(pod) => {
                if state.kubelet {
                    // Deleted through the API server above.
                } else if let Err(e) = remove_pod(paths, &state, &pod) {
                    errors.push(format!("pod {key}: {e:#}"));
                }
                state.pods.remove(&key);
                outcomes.push(Outcome::Deleted(format!("pod/{key}")));
            }
            None => outcomes.push(Outcome::NotFound(format!("pod/{key}"))),
        }
    }
    for o in objects {
        if let Object::Namespace { name, .. } = o {
            if name != "default" && state.namespaces.contains(name) {
                state.namespaces.retain(|n| n != name);
                state.namespace_labels.remove(name);
                outcomes.push(Outcome::Deleted(format!("namespace/{name}")));
            }
        }
    }
    sync_objects(paths, &before, &state)?;
    state.save(paths)?;
    crate::topology::wait_converged(paths, &state, Duration::from_secs(30))?;
    if !errors.is_empty() {
        bail!("some pods were not cleanly deleted: {}", errors.join("; "));
    }
    Ok(outcomes)
}
