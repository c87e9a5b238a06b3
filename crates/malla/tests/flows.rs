//! Flow logs in a 2-node lab, real kernel: one connection allowed by a policy rule (a server
//! of the test's own in the pod, so the bytes each way are known), one denied by an isolating
//! policy, one to a Service's cluster IP and one to a NodePort from outside. `malla flows -o
//! json` shows each with its verdict, policy rule, Service and endpoint, and byte counts that
//! match what was sent (± headers); `malla flows --follow` shows a new denied connection within
//! 2 s.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;
use serde_json::Value;

const SENT: usize = 10_000;
const ANSWERED: usize = 5_000;

/// web takes 8080 and 9000 from client (rule 0) and 8080 from anywhere (rule 1: the NodePort's
/// clients, masqueraded or not); db takes nothing.
fn manifests() -> String {
    let pod = common::http_pod;
    let mut y = pod("client", "node-1") + &pod("web", "node-2") + &pod("db", "node-2");
    y.push_str(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-allow}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n    ports: [{port: 8080}, {port: 9000}]\n  - from: [{ipBlock: {cidr: 0.0.0.0/0}}]\n    ports: [{port: 8080}]\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-deny}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: np}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - {port: 81, targetPort: 8080, nodePort: 30090}\n",
    );
    y
}

/// `malla flows -o json ARGS`.
fn flows(lab: &Lab, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["flows", "-o", "json"];
    a.extend_from_slice(args);
    let out = lab.run(&a);
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
        .as_array()
        .cloned()
        .expect("an array")
}

/// Polls `malla flows -o json ARGS` until `done` holds for the flows (10 s), returning them.
fn wait_flows(lab: &Lab, args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = flows(lab, args);
        if done(&f) || Instant::now() > deadline {
            return f;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sum(f: &[Value], field: &str) -> u64 {
    f.iter().map(|x| x[field].as_u64().unwrap_or(0)).sum()
}

/// Connects from `from`'s namespace to `to`, sends `SENT` bytes and reads what comes back.
fn connect_from(netns: &str, to: SocketAddr) -> std::io::Result<usize> {
    NetNs::open_named(netns)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .run(move || -> std::io::Result<usize> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(700))?;
            s.write_all(&[1u8; SENT])?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut back = Vec::new();
            s.read_to_end(&mut back)?;
            Ok(back.len())
        })
        .map_err(|e| std::io::Error::other(e.to_string()))?
}

