//! Renders the node's nftables table: masquerade for pod traffic leaving the cluster pools
//! (natOutgoing, per pool). The text is applied as one `nft -f` transaction that replaces the
//! whole `inet malla` table, so established flows keep their conntrack NAT state.

use std::fmt::Write;

use malla_api::IpPool;

/// Name of Malla's nftables table (family `inet`).
pub const TABLE: &str = "malla";

fn elements<'a>(pools: impl Iterator<Item = &'a IpPool>) -> String {
    pools
        .map(|p| p.cidr.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn set(out: &mut String, name: &str, ty: &str, elems: &str) {
    let _ = writeln!(out, "  set {name} {{");
    let _ = writeln!(out, "    type {ty}; flags interval;");
    if !elems.is_empty() {
        let _ = writeln!(out, "    elements = {{ {elems} }}");
    }
    let _ = writeln!(out, "  }}");
}

/// The complete transaction text: (re)creates `table inet malla` from scratch.
pub fn render(pools: &[IpPool]) -> String {
    let v4 = |p: &&IpPool| p.cidr.addr().is_ipv4();
    let v6 = |p: &&IpPool| p.cidr.addr().is_ipv6();
    let masq = |p: &&IpPool| p.nat_outgoing;
    let mut out = String::new();
    let _ = writeln!(out, "table inet {TABLE}");
    let _ = writeln!(out, "delete table inet {TABLE}");
    let _ = writeln!(out, "table inet {TABLE} {{");
    set(
        &mut out,
        "pools-v4",
        "ipv4_addr",
        &elements(pools.iter().filter(v4)),
    );
    set(
        &mut out,
        "pools-v6",
        "ipv6_addr",
        &elements(pools.iter().filter(v6)),
    );
    set(
        &mut out,
        "masq-v4",
        "ipv4_addr",
        &elements(pools.iter().filter(v4).filter(masq)),
    );
    set(
        &mut out,
        "masq-v6",
        "ipv6_addr",
        &elements(pools.iter().filter(v6).filter(masq)),
    );
    let _ = writeln!(out, "  chain postrouting {{");
    let _ = writeln!(
        out,
        "    type nat hook postrouting priority srcnat; policy accept;"
    );
    let _ = writeln!(
        out,
        "    ip saddr @masq-v4 ip daddr != @pools-v4 counter masquerade comment \"natOutgoing\""
    );
    let _ = writeln!(
        out,
        "    ip6 saddr @masq-v6 ip6 daddr != @pools-v6 counter masquerade comment \"natOutgoing\""
    );
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_dual_stack() {
        let pools = vec![
            IpPool {
                name: "v4".into(),
                cidr: "198.18.0.0/16".parse().unwrap(),
                block_size: 26,
                nat_outgoing: true,
                disabled: false,
            },
            IpPool {
                name: "v6".into(),
                cidr: "fd00:198:18::/64".parse().unwrap(),
                block_size: 122,
                nat_outgoing: false,
                disabled: false,
            },
        ];
        let want = r#"table inet malla
delete table inet malla
table inet malla {
  set pools-v4 {
    type ipv4_addr; flags interval;
    elements = { 198.18.0.0/16 }
  }
  set pools-v6 {
    type ipv6_addr; flags interval;
    elements = { fd00:198:18::/64 }
  }
  set masq-v4 {
    type ipv4_addr; flags interval;
    elements = { 198.18.0.0/16 }
  }
  set masq-v6 {
    type ipv6_addr; flags interval;
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr @masq-v4 ip daddr != @pools-v4 counter masquerade comment "natOutgoing"
    ip6 saddr @masq-v6 ip6 daddr != @pools-v6 counter masquerade comment "natOutgoing"
  }
}
"#;
        assert_eq!(render(&pools), want);
    }
}
