//! Chaining: Malla first in a conflist, with the reference `portmap`, `bandwidth` and `tuning`
//! plugins after it. Their prevResult is Malla's result, and ADD, CHECK and DEL of the whole
//! chain work: the host port forwards to the pod, the shaping qdisc and the sysctl are in place,
//! and DEL leaves nothing behind.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{ip, Lab};
use malla_dataplane::netns::{self, NetNs};
use malla_lab::cni_exec::{self, Attachment, Runtime};
use serde_json::json;

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

#[test]
fn malla_then_portmap_bandwidth_tuning() {
    let lab = Lab::new(&common::malla_bin(), "chain");
    lab.run(&["lab", "up", "--nodes", "1", "--ipv6"]);
    let node_ns = lab.netns("node-1");

    // A CNI bin dir with Malla and the reference plugins, and a chained conflist (the reference
    // plugins speak up to 1.0.0).
    let bin = lab.dir().join("chain-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(lab.dir().join("cni/bin/malla"), bin.join("malla")).unwrap();
    for p in ["portmap", "bandwidth", "tuning"] {
        std::os::unix::fs::symlink(Path::new(REFERENCE_PLUGINS).join(p), bin.join(p)).unwrap();
    }
    let base: serde_json::Value = serde_json::from_slice(
        &std::fs::read(lab.dir().join("nodes/node-1/net.d/10-malla.conflist")).unwrap(),
    )
    .unwrap();
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "malla",
        "plugins": [
            base["plugins"][0],
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            {"type": "bandwidth", "capabilities": {"bandwidth": true}},
            {"type": "tuning", "sysctl": {"net.core.somaxconn": "512"}},
        ]
    });
    let conf_path = lab.dir().join("chain.conflist");
    std::fs::write(&conf_path, conflist.to_string()).unwrap();
    let mut rt = Runtime::load(&conf_path, &bin, Some(node_ns.clone())).unwrap();
    rt.capability_args.insert(
        "portMappings".into(),
        json!([{"hostPort": 30080, "containerPort": 8080, "protocol": "tcp"}]),
    );
    rt.capability_args.insert(
        "bandwidth".into(),
        json!({"ingressRate": 100_000_000u64, "ingressBurst": 1_000_000, "egressRate": 100_000_000u64, "egressBurst": 1_000_000}),
    );

    let pod_ns = lab.netns("chain-pod");
    netns::create(&pod_ns).unwrap();
    let att = Attachment {
        container_id: "chain-1".into(),
        netns_path: format!("/run/netns/{pod_ns}"),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "chained".into(),
    };
    let result = rt.add(&att).expect("ADD through the chain");
    let ips = cni_exec::result_ips(&result);
    assert!(
        ips.iter().any(|ip| ip.to_string().starts_with("198.18.")),
        "{result}"
    );
    assert!(ips.iter().any(IpAddr::is_ipv6), "{result}");
    // The last plugin's result still carries Malla's interfaces and addresses.
    assert_eq!(result["interfaces"][1]["name"], "eth0", "{result}");
    let host_veth = result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // tuning set the sysctl in the pod; bandwidth shaped the host veth.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod_ns,
            "sysctl",
            "-n",
            "net.core.somaxconn",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "512");
    let qdisc = String::from_utf8_lossy(
        &std::process::Command::new("tc")
            .args(["-n", &node_ns, "qdisc", "show", "dev", &host_veth])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        qdisc.contains("tbf"),
        "bandwidth installed a tbf qdisc: {qdisc}"
    );

    // portmap: the node's port 30080 reaches the pod's 8080, from the outside namespace.
    let pod = NetNs::open_named(&pod_ns).unwrap();
    let server = std::thread::spawn(move || {
        pod.enter_this_thread().unwrap();
        let l = TcpListener::bind(("0.0.0.0", 8080)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"through portmap\n").unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    let node_ip: IpAddr = lab.state()["nodes"][0]["underlay_ipv4"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ext = NetNs::open_named(&lab.netns("external")).unwrap();
    let got = std::thread::spawn(move || {
        ext.enter_this_thread().unwrap();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(node_ip, 30080), Duration::from_secs(3))
                .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    })
    .join()
    .unwrap();
    server.join().unwrap();
    assert_eq!(got, "through portmap\n");

    // CHECK through the chain. Debian's portmap 1.1.1 has a broken CHECK: it looks for its
    // IPv4 rules in the IPv6 table (containernetworking/plugins#819, since fixed upstream),
    // so the chain's CHECK may fail there and only there; every other plugin must pass.
    if let Err(e) = rt.check(&att, &result) {
        let msg = format!("{e:#}");
        assert!(
            msg.contains("plugin portmap failed") && msg.contains("ipv6"),
            "CHECK failed outside portmap: {msg}"
        );
        let mut without_portmap = conflist.clone();
        without_portmap["plugins"].as_array_mut().unwrap().remove(1);
        let path = lab.dir().join("chain-check.conflist");
        std::fs::write(&path, without_portmap.to_string()).unwrap();
        let mut check_rt = Runtime::load(&path, &bin, Some(node_ns.clone())).unwrap();
        check_rt.capability_args = rt.capability_args.clone();
        check_rt
            .check(&att, &result)
            .expect("CHECK of malla, bandwidth and tuning");
    }
    rt.del(&att, Some(&result)).expect("DEL through the chain");
    rt.del(&att, Some(&result)).expect("DEL again is fine");
    assert!(
        !ip(&["-n", &node_ns, "-o", "link", "show"]).contains(&host_veth),
        "veth gone"
    );
    assert_eq!(lab.used_addresses(), 0, "address released");
    let nat = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "exec", &node_ns, "iptables-save", "-t", "nat"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!nat.contains("30080"), "portmap rules removed: {nat}");
}
