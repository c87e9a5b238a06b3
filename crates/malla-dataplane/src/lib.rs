//! Malla's Linux side effects: network namespaces, netlink (links, addresses, routes,
//! neighbours, VXLAN FDB), sysctls and nftables, and the dataplane [`driver`] that applies the
//! calculation's desired state with them ([`linux::LinuxDriver`]: one manager per kind of
//! kernel object). Nothing here decides *what* to program; the calculation does that, and
//! these modules only apply it to the kernel.

pub mod conntrack;
pub mod driver;
pub mod flows;
pub mod linux;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod sysctl;
pub mod workload;

/// The `rtm_protocol` Malla stamps on every route it owns, so it can find (adopt) them after a
/// restart and never touches anyone else's.
pub const MALLA_ROUTE_PROTOCOL: u8 = 77;

/// Host-side MAC of every pod veth (as Calico does): the pod's static gateway neighbour always
/// points at it, whatever veth is behind.
pub const HOST_VETH_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

/// The gateway a pod's IPv4 default route points at; answered by a static neighbour entry.
pub const POD_GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);
/// The gateway a pod's IPv6 default route points at (link-local, static neighbour).
pub const POD_GATEWAY_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
