//! `dns-bench`: DNS-name egress rules' two figures (issue 15), on a 1-node lab whose pod
//! `client` may reach only `*.bench.test` (and DNS at the external side, 198.19.1.2:53):
//!
//! - **answer → first packet allowed**: a DNS responder in `external` (this program's, so it
//!   can stamp each answer as it sends it) answers `latN.bench.test` with a fresh address of a
//!   TCP listener there; the pod resolves it through the agent's proxy and connects at once.
//!   The figure is the time from the responder's `send` of the answer to the listener's
//!   `accept` of that connection (the handshake done: an upper bound on "first packet
//!   allowed"). Both clocks are this machine's monotonic clock. Every sample is a fresh address
//!   (not learned before); a connect that fails is a first-packet drop. p50/p99.
//! - **names learned per second**: the pod sends queries for distinct names at a fixed rate
//!   for a few seconds (answers with TTL 60 s and distinct addresses); counted: queries sent,
//!   answers the pod got, and addresses in the pod's DNS set afterwards (`nft -j list set` in
//!   the node). A rate holds when every query was answered and every answer learned.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{rdata, RData, Record};
use malla_bench::{begin, percentile, BinArgs};
use malla_dataplane::netns::NetNs;

#[derive(Parser, Debug)]
#[command(
    name = "dns-bench",
    version,
    about = "DNS-name policy: answer-to-allowed latency and names learned per second"
)]
struct Args {
    /// Latency samples (fresh names and addresses).
    #[arg(long, default_value_t = 400)]
    samples: usize,
    /// Query rates tried (names per second), each for `--seconds`.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
    rates: Vec<u32>,
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    #[command(flatten)]
    bins: BinArgs,
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

const DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const PORT: u16 = 8099;
/// Addresses of the latency names (on the external side, reachable): 198.19.1.10–209.
const POOL: u32 = 200;
const LAT_TTL: u32 = 1;

const POD: &str = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: default, labels: {app: client}}\nspec: {nodeName: node-1, containers: [{name: bench}]}\n";
const POLICY: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: client-bench-names}
spec:
  selector: app == 'client'
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {nets: [198.19.1.2/32], ports: [53]}}
  - {action: Allow, protocol: TCP, destination: {domains: ["*.bench.test"]}}
"#;

fn lat_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 1, 10)) + (i as u32 % POOL))
}

fn rate_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 64, 0)) + (i % 16384))
}

/// What the responder answers `name` with: (address, TTL).
fn answer_for(name: &str) -> Option<(Ipv4Addr, u32)> {
    let first = name.split('.').next()?;
    if let Some(n) = first.strip_prefix("lat") {
        return Some((lat_addr(n.parse().ok()?), LAT_TTL));
    }
    if let Some(n) = first.strip_prefix("r") {
        let (_, i) = n.split_once('-')?;
        return Some((rate_addr(i.parse().ok()?), 60));
    }
    None
}

type Stamps = Arc<Mutex<HashMap<Ipv4Addr, Instant>>>;

/// The responder: answers on `sock`, stamping latency answers (by address) as sent.
fn respond(sock: UdpSocket, sent: Stamps) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(query) = q.queries().first().cloned() else {
            continue;
        };
        let name = query.name().to_ascii().trim_end_matches('.').to_string();
        let mut a = Message::new();
        a.set_id(q.id());
        a.set_message_type(MessageType::Response);
        a.set_recursion_desired(true);
        a.set_recursion_available(true);
        a.add_query(query.clone());
        let lat = name.starts_with("lat");
        let addr = answer_for(&name);
        if let Some((ip, ttl)) = addr {
            a.add_answer(Record::from_rdata(
                query.name().clone(),
                ttl,
                RData::A(rdata::A(ip)),
            ));
        }
        let Ok(bytes) = a.to_vec() else { continue };
        let t = Instant::now();
        if sock.send_to(&bytes, from).is_ok() && lat {
            if let (Some((ip, _)), Ok(mut m)) = (addr, sent.lock()) {
                m.insert(ip, t);
            }
        }
    }
}

fn query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    malla_lab::dns::a_query(id, name)
}

