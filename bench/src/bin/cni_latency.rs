//! `cni-latency`: pod ADD and DEL latency (p50/p99 over N pods) of Malla's CNI plugin against
//! the reference `bridge` + `host-local` plugins (and that chain with `portmap`), all driven by
//! the lab's libcni-like runtime, in the same run.
//!
//! Malla runs in a one-node lab; the reference plugins run with a "host" namespace this
//! benchmark creates, never in the machine's own namespace. Only the CNI call is timed: the pod
//! namespace is created before ADD and deleted after DEL.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::RoutingMode;
use malla_bench::{
    check, default_bin, ensure_prefix_unused, install_signal_handlers, ms, percentile, ratio,
    require_file, Lab, Namespaces,
};
use malla_dataplane::netns::NETNS_DIR;
use malla_lab::cni_exec::{Attachment, Runtime};
use malla_lab::runtime::node_runtime;
use malla_lab::topology::UpOptions;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(about = "CNI ADD/DEL latency: Malla vs the reference bridge+host-local plugins")]
struct Args {
    /// Pods per variant (all are added, then all are deleted).
    #[arg(long, short = 'n', default_value_t = 200)]
    pods: usize,
    /// The `malla` binary (agent); default: next to this executable.
    #[arg(long)]
    malla_bin: Option<PathBuf>,
    /// The `malla-cni` binary; default: next to this executable.
    #[arg(long)]
    cni_bin: Option<PathBuf>,
    /// Where the reference plugins live.
    #[arg(long, default_value = "/usr/lib/cni")]
    ref_cni_path: PathBuf,
    /// Skip the bridge+host-local+portmap variant.
    #[arg(long)]
    no_portmap: bool,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
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
    install_signal_handlers();
    ensure_prefix_unused()?;
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let malla_bin = args
        .malla_bin
        .clone()
        .unwrap_or_else(|| default_bin("malla"));
    let cni_bin = args
        .cni_bin
        .clone()
        .unwrap_or_else(|| default_bin("malla-cni"));
    require_file(&malla_bin, "build it: cargo build --release -p malla")?;
    require_file(&cni_bin, "build it: cargo build --release -p malla-cni")?;
    for p in ["bridge", "host-local", "portmap"] {
        require_file(
            &args.ref_cni_path.join(p),
            "install containernetworking-plugins",
        )?;
    }

    let mut results = Vec::new();
    results.push(malla(&args, &malla_bin, &cni_bin, deadline)?);
    results.push(reference(&args, false, deadline)?);
    if !args.no_portmap {
        results.push(reference(&args, true, deadline)?);
    }
    report(&results, args.pods);
    Ok(())
}

fn malla(
    args: &Args,
    malla_bin: &std::path::Path,
    cni_bin: &std::path::Path,
    deadline: Instant,
) -> anyhow::Result<Samples> {
    eprintln!("malla: bringing up a 1-node lab");
    let lab = Lab::up(
        "lat",
        &UpOptions {
            nodes: 1,
            routing: RoutingMode::Direct,
            ipv6: false,
            malla_bin: malla_bin.to_path_buf(),
            cni_bin: cni_bin.to_path_buf(),
            datastore: Default::default(),
        },
    )?;
    let node = lab.state.nodes[0].name.clone();
    let rt = node_runtime(&lab.paths, &lab.state, &node)?;
    let mut s = run_pods(&rt, "malla", args.pods, deadline)?;
    s.exec_floor = exec_floor(&rt)?;
    drop(lab);
    Ok(s)
}

fn reference(args: &Args, portmap: bool, deadline: Instant) -> anyhow::Result<Samples> {
    let tag = if portmap { "refpm" } else { "ref" };
    let dir = tempfile::Builder::new()
        .prefix("malla-bench-")
        .tempdir()
        .context("creating a temp dir")?;
    let mut nss = Namespaces::default();
    let host = nss.create(&format!("{tag}-host"))?;
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "198.18.128.0/17"}]],
            "dataDir": dir.path().join("ipam"),
        }
    })];
    if portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    let conflist = json!({"cniVersion": "1.0.0", "name": "ref", "plugins": plugins});
    let path = dir.path().join("10-ref.conflist");
    std::fs::write(&path, serde_json::to_vec_pretty(&conflist)?)?;
    let rt = Runtime::load(&path, &args.ref_cni_path, Some(host))?;
    let name = if portmap {
        "bridge+host-local+portmap"
    } else {
        "bridge+host-local"
    };
    eprintln!("{name}: plugins run in their own host namespace");
    let mut s = run_pods(&rt, tag, args.pods, deadline)?;
    s.name = name.into();
    s.exec_floor = exec_floor(&rt)?;
    drop(nss);
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
            let x = ratio(malla.p(add, p).as_secs_f64(), r.p(add, p).as_secs_f64());
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
        if p99_ok(true) { "yes" } else { "NO" },
        ms(malla.p(true, 99.0)),
        if p99_ok(false) { "yes" } else { "NO" },
        ms(malla.p(false, 99.0)),
    );
}
