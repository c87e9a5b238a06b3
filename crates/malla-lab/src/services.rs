//! Services in the lab: allocating cluster IPs and node ports, and deriving EndpointSlices from a
//! Service's selector over the lab's pods, as the Kubernetes endpoint-slice controller does.
//! (Service, EndpointSlice and NetworkPolicy manifests are decoded by `malla_api::k8s`.)

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServiceType, TargetPort, NODE_PORT_RANGE,
};

use crate::addresses::{SERVICE_CIDR_V4, SERVICE_CIDR_V6};
use crate::state::PodState;

/// A Service as declared and the families it wants: decoded by `malla_api::k8s`.
pub use malla_api::k8s::{FamilyPolicy, ServiceSpec};

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

    use malla_api::k8s::{read, SliceVersion, Strictness};

    fn yaml(s: &str) -> serde_json::Value {
        serde_yaml::from_str(s).unwrap()
    }

    /// The strict decoding of `malla_api::k8s`, as (field, reason) on error.
    fn parse_service(v: &serde_json::Value) -> Result<ServiceSpec, (String, String)> {
        read::service(v.clone(), Strictness::Strict).map_err(|e| (e.path, e.reason))
    }

    fn parse_endpoint_slice(v: &serde_json::Value) -> Result<EndpointSlice, (String, String)> {
        read::endpoint_slice(v.clone(), SliceVersion::V1, Strictness::Strict)
            .map(|s| s.expect("strict decoding gives a slice or an error"))
            .map_err(|e| (e.path, e.reason))
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
            allowed_source_prefixes: Vec::new(),
            host_network: false,
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
