//! Real container runtimes on a Malla (or any CNI) network namespace, for the runtime tests
//! (`crates/malla/tests/runtimes.rs`) and the `ctr-start` benchmark, on a lab node
//! ([`crate::lab::Lab`]): bounded commands, a busybox OCI image built locally (no registry), a
//! containerd driven by `ctr run --cni` and a podman with the CNI backend, the node checks, and
//! precise cleanup of the processes, cgroups and mounts a runtime leaves behind.
//!
//! Everything a runtime does happens inside a given network namespace and in private mount
//! namespaces: the daemons, their state, sockets and `/run` live in a temp dir or a private
//! tmpfs, and the CNI directories a runtime reads are bind mounts visible only to it. Nothing is
//! written to the machine's `/etc/cni/net.d`, `/opt/cni/bin` or root namespace.
//!
//! This is test harness code: a failed step panics with the command's output (the guards'
//! `Drop` still removes what was made).

use std::io::{Read, Seek, SeekFrom};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::lab::Lab;

/// How long one runtime command (a `ctr`/`podman` call, a start) may take.
pub const T: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().expect("clone"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// The text of a log file ("" when unreadable).
pub fn log_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
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

/// The conflist at `path` (a lab node's), rewritten for a runtime: `name` and a `cniVersion`
/// the runtime's libcni knows (Debian 12's containerd and podman stop at 1.0.0).
pub fn runtime_conflist(path: &Path, name: &str) -> Value {
    let mut conf: Value =
        serde_json::from_slice(&std::fs::read(path).expect("lab conflist")).expect("conflist json");
    conf["cniVersion"] = "1.0.0".into();
    conf["name"] = name.into();
    conf
}

/// Writes `conf` as `dir/file`.
pub fn write_conflist(conf: &Value, dir: &Path, file: &str) {
    std::fs::create_dir_all(dir).expect("conf dir");
    std::fs::write(
        dir.join(file),
        serde_json::to_vec_pretty(conf).expect("json"),
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
    let config = serde_json::json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"});
    malla_lab::oci::write_archive(dir, &rootfs, IMAGE, config, &dir.join("image.tar"))
        .expect("the busybox image archive")
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
    assert_eq!(lab.used_addresses(), 0, "every address returned to IPAM");
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
            malla_lab::kubelet::rmdir_tree(&top);
        }
    }
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

// ---------------------------------------------------------------- sandboxes

/// What the containerd and podman drivers share: a temp dir `malla-rt-<tag>*` of their own, a
/// daemon (containerd, or podman's sandbox shell) started from a script there by
/// `unshare --mount --propagation private`, and a cgroup `malla-rt-<pid>-<tag>`. On drop,
/// every process of the daemon's mount namespace, the daemon, the cgroups and the temp dir go.
struct Sandbox {
    tmp: Option<tempfile::TempDir>,
    daemon: Child,
    daemon_mnt: Option<String>,
    log: PathBuf,
    cgroup: String,
}

impl Sandbox {
    /// The temp dir for `tag`, with `subs` made in it.
    fn temp_dir(tag: &str, subs: &[&str]) -> tempfile::TempDir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("malla-rt-{tag}"))
            .tempdir()
            .expect("tempdir");
        for sub in subs {
            std::fs::create_dir_all(tmp.path().join(sub)).expect("dir");
        }
        tmp
    }

    /// Runs `sh script` in a private mount namespace, its output in `log` (in `tmp`).
    fn spawn(tmp: tempfile::TempDir, tag: &str, script: &Path, log: &str) -> Self {
        let log = tmp.path().join(log);
        let daemon = spawn_logged(
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                s(script),
            ]),
            &log,
        );
        Self {
            tmp: Some(tmp),
            daemon,
            daemon_mnt: None,
            log,
            cgroup: format!("malla-rt-{}-{tag}", std::process::id()),
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("tmp").path()
    }

    /// Polls `ready` for `timeout`; panics as `<name> exited` when the daemon exits first and
    /// with `late` when it is not ready in time (both with the daemon's log).
    fn wait_ready(
        &mut self,
        timeout: Duration,
        name: &str,
        late: &str,
        ready: impl Fn(&Self) -> bool,
    ) {
        let up = wait_for(timeout, || {
            if let Ok(Some(st)) = self.daemon.try_wait() {
                panic!("{name} exited ({st}): {}", log_of(&self.log));
            }
            ready(self).then_some(())
        });
        assert!(up.is_some(), "{late}: {}", log_of(&self.log));
    }

    /// Records the daemon's mount namespace (for the cleanup) and checks that it runs in
    /// network namespace `netns` (`what` says so).
    fn settle(&mut self, netns: &str, what: &str) {
        self.daemon_mnt = mnt_ns(self.daemon.id());
        let ns = run(
            Command::new("ip").args(["netns", "identify", &self.daemon.id().to_string()]),
            T,
        );
        assert_eq!(ns.stdout.trim(), netns, "{what}");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(ns) = &self.daemon_mnt {
            kill_mount_namespace(ns);
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        remove_cgroups(&self.cgroup);
        if let Some(t) = self.tmp.take() {
            remove_temp_dir(t);
        }
    }
}

