//! `services-bench`: Services at scale.
//!
//! 1. Programming: synthetic Services (10 endpoints each) through the calculation
//!    (`services::build` + `masquerade::node_table`), `render_full` and `nft -f -` inside a
//!    namespace of ours; then single-endpoint changes through `render_diff`. The floor is an
//!    `nft -f -` of an empty table in the same run.
//! 2. Agent RSS: the real `malla agent` against a datastore holding the largest size, in a
//!    namespace of ours with a `ul0` veth; VmRSS once its ready file appears.
//! 3. ClusterIP first-packet latency: a 1-node lab, a client and a server pod, N Services in the
//!    lab's datastore (one real, N-1 dummies); TCP connect + first byte from the client pod to
//!    the real ClusterIP. Baseline in the same lab: an iptables-style linear nat chain (one rule
//!    per service, the hit last) in a second table of the node's namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_agent::element_diff;
use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort, ServiceType, TrafficPolicy,
};
use malla_api::{keys, IpPool};
use malla_bench::{
    begin, check, cpu_time, default_pool, first_ipv4, measure_connections, mib, ms, nft_floor,
    percentile, ratio, ratio_d, require_agent, temp_dir, unless, yes, BinArgs, Bins, ChangeStats,
    ChangeTimes, ChildGuard, Namespaces,
};
use malla_calc::{masquerade, nft as model, services};
use malla_dataplane::netns::{run_ip, NetNs};
use malla_dataplane::{nft, nft_elements};
use malla_lab::topology;
use malla_store::{LocalStore, Store};

#[derive(Parser, Debug)]
#[command(about = "Services: programming time, agent RSS, ClusterIP latency vs a linear chain")]
struct Args {
    /// Numbers of Services (comma-separated, ascending).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000,30000")]
    sizes: Vec<usize>,
    /// Endpoints per synthetic Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Single-endpoint changes per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// TCP connections per latency measurement.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Skip part 1 (programming time).
    #[arg(long)]
    skip_programming: bool,
    /// Skip part 2 (agent RSS).
    #[arg(long)]
    skip_rss: bool,
    /// Skip part 3 (ClusterIP latency).
    #[arg(long)]
    skip_latency: bool,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    max_seconds: u64,
    /// Write each size's full ruleset (`services-N.nft`) and first diff (`services-N.diff.nft`)
    /// to this directory, e.g. to time `nft -f` on them by hand.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

/// ClusterIPs: 198.19.64.0/18 (the lab's service range); past 16382 services the port moves on.
const SVC_BASE: u32 = u32::from_be_bytes([198, 19, 64, 0]);
const SVC_SPAN: usize = 16382;
/// Dummy endpoints: 198.18.128.0/17 (inside the lab pool, never reached).
const EP_BASE: u32 = u32::from_be_bytes([198, 18, 128, 0]);
const EP_SPAN: usize = 32766;
/// Baseline VIPs: 198.19.128.0/17, one per rule, port 80.
const VIP_BASE: u32 = u32::from_be_bytes([198, 19, 128, 0]);
const VIP_SPAN: usize = 32766;
/// Port of the server pod's probe server.
const SERVER_PORT: u16 = 8080;
/// Namespaces the synthetic services are spread over.
const SVC_NAMESPACES: usize = 100;

fn cluster_ip(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(SVC_BASE + 1 + (i % SVC_SPAN) as u32),
        80 + (i / SVC_SPAN) as u16,
    )
}

fn ep_ip(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(EP_BASE + 1 + (k % EP_SPAN) as u32))
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(VIP_BASE + 1 + i as u32)
}

fn svc_namespace(i: usize) -> String {
    format!("bench-{:02}", i % SVC_NAMESPACES)
}

