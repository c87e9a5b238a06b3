//! Malla's resource types: the objects every other crate reads and writes through the datastore.
//!
//! Everything here is plain data with serde; nothing touches Linux or a store. The key layout
//! (where each object lives in a key-value store) is in [`keys`]; the conversion of native
//! Kubernetes objects to and from these types is in `k8s` (feature `k8s`).

pub mod bgp;
pub mod calico;
pub mod cnp;
pub mod domain;
#[cfg(feature = "k8s")]
pub mod k8s;
pub mod keys;
pub mod kinds;
pub mod policy;
pub mod selector;
pub mod service;
pub mod staged;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use bgp::{BgpConfig, BgpNodeSpec, BgpPeer, NextHopMode, DEFAULT_AS_NUMBER};

/// How packets between pods on different nodes cross the underlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// A plain route per remote block, via the remote node's underlay address (nodes share an L2).
    #[default]
    Direct,
    /// A VXLAN device per node with static FDB and neighbour entries for each remote node.
    Vxlan,
    /// No routes to other nodes from the agent: each node runs a BGP speaker (BIRD) that
    /// announces its blocks and installs what it learns ([`BgpConfig`]). Nodes may sit on
    /// different L2 segments behind routers that peer with them.
    Bgp,
}

impl std::str::FromStr for RoutingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "direct" => Ok(Self::Direct),
            "vxlan" => Ok(Self::Vxlan),
            "bgp" => Ok(Self::Bgp),
            other => Err(format!(
                "unknown routing mode {other:?} (expected direct, vxlan or bgp)"
            )),
        }
    }
}

impl std::fmt::Display for RoutingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct",
            Self::Vxlan => "vxlan",
            Self::Bgp => "bgp",
        })
    }
}

/// Cluster-wide settings, one object per cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    pub routing: RoutingMode,
    /// VXLAN network identifier used by every node's VXLAN device.
    #[serde(default = "default_vni")]
    pub vxlan_vni: u32,
    /// UDP port of the VXLAN overlay.
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    /// Anti-spoofing on every workload interface: only a pod's own addresses (and its
    /// allowed source prefixes) may leave its veth. On unless set to false.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub anti_spoofing: bool,
    /// What happens to traffic from a pod to its own node once the pod's egress policy allowed
    /// it (Felix's `DefaultEndpointToHostAction`).
    #[serde(default, skip_serializing_if = "EndpointToHostAction::is_accept")]
    pub default_endpoint_to_host_action: EndpointToHostAction,
    /// Traffic to these protocols and ports is never blocked by host endpoint policy (absent:
    /// [`calico::default_failsafe_inbound`]; empty: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_inbound_host_ports: Option<Vec<calico::ProtoPort>>,
    /// Traffic from a node to these protocols and ports is never blocked by host endpoint
    /// policy (absent: [`calico::default_failsafe_outbound`]; empty: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_outbound_host_ports: Option<Vec<calico::ProtoPort>>,
    /// Every node gets an all-interfaces host endpoint (`<node>-auto`, labels
    /// `malla.dev/host-endpoint: auto` and `kubernetes.io/hostname: <node>`, profile
    /// `projectcalico-default-allow`), as Calico's `autoCreate`. Off unless set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auto_host_endpoints: bool,
    /// BGP settings for `routing: bgp` (Calico's `BGPConfiguration` and `BGPPeer`s in one);
    /// absent: the defaults ([`BgpConfig::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
}

impl ClusterConfig {
    /// The inbound failsafe ports in force.
    pub fn failsafe_inbound(&self) -> Vec<calico::ProtoPort> {
        self.failsafe_inbound_host_ports
            .clone()
            .unwrap_or_else(calico::default_failsafe_inbound)
    }

    /// The outbound failsafe ports in force.
    pub fn failsafe_outbound(&self) -> Vec<calico::ProtoPort> {
        self.failsafe_outbound_host_ports
            .clone()
            .unwrap_or_else(calico::default_failsafe_outbound)
    }
}