// ---------------------------------------------------------------- containerd

/// `ctr -a SOCK ARGS` as a client (it calls no CNI plugin).
fn ctr_at(sock: &Path, args: &[&str]) -> Out {
    run(Command::new("ctr").arg("-a").arg(sock).args(args), T)
}

/// The STATUS column of `ctr tasks ls` for `id`, through `sock`.
fn task_status_at(sock: &Path, id: &str) -> Option<String> {
    let out = ctr_at(sock, &["tasks", "ls"]);
    out.stdout.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.first() == Some(&id)).then(|| w.get(2).unwrap_or(&"").to_string())
    })
}

/// A containerd of its own (config, root, state, socket in a temp dir; `/run` a private
/// tmpfs) running in network namespace `netns`; containers started by `ctr run --cni` in the
/// foreground, so that ctr, the CNI caller, also runs the DEL when the task ends. The CNI
/// configuration ctr reads (`/etc/cni/net.d`, `/opt/cni/bin`, the only places it looks) is a
/// bind mount, visible only to that ctr, of this containerd's `net.d` and of `cni_bin`.
pub struct Containerd {
    sandbox: Sandbox,
    netns: String,
    cni_bin: PathBuf,
    /// `ctr run` processes, by container id.
    running: Vec<(String, Child)>,
    ids: Vec<String>,
    execs: AtomicUsize,
}

impl Containerd {
    /// A containerd for the conflist of `node` of a CLI lab, in `node_ns` (the runtime tests).
    pub fn for_lab(lab: &Lab, node: &str, node_ns: &str) -> Self {
        let conf = runtime_conflist(&lab.conflist(node), "malla");
        Self::start(node_ns, &conf, &lab.cni_bin_dir(), "ctd")
    }

