//! The aggregator: kernel events in, windows of flows out.
//!
//! - An allow sample (NFLOG, emitted when the first packet passes a policy rule) waits in
//!   `pending`, keyed by the connection's original tuple, for the conntrack NEW event that
//!   follows it (the kernel queues the sample first; the agent's reader drains the NFLOG socket
//!   after reading conntrack events, so the sample is always ingested before its NEW). A
//!   sample arriving late is attached to the live connection instead.
//! - NEW starts a live connection (its flow key: the ends named by the [`Directory`], the
//!   Service addressed, the endpoint chosen, the allowing rules) and counts `started`.
//! - DESTROY ends it: `completed`, packets and bytes each way.
//! - A deny, spoof or no-endpoint sample is a flow of its own (no conntrack entry is ever
//!   confirmed for a dropped first packet).
//!
//! Bounds ([`Limits`]): the windows kept, the flow entries over all windows, live connections
//! and pending samples. What does not fit is counted in [`Stats`], never silently dropped, and
//! so is what the kernel reports lost ([`KernelEvent::Lost`]): by reason, overall and in the
//! window it happened in ([`Aggregator::lost`]).

use std::collections::{BTreeMap, HashMap, VecDeque};

use malla_calc::policy::flowlog::{Dir, LogPoint, RuleRef};

use crate::{
    proto_name, ConnEvent, Counters, Directory, Filter, Flow, FlowKey, KernelEvent, Lost,
    LostReason, Phase, Tuple, Verdict, WINDOW_SECS,
};

/// How much the aggregator keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Windows of history (240 × 15 s = one hour).
    pub windows: usize,
    /// Flow entries over all windows (with the live table full too, ~76 MB resident at the
    /// defaults: `full_history_memory` in the tests measures it).
    pub flows: usize,
    /// Live connections tracked for their allowing rules (each holds its flow key: ~0.6 KB).
    pub live: usize,
    /// Allow samples waiting for their conntrack NEW.
    pub pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            windows: 240,
            flows: 50_000,
            live: 50_000,
            pending: 16_384,
        }
    }
}

/// What the aggregator saw and what it could not keep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Kernel events ingested.
    pub events: u64,
    /// Samples lost, whatever the reason: the sum over `lost_by`.
    pub lost: u64,
    /// Samples lost by reason: what the kernel reported ([`KernelEvent::Lost`]) and what did
    /// not fit here (the three counts below, each a sample or connection event lost).
    pub lost_by: BTreeMap<LostReason, u64>,
    /// Flows not kept because the history was full.
    pub overflow: u64,
    /// Connections not tracked because the live table was full (their allowing rule is not
    /// known when they end).
    pub live_overflow: u64,
    /// Allow samples evicted before their NEW came.
    pub pending_evicted: u64,
}

#[derive(Debug, Clone, Default)]
struct Acc {
    endpoint: Option<String>,
    started: u64,
    completed: u64,
    out: Counters,
    back: Counters,
}

#[derive(Debug)]
struct Window {
    start: u64,
    flows: HashMap<FlowKey, Acc>,
    lost: BTreeMap<LostReason, u64>,
}

#[derive(Debug, Clone)]
struct Live {
    key: FlowKey,
    endpoint: Option<String>,
    since: u64,
    /// The counters already added to the history.
    out: Counters,
    back: Counters,
    /// Its end is already counted.
    done: bool,
}

fn minus(now: Counters, before: Counters) -> Counters {
    Counters {
        packets: now.packets.saturating_sub(before.packets),
        bytes: now.bytes.saturating_sub(before.bytes),
    }
}

/// The aggregator of one node.
#[derive(Debug)]
pub struct Aggregator {
    limits: Limits,
    node: String,
    dir: Directory,
    /// Rule hashes of over-long policy names → `namespace/name dir[i]`.
    hashed: HashMap<u64, String>,
    windows: VecDeque<Window>,
    entries: usize,
    live: HashMap<Tuple, Live>,
    pending: HashMap<Tuple, Vec<String>>,
    pending_order: VecDeque<Tuple>,
    stats: Stats,
}

/// The tuple a packet of the connection has on the forward hook, where the policy chains log it:
/// after DNAT (the reply's source is the endpoint), before SNAT (the client's own source). An
/// allow sample without the conntrack entry carries just that, so samples wait under it.
fn forward_tuple(orig: &Tuple, reply: Option<&Tuple>) -> Tuple {
    match reply {
        Some(r) => Tuple {
            proto: orig.proto,
            src: orig.src,
            sport: orig.sport,
            dst: r.src,
            dport: r.sport,
        },
        None => *orig,
    }
}

/// `namespace/name ingress[i]`.
fn rule_text(policy: &str, dir: Dir, rule: usize) -> String {
    format!("{policy} {}[{rule}]", dir.policy_word())
}

