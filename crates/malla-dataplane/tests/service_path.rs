//! The service path in the kernel (real nftables, a namespace of its own): after a full apply,
//! Services created, deleted and reshaped reach the kernel as the plans the calculation makes
//! against the driver's model ([`malla_calc::services::plan_service_changes`]) — element
//! changes over nfnetlink for a plain service, the plan's text through `nft` for one with
//! chains of its own — and after each step the kernel's table is what a full render of the
//! new cluster loads into a fresh namespace (objects, rules and elements; handles and order
//! aside). Then a pool change patches the pool sets the same way. Needs root; skipped
//! otherwise.

use std::collections::BTreeSet;
use std::net::IpAddr;

use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort, ServiceType, TrafficPolicy,
};
use malla_api::{IpPool, Node};
use malla_calc::services::{plan_service_changes, ProxyService, ProxySlice};
use malla_calc::ClusterView;
use malla_dataplane::driver::{Driver, Update};
use malla_dataplane::linux::LinuxDriver;
use malla_dataplane::netns::{self, NetNs};

mod common;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn service(
    name: &str,
    kind: ServiceType,
    ips: &[&str],
    port: u16,
    node_port: Option<u16>,
) -> Service {
    Service {
        namespace: "default".into(),
        name: name.into(),
        kind,
        cluster_ips: ips.iter().map(|s| ip(s)).collect(),
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port,
            target_port: None,
            node_port,
        }],
        ..Service::default()
    }
}

fn slice(svc: &str, t: AddressType, eps: &[(&str, &str)]) -> EndpointSlice {
    EndpointSlice {
        namespace: "default".into(),
        name: format!("{svc}-{t:?}").to_lowercase(),
        service: svc.into(),
        address_type: t,
        endpoints: eps
            .iter()
            .map(|(a, node)| Endpoint {
                addresses: vec![ip(a)],
                conditions: EndpointConditions {
                    ready: true,
                    serving: Some(true),
                    terminating: false,
                },
                node_name: Some(node.to_string()),
                target: None,
            })
            .collect(),
        ports: vec![EndpointPort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
    }
}

/// A cluster of a few services of each kind.
fn cluster() -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut s = vec![
        service("web", ServiceType::ClusterIP, &["198.19.96.10"], 80, None),
        service(
            "dual",
            ServiceType::ClusterIP,
            &["198.19.96.11", "fd00:96::11"],
            80,
            None,
        ),
        service(
            "np",
            ServiceType::NodePort,
            &["198.19.96.12"],
            80,
            Some(30080),
        ),
        service(
            "sticky",
            ServiceType::ClusterIP,
            &["198.19.96.13"],
            80,
            None,
        ),
    ];
    s[2].external_traffic_policy = TrafficPolicy::Local;
    s[3].session_affinity_timeout = Some(600);
    let e = vec![
        slice(
            "web",
            AddressType::IPv4,
            &[
                ("198.18.0.1", "a"),
                ("198.18.0.65", "b"),
                ("198.18.0.66", "b"),
            ],
        ),
        slice("dual", AddressType::IPv4, &[("198.18.0.2", "a")]),
        slice(
            "dual",
            AddressType::IPv6,
            &[("fd00:198:18::2", "a"), ("fd00:198:18::42", "b")],
        ),
        slice(
            "np",
            AddressType::IPv4,
            &[("198.18.0.3", "a"), ("198.18.0.67", "b")],
        ),
        slice(
            "sticky",
            AddressType::IPv4,
            &[("198.18.0.4", "a"), ("198.18.0.68", "b")],
        ),
    ];
    (s, e)
}

fn view(services: &[Service], slices: &[EndpointSlice]) -> ClusterView {
    ClusterView {
        nodes: vec![Node {
            name: "a".into(),
            underlay_ipv4: Some(ip("198.19.0.11").to_string().parse().unwrap()),
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: malla_api::format_mac(&malla_api::mac_from_name("a")),
        }],
        pools: vec![IpPool {
            name: "v4".into(),
            cidr: "198.18.0.0/16".parse().unwrap(),
            block_size: 26,
            nat_outgoing: true,
            disabled: false,
        }],
        services: services.iter().map(ProxyService::from).collect(),
        endpoint_slices: slices.iter().map(ProxySlice::from).collect(),
        ..ClusterView::default()
    }
}

/// `nft -j list table inet malla` in `ns`, with what differs between two ways of loading the
/// same table taken out: rule handles, and the order of objects and of elements.
fn listing(ns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "malla",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    fn normalize(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("handle");
                for x in m.values_mut() {
                    normalize(x);
                }
                if let Some(serde_json::Value::Array(a)) = m.get_mut("elem") {
                    a.sort_by_key(|x| x.to_string());
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(normalize),
            _ => {}
        }
    }
    normalize(&mut json);
    let mut objects: Vec<String> = json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o.get("metainfo").is_none())
        .map(|o| o.to_string())
        .collect();
    objects.sort();
    objects
}

/// What a full render of `view` loads into a fresh namespace.
fn rendered(view: &ClusterView, fresh: &str) -> Vec<String> {
    let full = malla_calc::compute(view, "a");
    let text = malla_calc::services::ruleset(&full.nft_table, &full.service_map);
    let ns = NetNs::open_named(fresh).unwrap();
    let _ = malla_dataplane::nft::apply(Some(&ns), "table inet malla\ndelete table inet malla\n");
    malla_dataplane::nft::apply(Some(&ns), &text).unwrap();
    listing(fresh)
}

