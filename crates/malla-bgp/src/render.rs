//! What one node's BGP speaker does, as plain values ([`NodeSpeaker`]), and its BIRD 2
//! configuration ([`NodeSpeaker::render`]).
//!
//! As Calico's: the node announces its IPAM blocks (with a blackhole route in its own kernel for
//! their unused addresses, so a packet to a free address dies here instead of looping to the
//! router) and each address it borrowed from another node's block as a /32 or /128; it peers
//! with every other node (full iBGP mesh, unless turned off for route reflectors) and with the
//! configured external peers; what it learns over BGP goes into the kernel (BIRD's kernel
//! protocol; the routes stay when BIRD stops: `persist`, and graceful restart keeps them on the
//! peers while it comes back). The kernel's own routes (the default route) are learned so BGP
//! next hops on another segment resolve through them (`gateway recursive`).

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnet::IpNet;
use malla_api::bgp::Timers;
use malla_api::selector::Selector;
use malla_api::{BgpConfig, ClusterConfig, NextHopMode, Node};

/// Why a node cannot speak BGP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("node {0}: no IPv4 underlay address to use as its BGP router id")]
    NoRouterId(String),
    #[error("node {0} is not registered")]
    UnknownNode(String),
    /// The cluster's BGP settings are malformed (nothing is applied).
    #[error("cluster config: {0}")]
    Invalid(#[from] malla_api::calico::FieldError),
}

/// Who a session is with.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKind {
    /// Another node of the cluster (full mesh, or chosen by a peer's `peerSelector`).
    Node(String),
    /// A router outside the cluster ([`malla_api::BgpPeer`] with `peerIP`).
    External,
}

/// One BGP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The BIRD protocol's name (unique, `[a-z0-9_]`).
    pub name: String,
    pub kind: PeerKind,
    pub address: IpAddr,
    pub as_number: u32,
    /// This node's address of the same family (the session's source).
    pub source: IpAddr,
    /// TCP MD5 password.
    pub password: Option<String>,
    pub timers: Timers,
    pub next_hop: NextHopMode,
    /// This node reflects routes to the peer (it is a route reflector, the peer a node that
    /// is not).
    pub rr_client: bool,
}

/// Everything one node's speaker needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpeaker {
    pub node: String,
    pub router_id: Ipv4Addr,
    pub as_number: u32,
    /// The cluster's timers (every session's unless its peer sets its own).
    pub timers: Timers,
    /// This node is a route reflector with this cluster ID.
    pub rr_cluster_id: Option<Ipv4Addr>,
    /// The node's own blocks: announced, and blackholed in its kernel.
    pub blocks: Vec<IpNet>,
    /// Addresses its pods use from blocks it does not own: announced as /32 or /128.
    pub borrowed: Vec<IpNet>,
    /// Service addresses it announces ([`crate::services::advertised`]); never in its own
    /// kernel (the node's service rules answer them).
    pub services: Vec<IpNet>,
    pub peers: Vec<Peer>,
    /// BIRD's log file; None: syslog.
    pub log: Option<PathBuf>,
}

