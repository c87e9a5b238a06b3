//! Staged policies: a policy of any kind evaluated on real traffic but never enforced, so a
//! user sees what it would do before enforcing it (Calico's `StagedNetworkPolicy`,
//! `StagedGlobalNetworkPolicy` and `StagedKubernetesNetworkPolicy`, `projectcalico.org/v3`;
//! and Malla's `StagedClusterNetworkPolicy`, `malla.dev/v1alpha1`, for the upstream
//! ClusterNetworkPolicy, which has no staged form of its own).
//!
//! A manifest's `spec` is the enforced kind's spec plus `stagedAction`:
//! - `Set` (the default): the policy as it would be if applied: it replaces the enforced policy
//!   of the same kind and name, or joins as a new one;
//! - `Delete`: the enforced policy of the same kind and name as if deleted;
//! - `Ignore` and `Learn` (Calico's, for its recommendation engine): stored, not evaluated.
//!
//! The calculation builds the *pending* view (the enforced policies with every staged one
//! applied) and evaluates it beside the enforced one; see `malla_calc::policy::staged`.

use serde::{Deserialize, Serialize};

use crate::calico::{CalicoNetworkPolicy, FieldError, GlobalNetworkPolicy};
use crate::cnp::ClusterNetworkPolicy;
use crate::policy::NetworkPolicy;

/// What a staged policy does to the pending view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StagedAction {
    #[default]
    Set,
    Delete,
    Ignore,
    Learn,
}

/// The policy a staged one stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Staged {
    GlobalNetworkPolicy(GlobalNetworkPolicy),
    /// Calico's namespaced NetworkPolicy.
    NetworkPolicy(CalicoNetworkPolicy),
    KubernetesNetworkPolicy(NetworkPolicy),
    ClusterNetworkPolicy(ClusterNetworkPolicy),
}

/// A staged policy, as stored under [`crate::keys::STAGED_POLICIES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedPolicy {
    #[serde(default)]
    pub staged_action: StagedAction,
    pub policy: Staged,
}

/// The manifest kinds of staged policies and the API versions they come in.
pub const KINDS: &[(&str, &str)] = &[
    ("StagedGlobalNetworkPolicy", "projectcalico.org/v3"),
    ("StagedNetworkPolicy", "projectcalico.org/v3"),
    ("StagedKubernetesNetworkPolicy", "projectcalico.org/v3"),
    ("StagedClusterNetworkPolicy", "malla.dev/v1alpha1"),
];

/// The prefix staged policies carry in names shown by traces, flows and counters (Calico's).
pub const NAME_PREFIX: &str = "staged:";

