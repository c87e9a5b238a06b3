//! The conformance suite against [`LocalStore`]: every case on a fresh SQLite file, each
//! handle a separate connection (as separate processes would have).

mod conformance;

use std::path::PathBuf;

use malla_store::{LocalStore, Store};

/// Runs `case` with an opener onto a new file (event retention `retention`).
fn on_fresh_file(retention: i64, case: impl FnOnce(conformance::Open<'_>)) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("store.db");
    let open = move || -> Box<dyn Store> {
        Box::new(
            LocalStore::open(&path)
                .unwrap()
                .with_event_retention(retention),
        )
    };
    case(&open);
}

const KEEP_ALL: i64 = malla_store::DEFAULT_EVENT_RETENTION;

#[test]
fn crud_and_revisions() {
    on_fresh_file(KEEP_ALL, conformance::crud_and_revisions);
}

#[test]
fn update_is_compare_and_swap() {
    on_fresh_file(KEEP_ALL, conformance::update_is_compare_and_swap);
}

#[test]
fn delete_semantics() {
    on_fresh_file(KEEP_ALL, conformance::delete_semantics);
}

#[test]
fn list_by_prefix_sorted_with_revision() {
    on_fresh_file(KEEP_ALL, conformance::list_by_prefix_sorted_with_revision);
}

#[test]
fn list_is_one_consistent_read_under_writes() {
    on_fresh_file(KEEP_ALL, |o| {
        conformance::list_is_one_consistent_read_under_writes(o, 300)
    });
}

#[test]
fn events_in_order_filtered_by_prefix() {
    on_fresh_file(KEEP_ALL, conformance::events_in_order_filtered_by_prefix);
}

#[test]
fn events_are_compacted() {
    // LocalStore compacts by itself, keeping the newest `retention` events.
    on_fresh_file(10, |o| conformance::events_are_compacted(o, &|_| {}));
}

#[test]
fn json_helpers() {
    on_fresh_file(KEEP_ALL, conformance::json_helpers);
}

#[test]
fn watch_keeps_a_mirror_equal_to_a_list() {
    on_fresh_file(KEEP_ALL, conformance::watch_keeps_a_mirror_equal_to_a_list);
}

#[test]
fn wait_for_change_wakes_on_another_handles_write() {
    on_fresh_file(
        KEEP_ALL,
        conformance::wait_for_change_wakes_on_another_handles_write,
    );
}

#[test]
fn concurrent_cas_increments_from_separate_handles() {
    on_fresh_file(KEEP_ALL, |o| {
        conformance::concurrent_cas_increments_from_separate_handles(o, 12, 40)
    });
}

#[test]
fn run_all_covers_every_case() {
    // The same list the etcd test runs, so a case added to `run_all` runs here too.
    let dirs = std::sync::Mutex::new(Vec::new());
    conformance::run_all(
        &|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("store.db");
            dirs.lock().unwrap().push(dir);
            Box::new(move || -> Box<dyn Store> { Box::new(LocalStore::open(&path).unwrap()) })
        },
        false,
    );
}

#[test]
fn syncer_follows_the_store() {
    on_fresh_file(KEEP_ALL, conformance::syncer_follows_the_store);
}

#[test]
fn syncer_relists_after_compaction() {
    // Five events of history: the syncer's watch falls behind as soon as it stops reading.
    on_fresh_file(5, |o| {
        conformance::syncer_relists_after_compaction(o, &|_| {})
    });
}
