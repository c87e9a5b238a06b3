//! Manifests: YAML files of Kubernetes objects, several documents each, every one decoded
//! strictly before any is used, so one bad document means none is applied. Errors name the
//! document (index, kind, namespace/name) and the field.

use serde::Deserialize;
use serde_json::Value;

use super::{read, FieldError, ServiceSpec, SliceVersion, Strictness};
use crate::policy::NetworkPolicy;
use crate::service::EndpointSlice;
use crate::{Namespace, Pod};

/// The kinds a manifest may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    Service(ServiceSpec),
    EndpointSlice(EndpointSlice),
    NetworkPolicy(NetworkPolicy),
    /// A `projectcalico.org/v3` object.
    Calico(crate::calico::CalicoObject),
}

/// One decoded document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// 1-based position in the file.
    pub index: usize,
    /// `Kind "namespace/name"` (or `Kind "name"`), for messages.
    pub what: String,
    pub object: Object,
}

/// A manifest that cannot be used: `document 2 (Pod "shop/web"): spec.nodename: unknown field …`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.text())]
pub struct ManifestError {
    pub index: Option<usize>,
    pub what: Option<String>,
    pub field: Option<String>,
    pub reason: String,
}

impl ManifestError {
    fn text(&self) -> String {
        let mut out = String::new();
        if let Some(i) = self.index {
            out.push_str(&format!("document {i}"));
            if let Some(w) = &self.what {
                out.push_str(&format!(" ({w})"));
            }
            out.push_str(": ");
        }
        if let Some(f) = &self.field {
            out.push_str(f);
            out.push_str(": ");
        }
        out.push_str(&self.reason);
        out
    }

    /// An error about `field` of a decoded document (for checks callers add).
    pub fn at(doc: &Document, field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            index: Some(doc.index),
            what: Some(doc.what.clone()),
            field: Some(field.into()),
            reason: reason.into(),
        }
    }
}

/// The kinds, their API versions and how each is decoded.
/// The API version of a staged kind.
fn staged_api(kind: &str) -> Option<&'static &'static str> {
    crate::staged::KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, api)| api)
}

/// Decodes a staged policy: its spec without `stagedAction` is the enforced kind's, read the
/// enforced kind's way (same strictness, same field names in errors).
fn staged(kind: &str, v: &Value) -> Result<crate::staged::StagedPolicy, crate::calico::FieldError> {
    use crate::calico::CalicoObject;
    use crate::staged::{unstage, Staged, StagedPolicy};
    let (enforced_kind, api) = match kind {
        "StagedKubernetesNetworkPolicy" => ("NetworkPolicy", "networking.k8s.io/v1"),
        "StagedClusterNetworkPolicy" => {
            ("ClusterNetworkPolicy", "policy.networking.k8s.io/v1alpha2")
        }
        "StagedNetworkPolicy" => ("NetworkPolicy", "projectcalico.org/v3"),
        _ => ("GlobalNetworkPolicy", "projectcalico.org/v3"),
    };
    let (plain, staged_action) = unstage(v, enforced_kind, api)?;
    let policy = if kind == "StagedKubernetesNetworkPolicy" {
        Staged::KubernetesNetworkPolicy(read::network_policy(plain, Strictness::Strict).map_err(
            |e| crate::calico::FieldError {
                field: e.path,
                reason: e.reason,
            },
        )?)
    } else {
        match CalicoObject::from_manifest(enforced_kind, &plain)? {
            CalicoObject::GlobalNetworkPolicy(p) => Staged::GlobalNetworkPolicy(p),
            CalicoObject::NetworkPolicy(p) => Staged::NetworkPolicy(p),
            CalicoObject::ClusterNetworkPolicy(p) => Staged::ClusterNetworkPolicy(p),
            _ => unreachable!("an enforced policy kind decodes to itself"),
        }
    };
    let p = StagedPolicy {
        staged_action,
        policy,
    };
    p.validate()?;
    Ok(p)
}

