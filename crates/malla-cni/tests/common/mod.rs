//! A node for the plugin's own tests, without an agent: a network namespace standing for the
//! node (the plugin runs in it, as a runtime runs it on the host), a private local datastore
//! with the node registered and one pool, and pod namespaces. Everything has a unique name
//! prefix and is deleted by exact name on drop, also when the test panics.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use malla_api::{keys, IpPool, Node};
use malla_store::LocalStore;
use serde_json::{json, Value};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub const NODE: &str = "node-r";
pub const POOL: &str = "198.19.200.0/24";

pub struct TestNode {
    pub prefix: String,
    pub node_ns: String,
    pub dir: tempfile::TempDir,
    pods: std::sync::Mutex<Vec<String>>,
}

/// What one invocation printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    /// None: killed by a signal.
    pub exit: Option<i32>,
    pub out: Value,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> u64 {
        assert!(!self.ok, "expected an error, got success: {}", self.out);
        self.out["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {:?}", self))
    }
}

/// Panics unless root (the tests create network namespaces).
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the plugin's tests need root (network namespaces)"
    );
}

pub fn plugin_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_malla-cni"))
}

impl TestNode {
    pub fn new(tag: &str) -> TestNode {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("mcni{}{tag}{n}", std::process::id() % 100000);
        let node_ns = format!("{prefix}-node");
        malla_dataplane::netns::create(&node_ns).expect("create the node namespace");
        let node = TestNode {
            prefix,
            node_ns,
            dir: tempfile::tempdir().expect("tempdir"),
            pods: Default::default(),
        };
        let store = node.store();
        malla_store::put_json(
            &store,
            &keys::node(NODE),
            &Node {
                name: NODE.into(),
                underlay_ipv4: None,
                underlay_ipv6: None,
                underlay_mtu: 1500,
                vtep_mac: String::new(),
            },
        )
        .unwrap();
        malla_ipam::Ipam::new(&store)
            .ensure_pool(&IpPool {
                name: "test".into(),
                cidr: POOL.parse().unwrap(),
                block_size: 28,
                nat_outgoing: false,
                disabled: false,
            })
            .unwrap();
        node
    }

    pub fn store_path(&self) -> PathBuf {
        self.dir.path().join("store.db")
    }

    pub fn store(&self) -> LocalStore {
        LocalStore::open(&self.store_path()).unwrap()
    }

    /// The plugin configuration of this node.
    pub fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.1.0",
            "name": "malla",
            "type": "malla",
            "nodeName": NODE,
            "datastore": {"type": "local", "path": self.store_path()},
        })
    }

    /// A new pod namespace, deleted with the node.
    pub fn pod(&self, name: &str) -> String {
        let ns = format!("{}-{name}", self.prefix);
        malla_dataplane::netns::create(&ns).unwrap();
        self.pods.lock().unwrap().push(ns.clone());
        ns
    }

    /// Runs the plugin in the node namespace with exactly these variables and stdin.
    pub fn raw_os(&self, env: &[(OsString, OsString)], stdin: &[u8]) -> Outcome {
        let mut cmd = self.command();
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(cmd, stdin)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.node_ns])
            .arg(plugin_bin())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    pub fn raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        let env: Vec<(OsString, OsString)> = env
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        self.raw_os(&env, stdin)
    }

    /// `command` for attachment (`cid`, `ifname`) in pod namespace `netns`.
    pub fn call(
        &self,
        command: &str,
        cid: &str,
        ifname: &str,
        netns: &str,
        conf: &Value,
    ) -> Outcome {
        let path = format!("/run/netns/{netns}");
        self.raw(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &path),
                ("CNI_IFNAME", ifname),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=t;K8S_POD_NAME=p",
                ),
                ("CNI_PATH", "/nonexistent"),
            ],
            conf.to_string().as_bytes(),
        )
    }

    /// Every address IPAM holds.
    pub fn held(&self) -> Vec<std::net::IpAddr> {
        let store = self.store();
        let mut out: Vec<_> = malla_ipam::Ipam::new(&store)
            .handles()
            .unwrap()
            .into_iter()
            .flat_map(|h| h.addrs)
            .collect();
        out.sort();
        out
    }

    /// Host-side pod veths in the node namespace.
    pub fn veths(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.node_ns, "-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("mla"))
            .collect()
    }

    /// Runs `f` on a thread inside the node namespace.
    pub fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = malla_dataplane::netns::NetNs::open_named(&self.node_ns).unwrap();
        std::thread::spawn(move || {
            ns.enter_this_thread().unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

pub fn run(mut cmd: Command, stdin: &[u8]) -> Outcome {
    let mut child = cmd.spawn().unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout.clone()))
    };
    Outcome {
        ok: out.status.success(),
        exit: out.status.code(),
        out: value,
        stdout,
        stderr,
    }
}

/// The plugin never panics: a panic exits 101 and prints `panicked` on stderr.
pub fn assert_no_panic(o: &Outcome, what: &str) {
    assert!(
        o.exit != Some(101) && !o.stderr.contains("panicked"),
        "{what}: the plugin panicked: {o:?}"
    );
    if !o.ok && o.exit.is_some() {
        assert!(
            o.out.is_object() && o.out["msg"].is_string() && o.out["code"].is_u64(),
            "{what}: a failure prints spec error JSON: {o:?}"
        );
    }
}

pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

impl Drop for TestNode {
    fn drop(&mut self) {
        for ns in self.pods.lock().unwrap().drain(..) {
            let _ = malla_dataplane::netns::delete(&ns);
        }
        let _ = malla_dataplane::netns::delete(&self.node_ns);
    }
}
