//! `guard-bench`: what issue 14's protections cost ("nothing measurable", ratio ≥ 0.98) —
//! pod↔pod TCP throughput (iperf3) and connection setup latency (TCP connect, SYN to SYN-ACK)
//! with them on and off, in the same 2-node lab, alternating on/off for `--rounds` rounds so
//! drift on a busy machine falls on both alike. `--protections anti-spoofing` toggles the
//! cluster config's `antiSpoofing` alone; `all` (the default) toggles, together, anti-spoofing,
//! the endpoint-to-host action `Drop`, and host endpoints on every node (`*`) under a deny-all
//! global policy plus a pre-DNAT NodePort guard (so every host endpoint chain is in place).
//!
//! `--ipv6` measures over IPv6 in a dual-stack lab: there the nft guard chain checks every packet
//! (no kernel reverse-path filter for IPv6), where an IPv4-only lab's veths are checked by the
//! kernel's strict `rp_filter` ([`malla_calc::guard`]).
//!
//! Pods `a` and `b` on node-1, `c` on node-2 (`--routing direct`). Throughput: the median of the
//! iperf3 runs of a mode (a→b same node, a→c across nodes). Latency: p50 and p99 over every
//! connect of a mode (`--connections` per round and path). Ratios are on/off for throughput
//! and off/on for latency: **1.0 means anti-spoofing costs nothing**, below 0.98 misses the
//! target.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{
    begin, check, connect_times as connects, first_ipv4, listen, median_f64, per_round_ratios,
    percentile, ratio, secs, us, yes, BinArgs, Iperf, Lab,
};

#[derive(Parser, Debug)]
#[command(
    name = "guard-bench",
    version,
    about = "pod-to-pod throughput and connect latency with anti-spoofing on and off"
)]
struct Args {
    /// On/off rounds (each mode once per round, order alternating).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// TCP connects per round and path.
    #[arg(long, default_value_t = 500)]
    connections: usize,
    #[command(flatten)]
    bins: BinArgs,
    /// What is switched on and off: `anti-spoofing`, or `all` of issue 14's protections.
    #[arg(long, default_value = "all", value_parser = ["anti-spoofing", "all"])]
    protections: String,
    /// A dual-stack lab, measured over the pods' IPv6 addresses.
    #[arg(long)]
    ipv6: bool,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

/// Host endpoints on both nodes, a deny-all host policy and a pre-DNAT NodePort guard.
const HOST_ENDPOINTS: &str = r#"
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: node-1-all, labels: {role: node}}
spec: {node: node-1, interfaceName: "*"}
---
apiVersion: projectcalico.org/v3
kind: HostEndpoint
metadata: {name: node-2-all, labels: {role: node}}
spec: {node: node-2, interfaceName: "*"}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-all-hosts}
spec: {selector: "role == 'node'", types: [Ingress, Egress]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: nodeport-guard}
spec:
  selector: has(role)
  preDNAT: true
  applyOnForward: true
  ingress:
  - {action: Allow, protocol: TCP, source: {nets: [198.19.1.2/32]}, destination: {ports: ["30000:32767"]}}
  - {action: Deny, protocol: TCP, destination: {ports: ["30000:32767"]}}
"#;

/// The port the connect-latency listener uses in the server pods.
const CONNECT_PORT: u16 = 9300;

