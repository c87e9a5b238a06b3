//! [`KubeStore`]: the [`Store`] trait over a Kubernetes API server (Calico calls this the
//! Kubernetes datastore). Malla's own records are custom resources, the cluster's objects are
//! read from (and, in the lab, written as) the native ones; [`kinds`] maps keys to resources
//! and [`native`] converts.
//!
//! Revisions are the API server's resource versions, which a server backed by one etcd takes
//! from etcd's global revision: a key's mod revision is its object's `resourceVersion`, a list
//! reports the list's, and `revision()` is a quorum list's. Compare-and-swap is the API's
//! optimistic concurrency: `update` sends the expected `resourceVersion` and a stale one is
//! refused (409), so two nodes can never claim the same IPAM block or address.
//!
//! Three differences from etcd, all inherent to the API:
//! - The create revision of an object is not exposed; [`KeyValue::create_revision`] is 0.
//! - A list spanning several kinds is several reads; it reports the oldest of their
//!   revisions, so events replayed from it cover every change after any of them.
//! - Keys outside the mapped prefixes, and values of custom resources that are not JSON
//!   objects, are refused ([`StoreError::InvalidKey`], [`StoreError::Decode`]).
//!
//! Change notification ([`Store::wait_for_change`]) runs one watch per kind in the
//! background from the first revision asked about, resumed from the last seen resource
//! version after a dropped connection (with backoff) and restarted from a fresh list when the
//! server answers 410 Gone. [`Store::watch`] opens one watch per kind under its prefix, all
//! feeding one stream; 410 ends it with [`StoreError::Compacted`] so the consumer lists again.

pub mod kinds;
pub mod native;

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
use crate::{Event, KeyValue, Revision, Store, StoreError, Watch};
use kinds::{Kind, Location, Shape, SliceApi};

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
    changes: Arc<Changes>,
    runtime: RuntimeThread,
}

/// What the background watches have seen.
#[derive(Default)]
struct Changes {
    started: Mutex<bool>,
    latest: Mutex<Revision>,
    wake: Condvar,
}

impl Changes {
    fn saw(&self, rev: Revision) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        if rev > *latest {
            *latest = rev;
            self.wake.notify_all();
        }
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

fn parse_rv(s: Option<&str>) -> Result<Revision, StoreError> {
    s.and_then(|s| s.parse().ok()).ok_or_else(|| {
        StoreError::Backend(format!(
            "kubernetes: resourceVersion {s:?} is not a number (Malla needs an etcd-backed API server)"
        ))
    })
}

fn to_value(o: &DynamicObject) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

fn object_rv(o: &DynamicObject) -> Result<Revision, StoreError> {
    parse_rv(o.metadata.resource_version.as_deref())
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

/// Lists every object of a kind, page by page; returns them with the list's revision.
async fn list_kind(
    client: &Client,
    kind: &Kind,
) -> Result<(Vec<DynamicObject>, Revision), StoreError> {
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
                return Ok((Vec::new(), current_revision(client).await?));
            }
            Err(e) => return Err(kerr(&format!("list {}", kind.resource.plural), e)),
        };
        if rev.is_none() {
            rev = Some(parse_rv(page.metadata.resource_version.as_deref())?);
        }
        items.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    Ok((items, rev.unwrap_or(0)))
}

/// The server's current revision: a quorum list of namespaces, one item long.
async fn current_revision(client: &Client) -> Result<Revision, StoreError> {
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
    parse_rv(l.metadata.resource_version.as_deref())
}

