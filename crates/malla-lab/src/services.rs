//! Services (and NetworkPolicies) in the lab: parsing `v1/Service` and `discovery.k8s.io/v1/EndpointSlice` manifests
//! (errors name the field), allocating cluster IPs and node ports, and deriving EndpointSlices
//! from a Service's selector over the lab's pods, as the Kubernetes endpoint-slice controller does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort, ServiceType, TargetPort, TrafficPolicy, NODE_PORT_RANGE,
};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

use crate::state::PodState;

/// Lab service addresses: 198.19.64.0/18 and fd00:198:19:ff::/112.
pub const SERVICE_CIDR_V4: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 19, 64, 0), 1 << 14);
pub const SERVICE_CIDR_V6: (Ipv6Addr, u32) = (
    Ipv6Addr::new(0xfd00, 0x198, 0x19, 0xff, 0, 0, 0, 0),
    1 << 16,
);

/// Which families a service wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// A Service as declared: its cluster IPs may still be unallocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub service: Service,
    /// `clusterIP: None`.
    pub headless: bool,
    pub family_policy: FamilyPolicy,
    /// `ipFamilies[0]` is IPv6.
    pub ipv6_first: bool,
}

impl ServiceSpec {
    pub fn key(&self) -> String {
        self.service.key()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sService {
    metadata: Meta,
    spec: K8sServiceSpec,
    #[serde(default)]
    status: Option<K8sServiceStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sServiceSpec {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(rename = "clusterIP", default)]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Option<Vec<String>>,
    #[serde(default)]
    ports: Vec<K8sServicePort>,
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default)]
    session_affinity: Option<String>,
    #[serde(default)]
    session_affinity_config: Option<AffinityConfig>,
    #[serde(default)]
    external_traffic_policy: Option<String>,
    #[serde(default)]
    internal_traffic_policy: Option<String>,
    #[serde(rename = "externalIPs", default)]
    external_ips: Option<Vec<String>>,
    #[serde(default)]
    ip_families: Option<Vec<String>>,
    #[serde(default)]
    ip_family_policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AffinityConfig {
    #[serde(rename = "clientIP", default)]
    client_ip: Option<ClientIpConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientIpConfig {
    #[serde(default)]
    timeout_seconds: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sServicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    port: i64,
    #[serde(default)]
    target_port: Option<serde_yaml::Value>,
    #[serde(default)]
    node_port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sServiceStatus {
    #[serde(default)]
    load_balancer: Option<LbStatus>,
}

#[derive(Deserialize)]
struct LbStatus {
    #[serde(default)]
    ingress: Vec<LbIngress>,
}

#[derive(Deserialize)]
struct LbIngress {
    #[serde(default)]
    ip: Option<String>,
}

type FieldError = (String, String);

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        // "missing field `spec`" at `.` names the field itself.
        if let Some(missing) = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            let field = if path == "." {
                missing.to_string()
            } else {
                format!("{path}.{missing}")
            };
            return (field, "is required".to_string());
        }
        (
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            reason,
        )
    })
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    (field.into(), reason.into())
}

fn protocol(field: &str, p: Option<&str>) -> Result<Protocol, FieldError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(bad(field, format!("{other:?} is not TCP, UDP or SCTP"))),
    }
}

fn port(field: &str, p: i64) -> Result<u16, FieldError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| bad(field, format!("{p} is outside 1-65535")))
}

fn ip(field: &str, s: &str) -> Result<IpAddr, FieldError> {
    s.parse()
        .map_err(|_| bad(field, format!("{s:?} is not an IP address")))
}

fn policy(field: &str, p: Option<&str>) -> Result<TrafficPolicy, FieldError> {
    match p.unwrap_or("Cluster") {
        "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(bad(field, format!("{other:?} is not Cluster or Local"))),
    }
}

