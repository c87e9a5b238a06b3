//! `flows-bench`: what flow logging costs (issue 16: pod↔pod throughput on/off ≥ 0.97,
//! connection setup p50 on/off ≤ 1.05, agent CPU per 1000 new connections a second, agent RSS).
//!
//! One 2-node lab (`--routing direct`): pods `a` and `b` on node-1, `c` on node-2, and a
//! NetworkPolicy selecting `b` and `c` that allows `a`, so every connection takes an allowing
//! rule's log statement and a conntrack NEW and DESTROY. Flow logging is switched by restarting
//! both agents (a restart adopts the kernel's state: the ruleset, routes and pods stay the
//! same) with or without `--no-flow-logs`, and conntrack accounting off in the nodes for "off"
//! (the agent turns it on when it collects). The same pods, veths and chains are measured in
//! both settings, so only flow logging differs. `--rounds` rounds alternate the order; in each,
//! per setting: one iperf3 run a→b and a→c, then `--connections` sequential TCP connects a→b
//! and a→c (each timed from `connect` to established), with the agents' CPU time taken over
//! the connects (after a pause that lets them read the round's events). Ratios: on/off
//! (**1.0 means flow logging costs nothing**); `paired` is the median of the rounds' own ratios.
//! Each "on" setting must have recorded the connections (node-1's
//! `malla_flows_total{verdict="allowed"}`) and each "off" one none.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{
    begin, check, connect_times as connects, cpu_time, first_ipv4, listen, median_f64, mib,
    per_round_ratios, percentile, ratio, secs, status_kib, stop_and_wait, us, BinArgs, Bins, Iperf,
    Lab,
};
use malla_dataplane::netns::NetNs;

#[derive(Parser, Debug)]
#[command(
    name = "flows-bench",
    version,
    about = "pod-to-pod throughput, connection setup and agent CPU with flow logging on and off"
)]
struct Args {
    /// Rounds (each setting once per round, order alternating).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Seconds per iperf3 run (0: no throughput runs).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// TCP connects per round, setting and path.
    #[arg(long, default_value_t = 3000)]
    connections: usize,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 1200)]
    max_seconds: u64,
}

/// The policy that puts an allowing rule (and its log statement) on every connection's path.
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bc-from-a, namespace: default}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [b, c]}]}
  ingress:
  - from: [{podSelector: {matchLabels: {app: a}}}]
"#;

/// The connect listener's port in `b` and `c`.
const CONNECT_PORT: u16 = 9300;

/// One setting's figures over the rounds.
#[derive(Default)]
struct Side {
    same_bps: Vec<f64>,
    cross_bps: Vec<f64>,
    same_connect: Vec<Duration>,
    cross_connect: Vec<Duration>,
    same_p50: Vec<Duration>,
    cross_p50: Vec<Duration>,
    /// Agents' CPU time over the connects (node-1 + node-2).
    cpu: Duration,
    conns: usize,
    /// The agents' VmRSS (KiB) at the end of the last round.
    rss_kib: Vec<u64>,
}

/// The lab, ready to measure.
struct Setup {
    lab: Lab,
    a_ns: String,
    b_ns: String,
    c_ns: String,
    b: IpAddr,
    c: IpAddr,
}

fn setup(bins: &Bins) -> anyhow::Result<Setup> {
    let opts = bins.up_options(2, RoutingMode::Direct);
    eprintln!("flows: bringing up a 2-node lab");
    let mut lab = Lab::up("flows", &opts)?;
    let mut text = String::new();
    for (pod, node) in [("a", "node-1"), ("b", "node-1"), ("c", "node-2")] {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: default\n  \
             labels: {{app: {pod}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: bench\n"
        ));
    }
    text.push_str("---\n");
    text.push_str(POLICY);
    lab.apply_pods(&opts.malla_bin, &text)?;
    let ip = |name: &str| -> anyhow::Result<IpAddr> {
        first_ipv4(&lab.pod(name)?.ips)
            .map(IpAddr::V4)
            .with_context(|| format!("pod {name} has no IPv4 address"))
    };
    let (b, c) = (ip("b")?, ip("c")?);
    let s = Setup {
        a_ns: lab.pod("a")?.netns.clone(),
        b_ns: lab.pod("b")?.netns.clone(),
        c_ns: lab.pod("c")?.netns.clone(),
        b,
        c,
        lab,
    };
    for (ns, ip) in [(&s.b_ns, b), (&s.c_ns, c)] {
        listen(ns, SocketAddr::new(ip, CONNECT_PORT))?;
    }
    Ok(s)
}

