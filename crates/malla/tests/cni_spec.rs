//! The CNI spec suite: the plugin binary run exactly as a runtime runs it (environment, stdin,
//! stdout, exit status) for every command, every supported version and every error code, with
//! golden result JSON. Set `UPDATE_GOLDEN=1` to rewrite the golden files after a deliberate change.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::{ip, Lab};
use serde_json::{json, Value};

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

struct Plugin<'a> {
    lab: &'a Lab,
    node_ns: String,
    bin: PathBuf,
    conf: Value,
}

/// What one invocation printed and whether it succeeded.
struct Outcome {
    ok: bool,
    out: Value,
}

impl Outcome {
    fn code(&self) -> u64 {
        assert!(!self.ok, "expected an error, got success: {}", self.out);
        self.out["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {}", self.out))
    }
}

impl<'a> Plugin<'a> {
    fn new(lab: &'a Lab) -> Self {
        let conflist: Value = serde_json::from_slice(
            &std::fs::read(lab.dir().join("nodes/node-1/net.d/10-malla.conflist")).unwrap(),
        )
        .unwrap();
        let mut conf = conflist["plugins"][0].clone();
        conf["name"] = json!("malla");
        conf["cniVersion"] = json!("1.1.0");
        Plugin {
            lab,
            node_ns: lab.netns("node-1"),
            bin: lab.dir().join("cni/bin/malla"),
            conf,
        }
    }

    fn conf(&self, version: &str) -> Value {
        let mut c = self.conf.clone();
        c["cniVersion"] = json!(version);
        c
    }

    /// Runs the plugin in the node's namespace with exactly these CNI_* variables.
    fn raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns])
            .arg(&self.bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text.trim())
                .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
        };
        let crashed = env.iter().any(|(k, _)| *k == "MALLA_CNI_FAULT");
        if !out.status.success() && !crashed {
            assert!(
                value.is_object(),
                "a failure prints spec error JSON, got {text:?}"
            );
            assert!(value["msg"].is_string(), "error has msg: {value}");
        }
        Outcome {
            ok: out.status.success(),
            out: value,
        }
    }

    fn call(&self, command: &str, cid: &str, netns: &str, conf: &Value) -> Outcome {
        let netns_path = format!("/run/netns/{netns}");
        self.raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &netns_path),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=spec;K8S_POD_NAME=p",
                ),
                ("CNI_PATH", "/nonexistent"),
            ],
            conf.to_string().as_bytes(),
        )
    }

    fn pod(&self, name: &str) -> String {
        let ns = self.lab.netns(&format!("spec-{name}"));
        malla_dataplane::netns::create(&ns).unwrap();
        ns
    }
}

fn golden(name: &str, actual: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/cni")
        .join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing golden {}", path.display()));
    assert_eq!(text, want, "golden {name} differs");
}

#[test]
fn version_lists_every_supported_version() {
    let lab = Lab::new(&common::malla_bin(), "sv");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let out = p.raw(&[("CNI_COMMAND", "VERSION")], b"");
    assert!(out.ok);
    golden("version", &out.out);
}

#[test]
fn add_check_del_in_every_version() {
    let lab = Lab::new(&common::malla_bin(), "sa");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    for (i, v) in VERSIONS.iter().enumerate() {
        let netns = p.pod(&format!("v{i}"));
        let cid = format!("spec-add-{i}");
        let mut conf = p.conf(v);
        // Fixed address and MAC (the `ips` and `mac` capabilities) make the result golden;
        // an unknown capability is ignored.
        conf["runtimeConfig"] = json!({"ips": [format!("198.18.250.{}/32", 10 + i)], "mac": format!("02:00:00:00:00:{:02x}", 10 + i), "bogus": 1});
        let add = p.call("ADD", &cid, &netns, &conf);
        assert!(add.ok, "ADD {v}: {}", add.out);
        let mut normalized = add.out.clone();
        let text = normalized
            .to_string()
            .replace(&format!("/run/netns/{netns}"), "<sandbox>");
        normalized = serde_json::from_str(&text).unwrap();
        golden(&format!("add-{v}"), &normalized);
        let eth0 = ip(&["-n", &netns, "addr", "show", "eth0"]);
        assert!(
            eth0.contains(&format!("198.18.250.{}/32", 10 + i)),
            "{eth0}"
        );
        assert!(
            eth0.contains(&format!("02:00:00:00:00:{:02x}", 10 + i)),
            "{eth0}"
        );

        // ADD again on the same interface is an error, and leaves the first attachment alone.
        let again = p.call("ADD", &format!("{cid}-b"), &netns, &p.conf(v));
        assert!(!again.ok, "a second eth0 must be refused");
        assert!(
            again.out["msg"]
                .as_str()
                .unwrap()
                .contains("already exists"),
            "{}",
            again.out
        );

        if *v != "0.3.0" && *v != "0.3.1" {
            let mut check = p.conf(v);
            check["prevResult"] = add.out.clone();
            let ok = p.call("CHECK", &cid, &netns, &check);
            assert!(ok.ok, "CHECK {v}: {}", ok.out);
        }
        assert!(p.call("DEL", &cid, &netns, &p.conf(v)).ok);
        assert!(
            p.call("DEL", &cid, &netns, &p.conf(v)).ok,
            "DEL is idempotent"
        );
        assert!(p.call("DEL", &format!("{cid}-b"), &netns, &p.conf(v)).ok);
        malla_dataplane::netns::delete(&netns).unwrap();
        assert!(
            p.call("DEL", &cid, &netns, &p.conf(v)).ok,
            "DEL succeeds when the netns is gone"
        );
    }
    assert_eq!(lab.used_addresses(), 0);
}

