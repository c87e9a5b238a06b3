//! Service addresses in BGP (Calico's `serviceClusterIPs`, `serviceExternalIPs`,
//! `serviceLoadBalancerIPs`): every node announces the configured ranges, so the routers spread
//! traffic over all nodes; a Service with `externalTrafficPolicy: Local` has each of its
//! addresses in those ranges announced as a /32 or /128 only by the nodes that hold a ready
//! endpoint, so the longest match leads only there (and follows a scale-down). Plus the small
//! LoadBalancer address allocator ([`allocate_lb`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::BgpConfig;

/// What kind of address a Service answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressKind {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
}

/// One Service as the speaker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddresses {
    pub addresses: Vec<(IpAddr, AddressKind)>,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    /// This node holds a ready endpoint of it.
    pub ready_here: bool,
}

/// The prefixes this node announces for Services, sorted.
pub fn advertised(bgp: &BgpConfig, services: &[ServiceAddresses]) -> Vec<IpNet> {
    let ranges = |k: AddressKind| match k {
        AddressKind::ClusterIp => &bgp.service_cluster_ips,
        AddressKind::ExternalIp => &bgp.service_external_ips,
        AddressKind::LoadBalancer => &bgp.service_load_balancer_ips,
    };
    let mut out: BTreeSet<IpNet> = bgp
        .service_cluster_ips
        .iter()
        .chain(&bgp.service_external_ips)
        .chain(&bgp.service_load_balancer_ips)
        .map(IpNet::trunc)
        .collect();
    for s in services.iter().filter(|s| s.local && s.ready_here) {
        for (ip, kind) in &s.addresses {
            if ranges(*kind).iter().any(|r| r.contains(ip)) {
                out.insert(IpNet::from(*ip));
            }
        }
    }
    out.into_iter().collect()
}

/// The first free address of the family `v6` in `pools` (network and broadcast addresses of an
/// IPv4 pool skipped), or None when they are exhausted.
pub fn allocate_lb(pools: &[IpNet], taken: &BTreeSet<IpAddr>, v6: bool) -> Option<IpAddr> {
    for pool in pools.iter().filter(|p| matches!(p, IpNet::V6(_)) == v6) {
        let mut hosts: Box<dyn Iterator<Item = IpAddr>> = match pool {
            IpNet::V4(p) => Box::new(p.hosts().map(IpAddr::V4)),
            IpNet::V6(p) => Box::new(p.hosts().skip(1).map(IpAddr::V6)),
        };
        // At most a pool's first 2^16 addresses are looked at: a lab's pools are small.
        if let Some(ip) = hosts.by_ref().take(1 << 16).find(|ip| !taken.contains(ip)) {
            return Some(ip);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BgpConfig {
        BgpConfig {
            service_cluster_ips: vec!["198.19.64.0/18".parse().unwrap()],
            service_load_balancer_ips: vec!["198.19.200.0/24".parse().unwrap()],
            ..BgpConfig::default()
        }
    }

    fn svc(local: bool, ready_here: bool) -> ServiceAddresses {
        ServiceAddresses {
            addresses: vec![
                ("198.19.64.5".parse().unwrap(), AddressKind::ClusterIp),
                ("198.19.200.1".parse().unwrap(), AddressKind::LoadBalancer),
                // Outside every configured range: never announced.
                ("203.0.113.9".parse().unwrap(), AddressKind::ExternalIp),
            ],
            local,
            ready_here,
        }
    }

    #[test]
    fn ranges_from_every_node_and_local_services_from_their_endpoints_nodes() {
        let s = |v: &[&str]| v.iter().map(|x| x.parse().unwrap()).collect::<Vec<IpNet>>();
        assert_eq!(
            advertised(&cfg(), &[svc(false, true)]),
            s(&["198.19.64.0/18", "198.19.200.0/24"])
        );
        assert_eq!(
            advertised(&cfg(), &[svc(true, false)]),
            s(&["198.19.64.0/18", "198.19.200.0/24"])
        );
        assert_eq!(
            advertised(&cfg(), &[svc(true, true)]),
            s(&[
                "198.19.64.0/18",
                "198.19.64.5/32",
                "198.19.200.0/24",
                "198.19.200.1/32"
            ])
        );
        assert!(advertised(&BgpConfig::default(), &[svc(true, true)]).is_empty());
    }

    #[test]
    fn lb_allocation_takes_the_first_free_address_of_the_family() {
        let pools: Vec<IpNet> = vec![
            "198.19.200.0/30".parse().unwrap(),
            "fd00:198:19:c8::/126".parse().unwrap(),
        ];
        let mut taken = BTreeSet::new();
        let a = allocate_lb(&pools, &taken, false).unwrap();
        assert_eq!(a.to_string(), "198.19.200.1");
        taken.insert(a);
        let b = allocate_lb(&pools, &taken, false).unwrap();
        assert_eq!(b.to_string(), "198.19.200.2");
        taken.insert(b);
        assert_eq!(allocate_lb(&pools, &taken, false), None, "exhausted");
        assert_eq!(
            allocate_lb(&pools, &taken, true).unwrap().to_string(),
            "fd00:198:19:c8::1"
        );
        assert_eq!(allocate_lb(&[], &taken, true), None);
    }
}
