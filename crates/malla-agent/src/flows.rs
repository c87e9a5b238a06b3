//! Flow logs on the agent: the kernel collector ([`malla_dataplane::flows::Collector`]) on a
//! thread of its own feeding the aggregator ([`malla_flows::Aggregator`]), whose directory
//! follows the cluster view; the HTTP routes `/flows` and `/flows/follow` read from it
//! ([`crate::http`]), and its counters are Prometheus series ([`FlowMetrics`]).
//!
//! | series | type | what |
//! |---|---|---|
//! | `malla_flows_total{verdict}` | counter | connections (allowed) and attempts (denied, spoofed, no-endpoint) seen starting |
//! | `malla_flow_drops_total{reason}` | counter | drops by reason: `policy`, `spoofed`, `no-endpoint` (samples: at most 1000/s per rule are logged) |
//! | `malla_flow_rule_hits_total{policy,rule}` | counter | connections allowed by each policy rule, and denies by each isolating policy (`rule="default"`) |
//! | `malla_flow_samples_lost_total{reason}` | counter | samples lost, by reason: `rate-limit` (beyond a deny log's limit, counted by the kernel), `overrun` (NFLOG sequence gaps, socket overruns), `history-full`, `live-full`, `pending-evicted` (the agent's bounds, [`malla_flows::LostReason`]) |
//! | `malla_flow_records_dropped_total` | counter | flows not kept because the history was full, plus connections not tracked because the live table was |
//! | `malla_flow_backlog` | gauge | events in the last batch read from the kernel (how far behind the reader is) |
//! | `malla_flow_history_entries` | gauge | flow entries held (bounded by [`malla_flows::Limits`]) |

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use malla_calc::policy::flowlog::{Dir, NFLOG_GROUP};
use malla_calc::ClusterView;
use malla_dataplane::flows::{Refresh, GET_AT_MOST};
use malla_flows::{Aggregator, Directory, Filter, Flow, Limits, Lost, LostReason, Verdict};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::broadcast;