    /// Starts containerd in `netns` with `conflist` as the only CNI network ctr sees and
    /// `cni_bin` as its plugin directory. `tag` names the cgroup (`malla-rt-<pid>-<tag>`),
    /// unique per containerd of a process.
    pub fn start(netns: &str, conflist: &Value, cni_bin: &Path, tag: &str) -> Self {
        let tmp = Sandbox::temp_dir(tag, &["root", "state", "opt", "fifo", "cg", "net.d"]);
        let d = tmp.path().to_path_buf();
        write_conflist(conflist, &d.join("net.d"), "10-net.conflist");
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
                root = s(&d.join("root")),
                state = s(&d.join("state")),
                sock = s(&d.join("containerd.sock")),
                opt = s(&d.join("opt")),
            ),
        )
        .expect("config");
        // `ip netns exec` remounts /sys, which hides the cgroup tree runc needs: carry it
        // over through a bind mount made before. The shim sockets go to /run/containerd/s,
        // so /run is a private tmpfs (the namespace is already entered by then).
        let start = script(
            &d,
            "containerd.sh",
            &format!(
                "mount --rbind /sys/fs/cgroup {cg}\n\
                 exec ip netns exec {netns} sh -c 'mount --rbind {cg} /sys/fs/cgroup && \
                 mount -t tmpfs -o mode=0755 malla-run /run && exec containerd --config {config}'",
                cg = s(&d.join("cg")),
                config = s(&config),
            ),
        );
        script(
            &d,
            "ctr-cni.sh",
            "netd=$1; bin=$2; ns=$3; shift 3\n\
             [ -d /etc/cni/net.d ] || mkdir -p /etc/cni/net.d\n\
             mount --bind \"$netd\" /etc/cni/net.d\n\
             if [ -d /opt/cni/bin ]; then mount --bind \"$bin\" /opt/cni/bin\n\
             else mount -t tmpfs -o mode=0755 malla-opt /opt && mkdir -p /opt/cni/bin && \
             mount --bind \"$bin\" /opt/cni/bin; fi\n\
             exec ip netns exec \"$ns\" ctr \"$@\"",
        );
        let mut me = Self {
            sandbox: Sandbox::spawn(tmp, tag, &start, "containerd.log"),
            netns: netns.to_string(),
            cni_bin: cni_bin.to_path_buf(),
            running: Vec::new(),
            ids: Vec::new(),
            execs: AtomicUsize::new(0),
        };
        me.sandbox.wait_ready(
            Duration::from_secs(30),
            "containerd",
            "containerd did not answer within 30s",
            |sb| ctr_at(&sb.dir().join("containerd.sock"), &["version"]).ok,
        );
        me.sandbox
            .settle(netns, "containerd runs in the namespace it was given");
        me
    }

    /// This containerd's temp dir (config, state, socket, logs).
    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    pub fn sock(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// `ctr ARGS` as a client (it calls no CNI plugin).
    pub fn ctr(&self, args: &[&str]) -> Out {
        ctr_at(&self.sock(), args)
    }

    /// Builds the busybox image ([`IMAGE`]) and imports it.
    pub fn import_busybox(&self) {
        let image = busybox_oci_archive(&self.dir().join("image"));
        let import = self.ctr(&["images", "import", s(&image)]);
        assert!(import.ok, "ctr images import: {}", import.text());
    }

    /// The STATUS column of `ctr tasks ls` for `id`.
    pub fn task_status(&self, id: &str) -> Option<String> {
        task_status_at(&self.sock(), id)
    }

    /// `ctr run [--cni] --rm --cgroup /<cgroup>/<id> IMAGE ID ARGV...` in a private mount
    /// namespace (with the CNI bind mounts) entering this containerd's network namespace.
    /// `extra` goes before the image (`--null-io`, ...). Not started.
    pub fn run_command(&self, id: &str, cni: bool, extra: &[&str], argv: &[&str]) -> Command {
        self.run_image_command(id, cni, extra, IMAGE, argv)
    }

    /// [`Self::run_command`] of another imported image.
    pub fn run_image_command(
        &self,
        id: &str,
        cni: bool,
        extra: &[&str],
        image: &str,
        argv: &[&str],
    ) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(self.dir().join("ctr-cni.sh"))
            .arg(self.dir().join("net.d"))
            .arg(&self.cni_bin)
            .arg(&self.netns)
            .arg("-a")
            .arg(self.sock())
            .arg("run");
        if cni {
            cmd.arg("--cni");
        }
        cmd.args(["--rm", "--cgroup"])
            .arg(format!("/{}/{id}", self.sandbox.cgroup))
            .args(extra)
            .args([image, id])
            .args(argv);
        cmd
    }

    /// Spawns `cmd` (from [`Self::run_command`]) as container `id`'s `ctr run`: the container
    /// and its `ctr run` are removed on drop from then on.
    pub fn spawn(&mut self, id: &str, cmd: &mut Command) -> std::io::Result<&mut Child> {
        self.ids.push(id.to_string());
        let child = cmd.spawn()?;
        self.running.push((id.to_string(), child));
        Ok(&mut self.running.last_mut().expect("child").1)
    }

    /// Container `id`'s `ctr run` process.
    pub fn child(&mut self, id: &str) -> Option<&mut Child> {
        self.running
            .iter_mut()
            .find(|(i, _)| i == id)
            .map(|(_, c)| c)
    }

    /// Drops container `id` from the cleanup lists once its `ctr run` has been reaped.
    pub fn forget(&mut self, id: &str) {
        self.running.retain(|(i, _)| i != id);
        self.ids.retain(|i| i != id);
    }

    /// `ctr task kill -s SIGKILL ID`.
    pub fn kill_task(&self, id: &str) -> Out {
        self.ctr(&["tasks", "kill", "-s", "SIGKILL", id])
    }

    /// `ctr run --cni --rm --null-io` of `argv` as container `id`; returns once the task runs
    /// (ctr starts it only after the CNI ADD succeeded).
    pub fn run_container(&mut self, id: &str, argv: &[&str]) {
        let log = self.dir().join(format!("ctr-run-{id}.log"));
        let mut cmd = self.run_command(id, true, &["--null-io"], argv);
        let f = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("clone"))
            .stderr(f);
        let sock = self.sock();
        let child = self
            .spawn(id, &mut cmd)
            .unwrap_or_else(|e| panic!("cannot start ctr run {id}: {e}"));
        let started = wait_for(T, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("ctr run {id} exited ({st}): {}", log_of(&log));
            }
            (task_status_at(&sock, id).as_deref() == Some("RUNNING")).then_some(())
        });
        assert!(
            started.is_some(),
            "task {id} not running after {T:?}: {}",
            log_of(&log)
        );
    }

    /// `ctr task exec` of `argv` in container `id`.
    pub fn exec(&self, id: &str, argv: &[&str]) -> Out {
        let n = self.execs.fetch_add(1, Ordering::SeqCst);
        let fifo = self.dir().join("fifo");
        let exec_id = format!("e{n}");
        let mut args = vec![
            "tasks",
            "exec",
            "--fifo-dir",
            s(&fifo),
            "--exec-id",
            &exec_id,
            id,
        ];
        args.extend_from_slice(argv);
        self.ctr(&args)
    }

    /// `ctr task kill` + waiting for `ctr run` to finish (it runs the CNI DEL and removes
    /// task and container), then `ctr task delete` / `ctr container delete`, which must find
    /// nothing left.
    pub fn remove(&mut self, id: &str) {
        let kill = self.kill_task(id);
        assert!(kill.ok, "ctr task kill {id}: {}", kill.text());
        let pos = self
            .running
            .iter()
            .position(|(i, _)| i == id)
            .expect("running");
        let (_, mut child) = self.running.remove(pos);
        let log = self.dir().join(format!("ctr-run-{id}.log"));
        let st = wait_child(&mut child, T);
        assert!(
            st.is_some_and(|s| s.code() == Some(137)),
            "ctr run {id} should end with the task's SIGKILL status (137), got {st:?}: {}",
            log_of(&log)
        );
        for args in [["tasks", "delete", id], ["containers", "delete", id]] {
            let out = self.ctr(&args);
            assert!(
                out.ok || out.stderr.contains("not found"),
                "ctr {}: {}",
                args.join(" "),
                out.text()
            );
        }
        assert_eq!(self.task_status(id), None, "task {id} is gone");
        let containers = self.ctr(&["containers", "ls", "-q"]);
        assert!(
            !containers.stdout.lines().any(|l| l.trim() == id),
            "container {id} is gone: {}",
            containers.stdout
        );
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for (id, mut child) in std::mem::take(&mut self.running) {
            let _ = self.kill_task(&id);
            let _ = wait_child(&mut child, Duration::from_secs(30));
        }
        for id in std::mem::take(&mut self.ids) {
            let _ = self.ctr(&["tasks", "delete", "-f", &id]);
            let _ = self.ctr(&["containers", "delete", &id]);
        }
        // Then `sandbox` drops: the daemon, its mount namespace, cgroups and temp dir.
    }
}

