//! Tests of the allocator: one per rule, property tests of random assign/release sequences,
//! and many processes (separate store handles) allocating from one file at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use malla_store::{Event, KeyValue, LocalStore};
use proptest::prelude::*;

use super::*;

fn store() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(&dir.path().join("ipam.db")).unwrap();
    (dir, s)
}

fn pool(name: &str, cidr: &str, block_size: u8) -> IpPool {
    IpPool {
        name: name.into(),
        cidr: cidr.parse().unwrap(),
        block_size,
        nat_outgoing: false,
        disabled: false,
    }
}

fn req(handle: &str, node: &str, v4: bool, v6: bool) -> AutoAssign {
    AutoAssign {
        handle: handle.into(),
        node: node.into(),
        ipv4: v4,
        ipv6: v6,
        attrs: [("pod".to_string(), handle.to_string())].into(),
        affine_hint: vec![],
    }
}

fn v4(ipam: &Ipam<'_>, handle: &str, node: &str) -> Result<Assigned, IpamError> {
    ipam.auto_assign(&req(handle, node, true, false))
        .map(|mut v| v.remove(0))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Every address live in the blocks is unique, inside its block, and matches the handles.
fn check_invariants(ipam: &Ipam<'_>) -> BTreeMap<IpAddr, String> {
    let mut live = BTreeMap::new();
    for b in ipam.blocks().unwrap() {
        assert_eq!(b.used() as usize, b.allocated().len());
        for (addr, h) in b.allocated() {
            assert!(b.cidr.contains(&addr), "{addr} outside {}", b.cidr);
            assert!(live.insert(addr, h).is_none(), "duplicate {addr}");
        }
        assert!(b.allocations.keys().all(|o| u64::from(*o) < b.capacity()));
    }
    let mut from_handles = BTreeMap::new();
    for h in ipam.handles().unwrap() {
        for a in &h.addrs {
            assert!(from_handles.insert(*a, h.id.clone()).is_none());
        }
    }
    assert_eq!(live, from_handles);
    live
}

#[test]
fn ensure_pool_validates_and_rejects_overlap() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    let p = pool("default-ipv4", "198.18.0.0/16", 26);
    ipam.ensure_pool(&p).unwrap();
    let rev = s.revision().unwrap();
    ipam.ensure_pool(&p).unwrap();
    assert_eq!(
        s.revision().unwrap(),
        rev,
        "identical pool is not rewritten"
    );
    assert!(matches!(
        ipam.ensure_pool(&pool("other", "198.18.4.0/24", 26)),
        Err(IpamError::InvalidPool(m)) if m.contains("overlaps")
    ));
    assert!(matches!(
        ipam.ensure_pool(&pool("big", "198.0.0.0/8", 26)),
        Err(IpamError::InvalidPool(_))
    ));
    assert!(matches!(
        ipam.ensure_pool(&pool("bad", "10.0.0.1/24", 26)),
        Err(IpamError::InvalidPool(_))
    ));
    // Replacing a pool by name (no overlap with itself).
    let mut p2 = p.clone();
    p2.nat_outgoing = true;
    ipam.ensure_pool(&p2).unwrap();
    ipam.ensure_pool(&pool("default-ipv6", "fd00:198:18::/64", 122))
        .unwrap();
    let names: Vec<_> = ipam.pools().unwrap().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["default-ipv4", "default-ipv6"]);
    assert!(ipam.pools().unwrap()[0].nat_outgoing);
}

#[test]
fn claims_a_block_on_first_use_and_sticks_to_it() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "198.18.0.0/16", 26)).unwrap();
    assert!(ipam.blocks().unwrap().is_empty(), "blocks are lazy");
    let a = v4(&ipam, "h1", "node-a").unwrap();
    assert_eq!(a.addr, ip("198.18.0.0"));
    assert_eq!(a.block, "198.18.0.0/26".parse::<IpNet>().unwrap());
    assert_eq!(a.pool, "p");
    let b = v4(&ipam, "h2", "node-b").unwrap();
    assert_eq!(
        b.block,
        "198.18.0.64/26".parse::<IpNet>().unwrap(),
        "node-b claims its own"
    );
    let a2 = v4(&ipam, "h3", "node-a").unwrap();
    assert_eq!(a2.addr, ip("198.18.0.1"), "affine block first");
    let blocks = ipam.blocks().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].affinity.as_deref(), Some("node-a"));
    assert_eq!(blocks[1].affinity.as_deref(), Some("node-b"));
    assert_eq!(blocks[0].used(), 2);
    // The stored block is at keys::block and carries the attributes, node included.
    let (raw, _) = malla_store::get_json::<Block>(&s, "/malla/ipam/blocks/198.18.0.0-26")
        .unwrap()
        .unwrap();
    let alloc = &raw.allocations[&0];
    assert_eq!(alloc.handle, "h1");
    assert_eq!(alloc.attrs["node"], "node-a");
    assert_eq!(alloc.attrs["pod"], "h1");
    check_invariants(&ipam);
}

