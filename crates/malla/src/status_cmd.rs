//! `malla status`: per node, what `cilium status` tells — the agent up (its process and
//! `/healthz`), in sync (`/readyz` and `malla_sync_pending_seconds`), the datastore reachable
//! from the node, the objects programmed (`malla_programmed_objects`), apply errors and the last
//! error the agent logged. In a lab it asks every node's agent inside the node's namespace; with
//! `--datastore` (on a real node) it asks this host's agent.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use malla_dataplane::netns::NetNs;
use serde::Serialize;

use crate::output::{Output, Table};
use crate::{exit, ExitWith, Globals};

#[derive(Args)]
pub struct StatusArgs {
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
    /// The agent's HTTP address (its --http-listen), in each node's namespace in a lab.
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: SocketAddr,
}

/// The answer to one HTTP GET: status code and body, or why there was none.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpAnswer {
    pub status: Option<u16>,
    pub body: String,
}

/// `GET path` on `addr`, from inside `netns` when given (on a thread of its own that enters it).
pub fn http_get(netns: Option<&str>, addr: SocketAddr, path: &str) -> HttpAnswer {
    let path = path.to_string();
    let get = move || -> std::io::Result<(u16, String)> {
        let timeout = Duration::from_secs(2);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    };
    let result = match netns {
        None => get(),
        Some(ns) => match NetNs::open_named(ns) {
            Ok(ns) => ns
                .run(get)
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string()))),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        },
    };
    match result {
        Ok((status, body)) => HttpAnswer {
            status: Some(status),
            body,
        },
        Err(e) => HttpAnswer {
            status: None,
            body: crate::globals::strip_os_error(&e.to_string()),
        },
    }
}

/// One node's status.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    /// The agent's process runs (lab: its pid; a real node: its HTTP server answers).
    pub agent_running: bool,
    pub agent_pid: Option<u32>,
    /// `/healthz` answered 200: the agent's main loop goes round.
    pub healthy: bool,
    /// `/readyz` answered 200: the first full sync is in the kernel.
    pub ready: bool,
    /// Nothing received from the datastore waits to be programmed.
    pub in_sync: bool,
    /// `malla_sync_pending_seconds`: how long the oldest unapplied change has waited.
    pub sync_pending_seconds: Option<f64>,
    /// The datastore answered a read made from the node.
    pub datastore_reachable: bool,
    /// Why the datastore did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datastore_error: Option<String>,
    /// `malla_programmed_objects` by kind (camelCase: `localWorkloads`, `routes`, …).
    pub programmed: BTreeMap<String, u64>,
    /// `malla_apply_errors_total`.
    pub apply_errors: Option<u64>,
    /// `malla_datastore_reconnects_total`.
    pub datastore_reconnects: Option<u64>,
    /// The last error or warning in the agent's log (lab), or what the agent's endpoints said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Where the agent's log is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

impl NodeStatus {
    /// Up, healthy, ready, in sync and connected to the datastore.
    pub fn ok(&self) -> bool {
        self.agent_running && self.healthy && self.ready && self.in_sync && self.datastore_reachable
    }
}

/// `malla status -o json|yaml`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The lab, when the nodes are a lab's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lab: Option<String>,
    pub datastore: String,
    pub nodes: Vec<NodeStatus>,
    /// Every node is ok.
    pub healthy: bool,
}

/// Values of the metrics we read, by name and (for labelled ones) label value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Ok(v) = value.parse::<f64>() {
            out.insert(name.to_string(), v);
        }
    }
    out
}

/// `local_workloads` → `localWorkloads` (metric labels as JSON keys).
fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The last line of `log` that reports an error or a warning, without colour codes.
pub fn last_error_in(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .map(strip_ansi)
        .find(|l| {
            l.contains(" ERROR ")
                || l.contains(" WARN ")
                || l.contains("\"level\":\"ERROR\"")
                || l.contains("\"level\":\"WARN\"")
        })
        .map(|l| l.chars().take(300).collect())
}

