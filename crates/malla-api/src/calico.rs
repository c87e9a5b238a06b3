//! Calico's `projectcalico.org/v3` policy resources, so Calico users bring their objects
//! unchanged: [`Tier`], [`GlobalNetworkPolicy`], [`HostEndpoint`] and [`GlobalNetworkSet`] —
//! the types (serde, camelCase, as a manifest's `spec` reads), Calico's defaulting and the
//! checks its API server makes, each error naming the field.
//!
//! Semantics live in `malla-calc::host` (host endpoints: failsafe rules, tiers, pre-DNAT,
//! apply-on-forward). What this version enforces: global policies on host endpoints. What it
//! refuses rather than half-applies: `doNotTrack` (untracked policy), named ports in rules,
//! `serviceAccountSelector` and a host endpoint without `interfaceName` (Calico would find the
//! interface from `expectedIPs`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// The tier Calico puts policies in when they name none (Kubernetes NetworkPolicies live here
/// too, at order 1000).
pub const DEFAULT_TIER: &str = "default";
/// The profile Calico's automatic host endpoints carry: traffic no policy decides is allowed.
pub const DEFAULT_ALLOW_PROFILE: &str = "projectcalico-default-allow";

/// A problem with a Calico object: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

pub(crate) fn bad(field: impl Into<String>, reason: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A resource name as Calico accepts it: a DNS-1123 subdomain (lower case alphanumerics, `-`
/// and `.`, at most 253 bytes, alphanumeric at both ends).
fn check_name(name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(bad(
            "metadata.name",
            format!("{name:?} is not a DNS-1123 subdomain"),
        ))
    }
}

/// A policy's or tier's `order`: lower goes first; absent goes last (Calico's "infinite").
/// Compared by value; NaN and infinities are refused by validation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Order(pub f64);

impl PartialEq for Order {
    fn eq(&self, o: &Self) -> bool {
        self.0.total_cmp(&o.0).is_eq()
    }
}
impl Eq for Order {}
impl PartialOrd for Order {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Order {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0)
    }
}

/// The sort key of something with an optional order and a name: order first (absent last),
/// then name, as Calico sorts tiers and the policies within a tier.
pub fn order_key(order: Option<Order>, name: &str) -> (bool, Order, String) {
    (
        order.is_none(),
        order.unwrap_or(Order(0.0)),
        name.to_string(),
    )
}

/// `projectcalico.org/v3` Tier: a named, ordered group of policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tier {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// What the tier does with traffic its applying policies did not decide: `Deny` (Calico's
    /// default) or `Pass` (on to the next tier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_action: Option<Action>,
}

impl Tier {
    /// Whether undecided traffic passes on to the next tier (else it is denied).
    pub fn passes_by_default(&self) -> bool {
        self.default_action == Some(Action::Pass)
    }
}

/// A rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Action {
    Allow,
    Deny,
    /// Skip the rest of this tier: the next tier decides.
    Pass,
    /// Log the packet and go on to the next rule.
    Log,
}

/// A protocol: a name Calico knows or a number (1–255).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(pub u8);

impl Proto {
    pub const ICMP: Proto = Proto(1);
    pub const TCP: Proto = Proto(6);
    pub const UDP: Proto = Proto(17);
    pub const ICMPV6: Proto = Proto(58);
    pub const SCTP: Proto = Proto(132);
    pub const UDPLITE: Proto = Proto(136);

    /// Whether ports apply (Calico allows them for TCP, UDP, SCTP and UDPLite).
    pub fn has_ports(self) -> bool {
        matches!(self, Proto::TCP | Proto::UDP | Proto::SCTP | Proto::UDPLITE)
    }