impl StagedPolicy {
    /// The staged kind's manifest name (`StagedGlobalNetworkPolicy`…).
    pub fn kind(&self) -> &'static str {
        match &self.policy {
            Staged::GlobalNetworkPolicy(_) => "StagedGlobalNetworkPolicy",
            Staged::NetworkPolicy(_) => "StagedNetworkPolicy",
            Staged::KubernetesNetworkPolicy(_) => "StagedKubernetesNetworkPolicy",
            Staged::ClusterNetworkPolicy(_) => "StagedClusterNetworkPolicy",
        }
    }

    /// The namespace, for namespaced kinds.
    pub fn namespace(&self) -> Option<&str> {
        match &self.policy {
            Staged::NetworkPolicy(p) => Some(&p.namespace),
            Staged::KubernetesNetworkPolicy(p) => Some(&p.namespace),
            _ => None,
        }
    }

    pub fn name(&self) -> &str {
        match &self.policy {
            Staged::GlobalNetworkPolicy(p) => &p.name,
            Staged::NetworkPolicy(p) => &p.name,
            Staged::KubernetesNetworkPolicy(p) => &p.name,
            Staged::ClusterNetworkPolicy(p) => &p.name,
        }
    }

    /// The datastore key: `/malla/stagedpolicies/<kind>/[<namespace>/]<name>`.
    pub fn key(&self) -> String {
        let kind = self.kind().to_ascii_lowercase();
        match self.namespace() {
            Some(ns) => format!(
                "{}{kind}/{ns}/{}",
                crate::keys::STAGED_POLICIES,
                self.name()
            ),
            None => format!("{}{kind}/{}", crate::keys::STAGED_POLICIES, self.name()),
        }
    }

    /// `kind/[namespace/]name`, as `kubectl` prints it.
    pub fn id(&self) -> String {
        let kind = self.kind().to_ascii_lowercase();
        match self.namespace() {
            Some(ns) => format!("{kind}/{ns}/{}", self.name()),
            None => format!("{kind}/{}", self.name()),
        }
    }

    /// The enforced kind's checks.
    pub fn validate(&self) -> Result<(), FieldError> {
        match &self.policy {
            Staged::GlobalNetworkPolicy(p) => p.validate(),
            Staged::NetworkPolicy(p) => p.validate(),
            Staged::KubernetesNetworkPolicy(p) => p
                .validate()
                .map_err(|(field, reason)| FieldError { field, reason }),
            Staged::ClusterNetworkPolicy(p) => p
                .validate()
                .map_err(|(field, reason)| FieldError { field, reason }),
        }
    }

    /// Whether the pending view reads it (`Ignore` and `Learn` are only stored).
    pub fn evaluated(&self) -> bool {
        matches!(self.staged_action, StagedAction::Set | StagedAction::Delete)
    }
}

/// Splits `stagedAction` off a staged manifest's `spec`: the manifest as the enforced kind
/// would be written (its `kind` and `apiVersion` replaced), and the action.
pub fn unstage(
    v: &serde_json::Value,
    enforced_kind: &str,
    enforced_api: &str,
) -> Result<(serde_json::Value, StagedAction), FieldError> {
    let mut v = v.clone();
    let mut action = StagedAction::Set;
    if let Some(spec) = v.get_mut("spec").and_then(|s| s.as_object_mut()) {
        if let Some(a) = spec.remove("stagedAction") {
            action = serde_json::from_value(a.clone()).map_err(|_| FieldError {
                field: "spec.stagedAction".into(),
                reason: format!("{a} is not one of Set, Delete, Ignore, Learn"),
            })?;
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("kind".into(), enforced_kind.into());
        o.insert("apiVersion".into(), enforced_api.into());
    }
    Ok((v, action))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids_name_kind_namespace_and_name() {
        let p = StagedPolicy {
            staged_action: StagedAction::Set,
            policy: Staged::KubernetesNetworkPolicy(NetworkPolicy {
                namespace: "shop".into(),
                name: "deny".into(),
                ..NetworkPolicy::default()
            }),
        };
        assert_eq!(
            p.key(),
            "/malla/stagedpolicies/stagedkubernetesnetworkpolicy/shop/deny"
        );
        assert_eq!(p.id(), "stagedkubernetesnetworkpolicy/shop/deny");
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<StagedPolicy>(&json).unwrap(), p);
    }

    #[test]
    fn unstage_takes_the_action_and_names_a_bad_one() {
        let v = serde_json::json!({"apiVersion": "projectcalico.org/v3", "kind": "StagedGlobalNetworkPolicy",
            "metadata": {"name": "a"}, "spec": {"stagedAction": "Delete", "selector": "all()"}});
        let (u, a) = unstage(&v, "GlobalNetworkPolicy", "projectcalico.org/v3").unwrap();
        assert_eq!(a, StagedAction::Delete);
        assert_eq!(u["kind"], "GlobalNetworkPolicy");
        assert!(u["spec"].get("stagedAction").is_none());
        let bad = serde_json::json!({"spec": {"stagedAction": "Enforce"}});
        let e = unstage(&bad, "GlobalNetworkPolicy", "projectcalico.org/v3").unwrap_err();
        assert_eq!(e.field, "spec.stagedAction");
    }
}
