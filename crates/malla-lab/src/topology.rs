//! `malla lab up` and `malla lab down`: the underlay, the nodes with their agents, the outside.
//!
//! Addresses (all inside 198.18.0.0/15 and fd00::/8):
//! - pods: pool 198.18.0.0/16 (/26 blocks), with `--ipv6` also fd00:198:18::/64 (/122 blocks);
//! - underlay: 198.19.0.0/24 and fd00:198:19::/64 on the fabric bridge (`.1` is the fabric's);
//! - outside: 198.19.1.0/24 and fd00:198:19:1::/64, routed by the fabric, `.2` is `external`.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_api::{keys, ClusterConfig, IpPool, RoutingMode};
use malla_dataplane::netns::{self, run_ip};

use crate::process;
use crate::state::{ExternalState, LabLock, LabPaths, LabState, NodeState};

/// Port the external probe server answers on (TCP and UDP).
pub const EXTERNAL_PORT: u16 = 8080;

#[derive(Debug, Clone)]
pub struct UpOptions {
    pub nodes: usize,
    pub routing: RoutingMode,
    pub ipv6: bool,
    /// The `malla` binary (agents and probe servers are its subcommands).
    pub malla_bin: std::path::PathBuf,
    /// The `malla-cni` binary to install as the CNI plugin `malla`.
    pub cni_bin: std::path::PathBuf,
    /// The datastore the lab runs on.
    pub datastore: crate::store::Backend,
    /// A kubelet and containerd on every node, kube-scheduler in the control plane; no lab
    /// agents (Malla comes from `deploy/`): [`crate::kubelet`]. Needs the kubernetes datastore.
    pub kubelet: bool,
    /// OCI archives imported into every node's containerd (with `kubelet`).
    pub images: Vec<std::path::PathBuf>,
    /// `--routing bgp`: the router in the fabric, and whether it reflects routes (the node
    /// mesh off) ([`crate::bgp`]).
    pub router: crate::bgp::RouterKind,
    pub route_reflector: bool,
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

/// Node `i`'s underlay address on segment `seg` (0 unless BGP: [`crate::bgp::segment`]).
fn node_ipv4(i: usize, seg: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, seg, 10 + i as u8)
}

fn node_ipv6(i: usize, seg: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x198, 0x19, seg as u16, 0, 0, 0, 0x10 + i as u16)
}

fn ip(ns: &str, args: &str) -> anyhow::Result<()> {
    let mut v = vec!["-n", ns];
    v.extend(args.split_whitespace());
    run_ip(&v).map_err(Into::into)
}

