//! A top-of-rack router's configuration for the lab: BIRD 2 or FRR, peering with every node
//! over iBGP in the nodes' AS.
//!
//! Two roles: a plain iBGP peer (the default, beside the nodes' full mesh, as a data centre's
//! router peers with Calico's nodes: it learns every block and routes between segments and for
//! the outside; next hops stay the nodes' own addresses) or a route reflector (the mesh off:
//! each node has one session, to the router, which reflects every node's routes to the others;
//! Calico's recommendation past ~100 nodes).

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use crate::render::{ident, quote};

/// One node the router peers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterNeighbor {
    pub node: String,
    pub address: IpAddr,
    /// TCP MD5 password of the session (validated as [`malla_api::BgpPeer`]'s).
    pub password: Option<String>,
    /// Keepalive and hold time of this session, if not the router's.
    pub timers: Option<(u16, u16)>,
}

/// The router's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterSpec {
    pub router_id: Ipv4Addr,
    pub as_number: u32,
    pub keepalive_secs: u16,
    pub route_reflector: bool,
    pub neighbors: Vec<RouterNeighbor>,
    pub log: Option<PathBuf>,
}

impl RouterSpec {
    /// BIRD 2's configuration (`bird -c`).
    pub fn render_bird(&self) -> String {
        let mut s = String::new();
        s.push_str("# Malla lab's top-of-rack router (BIRD); rendered by `malla lab up`.\n");
        let _ = writeln!(s, "router id {};", self.router_id);
        if let Some(p) = &self.log {
            let _ = writeln!(s, "log \"{}\" all;", quote(&p.to_string_lossy()));
        }
        s.push_str("timeformat protocol iso long;\n\nprotocol device {\n  scan time 10;\n}\n\n");
        s.push_str("protocol direct {\n  ipv4;\n  ipv6;\n}\n\n");
        for fam in ["4", "6"] {
            let _ = write!(
                s,
                "protocol kernel kernel{fam} {{\n  ipv{fam} {{\n    import none;\n    export where source = RTS_BGP;\n  }};\n  merge paths on;\n}}\n\n"
            );
        }
        // A reflector passes on what the nodes announced, never its own connected subnets
        // (a node would resolve next hops through them recursively, and fail).
        let export = if self.route_reflector {
            "where source = RTS_BGP"
        } else {
            "none"
        };
        let _ = write!(
            s,
            "template bgp malla_node {{\n  local as {};\n  hold time {};\n  keepalive time {};\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 10;\n  graceful restart on;\n{}}}\n",
            self.as_number,
            u32::from(self.keepalive_secs) * 3,
            self.keepalive_secs,
            if self.route_reflector { "  rr client;\n" } else { "" }
        );
        for n in &self.neighbors {
            let fam = if n.address.is_ipv4() { 4 } else { 6 };
            let _ = write!(
                s,
                "\nprotocol bgp node{fam}_{} from malla_node {{\n  description \"node {}\";\n  neighbor {} as {};\n",
                ident(&n.node),
                quote(&n.node),
                n.address,
                self.as_number
            );
            if let Some(pw) = &n.password {
                let _ = writeln!(s, "  password \"{pw}\";");
            }
            if let Some((keepalive, hold)) = n.timers {
                let _ = writeln!(s, "  hold time {hold};\n  keepalive time {keepalive};");
            }
            let _ = write!(
                s,
                "  ipv{fam} {{\n    import all;\n    export {export};\n  }};\n}}\n"
            );
        }
        s
    }

    /// FRR's bgpd configuration (zebra needs only a hostname).
    pub fn render_frr_bgpd(&self) -> String {
        let mut s = String::new();
        s.push_str("! Malla lab's top-of-rack router (FRR); rendered by `malla lab up`.\n");
        s.push_str("frr defaults datacenter\nhostname malla-router\n!\n");
        let _ = writeln!(s, "router bgp {}", self.as_number);
        let _ = writeln!(s, " bgp router-id {}", self.router_id);
        s.push_str(
            " no bgp ebgp-requires-policy\n no bgp default ipv4-unicast\n bgp graceful-restart\n",
        );
        let _ = writeln!(
            s,
            " timers bgp {} {}",
            self.keepalive_secs,
            u32::from(self.keepalive_secs) * 3
        );
        for n in &self.neighbors {
            let _ = writeln!(s, " neighbor {} remote-as {}", n.address, self.as_number);
            let _ = writeln!(s, " neighbor {} description node {}", n.address, n.node);
            let _ = writeln!(s, " neighbor {} timers connect 2", n.address);
            if let Some(pw) = &n.password {
                let _ = writeln!(s, " neighbor {} password {pw}", n.address);
            }
            if let Some((keepalive, hold)) = n.timers {
                let _ = writeln!(s, " neighbor {} timers {keepalive} {hold}", n.address);
            }
        }
        for (af, v6) in [("ipv4", false), ("ipv6", true)] {
            let _ = writeln!(s, " address-family {af} unicast");
            for n in self.neighbors.iter().filter(|n| n.address.is_ipv6() == v6) {
                let _ = writeln!(s, "  neighbor {} activate", n.address);
                if self.route_reflector {
                    let _ = writeln!(s, "  neighbor {} route-reflector-client", n.address);
                }
            }
            // Service ranges come from every node: spread over all of them.
            s.push_str("  maximum-paths ibgp 16\n");
            s.push_str(" exit-address-family\n");
        }
        s.push_str("!\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;

    fn spec(rr: bool) -> RouterSpec {
        RouterSpec {
            router_id: "198.19.0.1".parse().unwrap(),
            as_number: 64512,
            keepalive_secs: 3,
            route_reflector: rr,
            neighbors: vec![
                RouterNeighbor {
                    node: "node-1".into(),
                    address: "198.19.0.11".parse().unwrap(),
                    password: None,
                    timers: None,
                },
                RouterNeighbor {
                    node: "node-2".into(),
                    address: "198.19.2.12".parse().unwrap(),
                    password: None,
                    timers: None,
                },
                RouterNeighbor {
                    node: "node-2".into(),
                    address: "fd00:198:19:2::12".parse().unwrap(),
                    password: Some("s3cret".into()),
                    timers: Some((2, 6)),
                },
            ],
            log: Some("/run/malla-lab/x/router/bird.log".into()),
        }
    }

    #[test]
    fn bird_router_goldens() {
        golden("router-bird-peer.conf", &spec(false).render_bird());
        golden("router-bird-rr.conf", &spec(true).render_bird());
    }

    #[test]
    fn frr_router_goldens() {
        golden("router-frr-peer.conf", &spec(false).render_frr_bgpd());
        golden("router-frr-rr.conf", &spec(true).render_frr_bgpd());
    }
}
