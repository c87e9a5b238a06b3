//! DNS-name egress rules on a real lab (issue 15 item 3): a pod allowed egress only to
//! `*.allowed.test` (and DNS to the lab's DNS server, dnsmasq in `external`) reaches a server
//! by 200 fresh names, each with its own address, on the first try (a connect that had to
//! retransmit its SYN would take over a second: the limit is 900 ms); cannot reach an address
//! it has not resolved, nor the same server's address looked up under `x.other.test`; and loses
//! access once the answer's TTL passed without another lookup. `malla policy trace` agrees at
//! each step, naming the name and answer that put the address in the rule's set, then saying it
//! expired. A Deny rule by name drops an address learned for a denied name although a later
//! rule allows the address. The agent's `/dns` refuses bad queries; a trace whose agent cannot
//! be asked says UNKNOWN rather than ALLOWED.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;

const TTL: u32 = 4;
const NAMES: u8 = 200;
const PORT: u16 = 8099;
const DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
/// The address `late.allowed.test` and `x.other.test` both have.
const SHARED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 250);
const WARMUP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 251);
/// The address of `bad.denied.test`.
const DENIED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 252);

fn fresh(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, 10 + i)
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, labels: {app: guarded}}
spec: {nodeName: node-1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: admin-guarded, labels: {app: admin-guarded}}
spec: {nodeName: node-1, containers: [{name: c}]}
"#;

const POLICY: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: client-allowed-names}
spec:
  selector: app == 'client'
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination: {nets: [198.19.1.2/32], ports: [53]}
  - action: Allow
    protocol: TCP
    destination: {domains: ["*.allowed.test"]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: guarded-denied-names}
spec:
  selector: app == 'guarded'
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination: {nets: [198.19.1.2/32], ports: [53]}
  - action: Deny
    protocol: TCP
    destination: {domains: ["*.denied.test"]}
  - action: Allow
    protocol: TCP
    destination: {nets: [198.19.1.0/24]}
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-denied-names}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: admin-guarded}}}}
  egress:
  - {action: Deny, to: [{domainNames: ["*.denied.test"]}]}
"#;

/// `malla policy trace FROM IP --port PORT -o json` (and `extra` flags): the one verdict.
fn trace_json(lab: &Lab, from: &str, to: Ipv4Addr, extra: &[&str]) -> serde_json::Value {
    let to = to.to_string();
    let port = PORT.to_string();
    let mut args = vec!["policy", "trace", from, &to, "--port", &port, "-o", "json"];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(&lab.run(&args)).expect("json");
    v[0].clone()
}

fn trace_text(lab: &Lab, from: &str, to: Ipv4Addr, extra: &[&str]) -> String {
    let to = to.to_string();
    let port = PORT.to_string();
    let mut args = vec!["policy", "trace", from, &to, "--port", &port];
    args.extend_from_slice(extra);
    lab.run(&args)
}

/// One HTTP/1.0 GET to the agent in `netns`: (status, body).
fn agent_get(netns: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let path = path.to_string();
    NetNs::open_named(netns)
        .expect("node netns")
        .run(move || {
            let mut s = TcpStream::connect("127.0.0.1:9099").expect("agent's HTTP");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let status = out
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
            (status, body.unwrap_or_default())
        })
        .expect("netns")
}

fn resolve(name: &str) -> Result<Ipv4Addr, String> {
    malla_lab::dns::resolve_a(SocketAddrV4::new(DNS, 53), name).map_err(|e| format!("{e:#}"))
}

fn connects(ip: Ipv4Addr) -> Result<Duration, String> {
    let t = Instant::now();
    TcpStream::connect_timeout(
        &SocketAddr::V4(SocketAddrV4::new(ip, PORT)),
        Duration::from_millis(900),
    )
    .map(|_| t.elapsed())
    .map_err(|e| format!("{ip}: {e} after {:?}", t.elapsed()))
}

