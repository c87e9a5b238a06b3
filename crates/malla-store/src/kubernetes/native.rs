//! Conversions between Kubernetes objects (JSON) and Malla's records.
//!
//! Reading keeps what the calculation uses and nothing else. Writing (the lab and tests
//! create objects as a user or the kubelet would) starts from the object already on the server,
//! so fields Malla does not model are preserved; a pod's addresses and readiness go to its
//! `status`, as the kubelet reports them.
//!
//! Servers differ by release, and both ends are handled: EndpointSlice `v1` (`nodeName`) and
//! `v1beta1` (`topology["kubernetes.io/hostname"]`), core `Endpoints` where neither is served,
//! and the `kubernetes.io/metadata.name` namespace label that servers before 1.21 do not add.

use std::collections::BTreeMap;
use std::net::IpAddr;

use malla_api::policy::{NetworkPolicy, NetworkPolicySpec};
use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort, ServiceType, TargetPort, TrafficPolicy,
};
use malla_api::{ContainerPort, Namespace, Pod};
use serde_json::{json, Map, Value};

use super::kinds::{Kind, Location, Shape, KEY_ANNOTATION};
use crate::syncer::Resource;

/// The label naming a namespace, set by the server since 1.21 and here for older ones.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label linking an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Who manages the slices Malla writes (the endpoint-slice controller leaves them alone).
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, p| v.get(p))?.as_str()
}

/// The elements of a JSON array, none when the value is missing or not an array.
fn items(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn protocol(v: Option<&Value>) -> Result<Protocol, String> {
    match v.and_then(Value::as_str).unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

fn port(v: Option<&Value>, what: &str) -> Result<u16, String> {
    v.and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| format!("{what}: missing or out of range"))
}

fn ips(v: Option<&Value>) -> Vec<IpAddr> {
    items(v).filter_map(|s| s.as_str()?.parse().ok()).collect()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("Malla records serialise")
}

/// A native object's key and Malla value (JSON); None for an object Malla does not use (an
/// FQDN endpoint slice, a custom resource without its key).
/// A custom resource's `spec` is returned as stored, whatever record it holds.
pub fn read(kind: &Kind, obj: &Value) -> Result<Option<(String, String)>, String> {
    if kind.shape == Shape::Custom {
        return Ok(custom_key(kind, obj)?
            .and_then(|key| obj.get("spec").map(|spec| (key, spec.to_string()))));
    }
    Ok(read_resource(kind, obj)?.map(|(key, r)| (key, r.to_json())))
}

/// The key a custom resource holds: its annotation, else (created by hand, `kubectl apply`
/// of an IPPool) the name as the key's tail; None when the annotation names another kind.
fn custom_key(kind: &Kind, obj: &Value) -> Result<Option<String>, String> {
    let name = str_at(obj, &["metadata", "name"]).ok_or("object without a name")?;
    Ok(
        match obj
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(KEY_ANNOTATION))
            .and_then(Value::as_str)
        {
            Some(k) if k.starts_with(kind.prefix) => Some(k.to_string()),
            Some(_) => None,
            None => Some(kind.native_key(None, name)),
        },
    )
}

