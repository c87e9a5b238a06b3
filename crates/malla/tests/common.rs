//! Shared helpers for the lab tests. The lab that tears itself down even when a test fails is
//! the test kit's ([`malla_test_kit::lab::Lab`]), run by this crate's `malla` binary.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub use malla_test_kit::lab::Lab;

pub fn malla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_malla"))
}

/// Panics unless root; `true` otherwise.
pub fn require_root() -> bool {
    malla_test_kit::lab::require_root();
    true
}

/// Runs `ip ARGS` and returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed EC certificate for `cn` in `dir`, valid a day: (key, certificate).
pub fn self_signed(dir: &std::path::Path, cn: &str) -> (PathBuf, PathBuf) {
    let (key, cert) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.crt")));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian package openssl)");
    assert!(made.status.success(), "openssl: {made:?}");
    (key, cert)
}

/// Two pods per node on nodes 1..=n, each declaring TCP and UDP ports.
pub fn two_pods_per_node(nodes: usize) -> String {
    let mut y = String::new();
    for n in 1..=nodes {
        for p in ["a", "b"] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{n}{p}\n  labels: {{app: test}}\nspec:\n  nodeName: node-{n}\n  containers:\n  - name: c\n    ports:\n    - containerPort: 8080\n    - containerPort: 5353\n      protocol: UDP\n"
            ));
        }
    }
    y
}

/// A pod `name` labelled `app: name` on `node`, declaring TCP port 8080 named `http`.
pub fn http_pod(name: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports:\n    - {{containerPort: 8080, name: http}}\n"
    )
}

/// Accepts one connection on `l` and counts the bytes it carries until EOF.
pub fn count_until_eof(l: &std::net::TcpListener) -> std::io::Result<u64> {
    use std::io::Read;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 65536];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// One TCP connection between two pods carrying paced chunks for a while: the sink (in
/// `sink_ns`, listening on `port`) counts bytes until EOF, the sender (in `sender_ns`) writes a
/// `chunk`-byte block every `pause` for `duration`. [`PacedStream::finish`] returns (sent,
/// received).
#[allow(dead_code)] // each test binary uses a subset of common
pub struct PacedStream {
    sender: std::thread::JoinHandle<std::io::Result<u64>>,
    sink: std::thread::JoinHandle<std::io::Result<u64>>,
}

#[allow(dead_code)]
impl PacedStream {
    pub fn start(
        sender_ns: &str,
        sink_ns: &str,
        sink_ip: std::net::IpAddr,
        port: u16,
        (chunk, pause, duration): (usize, std::time::Duration, std::time::Duration),
    ) -> PacedStream {
        use std::io::Write;
        let sink_ns = malla_dataplane::netns::NetNs::open_named(sink_ns).unwrap();
        let sender_ns = malla_dataplane::netns::NetNs::open_named(sender_ns).unwrap();
        let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
        let sink_ready = ready.clone();
        let sink = std::thread::spawn(move || -> std::io::Result<u64> {
            sink_ns.enter_this_thread().expect("enter sink netns");
            let l = std::net::TcpListener::bind(("0.0.0.0", port))?;
            sink_ready.wait();
            count_until_eof(&l)
        });
        ready.wait();
        let sender = std::thread::spawn(move || -> std::io::Result<u64> {
            sender_ns.enter_this_thread().expect("enter sender netns");
            let mut s = std::net::TcpStream::connect_timeout(
                &(sink_ip, port).into(),
                std::time::Duration::from_secs(2),
            )?;
            s.set_write_timeout(Some(std::time::Duration::from_secs(10)))?;
            let block = vec![0x5au8; chunk];
            let start = std::time::Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < duration {
                s.write_all(&block)?;
                sent += block.len() as u64;
                std::thread::sleep(pause);
            }
            s.shutdown(std::net::Shutdown::Write)?;
            Ok(sent)
        });
        PacedStream { sender, sink }
    }

    /// Waits for the end: (bytes sent, bytes received), panicking if either side failed.
    pub fn finish(self) -> (u64, u64) {
        let sent = self
            .sender
            .join()
            .unwrap()
            .expect("the stream kept flowing");
        let received = self.sink.join().unwrap().expect("sink read to EOF");
        (sent, received)
    }
}

/// Each node's underlay addresses, by node name, from `lab.state()`.
pub fn node_ips(
    state: &serde_json::Value,
) -> std::collections::BTreeMap<String, Vec<std::net::IpAddr>> {
    state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let mut ips = vec![n["underlay_ipv4"].as_str().unwrap().parse().unwrap()];
            if let Some(v6) = n["underlay_ipv6"].as_str() {
                ips.push(v6.parse().unwrap());
            }
            (n["name"].as_str().unwrap().to_string(), ips)
        })
        .collect()
}

/// Each pod's node, by `namespace/name`, from `lab.state()`.
pub fn pod_nodes(state: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    state["pods"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, p)| (k.clone(), p["node"].as_str().unwrap().to_string()))
        .collect()
}

/// A probe result's text field.
pub fn field(r: &serde_json::Value, k: &str) -> String {
    r[k].as_str().unwrap_or("").to_string()
}

/// The network model's pod↔pod part of a full `lab probe` over [`two_pods_per_node`] on 3
/// nodes: every probe connected; 30 ordered pod pairs × (tcp + udp) × `families`, each without
/// NAT and answered by its target. Returns those pairs.
pub fn pod_pairs_without_nat(
    results: &[serde_json::Value],
    families: usize,
) -> Vec<&serde_json::Value> {
    let failures: Vec<&serde_json::Value> =
        results.iter().filter(|r| r["connected"] != true).collect();
    assert!(
        failures.is_empty(),
        "{} of {} probes failed: {failures:#?}",
        failures.len(),
        results.len()
    );
    let pod_pairs: Vec<&serde_json::Value> = results
        .iter()
        .filter(|r| !field(r, "from").starts_with("node/") && field(r, "to") != "external")
        .collect();
    assert_eq!(pod_pairs.len(), 30 * 2 * families);
    for r in &pod_pairs {
        assert_eq!(r["clientIp"], r["seenSourceIp"], "NAT between pods: {r}");
        assert_eq!(
            field(r, "answeredBy"),
            field(r, "to"),
            "wrong responder: {r}"
        );
    }
    pod_pairs
}

/// `malla policy trace FROM TO --port PORT -o json`: whether it says allowed, and the JSON (for
/// messages).
pub fn trace_allowed(lab: &Lab, from: &str, to: &str, port: u16) -> (bool, String) {
    let port = port.to_string();
    let out = lab.try_run(&["policy", "trace", from, to, "--port", &port, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    (v[0]["allowed"].as_bool().unwrap(), v[0].to_string())
}
