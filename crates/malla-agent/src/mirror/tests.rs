//! The mirror against the truth: after every batch of random writes (creates, updates,
//! deletes, a malformed value, blocks changing hands), the view the watch built equals the
//! view a full read builds.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use malla_api::{keys, ClusterConfig, IpPool, Namespace, Node, Pod, RoutingMode, WorkloadEndpoint};
use malla_ipam::{Allocation, Block};
use malla_store::{LocalStore, Store};

use super::{Mirror, WATCH_PREFIX};

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn node(i: u64) -> Node {
    Node {
        name: format!("n{i}"),
        underlay_ipv4: Some(format!("198.18.100.{}", i + 1).parse().unwrap()),
        underlay_ipv6: None,
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(&format!("n{i}"))),
    }
}

fn block(i: u64, owner: u64, allocs: u64) -> Block {
    let mut b = Block::new(
        format!("198.18.{i}.0/26").parse().unwrap(),
        "default",
        Some(&format!("n{owner}")),
    );
    for o in 0..allocs as u32 {
        b.allocations.insert(
            o,
            Allocation {
                handle: format!("h{i}-{o}"),
                attrs: BTreeMap::new(),
            },
        );
    }
    b
}

fn pod(i: u64, label: u64) -> Pod {
    Pod {
        namespace: format!("ns{}", i % 3),
        name: format!("p{i}"),
        labels: [("app".to_string(), format!("a{label}"))].into(),
        node: format!("n{}", i % 4),
        ports: Vec::new(),
        ips: Vec::new(),
        allowed_source_prefixes: Vec::new(),
        host_network: false,
    }
}

fn endpoint(i: u64) -> WorkloadEndpoint {
    WorkloadEndpoint {
        namespace: format!("ns{}", i % 3),
        pod: format!("p{i}"),
        node: format!("n{}", i % 4),
        container_id: format!("c{i}"),
        ifname: "eth0".into(),
        host_ifname: format!("mal{i}"),
        ips: vec![format!("198.18.{}.{}/32", i % 8, i + 1).parse().unwrap()],
        mac: "02:00:00:00:00:01".into(),
        ipam_handle: format!("h{i}"),
    }
}

fn json<T: serde::Serialize>(t: &T) -> String {
    serde_json::to_string(t).unwrap()
}

/// One random write; returns a description for failure messages.
fn write(store: &dyn Store, rng: &mut Rng) -> String {
    let i = rng.below(8);
    let (key, value) = match rng.below(9) {
        0 => (keys::node(&format!("n{}", i % 4)), Some(json(&node(i % 4)))),
        1 => (
            keys::block(&block(i, 0, 0).cidr),
            // Blocks change owner (affinity) and fill up (allocations only).
            Some(json(&block(i, rng.below(4), rng.below(5)))),
        ),
        2 => (
            keys::pod(&format!("ns{}", i % 3), &format!("p{i}")),
            Some(json(&pod(i, rng.below(3)))),
        ),
        3 => (
            keys::endpoint(&format!("n{}", i % 4), &format!("c{i}"), "eth0"),
            Some(json(&endpoint(i))),
        ),
        4 => (
            keys::namespace(&format!("ns{}", i % 3)),
            Some(json(&Namespace {
                name: format!("ns{}", i % 3),
                labels: [("team".to_string(), format!("t{}", rng.below(2)))].into(),
            })),
        ),
        5 => (
            keys::CLUSTER_CONFIG.to_string(),
            Some(json(&ClusterConfig {
                routing: if rng.below(2) == 0 {
                    RoutingMode::Direct
                } else {
                    RoutingMode::Vxlan
                },
                ..ClusterConfig::default()
            })),
        ),
        6 => (
            keys::pool("default"),
            Some(json(&IpPool {
                name: "default".into(),
                cidr: "198.18.0.0/16".parse().unwrap(),
                block_size: 26,
                nat_outgoing: rng.below(2) == 0,
                disabled: false,
            })),
        ),
        // A malformed record must not break the mirror (nor the full read: it skips too).
        7 => (
            keys::pod("ns0", &format!("bad{i}")),
            Some("{not json".to_string()),
        ),
        // Keys the calculation does not read (IPAM handles).
        _ => (keys::handle(&format!("h{i}")), Some("{}".to_string())),
    };
    let value = if rng.below(4) == 0 { None } else { value };
    match &value {
        Some(v) => {
            store.put(&key, v).unwrap();
        }
        None => {
            store.delete(&key, None).unwrap();
        }
    }
    format!("{} {key}", if value.is_some() { "put" } else { "delete" })
}

