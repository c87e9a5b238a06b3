//! Every kind of record Malla stores, in one table: its type, the key (or key prefix) it lives
//! under, whether the agent's change feed follows it, and where the Kubernetes backend keeps it.
//!
//! A new kind is one line of [`kinds!`] here (plus its type, and a calculation node that reads
//! it): the typed [`Resource`] every syncer emits, its decoding from a key-value backend's JSON
//! text or a Kubernetes object's JSON tree, the prefixes the syncers follow ([`synced`]) and the
//! Kubernetes resource that stores it ([`STORAGE`]) all come from that line. A Malla kind kept
//! as a custom resource needs nothing more; a native Kubernetes kind also needs its conversion
//! in `k8s/`.
//!
//! Written as a macro rather than a trait per kind: the table is data (a prefix, a type, a
//! resource name), and one `match` generated from it is what the hot decode path wants.

use serde_json::Value;

use crate::calico::{
    CalicoNetworkPolicy, GlobalNetworkPolicy, GlobalNetworkSet, HostEndpoint, Tier,
};
use crate::keys;
use crate::policy::NetworkPolicy;
use crate::service::{EndpointSlice, Service};
use crate::{ClusterConfig, IpPool, Namespace, Node, Pod, WorkloadEndpoint};

/// The convergence barrier's record at [`keys::SYNC_BARRIER`]: a counter each waiter bumps, so
/// an agent can say "applied through waiter N" without comparing revisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Barrier {
    /// Bumped by one by each waiter.
    pub seq: u64,
}

/// A printer column of a custom resource: name, type, JSON path, priority (0: always shown,
/// 1: `-o wide`).
pub type Column = (&'static str, &'static str, &'static str, u8);

/// Where the Kubernetes backend keeps a part of the key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kubernetes {
    /// A cluster-scoped custom resource of Malla's group, `spec` the record's JSON.
    Custom {
        kind: &'static str,
        plural: &'static str,
        columns: &'static [Column],
    },
    /// The native objects of `group/version`, converted by `k8s/`.
    Native {
        group: &'static str,
        version: &'static str,
        kind: &'static str,
        plural: &'static str,
        namespaced: bool,
    },
    /// EndpointSlices: which API serves them depends on the server (the backend decides).
    EndpointSlices,
}

/// A part of the key space and the Kubernetes resource that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    /// Every key of this part starts with it.
    pub prefix: &'static str,
    pub kubernetes: Kubernetes,
}

/// How a record kind is keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyed {
    /// One record, at exactly this key.
    Exactly(&'static str),
    /// Any number, each under this prefix.
    Under(&'static str),
}

impl Keyed {
    fn matches(self, key: &str) -> bool {
        match self {
            Keyed::Exactly(k) => key == k,
            Keyed::Under(p) => key.starts_with(p),
        }
    }

    /// The key or prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            Keyed::Exactly(k) | Keyed::Under(k) => k,
        }
    }
}

