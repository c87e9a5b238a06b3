//! SQLite-specific tests: key ranges, retention-driven compaction, reopening, concurrent
//! first open. The backend-independent behaviour is in `tests/conformance` (run by
//! `tests/local.rs`).

use super::*;

#[test]
fn prefix_end_is_the_successor() {
    assert_eq!(prefix_end("/a/"), Some("/a0".to_string()));
    assert_eq!(prefix_end(""), None);
    assert_eq!(prefix_end("a\u{10FFFF}"), Some("b".to_string()));
    assert_eq!(prefix_end("a\u{D7FF}"), Some("a\u{E000}".to_string()));
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
