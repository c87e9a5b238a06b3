//! The plugin under hostile or unusual input, run as a runtime runs it (a real binary, real
//! namespaces, a real datastore): no panic on a non-UTF-8 environment, injective IPAM handles,
//! nothing kept by a failed ADD, private state files, and a minimal conflist.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use common::{assert_no_panic, mode_of, TestNode};
use serde_json::json;

fn os(s: &str) -> OsString {
    OsString::from(s)
}

#[test]
fn a_non_utf8_environment_never_panics() {
    let node = TestNode::new("u");
    let netns = node.pod("p");
    let path = format!("/run/netns/{netns}");
    let junk = OsString::from_vec(vec![b'x', 0xff, 0xfe]);
    let conf = node.conf().to_string();
    let base = |command: &str| {
        vec![
            (os("CNI_COMMAND"), os(command)),
            (os("CNI_CONTAINERID"), os("utf8-a")),
            (os("CNI_NETNS"), os(&path)),
            (os("CNI_IFNAME"), os("eth0")),
            (os("CNI_PATH"), os("/nonexistent")),
            // An unrelated variable, name and value not UTF-8.
            (os("JUNK"), junk.clone()),
            (junk.clone(), os("x")),
        ]
    };
    // VERSION answers whatever the environment holds.
    let v = node.raw_os(&base("VERSION"), b"");
    assert!(v.ok, "{v:?}");
    assert!(v.out["supportedVersions"].is_array(), "{v:?}");
    // A whole attachment's life with junk around it works.
    let add = node.raw_os(&base("ADD"), conf.as_bytes());
    assert!(add.ok, "ADD: {add:?}");
    let mut check_conf = node.conf();
    check_conf["prevResult"] = add.out.clone();
    let check = node.raw_os(&base("CHECK"), check_conf.to_string().as_bytes());
    assert!(check.ok, "CHECK: {check:?}");
    for command in ["STATUS", "GC"] {
        let o = node.raw_os(&base(command), conf.as_bytes());
        assert_no_panic(&o, command);
    }
    let del = node.raw_os(&base("DEL"), conf.as_bytes());
    assert!(del.ok, "DEL: {del:?}");
    assert!(node.held().is_empty());
    // A CNI_* variable the plugin reads that is not UTF-8: code 4, naming it.
    for var in [
        "CNI_ARGS",
        "CNI_CONTAINERID",
        "CNI_IFNAME",
        "CNI_NETNS",
        "CNI_COMMAND",
    ] {
        for command in ["ADD", "DEL", "CHECK"] {
            let mut env = base(command);
            env.retain(|(k, _)| k != var);
            env.push((os(var), junk.clone()));
            let o = node.raw_os(&env, conf.as_bytes());
            assert_no_panic(&o, var);
            assert_eq!(o.code(), 4, "{var} {command}: {o:?}");
            assert!(o.out["msg"].as_str().unwrap().contains(var), "{o:?}");
        }
    }
    assert!(node.held().is_empty(), "nothing was reserved");
}

#[test]
fn handles_are_unambiguous() {
    let node = TestNode::new("h");
    let conf = node.conf();
    let (p1, p2) = (node.pod("a"), node.pod("b"));
    // The old encoding gave both `malla.a.b.c`.
    let one = node.call("ADD", "a.b", "c", &p1, &conf);
    assert!(one.ok, "{one:?}");
    let two = node.call("ADD", "a", "b.c", &p2, &conf);
    assert!(two.ok, "{two:?}");
    let addr = |o: &common::Outcome| o.out["ips"][0]["address"].as_str().unwrap().to_string();
    assert_ne!(addr(&one), addr(&two));
    assert_eq!(node.held().len(), 2);
    let store = node.store();
    let handles = malla_ipam::Ipam::new(&store).handles().unwrap();
    assert_eq!(handles.len(), 2, "two handles: {handles:?}");
    // Deleting one leaves the other's address held and its attachment intact.
    assert!(node.call("DEL", "a.b", "c", &p1, &conf).ok);
    let held = node.held();
    assert_eq!(held.len(), 1);
    let second: ipnet::IpNet = addr(&two).parse().unwrap();
    assert_eq!(held, vec![second.addr()]);
    let mut check = conf.clone();
    check["prevResult"] = two.out.clone();
    let c = node.call("CHECK", "a", "b.c", &p2, &check);
    assert!(c.ok, "the other attachment is intact: {c:?}");
    assert!(node.call("DEL", "a", "b.c", &p2, &conf).ok);
    assert!(node.held().is_empty());
}

