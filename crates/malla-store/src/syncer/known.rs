//! The keys a [`super::StoreSyncer`]'s consumer holds, kept only to find, after a re-list,
//! those the datastore no longer has. They are read whole once per listing and otherwise only
//! changed, so they are kept compact: sorted and front-coded (each key as the length it shares
//! with the one before and the rest), with the watch's changes since in two small ordered sets
//! that are merged in once they grow. At 30k Services (~60k keys) the plain set of strings was
//! ~4.3 MiB of the agent's memory; front-coded, the keys take well under 1 MiB.

use std::cmp::Ordering;
use std::collections::BTreeSet;

/// A set of keys: `base` (front-coded, sorted) with `added` and `removed` since.
#[derive(Debug, Default)]
pub(super) struct KnownKeys {
    base: Vec<u8>,
    /// How many keys `base` holds.
    base_len: usize,
    /// Keys put since `base` was made (some may be in `base` already).
    added: BTreeSet<String>,
    /// Keys deleted since (some may not be in `base`).
    removed: BTreeSet<String>,
}

/// Changes kept aside at least up to this many before they are merged into the base.
const MERGE_AFTER: usize = 4096;

impl KnownKeys {
    /// `key` is held.
    pub(super) fn insert(&mut self, key: &str) {
        self.removed.remove(key);
        if !self.added.contains(key) {
            self.added.insert(key.to_string());
        }
        self.merge_if_large();
    }

    /// `key` is not held.
    pub(super) fn remove(&mut self, key: &str) {
        self.added.remove(key);
        if !self.removed.contains(key) {
            self.removed.insert(key.to_string());
        }
        self.merge_if_large();
    }

    /// Holds exactly `keys`.
    pub(super) fn replace(&mut self, keys: &BTreeSet<String>) {
        *self = KnownKeys::from_sorted(keys.iter().map(String::as_str));
    }

    /// The keys held that `seen` lacks, in order.
    pub(super) fn missing_from(&self, seen: &BTreeSet<String>) -> Vec<String> {
        let mut out = Vec::new();
        self.for_each(|k| {
            if !seen.contains(k) {
                out.push(k.to_string());
            }
        });
        out
    }

    fn from_sorted<'a>(keys: impl Iterator<Item = &'a str>) -> KnownKeys {
        let mut base = Vec::new();
        let mut prev: &[u8] = &[];
        let mut n = 0;
        for k in keys {
            let k = k.as_bytes();
            let shared = prev.iter().zip(k).take_while(|(a, b)| a == b).count();
            put_len(&mut base, shared);
            put_len(&mut base, k.len() - shared);
            base.extend_from_slice(&k[shared..]);
            prev = k;
            n += 1;
        }
        base.shrink_to_fit();
        KnownKeys {
            base,
            base_len: n,
            ..KnownKeys::default()
        }
    }

    fn merge_if_large(&mut self) {
        if self.added.len() + self.removed.len() > MERGE_AFTER.max(self.base_len / 4) {
            let mut all = Vec::with_capacity(self.base_len + self.added.len());
            self.for_each(|k| all.push(k.to_string()));
            *self = KnownKeys::from_sorted(all.iter().map(String::as_str));
        }
    }

    /// Calls `f` with every key held, in order.
    fn for_each(&self, mut f: impl FnMut(&str)) {
        let mut added = self.added.iter().peekable();
        let mut emit = |k: &str| {
            if !self.removed.contains(k) {
                f(k);
            }
        };
        let mut cur: Vec<u8> = Vec::new();
        let mut at = 0;
        while at < self.base.len() {
            let Some((shared, rest, next)) = entry(&self.base, at) else {
                break;
            };
            cur.truncate(shared);
            cur.extend_from_slice(rest);
            at = next;
            let Ok(k) = std::str::from_utf8(&cur) else {
                continue;
            };
            while let Some(a) = added.next_if(|a| a.as_str() < k) {
                emit(a);
            }
            if added
                .peek()
                .is_some_and(|a| a.as_str().cmp(k) == Ordering::Equal)
            {
                added.next();
            }
            emit(k);
        }
        for a in added {
            emit(a);
        }
    }
}

/// Appends `n` as a LEB128 varint.
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Reads a varint at `at`: the value and the position after it.
fn get_len(b: &[u8], mut at: usize) -> Option<(usize, usize)> {
    let mut n = 0usize;
    let mut shift = 0;
    loop {
        let byte = *b.get(at)?;
        at += 1;
        n |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((n, at));
        }
        shift += 7;
        if shift > 63 {
            return None;
        }
    }
}

/// The entry at `at`: its shared length, its own bytes, and where the next starts.
fn entry(b: &[u8], at: usize) -> Option<(usize, &[u8], usize)> {
    let (shared, at) = get_len(b, at)?;
    let (len, at) = get_len(b, at)?;
    let rest = b.get(at..at + len)?;
    Some((shared, rest, at + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(k: &KnownKeys) -> Vec<String> {
        k.missing_from(&BTreeSet::new())
    }

    #[test]
    fn front_coded_keys_read_back_with_the_changes_since() {
        let listed: BTreeSet<String> = (0..10_000)
            .map(|i| format!("/malla/services/ns-{}/svc-{i:05}", i % 7))
            .chain(["/a".to_string(), "/é/ü".to_string(), "/malla/x".repeat(40)])
            .collect();
        let mut k = KnownKeys::default();
        k.replace(&listed);
        assert_eq!(all(&k), listed.iter().cloned().collect::<Vec<_>>());
        assert!(k.base.len() < listed.iter().map(String::len).sum::<usize>() / 3);
        let mut want = listed.clone();
        for i in 0..20_000 {
            let key = format!("/malla/services/ns-{}/svc-{:05}", i % 5, i * 7 % 12_000);
            if i % 3 == 0 {
                k.remove(&key);
                want.remove(&key);
            } else {
                k.insert(&key);
                want.insert(key);
            }
        }
        assert_eq!(all(&k), want.iter().cloned().collect::<Vec<_>>());
        let mut seen = want.clone();
        let gone: Vec<String> = seen.iter().step_by(3).cloned().collect();
        for g in &gone {
            seen.remove(g);
        }
        assert_eq!(k.missing_from(&seen), gone);
        k.replace(&seen);
        assert_eq!(all(&k), seen.iter().cloned().collect::<Vec<_>>());
        assert!(KnownKeys::default().missing_from(&seen).is_empty());
    }
}