/// A BIRD protocol name from a node name or address: lower-case letters, digits and `_`.
pub(crate) fn ident(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl NodeSpeaker {
    /// Node `me`'s speaker in a cluster of `nodes` configured by `config`, announcing `blocks`
    /// (affine to it) and `borrowed` (its pods' addresses outside them).
    pub fn new(
        me: &str,
        config: &ClusterConfig,
        nodes: &[Node],
        blocks: &[IpNet],
        borrowed: &[IpNet],
    ) -> Result<Self, RenderError> {
        let bgp = config.bgp.clone().unwrap_or_default();
        bgp.validate()?;
        let this = nodes
            .iter()
            .find(|n| n.name == me)
            .ok_or_else(|| RenderError::UnknownNode(me.to_string()))?;
        let router_id = this
            .underlay_ipv4
            .ok_or_else(|| RenderError::NoRouterId(me.to_string()))?;
        let mesh_timers = bgp.timers(None);
        let rr_cluster_id = bgp.node(me).and_then(|n| n.route_reflector_cluster_id);
        let mut peers = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        let mut unique = |base: String| {
            let mut name = base.clone();
            let mut n = 2;
            while !used.insert(name.clone()) {
                name = format!("{base}_{n}");
                n += 1;
            }
            name
        };
        let mut others: Vec<&Node> = nodes.iter().filter(|n| n.name != me).collect();
        others.sort_by(|a, b| a.name.cmp(&b.name));
        // Node-to-node sessions: the mesh, then those peer selectors call for (each node once).
        let mut node_peers: Vec<(&Node, Option<&malla_api::BgpPeer>)> = Vec::new();
        if bgp.node_to_node_mesh {
            node_peers.extend(others.iter().map(|n| (*n, None)));
        }
        for p in &bgp.peers {
            for n in selected_nodes(&bgp, p, me, &others) {
                if !node_peers.iter().any(|(m, _)| m.name == n.name) {
                    node_peers.push((n, Some(p)));
                }
            }
        }
        for (n, via) in node_peers {
            let their_rr = bgp.node(&n.name).and_then(|s| s.route_reflector_cluster_id);
            let pairs = [
                (
                    "4",
                    this.underlay_ipv4.map(IpAddr::V4),
                    n.underlay_ipv4.map(IpAddr::V4),
                ),
                (
                    "6",
                    this.underlay_ipv6.map(IpAddr::V6),
                    n.underlay_ipv6.map(IpAddr::V6),
                ),
            ];
            for (fam, src, dst) in pairs {
                if let (Some(source), Some(address)) = (src, dst) {
                    let prefix = if via.is_some() { "node" } else { "mesh" };
                    peers.push(Peer {
                        name: unique(format!("{prefix}{fam}_{}", ident(&n.name))),
                        kind: PeerKind::Node(n.name.clone()),
                        address,
                        as_number: bgp.as_number,
                        source,
                        password: via.and_then(|p| p.password.clone()),
                        timers: bgp.timers(via),
                        next_hop: via.map(|p| p.next_hop_mode).unwrap_or_default(),
                        rr_client: rr_cluster_id.is_some() && their_rr.is_none(),
                    });
                }
            }
        }
        for p in external_peers(&bgp, me) {
            let Some(peer_ip) = p.peer_ip else { continue };
            let source = match peer_ip {
                IpAddr::V4(_) => this.underlay_ipv4.map(IpAddr::V4),
                IpAddr::V6(_) => this.underlay_ipv6.map(IpAddr::V6),
            };
            let Some(source) = source else { continue };
            let fam = if peer_ip.is_ipv4() { "4" } else { "6" };
            peers.push(Peer {
                name: unique(format!("peer{fam}_{}", ident(&peer_ip.to_string()))),
                kind: PeerKind::External,
                address: peer_ip,
                as_number: p.as_number.unwrap_or(bgp.as_number),
                source,
                password: p.password.clone(),
                timers: bgp.timers(Some(p)),
                next_hop: p.next_hop_mode,
                rr_client: false,
            });
        }
        let mut blocks = blocks.to_vec();
        blocks.sort();
        blocks.dedup();
        let mut borrowed = borrowed.to_vec();
        borrowed.sort();
        borrowed.dedup();
        Ok(Self {
            node: me.to_string(),
            router_id,
            as_number: bgp.as_number,
            timers: mesh_timers,
            rr_cluster_id,
            blocks,
            borrowed,
            services: Vec::new(),
            peers,
            log: None,
        })
    }

    /// The BIRD 2 configuration.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Malla's BGP speaker for node {:?}; rendered by the agent, do not edit.",
            self.node
        );
        let _ = writeln!(s, "router id {};", self.router_id);
        match &self.log {
            Some(p) => {
                let _ = writeln!(
                    s,
                    "log \"{}\" {{ info, remote, warning, error, auth, fatal, bug }};",
                    quote(&p.to_string_lossy())
                );
            }
            None => s.push_str("log syslog { warning, error, fatal, bug };\n"),
        }
        s.push_str("timeformat protocol iso long;\n\n");
        s.push_str("# Marks the service addresses this node announces.\ndefine MALLA_SERVICE = (64512, 100);\n\n");
        if self.rr_cluster_id.is_some() {
            s.push_str(
                "# A route reflector: what it learned over BGP leaves it too (BIRD reflects it to its\n\
                 # clients, keeping its next hop), besides what it owns.\n\
                 filter malla_to_peers {\n  if source = RTS_BGP then accept;\n",
            );
        } else {
            s.push_str(
                "# Only what this node owns leaves it: its blocks, borrowed addresses and service addresses.\n\
                 filter malla_to_peers {\n",
            );
        }
        s.push_str(
            "  if proto = \"malla_blocks4\" || proto = \"malla_blocks6\" || proto = \"malla_borrowed4\" || proto = \"malla_borrowed6\" then accept;\n  if proto = \"malla_services4\" || proto = \"malla_services6\" then {\n    bgp_community.add(MALLA_SERVICE);\n    accept;\n  }\n  reject;\n}\n\n\
             # Into the kernel: what BGP learned, and a blackhole for the unused addresses of own blocks\n\
             # (the pods' own /32 and /128 routes are more specific). Borrowed addresses are routed to\n\
             # their pods by the agent.\n\
             filter malla_to_kernel {\n  if source = RTS_BGP then {\n    # Service addresses are answered by every node's service rules, not routed between nodes.\n    if MALLA_SERVICE ~ bgp_community then reject;\n    accept;\n  }\n  if proto = \"malla_blocks4\" || proto = \"malla_blocks6\" then accept;\n  reject;\n}\n\n",
        );
        s.push_str("protocol device {\n  scan time 10;\n}\n\n");
        s.push_str("# Connected subnets: next hops of peers on this node's segment resolve through them.\n");
        s.push_str("protocol direct {\n  ipv4;\n  ipv6;\n}\n\n");
        for fam in ["4", "6"] {
            let _ = write!(
                s,
                "protocol kernel kernel{fam} {{\n  ipv{fam} {{\n    import all;\n    export filter malla_to_kernel;\n  }};\n  learn;\n  persist;\n  graceful restart;\n  merge paths on;\n  scan time 10;\n}}\n\n"
            );
        }
        for (name, v6, nets) in [
            ("malla_blocks4", false, &self.blocks),
            ("malla_blocks6", true, &self.blocks),
            ("malla_borrowed4", false, &self.borrowed),
            ("malla_borrowed6", true, &self.borrowed),
            ("malla_services4", false, &self.services),
            ("malla_services6", true, &self.services),
        ] {
            let _ = writeln!(
                s,
                "protocol static {name} {{\n  ipv{};",
                if v6 { 6 } else { 4 }
            );
            for n in nets.iter().filter(|n| matches!(n, IpNet::V6(_)) == v6) {
                let _ = writeln!(s, "  route {n} blackhole;");
            }
            s.push_str("}\n\n");
        }
        let t = self.timers;
        let _ = write!(
            s,
            "template bgp malla_peer {{\n  local as {};\n  hold time {};\n  keepalive time {};\n  connect delay time 1;\n  connect retry time 2;\n  error wait time 1, 10;\n  graceful restart on;\n  graceful restart time {};\n}}\n",
            self.as_number, t.hold_secs, t.keepalive_secs, t.max_restart_secs
        );
        for p in &self.peers {
            let fam = if p.address.is_ipv4() { 4 } else { 6 };
            let desc = match &p.kind {
                PeerKind::Node(n) => format!("node {n}"),
                PeerKind::External => format!("peer {}", p.address),
            };
            let _ = write!(
                s,
                "\nprotocol bgp {} from malla_peer {{\n  description \"{}\";\n  neighbor {} as {};\n  source address {};\n",
                p.name,
                quote(&desc),
                p.address,
                p.as_number,
                p.source
            );
            if let Some(pw) = &p.password {
                // Validated: no double quote or backslash, nothing to escape.
                let _ = writeln!(s, "  password \"{pw}\";");
            }
            if p.timers.hold_secs != t.hold_secs {
                let _ = writeln!(s, "  hold time {};", p.timers.hold_secs);
            }
            if p.timers.keepalive_secs != t.keepalive_secs {
                let _ = writeln!(s, "  keepalive time {};", p.timers.keepalive_secs);
            }
            if p.timers.max_restart_secs != t.max_restart_secs {
                let _ = writeln!(s, "  graceful restart time {};", p.timers.max_restart_secs);
            }
            if p.rr_client {
                if let Some(id) = self.rr_cluster_id {
                    let _ = writeln!(s, "  rr client;\n  rr cluster id {id};");
                }
            }
            // Auto: the node's own address on its own routes; a reflector keeps the
            // originator's next hop on what it reflects (BIRD's iBGP default).
            let next_hop = match p.next_hop {
                NextHopMode::SelfAddress => "    next hop self;\n",
                NextHopMode::Keep => "    next hop keep;\n",
                NextHopMode::Auto if self.rr_cluster_id.is_some() => "",
                NextHopMode::Auto => "    next hop self;\n",
            };
            let _ = write!(
                s,
                "  ipv{fam} {{\n    import all;\n    export filter malla_to_peers;\n{next_hop}  }};\n}}\n"
            );
        }
        s
    }
}