/// An attachment an earlier version made (its handle in the old encoding, ambiguous because
/// the container ID has a dot) is still released by DEL and kept by GC while valid.
#[test]
fn handles_of_the_old_encoding_are_still_released() {
    let node = TestNode::new("l");
    let conf = node.conf();
    let netns = node.pod("old");
    let add = node.call("ADD", "old.ctr", "eth0", &netns, &conf);
    assert!(add.ok, "{add:?}");
    // Rewrite the attachment as the old version recorded it: the address under the legacy
    // handle, the endpoint naming it.
    let store = node.store();
    let ipam = malla_ipam::Ipam::new(&store);
    let new_handle = malla_cni::config::ipam_handle("malla", "old.ctr", "eth0");
    let legacy = malla_cni::config::legacy_ipam_handle("malla", "old.ctr", "eth0");
    assert_ne!(new_handle, legacy);
    let freed = ipam.release_by_handle(&new_handle).unwrap();
    assert_eq!(freed.len(), 1);
    ipam.assign_ip(freed[0], &legacy, common::NODE, &Default::default())
        .unwrap();
    let key = malla_api::keys::endpoint(common::NODE, "old.ctr", "eth0");
    let (mut ep, _) = malla_store::get_json::<malla_api::WorkloadEndpoint>(&store, &key)
        .unwrap()
        .unwrap();
    ep.ipam_handle = legacy.clone();
    malla_store::put_json(&store, &key, &ep).unwrap();
    // CHECK follows the record's handle.
    let mut check = conf.clone();
    check["prevResult"] = add.out.clone();
    let c = node.call("CHECK", "old.ctr", "eth0", &netns, &check);
    assert!(c.ok, "{c:?}");
    // GC keeps it while valid.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "old.ctr", "ifname": "eth0"}]);
    let g = node.raw(&[("CNI_COMMAND", "GC")], gc.to_string().as_bytes());
    assert!(g.ok, "{g:?}");
    assert_eq!(node.held(), freed);
    assert!(node.call("DEL", "old.ctr", "eth0", &netns, &conf).ok);
    assert!(node.held().is_empty(), "DEL released the legacy handle");
}

#[test]
fn a_failed_add_keeps_nothing() {
    let node = TestNode::new("f");
    let netns = node.pod("p");
    for mac in ["ff:ff:ff:ff:ff:ff", "not-a-mac", "01:00:5e:00:00:01"] {
        let mut conf = node.conf();
        conf["runtimeConfig"] = json!({"mac": mac});
        let o = node.call("ADD", "bad-mac", "eth0", &netns, &conf);
        assert_eq!(o.code(), 7, "{o:?}");
        assert!(node.held().is_empty(), "{mac}: the address was released");
        assert!(node.veths().is_empty(), "{mac}: no veth left");
        // Also with a fixed address (the `ips` capability).
        conf["runtimeConfig"]["ips"] = json!(["198.19.200.7/32"]);
        assert_eq!(node.call("ADD", "bad-mac", "eth0", &netns, &conf).code(), 7);
        assert!(
            node.held().is_empty(),
            "{mac} + ips: the address was released"
        );
    }
    // An ADD failing at wiring time (the pod's namespace is gone) releases its address too.
    let gone = node.call("ADD", "no-netns", "eth0", "does-not-exist", &node.conf());
    assert!(!gone.ok, "{gone:?}");
    assert!(node.held().is_empty());
    assert!(node.veths().is_empty());
    // A good ADD then works and holds exactly one address.
    let ok = node.call("ADD", "good", "eth0", &netns, &node.conf());
    assert!(ok.ok, "{ok:?}");
    assert_eq!(node.held().len(), 1);
    assert!(node.call("DEL", "good", "eth0", &netns, &node.conf()).ok);
}

