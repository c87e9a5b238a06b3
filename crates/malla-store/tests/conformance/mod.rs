//! The backend-independent behaviour of a [`Store`]: every backend runs these cases.
//!
//! Each case gets an `open` factory: every call opens another handle onto the same, initially
//! empty, store (a new file for SQLite, a new key prefix for etcd). Revisions are asserted
//! relative to the store's revision when the case starts, since an etcd shared by several
//! prefixes does not start at 0; with one writer they still go up by exactly one per write.

#![allow(dead_code)] // each test binary uses a subset

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use malla_api::keys;
use malla_store::{
    barrier, get_json, list_json, put_json, Event, KeyValue, Resource, Revision, Store, StoreError,
    SyncEvent, Syncer, Version,
};

/// Opens another handle onto the case's store.
pub type Open<'a> = &'a (dyn Fn() -> Box<dyn Store> + Sync);

/// What a backend's key space and revisions allow; the cases write abstract keys (`/k`,
/// `/a/1`) and values (`v1`) through it.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Prepended to every abstract key (`/malla/pools/t` puts the cases' keys in the key
    /// space of the Kubernetes backend, one custom resource per key).
    pub key_prefix: &'static str,
    /// Values are stored as JSON objects `{"v": VALUE}` (custom resources' specs), not as-is.
    pub json_values: bool,
    /// Nothing but the case writes, so every write bumps the revision by exactly one.
    pub exact_revisions: bool,
    /// The backend reports the revision a key was created at.
    pub create_revisions: bool,
}

/// etcd and the local store: any key, any value, exact revisions.
pub const KEY_VALUE: Profile = Profile {
    key_prefix: "",
    json_values: false,
    exact_revisions: true,
    create_revisions: true,
};

static PROFILE: std::sync::OnceLock<Profile> = std::sync::OnceLock::new();

/// Sets the profile of this test binary's backend (before any case runs; default [`KEY_VALUE`]).
pub fn set_profile(p: Profile) {
    let _ = PROFILE.set(p);
}

fn profile() -> Profile {
    *PROFILE.get_or_init(|| KEY_VALUE)
}

/// The store key of an abstract key.
pub fn k(key: &str) -> String {
    format!("{}{key}", profile().key_prefix)
}

/// The stored form of an abstract value.
pub fn v(value: &str) -> String {
    if profile().json_values {
        serde_json::json!({ "v": value }).to_string()
    } else {
        value.to_string()
    }
}

/// The abstract value of a stored one.
pub fn unv(stored: &str) -> String {
    if profile().json_values {
        let j: serde_json::Value = serde_json::from_str(stored).unwrap();
        j["v"].as_str().unwrap().to_string()
    } else {
        stored.to_string()
    }
}

fn exact() -> bool {
    profile().exact_revisions
}

pub fn crud_and_revisions(open: Open<'_>) {
    let s = open();
    let key = k("/k");
    let base = s.revision().unwrap();
    assert_eq!(s.get(&key).unwrap(), None);
    let r1 = s.create(&key, &v("v1")).unwrap();
    assert!(r1 > base);
    if exact() {
        assert_eq!(r1, base + 1);
    }
    assert!(matches!(s.create(&key, &v("x")), Err(StoreError::AlreadyExists(x)) if x == key));
    let kv = s.get(&key).unwrap().unwrap();
    assert_eq!(
        (kv.key.as_str(), unv(&kv.value).as_str(), kv.mod_revision),
        (key.as_str(), "v1", r1)
    );
    if profile().create_revisions {
        assert_eq!(kv.create_revision, r1);
    }
    let r2 = s.put(&key, &v("v2")).unwrap();
    assert!(r2 > r1);
    let kv = s.get(&key).unwrap().unwrap();
    assert_eq!((unv(&kv.value).as_str(), kv.mod_revision), ("v2", r2));
    if profile().create_revisions {
        assert_eq!(kv.create_revision, r1);
    }
    let r3 = s.put(&k("/other"), &v("o")).unwrap();
    assert!(r3 > r2);
    if exact() {
        assert_eq!((r2, r3), (base + 2, base + 3));
        assert_eq!(s.revision().unwrap(), r3);
    }
    // A failed write does not bump the revision.
    assert!(s.create(&k("/other"), &v("o")).is_err());
    if exact() {
        assert_eq!(s.revision().unwrap(), r3);
    }
    // Another handle sees the same data.
    let t = open();
    assert_eq!(unv(&t.get(&key).unwrap().unwrap().value), "v2");
    assert!(t.revision().unwrap() >= r3);
}

