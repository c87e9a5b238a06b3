//! Fuzzing the plugin's inputs: the network configuration (stdin), the environment (every
//! `CNI_*` variable and unrelated ones, non-UTF-8 included) and the arguments (`CNI_ARGS`,
//! `runtimeConfig`, `prevResult`, valid attachments). The oracle, for every input:
//! - no panic, ever (VERSION included);
//! - a failure is a spec error (a known code, a message, JSON on stdout);
//! - a failed ADD leaves IPAM and the node's veths exactly as they were.
//!
//! cargo-fuzz needs a nightly toolchain; this harness runs on stable as a normal test:
//! - `kept_corpus_replays`: every file of `tests/fuzz-corpus/` (the kept corpus, replayed in
//!   CI), in-process and through the real binary;
//! - `generated_inputs`: a fixed-seed batch of structure-aware inputs (proptest strategies), or,
//!   with `MALLA_CNI_FUZZ_SECS=N` (`scripts/cni-fuzz N`), random batches for N seconds; an input
//!   that breaks the oracle is saved to the corpus directory as `found-*.json`.
//!
//! Everything runs in namespaces of our own (the node's, a pod's) against a private datastore:
//! the harness confines an input's paths to its temporary directory, its pod namespace to ours
//! and etcd endpoints to the node namespace's loopback before running it.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::TestNode;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Text, or raw bytes (for non-UTF-8 names and values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Raw(Vec<u8>),
}

impl Bytes {
    fn into_vec(self) -> Vec<u8> {
        match self {
            Bytes::Text(s) => s.into_bytes(),
            Bytes::Raw(b) => b,
        }
    }
}

/// One input. `@POD@`, `@STORE@` and `@DIR@` in any string stand for the harness's pod
/// namespace path, datastore file and temporary directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Case {
    env: Vec<(Bytes, Bytes)>,
    stdin: Bytes,
}

const CODES: [u64; 12] = [1, 2, 3, 4, 5, 6, 7, 11, 50, 51, 100, 999];

struct Harness {
    node: TestNode,
    pod_path: String,
    dir: PathBuf,
}

impl Harness {
    fn new() -> Harness {
        let node = TestNode::new("z");
        let pod_path = format!("/run/netns/{}", node.pod("p"));
        let dir = node.dir.path().to_path_buf();
        Harness {
            node,
            pod_path,
            dir,
        }
    }

    fn subst(&self, b: Vec<u8>) -> Vec<u8> {
        let Ok(s) = String::from_utf8(b.clone()) else {
            return b;
        };
        s.replace("@POD@", &self.pod_path)
            .replace("@STORE@", &self.node.store_path().display().to_string())
            .replace("@DIR@", &self.dir.display().to_string())
            .into_bytes()
    }

    fn inside(&self, p: &str) -> bool {
        Path::new(p).starts_with(&self.dir) && !p.contains("..")
    }

    /// The input as run: placeholders filled in, and nothing it names outside our sandbox.
    fn materialize(&self, case: &Case) -> (Vec<(OsString, OsString)>, Vec<u8>) {
        let env = case
            .env
            .iter()
            .map(|(k, v)| {
                let k = self.subst(k.clone().into_vec());
                let mut v = self.subst(v.clone().into_vec());
                if k == b"CNI_NETNS" {
                    let ok = std::str::from_utf8(&v)
                        .is_ok_and(|s| s == self.pod_path || s.is_empty() || self.inside(s));
                    if !ok {
                        v = self.dir.join("no-such-netns").into_os_string().into_vec();
                    }
                }
                (OsString::from_vec(k), OsString::from_vec(v))
            })
            .collect();
        let stdin = self.subst(case.stdin.clone().into_vec());
        (env, self.confine(stdin))
    }

    fn confine(&self, stdin: Vec<u8>) -> Vec<u8> {
        let Ok(mut v) = serde_json::from_slice::<Value>(&stdin) else {
            return stdin;
        };
        let Some(obj) = v.as_object_mut() else {
            return stdin;
        };
        let dir = self.dir.display().to_string();
        match obj.get_mut("datastore") {
            None => {
                obj.insert(
                    "datastore".into(),
                    json!({"type": "local", "path": format!("{dir}/default.db")}),
                );
            }
            Some(Value::Object(ds)) => match ds.get("type").and_then(Value::as_str) {
                Some("local") => {
                    let ok = ds
                        .get("path")
                        .and_then(Value::as_str)
                        .is_some_and(|p| self.inside(p));
                    if !ok && ds.contains_key("path") {
                        ds.insert("path".into(), json!(format!("{dir}/other.db")));
                    }
                }
                Some("etcd") if ds.contains_key("endpoints") => {
                    ds.insert("endpoints".into(), json!(["http://127.0.0.1:1"]));
                }
                Some("kubernetes") => {
                    ds.insert("kubeconfig".into(), json!(format!("{dir}/kubeconfig")));
                }
                _ => {}
            },
            Some(_) => {}
        }
        for field in ["agentReadyFile", "nodeNameFile"] {
            if let Some(Value::String(p)) = obj.get(field) {
                if !self.inside(p) {
                    obj.insert(field.into(), json!(format!("{dir}/{field}")));
                }
            }
        }
        serde_json::to_vec(&v).unwrap_or(stdin)
    }

