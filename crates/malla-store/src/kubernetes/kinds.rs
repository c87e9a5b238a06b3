//! Which Kubernetes resource holds each part of Malla's key space (the table is
//! [`malla_api::kinds::STORAGE`]; this turns it into API resources), and how a key names an
//! object.
//!
//! - Malla's own records (pools, IPAM blocks and handles, workload endpoints, node records, the
//!   cluster configuration) are custom resources of group [`GROUP`]: cluster-scoped, `spec` is
//!   the record's JSON as the other backends store it, and the annotation [`KEY_ANNOTATION`]
//!   carries the key. The object name is the key's tail when that is a valid name, else a
//!   sanitised form with a hash of the key (`fd00--40-122-5f1c9a2e` for an IPv6 block).
//! - What the cluster already has (namespaces, pods, services, endpoint slices, network
//!   policies) is read from and written to the native objects, converted by
//!   [`super::native`].

use kube::api::ApiResource;
use malla_api::kinds::{Kubernetes, STORAGE};

/// The API group of Malla's custom resources.
pub const GROUP: &str = "malla.dev";
/// Their version.
pub const VERSION: &str = "v1";
/// The annotation holding the datastore key a custom resource stores.
pub const KEY_ANNOTATION: &str = "malla.dev/key";

/// How the objects of a kind relate to Malla's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A Malla custom resource: `spec` is the value.
    Custom,
    Namespace,
    Pod,
    Service,
    /// `discovery.k8s.io` v1 or v1beta1 EndpointSlices.
    EndpointSlice,
    /// Core `v1/Endpoints`, where no EndpointSlice API is served (read-only).
    Endpoints,
    NetworkPolicy,
}

/// A printer column of a CRD: name, type, JSON path, priority (0: always shown, 1: `-o wide`).
pub use malla_api::kinds::Column;

/// One part of the key space and the resource that holds it.
#[derive(Debug, Clone)]
pub struct Kind {
    /// Every key of this kind starts with it.
    pub prefix: &'static str,
    pub resource: ApiResource,
    pub namespaced: bool,
    pub shape: Shape,
    /// Printer columns (`NAME`, JSON path into the object) for the CRD.
    pub columns: &'static [Column],
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version,
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn custom(prefix: &'static str, kind: &str, plural: &str, columns: &'static [Column]) -> Kind {
    Kind {
        prefix,
        resource: resource(GROUP, VERSION, kind, plural),
        namespaced: false,
        shape: Shape::Custom,
        columns,
    }
}

/// Which API serves endpoint slices on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceApi {
    V1,
    V1beta1,
    /// Neither: core Endpoints, converted.
    Endpoints,
}

/// The key space's resources on a server whose endpoint slices come from `slices`: the table
/// of [`malla_api::kinds::STORAGE`], turned into API resources.
pub fn all(slices: SliceApi) -> Vec<Kind> {
    STORAGE
        .iter()
        .map(|s| match s.kubernetes {
            Kubernetes::Custom {
                kind,
                plural,
                columns,
            } => custom(s.prefix, kind, plural, columns),
            Kubernetes::Native {
                group,
                version,
                kind,
                plural,
                namespaced,
            } => Kind {
                prefix: s.prefix,
                resource: resource(group, version, kind, plural),
                namespaced,
                shape: native_shape(kind),
                columns: &[],
            },
            Kubernetes::EndpointSlices => match slices {
                SliceApi::V1 | SliceApi::V1beta1 => Kind {
                    prefix: s.prefix,
                    resource: resource(
                        "discovery.k8s.io",
                        if slices == SliceApi::V1 {
                            "v1"
                        } else {
                            "v1beta1"
                        },
                        "EndpointSlice",
                        "endpointslices",
                    ),
                    namespaced: true,
                    shape: Shape::EndpointSlice,
                    columns: &[],
                },
                SliceApi::Endpoints => Kind {
                    prefix: s.prefix,
                    resource: resource("", "v1", "Endpoints", "endpoints"),
                    namespaced: true,
                    shape: Shape::Endpoints,
                    columns: &[],
                },
            },
        })
        .collect()
}

