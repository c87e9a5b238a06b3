//! The one conversion between native Kubernetes objects and Malla's model (feature `k8s`).
//!
//! Each kind Malla reads — `v1` Namespace, Pod, Service and Endpoints,
//! `discovery.k8s.io` EndpointSlice (`v1`, and `v1beta1` which servers before 1.21 serve) and
//! `networking.k8s.io/v1` NetworkPolicy — is decoded into its k8s-openapi type and converted to
//! Malla's record here ([`read`]), and Malla's records become native objects here ([`write`]).
//! The datastore's Kubernetes backend, the lab's manifests and the CLI all go through it.
//!
//! Decoding has a [`Strictness`]: a user's manifest is [`Strictness::Strict`], as
//! `kubectl apply --validate=strict` is — a field the kind does not have is rejected with its path
//! and the valid names, and every value Malla would otherwise misread (a bad address, a port out
//! of range, an unknown protocol, an unsupported service type) is an error naming the field.
//! Fields Kubernetes has and Malla ignores (`containers[].image`, `resources`, …) are accepted.
//! An object read from an API server is [`Strictness::Lenient`]: the server validated it and may
//! be newer than the schema here, so unknown fields are ignored and kinds Malla does not program
//! (ExternalName services, FQDN slices) are skipped rather than refused.
//! [`manifest`] parses a multi-document YAML file, every document checked before any is used.

mod decode;
pub mod manifest;
pub mod read;
pub mod write;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::service::Service;

/// How a native object is decoded (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// A user's manifest: unknown fields and unusable values are errors.
    Strict,
    /// An object an API server accepted: unknown fields are ignored.
    Lenient,
}

/// What is wrong with an object, and where: `path` is like `spec.podSelector.matchLabel`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

impl From<(String, String)> for FieldError {
    fn from((path, reason): (String, String)) -> Self {
        Self { path, reason }
    }
}

/// Which EndpointSlice API an object is from: `v1` names an endpoint's node in `nodeName`,
/// `v1beta1` in `topology["kubernetes.io/hostname"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceVersion {
    V1,
    V1beta1,
}

/// Which families a service wants (`spec.ipFamilyPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// A Service as declared: the [`Service`] record, whose cluster IPs may still be unallocated,
/// and what an allocator needs besides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub service: Service,
    /// `clusterIP: None`.
    pub headless: bool,
    pub family_policy: FamilyPolicy,
    /// `ipFamilies[0]` is IPv6.
    pub ipv6_first: bool,
}

impl ServiceSpec {
    pub fn key(&self) -> String {
        self.service.key()
    }
}

/// The label naming a namespace, set by the server since 1.21.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A DNS-1123 subdomain (object names) of at most `max` characters; a label when `dots` is false.
pub fn is_dns_name(s: &str, max: usize, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.'))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}
