//! Real nodes for `malla lab up --kubelet`: on every lab node a containerd (CRI) and a kubelet
//! v1.20 (from `scripts/k8s-control-plane`'s cache), registered with the lab's control plane
//! ([`crate::control_plane`] with [`crate::control_plane::Options::kubelets`]). Malla itself
//! is then installed the way a user installs it, `kubectl apply -f deploy/`.
//!
//! Each node's runtime runs in the node's network namespace and in a **mount namespace of its
//! own** (`unshare --mount --propagation private`, then `/` made rshared inside it, so that
//! the kubelet's volume mounts and `Bidirectional` host paths work without reaching the
//! machine). There, and only there:
//!
//! ```text
//! /run                  a tmpfs (containerd's state and shim sockets, /run/netns of the pods)
//! /run/malla            NODE/run-malla   (the agent's ready file, the plugin's lock)
//! /etc/cni/net.d        NODE/net.d       (where install-cni writes the conflist; on a machine
//!                                        without /etc/cni/net.d, /etc is an overlay whose
//!                                        upper layer is the node's, so nothing is created)
//! /opt                  NODE/opt         (install-cni copies the plugin to /opt/cni/bin, where
//!                                        Debian's `loopback`, `bridge`, `host-local` and
//!                                        `portmap` are linked as a node's OS package has them)
//! /var/log              NODE/log         (pod and container logs)
//! /proc/sys/{kernel/panic, kernel/panic_on_oops, vm/overcommit_memory, vm/panic_on_oom,
//!            kernel/keys/root_maxkeys, kernel/keys/root_maxbytes}
//!                       files NODE/k8s/sysctl/* holding the values the kubelet wants
//! ```
//!
//! The last line is a safety rule: the kubelet sets those sysctls at start-up, and they are
//! machine-wide (not per network namespace). Over the bind mounts its reads see the values it
//! wants and its writes land in the files; the machine's values never change
//! (`crates/malla/tests/kubelet.rs` checks them after the lab went up and down).
//!
//! Cgroups: everything of a node lives under `/malla-lab-LAB/NODE` in every hierarchy: the
//! runtime (the node script, containerd, kubelet, the shims) in `runtime/`, the pods under the
//! kubelet's `--cgroup-root` `pods/`. `lab down` kills every process in the lab's cgroup
//! subtree and removes it; nothing outside it is touched.
//!
//! Certificates as kubeadm makes them, from the control plane's CA: a client certificate for
//! `system:node:NODE` in group `system:nodes` (the Node authorizer and NodeRestriction apply),
//! a serving certificate for the node's address; the kubelet accepts no anonymous requests
//! and asks the API server about every other one (webhook authentication and authorization).
//! No kube-proxy: Malla's agent serves Services. ([`KubeProxy`] runs a real kube-proxy v1.20 in
//! a plain lab node's namespace instead, for `kube-proxy-bench`'s comparison.)
//!
//! Images come from no registry: the pause image is built here (a static `pause`, see
//! `pause.c`) and imported, with the archives given to `lab up --image`, into every node's
//! containerd (namespace `k8s.io`) before its kubelet starts.

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::control_plane::{self, Access, Binaries};
use crate::state::{LabPaths, NodeState};

/// The sandbox image every node has (built here, never pulled).
pub const PAUSE_IMAGE: &str = "localhost/malla-pause:1.0";
/// The kubelet's port on the node's address.
pub const KUBELET_PORT: u16 = 10250;
/// How long `lab up --kubelet` waits for the nodes to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(120);

/// The machine-wide sysctls the kubelet sets when it starts (v1.20
/// `pkg/kubelet/cm/container_manager_linux.go`, `setupKernelTunables`) and the values it
/// wants: each is presented to it through a bind-mounted file holding that value.
pub const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where Debian's `containernetworking-plugins` puts the reference CNI plugins.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";
/// The reference plugins every node's `/opt/cni/bin` links to.
pub const REFERENCE_PLUGINS: [&str; 4] = ["loopback", "bridge", "host-local", "portmap"];

/// The lab's cgroup, directly under the root of every hierarchy.
pub fn lab_cgroup(paths: &LabPaths) -> String {
    format!("malla-lab-{}", paths.name)
}

/// Where one node's runtime keeps its files.
#[derive(Debug, Clone)]
pub struct NodeFiles {
    /// The lab's node directory (`LAB/nodes/NODE`).
    pub dir: PathBuf,
}

