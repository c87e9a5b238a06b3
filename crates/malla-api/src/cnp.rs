//! `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, the upstream cluster-wide policy:
//! the types (serde, camelCase, as a manifest's `spec` reads) and the checks the API server's
//! schema and CEL rules make, each error naming the field.
//!
//! Semantics live in `malla-calc::policy::tiers`: an `Admin` policy is evaluated before
//! everything else in Calico's `kube-admin` tier, a `Baseline` one after NetworkPolicy in
//! `kube-baseline`, both tiers passing what they do not decide. `domainNames` egress peers
//! ([`crate::domain`]: a name or a leading `*.` wildcard) match the addresses the subject
//! pod's own DNS answers gave for them. Unlike the upstream CRD (whose rules take them in
//! Accept rules only), Deny and Pass rules take them too: the issue asks to deny names, and a
//! Deny by name drops what the pod learned for it (addresses it never resolved through the
//! node's DNS proxy are not covered: an allow-list is the safe form).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::LabelSelector;

/// Where a ClusterNetworkPolicy is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CnpTier {
    Admin,
    Baseline,
}

/// A rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CnpAction {
    Accept,
    Deny,
    Pass,
}

/// Pods in namespaces: both selectors must match (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespacedPod {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    pub pod_selector: LabelSelector,
}

/// The pods a policy applies to: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
}

/// A peer of a rule: exactly one field (egress peers may also be nodes or networks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<NamespacedPod>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<IpNet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_names: Option<Vec<String>>,
}

/// A port: a number or a range (exactly one).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<PortRange>,
}

impl CnpPort {
    /// The inclusive range it stands for.
    pub fn range(&self) -> Option<(u16, u16)> {
        match (self.number, self.range) {
            (Some(n), None) => Some((n, n)),
            (None, Some(r)) => Some((r.start, r.end)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

/// Per-protocol attributes (`destinationPort` optional: the whole protocol).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtocolPorts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_port: Option<CnpPort>,
}

/// One protocol match: exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Protocol {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<ProtocolPorts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_named_port: Option<String>,
}

/// A rule (ingress `from` or egress `to`, as `peers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpRule {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub action: CnpAction,
    #[serde(default, alias = "from", alias = "to")]
    pub peers: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<Protocol>,
}

/// The `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CnpSpec {
    pub tier: CnpTier,
    pub priority: i32,
    pub subject: Subject,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<CnpRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<CnpRule>,
}

/// A ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetworkPolicy {
    pub name: String,
    pub spec: CnpSpec,
}

fn bad<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, (String, String)> {
    Err((field.into(), reason.into()))
}

fn one_of(path: &str, set: &[(&str, bool)]) -> Result<(), (String, String)> {
    let n = set.iter().filter(|(_, s)| *s).count();
    if n != 1 {
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        return bad(
            path,
            format!("exactly one of {} must be set ({n} are)", names.join(", ")),
        );
    }
    Ok(())
}

