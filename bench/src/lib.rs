//! Shared pieces of Malla's benchmarks: guards that delete every namespace and lab they made
//! (also on error, panic or Ctrl-C), percentiles and report cells, child processes with a
//! deadline, the `malla` and `malla-cni` binaries (arguments, defaults, lab options), the
//! reference CNI chain, TCP connection latency from a namespace, the agent's `/proc` figures,
//! and a loopback etcd ([`etcd`]).
//!
//! Every namespace a benchmark creates is named `malla-bench-<pid>-...` and is deleted by that
//! exact name; labs are named `bench-<pid>-...`, so their namespaces share the prefix.

pub mod etcd;

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use malla_api::{IpPool, RoutingMode};
use malla_dataplane::netns::{self, NetNs};
use malla_dataplane::nft;
use malla_lab::state::PodState;
use malla_lab::topology::{self, UpOptions};
use malla_lab::{manifest, runtime, LabPaths, LabState};
use serde_json::{json, Value};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag the benchmark loops check, so a stopped run still
/// unwinds through its guards and leaves nothing behind.
pub fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as libc::sighandler_t);
    }
}

/// Fails once the run was interrupted or ran past `deadline`.
pub fn check(deadline: Instant) -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    if Instant::now() > deadline {
        bail!("time budget exhausted (raise --max-seconds)");
    }
    Ok(())
}

/// The common start of a run: signal handlers, the namespace prefix check, and the deadline
/// `max_seconds` from now.
pub fn begin(max_seconds: u64) -> anyhow::Result<Instant> {
    install_signal_handlers();
    ensure_prefix_unused()?;
    Ok(Instant::now() + Duration::from_secs(max_seconds))
}

/// Runs part `run` of a benchmark unless `skip`.
pub fn unless<T>(skip: bool, run: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<Option<T>> {
    (!skip).then(run).transpose()
}

/// The prefix of every namespace this process creates.
pub fn ns_prefix() -> String {
    format!("malla-bench-{}-", std::process::id())
}

/// The name of a lab owned by this process (its namespaces are `malla-bench-<pid>-<what>-...`).
pub fn lab_name(what: &str) -> String {
    format!("bench-{}-{what}", std::process::id())
}

/// Refuses to start when namespaces with our prefix already exist (a recycled pid): we only
/// ever delete what we created.
pub fn ensure_prefix_unused() -> anyhow::Result<()> {
    let prefix = ns_prefix();
    let stale: Vec<String> = netns::list_named()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    if !stale.is_empty() {
        bail!(
            "namespaces with our prefix {prefix} already exist ({}); not touching them",
            stale.join(", ")
        );
    }
    Ok(())
}

/// Named namespaces this process created; whatever is still listed when dropped is deleted.
#[derive(Default)]
pub struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    /// Creates `malla-bench-<pid>-<suffix>` (it must not exist yet) and returns its name.
    pub fn create(&mut self, suffix: &str) -> anyhow::Result<String> {
        let name = format!("{}{suffix}", ns_prefix());
        if netns::exists(&name) {
            bail!("namespace {name} already exists");
        }
        // Recorded first, so a half-made namespace is still cleaned up.
        self.names.push(name.clone());
        netns::create(&name).with_context(|| format!("creating namespace {name}"))?;
        Ok(name)
    }

    /// Deletes one of ours by exact name.
    pub fn delete(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.names.iter().any(|n| n == name) {
            bail!("namespace {name} was not created by this run");
        }
        netns::delete(name).with_context(|| format!("deleting namespace {name}"))?;
        self.names.retain(|n| n != name);
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.names.drain(..).rev() {
            if let Err(e) = netns::delete(&name) {
                eprintln!("warning: deleting namespace {name}: {e}");
            }
        }
    }
}

/// A lab brought up for a benchmark in a private state directory; `topology::down` on drop.
pub struct Lab {
    pub paths: LabPaths,
    pub state: LabState,
    // Dropped after `down` has run (fields drop after `Drop::drop`).
    _root: tempfile::TempDir,
}

impl Lab {
    pub fn up(what: &str, opts: &UpOptions) -> anyhow::Result<Self> {
        let root = temp_dir("creating the lab's state root")?;
        let paths = LabPaths::new(&lab_name(what), Some(root.path()))?;
        // A guard without state yet, so a failing `up` is torn down too.
        let mut lab = Self {
            paths,
            state: placeholder_state(),
            _root: root,
        };
        lab.state = topology::up(&lab.paths, opts)
            .with_context(|| format!("bringing up lab {}", lab.paths.name))?;
        Ok(lab)
    }

