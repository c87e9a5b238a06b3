//! Native objects (JSON, as an API server or a manifest gives them) to Malla's records.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::api::networking::v1 as networking;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use super::decode::typed;
use super::{
    is_dns_name, FamilyPolicy, FieldError, ServiceSpec, SliceVersion, Strictness,
    SERVICE_NAME_LABEL,
};
use crate::policy::{
    EgressRule, IngressRule, IpBlock, LabelSelector, LabelSelectorRequirement, NetworkPolicy,
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, PolicyType,
};
use crate::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, ServicePort,
    ServiceType, TargetPort, TrafficPolicy, NODE_PORT_RANGE,
};
use crate::{ContainerPort, Namespace, Pod};

type Result<T> = std::result::Result<T, FieldError>;

fn bad<T>(path: impl Into<String>, reason: impl Into<String>) -> Result<T> {
    Err(FieldError::new(path, reason))
}

/// `metadata.name`, checked as Kubernetes checks it when strict.
fn name_of(m: &meta::ObjectMeta, s: Strictness) -> Result<String> {
    let Some(name) = m.name.clone() else {
        return bad("metadata.name", "is required");
    };
    if s == Strictness::Strict && !is_dns_name(&name, 253, true) {
        return bad(
            "metadata.name",
            format!("{name:?} is not a valid name (lowercase letters, digits, '-', '.')"),
        );
    }
    Ok(name)
}

/// `metadata.namespace` (default `default`) and `metadata.name` of a namespaced object.
fn identity(m: &meta::ObjectMeta, s: Strictness) -> Result<(String, String)> {
    let namespace = m.namespace.clone().unwrap_or_else(|| "default".into());
    if s == Strictness::Strict && !is_dns_name(&namespace, 63, false) {
        return bad(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace"),
        );
    }
    Ok((namespace, name_of(m, s)?))
}

fn protocol(p: Option<&str>, path: impl FnOnce() -> String) -> Result<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => bad(path(), format!("{other:?} is not TCP, UDP or SCTP")),
    }
}

fn port(n: i32, path: impl FnOnce() -> String) -> Result<u16> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p > 0)
        .map_or_else(|| bad(path(), format!("{n} is outside 1-65535")), Ok)
}

fn ip(s: &str, path: impl FnOnce() -> String) -> Result<IpAddr> {
    s.parse()
        .map_or_else(|_| bad(path(), format!("{s:?} is not an IP address")), Ok)
}

/// A `v1/Namespace`. (The `kubernetes.io/metadata.name` label is the server's to add.)
pub fn namespace(v: Value, s: Strictness) -> Result<Namespace> {
    let ns: core::Namespace = typed(v, s)?;
    let name = name_of(&ns.metadata, s)?;
    if s == Strictness::Strict && !is_dns_name(&name, 63, false) {
        return bad(
            "metadata.name",
            "a namespace name is a DNS label (no dots, at most 63)",
        );
    }
    Ok(Namespace {
        name,
        labels: ns.metadata.labels.unwrap_or_default(),
    })
}

