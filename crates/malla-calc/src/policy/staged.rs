//! Staged policies on pods: the *pending* view — the enforced policies with every staged one
//! applied (`Set` replaces the enforced policy of its kind and name or joins as new, `Delete`
//! removes it; see [`malla_api::staged`]) — evaluated beside the enforced one, never enforced.
//!
//! Names: a staged policy keeps its own name with Calico's `staged:` in front, so traces, flow
//! records and counters tell it from the enforced one (`staged:deny-all`,
//! `knp.default.shop/staged:deny`). No enforced policy can have such a name (`:` fails their
//! validation), so the prefix is unambiguous.
//!
//! Dataplane: for a local pod whose pending tiers differ from its enforced ones in a direction,
//! its dispatch entry points at a chain `spol-in-<ifname>` / `spol-out-<ifname>` that first
//! jumps through the pending tier chains (`…-t<k>`, the same rendering as the enforced ones,
//! [`super::tiers::render_groups`] in [`Mode::Pending`]: every decision only logs its
//! [`PendingPoint`] to NFLOG and returns), rate-limited to [`PENDING_LOG_LIMIT`], then goes
//! on to the enforced verdict as before. A pod no staged policy touches is untouched, and
//! established packets never reach the dispatch. The agent reads the points back and counts,
//! per staged policy and rule, the connections it would have allowed and denied.

use std::collections::BTreeMap;

use malla_api::policy::NetworkPolicy;
use malla_api::staged::{Staged, StagedAction, NAME_PREFIX};
use serde::Serialize;

use super::flowlog::{Dir, NFLOG_GROUP};
use super::render::{egress_chain, ingress_chain};
use super::tiers::{applying, explain_groups, render_groups, Group, Mode, TierInputs};
use super::{compile, Connection, Direction, PolicyPod, PolicyProgram};
use crate::host::reference::DecidedBy;
use crate::host::render::SelectorSets;
use crate::host::CalicoView;
use crate::nft::element::{IfName, Part};
use crate::nft::{self, Chain, Key, Value};

/// At most this many pending evaluations a second per pod and direction: beyond it, a flood's
/// new connections are not evaluated against staged policies (enforcement is unchanged).
pub const PENDING_LOG_LIMIT: &str = "limit rate 2000/second burst 500 packets";

/// Whether `name` is a staged policy's name in the pending view.
pub fn is_staged_name(name: &str) -> bool {
    name.starts_with(NAME_PREFIX) || name.contains(&format!("/{NAME_PREFIX}"))
}

/// The pending view of `calico` and the Kubernetes `policies`, or None when no staged policy
/// is evaluated. Staged policies that fail their kind's validation are left out.
pub fn pending_view(
    calico: &CalicoView,
    policies: &[NetworkPolicy],
) -> Option<(CalicoView, Vec<NetworkPolicy>)> {
    let staged: Vec<_> = calico
        .staged
        .iter()
        .filter(|s| s.evaluated() && s.validate().is_ok())
        .collect();
    if staged.is_empty() {
        return None;
    }
    let mut view = calico.clone();
    view.staged.clear();
    let mut knps = policies.to_vec();
    let renamed = |name: &str| format!("{NAME_PREFIX}{name}");
    for s in staged {
        let set = s.staged_action == StagedAction::Set;
        match &s.policy {
            Staged::GlobalNetworkPolicy(p) => {
                view.policies.retain(|q| q.name != p.name);
                if set {
                    let mut p = p.clone();
                    p.name = renamed(&p.name);
                    view.policies.push(p);
                }
            }
            Staged::NetworkPolicy(p) => {
                view.network_policies
                    .retain(|q| (&q.namespace, &q.name) != (&p.namespace, &p.name));
                if set {
                    let mut p = p.clone();
                    p.name = renamed(&p.name);
                    view.network_policies.push(p);
                }
            }
            Staged::KubernetesNetworkPolicy(p) => {
                knps.retain(|q| (&q.namespace, &q.name) != (&p.namespace, &p.name));
                if set {
                    let mut p = p.clone();
                    p.name = renamed(&p.name);
                    knps.push(p);
                }
            }
            Staged::ClusterNetworkPolicy(p) => {
                view.cluster_policies.retain(|q| q.name != p.name);
                if set {
                    let mut p = p.clone();
                    p.name = renamed(&p.name);
                    view.cluster_policies.push(p);
                }
            }
        }
    }
    Some((view, knps))
}

/// What a pending decision rests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PendingRule {
    /// Rule `n` of the policy's rules of the direction.
    Index(usize),
    /// The end of the policy's tier (put down to the tier's last applying policy).
    EndOfTier,
    /// No tier decided: the profile's allow.
    Default,
}