#[test]
fn a_full_26_hands_out_all_64_addresses() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.9.0.0/24", 26)).unwrap();
    let mut got = BTreeSet::new();
    for i in 0..64 {
        let a = v4(&ipam, &format!("h{i}"), "n").unwrap();
        assert_eq!(a.block, "10.9.0.0/26".parse::<IpNet>().unwrap());
        got.insert(a.addr);
    }
    assert_eq!(got.len(), 64);
    assert!(got.contains(&ip("10.9.0.0")) && got.contains(&ip("10.9.0.63")));
    // The 65th spills into a new block.
    let a = v4(&ipam, "h64", "n").unwrap();
    assert_eq!(a.addr, ip("10.9.0.64"));
    check_invariants(&ipam);
}

#[test]
fn borrows_when_every_block_is_claimed_then_exhausts() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    // Two /29 blocks in a /28.
    ipam.ensure_pool(&pool("p", "10.0.0.0/28", 29)).unwrap();
    v4(&ipam, "a0", "a").unwrap();
    v4(&ipam, "b0", "b").unwrap();
    for i in 1..8 {
        let x = v4(&ipam, &format!("a{i}"), "a").unwrap();
        assert_eq!(x.block, "10.0.0.0/29".parse::<IpNet>().unwrap());
    }
    // a's block is full and no block is unclaimed: borrow from b's block.
    let borrowed = v4(&ipam, "a8", "a").unwrap();
    assert_eq!(borrowed.block, "10.0.0.8/29".parse::<IpNet>().unwrap());
    // A third node with no block at all borrows too.
    let c = v4(&ipam, "c0", "c").unwrap();
    assert_eq!(c.block, "10.0.0.8/29".parse::<IpNet>().unwrap());
    let blocks = ipam.blocks().unwrap();
    assert_eq!(
        blocks[1].affinity.as_deref(),
        Some("b"),
        "borrowing keeps affinity"
    );
    for i in 0..5 {
        v4(&ipam, &format!("x{i}"), "c").unwrap();
    }
    assert!(matches!(
        v4(&ipam, "late", "a"),
        Err(IpamError::Exhausted { family: "ipv4" })
    ));
    // The failed attempt leaves no handle record behind.
    assert!(ipam.handles().unwrap().iter().all(|h| h.id != "late"));
    assert_eq!(check_invariants(&ipam).len(), 16);
    // Freeing one address makes it available again, to anyone.
    let freed = ipam.release_by_handle("a3").unwrap();
    assert_eq!(freed, vec![ip("10.0.0.3")]);
    assert_eq!(v4(&ipam, "late", "c").unwrap().addr, ip("10.0.0.3"));
}

#[test]
fn disabled_pool_hands_out_nothing_new() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    let mut p = pool("p", "10.0.0.0/24", 26);
    ipam.ensure_pool(&p).unwrap();
    let held = v4(&ipam, "h0", "n").unwrap();
    p.disabled = true;
    ipam.ensure_pool(&p).unwrap();
    assert!(matches!(
        v4(&ipam, "h1", "n"),
        Err(IpamError::Exhausted { family: "ipv4" })
    ));
    assert!(matches!(
        ipam.assign_ip(ip("10.0.0.200"), "h2", "n", &BTreeMap::new()),
        Err(IpamError::PoolDisabled(name)) if name == "p"
    ));
    // Other enabled pools still serve; existing allocations are untouched.
    ipam.ensure_pool(&pool("q", "10.1.0.0/24", 26)).unwrap();
    assert_eq!(v4(&ipam, "h1", "n").unwrap().pool, "q");
    assert_eq!(ipam.release_by_handle("h0").unwrap(), vec![held.addr]);
}

#[test]
fn exhausted_without_pools_of_the_family() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    assert!(matches!(
        v4(&ipam, "h", "n"),
        Err(IpamError::Exhausted { family: "ipv4" })
    ));
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    assert!(matches!(
        ipam.auto_assign(&req("h", "n", false, true)),
        Err(IpamError::Exhausted { family: "ipv6" })
    ));
    assert!(ipam
        .auto_assign(&req("h", "n", false, false))
        .unwrap()
        .is_empty());
}

#[test]
fn release_is_idempotent_and_addresses_are_reused() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    let a = v4(&ipam, "h", "n").unwrap();
    assert_eq!(ipam.release_by_handle("h").unwrap(), vec![a.addr]);
    assert!(ipam.release_by_handle("h").unwrap().is_empty());
    assert!(ipam.release_by_handle("never").unwrap().is_empty());
    assert!(ipam.handles().unwrap().is_empty());
    assert_eq!(v4(&ipam, "h2", "n").unwrap().addr, a.addr);
}

