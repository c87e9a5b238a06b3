//! Each kind: valid manifests (with fields Kubernetes has and Malla ignores) are accepted; a
//! misspelt field, a bad address, a port out of range or a wrong type is refused naming the
//! field; objects from a server are read leniently; what is written reads back the same.

use serde_json::{json, Value};

use super::manifest::{parse, Object};
use super::*;
use crate::policy::NetworkPolicy;
use crate::service::{
    AddressType, EndpointSlice, Protocol, ServicePort, ServiceType, TargetPort, TrafficPolicy,
};
use crate::{ContainerPort, Namespace, Pod};

/// The error of a one-document manifest, which must fail.
fn refused(yaml: &str) -> String {
    match parse(yaml) {
        Ok(docs) => panic!("accepted: {docs:?}"),
        Err(e) => e.to_string(),
    }
}

/// Each `(from, to, expected)`: `base` with `from` replaced by `to` is refused with `expected` in
/// the message.
fn each_refused(base: &str, cases: &[(&str, &str, &str)]) {
    for (from, to, expected) in cases {
        assert!(base.contains(from), "{from:?} is not in the manifest");
        let e = refused(&base.replace(from, to));
        assert!(
            e.contains(expected),
            "{from} -> {to}: expected {expected:?} in: {e}"
        );
    }
}

fn one(yaml: &str) -> Object {
    let mut docs = parse(yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs.len(), 1);
    docs.remove(0).object
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {note: "kept out of Malla's model"}
spec:
  nodeName: node-2
  restartPolicy: Always
  containers:
  - name: web
    image: nginx:1.27
    imagePullPolicy: IfNotPresent
    resources: {limits: {cpu: 1, memory: 64Mi}}
    env: [{name: A, value: b}]
    ports:
    - containerPort: 80
      name: http
    - containerPort: 53
      protocol: UDP
"#;

#[test]
fn pods_keep_what_malla_uses_and_accept_the_rest() {
    let Object::Pod(p) = one(POD) else { panic!() };
    assert_eq!(
        p,
        Pod {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            node: "node-2".into(),
            ports: vec![
                ContainerPort {
                    name: Some("http".into()),
                    protocol: Protocol::Tcp,
                    port: 80
                },
                ContainerPort {
                    name: None,
                    protocol: Protocol::Udp,
                    port: 53
                },
            ],
            ips: vec![],
            allowed_source_prefixes: vec![],
            host_network: false,
        }
    );
}

#[test]
fn pod_typos_are_refused_naming_the_field() {
    each_refused(
        POD,
        &[
            ("  labels:", "  label:", "document 1 (Pod \"shop/web-1\"): metadata.label: unknown field (did you mean \"labels\"?)"),
            ("nodeName:", "nodename:", "spec.nodename: unknown field (did you mean \"nodeName\"?)"),
            ("- containerPort: 80", "- port: 80", "spec.containers[0].ports[0].port: unknown field; valid fields here: containerPort, hostIP, hostPort, name, protocol"),
            ("imagePullPolicy", "imagePullPolicyy", "spec.containers[0].imagePullPolicyy: unknown field"),
        ],
    );
}

#[test]
fn pod_values_are_checked_naming_the_field() {
    each_refused(
        POD,
        &[
            (
                "containerPort: 80",
                "containerPort: 70000",
                "spec.containers[0].ports[0].containerPort: 70000 is outside 1-65535",
            ),
            (
                "containerPort: 80",
                "containerPort: eighty",
                "spec.containers[0].ports[0].containerPort: invalid type",
            ),
            (
                "containerPort: 80",
                "containerPort: 4294967377",
                "spec.containers[0].ports[0].containerPort",
            ),
            (
                "protocol: UDP",
                "protocol: ICMP",
                "spec.containers[0].ports[1].protocol: \"ICMP\"",
            ),
            (
                "name: http",
                "name: Not_A_Name",
                "spec.containers[0].ports[0].name",
            ),
            (
                "{app: web}",
                "{app: 1}",
                "metadata.labels.app: invalid type: integer",
            ),
            ("name: web-1", "name: Web_1", "metadata.name"),
        ],
    );
    let e = refused("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n");
    assert!(
        e.contains("spec.containers: must have at least one container"),
        "{e}"
    );
    let e = refused(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{image: x}]}\n",
    );
    assert!(e.contains("spec.containers[0].name: is required"), "{e}");
    let e = refused("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n");
    assert!(e.contains("spec: is required"), "{e}");
    let e = refused("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 300.1.1.1}\n");
    assert!(
        e.contains("status.podIP: \"300.1.1.1\" is not an IP address"),
        "{e}"
    );
}

