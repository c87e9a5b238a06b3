//! Real container runtimes calling the Malla CNI plugin on a lab node: containerd (through
//! `ctr --cni`) and podman (CNI network backend). Two busybox containers each get a Malla
//! address, one reaches the other, and removing them leaves no address, veth, route or nft
//! rule behind.
//!
//! Everything a runtime does happens inside the lab node's network namespace and in private
//! mount namespaces: the daemons, their state, sockets and `/run` live in a temp dir or a
//! private tmpfs, and the CNI directories a runtime reads are bind mounts visible only to it.
//! Nothing is written to the machine's `/etc/cni/net.d`, `/opt/cni/bin` or root namespace.
//! The harness (the runtimes, the image, the checks, the cleanup) is `malla_test_kit::runtimes`,
//! which the `ctr-start` benchmark shares.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use malla_test_kit::lab::{require_root, Lab};
use malla_test_kit::runtimes::{
    assert_node_clean, assert_wired_in_node, busybox_oci_archive, eth0_ipv4, in_pod_pool,
    require_tools, wait_for, Containerd, Out, Podman,
};

/// Container B's main process: a TCP server on 8080 that answers every connection.
const LISTENER: &str = "while :; do echo hello-from-b | nc -l -p 8080; done";

fn malla_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_malla"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Container A's address, B's address, and A reaching B over TCP (busybox `nc`) and ICMP.
fn check_two_containers(
    lab: &Lab,
    node_ns: &str,
    exec: &dyn Fn(&str, &[&str]) -> Out,
) -> [Ipv4Addr; 2] {
    let addr = |id: &str| {
        // `ctr tasks exec` can lose a short-lived process's output on a loaded machine (the
        // process exits before ctr attaches its fifos: exit 0, empty stdout; seen once in CI
        // at load ~8). A few bounded retries tell that from an address that is not there.
        let mut out = exec(id, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        for _ in 0..4 {
            if !(out.ok && out.stdout.trim().is_empty()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
            out = exec(id, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        }
        assert!(out.ok, "ip addr in {id}: {}", out.text());
        let a = eth0_ipv4(&out.stdout)
            .unwrap_or_else(|| panic!("no IPv4 address on eth0 of {id}: {}", out.stdout));
        assert!(in_pod_pool(a), "{id}: {a} is not from 198.18.0.0/16");
        a
    };
    let (a, b) = (addr("a"), addr("b"));
    assert_ne!(a, b, "two containers, two addresses");
    assert_eq!(
        lab.used_addresses(),
        2,
        "IPAM holds exactly the two addresses"
    );
    assert_wired_in_node(node_ns, &[a, b]);

    let b_s = b.to_string();
    let mut last = None;
    let reached = wait_for(Duration::from_secs(20), || {
        let out = exec("a", &["nc", "-w", "3", &b_s, "8080"]);
        let ok = out.stdout.contains("hello-from-b");
        last = Some(out);
        ok.then_some(())
    });
    assert!(
        reached.is_some(),
        "container a ({a}) does not reach b ({b}:8080): {}",
        last.map(|o| o.text()).unwrap_or_default()
    );
    let ping = exec("a", &["ping", "-c", "1", "-W", "3", &b_s]);
    assert!(ping.ok, "ping a -> b: {}", ping.text());
    [a, b]
}

// ---------------------------------------------------------------- containerd

#[test]
fn containerd_ctr_cni_two_containers_on_malla() {
    require_root();
    require_tools(&[
        "containerd",
        "ctr",
        "runc",
        "unshare",
        "nft",
        "tar",
        "sha256sum",
    ]);
    let lab = Lab::new(&malla_bin(), "ctd");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let node_ns = lab.netns("node-1");
    let mut ctd = Containerd::for_lab(&lab, "node-1", &node_ns);
    ctd.import_busybox();

    ctd.run_container("a", &["sleep", "300"]);
    ctd.run_container("b", &["sh", "-c", LISTENER]);
    let addrs = check_two_containers(&lab, &node_ns, &|id, argv| ctd.exec(id, argv));

    ctd.remove("a");
    ctd.remove("b");
    assert_node_clean(&lab, &node_ns, &addrs);
}

// ---------------------------------------------------------------- podman

#[test]
fn podman_cni_two_containers_on_malla() {
    require_root();
    require_tools(&[
        "podman",
        "runc",
        "conmon",
        "nsenter",
        "unshare",
        "nft",
        "tar",
        "sha256sum",
    ]);
    let lab = Lab::new(&malla_bin(), "pod");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let node_ns = lab.netns("node-1");
    let mut pm = Podman::start(&lab, "node-1", &node_ns);

    let nets = pm.podman_ok(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(
        nets.lines().any(|l| l.trim() == "malla"),
        "podman's CNI backend does not list the malla network: {nets}"
    );
    let image = busybox_oci_archive(&pm.dir().join("image"));
    pm.podman_ok(&["load", "-i", s(&image)]);

    pm.run_container("a", &["sleep", "300"]);
    pm.run_container("b", &["sh", "-c", LISTENER]);
    let addrs = check_two_containers(&lab, &node_ns, &|name, argv| {
        let mut args = vec!["exec", name];
        args.extend_from_slice(argv);
        pm.podman(&args)
    });
    for (name, addr) in ["a", "b"].iter().zip(addrs) {
        let ip = pm.podman_ok(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.malla.IPAddress}}",
            name,
        ]);
        assert_eq!(
            ip.trim(),
            addr.to_string(),
            "podman reports the CNI result's address"
        );
    }

    for name in ["a", "b"] {
        pm.podman_ok(&["stop", "-t", "0", name]);
        pm.podman_ok(&["rm", name]);
        pm.forget(name);
    }
    let left = pm.podman_ok(&["ps", "-a", "-q"]);
    assert!(left.trim().is_empty(), "no container left: {left}");
    assert_node_clean(&lab, &node_ns, &addrs);
}
