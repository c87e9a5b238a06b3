//! Malla's records to native objects: what the datastore's Kubernetes backend writes when the
//! lab or a test creates an object, as a user or the kubelet would.
//!
//! Each function sets the fields Malla models on `obj`, which starts as the object already on the
//! server (or `{}`), so fields Malla does not model are kept. A pod's addresses and a load
//! balancer's are `status`, written apart as the kubelet and a controller report them.

use serde_json::{json, Map, Value};

use super::{SliceVersion, SERVICE_NAME_LABEL};
use crate::policy::NetworkPolicy;
use crate::service::{
    AddressType, EndpointSlice, Protocol, Service, ServiceType, TargetPort, TrafficPolicy,
};
use crate::{Namespace, Pod};

/// Who manages the slices Malla writes (the endpoint-slice controller leaves them alone).
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

/// The image the lab's pods name: the lab itself is their runtime.
const LAB_IMAGE: &str = "malla.dev/lab-pod";

/// `v` as a JSON object, made one if it is not.
pub fn as_object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

/// The object at `v[field]`, made one if missing or not an object.
pub fn object_mut<'a>(v: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    as_object(as_object(v).entry(field).or_insert_with(|| json!({})))
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn set_labels(obj: &mut Value, labels: &std::collections::BTreeMap<String, String>) {
    object_mut(obj, "metadata").insert("labels".into(), json!(labels));
}

/// A Namespace's labels.
pub fn namespace(ns: &Namespace, obj: &mut Value) {
    set_labels(obj, &ns.labels);
}

/// A Pod's labels and, for a new pod (`existing` false: a pod's spec is immutable), its spec.
pub fn pod(pod: &Pod, obj: &mut Value, existing: bool) {
    set_labels(obj, &pod.labels);
    if existing {
        return;
    }
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|p| {
            let mut v = json!({"containerPort": p.port, "protocol": protocol_name(p.protocol)});
            if let Some(n) = &p.name {
                v["name"] = json!(n);
            }
            v
        })
        .collect();
    let mut spec = json!({
        "nodeName": pod.node,
        "automountServiceAccountToken": false,
        "containers": [{"name": "main", "image": LAB_IMAGE, "ports": ports}],
    });
    if pod.host_network {
        spec["hostNetwork"] = json!(true);
    }
    as_object(obj).insert("spec".into(), spec);
    if !pod.allowed_source_prefixes.is_empty() {
        let value: Vec<String> = pod
            .allowed_source_prefixes
            .iter()
            .map(ToString::to_string)
            .collect();
        let meta = as_object(as_object(obj).entry("metadata").or_insert(json!({})));
        let annotations = as_object(meta.entry("annotations").or_insert(json!({})));
        annotations.insert(
            crate::ALLOWED_SOURCE_PREFIXES.into(),
            json!(value.join(",")),
        );
    }
}

/// A pod's `status` as the kubelet reports a running pod; `None` before it has addresses.
pub fn pod_status(pod: &Pod) -> Option<Value> {
    let first = pod.ips.first()?;
    let ready = json!([
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "True"},
        {"type": "ContainersReady", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
    ]);
    let pod_ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
    Some(json!({
        "phase": "Running",
        "podIP": first,
        "podIPs": pod_ips,
        "conditions": ready,
        "containerStatuses": [{
            "name": "main",
            "ready": true,
            "started": true,
            "restartCount": 0,
            "image": LAB_IMAGE,
            "imageID": "",
            "state": {"running": {}},
        }],
    }))
}

