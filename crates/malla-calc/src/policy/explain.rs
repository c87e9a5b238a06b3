//! Why a connection is allowed or dropped, for a trace command: per direction, which policies
//! select the endpoint and which rules (policy + rule index) allow the connection. Built from
//! the same predicates as [`super::reference`], so it agrees with it.

use std::fmt;

use malla_api::policy::NetworkPolicy;
use malla_api::Namespace;
use serde::Serialize;

use super::reference::{isolating, rule_allows, rules};
use super::{Connection, Direction};

/// The outcome of one direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "verdict")]
pub enum Verdict {
    /// The endpoint is not a pod: no policy applies.
    NotAPod,
    /// No policy of this direction selects the pod.
    NotIsolated,
    /// Allowed by these rules (`namespace/name`, rule index), in policy order.
    Allowed { by: Vec<(String, usize)> },
    /// Selected, and no rule allows it.
    Denied,
}

/// One direction of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionTrace {
    pub direction: Direction,
    /// `namespace/name` of the pod whose policies decide, if the endpoint is a pod.
    pub pod: Option<String>,
    /// `namespace/name` of the policies selecting it in this direction.
    pub selected_by: Vec<String>,
    pub verdict: Verdict,
}

impl DirectionTrace {
    pub fn allowed(&self) -> bool {
        !matches!(self.verdict, Verdict::Denied)
    }
}

/// A whole trace: egress on the source, ingress on the destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub egress: DirectionTrace,
    pub ingress: DirectionTrace,
    pub allowed: bool,
}

fn trace(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    dir: Direction,
    c: &Connection,
) -> DirectionTrace {
    let (subject, _) = c.subject_and_peer(dir);
    let Some(pod) = subject.pod else {
        return DirectionTrace {
            direction: dir,
            pod: None,
            selected_by: Vec::new(),
            verdict: Verdict::NotAPod,
        };
    };
    let pols = isolating(policies, pod, dir);
    let selected_by: Vec<String> = pols.iter().map(|p| p.key()).collect();
    let verdict = if pols.is_empty() {
        Verdict::NotIsolated
    } else {
        let by: Vec<(String, usize)> = pols
            .iter()
            .flat_map(|p| {
                rules(p, dir)
                    .into_iter()
                    .enumerate()
                    .filter(|(_, r)| rule_allows(&p.namespace, *r, namespaces, dir, c))
                    .map(|(i, _)| (p.key(), i))
            })
            .collect();
        if by.is_empty() {
            Verdict::Denied
        } else {
            Verdict::Allowed { by }
        }
    };
    DirectionTrace {
        direction: dir,
        pod: Some(pod.key()),
        selected_by,
        verdict,
    }
}

/// Explains the verdict for a connection.
pub fn explain(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    c: &Connection,
) -> Explanation {
    let egress = trace(policies, namespaces, Direction::Egress, c);
    let ingress = trace(policies, namespaces, Direction::Ingress, c);
    let allowed = egress.allowed() && ingress.allowed();
    Explanation {
        egress,
        ingress,
        allowed,
    }
}

impl fmt::Display for DirectionTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.direction.as_str();
        let who = self.pod.as_deref().unwrap_or("-");
        match &self.verdict {
            Verdict::NotAPod => write!(f, "{d}: not a pod, no policy applies: allowed"),
            Verdict::NotIsolated => write!(f, "{d}: {who} is not isolated: allowed"),
            Verdict::Allowed { by } => {
                let rules: Vec<String> = by.iter().map(|(p, i)| format!("{p} {d}[{i}]")).collect();
                write!(
                    f,
                    "{d}: {who} selected by {}; allowed by {}",
                    self.selected_by.join(", "),
                    rules.join(", ")
                )
            }
            Verdict::Denied => write!(
                f,
                "{d}: {who} selected by {}; no rule allows it: denied",
                self.selected_by.join(", ")
            ),
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.egress)?;
        writeln!(f, "{}", self.ingress)?;
        write!(
            f,
            "verdict: {}",
            if self.allowed { "allowed" } else { "denied" }
        )
    }
}
