//! `bgp-bench`: with `routing: bgp`, the time from a block being claimed in the datastore to
//! its route being installed in the kernel of every other node and of the top-of-rack router
//! (issue 18), p50 and p99, with the FRR router and with the BIRD router.
//!
//! A 3-node `--routing bgp` lab (nodes on two segments, the router in the fabric). Each sample
//! claims a new block for one node (round robin) through Malla's IPAM, exactly as a CNI ADD
//! does when a node's blocks are full (addresses are taken until the allocator claims the
//! next block); the clock starts when that claim is committed. `ip monitor route` in every
//! other node's namespace and in the router's timestamps the route's arrival; a sample is the
//! last arrival (every node and the router have it), and the router's own arrival is reported
//! too. The baseline in the same run is the same pipeline's floor: the agent applying a change
//! that needs no routing at all (the convergence barrier round trip), so the ratio shows what
//! BGP adds on this machine.
//!
//! `--failure-runs N`: convergence after a node failure. node-2 (alone on the second segment)
//! loses its link (`ul0` down in its namespace): the time until its block is gone from every
//! other node's and the router's kernel (the peers' hold timers expire; BIRD withdraws), p50
//! over N runs, with the lab's timers (keepalive 3 s, hold 9 s) and with hold 3 s, keepalive
//! 1 s; then node-2's BIRD killed with SIGKILL: graceful restart keeps its block on every peer
//! (withdrawals counted while the agent starts it again) until its sessions are back.
//!
//! `--memory`: one node speaker (BIRD with Malla's rendered configuration) with 100 established
//! eBGP peers (a BIRD per peer address, 100 addresses on one veth in a second namespace), which
//! announce 10 000 routes in all; its RSS and `birdc show memory`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{begin, check, ms, percentile, ratio_d, BinArgs, ChildGuard, Lab};
use malla_lab::bgp::RouterKind;

#[derive(Parser, Debug)]
#[command(
    name = "bgp-bench",
    version,
    about = "block claimed → route on every node and the router, with FRR and BIRD routers"
)]
struct Args {
    /// Blocks claimed per router.
    #[arg(long, default_value_t = 30)]
    samples: usize,
    /// Nodes in the lab.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Only this router (bird or frr); both by default.
    #[arg(long)]
    router: Option<RouterKind>,
    /// Print every sample's arrivals (other nodes, then the router).
    #[arg(long)]
    verbose: bool,
    #[command(flatten)]
    bins: BinArgs,
    /// Skip the block → route part.
    #[arg(long)]
    skip_block: bool,
    /// Node failures per timer setting (0: skip the convergence part).
    #[arg(long, default_value_t = 0)]
    failure_runs: usize,
    /// Measure the speaker's memory with 100 established peers and 10k routes.
    #[arg(long)]
    memory: bool,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

/// When each namespace's monitor saw a prefix first.
type Seen = Arc<Mutex<BTreeMap<(String, String), Instant>>>;

/// `ip monitor route` in `ns`, recording the first time each added prefix appears.
fn monitor(ns: &str, seen: &Seen) -> anyhow::Result<ChildGuard> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "monitor", "route"])
        .stdout(Stdio::piped())
        .spawn()
        .context("ip monitor")?;
    let out = child.stdout.take().context("monitor output")?;
    let (ns, seen) = (ns.to_string(), seen.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.starts_with("Deleted") {
                continue;
            }
            let mut w = line.split_whitespace();
            let first = w.next().unwrap_or("");
            let prefix = if matches!(first, "blackhole" | "unreachable") {
                w.next().unwrap_or("")
            } else {
                first
            };
            if let Ok(mut s) = seen.lock() {
                s.entry((ns.clone(), prefix.to_string()))
                    .or_insert_with(Instant::now);
            }
        }
    });
    Ok(ChildGuard(child))
}

struct Figures {
    all: Vec<Duration>,
    router: Vec<Duration>,
    floor: Vec<Duration>,
}

