//! DNS-derived members in `malla policy trace`: a pod's domain rules match the addresses its
//! own DNS answers gave, which only the agent of its node knows (its DNS proxy's `GET /dns`).
//! The trace asks that agent for the records of the pods it traces from, builds the
//! [`DnsView`] the verdict is computed with, and says for each domain rule of the pod's egress
//! whether the destination is a member and which name and answer put it there (or that it
//! expired). A pod with domain rules whose agent cannot be asked has no verdict a trace can
//! stand behind: its egress is unknown, and the trace says why instead of claiming ALLOWED.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use malla_calc::policy::dns::{self, DnsView, DomainRule, LearnedRecord};
use malla_calc::policy::tiers::TierInputs;
use malla_calc::policy::{Connection, PolicyPod};
use serde::Serialize;

use crate::status_cmd::http_get;

/// What the agents said, per querying pod (`namespace/name`): its records, or why they could
/// not be had. Pods without domain rules are not asked about.
#[derive(Default)]
pub struct Learned {
    by_pod: BTreeMap<String, Result<Vec<LearnedRecord>, String>>,
}

/// Whether `pod` has a domain rule in its egress tiers.
fn has_domain_rules(inp: &TierInputs, pod: &PolicyPod) -> bool {
    !dns::domain_rules(inp, pod).is_empty()
}

impl Learned {
    /// Asks the agent of each of `pods`' nodes (those with domain rules) what they learned: in
    /// a lab, each node's agent in its namespace; on a cluster, this node's agent only.
    pub fn fetch(
        g: &crate::Globals,
        inp: &TierInputs,
        pods: &[&PolicyPod],
        agent: SocketAddr,
    ) -> anyhow::Result<Learned> {
        let mut out = Learned::default();
        let asked: Vec<&&PolicyPod> = pods.iter().filter(|p| has_domain_rules(inp, p)).collect();
        if asked.is_empty() {
            return Ok(out);
        }
        let agents = crate::flows_cmd::agents(g)?;
        // One request per node when many pods are traced, one per pod otherwise.
        let per_node = asked.len() > 4;
        let mut node_answers: BTreeMap<String, Result<Vec<LearnedRecord>, String>> =
            BTreeMap::new();
        for pod in asked {
            let key = pod.key();
            let node = pod.node.to_string();
            let Some((_, netns)) = agents.iter().find(|(n, _)| *n == node) else {
                out.by_pod.insert(
                    key,
                    Err(format!(
                        "node {node}'s agent cannot be asked from here (run the trace on {node})"
                    )),
                );
                continue;
            };
            let got = if per_node {
                node_answers
                    .entry(node.clone())
                    .or_insert_with(|| ask(&node, netns.as_deref(), agent, "/dns"))
                    .clone()
                    .map(|rs| rs.into_iter().filter(|r| r.pod == key).collect())
            } else {
                ask(&node, netns.as_deref(), agent, &format!("/dns?pod={key}"))
            };
            out.by_pod.insert(key, got);
        }
        Ok(out)
    }

    /// The view the verdict is computed with: every record still in its set.
    pub fn view(&self) -> DnsView {
        DnsView::from_records(self.by_pod.values().flatten().flatten())
    }

    /// For `c`'s source pod, if it has domain rules: each rule and whether `c`'s destination is
    /// a member, with the record that put it there (or the one that expired).
    pub fn explain(&self, inp: &TierInputs, c: &Connection) -> Option<DnsTrace> {
        let pod = c.src.pod?;
        let rules = dns::domain_rules(inp, pod);
        if rules.is_empty() {
            return None;
        }
        let key = pod.key();
        let (records, error) = match self.by_pod.get(&key) {
            Some(Ok(r)) => (r.as_slice(), None),
            Some(Err(e)) => (&[][..], Some(e.clone())),
            None => (&[][..], Some("not asked".to_string())),
        };
        let dst = c.dst.ip;
        let rules = rules
            .into_iter()
            .map(|rule| {
                let set = dns::set_name(&key, &rule.patterns);
                let learned = records
                    .iter()
                    .filter(|r| r.set == set && r.address == dst)
                    .max_by_key(|r| r.ttl_left_ms)
                    .cloned();
                Membership {
                    member: error.is_none() && learned.as_ref().is_some_and(|r| r.live()),
                    rule,
                    learned,
                }
            })
            .collect();
        Some(DnsTrace {
            pod: key,
            address: dst,
            error,
            rules,
        })
    }
}

/// One node's `/dns` answer, or why there is none.
fn ask(
    node: &str,
    netns: Option<&str>,
    agent: SocketAddr,
    path: &str,
) -> Result<Vec<LearnedRecord>, String> {
    let ans = http_get(netns, agent, path);
    match ans.status {
        Some(200) => ans
            .body
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str::<LearnedRecord>(l).map_err(|e| {
                    let shown: String = l.chars().take(200).collect();
                    format!("node {node}: a /dns line is not a learned record ({e}): {shown}")
                })
            })
            .collect(),
        Some(code) => {
            let shown: String = ans.body.trim().chars().take(300).collect();
            Err(format!(
                "node {node}: the agent's /dns answered {code}: {shown}"
            ))
        }
        None => Err(format!(
            "node {node}: agent unreachable: {}",
            ans.body.trim()
        )),
    }
}

/// The DNS-derived part of a connection's trace.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsTrace {
    /// The querying pod (the connection's source).
    pub pod: String,
    /// The destination address looked for in the pod's sets.
    pub address: IpAddr,
    /// Why the pod's records could not be had (then its egress verdict is unknown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pod's egress domain rules, in tier order.
    pub rules: Vec<Membership>,
}

/// One domain rule and whether the destination is in its set.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    #[serde(flatten)]
    pub rule: DomainRule,
    pub member: bool,
    /// The answer that put the address in the set (live), or the last one (expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned: Option<LearnedRecord>,
}

impl DnsTrace {
    /// Whether the verdict of the pod's egress cannot be known.
    pub fn unknown(&self) -> bool {
        self.error.is_some()
    }

    /// The trace's lines (without indentation).
    pub fn lines(&self) -> Vec<String> {
        if let Some(e) = &self.error {
            return vec![format!(
                "dns: what {} learned from DNS is unknown ({e}): its {} domain rule(s) cannot be evaluated, so the verdict is UNKNOWN",
                self.pod,
                self.rules.len()
            )];
        }
        self.rules
            .iter()
            .map(|m| {
                let r = &m.rule;
                let at = format!("rule {} of {}/{}, {}", r.index, r.tier, r.policy, r.action);
                let pats = r.patterns.join(", ");
                match (&m.learned, m.member) {
                    (Some(l), true) => format!(
                        "dns: {} in domains {pats} ({at}): learned from {}",
                        self.address,
                        l.describe()
                    ),
                    (Some(l), false) => format!(
                        "dns: {} no longer in domains {pats} ({at}): {}",
                        self.address,
                        l.describe()
                    ),
                    (None, _) => format!(
                        "dns: {} not in domains {pats} ({at}): {} learned it for no matching name",
                        self.address, self.pod
                    ),
                }
            })
            .collect()
    }
}