impl KubeStore {
    /// Connects with a kubeconfig file, or when None the usual way (`KUBECONFIG`,
    /// `~/.kube/config`, or the in-cluster service account), and checks the server answers
    /// within `timeout`, which also bounds every later request.
    pub fn connect(kubeconfig: Option<&Path>, timeout: Duration) -> Result<KubeStore, StoreError> {
        let runtime = RuntimeThread::start("kubernetes")?;
        let path = kubeconfig.map(Path::to_path_buf);
        let client = run_on(
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
                Client::try_from(config)
                    .map_err(|e| StoreError::Backend(format!("kubernetes client: {e}")))
            },
        )?;
        let c = client.clone();
        let slices = run_on(
            &runtime.handle,
            timeout,
            "kubernetes",
            "discovery",
            async move {
                current_revision(&c).await?;
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

    /// Writes `value` at `key`: create when `expected` is None, else replace the object whose
    /// resourceVersion must be `expected`. Then the status the value carries, if any.
    fn write(
        &self,
        key: &str,
        value: &str,
        expected: Option<Revision>,
    ) -> Result<Revision, StoreError> {
        let (kind, loc) = self.locate(key)?;
        let client = self.client.clone();
        let key = key.to_string();
        let value = value.to_string();
        self.run("write", async move {
            let api = api(&client, &kind, loc.namespace.as_deref());
            let decode = |reason: String| StoreError::Decode {
                key: key.clone(),
                reason,
            };
            let written = match expected {
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
                Some(expected) => {
                    let existing = api
                        .get_opt(&loc.name)
                        .await
                        .map_err(|e| kerr(&format!("get {key}"), e))?;
                    let Some(existing) = existing else {
                        return Err(StoreError::Conflict {
                            key: key.clone(),
                            expected: Some(expected),
                            actual: None,
                        });
                    };
                    let actual = object_rv(&existing)?;
                    if actual != expected {
                        return Err(StoreError::Conflict {
                            key: key.clone(),
                            expected: Some(expected),
                            actual: Some(actual),
                        });
                    }
                    let mut obj =
                        native::write(&kind, &loc, &key, &value, Some(&to_value(&existing)))
                            .map_err(decode)?;
                    obj["metadata"]["resourceVersion"] = Value::String(expected.to_string());
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
                            return Err(StoreError::Conflict {
                                key: key.clone(),
                                expected: Some(expected),
                                actual,
                            });
                        }
                        Err(e) => return Err(kerr(&format!("update {key}"), e)),
                    }
                }
            };
            let mut rev = object_rv(&written)?;
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
                rev = object_rv(&o)?;
            }
            Ok(rev)
        })
    }

    /// The background watches behind `wait_for_change`, started once from `from`.
    fn start_watches(&self, from: Revision) {
        let mut started = self
            .changes
            .started
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *started {
            return;
        }
        *started = true;
        *self
            .changes
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = from;
        for kind in self.kinds.iter() {
            let client = self.client.clone();
            let kind = kind.clone();
            let changes = self.changes.clone();
            self.runtime
                .handle
                .spawn(watch_forever(client, kind, from, changes));
        }
    }
}