const KINDS: &str = "Namespace, Pod, Service, EndpointSlice, NetworkPolicy, and projectcalico.org/v3 Tier, GlobalNetworkPolicy, NetworkPolicy, HostEndpoint, GlobalNetworkSet, policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy, and the staged kinds: projectcalico.org/v3 StagedGlobalNetworkPolicy, StagedNetworkPolicy, StagedKubernetesNetworkPolicy and malla.dev/v1alpha1 StagedClusterNetworkPolicy";

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Decodes every document of `text` strictly.
pub fn parse(text: &str) -> Result<Vec<Document>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let err = |what: Option<String>, field: Option<&str>, reason: String| ManifestError {
            index: Some(index),
            what,
            field: field.map(str::to_string),
            reason,
        };
        let value =
            Value::deserialize(de).map_err(|e| err(None, None, format!("not valid YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        if !value.is_object() {
            return Err(err(
                None,
                None,
                format!("must be a mapping, got {}", describe(&value)),
            ));
        }
        let text_at = |path: &[&str]| -> Result<Option<String>, ManifestError> {
            match path.iter().try_fold(&value, |v, p| v.get(p)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(err(
                    None,
                    Some(&path.join(".")),
                    format!("must be a string, got {}", describe(other)),
                )),
            }
        };
        let api = text_at(&["apiVersion"])?;
        let kind = text_at(&["kind"])?;
        let name = text_at(&["metadata", "name"])?.unwrap_or_default();
        let namespace = text_at(&["metadata", "namespace"])?;
        let what = format!(
            "{} {:?}",
            kind.as_deref().unwrap_or("?"),
            match &namespace {
                Some(ns) => format!("{ns}/{name}"),
                None => name.clone(),
            }
        );
        let api =
            api.ok_or_else(|| err(Some(what.clone()), Some("apiVersion"), "is required".into()))?;
        let kind =
            kind.ok_or_else(|| err(Some(what.clone()), Some("kind"), "is required".into()))?;
        let apis: &[&str] = match kind.as_str() {
            "EndpointSlice" => &["discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"],
            "NetworkPolicy" => &["networking.k8s.io/v1", "projectcalico.org/v3"],
            "ClusterNetworkPolicy" => &["policy.networking.k8s.io/v1alpha2"],
            k if staged_api(k).is_some() => staged_api(k).map(std::slice::from_ref).unwrap_or(&[]),
            k if crate::calico::CalicoObject::KINDS.contains(&k) => &["projectcalico.org/v3"],
            _ => &["v1"],
        };
        if !apis.contains(&api.as_str()) {
            return Err(err(
                Some(what.clone()),
                Some("apiVersion"),
                format!(
                    "{api:?} is not supported for {kind} (expected {:?})",
                    apis[0]
                ),
            ));
        }
        let s = Strictness::Strict;
        let field = |e: FieldError| err(Some(what.clone()), Some(&e.path), e.reason);
        let object = match kind.as_str() {
            "Namespace" => Object::Namespace(read::namespace(value, s).map_err(field)?),
            "Pod" => Object::Pod(read::pod(value, s).map_err(field)?),
            "Service" => Object::Service(read::service(value, s).map_err(field)?),
            "NetworkPolicy" if api == "networking.k8s.io/v1" => {
                Object::NetworkPolicy(read::network_policy(value, s).map_err(field)?)
            }
            k if (crate::calico::CalicoObject::KINDS.contains(&k)
                && (k != "NetworkPolicy" || api == "projectcalico.org/v3"))
                || k == "ClusterNetworkPolicy" =>
            {
                Object::Calico(
                    crate::calico::CalicoObject::from_manifest(k, &value)
                        .map_err(|e| err(Some(what.clone()), Some(&e.field), e.reason))?,
                )
            }
            k if staged_api(k).is_some() => Object::Calico(crate::calico::CalicoObject::Staged(
                staged(k, &value).map_err(|e| err(Some(what.clone()), Some(&e.field), e.reason))?,
            )),
            "EndpointSlice" => {
                let version = if api.ends_with("v1beta1") {
                    SliceVersion::V1beta1
                } else {
                    SliceVersion::V1
                };
                let slice = read::endpoint_slice(value, version, s).map_err(field)?;
                // Strict decoding refuses what it would skip.
                Object::EndpointSlice(slice.ok_or_else(|| {
                    err(Some(what.clone()), None, "not an IP endpoint slice".into())
                })?)
            }
            other => {
                return Err(err(
                    Some(what),
                    Some("kind"),
                    format!("{other:?} is not supported (supported: {KINDS})"),
                ))
            }
        };
        out.push(Document {
            index,
            what,
            object,
        });
    }
    if out.is_empty() {
        return Err(ManifestError {
            index: None,
            what: None,
            field: None,
            reason: "no objects in manifest".into(),
        });
    }
    Ok(out)
}
