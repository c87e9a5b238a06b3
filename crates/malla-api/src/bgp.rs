//! The cluster's BGP settings for `routing: bgp`: Calico's `BGPConfiguration` ([`BgpConfig`]),
//! its `BGPPeer`s ([`BgpPeer`]) and the BGP part of its `Node`s ([`BgpNodeSpec`]: labels the
//! peer selectors match, and `routeReflectorClusterID`) in one object, the `bgp` field of the
//! cluster config.
//!
//! Times are whole seconds (`keepaliveSecs`, `holdTimeSecs`, `maxRestartTimeSecs`: Calico's
//! `keepaliveTime`, hold time and `maxRestartTime`); a peer's own value wins over the cluster's.
//! [`BgpConfig::validate`] refuses what BIRD would refuse, or what cannot work, naming the field
//! (`bgp.peers[1].holdTimeSecs`); [`BgpConfig::from_json`] does the same for type errors (a
//! negative time, a malformed address).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::calico::{bad, FieldError};
use crate::selector::Selector;

/// The cluster's BGP settings (Calico's `BGPConfiguration` with its `BGPPeer`s).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfig {
    /// The nodes' AS number (every node speaks iBGP with the others in it).
    #[serde(default = "default_as_number")]
    pub as_number: u32,
    /// Whether every node peers with every other node (a full iBGP mesh). Off when route
    /// reflectors (the top-of-rack router as a [`BgpPeer`], or nodes with a
    /// `routeReflectorClusterID` selected by `peerSelector`) carry the routes instead.
    #[serde(default = "default_true")]
    pub node_to_node_mesh: bool,
    /// Routers outside the cluster, and node-to-node sessions by selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<BgpPeer>,
    /// Keepalive interval in seconds of every session (Calico's `keepaliveTime`).
    #[serde(default = "default_keepalive")]
    pub keepalive_secs: u16,
    /// Hold time in seconds of every session (absent: three keepalives). At least 3 (BIRD's
    /// minimum) and at least three keepalives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_secs: Option<u16>,
    /// How long peers keep a restarting node's routes (graceful restart; Calico's
    /// `maxRestartTime`), 1 to 4095 seconds (absent: 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time_secs: Option<u16>,
    /// Per-node BGP settings (Calico's `Node` labels and `spec.bgp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<BgpNodeSpec>,
    /// Service cluster IP ranges every node announces (Calico's `serviceClusterIPs`); a
    /// Service with `externalTrafficPolicy: Local` has its /32 or /128 announced only by the
    /// nodes with a ready endpoint.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        rename = "serviceClusterIPs"
    )]
    pub service_cluster_ips: Vec<IpNet>,
    /// External IP ranges (`serviceExternalIPs`), announced the same way.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        rename = "serviceExternalIPs"
    )]
    pub service_external_ips: Vec<IpNet>,
    /// LoadBalancer IP ranges (`serviceLoadBalancerIPs`), announced the same way; also the
    /// pools `type: LoadBalancer` Services get their address from.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        rename = "serviceLoadBalancerIPs"
    )]
    pub service_load_balancer_ips: Vec<IpNet>,
}

/// The default AS number of a cluster's nodes (Calico's).
pub const DEFAULT_AS_NUMBER: u32 = 64512;
/// How long peers keep a restarting speaker's routes unless configured (seconds).
pub const DEFAULT_MAX_RESTART_SECS: u16 = 120;

fn default_as_number() -> u32 {
    DEFAULT_AS_NUMBER
}
fn default_keepalive() -> u16 {
    3
}
fn default_true() -> bool {
    true
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            as_number: DEFAULT_AS_NUMBER,
            node_to_node_mesh: true,
            peers: Vec::new(),
            keepalive_secs: default_keepalive(),
            hold_time_secs: None,
            max_restart_time_secs: None,
            nodes: Vec::new(),
            service_cluster_ips: Vec::new(),
            service_external_ips: Vec::new(),
            service_load_balancer_ips: Vec::new(),
        }
    }
}

