//! The lab's service address ranges, in one place below everything that uses them: the lab's
//! own allocator (`services`) hands out cluster IPs from them, and the Kubernetes control plane
//! (`control_plane`) gives the API server the same IPv4 range, so both agree on every address.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Lab service addresses: 198.19.64.0/18 and fd00:198:19:ff::/112 (base, number of addresses).
pub const SERVICE_CIDR_V4: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 19, 64, 0), 1 << 14);
pub const SERVICE_CIDR_V6: (Ipv6Addr, u32) = (
    Ipv6Addr::new(0xfd00, 0x198, 0x19, 0xff, 0, 0, 0, 0),
    1 << 16,
);
