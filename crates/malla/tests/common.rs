//! Shared helpers for the lab tests: a lab that tears itself down even when a test fails.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

pub fn malla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_malla"))
}

pub fn require_root() -> bool {
    if nix_is_root() {
        return true;
    }
    panic!("lab tests need root (network namespaces); run the suite as root");
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A lab with a unique name, brought down on drop.
pub struct Lab {
    pub name: String,
    pub state_root: tempfile::TempDir,
}

impl Lab {
    pub fn new(tag: &str) -> Self {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}-{tag}{n}", std::process::id() % 100000);
        let state_root = tempfile::Builder::new()
            .prefix("malla-lab-test")
            .tempdir()
            .expect("tempdir");
        Self { name, state_root }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(malla_bin());
        c.env("MALLA_LAB_STATE_DIR", self.state_root.path())
            .env("MALLA_LAB", &self.name);
        c
    }

    /// Runs `malla ARGS`, panicking with its output on failure.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.try_run(args);
        assert!(
            out.status.success(),
            "malla {} failed: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn try_run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running malla")
    }

    pub fn apply(&self, yaml: &str) -> String {
        let f = self
            .state_root
            .path()
            .join(format!("m{}.yaml", COUNTER.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&f, yaml).expect("write manifest");
        self.run(&["lab", "apply", "-f", f.to_str().expect("utf8")])
    }

    /// `malla lab delete -f` of this manifest text.
    pub fn apply_delete(&self, yaml: &str) -> String {
        let f = self
            .state_root
            .path()
            .join(format!("d{}.yaml", COUNTER.fetch_add(1, Ordering::SeqCst)));
        std::fs::write(&f, yaml).expect("write manifest");
        self.run(&["lab", "delete", "-f", f.to_str().expect("utf8")])
    }

    pub fn probe(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["lab", "probe", "-o", "json"];
        args.extend_from_slice(extra);
        let out = self.try_run(&args);
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|e| {
                panic!(
                    "probe output is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .as_array()
            .cloned()
            .expect("array")
    }

    /// Addresses in use over every IPAM block (`malla ipam show -o json`).
    pub fn used_addresses(&self) -> u64 {
        let v: Value =
            serde_json::from_str(&self.run(&["ipam", "show", "-o", "json"])).expect("json");
        v["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .map(|b| b["used"].as_u64().expect("used"))
            .sum()
    }

    pub fn state(&self) -> Value {
        let p = self.state_root.path().join(&self.name).join("lab.json");
        serde_json::from_slice(&std::fs::read(p).expect("lab.json")).expect("json")
    }

    pub fn netns(&self, what: &str) -> String {
        format!("malla-{}-{what}", self.name)
    }

    pub fn dir(&self) -> PathBuf {
        self.state_root.path().join(&self.name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.try_run(&["lab", "down"]);
    }
}

/// Runs `ip ARGS` and returns stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
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