/// A BGP peer (Calico's `BGPPeer`). Which nodes have it: `node`, or those `nodeSelector`
/// matches, or (neither) every node. Who is on the other end: the router at `peerIP` (in AS
/// `asNumber`), or every node `peerSelector` matches (in the nodes' AS; as Calico's, such a
/// peering goes both ways: the selected nodes peer back).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeer {
    /// The peer's address.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "peerIP",
        alias = "peerIp"
    )]
    pub peer_ip: Option<IpAddr>,
    /// Its AS number (the nodes' own: iBGP; another: eBGP); with `peerIP` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Only this node has the peer (a top-of-rack router of its rack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only the nodes this selector matches have the peer (their [`BgpNodeSpec`] labels and
    /// `kubernetes.io/hostname`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// The peers are the nodes this selector matches (e.g. `has(route-reflector)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    /// TCP MD5 password of the session (BIRD's `password`); both ends must have the same.
    /// Inline: the cluster config is the secret's home (Calico reads it from a Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Keepalive interval of these sessions (absent: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_secs: Option<u16>,
    /// Hold time of these sessions (absent: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_secs: Option<u16>,
    /// How long this peer keeps a restarting node's routes (absent: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time_secs: Option<u16>,
    /// The next hop of the routes sent to this peer (Calico's `nextHopMode`).
    #[serde(default, skip_serializing_if = "NextHopMode::is_auto")]
    pub next_hop_mode: NextHopMode,
}

/// What next hop a node puts on the routes it sends (Calico's `nextHopMode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NextHopMode {
    /// The node's own address on its own routes; a route reflector keeps the originator's
    /// next hop on the routes it reflects.
    #[default]
    Auto,
    /// Always the node's own address (BIRD's `next hop self`), also on reflected routes.
    #[serde(rename = "Self")]
    SelfAddress,
    /// Always the next hop the route came with (BIRD's `next hop keep`).
    Keep,
}

impl NextHopMode {
    fn is_auto(&self) -> bool {
        *self == NextHopMode::Auto
    }
}

/// One node's BGP settings (Calico's `Node` labels and `spec.bgp`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpNodeSpec {
    /// The node's name.
    pub name: String,
    /// Labels `nodeSelector` and `peerSelector` match (besides `kubernetes.io/hostname`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The node is a route reflector of this cluster ID: it reflects routes to the nodes that
    /// peer with it and are not reflectors themselves.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "routeReflectorClusterID"
    )]
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
}

/// A session's timers after the peer's and the cluster's settings are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    pub keepalive_secs: u16,
    pub hold_secs: u16,
    pub max_restart_secs: u16,
}

/// The longest TCP MD5 key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MAX_PASSWORD_LEN: usize = 80;

