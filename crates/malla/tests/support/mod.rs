//! Helpers for the container-runtime tests (`runtimes.rs`): a self-removing lab, bounded
//! commands, a busybox OCI image built locally, the node checks, and precise cleanup of the
//! processes, cgroups and mounts a runtime leaves behind.

#![allow(dead_code)]

use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn malla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_malla"))
}

pub fn require_root() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    assert!(root, "runtime tests need root; run the suite as root");
}

/// Panics naming the missing programs (scripts/deps installs them): a missing runtime is a
/// failed test, never a silent pass.
pub fn require_tools(tools: &[&str]) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
        .collect();
    assert!(
        missing.is_empty(),
        "missing programs {missing:?}: run scripts/deps (Debian packages containerd, runc, podman, busybox-static)"
    );
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A lab with a unique name, brought down on drop (a copy of `common::Lab`'s core).
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

    pub fn run(&self, args: &[&str]) -> String {
        let out = run(self.cmd().args(args), Duration::from_secs(120));
        assert!(out.ok, "malla {} failed: {}", args.join(" "), out.text());
        out.stdout
    }

    pub fn netns(&self, what: &str) -> String {
        format!("malla-{}-{what}", self.name)
    }

    pub fn dir(&self) -> PathBuf {
        self.state_root.path().join(&self.name)
    }

    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir().join("cni/bin")
    }

    pub fn conflist(&self, node: &str) -> PathBuf {
        self.dir()
            .join("nodes")
            .join(node)
            .join("net.d/10-malla.conflist")
    }

    /// Addresses in use, summed over every block (`malla ipam show -o json`).
    pub fn ipam_used(&self) -> u64 {
        let v: Value = serde_json::from_str(&self.run(&["ipam", "show", "-o", "json"]))
            .expect("ipam show json");
        v["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .map(|b| b["used"].as_u64().expect("used"))
            .sum()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = run(self.cmd().args(["lab", "down"]), Duration::from_secs(120));
    }
}

/// The lab's conflist for `node`, rewritten for a runtime: `name` and a `cniVersion` the
/// runtime's libcni knows (Debian 12's containerd and podman stop at 1.0.0), into `dir/file`.
pub fn write_runtime_conflist(lab: &Lab, node: &str, dir: &Path, file: &str, name: &str) {
    let mut conf: Value =
        serde_json::from_slice(&std::fs::read(lab.conflist(node)).expect("lab conflist"))
            .expect("conflist json");
    conf["cniVersion"] = "1.0.0".into();
    conf["name"] = name.into();
    std::fs::create_dir_all(dir).expect("conf dir");
    std::fs::write(
        dir.join(file),
        serde_json::to_vec_pretty(&conf).expect("json"),
    )
    .expect("write conflist");
}

/// What a bounded command did.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` with its output in anonymous files (a daemon it leaves behind cannot hold a
/// pipe open), killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("clone"))
        .stderr(err.try_clone().expect("clone"))
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return Out {
                ok: false,
                code: None,
                stdout: String::new(),
                stderr: format!("cannot start {cmd:?}: {e}"),
            }
        }
    };
    let status = wait_child(&mut child, timeout);
    let read = |f: &mut std::fs::File| {
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    };
    let mut stderr = read(&mut err);
    if status.is_none() {
        stderr.push_str(&format!("\n(killed after {timeout:?}: {cmd:?})"));
    }
    Out {
        ok: status.is_some_and(|s| s.success()),
        code: status.and_then(|s| s.code()),
        stdout: read(&mut out),
        stderr,
    }
}

/// Waits for `child` at most `timeout`; kills and reaps it when it is late (`None`).
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Writes `body` as an `sh` script and returns its path.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("set -eu\n{body}\n")).expect("write script");
    p
}

fn sha256_file(p: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(p), Duration::from_secs(30));
    assert!(out.ok, "sha256sum: {}", out.text());
    out.stdout
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string()
}

/// Stores `file` as a blob of the OCI layout at `oci`; returns (digest, size).
fn add_blob(oci: &Path, file: &Path) -> (String, u64) {
    let digest = sha256_file(file);
    let size = std::fs::metadata(file).expect("blob").len();
    std::fs::copy(file, oci.join("blobs/sha256").join(&digest)).expect("copy blob");
    (format!("sha256:{digest}"), size)
}

pub const IMAGE: &str = "localhost/malla-busybox:test";

/// An OCI image archive (`oci-archive` tar: oci-layout, index.json, blobs) of one layer holding
/// Debian's static busybox and the applets the tests run, named [`IMAGE`]; no registry.
pub fn busybox_oci_archive(dir: &Path) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox missing: install busybox-static (scripts/deps)"
    );
    let rootfs = dir.join("rootfs");
    for d in ["bin", "tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    for applet in [
        "sh", "sleep", "ip", "nc", "ping", "cat", "echo", "ls", "wget",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).expect("symlink");
    }
    let layer = dir.join("layer.tar");
    let tar = |args: &[&str]| {
        let out = run(Command::new("tar").args(args), Duration::from_secs(60));
        assert!(out.ok, "tar {args:?}: {}", out.text());
    };
    tar(&[
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "--sort=name",
        "--mtime=@0",
        "-C",
        rootfs.to_str().expect("utf8"),
        "-cf",
        layer.to_str().expect("utf8"),
        ".",
    ]);
    let oci = dir.join("oci");
    std::fs::create_dir_all(oci.join("blobs/sha256")).expect("oci dir");
    let (layer_digest, layer_size) = add_blob(&oci, &layer);
    let config = serde_json::json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_file = dir.join("config.json");
    std::fs::write(&config_file, serde_json::to_vec(&config).unwrap()).unwrap();
    let (config_digest, config_size) = add_blob(&oci, &config_file);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let manifest_file = dir.join("manifest.json");
    std::fs::write(&manifest_file, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (manifest_digest, manifest_size) = add_blob(&oci, &manifest_file);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": IMAGE,
                                       "io.containerd.image.name": IMAGE}}],
    });
    std::fs::write(oci.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(oci.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let archive = dir.join("image.tar");
    tar(&[
        "--numeric-owner",
        "--owner=0",
        "--group=0",
        "-C",
        oci.to_str().expect("utf8"),
        "-cf",
        archive.to_str().expect("utf8"),
        "oci-layout",
        "index.json",
        "blobs",
    ]);
    archive
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The IPv4 address on `eth0` in `ip -4 -o addr show dev eth0` output.
pub fn eth0_ipv4(ip_addr_output: &str) -> Option<Ipv4Addr> {
    let mut words = ip_addr_output.split_whitespace();
    words.find(|w| *w == "inet")?;
    words.next()?.split('/').next()?.parse().ok()
}

pub fn in_pod_pool(a: Ipv4Addr) -> bool {
    a.octets()[..2] == [198, 18]
}

/// `ip ARGS` stdout.
pub fn ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args), Duration::from_secs(30)).stdout
}