/// Watches one kind from `rev` for as long as the store lives, reporting every change's
/// revision. Resumes from the last seen resource version; on 410 Gone, from a fresh list
/// (reported as a change, since events may have been missed).
async fn watch_forever(client: Client, kind: Kind, mut rev: Revision, changes: Arc<Changes>) {
    let api = api(&client, &kind, None);
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut gone = false;
        match api
            .watch(&WatchParams::default().timeout(240), &rev.to_string())
            .await
        {
            Ok(stream) => {
                let mut stream = std::pin::pin!(stream);
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(
                            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o),
                        ) => {
                            if let Ok(r) = object_rv(&o) {
                                rev = rev.max(r);
                                changes.saw(r);
                            }
                            backoff = Duration::from_millis(200);
                        }
                        Ok(WatchEvent::Bookmark(b)) => {
                            if let Ok(r) = parse_rv(Some(&b.metadata.resource_version)) {
                                rev = rev.max(r);
                            }
                        }
                        Ok(WatchEvent::Error(s)) => {
                            gone = s.code == 410;
                            break;
                        }
                        Err(e) => {
                            gone = code(&e) == Some(410);
                            break;
                        }
                    }
                }
            }
            Err(e) => gone = code(&e) == Some(410),
        }
        if gone {
            if let Ok(r) = current_revision(&client).await {
                rev = r;
                changes.saw(r);
                continue;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
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

/// Feeds a [`crate::Watch`] with one kind's changes under `prefix`: watched from `rev`,
/// resumed from the last resource version seen when the stream ends or breaks (with backoff),
/// ended with [`StoreError::Compacted`] on 410 Gone. A custom resource not installed yet
/// (404) is waited for quietly.
async fn watch_kind_into(
    client: Client,
    kind: Kind,
    prefix: String,
    mut rev: Revision,
    out: Pusher,
) {
    let api = api(&client, &kind, None);
    let mut backoff = Duration::from_millis(200);
    let gone = |requested| StoreError::Compacted {
        requested,
        oldest: requested + 1,
    };
    while !out.gone() {
        let params = WatchParams::default().timeout(IDLE_CHECK.as_secs() as u32 * 30);
        let failure = match api.watch(&params, &rev.to_string()).await {
            Err(e) if code(&e) == Some(410) => {
                out.push(Err(gone(rev)));
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
                            if let Ok(r) = parse_rv(Some(&b.metadata.resource_version)) {
                                rev = rev.max(r);
                            }
                            continue;
                        }
                        Ok(WatchEvent::Error(s)) if s.code == 410 => {
                            out.push(Err(gone(rev)));
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
                    let Ok(r) = object_rv(&obj) else { continue };
                    rev = rev.max(r);
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
        for kind in self.kinds_under(prefix) {
            self.runtime.handle.spawn(watch_kind_into(
                self.client.clone(),
                kind,
                prefix.to_string(),
                after,
                out.clone(),
            ));
        }
        Ok(Box::new(watch))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let (kind, loc) = self.locate(key)?;
        if kind.shape == Shape::Endpoints {
            let (kvs, _) = self.list(key)?;
            return Ok(kvs.into_iter().find(|kv| kv.key == key));
        }
        let client = self.client.clone();
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
            let rev = object_rv(&obj)?;
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
        let prefix = prefix.to_string();
        self.run("list", async move {
            if kinds.is_empty() {
                return Ok((Vec::new(), current_revision(&client).await?));
            }
            let mut out = Vec::new();
            let mut rev = Revision::MAX;
            for kind in &kinds {
                let (items, r) = list_kind(&client, kind).await?;
                rev = rev.min(r);
                for obj in items {
                    let mod_revision = object_rv(&obj)?;
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
            }
            out.sort_by(|a, b| a.key.cmp(&b.key));
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
        let client = self.client.clone();
        let key = key.to_string();
        self.run("delete", async move {
            let api = api(&client, &kind, loc.namespace.as_deref());
            let dp = DeleteParams {
                preconditions: expected_mod_revision.map(|r| Preconditions {
                    resource_version: Some(r.to_string()),
                    uid: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&loc.name, &dp).await {
                Ok(_) => Ok(Some(current_revision(&client).await?)),
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
                        Ok(Some(o)) => object_rv(&o).ok(),
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
        let prefix = prefix.to_string();
        self.run("watch", async move {
            let now = current_revision(&client).await?;
            let mut events = Vec::new();
            for kind in &kinds {
                replay(&client, kind, &prefix, after, now, &mut events).await?;
            }
            events.sort_by_key(Event::revision);
            Ok(events)
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let client = self.client.clone();
        self.run(
            "read revision",
            async move { current_revision(&client).await },
        )
    }

    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        self.start_watches(after);
        let deadline = Instant::now() + timeout;
        let mut latest = self
            .changes
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *latest <= after {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            latest = self
                .changes
                .wake
                .wait_timeout(latest, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok((*latest).max(after))
    }
}

/// Appends the changes to one kind after `after` (up to `now`, or until the watch goes quiet).
async fn replay(
    client: &Client,
    kind: &Kind,
    prefix: &str,
    after: Revision,
    now: Revision,
    out: &mut Vec<Event>,
) -> Result<(), StoreError> {
    let api = api(client, kind, None);
    let stream = match api
        .watch(&WatchParams::default().timeout(5), &after.to_string())
        .await
    {
        Ok(s) => s,
        Err(e) if code(&e) == Some(410) => {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: now,
            })
        }
        Err(e) if code(&e) == Some(404) && kind.shape == Shape::Custom => return Ok(()),
        Err(e) => return Err(kerr(&format!("watch {}", kind.resource.plural), e)),
    };
    let mut stream = std::pin::pin!(stream);
    loop {
        let ev = match tokio::time::timeout(SETTLE, stream.next()).await {
            Err(_) | Ok(None) => return Ok(()),
            Ok(Some(ev)) => ev,
        };
        let (obj, deleted) = match ev {
            Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => (o, false),
            Ok(WatchEvent::Deleted(o)) => (o, true),
            Ok(WatchEvent::Bookmark(_)) => continue,
            Ok(WatchEvent::Error(s)) if s.code == 410 => {
                return Err(StoreError::Compacted {
                    requested: after,
                    oldest: now,
                })
            }
            Ok(WatchEvent::Error(s)) => {
                return Err(StoreError::Backend(format!(
                    "kubernetes watch {}: {}",
                    kind.resource.plural, s.message
                )))
            }
            Err(e) => return Err(kerr(&format!("watch {}", kind.resource.plural), e)),
        };
        let rev = object_rv(&obj)?;
        if rev <= after {
            continue;
        }
        for (key, value) in records(kind, &obj)? {
            if !key.starts_with(prefix) {
                continue;
            }
            out.push(record_event(key, value, deleted, rev));
        }
        if rev >= now {
            return Ok(());
        }
    }
}
