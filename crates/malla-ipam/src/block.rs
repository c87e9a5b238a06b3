//! Allocation blocks: the unit of address space a node claims, and the address arithmetic
//! between a block's CIDR and the ordinals of its addresses.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A block as stored (JSON) at `keys::block(&cidr)`.
///
/// ```json
/// {"cidr":"198.18.0.64/26","pool":"default-ipv4","affinity":"node-1",
///  "allocations":{"0":{"handle":"malla.abc.eth0","attrs":{"node":"node-1","pod":"p"}}}}
/// ```
/// `allocations` maps the ordinal of an address (its offset from the block's first address)
/// to the handle holding it. Every address of the block is usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Block {
    pub cidr: IpNet,
    /// Name of the pool the block was cut from.
    pub pool: String,
    /// The node the block belongs to; that node allocates from it first and routes it.
    pub affinity: Option<String>,
    #[serde(default)]
    pub allocations: BTreeMap<u32, Allocation>,
}

/// One allocated address of a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub handle: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: BTreeMap<String, String>,
}

impl Block {
    /// A block with no allocations.
    pub fn new(cidr: IpNet, pool: &str, affinity: Option<&str>) -> Self {
        Self {
            cidr,
            pool: pool.to_string(),
            affinity: affinity.map(str::to_string),
            allocations: BTreeMap::new(),
        }
    }

    /// Number of addresses in the block.
    pub fn capacity(&self) -> u64 {
        let bits = u32::from(self.cidr.max_prefix_len() - self.cidr.prefix_len());
        1u64.checked_shl(bits).unwrap_or(u64::MAX)
    }

    /// Number of allocated addresses.
    pub fn used(&self) -> u64 {
        self.allocations.len() as u64
    }

    /// Every allocated address with its handle, in address order.
    pub fn allocated(&self) -> Vec<(IpAddr, String)> {
        self.allocations
            .iter()
            .filter_map(|(o, a)| Some((self.addr_of(*o)?, a.handle.clone())))
            .collect()
    }

    /// The address at `ordinal`, if inside the block.
    pub fn addr_of(&self, ordinal: u32) -> Option<IpAddr> {
        if u64::from(ordinal) >= self.capacity() {
            return None;
        }
        let base = to_u128(self.cidr.network());
        Some(from_u128(
            base + u128::from(ordinal),
            self.cidr.addr().is_ipv6(),
        ))
    }

    /// The ordinal of `ip`, if inside the block.
    pub fn ordinal_of(&self, ip: IpAddr) -> Option<u32> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        u32::try_from(to_u128(ip) - to_u128(self.cidr.network())).ok()
    }

    /// The lowest free ordinal.
    pub fn first_free(&self) -> Option<u32> {
        let mut next: u32 = 0;
        for &o in self.allocations.keys() {
            if o != next {
                break;
            }
            next = next.checked_add(1)?;
        }
        (u64::from(next) < self.capacity()).then_some(next)
    }

    /// The handle holding `ip`, if allocated.
    pub fn holder(&self, ip: IpAddr) -> Option<&Allocation> {
        self.allocations.get(&self.ordinal_of(ip)?)
    }
}

/// What the allocator needs to know about every block to choose one: the block without its
/// allocations, which are only counted while decoding (cheap to list many).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct BlockSummary {
    pub cidr: IpNet,
    pub affinity: Option<String>,
    #[serde(default, rename = "allocations", deserialize_with = "count_entries")]
    pub used: u64,
}

impl BlockSummary {
    pub fn has_room(&self) -> bool {
        let bits = u32::from(self.cidr.max_prefix_len() - self.cidr.prefix_len());
        self.used < 1u64.checked_shl(bits).unwrap_or(u64::MAX)
    }
}

/// Counts a JSON map's entries without building it.
fn count_entries<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct Counter;
    impl<'de> serde::de::Visitor<'de> for Counter {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of allocations")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
            let mut n = 0;
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {
                n += 1;
            }
            Ok(n)
        }
    }
    d.deserialize_map(Counter)
}

/// An address as an integer (IPv4 in the low 32 bits).
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The inverse of [`to_u128`]; IPv4 values are truncated to 32 bits.
pub(crate) fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(v))
    } else {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    }
}

