//! The Kubernetes backend's side of the native kinds: which key and record each object holds,
//! and the object to write for a record. The conversion itself is `malla_api::k8s` (the one
//! conversion, shared with the lab's manifests and the CLI); objects from the server are read
//! leniently there (a newer server may carry fields this build does not know).
//!
//! Writing (the lab and tests create objects as a user or the kubelet would) starts from the
//! object already on the server, so fields Malla does not model are preserved; a pod's addresses
//! and readiness go to its `status`, as the kubelet reports them.
//!
//! Servers differ by release, and both ends are handled: EndpointSlice `v1` and `v1beta1`, core
//! `Endpoints` where neither is served, and the `kubernetes.io/metadata.name` namespace label
//! that servers before 1.21 do not add.

use malla_api::k8s::{self, SliceVersion, Strictness, NAMESPACE_NAME_LABEL};
use malla_api::policy::NetworkPolicy;
use malla_api::service::{EndpointSlice, Service};
use malla_api::{Namespace, Pod};
use serde_json::{json, Value};

use super::kinds::{Kind, Location, Shape, KEY_ANNOTATION};
use crate::syncer::Resource;

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, p| v.get(p))?.as_str()
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("Malla records serialise")
}

fn slice_version(kind: &Kind) -> SliceVersion {
    if kind.resource.version == "v1beta1" {
        SliceVersion::V1beta1
    } else {
        SliceVersion::V1
    }
}

/// A native object's key and Malla value (JSON); None for an object Malla does not use (an
/// FQDN endpoint slice, a custom resource without its key). A custom resource's `spec` is
/// returned as stored, whatever record it holds.
pub fn read(kind: &Kind, obj: &Value) -> Result<Option<(String, String)>, String> {
    if kind.shape == Shape::Custom {
        return Ok(custom_key(kind, obj)?
            .and_then(|key| obj.get("spec").map(|spec| (key, spec.to_string()))));
    }
    Ok(read_resource(kind, obj.clone())?.map(|(key, r)| (key, r.to_json())))
}

/// The key a custom resource holds: its annotation, else (created by hand, `kubectl apply`
/// of an IPPool) the name as the key's tail; None when the annotation names another kind.
fn custom_key(kind: &Kind, obj: &Value) -> Result<Option<String>, String> {
    let name = str_at(obj, &["metadata", "name"]).ok_or("object without a name")?;
    Ok(
        match obj
            .pointer("/metadata/annotations")
            .and_then(|a| a.get(KEY_ANNOTATION))
            .and_then(Value::as_str)
        {
            Some(k) if k.starts_with(kind.prefix) => Some(k.to_string()),
            Some(_) => None,
            None => Some(kind.native_key(None, name)),
        },
    )
}

/// A native object's key and Malla record, typed, straight from the object's JSON tree (the
/// syncer's path: no JSON text in between); None for an object Malla does not use. Custom
/// resources become the record their `spec` holds.
pub fn read_resource(kind: &Kind, obj: Value) -> Result<Option<(String, Resource)>, String> {
    let name = str_at(&obj, &["metadata", "name"])
        .ok_or("object without a name")?
        .to_string();
    let key = kind.native_key(str_at(&obj, &["metadata", "namespace"]), &name);
    let lenient = Strictness::Lenient;
    let text = |e: k8s::FieldError| e.to_string();
    Ok(match kind.shape {
        Shape::Custom => match (custom_key(kind, &obj)?, obj.get("spec")) {
            (Some(key), Some(spec)) => Resource::from_value(&key, spec.clone())?.map(|r| (key, r)),
            _ => None,
        },
        Shape::Namespace => {
            let mut ns = k8s::read::namespace(obj, lenient).map_err(text)?;
            ns.labels
                .entry(NAMESPACE_NAME_LABEL.into())
                .or_insert_with(|| name.clone());
            Some((key, Resource::Namespace(ns)))
        }
        Shape::Pod => Some((
            key,
            Resource::Pod(k8s::read::pod(obj, lenient).map_err(text)?),
        )),
        Shape::Service => Some((
            key,
            Resource::Service(k8s::read::service(obj, lenient).map_err(text)?.service),
        )),
        Shape::EndpointSlice => k8s::read::endpoint_slice(obj, slice_version(kind), lenient)
            .map_err(text)?
            .map(|s| (key, Resource::EndpointSlice(s))),
        Shape::Endpoints => None, // expanded by `read_endpoints`, one record per family
        Shape::NetworkPolicy => Some((
            key,
            Resource::NetworkPolicy(k8s::read::network_policy(obj, lenient).map_err(text)?),
        )),
    })
}

