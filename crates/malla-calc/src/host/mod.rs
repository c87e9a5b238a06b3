//! Host endpoints: Calico's `HostEndpoint` and `GlobalNetworkPolicy` protecting a node's own
//! interfaces, with failsafe rules that keep the control plane reachable whatever policy says.
//!
//! - [`CalicoView`]: Calico's objects as the calculation reads them; [`local_host_endpoints`]
//!   the ones of this node (with the automatic all-interfaces one when the cluster asks).
//! - [`reference`]: the semantics written straight from Calico's documentation, the oracle.
//! - [`render`]: the base chains and per-endpoint tier chains of the `inet malla` table.
//!
//! The stages, as Calico has them ([`Stage`]):
//! - **pre-DNAT** (prerouting, before the services' DNAT): ingress policies with `preDNAT`, for
//!   everything arriving through a host endpoint, whatever its destination. No default drop: a
//!   packet no rule decides goes on.
//! - **input** / **output**: traffic to and from the node's own processes through a host
//!   endpoint. Policies without `preDNAT`; a tier whose policies apply but whose rules do not
//!   decide drops (Calico's end-of-tier drop); when no policy applies at all, the endpoint's
//!   profiles decide (`projectcalico-default-allow` allows, none denies).
//! - **forward**: traffic routed through the node, in through one host endpoint (ingress) and
//!   out through another (egress), pods' traffic included; only `applyOnForward` policies, and
//!   when none applies the traffic is allowed.
//!
//! Never subject to host endpoint policy: loopback, pods' traffic to their own node (that is the
//! endpoint-to-host action's), the node's traffic to its own pods, established connections,
//! the failsafe ports ([`malla_api::ClusterConfig::failsafe_inbound`] and `…_outbound`), and in
//! VXLAN mode the overlay's packets between nodes (Calico allows them the same way).

pub mod reference;
pub mod render;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use malla_api::calico::{
    order_key, GlobalNetworkPolicy, GlobalNetworkSet, HostEndpoint, HostEndpointSpec, Tier,
    DEFAULT_ALLOW_PROFILE,
};
use malla_api::selector::Selector;

pub use render::render_host_endpoints;

/// Calico's objects, as the mirror keeps them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CalicoView {
    pub tiers: Vec<Tier>,
    pub policies: Vec<GlobalNetworkPolicy>,
    pub host_endpoints: Vec<HostEndpoint>,
    pub network_sets: Vec<GlobalNetworkSet>,
    /// Calico's namespaced NetworkPolicies.
    pub network_policies: Vec<malla_api::calico::CalicoNetworkPolicy>,
    /// Upstream ClusterNetworkPolicies (Admin and Baseline tiers).
    pub cluster_policies: Vec<malla_api::cnp::ClusterNetworkPolicy>,
    /// Staged policies of every kind: evaluated beside the enforced ones, never enforced.
    pub staged: Vec<malla_api::staged::StagedPolicy>,
}

impl CalicoView {
    /// Whether any valid policy has a rule whose sides select endpoints: then the addresses of
    /// pods feed the rendered sets, and a pod change needs the node rendered again.
    pub fn reads_endpoints(&self) -> bool {
        self.policies.iter().any(|p| {
            p.spec
                .ingress
                .iter()
                .chain(&p.spec.egress)
                .any(|r| r.source.selects_endpoints() || r.destination.selects_endpoints())
        })
    }

    /// Whether any Calico policy could apply to pods (a global one not pre-DNAT, or a
    /// namespaced one): then pods' chains are rendered with tiers, with the whole node.
    pub fn applies_to_workloads(&self) -> bool {
        !self.network_policies.is_empty()
            || !self.cluster_policies.is_empty()
            || self.staged.iter().any(|p| p.evaluated())
            || self.policies.iter().any(|p| !p.spec.pre_dnat)
    }
}

/// Where a packet meets host endpoint policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Arriving through a host endpoint, before DNAT (pre-DNAT policies, ingress).
    PreDnat,
    /// To the node's own processes (ingress).
    Input,
    /// From the node's own processes (egress).
    Output,
    /// Routed through the node, the interface it came in on (ingress, `applyOnForward`).
    ForwardIn,
    /// Routed through the node, the interface it leaves by (egress, `applyOnForward`).
    ForwardOut,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::PreDnat,
        Stage::Input,
        Stage::Output,
        Stage::ForwardIn,
        Stage::ForwardOut,
    ];

    /// Whether the stage applies the policies' ingress rules (else egress).
    pub fn ingress(self) -> bool {
        matches!(self, Stage::PreDnat | Stage::Input | Stage::ForwardIn)
    }

    /// Whether `policy` takes part in this stage (its types and flags).
    pub fn takes(self, policy: &GlobalNetworkPolicy) -> bool {
        let (ingress, egress) = policy.effective_types();
        let s = &policy.spec;
        match self {
            Stage::PreDnat => s.pre_dnat && ingress,
            Stage::Input => !s.pre_dnat && ingress,
            Stage::Output => !s.pre_dnat && egress,
            Stage::ForwardIn => !s.pre_dnat && s.apply_on_forward && ingress,
            Stage::ForwardOut => !s.pre_dnat && s.apply_on_forward && egress,
        }
    }

    /// A short name for chain names.
    pub fn short(self) -> &'static str {
        match self {
            Stage::PreDnat => "pre",
            Stage::Input => "in",
            Stage::Output => "out",
            Stage::ForwardIn => "fwi",
            Stage::ForwardOut => "fwo",
        }
    }
}

