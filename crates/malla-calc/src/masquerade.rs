//! The node's whole nftables table (`inet malla`): masquerade for pod traffic leaving the cluster
//! pools (natOutgoing, per pool) in chain `nat-postrouting`, plus the service proxy from
//! [`crate::services`]. The agent applies [`nft::render_full`] once and [`nft::render_diff`]
//! afterwards, so established flows keep their conntrack NAT state and affinity sets survive.

use malla_api::IpPool;

use crate::nft::patch::Patch;
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
    crate::policy::flowlog::add_lost_chains(&mut t);
    t
}

/// The sets a pool change touches: every pool's CIDR per family (traffic from a pod) and those
/// with `natOutgoing` (masqueraded leaving the pools).
const POOL_SETS: [&str; 4] = ["pools-v4", "pools-v6", "masq-v4", "masq-v6"];

/// The patch that makes `table`'s pool sets those of `pools` (a pool created, changed or
/// deleted): the sets that differ, whole, before and after. Nothing else in the table reads a
/// pool; the service map's `pod_cidrs` (informational) are the caller's to update.
pub fn pools_patch(table: &nft::Table, pools: &[IpPool]) -> Patch {
    let want = node_table(pools, &ServiceMap::default());
    let mut patch = Patch::new(&table.family, &table.name);
    for name in POOL_SETS {
        if let (Some(held), Some(wanted)) = (table.sets.get(name), want.sets.get(name)) {
            if held != wanted {
                patch.before.sets.insert(name.into(), held.clone());
                patch.after.sets.insert(name.into(), wanted.clone());
            }
        }
    }
    patch
}

/// The complete transaction text of a node without services: `render_full(node_table(pools, ∅))`.
pub fn render(pools: &[IpPool]) -> String {
    nft::render_full(&node_table(pools, &ServiceMap::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool added, another given `natOutgoing`: the patch makes the table what a render
    /// with the new pools is, touching the pool sets alone, and its undo puts it back.
    #[test]
    fn a_pool_change_is_a_patch_of_the_pool_sets() {
        let (services, slices) = crate::services::fixtures::cluster();
        let map = |pools: &[IpPool]| {
            crate::services::build(
                &crate::services::fixtures::proxied(&services),
                &crate::services::fixtures::proxy(&slices),
                crate::services::fixtures::ME,
                &[],
                pools,
            )
        };
        let before = crate::services::fixtures::pools();
        let mut after = before.clone();
        after[1].nat_outgoing = true;
        after.push(IpPool {
            name: "more".into(),
            cidr: "198.19.128.0/18".parse().unwrap(),
            block_size: 26,
            nat_outgoing: false,
            disabled: false,
        });
        let t0 = node_table(&before, &map(&before));
        let patch = pools_patch(&t0, &after);
        assert!(patch.before.chains.is_empty() && patch.after.chains.is_empty());
        assert_eq!(
            patch.after.sets.keys().collect::<Vec<_>>(),
            ["masq-v6", "pools-v4"]
        );
        let mut t = t0.clone();
        patch.apply_to(&mut t);
        assert_eq!(t, node_table(&after, &map(&after)));
        patch.undo(&mut t);
        assert_eq!(t, t0);
        assert!(pools_patch(&t0, &before).before.sets.is_empty());
    }

    #[test]
    fn golden_dual_stack() {
        let pools = crate::services::fixtures::pools();
        let want = include_str!("../testdata/masquerade.nft");
        crate::testutil::golden("masquerade.nft", &render(&pools), want);
    }
}
