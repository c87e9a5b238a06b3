//! The DNS proxy behind DNS-name policy rules ([`malla_calc::policy::dns`]).
//!
//! Why a proxy and not holding answers: an answer must be in the pod's sets before the pod can
//! use it, and the pod must not wait on a poll. Holding answers in the kernel needs a queue the
//! ruleset can send packets to; on this kernel NFQUEUE exists only as an xtables target (no nft
//! `queue`), and a held answer is still parsed in user space. A proxy is one hop for the query
//! and one for the answer, all in this process: it parses the answer, adds the addresses, and
//! only then replies, so the order is certain without any kernel queue.
//!
//! How: the node's table DNATs UDP port 53 from pods with DNS sets to this node's address on
//! [`PROXY_PORT`] (after putting the query through the pod's egress policy with its original
//! destination: [`malla_calc::policy::dns::render_proxy`]). The proxy
//! 1. takes a query only from a pod it has sets for, within a per-pod rate (a token bucket)
//!    and bounded pending counts (per pod and in all), and only a well-formed query with one
//!    question;
//! 2. asks conntrack (one netlink request) for the query's original destination and forwards
//!    it there from its own socket, under a fresh random ID;
//! 3. takes an answer only from the server it asked, with a pending ID and the same question
//!    (an answer nobody asked for opens nothing); parses it (hickory-proto); collects the A and
//!    AAAA records of the question's name and its CNAME chain (at most [`MAX_ADDRESSES`]);
//! 4. adds them to every set of the pod whose patterns match the question's name, each with
//!    the record's TTL as its timeout (one netlink batch over the dataplane's element socket:
//!    the fastest path it has; an address there already takes the new timeout), and only then
//!    sends the answer to the pod (its own ID back).
//!
//! What it learned is kept beside the sets ([`Learned`]: per pod, set and address, the latest
//! answer, which is the set element's timeout) and served as the agent's `GET /dns`
//! ([`malla_calc::policy::dns::LearnedRecord`] lines; at most [`MAX_LEARNED`] records, expired
//! ones kept [`EXPIRED_KEPT_SECS`] so a trace can say so), which `malla policy trace` reads.
//!
//! Malformed or oversized packets are counted and dropped; nothing here panics on input.
//! TCP queries are not proxied (they reach the server as the pod's policy allows, and their
//! answers teach nothing): a pod whose answer came truncated over UDP retries over TCP and
//! then finds no address learned.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::RData;
use malla_calc::nft::element::{Key, Kind, Part};
use malla_calc::policy::dns::{DnsSet, LearnedRecord, EXPIRED_KEPT_SECS, PROXY_PORT};
use malla_dataplane::nft::elements::{Element, ElementSocket, Layout, Value, NFPROTO_INET};

/// Addresses learned from one answer at most.
pub const MAX_ADDRESSES: usize = 64;
/// Queries waiting for an answer, in all and per pod.
const MAX_PENDING: usize = 8192;
const MAX_PENDING_PER_POD: usize = 256;
/// A pod's query rate: a bucket of this many, refilled at this rate per second.
const BURST: f64 = 2000.0;
const RATE: f64 = 2000.0;
/// How long a forwarded query waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest timeout an address gets (a TTL above it is cut).
const MAX_TTL: u32 = 86_400;

/// Records [`Learned`] keeps at most (a full table drops the expired, then the soonest to
/// expire).
pub const MAX_LEARNED: usize = 16_384;

/// One learned address of one set, as the latest answer put it there.
#[derive(Debug, Clone)]
struct Entry {
    patterns: Arc<Vec<String>>,
    name: String,
    record: String,
    ttl: u32,
    expires: Instant,
}

/// What the proxy learned: (pod, set, address) → the latest answer (bounded: [`MAX_LEARNED`]).
#[derive(Debug, Default)]
pub struct Learned {
    entries: Mutex<std::collections::BTreeMap<(String, String, IpAddr), Entry>>,
}

