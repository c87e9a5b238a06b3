//! `datastore-scale`: Malla's datastore at cluster scale, on one real etcd (issue 6).
//!
//! The whole run lives in one network namespace of ours (`malla-bench-<pid>-scale`, entered by
//! the main thread before any other thread or child exists): etcd listens on that namespace's
//! 127.0.0.1 and the real agent of part 4 runs there too, on a veth `ul0` as its underlay.
//!
//! 1. Populate: cluster config, a pool, `--nodes` Node records, their IPAM blocks (affinity,
//!    one allocation per pod), `--pods` Pod and WorkloadEndpoint records (no IPAM handle
//!    records: `malla_ipam` writes one only for an address borrowed from another node's
//!    block), written through `EtcdStore` by a few threads.
//! 2. Propagation: `--nodes` simulated node watchers (a real etcd watch each on the cluster
//!    prefix); `--changes` times one Pod's labels change (a put) and every watcher's receipt is
//!    timed from just before the put. A full list (`malla_agent::read_view`, what an agent
//!    does once at start) is timed for comparison.
//! 3. Writes per pod ADD: what the CNI ADD does against the store (read node and config, list
//!    pools, `Ipam::auto_assign_in` hinted with the node's blocks as the agent's node cache
//!    holds them, put the endpoint), writes counted by etcd's revision delta, reads by a
//!    counting store.
//! 4. Agent RSS: one real `malla agent` against this etcd; VmRSS/VmHWM once its ready file
//!    appears (first sync), then the time from a pod change's put until the agent's ready file
//!    holds its revision (watch, mirror, calculation, kernel), combined with part 2's watch
//!    p99 into the time for one change to be applied on every node.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use ipnet::IpNet;
use malla_api::service::Protocol;
use malla_api::{keys, ClusterConfig, ContainerPort, Namespace, Node, Pod, WorkloadEndpoint};
use malla_bench::etcd::{die_with_parent, start as start_etcd, Etcd, ETCD_BIN};
use malla_bench::{
    begin, check, cpu_time, default_pool, mib, ms, percentile, ratio, require_agent, require_file,
    temp_dir, yes, BinArgs, ChildGuard, Namespaces,
};
use malla_dataplane::netns::{self, NetNs};
use malla_ipam::node_cache::CacheState;
use malla_ipam::{Allocation, AutoAssign, Block, Ipam};
use malla_store::{EtcdStore, Event, KeyValue, Revision, Store, StoreError};

#[derive(Parser, Debug)]
#[command(
    name = "datastore-scale",
    version,
    about = "Datastore scale on one real etcd: populate, propagation of one pod change to every node, writes per pod ADD, agent RSS",
    after_help = "Example (as root, ~5 min): datastore-scale --nodes 1000 --pods 30000 --changes 20"
)]
struct Args {
    /// Simulated nodes: Node records, their blocks, one watcher each.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Pods, spread round-robin over the nodes (Pod and WorkloadEndpoint records, an allocation
    /// in their node's block).
    #[arg(long, default_value_t = 30000)]
    pods: usize,
    /// Single pod label changes timed in part 2.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Watchers sharing one etcd client (one HTTP/2 connection); 1 = a connection per node, as
    /// real agents have.
    #[arg(long, default_value_t = 1)]
    watchers_per_client: usize,
    /// Threads the watchers are spread over (each runs a current-thread tokio runtime).
    #[arg(long, default_value_t = 2)]
    watch_threads: usize,
    /// Full re-reads of the view (`read_view`) timed for the current design's row (median).
    #[arg(long, default_value_t = 3)]
    rereads: usize,
    /// Agents re-reading the view at once (each over its own connection), timed to extrapolate
    /// what every node re-reading costs etcd; 0 skips it.
    #[arg(long, default_value_t = 8)]
    concurrent_rereads: usize,
    /// Simulated CNI ADDs in part 3.
    #[arg(long, default_value_t = 200)]
    adds: usize,
    /// Nodes those ADDs go to (the first ones; each already holds its share of the pods, so the
    /// ADDs past its block's free addresses claim a new block).
    #[arg(long, default_value_t = 4)]
    add_nodes: usize,
    /// Pod changes the real agent applies in part 4 (the median and the slowest are reported).
    #[arg(long, default_value_t = 20)]
    agent_changes: usize,
    /// Threads writing the cluster in part 1, each with its own `EtcdStore`.
    #[arg(long, default_value_t = 8)]
    populate_threads: usize,
    /// The cluster's key prefix in etcd.
    #[arg(long, default_value = "/malla-scale")]
    prefix: String,
    /// The etcd binary (Debian's etcd-server).
    #[arg(long, default_value = ETCD_BIN)]
    etcd_bin: PathBuf,
    /// Skip part 4 (the real agent; it needs `malla`).
    #[arg(long)]
    skip_agent: bool,
    /// Skip part 2 (the watcher fleet and the re-reads), e.g. to measure part 3 alone.
    #[arg(long)]
    skip_propagation: bool,
    #[command(flatten)]
    bins: BinArgs,
    /// Give up (and clean up) after this many seconds.
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
}

/// Every request of the bench's own stores (big lists included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Pods live in 198.18.0.0/16 (the lab's default pool), cut into /26 blocks.
const POOL_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const POOL_BLOCKS: usize = 1024;
const BLOCK: usize = 64;
const NAMESPACES: usize = 50;
const APPS: usize = 20;
const TIERS: [&str; 4] = ["web", "api", "db", "cache"];
/// The real agent of part 4: a node of its own, with no pods, on underlay 198.19.0.1/16; the
/// simulated nodes' underlay addresses are 198.19.1.1 onwards (onlink routes via `ul0`).
const AGENT_NODE: &str = "scale-agent";
const AGENT_UNDERLAY: &str = "198.19.0.1/16";
/// Where a receipt of every watcher must arrive, or the change counts as missed.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The synthetic cluster

/// Pod `i` is on node `i % nodes` in slot `i / nodes`; node `k` owns blocks
/// `k * blocks_per_node ..`, slot `s` is address `s % 64` of its block `s / 64`.
struct Layout {
    nodes: usize,
    pods: usize,
    blocks_per_node: usize,
}

impl Layout {
    fn new(nodes: usize, pods: usize) -> anyhow::Result<Self> {
        if nodes == 0 || nodes > 250 * 254 {
            bail!("--nodes must be 1..={}", 250 * 254);
        }
        let per_node = pods.div_ceil(nodes);
        let blocks_per_node = per_node.div_ceil(BLOCK).max(1);
        if nodes * blocks_per_node > POOL_BLOCKS {
            bail!(
                "{nodes} nodes x {blocks_per_node} /26 blocks do not fit the pool 198.18.0.0/16 ({POOL_BLOCKS} blocks)"
            );
        }
        Ok(Self {
            nodes,
            pods,
            blocks_per_node,
        })
    }

