//! The Kubernetes [`Syncer`]: one kube-runtime [`watcher`] per kind the calculation reads,
//! each turned into typed [`Update`]s, with [`SyncEvent::InSync`] once every kind has listed.
//!
//! kube-runtime does the protocol: list then watch, resume from the last resourceVersion seen
//! (the API server restarted, the connection dropped), and on 410 Gone a fresh list
//! (`Init`, `InitApply`…, `InitDone`), with backoff between failures. On top of it each kind
//! remembers which keys each object produced, so
//! - a re-list ends with a deletion for every object that vanished while the watch was away
//!   (and `InSync` again once every kind has re-listed);
//! - an object that stops producing a record (core `Endpoints` losing its IPv6 addresses)
//!   deletes that record.
//!
//! Objects become records through [`super::native::read_resource`] straight from the API
//! object's JSON tree (no JSON text in between); revisions are the objects' resourceVersions,
//! passed on as opaque strings ([`Version::ResourceVersion`]). A custom resource whose
//! definition is not installed counts as listed and empty (its watch keeps retrying).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::DynamicObject;
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::runtime::Handle;

use super::kinds::{Kind, Shape};
use super::{api, native, to_value};
use crate::syncer::{Resource, SyncEvent, Syncer, Update, Version, SYNCED_PREFIXES};
use crate::StoreError;

/// What a kind's task reports.
pub(crate) enum Msg {
    /// Records changed.
    Updates(Vec<Update>),
    /// The kind is listing (again): not in sync until it reports `Listed`.
    Relisting(usize),
    /// The kind's listing is delivered (with the deletions it implied).
    Listed(usize),
    /// A transient failure (the watch retries by itself).
    Error(String),
}

/// The kinds a syncer follows.
pub(crate) fn synced_kinds(kinds: &[Kind]) -> Vec<Kind> {
    kinds
        .iter()
        .filter(|k| {
            SYNCED_PREFIXES
                .iter()
                .any(|p| p.starts_with(k.prefix) || k.prefix.starts_with(p))
        })
        .cloned()
        .collect()
}

/// The records an object holds, typed (core Endpoints hold one per family). A malformed object
/// holds none (its records are deleted), with a warning naming it.
fn records(kind: &Kind, obj: &DynamicObject) -> Vec<(String, Resource)> {
    let v = to_value(obj);
    let r = if kind.shape == Shape::Endpoints {
        native::read_endpoints_typed(kind, v).map(|slices| {
            slices
                .into_iter()
                .map(|(k, s)| (k, Resource::EndpointSlice(s)))
                .collect()
        })
    } else {
        native::read_resource(kind, v).map(|r| r.into_iter().collect::<Vec<_>>())
    };
    match r {
        Ok(recs) => recs
            .into_iter()
            .filter(|(key, _)| SYNCED_PREFIXES.iter().any(|p| key.starts_with(p)))
            .collect(),
        Err(e) => {
            tracing::warn!(
                kind = %kind.resource.plural,
                namespace = obj.metadata.namespace.as_deref().unwrap_or(""),
                name = obj.metadata.name.as_deref().unwrap_or(""),
                error = %e,
                "skipping a malformed object"
            );
            Vec::new()
        }
    }
}

type ObjectRef = (Option<String>, String);

fn object_ref(obj: &DynamicObject) -> ObjectRef {
    (
        obj.metadata.namespace.clone(),
        obj.metadata.name.clone().unwrap_or_default(),
    )
}

fn rv_of(obj: &DynamicObject) -> Version {
    Version::ResourceVersion(obj.metadata.resource_version.clone().unwrap_or_default())
}

/// One kind's objects as the consumer holds them: which keys each produced.
#[derive(Default)]
pub(crate) struct KindState {
    objects: HashMap<ObjectRef, Vec<String>>,
    /// The objects seen by the listing under way.
    listing: Option<HashSet<ObjectRef>>,
    /// The definition of this custom resource was missing at the last attempt.
    missing: bool,
}

