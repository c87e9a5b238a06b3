//! `networking.k8s.io/v1` NetworkPolicy: the types (serde, camelCase, so a manifest's `spec`
//! deserializes directly), label selectors with their matching, the API server's defaulting of
//! `policyTypes` and its validation.
//!
//! Semantics live in `malla-calc::policy`; this module is plain data plus the checks the API
//! server makes before an object is stored.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::service::{Protocol, TargetPort};

/// The operator of a selector requirement. Unknown operators are kept (so validation can name
/// them) and match nothing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Other(String),
}

impl From<String> for Operator {
    fn from(s: String) -> Self {
        match s.as_str() {
            "In" => Self::In,
            "NotIn" => Self::NotIn,
            "Exists" => Self::Exists,
            "DoesNotExist" => Self::DoesNotExist,
            _ => Self::Other(s),
        }
    }
}

impl From<Operator> for String {
    fn from(o: Operator) -> Self {
        o.to_string()
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
            Self::Other(s) => s,
        })
    }
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl LabelSelectorRequirement {
    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
            Operator::Other(_) => false,
        }
    }
}

/// `metav1.LabelSelector`. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every `matchLabels` pair and every expression.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| e.matches(labels))
    }

    /// Whether the selector is `{}` (selects everything).
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// The same selector in a canonical form (expressions and their values sorted and
    /// deduplicated), so that equal meanings compare and hash equal.
    pub fn canonical(&self) -> LabelSelector {
        let mut exprs: Vec<LabelSelectorRequirement> = self
            .match_expressions
            .iter()
            .map(|e| {
                let mut values = e.values.clone();
                values.sort();
                values.dedup();
                LabelSelectorRequirement {
                    key: e.key.clone(),
                    operator: e.operator.clone(),
                    values,
                }
            })
            .collect();
        exprs.sort();
        exprs.dedup();
        LabelSelector {
            match_labels: self.match_labels.clone(),
            match_expressions: exprs,
        }
    }
}

/// A `policyTypes` entry. Unknown values are kept so validation can name them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum PolicyType {
    Ingress,
    Egress,
    Other(String),
}

impl From<String> for PolicyType {
    fn from(s: String) -> Self {
        match s.as_str() {
            "Ingress" => Self::Ingress,
            "Egress" => Self::Egress,
            _ => Self::Other(s),
        }
    }
}

impl From<PolicyType> for String {
    fn from(t: PolicyType) -> Self {
        match t {
            PolicyType::Ingress => "Ingress".into(),
            PolicyType::Egress => "Egress".into(),
            PolicyType::Other(s) => s,
        }
    }
}

/// `ipBlock`: a CIDR minus some smaller CIDRs inside it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

impl IpBlock {
    /// The parsed CIDR (host bits cleared) and excepts, or `None` if any of them does not parse.
    pub fn parsed(&self) -> Option<(IpNet, Vec<IpNet>)> {
        let cidr: IpNet = self.cidr.parse().ok()?;
        let except = self
            .except
            .iter()
            .map(|e| e.parse::<IpNet>().ok().map(|n| n.trunc()))
            .collect::<Option<Vec<_>>>()?;
        Some((cidr.trunc(), except))
    }

    /// Whether `ip` is inside the CIDR and outside every except (false if unparsable).
    pub fn contains(&self, ip: &std::net::IpAddr) -> bool {
        self.parsed()
            .is_some_and(|(c, ex)| c.contains(ip) && !ex.iter().any(|e| e.contains(ip)))
    }
}

/// A `from` / `to` entry. `podSelector` and `namespaceSelector` together select pods matching
/// both; `ipBlock` stands alone.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A `ports` entry: a protocol (default TCP), optionally a port (number or container port name)
/// and, for a numeric port, an inclusive `endPort`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<TargetPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
}

/// An `ingress` rule: traffic from any of `from` (empty: from anywhere) to any of `ports`
/// (empty: every port).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<NetworkPolicyPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// An `egress` rule: traffic to any of `to` (empty: anywhere) on any of `ports` (empty: every
/// port).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<NetworkPolicyPeer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// `spec` of a NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<PolicyType>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<IngressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<EgressRule>,
}

/// A NetworkPolicy: it applies to the pods of its namespace that `spec.podSelector` selects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub spec: NetworkPolicySpec,
}

/// Which directions a policy isolates, after defaulting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PolicyTypes {
    pub ingress: bool,
    pub egress: bool,
}

