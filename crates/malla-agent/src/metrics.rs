//! The agent's Prometheus metrics, served on `/metrics` (see [`crate::http`]) as OpenMetrics
//! text to a scraper that asks for it, as the classic Prometheus text format (0.0.4) otherwise
//! (`curl`, `promtool check metrics`). Every series exists from the start (zero until something happens), so a
//! scrape always shows the whole set:
//!
//! | series | type | what |
//! |---|---|---|
//! | `malla_sync_duration_seconds` | histogram | from a batch of datastore changes (or a fresh listing) arriving to the kernel reflecting it: one observation per apply that leaves nothing pending |
//! | `malla_apply_duration_seconds{path}` | histogram | one dataplane apply: `full` (the node's whole desired state, diffed against the kernel), `endpoints` (service endpoints and policy set members changed in place), `links` (routes, VXLAN peers and local pods a links delta named), `repair` (the periodic check against the kernel) |
//! | `malla_programmed_objects{kind}` | gauge | what the kernel holds as last applied, by kind (see [`Programmed`]); the first three follow every links delta, the others every full apply and every service or policy path apply |
//! | `malla_apply_errors_total` | counter | failed applies (any path) |
//! | `malla_datastore_reconnects_total` | counter | times the datastore answered again after it was away (a failed watch or list), or the agent listed again because the history it needed was compacted |
//! | `malla_reverse_path_drops_total` | counter | packets the kernel's strict reverse-path filter dropped in the node's namespace (read at scrape: its `IPReversePathFilter`): IPv4 anti-spoofing where no nft chain checks it ([`malla_calc::guard`]); per-packet records and the `spoofed` flow verdict come only from the chain. On a host whose other interfaces use `rp_filter` too, their drops count here as well |
//! | `malla_flow*` | | flow logs: see [`crate::flows`] |
//! | `malla_sync_pending_seconds` | gauge | how long the oldest datastore change the agent has received (or the listing under way) has been waiting for the driver to acknowledge its apply; 0 when the kernel reflects everything received. The same on every backend: no revision arithmetic. It grows while a listing cannot finish (datastore away at start) or applies keep failing |
//!
//! Recording is a handful of atomic operations per apply; nothing is allocated per element.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The `Content-Type` of [`Metrics::encode_prometheus`]'s text.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The kinds [`Programmed`] counts, in its order (the `kind` label's values).
pub const KINDS: [&str; 8] = [
    "routes",
    "vxlan_peers",
    "local_workloads",
    "service_ports",
    "service_endpoints",
    "network_policies",
    "nft_chains",
    "nft_sets",
];

/// How many objects of each of [`KINDS`] a desired state holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Programmed(pub [i64; KINDS.len()]);

impl Programmed {
    /// Counts `want` (before it is applied): routes to other nodes' blocks and pods, VXLAN
    /// peers, this node's workloads, service ports (one per service, port and family), their
    /// endpoints (each service port's cluster endpoints), the NetworkPolicies the calculation
    /// took as input, and the chains and sets of the node's nft table.
    pub fn of(want: &malla_calc::NodeDataplane, view: &malla_calc::ClusterView) -> Self {
        let endpoints: usize = want
            .service_map
            .entries
            .iter()
            .map(|e| e.cluster_endpoints.len())
            .sum();
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        Self([
            n(want.remote_routes.len()),
            n(want.vxlan_peers.len()),
            n(want.local_endpoints.len()),
            n(want.service_map.entries.len()),
            n(endpoints),
            n(view.policies.len()),
            n(want.nft_table.chains.len()),
            n(want.nft_table.sets.len()),
        ])
    }
}

/// Which apply an observation is about (`path` label of [`Metrics::apply_duration`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyPath {
    Full,
    Endpoints,
    Links,
    Repair,
}

impl ApplyPath {
    const ALL: [ApplyPath; 4] = [
        ApplyPath::Full,
        ApplyPath::Endpoints,
        ApplyPath::Links,
        ApplyPath::Repair,
    ];

