//! `malla lab up --routing bgp`: the nodes sit on two L2 segments (odd nodes on `br0`,
//! 198.19.0.0/24; even nodes on `br1`, 198.19.2.0/24) joined only by the fabric namespace,
//! which is the top-of-rack router: a real BGP router (`--router bird` or `--router frr`) runs
//! there, peers with every node over iBGP in the nodes' AS and installs the pod routes it learns,
//! so pods are routed between segments and from outside without overlay or NAT. Direct routes
//! cannot work across the segments: BGP must.
//!
//! The router is a plain iBGP peer beside the nodes' full mesh (Calico's default with a
//! top-of-rack `BGPPeer`), or with `--route-reflector` the route reflector of a mesh-less
//! cluster. Its files (configuration, pid files, control sockets, logs) live under the lab's
//! `router/` directory; its processes are the lab's and stop with `lab down`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use malla_bgp::router::{RouterNeighbor, RouterSpec};
use serde::{Deserialize, Serialize};

use crate::state::{LabPaths, LabState, NodeState};

/// Which router runs in the fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    #[default]
    Bird,
    Frr,
}

impl std::str::FromStr for RouterKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bird" => Ok(Self::Bird),
            "frr" => Ok(Self::Frr),
            other => Err(format!("unknown router {other:?} (expected bird or frr)")),
        }
    }
}

impl std::fmt::Display for RouterKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bird => "bird",
            Self::Frr => "frr",
        })
    }
}

/// The router as the lab records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterState {
    pub kind: RouterKind,
    pub route_reflector: bool,
    /// Its daemons (BIRD; or FRR's zebra and bgpd).
    pub pids: Vec<u32>,
}

/// The second segment's third octet (the first is the classic underlay, 198.19.0.0/24).
pub const SEGMENT_B: u8 = 2;

/// The segment (third octet of 198.19.x.0/24, fourth group of fd00:198:19:x::/64) node `i` is on.
pub fn segment(i: usize, bgp: bool) -> u8 {
    if bgp && i.is_multiple_of(2) {
        SEGMENT_B
    } else {
        0
    }
}

/// The router's address on segment `seg` (`.1`), and the nodes' gateway there.
pub fn gateway_v4(seg: u8) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(198, 19, seg, 1)
}
pub fn gateway_v6(seg: u8) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::new(0xfd00, 0x198, 0x19, seg as u16, 0, 0, 0, 1)
}

/// The cluster's BGP settings for a lab of `nodes`: each node peers with the router's address
/// on its own segment; with a route reflector the node mesh is off.
pub fn cluster_bgp(nodes: usize, route_reflector: bool, ipv6: bool) -> malla_api::BgpConfig {
    let mut peers = Vec::new();
    for i in 1..=nodes {
        let seg = segment(i, true);
        let node = Some(crate::topology::node_name(i));
        peers.push(malla_api::BgpPeer {
            peer_ip: Some(IpAddr::V4(gateway_v4(seg))),
            as_number: Some(malla_api::DEFAULT_AS_NUMBER),
            node: node.clone(),
            ..Default::default()
        });
        if ipv6 {
            peers.push(malla_api::BgpPeer {
                peer_ip: Some(IpAddr::V6(gateway_v6(seg))),
                as_number: Some(malla_api::DEFAULT_AS_NUMBER),
                node,
                ..Default::default()
            });
        }
    }
    let mut cfg = malla_api::BgpConfig {
        node_to_node_mesh: !route_reflector,
        peers,
        service_cluster_ips: vec![SERVICE_RANGE_V4.parse().expect("constant")],
        service_external_ips: vec![EXTERNAL_IP_RANGE_V4.parse().expect("constant")],
        service_load_balancer_ips: vec![LB_POOL_V4.parse().expect("constant")],
        ..malla_api::BgpConfig::default()
    };
    if ipv6 {
        cfg.service_cluster_ips
            .push(SERVICE_RANGE_V6.parse().expect("constant"));
        cfg.service_load_balancer_ips
            .push(LB_POOL_V6.parse().expect("constant"));
    }
    cfg
}

/// The lab's service ranges ([`crate::addresses`]) as the nodes announce them.
pub const SERVICE_RANGE_V4: &str = "198.19.64.0/18";
pub const SERVICE_RANGE_V6: &str = "fd00:198:19:ff::/112";
/// The LoadBalancer address pools of a BGP lab.
pub const LB_POOL_V4: &str = "198.19.200.0/24";
pub const LB_POOL_V6: &str = "fd00:198:19:c8::/112";
/// The external IP range a BGP lab announces (Services' `externalIPs` in it are routed to the
/// nodes).
pub const EXTERNAL_IP_RANGE_V4: &str = "198.19.201.0/24";

