//! `malla services`: this node's programmed services — frontends, the endpoints each one
//! dispatches to, new connections per service (the kernel's counters on its frontends) and
//! per endpoint the translated flows conntrack holds, and in JSON the pod behind each endpoint.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use anyhow::Context;
use clap::Args;
use malla_calc::masquerade;
use malla_calc::services::{self, IpFamily, ServiceEndpoint, ServiceEntry};
use malla_dataplane::conntrack::{self, DnatFlow};
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

/// What the kernel counts for this node's services.
#[derive(Default)]
struct Counters {
    /// New connections per frontend: the element counters of `service-ips-…` (keys
    /// `addr . proto . port`) and `service-nodeports-…` (`proto . port`), by map and key.
    frontends: BTreeMap<(String, String), u64>,
    /// The translated flows conntrack holds (open, or closed within its timeouts).
    flows: Vec<DnatFlow>,
}

impl Counters {
    fn read(netns: Option<&NetNs>) -> Self {
        let mut frontends = BTreeMap::new();
        let families = [IpFamily::IPv4, IpFamily::IPv6];
        let maps = families
            .iter()
            .flat_map(|&f| [services::service_ips_map(f), services::node_ports_map(f)]);
        for map in maps {
            let args = ["-j", "list", "map", "inet", masquerade::TABLE, &map];
            let Ok(text) = malla_dataplane::nft::run(netns, &args, "") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let elements = v["nftables"].as_array().into_iter().flatten();
            for el in elements.flat_map(|i| i["map"]["elem"].as_array().into_iter().flatten()) {
                let key = el[0]["elem"]["val"]["concat"].as_array().map(|parts| {
                    parts
                        .iter()
                        .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                        .collect::<Vec<_>>()
                        .join(" . ")
                });
                if let (Some(key), Some(n)) = (key, el[0]["elem"]["counter"]["packets"].as_u64()) {
                    frontends.insert((map.clone(), key), n);
                }
            }
        }
        let flows = match netns {
            Some(ns) => ns.run(conntrack::dnat_flows).ok().and_then(Result::ok),
            None => conntrack::dnat_flows().ok(),
        };
        Counters {
            frontends,
            flows: flows.unwrap_or_default(),
        }
    }

    /// New connections to entry `e`, over all its frontends and its node port.
    fn new_connections(&self, e: &ServiceEntry) -> u64 {
        let count = |map: String, key: String| self.frontends.get(&(map, key)).copied();
        let frontends: u64 = e
            .frontends
            .iter()
            .filter_map(|f| {
                count(
                    services::service_ips_map(e.family),
                    services::frontend_key(e, f),
                )
            })
            .sum();
        let node_port = e.node_port.and_then(|np| {
            count(
                services::node_ports_map(e.family),
                services::node_port_key(e, np),
            )
        });
        frontends + node_port.unwrap_or(0)
    }

    /// Tracked flows of entry `e` (to a frontend, or to its node port) answered by `ep`.
    fn tracked(&self, e: &ServiceEntry, ep: &ServiceEndpoint) -> usize {
        self.flows
            .iter()
            .filter(|f| {
                f.protocol == e.protocol.nft()
                    && (f.reply_src, f.reply_sport) == (ep.ip, ep.port)
                    && (e
                        .frontends
                        .iter()
                        .any(|x| (x.ip, x.port) == (f.orig_dst, f.orig_dport))
                        || Some(f.orig_dport) == e.node_port)
            })
            .count()
    }
}

/// The pod (`namespace/name`) behind each endpoint address, from the EndpointSlices' `targetRef`s
/// (the proxy's own view does not keep them).
fn pods_by_address(store: &dyn malla_store::Store) -> anyhow::Result<HashMap<IpAddr, String>> {
    let (slices, _) = store.list(malla_api::keys::ENDPOINT_SLICES)?;
    let mut pods = HashMap::new();
    for kv in slices {
        let Ok(slice) = serde_json::from_str::<malla_api::service::EndpointSlice>(&kv.value) else {
            continue;
        };
        for ep in slice.endpoints {
            if let (Some(ip), Some(pod)) = (ep.addresses.first(), ep.target) {
                pods.insert(*ip, pod.to_string());
            }
        }
    }
    Ok(pods)
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
    let map = dp.service_map;
    let counts = Counters::read(netns.as_ref());
    if a.output == "json" {
        let pods = pods_by_address(&*store)?;
        let entries: Vec<serde_json::Value> = map
            .entries
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                for list in ["cluster_endpoints", "local_endpoints"] {
                    if let Some(eps) = v[list].as_array_mut() {
                        for ep in eps {
                            let pod = ep["ip"]
                                .as_str()
                                .and_then(|ip| ip.parse().ok())
                                .and_then(|ip: IpAddr| pods.get(&ip));
                            ep["target"] = serde_json::json!(pod);
                        }
                    }
                }
                v["new_connections"] = serde_json::json!(counts.new_connections(e));
                v["connections"] = serde_json::json!(e
                    .cluster_endpoints
                    .iter()
                    .map(|ep| (format!("{}:{}", ep.ip, ep.port), counts.tracked(e, ep)))
                    .collect::<BTreeMap<_, _>>());
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    println!(
        "{:<28} {:<6} {:<30} {:<8} {:>8} ENDPOINTS (tracked connections)",
        "SERVICE", "PROTO", "FRONTENDS", "NODEPORT", "NEW"
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
                let n = counts.tracked(e, ep);
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
            "{:<28} {:<6} {:<30} {:<8} {:>8} {}",
            name,
            e.protocol.nft(),
            frontends.join(","),
            e.node_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            counts.new_connections(e),
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