    /// The nft name (`tcp`, `udp`, …) or number.
    pub fn nft(self) -> String {
        match self {
            Proto::ICMP => "icmp".into(),
            Proto::TCP => "tcp".into(),
            Proto::UDP => "udp".into(),
            Proto::ICMPV6 => "ipv6-icmp".into(),
            Proto::SCTP => "sctp".into(),
            Proto::UDPLITE => "udplite".into(),
            Proto(n) => n.to_string(),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Proto::ICMP => f.write_str("ICMP"),
            Proto::TCP => f.write_str("TCP"),
            Proto::UDP => f.write_str("UDP"),
            Proto::ICMPV6 => f.write_str("ICMPv6"),
            Proto::SCTP => f.write_str("SCTP"),
            Proto::UDPLITE => f.write_str("UDPLite"),
            Proto(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Proto::ICMP
            | Proto::TCP
            | Proto::UDP
            | Proto::ICMPV6
            | Proto::SCTP
            | Proto::UDPLITE => s.serialize_str(&self.to_string()),
            Proto(n) => s.serialize_u8(n),
        }
    }
}

impl<'de> Deserialize<'de> for Proto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .filter(|n| *n > 0)
                .map(Proto)
                .ok_or_else(|| D::Error::custom(format!("protocol number {n} is not in 1-255"))),
            serde_json::Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "tcp" => Ok(Proto::TCP),
                "udp" => Ok(Proto::UDP),
                "icmp" => Ok(Proto::ICMP),
                "icmpv6" => Ok(Proto::ICMPV6),
                "sctp" => Ok(Proto::SCTP),
                "udplite" => Ok(Proto::UDPLITE),
                other => other
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n > 0)
                    .map(Proto)
                    .ok_or_else(|| {
                        D::Error::custom(format!(
                            "unknown protocol {s:?} (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1-255)"
                        ))
                    }),
            },
            other => Err(D::Error::custom(format!(
                "a protocol is a name or a number, got {other}"
            ))),
        }
    }
}

/// A port in a rule: a number, a range `first:last`, or a named port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Port {
    Range(u16, u16),
    Named(String),
}

impl Serialize for Port {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Port::Range(a, b) if a == b => s.serialize_u16(*a),
            Port::Range(a, b) => s.serialize_str(&format!("{a}:{b}")),
            Port::Named(n) => s.serialize_str(n),
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let num = |s: &str| -> Result<u16, D::Error> {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| D::Error::custom(format!("port {s:?} is not in 1-65535")))
        };
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::Number(n) => {
                let p = num(&n.to_string())?;
                Ok(Port::Range(p, p))
            }
            serde_json::Value::String(s) => {
                if let Some((a, b)) = s.split_once(':') {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(D::Error::custom(format!(
                            "port range {s:?}: the first port is above the last"
                        )));
                    }
                    Ok(Port::Range(a, b))
                } else if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
                    let p = num(&s)?;
                    Ok(Port::Range(p, p))
                } else {
                    Ok(Port::Named(s))
                }
            }
            other => Err(D::Error::custom(format!(
                "a port is a number, \"first:last\" or a name, got {other}"
            ))),
        }
    }
}

/// ICMP type and code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Icmp {
    #[serde(rename = "type")]
    pub type_: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u8>,
}

/// One side of a rule (`source` or `destination`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_nets: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<Port>,
    /// DNS names and wildcards (a destination's, in egress rules only): the addresses the
    /// pod's own DNS answers gave for them ([`crate::domain`]). Calico Enterprise takes them in
    /// Allow rules only; here a Deny (or Pass, Log) rule takes them too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
}

impl EntityRule {
    /// Whether the side says nothing about endpoints (no selectors).
    pub fn selects_endpoints(&self) -> bool {
        self.selector.is_some() || self.not_selector.is_some() || self.namespace_selector.is_some()
    }
}

/// Free-form metadata of a rule (Calico's `metadata.annotations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One rule of a Calico policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Proto>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_protocol: Option<Proto>,
    /// 4 or 6: the rule matches only that family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp: Option<Icmp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_icmp: Option<Icmp>,
    #[serde(default)]
    pub source: EntityRule,
    #[serde(default)]
    pub destination: EntityRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<RuleMetadata>,
}

/// `Ingress` / `Egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PolicyType {
    Ingress,
    Egress,
}

/// `projectcalico.org/v3` GlobalNetworkPolicy (cluster-wide; selects endpoints by label).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkPolicy {
    pub name: String,
    #[serde(default)]
    pub spec: GlobalNetworkPolicySpec,
}

/// The `spec` of a [`GlobalNetworkPolicy`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    /// The endpoints it applies to (Calico selector; empty: `all()`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub selector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<PolicyType>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<Rule>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub do_not_track: bool,
    #[serde(
        default,
        rename = "preDNAT",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub pre_dnat: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply_on_forward: bool,
    /// Calico's `performanceHints` (advice only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance_hints: Vec<String>,
}

impl GlobalNetworkPolicy {
    /// The tier it lives in (`default` when it names none).
    pub fn tier(&self) -> &str {
        self.spec.tier.as_deref().unwrap_or(DEFAULT_TIER)
    }