/// Parses and validates a `v1/Service` document.
pub fn parse_service(v: &Value) -> Result<ServiceSpec, FieldError> {
    let k: K8sService = typed(v)?;
    let spec = k.spec;
    let kind = match spec.kind.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => {
            return Err(bad(
                "spec.type",
                "ExternalName services have no proxy rules; not supported by the lab",
            ))
        }
        other => {
            return Err(bad(
                "spec.type",
                format!("{other:?} is not ClusterIP, NodePort or LoadBalancer"),
            ))
        }
    };
    let headless = spec.cluster_ip.as_deref() == Some("None");
    let mut cluster_ips = Vec::new();
    if let Some(ips) = &spec.cluster_ips {
        for (i, s) in ips.iter().enumerate() {
            if s != "None" {
                cluster_ips.push(ip(&format!("spec.clusterIPs[{i}]"), s)?);
            }
        }
    } else if let Some(s) = spec
        .cluster_ip
        .as_deref()
        .filter(|s| *s != "None" && !s.is_empty())
    {
        cluster_ips.push(ip("spec.clusterIP", s)?);
    }
    if headless && kind != ServiceType::ClusterIP {
        return Err(bad(
            "spec.clusterIP",
            "None (headless) is only valid for type ClusterIP",
        ));
    }
    if spec.ports.is_empty() && !headless {
        return Err(bad("spec.ports", "at least one port is required"));
    }
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        let name = p.name.clone().unwrap_or_default();
        if spec.ports.len() > 1 && name.is_empty() {
            return Err(bad(
                f("name"),
                "required when a service has more than one port",
            ));
        }
        if !names.insert(name.clone()) {
            return Err(bad(f("name"), format!("{name:?} is used twice")));
        }
        let target_port = match &p.target_port {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(TargetPort::Number(port(
                &f("targetPort"),
                n.as_i64().unwrap_or(0),
            )?)),
            Some(Value::String(s)) => match s.parse::<i64>() {
                Ok(n) => Some(TargetPort::Number(port(&f("targetPort"), n)?)),
                Err(_) if !s.is_empty() && s.len() <= 15 => Some(TargetPort::Name(s.clone())),
                Err(_) => {
                    return Err(bad(
                        f("targetPort"),
                        format!("{s:?} is not a port number or name"),
                    ))
                }
            },
            Some(_) => return Err(bad(f("targetPort"), "must be a number or a port name")),
        };
        let node_port = match p.node_port {
            None => None,
            Some(n) => {
                if kind == ServiceType::ClusterIP {
                    return Err(bad(
                        f("nodePort"),
                        "only NodePort and LoadBalancer services have node ports",
                    ));
                }
                let n = port(&f("nodePort"), n)?;
                if !NODE_PORT_RANGE.contains(&n) {
                    return Err(bad(
                        f("nodePort"),
                        format!(
                            "{n} is outside {}-{}",
                            NODE_PORT_RANGE.start(),
                            NODE_PORT_RANGE.end()
                        ),
                    ));
                }
                Some(n)
            }
        };
        ports.push(ServicePort {
            name,
            protocol: protocol(&f("protocol"), p.protocol.as_deref())?,
            port: port(&f("port"), p.port)?,
            target_port,
            node_port,
        });
    }
    let session_affinity_timeout = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => None,
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(10800);
            if !(1..=86400).contains(&t) {
                return Err(bad(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is outside 1-86400"),
                ));
            }
            Some(t)
        }
        other => {
            return Err(bad(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ))
        }
    };
    let external_traffic_policy = policy(
        "spec.externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
    )?;
    if external_traffic_policy == TrafficPolicy::Local && kind == ServiceType::ClusterIP {
        return Err(bad(
            "spec.externalTrafficPolicy",
            "Local is only valid for NodePort and LoadBalancer services",
        ));
    }
    let mut external_ips = Vec::new();
    for (i, s) in spec.external_ips.unwrap_or_default().iter().enumerate() {
        external_ips.push(ip(&format!("spec.externalIPs[{i}]"), s)?);
    }
    let mut load_balancer_ips = Vec::new();
    for (i, ing) in k
        .status
        .and_then(|s| s.load_balancer)
        .map(|l| l.ingress)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(s) = &ing.ip {
            load_balancer_ips.push(ip(&format!("status.loadBalancer.ingress[{i}].ip"), s)?);
        }
    }
    let family_policy = match spec.ip_family_policy.as_deref().unwrap_or("SingleStack") {
        "SingleStack" => FamilyPolicy::SingleStack,
        "PreferDualStack" => FamilyPolicy::PreferDualStack,
        "RequireDualStack" => FamilyPolicy::RequireDualStack,
        other => {
            return Err(bad(
                "spec.ipFamilyPolicy",
                format!("{other:?} is not SingleStack, PreferDualStack or RequireDualStack"),
            ))
        }
    };
    let ipv6_first = match spec
        .ip_families
        .as_ref()
        .and_then(|f| f.first())
        .map(String::as_str)
    {
        None | Some("IPv4") => false,
        Some("IPv6") => true,
        Some(other) => {
            return Err(bad(
                "spec.ipFamilies[0]",
                format!("{other:?} is not IPv4 or IPv6"),
            ))
        }
    };
    let _ = k.metadata.labels;
    Ok(ServiceSpec {
        service: Service {
            namespace: k.metadata.namespace.unwrap_or_else(|| "default".into()),
            name: k.metadata.name,
            kind,
            cluster_ips,
            ports,
            selector: spec.selector,
            session_affinity_timeout,
            external_traffic_policy,
            internal_traffic_policy: policy(
                "spec.internalTrafficPolicy",
                spec.internal_traffic_policy.as_deref(),
            )?,
            external_ips,
            load_balancer_ips,
        },
        headless,
        family_policy,
        ipv6_first,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sSlice {
    metadata: Meta,
    address_type: String,
    #[serde(default)]
    endpoints: Vec<K8sEndpoint>,
    #[serde(default)]
    ports: Vec<K8sEndpointPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<K8sConditions>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    target_ref: Option<TargetRef>,
}

#[derive(Deserialize)]
struct K8sConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRef {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct K8sEndpointPort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    port: i64,
}

/// Parses and validates a `discovery.k8s.io/v1/EndpointSlice` document.
pub fn parse_endpoint_slice(v: &Value) -> Result<EndpointSlice, FieldError> {
    let k: K8sSlice = typed(v)?;
    let namespace = k.metadata.namespace.unwrap_or_else(|| "default".into());
    let service = k
        .metadata
        .labels
        .get("kubernetes.io/service-name")
        .cloned()
        .ok_or_else(|| {
            bad(
                "metadata.labels.kubernetes.io/service-name",
                "is required: it names the owning Service",
            )
        })?;
    let address_type = match k.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        other => {
            return Err(bad(
                "addressType",
                format!("{other:?} is not IPv4 or IPv6 (FQDN is not supported)"),
            ))
        }
    };
    let mut endpoints = Vec::new();
    for (i, e) in k.endpoints.iter().enumerate() {
        if e.addresses.is_empty() {
            return Err(bad(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            ));
        }
        let mut addresses = Vec::new();
        for (j, a) in e.addresses.iter().enumerate() {
            let f = format!("endpoints[{i}].addresses[{j}]");
            let addr = ip(&f, a)?;
            if addr.is_ipv6() != (address_type == AddressType::IPv6) {
                return Err(bad(
                    f,
                    format!("{addr} does not match addressType {}", k.address_type),
                ));
            }
            addresses.push(addr);
        }
        let c = e.conditions.as_ref();
        endpoints.push(Endpoint {
            addresses,
            conditions: EndpointConditions {
                ready: c.and_then(|c| c.ready).unwrap_or(true),
                serving: c.and_then(|c| c.serving),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            },
            node_name: e.node_name.as_deref().map(Into::into),
            target: e.target_ref.as_ref().and_then(|t| {
                Some(format!(
                    "{}/{}",
                    t.namespace.clone().unwrap_or_else(|| namespace.clone()),
                    t.name.clone()?
                ))
            }),
        });
    }
    let mut ports = Vec::new();
    for (i, p) in k.ports.iter().enumerate() {
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(&format!("ports[{i}].protocol"), p.protocol.as_deref())?,
            port: port(&format!("ports[{i}].port"), p.port)?,
        });
    }
    Ok(EndpointSlice {
        namespace,
        name: k.metadata.name,
        service,
        address_type,
        endpoints,
        ports,
    })
}