#[test]
fn state_and_credential_files_are_private_from_the_first_byte() {
    let dir = tempfile::tempdir().unwrap();
    // The embedded store (and so the node cache, which is one).
    let db = dir.path().join("s.db");
    let store = malla_store::LocalStore::open(&db).unwrap();
    malla_store::put_json(&store, "/x", &1).unwrap();
    assert_eq!(mode_of(&db), 0o600);
    for side in ["-wal", "-shm"] {
        let p = dir.path().join(format!("s.db{side}"));
        if p.exists() {
            assert_eq!(mode_of(&p), 0o600, "{side}");
        }
    }
    let cache = dir.path().join("agent.ready.ipam-cache");
    malla_ipam::node_cache::NodeCache::open(&cache).unwrap();
    assert_eq!(mode_of(&cache), 0o600);
    // The conflist and a new conf dir.
    let bin = dir.path().join("plugin");
    std::fs::write(&bin, b"#!/bin/true\n").unwrap();
    let confs = dir.path().join("etc/net.d");
    let conflist = malla_cni::install::conflist(
        "n1",
        &malla_store::DatastoreSpec::Local { path: db.clone() },
        None,
        "1.1.0",
    );
    let got = malla_cni::install::install(&bin, &dir.path().join("bin"), &confs, &conflist, false)
        .unwrap();
    assert_eq!(mode_of(&got.conflist), 0o600);
    assert_eq!(mode_of(&confs), 0o700);
    assert_eq!(mode_of(&got.binary) & 0o111, 0o111);
    // The in-cluster kubeconfig with its token, in a new directory.
    let sa = dir.path().join("sa");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "secret").unwrap();
    std::fs::write(sa.join("ca.crt"), "CA").unwrap();
    let kdir = dir.path().join("k/net.d");
    let env = |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("198.19.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
        _ => None,
    };
    let kc = malla_cni::install::write_in_cluster_kubeconfig(&kdir, &sa, &env)
        .unwrap()
        .unwrap();
    assert_eq!(mode_of(&kc), 0o600);
    assert_eq!(mode_of(&kdir.join("malla-ca.crt")), 0o600);
    assert_eq!(mode_of(&kdir), 0o700);
}

/// An existing conflist is replaced by rename (a new file, created with its final mode), never
/// rewritten in place.
#[test]
fn conflist_is_replaced_not_rewritten() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("plugin");
    std::fs::write(&bin, b"#!/bin/true\n").unwrap();
    let confs = dir.path().join("net.d");
    let conflist = malla_cni::install::conflist(
        "n1",
        &malla_store::DatastoreSpec::Local { path: "/x".into() },
        None,
        "1.1.0",
    );
    let first =
        malla_cni::install::install(&bin, &dir.path().join("b"), &confs, &conflist, false).unwrap();
    let ino = std::fs::metadata(&first.conflist).unwrap().ino();
    let again =
        malla_cni::install::install(&bin, &dir.path().join("b"), &confs, &conflist, false).unwrap();
    assert_ne!(std::fs::metadata(&again.conflist).unwrap().ino(), ino);
    assert_eq!(mode_of(&again.conflist), 0o600);
}