/// A `v1/Pod`: labels, `spec.nodeName`, `containers[].ports` and `status.podIPs`.
pub fn pod(v: Value, s: Strictness) -> Result<Pod> {
    let p: core::Pod = typed(v, s)?;
    let (namespace, name) = identity(&p.metadata, s)?;
    let strict = s == Strictness::Strict;
    let spec = match p.spec {
        Some(spec) => spec,
        None if strict => return bad("spec", "is required"),
        None => Default::default(),
    };
    if strict && spec.containers.is_empty() {
        return bad("spec.containers", "must have at least one container");
    }
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().enumerate() {
        // k8s-openapi reads a missing required string as empty.
        if strict && c.name.is_empty() {
            return bad(format!("spec.containers[{ci}].name"), "is required");
        }
        for (pi, cp) in c.ports.iter().flatten().enumerate() {
            let f = |x: &str| format!("spec.containers[{ci}].ports[{pi}].{x}");
            if strict {
                if let Some(n) = &cp.name {
                    if !is_dns_name(n, 15, false) {
                        return bad(
                            f("name"),
                            format!("{n:?} is not a valid port name (a DNS label of at most 15 characters)"),
                        );
                    }
                }
            }
            ports.push(ContainerPort {
                name: cp.name.clone(),
                protocol: protocol(cp.protocol.as_deref(), || f("protocol"))?,
                port: port(cp.container_port, || f("containerPort"))?,
            });
        }
    }
    let status = p.status.unwrap_or_default();
    let mut ips = Vec::new();
    for (i, a) in status.pod_ips.iter().flatten().enumerate() {
        ips.push(ip(&a.ip, || format!("status.podIPs[{i}].ip"))?);
    }
    if ips.is_empty() {
        if let Some(a) = status.pod_ip.as_deref().filter(|a| !a.is_empty()) {
            ips.push(ip(a, || "status.podIP".into())?);
        }
    }
    let allowed_source_prefixes = match p
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(crate::ALLOWED_SOURCE_PREFIXES))
    {
        None => Vec::new(),
        Some(v) => match crate::parse_source_prefixes(v) {
            Ok(prefixes) => prefixes,
            Err(e) if strict => {
                return bad(
                    format!("metadata.annotations[{:?}]", crate::ALLOWED_SOURCE_PREFIXES),
                    e,
                )
            }
            Err(e) => {
                // The API server took it: the pod stays, with no extra prefix (never wider).
                tracing::warn!(
                    pod = %format!("{namespace}/{name}"),
                    field = %format!("metadata.annotations[{:?}]", crate::ALLOWED_SOURCE_PREFIXES),
                    error = %e,
                    "ignoring the pod's allowed source prefixes"
                );
                Vec::new()
            }
        },
    };
    Ok(Pod {
        namespace,
        name,
        labels: p.metadata.labels.unwrap_or_default(),
        node: spec.node_name.unwrap_or_default(),
        ports,
        ips,
        allowed_source_prefixes,
        host_network: spec.host_network.unwrap_or(false),
    })
}

fn traffic_policy(p: Option<&str>, strict: bool, path: &str) -> Result<TrafficPolicy> {
    match p.unwrap_or("Cluster") {
        "Local" => Ok(TrafficPolicy::Local),
        "Cluster" => Ok(TrafficPolicy::Cluster),
        _ if !strict => Ok(TrafficPolicy::Cluster),
        other => bad(path, format!("{other:?} is not Cluster or Local")),
    }
}