/// The table. Each line: a [`Resource`] variant and its type, how it is keyed, and whether the
/// agent's feed follows it (`synced`) or not (`stored`). Then [`STORAGE`]: where Kubernetes
/// keeps each prefix.
macro_rules! kinds {
    ($( $(#[$doc:meta])* $variant:ident($ty:ty) $keyed:expr, $follow:ident; )*) => {
        /// One record of a kind Malla stores, typed (what a syncer emits).
        #[derive(Debug, Clone, PartialEq)]
        pub enum Resource {
            $( $(#[$doc])* $variant($ty), )*
        }

        /// Every record kind: its name and how it is keyed, and whether the feed follows it.
        pub const RECORDS: &[(&str, Keyed, bool)] = &[
            $( (stringify!($variant), $keyed, follows!($follow)), )*
        ];

        impl Resource {
            /// The record stored at `key`, decoded straight into its type from JSON text (a
            /// key-value backend) or a JSON tree (a Kubernetes object); None for a key of no
            /// record kind the feed follows (IPAM handles, anything unknown).
            fn decode(key: &str, v: impl Source) -> Result<Option<Resource>, String> {
                $(
                    if follows!($follow) && $keyed.matches(key) {
                        return Ok(Some(Resource::$variant(v.typed(key)?)));
                    }
                )*
                Ok(None)
            }

            /// The record as the key-value backends store it (JSON text).
            pub fn to_json(&self) -> String {
                let r = match self {
                    $( Resource::$variant(x) => serde_json::to_string(x), )*
                };
                r.expect("Malla records serialise")
            }

            /// The kind's name (`Node`, `Service`…).
            pub fn kind(&self) -> &'static str {
                match self {
                    $( Resource::$variant(_) => stringify!($variant), )*
                }
            }
        }
    };
}

macro_rules! follows {
    (synced) => {
        true
    };
    (stored) => {
        false
    };
}

kinds! {
    ClusterConfig(ClusterConfig) Keyed::Exactly(keys::CLUSTER_CONFIG), synced;
    /// The convergence barrier's counter ([`keys::SYNC_BARRIER`]).
    Barrier(Barrier) Keyed::Exactly(keys::SYNC_BARRIER), synced;
    Node(Node) Keyed::Under(keys::NODES), synced;
    Pool(IpPool) Keyed::Under(keys::POOLS), synced;
    /// An IPAM block. Its type lives in malla-ipam, above the store, so it travels as the
    /// record's JSON tree, decoded there with `serde_json::from_value` (no text round trip).
    Block(JsonObject) Keyed::Under(keys::BLOCKS), synced;
    WorkloadEndpoint(WorkloadEndpoint) Keyed::Under(keys::ENDPOINTS), synced;
    Service(Service) Keyed::Under(keys::SERVICES), synced;
    EndpointSlice(EndpointSlice) Keyed::Under(keys::ENDPOINT_SLICES), synced;
    Pod(Pod) Keyed::Under(keys::PODS), synced;
    Namespace(Namespace) Keyed::Under(keys::NAMESPACES), synced;
    NetworkPolicy(NetworkPolicy) Keyed::Under(keys::NETWORK_POLICIES), synced;
    Tier(Tier) Keyed::Under(keys::TIERS), synced;
    GlobalNetworkPolicy(GlobalNetworkPolicy) Keyed::Under(keys::GLOBAL_NETWORK_POLICIES), synced;
    HostEndpoint(HostEndpoint) Keyed::Under(keys::HOST_ENDPOINTS), synced;
    GlobalNetworkSet(GlobalNetworkSet) Keyed::Under(keys::GLOBAL_NETWORK_SETS), synced;
    /// Calico's namespaced NetworkPolicy (`projectcalico.org/v3`).
    CalicoNetworkPolicy(CalicoNetworkPolicy) Keyed::Under(keys::CALICO_NETWORK_POLICIES), synced;
    ClusterNetworkPolicy(crate::cnp::ClusterNetworkPolicy) Keyed::Under(keys::CLUSTER_NETWORK_POLICIES), synced;
    /// A staged policy of any kind (`crate::staged`).
    StagedPolicy(crate::staged::StagedPolicy) Keyed::Under(keys::STAGED_POLICIES), synced;
    /// An IPAM handle (malla-ipam's type, as a JSON tree): the CNI plugin's, not the feed's.
    Handle(JsonObject) Keyed::Under(keys::HANDLES), stored;
}

/// A record kept as its JSON tree (IPAM blocks and handles, whose types live above the store):
/// an object, since decoding into a map refuses anything else.
pub type JsonObject = serde_json::Map<String, Value>;

/// Where the Kubernetes backend keeps each part of the key space.
pub const STORAGE: &[Storage] = &[
    Storage {
        prefix: "/malla/config/",
        kubernetes: Kubernetes::Custom {
            kind: "ClusterNetwork",
            plural: "clusternetworks",
            columns: &[
                ("Routing", "string", ".spec.routing", 0),
                ("VNI", "integer", ".spec.vxlanVni", 1),
                ("VXLANPort", "integer", ".spec.vxlanPort", 1),
            ],
        },
    },
    Storage {
        prefix: keys::POOLS,
        kubernetes: Kubernetes::Custom {
            kind: "IPPool",
            plural: "ippools",
            columns: &[
                ("CIDR", "string", ".spec.cidr", 0),
                ("BlockSize", "integer", ".spec.blockSize", 0),
                ("NATOutgoing", "boolean", ".spec.natOutgoing", 0),
                ("Disabled", "boolean", ".spec.disabled", 0),
            ],
        },
    },
    Storage {
        prefix: keys::NODES,
        kubernetes: Kubernetes::Custom {
            kind: "NodeNetwork",
            plural: "nodenetworks",
            columns: &[
                ("IPv4", "string", ".spec.underlayIpv4", 0),
                ("IPv6", "string", ".spec.underlayIpv6", 0),
                ("MTU", "integer", ".spec.underlayMtu", 0),
                ("VTEP", "string", ".spec.vtepMac", 0),
            ],
        },
    },
    Storage {
        prefix: keys::ENDPOINTS,
        kubernetes: Kubernetes::Custom {
            kind: "WorkloadEndpoint",
            plural: "workloadendpoints",
            columns: &[
                ("Node", "string", ".spec.node", 0),
                ("Namespace", "string", ".spec.namespace", 0),
                ("Pod", "string", ".spec.pod", 0),
                ("IPs", "string", ".spec.ips", 0),
                ("Interface", "string", ".spec.hostIfname", 0),
            ],
        },
    },
    Storage {
        prefix: keys::BLOCKS,
        kubernetes: Kubernetes::Custom {
            kind: "IPAMBlock",
            plural: "ipamblocks",
            columns: &[
                ("CIDR", "string", ".spec.cidr", 0),
                ("Node", "string", ".spec.affinity", 0),
                ("Pool", "string", ".spec.pool", 0),
            ],
        },
    },
    Storage {
        prefix: keys::HANDLES,
        kubernetes: Kubernetes::Custom {
            kind: "IPAMHandle",
            plural: "ipamhandles",
            columns: &[("Blocks", "string", ".spec.blocks", 1)],
        },
    },
    Storage {
        prefix: keys::NAMESPACES,
        kubernetes: Kubernetes::Native {
            group: "",
            version: "v1",
            kind: "Namespace",
            plural: "namespaces",
            namespaced: false,
        },
    },
    Storage {
        prefix: keys::PODS,
        kubernetes: Kubernetes::Native {
            group: "",
            version: "v1",
            kind: "Pod",
            plural: "pods",
            namespaced: true,
        },
    },
    Storage {
        prefix: keys::SERVICES,
        kubernetes: Kubernetes::Native {
            group: "",
            version: "v1",
            kind: "Service",
            plural: "services",
            namespaced: true,
        },
    },
    Storage {
        prefix: keys::ENDPOINT_SLICES,
        kubernetes: Kubernetes::EndpointSlices,
    },
    Storage {
        prefix: keys::NETWORK_POLICIES,
        kubernetes: Kubernetes::Native {
            group: "networking.k8s.io",
            version: "v1",
            kind: "NetworkPolicy",
            plural: "networkpolicies",
            namespaced: true,
        },
    },
    // Calico's objects: custom resources of Malla's group (the record's JSON as `spec`).
    Storage {
        prefix: keys::TIERS,
        kubernetes: Kubernetes::Custom {
            kind: "Tier",
            plural: "tiers",
            columns: &[("Order", "number", ".spec.order", 0)],
        },
    },
    Storage {
        prefix: keys::GLOBAL_NETWORK_POLICIES,
        kubernetes: Kubernetes::Custom {
            kind: "GlobalNetworkPolicy",
            plural: "globalnetworkpolicies",
            columns: &[
                ("Tier", "string", ".spec.spec.tier", 0),
                ("Order", "number", ".spec.spec.order", 0),
                ("Selector", "string", ".spec.spec.selector", 0),
            ],
        },
    },
    Storage {
        prefix: keys::HOST_ENDPOINTS,
        kubernetes: Kubernetes::Custom {
            kind: "HostEndpoint",
            plural: "hostendpoints",
            columns: &[
                ("Node", "string", ".spec.spec.node", 0),
                ("Interface", "string", ".spec.spec.interfaceName", 0),
            ],
        },
    },
    Storage {
        prefix: keys::CALICO_NETWORK_POLICIES,
        kubernetes: Kubernetes::Custom {
            kind: "CalicoNetworkPolicy",
            plural: "caliconetworkpolicies",
            columns: &[
                ("Namespace", "string", ".spec.namespace", 0),
                ("Tier", "string", ".spec.spec.tier", 0),
                ("Order", "number", ".spec.spec.order", 0),
            ],
        },
    },
    Storage {
        prefix: keys::CLUSTER_NETWORK_POLICIES,
        kubernetes: Kubernetes::Custom {
            kind: "MallaClusterNetworkPolicy",
            plural: "mallaclusternetworkpolicies",
            columns: &[
                ("Tier", "string", ".spec.spec.tier", 0),
                ("Priority", "integer", ".spec.spec.priority", 0),
            ],
        },
    },
    Storage {
        prefix: keys::STAGED_POLICIES,
        kubernetes: Kubernetes::Custom {
            kind: "MallaStagedPolicy",
            plural: "mallastagedpolicies",
            columns: &[("Action", "string", ".spec.stagedAction", 0)],
        },
    },
    Storage {
        prefix: keys::GLOBAL_NETWORK_SETS,
        kubernetes: Kubernetes::Custom {
            kind: "GlobalNetworkSet",
            plural: "globalnetworksets",
            columns: &[],
        },
    },
];

/// The keys and prefixes the agent's feed follows: every record kind the calculation reads.
pub fn synced() -> impl Iterator<Item = &'static str> {
    RECORDS
        .iter()
        .filter(|(_, _, follow)| *follow)
        .map(|(_, keyed, _)| keyed.prefix())
}

/// Whether the feed follows `key`.
pub fn is_synced(key: &str) -> bool {
    RECORDS
        .iter()
        .any(|(_, keyed, follow)| *follow && keyed.matches(key))
}

/// The JSON a record is read from: a tree (Kubernetes objects) or text (key-value backends),
/// each decoded straight into the record's type.
trait Source {
    fn typed<T: serde::de::DeserializeOwned>(self, key: &str) -> Result<T, String>;
}

impl Source for Value {
    fn typed<T: serde::de::DeserializeOwned>(self, key: &str) -> Result<T, String> {
        serde_json::from_value::<T>(self).map_err(|e| format!("{key}: {e}"))
    }
}

impl Source for &str {
    fn typed<T: serde::de::DeserializeOwned>(self, key: &str) -> Result<T, String> {
        serde_json::from_str::<T>(self).map_err(|e| format!("{key}: {e}"))
    }
}

impl Resource {
    /// The record stored at `key`, from its JSON tree; None for a key the feed does not follow.
    pub fn from_value(key: &str, v: Value) -> Result<Option<Resource>, String> {
        Resource::decode(key, v)
    }

    /// The record stored at `key`, from the JSON text a key-value backend holds (decoded
    /// straight into its type).
    pub fn from_json(key: &str, s: &str) -> Result<Option<Resource>, String> {
        Resource::decode(key, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_followed_key_decodes_to_its_kind_and_others_to_none() {
        let node = Node {
            name: "n1".into(),
            underlay_ipv4: Some("198.19.0.1".parse().unwrap()),
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: "02:00:00:00:00:01".into(),
        };
        let text = serde_json::to_string(&node).unwrap();
        let r = Resource::from_json(&keys::node("n1"), &text)
            .unwrap()
            .unwrap();
        assert_eq!(r, Resource::Node(node.clone()));
        assert_eq!(r.kind(), "Node");
        assert_eq!(r.to_json(), text);
        let tree = serde_json::to_value(&node).unwrap();
        assert_eq!(
            Resource::from_value(&keys::node("n1"), tree).unwrap(),
            Some(Resource::Node(node))
        );
        // Handles are stored, not followed; unknown keys are nobody's.
        assert_eq!(Resource::from_json(&keys::handle("h"), "{}").unwrap(), None);
        assert_eq!(Resource::from_json("/elsewhere/x", "{}").unwrap(), None);
        assert!(!is_synced(&keys::handle("h")));
        assert!(is_synced(keys::SYNC_BARRIER));
        // A block must be an object; a malformed record names its key.
        let err = Resource::from_json(keys::BLOCKS, "[1]").unwrap_err();
        assert!(err.contains(keys::BLOCKS), "{err}");
        let err = Resource::from_json(&keys::node("n1"), "{\"name\": 5}").unwrap_err();
        assert!(err.contains("/malla/nodes/n1"), "{err}");
    }

    #[test]
    fn every_followed_prefix_has_a_kubernetes_home() {
        for prefix in synced() {
            assert!(
                STORAGE.iter().any(|s| prefix.starts_with(s.prefix)),
                "{prefix} is stored nowhere in Kubernetes"
            );
        }
    }
}
