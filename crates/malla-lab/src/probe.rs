//! Reachability probes. The server runs in a pod (or `external`), listens on the declared ports
//! for TCP and UDP, and answers `<name> <source address it saw>`; the client runs each probe
//! from inside the source namespace and records what it used and what the server saw, which is
//! how the lab proves "no NAT" (they are equal) and masquerade (they are not).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use malla_dataplane::netns::NetNs;
use serde::Serialize;

use crate::state::{LabState, PortSpec};

/// Parses `80/tcp,53/udp`.
pub fn parse_listen(s: &str) -> anyhow::Result<Vec<PortSpec>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (port, proto) = p.split_once('/').unwrap_or((p, "tcp"));
            let port: u16 = port.parse().with_context(|| format!("port {port:?}"))?;
            anyhow::ensure!(
                proto == "tcp" || proto == "udp",
                "protocol {proto:?} is not tcp or udp"
            );
            Ok(PortSpec {
                name: None,
                port,
                protocol: proto.to_string(),
            })
        })
        .collect()
}

fn answer(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

/// Runs the probe server until killed. Writes `ready_file` once every socket is bound.
pub fn serve(name: &str, listen: &[PortSpec], ready_file: Option<&Path>) -> anyhow::Result<()> {
    let any: IpAddr = "::".parse()?;
    let mut handles = Vec::new();
    for spec in listen {
        let addr = SocketAddr::new(any, spec.port);
        let name = name.to_string();
        if spec.protocol == "tcp" {
            let l = TcpListener::bind(addr).with_context(|| format!("binding tcp {addr}"))?;
            handles.push(std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(mut s) = conn else { continue };
                    if let Ok(peer) = s.peer_addr() {
                        let _ = s.write_all(answer(&name, peer).as_bytes());
                    }
                }
            }));
        } else {
            let u = UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}"))?;
            handles.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                loop {
                    if let Ok((_, peer)) = u.recv_from(&mut buf) {
                        let _ = u.send_to(answer(&name, peer).as_bytes(), peer);
                    }
                }
            }));
        }
    }
    if let Some(f) = ready_file {
        std::fs::write(f, "ready\n")?;
    }
    if handles.is_empty() {
        // No ports (a kubelet pod's container): stay, as a pod's process does.
        loop {
            std::thread::park();
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// One probe to run.
#[derive(Debug, Clone)]
pub struct Probe {
    pub from: String,
    pub from_netns: String,
    pub to: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
}

/// What a probe found (printed by `lab probe -o json|yaml` with camelCase keys).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    pub from: String,
    pub to: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub connected: bool,
    /// The server (pod `namespace/name`, or `external`) that answered.
    pub answered_by: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub seen_source_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeResult {
    /// The server saw the client's own address: no NAT on the path.
    pub fn no_nat(&self) -> bool {
        self.connected && self.client_ip.is_some() && self.client_ip == self.seen_source_ip
    }
}

fn probe_once(p: &Probe, timeout: Duration) -> ProbeResult {
    let mut r = ProbeResult {
        from: p.from.clone(),
        to: p.to.clone(),
        ip: p.ip,
        port: p.port,
        protocol: p.protocol.clone(),
        connected: false,
        answered_by: None,
        client_ip: None,
        seen_source_ip: None,
        error: None,
    };
    let target = SocketAddr::new(p.ip, p.port);
    let outcome: anyhow::Result<(IpAddr, String)> = (|| {
        if p.protocol == "tcp" {
            let mut s = TcpStream::connect_timeout(&target, timeout)?;
            let local = s.local_addr()?.ip();
            s.set_read_timeout(Some(timeout))?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok((local, buf))
        } else {
            let bind: SocketAddr = if p.ip.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()?;
            let u = UdpSocket::bind(bind)?;
            u.connect(target)?;
            let local = u.local_addr()?.ip();
            u.set_read_timeout(Some(timeout))?;
            u.send(b"probe\n")?;
            let mut buf = [0u8; 512];
            let n = u.recv(&mut buf)?;
            Ok((local, String::from_utf8_lossy(&buf[..n]).into_owned()))
        }
    })();
    match outcome {
        Ok((local, reply)) => {
            r.client_ip = Some(local);
            let mut parts = reply.split_whitespace();
            r.answered_by = parts.next().map(str::to_string);
            r.seen_source_ip = parts.next().and_then(|s| s.parse().ok());
            r.connected = r.answered_by.is_some();
            if !r.connected {
                r.error = Some("empty answer".into());
            }
        }
        Err(e) => r.error = Some(in_words(&e, &p.protocol, timeout)),
    }
    r
}

/// A probe's failure in words: what a user would call it, without raw `(os error N)` codes.
fn in_words(e: &anyhow::Error, protocol: &str, timeout: Duration) -> String {
    use std::io::ErrorKind;
    let ms = timeout.as_millis();
    match e.downcast_ref::<std::io::Error>().map(std::io::Error::kind) {
        Some(ErrorKind::WouldBlock | ErrorKind::TimedOut) if protocol == "udp" => {
            format!("no answer within {ms} ms (dropped, or nothing listening)")
        }
        Some(ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            format!("no connection within {ms} ms (dropped)")
        }
        Some(ErrorKind::ConnectionRefused) => "connection refused (rejected)".into(),
        Some(ErrorKind::HostUnreachable) => "host unreachable".into(),
        Some(ErrorKind::NetworkUnreachable) => "network unreachable".into(),
        Some(ErrorKind::ConnectionReset) => "connection reset".into(),
        _ => {
            let text = e.to_string();
            match text.find(" (os error ") {
                Some(i) => text[..i].to_string(),
                None => text,
            }
        }
    }
}

/// Threads probing from one source namespace at once (a denied probe waits for its timeout).
pub const THREADS_PER_SOURCE: usize = 8;

/// Runs probes from inside their source namespaces, several threads per source, and returns
/// the results in the order given.
pub fn run(probes: Vec<Probe>, timeout: Duration) -> anyhow::Result<Vec<ProbeResult>> {
    let mut by_source: BTreeMap<String, Vec<(usize, Probe)>> = BTreeMap::new();
    for (i, p) in probes.into_iter().enumerate() {
        by_source
            .entry(p.from_netns.clone())
            .or_default()
            .push((i, p));
    }
    let mut threads = Vec::new();
    for (netns, list) in by_source {
        let lanes = THREADS_PER_SOURCE.min(list.len()).max(1);
        let mut chunks: Vec<Vec<(usize, Probe)>> = (0..lanes).map(|_| Vec::new()).collect();
        // Repeats of one target (`--count`) stay in one lane, in order: session affinity and
        // spread are about successive connections.
        let mut lane_of: BTreeMap<(String, IpAddr, u16, String), usize> = BTreeMap::new();
        for (i, p) in list {
            let key = (p.to.clone(), p.ip, p.port, p.protocol.clone());
            let next = lane_of.len() % lanes;
            let lane = *lane_of.entry(key).or_insert(next);
            chunks[lane].push((i, p));
        }
        for chunk in chunks {
            let ns = NetNs::open_named(&netns)?;
            threads.push(std::thread::spawn(move || {
                ns.enter_this_thread()?;
                anyhow::Ok(
                    chunk
                        .into_iter()
                        .map(|(i, p)| (i, probe_once(&p, timeout)))
                        .collect::<Vec<_>>(),
                )
            }));
        }
    }
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("probe thread panicked"))??,
        );
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}

