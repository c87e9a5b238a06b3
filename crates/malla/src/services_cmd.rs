//! `malla services`: this node's programmed services — frontends, the endpoints each one
//! dispatches to, new connections per service (the kernel's counters on its frontends) and
//! per endpoint the translated flows conntrack holds, and in JSON the pod behind each endpoint.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use anyhow::Context;
use clap::Args;
use malla_calc::masquerade;
use malla_calc::services::{self, FrontendKind, IpFamily, ServiceEndpoint, ServiceEntry};
use malla_dataplane::conntrack::{self, DnatFlow};
use malla_dataplane::netns::NetNs;
use serde::Serialize;

use crate::output::{Output, Table};

#[derive(Args)]
pub struct ServicesArgs {
    /// The node whose view to show.
    #[arg(long)]
    node: String,
    /// Output format: table, wide, json or yaml.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    output: Output,
}

/// One service port of `services -o json|yaml` (the proxy's entry, the pods behind its
/// endpoints and the kernel's counters).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryView {
    service: String,
    port_name: String,
    protocol: malla_api::service::Protocol,
    port: u16,
    family: &'static str,
    frontends: Vec<FrontendView>,
    node_port: Option<u16>,
    session_affinity_timeout: Option<u32>,
    external_traffic_policy: malla_api::service::TrafficPolicy,
    internal_traffic_policy: malla_api::service::TrafficPolicy,
    cluster_endpoints: Vec<EndpointView>,
    local_endpoints: Vec<EndpointView>,
    /// New connections counted on the frontends and the node port.
    new_connections: u64,
    /// Tracked connections per cluster endpoint (`ip:port`).
    connections: BTreeMap<String, usize>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FrontendView {
    ip: IpAddr,
    port: u16,
    /// ClusterIP, ExternalIP or LoadBalancer.
    kind: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointView {
    ip: IpAddr,
    port: u16,
    node: Option<String>,
    /// The pod (`namespace/name`) behind the address, from the EndpointSlices.
    target: Option<String>,
}

fn entry_view(e: &ServiceEntry, counts: &Counters, pods: &HashMap<IpAddr, String>) -> EntryView {
    let eps = |list: &[ServiceEndpoint]| {
        list.iter()
            .map(|ep| EndpointView {
                ip: ep.ip,
                port: ep.port,
                node: ep.node.as_ref().map(|n| n.to_string()),
                target: pods.get(&ep.ip).cloned(),
            })
            .collect()
    };
    EntryView {
        service: e.service.to_string(),
        port_name: e.port_name.to_string(),
        protocol: e.protocol,
        port: e.port,
        family: match e.family {
            IpFamily::IPv4 => "IPv4",
            IpFamily::IPv6 => "IPv6",
        },
        frontends: e
            .frontends
            .iter()
            .map(|f| FrontendView {
                ip: f.ip,
                port: f.port,
                kind: match f.kind {
                    FrontendKind::ClusterIp => "ClusterIP",
                    FrontendKind::ExternalIp => "ExternalIP",
                    FrontendKind::LoadBalancer => "LoadBalancer",
                },
            })
            .collect(),
        node_port: e.node_port,
        session_affinity_timeout: e.affinity_timeout,
        external_traffic_policy: e.external_traffic_policy,
        internal_traffic_policy: e.internal_traffic_policy,
        cluster_endpoints: eps(&e.cluster_endpoints),
        local_endpoints: eps(&e.local_endpoints),
        new_connections: counts.new_connections(e),
        connections: e
            .cluster_endpoints
            .iter()
            .map(|ep| (format!("{}:{}", ep.ip, ep.port), counts.tracked(e, ep)))
            .collect(),
    }
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

pub fn run(g: &crate::Globals, a: ServicesArgs) -> anyhow::Result<()> {
    let netns = match &g.datastore {
        Some(_) => None,
        None => {
            let state = g.lab_state()?;
            let node = state.node(&a.node).with_context(|| {
                let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
                format!(
                    "--node: no node {:?} in lab {} (nodes: {})",
                    a.node,
                    g.lab,
                    names.join(", ")
                )
            })?;
            Some(NetNs::open_named(&node.netns)?)
        }
    };
    let store = g.open_store()?;
    let view = malla_agent::read_view(&*store)?;
    let dp = malla_calc::compute(&view, &a.node);
    let map = dp.service_map;
    let counts = Counters::read(netns.as_ref());
    if a.output.is_document() {
        let pods = pods_by_address(&*store)?;
        let entries: Vec<EntryView> = map
            .entries
            .iter()
            .map(|e| entry_view(e, &counts, &pods))
            .collect();
        a.output.document(&entries)?;
        return Ok(());
    }
    let mut t = Table::new(&[
        "SERVICE",
        "PROTO",
        "FRONTENDS",
        "NODEPORT",
        "NEW",
        "ENDPOINTS (tracked connections)",
    ])
    .right(4);
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
            e.service.to_string()
        } else {
            format!("{}:{}", e.service, e.port_name)
        };
        t.row(vec![
            name,
            e.protocol.nft().into(),
            frontends.join(","),
            e.node_port
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            counts.new_connections(e).to_string(),
            if eps.is_empty() {
                "none (rejects)".to_string()
            } else {
                eps.join(" ")
            },
        ]);
    }
    t.print();
    println!("(* = on this node)");
    Ok(())
}
