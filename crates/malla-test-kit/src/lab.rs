//! A lab driven through the `malla` CLI, for tests: a unique name, a private state directory
//! (`MALLA_LAB_STATE_DIR`), and `malla lab down` on drop, also when the test panics. The lab
//! tests (`crates/malla/tests`) and the runtime harness ([`crate::runtimes`]) share it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Panics unless running as root (the lab creates network namespaces).
pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    assert!(
        root,
        "lab tests need root (network namespaces); run the suite as root"
    );
}

/// A lab with a unique name, run by `malla_bin`, brought down on drop.
pub struct Lab {
    pub name: String,
    pub malla_bin: PathBuf,
    pub state_root: tempfile::TempDir,
}

impl Lab {
    /// A new (not yet up) lab `t<pid>-<tag><n>`; panics unless root.
    pub fn new(malla_bin: &Path, tag: &str) -> Self {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("t{}-{tag}{n}", std::process::id() % 100000);
        let state_root = tempfile::Builder::new()
            .prefix("malla-lab-test")
            .tempdir()
            .expect("tempdir");
        Self {
            name,
            malla_bin: malla_bin.to_path_buf(),
            state_root,
        }
    }

    /// `malla` with this lab's name and state directory in its environment.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.malla_bin);
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

    /// `malla lab apply -f` of this manifest text.
    pub fn apply(&self, yaml: &str) -> String {
        let f = self.manifest_file("m", yaml);
        self.run(&["lab", "apply", "-f", f.to_str().expect("utf8")])
    }

    /// `malla lab delete -f` of this manifest text.
    pub fn apply_delete(&self, yaml: &str) -> String {
        let f = self.manifest_file("d", yaml);
        self.run(&["lab", "delete", "-f", f.to_str().expect("utf8")])
    }

    fn manifest_file(&self, prefix: &str, yaml: &str) -> PathBuf {
        let f = self.state_root.path().join(format!(
            "{prefix}{}.yaml",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::write(&f, yaml).expect("write manifest");
        f
    }

    /// `malla lab probe -o json EXTRA`: one object per probe.
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

    /// The lab's record (`lab.json`).
    pub fn state(&self) -> Value {
        let p = self.dir().join("lab.json");
        serde_json::from_slice(&std::fs::read(p).expect("lab.json")).expect("json")
    }

    /// The name of one of this lab's network namespaces (`malla-<lab>-<what>`).
    pub fn netns(&self, what: &str) -> String {
        format!("malla-{}-{what}", self.name)
    }

    /// The lab's state directory.
    pub fn dir(&self) -> PathBuf {
        self.state_root.path().join(&self.name)
    }

    /// Where the lab installs the CNI plugin.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir().join("cni/bin")
    }

    /// A node's conflist.
    pub fn conflist(&self, node: &str) -> PathBuf {
        self.dir()
            .join("nodes")
            .join(node)
            .join("net.d/10-malla.conflist")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.try_run(&["lab", "down"]);
    }
}
