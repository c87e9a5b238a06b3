//! Flow records: what the kernel reports about connections (conntrack events, NFLOG samples of
//! the ruleset's verdict points, [`malla_calc::policy::flowlog`]) turned into flows named by
//! workload, Service and policy, aggregated into [`WINDOW_SECS`]-second windows (like Calico's
//! Goldmane) and kept in a bounded history ([`Limits`]). Pure: no Linux here; the agent feeds
//! [`KernelEvent`]s in ([`Aggregator::ingest`]) and serves [`Flow`]s out.
//!
//! - [`directory`]: addresses → pods, nodes, Service frontends and isolating policies, from the
//!   agent's cluster view.
//! - [`aggregate`]: the aggregator: live connections, pending allow samples, windows, bounds
//!   and the count of what was lost.
//! - [`Filter`]: the query and follow filters `malla flows` and `/flows` share.
//!
//! The wire format is JSON lines, one [`Flow`] per line: a stream and a query read the same
//! way, `curl` and `jq` read it, and no protobuf toolchain is needed to build or use it.

pub mod aggregate;
pub mod directory;

use std::net::IpAddr;

use malla_calc::policy::flowlog::LogPoint;
use serde::{Deserialize, Serialize};

pub use aggregate::{Aggregator, Limits, Stats};

pub use directory::Directory;

/// The length of an aggregation window.
pub const WINDOW_SECS: u64 = 15;

/// A connection's addresses as conntrack tracks them (one direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tuple {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1/58 ICMP).
    pub proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
}

/// Packets and bytes one way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

/// A conntrack event's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The connection was confirmed (its first packet left the node's ruleset accepted).
    New,
    /// The connection ended (closed, timed out or flushed), with its counters.
    Destroy,
    /// A periodic reading of a live connection's counters (from a conntrack dump): a TCP
    /// connection lingers in `TIME_WAIT` for minutes before its DESTROY, so its bytes are
    /// counted as they grow and its end when it closes.
    Update,
}

/// One conntrack event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnEvent {
    pub phase: Phase,
    /// As the client sent it (before DNAT: a Service's frontend).
    pub orig: Tuple,
    /// As the server answers (after DNAT: the chosen endpoint is its source).
    pub reply: Tuple,
    /// Client → server, if accounting is on.
    pub orig_counters: Option<Counters>,
    /// Server → client.
    pub reply_counters: Option<Counters>,
    /// The connection is over though still tracked (TCP `TIME_WAIT` or `CLOSE`).
    pub closed: bool,
}

/// One NFLOG sample: the verdict point that logged it and the connection it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSample {
    pub point: LogPoint,
    /// The connection's original tuple (from the conntrack entry when the kernel attached it,
    /// else the packet's own addresses).
    pub orig: Tuple,
    /// The reply tuple when the conntrack entry was attached.
    pub reply: Option<Tuple>,
}

/// What the kernel side delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    Conn(ConnEvent),
    Log(LogSample),
    /// Samples the kernel did not deliver: how many and why.
    Lost(LostReason, u64),
}

/// Why samples (or the flows they would have made) were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LostReason {
    /// Beyond the deny log's rate limit ([`malla_calc::policy::flowlog::DENY_LOG_LIMIT`]): the
    /// kernel counts these in the ruleset's lost chains and does not log them.
    RateLimit,
    /// The kernel could not queue them on the agent's sockets (NFLOG sequence gaps, socket
    /// overruns: `ENOBUFS`).
    Overrun,
    /// The flow history was full ([`Limits::flows`]).
    HistoryFull,
    /// The live connection table was full ([`Limits::live`]): the connection's allowing rule
    /// and end are not known.
    LiveFull,
    /// Allow samples evicted before their connection's NEW came ([`Limits::pending`]).
    PendingEvicted,
}

impl LostReason {
    /// Every reason, in order.
    pub const ALL: [LostReason; 5] = [
        LostReason::RateLimit,
        LostReason::Overrun,
        LostReason::HistoryFull,
        LostReason::LiveFull,
        LostReason::PendingEvicted,
    ];

    pub fn word(self) -> &'static str {
        match self {
            LostReason::RateLimit => "rate-limit",
            LostReason::Overrun => "overrun",
            LostReason::HistoryFull => "history-full",
            LostReason::LiveFull => "live-full",
            LostReason::PendingEvicted => "pending-evicted",
        }
    }
}

/// What one node lost in one window (`/flows/lost`): samples by reason. A lost sample is not
/// known by its connection, so only the window (`since`) filters these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lost {
    /// The window: unix seconds, `[start, end)`.
    pub start: u64,
    pub end: u64,
    #[serde(default)]
    pub node: String,
    /// The sum over `reasons`.
    pub samples: u64,
    pub reasons: std::collections::BTreeMap<LostReason, u64>,
}