/// Removes ANSI escape sequences (logs written before colour was switched off for files).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Reads the datastore from inside `netns` (a child process of ours that enters it), as the
/// node's agent would reach it: `Ok` or why not, within `timeout`.
fn datastore_from(netns: Option<&str>, spec: &str, timeout: Duration) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["--datastore", spec, "ipam", "show", "-o", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        NetNs::open_named(ns)
            .and_then(|n| n.enter_on_exec(&mut cmd, false))
            .map_err(|e| e.to_string())?;
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut s) = child.stderr.take() {
                    let _ = s.read_to_string(&mut err);
                }
                return if status.success() {
                    Ok(())
                } else {
                    Err(err.trim().trim_start_matches("error: ").to_string())
                };
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs()));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Asks one node's agent (in `netns`, or on this host) how it is.
fn node_status(
    name: &str,
    netns: Option<&str>,
    pid: Option<u32>,
    log: Option<PathBuf>,
    agent: SocketAddr,
    datastore: &str,
) -> NodeStatus {
    let health = http_get(netns, agent, "/healthz");
    let ready = http_get(netns, agent, "/readyz");
    // Changes are programmed within milliseconds: a node caught mid-apply is asked again for
    // up to two seconds before it counts as behind.
    let mut m = BTreeMap::new();
    for _ in 0..10 {
        let metrics = http_get(netns, agent, "/metrics");
        m = if metrics.status == Some(200) {
            parse_metrics(&metrics.body)
        } else {
            BTreeMap::new()
        };
        if m.get("malla_sync_pending_seconds")
            .is_none_or(|p| *p == 0.0)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let programmed: BTreeMap<String, u64> = m
        .iter()
        .filter_map(|(k, v)| {
            let kind = k
                .strip_prefix("malla_programmed_objects{kind=\"")?
                .strip_suffix("\"}")?;
            Some((camel(kind), *v as u64))
        })
        .collect();
    let pending = m.get("malla_sync_pending_seconds").copied();
    let agent_running = match pid {
        Some(_) => crate::lab_cmd::pid_alive(pid),
        None => health.status.is_some(),
    };
    let (datastore_reachable, datastore_error) =
        match datastore_from(netns, datastore, Duration::from_secs(5)) {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e)),
        };
    let mut last_error = log.as_deref().and_then(last_error_in);
    if last_error.is_none() {
        for a in [&health, &ready] {
            if a.status != Some(200) {
                last_error = Some(a.body.trim().to_string());
                break;
            }
        }
    }
    NodeStatus {
        name: name.to_string(),
        agent_running,
        agent_pid: pid,
        healthy: health.status == Some(200),
        ready: ready.status == Some(200),
        in_sync: ready.status == Some(200) && pending.is_some_and(|p| p == 0.0),
        sync_pending_seconds: pending,
        datastore_reachable,
        datastore_error,
        programmed,
        apply_errors: m.get("malla_apply_errors_total").map(|v| *v as u64),
        datastore_reconnects: m.get("malla_datastore_reconnects_total").map(|v| *v as u64),
        last_error,
        log,
    }
}

