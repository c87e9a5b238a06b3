//! Convergence without quiet timers or revision arithmetic: a write-then-observe barrier, and
//! the agent's ready file that reports it.
//!
//! "Has this node applied everything up to the store's state now?" is answered the same way on
//! every backend, without comparing revisions (a Kubernetes `resourceVersion` is opaque):
//!
//! 1. The waiter bumps the barrier ([`bump`]): a counter at [`keys::SYNC_BARRIER`], written with
//!    compare-and-swap, so concurrent waiters get distinct, increasing numbers. It does so after
//!    the store acknowledged every write it wants covered.
//! 2. Each agent's [`crate::Syncer`] delivers the barrier like any record, in the feed's order
//!    ([`crate::Resource::Barrier`]). The agent reports the newest barrier it received in its
//!    ready file ([`ReadyFile`]) once everything the feed delivered up to it is applied and the
//!    dataplane driver acknowledged the apply.
//! 3. The waiter waits until every agent reports a barrier at least its own. The numbers are
//!    the barrier's own counter, never store revisions.
//!
//! Ordering: the local and etcd feeds are one stream in revision order, so a barrier received
//! means every earlier write was received. The Kubernetes feed is one watch per kind: the
//! barrier (a `ClusterNetwork` object) is ordered after earlier writes of its own kind by the
//! API; other kinds' watches are separate streams, which the API server feeds from etcd as it
//! commits, so earlier writes arrive first in practice, though the API does not promise an
//! order across kinds.
//!
//! An idle cluster needs no traffic: nothing is polled, the agent writes its ready file when
//! it applies, and a waiter costs one write.

use std::path::Path;

use malla_api::keys;

use crate::{Revision, Store, StoreError};

/// The record at [`keys::SYNC_BARRIER`] (its kind is in [`malla_api::kinds`]).
pub use malla_api::kinds::Barrier;

/// Bumps the barrier; returns the waiter's number. An agent that reports this number (or a
/// larger one) has applied everything the store acknowledged before this call.
pub fn bump<S: Store + ?Sized>(store: &S) -> Result<u64, StoreError> {
    let key = keys::SYNC_BARRIER;
    let json = |seq: u64| crate::to_json(key, &Barrier { seq });
    loop {
        let written = match store.get(key)? {
            None => store.create(key, &json(1)?).map(|_| 1),
            Some(kv) => {
                let now: Barrier = crate::decode(key, &kv.value)?;
                let next = now.seq.checked_add(1).ok_or_else(|| StoreError::Decode {
                    key: key.to_string(),
                    reason: "seq: the counter is at its maximum".into(),
                })?;
                store
                    .update(key, &json(next)?, kv.mod_revision)
                    .map(|_| next)
            }
        };
        match written {
            Ok(seq) => return Ok(seq),
            // Another waiter bumped it meanwhile: read again.
            Err(StoreError::AlreadyExists(_) | StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// What an agent's ready file says: it exists once the agent has applied its first full sync
/// (the CNI plugin's STATUS), and holds the newest barrier it has applied through, and the
/// revision of the last change it applied (`revision 1234` on the counting backends, `revision
/// rv:<resourceVersion>` on Kubernetes; for diagnostics and benchmarks, never compared across
/// backends).
///
/// ```text
/// barrier 7
/// revision 1234
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyFile {
    /// The newest barrier applied through (0: none seen yet).
    pub barrier: u64,
    /// The last applied change's revision, as written.
    pub revision: Option<String>,
}

impl ReadyFile {
    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = format!("barrier {}\n", self.barrier);
        if let Some(r) = &self.revision {
            s.push_str(&format!("revision {r}\n"));
        }
        s
    }

    /// Reads the text [`ReadyFile::render`] writes; None when it is not that.
    pub fn parse(text: &str) -> Option<ReadyFile> {
        let mut out = ReadyFile::default();
        let mut barrier = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (field, value) = line.trim().split_once(' ')?;
            match field {
                "barrier" => barrier = Some(value.parse().ok()?),
                "revision" => out.revision = Some(value.to_string()),
                _ => return None,
            }
        }
        out.barrier = barrier?;
        Some(out)
    }

    /// The file at `path`, if it exists and reads.
    pub fn read(path: &Path) -> Option<ReadyFile> {
        ReadyFile::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Writes the file atomically (a temporary beside it, renamed over it).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.render())?;
        std::fs::rename(&tmp, path)
    }

    /// The last applied revision, on the backends that count their writes.
    pub fn revision_number(&self) -> Option<Revision> {
        self.revision.as_deref()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalStore;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(&dir.path().join("store.db")).unwrap();
        (dir, s)
    }

    #[test]
    fn each_bump_gets_the_next_number() {
        let (_dir, s) = store();
        assert_eq!(bump(&s).unwrap(), 1);
        assert_eq!(bump(&s).unwrap(), 2);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = &s;
                move || (0..5).map(|_| bump(s).unwrap()).collect::<Vec<_>>()
            })
            .collect();
        let mut got: Vec<u64> = std::thread::scope(|sc| {
            let hs: Vec<_> = threads.into_iter().map(|f| sc.spawn(f)).collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        got.sort();
        assert_eq!(got, (3..=22).collect::<Vec<_>>());
    }

    #[test]
    fn a_malformed_barrier_is_refused_naming_its_key() {
        let (_dir, s) = store();
        s.put(keys::SYNC_BARRIER, r#"{"seq":"x"}"#).unwrap();
        let e = bump(&s).unwrap_err().to_string();
        assert!(
            e.contains(keys::SYNC_BARRIER) && e.contains("invalid type"),
            "{e}"
        );
    }

    #[test]
    fn the_ready_file_reads_what_it_writes() {
        let f = ReadyFile {
            barrier: 7,
            revision: Some("1234".into()),
        };
        assert_eq!(f.render(), "barrier 7\nrevision 1234\n");
        assert_eq!(ReadyFile::parse(&f.render()), Some(f.clone()));
        assert_eq!(f.revision_number(), Some(1234));
        let k = ReadyFile {
            barrier: 0,
            revision: Some("rv:8812".into()),
        };
        assert_eq!(
            ReadyFile::parse(&k.render()).unwrap().revision_number(),
            None
        );
        for bad in ["", "7", "barrier x", "revision 3", "barrier 1\nother 2"] {
            assert_eq!(ReadyFile::parse(bad), None, "{bad:?}");
        }
    }
}