#[test]
fn dual_stack_is_all_or_nothing() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("v4", "10.0.0.0/24", 26)).unwrap();
    // No v6 pool: the v4 address must be rolled back.
    let err = ipam.auto_assign(&req("h", "n", true, true)).unwrap_err();
    assert!(matches!(err, IpamError::Exhausted { family: "ipv6" }));
    assert!(check_invariants(&ipam).is_empty());
    assert!(ipam.handles().unwrap().is_empty(), "no handle record left");
    ipam.ensure_pool(&pool("v6", "fd00:198:18::/64", 122))
        .unwrap();
    let got = ipam.auto_assign(&req("h", "n", true, true)).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(
        got[0].addr,
        ip("10.0.0.0"),
        "the rolled-back address is free again"
    );
    assert_eq!(got[1].addr, ip("fd00:198:18::"));
    assert_eq!(got[1].block, "fd00:198:18::/122".parse::<IpNet>().unwrap());
    let hs = ipam.handles().unwrap();
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].addrs, vec![got[0].addr, got[1].addr]);
    assert_eq!(hs[0].attrs["pod"], "h");
    assert_eq!(ipam.release_by_handle("h").unwrap().len(), 2);
}

#[test]
fn huge_ipv6_pool_does_not_enumerate_blocks() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("v6", "fd00::/48", 122)).unwrap();
    let start = std::time::Instant::now();
    for i in 0..3 {
        let got = ipam
            .auto_assign(&req(&format!("h{i}"), &format!("n{i}"), false, true))
            .unwrap();
        assert_eq!(got[0].block.prefix_len(), 122);
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
    let cidrs: Vec<String> = ipam
        .blocks()
        .unwrap()
        .iter()
        .map(|b| b.cidr.to_string())
        .collect();
    assert_eq!(cidrs, ["fd00::/122", "fd00::40/122", "fd00::80/122"]);
}

#[test]
fn assign_ip_rules() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    let none = BTreeMap::new();
    let a = ipam.assign_ip(ip("10.0.0.77"), "h1", "n1", &none).unwrap();
    assert_eq!(a.block, "10.0.0.64/26".parse::<IpNet>().unwrap());
    assert_eq!(a.pool, "p");
    assert_eq!(
        ipam.blocks().unwrap()[0].affinity.as_deref(),
        Some("n1"),
        "claims the block"
    );
    assert!(matches!(
        ipam.assign_ip(ip("10.0.0.77"), "h2", "n1", &none),
        Err(IpamError::AddressInUse(x)) if x == ip("10.0.0.77")
    ));
    assert!(
        ipam.handles().unwrap().iter().all(|h| h.id != "h2"),
        "failed assign leaves no record"
    );
    // Same handle again: idempotent.
    assert_eq!(
        ipam.assign_ip(ip("10.0.0.77"), "h1", "n1", &none).unwrap(),
        a
    );
    assert!(matches!(
        ipam.assign_ip(ip("192.168.1.1"), "h3", "n1", &none),
        Err(IpamError::NotInPool(_))
    ));
    // Auto-assign on another node skips the taken address when borrowing is not needed.
    let b = ipam.assign_ip(ip("10.0.0.78"), "h4", "n2", &none).unwrap();
    assert_eq!(b.block, a.block);
    // n1 auto-assigns from its block (claimed by assign_ip) and never gets .77/.78.
    let got: Vec<IpAddr> = (0..62)
        .map(|i| v4(&ipam, &format!("x{i}"), "n1").unwrap().addr)
        .collect();
    assert!(!got.contains(&ip("10.0.0.77")) && !got.contains(&ip("10.0.0.78")));
    assert!(got.iter().all(|x| a.block.contains(x)));
    check_invariants(&ipam);
    assert_eq!(ipam.release_by_handle("h1").unwrap(), vec![ip("10.0.0.77")]);
}

#[test]
fn release_unless_collects_leaks() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    let keep = v4(&ipam, "keep", "n").unwrap();
    let leak = v4(&ipam, "leak", "n").unwrap();
    // A crash leftover: a handle record whose allocation never happened.
    s.put(
        &keys::handle("orphan-record"),
        r#"{"blocks":["10.0.0.0/26"]}"#,
    )
    .unwrap();
    // An address borrowed by another node (so with a handle record), whose record was lost.
    let lost = ipam
        .assign_ip(ip("10.0.0.9"), "lost-record", "m", &BTreeMap::new())
        .unwrap();
    assert!(s.get(&keys::handle("lost-record")).unwrap().is_some());
    s.delete(&keys::handle("lost-record"), None).unwrap();
    // "leak": an affine allocation with no record at all (its endpoint never got written).
    assert!(s.get(&keys::handle("leak")).unwrap().is_none());
    let hs = ipam.handles().unwrap();
    let ids: Vec<&str> = hs.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["keep", "leak", "lost-record", "orphan-record"]);
    assert!(hs[3].addrs.is_empty());
    let mut freed = ipam.release_unless(&|h: &Handle| h.id == "keep").unwrap();
    freed.sort();
    assert_eq!(freed, vec![leak.addr, lost.addr]);
    let hs = ipam.handles().unwrap();
    assert_eq!(hs.len(), 1);
    assert_eq!(hs[0].addrs, vec![keep.addr]);
    check_invariants(&ipam);
}

