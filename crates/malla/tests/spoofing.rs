//! Anti-spoofing (issue 14): in a 2-node dual-stack lab, a pod sends UDP from forged sources of
//! every kind — another pod's address on its node and on the other node, an unused pool
//! address, an outside address, the other node's and its own node's underlay address — to a pod
//! on its node, a pod on the other node and `external`, IPv4 and IPv6. Receivers count what
//! arrives: nothing forged, while the same pod's real traffic arrives, a pod's allowed prefix
//! (annotation `malla.dev/allowed-source-prefixes`) is honoured, and the drop counters rose.
//! With `antiSpoofing: false` in the cluster config the forged packets arrive (what the test
//! would see without the guard), and they stop again when it is switched back on.
//!
//! In an IPv4-only lab (`ipv4_sources_are_checked_by_the_kernel`) the node has no guard chain:
//! each workload veth's strict `rp_filter` drops the same forged kinds (counted in the node's
//! `IPReversePathFilter`); a pod with an allowed prefix brings the chain and loosens its own veth,
//! and when it goes the chain goes too.
//!
//! The packets are sent by `spoof/udp.py` from a transparent UDP socket (`IP_TRANSPARENT`,
//! `IPV6_TRANSPARENT`): the kernel sends from any bound address, as a raw socket would.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::Lab;
use serde_json::Value;

const UDP_PY: &str = include_str!("spoof/udp.py");
const PORT: &str = "7777";
/// How long each receiver listens once ready.
const LISTEN_SECONDS: &str = "6";

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: att}
spec: {nodeName: node-1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other}
spec: {nodeName: node-1, containers: [{name: c}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v1}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v2}
spec: {nodeName: node-2, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: allowed
  annotations: {malla.dev/allowed-source-prefixes: "198.19.5.0/24, fd00:198:19:5::/64"}
spec: {nodeName: node-1, containers: [{name: c}]}
"#;

/// A UDP receiver in a namespace, writing what it got to a file when its time is up.
struct Receiver {
    name: String,
    child: Child,
    out: PathBuf,
}

impl Receiver {
    fn start(script: &Path, netns: &str, name: &str, dir: &Path) -> Receiver {
        let out = dir.join(format!("recv-{name}.txt"));
        let _ = std::fs::remove_file(&out);
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "python3"])
            .arg(script)
            .args(["recv", PORT, LISTEN_SECONDS])
            .arg(&out)
            .spawn()
            .expect("python3");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&out).is_ok_and(|s| s.starts_with("ready")) {
            assert!(Instant::now() < deadline, "receiver {name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Receiver {
            name: name.to_string(),
            child,
            out,
        }
    }

    /// Waits for the end and returns how many packets of each tag arrived.
    fn finish(mut self) -> BTreeMap<String, usize> {
        let status = self.child.wait().expect("receiver");
        assert!(status.success(), "receiver {} failed", self.name);
        let text = std::fs::read_to_string(&self.out).expect("receiver output");
        assert!(text.ends_with("done -\n"), "{}: {text}", self.name);
        let mut counts = BTreeMap::new();
        for line in text.lines().filter(|l| !l.ends_with(" -")) {
            let tag = line.split_whitespace().next().unwrap_or_default();
            *counts.entry(tag.to_string()).or_default() += 1;
        }
        counts
    }
}

/// Sends `count` datagrams for each `(source, destination, tag)` from inside `netns`.
fn send(script: &Path, netns: &str, sends: &[(IpAddr, IpAddr, String)], count: usize) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "python3"])
        .arg(script)
        .args(["send", PORT, &count.to_string()])
        .args(sends.iter().map(|(s, d, t)| format!("{s},{d},{t}")))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "sending from {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The packets the drop rules of `node`'s anti-spoofing chain counted: (IPv4, IPv6).