#[test]
fn check_reports_what_is_wrong() {
    let lab = Lab::new(&common::malla_bin(), "sc");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let netns = p.pod("chk");
    let add = p.call("ADD", "spec-chk", &netns, &p.conf("1.1.0"));
    assert!(add.ok);
    let mut check = p.conf("1.1.0");
    check["prevResult"] = add.out.clone();
    assert!(p.call("CHECK", "spec-chk", &netns, &check).ok);
    let addr = add.out["ips"][0]["address"].as_str().unwrap().to_string();
    common::ip(&["-n", &netns, "addr", "del", &addr, "dev", "eth0"]);
    let bad = p.call("CHECK", "spec-chk", &netns, &check);
    assert_eq!(bad.code(), 100);
    let details = bad.out["details"].as_str().unwrap();
    assert!(details.contains("eth0 lacks address"), "{details}");
    let mut no_prev = p.conf("1.1.0");
    no_prev["prevResult"] = Value::Null;
    assert_eq!(p.call("CHECK", "spec-chk", &netns, &no_prev).code(), 7);
    assert!(p.call("DEL", "spec-chk", &netns, &p.conf("1.1.0")).ok);
}

#[test]
fn error_codes() {
    let lab = Lab::new(&common::malla_bin(), "se");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let netns = p.pod("err");
    // 1: incompatible version.
    assert_eq!(p.call("ADD", "e1", &netns, &p.conf("9.9.9")).code(), 1);
    // 4: invalid environment (missing variable, unknown command).
    let conf = p.conf("1.1.0").to_string();
    let missing = p.raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/x"),
        ],
        conf.as_bytes(),
    );
    assert_eq!(missing.code(), 4);
    assert!(missing.out["msg"]
        .as_str()
        .unwrap()
        .contains("CNI_CONTAINERID"));
    assert_eq!(p.raw(&[("CNI_COMMAND", "FROB")], conf.as_bytes()).code(), 4);
    // 6: the configuration is not JSON.
    let garbage = p.raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "e6"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/x"),
        ],
        b"{not json",
    );
    assert_eq!(garbage.code(), 6);
    // 7: invalid network configuration, naming the field (a missing nodeName defaults, as in
    // Calico: the agent's node-name file, else the host name).
    let mut bad = p.conf("1.1.0");
    bad["nodeName"] = json!("no/slashes");
    let out = p.call("ADD", "e7", &netns, &bad);
    assert_eq!(out.code(), 7);
    assert!(
        out.out["details"].as_str().unwrap().contains("nodeName"),
        "{}",
        out.out
    );
    let mut bad_ips = p.conf("1.1.0");
    bad_ips["runtimeConfig"] = json!({"ips": ["not-an-ip"]});
    assert_eq!(p.call("ADD", "e7b", &netns, &bad_ips).code(), 7);
    // 11: try again later (the node is not registered yet).
    let mut unknown = p.conf("1.1.0");
    unknown["nodeName"] = json!("node-that-never-started");
    let out = p.call("ADD", "e11", &netns, &unknown);
    assert_eq!(out.code(), 11);
    assert_eq!(out.out["cniVersion"], "1.1.0");
    // A version-0.4.0 caller gets its error in 0.4.0.
    let mut old = unknown.clone();
    old["cniVersion"] = json!("0.4.0");
    assert_eq!(
        p.call("ADD", "e11", &netns, &old).out["cniVersion"],
        "0.4.0"
    );
    // Nothing was reserved by any of these.
    assert_eq!(lab.used_addresses(), 0);
}