fn link_exists(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "link", "show", "dev", name])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn sysctl_in(ns: &str, kv: &[&str]) -> anyhow::Result<()> {
    for item in kv {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-q", "-w", item])
            .output()
            .context("running sysctl")?;
        if !out.status.success() {
            bail!(
                "sysctl {item} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// A veth from the fabric bridge to `ns` (named `ul0` there), idempotent.
fn attach_to_fabric(fabric: &str, ns: &str, fabric_end: &str) -> anyhow::Result<()> {
    if !link_exists(fabric, fabric_end) {
        run_ip(&[
            "link", "add", fabric_end, "netns", fabric, "type", "veth", "peer", "name", "ul0",
            "netns", ns,
        ])?;
    }
    Ok(())
}

/// Brings the lab up; running it again repairs whatever is missing.
pub fn up(paths: &LabPaths, opts: &UpOptions) -> anyhow::Result<LabState> {
    if opts.nodes == 0 || opts.nodes > 200 {
        bail!("--nodes: {} is outside 1..=200", opts.nodes);
    }
    if opts.kubelet && opts.datastore != crate::store::Backend::Kubernetes {
        bail!(
            "--kubelet runs on the kubernetes datastore (not {:?})",
            opts.datastore
        );
    }
    let _lock = LabLock::acquire(paths)?;
    if let Some(existing) = LabState::load(paths)? {
        if existing.nodes.len() != opts.nodes
            || existing.routing != opts.routing
            || existing.ipv6 != opts.ipv6
            || existing.datastore != opts.datastore
            || existing.kubelet != opts.kubelet
            || existing
                .router
                .as_ref()
                .is_some_and(|r| r.kind != opts.router || r.route_reflector != opts.route_reflector)
        {
            bail!(
                "lab {:?} is already up with {} nodes, routing {}, ipv6 {}, datastore {:?}; run `malla lab down --lab {}` first to change its shape",
                paths.name,
                existing.nodes.len(),
                existing.routing,
                existing.ipv6,
                existing.datastore,
                paths.name
            );
        }
    }
    for d in ["logs", "cni/bin"] {
        std::fs::create_dir_all(paths.dir.join(d))?;
    }

    let fabric = paths.netns("fabric");
    netns::create(&fabric)?;
    // Our addresses are unique by construction: duplicate address detection would only hold
    // IPv6 back for its first seconds.
    const NO_DAD: [&str; 2] = [
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ];
    sysctl_in(&fabric, &NO_DAD)?;
    sysctl_in(
        &fabric,
        &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
    )?;
    if !link_exists(&fabric, "br0") {
        ip(&fabric, "link add br0 type bridge")?;
    }
    ip(&fabric, "addr replace 198.19.0.1/24 dev br0")?;
    if opts.ipv6 {
        ip(&fabric, "addr replace fd00:198:19::1/64 dev br0 nodad")?;
    }
    ip(&fabric, "link set br0 up")?;
    let bgp = opts.routing == RoutingMode::Bgp;
    if bgp {
        // The second segment: joined to the first only by this namespace's routing.
        let seg = crate::bgp::SEGMENT_B;
        if !link_exists(&fabric, "br1") {
            ip(&fabric, "link add br1 type bridge")?;
        }
        ip(
            &fabric,
            &format!("addr replace {}/24 dev br1", crate::bgp::gateway_v4(seg)),
        )?;
        if opts.ipv6 {
            ip(
                &fabric,
                &format!(
                    "addr replace {}/64 dev br1 nodad",
                    crate::bgp::gateway_v6(seg)
                ),
            )?;
        }
        ip(&fabric, "link set br1 up")?;
    }
    let previous = LabState::load(paths)?;
    let etcd_pid = match opts.datastore {
        crate::store::Backend::Etcd => Some(crate::store::start_etcd(
            paths,
            &fabric,
            previous.as_ref().and_then(|p| p.etcd_pid),
        )?),
        crate::store::Backend::Local | crate::store::Backend::Kubernetes => None,
    };
    let control_plane = match opts.datastore {
        crate::store::Backend::Kubernetes => Some(crate::store::start_control_plane(
            paths,
            &fabric,
            &previous
                .as_ref()
                .and_then(|p| p.control_plane)
                .unwrap_or_default(),
            &(1..=opts.nodes).map(node_name).collect::<Vec<_>>(),
            opts.kubelet,
        )?),
        _ => None,
    };
    init_datastore(paths, opts, &fabric)?;

    let ext_ns = paths.netns("external");
    netns::create(&ext_ns)?;
    sysctl_in(&ext_ns, &NO_DAD)?;
    attach_to_fabric(&fabric, &ext_ns, "ext")?;
    ip(&fabric, "addr replace 198.19.1.1/24 dev ext")?;
    ip(&fabric, "link set ext up")?;
    ip(&ext_ns, "addr replace 198.19.1.2/24 dev ul0")?;
    ip(&ext_ns, "link set ul0 up")?;
    // The outside world knows the node network (as the internet knows a cluster's public
    // addresses) but not the pod pools.
    ip(&ext_ns, "route replace 198.19.0.0/24 via 198.19.1.1")?;
    if opts.ipv6 {
        ip(&fabric, "addr replace fd00:198:19:1::1/64 dev ext nodad")?;
        ip(&ext_ns, "addr replace fd00:198:19:1::2/64 dev ul0 nodad")?;
        ip(
            &ext_ns,
            "route replace fd00:198:19::/64 via fd00:198:19:1::1",
        )?;
    }
    if bgp {
        // With BGP the outside routes to the second segment and to the pods through the
        // router, as a data centre's network does.
        ip(&ext_ns, "route replace 198.19.2.0/24 via 198.19.1.1")?;
        ip(&ext_ns, "route replace 198.18.0.0/16 via 198.19.1.1")?;
        // Service, LoadBalancer and external IP ranges the nodes announce.
        for r in [
            crate::bgp::SERVICE_RANGE_V4,
            crate::bgp::LB_POOL_V4,
            crate::bgp::EXTERNAL_IP_RANGE_V4,
        ] {
            ip(&ext_ns, &format!("route replace {r} via 198.19.1.1"))?;
        }
        if opts.ipv6 {
            ip(
                &ext_ns,
                "route replace fd00:198:19:2::/64 via fd00:198:19:1::1",
            )?;
            ip(
                &ext_ns,
                "route replace fd00:198:18::/64 via fd00:198:19:1::1",
            )?;
            for r in [crate::bgp::SERVICE_RANGE_V6, crate::bgp::LB_POOL_V6] {
                ip(&ext_ns, &format!("route replace {r} via fd00:198:19:1::1"))?;
            }
        }
    }

    let mut nodes = Vec::new();
    for i in 1..=opts.nodes {
        let name = node_name(i);
        let ns = paths.netns(&name);
        netns::create(&ns)?;
        sysctl_in(&ns, &NO_DAD)?;
        let fabric_end = format!("n{i}");
        attach_to_fabric(&fabric, &ns, &fabric_end)?;
        let seg = crate::bgp::segment(i, bgp);
        let bridge = if seg == 0 { "br0" } else { "br1" };
        ip(
            &fabric,
            &format!("link set {fabric_end} master {bridge} up"),
        )?;
        ip(
            &ns,
            &format!("addr replace {}/24 dev ul0", node_ipv4(i, seg)),
        )?;
        ip(&ns, "link set ul0 up")?;
        ip(
            &ns,
            &format!("route replace default via {}", crate::bgp::gateway_v4(seg)),
        )?;
        if opts.ipv6 {
            ip(
                &ns,
                &format!("addr replace {}/64 dev ul0 nodad", node_ipv6(i, seg)),
            )?;
            ip(
                &ns,
                &format!("route replace default via {}", crate::bgp::gateway_v6(seg)),
            )?;
        }
        if !opts.kubelet {
            install_cni(paths, &opts.cni_bin, &name, opts.datastore)?;
        }
        nodes.push(NodeState {
            name,
            netns: ns,
            underlay_ipv4: node_ipv4(i, seg),
            underlay_ipv6: opts.ipv6.then(|| node_ipv6(i, seg)),
            agent_pid: None,
            runtime_pid: None,
        });
    }

    let mut state = LabState {
        name: paths.name.clone(),
        routing: opts.routing,
        ipv6: opts.ipv6,
        datastore: opts.datastore,
        etcd_pid,
        control_plane,
        kubelet: opts.kubelet,
        fabric_netns: fabric.clone(),
        router: None,
        nodes,
        external: ExternalState {
            netns: ext_ns.clone(),
            ipv4: Ipv4Addr::new(198, 19, 1, 2),
            ipv6: opts
                .ipv6
                .then(|| Ipv6Addr::new(0xfd00, 0x198, 0x19, 1, 0, 0, 0, 2)),
            port: EXTERNAL_PORT,
            probe_pid: None,
        },
        namespaces: vec!["default".to_string()],
        namespace_labels: Default::default(),
        pods: Default::default(),
        services: Default::default(),
        manual_slices: Default::default(),
        calico: Default::default(),
        policies: Default::default(),
    };
    if let Some(prev) = previous {
        state.namespaces = prev.namespaces;
        state.namespace_labels = prev.namespace_labels;
        state.pods = prev.pods;
        state.services = prev.services;
        state.manual_slices = prev.manual_slices;
        state.policies = prev.policies;
        state.external.probe_pid = prev.external.probe_pid;
        state.router = prev.router;
        for (n, p) in state.nodes.iter_mut().zip(prev.nodes) {
            n.agent_pid = p.agent_pid;
            n.runtime_pid = p.runtime_pid;
        }
    }

    if opts.kubelet {
        // The nodes' runtimes register them; Malla is then installed from deploy/.
        state.save(paths)?;
        let cp_opts =
            crate::store::control_plane_options(paths, &state.fabric_netns).with_kubelets();
        let access = crate::control_plane::access(&cp_opts)?;
        let result = crate::kubelet::start_nodes(
            paths,
            &crate::store::control_plane_dir(paths),
            &access,
            &mut state.nodes,
            &opts.images,
        );
        state.save(paths)?;
        result?;
    }
    if bgp {
        state.router = Some(crate::bgp::start_router(
            paths,
            &fabric,
            opts.router,
            opts.route_reflector,
            &state.nodes,
            state.router.as_ref(),
        )?);
        state.save(paths)?;
    }
    for node in state.nodes.iter_mut().filter(|_| !opts.kubelet) {
        if node.agent_pid.is_some_and(process::is_ours) {
            continue;
        }
        node.agent_pid = Some(start_agent(paths, &opts.malla_bin, node, opts.datastore)?);
    }
    if !state.external.probe_pid.is_some_and(process::is_ours) {
        let ready = paths.dir.join("external.ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(&opts.malla_bin);
        cmd.args(["lab", "probe-server", "--name", "external", "--listen"])
            .arg(format!("{EXTERNAL_PORT}/tcp,{EXTERNAL_PORT}/udp"))
            .arg("--ready-file")
            .arg(&ready);
        state.external.probe_pid = Some(process::spawn_detached(
            cmd,
            &ext_ns,
            &paths.log("external"),
        )?);
        state.save(paths)?;
        process::wait_for_file(&ready, Duration::from_secs(10))
            .context("external probe server did not start")?;
    }
    state.save(paths)?;
    if !opts.kubelet {
        wait_converged(paths, &state, Duration::from_secs(30))?;
    }
    if bgp {
        crate::bgp::wait_sessions(paths, &state, Duration::from_secs(30))?;
    }
    Ok(state)
}

/// Starts (or restarts) a node's agent; returns its pid.
pub fn start_agent(
    paths: &LabPaths,
    malla_bin: &Path,
    node: &NodeState,
    datastore: crate::store::Backend,
) -> anyhow::Result<u32> {
    start_agent_with(paths, malla_bin, node, datastore, &[])
}

/// [`start_agent`] with more arguments for `malla agent` (e.g. `--no-services`).
pub fn start_agent_with(
    paths: &LabPaths,
    malla_bin: &Path,
    node: &NodeState,
    datastore: crate::store::Backend,
    extra: &[&str],
) -> anyhow::Result<u32> {
    let _ = std::fs::remove_file(paths.ready_file(&node.name));
    let mut cmd = Command::new(malla_bin);
    cmd.args([
        "agent",
        "--node",
        &node.name,
        "--underlay-interface",
        "ul0",
        "--datastore",
    ])
    .arg(crate::store::spec(paths, datastore).to_string())
    .arg("--ready-file")
    .arg(paths.ready_file(&node.name))
    .args(extra);
    process::spawn_detached(
        cmd,
        &node.netns,
        &paths.log(&format!("agent-{}", node.name)),
    )
}

/// What a node's agent reports in its ready file ([`malla_store::barrier::ReadyFile`]), if it
/// is running and has applied its first sync.
pub fn applied(paths: &LabPaths, node: &str) -> Option<malla_store::barrier::ReadyFile> {
    malla_store::barrier::ReadyFile::read(&paths.ready_file(node))
}

/// Waits until every agent has applied everything the datastore acknowledged before this call:
/// bumps the convergence barrier ([`malla_store::barrier`]) and waits until every agent's ready
/// file reports it (or a later one). The same on every backend; no quiet periods, no revision
/// comparison.
pub fn wait_converged(paths: &LabPaths, state: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let store = crate::store::open(paths, state)?;
    let target = malla_store::barrier::bump(&*store).context("bumping the convergence barrier")?;
    let deadline = Instant::now() + timeout;
    loop {
        let behind: Vec<&str> = state
            .nodes
            .iter()
            .filter(|n| {
                // A `--kubelet` lab's agents are the DaemonSet's: their ready file is in the
                // node's /run/malla.
                let read = match state.kubelet {
                    true => malla_store::barrier::ReadyFile::read(
                        &crate::kubelet::NodeFiles::new(paths, &n.name)
                            .run_malla()
                            .join("agent.ready"),
                    ),
                    false => applied(paths, &n.name),
                };
                read.is_none_or(|r| r.barrier < target)
            })
            .map(|n| n.name.as_str())
            .collect();
        if behind.is_empty() {
            if state.routing == RoutingMode::Bgp {
                // Applied means the speakers are configured; the routes travel from there.
                let left = deadline.saturating_duration_since(Instant::now());
                return crate::bgp::wait_routes(paths, state, left.max(Duration::from_secs(10)));
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "agents have not applied barrier {target} after {:?}: {} (see {})",
                timeout,
                behind.join(", "),
                paths.dir.join("logs").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Changes the lab's cluster config with `edit` (e.g. `antiSpoofing` for a test or a
/// benchmark) and waits until every agent applied it.
pub fn update_cluster_config(
    paths: &LabPaths,
    state: &LabState,
    edit: impl FnOnce(&mut ClusterConfig),
) -> anyhow::Result<()> {
    let store = crate::store::open(paths, state)?;
    let (mut config, _) = malla_store::get_json::<ClusterConfig>(&*store, keys::CLUSTER_CONFIG)?
        .context("the lab has no cluster config")?;
    edit(&mut config);
    malla_store::put_json(&*store, keys::CLUSTER_CONFIG, &config)?;
    wait_converged(paths, state, Duration::from_secs(30))
}

/// Installs the plugin and writes every node's conflist, as `malla install-cni` does on a node.
fn install_cni(
    paths: &LabPaths,
    cni_bin: &Path,
    node: &str,
    datastore: crate::store::Backend,
) -> anyhow::Result<()> {
    let conflist = malla_cni::install::conflist(
        node,
        &crate::store::spec(paths, datastore),
        Some(&paths.ready_file(node)),
        "1.1.0",
    );
    let conf_dir = paths
        .conflist(node)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    malla_cni::install::install(cni_bin, &paths.cni_bin_dir(), &conf_dir, &conflist, false)?;
    Ok(())
}

fn init_datastore(paths: &LabPaths, opts: &UpOptions, fabric: &str) -> anyhow::Result<()> {
    let store = crate::store::open_backend(paths, opts.datastore, fabric)?;
    let store: &dyn malla_store::Store = &*store;
    let config = ClusterConfig {
        routing: opts.routing,
        bgp: (opts.routing == RoutingMode::Bgp)
            .then(|| crate::bgp::cluster_bgp(opts.nodes, opts.route_reflector, opts.ipv6)),
        ..ClusterConfig::default()
    };
    let current = malla_store::get_json::<ClusterConfig>(store, keys::CLUSTER_CONFIG)?;
    if current.map(|(c, _)| c) != Some(config.clone()) {
        malla_store::put_json(store, keys::CLUSTER_CONFIG, &config)?;
    }
    let ipam = malla_ipam::Ipam::new(store);
    let mut pools = vec![IpPool {
        name: "default-ipv4".into(),
        cidr: "198.18.0.0/16".parse()?,
        block_size: 26,
        nat_outgoing: true,
        disabled: false,
    }];
    if opts.ipv6 {
        pools.push(IpPool {
            name: "default-ipv6".into(),
            cidr: "fd00:198:18::/64".parse()?,
            block_size: 122,
            nat_outgoing: true,
            disabled: false,
        });
    }
    let existing = ipam.pools()?;
    for p in pools {
        if !existing.contains(&p) {
            ipam.ensure_pool(&p)?;
        }
    }
    Ok(())
}

/// Tears the lab down: processes by pid, namespaces by exact name (also leftovers of a crash,
/// found by the lab's prefix), then the state directory.
pub fn down(paths: &LabPaths) -> anyhow::Result<Vec<String>> {
    let state = LabState::load(paths).ok().flatten();
    if let Some(s) = &state {
        for p in s.pods.values() {
            if let Some(pid) = p.probe_pid {
                process::stop(pid);
            }
        }
        if let Some(pid) = s.external.probe_pid {
            process::stop(pid);
        }
        if let Some(pid) = s.etcd_pid {
            process::stop(pid);
        }
        if let Some(pids) = &s.control_plane {
            crate::control_plane::stop_detached(&crate::store::control_plane_dir(paths), pids);
        }
        for n in &s.nodes {
            if let Some(pid) = n.agent_pid {
                process::stop(pid);
            }
        }
        crate::bgp::stop_all(paths, s);
    }
    // Every node runtime and pod of a `--kubelet` lab (also after a crash: by cgroup).
    if !crate::kubelet::stop_all(paths) {
        bail!(
            "the lab's cgroups (/sys/fs/cgroup/*/{}) could not be removed",
            crate::kubelet::lab_cgroup(paths)
        );
    }
    let prefix = paths.prefix();
    let mut removed = Vec::new();
    for name in netns::list_named() {
        if name.starts_with(&prefix) {
            kill_processes_in(&name);
            netns::delete(&name)?;
            removed.push(name);
        }
    }
    if paths.dir.exists() {
        std::fs::remove_dir_all(&paths.dir)
            .with_context(|| format!("removing {}", paths.dir.display()))?;
    }
    Ok(removed)
}

/// Stops malla processes still running inside a lab namespace (e.g. after the CLI crashed
/// before recording their pids).
fn kill_processes_in(netns_name: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", netns_name])
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<u32>() {
                process::stop(pid);
            }
        }
    }
}
