//! `malla diags`: everything a bug report needs, in one `.tar.gz` — versions, configuration,
//! the agents' logs, per node the nft ruleset, routes, links, addresses and the agent's
//! `/healthz`, `/readyz`, `/metrics`, `malla status`, and a summary of the datastore (keys per
//! kind). Only reads: every command runs inside the node's namespace, nothing is changed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::Args;
use malla_dataplane::netns::NetNs;

use crate::Globals;

#[derive(Args)]
pub struct DiagsArgs {
    /// The archive to write (default: malla-diags-<lab>-<time>.tar.gz in the current directory).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The agent's HTTP address (its --http-listen), in each node's namespace in a lab.
    #[arg(long, value_name = "ADDR", default_value = malla_agent::DEFAULT_HTTP_LISTEN)]
    agent_address: SocketAddr,
}

/// Output of a command, or what went wrong, as text for the archive.
fn command_text(netns: Option<&NetNs>, program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(ns) = netns {
        if let Err(e) = ns.enter_on_exec(&mut cmd, false) {
            return format!("(could not enter the namespace: {e})\n");
        }
    }
    match cmd.output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            if !o.status.success() || !o.stderr.is_empty() {
                s.push_str(&format!(
                    "\n({} {}: {}; {})\n",
                    program,
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ));
            }
            s
        }
        Err(e) => format!("({program} {}: {e})\n", args.join(" ")),
    }
}

fn write(root: &Path, rel: &str, text: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let p = root.join(rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))
}

/// Keys per kind (`/malla/<kind>/…`) and the total; values are left out (they may be large).
fn datastore_summary(g: &Globals) -> String {
    let store = match g.open_store() {
        Ok(s) => s,
        Err(e) => return format!("datastore unreachable: {}\n", crate::globals::in_words(&e)),
    };
    match store.list("/malla/") {
        Ok((kvs, rev)) => {
            let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
            for kv in &kvs {
                let kind = kv
                    .key
                    .trim_start_matches("/malla/")
                    .split('/')
                    .take(2)
                    .collect::<Vec<_>>();
                let kind = if kind.first() == Some(&"ipam") || kind.first() == Some(&"config") {
                    kind.join("/")
                } else {
                    kind.first().map(|s| s.to_string()).unwrap_or_default()
                };
                *by_kind.entry(kind).or_default() += 1;
            }
            let mut s = format!("revision {rev:?}, {} keys\n", kvs.len());
            for (k, n) in by_kind {
                s.push_str(&format!("{n:>8}  /malla/{k}\n"));
            }
            s
        }
        Err(e) => format!("listing the datastore failed: {e}\n"),
    }
}

/// Per node: nft ruleset, routes, links, addresses, the agent's endpoints.
fn node_files(
    root: &Path,
    dir: &str,
    netns: Option<&str>,
    agent: SocketAddr,
) -> anyhow::Result<()> {
    let ns = match netns {
        Some(n) => Some(NetNs::open_named(n).with_context(|| format!("opening namespace {n}"))?),
        None => None,
    };
    let ns = ns.as_ref();
    write(
        root,
        &format!("{dir}/nft.txt"),
        command_text(ns, "nft", &["list", "ruleset"]),
    )?;
    let mut routes = String::new();
    for fam in ["-4", "-6"] {
        routes.push_str(&format!("# ip {fam} route show table all\n"));
        routes.push_str(&command_text(
            ns,
            "ip",
            &[fam, "route", "show", "table", "all"],
        ));
    }
    write(root, &format!("{dir}/routes.txt"), routes)?;
    write(
        root,
        &format!("{dir}/links.txt"),
        command_text(ns, "ip", &["-d", "link", "show"]),
    )?;
    write(
        root,
        &format!("{dir}/addresses.txt"),
        command_text(ns, "ip", &["addr", "show"]),
    )?;
    write(
        root,
        &format!("{dir}/neighbours.txt"),
        command_text(ns, "ip", &["neigh", "show"]),
    )?;
    for (path, file) in [
        ("/healthz", "healthz.txt"),
        ("/readyz", "readyz.txt"),
        ("/metrics", "metrics.txt"),
    ] {
        let a = crate::status_cmd::http_get(netns, agent, path);
        let text = match a.status {
            Some(s) => format!("HTTP {s}\n{}", a.body),
            None => format!("no answer: {}\n", a.body),
        };
        write(root, &format!("{dir}/{file}"), text)?;
    }
    Ok(())
}

