//! `throughput`: iperf3 TCP throughput between pods of a Malla lab — same node, across nodes
//! with `direct` routing, across nodes with `vxlan` — against a raw veth pair between two
//! namespaces, measured in the same run.
//!
//! The server runs `iperf3 -s -1` in one namespace and the client `iperf3 -c <ip> -J` in the
//! other (both through `ip netns exec`); the figure is `end.sum_received.bits_per_second`, the
//! median over `--repeat` runs.

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{begin, first_ipv4, ratio, yes, BinArgs, Iperf, Lab, Namespaces};

#[derive(Parser, Debug)]
#[command(
    name = "throughput",
    version,
    about = "pod-to-pod TCP throughput (iperf3) against a raw veth pair"
)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Runs per case; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Parallel streams (`iperf3 -P`).
    #[arg(long, default_value_t = 1)]
    streams: u32,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

struct Case {
    name: &'static str,
    target: Option<f64>,
    bps: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=60).contains(&args.seconds) || !(1..=10).contains(&args.repeat) {
        bail!("--seconds must be in 1..=60 and --repeat in 1..=10");
    }
    if !(1..=16).contains(&args.streams) {
        bail!("--streams must be in 1..=16");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let opts = |routing| bins.up_options(2, routing);

    let mut cases = Vec::new();
    cases.push(Case {
        name: "raw veth (baseline)",
        target: None,
        bps: raw_veth(&args, deadline)?,
    });
    {
        let lab = Lab::abc("direct", &opts(RoutingMode::Direct))?;
        cases.push(Case {
            name: "pod-pod same node",
            target: Some(0.95),
            bps: between(&args, &lab, "a", "b", deadline)?,
        });
        cases.push(Case {
            name: "pod-pod cross node direct",
            target: Some(0.90),
            bps: between(&args, &lab, "a", "c", deadline)?,
        });
    }
    {
        let lab = Lab::abc("vxlan", &opts(RoutingMode::Vxlan))?;
        cases.push(Case {
            name: "pod-pod cross node vxlan",
            target: Some(0.80),
            bps: between(&args, &lab, "a", "c", deadline)?,
        });
    }

    let base = cases[0].bps;
    println!();
    println!(
        "iperf3 TCP, {} s x {} stream(s), median of {} run(s)",
        args.seconds, args.streams, args.repeat
    );
    println!(
        "{:<27} {:>8} {:>9} {:>8} {:>4}",
        "case", "Gbit/s", "ratio", "target", "met"
    );
    for c in &cases {
        let r = ratio(c.bps, base);
        let (target, met) = match c.target {
            Some(t) => (format!(">= {t:.2}"), yes(r >= t)),
            None => ("-".to_string(), ""),
        };
        println!(
            "{:<27} {:>8.2} {:>9.3} {:>8} {:>4}",
            c.name,
            c.bps / 1e9,
            r,
            target,
            met
        );
    }
    Ok(())
}

/// Two namespaces joined by a veth pair, 198.19.254.1/30 and .2/30.
fn raw_veth(args: &Args, deadline: Instant) -> anyhow::Result<f64> {
    eprintln!("raw veth: two namespaces and a veth pair");
    let mut nss = Namespaces::default();
    let a = nss.create("veth-a")?;
    let b = nss.create("veth-b")?;
    let ip = |ns: &str, cmd: &str| -> anyhow::Result<()> {
        let mut v = vec!["-n", ns];
        v.extend(cmd.split_whitespace());
        malla_dataplane::netns::run_ip(&v).map_err(Into::into)
    };
    ip(
        &a,
        &format!("link add veth0 type veth peer name veth1 netns {b}"),
    )?;
    ip(&a, "addr add 198.19.254.1/30 dev veth0")?;
    ip(&b, "addr add 198.19.254.2/30 dev veth1")?;
    ip(&a, "link set veth0 up")?;
    ip(&b, "link set veth1 up")?;
    let bps = Iperf {
        seconds: args.seconds,
        streams: args.streams,
        repeat: args.repeat,
        client_ns: &a,
        server_ns: &b,
        addr: "198.19.254.2".parse()?,
        deadline,
    }
    .median()?;
    drop(nss);
    Ok(bps)
}

/// Throughput from pod `client` to pod `server` of `lab`.
fn between(
    args: &Args,
    lab: &Lab,
    client: &str,
    server: &str,
    deadline: Instant,
) -> anyhow::Result<f64> {
    let (c, s) = (lab.pod(client)?, lab.pod(server)?);
    let addr = first_ipv4(&s.ips)
        .map(IpAddr::V4)
        .with_context(|| format!("pod {server} has no IPv4 address"))?;
    eprintln!(
        "{}: {client} ({}) -> {server} ({}, {addr})",
        lab.paths.name, c.node, s.node
    );
    Iperf {
        seconds: args.seconds,
        streams: args.streams,
        repeat: args.repeat,
        client_ns: &c.netns,
        server_ns: &s.netns,
        addr,
        deadline,
    }
    .median()
}