fn dropped(lab: &Lab, node: &str) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns(node)])
        .args(["nft", "list", "chain", "inet", "malla", "guard"])
        .output()
        .expect("nft");
    let text = String::from_utf8_lossy(&out.stdout);
    let count = |comment: &str| -> u64 {
        text.lines()
            .find(|l| l.contains(&format!("comment \"{comment}\"")))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let i = w.iter().position(|x| *x == "packets")?;
                w.get(i + 1)?.parse().ok()
            })
            .unwrap_or_else(|| panic!("no {comment} counter in:\n{text}"))
    };
    (count("spoofed-v4"), count("spoofed-v6"))
}

fn ips_of(v: &Value) -> (IpAddr, IpAddr) {
    let ips: Vec<IpAddr> = v
        .as_array()
        .expect("ips")
        .iter()
        .map(|i| i.as_str().unwrap().parse().unwrap())
        .collect();
    let v4 = *ips.iter().find(|i| i.is_ipv4()).expect("an IPv4 address");
    let v6 = *ips.iter().find(|i| i.is_ipv6()).expect("an IPv6 address");
    (v4, v6)
}

/// Sets the cluster config's `antiSpoofing` and waits until every agent applied it.
fn anti_spoofing(lab: &Lab, on: bool) {
    let paths =
        malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).expect("paths");
    let state = malla_lab::state::LabState::require(&paths).expect("state");
    malla_lab::topology::update_cluster_config(&paths, &state, |c| c.anti_spoofing = on)
        .expect("agents applied the config");
}

