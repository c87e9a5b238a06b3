//! A Service as the proxy keeps it: its key, its frontends in the order the service map reads
//! them, its ports and policies. The API form (two names, five lists, a selector) costs ~430
//! bytes a service before the mirror's key; this one ~160, which at 30k services is 8 MB.

use std::net::IpAddr;
use std::sync::Arc;

use malla_api::service::{Protocol, Service, ServiceType, TrafficPolicy};

use super::FrontendKind;

/// One port of a [`ProxyService`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPort {
    /// Matches the EndpointSlice port of the same name.
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// The part of a Service the service map reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyService {
    /// `namespace/name` (as [`Service::key`]), shared with the service map's entries.
    pub key: Arc<str>,
    pub kind: ServiceType,
    /// Cluster IPs, then external IPs, then load-balancer IPs.
    pub frontends: Box<[(IpAddr, FrontendKind)]>,
    pub ports: Box<[ProxyPort]>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    pub external_traffic_policy: TrafficPolicy,
    pub internal_traffic_policy: TrafficPolicy,
}

impl From<&Service> for ProxyService {
    fn from(s: &Service) -> ProxyService {
        let kinds = [
            (&s.cluster_ips, FrontendKind::ClusterIp),
            (&s.external_ips, FrontendKind::ExternalIp),
            (&s.load_balancer_ips, FrontendKind::LoadBalancer),
        ];
        ProxyService {
            key: s.key().into(),
            kind: s.kind,
            frontends: kinds
                .iter()
                .flat_map(|(ips, kind)| ips.iter().map(|ip| (*ip, *kind)))
                .collect(),
            ports: s
                .ports
                .iter()
                .map(|p| ProxyPort {
                    name: p.name.as_str().into(),
                    protocol: p.protocol,
                    port: p.port,
                    node_port: p.node_port,
                })
                .collect(),
            affinity_timeout: s.session_affinity_timeout,
            external_traffic_policy: s.external_traffic_policy,
            internal_traffic_policy: s.internal_traffic_policy,
        }
    }
}

impl ProxyService {
    /// The cluster IPs (the addresses that decide the service's families).
    pub fn cluster_ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.frontends
            .iter()
            .filter(|(_, k)| *k == FrontendKind::ClusterIp)
            .map(|(ip, _)| ip)
    }
}

#[cfg(test)]
mod tests {
    use malla_api::service::ServicePort;

    use super::*;

    #[test]
    fn keeps_frontends_in_kind_order_and_the_ports() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let svc = Service {
            namespace: "ns".into(),
            name: "lb".into(),
            kind: ServiceType::LoadBalancer,
            cluster_ips: vec![ip("10.96.0.1"), ip("fd00:96::1")],
            external_ips: vec![ip("203.0.113.1")],
            load_balancer_ips: vec![ip("203.0.113.2")],
            ports: vec![ServicePort {
                name: "https".into(),
                port: 443,
                node_port: Some(30443),
                ..ServicePort::default()
            }],
            session_affinity_timeout: Some(60),
            external_traffic_policy: TrafficPolicy::Local,
            ..Service::default()
        };
        let p = ProxyService::from(&svc);
        assert_eq!(&*p.key, "ns/lb");
        assert_eq!(
            p.frontends.iter().map(|(_, k)| *k).collect::<Vec<_>>(),
            [
                FrontendKind::ClusterIp,
                FrontendKind::ClusterIp,
                FrontendKind::ExternalIp,
                FrontendKind::LoadBalancer
            ]
        );
        assert_eq!(p.cluster_ips().count(), 2);
        assert_eq!(
            p.ports[..],
            [ProxyPort {
                name: "https".into(),
                protocol: Protocol::Tcp,
                port: 443,
                node_port: Some(30443)
            }]
        );
        assert_eq!(
            (p.affinity_timeout, p.external_traffic_policy),
            (Some(60), TrafficPolicy::Local)
        );
    }
}
