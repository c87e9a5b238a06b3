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
use malla_dataplane::flows::{enable_accounting, Collector};
use malla_flows::{KernelEvent, Phase};

mod common;

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
        let ruleset = format!(
            "table inet flowtest {{\n chain out {{\n type filter hook output priority 0; policy accept;\n \
             ct state established,related accept\n \
             tcp dport 7777 {} accept\n \
             tcp dport 7778 {}\n tcp dport 7778 drop\n }}\n}}\n",
            allow.statement(),
            deny.deny_rule()
        );
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