/// Gives a `type: LoadBalancer` Service without an address one per family of its cluster IPs
/// from the lab's pools, as a LoadBalancer controller writes `status.loadBalancer`.
pub fn allocate_load_balancer(
    svc: &mut malla_api::service::Service,
    taken: &mut std::collections::BTreeSet<IpAddr>,
) -> anyhow::Result<()> {
    if svc.kind != malla_api::service::ServiceType::LoadBalancer
        || !svc.load_balancer_ips.is_empty()
    {
        taken.extend(svc.load_balancer_ips.iter().copied());
        return Ok(());
    }
    let pools: Vec<ipnet::IpNet> = [LB_POOL_V4, LB_POOL_V6]
        .iter()
        .map(|p| p.parse().expect("constant"))
        .collect();
    for v6 in svc
        .cluster_ips
        .iter()
        .map(IpAddr::is_ipv6)
        .collect::<Vec<_>>()
    {
        let ip = malla_bgp::services::allocate_lb(&pools, taken, v6)
            .context("the LoadBalancer pool is exhausted")?;
        taken.insert(ip);
        svc.load_balancer_ips.push(ip);
    }
    Ok(())
}

/// Where the router keeps its files.
pub fn router_dir(paths: &LabPaths) -> PathBuf {
    paths.dir.join("router")
}

/// A node's BIRD state directory (the agent's: beside its ready file).
pub fn node_bird_dir(paths: &LabPaths, node: &str) -> PathBuf {
    paths.node_dir(node).join("bird")
}

/// The router's configuration for these nodes.
pub fn router_spec(nodes: &[NodeState], route_reflector: bool, log: Option<PathBuf>) -> RouterSpec {
    let mut neighbors = Vec::new();
    for n in nodes {
        neighbors.push(RouterNeighbor {
            node: n.name.clone(),
            address: IpAddr::V4(n.underlay_ipv4),
            password: None,
            timers: None,
        });
        if let Some(v6) = n.underlay_ipv6 {
            neighbors.push(RouterNeighbor {
                node: n.name.clone(),
                address: IpAddr::V6(v6),
                password: None,
                timers: None,
            });
        }
    }
    RouterSpec {
        router_id: gateway_v4(0),
        as_number: malla_api::DEFAULT_AS_NUMBER,
        keepalive_secs: malla_api::BgpConfig::default().keepalive_secs,
        route_reflector,
        neighbors,
        log,
    }
}

/// Reconfigures the lab's running router with its configuration for the lab's nodes as
/// `edit` changes it (passwords, timers, fewer neighbours: what a data centre's router is
/// told): BIRD with `birdc configure`, FRR through `vtysh` (each neighbour's password and
/// timers set or cleared, neighbours left out removed). Only a running router (it is never
/// started here: that would be outside the fabric's namespace).
pub fn reconfigure_router(
    paths: &LabPaths,
    state: &LabState,
    edit: impl FnOnce(&mut RouterSpec),
) -> anyhow::Result<()> {
    let Some(router) = &state.router else {
        bail!("the lab has no router");
    };
    let dir = router_dir(paths);
    let log = (router.kind == RouterKind::Bird).then(|| dir.join("bird.log"));
    let all = router_spec(&state.nodes, router.route_reflector, log);
    let mut spec = all.clone();
    edit(&mut spec);
    match router.kind {
        RouterKind::Bird => {
            let mut bird = malla_bgp::speaker::Bird::new(&dir);
            if !bird.running() {
                bail!("the router's BIRD is not running (see {})", dir.display());
            }
            bird.apply(&spec.render_bird())
                .context("reconfiguring the router's BIRD")?;
        }
        RouterKind::Frr => {
            let mut cmds = vec![
                "configure terminal".to_string(),
                format!("router bgp {}", spec.as_number),
            ];
            for n in &all.neighbors {
                let a = n.address;
                match spec.neighbors.iter().find(|m| m.address == a) {
                    None => cmds.push(format!("no neighbor {a}")),
                    Some(m) => {
                        cmds.push(match &m.password {
                            Some(pw) => format!("neighbor {a} password {pw}"),
                            None => format!("no neighbor {a} password"),
                        });
                        cmds.push(match m.timers {
                            Some((k, h)) => format!("neighbor {a} timers {k} {h}"),
                            None => format!("no neighbor {a} timers"),
                        });
                    }
                }
            }
            let mut cmd = Command::new("vtysh");
            cmd.arg("--vty_socket").arg(&dir);
            for c in &cmds {
                cmd.args(["-c", c]);
            }
            let o = cmd.output().context("running vtysh")?;
            let err = String::from_utf8_lossy(&o.stderr);
            let out = String::from_utf8_lossy(&o.stdout);
            if !o.status.success() || out.contains("% ") {
                bail!("vtysh {cmds:?}: {} {}", out.trim(), err.trim());
            }
        }
    }
    Ok(())
}

