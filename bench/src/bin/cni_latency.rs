//! `cni-latency`: pod ADD and DEL latency (p50/p99 over N pods) of Malla's CNI plugin against
//! the reference `bridge` + `host-local` plugins (and that chain with `portmap`), all driven by
//! the lab's libcni-like runtime, in the same run.
//!
//! Malla runs in a one-node lab; the reference plugins run with a "host" namespace this
//! benchmark creates, never in the machine's own namespace. Only the CNI call is timed: the pod
//! namespace is created before ADD and deleted after DEL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_bench::{
    begin, check, ms, percentile, ratio_d, yes, Bins, CompareArgs, Namespaces, Reference,
};
use malla_dataplane::netns::NETNS_DIR;
use malla_lab::cni_exec::{Attachment, Runtime};
use malla_lab::runtime::node_runtime;
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    name = "cni-latency",
    version,
    about = "CNI ADD/DEL latency: Malla vs the reference bridge+host-local plugins"
)]
struct Args {
    /// Pods per variant (all are added, then all are deleted).
    #[arg(long, short = 'n', default_value_t = 200)]
    pods: usize,
    #[command(flatten)]
    common: CompareArgs,
}

/// Latencies of one variant.
struct Samples {
    name: String,
    add: Vec<Duration>,
    del: Vec<Duration>,
    /// Spawning the plugin(s) with `CNI_COMMAND=VERSION`: the process-start floor.
    exec_floor: Duration,
}

impl Samples {
    fn p(&self, add: bool, p: f64) -> Duration {
        percentile(if add { &self.add } else { &self.del }, p)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.pods == 0 || args.pods > 2000 {
        bail!("--pods: {} is outside 1..=2000", args.pods);
    }
    let deadline = begin(args.common.max_seconds)?;
    let results = args.common.compare(
        |bins| malla(&args, bins, deadline),
        |portmap| reference(&args, portmap, deadline),
    )?;
    report(&results, args.pods);
    Ok(())
}

fn malla(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Samples> {
    let lab = bins.one_node_lab("malla", "lat")?;
    let node = lab.state.nodes[0].name.clone();
    let rt = node_runtime(&lab.paths, &lab.state, &node)?;
    let mut s = run_pods(&rt, "malla", args.pods, deadline)?;
    s.exec_floor = exec_floor(&rt)?;
    drop(lab);
    Ok(s)
}

fn reference(args: &Args, portmap: bool, deadline: Instant) -> anyhow::Result<Samples> {
    let r = Reference::new(portmap)?;
    let path = r.dir.path().join("10-ref.conflist");
    std::fs::write(&path, serde_json::to_vec_pretty(&r.conflist("ref"))?)?;
    let rt = Runtime::load(&path, &args.common.ref_cni_path, Some(r.host.clone()))?;
    eprintln!("{}: plugins run in their own host namespace", r.name);
    let mut s = run_pods(&rt, r.tag, args.pods, deadline)?;
    s.name = r.name.into();
    s.exec_floor = exec_floor(&rt)?;
    drop(r);
    Ok(s)
}

/// ADDs `n` pods one after another (each in a fresh namespace), then DELs them all.
fn run_pods(rt: &Runtime, tag: &str, n: usize, deadline: Instant) -> anyhow::Result<Samples> {
    let mut nss = Namespaces::default();
    let mut pods: Vec<(Attachment, Value, String)> = Vec::with_capacity(n);
    let mut add = Vec::with_capacity(n);
    let mut del = Vec::with_capacity(n);
    for i in 0..n {
        check(deadline)?;
        let ns = nss.create(&format!("{tag}-p{i}"))?;
        let att = Attachment {
            container_id: format!("{:016x}{:016x}", std::process::id(), i),
            netns_path: format!("{NETNS_DIR}/{ns}"),
            ifname: "eth0".into(),
            pod_namespace: "bench".into(),
            pod_name: format!("{tag}-{i}"),
        };
        let t = Instant::now();
        let result = rt
            .add(&att)
            .with_context(|| format!("{tag}: ADD of pod {i}"))?;
        add.push(t.elapsed());
        pods.push((att, result, ns));
        if (i + 1) % 50 == 0 {
            eprintln!("{tag}: {} pods added", i + 1);
        }
    }
    for (i, (att, result, ns)) in pods.iter().enumerate() {
        check(deadline)?;
        let t = Instant::now();
        rt.del(att, Some(result))
            .with_context(|| format!("{tag}: DEL of pod {i}"))?;
        del.push(t.elapsed());
        nss.delete(ns)?;
    }
    Ok(Samples {
        name: tag.into(),
        add,
        del,
        exec_floor: Duration::ZERO,
    })
}

/// p50 over 20 runs of spawning every plugin of the chain with `CNI_COMMAND=VERSION`: what
/// ADD costs before a plugin does any work.
fn exec_floor(rt: &Runtime) -> anyhow::Result<Duration> {
    let kinds: Vec<String> = rt.conflist["plugins"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["type"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let mut samples = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        for k in &kinds {
            let out = Command::new(rt.cni_path.join(k))
                .env_clear()
                .env("CNI_COMMAND", "VERSION")
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {k} VERSION"))?;
            if !out.status.success() {
                bail!("{k} VERSION failed");
            }
        }
        samples.push(t.elapsed());
    }
    Ok(percentile(&samples, 50.0))
}

fn report(results: &[Samples], n: usize) {
    println!();
    println!("CNI latency, {n} pods per variant (ms; ADD and DEL through the whole chain)");
    println!(
        "{:<27} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "variant", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "exec floor"
    );
    for s in results {
        println!(
            "{:<27} {:>9} {:>9} {:>9} {:>9} {:>11}",
            s.name,
            ms(s.p(true, 50.0)),
            ms(s.p(true, 99.0)),
            ms(s.p(false, 50.0)),
            ms(s.p(false, 99.0)),
            ms(s.exec_floor)
        );
    }
    let malla = &results[0];
    println!();
    println!("ratio Malla / reference (target: <= 0.50; and Malla ADD/DEL p99 < 10 ms)");
    println!(
        "{:<27} {:>9} {:>9} {:>9} {:>9}",
        "reference", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for r in &results[1..] {
        let cell = |add: bool, p: f64| {
            let x = ratio_d(malla.p(add, p), r.p(add, p));
            format!("{x:.2}{}", if x <= 0.5 { "" } else { "!" })
        };
        println!(
            "{:<27} {:>9} {:>9} {:>9} {:>9}",
            r.name,
            cell(true, 50.0),
            cell(true, 99.0),
            cell(false, 50.0),
            cell(false, 99.0)
        );
    }
    let p99_ok = |add: bool| malla.p(add, 99.0) < Duration::from_millis(10);
    println!(
        "Malla p99 < 10 ms: ADD {} ({} ms), DEL {} ({} ms)   ('!' marks a ratio above 0.50)",
        yes(p99_ok(true)),
        ms(malla.p(true, 99.0)),
        yes(p99_ok(false)),
        ms(malla.p(false, 99.0)),
    );
}
