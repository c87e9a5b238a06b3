//! Malla's datastore: the [`Store`] trait every component reads and writes cluster state
//! through, typed JSON helpers over it, [`LocalStore`], the embedded backend, and
//! [`EtcdStore`], the same model over an etcd v3 cluster, and [`KubeStore`], over a
//! Kubernetes API server (custom resources and the cluster's native objects).
//!
//! The model is a small etcd: string keys, string (JSON) values, a single global revision
//! counter bumped by every write, per-key create/mod revisions for compare-and-swap, and an
//! event log that watchers replay with [`Store::events_since`] or follow with [`Store::watch`].
//!
//! The calculation reads the cluster through a [`Syncer`] instead ([`Store::syncer`]): typed
//! updates and an explicit in-sync marker, per backend ([`syncer`]). Whether a consumer has
//! applied everything up to a moment is a write-then-observe [`barrier`].

pub mod barrier;
mod etcd;
pub mod kubernetes;
mod local;
mod runtime;
mod spec;
mod stream;
pub mod syncer;

pub use etcd::{EtcdAccess, EtcdStore, EtcdTlsPem, DEFAULT_SETTLE};
pub use kubernetes::KubeStore;
pub use local::{LocalStore, DEFAULT_EVENT_RETENTION};
pub use spec::{DatastoreSpec, EtcdTls, DEFAULT_ETCD_PREFIX, ETCD_PASSWORD_ENV};
pub use syncer::{Resource, StoreSyncer, SyncEvent, Syncer, Update, Version};

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The store-wide revision: bumped by one on every successful write (the Kubernetes backend:
/// a token standing for an opaque resourceVersion, see [`kubernetes`]).
pub type Revision = i64;

/// A key with its value and revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision of the write that created the key (since it last did not exist).
    pub create_revision: Revision,
    /// Revision of the last write to the key; the token for compare-and-swap.
    pub mod_revision: Revision,
}

/// One change to the store, as replayed by [`Store::events_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The key was created or updated; `mod_revision` is the event's revision.
    Put(KeyValue),
    /// The key was deleted at `revision`.
    Delete { key: String, revision: Revision },
}

impl Event {
    /// The key the event is about.
    pub fn key(&self) -> &str {
        match self {
            Event::Put(kv) => &kv.key,
            Event::Delete { key, .. } => key,
        }
    }

    /// The revision of the write.
    pub fn revision(&self) -> Revision {
        match self {
            Event::Put(kv) => kv.mod_revision,
            Event::Delete { revision, .. } => *revision,
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `create` on a key that exists.
    #[error("key {0} already exists")]
    AlreadyExists(String),
    /// A compare-and-swap failed: the key's mod revision was `actual` (None: missing).
    #[error("conflict on {key}: expected mod revision {expected:?}, found {actual:?}")]
    Conflict {
        key: String,
        expected: Option<Revision>,
        actual: Option<Revision>,
    },
    /// `events_since` asked for history already dropped; `oldest` is the smallest `after`
    /// that can still be served. Re-list and continue from the list's revision.
    #[error("revision {requested} is compacted (oldest usable is {oldest})")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// A stored value was not the JSON expected (or a value could not be encoded).
    #[error("cannot decode {key}: {reason}")]
    Decode { key: String, reason: String },
    /// The key cannot be stored by this backend (etcd: keys must start with `/`).
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: String },
    /// The backend failed (sqlite, I/O), with context.
    #[error("store backend: {0}")]
    Backend(String),
}

/// A key-value datastore with revisions, compare-and-swap and an event log.
pub trait Store: Send + Sync {
    /// The key, or None if missing.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// All keys starting with prefix, sorted by key, and the store revision the list was read at (one consistent read).
    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Creates key; AlreadyExists if present. Returns the new revision.
    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError>;
    /// Compare-and-swap: writes only if the key's mod_revision == expected; else Conflict (also when the key is missing).
    fn update(
        &self,
        key: &str,
        value: &str,
        expected_mod_revision: Revision,
    ) -> Result<Revision, StoreError>;
    /// Unconditional upsert.
    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError>;
    /// Deletes key. expected=Some(rev): only if mod_revision matches (else Conflict). Ok(None) when the key did not exist (and expected is None).
    fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError>;
    /// Every change to keys under prefix with revision > after, in revision order.
    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError>;
    /// The store's current revision (0 for an empty LocalStore; etcd's revision, which starts
    /// at 1 and is shared by every prefix, for EtcdStore).
    fn revision(&self) -> Result<Revision, StoreError>;
    /// Blocks until the store has changed after revision `after` or `timeout` passes; returns
    /// the current revision (> after when something changed). Blocking: call it from a plain
    /// thread, or accept that it holds the calling thread.
    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError>;
    /// A stream of every change under `prefix` after revision `after` (typically a list's
    /// revision). Changes to one key arrive in order; replaying a change already seen (the
    /// stream may start before a list that saw it) is harmless for a consumer that keeps
    /// the latest value per key. Backends with a push protocol (etcd, Kubernetes) keep one
    /// server-side watch open; the default polls [`Store::wait_for_change`] and
    /// [`Store::events_since`].
    fn watch<'a>(
        &'a self,
        prefix: &str,
        after: Revision,
    ) -> Result<Box<dyn Watch + 'a>, StoreError> {
        Ok(Box::new(PollWatch {
            store: self,
            prefix: prefix.to_string(),
            after,
        }))
    }

    /// The calculation's change feed: typed [`Update`]s of every kind it reads and
    /// [`SyncEvent::InSync`] after each listing ([`syncer`]). The default lists and follows
    /// [`Store::watch`] ([`StoreSyncer`]); the Kubernetes backend has its own, on
    /// kube-runtime's watcher.
    fn syncer(&self) -> Result<Box<dyn Syncer + '_>, StoreError> {
        Ok(Box::new(StoreSyncer::new(self)))
    }
}