#[test]
fn a_minimal_conflist_works() {
    let node = TestNode::new("m");
    let minimal = json!({"cniVersion": "1.1.0", "name": "malla", "type": "malla"});
    let default_store = std::path::Path::new(malla_cni::config::DEFAULT_LOCAL_DATASTORE);
    let had_default_store = default_store.exists();
    let netns = node.pod("p");
    // DEL of a container nothing knows succeeds (it failed with code 7 for nodeName).
    for cid in ["never-added", "x.y"] {
        let del = node.call("DEL", cid, "eth0", &netns, &minimal);
        assert!(del.ok, "{del:?}");
    }
    let v = node.raw(
        &[("CNI_COMMAND", "VERSION")],
        minimal.to_string().as_bytes(),
    );
    assert!(v.ok);
    // The node name comes from the agent's file: with it naming our node and the datastore
    // given, ADD and DEL work with no nodeName.
    let file = node.dir.path().join("nodename");
    std::fs::write(&file, format!("{}\n", common::NODE)).unwrap();
    let mut conf = minimal.clone();
    conf["nodeNameFile"] = json!(file);
    conf["datastore"] = node.conf()["datastore"].clone();
    let add = node.call("ADD", "min", "eth0", &netns, &conf);
    assert!(add.ok, "{add:?}");
    let store = node.store();
    let key = malla_api::keys::endpoint(common::NODE, "min", "eth0");
    assert!(
        malla_store::get_json::<malla_api::WorkloadEndpoint>(&store, &key)
            .unwrap()
            .is_some()
    );
    assert!(node.call("DEL", "min", "eth0", &netns, &conf).ok);
    assert!(node.held().is_empty());
    // DEL without the default datastore file did not create it.
    assert_eq!(default_store.exists(), had_default_store);
}

/// Arguments are not part of CNI, but a runtime (or a person) may pass any: `--version` says
/// what this is, anything else (not UTF-8 included) is ignored, never a panic.
#[test]
fn arguments_never_panic() {
    let node = TestNode::new("a");
    let mut cmd = node.command();
    cmd.arg("--version");
    let v = common::run(cmd, b"");
    assert!(v.ok && v.stdout.starts_with("malla-cni "), "{v:?}");
    let mut cmd = node.command();
    cmd.arg(OsString::from_vec(vec![0xff, b'x']))
        .env("CNI_COMMAND", "VERSION");
    let o = common::run(cmd, b"");
    assert_no_panic(&o, "non-UTF-8 argument");
    assert!(o.ok && o.out["supportedVersions"].is_array(), "{o:?}");
}

/// Found by the fuzzer: an ADD repeated for a live attachment (same container and interface),
/// in its own pod, in another pod, or with a namespace path that is not a namespace, failed
/// after deleting the live attachment's veth (it has the attachment's name). Now it is refused
/// before touching anything, and a failed ADD only removes a veth it created.
#[test]
fn a_repeated_add_leaves_the_live_attachment_alone() {
    let node = TestNode::new("d");
    let conf = node.conf();
    let (p, q) = (node.pod("p"), node.pod("q"));
    let add = node.call("ADD", "dup", "eth0", &p, &conf);
    assert!(add.ok, "{add:?}");
    let veths = node.veths();
    let held = node.held();
    let not_a_netns = node.dir.path().display().to_string();
    for netns in [p.as_str(), q.as_str()] {
        let again = node.call("ADD", "dup", "eth0", netns, &conf);
        assert_eq!(again.code(), 7, "{again:?}");
        assert_eq!(node.veths(), veths);
        assert_eq!(node.held(), held);
    }
    for netns in [not_a_netns.as_str(), "/proc/self/ns/mnt"] {
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "dup"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", netns),
        ];
        let o = node.raw(&env, conf.to_string().as_bytes());
        assert!(!o.ok, "{o:?}");
        assert_eq!(node.veths(), veths, "{netns}");
        assert_eq!(node.held(), held, "{netns}");
    }
    // A new attachment whose namespace path is not a namespace fails and keeps nothing.
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "fresh"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", not_a_netns.as_str()),
    ];
    assert!(!node.raw(&env, conf.to_string().as_bytes()).ok);
    assert_eq!(node.veths(), veths);
    assert_eq!(node.held(), held);
    let mut check = conf.clone();
    check["prevResult"] = add.out.clone();
    let c = node.call("CHECK", "dup", "eth0", &p, &check);
    assert!(c.ok, "the live attachment is intact: {c:?}");
    assert!(node.call("DEL", "dup", "eth0", &p, &conf).ok);
    assert!(node.held().is_empty());
}
