//! [`LocalStore`]: the embedded backend, one SQLite file shared by every process of a node
//! (or of a whole lab) at once.
//!
//! Layout: `kv` holds the live keys, `events` the change log (newest
//! [`DEFAULT_EVENT_RETENTION`] writes), `meta` the global revision and the compaction mark.
//! Every write runs in a `BEGIN IMMEDIATE` transaction, so reading the current revision,
//! checking a compare-and-swap condition and writing are atomic across processes. The file is
//! in WAL mode, so readers never block writers; writers queue on a 10 s busy timeout.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::{Event, KeyValue, Revision, Store, StoreError};

/// How many events `events_since` can replay by default.
pub const DEFAULT_EVENT_RETENTION: i64 = 10_000;

const SCHEMA_VERSION: i64 = 1;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER PRIMARY KEY NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    create_rev INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    revision INTEGER NOT NULL,
    compacted INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, revision, compacted) VALUES (0, 0, 0);
";

/// The embedded SQLite store. Cheap to open; safe to share between threads (one connection
/// behind a mutex) and between processes (SQLite locking).
pub struct LocalStore {
    conn: Mutex<Connection>,
    retention: i64,
}

fn backend(context: &str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("{context}: {e}"))
}

/// The smallest string greater than every string starting with `prefix` (None: unbounded).
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(c) = next {
            chars.push(c);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// (revision, compacted) from the meta row.
fn read_meta(conn: &Connection) -> Result<(Revision, Revision), StoreError> {
    conn.prepare_cached("SELECT revision, compacted FROM meta WHERE id = 0")
        .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(backend("read revision"))
}

/// (create_rev, mod_rev) of a key inside a transaction.
fn key_revs(tx: &Transaction<'_>, key: &str) -> Result<Option<(Revision, Revision)>, StoreError> {
    tx.prepare_cached("SELECT create_rev, mod_rev FROM kv WHERE key = ?1")
        .and_then(|mut st| {
            st.query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(backend("read key"))
}

impl LocalStore {
    /// Opens (creating the file and schema if missing) the store at `path`.
    pub fn open(path: &Path) -> Result<LocalStore, StoreError> {
        let ctx = |what: &str| format!("{what} {}", path.display());
        // A new file is created 0600 from its first byte (SQLite would create it 0644, and
        // its -wal/-shm files take the database file's mode).
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::Backend(format!("{}: {e}", ctx("create")))),
            }
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("open"))))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("busy_timeout"))))?;
        // WAL makes NORMAL durable against crashes of processes; only an OS crash may lose
        // the newest commits.
        conn.execute_batch("PRAGMA synchronous = NORMAL;")
            .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("pragma"))))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("read schema version"))))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{} has schema version {version}, this build knows {SCHEMA_VERSION}",
                path.display()
            )));
        }
        let mut store = LocalStore {
            conn: Mutex::new(conn),
            retention: DEFAULT_EVENT_RETENTION,
        };
        if version < SCHEMA_VERSION {
            store
                .init_schema()
                .map_err(|e| StoreError::Backend(format!("{}: {e}", ctx("create schema"))))?;
        }
        Ok(store)
    }

    /// Keeps only the newest `events` events for `events_since` (at least 1). The setting is
    /// per handle; the compaction mark it produces is shared through the file.
    pub fn with_event_retention(mut self, events: i64) -> Self {
        self.retention = events.max(1);
        self
    }

    fn init_schema(&mut self) -> Result<(), rusqlite::Error> {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Switching to WAL needs an exclusive lock; another process may be initialising too.
        let mut attempt = 0;
        while let Err(e) =
            conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
        {
            attempt += 1;
            if attempt > 50 {
                return Err(e);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION};"))?;
        tx.commit()
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no transaction open (dropping one rolls back).
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` in an immediate (write-locked) transaction; `f` checks preconditions and says
    /// what to write. A write gets the next revision, returned as Some.
    fn write<'v>(
        &self,
        key: &str,
        f: impl FnOnce(&Transaction<'_>) -> Result<Write<'v>, StoreError>,
    ) -> Result<Option<Revision>, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend("begin write"))?;
        let value = match f(&tx)? {
            Write::Nothing => return Ok(None),
            Write::Put(v) => Some(v),
            Write::Delete => None,
        };
        let (current, compacted) = read_meta(&tx)?;
        let rev = current + 1;
        match value {
            Some(value) => {
                let create_rev = key_revs(&tx, key)?.map_or(rev, |(c, _)| c);
                tx.prepare_cached(
                    "INSERT INTO kv (key, value, create_rev, mod_rev) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(key) DO UPDATE SET value = excluded.value, mod_rev = excluded.mod_rev",
                )
                .and_then(|mut st| st.execute(params![key, value, create_rev, rev]))
                .map_err(backend("write key"))?;
                tx.prepare_cached(
                    "INSERT INTO events (rev, key, value, create_rev) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut st| st.execute(params![rev, key, value, create_rev]))
                .map_err(backend("write event"))?;
            }
            None => {
                tx.prepare_cached("DELETE FROM kv WHERE key = ?1")
                    .and_then(|mut st| st.execute([key]))
                    .map_err(backend("delete key"))?;
                tx.prepare_cached("INSERT INTO events (rev, key, value) VALUES (?1, ?2, NULL)")
                    .and_then(|mut st| st.execute(params![rev, key]))
                    .map_err(backend("write event"))?;
            }
        }
        // Compact in batches so most writes skip the DELETE.
        let mark = rev - self.retention;
        let batch = (self.retention / 10).clamp(1, 1000);
        let new_compacted = if mark - compacted >= batch {
            tx.prepare_cached("DELETE FROM events WHERE rev <= ?1")
                .and_then(|mut st| st.execute([mark]))
                .map_err(backend("compact events"))?;
            mark
        } else {
            compacted
        };
        tx.prepare_cached("UPDATE meta SET revision = ?1, compacted = ?2 WHERE id = 0")
            .and_then(|mut st| st.execute(params![rev, new_compacted]))
            .map_err(backend("bump revision"))?;
        tx.commit().map_err(backend("commit"))?;
        Ok(Some(rev))
    }
}

/// What a write transaction does to its key.
enum Write<'v> {
    Put(&'v str),
    Delete,
    Nothing,
}

fn wrote(rev: Option<Revision>) -> Result<Revision, StoreError> {
    rev.ok_or_else(|| StoreError::Backend("write produced no revision".into()))
}

fn kv_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    Ok(KeyValue {
        key: r.get(0)?,
        value: r.get(1)?,
        create_revision: r.get(2)?,
        mod_revision: r.get(3)?,
    })
}

impl Store for LocalStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let conn = self.lock();
        conn.prepare_cached("SELECT key, value, create_rev, mod_rev FROM kv WHERE key = ?1")
            .and_then(|mut st| st.query_row([key], kv_from_row).optional())
            .map_err(backend("get"))
    }

    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut conn = self.lock();
        // A read transaction: rows and revision come from one snapshot.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(backend("begin list"))?;
        let rows = match prefix_end(prefix) {
            Some(end) => tx
                .prepare_cached(
                    "SELECT key, value, create_rev, mod_rev FROM kv
                     WHERE key >= ?1 AND key < ?2 ORDER BY key",
                )
                .and_then(|mut st| {
                    let rows = st.query_map([prefix, &end], kv_from_row)?.collect();
                    rows
                }),
            None => tx
                .prepare_cached("SELECT key, value, create_rev, mod_rev FROM kv ORDER BY key")
                .and_then(|mut st| {
                    let rows = st.query_map([], kv_from_row)?.collect();
                    rows
                }),
        }
        .map_err(backend("list"))?;
        let (rev, _) = read_meta(&tx)?;
        tx.commit().map_err(backend("end list"))?;
        Ok((rows, rev))
    }

    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        wrote(self.write(key, |tx| match key_revs(tx, key)? {
            Some(_) => Err(StoreError::AlreadyExists(key.to_string())),
            None => Ok(Write::Put(value)),
        })?)
    }

    fn update(
        &self,
        key: &str,
        value: &str,
        expected_mod_revision: Revision,
    ) -> Result<Revision, StoreError> {
        wrote(self.write(key, |tx| {
            let actual = key_revs(tx, key)?.map(|(_, m)| m);
            if actual == Some(expected_mod_revision) {
                Ok(Write::Put(value))
            } else {
                Err(StoreError::Conflict {
                    key: key.to_string(),
                    expected: Some(expected_mod_revision),
                    actual,
                })
            }
        })?)
    }

    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        wrote(self.write(key, |_| Ok(Write::Put(value)))?)
    }

    fn delete(
        &self,
        key: &str,
        expected_mod_revision: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError> {
        self.write(key, |tx| {
            let actual = key_revs(tx, key)?.map(|(_, m)| m);
            match (expected_mod_revision, actual) {
                (None, None) => Ok(Write::Nothing),
                (None, Some(_)) => Ok(Write::Delete),
                (Some(e), Some(a)) if e == a => Ok(Write::Delete),
                (expected, actual) => Err(StoreError::Conflict {
                    key: key.to_string(),
                    expected,
                    actual,
                }),
            }
        })
    }

    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(backend("begin events"))?;
        let (_, compacted) = read_meta(&tx)?;
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted,
            });
        }
        let end = prefix_end(prefix);
        let rows: Vec<(Revision, String, Option<String>, Option<Revision>)> = tx
            .prepare_cached(
                "SELECT rev, key, value, create_rev FROM events
                 WHERE rev > ?1 AND key >= ?2 AND (?3 IS NULL OR key < ?3) ORDER BY rev",
            )
            .and_then(|mut st| {
                let rows = st
                    .query_map(params![after, prefix, end], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })?
                    .collect();
                rows
            })
            .map_err(backend("read events"))?;
        tx.commit().map_err(backend("end events"))?;
        Ok(rows
            .into_iter()
            .map(|(rev, key, value, create_rev)| match value {
                Some(value) => Event::Put(KeyValue {
                    key,
                    value,
                    create_revision: create_rev.unwrap_or(rev),
                    mod_revision: rev,
                }),
                None => Event::Delete { key, revision: rev },
            })
            .collect())
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let conn = self.lock();
        Ok(read_meta(&conn)?.0)
    }

    /// Blocks until the store revision is > after or timeout passes; returns the current revision.
    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            let rev = self.revision()?;
            if rev > after {
                return Ok(rev);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(rev);
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests;