/// Starts the router in the fabric namespace (or keeps the one running); its pids.
pub fn start_router(
    paths: &LabPaths,
    fabric: &str,
    kind: RouterKind,
    route_reflector: bool,
    nodes: &[NodeState],
    previous: Option<&RouterState>,
) -> anyhow::Result<RouterState> {
    if let Some(p) = previous {
        if p.kind == kind
            && p.route_reflector == route_reflector
            && !p.pids.is_empty()
            && p.pids.iter().all(|pid| crate::process::is_ours(*pid))
        {
            return Ok(p.clone());
        }
        for pid in &p.pids {
            crate::process::stop(*pid);
        }
    }
    let dir = router_dir(paths);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pids = match kind {
        RouterKind::Bird => {
            let spec = router_spec(nodes, route_reflector, Some(dir.join("bird.log")));
            let conf = dir.join("bird.conf");
            std::fs::write(&conf, spec.render_bird())?;
            let pidfile = dir.join("bird.pid");
            let _ = std::fs::remove_file(&pidfile);
            run_in(
                fabric,
                Command::new("/usr/sbin/bird")
                    .arg("-c")
                    .arg(&conf)
                    .arg("-s")
                    .arg(dir.join("bird.ctl"))
                    .arg("-P")
                    .arg(&pidfile),
                &dir.join("bird.stderr"),
            )?;
            vec![read_pid(&pidfile)?]
        }
        RouterKind::Frr => {
            let spec = router_spec(nodes, route_reflector, None);
            // FRR drops to its own user: the directory is theirs, and the directories above it
            // must let it through (a test's state root is a 0700 temporary directory).
            for d in [paths.dir.parent(), Some(paths.dir.as_path())]
                .into_iter()
                .flatten()
            {
                use std::os::unix::fs::PermissionsExt;
                let meta =
                    std::fs::metadata(d).with_context(|| format!("reading {}", d.display()))?;
                let mode = meta.permissions().mode();
                if mode & 0o001 == 0 {
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o001))
                        .with_context(|| format!("letting FRR through {}", d.display()))?;
                }
            }
            // Every path is given on the command line (instead of `-N`'s pathspace under /etc/frr and /var/run/frr), so
            // several labs' routers never meet and everything stays in the lab's directory.
            let chown = Command::new("chown")
                .args(["frr:frr"])
                .arg(&dir)
                .status()
                .context("chown frr:frr")?;
            if !chown.success() {
                bail!("chown frr:frr {} failed", dir.display());
            }
            std::fs::write(dir.join("zebra.conf"), "hostname malla-router\n")?;
            std::fs::write(dir.join("bgpd.conf"), spec.render_frr_bgpd())?;
            let mut pids = Vec::new();
            for daemon in ["zebra", "bgpd"] {
                let pidfile = dir.join(format!("{daemon}.pid"));
                let _ = std::fs::remove_file(&pidfile);
                let mut cmd = Command::new(format!("/usr/lib/frr/{daemon}"));
                cmd.args(["-d", "-u", "frr", "-g", "frr", "-P", "0"])
                    .arg("-f")
                    .arg(dir.join(format!("{daemon}.conf")))
                    .arg("-i")
                    .arg(&pidfile)
                    .arg("-z")
                    .arg(dir.join("zserv.api"))
                    .arg("--vty_socket")
                    .arg(&dir)
                    .arg("--log")
                    .arg(format!(
                        "file:{}",
                        dir.join(format!("{daemon}.log")).display()
                    ));
                if daemon == "zebra" {
                    // Routes stay in the kernel while zebra restarts.
                    cmd.arg("-r");
                }
                run_in(fabric, &mut cmd, &dir.join(format!("{daemon}.stderr")))?;
                pids.push(read_pid(&pidfile)?);
            }
            pids
        }
    };
    Ok(RouterState {
        kind,
        route_reflector,
        pids,
    })
}

