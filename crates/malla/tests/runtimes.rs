//! Real container runtimes calling the Malla CNI plugin on a lab node: containerd (through
//! `ctr --cni`) and podman (CNI network backend). Two busybox containers each get a Malla
//! address, one reaches the other, and removing them leaves no address, veth, route or nft
//! rule behind.
//!
//! Everything a runtime does happens inside the lab node's network namespace and in private
//! mount namespaces: the daemons, their state, sockets and `/run` live in a temp dir or a
//! private tmpfs, and the CNI directories a runtime reads are bind mounts visible only to it.
//! Nothing is written to the machine's `/etc/cni/net.d`, `/opt/cni/bin` or root namespace.

mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{
    assert_node_clean, assert_wired_in_node, busybox_oci_archive, eth0_ipv4, in_pod_pool,
    kill_mount_namespace, mnt_ns, remove_cgroups, remove_temp_dir, require_root, require_tools,
    run, script, wait_child, wait_for, write_runtime_conflist, Lab, Out, IMAGE,
};

const T: Duration = Duration::from_secs(60);
/// Container B's main process: a TCP server on 8080 that answers every connection.
const LISTENER: &str = "while :; do echo hello-from-b | nc -l -p 8080; done";

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

fn log_of(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Container A's address, B's address, and A reaching B over TCP (busybox `nc`) and ICMP.
fn check_two_containers(
    lab: &Lab,
    node_ns: &str,
    exec: &dyn Fn(&str, &[&str]) -> Out,
) -> [Ipv4Addr; 2] {
    let addr = |id: &str| {
        let out = exec(id, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(out.ok, "ip addr in {id}: {}", out.text());
        let a = eth0_ipv4(&out.stdout)
            .unwrap_or_else(|| panic!("no IPv4 address on eth0 of {id}: {}", out.stdout));
        assert!(in_pod_pool(a), "{id}: {a} is not from 198.18.0.0/16");
        a
    };
    let (a, b) = (addr("a"), addr("b"));
    assert_ne!(a, b, "two containers, two addresses");
    assert_eq!(lab.ipam_used(), 2, "IPAM holds exactly the two addresses");
    assert_wired_in_node(node_ns, &[a, b]);

    let b_s = b.to_string();
    let mut last = None;
    let reached = wait_for(Duration::from_secs(20), || {
        let out = exec("a", &["nc", "-w", "3", &b_s, "8080"]);
        let ok = out.stdout.contains("hello-from-b");
        last = Some(out);
        ok.then_some(())
    });
    assert!(
        reached.is_some(),
        "container a ({a}) does not reach b ({b}:8080): {}",
        last.map(|o| o.text()).unwrap_or_default()
    );
    let ping = exec("a", &["ping", "-c", "1", "-W", "3", &b_s]);
    assert!(ping.ok, "ping a -> b: {}", ping.text());
    [a, b]
}

// ---------------------------------------------------------------- containerd

/// A containerd of its own (config, root, state, socket in a temp dir; `/run` a private
/// tmpfs) running in the node's network namespace; containers started by `ctr run --cni` in
/// the foreground, so that ctr, the CNI caller, also runs the DEL when the task ends.
struct Containerd {
    tmp: Option<tempfile::TempDir>,
    daemon: Child,
    daemon_mnt: Option<String>,
    node_ns: String,
    cni_bin: PathBuf,
    cgroup: String,
    /// `ctr run` processes, by container id.
    running: Vec<(String, Child)>,
    ids: Vec<String>,
    execs: AtomicUsize,
}

impl Containerd {
    fn start(lab: &Lab, node_ns: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("malla-rt-ctd")
            .tempdir()
            .expect("tempdir");
        let d = tmp.path().to_path_buf();
        for sub in ["root", "state", "opt", "fifo", "cg", "net.d"] {
            std::fs::create_dir_all(d.join(sub)).expect("dir");
        }
        write_runtime_conflist(
            lab,
            "node-1",
            &d.join("net.d"),
            "10-malla.conflist",
            "malla",
        );
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
        // so /run is a private tmpfs (the node namespace is already entered by then).
        let start = script(
            &d,
            "containerd.sh",
            &format!(
                "mount --rbind /sys/fs/cgroup {cg}\n\
                 exec ip netns exec {node_ns} sh -c 'mount --rbind {cg} /sys/fs/cgroup && \
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
        let daemon = spawn_logged(
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                s(&start),
            ]),
            &d.join("containerd.log"),
        );
        let mut me = Self {
            tmp: Some(tmp),
            daemon,
            daemon_mnt: None,
            node_ns: node_ns.to_string(),
            cni_bin: lab.cni_bin_dir(),
            cgroup: format!("malla-rt-{}-ctd", std::process::id()),
            running: Vec::new(),
            ids: Vec::new(),
            execs: AtomicUsize::new(0),
        };
        let up = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(st)) = me.daemon.try_wait() {
                panic!(
                    "containerd exited ({st}): {}",
                    log_of(&me.dir().join("containerd.log"))
                );
            }
            me.ctr(&["version"]).ok.then_some(())
        });
        assert!(
            up.is_some(),
            "containerd did not answer within 30s: {}",
            log_of(&me.dir().join("containerd.log"))
        );
        me.daemon_mnt = mnt_ns(me.daemon.id());
        let netns = run(
            Command::new("ip").args(["netns", "identify", &me.daemon.id().to_string()]),
            T,
        );
        assert_eq!(
            netns.stdout.trim(),
            node_ns,
            "containerd runs in the node's namespace"
        );
        me
    }

    fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("tmp").path()
    }

    fn sock(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// `ctr ARGS` as a client (it calls no CNI plugin).
    fn ctr(&self, args: &[&str]) -> Out {
        run(Command::new("ctr").arg("-a").arg(self.sock()).args(args), T)
    }

    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr(&["tasks", "ls"]);
        out.stdout.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.first() == Some(&id)).then(|| w.get(2).unwrap_or(&"").to_string())
        })
    }

    /// `ctr run --cni --rm` in the node's namespace with the lab's conflist and plugin bind
    /// mounted on /etc/cni/net.d and /opt/cni/bin (ctr reads only those); returns once the
    /// task runs (ctr starts it only after the CNI ADD succeeded).
    fn run_container(&mut self, id: &str, argv: &[&str]) {
        let log = self.dir().join(format!("ctr-run-{id}.log"));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(self.dir().join("ctr-cni.sh"))
            .arg(self.dir().join("net.d"))
            .arg(&self.cni_bin)
            .arg(&self.node_ns)
            .arg("-a")
            .arg(self.sock())
            .args(["run", "--cni", "--rm", "--null-io", "--cgroup"])
            .arg(format!("/{}/{id}", self.cgroup))
            .args([IMAGE, id])
            .args(argv);
        self.ids.push(id.to_string());
        let child = spawn_logged(&mut cmd, &log);
        self.running.push((id.to_string(), child));
        let sock = self.sock();
        let child = &mut self.running.last_mut().expect("child").1;
        let started = wait_for(T, || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("ctr run {id} exited ({st}): {}", log_of(&log));
            }
            let out = run(
                Command::new("ctr")
                    .arg("-a")
                    .arg(&sock)
                    .args(["tasks", "ls"]),
                T,
            );
            out.stdout
                .lines()
                .any(|l| {
                    let w: Vec<&str> = l.split_whitespace().collect();
                    w.first() == Some(&id) && w.get(2) == Some(&"RUNNING")
                })
                .then_some(())
        });
        assert!(
            started.is_some(),
            "task {id} not running after {T:?}: {}",
            log_of(&log)
        );
    }

    fn exec(&self, id: &str, argv: &[&str]) -> Out {
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
    fn remove(&mut self, id: &str) {
        let kill = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
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
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", &id]);
            let _ = wait_child(&mut child, Duration::from_secs(30));
        }
        for id in std::mem::take(&mut self.ids) {
            let _ = self.ctr(&["tasks", "delete", "-f", &id]);
            let _ = self.ctr(&["containers", "delete", &id]);
        }
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

#[test]
fn containerd_ctr_cni_two_containers_on_malla() {
    require_root();
    require_tools(&[
        "containerd",
        "ctr",
        "runc",
        "unshare",
        "nft",
        "tar",
        "sha256sum",
    ]);
    let lab = Lab::new("ctd");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let node_ns = lab.netns("node-1");
    let mut ctd = Containerd::start(&lab, &node_ns);

    let image = busybox_oci_archive(&ctd.dir().join("image"));
    let import = ctd.ctr(&["images", "import", s(&image)]);
    assert!(import.ok, "ctr images import: {}", import.text());

    ctd.run_container("a", &["sleep", "300"]);
    ctd.run_container("b", &["sh", "-c", LISTENER]);
    let addrs = check_two_containers(&lab, &node_ns, &|id, argv| ctd.exec(id, argv));

    ctd.remove("a");
    ctd.remove("b");
    assert_node_clean(&lab, &node_ns, &addrs);
}

// ---------------------------------------------------------------- podman

/// Podman with its own containers.conf (CNI backend, the lab's plugin dir, a network config
/// dir holding the `malla` network), --root/--runroot in a temp dir. Every podman command
/// runs in one sandbox: the node's network namespace plus a private mount namespace where
/// /run and /dev/shm are tmpfs and /var/lib is an overlay (podman 4.3 writes its blob cache
/// to /var/lib/containers), so the netns files, locks and caches podman makes stay private.
struct Podman {
    tmp: Option<tempfile::TempDir>,
    sandbox: Child,
    sandbox_mnt: Option<String>,
    cgroup: String,
    names: Vec<String>,
}

impl Podman {
    fn start(lab: &Lab, node_ns: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("malla-rt-podman")
            .tempdir()
            .expect("tempdir");
        let d = tmp.path().to_path_buf();
        for sub in [
            "root",
            "runroot",
            "tmp",
            "imgtmp",
            "cg",
            "varlib/up",
            "varlib/work",
        ] {
            std::fs::create_dir_all(d.join(sub)).expect("dir");
        }
        write_runtime_conflist(lab, "node-1", &d.join("net.d"), "malla.conflist", "malla");
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
        let child = spawn_logged(
            Command::new("unshare").args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                s(&sandbox),
            ]),
            &d.join("sandbox.log"),
        );
        let mut me = Self {
            tmp: Some(tmp),
            sandbox: child,
            sandbox_mnt: None,
            cgroup: format!("malla-rt-{}-podman", std::process::id()),
            names: Vec::new(),
        };
        let up = wait_for(Duration::from_secs(20), || {
            if let Ok(Some(st)) = me.sandbox.try_wait() {
                panic!(
                    "podman sandbox exited ({st}): {}",
                    log_of(&d.join("sandbox.log"))
                );
            }
            ready.exists().then_some(())
        });
        assert!(
            up.is_some(),
            "podman sandbox not ready: {}",
            log_of(&d.join("sandbox.log"))
        );
        me.sandbox_mnt = mnt_ns(me.sandbox.id());
        let netns = run(
            Command::new("ip").args(["netns", "identify", &me.sandbox.id().to_string()]),
            T,
        );
        assert_eq!(
            netns.stdout.trim(),
            node_ns,
            "podman runs in the node's namespace"
        );
        me
    }

    fn dir(&self) -> &Path {
        self.tmp.as_ref().expect("tmp").path()
    }

    fn podman(&self, args: &[&str]) -> Out {
        let d = self.dir();
        run(
            Command::new("nsenter")
                .args([
                    "-t",
                    &self.sandbox.id().to_string(),
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

    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman(args);
        assert!(out.ok, "podman {}: {}", args.join(" "), out.text());
        out.stdout
    }

    /// `podman run -d` on the `malla` network. `--ulimit nproc`: podman raises RLIMIT_NPROC by
    /// default, which needs CAP_SYS_RESOURCE, and this machine's root lacks it.
    fn run_container(&mut self, name: &str, argv: &[&str]) {
        self.names.push(name.to_string());
        let parent = format!("/{}", self.cgroup);
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
        if let Some(ns) = &self.sandbox_mnt {
            kill_mount_namespace(ns);
        }
        let _ = self.sandbox.kill();
        let _ = self.sandbox.wait();
        remove_cgroups(&self.cgroup);
        if let Some(t) = self.tmp.take() {
            remove_temp_dir(t);
        }
    }
}

#[test]
fn podman_cni_two_containers_on_malla() {
    require_root();
    require_tools(&[
        "podman",
        "runc",
        "conmon",
        "nsenter",
        "unshare",
        "nft",
        "tar",
        "sha256sum",
    ]);
    let lab = Lab::new("pod");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let node_ns = lab.netns("node-1");
    let mut pm = Podman::start(&lab, &node_ns);

    let nets = pm.podman_ok(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(
        nets.lines().any(|l| l.trim() == "malla"),
        "podman's CNI backend does not list the malla network: {nets}"
    );
    let image = busybox_oci_archive(&pm.dir().join("image"));
    pm.podman_ok(&["load", "-i", s(&image)]);

    pm.run_container("a", &["sleep", "300"]);
    pm.run_container("b", &["sh", "-c", LISTENER]);
    let addrs = check_two_containers(&lab, &node_ns, &|name, argv| {
        let mut args = vec!["exec", name];
        args.extend_from_slice(argv);
        pm.podman(&args)
    });
    for (name, addr) in ["a", "b"].iter().zip(addrs) {
        let ip = pm.podman_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.malla.IPAddress}}",
            name,
        ]);
        assert_eq!(
            ip.trim(),
            addr.to_string(),
            "podman reports the CNI result's address"
        );
    }

    for name in ["a", "b"] {
        pm.podman_ok(&["stop", "-t", "0", name]);
        pm.podman_ok(&["rm", name]);
    }
    pm.names.clear();
    let left = pm.podman_ok(&["ps", "-a", "-q"]);
    assert!(left.trim().is_empty(), "no container left: {left}");
    assert_node_clean(&lab, &node_ns, &addrs);
}