    fn label(self) -> &'static str {
        match self {
            ApplyPath::Full => "full",
            ApplyPath::Endpoints => "endpoints",
            ApplyPath::Links => "links",
            ApplyPath::Repair => "repair",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

/// 0.5 ms … 16 s, doubling: an endpoint change is ~1 ms, a full apply at 30k Services ~0.6 s,
/// a cold start a few seconds.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 16)
}

/// The agent's metrics, with handles to every series (recording never looks a label up).
pub struct Metrics {
    registry: Registry,
    sync: Histogram,
    apply: [Histogram; 4],
    programmed: [Gauge; KINDS.len()],
    apply_errors: Counter,
    reconnects: Counter,
    pending: Gauge<f64, AtomicU64>,
    reverse_path_drops: Counter,
    /// The kernel's count when last read (the counter follows its increase).
    reverse_path_seen: AtomicU64,
    /// The flow series ([`crate::flows`]).
    pub flows: crate::flows::FlowMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("malla");
        let sync = Histogram::new(latency_buckets());
        registry.register_with_unit(
            "sync_duration",
            "Time from a batch of datastore changes (or a fresh listing) arriving to the kernel reflecting it",
            Unit::Seconds,
            sync.clone(),
        );
        let apply_family =
            Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        let apply =
            ApplyPath::ALL.map(|p| apply_family.get_or_create(&[("path", p.label())]).clone());
        registry.register_with_unit(
            "apply_duration",
            "Duration of one dataplane apply, by path (full, endpoints, links, repair)",
            Unit::Seconds,
            apply_family,
        );
        let programmed_family = Family::<Labels, Gauge>::default();
        let programmed = KINDS.map(|k| programmed_family.get_or_create(&[("kind", k)]).clone());
        registry.register(
            "programmed_objects",
            "Objects the last full apply put in the kernel, by kind",
            programmed_family,
        );
        let apply_errors = Counter::default();
        registry.register(
            "apply_errors",
            "Dataplane applies that failed",
            apply_errors.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "datastore_reconnects",
            "Times the datastore answered again after being away, or the agent listed again after the history it needed was compacted",
            reconnects.clone(),
        );
        let pending = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "sync_pending",
            "How long the oldest received datastore change (or a listing under way) has waited for its apply to be acknowledged; 0 when nothing waits",
            Unit::Seconds,
            pending.clone(),
        );
        let reverse_path_drops = Counter::default();
        registry.register(
            "reverse_path_drops",
            "Packets the kernel's strict reverse-path filter dropped (IPv4 anti-spoofing where no nft chain checks it)",
            reverse_path_drops.clone(),
        );
        let flows = crate::flows::FlowMetrics::default();
        flows.register(&mut registry);
        Self {
            reverse_path_drops,
            reverse_path_seen: AtomicU64::new(reverse_path_filter_count().unwrap_or(0)),
            registry,
            flows,
            sync,
            apply,
            programmed,
            apply_errors,
            reconnects,
            pending,
        }
    }

    /// A batch of changes (or a listing) became visible in the kernel `took` after it arrived.
    pub fn synced(&self, took: Duration) {
        self.sync.observe(took.as_secs_f64());
    }

    /// One apply on `path` took `took`.
    pub fn applied(&self, path: ApplyPath, took: Duration) {
        self.apply[path as usize].observe(took.as_secs_f64());
    }

    pub fn apply_failed(&self) {
        self.apply_errors.inc();
    }

    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// The oldest change not yet applied has waited `waited` (zero: none waits).
    pub fn pending(&self, waited: Duration) {
        self.pending.set(waited.as_secs_f64());
    }

    /// What the last full apply programmed.
    pub fn programmed(&self, counts: &Programmed) {
        for (g, v) in self.programmed.iter().zip(counts.0) {
            g.set(v);
        }
    }

    /// Records what the service and policy paths change (service ports and endpoints, the
    /// NetworkPolicies taken as input, nft chains and sets: the last five of [`KINDS`]) from
    /// the driver's model after one of their applies; the links keep their values.
    pub fn programmed_model(
        &self,
        table: &malla_calc::nft::Table,
        services: &malla_calc::services::ServiceMap,
        policies: usize,
    ) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let endpoints: usize = services
            .entries
            .iter()
            .map(|e| e.cluster_endpoints.len())
            .sum();
        let counts = [
            n(services.entries.len()),
            n(endpoints),
            n(policies),
            n(table.chains.len()),
            n(table.sets.len()),
        ];
        for (g, v) in self.programmed.iter().skip(3).zip(counts) {
            g.set(v);
        }
    }

    /// Records the links (routes, VXLAN peers, local workloads: the first three of [`KINDS`])
    /// after a links delta was applied; the other kinds keep their values.
    pub fn programmed_links(&self, links: &malla_calc::links::LinksNode) {
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let (routes, peers, local) = links.counts();
        for (g, v) in self.programmed.iter().zip([n(routes), n(peers), n(local)]) {
            g.set(v);
        }
    }

    /// The registry as OpenMetrics text (see [`OPENMETRICS_CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        if let Some(now) = reverse_path_filter_count() {
            let before = self.reverse_path_seen.swap(now, Ordering::Relaxed);
            self.reverse_path_drops.inc_by(now.saturating_sub(before));
        }
        let mut out = String::with_capacity(8192);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The registry in the classic Prometheus text format (see [`PROMETHEUS_CONTENT_TYPE`]).
    pub fn encode_prometheus(&self) -> String {
        openmetrics_to_prometheus(&self.encode())
    }
}