/// Which probes to run.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub from: Option<String>,
    pub to: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
    /// Separate connections per source and target (to see load spread and affinity); 0 = 1.
    pub count: usize,
}

impl Filter {
    fn keep(&self, p: &Probe) -> bool {
        self.from.as_ref().is_none_or(|f| *f == p.from)
            && self.to.as_ref().is_none_or(|t| *t == p.to)
            && self.port.is_none_or(|port| port == p.port)
            && self
                .protocol
                .as_ref()
                .is_none_or(|pr| pr.eq_ignore_ascii_case(&p.protocol))
    }
}

/// A filter that matches nothing is a mistake (a typo, a Service that does not exist): say which
/// filter and what it could have been.
fn check_filter(filter: &Filter, all: &[Probe]) -> anyhow::Result<()> {
    fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
        let set: std::collections::BTreeSet<&String> = it.collect();
        let mut v: Vec<&str> = set.iter().map(|s| s.as_str()).take(12).collect();
        if set.len() > 12 {
            v.push("…");
        }
        if v.is_empty() {
            "none: the lab has no pods yet".into()
        } else {
            v.join(", ")
        }
    }
    if let Some(f) = &filter.from {
        anyhow::ensure!(
            all.iter().any(|p| p.from == *f),
            "--from {f:?} matches no source (sources: {})",
            names(all.iter().map(|p| &p.from))
        );
    }
    if let Some(t) = &filter.to {
        anyhow::ensure!(
            all.iter().any(|p| p.to == *t),
            "--to {t:?} matches no destination (destinations: {})",
            names(all.iter().map(|p| &p.to))
        );
    }
    if let Some(pr) = &filter.protocol {
        anyhow::ensure!(
            pr.eq_ignore_ascii_case("tcp") || pr.eq_ignore_ascii_case("udp"),
            "--protocol {pr:?}: expected tcp or udp"
        );
    }
    if !all.iter().any(|p| filter.keep(p)) {
        let mut given = Vec::new();
        if let Some(f) = &filter.from {
            given.push(format!("--from {f}"));
        }
        if let Some(t) = &filter.to {
            given.push(format!("--to {t}"));
        }
        if let Some(p) = filter.port {
            given.push(format!("--port {p}"));
        }
        if let Some(p) = &filter.protocol {
            given.push(format!("--protocol {p}"));
        }
        anyhow::bail!(
            "{} together match no probe{}",
            if given.is_empty() {
                "the lab has nothing to probe:".to_string()
            } else {
                given.join(" ")
            },
            if given.is_empty() {
                " (apply some pods)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// At most this many probes per run.
pub const MAX_PROBES: usize = 20_000;

/// Every pod→pod pair on every declared port, protocol and shared address family; node→pod for
/// the node's own pods; pod→external; services; asked for by name (`--to node/NAME`), a node's
/// own ports from every pod, other node and `external`.
pub fn plan(state: &LabState, filter: &Filter) -> anyhow::Result<Vec<Probe>> {
    let mut out = Vec::new();
    let pods: Vec<_> = state.pods.values().collect();
    let families = |ips: &[IpAddr], target: &[IpAddr]| -> Vec<IpAddr> {
        target
            .iter()
            .filter(|t| ips.iter().any(|s| s.is_ipv4() == t.is_ipv4()))
            .copied()
            .collect()
    };
    for src in &pods {
        for dst in &pods {
            if src.key() == dst.key() {
                continue;
            }
            for ip in families(&src.ips, &dst.ips) {
                for port in &dst.ports {
                    out.push(Probe {
                        from: src.key(),
                        from_netns: src.netns.clone(),
                        to: dst.key(),
                        ip,
                        port: port.port,
                        protocol: port.protocol.clone(),
                    });
                }
            }
        }
    }
    for node in &state.nodes {
        for dst in pods.iter().filter(|p| p.node == node.name) {
            for ip in &dst.ips {
                for port in &dst.ports {
                    out.push(Probe {
                        from: format!("node/{}", node.name),
                        from_netns: node.netns.clone(),
                        to: dst.key(),
                        ip: *ip,
                        port: port.port,
                        protocol: port.protocol.clone(),
                    });
                }
            }
        }
    }
    let ext = &state.external;
    let ext_ips: Vec<IpAddr> = std::iter::once(IpAddr::V4(ext.ipv4))
        .chain(ext.ipv6.map(IpAddr::V6))
        .collect();
    for src in &pods {
        for ip in families(&src.ips, &ext_ips) {
            for proto in ["tcp", "udp"] {
                out.push(Probe {
                    from: src.key(),
                    from_netns: src.netns.clone(),
                    to: "external".into(),
                    ip,
                    port: ext.port,
                    protocol: proto.into(),
                });
            }
        }
    }
    // In a BGP lab the outside routes to pods (the router learned their blocks): external→pod,
    // asked for with `--from external`, with no NAT on the way in.
    if state.routing == malla_api::RoutingMode::Bgp && filter.from.as_deref() == Some("external") {
        for dst in &pods {
            for ip in families(&ext_ips, &dst.ips) {
                for port in &dst.ports {
                    out.push(Probe {
                        from: "external".into(),
                        from_netns: ext.netns.clone(),
                        to: dst.key(),
                        ip,
                        port: port.port,
                        protocol: port.protocol.clone(),
                    });
                }
            }
        }
    }
    // ... and to every Service's LoadBalancer and external IPs (announced by the nodes).
    if state.routing == malla_api::RoutingMode::Bgp && filter.from.as_deref() == Some("external") {
        for svc in state.services.values() {
            for sp in svc.ports.iter().filter(|p| p.protocol.nft() != "sctp") {
                for ip in svc.load_balancer_ips.iter().chain(&svc.external_ips) {
                    if !ext_ips.iter().any(|e| e.is_ipv4() == ip.is_ipv4()) {
                        continue;
                    }
                    out.push(Probe {
                        from: "external".into(),
                        from_netns: ext.netns.clone(),
                        to: format!("svc/{}/{}", svc.namespace, svc.name),
                        ip: *ip,
                        port: sp.port,
                        protocol: sp.protocol.nft().into(),
                    });
                }
            }
        }
    }
    // A node's own ports, asked for by name (`--to node/NAME`: `--port`, else the ports its
    // host-network pods declare), from every pod, every other node and `external`.
    let external = || {
        (
            String::from("external"),
            state.external.netns.clone(),
            ext_ips.clone(),
        )
    };
    let node_source = |n: &crate::state::NodeState| {
        let ips = std::iter::once(IpAddr::V4(n.underlay_ipv4))
            .chain(n.underlay_ipv6.map(IpAddr::V6))
            .collect::<Vec<_>>();
        (format!("node/{}", n.name), n.netns.clone(), ips)
    };
    let target_node = filter
        .to
        .as_deref()
        .and_then(|t| t.strip_prefix("node/"))
        .and_then(|n| state.node(n));
    if let Some(node) = target_node {
        let ports: Vec<(u16, String)> = match filter.port {
            Some(p) => vec![(p, "tcp".into()), (p, "udp".into())],
            None => pods
                .iter()
                .filter(|p| p.host_network && p.node == node.name)
                .flat_map(|p| p.ports.iter().map(|s| (s.port, s.protocol.clone())))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let (to, _, targets) = node_source(node);
        let mut sources: Vec<(String, String, Vec<IpAddr>)> = pods
            .iter()
            .filter(|p| p.netns != node.netns)
            .map(|p| (p.key(), p.netns.clone(), p.ips.clone()))
            .collect();
        sources.extend(
            state
                .nodes
                .iter()
                .filter(|n| n.name != node.name)
                .map(node_source),
        );
        sources.push(external());
        for (from, from_netns, src_ips) in &sources {
            for ip in families(src_ips, &targets) {
                for (port, protocol) in &ports {
                    out.push(Probe {
                        from: from.clone(),
                        from_netns: from_netns.clone(),
                        to: to.clone(),
                        ip,
                        port: *port,
                        protocol: protocol.clone(),
                    });
                }
            }
        }
    }
    // Services: every ClusterIP port from every pod and node; every node port from outside.
    for svc in state.services.values() {
        for sp in &svc.ports {
            let proto = sp.protocol.nft();
            if proto == "sctp" {
                continue; // no SCTP sockets on this kernel; programmed, not probed
            }
            let to = format!("svc/{}/{}", svc.namespace, svc.name);
            for ip in &svc.cluster_ips {
                for src in &pods {
                    if src.ips.iter().any(|s| s.is_ipv4() == ip.is_ipv4()) {
                        out.push(Probe {
                            from: src.key(),
                            from_netns: src.netns.clone(),
                            to: to.clone(),
                            ip: *ip,
                            port: sp.port,
                            protocol: proto.into(),
                        });
                    }
                }
                for node in &state.nodes {
                    if ip.is_ipv4() || node.underlay_ipv6.is_some() {
                        out.push(Probe {
                            from: format!("node/{}", node.name),
                            from_netns: node.netns.clone(),
                            to: to.clone(),
                            ip: *ip,
                            port: sp.port,
                            protocol: proto.into(),
                        });
                    }
                }
            }
            if let Some(node_port) = sp.node_port {
                let families = svc
                    .cluster_ips
                    .iter()
                    .map(IpAddr::is_ipv6)
                    .collect::<Vec<_>>();
                for node in &state.nodes {
                    let mut targets = vec![IpAddr::V4(node.underlay_ipv4)];
                    if let Some(v6) = node.underlay_ipv6.filter(|_| families.contains(&true)) {
                        targets.push(IpAddr::V6(v6));
                    }
                    for ip in targets {
                        out.push(Probe {
                            from: "external".into(),
                            from_netns: state.external.netns.clone(),
                            to: format!("nodeport/{}", node.name),
                            ip,
                            port: node_port,
                            protocol: proto.into(),
                        });
                    }
                }
            }
        }
    }
    check_filter(filter, &out)?;
    out.retain(|p| filter.keep(p));
    if filter.count > 1 {
        out = out
            .into_iter()
            .flat_map(|p| std::iter::repeat_n(p, filter.count))
            .collect();
    }
    anyhow::ensure!(
        out.len() <= MAX_PROBES,
        "{} probes asked for, more than the limit of {MAX_PROBES}; narrow with --from/--to/--port/--protocol",
        out.len()
    );
    Ok(out)
}

/// A readable matrix: one row per source, one column per destination; a cell is `ok` when every
/// probe of the pair connected (`ok (nat)` when the server saw another address), `denied` when
/// the probes that did not connect are those a NetworkPolicy denies (`denied`, by index into
/// `results`), `ok/denied` when some ports are allowed and the others denied, else `FAIL n/m`.
pub fn matrix(results: &[ProbeResult], denied: &std::collections::BTreeSet<usize>) -> String {
    #[derive(Default)]
    struct Cell {
        total: usize,
        ok: usize,
        direct: usize,
        denied: usize,
    }
    let mut names: Vec<String> = Vec::new();
    let mut cols: Vec<String> = Vec::new();
    let mut cells: BTreeMap<(String, String), Cell> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        if !names.contains(&r.from) {
            names.push(r.from.clone());
        }
        if !cols.contains(&r.to) {
            cols.push(r.to.clone());
        }
        let c = cells.entry((r.from.clone(), r.to.clone())).or_default();
        c.total += 1;
        if r.connected {
            c.ok += 1;
        } else if denied.contains(&i) {
            c.denied += 1;
        }
        if r.no_nat() {
            c.direct += 1;
        }
    }
    let text = |c: &Cell| -> String {
        let failed = c.total - c.ok - c.denied;
        if failed > 0 {
            format!("FAIL {failed}/{}", c.total)
        } else if c.denied == c.total {
            "denied".into()
        } else if c.denied > 0 {
            "ok/denied".into()
        } else if c.direct == c.total {
            "ok".into()
        } else {
            "ok (nat)".into()
        }
    };
    let rendered: BTreeMap<&(String, String), String> =
        cells.iter().map(|(k, c)| (k, text(c))).collect();
    let w = names
        .iter()
        .chain(cols.iter())
        .map(|s| s.chars().count())
        .chain(rendered.values().map(|s| s.len()))
        .max()
        .unwrap_or(4)
        .max("from \\ to".len());
    let mut out = format!("{:w$}", "from \\ to");
    for c in &cols {
        out.push_str(&format!("  {c:>w$}"));
    }
    out.push('\n');
    for n in &names {
        out.push_str(&format!("{n:w$}"));
        for c in &cols {
            let cell = rendered
                .get(&(n.clone(), c.clone()))
                .cloned()
                .unwrap_or_else(|| "-".into());
            out.push_str(&format!("  {cell:>w$}"));
        }
        out.push('\n');
    }
    let ok = results.iter().filter(|r| r.connected).count();
    let failed = results.len()
        - ok
        - denied
            .iter()
            .filter(|i| **i < results.len() && !results[**i].connected)
            .count();
    out.push_str(&format!(
        "{ok}/{} probes connected, {} denied by NetworkPolicy as intended, {failed} failed\n",
        results.len(),
        results.len() - ok - failed
    ));
    out
}
