//! The node's whole nftables table (`inet malla`): masquerade for pod traffic leaving the cluster
//! pools (natOutgoing, per pool) in chain `nat-postrouting`, plus the service proxy from
//! [`crate::services`]. The agent applies [`nft::render_full`] once and [`nft::render_diff`]
//! afterwards, so established flows keep their conntrack NAT state and affinity sets survive.

use malla_api::IpPool;

use crate::nft::{self, BaseChain, Chain, Set};
use crate::services::{self, ServiceMap, NAT_POSTROUTING};

/// Name of Malla's nftables table (family `inet`).
pub const TABLE: &str = "malla";
/// Family of Malla's nftables table.
pub const FAMILY: &str = "inet";

fn set(t: &mut nft::Table, name: &str, ty: &str, pools: impl Iterator<Item = IpPool>) {
    t.sets.insert(
        name.to_string(),
        Set {
            type_: ty.into(),
            flags: vec!["interval".into()],
            timeout: None,
            elements: pools
                .map(|p| nft::Key::one(nft::Part::Net(p.cidr)))
                .collect(),
        },
    );
}

/// The complete desired table of a node.
pub fn node_table(pools: &[IpPool], services: &ServiceMap) -> nft::Table {
    let mut t = nft::Table::new(FAMILY, TABLE);
    let v4 = |p: &&IpPool| p.cidr.addr().is_ipv4();
    let v6 = |p: &&IpPool| p.cidr.addr().is_ipv6();
    let masq = |p: &&IpPool| p.nat_outgoing;
    set(
        &mut t,
        "pools-v4",
        "ipv4_addr",
        pools.iter().filter(v4).cloned(),
    );
    set(
        &mut t,
        "pools-v6",
        "ipv6_addr",
        pools.iter().filter(v6).cloned(),
    );
    set(
        &mut t,
        "masq-v4",
        "ipv4_addr",
        pools.iter().filter(v4).filter(masq).cloned(),
    );
    set(
        &mut t,
        "masq-v6",
        "ipv6_addr",
        pools.iter().filter(v6).filter(masq).cloned(),
    );
    t.chains.insert(
        NAT_POSTROUTING.to_string(),
        Chain {
            base: Some(BaseChain::new("nat", "postrouting", "srcnat")),
            rules: vec![
                "ip saddr @masq-v4 ip daddr != @pools-v4 counter masquerade comment \"natOutgoing\""
                    .into(),
                "ip6 saddr @masq-v6 ip6 daddr != @pools-v6 counter masquerade comment \"natOutgoing\""
                    .into(),
            ],
        },
    );
    services::render_services(services, &mut t);
    t
}

/// The complete transaction text of a node without services: `render_full(node_table(pools, ∅))`.
pub fn render(pools: &[IpPool]) -> String {
    nft::render_full(&node_table(pools, &ServiceMap::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_dual_stack() {
        let pools = crate::services::fixtures::pools();
        let want = include_str!("../testdata/masquerade.nft");
        crate::testutil::golden("masquerade.nft", &render(&pools), want);
    }
}
