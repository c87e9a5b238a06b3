//! Services through real connections in a 3-node lab: load spread, session affinity,
//! externalTrafficPolicy Local and Cluster, internalTrafficPolicy Local, NodePort from outside,
//! immediate reject without endpoints, hairpin, terminating fallback, scale-down, and UDP
//! conntrack entries cleared when their endpoint goes away.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;
use serde_json::Value;

fn pods(names: &[(&str, &str, &str)]) -> String {
    // (name, node, app label)
    names
        .iter()
        .map(|(name, node, app)| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: 8080, name: http}}\n    - {{containerPort: 5353, protocol: UDP, name: dns}}\n"
            )
        })
        .collect()
}

fn answered_by(results: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results {
        if r["connected"] == true {
            *m.entry(r["answeredBy"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    m
}

fn up(tag: &str) -> Lab {
    let lab = Lab::new(&common::malla_bin(), tag);
    lab.run(&["lab", "up", "--nodes", "3"]);
    lab.apply(&pods(&[
        ("web-1", "node-1", "web"),
        ("web-2", "node-2", "web"),
        ("web-3", "node-3", "web"),
        ("client", "node-1", "client"),
    ]));
    lab
}

#[test]
fn cluster_ip_spreads_over_every_ready_endpoint_and_scales_down() {
    let lab = up("sp");
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {name: http, port: 80, targetPort: http}\n  - {name: dns, port: 53, protocol: UDP, targetPort: dns}\n");
    let r = lab.probe(&[
        "--from",
        "default/client",
        "--to",
        "svc/default/web",
        "--port",
        "80",
        "--count",
        "60",
    ]);
    assert_eq!(r.len(), 60);
    let by = answered_by(&r);
    assert_eq!(
        by.values().sum::<usize>(),
        60,
        "every connection answered: {r:?}"
    );
    for ep in ["default/web-1", "default/web-2", "default/web-3"] {
        assert!(
            by.get(ep).copied().unwrap_or(0) >= 1,
            "{ep} never answered: {by:?}"
        );
    }
    // `malla services` on the client's node counts those new connections on the service's
    // frontend, and the flows conntrack still holds (TIME_WAIT: 120 s) per endpoint.
    let shown: Value =
        serde_json::from_str(&lab.run(&["services", "--node", "node-1", "-o", "json"])).unwrap();
    let web = shown
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["service"] == "default/web" && e["port"] == 80)
        .expect("web:80 is programmed on node-1");
    assert_eq!(web["clusterEndpoints"].as_array().unwrap().len(), 3);
    // Each endpoint is named by its pod (from the slices' target references).
    let mut named: Vec<&str> = web["clusterEndpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ep| ep["target"].as_str().unwrap_or("none"))
        .collect();
    named.sort();
    assert_eq!(
        named,
        ["default/web-1", "default/web-2", "default/web-3"],
        "{web}"
    );
    let counted: u64 = web["connections"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(counted >= 60, "{counted} tracked flows: {web}");
    assert!(
        web["newConnections"].as_u64().unwrap() >= 60,
        "new connections: {web}"
    );
    // No NAT on the way to a pod endpoint: the endpoint sees the client pod.
    assert!(
        r.iter().all(|x| x["clientIp"] == x["seenSourceIp"]),
        "{r:?}"
    );
    // UDP through the named target port, and from every node.
    let udp = lab.probe(&[
        "--to",
        "svc/default/web",
        "--port",
        "53",
        "--protocol",
        "udp",
    ]);
    assert!(
        !udp.is_empty() && udp.iter().all(|x| x["connected"] == true),
        "{udp:?}"
    );
    assert!(udp.iter().any(|x| x["from"] == "node/node-2"));

    // Scale down: web-3 goes; no new connection reaches it.
    lab.apply_delete(&pods(&[("web-3", "node-3", "web")]));
    let r = lab.probe(&[
        "--from",
        "default/client",
        "--to",
        "svc/default/web",
        "--port",
        "80",
        "--count",
        "30",
    ]);
    let by = answered_by(&r);
    assert_eq!(by.values().sum::<usize>(), 30, "{r:?}");
    assert!(!by.contains_key("default/web-3"), "{by:?}");
}

#[test]
fn session_affinity_pins_a_client() {
    let lab = up("af");
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: sticky}\nspec:\n  selector: {app: web}\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n  ports:\n  - {port: 80, targetPort: 8080}\n");
    for from in ["default/client", "node/node-2"] {
        let r = lab.probe(&[
            "--from",
            from,
            "--to",
            "svc/default/sticky",
            "--count",
            "20",
        ]);
        let by = answered_by(&r);
        assert_eq!(by.values().sum::<usize>(), 20, "{r:?}");
        assert_eq!(by.len(), 1, "{from} pinned to one endpoint: {by:?}");
    }
}

#[test]
fn node_ports_with_both_external_traffic_policies() {
    let lab = up("np");
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: local}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080, nodePort: 30080}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: cluster}\nspec:\n  type: NodePort\n  selector: {app: only1}\n  ports:\n  - {port: 80, targetPort: 8080, nodePort: 30081}\n",
    );
    lab.apply(&pods(&[("only1", "node-1", "only1")]));
    let state = lab.state();
    let external: IpAddr = state["external"]["ipv4"].as_str().unwrap().parse().unwrap();
    let node_ip = |n: &str| -> Value {
        state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .unwrap()["underlay_ipv4"]
            .clone()
    };

    // Local: each node answers from its own endpoint, and the client's address is preserved.
    let r = lab.probe(&["--from", "external", "--port", "30080", "--protocol", "tcp"]);
    assert_eq!(r.len(), 3, "{r:?}");
    for x in &r {
        assert_eq!(x["connected"], true, "{x}");
        let node = x["to"].as_str().unwrap().trim_start_matches("nodeport/");
        assert_eq!(
            x["answeredBy"],
            format!("default/web-{}", &node[5..]),
            "only the local endpoint: {x}"
        );
        assert_eq!(
            x["seenSourceIp"],
            external.to_string(),
            "client IP preserved: {x}"
        );
    }
    // Cluster: every node forwards to the one endpoint on node-1, masquerading the client.
    let r = lab.probe(&["--from", "external", "--port", "30081", "--protocol", "tcp"]);
    assert_eq!(r.len(), 3);
    for x in &r {
        assert_eq!(x["connected"], true, "{x}");
        assert_eq!(x["answeredBy"], "default/only1");
        if x["to"] != "nodeport/node-1" {
            assert_ne!(
                x["seenSourceIp"],
                external.to_string(),
                "SNAT across nodes: {x}"
            );
        }
    }
    // And Local on a node without a local endpoint drops: scale web down to node-1 only.
    lab.apply_delete(&pods(&[
        ("web-2", "node-2", "web"),
        ("web-3", "node-3", "web"),
    ]));
    let r = lab.probe(&[
        "--from",
        "external",
        "--to",
        "nodeport/node-2",
        "--port",
        "30080",
        "--timeout-ms",
        "500",
    ]);
    assert!(
        r.iter().all(|x| x["connected"] == false),
        "no local endpoint on node-2: {r:?}"
    );
    let _ = node_ip;
}

