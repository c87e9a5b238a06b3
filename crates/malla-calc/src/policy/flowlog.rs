//! Flow-log statements at the ruleset's verdict points: what the kernel reports over NFLOG
//! (group [`NFLOG_GROUP`]) when a new connection is allowed by a policy rule or dropped, and
//! the prefix format the agent reads them back with ([`LogPoint::parse`]).
//!
//! Where they go (each call site is one line, so that another renderer can carry them over):
//! - an allowing rule of an endpoint chain or a peers chain: [`LogPoint::allow`]'s
//!   [`LogPoint::statement`] just before the verdict (`ip saddr @s log group 30 prefix "…"
//!   accept`). Those chains only see packets that are not part of an established connection
//!   (the base chain accepts `established,related` first), so this is one NFLOG message per new
//!   connection, never per packet;
//! - a default deny (the `drop` ending an endpoint or peers chain), the anti-spoofing drop and
//!   the no-endpoint reject: two rules of their own before the verdict,
//!   [`LogPoint::deny_rules`], rate-limited ([`DENY_LOG_LIMIT`]) so that a flood costs at most
//!   that many messages a second per rule. The first, `limit rate over … goto flowlog-lost-…`,
//!   sends what is beyond the limit to a chain that counts it and gives the same verdict
//!   ([`LOST_DROP_CHAIN`], [`LOST_REJECT_CHAIN`]); the second logs what is left. One token
//!   bucket decides both, so every dropped packet is either logged or counted: the agent
//!   reads those chains' counters and reports them as samples lost (reason `rate-limit`).
//!
//! The prefix (at most 127 bytes in the kernel) is `malla:<kind>[:<dir>[:<rule>]]`: `A` (allowed
//! by a rule), `D` (denied: no rule allowed it), `S` (spoofed source), `N` (no endpoint);
//! `in` / `out`; the rule as `namespace/name:index` when it fits, else `#<hex>`, a hash of it
//! that [`rule_id`] computes from the program the agent holds.

use serde::Serialize;

use crate::nft::{Chain, Table};

/// The NFLOG group Malla's log statements send to.
pub const NFLOG_GROUP: u16 = 30;

/// The rate of a deny's log statement: beyond it, a flood's drops are counted in a lost chain
/// instead of logged (the drop itself is unchanged).
pub const DENY_LOG_LIMIT: &str = "1000/second burst 200 packets";

/// The chain counting (one `counter`) and dropping what a deny or anti-spoofing log point did
/// not log because of its rate limit.
pub const LOST_DROP_CHAIN: &str = "flowlog-lost-drop";
/// The same for the no-endpoint reject: counted, then rejected as the logged ones are.
pub const LOST_REJECT_CHAIN: &str = "flowlog-lost-reject";
/// Both lost chains, whose counters the agent adds up.
pub const LOST_CHAINS: [&str; 2] = [LOST_DROP_CHAIN, LOST_REJECT_CHAIN];

/// The longest rule name written literally into a prefix; longer ones are hashed.
const LITERAL_MAX: usize = 100;

/// The direction a policy decision was taken in, seen from the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// The endpoint's ingress policy.
    In,
    /// The endpoint's egress policy.
    Out,
}

impl Dir {
    fn word(self) -> &'static str {
        match self {
            Dir::In => "in",
            Dir::Out => "out",
        }
    }

    /// `ingress` / `egress`, as rule comments and traces name them.
    pub fn policy_word(self) -> &'static str {
        match self {
            Dir::In => "ingress",
            Dir::Out => "egress",
        }
    }
}

/// A rule of a policy: `namespace/name` and index in its `ingress` / `egress`, or a hash of
/// that when it was too long for a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleRef {
    Named { policy: String, rule: usize },
    Hashed(u64),
}

/// What a log statement says.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum LogPoint {
    /// A new connection allowed by `rule` in direction `dir`.
    Allow { dir: Dir, rule: RuleRef },
    /// A new connection dropped because no rule of the isolating policies allowed it.
    Deny { dir: Dir },
    /// A packet with a source its pod may not use (anti-spoofing).
    Spoofed,
    /// A connection to a Service frontend without endpoints, rejected.
    NoEndpoint,
    /// What the pending view of staged policies would decide ([`super::staged`]); the
    /// enforced verdict is logged on its own.
    Pending(super::staged::PendingPoint),
}

/// The hash naming a rule whose name is too long for a prefix.
pub fn rule_id(policy: &str, dir: Dir, rule: usize) -> u64 {
    super::fnv(&format!("{policy} {}[{rule}]", dir.policy_word()))
}

/// Adds lost chain `chain` ([`LOST_CHAINS`]) to `table` unless it is there.
fn add_lost_chain(table: &mut Table, chain: &str) {
    let rules: &[&str] = if chain == LOST_REJECT_CHAIN {
        &[
            "counter",
            "meta l4proto tcp reject with tcp reset",
            "reject",
        ]
    } else {
        &["counter drop"]
    };
    table
        .chains
        .entry(chain.to_string())
        .or_insert_with(|| Chain {
            base: None,
            rules: rules.iter().map(|r| r.to_string()).collect(),
        });
}

/// Adds both lost chains to `table`: a node's table always has them (a policy patch adds and
/// removes only policy objects, so the chains deny rules go to are never its to remove).
pub fn add_lost_chains(table: &mut Table) {
    for c in LOST_CHAINS {
        add_lost_chain(table, c);
    }
}