/// The lowest block of `/block_size` inside `pool` that overlaps none of `taken`.
/// Looks only at the taken blocks, never enumerates the pool.
pub(crate) fn lowest_free_block(pool: IpNet, block_size: u8, taken: &[IpNet]) -> Option<IpNet> {
    let bits = u32::from(pool.max_prefix_len().checked_sub(block_size)?);
    let size = 1u128.checked_shl(bits)?;
    let start = to_u128(pool.network());
    let end = to_u128(pool.broadcast());
    let mut spans: Vec<(u128, u128)> = taken
        .iter()
        .filter(|b| b.addr().is_ipv6() == pool.addr().is_ipv6())
        .map(|b| (to_u128(b.network()), to_u128(b.broadcast())))
        .filter(|&(s, e)| e >= start && s <= end)
        .collect();
    spans.sort_unstable();
    let mut cand = start;
    for (s, e) in spans {
        let cand_end = cand.checked_add(size - 1)?;
        if e < cand {
            continue;
        }
        if s > cand_end {
            break;
        }
        // Overlap: move past this span, aligned to the block size.
        let past = e.checked_add(1)? - start;
        cand = start.checked_add(past.div_ceil(size).checked_mul(size)?)?;
        if cand > end {
            return None;
        }
    }
    let cand_end = cand.checked_add(size - 1)?;
    if cand_end > end {
        return None;
    }
    IpNet::new(from_u128(cand, pool.addr().is_ipv6()), block_size).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ordinals_cover_the_whole_block() {
        let mut b = Block::new(n("198.18.0.64/26"), "p", None);
        assert_eq!(b.capacity(), 64);
        assert_eq!(b.addr_of(0), Some("198.18.0.64".parse().unwrap()));
        assert_eq!(b.addr_of(63), Some("198.18.0.127".parse().unwrap()));
        assert_eq!(b.addr_of(64), None);
        assert_eq!(b.ordinal_of("198.18.0.127".parse().unwrap()), Some(63));
        assert_eq!(b.ordinal_of("198.18.0.128".parse().unwrap()), None);
        assert_eq!(b.first_free(), Some(0));
        for o in [0, 1, 3] {
            b.allocations.insert(
                o,
                Allocation {
                    handle: "h".into(),
                    attrs: BTreeMap::new(),
                },
            );
        }
        assert_eq!(b.first_free(), Some(2));
        let v6 = Block::new(n("fd00:198:18::40/122"), "p", None);
        assert_eq!(v6.capacity(), 64);
        assert_eq!(v6.addr_of(1), Some("fd00:198:18::41".parse().unwrap()));
    }

    #[test]
    fn lowest_free_block_skips_taken_and_misaligned() {
        let pool = n("10.0.0.0/24");
        assert_eq!(lowest_free_block(pool, 26, &[]), Some(n("10.0.0.0/26")));
        assert_eq!(
            lowest_free_block(pool, 26, &[n("10.0.0.0/26")]),
            Some(n("10.0.0.64/26"))
        );
        assert_eq!(
            lowest_free_block(pool, 26, &[n("10.0.0.64/26"), n("10.0.0.0/26")]),
            Some(n("10.0.0.128/26"))
        );
        assert_eq!(
            lowest_free_block(pool, 26, &[n("10.0.0.64/26")]),
            Some(n("10.0.0.0/26"))
        );
        // A block of another size from an older pool definition.
        assert_eq!(
            lowest_free_block(pool, 26, &[n("10.0.0.0/28")]),
            Some(n("10.0.0.64/26"))
        );
        let all: Vec<IpNet> = pool.subnets(26).unwrap().collect();
        assert_eq!(lowest_free_block(pool, 26, &all), None);
        // Blocks outside the pool do not matter.
        assert_eq!(
            lowest_free_block(pool, 26, &[n("10.0.1.0/26")]),
            Some(n("10.0.0.0/26"))
        );
        // Huge IPv6 pools, at the very top of the space.
        let p6 = n("ffff:ffff:ffff:ffff::/64");
        assert_eq!(
            lowest_free_block(p6, 122, &[n("ffff:ffff:ffff:ffff::/122")]),
            Some(n("ffff:ffff:ffff:ffff::40/122"))
        );
        let p6 = n("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff80/121");
        assert_eq!(
            lowest_free_block(
                p6,
                122,
                &[
                    n("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff80/122"),
                    n("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffc0/122")
                ]
            ),
            None
        );
    }

    #[test]
    fn block_json_shape() {
        let mut b = Block::new(n("198.18.0.64/26"), "default-ipv4", Some("node-1"));
        b.allocations.insert(
            5,
            Allocation {
                handle: "h".into(),
                attrs: [("pod".to_string(), "p".to_string())].into(),
            },
        );
        let j = serde_json::to_string(&b).unwrap();
        assert_eq!(
            j,
            r#"{"cidr":"198.18.0.64/26","pool":"default-ipv4","affinity":"node-1","allocations":{"5":{"handle":"h","attrs":{"pod":"p"}}}}"#
        );
        assert_eq!(serde_json::from_str::<Block>(&j).unwrap(), b);
        let sum: BlockSummary = serde_json::from_str(&j).unwrap();
        assert_eq!((sum.cidr, sum.used, sum.has_room()), (b.cidr, 1, true));
        assert_eq!(sum.affinity.as_deref(), Some("node-1"));
    }
}