async fn steps(me: String, fresh: String) {
    let (mut services, mut slices) = cluster();
    let mut driver = LinuxDriver::connect("a", "ul0").unwrap();
    driver.start().await.unwrap();
    let v = view(&services, &slices);
    driver
        .apply(Update::Full(Box::new(malla_calc::compute(&v, "a"))))
        .await
        .unwrap();
    assert_eq!(listing(&me), rendered(&v, &fresh));

    type Step = Box<dyn Fn(&mut Vec<Service>, &mut Vec<EndpointSlice>)>;
    let steps: Vec<(&str, &str, Step)> = vec![
        (
            "a plain service created",
            "new",
            Box::new(|s, e| {
                s.push(service(
                    "new",
                    ServiceType::ClusterIP,
                    &["198.19.96.20"],
                    80,
                    None,
                ));
                e.push(slice(
                    "new",
                    AddressType::IPv4,
                    &[("198.18.0.9", "a"), ("198.18.0.70", "b")],
                ));
            }),
        ),
        (
            "a NodePort service created",
            "np2",
            Box::new(|s, e| {
                s.push(service(
                    "np2",
                    ServiceType::NodePort,
                    &["198.19.96.21"],
                    443,
                    Some(30443),
                ));
                e.push(slice("np2", AddressType::IPv4, &[("198.18.0.71", "b")]));
            }),
        ),
        (
            "a plain service deleted",
            "web",
            Box::new(|s, e| {
                s.retain(|x| x.name != "web");
                e.retain(|x| x.service != "web");
            }),
        ),
        (
            "a service with affinity made plain",
            "sticky",
            Box::new(|s, _| {
                s.iter_mut()
                    .find(|x| x.name == "sticky")
                    .unwrap()
                    .session_affinity_timeout = None;
            }),
        ),
        (
            "a NodePort service made a ClusterIP one",
            "np",
            Box::new(|s, _| {
                let np = s.iter_mut().find(|x| x.name == "np").unwrap();
                np.kind = ServiceType::ClusterIP;
                np.ports[0].node_port = None;
            }),
        ),
        (
            "a NodePort service deleted",
            "np2",
            Box::new(|s, e| {
                s.retain(|x| x.name != "np2");
                e.retain(|x| x.service != "np2");
            }),
        ),
        (
            "the last IPv6 service deleted",
            "dual",
            Box::new(|s, e| {
                s.retain(|x| x.name != "dual");
                e.retain(|x| x.service != "dual");
            }),
        ),
    ];
    for (what, name, change) in steps {
        change(&mut services, &mut slices);
        let v = view(&services, &slices);
        let (table, map) = driver
            .service_model()
            .expect("a model after the full apply");
        let changed = BTreeSet::from([format!("default/{name}")]);
        let plan = plan_service_changes(table, map, &v.services, &v.endpoint_slices, "a", &changed)
            .unwrap_or_else(|| panic!("{what}: the service path declined"));
        driver
            .apply(Update::Endpoints(plan))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(listing(&me), rendered(&v, &fresh), "{what}");
        // The driver's model is the render too.
        let full = malla_calc::compute(&v, "a");
        let (table, map) = driver.service_model().unwrap();
        assert_eq!(*table, full.nft_table, "{what}: the model");
        assert_eq!(*map, full.service_map, "{what}: the service map");
    }

    // A pool added and natOutgoing switched off: the pool sets patched, as the agent does.
    let mut v = view(&services, &slices);
    v.pools[0].nat_outgoing = false;
    v.pools.push(IpPool {
        name: "v6".into(),
        cidr: "fd00:198:18::/64".parse().unwrap(),
        block_size: 122,
        nat_outgoing: true,
        disabled: false,
    });
    let (table, map) = driver.service_model().unwrap();
    map.pod_cidrs = v.pools.iter().map(|p| p.cidr).collect();
    map.pod_cidrs.sort();
    let patch = malla_calc::masquerade::pools_patch(table, &v.pools);
    assert!(!patch.after.sets.is_empty());
    patch.apply_to(table);
    driver
        .apply(Update::Endpoints(
            malla_calc::services::EndpointPlan::patch(patch),
        ))
        .await
        .unwrap();
    assert_eq!(listing(&me), rendered(&v, &fresh), "pools");
    let full = malla_calc::compute(&v, "a");
    let (table, map) = driver.service_model().unwrap();
    assert_eq!(*table, full.nft_table, "pools: the model");
    assert_eq!(*map, full.service_map, "pools: the service map");
}

#[test]
fn services_created_deleted_and_reshaped_reach_the_kernel_as_a_render_would() {
    if !common::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let me = format!("mlt-svcpath-{}", std::process::id());
    let fresh = format!("mlt-svcfull-{}", std::process::id());
    netns::create(&fresh).unwrap();
    let (m, f) = (me.clone(), fresh.clone());
    let result = std::panic::catch_unwind(|| common::in_namespace(&me, false, move || steps(m, f)));
    netns::delete(&fresh).unwrap();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