#[test]
fn a_mirror_fed_by_the_watch_equals_a_full_read_after_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    let mut rng = Rng(0x9e3779b97f4a7c15);
    for _ in 0..20 {
        write(&store, &mut rng);
    }
    let mut mirror = Mirror::load(&store, "n1").unwrap();
    let mut watch = store.watch(WATCH_PREFIX, mirror.revision()).unwrap();
    let mut log = Vec::new();
    for round in 0..60 {
        for _ in 0..rng.below(6) + 1 {
            log.push(write(&store, &mut rng));
        }
        let target = store.revision().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while mirror.revision() < target && Instant::now() < deadline {
            mirror.apply(watch.next(Duration::from_millis(200)).unwrap());
        }
        let want = crate::read_view(&store).unwrap();
        assert_eq!(
            mirror.view(),
            &want,
            "round {round}, after: {}",
            log[log.len().saturating_sub(6)..].join(", ")
        );
        let own: Vec<_> = want
            .blocks
            .iter()
            .filter(|(_, a)| a.as_deref() == Some("n1"))
            .map(|(c, _)| *c)
            .collect();
        assert_eq!(mirror.own_blocks().map(|b| b.cidr).collect::<Vec<_>>(), own);
    }
}

/// The same through the store's syncer (typed updates, `InSync`), on a store keeping so little
/// history that the syncer often has to list again: deletions found by the re-list included,
/// the mirror equals a full read after every batch.
#[test]
fn a_mirror_fed_by_the_syncer_equals_a_full_read_after_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db"))
        .unwrap()
        .with_event_retention(4);
    let mut rng = Rng(0x2545f4914f6cdd1d);
    for _ in 0..20 {
        write(&store, &mut rng);
    }
    let mut mirror = Mirror::new("n1");
    let mut syncer = store.syncer().unwrap();
    let mut in_syncs = 0;
    let mut follow = |mirror: &mut Mirror,
                      in_syncs: &mut usize,
                      until: &dyn Fn(&Mirror) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !until(mirror) && Instant::now() < deadline {
            let (_, in_sync) = mirror.apply_sync(syncer.next(Duration::from_millis(50)).unwrap());
            *in_syncs += usize::from(in_sync);
        }
    };
    follow(&mut mirror, &mut in_syncs, &|m| {
        m.view() == &crate::read_view(&store).unwrap()
    });
    let mut log = Vec::new();
    for round in 0..40 {
        // Enough writes, now and then, to outrun the history kept.
        for _ in 0..rng.below(if round % 5 == 0 { 12 } else { 3 }) + 1 {
            log.push(write(&store, &mut rng));
        }
        let want = crate::read_view(&store).unwrap();
        follow(&mut mirror, &mut in_syncs, &|m| m.view() == &want);
        assert_eq!(
            mirror.view(),
            &want,
            "round {round}, after: {}",
            log[log.len().saturating_sub(12)..].join(", ")
        );
    }
    assert!(in_syncs >= 2, "the syncer never listed again ({in_syncs})");
}

#[test]
fn an_allocation_in_another_nodes_block_is_no_change_for_the_calculation() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    let b = block(3, 2, 1);
    store.put(&keys::block(&b.cidr), &json(&b)).unwrap();
    let mut mirror = Mirror::load(&store, "n1").unwrap();
    let mut watch = store.watch(WATCH_PREFIX, mirror.revision()).unwrap();
    store
        .put(&keys::block(&b.cidr), &json(&block(3, 2, 4)))
        .unwrap();
    let applied = mirror.apply(watch.next(Duration::from_secs(5)).unwrap());
    assert!(!applied.view && !applied.node_cache, "{applied:?}");
    // The same block given to this node is a change to both.
    store
        .put(&keys::block(&b.cidr), &json(&block(3, 1, 4)))
        .unwrap();
    let applied = mirror.apply(watch.next(Duration::from_secs(5)).unwrap());
    assert!(applied.view && applied.node_cache, "{applied:?}");
    // Another pod in it: only the node cache cares.
    store
        .put(&keys::block(&b.cidr), &json(&block(3, 1, 5)))
        .unwrap();
    let applied = mirror.apply(watch.next(Duration::from_secs(5)).unwrap());
    assert!(!applied.view && applied.node_cache, "{applied:?}");
}

#[test]
fn slices_are_kept_as_the_proxy_reads_them() {
    use malla_api::service::{AddressType, Endpoint, EndpointSlice};
    use malla_calc::services::NodeName;
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    for (name, ip) in [("a", "198.18.0.5"), ("b", "198.18.0.6")] {
        let slice = EndpointSlice {
            namespace: "default".into(),
            name: format!("{name}-xyz"),
            service: name.into(),
            address_type: AddressType::IPv4,
            endpoints: vec![Endpoint {
                addresses: vec![ip.parse().unwrap()],
                conditions: Default::default(),
                node_name: Some("n2".into()),
                target: Some(format!("default/pod-{name}")),
            }],
            ports: vec![],
        };
        store
            .put(&keys::endpoint_slice("default", &slice.name), &json(&slice))
            .unwrap();
    }
    let mirror = Mirror::load(&store, "n1").unwrap();
    let kept: Vec<(String, String, Option<NodeName>)> = mirror
        .view()
        .endpoint_slices
        .iter()
        .map(|s| {
            (
                s.service.to_string(),
                s.endpoints[0].ip.to_string(),
                s.endpoints[0].node,
            )
        })
        .collect();
    let n2 = Some(NodeName::intern("n2"));
    assert_eq!(
        kept,
        vec![
            ("default/a".to_string(), "198.18.0.5".to_string(), n2),
            ("default/b".to_string(), "198.18.0.6".to_string(), n2),
        ]
    );
}