/// This node's host endpoints: those naming it, and with `auto` its automatic all-interfaces
/// endpoint (`<node>-auto`), unless one of its own already covers every interface. Invalid
/// ones are left out (the API server would have refused them). Sorted by name.
pub fn local_host_endpoints(view: &CalicoView, me: &str, auto: bool) -> Vec<HostEndpoint> {
    let mut v: Vec<HostEndpoint> = view
        .host_endpoints
        .iter()
        .filter(|h| h.spec.node == me && h.validate().is_ok())
        .cloned()
        .collect();
    if auto && !v.iter().any(HostEndpoint::all_interfaces) {
        v.push(auto_host_endpoint(me));
    }
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The automatic host endpoint of `node`.
pub fn auto_host_endpoint(node: &str) -> HostEndpoint {
    HostEndpoint {
        name: format!("{node}-auto"),
        labels: BTreeMap::from([
            ("malla.dev/host-endpoint".to_string(), "auto".to_string()),
            ("kubernetes.io/hostname".to_string(), node.to_string()),
        ]),
        spec: HostEndpointSpec {
            node: node.to_string(),
            interface_name: Some("*".into()),
            profiles: vec![DEFAULT_ALLOW_PROFILE.into()],
            ..HostEndpointSpec::default()
        },
    }
}

/// Whether the endpoint's profiles allow what no policy decides.
pub fn profile_allows(hep: &HostEndpoint) -> bool {
    hep.spec.profiles.iter().any(|p| p == DEFAULT_ALLOW_PROFILE)
}

/// One tier as an endpoint meets it: its name, whether undecided traffic passes on (the
/// tier's `defaultAction: Pass`) rather than being denied, and the policies that apply, in
/// order.
#[derive(Debug, Clone)]
pub struct TierGroup<'a> {
    pub name: String,
    pub pass_by_default: bool,
    pub policies: Vec<&'a GlobalNetworkPolicy>,
}

/// The tier of ClusterNetworkPolicy's `Admin` policies (Calico's name and order), which passes
/// what it does not decide.
pub const ADMIN_TIER: &str = "kube-admin";
pub const ADMIN_TIER_ORDER: f64 = 1_000.0;
/// The tier of ClusterNetworkPolicy's `Baseline` policies, after the default tier.
pub const BASELINE_TIER: &str = "kube-baseline";
pub const BASELINE_TIER_ORDER: f64 = 10_000_000.0;
/// The `default` tier's order unless a Tier object says otherwise (Calico's since 3.30).
pub const DEFAULT_TIER_ORDER: f64 = 1_000_000.0;

/// The tiers' order and default actions: tiers by order (absent last) then name; `default`,
/// `kube-admin` and `kube-baseline` always exist, at Calico's orders unless a Tier object says
/// otherwise. A tier not in the map does not exist
/// (its policies apply nowhere, as Calico refuses to create them).
pub fn tier_table(view: &CalicoView) -> BTreeMap<&str, (Option<malla_api::calico::Order>, bool)> {
    let mut t: BTreeMap<&str, (Option<malla_api::calico::Order>, bool)> = view
        .tiers
        .iter()
        .map(|t| (t.name.as_str(), (t.order, t.passes_by_default())))
        .collect();
    t.entry(malla_api::calico::DEFAULT_TIER)
        .or_insert((Some(malla_api::calico::Order(DEFAULT_TIER_ORDER)), false));
    t.entry(ADMIN_TIER)
        .or_insert((Some(malla_api::calico::Order(ADMIN_TIER_ORDER)), true));
    t.entry(BASELINE_TIER)
        .or_insert((Some(malla_api::calico::Order(BASELINE_TIER_ORDER)), true));
    t
}

/// Groups policies by tier in evaluation order (tiers as [`tier_table`], policies within a
/// tier by order, absent last, then name).
pub fn group_by_tier<'a>(
    view: &CalicoView,
    policies: impl IntoIterator<Item = &'a GlobalNetworkPolicy>,
) -> Vec<TierGroup<'a>> {
    let table = tier_table(view);
    let mut by_tier: BTreeMap<&str, Vec<&'a GlobalNetworkPolicy>> = BTreeMap::new();
    for p in policies {
        if let Some((name, _)) = table.get_key_value(p.tier()) {
            by_tier.entry(name).or_default().push(p);
        }
    }
    let mut tiers: Vec<TierGroup<'a>> = by_tier
        .into_iter()
        .map(|(t, mut ps)| {
            ps.sort_by_key(|p| order_key(p.spec.order, &p.name));
            TierGroup {
                name: t.to_string(),
                pass_by_default: table[t].1,
                policies: ps,
            }
        })
        .collect();
    tiers.sort_by_key(|g| order_key(table[g.name.as_str()].0, &g.name));
    tiers
}