/// The namespace's `IPReversePathFilter` (`/proc/net/netstat`, the `TcpExt` lines: names, then
/// values); None when it cannot be read.
fn reverse_path_filter_count() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut ext = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (ext.next()?, ext.next()?);
    let i = names
        .split_whitespace()
        .position(|n| n == "IPReversePathFilter")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Rewrites OpenMetrics text as the classic Prometheus text format, for what this registry
/// holds (counters, gauges, histograms; no exemplars): a counter family is named with its
/// `_total` suffix there, as its samples are, and `# UNIT` / `# EOF` are left out.
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len() + 16 * counters.len());
    for line in text.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_and_records() {
        let m = Metrics::new();
        let text = m.encode();
        for series in [
            "malla_sync_duration_seconds_count 0",
            "malla_apply_duration_seconds_count{path=\"full\"} 0",
            "malla_apply_duration_seconds_count{path=\"endpoints\"} 0",
            "malla_apply_duration_seconds_count{path=\"links\"} 0",
            "malla_apply_duration_seconds_count{path=\"repair\"} 0",
            "malla_programmed_objects{kind=\"routes\"} 0",
            "malla_programmed_objects{kind=\"service_endpoints\"} 0",
            "malla_apply_errors_total 0",
            "malla_datastore_reconnects_total 0",
            "malla_sync_pending_seconds 0.0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        m.synced(Duration::from_millis(3));
        m.applied(ApplyPath::Endpoints, Duration::from_millis(1));
        m.apply_failed();
        m.reconnected();
        m.reconnected();
        m.pending(Duration::from_millis(1500));
        let mut p = Programmed::default();
        p.0[0] = 5;
        p.0[4] = 300;
        m.programmed(&p);
        let text = m.encode();
        for series in [
            "malla_sync_duration_seconds_count 1",
            "malla_apply_duration_seconds_count{path=\"endpoints\"} 1",
            "malla_apply_duration_seconds_count{path=\"full\"} 0",
            "malla_programmed_objects{kind=\"routes\"} 5",
            "malla_programmed_objects{kind=\"service_endpoints\"} 300",
            "malla_apply_errors_total 1",
            "malla_datastore_reconnects_total 2",
            "malla_sync_pending_seconds 1.5",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        m.pending(Duration::ZERO);
        assert!(m.encode().contains("malla_sync_pending_seconds 0.0"));
    }

    #[test]
    fn the_prometheus_text_names_counter_families_with_their_suffix() {
        let m = Metrics::new();
        m.reconnected();
        let text = m.encode_prometheus();
        for line in [
            "# HELP malla_datastore_reconnects_total Times the datastore",
            "# TYPE malla_datastore_reconnects_total counter\n",
            "malla_datastore_reconnects_total 1\n",
            "# TYPE malla_apply_errors_total counter\n",
            "# TYPE malla_sync_duration_seconds histogram\n",
            "# TYPE malla_programmed_objects gauge\n",
            "malla_sync_pending_seconds 0.0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
    }
}