#[test]
fn internal_traffic_policy_local_stays_on_the_node() {
    let lab = up("it");
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: near}\nspec:\n  internalTrafficPolicy: Local\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n");
    let r = lab.probe(&[
        "--from",
        "default/client",
        "--to",
        "svc/default/near",
        "--count",
        "20",
    ]);
    let by = answered_by(&r);
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        vec!["default/web-1"],
        "client is on node-1: {by:?}"
    );
}

#[test]
fn no_endpoints_rejects_immediately_and_hairpin_works() {
    let lab = up("rj");
    lab.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  selector: {app: nobody}\n  ports:\n  - {port: 80, targetPort: 8080}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: self}\nspec:\n  selector: {app: client}\n  ports:\n  - {port: 80, targetPort: 8080}\n",
    );
    lab.apply(&pods(&[("client", "node-1", "client")]));
    let started = Instant::now();
    let r = lab.probe(&[
        "--from",
        "default/web-2",
        "--to",
        "svc/default/empty",
        "--timeout-ms",
        "3000",
    ]);
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "rejected, not timed out"
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["connected"], false);
    let err = r[0]["error"].as_str().unwrap_or("");
    assert!(
        err.contains("refused") || err.contains("unreachable"),
        "{err}"
    );
    // Hairpin: the client reaches itself through its own service.
    let r = lab.probe(&["--from", "default/client", "--to", "svc/default/self"]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["answeredBy"], "default/client", "{r:?}");
}

