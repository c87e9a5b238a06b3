//! `malla flows`: the flows every node's agent saw (`/flows`, [`malla_agent::flows`]), like
//! `hubble observe`: filtered by source, destination, namespace, verdict, policy, port and age;
//! as a table or JSON; `--follow` streams new flows as the agents observe them. A denied
//! flow's row names the `malla policy trace` command that explains it. In a lab it asks every
//! node's agent inside the node's namespace; with `--datastore` (on a real node) this host's.
//!
//! What the agents lost in the windows shown (samples beyond a deny log's rate limit, socket
//! overruns, full tables: `/flows/lost`) is said under the table (`samples lost: N (reason: n,
//! …)`; on stderr with `-o json|yaml`, so that stdout stays the document); following, each
//! second something is lost there is a line (a `malla_flows::Lost` record with `-o json`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use malla_dataplane::netns::NetNs;
use malla_flows::{Filter, Flow, Lost, LostReason, Verdict};
use serde::Serialize;

use crate::output::{Output, Table};
use crate::status_cmd::http_get;
use crate::Globals;

#[derive(Args)]
pub struct FlowsArgs {
    /// Source: namespace/name, a pod or node name, an address, or `namespace/`.
    #[arg(long)]
    from: Option<String>,
    /// Destination (or the Service addressed), in the same forms.
    #[arg(long)]
    to: Option<String>,
    /// Either end's namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// allowed, denied, spoofed or no-endpoint.
    #[arg(long)]
    verdict: Option<String>,
    /// A policy, namespace/name.
    #[arg(long)]
    policy: Option<String>,
    /// The port the client addressed.
    #[arg(long)]
    port: Option<u16>,
    /// Only flows of the last DURATION (e.g. 30s, 5m, 1h).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// Stream new flows as the agents observe them (until interrupted).
    #[arg(long, short = 'f')]
    follow: bool,
    /// Output format: table, wide, json or yaml (with --follow, json is one flow per line).
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The agent's HTTP address (its --http-listen), in each node's namespace in a lab.
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: SocketAddr,
}

/// A flow as printed: the agent's record and, for a denied one, the command explaining it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Shown {
    #[serde(flatten)]
    pub flow: Flow,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// How `malla policy trace` names a flow's end: `namespace/name` for a pod, `node/NAME` for a
/// node, else the address.
fn trace_name(p: &malla_flows::Peer) -> String {
    match (p.kind.as_str(), &p.name) {
        ("node", Some(n)) => format!("node/{n}"),
        _ => p.label(),
    }
}

/// The arguments of the `malla policy trace` that explains `f` (None for a protocol the trace
/// does not know: ICMP).
pub fn trace_args(f: &Flow) -> Option<Vec<String>> {
    let proto = f.key.proto.to_ascii_uppercase();
    if !["TCP", "UDP", "SCTP"].contains(&proto.as_str()) {
        return None;
    }
    // The port the destination pod sees (a Service's target port when one was addressed).
    let port = f
        .endpoint
        .as_deref()
        .and_then(|e| e.parse::<SocketAddr>().ok())
        .map_or(f.key.port, |e| e.port());
    Some(vec![
        "policy".into(),
        "trace".into(),
        trace_name(&f.key.src),
        trace_name(&f.key.dst),
        "--port".into(),
        port.to_string(),
        "--protocol".into(),
        proto,
    ])
}

/// A denied flow's explaining command line.
fn trace_command(f: &Flow) -> Option<String> {
    if f.key.verdict != Verdict::Denied {
        return None;
    }
    trace_args(f).map(|a| format!("malla {}", a.join(" ")))
}

/// `30s`, `5m`, `2h`, `1d` or plain seconds.
fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("--since {s:?}: expected a number with s, m, h or d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => bail!("--since {s:?}: unit {unit:?} is not s, m, h or d"),
    };
    Ok(n * mult)
}

/// The unix second `--since DURATION` names.
pub fn since(s: &str) -> anyhow::Result<u64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    Ok(now.saturating_sub(parse_duration(s)?))
}

fn filter(a: &FlowsArgs) -> anyhow::Result<Filter> {
    let verdict = match &a.verdict {
        None => None,
        Some(v) => Some(Verdict::parse(v).with_context(|| {
            format!("--verdict {v:?}: expected allowed, denied, spoofed or no-endpoint")
        })?),
    };
    let since = match &a.since {
        None => None,
        Some(s) => Some(since(s)?),
    };
    Ok(Filter {
        from: a.from.clone(),
        to: a.to.clone(),
        namespace: a.namespace.clone(),
        verdict,
        policy: a.policy.clone(),
        port: a.port,
        since,
    })
}

