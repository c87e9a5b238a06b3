//! Flow collection against the real kernel, in a namespace of its own: a ruleset logging an
//! allow and a deny to NFLOG, a connection that is allowed and one that is dropped; the
//! collector delivers the allow sample before the connection's NEW, the connection's end with
//! the bytes sent (a periodic reading sees it in TIME_WAIT), and the deny sample. Needs root; skipped otherwise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use malla_calc::policy::flowlog::{Dir, LogPoint, NFLOG_GROUP};
use malla_dataplane::flows::{enable_accounting, Collector, Refresh};
use malla_flows::{KernelEvent, Phase, Tuple};

mod common;

/// Opens a collector in the calling thread's namespace and runs it on a thread of its own:
/// its events, the flag that stops it, the thread.
fn start_collector() -> (
    mpsc::Receiver<KernelEvent>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let collector = Collector::open(NFLOG_GROUP).expect("collector");
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        collector.run(|batch| {
            for ev in batch {
                let _ = tx.send(ev);
            }
            !stop2.load(Ordering::Relaxed)
        })
    });
    (rx, stop, reader)
}

/// Loads table `inet malla` (the table the collector reads the lost chains of) with an output
/// chain: `rules`, then `deny`'s log rules and a drop for packets matching `what`.
fn load(rules: &mut Vec<String>, deny: &LogPoint, what: &str) {
    let mut t = malla_calc::nft::Table::new("inet", malla_calc::masquerade::TABLE);
    for r in deny.deny_rules(&mut t) {
        rules.push(format!("{what} {r}"));
    }
    rules.push(format!("{what} drop"));
    t.chains.insert(
        "out".into(),
        malla_calc::nft::Chain {
            base: Some(malla_calc::nft::BaseChain::new("filter", "output", "0")),
            rules: rules.clone(),
        },
    );
    let ruleset = malla_calc::nft::render_full(&t);
    let mut nft = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    nft.stdin
        .take()
        .unwrap()
        .write_all(ruleset.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft -f failed:\n{ruleset}");
}

#[test]
fn allowed_and_denied_connections_reach_the_collector() {
    if !common::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let name = format!("malla-flowk-{}", std::process::id());
    common::in_namespace(&name, false, || async {
        enable_accounting().unwrap();
        let allow = LogPoint::allow(Dir::Out, "t/p", 0);
        let deny = LogPoint::Deny { dir: Dir::Out };
        let mut rules = vec![
            "ct state established,related accept".to_string(),
            format!("tcp dport 7777 {} accept", allow.statement()),
        ];
        load(&mut rules, &deny, "tcp dport 7778");

        let (rx, stop, reader) = start_collector();

        let server = TcpListener::bind("198.19.0.11:7777").unwrap();
        let serve = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got.len()
        });
        let mut c = TcpStream::connect("198.19.0.11:7777").unwrap();
        let sport = c.local_addr().unwrap().port();
        c.write_all(&[7u8; 10_000]).unwrap();
        drop(c);
        assert_eq!(serve.join().unwrap(), 10_000);
        let dropped: SocketAddr = "198.19.0.11:7778".parse().unwrap();
        assert!(TcpStream::connect_timeout(&dropped, Duration::from_millis(300)).is_err());

        let mut order = Vec::new();
        let mut bytes_out = None;
        let mut denied = false;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && (bytes_out.is_none() || !denied) {
            let Ok(ev) = rx.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            match ev {
                KernelEvent::Log(s) if s.orig.dport == 7777 && s.orig.sport == sport => {
                    assert_eq!(s.point, allow);
                    order.push("allow");
                }
                KernelEvent::Log(s) if s.orig.dport == 7778 => {
                    assert_eq!(s.point, deny);
                    denied = true;
                }
                KernelEvent::Conn(c) if c.orig.dport == 7777 && c.orig.sport == sport => {
                    match c.phase {
                        Phase::New => order.push("new"),
                        // TIME_WAIT keeps the entry (and its DESTROY) for two minutes: the
                        // periodic reading sees it closed with its counters.
                        Phase::Update | Phase::Destroy if c.closed || c.phase == Phase::Destroy => {
                            if bytes_out.is_none() {
                                order.push("end");
                                bytes_out = c.orig_counters.map(|x| x.bytes);
                            }
                        }
                        Phase::Update | Phase::Destroy => {}
                    }
                }
                _ => {}
            }
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(order, ["allow", "new", "end"]);
        assert!(denied, "no deny sample");
        let b = bytes_out.expect("counters on DESTROY");
        // 10 000 bytes of payload plus the headers of a handful of segments.
        assert!((10_000..12_000).contains(&b), "{b} bytes");
        reader.join().unwrap();
    });
}