/// A core `Endpoints` object as one endpoint-slice record per address family, keyed
/// `NAME-v4` / `NAME-v6` (servers without the EndpointSlice API).
pub fn read_endpoints(kind: &Kind, obj: &Value) -> Result<Vec<(String, String)>, String> {
    Ok(read_endpoints_typed(kind, obj.clone())?
        .into_iter()
        .map(|(key, s)| (key, to_json(&s)))
        .collect())
}

/// [`read_endpoints`], typed.
pub fn read_endpoints_typed(
    kind: &Kind,
    obj: Value,
) -> Result<Vec<(String, EndpointSlice)>, String> {
    Ok(k8s::read::endpoints(obj)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|s| (kind.native_key(Some(&s.namespace), &s.name), s))
        .collect())
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &str) -> Result<T, String> {
    serde_json::from_str(value).map_err(|e| format!("{key}: {e}"))
}

/// The object to write for `value` at `loc`, starting from the server's current object
/// (`existing`) when there is one. The caller sets `metadata.resourceVersion`.
pub fn write(
    kind: &Kind,
    loc: &Location,
    key: &str,
    value: &str,
    existing: Option<&Value>,
) -> Result<Value, String> {
    let mut obj = existing.cloned().unwrap_or_else(|| json!({}));
    {
        let m = obj.as_object_mut().ok_or("object is not a JSON object")?;
        m.insert("apiVersion".into(), json!(kind.resource.api_version));
        m.insert("kind".into(), json!(kind.resource.kind));
        m.remove("status");
    }
    {
        let meta = k8s::write::object_mut(&mut obj, "metadata");
        meta.insert("name".into(), json!(loc.name));
        if let Some(ns) = &loc.namespace {
            meta.insert("namespace".into(), json!(ns));
        }
        meta.remove("managedFields");
    }
    match kind.shape {
        Shape::Custom => {
            let spec: Value = parse(key, value)?;
            if !spec.is_object() {
                return Err(format!(
                    "{key}: a custom resource's value must be a JSON object"
                ));
            }
            let meta = k8s::write::object_mut(&mut obj, "metadata");
            k8s::write::as_object(meta.entry("annotations").or_insert_with(|| json!({})))
                .insert(KEY_ANNOTATION.into(), json!(key));
            k8s::write::as_object(&mut obj).insert("spec".into(), spec);
        }
        Shape::Namespace => k8s::write::namespace(&parse::<Namespace>(key, value)?, &mut obj),
        Shape::Pod => k8s::write::pod(&parse::<Pod>(key, value)?, &mut obj, existing.is_some()),
        Shape::Service => k8s::write::service(&parse::<Service>(key, value)?, &mut obj),
        Shape::EndpointSlice => k8s::write::endpoint_slice(
            &parse::<EndpointSlice>(key, value)?,
            slice_version(kind),
            &mut obj,
        ),
        Shape::Endpoints => {
            return Err(format!(
                "{key}: this API server serves no EndpointSlice API; endpoints are read-only"
            ))
        }
        Shape::NetworkPolicy => {
            k8s::write::network_policy(&parse::<NetworkPolicy>(key, value)?, &mut obj)
        }
    }
    Ok(obj)
}