/// A flow's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Allowed,
    /// Dropped by policy: no rule of the isolating policies allowed it.
    Denied,
    /// Dropped: a source address its pod may not use.
    Spoofed,
    /// Rejected: the Service has no endpoint.
    NoEndpoint,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Spoofed => "spoofed",
            Verdict::NoEndpoint => "no-endpoint",
        }
    }

    /// Reads [`Verdict::word`] back.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Verdict::Allowed,
            Verdict::Denied,
            Verdict::Spoofed,
            Verdict::NoEndpoint,
        ]
        .into_iter()
        .find(|v| v.word() == s)
    }
}

/// One end of a flow: a pod (namespace and name), a node, or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod's name, or the node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `pod`, `node` or `world`.
    pub kind: String,
    pub ip: IpAddr,
}

impl Peer {
    /// `namespace/name`, a node's name, or the address.
    pub fn label(&self) -> String {
        match (&self.namespace, &self.name) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            (None, Some(n)) => n.clone(),
            _ => self.ip.to_string(),
        }
    }
}

/// What identifies a flow in a window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowKey {
    pub src: Peer,
    pub dst: Peer,
    /// The Service the client addressed (`namespace/name`), when it addressed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The port the client addressed (a Service's port or node port, else the pod's).
    pub port: u16,
    /// `tcp`, `udp`, `sctp`, `icmp`, or the number.
    pub proto: String,
    pub verdict: Verdict,
    /// The deciding rules: `namespace/name ingress[i]` for an allow, `namespace/name ingress`
    /// for each isolating policy of a deny.
    pub policies: Vec<String>,
    /// What staged policies would have decided, per direction they change:
    /// `would-deny staged:deny-all ingress[end of tier]`, `would-allow … egress[0]`
    /// ([`STAGED_WOULD_ALLOW`], [`STAGED_WOULD_DENY`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub staged: Vec<String>,
}

/// The start of a staged verdict's text in [`FlowKey::staged`].
pub const STAGED_WOULD_ALLOW: &str = "would-allow ";
pub const STAGED_WOULD_DENY: &str = "would-deny ";

/// A flow: a key and what was seen of it in one window (or, following, one event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// The window: unix seconds, `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// The node whose agent reported it.
    #[serde(default)]
    pub node: String,
    #[serde(flatten)]
    pub key: FlowKey,
    /// The endpoint a Service connection was sent to (`ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Connections (or denied attempts) that started in the window.
    pub started: u64,
    /// Connections that ended in the window.
    pub completed: u64,
    /// Client → server, of connections that ended in the window.
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Server → client.
    pub packets_in: u64,
    pub bytes_in: u64,
}

/// The name of an IP protocol number.
pub fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Which flows a query or a follow wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// The source: `namespace/name`, a pod or node name, an address, or `namespace/` (any pod
    /// of the namespace).
    pub from: Option<String>,
    /// The destination, or the Service addressed, in the same forms.
    pub to: Option<String>,
    /// Either end's namespace.
    pub namespace: Option<String>,
    pub verdict: Option<Verdict>,
    /// A policy `namespace/name` (or a prefix of a rule: `namespace/name ingress`).
    pub policy: Option<String>,
    pub port: Option<u16>,
    /// Flows whose window ends after this (unix seconds).
    pub since: Option<u64>,
}

/// Errors reading a filter from query parameters.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("query parameter {name}: {problem}")]
    Invalid { name: String, problem: String },
}

fn peer_matches(p: &Peer, pat: &str) -> bool {
    if let Some(ns) = pat.strip_suffix('/') {
        return p.namespace.as_deref() == Some(ns);
    }
    p.ip.to_string() == pat || p.label() == pat || p.name.as_deref() == Some(pat)
}

impl Filter {
    /// Whether `f` passes.
    pub fn matches(&self, f: &Flow) -> bool {
        let k = &f.key;
        self.from.as_deref().is_none_or(|p| peer_matches(&k.src, p))
            && self.to.as_deref().is_none_or(|p| {
                peer_matches(&k.dst, p)
                    || k.service.as_deref() == Some(p)
                    || k.service
                        .as_deref()
                        .and_then(|s| s.split_once('/'))
                        .is_some_and(|(ns, n)| n == p || p.strip_suffix('/') == Some(ns))
            })
            && self.namespace.as_deref().is_none_or(|ns| {
                k.src.namespace.as_deref() == Some(ns) || k.dst.namespace.as_deref() == Some(ns)
            })
            && self.verdict.is_none_or(|v| v == k.verdict)
            && self.policy.as_deref().is_none_or(|p| {
                k.policies.iter().any(|r| r.starts_with(p))
                    || k.staged.iter().any(|r| {
                        r.strip_prefix(STAGED_WOULD_ALLOW)
                            .or_else(|| r.strip_prefix(STAGED_WOULD_DENY))
                            .is_some_and(|r| r.starts_with(p))
                    })
            })
            && self.port.is_none_or(|p| p == k.port)
            && self.since.is_none_or(|s| f.end > s)
    }

