//! [`KubeStore`]: the [`Store`] trait over a Kubernetes API server (Calico calls this the
//! Kubernetes datastore). Malla's own records are custom resources, the cluster's objects are
//! read from (and, in the lab, written as) the native ones; [`kinds`] maps keys to resources
//! and [`native`] converts.
//!
//! Revisions: the API says a `resourceVersion` is opaque, and nothing here reads one as a
//! number. The [`Store`] trait (IPAM's and the CNI plugin's compare-and-swap) speaks numeric
//! revisions, so this backend hands out *tokens* that stand for resourceVersion strings
//! ([`versions`]): a key's mod revision is the token of its object's resourceVersion, and
//! compare-and-swap turns the token back into that string for the API's optimistic
//! concurrency — `update` sends it as the object's `resourceVersion`, `delete` as a
//! precondition, and a stale one is refused (409), so two nodes can never claim the same
//! IPAM block or address. Tokens rather than an opaque revision type in the trait: the
//! trait's users (IPAM, the CNI plugin, the lab) only ever hand a revision back or compare it
//! with one they were given, which tokens serve exactly, and the local and etcd backends keep
//! their real numbers. What needed a store-wide number is answered without one:
//! `revision()` is the token of a quorum list's resourceVersion, `wait_for_change` compares
//! that string with the one its argument stands for, `events_since` watches from the string.
//!
//! Differences from etcd, all inherent to the API:
//! - The create revision of an object is not exposed; [`KeyValue::create_revision`] is 0.
//! - A list spanning several kinds is several reads; it reports the first one's version, so
//!   events replayed from it cover every change after any of them.
//! - Token order is the order this process learnt of versions (see [`versions`]); the
//!   server's order of changes is only what a watch delivers.
//! - Keys outside the mapped prefixes, and values of custom resources that are not JSON
//!   objects, are refused ([`StoreError::InvalidKey`], [`StoreError::Decode`]).
//!
//! The calculation's change feed is [`Store::syncer`]: kube-runtime's watcher per kind
//! ([`watcher`]), which resumes after the API server restarts and re-lists on 410 Gone.
//! [`Store::wait_for_change`] wakes from those watchers too. [`Store::watch`] (the key-value
//! side's stream from a revision) opens one raw watch per kind from the resourceVersion the
//! token stands for, resumed from the last one seen; 410 ends it with
//! [`StoreError::Compacted`] so the consumer lists again.

pub mod kinds;
pub mod native;
mod versions;
pub mod watcher;

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions, WatchEvent,
    WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::Value;

use crate::runtime::{run_on, RuntimeThread};
use crate::stream::{Pusher, IDLE_CHECK};
use crate::syncer::Syncer;
use crate::{Event, KeyValue, Revision, Store, StoreError, Watch};
use kinds::{Kind, Location, Shape, SliceApi};
use versions::Versions;

/// Page size of lists.
const PAGE: u32 = 500;
/// How long `events_since` waits for a watch to go quiet.
const SETTLE: Duration = Duration::from_millis(200);

/// The Kubernetes-backed store. Cheap to share between threads.
pub struct KubeStore {
    client: Client,
    kinds: Arc<Vec<Kind>>,
    slices: SliceApi,
    timeout: Duration,
    /// The tokens standing for resourceVersions ([`versions`]).
    versions: Arc<Versions>,
    changes: Arc<Changes>,
    runtime: RuntimeThread,
}

/// Wake-ups for [`Store::wait_for_change`]: bumped by the background watches on every change.
/// The watches run until the store's runtime stops (they hold this struct).
#[derive(Default)]
struct Changes {
    /// Set once the background watches run.
    started: Mutex<Option<tokio::sync::watch::Sender<()>>>,
    generation: Mutex<u64>,
    wake: Condvar,
}

impl Changes {
    fn bump(&self) {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.wake.notify_all();
    }
}

fn kerr(what: &str, e: kube::Error) -> StoreError {
    match e {
        kube::Error::Api(s) => StoreError::Backend(format!(
            "kubernetes {what}: {} ({} {})",
            s.message, s.code, s.reason
        )),
        e => StoreError::Backend(format!("kubernetes {what}: {e}")),
    }
}

fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// A resourceVersion the server must have sent; kept as the opaque string it is.
fn need_rv(rv: Option<&str>, what: &str) -> Result<String, StoreError> {
    match rv {
        Some(rv) if !rv.is_empty() => Ok(rv.to_string()),
        _ => Err(StoreError::Backend(format!(
            "kubernetes: {what} came without a resourceVersion"
        ))),
    }
}

fn to_value(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

fn object_rv(o: &DynamicObject) -> Result<String, StoreError> {
    need_rv(o.metadata.resource_version.as_deref(), "an object")
}

fn from_value(key: &str, v: Value) -> Result<DynamicObject, StoreError> {
    serde_json::from_value(v).map_err(|e| StoreError::Decode {
        key: key.to_string(),
        reason: format!("building the object: {e}"),
    })
}

fn api(client: &Client, kind: &Kind, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) if kind.namespaced => Api::namespaced_with(client.clone(), ns, &kind.resource),
        _ => Api::all_with(client.clone(), &kind.resource),
    }
}

/// The records an object holds (core Endpoints hold one per family).
fn records(kind: &Kind, obj: &DynamicObject) -> Result<Vec<(String, String)>, StoreError> {
    let v = to_value(obj);
    let name = obj.metadata.name.clone().unwrap_or_default();
    let bad = |reason: String| StoreError::Decode {
        key: format!("{}{name}", kind.prefix),
        reason,
    };
    if kind.shape == Shape::Endpoints {
        return native::read_endpoints(kind, &v).map_err(bad);
    }
    Ok(native::read(kind, &v).map_err(bad)?.into_iter().collect())
}

/// Lists every object of a kind, page by page; returns them with the list's resourceVersion.
async fn list_kind(
    client: &Client,
    kind: &Kind,
) -> Result<(Vec<DynamicObject>, String), StoreError> {
    let api = api(client, kind, None);
    let mut items = Vec::new();
    let mut token: Option<String> = None;
    let mut rev = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = match api.list(&lp).await {
            Ok(p) => p,
            // A custom resource whose definition is not installed yet: no objects.
            Err(e) if code(&e) == Some(404) && kind.shape == Shape::Custom => {
                return Ok((Vec::new(), current_rv(client).await?));
            }
            Err(e) => return Err(kerr(&format!("list {}", kind.resource.plural), e)),
        };
        if rev.is_none() {
            rev = Some(need_rv(
                page.metadata.resource_version.as_deref(),
                "a list",
            )?);
        }
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    match rev {
        Some(rev) => Ok((items, rev)),
        None => Ok((items, current_rv(client).await?)),
    }
}

/// The server's current resourceVersion: a quorum list of namespaces, one item long.
async fn current_rv(client: &Client) -> Result<String, StoreError> {
    let api: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Namespace".into(),
            plural: "namespaces".into(),
        },
    );
    let l = api
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| kerr("read revision", e))?;
    need_rv(l.metadata.resource_version.as_deref(), "a list")
}

impl KubeStore {
    /// Connects with a kubeconfig file, or when None the usual way (`KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service account), and checks the server answers
    /// within `timeout`, which also bounds every later request.
    pub fn connect(kubeconfig: Option<&Path>, timeout: Duration) -> Result<KubeStore, StoreError> {
        let runtime = RuntimeThread::start("kubernetes")?;
        let path = kubeconfig.map(Path::to_path_buf);
        let (client, server) = run_on(
            &runtime.handle,
            timeout,
            "kubernetes",
            "connect",
            async move {
                let config = match &path {
                    Some(p) => {
                        let kc = Kubeconfig::read_from(p).map_err(|e| {
                            StoreError::Backend(format!("kubeconfig {}: {e}", p.display()))
                        })?;
                        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                            .await
                            .map_err(|e| {
                                StoreError::Backend(format!("kubeconfig {}: {e}", p.display()))
                            })?
                    }
                    None => Config::infer()
                        .await
                        .map_err(|e| StoreError::Backend(format!("kubernetes config: {e}")))?,
                };
                let server = config.cluster_url.to_string();
                let client = Client::try_from(config)
                    .map_err(|e| StoreError::Backend(format!("kubernetes client: {e}")))?;
                Ok((client, server))
            },
        )?;
        let c = client.clone();
        let slices = run_on(
            &runtime.handle,
            timeout,
            "kubernetes",
            "discovery",
            async move {
                current_rv(&c).await?;
                for (version, api) in [("v1", SliceApi::V1), ("v1beta1", SliceApi::V1beta1)] {
                    if let Ok(l) = c
                        .list_api_group_resources(&format!("discovery.k8s.io/{version}"))
                        .await
                    {
                        if l.resources.iter().any(|r| r.name == "endpointslices") {
                            return Ok(api);
                        }
                    }
                }
                Ok(SliceApi::Endpoints)
            },
        )?;
        Ok(KubeStore {
            client,
            kinds: Arc::new(kinds::all(slices)),
            slices,
            timeout,
            versions: Versions::of(&server),
            changes: Arc::new(Changes::default()),
            runtime,
        })
    }

