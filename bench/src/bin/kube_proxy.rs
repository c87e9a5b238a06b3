//! `kube-proxy-bench`: Malla's Service proxy against the real peer, kube-proxy v1.20 in iptables
//! mode (`scripts/k8s-control-plane`'s build), in one run on one lab.
//!
//! The lab: one node on the Kubernetes datastore (the real kube-apiserver and
//! kube-controller-manager v1.20), a `client` and a `server` pod (the probe server on 8080,
//! label `app: server`). Services and EndpointSlices live in the API server: one `real` Service
//! selecting the server (its slice made by the endpoint-slice controller) and N-1 dummies
//! without selector, each with a slice of `--endpoints` addresses that are never reached.
//!
//! At each size N the two proxies take turns on the same objects:
//! - **Malla**: the node's agent as the lab runs it;
//! - **kube-proxy**: the agent restarted with `--no-services` (pods keep their network, Malla
//!   serves no Service) and kube-proxy started in the node's namespace
//!   ([`malla_lab::kubelet::KubeProxy`]: `--conntrack-max-per-core=0`, timeouts at 0, and a
//!   mount namespace where `kernel.*`, `vm.*`, the conntrack sysctls and
//!   `/sys/module/nf_conntrack/parameters` are read-only); afterwards `kube-proxy --cleanup`.
//!   `--iptables legacy` (the default) or `nft` chooses the iptables it runs.
//!
//! Measured for each, all from the client pod:
//! 1. full programming: with the proxy stopped, a fresh Service selecting the server is
//!    created (its slice awaited); then the proxy starts, and the time to the first answer on
//!    the fresh ClusterIP is the time to program all N (both program a whole ruleset in one
//!    transaction: Malla's cold load, kube-proxy's `iptables-restore`);
//! 2. Service creation to first connection: a new Service selecting the server is created
//!    with the proxy running; the time from the create request to the first answer through its
//!    ClusterIP (the endpoint-slice controller's share included, the same for both);
//! 3. new connections: sequential TCP connect + first byte to the `real` ClusterIP: p50, p99
//!    and connections per second;
//! 4. the proxy's RSS (the whole Malla agent; kube-proxy), after the above.
//!
//! The machine's own settings ([`MACHINE_SETTINGS`]) are read before and after: the run fails
//! if any changed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use malla_api::keys;
use malla_api::service::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServicePort, TargetPort,
};
use malla_api::RoutingMode;
use malla_bench::{
    begin, check, default_pool, mib, ms, percentile, ratio, ratio_d, status_kib, stop_and_wait,
    BinArgs, Bins, Lab,
};
use malla_dataplane::netns::NetNs;
use malla_lab::kubelet::KubeProxy;
use malla_lab::store::Backend;
use malla_store::Store;

#[derive(Parser, Debug)]
#[command(
    name = "kube-proxy-bench",
    version,
    about = "Services: Malla's proxy against kube-proxy v1.20 (iptables) on one lab"
)]
struct Args {
    /// Numbers of Services (comma-separated, ascending).
    #[arg(long, value_delimiter = ',', default_value = "10,1000,10000")]
    sizes: Vec<usize>,
    /// Endpoints per dummy Service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Services created one by one per size and proxy (creation to first connection; the
    /// median and the largest are reported).
    #[arg(long, default_value_t = 5)]
    creations: usize,
    /// Sequential connections per size and proxy through the `real` ClusterIP.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Threads writing the dummy Services to the API server.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// The iptables kube-proxy runs: `legacy` (iptables-legacy, the x_tables kernel API) or
    /// `nft` (Debian's default `iptables`, iptables-nft 1.8.9: it took over 5 min for one
    /// `iptables-restore` of 10k Services of 10 endpoints here).
    #[arg(long, default_value = "legacy", value_parser = ["legacy", "nft"])]
    iptables: String,
    /// The kube-proxy binary; default: `$MALLA_K8S_DIR/bin/kube-proxy`.
    #[arg(long)]
    kube_proxy_bin: Option<PathBuf>,
    #[command(flatten)]
    bins: BinArgs,
    /// How long a proxy may take to program all Services or a new one (seconds).
    #[arg(long, default_value_t = 300)]
    program_timeout: u64,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
}