fn run(args: &Args, kind: RouterKind, deadline: Instant) -> anyhow::Result<Figures> {
    let bins = args.bins.required()?;
    let mut opts = bins.up_options(args.nodes, RoutingMode::Bgp);
    opts.router = kind;
    eprintln!(
        "bgp-bench: bringing up a {}-node bgp lab with the {kind} router",
        args.nodes
    );
    let lab = Lab::up(&format!("bgp{kind}"), &opts)?;
    let store = malla_lab::store::open(&lab.paths, &lab.state)?;
    let ipam = malla_ipam::Ipam::new(&*store);
    let seen: Seen = Default::default();
    let mut spaces: Vec<(String, String)> = lab
        .state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.netns.clone()))
        .collect();
    spaces.push(("router".into(), lab.state.fabric_netns.clone()));
    let _monitors = spaces
        .iter()
        .map(|(_, ns)| monitor(ns, &seen))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let mut figures = Figures {
        all: Vec::new(),
        router: Vec::new(),
        floor: Vec::new(),
    };
    let mut claimed: std::collections::BTreeSet<ipnet::IpNet> = Default::default();
    for i in 0..args.samples {
        check(deadline)?;
        let node = &lab.state.nodes[i % lab.state.nodes.len()].name;
        // Take addresses until the allocator claims a block it did not have.
        let (block, t0) = loop {
            let got = ipam
                .auto_assign(&malla_ipam::AutoAssign {
                    handle: format!("bgp-bench-{i}"),
                    node: node.clone(),
                    ipv4: true,
                    ipv6: false,
                    attrs: Default::default(),
                    affine_hint: Vec::new(),
                })
                .context("assigning an address")?;
            let t = Instant::now();
            let b = got.first().context("no address assigned")?.block;
            if claimed.insert(b) {
                break (b, t);
            }
        };
        let want = block.to_string();
        let others: Vec<&String> = spaces
            .iter()
            .filter(|(n, _)| n != node)
            .map(|(_, ns)| ns)
            .collect();
        let wait = Instant::now() + Duration::from_secs(20);
        let arrivals = loop {
            let s = seen.lock().map_err(|_| anyhow::anyhow!("monitor lock"))?;
            let got: Vec<Option<Instant>> = others
                .iter()
                .map(|ns| s.get(&((*ns).clone(), want.clone())).copied())
                .collect();
            drop(s);
            if got.iter().all(Option::is_some) {
                break got.into_iter().flatten().collect::<Vec<_>>();
            }
            if Instant::now() > wait {
                bail!("{want} of {node} not routed everywhere after 20 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let last = arrivals.iter().max().copied().unwrap_or(t0);
        let router_at = arrivals.last().copied().unwrap_or(t0);
        if args.verbose {
            eprintln!(
                "  {node} {want}: {:?}",
                arrivals
                    .iter()
                    .map(|a| ms(a.saturating_duration_since(t0)))
                    .collect::<Vec<_>>()
            );
        }
        figures.all.push(last.saturating_duration_since(t0));
        figures.router.push(router_at.saturating_duration_since(t0));
        // The floor: the same agents acknowledging a change that routes nothing.
        let t = Instant::now();
        let target = malla_store::barrier::bump(&*store).context("bumping the barrier")?;
        while lab.state.nodes.iter().any(|n| {
            malla_lab::topology::applied(&lab.paths, &n.name).is_none_or(|r| r.barrier < target)
        }) {
            if t.elapsed() > Duration::from_secs(20) {
                bail!("agents did not apply barrier {target}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        figures.floor.push(t.elapsed());
    }
    Ok(figures)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=500).contains(&args.samples) || !(2..=20).contains(&args.nodes) {
        bail!("--samples must be in 1..=500, --nodes in 2..=20");
    }
    if args.failure_runs > 50 {
        bail!("--failure-runs must be at most 50");
    }
    let deadline = begin(args.max_seconds)?;
    if !args.skip_block {
        block_to_route(&args, deadline)?;
    }
    if args.failure_runs > 0 {
        failure(&args, deadline)?;
    }
    if args.memory {
        memory(deadline)?;
    }
    Ok(())
}

fn block_to_route(args: &Args, deadline: Instant) -> anyhow::Result<()> {
    let kinds = match args.router {
        Some(k) => vec![k],
        None => vec![RouterKind::Frr, RouterKind::Bird],
    };
    let mut rows = Vec::new();
    for kind in kinds {
        let f = run(args, kind, deadline)?;
        rows.push((kind, f));
    }
    println!(
        "\nblock claimed → route in every other node's and the router's kernel ({} nodes, {} blocks per router; ms)\n",
        args.nodes, args.samples
    );
    println!(
        "{:<8} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "router",
        "all p50",
        "all p99",
        "router p50",
        "router p99",
        "floor p50",
        "floor p99",
        "p50/floor"
    );
    for (kind, f) in &rows {
        let (a50, a99) = (percentile(&f.all, 50.0), percentile(&f.all, 99.0));
        let (f50, f99) = (percentile(&f.floor, 50.0), percentile(&f.floor, 99.0));
        println!(
            "{:<8} {:>10} {:>10} {:>12} {:>12} {:>12} {:>12} {:>10.2}",
            kind.to_string(),
            ms(a50),
            ms(a99),
            ms(percentile(&f.router, 50.0)),
            ms(percentile(&f.router, 99.0)),
            ms(f50),
            ms(f99),
            ratio_d(a50, f50)
        );
    }
    Ok(())
}

/// `ip -n NS route show PREFIX` has it.
fn routed(ns: &str, prefix: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "route", "show", prefix])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false)
}

fn ip_in(ns: &str, args: &str) -> anyhow::Result<()> {
    let mut v = vec!["-n", ns];
    v.extend(args.split_whitespace());
    let o = Command::new("ip").args(&v).output().context("running ip")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            v.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Convergence after node-2 fails, for each timer setting; graceful restart of its BIRD.
fn failure(args: &Args, deadline: Instant) -> anyhow::Result<()> {
    let bins = args.bins.required()?;
    let mut opts = bins.up_options(3, RoutingMode::Bgp);
    let kind = args.router.unwrap_or(RouterKind::Bird);
    opts.router = kind;
    eprintln!("bgp-bench: node failure, a 3-node bgp lab with the {kind} router");
    let lab = Lab::up("bgpfail", &opts)?;
    let store = malla_lab::store::open(&lab.paths, &lab.state)?;
    let ipam = malla_ipam::Ipam::new(&*store);
    let victim = lab.state.nodes[1].clone();
    let got = ipam
        .auto_assign(&malla_ipam::AutoAssign {
            handle: "bgp-bench-failure".into(),
            node: victim.name.clone(),
            ipv4: true,
            ipv6: false,
            attrs: Default::default(),
            affine_hint: Vec::new(),
        })
        .context("assigning an address")?;
    let block = got
        .first()
        .context("no address assigned")?
        .block
        .to_string();
    let others: Vec<String> = lab
        .state
        .nodes
        .iter()
        .filter(|n| n.name != victim.name)
        .map(|n| n.netns.clone())
        .chain([lab.state.fabric_netns.clone()])
        .collect();
    let gateway = malla_lab::bgp::gateway_v4(malla_lab::bgp::segment(2, true));
    malla_lab::bgp::wait_routes(&lab.paths, &lab.state, Duration::from_secs(30))?;
    let mut rows = Vec::new();
    for (label, timers) in [
        ("keepalive 3 s, hold 9 s", None),
        ("keepalive 1 s, hold 3 s", Some((1u16, 3u16))),
    ] {
        if let Some((keepalive, hold)) = timers {
            malla_lab::topology::update_cluster_config(&lab.paths, &lab.state, |c| {
                if let Some(b) = c.bgp.as_mut() {
                    b.keepalive_secs = keepalive;
                    b.hold_time_secs = Some(hold);
                }
            })?;
            malla_lab::bgp::wait_sessions(&lab.paths, &lab.state, Duration::from_secs(60))?;
        }
        let mut samples = Vec::new();
        for run in 0..args.failure_runs {
            check(deadline)?;
            let t0 = Instant::now();
            ip_in(&victim.netns, "link set ul0 down")?;
            let mut gone: Vec<Option<Duration>> = vec![None; others.len()];
            while gone.iter().any(Option::is_none) {
                for (i, ns) in others.iter().enumerate() {
                    if gone[i].is_none() && !routed(ns, &block) {
                        gone[i] = Some(t0.elapsed());
                    }
                }
                if t0.elapsed() > Duration::from_secs(60) {
                    bail!("{block} still routed 60 s after node-2 failed");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let all = gone.iter().flatten().max().copied().unwrap_or_default();
            if args.verbose {
                eprintln!(
                    "  {label} run {run}: {:?}",
                    gone.iter().flatten().map(|d| ms(*d)).collect::<Vec<_>>()
                );
            }
            samples.push(all);
            ip_in(&victim.netns, "link set ul0 up")?;
            ip_in(
                &victim.netns,
                &format!("route replace default via {gateway}"),
            )?;
            malla_lab::bgp::wait_sessions(&lab.paths, &lab.state, Duration::from_secs(60))?;
            malla_lab::bgp::wait_routes(&lab.paths, &lab.state, Duration::from_secs(60))?;
        }
        rows.push((label, samples));
    }
    // Graceful restart: node-2's BIRD killed; its block must stay everywhere.
    let pidfile = malla_lab::bgp::node_bird_dir(&lab.paths, &victim.name).join("bird.pid");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .context("node-2's BIRD pid")?
        .trim()
        .parse()
        .context("node-2's BIRD pid")?;
    let t0 = Instant::now();
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -9 {pid} failed");
    }
    let mut missing = 0usize;
    let mut checks = 0usize;
    let back = loop {
        checks += 1;
        missing += others.iter().filter(|ns| !routed(ns, &block)).count();
        let up = malla_lab::bgp::sessions(&lab.paths, &lab.state)
            .map(|s| s.iter().all(|s| s.established))
            .unwrap_or(false);
        if up && t0.elapsed() > Duration::from_secs(1) {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("node-2's sessions not back 60 s after its BIRD was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!("\nnode-2 fails (ul0 down): its block gone from every other node's and the router's ({kind}) kernel ({} runs each; ms)\n", args.failure_runs);
    println!("{:<26} {:>10} {:>10} {:>10}", "timers", "p50", "min", "max");
    for (label, samples) in &rows {
        println!(
            "{:<26} {:>10} {:>10} {:>10}",
            label,
            ms(percentile(samples, 50.0)),
            ms(samples.iter().min().copied().unwrap_or_default()),
            ms(samples.iter().max().copied().unwrap_or_default())
        );
    }
    println!(
        "\nnode-2's BIRD killed (SIGKILL; graceful restart): block missing in {missing} of {} checks on the {} other speakers; sessions back after {} ms",
        checks * others.len(),
        others.len(),
        ms(back)
    );
    Ok(())
}

/// Kills a BIRD started for the memory part (by its pid file) when dropped.
struct BirdGuard(std::path::PathBuf);

impl Drop for BirdGuard {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// Starts BIRD in `ns` with `conf`; the guard stops it.
fn start_bird(
    ns: &str,
    dir: &std::path::Path,
    name: &str,
    conf: &str,
) -> anyhow::Result<BirdGuard> {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let pidfile = dir.join(format!("{name}.pid"));
    let guard = BirdGuard(pidfile.clone());
    let st = Command::new("ip")
        .args(["netns", "exec", ns, "/usr/sbin/bird", "-c"])
        .arg(&path)
        .arg("-s")
        .arg(dir.join(format!("{name}.ctl")))
        .arg("-P")
        .arg(&pidfile)
        .status()
        .context("starting bird")?;
    if !st.success() {
        bail!("bird {name} did not start (see {})", path.display());
    }
    Ok(guard)
}

const MEM_PEERS: usize = 100;
const MEM_ROUTES: usize = 10_000;

/// The node speaker's memory with 100 established peers and 10 000 routes.
fn memory(deadline: Instant) -> anyhow::Result<()> {
    let mut spaces = malla_bench::Namespaces::default();
    let node_ns = spaces.create("bgpmem-node")?;
    let peers_ns = spaces.create("bgpmem-peers")?;
    ip_in(
        &peers_ns,
        &format!("link add v1 type veth peer name v0 netns {node_ns}"),
    )?;
    ip_in(&node_ns, "addr add 198.19.250.1/24 dev v0")?;
    ip_in(&node_ns, "link set v0 up")?;
    ip_in(&node_ns, "link set lo up")?;
    for i in 0..MEM_PEERS {
        ip_in(
            &peers_ns,
            &format!("addr add 198.19.250.{}/24 dev v1", 10 + i),
        )?;
    }
    ip_in(&peers_ns, "link set v1 up")?;
    ip_in(&peers_ns, "link set lo up")?;
    let dir = malla_bench::temp_dir("bgpmem")?;
    // The peers: 100 BIRDs (BIRD 2.0 keeps one listening socket and one session per
    // neighbour address in a process, so one process per peer address, bound to it), each an
    // eBGP peer in AS 65001 announcing 100 of the 10 000 /29s of 198.18.0.0/15.
    let per = MEM_ROUTES / MEM_PEERS;
    let mut peer_configs = Vec::new();
    for i in 0..MEM_PEERS {
        let a = 10 + i;
        let mut c = format!(
            "router id 198.19.250.{a};\nprotocol device {{}}\nprotocol static announced {{\n  ipv4;\n"
        );
        for j in 0..per {
            let n = (i * per + j) as u32;
            let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) + n * 8;
            c.push_str(&format!(
                "  route {}/29 blackhole;\n",
                std::net::Ipv4Addr::from(base)
            ));
        }
        c.push_str(&format!(
            "}}\nprotocol bgp to_node {{\n  local 198.19.250.{a} as 65001;\n  strict bind on;\n  neighbor 198.19.250.1 as 64512;\n  ipv4 {{ import none; export where proto = \"announced\"; next hop self; }};\n}}\n"
        ));
        peer_configs.push(c);
    }
    // The node: Malla's rendered speaker configuration with those 100 peers.
    let bgp = malla_api::BgpConfig {
        peers: (0..MEM_PEERS)
            .map(|i| malla_api::BgpPeer {
                peer_ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                    198,
                    19,
                    250,
                    10 + i as u8,
                ))),
                as_number: Some(65001),
                ..Default::default()
            })
            .collect(),
        node_to_node_mesh: false,
        ..malla_api::BgpConfig::default()
    };
    let config = malla_api::ClusterConfig {
        routing: RoutingMode::Bgp,
        bgp: Some(bgp),
        ..malla_api::ClusterConfig::default()
    };
    let node = malla_api::Node {
        name: "node-1".into(),
        underlay_ipv4: Some("198.19.250.1".parse()?),
        underlay_ipv6: None,
        underlay_mtu: 1500,
        vtep_mac: String::new(),
    };
    let speaker = malla_bgp::NodeSpeaker::new(
        "node-1",
        &config,
        &[node],
        &["198.19.128.0/26".parse()?],
        &[],
    )?;
    let _node_bird = start_bird(&node_ns, dir.path(), "node", &speaker.render())?;
    let _peer_birds = peer_configs
        .iter()
        .enumerate()
        .map(|(i, c)| start_bird(&peers_ns, dir.path(), &format!("peer{i}"), c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let birdc = std::path::Path::new("/usr/sbin/birdc");
    let sock = dir.path().join("node.ctl");
    let t0 = Instant::now();
    let routes = loop {
        check(deadline)?;
        let protocols = malla_bgp::speaker::protocols(birdc, &sock)?;
        let up = protocols.iter().filter(|p| p.established()).count();
        let received: u64 = protocols.iter().map(|p| p.received()).sum();
        let kernel = Command::new("ip")
            .args(["-n", &node_ns, "route", "show", "proto", "bird"])
            .output()?
            .stdout
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        if up == MEM_PEERS && received as usize >= MEM_ROUTES && kernel > MEM_ROUTES {
            break kernel;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("after 120 s: {up} of {MEM_PEERS} sessions up, {received} routes received, {kernel} in the kernel");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let settle = t0.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let pid = std::fs::read_to_string(dir.path().join("node.pid"))?
        .trim()
        .to_string();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.trim_start_matches("VmRSS:").trim().to_string())
        .unwrap_or_default();
    let mem = malla_bgp::speaker::birdc(birdc, &sock, &["show", "memory"])?;
    println!(
        "\nnode speaker (BIRD, Malla's configuration) with {MEM_PEERS} established eBGP peers and {MEM_ROUTES} routes learned ({routes} kernel routes; all up after {} ms)\nRSS: {rss}\n{}",
        ms(settle),
        mem.trim()
    );
    Ok(())
}