impl Learned {
    fn record(
        &self,
        pod: &str,
        set: &str,
        patterns: &Arc<Vec<String>>,
        name: &str,
        got: &[(IpAddr, String, u32)],
        now: Instant,
    ) {
        let Ok(mut e) = self.entries.lock() else {
            return;
        };
        for (ip, record, ttl) in got {
            e.insert(
                (pod.to_string(), set.to_string(), *ip),
                Entry {
                    patterns: patterns.clone(),
                    name: name.to_string(),
                    record: record.clone(),
                    ttl: *ttl,
                    expires: now + Duration::from_secs(u64::from(*ttl)),
                },
            );
        }
        if e.len() > MAX_LEARNED {
            // Over the bound: the expired go, then the soonest to expire, down to 7/8 of it
            // (one sort per MAX_LEARNED / 8 new records, not one per record).
            e.retain(|_, v| now < v.expires);
            if e.len() > MAX_LEARNED {
                let mut by_expiry: Vec<(Instant, (String, String, IpAddr))> =
                    e.iter().map(|(k, v)| (v.expires, k.clone())).collect();
                by_expiry.sort_unstable_by_key(|(t, _)| *t);
                let excess = e.len() - MAX_LEARNED / 8 * 7;
                for (_, k) in by_expiry.into_iter().take(excess) {
                    e.remove(&k);
                }
            }
        }
    }

    /// Forgets the sets no longer served (`keep`: pod and set names).
    fn retain_sets(&self, keep: &std::collections::HashSet<(String, String)>) {
        if let Ok(mut e) = self.entries.lock() {
            e.retain(|(pod, set, _), _| keep.contains(&(pod.clone(), set.clone())));
        }
    }

    /// The records, of `pod` only if given, as of `now` (expired ones kept a while, marked so).
    pub fn records(&self, pod: Option<&str>, now: Instant) -> Vec<LearnedRecord> {
        let Ok(e) = self.entries.lock() else {
            return Vec::new();
        };
        let kept = Duration::from_secs(EXPIRED_KEPT_SECS);
        e.iter()
            .filter(|((p, _, _), v)| pod.is_none_or(|want| want == p) && now < v.expires + kept)
            .map(|((p, set, ip), v)| {
                let left = if v.expires >= now {
                    v.expires.duration_since(now).as_millis() as i64
                } else {
                    -(now.duration_since(v.expires).as_millis() as i64)
                };
                LearnedRecord {
                    pod: p.clone(),
                    set: set.clone(),
                    patterns: v.patterns.to_vec(),
                    name: v.name.clone(),
                    record: v.record.clone(),
                    rtype: if ip.is_ipv6() { "AAAA" } else { "A" }.into(),
                    address: *ip,
                    ttl: v.ttl,
                    ttl_left_ms: left,
                }
            })
            .collect()
    }
}

/// The running proxy's table (the agent's HTTP server serves it: `GET /dns`); None until the
/// proxy started.
pub fn learned() -> Option<Arc<Learned>> {
    LEARNED.get().cloned()
}

static LEARNED: std::sync::OnceLock<Arc<Learned>> = std::sync::OnceLock::new();

/// What the proxy counts (served in the agent's log; see [`DnsProxy::stats`]).
#[derive(Debug, Default)]
pub struct Stats {
    pub queries: AtomicU64,
    pub answers: AtomicU64,
    pub learned: AtomicU64,
    /// Queries from an address with no DNS set, malformed, over rate or over the pending bound.
    pub refused: AtomicU64,
    /// Answers not matching a pending query (unasked, wrong server, wrong question) or malformed.
    pub unasked: AtomicU64,
    pub failures: AtomicU64,
}

/// The proxy's view of the node: which pods' queries it serves, and their sets.
#[derive(Debug, Default)]
struct Index {
    by_ip: HashMap<IpAddr, Arc<PodSets>>,
    node_ip: Option<Ipv4Addr>,
}

/// A pod's sets: base name and patterns.
type SetList = Vec<(String, Arc<Vec<String>>)>;

#[derive(Debug)]
struct PodSets {
    pod: String,
    sets: SetList,
}