/// A Service's spec.
pub fn service(svc: &Service, obj: &mut Value) {
    let spec = object_mut(obj, "spec");
    spec.insert(
        "type".into(),
        json!(match svc.kind {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }),
    );
    // No address given: keep what the server allocated, if any.
    if let Some(ip) = svc.cluster_ips.first() {
        spec.insert("clusterIP".into(), json!(ip.to_string()));
    }
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .map(|p| {
            let mut v =
                json!({"name": p.name, "protocol": protocol_name(p.protocol), "port": p.port});
            match &p.target_port {
                Some(TargetPort::Number(n)) => v["targetPort"] = json!(n),
                Some(TargetPort::Name(s)) => v["targetPort"] = json!(s),
                None => {}
            }
            if let Some(n) = p.node_port {
                v["nodePort"] = json!(n);
            }
            v
        })
        .collect();
    spec.insert("ports".into(), json!(ports));
    match &svc.selector {
        Some(sel) => spec.insert("selector".into(), json!(sel)),
        None => spec.remove("selector"),
    };
    match svc.session_affinity_timeout {
        Some(t) => {
            spec.insert("sessionAffinity".into(), json!("ClientIP"));
            spec.insert(
                "sessionAffinityConfig".into(),
                json!({"clientIP": {"timeoutSeconds": t}}),
            );
        }
        None => {
            spec.insert("sessionAffinity".into(), json!("None"));
            spec.remove("sessionAffinityConfig");
        }
    }
    let policy = |p: TrafficPolicy| match p {
        TrafficPolicy::Cluster => "Cluster",
        TrafficPolicy::Local => "Local",
    };
    if svc.kind != ServiceType::ClusterIP {
        spec.insert(
            "externalTrafficPolicy".into(),
            json!(policy(svc.external_traffic_policy)),
        );
    } else {
        spec.remove("externalTrafficPolicy");
    }
    spec.insert(
        "internalTrafficPolicy".into(),
        json!(policy(svc.internal_traffic_policy)),
    );
    if svc.external_ips.is_empty() {
        spec.remove("externalIPs");
    } else {
        spec.insert("externalIPs".into(), json!(svc.external_ips));
    }
}

/// A load balancer's `status` (its ingress addresses); `None` without any.
pub fn service_status(svc: &Service) -> Option<Value> {
    if svc.load_balancer_ips.is_empty() {
        return None;
    }
    let ingress: Vec<Value> = svc
        .load_balancer_ips
        .iter()
        .map(|ip| json!({"ip": ip}))
        .collect();
    Some(json!({"loadBalancer": {"ingress": ingress}}))
}

/// An EndpointSlice of `version`, labelled with its service and as managed by Malla.
pub fn endpoint_slice(s: &EndpointSlice, version: SliceVersion, obj: &mut Value) {
    let labels = as_object(
        object_mut(obj, "metadata")
            .entry("labels")
            .or_insert_with(|| json!({})),
    );
    labels.insert(SERVICE_NAME_LABEL.into(), json!(s.service));
    labels
        .entry(MANAGED_BY)
        .or_insert_with(|| json!("malla.dev"));
    let eps: Vec<Value> = s
        .endpoints
        .iter()
        .map(|e| {
            let mut c = json!({"ready": e.conditions.ready});
            if let Some(sv) = e.conditions.serving {
                c["serving"] = json!(sv);
            }
            if e.conditions.terminating {
                c["terminating"] = json!(true);
            }
            let mut v = json!({"addresses": e.addresses, "conditions": c});
            if let Some(n) = &e.node_name {
                match version {
                    SliceVersion::V1 => v["nodeName"] = json!(n),
                    SliceVersion::V1beta1 => v["topology"] = json!({"kubernetes.io/hostname": n}),
                }
            }
            if let Some(t) = &e.target {
                // `namespace/name` (a bare name is in the slice's namespace).
                let (ns, name) = t.split_once('/').unwrap_or((&s.namespace, t));
                v["targetRef"] = json!({"kind": "Pod", "name": name, "namespace": ns});
            }
            v
        })
        .collect();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": protocol_name(p.protocol), "port": p.port}))
        .collect();
    let m = as_object(obj);
    m.insert(
        "addressType".into(),
        json!(match s.address_type {
            AddressType::IPv4 => "IPv4",
            AddressType::IPv6 => "IPv6",
        }),
    );
    m.insert("endpoints".into(), json!(eps));
    m.insert("ports".into(), json!(ports));
}

/// A NetworkPolicy's spec (Malla's types serialise in the native shape).
pub fn network_policy(p: &NetworkPolicy, obj: &mut Value) {
    as_object(obj).insert("spec".into(), json!(p.spec));
}