    fn held(&self) -> BTreeSet<std::net::IpAddr> {
        self.node.held().into_iter().collect()
    }

    /// Runs one input in-process (on a thread inside the node namespace); Err says how it
    /// broke the oracle.
    fn check(&self, case: &Case) -> Result<(), String> {
        self.check_counted(case, &mut Default::default())
    }

    /// [`Harness::check`], counting outcomes (`ok`, `code N`) in `seen`.
    fn check_counted(
        &self,
        case: &Case,
        seen: &mut std::collections::BTreeMap<String, usize>,
    ) -> Result<(), String> {
        let (env, stdin) = self.materialize(case);
        let command = env
            .iter()
            .find(|(k, _)| k == "CNI_COMMAND")
            .map(|(_, v)| v.clone());
        let is_add = command.as_deref() == Some(std::ffi::OsStr::new("ADD"));
        let before = is_add.then(|| (self.held(), self.node.veths()));
        let outcome = std::panic::catch_unwind(|| malla_cni::run_os(env, &stdin)).map_err(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panicked: {msg}")
        })?;
        let label = match &outcome {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("code {}", e.code),
        };
        *seen.entry(label).or_default() += 1;
        match outcome {
            Ok(Some(out)) => {
                serde_json::from_str::<Value>(&out)
                    .map_err(|e| format!("a result that is not JSON ({e}): {out}"))?;
            }
            Ok(None) => {}
            Err(e) => {
                if !CODES.contains(&u64::from(e.code)) || e.msg.is_empty() {
                    return Err(format!("not a spec error: {e:?}"));
                }
                serde_json::from_str::<Value>(&e.to_json())
                    .map_err(|j| format!("error JSON does not parse ({j}): {e:?}"))?;
                if let Some((held, veths)) = before {
                    let (now_held, now_veths) = (self.held(), self.node.veths());
                    if now_held != held || now_veths != veths {
                        return Err(format!(
                            "a failed ADD ({e}) changed IPAM {held:?} -> {now_held:?} or veths {veths:?} -> {now_veths:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every attachment (GC with no valid attachment), so that inputs keep finding a
    /// free pod namespace.
    fn reset(&self) {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "malla", "type": "malla", "nodeName": common::NODE,
            "datastore": {"type": "local", "path": self.node.store_path()},
            "cni.dev/valid-attachments": [],
        });
        let env = vec![(OsString::from("CNI_COMMAND"), OsString::from("GC"))];
        let _ = malla_cni::run_os(env, conf.to_string().as_bytes());
        // Other networks' handles (the inputs' random names) too.
        let store = self.node.store();
        let _ = malla_ipam::Ipam::new(&store).release_unless(&|_| false);
    }

    /// Runs `f` with this harness on a thread inside the node namespace.
    fn in_node<T: Send>(&self, f: impl FnOnce(&Harness) -> T + Send) -> T {
        let ns = malla_dataplane::netns::NetNs::open_named(&self.node.node_ns).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                ns.enter_this_thread().unwrap();
                f(self)
            })
            .join()
            .unwrap()
        })
    }
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus")
}

fn corpus() -> Vec<(PathBuf, Case)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let case = serde_json::from_slice(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{}: not a corpus case: {e}", p.display()));
            (p, case)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Structure-aware strategies.

fn junk_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "",
            "1.1.0",
            "eth0",
            "198.19.200.9/32",
            "fd00::9",
            "02:00:00:00:00:01",
            "@POD@",
            "@STORE@"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A value from `good`, or junk.
fn one_of(good: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => prop::sample::select(good).prop_map(Value::from),
        1 => junk_json(),
    ]
}

fn datastore() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => Just(Some(json!({"type": "local", "path": "@STORE@"}))),
        1 => Just(None),
        1 => Just(Some(json!({"type": "local", "path": "@DIR@/fresh.db"}))),
        1 => Just(Some(json!({"type": "local", "path": "@DIR@/no/such/dir/x.db"}))),
        1 => Just(Some(json!({"type": "etcd", "endpoints": ["http://127.0.0.1:1"], "prefix": "/f"}))),
        1 => Just(Some(json!({"type": "etcd", "endpoints": []}))),
        1 => Just(Some(json!({"type": "kubernetes", "kubeconfig": "@DIR@/kubeconfig"}))),
        1 => junk_json().prop_map(Some),
    ]
}

