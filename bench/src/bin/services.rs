//! `services-bench`: Services at scale.
//!
//! 1. Programming: synthetic Services (10 endpoints each) through the calculation
//!    (`services::build` + `masquerade::node_table`) and the agent's cold load
//!    (`malla_dataplane::nft::cold_load`) inside a namespace of ours; then single-endpoint changes as
//!    the agent applies them (element changes over one kept nfnetlink socket). The floor is an
//!    `nft -f -` of an empty table in the same run.
//! 2. Agent RSS: the real `malla agent` against a datastore holding the largest size, in a
//!    namespace of ours with a `ul0` veth; VmRSS once its ready file appears.
//! 3. ClusterIP first-packet latency: one 1-node lab per size, side by side, each with a client
//!    and a server pod and its own agent and datastore, holding N Services (one real, N-1
//!    dummies); TCP connect + first byte from the client pod to the real ClusterIP, measured in
//!    rounds that visit every lab, each round starting at the next one, so that the machine's
//!    drift hits all alike. Baseline in the same labs, measured the same way: an iptables-style
//!    linear nat chain (one rule per service, the hit last) in a second table of each node's
//!    namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort,
};
use malla_api::{keys, IpPool};
use malla_bench::{
    begin, check, cpu_time, default_pool, first_ipv4, measure_connections, mib, ms, nft_floor,
    percentile, ratio, ratio_d, require_agent, temp_dir, unless, yes, BinArgs, Bins, ChangeStats,
    ChangeTimes, ChildGuard, Namespaces,
};
use malla_calc::{masquerade, nft as model, services};
use malla_dataplane::netns::{run_ip, NetNs};
use malla_dataplane::nft::diff as element_diff;
use malla_dataplane::nft::{self, elements as nft_elements};
use malla_lab::topology;
use malla_store::{LocalStore, Store};

#[derive(Parser, Debug)]
#[command(
    name = "services-bench",
    version,
    about = "Services: programming time, agent RSS, ClusterIP latency vs a linear chain"
)]
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
    /// TCP connections per lab in each latency case (Malla, linear chain), spread over the
    /// rounds. (2000 left the p50 ratio ±5 % from run to run; 10 000 take ~30 s.)
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Latency rounds; each measures every lab, starting at the next one each round.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
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
        cluster_ips: vec![IpAddr::V4(*addr.ip())],
        ports: vec![ServicePort {
            port: addr.port(),
            ..ServicePort::default()
        }],
        ..Service::default()
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
                addresses: vec![ip],
                conditions: EndpointConditions::default(),
                node_name: Some(node),
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
    if !args.skip_latency && (args.rounds == 0 || args.connections / args.rounds < 10) {
        bail!("--rounds: at least 1, and at least 10 connections per round");
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
    /// One Service created after the changes, then deleted, by the service path.
    created: Change,
    deleted: Change,
    /// A NodePort Service created by the service path (chains: its text through `nft`).
    node_port: Change,
    /// One Service created by computing the whole node again and diffing it (the path every
    /// creation took before the service path followed them).
    created_whole: Change,
}

/// The node the calculation is for.
const NODE: &str = "node-1";