/// The conversion a native kind takes ([`super::native`]); a kind of the table without one is
/// a programming error, caught by the test that builds every kind.
fn native_shape(kind: &str) -> Shape {
    match kind {
        "Namespace" => Shape::Namespace,
        "Pod" => Shape::Pod,
        "Service" => Shape::Service,
        "NetworkPolicy" => Shape::NetworkPolicy,
        other => panic!("no conversion for the native kind {other}"),
    }
}

/// Where a key lives: its kind, namespace (namespaced kinds) and object name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub namespace: Option<String>,
    pub name: String,
}

impl Kind {
    /// The object a key is stored in, or an explanation why the key cannot be stored.
    pub fn locate(&self, key: &str) -> Result<Location, String> {
        let tail = &key[self.prefix.len()..];
        if self.namespaced {
            let (ns, name) = tail
                .split_once('/')
                .ok_or_else(|| format!("expected {}NAMESPACE/NAME", self.prefix))?;
            if ns.is_empty() || name.is_empty() || name.contains('/') {
                return Err(format!("expected {}NAMESPACE/NAME", self.prefix));
            }
            Ok(Location {
                namespace: Some(ns.to_string()),
                name: name.to_string(),
            })
        } else if self.shape == Shape::Custom {
            if tail.is_empty() {
                return Err("empty name".into());
            }
            Ok(Location {
                namespace: None,
                name: object_name(key, tail),
            })
        } else {
            if tail.is_empty() || tail.contains('/') {
                return Err(format!("expected {}NAME", self.prefix));
            }
            Ok(Location {
                namespace: None,
                name: tail.to_string(),
            })
        }
    }

    /// The key of a native object (custom resources carry theirs in [`KEY_ANNOTATION`]).
    pub fn native_key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) => format!("{}{ns}/{name}", self.prefix),
            None => format!("{}{name}", self.prefix),
        }
    }
}

/// The kind holding `key`, if any.
pub fn kind_of<'a>(kinds: &'a [Kind], key: &str) -> Option<&'a Kind> {
    kinds.iter().find(|k| key.starts_with(k.prefix))
}

/// The kinds that may hold keys starting with `prefix`.
pub fn kinds_under<'a>(kinds: &'a [Kind], prefix: &str) -> Vec<&'a Kind> {
    kinds
        .iter()
        .filter(|k| k.prefix.starts_with(prefix) || prefix.starts_with(k.prefix))
        .collect()
}

/// A valid Kubernetes object name (DNS subdomain: lowercase alphanumerics, `-` and `.`,
/// alphanumeric at both ends, at most 253) for a custom resource's key, whose tail after the
/// kind's prefix is `tail`: the tail itself when valid, else a sanitised form suffixed with a
/// hash of the whole key, so distinct keys never share a name.
pub fn object_name(key: &str, tail: &str) -> String {
    let valid = !tail.is_empty()
        && tail.len() <= 200
        && tail
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && tail.as_bytes()[0].is_ascii_alphanumeric()
        && tail.as_bytes()[tail.len() - 1].is_ascii_alphanumeric();
    if valid {
        return tail.to_string();
    }
    let mut clean: String = tail
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '.' | '-' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    clean.truncate(180);
    let clean = clean.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if clean.is_empty() {
        format!("k-{:016x}", fnv(key))
    } else {
        format!("{clean}-{:016x}", fnv(key))
    }
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The CustomResourceDefinitions of Malla's kinds, as one multi-document YAML stream
/// (`deploy/crds.yaml` is this output).
pub fn crds_yaml() -> String {
    let mut out = String::from(
        "# Malla's custom resources: group malla.dev, version v1, all cluster-scoped.\n\
         #\n\
         # Each object holds one record of Malla's datastore (crates/malla-api/src/keys.rs) when the\n\
         # agents run with `--datastore kubernetes`: `spec` is the record's JSON exactly as the other\n\
         # backends store it (camelCase; the schema preserves unknown fields), and the annotation\n\
         # `malla.dev/key` names the datastore key (object names are DNS names, keys are not always:\n\
         # IPv6 CIDRs, slashes). `malla.dev/key-pattern` on each definition shows its kind's keys.\n\
         #\n\
         # Generated by `malla crds` (crates/malla-store/src/kubernetes/kinds.rs); a test keeps this\n\
         # file equal to it. Apply first: `kubectl apply -f deploy/crds.yaml`.\n",
    );
    for k in all(SliceApi::V1)
        .into_iter()
        .filter(|k| k.shape == Shape::Custom)
    {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd(&k)).expect("CRD serialises"));
    }
    out
}

