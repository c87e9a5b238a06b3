//! NetworkPolicy: the semantics, the compiler and the nftables rendering.
//!
//! - [`reference`]: a direct reading of the `networking.k8s.io/v1` semantics, the oracle.
//! - [`explain`]: the same reading, reporting which policies select each end and which rule
//!   allowed the connection (for a trace command).
//! - [`compile`](compile::compile): one node's [`PolicyProgram`] — per local pod, its ingress
//!   and egress rules over shared address sets — with a small interpreter
//!   ([`PolicyProgram::allows`]).
//! - [`incremental`]: the program kept current change by change ([`PolicyIndex`]): a full
//!   compile only at start-up, then each pod, policy or namespace change costs the work it
//!   touches and yields a backend-neutral [`PolicyDelta`].
//! - [`render`]: the program as sets, verdict maps and chains of the `inet malla` table.
//! - [`tiers`]: Calico's policies in their tiers, with NetworkPolicy in the `default` tier, for
//!   pods some Calico policy applies to (its own reference evaluator and rendering).
//! - [`staged`]: staged policies' pending view, evaluated beside the enforced one and logged,
//!   never enforced.
//! - [`tiermembers`]: the same for the tier chains' selector sets, when tiered policy exists.
//! - [`members`]: the agent's policy node ([`PolicyNode`]) and the member path: a change that
//!   only moves set members planned as element changes of the applied table.
//!
//! Policies that fail [`NetworkPolicy::validate`] are ignored everywhere: the API server would
//! have rejected them, so they do not exist.

pub mod addrs;
pub mod compile;
pub mod dns;
pub mod explain;
pub mod flowlog;
pub mod incremental;
pub mod members;
pub mod reference;
pub mod render;
pub mod staged;
pub mod tiermembers;
pub mod tiers;

#[cfg(test)]
mod nfteval;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;

use malla_api::policy::NetworkPolicy;
use malla_api::service::Protocol;
use malla_api::{ContainerPort, Namespace};
use serde::Serialize;

pub use compile::{compile, CompiledRule, EndpointProgram, PeerSet, PolicyProgram, PortMatch};
pub use explain::{explain, DirectionTrace, Explanation, Verdict};
pub use incremental::{PolicyDelta, PolicyIndex};
pub use members::{plan_member_changes, PolicyInputs, PolicyNode};
pub use render::{render_endpoint_to_host, render_policy};

/// A pod as policy sees it: identity, labels, addresses, node, declared ports, and the name of
/// its host-side interface (the endpoint chains are named after it). Borrowed from the cluster
/// view where it can be ([`crate::routes::policy_pods`]), so that building the pods of a large
/// cluster on every change copies no labels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct PolicyPod<'a> {
    pub namespace: Cow<'a, str>,
    pub name: Cow<'a, str>,
    pub labels: Cow<'a, BTreeMap<String, String>>,
    pub ips: Vec<IpAddr>,
    pub node: Cow<'a, str>,
    pub ports: Cow<'a, [ContainerPort]>,
    /// Host-side veth name; only needed for local pods.
    pub host_ifname: Cow<'a, str>,
}

impl PolicyPod<'_> {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The numbers a named port resolves to on this pod for `proto` (normally zero or one).
    pub fn named_port(&self, name: &str, proto: Protocol) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .ports
            .iter()
            .filter(|p| p.protocol == proto && p.name.as_deref() == Some(name))
            .map(|p| p.port)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// One end of a connection: an address, and the pod it belongs to if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<'a> {
    pub pod: Option<&'a PolicyPod<'a>>,
    pub ip: IpAddr,
}

impl<'a> Endpoint<'a> {
    /// The endpoint for `ip`: the pod owning it, or a bare address.
    pub fn resolve(pods: &'a [PolicyPod<'a>], ip: IpAddr) -> Self {
        Self {
            pod: pods.iter().find(|p| p.ips.contains(&ip)),
            ip,
        }
    }
}

/// A new connection `src → dst` on `port/proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection<'a> {
    pub src: Endpoint<'a>,
    pub dst: Endpoint<'a>,
    pub port: u16,
    pub proto: Protocol,
}

impl Connection<'_> {
    /// The endpoint whose policies decide direction `dir` (the source for egress, the
    /// destination for ingress), and the other end.
    pub fn subject_and_peer(&self, dir: Direction) -> (&Endpoint<'_>, &Endpoint<'_>) {
        match dir {
            Direction::Egress => (&self.src, &self.dst),
            Direction::Ingress => (&self.dst, &self.src),
        }
    }
}

/// Ingress (to a pod) or egress (from a pod).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The labels of namespace `name` (none if it is unknown).
pub(crate) fn namespace_labels<'a>(
    namespaces: &'a [Namespace],
    name: &str,
) -> &'a BTreeMap<String, String> {
    namespaces
        .iter()
        .find(|n| n.name == name)
        .map_or(&NO_LABELS, |n| &n.labels)
}

/// The policies that exist (pass validation).
pub(crate) fn valid(policies: &[NetworkPolicy]) -> impl Iterator<Item = &NetworkPolicy> {
    policies.iter().filter(|p| p.validate().is_ok())
}

/// FNV-1a 64: stable across releases and platforms, unlike std's hasher.
pub(crate) fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