pub fn run(g: &Globals, a: DiagsArgs) -> anyhow::Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = match &g.datastore {
        Some(_) => format!("malla-diags-{stamp}"),
        None => format!("malla-diags-{}-{stamp}", g.lab),
    };
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{name}.tar.gz")));
    let tmp = tempfile::Builder::new()
        .prefix("malla-diags")
        .tempdir()
        .context("creating a temporary directory")?;
    let root = tmp.path().join(&name);
    std::fs::create_dir_all(&root)?;

    let exe = std::env::current_exe()?;
    let mut versions = format!("malla {}\n", env!("CARGO_PKG_VERSION"));
    versions.push_str(&command_text(
        None,
        exe.with_file_name("malla-cni")
            .to_str()
            .unwrap_or("malla-cni"),
        &["--version"],
    ));
    versions.push_str(&command_text(None, "uname", &["-a"]));
    versions.push_str(&command_text(None, "nft", &["--version"]));
    versions.push_str(&command_text(None, "ip", &["-V"]));
    write(&root, "versions.txt", versions)?;

    let status = crate::status_cmd::collect(g, a.agent_address);
    write(
        &root,
        "status.json",
        match &status {
            Ok(s) => serde_json::to_string_pretty(s)?,
            Err(e) => format!("{{\"error\": {:?}}}", crate::globals::in_words(e)),
        },
    )?;
    write(&root, "datastore.txt", datastore_summary(g))?;

    if g.datastore.is_some() {
        // A real node: this host's view. Logs are the container runtime's (kubectl logs).
        write(
            &root,
            "config/datastore.txt",
            format!("{}\n", g.datastore.as_deref().unwrap_or_default()),
        )?;
        for f in std::fs::read_dir("/etc/cni/net.d")
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(f.path()) {
                if f.file_name().to_string_lossy().contains("malla") {
                    write(
                        &root,
                        &format!("config/cni/{}", f.file_name().to_string_lossy()),
                        text,
                    )?;
                }
            }
        }
        write(
            &root,
            "logs/README.txt",
            "On a cluster the agent logs to its container: kubectl -n kube-system logs ds/malla\n",
        )?;
        node_files(&root, "nodes/this-node", None, a.agent_address)?;
    } else {
        let paths = g.lab_paths()?;
        let state = g.lab_state()?;
        write(&root, "config/lab.json", std::fs::read(paths.state_file())?)?;
        write(
            &root,
            "config/datastore.txt",
            format!("{}\n", malla_lab::store::spec(&paths, state.datastore)),
        )?;
        for n in &state.nodes {
            if let Ok(text) = std::fs::read_to_string(paths.conflist(&n.name)) {
                write(&root, &format!("config/{}/10-malla.conflist", n.name), text)?;
            }
        }
        let logs = paths.dir.join("logs");
        for f in std::fs::read_dir(&logs)
            .with_context(|| format!("reading {}", logs.display()))?
            .flatten()
        {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            write(
                &root,
                &format!("logs/{}", f.file_name().to_string_lossy()),
                crate::status_cmd::strip_ansi(&text),
            )?;
        }
        for n in &state.nodes {
            node_files(
                &root,
                &format!("nodes/{}", n.name),
                Some(&n.netns),
                a.agent_address,
            )?;
        }
    }

    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(tmp.path())
        .arg(&name)
        .output()
        .context("running tar")?;
    anyhow::ensure!(
        tar.status.success(),
        "tar -czf {}: {}",
        out.display(),
        String::from_utf8_lossy(&tar.stderr).trim()
    );
    println!("wrote {}", out.display());
    Ok(())
}
