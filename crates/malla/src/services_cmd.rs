//! `malla services`: this node's programmed services — frontends, the endpoints each one
//! dispatches to, and per-endpoint counters of new connections read from the kernel.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::Args;
use malla_dataplane::netns::NetNs;

#[derive(Args)]
pub struct ServicesArgs {
    /// The node whose view to show.
    #[arg(long)]
    node: String,
    /// Datastore file (default: the lab's).
    #[arg(long)]
    datastore: Option<malla_store::DatastoreSpec>,
    /// Read the lab of this name (and its node's namespace for counters).
    #[arg(long, env = "MALLA_LAB", default_value = "demo")]
    lab: String,
    /// table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

/// Packet counters of the `ep-*` chains' DNAT rules: new connections per endpoint chain.
fn counters(netns: Option<&NetNs>) -> BTreeMap<String, u64> {
    let Ok(text) = malla_dataplane::nft::run(netns, &["-j", "list", "table", "inet", "malla"], "")
    else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    let mut out = BTreeMap::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let rule = &item["rule"];
        let Some(chain) = rule["chain"].as_str().filter(|c| c.starts_with("ep-")) else {
            continue;
        };
        for e in rule["expr"].as_array().into_iter().flatten() {
            if let Some(p) = e["counter"]["packets"].as_u64() {
                *out.entry(chain.to_string()).or_default() += p;
            }
        }
    }
    out
}

pub fn run(a: ServicesArgs) -> anyhow::Result<()> {
    let netns = match &a.datastore {
        Some(_) => None,
        None => {
            let paths = malla_lab::LabPaths::new(&a.lab, crate::lab_cmd::state_root().as_deref())?;
            let state = malla_lab::LabState::require(&paths)?;
            let node = state
                .node(&a.node)
                .with_context(|| format!("--node: no node {:?} in lab {}", a.node, a.lab))?;
            Some(NetNs::open_named(&node.netns)?)
        }
    };
    let store = crate::lab_cmd::open_store(a.datastore.as_ref(), &a.lab)?;
    let view = malla_agent::read_view(&*store)?;
    let map = malla_calc::compute(&view, &a.node).service_map;
    let counts = counters(netns.as_ref());
    if a.output == "json" {
        let entries: Vec<serde_json::Value> = map
            .entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                v["connections"] = serde_json::json!(e
                    .cluster_endpoints
                    .iter()
                    .map(|ep| (
                        format!("{}:{}", ep.ip, ep.port),
                        counts
                            .get(&malla_calc::services::ep_chain(e, ep))
                            .copied()
                            .unwrap_or(0)
                    ))
                    .collect::<BTreeMap<_, _>>());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<6} {:<30} {:<8} ENDPOINTS (new connections)",
        "SERVICE", "PROTO", "FRONTENDS", "NODEPORT"
    );
    for e in &map.entries {
        let frontends: Vec<String> = e
            .frontends
            .iter()
            .map(|f| format!("{}:{}", f.ip, f.port))
            .collect();
        let eps: Vec<String> = e
            .cluster_endpoints
            .iter()
            .map(|ep| {
                let n = counts
                    .get(&malla_calc::services::ep_chain(e, ep))
                    .copied()
                    .unwrap_or(0);
                let local = if e.local_endpoints.contains(ep) {
                    "*"
                } else {
                    ""
                };
                format!("{}:{}{local} ({n})", ep.ip, ep.port)
            })
            .collect();
        let name = if e.port_name.is_empty() {
            e.service.clone()
        } else {
            format!("{}:{}", e.service, e.port_name)
        };
        println!(
            "{:<28} {:<6} {:<30} {:<8} {}",
            name,
            e.protocol.nft(),
            frontends.join(","),
            e.node_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            if eps.is_empty() {
                "none (rejects)".to_string()
            } else {
                eps.join(" ")
            }
        );
    }
    println!("(* = on this node)");
    Ok(())
}