/// A pending decision as the kernel logs it: `malla:P:<in|out>:<A|D>:<policy>:<rule>`, the
/// rule an index, `end` or `default` (policy `-`). A policy name that would make the prefix
/// longer than the kernel's 127 bytes is written as `#<hash>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PendingPoint {
    pub dir: Dir,
    pub allowed: bool,
    pub policy: String,
    pub rule: PendingRule,
}

impl PendingPoint {
    pub fn new(dir: Direction, allowed: bool, policy: &str, rule: PendingRule) -> Self {
        let dir = match dir {
            Direction::Ingress => Dir::In,
            Direction::Egress => Dir::Out,
        };
        let literal = policy.len() <= 100
            && policy
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_./:".contains(&c));
        let policy = if literal {
            policy.to_string()
        } else {
            format!("#{:016x}", super::fnv(policy))
        };
        PendingPoint {
            dir,
            allowed,
            policy,
            rule,
        }
    }

    pub fn prefix(&self) -> String {
        let dir = match self.dir {
            Dir::In => "in",
            Dir::Out => "out",
        };
        let verdict = if self.allowed { "A" } else { "D" };
        let rule = match self.rule {
            PendingRule::Index(i) => i.to_string(),
            PendingRule::EndOfTier => "end".into(),
            PendingRule::Default => "default".into(),
        };
        format!("malla:P:{dir}:{verdict}:{}:{rule}", self.policy)
    }

    /// The log statement.
    pub fn statement(&self) -> String {
        format!("log group {NFLOG_GROUP} prefix \"{}\"", self.prefix())
    }

    /// Reads a prefix's part after `malla:P:` back.
    pub fn parse(rest: &str) -> Option<Self> {
        let mut parts = rest.splitn(3, ':');
        let dir = match parts.next()? {
            "in" => Dir::In,
            "out" => Dir::Out,
            _ => return None,
        };
        let allowed = match parts.next()? {
            "A" => true,
            "D" => false,
            _ => return None,
        };
        let (policy, rule) = parts.next()?.rsplit_once(':')?;
        if policy.is_empty() {
            return None;
        }
        let rule = match rule {
            "end" => PendingRule::EndOfTier,
            "default" => PendingRule::Default,
            n => PendingRule::Index(n.parse().ok()?),
        };
        Some(PendingPoint {
            dir,
            allowed,
            policy: policy.to_string(),
            rule,
        })
    }

    /// `policy ingress[2]`, `policy ingress[end of tier]`, `default`: as traces say it.
    pub fn rule_text(&self) -> String {
        let word = self.dir.policy_word();
        match self.rule {
            PendingRule::Index(i) => format!("{} {word}[{i}]", self.policy),
            PendingRule::EndOfTier => format!("{} {word}[end of tier]", self.policy),
            PendingRule::Default => format!("default {word}"),
        }
    }
}

/// The name of pending chain `k` of a pod (`spol-in-<ifname>-t<k>`), or of its entry chain
/// (`k` = None).
pub fn pending_chain(dir: Direction, ifname: &str, k: usize) -> String {
    format!("{}-t{k}", entry_chain(dir, ifname))
}

fn entry_chain(dir: Direction, ifname: &str) -> String {
    match dir {
        Direction::Ingress => format!("s{}", ingress_chain(ifname)),
        Direction::Egress => format!("s{}", egress_chain(ifname)),
    }
}

/// (tier, policy names) of each group: what tells a pod's pending tiers from its enforced ones.
fn shape(groups: &[Group]) -> Vec<(String, Vec<String>)> {
    groups
        .iter()
        .map(|g| (g.tier.clone(), g.items.iter().map(|i| i.name()).collect()))
        .collect()
}

/// A node's pending view, ready to render.
pub(crate) struct Pending {
    calico: CalicoView,
    policies: Vec<NetworkPolicy>,
    /// The pending Kubernetes policies compiled, when a staged one is among them.
    prog: Option<PolicyProgram>,
}

impl Pending {
    /// The pending view of `inp`, or None when nothing is staged.
    pub(crate) fn of(inp: &TierInputs, _prog: &PolicyProgram, me: &str) -> Option<Pending> {
        let (calico, policies) = pending_view(inp.calico, inp.policies)?;
        let prog = (policies.as_slice() != inp.policies)
            .then(|| compile(&policies, inp.namespaces, inp.pods, me));
        Some(Pending {
            calico,
            policies,
            prog,
        })
    }

    /// `inp` with the pending policies.
    pub(crate) fn inputs<'a>(&'a self, inp: &TierInputs<'a>) -> TierInputs<'a> {
        TierInputs {
            calico: &self.calico,
            policies: &self.policies,
            ..*inp
        }
    }

