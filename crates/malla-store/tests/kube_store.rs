//! The Kubernetes datastore against a real kube-apiserver (v1.20, built by
//! `scripts/k8s-control-plane`) with its own etcd on loopback: the backend-independent store
//! suite (keys as `IPPool` custom resources), three agents claiming IPAM blocks at once, and a
//! watch that resumes after the API server restarts.

mod conformance;
mod kube_cluster;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kube_cluster::connect;
use malla_api::{keys, IpPool};
use malla_ipam::{AutoAssign, Ipam};
use malla_store::{KubeStore, Store};

/// Deletes every object under `prefix` (a fresh store for the next case).
fn wipe(s: &dyn Store, prefix: &str) {
    let (kvs, _) = s.list(prefix).unwrap();
    for kv in kvs {
        s.delete(&kv.key, None).unwrap();
    }
}

#[test]
fn kubernetes_store_conformance_ipam_and_watch_resume() {
    let (mut cp, _dir) = kube_cluster::start("malla-kube-store");
    let admin = connect(&cp);
    admin.install_crds().unwrap();

    // 1. The suite every backend runs, on IPPool objects.
    conformance::set_profile(conformance::Profile {
        key_prefix: "/malla/pools/t",
        json_values: true,
        exact_revisions: false,
        create_revisions: false,
    });
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let fresh = || -> Box<dyn Fn() -> Box<dyn Store> + Sync> {
        wipe(&admin, keys::POOLS);
        let kubeconfig = kubeconfig.clone();
        Box::new(move || -> Box<dyn Store> {
            Box::new(KubeStore::connect(Some(&kubeconfig), Duration::from_secs(10)).unwrap())
        })
    };
    conformance::run_all(&fresh, false);
    wipe(&admin, keys::POOLS);

    // 2. Three agents (each its own client) claim blocks and addresses at once.
    Ipam::new(&admin)
        .ensure_pool(&IpPool {
            name: "default-ipv4".into(),
            cidr: "198.18.0.0/22".parse().unwrap(),
            block_size: 28,
            nat_outgoing: false,
            disabled: false,
        })
        .unwrap();
    const NODES: usize = 3;
    const PER_NODE: usize = 40;
    let start = Instant::now();
    let results: Vec<Vec<(String, IpAddr)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..NODES)
            .map(|n| {
                let store = connect(&cp);
                sc.spawn(move || {
                    let ipam = Ipam::new(&store);
                    (0..PER_NODE)
                        .map(|i| {
                            let handle = format!("malla.n{n}-{i}.eth0");
                            let a = ipam
                                .auto_assign(&AutoAssign {
                                    handle: handle.clone(),
                                    node: format!("node-{n}"),
                                    ipv4: true,
                                    ipv6: false,
                                    attrs: BTreeMap::new(),
                                    ..Default::default()
                                })
                                .unwrap();
                            (handle, a[0].addr)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "{} addresses claimed by {NODES} agents in {:?}",
        NODES * PER_NODE,
        start.elapsed()
    );
    let mut seen: HashMap<IpAddr, String> = HashMap::new();
    for (h, a) in results.iter().flatten() {
        if let Some(other) = seen.insert(*a, h.clone()) {
            panic!("{a} handed to {other} and {h}");
        }
    }
    assert_eq!(seen.len(), NODES * PER_NODE);
    let ipam = Ipam::new(&admin);
    let blocks = ipam.blocks().unwrap();
    // /28 blocks of 16: each node needed three, each claimed by exactly one node.
    assert!(blocks.len() >= NODES * 3, "{} blocks", blocks.len());
    for b in &blocks {
        let node = b.affinity.clone().expect("claimed blocks have an affinity");
        for (addr, holder) in b.allocated() {
            assert_eq!(seen[&addr], holder);
            let n: usize = holder["malla.n".len()..holder.find('-').unwrap()]
                .parse()
                .unwrap();
            assert_eq!(format!("node-{n}"), node, "{addr} in {}", b.cidr);
        }
    }
    // Visible to kubectl, with the printer columns.
    let out = cp.kubectl_run(&["get", "ipamblocks"], None).unwrap();
    assert!(out.contains("CIDR") && out.contains("node-0"), "{out}");
    for (h, a) in results.iter().flatten() {
        assert_eq!(ipam.release_by_handle(h).unwrap(), vec![*a]);
    }
    assert!(ipam.handles().unwrap().is_empty());

    // 3. A watch resumes after the API server restarts.
    let watcher = connect(&cp);
    let rev = watcher.revision().unwrap();
    assert_eq!(
        watcher
            .wait_for_change(rev, Duration::from_millis(100))
            .unwrap(),
        rev
    );
    cp.stop_apiserver();
    assert!(admin.revision().is_err(), "the API server is stopped");
    std::thread::sleep(Duration::from_secs(2));
    cp.start_apiserver().unwrap();
    let written = admin
        .put(
            &keys::pool("after-restart"),
            r#"{"name":"after-restart","cidr":"198.18.8.0/24","blockSize":26}"#,
        )
        .unwrap();
    // The watcher wakes for the write (and maybe first for the restart itself: the server's
    // own writes, or a re-list after 410 Gone), as an agent would, until it has seen it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = rev;
    while seen < written {
        assert!(
            Instant::now() < deadline,
            "the watch never saw revision {written} (at {seen})"
        );
        seen = watcher
            .wait_for_change(seen, Duration::from_secs(5))
            .unwrap();
    }
}