impl NetworkPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `policyTypes` after the API server's defaulting: when omitted (or empty), `Ingress`
    /// always, and `Egress` only if there are egress rules. Unknown values count for nothing.
    pub fn effective_policy_types(&self) -> PolicyTypes {
        match &self.spec.policy_types {
            Some(t) if !t.is_empty() => PolicyTypes {
                ingress: t.contains(&PolicyType::Ingress),
                egress: t.contains(&PolicyType::Egress),
            },
            _ => PolicyTypes {
                ingress: true,
                egress: !self.spec.egress.is_empty(),
            },
        }
    }

    /// The API server's validation: `Err((field path, reason))` for the first problem, with
    /// paths like `spec.ingress[0].from[1].ipBlock.cidr`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.name.is_empty() {
            return Err(("metadata.name".into(), "must not be empty".into()));
        }
        if self.namespace.is_empty() {
            return Err(("metadata.namespace".into(), "must not be empty".into()));
        }
        let spec = &self.spec;
        validate_selector(&spec.pod_selector, "spec.podSelector")?;
        for (i, r) in spec.ingress.iter().enumerate() {
            let path = format!("spec.ingress[{i}]");
            validate_ports(&r.ports, &path)?;
            validate_peers(&r.from, &format!("{path}.from"))?;
        }
        for (i, r) in spec.egress.iter().enumerate() {
            let path = format!("spec.egress[{i}]");
            validate_ports(&r.ports, &path)?;
            validate_peers(&r.to, &format!("{path}.to"))?;
        }
        if let Some(types) = &spec.policy_types {
            if types.len() > 2 {
                return Err((
                    "spec.policyTypes".into(),
                    "may not have more than 2 entries".into(),
                ));
            }
            for (i, t) in types.iter().enumerate() {
                if let PolicyType::Other(s) = t {
                    return Err((
                        format!("spec.policyTypes[{i}]"),
                        format!(
                            "unsupported value {s:?}: supported values are \"Ingress\", \"Egress\""
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

type Invalid = (String, String);

fn err<T>(path: impl Into<String>, reason: impl Into<String>) -> Result<T, Invalid> {
    Err((path.into(), reason.into()))
}

fn validate_ports(ports: &[NetworkPolicyPort], rule_path: &str) -> Result<(), Invalid> {
    for (j, p) in ports.iter().enumerate() {
        let path = format!("{rule_path}.ports[{j}]");
        match &p.port {
            None => {
                if p.end_port.is_some() {
                    return err(
                        format!("{path}.port"),
                        "must be specified when endPort is specified",
                    );
                }
            }
            Some(TargetPort::Number(n)) => {
                if *n == 0 {
                    return err(
                        format!("{path}.port"),
                        "must be between 1 and 65535, inclusive",
                    );
                }
                if let Some(e) = p.end_port {
                    if e < *n {
                        return err(
                            format!("{path}.endPort"),
                            "must be greater than or equal to `port`",
                        );
                    }
                }
            }
            Some(TargetPort::Name(name)) => {
                if p.end_port.is_some() {
                    return err(
                        format!("{path}.endPort"),
                        "may not be specified when `port` is a named port",
                    );
                }
                if let Some(reason) = iana_svc_name_problem(name) {
                    return err(format!("{path}.port"), reason);
                }
            }
        }
    }
    Ok(())
}

fn validate_peers(peers: &[NetworkPolicyPeer], peers_path: &str) -> Result<(), Invalid> {
    for (k, peer) in peers.iter().enumerate() {
        let path = format!("{peers_path}[{k}]");
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match &peer.ip_block {
            Some(_) if selectors => {
                return err(
                    path,
                    "may not specify more than 1 peer type (ipBlock and a selector)",
                )
            }
            None if !selectors => return err(path, "must specify a peer"),
            Some(b) => validate_ip_block(b, &format!("{path}.ipBlock"))?,
            None => {}
        }
        if let Some(s) = &peer.pod_selector {
            validate_selector(s, &format!("{path}.podSelector"))?;
        }
        if let Some(s) = &peer.namespace_selector {
            validate_selector(s, &format!("{path}.namespaceSelector"))?;
        }
    }
    Ok(())
}

fn validate_ip_block(b: &IpBlock, path: &str) -> Result<(), Invalid> {
    if b.cidr.is_empty() {
        return err(format!("{path}.cidr"), "must not be empty");
    }
    let Ok(cidr) = b.cidr.parse::<IpNet>() else {
        return err(
            format!("{path}.cidr"),
            format!("{:?} is not a valid CIDR", b.cidr),
        );
    };
    for (i, e) in b.except.iter().enumerate() {
        let epath = format!("{path}.except[{i}]");
        let Ok(ex) = e.parse::<IpNet>() else {
            return err(epath, format!("{e:?} is not a valid CIDR"));
        };
        if !(cidr.trunc().contains(&ex.addr()) && ex.prefix_len() > cidr.prefix_len()) {
            return err(
                epath,
                format!("must be a strict subset of `cidr` {}", b.cidr),
            );
        }
    }
    Ok(())
}

pub(crate) fn validate_selector(s: &LabelSelector, path: &str) -> Result<(), Invalid> {
    for (k, v) in &s.match_labels {
        if let Some(r) = label_key_problem(k) {
            return err(format!("{path}.matchLabels"), format!("key {k:?}: {r}"));
        }
        if let Some(r) = label_value_problem(v) {
            return err(format!("{path}.matchLabels"), format!("value {v:?}: {r}"));
        }
    }
    for (i, e) in s.match_expressions.iter().enumerate() {
        let epath = format!("{path}.matchExpressions[{i}]");
        if let Some(r) = label_key_problem(&e.key) {
            return err(format!("{epath}.key"), r);
        }
        match &e.operator {
            Operator::In | Operator::NotIn => {
                if e.values.is_empty() {
                    return err(
                        format!("{epath}.values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    );
                }
            }
            Operator::Exists | Operator::DoesNotExist => {
                if !e.values.is_empty() {
                    return err(
                        format!("{epath}.values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    );
                }
            }
            Operator::Other(o) => {
                return err(
                    format!("{epath}.operator"),
                    format!("not a valid selector operator: {o:?}"),
                )
            }
        }
        for (j, v) in e.values.iter().enumerate() {
            if let Some(r) = label_value_problem(v) {
                return err(format!("{epath}.values[{j}]"), r);
            }
        }
    }
    Ok(())
}

fn name_part_ok(s: &str, max: usize) -> Option<String> {
    if s.is_empty() || s.len() > max {
        return Some(format!("must be 1 to {max} characters"));
    }
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    if !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return Some("must begin and end with an alphanumeric character".into());
    }
    if !b
        .iter()
        .all(|c| alnum(c) || *c == b'-' || *c == b'_' || *c == b'.')
    {
        return Some("may contain only alphanumerics, '-', '_' and '.'".into());
    }
    None
}

/// Why `k` is not a qualified name (`[prefix/]name`), or `None`.
fn label_key_problem(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                let b = l.as_bytes();
                !b.is_empty()
                    && b.len() <= 63
                    && b.iter()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                    && b[0] != b'-'
                    && b[b.len() - 1] != b'-'
            });
        if !ok {
            return Some("prefix must be a DNS subdomain".into());
        }
    }
    name_part_ok(name, 63)
}

/// Why `v` is not a label value, or `None`.
fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    name_part_ok(v, 63)
}

/// Why `name` is not an IANA_SVC_NAME (RFC 6335), or `None`.
pub fn iana_svc_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > 15 {
        return Some("must be 1 to 15 characters".into());
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        return Some("may contain only lowercase alphanumerics and '-'".into());
    }
    if !name.bytes().any(|c| c.is_ascii_lowercase()) {
        return Some("must contain at least one letter".into());
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Some("must not begin or end with '-' or contain '--'".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(spec: serde_json::Value) -> NetworkPolicy {
        NetworkPolicy {
            namespace: "shop".into(),
            name: "p".into(),
            spec: serde_json::from_value(spec).expect("spec"),
        }
    }

    #[test]
    fn policy_selector_matching() {
        let s: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("env", "prod")
        ])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[
            ("app", "web"),
            ("tier", "a"),
            ("team", "x"),
            ("legacy", "")
        ])));
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn policy_types_defaulting() {
        let p = policy(serde_json::json!({"podSelector": {}}));
        assert_eq!(
            p.effective_policy_types(),
            PolicyTypes {
                ingress: true,
                egress: false
            }
        );
        let p = policy(serde_json::json!({"podSelector": {}, "egress": [{}]}));
        assert_eq!(
            p.effective_policy_types(),
            PolicyTypes {
                ingress: true,
                egress: true
            }
        );
        let p = policy(serde_json::json!({"podSelector": {}, "policyTypes": ["Egress"]}));
        assert_eq!(
            p.effective_policy_types(),
            PolicyTypes {
                ingress: false,
                egress: true
            }
        );
    }

    #[test]
    fn policy_manifest_spec_deserializes() {
        let p = policy(serde_json::json!({
            "podSelector": {"matchLabels": {"role": "db"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{
                "from": [
                    {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                    {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                    {"podSelector": {"matchLabels": {"role": "frontend"}}}
                ],
                "ports": [{"protocol": "TCP", "port": 6379}]
            }],
            "egress": [{
                "to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                "ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}, {"port": "dns", "protocol": "UDP"}]
            }]
        }));
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.spec.egress[0].ports[0].end_port, Some(32768));
        assert_eq!(
            p.spec.egress[0].ports[1].port,
            Some(TargetPort::Name("dns".into()))
        );
        assert_eq!(p.spec.ingress[0].ports[0].protocol, Protocol::Tcp);
    }

    fn invalid(spec: serde_json::Value) -> String {
        policy(spec).validate().expect_err("should be invalid").0
    }

    #[test]
    fn policy_validation_paths() {
        let path = invalid(serde_json::json!({"ingress": [{"from": [
            {"podSelector": {}},
            {"ipBlock": {"cidr": "10.0.0.0/33"}}
        ]}]}));
        assert_eq!(path, "spec.ingress[0].from[1].ipBlock.cidr");
        assert_eq!(
            invalid(serde_json::json!({"ingress": [{"from": [
                {"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}
            ]}]})),
            "spec.ingress[0].from[0]"
        );
        assert_eq!(
            invalid(serde_json::json!({"egress": [{"to": [{}]}]})),
            "spec.egress[0].to[0]"
        );
        assert_eq!(
            invalid(serde_json::json!({"egress": [{"to": [
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}
            ]}]})),
            "spec.egress[0].to[0].ipBlock.except[0]"
        );
        assert_eq!(
            invalid(serde_json::json!({"egress": [{"to": [
                {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}
            ]}]})),
            "spec.egress[0].to[0].ipBlock.except[0]"
        );
        assert_eq!(
            invalid(serde_json::json!({"ingress": [{"ports": [{"port": 80, "endPort": 79}]}]})),
            "spec.ingress[0].ports[0].endPort"
        );
        assert_eq!(
            invalid(serde_json::json!({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]})),
            "spec.ingress[0].ports[0].endPort"
        );
        assert_eq!(
            invalid(serde_json::json!({"ingress": [{"ports": [{"endPort": 90}]}]})),
            "spec.ingress[0].ports[0].port"
        );
        assert_eq!(
            invalid(serde_json::json!({"ingress": [{"ports": [{"port": 0}]}]})),
            "spec.ingress[0].ports[0].port"
        );
        for bad in ["HTTP", "80", "a-very-long-port-name", "-web", "we--b"] {
            assert_eq!(
                invalid(serde_json::json!({"ingress": [{"ports": [{"port": bad}]}]})),
                "spec.ingress[0].ports[0].port",
                "{bad}"
            );
        }
        assert_eq!(
            invalid(serde_json::json!({"podSelector": {"matchExpressions": [
                {"key": "a", "operator": "In", "values": []}
            ]}})),
            "spec.podSelector.matchExpressions[0].values"
        );
        assert_eq!(
            invalid(serde_json::json!({"podSelector": {"matchExpressions": [
                {"key": "a", "operator": "Exists", "values": ["x"]}
            ]}})),
            "spec.podSelector.matchExpressions[0].values"
        );
        assert_eq!(
            invalid(serde_json::json!({"podSelector": {"matchExpressions": [
                {"key": "a", "operator": "Gt", "values": ["1"]}
            ]}})),
            "spec.podSelector.matchExpressions[0].operator"
        );
        assert_eq!(
            invalid(serde_json::json!({"podSelector": {"matchLabels": {"bad key": "x"}}})),
            "spec.podSelector.matchLabels"
        );
        assert_eq!(
            invalid(serde_json::json!({"policyTypes": ["Ingress", "Sideways"]})),
            "spec.policyTypes[1]"
        );
        assert!(policy(serde_json::json!({"podSelector": {"matchLabels": {
            "example.com/app": "web-1", "x": ""
        }}}))
        .validate()
        .is_ok());
    }
}