/// The periodic counter reading asks for the open connections alone ([`Refresh::Tuples`]):
/// an open connection's entry comes back with the bytes sent so far; a tuple the table does not
/// hold yields nothing (and no error).
#[test]
fn open_connections_are_read_one_by_one() {
    if !common::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let name = format!("malla-flowg-{}", std::process::id());
    common::in_namespace(&name, false, || async {
        enable_accounting().unwrap();
        // A ruleset using conntrack, so that the namespace tracks connections.
        let mut rules = vec!["ct state established,related accept".to_string()];
        load(
            &mut rules,
            &LogPoint::Deny { dir: Dir::Out },
            "tcp dport 7778",
        );
        let server = TcpListener::bind("198.19.0.11:7779").unwrap();
        let mut c = TcpStream::connect("198.19.0.11:7779").unwrap();
        let (mut s, _) = server.accept().unwrap();
        c.write_all(&[1u8; 5000]).unwrap();
        let mut got = vec![0u8; 5000];
        s.read_exact(&mut got).unwrap();
        let open = Tuple {
            proto: 6,
            src: c.local_addr().unwrap().ip(),
            dst: "198.19.0.11".parse().unwrap(),
            sport: c.local_addr().unwrap().port(),
            dport: 7779,
        };
        let gone = Tuple { sport: 1, ..open };
        let collector = Collector::open(NFLOG_GROUP).expect("collector");
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = std::thread::spawn(move || {
            collector.run_refreshing(
                |batch| {
                    for ev in batch {
                        let _ = tx.send(ev);
                    }
                    !stop2.load(Ordering::Relaxed)
                },
                || Refresh::Tuples(vec![gone, open]),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut read = None;
        while Instant::now() < deadline && read.is_none() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(KernelEvent::Conn(e)) if e.phase == Phase::Update => {
                    assert_eq!(e.orig, open, "only the open connection is read");
                    read = e.orig_counters;
                }
                _ => {}
            }
        }
        stop.store(true, Ordering::Relaxed);
        let read = read.expect("the open connection's counters");
        assert!((5000..6000).contains(&read.bytes), "{read:?}");
        assert!(!c.peer_addr().unwrap().ip().is_unspecified());
        drop((c, s));
        reader.join().unwrap();
    });
}

/// A burst of denied datagrams far beyond the deny log's limit (1000/s, burst 200): every one
/// is either logged (a sample) or counted in the lost chain (delivered as lost, `rate-limit`),
/// none vanishes.
#[test]
fn denied_datagrams_beyond_the_log_limit_are_counted_lost() {
    if !common::is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let name = format!("malla-flowl-{}", std::process::id());
    common::in_namespace(&name, false, || async {
        let deny = LogPoint::Deny { dir: Dir::Out };
        load(&mut Vec::new(), &deny, "udp dport 20000-29999");
        let (rx, stop, reader) = start_collector();
        // The collector's first reading of the counters is its base: let it happen first.
        std::thread::sleep(Duration::from_millis(300));
        const SENT: u64 = 5000;
        let sock = std::net::UdpSocket::bind("198.19.0.11:0").unwrap();
        let mut refused = 0;
        for i in 0..SENT {
            let port = 20000 + (i % 10_000) as u16;
            if sock.send_to(&[1u8; 8], ("198.19.0.11", port)).is_err() {
                refused += 1;
            }
        }
        assert_eq!(refused, SENT, "the drop answers EPERM to each datagram");
        let (mut logged, mut lost_rate, mut lost_other) = (0u64, 0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && logged + lost_rate + lost_other < SENT {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(KernelEvent::Log(s)) if s.point == deny => logged += 1,
                Ok(KernelEvent::Lost(malla_flows::LostReason::RateLimit, n)) => lost_rate += n,
                Ok(KernelEvent::Lost(_, n)) => lost_other += n,
                _ => {}
            }
        }
        stop.store(true, Ordering::Relaxed);
        eprintln!(
            "{SENT} denied: {logged} logged, {lost_rate} over the limit, {lost_other} overrun"
        );
        assert_eq!(logged + lost_rate + lost_other, SENT);
        assert!(
            lost_rate > 0 && logged >= 200,
            "{logged} logged, {lost_rate} lost"
        );
        reader.join().unwrap();
    });
}
