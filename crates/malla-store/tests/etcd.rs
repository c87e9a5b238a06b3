//! [`EtcdStore`] against a real etcd: Debian's `/usr/bin/etcd` (package `etcd-server`,
//! installed by `scripts/deps`) started on 127.0.0.1 with free ports and a temporary data dir,
//! killed when the test ends, also on panic (the test kit's `etcd::Etcd`). Each test starts its
//! own etcd.

mod conformance;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use malla_store::{EtcdStore, Event, Store, StoreError};
use malla_test_kit::etcd::{Etcd, REQUEST_TIMEOUT};
use malla_test_kit::free_port;

#[test]
fn conformance_suite() {
    let etcd = Etcd::start();
    let n = AtomicUsize::new(0);
    let start = Instant::now();
    // Every case gets its own prefix on the one etcd, as clusters sharing an etcd would.
    conformance::run_all(
        &|| {
            let prefix = format!("/malla-case{}", n.fetch_add(1, Ordering::SeqCst));
            let endpoint = etcd.endpoint();
            Box::new(move || -> Box<dyn Store> {
                Box::new(
                    EtcdStore::connect(std::slice::from_ref(&endpoint), &prefix, REQUEST_TIMEOUT)
                        .unwrap(),
                )
            })
        },
        false,
    );
    // Last: compaction is etcd-wide.
    let endpoint = etcd.endpoint();
    let compactor = etcd.store("/malla-compactor");
    conformance::events_are_compacted(
        &|| -> Box<dyn Store> {
            Box::new(
                EtcdStore::connect(
                    std::slice::from_ref(&endpoint),
                    "/malla-compact",
                    REQUEST_TIMEOUT,
                )
                .unwrap(),
            )
        },
        &|rev| compactor.compact(rev).unwrap(),
    );
    eprintln!("etcd conformance suite: {:?}", start.elapsed());
}

#[test]
fn prefixes_isolate_clusters() {
    let etcd = Etcd::start();
    let a = etcd.store("/malla-a");
    let ab = etcd.store("/malla-ab/"); // a trailing slash is ignored
    assert_eq!(ab.prefix(), "/malla-ab");
    let base = a.revision().unwrap();
    a.put("/k", "a").unwrap();
    ab.put("/k", "ab").unwrap();
    ab.put("/x", "ab").unwrap();
    assert_eq!(a.get("/k").unwrap().unwrap().value, "a");
    assert_eq!(ab.get("/k").unwrap().unwrap().value, "ab");
    let (all, rev) = a.list("").unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(rev, base + 3, "the revision is etcd's, shared");
    assert_eq!(a.events_since("", base).unwrap().len(), 1);
    assert_eq!(ab.events_since("", base).unwrap().len(), 2);
    // Keys must start with '/'; nothing else can exist under the prefix.
    assert!(matches!(
        a.put("k", "v"),
        Err(StoreError::InvalidKey { .. })
    ));
    assert!(matches!(
        a.create("k", "v"),
        Err(StoreError::InvalidKey { .. })
    ));
    assert!(matches!(
        a.update("k", "v", 1),
        Err(StoreError::Conflict { actual: None, .. })
    ));
    assert_eq!(a.delete("k", None).unwrap(), None);
    assert_eq!(a.get("k").unwrap(), None);
    assert!(a.list("k").unwrap().0.is_empty());
    // The raw etcd keys are prefix + key.
    let raw = etcd.store("");
    let keys: Vec<_> = raw
        .list("/malla-a")
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, ["/malla-a/k", "/malla-ab/k", "/malla-ab/x"]);
    // wait_for_change ignores other prefixes' writes.
    let now = a.revision().unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(50));
            ab.put("/y", "ab").unwrap();
        });
        let t = Instant::now();
        assert_eq!(
            a.wait_for_change(now, Duration::from_millis(400)).unwrap(),
            now + 1
        );
        assert!(t.elapsed() >= Duration::from_millis(400));
    });
}

