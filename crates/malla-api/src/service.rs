//! Services and EndpointSlices as the proxy needs them: the subset of `v1/Service` and
//! `discovery.k8s.io/v1/EndpointSlice` that decides where a packet goes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// L4 protocol of a service port.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The nftables / `meta l4proto` name.
    pub fn nft(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// `targetPort`: a number, or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Required when a service has several ports; matches `EndpointPort.name`.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
    /// Defaults to `port`.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// A Service, as the proxy sees it. `Default` is a `ClusterIP` service without addresses,
/// ports or selector, with `Cluster` traffic policies and no affinity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: ServiceType,
    /// `clusterIPs` (one per family); empty for a headless service.
    #[serde(default)]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Pod label selector; `None` means endpoints are managed by hand.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// `sessionAffinity: ClientIP` with its timeout (seconds); `None` for no affinity.
    #[serde(default)]
    pub session_affinity_timeout: Option<u32>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub internal_traffic_policy: TrafficPolicy,
    #[serde(default)]
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    #[serde(default)]
    pub load_balancer_ips: Vec<IpAddr>,
}

impl Service {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `endpoints[].conditions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    /// A nil `ready` means ready.
    #[serde(default = "yes")]
    pub ready: bool,
    /// A nil `serving` takes the value of `ready`.
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: bool,
}

fn yes() -> bool {
    true
}

impl Default for EndpointConditions {
    fn default() -> Self {
        Self {
            ready: true,
            serving: None,
            terminating: false,
        }
    }
}

impl EndpointConditions {
    pub fn serving(&self) -> bool {
        self.serving.unwrap_or(self.ready)
    }
}

/// One endpoint of a slice. (The proxy keeps a compact form of it, `ProxySlice` in
/// `malla-calc`: a holder of hundreds of thousands of endpoints should not keep this one.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Kubernetes gives exactly one; consumers use the first.
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
    /// `targetRef` as `namespace/name` of the pod, for display.
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressType {
    IPv4,
    IPv6,
}

/// An EndpointSlice of a service (label `kubernetes.io/service-name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The owning service's name.
    pub service: String,
    pub address_type: AddressType,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

/// The default NodePort range.
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 30000..=32767;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_keeps_its_wire_format() {
        let text = r#"{"addresses":["198.18.0.5","198.18.0.6"],"conditions":{"ready":true,"serving":null,"terminating":false},"nodeName":"n1","target":"default/pod-a"}"#;
        let ep: Endpoint = serde_json::from_str(text).unwrap();
        assert_eq!(ep.addresses.len(), 2);
        assert_eq!(ep.node_name.as_deref(), Some("n1"));
        assert_eq!(serde_json::to_string(&ep).unwrap(), text);
        let bare: Endpoint = serde_json::from_str(r#"{"addresses":["fd00::5"]}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"addresses":["fd00::5"],"conditions":{"ready":true,"serving":null,"terminating":false},"nodeName":null,"target":null}"#
        );
    }
}