/// Whether node `name` has peer `p` (its `node`, its `nodeSelector`, or every node).
fn has_peer(bgp: &BgpConfig, p: &malla_api::BgpPeer, name: &str) -> bool {
    if let Some(n) = &p.node {
        return n == name;
    }
    match &p.node_selector {
        Some(sel) => matches(sel, &bgp.node_labels(name)),
        None => true,
    }
}

/// Whether `sel` (validated before) matches `labels`.
fn matches(sel: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
    Selector::parse(sel).is_ok_and(|s| s.matches(labels, false))
}

/// The routers `me` peers with (peers with `peerIP` that `me` has).
fn external_peers<'a>(
    bgp: &'a BgpConfig,
    me: &'a str,
) -> impl Iterator<Item = &'a malla_api::BgpPeer> {
    bgp.peers
        .iter()
        .filter(move |p| p.peer_ip.is_some() && has_peer(bgp, p, me))
}

/// The nodes among `others` that peer `p` (one with `peerSelector`) gives `me` a session
/// with: those it selects when `me` has the peer, and (as Calico's, sessions go both ways)
/// those that have the peer when it selects `me`.
fn selected_nodes<'a>(
    bgp: &BgpConfig,
    p: &malla_api::BgpPeer,
    me: &str,
    others: &[&'a Node],
) -> Vec<&'a Node> {
    let Some(sel) = &p.peer_selector else {
        return Vec::new();
    };
    let me_has = has_peer(bgp, p, me);
    let me_selected = matches(sel, &bgp.node_labels(me));
    others
        .iter()
        .filter(|n| {
            (me_has && matches(sel, &bgp.node_labels(&n.name)))
                || (me_selected && has_peer(bgp, p, &n.name))
        })
        .copied()
        .collect()
}