/// Policy inputs are reported by key: a pod's labels, a namespace, a policy alone are no
/// "other" change (only the policy program reads them); an endpoint record is a links change
/// and a policy input, never "other"; a write that changes nothing reports nothing.
#[test]
fn policy_inputs_are_reported_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    store
        .put(&keys::pod("ns1", "p1"), &json(&pod(1, 0)))
        .unwrap();
    let mut mirror = Mirror::load(&store, "n1").unwrap();
    let mut watch = store.watch(WATCH_PREFIX, mirror.revision()).unwrap();
    let mut next = |mirror: &mut Mirror| mirror.apply(watch.next(Duration::from_secs(5)).unwrap());
    let id = |ns: &str, name: &str| (ns.to_string(), name.to_string());

    store
        .put(&keys::pod("ns1", "p1"), &json(&pod(1, 2)))
        .unwrap();
    let applied = next(&mut mirror);
    assert!(applied.view && !applied.other, "{applied:?}");
    assert_eq!(applied.policy.pods, [id("ns1", "p1")].into());
    store
        .put(&keys::pod("ns1", "p1"), &json(&pod(1, 2)))
        .unwrap();
    let applied = next(&mut mirror);
    assert!(!applied.view && applied.policy.is_empty(), "{applied:?}");

    let ns = Namespace {
        name: "ns1".into(),
        labels: [("team".to_string(), "a".to_string())].into(),
    };
    store.put(&keys::namespace("ns1"), &json(&ns)).unwrap();
    let applied = next(&mut mirror);
    assert!(applied.view && !applied.other, "{applied:?}");
    assert_eq!(applied.policy.namespaces, ["ns1".to_string()].into());

    let np: malla_api::policy::NetworkPolicy = serde_json::from_value(serde_json::json!({
        "namespace": "ns1", "name": "deny", "spec": {"podSelector": {}}
    }))
    .unwrap();
    store
        .put(&keys::network_policy("ns1", "deny"), &json(&np))
        .unwrap();
    let applied = next(&mut mirror);
    assert!(applied.view && !applied.other, "{applied:?}");
    assert_eq!(applied.policy.policies, [id("ns1", "deny")].into());
    store
        .delete(&keys::network_policy("ns1", "deny"), None)
        .unwrap();
    let applied = next(&mut mirror);
    assert_eq!(applied.policy.policies, [id("ns1", "deny")].into());

    let ep = endpoint(1);
    store
        .put(&keys::endpoint("n1", "c1", "eth0"), &json(&ep))
        .unwrap();
    let applied = next(&mut mirror);
    assert!(
        applied.view && applied.links && !applied.other,
        "{applied:?}"
    );
    assert_eq!(applied.policy.pods, [id("ns1", "p1")].into());
    // This node's own record: its addresses in the service map, and the links; not the whole
    // node.
    let me = malla_api::Node {
        name: "n1".into(),
        underlay_ipv4: Some("198.19.0.11".parse().unwrap()),
        underlay_ipv6: None,
        underlay_mtu: 1500,
        vtep_mac: malla_api::format_mac(&malla_api::mac_from_name("n1")),
    };
    store.put(&keys::node("n1"), &json(&me)).unwrap();
    let applied = next(&mut mirror);
    assert!(
        applied.links && applied.own_node && !applied.other,
        "{applied:?}"
    );
    let other = malla_api::Node {
        name: "n2".into(),
        ..me
    };
    store.put(&keys::node("n2"), &json(&other)).unwrap();
    let applied = next(&mut mirror);
    assert!(
        applied.links && !applied.own_node && !applied.other,
        "{applied:?}"
    );
}

/// Services are found by the key they carry (`namespace/name`): one stored under another
/// service's key is skipped (it would break the order the mirror searches), the others kept.
#[test]
fn a_service_stored_under_another_services_key_is_skipped() {
    let svc = |name: &str| -> malla_api::service::Service {
        serde_json::from_value(serde_json::json!({
            "namespace": "ns1", "name": name, "clusterIps": ["198.19.64.1"],
            "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]
        }))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    store
        .put(&keys::service("ns1", "a"), &json(&svc("a")))
        .unwrap();
    store
        .put(&keys::service("ns1", "b"), &json(&svc("other")))
        .unwrap();
    store
        .put(&keys::service("ns1", "c"), &json(&svc("c")))
        .unwrap();
    let mirror = Mirror::load(&store, "n1").unwrap();
    let names: Vec<&str> = mirror.view().services.iter().map(|s| &*s.key).collect();
    assert_eq!(names, ["ns1/a", "ns1/c"]);
}