/// The agents to ask: (node, its namespace in a lab).
pub fn agents(g: &Globals) -> anyhow::Result<Vec<(String, Option<String>)>> {
    if g.spec()?.is_some() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this-node".into());
        return Ok(vec![(host, None)]);
    }
    let state = g.lab_state()?;
    Ok(state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), Some(n.netns.clone())))
        .collect())
}

fn row(f: &Shown, wide: bool) -> Vec<String> {
    let k = &f.flow.key;
    let time = {
        let s = f.flow.start % 86400;
        format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    };
    let to = match (&k.service, &f.flow.endpoint) {
        (Some(svc), _) => format!("{} (svc {svc})", k.dst.label()),
        (None, _) => k.dst.label(),
    };
    let mut r = vec![
        time,
        f.flow.node.clone(),
        k.src.label(),
        to,
        format!("{}/{}", k.port, k.proto),
        k.verdict.word().to_uppercase(),
        if k.policies.is_empty() {
            "-".into()
        } else {
            k.policies.join(", ")
        },
        f.flow.started.to_string(),
        format!("{}/{}", f.flow.bytes_out, f.flow.bytes_in),
    ];
    if wide {
        r.push(f.flow.endpoint.clone().unwrap_or_else(|| "-".into()));
    }
    r.push(f.trace.clone().unwrap_or_default());
    r
}

const HEAD: [&str; 9] = [
    "TIME",
    "NODE",
    "FROM",
    "TO",
    "PORT",
    "VERDICT",
    "POLICY",
    "CONNS",
    "BYTES OUT/IN",
];

fn head(wide: bool) -> Vec<&'static str> {
    let mut h = HEAD.to_vec();
    if wide {
        h.push("ENDPOINT");
    }
    h.push("EXPLAIN");
    h
}

pub fn run(g: &Globals, a: FlowsArgs) -> anyhow::Result<()> {
    let f = filter(&a)?;
    let nodes = agents(g)?;
    if a.follow {
        return follow(&nodes, &a, &f);
    }
    let (mut flows, errors) = collect(&nodes, a.agent_address, &f);
    for e in errors {
        eprintln!("{e}");
    }
    let (lost, errors) = collect_lost(&nodes, a.agent_address, f.since);
    for e in errors {
        eprintln!("{e}");
    }
    let lost_line = lost_text(&lost);
    flows.sort_by(|x, y| (x.start, &x.node).cmp(&(y.start, &y.node)));
    let shown: Vec<Shown> = flows
        .into_iter()
        .map(|flow| Shown {
            trace: trace_command(&flow),
            flow,
        })
        .collect();
    if a.output.document(&shown)? {
        eprintln!("{lost_line}");
        return Ok(());
    }
    let wide = a.output == Output::Wide;
    let mut t = Table::new(&head(wide)).right(7);
    for s in &shown {
        t.row(row(s, wide));
    }
    t.print();
    println!("{lost_line}");
    Ok(())
}

/// `samples lost: N (rate-limit: n, …)` over `lost` (several windows and nodes).
pub fn lost_text(lost: &[Lost]) -> String {
    let mut by: std::collections::BTreeMap<LostReason, u64> = Default::default();
    for l in lost {
        for (why, n) in &l.reasons {
            *by.entry(*why).or_default() += n;
        }
    }
    let total: u64 = by.values().sum();
    if total == 0 {
        return "samples lost: 0".into();
    }
    let parts: Vec<String> = by
        .iter()
        .map(|(why, n)| format!("{}: {n}", why.word()))
        .collect();
    format!("samples lost: {total} ({})", parts.join(", "))
}

/// Every node's losses in the windows ending after `since` (`/flows/lost`), and what went
/// wrong asking.
pub fn collect_lost(
    nodes: &[(String, Option<String>)],
    agent_address: SocketAddr,
    since: Option<u64>,
) -> (Vec<Lost>, Vec<String>) {
    let f = Filter {
        since,
        ..Filter::default()
    };
    let path = format!("/flows/lost{}", f.to_query());
    let mut lost = Vec::new();
    let mut errors = Vec::new();
    for (node, netns) in nodes {
        let ans = http_get(netns.as_deref(), agent_address, &path);
        // When the agent did not answer, the flows' query already said why.
        if ans.status != Some(200) {
            continue;
        }
        for line in ans.body.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Lost>(line) {
                Ok(l) => lost.push(l),
                Err(e) => errors.push(format!(
                    "node {node}: a /flows/lost line is not a loss record ({e}): {line}"
                )),
            }
        }
    }
    (lost, errors)
}

