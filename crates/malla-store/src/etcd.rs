//! [`EtcdStore`]: the [`Store`] trait over an etcd v3 cluster, for clusters whose nodes do not
//! share one SQLite file.
//!
//! The model maps one to one: the store revision is etcd's header revision, a key's create and
//! mod revisions are etcd's, `create`/`update`/`delete(Some(_))` are single transactions that
//! compare revisions and write, and the event log is etcd's history, replayed with a watch.
//! Every key lives under a configurable prefix (e.g. `/malla-prod`) that is added on the way
//! in and stripped on the way out; keys must start with `/`, so one cluster's prefix never
//! reaches into another's (`/malla-a/…` vs `/malla-ab/…`).
//!
//! The client is async (`etcd-client`, tonic); the trait is blocking. Each `EtcdStore` owns a
//! dedicated thread running a current-thread tokio runtime: a call spawns its request there
//! and waits on a channel. That works from plain threads and from inside another tokio
//! runtime (the caller's runtime is never re-entered), and concurrent calls from many threads
//! are multiplexed over one HTTP/2 connection.
//!
//! Two differences from [`crate::LocalStore`], both inherent to sharing etcd:
//! - The revision is etcd's global one: writes outside the prefix bump it too. Revisions stay
//!   monotonic and every write still gets a fresh one, which is all callers rely on.
//! - [`Store::wait_for_change`] wakes on changes under the prefix only, not on other tenants'
//!   writes.

use std::future::Future;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType,
    GetOptions, Identity, TlsOptions, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};

use crate::runtime::{run_on, RuntimeThread};
use crate::stream::{Pusher, IDLE_CHECK};
use crate::{Event, KeyValue, Revision, Store, StoreError, Watch};

/// How long `events_since` waits for the watch to go quiet when etcd's newest revisions are
/// outside the watched range (etcd 3.4 syncs a new watcher's history every 100 ms and gives no
/// reliable "caught up" marker, so silence is the marker).
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(300);

/// Pause between watch attempts while etcd is unreachable (doubling up to the maximum).
const RETRY_PAUSE: Duration = Duration::from_millis(200);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Largest response accepted (a big `list`).
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// The etcd-backed store. Cheap to share between threads (`&EtcdStore` is all a caller needs).
pub struct EtcdStore {
    client: Client,
    /// Normalised: no trailing `/`; every etcd key is `prefix + key`.
    prefix: String,
    timeout: Duration,
    settle: Duration,
    runtime: RuntimeThread,
}

fn etcd_err(context: &str) -> impl FnOnce(etcd_client::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("etcd {context}: {e}"))
}

/// The smallest byte string greater than every string starting with `prefix` (None:
/// unbounded, which etcd spells `\0`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    h.map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd response without header".into()))
}

/// An etcd key range `[start, end)`; `end` None means "to the end of the keyspace".
#[derive(Debug, Clone)]
struct Range {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Range {
    fn get_options(&self) -> GetOptions {
        match &self.end {
            Some(end) => GetOptions::new().with_range(end.clone()),
            None => GetOptions::new().with_from_key(),
        }
    }