/// What a node does with traffic from its pods to itself, after their egress policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum EndpointToHostAction {
    /// Accepted (the default): node services a pod needs, such as DNS on the node or an API
    /// server behind its Service, keep working; a pod's egress policy still applies.
    #[default]
    Accept,
    /// Dropped, except replies to connections the node opened and IPv6 neighbour discovery.
    Drop,
}

impl EndpointToHostAction {
    fn is_accept(&self) -> bool {
        *self == EndpointToHostAction::Accept
    }
}

fn default_true() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}

fn default_vni() -> u32 {
    4096
}
fn default_vxlan_port() -> u16 {
    4789
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            routing: RoutingMode::Direct,
            vxlan_vni: default_vni(),
            vxlan_port: default_vxlan_port(),
            anti_spoofing: true,
            default_endpoint_to_host_action: EndpointToHostAction::Accept,
            failsafe_inbound_host_ports: None,
            failsafe_outbound_host_ports: None,
            auto_host_endpoints: false,
            bgp: None,
        }
    }
}

/// Bytes a VXLAN-over-IPv4 encapsulation adds to each packet.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A range of pod addresses, cut into blocks that nodes claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpPool {
    pub name: String,
    pub cidr: IpNet,
    /// Prefix length of the blocks nodes claim (IPv4 default 26, IPv6 default 122).
    pub block_size: u8,
    /// Masquerade pod traffic to destinations outside every pool.
    #[serde(default)]
    pub nat_outgoing: bool,
    /// A disabled pool hands out no new addresses.
    #[serde(default)]
    pub disabled: bool,
}

/// Why a pool definition is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("{field}: {reason}")]
    Field { field: &'static str, reason: String },
}

impl IpPool {
    /// Checks the fields that the allocator relies on.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let max = self.cidr.max_prefix_len();
        if self.name.is_empty() {
            return Err(ValidationError::Field {
                field: "name",
                reason: "must not be empty".into(),
            });
        }
        if self.cidr.trunc() != self.cidr {
            return Err(ValidationError::Field {
                field: "cidr",
                reason: format!("{} has host bits set", self.cidr),
            });
        }
        if self.block_size < self.cidr.prefix_len() || self.block_size > max {
            return Err(ValidationError::Field {
                field: "blockSize",
                reason: format!(
                    "{} must be between the pool prefix /{} and /{}",
                    self.block_size,
                    self.cidr.prefix_len(),
                    max
                ),
            });
        }
        if max - self.block_size > 16 {
            return Err(ValidationError::Field {
                field: "blockSize",
                reason: format!(
                    "/{} blocks are too large (at most 65536 addresses)",
                    self.block_size
                ),
            });
        }
        Ok(())
    }
}

/// A node of the cluster, written by its agent at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub name: String,
    /// The node's address on the underlay, the next hop for its blocks in direct mode and the
    /// VXLAN tunnel endpoint in vxlan mode.
    pub underlay_ipv4: Option<Ipv4Addr>,
    pub underlay_ipv6: Option<Ipv6Addr>,
    /// MTU of the node's underlay interface.
    pub underlay_mtu: u32,
    /// MAC address of the node's VXLAN device.
    pub vtep_mac: String,
}

/// A pod's network attachment, written by the CNI plugin on ADD and removed on DEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEndpoint {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pub container_id: String,
    pub ifname: String,
    /// Name of the host-side veth in the node's namespace.
    pub host_ifname: String,
    /// Addresses with their host prefix (/32, /128).
    pub ips: Vec<IpNet>,
    pub mac: String,
    /// The IPAM handle the addresses were reserved under.
    pub ipam_handle: String,
}

impl WorkloadEndpoint {
    /// The addresses alone.
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips.iter().map(|n| n.addr())
    }
}

/// A container port a pod declares (`containers[].ports[]`): named ports are what a Service's
/// `targetPort` and a NetworkPolicy's `port` may refer to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub protocol: service::Protocol,
    pub port: u16,
}