fn service(namespace: &str, name: &str, addr: SocketAddrV4) -> Service {
    Service {
        namespace: namespace.into(),
        name: name.into(),
        kind: ServiceType::ClusterIP,
        cluster_ips: vec![IpAddr::V4(*addr.ip())],
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: addr.port(),
            target_port: None,
            node_port: None,
        }],
        selector: None,
        session_affinity_timeout: None,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        external_ips: vec![],
        load_balancer_ips: vec![],
    }
}

fn slice(svc: &Service, endpoints: Vec<(IpAddr, String)>, port: u16) -> EndpointSlice {
    EndpointSlice {
        namespace: svc.namespace.clone(),
        name: format!("{}-abcde", svc.name),
        service: svc.name.clone(),
        address_type: AddressType::IPv4,
        endpoints: endpoints
            .into_iter()
            .map(|(ip, node)| Endpoint {
                addresses: vec![ip].into(),
                conditions: EndpointConditions::default(),
                node_name: Some(node.into()),
                target: None,
            })
            .collect(),
        ports: vec![EndpointPort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port,
        }],
    }
}

/// Synthetic service `i` with `eps` endpoints on other nodes.
fn synthetic(i: usize, eps: usize) -> (Service, EndpointSlice) {
    let svc = service(&svc_namespace(i), &format!("svc-{i:05}"), cluster_ip(i));
    let endpoints = (0..eps)
        .map(|j| {
            let k = i * eps + j;
            (ep_ip(k), format!("node-{}", 2 + k % 50))
        })
        .collect();
    let s = slice(&svc, endpoints, SERVER_PORT);
    (svc, s)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty()
        || args.sizes.iter().any(|n| !(1..=32000).contains(n))
        || !args.sizes.is_sorted()
    {
        bail!("--sizes: ascending numbers in 1..=32000");
    }
    if !(1..=50).contains(&args.endpoints) || !(1..=50).contains(&args.changes) {
        bail!("--endpoints and --changes must be in 1..=50");
    }
    if !(10..=20000).contains(&args.connections) {
        bail!("--connections must be in 10..=20000");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;

    let programming = unless(args.skip_programming, || programming(&args, deadline))?;
    let rss = unless(args.skip_rss, || agent_rss(&args, &bins.malla, deadline))?;
    let latency = unless(args.skip_latency, || latency(&args, &bins, deadline))?;

    println!();
    if let Some(p) = &programming {
        report_programming(&args, p);
    }
    if let Some(r) = &rss {
        report_rss(&args, r);
    }
    if let Some(l) = &latency {
        report_latency(&args, l);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 1. Programming time

struct Programming {
    floor: Duration,
    rows: Vec<ProgRow>,
}

/// One endpoint change: rebuild (calc), diff (element changes or render_diff), apply, size (elements or diff lines).
type Change = ChangeTimes;

struct ProgRow {
    services: usize,
    calc: Duration,
    render: Duration,
    apply: Duration,
    ruleset_bytes: usize,
    changes: Vec<Change>,
}

/// The node the calculation is for.
const NODE: &str = "node-1";

fn calc(
    svcs: &[Service],
    slices: &[EndpointSlice],
    pools: &[IpPool],
) -> (services::ServiceMap, model::Table) {
    let node_ips = [IpAddr::V4(Ipv4Addr::new(198, 19, 250, 1))];
    let t = Instant::now();
    let map = services::build(svcs, slices, NODE, &node_ips, pools);
    let built = t.elapsed();
    let table = masquerade::node_table(pools, &map);
    if std::env::var_os("MALLA_BENCH_VERBOSE").is_some() {
        eprintln!(
            "  calc: build {} ms, node_table {} ms",
            ms(built),
            ms(t.elapsed() - built)
        );
    }
    (map, table)
}

fn programming(args: &Args, deadline: Instant) -> anyhow::Result<Programming> {
    let mut nss = Namespaces::default();
    let pools = vec![default_pool()?];
    // The floor: one `nft -f -` of an empty table, median of 5.
    let floor = nft_floor(&mut nss, "prog-floor")?;

    let mut rows = Vec::new();
    for &n in &args.sizes {
        check(deadline)?;
        eprintln!("programming: {n} services x {} endpoints", args.endpoints);
        let verbose = std::env::var_os("MALLA_BENCH_VERBOSE").is_some();
        let rss = |what: &str| {
            if verbose {
                let kib = malla_bench::status_kib(std::process::id(), "VmRSS")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                eprintln!("  VmRSS {:.1} MiB after {what}", mib(kib));
            }
        };
        rss("start");
        let (svcs, mut slices): (Vec<Service>, Vec<EndpointSlice>) =
            (0..n).map(|i| synthetic(i, args.endpoints)).unzip();
        rss("the Services and EndpointSlices");
        let t = Instant::now();
        let (mut map, mut table) = calc(&svcs, &slices, &pools);
        let calc_t = t.elapsed();
        rss("the service map and the table");
        let t = Instant::now();
        let text = model::render_full(&table);
        let render_t = t.elapsed();
        rss("the ruleset text");
        if let Some(dir) = &args.dump {
            std::fs::write(dir.join(format!("services-{n}.nft")), &text)?;
        }
        let ns = nss.create(&format!("prog-{n}"))?;
        let h = NetNs::open_named(&ns)?;
        // As the agent does on a node with no table yet: everything but the proxy maps'
        // elements through `nft`, then those elements over nfnetlink.
        let t = Instant::now();
        let parts =
            malla_agent::cold_load::apply(Some(&h), &table).context("applying the full table")?;
        let apply_t = t.elapsed();
        if verbose {
            eprintln!(
                "  apply: table without the proxy's elements {} ms (nft), {} elements {} ms (nfnetlink)",
                ms(parts.table),
                parts.element_count,
                ms(parts.elements)
            );
        }
        eprintln!(
            "  calc {} ms, render {} ms, apply {} ms ({} MB)",
            ms(calc_t),
            ms(render_t),
            ms(apply_t),
            text.len() / 1_000_000
        );
        let mut changes = Vec::new();
        let mut fast_path = 0;
        for c in 0..args.changes {
            check(deadline)?;
            // One endpoint of one slice moves to a new address (spread over the table).
            let idx = (n / 2 + c * 7919) % n;
            slices[idx].endpoints[0].addresses[0] =
                IpAddr::V4(Ipv4Addr::new(198, 18, 127, 1 + c as u8));
            // As the agent does. The fast path first: the changed service's entries alone,
            // and the element changes they make.
            let t = Instant::now();
            let fast = element_diff::service_change(&table, &map, &svcs[idx], &slices, NODE);
            if let Some(planned) = fast {
                let rebuild = t.elapsed();
                let t = Instant::now();
                let family = element_diff::family(&table.family).context("table family")?;
                nft_elements::apply(Some(&h), family, &table.name, &planned.changes)
                    .context("applying the endpoint change")?;
                let apply = t.elapsed();
                planned.delta.apply_to(&mut table);
                let size = planned
                    .changes
                    .iter()
                    .map(|s| s.add.len() + s.delete.len())
                    .sum();
                map.entries.splice(planned.range, planned.entries);
                changes.push((rebuild, Duration::ZERO, apply, size));
                fast_path += 1;
                continue;
            }
            // Otherwise everything: the whole map, then element changes alone over
            // nfnetlink, else the text diff.
            let (new_map, new) = calc(&svcs, &slices, &pools);
            let rebuild = t.elapsed();
            let t = Instant::now();
            let elements =
                element_diff::element_changes(&table, &new).zip(element_diff::family(&new.family));
            let text = match &elements {
                Some(_) => None,
                None => Some(model::render_diff(&table, &new).context("a change gave no diff")?),
            };
            let diff_t = t.elapsed();
            if let (Some(dir), 0, Some(text)) = (&args.dump, c, &text) {
                std::fs::write(dir.join(format!("services-{n}.diff.nft")), text)?;
            }
            let t = Instant::now();
            let size = match (&elements, &text) {
                (Some((sets, family)), _) => {
                    nft_elements::apply(Some(&h), *family, &new.name, sets)
                        .context("applying the element changes")?;
                    sets.iter().map(|s| s.add.len() + s.delete.len()).sum()
                }
                (None, Some(text)) => {
                    nft::apply(Some(&h), text).context("applying the diff")?;
                    text.lines().count()
                }
                (None, None) => 0,
            };
            let apply = t.elapsed();
            changes.push((rebuild, diff_t, apply, size));
            table = new;
            map = new_map;
        }
        eprintln!(
            "  {fast_path} of {} changes took the fast path",
            args.changes
        );
        rows.push(ProgRow {
            services: n,
            calc: calc_t,
            render: render_t,
            apply: apply_t,
            ruleset_bytes: text.len(),
            changes,
        });
        drop(h);
        nss.delete(&ns)?;
    }
    Ok(Programming { floor, rows })
}

fn report_programming(args: &Args, p: &Programming) {
    println!(
        "1. Programming: N Services x {} endpoints, as the agent does on a node without its table: the table without the proxy maps' elements through `nft -f -`, then those elements in one nfnetlink batch (floor: `nft -f -` of an empty table {} ms)",
        args.endpoints,
        ms(p.floor)
    );
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>9} {:>4}",
        "services",
        "endpoints",
        "calc ms",
        "render ms",
        "apply ms",
        "total ms",
        "MB",
        "target",
        "met"
    );
    for r in &p.rows {
        let total = r.calc + r.render + r.apply;
        let (target, met) = if r.services >= 30000 {
            ("< 2000", yes(total < Duration::from_secs(2)))
        } else {
            ("-", "")
        };
        println!(
            "{:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8.1} {:>9} {:>4}",
            r.services,
            r.services * args.endpoints,
            ms(r.calc),
            ms(r.render),
            ms(r.apply),
            ms(total),
            r.ruleset_bytes as f64 / 1e6,
            target,
            met
        );
    }
    println!();
    println!(
        "   One endpoint change (median of {}), as the agent applies it: the changed service's entries and their element changes, sent over nfnetlink (rebuild = that service alone; lines = elements), or when that path declines (a count or shape change), the whole map, then element changes or render_diff via nft",
        args.changes
    );
    println!(
        "{:>8} {} {:>7} {:>4}",
        "services",
        ChangeStats::heads(),
        "target",
        "met"
    );
    for r in &p.rows {
        let c = ChangeStats::of(r.changes.iter().copied());
        println!(
            "{:>8} {} {:>7} {:>4}",
            r.services,
            c.cells(),
            "< 20",
            yes(c.total < Duration::from_millis(20))
        );
    }
    println!();
}

// ---------------------------------------------------------------------------------------------
// 2. Agent RSS

struct Rss {
    services: usize,
    rss_kib: u64,
    hwm_kib: u64,
    ready_after: Duration,
    /// The bare agent (no services) in the same run.
    base_rss_kib: u64,
}

fn write_objects(
    store: &LocalStore,
    range: std::ops::Range<usize>,
    eps: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    for i in range {
        if i % 1000 == 0 {
            check(deadline)?;
        }
        let (svc, s) = synthetic(i, eps);
        put_service(store, &svc, &s)?;
    }
    Ok(())
}

/// Writes `svc` and its `slice` to the datastore.
fn put_service(store: &LocalStore, svc: &Service, slice: &EndpointSlice) -> anyhow::Result<()> {
    store.put(
        &keys::service(&svc.namespace, &svc.name),
        &serde_json::to_string(svc)?,
    )?;
    store.put(
        &keys::endpoint_slice(&slice.namespace, &slice.name),
        &serde_json::to_string(slice)?,
    )?;
    Ok(())
}

fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    malla_bench::status_kib(pid, field)?
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Starts the agent on `store` in a fresh namespace with a `ul0` veth; returns (VmRSS, VmHWM,
/// time to ready) once its ready file appears.
fn run_agent(
    nss: &mut Namespaces,
    what: &str,
    malla_bin: &Path,
    dir: &Path,
    deadline: Instant,
) -> anyhow::Result<(u64, u64, Duration)> {
    let ns = nss.create(&format!("agent-{what}"))?;
    for cmd in [
        "link add ul0 type veth peer name ul0p",
        "addr add 198.19.250.1/24 dev ul0",
        "link set ul0 up",
        "link set ul0p up",
    ] {
        let mut v = vec!["-n", ns.as_str()];
        v.extend(cmd.split_whitespace());
        run_ip(&v)?;
    }
    let ready = dir.join(format!("agent-{what}.ready"));
    let log = std::fs::File::create(dir.join(format!("agent-{what}.log")))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns])
        .arg(malla_bin)
        .args(["agent", "--node", "node-1", "--underlay-interface", "ul0"])
        .arg("--datastore")
        .arg(dir.join("store.db"))
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let start = Instant::now();
    let mut child = ChildGuard(cmd.spawn().context("starting the agent")?);
    let pid = child.0.id();
    let limit = start + Duration::from_secs(600);
    while !ready.exists() {
        check(deadline)?;
        if let Some(status) = child.0.try_wait()? {
            bail!(
                "the agent exited ({status}); see {}",
                dir.join(format!("agent-{what}.log")).display()
            );
        }
        if Instant::now() > limit {
            bail!("the agent was not ready after 600 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready_after = start.elapsed();
    require_agent(pid)?;
    let rss = status_kib(pid, "VmRSS")?;
    let hwm = status_kib(pid, "VmHWM")?;
    drop(child);
    nss.delete(&ns)?;
    Ok((rss, hwm, ready_after))
}

fn agent_rss(args: &Args, malla_bin: &Path, deadline: Instant) -> anyhow::Result<Rss> {
    let n = *args.sizes.last().unwrap_or(&1);
    let dir = temp_dir("temp dir")?;
    let store = LocalStore::open(&dir.path().join("store.db"))?;
    malla_ipam::Ipam::new(&store).ensure_pool(&default_pool()?)?;
    let mut nss = Namespaces::default();
    eprintln!("agent RSS: bare agent");
    let (base_rss_kib, _, _) = run_agent(&mut nss, "empty", malla_bin, dir.path(), deadline)?;
    eprintln!("agent RSS: writing {n} services to the datastore");
    let t = Instant::now();
    write_objects(&store, 0..n, args.endpoints, deadline)?;
    eprintln!("  written in {:.1} s", t.elapsed().as_secs_f64());
    let _ = std::fs::remove_file(dir.path().join("agent-full.ready"));
    let (rss_kib, hwm_kib, ready_after) =
        run_agent(&mut nss, "full", malla_bin, dir.path(), deadline)?;
    eprintln!(
        "  VmRSS {} KiB, VmHWM {} KiB, ready after {:.1} s",
        rss_kib,
        hwm_kib,
        ready_after.as_secs_f64()
    );
    Ok(Rss {
        services: n,
        rss_kib,
        hwm_kib,
        ready_after,
        base_rss_kib,
    })
}

fn report_rss(args: &Args, r: &Rss) {
    println!(
        "2. Agent RSS, {} Services / {} endpoints in the datastore (baseline: the same agent with none)",
        r.services,
        r.services * args.endpoints
    );
    println!(
        "{:<22} {:>10} {:>10} {:>9} {:>8} {:>4}",
        "case", "VmRSS MiB", "VmHWM MiB", "ready s", "target", "met"
    );
    println!(
        "{:<22} {:>10.1} {:>10} {:>9} {:>8} {:>4}",
        "agent, no services",
        mib(r.base_rss_kib),
        "-",
        "-",
        "-",
        ""
    );
    println!(
        "{:<22} {:>10.1} {:>10.1} {:>9.1} {:>8} {:>4}",
        format!("agent, {} services", r.services),
        mib(r.rss_kib),
        mib(r.hwm_kib),
        r.ready_after.as_secs_f64(),
        "< 64",
        yes(mib(r.rss_kib) < 64.0)
    );
    println!(
        "   ratio to the bare agent: {:.1}x",
        ratio(r.rss_kib as f64, r.base_rss_kib as f64)
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// 3. ClusterIP latency

struct Lat {
    n: usize,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    /// CPU the node agent used during the measurement.
    agent_cpu: Duration,
}

struct Latency {
    malla: Vec<Lat>,
    linear: Vec<Lat>,
}

fn lat(
    n: usize,
    netns: &str,
    addr: SocketAddr,
    expect: &str,
    agent: Option<u32>,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<Lat> {
    let cpu0 = agent.map(cpu_time).unwrap_or_default();
    let (v, elapsed) = measure_connections(netns, addr, expect, args.connections, deadline)?;
    let cpu1 = agent.map(cpu_time).unwrap_or_default();
    let l = Lat {
        n,
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        per_sec: v.len() as f64 / elapsed.as_secs_f64(),
        agent_cpu: cpu1.saturating_sub(cpu0),
    };
    eprintln!(
        "  {n}: p50 {} ms, p99 {} ms, {:.0} conn/s (agent CPU {} ms)",
        ms(l.p50),
        ms(l.p99),
        l.per_sec,
        l.agent_cpu.as_millis()
    );
    Ok(l)
}

/// The iptables-style baseline: `n` rules `ip daddr <vip_i> tcp dport 80 dnat to <server>`,
/// the one hit last, in a nat prerouting chain before Malla's.
fn linear_table(n: usize, server: Ipv4Addr) -> String {
    let mut t = String::with_capacity(n * 80);
    t.push_str("table ip malla_bench_linear {\n  chain prerouting {\n");
    t.push_str("    type nat hook prerouting priority -150; policy accept;\n");
    for i in 0..n {
        t.push_str(&format!(
            "    ip daddr {} tcp dport 80 dnat to {server}:{SERVER_PORT}\n",
            vip(i)
        ));
    }
    t.push_str("  }\n}\n");
    t
}

fn latency(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Latency> {
    let max_n = *args.sizes.last().unwrap_or(&1);
    if max_n > VIP_SPAN {
        bail!("at most {VIP_SPAN} services for the linear baseline");
    }
    let mut lab = bins.one_node_lab("latency", "svc")?;
    let text = format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: c\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: server\n  namespace: default\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: s\n    ports:\n    - containerPort: {SERVER_PORT}\n"
    );
    lab.apply_pods(&bins.malla, &text)?;
    let client_ns = lab.pod("client")?.netns.clone();
    let server_ip =
        first_ipv4(&lab.pod("server")?.ips).context("server pod has no IPv4 address")?;
    let node = &lab.state.nodes[0];
    let node_ns = NetNs::open_named(&node.netns)?;
    let agent_pid = node.agent_pid;

    // The real service (index 0, 198.19.64.1:80) -> the server pod; dummies 1..N.
    let store = LocalStore::open(&lab.paths.store())?;
    let real = service("default", "real", cluster_ip(0));
    let real_slice = slice(
        &real,
        vec![(IpAddr::V4(server_ip), "node-1".to_string())],
        SERVER_PORT,
    );
    put_service(&store, &real, &real_slice)?;
    let addr = SocketAddr::V4(cluster_ip(0));
    let mut written = 1;
    let mut malla = Vec::new();
    for &n in &args.sizes {
        check(deadline)?;
        eprintln!("latency: Malla with {n} services");
        write_objects(&store, written..n, args.endpoints, deadline)?;
        written = written.max(n);
        let t = Instant::now();
        topology::wait_converged(&lab.paths, &lab.state, Duration::from_secs(600))
            .context("waiting for the agent")?;
        eprintln!(
            "  agent converged {:.1} s after the writes",
            t.elapsed().as_secs_f64()
        );
        malla.push(lat(
            n,
            &client_ns,
            addr,
            "default/server",
            agent_pid,
            args,
            deadline,
        )?);
    }

    let mut linear = Vec::new();
    let first = args.sizes[0];
    for n in [first, max_n] {
        if linear.iter().any(|l: &Lat| l.n == n) {
            continue;
        }
        check(deadline)?;
        eprintln!("latency: linear chain with {n} rules (Malla keeps {written} services)");
        nft::apply(Some(&node_ns), &linear_table(n, server_ip))
            .context("adding the linear chain")?;
        let vaddr = SocketAddr::new(IpAddr::V4(vip(n - 1)), 80);
        let r = lat(
            n,
            &client_ns,
            vaddr,
            "default/server",
            agent_pid,
            args,
            deadline,
        );
        nft::apply(Some(&node_ns), "delete table ip malla_bench_linear\n")
            .context("deleting the linear chain")?;
        linear.push(r?);
    }
    drop(node_ns);
    drop(lab);
    Ok(Latency { malla, linear })
}

fn report_latency(args: &Args, l: &Latency) {
    println!(
        "3. ClusterIP: TCP connect + first byte, client pod -> VIP -> server pod (1-node lab), {} connections each",
        args.connections
    );
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>8} {:>13}",
        "case", "N", "p50 ms", "p99 ms", "conn/s", "agent CPU ms"
    );
    for (name, rows) in [
        ("Malla (nft vmap)", &l.malla),
        ("linear chain (iptables)", &l.linear),
    ] {
        for r in rows.iter() {
            println!(
                "{:<26} {:>8} {:>8} {:>8} {:>8.0} {:>13}",
                name,
                r.n,
                ms(r.p50),
                ms(r.p99),
                r.per_sec,
                r.agent_cpu.as_millis()
            );
        }
    }
    let growth = |rows: &[Lat]| -> Option<(usize, usize, f64, f64, f64)> {
        let (a, b) = (rows.first()?, rows.last()?);
        Some((
            a.n,
            b.n,
            ratio_d(b.p50, a.p50),
            ratio_d(b.p99, a.p99),
            ratio(b.per_sec, a.per_sec),
        ))
    };
    println!();
    println!(
        "{:<26} {:>14} {:>10} {:>10} {:>9} {:>8} {:>4}",
        "ratio largest/smallest N", "N", "p50", "p99", "conn/s", "target", "met"
    );
    if let Some((a, b, p50, p99, cps)) = growth(&l.malla) {
        println!(
            "{:<26} {:>14} {:>10.3} {:>10.3} {:>9.3} {:>8} {:>4}",
            "Malla",
            format!("{b}/{a}"),
            p50,
            p99,
            cps,
            "<= 1.05",
            yes(p50 <= 1.05)
        );
    }
    if let Some((a, b, p50, p99, cps)) = growth(&l.linear) {
        println!(
            "{:<26} {:>14} {:>10.3} {:>10.3} {:>9.3} {:>8} {:>4}",
            "linear chain (baseline)",
            format!("{b}/{a}"),
            p50,
            p99,
            cps,
            "-",
            ""
        );
    }
    if let (Some(m), Some(b)) = (l.malla.last(), l.linear.last()) {
        if m.n == b.n {
            println!(
                "Malla / linear chain at N={}: p50 {:.3}, p99 {:.3} (below 1: Malla is faster)",
                m.n,
                ratio_d(m.p50, b.p50),
                ratio_d(m.p99, b.p99)
            );
        }
    }
    println!();
}