#[test]
fn documents_are_named_and_bad_files_refused() {
    let e = refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: s}\n");
    assert!(e.starts_with("document 2 (ConfigMap \"s\"): kind:"), "{e}");
    let e = refused(": : :\n");
    assert!(e.starts_with("document 1: not valid YAML"), "{e}");
    let e = refused("- a\n");
    assert!(e.contains("must be a mapping"), "{e}");
    let e = refused("apiVersion: apps/v1\nkind: Pod\nmetadata: {name: a}\n");
    assert!(
        e.contains("apiVersion: \"apps/v1\" is not supported for Pod"),
        "{e}"
    );
    let e = refused("kind: Pod\nmetadata: {name: a}\n");
    assert!(e.contains("apiVersion: is required"), "{e}");
    let e = refused("apiVersion: v1\nkind: [Pod]\n");
    assert!(e.contains("kind: must be a string"), "{e}");
    assert_eq!(refused("---\n---\n"), "no objects in manifest");
    let e = refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n");
    assert!(
        e.contains("metadata.name: a namespace name is a DNS label"),
        "{e}"
    );
    let e =
        refused("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nspec: {finalizer: [x]}\n");
    assert!(
        e.contains("spec.finalizer: unknown field (did you mean \"finalizers\"?)"),
        "{e}"
    );
    // Hostile input: deep nesting, huge numbers, odd keys: an error, never a panic.
    let deep = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {}{}\n",
        "[".repeat(200),
        "]".repeat(200)
    );
    assert!(parse(&deep).is_err());
    assert!(parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {1: 2}}\n").is_err());
    assert!(parse(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 1e99}]}\n"
    )
    .is_err());
}

#[test]
fn namespaces() {
    let Object::Namespace(ns) =
        one("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: a}}\n")
    else {
        panic!()
    };
    assert_eq!(
        ns,
        Namespace {
            name: "shop".into(),
            labels: [("team".to_string(), "a".to_string())].into()
        }
    );
}

const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db, namespace: shop}
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
      namespaceSelector: {}
    - ipBlock: {cidr: 198.18.0.0/16, except: [198.18.1.0/24]}
    ports:
    - {port: 5432}
    - {protocol: UDP, port: 1000, endPort: 2000}
    - {port: pg}
  egress:
  - to: [{ipBlock: {cidr: "fd00::/8"}}]
"#;

#[test]
fn network_policies() {
    let Object::NetworkPolicy(p) = one(POLICY) else {
        panic!()
    };
    // The same as Malla's own serde reading of the spec, which mirrors the native shape.
    let doc: Value = serde_yaml::from_str(POLICY).unwrap();
    let expected = NetworkPolicy {
        namespace: "shop".into(),
        name: "db".into(),
        spec: serde_json::from_value(doc["spec"].clone()).unwrap(),
    };
    assert_eq!(p, expected);
    assert_eq!(p.spec.ingress[0].ports[1].end_port, Some(2000));
    assert_eq!(
        p.spec.ingress[0].ports[2].port,
        Some(TargetPort::Name("pg".into()))
    );
}