fn runtime_config() -> impl Strategy<Value = Option<Value>> {
    let ips = prop_oneof![
        prop::collection::vec(
            one_of(&[
                "198.19.200.20/32",
                "198.19.200.21",
                "fd00::5/128",
                "10.0.0.1",
                "198.19.201.1",
                "x",
                "198.19.200.20/99"
            ]),
            0..3
        )
        .prop_map(Value::from),
        junk_json(),
    ];
    let mac = one_of(&[
        "02:00:00:00:00:09",
        "ff:ff:ff:ff:ff:ff",
        "01:00:5e:00:00:01",
        "zz",
        "02-00-00-00-00-0a",
        "",
    ]);
    prop_oneof![
        3 => Just(None),
        1 => (proptest::option::of(ips), proptest::option::of(mac), proptest::option::of(junk_json()))
            .prop_map(|(ips, mac, other)| {
                let mut m = serde_json::Map::new();
                if let Some(v) = ips { m.insert("ips".into(), v); }
                if let Some(v) = mac { m.insert("mac".into(), v); }
                if let Some(v) = other { m.insert("portMappings".into(), v); }
                Some(Value::Object(m))
            }),
        1 => junk_json().prop_map(Some),
    ]
}

fn conf() -> impl Strategy<Value = Value> {
    let version = one_of(&["1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0", "9.9.9", ""]);
    let name = one_of(&["malla", "k8s-pod-network", "a.b", "%", ""]);
    let kind = one_of(&["malla"]);
    let node = prop_oneof![
        4 => Just(Some(Value::from(common::NODE))),
        1 => Just(None),
        1 => one_of(&["a/b", "", "other-node", " x"]).prop_map(Some),
    ];
    let ipam = proptest::option::of(prop_oneof![
        (
            proptest::option::of(any::<bool>()),
            proptest::option::of(any::<bool>())
        )
            .prop_map(|(a, b)| json!({"ipv4": a, "ipv6": b})),
        junk_json(),
    ]);
    let mtu = proptest::option::of(prop_oneof![
        Just(json!(1400)),
        Just(json!(0)),
        Just(json!(68)),
        Just(json!(70000)),
        Just(json!(-1)),
        junk_json(),
    ]);
    let prev = proptest::option::of(prop_oneof![
        Just(json!({"cniVersion": "1.1.0", "ips": [{"address": "198.19.200.2/32"}]})),
        junk_json(),
    ]);
    let valid = proptest::option::of(prop_oneof![
        Just(json!([{"containerID": "c1", "ifname": "eth0"}])),
        Just(json!([])),
        junk_json(),
    ]);
    let extra = proptest::option::of((".{1,10}", junk_json()));
    let files = (
        proptest::option::of(one_of(&["@DIR@/agent.ready", "@DIR@/none.ready"])),
        proptest::option::of(one_of(&["@DIR@/nodename", "/nonexistent"])),
    );
    (
        (version, name, kind, node, datastore()),
        (ipam, mtu, prev, valid, runtime_config()),
        (extra, files),
    )
        .prop_map(
            |(
                (version, name, kind, node, ds),
                (ipam, mtu, prev, valid, rc),
                (extra, (ready, nnf)),
            )| {
                let mut m = serde_json::Map::new();
                m.insert("cniVersion".into(), version);
                m.insert("name".into(), name);
                m.insert("type".into(), kind);
                let fields = [
                    ("nodeName", node),
                    ("datastore", ds),
                    ("ipam", ipam),
                    ("mtu", mtu),
                    ("prevResult", prev),
                    ("cni.dev/valid-attachments", valid),
                    ("runtimeConfig", rc),
                    ("agentReadyFile", ready),
                    ("nodeNameFile", nnf),
                ];
                for (k, v) in fields {
                    if let Some(v) = v {
                        m.insert(k.into(), v);
                    }
                }
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                Value::Object(m)
            },
        )
}

/// Bytes that are sometimes not UTF-8.
fn text(good: &'static [&'static str]) -> impl Strategy<Value = Bytes> {
    prop_oneof![
        24 => prop::sample::select(good).prop_map(|s| Bytes::Text(s.to_string())),
        1 => ".{0,20}".prop_map(Bytes::Text),
        1 => prop::collection::vec(any::<u8>(), 0..20).prop_map(Bytes::Raw),
        1 => prop::sample::select(good).prop_map(|s| {
            let mut b = s.as_bytes().to_vec();
            b.push(0xff);
            Bytes::Raw(b)
        }),
    ]
}