impl Aggregator {
    pub fn new(node: &str, limits: Limits) -> Self {
        Aggregator {
            limits,
            node: node.to_string(),
            dir: Directory::default(),
            hashed: HashMap::new(),
            windows: VecDeque::new(),
            entries: 0,
            live: HashMap::new(),
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Replaces the directory (the cluster changed). `rules` are the policies' rules
    /// (`namespace/name`, direction, index) whose prefixes may have been hashed.
    pub fn set_directory(
        &mut self,
        dir: Directory,
        rules: impl IntoIterator<Item = (String, Dir, usize)>,
    ) {
        self.dir = dir;
        self.hashed = rules
            .into_iter()
            .map(|(p, d, i)| {
                (
                    malla_calc::policy::flowlog::rule_id(&p, d, i),
                    rule_text(&p, d, i),
                )
            })
            .collect();
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Flow entries held.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Live connections tracked.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// The key of a connection from its tuples: the ends, the Service addressed and the
    /// endpoint it was sent to.
    fn conn_key(
        &self,
        orig: &Tuple,
        reply: Option<&Tuple>,
        verdict: Verdict,
        policies: Vec<String>,
    ) -> (FlowKey, Option<String>) {
        // Held staged verdicts travel with the allow texts; they have a field of their own.
        let (staged, policies): (Vec<String>, Vec<String>) =
            policies.into_iter().partition(|t| is_staged_text(t));
        let service = self
            .dir
            .service(orig.proto, orig.dst, orig.dport)
            .map(str::to_string);
        let translated = reply.filter(|r| r.src != orig.dst || r.sport != orig.dport);
        let (dst, endpoint) = match translated {
            Some(r) => (
                self.dir.peer(r.src),
                Some(std::net::SocketAddr::new(r.src, r.sport).to_string()),
            ),
            None => (self.dir.peer(orig.dst), None),
        };
        (
            FlowKey {
                src: self.dir.peer(orig.src),
                dst,
                service,
                port: orig.dport,
                proto: proto_name(orig.proto),
                verdict,
                policies,
                staged,
            },
            endpoint,
        )
    }

    /// The window of `now` (a late event, the clock gone back, counts in the newest one).
    fn window(&mut self, now: u64) -> Option<&mut Window> {
        let start = now - now % WINDOW_SECS;
        if self.windows.back().is_none_or(|w| w.start < start) {
            self.windows.push_back(Window {
                start,
                flows: HashMap::new(),
                lost: BTreeMap::new(),
            });
            while self.windows.len() > self.limits.windows.max(1) {
                if let Some(w) = self.windows.pop_front() {
                    self.entries -= w.flows.len();
                }
            }
        }
        self.windows.back_mut()
    }

    /// Counts `n` samples lost for `why` at `now`.
    fn lose(&mut self, now: u64, why: LostReason, n: u64) {
        if n == 0 {
            return;
        }
        self.stats.lost += n;
        *self.stats.lost_by.entry(why).or_default() += n;
        if let Some(w) = self.window(now) {
            *w.lost.entry(why).or_default() += n;
        }
    }

    /// Adds to the window of `now`; false when the history is full (counted lost).
    fn record(
        &mut self,
        now: u64,
        key: &FlowKey,
        endpoint: &Option<String>,
        f: impl FnOnce(&mut Acc),
    ) -> bool {
        let entries = self.entries;
        let full = entries >= self.limits.flows;
        let Some(w) = self.window(now) else {
            return false;
        };
        if let Some(acc) = w.flows.get_mut(key) {
            f(acc);
            if acc.endpoint.is_none() {
                acc.endpoint.clone_from(endpoint);
            }
            return true;
        }
        if full {
            self.stats.overflow += 1;
            self.lose(now, LostReason::HistoryFull, 1);
            return false;
        }
        let mut acc = Acc {
            endpoint: endpoint.clone(),
            ..Acc::default()
        };
        f(&mut acc);
        w.flows.insert(key.clone(), acc);
        self.entries += 1;
        true
    }

    fn observation(&self, now: u64, key: FlowKey, endpoint: Option<String>, acc: Acc) -> Flow {
        Flow {
            start: now,
            end: now,
            node: self.node.clone(),
            key,
            endpoint,
            started: acc.started,
            completed: acc.completed,
            packets_out: acc.out.packets,
            bytes_out: acc.out.bytes,
            packets_in: acc.back.packets,
            bytes_in: acc.back.bytes,
        }
    }

    fn hold_pending(&mut self, now: u64, orig: Tuple, rule: String) {
        let v = self.pending.entry(orig).or_default();
        if v.is_empty() {
            self.pending_order.push_back(orig);
        }
        if !v.contains(&rule) {
            v.push(rule);
        }
        while self.pending.len() > self.limits.pending {
            match self.pending_order.pop_front() {
                Some(t) => {
                    if self.pending.remove(&t).is_some() {
                        self.stats.pending_evicted += 1;
                        self.lose(now, LostReason::PendingEvicted, 1);
                    }
                }
                None => break,
            }
        }
    }

    fn take_pending(&mut self, orig: &Tuple) -> Vec<String> {
        let v = self.pending.remove(orig).unwrap_or_default();
        if self.pending_order.len() > 2 * self.limits.pending.max(1) {
            let pending = &self.pending;
            self.pending_order.retain(|t| pending.contains_key(t));
        }
        v
    }

    /// The original tuples of the connections still open (started, their end not yet seen),
    /// or None when there are more than `at_most`: whose counters are worth reading.
    pub fn open_connections(&self, at_most: usize) -> Option<Vec<Tuple>> {
        let mut out = Vec::new();
        for (t, l) in &self.live {
            if !l.done {
                if out.len() == at_most {
                    return None;
                }
                out.push(*t);
            }
        }
        Some(out)
    }

    /// Takes one kernel event at `now` (unix seconds). Returns what it observed, one flow per
    /// connection event or sample (`start` = `end` = `now`), for followers.
    pub fn ingest(&mut self, ev: KernelEvent, now: u64) -> Option<Flow> {
        self.stats.events += 1;
        match ev {
            KernelEvent::Lost(why, n) => {
                self.lose(now, why, n);
                None
            }
            KernelEvent::Log(s) => {
                let (verdict, policies) = match &s.point {
                    LogPoint::Allow { dir, rule } => {
                        let text = match rule {
                            RuleRef::Named { policy, rule } => rule_text(policy, *dir, *rule),
                            RuleRef::Hashed(h) => self
                                .hashed
                                .get(h)
                                .cloned()
                                .unwrap_or_else(|| format!("#{h:016x}")),
                        };
                        if let Some(l) = self.live.get_mut(&s.orig) {
                            if !l.key.policies.contains(&text) {
                                l.key.policies.push(text);
                            }
                        } else {
                            self.hold_pending(now, forward_tuple(&s.orig, s.reply.as_ref()), text);
                        }
                        return None;
                    }
                    LogPoint::Pending(p) => {
                        let text = format!(
                            "{}{}",
                            if p.allowed {
                                crate::STAGED_WOULD_ALLOW
                            } else {
                                crate::STAGED_WOULD_DENY
                            },
                            p.rule_text()
                        );
                        if let Some(l) = self.live.get_mut(&s.orig) {
                            if !l.key.staged.contains(&text) {
                                l.key.staged.push(text);
                            }
                        } else {
                            self.hold_pending(now, forward_tuple(&s.orig, s.reply.as_ref()), text);
                        }
                        return None;
                    }
                    LogPoint::Deny { dir } => {
                        let (pod, word) = match dir {
                            Dir::In => (s.reply.map_or(s.orig.dst, |r| r.src), "ingress"),
                            Dir::Out => (s.orig.src, "egress"),
                        };
                        let by = self.dir.pod(pod).map(|p| match dir {
                            Dir::In => p.ingress_by.clone(),
                            Dir::Out => p.egress_by.clone(),
                        });
                        let mut policies: Vec<String> = by
                            .unwrap_or_default()
                            .into_iter()
                            .map(|p| format!("{p} {word}"))
                            .collect();
                        // The staged verdicts logged before the drop (allow texts held for a
                        // connection that never started go with them).
                        let held = self.take_pending(&forward_tuple(&s.orig, s.reply.as_ref()));
                        policies.extend(held.into_iter().filter(|t| is_staged_text(t)));
                        (Verdict::Denied, policies)
                    }
                    LogPoint::Spoofed => (Verdict::Spoofed, Vec::new()),
                    LogPoint::NoEndpoint => (Verdict::NoEndpoint, Vec::new()),
                };
                let (key, endpoint) = self.conn_key(&s.orig, s.reply.as_ref(), verdict, policies);
                self.record(now, &key, &endpoint, |a| a.started += 1);
                let acc = Acc {
                    started: 1,
                    ..Acc::default()
                };
                Some(self.observation(now, key, endpoint, acc))
            }
            KernelEvent::Conn(c) => self.conn(c, now),
        }
    }

    fn conn(&mut self, c: ConnEvent, now: u64) -> Option<Flow> {
        match c.phase {
            Phase::New => {
                let policies = self.take_pending(&forward_tuple(&c.orig, Some(&c.reply)));
                let (key, endpoint) =
                    self.conn_key(&c.orig, Some(&c.reply), Verdict::Allowed, policies);
                self.record(now, &key, &endpoint, |a| a.started += 1);
                if self.live.len() >= self.limits.live {
                    // Forget connections silent for an hour (their end was lost) before
                    // refusing new ones.
                    self.live.retain(|_, l| l.since + 3600 > now);
                }
                if self.live.len() < self.limits.live {
                    self.live.insert(
                        c.orig,
                        Live {
                            key: key.clone(),
                            endpoint: endpoint.clone(),
                            since: now,
                            out: Counters::default(),
                            back: Counters::default(),
                            done: false,
                        },
                    );
                } else {
                    self.stats.live_overflow += 1;
                    self.lose(now, LostReason::LiveFull, 1);
                }
                let acc = Acc {
                    started: 1,
                    ..Acc::default()
                };
                Some(self.observation(now, key, endpoint, acc))
            }
            Phase::Update | Phase::Destroy => {
                let destroy = c.phase == Phase::Destroy;
                let out_now = c.orig_counters.unwrap_or_default();
                let back_now = c.reply_counters.unwrap_or_default();
                let (key, endpoint, out, back, ends) = match self.live.get_mut(&c.orig) {
                    Some(l) => {
                        let out = minus(out_now, l.out);
                        let back = minus(back_now, l.back);
                        l.out = out_now;
                        l.back = back_now;
                        l.since = now;
                        let ends = (destroy || c.closed) && !l.done;
                        l.done |= ends;
                        let quiet =
                            !ends && out == Counters::default() && back == Counters::default();
                        if quiet {
                            // Nothing to add (a counter reading of an idle or closed
                            // connection): no key is copied.
                            if destroy {
                                self.live.remove(&c.orig);
                            }
                            return None;
                        }
                        let r = (l.key.clone(), l.endpoint.clone(), out, back, ends);
                        if destroy {
                            self.live.remove(&c.orig);
                        }
                        r
                    }
                    // Not seen starting (before the agent, or lost): only its end counts.
                    None if !destroy => return None,
                    None => {
                        let policies = self.take_pending(&forward_tuple(&c.orig, Some(&c.reply)));
                        let (k, e) =
                            self.conn_key(&c.orig, Some(&c.reply), Verdict::Allowed, policies);
                        (k, e, out_now, back_now, true)
                    }
                };
                let acc = Acc {
                    endpoint: None,
                    started: 0,
                    completed: u64::from(ends),
                    out,
                    back,
                };
                if acc.completed == 0 && out == Counters::default() && back == Counters::default() {
                    return None;
                }
                let add = acc.clone();
                self.record(now, &key, &endpoint, |a| {
                    a.completed += add.completed;
                    a.out.packets += add.out.packets;
                    a.out.bytes += add.out.bytes;
                    a.back.packets += add.back.packets;
                    a.back.bytes += add.back.bytes;
                });
                ends.then(|| self.observation(now, key, endpoint, acc))
            }
        }
    }

    /// What was lost in each window ending after `since` (all when None), oldest first; windows
    /// that lost nothing are left out.
    pub fn lost(&self, since: Option<u64>) -> Vec<Lost> {
        self.windows
            .iter()
            .filter(|w| !w.lost.is_empty() && since.is_none_or(|s| w.start + WINDOW_SECS > s))
            .map(|w| Lost {
                start: w.start,
                end: w.start + WINDOW_SECS,
                node: self.node.clone(),
                samples: w.lost.values().sum(),
                reasons: w.lost.clone(),
            })
            .collect()
    }

    /// The flows of the history that `filter` passes, oldest window first.
    pub fn query(&self, filter: &Filter) -> Vec<Flow> {
        let mut out = Vec::new();
        for w in &self.windows {
            let mut here: BTreeMap<&FlowKey, &Acc> = BTreeMap::new();
            here.extend(w.flows.iter());
            for (k, a) in here {
                // An end seen before the directory knew it (a pod just created) is named now.
                let mut key = k.clone();
                for p in [&mut key.src, &mut key.dst] {
                    if p.kind == "world" {
                        *p = self.dir.peer(p.ip);
                    }
                }
                let f = Flow {
                    start: w.start,
                    end: w.start + WINDOW_SECS,
                    node: self.node.clone(),
                    key,
                    endpoint: a.endpoint.clone(),
                    started: a.started,
                    completed: a.completed,
                    packets_out: a.out.packets,
                    bytes_out: a.out.bytes,
                    packets_in: a.back.packets,
                    bytes_in: a.back.bytes,
                };
                if filter.matches(&f) {
                    out.push(f);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;

/// Whether a held text is a staged verdict ([`crate::FlowKey::staged`]).
fn is_staged_text(t: &str) -> bool {
    t.starts_with(crate::STAGED_WOULD_ALLOW) || t.starts_with(crate::STAGED_WOULD_DENY)
}