/// Restarts both agents with flow logging `on` or off (conntrack accounting follows), waits
/// until they have applied their first sync, and until `a` reaches `b` and `c` again.
fn switch(s: &mut Setup, bins: &Bins, on: bool) -> anyhow::Result<()> {
    for i in 0..s.lab.state.nodes.len() {
        let node = s.lab.state.nodes[i].clone();
        if let Some(pid) = node.agent_pid {
            stop_and_wait(pid)?;
        }
        if !on {
            let ok = std::process::Command::new("ip")
                .args(["netns", "exec", &node.netns, "sysctl", "-qw"])
                .arg("net.netfilter.nf_conntrack_acct=0")
                .status()?
                .success();
            if !ok {
                bail!("turning conntrack accounting off in {}", node.netns);
            }
        }
        let extra: &[&str] = if on { &[] } else { &["--no-flow-logs"] };
        let pid = malla_lab::topology::start_agent_with(
            &s.lab.paths,
            &bins.malla,
            &node,
            s.lab.state.datastore,
            extra,
        )?;
        s.lab.state.nodes[i].agent_pid = Some(pid);
        s.lab.state.save(&s.lab.paths)?;
    }
    malla_lab::topology::wait_converged(&s.lab.paths, &s.lab.state, Duration::from_secs(60))
        .context("waiting for the restarted agents")?;
    for to in [s.b, s.c] {
        connects(&s.a_ns, SocketAddr::new(to, CONNECT_PORT), 20)
            .with_context(|| format!("a does not reach {to} after the restart"))?;
    }
    Ok(())
}

/// `GET path` from the agent's HTTP server in `netns` (127.0.0.1:9099).
fn agent_get(netns: &str, path: &str) -> anyhow::Result<String> {
    let ns = NetNs::open_named(netns)?;
    let path = path.to_string();
    std::thread::spawn(move || -> anyhow::Result<String> {
        ns.enter_this_thread()?;
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9099)),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut body = String::new();
        s.take(16 << 20).read_to_string(&mut body)?;
        Ok(body)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the HTTP thread panicked"))?
}