/// Port of the server pod's probe server.
const SERVER_PORT: u16 = 8080;
/// The lab's service range 198.19.64.0/18: `real` and the Services created during the run
/// from .64.10, the dummies from .68.0 (the API server holds `default/kubernetes` at .64.1).
const SVC_BASE: u32 = u32::from_be_bytes([198, 19, 64, 0]);
const PROBE_FIRST: u32 = 10;
const PROBE_SPAN: u32 = 1000;
const DUMMY_FIRST: u32 = 1024;
const DUMMY_SPAN: usize = 15_000;
/// Dummy endpoints: 198.18.128.0/17 (inside the lab pool, never reached).
const EP_BASE: u32 = u32::from_be_bytes([198, 18, 128, 0]);
const EP_SPAN: usize = 32766;
/// Namespaces the dummies are spread over.
const SVC_NAMESPACES: usize = 20;

/// Machine-wide values neither proxy may change (read in this process's namespaces).
const MACHINE_SETTINGS: [&str; 9] = [
    "/proc/sys/net/netfilter/nf_conntrack_max",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
    "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close_wait",
    "/sys/module/nf_conntrack/parameters/hashsize",
    "/proc/sys/kernel/panic",
    "/proc/sys/kernel/panic_on_oops",
    "/proc/sys/vm/overcommit_memory",
    "/proc/sys/vm/panic_on_oom",
    "/proc/sys/kernel/keys/root_maxkeys",
];

fn machine_settings() -> BTreeMap<&'static str, String> {
    MACHINE_SETTINGS
        .iter()
        .map(|p| {
            let v = std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"));
            (*p, v.trim().to_string())
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proxy {
    Malla,
    KubeProxy,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Malla => "Malla",
            Proxy::KubeProxy => "kube-proxy",
        }
    }
}

/// One proxy at one size.
#[derive(Debug, Clone)]
struct Figures {
    full: Duration,
    creations: Vec<Duration>,
    connect: Vec<Duration>,
    /// Connections that got no answer within 2 s (left out of `connect`).
    failed: usize,
    per_sec: f64,
    rss_kib: u64,
}

struct Row {
    n: usize,
    malla: Figures,
    kube_proxy: Figures,
}

fn service(name: &str, namespace: &str, ip: Ipv4Addr, selector: bool) -> Service {
    Service {
        namespace: namespace.into(),
        name: name.into(),
        cluster_ips: vec![IpAddr::V4(ip)],
        ports: vec![ServicePort {
            port: 80,
            target_port: Some(TargetPort::Number(SERVER_PORT)),
            ..ServicePort::default()
        }],
        selector: selector.then(|| BTreeMap::from([("app".to_string(), "server".to_string())])),
        ..Service::default()
    }
}

fn dummy(i: usize, eps: usize) -> (Service, EndpointSlice) {
    let ip = Ipv4Addr::from(SVC_BASE + DUMMY_FIRST + i as u32);
    let svc = service(
        &format!("svc-{i:05}"),
        &format!("bench-{:02}", i % SVC_NAMESPACES),
        ip,
        false,
    );
    let slice = EndpointSlice {
        namespace: svc.namespace.clone(),
        name: format!("{}-bench", svc.name),
        service: svc.name.clone(),
        address_type: AddressType::IPv4,
        endpoints: (0..eps)
            .map(|j| {
                let k = (i * eps + j) % EP_SPAN;
                Endpoint {
                    addresses: vec![IpAddr::V4(Ipv4Addr::from(EP_BASE + 1 + k as u32))],
                    conditions: EndpointConditions::default(),
                    node_name: Some(format!("node-{}", 2 + k % 50)),
                    target: None,
                }
            })
            .collect(),
        ports: vec![EndpointPort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: SERVER_PORT,
        }],
    };
    (svc, slice)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.sizes.is_empty()
        || args.sizes.iter().any(|n| !(2..=DUMMY_SPAN).contains(n))
        || !args.sizes.is_sorted()
    {
        bail!("--sizes: ascending numbers in 2..={DUMMY_SPAN}");
    }
    if !(1..=50).contains(&args.endpoints) || !(1..=50).contains(&args.creations) {
        bail!("--endpoints and --creations must be in 1..=50");
    }
    if !(10..=100_000).contains(&args.connections) || !(1..=16).contains(&args.writers) {
        bail!("--connections must be in 10..=100000, --writers in 1..=16");
    }
    // Services made during the run: per size and proxy, one fresh and `creations`.
    if (args.sizes.len() * 2 * (args.creations + 1)) as u32 >= PROBE_SPAN {
        bail!("too many sizes and creations for the probe range");
    }
    let deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let kube_proxy_bin = match &args.kube_proxy_bin {
        Some(p) => p.clone(),
        None => KubeProxy::binary()?,
    };
    let before = machine_settings();
    let rows = run(&args, &bins, kube_proxy_bin, deadline);
    let after = machine_settings();
    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}: {v} -> {}", after[k]))
        .collect();
    if !changed.is_empty() {
        bail!("machine-wide settings changed: {}", changed.join("; "));
    }
    let rows = rows?;
    println!();
    println!(
        "machine-wide settings unchanged: {}",
        MACHINE_SETTINGS.join(", ")
    );
    report(&args, &rows);
    Ok(())
}

