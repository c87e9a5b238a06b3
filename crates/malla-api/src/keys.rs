//! Where each object lives in the key-value datastore. One place, so every backend agrees.

use ipnet::IpNet;

pub const CLUSTER_CONFIG: &str = "/malla/config/cluster";
pub const POOLS: &str = "/malla/pools/";
pub const NODES: &str = "/malla/nodes/";
pub const ENDPOINTS: &str = "/malla/endpoints/";
pub const BLOCKS: &str = "/malla/ipam/blocks/";
pub const HANDLES: &str = "/malla/ipam/handles/";
pub const PODS: &str = "/malla/pods/";
pub const NAMESPACES: &str = "/malla/namespaces/";
pub const NETWORK_POLICIES: &str = "/malla/networkpolicies/";
pub const SERVICES: &str = "/malla/services/";
pub const ENDPOINT_SLICES: &str = "/malla/endpointslices/";
/// Calico's `projectcalico.org/v3` objects (`malla_api::calico`).
pub const TIERS: &str = "/malla/tiers/";
pub const GLOBAL_NETWORK_POLICIES: &str = "/malla/globalnetworkpolicies/";
pub const HOST_ENDPOINTS: &str = "/malla/hostendpoints/";
pub const GLOBAL_NETWORK_SETS: &str = "/malla/globalnetworksets/";
pub const CALICO_NETWORK_POLICIES: &str = "/malla/calico/networkpolicies/";
/// `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicies.
pub const CLUSTER_NETWORK_POLICIES: &str = "/malla/clusternetworkpolicies/";
/// Staged policies of every kind (`malla_api::staged`).
pub const STAGED_POLICIES: &str = "/malla/stagedpolicies/";
/// The convergence barrier: a counter that a waiter bumps and every agent reports once it has
/// applied everything its feed delivered before it (`malla_store::barrier`). Under
/// `/malla/config/`, so the Kubernetes backend keeps it as a `ClusterNetwork` named
/// `sync-barrier` (no definition of its own).
pub const SYNC_BARRIER: &str = "/malla/config/sync-barrier";

pub fn tier(name: &str) -> String {
    format!("{TIERS}{name}")
}

pub fn global_network_policy(name: &str) -> String {
    format!("{GLOBAL_NETWORK_POLICIES}{name}")
}

pub fn calico_network_policy(namespace: &str, name: &str) -> String {
    format!("{CALICO_NETWORK_POLICIES}{namespace}/{name}")
}

pub fn cluster_network_policy(name: &str) -> String {
    format!("{CLUSTER_NETWORK_POLICIES}{name}")
}

pub fn host_endpoint(name: &str) -> String {
    format!("{HOST_ENDPOINTS}{name}")
}

pub fn global_network_set(name: &str) -> String {
    format!("{GLOBAL_NETWORK_SETS}{name}")
}

pub fn pool(name: &str) -> String {
    format!("{POOLS}{name}")
}

pub fn node(name: &str) -> String {
    format!("{NODES}{name}")
}

/// Endpoints are keyed by node first, so an agent lists only its own.
pub fn endpoints_of_node(node: &str) -> String {
    format!("{ENDPOINTS}{node}/")
}

pub fn endpoint(node: &str, container_id: &str, ifname: &str) -> String {
    format!("{ENDPOINTS}{node}/{container_id}/{ifname}")
}

/// A block's key: its CIDR with `/` written as `-` (`198.18.0.64-26`).
pub fn block(cidr: &IpNet) -> String {
    format!("{BLOCKS}{}-{}", cidr.addr(), cidr.prefix_len())
}

pub fn handle(id: &str) -> String {
    format!("{HANDLES}{id}")
}

pub fn service(namespace: &str, name: &str) -> String {
    format!("{SERVICES}{namespace}/{name}")
}

pub fn endpoint_slice(namespace: &str, name: &str) -> String {
    format!("{ENDPOINT_SLICES}{namespace}/{name}")
}

pub fn pod(namespace: &str, name: &str) -> String {
    format!("{PODS}{namespace}/{name}")
}

pub fn namespace(name: &str) -> String {
    format!("{NAMESPACES}{name}")
}

pub fn network_policy(namespace: &str, name: &str) -> String {
    format!("{NETWORK_POLICIES}{namespace}/{name}")
}