fn calc(
    svcs: &[services::ProxyService],
    slices: &[services::ProxySlice],
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
        let (svcs, slices): (Vec<Service>, Vec<EndpointSlice>) =
            (0..n).map(|i| synthetic(i, args.endpoints)).unzip();
        // As the agent's mirror keeps them.
        let svcs: Vec<services::ProxyService> = svcs.iter().map(Into::into).collect();
        let mut slices: Vec<services::ProxySlice> = slices.iter().map(Into::into).collect();
        rss("the Services and EndpointSlices");
        let t = Instant::now();
        let (mut map, mut table) = calc(&svcs, &slices, &pools);
        let calc_t = t.elapsed();
        rss("the service map and the table");
        let t = Instant::now();
        let text = services::ruleset(&table, &map);
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
        let parts = malla_dataplane::nft::cold_load::apply(Some(&h), &table, &map)
            .context("applying the full table")?;
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
        // Kept open across changes, as the agent keeps its own (see `ElementSocket`).
        let sock = nft_elements::ElementSocket::open(Some(&h)).context("a netlink socket")?;
        for c in 0..args.changes {
            check(deadline)?;
            // One endpoint of one slice moves to a new address (spread over the table).
            let idx = (n / 2 + c * 7919) % n;
            slices[idx].endpoints[0].ip = IpAddr::V4(Ipv4Addr::new(198, 18, 127, 1 + c as u8));
            // As the agent does. The fast path first: the changed service's entries alone,
            // and the element changes they make.
            let t = Instant::now();
            let changed = std::collections::BTreeSet::from([svcs[idx].key.to_string()]);
            let fast = services::plan_service_changes(
                &mut table, &mut map, &svcs, &slices, NODE, &changed,
            );
            if let Some(plan) = fast {
                let sets =
                    element_diff::plan_changes(&table, &plan).context("encoding the plan")?;
                let rebuild = t.elapsed();
                let t = Instant::now();
                let family = element_diff::family(&table.family).context("table family")?;
                sock.apply(family, &table.name, &sets)
                    .context("applying the endpoint change")?;
                let apply = t.elapsed();
                let size = sets.iter().map(|s| s.add.len() + s.delete.len()).sum();
                changes.push((rebuild, Duration::ZERO, apply, size));
                fast_path += 1;
                continue;
            }
            // Otherwise everything: the whole map, then element changes alone over
            // nfnetlink, else the text diff.
            let (new_map, new) = calc(&svcs, &slices, &pools);
            let rebuild = t.elapsed();
            let t = Instant::now();
            let elements = element_diff::ruleset_changes(&table, &new, &map, &new_map)
                .zip(element_diff::family(&new.family));
            let text = match &elements {
                Some(_) => None,
                None => Some(services::ruleset_diff(&table, &new, &map, &new_map)),
            };
            let diff_t = t.elapsed();
            if let (Some(dir), 0, Some(text)) = (&args.dump, c, &text) {
                std::fs::write(dir.join(format!("services-{n}.diff.nft")), text)?;
            }
            let t = Instant::now();
            let size = match (&elements, &text) {
                (Some((sets, family)), _) => {
                    sock.apply(*family, &new.name, sets)
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
        // One Service created and one deleted, as the agent applies them: the service path
        // plans the service's own objects against the applied table, sent over nfnetlink when
        // they are elements alone (a plain service), else as the plan's text through `nft`.
        // Then, for comparison in the same run, a Service created the way every one was
        // before: the whole map and table computed again and diffed as text.
        let mut svcs = svcs;
        let service_path = |svcs: &[services::ProxyService],
                            slices: &[services::ProxySlice],
                            key: &str,
                            table: &mut model::Table,
                            map: &mut services::ServiceMap|
         -> anyhow::Result<Change> {
            let t = Instant::now();
            let changed = std::collections::BTreeSet::from([key.to_string()]);
            let plan = services::plan_service_changes(table, map, svcs, slices, NODE, &changed)
                .context("the service path declined a Service")?;
            let (rebuild, apply, size) = malla_bench::send_plan(&plan, table, &sock, &h, t)?;
            Ok((rebuild, Duration::ZERO, apply, size))
        };
        check(deadline)?;
        let (svc, slice) = synthetic(n, args.endpoints);
        svcs.push((&svc).into());
        slices.push((&slice).into());
        let key = svcs[n].key.to_string();
        let created = service_path(&svcs, &slices, &key, &mut table, &mut map)?;
        svcs.pop();
        slices.pop();
        let deleted = service_path(&svcs, &slices, &key, &mut table, &mut map)?;
        // A NodePort Service: chains of its own, so the plan's text through `nft`.
        let (mut svc, slice) = synthetic(n, args.endpoints);
        svc.kind = malla_api::service::ServiceType::NodePort;
        for p in svc.ports.iter_mut() {
            p.node_port = Some(30_000);
        }
        svcs.push((&svc).into());
        slices.push((&slice).into());
        let node_port = service_path(&svcs, &slices, &key, &mut table, &mut map)?;
        svcs.pop();
        slices.pop();
        service_path(&svcs, &slices, &key, &mut table, &mut map)?;
        let created_whole = {
            check(deadline)?;
            let (svc, slice) = synthetic(n + 1, args.endpoints);
            svcs.push((&svc).into());
            slices.push((&slice).into());
            let t = Instant::now();
            let (new_map, new) = calc(&svcs, &slices, &pools);
            let rebuild = t.elapsed();
            let t = Instant::now();
            let text = services::ruleset_diff(&table, &new, &map, &new_map);
            let diff_t = t.elapsed();
            let t = Instant::now();
            nft::apply(Some(&h), &text).context("applying the new Service")?;
            (rebuild, diff_t, t.elapsed(), text.lines().count())
        };
        rows.push(ProgRow {
            services: n,
            calc: calc_t,
            render: render_t,
            apply: apply_t,
            ruleset_bytes: text.len(),
            changes,
            created,
            deleted,
            node_port,
            created_whole,
        });
        drop(h);
        nss.delete(&ns)?;
    }
    Ok(Programming { floor, rows })
}

fn report_programming(args: &Args, p: &Programming) {
    println!(
        "1. Programming: N Services x {} endpoints, as the agent does on a node without its table: the table without the proxy maps' elements through `nft -f -`, then those elements in one nfnetlink batch; total = calc + apply (render: the whole ruleset as text, which a full replace would send, for comparison; floor: `nft -f -` of an empty table {} ms)",
        args.endpoints,
        ms(p.floor)
    );
    println!(
        "{:>8} {:>9} {:>10} {:>11} {:>10} {:>10} {:>8} {:>9} {:>4}",
        "services",
        "endpoints",
        "calc ms",
        "(render ms)",
        "apply ms",
        "total ms",
        "MB",
        "target",
        "met"
    );
    for r in &p.rows {
        // The agent's cold path: the render of the whole text is not part of it (its apply
        // renders the table without the proxy's elements itself).
        let total = r.calc + r.apply;
        let (target, met) = if r.services >= 30000 {
            ("< 2000", yes(total < Duration::from_secs(2)))
        } else {
            ("-", "")
        };
        println!(
            "{:>8} {:>9} {:>10} {:>11} {:>10} {:>10} {:>8.1} {:>9} {:>4}",
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
    println!(
        "   One Service ({} endpoints) created, then deleted, as the agent applies them: the service path plans the service's own objects against the applied table (rebuild) and sends them over nfnetlink or as the plan's text through nft (apply; lines = elements or text lines). Then one created by computing the whole node again (rebuild), diffing it as text (diff) and applying it with nft: the path before, in the same run",
        args.endpoints
    );
    for r in &p.rows {
        for (what, c) in [
            ("created", r.created),
            ("deleted", r.deleted),
            ("NodePort created", r.node_port),
            ("whole", r.created_whole),
        ] {
            let c = ChangeStats::of([c]);
            println!("{:>8} {} {what}", r.services, c.cells());
        }
        let ratio = r.created_whole.0 + r.created_whole.1 + r.created_whole.2;
        let now = r.created.0 + r.created.1 + r.created.2;
        println!(
            "{:>8} creation {:.1}x faster than computing the whole node",
            r.services,
            ratio.as_secs_f64() / now.as_secs_f64().max(1e-9)
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

/// One lab's figures in one case, over all rounds.
struct Lat {
    n: usize,
    connections: usize,
    p50: Duration,
    p99: Duration,
    per_sec: f64,
    /// CPU the node agent used while this lab was measured.
    agent_cpu: Duration,
}

/// Connections measured in one lab: their times, the wall time spent measuring them and the
/// agent's CPU time meanwhile.
#[derive(Default)]
struct Samples {
    times: Vec<Duration>,
    measuring: Duration,
    agent_cpu: Duration,
}

impl Samples {
    /// Adds the connections of `batch`.
    fn append(&mut self, mut batch: Samples) {
        self.times.append(&mut batch.times);
        self.measuring += batch.measuring;
        self.agent_cpu += batch.agent_cpu;
    }

    /// The figures of the lab with `n` services.
    fn summary(&self, n: usize) -> Lat {
        Lat {
            n,
            connections: self.times.len(),
            p50: percentile(&self.times, 50.0),
            p99: percentile(&self.times, 99.0),
            per_sec: self.times.len() as f64 / self.measuring.as_secs_f64(),
            agent_cpu: self.agent_cpu,
        }
    }
}

/// One case measured in every lab in interleaved rounds.
struct Interleaved {
    /// Per lab, smallest N first.
    labs: Vec<Lat>,
    /// Per lab: its p50 over the smallest lab's, in each round.
    round_p50_ratios: Vec<Vec<f64>>,
}

struct Latency {
    malla: Interleaved,
    linear: Interleaved,
}

/// A 1-node lab of part 3: pods `client` and `server`, and `services` Services in its own
/// datastore, the real one (198.19.64.1:80 -> server:8080) and `services - 1` synthetic ones.
struct ServiceLab {
    services: usize,
    client_ns: String,
    server_ip: Ipv4Addr,
    node_ns: NetNs,
    agent_pid: Option<u32>,
    /// Declared last: torn down after the handle on its node's namespace is closed.
    lab: malla_bench::Lab,
}

impl ServiceLab {
    /// Brings up lab `name` with its pods and writes its Services, without waiting for the
    /// agent to apply them.
    fn up(
        bins: &Bins,
        name: &str,
        services: usize,
        args: &Args,
        deadline: Instant,
    ) -> anyhow::Result<Self> {
        let mut lab = bins.one_node_lab(&format!("latency, {services} services"), name)?;
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

        let store = LocalStore::open(&lab.paths.store())?;
        let real = service("default", "real", cluster_ip(0));
        let real_slice = slice(
            &real,
            vec![(IpAddr::V4(server_ip), "node-1".to_string())],
            SERVER_PORT,
        );
        put_service(&store, &real, &real_slice)?;
        let t = Instant::now();
        write_objects(&store, 1..services, args.endpoints, deadline)?;
        eprintln!(
            "  {services} services written in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(Self {
            services,
            client_ns,
            server_ip,
            node_ns,
            agent_pid,
            lab,
        })
    }

    /// Waits until the lab's agent has applied everything in its datastore.
    fn wait_converged(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        topology::wait_converged(&self.lab.paths, &self.lab.state, Duration::from_secs(600))
            .with_context(|| format!("waiting for the agent of the {}", self.lab.paths.name))?;
        eprintln!(
            "  the agent with {} services converged {:.1} s later",
            self.services,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Times `count` connections from the client pod to `addr`, whose first answer must come
    /// from the server pod.
    fn measure(
        &self,
        addr: SocketAddr,
        count: usize,
        deadline: Instant,
    ) -> anyhow::Result<Samples> {
        let cpu0 = self.agent_pid.map(cpu_time).unwrap_or_default();
        let (times, measuring) =
            measure_connections(&self.client_ns, addr, "default/server", count, deadline)?;
        let cpu1 = self.agent_pid.map(cpu_time).unwrap_or_default();
        Ok(Samples {
            times,
            measuring,
            agent_cpu: cpu1.saturating_sub(cpu0),
        })
    }
}

/// The iptables-style baseline in one lab's node namespace: table `ip malla_bench_linear`
/// with one rule per service of the lab; deleted on drop.
struct LinearChain<'a> {
    node_ns: &'a NetNs,
}

impl<'a> LinearChain<'a> {
    /// Adds the table to `lab`'s node namespace.
    fn add(lab: &'a ServiceLab) -> anyhow::Result<Self> {
        nft::apply(
            Some(&lab.node_ns),
            &linear_table(lab.services, lab.server_ip),
        )
        .context("adding the linear chain")?;
        Ok(Self {
            node_ns: &lab.node_ns,
        })
    }
}

impl Drop for LinearChain<'_> {
    fn drop(&mut self) {
        if let Err(e) = nft::apply(Some(self.node_ns), "delete table ip malla_bench_linear\n") {
            eprintln!("warning: deleting the linear chain: {e:#}");
        }
    }
}

/// The linear chain's address in `lab`: the VIP of its last rule.
fn linear_vip(lab: &ServiceLab) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(vip(lab.services - 1)), 80)
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

/// Measures `--connections` per lab in `--rounds` rounds, each round every lab one after the
/// other, round r starting at lab r mod the number of labs, so that the machine's drift hits
/// all alike; `target` is the address to connect to in a lab.
fn interleaved(
    labs: &[ServiceLab],
    target: impl Fn(&ServiceLab) -> SocketAddr,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<Interleaved> {
    let mut pools: Vec<Samples> = labs.iter().map(|_| Samples::default()).collect();
    let mut round_p50_ratios = vec![Vec::with_capacity(args.rounds); labs.len()];
    for round in 0..args.rounds {
        check(deadline)?;
        let count =
            args.connections / args.rounds + usize::from(round < args.connections % args.rounds);
        let mut p50 = vec![Duration::ZERO; labs.len()];
        for k in 0..labs.len() {
            let i = (round + k) % labs.len();
            let batch = labs[i].measure(target(&labs[i]), count, deadline)?;
            p50[i] = percentile(&batch.times, 50.0);
            pools[i].append(batch);
        }
        let line: Vec<String> = labs
            .iter()
            .zip(&p50)
            .map(|(lab, p)| format!("{:.1} us (N={})", p.as_secs_f64() * 1e6, lab.services))
            .collect();
        eprintln!(
            "  round {}/{}: p50 {}",
            round + 1,
            args.rounds,
            line.join(", ")
        );
        for (ratios, p) in round_p50_ratios.iter_mut().zip(&p50) {
            ratios.push(ratio_d(*p, p50[0]));
        }
    }
    Ok(Interleaved {
        labs: labs
            .iter()
            .zip(&pools)
            .map(|(lab, pool)| pool.summary(lab.services))
            .collect(),
        round_p50_ratios,
    })
}

fn latency(args: &Args, bins: &Bins, deadline: Instant) -> anyhow::Result<Latency> {
    if args.sizes.iter().any(|&n| n > VIP_SPAN) {
        bail!("at most {VIP_SPAN} services for the linear baseline");
    }
    let labs = args
        .sizes
        .iter()
        .map(|&n| ServiceLab::up(bins, &format!("svc-{n}"), n, args, deadline))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for lab in &labs {
        lab.wait_converged()?;
    }
    pin_cpus(&labs)?;
    eprintln!("latency: Malla, {:?} services", args.sizes);
    let malla = interleaved(&labs, |_| SocketAddr::V4(cluster_ip(0)), args, deadline)?;
    eprintln!("latency: linear chain, {:?} rules", args.sizes);
    let chains = labs
        .iter()
        .map(LinearChain::add)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let linear = interleaved(&labs, linear_vip, args, deadline);
    drop(chains);
    Ok(Latency {
        malla,
        linear: linear?,
    })
}

/// Keeps every batch on the same CPUs: the measuring thread (this one; its workers inherit
/// it) on the first, every lab's probe server on the last. Left to the scheduler, a batch ran
/// at one of two speeds (~58 or ~75 µs per connection) by where the client and the server
/// happened to run, which spread the per-round ratios from 0.6 to 1.5. Nothing to pin on one
/// CPU.
fn pin_cpus(labs: &[ServiceLab]) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus < 2 {
        return Ok(());
    }
    let pin = |pid: libc::pid_t, cpu: usize| -> anyhow::Result<()> {
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: sched_setaffinity reads a cpu_set_t of the size given.
        let rc = unsafe { libc::sched_setaffinity(pid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            bail!(
                "pinning {pid} to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    };
    pin(0, 0)?;
    for lab in labs {
        let server = lab.lab.pod("server")?.probe_pid;
        let pid = server.context("the server pod runs no probe server")?;
        // Every thread of the server: its listeners are threads of their own.
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let tid: libc::pid_t = task?.file_name().to_string_lossy().parse()?;
            pin(tid, cpus - 1)?;
        }
    }
    Ok(())
}

/// Median and range of `values`.
fn median_min_max(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    let median = if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    };
    (median, v[0], v[v.len() - 1])
}

fn report_latency(args: &Args, l: &Latency) {
    println!(
        "3. ClusterIP: TCP connect + first byte, client pod -> VIP -> server pod, one 1-node lab per N, measured in {} interleaved rounds",
        args.rounds
    );
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>8} {:>8} {:>13}",
        "case", "N", "conns", "p50 ms", "p99 ms", "conn/s", "agent CPU ms"
    );
    for (name, case) in [
        ("Malla (nft vmap)", &l.malla),
        ("linear chain (iptables)", &l.linear),
    ] {
        for r in &case.labs {
            println!(
                "{:<26} {:>8} {:>8} {:>8} {:>8} {:>8.0} {:>13}",
                name,
                r.n,
                r.connections,
                ms(r.p50),
                ms(r.p99),
                r.per_sec,
                r.agent_cpu.as_millis()
            );
        }
    }
    println!();
    println!(
        "{:<26} {:>14} {:>8} {:>8} {:>8} {:>28} {:>8} {:>4}",
        "ratio to the smallest N",
        "N",
        "p50",
        "p99",
        "conn/s",
        "p50 per round: med (range)",
        "target",
        "met"
    );
    for (name, case, target) in [
        ("Malla", &l.malla, Some(1.05)),
        ("linear chain (baseline)", &l.linear, None),
    ] {
        let a = &case.labs[0];
        for (i, b) in case.labs.iter().enumerate().skip(1) {
            let p50 = ratio_d(b.p50, a.p50);
            let (median, min, max) = median_min_max(&case.round_p50_ratios[i]);
            // The target is on the largest N.
            let target = target.filter(|_| i == case.labs.len() - 1);
            println!(
                "{:<26} {:>14} {:>8.3} {:>8.3} {:>8.3} {:>28} {:>8} {:>4}",
                name,
                format!("{}/{}", b.n, a.n),
                p50,
                ratio_d(b.p99, a.p99),
                ratio(b.per_sec, a.per_sec),
                format!("{median:.3} ({min:.3}-{max:.3})"),
                target.map_or("-".to_string(), |t| format!("<= {t}")),
                target.map_or("", |t| yes(p50 <= t))
            );
        }
    }
    if let (Some(m), Some(b)) = (l.malla.labs.last(), l.linear.labs.last()) {
        println!(
            "Malla / linear chain at N={}: p50 {:.3}, p99 {:.3} (below 1: Malla is faster)",
            m.n,
            ratio_d(m.p50, b.p50),
            ratio_d(m.p99, b.p99)
        );
    }
    println!();
}