    /// The pending chains of `pod` in `dir`, when its pending tiers differ from the enforced
    /// `groups`; its dispatch entry in `map` then runs them first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn render(
        &self,
        inp: &TierInputs,
        prog: &PolicyProgram,
        pod: &PolicyPod,
        dir: Direction,
        groups: &[Group],
        ifname: IfName,
        map: &str,
        sets: &mut SelectorSets,
        table: &mut nft::Table,
    ) {
        let pinp = self.inputs(inp);
        let (_, pending) = applying(&pinp, pod, dir);
        if shape(&pending) == shape(groups) {
            return;
        }
        let pprog = self.prog.as_ref().unwrap_or(prog);
        let first = render_groups(&pinp, pprog, pod, dir, &pending, Mode::Pending, sets, table);
        let entry = entry_chain(dir, &pod.host_ifname);
        let mut rules = vec![format!("{PENDING_LOG_LIMIT} jump {first}")];
        let Some(m) = table.maps.get_mut(map) else {
            return;
        };
        let key = Key::one(Part::Iface(ifname));
        if let Some(v) = m.elements.get(&key) {
            // The enforced entry, as the dispatch would have taken it (a jump: `goto` from
            // here returns to the same place).
            let text = v.to_string();
            let target = text.strip_prefix("jump ").unwrap_or(&text);
            rules.push(format!("goto {target}"));
        }
        m.elements.insert(key, Value::jump(entry.clone()));
        table.chains.insert(entry, Chain { base: None, rules });
    }
}

/// A direction's pending verdict: allowed or not, the tier (None for the default) and the
/// point the kernel would log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingVerdict {
    pub allowed: bool,
    pub tier: Option<String>,
    pub point: PendingPoint,
}

/// The pending verdict of `dir` for `c`, or None when no staged policy changes the subject's
/// tiers in `dir` (the enforced verdict stands).
pub fn explain_pending(inp: &TierInputs, dir: Direction, c: &Connection) -> Option<PendingVerdict> {
    let (subject, _) = c.subject_and_peer(dir);
    let pod = subject.pod?;
    let (calico, policies) = pending_view(inp.calico, inp.policies)?;
    let pinp = TierInputs {
        calico: &calico,
        policies: &policies,
        ..*inp
    };
    let (_, enforced) = applying(inp, pod, dir);
    let (_, pending) = applying(&pinp, pod, dir);
    if shape(&enforced) == shape(&pending) {
        return None;
    }
    let (allowed, by) = explain_groups(&pinp, &pending, dir, c);
    let (tier, policy, rule) = match by {
        DecidedBy::Rule {
            tier,
            policy,
            index,
        } => (Some(tier), policy, PendingRule::Index(index)),
        DecidedBy::EndOfTier { tier } => {
            let last = pending
                .iter()
                .find(|g| g.tier == tier)
                .and_then(|g| g.items.last())
                .map(|i| i.name())
                .unwrap_or_default();
            (Some(tier), last, PendingRule::EndOfTier)
        }
        DecidedBy::Default | DecidedBy::Exempt { .. } => (None, "-".into(), PendingRule::Default),
    };
    Some(PendingVerdict {
        allowed,
        tier,
        point: PendingPoint::new(dir, allowed, &policy, rule),
    })
}

/// The pending points of both directions of `c` (egress first), for the property test and
/// traces.
pub fn pending_points(inp: &TierInputs, c: &Connection) -> BTreeMap<&'static str, PendingVerdict> {
    let mut out = BTreeMap::new();
    for (word, dir) in [
        ("egress", Direction::Egress),
        ("ingress", Direction::Ingress),
    ] {
        if let Some(v) = explain_pending(inp, dir, c) {
            out.insert(word, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_read_back() {
        for p in [
            PendingPoint::new(
                Direction::Ingress,
                false,
                "staged:deny-all",
                PendingRule::EndOfTier,
            ),
            PendingPoint::new(
                Direction::Egress,
                true,
                "knp.default.shop/staged:web",
                PendingRule::Index(3),
            ),
            PendingPoint::new(Direction::Ingress, true, "-", PendingRule::Default),
            PendingPoint::new(
                Direction::Egress,
                false,
                &"x".repeat(150),
                PendingRule::Index(0),
            ),
        ] {
            let text = p.prefix();
            assert!(text.len() <= 127 && !text.contains([' ', '"']), "{text}");
            let rest = text.strip_prefix("malla:P:").unwrap();
            assert_eq!(PendingPoint::parse(rest), Some(p), "{text}");
        }
        assert_eq!(PendingPoint::parse("in:X:p:0"), None);
        assert_eq!(PendingPoint::parse("in:A::0"), None);
        assert_eq!(PendingPoint::parse("in:A:p:x"), None);
    }

    #[test]
    fn staged_names_are_recognised() {
        assert!(is_staged_name("staged:a"));
        assert!(is_staged_name("knp.default.ns/staged:a"));
        assert!(is_staged_name("ns/staged:a"));
        assert!(!is_staged_name("knp.default.ns/a"));
    }
}