/// Runs a daemon that forks into the background inside `netns`; waits for its parent to exit.
fn run_in(netns: &str, cmd: &mut Command, stderr: &std::path::Path) -> anyhow::Result<()> {
    let ns = malla_dataplane::netns::NetNs::open_named(netns)?;
    let err = std::fs::File::create(stderr)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(err);
    ns.enter_on_exec(cmd, true)?;
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!(
            "{cmd:?} failed: {}",
            std::fs::read_to_string(stderr).unwrap_or_default().trim()
        );
    }
    Ok(())
}

fn read_pid(pidfile: &std::path::Path) -> anyhow::Result<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            bail!("{} did not appear", pidfile.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the router and every node's BIRD (by their pid files).
pub fn stop_all(paths: &LabPaths, state: &LabState) {
    if let Some(r) = &state.router {
        for pid in &r.pids {
            crate::process::stop(*pid);
        }
    }
    for n in &state.nodes {
        let pidfile = node_bird_dir(paths, &n.name).join("bird.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            crate::process::stop(pid);
        }
    }
}

/// What each node must announce (its blocks and borrowed addresses, from the datastore) and
/// whether every other node and the router have a route for it in their kernels; the prefixes
/// still missing, as `where: prefix`.
pub fn missing_routes(paths: &LabPaths, state: &LabState) -> anyhow::Result<Vec<String>> {
    let store = crate::store::open(paths, state)?;
    let blocks = malla_ipam::Ipam::new(&*store)
        .blocks()
        .context("listing IPAM blocks")?;
    let mut announced: Vec<(String, ipnet::IpNet)> = Vec::new();
    for b in &blocks {
        let Some(owner) = &b.affinity else { continue };
        if b.allocations.is_empty() {
            continue;
        }
        announced.push((owner.clone(), b.cidr));
    }
    let mut routes: std::collections::BTreeMap<String, String> = Default::default();
    let mut table = |ns: &str| -> String {
        routes
            .entry(ns.to_string())
            .or_insert_with(|| {
                let mut t = String::new();
                for fam in ["-4", "-6"] {
                    if let Ok(o) = Command::new("ip")
                        .args([fam, "-n", ns, "route", "show"])
                        .output()
                    {
                        t.push_str(&String::from_utf8_lossy(&o.stdout));
                    }
                }
                t
            })
            .clone()
    };
    let mut missing = Vec::new();
    for (owner, cidr) in &announced {
        let want = cidr.to_string();
        let has = |t: &str| {
            t.lines().any(|l| {
                l.split_whitespace().next() == Some(want.as_str())
                    || l.split_whitespace().nth(1) == Some(want.as_str())
            })
        };
        for n in &state.nodes {
            if &n.name == owner {
                continue;
            }
            if !has(&table(&n.netns)) {
                missing.push(format!("{}: {want} (of {owner})", n.name));
            }
        }
        if !has(&table(&state.fabric_netns)) {
            missing.push(format!("router: {want} (of {owner})"));
        }
    }
    Ok(missing)
}

/// Waits until every node's announced blocks are routed on every other node and the router.
pub fn wait_routes(paths: &LabPaths, state: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing = missing_routes(paths, state)?;
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "BGP routes missing after {timeout:?}: {} (see {} and {})",
                missing.join(", "),
                router_dir(paths).display(),
                paths.dir.join("nodes").display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One BGP session as `malla lab bgp` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The speaker: a node's name, or `router`.
    pub speaker: String,
    /// The session's name on that speaker (BIRD's protocol; FRR: the neighbour's address).
    pub name: String,
    /// Who is on the other end (node NAME, peer ADDRESS).
    pub description: Option<String>,
    pub neighbor: Option<String>,
    pub neighbor_as: Option<u32>,
    /// `Established`, `Active`, `Connect`, … (with BIRD's last error, if any).
    pub state: String,
    pub established: bool,
    pub since: String,
    /// The negotiated hold time and keepalive interval in seconds (BIRD's sessions, while
    /// established).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_time: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<u32>,
    /// Routes received (accepted) and sent.
    pub received: u64,
    pub sent: u64,
}

impl Session {
    /// A session as BIRD reports it, on `speaker`.
    pub fn from_bird(speaker: &str, p: &malla_bgp::status::Protocol) -> Self {
        Self {
            speaker: speaker.to_string(),
            name: p.name.clone(),
            description: p.description.clone(),
            neighbor: p.neighbor_address.clone(),
            neighbor_as: p.neighbor_as,
            state: if p.info.is_empty() {
                p.state.clone()
            } else {
                p.info.clone()
            },
            established: p.established(),
            since: p.since.clone(),
            hold_time: p.hold_time,
            keepalive_time: p.keepalive_time,
            received: p.received(),
            sent: p.sent(),
        }
    }
}

/// Every node's sessions (from its BIRD's control socket) and the router's.
pub fn sessions(paths: &LabPaths, state: &LabState) -> anyhow::Result<Vec<Session>> {
    let birdc = std::path::Path::new("/usr/sbin/birdc");
    let mut out = Vec::new();
    for n in &state.nodes {
        let sock = node_bird_dir(paths, &n.name).join("bird.ctl");
        let protocols = malla_bgp::speaker::protocols(birdc, &sock)
            .with_context(|| format!("asking node {}'s BIRD", n.name))?;
        out.extend(protocols.iter().map(|p| Session::from_bird(&n.name, p)));
    }
    match state.router.as_ref().map(|r| r.kind) {
        Some(RouterKind::Bird) => {
            let sock = router_dir(paths).join("bird.ctl");
            let protocols =
                malla_bgp::speaker::protocols(birdc, &sock).context("asking the router's BIRD")?;
            out.extend(protocols.iter().map(|p| Session::from_bird("router", p)));
        }
        Some(RouterKind::Frr) => out.extend(frr_sessions(paths)?),
        None => {}
    }
    Ok(out)
}

/// The FRR router's sessions (`show bgp summary json`, both families).
fn frr_sessions(paths: &LabPaths) -> anyhow::Result<Vec<Session>> {
    let o = Command::new("vtysh")
        .arg("--vty_socket")
        .arg(router_dir(paths))
        .args(["-c", "show bgp summary json"])
        .output()
        .context("running vtysh")?;
    if !o.status.success() {
        bail!("vtysh: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).context("parsing vtysh's show bgp summary json")?;
    // The negotiated timers of established sessions.
    let n = Command::new("vtysh")
        .arg("--vty_socket")
        .arg(router_dir(paths))
        .args(["-c", "show bgp neighbors json"])
        .output()
        .context("running vtysh")?;
    let neighbors: serde_json::Value = serde_json::from_slice(&n.stdout).unwrap_or_default();
    let secs = |addr: &str, key: &str| -> Option<u32> {
        let nb = &neighbors[addr];
        if nb["bgpState"] != "Established" {
            return None;
        }
        nb[key]
            .as_u64()
            .and_then(|ms| u32::try_from(ms / 1000).ok())
    };
    let mut out = Vec::new();
    for af in ["ipv4Unicast", "ipv6Unicast"] {
        let Some(peers) = v[af]["peers"].as_object() else {
            continue;
        };
        for (addr, p) in peers {
            let state = p["state"].as_str().unwrap_or("").to_string();
            out.push(Session {
                speaker: "router".into(),
                name: addr.clone(),
                description: p["desc"].as_str().map(str::to_string),
                neighbor: Some(addr.clone()),
                neighbor_as: p["remoteAs"].as_u64().and_then(|a| u32::try_from(a).ok()),
                established: state == "Established",
                state,
                since: p["peerUptime"].as_str().unwrap_or("").to_string(),
                hold_time: secs(addr, "bgpTimerHoldTimeMsecs"),
                keepalive_time: secs(addr, "bgpTimerKeepAliveIntervalMsecs"),
                received: p["pfxRcd"].as_u64().unwrap_or(0),
                sent: p["pfxSnt"].as_u64().unwrap_or(0),
            });
        }
    }
    Ok(out)
}

/// Waits until every session of every node and of the router is established.
pub fn wait_sessions(paths: &LabPaths, state: &LabState, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let down: Vec<String> = match sessions(paths, state) {
            Ok(s) => s
                .into_iter()
                .filter(|s| !s.established)
                .map(|s| format!("{} {} ({})", s.speaker, s.name, s.state))
                .collect(),
            Err(e) => vec![format!("{e:#}")],
        };
        if down.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "BGP sessions not established after {timeout:?}: {}",
                down.join(", ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