    fn watch_options(&self) -> WatchOptions {
        match &self.end {
            Some(end) => WatchOptions::new().with_range(end.clone()),
            None => WatchOptions::new().with_from_key(),
        }
    }
}

/// What a prefix scan covers.
enum Scan {
    Range(Range),
    /// The prefix cannot match a key of this store (keys start with `/`).
    Nothing,
}

/// TLS material for etcd, in PEM: the CA of etcd's serving certificate and, for client-
/// certificate authentication, this client's (certificate, key).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdTlsPem {
    pub ca: Vec<u8>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdTlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTlsPem")
            .field("identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// How to authenticate to etcd: TLS and/or an etcd user (name, password).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    pub tls: Option<EtcdTlsPem>,
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess")
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://host:port`) and checks it answers within
    /// `timeout`, which also bounds every later request. `prefix` (e.g. `/malla-prod`;
    /// a trailing `/` is ignored) namespaces every key.
    pub fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> Result<EtcdStore, StoreError> {
        Self::connect_with(endpoints, prefix, timeout, &EtcdAccess::default())
    }

    /// [`EtcdStore::connect`] with TLS (`https://` endpoints) and/or an etcd user.
    pub fn connect_with(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
        access: &EtcdAccess,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Backend("etcd: no endpoints given".into()));
        }
        let runtime = RuntimeThread::start("etcd")?;
        let eps = endpoints.to_vec();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout.max(Duration::from_secs(1)));
        if let Some(tls) = &access.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        if let Some((user, password)) = &access.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let connect = async move {
            Client::connect(eps, Some(options))
                .await
                .map_err(etcd_err("connect"))
        };
        let client = run_on(&runtime.handle, timeout, "etcd", "connect", connect)?;
        let store = EtcdStore {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            timeout,
            settle: DEFAULT_SETTLE,
            runtime,
        };
        // The client connects lazily: make sure someone answers.
        store
            .revision()
            .map_err(|e| StoreError::Backend(format!("etcd at {}: {e}", endpoints.join(","))))?;
        Ok(store)
    }

    /// How long `events_since` waits for silence when history ends outside the prefix
    /// (default [`DEFAULT_SETTLE`]).
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The normalised key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Compacts etcd's history up to `revision` (for the whole etcd, not only this prefix):
    /// `events_since` with an older `after` then fails with [`StoreError::Compacted`].
    pub fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        self.run("compact", async move {
            kv.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
                .map_err(etcd_err("compact"))?;
            Ok(())
        })
    }

    /// Runs a request on the runtime thread, bounded by the store's timeout.
    fn run<T: Send + 'static>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        run_on(&self.runtime.handle, self.timeout, "etcd", what, fut)
    }

    /// Runs an unbounded future (it must bound itself) on the runtime thread.
    fn run_unbounded<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.runtime.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| StoreError::Backend("etcd client runtime stopped".into()))?
    }

    /// The etcd key of a store key; keys must start with `/`.
    fn full_key(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        if !key.starts_with('/') {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "etcd store keys must start with '/'".into(),
            });
        }
        Ok(format!("{}{key}", self.prefix).into_bytes())
    }

    /// The etcd range of keys starting with `prefix`, within this store's namespace.
    fn scan(&self, prefix: &str) -> Scan {
        let effective = if prefix.is_empty() {
            "/"
        } else if prefix.starts_with('/') {
            prefix
        } else {
            return Scan::Nothing;
        };
        let start = format!("{}{effective}", self.prefix).into_bytes();
        let end = prefix_end(&start);
        Scan::Range(Range { start, end })
    }

    /// The etcd range holding every key of this store.
    fn namespace(&self) -> Range {
        let start = format!("{}/", self.prefix).into_bytes();
        let end = prefix_end(&start);
        Range { start, end }
    }

    fn convert(prefix_len: usize, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        let raw = kv.key();
        let key = raw
            .get(prefix_len..)
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| StoreError::Decode {
                key: String::from_utf8_lossy(raw).into_owned(),
                reason: "etcd key is not UTF-8 under the store prefix".into(),
            })?
            .to_string();
        let value = std::str::from_utf8(kv.value())
            .map_err(|e| StoreError::Decode {
                key: key.clone(),
                reason: format!("value is not UTF-8: {e}"),
            })?
            .to_string();
        Ok(KeyValue {
            key,
            value,
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    /// The mod revision of the key read by a failed transaction's else branch.
    fn actual_revision(resp: &TxnResponse) -> Option<Revision> {
        resp.op_responses().iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.mod_revision()),
            _ => None,
        })
    }

    /// Runs `compare → write else read` and returns the response.
    fn cas(
        &self,
        what: &'static str,
        compares: Vec<Compare>,
        write: TxnOp,
        full: Vec<u8>,
    ) -> Result<TxnResponse, StoreError> {
        let mut kv = self.client.kv_client();
        self.run(what, async move {
            let txn = etcd_client::Txn::new()
                .when(compares)
                .and_then(vec![write])
                .or_else(vec![TxnOp::get(full, None)]);
            kv.txn(txn).await.map_err(etcd_err(what))
        })
    }
}