    /// Its types as Calico defaults them: given, or Ingress when there are no egress rules,
    /// Egress and Ingress when there are both kinds, Egress alone when only egress rules.
    /// Pre-DNAT policy is ingress only.
    pub fn effective_types(&self) -> (bool, bool) {
        match &self.spec.types {
            Some(t) => (
                t.contains(&PolicyType::Ingress),
                t.contains(&PolicyType::Egress),
            ),
            None => {
                let (i, e) = (!self.spec.ingress.is_empty(), !self.spec.egress.is_empty());
                match (i, e) {
                    (_, false) => (true, false),
                    (false, true) => (false, true),
                    (true, true) => (true, true),
                }
            }
        }
    }

    /// The parsed `spec.selector`.
    pub fn selector(&self) -> Result<Selector, FieldError> {
        Selector::parse(&self.spec.selector).map_err(|e| bad("spec.selector", e.to_string()))
    }

    /// The checks Calico's API server makes, and what Malla refuses instead of half-applying.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name(&self.name)?;
        let s = &self.spec;
        if let Some(t) = &s.tier {
            check_name(t).map_err(|e| bad("spec.tier", e.reason))?;
        }
        if let Some(o) = s.order {
            if !o.0.is_finite() {
                return Err(bad("spec.order", "must be a finite number"));
            }
        }
        self.selector()?;
        if let Some(ns) = &s.namespace_selector {
            Selector::parse(ns).map_err(|e| bad("spec.namespaceSelector", e.to_string()))?;
        }
        if s.service_account_selector.is_some() {
            return Err(bad(
                "spec.serviceAccountSelector",
                "not supported by Malla yet (the policy is refused rather than applied without it)",
            ));
        }
        if s.do_not_track {
            return Err(bad(
                "spec.doNotTrack",
                "untracked policy is not supported by Malla yet",
            ));
        }
        if s.pre_dnat {
            if !s.apply_on_forward {
                return Err(bad(
                    "spec.applyOnForward",
                    "must be true for a preDNAT policy",
                ));
            }
            if !s.egress.is_empty() {
                return Err(bad(
                    "spec.egress",
                    "a preDNAT policy has only ingress rules",
                ));
            }
            if s.types
                .as_ref()
                .is_some_and(|t| t.contains(&PolicyType::Egress))
            {
                return Err(bad("spec.types", "a preDNAT policy is Ingress only"));
            }
        }
        if let Some(t) = &s.types {
            let mut seen = Vec::new();
            for (i, ty) in t.iter().enumerate() {
                if seen.contains(ty) {
                    return Err(bad(format!("spec.types[{i}]"), "listed twice"));
                }
                seen.push(*ty);
            }
            if !t.contains(&PolicyType::Ingress) && !s.ingress.is_empty() {
                return Err(bad("spec.ingress", "rules given but types has no Ingress"));
            }
            if !t.contains(&PolicyType::Egress) && !s.egress.is_empty() {
                return Err(bad("spec.egress", "rules given but types has no Egress"));
            }
        }
        for (dir, rules) in [("ingress", &s.ingress), ("egress", &s.egress)] {
            for (i, r) in rules.iter().enumerate() {
                validate_rule(r)
                    .map_err(|e| bad(format!("spec.{dir}[{i}].{}", e.field), e.reason))?;
                if dir == "ingress" && !r.destination.domains.is_empty() {
                    return Err(bad(
                        format!("spec.ingress[{i}].destination.domains"),
                        "domains are allowed in egress rules only",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `projectcalico.org/v3` NetworkPolicy: namespaced; applies to the pods of its namespace its
/// selector matches, and its rules' selectors pick within that namespace unless they carry a
/// `namespaceSelector`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CalicoNetworkPolicy {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub spec: GlobalNetworkPolicySpec,
}

impl CalicoNetworkPolicy {
    /// The same checks as a global policy's, and what a namespaced policy may not say.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name(&self.namespace).map_err(|e| bad("metadata.namespace", e.reason))?;
        self.as_global().validate()?;
        let s = &self.spec;
        for (field, set) in [
            ("spec.preDNAT", s.pre_dnat),
            ("spec.applyOnForward", s.apply_on_forward),
            ("spec.doNotTrack", s.do_not_track),
        ] {
            if set {
                return Err(bad(field, "only a GlobalNetworkPolicy may set it"));
            }
        }
        if s.namespace_selector.is_some() {
            return Err(bad(
                "spec.namespaceSelector",
                "only a GlobalNetworkPolicy has it (a NetworkPolicy applies in its namespace)",
            ));
        }
        Ok(())
    }

    /// The policy as a global one (same spec), for the checks and rule evaluation they share.
    pub fn as_global(&self) -> GlobalNetworkPolicy {
        GlobalNetworkPolicy {
            name: self.name.clone(),
            spec: self.spec.clone(),
        }
    }

    /// The tier it lives in.
    pub fn tier(&self) -> &str {
        self.spec.tier.as_deref().unwrap_or(DEFAULT_TIER)
    }
}

fn validate_entity(e: &EntityRule, proto: Option<Proto>) -> Result<(), FieldError> {
    for (field, sel) in [
        ("selector", &e.selector),
        ("notSelector", &e.not_selector),
        ("namespaceSelector", &e.namespace_selector),
    ] {
        if let Some(s) = sel {
            Selector::parse(s).map_err(|err| bad(field, err.to_string()))?;
        }
    }
    for (field, ports) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
        if ports.is_empty() {
            continue;
        }
        if !proto.is_some_and(Proto::has_ports) {
            return Err(bad(field, "ports need protocol TCP, UDP, SCTP or UDPLite"));
        }
        for (i, p) in ports.iter().enumerate() {
            if let Port::Named(n) = p {
                return Err(bad(
                    format!("{field}[{i}]"),
                    format!("named port {n:?}: named ports in Calico rules are not supported by Malla yet"),
                ));
            }
        }
    }
    Ok(())
}

fn validate_rule(r: &Rule) -> Result<(), FieldError> {
    if let Some(v) = r.ip_version {
        if v != 4 && v != 6 {
            return Err(bad("ipVersion", format!("{v} is not 4 or 6")));
        }
    }
    for (field, icmp) in [("icmp", &r.icmp), ("notICMP", &r.not_icmp)] {
        if icmp.is_some() && !matches!(r.protocol, Some(Proto::ICMP) | Some(Proto::ICMPV6)) {
            return Err(bad(field, "needs protocol ICMP or ICMPv6"));
        }
    }
    if r.not_icmp.is_some_and(|i| i.code.is_some()) {
        return Err(bad(
            "notICMP.code",
            "not supported by Malla yet (notICMP with a type alone is)",
        ));
    }
    let fam = |nets: &[IpNet]| -> (bool, bool) {
        (
            nets.iter().any(|n| n.addr().is_ipv4()),
            nets.iter().any(|n| n.addr().is_ipv6()),
        )
    };
    if let Some(v) = r.ip_version {
        for (field, nets) in [
            ("source.nets", &r.source.nets),
            ("destination.nets", &r.destination.nets),
        ] {
            let (v4, v6) = fam(nets);
            if (v == 4 && v6) || (v == 6 && v4) {
                return Err(bad(
                    field,
                    format!("holds a network of the other family than ipVersion {v}"),
                ));
            }
        }
    }
    if !r.source.domains.is_empty() {
        return Err(bad("source.domains", "only a destination may name domains"));
    }
    let d = &r.destination;
    if !d.domains.is_empty() {
        if !d.nets.is_empty() || !d.not_nets.is_empty() || d.selects_endpoints() {
            return Err(bad(
                "destination.domains",
                "cannot be combined with destination nets, notNets or selectors",
            ));
        }
        crate::domain::check_list("destination.domains", &d.domains, 1000)
            .map_err(|(f, e)| bad(f, e))?;
    }
    validate_entity(&r.source, r.protocol)
        .map_err(|e| bad(format!("source.{}", e.field), e.reason))?;
    validate_entity(&r.destination, r.protocol)
        .map_err(|e| bad(format!("destination.{}", e.field), e.reason))?;
    Ok(())
}

/// `projectcalico.org/v3` HostEndpoint: one of a node's interfaces (`*`: all of them) under
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostEndpoint {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub spec: HostEndpointSpec,
}

/// The `spec` of a [`HostEndpoint`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostEndpointSpec {
    pub node: String,
    /// The interface, or `*` for every interface of the node (not its pods' veths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    /// The addresses of the interface (what peers' selectors match).
    #[serde(default, rename = "expectedIPs", skip_serializing_if = "Vec::is_empty")]
    pub expected_ips: Vec<IpAddr>,
    /// Profiles decide what no policy does: [`DEFAULT_ALLOW_PROFILE`] allows it; without one
    /// it is denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// Named ports (Calico's `ports`): accepted, not yet used by rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<serde_json::Value>,
}

impl HostEndpoint {
    /// Whether it covers every interface of its node.
    pub fn all_interfaces(&self) -> bool {
        self.spec.interface_name.as_deref() == Some("*")
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        check_name(&self.name)?;
        if self.spec.node.is_empty() {
            return Err(bad("spec.node", "is required"));
        }
        match self.spec.interface_name.as_deref() {
            None => {
                return Err(bad(
                    "spec.interfaceName",
                    "is required by Malla (an interface name, or \"*\" for all of the node's interfaces)",
                ))
            }
            Some("*") => {}
            Some(i) => {
                let ok = !i.is_empty()
                    && i.len() <= 15
                    && i
                        .bytes()
                        .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
                if !ok {
                    return Err(bad(
                        "spec.interfaceName",
                        format!("{i:?} is not an interface name (at most 15 of [A-Za-z0-9_.-]) or \"*\""),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `projectcalico.org/v3` GlobalNetworkSet: labelled networks that rule selectors can match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalNetworkSet {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub spec: GlobalNetworkSetSpec,
}

/// The `spec` of a [`GlobalNetworkSet`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GlobalNetworkSetSpec {
    #[serde(default)]
    pub nets: Vec<IpNet>,
    /// DNS names and wildcards that belong to the set, honoured in egress Allow rules whose
    /// destination selector picks the set ([`crate::domain`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_egress_domains: Vec<String>,
}

impl GlobalNetworkSet {
    pub fn validate(&self) -> Result<(), FieldError> {
        check_name(&self.name)?;
        if !self.spec.allowed_egress_domains.is_empty() {
            crate::domain::check_list(
                "spec.allowedEgressDomains",
                &self.spec.allowed_egress_domains,
                1000,
            )
            .map_err(|(f, e)| bad(f, e))?;
        }
        Ok(())
    }
}

/// Any of the Calico objects, as a manifest holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CalicoObject {
    Tier(Tier),
    GlobalNetworkPolicy(GlobalNetworkPolicy),
    NetworkPolicy(CalicoNetworkPolicy),
    /// Upstream `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy (evaluated in the
    /// same tiers).
    ClusterNetworkPolicy(crate::cnp::ClusterNetworkPolicy),
    HostEndpoint(HostEndpoint),
    GlobalNetworkSet(GlobalNetworkSet),
    /// A staged policy of any kind (`crate::staged`).
    Staged(crate::staged::StagedPolicy),
}

impl CalicoObject {
    /// The kinds, as manifests name them.
    pub const KINDS: &'static [&'static str] = &[
        "Tier",
        "GlobalNetworkPolicy",
        "HostEndpoint",
        "GlobalNetworkSet",
        "NetworkPolicy",
    ];

    /// `kind/name` in lower case, as `kubectl` prints it.
    pub fn id(&self) -> String {
        let (k, n) = match self {
            CalicoObject::Tier(t) => ("tier", &t.name),
            CalicoObject::GlobalNetworkPolicy(p) => ("globalnetworkpolicy", &p.name),
            CalicoObject::NetworkPolicy(p) => {
                return format!("networkpolicy.projectcalico.org/{}/{}", p.namespace, p.name)
            }
            CalicoObject::ClusterNetworkPolicy(p) => ("clusternetworkpolicy", &p.name),
            CalicoObject::HostEndpoint(h) => ("hostendpoint", &h.name),
            CalicoObject::GlobalNetworkSet(s) => ("globalnetworkset", &s.name),
            CalicoObject::Staged(p) => return p.id(),
        };
        format!("{k}/{n}")
    }

    /// The datastore key.
    pub fn key(&self) -> String {
        match self {
            CalicoObject::Tier(t) => crate::keys::tier(&t.name),
            CalicoObject::GlobalNetworkPolicy(p) => crate::keys::global_network_policy(&p.name),
            CalicoObject::NetworkPolicy(p) => {
                crate::keys::calico_network_policy(&p.namespace, &p.name)
            }
            CalicoObject::ClusterNetworkPolicy(p) => crate::keys::cluster_network_policy(&p.name),
            CalicoObject::HostEndpoint(h) => crate::keys::host_endpoint(&h.name),
            CalicoObject::GlobalNetworkSet(s) => crate::keys::global_network_set(&s.name),
            CalicoObject::Staged(p) => p.key(),
        }
    }

    /// The record's JSON text as stored.
    pub fn to_json(&self) -> String {
        match self {
            CalicoObject::Tier(x) => serde_json::to_string(x),
            CalicoObject::GlobalNetworkPolicy(x) => serde_json::to_string(x),
            CalicoObject::NetworkPolicy(x) => serde_json::to_string(x),
            CalicoObject::ClusterNetworkPolicy(x) => serde_json::to_string(x),
            CalicoObject::HostEndpoint(x) => serde_json::to_string(x),
            CalicoObject::GlobalNetworkSet(x) => serde_json::to_string(x),
            CalicoObject::Staged(x) => serde_json::to_string(x),
        }
        .expect("Calico records serialise")
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        match self {
            CalicoObject::Tier(t) => {
                check_name(&t.name)?;
                if t.order.is_some_and(|o| !o.0.is_finite()) {
                    return Err(bad("spec.order", "must be a finite number"));
                }
                Ok(())
            }
            CalicoObject::GlobalNetworkPolicy(p) => p.validate(),
            CalicoObject::NetworkPolicy(p) => p.validate(),
            CalicoObject::ClusterNetworkPolicy(p) => p
                .validate()
                .map_err(|(field, reason)| FieldError { field, reason }),
            CalicoObject::HostEndpoint(h) => h.validate(),
            CalicoObject::GlobalNetworkSet(s) => s.validate(),
            CalicoObject::Staged(p) => p.validate(),
        }
    }

    /// Decodes a `projectcalico.org/v3` object (`kind`, `metadata`, `spec`) strictly: an
    /// unknown field anywhere is an error naming its path.
    pub fn from_manifest(kind: &str, v: &serde_json::Value) -> Result<CalicoObject, FieldError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Meta {
            name: String,
            #[serde(default)]
            namespace: Option<String>,
            #[serde(default)]
            labels: BTreeMap<String, String>,
            #[serde(default)]
            annotations: BTreeMap<String, String>,
            #[serde(default, rename = "resourceVersion")]
            _resource_version: Option<String>,
            #[serde(default, rename = "uid")]
            _uid: Option<String>,
            #[serde(default, rename = "creationTimestamp")]
            _created: Option<serde_json::Value>,
            #[serde(default, rename = "generation")]
            _generation: Option<serde_json::Value>,
        }
        fn part<T: serde::de::DeserializeOwned>(
            v: &serde_json::Value,
            at: &str,
        ) -> Result<T, FieldError> {
            let value = v.get(at).cloned().unwrap_or(serde_json::Value::Null);
            let value = if value.is_null() && at == "spec" {
                serde_json::Value::Object(Default::default())
            } else {
                value
            };
            serde_path_to_error::deserialize(value).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." || path.is_empty() {
                    at.to_string()
                } else {
                    format!("{at}.{path}")
                };
                bad(field, e.into_inner().to_string())
            })
        }
        if let Some(obj) = v.as_object() {
            for k in obj.keys() {
                if !["apiVersion", "kind", "metadata", "spec"].contains(&k.as_str()) {
                    return Err(bad(k.clone(), "unknown field"));
                }
            }
        }
        let meta: Meta = part(v, "metadata")?;
        let _ = &meta.annotations;
        if meta.namespace.is_some() && kind != "NetworkPolicy" {
            return Err(bad(
                "metadata.namespace",
                format!("a {kind} is cluster-wide: it has no namespace"),
            ));
        }
        let obj = match kind {
            "Tier" => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Spec {
                    #[serde(default)]
                    order: Option<Order>,
                    #[serde(default, rename = "defaultAction")]
                    default_action: Option<Action>,
                }
                let spec: Spec = part(v, "spec")?;
                if spec
                    .default_action
                    .is_some_and(|a| a != Action::Deny && a != Action::Pass)
                {
                    return Err(bad("spec.defaultAction", "must be Deny or Pass"));
                }
                CalicoObject::Tier(Tier {
                    name: meta.name,
                    order: spec.order,
                    default_action: spec.default_action,
                })
            }
            "GlobalNetworkPolicy" => CalicoObject::GlobalNetworkPolicy(GlobalNetworkPolicy {
                name: meta.name,
                spec: part(v, "spec")?,
            }),
            "ClusterNetworkPolicy" => {
                CalicoObject::ClusterNetworkPolicy(crate::cnp::ClusterNetworkPolicy {
                    name: meta.name,
                    spec: part(v, "spec")?,
                })
            }
            "NetworkPolicy" => CalicoObject::NetworkPolicy(CalicoNetworkPolicy {
                namespace: meta.namespace.unwrap_or_else(|| "default".into()),
                name: meta.name,
                spec: part(v, "spec")?,
            }),
            "HostEndpoint" => CalicoObject::HostEndpoint(HostEndpoint {
                name: meta.name,
                labels: meta.labels,
                spec: part(v, "spec")?,
            }),
            "GlobalNetworkSet" => CalicoObject::GlobalNetworkSet(GlobalNetworkSet {
                name: meta.name,
                labels: meta.labels,
                spec: part(v, "spec")?,
            }),
            other => {
                return Err(bad(
                    "kind",
                    format!(
                        "{other:?} of projectcalico.org/v3 is not supported (supported: {})",
                        Self::KINDS.join(", ")
                    ),
                ))
            }
        };
        obj.validate()?;
        Ok(obj)
    }
}

/// A failsafe port: traffic to this protocol and port is never blocked by host endpoint
/// policy (Calico's `FailsafeInboundHostPorts` / `FailsafeOutboundHostPorts`), optionally only
/// to or from `net`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtoPort {
    pub protocol: Proto,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<IpNet>,
}