    /// A two-node lab with pods `a` and `b` on node-1 and `c` on node-2 (no ports).
    pub fn abc(what: &str, opts: &UpOptions) -> anyhow::Result<Self> {
        eprintln!("{what}: bringing up a 2-node lab");
        let mut lab = Self::up(what, opts)?;
        let mut text = String::new();
        for (pod, node) in [("a", "node-1"), ("b", "node-1"), ("c", "node-2")] {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  namespace: default\n\
                 spec:\n  nodeName: {node}\n  containers:\n  - name: bench\n"
            ));
        }
        lab.apply_pods(&opts.malla_bin, &text)?;
        Ok(lab)
    }

    /// Re-reads the lab's state (after `runtime::apply`).
    pub fn reload(&mut self) -> anyhow::Result<()> {
        self.state = LabState::require(&self.paths)?;
        Ok(())
    }

    /// Creates the pods of manifest `text` through `malla_bin`, then re-reads the state.
    pub fn apply_pods(&mut self, malla_bin: &Path, text: &str) -> anyhow::Result<()> {
        let objects = manifest::parse(text).map_err(|e| anyhow!("manifest: {e}"))?;
        runtime::apply(&self.paths, malla_bin, &objects).context("creating the pods")?;
        self.reload()
    }

    /// Pod `default/<name>` of the lab's state.
    pub fn pod(&self, name: &str) -> anyhow::Result<&PodState> {
        self.state
            .pods
            .get(&format!("default/{name}"))
            .with_context(|| format!("pod {name} missing from the lab state"))
    }
}

/// The first IPv4 address of `ips`.
pub fn first_ipv4(ips: &[IpAddr]) -> Option<Ipv4Addr> {
    ips.iter().find_map(|a| match a {
        IpAddr::V4(v4) => Some(*v4),
        _ => None,
    })
}

fn placeholder_state() -> LabState {
    LabState::default()
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = topology::down(&self.paths) {
            eprintln!("warning: tearing down lab {}: {e:#}", self.paths.name);
        }
    }
}

/// The directory of the running benchmark binary (`target/release` or `target/debug`), where
/// cargo also puts `malla` and `malla-cni`.
pub fn default_bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}

/// Fails with a hint when a binary the benchmark needs is missing.
pub fn require_file(path: &Path, hint: &str) -> anyhow::Result<()> {
    if !path.is_file() {
        bail!("{} not found ({hint})", path.display());
    }
    Ok(())
}

/// `--malla-bin` and `--cni-bin`, flattened into every benchmark's arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct BinArgs {
    /// The `malla` binary (agent); default: next to this executable.
    #[arg(long)]
    pub malla_bin: Option<PathBuf>,
    /// The `malla-cni` binary; default: next to this executable.
    #[arg(long)]
    pub cni_bin: Option<PathBuf>,
}

impl BinArgs {
    /// [`Self::resolve`], failing when a binary is missing.
    pub fn required(&self) -> anyhow::Result<Bins> {
        let bins = self.resolve();
        bins.require()?;
        Ok(bins)
    }

    /// The binaries given, or the ones next to this executable.
    pub fn resolve(&self) -> Bins {
        Bins {
            malla: self
                .malla_bin
                .clone()
                .unwrap_or_else(|| default_bin("malla")),
            cni: self
                .cni_bin
                .clone()
                .unwrap_or_else(|| default_bin("malla-cni")),
        }
    }
}

/// The `malla` and `malla-cni` binaries a run uses.
pub struct Bins {
    pub malla: PathBuf,
    pub cni: PathBuf,
}

impl Bins {
    /// Fails with a build hint when either binary is missing.
    pub fn require(&self) -> anyhow::Result<()> {
        require_file(&self.malla, "build it: cargo build --release -p malla")?;
        require_file(&self.cni, "build it: cargo build --release -p malla-cni")
    }