#[test]
fn corrupt_block_is_a_typed_error() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    s.put("/malla/ipam/blocks/10.0.0.0-26", "{").unwrap();
    assert!(matches!(
        v4(&ipam, "h", "n"),
        Err(IpamError::Store(StoreError::Decode { .. }))
    ));
}

#[derive(Debug, Clone)]
enum Op {
    Auto { node: usize },
    Specific { node: usize, offset: u8 },
    Release { pick: usize },
    Gc { keep_mod: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..3usize).prop_map(|node| Op::Auto { node }),
        1 => (0..3usize, 0..32u8).prop_map(|(node, offset)| Op::Specific { node, offset }),
        3 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => (2..5usize).prop_map(|keep_mod| Op::Gc { keep_mod }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random assign/release sequences across 3 nodes on a /27 with /29 blocks.
    #[test]
    fn allocator_never_duplicates(ops in proptest::collection::vec(op(), 1..80)) {
        let (_d, s) = store();
        let ipam = Ipam::new(&s);
        ipam.ensure_pool(&pool("p", "10.0.0.0/27", 29)).unwrap();
        let cidr: IpNet = "10.0.0.0/27".parse().unwrap();
        // Our model: handle -> address.
        let mut model: BTreeMap<String, IpAddr> = BTreeMap::new();
        let mut released: BTreeSet<IpAddr> = BTreeSet::new();
        let mut next = 0;
        for op in ops {
            match op {
                Op::Auto { node } => {
                    let h = format!("h{next}");
                    next += 1;
                    match v4(&ipam, &h, &format!("n{node}")) {
                        Ok(a) => {
                            prop_assert!(a.block.contains(&a.addr));
                            prop_assert!(!model.values().any(|x| *x == a.addr), "duplicate {}", a.addr);
                            released.remove(&a.addr);
                            model.insert(h, a.addr);
                        }
                        Err(IpamError::Exhausted { .. }) => {
                            prop_assert_eq!(model.len(), 32, "exhausted with free addresses");
                            prop_assert!(released.is_empty());
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Specific { node, offset } => {
                    let want = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, offset));
                    let h = format!("h{next}");
                    next += 1;
                    match ipam.assign_ip(want, &h, &format!("n{node}"), &BTreeMap::new()) {
                        Ok(a) => {
                            prop_assert_eq!(a.addr, want);
                            prop_assert!(!model.values().any(|x| *x == want));
                            released.remove(&want);
                            model.insert(h, want);
                        }
                        Err(IpamError::AddressInUse(x)) => {
                            prop_assert_eq!(x, want);
                            prop_assert!(model.values().any(|x| *x == want));
                        }
                        Err(e) => return Err(TestCaseError::fail(e.to_string())),
                    }
                }
                Op::Release { pick } => {
                    if model.is_empty() {
                        continue;
                    }
                    let h = model.keys().nth(pick % model.len()).unwrap().clone();
                    let addr = model.remove(&h).unwrap();
                    prop_assert_eq!(ipam.release_by_handle(&h).unwrap(), vec![addr]);
                    prop_assert!(ipam.release_by_handle(&h).unwrap().is_empty());
                    released.insert(addr);
                }
                Op::Gc { keep_mod } => {
                    let keep = |id: &str| id[1..].parse::<usize>().unwrap() % keep_mod != 0;
                    let mut expect: Vec<IpAddr> = model.iter().filter(|(h, _)| !keep(h)).map(|(_, a)| *a).collect();
                    expect.sort();
                    let freed = ipam.release_unless(&|h: &Handle| keep(&h.id)).unwrap();
                    prop_assert_eq!(&freed, &expect);
                    model.retain(|h, _| keep(h));
                    released.extend(freed);
                }
            }
            // Store state matches the model.
            let live = check_invariants(&ipam);
            let expect: BTreeMap<IpAddr, String> = model.iter().map(|(h, a)| (*a, h.clone())).collect();
            prop_assert_eq!(&live, &expect);
            prop_assert!(live.keys().all(|a| cidr.contains(a)));
            let used: u64 = ipam.blocks().unwrap().iter().map(Block::used).sum();
            prop_assert_eq!(used as usize, model.len());
        }
        // Every address is reusable: after releasing all, the pool fills up completely.
        for h in model.keys() {
            ipam.release_by_handle(h).unwrap();
        }
        let mut all = BTreeSet::new();
        for i in 0..32 {
            all.insert(v4(&ipam, &format!("f{i}"), &format!("n{}", i % 3)).unwrap().addr);
        }
        prop_assert_eq!(all.len(), 32);
        let over = matches!(v4(&ipam, "over", "n0"), Err(IpamError::Exhausted { .. }));
        prop_assert!(over, "a full pool must be exhausted");
    }
}

#[test]
fn many_processes_allocate_concurrently_without_duplicates() {
    const NODES: usize = 3;
    const THREADS: usize = 8;
    const PER_THREAD: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    {
        let s = LocalStore::open(&path).unwrap();
        let ipam = Ipam::new(&s);
        ipam.ensure_pool(&pool("default-ipv4", "198.18.0.0/16", 26))
            .unwrap();
    }
    let start = std::time::Instant::now();
    let results: Vec<Vec<(String, IpAddr)>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..NODES * THREADS)
            .map(|t| {
                let path = path.clone();
                sc.spawn(move || {
                    let node = format!("node-{}", t % NODES);
                    let mut got = Vec::new();
                    for i in 0..PER_THREAD {
                        // Each "CNI invocation" opens its own handle on the file.
                        let s = LocalStore::open(&path).unwrap();
                        let ipam = Ipam::new(&s);
                        let h = format!("malla.t{t}-{i}.eth0");
                        let a = ipam
                            .auto_assign(&AutoAssign {
                                handle: h.clone(),
                                node: node.clone(),
                                ipv4: true,
                                ipv6: false,
                                attrs: BTreeMap::new(),
                                affine_hint: vec![],
                            })
                            .unwrap();
                        got.push((h, a[0].addr));
                    }
                    got
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let alloc_time = start.elapsed();
    let mut seen: HashMap<IpAddr, String> = HashMap::new();
    for (h, a) in results.iter().flatten() {
        if let Some(other) = seen.insert(*a, h.clone()) {
            panic!("{a} handed to {other} and {h}");
        }
    }
    assert_eq!(seen.len(), NODES * THREADS * PER_THREAD);
    let s = LocalStore::open(&path).unwrap();
    let ipam = Ipam::new(&s);
    let live = check_invariants(&ipam);
    assert_eq!(live.len(), seen.len());
    // Blocks are per node: allocation never needed to borrow.
    for b in ipam.blocks().unwrap() {
        let node = b.affinity.clone().unwrap();
        for (addr, _) in b.allocated() {
            let h = &seen[&addr];
            let t: usize = h["malla.t".len()..h.find('-').unwrap()].parse().unwrap();
            assert_eq!(format!("node-{}", t % NODES), node, "{addr} in {}", b.cidr);
        }
    }
    let start = std::time::Instant::now();
    std::thread::scope(|sc| {
        for mine in &results {
            let path = path.clone();
            sc.spawn(move || {
                let s = LocalStore::open(&path).unwrap();
                let ipam = Ipam::new(&s);
                for (h, a) in mine {
                    // As the CNI DEL does: the address from the endpoint record as the hint.
                    let hints = ReleaseHints {
                        blocks: vec![],
                        addrs: vec![*a],
                    };
                    assert_eq!(ipam.release_by_handle_hinted(h, &hints).unwrap(), vec![*a]);
                }
            });
        }
    });
    eprintln!("allocate {alloc_time:?}, release {:?}", start.elapsed());
    assert!(ipam.blocks().unwrap().iter().all(|b| b.used() == 0));
    assert!(ipam.handles().unwrap().is_empty());
}

/// Forwards to a store, counting successful writes and reads (gets, and lists by prefix).
struct Counting<'a> {
    inner: &'a dyn Store,
    writes: Mutex<Vec<String>>,
    gets: AtomicU64,
    lists: Mutex<Vec<String>>,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a dyn Store) -> Self {
        Self {
            inner,
            writes: Mutex::new(Vec::new()),
            gets: AtomicU64::new(0),
            lists: Mutex::new(Vec::new()),
        }
    }
    fn wrote<T>(&self, key: &str, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_ok() {
            self.writes.lock().unwrap().push(key.to_string());
        }
        r
    }
    /// Writes, gets and list prefixes since the last call.
    fn take(&self) -> (Vec<String>, u64, Vec<String>) {
        (
            std::mem::take(&mut *self.writes.lock().unwrap()),
            self.gets.swap(0, Ordering::Relaxed),
            std::mem::take(&mut *self.lists.lock().unwrap()),
        )
    }
}

impl Store for Counting<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key)
    }
    fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.lists.lock().unwrap().push(prefix.to_string());
        self.inner.list(prefix)
    }
    fn create(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        self.wrote(key, self.inner.create(key, value))
    }
    fn update(&self, key: &str, value: &str, expected: Revision) -> Result<Revision, StoreError> {
        self.wrote(key, self.inner.update(key, value, expected))
    }
    fn put(&self, key: &str, value: &str) -> Result<Revision, StoreError> {
        self.wrote(key, self.inner.put(key, value))
    }
    fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<Option<Revision>, StoreError> {
        let r = self.inner.delete(key, expected);
        if let Ok(Some(_)) = r {
            self.writes.lock().unwrap().push(key.to_string());
        }
        r
    }
    fn events_since(&self, prefix: &str, after: Revision) -> Result<Vec<Event>, StoreError> {
        self.inner.events_since(prefix, after)
    }
    fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.revision()
    }
    fn wait_for_change(&self, after: Revision, timeout: Duration) -> Result<Revision, StoreError> {
        self.inner.wait_for_change(after, timeout)
    }
}