#[test]
fn terminating_endpoints_only_when_no_ready_one() {
    let lab = up("tm");
    let state = lab.state();
    let ip = |p: &str| state["pods"][p]["ips"][0].as_str().unwrap().to_string();
    let slice = |ready: bool| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: manual}}\nspec:\n  ports:\n  - {{name: http, port: 80}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: manual-1, labels: {{kubernetes.io/service-name: manual}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n\
             - {{addresses: [{}], conditions: {{ready: false, serving: true, terminating: true}}, nodeName: node-1}}\n\
             - {{addresses: [{}], conditions: {{ready: {ready}, serving: {ready}, terminating: false}}, nodeName: node-2}}\n",
            ip("default/web-1"),
            ip("default/web-2")
        )
    };
    // With the second endpoint ready or not, `want` alone answers (`why`).
    let only = |ready: bool, want: &str, why: &str| {
        lab.apply(&slice(ready));
        let by = answered_by(&lab.probe(&[
            "--from",
            "default/client",
            "--to",
            "svc/default/manual",
            "--count",
            "10",
        ]));
        assert_eq!(by.keys().collect::<Vec<_>>(), vec![want], "{why}: {by:?}");
    };
    only(false, "default/web-1", "only the terminating-serving one");
    only(true, "default/web-2", "a ready one wins");
}

#[test]
fn an_endpoint_replaced_in_place_takes_new_connections_at_once() {
    let lab = up("rp");
    let state = lab.state();
    let ip = |p: &str| state["pods"][p]["ips"][0].as_str().unwrap().to_string();
    let slice = |svc: &str, a: &str, b: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {svc}}}\nspec:\n  ports:\n  - {{name: http, port: 80}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\n\
             ports: [{{name: http, port: 8080}}]\nendpoints:\n\
             - {{addresses: [{}], conditions: {{ready: true}}, nodeName: node-1}}\n\
             - {{addresses: [{}], conditions: {{ready: true}}, nodeName: node-2}}\n",
            ip(a),
            ip(b)
        )
    };
    let answered = |svc: &str| {
        answered_by(&lab.probe(&[
            "--from",
            "default/client",
            "--to",
            &format!("svc/default/{svc}"),
            "--count",
            "20",
        ]))
    };
    lab.apply(
        &(slice("one", "default/web-1", "default/web-2")
            + &slice("two", "default/web-2", "default/web-3")),
    );
    let by = answered("one");
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        ["default/web-1", "default/web-2"],
        "{by:?}"
    );
    // One endpoint of each service replaced, the counts unchanged: the agents rewrite those
    // elements in place.
    lab.apply(
        &(slice("one", "default/web-1", "default/web-3")
            + &slice("two", "default/web-1", "default/web-3")),
    );
    for (svc, want) in [
        ("one", ["default/web-1", "default/web-3"]),
        ("two", ["default/web-1", "default/web-3"]),
    ] {
        let by = answered(svc);
        assert_eq!(by.keys().collect::<Vec<_>>(), want, "{svc}: {by:?}");
        assert_eq!(by.values().sum::<usize>(), 20, "{svc}: {by:?}");
    }
    let log = std::fs::read_to_string(lab.dir().join("logs").join("agent-node-1.log")).unwrap();
    assert!(
        log.contains("updated in place") && log.contains("default/two"),
        "node-1's agent took the fast path:\n{log}"
    );
    // The agent started on a node without its table: the two-step cold load, not a fallback.
    assert!(
        log.contains("(cold load)") && !log.contains("cold load failed"),
        "{log}"
    );
}

#[test]
fn udp_flow_moves_when_its_endpoint_goes() {
    let lab = up("ud");
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 53, protocol: UDP, targetPort: 5353}\n");
    let svc_ip: IpAddr = lab.state()["services"]["default/dns"]["clusterIps"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let client = NetNs::open_named(&lab.netns("pod-default-client")).unwrap();
    // One UDP flow: a fixed source port, so conntrack keeps sending it to the same endpoint.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (res_tx, res_rx) = std::sync::mpsc::channel::<String>();
    let t = std::thread::spawn(move || {
        client.enter_this_thread().unwrap();
        let s = UdpSocket::bind(("0.0.0.0", 40053)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.connect(SocketAddr::new(svc_ip, 53)).unwrap();
        let ask = |s: &UdpSocket| {
            let mut buf = [0u8; 256];
            for _ in 0..6 {
                s.send(b"q").unwrap();
                if let Ok(n) = s.recv(&mut buf) {
                    return String::from_utf8_lossy(&buf[..n])
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                }
            }
            String::new()
        };
        res_tx.send(ask(&s)).unwrap();
        rx.recv().unwrap();
        res_tx.send(ask(&s)).unwrap();
    });
    let first = res_rx.recv().unwrap();
    assert!(first.starts_with("default/web-"), "{first:?}");
    let (_, n) = first.split_at("default/web-".len());
    lab.apply_delete(&pods(&[(&format!("web-{n}"), &format!("node-{n}"), "web")]));
    tx.send(()).unwrap();
    let second = res_rx.recv().unwrap();
    t.join().unwrap();
    assert!(
        second.starts_with("default/web-") && second != first,
        "the flow moved from {first} to {second:?}"
    );
    let _ = BTreeSet::<u8>::new();
}