/// The valid policies selecting `hep` in `stage`, grouped by tier in evaluation order.
pub fn tiers_for<'a>(view: &'a CalicoView, hep: &HostEndpoint, stage: Stage) -> Vec<TierGroup<'a>> {
    let selected = view.policies.iter().filter(|p| {
        if p.validate().is_err() || !stage.takes(p) {
            return false;
        }
        let Ok(sel) = p.selector() else { return false };
        if !sel.matches(&hep.labels, false) {
            return false;
        }
        // A namespace selector picks namespaced endpoints: never a host endpoint, unless it
        // is `global()`.
        match &p.spec.namespace_selector {
            Some(ns) => Selector::parse(ns).ok() == Some(Selector::Global),
            None => true,
        }
    });
    group_by_tier(view, selected)
}

/// Something rule selectors can match: labels, whether it is namespaced (and its namespace's
/// labels), and its addresses.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub labels: BTreeMap<String, String>,
    /// The namespace's labels for a namespaced thing (a pod), None for a global one.
    pub namespace: Option<BTreeMap<String, String>>,
    /// The namespace's name for a namespaced thing.
    pub ns_name: Option<String>,
    pub nets: Vec<IpNet>,
}

/// Everything rule selectors can match in the cluster: pods (namespaced, with Calico's
/// `projectcalico.org/namespace` label), host endpoints (their expected addresses) and global
/// network sets (their networks).
pub fn labelled(view: &crate::routes::ClusterView) -> Vec<Labelled> {
    let mut out = Vec::new();
    for pod in crate::routes::policy_pods(view) {
        out.push(pod_labelled(&pod, &view.namespaces));
    }
    out.extend(labelled_others(view));
    out
}

/// A pod as rule selectors see it (see [`labelled`]).
pub(crate) fn pod_labelled(
    pod: &crate::policy::PolicyPod,
    namespaces: &[malla_api::Namespace],
) -> Labelled {
    let ns = crate::policy::namespace_labels(namespaces, &pod.namespace).clone();
    let mut labels = pod.labels.clone().into_owned();
    labels.insert(
        "projectcalico.org/namespace".into(),
        pod.namespace.to_string(),
    );
    Labelled {
        labels,
        namespace: Some(ns),
        ns_name: Some(pod.namespace.to_string()),
        nets: pod.ips.iter().map(|ip| IpNet::from(*ip)).collect(),
    }
}

/// What rule selectors can match besides pods: host endpoints and network sets (see
/// [`labelled`]).
pub(crate) fn labelled_others(view: &crate::routes::ClusterView) -> Vec<Labelled> {
    let mut out = Vec::new();
    let mut heps: Vec<HostEndpoint> = view.calico.host_endpoints.clone();
    if view.config.auto_host_endpoints {
        for n in &view.nodes {
            if !heps
                .iter()
                .any(|h| h.spec.node == n.name && h.all_interfaces())
            {
                let mut h = auto_host_endpoint(&n.name);
                h.spec.expected_ips = n
                    .underlay_ipv4
                    .map(IpAddr::V4)
                    .into_iter()
                    .chain(n.underlay_ipv6.map(IpAddr::V6))
                    .collect();
                heps.push(h);
            }
        }
    }
    for h in heps {
        out.push(Labelled {
            labels: h.labels,
            namespace: None,
            ns_name: None,
            nets: h.spec.expected_ips.into_iter().map(IpNet::from).collect(),
        });
    }
    for s in &view.calico.network_sets {
        out.push(Labelled {
            labels: s.labels.clone(),
            namespace: None,
            ns_name: None,
            nets: s.spec.nets.clone(),
        });
    }
    out
}

/// Whether `e` is picked by a rule side's `selector` (or `notSelector`) `sel` together with
/// its `namespaceSelector` `ns`. A namespace selector picks namespaced things whose namespace
/// matches it; `global()` picks the global ones (host endpoints, global network sets). Without
/// one, a namespaced policy's rule (`scope`: its namespace) picks only in its namespace.
pub fn picks(
    sel: Option<&Selector>,
    ns: Option<&Selector>,
    e: &Labelled,
    scope: Option<&str>,
) -> bool {
    let ns_ok = match (ns, &e.namespace) {
        (None, _) if scope.is_some() => e.ns_name.as_deref() == scope,
        (None, _) => true,
        (Some(Selector::Global), None) => true,
        (Some(_), None) => false,
        (Some(n), Some(labels)) => n.matches(labels, true),
    };
    let sel_ok = sel.is_none_or(|s| s.matches(&e.labels, e.namespace.is_some()));
    ns_ok && sel_ok
}