fn env() -> impl Strategy<Value = Vec<(Bytes, Bytes)>> {
    let var = |name: &'static str, good: &'static [&'static str]| {
        proptest::option::weighted(0.97, text(good))
            .prop_map(move |v| v.map(|v| (Bytes::Text(name.into()), v)))
    };
    let args = prop_oneof![
        3 => Just("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".to_string()),
        1 => "[A-Za-z_=;]{0,30}",
        1 => ".{0,30}",
    ]
    .prop_map(Bytes::Text);
    (
        var(
            "CNI_COMMAND",
            &[
                "ADD", "ADD", "ADD", "DEL", "DEL", "CHECK", "GC", "STATUS", "VERSION", "add", "",
            ],
        ),
        var(
            "CNI_CONTAINERID",
            &["c1", "c2", "c3", "a.b", "a", "x%2Ey", "-", "", "ctr/../x"],
        ),
        var(
            "CNI_IFNAME",
            &[
                "eth0",
                "eth0",
                "eth0",
                "eth1",
                "b.c",
                "",
                ".",
                "..",
                "a/b",
                "eth 0",
                "abcdefghijklmnop",
                "é",
            ],
        ),
        var(
            "CNI_NETNS",
            &["@POD@", "@POD@", "@POD@", "/nonexistent", "", "@DIR@"],
        ),
        proptest::option::weighted(0.7, args)
            .prop_map(|v| v.map(|v| (Bytes::Text("CNI_ARGS".into()), v))),
        var("CNI_PATH", &["/opt/cni/bin", ""]),
        proptest::option::of((text(&["JUNK", "CNI_X", "HOME"]), text(&["x", ""]))),
    )
        .prop_map(|(a, b, c, d, e, f, g)| [a, b, c, d, e, f, g].into_iter().flatten().collect())
}

fn case() -> impl Strategy<Value = Case> {
    let stdin = prop_oneof![
        8 => conf().prop_map(|c| Bytes::Text(c.to_string())),
        1 => ".{0,40}".prop_map(Bytes::Text),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Bytes::Raw),
    ];
    (env(), stdin).prop_map(|(env, stdin)| Case { env, stdin })
}

/// Runs generated inputs until `budget` runs out (or `max` inputs); returns (inputs run,
/// failures), saving each failure to the corpus directory.
fn fuzz(
    h: &Harness,
    runner: &mut TestRunner,
    budget: Duration,
    max: usize,
) -> (usize, Vec<String>) {
    let strategy = case();
    let start = Instant::now();
    let (mut n, mut failures) = (0, Vec::new());
    let mut seen = std::collections::BTreeMap::new();
    while n < max && start.elapsed() < budget {
        let Ok(tree) = strategy.new_tree(runner) else {
            continue;
        };
        let c = tree.current();
        if let Err(why) = h.check_counted(&c, &mut seen) {
            let path = corpus_dir().join(format!("found-{}-{n}.json", std::process::id()));
            let _ = std::fs::write(&path, serde_json::to_vec_pretty(&c).unwrap_or_default());
            failures.push(format!("{why} (saved as {})", path.display()));
        }
        n += 1;
        if n % 64 == 0 {
            h.reset();
        }
    }
    eprintln!(
        "cni fuzz: {n} inputs in {:.1} s, outcomes {seen:?}",
        start.elapsed().as_secs_f64()
    );
    (n, failures)
}

#[test]
fn kept_corpus_replays() {
    let h = Harness::new();
    let cases = corpus();
    assert!(cases.len() >= 10, "the kept corpus is there");
    // In-process, with the full oracle.
    let failures: Vec<String> = h.in_node(|h| {
        cases
            .iter()
            .filter_map(|(p, c)| h.check(c).err().map(|e| format!("{}: {e}", p.display())))
            .collect()
    });
    assert!(failures.is_empty(), "{failures:#?}");
    h.in_node(|h| h.reset());
    // Through the real binary, as a runtime runs it: no panic, spec errors only.
    for (p, c) in &cases {
        let (env, stdin) = h.materialize(c);
        let o = h.node.raw_os(&env, &stdin);
        common::assert_no_panic(&o, &p.display().to_string());
    }
    h.in_node(|h| h.reset());
    assert!(h.node.held().is_empty());
}

#[test]
fn generated_inputs() {
    let secs: Option<u64> = std::env::var("MALLA_CNI_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    let h = Harness::new();
    let (n, failures) = h.in_node(|h| match secs {
        // The long run: a fresh seed, for the time given.
        Some(secs) => {
            let mut runner = TestRunner::new(Config::default());
            fuzz(h, &mut runner, Duration::from_secs(secs), usize::MAX)
        }
        // CI: a fixed seed, a fixed number of inputs.
        None => {
            let mut runner = TestRunner::new_with_rng(
                Config::default(),
                TestRng::deterministic_rng(RngAlgorithm::ChaCha),
            );
            fuzz(h, &mut runner, Duration::from_secs(600), 300)
        }
    });
    eprintln!("cni fuzz: {n} inputs, {} failures", failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
    h.in_node(|h| h.reset());
}