impl KindState {
    /// The updates for an added or modified object.
    fn apply(&mut self, kind: &Kind, obj: &DynamicObject, out: &mut Vec<Update>) {
        let r = object_ref(obj);
        let rev = rv_of(obj);
        let recs = records(kind, obj);
        let keys: Vec<String> = recs.iter().map(|(k, _)| k.clone()).collect();
        if let Some(old) = self.objects.get(&r) {
            for k in old.iter().filter(|k| !keys.contains(k)) {
                out.push(Update {
                    key: k.clone(),
                    resource: None,
                    revision: rev.clone(),
                });
            }
        }
        for (key, resource) in recs {
            out.push(Update {
                key,
                resource: Some(resource),
                revision: rev.clone(),
            });
        }
        if let Some(l) = self.listing.as_mut() {
            l.insert(r.clone());
        }
        self.objects.insert(r, keys);
    }

    /// The deletions for a deleted object.
    fn delete(&mut self, obj: &DynamicObject, out: &mut Vec<Update>) {
        let rev = rv_of(obj);
        for key in self.objects.remove(&object_ref(obj)).unwrap_or_default() {
            out.push(Update {
                key,
                resource: None,
                revision: rev.clone(),
            });
        }
    }

    /// The deletions a finished listing implies: every object it did not see.
    fn listed(&mut self, out: &mut Vec<Update>) {
        let seen = self.listing.take().unwrap_or_default();
        let gone: Vec<ObjectRef> = self
            .objects
            .keys()
            .filter(|r| !seen.contains(*r))
            .cloned()
            .collect();
        for r in gone {
            for key in self.objects.remove(&r).unwrap_or_default() {
                out.push(Update {
                    key,
                    resource: None,
                    revision: Version::Relisted,
                });
            }
        }
    }

    /// Turns one watcher event into messages. `Err` when the consumer is gone.
    pub(crate) fn handle(
        &mut self,
        idx: usize,
        kind: &Kind,
        ev: Result<Event<DynamicObject>, watcher::Error>,
        send: &mut dyn FnMut(Msg) -> bool,
    ) -> Result<(), ()> {
        let mut out = Vec::new();
        let mut after = None;
        match ev {
            Ok(Event::Init) => {
                self.listing = Some(HashSet::new());
                if !send(Msg::Relisting(idx)) {
                    return Err(());
                }
            }
            Ok(Event::InitApply(o) | Event::Apply(o)) => {
                self.missing = false;
                self.apply(kind, &o, &mut out);
            }
            Ok(Event::Delete(o)) => self.delete(&o, &mut out),
            Ok(Event::InitDone) => {
                self.missing = false;
                self.listed(&mut out);
                after = Some(Msg::Listed(idx));
            }
            Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                if s.code == 404 && kind.shape == Shape::Custom =>
            {
                // Not installed (yet): nothing of this kind exists.
                if !self.missing {
                    self.missing = true;
                    self.listing = Some(HashSet::new());
                    self.listed(&mut out);
                    after = Some(Msg::Listed(idx));
                }
            }
            Err(e) => {
                if !send(Msg::Error(format!(
                    "kubernetes watch {}: {e}",
                    kind.resource.plural
                ))) {
                    return Err(());
                }
            }
        }
        if !out.is_empty() && !send(Msg::Updates(out)) {
            return Err(());
        }
        match after.map(&mut *send) {
            Some(false) => Err(()),
            _ => Ok(()),
        }
    }
}

/// The delay before a failed watch tries again: client-go's (and kube-runtime's default)
/// doubling from 0.8 s with jitter, but capped at [`Retry::MAX`] instead of 30 s. An agent
/// follows a handful of kinds and its kernel stays stale for as long as it waits, so it comes
/// back within seconds of the API server (convergence waits on it: [`crate::barrier`]); the
/// jitter spreads a cluster's nodes over that window. Reset after two minutes of health.
struct Retry {
    next: Duration,
}

impl Retry {
    const FIRST: Duration = Duration::from_millis(800);
    const MAX: Duration = Duration::from_secs(4);
}

