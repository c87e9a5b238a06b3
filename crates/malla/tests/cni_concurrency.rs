//! 200 pods added with concurrency 8 on each of 3 nodes at once, then deleted, through the real
//! CNI plugin binary as a runtime calls it: no duplicate address, every address returned, no
//! leftover veth, route or endpoint.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use common::{ip, Lab};
use malla_dataplane::netns;
use malla_lab::cni_exec::{self, Attachment};
use malla_lab::runtime::node_runtime;
use malla_lab::{LabPaths, LabState};
use malla_store::Store;

const PODS_PER_NODE: usize = 200;
const CONCURRENCY: usize = 8;
const NODES: usize = 3;

fn attachment(lab: &Lab, node: usize, i: usize) -> (String, Attachment) {
    let ns = lab.netns(&format!("cc-{node}-{i}"));
    let att = Attachment {
        container_id: format!("cc{node}x{i:04}"),
        netns_path: format!("/run/netns/{ns}"),
        ifname: "eth0".into(),
        pod_namespace: "load".into(),
        pod_name: format!("p-{node}-{i}"),
    };
    (ns, att)
}

/// Runs `f` for every pod of every node: CONCURRENCY threads per node, all nodes at once.
fn for_all_pods(f: impl Fn(usize, usize) + Send + Sync + 'static) {
    let f = Arc::new(f);
    let mut threads = Vec::new();
    for node in 1..=NODES {
        for worker in 0..CONCURRENCY {
            let f = f.clone();
            threads.push(std::thread::spawn(move || {
                for i in (worker..PODS_PER_NODE).step_by(CONCURRENCY) {
                    f(node, i);
                }
            }));
        }
    }
    for t in threads {
        t.join().expect("worker panicked");
    }
}

#[test]
fn concurrent_add_then_del_leaks_nothing() {
    let lab = Arc::new(Lab::new(&common::malla_bin(), "cc"));
    lab.run(&["lab", "up", "--nodes", "3", "--ipv6"]);
    let paths = LabPaths::new(&lab.name, Some(lab.state_root.path())).unwrap();
    let state = Arc::new(LabState::require(&paths).unwrap());

    let assigned: Arc<Mutex<Vec<IpAddr>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (lab, paths, state, assigned, failures) = (
            lab.clone(),
            paths.clone(),
            state.clone(),
            assigned.clone(),
            failures.clone(),
        );
        for_all_pods(move |node, i| {
            let (ns, att) = attachment(&lab, node, i);
            netns::create(&ns).expect("create pod netns");
            let rt = node_runtime(&paths, &state, &format!("node-{node}")).unwrap();
            match rt.add(&att) {
                Ok(result) => assigned
                    .lock()
                    .unwrap()
                    .extend(cni_exec::result_ips(&result)),
                Err(e) => failures
                    .lock()
                    .unwrap()
                    .push(format!("{}: {e:#}", att.pod_name)),
            }
        });
    }
    let failures_after_add = failures.lock().unwrap().clone();
    assert!(
        failures_after_add.is_empty(),
        "ADD failures: {failures_after_add:#?}"
    );
    let assigned = assigned.lock().unwrap().clone();
    assert_eq!(
        assigned.len(),
        NODES * PODS_PER_NODE * 2,
        "one IPv4 and one IPv6 address per pod"
    );
    let distinct: BTreeSet<IpAddr> = assigned.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        assigned.len(),
        "no address was handed out twice"
    );

    let store = malla_store::LocalStore::open(&paths.store()).unwrap();
    let ipam = malla_ipam::Ipam::new(&store);
    let used: u64 = ipam.blocks().unwrap().iter().map(|b| b.used()).sum();
    assert_eq!(used as usize, assigned.len());
    for node in 1..=NODES {
        let links = ip(&[
            "-n",
            &lab.netns(&format!("node-{node}")),
            "-o",
            "link",
            "show",
        ]);
        assert_eq!(
            links.matches(": mla").count(),
            PODS_PER_NODE,
            "one host veth per pod on node-{node}"
        );
    }

    {
        let (lab, paths, state, failures) =
            (lab.clone(), paths.clone(), state.clone(), failures.clone());
        for_all_pods(move |node, i| {
            let (ns, att) = attachment(&lab, node, i);
            let rt = node_runtime(&paths, &state, &format!("node-{node}")).unwrap();
            if let Err(e) = rt.del(&att, None) {
                failures
                    .lock()
                    .unwrap()
                    .push(format!("DEL {}: {e:#}", att.pod_name));
            }
            netns::delete(&ns).expect("delete pod netns");
        });
    }
    let failures = failures.lock().unwrap().clone();
    assert!(failures.is_empty(), "DEL failures: {failures:#?}");

    let used: u64 = ipam.blocks().unwrap().iter().map(|b| b.used()).sum();
    assert_eq!(used, 0, "every address returned");
    assert!(ipam.handles().unwrap().is_empty(), "no handle left");
    let (endpoints, _) = store.list(malla_api::keys::ENDPOINTS).unwrap();
    assert!(endpoints.is_empty(), "no endpoint record left");
    for node in 1..=NODES {
        let ns = lab.netns(&format!("node-{node}"));
        let links = ip(&["-n", &ns, "-o", "link", "show"]);
        assert!(!links.contains(": mla"), "no veth left on node-{node}");
        let routes = ip(&["-n", &ns, "route", "show", "proto", "77"])
            + &ip(&["-n", &ns, "-6", "route", "show", "proto", "77"]);
        assert!(
            !routes.contains("dev mla"),
            "no pod route left on node-{node}: {routes}"
        );
    }
}