/// Whether `addr` appears in `text` as itself or as `addr/32`: not as a prefix of a longer
/// address, nor as the base of a wider prefix (the pool `198.18.0.0/16` is not the pod
/// `198.18.0.0`).
pub fn mentions(text: &str, addr: &str) -> bool {
    let host = format!("{addr}/32");
    text.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == '/'))
        .any(|w| w == addr || w == host)
}

/// While pods run: each address has its host route on a `mla*` veth in the node's namespace,
/// and nothing of Malla appeared in the machine's root namespace.
pub fn assert_wired_in_node(node_ns: &str, addrs: &[Ipv4Addr]) {
    let links = ip(&["-n", node_ns, "-o", "link", "show"]);
    assert_eq!(
        links.matches(": mla").count(),
        addrs.len(),
        "one host veth per container in {node_ns}: {links}"
    );
    let routes = ip(&["-n", node_ns, "-4", "route", "show"]);
    for a in addrs {
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&format!("{a} dev mla"))),
            "host route to {a} on a mla veth in {node_ns}: {routes}"
        );
    }
    let root_links = ip(&["-o", "link", "show"]);
    assert!(
        !root_links.contains(": mla"),
        "a Malla veth leaked into the root namespace: {root_links}"
    );
}

/// After both containers are gone: no address in use, no veth, no pod route, no nft rule
/// mentioning a pod address.
pub fn assert_node_clean(lab: &Lab, node_ns: &str, addrs: &[Ipv4Addr]) {
    assert_eq!(lab.ipam_used(), 0, "every address returned to IPAM");
    let links = ip(&["-n", node_ns, "-o", "link", "show"]);
    assert!(!links.contains(": mla"), "no veth left: {links}");
    let routes = ip(&["-n", node_ns, "route", "show", "table", "all"])
        + &ip(&["-n", node_ns, "-6", "route", "show", "table", "all"]);
    assert!(!routes.contains("dev mla"), "no pod route left: {routes}");
    let nft = run(
        Command::new("ip").args([
            "netns", "exec", node_ns, "nft", "list", "table", "inet", "malla",
        ]),
        Duration::from_secs(30),
    );
    assert!(nft.ok, "nft list table inet malla: {}", nft.text());
    for a in addrs {
        assert!(
            !mentions(&nft.stdout, &a.to_string()),
            "nft table still mentions {a}: {}",
            nft.stdout
        );
    }
}

/// The mount namespace of `pid` (`mnt:[inode]`).
pub fn mnt_ns(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SIGKILLs every process in mount namespace `ns` (a daemon and the shims/conmons it
/// started, which outlive it) and their direct children (the containers' init processes),
/// children first. `ns` identifies exactly what the test started: it is a namespace the
/// test created.
pub fn kill_mount_namespace(ns: &str) {
    let me = std::process::id();
    let members: Vec<u32> = all_pids()
        .into_iter()
        .filter(|&p| p != me && mnt_ns(p).as_deref() == Some(ns))
        .collect();
    if members.is_empty() {
        return;
    }
    let children: Vec<u32> = all_pids()
        .into_iter()
        .filter(|&p| !members.contains(&p) && ppid(p).is_some_and(|pp| members.contains(&pp)))
        .collect();
    for p in children.iter().chain(members.iter()) {
        let _ = run(
            Command::new("kill").args(["-KILL", &p.to_string()]),
            Duration::from_secs(5),
        );
    }
}

/// Removes the (empty) cgroups named `name` directly under the cgroup root of every hierarchy,
/// deepest first; the kernel refuses to remove a cgroup that still has processes.
pub fn remove_cgroups(name: &str) {
    assert!(name.starts_with("malla-rt-"), "only our own cgroups");
    let root = Path::new("/sys/fs/cgroup");
    let mut bases = vec![root.to_path_buf()];
    if let Ok(d) = std::fs::read_dir(root) {
        bases.extend(d.filter_map(|e| e.ok()).map(|e| e.path()));
    }
    for base in bases {
        let top = base.join(name);
        if top.is_dir() {
            rmdir_tree(&top);
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes a test's temp dir, unless something is still mounted under it in this mount
/// namespace (removing through a bind mount of the cgroup tree would be harmful): then it is
/// kept and named.
pub fn remove_temp_dir(dir: tempfile::TempDir) {
    let path = dir.path().to_string_lossy().into_owned();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| m == path || m.starts_with(&format!("{path}/")));
    if mounted {
        let kept = dir.keep();
        eprintln!(
            "kept {} (something is still mounted under it)",
            kept.display()
        );
    }
}