impl BgpConfig {
    /// The config in `text` (JSON), type errors named by their path under `bgp`, then
    /// [`Self::validate`]d.
    pub fn from_json(text: &str) -> Result<Self, FieldError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg: BgpConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "bgp".to_string()
            } else {
                format!("bgp.{path}")
            };
            bad(field, e.into_inner().to_string())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The timers of a session configured by `peer` (None: a mesh session).
    pub fn timers(&self, peer: Option<&BgpPeer>) -> Timers {
        let keepalive = peer
            .and_then(|p| p.keepalive_secs)
            .unwrap_or(self.keepalive_secs);
        let hold = peer
            .and_then(|p| p.hold_time_secs)
            .or(self.hold_time_secs)
            .unwrap_or_else(|| keepalive.saturating_mul(3));
        let restart = peer
            .and_then(|p| p.max_restart_time_secs)
            .or(self.max_restart_time_secs)
            .unwrap_or(DEFAULT_MAX_RESTART_SECS);
        Timers {
            keepalive_secs: keepalive,
            hold_secs: hold,
            max_restart_secs: restart,
        }
    }

    /// The labels node `name`'s selectors see: its [`BgpNodeSpec`] labels and
    /// `kubernetes.io/hostname`.
    pub fn node_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .node(name)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        labels.insert("kubernetes.io/hostname".into(), name.to_string());
        labels
    }

    /// Node `name`'s settings, if it has any.
    pub fn node(&self, name: &str) -> Option<&BgpNodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Refuses what BIRD would refuse or what cannot work, naming the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.as_number == 0 || self.as_number == u32::MAX {
            return Err(bad(
                "bgp.asNumber",
                format!("{} is not a usable AS number", self.as_number),
            ));
        }
        check_timers(
            "bgp",
            self.keepalive_secs,
            self.hold_time_secs,
            self.max_restart_time_secs,
            self.timers(None),
        )?;
        let mut names = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let at = format!("bgp.nodes[{i}]");
            if n.name.is_empty() {
                return Err(bad(format!("{at}.name"), "must not be empty"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(bad(
                    format!("{at}.name"),
                    format!("node {:?} is listed twice", n.name),
                ));
            }
            if let Some(id) = n.route_reflector_cluster_id {
                if id.is_unspecified() || id.is_broadcast() {
                    return Err(bad(
                        format!("{at}.routeReflectorClusterID"),
                        format!("{id} is not a usable cluster ID"),
                    ));
                }
            }
            for k in n.labels.keys() {
                if k.is_empty() {
                    return Err(bad(format!("{at}.labels"), "a label key is empty"));
                }
            }
        }
        for (i, p) in self.peers.iter().enumerate() {
            let at = format!("bgp.peers[{i}]");
            match (p.peer_ip, &p.peer_selector) {
                (Some(_), Some(_)) => {
                    return Err(bad(
                        format!("{at}.peerSelector"),
                        "peerIP and peerSelector are exclusive",
                    ))
                }
                (None, None) => {
                    return Err(bad(
                        format!("{at}.peerIP"),
                        "a peer needs peerIP (with asNumber) or peerSelector",
                    ))
                }
                (Some(ip), None) => {
                    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                        return Err(bad(
                            format!("{at}.peerIP"),
                            format!("{ip} cannot be a BGP peer"),
                        ));
                    }
                    match p.as_number {
                        None => return Err(bad(format!("{at}.asNumber"), "required with peerIP")),
                        Some(0) | Some(u32::MAX) => {
                            return Err(bad(format!("{at}.asNumber"), "is not a usable AS number"))
                        }
                        Some(_) => {}
                    }
                }
                (None, Some(sel)) => {
                    if p.as_number.is_some() {
                        return Err(bad(
                            format!("{at}.asNumber"),
                            "peers chosen by peerSelector are nodes, in the cluster's AS",
                        ));
                    }
                    Selector::parse(sel)
                        .map_err(|e| bad(format!("{at}.peerSelector"), e.to_string()))?;
                }
            }
            if p.node.is_some() && p.node_selector.is_some() {
                return Err(bad(
                    format!("{at}.nodeSelector"),
                    "node and nodeSelector are exclusive",
                ));
            }
            if let Some(sel) = &p.node_selector {
                Selector::parse(sel)
                    .map_err(|e| bad(format!("{at}.nodeSelector"), e.to_string()))?;
            }
            if let Some(pw) = &p.password {
                if pw.is_empty() {
                    return Err(bad(format!("{at}.password"), "must not be empty"));
                }
                if pw.len() > MAX_PASSWORD_LEN {
                    return Err(bad(
                        format!("{at}.password"),
                        format!("longer than {MAX_PASSWORD_LEN} bytes (TCP MD5's limit)"),
                    ));
                }
                if pw.chars().any(|c| c.is_control()) {
                    return Err(bad(format!("{at}.password"), "holds a control character"));
                }
                if pw.contains(['"', '\\']) {
                    return Err(bad(
                        format!("{at}.password"),
                        "holds a double quote or a backslash (BIRD's strings cannot)",
                    ));
                }
            }
            check_timers(
                &at,
                p.keepalive_secs.unwrap_or(self.keepalive_secs),
                p.hold_time_secs.or(self.hold_time_secs),
                p.max_restart_time_secs,
                self.timers(Some(p)),
            )?;
        }
        Ok(())
    }
}