fn hinted(handle: &str, node: &str, hint: &[IpNet]) -> AutoAssign {
    AutoAssign {
        affine_hint: hint.to_vec(),
        ..req(handle, node, true, false)
    }
}

/// The cidrs of the blocks affine to `node`, as the agent's node cache holds them.
fn affine(ipam: &Ipam<'_>, node: &str) -> Vec<IpNet> {
    ipam.blocks()
        .unwrap()
        .into_iter()
        .filter(|b| b.affinity.as_deref() == Some(node))
        .map(|b| b.cidr)
        .collect()
}

fn handle_records(s: &dyn Store) -> Vec<String> {
    s.list(keys::HANDLES)
        .unwrap()
        .0
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[test]
fn one_write_per_assign_and_no_block_listing_with_hints() {
    let (_d, file) = store();
    Ipam::new(&file)
        .ensure_pool(&pool("p", "10.0.0.0/24", 26))
        .unwrap();
    let s = Counting::new(&file);
    let ipam = Ipam::new(&s);
    let block0: IpNet = "10.0.0.0/26".parse().unwrap();
    let block1: IpNet = "10.0.0.64/26".parse().unwrap();

    // No block yet: claiming one is its creation, nothing else.
    let a = ipam.auto_assign(&hinted("h0", "n", &[])).unwrap();
    assert_eq!(a[0].block, block0);
    let (writes, _, lists) = s.take();
    assert_eq!(writes, [keys::block(&block0)], "claim: one write");
    assert!(
        lists.contains(&keys::BLOCKS.to_string()),
        "claim lists blocks"
    );

    // The common path: one compare-and-swap of the hinted block; pools listed, blocks not.
    for i in 1..64 {
        let a = ipam
            .auto_assign(&hinted(&format!("h{i}"), "n", &[block0]))
            .unwrap();
        assert_eq!(a[0].block, block0);
        let (writes, gets, lists) = s.take();
        assert_eq!(writes, [keys::block(&block0)], "ADD {i}: one write");
        assert_eq!(gets, 1, "ADD {i}: the hinted block alone is read");
        assert_eq!(
            lists,
            [keys::POOLS.to_string()],
            "ADD {i}: only pools listed"
        );
    }
    // With the pools the caller read: the hinted block is the only read.
    ipam.release_by_handle_hinted(
        "h5",
        &ReleaseHints {
            blocks: vec![block0],
            addrs: vec![],
        },
    )
    .unwrap();
    s.take();
    let pools = ipam.pools().unwrap();
    s.take();
    let a = ipam
        .auto_assign_in(&hinted("h5", "n", &[block0]), &pools)
        .unwrap();
    assert_eq!(a[0].addr, ip("10.0.0.5"));
    let (writes, gets, lists) = s.take();
    assert_eq!((writes.len(), gets, lists.len()), (1, 1, 0));

    // The hinted block is full: the full path claims the next block, still one write.
    let a = ipam.auto_assign(&hinted("h64", "n", &[block0])).unwrap();
    assert_eq!(a[0].block, block1);
    let (writes, _, _) = s.take();
    assert_eq!(writes, [keys::block(&block1)]);

    // A hint that is not the node's block (another node's, or a stale one) is not used.
    let other = ipam.auto_assign(&hinted("o0", "m", &[block1])).unwrap();
    assert_eq!(other[0].block, "10.0.0.128/26".parse::<IpNet>().unwrap());
    assert!(
        handle_records(&file).is_empty(),
        "no handle record for affine addresses"
    );
    check_invariants(&ipam);
}

#[test]
fn hinted_assigns_on_one_node_never_duplicate() {
    const THREADS: usize = 6;
    const PER_THREAD: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ipam.db");
    {
        let s = LocalStore::open(&path).unwrap();
        Ipam::new(&s)
            .ensure_pool(&pool("p", "10.0.0.0/22", 27))
            .unwrap();
    }
    let got: Vec<(String, IpAddr)> = std::thread::scope(|sc| {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let path = path.clone();
                sc.spawn(move || {
                    let s = LocalStore::open(&path).unwrap();
                    let ipam = Ipam::new(&s);
                    let mut got = Vec::new();
                    let mut hint = Vec::new();
                    for i in 0..PER_THREAD {
                        // A node cache refreshed now and then (stale in between).
                        if i % 7 == 0 {
                            hint = affine(&ipam, "n");
                        }
                        let h = format!("t{t}-{i}");
                        let a = ipam.auto_assign(&hinted(&h, "n", &hint)).unwrap();
                        got.push((h, a[0].addr));
                    }
                    got
                })
            })
            .collect();
        threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    });
    let s = LocalStore::open(&path).unwrap();
    let ipam = Ipam::new(&s);
    let live = check_invariants(&ipam);
    assert_eq!(
        live.len(),
        THREADS * PER_THREAD,
        "no address handed out twice"
    );
    for (h, a) in &got {
        assert_eq!(live.get(a), Some(h));
    }
    let mine = affine(&ipam, "n");
    assert_eq!(
        mine.len(),
        (THREADS * PER_THREAD).div_ceil(32),
        "blocks filled in turn"
    );
    assert!(got.iter().all(|(_, a)| mine.iter().any(|b| b.contains(a))));
    assert!(handle_records(&s).is_empty());
}

