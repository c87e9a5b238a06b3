//! The backend-independent behaviour of a [`Store`]: every backend runs these cases.
//!
//! Each case gets an `open` factory: every call opens another handle onto the same, initially
//! empty, store (a new file for SQLite, a new key prefix for etcd). Revisions are asserted
//! relative to the store's revision when the case starts, since an etcd shared by several
//! prefixes does not start at 0; with one writer they still go up by exactly one per write.

#![allow(dead_code)] // each test binary uses a subset

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use malla_store::{get_json, list_json, put_json, Event, KeyValue, Revision, Store, StoreError};

/// Opens another handle onto the case's store.
pub type Open<'a> = &'a (dyn Fn() -> Box<dyn Store> + Sync);

pub fn crud_and_revisions(open: Open<'_>) {
    let s = open();
    let base = s.revision().unwrap();
    assert_eq!(s.get("/k").unwrap(), None);
    let r1 = s.create("/k", "v1").unwrap();
    assert_eq!(r1, base + 1);
    assert!(matches!(s.create("/k", "x"), Err(StoreError::AlreadyExists(k)) if k == "/k"));
    assert_eq!(
        s.get("/k").unwrap().unwrap(),
        KeyValue {
            key: "/k".into(),
            value: "v1".into(),
            create_revision: r1,
            mod_revision: r1
        }
    );
    let r2 = s.put("/k", "v2").unwrap();
    assert_eq!(r2, base + 2);
    let kv = s.get("/k").unwrap().unwrap();
    assert_eq!(
        (kv.value.as_str(), kv.create_revision, kv.mod_revision),
        ("v2", r1, r2)
    );
    let r3 = s.put("/other", "o").unwrap();
    assert_eq!(r3, base + 3);
    assert_eq!(s.revision().unwrap(), r3);
    // A failed write does not bump the revision.
    assert!(s.create("/other", "o").is_err());
    assert_eq!(s.revision().unwrap(), r3);
    // Another handle sees the same data.
    let t = open();
    assert_eq!(t.get("/k").unwrap().unwrap().value, "v2");
    assert_eq!(t.revision().unwrap(), r3);
}

pub fn update_is_compare_and_swap(open: Open<'_>) {
    let s = open();
    let r = s.create("/k", "a").unwrap();
    let r2 = s.update("/k", "b", r).unwrap();
    assert!(r2 > r);
    match s.update("/k", "c", r) {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => assert_eq!((key.as_str(), expected, actual), ("/k", Some(r), Some(r2))),
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.get("/k").unwrap().unwrap().value, "b");
    for expected in [1, 0] {
        match s.update("/missing", "c", expected) {
            Err(StoreError::Conflict {
                actual: None,
                expected: Some(e),
                ..
            }) if e == expected => {}
            other => panic!("expected conflict, got {other:?}"),
        }
    }
    assert_eq!(s.get("/missing").unwrap(), None);
}

pub fn delete_semantics(open: Open<'_>) {
    let s = open();
    let base = s.revision().unwrap();
    assert_eq!(s.delete("/nope", None).unwrap(), None);
    assert_eq!(s.revision().unwrap(), base, "deleting nothing is no write");
    assert!(matches!(
        s.delete("/nope", Some(3)),
        Err(StoreError::Conflict {
            expected: Some(3),
            actual: None,
            ..
        })
    ));
    let r = s.create("/k", "a").unwrap();
    assert!(matches!(
        s.delete("/k", Some(r + 10)),
        Err(StoreError::Conflict { actual: Some(a), .. }) if a == r
    ));
    let d = s.delete("/k", Some(r)).unwrap().unwrap();
    assert_eq!(d, r + 1);
    assert_eq!(s.get("/k").unwrap(), None);
    let r = s.create("/k", "b").unwrap();
    assert_eq!(
        s.get("/k").unwrap().unwrap().create_revision,
        r,
        "re-created key starts over"
    );
    assert!(s.delete("/k", None).unwrap().is_some());
    assert_eq!(s.delete("/k", None).unwrap(), None);
}

pub fn list_by_prefix_sorted_with_revision(open: Open<'_>) {
    let s = open();
    let base = s.revision().unwrap();
    for k in ["/a/2", "/a/1", "/b/1", "/a0", "/a/3/x", "/"] {
        s.put(k, k).unwrap();
    }
    let (kvs, rev) = s.list("/a/").unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/1", "/a/2", "/a/3/x"]);
    assert_eq!(rev, base + 6);
    assert!(kvs.iter().all(|kv| kv.value == kv.key));
    let (all, _) = s.list("").unwrap();
    let keys: Vec<_> = all.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/", "/a/1", "/a/2", "/a/3/x", "/a0", "/b/1"]);
    assert!(s.list("/zzz").unwrap().0.is_empty());
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
                writer.put("/c/a", &i.to_string()).unwrap();
                writer.put("/c/b", &i.to_string()).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let (kvs, rev) = reader.list("/c/").unwrap();
            lists += 1;
            for kv in &kvs {
                assert!(kv.mod_revision <= rev);
            }
            if let [a, b] = &kvs[..] {
                // b is written right after a: at any revision, a is equal or one ahead.
                let (x, y): (i64, i64) = (a.value.parse().unwrap(), b.value.parse().unwrap());
                assert!(x == y || x == y + 1, "torn list {x} {y}");
                assert_eq!(rev, a.mod_revision.max(b.mod_revision));
            }
        }
    });
    assert!(lists > 0);
}