#[derive(Default)]
struct Mode {
    same_bps: Vec<f64>,
    cross_bps: Vec<f64>,
    same_connect: Vec<Duration>,
    cross_connect: Vec<Duration>,
    /// Each round's p50 connect time (same node, cross node).
    same_p50: Vec<Duration>,
    cross_p50: Vec<Duration>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=30).contains(&args.rounds)
        || !(1..=60).contains(&args.seconds)
        || !(10..=100_000).contains(&args.connections)
    {
        bail!("--rounds must be in 1..=30, --seconds in 1..=60, --connections in 10..=100000");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let mut opts = bins.up_options(2, RoutingMode::Direct);
    opts.ipv6 = args.ipv6;
    let lab = Lab::abc("guard", &opts)?;
    let addr = |name: &str| -> anyhow::Result<IpAddr> {
        let p = lab.pod(name)?;
        let found = match args.ipv6 {
            true => p.ips.iter().copied().find(IpAddr::is_ipv6),
            false => first_ipv4(&p.ips).map(IpAddr::V4),
        };
        found.with_context(|| format!("pod {name} has no address of the family measured"))
    };
    let (a, b, c) = (lab.pod("a")?, lab.pod("b")?, lab.pod("c")?);
    let (b_ip, c_ip) = (addr("b")?, addr("c")?);
    for (ns, ip) in [(&b.netns, b_ip), (&c.netns, c_ip)] {
        listen(ns, SocketAddr::new(ip, CONNECT_PORT))?;
    }

    let mut on = Mode::default();
    let mut off = Mode::default();
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for guard in order {
            check(deadline)?;
            eprintln!(
                "round {}: {} {}",
                round + 1,
                args.protections,
                if guard { "on" } else { "off" }
            );
            let all = args.protections == "all";
            if all {
                let objects = malla_lab::manifest::parse(HOST_ENDPOINTS)
                    .map_err(|e| anyhow::anyhow!("host endpoints: {e}"))?;
                if guard {
                    malla_lab::runtime::apply(&lab.paths, &bins.malla, &objects)?;
                } else {
                    malla_lab::runtime::delete(&lab.paths, &objects)?;
                }
            }
            malla_lab::topology::update_cluster_config(&lab.paths, &lab.state, |cfg| {
                cfg.anti_spoofing = guard;
                if all {
                    cfg.default_endpoint_to_host_action = if guard {
                        malla_api::EndpointToHostAction::Drop
                    } else {
                        malla_api::EndpointToHostAction::Accept
                    };
                }
            })?;
            let m = if guard { &mut on } else { &mut off };
            for (server, ip, out) in [
                (&b.netns, b_ip, &mut m.same_bps),
                (&c.netns, c_ip, &mut m.cross_bps),
            ] {
                let run = Iperf {
                    seconds: args.seconds,
                    streams: 1,
                    repeat: 1,
                    client_ns: &a.netns,
                    server_ns: server,
                    addr: ip,
                    deadline,
                };
                let bps = run.one_run()?;
                eprintln!("  {} -> {ip}: {:.2} Gbit/s", a.netns, bps / 1e9);
                out.push(bps);
            }
            let target = |ip| SocketAddr::new(ip, CONNECT_PORT);
            let same = connects(&a.netns, target(b_ip), args.connections)?;
            let cross = connects(&a.netns, target(c_ip), args.connections)?;
            m.same_p50.push(percentile(&same, 50.0));
            m.cross_p50.push(percentile(&cross, 50.0));
            m.same_connect.extend(same);
            m.cross_connect.extend(cross);
        }
    }

    let median = median_f64;
    println!();
    println!(
        "{} on vs off, {}, {} round(s); iperf3 {} s x 1 stream (median), {} connects per round and path",
        if args.protections == "all" {
            "anti-spoofing + endpoint-to-host Drop + host endpoints (deny-all, pre-DNAT)"
        } else {
            "anti-spoofing"
        },
        if args.ipv6 {
            "IPv6 (dual-stack lab)"
        } else {
            "IPv4"
        },
        args.rounds,
        args.seconds,
        args.connections
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>8} {:>4}",
        "case", "on", "off", "ratio", "paired", ">=0.98"
    );
    // `paired`: the median of the rounds' own on/off ratios (each round measured both settings
    // back to back, so its ratio is free of slow drift); the verdict column reads it.
    let row = |name: &str, on_v: String, off_v: String, r: f64, paired: f64| {
        println!(
            "{:<34} {:>10} {:>10} {:>8.3} {:>8.3} {:>4}",
            name,
            on_v,
            off_v,
            r,
            paired,
            yes(paired >= 0.98)
        );
    };
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
        );
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
        let paired = median(&per_round_ratios(
            &format!("{name} p50"),
            "off/on",
            &secs(f50),
            &secs(o50),
        ));
        for p in [50.0, 99.0] {
            let (po, pf) = (percentile(o, p), percentile(f, p));
            let r = ratio(pf.as_secs_f64(), po.as_secs_f64());
            // p99 has no per-round pairing worth the name: its own ratio is shown twice.
            row(
                &format!("{name} p{p:.0} (µs)"),
                us(po),
                us(pf),
                r,
                if p == 50.0 { paired } else { r },
            );
        }
    }
    Ok(())
}