/// The current revision, read with a count-only range over `range`.
async fn current_revision(
    mut kv: etcd_client::KvClient,
    range: Range,
) -> Result<Revision, StoreError> {
    let resp = kv
        .get(
            range.start.clone(),
            Some(range.get_options().with_count_only()),
        )
        .await
        .map_err(etcd_err("read revision"))?;
    header_revision(resp.header())
}

/// Result of one watch attempt for `wait_for_change`.
enum Woke {
    /// Something changed; the revision etcd reported.
    Changed(Revision),
    /// The stream ended (etcd went away); try again.
    Lost,
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let full = match self.full_key(key) {
            Ok(k) => k,
            // No key of this store can look like that.
            Err(_) => return Ok(None),
        };
        let mut kv = self.client.kv_client();
        let plen = self.prefix.len();
        self.run("get", async move {
            let resp = kv.get(full, None).await.map_err(etcd_err("get"))?;
            resp.kvs()
                .first()
                .map(|kv| EtcdStore::convert(plen, kv))
                .transpose()
        })
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let range = match self.scan(prefix) {
            Scan::Range(r) => r,
            Scan::Nothing => return Ok((Vec::new(), self.revision()?)),
        };
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let plen = self.prefix.len();
        self.run("list", async move {
            // One range request: the kvs and the header come from the same snapshot; etcd
            // sorts by key ascending.
            let resp = kv
                .get(range.start.clone(), Some(range.get_options()))
                .await
                .map_err(etcd_err("list"))?;
            let rev = header_revision(resp.header())?;
            let kvs = resp
                .kvs()
                .iter()
                .map(|kv| EtcdStore::convert(plen, kv))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((kvs, rev))
        })
    }

    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        let full = self.full_key(key)?;
        let resp = self.cas(
            "create",
            vec![Compare::create_revision(full.clone(), CompareOp::Equal, 0)],
            TxnOp::put(full.clone(), value, None),
            full,
        )?;
        if resp.succeeded() {
            header_revision(resp.header())
        } else {
            Err(StoreError::AlreadyExists(key.to_string()))
        }
    }

    fn update(
        &self,
        key: &str,
        value: &str,
        expected_mod_revision: Revision,
    ) -> Result<Revision, StoreError> {
        let Ok(full) = self.full_key(key) else {
            // Such a key cannot exist: the compare fails as for any missing key.
            return Err(StoreError::Conflict {
                key: key.to_string(),
                expected: Some(expected_mod_revision),
                actual: None,
            });
        };
        // A missing key has mod revision 0 in etcd's compares: also require it to exist.
        let resp = self.cas(
            "update",
            vec![
                Compare::version(full.clone(), CompareOp::Greater, 0),
                Compare::mod_revision(full.clone(), CompareOp::Equal, expected_mod_revision),
            ],
            TxnOp::put(full.clone(), value, None),
            full,
        )?;
        if resp.succeeded() {
            header_revision(resp.header())
        } else {
            Err(StoreError::Conflict {
                key: key.to_string(),
                expected: Some(expected_mod_revision),
                actual: EtcdStore::actual_revision(&resp),
            })
        }
    }

    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        let full = self.full_key(key)?;
        let mut kv = self.client.kv_client();
        let value = value.to_string();
        self.run("put", async move {
            let resp = kv.put(full, value, None).await.map_err(etcd_err("put"))?;
            header_revision(resp.header())
        })
    }

    fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError> {
        let Ok(full) = self.full_key(key) else {
            // Such a key cannot exist.
            return match expected_mod_revision {
                None => Ok(None),
                Some(e) => Err(StoreError::Conflict {
                    key: key.to_string(),
                    expected: Some(e),
                    actual: None,
                }),
            };
        };
        match expected_mod_revision {
            None => {
                let mut kv = self.client.kv_client();
                self.run("delete", async move {
                    let resp = kv.delete(full, None).await.map_err(etcd_err("delete"))?;
                    if resp.deleted() == 0 {
                        Ok(None)
                    } else {
                        header_revision(resp.header()).map(Some)
                    }
                })
            }
            Some(expected) => {
                let resp = self.cas(
                    "delete",
                    vec![
                        Compare::version(full.clone(), CompareOp::Greater, 0),
                        Compare::mod_revision(full.clone(), CompareOp::Equal, expected),
                    ],
                    TxnOp::delete(full.clone(), None),
                    full,
                )?;
                if resp.succeeded() {
                    header_revision(resp.header()).map(Some)
                } else {
                    Err(StoreError::Conflict {
                        key: key.to_string(),
                        expected: Some(expected),
                        actual: EtcdStore::actual_revision(&resp),
                    })
                }
            }
        }
    }

    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        let range = match self.scan(prefix) {
            Scan::Range(r) => r,
            Scan::Nothing => return Ok(Vec::new()),
        };
        let kv = self.client.kv_client();
        let mut watch = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let plen = self.prefix.len();
        let settle = self.settle;
        let timeout = self.timeout;
        self.run_unbounded(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let bounded = |what: &'static str| {
                move || StoreError::Backend(format!("etcd {what}: no answer within {timeout:?}"))
            };
            // Collect history up to the revision current now.
            let current = tokio::time::timeout_at(deadline, current_revision(kv, range.clone()))
                .await
                .map_err(|_| bounded("read revision")())??;
            if current <= after {
                return Ok(Vec::new());
            }
            let opts = range
                .watch_options()
                .with_start_revision(after.saturating_add(1).max(1));
            let mut stream =
                tokio::time::timeout_at(deadline, watch.watch(range.start.clone(), Some(opts)))
                    .await
                    .map_err(|_| bounded("watch")())?
                    .map_err(etcd_err("watch"))?;
            let mut events = Vec::new();
            // The history arrives in revision order; stop at `current`, or when the watch
            // has been quiet for `settle` (the newest revisions are outside the range).
            loop {
                let quiet = tokio::time::Instant::now() + settle;
                let msg = match tokio::time::timeout_at(quiet.min(deadline), stream.message()).await
                {
                    Ok(m) => m.map_err(etcd_err("watch"))?,
                    Err(_) if quiet <= deadline => break,
                    Err(_) => return Err(bounded("watch")()),
                };
                let Some(resp) = msg else {
                    return Err(StoreError::Backend("etcd watch: stream closed".into()));
                };
                if resp.compact_revision() > 0 {
                    return Err(StoreError::Compacted {
                        requested: after,
                        oldest: resp.compact_revision(),
                    });
                }
                if resp.canceled() {
                    return Err(StoreError::Backend(format!(
                        "etcd watch canceled: {}",
                        resp.cancel_reason()
                    )));
                }
                let mut done = false;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    if kv.mod_revision() > current {
                        done = true;
                        continue;
                    }
                    done |= kv.mod_revision() == current;
                    let kv = EtcdStore::convert(plen, kv)?;
                    events.push(match ev.event_type() {
                        EventType::Put => Event::Put(kv),
                        EventType::Delete => Event::Delete {
                            revision: kv.mod_revision,
                            key: kv.key,
                        },
                    });
                }
                if done {
                    break;
                }
            }
            Ok(events)
        })
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let kv = self.client.kv_client();
        let range = self.namespace();
        self.run("read revision", current_revision(kv, range))
    }

    fn watch<'a>(
        &'a self,
        prefix: &str,
        after: Revision,
    ) -> Result<Box<dyn Watch + 'a>, StoreError> {
        let Scan::Range(range) = self.scan(prefix) else {
            return Err(StoreError::InvalidKey {
                key: prefix.to_string(),
                reason: "etcd store keys start with '/'".into(),
            });
        };
        let (out, watch) = crate::stream::channel();
        self.runtime.handle.spawn(watch_into(
            self.client.clone(),
            range,
            self.prefix.len(),
            after.saturating_add(1),
            out,
        ));
        Ok(Box::new(watch))
    }

    /// Watches the store's namespace from `after + 1`: returns as soon as a change under the
    /// prefix is (or was) there, else the current revision after `timeout`. Survives etcd
    /// restarts within the timeout by re-watching.
    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        let range = self.namespace();
        let client = self.client.clone();
        let deadline = Instant::now() + timeout;
        let woke = self.run_unbounded(async move {
            let deadline = tokio::time::Instant::from_std(deadline);
            loop {
                let attempt = watch_once(client.clone(), range.clone(), after);
                match tokio::time::timeout_at(deadline, attempt).await {
                    Err(_) => return Ok(None),
                    Ok(Ok(Woke::Changed(rev))) => return Ok(Some(rev)),
                    Ok(Ok(Woke::Lost)) | Ok(Err(_)) => {
                        let pause = tokio::time::Instant::now() + RETRY_PAUSE;
                        if pause >= deadline {
                            return Ok(None);
                        }
                        tokio::time::sleep_until(pause).await;
                    }
                }
            }
        });
        match woke? {
            Some(rev) => Ok(rev),
            None => self.revision(),
        }
    }
}