pub fn events_in_order_filtered_by_prefix(open: Open<'_>) {
    let s = open();
    let b = s.revision().unwrap();
    s.create("/p/a", "1").unwrap(); // b+1
    s.create("/q/a", "x").unwrap(); // b+2
    s.put("/p/a", "2").unwrap(); // b+3
    s.create("/p/b", "3").unwrap(); // b+4
    s.delete("/p/a", None).unwrap(); // b+5
    let put = |key: &str, value: &str, c: Revision, m: Revision| {
        Event::Put(KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: b + c,
            mod_revision: b + m,
        })
    };
    let want = vec![
        put("/p/a", "1", 1, 1),
        put("/p/a", "2", 1, 3),
        put("/p/b", "3", 4, 4),
        Event::Delete {
            key: "/p/a".into(),
            revision: b + 5,
        },
    ];
    assert_eq!(s.events_since("/p/", b).unwrap(), want);
    let ev = s.events_since("/p/", b + 3).unwrap();
    assert_eq!(
        ev.iter().map(Event::revision).collect::<Vec<_>>(),
        [b + 4, b + 5]
    );
    let all = s.events_since("", b).unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].revision() < w[1].revision()));
    assert!(s.events_since("/p/", b + 5).unwrap().is_empty());
    // History that ends outside the prefix: the newest write is to /q/.
    s.put("/q/b", "y").unwrap(); // b+6
    assert_eq!(s.events_since("/p/", b).unwrap(), want);
    assert!(s.events_since("/p/", b + 5).unwrap().is_empty());
    assert_eq!(
        s.events_since("/q/", b + 1)
            .unwrap()
            .iter()
            .map(Event::key)
            .collect::<Vec<_>>(),
        ["/q/a", "/q/b"]
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
    let base = s.revision().unwrap();
    let r = put_json(s, "/j/a", &T { n: 1 }).unwrap();
    put_json(s, "/j/b", &T { n: 2 }).unwrap();
    assert_eq!(get_json::<T>(s, "/j/a").unwrap(), Some((T { n: 1 }, r)));
    assert_eq!(get_json::<T>(s, "/j/none").unwrap(), None);
    let (items, rev) = list_json::<T>(s, "/j/").unwrap();
    assert_eq!(rev, base + 2);
    assert_eq!(
        items,
        vec![
            ("/j/a".into(), T { n: 1 }, base + 1),
            ("/j/b".into(), T { n: 2 }, base + 2)
        ]
    );
    s.put("/j/c", "not json").unwrap();
    assert!(
        matches!(get_json::<T>(s, "/j/c"), Err(StoreError::Decode { key, .. }) if key == "/j/c")
    );
    assert!(matches!(
        list_json::<T>(s, "/j/"),
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
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(60));
            b.put("/k", "v").unwrap();
        });
        let start = Instant::now();
        assert_eq!(
            a.wait_for_change(base, Duration::from_secs(10)).unwrap(),
            base + 1
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    });
    // A change already there returns at once.
    let start = Instant::now();
    assert_eq!(
        a.wait_for_change(base, Duration::from_secs(10)).unwrap(),
        base + 1
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

pub fn concurrent_cas_increments_from_separate_handles(
    open: Open<'_>,
    threads: usize,
    per_thread: usize,
) {
    let base = open().create("/counter", "0").unwrap();
    std::thread::scope(|sc| {
        for _ in 0..threads {
            sc.spawn(|| {
                let s = open();
                for _ in 0..per_thread {
                    loop {
                        let kv = s.get("/counter").unwrap().unwrap();
                        let n: u64 = kv.value.parse().unwrap();
                        match s.update("/counter", &(n + 1).to_string(), kv.mod_revision) {
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
    let kv = s.get("/counter").unwrap().unwrap();
    assert_eq!(kv.value, (threads * per_thread).to_string());
    assert_eq!(s.revision().unwrap(), base + (threads * per_thread) as i64);
    let ev = s.events_since("/counter", base - 1).unwrap();
    assert_eq!(ev.len(), 1 + threads * per_thread);
    let revs: BTreeSet<_> = ev.iter().map(Event::revision).collect();
    assert_eq!(revs.len(), ev.len(), "one revision per write");
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