#[test]
fn release_finds_affine_addresses_with_and_without_hints() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    let addrs: Vec<Assigned> = (0..5)
        .map(|i| v4(&ipam, &format!("h{i}"), "n").unwrap())
        .collect();
    let mine = affine(&ipam, "n");
    assert!(handle_records(&s).is_empty());
    let hints = |blocks: Vec<IpNet>, addrs: Vec<IpAddr>| ReleaseHints { blocks, addrs };
    // The node's blocks as the hint.
    assert_eq!(
        ipam.release_by_handle_hinted("h0", &hints(mine.clone(), vec![]))
            .unwrap(),
        vec![addrs[0].addr]
    );
    // The endpoint record's address as the hint.
    assert_eq!(
        ipam.release_by_handle_hinted("h1", &hints(vec![], vec![addrs[1].addr]))
            .unwrap(),
        vec![addrs[1].addr]
    );
    // No hints: every block is scanned.
    assert_eq!(ipam.release_by_handle("h2").unwrap(), vec![addrs[2].addr]);
    // Hinted blocks that do not hold it (and no address): not found there, no scan...
    let elsewhere: IpNet = "10.0.0.192/26".parse().unwrap();
    assert!(ipam
        .release_by_handle_hinted("h3", &hints(vec![elsewhere], vec![]))
        .unwrap()
        .is_empty());
    // ... but an address that is not where expected is looked for everywhere.
    assert_eq!(
        ipam.release_by_handle_hinted("h3", &hints(vec![], vec![ip("10.0.0.200")]))
            .unwrap(),
        vec![addrs[3].addr]
    );
    // A DEL after a failed ADD: the address it noted is in a hinted block and free now. Its
    // block was searched, so nothing more is read (no scan).
    let counting = Counting::new(&s);
    let counted = Ipam::new(&counting);
    assert!(counted
        .release_by_handle_hinted("h0", &hints(mine.clone(), vec![addrs[0].addr]))
        .unwrap()
        .is_empty());
    let (writes, gets, lists) = counting.take();
    assert!(writes.is_empty() && lists.is_empty());
    assert_eq!(
        gets as usize,
        mine.len() + 1,
        "the node's blocks and the record"
    );
    // Idempotent, every way.
    for h in ["h0", "h1", "h2", "h3"] {
        assert!(ipam.release_by_handle(h).unwrap().is_empty());
        assert!(ipam
            .release_by_handle_hinted(h, &hints(mine.clone(), vec![]))
            .unwrap()
            .is_empty());
    }
    let live = check_invariants(&ipam);
    assert_eq!(
        live.keys().copied().collect::<Vec<_>>(),
        vec![addrs[4].addr]
    );
}

