//! An EndpointSlice as the proxy keeps it: the owning service, the ports, and per endpoint
//! what decides where a packet goes — the first address (the one Kubernetes says consumers use),
//! the conditions and the node. At 300k endpoints the API form (every address, the pod
//! reference, a shared string per node name) is ~70 bytes an endpoint; this one is 24.

use std::net::IpAddr;

use malla_api::service::{EndpointConditions, EndpointSlice, Protocol};

use super::{IpFamily, NodeName};

/// One endpoint of a [`ProxySlice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyEndpoint {
    pub ip: IpAddr,
    pub conditions: EndpointConditions,
    pub node: Option<NodeName>,
}

/// A port of a [`ProxySlice`] (24 bytes; the API's, with its name a `String`, is 32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// Matches the service port of the same name.
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// The part of an EndpointSlice the service map reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySlice {
    /// The owning service, `namespace/name` (as [`malla_api::service::Service::key`]).
    pub service: Box<str>,
    pub family: IpFamily,
    pub ports: Box<[SlicePort]>,
    /// The endpoints whose first address is of the slice's family, in the slice's order.
    pub endpoints: Box<[ProxyEndpoint]>,
}

impl From<&EndpointSlice> for ProxySlice {
    fn from(s: &EndpointSlice) -> ProxySlice {
        let family = IpFamily::of_slice(s.address_type);
        ProxySlice {
            service: format!("{}/{}", s.namespace, s.service).into(),
            family,
            ports: s
                .ports
                .iter()
                .map(|p| SlicePort {
                    name: p.name.as_str().into(),
                    protocol: p.protocol,
                    port: p.port,
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .filter_map(|ep| {
                    let ip = *ep.addresses.first()?;
                    (IpFamily::of(&ip) == family).then(|| ProxyEndpoint {
                        ip,
                        conditions: ep.conditions,
                        node: ep.node_name.as_deref().map(NodeName::intern),
                    })
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use malla_api::service::{AddressType, Endpoint, EndpointPort};

    use super::*;

    #[test]
    fn keeps_the_first_address_of_the_family_and_the_node() {
        let ep = |addrs: &[&str], node: Option<&str>| Endpoint {
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            conditions: EndpointConditions::default(),
            node_name: node.map(Into::into),
            target: Some("default/pod".into()),
        };
        let slice = EndpointSlice {
            namespace: "ns".into(),
            name: "web-abc".into(),
            service: "web".into(),
            address_type: AddressType::IPv4,
            endpoints: vec![
                ep(&["198.18.0.1", "198.18.0.2"], Some("n1")),
                ep(&["fd00::1"], Some("n1")),
                ep(&[], None),
                ep(&["198.18.0.3"], None),
            ],
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        };
        let p = ProxySlice::from(&slice);
        assert_eq!(&*p.service, "ns/web");
        assert_eq!(p.family, IpFamily::IPv4);
        assert_eq!(p.ports[0].port, 8080);
        let got: Vec<(String, Option<&str>)> = p
            .endpoints
            .iter()
            .map(|e| (e.ip.to_string(), e.node.map(NodeName::as_str)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("198.18.0.1".to_string(), Some("n1")),
                ("198.18.0.3".to_string(), None)
            ]
        );
        assert_eq!(std::mem::size_of::<ProxyEndpoint>(), 24);
        assert_eq!(std::mem::size_of::<SlicePort>(), 24);
        assert_eq!(&*p.ports[0].name, "http");
    }
}