impl NodeFiles {
    pub fn new(paths: &LabPaths, node: &str) -> Self {
        Self {
            dir: paths.node_dir(node),
        }
    }
    /// Runtime files: configs, scripts, state.
    pub fn k8s(&self, name: &str) -> PathBuf {
        self.dir.join("k8s").join(name)
    }
    pub fn containerd_sock(&self) -> PathBuf {
        self.k8s("containerd.sock")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.k8s("kubelet")
    }
    /// Appears once the images are imported: the node script then starts the kubelet.
    fn go_file(&self) -> PathBuf {
        self.k8s("images.imported")
    }
    /// The node's `/run/malla`.
    pub fn run_malla(&self) -> PathBuf {
        self.dir.join("run-malla")
    }
    /// The node's `/opt` (the plugin in `cni/bin`).
    pub fn opt(&self) -> PathBuf {
        self.dir.join("opt")
    }
    /// The node's `/var/log`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("log")
    }
    /// The node's `/etc/cni/net.d` (the lab's usual conflist directory).
    pub fn net_d(&self) -> PathBuf {
        self.dir.join("net.d")
    }
}

fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Creates `rel` (a path under the lab's cgroup) in every cgroup hierarchy, copying the
/// cpuset of each new cgroup from its parent (a v1 cpuset cgroup starts empty).
fn ensure_cgroup(rel: &Path) -> anyhow::Result<()> {
    for h in hierarchies() {
        let mut dir = h.clone();
        for part in rel.components() {
            let parent = dir.clone();
            dir = dir.join(part);
            if dir.is_dir() {
                continue;
            }
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(parent.join(f)) {
                    std::fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("writing {}", dir.join(f).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// The mounted cgroup hierarchies (directories under /sys/fs/cgroup holding `cgroup.procs`).
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.procs").exists() {
        return vec![root.to_path_buf()];
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Every pid in the cgroup subtree `dir`.
fn pids_under(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                pids_under(&e.path(), out);
            }
        }
    }
}

/// Removes the directory tree of cgroups `dir`, deepest first (the kernel refuses a cgroup
/// that still holds processes; that one and its ancestors stay).
pub fn rmdir_tree(dir: &Path) {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.filter_map(|e| e.ok()) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Builds (once per lab) the pause image archive: a static `pause` from `pause.c` with
/// `musl-gcc` (Debian's musl-tools), as an OCI archive named [`PAUSE_IMAGE`].
pub fn pause_image(paths: &LabPaths) -> anyhow::Result<PathBuf> {
    let dir = paths.dir.join("images");
    let archive = dir.join("pause.tar");
    if archive.exists() {
        return Ok(archive);
    }
    let build = dir.join("pause-build");
    let rootfs = build.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let src = build.join("pause.c");
    write(&src, include_str!("pause.c"))?;
    let out = Command::new("musl-gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&src)
        .output()
        .context("running musl-gcc (Debian package musl-tools) for the pause image")?;
    if !out.status.success() {
        bail!(
            "musl-gcc pause.c: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let config = json!({"Entrypoint": ["/pause"], "WorkingDir": "/"});
    crate::oci::write_archive(&build, &rootfs, PAUSE_IMAGE, config, &archive)?;
    let _ = std::fs::remove_dir_all(&build);
    Ok(archive)
}

/// The node's kubelet client and serving certificates (in the control plane's `pki/`, signed
/// by its CA): `kubelet-NODE-client` (CN `system:node:NODE`, O `system:nodes`) and
/// `kubelet-NODE-server` (the node's name and address).
fn node_pki(cp_pki: &Path, node: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
    control_plane::issue_cert(
        cp_pki,
        &format!("kubelet-{node}-client"),
        &format!("/O=system:nodes/CN=system:node:{node}"),
        "extendedKeyUsage=clientAuth\n",
    )?;
    control_plane::issue_cert(
        cp_pki,
        &format!("kubelet-{node}-server"),
        &format!("/CN={node}"),
        &format!("subjectAltName=DNS:{node},IP:{ip}\nextendedKeyUsage=serverAuth\n"),
    )
}

/// Writes a node's certificates, kubeconfig, kubelet and containerd configurations, sysctl
/// files and its script.
fn prepare_node(
    paths: &LabPaths,
    cp_dir: &Path,
    server: &str,
    node: &NodeState,
    bins: &Binaries,
) -> anyhow::Result<PathBuf> {
    let f = NodeFiles::new(paths, &node.name);
    for d in [
        f.k8s("sysctl"),
        f.kubelet_root(),
        f.k8s("containerd"),
        f.run_malla(),
        f.opt(),
        f.log(),
        f.net_d(),
    ] {
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::set_permissions(f.dir.join("k8s"), std::fs::Permissions::from_mode(0o700))?;
    // The reference plugins a node's OS package puts in /opt/cni/bin (Debian's in
    // /usr/lib/cni): containerd's CRI sets up every pod's `lo` with `loopback`; `bridge` and
    // `host-local` are the benchmark's baseline.
    let cni_bin = f.opt().join("cni/bin");
    std::fs::create_dir_all(&cni_bin)?;
    for plugin in REFERENCE_PLUGINS {
        let from = Path::new(REFERENCE_PLUGIN_DIR).join(plugin);
        let to = cni_bin.join(plugin);
        if !from.exists() {
            bail!(
                "{} is missing: install Debian's containernetworking-plugins (scripts/deps)",
                from.display()
            );
        }
        if std::fs::symlink_metadata(&to).is_err() {
            std::os::unix::fs::symlink(&from, &to)
                .with_context(|| format!("linking {}", to.display()))?;
        }
    }
    let pki = cp_dir.join("pki");
    node_pki(&pki, &node.name, node.underlay_ipv4)?;
    let ca = pki.join("ca.crt");
    let cert = |kind: &str, ext: &str| pki.join(format!("kubelet-{}-{kind}.{ext}", node.name));
    write(
        &f.k8s("kubelet.kubeconfig"),
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: malla\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: malla\n  context:\n    cluster: malla\n    user: {user}\ncurrent-context: malla\n",
            ca = ca.display(),
            user = format!("system:node:{}", node.name),
            crt = cert("client", "crt").display(),
            key = cert("client", "key").display(),
        ),
    )?;
    let cg = format!("/{}/{}", lab_cgroup(paths), node.name);
    // Eviction: the machine's disk is shared and may be full of other work: no disk or inode
    // threshold (0% disables one); memory keeps a small floor. No image GC (100%).
    write(
        &f.k8s("kubelet.yaml"),
        &format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: {tls_crt}
tlsPrivateKeyFile: {tls_key}
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
cgroupDriver: cgroupfs
cgroupRoot: {cg}/pods
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: false
hairpinMode: none
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
evictionHard:
  memory.available: 100Mi
  nodefs.available: \"0%\"
  nodefs.inodesFree: \"0%\"
  imagefs.available: \"0%\"
  imagefs.inodesFree: \"0%\"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
rotateCertificates: false
serverTLSBootstrap: false
containerLogMaxSize: 10Mi
containerLogMaxFiles: 2
runtimeRequestTimeout: 2m
",
            ip = node.underlay_ipv4,
            tls_crt = cert("server", "crt").display(),
            tls_key = cert("server", "key").display(),
            ca = ca.display(),
        ),
    )?;
    let sock = f.containerd_sock();
    // No registry: CRI finds the sandbox image imported; the pods' cgroups are the kubelet's
    // (cgroupfs, under the node's cgroup); containers may not lower their OOM score below
    // containerd's own (this machine's root lacks CAP_SYS_RESOURCE).
    write(
        &f.k8s("containerd.toml"),
        &format!(
            "version = 2
root = {root:?}
state = \"/run/containerd\"
[grpc]
  address = {sock:?}
[ttrpc]
  address = \"{sock}.ttrpc\"
[debug]
  address = \"\"
[plugins.\"io.containerd.internal.v1.opt\"]
  path = {opt:?}
[plugins.\"io.containerd.grpc.v1.cri\"]
  sandbox_image = \"{PAUSE_IMAGE}\"
  restrict_oom_score_adj = true
  disable_hugetlb_controller = true
  enable_selinux = false
  [plugins.\"io.containerd.grpc.v1.cri\".containerd]
    snapshotter = \"overlayfs\"
    default_runtime_name = \"runc\"
    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]
      runtime_type = \"io.containerd.runc.v2\"
  [plugins.\"io.containerd.grpc.v1.cri\".cni]
    bin_dir = \"/opt/cni/bin\"
    conf_dir = \"/etc/cni/net.d\"
    max_conf_num = 1
",
            root = f.k8s("containerd/root").display().to_string(),
            sock = sock.display().to_string(),
            opt = f.k8s("containerd/opt").display().to_string(),
        ),
    )?;
    let mut sysctl_mounts = String::new();
    for (key, value) in KUBELET_SYSCTLS {
        let file = f.k8s(&format!("sysctl/{}", key.replace('/', ".")));
        write(&file, &format!("{value}\n"))?;
        sysctl_mounts.push_str(&format!("mount --bind {} /proc/sys/{key}\n", q(&file)));
    }
    // The lab directory, when under /run, is hidden by the node's /run: held open (fd 9) and
    // bind-mounted back at its place.
    let lab_dir = &paths.dir;
    let (keep_open, put_back) = if lab_dir.starts_with("/run") {
        (
            format!("exec 9<{}\n", q(lab_dir)),
            format!(
                "mkdir -p {d}\nmount --no-canonicalize --bind /proc/self/fd/9 {d}\nexec 9<&-\n",
                d = q(lab_dir)
            ),
        )
    } else {
        (String::new(), String::new())
    };
    let script = f.k8s("node.sh");
    write(
        &script,
        &format!(
            "# The runtime of lab node {node}: run by `unshare --mount --propagation private` in the\n\
             # node's network namespace (malla_lab::kubelet).\n\
             set -eu\n\
             {keep_open}\
             for p in /sys/fs/cgroup/*/{cgrel}/runtime/cgroup.procs; do echo $$ >\"$p\"; done\n\
             mount --make-rshared /\n\
             mount -t tmpfs -o mode=0755 malla-node-run /run\n\
             {put_back}\
             mkdir -p /run/netns /run/malla /run/containerd\n\
             mount --bind {run_malla} /run/malla\n\
             if [ -d /etc/cni/net.d ]; then mount --bind {net_d} /etc/cni/net.d\n\
             else mkdir -p {etc}/up {etc}/work && mount -t overlay -o lowerdir=/etc,upperdir={etc}/up,workdir={etc}/work malla-node-etc /etc && \
             mkdir -p /etc/cni/net.d && mount --bind {net_d} /etc/cni/net.d; fi\n\
             mount --bind {opt} /opt\n\
             mount --bind {log} /var/log\n\
             {sysctl_mounts}\
             containerd --config {ctd_conf} >>{ctd_log} 2>&1 &\n\
             while [ ! -e {go} ]; do sleep 0.2; done\n\
             exec {kubelet} --config={kubelet_conf} --kubeconfig={kubeconfig} \\\n  \
             --container-runtime=remote --container-runtime-endpoint=unix://{sock} \\\n  \
             --root-dir={root_dir} --cert-dir={cert_dir} --hostname-override={node} \\\n  \
             --node-ip={ip} --pod-infra-container-image={PAUSE_IMAGE} --v=2\n",
            node = node.name,
            cgrel = cg.trim_start_matches('/'),
            run_malla = q(&f.run_malla()),
            net_d = q(&f.net_d()),
            etc = q(&f.k8s("etc")),
            opt = q(&f.opt()),
            log = q(&f.log()),
            ctd_conf = q(&f.k8s("containerd.toml")),
            ctd_log = q(&paths.log(&format!("containerd-{}", node.name))),
            go = q(&f.go_file()),
            kubelet = q(&bins.kubelet),
            kubelet_conf = q(&f.k8s("kubelet.yaml")),
            kubeconfig = q(&f.k8s("kubelet.kubeconfig")),
            sock = sock.display(),
            root_dir = q(&f.kubelet_root()),
            cert_dir = q(&f.k8s("pki")),
            ip = node.underlay_ipv4,
        ),
    )?;
    ensure_cgroup(&PathBuf::from(&cg[1..]).join("runtime"))?;
    ensure_cgroup(&PathBuf::from(&cg[1..]).join("pods"))?;
    Ok(script)
}

/// `ctr -a SOCK -n k8s.io ARGS`: its stdout.
pub fn ctr(sock: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ctr")
        .arg("-a")
        .arg(sock)
        .args(["-n", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ctr (Debian package containerd)")?;
    if !out.status.success() {
        bail!(
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts the runtime (containerd, then the kubelet once `images` and the pause image are
/// imported) of every node whose pid in `nodes` is not running; records the pids there.
/// Then waits until every node is registered with the API server.
pub fn start_nodes(
    paths: &LabPaths,
    cp_dir: &Path,
    access: &Access,
    nodes: &mut [NodeState],
    images: &[PathBuf],
) -> anyhow::Result<()> {
    let bins = Binaries::find()?;
    bins.require_kubelet()?;
    let mut archives = vec![pause_image(paths)?];
    for i in images {
        let abs = std::fs::canonicalize(i)
            .with_context(|| format!("--image {}: no such file", i.display()))?;
        archives.push(abs);
    }
    let mut started = Vec::new();
    for node in nodes.iter_mut() {
        if node.runtime_pid.is_some_and(crate::process::is_ours) {
            continue;
        }
        let script = prepare_node(paths, cp_dir, &access.server, node, &bins)?;
        let f = NodeFiles::new(paths, &node.name);
        let _ = std::fs::remove_file(f.go_file());
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh"])
            .arg(&script);
        let pid = crate::process::spawn_detached(
            cmd,
            &node.netns,
            &paths.log(&format!("kubelet-{}", node.name)),
        )?;
        node.runtime_pid = Some(pid);
        started.push(node.name.clone());
    }
    // Images, then the kubelets go.
    for name in &started {
        let f = NodeFiles::new(paths, name);
        let sock = f.containerd_sock();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ctr(&sock, &["version"]).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "containerd of {name} did not answer within 30 s (see {} and {})",
                    paths.log(&format!("containerd-{name}")).display(),
                    paths.log(&format!("kubelet-{name}")).display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for a in &archives {
            ctr(&sock, &["images", "import", &a.display().to_string()])
                .with_context(|| format!("importing {} into {name}'s containerd", a.display()))?;
        }
        write(&f.go_file(), "")?;
    }
    wait_registered(access, nodes, REGISTER_TIMEOUT)
}

/// Waits until every node has a `Node` object (the kubelet registered it).
pub fn wait_registered(
    access: &Access,
    nodes: &[NodeState],
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let listed = access
            .kubectl_run(&["get", "nodes", "-o", "name"], None)
            .unwrap_or_default();
        let missing: Vec<&str> = nodes
            .iter()
            .map(|n| n.name.as_str())
            .filter(|n| !listed.lines().any(|l| l.trim() == format!("node/{n}")))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nodes not registered after {timeout:?}: {} (see the kubelet-* logs in the lab's logs/)",
                missing.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Stops every node's runtime and every pod of the lab: SIGKILL to every process in the lab's
/// cgroup subtree until it is empty, then removes the subtree in every hierarchy. Returns
/// whether the subtree is gone.
pub fn stop_all(paths: &LabPaths) -> bool {
    let name = lab_cgroup(paths);
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut pids = Vec::new();
        for h in hierarchies() {
            pids_under(&h.join(&name), &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids.retain(|p| *p != me);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut gone = true;
    for h in hierarchies() {
        let top = h.join(&name);
        if top.is_dir() {
            rmdir_tree(&top);
            gone &= !top.exists();
        }
    }
    gone
}

/// The API server address the lab's nodes reach before Services work (the DaemonSet's
/// `malla-kubernetes-endpoint`).
pub fn api_endpoint() -> (Ipv4Addr, u16) {
    (
        crate::store::ETCD_CLIENT.0,
        control_plane::LAB_APISERVER_PORT,
    )
}

/// `deploy/` (at `src`) copied into `out` and edited for the lab as `configmap.yaml`'s comments
/// ask a user to: the nodes' underlay interface is `ul0` and the API server before Services
/// work is [`api_endpoint`]. Errors when the file no longer holds the lines it edits.
pub fn deploy_for_lab(src: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        std::fs::copy(e.path(), out.join(e.file_name()))
            .with_context(|| format!("copying {}", e.path().display()))?;
    }
    let cm = out.join("configmap.yaml");
    let text = std::fs::read_to_string(&cm).with_context(|| format!("reading {}", cm.display()))?;
    let (host, port) = api_endpoint();
    let edits = [
        ("underlayInterface: eth0\n", "underlayInterface: ul0\n".to_string()),
        (
            "data: {}\n  # KUBERNETES_SERVICE_HOST",
            format!(
                "data:\n  KUBERNETES_SERVICE_HOST: \"{host}\"\n  KUBERNETES_SERVICE_PORT: \"{port}\"\n  # KUBERNETES_SERVICE_HOST"
            ),
        ),
    ];
    let mut edited = text;
    for (from, to) in edits {
        if edited.matches(from).count() != 1 {
            bail!(
                "{}: expected one {from:?} to edit for the lab",
                cm.display()
            );
        }
        edited = edited.replace(from, &to);
    }
    write(&cm, &edited)?;
    Ok(out.to_path_buf())
}

/// What a real kube-proxy v1.20 (iptables mode, `scripts/k8s-control-plane`'s build) needs to
/// serve a lab node's Services instead of Malla's agent (started with `--no-services`): the
/// comparison of `kube-proxy-bench`.
#[derive(Debug, Clone)]
pub struct KubeProxy {
    /// The binary (default: `$MALLA_K8S_DIR/bin/kube-proxy`, [`KubeProxy::binary`]).
    pub binary: PathBuf,
    /// A kubeconfig for the lab's API server.
    pub kubeconfig: PathBuf,
    /// The node's name (`--hostname-override`) and address (`--bind-address`).
    pub node: String,
    pub node_ip: Ipv4Addr,
    /// `--cluster-cidr`: traffic from outside it to a Service is masqueraded.
    pub cluster_cidr: String,
    /// Run `iptables-legacy` rather than the machine's `iptables` (Debian's: nft): a directory
    /// of links put first on kube-proxy's PATH ([`KubeProxy::legacy_links`]).
    pub legacy_links: Option<PathBuf>,
}

/// The programs kube-proxy runs by name, each a link to `xtables-legacy-multi` in
/// [`KubeProxy::legacy_links`].
const IPTABLES_PROGRAMS: [&str; 6] = [
    "iptables",
    "iptables-save",
    "iptables-restore",
    "ip6tables",
    "ip6tables-save",
    "ip6tables-restore",
];

/// Directories kube-proxy sees read-only: machine-wide settings (`kernel.*`, `vm.*`, the
/// conntrack table's size) that must never change. `--conntrack-max-per-core=0` and the
/// timeouts at 0 already tell it to leave them alone; this makes sure.
pub const KUBE_PROXY_READ_ONLY: [&str; 4] = [
    "/proc/sys/kernel",
    "/proc/sys/vm",
    "/proc/sys/net/netfilter",
    "/sys/module/nf_conntrack/parameters",
];

impl KubeProxy {
    /// `$MALLA_K8S_DIR/bin/kube-proxy`; an error naming the build script when it is missing.
    pub fn binary() -> anyhow::Result<PathBuf> {
        let p = Binaries::cache_dir().join("bin").join("kube-proxy");
        if !p.is_file() {
            bail!(
                "{} is missing: run scripts/k8s-control-plane (as root; it builds kube-proxy v1.20 once)",
                p.display()
            );
        }
        Ok(p)
    }

    /// Makes `dir` hold the iptables programs as links to `xtables-legacy-multi` (which
    /// dispatches on its name); returns it, for [`KubeProxy::legacy_links`].
    pub fn legacy_links(dir: &Path) -> anyhow::Result<PathBuf> {
        let multi = Path::new("/usr/sbin/xtables-legacy-multi");
        if !multi.is_file() {
            bail!("{} is missing (Debian package iptables)", multi.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in IPTABLES_PROGRAMS {
            let link = dir.join(name);
            if !link.exists() {
                std::os::unix::fs::symlink(multi, &link)
                    .with_context(|| format!("linking {}", link.display()))?;
            }
        }
        Ok(dir.to_path_buf())
    }

    /// PATH for kube-proxy and the cleanup's programs: the legacy links first, if any.
    fn path(&self) -> Option<String> {
        let dir = self.legacy_links.as_ref()?;
        let rest = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        Some(format!("{}:{rest}", dir.display()))
    }

    /// The command line: iptables mode, its ports on the node namespace's loopback, and
    /// nothing machine-wide (conntrack size and timeouts left as they are, no OOM score).
    fn args(&self, cleanup: bool) -> Vec<String> {
        let mut a = vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--proxy-mode=iptables".into(),
        ];
        if cleanup {
            a.push("--cleanup".into());
            return a;
        }
        a.extend([
            format!("--hostname-override={}", self.node),
            format!("--bind-address={}", self.node_ip),
            format!("--cluster-cidr={}", self.cluster_cidr),
            "--healthz-bind-address=127.0.0.1:10256".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--conntrack-max-per-core=0".into(),
            "--conntrack-min=0".into(),
            "--conntrack-tcp-timeout-established=0".into(),
            "--conntrack-tcp-timeout-close-wait=0".into(),
            "--oom-score-adj=0".into(),
        ]);
        a
    }

    /// `unshare --mount` of a script making [`KUBE_PROXY_READ_ONLY`] read-only, then `exec`ing
    /// kube-proxy: the pid is kube-proxy's own.
    fn command(&self, cleanup: bool) -> Command {
        let mut script = String::from("set -e\n");
        for d in KUBE_PROXY_READ_ONLY {
            script.push_str(&format!(
                "if [ -e {d} ]; then mount --bind {d} {d}; mount -o remount,bind,ro {d}; fi\n"
            ));
        }
        script.push_str("exec \"$0\" \"$@\"\n");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg(&self.binary)
            .args(self.args(cleanup));
        if let Some(path) = self.path() {
            cmd.env("PATH", path);
        }
        cmd
    }

    /// Starts kube-proxy in `netns` (a lab node's), output to `log`; returns its pid (stop it
    /// with [`KubeProxy::stop`]).
    pub fn start(&self, netns: &str, log: &Path) -> anyhow::Result<u32> {
        crate::process::spawn_detached(self.command(false), netns, log)
    }

    /// Kills kube-proxy `pid` (started by [`KubeProxy::start`]) and its process group: the
    /// `iptables-restore` it may be running would outlive it and hold the xtables lock.
    pub fn stop(pid: u32) {
        if crate::process::is_ours(pid) {
            // Its own session and group (spawn_detached), which only its children share.
            let group = nix::unistd::Pid::from_raw(-(pid as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// `kube-proxy --cleanup` in `netns` (with it stopped), then the empty `KUBE-` chains it
    /// leaves (`KUBE-PROXY-CANARY`, `KUBE-MARK-DROP`, which v1.20 counts as the kubelet's)
    /// deleted, and a check that no `KUBE-` chain is left in `iptables-save` or
    /// `ip6tables-save` there. Its exit status is not the verdict: v1.20 also tears down IPVS
    /// sets and fails where `ipset` is not installed.
    pub fn cleanup(&self, netns: &str) -> anyhow::Result<()> {
        let ns = malla_dataplane::netns::NetNs::open_named(netns)?;
        let run = |program: &str, args: &[&str]| -> anyhow::Result<std::process::Output> {
            let mut cmd = Command::new(program);
            cmd.args(args).stdin(Stdio::null());
            if let Some(path) = self.path() {
                cmd.env("PATH", path);
            }
            ns.enter_on_exec(&mut cmd, false)?;
            cmd.output()
                .with_context(|| format!("running {program} {args:?} in {netns}"))
        };
        let mut cmd = self.command(true);
        cmd.stdin(Stdio::null());
        ns.enter_on_exec(&mut cmd, false)?;
        let out = cmd
            .output()
            .with_context(|| format!("running kube-proxy --cleanup in {netns}"))?;
        for (save, tool) in [
            ("iptables-save", "iptables"),
            ("ip6tables-save", "ip6tables"),
        ] {
            let chains = |text: &str| -> Vec<(String, String)> {
                let mut table = String::new();
                let mut found = Vec::new();
                for line in text.lines() {
                    if let Some(t) = line.strip_prefix('*') {
                        table = t.to_string();
                    } else if let Some(c) = line.strip_prefix(":KUBE-") {
                        let name = c.split_whitespace().next().unwrap_or_default();
                        found.push((table.clone(), format!("KUBE-{name}")));
                    }
                }
                found
            };
            let text = String::from_utf8_lossy(&run(save, &[])?.stdout).into_owned();
            let left = chains(&text);
            for op in ["-F", "-X"] {
                for (table, chain) in &left {
                    let _ = run(tool, &["-w", "-t", table, op, chain])?;
                }
            }
            let rules = run(save, &[])?;
            let text = String::from_utf8_lossy(&rules.stdout);
            if !rules.status.success() || text.contains("KUBE-") {
                bail!(
                    "kube-proxy --cleanup left chains in {netns} ({save}: {}); its output: {}",
                    text.lines()
                        .filter(|l| l.contains("KUBE-"))
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" | "),
                    log_text(&out.stderr)
                );
            }
        }
        Ok(())
    }
}

/// The last lines of a process's output.
fn log_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
