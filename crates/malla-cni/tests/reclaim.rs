//! A kill -9 storm of ADDs on a node with live attachments, with the reclaimer running all the
//! while as the agent runs it: nothing is reclaimed within the grace period, and after it 0
//! addresses or veths are leaked and 0 live attachments are touched (each still has its veth
//! with the same index, its addresses, and passes CHECK).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestNode;
use malla_api::{keys, WorkloadEndpoint};
use malla_cni::reclaim::Reclaimer;
use serde_json::json;

const GRACE: Duration = Duration::from_secs(3);

fn endpoints(node: &TestNode) -> Vec<WorkloadEndpoint> {
    let store = node.store();
    malla_store::list_json::<WorkloadEndpoint>(&store, &keys::endpoints_of_node(common::NODE))
        .unwrap()
        .0
        .into_iter()
        .map(|(_, ep, _)| ep)
        .collect()
}

fn veth_indexes(node: &TestNode) -> BTreeMap<String, u32> {
    let out = Command::new("ip")
        .args(["-n", &node.node_ns, "-o", "link", "show", "type", "veth"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(": ");
            let index = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.split('@').next()?.to_string();
            name.starts_with("mla").then_some((name, index))
        })
        .collect()
}

#[test]
fn a_kill_storm_leaks_nothing_after_the_grace_period_and_touches_no_live_attachment() {
    let node = TestNode::new("k");
    let conf = node.conf();
    // Live attachments made before the storm.
    for i in 0..4 {
        let netns = node.pod(&format!("live{i}"));
        let add = node.call("ADD", &format!("live-{i}"), "eth0", &netns, &conf);
        assert!(add.ok, "{add:?}");
    }

    // The reclaimer, as the agent runs it, during the whole storm.
    let stop = Arc::new(AtomicBool::new(false));
    let reclaimed = Arc::new(Mutex::new(Vec::new()));
    let store_path = node.store_path();
    let node_ns = malla_dataplane::netns::NetNs::open_named(&node.node_ns).unwrap();
    let reclaimer = {
        let (stop, reclaimed) = (stop.clone(), reclaimed.clone());
        std::thread::spawn(move || {
            node_ns.enter_this_thread().unwrap();
            let store = malla_store::LocalStore::open(&store_path).unwrap();
            let mut r = Reclaimer::new(GRACE);
            while !stop.load(Ordering::SeqCst) {
                let got = r.pass(&store, common::NODE, None).unwrap();
                reclaimed.lock().unwrap().push(got);
                std::thread::sleep(Duration::from_millis(50));
            }
            r
        })
    };

    // The storm: ADDs killed with SIGKILL at random moments, plus ADDs that die at the two
    // worst points (after reserving; after wiring), so that there is always something left.
    let storm_start = Instant::now();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut children = Vec::new();
    for i in 0..24 {
        let netns = node.pod(&format!("s{i}"));
        let path = format!("/run/netns/{netns}");
        let conf_text = conf.to_string();
        let mut cmd = node.command();
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("storm-{i}"))
            .env("CNI_NETNS", &path)
            .env("CNI_IFNAME", "eth0");
        match i % 4 {
            0 => {
                cmd.env("MALLA_CNI_FAULT", "after-ipam");
            }
            1 => {
                cmd.env("MALLA_CNI_FAULT", "after-wire");
            }
            _ => {}
        }
        // The fault-injected ones die by themselves (abort); the others get SIGKILL.
        let delay = (i % 4 >= 2).then(|| Duration::from_micros(next() % 30_000));
        children.push(std::thread::spawn(move || {
            use std::io::Write;
            use std::os::unix::process::ExitStatusExt;
            let mut child = cmd.spawn().unwrap();
            let _ = child.stdin.take().unwrap().write_all(conf_text.as_bytes());
            if let Some(delay) = delay {
                std::thread::sleep(delay);
                let _ = child.kill();
            }
            child.wait().unwrap().signal() == Some(9)
        }));
    }
    let killed = children
        .into_iter()
        .map(|c| c.join().unwrap_or(false))
        .filter(|k| *k)
        .count();
    let storm_took = storm_start.elapsed();

    // Within the grace period nothing was reclaimed.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        storm_start.elapsed() < GRACE,
        "the storm took too long to test the grace period ({storm_took:?})"
    );
    let early: Vec<_> = reclaimed
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !r.addrs.is_empty() || !r.veths.is_empty() || !r.handles.is_empty())
        .cloned()
        .collect();
    assert!(
        early.is_empty(),
        "reclaimed within the grace period: {early:?}"
    );

    // What the storm left: every attachment with an endpoint record is live (some killed ADDs
    // finished first); anything else held is a leak.
    let live_eps = endpoints(&node);
    let live_addrs: BTreeSet<IpAddr> = live_eps.iter().flat_map(|e| e.addrs()).collect();
    let live_veths: BTreeSet<String> = live_eps.iter().map(|e| e.host_ifname.clone()).collect();
    let held: BTreeSet<IpAddr> = node.held().into_iter().collect();
    let veths_before = veth_indexes(&node);
    let leaked_addrs = held.difference(&live_addrs).count();
    let leaked_veths = veths_before
        .keys()
        .filter(|v| !live_veths.contains(*v))
        .count();
    eprintln!(
        "storm: {killed} ADDs killed by SIGKILL, {} live attachments, {leaked_addrs} leaked addresses, {leaked_veths} leaked veths (storm {storm_took:?})",
        live_eps.len()
    );
    assert!(
        leaked_addrs >= 12,
        "the faults leaked addresses ({leaked_addrs})"
    );
    assert!(
        leaked_veths >= 6,
        "the faults leaked veths ({leaked_veths})"
    );

    // After the grace period (the reclaimer keeps passing every 50 ms).
    std::thread::sleep(GRACE + Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let _ = reclaimer.join().unwrap();
    let held_after: BTreeSet<IpAddr> = node.held().into_iter().collect();
    let veths_after = veth_indexes(&node);
    assert_eq!(
        held_after, live_addrs,
        "0 leaked addresses, every live one kept"
    );
    assert_eq!(
        veths_after.keys().cloned().collect::<BTreeSet<_>>(),
        live_veths,
        "0 leaked veths, every live one kept"
    );
    for (name, index) in &veths_after {
        assert_eq!(
            veths_before.get(name),
            Some(index),
            "{name} was not recreated"
        );
    }
    // Every live attachment is intact. (Pod `live-N` is in namespace `…-liveN`, `storm-N` in
    // `…-sN`.)
    let netns_of = |cid: &str| {
        let short = cid.replace("live-", "live").replace("storm-", "s");
        format!("{}-{short}", node.prefix)
    };
    assert_eq!(endpoints(&node).len(), live_eps.len());
    for ep in &live_eps {
        let prev = json!({
            "cniVersion": "1.1.0",
            "ips": ep.ips.iter().map(|n| json!({"address": n.to_string()})).collect::<Vec<_>>(),
        });
        let mut check = conf.clone();
        check["prevResult"] = prev;
        let netns = netns_of(&ep.container_id);
        let c = node.call("CHECK", &ep.container_id, "eth0", &netns, &check);
        assert!(c.ok, "{} intact: {c:?}", ep.container_id);
    }
    let total: usize = reclaimed
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.addrs.len())
        .sum();
    assert_eq!(total, leaked_addrs, "each leak reclaimed once");
    for ep in &live_eps {
        let netns = netns_of(&ep.container_id);
        assert!(node.call("DEL", &ep.container_id, "eth0", &netns, &conf).ok);
    }
    assert!(node.held().is_empty());
}