pub fn update_is_compare_and_swap(open: Open<'_>) {
    let s = open();
    let key = k("/k");
    let r = s.create(&key, &v("a")).unwrap();
    let r2 = s.update(&key, &v("b"), r).unwrap();
    assert!(r2 > r);
    match s.update(&key, &v("c"), r) {
        Err(StoreError::Conflict {
            key: x,
            expected,
            actual,
        }) => assert_eq!((x, expected, actual), (key.clone(), Some(r), Some(r2))),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(unv(&s.get(&key).unwrap().unwrap().value), "b");
    for expected in [1, 0] {
        match s.update(&k("/missing"), &v("c"), expected) {
            Err(StoreError::Conflict {
                actual: None,
                expected: Some(e),
                ..
            }) if e == expected => {}
            other => panic!("expected conflict, got {other:?}"),
        }
    }
    assert_eq!(s.get(&k("/missing")).unwrap(), None);
}

pub fn delete_semantics(open: Open<'_>) {
    let s = open();
    let key = k("/k");
    let base = s.revision().unwrap();
    assert_eq!(s.delete(&k("/nope"), None).unwrap(), None);
    if exact() {
        assert_eq!(s.revision().unwrap(), base, "deleting nothing is no write");
    }
    assert!(matches!(
        s.delete(&k("/nope"), Some(3)),
        Err(StoreError::Conflict {
            expected: Some(3),
            actual: None,
            ..
        })
    ));
    let r = s.create(&key, &v("a")).unwrap();
    assert!(matches!(
        s.delete(&key, Some(r + 10)),
        Err(StoreError::Conflict { actual: Some(a), .. }) if a == r
    ));
    let d = s.delete(&key, Some(r)).unwrap().unwrap();
    assert!(d > r);
    if exact() {
        assert_eq!(d, r + 1);
    }
    assert_eq!(s.get(&key).unwrap(), None);
    let r = s.create(&key, &v("b")).unwrap();
    let kv = s.get(&key).unwrap().unwrap();
    assert_eq!(kv.mod_revision, r, "re-created key starts over");
    if profile().create_revisions {
        assert_eq!(kv.create_revision, r, "re-created key starts over");
    }
    assert!(s.delete(&key, None).unwrap().is_some());
    assert_eq!(s.delete(&key, None).unwrap(), None);
}

pub fn list_by_prefix_sorted_with_revision(open: Open<'_>) {
    let s = open();
    let base = s.revision().unwrap();
    let mut last = base;
    for key in ["/a/2", "/a/1", "/b/1", "/a0", "/a/3/x", "/"] {
        last = s.put(&k(key), &v(key)).unwrap();
    }
    let (kvs, rev) = s.list(&k("/a/")).unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, [k("/a/1"), k("/a/2"), k("/a/3/x")]);
    assert!(rev >= last);
    if exact() {
        assert_eq!(rev, base + 6);
    }
    assert!(kvs.iter().all(|kv| k(&unv(&kv.value)) == kv.key));
    let (all, _) = s.list(&k("")).unwrap();
    let keys: Vec<_> = all.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, ["/", "/a/1", "/a/2", "/a/3/x", "/a0", "/b/1"].map(k));
    assert!(s.list(&k("/zzz")).unwrap().0.is_empty());
}