struct Pending {
    pod: SocketAddr,
    id: u16,
    upstream: SocketAddr,
    question: (String, u16),
    sets: Arc<PodSets>,
    since: Instant,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    pending: usize,
}

/// A running proxy (its threads live as long as the agent).
#[derive(Clone)]
pub struct DnsProxy {
    index: Arc<RwLock<Index>>,
    pub stats: Arc<Stats>,
    pub learned: Arc<Learned>,
}

impl DnsProxy {
    /// Binds [`PROXY_PORT`] (UDP, all addresses of the node's namespace) and starts serving.
    pub fn start() -> anyhow::Result<DnsProxy> {
        let listen = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PROXY_PORT)))
            .with_context(|| format!("binding the DNS proxy on UDP port {PROXY_PORT}"))?;
        let upstream = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
            .context("binding the DNS proxy's upstream socket")?;
        upstream.set_read_timeout(Some(Duration::from_millis(250)))?;
        let proxy = DnsProxy {
            index: Arc::default(),
            stats: Arc::default(),
            learned: LEARNED.get_or_init(Arc::default).clone(),
        };
        let pending: Arc<Mutex<HashMap<u16, Pending>>> = Arc::default();
        let ct = Conntrack::open().context("conntrack netlink socket")?;
        {
            let (p, listen, upstream, pending) = (
                proxy.clone(),
                listen.try_clone()?,
                upstream.try_clone()?,
                pending.clone(),
            );
            std::thread::Builder::new()
                .name("dns-queries".into())
                .spawn(move || p.serve_queries(listen, upstream, pending, ct))?;
        }
        {
            let p = proxy.clone();
            std::thread::Builder::new()
                .name("dns-answers".into())
                .spawn(move || p.serve_answers(listen, upstream, pending))?;
        }
        Ok(proxy)
    }

    /// Replaces the pods and sets served (after each full apply of the node).
    pub fn update(&self, sets: &[DnsSet], node_ip: Option<Ipv4Addr>) {
        let mut by_pod: HashMap<&str, (Vec<IpAddr>, SetList)> = HashMap::new();
        for s in sets {
            let e = by_pod
                .entry(&s.pod)
                .or_insert_with(|| (s.pod_ips.clone(), Vec::new()));
            e.1.push((s.set.clone(), Arc::new(s.patterns.clone())));
        }
        self.learned.retain_sets(
            &sets
                .iter()
                .map(|s| (s.pod.clone(), s.set.clone()))
                .collect(),
        );
        let mut by_ip = HashMap::new();
        for (pod, (ips, sets)) in by_pod {
            let entry = Arc::new(PodSets {
                pod: pod.to_string(),
                sets,
            });
            for ip in ips {
                by_ip.insert(ip, entry.clone());
            }
        }
        if let Ok(mut idx) = self.index.write() {
            *idx = Index { by_ip, node_ip };
        }
    }

    fn serve_queries(
        self,
        listen: UdpSocket,
        upstream: UdpSocket,
        pending: Arc<Mutex<HashMap<u16, Pending>>>,
        mut ct: Conntrack,
    ) {
        let mut buf = vec![0u8; 65535];
        let mut buckets: HashMap<IpAddr, Bucket> = HashMap::new();
        let mut rng = Rng::seeded();
        loop {
            let (n, from) = match listen.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "DNS proxy: receiving a query");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            self.stats.queries.fetch_add(1, Ordering::Relaxed);
            let refuse = || {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
            };
            let (sets, node_ip) = match self.index.read() {
                Ok(idx) => (idx.by_ip.get(&from.ip()).cloned(), idx.node_ip),
                Err(_) => (None, None),
            };
            let (Some(sets), Some(node_ip), SocketAddr::V4(from4)) = (sets, node_ip, from) else {
                refuse();
                continue;
            };
            let Some(question) = parse_query(&buf[..n]) else {
                refuse();
                continue;
            };
            // The pod's rate and pending count.
            let now = Instant::now();
            if buckets.len() > 4 * MAX_PENDING {
                buckets.retain(|_, b| b.pending > 0);
            }
            let b = buckets.entry(from.ip()).or_insert(Bucket {
                tokens: BURST,
                at: now,
                pending: 0,
            });
            b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * RATE).min(BURST);
            b.at = now;
            let Ok(mut pend) = pending.lock() else { return };
            // Forget queries that were never answered (and give their pods their count back).
            let stale: Vec<u16> = pend
                .iter()
                .filter(|(_, p)| now.duration_since(p.since) > ANSWER_TIMEOUT)
                .map(|(k, _)| *k)
                .collect();
            for k in stale {
                if let Some(p) = pend.remove(&k) {
                    if let Some(b) = buckets.get_mut(&p.pod.ip()) {
                        b.pending = b.pending.saturating_sub(1);
                    }
                }
            }
            let b = buckets.entry(from.ip()).or_insert(Bucket {
                tokens: BURST,
                at: now,
                pending: 0,
            });
            // Answers returned lower the count in the answer thread's records.
            b.pending = pend.values().filter(|p| p.pod == from).count();
            if b.tokens < 1.0 || b.pending >= MAX_PENDING_PER_POD || pend.len() >= MAX_PENDING {
                drop(pend);
                refuse();
                continue;
            }
            b.tokens -= 1.0;
            let Some(server) =
                ct.original_destination(from4, SocketAddrV4::new(node_ip, PROXY_PORT))
            else {
                drop(pend);
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let mut id = rng.next16();
            while pend.contains_key(&id) {
                id = rng.next16();
            }
            let orig_id = u16::from_be_bytes([buf[0], buf[1]]);
            buf[0..2].copy_from_slice(&id.to_be_bytes());
            pend.insert(
                id,
                Pending {
                    pod: from,
                    id: orig_id,
                    upstream: SocketAddr::V4(server),
                    question,
                    sets,
                    since: now,
                },
            );
            drop(pend);
            if upstream.send_to(&buf[..n], server).is_err() {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn serve_answers(
        self,
        listen: UdpSocket,
        upstream: UdpSocket,
        pending: Arc<Mutex<HashMap<u16, Pending>>>,
    ) {
        let mut buf = vec![0u8; 65535];
        let mut nft: Option<ElementSocket> = None;
        let layout4 = Layout {
            key: vec![Kind::Ipv4],
            value: Value::None,
        };
        let layout6 = Layout {
            key: vec![Kind::Ipv6],
            value: Value::None,
        };
        loop {
            let (n, from) = match upstream.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DNS proxy: receiving an answer");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let unasked = || {
                self.stats.unasked.fetch_add(1, Ordering::Relaxed);
            };
            if n < 12 {
                unasked();
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let Ok(msg) = Message::from_vec(&buf[..n]) else {
                unasked();
                continue;
            };
            let p = {
                let Ok(mut pend) = pending.lock() else { return };
                match pend.get(&id) {
                    Some(p)
                        if p.upstream == from
                            && msg.message_type() == MessageType::Response
                            && question_of(&msg).as_ref() == Some(&p.question) =>
                    {
                        pend.remove(&id)
                    }
                    _ => None,
                }
            };
            let Some(p) = p else {
                unasked();
                continue;
            };
            self.stats.answers.fetch_add(1, Ordering::Relaxed);
            let addrs = answer_addresses(&msg, &p.question.0);
            // (set with family, ttl in ms) → addresses
            let mut groups: std::collections::BTreeMap<(String, bool, u64), Vec<Element>> =
                Default::default();
            let got: Vec<(IpAddr, String, u32)> = addrs
                .iter()
                .map(|(ip, record, ttl)| (*ip, record.clone(), (*ttl).clamp(1, MAX_TTL)))
                .collect();
            let mut matched = Vec::new();
            for (set, patterns) in &p.sets.sets {
                if !patterns
                    .iter()
                    .any(|pat| malla_api::domain::matches(pat, &p.question.0))
                {
                    continue;
                }
                matched.push((set, patterns));
                for (ip, _, ttl) in &got {
                    let v6 = ip.is_ipv6();
                    let name = format!("{set}-{}", if v6 { "v6" } else { "v4" });
                    let ms = u64::from(*ttl) * 1000;
                    groups
                        .entry((name, v6, ms))
                        .or_default()
                        .push(Element::key(Key::one(Part::Addr(*ip))));
                }
            }
            if !groups.is_empty() {
                let count: usize = groups.values().map(Vec::len).sum();
                let (v4, v6): (Vec<_>, Vec<_>) =
                    groups.into_iter().partition(|((_, v6, _), _)| !v6);
                let mut ok = true;
                for (list, layout) in [(v4, &layout4), (v6, &layout6)] {
                    if list.is_empty() {
                        continue;
                    }
                    let g: Vec<(&str, u64, Vec<Element>)> = list
                        .iter()
                        .map(|((s, _, ms), e)| (s.as_str(), *ms, e.clone()))
                        .collect();
                    if nft.is_none() {
                        nft = ElementSocket::open(None).ok();
                    }
                    let done = nft.as_ref().map(|s| {
                        s.add_with_timeouts(NFPROTO_INET, malla_calc::masquerade::TABLE, layout, &g)
                    });
                    if !matches!(done, Some(Ok(()))) {
                        ok = false;
                        nft = None;
                        tracing::warn!(pod = %p.sets.pod, name = %p.question.0, error = ?done.map(|r| r.err().map(|e| e.to_string())), "DNS proxy: adding learned addresses failed");
                    }
                }
                if ok {
                    let now = Instant::now();
                    for (set, patterns) in matched {
                        self.learned
                            .record(&p.sets.pod, set, patterns, &p.question.0, &got, now);
                    }
                    self.stats
                        .learned
                        .fetch_add(count as u64, Ordering::Relaxed);
                    tracing::debug!(pod = %p.sets.pod, name = %p.question.0, ?addrs, "DNS proxy: learned");
                } else {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            buf[0..2].copy_from_slice(&p.id.to_be_bytes());
            if listen.send_to(&buf[..n], p.pod).is_err() {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The one question of a well-formed query (name normalized, type), or None.
fn parse_query(b: &[u8]) -> Option<(String, u16)> {
    let msg = Message::from_vec(b).ok()?;
    if msg.message_type() != MessageType::Query || msg.op_code() != OpCode::Query {
        return None;
    }
    question_of(&msg)
}

fn question_of(msg: &Message) -> Option<(String, u16)> {
    match msg.queries() {
        [q] => Some((
            malla_api::domain::normalize(&q.name().to_ascii()),
            u16::from(q.query_type()),
        )),
        _ => None,
    }
}

/// The A and AAAA records of `qname` and of the names its CNAME chain leads to, with their
/// owners and TTLs (at most [`MAX_ADDRESSES`]).
fn answer_addresses(msg: &Message, qname: &str) -> Vec<(IpAddr, String, u32)> {
    let mut names = vec![qname.to_string()];
    // The chain, in at most as many steps as there are records.
    for _ in 0..msg.answers().len().min(16) {
        let mut grew = false;
        for r in msg.answers() {
            if let RData::CNAME(c) = r.data() {
                let owner = malla_api::domain::normalize(&r.name().to_ascii());
                let target = malla_api::domain::normalize(&c.0.to_ascii());
                if names.contains(&owner) && !names.contains(&target) {
                    names.push(target);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let mut out = Vec::new();
    for r in msg.answers() {
        let ip = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let owner = malla_api::domain::normalize(&r.name().to_ascii());
        if names.contains(&owner) {
            out.push((ip, owner, r.ttl()));
            if out.len() >= MAX_ADDRESSES {
                break;
            }
        }
    }
    out
}

/// IDs no one off the path guesses: xorshift seeded from the kernel's random bytes.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let mut s = [0u8; 8];
        // SAFETY: getrandom into a buffer of the length given.
        let n = unsafe { libc::getrandom(s.as_mut_ptr().cast(), s.len(), 0) };
        let seed = if n == 8 {
            u64::from_ne_bytes(s)
        } else {
            Instant::now().elapsed().as_nanos() as u64 ^ 0x9e37_79b9_7f4a_7c15
        };
        Rng(seed | 1)
    }

    fn next16(&mut self) -> u16 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 24) as u16
    }
}

/// A ctnetlink socket asking for one connection's original destination.
struct Conntrack {
    fd: OwnedFd,
    seq: u32,
}

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

fn attr(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend(((4 + data.len()) as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

fn nest(out: &mut Vec<u8>, kind: u16, inner: &[u8]) {
    out.extend(((4 + inner.len()) as u16).to_ne_bytes());
    out.extend((kind | NLA_F_NESTED).to_ne_bytes());
    out.extend(inner);
}

/// The attributes in `b` (kind without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

impl Conntrack {
    fn open() -> std::io::Result<Conntrack> {
        let fd = malla_dataplane::nft::elements::socket()?;
        Ok(Conntrack { fd, seq: 1 })
    }

    /// The original destination of the UDP flow whose reply goes from `proxy` to `pod`.
    fn original_destination(
        &mut self,
        pod: SocketAddrV4,
        proxy: SocketAddrV4,
    ) -> Option<SocketAddrV4> {
        let mut ip = Vec::new();
        attr(&mut ip, CTA_IP_V4_SRC, &proxy.ip().octets());
        attr(&mut ip, CTA_IP_V4_DST, &pod.ip().octets());
        let mut proto = Vec::new();
        attr(&mut proto, CTA_PROTO_NUM, &[17]);
        attr(&mut proto, CTA_PROTO_SRC_PORT, &proxy.port().to_be_bytes());
        attr(&mut proto, CTA_PROTO_DST_PORT, &pod.port().to_be_bytes());
        let mut tuple = Vec::new();
        nest(&mut tuple, CTA_TUPLE_IP, &ip);
        nest(&mut tuple, CTA_TUPLE_PROTO, &proto);
        let mut payload = vec![libc::AF_INET as u8, 0, 0, 0];
        nest(&mut payload, CTA_TUPLE_REPLY, &tuple);
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(16 + payload.len());
        msg.extend(((16 + payload.len()) as u32).to_ne_bytes());
        msg.extend(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
        msg.extend(NLM_F_REQUEST.to_ne_bytes());
        msg.extend(self.seq.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(payload);
        // SAFETY: send/recv on our socket with buffers of the lengths given.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        loop {
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 16 {
                return None;
            }
            let b = &buf[..n as usize];
            let len = (u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize).min(b.len());
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
            if seq != self.seq {
                continue; // an earlier request's late answer
            }
            if kind == NLMSG_ERROR || len < 20 {
                return None;
            }
            let orig = attrs(&b[20..len])
                .into_iter()
                .find(|(k, _)| *k == CTA_TUPLE_ORIG)?
                .1;
            let mut addr = None;
            let mut port = None;
            for (k, v) in attrs(orig) {
                match k {
                    CTA_TUPLE_IP => {
                        addr = attrs(v).into_iter().find_map(|(k, v)| {
                            (k == CTA_IP_V4_DST && v.len() == 4)
                                .then(|| Ipv4Addr::new(v[0], v[1], v[2], v[3]))
                        })
                    }
                    CTA_TUPLE_PROTO => {
                        port = attrs(v).into_iter().find_map(|(k, v)| {
                            (k == CTA_PROTO_DST_PORT && v.len() == 2)
                                .then(|| u16::from_be_bytes([v[0], v[1]]))
                        })
                    }
                    _ => {}
                }
            }
            return Some(SocketAddrV4::new(addr?, port?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{rdata, Name, Record, RecordType};

    fn answer(q: &str, records: Vec<Record>) -> Message {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        m.add_query(Query::query(Name::from_ascii(q).unwrap(), RecordType::A));
        for r in records {
            m.add_answer(r);
        }
        m
    }

    #[test]
    fn addresses_follow_the_cname_chain_and_nothing_else() {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let m = answer(
            "a.allowed.test.",
            vec![
                Record::from_rdata(
                    name("a.allowed.test."),
                    30,
                    RData::CNAME(rdata::CNAME(name("b.cdn.test."))),
                ),
                Record::from_rdata(
                    name("b.cdn.test."),
                    7,
                    RData::A(rdata::A(Ipv4Addr::new(198, 18, 9, 1))),
                ),
                Record::from_rdata(
                    name("other.test."),
                    7,
                    RData::A(rdata::A(Ipv4Addr::new(198, 18, 9, 2))),
                ),
            ],
        );
        let got = answer_addresses(&m, "a.allowed.test");
        assert_eq!(
            got,
            vec![(
                IpAddr::V4(Ipv4Addr::new(198, 18, 9, 1)),
                "b.cdn.test".into(),
                7
            )]
        );
        assert_eq!(question_of(&m), Some(("a.allowed.test".into(), 1)));
    }

    /// Only the answer from the server asked, to a pending ID, with the same question, reaches
    /// the pod (with its own ID back); the others are counted as unasked (loopback sockets; the
    /// pending query's pod has no sets, so nothing is written to any nft table).
    #[test]
    fn unasked_answers_are_dropped() {
        let lo = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listen = UdpSocket::bind(lo(0)).unwrap();
        let upstream = UdpSocket::bind(lo(0)).unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let pod = UdpSocket::bind(lo(0)).unwrap();
        pod.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let server = UdpSocket::bind(lo(0)).unwrap();
        let other = UdpSocket::bind(lo(0)).unwrap();
        let pending: Arc<Mutex<HashMap<u16, Pending>>> = Arc::default();
        pending.lock().unwrap().insert(
            0x1234,
            Pending {
                pod: pod.local_addr().unwrap(),
                id: 0x0042,
                upstream: server.local_addr().unwrap(),
                question: ("a.allowed.test".into(), 1),
                sets: Arc::new(PodSets {
                    pod: "default/p".into(),
                    sets: Vec::new(),
                }),
                since: Instant::now(),
            },
        );
        let proxy = DnsProxy {
            index: Arc::default(),
            stats: Arc::default(),
            learned: Arc::default(),
        };
        let stats = proxy.stats.clone();
        let up = upstream.local_addr().unwrap();
        let l2 = listen.try_clone().unwrap();
        std::thread::spawn(move || proxy.serve_answers(l2, upstream, pending));
        let msg = |id: u16, q: &str| {
            let mut m = answer(q, Vec::new());
            m.set_id(id);
            m.to_vec().unwrap()
        };
        let mut buf = [0u8; 512];
        // From another socket than the server asked; an ID nobody asked; another question;
        // a query, not an answer; garbage.
        other.send_to(&msg(0x1234, "a.allowed.test."), up).unwrap();
        server.send_to(&msg(0x9999, "a.allowed.test."), up).unwrap();
        server.send_to(&msg(0x1234, "b.allowed.test."), up).unwrap();
        let mut q = Message::new();
        q.set_id(0x1234);
        q.add_query(Query::query(
            Name::from_ascii("a.allowed.test.").unwrap(),
            RecordType::A,
        ));
        server.send_to(&q.to_vec().unwrap(), up).unwrap();
        server.send_to(&[0xff; 40], up).unwrap();
        assert!(
            pod.recv_from(&mut buf).is_err(),
            "an unasked answer reached the pod"
        );
        assert_eq!(stats.unasked.load(Ordering::Relaxed), 5);
        // The real answer: forwarded once, with the pod's ID.
        server.send_to(&msg(0x1234, "a.allowed.test."), up).unwrap();
        let (n, from) = pod.recv_from(&mut buf).unwrap();
        assert_eq!(from, listen.local_addr().unwrap());
        assert_eq!(Message::from_vec(&buf[..n]).unwrap().id(), 0x0042);
        server.send_to(&msg(0x1234, "a.allowed.test."), up).unwrap();
        assert!(pod.recv_from(&mut buf).is_err(), "answered twice");
        assert_eq!(stats.answers.load(Ordering::Relaxed), 1);
    }

    /// The table keeps the latest answer per pod, set and address, says how long is left (or
    /// how long ago it expired), forgets sets no longer served, and never holds more than
    /// MAX_LEARNED records however many answers come.
    #[test]
    fn learned_records_are_latest_and_bounded() {
        let l = Learned::default();
        let pats = Arc::new(vec!["*.allowed.test".to_string()]);
        let t0 = Instant::now();
        let ip = IpAddr::V4(Ipv4Addr::new(198, 19, 1, 7));
        l.record(
            "d/p",
            "dns-1",
            &pats,
            "a.allowed.test",
            &[(ip, "a.allowed.test".into(), 30)],
            t0,
        );
        l.record(
            "d/p",
            "dns-1",
            &pats,
            "b.allowed.test",
            &[(ip, "cdn.test".into(), 5)],
            t0,
        );
        let r = l.records(Some("d/p"), t0 + Duration::from_secs(2));
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].name.as_str(), r[0].record.as_str(), r[0].ttl),
            ("b.allowed.test", "cdn.test", 5)
        );
        assert_eq!(r[0].ttl_left_ms, 3000);
        assert!(
            r[0].describe()
                .contains("b.allowed.test via CNAME cdn.test A 198.19.1.7 (ttl 5 s, 3 s left)"),
            "{}",
            r[0].describe()
        );
        let r = l.records(None, t0 + Duration::from_secs(9));
        assert!(
            !r[0].live() && r[0].describe().contains("expired 4 s ago"),
            "{}",
            r[0].describe()
        );
        assert!(l.records(Some("d/other"), t0).is_empty());
        assert!(l
            .records(None, t0 + Duration::from_secs(EXPIRED_KEPT_SECS + 10))
            .is_empty());
        l.retain_sets(&Default::default());
        assert!(l.records(None, t0).is_empty());
        // A flood of answers, each with many addresses: the table stays bounded, the newest kept.
        for i in 0..(MAX_LEARNED as u32 / 32 + 50) {
            let got: Vec<(IpAddr, String, u32)> = (0..64u32)
                .map(|j| {
                    (
                        IpAddr::V4(Ipv4Addr::from(0xc612_0000 + i * 64 + j)),
                        "x.allowed.test".into(),
                        60 + i,
                    )
                })
                .collect();
            l.record("d/p", "dns-1", &pats, "x.allowed.test", &got, t0);
        }
        let all = l.records(None, t0);
        assert!(
            all.len() <= MAX_LEARNED && all.len() > MAX_LEARNED / 2,
            "{}",
            all.len()
        );
        assert!(
            all.iter().all(|r| r.ttl >= 60 + 50),
            "the soonest to expire go first"
        );
    }

    #[test]
    fn huge_answers_are_bounded_and_garbage_is_refused() {
        let name = Name::from_ascii("x.allowed.test.").unwrap();
        let recs = (0..1000u32)
            .map(|i| {
                Record::from_rdata(
                    name.clone(),
                    5,
                    RData::A(rdata::A(Ipv4Addr::from(0xc612_0000 + i))),
                )
            })
            .collect();
        let m = answer("x.allowed.test.", recs);
        assert_eq!(answer_addresses(&m, "x.allowed.test").len(), MAX_ADDRESSES);
        // Every prefix of a real message, and noise, parse to nothing or to something, never panic.
        let bytes = m.to_vec().unwrap();
        for n in 0..bytes.len().min(600) {
            let _ = parse_query(&bytes[..n]);
            if let Ok(m) = Message::from_vec(&bytes[..n]) {
                let _ = answer_addresses(&m, "x.allowed.test");
            }
        }
        let mut x = 12345u64;
        for _ in 0..2000 {
            let noise: Vec<u8> = (0..64)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = parse_query(&noise);
        }
        // An answer is not a query.
        assert_eq!(parse_query(&bytes), None);
    }
}