/// Every node's status: the lab's nodes, or (with `--datastore`) this host's agent.
pub fn collect(g: &Globals, agent: SocketAddr) -> anyhow::Result<Status> {
    if let Some(spec) = g.spec()? {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "this-node".into());
        let node = node_status(&host, None, None, None, agent, &spec.to_string());
        return Ok(Status {
            lab: None,
            datastore: spec.to_string(),
            healthy: node.ok(),
            nodes: vec![node],
        });
    }
    let paths = g.lab_paths()?;
    let state = g.lab_state()?;
    let spec = malla_lab::store::spec(&paths, state.datastore).to_string();
    let nodes: Vec<NodeStatus> = std::thread::scope(|s| {
        let handles: Vec<_> = state
            .nodes
            .iter()
            .map(|n| {
                let spec = &spec;
                let paths = &paths;
                s.spawn(move || {
                    node_status(
                        &n.name,
                        Some(&n.netns),
                        n.agent_pid,
                        Some(paths.log(&format!("agent-{}", n.name))),
                        agent,
                        spec,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a status thread panicked"))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .context("asking the nodes")?;
    Ok(Status {
        lab: Some(paths.name.clone()),
        datastore: spec,
        healthy: nodes.iter().all(NodeStatus::ok),
        nodes,
    })
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "NO" }.into()
}

pub fn run(g: &Globals, a: StatusArgs) -> anyhow::Result<()> {
    let status = collect(g, a.agent_address)?;
    if !a.output.document(&status)? {
        if let Some(lab) = &status.lab {
            println!("lab {lab}, datastore {}", status.datastore);
        } else {
            println!("datastore {}", status.datastore);
        }
        let wide = a.output == Output::Wide;
        let mut head = vec![
            "NODE",
            "AGENT",
            "HEALTHY",
            "READY",
            "IN SYNC",
            "DATASTORE",
            "PROGRAMMED",
            "ERRORS",
            "LAST ERROR",
        ];
        if wide {
            head.insert(8, "RECONNECTS");
        }
        let mut t = Table::new(&head);
        for n in &status.nodes {
            let programmed: Vec<String> = n
                .programmed
                .iter()
                .filter(|(_, v)| **v > 0 || wide)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let mut row = vec![
                n.name.clone(),
                if n.agent_running {
                    "running"
                } else {
                    "STOPPED"
                }
                .into(),
                yes_no(n.healthy),
                yes_no(n.ready),
                match (n.in_sync, n.sync_pending_seconds) {
                    (true, _) => "yes".into(),
                    (false, Some(p)) if p > 0.0 => format!("NO ({p:.1} s behind)"),
                    (false, _) => "NO".into(),
                },
                if n.datastore_reachable {
                    "reachable".into()
                } else {
                    "UNREACHABLE".into()
                },
                if programmed.is_empty() {
                    "-".into()
                } else {
                    programmed.join(",")
                },
                n.apply_errors
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
            ];
            if wide {
                row.push(
                    n.datastore_reconnects
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "-".into()),
                );
            }
            let last = n
                .datastore_error
                .clone()
                .or_else(|| n.last_error.clone())
                .unwrap_or_else(|| "-".into());
            // The table keeps one line per node; `-o wide` and JSON carry the whole message.
            row.push(if wide || last.chars().count() <= 100 {
                last
            } else {
                format!("{}…", last.chars().take(99).collect::<String>())
            });
            t.row(row);
        }
        t.print();
        if !status.healthy {
            let lab = status
                .lab
                .as_deref()
                .map(|l| format!(" --lab {l}"))
                .unwrap_or_default();
            println!(
                "not healthy: see the agent logs{} (malla diags{lab} gathers everything)",
                status
                    .nodes
                    .iter()
                    .filter_map(|n| n.log.as_ref())
                    .next()
                    .and_then(|l| l.parent())
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default()
            );
        }
    }
    if !status.healthy {
        return Err(ExitWith(exit::FOUND_PROBLEM).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_metrics_it_needs() {
        let m = parse_metrics(
            "# HELP x\nmalla_programmed_objects{kind=\"routes\"} 5\nmalla_apply_errors_total 1\nmalla_sync_pending_seconds 0.0\n",
        );
        assert_eq!(m["malla_programmed_objects{kind=\"routes\"}"], 5.0);
        assert_eq!(m["malla_apply_errors_total"], 1.0);
        assert_eq!(m["malla_sync_pending_seconds"], 0.0);
        assert_eq!(camel("local_workloads"), "localWorkloads");
    }

    #[test]
    fn colour_codes_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m boom"),
            "2026 ERROR boom"
        );
    }
}
