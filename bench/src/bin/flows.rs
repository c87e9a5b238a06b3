//! `flows-bench`: what flow logging costs (issue 16: pod↔pod throughput on/off ≥ 0.97,
//! connection setup p50 on/off ≤ 1.05, agent CPU per 1000 new connections a second, agent RSS).
//!
//! Two 2-node labs side by side (`--routing direct`), identical but for flow collection: the
//! first's agents collect flows, the second's run with `MALLA_NO_FLOW_LOGS=true` (no NFLOG
//! listener, no conntrack events or accounting; the ruleset is the same). In each, pods `a` and
//! `b` on node-1 and `c` on node-2, and a NetworkPolicy selecting `b` and `c` that allows `a`, so
//! every connection takes an allowing rule's log statement and a conntrack NEW and DESTROY.
//! `--rounds` rounds alternate the labs' order; in each, per lab: one iperf3 run a→b and a→c,
//! then `--connections` sequential TCP connects a→b and a→c (each timed from `connect` to
//! established), with the agents' CPU time taken over the connects (after a pause that lets
//! them read the round's events). Ratios: on/off for throughput, off/on for connection setup
//! (**1.0 means flow logging costs nothing**); `paired` is the median of the rounds' own ratios.
//! Before its figures the bench checks that the "on" lab recorded the connections (the node's
//! `malla_flows_total{verdict="allowed"}`) and the "off" lab recorded none.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{
    begin, check, connect_times as connects, cpu_time, first_ipv4, listen, mib, percentile, ratio,
    status_kib, us, BinArgs, Iperf, Lab,
};
use malla_dataplane::netns::NetNs;

#[derive(Parser, Debug)]
#[command(
    name = "flows-bench",
    version,
    about = "pod-to-pod throughput, connection setup and agent CPU with flow logging on and off"
)]
struct Args {
    /// Rounds (each lab once per round, order alternating).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// Seconds per iperf3 run (0: no throughput runs).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// TCP connects per round, lab and path.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Turn conntrack accounting on in the "off" lab's nodes too (it is what gives flows
    /// their byte counts): the comparison then isolates the rest of flow logging's cost.
    #[arg(long)]
    off_lab_accounting: bool,
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

/// One lab's figures over the rounds.
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
}

/// A lab of the comparison, ready to measure.
struct Setup {
    /// Torn down when the setup is dropped.
    _lab: Lab,
    a_ns: String,
    b_ns: String,
    c_ns: String,
    b: IpAddr,
    c: IpAddr,
    agents: Vec<u32>,
    node1_ns: String,
}

fn setup(what: &str, flows: bool, bins: &malla_bench::Bins) -> anyhow::Result<Setup> {
    let opts = bins.up_options(2, RoutingMode::Direct);
    // The agents are children of this process: they read the switch from the environment
    // (`malla agent --no-flow-logs`). Set only while this lab comes up, before any thread.
    if flows {
        std::env::remove_var("MALLA_NO_FLOW_LOGS");
    } else {
        std::env::set_var("MALLA_NO_FLOW_LOGS", "true");
    }
    eprintln!("{what}: bringing up a 2-node lab");
    let lab = Lab::up(what, &opts);
    std::env::remove_var("MALLA_NO_FLOW_LOGS");
    let mut lab = lab?;
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
    let agents: Vec<u32> = lab.state.nodes.iter().filter_map(|n| n.agent_pid).collect();
    if agents.len() != 2 {
        bail!("{what}: expected two agents, the lab state names {agents:?}");
    }
    let s = Setup {
        a_ns: lab.pod("a")?.netns.clone(),
        b_ns: lab.pod("b")?.netns.clone(),
        c_ns: lab.pod("c")?.netns.clone(),
        node1_ns: lab.state.nodes[0].netns.clone(),
        b,
        c,
        agents,
        _lab: lab,
    };
    for (ns, ip) in [(&s.b_ns, b), (&s.c_ns, c)] {
        listen(ns, SocketAddr::new(ip, CONNECT_PORT))?;
    }
    // Until the policy is in place (its rules are what logs), a reaches both.
    for to in [b, c] {
        connects(&s.a_ns, SocketAddr::new(to, CONNECT_PORT), 10)
            .with_context(|| format!("{what}: a never reached {to}"))?;
    }
    Ok(s)
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
    let labs = [
        setup("flows-on", true, &bins)?,
        setup("flows-off", false, &bins)?,
    ];
    let before = [
        allowed_flows(&labs[0].node1_ns)?,
        allowed_flows(&labs[1].node1_ns)?,
    ];
    let mut sides = [Side::default(), Side::default()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            check(deadline)?;
            let s = &labs[i];
            let side = &mut sides[i];
            eprintln!("round {}: flow logging {}", round + 1, ["on", "off"][i]);
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
            let cpu0: Duration = s.agents.iter().map(|p| cpu_time(*p)).sum();
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
            // The round's DESTROY events come as the sockets close: let the agents read them.
            std::thread::sleep(Duration::from_millis(1500));
            let cpu1: Duration = s.agents.iter().map(|p| cpu_time(*p)).sum();
            side.cpu += cpu1.saturating_sub(cpu0);
            side.conns += 2 * args.connections;
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
    // The comparison is only one if the "on" lab saw the connections and the "off" lab none.
    let seen = [
        allowed_flows(&labs[0].node1_ns)? - before[0],
        allowed_flows(&labs[1].node1_ns)? - before[1],
    ];
    let same_conns = (args.rounds * args.connections) as f64;
    if seen[0] < 0.9 * same_conns || seen[1] != 0.0 {
        bail!(
            "flow logging did not see what it should: node-1 counted {} allowed flows with \
             logging on (of {same_conns} same-node connections) and {} with it off",
            seen[0],
            seen[1]
        );
    }

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let [on, off] = &sides;
    println!();
    println!(
        "flow logging on vs off, {} round(s); iperf3 {} s x 1 stream, {} connects per round \
         and path; node-1 of the 'on' lab recorded {} allowed connections",
        args.rounds, args.seconds, args.connections, seen[0]
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
            let pairs: Vec<f64> = o.iter().zip(f).map(|(a, b)| ratio(*a, *b)).collect();
            let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.3}")).collect();
            eprintln!("{name}: on/off per round {}", shown.join(" "));
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
        let pairs: Vec<f64> = o50
            .iter()
            .zip(f50)
            .map(|(a, b)| ratio(a.as_secs_f64(), b.as_secs_f64()))
            .collect();
        let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.3}")).collect();
        eprintln!("{name} p50: on/off per round {}", shown.join(" "));
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
         (so 1000 new connections a second cost {:.1}% of a core with flow logging, {:.1}% without)",
        per_1000(on),
        per_1000(off),
        per_1000(on) * 100.0,
        per_1000(off) * 100.0
    );
    for (i, s) in labs.iter().enumerate() {
        let rss: Vec<String> = s
            .agents
            .iter()
            .map(|p| {
                let kib = status_kib(*p, "VmRSS").ok().flatten().unwrap_or(0);
                format!("{:.1} MiB", mib(kib))
            })
            .collect();
        println!(
            "agent VmRSS, flow logging {}: {} (node-1, node-2)",
            ["on", "off"][i],
            rss.join(", ")
        );
    }
    drop(labs);
    Ok(())
}
