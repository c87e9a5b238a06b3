//! `routing: bgp` on a real kernel with real routers: 3 nodes on two L2 segments (node-2 alone
//! on the second) joined only by the fabric namespace, where a real BIRD or FRR router peers
//! with every node. The network-model conformance holds (pod↔pod TCP/UDP across the segments
//! without NAT, node→own pods, pod→external masqueraded), the outside reaches every pod without
//! NAT, the routes to other nodes' pods come from BGP (the agent programs none), every session
//! is established; a node's agent and its BIRD killed with SIGKILL under a long cross-segment
//! TCP stream lose no byte and the router never withdraws the node's block (graceful restart).

mod common;

use std::io::Read;
use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{two_pods_per_node, Lab};
use serde_json::Value;

use common::field;

fn kill9(pid: u64) {
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// The pid of `node`'s BIRD (its pid file).
fn bird_pid(lab: &Lab, node: &str) -> Option<u64> {
    std::fs::read_to_string(lab.dir().join(format!("nodes/{node}/bird/bird.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn up(lab: &Lab, nodes: &str, router: &str, ipv6: bool, rr: bool) {
    let mut args = vec![
        "lab",
        "up",
        "--nodes",
        nodes,
        "--routing",
        "bgp",
        "--router",
        router,
    ];
    if ipv6 {
        args.push("--ipv6");
    }
    if rr {
        args.push("--route-reflector");
    }
    lab.run(&args);
}

fn conformance(router: &str, ipv6: bool, rr: bool) {
    let lab = Lab::new(
        &common::malla_bin(),
        &format!(
            "b{}{}{}",
            &router[..1],
            if ipv6 { "6" } else { "4" },
            if rr { "r" } else { "m" }
        ),
    );
    up(&lab, "3", router, ipv6, rr);
    lab.apply(&two_pods_per_node(3));
    let state = lab.state();
    assert_eq!(state["router"]["kind"], router, "{}", state["router"]);
    // Two segments: node-2 is alone on the second.
    let seg = |n: usize| {
        state["nodes"][n]["underlay_ipv4"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(seg(0).starts_with("198.19.0.") && seg(2).starts_with("198.19.0."));
    assert!(seg(1).starts_with("198.19.2."), "{}", seg(1));
    let pod_node = common::pod_nodes(&state);
    let node_ips = common::node_ips(&state);

    // Routes to other nodes' pods are BIRD's, never the agent's (protocol 77).
    for n in ["node-1", "node-2", "node-3"] {
        for fam in ["-4", "-6"] {
            let agent = common::ip(&[fam, "-n", &lab.netns(n), "route", "show", "proto", "77"]);
            for line in agent.lines() {
                assert!(
                    line.contains(" dev mla"),
                    "{n}: the agent routed to another node: {line}"
                );
            }
        }
        let bird = common::ip(&["-n", &lab.netns(n), "route", "show", "proto", "bird"]);
        assert_eq!(
            bird.lines().filter(|l| l.contains(" via ")).count(),
            2,
            "{n}: a route to each other node's block from BGP:\n{bird}"
        );
        assert!(
            bird.contains("blackhole"),
            "{n}: own block blackholed:\n{bird}"
        );
    }

    let results = lab.probe(&[]);
    let families = if ipv6 { 2 } else { 1 };
    let pod_pairs = common::pod_pairs_without_nat(&results, families);
    let across = pod_pairs
        .iter()
        .filter(|r| {
            (pod_node[&field(r, "from")] == "node-2") != (pod_node[&field(r, "to")] == "node-2")
        })
        .count();
    assert_eq!(across, 16 * 2 * families, "pairs across the two segments");
    let node_probes = results
        .iter()
        .filter(|r| field(r, "from").starts_with("node/"))
        .count();
    assert_eq!(
        node_probes,
        6 * 2 * families,
        "every node probes its own pods"
    );
    let external: Vec<&Value> = results
        .iter()
        .filter(|r| field(r, "to") == "external")
        .collect();
    assert_eq!(external.len(), 6 * 2 * families);
    for r in &external {
        let seen: IpAddr = field(r, "seenSourceIp").parse().unwrap();
        assert!(
            node_ips[&pod_node[&field(r, "from")]].contains(&seen),
            "masqueraded to the node: {r}"
        );
    }

    // The outside reaches every pod on every node through the router, without NAT.
    let ext_ips: Vec<String> = [&state["external"]["ipv4"], &state["external"]["ipv6"]]
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let inbound = lab.probe(&["--from", "external"]);
    assert_eq!(inbound.len(), 6 * 2 * families, "{inbound:#?}");
    for r in &inbound {
        assert_eq!(r["connected"], true, "external → pod: {r}");
        assert_eq!(r["clientIp"], r["seenSourceIp"], "NAT on the way in: {r}");
        assert!(
            ext_ips.contains(&field(r, "seenSourceIp")),
            "the pod saw external: {r}"
        );
    }
    let on_nodes: std::collections::BTreeSet<&String> =
        inbound.iter().map(|r| &pod_node[&field(r, "to")]).collect();
    assert_eq!(on_nodes.len(), 3);

    // Every session is up; the router received each node's block.
    let out = lab.run(&["lab", "bgp", "-o", "json"]);
    let sessions: Vec<Value> = serde_json::from_str(&out).unwrap();
    let router: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["speaker"] == "router")
        .collect();
    assert_eq!(router.len(), 3 * families, "{out}");
    for s in &sessions {
        assert_eq!(s["established"], true, "{s}");
    }
    for s in &router {
        assert!(
            s["received"].as_u64().unwrap() >= 1,
            "the router learned the node's block: {s}"
        );
    }
    // A node's own view (`malla bgp status`, as on a real node).
    let sock = lab.dir().join("nodes/node-1/bird/bird.ctl");
    let out = lab.run(&[
        "bgp",
        "status",
        "--socket",
        sock.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let own: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        own.len(),
        sessions.iter().filter(|s| s["speaker"] == "node-1").count(),
        "{out}"
    );
    assert!(own.iter().all(|s| s["established"] == true), "{out}");
    let mesh = sessions
        .iter()
        .filter(|s| field(s, "description").starts_with("node "))
        .filter(|s| s["speaker"] != "router")
        .count();
    assert_eq!(
        mesh,
        if rr { 0 } else { 6 * families },
        "node-to-node sessions"
    );
}

#[test]
fn bgp_ipv4_with_frr() {
    conformance("frr", false, false);
}

#[test]
fn bgp_ipv4_with_bird() {
    conformance("bird", false, false);
}

#[test]
fn bgp_dual_stack_frr_route_reflector() {
    conformance("frr", true, true);
}

#[test]
fn bgp_dual_stack_bird_route_reflector() {
    conformance("bird", true, true);
}

/// SIGKILL for node-2's agent, then for its BIRD, under a long TCP stream from node-1 across
/// the segments: every byte arrives, the agent starts BIRD again (graceful restart: the router
/// keeps the node's block while it comes back), and the router never deletes the route.
fn kill_keeps_stream(router: &str) {
    const PORT: u16 = 9101;
    let lab = Lab::new(&common::malla_bin(), &format!("bk{}", &router[..1]));
    up(&lab, "2", router, false, false);
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
    let agent = state["nodes"][1]["agent_pid"].as_u64().unwrap();
    let stream = common::PacedStream::start(
        &lab.netns("pod-default-sender"),
        &lab.netns("pod-default-sink"),
        sink_ip,
        PORT,
        (16384, Duration::from_millis(5), Duration::from_secs(12)),
    );
    std::thread::sleep(Duration::from_millis(800));
    let monitor = Command::new("ip")
        .args(["-n", &lab.netns("fabric"), "monitor", "route"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip monitor");
    std::thread::sleep(Duration::from_millis(200));
    kill9(agent);
    std::thread::sleep(Duration::from_millis(700));
    lab.run(&[
        "lab",
        "up",
        "--nodes",
        "2",
        "--routing",
        "bgp",
        "--router",
        router,
    ]);
    assert_ne!(
        lab.state()["nodes"][1]["agent_pid"].as_u64().unwrap(),
        agent,
        "restarted"
    );

    let bird = bird_pid(&lab, "node-2").expect("node-2's BIRD");
    kill9(bird);
    // The agent notices within seconds and starts BIRD again; the session comes back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let again = bird_pid(&lab, "node-2").unwrap_or(bird);
        let out = lab.try_run(&["lab", "bgp", "-o", "json"]);
        if again != bird && out.status.success() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "BIRD not back: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (sent, received) = stream.finish();
    let mut monitor = monitor;
    let _ = monitor.kill();
    let mut changes = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut changes)
        .unwrap();
    let _ = monitor.wait();
    assert_eq!(sent, received, "every byte arrived");
    assert!(sent > 1_000_000, "the stream ran: {sent} bytes");
    let withdrawn: Vec<&str> = changes
        .lines()
        .filter(|l| l.starts_with("Deleted") && l.contains("198.18."))
        .collect();
    assert!(
        withdrawn.is_empty(),
        "the router withdrew pod routes:\n{}",
        withdrawn.join("\n")
    );
}

#[test]
fn sigkill_of_agent_and_bird_keeps_stream_frr() {
    kill_keeps_stream("frr");
}

#[test]
fn sigkill_of_agent_and_bird_keeps_stream_bird() {
    kill_keeps_stream("bird");
}

/// A node removed from the cluster (its agent and BIRD gone with SIGKILL, its link cut, its
/// Node record deleted as a node controller does): every other node stops routing to its
/// block within the hold time (9 s), because their agents drop it from the mesh; the stale
/// routes graceful restart would keep do not linger.
#[test]
fn removed_node_is_withdrawn_from_every_peer_within_the_hold_time() {
    let lab = Lab::new(&common::malla_bin(), "brm");
    up(&lab, "3", "bird", false, false);
    lab.apply(&two_pods_per_node(3));
    let state = lab.state();
    let block = |ip: &str| -> String {
        let o: std::net::Ipv4Addr = ip.parse().unwrap();
        let o = o.octets();
        format!("{}.{}.{}.{}/26", o[0], o[1], o[2], o[3] & 0xc0)
    };
    let gone = block(state["pods"]["default/pod-3a"]["ips"][0].as_str().unwrap());
    let routed = |node: &str| {
        common::ip(&["-n", &lab.netns(node), "route", "show", "proto", "bird"])
            .lines()
            .any(|l| l.starts_with(&format!("{gone} ")))
    };
    assert!(routed("node-1") && routed("node-2"), "{gone} routed before");

    kill9(state["nodes"][2]["agent_pid"].as_u64().unwrap());
    kill9(bird_pid(&lab, "node-3").expect("node-3's BIRD"));
    common::ip(&["-n", &lab.netns("fabric"), "link", "set", "n3", "down"]);
    let paths = malla_lab::LabPaths::new(&lab.name, Some(lab.state_root.path())).unwrap();
    let lab_state = malla_lab::LabState::require(&paths).unwrap();
    let store = malla_lab::store::open(&paths, &lab_state).unwrap();
    let started = std::time::Instant::now();
    store
        .delete(&malla_api::keys::node("node-3"), None)
        .unwrap()
        .expect("node-3 was registered");
    while routed("node-1") || routed("node-2") {
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "{gone} still routed after the hold time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{gone} withdrawn everywhere after {:?}", started.elapsed());
    // The other nodes still reach each other across the segments.
    let r = lab.probe(&[
        "--from",
        "default/pod-1a",
        "--to",
        "default/pod-2a",
        "--protocol",
        "tcp",
    ]);
    assert!(r.iter().all(|x| x["connected"] == true), "{r:#?}");
}

/// Service addresses in BGP: `type: LoadBalancer` Services get an address from the lab's pool
/// (198.19.200.0/24), every node announces the ranges (the router spreads them over all
/// nodes), and with `externalTrafficPolicy: Local` the Service's /32 is announced only by the
/// nodes with a ready endpoint: the router's route follows the endpoint as it moves and goes
/// with the last one. From outside, both answer; the Local one sees the client's address.
fn load_balancers(router: &str) {
    let lab = Lab::new(&common::malla_bin(), &format!("blb{}", &router[..1]));
    up(&lab, "3", router, false, false);
    let services = "apiVersion: v1\nkind: Service\nmetadata: {name: lb}\nspec:\n  type: LoadBalancer\n  selector: {app: test}\n  ports:\n  - {name: web, port: 80, targetPort: 8080}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: lblocal}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector: {app: local}\n  ports:\n  - {name: web, port: 80, targetPort: 8080}\n";
    let local_pod = |name: &str, node: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: local}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - containerPort: 8080\n")
    };
    lab.apply(&format!(
        "{}---\n{services}---\n{}",
        two_pods_per_node(3),
        local_pod("loc2", "node-2")
    ));
    let state = lab.state();
    let lb_ip = |svc: &str| -> String {
        let s = &state["services"][format!("default/{svc}")];
        let ips = s["loadBalancerIps"]
            .as_array()
            .or(s["load_balancer_ips"].as_array());
        ips.unwrap_or_else(|| panic!("no LoadBalancer address: {s}"))[0]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (lb, local) = (lb_ip("lb"), lb_ip("lblocal"));
    assert!(
        lb.starts_with("198.19.200.") && local.starts_with("198.19.200."),
        "{lb} {local}"
    );
    assert_ne!(lb, local);

    let fabric = lab.netns("fabric");
    // The router's next hops for `ip`'s most specific route (None: only the range's).
    let via = |ip: &str| -> Option<Vec<String>> {
        let out = common::ip(&["-n", &fabric, "route", "show", "exact", &format!("{ip}/32")]);
        if out.trim().is_empty() {
            return None;
        }
        let mut hops: Vec<String> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_string())
            .collect();
        hops.sort();
        Some(hops)
    };
    let wait_via = |ip: &str, want: Option<Vec<String>>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while via(ip) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "router's route for {ip}: {:?}, want {want:?}",
                via(ip)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let node_ip = |n: usize| {
        state["nodes"][n]["underlay_ipv4"]
            .as_str()
            .unwrap()
            .to_string()
    };
    wait_via(&local, Some(vec![node_ip(1)]));
    // The Cluster-policy Service has no /32 of its own: the range, over every node.
    assert_eq!(via(&lb), None);
    let range = common::ip(&["-n", &fabric, "route", "show", "exact", "198.19.200.0/24"]);
    for n in 0..3 {
        assert!(
            range.contains(&node_ip(n)),
            "the range via every node: {range}"
        );
    }

    let answers = |want_local: &str| {
        let r = lab.probe(&["--from", "external"]);
        let to_svc: Vec<&Value> = r
            .iter()
            .filter(|x| field(x, "to").starts_with("svc/"))
            .collect();
        assert_eq!(to_svc.len(), 2, "{r:#?}");
        for x in &to_svc {
            assert_eq!(x["connected"], true, "{x}");
            if field(x, "to") == "svc/default/lblocal" {
                assert_eq!(field(x, "answeredBy"), want_local, "{x}");
                assert_eq!(
                    x["clientIp"], x["seenSourceIp"],
                    "Local keeps the client's address: {x}"
                );
            }
        }
    };
    answers("default/loc2");
    // Applied again, the Services keep their addresses.
    lab.apply(services);
    let again = lab.state();
    for (svc, ip) in [("lb", &lb), ("lblocal", &local)] {
        let s = &again["services"][format!("default/{svc}")];
        let ips = s["loadBalancerIps"]
            .as_array()
            .or(s["load_balancer_ips"].as_array())
            .unwrap();
        assert_eq!(ips[0].as_str(), Some(ip.as_str()), "{svc}: {s}");
    }

    // The endpoint moves to node-3: so does the route.
    lab.apply_delete(&local_pod("loc2", "node-2"));
    lab.apply(&local_pod("loc3", "node-3"));
    wait_via(&local, Some(vec![node_ip(2)]));
    answers("default/loc3");
    // No endpoint left: no /32.
    lab.apply_delete(&local_pod("loc3", "node-3"));
    wait_via(&local, None);
}

#[test]
fn load_balancer_services_with_frr() {
    load_balancers("frr");
}

#[test]
fn load_balancer_services_with_bird() {
    load_balancers("bird");
}

/// The lab's paths and state, for calling `malla_lab` directly.
fn handles(lab: &Lab) -> (malla_lab::state::LabPaths, malla_lab::state::LabState) {
    let paths =
        malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("paths");
    let state = malla_lab::state::LabState::require(&paths).expect("state");
    (paths, state)
}

/// `malla lab bgp -o json` (it exits 3 while a session is down: that is not an error here).
fn lab_sessions(lab: &Lab) -> Vec<Value> {
    let out = lab.try_run(&["lab", "bgp", "-o", "json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "lab bgp: {e}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// Node `node`'s session with the router, seen from the node and from the router.
fn router_session<'a>(sessions: &'a [Value], node: &str) -> (&'a Value, &'a Value) {
    let mine = sessions
        .iter()
        .find(|s| s["speaker"] == node && field(s, "description").starts_with("peer "))
        .unwrap_or_else(|| panic!("{node} has no router session: {sessions:#?}"));
    let theirs = sessions
        .iter()
        .find(|s| s["speaker"] == "router" && field(s, "description") == format!("node {node}"))
        .unwrap_or_else(|| panic!("the router has no session with {node}: {sessions:#?}"));
    (mine, theirs)
}

/// Per-peer passwords (TCP MD5) and hold time against a real router: the router is told the
/// right password for node-1 and node-2 and a wrong one for node-3, the nodes get the right
/// one in their `BGPPeer`s (node-1's with hold time 6 and keepalive 2; the router's own are 9
/// and 3). node-1 and node-2 establish, node-1's session negotiated to 6 s on both sides (BIRD's
/// `show protocols all`; FRR's `show bgp neighbors`), node-2's at 9; node-3's never
/// establishes and `malla bgp status` on node-3 says so (exit status 3); once the router has
/// the right password it establishes.
fn passwords_and_hold_time(router: &str) {
    const PW: &str = "malla-s3cret";
    let lab = Lab::new(&common::malla_bin(), &format!("bpw{}", &router[..1]));
    up(&lab, "3", router, false, false);
    let (paths, state) = handles(&lab);
    malla_lab::bgp::reconfigure_router(&paths, &state, |spec| {
        for n in &mut spec.neighbors {
            n.password = Some(if n.node == "node-3" { "not-it" } else { PW }.into());
        }
    })
    .expect("router reconfigured");
    // The nodes' side, written straight to the datastore (waiting for every route, as
    // update_cluster_config does, cannot succeed while node-3's session is down).
    let store = malla_lab::store::open(&paths, &state).expect("store");
    let (mut config, _) =
        malla_store::get_json::<malla_api::ClusterConfig>(&*store, malla_api::keys::CLUSTER_CONFIG)
            .unwrap()
            .expect("cluster config");
    let bgp = config.bgp.as_mut().expect("bgp settings");
    for p in &mut bgp.peers {
        p.password = Some(PW.into());
        if p.node.as_deref() == Some("node-1") {
            p.keepalive_secs = Some(2);
            p.hold_time_secs = Some(6);
        }
    }
    malla_store::put_json(&*store, malla_api::keys::CLUSTER_CONFIG, &config).unwrap();

    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let sessions = loop {
        let s = lab_sessions(&lab);
        let up = |n: &str| {
            let (a, b) = router_session(&s, n);
            a["established"] == true && b["established"] == true
        };
        if up("node-1") && up("node-2") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-1 and node-2 did not establish with the password: {s:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let (n1, r1) = router_session(&sessions, "node-1");
    assert_eq!(n1["holdTime"], 6, "node-1's side: {n1}");
    assert_eq!(r1["holdTime"], 6, "the router's side: {r1}");
    assert_eq!(n1["keepaliveTime"], 2, "{n1}");
    let (n2, r2) = router_session(&sessions, "node-2");
    assert_eq!((&n2["holdTime"], &r2["holdTime"]), (&9.into(), &9.into()));
    // BIRD's own words on both sides.
    let birdc = |sock: std::path::PathBuf, proto: &str| {
        let o = Command::new("/usr/sbin/birdc")
            .arg("-s")
            .arg(sock)
            .args(["show", "protocols", "all", proto])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let node_view = birdc(
        lab.dir().join("nodes/node-1/bird/bird.ctl"),
        &field(n1, "name"),
    );
    assert!(
        node_view.contains("Hold timer:") && node_view.contains("/6\n"),
        "{node_view}"
    );
    if router == "bird" {
        let router_view = birdc(lab.dir().join("router/bird.ctl"), &field(r1, "name"));
        assert!(
            router_view.contains("Hold timer:") && router_view.contains("/6\n"),
            "{router_view}"
        );
    }

    // The mismatched password: never established, for several connect retries.
    for _ in 0..10 {
        let s = lab_sessions(&lab);
        let (n3, r3) = router_session(&s, "node-3");
        assert_eq!(
            n3["established"], false,
            "a wrong password established: {n3}"
        );
        assert_eq!(r3["established"], false, "{r3}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let sock = lab.dir().join("nodes/node-3/bird/bird.ctl");
    let out = lab.try_run(&[
        "bgp",
        "status",
        "--node",
        "node-3",
        "--socket",
        sock.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(3), "a session is down: exit 3");
    let own: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let peer = own
        .iter()
        .find(|s| field(s, "description").starts_with("peer "))
        .expect("node-3's router session");
    assert_eq!(peer["established"], false, "{peer}");
    // The mesh does not use the password: node-3's node sessions stay up.
    assert!(
        own.iter()
            .filter(|s| field(s, "description").starts_with("node "))
            .all(|s| s["established"] == true),
        "{own:#?}"
    );

    // The router learns the right password: node-3 establishes.
    malla_lab::bgp::reconfigure_router(&paths, &state, |spec| {
        for n in &mut spec.neighbors {
            n.password = Some(PW.into());
        }
    })
    .expect("router reconfigured");
    malla_lab::bgp::wait_sessions(&paths, &state, Duration::from_secs(40))
        .expect("every session up once the passwords match");
}

#[test]
fn peer_passwords_and_hold_time_with_a_bird_router() {
    passwords_and_hold_time("bird");
}

#[test]
fn peer_passwords_and_hold_time_with_an_frr_router() {
    passwords_and_hold_time("frr");
}

/// Nodes as route reflectors, Calico's way: the node mesh off, node-1 a reflector
/// (`routeReflectorClusterID`, label `route-reflector`), one `BGPPeer` with
/// `peerSelector: has(route-reflector)` for every node; the router peers with the reflector
/// only. Each other node has one session (per family), to node-1; the reflected routes carry
/// every pod across the segments (node-2 alone on the second) and from outside; conformance
/// holds.
fn node_reflectors(router: &str, ipv6: bool) {
    let families = if ipv6 { 2 } else { 1 };
    let lab = Lab::new(
        &common::malla_bin(),
        &format!("brn{}{}", &router[..1], families),
    );
    up(&lab, "3", router, ipv6, false);
    lab.apply(&two_pods_per_node(3));
    let (paths, state) = handles(&lab);
    malla_lab::bgp::reconfigure_router(&paths, &state, |spec| {
        spec.neighbors.retain(|n| n.node == "node-1")
    })
    .expect("router reconfigured");
    malla_lab::topology::update_cluster_config(&paths, &state, |c| {
        let b = c.bgp.as_mut().expect("bgp settings");
        b.node_to_node_mesh = false;
        b.nodes = vec![malla_api::BgpNodeSpec {
            name: "node-1".into(),
            labels: [("route-reflector".to_string(), "true".to_string())].into(),
            route_reflector_cluster_id: Some("244.0.0.1".parse().unwrap()),
        }];
        b.peers.retain(|p| p.node.as_deref() == Some("node-1"));
        b.peers.push(malla_api::BgpPeer {
            node_selector: Some("all()".into()),
            peer_selector: Some("has(route-reflector)".into()),
            ..Default::default()
        });
    })
    .expect("every node's pods routed on every node and the router");
    malla_lab::bgp::wait_sessions(&paths, &state, Duration::from_secs(40)).expect("sessions up");

    let sessions = lab_sessions(&lab);
    let of = |speaker: &str| -> Vec<&Value> {
        sessions
            .iter()
            .filter(|s| s["speaker"] == speaker)
            .collect()
    };
    for n in ["node-2", "node-3"] {
        let mine = of(n);
        assert_eq!(
            mine.len(),
            families,
            "{n}: one session per family: {mine:#?}"
        );
        for s in &mine {
            assert_eq!(field(s, "description"), "node node-1", "{mine:#?}");
            assert_eq!(s["established"], true);
            // Both other nodes' blocks arrive over it (reflected).
            assert!(s["received"].as_u64().unwrap() >= 2, "{mine:#?}");
        }
    }
    let rr = of("node-1");
    assert_eq!(
        rr.len(),
        3 * families,
        "two clients and the router: {rr:#?}"
    );
    assert_eq!(of("router").len(), families);
    for n in ["node-1", "node-2", "node-3"] {
        for fam in ["-4", "-6"].iter().take(families) {
            let bird = common::ip(&[fam, "-n", &lab.netns(n), "route", "show", "proto", "bird"]);
            assert_eq!(
                bird.lines().filter(|l| l.contains(" via ")).count(),
                2,
                "{n} {fam}: a route to each other node's block, reflected:\n{bird}"
            );
        }
    }
    let results = lab.probe(&[]);
    let pod_node = common::pod_nodes(&lab.state());
    let pairs = common::pod_pairs_without_nat(&results, families);
    let across = pairs
        .iter()
        .filter(|r| {
            (pod_node[&field(r, "from")] == "node-2") != (pod_node[&field(r, "to")] == "node-2")
        })
        .count();
    assert_eq!(across, 16 * 2 * families, "pairs across the two segments");
    let inbound = lab.probe(&["--from", "external"]);
    assert_eq!(inbound.len(), 6 * 2 * families, "{inbound:#?}");
    for r in &inbound {
        assert_eq!(r["connected"], true, "external → pod: {r}");
        assert_eq!(r["clientIp"], r["seenSourceIp"], "NAT on the way in: {r}");
    }
}

#[test]
fn nodes_as_route_reflectors_without_the_mesh() {
    node_reflectors("bird", false);
}

#[test]
fn nodes_as_route_reflectors_dual_stack_with_frr() {
    node_reflectors("frr", true);
}

/// A malformed `bgp` setting (a hold time under BGP's 3 s) written to the datastore: every
/// agent refuses it naming the field, keeps its speaker's configuration as it was (nothing
/// half-applied), and every session and route stays.
#[test]
fn malformed_bgp_settings_are_refused_naming_the_field() {
    let lab = Lab::new(&common::malla_bin(), "bbad");
    up(&lab, "2", "bird", false, false);
    let (paths, state) = handles(&lab);
    let confs = || -> Vec<String> {
        ["node-1", "node-2"]
            .iter()
            .map(|n| {
                std::fs::read_to_string(lab.dir().join(format!("nodes/{n}/bird/bird.conf")))
                    .unwrap()
            })
            .collect()
    };
    let before = confs();
    // Through the lab's own path: the barrier is applied, the routes are all there.
    malla_lab::topology::update_cluster_config(&paths, &state, |c| {
        if let Some(b) = c.bgp.as_mut() {
            b.hold_time_secs = Some(2);
            b.peers[0].password = Some("fine".into());
        }
    })
    .expect("agents applied the barrier; routes intact");
    for n in ["node-1", "node-2"] {
        let log = paths.log(&format!("agent-{n}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("bgp.holdTimeSecs: 2 is less than 3 seconds") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n}'s agent did not name the field: {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(
        confs(),
        before,
        "a speaker was reconfigured from a refused config"
    );
    for s in lab_sessions(&lab) {
        assert_eq!(s["established"], true, "{s}");
    }
    assert!(
        malla_lab::bgp::missing_routes(&paths, &state)
            .unwrap()
            .is_empty(),
        "routes lost"
    );
}