/// A native object's key and Malla record, typed; None for an object Malla does not use.
/// Custom resources become the record their `spec` holds, decoded from the JSON tree.
pub fn read_resource(kind: &Kind, obj: &Value) -> Result<Option<(String, Resource)>, String> {
    let name = str_at(obj, &["metadata", "name"]).ok_or("object without a name")?;
    let namespace = str_at(obj, &["metadata", "namespace"]);
    let key = || kind.native_key(namespace, name);
    let ns = || namespace.unwrap_or_default().to_string();
    Ok(match kind.shape {
        Shape::Custom => match (custom_key(kind, obj)?, obj.get("spec")) {
            (Some(key), Some(spec)) => Resource::from_value(&key, spec.clone())?.map(|r| (key, r)),
            _ => None,
        },
        Shape::Namespace => {
            let mut labels = labels_of(obj);
            labels
                .entry(NAMESPACE_NAME_LABEL.into())
                .or_insert_with(|| name.to_string());
            let ns = Namespace {
                name: name.to_string(),
                labels,
            };
            Some((key(), Resource::Namespace(ns)))
        }
        Shape::Pod => Some((key(), Resource::Pod(read_pod(obj, ns(), name)?))),
        Shape::Service => Some((key(), Resource::Service(read_service(obj, ns(), name)?))),
        Shape::EndpointSlice => {
            read_slice(obj, ns(), name)?.map(|s| (key(), Resource::EndpointSlice(s)))
        }
        Shape::Endpoints => None, // expanded by `read_endpoints`, one record per family
        Shape::NetworkPolicy => {
            let spec: NetworkPolicySpec =
                serde_json::from_value(obj.get("spec").cloned().unwrap_or(json!({})))
                    .map_err(|e| format!("spec: {e}"))?;
            let p = NetworkPolicy {
                namespace: ns(),
                name: name.to_string(),
                spec,
            };
            Some((key(), Resource::NetworkPolicy(p)))
        }
    })
}

fn read_pod(obj: &Value, namespace: String, name: &str) -> Result<Pod, String> {
    let mut ports = Vec::new();
    for c in items(obj.pointer("/spec/containers")) {
        for p in items(c.get("ports")) {
            ports.push(ContainerPort {
                name: p.get("name").and_then(Value::as_str).map(String::from),
                protocol: protocol(p.get("protocol"))?,
                port: port(p.get("containerPort"), "containerPort")?,
            });
        }
    }
    // status.podIPs is [{ip: …}].
    let mut pod_ips: Vec<IpAddr> = items(obj.pointer("/status/podIPs"))
        .filter_map(|e| e.get("ip")?.as_str()?.parse().ok())
        .collect();
    if pod_ips.is_empty() {
        pod_ips = str_at(obj, &["status", "podIP"])
            .and_then(|s| s.parse().ok())
            .into_iter()
            .collect();
    }
    Ok(Pod {
        namespace,
        name: name.to_string(),
        labels: labels_of(obj),
        node: str_at(obj, &["spec", "nodeName"])
            .unwrap_or_default()
            .to_string(),
        ports,
        ips: pod_ips,
    })
}

fn read_service(obj: &Value, namespace: String, name: &str) -> Result<Service, String> {
    let spec = obj.get("spec").cloned().unwrap_or(json!({}));
    let kind = match spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP")
    {
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        _ => ServiceType::ClusterIP,
    };
    let mut cluster_ips = ips(spec.get("clusterIPs"));
    if cluster_ips.is_empty() {
        cluster_ips = spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .into_iter()
            .collect();
    }
    let mut ports = Vec::new();
    for (i, p) in items(spec.get("ports")).enumerate() {
        let target_port = match p.get("targetPort") {
            Some(Value::Number(n)) => Some(TargetPort::Number(port(
                Some(&Value::Number(n.clone())),
                "targetPort",
            )?)),
            Some(Value::String(s)) => Some(match s.parse::<u16>() {
                Ok(n) => TargetPort::Number(n),
                Err(_) => TargetPort::Name(s.clone()),
            }),
            _ => None,
        };
        ports.push(ServicePort {
            name: p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            protocol: protocol(p.get("protocol"))?,
            port: port(p.get("port"), &format!("spec.ports[{i}].port"))?,
            target_port,
            node_port: p
                .get("nodePort")
                .and_then(Value::as_u64)
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0),
        });
    }
    let selector = spec.get("selector").and_then(Value::as_object).map(|m| {
        m.iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    });
    let session_affinity_timeout = match spec.get("sessionAffinity").and_then(Value::as_str) {
        Some("ClientIP") => Some(
            spec.pointer("/sessionAffinityConfig/clientIP/timeoutSeconds")
                .and_then(Value::as_u64)
                .and_then(|t| u32::try_from(t).ok())
                .unwrap_or(10800),
        ),
        _ => None,
    };
    let policy = |field: &str| match spec.get(field).and_then(Value::as_str) {
        Some("Local") => TrafficPolicy::Local,
        _ => TrafficPolicy::Cluster,
    };
    Ok(Service {
        namespace,
        name: name.to_string(),
        kind,
        cluster_ips,
        ports,
        selector,
        session_affinity_timeout,
        external_traffic_policy: policy("externalTrafficPolicy"),
        internal_traffic_policy: policy("internalTrafficPolicy"),
        external_ips: ips(spec.get("externalIPs")),
        load_balancer_ips: items(obj.pointer("/status/loadBalancer/ingress"))
            .filter_map(|i| i.get("ip")?.as_str()?.parse().ok())
            .collect(),
    })
}