struct Bench<'a> {
    args: &'a Args,
    bins: &'a Bins,
    lab: Lab,
    store: Box<dyn Store>,
    client_ns: String,
    node_ns: String,
    kube_proxy: KubeProxy,
    /// Probe Services made so far (their addresses come from the probe range in order).
    probes: u32,
    deadline: Instant,
}

fn run(
    args: &Args,
    bins: &Bins,
    kube_proxy_bin: PathBuf,
    deadline: Instant,
) -> anyhow::Result<Vec<Row>> {
    eprintln!("kube-proxy-bench: bringing up a 1-node lab on the Kubernetes datastore");
    let mut opts = bins.up_options(1, RoutingMode::Direct);
    opts.datastore = Backend::Kubernetes;
    let mut lab = Lab::up("kp", &opts)?;
    let text = format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: c\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: server\n  namespace: default\n  labels:\n    app: server\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: s\n    ports:\n    - containerPort: {SERVER_PORT}\n"
    );
    lab.apply_pods(&bins.malla, &text)?;
    let client_ns = lab.pod("client")?.netns.clone();
    let node = lab.state.nodes[0].clone();
    let store = malla_lab::store::open(&lab.paths, &lab.state)?;
    let kube_proxy = KubeProxy {
        binary: kube_proxy_bin,
        kubeconfig: malla_lab::store::control_plane_dir(&lab.paths).join("kubeconfig"),
        node: node.name.clone(),
        node_ip: node.underlay_ipv4,
        cluster_cidr: default_pool()?.cidr.to_string(),
        legacy_links: match args.iptables.as_str() {
            "legacy" => Some(KubeProxy::legacy_links(
                &lab.paths.node_dir(&node.name).join("iptables-legacy"),
            )?),
            _ => None,
        },
    };
    let mut b = Bench {
        args,
        bins,
        lab,
        store,
        client_ns,
        node_ns: node.netns.clone(),
        kube_proxy,
        probes: 0,
        deadline,
    };
    for ns in 0..SVC_NAMESPACES {
        let name = format!("bench-{ns:02}");
        let obj = malla_api::Namespace {
            name: name.clone(),
            labels: BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.clone())]),
        };
        b.store
            .put(&keys::namespace(&name), &serde_json::to_string(&obj)?)?;
    }
    let real = b.probe_service("real")?;
    b.wait_answer(real, Instant::now())
        .context("the real Service through Malla")?;

    let mut rows = Vec::new();
    let mut dummies = 0;
    for &n in &args.sizes {
        check(deadline)?;
        let want = n - 1;
        if want > dummies {
            let t = Instant::now();
            write_dummies(&b.lab, dummies..want, args, deadline)?;
            eprintln!(
                "{n} Services: {} dummies written in {:.1} s",
                want - dummies,
                t.elapsed().as_secs_f64()
            );
            dummies = want;
        }
        let malla = b.measure(Proxy::Malla, n, real)?;
        let kube_proxy = b.measure(Proxy::KubeProxy, n, real)?;
        rows.push(Row {
            n,
            malla,
            kube_proxy,
        });
    }
    Ok(rows)
}