    /// An IPv4 lab of `nodes` nodes on the default datastore, running these binaries.
    pub fn up_options(&self, nodes: usize, routing: RoutingMode) -> UpOptions {
        UpOptions {
            nodes,
            routing,
            ipv6: false,
            malla_bin: self.malla.clone(),
            cni_bin: self.cni.clone(),
            datastore: Default::default(),
            kubelet: false,
            images: Vec::new(),
            router: Default::default(),
            route_reflector: false,
        }
    }

    /// A one-node `direct` lab named after `what`, announced as `who: bringing up a 1-node lab`.
    pub fn one_node_lab(&self, who: &str, what: &str) -> anyhow::Result<Lab> {
        eprintln!("{who}: bringing up a 1-node lab");
        Lab::up(what, &self.up_options(1, RoutingMode::Direct))
    }
}

/// A temp dir of ours (`malla-bench-*`); `what` is the error's context.
pub fn temp_dir(what: &'static str) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("malla-bench-")
        .tempdir()
        .context(what)
}

/// The arguments of the benchmarks that compare Malla with the reference chain (after their
/// own): the binaries, `--ref-cni-path`, `--no-portmap` and `--max-seconds`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub bins: BinArgs,
    /// Where the reference plugins live.
    #[arg(long, default_value = "/usr/lib/cni")]
    pub ref_cni_path: PathBuf,
    /// Skip the bridge+host-local+portmap variant.
    #[arg(long)]
    pub no_portmap: bool,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub max_seconds: u64,
}

impl CompareArgs {
    /// Checks both binaries and the reference plugins, then measures Malla (`malla`) and each
    /// reference variant (`reference(portmap)`: without portmap, then with it unless
    /// `--no-portmap`), in that order.
    pub fn compare<S>(
        &self,
        malla: impl FnOnce(&Bins) -> anyhow::Result<S>,
        mut reference: impl FnMut(bool) -> anyhow::Result<S>,
    ) -> anyhow::Result<Vec<S>> {
        let bins = self.bins.required()?;
        for p in ["bridge", "host-local", "portmap"] {
            require_file(
                &self.ref_cni_path.join(p),
                "install containernetworking-plugins",
            )?;
        }
        let mut results = vec![malla(&bins)?];
        results.push(reference(false)?);
        if !self.no_portmap {
            results.push(reference(true)?);
        }
        Ok(results)
    }
}

/// One variant of the reference chain, `bridge` + `host-local` (+ `portmap`): its tag and
/// name, a "host" namespace of ours for the plugins, and a temp dir for host-local's state.
/// The namespace is deleted before the temp dir.
pub struct Reference {
    pub tag: &'static str,
    pub name: &'static str,
    pub host: String,
    pub nss: Namespaces,
    pub dir: tempfile::TempDir,
    portmap: bool,
}

impl Reference {
    pub fn new(portmap: bool) -> anyhow::Result<Self> {
        let tag = if portmap { "refpm" } else { "ref" };
        let name = if portmap {
            "bridge+host-local+portmap"
        } else {
            "bridge+host-local"
        };
        let dir = temp_dir("creating a temp dir")?;
        let mut nss = Namespaces::default();
        let host = nss.create(&format!("{tag}-host"))?;
        Ok(Self {
            tag,
            name,
            host,
            nss,
            dir,
            portmap,
        })
    }

    /// The chain as conflist `network`: a gateway bridge `cni0` with masquerade, host-local
    /// on 198.18.128.0/17 (state in the temp dir), then portmap for that variant.
    pub fn conflist(&self, network: &str) -> Value {
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "198.18.128.0/17"}]],
                "dataDir": self.dir.path().join("ipam"),
            }
        })];
        if self.portmap {
            plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
        }
        json!({"cniVersion": "1.0.0", "name": network, "plugins": plugins})
    }
}

/// A child process we started; killed (by its pid, through `Child::kill`) and reaped on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, killing it after `timeout`; stdout and stderr are captured.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?);
    let mut out = child.0.stdout.take().context("no stdout")?;
    let mut err = child.0.stderr.take().context("no stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline || INTERRUPTED.load(Ordering::SeqCst) {
            let _ = child.0.kill();
            let _ = child.0.wait();
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// The nearest-rank percentile (`p` in 0..=100) of unsorted samples.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// `a / b`, or NaN when `b` is zero.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::NAN
    } else {
        a / b
    }
}

/// [`ratio`] of two durations.
pub fn ratio_d(a: Duration, b: Duration) -> f64 {
    ratio(a.as_secs_f64(), b.as_secs_f64())
}