/// The node's `malla_flows_total{verdict="allowed"}` (0 when the series is absent).
fn allowed_flows(netns: &str) -> anyhow::Result<f64> {
    let text = agent_get(netns, "/metrics")?;
    Ok(text
        .lines()
        .find_map(|l| {
            l.strip_prefix("malla_flows_total{verdict=\"allowed\"} ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=20).contains(&args.rounds)
        || args.seconds > 60
        || !(10..=100_000).contains(&args.connections)
    {
        bail!("--rounds must be in 1..=20, --seconds in 0..=60, --connections in 10..=100000");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let mut s = setup(&bins)?;
    let node1_ns = s.lab.state.nodes[0].netns.clone();
    let mut sides = [Side::default(), Side::default()];
    let mut recorded = Vec::new();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            check(deadline)?;
            let on = i == 0;
            eprintln!("round {}: flow logging {}", round + 1, ["on", "off"][i]);
            switch(&mut s, &bins, on)?;
            let before = allowed_flows(&node1_ns)?;
            let side = &mut sides[i];
            if args.seconds > 0 {
                for (server, ip, out) in [
                    (&s.b_ns, s.b, &mut side.same_bps),
                    (&s.c_ns, s.c, &mut side.cross_bps),
                ] {
                    let bps = Iperf {
                        seconds: args.seconds,
                        streams: 1,
                        repeat: 1,
                        client_ns: &s.a_ns,
                        server_ns: server,
                        addr: ip,
                        deadline,
                    }
                    .one_run()?;
                    eprintln!("  a -> {ip}: {:.2} Gbit/s", bps / 1e9);
                    out.push(bps);
                }
            }
            let agents: Vec<u32> = s
                .lab
                .state
                .nodes
                .iter()
                .filter_map(|n| n.agent_pid)
                .collect();
            let cpu0: Duration = agents.iter().map(|p| cpu_time(*p)).sum();
            let same = connects(
                &s.a_ns,
                SocketAddr::new(s.b, CONNECT_PORT),
                args.connections,
            )?;
            let cross = connects(
                &s.a_ns,
                SocketAddr::new(s.c, CONNECT_PORT),
                args.connections,
            )?;
            // The round's events (DESTROY as the sockets close): let the agents read them.
            std::thread::sleep(Duration::from_millis(1500));
            let cpu1: Duration = agents.iter().map(|p| cpu_time(*p)).sum();
            side.cpu += cpu1.saturating_sub(cpu0);
            side.conns += 2 * args.connections;
            side.rss_kib = agents
                .iter()
                .map(|p| status_kib(*p, "VmRSS").ok().flatten().unwrap_or(0))
                .collect();
            // Node-1 sees both paths start (a is its pod).
            let seen = allowed_flows(&node1_ns)? - before;
            let want = (2 * args.connections) as f64;
            if (on && seen < 0.9 * want) || (!on && seen != 0.0) {
                bail!(
                    "flow logging {}: node-1 counted {seen} allowed connections of {want}",
                    ["on", "off"][i]
                );
            }
            if on {
                recorded.push(seen);
            }
            side.same_p50.push(percentile(&same, 50.0));
            side.cross_p50.push(percentile(&cross, 50.0));
            eprintln!(
                "  connect p50 same {} µs, cross {} µs",
                us(percentile(&same, 50.0)),
                us(percentile(&cross, 50.0))
            );
            side.same_connect.extend(same);
            side.cross_connect.extend(cross);
        }
    }
    report(&args, &sides, &recorded);
    drop(s);
    Ok(())
}

fn report(args: &Args, sides: &[Side; 2], recorded: &[f64]) {
    let median = median_f64;
    let [on, off] = sides;
    println!();
    println!(
        "flow logging on vs off (the same lab, agents restarted), {} round(s); iperf3 {} s x 1 \
         stream, {} connects per round and path; node-1 recorded {:.0} allowed connections per \
         'on' round (median)",
        args.rounds,
        args.seconds,
        args.connections,
        median(recorded)
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>8} {:>7}",
        "case", "on", "off", "ratio", "paired", "target"
    );
    let row = |name: &str, on_v: String, off_v: String, r: f64, paired: f64, target: &str| {
        println!("{name:<34} {on_v:>10} {off_v:>10} {r:>8.3} {paired:>8.3} {target:>7}");
    };
    if args.seconds > 0 {
        for (name, o, f) in [
            ("throughput same node (Gbit/s)", &on.same_bps, &off.same_bps),
            (
                "throughput cross node (Gbit/s)",
                &on.cross_bps,
                &off.cross_bps,
            ),
        ] {
            let pairs = per_round_ratios(name, "on/off", o, f);
            let (om, fm) = (median(o), median(f));
            row(
                name,
                format!("{:.2}", om / 1e9),
                format!("{:.2}", fm / 1e9),
                ratio(om, fm),
                median(&pairs),
                ">=0.97",
            );
        }
    }
    for (name, o, f, o50, f50) in [
        (
            "connect same node",
            &on.same_connect,
            &off.same_connect,
            &on.same_p50,
            &off.same_p50,
        ),
        (
            "connect cross node",
            &on.cross_connect,
            &off.cross_connect,
            &on.cross_p50,
            &off.cross_p50,
        ),
    ] {
        // on/off, as the issue states it (≤ 1.05).
        let pairs = per_round_ratios(&format!("{name} p50"), "on/off", &secs(o50), &secs(f50));
        for p in [50.0, 99.0] {
            let (po, pf) = (percentile(o, p), percentile(f, p));
            let r = ratio(po.as_secs_f64(), pf.as_secs_f64());
            row(
                &format!("{name} p{p:.0} (µs, on/off)"),
                us(po),
                us(pf),
                r,
                if p == 50.0 { median(&pairs) } else { r },
                if p == 50.0 { "<=1.05" } else { "" },
            );
        }
    }
    let per_1000 = |s: &Side| s.cpu.as_secs_f64() * 1000.0 / s.conns.max(1) as f64;
    println!(
        "agents' CPU per 1000 connections (both nodes): on {:.4} CPU s, off {:.4} CPU s \
         (1000 new connections a second cost {:.1}% of a core with flow logging, {:.1}% without)",
        per_1000(on),
        per_1000(off),
        per_1000(on) * 100.0,
        per_1000(off) * 100.0
    );
    for (name, side) in [("on", on), ("off", off)] {
        let rss: Vec<String> = side
            .rss_kib
            .iter()
            .map(|k| format!("{:.1} MiB", mib(*k)))
            .collect();
        println!(
            "agent VmRSS after a round, flow logging {name}: {} (node-1, node-2)",
            rss.join(", ")
        );
    }
}