/// The timer rules at `at`: keepalive at least 1, hold time 3 to 65535 and at least three
/// keepalives, restart time 1 to 4095 (BGP's 12-bit field).
fn check_timers(
    at: &str,
    keepalive: u16,
    hold: Option<u16>,
    restart: Option<u16>,
    t: Timers,
) -> Result<(), FieldError> {
    if keepalive == 0 {
        return Err(bad(
            format!("{at}.keepaliveSecs"),
            "must be at least 1 second",
        ));
    }
    if let Some(h) = hold {
        if h < 3 {
            return Err(bad(
                format!("{at}.holdTimeSecs"),
                format!("{h} is less than 3 seconds (BGP's minimum)"),
            ));
        }
    }
    if u32::from(t.keepalive_secs) * 3 > u32::from(t.hold_secs) {
        let field = if hold.is_some() {
            "holdTimeSecs"
        } else {
            "keepaliveSecs"
        };
        return Err(bad(
            format!("{at}.{field}"),
            format!(
                "keepalive {}s is more than a third of the hold time {}s",
                t.keepalive_secs, t.hold_secs
            ),
        ));
    }
    if let Some(r) = restart {
        if r == 0 || r > 4095 {
            return Err(bad(
                format!("{at}.maxRestartTimeSecs"),
                format!("{r} is outside 1 to 4095 seconds"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        BgpConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn a_full_config_parses() {
        let cfg = BgpConfig::from_json(
            r#"{"nodeToNodeMesh": false, "keepaliveSecs": 2, "holdTimeSecs": 6,
                "maxRestartTimeSecs": 60,
                "nodes": [{"name": "node-1", "labels": {"route-reflector": "true"},
                           "routeReflectorClusterID": "224.0.0.1"}],
                "peers": [
                  {"peerSelector": "has(route-reflector)"},
                  {"peerIP": "198.19.0.1", "asNumber": 64512, "node": "node-1",
                   "password": "s3cret", "keepaliveSecs": 1, "holdTimeSecs": 3,
                   "nextHopMode": "Self"}]}"#,
        )
        .unwrap();
        assert_eq!(cfg.peers[1].next_hop_mode, NextHopMode::SelfAddress);
        assert_eq!(
            cfg.timers(Some(&cfg.peers[1])),
            Timers {
                keepalive_secs: 1,
                hold_secs: 3,
                max_restart_secs: 60
            }
        );
        assert_eq!(cfg.timers(None).hold_secs, 6);
        assert_eq!(
            cfg.node_labels("node-1")
                .get("route-reflector")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            cfg.node_labels("node-9")["kubernetes.io/hostname"],
            "node-9"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"holdTimeSecs": -3}"#,
                "bgp.holdTimeSecs: invalid value: integer `-3`",
            ),
            (
                r#"{"holdTimeSecs": 0}"#,
                "bgp.holdTimeSecs: 0 is less than 3",
            ),
            (
                r#"{"holdTimeSecs": 2}"#,
                "bgp.holdTimeSecs: 2 is less than 3",
            ),
            (
                r#"{"keepaliveSecs": 0}"#,
                "bgp.keepaliveSecs: must be at least 1",
            ),
            (
                r#"{"keepaliveSecs": 5, "holdTimeSecs": 9}"#,
                "bgp.holdTimeSecs: keepalive 5s is more than a third of the hold time 9s",
            ),
            (
                r#"{"maxRestartTimeSecs": 5000}"#,
                "bgp.maxRestartTimeSecs: 5000 is outside 1 to 4095",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "holdTimeSecs": 1}]}"#,
                "bgp.peers[0].holdTimeSecs: 1 is less than 3",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "keepaliveSecs": 5, "holdTimeSecs": 12}]}"#,
                "bgp.peers[0].holdTimeSecs: keepalive 5s is more than a third of the hold time 12s",
            ),
            (
                r#"{"holdTimeSecs": 9, "peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "keepaliveSecs": 4}]}"#,
                "bgp.peers[0].holdTimeSecs: keepalive 4s is more than a third of the hold time 9s",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "password": "a\"b"}]}"#,
                "bgp.peers[0].password: holds a double quote",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "password": ""}]}"#,
                "bgp.peers[0].password: must not be empty",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1", "asNumber": 1, "password": "a\nb"}]}"#,
                "bgp.peers[0].password: holds a control character",
            ),
            (
                &format!(
                    r#"{{"peers": [{{"peerIP": "198.19.0.1", "asNumber": 1, "password": "{}"}}]}}"#,
                    "x".repeat(81)
                ),
                "bgp.peers[0].password: longer than 80 bytes",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.1"}]}"#,
                "bgp.peers[0].asNumber: required with peerIP",
            ),
            (
                r#"{"peers": [{"peerIP": "198.19.0.999", "asNumber": 1}]}"#,
                "bgp.peers[0].peerIP: invalid IP address syntax",
            ),
            (
                r#"{"peers": [{"asNumber": 1}]}"#,
                "bgp.peers[0].peerIP: a peer needs peerIP",
            ),
            (
                r#"{"peers": [{"peerSelector": "has(rr", "nodeSelector": "all()"}]}"#,
                "bgp.peers[0].peerSelector: selector",
            ),
            (
                r#"{"peers": [{"peerSelector": "all()", "asNumber": 64512}]}"#,
                "bgp.peers[0].asNumber: peers chosen by peerSelector",
            ),
            (
                r#"{"peers": [{"peerSelector": "all()", "nodeSelector": "a ==", "node": "x"}]}"#,
                "bgp.peers[0].nodeSelector: node and nodeSelector are exclusive",
            ),
            (
                r#"{"peers": [{"peerSelector": "all()", "nextHopMode": "Other"}]}"#,
                "bgp.peers[0].nextHopMode: unknown variant `Other`",
            ),
            (
                r#"{"nodes": [{"name": "a", "routeReflectorClusterID": "0.0.0.0"}]}"#,
                "bgp.nodes[0].routeReflectorClusterID: 0.0.0.0 is not a usable",
            ),
            (
                r#"{"nodes": [{"name": "a"}, {"name": "a"}]}"#,
                "bgp.nodes[1].name: node \"a\" is listed twice",
            ),
            (
                r#"{"holdTime": 9}"#,
                "bgp.holdTime: unknown field `holdTime`",
            ),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(got.starts_with(want), "{json}: {got}");
        }
    }
}
