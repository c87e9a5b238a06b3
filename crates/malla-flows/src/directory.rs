//! Who an address is: pods (with the policies isolating them each way), nodes, and Service
//! frontends (cluster IPs and node ports), built from the agent's cluster view whenever it
//! changes.

use std::collections::HashMap;
use std::net::IpAddr;

use malla_calc::policy::reference::isolating;
use malla_calc::policy::Direction;
use malla_calc::ClusterView;

use crate::Peer;

/// A pod as flows name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `namespace/name` of the policies isolating it for ingress / egress.
    pub ingress_by: Vec<String>,
    pub egress_by: Vec<String>,
}

/// A test pod: address, namespace, name, policies isolating it for ingress and egress.
pub type TestPod<'a> = (IpAddr, &'a str, &'a str, &'a [&'a str], &'a [&'a str]);

/// Addresses → names.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    pods: HashMap<IpAddr, PodInfo>,
    nodes: HashMap<IpAddr, String>,
    /// (frontend, protocol number, port) → Service `namespace/name`.
    frontends: HashMap<(IpAddr, u8, u16), String>,
    /// (protocol number, node port) → Service.
    node_ports: HashMap<(u8, u16), String>,
}

fn proto_number(p: malla_api::service::Protocol) -> u8 {
    match p.nft() {
        "tcp" => 6,
        "udp" => 17,
        _ => 132,
    }
}

impl Directory {
    /// The directory of `view`.
    pub fn from_view(view: &ClusterView) -> Self {
        let mut d = Directory::default();
        for pod in malla_calc::routes::policy_pods(view) {
            let by = |dir| {
                isolating(&view.policies, &pod, dir)
                    .iter()
                    .map(|p| p.key())
                    .collect::<Vec<_>>()
            };
            let info = PodInfo {
                namespace: pod.namespace.to_string(),
                name: pod.name.to_string(),
                ingress_by: by(Direction::Ingress),
                egress_by: by(Direction::Egress),
            };
            for ip in &pod.ips {
                d.pods.insert(*ip, info.clone());
            }
        }
        for n in &view.nodes {
            for ip in [
                n.underlay_ipv4.map(IpAddr::V4),
                n.underlay_ipv6.map(IpAddr::V6),
            ]
            .into_iter()
            .flatten()
            {
                d.nodes.insert(ip, n.name.clone());
            }
        }
        for s in &view.services {
            for p in s.ports.iter() {
                let proto = proto_number(p.protocol);
                for (ip, _) in s.frontends.iter() {
                    d.frontends.insert((*ip, proto, p.port), s.key.to_string());
                }
                if let Some(np) = p.node_port {
                    d.node_ports.insert((proto, np), s.key.to_string());
                }
            }
        }
        d
    }

    /// The pod at `ip`.
    pub fn pod(&self, ip: IpAddr) -> Option<&PodInfo> {
        self.pods.get(&ip)
    }

    /// `ip` as a flow's end.
    pub fn peer(&self, ip: IpAddr) -> Peer {
        if let Some(p) = self.pods.get(&ip) {
            return Peer {
                namespace: Some(p.namespace.clone()),
                name: Some(p.name.clone()),
                kind: "pod".into(),
                ip,
            };
        }
        if let Some(n) = self.nodes.get(&ip) {
            return Peer {
                namespace: None,
                name: Some(n.clone()),
                kind: "node".into(),
                ip,
            };
        }
        Peer {
            namespace: None,
            name: None,
            kind: "world".into(),
            ip,
        }
    }

    /// The Service a client addressed at `dst:port`: a frontend, or a node port on a node's
    /// address.
    pub fn service(&self, proto: u8, dst: IpAddr, port: u16) -> Option<&str> {
        if let Some(s) = self.frontends.get(&(dst, proto, port)) {
            return Some(s);
        }
        if self.nodes.contains_key(&dst) {
            return self.node_ports.get(&(proto, port)).map(|s| s.as_str());
        }
        None
    }

    /// A directory of the given pods (`ip`, namespace, name, isolating ingress/egress
    /// policies) and Service frontends (`ip`, protocol, port, `namespace/name`), for tests.
    pub fn of(pods: &[TestPod<'_>], frontends: &[(IpAddr, u8, u16, &str)]) -> Self {
        let mut d = Directory::default();
        for (ip, ns, name, ing, eg) in pods {
            d.pods.insert(
                *ip,
                PodInfo {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    ingress_by: ing.iter().map(|s| s.to_string()).collect(),
                    egress_by: eg.iter().map(|s| s.to_string()).collect(),
                },
            );
        }
        for (ip, proto, port, svc) in frontends {
            d.frontends.insert((*ip, *proto, *port), svc.to_string());
        }
        d
    }
}