/// One CustomResourceDefinition as JSON.
pub fn crd(k: &Kind) -> serde_json::Value {
    let r = &k.resource;
    let mut columns: Vec<serde_json::Value> = k
        .columns
        .iter()
        .map(|(name, ty, path, priority)| {
            let mut c = serde_json::json!({"name": name, "type": ty, "jsonPath": path});
            if *priority > 0 {
                c["priority"] = serde_json::json!(priority);
            }
            c
        })
        .collect();
    columns.push(serde_json::json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}));
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{}", r.plural, r.group),
            "labels": {"app.kubernetes.io/name": "malla"},
            "annotations": {"malla.dev/key-pattern": format!("{}<name>", k.prefix)},
        },
        "spec": {
            "group": r.group,
            "scope": "Cluster",
            "names": {
                "kind": r.kind,
                "listKind": format!("{}List", r.kind),
                "plural": r.plural,
                "singular": r.kind.to_lowercase(),
                "categories": ["malla"],
            },
            "versions": [{
                "name": r.version,
                "served": true,
                "storage": true,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": format!("Malla {}: spec is Malla's record as stored under {}*.", r.kind, k.prefix),
                    "properties": {
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    },
                }},
                "additionalPrinterColumns": columns,
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use malla_api::keys;

    #[test]
    fn deploy_crds_are_the_generated_ones() {
        let shipped = include_str!("../../../../deploy/crds.yaml");
        assert!(
            shipped == crds_yaml(),
            "deploy/crds.yaml is stale: run `malla crds > deploy/crds.yaml`"
        );
    }

    #[test]
    fn names_are_valid_and_distinct() {
        assert_eq!(
            object_name("/malla/ipam/blocks/198.18.0.64-26", "198.18.0.64-26"),
            "198.18.0.64-26"
        );
        let a = object_name("/malla/ipam/blocks/fd00::40-122", "fd00::40-122");
        let b = object_name("/malla/ipam/blocks/fd00:0:40-122", "fd00:0:40-122");
        assert!(a.starts_with("fd00--40-122-"), "{a}");
        assert_ne!(a, b);
        let e = object_name("/malla/endpoints/n1/ABC/eth0", "n1/ABC/eth0");
        assert!(e.starts_with("n1-abc-eth0-"), "{e}");
        assert!(object_name("/x/", "///").starts_with("k-"));
    }

    #[test]
    fn keys_locate_their_objects() {
        let kinds = all(SliceApi::V1);
        let pod = kind_of(&kinds, "/malla/pods/x/a").unwrap();
        assert_eq!(
            pod.locate("/malla/pods/x/a").unwrap(),
            Location {
                namespace: Some("x".into()),
                name: "a".into()
            }
        );
        assert!(pod.locate("/malla/pods/x").is_err());
        let cfg = kind_of(&kinds, keys::CLUSTER_CONFIG).unwrap();
        assert_eq!(cfg.locate(keys::CLUSTER_CONFIG).unwrap().name, "cluster");
        assert!(kind_of(&kinds, "/elsewhere").is_none());
        let under: Vec<_> = kinds_under(&kinds, "/malla/ipam/")
            .iter()
            .map(|k| k.resource.plural.clone())
            .collect();
        assert_eq!(under, ["ipamblocks", "ipamhandles"]);
        assert_eq!(kinds_under(&kinds, "").len(), kinds.len());
    }
}