// ---------------------------------------------------------------- podman

/// Podman with its own containers.conf (CNI backend, the lab's plugin dir, a network config
/// dir holding the `malla` network), --root/--runroot in a temp dir. Every podman command
/// runs in one sandbox: the node's network namespace plus a private mount namespace where
/// /run and /dev/shm are tmpfs and /var/lib is an overlay (podman 4.3 writes its blob cache
/// to /var/lib/containers), so the netns files, locks and caches podman makes stay private.
pub struct Podman {
    sandbox: Sandbox,
    names: Vec<String>,
}

impl Podman {
    /// Starts the sandbox in `node_ns` with the `malla` network made of `node`'s conflist.
    pub fn start(lab: &Lab, node: &str, node_ns: &str) -> Self {
        let tmp = Sandbox::temp_dir(
            "podman",
            &[
                "root",
                "runroot",
                "tmp",
                "imgtmp",
                "cg",
                "varlib/up",
                "varlib/work",
            ],
        );
        let d = tmp.path().to_path_buf();
        write_conflist(
            &runtime_conflist(&lab.conflist(node), "malla"),
            &d.join("net.d"),
            "malla.conflist",
        );
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\nruntime = \"runc\"\n\
                 tmp_dir = \"{d}/tmp\"\nimage_copy_tmp_dir = \"{d}/imgtmp\"\n\
                 static_dir = \"{d}/root/libpod\"\nvolume_path = \"{d}/root/volumes\"\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{bin}\"]\n\
                 network_config_dir = \"{d}/net.d\"\ndefault_network = \"malla\"\n",
                d = s(&d),
                bin = s(&lab.cni_bin_dir()),
            ),
        )
        .expect("containers.conf");
        let ready = d.join("sandbox.ready");
        let sandbox = script(
            &d,
            "sandbox.sh",
            &format!(
                "mount --rbind /sys/fs/cgroup {cg}\n\
                 mount -t overlay malla-varlib -o lowerdir=/var/lib,upperdir={d}/varlib/up,workdir={d}/varlib/work /var/lib\n\
                 exec ip netns exec {node_ns} sh -c 'mount --rbind {cg} /sys/fs/cgroup && \
                 mount -t tmpfs -o mode=0755 malla-run /run && \
                 mount -t tmpfs -o mode=1777 malla-shm /dev/shm && touch {ready} && exec sleep 3600'",
                cg = s(&d.join("cg")),
                d = s(&d),
                ready = s(&ready),
            ),
        );
        let mut me = Self {
            sandbox: Sandbox::spawn(tmp, "podman", &sandbox, "sandbox.log"),
            names: Vec::new(),
        };
        me.sandbox.wait_ready(
            Duration::from_secs(20),
            "podman sandbox",
            "podman sandbox not ready",
            |_| ready.exists(),
        );
        me.sandbox
            .settle(node_ns, "podman runs in the node's namespace");
        me
    }

    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    /// `podman ARGS` in the sandbox.
    pub fn podman(&self, args: &[&str]) -> Out {
        let d = self.dir();
        run(
            Command::new("nsenter")
                .args([
                    "-t",
                    &self.sandbox.daemon.id().to_string(),
                    "--mount",
                    "--net",
                    "--",
                ])
                .arg("env")
                .arg(format!("CONTAINERS_CONF={}", s(&d.join("containers.conf"))))
                .arg("podman")
                .arg("--root")
                .arg(d.join("root"))
                .arg("--runroot")
                .arg(d.join("runroot"))
                .args(args),
            T,
        )
    }

    /// `podman ARGS`, which must succeed; its stdout.
    pub fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.ok, "podman {}: {}", args.join(" "), out.text());
        out.stdout
    }

    /// Stops tracking `name` for removal on drop (the caller removed it).
    pub fn forget(&mut self, name: &str) {
        self.names.retain(|n| n != name);
    }

    /// `podman run -d` on the `malla` network. `--ulimit nproc`: podman raises RLIMIT_NPROC by
    /// default, which needs CAP_SYS_RESOURCE, and this machine's root lacks it.
    pub fn run_container(&mut self, name: &str, argv: &[&str]) {
        self.names.push(name.to_string());
        let parent = format!("/{}", self.sandbox.cgroup);
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
            &parent,
            "--network",
            "malla",
            IMAGE,
        ];
        args.extend_from_slice(argv);
        self.podman_ok(&args);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for n in std::mem::take(&mut self.names) {
            let _ = self.podman(&["rm", "-f", "-t", "0", &n]);
        }
        // Then `sandbox` drops: the sandbox, its mount namespace, cgroups and temp dir.
    }
}