impl LogPoint {
    /// The allow of rule `rule` of `policy` (`namespace/name`) in `dir`.
    pub fn allow(dir: Dir, policy: &str, rule: usize) -> Self {
        let literal = policy.len() <= LITERAL_MAX
            && policy
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_./".contains(&c));
        let rule = if literal {
            RuleRef::Named {
                policy: policy.to_string(),
                rule,
            }
        } else {
            RuleRef::Hashed(rule_id(policy, dir, rule))
        };
        LogPoint::Allow { dir, rule }
    }

    /// The prefix text (no spaces or quotes; at most 127 bytes).
    pub fn prefix(&self) -> String {
        match self {
            LogPoint::Allow { dir, rule } => match rule {
                RuleRef::Named { policy, rule } => {
                    format!("malla:A:{}:{policy}:{rule}", dir.word())
                }
                RuleRef::Hashed(h) => format!("malla:A:{}:#{h:016x}", dir.word()),
            },
            LogPoint::Deny { dir } => format!("malla:D:{}", dir.word()),
            LogPoint::Spoofed => "malla:S".into(),
            LogPoint::NoEndpoint => "malla:N".into(),
            LogPoint::Pending(p) => p.prefix(),
        }
    }

    /// The log statement: `log group 30 prefix "…"`.
    pub fn statement(&self) -> String {
        format!("log group {NFLOG_GROUP} prefix \"{}\"", self.prefix())
    }

    /// The two rules logging this point at most [`DENY_LOG_LIMIT`], to put just before its
    /// verdict: beyond the limit to the lost chain (added to `table` if missing) that counts
    /// and gives this point's verdict (reject for [`LogPoint::NoEndpoint`], else drop), then
    /// the log statement.
    pub fn deny_rules(&self, table: &mut Table) -> [String; 2] {
        let chain = match self {
            LogPoint::NoEndpoint => LOST_REJECT_CHAIN,
            _ => LOST_DROP_CHAIN,
        };
        add_lost_chain(table, chain);
        [
            format!("limit rate over {DENY_LOG_LIMIT} goto {chain}"),
            self.statement(),
        ]
    }

    /// Reads a prefix back; None for one that is not Malla's.
    pub fn parse(prefix: &str) -> Option<Self> {
        let rest = prefix.trim_end_matches('\0').strip_prefix("malla:")?;
        if let Some(p) = rest.strip_prefix("P:") {
            return super::staged::PendingPoint::parse(p).map(LogPoint::Pending);
        }
        let mut parts = rest.splitn(3, ':');
        let kind = parts.next()?;
        let dir = |w: Option<&str>| match w {
            Some("in") => Some(Dir::In),
            Some("out") => Some(Dir::Out),
            _ => None,
        };
        match kind {
            "S" => Some(LogPoint::Spoofed),
            "N" => Some(LogPoint::NoEndpoint),
            "D" => Some(LogPoint::Deny {
                dir: dir(parts.next())?,
            }),
            "A" => {
                let dir = dir(parts.next())?;
                let r = parts.next()?;
                let rule = if let Some(h) = r.strip_prefix('#') {
                    RuleRef::Hashed(u64::from_str_radix(h, 16).ok()?)
                } else {
                    let (policy, i) = r.rsplit_once(':')?;
                    if policy.is_empty() {
                        return None;
                    }
                    RuleRef::Named {
                        policy: policy.to_string(),
                        rule: i.parse().ok()?,
                    }
                };
                Some(LogPoint::Allow { dir, rule })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn prefixes_read_back() {
        for p in [
            LogPoint::allow(Dir::In, "default/allow-web", 2),
            LogPoint::allow(Dir::Out, &"x".repeat(200), 0),
            LogPoint::Deny { dir: Dir::Out },
            LogPoint::Spoofed,
            LogPoint::NoEndpoint,
        ] {
            let text = p.prefix();
            assert!(text.len() <= 127 && !text.contains([' ', '"']), "{text}");
            assert_eq!(LogPoint::parse(&text), Some(p.clone()), "{text}");
        }
        assert_eq!(
            LogPoint::allow(Dir::In, "ns/p", 1).statement(),
            "log group 30 prefix \"malla:A:in:ns/p:1\""
        );
        let mut t = Table::new("inet", "malla");
        assert_eq!(
            LogPoint::Deny { dir: Dir::In }.deny_rules(&mut t),
            [
                "limit rate over 1000/second burst 200 packets goto flowlog-lost-drop".to_string(),
                "log group 30 prefix \"malla:D:in\"".to_string()
            ]
        );
        assert_eq!(t.chains[LOST_DROP_CHAIN].rules, ["counter drop"]);
        assert!(!t.chains.contains_key(LOST_REJECT_CHAIN));
        let [over, _] = LogPoint::NoEndpoint.deny_rules(&mut t);
        assert!(over.ends_with("goto flowlog-lost-reject"), "{over}");
        assert_eq!(t.chains[LOST_REJECT_CHAIN].rules[0], "counter");
        assert_eq!(LogPoint::parse("other:A"), None);
        assert_eq!(LogPoint::parse("malla:A:in:ns/p"), None);
        assert_eq!(LogPoint::parse("malla:X"), None);
    }

    proptest! {
        #[test]
        fn any_prefix_text_parses_or_not_without_panic(s in ".{0,140}") {
            let _ = LogPoint::parse(&s);
        }

        #[test]
        fn allow_round_trips(pol in "[a-z0-9-]{1,63}/[a-z0-9.-]{1,253}", rule in 0usize..1000) {
            let p = LogPoint::allow(Dir::In, &pol, rule);
            prop_assert!(p.prefix().len() <= 127);
            prop_assert_eq!(LogPoint::parse(&p.prefix()), Some(p));
        }
    }
}
