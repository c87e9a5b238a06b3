//! An agent killed with SIGKILL and restarted while a long TCP stream runs between pods on two
//! nodes: the stream survives, and no route or address is removed and re-added.

mod common;

use std::io::Read;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Lab;

const STREAM_PORT: u16 = 9100;

fn restart_keeps_stream(routing: &str) {
    let lab = Lab::new(&common::malla_bin(), &format!("r{}", &routing[..1]));
    lab.run(&["lab", "up", "--nodes", "2", "--routing", routing]);
    lab.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: sender}\nspec: {nodeName: node-1, containers: [{name: c}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: sink}\nspec: {nodeName: node-2, containers: [{name: c}]}\n",
    );
    let state = lab.state();
    let sink_ip: IpAddr = state["pods"]["default/sink"]["ips"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pids: Vec<u64> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_u64().unwrap())
        .collect();

    // The sink counts every byte until EOF; the sender writes paced chunks for a few seconds
    // on one connection.
    let stream = common::PacedStream::start(
        &lab.netns("pod-default-sender"),
        &lab.netns("pod-default-sink"),
        sink_ip,
        STREAM_PORT,
        (16384, Duration::from_millis(5), Duration::from_secs(6)),
    );
    std::thread::sleep(Duration::from_millis(800));

    // Watch both nodes' routes, addresses and neighbours while the agents die and come back.
    let monitors: Vec<_> = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            Command::new("ip")
                .args(["-n", &lab.netns(n), "monitor", "route", "address", "neigh"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("ip monitor")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for pid in &pids {
        assert!(Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    std::thread::sleep(Duration::from_millis(700));
    // `lab up` is idempotent: it restarts the dead agents and waits until they are in sync.
    lab.run(&["lab", "up", "--nodes", "2", "--routing", routing]);
    let new_pids: Vec<u64> = lab.state()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_u64().unwrap())
        .collect();
    assert!(
        pids.iter().zip(&new_pids).all(|(a, b)| a != b),
        "agents were restarted: {pids:?} -> {new_pids:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));

    let mut changes = String::new();
    for mut m in monitors {
        let _ = m.kill();
        let mut out = String::new();
        m.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let _ = m.wait();
        changes.push_str(&out);
    }
    let (sent, received) = stream.finish();
    assert_eq!(sent, received, "every byte arrived");
    assert!(sent > 1_000_000, "the stream ran: {sent} bytes");
    let deleted: Vec<&str> = changes
        .lines()
        .filter(|l| {
            l.starts_with("Deleted")
                && !l.contains("STALE")
                && !l.contains("REACHABLE")
                && !l.contains("DELAY")
                && !l.contains("PROBE")
        })
        .collect();
    assert!(
        deleted.is_empty(),
        "kernel objects were removed during the restart:\n{}",
        deleted.join("\n")
    );
}

#[test]
fn agent_restart_keeps_stream_direct() {
    restart_keeps_stream("direct");
}

#[test]
fn agent_restart_keeps_stream_vxlan() {
    restart_keeps_stream("vxlan");
}

/// Drift: something else deletes a route to another node's block and a pod's host route; the
/// agent's periodic resync (10 s in the lab) puts both back without any datastore change.
#[test]
fn drift_is_repaired_by_the_periodic_resync() {
    let lab = Lab::new(&common::malla_bin(), "dr");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: node-1, containers: [{name: c}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec: {nodeName: node-2, containers: [{name: c}]}\n",
    );
    let node1 = lab.netns("node-1");
    let routes = || common::ip(&["-n", &node1, "route", "show", "proto", "77"]);
    let before = routes();
    let remote = before
        .lines()
        .find(|l| l.contains(" via "))
        .expect("a route to node-2's block")
        .to_string();
    let host = before
        .lines()
        .find(|l| !l.contains(" via ") && l.contains(" dev "))
        .expect("pod a's host route")
        .to_string();
    for r in [&remote, &host] {
        let mut args = vec!["-n", node1.as_str(), "route", "del"];
        args.extend(r.split_whitespace());
        common::ip(&args);
    }
    assert!(!routes().contains(&remote) && !routes().contains(&host));
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while (!routes().contains(&remote) || !routes().contains(&host))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = routes();
    assert!(
        after.contains(&remote) && after.contains(&host),
        "not repaired:\n{after}\nwant:\n{remote}\n{host}"
    );
}
