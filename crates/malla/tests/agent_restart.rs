//! An agent killed with SIGKILL and restarted while a long TCP stream runs between pods on two
//! nodes: the stream survives, and no route or address is removed and re-added.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Lab;
use malla_dataplane::netns::NetNs;

const STREAM_PORT: u16 = 9100;

fn restart_keeps_stream(routing: &str) {
    let lab = Lab::new(&format!("r{}", &routing[..1]));
    lab.run(&["lab", "up", "--nodes", "2", "--routing", routing]);
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
    let pids: Vec<u64> = state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_u64().unwrap())
        .collect();

    // The sink counts every byte until EOF.
    let sink_ns = NetNs::open_named(&lab.netns("pod-default-sink")).unwrap();
    let listener_ready = std::sync::Arc::new(std::sync::Barrier::new(2));
    let ready = listener_ready.clone();
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        sink_ns.enter_this_thread().expect("enter sink netns");
        let l = TcpListener::bind(("0.0.0.0", STREAM_PORT))?;
        ready.wait();
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 65536];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    listener_ready.wait();

    // The sender writes paced chunks for a few seconds on one connection.
    let sender_ns = NetNs::open_named(&lab.netns("pod-default-sender")).unwrap();
    let sender = std::thread::spawn(move || -> std::io::Result<u64> {
        sender_ns.enter_this_thread().expect("enter sender netns");
        let mut s = TcpStream::connect_timeout(
            &SocketAddr::new(sink_ip, STREAM_PORT),
            Duration::from_secs(2),
        )?;
        let chunk = vec![0x5au8; 16384];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(6) {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
            std::thread::sleep(Duration::from_millis(5));
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    std::thread::sleep(Duration::from_millis(800));

    // Watch both nodes' routes, addresses and neighbours while the agents die and come back.
    let monitors: Vec<_> = ["node-1", "node-2"]
        .iter()
        .map(|n| {
            Command::new("ip")
                .args(["-n", &lab.netns(n), "monitor", "route", "address", "neigh"])
                .stdout(Stdio::piped())
                .spawn()
                .expect("ip monitor")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for pid in &pids {
        assert!(Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    std::thread::sleep(Duration::from_millis(700));
    // `lab up` is idempotent: it restarts the dead agents and waits until they are in sync.
    lab.run(&["lab", "up", "--nodes", "2", "--routing", routing]);
    let new_pids: Vec<u64> = lab.state()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["agent_pid"].as_u64().unwrap())
        .collect();
    assert!(
        pids.iter().zip(&new_pids).all(|(a, b)| a != b),
        "agents were restarted: {pids:?} -> {new_pids:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));

    let mut changes = String::new();
    for mut m in monitors {
        let _ = m.kill();
        let mut out = String::new();
        m.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let _ = m.wait();
        changes.push_str(&out);
    }
    let sent = sender
        .join()
        .unwrap()
        .expect("the stream survived the restart");
    let received = sink.join().unwrap().expect("sink read to EOF");
    assert_eq!(sent, received, "every byte arrived");
    assert!(sent > 1_000_000, "the stream ran: {sent} bytes");
    let deleted: Vec<&str> = changes
        .lines()
        .filter(|l| {
            l.starts_with("Deleted")
                && !l.contains("STALE")
                && !l.contains("REACHABLE")
                && !l.contains("DELAY")
                && !l.contains("PROBE")
        })
        .collect();
    assert!(
        deleted.is_empty(),
        "kernel objects were removed during the restart:\n{}",
        deleted.join("\n")
    );
}

#[test]
fn agent_restart_keeps_stream_direct() {
    restart_keeps_stream("direct");
}

#[test]
fn agent_restart_keeps_stream_vxlan() {
    restart_keeps_stream("vxlan");
}