/// A "met" cell: `yes` or `NO`.
pub fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "NO"
    }
}

/// One change of a programming benchmark: rebuild, diff, apply, lines of the diff.
pub type ChangeTimes = (Duration, Duration, Duration, usize);

/// Changes summarised for a report: the medians of their rebuild, diff and apply times and of
/// their totals, the slowest total, and the median number of diff lines.
pub struct ChangeStats {
    pub rebuild: Duration,
    pub diff: Duration,
    pub apply: Duration,
    pub total: Duration,
    pub max_total: Duration,
    pub lines: usize,
}

impl ChangeStats {
    pub fn of(changes: impl IntoIterator<Item = ChangeTimes>) -> Self {
        let changes: Vec<ChangeTimes> = changes.into_iter().collect();
        let med = |f: fn(&ChangeTimes) -> Duration| {
            percentile(&changes.iter().map(f).collect::<Vec<_>>(), 50.0)
        };
        let totals: Vec<Duration> = changes.iter().map(|c| c.0 + c.1 + c.2).collect();
        let mut lines: Vec<usize> = changes.iter().map(|c| c.3).collect();
        lines.sort();
        Self {
            rebuild: med(|c| c.0),
            diff: med(|c| c.1),
            apply: med(|c| c.2),
            total: percentile(&totals, 50.0),
            max_total: percentile(&totals, 100.0),
            lines: lines.get(lines.len() / 2).copied().unwrap_or(0),
        }
    }

    /// The heads of the columns [`Self::cells`] fills.
    pub fn heads() -> String {
        format!(
            "{:>11} {:>8} {:>9} {:>9} {:>12} {:>6}",
            "rebuild ms", "diff ms", "apply ms", "total ms", "max total ms", "lines"
        )
    }

    pub fn cells(&self) -> String {
        format!(
            "{:>11} {:>8} {:>9} {:>9} {:>12} {:>6}",
            ms(self.rebuild),
            ms(self.diff),
            ms(self.apply),
            ms(self.total),
            ms(self.max_total),
            self.lines
        )
    }
}

/// The pool of the synthetic clusters: the lab's 198.18.0.0/16 in /26 blocks.
pub fn default_pool() -> anyhow::Result<IpPool> {
    Ok(IpPool {
        name: "default-ipv4".into(),
        cidr: "198.18.0.0/16".parse()?,
        block_size: 26,
        nat_outgoing: true,
        disabled: false,
    })
}

/// KiB as MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The floor of nft programming: one `nft -f -` of an empty table in a fresh namespace of ours
/// (`suffix`, deleted after), median of 5.
pub fn nft_floor(nss: &mut Namespaces, suffix: &str) -> anyhow::Result<Duration> {
    let floor_ns = nss.create(suffix)?;
    let h = NetNs::open_named(&floor_ns)?;
    let mut floors = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        nft::apply(
            Some(&h),
            "table ip malla_bench_floor\ndelete table ip malla_bench_floor\ntable ip malla_bench_floor {\n}\n",
        )?;
        floors.push(t.elapsed());
    }
    drop(h);
    nss.delete(&floor_ns)?;
    Ok(percentile(&floors, 50.0))
}

/// One connection: connect, read the first byte(s) of the probe server's answer.
fn one_connection(addr: SocketAddr, buf: &mut [u8]) -> anyhow::Result<(Duration, usize)> {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let n = s
        .read(buf)
        .with_context(|| format!("reading from {addr}"))?;
    let d = t.elapsed();
    if n == 0 {
        bail!("{addr} closed without answering");
    }
    Ok((d, n))
}

/// `count` sequential connections from inside `netns` to `addr`, after 50 warm-up ones; the
/// answer must come from `expect` (the probe server's name). Returns the latencies and the
/// time they took together.
pub fn measure_connections(
    netns: &str,
    addr: SocketAddr,
    expect: &str,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let ns = NetNs::open_named(netns)?;
    let expect = expect.to_string();
    let worker = std::thread::spawn(move || -> anyhow::Result<(Vec<Duration>, Duration)> {
        ns.enter_this_thread()?;
        let mut buf = [0u8; 256];
        for w in 0..50 {
            let (_, n) = one_connection(addr, &mut buf)?;
            if w == 0 {
                let answer = String::from_utf8_lossy(&buf[..n]);
                if !answer.starts_with(&expect) {
                    bail!("{addr} answered {answer:?}, expected {expect}");
                }
            }
        }
        let mut v = Vec::with_capacity(count);
        let start = Instant::now();
        for i in 0..count {
            if i % 100 == 0 {
                check(deadline)?;
            }
            v.push(one_connection(addr, &mut buf)?.0);
        }
        Ok((v, start.elapsed()))
    });
    worker
        .join()
        .map_err(|_| anyhow!("measuring thread panicked"))?
}