/// Feeds a [`crate::Watch`]: one etcd watch over `range` from `from`, reopened from the
/// revision after the last event delivered when the stream breaks (etcd restarting), with
/// backoff; compaction past that revision ends it with [`StoreError::Compacted`].
async fn watch_into(client: Client, range: Range, plen: usize, mut from: Revision, out: Pusher) {
    let mut backoff = RETRY_PAUSE;
    while !out.gone() {
        let mut watch = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let opts = range.watch_options().with_start_revision(from.max(1));
        let failure = match watch.watch(range.start.clone(), Some(opts)).await {
            Err(e) => etcd_err("watch")(e),
            Ok(mut stream) => loop {
                let msg = match tokio::time::timeout(IDLE_CHECK, stream.message()).await {
                    Err(_) if out.gone() => return,
                    Err(_) => continue,
                    Ok(m) => m,
                };
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => break StoreError::Backend("etcd watch: stream closed".into()),
                    Err(e) => break etcd_err("watch")(e),
                };
                if resp.compact_revision() > 0 {
                    out.push(Err(StoreError::Compacted {
                        requested: from - 1,
                        oldest: resp.compact_revision(),
                    }));
                    return;
                }
                if resp.canceled() {
                    break StoreError::Backend(format!(
                        "etcd watch canceled: {}",
                        resp.cancel_reason()
                    ));
                }
                let mut events = Vec::with_capacity(resp.events().len());
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    from = from.max(kv.mod_revision() + 1);
                    match EtcdStore::convert(plen, kv) {
                        Ok(kv) => events.push(match ev.event_type() {
                            EventType::Put => Event::Put(kv),
                            EventType::Delete => Event::Delete {
                                revision: kv.mod_revision,
                                key: kv.key,
                            },
                        }),
                        // A key this store could not have written: skip it, keep watching.
                        Err(e) => tracing::warn!(error = %e, "etcd watch: skipping a key"),
                    }
                }
                backoff = RETRY_PAUSE;
                if !events.is_empty() && !out.push(Ok(events)) {
                    return;
                }
            },
        };
        if !out.push(Err(failure)) {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_RETRY_PAUSE);
    }
}

/// One watch from `after + 1` over `range` until the first change.
async fn watch_once(client: Client, range: Range, after: Revision) -> Result<Woke, StoreError> {
    let mut watch = client.watch_client();
    let opts = range
        .watch_options()
        .with_start_revision(after.saturating_add(1).max(1));
    let mut stream = watch
        .watch(range.start.clone(), Some(opts))
        .await
        .map_err(etcd_err("watch"))?;
    loop {
        let Some(resp) = stream.message().await.map_err(etcd_err("watch"))? else {
            return Ok(Woke::Lost);
        };
        if resp.compact_revision() > 0 {
            // History since `after` is gone, so something happened since: report now.
            let rev = current_revision(client.kv_client(), range.clone()).await?;
            return Ok(Woke::Changed(rev));
        }
        if resp.canceled() {
            return Ok(Woke::Lost);
        }
        if let Some(last) = resp
            .events()
            .iter()
            .filter_map(|e| e.kv())
            .map(|kv| kv.mod_revision())
            .max()
        {
            let rev = header_revision(resp.header()).unwrap_or(last).max(last);
            return Ok(Woke::Changed(rev));
        }
    }
}