impl ClusterNetworkPolicy {
    /// The checks of the CRD's schema and CEL rules: the field and why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let s = &self.spec;
        if self.name.is_empty() {
            return bad("metadata.name", "must not be empty");
        }
        if !(0..=1000).contains(&s.priority) {
            return bad(
                "spec.priority",
                format!("{} is not in 0..=1000", s.priority),
            );
        }
        one_of(
            "spec.subject",
            &[
                ("namespaces", s.subject.namespaces.is_some()),
                ("pods", s.subject.pods.is_some()),
            ],
        )?;
        if let Some(n) = &s.subject.namespaces {
            crate::policy::validate_selector(n, "spec.subject.namespaces")?;
        }
        if let Some(p) = &s.subject.pods {
            crate::policy::validate_selector(
                &p.namespace_selector,
                "spec.subject.pods.namespaceSelector",
            )?;
            crate::policy::validate_selector(&p.pod_selector, "spec.subject.pods.podSelector")?;
        }
        for (dir, rules, peers_field) in
            [("ingress", &s.ingress, "from"), ("egress", &s.egress, "to")]
        {
            if rules.len() > 25 {
                return bad(format!("spec.{dir}"), "at most 25 rules");
            }
            for (i, r) in rules.iter().enumerate() {
                let at = format!("spec.{dir}[{i}]");
                if r.name.len() > 100 {
                    return bad(format!("{at}.name"), "at most 100 characters");
                }
                if r.peers.is_empty() || r.peers.len() > 25 {
                    return bad(format!("{at}.{peers_field}"), "must hold 1 to 25 peers");
                }
                let mut wide = false;
                for (j, p) in r.peers.iter().enumerate() {
                    let pat = format!("{at}.{peers_field}[{j}]");
                    let egress = dir == "egress";
                    if !egress
                        && (p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some())
                    {
                        return bad(pat, "an ingress peer is namespaces or pods");
                    }
                    one_of(
                        &pat,
                        &[
                            ("namespaces", p.namespaces.is_some()),
                            ("pods", p.pods.is_some()),
                            ("nodes", p.nodes.is_some()),
                            ("networks", p.networks.is_some()),
                            ("domainNames", p.domain_names.is_some()),
                        ],
                    )?;
                    if let Some(names) = &p.domain_names {
                        crate::domain::check_list(&format!("{pat}.domainNames"), names, 25)?;
                        wide = true;
                    }
                    if let Some(n) = &p.networks {
                        if n.is_empty() || n.len() > 25 {
                            return bad(format!("{pat}.networks"), "must hold 1 to 25 CIDRs");
                        }
                        wide = true;
                    }
                    if p.nodes.is_some() {
                        wide = true;
                    }
                    for (name, sel) in [("namespaces", &p.namespaces), ("nodes", &p.nodes)] {
                        if let Some(sel) = sel {
                            crate::policy::validate_selector(sel, &format!("{pat}.{name}"))?;
                        }
                    }
                    if let Some(pp) = &p.pods {
                        crate::policy::validate_selector(
                            &pp.namespace_selector,
                            &format!("{pat}.pods.namespaceSelector"),
                        )?;
                        crate::policy::validate_selector(
                            &pp.pod_selector,
                            &format!("{pat}.pods.podSelector"),
                        )?;
                    }
                }
                if r.protocols.len() > 25 {
                    return bad(format!("{at}.protocols"), "at most 25");
                }
                for (j, pr) in r.protocols.iter().enumerate() {
                    let pat = format!("{at}.protocols[{j}]");
                    one_of(
                        &pat,
                        &[
                            ("tcp", pr.tcp.is_some()),
                            ("udp", pr.udp.is_some()),
                            ("sctp", pr.sctp.is_some()),
                            ("destinationNamedPort", pr.destination_named_port.is_some()),
                        ],
                    )?;
                    if pr.destination_named_port.is_some() && wide {
                        return bad(
                            format!("{pat}.destinationNamedPort"),
                            "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames",
                        );
                    }
                    for (name, ports) in [("tcp", &pr.tcp), ("udp", &pr.udp), ("sctp", &pr.sctp)] {
                        let Some(port) = ports.and_then(|p| p.destination_port) else {
                            continue;
                        };
                        let ppath = format!("{pat}.{name}.destinationPort");
                        match (port.number, port.range) {
                            (Some(0), None) => {
                                return bad(format!("{ppath}.number"), "must be in 1..=65535")
                            }
                            (Some(_), None) => {}
                            (None, Some(r)) => {
                                if r.start == 0 || r.end == 0 {
                                    return bad(
                                        format!("{ppath}.range"),
                                        "ports must be in 1..=65535",
                                    );
                                }
                                if r.start >= r.end {
                                    return bad(
                                        format!("{ppath}.range"),
                                        "Start port must be less than End port",
                                    );
                                }
                            }
                            _ => return bad(ppath, "exactly one of number, range must be set"),
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether `ip` is in a rule's `networks`.
pub fn in_networks(nets: &[IpNet], ip: &IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(egress: serde_json::Value) -> ClusterNetworkPolicy {
        serde_json::from_value(json!({"name": "p", "spec": {
            "tier": "Admin", "priority": 1,
            "subject": {"namespaces": {}},
            "egress": egress}}))
        .unwrap()
    }

    #[test]
    fn domain_names_are_checked_with_the_field_named() {
        let ok = policy(
            json!([{"action": "Accept", "to": [{"domainNames": ["*.allowed.test", "api.example.com"]}]}]),
        );
        assert_eq!(ok.validate(), Ok(()));
        for action in ["Deny", "Pass"] {
            let p = policy(json!([{"action": action, "to": [{"domainNames": ["*.denied.test"]}]}]));
            assert_eq!(p.validate(), Ok(()), "{action}");
        }
        for (egress, field) in [
            (
                json!([{"action": "Accept", "to": [{"domainNames": ["a.*.test"]}]}]),
                "spec.egress[0].to[0].domainNames[0]",
            ),
            (
                json!([{"action": "Accept", "to": [{"domainNames": ["ok.test", "b.test."]}]}]),
                "spec.egress[0].to[0].domainNames[1]",
            ),
            (
                json!([{"action": "Accept", "to": [{"domainNames": []}]}]),
                "spec.egress[0].to[0].domainNames",
            ),
            (
                json!([{"action": "Accept", "to": [{"domainNames": ["a.test"]}],
                     "protocols": [{"destinationNamedPort": "http"}]}]),
                "spec.egress[0].protocols[0].destinationNamedPort",
            ),
            (
                json!([{"action": "Accept", "to": [{"domainNames": ["a.test"], "networks": ["198.18.0.0/24"]}]}]),
                "spec.egress[0].to[0]",
            ),
        ] {
            let e = policy(egress.clone()).validate().unwrap_err();
            assert_eq!(e.0, field, "{egress}: {e:?}");
        }
    }
}