/// Gives every service its cluster IPs (families by policy and what the lab has) and node ports,
/// keeping what was allocated before.
pub fn allocate(
    spec: &ServiceSpec,
    dual_stack_lab: bool,
    taken_ips: &BTreeSet<IpAddr>,
    taken_ports: &BTreeSet<u16>,
) -> anyhow::Result<Service> {
    let mut svc = spec.service.clone();
    if !spec.headless && svc.cluster_ips.is_empty() {
        let v6_first = spec.ipv6_first && dual_stack_lab;
        let both = dual_stack_lab && spec.family_policy != FamilyPolicy::SingleStack;
        anyhow::ensure!(
            dual_stack_lab || spec.family_policy != FamilyPolicy::RequireDualStack,
            "service {}: spec.ipFamilyPolicy: RequireDualStack needs a dual-stack lab (--ipv6)",
            svc.key()
        );
        let mut families = vec![v6_first];
        if both {
            families.push(!v6_first);
        }
        for v6 in families {
            svc.cluster_ips.push(
                free_ip(v6, taken_ips, &svc.cluster_ips)
                    .ok_or_else(|| anyhow::anyhow!("service CIDR exhausted"))?,
            );
        }
    }
    if svc.kind != ServiceType::ClusterIP {
        let mut used: BTreeSet<u16> = taken_ports.clone();
        for p in &svc.ports {
            if let Some(n) = p.node_port {
                anyhow::ensure!(
                    !taken_ports.contains(&n),
                    "service {}: nodePort {n} is already allocated",
                    svc.key()
                );
                used.insert(n);
            }
        }
        for p in svc.ports.iter_mut().filter(|p| p.node_port.is_none()) {
            let n = NODE_PORT_RANGE
                .clone()
                .find(|n| !used.contains(n))
                .ok_or_else(|| anyhow::anyhow!("node ports exhausted"))?;
            used.insert(n);
            p.node_port = Some(n);
        }
    }
    Ok(svc)
}