#[test]
fn network_policy_typos_and_values_are_refused() {
    // The issue's typo: without strictness this was an empty selector, a namespace-wide deny.
    each_refused(
        POLICY,
        &[
            ("matchLabels: {app: db}", "matchLabel: {app: db}", "document 1 (NetworkPolicy \"shop/db\"): spec.podSelector.matchLabel: unknown field (did you mean \"matchLabels\"?); valid fields here: matchExpressions, matchLabels"),
            ("ipBlock: {cidr: 198", "ipBlock: {cird: 198", "spec.ingress[0].from[1].ipBlock.cird: unknown field"),
            ("- {port: 5432}", "- {port: 70000}", "spec.ingress[0].ports[0].port"),
            ("198.18.0.0/16", "198.18.0.0/33", "spec.ingress[0].from[1].ipBlock.cidr"),
            ("policyTypes: [Ingress, Egress]", "policyTypes: [Ingres]", "spec.policyTypes[0]"),
            ("operator: In", "operator: Within", "spec.ingress[0].from[0].podSelector"),
        ],
    );
    let e = refused(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\nspec: {ingress: 3}\n",
    );
    assert!(e.contains("spec.ingress: invalid type"), "{e}");
}

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {a: b}}
spec:
  type: NodePort
  selector: {app: web}
  sessionAffinity: ClientIP
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv6, IPv4]
  externalIPs: [198.18.200.1]
  externalTrafficPolicy: Local
  publishNotReadyAddresses: false
  ports:
  - {name: http, port: 80, targetPort: http, nodePort: 30080, appProtocol: http}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

#[test]
fn services() {
    let Object::Service(s) = one(SERVICE) else {
        panic!()
    };
    assert_eq!(s.service.kind, ServiceType::NodePort);
    assert_eq!(s.service.session_affinity_timeout, Some(10800));
    assert_eq!(s.family_policy, FamilyPolicy::PreferDualStack);
    assert!(s.ipv6_first && !s.headless);
    assert_eq!(s.service.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(
        s.service.ports[0],
        ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: Some(TargetPort::Name("http".into())),
            node_port: Some(30080)
        }
    );
    assert_eq!(
        s.service.ports[1].target_port,
        Some(TargetPort::Number(5353))
    );
}

#[test]
fn service_typos_and_values_are_refused() {
    each_refused(
        SERVICE,
        &[
            (
                "selector:",
                "selecter:",
                "spec.selecter: unknown field (did you mean \"selector\"?)",
            ),
            (
                "targetPort: 5353",
                "targetport: 5353",
                "spec.ports[1].targetport: unknown field (did you mean \"targetPort\"?)",
            ),
        ],
    );
    each_refused(
        SERVICE,
        &[
            (
                "port: 80,",
                "port: 99999,",
                "spec.ports[0].port: 99999 is outside",
            ),
            ("port: 80,", "port: x,", "spec.ports[0].port: invalid type"),
            (
                "nodePort: 30080",
                "nodePort: 80",
                "spec.ports[0].nodePort: 80 is outside 30000-32767",
            ),
            (
                "198.18.200.1",
                "198.18.200.x",
                "spec.externalIPs[0]: \"198.18.200.x\" is not an IP address",
            ),
            (
                "type: NodePort",
                "type: ExternalName",
                "spec.type: ExternalName",
            ),
            (
                "type: NodePort",
                "type: ClusterIP",
                "spec.ports[0].nodePort: only NodePort and LoadBalancer",
            ),
            ("ClientIP", "Sticky", "spec.sessionAffinity: \"Sticky\""),
            ("[IPv6, IPv4]", "[IPv7]", "spec.ipFamilies[0]: \"IPv7\""),
            (
                "targetPort: 5353",
                "targetPort: 0",
                "spec.ports[1].targetPort: 0 is outside",
            ),
            (
                "name: dns,",
                "name: http,",
                "spec.ports[1].name: \"http\" is used twice",
            ),
            (
                "protocol: UDP",
                "protocol: udp",
                "spec.ports[1].protocol: \"udp\"",
            ),
            (
                "name: http, port: 80",
                "port: 80",
                "spec.ports[0].name: required when",
            ),
        ],
    );
    let e = refused("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {externalTrafficPolicy: Local, ports: [{port: 80}]}\n");
    assert!(
        e.contains("spec.externalTrafficPolicy: Local is only valid"),
        "{e}"
    );
}

const SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- addresses: [198.18.0.5]
  conditions: {ready: false, serving: true, terminating: true}
  nodeName: n1
  zone: a
  targetRef: {kind: Pod, name: web-a}
ports: [{name: http, port: 8080, appProtocol: http}]
"#;

#[test]
fn endpoint_slices_of_both_versions() {
    let Object::EndpointSlice(s) = one(SLICE) else {
        panic!()
    };
    assert_eq!(s.service, "web");
    assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
    assert_eq!(s.endpoints[0].target.as_deref(), Some("shop/web-a"));
    assert!(s.endpoints[0].conditions.serving() && !s.endpoints[0].conditions.ready);
    let beta = SLICE
        .replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")
        .replace(
            "nodeName: n1\n  zone: a",
            "topology: {kubernetes.io/hostname: n1}",
        );
    let Object::EndpointSlice(b) = one(&beta) else {
        panic!()
    };
    assert_eq!(b, s);
    let e = refused(&beta.replace("topology:", "topolgy:"));
    assert!(e.contains("endpoints[0].topolgy: unknown field"), "{e}");
    let e = refused(&beta.replace("topology: {kubernetes.io/hostname: n1}", "topology: {a: 1}"));
    assert!(e.contains("endpoints[0].topology.a: invalid type"), "{e}");
}

#[test]
fn endpoint_slice_typos_and_values_are_refused() {
    each_refused(
        SLICE,
        &[
            ("nodeName:", "node:", "endpoints[0].node: unknown field"),
            (
                "198.18.0.5",
                "fd00::5",
                "endpoints[0].addresses[0]: fd00::5 does not match addressType IPv4",
            ),
            (
                "198.18.0.5",
                "198.18.0.500",
                "endpoints[0].addresses[0]: \"198.18.0.500\" is not an IP address",
            ),
            (
                "port: 8080",
                "port: -1",
                "ports[0].port: -1 is outside 1-65535",
            ),
            ("addressType: IPv4", "addressType: FQDN", "addressType"),
            (
                "labels: {kubernetes.io/service-name: web}",
                "labels: {}",
                "service-name: is required",
            ),
            (
                "ready: false",
                "ready: maybe",
                "endpoints[0].conditions.ready: invalid type",
            ),
        ],
    );
}

#[test]
fn server_objects_are_read_leniently() {
    // A newer server's field, an ExternalName service, an FQDN slice: read or skipped, not refused.
    let pod = json!({
        "metadata": {"name": "a", "namespace": "x"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "futureField": 1}]},
        "status": {"podIPs": [{"ip": "198.18.0.5"}, {"ip": "fd00::5"}]},
    });
    assert!(read::pod(pod.clone(), Strictness::Strict).is_err());
    let p = read::pod(pod, Strictness::Lenient).unwrap();
    assert_eq!(p.ips.len(), 2);
    let svc = json!({"metadata": {"name": "e", "namespace": "x"}, "spec": {"type": "ExternalName", "externalName": "example.com"}});
    let s = read::service(svc, Strictness::Lenient).unwrap();
    assert!(s.service.cluster_ips.is_empty());
    let fqdn = json!({"metadata": {"name": "s", "namespace": "x"}, "addressType": "FQDN", "endpoints": []});
    assert_eq!(
        read::endpoint_slice(fqdn, SliceVersion::V1, Strictness::Lenient).unwrap(),
        None
    );

    let eps = json!({
        "metadata": {"name": "web", "namespace": "x"},
        "subsets": [{"addresses": [{"ip": "198.18.0.5", "nodeName": "n1", "targetRef": {"name": "a"}}], "notReadyAddresses": [{"ip": "fd00::5"}], "ports": [{"port": 8080}]}],
    });
    let recs = read::endpoints(eps).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].name, "web-v4");
    assert_eq!(recs[0].endpoints[0].target.as_deref(), Some("x/a"));
    assert!(!recs[1].endpoints[0].conditions.ready);
}