    fn node(k: usize) -> String {
        format!("node-{k:04}")
    }

    fn underlay(k: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 1 + (k / 254) as u8, 1 + (k % 254) as u8)
    }

    fn node_record(k: usize) -> Node {
        let name = Self::node(k);
        Node {
            underlay_ipv4: Some(Self::underlay(k)),
            underlay_ipv6: None,
            underlay_mtu: 1500,
            vtep_mac: malla_api::format_mac(&malla_api::mac_from_name(&name)),
            name,
        }
    }

    fn block_cidr(&self, k: usize, b: usize) -> IpNet {
        let index = k * self.blocks_per_node + b;
        let net = Ipv4Addr::from(POOL_BASE + (index * BLOCK) as u32);
        IpNet::new(net.into(), 26).expect("/26 is a valid prefix")
    }

    /// Node, block (of the node) and ordinal of pod `i`.
    fn place(&self, i: usize) -> (usize, usize, u32) {
        let k = i % self.nodes;
        let slot = i / self.nodes;
        (k, slot / BLOCK, (slot % BLOCK) as u32)
    }
}

fn ns_name(n: usize) -> String {
    format!("ns-{n:02}")
}

fn pod_name(i: usize) -> String {
    format!("pod-{i:05}")
}

fn container_id(i: usize) -> String {
    format!("scale{i:08}")
}

fn handle_of(cid: &str) -> String {
    format!("malla.{cid}.eth0")
}