/// The median of `v` (the upper one of an even count); NaN when empty.
pub fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Each round's own ratio `top/bottom` of two settings measured back to back (free of slow
/// drift), printed to stderr as `{name}: {what} per round r1 r2 …`; their median is the
/// `paired` column of the A/B benches.
pub fn per_round_ratios(name: &str, what: &str, top: &[f64], bottom: &[f64]) -> Vec<f64> {
    let pairs: Vec<f64> = top.iter().zip(bottom).map(|(t, b)| ratio(*t, *b)).collect();
    let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.3}")).collect();
    eprintln!("{name}: {what} per round {}", shown.join(" "));
    pairs
}

/// Seconds of each duration, for [`per_round_ratios`].
pub fn secs(v: &[Duration]) -> Vec<f64> {
    v.iter().map(Duration::as_secs_f64).collect()
}

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// A listener on `addr` inside `netns` that accepts and closes connections until the process
/// ends (its thread is detached).
pub fn listen(netns: &str, addr: SocketAddr) -> anyhow::Result<()> {
    let ns = NetNs::open_named(netns)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let bound = ns
            .enter_this_thread()
            .map_err(anyhow::Error::from)
            .and_then(|()| pin_to_timing_cpu().context("pinning the listener"))
            .and_then(|()| std::net::TcpListener::bind(addr).map_err(anyhow::Error::from));
        match bound {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                for s in l.incoming() {
                    drop(s);
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(10))
        .context("the listener thread did not start")?
        .with_context(|| format!("listening on {addr} in {netns}"))
}

/// `n` TCP connects from inside `netns` to `to`, each timed from `connect` to established.
/// Each connection is then closed with a reset (`SO_LINGER` 0): a graceful close would leave the
/// client's port in TIME_WAIT for a minute, and once about half the ephemeral range is
/// (connect() tries even ports first), every connect() scans it: ~14k connects into a run, p50
/// jumped from ~30 µs to ~2 ms.
pub fn connect_times(netns: &str, to: SocketAddr, n: usize) -> anyhow::Result<Vec<Duration>> {
    let ns = NetNs::open_named(netns)?;
    std::thread::spawn(move || -> anyhow::Result<Vec<Duration>> {
        ns.enter_this_thread()?;
        pin_to_timing_cpu().context("pinning the connect thread")?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(2))
                .with_context(|| format!("connecting to {to}"))?;
            out.push(t.elapsed());
            reset_on_close(&s).context("setting SO_LINGER")?;
            drop(s);
        }
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow!("the connect thread panicked"))?
}

/// Pins the calling thread to the last CPU the process may use. [`listen`] and
/// [`connect_times`] both run there: with the listener and the client on one CPU a connect
/// took 16.4 µs ± 0.1 on the 2-CPU VM, on two CPUs 22 µs ± 0.7, and left to the scheduler a
/// round's median fell anywhere in 11–28 µs, which buried a 1 µs difference between settings.
pub fn pin_to_timing_cpu() -> std::io::Result<()> {
    // SAFETY: `set` is a plain bit set the calls below only read and write in place.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let Some(cpu) = (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|c| libc::CPU_ISSET(*c, &set))
        else {
            return Ok(());
        };
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Makes closing `s` send a reset instead of a FIN (no TIME_WAIT left behind).
fn reset_on_close(s: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Kills process `pid` (one of ours: a lab agent) and waits until it is gone.
pub fn stop_and_wait(pid: u32) -> anyhow::Result<()> {
    malla_lab::process::stop(pid);
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("pid {pid} still there 10 s after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// CPU time (user + system) process `pid` has used; zero when unreadable.
pub fn cpu_time(pid: u32) -> Duration {
    // Fields 14 and 15 (utime, stime) in clock ticks, after the parenthesised command.
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / hz)
}

/// Field `field` of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`); None when it is missing.
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<Option<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }))
}