/// A `v1/Service`. Strict, it is checked as the API server would (and ExternalName, which has
/// no proxy rules, is refused); lenient, an ExternalName service is a ClusterIP one without
/// addresses.
pub fn service(v: Value, s: Strictness) -> Result<ServiceSpec> {
    let k: core::Service = typed(v, s)?;
    let strict = s == Strictness::Strict;
    let (namespace, name) = identity(&k.metadata, s)?;
    let spec = match k.spec {
        Some(spec) => spec,
        None if strict => return bad("spec", "is required"),
        None => Default::default(),
    };
    let kind = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" if strict => {
            return bad(
                "spec.type",
                "ExternalName services have no proxy rules; not supported",
            )
        }
        _ if !strict => ServiceType::ClusterIP,
        other => {
            return bad(
                "spec.type",
                format!("{other:?} is not ClusterIP, NodePort or LoadBalancer"),
            )
        }
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut cluster_ips = Vec::new();
    if let Some(list) = &spec.cluster_ips {
        for (i, a) in list.iter().enumerate() {
            if a != "None" && !a.is_empty() {
                cluster_ips.push(ip(a, || format!("spec.clusterIPs[{i}]"))?);
            }
        }
    }
    if cluster_ips.is_empty() {
        if let Some(a) = spec
            .cluster_ip
            .as_deref()
            .filter(|a| *a != "None" && !a.is_empty())
        {
            cluster_ips.push(ip(a, || "spec.clusterIP".into())?);
        }
    }
    let service_ports = spec.ports.unwrap_or_default();
    if strict {
        if headless && kind != ServiceType::ClusterIP {
            return bad(
                "spec.clusterIP",
                "None (headless) is only valid for type ClusterIP",
            );
        }
        if service_ports.is_empty() && !headless {
            return bad("spec.ports", "at least one port is required");
        }
    }
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in service_ports.iter().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        let port_name = p.name.clone().unwrap_or_default();
        if strict {
            if service_ports.len() > 1 && port_name.is_empty() {
                return bad(f("name"), "required when a service has more than one port");
            }
            if !names.insert(port_name.clone()) {
                return bad(f("name"), format!("{port_name:?} is used twice"));
            }
        }
        let target_port = match &p.target_port {
            None => None,
            Some(IntOrString::Int(n)) => Some(TargetPort::Number(port(*n, || f("targetPort"))?)),
            Some(IntOrString::String(t)) => match t.parse::<i32>() {
                Ok(n) => Some(TargetPort::Number(port(n, || f("targetPort"))?)),
                Err(_) if !strict || (!t.is_empty() && t.len() <= 15) => {
                    Some(TargetPort::Name(t.clone()))
                }
                Err(_) => {
                    return bad(
                        f("targetPort"),
                        format!("{t:?} is not a port number or name"),
                    )
                }
            },
        };
        let node_port = match p.node_port {
            None => None,
            Some(0) if !strict => None,
            Some(n) => {
                let n = port(n, || f("nodePort"))?;
                if strict && kind == ServiceType::ClusterIP {
                    return bad(
                        f("nodePort"),
                        "only NodePort and LoadBalancer services have node ports",
                    );
                }
                if strict && !NODE_PORT_RANGE.contains(&n) {
                    return bad(
                        f("nodePort"),
                        format!(
                            "{n} is outside {}-{}",
                            NODE_PORT_RANGE.start(),
                            NODE_PORT_RANGE.end()
                        ),
                    );
                }
                Some(n)
            }
        };
        ports.push(ServicePort {
            name: port_name,
            protocol: protocol(p.protocol.as_deref(), || f("protocol"))?,
            port: port(p.port, || f("port"))?,
            target_port,
            node_port,
        });
    }
    let session_affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            match u32::try_from(t).ok().filter(|t| (1..=86400).contains(t)) {
                Some(t) => Some(t),
                None if strict => {
                    return bad(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1-86400"),
                    )
                }
                None => Some(10800),
            }
        }
        "None" => None,
        _ if !strict => None,
        other => {
            return bad(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            )
        }
    };
    let external_traffic_policy = traffic_policy(
        spec.external_traffic_policy.as_deref(),
        strict,
        "spec.externalTrafficPolicy",
    )?;
    if strict && external_traffic_policy == TrafficPolicy::Local && kind == ServiceType::ClusterIP {
        return bad(
            "spec.externalTrafficPolicy",
            "Local is only valid for NodePort and LoadBalancer services",
        );
    }
    let internal_traffic_policy = traffic_policy(
        spec.internal_traffic_policy.as_deref(),
        strict,
        "spec.internalTrafficPolicy",
    )?;
    let mut external_ips = Vec::new();
    for (i, a) in spec.external_ips.iter().flatten().enumerate() {
        external_ips.push(ip(a, || format!("spec.externalIPs[{i}]"))?);
    }
    let mut load_balancer_ips = Vec::new();
    let ingress = k
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress)
        .unwrap_or_default();
    for (i, ing) in ingress.iter().enumerate() {
        if let Some(a) = &ing.ip {
            load_balancer_ips.push(ip(a, || format!("status.loadBalancer.ingress[{i}].ip"))?);
        }
    }
    let family_policy = match spec.ip_family_policy.as_deref().unwrap_or("SingleStack") {
        "SingleStack" => FamilyPolicy::SingleStack,
        "PreferDualStack" => FamilyPolicy::PreferDualStack,
        "RequireDualStack" => FamilyPolicy::RequireDualStack,
        _ if !strict => FamilyPolicy::SingleStack,
        other => {
            return bad(
                "spec.ipFamilyPolicy",
                format!("{other:?} is not SingleStack, PreferDualStack or RequireDualStack"),
            )
        }
    };
    let ipv6_first = match spec.ip_families.as_ref().and_then(|f| f.first()) {
        None => false,
        Some(f) if f == "IPv4" => false,
        Some(f) if f == "IPv6" => true,
        Some(_) if !strict => false,
        Some(other) => {
            return bad(
                "spec.ipFamilies[0]",
                format!("{other:?} is not IPv4 or IPv6"),
            )
        }
    };
    Ok(ServiceSpec {
        service: crate::service::Service {
            namespace,
            name,
            kind,
            cluster_ips,
            ports,
            selector: spec.selector,
            session_affinity_timeout,
            external_traffic_policy,
            internal_traffic_policy,
            external_ips,
            load_balancer_ips,
        },
        headless,
        family_policy,
        ipv6_first,
    })
}

/// `targetRef` as `namespace/name` (the slice's namespace when the reference has none).
fn target_of(r: Option<&core::ObjectReference>, namespace: &str) -> Option<String> {
    let r = r?;
    let name = r.name.as_deref()?;
    if name.contains('/') {
        return Some(name.to_string()); // written by an older Malla as namespace/name
    }
    Some(format!(
        "{}/{name}",
        r.namespace.as_deref().unwrap_or(namespace)
    ))
}

