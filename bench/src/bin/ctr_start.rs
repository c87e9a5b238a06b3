//! `ctr-start`: start latency of a real container runtime on Malla's CNI plugin against the
//! reference `bridge` + `host-local` plugins (and that chain with `portmap`), in the same run.
//!
//! Each variant gets its own containerd (`malla_test_kit::runtimes::Containerd`: private config,
//! state, `/run` and CNI bind mounts) running in a network namespace: Malla's in the node of a
//! one-node lab, the reference plugins' in a "host" namespace this benchmark creates, never in
//! the machine's own namespace. A sample is the time from spawning
//! `ctr run --cni --rm IMAGE ID sh -c 'ip -4 -o addr show dev eth0; exec sleep N'` until the
//! line with eth0's `inet` address arrives on ctr's stdout: ctr has created the task, run the
//! CNI ADD against its namespace, started it, and the container's first process has seen its
//! address. Stop is `ctr task kill -s SIGKILL` until `ctr run` exits (task delete, CNI DEL,
//! container and snapshot removal). The same runs without `--cni` (the container only has `lo`)
//! give the no-CNI floor of each variant.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_bench::{
    begin, check, ms, percentile, ratio_d, require_file, Bins, CompareArgs, Reference,
};
use malla_test_kit::runtimes::{self, Containerd};

#[derive(Parser, Debug)]
#[command(
    name = "ctr-start",
    version,
    about = "ctr run --cni start latency: Malla vs the reference bridge+host-local plugins"
)]
struct Args {
    /// Timed containers per variant (all are started, then all are stopped).
    #[arg(long, short = 'n', default_value_t = 20)]
    containers: usize,
    /// Untimed containers started and stopped first in each variant (cold caches).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// How long each container sleeps after printing its address (it is killed before).
    #[arg(long, default_value_t = 600)]
    sleep: u64,
    #[command(flatten)]
    common: CompareArgs,
}

/// Latencies of one variant.
struct Samples {
    name: String,
    start: Vec<Duration>,
    stop: Vec<Duration>,
    /// The same container without `--cni`.
    floor_start: Vec<Duration>,
    floor_stop: Vec<Duration>,
}

impl Samples {
    fn p(v: &[Duration], p: f64) -> Duration {
        percentile(v, p)
    }
    /// What the CNI adds to the p50 start: start p50 minus the no-CNI p50.
    fn cni_share(&self) -> Duration {
        Self::p(&self.start, 50.0).saturating_sub(Self::p(&self.floor_start, 50.0))
    }
}

/// How long one container may take to start or stop.
const STEP: Duration = Duration::from_secs(60);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.containers == 0 || args.containers > 200 {
        bail!("--containers: {} is outside 1..=200", args.containers);
    }
    if args.warmup > 10 {
        bail!("--warmup: {} is above 10", args.warmup);
    }
    malla_test_kit::lab::require_root();
    let deadline = begin(args.common.max_seconds)?;
    for tool in ["containerd", "ctr", "runc", "unshare", "tar", "sha256sum"] {
        if !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(tool).is_file())
        {
            bail!("{tool} not found (Debian packages containerd, runc, busybox-static)");
        }
    }
    require_file(Path::new("/bin/busybox"), "install busybox-static")?;
    let results = args.common.compare(
        |bins| malla(&args, bins, deadline),
        |portmap| reference(&args, portmap, deadline),
    )?;
    report(&results, args.containers);
    Ok(())
}