#[test]
fn pods_reach_allowed_names_on_the_first_try_and_nothing_else() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "dns");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let ext = lab.netns("external");
    // Every fresh name has its own address on the external side.
    let addrs = common::ip(&["-n", &ext, "-o", "-4", "addr", "show"]);
    let iface = addrs
        .lines()
        .find(|l| l.contains(&format!("{DNS}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no {DNS} in external: {addrs}"))
        .to_string();
    for ip in (0..NAMES).map(fresh).chain([SHARED, WARMUP, DENIED]) {
        common::ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            &iface,
        ]);
    }
    let ext_ns = NetNs::open_named(&ext).expect("external netns");
    let listener = ext_ns
        .run(|| TcpListener::bind(("0.0.0.0", PORT)))
        .expect("external netns")
        .expect("listen in external");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut records: Vec<(String, IpAddr)> = (0..NAMES)
        .map(|i| (format!("n{i}.allowed.test"), IpAddr::V4(fresh(i))))
        .collect();
    records.push(("late.allowed.test".into(), IpAddr::V4(SHARED)));
    records.push(("warmup.allowed.test".into(), IpAddr::V4(WARMUP)));
    records.push(("x.other.test".into(), IpAddr::V4(SHARED)));
    records.push(("bad.denied.test".into(), IpAddr::V4(DENIED)));
    let _dns = malla_lab::dns::DnsServer::start(&ext, DNS, &records, TTL, &lab.dir())
        .expect("dnsmasq in external");
    lab.apply(PODS);
    lab.apply(POLICY);
    let pod = NetNs::open_named(&lab.netns("pod-default-client")).expect("client's netns");

    // The policy is there: an address not resolved is denied. DNS works through the proxy
    // (a few tries while the node converges).
    let before = pod.run(move || connects(fresh(0))).expect("netns");
    assert!(before.is_err(), "reached {} before resolving it", fresh(0));
    let warm = pod
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match resolve("warmup.allowed.test").and_then(connects) {
                    Ok(d) => return Ok(d),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .expect("netns");
    assert!(warm.is_ok(), "warm-up through the proxy: {warm:?}");

    // 200 fresh names, each connected to at once after its answer.
    let (failures, slowest) = pod
        .run(|| {
            let mut failures = Vec::new();
            let mut slowest = Duration::ZERO;
            for i in 0..NAMES {
                let name = format!("n{i}.allowed.test");
                match resolve(&name) {
                    Ok(ip) if ip == fresh(i) => match connects(ip) {
                        Ok(d) => slowest = slowest.max(d),
                        Err(e) => failures.push(format!("{name}: {e}")),
                    },
                    Ok(ip) => failures.push(format!("{name}: resolved to {ip}")),
                    Err(e) => failures.push(e),
                }
            }
            (failures, slowest)
        })
        .expect("netns");
    eprintln!(
        "{NAMES} fresh names: {} failed, slowest connect {slowest:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "first-try failures: {failures:#?}");

    // Access ends with the TTL; another name for the same address does not open it. The trace
    // agrees at each step, naming the name and answer, then the expiry.
    let ip = pod
        .run(|| resolve("late.allowed.test"))
        .expect("netns")
        .expect("late.allowed.test");
    assert_eq!(ip, SHARED);
    let first = pod.run(move || connects(ip)).expect("netns");
    let traced = Instant::now();
    let t = trace_json(&lab, "default/client", SHARED, &[]);
    let text = trace_text(&lab, "default/client", SHARED, &[]);
    assert!(
        traced.elapsed() < Duration::from_secs(u64::from(TTL) - 1),
        "traces took {:?}: the TTL would pass",
        traced.elapsed()
    );
    assert!(first.is_ok(), "late.allowed.test: {first:?}");
    assert_eq!(t["allowed"], true, "{t}");
    let rule = &t["dns"]["rules"][0];
    assert_eq!(rule["member"], true, "{t}");
    assert_eq!(rule["patterns"][0], "*.allowed.test", "{t}");
    assert_eq!(rule["policy"], "client-allowed-names", "{t}");
    assert_eq!(rule["index"], 1, "{t}");
    assert_eq!(rule["learned"]["name"], "late.allowed.test", "{t}");
    assert_eq!(rule["learned"]["record"], "late.allowed.test", "{t}");
    assert_eq!(rule["learned"]["ttl"], TTL, "{t}");
    assert!(rule["learned"]["ttlLeftMs"].as_i64().unwrap() > 0, "{t}");
    assert!(
        text.contains(": ALLOWED")
            && text.contains(&format!(
                "dns: {SHARED} in domains *.allowed.test (rule 1 of default/client-allowed-names, Allow): learned from late.allowed.test A {SHARED} (ttl {TTL} s, "
            )),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(u64::from(TTL) * 1000 + 1500));
    let after_ttl = pod.run(move || connects(ip)).expect("netns");
    assert!(
        after_ttl.is_err(),
        "still reachable after the TTL: {after_ttl:?}"
    );
    let t = trace_json(&lab, "default/client", SHARED, &[]);
    let text = trace_text(&lab, "default/client", SHARED, &[]);
    assert_eq!(t["allowed"], false, "{t}");
    assert_eq!(t["dns"]["rules"][0]["member"], false, "{t}");
    assert!(
        text.contains(": DENIED")
            && text.contains(&format!(
                "dns: {SHARED} no longer in domains *.allowed.test (rule 1 of default/client-allowed-names, Allow): late.allowed.test A {SHARED} (ttl {TTL} s, expired "
            )),
        "{text}"
    );
    let other = pod
        .run(|| resolve("x.other.test"))
        .expect("netns")
        .expect("x.other.test");
    let by_other = pod.run(move || connects(other)).expect("netns");
    assert_eq!(other, SHARED);
    assert!(by_other.is_err(), "reachable by x.other.test: {by_other:?}");
    assert_eq!(
        trace_json(&lab, "default/client", SHARED, &[])["allowed"],
        false
    );

    // Deny by name: the address is open (a later rule allows its network) until the pod learns
    // it for a denied name, then closed; the trace says which rule and answer.
    let guarded = NetNs::open_named(&lab.netns("pod-default-guarded")).expect("guarded's netns");
    let open = guarded.run(move || connects(DENIED)).expect("netns");
    assert!(
        open.is_ok(),
        "{DENIED} before its denied name was resolved: {open:?}"
    );
    let t = trace_json(&lab, "default/guarded", DENIED, &[]);
    assert_eq!(t["allowed"], true, "{t}");
    let bad = guarded
        .run(|| resolve("bad.denied.test"))
        .expect("netns")
        .expect("bad.denied.test");
    assert_eq!(bad, DENIED);
    let closed = guarded.run(move || connects(DENIED)).expect("netns");
    let t = trace_json(&lab, "default/guarded", DENIED, &[]);
    let text = trace_text(&lab, "default/guarded", DENIED, &[]);
    assert!(
        closed.is_err(),
        "reached {DENIED} learned for bad.denied.test"
    );
    assert_eq!(t["allowed"], false, "{t}");
    assert_eq!(t["tiers"]["egress"]["decidedBy"]["rule"]["index"], 1, "{t}");
    assert!(
        text.contains(&format!(
            "dns: {DENIED} in domains *.denied.test (rule 1 of default/guarded-denied-names, Deny): learned from bad.denied.test A {DENIED}"
        )),
        "{text}"
    );

    // The same by a ClusterNetworkPolicy's Deny rule (the Admin tier; nothing else applies).
    let admin = NetNs::open_named(&lab.netns("pod-default-admin-guarded")).expect("netns");
    let open = admin.run(move || connects(DENIED)).expect("netns");
    assert!(
        open.is_ok(),
        "{DENIED} before its denied name was resolved: {open:?}"
    );
    let bad = admin
        .run(|| resolve("bad.denied.test"))
        .expect("netns")
        .expect("bad.denied.test");
    assert_eq!(bad, DENIED);
    let closed = admin.run(move || connects(DENIED)).expect("netns");
    let text = trace_text(&lab, "default/admin-guarded", DENIED, &[]);
    assert!(
        closed.is_err(),
        "reached {DENIED} learned for bad.denied.test"
    );
    assert!(
        text.contains(": DENIED")
            && text.contains(&format!(
                "dns: {DENIED} in domains *.denied.test (rule 0 of kube-admin/cnp.deny-denied-names, Deny): learned from bad.denied.test A {DENIED}"
            )),
        "{text}"
    );

    // The agent's /dns: the pod's records only, bad queries refused with a short answer.
    let node = lab.netns("node-1");
    let (code, body) = agent_get(&node, "/dns?pod=default/guarded");
    assert_eq!(code, 200, "{body}");
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty(), "{body}");
    assert!(
        lines.iter().all(|l| l["pod"] == "default/guarded"),
        "{body}"
    );
    for path in [
        "/dns?pod=no-slash".to_string(),
        "/dns?bogus=1".to_string(),
        format!("/dns?pod=a/{}", "x".repeat(4000)),
    ] {
        let (code, body) = agent_get(&node, &path);
        assert!(
            (400..500).contains(&code) && body.len() < 512,
            "{}: {code} {body}",
            &path[..40.min(path.len())]
        );
    }

    // An agent that cannot be asked: the verdict is unknown, never ALLOWED.
    let t = trace_json(
        &lab,
        "default/guarded",
        DENIED,
        &["--agent-address", "127.0.0.1:1"],
    );
    assert!(t["allowed"].is_null(), "{t}");
    assert!(
        t["dns"]["error"]
            .as_str()
            .unwrap()
            .contains("agent unreachable"),
        "{t}"
    );
    let text = trace_text(
        &lab,
        "default/guarded",
        DENIED,
        &["--agent-address", "127.0.0.1:1"],
    );
    assert!(
        text.contains(": UNKNOWN") && !text.contains("ALLOWED"),
        "{text}"
    );
}