fn read_slice(obj: &Value, namespace: String, name: &str) -> Result<Option<EndpointSlice>, String> {
    let address_type = match obj.get("addressType").and_then(Value::as_str) {
        Some("IPv4") => AddressType::IPv4,
        Some("IPv6") => AddressType::IPv6,
        _ => return Ok(None), // FQDN: nothing to route to
    };
    let Some(service) = labels_of(obj).remove(SERVICE_NAME_LABEL) else {
        return Ok(None);
    };
    let mut endpoints = Vec::new();
    for e in items(obj.get("endpoints")) {
        let c = e.get("conditions");
        let flag = |f: &str| c.and_then(|c| c.get(f)).and_then(Value::as_bool);
        let node_name = e
            .get("nodeName")
            .and_then(Value::as_str)
            .or_else(|| str_at(e, &["topology", "kubernetes.io/hostname"]))
            .map(Into::into);
        endpoints.push(Endpoint {
            addresses: ips(e.get("addresses")),
            conditions: EndpointConditions {
                // Unset ready means ready (the API's "unknown" is treated as ready).
                ready: flag("ready").unwrap_or(true),
                serving: flag("serving"),
                terminating: flag("terminating").unwrap_or(false),
            },
            node_name,
            target: e
                .get("targetRef")
                .and_then(|t| t.get("name"))
                .and_then(Value::as_str)
                .map(Into::into),
        });
    }
    let mut ports = Vec::new();
    for p in items(obj.get("ports")) {
        // A port without a number means "all ports": nothing a service can map.
        let Some(n) = p.get("port").and_then(Value::as_u64) else {
            continue;
        };
        ports.push(EndpointPort {
            name: p
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            protocol: protocol(p.get("protocol"))?,
            port: u16::try_from(n).map_err(|_| format!("ports: {n} out of range"))?,
        });
    }
    Ok(Some(EndpointSlice {
        namespace,
        name: name.to_string(),
        service,
        address_type,
        endpoints,
        ports,
    }))
}

/// A core `Endpoints` object as one endpoint-slice record per address family, keyed
/// `NAME-v4` / `NAME-v6` (servers without the EndpointSlice API).
pub fn read_endpoints(kind: &Kind, obj: &Value) -> Result<Vec<(String, String)>, String> {
    Ok(read_endpoints_typed(kind, obj)?
        .into_iter()
        .map(|(key, slice)| (key, to_json(&slice)))
        .collect())
}

