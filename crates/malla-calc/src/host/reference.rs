//! The reference evaluator of host endpoint policy: Calico's documented semantics read
//! straight, with no sets, chains or cleverness — the oracle the rendered ruleset is tested
//! against (`host::tests`).
//!
//! For the first packet of a connection at a [`Stage`] on interface `iface`:
//! 1. Not subject to host endpoint policy: loopback, a pod's interface, the failsafe ports
//!    (inbound for pre-DNAT and input, by destination port and optionally source network;
//!    outbound for output, by destination port and optionally destination network) and, in
//!    VXLAN mode, the overlay's UDP port between this node and another node.
//! 2. The host endpoint: the one naming the interface, else the node's all-interfaces one,
//!    else none (then nothing applies).
//! 3. Tiers in order, each with the policies selecting the endpoint for the stage in order,
//!    their rules (ingress rules for ingress stages, egress for egress) in order: the first
//!    rule matching with Allow or Deny decides; Pass leaves the tier for the next; Log goes
//!    on. A tier that applied and did not decide denies, except in pre-DNAT, which has no
//!    default drop.
//! 4. No tier decided: pre-DNAT lets the packet on, input and output follow the endpoint's
//!    profiles, forward allows.

use std::net::IpAddr;

use malla_api::calico::{EntityRule, HostEndpoint, Port, Proto, ProtoPort, Rule};
use malla_api::selector::Selector;

use super::{picks, profile_allows, tiers_for, CalicoView, Labelled, Stage};

/// The first packet of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub sport: u16,
    pub dport: u16,
    /// ICMP type and code (for ICMP packets).
    pub icmp: Option<(u8, u8)>,
}

/// What a stage does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Pre-DNAT decided nothing: the packet goes on to the next stage.
    Continue,
}

impl Decision {
    /// Whether the packet passes this stage.
    pub fn passes(self) -> bool {
        self != Decision::Deny
    }
}

fn port_in(ports: &[Port], port: u16) -> bool {
    ports
        .iter()
        .any(|p| matches!(p, Port::Range(a, b) if *a <= port && port <= *b))
}

fn side_matches(
    e: &EntityRule,
    addr: IpAddr,
    port: u16,
    ents: &[Labelled],
    scope: Option<&str>,
) -> bool {
    if !e.nets.is_empty() && !e.nets.iter().any(|n| n.contains(&addr)) {
        return false;
    }
    if e.not_nets.iter().any(|n| n.contains(&addr)) {
        return false;
    }
    let parse = |s: &Option<String>| s.as_deref().and_then(|t| Selector::parse(t).ok());
    let (sel, not_sel, ns) = (
        parse(&e.selector),
        parse(&e.not_selector),
        parse(&e.namespace_selector),
    );
    let owners = || {
        ents.iter()
            .filter(|x| x.nets.iter().any(|n| n.contains(&addr)))
    };
    if (sel.is_some() || ns.is_some())
        && !owners().any(|x| picks(sel.as_ref(), ns.as_ref(), x, scope))
    {
        return false;
    }
    if not_sel.is_some() && owners().any(|x| picks(not_sel.as_ref(), ns.as_ref(), x, scope)) {
        return false;
    }
    if !e.ports.is_empty() && !port_in(&e.ports, port) {
        return false;
    }
    !port_in(&e.not_ports, port)
}

/// Whether `rule`'s match criteria hold for `p`.
pub fn rule_matches(rule: &Rule, p: &HostPacket, ents: &[Labelled]) -> bool {
    rule_matches_in(rule, p, ents, None)
}

/// [`rule_matches`] for a rule of a namespaced policy (`scope`: its namespace, where its
/// selectors pick unless they carry a namespace selector).
pub fn rule_matches_in(
    rule: &Rule,
    p: &HostPacket,
    ents: &[Labelled],
    scope: Option<&str>,
) -> bool {
    // DNS-name rules are pods' ([`crate::policy::dns`]): as written, they match nothing here.
    if !rule.destination.domains.is_empty() {
        return false;
    }
    let v4 = p.src.is_ipv4();
    if let Some(v) = rule.ip_version {
        if (v == 4) != v4 {
            return false;
        }
    }
    if let Some(proto) = rule.protocol {
        if proto != p.proto {
            return false;
        }
        // ICMP is IPv4's, ICMPv6 IPv6's.
        if (proto == Proto::ICMP && !v4) || (proto == Proto::ICMPV6 && v4) {
            return false;
        }
    }
    if rule.not_protocol == Some(p.proto) {
        return false;
    }
    if let Some(i) = rule.icmp {
        match p.icmp {
            Some((t, c)) if t == i.type_ && i.code.is_none_or(|x| x == c) => {}
            _ => return false,
        }
    }
    if let Some(i) = rule.not_icmp {
        if let Some((t, c)) = p.icmp {
            if t == i.type_ && i.code.is_none_or(|x| x == c) {
                return false;
            }
        }
    }
    side_matches(&rule.source, p.src, p.sport, ents, scope)
        && side_matches(&rule.destination, p.dst, p.dport, ents, scope)
}