/// Fails unless process `pid` is a `malla` (the agent).
pub fn require_agent(pid: u32) -> anyhow::Result<()> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "malla" {
        bail!("pid {pid} is {comm:?}, not the agent");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile(&s, 50.0), Duration::from_millis(100));
        assert_eq!(percentile(&s, 99.0), Duration::from_millis(198));
        assert_eq!(percentile(&s, 100.0), Duration::from_millis(200));
        assert_eq!(percentile(&s[..1], 99.0), Duration::from_millis(200));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }

    #[test]
    fn names_share_the_prefix() {
        let lab = LabPaths::new(&lab_name("vxlan"), None).unwrap();
        assert!(lab.prefix().starts_with(&ns_prefix()));
    }
}

/// iperf3 TCP throughput from `client_ns` to a one-off server (`iperf3 -s -1`) in `server_ns`
/// listening on `addr`: `end.sum_received.bits_per_second`.
#[derive(Clone, Copy)]
pub struct Iperf<'a> {
    pub seconds: u64,
    pub streams: u32,
    /// Runs for [`Iperf::median`].
    pub repeat: usize,
    pub client_ns: &'a str,
    pub server_ns: &'a str,
    pub addr: IpAddr,
    pub deadline: Instant,
}

impl Iperf<'_> {
    /// The median of `repeat` runs.
    pub fn median(self) -> anyhow::Result<f64> {
        let mut runs = Vec::new();
        for _ in 0..self.repeat.max(1) {
            check(self.deadline)?;
            runs.push(self.one_run()?);
        }
        runs.sort_by(f64::total_cmp);
        eprintln!(
            "  runs (Gbit/s): {}",
            runs.iter()
                .map(|b| format!("{:.2}", b / 1e9))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(runs[runs.len() / 2])
    }

    /// One run.
    pub fn one_run(self) -> anyhow::Result<f64> {
        let Self {
            seconds,
            streams,
            client_ns,
            server_ns,
            addr,
            deadline,
            ..
        } = self;
        let mut server = Command::new("ip");
        server
            .args(["netns", "exec", server_ns, "iperf3", "-s", "-1"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let _server = ChildGuard(server.spawn().context("spawning the iperf3 server")?);
        // The server needs a moment to listen: retry a refused connection, a bounded number of times.
        for attempt in 0..50 {
            check(deadline)?;
            let mut client = Command::new("ip");
            client.args(["netns", "exec", client_ns, "iperf3", "-c"]);
            client.arg(addr.to_string()).args([
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ]);
            let out = output_with_timeout(client, Duration::from_secs(seconds + 20))?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
                format!(
                    "iperf3 printed non-JSON: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
            if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
                if out.status.success() {
                    return Ok(bps);
                }
            }
            let err = v["error"].as_str().unwrap_or("no result").to_string();
            if !err.contains("refused") || attempt == 49 {
                bail!("iperf3 {client_ns} -> {addr}: {err}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("iperf3 server in {server_ns} never accepted a connection")
    }
}

/// Sends a plan the calculation made against `table` (`malla_calc::services::plan_service_changes`,
/// the policy node's plans) as the agent's driver does: element changes over `sock`, else the
/// plan's text through `nft` in `ns`. Returns the time since `started` (the plan), the send's
/// time, and the elements or text lines sent.
pub fn send_plan(
    plan: &malla_calc::services::EndpointPlan,
    table: &malla_calc::nft::Table,
    sock: &malla_dataplane::nft::elements::ElementSocket,
    ns: &NetNs,
    started: Instant,
) -> anyhow::Result<(Duration, Duration, usize)> {
    use malla_dataplane::nft::diff;
    let sets = diff::plan_changes(table, plan);
    let text = sets.is_none().then(|| plan.text(table));
    let planned = started.elapsed();
    let t = Instant::now();
    let size = match (sets, text) {
        (Some(sets), _) => {
            let family = diff::family(&table.family).context("table family")?;
            sock.apply(family, &table.name, &sets)
                .context("applying the plan's elements")?;
            sets.iter().map(|s| s.add.len() + s.delete.len()).sum()
        }
        (None, Some(text)) => {
            nft::apply(Some(ns), &text).context("applying the plan's text")?;
            text.lines().count()
        }
        (None, None) => 0,
    };
    Ok((planned, t.elapsed(), size))
}