/// [`read_endpoints`], typed.
pub fn read_endpoints_typed(
    kind: &Kind,
    obj: &Value,
) -> Result<Vec<(String, EndpointSlice)>, String> {
    let name = str_at(obj, &["metadata", "name"]).ok_or("object without a name")?;
    let namespace = str_at(obj, &["metadata", "namespace"]).unwrap_or_default();
    let mut out = Vec::new();
    for (family, suffix) in [(AddressType::IPv4, "v4"), (AddressType::IPv6, "v6")] {
        let mut endpoints = Vec::new();
        let mut ports = Vec::new();
        for subset in items(obj.get("subsets")) {
            for (field, ready) in [("addresses", true), ("notReadyAddresses", false)] {
                for a in items(subset.get(field)) {
                    let Some(ip) = a
                        .get("ip")
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<IpAddr>().ok())
                    else {
                        continue;
                    };
                    if ip.is_ipv4() != (family == AddressType::IPv4) {
                        continue;
                    }
                    endpoints.push(Endpoint {
                        addresses: vec![ip],
                        conditions: EndpointConditions {
                            ready,
                            serving: Some(ready),
                            terminating: false,
                        },
                        node_name: a.get("nodeName").and_then(Value::as_str).map(Into::into),
                        target: a
                            .get("targetRef")
                            .and_then(|t| t.get("name"))
                            .and_then(Value::as_str)
                            .map(Into::into),
                    });
                }
            }
            for p in items(subset.get("ports")) {
                let p = EndpointPort {
                    name: p
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    protocol: protocol(p.get("protocol"))?,
                    port: port(p.get("port"), "subsets[].ports[].port")?,
                };
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        if endpoints.is_empty() {
            continue;
        }
        let slice = EndpointSlice {
            namespace: namespace.to_string(),
            name: format!("{name}-{suffix}"),
            service: name.to_string(),
            address_type: family,
            endpoints,
            ports,
        };
        out.push((kind.native_key(Some(namespace), &slice.name), slice));
    }
    Ok(out)
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &str) -> Result<T, String> {
    serde_json::from_str(value).map_err(|e| format!("{key}: {e}"))
}

fn obj_mut<'a>(v: &'a mut Value, field: &str) -> &'a mut Map<String, Value> {
    let m = v.as_object_mut().expect("objects are JSON objects");
    let e = m.entry(field).or_insert_with(|| json!({}));
    if !e.is_object() {
        *e = json!({});
    }
    e.as_object_mut().expect("just made an object")
}

/// The object to write for `value` at `loc`, starting from the server's current object
/// (`existing`) when there is one. The caller sets `metadata.resourceVersion`.
pub fn write(
    kind: &Kind,
    loc: &Location,
    key: &str,
    value: &str,
    existing: Option<&Value>,
) -> Result<Value, String> {
    let mut obj = existing.cloned().unwrap_or_else(|| json!({}));
    {
        let m = obj.as_object_mut().ok_or("object is not a JSON object")?;
        m.insert("apiVersion".into(), json!(kind.resource.api_version));
        m.insert("kind".into(), json!(kind.resource.kind));
        m.remove("status");
    }
    {
        let meta = obj_mut(&mut obj, "metadata");
        meta.insert("name".into(), json!(loc.name));
        if let Some(ns) = &loc.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.remove("managedFields");
    }
    let set_labels = |obj: &mut Value, labels: &BTreeMap<String, String>| {
        obj_mut(obj, "metadata").insert("labels".into(), json!(labels));
    };
    match kind.shape {
        Shape::Custom => {
            let spec: Value = parse(key, value)?;
            if !spec.is_object() {
                return Err(format!(
                    "{key}: a custom resource's value must be a JSON object"
                ));
            }
            obj_mut(&mut obj, "metadata")
                .entry("annotations")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or("metadata.annotations is not an object")?
                .insert(KEY_ANNOTATION.into(), json!(key));
            obj.as_object_mut()
                .expect("object")
                .insert("spec".into(), spec);
        }
        Shape::Namespace => {
            let ns: Namespace = parse(key, value)?;
            set_labels(&mut obj, &ns.labels);
        }
        Shape::Pod => {
            let pod: Pod = parse(key, value)?;
            set_labels(&mut obj, &pod.labels);
            if existing.is_none() {
                // The spec of a pod is immutable: only a new pod gets one. The lab's pods run
                // no image: the lab itself is their runtime.
                let ports: Vec<Value> = pod
                    .ports
                    .iter()
                    .map(|p| {
                        let mut v =
                            json!({"containerPort": p.port, "protocol": protocol_name(p.protocol)});
                        if let Some(n) = &p.name {
                            v["name"] = json!(n);
                        }
                        v
                    })
                    .collect();
                obj["spec"] = json!({
                    "nodeName": pod.node,
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "main", "image": "malla.dev/lab-pod", "ports": ports}],
                });
            }
        }
        Shape::Service => {
            let svc: Service = parse(key, value)?;
            write_service(&mut obj, &svc);
        }
        Shape::EndpointSlice => {
            let s: EndpointSlice = parse(key, value)?;
            let v1 = kind.resource.version == "v1";
            let meta = obj_mut(&mut obj, "metadata");
            let labels = meta
                .entry("labels")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .ok_or("metadata.labels is not an object")?;
            labels.insert(SERVICE_NAME_LABEL.into(), json!(s.service));
            labels
                .entry(MANAGED_BY)
                .or_insert_with(|| json!("malla.dev"));
            let m = obj.as_object_mut().expect("object");
            m.insert(
                "addressType".into(),
                json!(match s.address_type {
                    AddressType::IPv4 => "IPv4",
                    AddressType::IPv6 => "IPv6",
                }),
            );
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
                        if v1 {
                            v["nodeName"] = json!(n);
                        } else {
                            v["topology"] = json!({"kubernetes.io/hostname": n});
                        }
                    }
                    if let Some(t) = &e.target {
                        v["targetRef"] =
                            json!({"kind": "Pod", "name": t, "namespace": s.namespace});
                    }
                    v
                })
                .collect();
            m.insert("endpoints".into(), json!(eps));
            let ports: Vec<Value> = s
                .ports
                .iter()
                .map(|p| json!({"name": p.name, "protocol": protocol_name(p.protocol), "port": p.port}))
                .collect();
            m.insert("ports".into(), json!(ports));
        }
        Shape::Endpoints => {
            return Err(format!(
                "{key}: this API server serves no EndpointSlice API; endpoints are read-only"
            ))
        }
        Shape::NetworkPolicy => {
            let p: NetworkPolicy = parse(key, value)?;
            obj.as_object_mut().expect("object").insert(
                "spec".into(),
                serde_json::to_value(&p.spec).map_err(|e| e.to_string())?,
            );
        }
    }
    Ok(obj)
}