    /// Which endpoint-slice API the server serves.
    pub fn slice_api(&self) -> SliceApi {
        self.slices
    }

    /// Creates or updates Malla's CustomResourceDefinitions and waits until they serve
    /// (the lab and tests; a cluster applies `deploy/crds.yaml`).
    pub fn install_crds(&self) -> Result<(), StoreError> {
        let client = self.client.clone();
        let crds: Vec<(String, Value)> = self
            .kinds
            .iter()
            .filter(|k| k.shape == Shape::Custom)
            .map(|k| (k.resource.plural.clone(), kinds::crd(k)))
            .collect();
        let crd_api = kube::api::ApiResource {
            group: "apiextensions.k8s.io".into(),
            version: "v1".into(),
            api_version: "apiextensions.k8s.io/v1".into(),
            kind: "CustomResourceDefinition".into(),
            plural: "customresourcedefinitions".into(),
        };
        let kinds = self.kinds.clone();
        self.run_for(Duration::from_secs(60), "install CRDs", async move {
            let definitions: Api<DynamicObject> = Api::all_with(client.clone(), &crd_api);
            for (plural, crd) in crds {
                let name = format!("{plural}.{}", kinds::GROUP);
                let mut obj = from_value(&name, crd)?;
                match definitions
                    .get_opt(&name)
                    .await
                    .map_err(|e| kerr("get CRD", e))?
                {
                    Some(old) => {
                        obj.metadata.resource_version = old.metadata.resource_version;
                        definitions
                            .replace(&name, &PostParams::default(), &obj)
                            .await
                            .map_err(|e| kerr("replace CRD", e))?;
                    }
                    None => {
                        definitions
                            .create(&PostParams::default(), &obj)
                            .await
                            .map_err(|e| kerr("create CRD", e))?;
                    }
                }
            }
            // Established: a list of each kind answers.
            for k in kinds.iter().filter(|k| k.shape == Shape::Custom) {
                let a = api(&client, k, None);
                let deadline = Instant::now() + Duration::from_secs(30);
                while let Err(e) = a.list(&ListParams::default().limit(1)).await {
                    if Instant::now() > deadline {
                        return Err(kerr(&format!("CRD {} never served", k.resource.plural), e));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(())
        })
    }

    fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(&self.runtime.handle, self.timeout, "kubernetes", what, fut)
    }

    fn run_for<T: Send + 'static>(
        &self,
        timeout: Duration,
        what: &'static str,
        fut: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(&self.runtime.handle, timeout, "kubernetes", what, fut)
    }

    /// The kinds that may hold keys under `prefix` (owned, for a request's future).
    fn kinds_under(&self, prefix: &str) -> Vec<Kind> {
        kinds::kinds_under(&self.kinds, prefix)
            .into_iter()
            .cloned()
            .collect()
    }

    fn locate(&self, key: &str) -> Result<(Kind, Location), StoreError> {
        let kind = kinds::kind_of(&self.kinds, key).ok_or_else(|| StoreError::InvalidKey {
            key: key.to_string(),
            reason: "no Kubernetes resource holds this key".into(),
        })?;
        let loc = kind.locate(key).map_err(|reason| StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })?;
        Ok((kind.clone(), loc))
    }

    /// The resourceVersion a token stands for, or the conflict to report when the token is
    /// unknown (never handed out, or forgotten): the key's current token is read for it.
    fn expected_rv(&self, key: &str, expected: Revision) -> Result<Arc<str>, StoreError> {
        match self.versions.rv(expected) {
            Some(rv) => Ok(rv),
            None => Err(StoreError::Conflict {
                key: key.to_string(),
                expected: Some(expected),
                actual: self.get(key)?.map(|kv| kv.mod_revision),
            }),
        }
    }