impl Default for Retry {
    fn default() -> Self {
        Retry { next: Self::FIRST }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        use std::hash::{BuildHasher, Hasher};
        // A random fraction in [0.5, 1): each process's hasher keys are random.
        let r = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let fraction = 0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        let delay = self.next.mul_f64(fraction);
        self.next = (self.next * 2).min(Self::MAX);
        Some(delay)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Follows one kind until `stop` is dropped or `send` refuses (the consumer is gone).
pub(crate) async fn follow(
    client: Client,
    idx: usize,
    kind: Kind,
    mut stop: tokio::sync::watch::Receiver<()>,
    mut send: impl FnMut(Msg) -> bool + Send,
) {
    let stream = watcher(api(&client, &kind, None), watcher::Config::default()).backoff(
        ResetTimerBackoff::new(Retry::default(), Duration::from_secs(120)),
    );
    let mut stream = std::pin::pin!(stream);
    let mut state = KindState::default();
    loop {
        let ev = tokio::select! {
            _ = stop.changed() => return,
            ev = stream.next() => ev,
        };
        let Some(ev) = ev else { return };
        if state.handle(idx, &kind, ev, &mut send).is_err() {
            return;
        }
    }
}

/// The consuming end of [`KubeStore::syncer`](super::KubeStore).
pub(crate) struct KubeSyncer {
    rx: mpsc::Receiver<Msg>,
    /// Dropped with the syncer: the kinds' tasks stop.
    _stop: tokio::sync::watch::Sender<()>,
    listed: Vec<bool>,
    in_sync: bool,
    /// An error that arrived behind events already returned.
    pending: Option<StoreError>,
}

impl KubeSyncer {
    pub(crate) fn start(handle: &Handle, client: &Client, kinds: &[Kind]) -> KubeSyncer {
        let kinds = synced_kinds(kinds);
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        for (idx, kind) in kinds.iter().enumerate() {
            let tx = tx.clone();
            handle.spawn(follow(
                client.clone(),
                idx,
                kind.clone(),
                stop_rx.clone(),
                move |m| tx.send(m).is_ok(),
            ));
        }
        KubeSyncer {
            rx,
            _stop: stop_tx,
            listed: vec![false; kinds.len()],
            in_sync: false,
            pending: None,
        }
    }

    /// Takes one message into `out`; an error is returned instead.
    fn take(&mut self, m: Msg, out: &mut Vec<SyncEvent>) -> Option<StoreError> {
        match m {
            Msg::Updates(u) => out.extend(u.into_iter().map(SyncEvent::Update)),
            Msg::Relisting(i) => {
                self.listed[i] = false;
                self.in_sync = false;
            }
            Msg::Listed(i) => {
                self.listed[i] = true;
                if !self.in_sync && self.listed.iter().all(|l| *l) {
                    self.in_sync = true;
                    out.push(SyncEvent::InSync);
                }
            }
            Msg::Error(e) => return Some(StoreError::Backend(e)),
        }
        None
    }
}

impl Syncer for KubeSyncer {
    fn next(&mut self, timeout: Duration) -> Result<Vec<SyncEvent>, StoreError> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let mut out = Vec::new();
        let first = match self.rx.recv_timeout(timeout) {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => return Ok(out),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(StoreError::Backend("kubernetes syncer stopped".into()))
            }
        };
        // Everything queued goes out at once. The kinds' watches retry on their own, so an
        // error followed by events is history (the watch is back); only the newest error
        // after the last event is reported: a consumer that waited out a long outage must
        // not then drain one stale error per call while the events behind them wait.
        let mut error = self.take(first, &mut out);
        while let Ok(m) = self.rx.try_recv() {
            let before = out.len();
            match self.take(m, &mut out) {
                Some(e) => error = Some(e),
                None if out.len() > before => error = None,
                None => {}
            }
        }
        match error {
            Some(e) if out.is_empty() => Err(e),
            e => {
                self.pending = e;
                Ok(out)
            }
        }
    }
}