#[test]
fn forged_sources_never_leave_a_pod() {
    let lab = Lab::new(&common::malla_bin(), "spoof");
    lab.run(&["lab", "up", "--nodes", "2", "--ipv6"]);
    lab.apply(PODS);
    let script = lab.dir().join("udp.py");
    std::fs::write(&script, UDP_PY).unwrap();
    let state = lab.state();
    let pod = |name: &str| ips_of(&state["pods"][format!("default/{name}")]["ips"]);
    let node = |i: usize| -> (IpAddr, IpAddr) {
        let n = &state["nodes"][i];
        (
            n["underlay_ipv4"].as_str().unwrap().parse().unwrap(),
            n["underlay_ipv6"].as_str().unwrap().parse().unwrap(),
        )
    };
    let pod_ns = |name: &str| lab.netns(&format!("pod-default-{name}"));
    let (node1, node2) = (node(0), node(1));
    let external: (IpAddr, IpAddr) = (
        "198.19.1.2".parse().unwrap(),
        "fd00:198:19:1::2".parse().unwrap(),
    );
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    // Every kind of forged source, IPv4 and IPv6.
    let forged: Vec<(&str, (IpAddr, IpAddr))> = vec![
        ("pod-same-node", pod("other")),
        ("pod-other-node", pod("v2")),
        (
            "unused-pool",
            (ip("198.18.200.77"), ip("fd00:198:18::beef:77")),
        ),
        ("outside", (ip("198.19.1.77"), ip("fd00:198:19:1::77"))),
        ("other-node", node2),
        ("own-node", node1),
    ];
    let targets: Vec<(&str, String, (IpAddr, IpAddr))> = vec![
        ("same-node", pod_ns("v1"), pod("v1")),
        ("other-node", pod_ns("v2"), pod("v2")),
        ("external", lab.netns("external"), external),
    ];
    let att = pod("att");
    let allowed_src = (ip("198.19.5.9"), ip("fd00:198:19:5::9"));
    let pick = |p: (IpAddr, IpAddr), v6: bool| if v6 { p.1 } else { p.0 };

    let phase = || {
        let before = dropped(&lab, "node-1");
        let receivers: Vec<Receiver> = targets
            .iter()
            .map(|(name, ns, _)| Receiver::start(&script, ns, name, &lab.dir()))
            .collect();
        let mut from_att = Vec::new();
        let mut from_allowed = Vec::new();
        for (dst, _, dst_ips) in &targets {
            for v6 in [false, true] {
                let fam = if v6 { "v6" } else { "v4" };
                let to = pick(*dst_ips, v6);
                for (kind, src) in &forged {
                    from_att.push((pick(*src, v6), to, format!("spoof:{kind}:{dst}:{fam}")));
                }
                from_att.push((pick(att, v6), to, format!("real:{dst}:{fam}")));
                from_allowed.push((pick(allowed_src, v6), to, format!("allowed:{dst}:{fam}")));
                // Outside its prefix, the annotated pod is held like any other.
                let beyond = if v6 {
                    ip("fd00:198:19:6::9")
                } else {
                    ip("198.19.6.9")
                };
                from_allowed.push((beyond, to, format!("spoof:beyond-prefix:{dst}:{fam}")));
            }
        }
        send(&script, &pod_ns("att"), &from_att, 3);
        send(&script, &pod_ns("allowed"), &from_allowed, 3);
        let got: BTreeMap<String, BTreeMap<String, usize>> = receivers
            .into_iter()
            .map(|r| (r.name.clone(), r.finish()))
            .collect();
        let after = dropped(&lab, "node-1");
        let all: Vec<(&String, &String, usize)> = got
            .iter()
            .flat_map(|(r, m)| m.iter().map(move |(t, n)| (r, t, *n)))
            .collect();
        let spoofed: Vec<_> = all
            .iter()
            .filter(|(_, t, _)| t.starts_with("spoof:"))
            .collect();
        // Real and allowed traffic arrives either way.
        for (dst, _, _) in &targets {
            for fam in ["v4", "v6"] {
                for tag in [format!("real:{dst}:{fam}"), format!("allowed:{dst}:{fam}")] {
                    assert!(
                        got[*dst].get(&tag).copied().unwrap_or(0) > 0,
                        "{tag} did not arrive at {dst}: {got:#?}"
                    );
                }
            }
        }
        assert!(spoofed.is_empty(), "forged packets arrived: {spoofed:#?}");
        // 6 kinds + beyond-prefix, 3 targets, 3 packets each, per family.
        assert!(
            after.0 >= before.0 + 7 * 3 * 3,
            "IPv4 drops {before:?} -> {after:?}"
        );
        assert!(
            after.1 >= before.1 + 7 * 3 * 3,
            "IPv6 drops {before:?} -> {after:?}"
        );
    };
    phase();

    // Real traffic is unaffected: the probe matrix from the attacker's node connects.
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: late}\nspec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 8080}]}]}\n");
    let results = lab.probe(&[]);
    let failed: Vec<&Value> = results.iter().filter(|r| r["connected"] != true).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(results.iter().any(|r| r["from"] == "default/late"));

    anti_spoofing(&lab, false);
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns("node-1")])
        .args(["nft", "list", "chain", "inet", "malla", "guard"])
        .output()
        .expect("nft");
    assert!(!out.status.success(), "the guard chain is still there");
    let phase_off = || {
        let receivers: Vec<Receiver> = targets[..1]
            .iter()
            .map(|(name, ns, _)| Receiver::start(&script, ns, name, &lab.dir()))
            .collect();
        let mut sends = Vec::new();
        for v6 in [false, true] {
            let fam = if v6 { "v6" } else { "v4" };
            for (kind, src) in &forged[..4] {
                sends.push((
                    pick(*src, v6),
                    pick(targets[0].2, v6),
                    format!("spoof:{kind}:same-node:{fam}"),
                ));
            }
        }
        send(&script, &pod_ns("att"), &sends, 3);
        let got = receivers.into_iter().next().unwrap().finish();
        for fam in ["v4", "v6"] {
            for kind in ["pod-same-node", "unused-pool", "outside"] {
                let tag = format!("spoof:{kind}:same-node:{fam}");
                assert!(
                    got.get(&tag).copied().unwrap_or(0) > 0,
                    "{tag} did not arrive with anti-spoofing off: {got:#?}"
                );
            }
        }
    };
    phase_off();
    anti_spoofing(&lab, true);
    phase();
}