fn free_ip(v6: bool, taken: &BTreeSet<IpAddr>, mine: &[IpAddr]) -> Option<IpAddr> {
    // Offset 0 is the network and offset 1 the API server's own `kubernetes` Service (on a
    // lab whose datastore is a real API server it is taken).
    let candidates: Box<dyn Iterator<Item = IpAddr>> = if v6 {
        let base = u128::from(SERVICE_CIDR_V6.0);
        Box::new(
            (2..SERVICE_CIDR_V6.1).map(move |i| IpAddr::V6(Ipv6Addr::from(base + u128::from(i)))),
        )
    } else {
        let base = u32::from(SERVICE_CIDR_V4.0);
        Box::new((2..SERVICE_CIDR_V4.1 - 1).map(move |i| IpAddr::V4(Ipv4Addr::from(base + i))))
    };
    candidates
        .into_iter()
        .find(|ip| !taken.contains(ip) && !mine.contains(ip))
}

/// Name of a derived slice.
fn slice_name(svc: &str, v6: bool, n: usize) -> String {
    format!("{svc}-{}-{n}", if v6 { "ipv6" } else { "ipv4" })
}

/// The EndpointSlices the endpoint-slice controller would keep for `svc` over `pods`:
/// selected pods, per address family, grouped by their resolved port numbers (a named
/// `targetPort` resolves per pod through its container ports; a pod without it is left out).
pub fn derive_slices(svc: &Service, pods: &[&PodState]) -> Vec<EndpointSlice> {
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    // Endpoints grouped by (is IPv6, resolved ports): one slice per group.
    type ResolvedPorts = Vec<(String, Protocol, u16)>;
    let mut groups: BTreeMap<(bool, ResolvedPorts), Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        if pod.namespace != svc.namespace
            || !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
        {
            continue;
        }
        let mut resolved = Vec::new();
        for sp in &svc.ports {
            let number = match &sp.target_port {
                None => Some(sp.port),
                Some(TargetPort::Number(n)) => Some(*n),
                Some(TargetPort::Name(name)) => pod
                    .ports
                    .iter()
                    .find(|p| {
                        p.name.as_deref() == Some(name.as_str()) && p.protocol == sp.protocol.nft()
                    })
                    .map(|p| p.port),
            };
            if let Some(n) = number {
                resolved.push((sp.name.clone(), sp.protocol, n));
            }
        }
        if resolved.is_empty() {
            continue;
        }
        for ip in &pod.ips {
            groups
                .entry((ip.is_ipv6(), resolved.clone()))
                .or_default()
                .push(Endpoint {
                    addresses: vec![*ip],
                    conditions: EndpointConditions::default(),
                    node_name: Some(pod.node.as_str().into()),
                    target: Some(pod.key()),
                });
        }
    }
    let mut counters: BTreeMap<bool, usize> = BTreeMap::new();
    groups
        .into_iter()
        .map(|((v6, ports), endpoints)| {
            let n = counters.entry(v6).or_default();
            *n += 1;
            EndpointSlice {
                namespace: svc.namespace.clone(),
                name: slice_name(&svc.name, v6, *n),
                service: svc.name.clone(),
                address_type: if v6 {
                    AddressType::IPv6
                } else {
                    AddressType::IPv4
                },
                endpoints,
                ports: ports
                    .into_iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name,
                        protocol,
                        port,
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PortSpec;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn service_fields_are_checked_by_name() {
        let e = parse_service(&yaml("metadata: {name: s}\nspec: {ports: [{port: 99999}]}"))
            .unwrap_err();
        assert_eq!(e.0, "spec.ports[0].port");
        let e = parse_service(&yaml(
            "metadata: {name: s}\nspec: {ports: [{port: 80}, {port: 81}]}",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.ports[0].name");
        let e = parse_service(&yaml(
            "metadata: {name: s}\nspec: {type: NodePort, ports: [{port: 80, nodePort: 80}]}",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.ports[0].nodePort");
        let e =
            parse_service(&yaml("metadata: {name: s}\nspec: {ports: [{port: x}]}")).unwrap_err();
        assert_eq!(e.0, "spec.ports[0].port", "{e:?}");
        let e = parse_service(&yaml(
            "metadata: {name: s}\nspec: {externalTrafficPolicy: Local, ports: [{port: 80}]}",
        ))
        .unwrap_err();
        assert_eq!(e.0, "spec.externalTrafficPolicy");
        let ok = parse_service(&yaml(
            "metadata: {name: s, namespace: n}\nspec: {type: NodePort, sessionAffinity: ClientIP, selector: {app: a}, ports: [{name: web, port: 80, targetPort: http}]}",
        ))
        .unwrap();
        assert_eq!(ok.service.session_affinity_timeout, Some(10800));
        assert_eq!(
            ok.service.ports[0].target_port,
            Some(TargetPort::Name("http".into()))
        );
    }

    #[test]
    fn slices_parse_and_check_families() {
        let s = parse_endpoint_slice(&yaml(
            "metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.0.5], conditions: {ready: false, serving: true, terminating: true}}]\nports: [{name: web, port: 8080}]",
        ))
        .unwrap();
        assert_eq!(s.service, "s");
        assert!(s.endpoints[0].conditions.serving() && !s.endpoints[0].conditions.ready);
        let e = parse_endpoint_slice(&yaml("metadata: {name: s-1, labels: {kubernetes.io/service-name: s}}\naddressType: IPv6\nendpoints: [{addresses: [198.18.0.5]}]")).unwrap_err();
        assert_eq!(e.0, "endpoints[0].addresses[0]");
        let e =
            parse_endpoint_slice(&yaml("metadata: {name: s-1}\naddressType: IPv4")).unwrap_err();
        assert!(e.0.contains("service-name"));
    }

    fn pod(name: &str, app: &str, ips: &[&str], ports: &[(u16, Option<&str>)]) -> PodState {
        PodState {
            namespace: "default".into(),
            name: name.into(),
            node: "node-1".into(),
            netns: String::new(),
            container_id: String::new(),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|(p, n)| PortSpec {
                    port: *p,
                    protocol: "tcp".into(),
                    name: n.map(str::to_string),
                })
                .collect(),
            labels: [("app".to_string(), app.to_string())].into(),
            probe_pid: None,
        }
    }

    #[test]
    fn derived_slices_resolve_named_ports_per_pod() {
        let svc = parse_service(&yaml("metadata: {name: web}\nspec: {selector: {app: web}, ports: [{port: 80, targetPort: http}]}")).unwrap().service;
        let a = pod(
            "a",
            "web",
            &["198.18.0.1", "fd00::1"],
            &[(8080, Some("http"))],
        );
        let b = pod("b", "web", &["198.18.0.2"], &[(9090, Some("http"))]);
        let c = pod("c", "web", &["198.18.0.3"], &[(8080, None)]);
        let other = pod("d", "db", &["198.18.0.4"], &[(8080, Some("http"))]);
        let slices = derive_slices(&svc, &[&a, &b, &c, &other]);
        let v4: Vec<_> = slices
            .iter()
            .filter(|s| s.address_type == AddressType::IPv4)
            .collect();
        assert_eq!(v4.len(), 2, "two port groups: {slices:#?}");
        let ports: BTreeSet<u16> = v4.iter().map(|s| s.ports[0].port).collect();
        assert_eq!(ports, [8080, 9090].into());
        assert!(
            slices.iter().all(|s| s
                .endpoints
                .iter()
                .all(|e| e.target.as_deref() != Some("default/c"))),
            "no named port, no endpoint"
        );
        assert_eq!(
            slices
                .iter()
                .filter(|s| s.address_type == AddressType::IPv6)
                .count(),
            1
        );
    }

    #[test]
    fn allocation_picks_free_ips_and_node_ports() {
        let spec = parse_service(&yaml("metadata: {name: s}\nspec: {type: NodePort, ipFamilyPolicy: PreferDualStack, ports: [{name: a, port: 80}, {name: b, port: 81, nodePort: 30000}]}")).unwrap();
        let taken: BTreeSet<IpAddr> = ["198.19.64.2".parse().unwrap()].into();
        let svc = allocate(&spec, true, &taken, &BTreeSet::new()).unwrap();
        // .1 is the `kubernetes` Service's, .2 taken.
        assert_eq!(
            svc.cluster_ips,
            vec![
                "198.19.64.3".parse::<IpAddr>().unwrap(),
                "fd00:198:19:ff::2".parse().unwrap()
            ]
        );
        assert_eq!(svc.ports[0].node_port, Some(30001));
        assert!(
            allocate(&spec, false, &taken, &[30000].into()).is_err(),
            "nodePort clash"
        );
    }
}

#[derive(Deserialize)]
struct K8sNetworkPolicy {
    metadata: Meta,
    #[serde(default)]
    spec: malla_api::policy::NetworkPolicySpec,
}

/// Parses a `networking.k8s.io/v1/NetworkPolicy` and validates it as the API server would.
pub fn parse_network_policy(v: &Value) -> Result<malla_api::policy::NetworkPolicy, FieldError> {
    let k: K8sNetworkPolicy = typed(v)?;
    let policy = malla_api::policy::NetworkPolicy {
        namespace: k.metadata.namespace.unwrap_or_else(|| "default".into()),
        name: k.metadata.name,
        spec: k.spec,
    };
    policy.validate()?;
    Ok(policy)
}