fn malla(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Samples> {
    let lab = bins.one_node_lab("malla", "ctr")?;
    let node = &lab.state.nodes[0];
    // The node's conflist as the runtime tests use it: cniVersion 1.0.0 (Debian 12's
    // containerd stops there), network name `malla`.
    let conf = runtimes::runtime_conflist(&lab.paths.conflist(&node.name), "malla");
    eprintln!("malla: containerd in {}", node.netns);
    let mut ctd = Containerd::start(&node.netns, &conf, &lab.paths.cni_bin_dir(), "bench-malla");
    let s = measure(&mut ctd, "malla", "malla", args, deadline, |a| {
        a.octets()[..2] == [198, 18]
    });
    // containerd goes before the lab that holds its namespace.
    drop(ctd);
    drop(lab);
    s
}

fn reference(args: &Args, portmap: bool, deadline: Instant) -> anyhow::Result<Samples> {
    let r = Reference::new(portmap)?;
    let (tag, name) = (r.tag, r.name);
    eprintln!("{name}: containerd in {}", r.host);
    let conf = r.conflist(tag);
    let mut ctd = Containerd::start(
        &r.host,
        &conf,
        &args.common.ref_cni_path,
        &format!("bench-{tag}"),
    );
    let s = measure(&mut ctd, tag, name, args, deadline, |a| {
        a.octets()[..2] == [198, 18] && a.octets()[2] >= 128
    });
    drop(ctd);
    drop(r);
    s
}

/// Warm-up, then `n` containers with `--cni` and `n` without, alternating, started one after
/// another and stopped in start order.
fn measure(
    ctd: &mut Containerd,
    tag: &str,
    name: &str,
    args: &Args,
    deadline: Instant,
    in_range: impl Fn(Ipv4Addr) -> bool,
) -> anyhow::Result<Samples> {
    ctd.import_busybox();
    let n = args.containers;
    let eth0 = |a: Ipv4Addr| in_range(a);
    let lo = |a: Ipv4Addr| a == Ipv4Addr::LOCALHOST;
    for i in 0..args.warmup {
        let id = format!("{tag}-w{i}");
        start(ctd, &id, true, args.sleep, &eth0)?;
        stop(ctd, &id)?;
    }
    let mut s = Samples {
        name: name.into(),
        start: Vec::new(),
        stop: Vec::new(),
        floor_start: Vec::new(),
        floor_stop: Vec::new(),
    };
    // With and without CNI alternate, so drift in the machine's load hits both alike.
    let mut ids = Vec::new();
    for i in 0..n {
        for cni in [true, false] {
            check(deadline)?;
            let id = format!("{tag}-{}{i}", if cni { "c" } else { "f" });
            if cni {
                s.start.push(start(ctd, &id, true, args.sleep, &eth0)?);
            } else {
                s.floor_start.push(start(ctd, &id, false, args.sleep, &lo)?);
            }
            ids.push((id, cni));
        }
    }
    for (id, cni) in &ids {
        check(deadline)?;
        let t = stop(ctd, id)?;
        if *cni { &mut s.stop } else { &mut s.floor_stop }.push(t);
    }
    for (what, v) in [("with --cni", &s.start), ("without CNI", &s.floor_start)] {
        let (slowest, t) = v
            .iter()
            .enumerate()
            .max_by_key(|(_, t)| **t)
            .map(|(i, t)| (i, *t))
            .unwrap_or_default();
        eprintln!(
            "{name}: {n} containers {what} started and stopped (slowest start: #{slowest}, {} ms)",
            ms(t)
        );
    }
    Ok(s)
}

/// Spawns `ctr run [--cni] --rm` of container `id` and returns the time until its
/// `ip -4 -o addr show` line (eth0 with CNI, lo without) reaches our end of ctr's stdout.
fn start(
    ctd: &mut Containerd,
    id: &str,
    cni: bool,
    sleep: u64,
    in_range: &dyn Fn(Ipv4Addr) -> bool,
) -> anyhow::Result<Duration> {
    let dev = if cni { "eth0" } else { "lo" };
    let script = format!("ip -4 -o addr show dev {dev}; exec sleep {sleep}");
    let log = ctd.dir().join(format!("ctr-run-{id}.log"));
    // Our stdio goes through FIFOs that ctr makes and containerd opens: in containerd's temp
    // dir, since each has a private /run.
    let fifo = ctd.dir().join("fifo");
    let fifo = fifo.to_str().context("utf8 temp dir")?;
    let mut cmd = ctd.run_command(id, cni, &["--fifo-dir", fifo], &["sh", "-c", &script]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).context("ctr log")?);
    let t0 = Instant::now();
    let child = ctd
        .spawn(id, &mut cmd)
        .with_context(|| format!("spawning ctr run {id}"))?;
    let stdout = child.stdout.take().context("ctr stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = t0 + STEP;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((at, line)) => {
                if let Some(a) = runtimes::eth0_ipv4(&line) {
                    if !in_range(a) {
                        bail!("{id}: {dev} has {a}, not from the variant's range: {line}");
                    }
                    return Ok(at - t0);
                }
                seen.push(line);
            }
            Err(e) => {
                let status = ctd.child(id).and_then(|c: &mut Child| c.try_wait().ok());
                bail!(
                    "{id}: no address line from ctr run ({e}; exit {status:?}; stdout {seen:?}): {}",
                    runtimes::log_of(&log)
                );
            }
        }
    }
}

