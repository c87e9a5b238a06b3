//! Tests of the SQLite backend: CRUD, compare-and-swap, events, compaction, several handles.

use super::*;
use crate::{get_json, list_json, put_json};

fn temp() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(&dir.path().join("store.db")).unwrap();
    (dir, store)
}

#[test]
fn prefix_end_is_the_successor() {
    assert_eq!(prefix_end("/a/"), Some("/a0".to_string()));
    assert_eq!(prefix_end(""), None);
    assert_eq!(prefix_end("a\u{10FFFF}"), Some("b".to_string()));
    assert_eq!(prefix_end("a\u{D7FF}"), Some("a\u{E000}".to_string()));
}

#[test]
fn crud_and_revisions() {
    let (_d, s) = temp();
    assert_eq!(s.revision().unwrap(), 0);
    assert_eq!(s.get("/k").unwrap(), None);
    let r1 = s.create("/k", "v1").unwrap();
    assert_eq!(r1, 1);
    assert!(matches!(s.create("/k", "x"), Err(StoreError::AlreadyExists(k)) if k == "/k"));
    let kv = s.get("/k").unwrap().unwrap();
    assert_eq!(
        kv,
        KeyValue {
            key: "/k".into(),
            value: "v1".into(),
            create_revision: 1,
            mod_revision: 1
        }
    );
    let r2 = s.put("/k", "v2").unwrap();
    assert_eq!(r2, 2);
    let kv = s.get("/k").unwrap().unwrap();
    assert_eq!(
        (kv.value.as_str(), kv.create_revision, kv.mod_revision),
        ("v2", 1, 2)
    );
    let r3 = s.put("/other", "o").unwrap();
    assert_eq!(r3, 3);
    assert_eq!(s.revision().unwrap(), 3);
    // A failed write does not bump the revision.
    assert!(s.create("/other", "o").is_err());
    assert_eq!(s.revision().unwrap(), 3);
}

#[test]
fn update_is_compare_and_swap() {
    let (_d, s) = temp();
    let r = s.create("/k", "a").unwrap();
    let r2 = s.update("/k", "b", r).unwrap();
    assert!(r2 > r);
    match s.update("/k", "c", r) {
        Err(StoreError::Conflict {
            key,
            expected,
            actual,
        }) => {
            assert_eq!((key.as_str(), expected, actual), ("/k", Some(r), Some(r2)));
        }
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.get("/k").unwrap().unwrap().value, "b");
    match s.update("/missing", "c", 1) {
        Err(StoreError::Conflict {
            actual: None,
            expected: Some(1),
            ..
        }) => {}
        other => panic!("expected conflict, got {other:?}"),
    }
    assert_eq!(s.get("/missing").unwrap(), None);
}