/// Every node's flows that pass `f` (`/flows`), and what went wrong asking, one line per node.
pub fn collect(
    nodes: &[(String, Option<String>)],
    agent_address: SocketAddr,
    f: &Filter,
) -> (Vec<Flow>, Vec<String>) {
    let path = format!("/flows{}", f.to_query());
    let mut flows: Vec<Flow> = Vec::new();
    let mut errors = Vec::new();
    for (node, netns) in nodes {
        let ans = http_get(netns.as_deref(), agent_address, &path);
        match ans.status {
            Some(200) => {
                for line in ans.body.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<Flow>(line) {
                        Ok(flow) => flows.push(flow),
                        Err(e) => errors.push(format!(
                            "node {node}: a /flows line is not a flow ({e}): {line}"
                        )),
                    }
                }
            }
            Some(code) => errors.push(format!(
                "node {node}: /flows answered {code}: {}",
                ans.body.trim()
            )),
            None => errors.push(format!(
                "node {node}: agent unreachable: {}",
                ans.body.trim()
            )),
        }
    }
    (flows, errors)
}

/// Streams `/flows/follow` from every node, printing each flow as it comes.
fn follow(nodes: &[(String, Option<String>)], a: &FlowsArgs, f: &Filter) -> anyhow::Result<()> {
    let path = format!("/flows/follow{}", f.to_query());
    let (tx, rx) = mpsc::channel::<(String, String)>();
    for (node, netns) in nodes {
        let addr = a.agent_address;
        let connect = move || -> std::io::Result<TcpStream> {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        };
        let stream = match netns {
            None => connect(),
            Some(ns) => NetNs::open_named(ns)
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|ns| {
                    ns.run(connect)
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                }),
        };
        let mut s = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("node {node}: agent unreachable: {e}");
                continue;
            }
        };
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")
            .with_context(|| format!("node {node}: asking to follow"))?;
        let tx = tx.clone();
        let node = node.clone();
        std::thread::spawn(move || {
            let mut body = false;
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                if !body {
                    if line.starts_with("HTTP/") && !line.contains(" 200 ") {
                        eprintln!("node {node}: {line}");
                    }
                    body = line.is_empty() || line == "\r";
                    continue;
                }
                if tx.send((node.clone(), line)).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let wide = a.output == Output::Wide;
    if !a.output.is_document() {
        println!("{}", head(wide).join("\t"));
    }
    let out = std::io::stdout();
    for (node, line) in rx {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Ok(flow) = serde_json::from_str::<Flow>(line) else {
            if let Ok(l) = serde_json::from_str::<Lost>(line) {
                let mut o = out.lock();
                if a.output.is_document() {
                    writeln!(o, "{line}")?;
                } else {
                    let s = l.start % 86400;
                    writeln!(
                        o,
                        "{:02}:{:02}:{:02}\t{node}\t{}",
                        s / 3600,
                        s / 60 % 60,
                        s % 60,
                        lost_text(std::slice::from_ref(&l))
                    )?;
                }
                o.flush()?;
                continue;
            }
            eprintln!("node {node}: {line}");
            continue;
        };
        let shown = Shown {
            trace: trace_command(&flow),
            flow,
        };
        let mut o = out.lock();
        if a.output.is_document() {
            writeln!(o, "{}", serde_json::to_string(&shown)?)?;
        } else {
            writeln!(o, "{}", row(&shown, wide).join("\t"))?;
        }
        o.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_query_strings() {
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("5m").unwrap(), 300);
        assert!(parse_duration("5 parsecs").is_err());
        let f = Filter {
            from: Some("shop/a b".into()),
            port: Some(80),
            ..Filter::default()
        };
        assert_eq!(f.to_query(), "?from=shop/a%20b&port=80");
        assert_eq!(Filter::default().to_query(), "");
    }

    #[test]
    fn losses_add_up_over_windows_and_nodes() {
        assert_eq!(lost_text(&[]), "samples lost: 0");
        let l = |why, n| Lost {
            samples: n,
            reasons: [(why, n)].into_iter().collect(),
            ..Lost::default()
        };
        assert_eq!(
            lost_text(&[
                l(LostReason::RateLimit, 5),
                l(LostReason::Overrun, 1),
                l(LostReason::RateLimit, 2)
            ]),
            "samples lost: 8 (rate-limit: 7, overrun: 1)"
        );
    }
}