#[test]
fn what_is_written_reads_back_the_same() {
    let Object::Service(spec) = one(SERVICE) else {
        panic!()
    };
    let mut svc = spec.service;
    svc.cluster_ips = vec!["198.19.64.10".parse().unwrap()];
    svc.load_balancer_ips = vec!["198.18.201.1".parse().unwrap()];
    let mut obj = json!({"metadata": {"name": "web", "namespace": "shop"}});
    write::service(&svc, &mut obj);
    obj["status"] = write::service_status(&svc).unwrap();
    assert_eq!(read::service(obj, Strictness::Strict).unwrap().service, svc);

    let Object::Pod(mut pod) = one(POD) else {
        panic!()
    };
    pod.ips = vec!["198.18.0.9".parse().unwrap()];
    let mut obj = json!({"metadata": {"name": "web-1", "namespace": "shop"}});
    write::pod(&pod, &mut obj, false);
    obj["status"] = write::pod_status(&pod).unwrap();
    assert_eq!(read::pod(obj, Strictness::Strict).unwrap(), pod);
    pod.allowed_source_prefixes = vec![
        "198.18.5.0/24".parse().unwrap(),
        "fd00:5::/64".parse().unwrap(),
    ];
    pod.host_network = true;
    let mut obj = json!({"metadata": {"name": "web-1", "namespace": "shop"}});
    write::pod(&pod, &mut obj, false);
    obj["status"] = write::pod_status(&pod).unwrap();
    assert_eq!(read::pod(obj, Strictness::Strict).unwrap(), pod);

    let Object::EndpointSlice(slice) = one(SLICE) else {
        panic!()
    };
    for version in [SliceVersion::V1, SliceVersion::V1beta1] {
        let mut obj = json!({"metadata": {"name": "web-1", "namespace": "shop"}});
        write::endpoint_slice(&slice, version, &mut obj);
        assert_eq!(
            read::endpoint_slice(obj, version, Strictness::Strict).unwrap(),
            Some(slice.clone()),
            "{version:?}"
        );
    }

    let Object::NetworkPolicy(p) = one(POLICY) else {
        panic!()
    };
    let mut obj = json!({"metadata": {"name": "db", "namespace": "shop"}});
    write::network_policy(&p, &mut obj);
    assert_eq!(read::network_policy(obj, Strictness::Strict).unwrap(), p);

    let ns = Namespace {
        name: "shop".into(),
        labels: [("a".to_string(), "b".to_string())].into(),
    };
    let mut obj = json!({"metadata": {"name": "shop"}});
    write::namespace(&ns, &mut obj);
    assert_eq!(read::namespace(obj, Strictness::Strict).unwrap(), ns);
    let _ = (AddressType::IPv4, EndpointSlice::clone);
}

#[test]
fn the_example_manifest_is_strictly_valid() {
    let docs =
        parse(include_str!("../../../../examples/demo.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(docs.len() > 3);
}

#[test]
fn allowed_source_prefixes_are_checked_never_widened() {
    let pod = |value: &str| {
        json!({
            "metadata": {"name": "a", "namespace": "x", "annotations": {crate::ALLOWED_SOURCE_PREFIXES: value}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c"}]},
        })
    };
    let p = read::pod(
        pod(" 198.18.5.0/24, fd00:5::/64 ,198.18.9.1"),
        Strictness::Strict,
    )
    .unwrap();
    let want: Vec<ipnet::IpNet> = ["198.18.5.0/24", "fd00:5::/64", "198.18.9.1/32"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(p.allowed_source_prefixes, want);
    assert!(p.host_network);
    for bad in ["0.0.0.0/33", "nope", "198.18.5.1/24", "198.18.5.0/24;rm"] {
        let e = read::pod(pod(bad), Strictness::Strict).unwrap_err();
        assert!(
            e.to_string()
                .contains("metadata.annotations[\"malla.dev/allowed-source-prefixes\"]"),
            "{bad}: {e}"
        );
        // From an API server: the pod is kept, with no extra prefix.
        let p = read::pod(pod(bad), Strictness::Lenient).unwrap();
        assert!(p.allowed_source_prefixes.is_empty(), "{bad}");
    }
}
