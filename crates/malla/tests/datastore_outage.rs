//! The datastore goes away for 30 s while pods run (a 2-node lab on a real etcd, or on a real
//! Kubernetes API server; the test kills the server and the lab restarts it): an established TCP stream between nodes loses no byte,
//! a new pod on a node with room in its own block still gets an address (from the node's
//! IPAM cache) and a working interface, a pod deleted meanwhile is released, and when etcd
//! returns the agents reconnect, write what happened offline into the datastore and converge.

mod common;

use std::net::{IpAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;
use malla_lab::cni_exec::{self, Attachment, Runtime};

const STREAM_PORT: u16 = 9100;
const OUTAGE: Duration = Duration::from_secs(30);

fn attachment(lab: &Lab, name: &str) -> Attachment {
    let ns = lab.netns(&format!("offline-{name}"));
    malla_dataplane::netns::create(&ns).unwrap();
    Attachment {
        container_id: format!("offline{name}"),
        netns_path: format!("/run/netns/{ns}"),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: format!("offline-{name}"),
    }
}

/// Every (address, handle) the datastore's blocks hold, read from the lab's datastore.
fn allocations(lab: &Lab) -> Vec<(IpAddr, String)> {
    let paths = malla_lab::state::LabPaths::new(&lab.name, Some(lab.state_root.path())).unwrap();
    let state = malla_lab::state::LabState::load(&paths).unwrap().unwrap();
    let store = malla_lab::store::open(&paths, &state).unwrap();
    malla_ipam::Ipam::new(&*store)
        .blocks()
        .unwrap()
        .iter()
        .flat_map(|b| b.allocated())
        .collect()
}

/// Whether two IPv4 addresses share a /26 (the lab's block size).
fn same_block(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) >> 6 == u32::from(b) >> 6,
        _ => false,
    }
}

#[test]
fn pods_keep_working_and_get_addresses_while_etcd_is_away() {
    outage("etcd");
}

/// The same with the Kubernetes datastore, its API server stopped.
#[test]
fn pods_keep_working_and_get_addresses_while_the_api_server_is_away() {
    outage("kubernetes");
}

fn outage(datastore: &str) {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), &format!("out{}", &datastore[..1]));
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", datastore]);
    lab.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: sender}\nspec: {nodeName: node-1, containers: [{name: c}]}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: sink}\nspec: {nodeName: node-2, containers: [{name: c}]}\n",
    );
    let state = lab.state();
    let sink_ip: IpAddr = state["pods"]["default/sink"]["ips"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let sender_ip: IpAddr = state["pods"]["default/sender"]["ips"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let runtime = Runtime::load(
        &lab.dir().join("nodes/node-1/net.d/10-malla.conflist"),
        &lab.dir().join("cni/bin"),
        Some(lab.netns("node-1")),
    )
    .unwrap();
    // A pod the datastore knows, to be deleted during the outage.
    let doomed = attachment(&lab, "doomed");
    let doomed_result = runtime.add(&doomed).unwrap();
    let doomed_ip = cni_exec::result_ips(&doomed_result)[0];
    assert!(allocations(&lab).iter().any(|(ip, _)| *ip == doomed_ip));

    // The sink counts bytes until EOF; the sender writes paced chunks through the outage.
    let stream = common::PacedStream::start(
        &lab.netns("pod-default-sender"),
        &lab.netns("pod-default-sink"),
        sink_ip,
        STREAM_PORT,
        (
            4096,
            Duration::from_millis(20),
            OUTAGE + Duration::from_secs(12),
        ),
    );
    std::thread::sleep(Duration::from_secs(1));

    // The datastore goes away: etcd, or the API server in front of it.
    let server = match datastore {
        "etcd" => state["etcd_pid"].as_u64(),
        _ => state["control_plane"]["apiserver"].as_u64(),
    }
    .expect("the lab runs the datastore's server") as i32;
    let outage_start = Instant::now();
    // SAFETY: signalling the lab's own server, by the pid the lab recorded.
    assert_eq!(unsafe { libc::kill(server, libc::SIGKILL) }, 0);
    while malla_lab::process::is_ours(server as u32) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        lab.try_run(&["ipam", "show"]).status.code() != Some(0),
        "the datastore is down"
    );

    // A new pod on node-1 gets an address from node-1's own block, and a working interface:
    // it reaches the sender on its node.
    let late = attachment(&lab, "late");
    let added = Instant::now();
    let result = runtime.add(&late).expect("ADD while the datastore is away");
    eprintln!("offline ADD took {:?}", added.elapsed());
    let late_ip = cni_exec::result_ips(&result)[0];
    assert!(
        same_block(late_ip, sender_ip),
        "{late_ip} is not in node-1's block (the sender's, {sender_ip})"
    );
    assert_ne!(late_ip, sender_ip);
    assert_ne!(late_ip, doomed_ip);
    assert!(
        tcp_reaches(
            &lab.netns("pod-default-sender"),
            &lab.netns("offline-late"),
            late_ip
        ),
        "the offline pod is reachable from its node's pods"
    );
    // A pod deleted meanwhile: DEL succeeds.
    runtime
        .del(&doomed, Some(&doomed_result))
        .expect("DEL while the datastore is away");

    // etcd returns (the lab restarts it) after the outage.
    let left = OUTAGE.saturating_sub(outage_start.elapsed());
    std::thread::sleep(left);
    lab.run(&["lab", "up", "--nodes", "2", "--datastore", datastore]);
    eprintln!("{datastore} was away for {:?}", outage_start.elapsed());

    // The agents settle: the offline pod's address and endpoint are in the datastore, the
    // deleted pod's are gone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alloc = allocations(&lab);
        let late_in = alloc
            .iter()
            .any(|(ip, h)| *ip == late_ip && h.contains("offlinelate"));
        let doomed_in = alloc.iter().any(|(ip, _)| *ip == doomed_ip);
        if late_in && !doomed_in {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after 30 s: late {late_in}, doomed {doomed_in}: {alloc:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And converge: a pod applied now works across nodes with the others.
    lab.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: after}\nspec: {nodeName: node-2, containers: [{name: c}]}\n");
    assert!(
        tcp_reaches(
            &lab.netns("pod-default-after"),
            &lab.netns("offline-late"),
            late_ip
        ),
        "a pod made after the outage reaches the one made during it, across nodes"
    );

    let (sent, received) = stream.finish();
    assert_eq!(
        received, sent,
        "every byte of the established stream arrived"
    );
    runtime.del(&late, Some(&result)).unwrap();
}

/// Whether a TCP connection from namespace `from` reaches a listener in namespace `to` at `ip`.
fn tcp_reaches(from: &str, to: &str, ip: IpAddr) -> bool {
    let to_ns = NetNs::open_named(to).unwrap();
    let from_ns = NetNs::open_named(from).unwrap();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let r = ready.clone();
    let server = std::thread::spawn(move || {
        to_ns.enter_this_thread().unwrap();
        let l = TcpListener::bind(("0.0.0.0", 9200)).unwrap();
        l.set_nonblocking(true).unwrap();
        r.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if l.accept().is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    ready.wait();
    let client = std::thread::spawn(move || {
        from_ns.enter_this_thread().unwrap();
        TcpStream::connect_timeout(&(ip, 9200).into(), Duration::from_secs(3)).is_ok()
    });
    client.join().unwrap() && server.join().unwrap()
}