/// A writer keeps two keys equal (writes both, then bumps); a list at revision R must see
/// exactly the values written up to R.
pub fn list_is_one_consistent_read_under_writes(open: Open<'_>, rounds: u32) {
    let writer = open();
    let reader = open();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut lists = 0;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            for i in 0..rounds {
                writer.put(&k("/c/a"), &v(&i.to_string())).unwrap();
                writer.put(&k("/c/b"), &v(&i.to_string())).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let (kvs, rev) = reader.list(&k("/c/")).unwrap();
            lists += 1;
            for kv in &kvs {
                assert!(kv.mod_revision <= rev);
            }
            if let [a, b] = &kvs[..] {
                // b is written right after a: at any revision, a is equal or one ahead.
                let (x, y): (i64, i64) = (
                    unv(&a.value).parse().unwrap(),
                    unv(&b.value).parse().unwrap(),
                );
                assert!(x == y || x == y + 1, "torn list {x} {y}");
                if exact() {
                    assert_eq!(rev, a.mod_revision.max(b.mod_revision));
                }
            }
        }
    });
    assert!(lists > 0);
}

pub fn events_in_order_filtered_by_prefix(open: Open<'_>) {
    let s = open();
    let b = s.revision().unwrap();
    let r1 = s.create(&k("/p/a"), &v("1")).unwrap();
    s.create(&k("/q/a"), &v("x")).unwrap();
    let r3 = s.put(&k("/p/a"), &v("2")).unwrap();
    let r4 = s.create(&k("/p/b"), &v("3")).unwrap();
    let r5 = s.delete(&k("/p/a"), None).unwrap().unwrap();
    let creates = profile().create_revisions;
    let put = |key: &str, value: &str, c: Revision, m: Revision| {
        Event::Put(KeyValue {
            key: k(key),
            value: v(value),
            create_revision: if creates { c } else { 0 },
            mod_revision: m,
        })
    };
    let want = vec![
        put("/p/a", "1", r1, r1),
        put("/p/a", "2", r1, r3),
        put("/p/b", "3", r4, r4),
        Event::Delete {
            key: k("/p/a"),
            revision: r5,
        },
    ];
    assert_eq!(s.events_since(&k("/p/"), b).unwrap(), want);
    let ev = s.events_since(&k("/p/"), r3).unwrap();
    assert_eq!(ev.iter().map(Event::revision).collect::<Vec<_>>(), [r4, r5]);
    let all = s.events_since(&k(""), b).unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].revision() < w[1].revision()));
    assert!(s.events_since(&k("/p/"), r5).unwrap().is_empty());
    // History that ends outside the prefix: the newest write is to /q/.
    s.put(&k("/q/b"), &v("y")).unwrap();
    assert_eq!(s.events_since(&k("/p/"), b).unwrap(), want);
    assert!(s.events_since(&k("/p/"), r5).unwrap().is_empty());
    assert_eq!(
        s.events_since(&k("/q/"), r1)
            .unwrap()
            .iter()
            .map(|e| e.key().to_string())
            .collect::<Vec<_>>(),
        [k("/q/a"), k("/q/b")]
    );
}

