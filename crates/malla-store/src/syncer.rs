//! The change feed of the store split: a [`Syncer`] per backend turns the datastore into typed
//! [`Update`]s (`key`, the record or None for a deletion, the revision it was read at) and an
//! explicit [`SyncEvent::InSync`] once everything listed has been delivered — after the first
//! listing and again after every re-list. A consumer that keeps the latest record per key and
//! trusts `InSync` holds exactly the server's state: no quiet timers, no revision polling.
//!
//! [`Store::syncer`] picks the backend's: the Kubernetes one is built on kube-runtime's watcher
//! ([`crate::kubernetes::watcher`]); the others use [`StoreSyncer`], which wraps the store's
//! list, watch and JSON decoding.
//!
//! Revisions are backend-specific ([`Version`]): the local and etcd stores number their writes,
//! the Kubernetes API's `resourceVersion` is an opaque string and is passed on as one.
//!
//! The feed also carries the convergence barrier ([`keys::SYNC_BARRIER`], [`Resource::Barrier`]):
//! a counter a waiter bumps so that "everything written before it" can be recognised by a
//! consumer without comparing revisions (see [`crate::barrier`]).

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::{Event, KeyValue, Revision, Store, StoreError, Watch};

mod known;

/// The parts of the key space a syncer follows: every record kind the calculation reads
/// ([`malla_api::kinds`], the one table of kinds), in the table's order.
pub static SYNCED_PREFIXES: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| malla_api::kinds::synced().collect());

/// One record of the kinds a syncer follows, typed: [`malla_api::kinds::Resource`].
pub use malla_api::kinds::Resource;

/// The revision an update was read at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Version {
    /// The store-wide write counter of the local and etcd backends.
    Revision(Revision),
    /// A Kubernetes `resourceVersion`: opaque, only ever compared for equality.
    ResourceVersion(String),
    /// A deletion found by a re-list: the key was listed before and is not any more; the
    /// write that removed it was not seen.
    Relisted,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::Revision(r) => write!(f, "{r}"),
            Version::ResourceVersion(rv) => write!(f, "rv {rv:?}"),
            Version::Relisted => f.write_str("re-list"),
        }
    }
}

/// One record changed.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub key: String,
    /// The record now, or None: deleted (or malformed, warned about naming the key).
    pub resource: Option<Resource>,
    pub revision: Version,
}

/// What a [`Syncer`] delivers.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::large_enum_variant)] // nearly every event is an update: boxing them costs more
pub enum SyncEvent {
    Update(Update),
    /// Everything listed so far has been delivered: the consumer holds the server's state
    /// (as of the listing) and can act on it. Sent after the first listing and again after
    /// every re-list (410 Gone, compacted history), which may be preceded by deletions of
    /// what disappeared meanwhile.
    InSync,
}

/// A backend's change feed.
pub trait Syncer: Send {
    /// The events that arrived since the last call, waiting up to `timeout` for the first
    /// (empty when none came). An error is transient (the datastore is away): the feed
    /// recovers by itself (resume, or re-list and `InSync` again); call again.
    fn next(&mut self, timeout: Duration) -> Result<Vec<SyncEvent>, StoreError>;
}

/// The update for `key`'s JSON record, or a deletion (with a warning) when it is malformed.
pub(crate) fn decoded(key: String, value: Option<&str>, revision: Version) -> Option<Update> {
    let resource = match value.map(|v| Resource::from_json(&key, v)) {
        None => None,
        Some(Ok(None)) => return None,
        Some(Ok(Some(r))) => Some(r),
        Some(Err(e)) => {
            tracing::warn!(%key, error = %e, "skipping a malformed record");
            None
        }
    };
    Some(Update {
        key,
        resource,
        revision,
    })
}

fn synced(key: &str) -> bool {
    malla_api::kinds::is_synced(key)
}

/// How many listed records one [`Syncer::next`] hands over at most. A listing is read one
/// prefix at a time and decoded a batch at a time, so the cluster never exists as text and as
/// records at once: at 30k Services / 300k endpoints, listing every prefix and decoding it all
/// in one go left the agent ~45 MiB larger after its first sync.
const LIST_BATCH: usize = 1024;

