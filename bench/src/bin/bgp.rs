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
    let deadline = begin(args.max_seconds)?;
    let kinds = match args.router {
        Some(k) => vec![k],
        None => vec![RouterKind::Frr, RouterKind::Bird],
    };
    let mut rows = Vec::new();
    for kind in kinds {
        let f = run(&args, kind, deadline)?;
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