/// A `v1beta1` slice in the `v1` shape: `topology` is `v1`'s `deprecatedTopology`.
fn beta_to_v1(mut v: Value, s: Strictness) -> Result<Value> {
    if let Some(m) = v.as_object_mut() {
        if m.contains_key("apiVersion") {
            m.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
        }
    }
    if let Some(eps) = v.get_mut("endpoints").and_then(Value::as_array_mut) {
        for (i, e) in eps.iter_mut().enumerate() {
            let Some(e) = e.as_object_mut() else { continue };
            if e.contains_key("deprecatedTopology") {
                if s == Strictness::Strict {
                    return bad(
                        format!("endpoints[{i}].deprecatedTopology"),
                        "unknown field in discovery.k8s.io/v1beta1 (it is `topology` there)",
                    );
                }
                e.remove("deprecatedTopology");
            }
            if let Some(t) = e.remove("topology") {
                e.insert("deprecatedTopology".into(), t);
            }
        }
    }
    Ok(v)
}

/// A `discovery.k8s.io` EndpointSlice. `None`, when lenient, for a slice Malla does not route to:
/// an FQDN slice, or one without its service's label (both errors when strict).
pub fn endpoint_slice(
    v: Value,
    version: SliceVersion,
    s: Strictness,
) -> Result<Option<EndpointSlice>> {
    let strict = s == Strictness::Strict;
    let decoded: Result<discovery::EndpointSlice> = match version {
        SliceVersion::V1 => typed(v, s),
        SliceVersion::V1beta1 => typed(beta_to_v1(v, s)?, s).map_err(|mut e| {
            e.path = e.path.replace("deprecatedTopology", "topology");
            e
        }),
    };
    let k = decoded?;
    let (namespace, name) = identity(&k.metadata, s)?;
    let address_type = match k.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        _ if !strict => return Ok(None), // FQDN: nothing to route to
        other => {
            return bad(
                "addressType",
                format!("{other:?} is not IPv4 or IPv6 (FQDN is not supported)"),
            )
        }
    };
    let Some(service) = k
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
    else {
        if !strict {
            return Ok(None);
        }
        return bad(
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            "is required: it names the owning Service",
        );
    };
    let mut endpoints = Vec::new();
    for (i, e) in k.endpoints.iter().enumerate() {
        if strict && e.addresses.is_empty() {
            return bad(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            );
        }
        let mut addresses = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            let f = || format!("endpoints[{i}].addresses[{j}]");
            let addr = ip(a, f)?;
            if addr.is_ipv6() != (address_type == AddressType::IPv6) {
                return bad(
                    f(),
                    format!("{addr} does not match addressType {}", k.address_type),
                );
            }
            addresses.push(addr);
        }
        let c = e.conditions.as_ref();
        let node_name = e.node_name.clone().or_else(|| {
            e.deprecated_topology
                .as_ref()
                .and_then(|t| t.get("kubernetes.io/hostname"))
                .cloned()
        });
        endpoints.push(Endpoint {
            addresses,
            conditions: EndpointConditions {
                // Unset ready means ready (the API's "unknown" is treated as ready).
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            },
            node_name,
            target: target_of(e.target_ref.as_ref(), &namespace),
        });
    }
    let mut ports = Vec::new();
    for (i, p) in k.ports.iter().flatten().enumerate() {
        // A port without a number means "all ports": nothing a service can map.
        let Some(n) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref(), || format!("ports[{i}].protocol"))?,
            port: port(n, || format!("ports[{i}].port"))?,
        });
    }
    Ok(Some(EndpointSlice {
        namespace,
        name,
        service,
        address_type,
        endpoints,
        ports,
    }))
}