/// A pod as the API server knows it: identity, labels, node and declared ports. Its addresses
/// come from its [`WorkloadEndpoint`] (written by the CNI plugin), joined by namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// The pod's addresses as its runtime reports them (`status.podIPs`); empty until it runs.
    /// Routing and policy use the [`WorkloadEndpoint`]; this is what the API server's own
    /// controllers (endpoints, endpoint slices) read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
    /// Source prefixes the pod may send from besides its own addresses (annotation
    /// [`ALLOWED_SOURCE_PREFIXES`]; anti-spoofing drops every other source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_source_prefixes: Vec<IpNet>,
    /// `spec.hostNetwork`: the pod runs in its node's network namespace (no CNI, no endpoint).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

/// The pod annotation naming extra source prefixes a pod may send from (comma-separated
/// CIDRs), as Calico's `cni.projectcalico.org/allowedSourcePrefixes`.
pub const ALLOWED_SOURCE_PREFIXES: &str = "malla.dev/allowed-source-prefixes";

/// Parses the value of [`ALLOWED_SOURCE_PREFIXES`]: comma-separated CIDRs (a bare address is
/// its host prefix), blanks around each ignored; the error names the first bad item.
pub fn parse_source_prefixes(value: &str) -> Result<Vec<IpNet>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim) {
        if item.is_empty() {
            continue;
        }
        let net = match item.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => match item.parse::<IpAddr>() {
                Ok(a) => IpNet::from(a),
                Err(_) => return Err(format!("{item:?} is not a CIDR (e.g. 198.18.5.0/24)")),
            },
        };
        if net.trunc() != net {
            return Err(format!(
                "{item:?} has host bits set (the prefix is {})",
                net.trunc()
            ));
        }
        out.push(net);
    }
    Ok(out)
}

/// Prefix of every host-side pod veth (`mla` + 11 hex digits of a hash): what anti-spoofing
/// treats as a workload interface.
pub const HOST_IFNAME_PREFIX: &str = "mla";

/// A namespace and its labels (namespace selectors match these).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A deterministic, locally administered MAC address derived from a name.
pub fn mac_from_name(name: &str) -> [u8; 6] {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let b = h.to_be_bytes();
    [0x0e, b[3], b[4], b[5], b[6], b[7]]
}

/// The EUI-64 IPv6 link-local address of a MAC (`fe80::…ff:fe…`): a VXLAN peer's next hop for
/// IPv6 routes, which needs no IPv6 underlay.
pub fn link_local_from_mac(mac: &[u8; 6]) -> Ipv6Addr {
    let seg = |a: u8, b: u8| (u16::from(a) << 8) | u16::from(b);
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        seg(mac[0] ^ 0x02, mac[1]),
        seg(mac[2], 0xff),
        seg(0xfe, mac[3]),
        seg(mac[4], mac[5]),
    )
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for slot in out.iter_mut() {
        *slot = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip_and_local_bit() {
        let m = mac_from_name("node-1");
        assert_eq!(m[0] & 0x02, 0x02, "locally administered");
        assert_eq!(m[0] & 0x01, 0, "unicast");
        assert_eq!(parse_mac(&format_mac(&m)), Some(m));
        assert_ne!(mac_from_name("node-1"), mac_from_name("node-2"));
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
        assert_eq!(parse_mac("00:00:00:00:00"), None);
    }

    #[test]
    fn eui64_link_local() {
        let ll = link_local_from_mac(&[0x0e, 0xc2, 0x20, 0x78, 0x7b, 0x76]);
        assert_eq!(ll.to_string(), "fe80::cc2:20ff:fe78:7b76");
    }

    #[test]
    fn pool_validation_names_the_field() {
        let mut p = IpPool {
            name: "default-ipv4".into(),
            cidr: "198.18.0.0/16".parse().unwrap(),
            block_size: 26,
            nat_outgoing: true,
            disabled: false,
        };
        assert!(p.validate().is_ok());
        p.block_size = 8;
        assert!(p
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("blockSize"));
        p.block_size = 26;
        p.cidr = "198.18.0.1/16".parse().unwrap();
        assert!(p.validate().unwrap_err().to_string().starts_with("cidr"));
    }
}