/// Two /29 blocks in a /28: node a fills its block (a0..a7), node b claims the other (b0).
fn a_full_and_b_claimed(ipam: &Ipam<'_>) {
    ipam.ensure_pool(&pool("p", "10.0.0.0/28", 29)).unwrap();
    for i in 0..8 {
        v4(ipam, &format!("a{i}"), "a").unwrap();
    }
    v4(ipam, "b0", "b").unwrap();
}

#[test]
fn borrowed_addresses_keep_a_handle_record_and_are_released() {
    let (_d, file) = store();
    let s = Counting::new(&file);
    let ipam = Ipam::new(&s);
    a_full_and_b_claimed(&ipam);
    let a_blocks = affine(&ipam, "a");
    s.take();
    let borrowed = ipam
        .auto_assign(&hinted("a8", "a", &a_blocks))
        .unwrap()
        .remove(0);
    let b_block: IpNet = "10.0.0.8/29".parse().unwrap();
    assert_eq!(borrowed.block, b_block);
    let (writes, _, _) = s.take();
    assert_eq!(
        writes,
        [keys::handle("a8"), keys::block(&b_block)],
        "the record goes first, then the block"
    );
    let (rec, _) = get_json::<HandleRecord>(&file, &keys::handle("a8"))
        .unwrap()
        .unwrap();
    assert_eq!(rec.blocks, vec![b_block]);
    assert_eq!(handle_records(&file), [keys::handle("a8")]);
    // DEL with a's blocks as the hint: found through the record, which goes too.
    let freed = ipam
        .release_by_handle_hinted(
            "a8",
            &ReleaseHints {
                blocks: a_blocks,
                addrs: vec![],
            },
        )
        .unwrap();
    assert_eq!(freed, vec![borrowed.addr]);
    assert!(handle_records(&file).is_empty());
    check_invariants(&ipam);
}