fn write_service(obj: &mut Value, svc: &Service) {
    let spec = obj_mut(obj, "spec");
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

/// The `status` to write after the object itself, if the value carries one: a pod's addresses
/// and readiness (what the kubelet reports), a load balancer's ingress addresses.
pub fn status(kind: &Kind, key: &str, value: &str) -> Result<Option<Value>, String> {
    match kind.shape {
        Shape::Pod => {
            let pod: Pod = parse(key, value)?;
            if pod.ips.is_empty() {
                return Ok(None);
            }
            let ready = json!([
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "PodScheduled", "status": "True"},
            ]);
            let pod_ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
            Ok(Some(json!({
                "phase": "Running",
                "podIP": pod.ips[0],
                "podIPs": pod_ips,
                "conditions": ready,
                "containerStatuses": [{
                    "name": "main",
                    "ready": true,
                    "started": true,
                    "restartCount": 0,
                    "image": "malla.dev/lab-pod",
                    "imageID": "",
                    "state": {"running": {}},
                }],
            })))
        }
        Shape::Service => {
            let svc: Service = parse(key, value)?;
            if svc.load_balancer_ips.is_empty() {
                return Ok(None);
            }
            let ingress: Vec<Value> = svc
                .load_balancer_ips
                .iter()
                .map(|ip| json!({"ip": ip}))
                .collect();
            Ok(Some(json!({"loadBalancer": {"ingress": ingress}})))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::kinds::{all, kind_of, SliceApi};
    use super::*;

    fn kind(prefix: &str, slices: SliceApi) -> Kind {
        kind_of(&all(slices), prefix).unwrap().clone()
    }

    #[test]
    fn services_round_trip_through_the_native_shape() {
        let k = kind("/malla/services/", SliceApi::V1);
        let svc = Service {
            namespace: "x".into(),
            name: "web".into(),
            kind: ServiceType::NodePort,
            cluster_ips: vec!["198.19.64.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Udp,
                port: 80,
                target_port: Some(TargetPort::Name("web".into())),
                node_port: Some(30080),
            }],
            selector: Some([("app".to_string(), "web".to_string())].into()),
            session_affinity_timeout: Some(30),
            external_traffic_policy: TrafficPolicy::Local,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec!["198.18.200.1".parse().unwrap()],
            load_balancer_ips: vec![],
        };
        let key = "/malla/services/x/web";
        let loc = k.locate(key).unwrap();
        let obj = write(&k, &loc, key, &to_json(&svc), None).unwrap();
        let (k2, v) = read(&k, &obj).unwrap().unwrap();
        assert_eq!(k2, key);
        assert_eq!(serde_json::from_str::<Service>(&v).unwrap(), svc);
    }

    #[test]
    fn slices_of_both_versions_and_endpoints_are_read() {
        let beta = json!({
            "metadata": {"name": "web-abc", "namespace": "x", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.0.5"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "n1"}, "targetRef": {"kind": "Pod", "name": "a"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        });
        let k = kind("/malla/endpointslices/", SliceApi::V1beta1);
        let (key, v) = read(&k, &beta).unwrap().unwrap();
        assert_eq!(key, "/malla/endpointslices/x/web-abc");
        let s: EndpointSlice = serde_json::from_str(&v).unwrap();
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(s.endpoints[0].target.as_deref(), Some("a"));
        // Written back as v1beta1 and read again: the same record.
        let loc = k.locate(&key).unwrap();
        let again = write(&k, &loc, &key, &v, None).unwrap();
        assert_eq!(read(&k, &again).unwrap().unwrap().1, v);

        let eps = json!({
            "metadata": {"name": "web", "namespace": "x"},
            "subsets": [{"addresses": [{"ip": "198.18.0.5", "nodeName": "n1"}], "notReadyAddresses": [{"ip": "fd00::5"}], "ports": [{"port": 8080}]}],
        });
        let k = kind("/malla/endpointslices/", SliceApi::Endpoints);
        let recs = read_endpoints(&k, &eps).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].0, "/malla/endpointslices/x/web-v4");
        let v6: EndpointSlice = serde_json::from_str(&recs[1].1).unwrap();
        assert!(!v6.endpoints[0].conditions.ready);
    }

    #[test]
    fn namespaces_get_their_name_label_and_pods_their_status() {
        let k = kind("/malla/namespaces/", SliceApi::V1);
        let (_, v) = read(&k, &json!({"metadata": {"name": "x"}}))
            .unwrap()
            .unwrap();
        let ns: Namespace = serde_json::from_str(&v).unwrap();
        assert_eq!(ns.labels[NAMESPACE_NAME_LABEL], "x");

        let k = kind("/malla/pods/", SliceApi::V1);
        let pod = Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            node: "n1".into(),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            ips: vec!["198.18.0.5".parse().unwrap()],
        };
        let key = "/malla/pods/x/a";
        let mut obj = write(&k, &k.locate(key).unwrap(), key, &to_json(&pod), None).unwrap();
        obj["status"] = status(&k, key, &to_json(&pod)).unwrap().unwrap();
        let (_, v) = read(&k, &obj).unwrap().unwrap();
        assert_eq!(serde_json::from_str::<Pod>(&v).unwrap(), pod);
    }

    #[test]
    fn custom_records_keep_their_key() {
        let k = kind("/malla/ipam/blocks/", SliceApi::V1);
        let key = "/malla/ipam/blocks/fd00::40-122";
        let loc = k.locate(key).unwrap();
        let obj = write(&k, &loc, key, r#"{"cidr":"fd00::40/122"}"#, None).unwrap();
        assert_ne!(loc.name, "fd00::40-122");
        assert_eq!(
            read(&k, &obj).unwrap().unwrap(),
            (key.to_string(), r#"{"cidr":"fd00::40/122"}"#.to_string())
        );
        assert!(write(&k, &loc, key, "[1]", None).is_err());
    }
}