/// The node's `IPReversePathFilter` count (`/proc/net/netstat`, `TcpExt`).
fn reverse_path_drops(lab: &Lab, node: &str) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.netns(node),
            "cat",
            "/proc/net/netstat",
        ])
        .output()
        .expect("netstat");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "IPReversePathFilter")
        .expect("IPReversePathFilter in TcpExt");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// `rp_filter` of every workload interface of `node`.
fn reverse_path_filters(lab: &Lab, node: &str) -> BTreeMap<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.netns(node), "sh", "-c"])
        .arg("for f in /proc/sys/net/ipv4/conf/mla*/rp_filter; do echo \"$f $(cat $f)\"; done")
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (path, v) = l.split_once(' ')?;
            Some((path.split('/').nth(6)?.to_string(), v.to_string()))
        })
        .collect()
}

fn has_guard_chain(lab: &Lab, node: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &lab.netns(node)])
        .args(["nft", "list", "chain", "inet", "malla", "guard"])
        .output()
        .expect("nft")
        .status
        .success()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ipv4_sources_are_checked_by_the_kernel() {
    let lab = Lab::new(&common::malla_bin(), "spoof4");
    lab.run(&["lab", "up", "--nodes", "2"]);
    // The pods of the dual-stack test but the annotated one (it comes later).
    let plain = PODS.split("---").take(4).collect::<Vec<_>>().join("---");
    lab.apply(&plain);
    let script = lab.dir().join("udp.py");
    std::fs::write(&script, UDP_PY).unwrap();
    let state = lab.state();
    let v4 = |v: &Value| -> IpAddr {
        v.as_array()
            .expect("ips")
            .iter()
            .map(|i| i.as_str().unwrap().parse::<IpAddr>().unwrap())
            .find(IpAddr::is_ipv4)
            .expect("an IPv4 address")
    };
    let pod = |name: &str| v4(&state["pods"][format!("default/{name}")]["ips"]);
    let node = |i: usize| -> IpAddr {
        state["nodes"][i]["underlay_ipv4"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let pod_ns = |name: &str| lab.netns(&format!("pod-default-{name}"));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let forged: Vec<(&str, IpAddr)> = vec![
        ("pod-same-node", pod("other")),
        ("pod-other-node", pod("v2")),
        ("unused-pool", ip("198.18.200.77")),
        ("outside", ip("198.19.1.77")),
        ("other-node", node(1)),
        ("own-node", node(0)),
    ];
    let targets: Vec<(&str, String, IpAddr)> = vec![
        ("same-node", pod_ns("v1"), pod("v1")),
        ("other-node", pod_ns("v2"), pod("v2")),
        ("external", lab.netns("external"), ip("198.19.1.2")),
    ];

    // No chain on the packet path: the kernel holds every veth.
    assert!(
        !has_guard_chain(&lab, "node-1"),
        "a guard chain without need"
    );
    let filters = reverse_path_filters(&lab, "node-1");
    assert_eq!(filters.len(), 3, "{filters:?}");
    assert!(filters.values().all(|v| v == "1"), "{filters:?}");

    // Sends forged and real packets from `from` (and from the annotated pod when given) to every
    // target; returns what arrived per target.
    let round = |from_allowed: Option<IpAddr>| -> BTreeMap<String, BTreeMap<String, usize>> {
        let receivers: Vec<Receiver> = targets
            .iter()
            .map(|(name, ns, _)| Receiver::start(&script, ns, name, &lab.dir()))
            .collect();
        let mut from_att = Vec::new();
        let mut from_allowed_pod = Vec::new();
        for (dst, _, to) in &targets {
            for (kind, src) in &forged {
                from_att.push((*src, *to, format!("spoof:{kind}:{dst}")));
            }
            from_att.push((pod("att"), *to, format!("real:{dst}")));
            if let Some(allowed) = from_allowed {
                from_allowed_pod.push((allowed, *to, format!("allowed:{dst}")));
                from_allowed_pod.push((ip("198.19.6.9"), *to, format!("spoof:beyond:{dst}")));
                from_allowed_pod.push((pod("other"), *to, format!("spoof:annotated:{dst}")));
            }
        }
        send(&script, &pod_ns("att"), &from_att, 3);
        if !from_allowed_pod.is_empty() {
            send(&script, &pod_ns("allowed"), &from_allowed_pod, 3);
        }
        receivers
            .into_iter()
            .map(|r| (r.name.clone(), r.finish()))
            .collect()
    };
    let check = |got: &BTreeMap<String, BTreeMap<String, usize>>, allowed: bool| {
        for (dst, _, _) in &targets {
            let mut tags = vec![format!("real:{dst}")];
            if allowed {
                tags.push(format!("allowed:{dst}"));
            }
            for tag in tags {
                assert!(
                    got[*dst].get(&tag).copied().unwrap_or(0) > 0,
                    "{tag} did not arrive at {dst}: {got:#?}"
                );
            }
        }
        let spoofed: Vec<_> = got
            .iter()
            .flat_map(|(r, m)| m.keys().map(move |t| (r, t)))
            .filter(|(_, t)| t.starts_with("spoof:"))
            .collect();
        assert!(spoofed.is_empty(), "forged packets arrived: {spoofed:#?}");
    };

    let before = reverse_path_drops(&lab, "node-1");
    check(&round(None), false);
    let after = reverse_path_drops(&lab, "node-1");
    // 3 targets, 3 packets each, of 5 kinds: a source that is the node's own address is refused
    // as a martian (the route back is local), which `IPReversePathFilter` does not count.
    assert!(
        after >= before + 5 * 3 * 3,
        "IPReversePathFilter {before} -> {after}"
    );
    // The agent shows them (it started counting at 0 before any of these).
    let metrics = Command::new("ip")
        .args(["netns", "exec", &lab.netns("node-1")])
        .args(["curl", "-s", "-m", "5", "http://127.0.0.1:9099/metrics"])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&metrics.stdout);
    let shown: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("malla_reverse_path_drops_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no malla_reverse_path_drops_total in:\n{text}"));
    assert!(
        shown >= after - before,
        "metric {shown}, kernel {before} -> {after}"
    );

    // A pod with an allowed prefix: the chain comes (and holds it), its veth is loosened.
    lab.apply(PODS.split("---").nth(4).unwrap());
    wait_for("the guard chain", || has_guard_chain(&lab, "node-1"));
    wait_for("the annotated pod's veth loosened", || {
        reverse_path_filters(&lab, "node-1")
            .values()
            .filter(|v| *v == "0")
            .count()
            == 1
    });
    let (chain_before, _) = dropped(&lab, "node-1");
    check(&round(Some(ip("198.19.5.9"))), true);
    let (chain_after, _) = dropped(&lab, "node-1");
    assert!(chain_after > chain_before, "the chain dropped nothing");

    // It goes: so does the chain, and every veth left is strict again.
    lab.apply_delete(PODS.split("---").nth(4).unwrap());
    wait_for("the guard chain to go", || !has_guard_chain(&lab, "node-1"));
    let filters = reverse_path_filters(&lab, "node-1");
    assert!(filters.values().all(|v| v == "1"), "{filters:?}");
    check(&round(None), false);

    // Off: the kernel lets forged sources through again (what the test sees without the guard).
    anti_spoofing(&lab, false);
    let filters = reverse_path_filters(&lab, "node-1");
    assert!(filters.values().all(|v| v == "0"), "{filters:?}");
    let got = round(None);
    assert!(
        got["same-node"].contains_key("spoof:pod-same-node:same-node"),
        "forged packets did not arrive with anti-spoofing off: {got:#?}"
    );
}
