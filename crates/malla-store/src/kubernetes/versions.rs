//! Opaque `resourceVersion`s behind the [`crate::Store`] trait's numeric revisions.
//!
//! The Kubernetes API says a resourceVersion is an opaque string: clients may only compare two
//! for equality and hand one back to the server (a watch's start, an update's precondition).
//! The key-value side of the store ([`crate::Store`]: IPAM's and the CNI plugin's
//! compare-and-swap) is written against numeric revisions, so the Kubernetes backend hands out
//! *tokens* instead: a token stands for one resourceVersion string, and is turned back into
//! that string when it is used as a precondition or a watch's start. Nothing is parsed.
//!
//! Tokens are numbered in the order this process first saw their resourceVersions, shared by
//! every [`super::KubeStore`] of one cluster in the process, so:
//! - equal resourceVersions give equal tokens (a `get` after a write returns the write's token);
//! - a token seen later is larger. That is the server's order for causally related reads (a
//!   write's result is newer than what was read before it), and the calls that learn of newer
//!   versions from the server itself (a watch from a token, `wait_for_change`, `events_since`)
//!   mint a token above the one they started from when the string was seen before it.
//!
//! Concurrent, unrelated reads get tokens in arrival order, not the server's: the numbers are
//! for compare-and-swap and for "did this change since", never a clock. The change feed with
//! the server's own semantics is the [`crate::Syncer`]. The table keeps the newest
//! [`CAPACITY`] tokens; an older one is unknown, which compare-and-swap reports as a conflict
//! (the caller reads again) and a watch as [`crate::StoreError::Compacted`] (it lists again).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

use crate::Revision;

/// How many tokens are remembered.
pub const CAPACITY: usize = 1 << 16;

/// The token table of one cluster.
#[derive(Default)]
pub(crate) struct Versions {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    last: Revision,
    by_token: BTreeMap<Revision, Arc<str>>,
    by_rv: HashMap<Arc<str>, Revision>,
}

impl Inner {
    fn mint(&mut self, rv: &str) -> Revision {
        self.last += 1;
        let t = self.last;
        let rv: Arc<str> = Arc::from(rv);
        self.by_token.insert(t, rv.clone());
        self.by_rv.insert(rv, t);
        while self.by_token.len() > CAPACITY {
            if let Some((old, rv)) = self.by_token.pop_first() {
                if self.by_rv.get(&rv) == Some(&old) {
                    self.by_rv.remove(&rv);
                }
            }
        }
        t
    }
}

impl Versions {
    /// The table shared by every store of the cluster at `server` in this process.
    pub(crate) fn of(server: &str) -> Arc<Versions> {
        static ALL: OnceLock<Mutex<HashMap<String, Arc<Versions>>>> = OnceLock::new();
        ALL.get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(server.to_string())
            .or_default()
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The token of `rv` (minted when new).
    pub(crate) fn token(&self, rv: &str) -> Revision {
        let mut inner = self.lock();
        match inner.by_rv.get(rv) {
            Some(t) => *t,
            None => inner.mint(rv),
        }
    }

    /// The token of `rv`, which the server says is newer than what `floor` stands for: its
    /// token when that is above `floor`, else a new one (the old one keeps standing for it).
    pub(crate) fn token_after(&self, rv: &str, floor: Revision) -> Revision {
        let mut inner = self.lock();
        match inner.by_rv.get(rv) {
            Some(t) if *t > floor => *t,
            _ => inner.mint(rv),
        }
    }

    /// The token of `rv`, which the server says is at least as new as what `floor` stands for
    /// (a list's version against its items'): its token when not below `floor`, else a new one.
    pub(crate) fn token_at_least(&self, rv: &str, floor: Revision) -> Revision {
        let mut inner = self.lock();
        match inner.by_rv.get(rv) {
            Some(t) if *t >= floor => *t,
            _ => inner.mint(rv),
        }
    }

    /// The resourceVersion a token stands for; None when unknown (never handed out, or
    /// forgotten).
    pub(crate) fn rv(&self, token: Revision) -> Option<Arc<str>> {
        self.lock().by_token.get(&token).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_stand_for_strings_without_reading_them() {
        let v = Versions::default();
        let a = v.token("zz-opaque");
        let b = v.token("aa-opaque");
        assert!(b > a, "numbered by first sight, not by the string");
        assert_eq!(v.token("zz-opaque"), a);
        assert_eq!(v.rv(a).as_deref(), Some("zz-opaque"));
        // Newer than b by the server's word: a fresh token, the old one still resolves.
        let a2 = v.token_after("zz-opaque", b);
        assert!(a2 > b);
        assert_eq!(v.rv(a).as_deref(), Some("zz-opaque"));
        assert_eq!(v.token("zz-opaque"), a2);
        assert_eq!(v.token_after("zz-opaque", a), a2);
        assert_eq!(v.rv(12345), None);
        assert_eq!(v.token_at_least("zz-opaque", a2), a2);
        let listed = v.token_at_least("aa-opaque", a2);
        assert!(listed > a2);
    }

    #[test]
    fn old_tokens_are_forgotten() {
        let v = Versions::default();
        let first = v.token("first");
        for i in 0..CAPACITY {
            v.token(&format!("v{i}"));
        }
        assert_eq!(v.rv(first), None);
        assert!(v.token("first") > first);
        assert_eq!(v.lock().by_token.len(), CAPACITY);
    }
}
