//! Address arithmetic for interval sets: unions and differences of CIDRs, returned as sorted,
//! disjoint, maximal CIDRs (nftables refuses overlapping intervals in one set); and plain
//! address lists for hash sets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::nft::{Key, Part};

/// An inclusive range of one family (`v6` false: values fit in 32 bits).
type Range = (u128, u128);

fn bits(v6: bool) -> u32 {
    if v6 {
        128
    } else {
        32
    }
}

/// `2^k - 1` without overflow.
fn span(k: u32) -> u128 {
    if k >= 128 {
        u128::MAX
    } else {
        (1u128 << k) - 1
    }
}

fn range(n: &IpNet) -> (bool, Range) {
    let n = n.trunc();
    match n {
        IpNet::V4(n) => {
            let s = u128::from(u32::from(n.network()));
            (false, (s, s + span(32 - u32::from(n.prefix_len()))))
        }
        IpNet::V6(n) => {
            let s = u128::from(n.network());
            (true, (s, s + span(128 - u32::from(n.prefix_len()))))
        }
    }
}

fn merge(mut v: Vec<Range>) -> Vec<Range> {
    v.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn subtract(a: Vec<Range>, b: &[Range]) -> Vec<Range> {
    let mut cur = a;
    for &(bs, be) in b {
        let mut next = Vec::with_capacity(cur.len() + 1);
        for (s, e) in cur {
            if be < s || bs > e {
                next.push((s, e));
                continue;
            }
            if bs > s {
                next.push((s, bs - 1));
            }
            if be < e {
                next.push((be + 1, e));
            }
        }
        cur = next;
    }
    cur
}

fn to_net(v6: bool, addr: u128, prefix: u8) -> Option<IpNet> {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(addr))
    } else {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(addr).ok()?))
    };
    IpNet::new(ip, prefix).ok()
}

fn cidrs(v6: bool, ranges: &[Range], out: &mut Vec<IpNet>) {
    let b = bits(v6);
    for &(mut s, e) in ranges {
        loop {
            let mut k = if s == 0 { b } else { s.trailing_zeros().min(b) };
            while span(k) > e - s {
                k -= 1;
            }
            if let Some(n) = u8::try_from(b - k).ok().and_then(|p| to_net(v6, s, p)) {
                out.push(n);
            }
            match s.checked_add(span(k)).and_then(|x| x.checked_add(1)) {
                Some(next) if next <= e => s = next,
                _ => break,
            }
        }
    }
}

/// The addresses in any of `include` and in none of `exclude`, as sorted disjoint maximal
/// CIDRs (IPv4 first).
pub fn normalize(
    include: impl IntoIterator<Item = IpNet>,
    exclude: impl IntoIterator<Item = IpNet>,
) -> Vec<IpNet> {
    let (mut inc, mut exc): ([Vec<Range>; 2], [Vec<Range>; 2]) = Default::default();
    for n in include {
        let (v6, r) = range(&n);
        inc[usize::from(v6)].push(r);
    }
    for n in exclude {
        let (v6, r) = range(&n);
        exc[usize::from(v6)].push(r);
    }
    let mut out = Vec::new();
    for (fam, v6) in [(0, false), (1, true)] {
        let ex = merge(std::mem::take(&mut exc[fam]));
        let r = subtract(merge(std::mem::take(&mut inc[fam])), &ex);
        cidrs(v6, &r, &mut out);
    }
    out
}

/// Single addresses as sorted, deduplicated host networks (`/32`, `/128`; IPv4 first), the
/// elements of a hash set.
pub fn hosts(ips: impl IntoIterator<Item = IpAddr>) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = ips.into_iter().map(IpNet::from).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// An element for an nft set: a bare address for a host, else the CIDR.
pub fn nft_element(n: &IpNet) -> Key {
    Key::one(Part::net(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn policy_addrs_elements() {
        for a in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "198.18.0.1",
            "10.0.200.7",
        ] {
            assert_eq!(nft_element(&nets(&[&format!("{a}/32")])[0]).to_string(), a);
        }
        for o in 0..=255u8 {
            let a = Ipv4Addr::new(o, o / 2, 255 - o, o.wrapping_mul(7));
            assert_eq!(
                nft_element(&IpNet::from(IpAddr::V4(a))).to_string(),
                a.to_string()
            );
        }
        assert_eq!(
            nft_element(&nets(&["10.0.0.0/8"])[0]).to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            nft_element(&nets(&["fd00::1/128"])[0]).to_string(),
            "fd00::1"
        );
        assert_eq!(
            nft_element(&nets(&["fd00::/64"])[0]).to_string(),
            "fd00::/64"
        );
    }

    #[test]
    fn policy_addrs_except_and_merge() {
        let got = normalize(nets(&["10.0.0.0/8"]), nets(&["10.1.0.0/16"]));
        let want = nets(&[
            "10.0.0.0/16",
            "10.2.0.0/15",
            "10.4.0.0/14",
            "10.8.0.0/13",
            "10.16.0.0/12",
            "10.32.0.0/11",
            "10.64.0.0/10",
            "10.128.0.0/9",
        ]);
        assert_eq!(got, want);
        assert_eq!(
            normalize(nets(&["10.0.0.1/32", "10.0.0.0/32", "10.0.0.2/31"]), []),
            nets(&["10.0.0.0/30"])
        );
        assert_eq!(
            normalize(nets(&["0.0.0.0/0", "::/0"]), []),
            nets(&["0.0.0.0/0", "::/0"])
        );
        assert_eq!(
            normalize(nets(&["::/0"]), nets(&["::/1"])),
            nets(&["8000::/1"])
        );
        assert_eq!(
            normalize(nets(&["255.255.255.255/32"]), []),
            nets(&["255.255.255.255/32"])
        );
        assert!(normalize(nets(&["10.0.0.0/24"]), nets(&["10.0.0.0/16"])).is_empty());
    }
}