/// An open stream of changes ([`Store::watch`]).
pub trait Watch: Send {
    /// The changes that arrived since the last call, waiting up to `timeout` for the first
    /// (empty when none came). [`StoreError::Compacted`]: changes were lost (history
    /// compacted, or the server restarted without it): list again and open a new watch.
    /// Any other error is transient (the server is away): call again; the stream resumes
    /// where it stopped.
    fn next(&mut self, timeout: Duration) -> Result<Vec<Event>, StoreError>;
}

/// The default [`Watch`]: waits for a change, then replays the event log from the last
/// revision returned.
struct PollWatch<'a, S: ?Sized> {
    store: &'a S,
    prefix: String,
    after: Revision,
}

impl<S: Store + ?Sized> Watch for PollWatch<'_, S> {
    fn next(&mut self, timeout: Duration) -> Result<Vec<Event>, StoreError> {
        let now = self.store.wait_for_change(self.after, timeout)?;
        if now <= self.after {
            return Ok(Vec::new());
        }
        let events = self.store.events_since(&self.prefix, self.after)?;
        // Revisions outside the prefix count too: nothing below `now` is left to replay.
        self.after = events
            .iter()
            .map(Event::revision)
            .max()
            .unwrap_or(now)
            .max(now);
        Ok(events)
    }
}

fn decode<T: DeserializeOwned>(key: &str, value: &str) -> Result<T, StoreError> {
    serde_json::from_str(value).map_err(|e| StoreError::Decode {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Reads and decodes a JSON value; the revision is the key's mod revision.
pub fn get_json<T: DeserializeOwned>(
    store: &dyn Store,
    key: &str,
) -> Result<Option<(T, Revision)>, StoreError> {
    match store.get(key)? {
        None => Ok(None),
        Some(kv) => Ok(Some((decode(&kv.key, &kv.value)?, kv.mod_revision))),
    }
}

/// Lists and decodes every JSON value under prefix: (key, value, mod revision), sorted by key,
/// plus the revision the list was read at. One undecodable value fails the whole list.
#[allow(clippy::type_complexity)] // the signature other crates are written against
pub fn list_json<T: DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<(Vec<(String, T, Revision)>, Revision), StoreError> {
    let (kvs, rev) = store.list(prefix)?;
    let mut out = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let v = decode(&kv.key, &kv.value)?;
        out.push((kv.key, v, kv.mod_revision));
    }
    Ok((out, rev))
}

/// Encodes a value as JSON and writes it unconditionally.
pub fn put_json<T: Serialize>(
    store: &dyn Store,
    key: &str,
    value: &T,
) -> Result<Revision, StoreError> {
    let s = to_json(key, value)?;
    store.put(key, &s)
}

/// Encodes a value as JSON; an encoding failure is reported as [`StoreError::Decode`].
pub fn to_json<T: Serialize>(key: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Decode {
        key: key.to_string(),
        reason: format!("encode: {e}"),
    })
}
