//! The reference evaluator: NetworkPolicy semantics written straight from the API
//! documentation, with no cleverness, as the oracle the compiler is tested against.
//!
//! A connection `src → dst` on `port/proto` is allowed when both hold:
//! - egress: `src` is not a pod, or no policy selecting it has type `Egress`, or some egress rule
//!   of one of those policies allows it;
//! - ingress: likewise for `dst` with `Ingress`.
//!
//! A rule allows when one of its peers matches the other end (no peers: every end) and one of its
//! ports matches (no ports: every port). A peer is a pod selector in the policy's namespace, a
//! namespace selector (every pod there), both (pods matching both), or an `ipBlock` (the address
//! inside `cidr` and outside every `except`, pod or not). A port matches by protocol and number
//! or range; a named port is resolved against the destination pod's container ports, so it never
//! matches a destination that is not a pod.

use malla_api::policy::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use malla_api::service::{Protocol, TargetPort};
use malla_api::Namespace;

use super::{namespace_labels, valid, Connection, Direction, Endpoint, PolicyPod};

/// Whether `policy` applies to `pod` (same namespace, pod selector matches).
pub fn selects(policy: &NetworkPolicy, pod: &PolicyPod) -> bool {
    policy.namespace == pod.namespace && policy.spec.pod_selector.matches(&pod.labels)
}

/// Whether `policy` has `dir` among its (defaulted) policy types.
pub fn has_type(policy: &NetworkPolicy, dir: Direction) -> bool {
    let t = policy.effective_policy_types();
    match dir {
        Direction::Ingress => t.ingress,
        Direction::Egress => t.egress,
    }
}

/// The valid policies isolating `pod` in direction `dir`.
pub fn isolating<'a>(
    policies: &'a [NetworkPolicy],
    pod: &PolicyPod,
    dir: Direction,
) -> Vec<&'a NetworkPolicy> {
    valid(policies)
        .filter(|p| selects(p, pod) && has_type(p, dir))
        .collect()
}

/// The rules of `policy` in direction `dir`, as (peers, ports).
pub fn rules(
    policy: &NetworkPolicy,
    dir: Direction,
) -> Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> {
    match dir {
        Direction::Ingress => policy
            .spec
            .ingress
            .iter()
            .map(|r| (r.from.as_slice(), r.ports.as_slice()))
            .collect(),
        Direction::Egress => policy
            .spec
            .egress
            .iter()
            .map(|r| (r.to.as_slice(), r.ports.as_slice()))
            .collect(),
    }
}

/// Whether `peer` (of a policy in namespace `policy_ns`) matches the endpoint `e`.
pub fn peer_matches(
    policy_ns: &str,
    peer: &NetworkPolicyPeer,
    namespaces: &[Namespace],
    e: &Endpoint,
) -> bool {
    if let Some(block) = &peer.ip_block {
        return block.contains(&e.ip);
    }
    let Some(pod) = e.pod else {
        return false;
    };
    let ns_ok = match &peer.namespace_selector {
        None => pod.namespace == policy_ns,
        Some(s) => s.matches(namespace_labels(namespaces, &pod.namespace)),
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|s| s.matches(&pod.labels));
    ns_ok && pod_ok
}

/// Whether `pp` matches `port/proto` towards the destination `dst`.
pub fn port_matches(pp: &NetworkPolicyPort, port: u16, proto: Protocol, dst: &Endpoint) -> bool {
    if pp.protocol != proto {
        return false;
    }
    match &pp.port {
        None => true,
        Some(TargetPort::Number(n)) => match pp.end_port {
            None => port == *n,
            Some(end) => *n <= port && port <= end,
        },
        Some(TargetPort::Name(name)) => dst
            .pod
            .is_some_and(|p| p.named_port(name, proto).contains(&port)),
    }
}

/// Whether a rule (`peers`, `ports`) of a policy in `policy_ns`, in direction `dir`, allows
/// the connection.
pub fn rule_allows(
    policy_ns: &str,
    (peers, ports): (&[NetworkPolicyPeer], &[NetworkPolicyPort]),
    namespaces: &[Namespace],
    dir: Direction,
    c: &Connection,
) -> bool {
    let (_, other) = c.subject_and_peer(dir);
    (peers.is_empty()
        || peers
            .iter()
            .any(|p| peer_matches(policy_ns, p, namespaces, other)))
        && (ports.is_empty()
            || ports
                .iter()
                .any(|pp| port_matches(pp, c.port, c.proto, &c.dst)))
}

/// Whether the policies of the connection's subject in direction `dir` (the source for egress,
/// the destination for ingress) let it through.
pub fn direction_allowed(
    policies: &[NetworkPolicy],
    namespaces: &[Namespace],
    dir: Direction,
    c: &Connection,
) -> bool {
    let (subject, _) = c.subject_and_peer(dir);
    let Some(pod) = subject.pod else {
        return true;
    };
    let pols = isolating(policies, pod, dir);
    if pols.is_empty() {
        return true;
    }
    pols.iter().any(|p| {
        rules(p, dir)
            .into_iter()
            .any(|r| rule_allows(&p.namespace, r, namespaces, dir, c))
    })
}

/// The verdict for a new connection.
pub fn allowed(policies: &[NetworkPolicy], namespaces: &[Namespace], c: &Connection) -> bool {
    direction_allowed(policies, namespaces, Direction::Egress, c)
        && direction_allowed(policies, namespaces, Direction::Ingress, c)
}