fn resolve(name: &str) -> anyhow::Result<Ipv4Addr> {
    malla_lab::dns::resolve_a(SocketAddrV4::new(DNS, 53), name)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(10..=10_000).contains(&args.samples) || !(1..=30).contains(&args.seconds) {
        bail!("--samples must be in 10..=10000, --seconds in 1..=30");
    }
    let _deadline = begin(args.max_seconds)?;
    let bins = args.bins.required()?;
    let mut lab = bins.one_node_lab("dns-bench", "dns")?;
    lab.apply_pods(&bins.malla, POD)?;
    let objects = malla_lab::manifest::parse(POLICY).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    malla_lab::runtime::apply(&lab.paths, &bins.malla, &objects)?;
    let ext = lab.paths.netns("external");
    let node = lab.paths.netns("node-1");
    let pod = NetNs::open_named(&lab.pod("client")?.netns)?;
    // The latency pool's addresses on the external side.
    let out = std::process::Command::new("ip")
        .args(["-n", &ext, "-o", "-4", "addr", "show"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let iface = text
        .lines()
        .find(|l| l.contains(&format!("{DNS}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("no {DNS} in external: {text}"))?
        .to_string();
    for i in 0..POOL as usize {
        let st = std::process::Command::new("ip")
            .args([
                "-n",
                &ext,
                "addr",
                "add",
                &format!("{}/32", lat_addr(i)),
                "dev",
                &iface,
            ])
            .status()?;
        if !st.success() {
            bail!("adding {} to external", lat_addr(i));
        }
    }
    let ext_ns = NetNs::open_named(&ext)?;
    let (dns_sock, listener) = ext_ns.run(|| -> anyhow::Result<_> {
        Ok((
            UdpSocket::bind((DNS, 53))?,
            TcpListener::bind(("0.0.0.0", PORT))?,
        ))
    })??;
    let sent: Stamps = Arc::default();
    let accepted: Stamps = Arc::default();
    {
        let sent = sent.clone();
        std::thread::spawn(move || respond(dns_sock, sent));
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let t = Instant::now();
                if let Ok(SocketAddr::V4(l)) = s.local_addr() {
                    if let Ok(mut m) = accepted.lock() {
                        m.insert(*l.ip(), t);
                    }
                }
            }
        });
    }
    // Converged: a warm-up name resolves and connects.
    let warm = pod.run(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = resolve("lat199.bench.test").and_then(|ip| {
                TcpStream::connect_timeout(
                    &SocketAddr::from((ip, PORT)),
                    Duration::from_millis(500),
                )
                .map_err(Into::into)
            });
            if r.is_ok() || Instant::now() > deadline {
                return r.map(|_| ());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })?;
    warm.context("warm-up")?;
    std::thread::sleep(Duration::from_millis(u64::from(LAT_TTL) * 1000 + 1500));

    // Latency: fresh names, a pause of a TTL and more after each pool's worth.
    let mut lat = Vec::new();
    let mut drops = 0usize;
    let mut i = 0usize;
    while i < args.samples {
        let batch = (args.samples - i).min(POOL as usize - 1);
        let (got, failed) = pod.run(move || {
            let mut got = Vec::new();
            let mut failed = 0usize;
            for k in i..i + batch {
                let ip = match resolve(&format!("lat{}.bench.test", k % (POOL as usize - 1))) {
                    Ok(ip) => ip,
                    Err(_) => {
                        failed += 1;
                        continue;
                    }
                };
                match TcpStream::connect_timeout(
                    &SocketAddr::from((ip, PORT)),
                    Duration::from_millis(900),
                ) {
                    Ok(_) => got.push(ip),
                    Err(_) => failed += 1,
                }
            }
            (got, failed)
        })?;
        drops += failed;
        std::thread::sleep(Duration::from_millis(50));
        let (s, a) = (
            sent.lock().map_err(|_| anyhow::anyhow!("lock"))?,
            accepted.lock().map_err(|_| anyhow::anyhow!("lock"))?,
        );
        for ip in got {
            if let (Some(t0), Some(t1)) = (s.get(&ip), a.get(&ip)) {
                lat.push(t1.saturating_duration_since(*t0));
            }
        }
        drop((s, a));
        i += batch;
        std::thread::sleep(Duration::from_millis(u64::from(LAT_TTL) * 1000 + 1500));
    }
    println!(
        "answer -> first connection accepted: {} samples, p50 {:?}, p99 {:?}, max {:?}; first-try failures {drops}",
        lat.len(),
        percentile(&lat, 50.0),
        percentile(&lat, 99.0),
        lat.iter().max().copied().unwrap_or_default()
    );

    // Names learned per second.
    let set = format!(
        "{}-v4",
        malla_calc::policy::dns::set_name("default/client", &["*.bench.test".to_string()])
    );
    for (round, &rate) in args.rates.iter().enumerate() {
        let total = rate as u64 * args.seconds;
        let (sent_n, answered) = pod.run(move || -> anyhow::Result<(u64, u64)> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let answered = Arc::new(AtomicU64::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let r = s.try_clone()?;
            let (a2, st2) = (answered.clone(), stop.clone());
            let rx = std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !st2.load(Ordering::Relaxed) {
                    if r.recv(&mut buf).is_ok() {
                        a2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
            let t0 = Instant::now();
            let base = round as u64 * 100_000;
            for k in 0..total {
                let due = t0 + Duration::from_secs_f64(k as f64 / f64::from(rate));
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let name = format!("r{round}-{}.bench.test", base + k);
                s.send_to(&query(k as u16, &name)?, SocketAddrV4::new(DNS, 53))?;
            }
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::Relaxed);
            let _ = rx.join();
            Ok((total, answered.load(Ordering::Relaxed)))
        })??;
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &node, "nft", "-j", "list", "set", "inet", "malla", &set,
            ])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let learned = v["nftables"]
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find_map(|x| x["set"]["elem"].as_array().map(Vec::len))
            })
            .unwrap_or(0);
        println!(
            "rate {rate}/s for {}s: {sent_n} queries, {answered} answers, {learned} addresses learned in {set}",
            args.seconds
        );
        // The next round counts its own (TTL 60 s is long: flush instead of waiting).
        let _ = std::process::Command::new("ip")
            .args([
                "netns", "exec", &node, "nft", "flush", "set", "inet", "malla", &set,
            ])
            .status();
    }
    Ok(())
}
