//! Kubernetes manifests the lab understands: `v1/Namespace` and `v1/Pod` (labels,
//! `spec.nodeName`, `containers[].ports`), several documents per file. Everything is parsed and
//! checked before anything is applied; errors name the document and the field.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml::Value;

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub node_name: Option<String>,
    pub ports: Vec<PortSpec>,
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

/// A DNS-1123 label: what Kubernetes requires of namespace names (pod names are subdomains).
fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

struct Doc<'a> {
    index: usize,
    what: String,
    value: &'a Value,
}

impl Doc<'_> {
    fn err(&self, field: &str, reason: impl std::fmt::Display) -> ManifestError {
        ManifestError(format!(
            "document {} ({}): {field}: {reason}",
            self.index, self.what
        ))
    }

    fn str_at(&self, path: &[&str]) -> Result<Option<String>, ManifestError> {
        let mut v = self.value;
        for p in path {
            match v.get(p) {
                Some(next) => v = next,
                None => return Ok(None),
            }
        }
        match v {
            Value::String(s) => Ok(Some(s.clone())),
            Value::Null => Ok(None),
            other => Err(self.err(
                &path.join("."),
                format!("must be a string, got {}", kind(other)),
            )),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Parses every document of `text`; `source` names the file in errors.
pub fn parse(text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = Value::deserialize(de)
            .map_err(|e| ManifestError(format!("document {index}: not valid YAML: {e}")))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing `---`)
        }
        if !value.is_mapping() {
            return Err(ManifestError(format!(
                "document {index}: must be a mapping, got {}",
                kind(&value)
            )));
        }
        let mut doc = Doc {
            index,
            what: "?".into(),
            value: &value,
        };
        let api = doc
            .str_at(&["apiVersion"])?
            .ok_or_else(|| doc.err("apiVersion", "is required"))?;
        let k = doc
            .str_at(&["kind"])?
            .ok_or_else(|| doc.err("kind", "is required"))?;
        let name = doc.str_at(&["metadata", "name"])?.unwrap_or_default();
        doc.what = format!("{k} {name:?}");
        let want_api = match k.as_str() {
            "EndpointSlice" => "discovery.k8s.io/v1",
            "NetworkPolicy" => "networking.k8s.io/v1",
            _ => "v1",
        };
        if api != want_api {
            return Err(doc.err(
                "apiVersion",
                format!("{api:?} is not supported for {k} (expected {want_api:?})"),
            ));
        }
        if !is_dns_label(&name, 253) {
            return Err(doc.err(
                "metadata.name",
                format!("{name:?} is not a valid name (lowercase letters, digits, '-', '.')"),
            ));
        }
        match k.as_str() {
            "Namespace" => {
                if !is_dns_label(&name, 63) || name.contains('.') {
                    return Err(doc.err(
                        "metadata.name",
                        "a namespace name is a DNS label (no dots, at most 63)",
                    ));
                }
                let labels = labels_of(&doc)?;
                out.push(Object::Namespace { name, labels });
            }
            "Pod" => out.push(Object::Pod(parse_pod(&doc, name)?)),
            "Service" => out.push(Object::Service(
                crate::services::parse_service(&value).map_err(|(field, reason)| doc.err(&field, reason))?,
            )),
            "NetworkPolicy" => out.push(Object::NetworkPolicy(
                crate::services::parse_network_policy(&value).map_err(|(field, reason)| doc.err(&field, reason))?,
            )),
            "EndpointSlice" => out.push(Object::EndpointSlice(
                crate::services::parse_endpoint_slice(&value).map_err(|(field, reason)| doc.err(&field, reason))?,
            )),
            other => {
                return Err(doc.err(
                    "kind",
                    format!("{other:?} is not supported by the lab (supported: Namespace, Pod, Service, EndpointSlice, NetworkPolicy)"),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(ManifestError("no objects in manifest".into()));
    }
    Ok(out)
}

/// `metadata.labels`, checked to be a mapping of strings.
fn labels_of(doc: &Doc<'_>) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut labels = BTreeMap::new();
    if let Some(l) = doc.value.get("metadata").and_then(|m| m.get("labels")) {
        let map = l
            .as_mapping()
            .ok_or_else(|| doc.err("metadata.labels", "must be a mapping"))?;
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| doc.err("metadata.labels", "keys must be strings"))?;
            let val = match v {
                Value::String(s) => s.clone(),
                other => {
                    return Err(doc.err(
                        &format!("metadata.labels.{key}"),
                        format!("must be a string, got {}", kind(other)),
                    ))
                }
            };
            labels.insert(key.to_string(), val);
        }
    }
    Ok(labels)
}

fn parse_pod(doc: &Doc<'_>, name: String) -> Result<PodSpec, ManifestError> {
    let namespace = doc
        .str_at(&["metadata", "namespace"])?
        .unwrap_or_else(|| "default".into());
    if !is_dns_label(&namespace, 63) {
        return Err(doc.err(
            "metadata.namespace",
            format!("{namespace:?} is not a valid namespace"),
        ));
    }
    let labels = labels_of(doc)?;
    let spec = doc
        .value
        .get("spec")
        .ok_or_else(|| doc.err("spec", "is required"))?;
    let node_name = match spec.get("nodeName") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(doc.err(
                "spec.nodeName",
                format!("must be a string, got {}", kind(other)),
            ))
        }
    };
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .ok_or_else(|| doc.err("spec.containers", "is required and must be a list"))?;
    if containers.is_empty() {
        return Err(doc.err("spec.containers", "must have at least one container"));
    }
    let mut ports = Vec::new();
    for (ci, c) in containers.iter().enumerate() {
        let field = format!("spec.containers[{ci}]");
        if !c.is_mapping() {
            return Err(doc.err(&field, "must be a mapping"));
        }
        match c.get("name") {
            Some(Value::String(_)) => {}
            _ => return Err(doc.err(&format!("{field}.name"), "is required")),
        }
        let Some(list) = c.get("ports") else { continue };
        let list = list
            .as_sequence()
            .ok_or_else(|| doc.err(&format!("{field}.ports"), "must be a list"))?;
        for (pi, p) in list.iter().enumerate() {
            let pf = format!("{field}.ports[{pi}]");
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    doc.err(
                        &format!("{pf}.containerPort"),
                        "is required and must be a number",
                    )
                })?;
            if !(1..=65535).contains(&port) {
                return Err(doc.err(
                    &format!("{pf}.containerPort"),
                    format!("{port} is outside 1-65535"),
                ));
            }
            let protocol = match p.get("protocol") {
                None | Some(Value::Null) => "TCP".to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => {
                    return Err(doc.err(
                        &format!("{pf}.protocol"),
                        format!("must be a string, got {}", kind(other)),
                    ))
                }
            };
            let protocol = match protocol.as_str() {
                "TCP" => "tcp",
                "UDP" => "udp",
                "SCTP" => {
                    return Err(doc.err(
                        &format!("{pf}.protocol"),
                        "SCTP is not available on this kernel",
                    ))
                }
                other => {
                    return Err(doc.err(
                        &format!("{pf}.protocol"),
                        format!("{other:?} is not TCP, UDP or SCTP"),
                    ))
                }
            };
            let name = match p.get("name") {
                None | Some(Value::Null) => None,
                Some(Value::String(n)) if is_dns_label(n, 15) && !n.contains('.') => {
                    Some(n.clone())
                }
                Some(other) => {
                    return Err(doc.err(
                        &format!("{pf}.name"),
                        format!(
                        "{other:?} is not a valid port name (a DNS label of at most 15 characters)"
                    ),
                    ))
                }
            };
            let spec = PortSpec {
                port: port as u16,
                protocol: protocol.into(),
                name,
            };
            if !ports.contains(&spec) {
                ports.push(spec);
            }
        }
    }
    Ok(PodSpec {
        namespace,
        name,
        labels,
        node_name,
        ports,
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
        let e = parse(": : :\n").unwrap_err();
        assert!(e.0.starts_with("document 1"), "{e}");
        let e = parse("- a\n").unwrap_err();
        assert!(e.0.contains("must be a mapping"), "{e}");
    }
}