    /// Writes `value` at `key`: create when `expected` is None, else replace the object whose
    /// resourceVersion must be the one `expected` stands for. Then the status the value
    /// carries, if any.
    fn write(
        &self,
        key: &str,
        value: &str,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let (kind, loc) = self.locate(key)?;
        let expected_rv = match expected {
            Some(t) => Some((t, self.expected_rv(key, t)?)),
            None => None,
        };
        let client = self.client.clone();
        let versions = self.versions.clone();
        let key = key.to_string();
        let value = value.to_string();
        self.run("write", async move {
            let api = api(&client, &kind, loc.namespace.as_deref());
            let decode = |reason: String| StoreError::Decode {
                key: key.clone(),
                reason,
            };
            let conflict = |actual: Option<String>| StoreError::Conflict {
                key: key.clone(),
                expected,
                actual: actual.map(|rv| versions.token(&rv)),
            };
            let written = match expected_rv {
                None => {
                    let obj = native::write(&kind, &loc, &key, &value, None).map_err(decode)?;
                    match api
                        .create(&PostParams::default(), &from_value(&key, obj)?)
                        .await
                    {
                        Ok(o) => o,
                        Err(e) if code(&e) == Some(409) => {
                            return Err(StoreError::AlreadyExists(key.clone()))
                        }
                        Err(e) => return Err(kerr(&format!("create {key}"), e)),
                    }
                }
                Some((_, expected_rv)) => {
                    let existing = api
                        .get_opt(&loc.name)
                        .await
                        .map_err(|e| kerr(&format!("get {key}"), e))?;
                    let Some(existing) = existing else {
                        return Err(conflict(None));
                    };
                    let actual = object_rv(&existing)?;
                    if *actual != *expected_rv {
                        return Err(conflict(Some(actual)));
                    }
                    let mut obj =
                        native::write(&kind, &loc, &key, &value, Some(&to_value(&existing)))
                            .map_err(decode)?;
                    obj["metadata"]["resourceVersion"] = Value::String(expected_rv.to_string());
                    match api
                        .replace(&loc.name, &PostParams::default(), &from_value(&key, obj)?)
                        .await
                    {
                        Ok(o) => o,
                        Err(e) if code(&e) == Some(409) => {
                            let actual = match api.get_opt(&loc.name).await {
                                Ok(Some(o)) => object_rv(&o).ok(),
                                _ => None,
                            };
                            return Err(conflict(actual));
                        }
                        Err(e) => return Err(kerr(&format!("update {key}"), e)),
                    }
                }
            };
            let mut rv = object_rv(&written)?;
            if let Some(status) = native::status(&kind, &key, &value).map_err(decode)? {
                let mut obj = to_value(&written);
                obj["status"] = status;
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                let o = api
                    .replace_status(&loc.name, &PostParams::default(), &from_value(&key, obj)?)
                    .await
                    .map_err(|e| kerr(&format!("status of {key}"), e))?;
                rv = object_rv(&o)?;
            }
            Ok(versions.token(&rv))
        })
    }

    /// The background watches behind `wait_for_change` (kube-runtime watchers of every kind),
    /// started once; each change wakes the waiters.
    fn start_watches(&self) {
        let mut started = self
            .changes
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if started.is_some() {
            return;
        }
        let (stop, stopped) = tokio::sync::watch::channel(());
        *started = Some(stop);
        for (idx, kind) in self.kinds.iter().enumerate() {
            let changes = self.changes.clone();
            self.runtime.handle.spawn(watcher::follow(
                self.client.clone(),
                idx,
                kind.clone(),
                stopped.clone(),
                move |m| {
                    if let watcher::Msg::Updates(_) | watcher::Msg::Listed(_) = m {
                        changes.bump();
                    }
                    true
                },
            ));
        }
    }

    /// The token of the server's current resourceVersion, above `floor` when the server's
    /// version is not the one `floor` stands for (it moved on since).
    fn current_after(&self, floor: Revision) -> Result<Revision, StoreError> {
        let client = self.client.clone();
        let rv = self.run("read revision", async move { current_rv(&client).await })?;
        Ok(match self.versions.rv(floor) {
            Some(f) if *f == *rv => floor,
            _ => self.versions.token_after(&rv, floor),
        })
    }
}