#[test]
fn delete_semantics() {
    let (_d, s) = temp();
    assert_eq!(s.delete("/nope", None).unwrap(), None);
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
    assert!(d > r);
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

#[test]
fn list_by_prefix_sorted_with_revision() {
    let (_d, s) = temp();
    for k in ["/a/2", "/a/1", "/b/1", "/a0", "/a/3/x", "/"] {
        s.put(k, k).unwrap();
    }
    let (kvs, rev) = s.list("/a/").unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/a/1", "/a/2", "/a/3/x"]);
    assert_eq!(rev, 6);
    let (all, _) = s.list("").unwrap();
    assert_eq!(all.len(), 6);
    assert!(s.list("/zzz").unwrap().0.is_empty());
}

#[test]
fn list_is_one_consistent_read_under_writes() {
    // A writer keeps two keys equal (writes both, then bumps); a list at revision R must see
    // exactly the values written up to R.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let writer = LocalStore::open(&path).unwrap();
    let reader = LocalStore::open(&path).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            for i in 0..300 {
                writer.put("/c/a", &i.to_string()).unwrap();
                writer.put("/c/b", &i.to_string()).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let (kvs, rev) = reader.list("/c/").unwrap();
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
}

#[test]
fn events_in_order_filtered_by_prefix() {
    let (_d, s) = temp();
    s.create("/p/a", "1").unwrap(); // 1
    s.create("/q/a", "x").unwrap(); // 2
    s.put("/p/a", "2").unwrap(); // 3
    s.create("/p/b", "3").unwrap(); // 4
    s.delete("/p/a", None).unwrap(); // 5
    let ev = s.events_since("/p/", 0).unwrap();
    assert_eq!(
        ev,
        vec![
            Event::Put(KeyValue {
                key: "/p/a".into(),
                value: "1".into(),
                create_revision: 1,
                mod_revision: 1
            }),
            Event::Put(KeyValue {
                key: "/p/a".into(),
                value: "2".into(),
                create_revision: 1,
                mod_revision: 3
            }),
            Event::Put(KeyValue {
                key: "/p/b".into(),
                value: "3".into(),
                create_revision: 4,
                mod_revision: 4
            }),
            Event::Delete {
                key: "/p/a".into(),
                revision: 5
            },
        ]
    );
    let ev = s.events_since("/p/", 3).unwrap();
    assert_eq!(ev.iter().map(Event::revision).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(s.events_since("", 0).unwrap().len(), 5);
    assert!(s.events_since("/p/", 5).unwrap().is_empty());
}

#[test]
fn events_are_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(&dir.path().join("s.db"))
        .unwrap()
        .with_event_retention(10);
    for i in 0..100 {
        s.put("/k", &i.to_string()).unwrap();
    }
    // At least the newest 10 events are always kept.
    let ev = s.events_since("/", 90).unwrap();
    assert_eq!(ev.len(), 10);
    match s.events_since("/", 0) {
        Err(StoreError::Compacted {
            requested: 0,
            oldest,
        }) => {
            assert!((80..=90).contains(&oldest), "oldest {oldest}");
            let ev = s.events_since("/", oldest).unwrap();
            assert_eq!(ev.first().map(Event::revision), Some(oldest + 1));
            assert_eq!(ev.last().map(Event::revision), Some(100));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // Another handle on the same file sees the shared compaction mark.
    let s2 = LocalStore::open(&dir.path().join("s.db")).unwrap();
    assert!(matches!(
        s2.events_since("/", 1),
        Err(StoreError::Compacted { .. })
    ));
}

#[test]
fn json_helpers() {
    let (_d, s) = temp();
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct T {
        n: u32,
    }
    let r = put_json(&s, "/j/a", &T { n: 1 }).unwrap();
    put_json(&s, "/j/b", &T { n: 2 }).unwrap();
    assert_eq!(get_json::<T>(&s, "/j/a").unwrap(), Some((T { n: 1 }, r)));
    assert_eq!(get_json::<T>(&s, "/j/none").unwrap(), None);
    let (items, rev) = list_json::<T>(&s, "/j/").unwrap();
    assert_eq!(rev, 2);
    assert_eq!(
        items,
        vec![
            ("/j/a".into(), T { n: 1 }, 1),
            ("/j/b".into(), T { n: 2 }, 2)
        ]
    );
    s.put("/j/c", "not json").unwrap();
    assert!(
        matches!(get_json::<T>(&s, "/j/c"), Err(StoreError::Decode { key, .. }) if key == "/j/c")
    );
    assert!(matches!(
        list_json::<T>(&s, "/j/"),
        Err(StoreError::Decode { .. })
    ));
}

#[test]
fn reopen_keeps_data_and_is_fast() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let s = LocalStore::open(&path).unwrap();
        s.put("/k", "v").unwrap();
    }
    let start = Instant::now();
    let n = 50;
    for _ in 0..n {
        let s = LocalStore::open(&path).unwrap();
        assert_eq!(s.revision().unwrap(), 1);
    }
    let per_open = start.elapsed() / n;
    eprintln!("open + revision: {per_open:?}");
    assert!(
        per_open < Duration::from_millis(20),
        "open too slow: {per_open:?}"
    );
    let s = LocalStore::open(&path).unwrap();
    assert_eq!(s.get("/k").unwrap().unwrap().value, "v");
}

#[test]
fn wait_for_change_wakes_on_another_handles_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let a = LocalStore::open(&path).unwrap();
    let b = LocalStore::open(&path).unwrap();
    let start = Instant::now();
    assert_eq!(a.wait_for_change(0, Duration::from_millis(50)).unwrap(), 0);
    assert!(start.elapsed() >= Duration::from_millis(50));
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(60));
            b.put("/k", "v").unwrap();
        });
        let start = Instant::now();
        assert_eq!(a.wait_for_change(0, Duration::from_secs(10)).unwrap(), 1);
        assert!(start.elapsed() < Duration::from_secs(5));
    });
}

#[test]
fn concurrent_cas_increments_from_separate_handles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    LocalStore::open(&path)
        .unwrap()
        .create("/counter", "0")
        .unwrap();
    let threads = 12;
    let per_thread = 40;
    std::thread::scope(|sc| {
        for _ in 0..threads {
            let path = path.clone();
            sc.spawn(move || {
                let s = LocalStore::open(&path).unwrap();
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
    let s = LocalStore::open(&path).unwrap();
    let kv = s.get("/counter").unwrap().unwrap();
    assert_eq!(kv.value, (threads * per_thread).to_string());
    assert_eq!(s.revision().unwrap(), 1 + (threads * per_thread) as i64);
    assert_eq!(
        s.events_since("/counter", 0).unwrap().len(),
        1 + threads * per_thread
    );
}

#[test]
fn concurrent_first_open_of_a_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fresh.db");
    std::thread::scope(|sc| {
        for i in 0..8 {
            let path = path.clone();
            sc.spawn(move || {
                let s = LocalStore::open(&path).unwrap();
                s.put(&format!("/k/{i}"), "v").unwrap();
            });
        }
    });
    let s = LocalStore::open(&path).unwrap();
    assert_eq!(s.list("/k/").unwrap().0.len(), 8);
    assert_eq!(s.revision().unwrap(), 8);
}