/// The flow series (see the module's table).
#[derive(Clone, Default)]
pub struct FlowMetrics {
    by_verdict: Family<[(&'static str, &'static str); 1], Counter>,
    drops: Family<[(&'static str, &'static str); 1], Counter>,
    rule_hits: Family<[(&'static str, String); 2], Counter>,
    lost: Family<[(&'static str, &'static str); 1], Counter>,
    dropped: Counter,
    backlog: Gauge,
    entries: Gauge,
}

impl FlowMetrics {
    /// Registers the series in `r` (every verdict and reason from the start).
    pub fn register(&self, r: &mut Registry) {
        for v in ["allowed", "denied", "spoofed", "no-endpoint"] {
            let _ = self.by_verdict.get_or_create(&[("verdict", v)]);
        }
        for v in ["policy", "spoofed", "no-endpoint"] {
            let _ = self.drops.get_or_create(&[("reason", v)]);
        }
        for why in LostReason::ALL {
            let _ = self.lost.get_or_create(&[("reason", why.word())]);
        }
        r.register(
            "flows",
            "Connections (allowed) and attempts (denied, spoofed, no-endpoint) seen starting, by verdict",
            self.by_verdict.clone(),
        );
        r.register(
            "flow_drops",
            "Drops seen in flow samples, by reason (policy, spoofed, no-endpoint)",
            self.drops.clone(),
        );
        r.register(
            "flow_rule_hits",
            "Connections allowed by each policy rule; denies by each isolating policy (rule=default)",
            self.rule_hits.clone(),
        );
        r.register(
            "flow_samples_lost",
            "Flow samples lost, by reason: rate-limit (beyond a deny log's limit), overrun (NFLOG gaps, socket overruns), history-full, live-full, pending-evicted",
            self.lost.clone(),
        );
        r.register(
            "flow_records_dropped",
            "Flows not kept because the flow history or the live connection table was full",
            self.dropped.clone(),
        );
        r.register(
            "flow_backlog",
            "Kernel events in the last batch the flow reader took",
            self.backlog.clone(),
        );
        r.register(
            "flow_history_entries",
            "Flow entries held in the history",
            self.entries.clone(),
        );
    }

    fn observed(&self, f: &Flow) {
        if f.started == 0 {
            return;
        }
        let v = f.key.verdict;
        self.by_verdict
            .get_or_create(&[("verdict", v.word())])
            .inc_by(f.started);
        let reason = match v {
            Verdict::Allowed => None,
            Verdict::Denied => Some("policy"),
            Verdict::Spoofed => Some("spoofed"),
            Verdict::NoEndpoint => Some("no-endpoint"),
        };
        if let Some(r) = reason {
            self.drops.get_or_create(&[("reason", r)]).inc_by(f.started);
        }
        for rule in &f.key.policies {
            // `ns/name ingress[0]` (allow) or `ns/name ingress` (deny by default).
            let (policy, which) = rule.split_once(' ').unwrap_or((rule, ""));
            let which = if v == Verdict::Allowed {
                which.to_string()
            } else {
                format!("{which} default")
            };
            self.rule_hits
                .get_or_create(&[("policy", policy.to_string()), ("rule", which)])
                .inc_by(f.started);
        }
    }
}

/// What the HTTP handlers and the main loop share.
pub struct FlowService {
    node: String,
    agg: Mutex<Aggregator>,
    follow: broadcast::Sender<Arc<Flow>>,
    metrics: FlowMetrics,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Followers further behind than this many flows lose the oldest (and are told).
const FOLLOW_BUFFER: usize = 4096;

impl FlowService {
    /// Starts collecting in the calling thread's namespace (the node's): conntrack accounting
    /// on, the sockets opened here, the reader on a thread of its own.
    pub fn start(node: &str, metrics: FlowMetrics) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        if let Err(e) = malla_dataplane::flows::enable_accounting() {
            tracing::warn!(error = %e, "turning conntrack accounting on: flows will have no byte counts");
        }
        let collector = malla_dataplane::flows::Collector::open(NFLOG_GROUP)
            .context("opening the flow collector")?;
        let (follow, _) = broadcast::channel(FOLLOW_BUFFER);
        let svc = Arc::new(FlowService {
            node: node.to_string(),
            agg: Mutex::new(Aggregator::new(node, Limits::default())),
            follow,
            metrics,
        });
        let me = svc.clone();
        std::thread::Builder::new()
            .name("malla-flows".into())
            .spawn(move || {
                let counted = me.clone();
                collector.run_refreshing(
                    |batch| {
                        me.metrics.backlog.set(batch.len() as i64);
                        me.ingest(batch);
                        true
                    },
                    move || counted.refresh(),
                )
            })
            .context("starting the flow reader's thread")?;
        Ok(svc)
    }

    /// A service fed by the caller only ([`FlowService::ingest`]): no kernel side (tests).
    pub fn detached(node: &str, metrics: FlowMetrics) -> Arc<Self> {
        let (follow, _) = broadcast::channel(FOLLOW_BUFFER);
        Arc::new(FlowService {
            node: node.to_string(),
            agg: Mutex::new(Aggregator::new(node, Limits::default())),
            follow,
            metrics,
        })
    }

    /// Whose conntrack counters the collector reads next: the connections still open.
    fn refresh(&self) -> Refresh {
        let Ok(agg) = self.agg.lock() else {
            return Refresh::Nothing;
        };
        match agg.open_connections(GET_AT_MOST) {
            Some(t) if t.is_empty() => Refresh::Nothing,
            Some(t) => Refresh::Tuples(t),
            None => Refresh::All,
        }
    }

    /// Takes a batch of kernel events (the reader thread's sink).
    pub fn ingest(&self, batch: Vec<malla_flows::KernelEvent>) {
        let t = now();
        let Ok(mut agg) = self.agg.lock() else {
            return;
        };
        let before = agg.stats().clone();
        for ev in batch {
            if let Some(f) = agg.ingest(ev, t) {
                self.metrics.observed(&f);
                let _ = self.follow.send(Arc::new(f));
            }
        }
        let after = agg.stats();
        for (why, n) in &after.lost_by {
            let was = before.lost_by.get(why).copied().unwrap_or(0);
            if *n > was {
                self.metrics
                    .lost
                    .get_or_create(&[("reason", why.word())])
                    .inc_by(n - was);
            }
        }
        self.metrics.dropped.inc_by(
            (after.overflow - before.overflow) + (after.live_overflow - before.live_overflow),
        );
        self.metrics.entries.set(agg.entries() as i64);
    }

    /// The cluster changed: names and policies follow.
    pub fn set_view(&self, view: &ClusterView) {
        let dir = Directory::from_view(view);
        let mut rules = Vec::new();
        for p in &view.policies {
            for (d, n) in [
                (Dir::In, p.spec.ingress.len()),
                (Dir::Out, p.spec.egress.len()),
            ] {
                rules.extend((0..n).map(|i| (p.key(), d, i)));
            }
        }
        tracing::debug!(
            pods = view.endpoints.len(),
            services = view.services.len(),
            policies = view.policies.len(),
            "flow directory rebuilt"
        );
        if let Ok(mut agg) = self.agg.lock() {
            agg.set_directory(dir, rules);
        }
    }

    /// The history's flows that `f` passes.
    pub fn query(&self, f: &Filter) -> Vec<Flow> {
        self.agg.lock().map(|a| a.query(f)).unwrap_or_default()
    }

    /// What was lost in each window ending after `since`.
    pub fn lost(&self, since: Option<u64>) -> Vec<Lost> {
        self.agg.lock().map(|a| a.lost(since)).unwrap_or_default()
    }

    /// Samples lost since the agent started, by reason.
    pub fn lost_so_far(&self) -> BTreeMap<LostReason, u64> {
        self.agg
            .lock()
            .map(|a| a.stats().lost_by.clone())
            .unwrap_or_default()
    }

    /// What was lost since `seen` (a [`FlowService::lost_so_far`], brought up to date), as a
    /// record for followers (`start` = `end` = now); None when nothing was.
    pub fn lost_news(&self, seen: &mut BTreeMap<LostReason, u64>) -> Option<Lost> {
        let now_by = self.lost_so_far();
        let reasons: BTreeMap<LostReason, u64> = now_by
            .iter()
            .filter_map(|(why, n)| {
                let d = n.saturating_sub(seen.get(why).copied().unwrap_or(0));
                (d > 0).then_some((*why, d))
            })
            .collect();
        *seen = now_by;
        if reasons.is_empty() {
            return None;
        }
        let t = now();
        Some(Lost {
            start: t,
            end: t,
            node: self.node.clone(),
            samples: reasons.values().sum(),
            reasons,
        })
    }

    /// Flows as they are observed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.follow.subscribe()
    }
}