fn pp(protocol: Proto, port: u16) -> ProtoPort {
    ProtoPort {
        protocol,
        port,
        net: None,
    }
}

/// The default inbound failsafe ports: SSH, DNS, DHCP (client), BGP, etcd, the API server, the
/// kubelet, kube-proxy's health port, kube-controller-manager and kube-scheduler.
pub fn default_failsafe_inbound() -> Vec<ProtoPort> {
    vec![
        pp(Proto::TCP, 22),
        pp(Proto::UDP, 53),
        pp(Proto::TCP, 53),
        pp(Proto::UDP, 68),
        pp(Proto::TCP, 179),
        pp(Proto::TCP, 2379),
        pp(Proto::TCP, 2380),
        pp(Proto::TCP, 6443),
        pp(Proto::TCP, 10250),
        pp(Proto::TCP, 10256),
        pp(Proto::TCP, 10257),
        pp(Proto::TCP, 10259),
    ]
}

/// The default outbound failsafe ports: DNS, DHCP (server), BGP, etcd, the API server, and the
/// kubelet (the API server's calls to kubelets leave a control-plane node this way).
pub fn default_failsafe_outbound() -> Vec<ProtoPort> {
    vec![
        pp(Proto::UDP, 53),
        pp(Proto::TCP, 53),
        pp(Proto::UDP, 67),
        pp(Proto::TCP, 179),
        pp(Proto::TCP, 2379),
        pp(Proto::TCP, 2380),
        pp(Proto::TCP, 6443),
        pp(Proto::TCP, 10250),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_global_policy_decodes_and_defaults_its_types() {
        let v = json!({
            "apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
            "metadata": {"name": "allow-ssh"},
            "spec": {"order": 10, "selector": "has(host-endpoint)",
                     "ingress": [{"action": "Allow", "protocol": "TCP",
                                  "source": {"nets": ["198.19.1.0/24"]},
                                  "destination": {"ports": [22, "1000:2000"]}}]}
        });
        let CalicoObject::GlobalNetworkPolicy(p) =
            CalicoObject::from_manifest("GlobalNetworkPolicy", &v).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.tier(), "default");
        assert_eq!(p.effective_types(), (true, false));
        assert_eq!(
            p.spec.ingress[0].destination.ports,
            vec![Port::Range(22, 22), Port::Range(1000, 2000)]
        );
        // Round trip through the stored form.
        let back: GlobalNetworkPolicy =
            serde_json::from_str(&CalicoObject::GlobalNetworkPolicy(p.clone()).to_json()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"selector": "has("}), "spec.selector"),
            (
                json!({"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}),
                "spec.ingress[0].destination.ports",
            ),
            (
                json!({"ingress": [{"action": "Maybe"}]}),
                "spec.ingress[0].action",
            ),
            (
                json!({"egress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": ["http"]}}]}),
                "spec.egress[0].destination.ports[0]",
            ),
            (
                json!({"preDNAT": true, "ingress": []}),
                "spec.applyOnForward",
            ),
            (
                json!({"preDNAT": true, "applyOnForward": true, "egress": [{"action": "Deny"}]}),
                "spec.egress",
            ),
            (json!({"doNotTrack": true}), "spec.doNotTrack"),
            (json!({"selectr": "all()"}), "spec"),
            (
                json!({"ingress": [{"action": "Allow", "protocol": "bogus"}]}),
                "spec.ingress[0].protocol",
            ),
            (
                json!({"ingress": [{"action": "Allow", "ipVersion": 4, "source": {"nets": ["fd00::/64"]}}]}),
                "spec.ingress[0].source.nets",
            ),
        ];
        for (spec, field) in cases {
            let v = json!({"metadata": {"name": "p"}, "spec": spec});
            let e = CalicoObject::from_manifest("GlobalNetworkPolicy", &v).unwrap_err();
            assert!(e.field.starts_with(field), "{spec}: {e}");
        }
        let e = CalicoObject::from_manifest(
            "HostEndpoint",
            &json!({"metadata": {"name": "h"}, "spec": {"node": "n"}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.interfaceName");
        let e = CalicoObject::from_manifest(
            "HostEndpoint",
            &json!({"metadata": {"name": "Bad_Name"}, "spec": {"node": "n", "interfaceName": "*"}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "metadata.name");
    }

    #[test]
    fn domains_decode_and_errors_name_the_field() {
        let v = json!({"metadata": {"name": "p"}, "spec": {"egress": [
            {"action": "Allow", "destination": {"domains": ["api.example.com", "*.allowed.test"]}}]}});
        let CalicoObject::GlobalNetworkPolicy(p) =
            CalicoObject::from_manifest("GlobalNetworkPolicy", &v).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.spec.egress[0].destination.domains.len(), 2);
        // Any action takes domains: Deny drops what the pod learned for a denied name.
        for action in ["Deny", "Pass", "Log"] {
            let v = json!({"metadata": {"name": "p"}, "spec": {"egress": [
                {"action": action, "destination": {"domains": ["*.denied.test"]}}]}});
            assert!(
                CalicoObject::from_manifest("GlobalNetworkPolicy", &v).is_ok(),
                "{action}"
            );
        }
        let cases = [
            (
                json!({"egress": [{"action": "Allow", "destination": {"domains": ["a.*.test"]}}]}),
                "spec.egress[0].destination.domains[0]",
            ),
            (
                json!({"egress": [{"action": "Allow", "destination": {"domains": ["a.test", "b.test."]}}]}),
                "spec.egress[0].destination.domains[1]",
            ),
            (
                json!({"egress": [{"action": "Allow", "destination": {"domains": ["a.test"], "nets": ["198.18.0.0/24"]}}]}),
                "spec.egress[0].destination.domains",
            ),
            (
                json!({"egress": [{"action": "Allow", "source": {"domains": ["a.test"]}}]}),
                "spec.egress[0].source.domains",
            ),
            (
                json!({"ingress": [{"action": "Allow", "destination": {"domains": ["a.test"]}}]}),
                "spec.ingress[0].destination.domains",
            ),
        ];
        for (spec, field) in cases {
            let v = json!({"metadata": {"name": "p"}, "spec": spec});
            let e = CalicoObject::from_manifest("GlobalNetworkPolicy", &v).unwrap_err();
            assert_eq!(e.field, field, "{spec}: {e}");
        }
        let set = |d: serde_json::Value| {
            CalicoObject::from_manifest(
                "GlobalNetworkSet",
                &json!({"metadata": {"name": "s", "labels": {"a": "b"}},
                        "spec": {"nets": ["198.18.0.0/24"], "allowedEgressDomains": d}}),
            )
        };
        assert!(set(json!(["*.allowed.test"])).is_ok());
        assert_eq!(
            set(json!(["ok.test", "*bad.test"])).unwrap_err().field,
            "spec.allowedEgressDomains[1]"
        );
    }

    #[test]
    fn policies_sort_by_order_then_name_absent_last() {
        let mut v = [
            order_key(None, "a"),
            order_key(Some(Order(10.0)), "z"),
            order_key(Some(Order(2.5)), "y"),
            order_key(Some(Order(10.0)), "b"),
        ];
        v.sort();
        let names: Vec<&str> = v.iter().map(|k| k.2.as_str()).collect();
        assert_eq!(names, ["y", "b", "z", "a"]);
    }
}