/// What decided a packet at a stage: a rule (tier, policy, index into the stage's direction),
/// the end of a tier, or the default after every tier (profiles, pre-DNAT's "go on",
/// forward's allow), or an exemption (failsafe, loopback, a pod's interface, VXLAN, no host
/// endpoint).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum DecidedBy {
    Rule {
        tier: String,
        policy: String,
        index: usize,
    },
    EndOfTier {
        tier: String,
    },
    Default,
    Exempt {
        why: String,
    },
}

/// Tiers, policies and profiles of `hep` at `stage` (steps 3 and 4 above).
pub fn decide(
    view: &CalicoView,
    hep: &HostEndpoint,
    stage: Stage,
    p: &HostPacket,
    ents: &[Labelled],
) -> Decision {
    decide_explained(view, hep, stage, p, ents).0
}

/// [`decide`], with what decided.
pub fn decide_explained(
    view: &CalicoView,
    hep: &HostEndpoint,
    stage: Stage,
    p: &HostPacket,
    ents: &[Labelled],
) -> (Decision, DecidedBy) {
    for group in tiers_for(view, hep, stage) {
        let tier = group.name;
        let mut passed = false;
        'policies: for pol in group.policies {
            let rules = if stage.ingress() {
                &pol.spec.ingress
            } else {
                &pol.spec.egress
            };
            for (index, r) in rules.iter().enumerate() {
                if !rule_matches(r, p, ents) {
                    continue;
                }
                let by = || DecidedBy::Rule {
                    tier: tier.clone(),
                    policy: pol.name.clone(),
                    index,
                };
                match r.action {
                    malla_api::calico::Action::Allow => return (Decision::Allow, by()),
                    malla_api::calico::Action::Deny => return (Decision::Deny, by()),
                    malla_api::calico::Action::Pass => {
                        passed = true;
                        break 'policies;
                    }
                    malla_api::calico::Action::Log => {}
                }
            }
        }
        if !passed && stage != Stage::PreDnat && !group.pass_by_default {
            return (Decision::Deny, DecidedBy::EndOfTier { tier });
        }
    }
    let d = match stage {
        Stage::PreDnat => Decision::Continue,
        Stage::Input | Stage::Output => {
            if profile_allows(hep) {
                Decision::Allow
            } else {
                Decision::Deny
            }
        }
        Stage::ForwardIn | Stage::ForwardOut => Decision::Allow,
    };
    (d, DecidedBy::Default)
}

/// Whether a failsafe entry lets `p` through; `peer` is the source (inbound) or destination
/// (outbound) the entry's network restricts.
pub fn failsafe(list: &[ProtoPort], p: &HostPacket, peer: IpAddr) -> bool {
    list.iter().any(|f| {
        f.protocol == p.proto && f.port == p.dport && f.net.is_none_or(|n| n.contains(&peer))
    })
}

/// What the node does with `p` at `stage` on interface `iface`, everything considered
/// (steps 1–4). `nodes` are the other nodes' underlay addresses (VXLAN's exemption, with
/// `vxlan_port` when the cluster routes over VXLAN).
#[allow(clippy::too_many_arguments)]
pub fn verdict(
    view: &CalicoView,
    config: &malla_api::ClusterConfig,
    heps: &[HostEndpoint],
    nodes: &[IpAddr],
    stage: Stage,
    iface: &str,
    p: &HostPacket,
    ents: &[Labelled],
) -> Decision {
    verdict_explained(view, config, heps, nodes, stage, iface, p, ents).0
}

/// [`verdict`], with the host endpoint that applied (if any) and what decided.
#[allow(clippy::too_many_arguments)]
pub fn verdict_explained(
    view: &CalicoView,
    config: &malla_api::ClusterConfig,
    heps: &[HostEndpoint],
    nodes: &[IpAddr],
    stage: Stage,
    iface: &str,
    p: &HostPacket,
    ents: &[Labelled],
) -> (Decision, Option<String>, DecidedBy) {
    let pass = if stage == Stage::PreDnat {
        Decision::Continue
    } else {
        Decision::Allow
    };
    let exempt = |why: &str| (pass, None, DecidedBy::Exempt { why: why.into() });
    if iface == "lo" {
        return exempt("loopback");
    }
    if iface.starts_with(malla_api::HOST_IFNAME_PREFIX) {
        return exempt("a pod's interface");
    }
    match stage {
        Stage::PreDnat | Stage::Input if failsafe(&config.failsafe_inbound(), p, p.src) => {
            return exempt("inbound failsafe port")
        }
        Stage::Output if failsafe(&config.failsafe_outbound(), p, p.dst) => {
            return exempt("outbound failsafe port")
        }
        _ => {}
    }
    if config.routing == malla_api::RoutingMode::Vxlan
        && p.proto == Proto::UDP
        && p.dport == config.vxlan_port
    {
        let peer = if stage == Stage::Output { p.dst } else { p.src };
        if matches!(stage, Stage::Input | Stage::Output) && nodes.contains(&peer) {
            return exempt("VXLAN between nodes");
        }
    }
    let hep = heps
        .iter()
        .find(|h| h.spec.interface_name.as_deref() == Some(iface))
        .or_else(|| heps.iter().find(|h| h.all_interfaces()));
    match hep {
        None => exempt("no host endpoint"),
        Some(h) => {
            let (d, by) = decide_explained(view, h, stage, p, ents);
            (d, Some(h.name.clone()), by)
        }
    }
}