#[test]
fn gc_frees_an_affine_allocation_whose_endpoint_never_came() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "10.0.0.0/24", 26)).unwrap();
    let live = v4(&ipam, "live", "n").unwrap();
    // The plugin died after the allocation: no endpoint, and no handle record either.
    let crashed = ipam
        .auto_assign(&hinted("crashed", "n", &affine(&ipam, "n")))
        .unwrap()
        .remove(0);
    assert!(handle_records(&s).is_empty());
    let hs = ipam.handles().unwrap();
    let crashed_handle = hs.iter().find(|h| h.id == "crashed").unwrap();
    assert_eq!(crashed_handle.addrs, vec![crashed.addr]);
    assert_eq!(crashed_handle.attrs[ATTR_NODE], "n", "GC sees whose it is");
    let freed = ipam.release_unless(&|h: &Handle| h.id == "live").unwrap();
    assert_eq!(freed, vec![crashed.addr]);
    assert_eq!(
        check_invariants(&ipam).into_keys().collect::<Vec<_>>(),
        vec![live.addr]
    );
}

#[test]
fn release_addrs_of_handle_frees_exactly_those_it_still_holds() {
    let (_d, s) = store();
    let ipam = Ipam::new(&s);
    ipam.ensure_pool(&pool("p", "198.18.0.0/24", 28)).unwrap();
    let a = v4(&ipam, "h", "n1").unwrap().addr;
    let b = v4(&ipam, "h", "n1").unwrap().addr;
    let other = v4(&ipam, "o", "n1").unwrap().addr;
    // Only `a`; `other` is another handle's and is left alone; an unknown address is ignored.
    let freed = ipam
        .release_addrs_of_handle("h", &[a, other, ip("198.18.0.200")])
        .unwrap();
    assert_eq!(freed, vec![a]);
    let held = check_invariants(&ipam);
    assert_eq!(held.get(&b).map(String::as_str), Some("h"));
    assert_eq!(held.get(&other).map(String::as_str), Some("o"));
    assert!(!held.contains_key(&a));
    // Idempotent.
    assert!(ipam.release_addrs_of_handle("h", &[a]).unwrap().is_empty());
    assert_eq!(ipam.release_addrs_of_handle("h", &[b]).unwrap(), vec![b]);
    assert_eq!(check_invariants(&ipam).len(), 1);
}

/// A node's handles read from its own blocks and its handle records are exactly the handles
/// of that node among all of them (borrowed addresses included), without listing every block.
#[test]
fn a_nodes_handles_come_from_its_blocks_and_records_alone() {
    let (_d, file) = store();
    let s = Counting::new(&file);
    let ipam = Ipam::new(&s);
    a_full_and_b_claimed(&ipam);
    // a's block is full: a borrows from b's (a handle record names the block).
    let borrowed = v4(&ipam, "a8", "a").unwrap();
    assert_eq!(borrowed.block, "10.0.0.8/29".parse::<IpNet>().unwrap());
    let of = |node: &str| -> Vec<Handle> {
        let mut all: Vec<Handle> = ipam
            .handles()
            .unwrap()
            .into_iter()
            .filter(|h| h.attrs.get(ATTR_NODE).is_some_and(|n| n == node))
            .collect();
        all.sort_by(|x, y| x.id.cmp(&y.id));
        all
    };
    for node in ["a", "b"] {
        let own = affine(&ipam, node);
        s.take();
        let mut got = ipam.handles_of_node(node, &own).unwrap();
        // One list (the handle records), then its blocks one by one: no listing of blocks.
        let (writes, gets, lists) = s.take();
        got.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(got, of(node), "node {node}");
        assert!(writes.is_empty(), "{writes:?}");
        assert_eq!(lists, vec![keys::HANDLES.to_string()]);
        assert!(gets >= 1, "its blocks, read by key");
    }
    let a8 = ipam
        .handles_of_node("a", &affine(&ipam, "a"))
        .unwrap()
        .into_iter()
        .find(|h| h.id == "a8")
        .expect("the borrowed handle is a's");
    assert_eq!(a8.addrs, vec![borrowed.addr]);
}