#[test]
fn unreachable_etcd_is_a_backend_error() {
    let port = free_port();
    let t = Instant::now();
    let r = EtcdStore::connect(
        &[format!("http://127.0.0.1:{port}")],
        "/malla-x",
        Duration::from_millis(500),
    );
    assert!(matches!(r, Err(StoreError::Backend(_))), "{:?}", r.err());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(matches!(
        EtcdStore::connect(&[], "/malla-x", Duration::from_millis(500)),
        Err(StoreError::Backend(_))
    ));
}

#[test]
fn works_from_inside_a_tokio_runtime() {
    let etcd = Etcd::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = etcd.endpoint();
    rt.block_on(async move {
        // Connect, use and drop the store on a runtime thread, as the agent would.
        let s = EtcdStore::connect(&[endpoint], "/malla-rt", REQUEST_TIMEOUT).unwrap();
        let r = s.put("/k", "v").unwrap();
        assert_eq!(s.get("/k").unwrap().unwrap().mod_revision, r);
        assert_eq!(s.wait_for_change(r - 1, Duration::from_secs(5)).unwrap(), r);
        assert_eq!(s.events_since("/", r - 1).unwrap().len(), 1);
        drop(s);
    });
}

#[test]
fn wait_and_events_resume_after_etcd_restart() {
    let mut etcd = Etcd::start();
    let waiter = etcd.store("/malla-r");
    let writer = etcd.store("/malla-r");
    let r1 = writer.put("/r/a", "1").unwrap();
    // A push watch opened now resumes across the restart too.
    let mut watch = waiter.watch("/r/", r1).unwrap();
    let t = Instant::now();
    let woke = std::thread::scope(|sc| {
        let wait = sc.spawn(|| waiter.wait_for_change(r1, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(300)); // the watch is established
        etcd.kill();
        std::thread::sleep(Duration::from_millis(500)); // the waiter sees etcd gone
        etcd.restart();
        // The writer's connection comes back by itself (retry while etcd elects itself).
        let deadline = Instant::now() + Duration::from_secs(20);
        let r2 = loop {
            match writer.put("/r/b", "2") {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("writer after restart: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("writer never reconnected: {e}"),
            }
        };
        let woke = wait.join().unwrap().unwrap();
        assert!(woke >= r2 && r2 > r1, "woke {woke}, r1 {r1}, r2 {r2}");
        woke
    });
    eprintln!("wait across restart woke at {woke} after {:?}", t.elapsed());
    // The watch reported the outage as transient errors, then delivered the write once.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.is_empty() && Instant::now() < deadline {
        match watch.next(Duration::from_millis(500)) {
            Ok(ev) => seen.extend(ev),
            Err(StoreError::Compacted { .. }) => panic!("history survived; no re-list needed"),
            Err(e) => eprintln!("watch across restart: {e}"),
        }
    }
    assert_eq!(seen.iter().map(Event::key).collect::<Vec<_>>(), ["/r/b"]);
    drop(watch);
    // History survived the restart, and the old handle reads it.
    let ev = waiter.events_since("/r/", r1 - 1).unwrap();
    assert_eq!(
        ev.iter().map(Event::key).collect::<Vec<_>>(),
        ["/r/a", "/r/b"]
    );
    assert_eq!(waiter.get("/r/a").unwrap().unwrap().mod_revision, r1);
    // A wait started while etcd is down and still down at the deadline is an error, not a hang.
    etcd.kill();
    let t = Instant::now();
    assert!(waiter
        .wait_for_change(woke, Duration::from_millis(500))
        .is_err());
    assert!(t.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(5));
}

#[test]
fn ipam_over_etcd_three_nodes_claim_blocks_concurrently() {
    use malla_ipam::{AutoAssign, Ipam};
    const NODES: usize = 3;
    const PER_NODE: usize = 40;
    let etcd = Etcd::start();
    {
        let s = etcd.store("/malla-ipam");
        // /28 blocks (16 addresses) in a /24: every node claims several blocks while the
        // others do too.
        Ipam::new(&s)
            .ensure_pool(&malla_api::IpPool {
                name: "default-ipv4".into(),
                cidr: "198.18.0.0/24".parse().unwrap(),
                block_size: 28,
                nat_outgoing: false,
                disabled: false,
            })
            .unwrap();
    }
    let start = Instant::now();
    let results: Vec<Vec<(String, IpAddr)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..NODES)
            .map(|n| {
                let etcd = &etcd;
                sc.spawn(move || {
                    // One store handle (connection) per node, as one agent per node has.
                    let s = etcd.store("/malla-ipam");
                    let ipam = Ipam::new(&s);
                    let node = format!("node-{n}");
                    (0..PER_NODE)
                        .map(|i| {
                            let h = format!("malla.n{n}-{i}.eth0");
                            let a = ipam
                                .auto_assign(&AutoAssign {
                                    handle: h.clone(),
                                    node: node.clone(),
                                    ipv4: true,
                                    ipv6: false,
                                    attrs: BTreeMap::new(),
                                    ..Default::default()
                                })
                                .unwrap();
                            (h, a[0].addr)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let alloc = start.elapsed();
    let mut seen: HashMap<IpAddr, String> = HashMap::new();
    for (h, a) in results.iter().flatten() {
        if let Some(other) = seen.insert(*a, h.clone()) {
            panic!("{a} handed to {other} and {h}");
        }
    }
    assert_eq!(seen.len(), NODES * PER_NODE);
    let s = etcd.store("/malla-ipam");
    let ipam = Ipam::new(&s);
    let blocks = ipam.blocks().unwrap();
    let mut live = HashMap::new();
    for b in &blocks {
        for (addr, h) in b.allocated() {
            assert!(b.cidr.contains(&addr));
            assert!(live.insert(addr, h).is_none(), "duplicate {addr} in blocks");
        }
    }
    assert_eq!(live.len(), seen.len());
    for (addr, h) in &live {
        assert_eq!(&seen[addr], h);
    }
    // Each node needed 3 blocks of 16 for 40 addresses; no block is claimed twice.
    let claimed: Vec<_> = blocks.iter().filter(|b| b.affinity.is_some()).collect();
    assert!(
        claimed.len() >= NODES * 3,
        "{} blocks claimed",
        claimed.len()
    );
    let t = Instant::now();
    for (h, a) in results.iter().flatten() {
        assert_eq!(ipam.release_by_handle(h).unwrap(), vec![*a]);
    }
    assert!(ipam.blocks().unwrap().iter().all(|b| b.used() == 0));
    eprintln!(
        "ipam over etcd: {} allocations by {NODES} nodes in {alloc:?}, {} blocks, release {:?}",
        seen.len(),
        claimed.len(),
        t.elapsed()
    );
}

/// etcd's own users: with `username` and `passwordFile` the store works; without a user, or
/// with a wrong password, it is refused.
#[test]
fn etcd_users_authenticate() {
    let etcd = Etcd::start();
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl (Debian package etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctl(&["user", "add", "root:rootpw"]);
    ctl(&["user", "add", "malla:s3cret"]);
    ctl(&["role", "add", "malla"]);
    ctl(&[
        "role",
        "grant-permission",
        "malla",
        "--prefix=true",
        "readwrite",
        "/auth",
    ]);
    ctl(&["user", "grant-role", "malla", "malla"]);
    ctl(&["auth", "enable"]);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("pw");
    std::fs::write(&good, "s3cret\n").unwrap();
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "wrong\n").unwrap();
    let spec = |user: Option<&str>, pw: Option<&std::path::Path>| {
        let mut s = format!(
            "etcd://{}/auth",
            etcd.endpoint().trim_start_matches("http://")
        );
        let mut params = Vec::new();
        if let Some(u) = user {
            params.push(format!("user={u}"));
        }
        if let Some(p) = pw {
            params.push(format!("password-file={}", p.display()));
        }
        if !params.is_empty() {
            s.push('?');
            s.push_str(&params.join("&"));
        }
        malla_store::DatastoreSpec::parse(&s).unwrap()
    };
    let store = spec(Some("malla"), Some(&good))
        .open_with_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    store.create("/k", "v").unwrap();
    assert_eq!(store.get("/k").unwrap().unwrap().value, "v");
    for (what, s) in [
        ("no user", spec(None, None)),
        ("wrong password", spec(Some("malla"), Some(&bad))),
    ] {
        let refused = s
            .open_with_timeout(Some(Duration::from_secs(5)))
            .and_then(|st| st.get("/k"));
        assert!(refused.is_err(), "{what}: {:?}", refused.map(|_| ()));
    }
}
