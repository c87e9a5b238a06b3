//! `malla services`: this node's programmed services — frontends, the endpoints each one
//! dispatches to, and per-endpoint counters of new connections read from the kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Context;
use clap::Args;
use malla_calc::nft;
use malla_calc::services::{self, ServiceEndpoint, ServiceEntry};
use malla_dataplane::netns::NetNs;

#[derive(Args)]
pub struct ServicesArgs {
    /// The node whose view to show.
    #[arg(long)]
    node: String,
    #[command(flatten)]
    store: crate::lab_cmd::StoreArgs,
    /// table or json.
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

/// New connections per endpoint, read from the kernel's counters.
#[derive(Default)]
struct Counters {
    /// Packet counters of the `ep-*` chains' DNAT rules (services with session affinity), by
    /// chain.
    chains: BTreeMap<String, u64>,
    /// Per-element counters of the `endpoints-*` DNAT maps: by map and index, the endpoint
    /// address, port and packets.
    maps: BTreeMap<(String, u64), (IpAddr, u64, u64)>,
}

impl Counters {
    /// New connections of entry `e` to endpoint `ep`, over every path that can DNAT to it:
    /// its dispatch chains' slots in the endpoint maps (found in the table `t` of the same
    /// view), or its affinity chain.
    fn get(&self, t: &nft::Table, e: &ServiceEntry, ep: &ServiceEndpoint) -> u64 {
        let chain = self
            .chains
            .get(&services::ep_chain(e, ep))
            .copied()
            .unwrap_or(0);
        let mut maps = 0;
        for c in [services::svc_chain(e), services::local_chain(e)] {
            let Some((map, off, n)) = services::dispatch_slots(t, &c) else {
                continue;
            };
            for i in u64::from(off)..u64::from(off) + u64::from(n) {
                if let Some((ip, port, p)) = self.maps.get(&(map.clone(), i)) {
                    if *ip == ep.ip && *port == u64::from(ep.port) {
                        maps += p;
                    }
                }
            }
        }
        chain + maps
    }
}

fn counters(netns: Option<&NetNs>) -> Counters {
    let mut out = Counters::default();
    let Ok(text) = malla_dataplane::nft::run(netns, &["-j", "list", "table", "inet", "malla"], "")
    else {
        return out;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return out;
    };
    for item in v["nftables"].as_array().into_iter().flatten() {
        let map = &item["map"];
        if let Some(name) = map["name"].as_str().filter(|n| n.starts_with("endpoints-")) {
            for el in map["elem"].as_array().into_iter().flatten() {
                let index = el[0]["elem"]["val"].as_u64();
                let packets = el[0]["elem"]["counter"]["packets"].as_u64();
                let ip = el[1]["concat"][0].as_str().and_then(|s| s.parse().ok());
                let port = el[1]["concat"][1].as_u64();
                if let (Some(i), Some(p), Some(ip), Some(port)) = (index, packets, ip, port) {
                    out.maps.insert((name.to_string(), i), (ip, port, p));
                }
            }
            continue;
        }
        let rule = &item["rule"];
        let Some(chain) = rule["chain"].as_str().filter(|c| c.starts_with("ep-")) else {
            continue;
        };
        for e in rule["expr"].as_array().into_iter().flatten() {
            if let Some(p) = e["counter"]["packets"].as_u64() {
                *out.chains.entry(chain.to_string()).or_default() += p;
            }
        }
    }
    out
}

pub fn run(a: ServicesArgs) -> anyhow::Result<()> {
    let netns = match &a.store.datastore {
        Some(_) => None,
        None => {
            let paths =
                malla_lab::LabPaths::new(&a.store.lab, crate::lab_cmd::state_root().as_deref())?;
            let state = malla_lab::LabState::require(&paths)?;
            let node = state
                .node(&a.node)
                .with_context(|| format!("--node: no node {:?} in lab {}", a.node, a.store.lab))?;
            Some(NetNs::open_named(&node.netns)?)
        }
    };
    let store = a.store.open()?;
    let view = malla_agent::read_view(&*store)?;
    let dp = malla_calc::compute(&view, &a.node);
    let (map, table) = (dp.service_map, dp.nft_table);
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
                    .map(|ep| (format!("{}:{}", ep.ip, ep.port), counts.get(&table, e, ep)))
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
                let n = counts.get(&table, e, ep);
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