    /// Reads a filter from `name=value` pairs (a URL's query, already decoded): `from`, `to`,
    /// `namespace`, `verdict`, `policy`, `port`, `since`. Unknown names are rejected.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, FilterError> {
        let mut f = Filter::default();
        for (name, value) in pairs {
            let bad = |problem: String| FilterError::Invalid {
                name: name.to_string(),
                problem,
            };
            match name {
                "from" => f.from = Some(value.to_string()),
                "to" => f.to = Some(value.to_string()),
                "namespace" => f.namespace = Some(value.to_string()),
                "policy" => f.policy = Some(value.to_string()),
                "verdict" => {
                    f.verdict = Some(Verdict::parse(value).ok_or_else(|| {
                        bad(format!(
                            "{value:?} is not allowed, denied, spoofed or no-endpoint"
                        ))
                    })?)
                }
                "port" => f.port = Some(value.parse().map_err(|e| bad(format!("{value:?}: {e}")))?),
                "since" => {
                    f.since = Some(value.parse().map_err(|e| bad(format!("{value:?}: {e}")))?)
                }
                _ => return Err(bad("unknown parameter".into())),
            }
        }
        Ok(f)
    }

    /// Reads a filter from a URL's raw query (`from=shop%2Fweb&port=80`), decoding `%XX` and
    /// `+`: what `/flows` and `malla ui`'s `/api/flows` take.
    pub fn from_query(query: &str) -> Result<Self, FilterError> {
        let pairs: Vec<(String, String)> = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (n, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(n), percent_decode(v))
            })
            .collect();
        Self::from_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())))
    }

    /// The filter as a URL query, `?name=value&…` (empty when it matches everything):
    /// [`Filter::from_query`] reads it back.
    pub fn to_query(&self) -> String {
        let pairs: Vec<String> = self
            .to_pairs()
            .iter()
            .map(|(n, v)| format!("{n}={}", percent_encode(v)))
            .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    /// The filter as `name=value` pairs ([`Filter::from_pairs`] reads them back).
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        let mut push = |n, x: Option<String>| {
            if let Some(x) = x {
                v.push((n, x));
            }
        };
        push("from", self.from.clone());
        push("to", self.to.clone());
        push("namespace", self.namespace.clone());
        push("verdict", self.verdict.map(|v| v.word().to_string()));
        push("policy", self.policy.clone());
        push("port", self.port.map(|p| p.to_string()));
        push("since", self.since.map(|p| p.to_string()));
        v
    }
}

/// Decodes `%XX` and `+` in a query component (a bad escape is kept as it is).
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query component: everything but letters, digits and `-_.~/:` as `%XX`.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~/:".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_read_back_and_reject_nonsense_naming_the_parameter() {
        let f = Filter {
            from: Some("shop/client".into()),
            verdict: Some(Verdict::Denied),
            port: Some(80),
            since: Some(17),
            ..Filter::default()
        };
        let pairs = f.to_pairs();
        let back = Filter::from_pairs(pairs.iter().map(|(n, v)| (*n, v.as_str()))).unwrap();
        assert_eq!(back, f);
        let e = Filter::from_pairs([("port", "http")]).unwrap_err();
        assert!(e.to_string().contains("port"), "{e}");
        let e = Filter::from_pairs([("verdict", "maybe")]).unwrap_err();
        assert!(e.to_string().contains("verdict"), "{e}");
        assert!(Filter::from_pairs([("colour", "red")]).is_err());
        let f = Filter {
            from: Some("shop/a b".into()),
            policy: Some("shop/p ingress".into()),
            port: Some(80),
            ..Filter::default()
        };
        assert_eq!(
            f.to_query(),
            "?from=shop/a%20b&policy=shop/p%20ingress&port=80"
        );
        assert_eq!(Filter::from_query(&f.to_query()[1..]).unwrap(), f);
        assert_eq!(
            Filter::from_query("to=a%2Fb+c&x=%zz")
                .unwrap_err()
                .to_string(),
            "query parameter x: unknown parameter"
        );
        assert_eq!(
            Filter::from_query("to=a%2Fb+c").unwrap().to,
            Some("a/b c".into())
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(Filter::default().to_query(), "");
    }
}
