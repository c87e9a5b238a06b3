//! The Kubernetes [`malla_store::Syncer`] (kube-runtime's watcher) against a real
//! kube-apiserver (v1.20, built by `scripts/k8s-control-plane`) with its own etcd: the feed
//! survives an API server restart with changes made during and after it, and a 410 Gone (etcd
//! history compacted while the server was away) makes it list again, reporting what vanished
//! meanwhile as deletions. In both the consumer ends with exactly the server's state.

mod conformance;
mod kube_cluster;

use std::time::Duration;

use conformance::{listed, pool_json, synced, Held};
use kube_cluster::connect;
use malla_api::keys;
use malla_store::kubernetes::kinds;
use malla_store::{EtcdStore, KubeStore, Resource, Store, Syncer};
use malla_test_kit::control_plane::{ControlPlane, ETCD_PREFIX};

/// A control plane with Malla's definitions and `names` as pools; an admin client, and a
/// second one to follow the cluster with.
fn cluster_with_pools(names: &[&str]) -> (ControlPlane, tempfile::TempDir, KubeStore, KubeStore) {
    let (cp, dir) = kube_cluster::start("malla-kube-syncer");
    let admin = connect(&cp);
    admin.install_crds().unwrap();
    for (i, n) in names.iter().enumerate() {
        admin.put(&pool(n), &pool_json(n, i as u8)).unwrap();
    }
    let watcher = connect(&cp);
    (cp, dir, admin, watcher)
}

/// Retries a write until the restarted API server takes it.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, malla_store::StoreError>) -> T {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(t) => return t,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("{what}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn pool(name: &str) -> String {
    keys::pool(name)
}

/// The consumer holds what the server has, and keeps holding it (nothing stale arrives late).
fn assert_holds_the_server_state(held: &mut Held, syncer: &mut dyn Syncer, s: &dyn Store) {
    let want = listed(s, keys::POOLS);
    assert!(
        held.follow(syncer, Duration::from_secs(60), |h| h.under(keys::POOLS)
            == want),
        "the syncer's pools {:?} never became the server's {:?}",
        held.under(keys::POOLS).keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    // Nothing stale (a resurrected delete, an old value) comes after.
    for _ in 0..10 {
        held.apply(syncer.next(Duration::from_millis(200)).unwrap_or_default());
    }
    assert_eq!(held.under(keys::POOLS), want);
}

#[test]
fn syncer_resumes_after_the_apiserver_restarts() {
    let (mut cp, _dir, admin, watcher) = cluster_with_pools(&["r-a", "r-b", "r-c"]);
    let (mut syncer, mut held) = synced(&watcher);
    assert_eq!(held.under(keys::POOLS), listed(&admin, keys::POOLS));
    // Native objects arrive typed too.
    match held.records.get(&keys::namespace("default")) {
        Some(Resource::Namespace(ns)) => assert_eq!(ns.name, "default"),
        other => panic!("namespace default arrived as {other:?}"),
    }

    cp.stop_apiserver();
    assert!(admin.revision().is_err(), "the API server is stopped");
    // The consumer keeps asking while the server is away: errors, no bogus updates.
    for _ in 0..5 {
        if let Ok(events) = syncer.next(Duration::from_millis(200)) {
            held.apply(events);
        }
    }
    assert_eq!(held.under(keys::POOLS).len(), 3);
    cp.start_apiserver().unwrap();
    // During: right after the restart, while the watch is still reconnecting.
    eventually("delete r-a", || admin.delete(&pool("r-a"), None));
    eventually("update r-b", || {
        admin.put(&pool("r-b"), &pool_json("r-b", 20))
    });
    eventually("create r-d", || {
        admin.put(&pool("r-d"), &pool_json("r-d", 21))
    });
    assert_holds_the_server_state(&mut held, &mut *syncer, &admin);
    // After: the resumed watch follows ordinary changes.
    admin.delete(&pool("r-c"), None).unwrap();
    admin.put(&pool("r-e"), &pool_json("r-e", 22)).unwrap();
    assert_holds_the_server_state(&mut held, &mut *syncer, &admin);
    for gone in ["r-a", "r-c"] {
        assert!(
            held.deleted.contains(&pool(gone)),
            "{gone} was not seen deleted"
        );
        assert!(!held.records.contains_key(&pool(gone)), "{gone} came back");
    }
    match held.records.get(&pool("r-b")) {
        Some(Resource::Pool(p)) => assert_eq!(p.cidr.to_string(), "198.19.20.0/24"),
        other => panic!("r-b is {other:?}"),
    }
}

#[test]
fn syncer_relists_on_410_and_reports_what_vanished() {
    let (mut cp, _dir, admin, watcher) = cluster_with_pools(&["g-a", "g-b", "g-c"]);
    let (mut syncer, mut held) = synced(&watcher);
    assert_eq!(held.in_syncs, 1);

    // While the API server is away, g-a goes (straight from etcd, where the server keeps it)
    // and etcd's history is compacted: the watch cannot resume from where it was (410 Gone).
    cp.stop_apiserver();
    let etcd =
        EtcdStore::connect(&[cp.etcd_endpoint()], ETCD_PREFIX, Duration::from_secs(10)).unwrap();
    let key = pool("g-a");
    let name = kinds::object_name(&key, &key[keys::POOLS.len()..]);
    let object = format!("/{}/ippools/{name}", kinds::GROUP);
    assert!(
        etcd.delete(&object, None).unwrap().is_some(),
        "{object} is not in etcd"
    );
    etcd.compact(etcd.revision().unwrap()).unwrap();
    cp.start_apiserver().unwrap();
    eventually("update g-b", || {
        admin.put(&pool("g-b"), &pool_json("g-b", 30))
    });

    let want = listed(&admin, keys::POOLS);
    assert!(!want.contains_key(&key));
    assert!(
        held.follow(&mut *syncer, Duration::from_secs(60), |h| {
            h.in_syncs >= 2 && h.under(keys::POOLS) == want
        }),
        "no re-list to the server's state: {held:?}"
    );
    assert!(
        held.relisted.contains(&key),
        "g-a's deletion was not reported by the re-list"
    );
    assert_holds_the_server_state(&mut held, &mut *syncer, &admin);
}