/// The `status` to write after the object itself, if the value carries one: a pod's addresses
/// and readiness (what the kubelet reports), a load balancer's ingress addresses.
pub fn status(kind: &Kind, key: &str, value: &str) -> Result<Option<Value>, String> {
    Ok(match kind.shape {
        Shape::Pod => k8s::write::pod_status(&parse(key, value)?),
        Shape::Service => k8s::write::service_status(&parse(key, value)?),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::kinds::{all, kind_of, SliceApi};
    use super::*;
    use malla_api::service::{Protocol, ServicePort, ServiceType, TargetPort, TrafficPolicy};
    use malla_api::ContainerPort;

    fn kind(prefix: &str, slices: SliceApi) -> Kind {
        kind_of(&all(slices), prefix).unwrap().clone()
    }

    #[test]
    fn services_round_trip_through_the_native_shape() {
        let k = kind("/malla/services/", SliceApi::V1);
        let svc = Service {
            namespace: "x".into(),
            name: "web".into(),
            kind: ServiceType::NodePort,
            cluster_ips: vec!["198.19.64.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Udp,
                port: 80,
                target_port: Some(TargetPort::Name("web".into())),
                node_port: Some(30080),
            }],
            selector: Some([("app".to_string(), "web".to_string())].into()),
            session_affinity_timeout: Some(30),
            external_traffic_policy: TrafficPolicy::Local,
            internal_traffic_policy: TrafficPolicy::Cluster,
            external_ips: vec!["198.18.200.1".parse().unwrap()],
            load_balancer_ips: vec![],
        };
        let key = "/malla/services/x/web";
        let loc = k.locate(key).unwrap();
        let obj = write(&k, &loc, key, &to_json(&svc), None).unwrap();
        let (k2, v) = read(&k, &obj).unwrap().unwrap();
        assert_eq!(k2, key);
        assert_eq!(serde_json::from_str::<Service>(&v).unwrap(), svc);
    }

    #[test]
    fn slices_of_both_versions_and_endpoints_are_read() {
        let beta = json!({
            "metadata": {"name": "web-abc", "namespace": "x", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.0.5"], "conditions": {"ready": true}, "topology": {"kubernetes.io/hostname": "n1"}, "targetRef": {"kind": "Pod", "name": "a"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        });
        let k = kind("/malla/endpointslices/", SliceApi::V1beta1);
        let (key, v) = read(&k, &beta).unwrap().unwrap();
        assert_eq!(key, "/malla/endpointslices/x/web-abc");
        let s: EndpointSlice = serde_json::from_str(&v).unwrap();
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
        // `targetRef` as namespace/name (the slice's namespace when the reference has none).
        assert_eq!(s.endpoints[0].target.as_deref(), Some("x/a"));
        // Written back as v1beta1 and read again: the same record.
        let loc = k.locate(&key).unwrap();
        let again = write(&k, &loc, &key, &v, None).unwrap();
        assert_eq!(read(&k, &again).unwrap().unwrap().1, v);

        let eps = json!({
            "metadata": {"name": "web", "namespace": "x"},
            "subsets": [{"addresses": [{"ip": "198.18.0.5", "nodeName": "n1"}], "notReadyAddresses": [{"ip": "fd00::5"}], "ports": [{"port": 8080}]}],
        });
        let k = kind("/malla/endpointslices/", SliceApi::Endpoints);
        let recs = read_endpoints(&k, &eps).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].0, "/malla/endpointslices/x/web-v4");
        let v6: EndpointSlice = serde_json::from_str(&recs[1].1).unwrap();
        assert!(!v6.endpoints[0].conditions.ready);
    }

    #[test]
    fn namespaces_get_their_name_label_and_pods_their_status() {
        let k = kind("/malla/namespaces/", SliceApi::V1);
        let (_, v) = read(&k, &json!({"metadata": {"name": "x"}}))
            .unwrap()
            .unwrap();
        let ns: Namespace = serde_json::from_str(&v).unwrap();
        assert_eq!(ns.labels[NAMESPACE_NAME_LABEL], "x");

        let k = kind("/malla/pods/", SliceApi::V1);
        let pod = Pod {
            namespace: "x".into(),
            name: "a".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            node: "n1".into(),
            ports: vec![ContainerPort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            ips: vec!["198.18.0.5".parse().unwrap()],
            allowed_source_prefixes: Vec::new(),
            host_network: false,
        };
        let key = "/malla/pods/x/a";
        let mut obj = write(&k, &k.locate(key).unwrap(), key, &to_json(&pod), None).unwrap();
        obj["status"] = status(&k, key, &to_json(&pod)).unwrap().unwrap();
        let (_, v) = read(&k, &obj).unwrap().unwrap();
        assert_eq!(serde_json::from_str::<Pod>(&v).unwrap(), pod);
    }

    #[test]
    fn custom_records_keep_their_key() {
        let k = kind("/malla/ipam/blocks/", SliceApi::V1);
        let key = "/malla/ipam/blocks/fd00::40-122";
        let loc = k.locate(key).unwrap();
        let obj = write(&k, &loc, key, r#"{"cidr":"fd00::40/122"}"#, None).unwrap();
        assert_ne!(loc.name, "fd00::40-122");
        assert_eq!(
            read(&k, &obj).unwrap().unwrap(),
            (key.to_string(), r#"{"cidr":"fd00::40/122"}"#.to_string())
        );
        assert!(write(&k, &loc, key, "[1]", None).is_err());
    }
}