/// `ctr task kill -s SIGKILL` of `id`, then waits for its `ctr run --rm` to exit (which runs
/// the CNI DEL and removes the container); returns the time from before the kill to the exit.
fn stop(ctd: &mut Containerd, id: &str) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let kill = ctd.kill_task(id);
    if !kill.ok {
        bail!("ctr task kill {id}: {}", kill.text());
    }
    let deadline = t0 + STEP;
    let child = ctd.child(id).context("no ctr run")?;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            bail!("ctr run {id} still running {STEP:?} after the kill");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = t0.elapsed();
    if status.code() != Some(137) {
        let log = runtimes::log_of(&ctd.dir().join(format!("ctr-run-{id}.log")));
        bail!("ctr run {id} ended with {status}, not the task's SIGKILL (137): {log}");
    }
    ctd.forget(id);
    Ok(took)
}

fn report(results: &[Samples], n: usize) {
    let p = Samples::p;
    println!();
    println!(
        "ctr run --cni start latency, {n} containers per variant (ms; start: spawn of ctr run until \
         eth0's address is printed inside; stop: task kill until ctr run --rm exits)"
    );
    println!(
        "{:<27} {:>10} {:>10} {:>9} {:>9} {:>11} {:>10} {:>10}",
        "variant",
        "start p50",
        "start p99",
        "stop p50",
        "stop p99",
        "noCNI start",
        "noCNI stop",
        "CNI share"
    );
    for s in results {
        println!(
            "{:<27} {:>10} {:>10} {:>9} {:>9} {:>11} {:>10} {:>10}",
            s.name,
            ms(p(&s.start, 50.0)),
            ms(p(&s.start, 99.0)),
            ms(p(&s.stop, 50.0)),
            ms(p(&s.stop, 99.0)),
            ms(p(&s.floor_start, 50.0)),
            ms(p(&s.floor_stop, 50.0)),
            ms(s.cni_share()),
        );
    }
    let malla = &results[0];
    println!();
    println!("ratio Malla / reference (below 1: Malla is faster)");
    println!(
        "{:<27} {:>10} {:>10} {:>9} {:>9} {:>10}",
        "reference", "start p50", "start p99", "stop p50", "stop p99", "CNI share"
    );
    let r2 = |a: Duration, b: Duration| format!("{:.2}", ratio_d(a, b));
    for r in &results[1..] {
        println!(
            "{:<27} {:>10} {:>10} {:>9} {:>9} {:>10}",
            r.name,
            r2(p(&malla.start, 50.0), p(&r.start, 50.0)),
            r2(p(&malla.start, 99.0), p(&r.start, 99.0)),
            r2(p(&malla.stop, 50.0), p(&r.stop, 50.0)),
            r2(p(&malla.stop, 99.0), p(&r.stop, 99.0)),
            r2(malla.cni_share(), r.cni_share()),
        );
    }
    println!(
        "(noCNI: the same ctr run without --cni in the same containerd, p50; CNI share: start p50 \
         minus noCNI start p50)"
    );
}