/// 100 writes, then `compact_through(base + 90)` (a no-op for backends that compact by
/// themselves); reading from before the compaction point fails with `Compacted`, and reading
/// from `oldest` returns the rest of the history.
pub fn events_are_compacted(open: Open<'_>, compact_through: &dyn Fn(Revision)) {
    let s = open();
    let base = s.revision().unwrap();
    for i in 0..100 {
        s.put("/k", &i.to_string()).unwrap();
    }
    compact_through(base + 90);
    // The newest 10 events are always there.
    let ev = s.events_since("/", base + 90).unwrap();
    assert_eq!(ev.len(), 10);
    match s.events_since("/", base) {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!(requested, base);
            assert!(
                (base + 1..=base + 90).contains(&oldest),
                "oldest {oldest}, base {base}"
            );
            let ev = s.events_since("/", oldest).unwrap();
            assert_eq!(ev.first().map(Event::revision), Some(oldest + 1));
            assert_eq!(ev.last().map(Event::revision), Some(base + 100));
            assert_eq!(ev.len() as i64, base + 100 - oldest);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // Another handle sees the compaction too.
    assert!(matches!(
        open().events_since("/", base + 1),
        Err(StoreError::Compacted { .. })
    ));
}

pub fn json_helpers(open: Open<'_>) {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct T {
        n: u32,
    }
    let s = open();
    let s = &*s;
    let ra = put_json(s, &k("/j/a"), &T { n: 1 }).unwrap();
    let rb = put_json(s, &k("/j/b"), &T { n: 2 }).unwrap();
    assert_eq!(
        get_json::<T>(s, &k("/j/a")).unwrap(),
        Some((T { n: 1 }, ra))
    );
    assert_eq!(get_json::<T>(s, &k("/j/none")).unwrap(), None);
    let (items, rev) = list_json::<T>(s, &k("/j/")).unwrap();
    assert!(rev >= rb);
    assert_eq!(
        items,
        vec![(k("/j/a"), T { n: 1 }, ra), (k("/j/b"), T { n: 2 }, rb)]
    );
    // JSON, but not a T.
    s.put(&k("/j/c"), r#"{"x":true}"#).unwrap();
    assert!(
        matches!(get_json::<T>(s, &k("/j/c")), Err(StoreError::Decode { key, .. }) if key == k("/j/c"))
    );
    assert!(matches!(
        list_json::<T>(s, &k("/j/")),
        Err(StoreError::Decode { .. })
    ));
}

pub fn wait_for_change_wakes_on_another_handles_write(open: Open<'_>) {
    let a = open();
    let b = open();
    let base = a.revision().unwrap();
    let start = Instant::now();
    assert_eq!(
        a.wait_for_change(base, Duration::from_millis(50)).unwrap(),
        base
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
    let written = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(60));
            b.put(&k("/k"), &v("v")).unwrap()
        });
        let start = Instant::now();
        let woke = a.wait_for_change(base, Duration::from_secs(10)).unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        let written = w.join().unwrap();
        assert_eq!(woke, written);
        written
    });
    if exact() {
        assert_eq!(written, base + 1);
    }
    // A change already there returns at once.
    let start = Instant::now();
    assert_eq!(
        a.wait_for_change(base, Duration::from_secs(10)).unwrap(),
        written
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

/// A watch opened at a list's revision, fed into a key -> value map, ends equal to a fresh
/// list while another handle creates, updates and deletes keys (some outside the prefix);
/// each key's changes arrive in revision order; nothing arrives for keys outside the prefix.
pub fn watch_keeps_a_mirror_equal_to_a_list(open: Open<'_>) {
    let a = open();
    let b = open();
    b.put(&k("/w/seed"), &v("0")).unwrap();
    let (listed, at) = a.list(&k("/w/")).unwrap();
    let mut mirror: std::collections::BTreeMap<String, String> =
        listed.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let mut watch = a.watch(&k("/w/"), at).unwrap();
    let mut last_rev: std::collections::BTreeMap<String, Revision> = Default::default();
    let apply = |events: Vec<Event>,
                 mirror: &mut std::collections::BTreeMap<String, String>,
                 last_rev: &mut std::collections::BTreeMap<String, Revision>| {
        for e in events {
            assert!(
                e.key().starts_with(&k("/w/")),
                "{} is outside the prefix",
                e.key()
            );
            let prev = last_rev.insert(e.key().to_string(), e.revision());
            assert!(
                prev.is_none_or(|p| p < e.revision()),
                "{} out of order",
                e.key()
            );
            match e {
                Event::Put(kv) => {
                    mirror.insert(kv.key, kv.value);
                }
                Event::Delete { key, .. } => {
                    mirror.remove(&key);
                }
            }
        }
    };
    let last = std::thread::scope(|sc| {
        let w = sc.spawn(|| {
            let mut last = 0;
            for i in 0..30 {
                last = b
                    .put(&k(&format!("/w/{}", i % 7)), &v(&i.to_string()))
                    .unwrap();
                b.put(&k(&format!("/x/{i}")), &v("other")).unwrap();
                if i % 5 == 4 {
                    if let Some(r) = b.delete(&k(&format!("/w/{}", i % 3)), None).unwrap() {
                        last = r;
                    }
                }
            }
            last
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !w.is_finished() && Instant::now() < deadline {
            apply(
                watch.next(Duration::from_millis(100)).unwrap(),
                &mut mirror,
                &mut last_rev,
            );
        }
        w.join().unwrap()
    });
    let (now, _) = a.list(&k("/w/")).unwrap();
    let want: std::collections::BTreeMap<String, String> =
        now.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (mirror != want || last_rev.values().max().is_none_or(|r| *r < last))
        && Instant::now() < deadline
    {
        apply(
            watch.next(Duration::from_millis(200)).unwrap(),
            &mut mirror,
            &mut last_rev,
        );
    }
    assert_eq!(mirror, want);
    // Quiet now: nothing more arrives.
    assert!(watch.next(Duration::from_millis(300)).unwrap().is_empty());
}

pub fn concurrent_cas_increments_from_separate_handles(
    open: Open<'_>,
    threads: usize,
    per_thread: usize,
) {
    let counter = k("/counter");
    let base = open().create(&counter, &v("0")).unwrap();
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                let s = open();
                for _ in 0..per_thread {
                    loop {
                        let kv = s.get(&counter).unwrap().unwrap();
                        let n: u64 = unv(&kv.value).parse().unwrap();
                        match s.update(&counter, &v(&(n + 1).to_string()), kv.mod_revision) {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    let s = open();
    let kv = s.get(&counter).unwrap().unwrap();
    assert_eq!(unv(&kv.value), (threads * per_thread).to_string());
    if exact() {
        assert_eq!(s.revision().unwrap(), base + (threads * per_thread) as i64);
    }
    let ev = s.events_since(&counter, base - 1).unwrap();
    assert_eq!(ev.len(), 1 + threads * per_thread);
    let revs: BTreeSet<_> = ev.iter().map(Event::revision).collect();
    assert_eq!(revs.len(), ev.len(), "one revision per write");
}

/// What a [`Syncer`]'s consumer holds: the latest record per key, the keys it saw deleted,
/// and how many times it was told it is in sync.
#[derive(Debug, Default)]
pub struct Held {
    pub records: BTreeMap<String, Resource>,
    pub deleted: BTreeSet<String>,
    pub in_syncs: usize,
    /// Deletions found by a re-list (the write that removed the key was not seen).
    pub relisted: BTreeSet<String>,
}

impl Held {
    pub fn apply(&mut self, events: Vec<SyncEvent>) {
        for e in events {
            match e {
                SyncEvent::InSync => self.in_syncs += 1,
                SyncEvent::Update(u) => match u.resource {
                    Some(r) => {
                        self.deleted.remove(&u.key);
                        self.records.insert(u.key, r);
                    }
                    None => {
                        if u.revision == Version::Relisted {
                            self.relisted.insert(u.key.clone());
                        }
                        self.records.remove(&u.key);
                        self.deleted.insert(u.key);
                    }
                },
            }
        }
    }

    /// The records under `prefix`.
    pub fn under(&self, prefix: &str) -> BTreeMap<String, Resource> {
        self.records
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect()
    }

    /// Follows `syncer` until `done` holds or `within` passes (transient errors are waited
    /// out, as a consumer would); whether `done` held.
    pub fn follow(
        &mut self,
        syncer: &mut dyn Syncer,
        within: Duration,
        done: impl Fn(&Held) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            match syncer.next(Duration::from_millis(200)) {
                Ok(events) => self.apply(events),
                Err(e) => {
                    eprintln!("syncer: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        true
    }
}

/// The records under `prefix` as a list reads them, typed.
pub fn listed(s: &dyn Store, prefix: &str) -> BTreeMap<String, Resource> {
    let (kvs, _) = s.list(prefix).unwrap();
    kvs.into_iter()
        .filter_map(|kv| {
            Some((
                kv.key.clone(),
                Resource::from_json(&kv.key, &kv.value).unwrap()?,
            ))
        })
        .collect()
}

/// An IP pool's record (valid on every backend: a custom resource on Kubernetes).
pub fn pool_json(name: &str, third_octet: u8) -> String {
    serde_json::json!({
        "name": name,
        "cidr": format!("198.19.{third_octet}.0/24"),
        "blockSize": 26,
    })
    .to_string()
}

/// A syncer on `s`, followed until its first `InSync`.
pub fn synced(s: &dyn Store) -> (Box<dyn Syncer + '_>, Held) {
    let mut syncer = s.syncer().unwrap();
    let mut held = Held::default();
    assert!(held.follow(&mut *syncer, Duration::from_secs(30), |h| h.in_syncs > 0));
    (syncer, held)
}

/// Pools `{prefix}a` and `{prefix}b` written to `s`, then a syncer on it in sync.
fn synced_with_pools<'a>(s: &'a dyn Store, prefix: &str) -> (Box<dyn Syncer + 'a>, Held) {
    for (i, n) in ["a", "b"].iter().enumerate() {
        let name = format!("{prefix}{n}");
        s.put(&keys::pool(&name), &pool_json(&name, i as u8 + 1))
            .unwrap();
    }
    synced(s)
}

/// A syncer lists (typed updates, then `InSync`), then follows creates, updates and deletes
/// made through another handle, ending with exactly what a list reads; nothing arrives once
/// quiet, and it never needs a second `InSync`.
pub fn syncer_follows_the_store(open: Open<'_>) {
    let a = open();
    let b = open();
    let p = |n: &str| keys::pool(&format!("sync-{n}"));
    let (mut syncer, mut held) = synced_with_pools(&*a, "sync-");
    assert_eq!(held.under(keys::POOLS), listed(&*b, keys::POOLS));
    match held.records.get(&p("a")) {
        Some(Resource::Pool(pool)) => assert_eq!(pool.name, "sync-a"),
        other => panic!("pool sync-a arrived as {other:?}"),
    }
    b.put(&p("c"), &pool_json("sync-c", 3)).unwrap();
    b.put(&p("a"), &pool_json("sync-a", 4)).unwrap();
    b.delete(&p("b"), None).unwrap();
    let want = listed(&*b, keys::POOLS);
    assert!(
        held.follow(&mut *syncer, Duration::from_secs(20), |h| h
            .under(keys::POOLS)
            == want),
        "the syncer's pools {:?} never became the listed {want:?}",
        held.under(keys::POOLS).keys()
    );
    assert!(
        held.deleted.contains(&p("b")),
        "the delete arrived as a deletion"
    );
    assert_eq!(held.in_syncs, 1);
    let quiet = syncer.next(Duration::from_millis(500)).unwrap();
    assert!(
        quiet
            .iter()
            .all(|e| !matches!(e, SyncEvent::Update(u) if u.key.starts_with(keys::POOLS))),
        "{quiet:?}"
    );
    for n in ["a", "c"] {
        b.delete(&p(n), None).unwrap();
    }
}

/// The convergence barrier ([`malla_store::barrier`]): each bump gets the next number, and a
/// syncer delivers it after what another handle wrote before bumping it (the writes here are
/// of the barrier's own kind on Kubernetes, which the API orders within a kind).
pub fn barrier_arrives_after_earlier_writes(open: Open<'_>) {
    let a = open();
    let b = open();
    let (mut syncer, mut held) = synced(&*a);
    let first = barrier::bump(&*b).unwrap();
    assert_eq!(barrier::bump(&*b).unwrap(), first + 1);
    // A value no earlier case wrote (an unchanged object makes no event on Kubernetes).
    let config = serde_json::json!({"routing": "vxlan", "vxlanVni": 4000 + first}).to_string();
    b.put(keys::CLUSTER_CONFIG, &config).unwrap();
    let target = barrier::bump(&*b).unwrap();
    assert_eq!(target, first + 2);
    let mut seen_config_first = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = 0;
    while got < target {
        assert!(
            Instant::now() < deadline,
            "barrier {target} never arrived: {held:?}"
        );
        for e in syncer.next(Duration::from_millis(200)).unwrap_or_default() {
            if let SyncEvent::Update(u) = &e {
                match &u.resource {
                    Some(Resource::Barrier(b)) => got = got.max(b.seq),
                    Some(Resource::ClusterConfig(c)) => {
                        seen_config_first = got < target;
                        assert_eq!(c.routing, malla_api::RoutingMode::Vxlan);
                    }
                    _ => {}
                }
            }
            held.apply(vec![e]);
        }
    }
    assert!(
        seen_config_first,
        "the write before the barrier came after it"
    );
    assert_eq!(held.in_syncs, 1);
    b.delete(keys::CLUSTER_CONFIG, None).unwrap();
}

/// The syncer's history is compacted away while it is not reading: it lists again, reports
/// what disappeared meanwhile as deletions, and says `InSync` a second time.
pub fn syncer_relists_after_compaction(open: Open<'_>, compact_through: &dyn Fn(Revision)) {
    let a = open();
    let b = open();
    let p = |n: &str| keys::pool(&format!("gone-{n}"));
    let (mut syncer, mut held) = synced_with_pools(&*a, "gone-");
    b.delete(&p("a"), None).unwrap();
    b.put(&p("c"), &pool_json("gone-c", 3)).unwrap();
    for i in 0..30 {
        b.put(&p("b"), &pool_json("gone-b", 10 + i)).unwrap();
    }
    compact_through(b.revision().unwrap());
    let want = listed(&*b, keys::POOLS);
    assert!(
        held.follow(&mut *syncer, Duration::from_secs(20), |h| {
            h.in_syncs >= 2 && h.under(keys::POOLS) == want
        }),
        "no re-list: {held:?}"
    );
    assert!(held.relisted.contains(&p("a")), "{held:?}");
    assert!(!held.records.contains_key(&p("a")));
}

/// A case, ready to run against an opener.
type Case = dyn Fn(Open<'_>);

/// A fresh store: returns an opener onto a new, empty store.
pub type Fresh<'a> = &'a dyn Fn() -> Box<dyn Fn() -> Box<dyn Store> + Sync>;

/// Every case that needs nothing backend-specific, each on a fresh store from `fresh`.
pub fn run_all(fresh: Fresh<'_>, heavy: bool) {
    let (rounds, threads, per_thread) = if heavy { (300, 12, 40) } else { (100, 4, 15) };
    let cases: Vec<(&str, Box<Case>)> = vec![
        ("crud_and_revisions", Box::new(crud_and_revisions)),
        (
            "update_is_compare_and_swap",
            Box::new(update_is_compare_and_swap),
        ),
        ("delete_semantics", Box::new(delete_semantics)),
        (
            "list_by_prefix_sorted_with_revision",
            Box::new(list_by_prefix_sorted_with_revision),
        ),
        (
            "list_is_one_consistent_read_under_writes",
            Box::new(move |o| list_is_one_consistent_read_under_writes(o, rounds)),
        ),
        (
            "events_in_order_filtered_by_prefix",
            Box::new(events_in_order_filtered_by_prefix),
        ),
        ("json_helpers", Box::new(json_helpers)),
        (
            "wait_for_change_wakes_on_another_handles_write",
            Box::new(wait_for_change_wakes_on_another_handles_write),
        ),
        (
            "watch_keeps_a_mirror_equal_to_a_list",
            Box::new(watch_keeps_a_mirror_equal_to_a_list),
        ),
        (
            "syncer_follows_the_store",
            Box::new(syncer_follows_the_store),
        ),
        (
            "barrier_arrives_after_earlier_writes",
            Box::new(barrier_arrives_after_earlier_writes),
        ),
        (
            "concurrent_cas_increments_from_separate_handles",
            Box::new(move |o| {
                concurrent_cas_increments_from_separate_handles(o, threads, per_thread)
            }),
        ),
    ];
    for (name, case) in cases {
        let open = fresh();
        let start = Instant::now();
        case(&*open);
        eprintln!("conformance {name}: ok in {:?}", start.elapsed());
    }
}