/// The event for one record of an object a watch reported at `rev`.
fn record_event(key: String, value: String, deleted: bool, rev: Revision) -> Event {
    if deleted {
        Event::Delete { key, revision: rev }
    } else {
        Event::Put(KeyValue {
            key,
            value,
            create_revision: 0,
            mod_revision: rev,
        })
    }
}

/// Feeds a [`crate::Watch`] with one kind's changes under `prefix`: watched from the
/// resourceVersion `rv` (which `after` stands for), resumed from the last one seen when the
/// stream ends or breaks (with backoff), ended with [`StoreError::Compacted`] on 410 Gone. A
/// custom resource not installed yet (404) is waited for quietly. This is the key-value
/// side's watch ([`Store::watch`]); the calculation's feed is the [`Syncer`].
async fn watch_kind_into(
    client: Client,
    versions: Arc<Versions>,
    kind: Kind,
    prefix: String,
    after: Revision,
    mut rv: String,
    out: Pusher,
) {
    let api = api(&client, &kind, None);
    let mut backoff = Duration::from_millis(200);
    let mut last = after;
    let gone = |requested| StoreError::Compacted {
        requested,
        oldest: requested + 1,
    };
    while !out.gone() {
        let params = WatchParams::default().timeout(IDLE_CHECK.as_secs() as u32 * 30);
        let failure = match api.watch(&params, &rv).await {
            Err(e) if code(&e) == Some(410) => {
                out.push(Err(gone(after)));
                return;
            }
            Err(e) if code(&e) == Some(404) && kind.shape == Shape::Custom => None,
            Err(e) => Some(kerr(&format!("watch {}", kind.resource.plural), e)),
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let ev = match tokio::time::timeout(IDLE_CHECK, stream.next()).await {
                        Err(_) if out.gone() => return,
                        Err(_) => continue,
                        // The server ended the watch (its timeout): resume.
                        Ok(None) => break None,
                        Ok(Some(ev)) => ev,
                    };
                    let (obj, deleted) = match ev {
                        Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => (o, false),
                        Ok(WatchEvent::Deleted(o)) => (o, true),
                        Ok(WatchEvent::Bookmark(b)) => {
                            if !b.metadata.resource_version.is_empty() {
                                rv = b.metadata.resource_version;
                            }
                            continue;
                        }
                        Ok(WatchEvent::Error(s)) if s.code == 410 => {
                            out.push(Err(gone(after)));
                            return;
                        }
                        Ok(WatchEvent::Error(s)) => {
                            break Some(StoreError::Backend(format!(
                                "kubernetes watch {}: {}",
                                kind.resource.plural, s.message
                            )))
                        }
                        Err(e) => break Some(kerr(&format!("watch {}", kind.resource.plural), e)),
                    };
                    let Ok(obj_rv) = object_rv(&obj) else {
                        continue;
                    };
                    // The server sends this kind's changes in its order: each is newer than
                    // the last.
                    let r = versions.token_after(&obj_rv, last);
                    last = r;
                    rv = obj_rv;
                    backoff = Duration::from_millis(200);
                    let events: Vec<Event> = match records(&kind, &obj) {
                        Ok(recs) => recs
                            .into_iter()
                            .filter(|(key, _)| key.starts_with(&prefix))
                            .map(|(key, value)| record_event(key, value, deleted, r))
                            .collect(),
                        Err(e) => {
                            tracing::warn!(error = %e, "kubernetes watch: skipping an object");
                            continue;
                        }
                    };
                    if !events.is_empty() && !out.push(Ok(events)) {
                        return;
                    }
                }
            }
        };
        match failure {
            None => {
                if kind.shape == Shape::Custom {
                    tokio::time::sleep(backoff).await;
                }
            }
            Some(e) => {
                if !out.push(Err(e)) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

impl Store for KubeStore {
    fn watch<'a>(
        &'a self,
        prefix: &str,
        after: Revision,
    ) -> Result<Box<dyn Watch + 'a>, StoreError> {
        let (out, watch) = crate::stream::channel();
        let Some(rv) = self.versions.rv(after) else {
            // A token this process does not know (any more): nothing to resume from.
            out.push(Err(StoreError::Compacted {
                requested: after,
                oldest: after + 1,
            }));
            return Ok(Box::new(watch));
        };
        for kind in self.kinds_under(prefix) {
            self.runtime.handle.spawn(watch_kind_into(
                self.client.clone(),
                self.versions.clone(),
                kind,
                prefix.to_string(),
                after,
                rv.to_string(),
                out.clone(),
            ));
        }
        Ok(Box::new(watch))
    }

    fn syncer(&self) -> Result<Box<dyn Syncer + '_>, StoreError> {
        Ok(Box::new(watcher::KubeSyncer::start(
            &self.runtime.handle,
            &self.client,
            &self.kinds,
        )))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let (kind, loc) = self.locate(key)?;
        if kind.shape == Shape::Endpoints {
            let (kvs, _) = self.list(key)?;
            return Ok(kvs.into_iter().find(|kv| kv.key == key));
        }
        let client = self.client.clone();
        let versions = self.versions.clone();
        let key = key.to_string();
        self.run("get", async move {
            let api = api(&client, &kind, loc.namespace.as_deref());
            let Some(obj) = api
                .get_opt(&loc.name)
                .await
                .map_err(|e| kerr(&format!("get {key}"), e))?
            else {
                return Ok(None);
            };
            let rev = versions.token(&object_rv(&obj)?);
            Ok(records(&kind, &obj)?
                .into_iter()
                .find(|(k, _)| *k == key)
                .map(|(key, value)| KeyValue {
                    key,
                    value,
                    create_revision: 0,
                    mod_revision: rev,
                }))
        })
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let kinds = self.kinds_under(prefix);
        let client = self.client.clone();
        let versions = self.versions.clone();
        let prefix = prefix.to_string();
        self.run("list", async move {
            if kinds.is_empty() {
                return Ok((Vec::new(), versions.token(&current_rv(&client).await?)));
            }
            let mut out = Vec::new();
            // The first kind's list stands for the whole: a watch from it replays whatever
            // changed while the later kinds were read. Its items' versions are taken first,
            // so its token is not below theirs.
            let mut rev = None;
            for kind in &kinds {
                let (items, r) = list_kind(&client, kind).await?;
                let mut newest = 0;
                for obj in items {
                    let mod_revision = versions.token(&object_rv(&obj)?);
                    newest = newest.max(mod_revision);
                    for (key, value) in records(kind, &obj)? {
                        if key.starts_with(&prefix) {
                            out.push(KeyValue {
                                key,
                                value,
                                create_revision: 0,
                                mod_revision,
                            });
                        }
                    }
                }
                rev.get_or_insert_with(|| versions.token_at_least(&r, newest));
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
            let rev = match rev {
                Some(r) => r,
                None => versions.token(&current_rv(&client).await?),
            };
            Ok((out, rev))
        })
    }

    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        self.write(key, value, None)
    }

    fn update(
        &self,
        key: &str,
        value: &str,
        expected_mod_revision: Revision,
    ) -> Result<Revision, StoreError> {
        self.write(key, value, Some(expected_mod_revision))
    }

    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        for _ in 0..20 {
            let r = match self.get(key)? {
                None => self.create(key, value),
                Some(kv) => self.update(key, value, kv.mod_revision),
            };
            match r {
                Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) => continue,
                r => return r,
            }
        }
        Err(StoreError::Backend(format!(
            "kubernetes put {key}: gave up after 20 conflicting writes"
        )))
    }

    fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError> {
        let (kind, loc) = self.locate(key)?;
        if kind.shape == Shape::Endpoints {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "endpoints are read-only on a server without EndpointSlices".into(),
            });
        }
        let expected_rv = match expected_mod_revision {
            Some(t) => Some(self.expected_rv(key, t)?),
            None => None,
        };
        let client = self.client.clone();
        let versions = self.versions.clone();
        let key = key.to_string();
        self.run("delete", async move {
            let api = api(&client, &kind, loc.namespace.as_deref());
            let dp = DeleteParams {
                preconditions: expected_rv.map(|rv| Preconditions {
                    resource_version: Some(rv.to_string()),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&loc.name, &dp).await {
                Ok(_) => Ok(Some(versions.token(&current_rv(&client).await?))),
                Err(e) if code(&e) == Some(404) => match expected_mod_revision {
                    None => Ok(None),
                    Some(expected) => Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: Some(expected),
                        actual: None,
                    }),
                },
                Err(e) if code(&e) == Some(409) => {
                    let actual = match api.get_opt(&loc.name).await {
                        Ok(Some(o)) => object_rv(&o).ok().map(|rv| versions.token(&rv)),
                        _ => None,
                    };
                    Err(StoreError::Conflict {
                        key: key.clone(),
                        expected: expected_mod_revision,
                        actual,
                    })
                }
                Err(e) => Err(kerr(&format!("delete {key}"), e)),
            }
        })
    }

    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        let kinds = self.kinds_under(prefix);
        let client = self.client.clone();
        let versions = self.versions.clone();
        let prefix = prefix.to_string();
        let from = self.versions.rv(after);
        self.run("watch", async move {
            let now = current_rv(&client).await?;
            let Some(from) = from else {
                return Err(StoreError::Compacted {
                    requested: after,
                    oldest: versions.token_after(&now, after),
                });
            };
            let mut events = Vec::new();
            if *from == *now {
                return Ok(events);
            }
            for kind in &kinds {
                let r = replay(&client, &versions, kind, &prefix, after, &from, &now).await;
                match r {
                    Err(StoreError::Compacted { requested, .. }) => {
                        return Err(StoreError::Compacted {
                            requested,
                            oldest: versions.token_after(&now, after),
                        })
                    }
                    r => events.extend(r?),
                }
            }
            // Each kind's events are in the server's order, their tokens rising; across kinds
            // the order is the order they were first seen in.
            events.sort_by_key(Event::revision);
            Ok(events)
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let client = self.client.clone();
        let versions = self.versions.clone();
        self.run("read revision", async move {
            Ok(versions.token(&current_rv(&client).await?))
        })
    }

    /// Returns as soon as the server's resourceVersion is not the one `after` stands for
    /// (compared as strings), with its token (above `after`); in between, waits for the
    /// background watches to see a change, re-reading the version at least once a second.
    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        self.start_watches();
        let deadline = Instant::now() + timeout;
        loop {
            let generation = *self
                .changes
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let now = self.current_after(after)?;
            if now != after {
                return Ok(now);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(after);
            }
            let g = self
                .changes
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *g == generation {
                let _ = self
                    .changes
                    .wake
                    .wait_timeout(g, left.min(Duration::from_secs(1)))
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

/// The changes to one kind after the resourceVersion `from` (which `after` stands for), up to
/// `now` (the server's version when asked) or until the watch goes quiet.
async fn replay(
    client: &Client,
    versions: &Versions,
    kind: &Kind,
    prefix: &str,
    after: Revision,
    from: &str,
    now: &str,
) -> Result<Vec<Event>, StoreError> {
    let api = api(client, kind, None);
    let compacted = StoreError::Compacted {
        requested: after,
        oldest: after,
    };
    let stream = match api.watch(&WatchParams::default().timeout(5), from).await {
        Ok(s) => s,
        Err(e) if code(&e) == Some(410) => return Err(compacted),
        Err(e) if code(&e) == Some(404) && kind.shape == Shape::Custom => return Ok(Vec::new()),
        Err(e) => return Err(kerr(&format!("watch {}", kind.resource.plural), e)),
    };
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    let mut last = after;
    loop {
        let ev = match tokio::time::timeout(SETTLE, stream.next()).await {
            Err(_) | Ok(None) => return Ok(out),
            Ok(Some(ev)) => ev,
        };
        let (obj, deleted) = match ev {
            Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => (o, false),
            Ok(WatchEvent::Deleted(o)) => (o, true),
            Ok(WatchEvent::Bookmark(_)) => continue,
            Ok(WatchEvent::Error(s)) if s.code == 410 => return Err(compacted),
            Ok(WatchEvent::Error(s)) => {
                return Err(StoreError::Backend(format!(
                    "kubernetes watch {}: {}",
                    kind.resource.plural, s.message
                )))
            }
            Err(e) => return Err(kerr(&format!("watch {}", kind.resource.plural), e)),
        };
        let rv = object_rv(&obj)?;
        let rev = versions.token_after(&rv, last);
        last = rev;
        for (key, value) in records(kind, &obj)? {
            if key.starts_with(prefix) {
                out.push(record_event(key, value, deleted, rev));
            }
        }
        if rv == now {
            return Ok(out);
        }
    }
}
