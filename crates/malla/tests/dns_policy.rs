//! DNS-name egress rules on a real lab (issue 15 item 3): a pod allowed egress only to
//! `*.allowed.test` (and DNS to the lab's DNS server, dnsmasq in `external`) reaches a server
//! by 200 fresh names, each with its own address, on the first try (a connect that had to
//! retransmit its SYN would take over a second: the limit is 900 ms); cannot reach an address
//! it has not resolved, nor the same server's address looked up under `x.other.test`; and loses
//! access once the answer's TTL passed without another lookup.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;

const TTL: u32 = 2;
const NAMES: u8 = 200;
const PORT: u16 = 8099;
const DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
/// The address `late.allowed.test` and `x.other.test` both have.
const SHARED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 250);
const WARMUP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 251);

fn fresh(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 1, 10 + i)
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: client}}
spec: {nodeName: node-1, containers: [{name: c}]}
"#;

const POLICY: &str = r#"
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: client-allowed-names}
spec:
  selector: app == 'client'
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination: {nets: [198.19.1.2/32], ports: [53]}
  - action: Allow
    protocol: TCP
    destination: {domains: ["*.allowed.test"]}
"#;

fn resolve(name: &str) -> Result<Ipv4Addr, String> {
    malla_lab::dns::resolve_a(SocketAddrV4::new(DNS, 53), name).map_err(|e| format!("{e:#}"))
}

fn connects(ip: Ipv4Addr) -> Result<Duration, String> {
    let t = Instant::now();
    TcpStream::connect_timeout(
        &SocketAddr::V4(SocketAddrV4::new(ip, PORT)),
        Duration::from_millis(900),
    )
    .map(|_| t.elapsed())
    .map_err(|e| format!("{ip}: {e} after {:?}", t.elapsed()))
}

#[test]
fn pods_reach_allowed_names_on_the_first_try_and_nothing_else() {
    if !common::require_root() {
        return;
    }
    let lab = Lab::new(&common::malla_bin(), "dns");
    lab.run(&["lab", "up", "--nodes", "1"]);
    let ext = lab.netns("external");
    // Every fresh name has its own address on the external side.
    let addrs = common::ip(&["-n", &ext, "-o", "-4", "addr", "show"]);
    let iface = addrs
        .lines()
        .find(|l| l.contains(&format!("{DNS}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no {DNS} in external: {addrs}"))
        .to_string();
    for ip in (0..NAMES).map(fresh).chain([SHARED, WARMUP]) {
        common::ip(&[
            "-n",
            &ext,
            "addr",
            "add",
            &format!("{ip}/32"),
            "dev",
            &iface,
        ]);
    }
    let ext_ns = NetNs::open_named(&ext).expect("external netns");
    let listener = ext_ns
        .run(|| TcpListener::bind(("0.0.0.0", PORT)))
        .expect("external netns")
        .expect("listen in external");
    std::thread::spawn(move || {
        for s in listener.incoming() {
            drop(s);
        }
    });
    let mut records: Vec<(String, IpAddr)> = (0..NAMES)
        .map(|i| (format!("n{i}.allowed.test"), IpAddr::V4(fresh(i))))
        .collect();
    records.push(("late.allowed.test".into(), IpAddr::V4(SHARED)));
    records.push(("warmup.allowed.test".into(), IpAddr::V4(WARMUP)));
    records.push(("x.other.test".into(), IpAddr::V4(SHARED)));
    let _dns = malla_lab::dns::DnsServer::start(&ext, DNS, &records, TTL, &lab.dir())
        .expect("dnsmasq in external");
    lab.apply(PODS);
    lab.apply(POLICY);
    let pod = NetNs::open_named(&lab.netns("pod-default-client")).expect("client's netns");

    // The policy is there: an address not resolved is denied. DNS works through the proxy
    // (a few tries while the node converges).
    let before = pod.run(|| connects(fresh(0))).expect("netns");
    assert!(before.is_err(), "reached {} before resolving it", fresh(0));
    let warm = pod
        .run(|| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match resolve("warmup.allowed.test").and_then(connects) {
                    Ok(d) => return Ok(d),
                    Err(e) if Instant::now() > deadline => return Err(e),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .expect("netns");
    assert!(warm.is_ok(), "warm-up through the proxy: {warm:?}");

    // 200 fresh names, each connected to at once after its answer.
    let (failures, slowest) = pod
        .run(|| {
            let mut failures = Vec::new();
            let mut slowest = Duration::ZERO;
            for i in 0..NAMES {
                let name = format!("n{i}.allowed.test");
                match resolve(&name) {
                    Ok(ip) if ip == fresh(i) => match connects(ip) {
                        Ok(d) => slowest = slowest.max(d),
                        Err(e) => failures.push(format!("{name}: {e}")),
                    },
                    Ok(ip) => failures.push(format!("{name}: resolved to {ip}")),
                    Err(e) => failures.push(e),
                }
            }
            (failures, slowest)
        })
        .expect("netns");
    eprintln!(
        "{NAMES} fresh names: {} failed, slowest connect {slowest:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "first-try failures: {failures:#?}");

    // Access ends with the TTL; another name for the same address does not open it.
    let late = pod
        .run(|| {
            let ip = resolve("late.allowed.test")?;
            let first = connects(ip);
            std::thread::sleep(Duration::from_millis(u64::from(TTL) * 1000 + 1500));
            let after_ttl = connects(ip);
            let other = resolve("x.other.test")?;
            let by_other = connects(other);
            Ok::<_, String>((ip, other, first, after_ttl, by_other))
        })
        .expect("netns")
        .expect("lookups");
    let (ip, other, first, after_ttl, by_other) = late;
    assert_eq!((ip, other), (SHARED, SHARED));
    assert!(first.is_ok(), "late.allowed.test: {first:?}");
    assert!(
        after_ttl.is_err(),
        "still reachable after the TTL: {after_ttl:?}"
    );
    assert!(by_other.is_err(), "reachable by x.other.test: {by_other:?}");
}