/// A retried ADD of an attachment whose first try was killed: the retry's reservation and veth
/// are never taken for the leftovers, even when the first try's clock has run out.
#[test]
fn a_retried_add_is_not_taken_for_its_killed_first_try() {
    let node = TestNode::new("r");
    let conf = node.conf();
    let netns = node.pod("p");
    let path = format!("/run/netns/{netns}");
    let mut cmd = node.command();
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "retry")
        .env("CNI_NETNS", &path)
        .env("CNI_IFNAME", "eth0")
        .env("MALLA_CNI_FAULT", "after-ipam");
    let crashed = common::run(cmd, conf.to_string().as_bytes());
    assert!(!crashed.ok);
    let first: Vec<IpAddr> = node.held();
    assert_eq!(first.len(), 1);
    let store_path = node.store_path();
    let t0 = Instant::now();
    // The reclaimer saw the leftover long ago.
    let mut r = node.in_node(move || {
        let store = malla_store::LocalStore::open(&store_path).unwrap();
        let mut r = Reclaimer::new(GRACE);
        let got = r.pass_at(&store, common::NODE, None, t0).unwrap();
        assert_eq!(got.waiting, 1);
        r
    });
    // The runtime retries and succeeds: the handle is live with another address, and the
    // first try's address is a leftover under the same handle.
    let add = node.call("ADD", "retry", "eth0", &netns, &conf);
    assert!(add.ok, "{add:?}");
    assert_eq!(node.held().len(), 2);
    let store_path = node.store_path();
    let got = node.in_node(move || {
        let store = malla_store::LocalStore::open(&store_path).unwrap();
        let got = r.pass_at(&store, common::NODE, None, t0 + GRACE).unwrap();
        (got, r)
    });
    r = got.1;
    assert_eq!(
        got.0.addrs, first,
        "only the first try's address: {:?}",
        got.0
    );
    assert!(got.0.veths.is_empty());
    let mut check = conf.clone();
    check["prevResult"] = add.out.clone();
    assert!(node.call("CHECK", "retry", "eth0", &netns, &check).ok);
    drop(r);
    assert!(node.call("DEL", "retry", "eth0", &netns, &conf).ok);
    assert!(node.held().is_empty());
}