/// The [`Syncer`] of key-value backends (local, etcd): lists every synced prefix (an update per
/// record, then `InSync`), then follows one [`Store::watch`] over the key space from the
/// listing's revision. When the history it needs is compacted it lists again, reports the
/// keys that disappeared as deletions, and sends `InSync` again.
pub struct StoreSyncer<'a, S: ?Sized> {
    store: &'a S,
    watch: Option<Box<dyn Watch + 'a>>,
    /// The keys the consumer holds (to find what a re-list no longer has), kept compact.
    known: known::KnownKeys,
    queued: VecDeque<SyncEvent>,
    listing: Option<Listing>,
}

/// A listing under way: the next prefix to list, the current prefix's records not yet handed
/// over, the oldest revision of the lists so far, and the keys listed.
struct Listing {
    next_prefix: usize,
    current: std::vec::IntoIter<KeyValue>,
    revision: Revision,
    seen: BTreeSet<String>,
}

impl<'a, S: Store + ?Sized> StoreSyncer<'a, S> {
    pub fn new(store: &'a S) -> Self {
        StoreSyncer {
            store,
            watch: None,
            known: known::KnownKeys::default(),
            queued: VecDeque::new(),
            listing: None,
        }
    }

    /// Starts a listing; [`Self::next_listed`] carries it out.
    fn list(&mut self) {
        self.listing = Some(Listing {
            next_prefix: 0,
            current: Vec::new().into_iter(),
            revision: Revision::MAX,
            seen: BTreeSet::new(),
        });
    }

    /// The next batch of the listing, decoded; after the last record, the keys the listing no
    /// longer has as deletions, the watch opened from the oldest list revision, and `InSync`.
    /// A failed list is retried by the next call, from the prefix that failed.
    fn next_listed(&mut self) -> Result<Vec<SyncEvent>, StoreError> {
        let mut out: Vec<SyncEvent> = self.queued.drain(..).collect();
        let Some(l) = self.listing.as_mut() else {
            return Ok(out);
        };
        while out.len() < LIST_BATCH {
            if let Some(kv) = l.current.next() {
                l.seen.insert(kv.key.clone());
                let rev = Version::Revision(kv.mod_revision);
                out.extend(decoded(kv.key, Some(&kv.value), rev).map(SyncEvent::Update));
                continue;
            }
            if let Some(prefix) = SYNCED_PREFIXES.get(l.next_prefix) {
                let (kvs, r) = self.store.list(prefix)?;
                l.next_prefix += 1;
                l.revision = l.revision.min(r);
                l.current = kvs.into_iter();
                continue;
            }
            let rev = match l.revision {
                Revision::MAX => self.store.revision()?,
                r => r,
            };
            self.watch = Some(self.store.watch("/", rev)?);
            let seen = std::mem::take(&mut l.seen);
            self.listing = None;
            for gone in self.known.missing_from(&seen) {
                out.push(SyncEvent::Update(Update {
                    key: gone,
                    resource: None,
                    revision: Version::Relisted,
                }));
            }
            self.known.replace(&seen);
            out.push(SyncEvent::InSync);
            break;
        }
        Ok(out)
    }

    fn updates(&mut self, events: Vec<Event>) {
        for e in events {
            if !synced(e.key()) {
                continue;
            }
            let rev = Version::Revision(e.revision());
            let u = match e {
                Event::Put(kv) => {
                    self.known.insert(&kv.key);
                    decoded(kv.key, Some(&kv.value), rev)
                }
                Event::Delete { key, .. } => {
                    self.known.remove(&key);
                    decoded(key, None, rev)
                }
            };
            self.queued.extend(u.map(SyncEvent::Update));
        }
    }
}

impl<S: Store + ?Sized> Syncer for StoreSyncer<'_, S> {
    fn next(&mut self, timeout: Duration) -> Result<Vec<SyncEvent>, StoreError> {
        if self.listing.is_none() && self.watch.is_none() {
            self.list();
        }
        if self.listing.is_some() {
            return self.next_listed();
        }
        if self.queued.is_empty() {
            match self.watch.as_mut() {
                None => self.list(),
                Some(w) => match w.next(timeout) {
                    Ok(events) => self.updates(events),
                    Err(StoreError::Compacted { .. }) => {
                        tracing::warn!(
                            "the datastore's history moved past this syncer; listing again"
                        );
                        self.watch = None;
                        self.list();
                    }
                    Err(e) => return Err(e),
                },
            }
        }
        if self.listing.is_some() {
            return self.next_listed();
        }
        let out = self.queued.drain(..).collect();
        // A burst's capacity is not kept for the life of the agent.
        if self.queued.capacity() > LIST_BATCH {
            self.queued.shrink_to_fit();
        }
        Ok(out)
    }
}
