//! Kubernetes manifests the lab understands: `v1/Namespace`, `v1/Pod` (labels, `spec.nodeName`,
//! `containers[].ports`, `spec.hostNetwork`, the `malla.dev/allowed-source-prefixes` annotation), `v1/Service`, `discovery.k8s.io` EndpointSlice and
//! `networking.k8s.io/v1` NetworkPolicy and Calico's `projectcalico.org/v3` Tier, GlobalNetworkPolicy,
//! HostEndpoint and GlobalNetworkSet, several documents per file. Decoding is
//! `malla_api::k8s::manifest` (strict, as `kubectl apply --validate=strict`: a misspelt field is
//! an error); this adds what the lab itself cannot run. Everything is parsed and checked before
//! anything is applied; errors name the document and the field.

use std::collections::BTreeMap;

use malla_api::k8s::manifest::{self as k8s_manifest, Document};
use malla_api::service::Protocol;

use crate::state::PortSpec;

/// One object of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Namespace {
        name: String,
        labels: BTreeMap<String, String>,
    },
    Pod(PodSpec),
    Service(crate::services::ServiceSpec),
    EndpointSlice(malla_api::service::EndpointSlice),
    NetworkPolicy(malla_api::policy::NetworkPolicy),
    /// A `projectcalico.org/v3` object (tiers, global policies, host endpoints, network sets).
    Calico(malla_api::calico::CalicoObject),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub ports: Vec<PortSpec>,
    /// `malla.dev/allowed-source-prefixes`, parsed.
    pub allowed_source_prefixes: Vec<ipnet::IpNet>,
    /// `spec.hostNetwork`: run in the node's namespace, as the kubelet does (no CNI).
    pub host_network: bool,
}

impl PodSpec {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A manifest that cannot be applied; the message names the document and the field.
#[derive(Debug)]
pub struct ManifestError(pub String);

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ManifestError {}

impl From<k8s_manifest::ManifestError> for ManifestError {
    fn from(e: k8s_manifest::ManifestError) -> Self {
        Self(e.to_string())
    }
}

/// Parses every document of `text`.
pub fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
    k8s_manifest::parse(text)?
        .into_iter()
        .map(|doc| {
            Ok(match doc.object.clone() {
                k8s_manifest::Object::Namespace(ns) => Object::Namespace {
                    name: ns.name,
                    labels: ns.labels,
                },
                k8s_manifest::Object::Pod(pod) => Object::Pod(pod_spec(&doc, pod)?),
                k8s_manifest::Object::Service(s) => Object::Service(s),
                k8s_manifest::Object::EndpointSlice(s) => Object::EndpointSlice(s),
                k8s_manifest::Object::NetworkPolicy(p) => Object::NetworkPolicy(p),
                k8s_manifest::Object::Calico(c) => Object::Calico(c),
            })
        })
        .collect()
}

/// The lab's pod: its ports once each, as the lab's probes serve them.
fn pod_spec(doc: &Document, pod: malla_api::Pod) -> Result<PodSpec, ManifestError> {
    let mut ports: Vec<PortSpec> = Vec::new();
    for p in &pod.ports {
        let protocol = match p.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => {
                return Err(k8s_manifest::ManifestError::at(
                    doc,
                    "spec.containers[].ports[].protocol",
                    format!(
                        "SCTP (containerPort {}) is not available on this kernel",
                        p.port
                    ),
                )
                .into());
            }
        };
        let spec = PortSpec {
            port: p.port,
            protocol: protocol.into(),
            name: p.name.clone(),
        };
        if !ports.contains(&spec) {
            ports.push(spec);
        }
    }
    Ok(PodSpec {
        namespace: pod.namespace,
        name: pod.name,
        labels: pod.labels,
        node_name: Some(pod.node).filter(|n| !n.is_empty()),
        ports,
        allowed_source_prefixes: pod.allowed_source_prefixes,
        host_network: pod.host_network,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_namespaces_and_pods() {
        let objs = parse(
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node-2
  containers:
  - name: web
    ports:
    - containerPort: 80
    - containerPort: 53
      protocol: UDP
---
"#,
        )
        .unwrap();
        assert_eq!(objs.len(), 2);
        let Object::Pod(p) = &objs[1] else { panic!() };
        assert_eq!(p.key(), "shop/web-1");
        assert_eq!(p.node_name.as_deref(), Some("node-2"));
        assert_eq!(p.ports.len(), 2);
        assert_eq!(p.ports[1].protocol, "udp");
        assert_eq!(p.labels["app"], "web");
    }

    #[test]
    fn errors_name_document_and_field() {
        let e = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n").unwrap_err();
        assert!(
            e.0.starts_with("document 2 (ConfigMap \"s\"): kind:"),
            "{e}"
        );
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n  - name: c\n    ports:\n    - containerPort: 70000\n").unwrap_err();
        assert!(
            e.0.contains("spec.containers[0].ports[0].containerPort"),
            "{e}"
        );
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: Bad_Name}\nspec: {containers: [{name: c}]}\n").unwrap_err();
        assert!(e.0.contains("metadata.name"), "{e}");
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n").unwrap_err();
        assert!(e.0.contains("spec: is required"), "{e}");
        let e = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 9, protocol: SCTP}]}]}\n").unwrap_err();
        assert!(
            e.0.starts_with("document 1 (Pod \"p\"): spec.containers[].ports[].protocol: SCTP"),
            "{e}"
        );
        let e = parse(": : :\n").unwrap_err();
        assert!(e.0.starts_with("document 1"), "{e}");
        let e = parse("- a\n").unwrap_err();
        assert!(e.0.contains("must be a mapping"), "{e}");
    }
}