#[test]
fn status_follows_the_agent() {
    let lab = Lab::new(&common::malla_bin(), "st");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let conf = p.conf("1.1.0").to_string();
    let status = || {
        p.raw(
            &[("CNI_COMMAND", "STATUS"), ("CNI_PATH", "/x")],
            conf.as_bytes(),
        )
    };
    assert!(status().ok, "ready: {}", status().out);
    let pid = lab.state()["nodes"][0]["agent_pid"].as_u64().unwrap();
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(status().code(), 51, "agent down");
    lab.run(&["lab", "up", "--nodes", "1"]);
    assert!(status().ok, "ready again");
    // GC and STATUS exist only from 1.1.0.
    let old = p.conf("1.0.0").to_string();
    assert_eq!(
        p.raw(&[("CNI_COMMAND", "STATUS")], old.as_bytes()).code(),
        1
    );
}

#[test]
fn gc_releases_everything_not_valid() {
    let lab = Lab::new(&common::malla_bin(), "sg");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let conf = p.conf("1.1.0");
    let mut results = Vec::new();
    for name in ["keep", "drop1", "drop2"] {
        let netns = p.pod(name);
        let add = p.call("ADD", &format!("gc-{name}"), &netns, &conf);
        assert!(add.ok, "{}", add.out);
        results.push((name, netns, add.out));
    }
    // A crash mid-ADD: the plugin dies after reserving and wiring, before recording the pod.
    let netns = p.pod("crash");
    let crashed = {
        let netns_path = format!("/run/netns/{netns}");
        p.raw(
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "gc-crash"),
                ("CNI_NETNS", &netns_path),
                ("CNI_IFNAME", "eth0"),
                ("MALLA_CNI_FAULT", "after-wire"),
            ],
            conf.to_string().as_bytes(),
        )
    };
    assert!(!crashed.ok, "the fault was injected");
    assert_eq!(
        lab.used_addresses(),
        4,
        "the crashed ADD left its address behind"
    );
    let node_links = || ip(&["-n", &p.node_ns, "-o", "link", "show"]);
    assert_eq!(node_links().matches(": mla").count(), 4);

    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc-keep", "ifname": "eth0"}]);
    let out = p.raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")],
        gc.to_string().as_bytes(),
    );
    assert!(out.ok, "GC: {}", out.out);
    assert_eq!(
        lab.used_addresses(),
        1,
        "only the valid attachment keeps its address"
    );
    assert_eq!(
        node_links().matches(": mla").count(),
        1,
        "only the valid attachment keeps its veth"
    );
    let mut check = conf.clone();
    check["prevResult"] = results[0].2.clone();
    assert!(
        p.call("CHECK", "gc-keep", &results[0].1, &check).ok,
        "the valid one is intact"
    );
    assert!(p.call("DEL", "gc-keep", &results[0].1, &conf).ok);
    assert_eq!(lab.used_addresses(), 0);
}

/// A crash right after the allocation (no endpoint record, no handle record: the address is
/// in the node's own block): the runtime's DEL finds it through the node cache's blocks.
#[test]
fn del_after_a_crash_right_after_the_allocation_frees_the_address() {
    let lab = Lab::new(&common::malla_bin(), "sd");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let p = Plugin::new(&lab);
    let conf = p.conf("1.1.0");
    let first = p.pod("first");
    let add = p.call("ADD", "del-first", &first, &conf);
    assert!(add.ok, "{}", add.out);
    // The agent's node cache shows the node's block before the crash (the hinted path).
    let ready = conf["agentReadyFile"].as_str().expect("agentReadyFile");
    let cache = malla_ipam::node_cache::NodeCache::path_beside(std::path::Path::new(ready));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let blocks = malla_ipam::node_cache::NodeCache::open(&cache)
            .and_then(|c| c.state())
            .map(|s| s.blocks.len())
            .unwrap_or(0);
        if blocks > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never wrote its node cache"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let netns = p.pod("crash");
    let netns_path = format!("/run/netns/{netns}");
    let env = |command| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "del-crash"),
            ("CNI_NETNS", netns_path.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ]
    };
    let mut crash_env = env("ADD").to_vec();
    crash_env.push(("MALLA_CNI_FAULT", "after-ipam"));
    let crashed = p.raw(&crash_env, conf.to_string().as_bytes());
    assert!(!crashed.ok, "the fault was injected");
    assert_eq!(lab.used_addresses(), 2, "the crashed ADD holds an address");
    for _ in 0..2 {
        let del = p.raw(&env("DEL"), conf.to_string().as_bytes());
        assert!(del.ok, "DEL (idempotent): {}", del.out);
        assert_eq!(
            lab.used_addresses(),
            1,
            "DEL freed the crashed ADD's address"
        );
    }
    assert!(p.call("DEL", "del-first", &first, &conf).ok);
    assert_eq!(lab.used_addresses(), 0);
}