#[test]
fn flows_name_verdicts_policies_services_and_bytes() {
    let lab = Lab::new(&common::malla_bin(), "fl");
    lab.run(&["lab", "up", "--nodes", "2"]);
    lab.apply(&manifests());
    let state = lab.state();
    let ip = |p: &str| state["pods"][p]["ips"][0].as_str().unwrap().to_string();
    let (web, db) = (ip("default/web"), ip("default/db"));

    // A server of our own in web's namespace: reads everything, answers ANSWERED bytes.
    let listener = NetNs::open_named(&lab.netns("pod-default-web"))
        .unwrap()
        .run(|| TcpListener::bind("0.0.0.0:9000"))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&[2u8; ANSWERED]).unwrap();
        got.len()
    });
    let client_ns = lab.netns("pod-default-client");
    let web9000: SocketAddr = format!("{web}:9000").parse().unwrap();
    assert_eq!(connect_from(&client_ns, web9000).unwrap(), ANSWERED);
    assert_eq!(server.join().unwrap(), SENT);
    // Denied: db takes no ingress at all.
    let db8080: SocketAddr = format!("{db}:8080").parse().unwrap();
    assert!(
        connect_from(&client_ns, db8080).is_err(),
        "db should be isolated"
    );
    // A Service's cluster IP, and a NodePort from outside (probe servers answer a line).
    let svc = lab.probe(&[
        "--from",
        "default/client",
        "--to",
        "svc/default/web",
        "--port",
        "80",
        "--protocol",
        "tcp",
    ]);
    assert!(svc.iter().all(|r| r["connected"] == true), "{svc:?}");
    let np = lab.probe(&["--from", "external", "--port", "30090", "--protocol", "tcp"]);
    assert!(np.iter().all(|r| r["connected"] == true), "{np:?}");

    // 1. Allowed by web-allow's first rule, on web's node, with the bytes each way.
    let allowed = wait_flows(
        &lab,
        &[
            "--to",
            "default/web",
            "--port",
            "9000",
            "--policy",
            "default/web-allow",
        ],
        |f| sum(f, "completed") >= 1,
    );
    assert!(
        !allowed.is_empty(),
        "no allowed flow to web:9000 among {:#?}",
        flows(&lab, &[])
    );
    for f in &allowed {
        assert_eq!(f["verdict"], "allowed", "{f}");
        assert_eq!(f["policies"][0], "default/web-allow ingress[0]", "{f}");
        assert_eq!(f["src"]["name"], "client", "{f}");
        assert_eq!(f["node"], "node-2", "{f}");
    }
    let (out, back) = (sum(&allowed, "bytesOut"), sum(&allowed, "bytesIn"));
    let (pout, pback) = (sum(&allowed, "packetsOut"), sum(&allowed, "packetsIn"));
    // Payload plus 40-80 bytes of IP and TCP headers per packet.
    assert!(
        out >= SENT as u64 + 40 * pout && out <= SENT as u64 + 80 * pout,
        "{out} bytes in {pout} packets for {SENT} sent: {allowed:?}"
    );
    assert!(
        back >= ANSWERED as u64 + 40 * pback && back <= ANSWERED as u64 + 80 * pback,
        "{back} bytes in {pback} packets for {ANSWERED} answered: {allowed:?}"
    );

    // 2. Denied by db-deny, with the trace command to explain it.
    let denied = flows(&lab, &["--verdict", "denied", "--to", "default/db"]);
    assert!(!denied.is_empty(), "no denied flow to db");
    for f in &denied {
        assert_eq!(
            f["policies"],
            serde_json::json!(["default/db-deny ingress"]),
            "{f}"
        );
        assert_eq!(f["port"], 8080, "{f}");
        assert_eq!(
            f["trace"], "malla policy trace default/client default/db --port 8080 --protocol TCP",
            "{f}"
        );
    }
    // The trace it names agrees.
    let trace = lab.run(&[
        "policy",
        "trace",
        "default/client",
        "default/db",
        "--port",
        "8080",
        "--protocol",
        "TCP",
        "-o",
        "json",
    ]);
    assert!(trace.contains("\"allowed\": false"), "{trace}");

    // 3. The Service: named, with the endpoint chosen, the answer's bytes back.
    let answer_len = |r: &Value| {
        r["answeredBy"].as_str().unwrap().len() + 1 + r["seenSourceIp"].as_str().unwrap().len() + 1
    };
    let via_svc = wait_flows(&lab, &["--to", "default/web", "--port", "80"], |f| {
        sum(f, "completed") >= 1
    });
    let via_svc: Vec<Value> = via_svc
        .into_iter()
        .filter(|f| f["service"] == "default/web")
        .collect();
    assert!(!via_svc.is_empty(), "no flow naming Service default/web");
    for f in &via_svc {
        assert_eq!(f["endpoint"], format!("{web}:8080"), "{f}");
        assert_eq!(f["verdict"], "allowed", "{f}");
    }
    let (back, pback) = (sum(&via_svc, "bytesIn"), sum(&via_svc, "packetsIn"));
    let line = answer_len(&svc[0]) as u64;
    assert!(
        back >= line + 40 * pback && back <= line + 80 * pback,
        "{back} bytes in {pback} packets for a {line}-byte answer: {via_svc:?}"
    );

    // 4. The NodePort from outside: the Service, the endpoint, web-allow's second rule.
    let via_np = wait_flows(&lab, &["--port", "30090"], |f| {
        f.iter()
            .any(|x| x["policies"][0] == "default/web-allow ingress[1]")
    });
    assert!(
        via_np
            .iter()
            .all(|f| f["service"] == "default/np" && f["verdict"] == "allowed"),
        "{via_np:?}"
    );
    assert!(
        via_np
            .iter()
            .any(|f| f["endpoint"] == format!("{web}:8080")),
        "{via_np:?}"
    );
    assert!(
        via_np
            .iter()
            .any(|f| f["policies"][0] == "default/web-allow ingress[1]"),
        "{via_np:?}"
    );

    // The metrics count the rule's hits and the policy drop.
    let metrics = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.netns("node-2"),
            "curl",
            "-s",
            "http://127.0.0.1:9099/metrics",
        ])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(
            "malla_flow_rule_hits_total{policy=\"default/web-allow\",rule=\"ingress[0]\"}"
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains("malla_flow_drops_total{reason=\"policy\"} 0"),
        "{metrics}"
    );

    // --follow: a new denied connection shows within 2 s.
    let mut follow = lab
        .cmd()
        .args(["flows", "--follow", "--verdict", "denied", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Instant::now();
    assert!(connect_from(&client_ns, db8080).is_err());
    let got = loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok((at, line)) if line.contains(&db) => break Some((at, line)),
            Ok(_) => continue,
            Err(_) => break None,
        }
    };
    let _ = follow.kill();
    let _ = follow.wait();
    let (at, line) = got.expect("the denied connection never showed in --follow");
    let f: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(f["verdict"], "denied", "{f}");
    // Timed by the reader from just before the connect's SYN: the line arrives while the
    // connect still waits for an answer that never comes.
    let took = at.duration_since(sent);
    assert!(took <= Duration::from_secs(2), "shown after {took:?}");
    eprintln!("follow latency (SYN to the line on stdout): {took:?}");
}