/// The attributes the CNI plugin stores with an allocation.
fn cni_attrs(node: &str, cid: &str, ns: &str, pod: &str) -> BTreeMap<String, String> {
    [
        ("node", node),
        ("containerID", cid),
        ("namespace", ns),
        ("pod", pod),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn pod_record(l: &Layout, i: usize) -> anyhow::Result<Pod> {
    let (k, b, o) = l.place(i);
    let a = i % APPS;
    let addr = l.block_cidr(k, b).network();
    let ip = match addr {
        std::net::IpAddr::V4(v4) => Ipv4Addr::from(u32::from(v4) + o),
        std::net::IpAddr::V6(_) => bail!("IPv4 pool expected"),
    };
    let labels = [
        ("app", format!("app-{a}")),
        ("tier", TIERS[a % TIERS.len()].to_string()),
        ("version", format!("v{}", i % 3)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(Pod {
        namespace: ns_name(i % NAMESPACES),
        name: pod_name(i),
        labels,
        node: Layout::node(k),
        ports: vec![ContainerPort {
            name: Some("http".into()),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        ips: vec![ip.into()],
        allowed_source_prefixes: Vec::new(),
        host_network: false,
    })
}

/// The host-side veth name the CNI plugin derives from the container id (FNV-1a, as
/// `malla_cni::pod::host_ifname` for `eth0`).
fn host_ifname(cid: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in cid.bytes().chain(*b"/eth0") {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("mla{:011x}", h & 0xfff_ffff_ffff)
}

fn endpoint_record(pod: &Pod, cid: &str) -> WorkloadEndpoint {
    WorkloadEndpoint {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        node: pod.node.clone(),
        container_id: cid.to_string(),
        ifname: "eth0".into(),
        host_ifname: host_ifname(cid),
        ips: pod.ips.iter().map(|a| IpNet::from(*a)).collect(),
        mac: malla_api::format_mac(&malla_api::mac_from_name(&pod.name)),
        ipam_handle: handle_of(cid),
    }
}

/// What part 1 writes, as (key, JSON) pairs, and how many of each kind.
struct Records {
    items: Vec<(String, String)>,
    kinds: Vec<(&'static str, usize)>,
}

fn json<T: serde::Serialize>(key: &str, v: &T) -> anyhow::Result<(String, String)> {
    Ok((key.to_string(), malla_store::to_json(key, v)?))
}

fn cluster_records(l: &Layout) -> anyhow::Result<Records> {
    let mut items = Vec::with_capacity(2 * l.pods + 2 * l.nodes + NAMESPACES + 2);
    let pool = default_pool()?;
    items.push(json(keys::CLUSTER_CONFIG, &ClusterConfig::default())?);
    items.push(json(&keys::pool(&pool.name), &pool)?);
    for n in 0..NAMESPACES {
        let ns = Namespace {
            name: ns_name(n),
            labels: [("kubernetes.io/metadata.name".to_string(), ns_name(n))].into(),
        };
        items.push(json(&keys::namespace(&ns.name), &ns)?);
    }
    for k in 0..l.nodes {
        items.push(json(
            &keys::node(&Layout::node(k)),
            &Layout::node_record(k),
        )?);
    }
    let mut blocks: Vec<Block> = (0..l.nodes * l.blocks_per_node)
        .map(|idx| {
            let (k, b) = (idx / l.blocks_per_node, idx % l.blocks_per_node);
            Block::new(l.block_cidr(k, b), &pool.name, Some(&Layout::node(k)))
        })
        .collect();
    for i in 0..l.pods {
        let pod = pod_record(l, i)?;
        let cid = container_id(i);
        let (k, b, o) = l.place(i);
        let attrs = cni_attrs(&pod.node, &cid, &pod.namespace, &pod.name);
        // In the node's own block: `malla_ipam` writes no handle record for it.
        blocks[k * l.blocks_per_node + b].allocations.insert(
            o,
            Allocation {
                handle: handle_of(&cid),
                attrs,
            },
        );
        let ep = endpoint_record(&pod, &cid);
        items.push(json(&keys::endpoint(&ep.node, &cid, &ep.ifname), &ep)?);
        items.push(json(&keys::pod(&pod.namespace, &pod.name), &pod)?);
    }
    for b in &blocks {
        items.push(json(&keys::block(&b.cidr), b)?);
    }
    Ok(Records {
        items,
        kinds: vec![
            ("nodes", l.nodes),
            ("blocks", blocks.len()),
            ("pods", l.pods),
            ("endpoints", l.pods),
            ("namespaces", NAMESPACES),
            ("pool + config", 2),
        ],
    })
}

fn connect(etcd: &Etcd, prefix: &str) -> anyhow::Result<EtcdStore> {
    EtcdStore::connect(&[etcd.endpoint()], prefix, REQUEST_TIMEOUT)
        .with_context(|| format!("connecting to etcd at {}", etcd.endpoint()))
}

// ---------------------------------------------------------------------------------------------
// A store that counts what goes through it

/// Forwards to a store, counting reads (calls and value bytes) and successful writes by kind
/// of key. Failed compare-and-swaps are counted apart (they do not bump etcd's revision).
struct Counting<'a> {
    inner: &'a dyn Store,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    conflicts: AtomicU64,
    block_creates: AtomicU64,
    writes: Mutex<BTreeMap<&'static str, u64>>,
}

fn key_class(key: &str) -> &'static str {
    if key.starts_with(keys::HANDLES) {
        "handle"
    } else if key.starts_with(keys::BLOCKS) {
        "block"
    } else if key.starts_with(keys::ENDPOINTS) {
        "endpoint"
    } else {
        "other"
    }
}

impl<'a> Counting<'a> {
    fn new(inner: &'a dyn Store) -> Self {
        Self {
            inner,
            reads: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
            block_creates: AtomicU64::new(0),
            writes: Mutex::new(BTreeMap::new()),
        }
    }

    fn read(&self, values: impl IntoIterator<Item = usize>) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let bytes: usize = values.into_iter().sum();
        self.read_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn wrote(&self, key: &str) {
        if let Ok(mut w) = self.writes.lock() {
            *w.entry(key_class(key)).or_default() += 1;
        }
    }

    fn written(&self, class: &str) -> u64 {
        self.writes
            .lock()
            .map(|w| w.get(class).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn outcome<T>(&self, key: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => self.wrote(key),
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_)) => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        r
    }
}

impl Store for Counting<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let r = self.inner.get(key)?;
        self.read(r.iter().map(|kv| kv.value.len()));
        Ok(r)
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let r = self.inner.list(prefix)?;
        self.read(r.0.iter().map(|kv| kv.value.len()));
        Ok(r)
    }

    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        let r = self.outcome(key, self.inner.create(key, value));
        if r.is_ok() && key_class(key) == "block" {
            self.block_creates.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn update(&self, key: &str, value: &str, expected: Revision) -> Result<Revision, StoreError> {
        self.outcome(key, self.inner.update(key, value, expected))
    }

    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        self.outcome(key, self.inner.put(key, value))
    }

    fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError> {
        let r = self.inner.delete(key, expected);
        if let Ok(Some(_)) = r {
            self.wrote(key);
        } else if let Err(StoreError::Conflict { .. }) = r {
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        let r = self.inner.events_since(prefix, after)?;
        self.read(r.iter().map(|e| match e {
            Event::Put(kv) => kv.value.len(),
            Event::Delete { .. } => 0,
        }));
        Ok(r)
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision()
    }

    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        self.inner.wait_for_change(after, timeout)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Populate

struct Populate {
    records: usize,
    kinds: Vec<(&'static str, usize)>,
    bytes: usize,
    took: Duration,
    etcd_rss_kib: u64,
    db_bytes: u64,
}

fn populate(args: &Args, l: &Layout, etcd: &Etcd, deadline: Instant) -> anyhow::Result<Populate> {
    let recs = cluster_records(l)?;
    let bytes = recs.items.iter().map(|(_, v)| v.len()).sum();
    let count = recs.items.len();
    let items = Arc::new(recs.items);
    eprintln!(
        "populate: writing {count} records ({:.1} MB of values) with {} threads",
        bytes as f64 / 1e6,
        args.populate_threads
    );
    let threads = args.populate_threads.max(1);
    let t = Instant::now();
    let workers: Vec<JoinHandle<anyhow::Result<()>>> = (0..threads)
        .map(|w| {
            let items = Arc::clone(&items);
            let endpoint = etcd.endpoint();
            let prefix = args.prefix.clone();
            std::thread::spawn(move || {
                let store = EtcdStore::connect(&[endpoint], &prefix, REQUEST_TIMEOUT)?;
                for (n, (k, v)) in items.iter().enumerate().skip(w).step_by(threads) {
                    if n % 1024 < threads {
                        check(deadline)?;
                    }
                    store.put(k, v).with_context(|| format!("writing {k}"))?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow!("a populate thread panicked"))??;
    }
    let took = t.elapsed();
    Ok(Populate {
        records: count,
        kinds: recs.kinds,
        bytes,
        took,
        etcd_rss_kib: malla_bench::status_kib(etcd.pid(), "VmRSS")?.unwrap_or(0),
        db_bytes: etcd.db_bytes(),
    })
}

fn report_populate(args: &Args, p: &Populate) {
    let kinds: Vec<String> = p.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "1. Populate through EtcdStore ({} threads, one put per record): {} records ({}), {:.1} MB of values",
        args.populate_threads,
        p.records,
        kinds.join(", "),
        p.bytes as f64 / 1e6
    );
    println!(
        "   {:.1} s, {:.0} writes/s; etcd VmRSS {:.0} MiB, backend file {:.0} MB",
        p.took.as_secs_f64(),
        ratio(p.records as f64, p.took.as_secs_f64()),
        mib(p.etcd_rss_kib),
        p.db_bytes as f64 / 1e6
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// 2. Propagation

/// A watcher saw an event of `revision` at `at`.
struct Receipt {
    watcher: usize,
    revision: Revision,
    at: Instant,
}

/// The simulated nodes' watches: threads with a current-thread runtime each, stopped on drop.
struct Fleet {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    receipts: mpsc::Receiver<Receipt>,
    clients: usize,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One thread's watchers (`ids`), `per_client` to an etcd client.
async fn run_watchers(
    ids: Vec<usize>,
    endpoint: String,
    key: Vec<u8>,
    per_client: usize,
    receipts: mpsc::Sender<Receipt>,
) -> anyhow::Result<Vec<etcd_client::Client>> {
    let mut clients = Vec::new();
    for chunk in ids.chunks(per_client.max(1)) {
        let client = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .context("connecting a watcher's client")?;
        for &w in chunk {
            let opts = etcd_client::WatchOptions::new().with_prefix();
            let mut stream = client
                .watch_client()
                .watch(key.clone(), Some(opts))
                .await
                .context("creating a watch")?;
            let tx = receipts.clone();
            tokio::spawn(async move {
                while let Ok(Some(resp)) = stream.message().await {
                    let at = Instant::now();
                    for ev in resp.events() {
                        if let Some(kv) = ev.kv() {
                            let revision = kv.mod_revision();
                            let _ = tx.send(Receipt {
                                watcher: w,
                                revision,
                                at,
                            });
                        }
                    }
                }
            });
        }
        clients.push(client);
    }
    Ok(clients)
}

fn start_fleet(args: &Args, etcd: &Etcd, deadline: Instant) -> anyhow::Result<Fleet> {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let (tx, receipts) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, String>>();
    let threads = args.watch_threads.clamp(1, args.nodes.max(1));
    let key = format!("{}/", args.prefix.trim_end_matches('/')).into_bytes();
    let mut fleet = Fleet {
        stop,
        threads: Vec::new(),
        receipts,
        clients: 0,
    };
    for t in 0..threads {
        let ids: Vec<usize> = (t..args.nodes).step_by(threads).collect();
        fleet.clients += ids.len().div_ceil(args.watchers_per_client.max(1));
        let endpoint = etcd.endpoint();
        let key = key.clone();
        let per_client = args.watchers_per_client;
        let tx = tx.clone();
        let ready = ready_tx.clone();
        let mut stop = stop_rx.clone();
        fleet.threads.push(std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let n = ids.len();
                match run_watchers(ids, endpoint, key, per_client, tx).await {
                    Ok(clients) => {
                        let _ = ready.send(Ok(n));
                        while !*stop.borrow() {
                            if stop.changed().await.is_err() {
                                break;
                            }
                        }
                        drop(clients);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("{e:#}")));
                    }
                }
            });
        }));
    }
    drop(ready_tx);
    let mut ready = 0;
    for _ in 0..threads {
        loop {
            check(deadline)?;
            match ready_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Ok(n)) => {
                    ready += n;
                    break;
                }
                Ok(Err(e)) => bail!("starting watchers: {e}"),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("a watcher thread died"),
            }
        }
    }
    if ready != args.nodes {
        bail!("{ready} of {} watchers started", args.nodes);
    }
    Ok(fleet)
}

/// Receipts of `revision` per watcher (None: not within [`RECEIPT_TIMEOUT`]).
fn collect(
    fleet: &Fleet,
    watchers: usize,
    revision: Revision,
    deadline: Instant,
) -> anyhow::Result<Vec<Option<Instant>>> {
    let mut got = vec![None; watchers];
    let mut n = 0;
    let limit = Instant::now() + RECEIPT_TIMEOUT;
    while n < watchers {
        check(deadline)?;
        let now = Instant::now();
        if now >= limit {
            break;
        }
        let wait = (limit - now).min(Duration::from_millis(200));
        match fleet.receipts.recv_timeout(wait) {
            Ok(r) if r.revision == revision && r.watcher < watchers => {
                if got[r.watcher].is_none() {
                    got[r.watcher] = Some(r.at);
                    n += 1;
                }
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("every watcher stopped"),
        }
    }
    Ok(got)
}

struct Change {
    revision: Revision,
    put: Duration,
    latencies: Vec<Duration>,
    missed: usize,
    slowest: Option<(usize, Duration)>,
}

struct Propagation {
    setup: Duration,
    clients: usize,
    threads: usize,
    etcd_rss_delta_kib: i64,
    self_rss_delta_kib: i64,
    changes: Vec<Change>,
    event_bytes: usize,
    etcd_cpu: Duration,
    self_cpu: Duration,
    reread: Duration,
    reread_bytes: u64,
    reread_lists: u64,
    /// Wall time of `--concurrent-rereads` read_views at once, and etcd's CPU time meanwhile.
    concurrent: Option<(Duration, Duration)>,
}

fn self_rss_kib() -> u64 {
    malla_bench::status_kib(std::process::id(), "VmRSS")
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Pod `i` with the label `bench-change` set to `c`, as (key, JSON).
fn changed_pod(l: &Layout, i: usize, c: usize) -> anyhow::Result<(String, String)> {
    let mut pod = pod_record(l, i)?;
    pod.labels.insert("bench-change".into(), c.to_string());
    json(&keys::pod(&pod.namespace, &pod.name), &pod)
}

fn propagation(
    args: &Args,
    l: &Layout,
    etcd: &Etcd,
    store: &EtcdStore,
    deadline: Instant,
) -> anyhow::Result<Propagation> {
    let etcd_rss0 = malla_bench::status_kib(etcd.pid(), "VmRSS")?.unwrap_or(0);
    let self_rss0 = self_rss_kib();
    let t = Instant::now();
    let fleet = start_fleet(args, etcd, deadline)?;
    // Every watch is live once a write under the prefix reaches all of them.
    let warm = store.put("/malla-bench/warmup", "0")?;
    let got = collect(&fleet, args.nodes, warm, deadline)?;
    let missing = got.iter().filter(|g| g.is_none()).count();
    if missing > 0 {
        bail!("{missing} watchers did not see the warm-up write");
    }
    let setup = t.elapsed();
    let etcd_rss1 = malla_bench::status_kib(etcd.pid(), "VmRSS")?.unwrap_or(0);
    let self_rss1 = self_rss_kib();
    eprintln!(
        "propagation: {} watchers live after {:.1} s",
        args.nodes,
        setup.as_secs_f64()
    );

    let mut changes = Vec::new();
    let mut event_bytes = 0;
    let (cpu_etcd0, cpu_self0) = (cpu_time(etcd.pid()), cpu_time(std::process::id()));
    for c in 0..args.changes {
        check(deadline)?;
        let i = (c * 7919 + 13) % l.pods.max(1);
        let (key, value) = changed_pod(l, i, c)?;
        event_bytes = key.len() + value.len();
        let t0 = Instant::now();
        let revision = store.put(&key, &value)?;
        let put = t0.elapsed();
        let got = collect(&fleet, args.nodes, revision, deadline)?;
        let latencies: Vec<Duration> = got
            .iter()
            .flatten()
            .map(|at| at.saturating_duration_since(t0))
            .collect();
        let slowest = got
            .iter()
            .enumerate()
            .filter_map(|(w, at)| at.map(|at| (w, at.saturating_duration_since(t0))))
            .max_by_key(|(_, d)| *d);
        let missed = got.iter().filter(|g| g.is_none()).count();
        eprintln!(
            "  change {}: p99 {} ms, max {} ms, missed {missed}",
            c + 1,
            ms(percentile(&latencies, 99.0)),
            ms(percentile(&latencies, 100.0))
        );
        changes.push(Change {
            revision,
            put,
            latencies,
            missed,
            slowest,
        });
        // Let the fleet drain before the next change.
        std::thread::sleep(Duration::from_millis(100));
    }
    let etcd_cpu = cpu_time(etcd.pid()).saturating_sub(cpu_etcd0);
    let self_cpu = cpu_time(std::process::id()).saturating_sub(cpu_self0);
    let threads = fleet.threads.len();
    let clients = fleet.clients;
    drop(fleet);
    // The current design, once the watchers are gone (nothing else runs).
    let mut rereads = Vec::new();
    let (mut reread_bytes, mut reread_lists) = (0, 0);
    for _ in 0..args.rereads.max(1) {
        check(deadline)?;
        let counting = Counting::new(store);
        let t = Instant::now();
        malla_agent::read_view(&counting).context("read_view")?;
        rereads.push(t.elapsed());
        reread_bytes = counting.read_bytes.load(Ordering::Relaxed);
        reread_lists = counting.reads.load(Ordering::Relaxed);
    }
    let concurrent = match args.concurrent_rereads {
        0 => None,
        k => Some(concurrent_rereads(etcd, &args.prefix, k)?),
    };
    eprintln!(
        "propagation: read_view {} ms, {:.1} MB; {} at once: {:?}",
        ms(percentile(&rereads, 50.0)),
        reread_bytes as f64 / 1e6,
        args.concurrent_rereads,
        concurrent,
    );

    Ok(Propagation {
        setup,
        clients,
        threads,
        etcd_rss_delta_kib: etcd_rss1 as i64 - etcd_rss0 as i64,
        self_rss_delta_kib: self_rss1 as i64 - self_rss0 as i64,
        changes,
        event_bytes,
        etcd_cpu,
        self_cpu,
        reread: percentile(&rereads, 50.0),
        reread_bytes,
        reread_lists,
        concurrent,
    })
}

/// `k` agents re-reading the view at the same moment, each over its own connection (as
/// every node would after a change): the wall time until the last one has it, and the CPU
/// time etcd spent meanwhile.
fn concurrent_rereads(etcd: &Etcd, prefix: &str, k: usize) -> anyhow::Result<(Duration, Duration)> {
    let stores = (0..k)
        .map(|_| connect(etcd, prefix))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start = std::sync::Barrier::new(k + 1);
    std::thread::scope(|s| {
        let readers: Vec<_> = stores
            .iter()
            .map(|st| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    malla_agent::read_view(st).map(|_| ())
                })
            })
            .collect();
        let cpu0 = cpu_time(etcd.pid());
        start.wait();
        let t = Instant::now();
        for r in readers {
            r.join()
                .map_err(|_| anyhow!("a re-reading thread panicked"))??;
        }
        Ok((t.elapsed(), cpu_time(etcd.pid()).saturating_sub(cpu0)))
    })
}

fn human_bytes(b: f64) -> String {
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

fn report_propagation(args: &Args, p: &Propagation) {
    let n = args.nodes;
    println!(
        "2. Propagation of one Pod label change (a put) to {n} simulated nodes, {} changes",
        p.changes.len()
    );
    println!(
        "   each node: one etcd watch on {}/ (prefix, from now); {} per client connection ({} connections) on {} client threads; all live (a warm-up write seen by every one) after {:.1} s; etcd VmRSS {:+.1} MiB, this process {:+.1} MiB",
        args.prefix.trim_end_matches('/'),
        args.watchers_per_client,
        p.clients,
        p.threads,
        p.setup.as_secs_f64(),
        p.etcd_rss_delta_kib as f64 / 1024.0,
        p.self_rss_delta_kib as f64 / 1024.0,
    );
    println!(
        "{:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}  slowest watcher",
        "change", "revision", "put ms", "p50 ms", "p99 ms", "max ms", "missed"
    );
    for (c, ch) in p.changes.iter().enumerate() {
        println!(
            "{:>7} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7}  {}",
            c + 1,
            ch.revision,
            ms(ch.put),
            ms(percentile(&ch.latencies, 50.0)),
            ms(percentile(&ch.latencies, 99.0)),
            ms(percentile(&ch.latencies, 100.0)),
            ch.missed,
            ch.slowest.map_or("-".to_string(), |(w, d)| format!(
                "{} ({} ms)",
                Layout::node(w),
                ms(d)
            ))
        );
    }
    let all: Vec<Duration> = p.changes.iter().flat_map(|c| c.latencies.clone()).collect();
    let missed: usize = p.changes.iter().map(|c| c.missed).sum();
    let changes = p.changes.len().max(1) as u32;
    println!(
        "   per change: etcd CPU {} ms, this process (all {n} watchers) CPU {} ms",
        (p.etcd_cpu / changes).as_millis(),
        (p.self_cpu / changes).as_millis()
    );
    println!();
    let p99 = percentile(&all, 99.0);
    println!(
        "{:<46} {:>7} {:>9} {:>9} {:>9} {:>13} {:>16} {:>11} {:>4}",
        "per change, to every node",
        "pairs",
        "p50 ms",
        "p99 ms",
        "max ms",
        "bytes / node",
        format!("x {n} nodes"),
        "target",
        "met"
    );
    println!(
        "{:<46} {:>7} {:>9} {:>9} {:>9} {:>13} {:>16} {:>11} {:>4}",
        "watch: the event pushed to each node",
        all.len(),
        ms(percentile(&all, 50.0)),
        ms(p99),
        ms(percentile(&all, 100.0)),
        human_bytes(p.event_bytes as f64),
        human_bytes((p.event_bytes * n) as f64),
        "p99 < 1000",
        yes(p99 < Duration::from_secs(1) && missed == 0)
    );
    println!(
        "{:<46} {:>7} {:>9} {:>9} {:>9} {:>13} {:>16} {:>11} {:>4}",
        "a full list (agent start or re-list only)",
        "1 node",
        ms(p.reread),
        "-",
        "-",
        human_bytes(p.reread_bytes as f64),
        human_bytes(p.reread_bytes as f64 * n as f64),
        "-",
        ""
    );
    if let Some((wall, etcd_cpu)) = p.concurrent {
        let k = args.concurrent_rereads;
        let all = wall.mul_f64(n as f64 / k as f64);
        println!(
            "{:<46} {:>7} {:>9} {:>9} {:>9} {:>13} {:>16} {:>11} {:>4}",
            format!("{k} agents listing at once (wall)"),
            format!("{k} nodes"),
            ms(wall),
            "-",
            "-",
            human_bytes(p.reread_bytes as f64),
            format!("~{:.0} s", all.as_secs_f64()),
            "-",
            ""
        );
        let per_read = etcd_cpu / k as u32;
        println!(
            "   {k} agents listing at once take {} ms, {:.0} MB/s out of etcd (their decoding shares this machine's CPUs with etcd): all {n} nodes listing at once (a cluster-wide restart) would take ~{:.0} s (x {n}/{k}, extrapolated, not run)",
            ms(wall),
            ratio(p.reread_bytes as f64 * k as f64 / 1e6, wall.as_secs_f64()),
            all.as_secs_f64()
        );
        println!(
            "   etcd alone spent {} ms of CPU per list served: {n} lists are ~{:.0} CPU-seconds of etcd, whatever the clients' hardware",
            per_read.as_millis(),
            (per_read * n as u32).as_secs_f64()
        );
    }
    println!(
        "   watch latency = put start -> event decoded by the watcher; {missed} (watcher, change) pairs missed (not within {} s).",
        RECEIPT_TIMEOUT.as_secs()
    );
    println!(
        "   The agent lists the cluster once ({} lists, median {} ms for one node alone), then follows one watch like these: a change costs each node the event ({} instead of {}), and its mirror, calculation and kernel update (part 4 times them end to end on a real agent).",
        p.reread_lists,
        ms(p.reread),
        human_bytes(p.event_bytes as f64),
        human_bytes(p.reread_bytes as f64),
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// 3. Writes per pod ADD

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum AddKind {
    OwnBlock,
    ClaimedBlock,
    Borrowed,
}

impl AddKind {
    fn label(self) -> &'static str {
        match self {
            AddKind::OwnBlock => "into the node's block",
            AddKind::ClaimedBlock => "claims a new block",
            AddKind::Borrowed => "borrows from another block",
        }
    }
}

struct Add {
    kind: AddKind,
    writes: i64,
    handle: u64,
    block: u64,
    endpoint: u64,
    other: u64,
    conflicts: u64,
    reads: u64,
    read_bytes: u64,
    took: Duration,
}

/// What the CNI plugin's online ADD does against the store (`malla_cni::add_online`, without
/// the veth): node and cluster config, pools, `auto_assign_in` under the handle with the
/// node cache's blocks as the hint, the endpoint.
fn cni_add(
    store: &dyn Store,
    node: &str,
    cid: &str,
    pod: &Pod,
    cache: &CacheState,
) -> anyhow::Result<IpNet> {
    malla_store::get_json::<Node>(store, &keys::node(node))?
        .with_context(|| format!("node {node} is not registered"))?;
    let _config = malla_store::get_json::<ClusterConfig>(store, keys::CLUSTER_CONFIG)?;
    let ipam = Ipam::new(store);
    let pools = ipam.pools()?;
    let want_v4 = pools.iter().any(|p| !p.disabled && p.cidr.addr().is_ipv4());
    let handle = handle_of(cid);
    let req = AutoAssign {
        handle: handle.clone(),
        node: node.to_string(),
        ipv4: want_v4,
        ipv6: false,
        attrs: cni_attrs(node, cid, &pod.namespace, &pod.name),
        affine_hint: cache.affine_hint(),
    };
    let assigned = ipam.auto_assign_in(&req, &pools)?;
    let a = assigned.first().context("no address assigned")?;
    let mut p = pod.clone();
    p.ips = vec![a.addr];
    let ep = endpoint_record(&p, cid);
    malla_store::put_json(store, &keys::endpoint(node, cid, "eth0"), &ep)?;
    Ok(a.block)
}

/// The node cache as the agent keeps it: the node's affine blocks as they are now. The agent
/// refreshes it from its watch after every sync (which follows every ADD's endpoint write), so
/// the bench reads the node's known blocks here, outside the counted ADD.
fn node_cache(store: &dyn Store, known: &[IpNet]) -> anyhow::Result<CacheState> {
    let mut blocks = Vec::with_capacity(known.len());
    for cidr in known {
        if let Some((b, _)) = malla_store::get_json::<Block>(store, &keys::block(cidr))? {
            blocks.push(b);
        }
    }
    Ok(CacheState {
        blocks,
        ..CacheState::default()
    })
}

fn adds(args: &Args, l: &Layout, store: &EtcdStore, deadline: Instant) -> anyhow::Result<Vec<Add>> {
    let nodes = args.add_nodes.clamp(1, args.nodes);
    let mut out = Vec::with_capacity(args.adds);
    // Each node's affine blocks: part 1's, plus those the ADDs claim.
    let mut known: Vec<Vec<IpNet>> = (0..nodes)
        .map(|k| (0..l.blocks_per_node).map(|b| l.block_cidr(k, b)).collect())
        .collect();
    for a in 0..args.adds {
        check(deadline)?;
        let k = a % nodes;
        let node = Layout::node(k);
        let cache = node_cache(store, &known[k])?;
        let cid = format!("scaleadd{a:06}");
        let pod = Pod {
            namespace: ns_name(a % NAMESPACES),
            name: format!("add-{a:05}"),
            labels: BTreeMap::new(),
            node: node.clone(),
            ports: vec![],
            ips: vec![],
            allowed_source_prefixes: Vec::new(),
            host_network: false,
        };
        let counting = Counting::new(store);
        let rev0 = store.revision()?;
        let t = Instant::now();
        let block = cni_add(&counting, &node, &cid, &pod, &cache)
            .with_context(|| format!("simulated ADD {cid} on {node}"))?;
        let took = t.elapsed();
        let rev1 = store.revision()?;
        let kind = if counting.block_creates.load(Ordering::Relaxed) > 0 {
            known[k].push(block);
            AddKind::ClaimedBlock
        } else {
            match malla_store::get_json::<Block>(store, &keys::block(&block))? {
                Some((b, _)) if b.affinity.as_deref() == Some(node.as_str()) => AddKind::OwnBlock,
                _ => AddKind::Borrowed,
            }
        };
        out.push(Add {
            kind,
            writes: rev1 - rev0,
            handle: counting.written("handle"),
            block: counting.written("block"),
            endpoint: counting.written("endpoint"),
            other: counting.written("other"),
            conflicts: counting.conflicts.load(Ordering::Relaxed),
            reads: counting.reads.load(Ordering::Relaxed),
            read_bytes: counting.read_bytes.load(Ordering::Relaxed),
            took,
        });
    }
    Ok(out)
}

fn report_adds(args: &Args, adds: &[Add]) {
    let nodes = args.add_nodes.clamp(1, args.nodes);
    println!(
        "3. Writes per pod ADD: {} simulated CNI ADDs on {} node(s) ({}..{}), as the plugin does them against the store (get node, get cluster config, list pools, Ipam::auto_assign_in with the node cache's blocks as the hint, put the endpoint; no veth)",
        adds.len(),
        nodes,
        Layout::node(0),
        Layout::node(nodes - 1)
    );
    println!(
        "{:<28} {:>5} {:>11} {:>9} {:>7} {:>6} {:>9} {:>6} {:>10} {:>11} {:>8} {:>7} {:>4}",
        "ADD",
        "ADDs",
        "writes/ADD",
        "max",
        "handle",
        "block",
        "endpoint",
        "other",
        "reads/ADD",
        "KB read/ADD",
        "p50 ms",
        "target",
        "met"
    );
    let row = |label: &str, v: Vec<&Add>| {
        if v.is_empty() {
            return;
        }
        let n = v.len() as f64;
        let mean = |f: &dyn Fn(&Add) -> f64| v.iter().map(|a| f(a)).sum::<f64>() / n;
        let writes = mean(&|a| a.writes as f64);
        let max = v.iter().map(|a| a.writes).max().unwrap_or(0);
        let took: Vec<Duration> = v.iter().map(|a| a.took).collect();
        println!(
            "{:<28} {:>5} {:>11.2} {:>9} {:>7.2} {:>6.2} {:>9.2} {:>6.2} {:>10.1} {:>11.1} {:>8} {:>7} {:>4}",
            label,
            v.len(),
            writes,
            max,
            mean(&|a| a.handle as f64),
            mean(&|a| a.block as f64),
            mean(&|a| a.endpoint as f64),
            mean(&|a| a.other as f64),
            mean(&|a| a.reads as f64),
            mean(&|a| a.read_bytes as f64) / 1e3,
            ms(percentile(&took, 50.0)),
            "<= 2",
            yes(max <= 2)
        );
    };
    for kind in [AddKind::OwnBlock, AddKind::ClaimedBlock, AddKind::Borrowed] {
        row(
            kind.label(),
            adds.iter().filter(|a| a.kind == kind).collect(),
        );
    }
    row("all", adds.iter().collect());
    let conflicts: u64 = adds.iter().map(|a| a.conflicts).sum();
    let max = adds.iter().map(|a| a.writes).max().unwrap_or(0);
    let counted_match = adds
        .iter()
        .all(|a| a.writes as u64 == a.handle + a.block + a.endpoint + a.other);
    println!(
        "   writes = etcd revision delta around the ADD (nothing else writes meanwhile; {} the per-key count); failed compare-and-swaps: {conflicts}",
        if counted_match { "equal to" } else { "DIFFERS from" }
    );
    if max > 2 {
        println!(
            "   Target missed: {max} writes per ADD, not <= 2 (see the columns: which keys an ADD wrote)."
        );
    } else {
        println!(
            "   Target met: an ADD writes its block (compare-and-swap, or creation when claiming) and its endpoint record; an IPAM handle record only when borrowing from another node's block."
        );
    }
    println!(
        "   Reads: an ADD into the node's block reads the node, the config, the pools and the hinted block(s) (O(the node's blocks), not O(cluster)); claiming a new block (once per 64 ADDs of a node) still lists every block's summary (the whole blocks prefix)."
    );
    println!();
}

// ---------------------------------------------------------------------------------------------
// 4. Agent RSS

struct AgentFigures {
    first_sync: Duration,
    rss_kib: u64,
    hwm_kib: u64,
    routes: usize,
    blocks: usize,
    changes: Vec<Duration>,
    /// Endpoint record changes (another container of a pod elsewhere), put -> ready file.
    endpoint_changes: Vec<Duration>,
    rss_after_kib: u64,
    hwm_after_kib: u64,
    cpu: Duration,
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The revision of the last change the agent applied, from its ready file, if any (etcd counts
/// its writes, so a later revision covers an earlier put).
fn ready_revision(path: &Path) -> Option<Revision> {
    malla_store::barrier::ReadyFile::read(path)?.revision_number()
}

#[allow(clippy::too_many_arguments)]
fn agent(
    args: &Args,
    l: &Layout,
    malla: &Path,
    netns_name: &str,
    etcd: &Etcd,
    store: &EtcdStore,
    dir: &Path,
    deadline: Instant,
) -> anyhow::Result<AgentFigures> {
    // A veth pair (this kernel has no dummy links); the peer stays in the namespace, unused.
    let addr = format!("addr add {AGENT_UNDERLAY} dev ul0");
    for cmd in [
        "link add ul0 type veth peer name ul0p",
        addr.as_str(),
        "link set ul0 up",
        "link set ul0p up",
    ] {
        let mut v = vec!["-n", netns_name];
        v.extend(cmd.split_whitespace());
        netns::run_ip(&v)?;
    }
    let ready = dir.join("agent.ready");
    let log = dir.join("agent.log");
    let logf = std::fs::File::create(&log)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns_name])
        .arg(malla)
        .args(["agent", "--node", AGENT_NODE, "--underlay-interface", "ul0"])
        .arg("--datastore")
        .arg(etcd.spec(&args.prefix))
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    die_with_parent(&mut cmd);
    let start = Instant::now();
    let mut child = ChildGuard(cmd.spawn().context("starting the agent")?);
    let pid = child.0.id();
    let wait_for = |child: &mut ChildGuard, rev: Revision| -> anyhow::Result<()> {
        let limit = Instant::now() + Duration::from_secs(600);
        while ready_revision(&ready).is_none_or(|r| r < rev) {
            check(deadline)?;
            if let Some(status) = child.0.try_wait()? {
                bail!("the agent exited ({status}):\n{}", log_tail(&log));
            }
            if Instant::now() > limit {
                bail!(
                    "the agent did not apply revision {rev} within 600 s:\n{}",
                    log_tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    };
    wait_for(&mut child, 0)?;
    let first_sync = start.elapsed();
    require_agent(pid)?;
    let kib = |f: &str| -> anyhow::Result<u64> {
        malla_bench::status_kib(pid, f)?.with_context(|| format!("{f} missing for pid {pid}"))
    };
    let (rss_kib, hwm_kib) = (kib("VmRSS")?, kib("VmHWM")?);
    let blocks = Ipam::new(store).blocks()?.len();
    let routes = Command::new("ip")
        .args(["-n", netns_name, "-4", "route", "show", "dev", "ul0"])
        .output()
        .context("listing the agent's routes")?;
    let routes = String::from_utf8_lossy(&routes.stdout)
        .lines()
        .filter(|r| r.contains(" via "))
        .count();
    eprintln!(
        "agent: ready after {:.1} s, VmRSS {rss_kib} KiB, {routes} routes for {blocks} blocks",
        first_sync.as_secs_f64()
    );
    let mut changes = Vec::new();
    for c in 0..args.agent_changes {
        check(deadline)?;
        let i = (c * 104_729 + 7) % l.pods.max(1);
        let (key, value) = changed_pod(l, i, 1000 + c)?;
        let t = Instant::now();
        let rev = store.put(&key, &value)?;
        wait_for(&mut child, rev)?;
        changes.push(t.elapsed());
    }
    // A pod elsewhere gets a new container (a sandbox re-created: same address, another
    // container id and veth): its endpoint record goes and another comes, in one revision
    // each. Until the links node, each computed the agent's whole node again.
    let mut endpoint_changes = Vec::new();
    for c in 0..args.agent_changes {
        check(deadline)?;
        let i = (c * 7_919 + 3) % l.pods.max(1);
        let pod = pod_record(l, i)?;
        let old = container_id(i);
        let new = format!("{old}-r{c}");
        let t = Instant::now();
        store.delete(&keys::endpoint(&pod.node, &old, "eth0"), None)?;
        let ep = endpoint_record(&pod, &new);
        let (key, value) = json(&keys::endpoint(&ep.node, &new, "eth0"), &ep)?;
        let rev = store.put(&key, &value)?;
        wait_for(&mut child, rev)?;
        endpoint_changes.push(t.elapsed());
        // Back as it was, untimed.
        store.delete(&key, None)?;
        let (key, value) = json(
            &keys::endpoint(&pod.node, &old, "eth0"),
            &endpoint_record(&pod, &old),
        )?;
        let rev = store.put(&key, &value)?;
        wait_for(&mut child, rev)?;
    }
    let (rss_after_kib, hwm_after_kib) = (kib("VmRSS")?, kib("VmHWM")?);
    let cpu = cpu_time(pid);
    drop(child);
    Ok(AgentFigures {
        first_sync,
        rss_kib,
        hwm_kib,
        routes,
        blocks,
        changes,
        endpoint_changes,
        rss_after_kib,
        hwm_after_kib,
        cpu,
    })
}

fn report_agent(args: &Args, netns_name: &str, a: &AgentFigures, watch_p99: Option<Duration>) {
    println!(
        "4. One real agent (`malla agent --node {AGENT_NODE}`, direct routing, veth ul0 {AGENT_UNDERLAY}) in {netns_name}, datastore etcd (prefix {}): {} nodes, {} pods",
        args.prefix, args.nodes, args.pods
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>8} {:>4}",
        "", "time s", "VmRSS MiB", "VmHWM MiB", "target", "met"
    );
    println!(
        "{:<40} {:>10.2} {:>10.1} {:>10.1} {:>8} {:>4}",
        "first sync (spawn -> ready file)",
        a.first_sync.as_secs_f64(),
        mib(a.rss_kib),
        mib(a.hwm_kib),
        "< 64",
        yes(mib(a.rss_kib) < 64.0)
    );
    if !a.changes.is_empty() {
        println!(
            "{:<40} {:>10.2} {:>10.1} {:>10.1} {:>8} {:>4}",
            format!("one pod change applied (median of {})", a.changes.len()),
            percentile(&a.changes, 50.0).as_secs_f64(),
            mib(a.rss_after_kib),
            mib(a.hwm_after_kib),
            "-",
            ""
        );
        println!(
            "{:<40} {:>10.3} {:>10} {:>10} {:>8} {:>4}",
            format!("  slowest of the {}", a.changes.len()),
            percentile(&a.changes, 100.0).as_secs_f64(),
            "",
            "",
            "",
            ""
        );
    }
    if !a.endpoint_changes.is_empty() {
        println!(
            "{:<40} {:>10.3} {:>10} {:>10} {:>8} {:>4}",
            format!(
                "one pod re-created elsewhere (median of {})",
                a.endpoint_changes.len()
            ),
            percentile(&a.endpoint_changes, 50.0).as_secs_f64(),
            "",
            "",
            "-",
            ""
        );
        println!(
            "{:<40} {:>10.3} {:>10} {:>10} {:>8} {:>4}",
            format!("  slowest of the {}", a.endpoint_changes.len()),
            percentile(&a.endpoint_changes, 100.0).as_secs_f64(),
            "",
            "",
            "",
            ""
        );
    }
    if let (false, Some(watch_p99)) = (a.changes.is_empty(), watch_p99) {
        let worst = percentile(&a.changes, 100.0);
        let end_to_end = watch_p99 + worst;
        println!(
            "   One pod change, applied on every node: the watch's p99 to {} nodes (part 2, {} ms) + the slowest real-agent change here ({} ms; put -> ready file, which includes its own watch delivery) = {} ms; target p99 < 1000 ms: {}. Each node updates only its own mirror and kernel, so nodes do this in parallel.",
            args.nodes,
            ms(watch_p99),
            ms(worst),
            ms(end_to_end),
            yes(end_to_end < Duration::from_secs(1))
        );
    }
    println!(
        "   {} routes via ul0 for {} blocks of other nodes ({}); agent CPU {:.1} s in all. A change reaches the agent through its watch, updates its mirror, and is computed and applied (put -> ready file holds its revision). The RSS target is the other benches' (< 64 MiB); issue 6 sets none.",
        a.routes,
        a.blocks,
        if a.routes == a.blocks { "all" } else { "MISMATCH" },
        a.cpu.as_secs_f64()
    );
    println!();
}

// ---------------------------------------------------------------------------------------------

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.prefix.is_empty() || !args.prefix.starts_with('/') {
        bail!("--prefix must start with /");
    }
    let layout = Layout::new(args.nodes, args.pods)?;
    let deadline = begin(args.max_seconds)?;
    let malla = args.bins.resolve().malla;
    if !args.skip_agent {
        require_file(&malla, "build it: cargo build --release -p malla")?;
    }
    require_file(
        &args.etcd_bin,
        "install Debian's etcd-server (scripts/deps)",
    )?;

    // Declared first, dropped last: every child below is gone before the namespace goes.
    let mut nss = Namespaces::default();
    let netns_name = nss.create("scale")?;
    // The main thread, before any other thread exists: every thread and child from now on
    // (etcd, the stores' runtime threads, the watchers, the agent) lives in this namespace.
    NetNs::open_named(&netns_name)?
        .enter_this_thread()
        .with_context(|| format!("entering {netns_name}"))?;
    let dir = temp_dir("creating a temp dir")?;
    let etcd = start_etcd(&args.etcd_bin, deadline)?;
    let version = Command::new(&args.etcd_bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "datastore-scale: {} nodes, {} pods ({} per node, {} /26 block(s) each), etcd {version} (single member, 127.0.0.1 in {netns_name}, data on /dev/shm); {cpus} CPUs, load {load}",
        args.nodes,
        args.pods,
        args.pods.div_ceil(args.nodes),
        layout.blocks_per_node
    );
    println!();

    let p = populate(&args, &layout, &etcd, deadline)?;
    report_populate(&args, &p);
    let store = connect(&etcd, &args.prefix)?;

    let mut watch_p99 = None;
    if !args.skip_propagation {
        let prop = propagation(&args, &layout, &etcd, &store, deadline)?;
        report_propagation(&args, &prop);
        let all: Vec<Duration> = prop
            .changes
            .iter()
            .flat_map(|c| c.latencies.clone())
            .collect();
        watch_p99 = Some(percentile(&all, 99.0));
    }

    let a = adds(&args, &layout, &store, deadline)?;
    report_adds(&args, &a);

    if !args.skip_agent {
        let fig = agent(
            &args,
            &layout,
            &malla,
            &netns_name,
            &etcd,
            &store,
            dir.path(),
            deadline,
        )?;
        report_agent(&args, &netns_name, &fig, watch_p99);
    }
    drop(store);
    drop(etcd);
    drop(dir);
    drop(nss);
    Ok(())
}