/// A string for inside BIRD's double quotes.
pub(crate) fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;

    pub(crate) fn node(name: &str, v4: &str, v6: Option<&str>) -> Node {
        Node {
            name: name.into(),
            underlay_ipv4: Some(v4.parse().unwrap()),
            underlay_ipv6: v6.map(|s| s.parse().unwrap()),
            underlay_mtu: 1500,
            vtep_mac: String::new(),
        }
    }

    fn peer_names(sp: &NodeSpeaker) -> Vec<&str> {
        sp.peers.iter().map(|p| p.name.as_str()).collect()
    }

    fn cluster() -> Vec<Node> {
        vec![
            node("node-1", "198.19.0.11", Some("fd00:198:19::11")),
            node("node-2", "198.19.2.12", Some("fd00:198:19:2::12")),
            node("node-3", "198.19.0.13", None),
        ]
    }

    #[test]
    fn full_mesh_dual_stack_with_a_per_node_router() {
        let config = ClusterConfig {
            bgp: Some(BgpConfig {
                peers: vec![
                    malla_api::BgpPeer {
                        peer_ip: Some("198.19.0.1".parse().unwrap()),
                        as_number: Some(64512),
                        node: Some("node-1".into()),
                        ..Default::default()
                    },
                    malla_api::BgpPeer {
                        peer_ip: Some("198.19.2.1".parse().unwrap()),
                        as_number: Some(64512),
                        node: Some("node-2".into()),
                        ..Default::default()
                    },
                ],
                ..BgpConfig::default()
            }),
            ..ClusterConfig::default()
        };
        let mut sp = NodeSpeaker::new(
            "node-1",
            &config,
            &cluster(),
            &[
                "198.18.0.0/26".parse().unwrap(),
                "fd00:198:18::/122".parse().unwrap(),
            ],
            &["198.18.0.70/32".parse().unwrap()],
        )
        .unwrap();
        sp.log = Some("/run/malla-lab/x/nodes/node-1/bird/bird.log".into());
        sp.services = vec![
            "198.19.64.0/18".parse().unwrap(),
            "198.19.200.1/32".parse().unwrap(),
        ];
        assert_eq!(
            peer_names(&sp),
            [
                "mesh4_node_2",
                "mesh6_node_2",
                "mesh4_node_3",
                "peer4_198_19_0_1"
            ]
        );
        golden("node-1-mesh.conf", &sp.render());
    }

    #[test]
    fn route_reflector_only() {
        let config = ClusterConfig {
            bgp: Some(BgpConfig {
                node_to_node_mesh: false,
                as_number: 65001,
                keepalive_secs: 10,
                peers: vec![malla_api::BgpPeer {
                    peer_ip: Some("198.19.0.1".parse().unwrap()),
                    as_number: Some(65001),
                    node: None,
                    ..Default::default()
                }],
                ..BgpConfig::default()
            }),
            ..ClusterConfig::default()
        };
        let sp = NodeSpeaker::new("node-3", &config, &cluster(), &[], &[]).unwrap();
        assert_eq!(sp.peers.len(), 1);
        golden("node-3-rr.conf", &sp.render());
    }

    #[test]
    fn password_timers_and_next_hop_per_peer() {
        let cfg: malla_api::BgpConfig = serde_json::from_str(
            r#"{"keepaliveSecs": 2, "holdTimeSecs": 9, "maxRestartTimeSecs": 300,
                "peers": [{"peerIP": "198.19.0.1", "asNumber": 64512, "node": "node-1",
                           "password": "s3cr'et!", "keepaliveSecs": 1, "holdTimeSecs": 3,
                           "maxRestartTimeSecs": 30, "nextHopMode": "Keep"},
                          {"peerIP": "198.19.0.2", "asNumber": 65010,
                           "nodeSelector": "rack == 'a'", "nextHopMode": "Self"},
                          {"peerIP": "198.19.0.3", "asNumber": 65011,
                           "nodeSelector": "rack == 'b'"}],
                "nodes": [{"name": "node-1", "labels": {"rack": "a"}}]}"#,
        )
        .unwrap();
        let config = ClusterConfig {
            bgp: Some(cfg),
            ..ClusterConfig::default()
        };
        let sp = NodeSpeaker::new("node-1", &config, &cluster(), &[], &[]).unwrap();
        // node-1 is in rack a: the rack-b router is not its peer.
        assert_eq!(
            peer_names(&sp),
            [
                "mesh4_node_2",
                "mesh6_node_2",
                "mesh4_node_3",
                "peer4_198_19_0_1",
                "peer4_198_19_0_2"
            ]
        );
        golden("node-1-peer-options.conf", &sp.render());
    }

    /// Calico's route reflector set-up: mesh off, node-3 a reflector, every node peers with
    /// the reflectors (and they, symmetrically, with every node).
    fn reflector_config() -> ClusterConfig {
        let cfg: malla_api::BgpConfig = serde_json::from_str(
            r#"{"nodeToNodeMesh": false,
                "nodes": [{"name": "node-3", "labels": {"route-reflector": "true"},
                           "routeReflectorClusterID": "244.0.0.1"}],
                "peers": [{"nodeSelector": "all()", "peerSelector": "has(route-reflector)"}]}"#,
        )
        .unwrap();
        ClusterConfig {
            bgp: Some(cfg),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn nodes_as_route_reflectors() {
        let mut nodes = cluster();
        nodes.push(node("node-4", "198.19.2.14", None));
        let config = reflector_config();
        let names = |me: &str| -> Vec<String> {
            NodeSpeaker::new(me, &config, &nodes, &[], &[])
                .unwrap()
                .peers
                .iter()
                .map(|p| format!("{}{}", p.name, if p.rr_client { "(client)" } else { "" }))
                .collect()
        };
        // A client: one session, to the reflector.
        assert_eq!(names("node-1"), ["node4_node_3"]);
        assert_eq!(names("node-4"), ["node4_node_3"]);
        // The reflector: every node, each a client.
        assert_eq!(
            names("node-3"),
            [
                "node4_node_1(client)",
                "node4_node_2(client)",
                "node4_node_4(client)"
            ]
        );
        let rr = NodeSpeaker::new("node-3", &config, &nodes, &[], &[]).unwrap();
        assert_eq!(rr.rr_cluster_id, Some("244.0.0.1".parse().unwrap()));
        golden("node-3-reflector.conf", &rr.render());
        let client = NodeSpeaker::new("node-1", &config, &nodes, &[], &[]).unwrap();
        golden("node-1-reflector-client.conf", &client.render());
    }

    #[test]
    fn malformed_settings_are_refused_naming_the_field() {
        let mut config = reflector_config();
        if let Some(b) = config.bgp.as_mut() {
            b.peers[0].peer_selector = Some("has(route-reflector".into());
        }
        let err = NodeSpeaker::new("node-1", &config, &cluster(), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cluster config: bgp.peers[0].peerSelector: selector"),
            "{err}"
        );
        if let Some(b) = config.bgp.as_mut() {
            b.peers[0].peer_selector = Some("has(route-reflector)".into());
            b.hold_time_secs = Some(2);
        }
        let err = NodeSpeaker::new("node-1", &config, &cluster(), &[], &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster config: bgp.holdTimeSecs: 2 is less than 3 seconds (BGP's minimum)"
        );
    }

    #[test]
    fn colliding_names_stay_unique_and_errors_name_the_node() {
        let nodes = vec![
            node("a", "198.19.0.11", None),
            node("b-1", "198.19.0.12", None),
            node("b_1", "198.19.0.13", None),
        ];
        let sp = NodeSpeaker::new("a", &ClusterConfig::default(), &nodes, &[], &[]).unwrap();
        assert_eq!(peer_names(&sp), ["mesh4_b_1", "mesh4_b_1_2"]);
        assert_eq!(
            NodeSpeaker::new("z", &ClusterConfig::default(), &nodes, &[], &[]),
            Err(RenderError::UnknownNode("z".into()))
        );
        let mut n = node("v6only", "198.19.0.1", Some("fd00::1"));
        n.underlay_ipv4 = None;
        assert_eq!(
            NodeSpeaker::new("v6only", &ClusterConfig::default(), &[n], &[], &[]),
            Err(RenderError::NoRouterId("v6only".into()))
        );
    }
}