/// Writes dummies `range` (Service, then its slice) with `args.writers` threads, each with a
/// client of its own.
fn write_dummies(
    lab: &Lab,
    range: std::ops::Range<usize>,
    args: &Args,
    deadline: Instant,
) -> anyhow::Result<()> {
    let items: Vec<usize> = range.collect();
    let chunk = items.len().div_ceil(args.writers).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || -> anyhow::Result<()> {
                    let store = malla_lab::store::open(&lab.paths, &lab.state)?;
                    for (k, &i) in part.iter().enumerate() {
                        if k % 200 == 0 {
                            check(deadline)?;
                        }
                        let (svc, slice) = dummy(i, args.endpoints);
                        store
                            .put(
                                &keys::service(&svc.namespace, &svc.name),
                                &serde_json::to_string(&svc)?,
                            )
                            .with_context(|| format!("writing Service {}", svc.key()))?;
                        store
                            .put(
                                &keys::endpoint_slice(&slice.namespace, &slice.name),
                                &serde_json::to_string(&slice)?,
                            )
                            .with_context(|| format!("writing slice {}", slice.name))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        Ok(())
    })
}

impl Bench<'_> {
    /// Creates Service `name` selecting the server; returns its ClusterIP address.
    fn probe_service(&mut self, name: &str) -> anyhow::Result<SocketAddr> {
        let ip = Ipv4Addr::from(SVC_BASE + PROBE_FIRST + self.probes);
        self.probes += 1;
        let svc = service(name, "default", ip, true);
        self.store.put(
            &keys::service(&svc.namespace, &svc.name),
            &serde_json::to_string(&svc)?,
        )?;
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, 80)))
    }

    /// Waits until the endpoint-slice controller has given Service `default/name` a ready
    /// endpoint.
    fn wait_slice(&self, name: &str) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let (slices, _) = malla_store::list_json::<EndpointSlice>(
                &*self.store,
                &format!("{}default/", keys::ENDPOINT_SLICES),
            )?;
            if slices.iter().any(|(_, s, _)| {
                s.service == name
                    && s.endpoints
                        .iter()
                        .any(|e| e.conditions.ready && !e.addresses.is_empty())
            }) {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("no ready endpoint for Service default/{name} after 60 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Tries `addr` from the client pod until the server answers; the time since `since`.
    fn wait_answer(&self, addr: SocketAddr, since: Instant) -> anyhow::Result<Duration> {
        self.answer_within(addr, since, Duration::from_secs(self.args.program_timeout))
    }

    /// [`Self::wait_answer`] giving up after `timeout`.
    fn answer_within(
        &self,
        addr: SocketAddr,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let ns = NetNs::open_named(&self.client_ns)?;
        let deadline = self.deadline;
        std::thread::spawn(move || -> anyhow::Result<Duration> {
            ns.enter_this_thread()?;
            let mut buf = [0u8; 256];
            loop {
                if since.elapsed() > timeout {
                    bail!("{addr} did not answer within {timeout:?}");
                }
                check(deadline)?;
                // A short timeout: a SYN sent before the rule existed is not retried for 1 s;
                // a new connection (another source port) is.
                if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(10)) {
                    use std::io::Read;
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    if let Ok(n) = s.read(&mut buf) {
                        if buf[..n].starts_with(b"default/server") {
                            return Ok(since.elapsed());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("probing thread panicked"))?
    }

    /// `args.connections` sequential connections from the client pod to `addr` (after 50
    /// warm-up ones), each a connect and the server's first bytes within 2 s: the successes'
    /// times, the number that failed, and the time they all took.
    fn connections(&self, addr: SocketAddr) -> anyhow::Result<(Vec<Duration>, usize, Duration)> {
        let ns = NetNs::open_named(&self.client_ns)?;
        let (count, deadline) = (self.args.connections, self.deadline);
        std::thread::spawn(
            move || -> anyhow::Result<(Vec<Duration>, usize, Duration)> {
                ns.enter_this_thread()?;
                let one = |buf: &mut [u8]| -> Option<Duration> {
                    use std::io::Read;
                    let t = Instant::now();
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                    let n = s.read(buf).ok()?;
                    buf[..n].starts_with(b"default/server").then(|| t.elapsed())
                };
                let mut buf = [0u8; 256];
                for _ in 0..50 {
                    one(&mut buf);
                }
                let (mut times, mut failed) = (Vec::with_capacity(count), 0);
                let start = Instant::now();
                for i in 0..count {
                    if i % 100 == 0 {
                        check(deadline)?;
                    }
                    match one(&mut buf) {
                        Some(d) => times.push(d),
                        None => failed += 1,
                    }
                }
                if times.is_empty() {
                    bail!("no connection to {addr} was answered");
                }
                Ok((times, failed, start.elapsed()))
            },
        )
        .join()
        .map_err(|_| anyhow::anyhow!("measuring thread panicked"))?
    }

    /// Restarts the node's agent, with or without Services; returns its pid.
    fn restart_agent(&mut self, services: bool) -> anyhow::Result<u32> {
        let node = self.lab.state.nodes[0].clone();
        if let Some(pid) = node.agent_pid {
            stop_and_wait(pid)?;
        }
        let extra: &[&str] = if services { &[] } else { &["--no-services"] };
        let pid = malla_lab::topology::start_agent_with(
            &self.lab.paths,
            &self.bins.malla,
            &node,
            self.lab.state.datastore,
            extra,
        )?;
        self.lab.state.nodes[0].agent_pid = Some(pid);
        self.lab.state.save(&self.lab.paths)?;
        Ok(pid)
    }

    /// Waits (up to 300 s) until the agent has applied everything (its ready file); fails
    /// early when it died.
    fn wait_agent(&self) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let step = malla_lab::topology::wait_converged(
                &self.lab.paths,
                &self.lab.state,
                Duration::from_secs(2),
            );
            let alive = self.lab.state.nodes[0]
                .agent_pid
                .is_some_and(malla_lab::process::is_ours);
            match step {
                Ok(()) => return Ok(()),
                Err(e) if !alive || t.elapsed() > Duration::from_secs(300) => {
                    return Err(e).context(format!(
                        "the agent (alive: {alive}; see {})",
                        self.lab.paths.log("agent-node-1").display()
                    ))
                }
                Err(_) => check(self.deadline)?,
            }
        }
    }

    fn measure(&mut self, proxy: Proxy, n: usize, real: SocketAddr) -> anyhow::Result<Figures> {
        let tag = match proxy {
            Proxy::Malla => "m",
            Proxy::KubeProxy => "k",
        };
        // 1. Full programming: a fresh Service while the proxy is down, then the proxy starts.
        let agent_services = proxy == Proxy::Malla;
        let node_ns = self.node_ns.clone();
        if proxy == Proxy::KubeProxy {
            // Malla stops serving Services first, so that kube-proxy alone answers.
            self.restart_agent(false)?;
            self.wait_agent()?;
        } else if let Some(pid) = self.lab.state.nodes[0].agent_pid {
            stop_and_wait(pid)?;
        }
        let fresh_name = format!("fresh-{n}-{tag}");
        let fresh = self.probe_service(&fresh_name)?;
        self.wait_slice(&fresh_name)?;
        // Nothing may answer it yet: with `--no-services` Malla must not serve it.
        if self
            .answer_within(fresh, Instant::now(), Duration::from_millis(500))
            .is_ok()
        {
            bail!(
                "{fresh} answered before {} started: another proxy serves Services",
                proxy.name()
            );
        }
        let t = Instant::now();
        let (pid, kp_pid) = match proxy {
            Proxy::Malla => (self.restart_agent(agent_services)?, None),
            Proxy::KubeProxy => {
                let log = self.lab.paths.log(&format!("kube-proxy-{n}"));
                let pid = self.kube_proxy.start(&node_ns, &log)?;
                (pid, Some(pid))
            }
        };
        let result = self.measure_running(proxy, n, real, fresh, t, pid);
        if let Some(kp) = kp_pid {
            KubeProxy::stop(kp);
            stop_and_wait(kp)?;
            self.kube_proxy
                .cleanup(&node_ns)
                .context("kube-proxy --cleanup")?;
            self.restart_agent(true)?;
            self.wait_agent()?;
        }
        result
    }

    fn measure_running(
        &mut self,
        proxy: Proxy,
        n: usize,
        real: SocketAddr,
        fresh: SocketAddr,
        started: Instant,
        pid: u32,
    ) -> anyhow::Result<Figures> {
        let full = self
            .wait_answer(fresh, started)
            .with_context(|| format!("{} programming {n} Services", proxy.name()))?;
        eprintln!(
            "{n} Services, {}: programmed in {:.2} s",
            proxy.name(),
            full.as_secs_f64()
        );
        // 2. Creation to first connection.
        let tag = match proxy {
            Proxy::Malla => "m",
            Proxy::KubeProxy => "k",
        };
        let mut creations = Vec::new();
        for k in 0..self.args.creations {
            let t = Instant::now();
            let addr = self.probe_service(&format!("new-{n}-{tag}-{k}"))?;
            creations.push(
                self.wait_answer(addr, t)
                    .with_context(|| format!("{}: a new Service", proxy.name()))?,
            );
        }
        // 3. New connections through `real`.
        let (connect, failed, took) = self.connections(real)?;
        let per_sec = connect.len() as f64 / took.as_secs_f64().max(1e-9);
        // 4. RSS.
        let rss_kib = status_kib(pid, "VmRSS")?
            .with_context(|| format!("no VmRSS for {} (pid {pid})", proxy.name()))?;
        eprintln!(
            "{n} Services, {}: creation→connect p50 {} ms, connect p50 {} / p99 {} ms, {per_sec:.0}/s, {failed} failed, RSS {:.1} MiB",
            proxy.name(),
            ms(percentile(&creations, 50.0)),
            ms(percentile(&connect, 50.0)),
            ms(percentile(&connect, 99.0)),
            mib(rss_kib)
        );
        Ok(Figures {
            full,
            creations,
            connect,
            failed,
            per_sec,
            rss_kib,
        })
    }
}

/// Stops a process of ours and waits (up to 10 s) until it is gone from `/proc` (reaped: every
/// thread has exited and its files, such as the agent's ready-file lock, are closed).
fn report(args: &Args, rows: &[Row]) {
    println!(
        "Services: Malla's proxy vs kube-proxy v1.20 (iptables mode, iptables-{}), one node, {} endpoints per dummy Service, {} creations, {} connections per case",
        args.iptables,
        args.endpoints, args.creations, args.connections
    );
    println!(
        "{:<11} {:>6} {:>10} {:>12} {:>12} {:>9} {:>9} {:>8} {:>7} {:>9}",
        "proxy",
        "N",
        "program s",
        "create p50",
        "create max",
        "conn p50",
        "conn p99",
        "conn/s",
        "failed",
        "RSS MiB"
    );
    for r in rows {
        for (name, f) in [("Malla", &r.malla), ("kube-proxy", &r.kube_proxy)] {
            println!(
                "{:<11} {:>6} {:>10.2} {:>12} {:>12} {:>9} {:>9} {:>8.0} {:>7} {:>9.1}",
                name,
                r.n,
                f.full.as_secs_f64(),
                ms(percentile(&f.creations, 50.0)),
                ms(percentile(&f.creations, 100.0)),
                ms(percentile(&f.connect, 50.0)),
                ms(percentile(&f.connect, 99.0)),
                f.per_sec,
                f.failed,
                mib(f.rss_kib)
            );
        }
    }
    println!();
    println!("Malla / kube-proxy (below 1: Malla lower; for conn/s above 1: Malla more)");
    println!(
        "{:>6} {:>10} {:>12} {:>9} {:>9} {:>8} {:>9}",
        "N", "program", "create p50", "conn p50", "conn p99", "conn/s", "RSS"
    );
    for r in rows {
        let (m, k) = (&r.malla, &r.kube_proxy);
        println!(
            "{:>6} {:>10.3} {:>12.3} {:>9.3} {:>9.3} {:>8.3} {:>9.3}",
            r.n,
            ratio_d(m.full, k.full),
            ratio_d(
                percentile(&m.creations, 50.0),
                percentile(&k.creations, 50.0)
            ),
            ratio_d(percentile(&m.connect, 50.0), percentile(&k.connect, 50.0)),
            ratio_d(percentile(&m.connect, 99.0), percentile(&k.connect, 99.0)),
            ratio(m.per_sec, k.per_sec),
            ratio(m.rss_kib as f64, k.rss_kib as f64)
        );
    }
}