/// A core `v1/Endpoints` object (servers without the EndpointSlice API) as one slice per
/// address family, named `NAME-v4` / `NAME-v6`. Only ever read from a server: lenient.
pub fn endpoints(v: Value) -> Result<Vec<EndpointSlice>> {
    let k: core::Endpoints = typed(v, Strictness::Lenient)?;
    let (namespace, name) = identity(&k.metadata, Strictness::Lenient)?;
    let subsets = k.subsets.unwrap_or_default();
    let mut out = Vec::new();
    for (family, suffix) in [(AddressType::IPv4, "v4"), (AddressType::IPv6, "v6")] {
        let mut endpoints = Vec::new();
        let mut ports = Vec::new();
        for (si, subset) in subsets.iter().enumerate() {
            for (list, ready) in [
                (&subset.addresses, true),
                (&subset.not_ready_addresses, false),
            ] {
                for a in list.iter().flatten() {
                    let Ok(addr) = a.ip.parse::<IpAddr>() else {
                        continue;
                    };
                    if addr.is_ipv4() != (family == AddressType::IPv4) {
                        continue;
                    }
                    endpoints.push(Endpoint {
                        addresses: vec![addr],
                        conditions: EndpointConditions {
                            ready,
                            serving: Some(ready),
                            terminating: false,
                        },
                        node_name: a.node_name.clone(),
                        target: target_of(a.target_ref.as_ref(), &namespace),
                    });
                }
            }
            for (pi, p) in subset.ports.iter().flatten().enumerate() {
                let f = |x: &str| format!("subsets[{si}].ports[{pi}].{x}");
                let p = EndpointPort {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: protocol(p.protocol.as_deref(), || f("protocol"))?,
                    port: port(p.port, || f("port"))?,
                };
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        if endpoints.is_empty() {
            continue;
        }
        out.push(EndpointSlice {
            namespace: namespace.clone(),
            name: format!("{name}-{suffix}"),
            service: name.clone(),
            address_type: family,
            endpoints,
            ports,
        });
    }
    Ok(out)
}

fn selector(s: Option<meta::LabelSelector>) -> LabelSelector {
    let s = s.unwrap_or_default();
    LabelSelector {
        match_labels: s.match_labels.unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .unwrap_or_default()
            .into_iter()
            .map(|e| LabelSelectorRequirement {
                key: e.key,
                operator: e.operator.into(),
                values: e.values.unwrap_or_default(),
            })
            .collect(),
    }
}

fn peers(list: Option<Vec<networking::NetworkPolicyPeer>>) -> Vec<NetworkPolicyPeer> {
    list.unwrap_or_default()
        .into_iter()
        .map(|p| NetworkPolicyPeer {
            pod_selector: p.pod_selector.map(|s| selector(Some(s))),
            namespace_selector: p.namespace_selector.map(|s| selector(Some(s))),
            ip_block: p.ip_block.map(|b| IpBlock {
                cidr: b.cidr,
                except: b.except.unwrap_or_default(),
            }),
        })
        .collect()
}

fn policy_ports(
    list: Option<Vec<networking::NetworkPolicyPort>>,
    rule: &str,
) -> Result<Vec<NetworkPolicyPort>> {
    let mut out = Vec::new();
    for (j, p) in list.unwrap_or_default().into_iter().enumerate() {
        let f = |x: &str| format!("{rule}.ports[{j}].{x}");
        let range = |n: i32, x: &str| {
            u16::try_from(n)
                .map_or_else(|_| bad(f(x), "must be between 1 and 65535, inclusive"), Ok)
        };
        out.push(NetworkPolicyPort {
            protocol: protocol(p.protocol.as_deref(), || f("protocol"))?,
            port: match p.port {
                None => None,
                Some(IntOrString::Int(n)) => Some(TargetPort::Number(range(n, "port")?)),
                Some(IntOrString::String(s)) => Some(TargetPort::Name(s)),
            },
            end_port: p.end_port.map(|n| range(n, "endPort")).transpose()?,
        });
    }
    Ok(out)
}

/// A `networking.k8s.io/v1` NetworkPolicy; strict, also validated as the API server does.
pub fn network_policy(v: Value, s: Strictness) -> Result<NetworkPolicy> {
    let k: networking::NetworkPolicy = typed(v, s)?;
    let (namespace, name) = identity(&k.metadata, s)?;
    let spec = k.spec.unwrap_or_default();
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.unwrap_or_default().into_iter().enumerate() {
        ingress.push(IngressRule {
            from: peers(r.from),
            ports: policy_ports(r.ports, &format!("spec.ingress[{i}]"))?,
        });
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.unwrap_or_default().into_iter().enumerate() {
        egress.push(EgressRule {
            to: peers(r.to),
            ports: policy_ports(r.ports, &format!("spec.egress[{i}]"))?,
        });
    }
    let policy = NetworkPolicy {
        namespace,
        name,
        spec: NetworkPolicySpec {
            pod_selector: selector(spec.pod_selector),
            policy_types: spec
                .policy_types
                .map(|t| t.into_iter().map(PolicyType::from).collect()),
            ingress,
            egress,
        },
    };
    if s == Strictness::Strict {
        policy.validate()?;
    }
    Ok(policy)
}
